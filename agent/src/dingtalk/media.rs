//! The temporary media area: pictures, voice, video and files that users send are fetched only
//! when something needs them, through the robot file-download API, into a private directory
//! bounded per file and in total (oldest files are removed first).
//!
//! Files are named by a counter, never by the user's file name, so no name can escape the area.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use serde_json::{Value, json};

use super::{
    http::HttpError,
    openapi::{OpenApi, Outcome},
};

pub const DOWNLOAD_PATH: &str = "/v1.0/robot/messageFiles/download";
/// Limiter key of the GET of a download URL (storage host, not the OpenAPI).
const MEDIA_GET: &str = "media download";

#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    #[error("file download API failed: {0}")]
    Api(String),
    #[error("file download answer has no downloadUrl")]
    BadAnswer,
    #[error("file is larger than the {0}-byte limit ([dingtalk.limits] media_max_file_bytes)")]
    TooLarge(u64),
    #[error("download failed: {0}")]
    Http(HttpError),
    #[error("media area {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaFile {
    pub path: PathBuf,
    pub bytes: u64,
}

pub struct MediaArea {
    dir: PathBuf,
    api: Arc<OpenApi>,
    seq: AtomicU64,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> MediaError + '_ {
    move |source| MediaError::Io { path: path.to_owned(), source }
}

impl MediaArea {
    /// Create (or empty) the area at `dir`, readable by the agent's user only.
    pub async fn open(dir: PathBuf, api: Arc<OpenApi>) -> Result<Self, MediaError> {
        if tokio::fs::try_exists(&dir).await.map_err(io_err(&dir))? {
            tokio::fs::remove_dir_all(&dir).await.map_err(io_err(&dir))?;
        }
        tokio::fs::create_dir_all(&dir).await.map_err(io_err(&dir))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            tokio::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).await.map_err(io_err(&dir))?;
        }
        Ok(MediaArea { dir, api, seq: AtomicU64::new(0) })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Fetch the media behind `download_code` into the area.
    pub async fn fetch(&self, download_code: &str) -> Result<MediaFile, MediaError> {
        self.fetch_as(download_code, None, None).await
    }

    /// [`MediaArea::fetch`], keeping the extension of `file_name` (letters and digits only) so
    /// the file's kind stays visible (the name itself is still the counter), into the folder
    /// `owner` (a plain name chosen by the caller: one per person).
    pub async fn fetch_as(
        &self,
        download_code: &str,
        file_name: Option<&str>,
        owner: Option<&str>,
    ) -> Result<MediaFile, MediaError> {
        let dir = match owner {
            Some(o) if !o.is_empty() && o.chars().all(|c| c.is_ascii_alphanumeric()) => self.dir.join(o),
            _ => self.dir.clone(),
        };
        tokio::fs::create_dir_all(&dir).await.map_err(io_err(&dir))?;
        let limits = &self.api.settings().limits;
        let body = json!({ "downloadCode": download_code, "robotCode": self.api.settings().robot_code.as_str() });
        let answer = match self.api.call(DOWNLOAD_PATH, &body).await {
            Outcome::Done(v) => v,
            Outcome::Throttled(e) | Outcome::Transient(e) | Outcome::Failed(e) => return Err(MediaError::Api(e)),
        };
        let url =
            answer.get("downloadUrl").and_then(Value::as_str).filter(|s| !s.is_empty()).ok_or(MediaError::BadAnswer)?;
        let max = limits.media_max_file_bytes;
        self.api.pace(MEDIA_GET).await;
        let resp = match self.api.http().get(url, usize::try_from(max).unwrap_or(usize::MAX)).await {
            Ok(r) if r.status.is_success() => r,
            Ok(r) => return Err(MediaError::Api(format!("download answered HTTP {}", r.status.as_u16()))),
            Err(HttpError::TooLarge(_)) => return Err(MediaError::TooLarge(max)),
            Err(e) => return Err(MediaError::Http(e)),
        };
        let bytes = resp.body.len() as u64;
        self.make_room(bytes, limits.media_max_total_bytes).await?;
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let ext = file_name
            .and_then(|f| f.rsplit_once('.'))
            .map(|(_, e)| e.to_ascii_lowercase())
            .filter(|e| (1..=8).contains(&e.len()) && e.chars().all(|c| c.is_ascii_alphanumeric()))
            .unwrap_or_else(|| "bin".into());
        let path = dir.join(format!("{n:08}.{ext}"));
        let part = dir.join(format!("{n:08}.part"));
        tokio::fs::write(&part, &resp.body).await.map_err(io_err(&part))?;
        tokio::fs::rename(&part, &path).await.map_err(io_err(&path))?;
        Ok(MediaFile { path, bytes })
    }

    /// Remove the oldest files (in the area and its per-person folders) until `incoming` more
    /// bytes fit under `total`.
    async fn make_room(&self, incoming: u64, total: u64) -> Result<(), MediaError> {
        let mut entries = Vec::new();
        let mut dirs = vec![self.dir.clone()];
        while let Some(dir) = dirs.pop() {
            let mut rd = tokio::fs::read_dir(&dir).await.map_err(io_err(&dir))?;
            while let Some(e) = rd.next_entry().await.map_err(io_err(&dir))? {
                let Ok(meta) = e.metadata().await else { continue };
                if meta.is_dir() && dir == self.dir {
                    dirs.push(e.path());
                } else if meta.is_file() {
                    entries.push((e.file_name(), e.path(), meta.len()));
                }
            }
        }
        // Names are zero-padded counters: lexical order is age order.
        entries.sort();
        let mut used: u64 = entries.iter().map(|(_, _, len)| len).sum();
        for (_, path, len) in entries {
            if used + incoming <= total {
                break;
            }
            tokio::fs::remove_file(&path).await.map_err(io_err(&path))?;
            used -= len;
        }
        Ok(())
    }
}
