//! Sealing of store values: XChaCha20-Poly1305 with a random 192-bit nonce per write and the
//! table name plus the redb key as associated data, so a value copied to another key or table
//! fails to open. Layout: `[format 1][nonce 24][ciphertext + tag 16]`.
//!
//! Files outside the store (the files tools' undo copies) are sealed by [`FileSealer`] in
//! pieces, so a file of any size streams through a small buffer: the STREAM construction with
//! XChaCha20-Poly1305 under a key derived from the store key. Layout: `ZHS1`, a 16-byte random
//! prefix, then 64 KiB pieces each with its tag. A piece's nonce is the prefix, its number and
//! whether it is the last, so pieces cannot be reordered, dropped or cut off at the end
//! unnoticed; the associated data is the file's name, so a copy cannot stand in for another.

use chacha20poly1305::{
    XChaCha20Poly1305, XNonce,
    aead::{Aead, KeyInit, Payload},
};

use super::key::StoreKey;

const FORMAT: u8 = 1;
const NONCE: usize = 24;
/// Bytes a sealed value adds to its plaintext.
pub const OVERHEAD: usize = 1 + NONCE + 16;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    #[error(
        "a value in table {table:?} failed authentication: the store was tampered with, is corrupt, or the key is wrong"
    )]
    Tampered { table: &'static str },
    #[error("a value in table {table:?} has unknown format {format}; the store was written by a newer zhuli")]
    Format { table: &'static str, format: u8 },
}

pub struct Sealer {
    cipher: XChaCha20Poly1305,
}

fn aad(table: &str, key: &[u8]) -> Vec<u8> {
    let mut a = Vec::with_capacity(table.len() + 1 + key.len());
    a.extend_from_slice(table.as_bytes());
    a.push(0);
    a.extend_from_slice(key);
    a
}

impl Sealer {
    pub fn new(key: &StoreKey) -> Self {
        Sealer { cipher: XChaCha20Poly1305::new(key.bytes().into()) }
    }

    pub fn seal(&self, table: &'static str, key: &[u8], plain: &[u8]) -> Vec<u8> {
        let nonce: [u8; NONCE] = rand::random();
        let ct = self
            .cipher
            .encrypt(XNonce::from_slice(&nonce), Payload { msg: plain, aad: &aad(table, key) })
            .expect("XChaCha20-Poly1305 encryption cannot fail for in-memory buffers");
        let mut out = Vec::with_capacity(OVERHEAD + plain.len());
        out.push(FORMAT);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        out
    }

    pub fn open(&self, table: &'static str, key: &[u8], sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        if sealed.len() < OVERHEAD {
            return Err(SealError::Tampered { table });
        }
        if sealed[0] != FORMAT {
            return Err(SealError::Format { table, format: sealed[0] });
        }
        let nonce = XNonce::from_slice(&sealed[1..1 + NONCE]);
        self.cipher
            .decrypt(nonce, Payload { msg: &sealed[1 + NONCE..], aad: &aad(table, key) })
            .map_err(|_| SealError::Tampered { table })
    }
}

const FILE_MAGIC: &[u8; 4] = b"ZHS1";
const FILE_PREFIX: usize = 16;
/// Plaintext bytes per sealed piece.
const PIECE: usize = 64 * 1024;
const TAG: usize = 16;

/// Seals files (undo copies) with a key of their own, derived from the store key.
pub struct FileSealer {
    cipher: XChaCha20Poly1305,
}

fn piece_nonce(prefix: &[u8; FILE_PREFIX], n: u32, last: bool) -> XNonce {
    let mut nonce = [0u8; NONCE];
    nonce[..FILE_PREFIX].copy_from_slice(prefix);
    nonce[FILE_PREFIX..FILE_PREFIX + 4].copy_from_slice(&n.to_be_bytes());
    nonce[FILE_PREFIX + 4] = u8::from(last);
    *XNonce::from_slice(&nonce)
}

/// Read until `buf` is full or the input ends; how many bytes were read.
fn fill(src: &mut impl std::io::Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match src.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

fn unsealable() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        "the kept copy failed authentication: it was changed, cut short, or sealed with another key",
    )
}

impl std::fmt::Debug for FileSealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FileSealer")
    }
}

