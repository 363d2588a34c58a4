//! The off-site copy of the store's snapshots: a WebDAV folder (Nextcloud, a NAS, rclone), the
//! second medium of the 3-2-1 rule. A snapshot goes up file by file, its manifest last (a
//! snapshot without its manifest is not one); it is then fetched back and verified with the key,
//! as a restore would; the oldest beyond `keep` are removed. Snapshots are sealed with the store
//! key, so the server holds nothing it can read.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http::Method;

use crate::{
    dingtalk::http::{HttpClient, tls_config},
    secret::Secret,
    store::{Counts, Retention, Store, backup, key::StoreKey},
    tools::dav::{Dav, DavError},
};

/// The largest snapshot file fetched back.
const MAX_FILE: u64 = 64 << 30;
/// The largest manifest read.
const MAX_MANIFEST: usize = 64 * 1024;
/// Disk space left free beyond a fetched snapshot.
const ROOM: u64 = 64 << 20;

pub struct Offsite {
    dav: Dav,
    keep: usize,
    /// The longest the server may go without taking or sending data, or answering.
    idle: std::time::Duration,
}

/// A folder an upload is still writing, or one a failed upload left.
const PARTIAL: &str = ".part";

impl Offsite {
    /// The folder at `url` (it is made if missing), as `username`; `keep` snapshots kept there.
    pub fn new(
        url: &str,
        username: &str,
        password: Option<&Secret>,
        keep: usize,
        timeout: std::time::Duration,
    ) -> Self {
        let http = HttpClient::new(tls_config(), timeout);
        Offsite { dav: Dav::new(http, url, username, password, "backup"), keep: keep.max(1), idle: timeout }
    }

