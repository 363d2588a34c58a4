//! Times as the calendar tools (DingTalk and CalDAV) take and show them: RFC 3339 with an offset, or a local time
//! (`2026-12-04 14:00`) read at the box's offset from UTC. The model turns "tomorrow afternoon"
//! into explicit times; these functions only check and convert them.

use crate::schedule::rule::{days_from_civil, days_in_month};

fn number(s: &str, what: &str, text: &str) -> Result<i64, String> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{text:?} is not a time: the {what} is not a number; write it like 2026-12-04T14:00"));
    }
    s.parse().map_err(|_| format!("{text:?} is not a time"))
}

/// Milliseconds since the epoch of `text`: `YYYY-MM-DD[T ]HH:MM[:SS]` followed by `Z`, an
/// offset `±HH:MM`, or nothing (then it is local time at `offset_minutes`). A date alone is
/// its midnight.
pub fn parse(text: &str, offset_minutes: i32) -> Result<i64, String> {
    let t = text.trim();
    let bad = || format!("{t:?} is not a time; write it like 2026-12-04T14:00 (local) or 2026-12-04T14:00:00+08:00");
    if t.len() < 10 || !t.is_char_boundary(10) {
        return Err(bad());
    }
    let (date, rest) = t.split_at(10);
    let mut ymd = date.split('-');
    let (Some(y), Some(m), Some(d), None) = (ymd.next(), ymd.next(), ymd.next(), ymd.next()) else {
        return Err(bad());
    };
    let (y, m, d) = (number(y, "year", t)?, number(m, "month", t)?, number(d, "day", t)?);
    if !(1970..=9999).contains(&y) || !(1..=12).contains(&m) || d < 1 || d > days_in_month(y, m) {
        return Err(format!("{t:?} is not a date of the calendar"));
    }
    let rest = rest.strip_prefix(['T', 't', ' ']).unwrap_or(rest);
    let (clock, zone) = match rest.find(['Z', 'z', '+', '-']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let mut hms = clock.split(':');
    let h = hms.next().filter(|s| !s.is_empty()).map(|s| number(s, "hour", t)).transpose()?.unwrap_or(0);
    let min = hms.next().map(|s| number(s, "minute", t)).transpose()?.unwrap_or(0);
    let sec = hms.next().map(|s| number(s.split('.').next().unwrap_or(s), "second", t)).transpose()?.unwrap_or(0);
    if hms.next().is_some() || h > 23 || min > 59 || sec > 59 {
        return Err(bad());
    }
    let offset = match zone {
        "" => i64::from(offset_minutes),
        "Z" | "z" => 0,
        z => {
            let sign = if z.starts_with('-') { -1 } else { 1 };
            let (oh, om) = z[1..].split_once(':').unwrap_or((&z[1..], "0"));
            let (oh, om) = (number(oh, "offset", t)?, number(om, "offset", t)?);
            if oh > 14 || om > 59 {
                return Err(bad());
            }
            sign * (oh * 60 + om)
        }
    };
    let secs = days_from_civil(y, m, d) * 86_400 + h * 3600 + min * 60 + sec - offset * 60;
    Ok(secs * 1000)
}

/// RFC 3339 of `ms` at `offset_minutes`: `2026-12-04T14:00:00+08:00`.
pub fn rfc3339(ms: i64, offset_minutes: i32) -> String {
    let (local, _) = crate::assistant::settings::local_time(ms, offset_minutes);
    let sign = if offset_minutes < 0 { '-' } else { '+' };
    let o = offset_minutes.unsigned_abs();
    format!("{}T{}:00{sign}{:02}:{:02}", &local[..10], &local[11..], o / 60, o % 60)
}

/// `2026-12-04 14:00` (local) of `ms`.
pub fn local(ms: i64, offset_minutes: i32) -> String {
    crate::assistant::settings::local_time(ms, offset_minutes).0
}

/// `2026-12-04 14:00 (UTC+8)`: a local time as people are shown it, with its zone.
pub fn shown(ms: i64, offset_minutes: i32) -> String {
    format!("{} ({})", local(ms, offset_minutes), crate::assistant::settings::zone_label(offset_minutes))
}

/// `2026-12-04 14:00 – 15:00 (UTC+8)`: a start and an end, as people are shown them.
pub fn span_shown(start_ms: i64, end_ms: i64, offset_minutes: i32) -> String {
    let (a, b) = (local(start_ms, offset_minutes), local(end_ms, offset_minutes));
    let b = if a[..10] == b[..10] { &b[11..] } else { b.as_str() };
    format!("{a} – {b} ({})", crate::assistant::settings::zone_label(offset_minutes))
}

/// [`span_shown`] of times as a tool was given them (local, or RFC 3339 with an offset); as
/// written when they are not times.
pub fn span_of(start: &str, end: &str, offset_minutes: i32) -> String {
    match (parse(start, offset_minutes), parse(end, offset_minutes)) {
        (Ok(s), Ok(e)) => span_shown(s, e, offset_minutes),
        _ => format!("{start} – {end}"),
    }
}

/// [`shown`] of a time as a tool was given it; as written when it is not a time.
pub fn shown_of(text: &str, offset_minutes: i32) -> String {
    parse(text, offset_minutes).map(|ms| shown(ms, offset_minutes)).unwrap_or_else(|_| text.to_owned())
}

/// Day of the week of a local day number (0 = Monday).
pub fn weekday(day: i64) -> i64 {
    (day + 3).rem_euclid(7)
}

/// Local minutes since midnight of `ms`, and its local day number.
pub fn minute_of_day(ms: i64, offset_minutes: i32) -> (i64, i64) {
    let secs = ms.div_euclid(1000) + i64::from(offset_minutes) * 60;
    (secs.rem_euclid(86_400) / 60, secs.div_euclid(86_400))
}

/// `HH:MM` as minutes since midnight.
pub fn clock(text: &str) -> Result<i64, String> {
    let (h, m) = text.trim().split_once(':').ok_or_else(|| format!("{text:?} is not a time of day like 09:00"))?;
    let (h, m) = (number(h, "hour", text)?, number(m, "minute", text)?);
    if h > 24 || m > 59 || (h == 24 && m > 0) {
        return Err(format!("{text:?} is not a time of day like 09:00"));
    }
    Ok(h * 60 + m)
}

/// The ms of local midnight of day `day`.
pub fn day_start_ms(day: i64, offset_minutes: i32) -> i64 {
    (day * 86_400 - i64::from(offset_minutes) * 60) * 1000
}

/// Free windows of at least `minutes` in `[from, to)`, weekdays, inside the working day,
/// outside every busy interval.
pub fn free_windows(
    busy: &mut [(i64, i64)],
    from: i64,
    to: i64,
    minutes: i64,
    day: (i64, i64),
    offset: i32,
) -> Vec<(i64, i64)> {
    busy.sort();
    let (_, first) = minute_of_day(from, offset);
    let (_, last) = minute_of_day(to, offset);
    let mut out = Vec::new();
    for d in first..=last {
        if weekday(d) >= 5 {
            continue;
        }
        let midnight = day_start_ms(d, offset);
        let mut at = (midnight + day.0 * 60_000).max(from);
        let close = (midnight + day.1 * 60_000).min(to);
        for &(b0, b1) in busy.iter() {
            if b1 <= at || b0 >= close {
                continue;
            }
            if b0 - at >= minutes * 60_000 {
                out.push((at, b0));
            }
            at = at.max(b1);
        }
        if close - at >= minutes * 60_000 {
            out.push((at, close));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_people_see_carry_their_zone() {
        let at = parse("2026-12-04T14:00", 480).expect("time");
        assert_eq!(shown(at, 480), "2026-12-04 14:00 (UTC+8)");
        assert_eq!(span_of("2026-12-04T14:00", "2026-12-04T06:30:00Z", 480), "2026-12-04 14:00 – 14:30 (UTC+8)");
        assert_eq!(span_of("2026-12-04T23:00", "2026-12-05T01:00", 480), "2026-12-04 23:00 – 2026-12-05 01:00 (UTC+8)");
        assert_eq!(span_of("tomorrow", "later", 480), "tomorrow – later");
        assert_eq!(shown_of("2026-12-04T14:00:00+09:00", 480), "2026-12-04 13:00 (UTC+8)");
    }

    #[test]
    fn times_parse_with_and_without_offsets() {
        let shanghai = 480;
        let utc = parse("2026-12-04T06:00:00Z", 0).expect("utc");
        assert_eq!(parse("2026-12-04T14:00", shanghai), Ok(utc));
        assert_eq!(parse("2026-12-04 14:00:00+08:00", 0), Ok(utc));
        assert_eq!(parse("2026-12-04T01:00:00-05:00", shanghai), Ok(utc));
        assert_eq!(parse("2026-12-04", shanghai), parse("2026-12-04T00:00", shanghai));
        assert_eq!(rfc3339(utc, shanghai), "2026-12-04T14:00:00+08:00");
        assert_eq!(rfc3339(utc, -90), "2026-12-04T04:30:00-01:30");
        assert_eq!(local(utc, shanghai), "2026-12-04 14:00");
        assert_eq!(parse(&rfc3339(utc, shanghai), 0), Ok(utc), "round trip");
        for bad in
            ["tomorrow", "2026-13-01T10:00", "2026-02-30T10:00", "2026-12-04T25:00", "2026-12-04T10:00+99:00", ""]
        {
            assert!(parse(bad, shanghai).is_err(), "{bad:?}");
        }
        assert!(parse("明天下午", 480).is_err(), "non-ASCII is refused, not a panic");
        // 2026-12-04 is a Friday.
        let (_, day) = minute_of_day(utc, shanghai);
        assert_eq!(weekday(day), 4);
        assert_eq!(day_start_ms(day, shanghai), parse("2026-12-04T00:00", shanghai).expect("midnight"));
        assert_eq!(clock("09:30"), Ok(570));
        assert!(clock("9").is_err());
    }
}
