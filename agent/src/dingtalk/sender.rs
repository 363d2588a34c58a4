//! Replies into DingTalk: through the message's session webhook while it is valid, else the
//! OpenAPI robot send (1:1 batchSend or group send) with the cached access token. Every call is
//! paced (per-API and per-chat governor limiters); throttling and transient failures back off
//! with jitter and retry until `reply_give_up_ms`, so a throttled reply is delayed, not lost.
//!
//! Never logs reply text or webhook URLs.

use crate::clock::now_ms;
use std::{
    num::NonZeroU32,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use rand::{SeedableRng, rngs::StdRng};
use serde_json::{Value, json};
use tokio::time::Instant;

use super::{
    backoff::Backoff,
    message::{ConversationKind, RobotMessage, SessionWebhook},
    openapi::{OpenApi, Outcome, classify},
};

pub const GROUP_SEND_PATH: &str = "/v1.0/robot/groupMessages/send";
pub const OTO_SEND_PATH: &str = "/v1.0/robot/oToMessages/batchSend";
/// DingTalk's limit for `msgParam`.
const MAX_MSG_PARAM: usize = 15_000;
/// A webhook this close to expiry is not used.
const WEBHOOK_MARGIN_MS: i64 = 30_000;

/// One reply, addressed.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Reply {
    pub conversation_id: String,
    pub kind: ConversationKind,
    pub to_staff_id: Option<String>,
    pub webhook: Option<SessionWebhook>,
    pub title: String,
    pub markdown: String,
}

impl Reply {
    pub fn to(message: &RobotMessage, title: impl Into<String>, markdown: impl Into<String>) -> Self {
        Reply {
            conversation_id: message.conversation_id.clone(),
            kind: message.conversation_kind,
            to_staff_id: message.sender_staff_id.clone(),
            webhook: message.session_webhook.clone(),
            title: title.into(),
            markdown: markdown.into(),
        }
    }
}

/// The route a reply took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    SessionWebhook,
    OpenApi,
}

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("reply not delivered after {attempts} attempts over {elapsed:?}: {last}")]
    GaveUp { attempts: u32, elapsed: Duration, last: String },
    #[error("reply refused by DingTalk: {0}")]
    Refused(String),
    #[error("reply has no route: the session webhook expired and the sender has no staff id for a 1:1 send")]
    NoRoute,
}

#[derive(Debug, Default)]
pub struct SenderStatus {
    pub delivered: AtomicU64,
    pub throttled: AtomicU64,
    pub retries: AtomicU64,
    pub failed: AtomicU64,
}

pub struct ReplySender {
    api: Arc<OpenApi>,
    per_chat: DefaultKeyedRateLimiter<String>,
    status: Arc<SenderStatus>,
}

/// One message's Markdown, at most, counted as it is encoded in the request (JSON-escaped),
/// with room for the title.
const PART_BYTES: usize = MAX_MSG_PARAM - 1_000;

/// Split Markdown into parts whose JSON-escaped size is at most `max`, between lines where it
/// can (a code block cut in two is closed and reopened), inside a line only when one line is
/// too long by itself.
pub fn split_markdown(text: &str, max: usize) -> Vec<String> {
    let escaped = |s: &str| serde_json::to_string(s).map(|j| j.len()).unwrap_or(s.len() * 6);
    if escaped(text) <= max {
        return vec![text.to_owned()];
    }
    let mut parts: Vec<String> = Vec::new();
    let mut current = String::new();
    // The fence of the code block open at this point: a block opened with five backticks is
    // closed only by a line of five or more, and is reopened with the same five.
    let mut fence: Option<String> = None;
    let mut pieces: Vec<String> = Vec::new();
    for line in text.split_inclusive('\n') {
        if escaped(line) <= max / 2 {
            pieces.push(line.to_owned());
            continue;
        }
        // A very long line: cut on character boundaries.
        let mut rest = line;
        while !rest.is_empty() {
            let mut end = rest.len().min(max / 12).max(1);
            while !rest.is_char_boundary(end) {
                end += 1;
            }
            pieces.push(rest[..end].to_owned());
            rest = &rest[end..];
        }
    }
    // Escaped size of `current`, kept as it grows (each piece's size without its quotes).
    let mut size = 2;
    for piece in pieces {
        let add = escaped(&piece) - 2;
        let reserve = fence.as_ref().map_or(0, |f| 2 * f.len() + 4);
        if !current.is_empty() && size + add + reserve + 8 > max {
            if let Some(f) = &fence {
                current.push_str(&format!("\n{f}\n"));
            }
            parts.push(std::mem::take(&mut current));
            size = 2;
            if let Some(f) = &fence {
                current.push_str(&format!("{f}\n"));
                size += f.len() + 2;
            }
        }
        let line = piece.trim();
        let ticks = line.chars().take_while(|c| *c == '`').count();
        match &fence {
            None if ticks >= 3 => fence = Some("`".repeat(ticks)),
            Some(f) if ticks >= f.len() && ticks == line.len() => fence = None,
            _ => {}
        }
        current.push_str(&piece);
        size += add;
    }
    if !current.is_empty() {
        parts.push(current);
    }
    parts
}

