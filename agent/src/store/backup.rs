//! Backups: a consistent snapshot of the store, still sealed, with a manifest sealed under the
//! store key; verification that authenticates the manifest and every value; restore that
//! refuses a corrupt, foreign or edited snapshot, or another store's, and keeps the store it
//! replaces.
//!
//! Each snapshot is bound to the store it was taken from and to its place in that store's
//! series: the manifest (which holds the file's sha256) is sealed with the store id and the
//! backup's sequence number as associated data, so neither can be changed, nor a file or a
//! value moved from one snapshot into another, without the key. The sequence is counted in
//! `backup-seq` beside the store, not in the store: while the agent runs it is the store's
//! only writer, and backups are taken while it runs.
//!
//! The agent opens the store in redb's single-writer mode, so a backup reads a consistent
//! snapshot while the agent keeps running. A snapshot is only useful with the store key: keep
//! the key (the sealed credential and its recovery copy) apart from the backups.

use crate::clock::now_ms;
use std::{
    io::{Read, Write},
    path::{Path, PathBuf},
};

use redb::{ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::{
    CONVERSATIONS, HISTORY, Hashed, INBOX, JOBS, KEY_CHECK, META, OUTBOX, PROCESSED, PROCESSED_EXPIRY, SCHEMA_VERSION,
    SETTINGS, StoreError, UNDO, check_key, db_err, key::StoreKey, pair_key, read_meta, seal::Sealer, u64_key,
};

pub const MANIFEST: &str = "manifest.json";
pub const SNAPSHOT_FILE: &str = "zhuli.redb";
/// The backup counter, in the store's directory.
pub const COUNTER: &str = "backup-seq";
const FORMAT: &str = "zhuli-backup/2";
/// Snapshots written before manifests were sealed: verified, never restored.
const LEGACY_FORMAT: &str = "zhuli-backup/1";
/// The "table" manifests are sealed under: no store table has this name.
const MANIFEST_DOMAIN: &str = "backup manifest";

/// What a snapshot holds and where it comes from. Every field is covered by `seal`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    /// The id of the store the snapshot was taken from.
    pub store_id: String,
    /// The backup's number in that store's series: 1, 2, 3… in the order they were taken.
    pub seq: u64,
    pub created_at_ms: i64,
    pub zhuli_version: String,
    pub schema_version: u32,
    pub file: String,
    pub bytes: u64,
    pub sha256: String,
    /// Values in the snapshot (all sealed).
    pub values: u64,
    /// A fixed text sealed under the store key (hex): tells another key from an edit.
    pub key_check: String,
    /// Every field above, sealed under the store key with the format, store id and sequence as
    /// associated data (hex).
    pub seal: String,
}

/// The fields a manifest's seal covers.
#[derive(Serialize, Deserialize, PartialEq, Eq)]
struct Sealed<'a> {
    format: &'a str,
    store_id: &'a str,
    seq: u64,
    created_at_ms: i64,
    zhuli_version: &'a str,
    schema_version: u32,
    file: &'a str,
    bytes: u64,
    sha256: &'a str,
    values: u64,
}

impl Manifest {
    fn sealed_fields(&self) -> Sealed<'_> {
        Sealed {
            format: &self.format,
            store_id: &self.store_id,
            seq: self.seq,
            created_at_ms: self.created_at_ms,
            zhuli_version: &self.zhuli_version,
            schema_version: self.schema_version,
            file: &self.file,
            bytes: self.bytes,
            sha256: &self.sha256,
            values: self.values,
        }
    }

    fn seal(&mut self, sealer: &Sealer) {
        let plain = postcard::to_allocvec(&self.sealed_fields()).expect("the manifest serialises");
        self.key_check = hex(&sealer.seal(MANIFEST_DOMAIN, b"key_check", KEY_CHECK));
        self.seal = hex(&sealer.seal(MANIFEST_DOMAIN, &bound_to(&self.format, &self.store_id, self.seq), &plain));
    }

    /// Whether the seal opens under `sealer` with this manifest's binding and covers exactly
    /// its fields.
    fn authentic(&self, sealer: &Sealer) -> bool {
        let Some(sealed) = unhex(&self.seal) else { return false };
        let Ok(plain) = sealer.open(MANIFEST_DOMAIN, &bound_to(&self.format, &self.store_id, self.seq), &sealed) else {
            return false;
        };
        postcard::from_bytes::<Sealed<'_>>(&plain).is_ok_and(|s| s == self.sealed_fields())
    }

    fn key_fits(&self, sealer: &Sealer) -> bool {
        unhex(&self.key_check)
            .and_then(|k| sealer.open(MANIFEST_DOMAIN, b"key_check", &k).ok())
            .is_some_and(|p| p == KEY_CHECK)
    }
}

