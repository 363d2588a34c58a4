//! What of the box's logs may leave it, and how: the configuration's secrets, long tokens,
//! Chinese mobile, resident-ID and bank card numbers, e-mail addresses and any quoted text
//! longer than a few words are replaced before a line enters a report or the admin chat. The
//! agent's own log lines carry no message bodies or secrets; this is the second line of
//! defence. Also the journal's and the agent's own remembered warnings, redacted, and
//! `Section`, a part of a report or why it is missing. A leaf: `doctor` and `diagnostics`
//! both use it.

use serde::{Deserialize, Serialize};

use crate::config::Config;

/// A part of the report, or why it is missing.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Section<T> {
    Found(T),
    Missing(String),
}

impl<T> Default for Section<T> {
    fn default() -> Self {
        Section::Missing("not collected".into())
    }
}

/// The warnings and errors this process logged, redacted (for `/logs`).
pub fn remembered(secrets: &[String]) -> Vec<String> {
    crate::logging::recent()
        .into_iter()
        .map(|l| {
            let (time, _) = crate::assistant::settings::local_time(l.at_ms, 0);
            format!("{time} UTC {}: {}", if l.error { "error" } else { "warning" }, redact(&l.text, secrets))
        })
        .collect()
}

/// The configuration's secret values (long enough to be told apart), to take out of log lines.
pub fn secrets_of(config: &Config) -> Vec<String> {
    let mut out: Vec<String> = [
        Some(&config.dingtalk.client_secret),
        config.llm.as_ref().and_then(|l| l.api_key.as_ref()),
        config.tools.github.token.as_ref(),
        config.tools.drive.password.as_ref(),
        config.tools.caldav.password.as_ref(),
        config.backup.password.as_ref(),
    ]
    .into_iter()
    .flatten()
    .chain(config.tools.mcp.values().flat_map(|p| p.env.values()))
    .chain(config.models.iter().filter_map(|m| m.api_key.as_ref()))
    .map(|s| s.expose().to_owned())
    .filter(|s| s.len() >= 6)
    .collect();
    out.sort_by_key(|s| std::cmp::Reverse(s.len()));
    out
}

/// The agent's warnings and errors of the last 24 hours, redacted; at most the last 200.
pub fn journal(secrets: &[String]) -> Section<Vec<String>> {
    let out = std::process::Command::new("journalctl")
        .args([
            "-u",
            "zhuli.service",
            "-p",
            "warning",
            "--since",
            "-24h",
            "-n",
            "200",
            "-o",
            "json",
            "--no-pager",
            "-q",
        ])
        .output();
    match out {
        Err(e) => Section::Missing(format!("journalctl cannot run here ({e})")),
        Ok(o) if !o.status.success() => Section::Missing(format!(
            "journalctl failed: {}",
            redact(String::from_utf8_lossy(&o.stderr).trim(), secrets)
        )),
        Ok(o) => Section::Found(
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .map(|v| {
                    let us: i64 = v["__REALTIME_TIMESTAMP"].as_str().and_then(|t| t.parse().ok()).unwrap_or(0);
                    let level = match v["PRIORITY"].as_str() {
                        Some("0" | "1" | "2" | "3") => "error",
                        _ => "warning",
                    };
                    let message = v["MESSAGE"].as_str().unwrap_or("(not text)");
                    let (time, _) = crate::assistant::settings::local_time(us / 1000, 0);
                    format!("{time} UTC {level}: {}", redact(message, secrets))
                })
                .collect(),
        ),
    }
}

