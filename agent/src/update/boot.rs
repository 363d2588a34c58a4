//! Is the release this box booted good? Boot counting's judge.
//!
//! A release installed by an update boots with a try counter in its kernel image's name. It is
//! marked good (`systemd-bless-boot`, after `boot-complete.target`) only when
//! `zhuli-boot-check.service`, ordered before that target, succeeds: the agent READY and healthy
//! without a break for a set time. When the agent cannot get there within its time, the check
//! marks the release bad at once and reboots, and the boot loader starts the previous release;
//! a kernel that does not boot at all uses up its tries and gets the same.
//!
//! A box with no configuration yet has no agent to wait for: booting is enough.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What one look at the box found.
#[derive(Debug, Clone)]
pub struct Probe {
    /// `zhuli.service`'s ActiveState (`active` only once it said READY=1).
    pub state: String,
    /// Its Result (`start-limit-hit` once systemd gave up restarting it).
    pub result: String,
    /// How often systemd restarted it since boot.
    pub restarts: u64,
    /// The agent's own answer on its status socket: Ok(hung tasks) or why there was none.
    pub status: Result<Vec<String>, String>,
}

impl Probe {
    /// Why this look is not healthy (a reason code for the chat, and a line), or None when it is.
    pub fn problem(&self) -> Option<(&'static str, String)> {
        if self.state != "active" {
            let code = if self.state == "failed" { "agent_failed" } else { "not_ready" };
            return Some((code, format!("zhuli.service is {} (result {}), not READY", self.state, self.result)));
        }
        match &self.status {
            Err(why) => Some(("no_status", format!("the agent does not answer on its status socket: {why}"))),
            Ok(hung) if !hung.is_empty() => Some(("hang", format!("the agent's tasks {} hang", hung.join(", ")))),
            Ok(_) => None,
        }
    }

    /// No point waiting longer: the agent failed and systemd is not restarting it (a restart on
    /// its way shows as `activating`; `failed` stays until someone starts it again).
    pub fn hopeless(&self) -> bool {
        self.state == "failed"
    }
}

/// The judgement on this boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Healthy without a break for the whole hold time.
    Good,
    /// Not healthy in time: a reason code (see [`Event::code`]) and why, in one line.
    Bad(&'static str, String),
}

/// How long the agent must stay healthy, and how long it has to get there.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub hold: Duration,
    pub within: Duration,
    pub every: Duration,
}

/// Look every `limits.every` (`look` is given the time since the start and sleeps nothing) until
/// the agent has been healthy for `limits.hold` without a break, or `limits.within` has passed.
/// A restart of the agent breaks the streak.
pub fn judge(limits: Limits, mut look: impl FnMut(Duration) -> Probe) -> Verdict {
    let mut at = Duration::ZERO;
    let mut since: Option<Duration> = None;
    let mut restarts: Option<u64> = None;
    let mut last_problem = String::from("the agent was never looked at");
    let mut last_code = "not_ready";
    loop {
        let probe = look(at);
        let restarted = restarts.is_some_and(|r| probe.restarts > r);
        restarts = Some(probe.restarts);
        match probe.problem() {
            Some((code, p)) => {
                since = None;
                last_problem = p;
                last_code = code;
            }
            None if restarted => {
                since = Some(at);
                last_problem = format!("zhuli.service restarted ({} restarts since boot)", probe.restarts);
                last_code = "restarts";
            }
            None => {
                let start = *since.get_or_insert(at);
                if at - start >= limits.hold {
                    return Verdict::Good;
                }
            }
        }
        if probe.hopeless() {
            return Verdict::Bad(
                "agent_failed",
                format!("{last_problem}; systemd is not restarting it ({} restarts)", probe.restarts),
            );
        }
        if at >= limits.within {
            let minutes = limits.within.as_secs().div_ceil(60);
            return Verdict::Bad(
                last_code,
                format!("not healthy for {}s within {minutes} min: {last_problem}", limits.hold.as_secs()),
            );
        }
        at += limits.every;
    }
}

