//! Tools: what the model may ask the agent to do, behind one contract (the plugin interface).
//!
//! A tool has a name, a description and JSON-schema parameters (all shown to the model), a risk
//! level, an `execute` and optionally an `undo`. The turn loop checks every call before it runs:
//! the tool exists and is granted to the asking user, the arguments are JSON no larger than the
//! limit and valid against the schema, and every call but a read (a share, a write, a
//! destructive call) has been confirmed in chat by the person who asked. Tools themselves enforce their own confinement (the files tool's roots).

pub mod caldav;
pub mod dav;
pub mod drive;
pub mod files;
pub mod github;
pub mod jobs;
pub mod mcp;
pub mod schema;
pub mod system;
pub mod when;
pub mod workspace;

use std::{collections::BTreeMap, future::Future, pin::Pin, sync::Arc};

use serde::Deserialize;
use serde_json::Value;

use crate::llm::ToolSpec;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The sha256 of `data`, in hex: how a confirmation names long content and an undo knows a file
/// is still what a write left.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, data).as_ref())
}

/// The sha256 of everything `source` holds, in hex, read in pieces (a file of any size).
pub fn sha256_of_read(source: &mut impl std::io::Read) -> std::io::Result<String> {
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match source.read(&mut buf) {
            Ok(0) => return Ok(hex(digest.finish().as_ref())),
            Ok(n) => digest.update(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// The text of `args[name]`, or "" when it is absent or not a string (the schema was checked).
pub fn str_arg<'a>(args: &'a Value, name: &str) -> &'a str {
    args.get(name).and_then(Value::as_str).unwrap_or_default()
}

/// What a call does, by its effect; everything but a read needs the asker's confirmation in chat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Risk {
    /// Reads, whose result stays in the conversation.
    Read,
    /// Sends data somewhere new: a file to a chat, to the drive, to GitHub.
    Share,
    Write,
    Destructive,
}

impl Risk {
    pub fn name(self) -> &'static str {
        match self {
            Risk::Read => "read",
            Risk::Share => "share",
            Risk::Write => "write",
            Risk::Destructive => "destructive",
        }
    }
}

/// What a successful call produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Fed back to the model.
    pub text: String,
    /// How to reverse it, in the tool's own encoding, with a line a person can read.
    pub undo: Option<(Vec<u8>, String)>,
}

