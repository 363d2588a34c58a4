//! The drive tools: a network drive over WebDAV (Nextcloud, Seafile, 坚果云, most NAS boxes):
//! list, search by name, download into a local root, upload from a local root (including the
//! files people sent the robot, `inbox/…`), move, and — where the server has them (Nextcloud's
//! sharing API) — public share links. Uploads, moves and links are `write` (confirmed in chat)
//! and undoable; nothing is ever overwritten, on the drive or locally.
//!
//! One account for the box (`[tools.drive] username`, the password a sealed credential); paths
//! are relative to the configured folder and cannot leave it. Never logs or audits file
//! contents or search words; the audit target is the path (a search: its size).

use std::sync::Arc;

use bytes::Bytes;
use http::Method;
use rust_i18n::t;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{
    BoxFuture, Context, Outcome, Risk, Tool, ToolError,
    dav::{Dav, DavError, Entry},
    files::Roots,
};
use crate::{dingtalk::settings::Millis, secret::Secret};

/// `[tools.drive]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DriveSettings {
    /// The WebDAV folder the tools work in (Nextcloud: `https://HOST/remote.php/dav/files/USER/`).
    /// Unset: no drive tools.
    pub url: Option<String>,
    pub username: String,
    /// On the box a credential reference (`drive-password`); Nextcloud wants an app password.
    pub password: Option<Secret>,
    /// `nextcloud`: public share links through Nextcloud's sharing API; `none`: no links.
    pub share_links: ShareLinks,
    /// Entries a listing or search returns at most.
    pub max_results: usize,
    /// Largest file downloaded or uploaded.
    pub max_file_bytes: u64,
    /// Folders a search looks into at most.
    pub max_search_folders: usize,
    pub timeout_ms: Millis,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShareLinks {
    None,
    Nextcloud,
}

