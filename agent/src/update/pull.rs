//! Pulling a release from the vendor's HTTPS folder, and when the box may install it by itself.
//!
//! The folder holds one bundle, the newest (`SHA256SUMS`, its signature, the manifest and the
//! files). The box reads the signed sums first (a few hundred bytes) and the manifest; only when
//! the release is newer than the running one does it fetch the rest, into
//! `/var/lib/zhuli-update/download/<version>/`. Each file is fetched into `<name>.part`, resumed
//! with a range request where the last try stopped, and kept only when its sha256 is the signed
//! one. Installing is [`super::install`], which checks the whole folder again.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use super::{BundleError, MANIFEST, SIGNATURE, SUMS, Version};
use crate::dingtalk::http::{HttpClient, HttpError};

/// The longest a new release may take to become healthy: the boot check's unit gives itself
/// 15 minutes (`TimeoutStartSec`), and must end by its own verdict before that.
pub const HEALTHY_WITHIN_MAX_S: u64 = 840;

/// `[update]` of the configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpdateSettings {
    /// The HTTPS folder the vendor publishes the newest release in (ending in `/`); empty: the
    /// box takes updates from its stick only.
    pub source: String,
    /// When the box may install a release and restart by itself, in the office's time
    /// (`[assistant] utc_offset_minutes`): `"Sun 03:00-05:00"`, `"daily 02:00-04:00"`,
    /// `"Sat,Sun 01:00-06:00"`, or `"never"` (only `/update install` in the admin chat).
    pub window: String,
    /// Boots a new release gets before the box goes back to the one before.
    pub tries: u32,
    /// How long the agent must run healthy on a new release before it is kept, in seconds.
    pub healthy_for_s: u64,
    /// How long a new release has to get there, in seconds.
    pub healthy_within_s: u64,
}

impl Default for UpdateSettings {
    fn default() -> Self {
        UpdateSettings {
            source: String::new(),
            window: "Sun 03:00-05:00".into(),
            tries: 3,
            healthy_for_s: 120,
            healthy_within_s: 600,
        }
    }
}

/// What root's update units read of the agent's configuration: `[update]`, the office's UTC
/// offset and the extra CAs, and nothing else (the secrets stay sealed: root never opens them for
/// an update).
#[derive(Debug, Clone, Default)]
pub struct ForUpdates {
    pub update: UpdateSettings,
    pub utc_offset_minutes: i32,
    pub extra_ca_pem: Option<String>,
}

impl ForUpdates {
    pub fn parse(text: &str) -> Result<Self, String> {
        #[derive(Deserialize, Default)]
        #[serde(default)]
        struct Agent {
            extra_ca_pem: Option<String>,
        }
        #[derive(Deserialize)]
        #[serde(default)]
        struct Assistant {
            utc_offset_minutes: i32,
        }
        impl Default for Assistant {
            fn default() -> Self {
                Assistant {
                    utc_offset_minutes: crate::assistant::settings::AssistantSettings::default().utc_offset_minutes,
                }
            }
        }
        #[derive(Deserialize, Default)]
        #[serde(default)]
        struct View {
            update: UpdateSettings,
            agent: Agent,
            assistant: Assistant,
        }
        let v: View = toml::from_str(text)
            .map_err(|e| format!("the configuration's [update] cannot be read: {}", e.message()))?;
        v.update.window.parse::<Window>().map_err(|e| format!("[update] window: {e}"))?;
        Ok(ForUpdates {
            update: v.update,
            utc_offset_minutes: v.assistant.utc_offset_minutes,
            extra_ca_pem: v.agent.extra_ca_pem,
        })
    }
}

/// A maintenance window: days of the week and a time span (it may run past midnight; the day is
/// the one it starts on).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// Monday first.
    days: [bool; 7],
    start: u32,
    end: u32,
}

const DAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];

