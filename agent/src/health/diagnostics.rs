//! The box's diagnostics report: what an operator would look at with a shell, for a box that
//! has none. Versions, the configuration's problems, `zhuli doctor`'s steps with their fixes,
//! the agent's status, the last day's warnings and errors from the journal (redacted), free
//! space, the last backup. Written to every stick the box is given (a configuration stick, or
//! an empty stick labelled `ZHULI-CFG`) as text and JSON, and said in the admin chat by
//! `/doctor`.
//!
//! The running agent makes the full report (it has the network and its credentials; the import
//! has neither) and hands it over its status socket; without a running agent the import makes
//! what it can itself and says what is missing and why.
//!
//! Redaction: the configuration's secrets, long tokens, Chinese mobile, resident-ID and bank
//! card numbers, e-mail addresses and any quoted text longer than a few words are replaced
//! before a journal line enters the report. The agent's own log lines carry no message bodies
//! or secrets; this is the second line of defence.

use std::{path::Path, time::Duration};

use serde::{Deserialize, Serialize};

use super::{doctor, status::Snapshot};
use crate::config::Config;

/// The report, as written to the stick (`zhuli-diagnostics.json`) and read back.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    /// When it was made (UTC).
    pub generated: String,
    pub versions: Versions,
    /// The current configuration's serial and its problems (errors, then the template's
    /// examples still in it), or why it could not be read.
    pub configuration: Section<ConfigPart>,
    pub doctor: Section<Vec<Step>>,
    pub status: Section<Snapshot>,
    /// Warnings and errors of the agent in the last 24 hours, oldest first, redacted.
    pub journal: Section<Vec<String>>,
    /// Where they come from: the system journal (read by the import, as root), or the agent's
    /// memory since it started (it may not read the journal).
    pub journal_from: String,
    pub disks: Vec<Disk>,
    pub last_backup: Section<Backup>,
}

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

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Versions {
    /// The binary that made the report.
    pub zhuli: String,
    /// The running agent's, when it answered.
    pub agent: Option<String>,
    pub os: String,
    pub kernel: String,
    /// An earlier release is kept to roll back to.
    pub previous_kept: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ConfigPart {
    pub serial: u64,
    pub errors: Vec<String>,
    pub examples: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Step {
    pub name: String,
    /// `pass`, `warn` or `fail`.
    pub verdict: String,
    pub detail: String,
    pub fix: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Disk {
    pub path: String,
    pub free_bytes: u64,
    pub total_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Backup {
    pub path: String,
    pub created_at_ms: u64,
    pub bytes: u64,
}

/// Where the agent keeps the snapshots `/backup now` takes, under its state directory.
pub const BACKUPS: &str = "backups";

/// The full report, made by the running agent: `snapshot` is its own status, `socket` its
/// status socket (the doctor asks it for the folders' check).
pub async fn full(config: &Config, socket: &Path, snapshot: Snapshot, doctor_wait: Duration) -> Report {
    let steps = doctor::run(config, socket, doctor_wait).await;
    let mut r = local_parts(Section::Found(config));
    r.versions.agent = Some(snapshot.version.clone());
    r.doctor = Section::Found(steps.iter().map(step_of).collect());
    r.status = Section::Found(snapshot);
    let secrets = secrets_of(config);
    (r.journal, r.journal_from) = match journal(&secrets) {
        Section::Found(lines) => (Section::Found(lines), "the journal".into()),
        Section::Missing(_) => (Section::Found(remembered(&secrets)), "the agent's memory, since it started".into()),
    };
    r
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

/// What can be known without the agent: `config` is the configuration (or why it could not be
/// read), `why` why the agent did not answer.
pub fn without_agent(config: Result<&Config, String>, why: &str) -> Report {
    let secrets = config.as_ref().map(|c| secrets_of(c)).unwrap_or_default();
    let section = match config {
        Ok(c) => Section::Found(c),
        Err(e) => Section::Missing(e),
    };
    let mut r = local_parts(section);
    let missing = format!("the agent did not answer ({why}); it makes this part when it runs");
    r.doctor = Section::Missing(missing.clone());
    r.status = Section::Missing(missing);
    r.journal = journal(&secrets);
    r.journal_from = "the journal".into();
    r
}

fn local_parts(config: Section<&Config>) -> Report {
    let mut r = Report {
        generated: crate::provision::utc_now(),
        versions: Versions {
            zhuli: env!("CARGO_PKG_VERSION").into(),
            agent: None,
            os: os_release(),
            kernel: nix::sys::utsname::uname()
                .map(|u| format!("{} {}", u.sysname().to_string_lossy(), u.release().to_string_lossy()))
                .unwrap_or_default(),
            previous_kept: Path::new(doctor::PREVIOUS_BINARY).exists(),
        },
        ..Report::default()
    };
    let mut disks = vec!["/".to_owned(), "/var".to_owned()];
    match config {
        Section::Found(c) => {
            let found = crate::validate::config(c);
            r.configuration = Section::Found(ConfigPart {
                serial: c.serial,
                errors: found.errors.iter().map(ToString::to_string).collect(),
                examples: found.examples.iter().map(ToString::to_string).collect(),
            });
            disks.push(c.agent.state_dir.display().to_string());
            r.last_backup = last_backup(&c.agent.state_dir.join(BACKUPS));
        }
        Section::Missing(why) => {
            r.configuration = Section::Missing(why.clone());
            r.last_backup = Section::Missing(why);
        }
    }
    disks.dedup();
    r.disks = disks
        .into_iter()
        .filter_map(|path| {
            let s = nix::sys::statvfs::statvfs(path.as_str()).ok()?;
            let block = s.fragment_size() as u64;
            Some(Disk { path, free_bytes: s.blocks_available() as u64 * block, total_bytes: s.blocks() as u64 * block })
        })
        .collect();
    r
}

fn step_of(s: &doctor::Step) -> Step {
    Step {
        name: s.name.into(),
        verdict: match s.verdict {
            doctor::Verdict::Pass => "pass",
            doctor::Verdict::Warn => "warn",
            doctor::Verdict::Fail => "fail",
        }
        .into(),
        detail: s.detail.clone(),
        fix: s.fix.clone(),
    }
}

fn os_release() -> String {
    let text = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    let field = |name: &str| {
        text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix('=').map(|v| v.trim_matches('"').to_owned()))
    };
    match (field("PRETTY_NAME"), field("IMAGE_VERSION")) {
        (Some(n), Some(v)) => format!("{n} (image {v})"),
        (Some(n), None) => n,
        _ => "unknown".into(),
    }
}

/// The newest snapshot under `dir`, by its manifest (read, not verified: `zhuli backup --verify`
/// does that).
pub fn last_backup(dir: &Path) -> Section<Backup> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Section::Missing(format!(
            "no backup yet (none in {}); send `/备份 now` (/backup now) in the admin chat",
            dir.display()
        ));
    };
    let newest = entries
        .flatten()
        .filter_map(|e| {
            let m: serde_json::Value =
                serde_json::from_slice(&std::fs::read(e.path().join(crate::store::backup::MANIFEST)).ok()?).ok()?;
            Some(Backup {
                path: e.path().display().to_string(),
                created_at_ms: m["created_at_ms"].as_u64()?,
                bytes: m["bytes"].as_u64().unwrap_or(0),
            })
        })
        .max_by_key(|b| b.created_at_ms);
    match newest {
        Some(b) => Section::Found(b),
        None => Section::Missing(format!(
            "no backup yet (none in {}); send `/备份 now` (/backup now) in the admin chat",
            dir.display()
        )),
    }
}

/// The configuration's secret values (long enough to be told apart), to take out of log lines.
pub fn secrets_of(config: &Config) -> Vec<String> {
    let mut out: Vec<String> = [
        Some(&config.dingtalk.client_secret),
        config.llm.as_ref().and_then(|l| l.api_key.as_ref()),
        config.tools.github.token.as_ref(),
        config.tools.drive.password.as_ref(),
        config.tools.caldav.password.as_ref(),
    ]
    .into_iter()
    .flatten()
    .chain(config.tools.mcp.values().flat_map(|p| p.env.values()))
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
    // Word by word: e-mail addresses, long tokens, long digit runs (phone, ID, card numbers).
    let mut out = String::with_capacity(text.len());
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        let digits = word.chars().filter(char::is_ascii_digit).count();
        let token = word.chars().all(|c| c.is_ascii_alphanumeric() || "-_+/=.".contains(c));
        let replaced = if word.contains('@') && word.contains('.') {
            "[email]"
        } else if digits >= 11 && word.chars().all(|c| c.is_ascii_digit() || c == 'X' || c == 'x' || c == '-') {
            "[number]"
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

impl Report {
    /// The report as text, for any laptop's editor (LF line ends; the JSON beside it is
    /// for tools).
    pub fn text(&self) -> String {
        let mut t = format!(
            "zhuli diagnostics\ngenerated: {}\nzhuli {} (running agent: {})\nsystem: {}; kernel {}\nprevious release kept for rollback: {}\n",
            self.generated,
            self.versions.zhuli,
            self.versions.agent.as_deref().unwrap_or("not answering"),
            self.versions.os,
            self.versions.kernel,
            if self.versions.previous_kept { "yes" } else { "no" }
        );
        t.push_str("\n== configuration\n");
        match &self.configuration {
            Section::Found(c) => {
                t.push_str(&format!("serial {}\n", c.serial));
                if c.errors.is_empty() && c.examples.is_empty() {
                    t.push_str("no problems found\n");
                }
                for e in &c.errors {
                    t.push_str(&format!("ERROR {e}\n"));
                }
                for e in &c.examples {
                    t.push_str(&format!("example value {e}\n"));
                }
            }
            Section::Missing(why) => t.push_str(&format!("not read: {why}\n")),
        }
        t.push_str("\n== doctor\n");
        match &self.doctor {
            Section::Found(steps) => {
                for s in steps {
                    t.push_str(&format!("[{}] {}: {}\n", s.verdict.to_uppercase(), s.name, s.detail));
                    if let Some(fix) = &s.fix {
                        t.push_str(&format!("       fix: {fix}\n"));
                    }
                }
            }
            Section::Missing(why) => t.push_str(&format!("not run: {why}\n")),
        }
        t.push_str("\n== status\n");
        match &self.status {
            Section::Found(s) => t.push_str(&super::status::table(s)),
            Section::Missing(why) => t.push_str(&format!("not available: {why}\n")),
        }
        t.push_str(&format!("\n== warnings and errors of the last 24 hours (redacted; from {})\n", self.journal_from));
        match &self.journal {
            Section::Found(lines) if lines.is_empty() => t.push_str("none\n"),
            Section::Found(lines) => lines.iter().for_each(|l| t.push_str(&format!("{l}\n"))),
            Section::Missing(why) => t.push_str(&format!("not available: {why}\n")),
        }
        t.push_str("\n== disks\n");
        for d in &self.disks {
            t.push_str(&format!(
                "{}: {} MiB free of {} MiB\n",
                d.path,
                d.free_bytes / (1024 * 1024),
                d.total_bytes / (1024 * 1024)
            ));
        }
        t.push_str("\n== last backup\n");
        match &self.last_backup {
            Section::Found(b) => {
                let (time, _) = crate::assistant::settings::local_time(b.created_at_ms as i64, 0);
                t.push_str(&format!("{time} UTC, {} bytes, {}\n", b.bytes, b.path));
            }
            Section::Missing(why) => t.push_str(&format!("{why}\n")),
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_takes_out_secrets_people_and_their_words() {
        let secrets = vec!["Qx7-secret-from-console".to_owned()];
        let line = "token refresh failed for Qx7-secret-from-console; user 13812345678 (wang@example.cn) id 11010519491231002X card 6222021234567890123 said \"请把合同发给张总，明天上午之前一定要发出去谢谢你了朋友\" at /srv/share";
        let r = redact(line, &secrets);
        for gone in ["Qx7", "13812345678", "wang@example.cn", "11010519491231002X", "6222021234567890123", "合同"] {
            assert!(!r.contains(gone), "{gone} in {r}");
        }
        for kept in ["token refresh failed", "[secret]", "[number]", "[email]", "\"[text]\"", "/srv/share"] {
            assert!(r.contains(kept), "{kept} missing from {r}");
        }
        // Ordinary words, short quotes, paths and figures are left alone.
        let plain = "stream reconnected after 1200 ms to \"wss://gw\" (attempt 3)";
        assert_eq!(redact(plain, &secrets), plain);
        let jwt = "bearer eyJhbGciOiJIUzI1NiJ9abcdef0123456789 refused";
        assert!(redact(jwt, &[]).contains("[token]"), "{}", redact(jwt, &[]));
    }

    #[test]
    fn a_report_without_the_agent_says_what_is_missing_and_reads_back() {
        let r = without_agent(Err("no configuration imported yet".into()), "no status socket");
        let text = r.text();
        assert!(text.contains("not read: no configuration imported yet"), "{text}");
        assert!(text.contains("not run: the agent did not answer (no status socket)"), "{text}");
        assert!(text.contains("== disks\n/: "), "{text}");
        let json = serde_json::to_string(&r).expect("json");
        let back: Report = serde_json::from_str(&json).expect("reads back");
        assert_eq!(back.versions.zhuli, env!("CARGO_PKG_VERSION"));
    }
}