impl Outcome {
    pub fn text(text: impl Into<String>) -> Self {
        Outcome { text: text.into(), undo: None }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ToolError {
    /// The call was not acceptable (bad path, outside the roots, too large): the model may
    /// correct it.
    #[error("refused: {0}")]
    Refused(String),
    /// The call was fine but doing it failed.
    #[error("failed: {0}")]
    Failed(String),
    /// Only an admin can fix this (an API permission the app lacks): the turn loop makes sure
    /// the person is told, whatever the model answers.
    #[error("needs an admin: {0}")]
    NeedsAdmin(String),
    /// A backend's own words about a failure (a plugin's error output or refusal), for the
    /// model only: they may hold anything the backend read or was sent, so the audit trail
    /// records their size.
    #[error("failed: {0}")]
    Reported(String),
}

impl ToolError {
    /// The error as the audit trail records it. Our own refusals may quote what they were
    /// asked (a name nobody has, a time that does not parse): argument values the call's audit
    /// target does not show already, and “quoted” phrases, become their size. A backend's own
    /// words are only counted.
    pub fn audit_reason(&self, args: &Value, target: &str) -> String {
        match self {
            ToolError::Reported(text) => {
                format!("failed: the backend's own error text, {} (not recorded)", size(text))
            }
            e => redact(&e.to_string(), args, target),
        }
    }
}

// What the audit trail may show of a call's arguments (docs/ARCHITECTURE.md: ids, tool names,
// paths and reasons; never what people wrote). Targets are made of these; anything else a
// person or the model wrote becomes its size.

/// `(12 chars)`: how much text there was, not what it said.
pub fn size(text: &str) -> String {
    format!("({} chars)", text.chars().count())
}

/// A read of the asker's own private things (`what`: their received files, calendar, to-dos,
/// approvals) is answered only in a 1:1 chat: in a group everyone sees the answer, and a file
/// or message there may be what made the model ask.
pub fn private_in_group(ctx: &Context, what: &str) -> Result<(), ToolError> {
    if ctx.group {
        return Err(ToolError::Refused(format!(
            "{what} are read only in a 1:1 chat with me, never into a group where everyone would see them; tell the user to ask me 1:1"
        )));
    }
    Ok(())
}

/// `value` when it looks like an id (a staff id, an event id, `owner/repo`, a calendar's name):
/// 1 to 64 ASCII letters, digits and `-_.:/@+=#`. Free text does not: it has spaces, or letters
/// of other scripts. Anything else is shown as its size.
pub fn id_or_size(value: &str) -> String {
    let id = !value.is_empty()
        && value.len() <= 64
        && value.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:/@+=#".contains(c));
    if id { value.to_owned() } else { size(value) }
}

/// Each string of a JSON list as [`id_or_size`] shows it.
pub fn ids_or_sizes(list: &Value) -> Vec<String> {
    list.as_array().into_iter().flatten().map(|v| id_or_size(v.as_str().unwrap_or_default())).collect()
}

/// `value` when it is a time the tools read ([`when::parse`]), else its size.
pub fn time_or_size(value: &str) -> String {
    if when::parse(value, 0).is_ok() { value.trim().to_owned() } else { size(value) }
}

/// `text` (a reason about a call with `args`) with every “quoted” phrase, and every argument
/// value and name that `shown` (the call's audit target) does not contain, replaced by its
/// size. A value is also found cut short (tools quote at most so many characters of it) and
/// as Rust's `{:?}` writes it.
pub fn redact(text: &str, args: &Value, shown: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(open) = rest.find('“') {
        let inner = &rest[open + '“'.len_utf8()..];
        let Some(close) = inner.find('”') else { break };
        let quoted = &inner[..close];
        out.push_str(&rest[..open + '“'.len_utf8()]);
        out.push_str(&if shown.contains(quoted) { quoted.to_owned() } else { size(quoted) });
        rest = &inner[close..];
    }
    out.push_str(rest);
    let mut values = Vec::new();
    argument_texts(args, &mut values);
    values.retain(|v| v.chars().count() >= 2 && !shown.contains(v.as_str()));
    // Each value, and its `{:?}` form, with the size to show for it.
    let mut patterns: Vec<(String, usize)> = Vec::new();
    for v in values {
        let n = v.chars().count();
        let escaped = format!("{v:?}");
        let inner = &escaped[1..escaped.len() - 1];
        if inner != v {
            patterns.push((inner.to_owned(), n));
        }
        patterns.push((v, n));
    }
    replace_values(&out, &patterns)
}

/// The strings of `args` (values at any depth, and names that are not plain identifiers),
/// trimmed.
fn argument_texts(args: &Value, out: &mut Vec<String>) {
    match args {
        Value::String(s) if !s.trim().is_empty() => out.push(s.trim().to_owned()),
        Value::Array(items) => items.iter().for_each(|v| argument_texts(v, out)),
        Value::Object(map) => {
            for (k, v) in map {
                if !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
                    out.push(k.clone());
                }
                argument_texts(v, out);
            }
        }
        _ => {}
    }
}

/// `text` with each copy of a pattern, whole or cut short after at least its first four
/// characters, replaced by the size of the value it stands for; where several match, the
/// longest match wins.
fn replace_values(text: &str, patterns: &[(String, usize)]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        let best = patterns
            .iter()
            .filter_map(|(p, n)| {
                let same: usize =
                    rest.chars().zip(p.chars()).take_while(|(a, b)| a == b).map(|(a, _)| a.len_utf8()).sum();
                let needed = p.char_indices().nth(4).map_or(p.len(), |(i, _)| i);
                (same >= needed).then_some((same, std::cmp::Reverse(p.len()), *n))
            })
            .max();
        match best {
            Some((same, _, n)) => {
                out.push_str(&format!("({n} chars)"));
                rest = &rest[same..];
            }
            None => {
                out.push(c);
                rest = &rest[c.len_utf8()..];
            }
        }
    }
    out
}

/// Who a call is for: tools act as the asking person, never on their own authority.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Context {
    /// The asker's staff id (or `dingtalk:<id>` outside the organisation).
    pub actor: String,
    /// The conversation the call came from.
    pub chat: String,
    /// That conversation is a group chat (else a 1:1 chat with the asker).
    pub group: bool,
    /// The office's offset from UTC, for the times a tool tells people.
    pub offset_minutes: i32,
    /// The asker's name as DingTalk shows it.
    pub nick: String,
    /// The id of the message whose turn made the call (what a change made once per message is
    /// keyed by); empty when there is none.
    pub message: String,
    /// The turn holds protected content (`privacy`): what the call keeps must not carry it to
    /// where open work goes.
    pub protected: bool,
}

