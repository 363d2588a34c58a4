//! MCP plugins: any Model Context Protocol server speaking JSON-RPC over stdio, declared in
//! `[tools.mcp.<name>]`, becomes a set of tools `<name>_<tool>` in the registry, granted by
//! role like the built-ins (the family `<name>` grants all of them).
//!
//! Each plugin is one process in the [`sandbox`], started at agent start (to learn its tools),
//! restarted on the next call after it stopped, and killed — with everything it started —
//! when a call takes longer than its `timeout_ms`. A plugin that fails, hangs or is killed only
//! fails its own calls; the agent keeps serving. Tools are `write` (confirmed in chat) unless
//! the configuration lists them as read-only; the server's own annotations can only raise
//! that (`destructiveHint`), never lower it: a third party does not decide what needs asking.
//!
//! Under `zhuli.service` each plugin runs in a control group of its own ([`cgroup`]): a plugin
//! that reaches its task or memory limit is stopped whole, the admins are told and the audit
//! trail says why ([`PluginStop`]), and the agent keeps what it needs.
//!
//! Plugin output never reaches the log; it is fed to the model with the configured
//! environment values (which may be the plugin's API keys) replaced by `<redacted>`.

pub mod cgroup;
pub mod sandbox;

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::{io::AsyncWriteExt, sync::oneshot};
use tokio_util::codec::{FramedRead, LinesCodec};

use super::{BoxFuture, Context, Outcome, Risk, Tool, ToolError};
use crate::dingtalk::settings::Millis;

/// The protocol revision offered; servers answer with the one they speak.
pub const PROTOCOL_VERSION: &str = "2025-06-18";

/// `[tools.mcp.<name>]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginSettings {
    /// The program, an absolute path (`/usr/bin/node`, `/usr/bin/python3`, the server itself).
    pub command: PathBuf,
    #[serde(default)]
    pub args: Vec<String>,
    /// The plugin's whole environment besides PATH, HOME and LANG. Every value is treated as a
    /// secret (an API key, often): on the box each is a credential, never in the agent's own
    /// environment, only in the plugin's.
    #[serde(default)]
    pub env: BTreeMap<String, crate::secret::Secret>,
    /// Folders (or files) the plugin may read, beyond the system's libraries; its program and
    /// script must be among them or under /usr.
    #[serde(default)]
    pub read: Vec<PathBuf>,
    /// Folders the plugin may change.
    #[serde(default)]
    pub write: Vec<PathBuf>,
    /// Outbound network (TCP, name resolution). Off by default.
    #[serde(default)]
    pub network: bool,
    /// Processes the plugin may start besides itself; 0 (default) allows threads only.
    #[serde(default)]
    pub processes: u32,
    #[serde(default = "default_memory_mb")]
    pub memory_mb: u64,
    #[serde(default = "default_cpu_seconds")]
    pub cpu_seconds: u64,
    #[serde(default = "default_open_files")]
    pub open_files: u64,
    /// Largest file the plugin may write.
    #[serde(default = "default_file_mb")]
    pub file_mb: u64,
    /// Share of one CPU the plugin may use (under `zhuli.service`, where it has its own cgroup).
    #[serde(default = "default_cpu_percent")]
    pub cpu_percent: u32,
    /// A call taking longer is killed with the plugin.
    #[serde(default = "default_timeout")]
    pub timeout_ms: Millis,
    /// Starting (spawn to the answer of `initialize`) taking longer is given up.
    #[serde(default = "default_start_timeout")]
    pub start_timeout_ms: Millis,
    /// Tools run without a confirmation; every other one asks.
    #[serde(default)]
    pub read_only_tools: Vec<String>,
    /// Tools confirmed as destructive.
    #[serde(default)]
    pub destructive_tools: Vec<String>,
}

fn default_memory_mb() -> u64 {
    256
}
fn default_cpu_seconds() -> u64 {
    600
}
fn default_open_files() -> u64 {
    256
}
fn default_file_mb() -> u64 {
    256
}
fn default_cpu_percent() -> u32 {
    50
}
fn default_timeout() -> Millis {
    Millis::from_ms(30_000)
}
fn default_start_timeout() -> Millis {
    Millis::from_ms(20_000)
}

/// Families of the built-in tools; a plugin may not take their names.
const RESERVED: &[&str] =
    &["files", "people", "calendar", "todo", "approvals", "chat", "github", "drive", "caldav", "system"];

