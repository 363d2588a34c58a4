//! Work that happens without a message: jobs that fire at their times (people's reminders and
//! recurring tasks), kept sealed in the store (`store::jobs`).
//!
//! `rule` says when a job fires, `when` reads the times people write, and [`due`] decides what
//! happens to a job whose time has come: the occurrence fires (late, when the box was off or
//! its clock jumped, by less than the grace), occurrences missed by more are skipped and
//! counted, and the next one is found. A job's `next_ms` only ever moves forward, in the same
//! commit as what it fires, so an occurrence fires once: a clock that jumps back does not
//! repeat it, one that jumps forward does not skip it silently.
//!
//! Pure: time is passed in.

pub mod rule;
pub mod when;

pub use rule::Rule;
use serde::{Deserialize, Serialize};

/// What a job does when it fires.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    /// Says this text in the job's chat.
    Remind(String),
    /// Asks the model this, as its owner in the job's chat, and posts the answer there.
    Task(String),
}

impl Action {
    pub fn text(&self) -> &str {
        match self {
            Action::Remind(t) | Action::Task(t) => t,
        }
    }
}

/// Why a job does not fire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Paused {
    /// Its owner (or an admin) paused it.
    ByPerson,
    /// Its owner may no longer do this there (the reason, as the access check gave it).
    Refused(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    /// The message that made it: a message answered again after a crash finds its job made
    /// already instead of making a second.
    pub origin: String,
    /// The staff id it runs as.
    pub owner: String,
    pub nick: String,
    /// The chat it speaks in.
    pub conversation_id: String,
    pub group: bool,
    pub action: Action,
    pub rule: Rule,
    /// The next occurrence not yet handled.
    pub next_ms: i64,
    pub created_ms: i64,
    pub paused: Option<Paused>,
    /// Occurrences fired, and skipped because they were missed by more than the grace.
    pub fired: u32,
    pub missed: u32,
    /// When its last occurrence fired, for a job that has none left: kept a while so that the
    /// message that made it, answered again after a crash, finds it (and makes no second).
    pub ended_ms: Option<i64>,
}

/// How long an ended job is kept: longer than a message id is remembered as processed.
pub const ENDED_KEPT_MS: i64 = 3 * 24 * 3_600_000;

/// A job's next time after the clock was set back by more than a day: the occurrences it moved
/// past under the wrong clock never fired at their real times, so it goes back to the first one
/// after `now` (one that did fire is still recorded as processed, and is not said twice). `None`
/// when the next time stands (a small step back repeats nothing and changes nothing).
pub fn set_back(rule: &Rule, next_ms: i64, now_ms: i64, offset_minutes: i32) -> Option<i64> {
    const DAY_MS: i64 = 86_400_000;
    if !rule.recurring() {
        return None;
    }
    let real = rule.next_after(now_ms, offset_minutes)?;
    (next_ms - real > DAY_MS).then_some(real)
}

/// What to do with a job at `now`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Due {
    /// The occurrence to fire now (the latest within the grace), if any.
    pub fire: Option<i64>,
    /// Occurrences skipped: missed by more than the grace, or earlier than the one fired (the
    /// first few, and how many in all).
    pub skipped: Vec<i64>,
    pub skipped_count: u32,
    /// The job's next occurrence after this; `None` when it has none left.
    pub next: Option<i64>,
}

/// Occurrences looked at in one go, at most (a job every 5 minutes on a box off for a month).
const MAX_WALK: usize = 20_000;
/// Skipped occurrences listed by time; beyond, only counted.
pub const SKIPPED_LISTED: usize = 5;

/// `[schedule]`: the limits of people's jobs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// An occurrence missed (the box off, its clock set forward) by less than this fires late
    /// and says so; older ones are skipped and listed to the job's owner.
    pub grace_minutes: u32,
    /// Jobs one person may have.
    pub max_per_person: usize,
    /// Jobs on the box.
    pub max_jobs: usize,
    /// The shortest repeat people may ask for (`每30分钟`).
    pub min_interval_minutes: u32,
    /// The longest the scheduler sleeps before looking at the clock again: how soon a clock
    /// that was set is noticed.
    pub wake_ms: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings { grace_minutes: 60, max_per_person: 20, max_jobs: 500, min_interval_minutes: 30, wake_ms: 60_000 }
    }
}

