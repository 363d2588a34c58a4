//! One endpoint checked the way `zhuli doctor` does it: the server answers, it lists the
//! configured model among those it offers, the key is accepted, and the model calls a tool when
//! asked to.
//!
//! The listing is `GET {base_url}/models`, which DeepSeek, DashScope, Ollama, vLLM and llama.cpp's
//! server all serve (llama.cpp's even without its key); a server that does not list its models is
//! not failed for it. The tool check is one small chat request (at most [`PROBE_TOKENS`] tokens
//! of answer, tried once) offering a single tool, [`PROBE_TOOL`], with nothing of anyone's
//! content in it. It is not counted against the endpoint's budgets.
//!
//! What a server says (its error messages, its model names) is cleaned before it is shown: no
//! control characters, nothing Markdown would turn into a link, each piece cut short.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{ChatMessage, Client, LlmError, Role, Settings, ToolSpec, route::Place};
use crate::dingtalk::http::{HttpClient, HttpError, tls_config};

/// The tool the check asks the model to call.
pub const PROBE_TOOL: &str = "zhuli_probe";
/// The most the check lets the model answer (a reasoning model may use them up thinking).
pub const PROBE_TOKENS: u32 = 256;

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
    /// Refused without a key being set: the server, or a front before it, wants one or does
    /// not let this box in.
    Front,
    /// The account has no credit left (HTTP 402).
    Balance,
    /// The model (or the address) is not one the server knows.
    Model,
    /// The model does not call tools, or the server refuses requests with tools.
    Tools,
    /// It answers, but not within the check's time (a local model may still be loading).
    Slow,
    /// Refused for another reason, which the server's message says.
    Refused,
}

#[derive(Debug, Clone)]
pub struct Finding {
    pub level: Level,
    /// One line: the endpoint, and what was found (no key; the server's words cleaned).
    pub line: String,
    /// What needs doing, most pressing first.
    pub troubles: Vec<Trouble>,
}

/// What a server said, safe to show: printable characters only, none that Markdown would make a
/// link or emphasis of, at most `max` characters.
pub fn clean(text: &str, max: usize) -> String {
    let mut out: String = text
        .chars()
        .filter(|c| !c.is_control())
        .map(|c| if "[]()<>*_`|#!\\".contains(c) { ' ' } else { c })
        .take(max)
        .collect();
    if text.chars().count() > max {
        out.push('…');
    }
    out
}

/// Does the server's list name `model`? Ollama lists `qwen2.5` as `qwen2.5:latest`.
fn offers(offered: &[String], model: &str) -> bool {
    offered.iter().any(|m| m == model || (!model.contains(':') && m.strip_suffix(":latest") == Some(model)))
}