/// The associated data of a manifest's seal: what it is, whose, and which.
fn bound_to(format: &str, store_id: &str, seq: u64) -> Vec<u8> {
    format!("{format}\0{store_id}\0{seq}").into_bytes()
}

/// A snapshot that passed [`verify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verified {
    /// Bound to its store and sequence; may be restored.
    Bound(Manifest),
    /// Written before manifests were sealed: its file matches its checksum and every value
    /// authenticates, but nothing binds it to a store, a time or a place in a series.
    Legacy { bytes: u64, sha256: String, values: u64, schema_version: u32 },
}

/// The file a manifest names and its size and checksum (all that is read of format 1).
#[derive(Deserialize)]
struct FileSum {
    file: String,
    bytes: u64,
    sha256: String,
}

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0} is not a zhuli snapshot: it has no readable {MANIFEST}")]
    NoManifest(PathBuf),
    #[error("{path} is not a zhuli snapshot manifest: {reason}")]
    BadManifest { path: PathBuf, reason: String },
    #[error("snapshot {0} is corrupt: its file does not match the checksum in the manifest; use another snapshot")]
    Checksum(PathBuf),
    #[error(
        "snapshot {0} is foreign: it does not open with this box's store key (another box's snapshot, or one taken before a rekey)"
    )]
    Foreign(PathBuf),
    #[error(
        "snapshot {0}'s manifest does not authenticate under this box's store key: its store, sequence, time or checksum was edited; do not use it, use another snapshot"
    )]
    Unauthentic(PathBuf),
    #[error(
        "snapshot {path} names store {claimed} in its manifest, but its file is store {found}'s: it was assembled from two snapshots; use another snapshot"
    )]
    Mismatch { path: PathBuf, claimed: String, found: String },
    #[error(
        "snapshot {snapshot} is of another store ({theirs}) than {store} ({ours}); nothing was changed. To restore another store's snapshot, stop the agent and move the live store away first (mv {store} {store}.moved), then restore again"
    )]
    OtherStore { snapshot: PathBuf, theirs: String, store: PathBuf, ours: String },
    #[error(
        "snapshot {0} is in the old format {LEGACY_FORMAT}: its manifest is not authenticated and binds it to no store or sequence, so it is not restored. `zhuli backup --verify` still checks its values; to use it anyway, stop the agent and copy its {SNAPSHOT_FILE} over the store by hand"
    )]
    Legacy(PathBuf),
    #[error(
        "{0} has no store id yet (an old schema): start the agent once so it upgrades the store, then take the backup"
    )]
    NoStoreId(PathBuf),
    #[error("{path} is not zhuli's backup counter: {reason}; move it away (numbering then starts again at 1)")]
    BadCounter { path: PathBuf, reason: String },
    #[error("snapshot {path} is corrupt: a value in table {table:?} fails authentication")]
    Tampered { path: PathBuf, table: &'static str },
    #[error("the agent is running and has the store open; stop it first (systemctl stop zhuli), then restore")]
    AgentRunning,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BackupError + '_ {
    move |source| BackupError::Io { path: path.to_owned(), source }
}

fn sha256_file(path: &Path) -> Result<(u64, String), BackupError> {
    let mut f = std::fs::File::open(path).map_err(io(path))?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
        total += n as u64;
    }
    Ok((total, hex(ctx.finish().as_ref())))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || !text.is_ascii() {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok()).collect()
}

