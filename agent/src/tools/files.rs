//! The `files` tools: list, read, search, write, move and delete files inside allow-listed roots.
//!
//! Paths are written `root/relative/path`, the first part naming a root from
//! `[tools.files.roots]`. Confinement: a `..` part is refused outright; every path is
//! canonicalised and must stay under its root's canonical path, so a symbolic link leading out
//! is refused; files are opened without following a final symbolic link; new files are written
//! to a fresh temporary file and renamed into place. Reads, writes, listings and searches are
//! capped in size. Writes, moves and deletes keep what they replace (in the state directory) so
//! `/undo` can put it back.
//!
//! The folders themselves are checked when the agent starts and by `zhuli doctor`
//! ([`check_folders`]): each writable root must exist, be a folder and take a new file — as the
//! agent's user, in the agent's mount namespace, so the check really creates and removes one
//! (`access(2)` says yes to root, and knows nothing of a read-only bind mount such as systemd's
//! `ProtectSystem=strict` makes) — and the read-only inbox must be readable. A root that is
//! missing or not a folder is left out; calls naming it are refused with the reason.

use std::{
    collections::{BTreeMap, VecDeque},
    fs,
    io::{Read, Write},
    os::unix::{ffi::OsStrExt, fs::OpenOptionsExt},
    path::{Path, PathBuf},
    sync::Arc,
};

use rust_i18n::t;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{BoxFuture, Context, Outcome, Risk, Tool, ToolError, sha256_hex};
use crate::store::seal::FileSealer;

/// `[tools.files]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FilesSettings {
    /// Root name → directory. No roots, no file access.
    pub roots: BTreeMap<String, PathBuf>,
    pub max_read_bytes: usize,
    pub max_write_bytes: usize,
    /// Entries a listing or search returns, at most.
    pub max_results: usize,
    /// Copies kept for undo (what a write replaced, what a delete removed) are removed after
    /// this many days…
    pub undo_keep_days: u32,
    /// …and, oldest first, while together they take more than this many MiB.
    pub undo_keep_mib: u64,
}

impl Default for FilesSettings {
    fn default() -> Self {
        FilesSettings {
            roots: BTreeMap::new(),
            max_read_bytes: 256 * 1024,
            max_write_bytes: 1024 * 1024,
            max_results: 200,
            undo_keep_days: 30,
            undo_keep_mib: 1024,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("[tools.files.roots] {name} = {path}: {reason}")]
pub struct RootError {
    name: String,
    path: PathBuf,
    reason: String,
}

/// The roots, canonicalised once at start, and where replaced files are kept for undo.
#[derive(Debug, Clone)]
pub struct Roots {
    /// name, canonical path
    roots: Vec<(String, PathBuf)>,
    /// Where files people sent are kept, one folder per person; seen as the read-only root
    /// `inbox` by that person only (see [`Roots::scoped`]).
    inbox: Option<PathBuf>,
    /// Roots the tools may read but not change (the inbox).
    read_only: Vec<String>,
    /// Configured roots that could not be opened at start, and why.
    unavailable: Vec<(String, FolderProblem)>,
    keep_dir: PathBuf,
    /// Undo copies are sealed: what a change replaced or removed is not left readable on `/var`.
    sealer: Arc<FileSealer>,
    settings: FilesSettings,
}

/// After the store key changed from `old` to `new` (`zhuli store rekey`): seal every undo copy
/// in `state_dir` under the new key, each through a temporary file that then takes its name, so
/// no copy is ever on disk in plaintext. How many were re-sealed, and how many did not open
/// under the old key (left as they are; their undo says the copy cannot be opened).
pub fn reseal_undo_copies(
    state_dir: &Path,
    old: &crate::store::key::StoreKey,
    new: &crate::store::key::StoreKey,
) -> std::io::Result<(usize, usize)> {
    let (old, new) = (FileSealer::new(old), FileSealer::new(new));
    let dir = state_dir.join("files-undo");
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((0, 0)),
        Err(e) => return Err(e),
    };
    let (mut done, mut failed) = (0, 0);
    for path in entries.flatten().map(|e| e.path()).filter(|p| p.is_file()) {
        let name = kept_name(&path).to_vec();
        // Already under the new key (a run interrupted before): nothing to do.
        if open_nofollow(&path).is_ok_and(|mut f| new.open(&name, &mut f, &mut std::io::sink()).is_ok()) {
            done += 1;
            continue;
        }
        let resealed = replace_sealed(&path, |dst| {
            std::thread::scope(|scope| {
                let (mut reader, mut writer) = std::io::pipe()?;
                let mut src = open_nofollow(&path)?;
                let (old, name) = (&old, &name);
                let opening = scope.spawn(move || old.open(name, &mut src, &mut writer).map(|_| drop(writer)));
                let sealed = new.seal(name, &mut reader, dst);
                drop(reader);
                opening.join().unwrap_or_else(|_| Err(std::io::Error::other("opening panicked")))?;
                sealed.map(drop)
            })
        });
        match resealed {
            Ok(()) => done += 1,
            Err(e) => {
                log::warn!("undo area: {} not re-sealed: {e}", path.display());
                failed += 1;
            }
        }
    }
    Ok((done, failed))
}

/// Replace the undo copy at `path` by what `fill` writes (sealed bytes): through a 0600
/// temporary file beside it that takes its name, its owner and age, or is removed on failure.
fn replace_sealed(path: &Path, fill: impl FnOnce(&mut fs::File) -> std::io::Result<()>) -> std::io::Result<()> {
    let temp = path.with_file_name(format!(".sealing-{:016x}", rand::random::<u64>()));
    let done = (|| {
        let mut dst = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&temp)?;
        fill(&mut dst)?;
        same_owner_and_age(path, &dst)?;
        dst.sync_all()?;
        fs::rename(&temp, path)
    })();
    if done.is_err() {
        let _ = fs::remove_file(&temp);
    }
    done
}

/// Give `new` (the file replacing `old`) `old`'s owner and modification time: a copy re-sealed
/// by root stays the agent's, and keeps its age for the undo area's limits.
fn same_owner_and_age(old: &Path, new: &fs::File) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::symlink_metadata(old)?;
    if nix::unistd::geteuid().is_root() {
        nix::unistd::fchown(new, Some(meta.uid().into()), Some(meta.gid().into())).map_err(std::io::Error::from)?;
    }
    new.set_modified(meta.modified()?)
}

/// The name a sealed copy is bound to: its own file name in the undo area.
fn kept_name(kept: &Path) -> &[u8] {
    kept.file_name().map(|n| n.as_bytes()).unwrap_or_default()
}

/// The read-only root of files users sent the robot.
pub const INBOX: &str = "inbox";

/// The inbox folder of `actor` under the media area (a digest, so no name can escape).
pub fn owner_dir(actor: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, actor.as_bytes());
    d.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect()
}

const SEARCH_MAX_VISITS: usize = 20_000;
const SEARCH_MAX_DEPTH: usize = 12;
const SEARCH_CONTENT_MAX_BYTES: u64 = 1024 * 1024;

fn refused(s: impl Into<String>) -> ToolError {
    ToolError::Refused(s.into())
}

fn failed(what: &str, e: std::io::Error) -> ToolError {
    ToolError::Failed(format!("{what}: {}", e.kind()))
}

impl Roots {
    /// The configured roots, plus `inbox` (read-only) when given: where files users send the
    /// robot are kept.
    pub fn open(
        settings: &FilesSettings,
        state_dir: &Path,
        inbox: Option<&Path>,
        sealer: Arc<FileSealer>,
    ) -> Result<Arc<Roots>, RootError> {
        let mut roots = Vec::new();
        let inbox = match inbox {
            Some(dir) if settings.roots.contains_key(INBOX) => {
                return Err(RootError {
                    name: INBOX.into(),
                    path: dir.to_owned(),
                    reason: "`inbox` is the name of the received-files root; choose another name".into(),
                });
            }
            Some(dir) => Some(fs::canonicalize(dir).map_err(|e| RootError {
                name: INBOX.into(),
                path: dir.to_owned(),
                reason: e.to_string(),
            })?),
            None => None,
        };
        let mut unavailable = Vec::new();
        for (name, path) in &settings.roots {
            if name.is_empty() || name.contains('/') || name == ".." || name == "." {
                return Err(RootError {
                    name: name.clone(),
                    path: path.clone(),
                    reason: "a root name must be one plain word".into(),
                });
            }
            // A folder that is not there is an operator's mistake [`check_folders`] reports;
            // it must not keep the agent (and the chat) from starting.
            match fs::canonicalize(path) {
                Ok(canon) if canon.is_dir() => roots.push((name.clone(), canon)),
                Ok(_) => unavailable.push((name.clone(), FolderProblem::NotAFolder)),
                Err(e) => unavailable.push((name.clone(), FolderProblem::reading(&e))),
            }
        }
        let keep_dir = state_dir.join("files-undo");
        fs::create_dir_all(&keep_dir).map_err(|e| RootError {
            name: "(undo area)".into(),
            path: keep_dir.clone(),
            reason: format!("{e}; the state directory must be writable"),
        })?;
        let roots =
            Roots { roots, inbox, read_only: Vec::new(), unavailable, keep_dir, sealer, settings: settings.clone() };
        // Copies past their time go first; an earlier release's plaintext ones left are sealed.
        roots.prune_kept();
        roots.seal_plain_copies();
        Ok(Arc::new(roots))
    }

    /// The roots as `actor` sees them: the configured ones plus their own inbox.
    pub fn scoped(&self, actor: &str) -> Roots {
        let mut view = self.clone();
        view.roots.retain(|(n, _)| n != INBOX);
        view.read_only.retain(|n| n != INBOX);
        if let Some(base) = &self.inbox {
            view.roots.insert(0, (INBOX.to_owned(), base.join(owner_dir(actor))));
            view.read_only.push(INBOX.to_owned());
        }
        view
    }

