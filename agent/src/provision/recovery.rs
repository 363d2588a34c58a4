//! The store key's recovery copy: the box's store key sealed to the organisation's public key,
//! one line on the provisioning receipt, so that the organisation's private key (org.key) opens
//! a dead box's backups on a laptop or a new box.
//!
//! The organisation key is ed25519 (it signs configurations); sealing uses its X25519 form, the
//! standard one (libsodium's `crypto_sign_ed25519_pk_to_curve25519` and `…_sk_to_curve25519`):
//! the public Edwards point as a Montgomery point, and as the secret the clamped first half of
//! the SHA-512 of the seed — the very scalar ed25519 signs with, so both forms are one key. A
//! copy is sealed once, in the manner of HPKE's base mode: a fresh X25519 key on the box,
//! Diffie-Hellman with the organisation's, HKDF-SHA256 (salt: this format's label; info: both
//! public keys) into a ChaCha20-Poly1305 key and nonce used for this one copy, and the line's
//! readable fields (format, organisation key, box) as associated data, so none can be edited.
//!
//! The line: `zhuli-store-key-recovery v1 x25519 org:<first 16 hex of the org key> box:<box id>
//! <ephemeral public key, 64 hex> <sealed store key and tag, 96 hex>`.
//!
//! Never writes, logs or puts in an error the plain store key, the organisation's seed or
//! scalar, or a shared secret; each is wiped on drop.

use std::path::{Path, PathBuf};

use chacha20poly1305::{
    ChaCha20Poly1305, Key, Nonce,
    aead::{Aead, KeyInit, Payload},
};
use curve25519_dalek::edwards::CompressedEdwardsY;
use x25519_dalek::{PublicKey, SharedSecret, StaticSecret};
use zeroize::Zeroizing;

use super::{Credentials, ImportOptions, Receipt, sign};
use crate::{
    config::Config,
    store::key::{CREDENTIAL, StoreKey},
};

/// The first word of a copy.
pub const PREFIX: &str = "zhuli-store-key-recovery";
const VERSION: &str = "v1";
const SUITE: &str = "x25519";
/// The HKDF salt: this format and its algorithms, so a key derived here serves nothing else.
const LABEL: &[u8] = b"zhuli-store-key-recovery v1 x25519 hkdf-sha256 chacha20poly1305";
/// Hex characters of the organisation key the line names it by (as `sign::short` shows it).
const ORG_ID: usize = 16;
/// The ChaCha20-Poly1305 key and nonce, from one HKDF expansion.
const OKM: usize = 32 + 12;
/// A sealed store key: 32 bytes and the 16-byte tag.
const SEALED: usize = 32 + 16;

#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    #[error(
        "{0} holds no store key recovery copy (a line starting `{PREFIX}`); give the receipt of the box's import, or a file holding that line"
    )]
    NoCopy(String),
    #[error("the store key recovery copy in {what} is damaged ({reason}); copy the whole line again from the receipt")]
    Damaged { what: String, reason: String },
    #[error(
        "the store key recovery copy in {what} is of format {found}; this zhuli reads {VERSION}: use a newer zhuli"
    )]
    Newer { what: String, found: String },
    #[error(transparent)]
    Key(#[from] sign::SignError),
    #[error(
        "the store key recovery copy in {what} was sealed to the organisation key {sealed_to}…, but {key} is the key {given}…; use that key's org.key"
    )]
    WrongKey { what: String, sealed_to: String, key: String, given: String },
    #[error(
        "the store key recovery copy in {what} does not open with the organisation key it names: the line was changed or damaged; copy it again from the receipt"
    )]
    Unopened { what: String },
    #[error("the organisation key {0}… is not a usable X25519 key (not a point of the curve, or a weak one)")]
    BadPublicKey(String),
    #[error("the box id {0:?} cannot be written in a recovery copy (letters, digits, - and _ only)")]
    BadBoxId(String),
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
}

