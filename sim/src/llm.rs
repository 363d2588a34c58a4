//! A scripted OpenAI-compatible chat-completions server on loopback, for tests: it answers each
//! request with the next scripted reply (text, tool calls, an error status, a stream that breaks,
//! a malformed chunk), streamed as server-sent events when the request asks for `stream`, and
//! records every request it received.
//!
//! As an attacker ([`LlmSim::set_attacker`]) it is the model fully on the attacker's side: with
//! nothing scripted it obeys the newest instruction it finds in what it was just given — the
//! person's message or a tool's result (a file, a calendar entry, an issue body, a plugin's
//! output) — whoever wrote it. An instruction is JSON between `⟪` and `⟫`, e.g.
//! `⟪{"call": "files_write", "args": {"path": "share/a.txt", "content": "x"}}⟫`; see [`attack`].

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// One scripted answer.
#[derive(Debug, Clone)]
pub enum Scripted {
    Text(String),
    /// `(name, arguments JSON)` per call.
    ToolCalls(Vec<(String, String)>),
    /// `(id, name, arguments JSON)` per call: ids as a careless server sends them (repeated,
    /// empty).
    ToolCallsWithIds(Vec<(String, String, String)>),
    Status {
        code: u16,
        retry_after: Option<u32>,
    },
    /// Streams this text, then drops the connection (a whole answer gets the status 200 head only).
    BrokenStream(String),
    /// A chunk that is not JSON.
    BadChunk,
    /// A tool call without a function name (whole or streamed): an answer no turn can use.
    MalformedToolCall,
}

#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub body: Value,
    /// The request body exactly as it arrived.
    pub raw: Bytes,
    pub authorization: Option<String>,
    /// When the request arrived, and when its answer was sent.
    pub arrived: tokio::time::Instant,
    pub answered: Option<tokio::time::Instant>,
}

#[derive(Default)]
struct State {
    script: VecDeque<Scripted>,
    requests: Vec<RecordedRequest>,
    /// Pause before each streamed chunk (a model that types slowly).
    chunk_delay: std::time::Duration,
    /// Requests are not kept (benchmarks).
    forget: bool,
    /// Wait this long before answering each request (a model that thinks).
    answer_delay: std::time::Duration,
    /// With nothing scripted, answer "回答：" + the last user message's text.
    echo: bool,
    /// With nothing scripted, obey the newest instruction in the new input ([`attack`]).
    attacker: bool,
    /// The models `GET /v1/models` lists (`None`: the default one, `sim-model`).
    models: Option<Vec<String>>,
    /// Requests must carry `Bearer` this key (`None`: any key, or none).
    key: Option<String>,
    /// The model answers a request offering tools in text, as a model without tool support does.
    no_tools: bool,
    /// Connection checks ([`zhuli::llm::check`]) received: kept apart from `requests`, and
    /// answered without taking a scripted reply.
    probes: Vec<RecordedRequest>,
}

pub struct LlmSim {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    cancel: CancellationToken,
}

impl Drop for LlmSim {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

type Body = BoxBody<Bytes, std::io::Error>;

fn full(status: StatusCode, v: Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(v.to_string())).map_err(|never| match never {}).boxed())
        .expect("static response parts are valid")
}

fn sse(events: Vec<String>, then_break: bool, delay: std::time::Duration) -> Response<Body> {
    let mut frames: Vec<Result<Frame<Bytes>, std::io::Error>> =
        events.into_iter().map(|e| Ok(Frame::data(Bytes::from(format!("data: {e}\n\n"))))).collect();
    if then_break {
        frames.push(Err(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "scripted break")));
    }
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/event-stream")
        // The break waits a moment so the frames before it reach the client first.
        .body(
            StreamBody::new(futures_util::StreamExt::then(futures_util::stream::iter(frames), move |f| async move {
                if f.is_err() {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                } else if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                f
            }))
            .boxed(),
        )
        .expect("static response parts are valid")
}

