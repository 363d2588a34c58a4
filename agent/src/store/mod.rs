//! The local store: one redb file in the state directory, every value sealed (XChaCha20-Poly1305,
//! see `seal`), encoded with postcard. It holds the processed msgIds (dedupe), the inbox
//! (accepted, not yet answered), the outbox (reply ready, not yet delivered), conversation
//! history, settings and the undo journal.
//!
//! Identifiers that could say something about people (msgIds, conversation ids) are never redb
//! keys in the clear: they are replaced by a keyed hash whose secret lives sealed in the store.
//! The ids themselves are kept sealed beside them, so a rekey can replace that secret too.
//! A wrong key is detected before anything is written, also in a file left dirty by a crash
//! (checked on an in-memory repair, see `overlay`).
//!
//! Never logs values; errors name tables and files, not contents.

pub mod backup;
pub mod jobs;
pub mod key;
pub(crate) mod overlay;
pub mod seal;
pub mod writer;

use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::dingtalk::{message::RobotMessage, sender::Reply};
use key::StoreKey;
use seal::{SealError, Sealer};

/// The schema this build writes. Older files are migrated at open; newer ones are refused.
///
/// 1. meta (key check, index secret), processed + expiry, inbox, outbox, history,
///    settings, undo.
/// 2. meta gains `store_id`, a random id naming this store in backup manifests.
/// 3. outbox entries gain `card`.
/// 4. processed entries carry their msgId and history's conversation ids are kept in
///    `conversations` (both sealed), so a rekey can re-hash them under a new index secret.
/// 5. `jobs`: scheduled reminders and tasks, a table builds before it never open.
pub const SCHEMA_VERSION: u32 = 5;

/// The oldest schema whose builds can still run on a store this build wrote: what the release
/// before can do after a fallback. Each schema step says how far back it reads:
/// 2 (a new meta record) read back to 1; 3 (a new field in outbox entries) and 4 (a new index of
/// history) only to themselves; 5 (a new table) back to 4: a build of schema 4 runs on it and
/// leaves the jobs alone (they wait for a release that knows them).
///
/// The rule of releases (docs/UPDATES.md, "Schema and data"): a release may raise this at most to
/// the schema of the release before it, so that release still runs on the store after a
/// fallback. A change older builds cannot read waits one release: first a release that reads
/// both forms, then one that writes the new. An update is refused when the new release's
/// oldest reader is newer than the running release's schema (`update::check`).
pub const OLDEST_READER: u32 = 4;
const _: () = assert!(OLDEST_READER <= SCHEMA_VERSION, "a store is always read by the build that wrote it");

/// Can a build of schema `ours` run on a store of schema `found` whose oldest reader is
/// `oldest`? Older stores are migrated; newer ones only when they say this build still reads
/// them.
pub fn readable(ours: u32, found: u32, oldest: u32) -> bool {
    found <= ours || oldest <= ours
}

pub(crate) type Hashed = [u8; 16];

pub(crate) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
pub(crate) const PROCESSED: TableDefinition<Hashed, &[u8]> = TableDefinition::new("processed");
pub(crate) const PROCESSED_EXPIRY: TableDefinition<(u64, Hashed), ()> = TableDefinition::new("processed_expiry");
pub(crate) const INBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("inbox");
pub(crate) const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");
pub(crate) const HISTORY: TableDefinition<(Hashed, u64), &[u8]> = TableDefinition::new("history");
/// Keyed hash of a conversation id → the sealed id, for every conversation with history
/// (schema 4): what a rekey re-hashes history keys from.
pub(crate) const CONVERSATIONS: TableDefinition<Hashed, &[u8]> = TableDefinition::new("conversations");
pub(crate) const SETTINGS: TableDefinition<&str, &[u8]> = TableDefinition::new("settings");
pub(crate) const UNDO: TableDefinition<u64, &[u8]> = TableDefinition::new("undo");
/// Look-ups worth keeping for a while (the address book): keyed hash of the name → sealed
/// [`CacheEntry`]. Disposable: not in backups, emptied by a re-key and by permission changes.
pub(crate) const CACHE: TableDefinition<Hashed, &[u8]> = TableDefinition::new("cache");

/// Scheduled jobs (schema 5): id → sealed [`crate::schedule::Job`].
pub(crate) const JOBS: TableDefinition<u64, &[u8]> = TableDefinition::new("jobs");

pub(crate) const KEY_CHECK: &[u8] = b"zhuli store key check";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Key(#[from] key::KeyError),
    #[error(
        "the store key does not open {0}: it is the wrong key, or the file was tampered with; nothing was changed (restore the right key, or move the file away to start empty)"
    )]
    WrongKey(PathBuf),
    #[error(
        "{0} has no key check record, so no key can be checked against it: it was not written by zhuli, or was tampered with; nothing was changed (restore it from a backup, or move it away to start with an empty store)"
    )]
    NoKeyCheck(PathBuf),
    #[error(
        "{path} has store schema {found}, written by a newer release that changed it beyond what this one ({SCHEMA_VERSION}) reads; run a newer zhuli, or restore the snapshot taken before the update (zhuli restore)"
    )]
    Newer { path: PathBuf, found: u32 },
    #[error("store {path}: {reason}")]
    Db { path: PathBuf, reason: String },
    #[error("store {path}: {source}")]
    Sealed { path: PathBuf, source: SealError },
    #[error(
        "{0} exists but is not a zhuli store (empty, truncated or another program's file); restore it from a backup, or move it away to start with an empty store"
    )]
    NotAStore(PathBuf),
    #[error("store {path}: a value in table {table:?} does not decode; the store is corrupt")]
    Decode { path: PathBuf, table: &'static str },
}

/// What became of one message offered to [`Store::accept_batch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acceptance {
    /// New, durably in the inbox under this sequence number.
    Queued(u64),
    /// New, recorded as processed, nothing to answer (a group message without @).
    Recorded,
    /// Seen before: not to be answered again.
    Duplicate,
}

/// One change of the exactly-once bookkeeping; several go into one commit.
#[derive(Debug)]
pub enum WriteOp<'a> {
    /// Record incoming messages (processed msgId, and inbox entry when `bool` says answer).
    Accept { batch: &'a [(RobotMessage, bool)], now_ms: i64 },
    /// Move an inbox item to the outbox with its reply; the inbox items in `also` were answered
    /// by the same reply (messages answered together) and leave the inbox in the same commit.
    Stage { seq: u64, entry: &'a OutboxEntry, also: &'a [u64] },
    /// Forget a message whose reply was delivered: its outbox item, or its inbox item when the
    /// reply was sent without staging.
    Delivered(u64),
    /// Write job `id` as it is now, or remove it (`None`): with an `Accept` of what it fires in
    /// the same commit, an occurrence fires once. With `expected`, only if the job is still
    /// exactly that (a person may have cancelled or paused it meanwhile): otherwise nothing of
    /// the whole write is kept and the outcome is [`WriteOutcome::Stale`].
    Job { id: u64, job: Option<&'a crate::schedule::Job>, expected: Option<&'a crate::schedule::Job> },
}

#[derive(Debug)]
pub enum WriteOutcome {
    Accepted(Vec<Acceptance>),
    Done,
    /// A job was not as expected: nothing was written.
    Stale,
}

/// The value of a processed msgId: when it is forgotten, and the msgId itself so a rekey can
/// re-hash it. `None` for ids recorded before schema 4, which a rekey drops.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ProcessedEntry {
    pub expires_ms: u64,
    pub msg_id: Option<String>,
}

