//! The third copy of the store's snapshots, by the 3-2-1 rule: the provisioning stick. At every
//! insertion (after the import and the diagnostics) the newest snapshot on the box — by its
//! backup number — goes into `zhuli-backups/<snapshot>/` on the stick, unless it is there already.
//! This runs as root while the snapshot is the agent's: it is copied into a scratch folder of
//! root's without following a symbolic link and verified there with the store key, before
//! anything is written to the stick; that verified copy is what is written, then read back and
//! compared byte for byte; the newest `[backup] stick_keep` are kept there. What came of it is
//! kept in [`RECORD`] in the provisioning root, for the agent to show, and said on the receipt.
//!
//! A copy is written as `<snapshot>.part` and renamed when whole ([`stick::write_whole_folder`]),
//! so a stick pulled out meanwhile never holds a snapshot that looks complete; such leftovers,
//! and snapshot folders whose manifest was read and whose file is missing or not as long as it
//! says, are removed at the next insertion. A manifest that cannot be read stops the copy with the
//! stick as it is; a folder under a snapshot's name without a manifest is not one a box wrote
//! and is left alone. Nothing is removed to make room unless retention would remove it once the
//! new copy is verified, and never the last copy on the stick. Never logs or writes the store
//! key; the snapshots are sealed under it, so the stick holds nothing readable without it.

use std::path::{Path, PathBuf};

use rust_i18n::t;
use serde::{Deserialize, Serialize};

use super::stick::{self, StickError};
use crate::store::{
    backup::{self, BackupError, MANIFEST, SNAPSHOT_FILE, Verified, snapshot_order},
    key::{KeyError, StoreKey},
};

/// The stick's folder of snapshots.
pub const DIR: &str = "zhuli-backups";
/// The outcome of the last copy, in the provisioning root (readable by the agent's group).
pub const RECORD: &str = "stick-backup.json";
/// The scratch folder in the provisioning root the snapshot is copied into and verified in,
/// emptied before and removed after.
const SCRATCH: &str = "stick-backup-check";
/// FAT's largest file: 4 GiB less a byte.
const FAT_MAX_FILE: u64 = (1 << 32) - 1;
/// The largest manifest read, from the box or the stick.
const MAX_MANIFEST: u64 = 64 * 1024;
/// Room left on the box beside the scratch copy.
const BOX_RESERVE: u64 = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum StickBackupError {
    #[error("no snapshot on the box yet in {0} (the nightly backup takes one; `/备份 now` takes one at once)")]
    NoSnapshot(PathBuf),
    #[error("the store key cannot be loaded ({0})")]
    Key(#[from] KeyError),
    #[error(transparent)]
    Stick(#[from] StickError),
    #[error(
        "the stick has {} free, the snapshot needs {}: make {} of room on it (or use a bigger stick); the copies on it were kept",
        mib(*free),
        mib(*needed),
        mib(needed - free)
    )]
    NoRoom { needed: u64, free: u64 },
    #[error("the snapshot file is {} and a FAT stick holds files of less than 4 GiB", mib(*.0))]
    TooLarge(u64),
    #[error("the box has {} free in {}, verifying the snapshot there needs {}", mib(*free), path.display(), mib(*needed))]
    NoScratch { path: PathBuf, needed: u64, free: u64 },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{} is refused: {why} (a snapshot is a folder of regular files); nothing was written to the stick", path.display())]
    Refused { path: PathBuf, why: String },
    #[error(
        "the box's newest snapshot {name} does not verify with the store key ({source}); nothing was written to the stick"
    )]
    LocalUnverified { name: String, source: BackupError },
    #[error(
        "{DIR}/{name}/{MANIFEST} on the stick cannot be read ({source}); the copies on the stick were left as they are"
    )]
    Unreadable { name: String, source: StickError },
    #[error(
        "{DIR}/{0} on the stick is not a copy this box can check (no manifest of this store in it); move it off the stick, then plug the stick in again"
    )]
    Occupied(String),
    #[error("the copy read back from the stick is not the snapshot ({0}); it was removed from the stick")]
    Unverified(String),
}