/// Cut `s` to at most `max` bytes on a character boundary, saying so.
fn fit(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    const MARK: &str = "\n\n…(truncated)";
    let mut end = max.saturating_sub(MARK.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{MARK}", &s[..end])
}

impl ReplySender {
    pub fn new(api: Arc<OpenApi>, status: Arc<SenderStatus>) -> Self {
        let per_minute = NonZeroU32::new(api.settings().limits.chat_messages_per_minute).unwrap_or(NonZeroU32::MIN);
        ReplySender { per_chat: RateLimiter::keyed(Quota::per_minute(per_minute)), api, status }
    }

    pub fn status(&self) -> &Arc<SenderStatus> {
        &self.status
    }

    /// Deliver `reply`, retrying through throttling and transient failures. A reply longer than
    /// one DingTalk message takes goes as several, in order, each titled `(i/n)`.
    pub async fn send(&self, reply: &Reply) -> Result<Route, SendError> {
        let parts = split_markdown(&reply.markdown, PART_BYTES);
        if parts.len() == 1 {
            return self.send_one(reply).await;
        }
        let n = parts.len();
        let mut route = Route::OpenApi;
        for (i, text) in parts.into_iter().enumerate() {
            let part = Reply { title: format!("{} ({}/{n})", reply.title, i + 1), markdown: text, ..reply.clone() };
            route = self.send_one(&part).await?;
        }
        Ok(route)
    }

    async fn send_one(&self, reply: &Reply) -> Result<Route, SendError> {
        let limits = &self.api.settings().limits;
        let started = Instant::now();
        let mut backoff = Backoff::new(limits.retry_initial_ms.get(), Duration::from_secs(30), StdRng::from_os_rng());
        let mut webhook_usable = true;
        let mut attempts = 0u32;
        if self.per_chat.len() > 10_000 {
            self.per_chat.retain_recent();
        }
        loop {
            attempts += 1;
            self.per_chat.until_key_ready(&reply.conversation_id).await;
            let webhook =
                reply.webhook.as_ref().filter(|w| webhook_usable && w.expires_at_ms - now_ms() > WEBHOOK_MARGIN_MS);
            let (route, outcome) = match webhook {
                Some(w) => (Route::SessionWebhook, self.via_webhook(w, reply).await),
                None => (Route::OpenApi, self.via_openapi(reply).await?),
            };
            let last = match outcome {
                Outcome::Done(_) => {
                    self.status.delivered.fetch_add(1, Ordering::Relaxed);
                    return Ok(route);
                }
                Outcome::Throttled(why) => {
                    self.status.throttled.fetch_add(1, Ordering::Relaxed);
                    why
                }
                Outcome::Transient(why) => why,
                Outcome::Failed(why) if route == Route::SessionWebhook => {
                    log::info!("session webhook refused the reply ({why}); falling back to the OpenAPI send");
                    webhook_usable = false;
                    continue;
                }
                Outcome::Failed(why) => {
                    self.status.failed.fetch_add(1, Ordering::Relaxed);
                    return Err(SendError::Refused(why));
                }
            };
            let delay = backoff.next_delay();
            if started.elapsed() + delay > limits.reply_give_up_ms.get() {
                self.status.failed.fetch_add(1, Ordering::Relaxed);
                return Err(SendError::GaveUp { attempts, elapsed: started.elapsed(), last });
            }
            self.status.retries.fetch_add(1, Ordering::Relaxed);
            log::warn!(conversation = reply.conversation_id.as_str(); "reply to {} not delivered yet ({last}); retrying in {delay:?}", reply.conversation_id);
            tokio::time::sleep(delay).await;
        }
    }

    async fn via_webhook(&self, webhook: &SessionWebhook, reply: &Reply) -> Outcome {
        let mut body = json!({
            "msgtype": "markdown",
            "markdown": { "title": reply.title, "text": fit(&reply.markdown, MAX_MSG_PARAM) },
        });
        if reply.kind == ConversationKind::Group
            && let Some(staff) = &reply.to_staff_id
        {
            body["at"] = json!({ "atUserIds": [staff], "isAtAll": false });
        }
        match self.api.http().post_json(&webhook.url, &[], &body).await {
            Ok(resp) => classify(&resp),
            Err(e) => Outcome::Transient(e.to_string()),
        }
    }

    async fn via_openapi(&self, reply: &Reply) -> Result<Outcome, SendError> {
        let settings = self.api.settings();
        let param = json!({ "title": reply.title, "text": reply.markdown }).to_string();
        let param = if param.len() > MAX_MSG_PARAM {
            let budget = MAX_MSG_PARAM - (param.len() - reply.markdown.len()) - 64;
            json!({ "title": reply.title, "text": fit(&reply.markdown, budget) }).to_string()
        } else {
            param
        };
        let outcome = match reply.kind {
            ConversationKind::Group => {
                let body = json!({
                    "robotCode": settings.robot_code.as_str(),
                    "openConversationId": reply.conversation_id,
                    "msgKey": "sampleMarkdown",
                    "msgParam": param,
                });
                self.api.call(GROUP_SEND_PATH, &body).await
            }
            ConversationKind::Single => {
                let staff = reply.to_staff_id.as_ref().ok_or(SendError::NoRoute)?;
                let body = json!({
                    "robotCode": settings.robot_code.as_str(),
                    "userIds": [staff],
                    "msgKey": "sampleMarkdown",
                    "msgParam": param,
                });
                match self.api.call(OTO_SEND_PATH, &body).await {
                    Outcome::Done(v) => oto_outcome(v, staff),
                    other => other,
                }
            }
        };
        Ok(outcome)
    }
}

/// batchSend answers 200 even when a recipient was flow-controlled or invalid.
fn oto_outcome(v: Value, staff: &str) -> Outcome {
    let listed = |field: &str| {
        v.get(field).and_then(Value::as_array).is_some_and(|a| a.iter().any(|x| x.as_str() == Some(staff)))
    };
    if listed("flowControlledStaffIdList") {
        Outcome::Throttled("recipient is flow-controlled".into())
    } else if listed("invalidStaffIdList") {
        Outcome::Failed("recipient staff id is invalid".into())
    } else {
        Outcome::Done(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fit_cuts_on_char_boundaries() {
        let s = "钉".repeat(10_000);
        let f = fit(&s, 15_000);
        assert!(f.len() <= 15_000 && f.ends_with("(truncated)"));
        assert_eq!(fit("short", 100), "short");
    }

    #[test]
    fn long_markdown_is_split_between_lines_and_keeps_code_blocks_whole() {
        let line = "一行文字 some words\n";
        let text = format!("# Title\n{}```\n{}```\n{}", line.repeat(600), "let x = 1;\n".repeat(900), line.repeat(300));
        let parts = split_markdown(&text, 14_000);
        assert!(parts.len() >= 3, "{}", parts.len());
        for p in &parts {
            assert!(serde_json::to_string(p).map(|j| j.len()).unwrap_or(usize::MAX) <= 14_000);
            assert_eq!(p.matches("```").count() % 2, 0, "each part's code fences are balanced: {p}");
        }
        let joined: String = parts.concat().replace("\n```\n```\n", "");
        assert_eq!(joined, text, "nothing lost or reordered");
        assert_eq!(split_markdown("short", 100), vec!["short".to_owned()]);
        let one_line = "x".repeat(50_000);
        let parts = split_markdown(&one_line, 14_000);
        assert_eq!(parts.concat(), one_line);
    }

    #[test]
    fn a_longer_fence_is_kept_across_parts_and_a_shorter_run_inside_does_not_close_it() {
        // Content holding a line of three backticks, shown in a five-backtick block (as a
        // confirmation shows it), then a link after the block.
        let inner = "row\n```\n[click](https://evil.example)\n".repeat(700);
        let text = format!("**content**:\n`````\n{inner}`````\nafter");
        let parts = split_markdown(&text, 14_000);
        assert!(parts.len() >= 2, "{}", parts.len());
        for (i, p) in parts.iter().enumerate() {
            // Each part but the first opens with the five-backtick fence, each but the last closes it.
            if i > 0 {
                assert!(p.starts_with("`````\n"), "part {i} reopens the block: {:?}", &p[..40.min(p.len())]);
            }
            if i + 1 < parts.len() {
                assert!(p.ends_with("\n`````\n"), "part {i} closes the block");
            }
        }
        assert!(parts.last().expect("parts").ends_with("`````\nafter"));
    }

    #[test]
    fn flow_control_in_a_200_is_a_throttle() {
        let v = json!({"processQueryKey": "k", "flowControlledStaffIdList": ["u1"]});
        assert!(matches!(oto_outcome(v, "u1"), Outcome::Throttled(_)));
        let v = json!({"processQueryKey": "k", "invalidStaffIdList": ["u1"]});
        assert!(matches!(oto_outcome(v, "u1"), Outcome::Failed(_)));
        assert!(matches!(oto_outcome(json!({"processQueryKey": "k"}), "u1"), Outcome::Done(_)));
    }
}
