//! `zhuli status`: the agent's figures over a Unix socket in its runtime directory, readable
//! by the agent's user and group only (never a TCP port). The agent writes one JSON snapshot
//! per connection; the client prints it as a table or passes the JSON on. A client may instead
//! send one request line: `folders` has the agent check the folders of the files tools then and
//! there — as its own user, in its own mount namespace — for `zhuli doctor`.

use std::{
    io::Read,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use rust_i18n::t;
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::UnixListener,
    time::Instant,
};
use tokio_util::sync::CancellationToken;

use super::{Health, monitor::Sample};
use crate::dingtalk::{sender::SenderStatus, stream::StreamStatus};

/// Everything `zhuli status` and `/status` show.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Snapshot {
    pub version: String,
    pub uptime_s: u64,
    pub connected: bool,
    pub reconnect_storm: bool,
    pub connections_opened: u64,
    pub connect_failures: u64,
    pub gateway_disconnects: u64,
    pub zombie_connections_dropped: u64,
    pub frames: u64,
    pub messages_accepted: u64,
    pub messages_answered: u64,
    pub messages_failed: u64,
    /// Messages waiting in the conversations' queues.
    #[serde(default)]
    pub messages_waiting: u64,
    /// Messages answered together with a later one of the same person.
    #[serde(default)]
    pub messages_merged: u64,
    /// Messages not answered because their conversation's queue was full (the sender was told).
    #[serde(default)]
    pub messages_left_out: u64,
    /// Robot frames left unACKed because the store was not recording.
    #[serde(default)]
    pub frames_unrecorded: u64,
    /// Reply latency (accepted → delivered) over the recent replies: p50, p95, p99 in ms.
    pub latency_ms: Option<(u32, u32, u32)>,
    pub replies_throttled: u64,
    pub reply_retries: u64,
    pub llm_model: Option<String>,
    pub llm_tokens: u64,
    pub llm_errors: u64,
    pub tool_calls_denied: u64,
    pub messages_refused: u64,
    pub hung_tasks: Vec<String>,
    /// Audit events that went to the log because the journal could not be reached.
    #[serde(default)]
    pub audit_events_not_journaled: u64,
    /// Log records dropped because the journal did not take them fast enough.
    #[serde(default)]
    pub log_records_dropped: u64,
    pub alarms: Vec<String>,
    pub resources: Option<Sample>,
    pub last_error: Option<String>,
    /// One line per MCP plugin: running or not, tools, starts, memory.
    #[serde(default)]
    pub plugins: Vec<String>,
    /// Each model endpoint's health, in the order they are configured.
    #[serde(default)]
    pub models: Vec<ModelRow>,
}

/// One model endpoint in `/status`: where it runs, its recent calls, and whether it is bypassed.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ModelRow {
    pub name: String,
    /// `local` or `cloud`.
    pub place: String,
    pub model: String,
    /// Calls in the window the figures cover (the last 200).
    pub calls: usize,
    pub p50_ms: Option<u64>,
    pub p95_ms: Option<u64>,
    /// Failed calls, in percent of `calls`.
    pub error_percent: u32,
    /// Seconds left while the circuit breaker bypasses it.
    pub bypassed_s: Option<u64>,
    /// Tokens used this month, and the month's limit (0 = none).
    #[serde(default)]
    pub tokens_month: u64,
    #[serde(default)]
    pub monthly_tokens: u64,
}

impl ModelRow {
    pub fn of(e: &crate::llm::route::EndpointStatus, tokens_month: u64) -> Self {
        ModelRow {
            name: e.name.clone(),
            place: e.place.name().to_owned(),
            model: e.model.clone(),
            calls: e.figures.calls,
            p50_ms: e.figures.p50.map(|d| d.as_millis() as u64),
            p95_ms: e.figures.p95.map(|d| d.as_millis() as u64),
            error_percent: (e.figures.error_rate * 100.0).round() as u32,
            bypassed_s: e.bypassed_for.map(|d| d.as_secs().max(1)),
            tokens_month,
            monthly_tokens: e.monthly_tokens,
        }
    }

    fn said(&self, locale: &str) -> String {
        let place = if self.place == "local" {
            t!("status.model_local", locale = locale)
        } else {
            t!("status.model_cloud", locale = locale)
        };
        let ms = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v} ms"));
        let mut line = t!(
            "status.model_value",
            locale = locale,
            name = self.name,
            place = place,
            model = self.model,
            calls = self.calls,
            p50 = ms(self.p50_ms),
            p95 = ms(self.p95_ms),
            errors = self.error_percent
        )
        .into_owned();
        line.push_str(&if self.monthly_tokens > 0 {
            t!("status.model_month_of", locale = locale, used = self.tokens_month, limit = self.monthly_tokens)
        } else {
            t!("status.model_month", locale = locale, used = self.tokens_month)
        });
        if let Some(s) = self.bypassed_s {
            line.push_str(&t!("status.model_bypassed", locale = locale, seconds = s));
        }
        line
    }
}