/// What [`Store::rekey`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RekeyReport {
    /// Values sealed anew under the new key.
    pub resealed: usize,
    /// Processed msgIds re-hashed under the new index secret.
    pub processed_rehashed: usize,
    /// Processed msgIds dropped: recorded before schema 4, they carry no msgId to re-hash
    /// (they would have been forgotten within `processed_keep_hours` anyway).
    pub processed_dropped: usize,
    /// Conversations whose history was re-hashed.
    pub conversations_rehashed: usize,
    /// History turns dropped: of conversations nobody wrote to since the schema 4 upgrade,
    /// whose ids the store never learnt.
    pub history_dropped: usize,
    /// Cached look-ups emptied (they refill by themselves).
    pub cache_emptied: u64,
}

/// Where [`Store::expire_history`] goes on: the keyed hash of the last conversation looked at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SweepCursor(Hashed);

/// What one [`Store::expire_history`] call did.
#[derive(Debug, Default)]
pub struct HistorySweep {
    /// Conversations looked at.
    pub looked_at: usize,
    /// Conversations whose history was forgotten, and their turns.
    pub conversations: usize,
    pub turns: usize,
    /// Where the next call goes on; `None` once every conversation was looked at.
    pub next: Option<SweepCursor>,
}

/// What [`Store::compact_if_mostly_free`] did.
#[derive(Debug, Clone, Copy)]
pub struct Compaction {
    pub before_bytes: u64,
    pub after_bytes: u64,
    /// How long every store call waited.
    pub took: std::time::Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InboxEntry {
    pub message: RobotMessage,
    pub accepted_at_ms: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OutboxEntry {
    pub msg_id: String,
    pub reply: Reply,
    pub staged_at_ms: i64,
    /// The AI card (its outTrackId) the answer streamed into, finalised on delivery; `None` for
    /// a plain Markdown reply. Added in schema 3.
    pub card: Option<String>,
}

/// [`OutboxEntry`] as schema 2 wrote it.
#[derive(Deserialize)]
struct OutboxEntryV2 {
    msg_id: String,
    reply: Reply,
    staged_at_ms: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    User,
    Assistant,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Turn {
    pub role: Role,
    pub text: String,
    pub at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UndoEntry {
    pub tool: String,
    pub user: String,
    pub description: String,
    /// What the tool needs to undo the action (its own encoding).
    pub payload: Vec<u8>,
    pub at_ms: i64,
}

/// A cached look-up and when it stops counting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheEntry {
    pub expires_ms: i64,
    pub value: String,
}

/// `[store]`: where the key comes from and how much is kept.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSettings {
    /// Key file for development and tests; on the box the key is the systemd credential `store-key`.
    pub key_file: Option<PathBuf>,
    /// How long a msgId is remembered as processed.
    pub processed_keep_hours: u64,
    /// Turns and bytes of history kept per conversation.
    pub history_turns: usize,
    pub history_bytes: usize,
    /// Undo journal entries kept.
    pub undo_entries: usize,
    /// A conversation nobody wrote to for this many days loses its history (and its privacy
    /// marker); 0 keeps it for ever. The model only ever sees the current session's turns
    /// (`[assistant] conversation_idle_ms`), so this bounds what the file keeps, not what is said.
    pub history_days: u64,
}

impl Default for StoreSettings {
    fn default() -> Self {
        let r = Retention::default();
        StoreSettings {
            key_file: None,
            processed_keep_hours: r.processed_ms / 3_600_000,
            history_turns: r.history_turns,
            history_bytes: r.history_bytes,
            undo_entries: r.undo_entries,
            history_days: 30,
        }
    }
}

impl StoreSettings {
    pub fn retention(&self) -> Retention {
        Retention {
            processed_ms: self.processed_keep_hours.max(1).saturating_mul(3_600_000),
            history_turns: self.history_turns.max(1),
            history_bytes: self.history_bytes.max(1),
            undo_entries: self.undo_entries.max(1),
        }
    }

    /// How long an idle conversation's history is kept; `None`: for ever.
    pub fn history_keep_ms(&self) -> Option<i64> {
        (self.history_days > 0).then(|| i64::try_from(self.history_days.saturating_mul(86_400_000)).unwrap_or(i64::MAX))
    }
}

/// The store file inside the state directory.
pub fn file_in(state_dir: &Path) -> PathBuf {
    state_dir.join("zhuli.redb")
}

/// Bounds of what the store keeps.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    pub processed_ms: u64,
    pub history_turns: usize,
    pub history_bytes: usize,
    pub undo_entries: usize,
}

impl Default for Retention {
    fn default() -> Self {
        Retention { processed_ms: 24 * 3600 * 1000, history_turns: 40, history_bytes: 64 * 1024, undo_entries: 1000 }
    }
}

pub struct Store {
    /// `None` only while being reopened after an I/O error (redb refuses further work on a
    /// handle that saw one, e.g. a full disk, until it is closed and opened again).
    db: std::sync::RwLock<Option<Database>>,
    needs_reopen: std::sync::atomic::AtomicBool,
    sealer: Sealer,
    /// For files kept outside the store (undo copies), under a key derived from the store's.
    files: std::sync::Arc<seal::FileSealer>,
    index: ring::hmac::Key,
    path: PathBuf,
    retention: Retention,
}

/// A read lock on the open database.
struct DbHandle<'a>(std::sync::RwLockReadGuard<'a, Option<Database>>);

impl std::ops::Deref for DbHandle<'_> {
    type Target = Database;
    fn deref(&self) -> &Database {
        self.0.as_ref().expect("DbHandle is only built over an open database")
    }
}

pub(crate) fn u64_key(k: u64) -> [u8; 8] {
    k.to_be_bytes()
}