/// A store key opened from its recovery copy, and the box it came from.
pub struct Recovered {
    pub key: StoreKey,
    pub box_id: String,
    /// The organisation key that opened it (its first 16 hex characters).
    pub org_key: String,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != 2 * N || !text.is_ascii() {
        return None;
    }
    let mut out = [0u8; N];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// The organisation's public key (ed25519, hex) as an X25519 key, and its id for the line.
fn org_public(ed25519_hex: &str) -> Result<(PublicKey, String), RecoveryError> {
    let id: String = ed25519_hex.chars().take(ORG_ID).collect::<String>().to_ascii_lowercase();
    let bad = || RecoveryError::BadPublicKey(id.clone());
    let point = CompressedEdwardsY(unhex::<32>(ed25519_hex).ok_or_else(bad)?).decompress().ok_or_else(bad)?;
    // A point of small order would make every shared secret one of a few known values.
    if point.is_small_order() {
        return Err(bad());
    }
    Ok((PublicKey::from(point.to_montgomery().to_bytes()), id))
}

/// The organisation's X25519 secret from its ed25519 seed: SHA-512 of the seed, first half,
/// clamped (RFC 8032's secret scalar; libsodium's `crypto_sign_ed25519_sk_to_curve25519`).
fn org_secret(seed: &[u8; 32]) -> StaticSecret {
    // ring's digest value is not wiped: it stays in this frame, which ends here.
    let digest = ring::digest::digest(&ring::digest::SHA512, seed);
    let mut scalar = Zeroizing::new([0u8; 32]);
    scalar.copy_from_slice(&digest.as_ref()[..32]);
    scalar[0] &= 248;
    scalar[31] &= 127;
    scalar[31] |= 64;
    StaticSecret::from(*scalar)
}

/// HKDF's output length, as ring wants it.
struct OkmLen;

impl ring::hkdf::KeyType for OkmLen {
    fn len(&self) -> usize {
        OKM
    }
}

/// The AEAD for one copy, from the shared secret and both public keys.
fn cipher(shared: &SharedSecret, ephemeral: &PublicKey, org: &PublicKey) -> (ChaCha20Poly1305, [u8; 12]) {
    let prk = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, LABEL).extract(shared.as_bytes());
    let info = [ephemeral.as_bytes().as_slice(), org.as_bytes().as_slice()];
    let mut okm = Zeroizing::new([0u8; OKM]);
    prk.expand(&info, OkmLen)
        .and_then(|o| o.fill(&mut okm[..]))
        .expect("44 bytes are within HKDF-SHA256's limit of 8160");
    let mut nonce = [0u8; 12];
    nonce.copy_from_slice(&okm[32..]);
    (ChaCha20Poly1305::new(Key::from_slice(&okm[..32])), nonce)
}

/// A copy's readable fields, which its seal covers.
fn header(org_id: &str, box_id: &str) -> String {
    format!("{PREFIX} {VERSION} {SUITE} org:{org_id} box:{box_id}")
}

/// Seal `key` to the organisation key `org_public_hex` (ed25519, hex, as in org.pub): the line.
pub fn seal(key: &StoreKey, org_public_hex: &str, box_id: &str) -> Result<String, RecoveryError> {
    let mut ephemeral = Zeroizing::new([0u8; 32]);
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut ephemeral[..])
        .expect("the OS random source is available");
    seal_with(key, org_public_hex, box_id, StaticSecret::from(*ephemeral))
}

/// [`seal`] with a given ephemeral secret (tests make it fixed).
fn seal_with(
    key: &StoreKey,
    org_public_hex: &str,
    box_id: &str,
    ephemeral: StaticSecret,
) -> Result<String, RecoveryError> {
    if box_id.is_empty() || !box_id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        return Err(RecoveryError::BadBoxId(box_id.into()));
    }
    let (org, org_id) = org_public(org_public_hex)?;
    let ephemeral_public = PublicKey::from(&ephemeral);
    let shared = ephemeral.diffie_hellman(&org);
    if !shared.was_contributory() {
        return Err(RecoveryError::BadPublicKey(org_id));
    }
    let (cipher, nonce) = cipher(&shared, &ephemeral_public, &org);
    let header = header(&org_id, box_id);
    let sealed = cipher
        .encrypt(Nonce::from_slice(&nonce), Payload { msg: key.bytes(), aad: header.as_bytes() })
        .expect("ChaCha20-Poly1305 encryption cannot fail for in-memory buffers");
    Ok(format!("{header} {} {}", hex(ephemeral_public.as_bytes()), hex(&sealed)))
}

