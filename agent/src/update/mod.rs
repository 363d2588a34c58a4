//! Release bundles: what an update of the box is made of, and every check made before a byte of
//! it is written anywhere.
//!
//! A bundle is a folder (on the provisioning stick, `update/`, or at an HTTPS address):
//! - `zhuli-release.toml`, the manifest: product, version, architecture, the root file system
//!   image and its dm-verity data (each with the bytes it fills in its slot), the unified kernel
//!   image, and the verity root hash the kernel image carries;
//! - the files it names;
//! - `SHA256SUMS` (sha256sum's format) over the manifest and every file;
//! - `SHA256SUMS.sig`, the vendor's ed25519 signature over `SHA256SUMS`, whose public key is baked
//!   into the image (`/usr/share/zhuli/vendor.pub`).
//!
//! [`check`] refuses, each with what was wrong and what to do: a bundle that is not signed, or
//! signed by another key; a file whose sha256 differs or that is not listed; a bundle for another
//! product or architecture; a version not newer than the running one (no downgrade, like the
//! configuration's serial); a part larger than its slot.

pub mod boot;
pub mod firmware;
pub mod gpt;
pub mod install;
pub mod pull;
pub mod state;
pub mod stick;

use std::path::{Path, PathBuf};

use rust_i18n::t;
use serde::Deserialize;

use crate::provision::sign::{self, Role, SignError};

/// Root's update folder on the box: the update journal, the survey of releases, downloads.
pub const DIR: &str = "/var/lib/zhuli-update";

/// Root's update folder: [`DIR`], or `ZHULI_UPDATE_DIR` when set (tests and development, so a
/// run never reads or writes the machine's own journal).
pub fn dir() -> std::path::PathBuf {
    std::env::var_os("ZHULI_UPDATE_DIR").map_or_else(|| DIR.into(), std::path::PathBuf::from)
}

pub const MANIFEST: &str = "zhuli-release.toml";
pub const SUMS: &str = "SHA256SUMS";
pub const SIGNATURE: &str = "SHA256SUMS.sig";
pub const PRODUCT: &str = "zhuli";
pub const ARCHITECTURE: &str = "x86-64";
/// The admin chat's request to root (`install`, `rollback`, `check`), in the agent's state
/// directory; zhuli-update.path starts zhuli-update.service when it appears.
pub const REQUEST: &str = "update/request";
/// When the agent last took a snapshot of the store for an update (Unix ms), in its state
/// directory: root installs a release in the maintenance window only after one.
pub const SNAPSHOT_NOTE: &str = "update/snapshot";
/// The longest version: `zhuli-verity_<version>` fits a partition name (36 characters).
pub const VERSION_MAX: usize = 36 - "zhuli-verity_".len();

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("the bundle has no {0}: it is not a zhuli release bundle, or it was copied only in part")]
    Missing(String),
    #[error("{what} cannot be read: {reason}")]
    Unreadable { what: String, reason: String },
    #[error("the bundle is not signed ({SIGNATURE} is missing); only releases signed by the vendor are installed")]
    Unsigned,
    #[error("{SIGNATURE} is not valid: {0}")]
    Signature(SignError),
    #[error(
        "the bundle is signed by the key {found}, but this box installs only releases signed by {trusted}; get the release from its vendor"
    )]
    Untrusted { found: String, trusted: String },
    #[error("{SUMS} line {line} is not `<sha256>  <file name>`")]
    SumsLine { line: usize },
    #[error("{SUMS} names {0:?}, which is not a plain file name")]
    Name(String),
    #[error("{0} is not listed in {SUMS}: the bundle was put together wrongly")]
    NotListed(String),
    #[error("{file} does not match its sha256 in {SUMS}: it was changed or damaged on the way; copy the bundle again")]
    Digest { file: String },
    #[error("{MANIFEST}: {0}")]
    Manifest(String),
    #[error("the bundle is for {found:?}, not for zhuli")]
    Product { found: String },
    #[error("the bundle is for the {found} architecture; this box is {ARCHITECTURE}")]
    Architecture { found: String },
    #[error(
        "release {offered} is older than the running {running}: a box never goes back to an older release by an update"
    )]
    Downgrade { offered: Version, running: Version },
    #[error("release {0} is already running")]
    Same(Version),
    #[error("the {what} is {needed} bytes, more than the {available} bytes its place on this box holds")]
    Space { what: &'static str, needed: u64, available: u64 },
    #[error("the kernel image {file} does not carry {what} its manifest names: the bundle was put together wrongly")]
    Kernel { file: String, what: &'static str },
    #[error(
        "release {offered} changes the store so that only schema {needs} and newer read it, but the running release reads up to schema {running}: a fallback could not run on it; install the release in between first"
    )]
    Store { offered: Version, needs: u32, running: u32 },
}