/// `line` with secrets and personal data taken out (see the module's note).
pub fn redact(line: &str, secrets: &[String]) -> String {
    let mut text = line.to_owned();
    for s in secrets {
        text = text.replace(s.as_str(), "[secret]");
    }
    // Quoted text of more than a few words may be someone's message.
    for (open, close) in [('"', '"'), ('“', '”'), ('「', '」')] {
        let mut out = String::new();
        let mut rest = text.as_str();
        while let Some(start) = rest.find(open) {
            let after = &rest[start + open.len_utf8()..];
            match after.find(close) {
                Some(end) if after[..end].chars().count() > 24 => {
                    out.push_str(&rest[..start]);
                    out.push(open);
                    out.push_str("[text]");
                    out.push(close);
                    rest = &after[end + close.len_utf8()..];
                }
                _ => {
                    out.push_str(&rest[..start + open.len_utf8()]);
                    rest = after;
                }
            }
        }
        out.push_str(rest);
        text = out;
    }
    let text = numbers_out(&url_secrets_out(&text));
    // Word by word: e-mail addresses, long tokens.
    let mut out = String::with_capacity(text.len());
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        let digits = word.chars().filter(char::is_ascii_digit).count();
        let token = word.chars().all(|c| c.is_ascii_alphanumeric() || "-_+/=.".contains(c));
        let email = !word.contains("://")
            && word
                .split_once('@')
                .is_some_and(|(user, host)| !user.is_empty() && !user.contains(']') && host.contains('.'));
        let replaced = if email {
            "[email]"
        } else if token && word.len() >= 24 && digits > 0 && word.chars().any(|c| c.is_ascii_alphabetic()) {
            "[token]"
        } else {
            word.as_str()
        };
        out.push_str(replaced);
        word.clear();
    };
    for c in text.chars() {
        if c.is_whitespace() || ",;()[]{}<>'\"`：，。".contains(c) {
            flush(&mut word, &mut out);
            out.push(c);
        } else {
            word.push(c);
        }
    }
    flush(&mut word, &mut out);
    out
}

/// A URL's password (`//user:pass@`) and the values of query parameters that carry keys.
fn url_secrets_out(text: &str) -> String {
    let mut out = text.to_owned();
    // `scheme://user:password@host`
    let mut from = 0;
    while let Some(at) = out[from..].find("://").map(|i| from + i + 3) {
        let end = out[at..].find(|c: char| c.is_whitespace() || "/\"'".contains(c)).map_or(out.len(), |e| at + e);
        if let Some(amp) = out[at..end].rfind('@') {
            out.replace_range(at..at + amp, "[secret]");
            from = at + "[secret]".len();
        } else {
            from = end;
        }
    }
    // `?access_token=…&sign=…`
    const KEYS: [&str; 8] = ["token", "key", "secret", "password", "sign", "signature", "code", "ticket"];
    let mut result = String::with_capacity(out.len());
    let mut rest = out.as_str();
    while let Some(eq) = rest.find('=') {
        let name_start =
            rest[..eq].rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-')).map_or(0, |i| i + 1);
        let name = rest[name_start..eq].to_ascii_lowercase();
        let value_end =
            rest[eq + 1..].find(|c: char| c == '&' || c.is_whitespace() || c == '"').map_or(rest.len(), |e| eq + 1 + e);
        result.push_str(&rest[..=eq]);
        if KEYS.iter().any(|k| name.ends_with(k)) && value_end > eq + 1 {
            result.push_str("[secret]");
        } else {
            result.push_str(&rest[eq + 1..value_end]);
        }
        rest = &rest[value_end..];
    }
    result.push_str(rest);
    result
}

/// Runs of 11 or more digits — phone numbers (`+86 138 1234 5678`), resident ID numbers (with
/// their final `X`), bank cards (`6222 0212 3456 7890`) — wherever they stand, even inside
/// Chinese text.
fn numbers_out(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        let starts =
            chars[i].is_ascii_digit() || (chars[i] == '+' && chars.get(i + 1).is_some_and(char::is_ascii_digit));
        if !starts {
            out.push(chars[i]);
            i += 1;
            continue;
        }
        // Digits, with single spaces or hyphens between groups.
        let (mut j, mut digits, mut last_digit) = (i + usize::from(chars[i] == '+'), 0, i);
        while j < chars.len() {
            if chars[j].is_ascii_digit() {
                digits += 1;
                last_digit = j;
                j += 1;
            } else if (chars[j] == ' ' || chars[j] == '-') && chars.get(j + 1).is_some_and(char::is_ascii_digit) {
                j += 1;
            } else {
                break;
            }
        }
        let mut end = last_digit + 1;
        if digits >= 17 && chars.get(end).is_some_and(|c| *c == 'X' || *c == 'x') {
            end += 1;
        }
        if digits >= 11 {
            out.push_str("[number]");
        } else {
            out.extend(&chars[i..end]);
        }
        i = end;
    }
    out
}