/// Largest message read from a plugin.
const MAX_MESSAGE: usize = 4 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
#[error("[tools.mcp.{name}] {message}")]
pub struct PluginSettingsError {
    name: String,
    message: String,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum PluginError {
    #[error("plugin {0} cannot start: {1}")]
    Start(String, String),
    #[error("plugin {name} did not answer within {ms} ms and was stopped")]
    Timeout { name: String, ms: u64 },
    #[error("plugin {name} stopped ({how})")]
    Stopped { name: String, how: String },
    #[error("plugin {name} refused the call: {message}")]
    Rpc { name: String, code: i64, message: String },
    #[error("plugin {0} sent something that is not MCP")]
    Protocol(String),
}

/// A plugin stopped because it reached one of its limits: for the audit trail and the admins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginStop {
    pub plugin: String,
    pub limit: cgroup::Limit,
}

/// Threads a plugin may run besides the processes it is granted (Node.js runs about a dozen).
const TASKS: u64 = 48;
/// How often a call in progress checks its plugin's limits.
const LIMIT_CHECK: Duration = Duration::from_millis(250);

/// Figures of a plugin, for `zhuli status` and the benchmark.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PluginStats {
    pub starts: u64,
    pub pid: Option<u32>,
    /// Spawn to the answer of `initialize`, of the last start.
    pub start_ms: Option<u64>,
    pub last_stop: Option<String>,
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Value, PluginError>>>>>;

struct Running {
    pid: u32,
    stdin: tokio::sync::Mutex<tokio::process::ChildStdin>,
    pending: Pending,
    /// Set by the reader when the process is gone: how it ended.
    gone: Arc<Mutex<Option<String>>>,
    stop: tokio_util::sync::CancellationToken,
    /// Its control group, under the unit.
    group: Option<Arc<cgroup::Group>>,
    /// The limit it reached, when the agent stopped it for that.
    limit: Arc<Mutex<Option<cgroup::Limit>>>,
}

impl Running {
    /// Stop it whole if it reached a limit; the reason, if so.
    fn over_limit(&self, limits: &cgroup::Limits) -> Option<cgroup::Limit> {
        let reason = self.group.as_ref()?.events().limit(limits)?;
        *self.limit.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
        if let Some(g) = &self.group {
            g.kill();
        }
        self.stop.cancel();
        Some(reason)
    }
}

pub struct Plugin {
    pub name: String,
    settings: PluginSettings,
    policy: sandbox::Policy,
    running: tokio::sync::Mutex<Option<Arc<Running>>>,
    next_id: AtomicU64,
    stats: Mutex<PluginStats>,
    /// Values replaced in anything the plugin says.
    secrets: Vec<String>,
    /// Tools it offered at start.
    pub tools: AtomicU64,
    /// Where its control groups are made (under the unit).
    tree: Option<Arc<cgroup::Tree>>,
    limits: cgroup::Limits,
    /// Who hears of a stop for a limit.
    /// (Shared with each run's reader, which looks it up when the run ends: the first run
    /// starts before anyone listens.)
    stops: Arc<std::sync::OnceLock<tokio::sync::mpsc::Sender<PluginStop>>>,
    /// The latest start's number (naming its control group; guarding its home).
    latest_run: Arc<Mutex<u64>>,
}

/// What can be checked of a plugin's settings anywhere: its name and its limits.
pub fn check_settings(name: &str, settings: &PluginSettings) -> Result<(), PluginSettingsError> {
    let err = |m: String| PluginSettingsError { name: name.to_owned(), message: m };
    if name.is_empty() || name.len() > 24 || !name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()) {
        return Err(err("a plugin's name is up to 24 lowercase letters and digits".into()));
    }
    if RESERVED.contains(&name) {
        return Err(err(format!("`{name}` is the name of built-in tools; choose another")));
    }
    if !settings.command.is_absolute() {
        return Err(err(format!("command {} must be an absolute path", settings.command.display())));
    }
    for p in settings.read.iter().chain(&settings.write) {
        if !p.is_absolute() {
            return Err(err(format!("{} must be an absolute path", p.display())));
        }
    }
    if settings.memory_mb < 16 || settings.open_files < 16 || settings.cpu_seconds == 0 {
        return Err(err("memory_mb and open_files must be at least 16, cpu_seconds at least 1".into()));
    }
    if !(1..=800).contains(&settings.cpu_percent) {
        return Err(err("cpu_percent must be between 1 and 800 (100 is one whole CPU)".into()));
    }
    Ok(())
}