    fn names(&self) -> String {
        if self.roots.is_empty() {
            return "(none configured)".into();
        }
        self.roots.iter().map(|(n, _)| format!("`{n}`")).collect::<Vec<_>>().join(", ")
    }

    /// Split `root/rest` into the root and the remaining parts, refusing `..`.
    fn parts<'a>(&self, path: &'a str) -> Result<(&(String, PathBuf), Vec<&'a str>), ToolError> {
        if path.contains('\0') {
            return Err(refused("the path contains a NUL character"));
        }
        let parts: Vec<&str> = path.split(['/', '\\']).filter(|p| !p.is_empty() && *p != ".").collect();
        if parts.contains(&"..") {
            return Err(refused(format!(
                "`..` is not allowed in paths; name a path inside one of the roots: {}",
                self.names()
            )));
        }
        let Some(first) = parts.first() else {
            return Err(refused(format!("name a root first; the roots are: {}", self.names())));
        };
        if let Some((_, problem)) = self.unavailable.iter().find(|(n, _)| n == first) {
            return Err(refused(format!(
                "the root `{first}` cannot be used on this box now: its folder is {problem}; an admin has to fix it (`zhuli doctor` says how)"
            )));
        }
        let root =
            self.roots.iter().find(|(n, _)| n == first).ok_or_else(|| {
                refused(format!("`{first}` is not one of the roots this box may use: {}", self.names()))
            })?;
        Ok((root, parts[1..].to_vec()))
    }

    /// Refuse a change under a read-only root.
    fn writable(&self, path: &str) -> Result<(), ToolError> {
        let ((name, _), _) = self.parts(path)?;
        if self.read_only.contains(name) {
            return Err(refused(format!(
                "`{name}` is read-only (files people sent me); copy the file into another root first"
            )));
        }
        Ok(())
    }

    /// `inbox/…` for a file of this (scoped) view's inbox.
    pub fn inbox_path(&self, file: &Path) -> Option<String> {
        let (_, root) = self.roots.iter().find(|(n, _)| n == INBOX)?;
        let canon = fs::canonicalize(file).ok()?;
        canon.starts_with(root).then(|| self.display(&canon))
    }

    /// An existing path inside a root, canonicalised.
    fn existing(&self, path: &str) -> Result<PathBuf, ToolError> {
        let ((_, root), rest) = self.parts(path)?;
        let joined = rest.iter().fold(root.clone(), |p, part| p.join(part));
        let canon = fs::canonicalize(&joined).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound if !root.exists() => {
                refused("you have not sent me any files since I last started, so your inbox is empty")
            }
            std::io::ErrorKind::NotFound => refused(format!("`{path}` does not exist")),
            _ => failed("cannot resolve the path", e),
        })?;
        if !canon.starts_with(root) {
            return Err(refused(format!("`{path}` leads outside its root through a symbolic link; refused")));
        }
        Ok(canon)
    }

    /// A path to be created inside a root: its parent must exist inside the root, and the name
    /// itself must not be a symbolic link.
    fn new_path(&self, path: &str) -> Result<PathBuf, ToolError> {
        let ((_, root), rest) = self.parts(path)?;
        let Some((name, dirs)) = rest.split_last() else {
            return Err(refused("name a file inside the root, not the root itself"));
        };
        let parent = dirs.iter().fold(root.clone(), |p, part| p.join(part));
        let parent = fs::canonicalize(&parent).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => refused(format!("the folder for `{path}` does not exist")),
            _ => failed("cannot resolve the folder", e),
        })?;
        if !parent.starts_with(root) {
            return Err(refused(format!("`{path}` leads outside its root through a symbolic link; refused")));
        }
        let target = parent.join(name);
        if let Ok(meta) = fs::symlink_metadata(&target)
            && meta.file_type().is_symlink()
        {
            return Err(refused(format!("`{path}` is a symbolic link; refused")));
        }
        Ok(target)
    }

    /// `root/relative` for a canonical path inside a root.
    fn display(&self, canon: &Path) -> String {
        for (name, root) in &self.roots {
            if let Ok(rel) = canon.strip_prefix(root) {
                let rel = rel.to_string_lossy();
                return if rel.is_empty() { name.clone() } else { format!("{name}/{rel}") };
            }
        }
        canon.to_string_lossy().into_owned()
    }

    /// The bytes of a file inside a root (at most `max`), with its `root/…` name and file name.
    pub fn read_bytes(&self, path: &str, max: u64) -> Result<(String, String, Vec<u8>), ToolError> {
        let file = self.existing(path)?;
        let meta = fs::metadata(&file).map_err(|e| failed("cannot read the file", e))?;
        if !meta.is_file() {
            return Err(refused(format!("`{path}` is not a file")));
        }
        if meta.len() > max {
            return Err(refused(format!("`{path}` is {} bytes; at most {max} can be sent", meta.len())));
        }
        let mut buf = Vec::with_capacity(meta.len() as usize);
        open_nofollow(&file)
            .map_err(|e| failed("cannot open the file", e))?
            .take(max)
            .read_to_end(&mut buf)
            .map_err(|e| failed("cannot read the file", e))?;
        let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "file".into());
        Ok((self.display(&file), name, buf))
    }

    /// Save `bytes` as the new file `path` (a writable root; never over an existing name). Its
    /// `root/…` name and where it is, for an undo that removes it ([`Roots::remove_saved`]).
    pub fn save_new(&self, path: &str, bytes: &[u8]) -> Result<(String, PathBuf), ToolError> {
        self.writable(path)?;
        let target = self.new_path(path)?;
        place_new(&target, path, |f| f.write_all(bytes).map(|()| bytes.len() as u64))?;
        Ok((self.display(&target), target))
    }

    /// Remove a file [`Roots::save_new`] made, if it is still inside a writable root.
    pub fn remove_saved(&self, file: &Path) -> Result<String, ToolError> {
        let inside = self.roots.iter().any(|(n, root)| !self.read_only.contains(n) && file.starts_with(root));
        if !inside || fs::symlink_metadata(file).is_ok_and(|m| !m.is_file()) {
            return Err(ToolError::Failed("the saved file is no longer inside a writable root".into()));
        }
        let shown = self.display(file);
        match fs::remove_file(file) {
            Ok(()) => Ok(shown),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(format!("{shown} (already gone)")),
            Err(e) => Err(failed("cannot remove the file", e)),
        }
    }

    fn keep_path(&self) -> PathBuf {
        self.prune_kept();
        self.keep_dir.join(format!("{:016x}", rand::random::<u64>()))
    }

    /// A path an undo entry recorded is still where it was: its folder is inside a writable root
    /// and reached without a symbolic link (a folder swapped for a link since is refused).
    fn still_inside(&self, path: &Path) -> Result<(), ToolError> {
        let parent = path.parent().unwrap_or(Path::new("/"));
        let same = fs::canonicalize(parent).is_ok_and(|c| c == parent);
        let inside = self.roots.iter().any(|(n, root)| !self.read_only.contains(n) && parent.starts_with(root));
        if same && inside {
            return Ok(());
        }
        Err(refused(format!(
            "{} is no longer inside a writable root the way it was (a folder on the way was moved or replaced); not undone",
            self.display(path)
        )))
    }

    /// Keep a sealed copy of `file` in the undo area; where. On failure (a full disk) nothing is
    /// left behind and the caller changes nothing.
    fn keep_sealed(&self, file: &Path) -> std::io::Result<(PathBuf, Option<u32>)> {
        let keep = self.keep_path();
        let sealed = (|| {
            let mut src = open_nofollow(file)?;
            let mode = kept_mode(&src);
            let mut dst = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&keep)?;
            self.sealer.seal(kept_name(&keep), &mut src, &mut dst)?;
            dst.sync_all()?;
            Ok(mode)
        })();
        match sealed {
            Ok(mode) => Ok((keep, mode)),
            Err(e) => {
                let _ = fs::remove_file(&keep);
                Err(e)
            }
        }
    }

    /// Put what the sealed copy `kept` holds at `to` (over what is there when `replace`, else
    /// only where nothing is), then drop the copy. The bytes go to a temporary file beside `to`
    /// first and take its name at once; a copy that fails to open changes nothing.
    fn restore_kept(&self, kept: &Path, to: &Path, replace: bool, mode: Option<u32>) -> std::io::Result<()> {
        let temp = to.with_file_name(format!(".zhuli-{:016x}.tmp", rand::random::<u64>()));
        let placed = (|| {
            let mut src = open_nofollow(kept)?;
            // Only the agent can read the bytes while they are being opened.
            let mut dst = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
                .open(&temp)?;
            self.sealer.open(kept_name(kept), &mut src, &mut dst)?;
            dst.sync_all()?;
            if let Some(mode) = mode {
                use std::os::unix::fs::PermissionsExt;
                dst.set_permissions(fs::Permissions::from_mode(mode))?;
            }
            if replace { fs::rename(&temp, to) } else { fs::hard_link(&temp, to).and_then(|()| fs::remove_file(&temp)) }
        })();
        if placed.is_err() {
            let _ = fs::remove_file(&temp);
        }
        placed?;
        // A copy left behind by a failed removal goes with the undo area's bounds.
        let _ = fs::remove_file(kept);
        Ok(())
    }

    /// Seal the undo copies an earlier release kept in plaintext, each in place under its name.
    fn seal_plain_copies(&self) {
        let Ok(entries) = fs::read_dir(&self.keep_dir) else { return };
        let mut sealed = 0;
        for path in entries.flatten().map(|e| e.path()) {
            let mut head = [0u8; 4];
            let plain = open_nofollow(&path)
                .and_then(|mut f| f.read(&mut head))
                .is_ok_and(|n| !FileSealer::is_sealed(&head[..n]));
            if !plain || !path.is_file() {
                continue;
            }
            let done = replace_sealed(&path, |dst| {
                self.sealer.seal(kept_name(&path), &mut open_nofollow(&path)?, dst).map(drop)
            });
            match done {
                Ok(()) => sealed += 1,
                Err(e) => log::warn!("undo area: cannot seal a copy kept by an earlier release: {e}"),
            }
        }
        if sealed > 0 {
            log::info!("undo area: sealed {sealed} copies an earlier release kept in plaintext");
        }
    }

    /// Keep the undo area within `undo_keep_days` and `undo_keep_mib`: older copies go first.
    /// An undo that needed a removed copy says so, and can be dropped. Returns how many went.
    fn prune_kept(&self) -> usize {
        let Ok(entries) = fs::read_dir(&self.keep_dir) else { return 0 };
        let mut kept: Vec<(std::time::SystemTime, u64, PathBuf)> = entries
            .flatten()
            .filter_map(|e| {
                let m = e.metadata().ok()?;
                m.is_file().then(|| (m.modified().unwrap_or(std::time::UNIX_EPOCH), m.len(), e.path()))
            })
            .collect();
        kept.sort();
        let max_age = std::time::Duration::from_secs(u64::from(self.settings.undo_keep_days) * 86_400);
        let mut total: u64 = kept.iter().map(|(_, len, _)| len).sum();
        let budget = self.settings.undo_keep_mib.saturating_mul(1024 * 1024);
        let mut removed = 0;
        for (at, len, path) in kept {
            let old = at.elapsed().is_ok_and(|age| age > max_age);
            if !old && total <= budget {
                break;
            }
            if fs::remove_file(&path).is_ok() {
                total = total.saturating_sub(len);
                removed += 1;
            }
        }
        if removed > 0 {
            log::info!(
                "undo area: removed {removed} copies older than {} days or beyond {} MiB",
                self.settings.undo_keep_days,
                self.settings.undo_keep_mib
            );
        }
        removed
    }
}