impl BundleError {
    /// The reason as a code the admin chat says in the box's language (see [`news`]).
    pub fn code(&self) -> &'static str {
        match self {
            BundleError::Missing(_)
            | BundleError::Unreadable { .. }
            | BundleError::SumsLine { .. }
            | BundleError::Name(_)
            | BundleError::NotListed(_)
            | BundleError::Manifest(_)
            | BundleError::Kernel { .. } => "malformed",
            BundleError::Unsigned => "unsigned",
            BundleError::Signature(_) => "signature",
            BundleError::Untrusted { .. } => "untrusted",
            BundleError::Digest { .. } => "digest",
            BundleError::Product { .. } | BundleError::Architecture { .. } => "product",
            BundleError::Downgrade { .. } => "downgrade",
            BundleError::Same(_) => "same",
            BundleError::Space { .. } => "space",
            BundleError::Store { .. } => "schema",
        }
    }
}

/// A reason code in the box's language, for the admin chat; None for a code this release does
/// not know (the journal line is said instead).
fn reason(code: &str) -> Option<std::borrow::Cow<'static, str>> {
    Some(match code {
        "malformed" => t!("update.why_malformed"),
        "unsigned" => t!("update.why_unsigned"),
        "signature" => t!("update.why_signature"),
        "untrusted" => t!("update.why_untrusted"),
        "digest" => t!("update.why_digest"),
        "product" => t!("update.why_product"),
        "downgrade" => t!("update.why_downgrade"),
        "same" => t!("update.why_same"),
        "space" => t!("update.why_space"),
        "schema" => t!("update.why_schema"),
        "stick" => t!("update.why_stick"),
        "trial" => t!("update.why_trial"),
        "write" => t!("update.why_write"),
        "network" => t!("update.why_network"),
        "no_source" => t!("update.why_no_source"),
        "no_previous" => t!("update.why_no_previous"),
        "not_ready" => t!("update.why_not_ready"),
        "agent_failed" => t!("update.why_agent_failed"),
        "no_status" => t!("update.why_no_status"),
        "hang" => t!("update.why_hang"),
        "restarts" => t!("update.why_restarts"),
        "was_bad" => t!("update.why_was_bad"),
        "no_snapshot" => t!("update.why_no_snapshot"),
        "no_boot" => t!("update.why_no_boot"),
        "secure_boot" => t!("update.why_secure_boot"),
        _ => return None,
    })
}

/// One event of the update journal in the box's language, for the admin chat: the reason said
/// in that language, the journal's line after it as the detail.
pub fn news(e: &boot::Event) -> String {
    let v = e.version.as_str();
    let why = match (reason(&e.code), e.why.is_empty()) {
        (Some(said), true) => said.into_owned(),
        (Some(said), false) => t!("update.why_with_detail", reason = said, detail = e.why.as_str()).into_owned(),
        (None, _) => e.why.clone(),
    };
    let why = why.as_str();
    match e.what.as_str() {
        "available" => t!("update.news_available", version = v),
        "stick" => t!("update.news_stick", version = v),
        "installed" => t!("update.news_installed", version = v),
        "good" => t!("update.news_good", version = v),
        "bad" if e.code == "no_boot" => t!("update.news_no_boot", version = v, why = why),
        "bad" => t!("update.news_bad", version = v, why = why),
        "rollback" => t!("update.news_rollback", version = v, from = e.from.as_str()),
        "rollback_refused" => t!("update.news_rollback_refused", why = why),
        "uptodate" => t!("update.news_uptodate", version = v),
        "failed" => t!("update.news_failed", why = why),
        "waiting" => t!("update.news_waiting", version = v, why = why),
        _ => t!("update.news_refused", version = v, why = why),
    }
    .into_owned()
}