pub(crate) fn pair_key(h: &Hashed, seq: u64) -> [u8; 24] {
    let mut k = [0u8; 24];
    k[..16].copy_from_slice(h);
    k[16..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// How many records of each kind a store holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Counts {
    pub conversations: u64,
    /// Messages and answers kept as conversation history.
    pub messages: u64,
    pub jobs: u64,
    /// Message ids remembered against redelivery.
    pub processed: u64,
    pub settings: u64,
}

/// [`Counts`] as read in `txn`; a table not made yet counts none.
pub(crate) fn counts_in(txn: &redb::ReadTransaction) -> Result<Counts, redb::Error> {
    use redb::ReadableTableMetadata;
    fn len<K: redb::Key + 'static, V: redb::Value + 'static>(
        txn: &redb::ReadTransaction,
        def: TableDefinition<K, V>,
    ) -> Result<u64, redb::Error> {
        match txn.open_table(def) {
            Ok(t) => Ok(t.len()?),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
            Err(e) => Err(e.into()),
        }
    }
    Ok(Counts {
        conversations: len(txn, CONVERSATIONS)?,
        messages: len(txn, HISTORY)?,
        jobs: len(txn, JOBS)?,
        processed: len(txn, PROCESSED)?,
        settings: len(txn, SETTINGS)?,
    })
}

impl Store {
    /// The sealer for files kept outside the store (the files tools' undo copies).
    pub fn file_sealer(&self) -> std::sync::Arc<seal::FileSealer> {
        self.files.clone()
    }

    /// Open (or create) the store at `path` with `key`. A wrong key fails before any write.
    pub fn open(path: &Path, key: &StoreKey, retention: Retention) -> Result<Store, StoreError> {
        let sealer = Sealer::new(key);
        let existed = path.exists();
        if existed && std::fs::metadata(path).map(|m| m.len() == 0).unwrap_or(false) {
            return Err(StoreError::NotAStore(path.to_owned()));
        }
        if existed {
            // Check the key before the first write: opening for writing repairs a file left
            // dirty by a crash, and a wrong key must change nothing.
            check_key_unwritten(path, &sealer)?;
        }
        // SingleWriter: `zhuli backup` may read a consistent snapshot while the agent writes.
        let db = builder().create(path).map_err(|e| match e {
            redb::DatabaseError::Storage(redb::StorageError::Corrupted(_)) => StoreError::NotAStore(path.to_owned()),
            e => db_err(path, e),
        })?;
        let txn = db.begin_write().map_err(|e| db_err(path, e))?;
        let index_secret = {
            let mut meta = txn.open_table(META).map_err(|e| db_err(path, e))?;
            let fresh = meta.get("schema_version").map_err(|e| db_err(path, e))?.is_none();
            if fresh && existed {
                return Err(StoreError::NotAStore(path.to_owned()));
            }
            if fresh {
                let secret = new_index_secret();
                meta.insert("key_check", sealer.seal("meta", b"key_check", KEY_CHECK).as_slice())
                    .map_err(|e| db_err(path, e))?;
                meta.insert("schema_version", sealer.seal("meta", b"schema_version", &1u32.to_be_bytes()).as_slice())
                    .map_err(|e| db_err(path, e))?;
                meta.insert("index_secret", sealer.seal("meta", b"index_secret", &secret[..]).as_slice())
                    .map_err(|e| db_err(path, e))?;
                // A new store is written as schema 1 and migrated like any old one.
                migrate(path, &sealer, &txn, &mut meta, 1)?;
                zeroize::Zeroizing::new(secret.to_vec())
            } else {
                check_key(path, &sealer, &meta)?;
                let version = read_meta(path, &sealer, &meta, "schema_version")?;
                let version = u32::from_be_bytes(version.try_into().map_err(|_| decode(path, "meta"))?);
                let oldest = oldest_reader(path, &sealer, &meta, version)?;
                if !readable(SCHEMA_VERSION, version, oldest) {
                    return Err(StoreError::Newer { path: path.to_owned(), found: version });
                }
                if version > SCHEMA_VERSION {
                    // A newer release wrote it and said this one still runs on it (a fallback):
                    // what it added is left as it is, and the schema stays the newer one's.
                    log::info!(
                        "store {} has schema {version} from a newer release, which this release ({SCHEMA_VERSION}) reads: running on it unchanged",
                        path.display()
                    );
                }
                if version < SCHEMA_VERSION {
                    migrate(path, &sealer, &txn, &mut meta, version)?;
                    log::info!("store {} migrated from schema {version} to {SCHEMA_VERSION}", path.display());
                }
                zeroize::Zeroizing::new(read_meta(path, &sealer, &meta, "index_secret")?)
            }
        };
        for t in [INBOX, OUTBOX, UNDO] {
            txn.open_table(t).map_err(|e| db_err(path, e))?;
        }
        txn.open_table(PROCESSED).map_err(|e| db_err(path, e))?;
        txn.open_table(PROCESSED_EXPIRY).map_err(|e| db_err(path, e))?;
        txn.open_table(HISTORY).map_err(|e| db_err(path, e))?;
        txn.open_table(CONVERSATIONS).map_err(|e| db_err(path, e))?;
        txn.open_table(SETTINGS).map_err(|e| db_err(path, e))?;
        txn.open_table(CACHE).map_err(|e| db_err(path, e))?;
        txn.commit().map_err(|e| db_err(path, e))?;
        let index = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &index_secret);
        Ok(Store {
            db: std::sync::RwLock::new(Some(db)),
            needs_reopen: std::sync::atomic::AtomicBool::new(false),
            sealer,
            files: std::sync::Arc::new(seal::FileSealer::new(key)),
            index,
            path: path.to_owned(),
            retention,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The random id of this store (schema 2 and later).
    pub fn store_id(&self) -> Result<String, StoreError> {
        let txn = self.handle()?.begin_read().map_err(|e| self.err(e))?;
        let meta = txn.open_table(META).map_err(|e| self.err(e))?;
        let raw = read_meta(&self.path, &self.sealer, &meta, "store_id")?;
        String::from_utf8(raw).map_err(|_| decode(&self.path, "meta"))
    }

    fn hash(&self, domain: &str, id: &str) -> Hashed {
        keyed_hash(&self.index, domain, id)
    }

    fn seal_value<T: Serialize>(&self, table: &'static str, key: &[u8], value: &T) -> Vec<u8> {
        let plain =
            zeroize::Zeroizing::new(postcard::to_allocvec(value).expect("store entries are plain serialisable data"));
        self.sealer.seal(table, key, &plain)
    }

    fn open_value<T: DeserializeOwned>(&self, table: &'static str, key: &[u8], sealed: &[u8]) -> Result<T, StoreError> {
        let plain = zeroize::Zeroizing::new(
            self.sealer
                .open(table, key, sealed)
                .map_err(|source| StoreError::Sealed { path: self.path.clone(), source })?,
        );
        postcard::from_bytes(&plain).map_err(|_| decode(&self.path, table))
    }

    fn err(&self, e: impl Into<redb::Error>) -> StoreError {
        let e: redb::Error = e.into();
        if matches!(e, redb::Error::Io(_) | redb::Error::PreviousIo) {
            self.needs_reopen.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        db_err(&self.path, e)
    }

    /// The database handle, reopened first if an I/O error spoiled the previous one.
    fn handle(&self) -> Result<DbHandle<'_>, StoreError> {
        use std::sync::atomic::Ordering;
        if self.needs_reopen.load(Ordering::SeqCst) {
            let mut slot = self.db.write().unwrap_or_else(|p| p.into_inner());
            if self.needs_reopen.swap(false, Ordering::SeqCst) {
                // Close before opening again: the file lock is per handle.
                *slot = None;
                match builder().create(&self.path) {
                    Ok(db) => {
                        log::info!("store {} reopened after an I/O error", self.path.display());
                        *slot = Some(db);
                    }
                    Err(e) => {
                        self.needs_reopen.store(true, Ordering::SeqCst);
                        return Err(db_err(&self.path, e));
                    }
                }
            }
        }
        let guard = self.db.read().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            self.needs_reopen.store(true, Ordering::SeqCst);
            return Err(StoreError::Db {
                path: self.path.clone(),
                reason: "the store is being reopened; try again".into(),
            });
        }
        Ok(DbHandle(guard))
    }

    /// The first free inbox sequence number: above every live inbox and outbox entry. A number
    /// is only ever reused once nothing refers to it any more, and no commit writes a counter.
    fn next_inbox_seq(&self, txn: &redb::WriteTransaction) -> Result<u64, StoreError> {
        let last = |def: TableDefinition<u64, &[u8]>| -> Result<u64, StoreError> {
            let t = txn.open_table(def).map_err(|e| self.err(e))?;
            let last = t.last().map_err(|e| self.err(e))?;
            Ok(last.map(|(k, _)| k.value()).unwrap_or(0))
        };
        Ok(last(INBOX)?.max(last(OUTBOX)?) + 1)
    }

    /// Record a batch of incoming messages in one durable commit. `answer` says whether the
    /// message is to be answered (queued in the inbox) or only remembered as processed.
    /// The Stream frames may be ACKed once this returns.
    pub fn accept_batch(&self, batch: &[(&RobotMessage, bool)], now_ms: i64) -> Result<Vec<Acceptance>, StoreError> {
        let owned: Vec<(RobotMessage, bool)> = batch.iter().map(|(m, a)| ((*m).clone(), *a)).collect();
        let mut out = self.write(&[WriteOp::Accept { batch: &owned, now_ms }])?;
        Ok(match out.pop() {
            Some(WriteOutcome::Accepted(a)) => a,
            _ => Vec::new(),
        })
    }

    /// Move inbox item `seq` to the outbox with its reply, atomically.
    pub fn stage_reply(&self, seq: u64, entry: &OutboxEntry) -> Result<(), StoreError> {
        self.write(&[WriteOp::Stage { seq, entry, also: &[] }]).map(drop)
    }

    /// The replies of these outbox items were delivered (or given up on): forget them.
    pub fn delivered(&self, seqs: &[u64]) -> Result<(), StoreError> {
        let ops: Vec<WriteOp<'_>> = seqs.iter().map(|s| WriteOp::Delivered(*s)).collect();
        self.write(&ops).map(drop)
    }

    /// Apply `ops` in order in one transaction and one durable commit (group commit).
    pub fn write(&self, ops: &[WriteOp<'_>]) -> Result<Vec<WriteOutcome>, StoreError> {
        let txn = self.handle()?.begin_write().map_err(|e| self.err(e))?;
        let mut outcomes = Vec::with_capacity(ops.len());
        {
            let accepting: u64 =
                ops.iter().map(|op| if let WriteOp::Accept { batch, .. } = op { batch.len() as u64 } else { 0 }).sum();
            let mut next_seq = if accepting > 0 { self.next_inbox_seq(&txn)? } else { 0 };
            let mut processed = txn.open_table(PROCESSED).map_err(|e| self.err(e))?;
            let mut expiry = txn.open_table(PROCESSED_EXPIRY).map_err(|e| self.err(e))?;
            let mut inbox = txn.open_table(INBOX).map_err(|e| self.err(e))?;
            let mut outbox = txn.open_table(OUTBOX).map_err(|e| self.err(e))?;
            let mut jobs = if ops.iter().any(|op| matches!(op, WriteOp::Job { .. })) {
                Some(txn.open_table(JOBS).map_err(|e| self.err(e))?)
            } else {
                None
            };
            for op in ops {
                match op {
                    WriteOp::Accept { batch, now_ms } => {
                        let expires = ((*now_ms).max(0) as u64).saturating_add(self.retention.processed_ms);
                        let mut results = Vec::with_capacity(batch.len());
                        for (message, answer) in batch.iter() {
                            let seq = next_seq;
                            next_seq += 1;
                            let h = self.hash("msgId", &message.msg_id);
                            if processed.get(h).map_err(|e| self.err(e))?.is_some() {
                                results.push(Acceptance::Duplicate);
                                continue;
                            }
                            let entry = ProcessedEntry { expires_ms: expires, msg_id: Some(message.msg_id.clone()) };
                            processed
                                .insert(h, self.seal_value("processed", &h, &entry).as_slice())
                                .map_err(|e| self.err(e))?;
                            expiry.insert((expires, h), ()).map_err(|e| self.err(e))?;
                            if *answer {
                                let entry = InboxEntry { message: message.clone(), accepted_at_ms: *now_ms };
                                inbox
                                    .insert(seq, self.seal_value("inbox", &u64_key(seq), &entry).as_slice())
                                    .map_err(|e| self.err(e))?;
                                results.push(Acceptance::Queued(seq));
                            } else {
                                results.push(Acceptance::Recorded);
                            }
                        }
                        outcomes.push(WriteOutcome::Accepted(results));
                    }
                    WriteOp::Stage { seq, entry, also } => {
                        inbox.remove(*seq).map_err(|e| self.err(e))?;
                        for other in also.iter() {
                            inbox.remove(*other).map_err(|e| self.err(e))?;
                        }
                        outbox
                            .insert(*seq, self.seal_value("outbox", &u64_key(*seq), *entry).as_slice())
                            .map_err(|e| self.err(e))?;
                        outcomes.push(WriteOutcome::Done);
                    }
                    WriteOp::Delivered(seq) => {
                        outbox.remove(*seq).map_err(|e| self.err(e))?;
                        inbox.remove(*seq).map_err(|e| self.err(e))?;
                        outcomes.push(WriteOutcome::Done);
                    }
                    WriteOp::Job { id, job, expected } => {
                        let table = jobs.as_mut().expect("opened above when a job is written");
                        if let Some(expected) = expected {
                            let now = match table.get(*id).map_err(|e| self.err(e))? {
                                Some(v) => {
                                    Some(self.open_value::<crate::schedule::Job>("jobs", &u64_key(*id), v.value())?)
                                }
                                None => None,
                            };
                            if now.as_ref() != Some(*expected) {
                                // Dropped without a commit: nothing of this write is kept.
                                return Ok(vec![WriteOutcome::Stale]);
                            }
                        }
                        match job {
                            Some(job) => {
                                table
                                    .insert(*id, self.seal_value("jobs", &u64_key(*id), *job).as_slice())
                                    .map_err(|e| self.err(e))?;
                            }
                            None => {
                                table.remove(*id).map_err(|e| self.err(e))?;
                            }
                        }
                        outcomes.push(WriteOutcome::Done);
                    }
                }
            }
        }
        txn.commit().map_err(|e| self.err(e))?;
        Ok(outcomes)
    }

    /// Unfinished work left by a previous run: inbox items to answer, outbox items to deliver.
    #[allow(clippy::type_complexity)]
    pub fn pending(&self) -> Result<(Vec<(u64, InboxEntry)>, Vec<(u64, OutboxEntry)>), StoreError> {
        let txn = self.handle()?.begin_read().map_err(|e| self.err(e))?;
        let mut inbox = Vec::new();
        for row in txn.open_table(INBOX).map_err(|e| self.err(e))?.iter().map_err(|e| self.err(e))? {
            let (k, v) = row.map_err(|e| self.err(e))?;
            inbox.push((k.value(), self.open_value("inbox", &u64_key(k.value()), v.value())?));
        }
        let mut outbox = Vec::new();
        for row in txn.open_table(OUTBOX).map_err(|e| self.err(e))?.iter().map_err(|e| self.err(e))? {
            let (k, v) = row.map_err(|e| self.err(e))?;
            outbox.push((k.value(), self.open_value("outbox", &u64_key(k.value()), v.value())?));
        }
        Ok((inbox, outbox))
    }

    /// Re-seal every value under `new` and re-hash every keyed row under a new index secret, in
    /// one transaction: a crash leaves the store entirely under the old key and secret or
    /// entirely under the new ones, and whoever had the old key cannot link the new hashes to
    /// ids. Rows that carry no id to re-hash (written before schema 4) are dropped and counted.
    /// Install the new key (key file or credential) right after; the old one no longer opens it.
    pub fn rekey(self, new: &StoreKey) -> Result<RekeyReport, StoreError> {
        let fresh = Sealer::new(new);
        let secret = new_index_secret();
        let index = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret[..]);
        let path = &self.path;
        let sealed = |source| StoreError::Sealed { path: path.clone(), source };
        let mut report = RekeyReport::default();
        let txn = self.handle()?.begin_write().map_err(|e| self.err(e))?;
        {
            // Tables a newer release added are unknown here and would be left under the old
            // key: such a store is re-keyed by that release.
            let meta = txn.open_table(META).map_err(|e| self.err(e))?;
            let raw = read_meta(path, &self.sealer, &meta, "schema_version")?;
            let version = u32::from_be_bytes(raw.try_into().map_err(|_| decode(path, "meta"))?);
            if version > SCHEMA_VERSION {
                return Err(StoreError::Newer { path: path.clone(), found: version });
            }
        }
        {
            let reseal = |table: &'static str, aad: &[u8], v: &[u8]| -> Result<Vec<u8>, StoreError> {
                let plain = zeroize::Zeroizing::new(self.sealer.open(table, aad, v).map_err(sealed)?);
                Ok(fresh.seal(table, aad, &plain))
            };
            macro_rules! reseal_table {
                ($def:expr, $name:literal, $aad:expr, |$k:ident| $as_key:expr) => {{
                    let mut t = txn.open_table($def).map_err(|e| self.err(e))?;
                    let rows: Vec<_> = t
                        .iter()
                        .map_err(|e| self.err(e))?
                        .map(|r| r.map(|(k, v)| (k.value().to_owned(), v.value().to_vec())))
                        .collect::<Result<_, _>>()
                        .map_err(|e| self.err(e))?;
                    for (k, v) in rows {
                        #[allow(clippy::redundant_closure_call)]
                        let aad: Vec<u8> = ($aad)(&k);
                        let $k = &k;
                        t.insert($as_key, reseal($name, &aad, &v)?.as_slice()).map_err(|e| self.err(e))?;
                        report.resealed += 1;
                    }
                }};
            }
            let text = |k: &String| -> Vec<u8> { k.as_bytes().to_vec() };
            let seq = |k: &u64| -> Vec<u8> { u64_key(*k).to_vec() };
            reseal_table!(META, "meta", text, |k| k.as_str());
            txn.open_table(META)
                .map_err(|e| self.err(e))?
                .insert("index_secret", fresh.seal("meta", b"index_secret", &secret[..]).as_slice())
                .map_err(|e| self.err(e))?;
            reseal_table!(INBOX, "inbox", seq, |k| *k);
            reseal_table!(OUTBOX, "outbox", seq, |k| *k);
            reseal_table!(SETTINGS, "settings", text, |k| k.as_str());
            reseal_table!(UNDO, "undo", seq, |k| *k);
            reseal_table!(JOBS, "jobs", seq, |k| *k);

            // Keyed tables are read whole, emptied and written again under the new hashes.
            let processed: Vec<(Hashed, ProcessedEntry)> = {
                let t = txn.open_table(PROCESSED).map_err(|e| self.err(e))?;
                let mut out = Vec::new();
                for row in t.iter().map_err(|e| self.err(e))? {
                    let (k, v) = row.map_err(|e| self.err(e))?;
                    out.push((k.value(), self.open_value("processed", &k.value(), v.value())?));
                }
                out
            };
            let conversations: Vec<(Hashed, String)> = {
                let t = txn.open_table(CONVERSATIONS).map_err(|e| self.err(e))?;
                let mut out = Vec::new();
                for row in t.iter().map_err(|e| self.err(e))? {
                    let (k, v) = row.map_err(|e| self.err(e))?;
                    out.push((k.value(), self.open_value("conversations", &k.value(), v.value())?));
                }
                out
            };
            type Plain = zeroize::Zeroizing<Vec<u8>>;
            let history: Vec<((Hashed, u64), Plain)> = {
                let t = txn.open_table(HISTORY).map_err(|e| self.err(e))?;
                let mut out = Vec::new();
                for row in t.iter().map_err(|e| self.err(e))? {
                    let (k, v) = row.map_err(|e| self.err(e))?;
                    let (h, n) = k.value();
                    let plain = self.sealer.open("history", &pair_key(&h, n), v.value()).map_err(sealed)?;
                    out.push(((h, n), zeroize::Zeroizing::new(plain)));
                }
                out
            };
            report.cache_emptied = txn.open_table(CACHE).map_err(|e| self.err(e))?.len().map_err(|e| self.err(e))?;
            for def in [PROCESSED, CONVERSATIONS, CACHE] {
                txn.delete_table(def).map_err(|e| self.err(e))?;
            }
            txn.delete_table(PROCESSED_EXPIRY).map_err(|e| self.err(e))?;
            txn.delete_table(HISTORY).map_err(|e| self.err(e))?;
            txn.open_table(CACHE).map_err(|e| self.err(e))?;

            let mut table = txn.open_table(PROCESSED).map_err(|e| self.err(e))?;
            let mut expiry = txn.open_table(PROCESSED_EXPIRY).map_err(|e| self.err(e))?;
            for (_, entry) in processed {
                let Some(id) = &entry.msg_id else {
                    report.processed_dropped += 1;
                    continue;
                };
                let h = keyed_hash(&index, "msgId", id);
                let plain = zeroize::Zeroizing::new(
                    postcard::to_allocvec(&entry).expect("store entries are plain serialisable data"),
                );
                table.insert(h, fresh.seal("processed", &h, &plain).as_slice()).map_err(|e| self.err(e))?;
                expiry.insert((entry.expires_ms, h), ()).map_err(|e| self.err(e))?;
                report.processed_rehashed += 1;
            }
            let mut renamed = std::collections::HashMap::new();
            let mut table = txn.open_table(CONVERSATIONS).map_err(|e| self.err(e))?;
            for (old, id) in conversations {
                let h = keyed_hash(&index, "conversation", &id);
                let plain = zeroize::Zeroizing::new(
                    postcard::to_allocvec(&id).expect("store entries are plain serialisable data"),
                );
                table.insert(h, fresh.seal("conversations", &h, &plain).as_slice()).map_err(|e| self.err(e))?;
                renamed.insert(old, h);
            }
            report.conversations_rehashed = renamed.len();
            let mut table = txn.open_table(HISTORY).map_err(|e| self.err(e))?;
            for ((old, n), plain) in history {
                let Some(h) = renamed.get(&old) else {
                    report.history_dropped += 1;
                    continue;
                };
                table
                    .insert((*h, n), fresh.seal("history", &pair_key(h, n), &plain).as_slice())
                    .map_err(|e| self.err(e))?;
            }
            report.resealed += report.processed_rehashed + report.conversations_rehashed;
            report.resealed += table.len().map_err(|e| self.err(e))? as usize;
        }
        txn.commit().map_err(|e| self.err(e))?;
        Ok(report)
    }

    /// Forget processed msgIds whose time is up; at most `max` in this call's one transaction, so
    /// the recorder's commits wait for it only briefly. Called again until it forgets fewer than
    /// `max`, it keeps up with any rate of messages (`app`'s upkeep does).
    pub fn prune(&self, now_ms: i64, max: usize) -> Result<usize, StoreError> {
        let txn = self.handle()?.begin_write().map_err(|e| self.err(e))?;
        let mut removed = 0;
        {
            let mut expiry = txn.open_table(PROCESSED_EXPIRY).map_err(|e| self.err(e))?;
            let mut processed = txn.open_table(PROCESSED).map_err(|e| self.err(e))?;
            let now = now_ms.max(0) as u64;
            let due: Vec<(u64, Hashed)> = expiry
                .range(..(now, [0xffu8; 16]))
                .map_err(|e| self.err(e))?
                .take(max)
                .map(|r| r.map(|(k, _)| k.value()))
                .collect::<Result<_, _>>()
                .map_err(|e| self.err(e))?;
            for (t, h) in due {
                expiry.remove((t, h)).map_err(|e| self.err(e))?;
                processed.remove(h).map_err(|e| self.err(e))?;
                removed += 1;
            }
        }
        if removed == 0 {
            // Nothing to make durable: an idle agent does not write the disk.
            txn.abort().map_err(|e| self.err(e))?;
        } else {
            txn.commit().map_err(|e| self.err(e))?;
        }
        Ok(removed)
    }

    /// Forget the history of conversations whose newest turn is older than `before_ms`, and with
    /// it the settings `settings_of` names for the conversation (its privacy marker): looks at up
    /// to `max` conversations after `from` in one transaction. [`HistorySweep::next`] says where
    /// the next call goes on; `None` once every conversation was looked at.
    pub fn expire_history(
        &self,
        before_ms: i64,
        from: Option<&SweepCursor>,
        max: usize,
        settings_of: &dyn Fn(&str) -> Vec<String>,
    ) -> Result<HistorySweep, StoreError> {
        use std::ops::Bound;
        let txn = self.handle()?.begin_write().map_err(|e| self.err(e))?;
        let mut sweep = HistorySweep::default();
        {
            let mut history = txn.open_table(HISTORY).map_err(|e| self.err(e))?;
            let mut conversations = txn.open_table(CONVERSATIONS).map_err(|e| self.err(e))?;
            let mut settings = txn.open_table(SETTINGS).map_err(|e| self.err(e))?;
            let mut after: Option<Hashed> = from.map(|c| c.0);
            for _ in 0..max {
                // The next conversation with history: the first key past every turn of the last.
                let lower = match after {
                    Some(h) => Bound::Excluded((h, u64::MAX)),
                    None => Bound::Unbounded,
                };
                let first =
                    match history.range::<(Hashed, u64)>((lower, Bound::Unbounded)).map_err(|e| self.err(e))?.next() {
                        Some(row) => Some(row.map_err(|e| self.err(e))?.0.value().0),
                        None => None,
                    };
                let Some(h) = first else {
                    after = None;
                    break;
                };
                after = Some(h);
                sweep.looked_at += 1;
                let newest = {
                    let last = history.range((h, 0)..=(h, u64::MAX)).map_err(|e| self.err(e))?.next_back();
                    match last {
                        Some(row) => {
                            let (k, v) = row.map_err(|e| self.err(e))?;
                            let turn: Turn = self.open_value("history", &pair_key(&h, k.value().1), v.value())?;
                            turn.at_ms
                        }
                        None => continue,
                    }
                };
                if newest >= before_ms {
                    continue;
                }
                sweep.turns += self.drop_turns(&mut history, h)?;
                sweep.conversations += 1;
                let id = match conversations.remove(h).map_err(|e| self.err(e))? {
                    Some(v) => Some(self.open_value::<String>("conversations", &h, v.value())?),
                    // History from before schema 4 whose conversation nobody wrote to since.
                    None => None,
                };
                for name in id.as_deref().map(settings_of).unwrap_or_default() {
                    settings.remove(name.as_str()).map_err(|e| self.err(e))?;
                }
            }
            sweep.next = after.map(SweepCursor);
        }
        txn.commit().map_err(|e| self.err(e))?;
        Ok(sweep)
    }

    /// Compact the file when it is at least `min_bytes` long and less than half of it is in use:
    /// pages are moved down and the free end cut off. Every store call waits meanwhile; `None`
    /// when there was nothing to do, or a read was in progress (a backup in another process):
    /// then it is for a later quiet moment.
    pub fn compact_if_mostly_free(&self, min_bytes: u64) -> Result<Option<Compaction>, StoreError> {
        let file_len = |path: &Path| std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        let before = file_len(&self.path);
        if before < min_bytes {
            return Ok(None);
        }
        let used = {
            let txn = self.handle()?.begin_write().map_err(|e| self.err(e))?;
            let stats = txn.stats().map_err(|e| self.err(e))?;
            txn.abort().map_err(|e| self.err(e))?;
            stats.allocated_pages().saturating_mul(stats.page_size() as u64)
        };
        if used.saturating_mul(2) > before {
            return Ok(None);
        }
        let started = std::time::Instant::now();
        let mut slot = self.db.write().unwrap_or_else(|p| p.into_inner());
        let Some(db) = slot.as_mut() else { return Ok(None) };
        match db.compact() {
            Ok(_) => {}
            Err(
                redb::CompactionError::TransactionInProgress
                | redb::CompactionError::EphemeralSavepointExists
                | redb::CompactionError::PersistentSavepointExists,
            ) => return Ok(None),
            Err(e) => return Err(self.err(e)),
        }
        drop(slot);
        Ok(Some(Compaction { before_bytes: before, after_bytes: file_len(&self.path), took: started.elapsed() }))
    }

    /// Append a turn to a conversation, dropping its oldest turns beyond the turn and byte bounds.
    pub fn append_turn(&self, conversation_id: &str, turn: &Turn) -> Result<(), StoreError> {
        self.finish_turn(conversation_id, std::slice::from_ref(turn), &[])
    }

    /// Append a turn's question and answer and set settings (today's token use), in one commit.
    pub fn finish_turn(
        &self,
        conversation_id: &str,
        turns: &[Turn],
        settings: &[(&str, String)],
    ) -> Result<(), StoreError> {
        let h = self.hash("conversation", conversation_id);
        let txn = self.handle()?.begin_write().map_err(|e| self.err(e))?;
        {
            let mut history = txn.open_table(HISTORY).map_err(|e| self.err(e))?;
            // Turns are numbered within their conversation.
            let last: Option<u64> = match history.range((h, 0)..=(h, u64::MAX)).map_err(|e| self.err(e))?.next_back() {
                Some(row) => Some(row.map_err(|e| self.err(e))?.0.value().1),
                None => None,
            };
            let mut seq = last.unwrap_or(0);
            for turn in turns {
                seq += 1;
                history
                    .insert((h, seq), self.seal_value("history", &pair_key(&h, seq), turn).as_slice())
                    .map_err(|e| self.err(e))?;
            }
            let mut sizes: Vec<(u64, usize)> = history
                .range((h, 0)..=(h, u64::MAX))
                .map_err(|e| self.err(e))?
                .map(|r| r.map(|(k, v)| (k.value().1, v.value().len())))
                .collect::<Result<_, _>>()
                .map_err(|e| self.err(e))?;
            let mut bytes: usize = sizes.iter().map(|(_, n)| n).sum();
            let mut drop_seqs = Vec::new();
            while sizes.len() > 1
                && (sizes.len() > self.retention.history_turns || bytes > self.retention.history_bytes)
            {
                let (s, n) = sizes.remove(0);
                bytes -= n;
                drop_seqs.push(s);
            }
            for s in drop_seqs {
                history.remove((h, s)).map_err(|e| self.err(e))?;
            }
            let mut conversations = txn.open_table(CONVERSATIONS).map_err(|e| self.err(e))?;
            if conversations.get(h).map_err(|e| self.err(e))?.is_none() {
                conversations
                    .insert(h, self.seal_value("conversations", &h, &conversation_id).as_slice())
                    .map_err(|e| self.err(e))?;
            }
            let mut table = txn.open_table(SETTINGS).map_err(|e| self.err(e))?;
            for (name, value) in settings {
                table
                    .insert(*name, self.seal_value("settings", name.as_bytes(), value).as_slice())
                    .map_err(|e| self.err(e))?;
            }
        }
        txn.commit().map_err(|e| self.err(e))
    }

    /// Forget a conversation's turns (`/new`); how many were dropped.
    pub fn clear_history(&self, conversation_id: &str) -> Result<usize, StoreError> {
        let h = self.hash("conversation", conversation_id);
        let txn = self.handle()?.begin_write().map_err(|e| self.err(e))?;
        let n = {
            let mut history = txn.open_table(HISTORY).map_err(|e| self.err(e))?;
            let n = self.drop_turns(&mut history, h)?;
            txn.open_table(CONVERSATIONS).map_err(|e| self.err(e))?.remove(h).map_err(|e| self.err(e))?;
            n
        };
        txn.commit().map_err(|e| self.err(e))?;
        Ok(n)
    }

    /// Remove every turn of the conversation hashed `h` from `history`; how many there were.
    fn drop_turns(&self, history: &mut redb::Table<'_, (Hashed, u64), &[u8]>, h: Hashed) -> Result<usize, StoreError> {
        let seqs: Vec<u64> = history
            .range((h, 0)..=(h, u64::MAX))
            .map_err(|e| self.err(e))?
            .map(|r| r.map(|(k, _)| k.value().1))
            .collect::<Result<_, _>>()
            .map_err(|e| self.err(e))?;
        for s in &seqs {
            history.remove((h, *s)).map_err(|e| self.err(e))?;
        }
        Ok(seqs.len())
    }

    /// The turns kept for a conversation, oldest first.
    pub fn history(&self, conversation_id: &str) -> Result<Vec<Turn>, StoreError> {
        let h = self.hash("conversation", conversation_id);
        let txn = self.handle()?.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(HISTORY).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in table.range((h, 0)..=(h, u64::MAX)).map_err(|e| self.err(e))? {
            let (k, v) = row.map_err(|e| self.err(e))?;
            out.push(self.open_value("history", &pair_key(&h, k.value().1), v.value())?);
        }
        Ok(out)
    }

    /// How many of each kind of record the store holds (the restore drill compares a restored
    /// copy's with the live store's).
    pub fn counts(&self) -> Result<Counts, StoreError> {
        let txn = self.handle()?.begin_read().map_err(|e| self.err(e))?;
        counts_in(&txn).map_err(|e| self.err(e))
    }

    pub fn set_setting(&self, name: &str, value: &str) -> Result<(), StoreError> {
        let txn = self.handle()?.begin_write().map_err(|e| self.err(e))?;
        txn.open_table(SETTINGS)
            .map_err(|e| self.err(e))?
            .insert(name, self.seal_value("settings", name.as_bytes(), &value).as_slice())
            .map_err(|e| self.err(e))?;
        txn.commit().map_err(|e| self.err(e))
    }

    pub fn setting(&self, name: &str) -> Result<Option<String>, StoreError> {
        let txn = self.handle()?.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(SETTINGS).map_err(|e| self.err(e))?;
        let got = table.get(name).map_err(|e| self.err(e))?;
        got.map(|v| self.open_value("settings", name.as_bytes(), v.value())).transpose()
    }

    /// A cached value of `name` that has not expired at `now_ms`.
    pub fn cache_get(&self, name: &str, now_ms: i64) -> Result<Option<String>, StoreError> {
        let h = self.hash("cache", name);
        let txn = self.handle()?.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(CACHE).map_err(|e| self.err(e))?;
        let Some(v) = table.get(h).map_err(|e| self.err(e))? else { return Ok(None) };
        let entry: CacheEntry = self.open_value("cache", &h, v.value())?;
        Ok((entry.expires_ms > now_ms).then_some(entry.value))
    }

    /// Keep `value` as `name` until `expires_ms`.
    pub fn cache_put(&self, name: &str, value: &str, expires_ms: i64) -> Result<(), StoreError> {
        let h = self.hash("cache", name);
        let entry = CacheEntry { expires_ms, value: value.to_owned() };
        let txn = self.handle()?.begin_write().map_err(|e| self.err(e))?;
        txn.open_table(CACHE)
            .map_err(|e| self.err(e))?
            .insert(h, self.seal_value("cache", &h, &entry).as_slice())
            .map_err(|e| self.err(e))?;
        txn.commit().map_err(|e| self.err(e))
    }

    /// Forget every cached value; how many there were.
    pub fn cache_clear(&self) -> Result<u64, StoreError> {
        let txn = self.handle()?.begin_write().map_err(|e| self.err(e))?;
        let n = txn.open_table(CACHE).map_err(|e| self.err(e))?.len().map_err(|e| self.err(e))?;
        txn.delete_table(CACHE).map_err(|e| self.err(e))?;
        txn.open_table(CACHE).map_err(|e| self.err(e))?;
        txn.commit().map_err(|e| self.err(e))?;
        Ok(n)
    }

    /// Journal an undoable action; the oldest entries beyond the bound are dropped.
    pub fn push_undo(&self, entry: &UndoEntry) -> Result<u64, StoreError> {
        let txn = self.handle()?.begin_write().map_err(|e| self.err(e))?;
        let seq = {
            let mut undo = txn.open_table(UNDO).map_err(|e| self.err(e))?;
            let seq = undo.last().map_err(|e| self.err(e))?.map(|(k, _)| k.value() + 1).unwrap_or(1);
            undo.insert(seq, self.seal_value("undo", &u64_key(seq), entry).as_slice()).map_err(|e| self.err(e))?;
            while undo.len().map_err(|e| self.err(e))? as usize > self.retention.undo_entries {
                undo.pop_first().map_err(|e| self.err(e))?;
            }
            seq
        };
        txn.commit().map_err(|e| self.err(e))?;
        Ok(seq)
    }

    /// The newest undo entry of `user`, if any, left in the journal: it is removed
    /// ([`Store::remove_undo`]) only once the undo is done, so a failed one can be tried again.
    pub fn last_undo_of(&self, user: &str) -> Result<Option<(u64, UndoEntry)>, StoreError> {
        let txn = self.handle()?.begin_read().map_err(|e| self.err(e))?;
        let undo = txn.open_table(UNDO).map_err(|e| self.err(e))?;
        for row in undo.iter().map_err(|e| self.err(e))?.rev() {
            let (k, v) = row.map_err(|e| self.err(e))?;
            let seq = k.value();
            let entry: UndoEntry = self.open_value("undo", &u64_key(seq), v.value())?;
            if entry.user == user {
                return Ok(Some((seq, entry)));
            }
        }
        Ok(None)
    }

    /// Remove the undo entry `seq` (done, or given up).
    pub fn remove_undo(&self, seq: u64) -> Result<(), StoreError> {
        let txn = self.handle()?.begin_write().map_err(|e| self.err(e))?;
        {
            let mut undo = txn.open_table(UNDO).map_err(|e| self.err(e))?;
            undo.remove(seq).map_err(|e| self.err(e))?;
        }
        txn.commit().map_err(|e| self.err(e))
    }

    /// Take the newest undo entry (removing it), if any.
    pub fn pop_undo(&self) -> Result<Option<(u64, UndoEntry)>, StoreError> {
        let txn = self.handle()?.begin_write().map_err(|e| self.err(e))?;
        let popped = {
            let mut undo = txn.open_table(UNDO).map_err(|e| self.err(e))?;
            let last = undo.pop_last().map_err(|e| self.err(e))?;
            match last {
                Some((k, v)) => {
                    let seq = k.value();
                    Some((seq, self.open_value("undo", &u64_key(seq), v.value())?))
                }
                None => None,
            }
        };
        txn.commit().map_err(|e| self.err(e))?;
        Ok(popped)
    }
}

/// Bring `meta` from schema `from` to [`SCHEMA_VERSION`], one step at a time, inside the
/// opening transaction (so a crash leaves the old version whole).
fn migrate(
    path: &Path,
    sealer: &Sealer,
    txn: &redb::WriteTransaction,
    meta: &mut redb::Table<'_, &'static str, &'static [u8]>,
    from: u32,
) -> Result<(), StoreError> {
    for version in from..SCHEMA_VERSION {
        match version {
            1 => {
                let mut id = [0u8; 16];
                ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id)
                    .expect("the OS random source is available");
                let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
                meta.insert("store_id", sealer.seal("meta", b"store_id", hex.as_bytes()).as_slice())
                    .map_err(|e| db_err(path, e))?;
            }
            2 => {
                // Outbox entries gained `card`: decode each as schema 2 wrote it, seal it anew.
                let mut outbox = txn.open_table(OUTBOX).map_err(|e| db_err(path, e))?;
                let mut rewritten = Vec::new();
                for row in outbox.iter().map_err(|e| db_err(path, e))? {
                    let (k, v) = row.map_err(|e| db_err(path, e))?;
                    let seq = k.value();
                    let plain = zeroize::Zeroizing::new(
                        sealer
                            .open("outbox", &u64_key(seq), v.value())
                            .map_err(|source| StoreError::Sealed { path: path.to_owned(), source })?,
                    );
                    let old: OutboxEntryV2 = postcard::from_bytes(&plain).map_err(|_| decode(path, "outbox"))?;
                    let entry = OutboxEntry {
                        msg_id: old.msg_id,
                        reply: old.reply,
                        staged_at_ms: old.staged_at_ms,
                        card: None,
                    };
                    let bytes = zeroize::Zeroizing::new(
                        postcard::to_allocvec(&entry).expect("store entries are plain serialisable data"),
                    );
                    rewritten.push((seq, sealer.seal("outbox", &u64_key(seq), &bytes)));
                }
                for (seq, sealed) in rewritten {
                    outbox.insert(seq, sealed.as_slice()).map_err(|e| db_err(path, e))?;
                }
            }
            3 => {
                // Processed entries gain their msgId; those recorded before cannot learn it and
                // say so (`None`), so a rekey knows to drop them. They expire within a day.
                let mut processed = txn.open_table(PROCESSED).map_err(|e| db_err(path, e))?;
                let mut rewritten = Vec::new();
                for row in processed.iter().map_err(|e| db_err(path, e))? {
                    let (k, v) = row.map_err(|e| db_err(path, e))?;
                    let h = k.value();
                    let plain = zeroize::Zeroizing::new(
                        sealer
                            .open("processed", &h, v.value())
                            .map_err(|source| StoreError::Sealed { path: path.to_owned(), source })?,
                    );
                    let expires_ms: u64 = postcard::from_bytes(&plain).map_err(|_| decode(path, "processed"))?;
                    let entry = ProcessedEntry { expires_ms, msg_id: None };
                    let bytes = postcard::to_allocvec(&entry).expect("store entries are plain serialisable data");
                    rewritten.push((h, sealer.seal("processed", &h, &bytes)));
                }
                for (h, sealed) in rewritten {
                    processed.insert(h, sealed.as_slice()).map_err(|e| db_err(path, e))?;
                }
            }
            // The jobs table is made when the first job is written.
            4 => {}
            // No store was ever written with a schema before 1.
            _ => return Err(StoreError::NotAStore(path.to_owned())),
        }
    }
    meta.insert("schema_version", sealer.seal("meta", b"schema_version", &SCHEMA_VERSION.to_be_bytes()).as_slice())
        .map_err(|e| db_err(path, e))?;
    meta.insert("oldest_reader", sealer.seal("meta", b"oldest_reader", &OLDEST_READER.to_be_bytes()).as_slice())
        .map_err(|e| db_err(path, e))?;
    Ok(())
}

