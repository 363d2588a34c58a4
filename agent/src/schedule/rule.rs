//! When a job fires: the calendar rules people use (once, daily, weekdays, weekly on given days,
//! monthly on a day, every N minutes), in the office's time zone (a fixed offset from UTC, as
//! `[assistant] utc_offset_minutes`), and the next occurrence after a moment.
//!
//! Pure: time is passed in.

use serde::{Deserialize, Serialize};

const DAY_MS: i64 = 86_400_000;

/// One job's rule. `minute` is minutes since local midnight (0..1440).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Rule {
    Once {
        at_ms: i64,
    },
    Daily {
        minute: u16,
    },
    /// Monday to Friday.
    Weekdays {
        minute: u16,
    },
    /// The days in `days`: bit 0 Monday … bit 6 Sunday.
    Weekly {
        days: u8,
        minute: u16,
    },
    /// Day `day` (1–31) of each month; a month without that day has it on its last day.
    Monthly {
        day: u8,
        minute: u16,
    },
    /// Every `minutes`, counted from `from_ms`.
    Every {
        minutes: u32,
        from_ms: i64,
    },
}

/// Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm).
pub(crate) fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The civil date (year, month, day) of a day number.
pub(crate) fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

pub(crate) fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// The local day number of `ms` and its minute of the day.
pub(crate) fn local_day(ms: i64, offset_minutes: i32) -> (i64, i64) {
    let local = ms + i64::from(offset_minutes) * 60_000;
    (local.div_euclid(DAY_MS), local.rem_euclid(DAY_MS) / 60_000)
}

/// The ms of minute `minute` of local day `day`.
pub(crate) fn at(day: i64, minute: i64, offset_minutes: i32) -> i64 {
    day * DAY_MS + minute * 60_000 - i64::from(offset_minutes) * 60_000
}

/// Day of the week of a day number: 0 Monday … 6 Sunday.
pub(crate) fn weekday(day: i64) -> i64 {
    (day + 3).rem_euclid(7)
}

pub(crate) const WEEKDAYS_ZH: [&str; 7] = ["一", "二", "三", "四", "五", "六", "日"];

/// `2026-12-04 09:00`: a local time.
pub fn local(ms: i64, offset_minutes: i32) -> String {
    let (day, minute) = local_day(ms, offset_minutes);
    let (y, m, d) = civil_from_days(day);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}", minute / 60, minute % 60)
}

/// `12月5日（周六）09:00`: a local time as a chat shows it.
pub fn shown_zh(ms: i64, offset_minutes: i32) -> String {
    let (day, minute) = local_day(ms, offset_minutes);
    let (_, m, d) = civil_from_days(day);
    format!("{m}月{d}日（周{}）{:02}:{:02}", WEEKDAYS_ZH[weekday(day) as usize], minute / 60, minute % 60)
}

impl Rule {
    /// The first occurrence strictly after `after_ms`; `None` when there is none (a single
    /// occurrence that has passed).
    pub fn next_after(&self, after_ms: i64, offset_minutes: i32) -> Option<i64> {
        let day_rule = |minute: u16, on: &dyn Fn(i64) -> bool| -> Option<i64> {
            let (today, _) = local_day(after_ms, offset_minutes);
            // Every rule has an occurrence within 32 days (monthly: the last day of a month).
            (today..today + 40)
                .filter(|d| on(*d))
                .map(|d| at(d, i64::from(minute), offset_minutes))
                .find(|t| *t > after_ms)
        };
        match *self {
            Rule::Once { at_ms } => (at_ms > after_ms).then_some(at_ms),
            Rule::Daily { minute } => day_rule(minute, &|_| true),
            Rule::Weekdays { minute } => day_rule(minute, &|d| weekday(d) < 5),
            Rule::Weekly { days, minute } if days & 0x7f != 0 => day_rule(minute, &|d| days & (1 << weekday(d)) != 0),
            Rule::Weekly { .. } => None,
            Rule::Monthly { day, minute } => day_rule(minute, &|d| {
                let (y, m, dd) = civil_from_days(d);
                dd == i64::from(day).clamp(1, days_in_month(y, m))
            }),
            Rule::Every { minutes, from_ms } => {
                let period = i64::from(minutes.max(1)) * 60_000;
                if after_ms < from_ms {
                    return Some(from_ms);
                }
                Some(from_ms + ((after_ms - from_ms) / period + 1) * period)
            }
        }
    }

    /// Does it fire more than once?
    pub fn recurring(&self) -> bool {
        !matches!(self, Rule::Once { .. })
    }

    /// The shortest time between two occurrences, in minutes.
    pub fn interval_minutes(&self) -> u32 {
        match *self {
            Rule::Once { .. } => u32::MAX,
            Rule::Every { minutes, .. } => minutes,
            _ => 24 * 60,
        }
    }

