//! Tools: what the model may ask the agent to do, behind one contract (the plugin interface).
//!
//! A tool has a name, a description and JSON-schema parameters (all shown to the model), a risk
//! level, an `execute` and optionally an `undo`. The turn loop checks every call before it runs:
//! the tool exists and is granted to the asking user, the arguments are JSON no larger than the
//! limit and valid against the schema, and a `write` or `destructive` call has been confirmed in
//! chat. Tools themselves enforce their own confinement (the files tool's roots).

pub mod caldav;
pub mod dav;
pub mod drive;
pub mod files;
pub mod github;
pub mod local_server;
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

/// The text of `args[name]`, or "" when it is absent or not a string (the schema was checked).
pub fn str_arg<'a>(args: &'a Value, name: &str) -> &'a str {
    args.get(name).and_then(Value::as_str).unwrap_or_default()
}

/// How much harm a call can do; `write` and `destructive` need a confirmation in chat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Risk {
    Read,
    Write,
    Destructive,
}

impl Risk {
    pub fn name(self) -> &'static str {
        match self {
            Risk::Read => "read",
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
}

/// The plugin contract.
pub trait Tool: Send + Sync {
    fn name(&self) -> &str;
    fn description(&self) -> &str;
    /// JSON schema of the arguments (an object).
    fn parameters(&self) -> &Value;
    fn risk(&self) -> Risk;
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