/// The directory a file is in (`.` for a bare file name).
fn dir_of(file: &Path) -> &Path {
    file.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

fn sync_dir(dir: &Path) -> Result<(), BackupError> {
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

fn copy_table<K: redb::Key + 'static, V: redb::Value + 'static>(
    src: &redb::ReadTransaction,
    dst: &redb::WriteTransaction,
    def: TableDefinition<K, V>,
) -> Result<u64, redb::Error> {
    let s = match src.open_table(def) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(0),
        Err(e) => return Err(e.into()),
    };
    let mut d = dst.open_table(def)?;
    let mut n = 0;
    for row in s.iter()? {
        let (k, v) = row?;
        d.insert(k.value(), v.value())?;
        n += 1;
    }
    Ok(n)
}

/// Authenticate every sealed value of an open snapshot; returns how many there are.
fn authenticate(txn: &redb::ReadTransaction, sealer: &Sealer, path: &Path) -> Result<u64, BackupError> {
    let db = |e: redb::Error| BackupError::Store(db_err(path, e));
    let mut n = 0u64;
    let mut check = |table: &'static str, aad: &[u8], v: &[u8]| -> Result<(), BackupError> {
        n += 1;
        sealer.open(table, aad, v).map(drop).map_err(|_| BackupError::Tampered { path: path.to_owned(), table })
    };
    macro_rules! each {
        ($def:expr, $name:literal, |$k:ident| $aad:expr) => {{
            // A table a snapshot's schema did not have yet holds nothing.
            match txn.open_table($def) {
                Ok(t) => {
                    for row in t.iter().map_err(|e| db(e.into()))? {
                        let (k, v) = row.map_err(|e| db(e.into()))?;
                        let $k = k.value();
                        let aad: Vec<u8> = $aad;
                        check($name, &aad, v.value())?;
                    }
                }
                Err(redb::TableError::TableDoesNotExist(_)) => {}
                Err(e) => return Err(db(e.into())),
            }
        }};
    }
    each!(META, "meta", |k| k.as_bytes().to_vec());
    each!(PROCESSED, "processed", |k| {
        let h: Hashed = k;
        h.to_vec()
    });
    each!(INBOX, "inbox", |k| u64_key(k).to_vec());
    each!(OUTBOX, "outbox", |k| u64_key(k).to_vec());
    each!(HISTORY, "history", |k| pair_key(&k.0, k.1).to_vec());
    each!(CONVERSATIONS, "conversations", |k| {
        let h: Hashed = k;
        h.to_vec()
    });
    each!(SETTINGS, "settings", |k| k.as_bytes().to_vec());
    each!(UNDO, "undo", |k| u64_key(k).to_vec());
    each!(JOBS, "jobs", |k| u64_key(k).to_vec());
    Ok(n)
}

/// A store file opened without writing to it, checked against the key.
struct Checked {
    db: super::ReadView,
    version: u32,
    /// The oldest schema that reads it.
    oldest: u32,
    store_id: Option<String>,
}

/// Open a store file without writing to it and check it belongs to `key`.
fn open_checked(file: &Path, key: &StoreKey) -> Result<Checked, BackupError> {
    let sealer = Sealer::new(key);
    let db = super::open_unwritten(file)?;
    let (version, oldest, store_id) = {
        let txn = db.begin_read().map_err(|e| BackupError::Store(db_err(file, e)))?;
        let meta = txn.open_table(META).map_err(|e| BackupError::Store(db_err(file, e)))?;
        match check_key(file, &sealer, &meta) {
            Ok(()) => {}
            Err(StoreError::WrongKey(_)) => return Err(BackupError::Foreign(file.to_owned())),
            Err(e) => return Err(e.into()),
        }
        let raw = read_meta(file, &sealer, &meta, "schema_version")?;
        let version = u32::from_be_bytes(raw.try_into().map_err(|_| super::decode(file, "meta"))?);
        let oldest = super::oldest_reader(file, &sealer, &meta, version)?;
        let id = match meta.get("store_id").map_err(|e| BackupError::Store(db_err(file, e)))? {
            None => None,
            Some(_) => {
                let raw = read_meta(file, &sealer, &meta, "store_id")?;
                Some(String::from_utf8(raw).map_err(|_| super::decode(file, "meta"))?)
            }
        };
        (version, oldest, id)
    };
    Ok(Checked { db, version, oldest, store_id })
}

