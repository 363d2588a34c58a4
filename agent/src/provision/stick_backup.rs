//! The third copy of the store's snapshots, by the 3-2-1 rule: the provisioning stick. At every
//! insertion (after the import and the diagnostics) the newest snapshot on the box — by its
//! backup number — goes into `zhuli-backups/<snapshot>/` on the stick, unless it is there already;
//! it is then read back into a scratch folder on the box and verified with the store key, as a
//! restore would; the newest `[backup] stick_keep` are kept there. What came of it is kept in
//! [`RECORD`] in the provisioning root, for the agent to show, and said on the receipt.
//!
//! A copy is written as `<snapshot>.part` and renamed when whole ([`stick::write_whole_folder`]),
//! so a stick pulled out meanwhile never holds a snapshot that looks complete; such leftovers,
//! and snapshot folders missing a file or shorter than their manifest says, are removed at the
//! next insertion. Nothing is removed to make room unless retention would remove it once the
//! new copy is verified, and never the last copy on the stick. Never logs or writes the store
//! key; the snapshots are sealed under it, so the stick holds nothing readable without it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::stick::{self, StickError};
use crate::store::{
    backup::{self, BackupError, MANIFEST, SNAPSHOT_FILE, snapshot_order},
    key::{KeyError, StoreKey},
};

/// The stick's folder of snapshots.
pub const DIR: &str = "zhuli-backups";
/// The outcome of the last copy, in the provisioning root (readable by the agent's group).
pub const RECORD: &str = "stick-backup.json";
/// The scratch folder in the provisioning root a copy is read back into, emptied before and
/// after.
const SCRATCH: &str = "stick-backup-check";
/// FAT's largest file: 4 GiB less a byte.
const FAT_MAX_FILE: u64 = (1 << 32) - 1;
/// The largest manifest read back from the stick.
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
    #[error("the box has {} free in {}, reading the copy back needs {}", mib(*free), path.display(), mib(*needed))]
    NoScratch { path: PathBuf, needed: u64, free: u64 },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("the copy read back from the stick did not verify ({0}); it was removed from the stick")]
    Unverified(BackupError),
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
    /// Why the last insertion made no good copy, while that is so.
    pub failing: Option<String>,
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
        Ok(c) => r = StickCopy { ok_ms: Some(now_ms), name: Some(c.name.clone()), failing: None },
        Err(e) => r.failing = Some(e.to_string().chars().take(300).collect()),
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
    /// The store its manifest names, when it is complete.
    complete: Option<String>,
}

/// The snapshot folders on the stick: complete ones, and what pulled sticks and failed copies
/// left (a `.part` folder; one missing a file, or whose file is not as long as its manifest
/// says). Other folders are not snapshots and left alone.
fn on_stick(dev: &Path) -> Result<Vec<OnStick>, StickError> {
    let mut found = Vec::new();
    for folder in stick::list_subfolders(dev, DIR)? {
        let (base, part) = match folder.name.strip_suffix(stick::PARTIAL) {
            Some(base) => (base, true),
            None => (folder.name.as_str(), false),
        };
        let Some(order) = snapshot_order(base) else { continue };
        let size = |f: &str| folder.files.iter().find(|(n, _)| n == f).map(|(_, len)| *len);
        let complete = match (part, size(SNAPSHOT_FILE), size(MANIFEST)) {
            (false, Some(len), Some(_)) => {
                manifest_of(dev, &folder.name).filter(|m| m.bytes == len).map(|m| m.store_id)
            }
            _ => None,
        };
        found.push(OnStick { name: folder.name, order, complete });
    }
    found.sort_by_key(|s| s.order);
    Ok(found)
}

/// What a manifest says of its snapshot (unauthenticated: enough to tell a whole copy and
/// whose it is; [`backup::verify`] authenticates it).
#[derive(Deserialize)]
struct Claimed {
    /// Empty in the old format: no store's, so left alone.
    #[serde(default)]
    store_id: String,
    bytes: u64,
}

fn manifest_of(dev: &Path, name: &str) -> Option<Claimed> {
    let mut text = Vec::new();
    stick::copy_from_folder(dev, &format!("{DIR}/{name}"), MANIFEST, &mut text, MAX_MANIFEST).ok()?;
    serde_json::from_slice(&text).ok()
}

/// The newest snapshot in `dir` (by backup number), with its manifest.
fn newest_local(dir: &Path) -> Result<(String, PathBuf), StickBackupError> {
    let none = || StickBackupError::NoSnapshot(dir.to_owned());
    let entries = std::fs::read_dir(dir).map_err(|_| none())?;
    entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let order = snapshot_order(&name)?;
            e.path().join(MANIFEST).is_file().then(|| (order, name, e.path()))
        })
        .max_by_key(|(order, ..)| *order)
        .map(|(_, name, path)| (name, path))
        .ok_or_else(none)
}