impl Default for DriveSettings {
    fn default() -> Self {
        DriveSettings {
            url: None,
            username: String::new(),
            password: None,
            share_links: ShareLinks::None,
            max_results: 50,
            max_file_bytes: 64 * 1024 * 1024,
            max_search_folders: 200,
            timeout_ms: Millis::from_ms(60_000),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("[tools.drive] {0}")]
pub struct DriveSettingsError(String);

pub struct Drive {
    dav: Dav,
    settings: DriveSettings,
    roots: Arc<Roots>,
    /// Nextcloud's OCS sharing endpoint, when share links are on.
    ocs: Option<String>,
}

impl Drive {
    pub fn new(settings: &DriveSettings, roots: Arc<Roots>) -> Result<Option<Arc<Drive>>, DriveSettingsError> {
        let Some((url, ocs)) = Self::checked(settings)? else {
            return Ok(None);
        };
        let http =
            crate::dingtalk::http::HttpClient::new(crate::dingtalk::http::tls_config(), settings.timeout_ms.get());
        let dav = Dav::new(http, url, &settings.username, settings.password.as_ref(), "tools.drive");
        Ok(Some(Arc::new(Drive { dav, settings: settings.clone(), roots, ocs })))
    }

    /// The names of the tools these settings offer (none without a url).
    pub fn tool_names(settings: &DriveSettings) -> Result<Vec<&'static str>, DriveSettingsError> {
        let Some((_, ocs)) = Self::checked(settings)? else {
            return Ok(Vec::new());
        };
        Ok(ops(ocs.is_some()).into_iter().map(Op::name).collect())
    }

    /// The settings checked: the url and the sharing endpoint, or `None` when there is no drive.
    fn checked(settings: &DriveSettings) -> Result<Option<(&str, Option<String>)>, DriveSettingsError> {
        let Some(url) = settings.url.as_deref() else {
            return Ok(None);
        };
        crate::dingtalk::settings::check_url(url, "https", "http")
            .map_err(|e| DriveSettingsError(format!("url: {e}")))?;
        if settings.max_results == 0 || settings.max_search_folders == 0 || settings.max_file_bytes == 0 {
            return Err(DriveSettingsError(
                "max_results, max_search_folders and max_file_bytes must be at least 1".into(),
            ));
        }
        let ocs = match settings.share_links {
            ShareLinks::None => None,
            ShareLinks::Nextcloud => {
                let at = url.find("/remote.php/").ok_or_else(|| {
                    DriveSettingsError(
                        "share_links = \"nextcloud\" needs a Nextcloud url (…/remote.php/dav/files/USER/)".into(),
                    )
                })?;
                Some(format!("{}/ocs/v2.php/apps/files_sharing/api/v1/shares", &url[..at]))
            }
        };
        Ok(Some((url, ocs)))
    }
}

impl Drive {
    /// For `zhuli doctor`: the folder is there and the login accepted.
    pub async fn check(&self) -> Result<String, String> {
        match self.dav.stat("").await {
            Ok(Some(e)) if e.dir => Ok(format!("drive {} reachable, login accepted", self.dav.base())),
            Ok(_) => Err(format!("drive {} is not a folder", self.dav.base())),
            Err(e) => Err(format!("drive: {e}")),
        }
    }
}

fn dav_error(e: DavError) -> ToolError {
    match e {
        e @ DavError::Unauthorized(_) => ToolError::NeedsAdmin(e.to_string()),
        e @ (DavError::NotFound(_)
        | DavError::Exists(_)
        | DavError::BadPath(_)
        | DavError::Forbidden(_)
        | DavError::Changed(_)) => ToolError::Refused(e.to_string()),
        e => ToolError::Failed(e.to_string()),
    }
}

fn size(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

fn line(e: &Entry) -> String {
    let name = if e.path.is_empty() { "(top)" } else { &e.path };
    if e.dir {
        format!("{name}/")
    } else {
        let modified = e.modified.as_deref().map(|m| format!(", modified {m}")).unwrap_or_default();
        format!("{name} ({}{modified})", e.size.map(size).unwrap_or_else(|| "size unknown".into()))
    }
}

fn clean(path: &str) -> Result<String, ToolError> {
    super::dav::parts(path)
        .map(|p| p.join("/"))
        .map_err(|e| ToolError::Refused(format!("{e}; name a path inside the drive")))
}

use crate::tools::str_arg as s;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    List,
    Search,
    Download,
    Upload,
    Move,
    Share,
}

impl Op {
    /// The tool's name, as the model and the grants in `[access.roles]` see it.
    pub fn name(self) -> &'static str {
        match self {
            Op::List => "drive_list",
            Op::Search => "drive_search",
            Op::Download => "drive_download",
            Op::Upload => "drive_upload",
            Op::Move => "drive_move",
            Op::Share => "drive_share",
        }
    }
}

pub struct DriveTool {
    op: Op,
    drive: Arc<Drive>,
    parameters: Value,
}

fn ops(share: bool) -> Vec<Op> {
    let mut ops = vec![Op::List, Op::Search, Op::Download, Op::Upload, Op::Move];
    if share {
        ops.push(Op::Share);
    }
    ops
}

pub fn tools(drive: &Arc<Drive>) -> Vec<Arc<dyn Tool>> {
    ops(drive.ocs.is_some())
        .into_iter()
        .map(|op| Arc::new(DriveTool::new(op, drive.clone())) as Arc<dyn Tool>)
        .collect()
}

impl DriveTool {
    pub fn new(op: Op, drive: Arc<Drive>) -> Self {
        let string = |d: &str| json!({"type": "string", "description": d});
        let object = |props: Value, required: &[&str]| json!({"type": "object", "properties": props, "required": required, "additionalProperties": false});
        let drive_path = "a path on the drive, like reports/q3.pdf (\"\" is the top folder)";
        let parameters = match op {
            Op::List => object(json!({"path": string(drive_path)}), &[]),
            Op::Search => object(
                json!({"query": string("part of a file or folder name"), "path": string("folder to search in (default: everywhere)")}),
                &["query"],
            ),
            Op::Download => object(
                json!({"path": string(drive_path), "to": string("root/folder/name of the new local file (see files_list for the roots)")}),
                &["path", "to"],
            ),
            Op::Upload => object(
                json!({"from": string("root/folder/file of a local file; files people sent are under inbox/"), "to": string("path of the new file on the drive")}),
                &["from", "to"],
            ),
            Op::Move => {
                object(json!({"from": string(drive_path), "to": string("its new path on the drive")}), &["from", "to"])
            }
            Op::Share => object(json!({"path": string(drive_path)}), &["path"]),
        };
        DriveTool { op, drive, parameters }
    }
}

