//! The audit trail: one structured journald entry per security-relevant event, written with
//! journald's native protocol (a datagram of `FIELD=value` lines to the journal socket) under
//! the identifier `zhuli-audit`, with a stable `MESSAGE_ID` per kind of event so that
//! `journalctl MESSAGE_ID=…` finds every instance.
//!
//! Fields: `ACTOR` (staff id), `CHAT` (conversation id), `ACTION` (the event kind's name),
//! `TOOL`, `TARGET` (a path, an id, a pairing code, …), `OUTCOME`, `REASON`. Only what the code
//! puts into an [`Event`] is written: never message text, tool arguments or anything secret.
//! Tools build their targets from ids, paths and times, and show search words, titles, bodies
//! and typed names only as their size (`tools::size`); a tool error's reason is recorded with
//! the argument values its target does not show replaced the same way, and a backend's own
//! error text only counted (`ToolError::audit_reason`).
//!
//! The last events are also kept in memory for `/audit` in chat. When the journal socket cannot
//! be reached (a development machine), each event goes to the log instead, so nothing is lost
//! silently.

use std::{
    collections::VecDeque,
    os::unix::net::UnixDatagram,
    path::PathBuf,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::Deserialize;

/// journald's native socket.
pub const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";
pub const IDENTIFIER: &str = "zhuli-audit";
/// Events kept for `/audit`.
const RECENT: usize = 200;
/// Longest value written for one field; longer ones are cut (values are ids and short reasons).
const MAX_FIELD: usize = 512;

/// `[audit]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditSettings {
    /// journald's native-protocol socket. Tests point this at a socket of their own.
    pub journal_socket: PathBuf,
}

impl Default for AuditSettings {
    fn default() -> Self {
        AuditSettings { journal_socket: PathBuf::from(JOURNAL_SOCKET) }
    }
}

/// The kinds of audited event, each with its own stable `MESSAGE_ID`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    MessageAccepted,
    MessageRefused,
    ToolRequested,
    ToolAllowed,
    ToolDenied,
    ToolConfirmed,
    ToolExecuted,
    ToolFailed,
    ToolUndone,
    LimitHit,
    PermissionChanged,
    ConfigChanged,
    /// A monitoring threshold crossed or cleared.
    Alert,
    /// A plugin stopped whole for reaching one of its limits (tasks, memory).
    PluginStopped,
    /// A request to a model endpoint: which one, the data class, the tokens and why that
    /// endpoint (never the content).
    ModelCall,
}

impl Kind {
    pub const ALL: [Kind; 15] = [
        Kind::MessageAccepted,
        Kind::MessageRefused,
        Kind::ToolRequested,
        Kind::ToolAllowed,
        Kind::ToolDenied,
        Kind::ToolConfirmed,
        Kind::ToolExecuted,
        Kind::ToolFailed,
        Kind::ToolUndone,
        Kind::LimitHit,
        Kind::PermissionChanged,
        Kind::ConfigChanged,
        Kind::Alert,
        Kind::PluginStopped,
        Kind::ModelCall,
    ];

    /// The `ACTION` field.
    pub fn name(self) -> &'static str {
        match self {
            Kind::MessageAccepted => "message-accepted",
            Kind::MessageRefused => "message-refused",
            Kind::ToolRequested => "tool-requested",
            Kind::ToolAllowed => "tool-allowed",
            Kind::ToolDenied => "tool-denied",
            Kind::ToolConfirmed => "tool-confirmed",
            Kind::ToolExecuted => "tool-executed",
            Kind::ToolFailed => "tool-failed",
            Kind::ToolUndone => "tool-undone",
            Kind::LimitHit => "limit-hit",
            Kind::PermissionChanged => "permission-changed",
            Kind::ConfigChanged => "config-changed",
            Kind::Alert => "alert",
            Kind::PluginStopped => "plugin-stopped",
            Kind::ModelCall => "model-call",
        }
    }

    /// The `MESSAGE_ID`: fixed forever, so saved journal queries keep working.
    pub fn message_id(self) -> &'static str {
        match self {
            Kind::MessageAccepted => "4c1b6a0e9d2f4e7a8b3c5d6e7f801a01",
            Kind::MessageRefused => "4c1b6a0e9d2f4e7a8b3c5d6e7f801a02",
            Kind::ToolRequested => "4c1b6a0e9d2f4e7a8b3c5d6e7f801a03",
            Kind::ToolAllowed => "4c1b6a0e9d2f4e7a8b3c5d6e7f801a04",
            Kind::ToolDenied => "4c1b6a0e9d2f4e7a8b3c5d6e7f801a05",
            Kind::ToolConfirmed => "4c1b6a0e9d2f4e7a8b3c5d6e7f801a06",
            Kind::ToolExecuted => "4c1b6a0e9d2f4e7a8b3c5d6e7f801a07",
            Kind::ToolFailed => "4c1b6a0e9d2f4e7a8b3c5d6e7f801a08",
            Kind::ToolUndone => "4c1b6a0e9d2f4e7a8b3c5d6e7f801a09",
            Kind::LimitHit => "4c1b6a0e9d2f4e7a8b3c5d6e7f801a0a",
            Kind::PermissionChanged => "4c1b6a0e9d2f4e7a8b3c5d6e7f801a0b",
            Kind::ConfigChanged => "4c1b6a0e9d2f4e7a8b3c5d6e7f801a0c",
            Kind::Alert => "4c1b6a0e9d2f4e7a8b3c5d6e7f801a0d",
            Kind::PluginStopped => "4c1b6a0e9d2f4e7a8b3c5d6e7f801a0e",
            Kind::ModelCall => "4c1b6a0e9d2f4e7a8b3c5d6e7f801a0f",
        }
    }

    /// syslog priority: refusals and denials are warnings (5 = notice otherwise).
    fn priority(self) -> u8 {
        match self {
            Kind::MessageRefused
            | Kind::ToolDenied
            | Kind::ToolFailed
            | Kind::LimitHit
            | Kind::Alert
            | Kind::PluginStopped => 4,
            _ => 5,
        }
    }
}