    async fn mkcol(&self, path: &str) -> Result<(), DavError> {
        let url = self.dav.url(path, true).map_err(DavError::BadPath)?;
        match self.dav.send(Method::from_bytes(b"MKCOL").expect("a method"), &url, &[], Bytes::new(), 64 * 1024).await {
            Ok(_) => Ok(()),
            // 405: it is there already.
            Err(DavError::Refused { status: 405, .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Send the snapshot in `dir` up; its name there. It is written under `NAME.part` and moved
    /// into place once whole, so a snapshot there always has its manifest.
    pub async fn upload(&self, dir: &Path) -> Result<String, String> {
        let name = dir.file_name().and_then(|n| n.to_str()).ok_or("a snapshot folder has a name")?.to_owned();
        if backup::snapshot_order(&name).is_none() {
            return Err(format!("{name} is not a snapshot's name"));
        }
        self.mkcol("").await.map_err(|e| e.to_string())?;
        self.remove_partial().await?;
        let part = format!("{name}{PARTIAL}");
        self.mkcol(&part).await.map_err(|e| e.to_string())?;
        // Streamed from the file: a store of any size goes up without being held in memory.
        for file in [backup::SNAPSHOT_FILE, backup::MANIFEST] {
            let url = self.dav.url(&format!("{part}/{file}"), false).map_err(|e| e.to_string())?;
            self.dav.put_file(&url, &dir.join(file), self.idle).await.map_err(|e| e.to_string())?;
        }
        let from = self.dav.url(&part, true).map_err(|e| e.to_string())?;
        let to = self.dav.url(&name, true).map_err(|e| e.to_string())?;
        self.dav
            .send(
                Method::from_bytes(b"MOVE").expect("a method"),
                &from,
                &[("destination", &to), ("overwrite", "F")],
                Bytes::new(),
                64 * 1024,
            )
            .await
            .map_err(|e| e.to_string())?;
        Ok(name)
    }

    /// Remove what failed uploads left (`*.part`).
    async fn remove_partial(&self) -> Result<(), String> {
        let entries = match self.dav.propfind("", 1, 4 * 1024 * 1024).await {
            Ok(e) => e,
            Err(DavError::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e.to_string()),
        };
        for e in entries
            .into_iter()
            .filter(|e| e.dir && e.path.strip_suffix(PARTIAL).is_some_and(|n| backup::snapshot_order(n).is_some()))
        {
            let url = self.dav.url(&e.path, true).map_err(|e| e.to_string())?;
            self.dav.send(Method::DELETE, &url, &[], Bytes::new(), 64 * 1024).await.map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// The manifest of snapshot `name` as the server holds it (small: read whole).
    async fn manifest(&self, name: &str) -> Result<(Bytes, serde_json::Value), String> {
        let url = self.dav.url(&format!("{name}/{}", backup::MANIFEST), false).map_err(|e| e.to_string())?;
        let got = self.dav.send(Method::GET, &url, &[], Bytes::new(), MAX_MANIFEST).await.map_err(|e| e.to_string())?;
        let value =
            serde_json::from_slice(&got.body).map_err(|e| format!("{name}: its manifest does not read ({e})"))?;
        Ok((got.body, value))
    }

    /// Fetch snapshot `name` into `into/name`: the manifest first, then the file, no larger
    /// than the manifest says and only when the disk has room for it and to spare.
    pub async fn fetch(&self, name: &str, into: &Path) -> Result<PathBuf, String> {
        if backup::snapshot_order(name).is_none() {
            return Err(format!("{name} is not a snapshot's name"));
        }
        let dir = into.join(name);
        std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {} ({e})", dir.display()))?;
        let (raw, manifest) = self.manifest(name).await?;
        let bytes = manifest.get("bytes").and_then(serde_json::Value::as_u64).unwrap_or(MAX_FILE).min(MAX_FILE);
        if let Ok(s) = nix::sys::statvfs::statvfs(&dir) {
            let free = s.blocks_available() * s.fragment_size();
            if free < bytes.saturating_add(ROOM) {
                return Err(format!(
                    "only {} MiB are free on the box for a {} MiB snapshot; free space first",
                    free / 1048576,
                    bytes.div_ceil(1048576)
                ));
            }
        }
        std::fs::write(dir.join(backup::MANIFEST), &raw)
            .map_err(|e| format!("cannot write {} ({e})", dir.display()))?;
        let url = self.dav.url(&format!("{name}/{}", backup::SNAPSHOT_FILE), false).map_err(|e| e.to_string())?;
        self.dav.get_file(&url, &dir.join(backup::SNAPSHOT_FILE), self.idle, bytes).await.map_err(|e| e.to_string())?;
        Ok(dir)
    }

    /// Fetch snapshot `name` back into `scratch` (emptied first, and after) and verify it with
    /// `key`.
    pub async fn verify(&self, name: &str, key: &StoreKey, scratch: &Path) -> Result<(), String> {
        let _ = tokio::fs::remove_dir_all(scratch).await;
        let checked = match self.fetch(name, scratch).await {
            Ok(dir) => {
                let key = StoreKey::from_bytes(*key.bytes());
                tokio::task::spawn_blocking(move || backup::verify(&dir, &key).map(drop).map_err(|e| e.to_string()))
                    .await
                    .unwrap_or_else(|e| Err(format!("the check stopped ({e})")))
            }
            Err(e) => Err(e),
        };
        let _ = tokio::fs::remove_dir_all(scratch).await;
        checked
    }

    /// The restore drill: the newest snapshot here fetched into `scratch` (emptied before and
    /// after), restored there as `zhuli restore` would, and opened as the agent opens its store.
    /// Its name (empty when there is none) and what the restored store holds.
    /// `store_id`: only that store's snapshots count (any, when `None`).
    pub async fn drill(
        &self,
        key: StoreKey,
        scratch: &Path,
        store_id: Option<&str>,
    ) -> (String, Result<Counts, String>) {
        let newest = match self.list_of(store_id).await {
            Ok(names) => names.last().cloned(),
            Err(e) => return (String::new(), Err(e)),
        };
        let Some(name) = newest else {
            return (String::new(), Err("there is no snapshot in the off-site folder".into()));
        };
        let _ = tokio::fs::remove_dir_all(scratch).await;
        let restored = match self.fetch(&name, scratch).await {
            Ok(dir) => {
                let scratch = scratch.to_owned();
                tokio::task::spawn_blocking(move || {
                    let file = scratch.join("restored.redb");
                    backup::restore(&dir, &file, &key).map_err(|e| e.to_string())?;
                    let store = Store::open(&file, &key, Retention::default()).map_err(|e| e.to_string())?;
                    store.counts().map_err(|e| e.to_string())
                })
                .await
                .unwrap_or_else(|e| Err(format!("the drill stopped ({e})")))
            }
            Err(e) => Err(e),
        };
        let _ = tokio::fs::remove_dir_all(scratch).await;
        (name, restored)
    }

    /// When the newest snapshot here was taken (by its name), and its name; `None` when there is
    /// none.
    pub async fn newest(&self) -> Result<Option<(String, i64)>, String> {
        let names = self.list().await?;
        Ok(names.last().and_then(|n| backup::snapshot_order(n).map(|(_, ms)| (n.clone(), ms as i64))))
    }

    /// The snapshots there, oldest first.
    pub async fn list(&self) -> Result<Vec<String>, String> {
        let entries = match self.dav.propfind("", 1, 4 * 1024 * 1024).await {
            Ok(e) => e,
            Err(DavError::NotFound(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e.to_string()),
        };
        let mut names: Vec<String> = entries
            .into_iter()
            .filter(|e| e.dir && backup::snapshot_order(&e.path).is_some())
            .map(|e| e.path)
            .collect();
        // By sequence (see `snapshot_order`).
        names.sort_by_key(|n| backup::snapshot_order(n).unwrap_or((0, 0)));
        Ok(names)
    }

    /// The snapshots there of store `store_id` (by their manifests; all when `None`), oldest
    /// first. Another box's, or an earlier store's, are not this store's to order or remove.
    pub async fn list_of(&self, store_id: Option<&str>) -> Result<Vec<String>, String> {
        let all = self.list().await?;
        let Some(id) = store_id else { return Ok(all) };
        let mut ours = Vec::new();
        for name in all {
            match self.manifest(&name).await {
                Ok((_, m)) if m.get("store_id").and_then(serde_json::Value::as_str) == Some(id) => ours.push(name),
                Ok(_) => {}
                // A folder without a readable manifest is not a snapshot to count.
                Err(e) => log::warn!("off-site snapshot {name} left alone: {e}"),
            }
        }
        Ok(ours)
    }

    /// Remove store `store_id`'s oldest beyond `keep`, never `newest` (the one just verified);
    /// how many went.
    pub async fn prune(&self, newest: &str, store_id: Option<&str>) -> Result<usize, String> {
        let names: Vec<String> = self.list_of(store_id).await?.into_iter().filter(|n| n != newest).collect();
        let excess = (names.len() + 1).saturating_sub(self.keep).min(names.len());
        for name in &names[..excess] {
            let url = self.dav.url(name, true).map_err(|e| e.to_string())?;
            self.dav.send(Method::DELETE, &url, &[], Bytes::new(), 64 * 1024).await.map_err(|e| e.to_string())?;
        }
        Ok(excess)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_names_are_exact_and_order_by_sequence() {
        assert_eq!(backup::snapshot_order("zhuli-snapshot-1796000000000-3"), Some((3, 1_796_000_000_000)));
        for bad in
            ["notes", "zhuli-snapshot-x-1", "zhuli-snapshot-1-2/sub", "zhuli-snapshot-1-2.part", "zhuli-snapshot-1-"]
        {
            assert_eq!(backup::snapshot_order(bad), None, "{bad}");
        }
    }
}