impl Tool for DriveTool {
    fn name(&self) -> &str {
        self.op.name()
    }

    fn description(&self) -> &str {
        match self.op {
            Op::List => "List a folder of the office's network drive: files with size and date, sub-folders.",
            Op::Search => "Find files and folders on the network drive whose name contains the query.",
            Op::Download => "Copy a file from the network drive into one of the box's folders (undoable).",
            Op::Upload => {
                "Copy a file from the box's folders (or one a person sent, under inbox/) onto the network drive; never overwrites (asks the user to confirm; undoable)."
            }
            Op::Move => {
                "Move or rename a file or folder on the network drive; never overwrites (asks the user to confirm; undoable)."
            }
            Op::Share => {
                "Make a public read-only link to a file or folder on the network drive (asks the user to confirm; undo removes the link)."
            }
        }
    }

    fn parameters(&self) -> &Value {
        &self.parameters
    }

    fn risk(&self) -> Risk {
        match self.op {
            Op::List | Op::Search => Risk::Read,
            // Out of the box and onto the drive, or a link anyone holding it can follow.
            Op::Upload | Op::Share => Risk::Share,
            Op::Download | Op::Move => Risk::Write,
        }
    }

    fn target(&self, args: &Value) -> String {
        match self.op {
            Op::List => format!("drive:{}", s(args, "path")),
            Op::Search => format!("drive:{} search {}", s(args, "path"), super::size(s(args, "query"))),
            Op::Download => format!("drive:{} to {}", s(args, "path"), s(args, "to")),
            Op::Upload => format!("{} to drive:{}", s(args, "from"), s(args, "to")),
            Op::Move => format!("drive:{} to drive:{}", s(args, "from"), s(args, "to")),
            Op::Share => format!("link to drive:{}", s(args, "path")),
        }
        .chars()
        .take(200)
        .collect()
    }

    fn prepare<'a>(&'a self, _ctx: &'a Context, args: Value) -> BoxFuture<'a, Result<Value, ToolError>> {
        Box::pin(async move {
            let d = &self.drive.dav;
            match self.op {
                Op::Upload => {
                    let to = clean(s(&args, "to"))?;
                    self.absent(&to).await?;
                    self.parent_exists(&to).await?;
                }
                Op::Move => {
                    let (from, to) = (clean(s(&args, "from"))?, clean(s(&args, "to"))?);
                    if from.is_empty() {
                        return Err(ToolError::Refused("the top folder cannot be moved".into()));
                    }
                    d.stat(&from)
                        .await
                        .map_err(dav_error)?
                        .ok_or_else(|| ToolError::Refused(format!("{from} does not exist on the drive")))?;
                    self.absent(&to).await?;
                    self.parent_exists(&to).await?;
                }
                Op::Share => {
                    let path = clean(s(&args, "path"))?;
                    d.stat(&path)
                        .await
                        .map_err(dav_error)?
                        .ok_or_else(|| ToolError::Refused(format!("{path} does not exist on the drive")))?;
                }
                _ => {}
            }
            Ok(args)
        })
    }

    fn execute<'a>(&'a self, ctx: &'a Context, args: Value) -> BoxFuture<'a, Result<Outcome, ToolError>> {
        Box::pin(async move {
            match self.op {
                Op::List => self.list(s(&args, "path")).await,
                Op::Search => self.search(s(&args, "query"), s(&args, "path")).await,
                Op::Download => self.download(ctx, s(&args, "path"), s(&args, "to")).await,
                Op::Upload => self.upload(ctx, s(&args, "from"), s(&args, "to")).await,
                Op::Move => self.move_path(s(&args, "from"), s(&args, "to")).await,
                Op::Share => self.share(s(&args, "path")).await,
            }
        })
    }