/// The backup counter as kept in [`COUNTER`].
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Counter {
    store_id: String,
    seq: u64,
}

/// Take the next backup number of store `store_id`, durably, before the snapshot is written:
/// a crash can skip a number, never hand one out twice. Concurrent backups are serialised by a
/// lock on the directory. The counter belongs to one store; another store's starts again at 1.
fn next_seq(dir: &Path, store_id: &str) -> Result<u64, BackupError> {
    counted(dir, store_id, |last| last.checked_add(1).ok_or_else(|| "it is at the largest number".to_owned()))
}

/// Set the backup counter of store `store_id` in `dir` to what `next` makes of its last number
/// (0 when none), durably, under the directory's lock; the number set.
fn counted(dir: &Path, store_id: &str, next: impl FnOnce(u64) -> Result<u64, String>) -> Result<u64, BackupError> {
    let lock = std::fs::File::open(dir).map_err(io(dir))?;
    lock.lock().map_err(io(dir))?;
    let path = dir.join(COUNTER);
    let last = match std::fs::read_to_string(&path) {
        Ok(text) => {
            let c: Counter = serde_json::from_str(&text)
                .map_err(|e| BackupError::BadCounter { path: path.clone(), reason: e.to_string() })?;
            if c.store_id == store_id { c.seq } else { 0 }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(BackupError::Io { path, source: e }),
    };
    let seq = next(last).map_err(|reason| BackupError::BadCounter { path: path.clone(), reason })?;
    let part = dir.join(format!("{COUNTER}.part"));
    let text = serde_json::to_string(&Counter { store_id: store_id.to_owned(), seq }).expect("the counter serialises");
    std::fs::write(&part, text).map_err(io(&part))?;
    std::fs::File::open(&part).and_then(|f| f.sync_all()).map_err(io(&part))?;
    std::fs::rename(&part, &path).map_err(io(&path))?;
    sync_dir(dir)?;
    Ok(seq)
}

/// The start of a snapshot folder's name: `zhuli-snapshot-<ms>-<seq>`.
pub const SNAPSHOT_PREFIX: &str = "zhuli-snapshot-";

/// The backup sequence number and time of a snapshot folder's name (`zhuli-snapshot-<ms>-<seq>`,
/// and nothing else: names read from a server or a stick are joined onto local paths). Snapshots
/// are ordered by it, the sequence first: the clock that named them may have been wrong. (A
/// restore carries the sequence on: a replacement box continues the dead one's numbers.)
pub fn snapshot_order(name: &str) -> Option<(u64, u64)> {
    let rest = name.strip_prefix(SNAPSHOT_PREFIX)?;
    let (ms, seq) = rest.split_once('-')?;
    let digits = |s: &str| !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit());
    (digits(ms) && digits(seq)).then(|| Some((seq.parse().ok()?, ms.parse().ok()?)))?
}

