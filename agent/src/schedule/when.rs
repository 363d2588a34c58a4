//! The time of a job as people write it in a command, Chinese first: `明天 9:00`, `明天上午9点半`,
//! `今晚8点`, `周五 17:00`, `12月24日 10:00`, `2026-12-24 10:00`, `30分钟后`, `每天 9:00`,
//! `每个工作日 9:00`, `每周一三五 17:00`, `每月1号 10:00`, `每2小时`; and in English
//! `tomorrow 9:00`, `fri 17:00`, `in 30m`, `daily 9:00`, `weekdays 9:00`, `every mon,wed 17:00`,
//! `monthly 1 10:00`, `every 2h`. What follows the time is the job's text.
//!
//! A day without a time of day means 09:00.

use super::rule::{Rule, at, civil_from_days, days_from_civil, days_in_month, local_day, weekday};

/// Why a text is not a time; each says what to write instead (the caller words it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WhenError {
    #[error("no time found at the start")]
    NoTime,
    #[error("not a time of day")]
    BadClock,
    #[error("not a date of the calendar")]
    BadDate,
    #[error("the time has passed")]
    Past,
    #[error("nothing to remind of")]
    NoText,
}

/// A job's rule and its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub rule: Rule,
    pub text: String,
}

/// Parse `text` (after the command's name) at `now_ms`, in the zone `offset_minutes`.
pub fn parse(text: &str, now_ms: i64, offset_minutes: i32) -> Result<Parsed, WhenError> {
    let mut c = Cursor { s: text.trim() };
    let (today, _) = local_day(now_ms, offset_minutes);
    let rule = when(&mut c, now_ms, today, offset_minutes)?;
    let rest = c.s.trim_start_matches([' ', ',', '，', ':', '、', '\u{3000}', '：']).trim();
    if rest.is_empty() {
        return Err(WhenError::NoText);
    }
    if let Rule::Once { at_ms } = rule
        && at_ms <= now_ms
    {
        return Err(WhenError::Past);
    }
    Ok(Parsed { rule, text: rest.to_owned() })
}

/// What the day part said.
enum Day {
    On(i64),
    /// A weekday, this week or (`next`) the one after.
    Weekday(i64, bool),
    Daily,
    Weekdays,
    Weekly(u8),
    Monthly(u8),
    /// A month and day without a year: this year, or next year once passed.
    Dated(i64, i64),
}

fn when(c: &mut Cursor, now_ms: i64, today: i64, offset: i32) -> Result<Rule, WhenError> {
    // Relative: `30分钟后`, `2小时后`, `in 30m`, `每2小时`; `3天后` and `每3天` take a clock.
    let day = match relative(c, now_ms) {
        Some(Rel::Rule(rule)) => return Ok(rule),
        Some(Rel::Days(n)) => Some(Day::On(today + n)),
        Some(Rel::EveryDays(n)) => {
            c.skip_space();
            let m = clock(c)?.unwrap_or(9 * 60);
            let t = at(today, m, offset);
            let from = if t > now_ms { t } else { at(today + 1, m, offset) };
            return Ok(Rule::Every { minutes: (n * 24 * 60).clamp(1, u32::MAX as i64) as u32, from_ms: from });
        }
        None => day(c, today)?,
    };
    c.skip_space();
    let minute = clock(c)?;
    let day = match day {
        Some(d) => d,
        // A time alone: today, or tomorrow once it has passed.
        None => {
            let Some(m) = minute else { return Err(WhenError::NoTime) };
            let t = at(today, m, offset);
            return Ok(Rule::Once { at_ms: if t > now_ms { t } else { at(today + 1, m, offset) } });
        }
    };
    let m = minute.unwrap_or(9 * 60);
    // `晚上12点` is the midnight that ends the day: the next day's 00:00 for a single time, 00:00
    // for a rule.
    let minute = (m % (24 * 60)) as u16;
    Ok(match day {
        Day::On(d) => Rule::Once { at_ms: at(d, m, offset) },
        Day::Weekday(w, next) => {
            let this_week = today - weekday(today) + w;
            let d = if next {
                this_week + 7
            } else if at(this_week, m, offset) > now_ms {
                this_week
            } else {
                this_week + 7
            };
            Rule::Once { at_ms: at(d, m, offset) }
        }
        Day::Dated(month, d) => {
            let (year, _, _) = civil_from_days(today);
            let mut best = None;
            for y in [year, year + 1] {
                if d > days_in_month(y, month) {
                    continue;
                }
                let t = at(days_from_civil(y, month, d), m, offset);
                if t > now_ms {
                    best = Some(t);
                    break;
                }
            }
            Rule::Once { at_ms: best.ok_or(WhenError::BadDate)? }
        }
        Day::Daily => Rule::Daily { minute },
        Day::Weekdays => Rule::Weekdays { minute },
        Day::Weekly(days) => Rule::Weekly { days, minute },
        Day::Monthly(day) => Rule::Monthly { day, minute },
    })
}

