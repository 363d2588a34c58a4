//! The box's upkeep as admins ask for it in chat: `/doctor` (the diagnostics report a stick
//! gets), `/logs` (the agent's recent warnings and errors, redacted), `/backup now` (a verified
//! snapshot of the store under the state directory, the newest [`KEEP`] kept).

use std::{path::PathBuf, sync::Arc};

use futures_util::future::BoxFuture;

use crate::{
    assistant::{BackupTaken, Maintenance},
    config::Config,
    health::{
        diagnostics::{self, BACKUPS, Backup, Report, Section},
        status::Snapshot,
    },
    store::{self, backup, key::StoreKey},
    update,
};

/// Snapshots `/backup now` keeps in the state directory (older ones are removed after a new one
/// is verified).
pub const KEEP: usize = 7;

pub struct Upkeep {
    config: Arc<Config>,
    socket: PathBuf,
}

impl Upkeep {
    pub fn new(config: &Config) -> Arc<Upkeep> {
        Arc::new(Upkeep {
            config: Arc::new(config.clone()),
            socket: config.health.socket_path(&config.agent.state_dir),
        })
    }

    fn backups(&self) -> PathBuf {
        self.config.agent.state_dir.join(BACKUPS)
    }
}

impl Maintenance for Upkeep {
    fn doctor(&self, snapshot: Snapshot) -> BoxFuture<'static, Report> {
        let (config, socket) = (self.config.clone(), self.socket.clone());
        Box::pin(async move { diagnostics::full(&config, &socket, snapshot, super::DOCTOR_WAIT).await })
    }

    fn logs(&self) -> Vec<String> {
        diagnostics::remembered(&diagnostics::secrets_of(&self.config))
    }

    fn backup_now(&self) -> BoxFuture<'static, Result<BackupTaken, String>> {
        let (config, dir) = (self.config.clone(), self.backups());
        Box::pin(async move {
            tokio::task::spawn_blocking(move || take(&config, &dir, config.backup.keep))
                .await
                .unwrap_or_else(|e| Err(format!("the backup stopped ({e})")))
        })
    }

    fn snapshot_for_update(&self) -> BoxFuture<'static, Result<BackupTaken, String>> {
        let taken = self.backup_now();
        let note = self.config.agent.state_dir.join(update::SNAPSHOT_NOTE);
        Box::pin(async move {
            let b = taken.await?;
            // Root reads when the last snapshot was taken; it installs in the window only after.
            write_note(&note, &format!("{}\n", crate::clock::now_ms()))?;
            Ok(b)
        })
    }

    fn last_backup(&self) -> Option<Backup> {
        match diagnostics::last_backup(&self.backups()) {
            Section::Found(b) => Some(b),
            Section::Missing(_) => None,
        }
    }

    fn backup_settings(&self) -> backup::Settings {
        self.config.backup.clone()
    }

    fn stick_copy(&self) -> Option<backup::Target> {
        let root = crate::provision::root_of(&self.config.path)?;
        let last = crate::provision::stick_backup::last(&root)?;
        // The reason in the chat's language (the import keeps it in Chinese as well).
        let failing = if &*rust_i18n::locale() == "zh-CN" { last.failing_zh.or(last.failing) } else { last.failing };
        Some(backup::Target { ok_ms: last.ok_ms, failing, told: false })
    }

    fn releases(&self) -> (Option<update::state::Survey>, Vec<update::boot::Event>) {
        (update::state::read(&update::state::survey_path()), update::boot::events(&update::boot::events_path()))
    }

    fn request_update(&self, word: &'static str) -> Result<(), String> {
        // zhuli-update.path starts zhuli-update.service (root) when this file appears.
        write_note(&self.config.agent.state_dir.join(update::REQUEST), word)
    }
}

/// Write one of the notes the agent leaves root (in their own folder of the state directory,
/// the only place of the agent's root may write: it removes a request once read), whole.
fn write_note(path: &std::path::Path, text: &str) -> Result<(), String> {
    use std::os::unix::fs::DirBuilderExt;
    let fail = |e: std::io::Error| format!("cannot write {} ({e})", path.display());
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new().recursive(true).mode(0o755).create(dir).map_err(fail)?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, path)).map_err(fail)
}

/// Snapshot the store (the agent keeps running: redb lets a reader see a consistent state),
/// verify the snapshot with the key, then keep the newest [`KEEP`]. Refused when the disk
/// has less free space than twice the store and 64 MiB.
pub(super) fn take(config: &Config, dir: &std::path::Path, keep: usize) -> Result<BackupTaken, String> {
    // One at a time (the night's, `/backup now`, the one before an update): each keeps only the
    // newest, and must not remove the other's.
    static TAKING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = TAKING.lock().unwrap_or_else(|p| p.into_inner());
    let key = StoreKey::load(config.store.key_file.as_deref()).map_err(|e| e.to_string())?;
    let file = store::file_in(&config.agent.state_dir);
    // Room for the snapshot and to spare: a backup never fills the disk the agent runs on.
    let size = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {} ({e})", dir.display()))?;
    if let Ok(s) = nix::sys::statvfs::statvfs(dir) {
        let free = s.blocks_available() * s.fragment_size();
        if free < 2 * size + 64 * 1024 * 1024 {
            return Err(format!(
                "only {} MiB are free for a {} MiB store; free space first (old snapshots in {} can go once copied off the box)",
                free / 1048576,
                size.div_ceil(1048576),
                dir.display()
            ));
        }
    }
    remove_leftovers(dir);
    let (snapshot, manifest) = backup::backup(&file, &key, dir).map_err(|e| e.to_string())?;
    if let Err(e) = backup::verify(&snapshot, &key) {
        let _ = std::fs::remove_dir_all(&snapshot);
        return Err(format!("the new snapshot did not verify ({e}); it was removed"));
    }
    let mut all: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.path()).filter(|p| p.join(backup::MANIFEST).is_file()).collect())
        .unwrap_or_default();
    // Named zhuli-snapshot-<ms>-<seq>, ordered by the sequence (a clock may have been wrong); the
    // new one is never among those removed.
    all.retain(|p| *p != snapshot);
    all.sort_by_key(|p| p.file_name().and_then(|n| n.to_str()).and_then(backup::snapshot_order).unwrap_or((0, 0)));
    let excess = (all.len() + 1).saturating_sub(keep.max(1));
    for old in &all[..excess] {
        if let Err(e) = std::fs::remove_dir_all(old) {
            log::warn!("cannot remove the old snapshot {}: {e}", old.display());
        }
    }
    log::info!("backup {} taken and verified: {}", manifest.seq, snapshot.display());
    Ok(BackupTaken {
        path: snapshot.display().to_string(),
        bytes: manifest.bytes,
        values: manifest.values,
        kept: all.len() + 1 - excess,
    })
}

/// Remove what a snapshot cut short left in `dir` (a folder of a snapshot's name without its
/// manifest, an hour old: not one being written by `zhuli backup` now).
fn remove_leftovers(dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
    for e in entries.flatten() {
        let path = e.path();
        let name = e.file_name();
        let ours = name.to_str().and_then(backup::snapshot_order).is_some();
        let old = e.metadata().and_then(|m| m.modified()).is_ok_and(|t| t < hour_ago);
        if ours && old && e.file_type().is_ok_and(|t| t.is_dir()) && !path.join(backup::MANIFEST).exists() {
            match std::fs::remove_dir_all(&path) {
                Ok(()) => log::warn!("removed {}, a snapshot cut short", path.display()),
                Err(e) => log::warn!("cannot remove {}, a snapshot cut short: {e}", path.display()),
            }
        }
    }
}
