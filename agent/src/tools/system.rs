//! The `system` tool: a health and resource summary of the box (read risk).

use std::{
    path::PathBuf,
    sync::{Arc, atomic::Ordering},
};

use serde_json::{Value, json};
use tokio::time::Instant;

use super::{BoxFuture, Context, Outcome, Risk, Tool, ToolError};
use crate::dingtalk::{sender::SenderStatus, stream::StreamStatus};

pub struct SystemTool {
    pub started: Instant,
    pub stream: Arc<StreamStatus>,
    pub sender: Arc<SenderStatus>,
    pub state_dir: PathBuf,
    parameters: Value,
}

impl SystemTool {
    pub fn new(started: Instant, stream: Arc<StreamStatus>, sender: Arc<SenderStatus>, state_dir: PathBuf) -> Self {
        SystemTool {
            started,
            stream,
            sender,
            state_dir,
            parameters: json!({"type": "object", "properties": {}, "additionalProperties": false}),
        }
    }
}

/// `Name:   123 kB` lines of /proc/meminfo and /proc/self/status, in kB.
fn proc_kb(file: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(file).ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    line[key.len()..].trim_start_matches(':').split_whitespace().next()?.parse().ok()
}

fn mib(kb: Option<u64>) -> String {
    kb.map(|k| format!("{:.0} MiB", k as f64 / 1024.0)).unwrap_or_else(|| "unknown".into())
}

/// The summary, also used by `/status`.
pub fn summary(tool: &SystemTool) -> String {
    let up = tool.started.elapsed().as_secs();
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".into());
    let disk = nix::sys::statvfs::statvfs(&tool.state_dir)
        .map(|s| {
            let free = s.blocks_available() as f64 * s.fragment_size() as f64;
            let total = s.blocks() as f64 * s.fragment_size() as f64;
            format!("{:.1} GiB free of {:.1} GiB", free / 1073741824.0, total / 1073741824.0)
        })
        .unwrap_or_else(|_| "unknown".into());
    let s = &tool.stream;
    format!(
        "agent uptime: {}h {}m\nDingTalk connection: {} ({} connections opened, {} zombie sockets dropped)\n\
         replies delivered: {}, failed: {}\nload average: {load}\nmemory: {} available of {}; agent uses {}\n\
         state disk: {disk}",
        up / 3600,
        up / 60 % 60,
        if s.connected.load(Ordering::Relaxed) { "connected" } else { "reconnecting" },
        s.connects.load(Ordering::Relaxed),
        s.idle_kills.load(Ordering::Relaxed),
        tool.sender.delivered.load(Ordering::Relaxed),
        tool.sender.failed.load(Ordering::Relaxed),
        mib(proc_kb("/proc/meminfo", "MemAvailable")),
        mib(proc_kb("/proc/meminfo", "MemTotal")),
        mib(proc_kb("/proc/self/status", "VmRSS")),
    )
}

impl Tool for SystemTool {
    fn name(&self) -> &str {
        "system"
    }
    fn description(&self) -> &str {
        "Health and resource summary of the zhuli box: connection, uptime, load, memory, disk."
    }
    fn parameters(&self) -> &Value {
        &self.parameters
    }
    fn risk(&self) -> Risk {
        Risk::Read
    }
    fn target(&self, _args: &Value) -> String {
        "box".into()
    }
    fn execute<'a>(&'a self, _ctx: &'a Context, _args: Value) -> BoxFuture<'a, Result<Outcome, ToolError>> {
        Box::pin(async move { Ok(Outcome::text(summary(self))) })
    }
}