/// A time counted from now.
enum Rel {
    Rule(Rule),
    /// `N天后`: a day, whose clock may follow.
    Days(i64),
    /// `每N天`: every N days, at the clock that may follow.
    EveryDays(i64),
}

fn relative(c: &mut Cursor, now_ms: i64) -> Option<Rel> {
    let save = c.s;
    // `每2小时`, `每 30 分钟`, `every 2h`: a repeating interval from now.
    if c.eat_any(&["每隔", "每", "every "]).is_some() {
        c.skip_space();
        if let Some(n) = c.number() {
            c.skip_space();
            if let Some(unit) = unit(c) {
                c.eat_any(&["一次"]);
                if unit == 24 * 60 {
                    return Some(Rel::EveryDays(n));
                }
                let minutes = (n * unit).clamp(1, u32::MAX as i64);
                return Some(Rel::Rule(Rule::Every { minutes: minutes as u32, from_ms: now_ms + minutes * 60_000 }));
            }
        }
        c.s = save;
    }
    if c.eat_any(&["in "]).is_some() {
        c.skip_space();
        if let Some(n) = c.number() {
            c.skip_space();
            if let Some(unit) = unit(c) {
                if unit == 24 * 60 {
                    return Some(Rel::Days(n));
                }
                return Some(Rel::Rule(Rule::Once { at_ms: now_ms + n * unit * 60_000 }));
            }
        }
        c.s = save;
        return None;
    }
    if let Some(n) = c.number() {
        c.skip_space();
        if let Some(unit) = unit(c)
            && c.eat_any(&["以后", "之后", "后"]).is_some()
        {
            if unit == 24 * 60 {
                return Some(Rel::Days(n));
            }
            return Some(Rel::Rule(Rule::Once { at_ms: now_ms + n * unit * 60_000 }));
        }
    }
    c.s = save;
    None
}

/// A unit of time in minutes: `分钟`, `小时`, `天`, `m`, `h`, `d`.
fn unit(c: &mut Cursor) -> Option<i64> {
    let save = c.s;
    let found = if let Some(w) = c.eat_any(&["分钟", "分", "minutes", "minute", "mins", "min", "m"]) {
        Some((w, 1))
    } else if let Some(w) = c.eat_any(&["个小时", "个钟头", "小时", "钟头", "hours", "hour", "h"]) {
        Some((w, 60))
    } else {
        c.eat_any(&["天", "days", "day", "d"]).map(|w| (w, 24 * 60))
    };
    // An English unit is a whole word: `3 months` is not three minutes.
    match found {
        Some((w, _)) if w.is_ascii() && c.s.starts_with(|ch: char| ch.is_ascii_alphabetic()) => {
            c.s = save;
            None
        }
        Some((_, n)) => Some(n),
        None => None,
    }
}

const WEEK_ZH: [(&str, i64); 9] =
    [("一", 0), ("二", 1), ("三", 2), ("四", 3), ("五", 4), ("六", 5), ("日", 6), ("天", 6), ("末", 7)];
const WEEK_EN: [(&str, i64); 14] = [
    ("monday", 0),
    ("mon", 0),
    ("tuesday", 1),
    ("tue", 1),
    ("wednesday", 2),
    ("wed", 2),
    ("thursday", 3),
    ("thu", 3),
    ("friday", 4),
    ("fri", 4),
    ("saturday", 5),
    ("sat", 5),
    ("sunday", 6),
    ("sun", 6),
];