/// Write a snapshot of the store at `store_file` into a new directory under `to`.
pub fn backup(store_file: &Path, key: &StoreKey, to: &Path) -> Result<(PathBuf, Manifest), BackupError> {
    let src = open_checked(store_file, key)?;
    let store_id = src.store_id.clone().ok_or_else(|| BackupError::NoStoreId(store_file.to_owned()))?;
    let seq = next_seq(dir_of(store_file), &store_id)?;
    let created_at_ms = now_ms();
    std::fs::create_dir_all(to).map_err(io(to))?;
    let dir = to.join(format!("{SNAPSHOT_PREFIX}{created_at_ms}-{seq}"));
    std::fs::create_dir(&dir).map_err(io(&dir))?;
    let part = dir.join(format!("{SNAPSHOT_FILE}.part"));
    let values = {
        let rtxn = src.db.begin_read().map_err(|e| BackupError::Store(db_err(store_file, e)))?;
        let dst = redb::Database::create(&part).map_err(|e| BackupError::Store(db_err(&part, e)))?;
        let wtxn = dst.begin_write().map_err(|e| BackupError::Store(db_err(&part, e)))?;
        let copied = (|| -> Result<u64, redb::Error> {
            Ok(copy_table(&rtxn, &wtxn, META)?
                + copy_table(&rtxn, &wtxn, PROCESSED)?
                + copy_table(&rtxn, &wtxn, PROCESSED_EXPIRY)?
                + copy_table(&rtxn, &wtxn, INBOX)?
                + copy_table(&rtxn, &wtxn, OUTBOX)?
                + copy_table(&rtxn, &wtxn, HISTORY)?
                + copy_table(&rtxn, &wtxn, CONVERSATIONS)?
                + copy_table(&rtxn, &wtxn, SETTINGS)?
                + copy_table(&rtxn, &wtxn, UNDO)?
                + copy_table(&rtxn, &wtxn, JOBS)?)
        })()
        .map_err(|e| BackupError::Store(db_err(&part, e)))?;
        wtxn.commit().map_err(|e| BackupError::Store(db_err(&part, e)))?;
        copied
    };
    std::fs::File::open(&part).and_then(|f| f.sync_all()).map_err(io(&part))?;
    let file = dir.join(SNAPSHOT_FILE);
    std::fs::rename(&part, &file).map_err(io(&file))?;
    let (bytes, sha256) = sha256_file(&file)?;
    let mut manifest = Manifest {
        format: FORMAT.into(),
        store_id,
        seq,
        created_at_ms,
        zhuli_version: env!("CARGO_PKG_VERSION").into(),
        schema_version: src.version,
        file: SNAPSHOT_FILE.into(),
        bytes,
        sha256,
        values,
        key_check: String::new(),
        seal: String::new(),
    };
    manifest.seal(&Sealer::new(key));
    // Written beside and renamed: a snapshot with a manifest is whole, after any crash.
    let mpath = dir.join(MANIFEST);
    let mpart = dir.join(format!("{MANIFEST}.part"));
    let mut f = std::fs::File::create(&mpart).map_err(io(&mpart))?;
    f.write_all(serde_json::to_string_pretty(&manifest).expect("the manifest serialises").as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(io(&mpart))?;
    std::fs::rename(&mpart, &mpath).map_err(io(&mpath))?;
    sync_dir(&dir)?;
    Ok((dir, manifest))
}

/// Check a snapshot: the manifest's seal (store, sequence, time, checksum), size and checksum,
/// key, schema, the file's store id, and every sealed value. A snapshot of the old format is
/// checked as far as it can be and reported as [`Verified::Legacy`].
pub fn verify(snapshot: &Path, key: &StoreKey) -> Result<Verified, BackupError> {
    let mpath = snapshot.join(MANIFEST);
    let text = std::fs::read_to_string(&mpath).map_err(|_| BackupError::NoManifest(snapshot.to_owned()))?;
    let bad = |reason: String| BackupError::BadManifest { path: mpath.clone(), reason };
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let sealer = Sealer::new(key);
    // What the file must be: from a manifest that authenticates, or (old format) one that
    // cannot.
    let (manifest, expected) = match value.get("format").and_then(|f| f.as_str()) {
        Some(FORMAT) => {
            let m: Manifest = serde_json::from_value(value).map_err(|e| bad(e.to_string()))?;
            if !m.key_fits(&sealer) {
                return Err(BackupError::Foreign(snapshot.to_owned()));
            }
            if !m.authentic(&sealer) {
                return Err(BackupError::Unauthentic(snapshot.to_owned()));
            }
            let expected = FileSum { file: m.file.clone(), bytes: m.bytes, sha256: m.sha256.clone() };
            (Some(m), expected)
        }
        Some(LEGACY_FORMAT) => (None, serde_json::from_value(value).map_err(|e| bad(e.to_string()))?),
        other => return Err(bad(format!("format {other:?}, expected {FORMAT:?}"))),
    };
    if expected.file.contains('/') || expected.file.contains("..") {
        return Err(bad("the file name leaves the snapshot directory".into()));
    }
    let file = snapshot.join(&expected.file);
    let (bytes, sha256) = sha256_file(&file)?;
    if bytes != expected.bytes || sha256 != expected.sha256 {
        return Err(BackupError::Checksum(snapshot.to_owned()));
    }
    let checked = open_checked(&file, key)?;
    if !super::readable(SCHEMA_VERSION, checked.version, checked.oldest) {
        return Err(StoreError::Newer { path: file, found: checked.version }.into());
    }
    if let Some(m) = &manifest {
        // The checksum already covers the file; its own sealed id must agree all the same.
        let found = checked.store_id.clone().unwrap_or_default();
        if found != m.store_id {
            return Err(BackupError::Mismatch { path: snapshot.to_owned(), claimed: m.store_id.clone(), found });
        }
    }
    let txn = checked.db.begin_read().map_err(|e| BackupError::Store(db_err(&file, e)))?;
    let values = authenticate(&txn, &sealer, snapshot)?;
    Ok(match manifest {
        Some(m) => Verified::Bound(m),
        None => Verified::Legacy { bytes, sha256, values, schema_version: checked.version },
    })
}

/// Replace the store at `store_file` with a verified snapshot of the same store. The replaced
/// file is kept beside it (returned) until the operator deletes it. The agent must be stopped.
pub fn restore(snapshot: &Path, store_file: &Path, key: &StoreKey) -> Result<(Manifest, Option<PathBuf>), BackupError> {
    let manifest = match verify(snapshot, key)? {
        Verified::Bound(m) => m,
        Verified::Legacy { .. } => return Err(BackupError::Legacy(snapshot.to_owned())),
    };
    if std::fs::metadata(store_file).is_ok_and(|m| m.len() > 0) {
        // Opened as the single writer (so a running agent is found) over an overlay (so nothing
        // is written). Any other failure is fine: a damaged live store is what a restore is for.
        match super::overlay::open(store_file, &super::builder()) {
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => return Err(BackupError::AgentRunning),
            Ok(db) => {
                if let Some(ours) = live_store_id(&db, store_file, key)
                    && ours != manifest.store_id
                {
                    return Err(BackupError::OtherStore {
                        snapshot: snapshot.to_owned(),
                        theirs: manifest.store_id,
                        store: store_file.to_owned(),
                        ours,
                    });
                }
            }
            Err(_) => {}
        }
    }
    let dir = dir_of(store_file);
    let part = store_file.with_extension("redb.restore-part");
    std::fs::copy(snapshot.join(&manifest.file), &part).map_err(io(&part))?;
    std::fs::File::open(&part).and_then(|f| f.sync_all()).map_err(io(&part))?;
    // What was copied is what was verified, even if the snapshot changed in between.
    if sha256_file(&part)? != (manifest.bytes, manifest.sha256.clone()) {
        let _ = std::fs::remove_file(&part);
        return Err(BackupError::Checksum(snapshot.to_owned()));
    }
    // The restored store's next snapshot follows this one's number (on a replacement box too),
    // so that snapshots keep their order wherever they are kept. Before the switch: nothing can
    // fail once the store is replaced.
    if let Err(e) = counted(dir, &manifest.store_id, |last| Ok(last.max(manifest.seq))) {
        let _ = std::fs::remove_file(&part);
        return Err(e);
    }
    let kept = if store_file.exists() {
        let kept = store_file.with_extension(format!("redb.pre-restore-{}", now_ms()));
        std::fs::hard_link(store_file, &kept).map_err(io(&kept))?;
        Some(kept)
    } else {
        None
    };
    std::fs::rename(&part, store_file).map_err(io(store_file))?;
    sync_dir(dir)?;
    Ok((manifest, kept))
}

/// The record counts of the store file at `file` (a restored copy), opened without writing and
/// checked against `key`.
pub fn counts_of(file: &Path, key: &StoreKey) -> Result<super::Counts, BackupError> {
    let checked = open_checked(file, key)?;
    let txn = checked.db.begin_read().map_err(|e| BackupError::Store(db_err(file, e)))?;
    super::counts_in(&txn).map_err(|e| BackupError::Store(db_err(file, e)))
}

/// The setting the nightly backup keeps its [`State`] in.
pub const STATE: &str = "backup.state";

/// What one target of the nightly backup last did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    /// When its last good copy was made.
    pub ok_ms: Option<i64>,
    /// Why the last attempt failed, while it fails.
    pub failing: Option<String>,
    /// The admins were told of this failure.
    pub told: bool,
}