impl StickBackupError {
    /// Why, in a few words of Simplified Chinese, for the admin chat (`/备份`); the English text
    /// is the operator's, on the receipt and in the journal.
    pub fn zh(&self) -> String {
        const ZH: &str = "zh-CN";
        let text = match self {
            StickBackupError::NoSnapshot(_) => t!("stick_backup.no_snapshot", locale = ZH),
            StickBackupError::Key(_) => t!("stick_backup.key", locale = ZH),
            StickBackupError::Stick(_) => t!("stick_backup.stick", locale = ZH),
            StickBackupError::NoRoom { needed, free } => t!(
                "stick_backup.no_room",
                locale = ZH,
                free = mib(*free),
                needed = mib(*needed),
                more = mib(needed - free)
            ),
            StickBackupError::TooLarge(bytes) => t!("stick_backup.too_large", locale = ZH, size = mib(*bytes)),
            StickBackupError::NoScratch { needed, free, .. } => {
                t!("stick_backup.no_scratch", locale = ZH, free = mib(*free), needed = mib(*needed))
            }
            StickBackupError::Io { .. } => t!("stick_backup.io", locale = ZH),
            StickBackupError::Refused { .. } => t!("stick_backup.refused", locale = ZH),
            StickBackupError::LocalUnverified { name, .. } => {
                t!("stick_backup.local_unverified", locale = ZH, name = name)
            }
            StickBackupError::Unreadable { name, .. } => {
                t!("stick_backup.unreadable", locale = ZH, path = format!("{DIR}/{name}"))
            }
            StickBackupError::Occupied(name) => {
                t!("stick_backup.occupied", locale = ZH, path = format!("{DIR}/{name}"))
            }
            StickBackupError::Unverified(_) => t!("stick_backup.unverified", locale = ZH),
        };
        text.into_owned()
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / 1048576.0)
}

/// What a copy did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copied {
    pub name: String,
    pub seq: u64,
    pub bytes: u64,
    /// It was on the stick already (verified again, not written).
    pub already: bool,
    /// Snapshots on the stick now.
    pub kept: usize,
    /// Older copies removed, and partial ones.
    pub removed: usize,
    pub partial: usize,
}

impl Copied {
    /// The receipt's line.
    pub fn line(&self) -> String {
        let how = if self.already { "on the stick already, verified again" } else { "copied and verified" };
        let mut line = format!(
            "{DIR}/{} (backup {}, {}) {how} with the store key; {} kept on this stick",
            self.name,
            self.seq,
            mib(self.bytes),
            self.kept
        );
        if self.removed > 0 {
            line.push_str(&format!(", {} older removed", self.removed));
        }
        if self.partial > 0 {
            line.push_str(&format!(", {} partial copies removed", self.partial));
        }
        line
    }

    /// Whether the copies on the stick changed.
    pub fn changed(&self) -> bool {
        !self.already || self.removed > 0 || self.partial > 0
    }
}

/// The last copy to a stick, as the agent shows it (`/备份`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StickCopy {
    /// When the last good copy was made or verified (ms since 1970).
    pub ok_ms: Option<i64>,
    /// Its snapshot's name.
    pub name: Option<String>,
    /// Why the last insertion made no good copy, while that is so (English, as on the receipt).
    pub failing: Option<String>,
    /// The same in a few words of Simplified Chinese, for the admin chat.
    #[serde(default)]
    pub failing_zh: Option<String>,
}

/// The record of the last copy to a stick, in the provisioning root `root` (the parent of
/// `current/`, [`super::root_of`] of the configuration's path); `None` before the first.
pub fn last(root: &Path) -> Option<StickCopy> {
    serde_json::from_slice(&std::fs::read(root.join(RECORD)).ok()?).ok()
}

/// Keep `outcome` in the record, the last good copy kept through a failure.
pub fn record(root: &Path, outcome: &Result<Copied, StickBackupError>, now_ms: i64) {
    let mut r = last(root).unwrap_or_default();
    match outcome {
        Ok(c) => r = StickCopy { ok_ms: Some(now_ms), name: Some(c.name.clone()), failing: None, failing_zh: None },
        Err(e) => {
            r.failing = Some(e.to_string().chars().take(300).collect());
            r.failing_zh = Some(e.zh());
        }
    }
    let path = root.join(RECORD);
    let written = serde_json::to_vec_pretty(&r)
        .map_err(std::io::Error::other)
        .and_then(|json| super::write_file(&path, &json, 0o640));
    match written {
        Ok(()) => super::group_readable(&path),
        Err(e) => log::warn!("provisioning: cannot keep the stick backup's outcome for the agent: {e}"),
    }
}

/// Forget the record (copies to sticks are turned off).
pub fn forget(root: &Path) {
    let _ = std::fs::remove_file(root.join(RECORD));
}

/// A snapshot folder on the stick.
struct OnStick {
    name: String,
    order: (u64, u64),
    state: Found,
}