/// What is wrong with a folder the files tools use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum FolderProblem {
    #[error("missing")]
    Missing,
    #[error("not a folder")]
    NotAFolder,
    #[error("not writable: permission denied")]
    WriteDenied,
    #[error("not writable: read-only file system")]
    ReadOnlyFileSystem,
    #[error("not readable: permission denied")]
    ReadDenied,
    #[error("not usable: {0}")]
    Other(String),
}

impl FolderProblem {
    /// An error finding or reading the folder.
    fn reading(e: &std::io::Error) -> FolderProblem {
        match e.kind() {
            std::io::ErrorKind::NotFound => FolderProblem::Missing,
            std::io::ErrorKind::NotADirectory => FolderProblem::NotAFolder,
            std::io::ErrorKind::PermissionDenied => FolderProblem::ReadDenied,
            _ => FolderProblem::Other(e.to_string()),
        }
    }

    /// An error creating a file in it.
    fn writing(e: &std::io::Error) -> FolderProblem {
        match e.kind() {
            std::io::ErrorKind::PermissionDenied => FolderProblem::WriteDenied,
            std::io::ErrorKind::ReadOnlyFilesystem => FolderProblem::ReadOnlyFileSystem,
            _ => FolderProblem::reading(e),
        }
    }

    /// The same for the admins' chat, in the box's language.
    pub fn said(&self) -> String {
        match self {
            FolderProblem::Missing => t!("folder.missing"),
            FolderProblem::NotAFolder => t!("folder.not_a_folder"),
            FolderProblem::WriteDenied => t!("folder.write_denied"),
            FolderProblem::ReadOnlyFileSystem => t!("folder.read_only"),
            FolderProblem::ReadDenied => t!("folder.read_denied"),
            FolderProblem::Other(e) => t!("folder.other", error = e),
        }
        .into_owned()
    }
}

/// One folder as [`check_folders`] found it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FolderCheck {
    /// The root's name; [`INBOX`] for the files people sent.
    pub name: String,
    pub path: PathBuf,
    /// The tools write there (every configured root: files tools and drive downloads); else
    /// they only read it (the inbox).
    pub writable: bool,
    pub problem: Option<FolderProblem>,
}

impl FolderCheck {
    /// `share = /srv/share: writable`, `frozen = /srv/frozen: not writable: read-only file system`.
    pub fn line(&self) -> String {
        let state = match &self.problem {
            Some(p) => p.to_string(),
            None if self.writable => "writable".into(),
            None => "readable".into(),
        };
        format!("{} = {}: {state}", self.label(), self.path.display())
    }

    fn label(&self) -> String {
        if self.writable { self.name.clone() } else { format!("{} (received files, read-only)", self.name) }
    }

    /// What to do about the problem, for `user` (the agent's user); `None` when there is none.
    pub fn fix(&self, user: &str) -> Option<String> {
        let (name, path) = (&self.name, self.path.display());
        Some(match self.problem.as_ref()? {
            FolderProblem::Missing if !self.writable => {
                "the agent makes this folder when it starts: check that state_dir is writable".into()
            }
            FolderProblem::Missing => format!(
                "create the folder for the agent's user (mkdir -p {path} && chown {user} {path}), or remove `{name}` from [tools.files.roots]"
            ),
            FolderProblem::NotAFolder => format!("point [tools.files.roots] {name} at a folder"),
            FolderProblem::WriteDenied => {
                format!(
                    "let the agent's user write there: chown {user} {path} (or give a group of {user} write access)"
                )
            }
            FolderProblem::ReadOnlyFileSystem => format!(
                "under the service this usually means the service unit does not allow writing there (ProtectSystem=strict; the configuration's import lists its folders as ReadWritePaths={path} in the unit's drop-in): import the configuration again from its stick (on the box, shared folders belong under /srv); if the disk itself is mounted read-only, remount it read-write"
            ),
            FolderProblem::ReadDenied => format!("let the agent's user read it: chown or chmod {path} for {user}"),
            FolderProblem::Other(_) => format!("check {path} and the disk it is on"),
        })
    }

    /// [`FolderCheck::fix`] for the admins' chat, in the box's language.
    pub fn fix_said(&self, user: &str) -> Option<String> {
        let (name, path) = (&self.name, self.path.display());
        Some(
            match self.problem.as_ref()? {
                FolderProblem::Missing if !self.writable => t!("folder.fix_inbox"),
                FolderProblem::Missing => t!("folder.fix_missing", path = path, user = user, name = name),
                FolderProblem::NotAFolder => t!("folder.fix_not_a_folder", name = name),
                FolderProblem::WriteDenied => t!("folder.fix_write_denied", user = user, path = path),
                FolderProblem::ReadOnlyFileSystem => t!("folder.fix_read_only", path = path),
                FolderProblem::ReadDenied => t!("folder.fix_read_denied", path = path, user = user),
                FolderProblem::Other(_) => t!("folder.fix_other", path = path),
            }
            .into_owned(),
        )
    }
}

/// The folders as one user, in one mount namespace, found them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FolderReport {
    /// The user who checked (`zhuli`, or `uid 990` without a name).
    pub user: String,
    pub uid: u32,
    pub folders: Vec<FolderCheck>,
}

impl FolderReport {
    pub fn problems(&self) -> impl Iterator<Item = &FolderCheck> {
        self.folders.iter().filter(|f| f.problem.is_some())
    }
}

/// Check every configured root (and `inbox`, the received files, when given) as this process
/// finds it: its user, its mount namespace. A writable root must exist, be a folder, be
/// readable and take a new file (one is made and removed); the inbox must be readable.
pub fn check_folders(settings: &FilesSettings, inbox: Option<&Path>) -> FolderReport {
    let mut folders: Vec<FolderCheck> = settings.roots.iter().map(|(n, p)| check_folder(n, p, true)).collect();
    if let Some(dir) = inbox {
        folders.push(check_folder(INBOX, dir, false));
    }
    let uid = nix::unistd::getuid();
    let user = nix::unistd::User::from_uid(uid).ok().flatten().map_or_else(|| format!("uid {uid}"), |u| u.name);
    FolderReport { user, uid: uid.as_raw(), folders }
}

/// One folder: see [`check_folders`].
pub fn check_folder(name: &str, path: &Path, writable: bool) -> FolderCheck {
    let problem = match fs::metadata(path) {
        Err(e) => Some(FolderProblem::reading(&e)),
        Ok(m) if !m.is_dir() => Some(FolderProblem::NotAFolder),
        Ok(_) => match fs::read_dir(path) {
            Err(e) => Some(FolderProblem::reading(&e)),
            Ok(_) if writable => try_write(path).err(),
            Ok(_) => None,
        },
    };
    FolderCheck { name: name.to_owned(), path: path.to_owned(), writable, problem }
}

/// Create and remove a file of a name nobody else uses in `dir`: the one way to know this
/// process may write there. `access(2)` answers yes to root whatever the permissions, and a
/// read-only bind mount shows only to the processes of its mount namespace.
pub fn try_write(dir: &Path) -> Result<(), FolderProblem> {
    let probe = dir.join(format!(".zhuli-write-check-{}-{:016x}", std::process::id(), rand::random::<u64>()));
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(&probe)
        .map_err(|e| FolderProblem::writing(&e))?;
    fs::remove_file(&probe)
        .map_err(|e| FolderProblem::Other(format!("the check file {} could not be removed: {e}", probe.display())))
}

