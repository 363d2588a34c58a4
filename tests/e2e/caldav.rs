//! The caldav tools end to end against a real CalDAV server: Radicale (Debian package
//! radicale) on loopback with an htpasswd account, its calendars seeded and inspected in its
//! storage folder. The real agent, the DingTalk simulator and the scripted model drive it.

use std::path::{Path, PathBuf};

use serde_json::json;
use zhuli::{audit::Kind, tools::when};
use zhuli_sim::{
    dingtalk::{Inject, Simulator},
    llm::{LlmSim, Scripted},
};

use zhuli_sim::local_server::LocalServer;

use crate::support::{self, Agent, Journal, Server, calls};

const PASSWORD: &str = "caldav-pw-Wm41sP";
const SH: i32 = 480;

struct Rig {
    sim: Simulator,
    llm: LlmSim,
    agent: Agent,
    journal: Journal,
    _radicale: Server,
    store: PathBuf,
    scratch: PathBuf,
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.scratch);
    }
}

/// Local midnight of the next weekday at least `ahead` days away.
fn weekday(ahead: i64) -> i64 {
    let (_, today) = when::minute_of_day(zhuli::clock::now_ms(), SH);
    let d = (today + ahead..).find(|d| when::weekday(*d) < 5).expect("a weekday");
    when::day_start_ms(d, SH)
}

/// Local midnight of the first weekday after the one at `day` (on a Thursday, `weekday(2)` and
/// `weekday(3)` are both Monday).
fn weekday_after(day: i64) -> i64 {
    let (_, d) = when::minute_of_day(day, SH);
    let d = (d + 1..).find(|d| when::weekday(*d) < 5).expect("a weekday");
    when::day_start_ms(d, SH)
}

fn at(day: i64, hh: i64, mm: i64) -> i64 {
    day + (hh * 60 + mm) * 60_000
}

fn ics_local(ms: i64) -> String {
    let s = when::rfc3339(ms, SH);
    format!("{}{}{}T{}{}00", &s[0..4], &s[5..7], &s[8..10], &s[11..13], &s[14..16])
}

fn object(uid: &str, body: &str) -> String {
    format!(
        "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//test//EN\r\nBEGIN:VEVENT\r\nUID:{uid}\r\nDTSTAMP:20261101T000000Z\r\n{body}END:VEVENT\r\nEND:VCALENDAR\r\n"
    )
}

fn calendar(store: &Path, name: &str, objects: &[(&str, String)]) {
    let dir = store.join("collection-root/zhuli").join(name);
    std::fs::create_dir_all(&dir).expect("calendar folder");
    std::fs::write(
        dir.join(".Radicale.props"),
        r#"{"tag": "VCALENDAR", "C:supported-calendar-component-set": "VEVENT"}"#,
    )
    .expect("props");
    for (file, text) in objects {
        std::fs::write(dir.join(file), text).expect("event");
    }
}

/// The objects of a calendar in Radicale's storage, by file name.
fn stored(store: &Path, name: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = std::fs::read_dir(store.join("collection-root/zhuli").join(name))
        .expect("calendar folder")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".ics"))
        .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read_to_string(e.path()).expect("read")))
        .collect();
    out.sort();
    out
}

async fn rig(tag: &str, password: &str) -> Rig {
    let scratch = support::temp_dir(&format!("{tag}-caldav"));
    let store = scratch.join("radicale");
    let day = weekday(2);
    let next = weekday_after(day);
    let tz = "DTSTART;TZID=Asia/Shanghai";
    calendar(
        &store,
        "team",
        &[
            (
                "review.ics",
                object(
                    "review",
                    &format!(
                        "SUMMARY:Design review\r\nLOCATION:Room 3\r\n{tz}:{}\r\nDURATION:PT1H\r\n",
                        ics_local(at(day, 10, 0))
                    ),
                ),
            ),
            (
                "standup.ics",
                object(
                    "standup",
                    &format!(
                        "SUMMARY:Standup\r\n{tz}:{}\r\nDTEND;TZID=Asia/Shanghai:{}\r\nRRULE:FREQ=WEEKLY;BYDAY=MO,TU,WE,TH,FR\r\n",
                        ics_local(at(day - 28 * 86_400_000, 9, 30)),
                        ics_local(at(day - 28 * 86_400_000, 9, 45))
                    ),
                ),
            ),
            (
                "tokyo.ics",
                object(
                    "tokyo",
                    &format!(
                        "SUMMARY:Call with Tokyo\r\nDTSTART;TZID=Asia/Tokyo:{}\r\nDTEND;TZID=Asia/Tokyo:{}\r\n",
                        ics_local(at(day, 15, 0)),
                        ics_local(at(day, 16, 0))
                    ),
                ),
            ),
            (
                "later.ics",
                object(
                    "later",
                    &format!("SUMMARY:Not that day\r\n{tz}:{}\r\nDURATION:PT1H\r\n", ics_local(at(next, 11, 0))),
                ),
            ),
        ],
    );
    calendar(
        &store,
        "lilei",
        &[(
            "dentist.ics",
            object("dentist", &format!("SUMMARY:Dentist\r\n{tz}:{}\r\nDURATION:PT2H\r\n", ics_local(at(day, 13, 0)))),
        )],
    );
    std::fs::write(scratch.join("users"), format!("zhuli:{PASSWORD}\n")).expect("htpasswd");
    let radicale = Server::new(LocalServer::radicale(&store, Some(&scratch.join("users"))));
    let journal = Journal::start(&scratch);
    let sim = Simulator::start(support::sim_config()).await.expect("simulator");
    let llm = LlmSim::start().await.expect("llm sim");
    let base = format!("http://{}/zhuli", radicale.addr());
    let config = format!(
        "{}[assistant]\nutc_offset_minutes = 480\n[tools.caldav]\nusername = \"zhuli\"\npassword = {password:?}\ndefault_calendar = \"team\"\n\
         [tools.caldav.calendars]\nteam = \"{base}/team/\"\nlilei = \"{base}/lilei/\"\n[tools.caldav.personal]\nlilei = \"lilei\"\n",
        support::assistant_config(&llm, &["caldav"], &journal),
    );
    let agent = support::connected_agent(tag, &sim, &config).await;
    Rig { sim, llm, agent, journal, _radicale: radicale, store, scratch }
}