fn weekdays_zh(c: &mut Cursor) -> u8 {
    let mut days = 0u8;
    loop {
        let start = c.s;
        c.eat_any(&["、", ",", "，", "和", "及", "/"]);
        // A digit is a weekday only right after 周 or 星期 (`周1`): `每周五 17:00` is Friday.
        let named = c.eat_any(&["周", "星期"]).is_some();
        let before = c.s;
        if let Some((n, d)) = WEEK_ZH.iter().find(|(n, _)| c.s.starts_with(n)) {
            c.s = &c.s[n.len()..];
            days |= if *d == 7 { 0b110_0000 } else { 1 << d };
            // A range: `一至五`, `周一到周五`.
            let before_range = c.s;
            if *d < 7 && c.eat_any(&["至", "到", "-", "~", "～"]).is_some() {
                c.eat_any(&["周", "星期"]);
                match WEEK_ZH.iter().find(|(n, e)| c.s.starts_with(n) && *e < 7 && e >= d) {
                    Some((n2, e)) => {
                        c.s = &c.s[n2.len()..];
                        for x in *d..=*e {
                            days |= 1 << x;
                        }
                    }
                    None => c.s = before_range,
                }
            }
        } else if let Some(d) =
            c.s.chars().next().and_then(|ch| ch.to_digit(10)).filter(|d| named && (1..=7).contains(d))
        {
            c.s = &c.s[1..];
            days |= 1 << (d - 1);
        }
        if c.s == before {
            c.s = start;
            return days;
        }
    }
}

fn weekdays_en(c: &mut Cursor) -> u8 {
    let mut days = 0u8;
    loop {
        let before = c.s;
        c.eat_any(&[",", " ", "and "]);
        let lower = c.s.to_ascii_lowercase();
        match WEEK_EN.iter().find(|(n, _)| lower.starts_with(n)) {
            Some((n, d)) => {
                c.s = &c.s[n.len()..];
                days |= 1 << d;
            }
            None => {
                c.s = before;
                return days;
            }
        }
    }
}

fn day(c: &mut Cursor, today: i64) -> Result<Option<Day>, WhenError> {
    if c.eat_any(&["每天", "每日", "天天", "daily", "every day"]).is_some() {
        return Ok(Some(Day::Daily));
    }
    if c.eat_any(&["每个工作日", "每工作日", "工作日", "weekdays", "every weekday"]).is_some() {
        return Ok(Some(Day::Weekdays));
    }
    if c.eat_any(&["每个星期", "每星期", "每礼拜", "每周"]).is_some() {
        let days = weekdays_zh(c);
        return if days == 0 { Err(WhenError::NoTime) } else { Ok(Some(Day::Weekly(days))) };
    }
    if c.eat_any(&["weekly on ", "weekly ", "every "]).is_some() {
        let days = weekdays_en(c);
        return if days == 0 { Err(WhenError::NoTime) } else { Ok(Some(Day::Weekly(days))) };
    }
    if c.eat_any(&["每个月", "每月", "monthly on ", "monthly "]).is_some() {
        c.skip_space();
        let d = c.number().ok_or(WhenError::BadDate)?;
        c.eat_any(&["日", "号", "st", "nd", "rd", "th"]);
        if !(1..=31).contains(&d) {
            return Err(WhenError::BadDate);
        }
        return Ok(Some(Day::Monthly(d as u8)));
    }
    for (word, n) in
        [("大后天", 3), ("后天", 2), ("明天", 1), ("明早", 1), ("明晚", 1), ("今天", 0), ("今晚", 0), ("今早", 0)]
    {
        if c.s.starts_with(word) {
            // 今晚 and 明晚 are evenings, 明早 and 今早 mornings: leave the half for the clock.
            if word.ends_with('晚') {
                c.s = &c.s[word.len() - "晚".len()..];
            } else if word.ends_with('早') {
                c.s = &c.s[word.len() - "早".len()..];
            } else {
                c.s = &c.s[word.len()..];
            }
            return Ok(Some(Day::On(today + n)));
        }
    }
    let lower = c.s.to_ascii_lowercase();
    for (word, n) in [("tomorrow", 1), ("today", 0)] {
        if lower.starts_with(word) {
            c.s = &c.s[word.len()..];
            return Ok(Some(Day::On(today + n)));
        }
    }
    if let Some(next) = c.eat_any(&["下周", "下星期", "下个星期", "周", "星期", "礼拜"]) {
        if let Some((n, d)) = WEEK_ZH.iter().find(|(n, d)| c.s.starts_with(n) && *d < 7) {
            c.s = &c.s[n.len()..];
            return Ok(Some(Day::Weekday(*d, next.starts_with('下'))));
        }
        return Err(WhenError::BadDate);
    }
    if let Some((n, d)) = WEEK_EN.iter().find(|(n, _)| lower.starts_with(n)) {
        c.s = &c.s[n.len()..];
        return Ok(Some(Day::Weekday(*d, false)));
    }
    // `2026-12-24`, `2026/12/24`, `12月24日`, `12-24`.
    let save = c.s;
    if let Some(a) = c.number() {
        if c.eat_any(&["月"]).is_some() {
            let d = c.number().ok_or(WhenError::BadDate)?;
            c.eat_any(&["日", "号"]);
            if !(1..=12).contains(&a) || !(1..=31).contains(&d) {
                return Err(WhenError::BadDate);
            }
            return Ok(Some(Day::Dated(a, d)));
        }
        if a >= 1970 && c.eat_any(&["-", "/", "年"]).is_some() {
            let m = c.number().ok_or(WhenError::BadDate)?;
            c.eat_any(&["-", "/", "月"]);
            let d = c.number().ok_or(WhenError::BadDate)?;
            c.eat_any(&["日", "号"]);
            if !(1..=12).contains(&m) || d < 1 || d > days_in_month(a, m) {
                return Err(WhenError::BadDate);
            }
            return Ok(Some(Day::On(days_from_civil(a, m, d))));
        }
    }
    c.s = save;
    Ok(None)
}

