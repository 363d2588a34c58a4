//! Detectors for the personal data people type in Chinese offices: resident identity card
//! numbers (18 characters, the last one the check character of GB 11643), mainland mobile
//! numbers, bank card numbers (16 to 19 digits passing the Luhn check) and e-mail addresses.
//!
//! Numbers are found the way people write them: in half- or full-width digits, whole or in
//! groups split by spaces or hyphens (`138 0013 8000`, `6222-0202-…`), next to Chinese text
//! (`身份证号110101199003071237`), with `+86` before a mobile number. A number inside a longer
//! run of digits is not a finding: an order number that happens to contain eleven digits
//! starting with 13 is not a phone.
//!
//! A finding only says "this text is protected"; it is never logged or shown with its value.

use std::ops::Range;

/// What a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    ResidentId,
    Mobile,
    BankCard,
    Email,
}

impl Kind {
    /// The name used in the audit trail and the configuration.
    pub fn name(self) -> &'static str {
        match self {
            Kind::ResidentId => "resident_id",
            Kind::Mobile => "mobile",
            Kind::BankCard => "bank_card",
            Kind::Email => "email",
        }
    }

    pub const ALL: [Kind; 4] = [Kind::ResidentId, Kind::Mobile, Kind::BankCard, Kind::Email];
}

/// One piece of personal data: what it is and where (byte offsets into the text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub kind: Kind,
    pub at: Range<usize>,
}

/// Every finding in `text`, in order of position.
pub fn find_all(text: &str) -> Vec<Finding> {
    let mut out = Vec::new();
    numbers(text, &mut out);
    emails(text, &mut out);
    out.sort_by_key(|f| f.at.start);
    out
}

/// Whether `text` holds any of `kinds`; stops at the first.
pub fn contains_any(text: &str, kinds: &[Kind]) -> Option<Kind> {
    if kinds.is_empty() {
        return None;
    }
    if kinds.contains(&Kind::Email) && text.contains('@') {
        let mut found = Vec::new();
        emails(text, &mut found);
        if !found.is_empty() {
            return Some(Kind::Email);
        }
    }
    if kinds.iter().any(|k| *k != Kind::Email) {
        let mut found = Vec::new();
        numbers(text, &mut found);
        return found.into_iter().map(|f| f.kind).find(|k| kinds.contains(k));
    }
    None
}

/// A digit (half- or full-width) as its value.
fn digit(c: char) -> Option<u8> {
    match c {
        '0'..='9' => Some(c as u8 - b'0'),
        '０'..='９' => Some((c as u32 - '０' as u32) as u8),
        _ => None,
    }
}

fn is_x(c: char) -> bool {
    matches!(c, 'X' | 'x' | 'Ｘ' | 'ｘ')
}

/// A separator people put inside a number: one space or hyphen, half- or full-width.
fn is_separator(c: char) -> bool {
    matches!(c, ' ' | '-' | '\u{3000}' | '－' | '\u{a0}')
}

/// A character after a number that makes it part of a longer token (a letter or digit, or
/// `_`), so the number is not a number on its own. Before a number only a digit does: people
/// write `Tel13800138000` and `ID11010519491231002X`, and JSON text escapes a line break
/// before one as `\n`.
fn glues(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || digit(c).is_some() || matches!(c, 'Ａ'..='Ｚ' | 'ａ'..='ｚ')
}

fn glues_before(c: char) -> bool {
    digit(c).is_some()
}

/// Separators allowed between two groups of one number (`138 - 0013`, two spaces).
const MAX_SEPARATORS: usize = 3;

/// One group of a grouped number: its digits (a final check character X as 10) and where it
/// lies in the text.
struct Group {
    digits: Vec<u8>,
    at: Range<usize>,
}

/// The most groups looked at in one run; a longer run is a table of numbers, and is looked at
/// in windows of this many groups.
const MAX_GROUPS: usize = 8;