/// The assistant's figures (model, tools, admission, audit).
#[derive(Debug, Clone, Default)]
pub struct AssistantFigures {
    pub audit_unjournaled: u64,
    pub model: Option<String>,
    pub tokens: u64,
    pub errors: u64,
    pub denied: u64,
    pub refused: u64,
    pub plugins: Vec<String>,
    pub models: Vec<ModelRow>,
}

pub fn snapshot(started: Instant, s: &StreamStatus, d: &SenderStatus, h: &Health, a: AssistantFigures) -> Snapshot {
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let m = &h.metrics;
    Snapshot {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        uptime_s: started.elapsed().as_secs(),
        connected: s.connected.load(Ordering::Relaxed),
        reconnect_storm: s.storm.load(Ordering::Relaxed),
        connections_opened: load(&s.connects),
        connect_failures: load(&s.failures),
        gateway_disconnects: load(&s.disconnects),
        zombie_connections_dropped: load(&s.idle_kills),
        frames: load(&s.frames),
        messages_accepted: load(&m.accepted),
        messages_answered: load(&m.answered),
        messages_failed: load(&m.failed),
        messages_waiting: load(&m.waiting),
        messages_merged: load(&m.merged),
        messages_left_out: load(&m.left_out),
        frames_unrecorded: load(&s.unrecorded),
        latency_ms: m.latency_percentiles(),
        replies_throttled: load(&d.throttled),
        reply_retries: load(&d.retries),
        llm_model: a.model,
        llm_tokens: a.tokens,
        llm_errors: a.errors,
        tool_calls_denied: a.denied,
        messages_refused: a.refused,
        hung_tasks: h.hung().iter().map(|(n, _)| (*n).to_owned()).collect(),
        audit_events_not_journaled: a.audit_unjournaled,
        log_records_dropped: crate::logging::journal_dropped(),
        alarms: h.alarms.lock().map(|a| a.clone()).unwrap_or_default(),
        resources: h.resources.lock().map(|r| *r).unwrap_or_default(),
        last_error: h
            .last_error
            .lock()
            .ok()
            .and_then(|e| e.clone())
            .or_else(|| s.last_error())
            .map(|e| e.chars().take(300).collect()),
        plugins: a.plugins,
        models: a.models,
    }
}

/// Rows of (label, value) in `locale`: English for the table operators read, the box's
/// language for the chat.
pub fn rows(s: &Snapshot, locale: &str) -> Vec<(String, String)> {
    let none = || t!("status.none", locale = locale).into_owned();
    let u = s.uptime_s;
    let mut rows = vec![
        (t!("status.version", locale = locale).into_owned(), s.version.clone()),
        (
            t!("status.uptime", locale = locale).into_owned(),
            t!("status.uptime_value", locale = locale, days = u / 86_400, hours = u / 3600 % 24, minutes = u / 60 % 60)
                .into_owned(),
        ),
        (
            t!("status.dingtalk", locale = locale).into_owned(),
            format!(
                "{}{}",
                if s.connected {
                    t!("status.connected", locale = locale).into_owned()
                } else {
                    t!("status.reconnecting", locale = locale).into_owned()
                },
                if s.reconnect_storm { t!("status.storm", locale = locale).into_owned() } else { String::new() }
            ),
        ),
        (
            t!("status.connections", locale = locale).into_owned(),
            t!(
                "status.connections_value",
                locale = locale,
                opened = s.connections_opened,
                failed = s.connect_failures,
                disconnects = s.gateway_disconnects,
                zombies = s.zombie_connections_dropped
            )
            .into_owned(),
        ),
        (
            t!("status.messages", locale = locale).into_owned(),
            t!(
                "status.messages_value",
                locale = locale,
                accepted = s.messages_accepted,
                answered = s.messages_answered,
                failed = s.messages_failed,
                refused = s.messages_refused
            )
            .into_owned(),
        ),
        (
            t!("status.queues", locale = locale).into_owned(),
            t!(
                "status.queues_value",
                locale = locale,
                waiting = s.messages_waiting,
                merged = s.messages_merged,
                left_out = s.messages_left_out,
                unrecorded = s.frames_unrecorded
            )
            .into_owned(),
        ),
        (
            t!("status.latency", locale = locale).into_owned(),
            s.latency_ms.map(|(a, b, c)| format!("p50 {a} ms, p95 {b} ms, p99 {c} ms")).unwrap_or_else(|| "-".into()),
        ),
        (
            t!("status.throttling", locale = locale).into_owned(),
            t!("status.throttling_value", locale = locale, throttled = s.replies_throttled, retries = s.reply_retries)
                .into_owned(),
        ),
        (
            t!("status.llm", locale = locale).into_owned(),
            match &s.llm_model {
                Some(m) => {
                    t!("status.llm_value", locale = locale, model = m, tokens = s.llm_tokens, errors = s.llm_errors)
                        .into_owned()
                }
                None => t!("status.not_configured", locale = locale).into_owned(),
            },
        ),
        (t!("status.denied", locale = locale).into_owned(), s.tool_calls_denied.to_string()),
    ];
    for m in &s.models {
        rows.push((t!("status.model", locale = locale).into_owned(), m.said(locale)));
    }
    for p in &s.plugins {
        rows.push((t!("status.plugin", locale = locale).into_owned(), p.clone()));
    }
    if let Some(r) = &s.resources {
        let temperature = r
            .temperature_c
            .map(|t| t!("status.temperature", locale = locale, degrees = format!("{t:.0}")).into_owned())
            .unwrap_or_default();
        rows.push((
            t!("status.resources", locale = locale).into_owned(),
            t!(
                "status.resources_value",
                locale = locale,
                cpu = format!("{:.0}", r.cpu_percent),
                memory = format!("{:.0}", r.memory_percent),
                disk = format!("{:.0}", r.disk_percent),
                load = format!("{:.2}", r.load_per_core),
                temperature = temperature
            )
            .into_owned(),
        ));
    }
    rows.push((
        t!("status.alarms", locale = locale).into_owned(),
        if s.alarms.is_empty() { none() } else { s.alarms.join(", ") },
    ));
    rows.push((
        t!("status.hung", locale = locale).into_owned(),
        if s.hung_tasks.is_empty() { none() } else { s.hung_tasks.join(", ") },
    ));
    if s.audit_events_not_journaled > 0 {
        rows.push((
            t!("status.audit", locale = locale).into_owned(),
            t!("status.audit_value", locale = locale, n = s.audit_events_not_journaled).into_owned(),
        ));
    }
    rows.push((t!("status.last_error", locale = locale).into_owned(), s.last_error.clone().unwrap_or_else(none)));
    rows
}