/// The oldest schema that reads this store (`oldest_reader` in meta); stores written before it
/// was kept are read only by their own schema and newer.
pub(crate) fn oldest_reader(
    path: &Path,
    sealer: &Sealer,
    meta: &impl ReadableTable<&'static str, &'static [u8]>,
    version: u32,
) -> Result<u32, StoreError> {
    if meta.get("oldest_reader").map_err(|e| db_err(path, e))?.is_none() {
        return Ok(version);
    }
    let raw = read_meta(path, sealer, meta, "oldest_reader")?;
    Ok(u32::from_be_bytes(raw.try_into().map_err(|_| decode(path, "meta"))?))
}

/// The most redb keeps of the file in memory (read cache and write buffer together). The working
/// set is small (recent ids, a few pending messages, recent history), and a page that is not here
/// is read from the kernel's page cache; a bounded cache keeps the agent's memory small however
/// large the file grows (issue 24: with 16 MiB, anonymous memory followed the file's size).
pub const CACHE_BYTES: usize = 4 * 1024 * 1024;

/// Every handle on the store file uses redb's single-writer mode: one agent writes while
/// backups read consistent snapshots from other processes.
pub(crate) fn builder() -> redb::Builder {
    let mut b = Database::builder();
    b.set_concurrency_mode(redb::ConcurrencyMode::SingleWriter);
    b.set_cache_size(CACHE_BYTES);
    b
}