/// Open for reading without following a final symbolic link.
fn open_nofollow(path: &Path) -> std::io::Result<fs::File> {
    // Non-blocking, so that a FIFO put in a file's place cannot hang the open; then only a
    // regular file is read.
    let flags = nix::fcntl::OFlag::O_NOFOLLOW | nix::fcntl::OFlag::O_NONBLOCK;
    let file = fs::OpenOptions::new().read(true).custom_flags(flags.bits()).open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file"));
    }
    Ok(file)
}

/// Rename `from` to `to` only if nothing is at `to`: a file that appears there meanwhile is
/// never replaced.
fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    use nix::fcntl::{AT_FDCWD, RenameFlags, renameat2};
    renameat2(AT_FDCWD, from, AT_FDCWD, to, RenameFlags::RENAME_NOREPLACE).map_err(std::io::Error::from)
}

/// A kept file's permission bits to restore with it (never set-id bits).
fn kept_mode(file: &fs::File) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt;
    file.metadata().ok().map(|m| m.permissions().mode() & 0o777)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    List,
    Read,
    Search,
    Write,
    Copy,
    Move,
    Delete,
}

impl Op {
    /// The tool's name, as the model and the grants in `[access.roles]` see it.
    pub fn name(self) -> &'static str {
        match self {
            Op::List => "files_list",
            Op::Read => "files_read",
            Op::Search => "files_search",
            Op::Write => "files_write",
            Op::Copy => "files_copy",
            Op::Move => "files_move",
            Op::Delete => "files_delete",
        }
    }
}

/// How to reverse a change.
#[derive(Debug, Serialize, Deserialize)]
enum Undo {
    /// A write: put the kept copy back, or remove the file if it was new — only while the file
    /// is still what the write left (`sha256`; none in entries of earlier versions).
    Write {
        path: PathBuf,
        kept: Option<PathBuf>,
        #[serde(default)]
        sha256: Option<String>,
        /// The replaced file's permission bits (none in entries of earlier versions).
        #[serde(default)]
        mode: Option<u32>,
    },
    Move {
        from: PathBuf,
        to: PathBuf,
    },
    Delete {
        path: PathBuf,
        kept: PathBuf,
        #[serde(default)]
        mode: Option<u32>,
    },
}

pub struct FileTool {
    op: Op,
    roots: Arc<Roots>,
    parameters: Value,
}

/// All the files tools over `roots`.
const OPS: [Op; 7] = [Op::List, Op::Read, Op::Search, Op::Write, Op::Copy, Op::Move, Op::Delete];

/// The names of the files tools (always offered: a box without roots has the inbox).
pub fn tool_names() -> impl Iterator<Item = &'static str> {
    OPS.into_iter().map(Op::name)
}

pub fn tools(roots: &Arc<Roots>) -> Vec<Arc<dyn Tool>> {
    OPS.into_iter().map(|op| Arc::new(FileTool::new(op, roots.clone())) as Arc<dyn Tool>).collect()
}

fn path_param(what: &str) -> Value {
    json!({"type": "string", "maxLength": 1024, "description": what})
}

impl FileTool {
    pub fn new(op: Op, roots: Arc<Roots>) -> Self {
        let max_write = roots.settings.max_write_bytes;
        let parameters = match op {
            Op::List => json!({"type": "object", "additionalProperties": false,
                "properties": {"path": path_param("`root/folder`; empty lists the roots")}}),
            Op::Read => json!({"type": "object", "additionalProperties": false, "required": ["path"],
                "properties": {"path": path_param("`root/folder/file`")}}),
            Op::Search => json!({"type": "object", "additionalProperties": false, "required": ["path", "query"],
                "properties": {"path": path_param("`root` or `root/folder` to search under"),
                    "query": {"type": "string", "minLength": 1, "maxLength": 200},
                    "in_content": {"type": "boolean", "description": "also match text inside files"}}}),
            Op::Write => json!({"type": "object", "additionalProperties": false, "required": ["path", "content"],
                "properties": {"path": path_param("`root/folder/file`"),
                    "content": {"type": "string", "maxLength": max_write},
                    "overwrite": {"type": "boolean", "description": "replace an existing file"}}}),
            Op::Move => json!({"type": "object", "additionalProperties": false, "required": ["from", "to"],
                "properties": {"from": path_param("existing `root/…` path"), "to": path_param("new `root/…` path")}}),
            Op::Copy => json!({"type": "object", "additionalProperties": false, "required": ["from", "to"],
                "properties": {"from": path_param("existing `root/…` file (an `inbox/…` file someone sent, too)"),
                    "to": path_param("new `root/…` path")}}),
            Op::Delete => json!({"type": "object", "additionalProperties": false, "required": ["path"],
                "properties": {"path": path_param("`root/folder/file`")}}),
        };
        FileTool { op, roots, parameters }
    }
}

use crate::tools::str_arg as arg;

impl Tool for FileTool {
    fn name(&self) -> &str {
        self.op.name()
    }

    fn description(&self) -> &str {
        match self.op {
            Op::List => "List a folder of the box's shared files (paths are `root/folder`).",
            Op::Read => "Read a text file of the box's shared files.",
            Op::Search => "Find files by name (and optionally by text inside) under a folder.",
            Op::Write => "Write a text file (asks the user to confirm; undoable).",
            Op::Copy => {
                "Copy a file, e.g. one the user sent (`inbox/…`) into a shared folder (asks the user to confirm; undoable)."
            }
            Op::Move => "Move or rename a file (asks the user to confirm; undoable).",
            Op::Delete => "Delete a file (asks the user to confirm; undoable).",
        }
    }

    fn parameters(&self) -> &Value {
        &self.parameters
    }

    fn risk(&self) -> Risk {
        match self.op {
            Op::List | Op::Read | Op::Search => Risk::Read,
            Op::Write | Op::Copy | Op::Move => Risk::Write,
            Op::Delete => Risk::Destructive,
        }
    }

    fn target(&self, args: &Value) -> String {
        match self.op {
            Op::Move | Op::Copy => format!("{} → {}", arg(args, "from"), arg(args, "to")),
            _ => arg(args, "path").to_owned(),
        }
    }

    /// A change outside the roots (or into a read-only one) is refused before anyone is asked
    /// to confirm it.
    fn prepare<'a>(&'a self, ctx: &'a Context, args: Value) -> BoxFuture<'a, Result<Value, ToolError>> {
        let roots = self.roots.scoped(&ctx.actor);
        let arg = |k: &str| args[k].as_str().unwrap_or_default();
        let checked = match self.op {
            Op::List | Op::Read | Op::Search => Ok(()),
            Op::Write | Op::Delete => roots.writable(arg("path")),
            Op::Copy => roots.parts(arg("from")).and_then(|_| roots.writable(arg("to"))),
            Op::Move => roots.writable(arg("from")).and_then(|()| roots.writable(arg("to"))),
        };
        Box::pin(async move { checked.map(|()| args) })
    }

    fn execute<'a>(&'a self, ctx: &'a Context, args: Value) -> BoxFuture<'a, Result<Outcome, ToolError>> {
        let roots = self.roots.scoped(&ctx.actor);
        let op = self.op;
        // What someone sent the robot is theirs: read into a group answer, everyone would see it.
        // Copying it into a shared folder (a confirmed change) stays possible anywhere.
        let reads_inbox = matches!(op, Op::Read | Op::List | Op::Search)
            && args["path"].as_str().is_some_and(|p| p.split('/').next() == Some(INBOX));
        if reads_inbox && let Err(e) = super::private_in_group(ctx, "files people sent the robot") {
            return Box::pin(async move { Err(e) });
        }
        Box::pin(async move {
            tokio::task::spawn_blocking(move || run(op, &roots, &args))
                .await
                .unwrap_or_else(|_| Err(ToolError::Failed("the file operation stopped unexpectedly".into())))
        })
    }

    fn undo<'a>(&'a self, ctx: &'a Context, payload: &'a [u8]) -> BoxFuture<'a, Result<String, ToolError>> {
        let roots = self.roots.scoped(&ctx.actor);
        let (payload, offset) = (payload.to_vec(), ctx.offset_minutes);
        Box::pin(async move {
            tokio::task::spawn_blocking(move || undo(&roots, &payload, offset))
                .await
                .unwrap_or_else(|_| Err(ToolError::Failed("the undo stopped unexpectedly".into())))
        })
    }

    fn undo_as_copy<'a>(&'a self, ctx: &'a Context, payload: &'a [u8]) -> BoxFuture<'a, Result<String, ToolError>> {
        let roots = self.roots.scoped(&ctx.actor);
        let payload = payload.to_vec();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || undo_as_copy(&roots, &payload))
                .await
                .unwrap_or_else(|_| Err(ToolError::Failed("the undo stopped unexpectedly".into())))
        })
    }
}

fn run(op: Op, roots: &Roots, args: &Value) -> Result<Outcome, ToolError> {
    match op {
        Op::List => list(roots, arg(args, "path")),
        Op::Read => read(roots, arg(args, "path")),
        Op::Search => {
            search(roots, arg(args, "path"), arg(args, "query"), args.get("in_content") == Some(&Value::Bool(true)))
        }
        Op::Write => {
            write(roots, arg(args, "path"), arg(args, "content"), args.get("overwrite") == Some(&Value::Bool(true)))
        }
        Op::Move => move_op(roots, arg(args, "from"), arg(args, "to")),
        Op::Copy => copy(roots, arg(args, "from"), arg(args, "to")),
        Op::Delete => delete(roots, arg(args, "path")),
    }
}

