//! iCalendar (RFC 5545) as the CalDAV tools need it: content lines unfolded and folded again,
//! text values escaped, VEVENTs read into instants (UTC, a TZID resolved through the object's
//! own VTIMEZONE or a known fixed-offset zone, floating times at the box's offset, all-day
//! dates), repeating events expanded for the common rules (DAILY/WEEKLY/MONTHLY/YEARLY with
//! INTERVAL, COUNT, UNTIL and a weekly BYDAY, minus EXDATEs, with RECURRENCE-ID overrides), and
//! new events written with a VTIMEZONE for the box's zone.
//!
//! A rule this does not expand (BYSETPOS, BYMONTHDAY lists…) is shown once, marked as repeating.

use crate::tools::when;

/// One content line: `NAME;PARAM=V;…:value`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub name: String,
    pub params: Vec<(String, String)>,
    pub value: String,
}

impl Line {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    fn write(&self, out: &mut String) {
        let mut raw = self.name.clone();
        for (k, v) in &self.params {
            raw.push(';');
            raw.push_str(k);
            raw.push('=');
            raw.push_str(v);
        }
        raw.push(':');
        raw.push_str(&self.value);
        fold(&raw, out);
    }
}

/// Lines longer than 75 octets continue on the next line after a space (never inside a
/// UTF-8 sequence).
fn fold(raw: &str, out: &mut String) {
    let mut width = 0;
    for c in raw.chars() {
        if width + c.len_utf8() > 75 {
            out.push_str("\r\n ");
            width = 1;
        }
        out.push(c);
        width += c.len_utf8();
    }
    out.push_str("\r\n");
}

/// A component (`BEGIN:X` … `END:X`) with its properties and sub-components.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Component {
    pub name: String,
    pub props: Vec<Line>,
    pub children: Vec<Component>,
}

impl Component {
    pub fn prop(&self, name: &str) -> Option<&Line> {
        self.props.iter().find(|l| l.name.eq_ignore_ascii_case(name))
    }

    pub fn value(&self, name: &str) -> Option<&str> {
        self.prop(name).map(|l| l.value.as_str())
    }

    pub fn set(&mut self, line: Line) {
        match self.props.iter_mut().find(|l| l.name.eq_ignore_ascii_case(&line.name)) {
            Some(old) => *old = line,
            None => self.props.push(line),
        }
    }

    pub fn write(&self, out: &mut String) {
        out.push_str(&format!("BEGIN:{}\r\n", self.name));
        for p in &self.props {
            p.write(out);
        }
        for c in &self.children {
            c.write(out);
        }
        out.push_str(&format!("END:{}\r\n", self.name));
    }

    pub fn to_text(&self) -> String {
        let mut out = String::new();
        self.write(&mut out);
        out
    }
}

fn split_line(raw: &str) -> Option<Line> {
    // The value starts at the first ':' outside a quoted parameter value.
    let mut quoted = false;
    let colon = raw.char_indices().find(|&(_, c)| {
        if c == '"' {
            quoted = !quoted;
        }
        c == ':' && !quoted
    })?;
    let (head, value) = (&raw[..colon.0], &raw[colon.0 + 1..]);
    let mut parts = head.split(';');
    let name = parts.next()?.trim().to_ascii_uppercase();
    if name.is_empty() {
        return None;
    }
    let params = parts.filter_map(|p| p.split_once('=')).map(|(k, v)| (k.to_ascii_uppercase(), v.to_owned())).collect();
    Some(Line { name, params, value: value.to_owned() })
}

/// Parse an iCalendar object; `None` if it is not one.
pub fn parse(text: &str) -> Option<Component> {
    let mut lines: Vec<String> = Vec::new();
    for raw in text.split('\n') {
        let raw = raw.strip_suffix('\r').unwrap_or(raw);
        match raw.strip_prefix([' ', '\t']) {
            Some(more) if !lines.is_empty() => lines.last_mut()?.push_str(more),
            _ if raw.is_empty() => {}
            _ => lines.push(raw.to_owned()),
        }
    }
    let mut stack: Vec<Component> = Vec::new();
    let mut root = None;
    for raw in lines {
        let line = split_line(&raw)?;
        match line.name.as_str() {
            "BEGIN" => {
                if stack.len() > 8 {
                    return None;
                }
                stack.push(Component { name: line.value.trim().to_ascii_uppercase(), ..Default::default() });
            }
            "END" => {
                let c = stack.pop()?;
                if c.name != line.value.trim().to_ascii_uppercase() {
                    return None;
                }
                match stack.last_mut() {
                    Some(parent) => parent.children.push(c),
                    None => root = Some(c),
                }
            }
            _ => stack.last_mut()?.props.push(line),
        }
    }
    root.filter(|r| r.name == "VCALENDAR" && stack.is_empty())
}

