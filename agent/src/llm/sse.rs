//! Server-sent events of a streamed chat completion: split the byte stream into `data:` payloads,
//! and fold the chunks' deltas (text, and tool calls arriving in pieces by index) into one answer.

use std::collections::BTreeMap;

use serde_json::Value;

use super::{ChatMessage, Completion, FunctionCall, Role, ToolCall, Usage};

/// Splits a byte stream into SSE `data` payloads (one per event; multi-line data joined by `\n`).
#[derive(Debug, Default)]
pub struct EventSplitter {
    buf: Vec<u8>,
    data: Vec<String>,
}

/// Upper bound on one event, so a server that never ends a line cannot grow memory without end.
pub const MAX_EVENT_BYTES: usize = 4 * 1024 * 1024;

impl EventSplitter {
    /// Feed bytes; returns the payloads of events completed by them.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Vec<String>, String> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=pos).collect();
            let line = String::from_utf8(line).map_err(|_| "an event line is not UTF-8".to_owned())?;
            let line = line.trim_end_matches(['\n', '\r']);
            if line.is_empty() {
                if !self.data.is_empty() {
                    out.push(self.data.join("\n"));
                    self.data.clear();
                }
            } else if let Some(d) = line.strip_prefix("data:") {
                self.data.push(d.strip_prefix(' ').unwrap_or(d).to_owned());
            }
            // `event:`, `id:`, `retry:` and comments carry nothing a completion needs.
        }
        if self.buf.len() + self.data.iter().map(String::len).sum::<usize>() > MAX_EVENT_BYTES {
            return Err("an event is larger than 4 MiB".into());
        }
        Ok(out)
    }

    /// The last event, if the stream ended without its blank line.
    pub fn finish(&mut self) -> Option<String> {
        if let Some(d) = std::str::from_utf8(&self.buf).ok().and_then(|l| l.trim_end().strip_prefix("data:")) {
            self.data.push(d.trim_start().to_owned());
        }
        self.buf.clear();
        (!self.data.is_empty()).then(|| std::mem::take(&mut self.data).join("\n"))
    }
}

#[derive(Debug, Default)]
struct PartialCall {
    id: String,
    name: String,
    arguments: String,
}

/// Folds `chat.completion.chunk` objects into a [`Completion`].
#[derive(Debug, Default)]
pub struct DeltaAssembler {
    text: String,
    calls: BTreeMap<u64, PartialCall>,
    finish_reason: Option<String>,
    usage: Option<Usage>,
}

impl DeltaAssembler {
    /// Apply one chunk; returns the text it added (for streaming it on).
    pub fn apply(&mut self, chunk: &Value) -> Result<String, String> {
        if let Some(u) = chunk.get("usage").filter(|u| !u.is_null()) {
            self.usage = serde_json::from_value(u.clone()).ok();
        }
        let Some(choice) = chunk.get("choices").and_then(Value::as_array).and_then(|c| c.first()) else {
            return Ok(String::new());
        };
        if let Some(r) = choice.get("finish_reason").and_then(Value::as_str) {
            self.finish_reason = Some(r.to_owned());
        }
        let Some(delta) = choice.get("delta") else { return Ok(String::new()) };
        let added = delta.get("content").and_then(Value::as_str).unwrap_or_default().to_owned();
        self.text.push_str(&added);
        if let Some(calls) = delta.get("tool_calls").and_then(Value::as_array) {
            for (n, c) in calls.iter().enumerate() {
                let index = c.get("index").and_then(Value::as_u64).unwrap_or(n as u64);
                let entry = self.calls.entry(index).or_default();
                if let Some(id) = c.get("id").and_then(Value::as_str) {
                    entry.id = id.to_owned();
                }
                if let Some(f) = c.get("function") {
                    if let Some(name) = f.get("name").and_then(Value::as_str) {
                        entry.name.push_str(name);
                    }
                    if let Some(args) = f.get("arguments").and_then(Value::as_str) {
                        entry.arguments.push_str(args);
                    }
                }
            }
        }
        Ok(added)
    }

    pub fn finish(self) -> Result<Completion, String> {
        let mut tool_calls = Vec::with_capacity(self.calls.len());
        for (i, c) in self.calls {
            if c.name.is_empty() {
                return Err(format!("tool call {i} has no function name"));
            }
            let id = if c.id.is_empty() { format!("call_{i}") } else { c.id };
            tool_calls.push(ToolCall {
                id,
                kind: "function".into(),
                function: FunctionCall { name: c.name, arguments: c.arguments },
            });
        }
        let content = (!self.text.is_empty() || tool_calls.is_empty()).then_some(self.text);
        Ok(Completion {
            message: ChatMessage { role: Role::Assistant, content, tool_calls, tool_call_id: None, images: Vec::new() },
            finish_reason: self.finish_reason,
            usage: self.usage,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    #[test]
    fn tool_calls_arrive_in_pieces_and_are_put_together() {
        let mut a = DeltaAssembler::default();
        let chunks = [
            json!({"choices":[{"delta":{"role":"assistant","content":"Let me look."}}]}),
            json!({"choices":[{"delta":{"tool_calls":[{"index":0,"id":"c1","type":"function","function":{"name":"files_list","arguments":""}}]}}]}),
            json!({"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"path\":"}}]}}]}),
            json!({"choices":[{"delta":{"tool_calls":[{"index":1,"id":"c2","function":{"name":"system","arguments":"{}"}}]}}]}),
            json!({"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"\"/share\"}"}}]}}]}),
            json!({"choices":[{"delta":{},"finish_reason":"tool_calls"}],"usage":{"prompt_tokens":10,"completion_tokens":5,"total_tokens":15}}),
        ];
        for c in &chunks {
            a.apply(c).expect("chunk");
        }
        let done = a.finish().expect("complete");
        assert_eq!(done.message.content.as_deref(), Some("Let me look."));
        assert_eq!(done.message.tool_calls.len(), 2);
        assert_eq!(done.message.tool_calls[0].function.arguments, r#"{"path":"/share"}"#);
        assert_eq!(done.message.tool_calls[1].function.name, "system");
        assert_eq!(done.finish_reason.as_deref(), Some("tool_calls"));
        assert_eq!(done.usage.map(|u| u.total_tokens), Some(15));
    }

    proptest! {
        /// However the bytes are cut, the same events come out.
        #[test]
        fn events_survive_any_split(cuts in proptest::collection::vec(0usize..200, 0..12)) {
            let stream = b"data: {\"a\":1}\n\ndata: {\"b\":\ndata: 2}\r\n\r\n: comment\nevent: x\ndata: [DONE]\n\n";
            let mut points: Vec<usize> = cuts.into_iter().map(|c| c % stream.len()).collect();
            points.sort_unstable();
            let mut s = EventSplitter::default();
            let mut got = Vec::new();
            let mut at = 0;
            for p in points.into_iter().chain([stream.len()]) {
                got.extend(s.feed(&stream[at..p.max(at)]).expect("feed"));
                at = p.max(at);
            }
            prop_assert_eq!(got, vec!["{\"a\":1}".to_owned(), "{\"b\":\n2}".to_owned(), "[DONE]".to_owned()]);
        }
    }
}
