//! One endpoint checked the way `zhuli doctor` does it: the server answers, the key is accepted,
//! the configured model is among those it offers, and the model calls a tool when asked to.
//!
//! The listing is `GET {base_url}/models`, which DeepSeek, DashScope, Ollama, vLLM and llama.cpp's
//! server all serve; a server that does not list its models is not failed for it. The tool check
//! is one small chat request offering a single tool, [`PROBE_TOOL`], with nothing of anyone's
//! content in it (a few dozen tokens).

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{ChatMessage, Client, LlmError, Role, Settings, ToolSpec, route::Place};
use crate::dingtalk::http::{HttpClient, HttpError, tls_config};

/// The tool the check asks the model to call.
pub const PROBE_TOOL: &str = "zhuli_probe";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Pass,
    Warn,
    Fail,
}

/// What needs doing when the check is not a pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trouble {
    /// The server did not answer: address, network, the server itself.
    Reach,
    /// The key was refused.
    Key,
    /// The model named is not one the server offers.
    Model,
    /// The model does not call tools.
    Tools,
}

#[derive(Debug, Clone)]
pub struct Finding {
    pub level: Level,
    /// One line: the endpoint, and what was found (no key, no content).
    pub line: String,
    /// What needs doing, most pressing first.
    pub troubles: Vec<Trouble>,
}

/// Check one endpoint; the whole check takes at most `bound` (the tool request gets what the
/// listing left).
pub async fn check(settings: &Settings, bound: Duration) -> Finding {
    let started = Instant::now();
    let place = match settings.place {
        Place::Local => "local",
        Place::Cloud => "cloud",
    };
    let head = format!("{} ({place}, {})", settings.name, settings.model);
    let finding = |level, what: String, troubles| Finding { level, line: format!("{head}: {what}"), troubles };
    let client = match Client::new(settings.clone()) {
        Ok(c) => c,
        Err(e) => return finding(Level::Fail, format!("FAILED: {e}"), vec![Trouble::Reach]),
    };
    let mut found = Vec::new();
    let mut level = Level::Pass;
    let mut troubles = Vec::new();

    // The listing: reachable, key accepted, model offered.
    let http = HttpClient::new(tls_config(), bound.min(settings.timeout_ms.get()));
    let auth = settings.api_key.as_ref().map(|k| format!("Bearer {}", k.expose()));
    let headers: Vec<(&str, &str)> = auth.as_deref().map(|a| vec![("authorization", a)]).unwrap_or_default();
    let url = format!("{}/models", settings.base_url.trim_end_matches('/'));
    match http.request(http::Method::GET, &url, &headers, bytes::Bytes::new(), 1024 * 1024).await {
        Err(e @ (HttpError::Transport { .. } | HttpError::Timeout(_) | HttpError::Url(_))) => {
            return finding(Level::Fail, format!("FAILED: not reachable: {e}"), vec![Trouble::Reach]);
        }
        Err(e) => found.push(format!("the model list is not readable ({e})")),
        Ok(r) if matches!(r.status.as_u16(), 401 | 403) => {
            return finding(
                Level::Fail,
                format!("FAILED: the key was refused (HTTP {}); the server answers", r.status.as_u16()),
                vec![Trouble::Key],
            );
        }
        Ok(r) if r.status.is_success() => {
            let offered = offered_models(&r.json());
            if offered.iter().any(|m| m == &settings.model) {
                found.push(format!("reachable, key accepted, model offered ({} in all)", offered.len()));
            } else {
                level = Level::Warn;
                troubles.push(Trouble::Model);
                let shown: Vec<&str> = offered.iter().take(6).map(String::as_str).collect();
                let more = if offered.len() > shown.len() { ", …" } else { "" };
                found.push(format!(
                    "reachable, key accepted, but the model {:?} is not among the {} offered ({}{more})",
                    settings.model,
                    offered.len(),
                    shown.join(", ")
                ));
            }
        }
        Ok(r) => found.push(format!("reachable; it does not list its models (HTTP {})", r.status.as_u16())),
    }

    // One request with one tool.
    let left = bound.saturating_sub(started.elapsed()).max(Duration::from_secs(1));
    let messages = [
        ChatMessage::text(Role::System, "This is a connection check. Answer only by calling the tool you are given."),
        ChatMessage::text(Role::User, format!("Call {PROBE_TOOL} with ok set to true.")),
    ];
    let tools = [ToolSpec::function(
        PROBE_TOOL,
        "Confirms that tool calling works.",
        json!({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}),
    )];
    let asked = Instant::now();
    match tokio::time::timeout(left, client.complete_with(&messages, &tools, 0)).await {
        Err(_) => {
            level = Level::Fail;
            troubles.insert(0, Trouble::Reach);
            found.push(format!("FAILED: no answer to a request with a tool within {} s", left.as_secs()));
        }
        Ok(Err(LlmError::Unauthorised(status))) => {
            level = Level::Fail;
            troubles.insert(0, Trouble::Key);
            found.push(format!("FAILED: the key was refused for a chat request (HTTP {status})"));
        }
        Ok(Err(LlmError::Refused { status, message })) => {
            level = Level::Fail;
            troubles.push(Trouble::Tools);
            found.push(format!("FAILED: a request with a tool was refused (HTTP {status}: {message})"));
        }
        Ok(Err(e)) => {
            level = Level::Fail;
            troubles.insert(0, Trouble::Reach);
            found.push(format!("FAILED: {e}"));
        }
        Ok(Ok(c)) => {
            let ms = asked.elapsed().as_millis();
            if c.message.tool_calls.iter().any(|t| t.function.name == PROBE_TOOL) {
                found.push(format!("tool calling works ({ms} ms)"));
            } else {
                level = level.max(Level::Warn);
                troubles.push(Trouble::Tools);
                found.push(format!(
                    "asked to call a tool, it answered in text ({ms} ms): this model may not support tool calling"
                ));
            }
        }
    }
    finding(level, found.join("; "), troubles)
}

/// The ids in an OpenAI-style model list (`{"data": [{"id": …}]}`); Ollama's own shape
/// (`{"models": [{"name": …}]}`) too.
fn offered_models(v: &Value) -> Vec<String> {
    let from = |list: Option<&Value>, key: &str| -> Vec<String> {
        list.and_then(Value::as_array)
            .map(|a| a.iter().filter_map(|m| m.get(key).and_then(Value::as_str).map(str::to_owned)).collect())
            .unwrap_or_default()
    };
    let mut ids = from(v.get("data"), "id");
    if ids.is_empty() {
        ids = from(v.get("models"), "name");
    }
    ids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_lists_in_both_shapes() {
        let openai = json!({"object": "list", "data": [{"id": "deepseek-chat"}, {"id": "deepseek-reasoner"}]});
        assert_eq!(offered_models(&openai), ["deepseek-chat", "deepseek-reasoner"]);
        let ollama = json!({"models": [{"name": "qwen2.5:7b"}]});
        assert_eq!(offered_models(&ollama), ["qwen2.5:7b"]);
        assert!(offered_models(&json!({"error": "x"})).is_empty());
    }
}