/// A TEXT value as written (`\,` `\;` `\n` `\\`).
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            ';' => out.push_str("\\;"),
            ',' => out.push_str("\\,"),
            '\n' => out.push_str("\\n"),
            '\r' => {}
            c => out.push(c),
        }
    }
    out
}

pub fn unescape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some('n' | 'N') => out.push('\n'),
                Some(other) => out.push(other),
                None => {}
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Zones without daylight saving, by the names offices use; anything else needs the
/// object's VTIMEZONE (or falls back to the box's offset).
fn known_zone(tzid: &str) -> Option<i32> {
    let id = tzid.trim_matches('"').trim_start_matches('/');
    Some(match id {
        "UTC" | "Etc/UTC" | "GMT" | "Etc/GMT" | "Z" => 0,
        "Asia/Shanghai"
        | "Asia/Chongqing"
        | "Asia/Harbin"
        | "Asia/Urumqi"
        | "PRC"
        | "Asia/Hong_Kong"
        | "Asia/Macau"
        | "Asia/Taipei"
        | "Asia/Singapore"
        | "Asia/Kuala_Lumpur"
        | "Asia/Manila"
        | "China Standard Time" => 480,
        "Asia/Tokyo" | "Asia/Seoul" | "Tokyo Standard Time" | "Korea Standard Time" => 540,
        "Asia/Kolkata" | "Asia/Calcutta" | "India Standard Time" => 330,
        "Asia/Bangkok" | "Asia/Jakarta" | "Asia/Ho_Chi_Minh" | "SE Asia Standard Time" => 420,
        "Asia/Dubai" => 240,
        _ => return None,
    })
}

fn offset_value(v: &str) -> Option<i32> {
    let v = v.trim();
    let sign = match v.as_bytes().first()? {
        b'+' => 1,
        b'-' => -1,
        _ => return None,
    };
    let digits = &v[1..];
    if digits.len() < 4 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let h: i32 = digits[..2].parse().ok()?;
    let m: i32 = digits[2..4].parse().ok()?;
    Some(sign * (h * 60 + m))
}

/// How times of one object are read.
pub struct Zones<'a> {
    pub calendar: &'a Component,
    /// The box's offset and zone name: floating times, and the fallback for unknown zones.
    pub offset: i32,
    pub zone: &'a str,
}

impl Zones<'_> {
    /// The offset of `tzid`: a known zone, else the object's VTIMEZONE when it has one fixed
    /// offset (STANDARD only), else its STANDARD offset, else the box's.
    pub fn offset_of(&self, tzid: &str) -> i32 {
        if tzid == self.zone {
            return self.offset;
        }
        if let Some(o) = known_zone(tzid) {
            return o;
        }
        let tz = self.calendar.children.iter().find(|c| c.name == "VTIMEZONE" && c.value("TZID") == Some(tzid));
        tz.and_then(|tz| tz.children.iter().find(|c| c.name == "STANDARD"))
            .and_then(|s| s.value("TZOFFSETTO"))
            .and_then(offset_value)
            .unwrap_or(self.offset)
    }
}

/// A DATE-TIME or DATE value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stamp {
    /// An instant, with the offset its local time is shown and repeated at.
    At { ms: i64, offset: i32 },
    /// An all-day date (local midnight at the box's offset, as a day number).
    Day(i64),
}

impl Stamp {
    pub fn ms(self, offset: i32) -> i64 {
        match self {
            Stamp::At { ms, .. } => ms,
            Stamp::Day(d) => when::day_start_ms(d, offset),
        }
    }
}

fn digits(s: &str, range: std::ops::Range<usize>) -> Option<i64> {
    let part = s.get(range)?;
    part.bytes().all(|b| b.is_ascii_digit()).then(|| part.parse().ok())?
}