/// What a snapshot folder on the stick is, by its name, its entries and its manifest.
#[derive(Debug, PartialEq, Eq)]
enum Found {
    /// Whole: its file as long as its manifest says; the store the manifest names.
    Whole(String),
    /// What a pulled stick or a failed copy left: a `.part` folder, or one whose manifest was
    /// read and whose file is missing or not as long as the manifest says. Removed.
    Broken,
    /// A folder under a snapshot's name without a manifest that can be taken for one (none, one
    /// too long, one that is not a manifest when read). A copy is renamed to its name only once
    /// whole, so this is not what a box left: left alone.
    Unknown,
}

impl OnStick {
    fn of(&self, store: &str) -> bool {
        matches!(&self.state, Found::Whole(s) if s == store)
    }
}

/// The snapshot folders on the stick, oldest first. Other folders are not snapshots and left
/// alone. A manifest that cannot be read (a failing stick, or one pulled out) stops it: a folder
/// is only taken for a broken copy, to be removed, on what was read of it.
fn on_stick(dev: &Path) -> Result<Vec<OnStick>, StickBackupError> {
    let mut found = Vec::new();
    for folder in stick::list_subfolders(dev, DIR)? {
        let (base, part) = match folder.name.strip_suffix(stick::PARTIAL) {
            Some(base) => (base, true),
            None => (folder.name.as_str(), false),
        };
        let Some(order) = snapshot_order(base) else { continue };
        let size = |f: &str| folder.files.iter().find(|(n, _)| n == f).map(|(_, len)| *len);
        let state = match size(MANIFEST) {
            _ if part => Found::Broken,
            Some(len) if len <= MAX_MANIFEST => match manifest_of(dev, &folder.name) {
                Ok(Some(m)) if size(SNAPSHOT_FILE) == Some(m.bytes) => Found::Whole(m.store_id),
                Ok(Some(_)) => Found::Broken,
                Ok(None) => Found::Unknown,
                Err(source) => return Err(StickBackupError::Unreadable { name: folder.name, source }),
            },
            _ => Found::Unknown,
        };
        found.push(OnStick { name: folder.name, order, state });
    }
    found.sort_by_key(|s| s.order);
    Ok(found)
}

/// What a manifest says of its snapshot (unauthenticated: enough to tell a whole copy and
/// whose it is; the copy is compared with a verified snapshot before it counts).
#[derive(Deserialize)]
struct Claimed {
    /// Empty in the old format: no store's, so left alone.
    #[serde(default)]
    store_id: String,
    bytes: u64,
}

/// The manifest of folder `name` on the stick; `None` when it is not one.
fn manifest_of(dev: &Path, name: &str) -> Result<Option<Claimed>, StickError> {
    let mut text = Vec::new();
    stick::copy_from_folder(dev, &format!("{DIR}/{name}"), MANIFEST, &mut text, MAX_MANIFEST)?;
    Ok(serde_json::from_slice(&text).ok())
}

/// The newest snapshot's name in `dir` (by backup number).
fn newest_local(dir: &Path) -> Result<String, StickBackupError> {
    let none = || StickBackupError::NoSnapshot(dir.to_owned());
    let entries = std::fs::read_dir(dir).map_err(|_| none())?;
    entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let order = snapshot_order(&name)?;
            e.path().join(MANIFEST).is_file().then_some((order, name))
        })
        .max_by_key(|(order, _)| *order)
        .map(|(_, name)| name)
        .ok_or_else(none)
}

fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> StickBackupError + '_ {
    move |source| StickBackupError::Io { path: path.to_owned(), source }
}

fn file_len(path: &Path) -> Result<u64, StickBackupError> {
    std::fs::metadata(path).map(|m| m.len()).map_err(io_at(path))
}

/// Root's scratch folder in the provisioning root, emptied when made and removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(path: PathBuf) -> Result<Scratch, StickBackupError> {
        use std::os::unix::fs::DirBuilderExt;
        let _ = std::fs::remove_dir_all(&path);
        std::fs::DirBuilder::new().mode(0o700).create(&path).map_err(io_at(&path))?;
        Ok(Scratch(path))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Copy snapshot `name` of the box's backups folder `local` into `into` (a new folder in root's