fn chunk(delta: Value, finish: Option<&str>) -> String {
    json!({"id": "chatcmpl-sim", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
        .to_string()
}

fn answer(script: Scripted, stream: bool, delay: std::time::Duration) -> Response<Body> {
    let usage = json!({"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19});
    match (script, stream) {
        (Scripted::Status { code, retry_after }, _) => {
            let mut r = full(
                StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                json!({"error": {"message": format!("scripted {code}"), "type": "sim"}}),
            );
            if let Some(s) = retry_after {
                r.headers_mut().insert("retry-after", http::HeaderValue::from(s));
            }
            r
        }
        (Scripted::Text(t), false) => full(
            StatusCode::OK,
            json!({"choices": [{"index": 0, "message": {"role": "assistant", "content": t}, "finish_reason": "stop"}], "usage": usage}),
        ),
        (Scripted::ToolCalls(calls), stream) => answer(
            Scripted::ToolCallsWithIds(
                calls.into_iter().enumerate().map(|(i, (n, a))| (format!("call_{i}"), n, a)).collect(),
            ),
            stream,
            delay,
        ),
        (Scripted::ToolCallsWithIds(calls), false) => {
            let calls: Vec<Value> = calls
                .iter()
                .map(|(id, n, a)| json!({"id": id, "type": "function", "function": {"name": n, "arguments": a}}))
                .collect();
            full(
                StatusCode::OK,
                json!({"choices": [{"index": 0, "message": {"role": "assistant", "content": null, "tool_calls": calls}, "finish_reason": "tool_calls"}], "usage": usage}),
            )
        }
        (Scripted::Text(t), true) => {
            let mut events = vec![chunk(json!({"role": "assistant", "content": ""}), None)];
            let chars: Vec<char> = t.chars().collect();
            events.extend(chars.chunks(4).map(|c| chunk(json!({"content": c.iter().collect::<String>()}), None)));
            events.push(chunk(json!({}), Some("stop")));
            events.push(json!({"id": "chatcmpl-sim", "choices": [], "usage": usage}).to_string());
            events.push("[DONE]".into());
            sse(events, false, delay)
        }
        (Scripted::ToolCallsWithIds(calls), true) => {
            let mut events = Vec::new();
            for (i, (id, name, args)) in calls.iter().enumerate() {
                events.push(chunk(
                    json!({"tool_calls": [{"index": i, "id": id, "type": "function", "function": {"name": name, "arguments": ""}}]}),
                    None,
                ));
                let mid = args.char_indices().nth(args.chars().count() / 2).map(|(b, _)| b).unwrap_or(0);
                for piece in [&args[..mid], &args[mid..]] {
                    events.push(chunk(json!({"tool_calls": [{"index": i, "function": {"arguments": piece}}]}), None));
                }
            }
            events.push(chunk(json!({}), Some("tool_calls")));
            events.push("[DONE]".into());
            sse(events, false, delay)
        }
        (Scripted::BrokenStream(t), true) => {
            let events =
                vec![chunk(json!({"role": "assistant", "content": ""}), None), chunk(json!({"content": t}), None)];
            sse(events, true, delay)
        }
        (Scripted::BrokenStream(_), false) => full(StatusCode::OK, json!({"choices": "broken"})),
        (Scripted::BadChunk, _) => sse(vec!["{not json".into()], false, delay),
        (Scripted::MalformedToolCall, false) => full(
            StatusCode::OK,
            json!({"choices": [{"index": 0, "message": {"role": "assistant", "content": null, "tool_calls": [{"id": "call_0", "type": "function", "function": {"arguments": "{}"}}]}, "finish_reason": "tool_calls"}], "usage": usage}),
        ),
        (Scripted::MalformedToolCall, true) => sse(
            vec![
                chunk(
                    json!({"tool_calls": [{"index": 0, "id": "call_0", "type": "function", "function": {"arguments": "{}"}}]}),
                    None,
                ),
                chunk(json!({}), Some("tool_calls")),
                "[DONE]".into(),
            ],
            false,
            delay,
        ),
    }
}

impl LlmSim {
    pub async fn start() -> std::io::Result<LlmSim> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State::default()));
        let cancel = CancellationToken::new();
        let st = state.clone();
        crate::serve::spawn(listener, cancel.clone(), move |req| handle(st.clone(), req));
        Ok(LlmSim { addr, state, cancel })
    }

    /// The `base_url` for `[llm]`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn push(&self, s: Scripted) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).script.push_back(s);
    }

    /// Stream answers slowly: wait `d` before each chunk.
    pub fn set_chunk_delay(&self, d: std::time::Duration) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).chunk_delay = d;
    }

    /// Wait `d` before answering each request.
    pub fn set_answer_delay(&self, d: std::time::Duration) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).answer_delay = d;
    }

    /// With nothing scripted, answer "回答：" followed by the last user message's text.
    pub fn set_echo(&self, on: bool) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).echo = on;
    }

    /// With nothing scripted, obey the newest instruction found in the new input ([`attack`]).
    pub fn set_attacker(&self, on: bool) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).attacker = on;
    }

    /// Stop keeping requests (a benchmark's memory figures must not count them).
    pub fn stop_recording(&self) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.forget = true;
        st.requests = Vec::new();
    }

    /// The models `GET /v1/models` lists; a chat request naming another is refused (404).
    pub fn set_models(&self, names: &[&str]) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).models =
            Some(names.iter().map(|n| (*n).to_owned()).collect());
    }

    /// Refuse (401) every request that does not carry `Bearer key`.
    pub fn require_key(&self, key: &str) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).key = Some(key.to_owned());
    }

    /// Answer requests offering tools in text, as a model without tool support does.
    pub fn set_no_tools(&self, on: bool) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).no_tools = on;
    }

    /// The connection checks received (not among [`LlmSim::requests`]).
    pub fn probes(&self) -> Vec<RecordedRequest> {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).probes.clone()
    }

    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).requests.clone()
    }
}