/// What only the box can check: the program and the folders a plugin reads exist there (the
/// folders it writes, the import makes).
pub fn check_paths(name: &str, settings: &PluginSettings) -> Result<(), PluginSettingsError> {
    let message = match missing_path(settings) {
        None => return Ok(()),
        Some(MissingPath::Command(p)) => {
            format!("command {} must be the absolute path of a program that exists on the box", p.display())
        }
        Some(MissingPath::Read(p)) => format!("{} must be an absolute path that exists on the box", p.display()),
    };
    Err(PluginSettingsError { name: name.to_owned(), message })
}

/// A path of a plugin's settings that is not on this machine.
pub enum MissingPath<'a> {
    /// `command`: no such program.
    Command(&'a Path),
    /// One of the folders in `read`.
    Read(&'a Path),
}

/// The first path of `settings` that is not on this machine.
pub fn missing_path(settings: &PluginSettings) -> Option<MissingPath<'_>> {
    if !settings.command.is_file() {
        return Some(MissingPath::Command(&settings.command));
    }
    settings.read.iter().find(|p| !p.exists()).map(|p| MissingPath::Read(p))
}

impl Plugin {
    pub fn new(
        name: &str,
        settings: &PluginSettings,
        state_dir: &std::path::Path,
        tree: Option<Arc<cgroup::Tree>>,
    ) -> Result<Arc<Plugin>, PluginSettingsError> {
        check_settings(name, settings)?;
        check_paths(name, settings)?;
        let err = |m: String| PluginSettingsError { name: name.to_owned(), message: m };
        if let Some(p) = settings.write.iter().find(|p| !p.exists()) {
            return Err(err(format!("{} must be an absolute path that exists", p.display())));
        }
        let home = state_dir.join("plugins").join(name);
        std::fs::create_dir_all(&home).map_err(|e| err(format!("cannot create its folder {}: {e}", home.display())))?;
        let policy = sandbox::Policy {
            read: settings.read.clone(),
            write: settings.write.iter().cloned().chain([home.clone()]).collect(),
            network: settings.network,
            processes: settings.processes,
            memory_bytes: settings.memory_mb * 1024 * 1024,
            cpu_seconds: settings.cpu_seconds,
            open_files: settings.open_files,
            file_bytes: settings.file_mb * 1024 * 1024,
            env: settings.env.iter().map(|(k, v)| (k.clone(), v.expose().to_owned())).collect(),
            home,
        };
        let secrets = settings.env.values().filter(|v| v.expose().len() >= 6).map(|v| v.expose().to_owned()).collect();
        Ok(Arc::new(Plugin {
            name: name.to_owned(),
            settings: settings.clone(),
            policy,
            running: tokio::sync::Mutex::new(None),
            next_id: AtomicU64::new(1),
            stats: Mutex::default(),
            secrets,
            tools: AtomicU64::new(0),
            tree,
            limits: cgroup::Limits {
                tasks: TASKS + 16 * u64::from(settings.processes),
                memory_bytes: settings.memory_mb * 1024 * 1024,
                cpu_percent: settings.cpu_percent,
            },
            stops: Arc::default(),
            latest_run: Arc::default(),
        }))
    }

    /// Tell `to` whenever this plugin is stopped for reaching a limit.
    pub fn report_stops(&self, to: tokio::sync::mpsc::Sender<PluginStop>) {
        let _ = self.stops.set(to);
    }

