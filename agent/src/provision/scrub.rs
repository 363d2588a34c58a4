//! Removing an imported configuration's secrets from its stick, so that no byte sequence of any
//! of them remains anywhere on the device, even when the stick is pulled out half-way.
//!
//! Two steps, both idempotent: the secrets in `zhuli.toml` are overwritten with `*` where they
//! lie (same length, so no cluster is freed and the file stays readable TOML), then the whole
//! device is read and every other copy — free clusters left by an earlier write or a deleted
//! temporary file, a file's slack, another file — is overwritten with zeros
//! ([`stick::erase_everywhere`]).
//!
//! Before the stick is touched, the import records the work durably on the box: a *pending
//! scrub* (`scrub-pending/<volume id>.json`: the stick's volume id, the configuration as it
//! must end up, where its secrets were) and the byte patterns to erase, sealed like every other
//! credential (`<volume id>.cred`). A stick pulled out meanwhile is recognised at its next
//! insertion and the scrub is finished then; the record goes only when the scrub completed. The
//! import holds a lock on the record while it works, so the agent tells the admins only about
//! scrubs nobody is doing.
//!
//! Never logs or returns a secret: records hold the starred text only.

use std::{
    path::{Path, PathBuf},
    time::Instant,
};

use serde::{Deserialize, Serialize};

use super::{Credentials, FoundSecret, ProvisionError, stick};

/// The folder of pending scrubs under the provisioning root.
pub const PENDING: &str = "scrub-pending";
/// The credential name the sealed patterns are sealed under.
const PATTERNS_CREDENTIAL: &str = "zhuli-stick-secrets";
/// Secrets shorter than this are only starred in the file: a shorter byte string cannot be told
/// apart from other data on the stick (and no secret field accepts one).
pub const MIN_ERASE: usize = 6;

/// A scrub started and not known to be finished.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Pending {
    pub volume_id: u32,
    pub serial: u64,
    /// `zhuli.toml` as it must end up: the imported text with each secret's characters as `*`.
    pub starred: String,
    /// Byte ranges of `starred` that held secrets (outside them the stick's file is unchanged).
    pub spans: Vec<(usize, usize)>,
    /// When the import started it (UTC, for the notice).
    pub started: String,
}

impl Pending {
    /// Whether `on_stick` is `original` (the imported file) with its secrets as they were,
    /// starred, or anything between (a scrub interrupted while writing): each byte is the
    /// original's or the starred one's.
    pub fn matches(&self, on_stick: &[u8], original: &[u8]) -> bool {
        let want = self.starred.as_bytes();
        on_stick.len() == want.len()
            && original.len() == want.len()
            && on_stick.iter().zip(want).zip(original).all(|((b, s), o)| b == s || b == o)
    }

    fn file(root: &Path, volume_id: u32) -> PathBuf {
        root.join(PENDING).join(format!("{volume_id:08x}.json"))
    }
}