/// scratch folder), to be verified there and copied from there onto the stick; the snapshot
/// file's and the manifest's lengths.
///
/// The backups folder is the agent's, and this runs as root: nothing is followed through a
/// symbolic link. The backups folder (its last component), the snapshot's folder and its two
/// files are opened with `O_NOFOLLOW`, each relative to the handle of the one before, and the
/// files must be regular files of one link, as the handles the bytes are then read from say —
/// so whatever is swapped in meanwhile is refused, or is a file the agent could read anyway.
fn stage(local: &Path, name: &str, into: &Path) -> Result<(u64, u64), StickBackupError> {
    use std::os::unix::fs::MetadataExt;

    use nix::{
        errno::Errno,
        fcntl::{OFlag, open, openat},
        sys::stat::Mode,
    };
    let failed = |path: &Path| {
        let path = path.to_owned();
        move |e: Errno| match e {
            Errno::ELOOP | Errno::ENOTDIR => {
                StickBackupError::Refused { path, why: "a symbolic link, or not a folder".into() }
            }
            e => StickBackupError::Io { path, source: e.into() },
        }
    };
    let folder_flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    // Not blocking: a named pipe is refused, not waited on.
    let file_flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
    let backups = open(local, folder_flags, Mode::empty()).map_err(failed(local))?;
    let snapshot = local.join(name);
    let folder = openat(&backups, name, folder_flags, Mode::empty()).map_err(failed(&snapshot))?;
    let mut opened = Vec::new();
    for file in [SNAPSHOT_FILE, MANIFEST] {
        let path = snapshot.join(file);
        let handle = std::fs::File::from(openat(&folder, file, file_flags, Mode::empty()).map_err(failed(&path))?);
        let meta = handle.metadata().map_err(io_at(&path))?;
        if !meta.is_file() {
            return Err(StickBackupError::Refused { path, why: "not a regular file".into() });
        }
        if meta.nlink() != 1 {
            let why = format!("a file of {} links (a hard link to another file?)", meta.nlink());
            return Err(StickBackupError::Refused { path, why });
        }
        opened.push((file, path, handle, meta.len()));
    }
    let (bytes, manifest) = (opened[0].3, opened[1].3);
    if bytes > FAT_MAX_FILE {
        return Err(StickBackupError::TooLarge(bytes));
    }
    if manifest > MAX_MANIFEST {
        return Err(StickBackupError::Refused { path: opened[1].1.clone(), why: "too long for a manifest".into() });
    }
    let needed = bytes + manifest + BOX_RESERVE;
    if let Some(scratch) = into.parent()
        && let Ok(s) = nix::sys::statvfs::statvfs(scratch)
    {
        let free = s.blocks_available() * s.fragment_size();
        if free < needed {
            return Err(StickBackupError::NoScratch { path: scratch.to_owned(), needed, free });
        }
    }
    std::fs::create_dir(into).map_err(io_at(into))?;
    for (file, path, handle, len) in opened {
        let to = into.join(file);
        let mut out = std::fs::File::create_new(&to).map_err(io_at(&to))?;
        let copied = std::io::copy(&mut std::io::Read::take(handle, len), &mut out).map_err(io_at(&path))?;
        if copied != len {
            return Err(StickBackupError::Io { path, source: std::io::Error::other("it changed while it was read") });
        }
    }
    Ok((bytes, manifest))
}

/// A writer that compares what it is given with a file, byte for byte.
struct Same {
    file: std::io::BufReader<std::fs::File>,
    buf: Vec<u8>,
    differs: bool,
}