/// The plugin contract.
pub trait Tool: Send + Sync {
    fn name(&self) -> &str;
    fn description(&self) -> &str;
    /// JSON schema of the arguments (an object).
    fn parameters(&self) -> &Value;
    fn risk(&self) -> Risk;
    /// The risk of this call, at most [`Tool::risk`]: what decides whether it waits for the
    /// asker's confirmation. The tool's risk by default.
    fn risk_of(&self, _ctx: &Context, _args: &Value) -> Risk {
        self.risk()
    }
    /// What the call touches, for the audit trail and the confirmation question (no contents).
    fn target(&self, args: &Value) -> String;
    /// What the confirmation question says the call will do; may name what the audit trail
    /// must not (an event's title). The target by default.
    fn question(&self, args: &Value) -> String {
        self.target(args)
    }
    /// Check and complete the arguments before anything is asked or done (resolve names, refuse
    /// a time in the past), so a confirmation question names what will really happen. The
    /// result is what `execute` gets. Tools without checks keep the default.
    fn prepare<'a>(&'a self, _ctx: &'a Context, args: Value) -> BoxFuture<'a, Result<Value, ToolError>> {
        Box::pin(async move { Ok(args) })
    }
    fn execute<'a>(&'a self, ctx: &'a Context, args: Value) -> BoxFuture<'a, Result<Outcome, ToolError>>;
    /// Reverse an earlier call from its undo payload. Tools without undo keep the default.
    fn undo<'a>(&'a self, _ctx: &'a Context, _payload: &'a [u8]) -> BoxFuture<'a, Result<String, ToolError>> {
        Box::pin(async { Err(ToolError::Failed("this tool cannot undo".into())) })
    }
    /// Where an undo was refused because later work would be lost: put back what the change
    /// replaced beside the later work, as a copy, and touch nothing else.
    fn undo_as_copy<'a>(&'a self, _ctx: &'a Context, _payload: &'a [u8]) -> BoxFuture<'a, Result<String, ToolError>> {
        Box::pin(async { Err(ToolError::Refused(rust_i18n::t!("undo.no_copy").into_owned())) })
    }
}

/// `[tools]`: the built-in tools' settings.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ToolSettings {
    pub files: files::FilesSettings,
    pub dingtalk: workspace::WorkspaceSettings,
    pub github: github::GithubSettings,
    pub drive: drive::DriveSettings,
    pub caldav: caldav::CaldavSettings,
    /// Third-party MCP servers, by the name their tools get as a prefix.
    pub mcp: BTreeMap<String, mcp::PluginSettings>,
}

/// The tools of this box, by name.
#[derive(Clone, Default)]
pub struct Registry {
    tools: BTreeMap<String, Arc<dyn Tool>>,
}

impl Registry {
    pub fn add(&mut self, tool: Arc<dyn Tool>) {
        self.tools.insert(tool.name().to_owned(), tool);
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn Tool>> {
        self.tools.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> + Clone {
        self.tools.keys().map(String::as_str)
    }

    /// The specs of the tools `granted` allows, for the model.
    pub fn specs(&self, granted: impl Fn(&str) -> bool) -> Vec<ToolSpec> {
        self.tools
            .values()
            .filter(|t| granted(t.name()))
            .map(|t| ToolSpec::function(t.name(), t.description(), t.parameters().clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const WORDS: &str = "机密 zq7741 季度预算";

    #[test]
    fn ids_and_times_are_shown_free_text_is_counted() {
        for (value, shown) in [
            ("manager001", "manager001"),
            ("acme/site", "acme/site"),
            ("evt_9f2-A", "evt_9f2-A"),
            ("Li Lei", "(6 chars)"),
            ("张三", "(2 chars)"),
            (WORDS, "(14 chars)"),
            ("", "(0 chars)"),
        ] {
            assert_eq!(id_or_size(value), shown, "{value}");
        }
        assert_eq!(id_or_size(&"a".repeat(65)), "(65 chars)");
        assert_eq!(time_or_size("2026-12-04T14:00"), "2026-12-04T14:00");
        assert_eq!(time_or_size("next friday"), "(11 chars)");
    }

    #[test]
    fn reasons_keep_what_the_target_shows_and_count_the_rest() {
        let args = json!({"path": "share/a.txt", "query": WORDS, "people": [WORDS], "when": format!("{WORDS} \"x\"")});
        let shown = "share/a.txt";
        for (reason, expect) in [
            ("`share/a.txt` does not exist".to_owned(), "`share/a.txt` does not exist".to_owned()),
            (format!("no one called “{WORDS}”"), "no one called “(14 chars)”".to_owned()),
            (format!("no one called {WORDS}, sorry"), "no one called (14 chars), sorry".to_owned()),
            // Cut short by the tool, and as `{:?}` writes it.
            (format!("no match for {}…", &WORDS[..10]), "no match for (14 chars)…".to_owned()),
            (format!("{:?} is not a time", format!("{WORDS} \"x\"")), "\"(18 chars)\" is not a time".to_owned()),
        ] {
            assert_eq!(redact(&reason, &args, shown), expect);
        }
        let odd = json!({WORDS: 1, "path": "share/a.txt"});
        assert_eq!(
            redact(&format!("argument `{WORDS}` is not known"), &odd, shown),
            "argument `(14 chars)` is not known"
        );
        let e = ToolError::Refused(format!("there is no department called “{WORDS}”"));
        assert_eq!(
            e.audit_reason(&json!({"department": WORDS}), "department (14 chars)"),
            "refused: there is no department called “(14 chars)”"
        );
        let e = ToolError::Reported(format!("Could not find exact match for edit:\n{WORDS}"));
        assert!(e.to_string().contains(WORDS), "the model is told");
        let audited = e.audit_reason(&json!({}), "");
        assert!(audited.starts_with("failed: the backend's own error text, (51 chars)"), "{audited}");
    }
}
