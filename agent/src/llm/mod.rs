//! The LLM client: OpenAI-compatible `/v1/chat/completions` with tools, the protocol DeepSeek,
//! Qwen/DashScope, Moonshot, Ollama, vLLM and llama.cpp's server speak. Streamed (server-sent
//! events, tool calls assembled from deltas) and whole answers; retries on 429 and 5xx honouring
//! `Retry-After`; a governor limiter on requests.
//!
//! The assistant's turn loop calls it; `sim` is a scripted server speaking the same protocol on
//! loopback, for tests.
//!
//! Never logs prompts or answers; the API key is a [`Secret`] and never appears in an error.

pub mod check;
mod client;
pub mod health;
pub mod route;
pub mod sse;

use serde::{Deserialize, Serialize};

use crate::{dingtalk::settings::Millis, secret::Secret};

pub use client::{Client, LlmError};

/// `[llm]`: where the model is and how it is reached.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The endpoint's name in `/status`, the audit trail and replies (`[llm]` is "llm").
    #[serde(default = "default_name")]
    pub name: String,
    /// `local` (on the office's own machines: may see protected work) or `cloud` (the default).
    #[serde(rename = "where", default)]
    pub place: route::Place,
    /// Base URL up to and including the version, e.g. `https://api.deepseek.com/v1` or
    /// `http://127.0.0.1:8080/v1` (plain http only to loopback).
    pub base_url: String,
    pub model: String,
    pub api_key: Option<Secret>,
    #[serde(default = "default_timeout")]
    pub timeout_ms: Millis,
    #[serde(default = "default_retries")]
    pub max_retries: u32,
    #[serde(default = "default_rpm")]
    pub requests_per_minute: u32,
    /// The model accepts image input (pictures users send go to it as images); otherwise they
    /// are offered to the tools as files.
    #[serde(default)]
    pub vision: bool,
    /// Tokens the whole box may use per day (0 = no limit).
    #[serde(default)]
    pub daily_tokens: u64,
    /// Tokens one person may use per day (0 = no limit).
    #[serde(default)]
    pub daily_tokens_per_user: u64,
    /// Tokens this endpoint may use per calendar month (0 = no limit); beyond, it is passed
    /// over like one that fails, until the month ends.
    #[serde(default)]
    pub monthly_tokens: u64,
}

fn default_name() -> String {
    "llm".into()
}
fn default_timeout() -> Millis {
    Millis::from_ms(120_000)
}
fn default_retries() -> u32 {
    4
}
fn default_rpm() -> u32 {
    60
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
    Tool,
}

/// One message of the conversation sent to the model.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ChatMessage {
    pub role: Role,
    #[serde(default)]
    pub content: Option<String>,
    #[serde(default)]
    pub tool_calls: Vec<ToolCall>,
    #[serde(default)]
    pub tool_call_id: Option<String>,
    /// Images sent with a user message (`data:` URLs), for models that accept image input:
    /// the content then goes out as parts, text first.
    #[serde(skip)]
    pub images: Vec<String>,
}

impl Serialize for ChatMessage {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("role", &self.role)?;
        if self.images.is_empty() {
            if let Some(c) = &self.content {
                m.serialize_entry("content", c)?;
            }
        } else {
            let mut parts = vec![serde_json::json!({"type": "text", "text": self.content.as_deref().unwrap_or("")})];
            parts.extend(
                self.images.iter().map(|url| serde_json::json!({"type": "image_url", "image_url": {"url": url}})),
            );
            m.serialize_entry("content", &parts)?;
        }
        if !self.tool_calls.is_empty() {
            m.serialize_entry("tool_calls", &self.tool_calls)?;
        }
        if let Some(id) = &self.tool_call_id {
            m.serialize_entry("tool_call_id", id)?;
        }
        m.end()
    }
}

impl ChatMessage {
    pub fn text(role: Role, content: impl Into<String>) -> Self {
        ChatMessage {
            role,
            content: Some(content.into()),
            tool_calls: Vec::new(),
            tool_call_id: None,
            images: Vec::new(),
        }
    }

    pub fn tool_result(call_id: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: Role::Tool,
            content: Some(content.into()),
            tool_calls: Vec::new(),
            tool_call_id: Some(call_id.into()),
            images: Vec::new(),
        }
    }
}

/// A function call the model asks for; `arguments` is JSON text as the model wrote it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCall {
    pub id: String,
    #[serde(rename = "type", default = "function_type")]
    pub kind: String,
    pub function: FunctionCall,
}

fn function_type() -> String {
    "function".into()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionCall {
    pub name: String,
    #[serde(default)]
    pub arguments: String,
}

/// A tool offered to the model.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ToolSpec {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub function: FunctionSpec,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FunctionSpec {
    pub name: String,
    pub description: String,
    pub parameters: serde_json::Value,
}

impl ToolSpec {
    pub fn function(name: impl Into<String>, description: impl Into<String>, parameters: serde_json::Value) -> Self {
        ToolSpec {
            kind: "function",
            function: FunctionSpec { name: name.into(), description: description.into(), parameters },
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct Usage {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
    #[serde(default)]
    pub total_tokens: u64,
}

/// The model's answer to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    pub message: ChatMessage,
    pub finish_reason: Option<String>,
    pub usage: Option<Usage>,
}