/// The time of day, in minutes since midnight, if one is written.
fn clock(c: &mut Cursor) -> Result<Option<i64>, WhenError> {
    let save = c.s;
    let half = c.eat_any(&["凌晨", "早上", "早晨", "早", "上午", "中午", "下午", "傍晚", "晚上", "晚", "夜里"]);
    c.skip_space();
    let Some(mut h) = c.number() else {
        if half.is_some() {
            return Err(WhenError::BadClock);
        }
        c.s = save;
        return Ok(None);
    };
    let mut m = 0;
    if c.eat_any(&[":"]).is_some() {
        m = c.number().ok_or(WhenError::BadClock)?;
    } else if c.eat_any(&["点", "时"]).is_some() {
        if c.eat_any(&["半"]).is_some() {
            m = 30;
        } else if c.eat_any(&["一刻"]).is_some() {
            m = 15;
        } else if c.eat_any(&["整"]).is_none() {
            // Minutes without 分 only as two digits (`9点30`) or tens in Chinese (`九点三十`):
            // `9点三楼开会` is nine o'clock on the third floor.
            let before = c.s;
            let two_digits = c.s.bytes().take_while(u8::is_ascii_digit).count() == 2;
            let tens = c.s.chars().take(2).any(|ch| ch == '十');
            if let Some(n) = c.number() {
                let counted = c.s.starts_with(|ch: char| "楼层号室个份人位名台件次点".contains(ch));
                if c.eat_any(&["分"]).is_some() || ((two_digits || tens) && n < 60 && !counted) {
                    m = n;
                } else {
                    c.s = before;
                }
            }
        }
    } else {
        // A number without a clock mark is not a time (`3份文件`), unless am/pm follows.
        let lower = c.s.trim_start().to_ascii_lowercase();
        if !(lower.starts_with("am") || lower.starts_with("pm")) && half.is_none() {
            c.s = save;
            return Ok(None);
        }
    }
    let lower = c.s.trim_start().to_ascii_lowercase();
    let pm = if lower.starts_with("pm") || lower.starts_with("am") {
        c.s = &c.s.trim_start()[2..];
        lower.starts_with("pm")
    } else {
        false
    };
    let afternoon = matches!(half, Some("下午" | "傍晚" | "晚上" | "晚" | "夜里")) || pm;
    let night = matches!(half, Some("晚上" | "晚" | "夜里"));
    let am = lower.starts_with("am") || matches!(half, Some("凌晨"));
    if h == 12 && night && m == 0 {
        // `晚上12点`: the midnight that ends the day.
        return Ok(Some(24 * 60));
    }
    if h == 12 && am {
        h = 0;
    } else if (afternoon && h < 12) || (half == Some("中午") && h < 11) {
        h += 12;
    }
    if h > 23 || m > 59 {
        return Err(WhenError::BadClock);
    }
    Ok(Some(h * 60 + m))
}

struct Cursor<'a> {
    s: &'a str,
}

impl<'a> Cursor<'a> {
    fn skip_space(&mut self) {
        self.s = self.s.trim_start_matches([' ', '\u{3000}']);
    }