    pub fn stats(&self) -> PluginStats {
        self.stats.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// For `/status`: `fs: running (pid 412, 14 tools, 1 start, RSS 61 MB)`.
    pub fn status_line(&self) -> String {
        let st = self.stats();
        let tools = self.tools.load(Ordering::Relaxed);
        // None: never started or taken out; Some(None): running; Some(Some(how)): it stopped.
        let state = self
            .running
            .try_lock()
            .ok()
            .and_then(|r| r.as_ref().map(|r| r.gone.lock().unwrap_or_else(|p| p.into_inner()).clone()));
        let starts = format!("{} start{}", st.starts, if st.starts == 1 { "" } else { "s" });
        match (state, st.pid) {
            (Some(None), Some(pid)) => {
                let group = self.running.try_lock().ok().and_then(|r| r.as_ref().and_then(|r| r.group.clone()));
                let usage = match group {
                    Some(g) => {
                        let (tasks, memory) = g.usage();
                        format!(
                            ", {tasks}/{} tasks, {}/{} MB in its cgroup",
                            self.limits.tasks,
                            memory >> 20,
                            self.limits.memory_bytes >> 20
                        )
                    }
                    None => self.memory_kb().map(|(r, _)| format!(", RSS {} MB", r / 1024)).unwrap_or_default(),
                };
                format!("{}: running (pid {pid}, {tools} tools, {starts}{usage})", self.name)
            }
            (state, _) => {
                let last = state.flatten().or(st.last_stop);
                let last =
                    last.map(|l| format!("; last: {}", l.chars().take(160).collect::<String>())).unwrap_or_default();
                format!("{}: not running ({tools} tools, {starts}; starts on the next call{last})", self.name)
            }
        }
    }

    fn redact(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for s in &self.secrets {
            out = out.replace(s.as_str(), "<redacted>");
        }
        out
    }

    fn timeout(&self) -> Duration {
        self.settings.timeout_ms.get()
    }

    /// The running process, started if need be.
    async fn process(&self) -> Result<Arc<Running>, PluginError> {
        let mut slot = self.running.lock().await;
        if let Some(r) = slot.as_ref() {
            // A limit reached while it sat idle (a runaway background task) stops it now.
            r.over_limit(&self.limits);
            let gone = r.gone.lock().unwrap_or_else(|p| p.into_inner()).clone();
            match gone {
                // Being stopped (a timeout): not handed out again, started anew below.
                None if r.stop.is_cancelled() => *slot = None,
                None => return Ok(r.clone()),
                Some(how) => {
                    self.stats.lock().unwrap_or_else(|p| p.into_inner()).last_stop = Some(how);
                    *slot = None;
                }
            }
        }
        let started = Instant::now();
        let running = match self.spawn() {
            Ok(r) => r,
            Err(e) => {
                self.stats.lock().unwrap_or_else(|p| p.into_inner()).last_stop = Some(e.to_string());
                return Err(e);
            }
        };
        let init = json!({
            "protocolVersion": PROTOCOL_VERSION,
            "capabilities": {},
            "clientInfo": {"name": "zhuli", "version": env!("CARGO_PKG_VERSION")},
        });
        let answer = self.request_on(&running, "initialize", init, self.settings.start_timeout_ms.get()).await;
        let answer = match answer {
            Ok(a) => a,
            Err(e) => {
                running.stop.cancel();
                let e = match e {
                    PluginError::Timeout { .. } | PluginError::Stopped { .. } => e,
                    other => PluginError::Start(self.name.clone(), other.to_string()),
                };
                self.stats.lock().unwrap_or_else(|p| p.into_inner()).last_stop = Some(e.to_string());
                return Err(e);
            }
        };
        if answer["protocolVersion"].as_str().is_none() {
            running.stop.cancel();
            return Err(PluginError::Protocol(self.name.clone()));
        }
        self.notify(&running, "notifications/initialized").await?;
        {
            let mut st = self.stats.lock().unwrap_or_else(|p| p.into_inner());
            st.starts += 1;
            st.pid = Some(running.pid);
            st.start_ms = Some(started.elapsed().as_millis() as u64);
        }
        *slot = Some(running.clone());
        Ok(running)
    }

    /// Start a new process (called with the slot held, so never two at once).
    fn spawn(&self) -> Result<Arc<Running>, PluginError> {
        let start = |m: String| PluginError::Start(self.name.clone(), m);
        // Its home is scratch space for one run: emptied when a run ends and before the next
        // starts, so a plugin that filled it (memory it is charged for) frees it, and nothing
        // piles up over restarts. The latest run's number guards it: an ended run's reader
        // never empties the home of a run started after it.
        let run = {
            let mut latest = self.latest_run.lock().unwrap_or_else(|p| p.into_inner());
            *latest += 1;
            empty(&self.policy.home);
            *latest
        };
        // A group of its own per start: the reader of an earlier run removes only its own.
        let group = match &self.tree {
            Some(tree) => Some(Arc::new(
                tree.group(&format!("{}.{run}", self.name), self.limits)
                    .map_err(|e| start(format!("its control group: {e}")))?,
            )),
            None => None,
        };
        let procs =
            group.as_ref().map(|g| g.procs()).transpose().map_err(|e| start(format!("its control group: {e}")))?;
        let join = procs.as_ref().map(std::os::fd::AsRawFd::as_raw_fd);
        let mut cmd = sandbox::command(&self.settings.command, &self.settings.args, &self.policy, join)
            .map_err(|e| start(e.to_string()))?;
        let spawned = cmd.spawn();
        drop(procs);
        let mut child = spawned.map_err(|e| start(format!("{} ({e})", self.settings.command.display())))?;
        let pid = child.id().ok_or_else(|| start("it exited at once".into()))?;
        let stdin = child.stdin.take().ok_or_else(|| start("no stdin".into()))?;
        let stdout = child.stdout.take().ok_or_else(|| start("no stdout".into()))?;
        let stderr = child.stderr.take().ok_or_else(|| start("no stderr".into()))?;
        let pending: Pending = Arc::default();
        let gone: Arc<Mutex<Option<String>>> = Arc::default();
        let stop = tokio_util::sync::CancellationToken::new();
        let tail: Arc<Mutex<VecDeque<String>>> = Arc::default();
        // The plugin's stderr: the last lines only, kept for the message when it stops.
        {
            let tail = tail.clone();
            tokio::spawn(async move {
                let mut lines = FramedRead::new(stderr, LinesCodec::new_with_max_length(2048));
                while let Some(line) = lines.next().await {
                    let Ok(line) = line else { continue };
                    let mut t = tail.lock().unwrap_or_else(|p| p.into_inner());
                    if t.len() == 8 {
                        t.pop_front();
                    }
                    t.push_back(line.chars().take(200).collect());
                }
            });
        }
        let limit: Arc<Mutex<Option<cgroup::Limit>>> = Arc::default();
        let running = Arc::new(Running {
            pid,
            stdin: tokio::sync::Mutex::new(stdin),
            pending: pending.clone(),
            gone: gone.clone(),
            stop: stop.clone(),
            group: group.clone(),
            limit: limit.clone(),
        });
        let writer = Arc::downgrade(&running);
        let name = self.name.clone();
        let secrets = self.secrets.clone();
        let (limits, stops) = (self.limits, self.stops.clone());
        let (latest_run, home) = (self.latest_run.clone(), self.policy.home.clone());
        tokio::spawn(async move {
            let mut lines = FramedRead::new(stdout, LinesCodec::new_with_max_length(MAX_MESSAGE));
            let ended = loop {
                let line = tokio::select! {
                    _ = stop.cancelled() => break None,
                    l = lines.next() => l,
                };
                match line {
                    None => break None,
                    Some(Err(_)) => break Some("it sent a message over the size limit".to_owned()),
                    Some(Ok(line)) => {
                        let Ok(msg) = serde_json::from_str::<Value>(&line) else { continue };
                        if let Some(id) = msg["id"].as_u64().filter(|_| msg.get("method").is_none()) {
                            let waiter = pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
                            if let Some(tx) = waiter {
                                let result = match msg.get("error") {
                                    Some(e) => Err(PluginError::Rpc {
                                        name: name.clone(),
                                        code: e["code"].as_i64().unwrap_or(0),
                                        message: e["message"].as_str().unwrap_or("error").chars().take(300).collect(),
                                    }),
                                    None => Ok(msg.get("result").cloned().unwrap_or(Value::Null)),
                                };
                                let _ = tx.send(result);
                            }
                        } else if let (Some(method), Some(id)) = (msg["method"].as_str(), msg.get("id")) {
                            // A request from the server: ping is answered, nothing else is offered.
                            let reply = if method == "ping" {
                                json!({"jsonrpc": "2.0", "id": id, "result": {}})
                            } else {
                                json!({"jsonrpc": "2.0", "id": id, "error": {"code": -32601, "message": "not supported by this client"}})
                            };
                            if let Some(w) = writer.upgrade() {
                                let mut stdin = w.stdin.lock().await;
                                let _ = stdin.write_all(format!("{reply}\n").as_bytes()).await;
                            }
                        }
                        // Notifications (logging, progress, list changes) are not acted on.
                    }
                }
            };
            // The process ends (or is ended): say how, and fail every waiting call.
            let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
            if let Some(g) = &group {
                g.kill();
            }
            let status = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
            // A limit it reached, as the agent or the kernel saw it.
            let over = (*limit.lock().unwrap_or_else(|p| p.into_inner()))
                .or_else(|| group.as_ref().and_then(|g| g.events().limit(&limits)));
            if let Some(g) = group {
                let _ = tokio::task::spawn_blocking(move || g.remove()).await;
            }
            let mut how = match status {
                Ok(Ok(s)) => match (s.code(), std::os::unix::process::ExitStatusExt::signal(&s)) {
                    (Some(c), _) => format!("exit status {c}"),
                    (None, Some(libc_sig)) => signal_name(libc_sig),
                    _ => "ended".to_owned(),
                },
                _ => "ended".to_owned(),
            };
            if let Some(reason) = ended {
                how = format!("{reason}; {how}");
            }
            {
                let latest = latest_run.lock().unwrap_or_else(|p| p.into_inner());
                if *latest == run {
                    empty(&home);
                }
            }
            if let Some(reason) = &over {
                how = format!("stopped: {reason}; {how}");
                log::warn!("plugin {name} stopped: {reason}");
                // Bounded: a plugin stopped over and over is audited by the receiver, which
                // tells the admins at most so often; more than that waiting is dropped here.
                if let Some(to) = stops.get()
                    && to.try_send(PluginStop { plugin: name.clone(), limit: *reason }).is_err()
                {
                    log::warn!("plugin {name}: its stop was not reported (too many at once)");
                }
            }
            // The telling line: the last one naming an error (a stack trace follows it), else the last.
            let last = {
                let t = tail.lock().unwrap_or_else(|p| p.into_inner());
                let telling = t.iter().rev().find(|l| {
                    let l = l.to_ascii_lowercase();
                    l.contains("error") || l.contains("fatal") || l.contains("out of memory")
                });
                telling.or(t.back()).cloned()
            };
            if let Some(l) = last.filter(|l| !l.trim().is_empty()) {
                let mut l = l;
                for s in &secrets {
                    l = l.replace(s.as_str(), "<redacted>");
                }
                how = format!("{how}; it last said: {l}");
            }
            *gone.lock().unwrap_or_else(|p| p.into_inner()) = Some(how.clone());
            let waiting: Vec<_> = pending.lock().unwrap_or_else(|p| p.into_inner()).drain().collect();
            for (_, tx) in waiting {
                let _ = tx.send(Err(PluginError::Stopped { name: name.clone(), how: how.clone() }));
            }
        });
        Ok(running)
    }

    async fn notify(&self, running: &Running, method: &str) -> Result<(), PluginError> {
        let msg = json!({"jsonrpc": "2.0", "method": method});
        let mut stdin = running.stdin.lock().await;
        stdin.write_all(format!("{msg}\n").as_bytes()).await.map_err(|e| PluginError::Stopped {
            name: self.name.clone(),
            how: format!("its input closed ({})", e.kind()),
        })
    }

    async fn request_on(
        &self,
        running: &Running,
        method: &str,
        params: Value,
        limit: Duration,
    ) -> Result<Value, PluginError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        running.pending.lock().unwrap_or_else(|p| p.into_inner()).insert(id, tx);
        let msg = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        {
            let mut stdin = running.stdin.lock().await;
            if let Err(e) = stdin.write_all(format!("{msg}\n").as_bytes()).await {
                running.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
                let how = running.gone.lock().unwrap_or_else(|p| p.into_inner()).clone();
                return Err(PluginError::Stopped {
                    name: self.name.clone(),
                    how: how.unwrap_or_else(|| format!("its input closed ({})", e.kind())),
                });
            }
        }
        // While it works, its limits are watched: reaching one stops it whole at once.
        let watched = async {
            let mut rx = rx;
            let mut tick = tokio::time::interval(LIMIT_CHECK);
            loop {
                tokio::select! {
                    answer = &mut rx => return answer,
                    _ = tick.tick(), if running.group.is_some() => {
                        if running.over_limit(&self.limits).is_some() {
                            return rx.await;
                        }
                    }
                }
            }
        };
        match tokio::time::timeout(limit, watched).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(PluginError::Stopped { name: self.name.clone(), how: "ended".into() }),
            Err(_) => {
                running.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
                // Killed with everything it started; the next call starts it again.
                running.stop.cancel();
                Err(PluginError::Timeout { name: self.name.clone(), ms: limit.as_millis() as u64 })
            }
        }
    }

    /// One request, starting the plugin first if it is not running.
    pub async fn request(&self, method: &str, params: Value) -> Result<Value, PluginError> {
        let running = self.process().await?;
        self.request_on(&running, method, params, self.timeout()).await
    }

    /// The plugin's tools (all pages of `tools/list`).
    pub async fn list_tools(&self) -> Result<Vec<Value>, PluginError> {
        let mut tools = Vec::new();
        let mut cursor: Option<String> = None;
        for _ in 0..50 {
            let params = match &cursor {
                Some(c) => json!({"cursor": c}),
                None => json!({}),
            };
            let page = self.request("tools/list", params).await?;
            let items = page["tools"].as_array().ok_or_else(|| PluginError::Protocol(self.name.clone()))?;
            tools.extend(items.iter().cloned());
            cursor = page["nextCursor"].as_str().map(str::to_owned);
            if cursor.is_none() {
                break;
            }
        }
        Ok(tools)
    }

    /// Stop the process now (it starts again on the next call).
    pub async fn stop(&self) {
        if let Some(r) = self.running.lock().await.take() {
            r.stop.cancel();
        }
    }

    /// The process's memory now and at its peak (kB), from /proc.
    pub fn memory_kb(&self) -> Option<(u64, u64)> {
        let pid = self.stats().pid?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        };
        Some((field("VmRSS:")?, field("VmHWM:")?))
    }
}