/// The text with each secret's characters replaced by `*` — where the setting holds it, and
/// anywhere else in the file it was written (a comment) — quotes and everything else kept; and
/// the byte ranges replaced.
pub(crate) fn starred(text: &str, secrets: &[FoundSecret]) -> (String, Vec<(usize, usize)>) {
    let mut out = text.as_bytes().to_vec();
    let mut spans: Vec<(usize, usize)> = secrets.iter().map(|s| inner(text, &s.span)).collect();
    for p in patterns(text, secrets) {
        let finder = memchr::memmem::Finder::new(p.as_bytes());
        spans.extend(finder.find_iter(text.as_bytes()).map(|at| (at, at + p.len())));
    }
    spans.sort_unstable();
    let mut merged: Vec<(usize, usize)> = Vec::new();
    for (start, end) in spans {
        match merged.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    let spans = merged;
    for &(start, end) in &spans {
        out[start..end].fill(b'*');
    }
    // Whole characters (between quotes, or a whole secret) were replaced by ASCII: still UTF-8.
    (String::from_utf8(out).unwrap_or_default(), spans)
}

/// The bytes between a TOML string's quotes.
fn inner(text: &str, span: &std::ops::Range<usize>) -> (usize, usize) {
    let raw = &text[span.clone()];
    let quote = ["\"\"\"", "'''", "\"", "'"].into_iter().find(|q| raw.starts_with(q) && raw.ends_with(q));
    match quote {
        Some(q) if raw.len() >= 2 * q.len() => (span.start + q.len(), span.end - q.len()),
        _ => (span.start, span.end),
    }
}

/// What to erase from the device: each secret as its value and, where escapes make it differ,
/// as written.
pub(crate) fn patterns(text: &str, secrets: &[FoundSecret]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for s in secrets {
        let (start, end) = inner(text, &s.span);
        for p in [s.value.as_str(), &text[start..end]] {
            if p.len() >= MIN_ERASE && !out.iter().any(|o| o == p) {
                out.push(p.to_owned());
            }
        }
    }
    out
}

/// How a scrub ended, for the receipt.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Complete { scanned: u64, erased: u64, seconds: f64 },
    Interrupted(String),
}

impl Outcome {
    pub fn receipt_line(&self) -> String {
        match self {
            Outcome::Complete { scanned, erased, seconds } => format!(
                "removed: the whole stick was checked ({} in {seconds:.1} s); {} other cop{} found and erased",
                size(*scanned),
                erased,
                if *erased == 1 { "y was" } else { "ies were" }
            ),
            Outcome::Interrupted(why) => {
                format!("NOT all removed ({why}); plug this stick into the box again and it finishes removing them")
            }
        }
    }

    pub fn complete(&self) -> bool {
        matches!(self, Outcome::Complete { .. })
    }
}

fn size(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
    } else {
        format!("{} MiB", bytes >> 20)
    }
}

/// What a record keeps sealed: what to erase, and the file as it was on the stick (to know
/// that stick again, and no other).
#[derive(Serialize, Deserialize)]
struct Sealed {
    patterns: Vec<String>,
    original: String,
}

impl Drop for Sealed {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        self.patterns.iter_mut().for_each(Zeroize::zeroize);
        self.original.zeroize();
    }
}

fn sealed_file(root: &Path, volume_id: u32) -> PathBuf {
    root.join(PENDING).join(format!("{volume_id:08x}.cred"))
}

fn open_sealed(root: &Path, volume_id: u32, credentials: Credentials) -> Option<Sealed> {
    let file = sealed_file(root, volume_id);
    let bytes = match credentials {
        Credentials::Plain => std::fs::read(&file).map(zeroize::Zeroizing::new).ok(),
        Credentials::Systemd => super::decrypt(PATTERNS_CREDENTIAL, &file),
    }?;
    serde_json::from_slice(&bytes).ok()
}

/// A pending scrub, locked for as long as it is held.
pub struct Held {
    pub pending: Pending,
    lock: std::fs::File,
}

/// Record a scrub before the stick is touched: the record and the sealed patterns, synced.
pub fn record(
    root: &Path,
    pending: &Pending,
    patterns: Vec<String>,
    original: &str,
    credentials: Credentials,
) -> Result<Held, ProvisionError> {
    let apply = |e: std::io::Error| ProvisionError::Apply(format!("cannot record the scrub of the stick: {e}"));
    let dir = root.join(PENDING);
    std::fs::create_dir_all(&dir).map_err(apply)?;
    // The agent (group zhuli) may see that a scrub is pending, never the patterns.
    super::set_mode(&dir, 0o750).map_err(apply)?;
    super::group_readable(&dir);
    let json = zeroize::Zeroizing::new(
        serde_json::to_string(&Sealed { patterns, original: original.to_owned() }).unwrap_or_default(),
    );
    let sealed = sealed_file(root, pending.volume_id);
    match credentials {
        Credentials::Plain => super::write_file(&sealed, json.as_bytes(), 0o600).map_err(apply)?,
        Credentials::Systemd => super::encrypt(PATTERNS_CREDENTIAL, &json, &sealed)?,
    }
    let file = Pending::file(root, pending.volume_id);
    let text = serde_json::to_string_pretty(pending).unwrap_or_default();
    super::write_file(&file, text.as_bytes(), 0o640).map_err(apply)?;
    super::group_readable(&file);
    super::sync_dir(&dir).map_err(apply)?;
    hold(&file, pending.clone()).map_err(apply)
}

