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

pub use super::redact::{Section, journal, redact, remembered, secrets_of};
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
    /// What the firmware says of Secure Boot.
    #[serde(default)]
    pub secure_boot: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ConfigPart {
    pub serial: u64,
    #[serde(deserialize_with = "problems")]
    pub errors: Vec<crate::validate::Problem>,
    #[serde(deserialize_with = "problems")]
    pub examples: Vec<crate::validate::Problem>,
}

/// Problems as this version writes them, or as lines of text (a report of an earlier version,
/// read by the import while the agent still runs it).
fn problems<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<crate::validate::Problem>, D::Error> {
    use crate::validate::Problem;
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        Line(String),
        Problem(Problem),
    }
    Ok(Vec::<Either>::deserialize(d)?
        .into_iter()
        .map(|e| match e {
            Either::Line(line) => Problem::said(line),
            Either::Problem(p) => p,
        })
        .collect())
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Step {
    pub name: String,
    /// `pass`, `warn` or `fail`.
    pub verdict: String,
    pub detail: String,
    /// At a console (English).
    pub fix: Option<String>,
    /// For the admin chat, in the box's language, without a shell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_fix: Option<crate::i18n::Said>,
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
/// status socket (the agent's doctor checks the folders and its version itself).
pub async fn full(config: &Config, socket: &Path, snapshot: Snapshot, doctor_wait: Duration) -> Report {
    let runner = doctor::Runner::Agent { connected: snapshot.connected, frames: snapshot.frames };
    let steps = doctor::run_as(config, socket, doctor_wait, runner).await;
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

/// What can be known without the agent: `config` is the configuration (or why it could not be
/// read), `why` why the agent did not answer, `secrets` the values to take out of log lines.
pub fn without_agent(config: Result<&Config, String>, why: &str, secrets: &[String]) -> Report {
    let section = match config {
        Ok(c) => Section::Found(c),
        Err(e) => Section::Missing(e),
    };
    let mut r = local_parts(section);
    let missing = format!("the agent did not answer ({why}); it makes this part when it runs");
    r.doctor = Section::Missing(missing.clone());
    r.status = Section::Missing(missing);
    r.journal = journal(secrets);
    r.journal_from = "the journal".into();
    r
}

fn local_parts(config: Section<&Config>) -> Report {
    let mut r = Report {
        generated: crate::clock::utc_now(),
        versions: Versions {
            zhuli: env!("CARGO_PKG_VERSION").into(),
            agent: None,
            os: os_release(),
            kernel: nix::sys::utsname::uname()
                .map(|u| format!("{} {}", u.sysname().to_string_lossy(), u.release().to_string_lossy()))
                .unwrap_or_default(),
            previous_kept: crate::update::state::read(&crate::update::state::survey_path())
                .is_some_and(|s| s.previous().is_some()),
            secure_boot: crate::update::state::SecureBoot::read(std::path::Path::new(crate::update::state::EFIVARS))
                .says()
                .into(),
        },
        ..Report::default()
    };
    let mut disks = vec!["/".to_owned(), "/var".to_owned()];
    match config {
        Section::Found(c) => {
            let found = crate::validate::config(c);
            r.configuration =
                Section::Found(ConfigPart { serial: c.serial, errors: found.errors, examples: found.examples });
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
        chat_fix: s.chat_fix.clone(),
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

impl Report {
    /// The report as text, for any laptop's editor (LF line ends; the JSON beside it is
    /// for tools).
    pub fn text(&self) -> String {
        let mut t = format!(
            "zhuli diagnostics\ngenerated: {}\nzhuli {} (running agent: {})\nsystem: {}; kernel {}\nprevious release kept for rollback: {}\nsecure boot: {}\n",
            self.generated,
            self.versions.zhuli,
            self.versions.agent.as_deref().unwrap_or("not answering"),
            self.versions.os,
            self.versions.kernel,
            if self.versions.previous_kept { "yes" } else { "no" },
            if self.versions.secure_boot.is_empty() { "not reported" } else { &self.versions.secure_boot }
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
    fn a_report_of_an_earlier_version_still_reads() {
        let old = r#"{"serial": 3, "errors": ["[llm] model: is empty"], "examples": []}"#;
        let part: ConfigPart = serde_json::from_str(old).expect("lines of text");
        assert_eq!(part.errors[0].field, "[llm] model");
        assert_eq!(part.errors[0].message, "is empty");
        let new = serde_json::to_string(&part).expect("json");
        let again: ConfigPart = serde_json::from_str(&new).expect("problems");
        assert_eq!(again.errors, part.errors);
    }

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
        // Inside Chinese text, with a country code, in groups; keys in URLs.
        let mixed = "用户13812345678发送，+86 138 1234 5678，卡号 6222 0212 3456 7890，GET https://bot:pa55word@oapi.example/x?access_token=abc123&page=2 ok";
        let r = redact(mixed, &[]);
        for gone in ["13812345678", "138 1234", "6222", "pa55word", "abc123"] {
            assert!(!r.contains(gone), "{gone} in {r}");
        }
        assert!(r.contains("用户[number]发送") && r.contains("page=2") && r.contains("access_token=[secret]"), "{r}");
        // Times and ordinary figures stay.
        let times = "2026-12-03 14:00:05 reconnect 3 of 10, 15000 ms";
        assert_eq!(redact(times, &[]), times);
        let jwt = "bearer eyJhbGciOiJIUzI1NiJ9abcdef0123456789 refused";
        assert!(redact(jwt, &[]).contains("[token]"), "{}", redact(jwt, &[]));
    }

    #[test]
    fn every_model_endpoints_key_is_taken_out_of_log_lines() {
        let text = "[dingtalk]\nclient_id = \"dingabc\"\nclient_secret = \"dt-secret-0123\"\nrobot_code = \"dingabc\"\n\
                    [[models]]\nname = \"office\"\nwhere = \"local\"\nbase_url = \"https://gpu.office.lan/v1\"\nmodel = \"q\"\napi_key = \"office-key-Zz81\"\n";
        let config = Config::parse(text, std::path::Path::new("t.toml")).expect("config");
        let secrets = secrets_of(&config);
        assert!(secrets.contains(&"office-key-Zz81".to_owned()), "{secrets:?}");
        assert!(!redact("office model refused office-key-Zz81", &secrets).contains("Zz81"));
    }

    #[test]
    fn a_report_without_the_agent_says_what_is_missing_and_reads_back() {
        let r = without_agent(Err("no configuration imported yet".into()), "no status socket", &[]);
        let text = r.text();
        assert!(text.contains("not read: no configuration imported yet"), "{text}");
        assert!(text.contains("not run: the agent did not answer (no status socket)"), "{text}");
        assert!(text.contains("== disks\n/: "), "{text}");
        let json = serde_json::to_string(&r).expect("json");
        let back: Report = serde_json::from_str(&json).expect("reads back");
        assert_eq!(back.versions.zhuli, env!("CARGO_PKG_VERSION"));
    }
}