    /// The rule as people read it, in Chinese (`每个工作日 09:00`, `2026-12-05 09:00`).
    pub fn shown_zh(&self, offset_minutes: i32) -> String {
        let hm = |m: u16| format!("{:02}:{:02}", m / 60, m % 60);
        match *self {
            Rule::Once { at_ms } => local(at_ms, offset_minutes),
            Rule::Daily { minute } => format!("每天 {}", hm(minute)),
            Rule::Weekdays { minute } => format!("每个工作日 {}", hm(minute)),
            Rule::Weekly { days, minute } => {
                let names: String = (0..7).filter(|d| days & (1 << d) != 0).map(|d| WEEKDAYS_ZH[d]).collect();
                format!("每周{names} {}", hm(minute))
            }
            Rule::Monthly { day, minute } => format!("每月{day}日 {}", hm(minute)),
            Rule::Every { minutes, .. } if minutes % 60 == 0 => format!("每 {} 小时", minutes / 60),
            Rule::Every { minutes, .. } => format!("每 {minutes} 分钟"),
        }
    }
}

/// Local `YYYY-MM-DD HH:MM` at `offset_minutes`, for tests.
#[cfg(test)]
pub(crate) fn parse_local(s: &str, offset_minutes: i32) -> i64 {
    let n = |r: std::ops::Range<usize>| s[r].parse::<i64>().expect("a number");
    at(days_from_civil(n(0..4), n(5..7), n(8..10)), n(11..13) * 60 + n(14..16), offset_minutes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CST: i32 = 480;

    /// Local `YYYY-MM-DD HH:MM` at UTC+8.
    fn t(s: &str) -> i64 {
        parse_local(s, CST)
    }

    fn next(rule: &Rule, after: &str) -> String {
        let ms = rule.next_after(t(after), CST).expect("an occurrence");
        local(ms, CST)
    }

    #[test]
    fn civil_round_trip() {
        for d in -800_000..800_000i64 {
            if d % 997 != 0 {
                continue;
            }
            let (y, m, dd) = civil_from_days(d);
            assert_eq!(days_from_civil(y, m, dd), d);
        }
        assert_eq!(weekday(days_from_civil(2026, 12, 4)), 4, "2026-12-04 is a Friday");
    }

    #[test]
    fn each_rule_finds_its_next_occurrence() {
        // 2026-12-04 is a Friday.
        let nine = 9 * 60;
        assert_eq!(next(&Rule::Daily { minute: nine }, "2026-12-04 08:59"), "2026-12-04 09:00");
        assert_eq!(next(&Rule::Daily { minute: nine }, "2026-12-04 09:00"), "2026-12-05 09:00", "strictly after");
        assert_eq!(next(&Rule::Weekdays { minute: nine }, "2026-12-04 10:00"), "2026-12-07 09:00", "Friday → Monday");
        let mon_wed = Rule::Weekly { days: 0b101, minute: 17 * 60 };
        assert_eq!(next(&mon_wed, "2026-12-04 10:00"), "2026-12-07 17:00");
        assert_eq!(next(&mon_wed, "2026-12-07 17:00"), "2026-12-09 17:00");
        let the_31st = Rule::Monthly { day: 31, minute: nine };
        assert_eq!(next(&the_31st, "2026-12-31 10:00"), "2027-01-31 09:00");
        assert_eq!(next(&the_31st, "2027-01-31 10:00"), "2027-02-28 09:00", "a short month: its last day");
        assert_eq!(next(&the_31st, "2028-02-01 00:00"), "2028-02-29 09:00", "a leap year");
        let every = Rule::Every { minutes: 90, from_ms: t("2026-12-04 09:00") };
        assert_eq!(next(&every, "2026-12-04 08:00"), "2026-12-04 09:00");
        assert_eq!(next(&every, "2026-12-04 09:00"), "2026-12-04 10:30");
        assert_eq!(next(&every, "2026-12-04 23:59"), "2026-12-05 00:00");
        let once = Rule::Once { at_ms: t("2026-12-05 09:00") };
        assert_eq!(next(&once, "2026-12-04 09:00"), "2026-12-05 09:00");
        assert_eq!(once.next_after(t("2026-12-05 09:00"), CST), None);
        assert_eq!(Rule::Weekly { days: 0, minute: 0 }.next_after(0, CST), None);
    }

    #[test]
    fn the_offset_decides_the_day() {
        // 23:30 UTC on Friday is Saturday 07:30 in Shanghai: the weekday rule waits for Monday.
        let friday_night_utc = parse_local("2026-12-04 23:30", 0);
        let ms = Rule::Weekdays { minute: 9 * 60 }.next_after(friday_night_utc, CST).expect("next");
        assert_eq!(local(ms, CST), "2026-12-07 09:00");
        assert_eq!(shown_zh(ms, CST), "12月7日（周一）09:00");
        let ms = Rule::Weekdays { minute: 9 * 60 }.next_after(friday_night_utc, 0).expect("next");
        assert_eq!(local(ms, 0), "2026-12-07 09:00");
    }

    #[test]
    fn shown_in_chinese() {
        assert_eq!(Rule::Weekly { days: 0b10101, minute: 9 * 60 + 5 }.shown_zh(CST), "每周一三五 09:05");
        assert_eq!(Rule::Weekdays { minute: 540 }.shown_zh(CST), "每个工作日 09:00");
        assert_eq!(Rule::Every { minutes: 120, from_ms: 0 }.shown_zh(CST), "每 2 小时");
    }
}