fn hold(file: &Path, pending: Pending) -> std::io::Result<Held> {
    let lock = std::fs::File::open(file)?;
    lock.lock()?;
    Ok(Held { pending, lock })
}

/// Drop a record made for an import that did not happen after all.
pub fn forget(root: &Path, held: Held) {
    let volume = held.pending.volume_id;
    let _ = std::fs::remove_file(Pending::file(root, volume));
    let _ = std::fs::remove_file(sealed_file(root, volume));
    let _ = super::sync_dir(&root.join(PENDING));
}

/// The pending scrub of the stick with `volume_id` whose configuration file is `on_stick`. A
/// record of an import that never switched (the box stopped in between) is dropped: that
/// stick is imported again, not starred.
pub fn find(root: &Path, volume_id: u32, on_stick: &[u8], credentials: Credentials) -> Option<Held> {
    let file = Pending::file(root, volume_id);
    let pending: Pending = serde_json::from_str(&std::fs::read_to_string(&file).ok()?).ok()?;
    let held = hold(&file, pending).ok()?;
    if held.pending.serial > super::current_serial(root) {
        log::warn!(
            "provisioning: dropping the scrub record of serial {}, which was never switched to",
            held.pending.serial
        );
        forget(root, held);
        return None;
    }
    let sealed = open_sealed(root, volume_id, credentials)?;
    (held.pending.volume_id == volume_id && held.pending.matches(on_stick, sealed.original.as_bytes())).then_some(held)
}

/// Pending scrubs no import is working on now (the agent's notice to the admins).
pub fn unattended(root: &Path) -> Vec<Pending> {
    let Ok(entries) = std::fs::read_dir(root.join(PENDING)) else { return Vec::new() };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let path = e.path();
        if path.extension().is_none_or(|x| x != "json") {
            continue;
        }
        let Ok(f) = std::fs::File::open(&path) else { continue };
        // An import holding it is working on it right now.
        if f.try_lock_shared().is_err() {
            continue;
        }
        if let Some(p) = std::fs::read_to_string(&path).ok().and_then(|t| serde_json::from_str(&t).ok()) {
            out.push(p);
        }
    }
    out.sort_by_key(|p: &Pending| p.volume_id);
    out
}