/// Open the copy `line` with the organisation's private key file `org_key_text` (named
/// `key_name` in errors); `what` names where the line came from.
pub fn open(line: &str, org_key_text: &str, key_name: &str, what: &str) -> Result<Recovered, RecoveryError> {
    let damaged = |reason: String| RecoveryError::Damaged { what: what.into(), reason };
    let words: Vec<&str> = line.split_whitespace().collect();
    if words.first() != Some(&PREFIX) {
        return Err(damaged(format!("it does not start with `{PREFIX}`")));
    }
    match words.get(1) {
        Some(&VERSION) => {}
        Some(v) if v.strip_prefix('v').is_some_and(|n| n.parse::<u32>().is_ok()) => {
            return Err(RecoveryError::Newer { what: what.into(), found: (*v).into() });
        }
        _ => return Err(damaged("its format is missing".into())),
    }
    let [_, _, suite, org, box_field, ephemeral, sealed] = words.as_slice() else {
        return Err(damaged(format!("it has {} fields, a {VERSION} copy 7", words.len())));
    };
    if *suite != SUITE {
        return Err(damaged(format!("it names the algorithm {suite:?}, not {SUITE}")));
    }
    let sealed_to = org
        .strip_prefix("org:")
        .filter(|id| id.len() == ORG_ID && id.chars().all(|c| c.is_ascii_hexdigit()))
        .ok_or_else(|| damaged("its organisation key field is not org:<16 hex>".into()))?;
    let box_id = box_field.strip_prefix("box:").ok_or_else(|| damaged("its box field is not box:<id>".into()))?;
    let ephemeral = unhex::<32>(ephemeral).ok_or_else(|| damaged("its public key is not 64 hex characters".into()))?;
    let sealed = unhex::<SEALED>(sealed)
        .ok_or_else(|| damaged(format!("its sealed key is not {} hex characters", 2 * SEALED)))?;

    let (seed, public) = sign::seed(org_key_text, key_name)?;
    let given: String = hex(&public).chars().take(ORG_ID).collect();
    if !given.eq_ignore_ascii_case(sealed_to) {
        return Err(RecoveryError::WrongKey {
            what: what.into(),
            sealed_to: sealed_to.to_ascii_lowercase(),
            key: key_name.into(),
            given,
        });
    }
    let secret = org_secret(&seed);
    let org = PublicKey::from(&secret);
    let ephemeral = PublicKey::from(ephemeral);
    let shared = secret.diffie_hellman(&ephemeral);
    let unopened = || RecoveryError::Unopened { what: what.into() };
    if !shared.was_contributory() {
        return Err(unopened());
    }
    let (cipher, nonce) = cipher(&shared, &ephemeral, &org);
    let aad = header(sealed_to, box_id);
    let plain = Zeroizing::new(
        cipher
            .decrypt(Nonce::from_slice(&nonce), Payload { msg: &sealed, aad: aad.as_bytes() })
            .map_err(|_| unopened())?,
    );
    let mut key = Zeroizing::new([0u8; 32]);
    key.copy_from_slice(plain.get(..32).ok_or_else(unopened)?);
    Ok(Recovered { key: StoreKey::from_bytes(*key), box_id: (*box_id).into(), org_key: given })
}

/// The copies in `text` (a receipt, or a file holding the line), each from its first word.
pub fn copies_in(text: &str) -> Vec<&str> {
    text.lines().filter_map(|l| l.find(PREFIX).map(|at| l[at..].trim())).collect()
}