/// What a message a job put in the inbox is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fired {
    /// A reminder's text, said as it is.
    Reminder,
    /// A task's request, answered as if its owner had sent it.
    Task,
    /// A notice to the owner (occurrences skipped), said as it is.
    Notice,
}

/// Messages jobs put in the inbox have ids of their own, which DingTalk never gives.
pub const MESSAGE_PREFIX: &str = "zhuli-job:";

/// The message id of occurrence `at` of job `id`: an occurrence fires once because its message
/// is recorded once.
pub fn message_id(id: u64, at: i64, what: Fired) -> String {
    let tag = match what {
        Fired::Reminder => 'r',
        Fired::Task => 't',
        Fired::Notice => 'n',
    };
    format!("{MESSAGE_PREFIX}{id}:{at}:{tag}")
}

/// The job, occurrence and kind of a job's message id.
pub fn parse_message_id(msg_id: &str) -> Option<(u64, i64, Fired)> {
    let mut parts = msg_id.strip_prefix(MESSAGE_PREFIX)?.split(':');
    let id = parts.next()?.parse().ok()?;
    let at = parts.next()?.parse().ok()?;
    let what = match parts.next()? {
        "r" => Fired::Reminder,
        "t" => Fired::Task,
        "n" => Fired::Notice,
        _ => return None,
    };
    parts.next().is_none().then_some((id, at, what))
}