/// Do the scrub (again): star the file, erase every other copy; the record goes when it is done.
/// `fault` is the test build's pulled-out switch.
pub fn run(
    root: &Path,
    device: &Path,
    held: Held,
    credentials: Credentials,
    fault: Option<u64>,
) -> Result<Outcome, ProvisionError> {
    let started = Instant::now();
    let volume = held.pending.volume_id;
    let sealed = open_sealed(root, volume, credentials).ok_or_else(|| {
        ProvisionError::Apply(format!(
            "the record of the secrets to remove from this stick ({}) cannot be opened",
            sealed_file(root, volume).display()
        ))
    })?;
    let interrupted = |e: stick::StickError| Ok(Outcome::Interrupted(e.to_string()));
    if let Err(e) = stick::overwrite_in_place(device, stick::CONFIG, held.pending.starred.as_bytes()) {
        return interrupted(e);
    }
    // Each as UTF-8, and as UTF-16 (a copy saved by an editor as "Unicode").
    let mut patterns: Vec<Vec<u8>> = Vec::new();
    for p in &sealed.patterns {
        patterns.push(p.as_bytes().to_vec());
        patterns.push(p.encode_utf16().flat_map(u16::to_le_bytes).collect());
        patterns.push(p.encode_utf16().flat_map(u16::to_be_bytes).collect());
    }
    let patterns = zeroize::Zeroizing::new(patterns);
    let mut last = Instant::now();
    let erased = stick::erase_everywhere(device, &patterns, |done, total| {
        if fault.is_some_and(|at| done >= at) {
            return Err(stick::StickError::Io("test fault: the stick was pulled out".into()));
        }
        if last.elapsed().as_secs() >= 5 {
            last = Instant::now();
            log::info!(
                "provisioning: removing secrets from the stick: {}% of {} checked",
                done * 100 / total.max(1),
                size(total)
            );
        }
        Ok(())
    });
    let erased = match erased {
        Ok(e) => e,
        Err(e) => return interrupted(e),
    };
    let file = Pending::file(root, volume);
    let gone = std::fs::remove_file(&file).and_then(|_| std::fs::remove_file(sealed_file(root, volume)));
    if let Err(e) = gone.and_then(|_| super::sync_dir(&root.join(PENDING))) {
        log::warn!("provisioning: the scrub finished but its record could not be removed: {e}");
    }
    drop(held.lock);
    Ok(Outcome::Complete { scanned: erased.scanned, erased: erased.found, seconds: started.elapsed().as_secs_f64() })
}

/// A test build's switch: `ZHULI_TEST_PULL=scrub` makes the stick "pulled out" half-way through
/// the erasure. Release builds have no such switch.
#[cfg(debug_assertions)]
pub fn pulled_at(device_size: u64) -> Option<u64> {
    std::env::var("ZHULI_TEST_PULL").ok().filter(|v| v == "scrub").map(|_| device_size / 2)
}

#[cfg(not(debug_assertions))]
pub fn pulled_at(_device_size: u64) -> Option<u64> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(text: &str, needle: &str) -> FoundSecret {
        let start = text.find(needle).expect("needle");
        FoundSecret {
            credential: "x".into(),
            field: "x".into(),
            value: needle.trim_matches(['"', '\'']).into(),
            span: start..start + needle.len(),
        }
    }

    #[test]
    fn starring_keeps_the_length_and_quotes_and_a_half_done_file_still_matches() {
        let text = "a = \"sk-live-1234\"\nb = 'pw-5678x'\n";
        let secrets = [found(text, "\"sk-live-1234\""), found(text, "'pw-5678x'")];
        let (s, spans) = starred(text, &secrets);
        assert_eq!(s, "a = \"************\"\nb = '********'\n");
        assert_eq!(s.len(), text.len());
        let pending = Pending { volume_id: 1, serial: 1, starred: s.clone(), spans, started: String::new() };
        let original = text.as_bytes();
        assert!(pending.matches(original, original), "the original");
        assert!(pending.matches(s.as_bytes(), original), "done");
        let half = format!("{}{}", &s[..10], &text[10..]);
        assert!(pending.matches(half.as_bytes(), original), "interrupted while writing");
        assert!(!pending.matches(text.replace("a =", "c =").as_bytes(), original), "another configuration");
        assert!(!pending.matches(format!("{text}\n").as_bytes(), original), "another length");
        let rotated = text.replace("sk-live-1234", "sk-live-9999");
        assert!(!pending.matches(rotated.as_bytes(), original), "the same file with other secrets of the same length");
    }

    #[test]
    fn patterns_are_the_values_and_their_written_form() {
        let text = "a = \"tab\\there-secret\"\nb = \"short\"\n";
        let secrets = [found(text, "\"tab\\there-secret\""), found(text, "\"short\"")];
        let mut secrets = secrets;
        secrets[0].value = "tab\there-secret".into();
        let p = patterns(text, &secrets);
        assert_eq!(p, ["tab\there-secret", "tab\\there-secret"], "short values are starred, not erased");
    }
}