    /// The first of `words` the text starts with (ASCII letters in any case), consumed.
    fn eat_any(&mut self, words: &[&'static str]) -> Option<&'static str> {
        let w = words.iter().find(|w| {
            self.s.get(..w.len()).is_some_and(|head| head == **w || (w.is_ascii() && head.eq_ignore_ascii_case(w)))
        })?;
        self.s = &self.s[w.len()..];
        Some(w)
    }

    /// A number in digits, or in Chinese numerals up to 99 (`九`, `十二`, `二十五`, `两`).
    fn number(&mut self) -> Option<i64> {
        let digits = self.s.bytes().take_while(u8::is_ascii_digit).count();
        if digits > 0 {
            let n = self.s[..digits].parse().ok().filter(|n: &i64| *n < 100_000);
            self.s = &self.s[digits..];
            return n;
        }
        let value = |ch: char| "零一二三四五六七八九".chars().position(|d| d == ch).map(|p| p as i64);
        let mut chars = self.s.char_indices().peekable();
        let mut n: Option<i64> = None;
        let mut used = 0;
        while let Some((i, ch)) = chars.next() {
            match ch {
                '十' => {
                    n = Some(n.unwrap_or(1) * 10);
                    used = i + ch.len_utf8();
                    if let Some((j, d)) = chars.peek().copied()
                        && let Some(v) = value(d)
                    {
                        n = n.map(|t| t + v);
                        used = j + d.len_utf8();
                        break;
                    }
                    break;
                }
                '两' if n.is_none() => {
                    n = Some(2);
                    used = i + ch.len_utf8();
                }
                _ => match value(ch) {
                    Some(v) if n.is_none() => {
                        n = Some(v);
                        used = i + ch.len_utf8();
                    }
                    _ => break,
                },
            }
        }
        if n.is_some() {
            self.s = &self.s[used..];
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CST: i32 = 480;

    fn t(s: &str) -> i64 {
        super::super::rule::parse_local(s, CST)
    }

    /// Parsed at Friday 2026-12-04 10:00 in Shanghai: the rule shown, and the text.
    fn p(text: &str) -> (String, String) {
        let now = t("2026-12-04 10:00");
        let got = parse(text, now, CST).unwrap_or_else(|e| panic!("{text}: {e}"));
        let shown = match got.rule {
            Rule::Once { at_ms } => super::super::rule::local(at_ms, CST),
            ref r => r.shown_zh(CST),
        };
        (shown, got.text)
    }

    #[test]
    fn one_off_times_in_chinese() {
        let cases = [
            ("明天 9:00 发合同", "2026-12-05 09:00", "发合同"),
            ("明天9点发合同", "2026-12-05 09:00", "发合同"),
            ("明天上午9点半 交周报", "2026-12-05 09:30", "交周报"),
            ("明天下午3点 开会", "2026-12-05 15:00", "开会"),
            ("今晚8点 给客户回电话", "2026-12-04 20:00", "给客户回电话"),
            ("明早8点 带钥匙", "2026-12-05 08:00", "带钥匙"),
            ("后天 14:30，交材料", "2026-12-06 14:30", "交材料"),
            ("17:00 下班前检查门窗", "2026-12-04 17:00", "下班前检查门窗"),
            ("9:00 打卡", "2026-12-05 09:00", "打卡"),
            ("周五 17:00 写周报", "2026-12-04 17:00", "写周报"),
            ("周五 9:00 写周报", "2026-12-11 09:00", "写周报"),
            ("下周一 9:00 例会", "2026-12-07 09:00", "例会"),
            ("星期三下午两点 面试", "2026-12-09 14:00", "面试"),
            ("12月24日 10:00 买礼物", "2026-12-24 10:00", "买礼物"),
            ("1月2号 上午十点 续签", "2027-01-02 10:00", "续签"),
            ("2027-03-01 9:00 报税", "2027-03-01 09:00", "报税"),
            ("30分钟后 喝水", "2026-12-04 10:30", "喝水"),
            ("2小时后 看邮件", "2026-12-04 12:00", "看邮件"),
            ("明天 发合同", "2026-12-05 09:00", "发合同"),
            ("中午12点 订餐", "2026-12-04 12:00", "订餐"),
            ("中午1点 订餐", "2026-12-04 13:00", "订餐"),
            ("明天9点10分 开门", "2026-12-05 09:10", "开门"),
            ("明天9点三楼开会", "2026-12-05 09:00", "三楼开会"),
            ("明天下午3点2楼会议室开会", "2026-12-05 15:00", "2楼会议室开会"),
            ("明天9点30开会", "2026-12-05 09:30", "开会"),
            ("明天九点三十 开会", "2026-12-05 09:30", "开会"),
            ("今晚12点 交报告", "2026-12-05 00:00", "交报告"),
            ("明天凌晨12点 重启", "2026-12-05 00:00", "重启"),
            ("3天后 9点 交房租", "2026-12-07 09:00", "交房租"),
            ("3天后 交房租", "2026-12-07 09:00", "交房租"),
        ];
        for (text, when, what) in cases {
            assert_eq!(p(text), (when.to_owned(), what.to_owned()), "{text}");
        }
    }

    #[test]
    fn repeating_times_in_chinese() {
        let cases = [
            ("每天 9:00 打卡", "每天 09:00", "打卡"),
            ("每个工作日 9:00 站会", "每个工作日 09:00", "站会"),
            ("工作日早上9点 看日程", "每个工作日 09:00", "看日程"),
            ("每周五 17:00 写周报", "每周五 17:00", "写周报"),
            ("每周一三五 9:00 晨会", "每周一三五 09:00", "晨会"),
            ("每周一、周三 9:00 晨会", "每周一三 09:00", "晨会"),
            ("每周末 10:00 备份照片", "每周六日 10:00", "备份照片"),
            ("每月1号 10:00 交报销", "每月1日 10:00", "交报销"),
            ("每月三十一日 18:00 对账", "每月31日 18:00", "对账"),
            ("每2小时 喝水", "每 2 小时", "喝水"),
            ("每隔30分钟 起来活动", "每 30 分钟", "起来活动"),
            ("每周一至周五 8:30 打卡", "每周一二三四五 08:30", "打卡"),
            ("每周一到五 8:30 打卡", "每周一二三四五 08:30", "打卡"),
            ("每天晚上12点 备份", "每天 00:00", "备份"),
            ("每3天 9:00 浇花", "每 72 小时", "浇花"),
        ];
        for (text, when, what) in cases {
            assert_eq!(p(text), (when.to_owned(), what.to_owned()), "{text}");
        }
    }

    #[test]
    fn english_times() {
        let cases = [
            ("tomorrow 9:00 send the contract", "2026-12-05 09:00", "send the contract"),
            ("Tomorrow 5pm call back", "2026-12-05 17:00", "call back"),
            ("fri 17:00 weekly report", "2026-12-04 17:00", "weekly report"),
            ("in 30m stretch", "2026-12-04 10:30", "stretch"),
            ("in 2 hours check mail", "2026-12-04 12:00", "check mail"),
            ("daily 9:00 stand-up", "每天 09:00", "stand-up"),
            ("weekdays 9:00 stand-up", "每个工作日 09:00", "stand-up"),
            ("every mon,wed 17:00 review", "每周一三 17:00", "review"),
            ("monthly 15 10:00 invoices", "每月15日 10:00", "invoices"),
            ("every 2h drink water", "每 2 小时", "drink water"),
            ("in 2 days 10:00 renew", "2026-12-06 10:00", "renew"),
            ("12am backup", "2026-12-05 00:00", "backup"),
        ];
        for (text, when, what) in cases {
            assert_eq!(p(text), (when.to_owned(), what.to_owned()), "{text}");
        }
    }

    #[test]
    fn what_is_not_a_time_is_said() {
        let now = t("2026-12-04 10:00");
        let e = |text: &str| parse(text, now, CST).expect_err(text);
        assert_eq!(e("发合同"), WhenError::NoTime);
        assert_eq!(e("3份文件 明天"), WhenError::NoTime);
        assert_eq!(e("明天 9:00"), WhenError::NoText);
        assert_eq!(e("明天 25:00 开会"), WhenError::BadClock);
        assert_eq!(e("2026-02-30 9:00 开会"), WhenError::BadDate);
        assert_eq!(e("13月1日 开会"), WhenError::BadDate);
        assert_eq!(e("每月32号 开会"), WhenError::BadDate);
        assert_eq!(e("今天 8:00 开会"), WhenError::Past);
        assert_eq!(e("2026-12-01 9:00 开会"), WhenError::Past);
        assert_eq!(e("每周 9:00 开会"), WhenError::NoTime);
        assert_eq!(e("every 3 months pay rent"), WhenError::NoTime, "months are not minutes");
    }
}