impl Rig {
    async fn ask(&self, text: &str) -> String {
        support::ask(&self.sim, &self.agent, Inject::text(text).from("hanmei")).await
    }

    async fn call(&self, tool: &str, args: serde_json::Value) -> String {
        support::call_tool(&self.sim, &self.llm, &self.agent, tool, args).await
    }

    /// A write call, asked and confirmed: the question and the tool's result.
    async fn confirmed(&self, tool: &str, args: serde_json::Value) -> (String, String) {
        support::confirmed_call(&self.sim, &self.llm, &self.agent, tool, args).await
    }
}

fn t(ms: i64) -> String {
    when::rfc3339(ms, SH)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_expand_repeats_and_free_slots_span_calendars() {
    let rig = rig("caldav-read", PASSWORD).await;
    let day = weekday(2);
    let listed = rig.call("caldav_list", json!({"from": t(day), "to": t(day + 86_400_000)})).await;
    let d = &when::local(day, SH)[..10];
    assert!(listed.starts_with("3 events in team"), "{listed}");
    assert!(listed.contains(&format!("- {d} 09:30 – 09:45 Standup (repeats) [id standup.ics]")), "{listed}");
    assert!(listed.contains(&format!("- {d} 10:00 – 11:00 Design review @ Room 3 [id review.ics]")), "{listed}");
    assert!(listed.contains(&format!("- {d} 14:00 – 15:00 Call with Tokyo")), "Tokyo's 15:00 is 14:00 here: {listed}");
    assert!(!listed.contains("Not that day") && !listed.contains("Dentist"), "{listed}");

    // Li Lei's own calendar: busy times for everyone, its events for him only.
    let refused =
        rig.call("caldav_list", json!({"calendar": "lilei", "from": t(day), "to": t(day + 86_400_000)})).await;
    assert!(refused.contains("only its owner can see"), "{refused}");
    let free = rig
        .call(
            "caldav_free",
            json!({"calendars": ["team", "lilei"], "from": t(day), "to": t(day + 86_400_000), "minutes": 60}),
        )
        .await;
    let windows: Vec<&str> = free.lines().filter(|l| l.starts_with("- ")).collect();
    assert_eq!(
        windows,
        [format!("- {d} 11:00 – 13:00 (120 min)").as_str(), format!("- {d} 15:00 – 18:00 (180 min)").as_str(),],
        "09:00–09:30 and 09:45–10:00 are too short; Li Lei's dentist and the Tokyo call fill 13:00–15:00: {free}"
    );
    assert!(!free.contains("Dentist"), "free/busy only: {free}");
    rig.journal.expect(1, Kind::ToolExecuted, &[("TOOL", "caldav_free"), ("ACTOR", "hanmei")]);
    assert!(!rig.agent.log().contains(PASSWORD));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_move_cancel_each_confirmed_and_undone() {
    let rig = rig("caldav-write", PASSWORD).await;
    let day = weekday(2);
    let (question, made) = rig
        .confirmed("caldav_create", json!({"title": "Budget, Q3; final", "start": t(at(day, 16, 0)), "end": t(at(day, 16, 30)), "location": "Room 1"}))
        .await;
    assert!(question.contains("在 team 中新建“Budget, Q3; final”"), "{question}");
    let id: String = made.split("[id ").nth(1).expect("id").trim_end_matches(']').to_owned();
    let objects = stored(&rig.store, "team");
    let (_, text) = objects.iter().find(|(f, _)| *f == id).unwrap_or_else(|| panic!("{id} stored: {objects:?}"));
    assert!(text.contains("SUMMARY:Budget\\, Q3\\; final"), "{text}");
    assert!(text.contains(&format!("DTSTART;TZID=Asia/Shanghai:{}", ics_local(at(day, 16, 0)))), "{text}");
    assert!(text.contains("BEGIN:VTIMEZONE"), "{text}");
    let listed = rig.call("caldav_list", json!({"from": t(day), "to": t(day + 86_400_000)})).await;
    assert!(listed.contains("16:00 – 16:30 Budget, Q3; final @ Room 1"), "{listed}");

    let (question, moved) = rig
        .confirmed(
            "caldav_move",
            json!({"event_id": "review.ics", "start": t(at(day, 17, 0)), "end": t(at(day, 18, 0))}),
        )
        .await;
    assert!(
        question.contains("把 team 中的“Design review”改到 ") && question.contains(" 17:00 – 18:00 (UTC+8)"),
        "{question}"
    );
    assert!(moved.contains("moved “Design review”"), "{moved}");
    let review = || stored(&rig.store, "team").into_iter().find(|(f, _)| f == "review.ics").map(|(_, t)| t);
    let after = review().expect("review");
    assert!(
        after.contains(&ics_local(at(day, 17, 0))) && after.contains("SEQUENCE:1") && !after.contains("DURATION"),
        "{after}"
    );
    let undone = rig.ask("/undo").await;
    assert!(undone.contains("把 team 中的日程改回了 ") && undone.contains(" 10:00 – "), "{undone}");
    assert!(review().expect("review").contains(&ics_local(at(day, 10, 0))));

    let repeats = rig
        .call("caldav_move", json!({"event_id": "standup.ics", "start": t(at(day, 8, 0)), "end": t(at(day, 8, 15))}))
        .await;
    assert!(repeats.contains("this event repeats"), "{repeats}");

    let (question, _) = rig.confirmed("caldav_cancel", json!({"event_id": "standup.ics"})).await;
    assert!(question.contains("取消 team 中的“Standup”（包括所有重复的日期）"), "{question}");
    let before: Vec<String> = stored(&rig.store, "team").into_iter().map(|(f, _)| f).collect();
    assert!(!before.contains(&"standup.ics".to_owned()), "{before:?}");
    assert!(rig.ask("/undo").await.contains("把日程放回了 team"));
    let back = stored(&rig.store, "team").into_iter().find(|(f, _)| f == "standup.ics").expect("standup back");
    assert!(back.1.contains("UID:standup") && back.1.contains("RRULE:FREQ=WEEKLY"), "{back:?}");

    // The created event changed elsewhere meanwhile: its undo does not delete the new version.
    let path = rig.store.join("collection-root/zhuli/team").join(&id);
    let edited = std::fs::read_to_string(&path).expect("created").replace("LOCATION:Room 1", "LOCATION:Room 2");
    std::fs::write(&path, edited).expect("edit elsewhere");
    let undo = rig.ask("/undo").await;
    assert!(undo.contains("changed meanwhile"), "{undo}");
    assert!(path.exists(), "the edited event stays");

    for e in rig.journal.all() {
        assert!(
            e.iter().all(|(_, v)| !v.contains("Budget") && !v.contains("Standup")),
            "a title reached the audit trail: {e:?}"
        );
    }
    rig.journal.expect(3, Kind::ToolConfirmed, &[("ACTOR", "hanmei")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_times_unknown_calendars_and_a_wrong_password_get_clear_answers() {
    let rig = rig("caldav-bad", PASSWORD).await;
    let day = weekday(2);
    // Yesterday, whatever weekday today is (three days before `day` is tomorrow on a Thursday).
    let (_, today) = when::minute_of_day(zhuli::clock::now_ms(), SH);
    let yesterday = when::day_start_ms(today - 1, SH);
    for (args, expect) in [
        (json!({"title": "x", "start": t(at(yesterday, 10, 0)), "end": t(at(yesterday, 11, 0))}), "is in the past"),
        (json!({"title": "x", "start": t(at(day, 11, 0)), "end": t(at(day, 10, 0))}), "must come after"),
        (json!({"title": "x", "start": "next friday", "end": t(at(day, 10, 0))}), "is not a time"),
        (
            json!({"title": "x", "calendar": "lilei", "start": t(at(day, 10, 0)), "end": t(at(day, 11, 0))}),
            "only its owner",
        ),
    ] {
        let r = rig.call("caldav_create", args).await;
        assert!(r.contains(expect), "{expect}: {r}");
    }
    let unknown = rig.call("caldav_cancel", json!({"event_id": "../lilei/dentist.ics"})).await;
    assert!(unknown.contains("is not an event id"), "{unknown}");
    let gone = rig.call("caldav_cancel", json!({"event_id": "nope.ics"})).await;
    assert!(gone.contains("does not exist"), "{gone}");
    assert_eq!(stored(&rig.store, "team").len(), 4, "nothing changed");
    assert_eq!(rig.journal.find(Kind::ToolConfirmed, &[]).len(), 0, "nothing was asked");
    drop(rig);

    let rig = self::rig("caldav-badpw", "wrong-password").await;
    rig.llm.push(calls(&[("caldav_list", json!({"from": t(day), "to": t(day + 86_400_000)}))]));
    rig.llm.push(Scripted::Text("I cannot read the calendar.".into()));
    let answer = rig.ask("what's on the team calendar?").await;
    assert!(answer.contains("[tools.caldav] username and password"), "{answer}");
    assert!(!rig.agent.log().contains("wrong-password"));
}