fn list(roots: &Roots, path: &str) -> Result<Outcome, ToolError> {
    if path.trim_matches(['/', '.', ' ']).is_empty() {
        return Ok(Outcome::text(format!("roots: {}", roots.names())));
    }
    let dir = roots.existing(path)?;
    if !dir.is_dir() {
        return Err(refused(format!("`{path}` is a file, not a folder")));
    }
    let mut entries: Vec<(String, String)> = Vec::new();
    let mut total = 0usize;
    for entry in fs::read_dir(&dir).map_err(|e| failed("cannot list the folder", e))? {
        let Ok(entry) = entry else { continue };
        total += 1;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Ok(meta) = entry.metadata() else { continue };
        let kind = if meta.file_type().is_symlink() {
            "link".to_owned()
        } else if meta.is_dir() {
            "folder".to_owned()
        } else {
            format!("{} bytes", meta.len())
        };
        entries.push((name, kind));
    }
    entries.sort();
    let shown = entries.len().min(roots.settings.max_results);
    let mut text = format!("{} ({} entries)\n", roots.display(&dir), total);
    for (name, kind) in &entries[..shown] {
        text.push_str(&format!("- {name} ({kind})\n"));
    }
    if shown < entries.len() {
        text.push_str(&format!("… {} more not shown\n", entries.len() - shown));
    }
    Ok(Outcome::text(text))
}

fn read(roots: &Roots, path: &str) -> Result<Outcome, ToolError> {
    let file = roots.existing(path)?;
    let meta = fs::metadata(&file).map_err(|e| failed("cannot read the file", e))?;
    if meta.is_dir() {
        return Err(refused(format!("`{path}` is a folder; use files_list")));
    }
    let max = roots.settings.max_read_bytes;
    let mut buf = Vec::with_capacity((meta.len() as usize).min(max));
    open_nofollow(&file)
        .map_err(|e| failed("cannot open the file", e))?
        .take(max as u64)
        .read_to_end(&mut buf)
        .map_err(|e| failed("cannot read the file", e))?;
    let text = match String::from_utf8(buf) {
        Ok(t) => t,
        Err(e) if e.utf8_error().error_len().is_none() => {
            // Cut inside a character at the size cap.
            let valid = e.utf8_error().valid_up_to();
            let mut b = e.into_bytes();
            b.truncate(valid);
            String::from_utf8(b).unwrap_or_default()
        }
        Err(_) => {
            return Ok(Outcome::text(format!(
                "`{path}` is a binary file of {} bytes; it cannot be shown as text",
                meta.len()
            )));
        }
    };
    let mut out = text;
    if meta.len() as usize > max {
        out.push_str(&format!("\n…(only the first {max} of {} bytes are shown)", meta.len()));
    }
    Ok(Outcome::text(out))
}

fn search(roots: &Roots, path: &str, query: &str, in_content: bool) -> Result<Outcome, ToolError> {
    let start = roots.existing(path)?;
    let needle = query.to_lowercase();
    let mut found = Vec::new();
    let mut queue = VecDeque::from([(start, 0usize)]);
    let mut visits = 0usize;
    let mut complete = true;
    while let Some((dir, depth)) = queue.pop_front() {
        let Ok(entries) = fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            visits += 1;
            if visits > SEARCH_MAX_VISITS || found.len() >= roots.settings.max_results {
                complete = false;
                break;
            }
            // Symbolic links are not followed: they could lead out of the root.
            let Ok(ft) = entry.file_type() else { continue };
            let p = entry.path();
            let name = entry.file_name().to_string_lossy().to_lowercase();
            if ft.is_dir() {
                if depth < SEARCH_MAX_DEPTH {
                    queue.push_back((p.clone(), depth + 1));
                }
                if name.contains(&needle) {
                    found.push(format!("{}/", roots.display(&p)));
                }
            } else if ft.is_file() {
                if name.contains(&needle) {
                    found.push(roots.display(&p));
                } else if in_content && entry.metadata().map(|m| m.len() <= SEARCH_CONTENT_MAX_BYTES).unwrap_or(false) {
                    let mut buf = Vec::new();
                    if open_nofollow(&p).and_then(|mut f| f.read_to_end(&mut buf)).is_ok()
                        && String::from_utf8_lossy(&buf).to_lowercase().contains(&needle)
                    {
                        found.push(format!("{} (text matches)", roots.display(&p)));
                    }
                }
            }
        }
        if !complete {
            break;
        }
    }
    let mut text = format!("{} matches for “{query}” under {}\n", found.len(), path);
    for f in &found {
        text.push_str(&format!("- {f}\n"));
    }
    if !complete {
        text.push_str("(search stopped early at its size limit; narrow the folder or the query)\n");
    }
    Ok(Outcome::text(text))
}

fn write(roots: &Roots, path: &str, content: &str, overwrite: bool) -> Result<Outcome, ToolError> {
    if content.len() > roots.settings.max_write_bytes {
        return Err(refused(format!(
            "the content is {} bytes; at most {} may be written",
            content.len(),
            roots.settings.max_write_bytes
        )));
    }
    roots.writable(path)?;
    let target = roots.new_path(path)?;
    let exists = target.exists();
    if exists && !overwrite {
        return Err(refused(format!("`{path}` already exists; say overwrite to replace it")));
    }
    if target.is_dir() {
        return Err(refused(format!("`{path}` is a folder")));
    }
    // What is replaced is kept for undo first: a file larger than the whole undo area could
    // not be, so it is not replaced through the chat.
    let budget = roots.settings.undo_keep_mib.saturating_mul(1024 * 1024);
    let size = if exists { fs::symlink_metadata(&target).map(|m| m.len()).unwrap_or_default() } else { 0 };
    if size > budget {
        return Err(refused(format!(
            "`{path}` is {size} bytes, more than the undo area keeps ({} MiB): it could not be restored, so it is not replaced here; write a new file instead",
            roots.settings.undo_keep_mib
        )));
    }
    let parent = target.parent().unwrap_or(Path::new("/"));
    let temp = parent.join(format!(".zhuli-{:016x}.tmp", rand::random::<u64>()));
    let written = (|| {
        let mut f = fs::OpenOptions::new().write(true).create_new(true).open(&temp)?;
        f.write_all(content.as_bytes())?;
        f.sync_all()
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&temp);
        return Err(failed("cannot write the file", e));
    }
    let kept = if exists {
        match roots.keep_sealed(&target) {
            Ok(kept) => Some(kept),
            Err(e) => {
                let _ = fs::remove_file(&temp);
                return Err(failed("cannot keep the old version for undo", e));
            }
        }
    } else {
        None
    };
    if let Err(e) = fs::rename(&temp, &target) {
        let _ = fs::remove_file(&temp);
        return Err(failed("cannot put the file in place", e));
    }
    let shown = roots.display(&target);
    let sha256 = Some(sha256_hex(content.as_bytes()));
    let (kept, mode) = (kept.as_ref().map(|(k, _)| k.clone()), kept.and_then(|(_, m)| m));
    let undo = serde_json::to_vec(&Undo::Write { path: target, kept: kept.clone(), sha256, mode }).unwrap_or_default();
    let how = if kept.is_some() { "restore the previous version of" } else { "remove" };
    Ok(Outcome {
        text: format!("wrote {} bytes to {shown}", content.len()),
        undo: Some((undo, format!("{how} {shown}"))),
    })
}

/// Files copied at most this large.
const MAX_COPY_BYTES: u64 = 256 * 1024 * 1024;

fn copy(roots: &Roots, from: &str, to: &str) -> Result<Outcome, ToolError> {
    roots.writable(to)?;
    let source = roots.existing(from)?;
    let meta = fs::metadata(&source).map_err(|e| failed("cannot read the file", e))?;
    if !meta.is_file() {
        return Err(refused(format!("`{from}` is not a file; only files are copied")));
    }
    if meta.len() > MAX_COPY_BYTES {
        return Err(refused(format!(
            "`{from}` is {} bytes; files over {MAX_COPY_BYTES} bytes are not copied",
            meta.len()
        )));
    }
    let target = roots.new_path(to)?;
    let n = place_new(&target, to, |dst| {
        let mut src = open_nofollow(&source)?;
        std::io::copy(&mut (&mut src).take(MAX_COPY_BYTES), dst)
    })?;
    let (a, b) = (roots.display(&source), roots.display(&target));
    // What the copy left, so that its undo never removes a file edited since.
    let sha256 = sha256_of_file(&target).ok();
    let undo = serde_json::to_vec(&Undo::Write { path: target, kept: None, sha256, mode: None }).unwrap_or_default();
    Ok(Outcome { text: format!("copied {a} to {b} ({n} bytes)"), undo: Some((undo, format!("remove {b}"))) })
}

/// Create `target` (shown as `shown`) with what `fill` writes, never over an existing name: the
/// bytes go to a temporary file first, which is then linked in.
fn place_new(
    target: &Path,
    shown: &str,
    fill: impl FnOnce(&mut fs::File) -> std::io::Result<u64>,
) -> Result<u64, ToolError> {
    if fs::symlink_metadata(target).is_ok() {
        return Err(refused(format!("`{shown}` already exists; choose another name")));
    }
    let parent = target.parent().unwrap_or(Path::new("/"));
    let temp = parent.join(format!(".zhuli-{:016x}.tmp", rand::random::<u64>()));
    let written = (|| {
        let mut dst = fs::OpenOptions::new().write(true).create_new(true).open(&temp)?;
        let n = fill(&mut dst)?;
        dst.sync_all()?;
        Ok::<u64, std::io::Error>(n)
    })();
    let n = match written {
        Ok(n) => n,
        Err(e) => {
            let _ = fs::remove_file(&temp);
            return Err(failed("cannot write the file", e));
        }
    };
    // A name that appeared meanwhile is not replaced: link the file in, never over anything.
    if let Err(e) = fs::hard_link(&temp, target) {
        let _ = fs::remove_file(&temp);
        return Err(match e.kind() {
            std::io::ErrorKind::AlreadyExists => refused(format!("`{shown}` already exists; choose another name")),
            _ => failed("cannot put the file in place", e),
        });
    }
    let _ = fs::remove_file(&temp);
    Ok(n)
}