    fn undo<'a>(&'a self, ctx: &'a Context, payload: &'a [u8]) -> BoxFuture<'a, Result<String, ToolError>> {
        Box::pin(async move {
            let bad = || ToolError::Failed("unreadable undo record".into());
            let p: Value = serde_json::from_slice(payload).map_err(|_| bad())?;
            let d = &self.drive.dav;
            match p["kind"].as_str() {
                Some("local") => {
                    let file = std::path::PathBuf::from(p["file"].as_str().ok_or_else(bad)?);
                    let shown = self.drive.roots.scoped(&ctx.actor).remove_saved(&file)?;
                    Ok(t!("undo.removed", path = shown).into_owned())
                }
                Some("uploaded") => {
                    let path = clean(s(&p, "path"))?;
                    let url = d.url(&path, false).map_err(ToolError::Failed)?;
                    // Only the file as uploaded: if someone changed it since, it stays.
                    let etag = p["etag"].as_str();
                    let headers: Vec<(&str, &str)> = etag.map(|e| vec![("if-match", e)]).unwrap_or_default();
                    d.send(Method::DELETE, &url, &headers, Bytes::new(), 64 * 1024).await.map_err(dav_error)?;
                    Ok(t!("undo.removed", path = format!("drive:{path}")).into_owned())
                }
                Some("moved") => {
                    let (from, to) = (clean(s(&p, "from"))?, clean(s(&p, "to"))?);
                    self.dav_move(&to, &from, p["dir"].as_bool().unwrap_or(false)).await?;
                    Ok(t!("undo.moved_back", from = format!("drive:{to}"), to = format!("drive:{from}")).into_owned())
                }
                Some("shared") => {
                    let id = s(&p, "id");
                    let ocs =
                        self.drive.ocs.as_deref().ok_or_else(|| ToolError::Failed("share links are off now".into()))?;
                    if !id.chars().all(|c| c.is_ascii_alphanumeric()) || id.is_empty() {
                        return Err(bad());
                    }
                    let url = format!("{ocs}/{id}?format=json");
                    d.send(Method::DELETE, &url, &[("ocs-apirequest", "true")], Bytes::new(), 64 * 1024)
                        .await
                        .map_err(dav_error)?;
                    Ok(t!("undo.unshared", path = format!("drive:{}", s(&p, "path"))).into_owned())
                }
                _ => Err(bad()),
            }
        })
    }
}

impl DriveTool {
    async fn absent(&self, path: &str) -> Result<(), ToolError> {
        if path.is_empty() {
            return Err(ToolError::Refused("name the new file, not the top folder".into()));
        }
        match self.drive.dav.stat(path).await.map_err(dav_error)? {
            Some(_) => Err(ToolError::Refused(format!("drive:{path} already exists; choose another name"))),
            None => Ok(()),
        }
    }

    async fn parent_exists(&self, path: &str) -> Result<(), ToolError> {
        let parent = path.rsplit_once('/').map(|(p, _)| p).unwrap_or("");
        match self.drive.dav.stat(parent).await.map_err(dav_error)? {
            Some(e) if e.dir => Ok(()),
            _ => Err(ToolError::Refused(format!("the folder drive:{parent} does not exist"))),
        }
    }