/// A release version: dot-separated numbers (`1.4.0`), compared number by number; no number
/// with a leading zero (`1.04` would name the same release as `1.4`), at most [`VERSION_MAX`]
/// characters (the slot's partition name holds it).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version(Vec<u64>);

impl std::str::FromStr for Version {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let number = |p: &str| {
            let plain = !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && (p == "0" || !p.starts_with('0'));
            if plain { p.parse::<u64>().ok() } else { None }
        };
        let parts: Option<Vec<u64>> = s.split('.').map(number).collect();
        match parts {
            Some(p) if (1..=4).contains(&p.len()) && s.len() <= VERSION_MAX => Ok(Version(p)),
            _ => Err(format!(
                "{s:?} is not a release version (up to four numbers separated by dots, like 1.4.0, no leading zeros, at most {VERSION_MAX} characters)"
            )),
        }
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self.0.iter().map(u64::to_string).collect();
        f.write_str(&parts.join("."))
    }
}

impl<'de> Deserialize<'de> for Version {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// A part written to a partition slot: its file in the bundle (zstd when it ends in `.zst`), and
/// the bytes and sha256 it fills in its slot once written (checked by reading the slot back).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Part {
    pub file: String,
    pub bytes: u64,
    pub sha256: String,
}

/// The manifest of a release bundle.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub product: String,
    pub version: Version,
    pub architecture: String,
    pub root: Part,
    pub verity: Part,
    /// The unified kernel image, copied to the ESP as it is.
    pub uki: String,
    /// The dm-verity root hash of `root`, as the kernel image's command line carries it.
    pub root_hash: String,
}

/// Where the parts go on this box, and how much each place holds.
#[derive(Debug, Clone, Copy)]
pub struct Room {
    pub root_slot: u64,
    pub verity_slot: u64,
    pub esp_free: u64,
}

/// A bundle that passed every check.
#[derive(Debug)]
pub struct Checked {
    pub dir: PathBuf,
    pub manifest: Manifest,
    /// The signer's public key (hex).
    pub signer: String,
    /// The signed `(sha256, file name)` pairs.
    pub listed: Vec<(String, String)>,
}

impl Checked {
    /// The signed sha256 of a file of the bundle.
    pub fn digest(&self, name: &str) -> Option<String> {
        self.listed.iter().find(|(_, n)| n == name).map(|(d, _)| d.clone())
    }
}

/// Verify `SHA256SUMS` against its signature and the vendor's key (hex); the signer and the
/// listed `(sha256, file name)` pairs.
pub fn signed_sums(
    sums: &[u8],
    signature: &[u8],
    vendor_key: &str,
) -> Result<(String, Vec<(String, String)>), BundleError> {
    let signature = String::from_utf8_lossy(signature);
    let signer = sign::verify_file(sums, &signature, Some(vendor_key), SIGNATURE).map_err(|e| match e {
        SignError::Untrusted { found, trusted } => BundleError::Untrusted { found, trusted },
        e => BundleError::Signature(e),
    })?;
    Ok((signer, parse_sums(&String::from_utf8_lossy(sums))?))
}