/// The table `zhuli status` prints (English, for the operators).
pub fn table(s: &Snapshot) -> String {
    rows(s, "en").into_iter().map(|(k, v)| format!("{k:<18} {v}\n")).collect()
}

/// The `/status` reply, in the box's language.
pub fn markdown(s: &Snapshot) -> String {
    let locale = rust_i18n::locale();
    let mut out = format!("{}\n\n", t!("status.heading", locale = &locale));
    for (k, v) in rows(s, &locale) {
        out.push_str(&t!("status.row", locale = &locale, label = k, value = v));
        out.push('\n');
    }
    out
}

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("cannot open the status socket {path}: {source}")]
    Bind { path: PathBuf, source: std::io::Error },
    #[error(
        "cannot reach the agent's status socket {path}: {source}; is `zhuli run` running (systemctl status zhuli), and are you root or in its group?"
    )]
    Connect { path: PathBuf, source: std::io::Error },
    #[error("the agent refused: {0}")]
    Refused(String),
    #[error("the agent's answer is not a status snapshot: {0}")]
    Bad(String),
}

/// May this peer read the status? The agent's own user, root, or a member of the agent's group.
fn allowed(peer_uid: u32, peer_gid: u32) -> bool {
    let (uid, gid) = (nix::unistd::getuid().as_raw(), nix::unistd::getgid().as_raw());
    peer_uid == 0 || peer_uid == uid || peer_gid == gid
}

/// The agent's answer to a `folders` request: a blocking check, as JSON.
pub type FolderCheck = Arc<dyn Fn() -> String + Send + Sync>;

/// The agent's answer to a `diagnostics` request: the full report, as JSON.
pub type Diagnose = Arc<dyn Fn() -> futures_util::future::BoxFuture<'static, String> + Send + Sync>;

/// Clients answered at once; one more waits for a place (a diagnostics run takes a while and
/// asks this socket itself).
const AT_ONCE: usize = 4;

/// The request line a client sends, if any (an older client sends nothing and waits).
async fn request(stream: &mut tokio::net::UnixStream) -> String {
    let mut line = Vec::new();
    let mut buf = [0u8; 64];
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        while let Ok(n) = stream.read(&mut buf).await {
            line.extend_from_slice(&buf[..n]);
            if n == 0 || line.contains(&b'\n') || line.len() > 64 {
                break;
            }
        }
    })
    .await;
    String::from_utf8_lossy(&line).trim().to_owned()
}