/// Open the copy in the file `recovery` with the organisation's private key file `org_key`.
/// Of several copies (receipts put together), the first that opens.
pub fn recover(recovery: &Path, org_key: &Path) -> Result<Recovered, RecoveryError> {
    let read =
        |path: &Path| std::fs::read(path).map_err(|source| RecoveryError::Read { path: path.to_owned(), source });
    let text = String::from_utf8_lossy(&read(recovery)?).into_owned();
    let key_text = Zeroizing::new(String::from_utf8_lossy(&Zeroizing::new(read(org_key)?)).into_owned());
    let what = recovery.display().to_string();
    let mut first_error = None;
    for line in copies_in(&text) {
        match open(line, &key_text, &org_key.display().to_string(), &what) {
            Ok(recovered) => return Ok(recovered),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    Err(first_error.unwrap_or(RecoveryError::NoCopy(what)))
}

/// The receipt's lines for a copy: the line, and what it is for.
pub fn receipt_lines(line: &str) -> String {
    let org = line.split_whitespace().find_map(|w| w.strip_prefix("org:")).unwrap_or("?");
    format!(
        "store key recovery copy: {line}\n  (this box's store key, sealed to the organisation key {org}…: only that key's org.key opens it. Keep this line with org.key, apart from the backups: with both, `zhuli restore --recovery` opens this box's backups on a new box or a laptop)\n"
    )
}

/// After a switch: put the recovery copy of this box's store key on `receipt`, sealed to
/// `org_key` (hex), the organisation key the box trusts. Without one (an unsigned development
/// import) there is none; a store key the box cannot read is said on the receipt.
pub(super) fn add_to(receipt: &mut Receipt, opts: &ImportOptions, config: &Config, org_key: Option<&str>) {
    let Some(org_key) = org_key else {
        log::info!(
            "provisioning: the box trusts no organisation key, so the receipt carries no store key recovery copy"
        );
        return;
    };
    let sealed =
        store_key(opts, config).and_then(|key| seal(&key, org_key, &receipt.box_id).map_err(|e| e.to_string()));
    match sealed {
        Ok(line) => receipt.recovery = Some(line),
        Err(e) => receipt.errors.push(format!(
            "no store key recovery copy on this receipt: {e}; the configuration is imported, and the next import puts the copy on its receipt"
        )),
    }
}

/// The box's store key: the sealed credential `<root>/store-key.cred` the agent's unit loads
/// (made by zhuli-store-key.service), opened as the import opens its own; on a development box
/// without one (plain credentials), the configuration's `[store] key_file`. A production import
/// never reads a path a stick names.
fn store_key(opts: &ImportOptions, config: &Config) -> Result<StoreKey, String> {
    let sealed = opts.root.join(format!("{CREDENTIAL}.cred"));
    if sealed.exists() {
        let raw = super::decrypt(CREDENTIAL, &sealed)
            .ok_or_else(|| format!("the store key {} does not unseal on this box (systemd-creds)", sealed.display()))?;
        return StoreKey::parse(raw, &sealed).map_err(|e| e.to_string());
    }
    match (&config.store.key_file, opts.credentials) {
        (Some(file), Credentials::Plain) => StoreKey::read(file).map_err(|e| e.to_string()),
        _ => Err(format!(
            "the box has no store key yet ({} is missing; zhuli-store-key.service makes it)",
            sealed.display()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unhex32(text: &str) -> [u8; 32] {
        unhex::<32>(text).expect("32 bytes of hex")
    }

    /// An org.key file holding `seed`, as `sign::keygen` writes one (ring's PKCS#8 v2).
    fn org_key_file(seed: &[u8; 32]) -> (String, String) {
        let pair = ring::signature::Ed25519KeyPair::from_seed_unchecked(seed).expect("seed");
        let public = ring::signature::KeyPair::public_key(&pair).as_ref().to_vec();
        let mut doc =
            vec![0x30, 0x51, 0x02, 0x01, 0x01, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20];
        doc.extend_from_slice(seed);
        doc.extend_from_slice(&[0x81, 0x21, 0x00]);
        doc.extend_from_slice(&public);
        (format!("zhuli-org-private-key {}\n", hex(&doc)), hex(&public))
    }

    fn org() -> (String, String) {
        let (private, public) = sign::keygen();
        (private, sign::public_key(&public, "org.pub").expect("public key"))
    }

    #[test]
    fn the_conversion_is_libsodiums() {
        // libsodium's test/default/ed25519_convert.{c,exp}.
        let seed = unhex32("421151a459faeade3d247115f94aedae42318124095afabe4d1451a559faedee");
        let (private, public) = org_key_file(&seed);
        assert_eq!(public, "b5076a8474a832daee4dd5b4040983b6623b5f344aca57d4d6ee4baf3f259e6e");
        let (x_public, id) = org_public(&public).expect("a valid key");
        assert_eq!(hex(x_public.as_bytes()), "f1814f0e8ff1043d8a44d25babff3cedcae6c22c3edaa48f857ae70de2baae50");
        assert_eq!(id, "b5076a8474a832da");
        let (read_seed, _) = sign::seed(&private, "org.key").expect("seed");
        let secret = org_secret(&read_seed);
        assert_eq!(hex(&secret.to_bytes()), "8052030376d47112be7f73ed7a019293dd12ad910b654455798b4667d73de166");
    }

    #[test]
    fn a_diffie_hellman_from_both_sides_agrees() {
        for _ in 0..8 {
            let (private, public) = org();
            let (org_x, _) = org_public(&public).expect("public");
            let (seed, _) = sign::seed(&private, "org.key").expect("seed");
            let secret = org_secret(&seed);
            // The converted public key is the converted secret's.
            assert_eq!(PublicKey::from(&secret).as_bytes(), org_x.as_bytes());
            let box_side = StaticSecret::from(rand::random::<[u8; 32]>());
            let from_box = box_side.diffie_hellman(&org_x);
            let from_org = secret.diffie_hellman(&PublicKey::from(&box_side));
            assert_eq!(from_box.as_bytes(), from_org.as_bytes());
        }
    }

    #[test]
    fn a_sealed_key_opens_with_the_organisation_key_and_says_whose_it_is() {
        let (private, public) = org();
        let key = StoreKey::generate();
        let line = seal(&key, &public, "0123456789abcdef").expect("seal");
        assert!(line.starts_with(&format!("{PREFIX} v1 x25519 org:{} box:0123456789abcdef ", &public[..16])), "{line}");
        assert_eq!(line.lines().count(), 1);
        assert!(!line.contains(&hex(key.bytes())), "the plain key is not in the line");
        let opened = open(&line, &private, "org.key", "receipt").expect("opens");
        assert_eq!(opened.key.bytes(), key.bytes());
        assert_eq!(opened.box_id, "0123456789abcdef");
        assert_eq!(opened.org_key, public[..16]);
        // Each copy is sealed afresh.
        assert_ne!(seal(&key, &public, "0123456789abcdef").expect("seal"), line);
        // Found in a receipt, after its field name, with whitespace changed by a copy and paste.
        let receipt = format!("zhuli provisioning receipt\n{}", receipt_lines(&line).replace(' ', "  "));
        assert_eq!(copies_in(&receipt).len(), 1);
        assert_eq!(open(copies_in(&receipt)[0], &private, "org.key", "r").expect("opens").key.bytes(), key.bytes());
    }

    #[test]
    fn another_organisation_key_is_refused_by_name() {
        let (_, public) = org();
        let (other_private, other_public) = org();
        let line = seal(&StoreKey::generate(), &public, "box1").expect("seal");
        let e = open(&line, &other_private, "other/org.key", "receipt.txt").err().expect("refused");
        let said = e.to_string();
        assert!(matches!(e, RecoveryError::WrongKey { .. }), "{said}");
        assert!(said.contains(&public[..16]) && said.contains(&other_public[..16]) && said.contains("other/org.key"));
        assert!(said.contains("use that key's org.key"), "{said}");
        // The public key file in place of the private one.
        let e = open(&line, &format!("zhuli-org-key ed25519 {public}"), "org.pub", "r").err().expect("refused");
        assert!(matches!(e, RecoveryError::Key(_)), "{e}");
    }

    #[test]
    fn a_changed_or_damaged_line_is_refused_with_the_reason() {
        let (private, public) = org();
        let line = seal(&StoreKey::generate(), &public, "box1").expect("seal");
        let words: Vec<&str> = line.split_whitespace().collect();
        let with = |i: usize, w: &str| {
            let mut v = words.clone();
            v[i] = w;
            v.join(" ")
        };
        let flip = |w: &str| {
            let mut b = w.as_bytes().to_vec();
            b[10] = if b[10] == b'0' { b'1' } else { b'0' };
            String::from_utf8(b).expect("ascii")
        };
        let cases: Vec<(String, &str)> = vec![
            (with(6, &flip(words[6])), "does not open"),
            (with(5, &flip(words[5])), "does not open"),
            (with(4, "box:box2"), "does not open"),
            (with(2, "p256"), "the algorithm"),
            (with(1, "v2"), "format v2"),
            (with(6, &words[6][..90]), "not 96 hex"),
            (with(5, "zz"), "not 64 hex"),
            (with(3, "org:xyz"), "org:<16 hex>"),
            (words[..6].join(" "), "6 fields"),
            (line.replacen(PREFIX, "zhuli-store-key", 1), "does not start"),
        ];
        for (changed, expect) in cases {
            let e = open(&changed, &private, "org.key", "receipt").err().expect("refused").to_string();
            assert!(e.contains(expect), "{changed}: {e}");
        }
    }

    #[test]
    fn a_copy_written_by_v1_keeps_opening() {
        // Fixed keys and ephemeral: the line this format writes, pinned.
        let (private, public) = org_key_file(&[7u8; 32]);
        let key = StoreKey::from_bytes([0x5a; 32]);
        let line = seal_with(&key, &public, "feedfacecafebeef", StaticSecret::from([9u8; 32])).expect("seal");
        let pinned = include_str!("../../../tests/fixtures/recovery/v1-copy.txt");
        assert_eq!(copies_in(pinned), [line.as_str()]);
        assert_eq!(open(&line, &private, "org.key", "fixture").expect("opens").key.bytes(), &[0x5a; 32]);
    }

    #[test]
    fn a_weak_or_malformed_organisation_key_is_refused_when_sealing() {
        let key = StoreKey::generate();
        // The identity point (small order), and a y with no point on the curve.
        let identity = format!("01{}", "00".repeat(31));
        assert!(matches!(seal(&key, &identity, "b"), Err(RecoveryError::BadPublicKey(_))));
        assert!(matches!(seal(&key, &format!("02{}", "00".repeat(31)), "b"), Err(RecoveryError::BadPublicKey(_))));
        assert!(matches!(seal(&key, "abcd", "b"), Err(RecoveryError::BadPublicKey(_))));
        let (_, public) = org();
        assert!(matches!(seal(&key, &public, "two words"), Err(RecoveryError::BadBoxId(_))));
    }
}