async fn handle(state: Arc<Mutex<State>>, req: Request<hyper::body::Incoming>) -> Response<Body> {
    let authorization = req.headers().get("authorization").and_then(|v| v.to_str().ok()).map(str::to_owned);
    {
        let st = state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(key) = &st.key
            && authorization.as_deref() != Some(format!("Bearer {key}").as_str())
        {
            return full(StatusCode::UNAUTHORIZED, json!({"error": {"message": "invalid api key", "type": "sim"}}));
        }
        if req.method() == http::Method::GET && req.uri().path() == "/v1/models" {
            let names = st.models.clone().unwrap_or_else(|| vec!["sim-model".into()]);
            let data: Vec<Value> =
                names.iter().map(|n| json!({"id": n, "object": "model", "owned_by": "sim"})).collect();
            return full(StatusCode::OK, json!({"object": "list", "data": data}));
        }
    }
    if req.uri().path() != "/v1/chat/completions" {
        return full(StatusCode::NOT_FOUND, json!({"error": {"message": "no such path"}}));
    }
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return full(StatusCode::BAD_REQUEST, json!({"error": {"message": "unreadable body"}})),
    };
    let raw = body;
    let Ok(body): Result<Value, _> = serde_json::from_slice(&raw) else {
        return full(StatusCode::BAD_REQUEST, json!({"error": {"message": "body is not JSON"}}));
    };
    let stream = body["stream"].as_bool() == Some(true);
    let arrived = tokio::time::Instant::now();
    {
        // A model the server does not have is refused, as vLLM, DeepSeek and Ollama do.
        let st = state.lock().unwrap_or_else(|p| p.into_inner());
        let model = body["model"].as_str().unwrap_or_default();
        if let Some(names) = &st.models
            && !names.iter().any(|n| n == model)
        {
            let message = format!("model '{}' not found", model.chars().take(64).collect::<String>());
            return full(StatusCode::NOT_FOUND, json!({"error": {"message": message, "type": "sim"}}));
        }
    }
    let offered: Vec<&str> = body["tools"]
        .as_array()
        .map(|t| t.iter().filter_map(|t| t["function"]["name"].as_str()).collect())
        .unwrap_or_default();
    if offered == [zhuli::llm::check::PROBE_TOOL] {
        let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
        let reply = if st.no_tools {
            Scripted::Text("I can only answer in text.".into())
        } else {
            Scripted::ToolCalls(vec![(zhuli::llm::check::PROBE_TOOL.into(), r#"{"ok":true}"#.into())])
        };
        st.probes.push(RecordedRequest { body, raw, authorization, arrived, answered: Some(arrived) });
        return answer(reply, stream, std::time::Duration::ZERO);
    }
    let no_tools = !offered.is_empty() && state.lock().unwrap_or_else(|p| p.into_inner()).no_tools;
    if no_tools {
        return answer(Scripted::Text("I can only answer in text.".into()), stream, std::time::Duration::ZERO);
    }
    let (next, delay, wait, index) = {
        let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
        let fallback = if st.attacker {
            attack(&body)
        } else if st.echo {
            let last = body["messages"]
                .as_array()
                .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
                .map(|m| match &m["content"] {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .unwrap_or_default();
            Scripted::Text(format!("回答：{last}"))
        } else {
            Scripted::Text("ok".into())
        };
        let index = (!st.forget).then(|| {
            st.requests.push(RecordedRequest { body, raw, authorization, arrived, answered: None });
            st.requests.len() - 1
        });
        (st.script.pop_front().unwrap_or(fallback), st.chunk_delay, st.answer_delay, index)
    };
    if !wait.is_zero() {
        tokio::time::sleep(wait).await;
    }
    if let Some(i) = index {
        let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = st.requests.get_mut(i) {
            r.answered = Some(tokio::time::Instant::now());
        }
    }
    answer(next, stream, delay)
}

/// What the attacker does with a request: the newest instruction in the messages that came after
/// its own last turn (the person's message, the tool results), or, with none, an answer that
/// repeats the newest of them (a model leaking what it read into the chat).
///
/// An instruction is a JSON object between `⟪` and `⟫` (found also when the text carrying it was
/// JSON-escaped by a tool):
/// - `{"call": NAME, "args": {…}}` or `{"calls": [[NAME, {…}], …]}`: call these tools;
/// - `"repeat": N`: the calls N times over, in one answer;
/// - `"pad": BYTES`: each call's arguments gain a `padding` of that many bytes;
/// - `"raw": true`: each `args` is a string sent as the arguments as it is (not JSON);
/// - `{"say": TEXT}`: answer TEXT.
pub fn attack(body: &Value) -> Scripted {
    let messages = body["messages"].as_array().map(Vec::as_slice).unwrap_or_default();
    let fresh: Vec<String> = messages
        .iter()
        .rev()
        .take_while(|m| m["role"] != "assistant")
        .map(|m| match &m["content"] {
            Value::String(s) => s.clone(),
            Value::Array(parts) => parts.iter().filter_map(|p| p["text"].as_str()).collect::<Vec<_>>().join("\n"),
            _ => String::new(),
        })
        .collect();
    for text in &fresh {
        if let Some(order) = instruction(text) {
            return obey(&order);
        }
    }
    let newest: String = fresh.first().map(|t| t.chars().take(300).collect()).unwrap_or_default();
    Scripted::Text(format!("好的。{newest}"))
}

/// The newest instruction in `text`.
fn instruction(text: &str) -> Option<Value> {
    let mut rest = text;
    let mut found = None;
    while let Some(start) = rest.find('⟪') {
        let after = &rest[start + '⟪'.len_utf8()..];
        let Some(end) = after.find('⟫') else { break };
        let inner = &after[..end];
        let parsed = serde_json::from_str::<Value>(inner).ok().or_else(|| {
            // Carried inside a JSON string: undo its escapes first.
            let unescaped: String = serde_json::from_str(&format!("\"{inner}\"")).ok()?;
            serde_json::from_str(&unescaped).ok()
        });
        if let Some(v) = parsed.filter(Value::is_object) {
            found = Some(v);
        }
        rest = &after[end + '⟫'.len_utf8()..];
    }
    found
}

fn obey(order: &Value) -> Scripted {
    if let Some(text) = order["say"].as_str() {
        return Scripted::Text(text.to_owned());
    }
    let mut calls: Vec<(String, Value)> = Vec::new();
    if let Some(name) = order["call"].as_str() {
        calls.push((name.to_owned(), order["args"].clone()));
    }
    for c in order["calls"].as_array().into_iter().flatten() {
        if let Some(name) = c[0].as_str() {
            calls.push((name.to_owned(), c[1].clone()));
        }
    }
    let pad = order["pad"].as_u64().unwrap_or(0) as usize;
    let raw = order["raw"].as_bool() == Some(true);
    let repeat = order["repeat"].as_u64().unwrap_or(1).max(1) as usize;
    let one: Vec<(String, String)> = calls
        .into_iter()
        .map(|(name, mut args)| {
            if pad > 0
                && let Some(o) = args.as_object_mut()
            {
                o.insert("padding".into(), Value::String("A".repeat(pad)));
            }
            let args = match (&args, raw) {
                (Value::String(s), true) => s.clone(),
                (Value::Null, _) => "{}".to_owned(),
                _ => args.to_string(),
            };
            (name, args)
        })
        .collect();
    Scripted::ToolCalls((0..repeat).flat_map(|_| one.iter().cloned()).collect())
}
