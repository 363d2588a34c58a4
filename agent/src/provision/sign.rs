//! The organisation's ed25519 key and detached signatures over the exact bytes of `zhuli.toml`.
//!
//! Files (one line each, so they survive copy and paste):
//! - private key: `zhuli-org-private-key <hex of the PKCS#8 document>` (keep it off the box);
//! - public key: `zhuli-org-key ed25519 <hex>`;
//! - signature `zhuli.toml.sig`: `zhuli-signature ed25519 <public key hex> <signature hex>`.

use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use zeroize::Zeroizing;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignError {
    #[error("{what} is not a zhuli {expected} (its first word should be `{prefix}`)")]
    Format { what: String, expected: &'static str, prefix: &'static str },
    #[error("the signature does not match the file: it was changed after signing, or signed with another key")]
    Mismatch,
    #[error(
        "the file is signed by the key {found}, but this box trusts only {trusted}; sign it with the organisation's key, or factory-reset the box to trust a new one"
    )]
    Untrusted { found: String, trusted: String },
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// Whose key: the organisation's (configurations) or the vendor's (releases). The files differ
/// only in their first word, so one key is never taken for the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Organisation,
    Vendor,
}

impl Role {
    fn public_prefix(self) -> &'static str {
        match self {
            Role::Organisation => "zhuli-org-key",
            Role::Vendor => "zhuli-vendor-key",
        }
    }

    fn private_prefix(self) -> &'static str {
        match self {
            Role::Organisation => "zhuli-org-private-key",
            Role::Vendor => "zhuli-vendor-private-key",
        }
    }
}

/// A new organisation key pair: (private key file text, public key file text).
pub fn keygen() -> (String, String) {
    keygen_for(Role::Organisation)
}

/// A new key pair for `role`: (private key file text, public key file text).
pub fn keygen_for(role: Role) -> (String, String) {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).expect("the OS random source is available");
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("a key just generated is valid");
    (
        format!("{} {}\n", role.private_prefix(), hex(pkcs8.as_ref())),
        format!("{} ed25519 {}\n", role.public_prefix(), hex(pair.public_key().as_ref())),
    )
}

/// The public key (hex) in an organisation's public key file.
pub fn public_key(text: &str, what: &str) -> Result<String, SignError> {
    public_key_for(Role::Organisation, text, what)
}

/// The public key (hex) in a public key file of `role`.
pub fn public_key_for(role: Role, text: &str, what: &str) -> Result<String, SignError> {
    let words: Vec<&str> = text.split_whitespace().collect();
    match words.as_slice() {
        [p, "ed25519", key] if *p == role.public_prefix() && unhex(key).is_some_and(|k| k.len() == 32) => {
            Ok((*key).to_owned())
        }
        _ => Err(SignError::Format { what: what.into(), expected: "public key", prefix: role.public_prefix() }),
    }
}

/// Sign `data` with the organisation's private key file `key_text`: the signature file's text.
pub fn sign(data: &[u8], key_text: &str, what: &str) -> Result<String, SignError> {
    sign_for(Role::Organisation, data, key_text, what)
}

/// Sign `data` with the private key file `key_text` of `role`: the signature file's text.
pub fn sign_for(role: Role, data: &[u8], key_text: &str, what: &str) -> Result<String, SignError> {
    let bad = || SignError::Format { what: what.into(), expected: "private key", prefix: role.private_prefix() };
    let words: Vec<&str> = key_text.split_whitespace().collect();
    let [p, doc] = words.as_slice() else { return Err(bad()) };
    if *p != role.private_prefix() {
        return Err(bad());
    }
    let pkcs8 = unhex(doc).ok_or_else(bad)?;
    let pair = Ed25519KeyPair::from_pkcs8(&pkcs8).map_err(|_| bad())?;
    Ok(format!("zhuli-signature ed25519 {} {}\n", hex(pair.public_key().as_ref()), hex(pair.sign(data).as_ref())))
}

/// How `keygen`'s PKCS#8 v2 document (ring's template) begins: the version, the ed25519
/// algorithm, and the 32-byte seed's header. The public key follows the seed.
const PKCS8_V2_SEED_AT: [u8; 16] =
    [0x30, 0x51, 0x02, 0x01, 0x01, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20];