/// Releases the survey finds bad (no tries left) and newer than the running one that were
/// installed and never judged: their kernel image did not start (refused by Secure Boot, or the
/// kernel failed before the system came up), so systemd-boot started the release before, and
/// no boot check ever ran on them. Each is told once: after it, the journal has its `bad`.
pub fn never_started(survey: &super::state::Survey, events: &[Event]) -> Vec<String> {
    let Ok(running) = survey.running.parse::<super::Version>() else { return vec![] };
    survey
        .releases
        .iter()
        .filter(|r| r.state == "bad" && r.version.parse::<super::Version>().is_ok_and(|v| v > running))
        .filter(|r| {
            events
                .iter()
                .rev()
                .find(|e| {
                    (e.version == r.version && matches!(e.what.as_str(), "installed" | "bad" | "good"))
                        || (e.what == "rollback" && e.from == r.version)
                })
                .is_some_and(|e| e.what == "installed")
        })
        .map(|r| r.version.clone())
        .collect()
}

/// One line of the update journal (`/var/lib/zhuli-update/events.jsonl`): what happened to which
/// release, read by the agent to tell the admin chat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Unix milliseconds.
    pub at_ms: i64,
    /// `available`, `installed`, `good`, `bad`, `refused`, `rollback`, `rollback_refused`,
    /// `uptodate`, `failed`, `waiting`.
    pub what: String,
    pub version: String,
    /// Why, for `bad`, `refused` and `failed`: one line for the journal (English).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub why: String,
    /// The reason as a code the chat says in the box's language (`unsigned`, `digest`,
    /// `downgrade`, `not_ready`…); empty when there is none.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub code: String,
    /// For `rollback`: the release the box went back from.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub from: String,
}

/// Where the update journal lives (`/var/lib/zhuli-update/events.jsonl` on the box).
pub fn events_path() -> std::path::PathBuf {
    super::dir().join("events.jsonl")
}

/// Append one event to the update journal (created with its folder when missing), durably.
pub fn record(path: &std::path::Path, event: &Event) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::OpenOptions::new().create(true).append(true).read(true).open(path)?;
    // A line torn by a power cut has no newline: start on a line of our own, or this event
    // would be glued to it and lost with it.
    let torn = {
        use std::io::{Read, Seek, SeekFrom};
        let len = f.seek(SeekFrom::End(0))?;
        let mut last = [b'\n'];
        if len > 0 {
            f.seek(SeekFrom::Start(len - 1))?;
            f.read_exact(&mut last)?;
        }
        last[0] != b'\n'
    };
    let mut line = if torn { String::from("\n") } else { String::new() };
    line.push_str(&serde_json::to_string(event).map_err(std::io::Error::other)?);
    line.push('\n');
    f.write_all(line.as_bytes())?;
    f.sync_all()
}

/// Every event in the update journal, oldest first; lines that do not parse are skipped.
pub fn events(path: &std::path::Path) -> Vec<Event> {
    std::fs::read_to_string(path)
        .map(|t| t.lines().filter_map(|l| serde_json::from_str(l).ok()).collect())
        .unwrap_or_default()
}