/// Check one endpoint; the whole check takes at most `bound` (the tool request gets what the
/// listing left).
pub async fn check(settings: &Settings, bound: Duration) -> Finding {
    let started = Instant::now();
    let place = match settings.place {
        Place::Local => "local",
        Place::Cloud => "cloud",
    };
    let head = format!("{} ({place}, {})", settings.name, clean(&settings.model, 64));
    let finding = |level, what: String, troubles| Finding { level, line: format!("{head}: {what}"), troubles };
    let client = match Client::new(settings.clone()) {
        Ok(c) => c,
        Err(e) => return finding(Level::Fail, format!("FAILED: {e}"), vec![Trouble::Reach]),
    };
    let keyed = settings.api_key.is_some();
    let refused_without_key = |status: u16| {
        format!(
            "FAILED: refused (HTTP {status}) and no api_key is set: the server, or a front before it, wants a key or does not let this box in"
        )
    };
    let mut found = Vec::new();
    let mut level = Level::Pass;
    let mut troubles = Vec::new();

    // The listing: reachable, model offered.
    let http = HttpClient::new(tls_config(), bound.min(settings.timeout_ms.get()));
    let auth = settings.api_key.as_ref().map(|k| format!("Bearer {}", k.expose()));
    let headers: Vec<(&str, &str)> = auth.as_deref().map(|a| vec![("authorization", a)]).unwrap_or_default();
    let url = format!("{}/models", settings.base_url.trim_end_matches('/'));
    let mut listed = false;
    match http.request(http::Method::GET, &url, &headers, bytes::Bytes::new(), 1024 * 1024).await {
        Err(e @ (HttpError::Transport { .. } | HttpError::Timeout(_) | HttpError::Url(_))) => {
            return finding(Level::Fail, format!("FAILED: not reachable: {e}"), vec![Trouble::Reach]);
        }
        Err(e) => found.push(format!("the model list is not readable ({e})")),
        Ok(r) if matches!(r.status.as_u16(), 401 | 403) => {
            let status = r.status.as_u16();
            return if keyed {
                finding(
                    Level::Fail,
                    format!("FAILED: the key was refused (HTTP {status}); the server answers"),
                    vec![Trouble::Key],
                )
            } else {
                finding(Level::Fail, refused_without_key(status), vec![Trouble::Front])
            };
        }
        Ok(r) if r.status.is_success() => {
            listed = true;
            let offered = offered_models(&r.json());
            if offers(&offered, &settings.model) {
                found.push(format!("reachable, model offered ({} in all)", offered.len()));
            } else {
                level = Level::Warn;
                troubles.push(Trouble::Model);
                let shown: Vec<String> = offered.iter().take(6).map(|m| clean(m, 64)).collect();
                let more = if offered.len() > shown.len() { ", …" } else { "" };
                found.push(format!(
                    "reachable, but the model is not among the {} it lists ({}{more})",
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
    let mut fail = |trouble: Trouble, what: String, found: &mut Vec<String>, troubles: &mut Vec<Trouble>| {
        level = Level::Fail;
        troubles.retain(|t| *t != trouble);
        troubles.insert(0, trouble);
        found.push(what);
    };
    let tool_words = |m: &str| {
        let m = m.to_ascii_lowercase();
        m.contains("tool") || m.contains("jinja") || m.contains("function")
    };
    match tokio::time::timeout(left, client.complete_capped(&messages, &tools, PROBE_TOKENS)).await {
        Err(_) if listed => {
            level = level.max(Level::Warn);
            troubles.push(Trouble::Slow);
            found.push(format!(
                "no answer to a request with a tool within {} s (a local model may still be loading: check again in a minute)",
                left.as_secs()
            ));
        }
        Err(_) => fail(
            Trouble::Reach,
            format!("FAILED: no answer to a request with a tool within {} s", left.as_secs()),
            &mut found,
            &mut troubles,
        ),
        Ok(Err(LlmError::Unauthorised(status))) if keyed => {
            fail(Trouble::Key, format!("FAILED: the key was refused (HTTP {status})"), &mut found, &mut troubles)
        }
        Ok(Err(LlmError::Unauthorised(status))) => {
            fail(Trouble::Front, refused_without_key(status), &mut found, &mut troubles)
        }
        Ok(Err(LlmError::Refused { status: 402, message })) => fail(
            Trouble::Balance,
            format!("FAILED: the account has no credit left (HTTP 402: {})", clean(&message, 160)),
            &mut found,
            &mut troubles,
        ),
        Ok(Err(LlmError::Refused { status: 404, message })) => fail(
            Trouble::Model,
            format!("FAILED: the model or the address is not found (HTTP 404: {})", clean(&message, 160)),
            &mut found,
            &mut troubles,
        ),
        Ok(Err(LlmError::Refused { status, message })) if tool_words(&message) => fail(
            Trouble::Tools,
            format!("FAILED: a request with a tool was refused (HTTP {status}: {})", clean(&message, 160)),
            &mut found,
            &mut troubles,
        ),
        Ok(Err(LlmError::Refused { status, message })) => fail(
            Trouble::Refused,
            format!("FAILED: refused (HTTP {status}: {})", clean(&message, 160)),
            &mut found,
            &mut troubles,
        ),
        Ok(Err(LlmError::GaveUp { last, .. })) if tool_words(&last) => fail(
            Trouble::Tools,
            format!("FAILED: a request with a tool failed ({})", clean(&last, 160)),
            &mut found,
            &mut troubles,
        ),
        Ok(Err(e)) => {
            fail(Trouble::Reach, format!("FAILED: {}", clean(&e.to_string(), 200)), &mut found, &mut troubles)
        }
        Ok(Ok(c)) => {
            let ms = asked.elapsed().as_millis();
            if c.message.tool_calls.iter().any(|t| t.function.name == PROBE_TOOL) {
                found.push(format!("key accepted, tool calling works ({ms} ms)"));
            } else if c.finish_reason.as_deref() == Some("length") {
                level = level.max(Level::Warn);
                troubles.push(Trouble::Slow);
                found.push(format!(
                    "key accepted; the answer reached {PROBE_TOKENS} tokens before calling the tool (a reasoning model?), so tool calling is not confirmed"
                ));
            } else {
                level = level.max(Level::Warn);
                troubles.push(Trouble::Tools);
                found.push(format!(
                    "key accepted; asked to call a tool, it answered in text ({ms} ms): this model may not support tool calling"
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

    #[test]
    fn an_untagged_name_is_the_latest() {
        let offered = vec!["qwen2.5:latest".to_owned(), "llama3.1:8b".to_owned()];
        assert!(offers(&offered, "qwen2.5"));
        assert!(offers(&offered, "qwen2.5:latest"));
        assert!(offers(&offered, "llama3.1:8b"));
        assert!(!offers(&offered, "llama3.1"), "only :latest is implied");
        assert!(!offers(&offered, "qwen2.5:7b"));
    }

    #[test]
    fn what_a_server_says_is_cleaned() {
        assert_eq!(clean("[click](http://evil)\u{7}\n ok", 100), " click  http://evil  ok");
        assert_eq!(clean(&"x".repeat(70), 64), format!("{}…", "x".repeat(64)));
    }
}