impl std::str::FromStr for Window {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "{s:?} is not a maintenance window: write days and a time span, like \"Sun 03:00-05:00\", \"daily 02:00-04:00\" or \"Sat,Sun 01:00-06:00\"; or \"never\""
            )
        };
        if s.trim() == "never" {
            return Ok(Window { days: [false; 7], start: 0, end: 0 });
        }
        let (days_text, span) = s.trim().split_once(' ').ok_or_else(bad)?;
        let mut days = [false; 7];
        if days_text == "daily" {
            days = [true; 7];
        } else {
            for d in days_text.split(',') {
                let i = DAYS.iter().position(|n| n.eq_ignore_ascii_case(d.trim())).ok_or_else(bad)?;
                days[i] = true;
            }
        }
        let minutes = |t: &str| -> Option<u32> {
            let (h, m) = t.trim().split_once(':')?;
            let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
            (h < 24 && m < 60 && t.trim().len() == 5).then_some(h * 60 + m)
        };
        let (a, b) = span.split_once('-').ok_or_else(bad)?;
        let (start, end) = (minutes(a).ok_or_else(bad)?, minutes(b).ok_or_else(bad)?);
        if start == end {
            return Err(bad());
        }
        Ok(Window { days, start, end })
    }
}

impl Window {
    /// Is `unix_ms` inside the window, in a time zone `offset_minutes` east of UTC?
    pub fn contains(&self, unix_ms: i64, offset_minutes: i32) -> bool {
        let local_min = unix_ms.div_euclid(60_000) + i64::from(offset_minutes);
        let day = local_min.div_euclid(1440);
        let minute = local_min.rem_euclid(1440) as u32;
        // 1970-01-01 was a Thursday (index 3, Monday first).
        let weekday = |d: i64| (d + 3).rem_euclid(7) as usize;
        if self.start < self.end {
            self.days[weekday(day)] && (self.start..self.end).contains(&minute)
        } else {
            (self.days[weekday(day)] && minute >= self.start) || (self.days[weekday(day - 1)] && minute < self.end)
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error("{0}")]
    Http(#[from] HttpError),
    #[error("{url} answered {status}; the release folder is not reachable as configured ([update] source)")]
    Status { url: String, status: u16 },
    #[error("{url} stopped sending for {idle_s} s; the download resumes at the next try")]
    Stalled { url: String, idle_s: u64 },
    #[error("{name} arrived damaged (its sha256 is not the signed one); it is fetched again at the next try")]
    Damaged { name: String },
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("{0}")]
    Refused(String),
    #[error(
        "{url} answered a part that does not start where the download stopped ({range:?}); the download starts over at the next try"
    )]
    Range { url: String, range: String },
    #[error(
        "{name} needs {need_mib} MiB on /var, but only {free_mib} MiB are free; free space on the box (old snapshots can go once copied off), then try again"
    )]
    Space { name: String, need_mib: u64, free_mib: u64 },
}