/// Serve snapshots, folder checks and diagnostics on `path` until `cancel` fires, a few clients
/// at once. The socket is owner and group only (0660), and each peer's credentials are checked
/// as well.
pub async fn serve(
    path: PathBuf,
    source: Arc<dyn Fn() -> Snapshot + Send + Sync>,
    folders: FolderCheck,
    diagnose: Diagnose,
    cancel: CancellationToken,
) -> Result<(), StatusError> {
    let bind = |source| StatusError::Bind { path: path.clone(), source };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(bind)?;
    }
    // A socket file left by a previous run (only a socket is removed, never another file).
    if std::fs::symlink_metadata(&path).is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type())) {
        let _ = std::fs::remove_file(&path);
    }
    let listener = UnixListener::bind(&path).map_err(bind)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o660)).map_err(bind)?;
    log::info!("status socket at {}", path.display());
    let places = Arc::new(tokio::sync::Semaphore::new(AT_ONCE));
    loop {
        // A place first, then a client: while every place is taken the next client waits in the
        // listen queue, and a shutdown is never held up by either wait.
        let place = tokio::select! {
            _ = cancel.cancelled() => break,
            p = places.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (mut stream, _) = tokio::select! {
            _ = cancel.cancelled() => break,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    log::warn!("status socket: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let (source, folders, diagnose) = (source.clone(), folders.clone(), diagnose.clone());
        tokio::spawn(async move {
            let _place = place;
            let ok = stream.peer_cred().map(|c| allowed(c.uid(), c.gid())).unwrap_or(false);
            let body = if ok {
                match request(&mut stream).await.as_str() {
                    "" | "snapshot" => serde_json::to_string(&source()).unwrap_or_default(),
                    "folders" => {
                        let check = folders.clone();
                        tokio::task::spawn_blocking(move || check()).await.unwrap_or_default()
                    }
                    "diagnostics" => diagnose().await,
                    other => format!("refused: unknown request {:?}", other.chars().take(32).collect::<String>()),
                }
            } else {
                log::warn!("status socket: refused a peer that is neither the agent's user nor in its group");
                "refused: you are neither the agent's user nor in its group".to_owned()
            };
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                let _ = stream.write_all(body.as_bytes()).await;
                let _ = stream.write_all(b"\n").await;
                let _ = stream.shutdown().await;
            })
            .await;
        });
    }
    let _ = std::fs::remove_file(&path);
    Ok(())
}

/// Read one snapshot from the agent.
pub fn fetch(path: &Path) -> Result<Snapshot, StatusError> {
    let text = ask(path, "")?;
    serde_json::from_str(&text).map_err(|e| StatusError::Bad(e.to_string()))
}

/// Send the agent one request line (`""` for the snapshot, `folders`) and read its answer.
pub fn ask(path: &Path, request: &str) -> Result<String, StatusError> {
    use std::io::Write;
    let connect = |source| StatusError::Connect { path: path.to_owned(), source };
    let mut stream = std::os::unix::net::UnixStream::connect(path).map_err(connect)?;
    // A folder check writes a file in each root; a slow disk may take a moment; diagnostics run
    // the doctor, which waits for the gateway.
    let wait = match request {
        "" => 5,
        "diagnostics" => 120,
        _ => 20,
    };
    stream.set_read_timeout(Some(Duration::from_secs(wait))).map_err(connect)?;
    if !request.is_empty() {
        stream.write_all(format!("{request}\n").as_bytes()).map_err(connect)?;
    }
    // Done asking: the agent answers at once instead of waiting for a request line.
    stream.shutdown(std::net::Shutdown::Write).map_err(connect)?;
    let mut text = String::new();
    stream.read_to_string(&mut text).map_err(connect)?;
    if let Some(why) = text.trim().strip_prefix("refused: ") {
        return Err(StatusError::Refused(why.to_owned()));
    }
    Ok(text.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_names_every_figure() {
        let s = Snapshot {
            connected: true,
            messages_accepted: 12,
            latency_ms: Some((40, 90, 120)),
            alarms: vec!["disk".into()],
            resources: Some(Sample {
                cpu_percent: 3.0,
                memory_percent: 40.0,
                disk_percent: 93.0,
                load_per_core: 0.1,
                temperature_c: Some(51.0),
            }),
            ..Snapshot::default()
        };
        let t = table(&s);
        for expect in ["connected", "12 accepted", "p95 90 ms", "disk 93%", "51 °C", "alarms             disk"] {
            assert!(t.contains(expect), "{expect} in\n{t}");
        }
        let chat = |l| crate::i18n::tests::in_language(l, || markdown(&s));
        assert!(chat(crate::i18n::Language::En).starts_with("**zhuli status**"));
        let zh = chat(crate::i18n::Language::ZhCn);
        assert!(
            zh.starts_with("**zhuli 助理状态**") && zh.contains("钉钉：已连接") && zh.contains("收到 12 条"),
            "{zh}"
        );
    }
}