/// Remove everything in `dir` (a plugin's home), keeping `dir`.
fn empty(dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let p = e.path();
        let _ = if p.is_dir() && !p.is_symlink() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
    }
}

fn signal_name(sig: i32) -> String {
    let name = nix::sys::signal::Signal::try_from(sig).map(|s| s.as_str()).unwrap_or("a signal");
    let why = match sig {
        nix::libc::SIGKILL => " — killed (time limit, CPU limit or timeout)",
        nix::libc::SIGXCPU => " — its CPU time limit",
        nix::libc::SIGABRT | nix::libc::SIGSEGV | nix::libc::SIGBUS => " — it crashed, often from its memory limit",
        nix::libc::SIGSYS => " — a forbidden system call",
        _ => "",
    };
    format!("{name}{why}")
}

/// The text an MCP `tools/call` result carries.
pub fn result_text(result: &Value) -> String {
    let mut parts = Vec::new();
    for item in result["content"].as_array().into_iter().flatten() {
        match item["type"].as_str() {
            Some("text") => parts.push(item["text"].as_str().unwrap_or_default().to_owned()),
            Some("image") | Some("audio") => {
                parts.push(format!("[{} {} not shown]", s(item, "type"), item["mimeType"].as_str().unwrap_or("data")))
            }
            Some("resource") => match item["resource"]["text"].as_str() {
                Some(t) => parts.push(t.to_owned()),
                None => parts.push(format!("[resource {}]", s(&item["resource"], "uri"))),
            },
            Some("resource_link") => parts.push(format!("[{}: {}]", s(item, "name"), s(item, "uri"))),
            _ => {}
        }
    }
    if parts.is_empty()
        && let Some(structured) = result.get("structuredContent")
    {
        parts.push(structured.to_string());
    }
    parts.join("\n")
}

