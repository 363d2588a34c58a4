//! The DingTalk workspace tools end to end: the real agent, the simulator serving an
//! organisation (people, calendars, to-dos, approvals, media), and the scripted model. Each
//! scenario is checked in the simulator's state and in the audit trail; the bad inputs change
//! nothing.

use std::time::Duration;

use serde_json::json;
use zhuli::{audit::Kind, tools::when};
use zhuli_sim::{
    dingtalk::{
        Inject, ReplyRoute, Simulator,
        org::{Org, OrgApproval, OrgEvent},
    },
    llm::{LlmSim, Scripted},
};

use crate::support::{self, Agent, Journal, calls, code_in};

const OFFSET: i32 = 480;

struct Rig {
    sim: Simulator,
    llm: LlmSim,
    agent: Agent,
    journal: Journal,
    share: std::path::PathBuf,
    scratch: std::path::PathBuf,
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.scratch);
    }
}

fn org() -> Org {
    Org::default()
        .dept(2, "R&D", 1)
        .dept(3, "Finance", 1)
        .person("hanmei", "Han Meimei", "Manager", &[2])
        .person("lilei", "Li Lei", "Engineer", &[2])
        .person("wangfang", "Wang Fang", "Accountant", &[3])
        .person("wangwei", "Wang Wei", "Engineer", &[2])
}

/// Local midnight `days` from today, in ms.
fn day(days: i64) -> i64 {
    let (_, today) = when::minute_of_day(zhuli::clock::now_ms(), OFFSET);
    when::day_start_ms(today + days, OFFSET)
}

/// The next Friday at least two days ahead, local midnight.
fn friday() -> i64 {
    let (_, today) = when::minute_of_day(zhuli::clock::now_ms(), OFFSET);
    let d = (today + 2..today + 9).find(|d| when::weekday(*d) == 4).expect("a Friday within a week");
    when::day_start_ms(d, OFFSET)
}

fn at(base: i64, hh: i64, mm: i64) -> String {
    when::rfc3339(base + (hh * 60 + mm) * 60_000, OFFSET)
}

async fn rig(tag: &str) -> Rig {
    let scratch = support::temp_dir(&format!("{tag}-ws"));
    let share = scratch.join("share");
    std::fs::create_dir_all(share.join("reports")).expect("share");
    std::fs::write(share.join("reports/q3.pdf"), b"%PDF-1.7 Q3 report: revenue up 12%").expect("q3");
    let journal = Journal::start(&scratch);
    let sim = Simulator::start(support::sim_config()).await.expect("simulator");
    sim.seed_org(org());
    let llm = LlmSim::start().await.expect("llm sim");
    let tools = ["people", "calendar", "todo", "approvals", "chat_send_file", "files_copy", "files_read"];
    let config = format!(
        "{}[tools.files.roots]\nshare = {:?}\n",
        support::assistant_config(&llm, &tools, &journal),
        share.display().to_string()
    );
    let agent = support::connected_agent(tag, &sim, &config).await;
    Rig { sim, llm, agent, journal, share, scratch }
}

impl Rig {
    async fn ask(&self, m: Inject) -> String {
        support::ask(&self.sim, &self.agent, m).await
    }

    async fn ask_han(&self, text: &str) -> String {
        self.ask(Inject::text(text).from("hanmei")).await
    }

