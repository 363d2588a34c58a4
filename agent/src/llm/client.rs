//! Requests to the chat-completions endpoint, retried where retrying can help.

use std::{num::NonZeroU32, time::Duration};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use http_body_util::BodyExt;
use rand::{SeedableRng, rngs::StdRng};
use serde_json::{Value, json};

use super::{
    ChatMessage, Completion, Settings, ToolSpec,
    sse::{DeltaAssembler, EventSplitter},
};
use crate::dingtalk::{
    backoff::Backoff,
    http::{HttpClient, HttpError, MAX_JSON_BODY, tls_config},
    settings::{UrlError, check_url},
};

#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    #[error("[llm] base_url is not usable: {0}")]
    BaseUrl(#[from] UrlError),
    #[error(
        "the LLM refused the request as unauthorised (HTTP {0}); check the endpoint's api_key ([llm] or [[models]])"
    )]
    Unauthorised(u16),
    #[error("the LLM refused the request (HTTP {status}): {message}")]
    Refused { status: u16, message: String },
    #[error("the LLM did not answer after {attempts} attempts: {last}")]
    GaveUp { attempts: u32, last: String },
    #[error("the LLM's answer is not usable: {0}")]
    BadAnswer(String),
    #[error("the LLM stopped answering for {0:?} in the middle of a streamed answer")]
    Stalled(Duration),
}

/// A whole answer larger than this is refused (tool-call arguments can be large; the turn loop
/// applies its own, smaller limit per call and says so).
pub const MAX_ANSWER_BYTES: usize = 16 * 1024 * 1024;

pub struct Client {
    settings: Settings,
    http: HttpClient,
    limiter: DefaultDirectRateLimiter,
    url: String,
}

/// Why one attempt failed, and whether another may succeed.
enum Attempt {
    Retry { why: String, after: Option<Duration> },
    Fatal(LlmError),
}

/// The retry policy: `Retry-After` when the server gives one, else jittered backoff; at most
/// `max` retries.
struct Retries {
    attempts: u32,
    max: u32,
    backoff: Backoff<StdRng>,
}

impl Retries {
    fn new(max: u32) -> Self {
        Retries {
            attempts: 0,
            max,
            backoff: Backoff::new(Duration::from_millis(500), Duration::from_secs(30), StdRng::from_os_rng()),
        }
    }

    /// After one attempt: the final result, or `None` to try again (the delay has been waited).
    async fn after(
        &mut self,
        outcome: Result<Completion, Attempt>,
        may_retry: bool,
    ) -> Option<Result<Completion, LlmError>> {
        self.attempts += 1;
        match outcome {
            Ok(c) => Some(Ok(c)),
            Err(Attempt::Fatal(e)) => Some(Err(e)),
            Err(Attempt::Retry { why, .. }) if !may_retry || self.attempts > self.max => {
                Some(Err(LlmError::GaveUp { attempts: self.attempts, last: why }))
            }
            Err(Attempt::Retry { why, after }) => {
                let delay = after.unwrap_or_else(|| self.backoff.next_delay());
                log::warn!("LLM request failed ({why}); retrying in {delay:?}");
                tokio::time::sleep(delay).await;
                None
            }
        }
    }
}

/// `Retry-After` in seconds (the form LLM servers send); dates are ignored.
fn retry_after(headers: &http::HeaderMap) -> Option<Duration> {
    let v = headers.get("retry-after")?.to_str().ok()?.trim();
    v.parse::<f64>().ok().filter(|s| s.is_finite() && *s >= 0.0 && *s <= 600.0).map(Duration::from_secs_f64)
}

/// A short, content-free description of an error body.
fn error_message(body: &[u8]) -> String {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let m = v.pointer("/error/message").or_else(|| v.get("message")).and_then(Value::as_str).unwrap_or("");
    m.chars().take(200).collect()
}

impl Client {
    pub fn new(settings: Settings) -> Result<Self, LlmError> {
        let base = settings.base_url.trim_end_matches('/').to_owned();
        check_url(&base, "https", "http")?;
        let rpm = NonZeroU32::new(settings.requests_per_minute).unwrap_or(NonZeroU32::MIN);
        Ok(Client {
            http: HttpClient::new(tls_config(), settings.timeout_ms.get()),
            limiter: RateLimiter::direct(Quota::per_minute(rpm)),
            url: format!("{base}/chat/completions"),
            settings,
        })
    }