/// A store file opened without writing to it.
pub(crate) enum ReadView {
    /// A clean file, on a read-only handle (beside a running agent, if there is one).
    Clean(redb::ReadOnlyDatabase),
    /// A file left dirty by a crash, repaired in memory only (see `overlay`); while it is open
    /// no other process can write the file.
    Repaired(Database),
}

impl ReadView {
    pub(crate) fn begin_read(&self) -> Result<redb::ReadTransaction, redb::TransactionError> {
        match self {
            ReadView::Clean(db) => db.begin_read(),
            ReadView::Repaired(db) => db.begin_read(),
        }
    }
}

/// Open a store file for reading, whatever state it is in, without changing a byte of it. A
/// clean file (the usual case) costs a read-only open; only a dirty one is repaired, in memory.
pub(crate) fn open_unwritten(path: &Path) -> Result<ReadView, StoreError> {
    let corrupt = |e: redb::DatabaseError| match e {
        redb::DatabaseError::Storage(redb::StorageError::Corrupted(_)) => StoreError::NotAStore(path.to_owned()),
        e => db_err(path, e),
    };
    match builder().open_read_only(path) {
        Ok(db) => Ok(ReadView::Clean(db)),
        Err(redb::DatabaseError::RepairAborted) => {
            Ok(ReadView::Repaired(overlay::open(path, &builder()).map_err(corrupt)?))
        }
        Err(e) => Err(corrupt(e)),
    }
}