/// The release this box runs: `IMAGE_VERSION` in os-release.
pub fn running_version(os_release: &str) -> Option<String> {
    os_release.lines().find_map(|l| l.strip_prefix("IMAGE_VERSION=")).map(|v| v.trim_matches('"').to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_release_that_never_started_is_told_once() {
        use crate::update::state::{Release, Survey};
        let release = |version: &str, state: &str| Release {
            version: version.into(),
            file: format!("zhuli_{version}.efi"),
            state: state.into(),
            tries_left: 0,
            slot_present: true,
            store_schema: None,
        };
        let ev = |what: &str, version: &str| Event {
            at_ms: 0,
            what: what.into(),
            version: version.into(),
            why: String::new(),
            code: String::new(),
            from: String::new(),
        };
        let survey = Survey {
            at_ms: 0,
            running: "1.1.0".into(),
            releases: vec![release("1.2.0", "bad"), release("1.1.0", "kept")],
            available: None,
        };
        let installed = vec![ev("installed", "1.1.0"), ev("good", "1.1.0"), ev("installed", "1.2.0")];
        assert_eq!(never_started(&survey, &installed), vec!["1.2.0".to_owned()]);
        // Judged already (its agent was never READY): nothing more to tell.
        let mut judged = installed.clone();
        judged.push(ev("bad", "1.2.0"));
        assert!(never_started(&survey, &judged).is_empty());
        // Still on trial, or older than the running release: not this case.
        let trial = Survey { releases: vec![release("1.2.0", "trial"), release("1.1.0", "kept")], ..survey.clone() };
        assert!(never_started(&trial, &installed).is_empty());
        let older = Survey { running: "1.3.0".into(), ..survey };
        assert!(never_started(&older, &installed).is_empty());
    }

    const LIMITS: Limits =
        Limits { hold: Duration::from_secs(60), within: Duration::from_secs(300), every: Duration::from_secs(5) };

    fn healthy(restarts: u64) -> Probe {
        Probe { state: "active".into(), result: "success".into(), restarts, status: Ok(vec![]) }
    }

    fn activating() -> Probe {
        Probe { state: "activating".into(), result: "success".into(), restarts: 0, status: Err("no socket".into()) }
    }

    #[test]
    fn healthy_for_the_hold_time_is_good_and_not_sooner() {
        let mut looks = Vec::new();
        let v = judge(LIMITS, |at| {
            looks.push(at);
            if at < Duration::from_secs(20) { activating() } else { healthy(0) }
        });
        assert_eq!(v, Verdict::Good);
        // Healthy from 20 s, so good at 80 s exactly.
        assert_eq!(looks.last(), Some(&Duration::from_secs(80)));
    }

    #[test]
    fn never_ready_is_bad_at_the_deadline_with_the_reason() {
        let mut last = Duration::ZERO;
        let v = judge(LIMITS, |at| {
            last = at;
            activating()
        });
        assert_eq!(last, LIMITS.within);
        let Verdict::Bad(code, why) = v else { panic!("{v:?}") };
        assert_eq!(code, "not_ready");
        assert!(why.contains("activating") && why.contains("not READY"), "{why}");
    }

    #[test]
    fn a_restart_breaks_the_streak() {
        // Healthy, but restarted every 50 s: never 60 s in one go.
        let v = judge(LIMITS, |at| healthy(at.as_secs() / 50));
        let Verdict::Bad(code, why) = v else { panic!("{v:?}") };
        assert_eq!(code, "restarts");
        assert!(why.contains("restarted"), "{why}");
    }

    #[test]
    fn a_hang_is_not_healthy() {
        let v = judge(LIMITS, |_| Probe { status: Ok(vec!["stream".into()]), ..healthy(0) });
        let Verdict::Bad(code, why) = v else { panic!("{v:?}") };
        assert_eq!(code, "hang");
        assert!(why.contains("stream") && why.contains("hang"), "{why}");
    }

    #[test]
    fn gave_up_restarting_is_bad_at_once() {
        let mut looks = 0;
        let v = judge(LIMITS, |_| {
            looks += 1;
            Probe {
                state: "failed".into(),
                result: "start-limit-hit".into(),
                restarts: 5,
                status: Err("refused".into()),
            }
        });
        assert_eq!(looks, 1);
        let Verdict::Bad(code, why) = v else { panic!("{v:?}") };
        assert_eq!(code, "agent_failed");
        assert!(why.contains("not restarting") && why.contains("start-limit-hit"), "{why}");
        // Failed at once, without restarts: the same.
        let v = judge(LIMITS, |_| Probe {
            state: "failed".into(),
            result: "exit-code".into(),
            restarts: 0,
            status: Err("refused".into()),
        });
        assert!(matches!(&v, Verdict::Bad("agent_failed", why) if why.contains("exit-code")), "{v:?}");
        // Restarting (activating) is worth waiting for.
        let mut looks = 0;
        let _ = judge(LIMITS, |_| {
            looks += 1;
            activating()
        });
        assert!(looks > 1);
    }

    #[test]
    fn the_journal_keeps_events_in_order_and_skips_torn_lines() {
        let dir = std::env::temp_dir().join(format!("zhuli-events-{}-{:x}", std::process::id(), rand::random::<u32>()));
        let path = dir.join("update/events.jsonl");
        let e = |what: &str, why: &str| Event {
            at_ms: 1,
            what: what.into(),
            version: "1.2.0".into(),
            why: why.into(),
            code: String::new(),
            from: String::new(),
        };
        record(&path, &e("installed", "")).expect("record");
        // A power cut in the middle of a line leaves half a line, without its newline: it is
        // skipped, and the next event is not glued to it.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, b"{\"at_ms\":"))
            .expect("torn");
        record(&path, &e("bad", "never READY")).expect("record");
        assert_eq!(events(&path), vec![e("installed", ""), e("bad", "never READY")]);
        std::fs::remove_dir_all(&dir).expect("clean");
    }

    #[test]
    fn the_running_version_comes_from_os_release() {
        let text = "PRETTY_NAME=\"Debian GNU/Linux 13 (trixie)\"\nID=debian\nIMAGE_ID=zhuli\nIMAGE_VERSION=1.4.0\n";
        assert_eq!(running_version(text).as_deref(), Some("1.4.0"));
        assert_eq!(running_version("ID=debian\n"), None);
    }
}