    fn body(&self, messages: &[ChatMessage], tools: &[ToolSpec], stream: bool, max_tokens: Option<u32>) -> Value {
        let mut body = json!({ "model": self.settings.model, "messages": messages, "stream": stream });
        if let Some(n) = max_tokens {
            body["max_tokens"] = json!(n);
        }
        if !tools.is_empty() {
            body["tools"] = json!(tools);
        }
        if stream {
            body["stream_options"] = json!({ "include_usage": true });
        }
        body
    }

    /// Send one request; the response head, body unread. A transport failure may be retried.
    async fn post(
        &self,
        messages: &[ChatMessage],
        tools: &[ToolSpec],
        stream: bool,
        max_tokens: Option<u32>,
    ) -> Result<http::Response<hyper::body::Incoming>, Attempt> {
        let auth = self.settings.api_key.as_ref().map(|k| format!("Bearer {}", k.expose()));
        let headers: Vec<(&str, &str)> = auth.as_deref().map(|a| vec![("authorization", a)]).unwrap_or_default();
        self.http
            .post_json_streaming(&self.url, &headers, &self.body(messages, tools, stream, max_tokens))
            .await
            .map_err(|e: HttpError| Attempt::Retry { why: e.to_string(), after: None })
    }

    /// One whole answer.
    pub async fn complete(&self, messages: &[ChatMessage], tools: &[ToolSpec]) -> Result<Completion, LlmError> {
        self.complete_with(messages, tools, self.settings.max_retries).await
    }

    /// One whole answer, with at most `retries` retries.
    pub async fn complete_with(
        &self,
        messages: &[ChatMessage],
        tools: &[ToolSpec],
        retries: u32,
    ) -> Result<Completion, LlmError> {
        self.retrying(retries, || self.complete_once(messages, tools, None)).await
    }

    /// One whole answer of at most `max_tokens`, tried once: a check, not a person's request.
    pub async fn complete_capped(
        &self,
        messages: &[ChatMessage],
        tools: &[ToolSpec],
        max_tokens: u32,
    ) -> Result<Completion, LlmError> {
        self.retrying(0, || self.complete_once(messages, tools, Some(max_tokens))).await
    }

    /// The retries configured for this endpoint.
    pub fn max_retries(&self) -> u32 {
        self.settings.max_retries
    }

    /// A streamed answer: `on_text` gets each piece of text as it arrives; the assembled answer
    /// (with tool calls) is returned at the end. Retried only while nothing has been streamed.
    pub async fn stream(
        &self,
        messages: &[ChatMessage],
        tools: &[ToolSpec],
        on_text: impl FnMut(&str),
    ) -> Result<Completion, LlmError> {
        self.stream_with(messages, tools, self.settings.max_retries, on_text).await
    }

    /// A streamed answer, with at most `retries` retries.
    pub async fn stream_with(
        &self,
        messages: &[ChatMessage],
        tools: &[ToolSpec],
        retries: u32,
        mut on_text: impl FnMut(&str),
    ) -> Result<Completion, LlmError> {
        let mut started = false;
        let mut retries = Retries::new(retries);
        loop {
            self.limiter.until_ready().await;
            let outcome = self.stream_once(messages, tools, &mut on_text, &mut started).await;
            // Text already shown cannot be taken back: a stream that broke after it is not retried.
            if let Some(done) = retries.after(outcome, !started).await {
                return done;
            }
        }
    }

    async fn retrying<F, Fut>(&self, retries: u32, mut once: F) -> Result<Completion, LlmError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Completion, Attempt>>,
    {
        let mut retries = Retries::new(retries);
        loop {
            self.limiter.until_ready().await;
            let outcome = once().await;
            if let Some(done) = retries.after(outcome, true).await {
                return done;
            }
        }
    }

    /// Classify a non-2xx answer.
    fn status_error(status: u16, headers: &http::HeaderMap, body: &[u8]) -> Attempt {
        match status {
            401 | 403 => Attempt::Fatal(LlmError::Unauthorised(status)),
            429 | 500..=599 => Attempt::Retry {
                why: format!("HTTP {status} {}", error_message(body)).trim().to_owned(),
                after: retry_after(headers),
            },
            _ => Attempt::Fatal(LlmError::Refused { status, message: error_message(body) }),
        }
    }