fn move_op(roots: &Roots, from: &str, to: &str) -> Result<Outcome, ToolError> {
    roots.writable(from)?;
    roots.writable(to)?;
    let source = roots.existing(from)?;
    let target = roots.new_path(to)?;
    if target.exists() {
        return Err(refused(format!("`{to}` already exists; choose another name")));
    }
    rename_noreplace(&source, &target).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => refused(format!("`{to}` already exists; choose another name")),
        _ => failed("cannot move the file", e),
    })?;
    let (a, b) = (roots.display(&source), roots.display(&target));
    let undo = serde_json::to_vec(&Undo::Move { from: source, to: target }).unwrap_or_default();
    Ok(Outcome { text: format!("moved {a} to {b}"), undo: Some((undo, format!("move {b} back to {a}"))) })
}

fn delete(roots: &Roots, path: &str) -> Result<Outcome, ToolError> {
    roots.writable(path)?;
    let file = roots.existing(path)?;
    if file.is_dir() {
        return Err(refused(format!("`{path}` is a folder; only files can be deleted")));
    }
    // Removed only once a sealed copy is kept: a file larger than the whole undo area would be
    // pruned at once, so it is not deleted through the chat at all.
    let size = fs::symlink_metadata(&file).map(|m| m.len()).unwrap_or_default();
    let budget = roots.settings.undo_keep_mib.saturating_mul(1024 * 1024);
    if size > budget {
        return Err(refused(format!(
            "`{path}` is {size} bytes, more than the undo area keeps ({} MiB): it could not be restored, so it is not deleted here; an admin can delete it on the file server",
            roots.settings.undo_keep_mib
        )));
    }
    let (keep, mode) =
        roots.keep_sealed(&file).map_err(|e| failed("cannot keep a copy for undo; nothing deleted", e))?;
    if let Err(e) = fs::remove_file(&file) {
        let _ = fs::remove_file(&keep);
        return Err(failed("cannot delete the file", e));
    }
    let shown = roots.display(&file);
    let undo = serde_json::to_vec(&Undo::Delete { path: file, kept: keep, mode }).unwrap_or_default();
    Ok(Outcome { text: format!("deleted {shown}"), undo: Some((undo, format!("restore {shown}"))) })
}

/// The sha256 of a file's bytes, read in pieces.
fn sha256_of_file(path: &Path) -> std::io::Result<String> {
    super::sha256_of_read(&mut open_nofollow(path)?)
}

/// Why undoing a write would lose later work: the file is no longer what the write left. The
/// words say when it changed and what the person can do instead.
fn changed_since(roots: &Roots, path: &Path, written: &str, kept: bool, offset: i32) -> Option<String> {
    match sha256_of_file(path) {
        Ok(now) if now == written => return None,
        // Gone since: no later work to lose.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Ok(_) => {}
        // Not readable as a plain file (a symbolic link put there, a permission): not undone.
        Err(e) => {
            return Some(t!("undo.unreadable", path = roots.display(path), error = e).into_owned());
        }
    }
    let meta = fs::metadata(path).ok();
    let bytes = meta.as_ref().map(|m| m.len()).unwrap_or_default();
    let when = meta
        .and_then(|m| m.modified().ok())
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| super::when::shown(d.as_millis() as i64, offset))
        .unwrap_or_default();
    let shown = roots.display(path);
    let said = t!("undo.changed", path = shown, when = when, bytes = bytes);
    let offer =
        if kept { t!("undo.offer_copy", copy = roots.display(&copy_path(path))).into_owned() } else { String::new() };
    Some(format!("{said}{offer}"))
}

/// Beside `path`, a name for what a change replaced: `notes.previous.txt`, then
/// `notes.previous-2.txt`, … whichever is free.
fn copy_path(path: &Path) -> PathBuf {
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let ext = path.extension().map(|e| format!(".{}", e.to_string_lossy())).unwrap_or_default();
    (1..)
        .map(|n| {
            let tail = if n == 1 { String::new() } else { format!("-{n}") };
            path.with_file_name(format!("{stem}.previous{tail}{ext}"))
        })
        // Free means nothing there at all, a dangling link included.
        .find(|p| p.symlink_metadata().is_err())
        .unwrap_or_else(|| path.with_extension("previous"))
}

/// The copy an undo needs is still in the undo area (it is removed after `undo_keep_days`, or
/// when the area outgrows `undo_keep_mib`).
fn copy_still_kept(roots: &Roots, kept: &Path) -> Result<(), ToolError> {
    if kept.symlink_metadata().is_ok() {
        return Ok(());
    }
    let s = &roots.settings;
    Err(ToolError::Refused(t!("undo.copy_gone", days = s.undo_keep_days, mib = s.undo_keep_mib).into_owned()))
}

/// Put back what a write replaced beside the file, as a copy, leaving the file as it is.
fn undo_as_copy(roots: &Roots, payload: &[u8]) -> Result<String, ToolError> {
    let undo: Undo =
        serde_json::from_slice(payload).map_err(|_| ToolError::Failed("the undo record is not readable".into()))?;
    let Undo::Write { path, kept: Some(kept), mode, .. } = undo else {
        return Err(ToolError::Refused(t!("undo.no_copy").into_owned()));
    };
    roots.still_inside(&path)?;
    copy_still_kept(roots, &kept)?;
    let copy = copy_path(&path);
    roots
        .restore_kept(&kept, &copy, false, mode)
        .map_err(|e| failed("cannot put the previous version beside the file", e))?;
    Ok(t!("undo.copied", copy = roots.display(&copy), path = roots.display(&path)).into_owned())
}