impl PullError {
    /// The reason as a code the admin chat says in the box's language (see [`super::news`]).
    pub fn code(&self) -> &'static str {
        match self {
            PullError::Bundle(b) => b.code(),
            PullError::Damaged { .. } => "digest",
            PullError::Space { .. } => "space",
            PullError::Refused(_) => "malformed",
            PullError::Io { .. } => "write",
            PullError::Http(_) | PullError::Status { .. } | PullError::Stalled { .. } | PullError::Range { .. } => {
                "network"
            }
        }
    }

    /// A refusal of the release itself (told to the admins at once), not a hiccup on the way
    /// (tried again next hour).
    pub fn is_refusal(&self) -> bool {
        matches!(self, PullError::Bundle(_) | PullError::Damaged { .. } | PullError::Refused(_))
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> PullError {
    let what = what.into();
    move |source| PullError::Io { what, source }
}

/// What a look at the release folder found.
#[derive(Debug)]
pub enum Found {
    /// The folder's release is not newer than the running one.
    UpToDate(Version),
    /// A newer release, fetched whole into this folder.
    Fetched { version: Version, dir: PathBuf },
}

/// The most a file of the bundle may weigh: a part no more than its unpacked bytes and zstd's
/// worst case over them, the kernel image no more than the ESP holds, anything else 1 MiB.
pub(crate) fn most(manifest: &super::Manifest, name: &str) -> u64 {
    let part = |bytes: u64| bytes + bytes / 64 + (1 << 20);
    if name == manifest.root.file {
        part(manifest.root.bytes)
    } else if name == manifest.verity.file {
        part(manifest.verity.bytes)
    } else if name == manifest.uki {
        256 << 20
    } else {
        1 << 20
    }
}
/// Room left free on /var whatever a download needs.
pub(crate) const RESERVE: u64 = 64 << 20;
/// A download that receives nothing for this long is stopped (and resumed at the next try).
const IDLE: Duration = Duration::from_secs(60);

/// Look at the release folder `source` and, when it holds a release newer than `running`,
/// fetch it into `downloads/<version>/`. `progress` hears each step.
pub async fn fetch(
    client: &HttpClient,
    source: &str,
    vendor_key: &str,
    running: &Version,
    downloads: &Path,
    mut progress: impl FnMut(String),
) -> Result<Found, PullError> {
    let base = if source.ends_with('/') { source.to_owned() } else { format!("{source}/") };
    let small = |name: &'static str| {
        let url = format!("{base}{name}");
        async move {
            let r = client.get(&url, 256 * 1024).await?;
            if !r.status.is_success() {
                return Err(PullError::Status { url: crate::dingtalk::http::redact(&url), status: r.status.as_u16() });
            }
            Ok(r.body.to_vec())
        }
    };
    let sums = small(SUMS).await?;
    let signature = match small(SIGNATURE).await {
        Err(PullError::Status { status: 404, .. }) => return Err(BundleError::Unsigned.into()),
        other => other?,
    };
    let (_, listed) = super::signed_sums(&sums, &signature, vendor_key)?;
    let manifest_bytes = small(MANIFEST).await?;
    let head = super::signed_manifest(&listed, &manifest_bytes)?;
    match head.version.cmp(running) {
        std::cmp::Ordering::Equal => return Ok(Found::UpToDate(head.version)),
        std::cmp::Ordering::Less => {
            return Err(BundleError::Downgrade { offered: head.version, running: running.clone() }.into());
        }
        std::cmp::Ordering::Greater => {}
    }
    let dir = downloads.join(head.version.to_string());
    std::fs::create_dir_all(&dir).map_err(io(format!("cannot create {}", dir.display())))?;
    // Folders of other releases (older downloads) go: one download at a time.
    if let Ok(list) = std::fs::read_dir(downloads) {
        for other in list.filter_map(Result::ok).filter(|e| e.path() != dir) {
            let _ = std::fs::remove_dir_all(other.path());
        }
    }
    for (name, bytes) in [(SUMS, &sums), (SIGNATURE, &signature), (MANIFEST, &manifest_bytes)] {
        std::fs::write(dir.join(name), bytes).map_err(io(format!("cannot write {name}")))?;
    }
    for (digest, name) in listed.iter().filter(|(_, n)| n != MANIFEST) {
        let path = dir.join(name);
        if path.exists() && sha256_file(&path)? == *digest {
            continue;
        }
        progress(format!("fetching {name}"));
        download(client, &format!("{base}{name}"), &path, digest, most(&head, name)).await?;
    }
    progress(format!("release {} fetched whole into {}", head.version, dir.display()));
    Ok(Found::Fetched { version: head.version, dir })
}

fn sha256_file(path: &Path) -> Result<String, PullError> {
    let mut f = std::fs::File::open(path).map_err(io(format!("cannot read {}", path.display())))?;
    crate::tools::sha256_of_read(&mut f).map_err(io(format!("cannot read {}", path.display())))
}

