//! The 256-bit store key: from the systemd credential `store-key` (`LoadCredentialEncrypted=`,
//! so TPM2- or host-key sealed on the box), or from a key file for development and tests.
//!
//! The key never appears in an error, a log line or a `Debug` print, and is wiped on drop.

use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

/// Name of the systemd credential holding the key.
pub const CREDENTIAL: &str = "store-key";

pub struct StoreKey(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for StoreKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreKey(<redacted>)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(
        "no store key: the service needs the credential {CREDENTIAL:?} (LoadCredentialEncrypted=store-key:… in zhuli.service), or [store] key_file for development"
    )]
    Missing,
    #[error(
        "cannot read the store key from {path}: {source}; check [store] key_file, or make a development key with `zhuli store new-key {path}`"
    )]
    Read { path: PathBuf, source: std::io::Error },
    #[error("the store key in {path} is not a key: expected 32 raw bytes or 64 hex characters, found {len} bytes")]
    Malformed { path: PathBuf, len: usize },
    #[error("cannot write a new store key to {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
}

impl StoreKey {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        StoreKey(Zeroizing::new(bytes))
    }

    pub fn bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// A fresh random key.
    pub fn generate() -> Self {
        let mut k = Zeroizing::new([0u8; 32]);
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut k[..])
            .expect("the OS random source is available");
        StoreKey(k)
    }

    /// Find the key: the systemd credential when the service has one, else `key_file`.
    pub fn load(key_file: Option<&Path>) -> Result<Self, KeyError> {
        if let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") {
            let path = PathBuf::from(dir).join(CREDENTIAL);
            if path.exists() {
                return Self::read(&path);
            }
        }
        match key_file {
            Some(p) => Self::read(p),
            // An operator's command as root on the box, outside the service: the sealed
            // credential the service would get.
            None => match crate::secret::decrypt_stored_bytes(CREDENTIAL) {
                Some(raw) => Self::parse(raw, Path::new("(sealed credential store-key)")),
                None => Err(KeyError::Missing),
            },
        }
    }

    /// Read a key file: 32 raw bytes, or 64 hex characters with optional surrounding whitespace.
    pub fn read(path: &Path) -> Result<Self, KeyError> {
        let raw =
            Zeroizing::new(std::fs::read(path).map_err(|source| KeyError::Read { path: path.to_owned(), source })?);
        Self::parse(raw, path)
    }

    /// A key from its bytes (`path` names where they came from, in errors).
    pub(crate) fn parse(raw: Zeroizing<Vec<u8>>, path: &Path) -> Result<Self, KeyError> {
        let malformed = || KeyError::Malformed { path: path.to_owned(), len: raw.len() };
        let mut key = Zeroizing::new([0u8; 32]);
        if raw.len() == 32 {
            key.copy_from_slice(&raw);
            return Ok(StoreKey(key));
        }
        let text = std::str::from_utf8(&raw).map_err(|_| malformed())?.trim();
        if text.len() != 64 {
            return Err(malformed());
        }
        for (i, chunk) in text.as_bytes().chunks(2).enumerate() {
            let hex = std::str::from_utf8(chunk).map_err(|_| malformed())?;
            key[i] = u8::from_str_radix(hex, 16).map_err(|_| malformed())?;
        }
        Ok(StoreKey(key))
    }

    /// Write this key as 64 hex characters to a new file readable by its owner only.
    pub fn write_new(&self, path: &Path) -> Result<(), KeyError> {
        use std::io::Write;
        let err = |source| KeyError::Write { path: path.to_owned(), source };
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let mut f = opts.open(path).map_err(err)?;
        let hex: Zeroizing<String> = Zeroizing::new(self.0.iter().map(|b| format!("{b:02x}")).collect());
        f.write_all(hex.as_bytes()).and_then(|_| f.write_all(b"\n")).and_then(|_| f.sync_all()).map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_and_hex_keys_load_and_bad_ones_say_why() {
        let dir = std::env::temp_dir().join(format!("zhuli-key-{}-{:x}", std::process::id(), rand::random::<u32>()));
        std::fs::create_dir_all(&dir).expect("dir");
        let k = StoreKey::generate();
        k.write_new(&dir.join("hex")).expect("write");
        assert_eq!(StoreKey::read(&dir.join("hex")).expect("hex key").bytes(), k.bytes());
        std::fs::write(dir.join("raw"), k.bytes()).expect("write raw");
        assert_eq!(StoreKey::read(&dir.join("raw")).expect("raw key").bytes(), k.bytes());
        std::fs::write(dir.join("short"), "abcd").expect("write");
        let e = StoreKey::read(&dir.join("short")).expect_err("too short").to_string();
        assert!(e.contains("expected 32 raw bytes or 64 hex"), "{e}");
        std::fs::write(dir.join("nothex"), "zz".repeat(32)).expect("write");
        assert!(matches!(StoreKey::read(&dir.join("nothex")), Err(KeyError::Malformed { .. })));
        assert!(k.write_new(&dir.join("hex")).is_err(), "an existing key file is never overwritten");
        assert_eq!(format!("{k:?}"), "StoreKey(<redacted>)");
        let _ = std::fs::remove_dir_all(dir);
    }
}