fn undo(roots: &Roots, payload: &[u8], offset: i32) -> Result<String, ToolError> {
    let undo: Undo =
        serde_json::from_slice(payload).map_err(|_| ToolError::Failed("the undo record is not readable".into()))?;
    match &undo {
        Undo::Write { path, .. } | Undo::Delete { path, .. } => roots.still_inside(path)?,
        Undo::Move { from, to } => {
            roots.still_inside(from)?;
            roots.still_inside(to)?;
        }
    }
    // Later work is never overwritten: a file changed since the write stays as it is.
    if let Undo::Write { path, kept, sha256: Some(written), .. } = &undo
        && let Some(why) = changed_since(roots, path, written, kept.is_some(), offset)
    {
        return Err(ToolError::Refused(why));
    }
    match undo {
        Undo::Write { path, kept: Some(kept), mode, .. } => {
            copy_still_kept(roots, &kept)?;
            roots
                .restore_kept(&kept, &path, true, mode)
                .map_err(|e| failed("cannot restore the previous version", e))?;
            Ok(t!("undo.previous_version", path = roots.display(&path)).into_owned())
        }
        Undo::Write { path, kept: None, .. } => {
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(failed("cannot remove the written file", e)),
            }
            Ok(t!("undo.removed", path = roots.display(&path)).into_owned())
        }
        Undo::Move { from, to } => {
            if from.symlink_metadata().is_ok() {
                return Err(refused(format!("{} exists again; not moving over it", roots.display(&from))));
            }
            rename_noreplace(&to, &from).map_err(|e| failed("cannot move the file back", e))?;
            Ok(t!("undo.moved_back", from = roots.display(&to), to = roots.display(&from)).into_owned())
        }
        Undo::Delete { path, kept, mode } => {
            if path.symlink_metadata().is_ok() {
                return Err(refused(format!("{} exists again; not restoring over it", roots.display(&path))));
            }
            copy_still_kept(roots, &kept)?;
            roots.restore_kept(&kept, &path, false, mode).map_err(|e| failed("cannot restore the file", e))?;
            Ok(t!("undo.restored", path = roots.display(&path)).into_owned())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_sealer() -> Arc<FileSealer> {
        Arc::new(FileSealer::new(&crate::store::key::StoreKey::generate()))
    }

    struct Fixture {
        dir: PathBuf,
        roots: Arc<Roots>,
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }

    fn fixture() -> Fixture {
        let dir = std::env::temp_dir().join(format!("zhuli-files-{}-{:x}", std::process::id(), rand::random::<u32>()));
        fs::create_dir_all(dir.join("share/reports")).expect("dirs");
        fs::create_dir_all(dir.join("outside")).expect("dirs");
        fs::write(dir.join("share/reports/q3.txt"), "Q3 revenue up 12%").expect("file");
        fs::write(dir.join("outside/secret.txt"), "do not read").expect("file");
        std::os::unix::fs::symlink(dir.join("outside"), dir.join("share/escape")).expect("link");
        std::os::unix::fs::symlink(dir.join("outside/secret.txt"), dir.join("share/leak.txt")).expect("link");
        let settings = FilesSettings {
            roots: BTreeMap::from([("share".to_owned(), dir.join("share"))]),
            max_write_bytes: 64,
            ..FilesSettings::default()
        };
        fs::create_dir_all(dir.join("media").join(owner_dir("lilei"))).expect("inbox");
        fs::write(dir.join("media").join(owner_dir("lilei")).join("00000001.txt"), "sent by a user").expect("inbox");
        let roots = Arc::new(
            Roots::open(&settings, &dir.join("state"), Some(&dir.join("media")), test_sealer())
                .expect("roots")
                .scoped("lilei"),
        );
        Fixture { dir, roots }
    }

    #[test]
    fn reads_inside_and_refuses_every_escape() {
        let f = fixture();
        let out = read(&f.roots, "share/reports/q3.txt").expect("read");
        assert_eq!(out.text, "Q3 revenue up 12%");
        for bad in [
            "share/../outside/secret.txt",
            "../../etc/shadow",
            "/etc/shadow",
            "share/escape/secret.txt",
            "share/leak.txt",
            "outside/secret.txt",
            "share/reports/\0x",
        ] {
            let e = read(&f.roots, bad).expect_err(bad);
            assert!(matches!(e, ToolError::Refused(_)), "{bad}: {e}");
        }
        let e = write(&f.roots, "share/escape/new.txt", "x", false).expect_err("write through link");
        assert!(e.to_string().contains("outside its root"), "{e}");
        let e = write(&f.roots, "share/leak.txt", "x", true).expect_err("overwrite a link");
        assert!(e.to_string().contains("symbolic link"), "{e}");
        assert_eq!(fs::read_to_string(f.dir.join("outside/secret.txt")).expect("still there"), "do not read");
    }

    #[test]
    fn write_move_delete_each_undo() {
        let f = fixture();
        let q3 = f.dir.join("share/reports/q3.txt");
        let out = write(&f.roots, "share/reports/q3.txt", "new text", true).expect("overwrite");
        assert_eq!(fs::read_to_string(&q3).expect("read"), "new text");
        undo(&f.roots, &out.undo.expect("undo").0, 480).expect("undo write");
        assert_eq!(fs::read_to_string(&q3).expect("read"), "Q3 revenue up 12%");

        let e = write(&f.roots, "share/reports/q3.txt", "x", false).expect_err("exists");
        assert!(e.to_string().contains("already exists"));
        let e = write(&f.roots, "share/big.txt", &"x".repeat(65), false).expect_err("too big");
        assert!(e.to_string().contains("at most 64"));

        let out = move_op(&f.roots, "share/reports/q3.txt", "share/q3-final.txt").expect("move");
        assert!(!q3.exists());
        undo(&f.roots, &out.undo.expect("undo").0, 480).expect("undo move");
        assert!(q3.exists());

        let out = delete(&f.roots, "share/reports/q3.txt").expect("delete");
        assert!(!q3.exists());
        undo(&f.roots, &out.undo.expect("undo").0, 480).expect("undo delete");
        assert_eq!(fs::read_to_string(&q3).expect("read"), "Q3 revenue up 12%");
    }

    /// The copies in the undo area.
    fn kept(roots: &Roots) -> Vec<PathBuf> {
        fs::read_dir(&roots.keep_dir).expect("undo area").flatten().map(|e| e.path()).collect()
    }

    #[test]
    fn undo_copies_are_sealed_and_a_changed_copy_restores_nothing() {
        let f = fixture();
        let q3 = f.dir.join("share/reports/q3.txt");
        let out = delete(&f.roots, "share/reports/q3.txt").expect("delete");
        let copies = kept(&f.roots);
        assert_eq!(copies.len(), 1);
        let sealed = fs::read(&copies[0]).expect("copy");
        assert!(FileSealer::is_sealed(&sealed), "sealed");
        assert!(!sealed.windows(7).any(|w| w == b"revenue"), "the deleted text is not readable in the copy");
        // A byte changed in the copy: nothing is restored, and no temporary file is left.
        let mut changed = sealed.clone();
        *changed.last_mut().expect("bytes") ^= 1;
        fs::write(&copies[0], &changed).expect("tamper");
        let payload = out.undo.expect("undo").0;
        let e = undo(&f.roots, &payload, 480).expect_err("a changed copy");
        assert!(matches!(e, ToolError::Failed(_)), "{e}");
        assert!(!q3.exists());
        let left: Vec<_> = fs::read_dir(f.dir.join("share/reports")).expect("dir").flatten().collect();
        assert!(left.is_empty(), "nothing left beside it: {left:?}");
        // The copy as it was restores the file.
        fs::write(&copies[0], &sealed).expect("put back");
        undo(&f.roots, &payload, 480).expect("undo");
        assert_eq!(fs::read_to_string(&q3).expect("read"), "Q3 revenue up 12%");
        assert!(kept(&f.roots).is_empty(), "the copy goes with the undo");
        // A file larger than the whole undo area is not deleted: its copy could not be kept.
        let settings = FilesSettings {
            roots: BTreeMap::from([("share".to_owned(), f.dir.join("share"))]),
            undo_keep_mib: 0,
            ..FilesSettings::default()
        };
        let tight = Roots::open(&settings, &f.dir.join("state"), None, test_sealer()).expect("roots");
        let e = delete(&tight, "share/reports/q3.txt").expect_err("too large to keep");
        assert!(e.to_string().contains("not deleted here"), "{e}");
        assert!(q3.exists());
    }

    #[test]
    fn plaintext_copies_of_an_earlier_release_are_sealed_at_start_and_follow_a_rekey() {
        let f = fixture();
        let (old, new) = (crate::store::key::StoreKey::generate(), crate::store::key::StoreKey::generate());
        let area = f.dir.join("state2/files-undo");
        fs::create_dir_all(&area).expect("area");
        let copy = area.join("00000000000000aa");
        fs::write(&copy, "kept in plaintext by an earlier release").expect("copy");
        let settings = FilesSettings {
            roots: BTreeMap::from([("share".to_owned(), f.dir.join("share"))]),
            ..FilesSettings::default()
        };
        let roots =
            Roots::open(&settings, &f.dir.join("state2"), None, Arc::new(FileSealer::new(&old))).expect("roots");
        let sealed = fs::read(&copy).expect("copy");
        assert!(FileSealer::is_sealed(&sealed) && !sealed.windows(9).any(|w| w == b"plaintext"), "sealed in place");
        let target = f.dir.join("share/restored.txt");
        let payload =
            serde_json::to_vec(&Undo::Delete { path: target.clone(), kept: copy.clone(), mode: None }).expect("json");
        // Re-sealed under a new key: the old key no longer opens it, the new one does.
        assert_eq!(reseal_undo_copies(&f.dir.join("state2"), &old, &new).expect("reseal"), (1, 0));
        assert!(undo(&roots, &payload, 480).is_err(), "the old key no longer opens the copy");
        let roots =
            Roots::open(&settings, &f.dir.join("state2"), None, Arc::new(FileSealer::new(&new))).expect("roots");
        undo(&roots, &payload, 480).expect("undo under the new key");
        assert_eq!(fs::read_to_string(&target).expect("restored"), "kept in plaintext by an earlier release");
    }

    #[test]
    fn undo_never_overwrites_later_work() {
        let f = fixture();
        let q3 = f.dir.join("share/reports/q3.txt");
        // A write, then someone else's edit: undoing the write would lose the edit.
        let out = write(&f.roots, "share/reports/q3.txt", "the assistant's text", true).expect("overwrite");
        let payload = out.undo.expect("undo").0;
        fs::write(&q3, "a colleague's later edit").expect("edit");
        let e = crate::i18n::tests::in_language(crate::i18n::Language::ZhCn, || {
            undo(&f.roots, &payload, 480).expect_err("refused")
        });
        let said = e.to_string();
        assert!(matches!(e, ToolError::Refused(_)), "{said}");
        assert!(said.contains("share/reports/q3.txt") && said.contains("UTC+8") && said.contains("24 字节"), "{said}");
        assert!(said.contains("/撤销 副本") && said.contains("q3.previous.txt"), "{said}");
        assert_eq!(fs::read_to_string(&q3).expect("read"), "a colleague's later edit", "the edit stays");
        // Kept as a copy instead: the file stays, the version before the write comes back beside it.
        undo_as_copy(&f.roots, &payload).expect("copy");
        assert_eq!(fs::read_to_string(&q3).expect("read"), "a colleague's later edit");
        let copy = f.dir.join("share/reports/q3.previous.txt");
        assert_eq!(fs::read_to_string(&copy).expect("copy"), "Q3 revenue up 12%");
        assert_eq!(copy_path(&q3), f.dir.join("share/reports/q3.previous-2.txt"), "the next copy takes a new name");

        // A new file edited later is not removed either; there is no earlier version to copy.
        let out = write(&f.roots, "share/new.txt", "draft", false).expect("new");
        let payload = out.undo.expect("undo").0;
        fs::write(f.dir.join("share/new.txt"), "draft, finished by hand").expect("edit");
        assert!(matches!(undo(&f.roots, &payload, 480), Err(ToolError::Refused(_))));
        assert!(f.dir.join("share/new.txt").exists());
        assert!(matches!(undo_as_copy(&f.roots, &payload), Err(ToolError::Refused(_))));
        // A symbolic link put where the file was is never followed: the undo is refused, and
        // a dangling link is no free name for a copy.
        let out = write(&f.roots, "share/reports/q3.txt", "third", true).expect("overwrite");
        fs::remove_file(&q3).expect("rm");
        std::os::unix::fs::symlink(f.dir.join("outside/secret.txt"), &q3).expect("link");
        assert!(matches!(undo(&f.roots, &out.undo.expect("undo").0, 480), Err(ToolError::Refused(_))));
        assert_eq!(fs::read_to_string(f.dir.join("outside/secret.txt")).expect("outside"), "do not read");
        std::os::unix::fs::symlink(f.dir.join("outside/nothing.txt"), f.dir.join("share/reports/q3.previous-2.txt"))
            .expect("dangling link");
        assert_eq!(copy_path(&q3), f.dir.join("share/reports/q3.previous-3.txt"));
        // Unchanged, it is undone as before.
        let out = write(&f.roots, "share/other.txt", "draft", false).expect("new");
        undo(&f.roots, &out.undo.expect("undo").0, 480).expect("undone");
        assert!(!f.dir.join("share/other.txt").exists());
    }

    #[test]
    fn the_undo_area_is_kept_within_its_age_and_size() {
        let f = fixture();
        let roots = Roots {
            settings: FilesSettings { undo_keep_days: 30, undo_keep_mib: 1, ..f.roots.settings.clone() },
            ..(*f.roots).clone()
        };
        let day = std::time::Duration::from_secs(86_400);
        let now = std::time::SystemTime::now();
        let put = |name: &str, kib: usize, age_days: u32| {
            let path = roots.keep_dir.join(name);
            fs::write(&path, vec![b'x'; kib * 1024]).expect("copy");
            let file = fs::File::options().write(true).open(&path).expect("open");
            file.set_modified(now - day * age_days).expect("mtime");
            path
        };
        let ancient = put("ancient", 1, 40);
        let older = put("older", 600, 3);
        let newer = put("newer", 600, 1);
        let newest = put("newest", 300, 0);
        assert_eq!(roots.prune_kept(), 2, "the one past 30 days, then the oldest while over 1 MiB");
        assert!(!ancient.exists() && !older.exists() && newer.exists() && newest.exists());
        // An undo whose copy is gone says so, and leaves the file as it is.
        let out = write(&f.roots, "share/reports/q3.txt", "new", true).expect("write");
        for e in fs::read_dir(&roots.keep_dir).expect("area").flatten() {
            fs::remove_file(e.path()).expect("prune");
        }
        let e = undo(&f.roots, &out.undo.expect("undo").0, 480).expect_err("gone");
        assert!(matches!(e, ToolError::Refused(_)) && e.to_string().contains("30"), "{e}");
        assert_eq!(fs::read_to_string(f.dir.join("share/reports/q3.txt")).expect("q3"), "new");
    }

    #[test]
    fn the_inbox_is_read_only() {
        let f = fixture();
        assert_eq!(read(&f.roots, "inbox/00000001.txt").expect("read").text, "sent by a user");
        for e in [
            write(&f.roots, "inbox/new.txt", "x", false).expect_err("write"),
            move_op(&f.roots, "inbox/00000001.txt", "share/a.txt").expect_err("move out"),
            move_op(&f.roots, "share/reports/q3.txt", "inbox/q3.txt").expect_err("move in"),
            delete(&f.roots, "inbox/00000001.txt").expect_err("delete"),
        ] {
            assert!(e.to_string().contains("read-only"), "{e}");
        }
        let file = f.dir.join("media").join(owner_dir("lilei")).join("00000001.txt");
        assert_eq!(f.roots.inbox_path(&file).as_deref(), Some("inbox/00000001.txt"));
        // Someone else's inbox is their own: empty, and lilei's file is not in it.
        let other = f.roots.scoped("wang");
        let e = read(&other, "inbox/00000001.txt").expect_err("not theirs");
        assert!(e.to_string().contains("inbox is empty"), "{e}");
        assert_eq!(other.inbox_path(&file), None);
    }

    #[test]
    fn folders_are_checked_by_making_a_file_and_a_bad_root_does_not_stop_the_rest() {
        let f = fixture();
        fs::write(f.dir.join("paper"), "a file").expect("file");
        let settings = FilesSettings {
            roots: BTreeMap::from([
                ("share".to_owned(), f.dir.join("share")),
                ("gone".to_owned(), f.dir.join("gone")),
                ("paper".to_owned(), f.dir.join("paper")),
            ]),
            ..FilesSettings::default()
        };
        let report = check_folders(&settings, Some(&f.dir.join("media")));
        let state: Vec<(&str, Option<&FolderProblem>)> =
            report.folders.iter().map(|c| (c.name.as_str(), c.problem.as_ref())).collect();
        assert_eq!(
            state,
            vec![
                ("gone", Some(&FolderProblem::Missing)),
                ("paper", Some(&FolderProblem::NotAFolder)),
                ("share", None),
                ("inbox", None),
            ]
        );
        assert_eq!(report.problems().count(), 2);
        let gone = &report.folders[0];
        assert_eq!(gone.line(), format!("gone = {}: missing", f.dir.join("gone").display()));
        assert!(gone.fix("zhuli").is_some_and(|t| t.contains("chown zhuli") && t.contains("remove `gone`")));
        let said = crate::i18n::tests::in_language(crate::i18n::Language::ZhCn, || gone.fix_said("zhuli"));
        assert!(said.is_some_and(|t| t.contains("创建") && t.contains("`gone`")));
        assert_eq!(report.folders[2].fix("zhuli"), None);
        assert!(report.folders[3].line().ends_with("readable"), "{}", report.folders[3].line());
        // The file that proved the folder writable is gone again.
        let left: Vec<_> = fs::read_dir(f.dir.join("share")).expect("share").flatten().map(|e| e.file_name()).collect();
        assert!(left.iter().all(|n| !n.to_string_lossy().starts_with(".zhuli-write-check")), "{left:?}");
        let missing_inbox = check_folder(INBOX, &f.dir.join("no-media"), false);
        assert!(missing_inbox.fix("zhuli").is_some_and(|t| t.contains("state_dir")));

        // The agent starts with the roots it can use; a call naming another says why not.
        let roots = Roots::open(&settings, &f.dir.join("state"), None, test_sealer()).expect("open").scoped("lilei");
        assert!(list(&roots, "").expect("roots").text.contains("`share`"));
        let e = read(&roots, "gone/a.txt").expect_err("no folder");
        assert!(e.to_string().contains("`gone` cannot be used") && e.to_string().contains("missing"), "{e}");
        let e = read(&roots, "paper/a.txt").expect_err("not a folder");
        assert!(e.to_string().contains("not a folder"), "{e}");
    }

    #[test]
    fn why_a_folder_takes_no_file() {
        use std::io::{Error, ErrorKind};
        for (e, expect) in [
            (Error::from_raw_os_error(nix::libc::EACCES), FolderProblem::WriteDenied),
            (Error::from_raw_os_error(nix::libc::EPERM), FolderProblem::WriteDenied),
            (Error::from_raw_os_error(nix::libc::EROFS), FolderProblem::ReadOnlyFileSystem),
            (Error::from_raw_os_error(nix::libc::ENOENT), FolderProblem::Missing),
            (Error::from_raw_os_error(nix::libc::ENOTDIR), FolderProblem::NotAFolder),
            (Error::new(ErrorKind::StorageFull, "full"), FolderProblem::Other("full".into())),
        ] {
            assert_eq!(FolderProblem::writing(&e), expect, "{e}");
        }
        assert_eq!(FolderProblem::reading(&Error::from_raw_os_error(nix::libc::EACCES)), FolderProblem::ReadDenied);
        let frozen = FolderCheck {
            name: "frozen".into(),
            path: "/srv/frozen".into(),
            writable: true,
            problem: Some(FolderProblem::ReadOnlyFileSystem),
        };
        assert_eq!(frozen.line(), "frozen = /srv/frozen: not writable: read-only file system");
        assert!(frozen.fix("zhuli").is_some_and(|t| t.contains("ReadWritePaths=/srv/frozen")));
        let said = crate::i18n::tests::in_language(crate::i18n::Language::ZhCn, || frozen.fix_said("zhuli"));
        assert!(said.is_some_and(|t| t.contains("服务单元不允许写入") && t.contains("U 盘")));
        // The box has no shell: what the admins are told to do, they do with the stick.
        for language in [crate::i18n::Language::ZhCn, crate::i18n::Language::En] {
            for problem in [
                FolderProblem::Missing,
                FolderProblem::WriteDenied,
                FolderProblem::ReadOnlyFileSystem,
                FolderProblem::ReadDenied,
                FolderProblem::Other("EIO".into()),
            ] {
                let check = FolderCheck { problem: Some(problem), ..frozen.clone() };
                let said = crate::i18n::tests::in_language(language, || check.fix_said("zhuli")).expect("a fix");
                for shell in ["chown", "chmod", "mkdir", "remount", "systemctl"] {
                    assert!(!said.contains(shell), "{language:?} {:?}: {said}", check.problem);
                }
            }
        }
    }

    /// A read-only mount, where this machine lets the test make one (root, tmpfs): the folder
    /// looks writable to its permission bits, and only a real file shows it is not.
    #[test]
    fn a_read_only_mount_is_found_by_writing() {
        let f = fixture();
        let frozen = f.dir.join("frozen");
        fs::create_dir_all(&frozen).expect("dir");
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "ro,size=64k", "tmpfs"])
            .arg(&frozen)
            .output()
            .is_ok_and(|o| o.status.success());
        if !mounted {
            eprintln!("skipped: cannot mount a read-only tmpfs here (needs root)");
            return;
        }
        let check = check_folder("frozen", &frozen, true);
        let _ = std::process::Command::new("umount").arg(&frozen).status();
        assert_eq!(check.problem, Some(FolderProblem::ReadOnlyFileSystem));
    }

    #[test]
    fn search_and_list_stay_inside() {
        let f = fixture();
        let out = search(&f.roots, "share", "revenue", true).expect("search");
        assert!(out.text.contains("share/reports/q3.txt"), "{}", out.text);
        // The symlinked folder is not followed, so the outside file is never seen.
        let out = search(&f.roots, "share", "secret", true).expect("search");
        assert!(!out.text.contains("secret.txt"), "{}", out.text);
        let out = list(&f.roots, "").expect("roots");
        assert!(out.text.contains("`share`") && out.text.contains("`inbox`"));
        let out = list(&f.roots, "share").expect("list");
        assert!(out.text.contains("reports (folder)") && out.text.contains("escape (link)"), "{}", out.text);
    }
}