impl std::io::Write for Same {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        use std::io::Read;
        if !self.differs {
            self.buf.resize(bytes.len(), 0);
            self.differs = self.file.read_exact(&mut self.buf).is_err() || self.buf != bytes;
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// How folder `path` of the stick differs from the verified snapshot `staged`; `None` when it
/// holds it byte for byte (and so verifies with the store key as it did). The length of each
/// file on the stick, as its entry says, is compared with the snapshot's first, and no more than
/// that is read. A read that fails is an error, not a difference: the copy is left as it is.
fn differs(dev: &Path, path: &str, staged: &Path) -> Result<Option<String>, StickBackupError> {
    let entries = stick::files_in(dev, path)?.unwrap_or_default();
    let mut expected = Vec::new();
    for file in [SNAPSHOT_FILE, MANIFEST] {
        let len = file_len(&staged.join(file))?;
        match entries.iter().find(|(n, _)| n == file) {
            None => return Ok(Some(format!("its {file} is missing"))),
            Some((_, found)) if *found != len => {
                return Ok(Some(format!("its {file} is {found} bytes, the snapshot's {len}")));
            }
            Some(_) => expected.push((file, len)),
        }
    }
    for (file, len) in expected {
        let local = staged.join(file);
        let opened = std::fs::File::open(&local).map_err(io_at(&local))?;
        let mut same = Same { file: std::io::BufReader::new(opened), buf: Vec::new(), differs: false };
        stick::copy_from_folder(dev, path, file, &mut same, len)?;
        if same.differs {
            return Ok(Some(format!("its {file} holds other bytes")));
        }
    }
    Ok(None)
}

/// Copy the newest snapshot in `local` (the box's `<state_dir>/backups`) onto the stick `dev`
/// and keep the newest `keep` of this store there. The snapshot is first copied into a scratch
/// folder under `root`, never through a symbolic link, and verified there with the store key
/// (`load_key`, asked only once there is a snapshot): nothing is written to the stick before,
/// and what is written is that verified copy. The copy on the stick is then read back and
/// compared with it byte for byte. Another store's snapshots on the stick (another box's) are
/// left alone.
pub fn copy(
    dev: &Path,
    local: &Path,
    root: &Path,
    load_key: impl FnOnce() -> Result<StoreKey, KeyError>,
    keep: usize,
) -> Result<Copied, StickBackupError> {
    let keep = keep.max(1);
    let name = newest_local(local)?;
    let key = &load_key()?;
    let seq = snapshot_order(&name).map_or(0, |(seq, _)| seq);
    let scratch = Scratch::new(root.join(SCRATCH))?;
    let staged = scratch.0.join(&name);
    let (bytes, _) = stage(local, &name, &staged)?;
    let ours = match backup::verify(&staged, key) {
        Ok(Verified::Bound(m)) => m.store_id,
        Ok(Verified::Legacy { .. }) => String::new(),
        Err(source) => return Err(StickBackupError::LocalUnverified { name, source }),
    };
    let files = [SNAPSHOT_FILE, MANIFEST].map(|f| (f.to_owned(), staged.join(f)));
    let manifest = file_len(&files[1].1)?;
    let path = format!("{DIR}/{name}");
    // This store's complete copies on the stick, oldest first.
    let copies = |dev: &Path| -> Result<Vec<OnStick>, StickBackupError> {
        Ok(on_stick(dev)?.into_iter().filter(|s| s.of(&ours)).collect())
    };

    let found = on_stick(dev)?;
    if found.iter().any(|s| s.name == name && s.state != Found::Broken && !s.of(&ours)) {
        return Err(StickBackupError::Occupied(name));
    }
    let mut partial = 0;
    for s in found.iter().filter(|s| s.state == Found::Broken) {
        log::info!("provisioning: removing the partial copy {DIR}/{} from the stick", s.name);
        stick::remove_folder(dev, &format!("{DIR}/{}", s.name))?;
        partial += 1;
    }
    let present = found.iter().any(|s| s.name == name && s.of(&ours));
    let already = present
        && match differs(dev, &path, &staged)? {
            None => true,
            Some(why) => {
                log::warn!("provisioning: the copy {path} on the stick is not the snapshot ({why}); writing it again");
                false
            }
        };
    let mut removed = 0;
    if !already {
        if present {
            stick::remove_folder(dev, &path)?;
        }
        let space = stick::space(dev)?;
        // The two files, the new folder, and a cluster more should the backups folder be new
        // or grow.
        let needed = space.taken_by(bytes) + space.taken_by(manifest) + 2 * space.cluster;
        let mut free = space.free;
        if free < needed {
            // What retention removes once the new copy is verified may go first; never the last
            // copy on the stick.
            let old = copies(dev)?;
            let doomed = old.len().saturating_sub(keep - 1).min(old.len().saturating_sub(1));
            for s in &old[..doomed] {
                if free >= needed {
                    break;
                }
                log::info!("provisioning: removing {DIR}/{} from the stick to make room", s.name);
                stick::remove_folder(dev, &format!("{DIR}/{}", s.name))?;
                removed += 1;
                free = stick::space(dev)?.free;
            }
        }
        if free < needed {
            return Err(StickBackupError::NoRoom { needed, free });
        }
        stick::write_whole_folder(dev, &path, &files)?;
        if let Some(why) = differs(dev, &path, &staged)? {
            let _ = stick::remove_folder(dev, &path);
            return Err(StickBackupError::Unverified(why));
        }
    }
    // Verified: the oldest beyond `keep` go, never this one.
    let old: Vec<OnStick> = copies(dev)?.into_iter().filter(|s| s.name != name).collect();
    let excess = (old.len() + 1).saturating_sub(keep);
    for s in &old[..excess] {
        stick::remove_folder(dev, &format!("{DIR}/{}", s.name))?;
        removed += 1;
    }
    Ok(Copied { name, seq, bytes, already, kept: old.len() - excess + 1, removed, partial })
}