/// The manifest, checked against the signed sums (`listed`, from [`signed_sums`]) and parsed:
/// what a box reads before it fetches or copies the rest of a bundle.
pub fn signed_manifest(listed: &[(String, String)], manifest_bytes: &[u8]) -> Result<Manifest, BundleError> {
    let signed = listed.iter().find(|(_, n)| n == MANIFEST).map(|(d, _)| d.as_str());
    if signed != Some(crate::tools::sha256_hex(manifest_bytes).as_str()) {
        return Err(BundleError::Digest { file: MANIFEST.to_owned() });
    }
    toml::from_str(&String::from_utf8_lossy(manifest_bytes)).map_err(|e| BundleError::Manifest(e.message().to_owned()))
}

/// Check the bundle in `dir` against the vendor's public key (hex), the running release and the
/// room on this box. Nothing is written.
pub fn check(dir: &Path, vendor_key: &str, running: &Version, room: Room) -> Result<Checked, BundleError> {
    let read = |name: &str| -> Result<Vec<u8>, BundleError> {
        std::fs::read(dir.join(name)).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => BundleError::Missing(name.to_owned()),
            _ => BundleError::Unreadable { what: name.to_owned(), reason: e.to_string() },
        })
    };
    let sums = read(SUMS)?;
    let signature = match read(SIGNATURE) {
        Err(BundleError::Missing(_)) => return Err(BundleError::Unsigned),
        other => other?,
    };
    let (signer, listed) = signed_sums(&sums, &signature, vendor_key)?;
    let digest_of = |name: &str| listed.iter().find(|(_, n)| n == name).map(|(d, _)| d.as_str());
    let manifest_bytes = read(MANIFEST)?;
    let manifest_digest = digest_of(MANIFEST).ok_or_else(|| BundleError::NotListed(MANIFEST.to_owned()))?;
    if crate::tools::sha256_hex(&manifest_bytes) != manifest_digest {
        return Err(BundleError::Digest { file: MANIFEST.to_owned() });
    }
    let manifest: Manifest = toml::from_str(&String::from_utf8_lossy(&manifest_bytes))
        .map_err(|e| BundleError::Manifest(e.message().to_owned()))?;
    if manifest.product != PRODUCT {
        return Err(BundleError::Product { found: manifest.product });
    }
    if manifest.architecture != ARCHITECTURE {
        return Err(BundleError::Architecture { found: manifest.architecture });
    }
    let hex64 = |s: &str| s.len() == 64 && s.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f'));
    for (name, value) in [
        ("root_hash", &manifest.root_hash),
        ("root.sha256", &manifest.root.sha256),
        ("verity.sha256", &manifest.verity.sha256),
    ] {
        if !hex64(value) {
            return Err(BundleError::Manifest(format!("{name} is not a sha256 in lowercase hex")));
        }
    }
    match manifest.version.cmp(running) {
        std::cmp::Ordering::Less => {
            return Err(BundleError::Downgrade { offered: manifest.version, running: running.clone() });
        }
        std::cmp::Ordering::Equal => return Err(BundleError::Same(manifest.version)),
        std::cmp::Ordering::Greater => {}
    }
    for (what, needed, available) in [
        ("root file system", manifest.root.bytes, room.root_slot),
        ("verity data", manifest.verity.bytes, room.verity_slot),
    ] {
        if needed > available {
            return Err(BundleError::Space { what, needed, available });
        }
    }
    for name in [&manifest.root.file, &manifest.verity.file, &manifest.uki] {
        plain(name)?;
        let digest = digest_of(name).ok_or_else(|| BundleError::NotListed(name.clone()))?;
        let path = dir.join(name);
        let found = file_sha256(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => BundleError::Missing(name.clone()),
            _ => BundleError::Unreadable { what: name.clone(), reason: e.to_string() },
        })?;
        if found != digest {
            return Err(BundleError::Digest { file: name.clone() });
        }
    }
    // The kernel image must be the one for this root: its command line carries the root hash,
    // its os-release the version (a mix-up would boot a kernel that looks for another slot).
    let head = uki_head(&dir.join(&manifest.uki))
        .map_err(|e| BundleError::Unreadable { what: manifest.uki.clone(), reason: e.to_string() })?;
    if state::uki_root_hash(&head).as_deref() != Some(manifest.root_hash.as_str()) {
        return Err(BundleError::Kernel { file: manifest.uki.clone(), what: "the root hash" });
    }
    if uki_image_version(&head).as_deref() != Some(manifest.version.to_string().as_str()) {
        return Err(BundleError::Kernel { file: manifest.uki.clone(), what: "the version" });
    }
    // The release before must run on the store the new one leaves (docs/UPDATES.md): this
    // release is the one before.
    let needs = uki_os_release_number(&head, "ZHULI_STORE_OLDEST_READER")
        .ok_or_else(|| BundleError::Kernel { file: manifest.uki.clone(), what: "the store schema" })?;
    if needs > crate::store::SCHEMA_VERSION {
        return Err(BundleError::Store {
            offered: manifest.version.clone(),
            needs,
            running: crate::store::SCHEMA_VERSION,
        });
    }
    let uki = std::fs::metadata(dir.join(&manifest.uki)).map(|m| m.len()).unwrap_or_default();
    if uki > room.esp_free {
        return Err(BundleError::Space { what: "kernel image", needed: uki, available: room.esp_free });
    }
    Ok(Checked { dir: dir.to_owned(), manifest, signer, listed })
}