/// What is due of a job whose next occurrence is `next_ms`, at `now_ms`. `None` when nothing is.
pub fn due(rule: &Rule, next_ms: i64, now_ms: i64, grace_ms: i64, offset_minutes: i32) -> Option<Due> {
    if next_ms > now_ms {
        return None;
    }
    let mut at = Some(next_ms);
    let mut in_grace = Vec::new();
    let mut skipped = Vec::new();
    let mut skipped_count = 0u32;
    let mut walked = 0;
    let mut jumped = false;
    while let Some(t) = at.filter(|t| *t <= now_ms) {
        walked += 1;
        if now_ms - t <= grace_ms {
            in_grace.push(t);
        } else {
            skipped_count += 1;
            if skipped.len() < SKIPPED_LISTED {
                skipped.push(t);
            }
        }
        at = if walked >= MAX_WALK && !jumped {
            // Far behind: go straight to what is still in the grace (those passed over are
            // not counted).
            jumped = true;
            rule.next_after((now_ms - grace_ms - 1).max(t), offset_minutes)
        } else {
            rule.next_after(t, offset_minutes)
        };
    }
    // Within the grace only the latest fires; the ones before it count as skipped.
    let fire = in_grace.pop();
    for t in in_grace {
        skipped_count += 1;
        if skipped.len() < SKIPPED_LISTED {
            skipped.push(t);
        }
    }
    Some(Due { fire, skipped, skipped_count, next: at })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::rule::{local, parse_local};

    const CST: i32 = 480;
    const HOUR: i64 = 3_600_000;

    fn t(s: &str) -> i64 {
        parse_local(s, CST)
    }

    fn shown(d: &Due) -> (Option<String>, Vec<String>, u32, Option<String>) {
        (
            d.fire.map(|f| local(f, CST)),
            d.skipped.iter().map(|s| local(*s, CST)).collect(),
            d.skipped_count,
            d.next.map(|n| local(n, CST)),
        )
    }

    #[test]
    fn message_ids_round_trip() {
        let id = message_id(7, 1_796_000_000_000, Fired::Task);
        assert_eq!(id, "zhuli-job:7:1796000000000:t");
        assert_eq!(parse_message_id(&id), Some((7, 1_796_000_000_000, Fired::Task)));
        assert_eq!(parse_message_id("msgABC=="), None);
        assert_eq!(parse_message_id("zhuli-job:7:1:x"), None);
        assert_eq!(parse_message_id("zhuli-job:7:1:r:extra"), None);
    }

    #[test]
    fn on_time_late_within_the_grace_and_missed() {
        let daily = Rule::Daily { minute: 9 * 60 };
        let next = t("2026-12-04 09:00");
        assert_eq!(due(&daily, next, t("2026-12-04 08:59"), HOUR, CST), None, "not yet");
        let on_time = due(&daily, next, t("2026-12-04 09:00"), HOUR, CST).expect("due");
        assert_eq!(shown(&on_time), (Some("2026-12-04 09:00".into()), vec![], 0, Some("2026-12-05 09:00".into())));
        // The box was off from 08:00 to 09:40: the occurrence fires 40 minutes late.
        let late = due(&daily, next, t("2026-12-04 09:40"), HOUR, CST).expect("due");
        assert_eq!(late.fire, Some(next));
        // Off until 11:00: missed by two hours, skipped, and the next is tomorrow's.
        let missed = due(&daily, next, t("2026-12-04 11:00"), HOUR, CST).expect("due");
        assert_eq!(shown(&missed), (None, vec!["2026-12-04 09:00".into()], 1, Some("2026-12-05 09:00".into())));
    }

    #[test]
    fn a_box_off_for_three_hours_fires_the_latest_in_the_grace() {
        // Every 30 minutes from 09:00; off from 09:10 to 12:10 with a grace of an hour.
        let rule = Rule::Every { minutes: 30, from_ms: t("2026-12-04 09:00") };
        let d = due(&rule, t("2026-12-04 09:30"), t("2026-12-04 12:10"), HOUR, CST).expect("due");
        assert_eq!(d.fire.map(|f| local(f, CST)).as_deref(), Some("2026-12-04 12:00"));
        assert_eq!(d.skipped_count, 5, "09:30 to 11:30, the two in the grace before 12:00 included");
        assert_eq!(d.skipped.len(), 5);
        assert_eq!(d.next.map(|n| local(n, CST)).as_deref(), Some("2026-12-04 12:30"));
    }

    #[test]
    fn a_clock_that_jumps_neither_repeats_nor_skips_silently() {
        let daily = Rule::Daily { minute: 9 * 60 };
        // Fired at 09:00; the job's next is tomorrow. The clock jumps back an hour (NTP after a
        // fast RTC): nothing is due again.
        let fired = due(&daily, t("2026-12-04 09:00"), t("2026-12-04 09:00"), HOUR, CST).expect("due");
        let next = fired.next.expect("next");
        assert_eq!(due(&daily, next, t("2026-12-04 08:00"), HOUR, CST), None);
        // It jumps forward two days (an RTC that lost its battery, set right at boot): the
        // missed occurrences are counted, the next is in the future.
        let d = due(&daily, next, t("2026-12-07 09:30"), HOUR, CST).expect("due");
        assert_eq!(shown(&d).1, vec!["2026-12-05 09:00", "2026-12-06 09:00"]);
        assert_eq!(d.fire.map(|f| local(f, CST)).as_deref(), Some("2026-12-07 09:00"));
        assert_eq!(d.next.map(|n| local(n, CST)).as_deref(), Some("2026-12-08 09:00"));
    }

    #[test]
    fn a_clock_set_back_by_days_brings_the_next_time_back() {
        let daily = Rule::Daily { minute: 9 * 60 };
        // The box ran a week ahead; its jobs moved on to then. The clock is set right.
        let ahead = t("2026-12-12 09:00");
        let now = t("2026-12-04 10:00");
        assert_eq!(set_back(&daily, ahead, now, CST).map(|n| local(n, CST)).as_deref(), Some("2026-12-05 09:00"));
        // An hour back after a firing: the next time stands.
        assert_eq!(set_back(&daily, t("2026-12-05 09:00"), t("2026-12-04 08:00"), CST), None);
        assert_eq!(set_back(&Rule::Once { at_ms: ahead }, ahead, now, CST), None);
    }

    #[test]
    fn a_single_occurrence_has_no_next_and_a_long_walk_is_bounded() {
        let once = Rule::Once { at_ms: t("2026-12-04 09:00") };
        let d = due(&once, t("2026-12-04 09:00"), t("2026-12-04 09:05"), HOUR, CST).expect("due");
        assert_eq!((d.fire.is_some(), d.next), (true, None));
        let often = Rule::Every { minutes: 1, from_ms: 0 };
        let now = t("2026-12-04 09:00");
        let d = due(&often, 60_000, now, HOUR, CST).expect("due");
        assert_eq!(d.fire, Some(now));
        assert!(d.next.is_some_and(|n| n > now));
        assert!(d.skipped_count >= MAX_WALK as u32, "{}", d.skipped_count);
    }
}