/// The last restore drill: the newest off-site snapshot restored into a scratch folder and
/// opened.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drill {
    pub at_ms: i64,
    /// The snapshot restored.
    pub name: String,
    /// Why it failed; `None`: restored and opened.
    pub failed: Option<String>,
    /// What the restored copy held, and the live store at the drill.
    pub restored: super::Counts,
    pub live: super::Counts,
    /// A failure reached the admins.
    #[serde(default)]
    pub told: bool,
}

/// What the nightly backup last did, kept in the store's setting [`STATE`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// When the nightly backup last ran (or, before the first, when the agent first started).
    pub last_run_ms: Option<i64>,
    pub local: Target,
    pub offsite: Target,
    #[serde(default)]
    pub drill: Option<Drill>,
    /// When tonight's copies started, until they end: still set at a start, they were cut short
    /// (a restart, an update, a power cut).
    #[serde(default)]
    pub running_ms: Option<i64>,
    /// Nights cut short in a row (one is taken again at once; a second is a failure).
    #[serde(default)]
    pub cut_short: u32,
}

/// The nightly backup's state as kept in `store`; an error when the store cannot be read (then
/// nothing should be written over what it holds).
pub fn state(store: &super::Store) -> Result<State, StoreError> {
    match store.setting(STATE)? {
        None => Ok(State::default()),
        // Said, then started afresh: a state no release can read must not stop the backups.
        Some(text) => Ok(serde_json::from_str(&text).unwrap_or_else(|e| {
            log::error!("the setting {STATE} does not read as the backup's state ({e}); starting it afresh");
            State::default()
        })),
    }
}