/// One audited event. Empty fields are left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub kind: Kind,
    pub actor: String,
    pub chat: String,
    pub tool: String,
    pub target: String,
    pub outcome: String,
    pub reason: String,
    /// Fields of this kind of event only (`DATA_CLASS`, `TOKENS_IN`, …).
    pub extra: Vec<(&'static str, String)>,
    pub at_ms: i64,
}

impl Event {
    pub fn new(kind: Kind, actor: impl Into<String>, chat: impl Into<String>) -> Self {
        Event {
            kind,
            actor: actor.into(),
            chat: chat.into(),
            tool: String::new(),
            target: String::new(),
            outcome: String::new(),
            reason: String::new(),
            extra: Vec::new(),
            at_ms: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0),
        }
    }
    pub fn tool(mut self, t: impl Into<String>) -> Self {
        self.tool = t.into();
        self
    }
    pub fn target(mut self, t: impl Into<String>) -> Self {
        self.target = t.into();
        self
    }
    pub fn outcome(mut self, o: impl Into<String>) -> Self {
        self.outcome = o.into();
        self
    }
    pub fn reason(mut self, r: impl Into<String>) -> Self {
        self.reason = r.into();
        self
    }
    /// A field of its own, named in capitals as journald wants.
    pub fn field(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.extra.push((name, value.into()));
        self
    }

    /// The one-line summary that goes into `MESSAGE`.
    pub fn summary(&self) -> String {
        let mut s = format!("{} by {}", self.kind.name(), if self.actor.is_empty() { "-" } else { &self.actor });
        for (label, v) in [("tool", &self.tool), ("target", &self.target), ("outcome", &self.outcome)] {
            if !v.is_empty() {
                s.push_str(&format!(" {label}={}", clip(v)));
            }
        }
        if !self.reason.is_empty() {
            s.push_str(&format!(": {}", clip(&self.reason)));
        }
        s
    }

    fn fields(&self) -> Vec<(&'static str, String)> {
        let mut f = vec![
            ("MESSAGE", self.summary()),
            ("MESSAGE_ID", self.kind.message_id().to_owned()),
            ("PRIORITY", self.kind.priority().to_string()),
            ("SYSLOG_IDENTIFIER", IDENTIFIER.to_owned()),
            ("ACTION", self.kind.name().to_owned()),
        ];
        for (name, v) in [
            ("ACTOR", &self.actor),
            ("CHAT", &self.chat),
            ("TOOL", &self.tool),
            ("TARGET", &self.target),
            ("OUTCOME", &self.outcome),
            ("REASON", &self.reason),
        ] {
            if !v.is_empty() {
                f.push((name, clip(v).to_owned()));
            }
        }
        f.extend(self.extra.iter().filter(|(_, v)| !v.is_empty()).map(|(n, v)| (*n, clip(v).to_owned())));
        f
    }
}