/// Check `sealer`'s key against the store at `path` without writing to the file.
fn check_key_unwritten(path: &Path, sealer: &Sealer) -> Result<(), StoreError> {
    let view = open_unwritten(path)?;
    if let ReadView::Repaired(_) = view {
        log::info!("store {} was not closed cleanly; its key is checked before the file is repaired", path.display());
    }
    let txn = view.begin_read().map_err(|e| db_err(path, e))?;
    let meta = match txn.open_table(META) {
        Ok(meta) => meta,
        Err(redb::TableError::TableDoesNotExist(_)) => return Err(StoreError::NotAStore(path.to_owned())),
        Err(e) => return Err(db_err(path, e)),
    };
    check_key(path, sealer, &meta)?;
    // A store this build cannot run on is refused before the file is written, too.
    if meta.get("schema_version").map_err(|e| db_err(path, e))?.is_some() {
        let raw = read_meta(path, sealer, &meta, "schema_version")?;
        let version = u32::from_be_bytes(raw.try_into().map_err(|_| decode(path, "meta"))?);
        if !readable(SCHEMA_VERSION, version, oldest_reader(path, sealer, &meta, version)?) {
            return Err(StoreError::Newer { path: path.to_owned(), found: version });
        }
    }
    Ok(())
}

/// The keyed hash that stands for `id` as a redb key: HMAC-SHA256 under the index secret,
/// domain-separated, truncated to 128 bits.
fn keyed_hash(index: &ring::hmac::Key, domain: &str, id: &str) -> Hashed {
    let mut ctx = ring::hmac::Context::with_key(index);
    ctx.update(domain.as_bytes());
    ctx.update(&[0]);
    ctx.update(id.as_bytes());
    let tag = ctx.sign();
    let mut h = [0u8; 16];
    h.copy_from_slice(&tag.as_ref()[..16]);
    h
}