/// Fetch `url` into `path` through `path.part`, resuming where an earlier try stopped; at most
/// `max` bytes, and only when /var has room for them.
async fn download(client: &HttpClient, url: &str, path: &Path, digest: &str, max: u64) -> Result<(), PullError> {
    use http_body_util::BodyExt;
    use std::io::Write;
    let part =
        path.with_file_name(format!("{}.part", path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()));
    let have = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
    let range = format!("bytes={have}-");
    let headers: Vec<(&str, &str)> = if have > 0 { vec![("range", range.as_str())] } else { vec![] };
    let resp = client.get_streaming(url, &headers).await?;
    let status = resp.status().as_u16();
    let shown = crate::dingtalk::http::redact(url);
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if status == 206 {
        // The part must continue ours, not be any part the server chose.
        let range = resp.headers().get("content-range").and_then(|v| v.to_str().ok()).unwrap_or_default();
        if !range.starts_with(&format!("bytes {have}-")) {
            let _ = std::fs::remove_file(&part);
            return Err(PullError::Range { url: shown, range: range.to_owned() });
        }
    }
    let coming = resp
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    if let Some(dir) = part.parent()
        && let Ok(s) = nix::sys::statvfs::statvfs(dir)
    {
        let free = s.blocks_available() * s.fragment_size();
        if coming + RESERVE > free {
            return Err(PullError::Space {
                name,
                need_mib: (coming + RESERVE).div_ceil(1 << 20),
                free_mib: free >> 20,
            });
        }
    }
    let mut file = match status {
        206 => std::fs::OpenOptions::new().append(true).open(&part),
        200 => std::fs::File::create(&part),
        // Nothing left to send: the part is whole (its sha256 decides).
        416 if have > 0 => std::fs::OpenOptions::new().append(true).open(&part),
        _ => return Err(PullError::Status { url: shown, status }),
    }
    .map_err(io(format!("cannot write {}", part.display())))?;
    let mut got = if status == 206 || status == 416 { have } else { 0 };
    let mut body = resp.into_body();
    if status != 416 {
        loop {
            let frame = tokio::time::timeout(IDLE, body.frame())
                .await
                .map_err(|_| PullError::Stalled { url: shown.clone(), idle_s: IDLE.as_secs() })?;
            let Some(frame) = frame else { break };
            let frame = frame.map_err(|e| HttpError::Transport {
                url: shown.clone(),
                reason: crate::dingtalk::http::error_chain(&e),
            })?;
            if let Ok(data) = frame.into_data() {
                got += data.len() as u64;
                if got > max {
                    let _ = std::fs::remove_file(&part);
                    return Err(PullError::Refused(format!(
                        "{shown} is larger than the {max} bytes its manifest allows: not this release's file"
                    )));
                }
                file.write_all(&data).map_err(io(format!("cannot write {}", part.display())))?;
            }
        }
    }
    file.sync_all().map_err(io(format!("cannot flush {}", part.display())))?;
    drop(file);
    if sha256_file(&part)? != digest {
        let _ = std::fs::remove_file(&part);
        return Err(PullError::Damaged { name });
    }
    std::fs::rename(&part, path).map_err(io(format!("cannot rename {}", part.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(day: &str, hh: i64, mm: i64) -> i64 {
        // 2026-11-30 was a Monday; times are local, 8 hours east of UTC.
        let monday = 1_795_996_800_000i64 - 8 * 3_600_000;
        let d = DAYS.iter().position(|n| *n == day).expect("day") as i64;
        monday + d * 86_400_000 + (hh * 60 + mm) * 60_000
    }

    #[test]
    fn root_reads_only_what_updates_need_and_never_a_secret() {
        let text = "[agent]\nextra_ca_pem = \"PEM\"\n[dingtalk]\nclient_secret = { credential = \"dingtalk-client-secret\" }\n\
                    [assistant]\nutc_offset_minutes = 60\n[update]\nsource = \"https://u.example/\"\ntries = 2\n";
        let f = ForUpdates::parse(text).expect("parse");
        assert_eq!((f.update.source.as_str(), f.update.tries, f.utc_offset_minutes), ("https://u.example/", 2, 60));
        assert_eq!(f.extra_ca_pem.as_deref(), Some("PEM"));
        assert_eq!(f.update.window, "Sun 03:00-05:00");
        let none = ForUpdates::parse("[dingtalk]\nclient_id = \"x\"\n").expect("no [update]");
        assert_eq!((none.update.source.as_str(), none.utc_offset_minutes), ("", 480));
        let e = ForUpdates::parse("[update]\nwindow = \"sometimes\"\n").expect_err("bad window");
        assert!(e.contains("[update] window"), "{e}");
    }

    #[test]
    fn windows_hold_their_days_and_hours_in_the_office_time() {
        let w: Window = "Sun 03:00-05:00".parse().expect("window");
        assert!(w.contains(at("Sun", 3, 0), 480));
        assert!(w.contains(at("Sun", 4, 59), 480));
        assert!(!w.contains(at("Sun", 5, 0), 480));
        assert!(!w.contains(at("Sat", 4, 0), 480));
        assert!(!w.contains(at("Sun", 2, 59), 480));
        // The same instant seen in UTC is another hour.
        assert!(!w.contains(at("Sun", 4, 0), 0));
        let night: Window = "Fri 23:00-01:00".parse().expect("window");
        assert!(night.contains(at("Fri", 23, 30), 480));
        assert!(night.contains(at("Sat", 0, 30), 480), "past midnight counts for the day it started");
        assert!(!night.contains(at("Sat", 23, 30), 480));
        let daily: Window = "daily 02:00-04:00".parse().expect("daily");
        assert!(DAYS.iter().all(|d| daily.contains(at(d, 3, 0), 480)));
        let never: Window = "never".parse().expect("never");
        assert!(DAYS.iter().all(|d| (0..24).all(|h| !never.contains(at(d, h, 0), 480))));
        assert!("Sat,sun 01:00-06:00".parse::<Window>().is_ok_and(|w| w.contains(at("Sun", 5, 0), 480)));
        for bad in
            ["Sunday 03:00-05:00", "Sun 3:00-05:00", "Sun 03:00", "Sun 25:00-26:00", "03:00-05:00", "Sun 03:00-03:00"]
        {
            let e = bad.parse::<Window>().expect_err(bad);
            assert!(e.contains("Sun 03:00-05:00"), "{e}");
        }
    }

    /// A signed bundle of `version` in `dir`; its root file's bytes.
    fn bundle(dir: &Path, key: &str, version: &str) -> Vec<u8> {
        std::fs::create_dir_all(dir).expect("dir");
        let root: Vec<u8> = (0..400_000u32).map(|i| (i * 7 % 253) as u8).collect();
        let verity = vec![3u8; 4096];
        std::fs::write(dir.join(format!("zhuli_{version}.root.raw")), &root).expect("root");
        std::fs::write(dir.join(format!("zhuli_{version}.verity.raw")), &verity).expect("verity");
        std::fs::write(
            dir.join(format!("zhuli_{version}.efi")),
            super::super::tests::fake_uki(version, &"a".repeat(64)),
        )
        .expect("uki");
        std::fs::write(
            dir.join(MANIFEST),
            format!(
                "product = \"zhuli\"\nversion = \"{version}\"\narchitecture = \"x86-64\"\nuki = \"zhuli_{version}.efi\"\n\
                 root_hash = \"{}\"\n[root]\nfile = \"zhuli_{version}.root.raw\"\nbytes = {}\nsha256 = \"{}\"\n\
                 [verity]\nfile = \"zhuli_{version}.verity.raw\"\nbytes = 4096\nsha256 = \"{}\"\n",
                "a".repeat(64),
                root.len(),
                crate::tools::sha256_hex(&root),
                crate::tools::sha256_hex(&verity)
            ),
        )
        .expect("manifest");
        super::super::seal_bundle(dir, key).expect("sign");
        root
    }

    /// Serve `folder` on loopback; the first GET of a `.root.raw` file without a range stops
    /// half-way (the connection breaks), as a flaky network does.
    /// What the test server does: count range requests, break the next plain download of a
    /// root half-way, answer a range request with the whole file as if it were the part.
    #[derive(Clone, Default)]
    struct Controls {
        ranges: std::sync::Arc<std::sync::atomic::AtomicUsize>,
        cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
        lie: std::sync::Arc<std::sync::atomic::AtomicBool>,
    }

    async fn server(folder: std::sync::Arc<std::sync::Mutex<PathBuf>>) -> (String, Controls) {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}/", listener.local_addr().expect("addr"));
        let controls = Controls::default();
        controls.cut.store(true, Ordering::SeqCst);
        let seen = controls.clone();
        zhuli_sim::serve::spawn(listener, tokio_util::sync::CancellationToken::new(), move |req| {
            let (folder, c) = (folder.clone(), controls.clone());
            async move {
                type Chunk = Result<hyper::body::Frame<bytes::Bytes>, std::io::Error>;
                // Each piece after a moment, so that the first is on the wire before a break.
                let body = |chunks: Vec<Chunk>| {
                    use futures_util::StreamExt;
                    http_body_util::StreamBody::new(futures_util::stream::iter(chunks).then(|c| async move {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        c
                    }))
                };
                let respond = |status: u16, chunks: Vec<Chunk>| {
                    http::Response::builder().status(status).body(body(chunks)).expect("response")
                };
                let partial = |range: String, chunks: Vec<Chunk>| {
                    http::Response::builder()
                        .status(206)
                        .header("content-range", range)
                        .body(body(chunks))
                        .expect("response")
                };
                let name = req.uri().path().trim_start_matches('/').to_owned();
                let dir = folder.lock().expect("folder").clone();
                let Ok(all) = std::fs::read(dir.join(&name)) else { return respond(404, vec![]) };
                let frame = |b: &[u8]| Ok(hyper::body::Frame::data(bytes::Bytes::copy_from_slice(b)));
                match req.headers().get("range").and_then(|v| v.to_str().ok()) {
                    Some(r) => {
                        c.ranges.fetch_add(1, Ordering::SeqCst);
                        let from: usize = r.trim_start_matches("bytes=").trim_end_matches('-').parse().expect("range");
                        let from = if c.lie.load(Ordering::SeqCst) { 0 } else { from };
                        let range = format!("bytes {from}-{}/{}", all.len() - 1, all.len());
                        partial(range, vec![frame(&all[from..])])
                    }
                    None if name.ends_with(".root.raw") && c.cut.swap(false, Ordering::SeqCst) => {
                        let half = all.len() / 2;
                        respond(200, vec![frame(&all[..half]), Err(std::io::Error::other("cable pulled"))])
                    }
                    None => respond(200, vec![frame(&all)]),
                }
            }
        });
        (url, seen)
    }

    #[tokio::test]
    async fn a_release_is_fetched_whole_across_a_broken_download_and_bad_ones_are_refused() {
        use crate::provision::sign::{self, Role};
        let base = std::env::temp_dir().join(format!("zhuli-pull-{}-{:x}", std::process::id(), rand::random::<u32>()));
        let (key, public) = sign::keygen_for(Role::Vendor);
        let vendor = sign::public_key_for(Role::Vendor, &public, "vendor.pub").expect("pub");
        let root = bundle(&base.join("n1"), &key, "1.1.0");
        let folder = std::sync::Arc::new(std::sync::Mutex::new(base.join("n1")));
        let (url, controls) = server(folder.clone()).await;
        let ranges = controls.ranges.clone();
        let client = HttpClient::new(crate::dingtalk::http::tls_config(), Duration::from_secs(10));
        let downloads = base.join("download");
        let running: Version = "1.0.0".parse().expect("v");
        let fetch_now = || fetch(&client, &url, &vendor, &running, &downloads, |_| {});

        // The first try breaks half-way through the root: what came is kept for the next.
        let e = fetch_now().await.expect_err("the cable was pulled");
        assert!(matches!(e, PullError::Http(_)), "{e}");
        let part = downloads.join("1.1.0/zhuli_1.1.0.root.raw.part");
        assert_eq!(std::fs::metadata(&part).expect("part").len(), root.len() as u64 / 2);
        // The next resumes there, and the folder is a bundle the box's check passes.
        let Found::Fetched { version, dir } = fetch_now().await.expect("fetched") else { panic!("not fetched") };
        assert_eq!(version.to_string(), "1.1.0");
        assert_eq!(ranges.load(std::sync::atomic::Ordering::SeqCst), 1, "resumed with one range request");
        assert_eq!(std::fs::read(dir.join("zhuli_1.1.0.root.raw")).expect("root"), root);
        let room = super::super::Room { root_slot: 1 << 20, verity_slot: 1 << 16, esp_free: 1 << 20 };
        super::super::check(&dir, &vendor, &running, room).expect("the fetched bundle checks");

        // Running it already: nothing to fetch. An older one: refused as a downgrade.
        let same: Version = "1.1.0".parse().expect("v");
        let up = fetch(&client, &url, &vendor, &same, &downloads, |_| {}).await.expect("up to date");
        assert!(matches!(up, Found::UpToDate(v) if v == same));
        let newer: Version = "2.0.0".parse().expect("v");
        let e = fetch(&client, &url, &vendor, &newer, &downloads, |_| {}).await.expect_err("downgrade");
        assert!(matches!(e, PullError::Bundle(BundleError::Downgrade { .. })), "{e}");

        // Unsigned: refused before any file is fetched.
        let unsigned = base.join("unsigned");
        bundle(&unsigned, &key, "1.2.0");
        std::fs::remove_file(unsigned.join(SIGNATURE)).expect("unsign");
        *folder.lock().expect("folder") = unsigned;
        let e = fetch_now().await.expect_err("unsigned");
        assert!(matches!(e, PullError::Bundle(BundleError::Unsigned)), "{e}");
        assert!(!downloads.join("1.2.0").exists(), "nothing fetched for an unsigned bundle");

        // One byte of the kernel image changed after signing: arrives damaged, is not kept.
        let tampered = base.join("tampered");
        bundle(&tampered, &key, "1.3.0");
        let mut uki = std::fs::read(tampered.join("zhuli_1.3.0.efi")).expect("uki");
        *uki.last_mut().expect("byte") ^= 1;
        std::fs::write(tampered.join("zhuli_1.3.0.efi"), uki).expect("tamper");
        *folder.lock().expect("folder") = tampered;
        let e = fetch_now().await.expect_err("damaged");
        assert!(matches!(&e, PullError::Damaged { name } if name == "zhuli_1.3.0.efi"), "{e}");
        assert!(
            !downloads.join("1.3.0/zhuli_1.3.0.efi").exists() && !downloads.join("1.3.0/zhuli_1.3.0.efi.part").exists()
        );
        // Another vendor's signature: refused.
        let (other_key, _) = sign::keygen_for(Role::Vendor);
        let foreign = base.join("foreign");
        bundle(&foreign, &other_key, "1.4.0");
        *folder.lock().expect("folder") = foreign;
        let e = fetch_now().await.expect_err("foreign");
        assert!(matches!(e, PullError::Bundle(BundleError::Untrusted { .. })), "{e}");

        // Broken half-way, then a server that answers the resumption with another part: the
        // part is dropped (never glued on), and the next try starts over and gets it whole.
        let next = base.join("n5");
        let root = bundle(&next, &key, "1.5.0");
        *folder.lock().expect("folder") = next;
        controls.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        controls.lie.store(true, std::sync::atomic::Ordering::SeqCst);
        fetch_now().await.expect_err("cut");
        let e = fetch_now().await.expect_err("another part");
        assert!(matches!(&e, PullError::Range { range, .. } if range.starts_with("bytes 0-")), "{e}");
        assert_eq!(e.code(), "network");
        assert!(!downloads.join("1.5.0/zhuli_1.5.0.root.raw.part").exists());
        let Found::Fetched { dir, .. } = fetch_now().await.expect("whole") else { panic!("not fetched") };
        assert_eq!(std::fs::read(dir.join("zhuli_1.5.0.root.raw")).expect("root"), root);

        // A file larger than its manifest allows is not taken in whole (the root's bound is
        // its unpacked bytes and zstd's worst case).
        let fat = base.join("n6");
        bundle(&fat, &key, "1.6.0");
        let m = std::fs::read_to_string(fat.join(MANIFEST)).expect("manifest");
        std::fs::write(fat.join(MANIFEST), m.replacen("bytes = 4096", "bytes = 16", 1)).expect("edit");
        std::fs::write(fat.join("zhuli_1.6.0.verity.raw"), vec![3u8; 2 << 20]).expect("fat");
        super::super::seal_bundle(&fat, &key).expect("sign");
        *folder.lock().expect("folder") = fat;
        let e = fetch_now().await.expect_err("too big");
        assert!(matches!(&e, PullError::Refused(m) if m.contains("larger than")), "{e}");
        assert!(e.is_refusal());
        assert!(!downloads.join("1.6.0/zhuli_1.6.0.verity.raw.part").exists());
        std::fs::remove_dir_all(&base).expect("clean");
    }
}