use crate::tools::str_arg as s;

fn plugin_error(e: PluginError) -> ToolError {
    match e {
        // The plugin's own message: for the model, not the audit trail.
        e @ PluginError::Rpc { .. } => ToolError::Reported(e.to_string()),
        e => ToolError::Failed(e.to_string()),
    }
}

/// One tool of a plugin.
pub struct McpTool {
    plugin: Arc<Plugin>,
    /// The registry's name, `<plugin>_<tool>`.
    name: String,
    /// The server's own name for it.
    remote: String,
    description: String,
    parameters: Value,
    risk: Risk,
}

impl McpTool {
    /// From an entry of `tools/list`; `None` when it has no usable name.
    pub fn new(plugin: &Arc<Plugin>, entry: &Value) -> Option<McpTool> {
        let remote = entry["name"].as_str()?.to_owned();
        let clean: String =
            remote.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c } else { '_' }).collect();
        let name: String = format!("{}_{clean}", plugin.name).chars().take(64).collect();
        let settings = &plugin.settings;
        let risk = if settings.destructive_tools.contains(&remote) {
            Risk::Destructive
        } else if settings.read_only_tools.contains(&remote) {
            Risk::Read
        } else if entry["annotations"]["destructiveHint"].as_bool() == Some(true) {
            Risk::Destructive
        } else {
            Risk::Write
        };
        let mut parameters = entry.get("inputSchema").cloned().unwrap_or_else(|| json!({"type": "object"}));
        if let Some(o) = parameters.as_object_mut() {
            o.remove("$schema");
            o.entry("type").or_insert(json!("object"));
        }
        let text = entry["description"].as_str().or(entry["title"].as_str()).unwrap_or("");
        let description = format!("[{} plugin] {}", plugin.name, text.chars().take(1000).collect::<String>());
        Some(McpTool { plugin: plugin.clone(), name, remote, description, parameters, risk })
    }
}