/// The first bytes of a kernel image: its os-release and command line sections come before the
/// kernel and the initrd.
pub(crate) fn uki_head(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut head = Vec::new();
    std::fs::File::open(path)?.take(4 << 20).read_to_end(&mut head)?;
    Ok(head)
}

/// `IMAGE_VERSION=` in a kernel image's os-release section.
pub(crate) fn uki_image_version(head: &[u8]) -> Option<String> {
    memchr::memmem::find_iter(head, b"\nIMAGE_VERSION=").find_map(|at| {
        let rest = &head[at + 15..];
        let end = rest.iter().position(|b| matches!(b, b'\n' | b'\0')).unwrap_or(rest.len());
        let v = String::from_utf8_lossy(&rest[..end]).trim_matches('"').to_owned();
        v.parse::<Version>().is_ok().then_some(v)
    })
}

/// A number in a kernel image's os-release section (`ZHULI_STORE_SCHEMA=4`).
pub(crate) fn uki_os_release_number(head: &[u8], name: &str) -> Option<u32> {
    let needle = format!("\n{name}=");
    memchr::memmem::find_iter(head, needle.as_bytes()).find_map(|at| {
        let rest = &head[at + needle.len()..];
        let end = rest.iter().position(|b| !b.is_ascii_digit()).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
    })
}

/// `SHA256SUMS` lines: (digest, file name). `sha256sum`'s text (`  `) and binary (` *`) forms.
fn parse_sums(text: &str) -> Result<Vec<(String, String)>, BundleError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let bad = || BundleError::SumsLine { line: i + 1 };
        let (digest, rest) = line.split_once(' ').ok_or_else(bad)?;
        let name = rest.strip_prefix(' ').or_else(|| rest.strip_prefix('*')).ok_or_else(bad)?;
        if digest.len() != 64 || !digest.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(bad());
        }
        plain(name)?;
        out.push((digest.to_ascii_lowercase(), name.to_owned()));
    }
    Ok(out)
}

/// A file name inside the bundle's folder, nothing that could lead out of it.
fn plain(name: &str) -> Result<(), BundleError> {
    let ok = !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\\', '\0']);
    if ok { Ok(()) } else { Err(BundleError::Name(name.to_owned())) }
}

/// The sha256 of a file, read in pieces.
fn file_sha256(path: &Path) -> std::io::Result<String> {
    crate::tools::sha256_of_read(&mut std::fs::File::open(path)?)
}