    /// The tool results of the newest model request.
    fn last_tool_results(&self) -> Vec<String> {
        support::tool_results(&self.llm.requests().last().expect("a model request").body)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whats_on_my_calendar_tomorrow_reads_the_askers_calendar_only() {
    let mut rig = rig("ws-cal-list").await;
    let (tomorrow, later) = (day(1), day(3));
    let mut o = org();
    let ms = |base: i64, h: i64| base + h * 3_600_000;
    for (id, owner, summary, base, with) in [
        ("e1", "union-hanmei", "Design review", tomorrow, vec!["union-lilei".to_owned()]),
        ("e2", "union-lilei", "1:1 with Han", tomorrow, vec!["union-hanmei".to_owned()]),
        ("e3", "union-hanmei", "Later planning", later, vec![]),
        ("e4", "union-wangfang", "Budget (not Han's)", tomorrow, vec![]),
    ] {
        let start = ms(base, if id == "e2" { 15 } else { 10 });
        o.events.push(OrgEvent {
            id: id.into(),
            owner: owner.into(),
            summary: summary.into(),
            description: String::new(),
            location: "Room 3".into(),
            start_ms: start,
            end_ms: start + 3_600_000,
            attendees: with,
        });
    }
    rig.sim.seed_org(o);
    rig.llm.push(calls(&[("calendar_list", json!({"from": at(tomorrow, 0, 0), "to": at(tomorrow, 23, 59)}))]));
    rig.llm.push(Scripted::Text("Tomorrow: design review at 10, 1:1 at 15.".into()));
    assert_eq!(rig.ask_han("what's on my calendar tomorrow?").await, "Tomorrow: design review at 10, 1:1 at 15.");
    let result = rig.last_tool_results().remove(0);
    assert!(result.starts_with("2 event(s)"), "{result}");
    assert!(result.contains("10:00 – 11:00: Design review, with Li Lei, at Room 3 (event id e1)"), "{result}");
    assert!(result.contains("1:1 with Han"), "events Han is invited to count: {result}");
    assert!(!result.contains("Later planning") && !result.contains("not Han's"), "{result}");
    rig.journal.expect(1, Kind::ToolExecuted, &[("ACTOR", "hanmei"), ("TOOL", "calendar_list")]);

    // The address book is read once; later turns are served from the sealed cache.
    for _ in 0..3 {
        rig.llm.push(calls(&[("calendar_list", json!({"from": at(tomorrow, 0, 0), "to": at(tomorrow, 23, 59)}))]));
        rig.llm.push(Scripted::Text("Same as before.".into()));
        rig.ask_han("and again?").await;
    }
    let api = rig.sim.api_calls();
    assert_eq!(api.get("/topapi/v2/user/get"), Some(&1), "{api:?}");
    assert_eq!(api.get("calendar events"), Some(&4), "{api:?}");

    // The cache survives a restart; a change of [access] (a permission change) empties it.
    let list_again = async |rig: &mut Rig, change: Option<(&str, &str)>| {
        if let Some((from, to)) = change {
            let path = rig.agent.config_path().to_owned();
            let text = std::fs::read_to_string(&path).expect("config").replace(from, to);
            std::fs::write(&path, text).expect("config");
        }
        let before = rig.sim.counters().ws_accepted;
        rig.agent.restart();
        assert!(rig.sim.wait_until(Duration::from_secs(15), |s| s.counters().ws_accepted > before).await);
        rig.llm.push(calls(&[("calendar_list", json!({"from": at(tomorrow, 0, 0), "to": at(tomorrow, 23, 59)}))]));
        rig.llm.push(Scripted::Text("Same.".into()));
        rig.ask_han("once more").await;
        rig.sim.api_calls().get("/topapi/v2/user/get").copied()
    };
    assert_eq!(list_again(&mut rig, None).await, Some(1), "served from the cache after a restart");
    let granted = Some(("default_roles = [\"member\"]", "default_roles = [\"member\"]\nadmins = [\"hanmei\"]"));
    assert_eq!(list_again(&mut rig, granted).await, Some(2), "looked up again after [access] changed");
    support::assert_no_secret(&rig.agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn book_thirty_minutes_with_li_lei_on_friday_then_undo() {
    let rig = rig("ws-book").await;
    let fri = friday();
    let mut o = org();
    o.events.push(OrgEvent {
        id: "busy".into(),
        owner: "union-lilei".into(),
        summary: "Li Lei's standup".into(),
        description: String::new(),
        location: String::new(),
        start_ms: fri + 9 * 3_600_000,
        end_ms: fri + 10 * 3_600_000 + 30 * 60_000,
        attendees: vec![],
    });
    rig.sim.seed_org(o);
    rig.llm.push(calls(&[(
        "calendar_free",
        json!({"people": ["Li Lei"], "from": at(fri, 9, 0), "to": at(fri, 18, 0), "minutes": 30}),
    )]));
    rig.llm.push(calls(&[(
        "calendar_create",
        json!({"title": "Sync with Li Lei", "start": at(fri, 10, 30), "end": at(fri, 11, 0), "attendees": ["Li Lei"]}),
    )]));
    let question = rig.ask_han("book 30 minutes with Li Lei on Friday").await;
    let free = rig.last_tool_results().remove(0);
    assert!(free.contains(&format!("{} – 18:00", when::local(fri + (10 * 60 + 30) * 60_000, OFFSET))), "{free}");
    assert!(free.contains("Li Lei = lilei"), "{free}");
    assert!(
        question.contains("calendar_create")
            && question.contains("“Sync with Li Lei”，")
            && question.contains(" 10:30 – 11:00 (UTC+8)，参加人：Li Lei"),
        "{question}"
    );
    assert_eq!(rig.sim.org().events.len(), 1, "nothing is created before the confirmation");

    rig.llm.push(Scripted::Text("Booked: Friday 10:30–11:00 with Li Lei.".into()));
    let done = rig.ask_han(&format!("/confirm {}", code_in(&question))).await;
    assert_eq!(done, "Booked: Friday 10:30–11:00 with Li Lei.");
    let events = rig.sim.org().events;
    let made = events.iter().find(|e| e.id != "busy").expect("event created");
    assert_eq!(made.owner, "union-hanmei", "created in the asker's calendar, as the asker");
    assert_eq!(made.attendees, vec!["union-lilei".to_owned()]);
    assert_eq!(made.summary, "Sync with Li Lei");
    assert_eq!(made.start_ms, fri + (10 * 60 + 30) * 60_000);
    assert_eq!(made.end_ms - made.start_ms, 30 * 60_000);
    rig.journal.expect(1, Kind::ToolConfirmed, &[("ACTOR", "hanmei"), ("TOOL", "calendar_create")]);
    let executed = rig.journal.expect(1, Kind::ToolExecuted, &[("ACTOR", "hanmei"), ("TOOL", "calendar_create")]);
    let target = support::field(&executed[0], "TARGET").unwrap_or_default();
    assert!(target.contains("[lilei]") && !target.contains("Sync"), "ids in the audit trail, not the title: {target}");

    let undone = rig.ask_han("/undo").await;
    assert!(undone.contains("删除了日程“Sync with Li Lei”"), "{undone}");
    assert_eq!(rig.sim.org().events.len(), 1, "only Li Lei's own event is left");
    rig.journal.expect(1, Kind::ToolUndone, &[("ACTOR", "hanmei"), ("OUTCOME", "ok")]);
    support::assert_no_secret(&rig.agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remind_wang_asks_which_wang_then_creates_the_todo_for_her() {
    let rig = rig("ws-todo").await;
    let due = at(day(1), 17, 0);
    rig.llm.push(calls(&[("todo_create", json!({"subject": "Send the report", "assignee": "Wang", "due": due}))]));
    rig.llm.push(Scripted::Text("Which Wang: Wang Fang (Finance) or Wang Wei (R&D)?".into()));
    let asked = rig.ask_han("remind Wang to send the report by 5pm tomorrow").await;
    assert!(asked.contains("Which Wang"), "{asked}");
    let refusal = rig.last_tool_results().remove(0);
    assert!(
        refusal.contains("could be several people") && refusal.contains("wangfang") && refusal.contains("wangwei"),
        "{refusal}"
    );
    assert!(rig.sim.org().todos.is_empty());

    rig.llm.push(calls(&[(
        "todo_create",
        json!({"subject": "Send the report", "assignee": "wangfang", "due": due, "priority": "high"}),
    )]));
    let question = rig.ask_han("Wang Fang").await;
    assert!(question.contains("Wang Fang") && question.contains("Send the report"), "{question}");
    rig.llm.push(Scripted::Text("Wang Fang has a to-do due tomorrow 17:00.".into()));
    rig.ask_han(&format!("/confirm {}", code_in(&question))).await;
    let todos = rig.sim.org().todos;
    assert_eq!(todos.len(), 1);
    assert_eq!(todos[0].executors, vec!["union-wangfang".to_owned()]);
    assert_eq!(todos[0].creator, "union-hanmei");
    assert_eq!(todos[0].due_ms, Some(day(1) + 17 * 3_600_000));
    assert_eq!(todos[0].priority, 30);

    // Han's open to-dos list it; marking it done is undoable.
    let id = todos[0].id.clone();
    rig.llm.push(calls(&[("todo_list", json!({}))]));
    rig.llm.push(Scripted::Text("One open to-do.".into()));
    rig.ask_han("my to-dos?").await;
    assert!(
        rig.last_tool_results()[0]
            .contains(&format!("Send the report, due {}", when::local(day(1) + 17 * 3_600_000, OFFSET)))
    );
    rig.llm.push(calls(&[("todo_done", json!({"task_id": id}))]));
    let q = rig.ask_han("it is done").await;
    rig.llm.push(Scripted::Text("Marked done.".into()));
    rig.ask_han(&format!("/confirm {}", code_in(&q))).await;
    assert!(rig.sim.org().todos[0].done);
    assert!(rig.ask_han("/undo").await.contains("重新打开了待办"));
    assert!(!rig.sim.org().todos[0].done);
    rig.journal.expect(1, Kind::ToolDenied, &[("ACTOR", "hanmei"), ("TOOL", "todo_create")]);
    rig.journal.expect(1, Kind::ToolExecuted, &[("ACTOR", "hanmei"), ("TOOL", "todo_create")]);
    rig.journal.expect(1, Kind::ToolUndone, &[("ACTOR", "hanmei"), ("OUTCOME", "ok")]);
    support::assert_no_secret(&rig.agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_go_into_the_chat_and_received_files_are_saved() {
    let rig = rig("ws-files").await;
    // A file into a chat is a share: it waits for the asker's confirmation.
    rig.llm.push(calls(&[("chat_send_file", json!({"path": "share/reports/q3.pdf"}))]));
    let q = rig.ask_han("send me the Q3 report").await;
    assert!(q.contains("发送出去") && q.contains("chat_send_file"), "{q}");
    assert!(rig.sim.org().uploads.is_empty(), "nothing leaves before the confirmation");
    rig.llm.push(Scripted::Text("Here is the Q3 report.".into()));
    assert_eq!(rig.ask_han(&format!("/confirm {}", code_in(&q))).await, "Here is the Q3 report.");
    let uploads = rig.sim.org().uploads;
    assert_eq!(uploads.len(), 1);
    assert_eq!(uploads[0].file_name, "q3.pdf");
    assert_eq!(uploads[0].bytes, std::fs::read(rig.share.join("reports/q3.pdf")).expect("q3"));
    let sent: Vec<_> = rig.sim.replies().into_iter().filter(|r| r.media_id.is_some()).collect();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].route, ReplyRoute::OtoSend);
    assert_eq!(sent[0].to_user.as_deref(), Some("hanmei"));
    assert_eq!(sent[0].media_id.as_deref(), Some(uploads[0].media_id.as_str()));

    // In a group chat the file goes to the group, once the asker — no one else — confirms.
    rig.llm.push(calls(&[("chat_send_file", json!({"path": "share/reports/q3.pdf"}))]));
    let in_team = |text: &str, who: &str| Inject::text(text).in_group(true).conversation("cid-team").from(who);
    let q = rig.ask(in_team("@zhuli share the Q3 report", "hanmei")).await;
    let other = rig.ask(in_team(&format!("@zhuli /confirm {}", code_in(&q)), "lilei")).await;
    assert!(other.contains("只有提出请求的"), "{other}");
    assert_eq!(rig.sim.org().uploads.len(), 1, "someone else's confirmation sends nothing");
    rig.llm.push(Scripted::Text("Shared.".into()));
    rig.ask(in_team(&format!("@zhuli /confirm {}", code_in(&q)), "hanmei")).await;
    let group: Vec<_> =
        rig.sim.replies().into_iter().filter(|r| r.media_id.is_some() && r.route == ReplyRoute::GroupSend).collect();
    assert_eq!(group.len(), 1);
    assert_eq!(group[0].conversation_id.as_deref(), Some("cid-team"));

    // A file someone sent the robot is saved into a shared folder on request.
    let m = Inject { media: b"budget,2027\nrent,100\n".to_vec(), ..Inject::of("file", "budget.csv") }.from("hanmei");
    rig.llm.push(Scripted::Text("Got it. Shall I save it?".into()));
    rig.ask(m).await;
    let note = rig.llm.requests().last().expect("request").body.to_string();
    let saved: String =
        note.split("saved as `").nth(1).expect("inbox name").chars().take_while(|c| *c != '`').collect();
    rig.llm.push(calls(&[("files_copy", json!({"from": saved, "to": "share/budget.csv"}))]));
    let q = rig.ask_han("save it to the share").await;
    rig.llm.push(Scripted::Text("Saved.".into()));
    rig.ask_han(&format!("/confirm {}", code_in(&q))).await;
    assert_eq!(std::fs::read(rig.share.join("budget.csv")).expect("saved"), b"budget,2027\nrent,100\n");
    assert!(rig.ask_han("/undo").await.contains("删除了 share/budget.csv"));
    assert!(!rig.share.join("budget.csv").exists());
    support::assert_no_secret(&rig.agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_answers_and_change_nothing() {
    let rig = rig("ws-bad").await;
    let fri = friday();
    let create = |start: String, end: String, who: &[&str]| {
        calls(&[("calendar_create", json!({"title": "Sync", "start": start, "end": end, "attendees": who}))])
    };
    let cases: Vec<(Scripted, &str)> = vec![
        (create(at(fri, 10, 0), at(fri, 10, 30), &["Zhao Liu"]), "no one called “Zhao Liu”"),
        (create(at(fri, 10, 0), at(fri, 10, 30), &["outsider-77"]), "no one called “outsider-77”"),
        (create(at(day(-1), 10, 0), at(day(-1), 10, 30), &["lilei"]), "is in the past"),
        (create(at(fri, 11, 0), at(fri, 10, 0), &[]), "must end after it starts"),
        (create("next friday".into(), at(fri, 10, 0), &[]), "is not a time"),
    ];
    for (script, expect) in cases {
        rig.llm.push(script);
        rig.llm.push(Scripted::Text("I could not book that.".into()));
        let reply = rig.ask_han("book it").await;
        // No confirmation is asked; the person is told why, in the agent's words.
        assert!(reply.starts_with("I could not book that.\n\n⚠️"), "{expect}: {reply}");
        assert!(reply.contains("- `calendar_create`：") && !reply.contains("/确认"), "{expect}: {reply}");
        let r = rig.last_tool_results().remove(0);
        assert!(r.starts_with("refused:") && r.contains(expect), "expected {expect:?} in {r:?}");
    }
    assert!(rig.sim.org().events.is_empty());

    // Someone outside the organisation (no staff id) is not admitted, in a group as in 1:1: the
    // model is never asked.
    let asked = rig.llm.requests().len();
    let refused = rig.ask(Inject::text("@zhuli my calendar").in_group(true).from("")).await;
    assert!(refused.contains("只为本组织的成员服务"), "{refused}");
    assert_eq!(rig.llm.requests().len(), asked);

    // A missing app permission is named in the chat, whatever the model says.
    rig.sim.deny_api("/v1.0/calendar/", "Calendar.Event.Read");
    rig.llm.push(calls(&[("calendar_list", json!({"from": at(fri, 0, 0), "to": at(fri, 23, 0)}))]));
    rig.llm.push(Scripted::Text("I cannot read your calendar right now.".into()));
    let answer = rig.ask_han("my calendar on friday?").await;
    assert!(answer.starts_with("I cannot read your calendar right now."), "{answer}");
    assert!(answer.contains("`Calendar.Event.Read`") && answer.contains("developer console"), "{answer}");
    assert!(!answer.contains("panicked") && !answer.contains("backtrace"));
    rig.journal.expect(1, Kind::ToolFailed, &[("ACTOR", "hanmei"), ("TOOL", "calendar_list")]);
    rig.sim.clear_api_faults();

    // Throttling while the event is being created: retried a few times, then a clear answer
    // and no event; briefly throttled, it goes through.
    for (throttled, created) in [(10, 0), (2, 1)] {
        rig.sim.throttle_api("/v1.0/calendar/users/union-hanmei/calendars/primary/events", throttled);
        rig.llm.push(create(at(fri, 14, 0), at(fri, 14, 30), &["lilei"]));
        let q = rig.ask_han("book friday 14:00").await;
        rig.llm.push(Scripted::Text("Done or not, see above.".into()));
        rig.ask_han(&format!("/confirm {}", code_in(&q))).await;
        let r = rig.last_tool_results().remove(0);
        if created == 0 {
            assert!(r.contains("kept throttling") && r.contains("changed nothing"), "{r}");
        } else {
            assert!(r.starts_with("created “Sync”"), "{r}");
        }
        assert_eq!(rig.sim.org().events.len(), created);
        rig.sim.clear_api_faults();
    }
    support::assert_no_secret(&rig.agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approvals_waiting_for_the_asker_and_only_theirs_are_shown() {
    let rig = rig("ws-approvals").await;
    let mut o = org();
    for (id, originator, waiting) in [("ap-1", "lilei", "hanmei"), ("ap-2", "wangwei", "wangfang")] {
        o.approvals.push(OrgApproval {
            id: id.into(),
            title: format!("Leave request {id}"),
            originator: originator.into(),
            approvers: vec![waiting.into()],
            cc: vec![],
            waiting_for: vec![waiting.into()],
            status: "RUNNING".into(),
            result: String::new(),
            form: vec![("Days".into(), "3".into()), ("Reason".into(), "family".into())],
        });
    }
    rig.sim.seed_org(o);
    rig.llm.push(calls(&[("approvals_pending", json!({}))]));
    rig.llm.push(calls(&[
        ("approvals_show", json!({"instance_id": "ap-1"})),
        ("approvals_show", json!({"instance_id": "ap-2"})),
    ]));
    rig.llm.push(Scripted::Text("Li Lei asks for 3 days of leave.".into()));
    rig.ask_han("what approvals are waiting for me?").await;
    let requests = rig.llm.requests();
    let pending: Vec<String> = requests[1].body["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .filter(|m| m["role"] == "tool")
        .map(|m| m["content"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert!(
        pending[0].contains("Leave request ap-1 (approval id ap-1)") && !pending[0].contains("ap-2"),
        "{pending:?}"
    );
    let shown = rig.last_tool_results();
    assert!(
        shown[1].contains("from Li Lei") && shown[1].contains("Days: 3") && shown[1].contains("in progress"),
        "{shown:?}"
    );
    assert!(shown[2].starts_with("refused:") && shown[2].contains("takes no part"), "{shown:?}");
    support::assert_no_secret(&rig.agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_titles_and_subjects_stay_out_of_the_audit_trail() {
    use support::PRIVATE_TEXT;
    let rig = rig("ws-audit").await;
    let call =
        |tool: &'static str, args: serde_json::Value| support::call_tool(&rig.sim, &rig.llm, &rig.agent, tool, args);
    let fri = friday();
    let n = PRIVATE_TEXT.chars().count();

    // Looked for, not found: the model is told what was not found; the audit trail only sizes.
    assert!(call("people_search", json!({"query": PRIVATE_TEXT})).await.contains("no one in the address book"));
    let r = call("people_members", json!({"department": PRIVATE_TEXT})).await;
    assert!(r.starts_with("refused:") && r.contains("zq7741"), "{r}");
    let r = call(
        "calendar_create",
        json!({"title": PRIVATE_TEXT, "start": at(fri, 10, 0), "end": at(fri, 10, 30), "attendees": [PRIVATE_TEXT]}),
    )
    .await;
    assert!(r.starts_with("refused:") && r.contains("no one called"), "{r}");
    let r = call("calendar_list", json!({"from": PRIVATE_TEXT, "to": at(fri, 18, 0)})).await;
    assert!(r.starts_with("refused:") && r.contains("is not a time"), "{r}");

    // Made, confirmed and undone: ids in the audit trail, never the title or the subject.
    let (_, made) = support::confirmed_call(
        &rig.sim,
        &rig.llm,
        &rig.agent,
        "calendar_create",
        json!({"title": PRIVATE_TEXT, "start": at(fri, 10, 0), "end": at(fri, 10, 30), "attendees": ["lilei"]}),
    )
    .await;
    assert!(made.contains("event id"), "{made}");
    let (_, todo) = support::confirmed_call(
        &rig.sim,
        &rig.llm,
        &rig.agent,
        "todo_create",
        json!({"subject": PRIVATE_TEXT, "assignee": "wangfang", "due": at(day(1), 17, 0)}),
    )
    .await;
    assert!(todo.contains("to-do id"), "{todo}");
    assert!(rig.ask_han("/undo").await.contains("删除了待办"));
    assert!(rig.ask_han("/undo").await.contains("删除了日程"));

    let undone = rig.journal.expect(2, Kind::ToolUndone, &[("ACTOR", "hanmei"), ("OUTCOME", "ok")]);
    rig.journal.assert_no_private_text();
    assert!(
        undone
            .iter()
            .all(|e| support::field(e, "TARGET").is_some_and(|t| t.contains("event ") || t.contains("to-do "))),
        "{undone:?}"
    );
    let search = rig.journal.expect(1, Kind::ToolExecuted, &[("TOOL", "people_search")]);
    assert_eq!(support::field(&search[0], "TARGET"), Some(format!("people search ({n} chars)").as_str()));
    rig.journal.expect(1, Kind::ToolDenied, &[("TOOL", "people_members")]);
    rig.journal.expect(1, Kind::ToolDenied, &[("TOOL", "calendar_list")]);
    let created = rig.journal.expect(1, Kind::ToolExecuted, &[("TOOL", "calendar_create")]);
    let target = support::field(&created[0], "TARGET").unwrap_or_default();
    assert!(target.contains("[lilei]"), "the invited person's staff id: {target}");
    let todo = rig.journal.expect(1, Kind::ToolExecuted, &[("TOOL", "todo_create")]);
    assert!(support::field(&todo[0], "TARGET").is_some_and(|t| t.contains("wangfang")), "{todo:?}");
    support::assert_no_secret(&rig.agent);
}