    async fn complete_once(
        &self,
        messages: &[ChatMessage],
        tools: &[ToolSpec],
        max_tokens: Option<u32>,
    ) -> Result<Completion, Attempt> {
        let (parts, body) = self.post(messages, tools, false, max_tokens).await?.into_parts();
        let limit = self.settings.timeout_ms.get();
        let collected = tokio::time::timeout(limit, http_body_util::Limited::new(body, MAX_ANSWER_BYTES).collect())
            .await
            .map_err(|_| Attempt::Retry { why: format!("no complete answer within {limit:?}"), after: None })?
            .map_err(|e| Attempt::Retry { why: e.to_string(), after: None })?
            .to_bytes();
        if !parts.status.is_success() {
            return Err(Self::status_error(parts.status.as_u16(), &parts.headers, &collected));
        }
        let v: Value = serde_json::from_slice(&collected)
            .map_err(|e| Attempt::Fatal(LlmError::BadAnswer(format!("not JSON: {e}"))))?;
        let choice = v
            .get("choices")
            .and_then(Value::as_array)
            .and_then(|c| c.first())
            .ok_or_else(|| Attempt::Fatal(LlmError::BadAnswer("no choices".into())))?;
        let message: ChatMessage = serde_json::from_value(choice.get("message").cloned().unwrap_or(Value::Null))
            .map_err(|e| Attempt::Fatal(LlmError::BadAnswer(format!("message: {e}"))))?;
        Ok(Completion {
            message,
            finish_reason: choice.get("finish_reason").and_then(Value::as_str).map(str::to_owned),
            usage: v.get("usage").and_then(|u| serde_json::from_value(u.clone()).ok()),
        })
    }

    async fn stream_once(
        &self,
        messages: &[ChatMessage],
        tools: &[ToolSpec],
        on_text: &mut impl FnMut(&str),
        started: &mut bool,
    ) -> Result<Completion, Attempt> {
        let (parts, mut body) = self.post(messages, tools, true, None).await?.into_parts();
        let idle = self.settings.timeout_ms.get();
        if !parts.status.is_success() {
            let bytes = tokio::time::timeout(idle, http_body_util::Limited::new(body, MAX_JSON_BODY).collect())
                .await
                .ok()
                .and_then(Result::ok)
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            return Err(Self::status_error(parts.status.as_u16(), &parts.headers, &bytes));
        }
        let mut splitter = EventSplitter::default();
        let mut assembler = DeltaAssembler::default();
        let mut done = false;
        while !done {
            let frame = match tokio::time::timeout(idle, body.frame()).await {
                Err(_) => return Err(Attempt::Fatal(LlmError::Stalled(idle))),
                Ok(None) => break,
                Ok(Some(Err(e))) => return Err(Attempt::Retry { why: format!("stream broke: {e}"), after: None }),
                Ok(Some(Ok(f))) => f,
            };
            let Ok(data) = frame.into_data() else { continue };
            let events = splitter.feed(&data).map_err(|e| Attempt::Fatal(LlmError::BadAnswer(e)))?;
            for event in events {
                if event.trim() == "[DONE]" {
                    done = true;
                    break;
                }
                let chunk: Value = serde_json::from_str(&event)
                    .map_err(|e| Attempt::Fatal(LlmError::BadAnswer(format!("a streamed chunk is not JSON: {e}"))))?;
                if let Some(err) = chunk.get("error") {
                    let msg = err.get("message").and_then(Value::as_str).unwrap_or("error in stream");
                    return Err(Attempt::Retry { why: msg.chars().take(200).collect(), after: None });
                }
                let added = assembler.apply(&chunk).map_err(|e| Attempt::Fatal(LlmError::BadAnswer(e)))?;
                if !added.is_empty() {
                    *started = true;
                    on_text(&added);
                }
            }
        }
        if let Some(last) = splitter.finish()
            && last.trim() != "[DONE]"
        {
            let chunk: Value = serde_json::from_str(&last)
                .map_err(|e| Attempt::Fatal(LlmError::BadAnswer(format!("a streamed chunk is not JSON: {e}"))))?;
            let added = assembler.apply(&chunk).map_err(|e| Attempt::Fatal(LlmError::BadAnswer(e)))?;
            if !added.is_empty() {
                on_text(&added);
            }
        }
        assembler.finish().map_err(|e| Attempt::Fatal(LlmError::BadAnswer(e)))
    }
}