/// Local civil time → ms at `offset`, through the RFC 3339 parser (which checks the date).
fn civil(y: i64, mo: i64, d: i64, h: i64, mi: i64, s: i64, offset: i32) -> Option<i64> {
    when::parse(&format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}"), offset).ok()
}

pub fn stamp(line: &Line, zones: &Zones) -> Option<Stamp> {
    let v = line.value.trim();
    let (y, mo, d) = (digits(v, 0..4)?, digits(v, 4..6)?, digits(v, 6..8)?);
    if v.len() == 8 || line.param("VALUE").is_some_and(|t| t.eq_ignore_ascii_case("DATE")) {
        let ms = civil(y, mo, d, 0, 0, 0, 0)?;
        return Some(Stamp::Day(ms.div_euclid(86_400_000)));
    }
    if v.as_bytes().get(8) != Some(&b'T') {
        return None;
    }
    let (h, mi, s) = (digits(v, 9..11)?, digits(v, 11..13)?, digits(v, 13..15)?);
    let offset = if v.ends_with(['Z', 'z']) {
        0
    } else {
        line.param("TZID").map(|t| zones.offset_of(t)).unwrap_or(zones.offset)
    };
    let ms = civil(y, mo, d, h, mi, s.min(59), offset)?;
    // Shown and repeated at the time's own offset, except UTC, which is shown at the box's.
    Some(Stamp::At { ms, offset: if v.ends_with(['Z', 'z']) { zones.offset } else { offset } })
}

/// `PT1H30M`, `P1D`, `-PT15M`…, in ms.
pub fn duration(v: &str) -> Option<i64> {
    let v = v.trim();
    let (sign, rest) = match v.strip_prefix('-') {
        Some(r) => (-1, r),
        None => (1, v.strip_prefix('+').unwrap_or(v)),
    };
    let rest = rest.strip_prefix('P')?;
    let (mut total, mut num, mut time) = (0i64, String::new(), false);
    for c in rest.chars() {
        match c {
            'T' => time = true,
            '0'..='9' => num.push(c),
            u => {
                let n: i64 = num.parse().ok()?;
                num.clear();
                total += n * match (u, time) {
                    ('W', false) => 7 * 86_400_000,
                    ('D', false) => 86_400_000,
                    ('H', true) => 3_600_000,
                    ('M', true) => 60_000,
                    ('S', true) => 1000,
                    _ => return None,
                };
            }
        }
    }
    num.is_empty().then_some(sign * total)
}

/// One occurrence of an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub uid: String,
    pub summary: String,
    pub location: String,
    pub start_ms: i64,
    pub end_ms: i64,
    pub all_day: bool,
    /// The event repeats (this is one occurrence, or the first of a rule not expanded).
    pub repeats: bool,
    pub expanded: bool,
    /// Counts as busy time (not TRANSPARENT, not CANCELLED; all-day only when OPAQUE).
    pub busy: bool,
}

struct Rule {
    freq: char,
    interval: i64,
    count: Option<usize>,
    until: Option<i64>,
    by_day: Vec<i64>,
}

fn rule(v: &str, zones: &Zones) -> Option<Rule> {
    let mut r = Rule { freq: ' ', interval: 1, count: None, until: None, by_day: vec![] };
    for part in v.split(';') {
        let (k, val) = part.split_once('=')?;
        match k.to_ascii_uppercase().as_str() {
            "FREQ" => {
                r.freq = match val.to_ascii_uppercase().as_str() {
                    "DAILY" => 'D',
                    "WEEKLY" => 'W',
                    "MONTHLY" => 'M',
                    "YEARLY" => 'Y',
                    _ => return None,
                }
            }
            "INTERVAL" => r.interval = val.parse().ok().filter(|n| *n >= 1)?,
            "COUNT" => r.count = Some(val.parse().ok()?),
            "UNTIL" => {
                let line = Line { name: "UNTIL".into(), params: vec![], value: val.to_owned() };
                r.until = Some(match stamp(&line, zones)? {
                    Stamp::Day(d) => when::day_start_ms(d + 1, zones.offset) - 1,
                    s => s.ms(zones.offset),
                });
            }
            "BYDAY" => {
                for d in val.split(',') {
                    r.by_day.push(
                        ["MO", "TU", "WE", "TH", "FR", "SA", "SU"].iter().position(|w| d.eq_ignore_ascii_case(w))?
                            as i64,
                    );
                }
            }
            "WKST" => {}
            _ => return None,
        }
    }
    (r.freq != ' ' && (r.by_day.is_empty() || r.freq == 'W')).then_some(r)
}