/// The seed and public key of the private key file `key_text`, for the store key's recovery
/// copy, which derives the organisation's X25519 key from the same seed. The seed is wiped on
/// drop.
pub(crate) fn seed(key_text: &str, what: &str) -> Result<(Zeroizing<[u8; 32]>, [u8; 32]), SignError> {
    let bad = || SignError::Format { what: what.into(), expected: "private key", prefix: "zhuli-org-private-key" };
    let words: Vec<&str> = key_text.split_whitespace().collect();
    let ["zhuli-org-private-key", doc] = words.as_slice() else { return Err(bad()) };
    let pkcs8 = Zeroizing::new(unhex(doc).ok_or_else(bad)?);
    // ring checks the document, and that its public key is its seed's.
    let pair = Ed25519KeyPair::from_pkcs8(&pkcs8).map_err(|_| bad())?;
    let found = pkcs8.strip_prefix(&PKCS8_V2_SEED_AT[..]).and_then(|rest| rest.get(..32)).ok_or_else(bad)?;
    let mut seed = Zeroizing::new([0u8; 32]);
    seed.copy_from_slice(found);
    let public: [u8; 32] = pair.public_key().as_ref().try_into().map_err(|_| bad())?;
    // The bytes read as the seed are the key ring checked.
    Ed25519KeyPair::from_seed_and_public_key(&seed[..], &public).map_err(|_| bad())?;
    Ok((seed, public))
}

/// Check the signature file `sig_text` over `data`; with `trusted`, the signer must be that key.
/// The signer's public key (hex).
pub fn verify(data: &[u8], sig_text: &str, trusted: Option<&str>) -> Result<String, SignError> {
    verify_file(data, sig_text, trusted, "zhuli.toml.sig")
}

/// [`verify`] for the signature file named `what`.
pub fn verify_file(data: &[u8], sig_text: &str, trusted: Option<&str>, what: &str) -> Result<String, SignError> {
    let bad = || SignError::Format { what: what.into(), expected: "signature", prefix: "zhuli-signature" };
    let words: Vec<&str> = sig_text.split_whitespace().collect();
    let ["zhuli-signature", "ed25519", key, sig] = words.as_slice() else { return Err(bad()) };
    let (Some(key_bytes), Some(sig_bytes)) = (unhex(key), unhex(sig)) else { return Err(bad()) };
    if let Some(t) = trusted
        && !t.eq_ignore_ascii_case(key)
    {
        return Err(SignError::Untrusted { found: short(key), trusted: short(t) });
    }
    UnparsedPublicKey::new(&ED25519, &key_bytes).verify(data, &sig_bytes).map_err(|_| SignError::Mismatch)?;
    Ok(key.to_ascii_lowercase())
}

/// A key's short form for messages.
pub fn short(key: &str) -> String {
    format!("{}…", key.chars().take(16).collect::<String>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_and_every_way_to_fail() {
        let (private, public) = keygen();
        let pubkey = public_key(&public, "org.pub").expect("public key");
        let data = b"serial = 3\n";
        let sig = sign(data, &private, "org.key").expect("sign");
        assert_eq!(verify(data, &sig, Some(&pubkey)), Ok(pubkey.clone()));
        assert_eq!(verify(data, &sig, None), Ok(pubkey.clone()));
        assert_eq!(verify(b"serial = 4\n", &sig, Some(&pubkey)), Err(SignError::Mismatch));
        let (other_private, other_public) = keygen();
        let other_sig = sign(data, &other_private, "other.key").expect("sign");
        assert!(matches!(verify(data, &other_sig, Some(&pubkey)), Err(SignError::Untrusted { .. })));
        // A signature claiming the trusted key but made by another is a mismatch.
        let forged = format!("zhuli-signature ed25519 {pubkey} {}", other_sig.split_whitespace().nth(3).unwrap_or(""));
        assert_eq!(verify(data, &forged, Some(&pubkey)), Err(SignError::Mismatch));
        assert!(matches!(verify(data, "garbage", None), Err(SignError::Format { .. })));
        assert!(matches!(sign(data, &public, "org.pub"), Err(SignError::Format { .. })));
        assert!(public_key(&other_public, "x").is_ok());
        // The seed read back makes the same public key.
        let (seed, public) = super::seed(&private, "org.key").expect("seed");
        assert_eq!(hex(&public), pubkey);
        let again = Ed25519KeyPair::from_seed_unchecked(&seed[..]).expect("seed");
        assert_eq!(again.public_key().as_ref(), public);
        assert!(matches!(super::seed(&other_public, "org.pub"), Err(SignError::Format { .. })));
    }
}