impl FileSealer {
    pub fn new(key: &StoreKey) -> Self {
        let derive = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key.bytes());
        let sub = ring::hmac::sign(&derive, b"zhuli: sealed files, version 1");
        FileSealer { cipher: XChaCha20Poly1305::new(sub.as_ref().into()) }
    }

    /// Whether `head` (a file's first bytes) starts like a sealed file.
    pub fn is_sealed(head: &[u8]) -> bool {
        head.starts_with(FILE_MAGIC)
    }

    /// Seal everything `src` holds into `dst`, bound to `name`; the plaintext bytes read.
    pub fn seal(
        &self,
        name: &[u8],
        src: &mut impl std::io::Read,
        dst: &mut impl std::io::Write,
    ) -> std::io::Result<u64> {
        let prefix: [u8; FILE_PREFIX] = rand::random();
        dst.write_all(FILE_MAGIC)?;
        dst.write_all(&prefix)?;
        let (mut cur, mut next) = (vec![0u8; PIECE], vec![0u8; PIECE]);
        let mut len = fill(src, &mut cur)?;
        let (mut n, mut total) = (0u32, 0u64);
        loop {
            // A full piece may be the last one: look ahead.
            let ahead = if len == PIECE { fill(src, &mut next)? } else { 0 };
            let last = ahead == 0;
            let ct = self
                .cipher
                .encrypt(&piece_nonce(&prefix, n, last), Payload { msg: &cur[..len], aad: name })
                .map_err(|_| std::io::Error::other("sealing failed"))?;
            dst.write_all(&ct)?;
            total += len as u64;
            if last {
                return Ok(total);
            }
            std::mem::swap(&mut cur, &mut next);
            len = ahead;
            n = n.checked_add(1).ok_or_else(|| std::io::Error::other("the file is too large to seal"))?;
        }
    }

    /// Write what `src` (made by [`FileSealer::seal`] for `name`) holds into `dst`; the
    /// plaintext bytes written. Anything changed, reordered, cut short or extended fails, and
    /// `dst` must then be thrown away: pieces before the failure were written.
    pub fn open(
        &self,
        name: &[u8],
        src: &mut impl std::io::Read,
        dst: &mut impl std::io::Write,
    ) -> std::io::Result<u64> {
        let mut head = [0u8; 4 + FILE_PREFIX];
        if fill(src, &mut head)? != head.len() || !Self::is_sealed(&head) {
            return Err(unsealable());
        }
        let prefix: [u8; FILE_PREFIX] = head[4..].try_into().expect("16 bytes");
        let mut buf = vec![0u8; PIECE + TAG];
        let (mut n, mut total) = (0u32, 0u64);
        loop {
            let got = fill(src, &mut buf)?;
            if got < TAG {
                return Err(unsealable());
            }
            let open = |last: bool| {
                self.cipher.decrypt(&piece_nonce(&prefix, n, last), Payload { msg: &buf[..got], aad: name })
            };
            // A short piece can only be the last; a full one is the last if it opens as such.
            let (plain, last) = if got < buf.len() {
                (open(true).map_err(|_| unsealable())?, true)
            } else {
                match open(false) {
                    Ok(p) => (p, false),
                    Err(_) => (open(true).map_err(|_| unsealable())?, true),
                }
            };
            dst.write_all(&plain)?;
            total += plain.len() as u64;
            if last {
                // Nothing may follow the last piece.
                let mut extra = [0u8; 1];
                if fill(src, &mut extra)? != 0 {
                    return Err(unsealable());
                }
                return Ok(total);
            }
            n = n.checked_add(1).ok_or_else(unsealable)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealed(s: &FileSealer, name: &[u8], plain: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        assert_eq!(s.seal(name, &mut &plain[..], &mut out).expect("seals"), plain.len() as u64);
        out
    }

    fn opened(s: &FileSealer, name: &[u8], sealed: &[u8]) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::new();
        s.open(name, &mut &sealed[..], &mut out).map(|_| out)
    }

    #[test]
    fn sealed_files_open_whole_and_only_whole() {
        let s = FileSealer::new(&StoreKey::generate());
        // Empty, short, exactly one piece, one piece and a byte, several pieces.
        for len in [0, 5, PIECE, PIECE + 1, 3 * PIECE + 17] {
            let plain: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let c = sealed(&s, b"0123abcd", &plain);
            assert_eq!(c.len(), 4 + FILE_PREFIX + plain.len() + TAG * plain.len().div_ceil(PIECE).max(1));
            assert!(len < 16 || !c.windows(16).any(|w| w == &plain[..16]), "no plaintext in the copy");
            assert_eq!(opened(&s, b"0123abcd", &c).expect("opens"), plain, "{len} bytes");
            assert!(opened(&s, b"other-name", &c).is_err(), "bound to its name");
            assert!(opened(&FileSealer::new(&StoreKey::generate()), b"0123abcd", &c).is_err(), "another key");
            let mut flipped = c.clone();
            let at = c.len() - 1;
            flipped[at] ^= 1;
            assert!(opened(&s, b"0123abcd", &flipped).is_err(), "a changed byte");
            if len > PIECE {
                // Cut after the first piece: a whole piece, but not marked last.
                let cut = &c[..4 + FILE_PREFIX + PIECE + TAG];
                assert!(opened(&s, b"0123abcd", cut).is_err(), "cut at a piece boundary");
                // The first piece moved to the end.
                let mut swapped = c[..4 + FILE_PREFIX].to_vec();
                swapped.extend_from_slice(&c[4 + FILE_PREFIX + PIECE + TAG..]);
                swapped.extend_from_slice(&c[4 + FILE_PREFIX..4 + FILE_PREFIX + PIECE + TAG]);
                assert!(opened(&s, b"0123abcd", &swapped).is_err(), "pieces reordered");
            }
            let mut longer = c.clone();
            longer.push(0);
            assert!(opened(&s, b"0123abcd", &longer).is_err(), "bytes after the end");
        }
        assert!(opened(&s, b"x", b"plain text, never sealed").is_err());
    }

    #[test]
    fn sealed_values_are_bound_to_table_and_key() {
        let s = Sealer::new(&StoreKey::generate());
        let a = s.seal("inbox", b"k1", b"hello");
        let b = s.seal("inbox", b"k1", b"hello");
        assert_ne!(a, b, "a fresh nonce per write");
        assert_eq!(s.open("inbox", b"k1", &a).expect("opens"), b"hello");
        assert_eq!(s.open("inbox", b"k2", &a), Err(SealError::Tampered { table: "inbox" }));
        assert!(s.open("outbox", b"k1", &a).is_err());
        let mut flipped = a.clone();
        flipped[30] ^= 1;
        assert!(s.open("inbox", b"k1", &flipped).is_err());
        assert!(Sealer::new(&StoreKey::generate()).open("inbox", b"k1", &a).is_err(), "another key");
        assert!(!a.windows(5).any(|w| w == b"hello"));
    }
}
