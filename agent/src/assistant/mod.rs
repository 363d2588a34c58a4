//! The turn: what the agent answers to one accepted message. Today that is the slash commands
//! (`/help`, `/ping`, `/status`) and a plain statement that natural-language answers need an LLM;
//! the LLM loop with tools takes over here once configured.
//!
//! Never logs message text.

use std::sync::{Arc, atomic::Ordering};

use tokio::time::Instant;

use crate::dingtalk::{Content, RobotMessage, sender::SenderStatus, stream::StreamStatus};

/// What the agent knows about itself, for `/status`.
pub struct StatusView {
    pub started: Instant,
    pub stream: Arc<StreamStatus>,
    pub sender: Arc<SenderStatus>,
}

pub struct Assistant {
    status: StatusView,
}

/// An answer: title (shown in notifications) and Markdown text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub title: String,
    pub markdown: String,
    /// Worth keeping durably before sending: producing it again would cost (an LLM turn) or
    /// could come out different. Fixed answers are simply produced again after a crash.
    pub costly: bool,
}

impl Answer {
    fn fixed(title: impl Into<String>, markdown: impl Into<String>) -> Self {
        Answer { title: title.into(), markdown: markdown.into(), costly: false }
    }
}

const HELP: &str = "**zhuli** — commands:\n\n\
- `/help` — this list\n\
- `/ping` — check that I am listening\n\
- `/status` — connection and delivery figures\n\n\
Questions in plain language need an LLM, which is not configured on this box yet.";

const NO_LLM: &str = "I received your message, but natural-language answers need an LLM, and none is configured on this box yet. \
Ask your administrator to add one; until then I answer `/help`, `/ping` and `/status`.";

/// Drop leading `@name` mentions from group text.
fn strip_mentions(text: &str) -> &str {
    let mut rest = text.trim_start();
    while let Some(after) = rest.strip_prefix('@') {
        rest = after.split_once(char::is_whitespace).map(|(_, r)| r.trim_start()).unwrap_or("");
    }
    rest.trim()
}

impl Assistant {
    pub fn new(status: StatusView) -> Self {
        Assistant { status }
    }

    pub fn answer(&self, message: &RobotMessage) -> Answer {
        let Some(text) = message.text() else {
            return self.media_answer(message);
        };
        let text = strip_mentions(&text);
        let command = text.split_whitespace().next().unwrap_or_default().to_ascii_lowercase();
        match command.as_str() {
            "/help" | "/?" => Answer::fixed("zhuli help", HELP),
            "/ping" => Answer::fixed("pong", "pong"),
            "/status" => Answer::fixed("zhuli status", self.status_text()),
            c if c.starts_with('/') => Answer::fixed(
                "unknown command",
                format!("Unknown command `{}`. Send `/help` for the list.", c.chars().take(32).collect::<String>()),
            ),
            _ => Answer::fixed("LLM not configured", NO_LLM),
        }
    }

    fn media_answer(&self, message: &RobotMessage) -> Answer {
        let what = match &message.content {
            Content::Picture { .. } => "picture".to_owned(),
            Content::Video { .. } => "video".to_owned(),
            Content::Audio { .. } => "voice message (no speech was recognised)".to_owned(),
            Content::File { file_name, .. } => format!("file “{}”", file_name.chars().take(120).collect::<String>()),
            Content::RichText(_) => "message".to_owned(),
            Content::Unsupported { msgtype } => {
                return Answer::fixed(
                    "unsupported message",
                    format!(
                        "I cannot read messages of type `{}` yet. Send text, or `/help`.",
                        msgtype.chars().take(40).collect::<String>()
                    ),
                );
            }
            Content::Text(_) => "message".to_owned(),
        };
        Answer::fixed(
            "received",
            format!(
                "I received your {what}. Working with its content needs an LLM, which is not configured on this box yet."
            ),
        )
    }

    fn status_text(&self) -> String {
        let s = &self.status.stream;
        let d = &self.status.sender;
        let up = self.status.started.elapsed().as_secs();
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        format!(
            "**zhuli status**\n\n\
- uptime: {}h {}m {}s\n\
- DingTalk stream: {}{}\n\
- connections opened: {}, attempts: {}, failed: {}, gateway disconnects: {}, zombie sockets dropped: {}\n\
- frames: {}, unusable: {}, pings answered: {}\n\
- replies delivered: {}, throttled: {}, retries: {}, failed: {}\n\
- LLM: not configured",
            up / 3600,
            up / 60 % 60,
            up % 60,
            if s.connected.load(Ordering::Relaxed) { "connected" } else { "reconnecting" },
            if s.storm.load(Ordering::Relaxed) { " (reconnect storm)" } else { "" },
            load(&s.connects),
            load(&s.attempts),
            load(&s.failures),
            load(&s.disconnects),
            load(&s.idle_kills),
            load(&s.frames),
            load(&s.bad_frames),
            load(&s.pings_answered),
            load(&d.delivered),
            load(&d.throttled),
            load(&d.retries),
            load(&d.failed),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mentions_are_stripped() {
        assert_eq!(strip_mentions("@zhuli /ping"), "/ping");
        assert_eq!(strip_mentions("@a @b  hello"), "hello");
        assert_eq!(strip_mentions("no mention"), "no mention");
        assert_eq!(strip_mentions("@only"), "");
    }
}