/// Starts of the occurrences of a rule from `first` (local wall time kept at `offset`), up to
/// `to` and at most `limit`.
fn occurrences(first: i64, offset: i32, r: &Rule, to: i64, limit: usize) -> Vec<i64> {
    let local = first + i64::from(offset) * 60_000;
    let (day, in_day) = (local.div_euclid(86_400_000), local.rem_euclid(86_400_000));
    let at = |d: i64| d * 86_400_000 + in_day - i64::from(offset) * 60_000;
    let (y0, m0, d0) = civil_of(day);
    let mut out = Vec::new();
    let max = r.count.unwrap_or(usize::MAX);
    let mut step = 0i64;
    while out.len() < max.min(limit) && step < 20_000 {
        let candidates: Vec<i64> = match r.freq {
            'D' => vec![day + step * r.interval],
            'W' if r.by_day.is_empty() => vec![day + step * 7 * r.interval],
            'W' => {
                let week = day - when::weekday(day) + step * 7 * r.interval;
                let mut days: Vec<i64> = r.by_day.iter().map(|w| week + w).filter(|d| *d >= day).collect();
                days.sort();
                days
            }
            'M' => {
                let months = m0 - 1 + step * r.interval;
                let (y, m) = (y0 + months.div_euclid(12), months.rem_euclid(12) + 1);
                // A month without that day is skipped (RFC 5545).
                civil(y, m, d0, 0, 0, 0, 0).map(|ms| ms.div_euclid(86_400_000)).into_iter().collect()
            }
            _ => civil(y0 + step * r.interval, m0, d0, 0, 0, 0, 0)
                .map(|ms| ms.div_euclid(86_400_000))
                .into_iter()
                .collect(),
        };
        step += 1;
        for d in candidates {
            let start = at(d);
            if start > to || r.until.is_some_and(|u| start > u) {
                return out;
            }
            if out.len() < max.min(limit) {
                out.push(start);
            }
        }
    }
    out
}

/// Year, month, day of a day number.
fn civil_of(day: i64) -> (i64, i64, i64) {
    let s = when::local(day * 86_400_000, 0);
    let n = |r: std::ops::Range<usize>| s.get(r).and_then(|p| p.parse().ok()).unwrap_or(1);
    (n(0..4), n(5..7), n(8..10))
}

