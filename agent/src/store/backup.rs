//! Backups: a consistent snapshot of the store, still sealed, with a manifest of checksums;
//! verification that authenticates every value; restore that refuses a corrupt or foreign
//! snapshot and keeps the store it replaces.
//!
//! The agent opens the store in redb's single-writer mode, so a backup reads a consistent
//! snapshot while the agent keeps running. A snapshot is only useful with the store key: keep
//! the key (the sealed credential and its recovery copy) apart from the backups.

use std::{
    io::{Read, Write},
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use redb::{ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::{
    CONVERSATIONS, HISTORY, Hashed, INBOX, META, OUTBOX, PROCESSED, PROCESSED_EXPIRY, SCHEMA_VERSION, SETTINGS,
    StoreError, UNDO, check_key, db_err, key::StoreKey, pair_key, read_meta, seal::Sealer, u64_key,
};

pub const MANIFEST: &str = "manifest.json";
pub const SNAPSHOT_FILE: &str = "zhuli.redb";
const FORMAT: &str = "zhuli-backup/1";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Manifest {
    pub format: String,
    pub created_at_ms: i64,
    pub zhuli_version: String,
    pub schema_version: u32,
    pub file: String,
    pub bytes: u64,
    pub sha256: String,
    /// Values in the snapshot (all sealed).
    pub values: u64,
    /// The id of the store the snapshot was taken from (schema 2 and later).
    #[serde(default)]
    pub store_id: Option<String>,
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
    #[error("snapshot {path} is corrupt: a value in table {table:?} fails authentication")]
    Tampered { path: PathBuf, table: &'static str },
    #[error("the agent is running and has the store open; stop it first (systemctl stop zhuli), then restore")]
    AgentRunning,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BackupError + '_ {
    move |source| BackupError::Io { path: path.to_owned(), source }
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
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
    Ok((total, ctx.finish().as_ref().iter().map(|b| format!("{b:02x}")).collect()))
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
    Ok(n)
}

/// Open a store file without writing to it and check it belongs to `key`; the schema version
/// it has.
fn open_checked(file: &Path, key: &StoreKey) -> Result<(super::ReadView, u32, Option<String>), BackupError> {
    let sealer = Sealer::new(key);
    let db = super::open_unwritten(file)?;
    let (version, store_id) = {
        let txn = db.begin_read().map_err(|e| BackupError::Store(db_err(file, e)))?;
        let meta = txn.open_table(META).map_err(|e| BackupError::Store(db_err(file, e)))?;
        match check_key(file, &sealer, &meta) {
            Ok(()) => {}
            Err(StoreError::WrongKey(_)) => return Err(BackupError::Foreign(file.to_owned())),
            Err(e) => return Err(e.into()),
        }
        let raw = read_meta(file, &sealer, &meta, "schema_version")?;
        let version = u32::from_be_bytes(raw.try_into().map_err(|_| super::decode(file, "meta"))?);
        let id = read_meta(file, &sealer, &meta, "store_id").ok().and_then(|b| String::from_utf8(b).ok());
        (version, id)
    };
    Ok((db, version, store_id))
}

/// Write a snapshot of the store at `store_file` into a new directory under `to`.
pub fn backup(store_file: &Path, key: &StoreKey, to: &Path) -> Result<(PathBuf, Manifest), BackupError> {
    let (src, version, store_id) = open_checked(store_file, key)?;
    let dir = to.join(format!("zhuli-snapshot-{}", now_ms()));
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let part = dir.join(format!("{SNAPSHOT_FILE}.part"));
    let values = {
        let rtxn = src.begin_read().map_err(|e| BackupError::Store(db_err(store_file, e)))?;
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
                + copy_table(&rtxn, &wtxn, UNDO)?)
        })()
        .map_err(|e| BackupError::Store(db_err(&part, e)))?;
        wtxn.commit().map_err(|e| BackupError::Store(db_err(&part, e)))?;
        copied
    };
    std::fs::File::open(&part).and_then(|f| f.sync_all()).map_err(io(&part))?;
    let file = dir.join(SNAPSHOT_FILE);
    std::fs::rename(&part, &file).map_err(io(&file))?;
    let (bytes, sha256) = sha256_file(&file)?;
    let manifest = Manifest {
        format: FORMAT.into(),
        created_at_ms: now_ms(),
        zhuli_version: env!("CARGO_PKG_VERSION").into(),
        schema_version: version,
        file: SNAPSHOT_FILE.into(),
        bytes,
        sha256,
        values,
        store_id,
    };
    let mpath = dir.join(MANIFEST);
    let mut f = std::fs::File::create(&mpath).map_err(io(&mpath))?;
    f.write_all(serde_json::to_string_pretty(&manifest).expect("the manifest serialises").as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(io(&mpath))?;
    sync_dir(&dir)?;
    Ok((dir, manifest))
}

/// Check a snapshot: manifest, size and checksum, key, schema, and every sealed value.
pub fn verify(snapshot: &Path, key: &StoreKey) -> Result<Manifest, BackupError> {
    let mpath = snapshot.join(MANIFEST);
    let text = std::fs::read_to_string(&mpath).map_err(|_| BackupError::NoManifest(snapshot.to_owned()))?;
    let manifest: Manifest = serde_json::from_str(&text)
        .map_err(|e| BackupError::BadManifest { path: mpath.clone(), reason: e.to_string() })?;
    if manifest.format != FORMAT {
        return Err(BackupError::BadManifest {
            path: mpath,
            reason: format!("format {:?}, expected {FORMAT:?}", manifest.format),
        });
    }
    if manifest.file.contains('/') || manifest.file.contains("..") {
        return Err(BackupError::BadManifest {
            path: mpath,
            reason: "the file name leaves the snapshot directory".into(),
        });
    }
    let file = snapshot.join(&manifest.file);
    let (bytes, sha256) = sha256_file(&file)?;
    if bytes != manifest.bytes || sha256 != manifest.sha256 {
        return Err(BackupError::Checksum(snapshot.to_owned()));
    }
    let (db, version, _) = open_checked(&file, key)?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::Newer { path: file, found: version }.into());
    }
    let txn = db.begin_read().map_err(|e| BackupError::Store(db_err(&file, e)))?;
    authenticate(&txn, &Sealer::new(key), snapshot)?;
    Ok(manifest)
}

/// Replace the store at `store_file` with a verified snapshot. The replaced file is kept beside
/// it (returned) until the operator deletes it. The agent must be stopped.
pub fn restore(snapshot: &Path, store_file: &Path, key: &StoreKey) -> Result<Option<PathBuf>, BackupError> {
    let manifest = verify(snapshot, key)?;
    if store_file.exists() {
        // Any other failure is fine: a damaged live store is exactly what a restore is for.
        if let Err(redb::DatabaseError::DatabaseAlreadyOpen) = super::builder().open(store_file) {
            return Err(BackupError::AgentRunning);
        }
    }
    let dir = store_file.parent().unwrap_or(Path::new("."));
    let part = store_file.with_extension("redb.restore-part");
    std::fs::copy(snapshot.join(&manifest.file), &part).map_err(io(&part))?;
    std::fs::File::open(&part).and_then(|f| f.sync_all()).map_err(io(&part))?;
    let kept = if store_file.exists() {
        let kept = store_file.with_extension(format!("redb.pre-restore-{}", now_ms()));
        std::fs::hard_link(store_file, &kept).map_err(io(&kept))?;
        Some(kept)
    } else {
        None
    };
    std::fs::rename(&part, store_file).map_err(io(store_file))?;
    sync_dir(dir)?;
    Ok(kept)
}