fn numbers(text: &str, out: &mut Vec<Finding>) {
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let end_of = |i: usize| chars.get(i).map_or(text.len(), |(at, _)| *at);
    let mut i = 0;
    while i < chars.len() {
        let (_, c) = chars[i];
        let starts = digit(c).is_some() || (c == '+' && chars.get(i + 1).is_some_and(|(_, d)| digit(*d).is_some()));
        if !starts || (i > 0 && glues_before(chars[i - 1].1)) {
            i += 1;
            continue;
        }
        // A run: groups of digits separated by one separator each.
        let mut groups: Vec<Group> = Vec::new();
        let plus_at = (c == '+').then_some(chars[i].0);
        if plus_at.is_some() {
            i += 1;
        }
        let mut ended_by_glue = false;
        loop {
            let start = i;
            let mut digits = Vec::new();
            while let Some(d) = chars.get(i).and_then(|(_, c)| digit(*c)) {
                digits.push(d);
                i += 1;
            }
            if chars.get(i).is_some_and(|(_, c)| is_x(*c)) && !chars.get(i + 1).is_some_and(|(_, c)| glues(*c)) {
                digits.push(10);
                i += 1;
            }
            groups.push(Group { digits, at: chars[start].0..end_of(i) });
            let seps = chars[i..].iter().take(MAX_SEPARATORS + 1).take_while(|(_, c)| is_separator(*c)).count();
            match chars.get(i) {
                Some(_)
                    if (1..=MAX_SEPARATORS).contains(&seps)
                        && chars.get(i + seps).is_some_and(|(_, d)| digit(*d).is_some())
                        && groups.last().is_some_and(|g| g.digits.last() != Some(&10)) =>
                {
                    i += seps;
                }
                Some((_, g)) if glues(*g) => {
                    ended_by_glue = true;
                    break;
                }
                _ => break,
            }
        }
        if ended_by_glue {
            // The run's last group runs into a letter: that group is part of a word, the rest
            // may still be numbers.
            groups.pop();
            while i < chars.len() && glues(chars[i].1) {
                i += 1;
            }
        }
        // The plus sign belongs to the first group, if that group is still there.
        let plus = match (plus_at, groups.first_mut()) {
            (Some(at), Some(first)) if first.at.start == at + 1 => {
                first.at.start = at;
                true
            }
            _ => false,
        };
        judge(&groups, plus, out);
    }
}

/// Looks at every span of whole groups in a run, longest first, and keeps the findings that do
/// not overlap one already kept.
fn judge(groups: &[Group], plus: bool, out: &mut Vec<Finding>) {
    let mut taken = vec![false; groups.len()];
    for len in (1..=groups.len().min(MAX_GROUPS)).rev() {
        for from in 0..=groups.len() - len {
            let span = from..from + len;
            if taken[span.clone()].iter().any(|t| *t) {
                continue;
            }
            let digits: Vec<u8> = groups[span.clone()].iter().flat_map(|g| g.digits.iter().copied()).collect();
            let lens: Vec<usize> = groups[span.clone()].iter().map(|g| g.digits.len()).collect();
            if let Some(kind) = kind_of(&digits, &lens, plus && from == 0) {
                taken[span.clone()].iter_mut().for_each(|t| *t = true);
                out.push(Finding { kind, at: groups[from].at.start..groups[from + len - 1].at.end });
            }
        }
    }
}

/// What `d` is, written in groups of `lens` digits.
fn kind_of(d: &[u8], lens: &[usize], plus: bool) -> Option<Kind> {
    let x_only_last = d.iter().rev().skip(1).all(|v| *v < 10);
    if !x_only_last {
        return None;
    }
    if d.len() == 18 && resident_id(d) {
        return Some(Kind::ResidentId);
    }
    if d.last() == Some(&10) {
        return None;
    }
    let mobile = |m: &[u8]| m.len() == 11 && m[0] == 1 && (3..=9).contains(&m[1]);
    if mobile(d) && !plus {
        return Some(Kind::Mobile);
    }
    if d.len() == 13 && d[..2] == [8, 6] && mobile(&d[2..]) {
        return Some(Kind::Mobile);
    }
    // A card is written whole or in fours (the last group shorter), and starts as card numbers
    // do (3 American Express and JCB, 4 Visa, 5 Mastercard, 6 UnionPay, 9 older domestic cards):
    // two dates side by side or a date-based order number are not cards.
    let in_fours = lens.len() == 1 || lens[..lens.len() - 1].iter().all(|l| *l == 4);
    if !plus && (16..=19).contains(&d.len()) && in_fours && matches!(d[0], 3..=6 | 9) && luhn(d) {
        return Some(Kind::BankCard);
    }
    None
}

/// GB 11643: an address code, a birth date, a sequence number, and a check character over the
/// first seventeen digits with weights 2^(17-i) mod 11.
fn resident_id(d: &[u8]) -> bool {
    const WEIGHTS: [u32; 17] = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
    const CHECK: [u8; 11] = [1, 0, 10, 9, 8, 7, 6, 5, 4, 3, 2];
    if d[..17].iter().any(|v| *v > 9) || d[0] == 0 {
        return false;
    }
    let n = |r: Range<usize>| d[r].iter().fold(0u32, |a, v| a * 10 + u32::from(*v));
    let (year, month, day) = (n(6..10), n(10..12), n(12..14));
    if !(1900..=2099).contains(&year) || !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return false;
    }
    let sum: u32 = d[..17].iter().zip(WEIGHTS).map(|(v, w)| u32::from(*v) * w).sum();
    CHECK[(sum % 11) as usize] == d[17]
}