    async fn list(&self, path: &str) -> Result<Outcome, ToolError> {
        let path = clean(path)?;
        let entries = self.drive.dav.propfind(&path, 1, 8 * 1024 * 1024).await.map_err(dav_error)?;
        let (this, mut inside): (Vec<Entry>, Vec<Entry>) = entries.into_iter().partition(|e| e.path == path);
        if this.first().is_some_and(|e| !e.dir) {
            return Ok(Outcome::text(line(&this[0])));
        }
        inside.sort_by(|a, b| b.dir.cmp(&a.dir).then(a.path.cmp(&b.path)));
        let shown = if path.is_empty() { "the top folder".to_owned() } else { format!("drive:{path}") };
        if inside.is_empty() {
            return Ok(Outcome::text(format!("{shown} is empty")));
        }
        let max = self.drive.settings.max_results;
        let mut text = format!("{} entries in {shown}:\n", inside.len());
        for e in inside.iter().take(max) {
            text.push_str(&format!("- {}\n", line(e)));
        }
        if inside.len() > max {
            text.push_str(&format!("(first {max} shown)\n"));
        }
        Ok(Outcome::text(text))
    }

    async fn search(&self, query: &str, path: &str) -> Result<Outcome, ToolError> {
        let q = query.trim().to_lowercase();
        if q.is_empty() {
            return Err(ToolError::Refused("`query` is empty".into()));
        }
        let start = clean(path)?;
        let (max, max_folders) = (self.drive.settings.max_results, self.drive.settings.max_search_folders);
        let mut queue = std::collections::VecDeque::from([start.clone()]);
        let (mut found, mut visited, mut complete) = (Vec::new(), 0usize, true);
        while let Some(folder) = queue.pop_front() {
            if visited == max_folders || found.len() >= max {
                complete = false;
                break;
            }
            visited += 1;
            let entries = match self.drive.dav.propfind(&folder, 1, 8 * 1024 * 1024).await {
                Ok(e) => e,
                // A folder that vanished or is closed to the account does not end the search.
                Err(DavError::NotFound(_) | DavError::Forbidden(_)) if folder != start => continue,
                Err(e) => return Err(dav_error(e)),
            };
            for e in entries.into_iter().filter(|e| e.path != folder) {
                let name = e.path.rsplit('/').next().unwrap_or(&e.path).to_lowercase();
                if name.contains(&q) && found.len() < max {
                    found.push(line(&e));
                }
                if e.dir {
                    queue.push_back(e.path);
                }
            }
        }
        complete &= queue.is_empty();
        let mut text = format!("{} matches for “{query}” on the drive ({visited} folders looked at)\n", found.len());
        for f in &found {
            text.push_str(&format!("- {f}\n"));
        }
        if !complete {
            text.push_str("(the search stopped at its limit; name a folder to search in)\n");
        }
        Ok(Outcome::text(text))
    }

    async fn download(&self, ctx: &Context, path: &str, to: &str) -> Result<Outcome, ToolError> {
        let path = clean(path)?;
        let d = &self.drive.dav;
        let entry = d
            .stat(&path)
            .await
            .map_err(dav_error)?
            .ok_or_else(|| ToolError::Refused(format!("drive:{path} does not exist")))?;
        let max = self.drive.settings.max_file_bytes;
        if entry.dir {
            return Err(ToolError::Refused(format!("drive:{path} is a folder; download its files one by one")));
        }
        if entry.size.is_some_and(|n| n > max) {
            return Err(ToolError::Refused(format!(
                "drive:{path} is {}; files over {} are not downloaded",
                size(entry.size.unwrap_or(0)),
                size(max)
            )));
        }
        let url = d.url(&path, false).map_err(ToolError::Refused)?;
        let resp = d.send(Method::GET, &url, &[], Bytes::new(), max as usize).await.map_err(|e| match e {
            DavError::Http(crate::dingtalk::http::HttpError::TooLarge(_)) => {
                ToolError::Refused(format!("drive:{path} is larger than {}", size(max)))
            }
            e => dav_error(e),
        })?;
        let roots = self.drive.roots.scoped(&ctx.actor);
        let (shown, file) = roots.save_new(to, &resp.body)?;
        let undo = json!({"kind": "local", "file": file.to_string_lossy()});
        Ok(Outcome {
            text: format!("downloaded drive:{path} to {shown} ({})", size(resp.body.len() as u64)),
            undo: Some((undo.to_string().into_bytes(), format!("remove {shown}"))),
        })
    }