fn file_len(path: &Path) -> Result<u64, StickBackupError> {
    std::fs::metadata(path).map(|m| m.len()).map_err(|source| StickBackupError::Io { path: path.to_owned(), source })
}

/// Copy the newest snapshot in `local` (the box's `<state_dir>/backups`) onto the stick `dev`,
/// verify the copy with the store key (`load_key`, asked only once there is a snapshot; the copy
/// is read back into a scratch folder under `root`), keep the newest `keep` of this store there.
/// Another store's snapshots on the stick (another box's) are left alone.
pub fn copy(
    dev: &Path,
    local: &Path,
    root: &Path,
    load_key: impl FnOnce() -> Result<StoreKey, KeyError>,
    keep: usize,
) -> Result<Copied, StickBackupError> {
    let keep = keep.max(1);
    let (name, snapshot) = newest_local(local)?;
    let key = &load_key()?;
    let seq = snapshot_order(&name).map_or(0, |(seq, _)| seq);
    let files = [SNAPSHOT_FILE, MANIFEST].map(|f| (f.to_owned(), snapshot.join(f)));
    let bytes = file_len(&files[0].1)?;
    let manifest = file_len(&files[1].1)?;
    if bytes > FAT_MAX_FILE {
        return Err(StickBackupError::TooLarge(bytes));
    }
    let ours = std::fs::read(&files[1].1)
        .ok()
        .and_then(|t| serde_json::from_slice::<Claimed>(&t).ok())
        .map(|m| m.store_id)
        .unwrap_or_default();
    let path = format!("{DIR}/{name}");
    // This store's complete copies on the stick, oldest first.
    let copies = |dev: &Path| -> Result<Vec<OnStick>, StickError> {
        Ok(on_stick(dev)?.into_iter().filter(|s| s.complete.as_deref() == Some(&ours)).collect())
    };

    let mut partial = 0;
    for s in on_stick(dev)?.iter().filter(|s| s.complete.is_none()) {
        log::info!("provisioning: removing the partial copy {DIR}/{} from the stick", s.name);
        stick::remove_folder(dev, &format!("{DIR}/{}", s.name))?;
        partial += 1;
    }
    let present = copies(dev)?.iter().any(|s| s.name == name);
    let scratch = root.join(SCRATCH);
    let checked = |dev: &Path| read_back_and_verify(dev, &path, &scratch, bytes + manifest, key);
    let already = present
        && match checked(dev) {
            Ok(()) => true,
            Err(StickBackupError::Unverified(e)) => {
                log::warn!("provisioning: the copy {path} on the stick does not verify ({e}); writing it again");
                false
            }
            Err(e) => return Err(e),
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
        if let Err(e) = checked(dev) {
            if matches!(e, StickBackupError::Unverified(_)) {
                let _ = stick::remove_folder(dev, &path);
            }
            return Err(e);
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

/// Read folder `path` of the stick into `scratch` (emptied before and after) and verify it.
fn read_back_and_verify(
    dev: &Path,
    path: &str,
    scratch: &Path,
    bytes: u64,
    key: &StoreKey,
) -> Result<(), StickBackupError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| StickBackupError::Io { path, source }
    };
    let _ = std::fs::remove_dir_all(scratch);
    std::fs::create_dir_all(scratch).map_err(io(scratch))?;
    if let Ok(s) = nix::sys::statvfs::statvfs(scratch) {
        let free = s.blocks_available() * s.fragment_size();
        if free < bytes + BOX_RESERVE {
            let _ = std::fs::remove_dir_all(scratch);
            return Err(StickBackupError::NoScratch { path: scratch.to_owned(), needed: bytes + BOX_RESERVE, free });
        }
    }
    let checked = (|| {
        let dir = scratch.join(path.rsplit('/').next().unwrap_or(path));
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        for file in [SNAPSHOT_FILE, MANIFEST] {
            let local = dir.join(file);
            let mut out = std::fs::File::create(&local).map_err(io(&local))?;
            match stick::copy_from_folder(dev, path, file, &mut out, FAT_MAX_FILE) {
                Ok(_) => {}
                // A file missing or cut short on the stick: the copy is bad, not the stick.
                Err(StickError::Io(why) | StickError::Changed { file: why }) => {
                    return Err(StickBackupError::Unverified(BackupError::Io {
                        path: PathBuf::from(format!("{path}/{file}")),
                        source: std::io::Error::other(why),
                    }));
                }
                Err(e) => return Err(e.into()),
            }
        }
        backup::verify(&dir, key).map(drop).map_err(StickBackupError::Unverified)
    })();
    let _ = std::fs::remove_dir_all(scratch);
    checked
}