/// A fresh index secret.
fn new_index_secret() -> zeroize::Zeroizing<[u8; 32]> {
    let mut s = zeroize::Zeroizing::new([0u8; 32]);
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut s[..])
        .expect("the OS random source is available");
    s
}

pub(crate) fn db_err(path: &Path, e: impl Into<redb::Error>) -> StoreError {
    let e: redb::Error = e.into();
    let reason = match &e {
        redb::Error::DatabaseAlreadyOpen => "another zhuli process has the store open; stop it first".to_owned(),
        redb::Error::Io(io) => format!("{io}; check that the state directory is writable and has free space"),
        other => other.to_string(),
    };
    StoreError::Db { path: path.to_owned(), reason }
}

pub(crate) fn decode(path: &Path, table: &'static str) -> StoreError {
    StoreError::Decode { path: path.to_owned(), table }
}

fn check_key(
    path: &Path,
    sealer: &Sealer,
    meta: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<(), StoreError> {
    let got = meta.get("key_check").map_err(|e| db_err(path, e))?;
    let Some(v) = got else { return Err(StoreError::NoKeyCheck(path.to_owned())) };
    match sealer.open("meta", b"key_check", v.value()) {
        Ok(p) if p == KEY_CHECK => Ok(()),
        _ => Err(StoreError::WrongKey(path.to_owned())),
    }
}

pub(crate) fn read_meta(
    path: &Path,
    sealer: &Sealer,
    meta: &impl ReadableTable<&'static str, &'static [u8]>,
    name: &'static str,
) -> Result<Vec<u8>, StoreError> {
    let v = meta.get(name).map_err(|e| db_err(path, e))?.ok_or_else(|| decode(path, "meta"))?;
    sealer
        .open("meta", name.as_bytes(), v.value())
        .map_err(|source| StoreError::Sealed { path: path.to_owned(), source })
}

#[cfg(test)]
mod tests;