impl Tool for McpTool {
    fn name(&self) -> &str {
        &self.name
    }

    fn description(&self) -> &str {
        &self.description
    }

    fn parameters(&self) -> &Value {
        &self.parameters
    }

    fn risk(&self) -> Risk {
        self.risk
    }

    fn target(&self, args: &Value) -> String {
        // A plugin's arguments are its own business: the audit gets the path the call touches
        // (as for the built-in tools) or an id, else only how many arguments there were. Names,
        // queries and texts may be anything a person wrote; URLs may carry tokens.
        let path = ["path", "source", "destination"].iter().find_map(|k| args[*k].as_str());
        let hint = match (path, args["id"].as_str(), args.as_object()) {
            (Some(p), _, _) => format!(" {p}"),
            (None, Some(id), _) => format!(" {}", super::id_or_size(id)),
            (None, None, Some(o)) if !o.is_empty() => format!(" ({} arguments)", o.len()),
            _ => String::new(),
        };
        format!("{}{hint}", self.remote).chars().take(160).collect()
    }

    fn execute<'a>(&'a self, _ctx: &'a Context, args: Value) -> BoxFuture<'a, Result<Outcome, ToolError>> {
        Box::pin(async move {
            let result = self
                .plugin
                .request("tools/call", json!({"name": self.remote, "arguments": args}))
                .await
                .map_err(plugin_error)?;
            let text = self.plugin.redact(&result_text(&result));
            if result["isError"].as_bool() == Some(true) {
                return Err(ToolError::Reported(text.chars().take(2000).collect()));
            }
            Ok(Outcome::text(text))
        })
    }
}

