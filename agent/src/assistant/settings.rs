//! `[assistant]`: the turn loop's prompt and bounds.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::dingtalk::settings::Millis;

pub const DEFAULT_PROMPT: &str = "You are zhuli (助理), the office assistant of this organisation, answering in DingTalk. \
Answer in the language of the user's message. Be concise and use Markdown that DingTalk renders: short paragraphs, \
lists, bold, links. Use the tools you are given when they help and never invent file contents or results. \
Paths of files are written `root/folder/file`. Changes (writing, moving, deleting) are confirmed by the user in chat \
before they run; say what you are about to do.";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AssistantSettings {
    /// The system prompt of every conversation.
    pub system_prompt: String,
    /// Group conversation id → a system prompt used there instead.
    pub group_prompts: BTreeMap<String, String>,
    /// Model requests in one turn, at most.
    pub max_steps: u32,
    /// Tool calls run from one model request, at most; the rest are refused.
    pub max_calls_per_step: u32,
    pub tool_timeout_ms: Millis,
    /// A whole turn (model requests and tools) ends after this.
    pub turn_timeout_ms: Millis,
    /// Tool output fed back to the model, at most (longer output is cut and marked).
    pub max_tool_output_bytes: usize,
    /// Tool-call arguments larger than this are refused before parsing.
    pub max_argument_bytes: usize,
    /// Answer text sent to the chat, at most (longer answers are cut and marked).
    pub max_answer_bytes: usize,
    /// A conversation idle this long starts afresh.
    pub conversation_idle_ms: Millis,
    /// A confirmation code is valid this long.
    pub confirm_timeout_ms: Millis,
    /// The box's time zone as an offset from UTC, for the time told to the model and the
    /// daily token budgets (Asia/Shanghai by default).
    pub utc_offset_minutes: i32,
}

impl Default for AssistantSettings {
    fn default() -> Self {
        AssistantSettings {
            system_prompt: DEFAULT_PROMPT.to_owned(),
            group_prompts: BTreeMap::new(),
            max_steps: 8,
            max_calls_per_step: 16,
            tool_timeout_ms: Millis::from_ms(30_000),
            turn_timeout_ms: Millis::from_ms(300_000),
            max_tool_output_bytes: 16 * 1024,
            max_argument_bytes: 2 * 1024 * 1024,
            max_answer_bytes: 60_000,
            conversation_idle_ms: Millis::from_ms(30 * 60_000),
            confirm_timeout_ms: Millis::from_ms(5 * 60_000),
            utc_offset_minutes: 480,
        }
    }
}

/// `YYYY-MM-DD HH:MM` for `ms` since the epoch at `offset` minutes from UTC, and the day number.
pub fn local_time(ms: i64, offset_minutes: i32) -> (String, i64) {
    let secs = ms.div_euclid(1000) + i64::from(offset_minutes) * 60;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = crate::schedule::rule::civil_from_days(days);
    (format!("{y:04}-{m:02}-{d:02} {:02}:{:02}", rem / 3600, rem / 60 % 60), days)
}

/// The zone of times at `offset_minutes` from UTC, as shown beside them: `UTC+8`, `UTC-3:30`, `UTC`.
pub fn zone_label(offset_minutes: i32) -> String {
    let (sign, o) = (if offset_minutes < 0 { '-' } else { '+' }, offset_minutes.unsigned_abs());
    match (o / 60, o % 60) {
        (0, 0) => "UTC".to_owned(),
        (h, 0) => format!("UTC{sign}{h}"),
        (h, m) => format!("UTC{sign}{h}:{m:02}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zones_are_named_by_their_offset() {
        assert_eq!(zone_label(480), "UTC+8");
        assert_eq!(zone_label(0), "UTC");
        assert_eq!(zone_label(-180), "UTC-3");
        assert_eq!(zone_label(330), "UTC+5:30");
        assert_eq!(zone_label(-570), "UTC-9:30");
    }

    #[test]
    fn local_time_is_civil_time() {
        assert_eq!(local_time(0, 0).0, "1970-01-01 00:00");
        // 2026-11-25 15:00 UTC is 23:00 in Shanghai; one hour later it is the next day there.
        let ms = 1_795_618_800_000;
        assert_eq!(local_time(ms, 0).0, "2026-11-25 15:00");
        assert_eq!(local_time(ms, 480).0, "2026-11-25 23:00");
        assert_eq!(local_time(ms + 3_600_000, 480).0, "2026-11-26 00:00");
        assert_eq!(local_time(ms + 3_600_000, 480).1, local_time(ms, 480).1 + 1);
        assert_eq!(local_time(951_782_400_000, 0).0, "2000-02-29 00:00");
    }
}
