//! `Secret`: a string that must never reach a log line, an error message or a panic.
//!
//! It has no `Display`, its `Debug` prints a fixed placeholder, and its bytes are wiped on drop.
//! The only way to read it is [`Secret::expose`], which call sites use exactly where the value
//! goes into the request that needs it.

use serde::{Deserialize, Deserializer};
use zeroize::Zeroize;

/// A secret value (client secret, access token, API key).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret's text, for the one request that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

/// In the configuration a secret is written out (on the installer's laptop), or names a systemd
/// credential (on the box, after import): `{ credential = "dingtalk-client-secret" }`, read from
/// `$CREDENTIALS_DIRECTORY` (systemd decrypts it there for the service).
#[derive(Deserialize)]
#[serde(untagged)]
enum Written {
    Value(String),
    Credential { credential: String },
}

/// Read credential `name` from `$CREDENTIALS_DIRECTORY`.
pub fn from_credential(name: &str) -> Result<Secret, String> {
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        return Err(format!("credential name `{name}` must be letters, digits, `-` and `_`"));
    }
    let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") else {
        // An operator's command on the box (doctor, backup) outside the service: as root, open
        // the sealed credential the service would get.
        return decrypt_stored(name).ok_or_else(|| {
            format!(
                "the secret is the systemd credential `{name}`, but no credentials were passed \
                 (run the agent as its systemd service, or this command as root on the box)"
            )
        });
    };
    let path = std::path::Path::new(&dir).join(name);
    let bytes = std::fs::read(&path).map_err(|e| format!("credential `{name}` cannot be read ({})", e.kind()))?;
    let text = String::from_utf8(bytes).map_err(|_| format!("credential `{name}` is not UTF-8"))?;
    Ok(Secret(text.trim_end_matches(['\n', '\r']).to_owned()))
}

/// Where provisioning keeps sealed credentials.
const CREDSTORES: [&str; 2] = ["/var/lib/zhuli-provisioning/current", "/var/lib/zhuli-provisioning"];

/// `systemd-creds decrypt` of the stored credential `name`, if it exists and may be opened.
fn decrypt_stored(name: &str) -> Option<Secret> {
    decrypt_stored_bytes(name).and_then(|b| String::from_utf8(b.to_vec()).ok()).map(Secret)
}

/// [`decrypt_stored`] as bytes (the store key may be raw bytes).
pub(crate) fn decrypt_stored_bytes(name: &str) -> Option<zeroize::Zeroizing<Vec<u8>>> {
    let file = CREDSTORES.iter().map(|d| std::path::Path::new(d).join(format!("{name}.cred"))).find(|p| p.exists())?;
    let out = std::process::Command::new("systemd-creds")
        .arg("decrypt")
        .arg(format!("--name={name}"))
        .arg(&file)
        .arg("-")
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    Some(zeroize::Zeroizing::new(out.stdout))
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Written::deserialize(d).map_err(|_| {
            serde::de::Error::custom("expected a string, or { credential = \"name\" } naming a systemd credential")
        })? {
            Written::Value(v) => Ok(Secret(v)),
            Written::Credential { credential } => from_credential(&credential).map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_value() {
        let s = Secret::new("hunter2-very-secret");
        let shown = format!("{s:?} {:?}", Some(&s));
        assert!(!shown.contains("hunter2"), "{shown}");
        assert_eq!(s.expose(), "hunter2-very-secret");
    }
}