fn luhn(d: &[u8]) -> bool {
    let sum: u32 = d
        .iter()
        .rev()
        .enumerate()
        .map(|(i, v)| {
            let v = u32::from(*v);
            if i % 2 == 1 { if v * 2 > 9 { v * 2 - 9 } else { v * 2 } } else { v }
        })
        .sum();
    sum.is_multiple_of(10)
}

fn emails(text: &str, out: &mut Vec<Finding>) {
    let bytes = text.as_bytes();
    let local = |b: u8| b.is_ascii_alphanumeric() || b"._%+-".contains(&b);
    let domain = |b: u8| b.is_ascii_alphanumeric() || b == b'.' || b == b'-';
    let mut last_end = 0;
    for at in memchr::memchr_iter(b'@', bytes) {
        if at < last_end {
            continue;
        }
        let mut start = at;
        while start > last_end && local(bytes[start - 1]) {
            start -= 1;
        }
        while start < at && bytes[start] == b'.' {
            start += 1;
        }
        let mut end = at + 1;
        while end < bytes.len() && domain(bytes[end]) {
            end += 1;
        }
        while end > at + 1 && matches!(bytes[end - 1], b'.' | b'-') {
            end -= 1;
        }
        let host = &text[at + 1..end];
        let labels: Vec<&str> = host.split('.').collect();
        let tld = labels.last().copied().unwrap_or("");
        // A file name at a scale (`logo@2x.png`) and the SSH user of a code host are not
        // somebody's address.
        let not_mail = matches!(
            tld.to_ascii_lowercase().as_str(),
            "png" | "jpg" | "jpeg" | "gif" | "webp" | "svg" | "bmp" | "ico"
        ) || &text[start..at] == "git";
        let good = start < at
            && !not_mail
            && labels.len() >= 2
            && labels.iter().all(|l| !l.is_empty() && !l.starts_with('-') && !l.ends_with('-'))
            && tld.len() >= 2
            && tld.bytes().all(|b| b.is_ascii_alphabetic());
        if good {
            out.push(Finding { kind: Kind::Email, at: start..end });
            last_end = end;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Makes a resident id number valid by computing its check character.
    fn with_check(first17: &str) -> String {
        const WEIGHTS: [u32; 17] = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
        let sum: u32 = first17.bytes().zip(WEIGHTS).map(|(b, w)| u32::from(b - b'0') * w).sum();
        let check = b"10X98765432"[(sum % 11) as usize] as char;
        format!("{first17}{check}")
    }

    fn kinds(text: &str) -> Vec<(Kind, &str)> {
        find_all(text).into_iter().map(|f| (f.kind, &text[f.at])).collect()
    }

    #[test]
    fn resident_id_numbers_need_their_check_character_and_a_birth_date() {
        // 11010519491231002X is the standard's own example.
        assert_eq!(kinds("身份证号11010519491231002X，请核对"), vec![(Kind::ResidentId, "11010519491231002X")]);
        assert_eq!(kinds("id 11010519491231002x."), vec![(Kind::ResidentId, "11010519491231002x")]);
        let good = with_check("44030619850612341");
        assert_eq!(kinds(&format!("号码：{good}")), vec![(Kind::ResidentId, good.as_str())]);
        // Written in groups of 6-8-4.
        let grouped = format!("{} {} {}", &good[..6], &good[6..14], &good[14..]);
        assert_eq!(kinds(&grouped), vec![(Kind::ResidentId, grouped.as_str())]);
        // Full-width digits.
        let wide: String =
            good.chars()
                .map(|c| {
                    if c.is_ascii_digit() {
                        char::from_u32(c as u32 - '0' as u32 + '０' as u32).unwrap_or(c)
                    } else {
                        c
                    }
                })
                .collect();
        assert_eq!(kinds(&wide), vec![(Kind::ResidentId, wide.as_str())]);

        // One wrong check character, a month 13, a number inside a longer one: none.
        // (Eighteen digits may still pass Luhn and count as a bank card: on the safe side.)
        for check in "0123456789X".chars().filter(|c| !good.ends_with(*c)) {
            let wrong = format!("{}{check}", &good[..17]);
            assert!(!kinds(&wrong).iter().any(|(k, _)| *k == Kind::ResidentId), "{wrong}");
        }
        assert!(kinds(&with_check("44030619851312341")).is_empty());
        assert!(kinds(&with_check("44030618850612341")).is_empty(), "born in 1885");
        assert!(!kinds(&format!("{good}7")).iter().any(|(k, _)| *k == Kind::ResidentId));
        assert_eq!(kinds(&format!("ID{good}")), vec![(Kind::ResidentId, good.as_str())], "letters before it");
        assert!(kinds(&format!("{good}ABC")).is_empty(), "letters after it");
    }

    #[test]
    fn mobile_numbers_as_people_write_them() {
        for text in
            ["13800138000", "138 0013 8000", "138-0013-8000", "+86 138 0013 8000", "+8613800138000", "8613800138000"]
        {
            assert_eq!(kinds(&format!("电话{text}。")), vec![(Kind::Mobile, text)], "{text}");
        }
        // Two numbers on one line, separated by a space: both.
        assert_eq!(
            kinds("13800138000 19912345678"),
            vec![(Kind::Mobile, "13800138000"), (Kind::Mobile, "19912345678")]
        );
        // Not mobile numbers: a second digit of 2, ten digits, a longer number, a landline.
        // Letters before it, a JSON-escaped line break, two spaces or " - " between its groups.
        for (text, number) in [
            ("Tel13800138000", "13800138000"),
            ("张三\\n13800138000\\n", "13800138000"),
            ("138  0013  8000", "138  0013  8000"),
            ("138 - 0013 - 8000", "138 - 0013 - 8000"),
        ] {
            assert_eq!(kinds(text), vec![(Kind::Mobile, number)], "{text}");
        }
        for text in ["12800138000", "1380013800", "138001380001", "010-62345678", "13800138000v"] {
            assert!(kinds(text).is_empty(), "{text}: {:?}", kinds(text));
        }
    }

    #[test]
    fn bank_cards_pass_luhn() {
        // 6222020200000000002 is not Luhn-valid; 6222020200000000006 is (19 digits).
        assert_eq!(kinds("卡号 6222 0202 0000 0000 006"), vec![(Kind::BankCard, "6222 0202 0000 0000 006")]);
        assert_eq!(kinds("4111111111111111"), vec![(Kind::BankCard, "4111111111111111")]);
        assert!(kinds("6222020200000000002").is_empty());
        assert!(kinds("4111111111111112").is_empty());
        // Fifteen digits: not a card here.
        assert!(kinds("411111111111116").is_empty());
        // Two dates side by side, a date-based order number, digits in threes: not cards, even
        // where the digits pass Luhn (20241201 20241207 and 2024120100000003 do).
        assert!(luhn(&[2, 0, 2, 4, 1, 2, 0, 1, 2, 0, 2, 4, 1, 2, 0, 7]));
        assert!(luhn(&[2, 0, 2, 4, 1, 2, 0, 1, 0, 0, 0, 0, 0, 0, 0, 3]));
        for text in ["2024-12-01 2024-12-07", "订单 2024120100000003", "411 111 111 111 1111"] {
            assert!(kinds(text).is_empty(), "{text}: {:?}", kinds(text));
        }
    }

    #[test]
    fn e_mail_addresses() {
        assert_eq!(kinds("发给 zhang.san@example.com.cn，谢谢"), vec![(Kind::Email, "zhang.san@example.com.cn")]);
        assert_eq!(kinds("<li+hr@corp-mail.cn>"), vec![(Kind::Email, "li+hr@corp-mail.cn")]);
        for text in [
            "@everyone",
            "a@b",
            "user@localhost",
            "x@1.2",
            "邮件@公司.中国",
            "logo@2x.png",
            "git@github.com:acme/site.git",
        ] {
            assert!(kinds(text).is_empty(), "{text}: {:?}", kinds(text));
        }
    }

    #[test]
    fn ordinary_text_and_numbers_are_not_findings() {
        for text in [
            "明天下午3点开会，会议室 302，预计 45 分钟。",
            "订单号 2024120300001，金额 12,345.67 元",
            "version 1.2.3-rc1, commit 9f3a2b1",
            "2024-12-03 14:00 至 2024-12-03 15:30",
            "",
        ] {
            assert!(find_all(text).is_empty(), "{text}: {:?}", kinds(text));
        }
    }

    #[test]
    fn contains_any_looks_only_for_the_kinds_asked() {
        let text = "电话 13800138000，邮箱 a.b@example.com";
        assert_eq!(contains_any(text, &[Kind::Email]), Some(Kind::Email));
        assert_eq!(contains_any(text, &[Kind::Mobile]), Some(Kind::Mobile));
        assert_eq!(contains_any(text, &[Kind::BankCard, Kind::ResidentId]), None);
        assert_eq!(contains_any(text, &[]), None);
    }
}