/// Start every configured plugin and make tools of what each offers. A plugin that cannot
/// start is reported and offers nothing until the agent restarts; the others go on.
pub async fn start_all(
    settings: &BTreeMap<String, PluginSettings>,
    state_dir: &std::path::Path,
) -> Result<(Vec<Arc<Plugin>>, Vec<Arc<dyn Tool>>), PluginSettingsError> {
    let tree = if settings.is_empty() { None } else { cgroup::Tree::detect().map(Arc::new) };
    // In its cgroup a plugin runs as the user that owns the delegated tree: only Landlock keeps
    // it from the tree's files and from signalling the agent (scopes need ABI 6).
    if tree.is_some() && sandbox::landlock_abi() < 6 {
        log::error!(
            "plugins: this kernel's Landlock (ABI {}) cannot keep a plugin from the agent's cgroup tree and signals; no plugin is started (a kernel of 6.12 or later is needed)",
            sandbox::landlock_abi()
        );
        return Ok((Vec::new(), Vec::new()));
    }
    if !settings.is_empty() && tree.is_none() {
        log::warn!(
            "plugins: no delegated control group (not running as zhuli.service): each plugin is limited by rlimits only, and its home folder is not capped"
        );
    }
    let mut plugins = Vec::new();
    for (name, s) in settings {
        plugins.push(Plugin::new(name, s, state_dir, tree.clone())?);
    }
    // All started at once: a slow one delays the agent's start by its own timeout, not the sum.
    let lists = futures_util::future::join_all(plugins.iter().map(|p| p.list_tools())).await;
    let mut tools: Vec<Arc<dyn Tool>> = Vec::new();
    for (plugin, listed) in plugins.iter().zip(lists) {
        let name = &plugin.name;
        match listed {
            Ok(list) => {
                let made: Vec<McpTool> = list.iter().filter_map(|e| McpTool::new(plugin, e)).collect();
                plugin.tools.store(made.len() as u64, Ordering::Relaxed);
                log::info!(
                    "plugin {name}: {} tools, started in {} ms (sandbox: Landlock ABI {})",
                    made.len(),
                    plugin.stats().start_ms.unwrap_or(0),
                    sandbox::landlock_abi()
                );
                tools.extend(made.into_iter().map(|t| Arc::new(t) as Arc<dyn Tool>));
            }
            Err(e) => log::error!("{e}; its tools are not offered until the agent restarts"),
        }
    }
    Ok((plugins, tools))
}