    async fn upload(&self, ctx: &Context, from: &str, to: &str) -> Result<Outcome, ToolError> {
        let to = clean(to)?;
        let roots = self.drive.roots.scoped(&ctx.actor);
        let (shown, _, bytes) = roots.read_bytes(from, self.drive.settings.max_file_bytes)?;
        let d = &self.drive.dav;
        // Checked again right before writing: many servers ignore `If-None-Match: *`.
        self.absent(&to).await?;
        let url = d.url(&to, false).map_err(ToolError::Refused)?;
        let n = bytes.len() as u64;
        let resp = d
            .send(
                Method::PUT,
                &url,
                &[("if-none-match", "*"), ("content-type", "application/octet-stream")],
                Bytes::from(bytes),
                64 * 1024,
            )
            .await
            .map_err(dav_error)?;
        let etag = resp.header("etag").map(str::to_owned);
        let undo = json!({"kind": "uploaded", "path": to, "etag": etag});
        Ok(Outcome {
            text: format!("uploaded {shown} to drive:{to} ({})", size(n)),
            undo: Some((undo.to_string().into_bytes(), format!("remove drive:{to}"))),
        })
    }

    async fn dav_move(&self, from: &str, to: &str, dir: bool) -> Result<(), ToolError> {
        let d = &self.drive.dav;
        let (src, dst) = (d.url(from, dir).map_err(ToolError::Refused)?, d.url(to, dir).map_err(ToolError::Refused)?);
        d.send(
            Method::from_bytes(b"MOVE").expect("MOVE is a method"),
            &src,
            &[("destination", &dst), ("overwrite", "F")],
            Bytes::new(),
            64 * 1024,
        )
        .await
        .map_err(dav_error)?;
        Ok(())
    }

    async fn move_path(&self, from: &str, to: &str) -> Result<Outcome, ToolError> {
        let (from, to) = (clean(from)?, clean(to)?);
        let entry = self
            .drive
            .dav
            .stat(&from)
            .await
            .map_err(dav_error)?
            .ok_or_else(|| ToolError::Refused(format!("drive:{from} does not exist")))?;
        self.dav_move(&from, &to, entry.dir).await?;
        let undo = json!({"kind": "moved", "from": from, "to": to, "dir": entry.dir});
        Ok(Outcome {
            text: format!("moved drive:{from} to drive:{to}"),
            undo: Some((undo.to_string().into_bytes(), format!("move drive:{to} back to drive:{from}"))),
        })
    }

    async fn share(&self, path: &str) -> Result<Outcome, ToolError> {
        let path = clean(path)?;
        let ocs =
            self.drive.ocs.as_deref().ok_or_else(|| ToolError::Refused("this drive has no share links".into()))?;
        // Nextcloud's sharing API: shareType 3 is a public link, permissions 1 read-only.
        let form = format!("path={}&shareType=3&permissions=1", crate::dingtalk::openapi::encode(&format!("/{path}")));
        let resp = self
            .drive
            .dav
            .send(
                Method::POST,
                &format!("{ocs}?format=json"),
                &[
                    ("ocs-apirequest", "true"),
                    ("content-type", "application/x-www-form-urlencoded"),
                    ("accept", "application/json"),
                ],
                Bytes::from(form),
                256 * 1024,
            )
            .await
            .map_err(dav_error)?;
        let v = resp.json();
        let data = &v["ocs"]["data"];
        let (Some(url), Some(id)) = (
            data["url"].as_str(),
            data["id"].as_str().map(str::to_owned).or(data["id"].as_u64().map(|n| n.to_string())),
        ) else {
            let msg = v["ocs"]["meta"]["message"].as_str().unwrap_or("no link in the answer");
            return Err(ToolError::Failed(format!(
                "the server made no link: {}",
                msg.chars().take(200).collect::<String>()
            )));
        };
        let undo = json!({"kind": "shared", "id": id, "path": path});
        Ok(Outcome {
            text: format!("read-only link to drive:{path}: {url}"),
            undo: Some((undo.to_string().into_bytes(), format!("remove the link to drive:{path}"))),
        })
    }
}