/// The occurrences of the calendar object's events that overlap `[from, to)`.
pub fn instances(calendar: &Component, offset: i32, zone: &str, from: i64, to: i64) -> Vec<Instance> {
    let zones = Zones { calendar, offset, zone };
    let events: Vec<&Component> = calendar.children.iter().filter(|c| c.name == "VEVENT").collect();
    let overrides: Vec<(&Component, i64)> =
        events.iter().filter_map(|e| Some((*e, stamp(e.prop("RECURRENCE-ID")?, &zones)?.ms(offset)))).collect();
    let mut out = Vec::new();
    for e in &events {
        let Some(start) = e.prop("DTSTART").and_then(|l| stamp(l, &zones)) else { continue };
        let start_ms = start.ms(offset);
        let end_ms = match (e.prop("DTEND").and_then(|l| stamp(l, &zones)), e.value("DURATION").and_then(duration)) {
            (Some(end), _) => end.ms(offset),
            (None, Some(d)) => start_ms + d,
            (None, None) if matches!(start, Stamp::Day(_)) => start_ms + 86_400_000,
            _ => start_ms,
        };
        let all_day = matches!(start, Stamp::Day(_));
        let transparent = e.value("TRANSP").is_some_and(|t| t.eq_ignore_ascii_case("TRANSPARENT"));
        let opaque = e.value("TRANSP").is_some_and(|t| t.eq_ignore_ascii_case("OPAQUE"));
        let cancelled = e.value("STATUS").is_some_and(|s| s.eq_ignore_ascii_case("CANCELLED"));
        let base = Instance {
            uid: e.value("UID").unwrap_or_default().to_owned(),
            summary: unescape(e.value("SUMMARY").unwrap_or("(no title)")),
            location: unescape(e.value("LOCATION").unwrap_or_default()),
            start_ms,
            end_ms,
            all_day,
            repeats: false,
            expanded: true,
            busy: !cancelled && !transparent && (!all_day || opaque),
        };
        let is_override = e.prop("RECURRENCE-ID").is_some();
        let mut push = |i: Instance| {
            if i.start_ms < to && i.end_ms.max(i.start_ms + 1) > from && !cancelled {
                out.push(i);
            }
        };
        match e.value("RRULE") {
            Some(rr) if !is_override => {
                let (show_offset, length) = match start {
                    Stamp::At { offset: o, .. } => (o, end_ms - start_ms),
                    Stamp::Day(_) => (offset, end_ms - start_ms),
                };
                let Some(r) = rule(rr, &zones) else {
                    push(Instance { repeats: true, expanded: false, ..base });
                    continue;
                };
                let excluded: Vec<i64> = e
                    .props
                    .iter()
                    .filter(|l| l.name == "EXDATE")
                    .flat_map(|l| {
                        l.value
                            .split(',')
                            .filter_map(|v| stamp(&Line { value: v.to_owned(), ..l.clone() }, &zones))
                            .map(|s| s.ms(offset))
                            .collect::<Vec<_>>()
                    })
                    .collect();
                for s in occurrences(start_ms, show_offset, &r, to, 5000) {
                    let moved = overrides.iter().any(|(o, at)| *at == s && o.value("UID") == e.value("UID"));
                    if excluded.contains(&s) || moved {
                        continue;
                    }
                    push(Instance { start_ms: s, end_ms: s + length, repeats: true, ..base.clone() });
                }
            }
            _ => push(Instance { repeats: is_override, ..base }),
        }
    }
    out.sort_by_key(|i| i.start_ms);
    out
}

/// `20261204T100000` of `ms` at `offset`.
pub fn local_value(ms: i64, offset: i32) -> String {
    let s = when::rfc3339(ms, offset);
    format!("{}{}{}T{}{}{}", &s[0..4], &s[5..7], &s[8..10], &s[11..13], &s[14..16], &s[17..19])
}

/// `20261204T020000Z` of `ms`.
pub fn utc_value(ms: i64) -> String {
    format!("{}Z", local_value(ms, 0))
}

/// A DTSTART/DTEND line at the box's zone.
pub fn time_line(name: &str, ms: i64, offset: i32, zone: &str) -> Line {
    Line { name: name.into(), params: vec![("TZID".into(), zone.into())], value: local_value(ms, offset) }
}

/// A VTIMEZONE for a zone at a fixed offset.
pub fn timezone(zone: &str, offset: i32) -> Component {
    let sign = if offset < 0 { '-' } else { '+' };
    let o = format!("{sign}{:02}{:02}", offset.unsigned_abs() / 60, offset.unsigned_abs() % 60);
    let line = |n: &str, v: &str| Line { name: n.into(), params: vec![], value: v.into() };
    Component {
        name: "VTIMEZONE".into(),
        props: vec![line("TZID", zone)],
        children: vec![Component {
            name: "STANDARD".into(),
            props: vec![line("DTSTART", "19700101T000000"), line("TZOFFSETFROM", &o), line("TZOFFSETTO", &o)],
            children: vec![],
        }],
    }
}

pub struct NewEvent<'a> {
    pub uid: &'a str,
    pub title: &'a str,
    pub start_ms: i64,
    pub end_ms: i64,
    pub location: Option<&'a str>,
    pub description: Option<&'a str>,
    pub now_ms: i64,
}