fn clip(s: &str) -> &str {
    if s.len() <= MAX_FIELD {
        return s;
    }
    let mut end = MAX_FIELD;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Encode fields in journald's native format: `NAME=value\n`, or for a value holding a
/// newline `NAME\n<length as u64 LE><value>\n`.
pub fn encode(fields: &[(&str, String)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        out.extend_from_slice(name.as_bytes());
        if value.contains('\n') {
            out.push(b'\n');
            out.extend_from_slice(&(value.len() as u64).to_le_bytes());
            out.extend_from_slice(value.as_bytes());
        } else {
            out.push(b'=');
            out.extend_from_slice(value.as_bytes());
        }
        out.push(b'\n');
    }
    out
}

/// Decode journald's native format (for tests and the conformance check).
pub fn decode(mut data: &[u8]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    while !data.is_empty() {
        let line_end = data.iter().position(|&b| b == b'\n').unwrap_or(data.len());
        let line = &data[..line_end];
        if let Some(eq) = line.iter().position(|&b| b == b'=') {
            out.push((
                String::from_utf8_lossy(&line[..eq]).into_owned(),
                String::from_utf8_lossy(&line[eq + 1..]).into_owned(),
            ));
            data = data.get(line_end + 1..).unwrap_or_default();
        } else {
            let name = String::from_utf8_lossy(line).into_owned();
            let rest = data.get(line_end + 1..).unwrap_or_default();
            let Some(len_bytes) = rest.get(..8) else { break };
            let mut len = [0u8; 8];
            len.copy_from_slice(len_bytes);
            let len = u64::from_le_bytes(len) as usize;
            let Some(value) = rest.get(8..8 + len) else { break };
            out.push((name, String::from_utf8_lossy(value).into_owned()));
            data = rest.get(8 + len + 1..).unwrap_or_default();
        }
    }
    out
}

/// The audit writer.
pub struct Audit {
    socket_path: PathBuf,
    socket: Option<UnixDatagram>,
    recent: Mutex<VecDeque<Event>>,
    /// Events that could not reach the journal (they went to the log), for `zhuli status`.
    pub unjournaled: AtomicU64,
    warned: std::sync::atomic::AtomicBool,
}

impl Audit {
    pub fn new(settings: &AuditSettings) -> Self {
        let socket = UnixDatagram::unbound().ok();
        if let Some(s) = &socket {
            // A full journal queue must not stall a turn for long.
            let _ = s.set_write_timeout(Some(Duration::from_millis(500)));
        }
        Audit {
            socket_path: settings.journal_socket.clone(),
            socket,
            recent: Mutex::new(VecDeque::with_capacity(RECENT)),
            unjournaled: AtomicU64::new(0),
            warned: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Write `event` to the journal (or, failing that, the log) and keep it for `/audit`.
    pub fn record(&self, event: Event) {
        let datagram = encode(&event.fields());
        let sent = self.socket.as_ref().map(|s| s.send_to(&datagram, &self.socket_path));
        match sent {
            Some(Ok(_)) => {}
            other => {
                self.unjournaled.fetch_add(1, Ordering::Relaxed);
                let why = match other {
                    Some(Err(e)) => e.to_string(),
                    _ => "no socket".into(),
                };
                // The first miss is a warning; the events themselves go to the log at info level
                // (the agent's default), so a development run is not flooded.
                if !self.warned.swap(true, Ordering::Relaxed) {
                    log::warn!(
                        "the journal at {} cannot be reached ({why}); audit events go to this log instead",
                        self.socket_path.display()
                    );
                }
                log::info!("audit: {} chat={}", event.summary(), event.chat);
            }
        }
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if recent.len() == RECENT {
            recent.pop_front();
        }
        recent.push_back(event);
    }

    /// The newest `n` events, newest last.
    pub fn recent(&self, n: usize) -> Vec<Event> {
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        recent.iter().skip(recent.len().saturating_sub(n)).cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn native_format_round_trips_and_multiline_values_are_length_prefixed() {
        let fields = vec![("MESSAGE", "one\ntwo".to_owned()), ("ACTOR", "staff-1".to_owned())];
        let bytes = encode(&fields);
        assert!(bytes.starts_with(b"MESSAGE\n"));
        let back = decode(&bytes);
        assert_eq!(back, vec![("MESSAGE".into(), "one\ntwo".into()), ("ACTOR".into(), "staff-1".into())]);
    }

    #[test]
    fn message_ids_are_distinct_128_bit_hex() {
        let mut ids: Vec<&str> = Kind::ALL.iter().map(|k| k.message_id()).collect();
        assert!(ids.iter().all(|i| i.len() == 32 && i.chars().all(|c| c.is_ascii_hexdigit())));
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), Kind::ALL.len());
    }

    #[test]
    fn events_reach_a_listening_journal_socket() {
        let dir = std::env::temp_dir().join(format!("zhuli-audit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("journal.sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixDatagram::bind(&path).expect("bind");
        let audit = Audit::new(&AuditSettings { journal_socket: path.clone() });
        audit.record(Event::new(Kind::ToolDenied, "staff-9", "cid-1").tool("files_write").reason("not granted"));
        let mut buf = vec![0u8; 4096];
        let n = listener.recv(&mut buf).expect("datagram");
        let fields = decode(&buf[..n]);
        let get = |k: &str| fields.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("SYSLOG_IDENTIFIER"), Some(IDENTIFIER));
        assert_eq!(get("MESSAGE_ID"), Some(Kind::ToolDenied.message_id()));
        assert_eq!(get("ACTOR"), Some("staff-9"));
        assert_eq!(get("TOOL"), Some("files_write"));
        assert_eq!(get("TARGET"), None);
        assert_eq!(audit.recent(5).len(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