/// Write `SHA256SUMS` over every file in `dir` (sorted by name; not the sums and signature
/// themselves) and sign it with the vendor's private key file `key_text`: the release side.
pub fn seal_bundle(dir: &Path, key_text: &str) -> Result<(), BundleError> {
    let io = |what: &str| {
        let what = what.to_owned();
        move |e: std::io::Error| BundleError::Unreadable { what: what.clone(), reason: e.to_string() }
    };
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(io("the bundle folder"))?
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != SUMS && n != SIGNATURE)
        .collect();
    names.sort();
    let mut sums = String::new();
    for name in &names {
        plain(name)?;
        sums.push_str(&format!("{}  {name}\n", file_sha256(&dir.join(name)).map_err(io(name))?));
    }
    let signature =
        sign::sign_for(Role::Vendor, sums.as_bytes(), key_text, "the vendor key").map_err(BundleError::Signature)?;
    std::fs::write(dir.join(SUMS), &sums).map_err(io(SUMS))?;
    std::fs::write(dir.join(SIGNATURE), signature).map_err(io(SIGNATURE))?;
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    struct Bundle {
        dir: PathBuf,
        private: String,
        public: String,
    }

    impl Drop for Bundle {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    const ROOM: Room = Room { root_slot: 1 << 20, verity_slot: 1 << 16, esp_free: 1 << 20 };

    /// A stand-in for a unified kernel image: the sections the checks read, as ukify lays them.
    pub(crate) fn fake_uki(version: &str, root_hash: &str) -> Vec<u8> {
        fake_uki_reading_back_to(version, root_hash, crate::store::OLDEST_READER)
    }

    pub(crate) fn fake_uki_reading_back_to(version: &str, root_hash: &str, oldest: u32) -> Vec<u8> {
        format!(
            "MZ\0\0PE\0\0.osrel\0ID=debian\nIMAGE_ID=zhuli\nIMAGE_VERSION={version}\nZHULI_STORE_SCHEMA={}\nZHULI_STORE_OLDEST_READER={oldest}\n\0.cmdline\0roothash={root_hash} root=/dev/mapper/zhuli-root ro\0.linux\0kernel",
            oldest.max(crate::store::SCHEMA_VERSION)
        )
        .into_bytes()
    }

    fn manifest(version: &str, product: &str, root_bytes: u64) -> String {
        format!(
            "product = {product:?}\nversion = {version:?}\narchitecture = \"x86-64\"\nuki = \"zhuli_{version}.efi\"\n\
             root_hash = \"{}\"\n[root]\nfile = \"zhuli_{version}.root.raw\"\nbytes = {root_bytes}\nsha256 = \"{}\"\n\
             [verity]\nfile = \"zhuli_{version}.verity.raw\"\nbytes = 4096\nsha256 = \"{}\"\n",
            "ab".repeat(32),
            "cd".repeat(32),
            "ef".repeat(32)
        )
    }

    /// A signed bundle of release `version`.
    fn bundle(version: &str) -> Bundle {
        let dir = std::env::temp_dir().join(format!("zhuli-bundle-{}-{:x}", std::process::id(), rand::random::<u32>()));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join(MANIFEST), manifest(version, "zhuli", 65536)).expect("manifest");
        std::fs::write(dir.join(format!("zhuli_{version}.root.raw")), vec![7u8; 65536]).expect("root");
        std::fs::write(dir.join(format!("zhuli_{version}.verity.raw")), vec![9u8; 4096]).expect("verity");
        std::fs::write(dir.join(format!("zhuli_{version}.efi")), fake_uki(version, &"ab".repeat(32))).expect("uki");
        let (private, public) = sign::keygen_for(Role::Vendor);
        let public = sign::public_key_for(Role::Vendor, &public, "vendor.pub").expect("public key");
        seal_bundle(&dir, &private).expect("signed");
        Bundle { dir, private, public }
    }

    fn v(s: &str) -> Version {
        s.parse().expect("version")
    }

    #[test]
    fn a_signed_newer_bundle_passes_and_every_fault_is_refused() {
        let b = bundle("1.4.0");
        let ok = check(&b.dir, &b.public, &v("1.3.9"), ROOM).expect("a good bundle");
        assert_eq!(ok.manifest.version, v("1.4.0"));
        assert_eq!(ok.signer, b.public);

        // Versions: the same, older (numbers, not text: 1.10 is newer than 1.9).
        assert!(matches!(check(&b.dir, &b.public, &v("1.4.0"), ROOM), Err(BundleError::Same(_))));
        assert!(matches!(check(&b.dir, &b.public, &v("1.10"), ROOM), Err(BundleError::Downgrade { .. })));
        assert!(v("1.10") > v("1.9") && v("2") > v("1.99.99"));
        assert!("1.4.0-rc1".parse::<Version>().is_err() && "".parse::<Version>().is_err());
        // Leading zeros would give one release two names; a version too long for a partition name.
        assert!(
            "1.04".parse::<Version>().is_err() && "01".parse::<Version>().is_err() && "+1".parse::<Version>().is_err()
        );
        assert!("1.0.10".parse::<Version>().is_ok());
        assert!("1.999999999999999999.0".parse::<Version>().is_ok());
        assert!("1.9999999999999999999.0.1".parse::<Version>().is_err());

        // Another vendor's key.
        let (_, other) = sign::keygen_for(Role::Vendor);
        let other = sign::public_key_for(Role::Vendor, &other, "other.pub").expect("key");
        assert!(matches!(check(&b.dir, &other, &v("1.0"), ROOM), Err(BundleError::Untrusted { .. })));
        // An organisation key is not a vendor key.
        assert!(sign::sign_for(Role::Vendor, b"x", &sign::keygen().0, "org.key").is_err());

        // Room: a slot too small, an ESP too full.
        let small = Room { root_slot: 1000, ..ROOM };
        assert!(matches!(check(&b.dir, &b.public, &v("1.0"), small), Err(BundleError::Space { .. })));
        let full = Room { esp_free: 3, ..ROOM };
        assert!(matches!(check(&b.dir, &b.public, &v("1.0"), full), Err(BundleError::Space { .. })));

        // One byte of the root image changed.
        let root = b.dir.join("zhuli_1.4.0.root.raw");
        let mut bytes = std::fs::read(&root).expect("root");
        bytes[4000] ^= 1;
        std::fs::write(&root, &bytes).expect("tamper");
        let e = check(&b.dir, &b.public, &v("1.0"), ROOM).expect_err("tampered");
        assert!(matches!(&e, BundleError::Digest { file } if file == "zhuli_1.4.0.root.raw"), "{e}");
        bytes[4000] ^= 1;
        std::fs::write(&root, &bytes).expect("restore");

        // A kernel image of another root, or of another version, signed in the bundle.
        let no_schema = String::from_utf8(fake_uki("1.4.0", &"ab".repeat(32)))
            .expect("text")
            .replace("ZHULI_STORE_OLDEST_READER", "ZHULI_STORE_OLDEST");
        for (image, what) in [
            (fake_uki("1.4.0", &"99".repeat(32)), "the root hash"),
            (fake_uki("1.3.0", &"ab".repeat(32)), "the version"),
            (no_schema.into_bytes(), "the store schema"),
        ] {
            std::fs::write(b.dir.join("zhuli_1.4.0.efi"), image).expect("uki");
            seal_bundle(&b.dir, &b.private).expect("signed again");
            let e = check(&b.dir, &b.public, &v("1.0"), ROOM).expect_err("wrong kernel image");
            assert!(matches!(&e, BundleError::Kernel { what: w, .. } if *w == what), "{e}");
        }
        // A release whose store the running one could not read after a fallback: refused, the
        // release in between must come first.
        let ahead = fake_uki_reading_back_to("1.4.0", &"ab".repeat(32), crate::store::SCHEMA_VERSION + 1);
        std::fs::write(b.dir.join("zhuli_1.4.0.efi"), ahead).expect("uki");
        seal_bundle(&b.dir, &b.private).expect("signed again");
        let e = check(&b.dir, &b.public, &v("1.0"), ROOM).expect_err("too far ahead");
        assert!(matches!(&e, BundleError::Store { needs, .. } if *needs == crate::store::SCHEMA_VERSION + 1), "{e}");
        assert_eq!(e.code(), "schema");
        std::fs::write(b.dir.join("zhuli_1.4.0.efi"), fake_uki("1.4.0", &"ab".repeat(32))).expect("uki");
        seal_bundle(&b.dir, &b.private).expect("signed again");
        check(&b.dir, &b.public, &v("1.0"), ROOM).expect("good again");

        // The sums changed after signing; the signature removed.
        let sums = std::fs::read_to_string(b.dir.join(SUMS)).expect("sums");
        std::fs::write(b.dir.join(SUMS), sums.replacen('a', "b", 1)).expect("edit");
        assert!(matches!(check(&b.dir, &b.public, &v("1.0"), ROOM), Err(BundleError::Signature(SignError::Mismatch))));
        std::fs::write(b.dir.join(SUMS), &sums).expect("restore");
        std::fs::remove_file(b.dir.join(SIGNATURE)).expect("unsign");
        assert!(matches!(check(&b.dir, &b.public, &v("1.0"), ROOM), Err(BundleError::Unsigned)));
    }

    #[test]
    fn news_says_the_reason_in_the_box_s_language_with_the_line_as_detail() {
        let e = boot::Event {
            at_ms: 1,
            what: "refused".into(),
            version: "1.3.0".into(),
            why: "the bundle is not signed (SHA256SUMS.sig is missing)".into(),
            code: "unsigned".into(),
            from: String::new(),
        };
        crate::i18n::Language::ZhCn.apply();
        let said = news(&e);
        assert!(said.contains("1.3.0") && said.contains("更新包没有签名") && said.contains("SHA256SUMS.sig"), "{said}");
        // A code this release does not know: the line itself.
        let said = news(&boot::Event { code: "from_the_future".into(), ..e.clone() });
        assert!(said.contains("SHA256SUMS.sig is missing") && !said.contains("详情"), "{said}");
        let back = boot::Event { what: "rollback".into(), version: "1.1.0".into(), from: "1.2.0".into(), ..e.clone() };
        let said = news(&back);
        assert!(said.contains("1.2.0") && said.contains("1.1.0") && said.contains("回退"), "{said}");
        // A kernel image the firmware refused is not said to have failed a health check.
        let refused = boot::Event { what: "bad".into(), code: "no_boot".into(), why: String::new(), ..e };
        let said = news(&refused);
        assert!(said.contains("没能启动") && said.contains("安全启动") && !said.contains("健康检查"), "{said}");
    }

    #[test]
    fn a_bundle_for_something_else_is_refused_even_when_signed() {
        let b = bundle("2.0");
        std::fs::write(b.dir.join(MANIFEST), manifest("2.0", "otherbox", 65536)).expect("manifest");
        seal_bundle(&b.dir, &b.private).expect("signed again");
        assert!(matches!(check(&b.dir, &b.public, &v("1.0"), ROOM), Err(BundleError::Product { .. })));
        // A name leading out of the folder, signed: refused before anything is opened.
        std::fs::write(b.dir.join(MANIFEST), manifest("2.0", "zhuli", 65536)).expect("manifest");
        seal_bundle(&b.dir, &b.private).expect("signed again");
        let sums =
            std::fs::read_to_string(b.dir.join(SUMS)).expect("sums") + &format!("{}  ../etc/passwd\n", "0".repeat(64));
        std::fs::write(b.dir.join(SUMS), &sums).expect("sums");
        let sig = sign::sign_for(Role::Vendor, sums.as_bytes(), &b.private, "vendor.key").expect("sign");
        std::fs::write(b.dir.join(SIGNATURE), sig).expect("sig");
        assert!(matches!(check(&b.dir, &b.public, &v("1.0"), ROOM), Err(BundleError::Name(_))));
        // A part missing from the folder.
        seal_bundle(&b.dir, &b.private).expect("signed again");
        std::fs::remove_file(b.dir.join("zhuli_2.0.efi")).expect("remove");
        assert!(matches!(check(&b.dir, &b.public, &v("1.0"), ROOM), Err(BundleError::Missing(_))));
    }
}