/// A calendar object with one event, times at the box's zone.
pub fn event(e: &NewEvent, offset: i32, zone: &str) -> String {
    let line = |n: &str, v: String| Line { name: n.into(), params: vec![], value: v };
    let mut ev = Component { name: "VEVENT".into(), ..Default::default() };
    ev.props.push(line("UID", e.uid.to_owned()));
    ev.props.push(line("DTSTAMP", utc_value(e.now_ms)));
    ev.props.push(time_line("DTSTART", e.start_ms, offset, zone));
    ev.props.push(time_line("DTEND", e.end_ms, offset, zone));
    ev.props.push(line("SUMMARY", escape(e.title)));
    if let Some(l) = e.location.filter(|l| !l.is_empty()) {
        ev.props.push(line("LOCATION", escape(l)));
    }
    if let Some(d) = e.description.filter(|d| !d.is_empty()) {
        ev.props.push(line("DESCRIPTION", escape(d)));
    }
    let cal = Component {
        name: "VCALENDAR".into(),
        props: vec![
            line("VERSION", "2.0".into()),
            line("PRODID", "-//zhuli//zhuli assistant//EN".into()),
            line("CALSCALE", "GREGORIAN".into()),
        ],
        children: vec![timezone(zone, offset), ev],
    };
    cal.to_text()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SH: i32 = 480;

    fn t(s: &str) -> i64 {
        when::parse(s, SH).expect("time")
    }

    fn cal(body: &str) -> Component {
        parse(&format!("BEGIN:VCALENDAR\r\nVERSION:2.0\r\n{body}END:VCALENDAR\r\n")).expect("calendar")
    }

    #[test]
    fn lines_unfold_escape_and_fold_back() {
        let text = "BEGIN:VCALENDAR\r\nBEGIN:VEVENT\r\nUID:a\r\nSUMMARY:Budget\\, Q3\\; review\r\n  and lunch\r\nDESCRIPTION;LANGUAGE=\"en:GB\":line1\\nline2\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n";
        let c = parse(text).expect("parses");
        let e = &c.children[0];
        assert_eq!(unescape(e.value("SUMMARY").expect("summary")), "Budget, Q3; review and lunch");
        assert_eq!(e.prop("DESCRIPTION").and_then(|l| l.param("language")), Some("\"en:GB\""));
        assert_eq!(unescape(e.value("DESCRIPTION").expect("d")), "line1\nline2");
        let long = event(
            &NewEvent {
                uid: "u1",
                title: &"会议".repeat(40),
                start_ms: t("2026-12-04T10:00"),
                end_ms: t("2026-12-04T11:00"),
                location: Some("Room 3, 2F"),
                description: None,
                now_ms: 0,
            },
            SH,
            "Asia/Shanghai",
        );
        assert!(long.lines().all(|l| l.len() <= 76), "folded at 75 octets");
        let back = parse(&long).expect("own output parses");
        let i = instances(&back, SH, "Asia/Shanghai", t("2026-12-04T00:00"), t("2026-12-05T00:00"));
        assert_eq!(i.len(), 1);
        assert_eq!((i[0].summary.as_str(), i[0].location.as_str()), ("会议".repeat(40).as_str(), "Room 3, 2F"));
        assert_eq!((i[0].start_ms, i[0].end_ms), (t("2026-12-04T10:00"), t("2026-12-04T11:00")));
        assert!(long.contains("DTSTART;TZID=Asia/Shanghai:20261204T100000") && long.contains("TZOFFSETTO:+0800"));
        for bad in
            ["", "BEGIN:VEVENT\r\nEND:VEVENT\r\n", "BEGIN:VCALENDAR\r\nBEGIN:VEVENT\r\nEND:VCALENDAR\r\n", "garbage"]
        {
            assert!(parse(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn times_resolve_through_zones_utc_floating_and_dates() {
        let c = cal(
            "BEGIN:VTIMEZONE\r\nTZID:Office\r\nBEGIN:STANDARD\r\nDTSTART:19700101T000000\r\nTZOFFSETFROM:+0900\r\nTZOFFSETTO:+0900\r\nEND:STANDARD\r\nEND:VTIMEZONE\r\n\
             BEGIN:VEVENT\r\nUID:z\r\nDTSTART;TZID=Office:20261204T110000\r\nDURATION:PT30M\r\nEND:VEVENT\r\n\
             BEGIN:VEVENT\r\nUID:u\r\nDTSTART:20261204T020000Z\r\nDTEND:20261204T030000Z\r\nEND:VEVENT\r\n\
             BEGIN:VEVENT\r\nUID:f\r\nDTSTART:20261204T150000\r\nDTEND:20261204T160000\r\nEND:VEVENT\r\n\
             BEGIN:VEVENT\r\nUID:d\r\nDTSTART;VALUE=DATE:20261204\r\nEND:VEVENT\r\n\
             BEGIN:VEVENT\r\nUID:x\r\nDTSTART;TZID=Asia/Tokyo:20261204T120000\r\nDTEND;TZID=Asia/Tokyo:20261204T130000\r\nEND:VEVENT\r\n",
        );
        let i = instances(&c, SH, "Asia/Shanghai", t("2026-12-04T00:00"), t("2026-12-05T00:00"));
        let by = |uid: &str| i.iter().find(|e| e.uid == uid).unwrap_or_else(|| panic!("{uid} in {i:?}")).clone();
        assert_eq!((by("z").start_ms, by("z").end_ms), (t("2026-12-04T10:00"), t("2026-12-04T10:30")));
        assert_eq!(by("u").start_ms, t("2026-12-04T10:00"));
        assert_eq!(by("f").start_ms, t("2026-12-04T15:00"), "floating time is the box's local time");
        assert_eq!(by("x").start_ms, t("2026-12-04T11:00"), "Tokyo is an hour ahead");
        let d = by("d");
        assert!(d.all_day && !d.busy && d.end_ms - d.start_ms == 86_400_000);
        assert_eq!(duration("P1DT2H"), Some(93_600_000));
        assert_eq!(duration("-PT15M"), Some(-900_000));
        assert_eq!(duration("PT"), Some(0));
        assert_eq!(duration("P1H"), None);
    }

    #[test]
    fn repeating_events_expand_with_exceptions() {
        // Weekly on Monday and Wednesday at 10:00, one Wednesday excluded, one Monday moved.
        let c = cal(
            "BEGIN:VEVENT\r\nUID:standup\r\nSUMMARY:Standup\r\nDTSTART;TZID=Asia/Shanghai:20261130T100000\r\nDTEND;TZID=Asia/Shanghai:20261130T101500\r\n\
             RRULE:FREQ=WEEKLY;BYDAY=MO,WE;UNTIL=20261231T000000Z\r\nEXDATE;TZID=Asia/Shanghai:20261209T100000\r\nEND:VEVENT\r\n\
             BEGIN:VEVENT\r\nUID:standup\r\nSUMMARY:Standup (moved)\r\nRECURRENCE-ID;TZID=Asia/Shanghai:20261207T100000\r\n\
             DTSTART;TZID=Asia/Shanghai:20261207T140000\r\nDTEND;TZID=Asia/Shanghai:20261207T141500\r\nEND:VEVENT\r\n\
             BEGIN:VEVENT\r\nUID:monthly\r\nDTSTART:20260131T020000Z\r\nDTEND:20260131T030000Z\r\nRRULE:FREQ=MONTHLY;COUNT=4\r\nEND:VEVENT\r\n\
             BEGIN:VEVENT\r\nUID:odd\r\nDTSTART:20261201T020000Z\r\nRRULE:FREQ=MONTHLY;BYSETPOS=-1;BYDAY=FR\r\nEND:VEVENT\r\n",
        );
        let dec = instances(&c, SH, "Asia/Shanghai", t("2026-12-01T00:00"), t("2026-12-15T00:00"));
        let standups: Vec<String> =
            dec.iter().filter(|i| i.uid == "standup").map(|i| when::local(i.start_ms, SH)).collect();
        assert_eq!(standups, ["2026-12-02 10:00", "2026-12-07 14:00", "2026-12-14 10:00"], "{dec:?}");
        assert!(dec.iter().filter(|i| i.uid == "standup").all(|i| i.repeats && i.end_ms - i.start_ms == 900_000));
        let odd: Vec<&Instance> = dec.iter().filter(|i| i.uid == "odd").collect();
        assert_eq!(odd.len(), 1, "a rule not expanded shows once");
        assert!(!odd[0].expanded);
        // Monthly from Jan 31: months without a 31st are skipped; COUNT counts occurrences.
        let year = instances(&c, SH, "Asia/Shanghai", t("2026-01-01T00:00"), t("2027-01-01T00:00"));
        let monthly: Vec<String> =
            year.iter().filter(|i| i.uid == "monthly").map(|i| when::local(i.start_ms, SH)[..10].to_owned()).collect();
        assert_eq!(monthly, ["2026-01-31", "2026-03-31", "2026-05-31", "2026-07-31"]);
    }
}