/// The id of the live store, if `key` opens it and it has one.
fn live_store_id(db: &redb::Database, path: &Path, key: &StoreKey) -> Option<String> {
    let txn = redb::ReadableDatabase::begin_read(db).ok()?;
    let meta = txn.open_table(META).ok()?;
    let sealer = Sealer::new(key);
    check_key(path, &sealer, &meta).ok()?;
    String::from_utf8(read_meta(path, &sealer, &meta, "store_id").ok()?).ok()
}

/// `[backup]`: the box's own copies of its store, by the 3-2-1 rule: one on the box
/// (`<state_dir>/backups`), one off the box on a WebDAV folder, one on the provisioning stick.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// When the nightly snapshot is taken, in the office's time (`HH:MM`).
    pub at: String,
    /// Snapshots kept on the box.
    pub keep: usize,
    /// The WebDAV folder for the off-site copy (Nextcloud:
    /// `https://HOST/remote.php/dav/files/USER/zhuli-backups`); unset: none.
    pub offsite: Option<String>,
    pub username: String,
    /// On the box a credential reference (`backup-password`).
    pub password: Option<crate::secret::Secret>,
    /// Snapshots kept off-site.
    pub offsite_keep: usize,
    pub timeout_ms: crate::dingtalk::settings::Millis,
    /// Days between restore drills of the newest off-site snapshot; 0: none.
    pub drill_days: u32,
    /// Snapshots kept on the provisioning stick (a copy is made at every insertion); 0: none
    /// made, none removed.
    pub stick_keep: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            at: "02:30".into(),
            keep: 7,
            offsite: None,
            username: String::new(),
            password: None,
            offsite_keep: 14,
            timeout_ms: crate::dingtalk::settings::Millis::from_ms(600_000),
            drill_days: 30,
            stick_keep: 2,
        }
    }
}
