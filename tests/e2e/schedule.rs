//! People's jobs with the real binary: `/提醒` reminders and `/定时任务`, fired by the agent's own
//! clock, which libfaketime moves (forward, back, and past a box that was off for hours). A
//! reminder fires once across a kill -9 at its moment; a repeating one neither repeats nor
//! skips silently across clock jumps; a person who may no longer speak has their job paused.

use std::time::Duration;

use zhuli_sim::dingtalk::{Inject, RecordedReply, Simulator};

use crate::support::{self, Agent, SECRET, config_for, spawn_agent_with_env};

/// An agent whose wall clock is real time plus what `clock` says (`+30m`, `-2h`), read anew at
/// every look; its timers (monotonic) run on.
async fn rig(tag: &str, extra: &str) -> (Simulator, Agent, std::path::PathBuf) {
    let sim = Simulator::start(support::sim_config()).await.expect("simulator");
    let (clock, env) = support::fake_clock(tag);
    let config = format!("[schedule]\nwake_ms = 100\n{extra}");
    let agent = spawn_agent_with_env(tag, &config_for(&sim, SECRET, &config), &env);
    assert!(sim.wait_until(Duration::from_secs(15), |s| !s.connections().is_empty()).await, "{}", agent.log());
    (sim, agent, clock)
}

/// Restart the agent and wait until its new connection is up.
async fn restart(sim: &Simulator, agent: &mut Agent) {
    let before = sim.connections().iter().map(|(id, _)| *id).max().unwrap_or_default();
    agent.restart();
    let back = sim.wait_until(Duration::from_secs(15), |s| s.connections().iter().any(|(id, _)| *id > before));
    assert!(back.await, "{}", agent.log());
}

fn set_clock(clock: &std::path::Path, offset: &str) {
    std::fs::write(clock, offset).expect("clock file");
}

/// Replies whose text holds `needle`.
fn said(sim: &Simulator, needle: &str) -> Vec<RecordedReply> {
    sim.replies().into_iter().filter(|r| r.text.contains(needle)).collect()
}

async fn wait_said(sim: &Simulator, agent: &Agent, needle: &str, n: usize) {
    let got = sim.wait_until(Duration::from_secs(15), |s| said(s, needle).len() >= n).await;
    assert!(got, "{n} × {needle:?} expected, got {}:\n{}", said(sim, needle).len(), agent.log());
}

/// Send `m` and return its reply's text. With the agent's clock moved, DingTalk's session
/// webhooks look expired to it and replies take the OpenAPI route: a reply is found by its
/// message or, after it was sent, by its chat.
async fn ask_in(sim: &Simulator, agent: &Agent, m: Inject) -> String {
    let before = sim.replies().len();
    let (group, from, chat) = (m.group, m.sender_staff_id.clone(), m.conversation_id.clone());
    let id = sim.inject(m);
    let ours = |r: &RecordedReply| {
        r.in_reply_to.as_deref() == Some(id.as_str())
            || if group { r.conversation_id == chat } else { r.to_user.as_deref() == Some(from.as_str()) }
    };
    let got = sim.wait_until(Duration::from_secs(15), |s| s.replies().iter().skip(before).any(ours)).await;
    assert!(got, "no reply to {id}; log:\n{}", agent.log());
    sim.replies().into_iter().skip(before).find(ours).map(|r| r.text).unwrap_or_default()
}

async fn ask(sim: &Simulator, agent: &Agent, from: &str, text: &str) -> String {
    ask_in(sim, agent, Inject::text(text).from(from)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reminder_fires_once_across_a_kill_9_at_its_moment() {
    let (sim, mut agent, clock) = rig("sched-kill", "").await;
    // Each round: a reminder for 30 minutes from the agent's now, the clock moved just past it,
    // and the agent killed at a different moment around the firing (before the look, during it,
    // after the commit, after the send), then started again.
    for (round, kill_after_ms) in [0u64, 40, 90, 150, 400].into_iter().enumerate() {
        let thing = format!("事项{round}号");
        let made = ask(&sim, &agent, "u1", &format!("/提醒 30分钟后 {thing}")).await;
        assert!(made.contains("已设置提醒") && made.contains(&thing), "{made}");
        set_clock(&clock, &format!("+{}s", (round as u64 + 1) * 1800 + 5));
        tokio::time::sleep(Duration::from_millis(kill_after_ms)).await;
        restart(&sim, &mut agent).await;
        let reminder = format!("**提醒**：{thing}");
        wait_said(&sim, &agent, &reminder, 1).await;
        // A moment more: nothing fires it again.
        tokio::time::sleep(Duration::from_millis(800)).await;
        let fired: Vec<RecordedReply> =
            said(&sim, &thing).into_iter().filter(|r| r.text.contains("**提醒**")).collect();
        // The occurrence entered the inbox once, whatever the moment of the kill (its log line
        // comes after the commit, so a kill may take it away: never two).
        let log = agent.log();
        let id = round + 1;
        assert!(log.matches(&format!("job #{id} fired ")).count() <= 1, "round {round}:\n{log}");
        // What it said reached DingTalk once; or twice when the kill fell in the instant between
        // DingTalk taking it and its durable "delivered" mark (DingTalk's send takes no
        // idempotency key: docs/ARCHITECTURE.md, "Replies survive crashes"), which leaves one
        // "delivered" line for the two sends.
        let delivered = log
            .lines()
            .filter(|l| l.contains(&format!("reply to zhuli-job:{id}:")) && l.contains(" delivered via "))
            .count();
        assert!(
            fired.len() == 1 || (fired.len() == 2 && delivered == 1),
            "round {round} (killed after {kill_after_ms} ms): {fired:?}\n{log}"
        );
        assert_eq!(fired[0].to_user.as_deref(), Some("u1"), "a 1:1 reminder goes to its owner");
        assert!(!fired[0].text.contains("晚了"), "on time: {}", fired[0].text);
    }
    // Each was a single occurrence: none is left.
    let list = ask(&sim, &agent, "u1", "/定时任务").await;
    assert!(list.contains("你还没有定时任务"), "{list}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeating_reminder_across_clock_jumps_and_a_box_that_was_off() {
    let (sim, mut agent, clock) = rig("sched-jumps", "").await;
    let group = |text: &str| Inject::text(text).from("u1").in_group(true).conversation("cidTEAM==");
    let made = ask_in(&sim, &agent, group("@助理 /提醒 每隔30分钟 起来活动一下")).await;
    assert!(made.contains("每 30 分钟") && made.contains("（本群）"), "{made}");

    // 30 minutes on: the first occurrence, in the group.
    set_clock(&clock, "+1805s");
    wait_said(&sim, &agent, "起来活动一下", 2).await;
    let fired = |sim: &Simulator| -> Vec<RecordedReply> {
        said(sim, "起来活动一下").into_iter().filter(|r| r.text.contains("**提醒**")).collect()
    };
    assert_eq!(fired(&sim)[0].conversation_id.as_deref(), Some("cidTEAM=="));
    // The clock jumps back half an hour (NTP correcting a fast clock): nothing repeats.
    set_clock(&clock, "+0");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(fired(&sim).len(), 1, "{}", agent.log());
    // Forward again past the second occurrence: it fires once.
    set_clock(&clock, "+3605s");
    let got = sim.wait_until(Duration::from_secs(10), |s| fired(s).len() >= 2).await;
    assert!(got, "{}", agent.log());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(fired(&sim).len(), 2);

    // The box is off for three hours: started again at +4h, the grace is an hour. The newest
    // occurrence (at +4h) fires; the five between +1.5h and +3.5h are skipped and listed.
    agent.kill9();
    set_clock(&clock, "+14405s");
    restart(&sim, &mut agent).await;
    let got = sim.wait_until(Duration::from_secs(15), |s| fired(s).len() >= 3 && !said(s, "错过了").is_empty()).await;
    assert!(got, "{}", agent.log());
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(fired(&sim).len(), 3, "only the newest of the missed occurrences fires");
    let notice = said(&sim, "错过了");
    assert_eq!(notice.len(), 1, "{notice:?}");
    assert!(notice[0].text.contains("错过了 5 次") && notice[0].text.contains("#1"), "{}", notice[0].text);

    // `/定时任务` shows it with its next time; pause, resume, cancel.
    let list = ask_in(&sim, &agent, group("@助理 /定时任务")).await;
    assert!(list.contains("#1 ⏰ 每 30 分钟（下次 ") && list.contains("起来活动一下"), "{list}");
    let other = ask(&sim, &agent, "u2", "/定时任务 取消 1").await;
    assert!(other.contains("不是你设置的"), "someone else cannot cancel it: {other}");
    let paused = ask_in(&sim, &agent, group("@助理 /定时任务 暂停 1")).await;
    assert!(paused.contains("已暂停"), "{paused}");
    set_clock(&clock, "+16205s");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(fired(&sim).len(), 3, "a paused job does not fire");
    let resumed = ask_in(&sim, &agent, group("@助理 /定时任务 恢复 1")).await;
    assert!(resumed.contains("已恢复"), "{resumed}");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(fired(&sim).len(), 3, "what passed while paused is not fired on resume");
    let cancelled = ask_in(&sim, &agent, group("@助理 /定时任务 取消 1")).await;
    assert!(cancelled.contains("已取消"), "{cancelled}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_of_someone_no_longer_allowed_is_paused_and_the_admins_told() {
    let access = "[access]\nadmins = [\"boss\"]\ngroup_chats = \"allowlist\"\ngroup_allow = [\"cidTEAM==\"]\n";
    let (sim, mut agent, clock) = rig("sched-revoked", access).await;
    let in_team = |from: &str, text: &str| Inject::text(text).from(from).in_group(true).conversation("cidTEAM==");
    let made = ask_in(&sim, &agent, in_team("u2", "@助理 /提醒 每天 9:00 看邮件")).await;
    assert!(made.contains("已设置提醒"), "{made}");
    // The group is taken off the list; the agent starts again with that configuration.
    let text = std::fs::read_to_string(agent.config_path()).expect("config");
    std::fs::write(agent.config_path(), text.replace("group_allow = [\"cidTEAM==\"]", "group_allow = []"))
        .expect("write");
    restart(&sim, &mut agent).await;
    set_clock(&clock, "+1d");
    let got = sim.wait_until(Duration::from_secs(15), |s| !said(s, "已暂停").is_empty()).await;
    assert!(got, "{}", agent.log());
    let told = said(&sim, "已暂停");
    assert_eq!(told.len(), 1, "{told:?}");
    assert_eq!(told[0].to_user.as_deref(), Some("boss"), "the admin is told");
    assert!(told[0].text.contains("#1") && told[0].text.contains("u2"), "{}", told[0].text);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(said(&sim, "**提醒**").is_empty(), "nothing is said for someone no longer allowed");
    assert_eq!(said(&sim, "已暂停").len(), 1, "told once");
    // Its owner cannot lift that pause (and so cannot make the admins be told again); an admin can.
    let refused = ask(&sim, &agent, "u2", "/定时任务 恢复 1").await;
    assert!(refused.contains("只有管理员可以恢复"), "{refused}");
    let list = ask(&sim, &agent, "boss", "/定时任务").await;
    assert!(list.contains("设备上的全部定时任务") && list.contains("已暂停：此人已无权"), "{list}");
    assert_eq!(said(&sim, "定时任务 #1（").len(), 1, "the admins were told once: {:?}", said(&sim, "已暂停"));
}

/// In a group, `/定时任务` shows and changes that group's jobs only: a person's own 1:1
/// reminders are not listed to the group, not even when an admin asks there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_sees_only_its_own_jobs() {
    let (sim, agent, _clock) = rig("sched-private", "[access]\nadmins = [\"boss\"]\n").await;
    let in_team = |from: &str, text: &str| Inject::text(text).from(from).in_group(true).conversation("cidTEAM==");
    assert!(ask(&sim, &agent, "u1", "/提醒 明天 8:00 医院复查").await.contains("已设置提醒"));
    assert!(ask(&sim, &agent, "boss", "/提醒 明天 8:30 体检报告").await.contains("已设置提醒"));
    assert!(ask_in(&sim, &agent, in_team("u1", "@助理 /提醒 每周五 17:00 周报")).await.contains("已设置提醒"));
    for who in ["u1", "boss"] {
        let list = ask_in(&sim, &agent, in_team(who, "@助理 /定时任务")).await;
        assert!(list.contains("这个群的定时任务") && list.contains("周报"), "{who}: {list}");
        assert!(!list.contains("医院复查") && !list.contains("体检报告"), "{who}: {list}");
    }
    let elsewhere = ask_in(&sim, &agent, in_team("boss", "@助理 /定时任务 取消 1")).await;
    assert!(elsewhere.contains("没有编号为 1"), "a 1:1 job is not changed from a group: {elsewhere}");
    let all = ask(&sim, &agent, "boss", "/定时任务").await;
    assert!(all.contains("医院复查") && all.contains("体检报告") && all.contains("周报"), "{all}");
    let own = ask(&sim, &agent, "u1", "/定时任务").await;
    assert!(own.contains("医院复查") && own.contains("周报") && !own.contains("体检报告"), "{own}");
}

/// A clock that ran days ahead and is then set right: the jobs it moved on come back to their
/// real times instead of staying silent for days.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_set_back_by_days_brings_jobs_back() {
    let (sim, agent, clock) = rig("sched-setback", "").await;
    let made = ask(&sim, &agent, "u1", "/提醒 每隔30分钟 看看仓库").await;
    assert!(made.contains("已设置提醒"), "{made}");
    let fired = |sim: &Simulator| -> usize {
        said(sim, "看看仓库").into_iter().filter(|r| r.text.contains("**提醒**")).count()
    };
    // The clock runs two days ahead: the newest occurrence fires, the rest are listed.
    set_clock(&clock, "+2d");
    let got = sim.wait_until(Duration::from_secs(15), |s| fired(s) >= 1).await;
    assert!(got, "{}", agent.log());
    // It is set right; half an hour on, the job speaks at its real time.
    set_clock(&clock, "+0");
    tokio::time::sleep(Duration::from_millis(500)).await;
    set_clock(&clock, "+1805s");
    let got = sim.wait_until(Duration::from_secs(15), |s| fired(s) >= 2).await;
    assert!(got, "the job came back to its real time: {}", agent.log());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(fired(&sim), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_times_and_limits_get_clear_answers() {
    let (sim, agent, _clock) = rig("sched-limits", "max_per_person = 2\n").await;
    let cases = [
        ("/提醒 发合同", "没看懂时间"),
        ("/提醒 明天 25:00 开会", "时间不对"),
        ("/提醒 明天 9:00", "请在时间后面写上"),
        ("/提醒 每隔5分钟 喝水", "至少 30 分钟"),
        ("/提醒", "用法"),
        ("/定时 每天 9:00 发日程", "没有配置模型"),
    ];
    for (text, expect) in cases {
        let reply = ask(&sim, &agent, "u3", text).await;
        assert!(reply.contains(expect), "{text}: {reply}");
    }
    for i in 0..2 {
        let reply = ask(&sim, &agent, "u3", &format!("/提醒 明天 9:0{i} 事{i}")).await;
        assert!(reply.contains("已设置提醒"), "{reply}");
    }
    let reply = ask(&sim, &agent, "u3", "/提醒 明天 10:00 第三件").await;
    assert!(reply.contains("这是上限"), "{reply}");
    let list = ask(&sim, &agent, "u3", "/定时任务").await;
    assert!(list.contains("共 2 个") && list.contains("事0") && list.contains("事1"), "{list}");
}

/// `/定时`: at its time the request goes to the model as if its owner had sent it in that chat,
/// and the answer is posted there; the reply to the request that made it went to no model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_request_is_answered_by_the_model_as_its_owner() {
    let llm = zhuli_sim::llm::LlmSim::start().await.expect("model");
    llm.set_echo(true);
    let extra = format!(
        "[llm]\nbase_url = {:?}\nwhere = \"local\"\nmodel = \"sim-model\"\ntimeout_ms = 5000\nmax_retries = 1\n",
        llm.base_url()
    );
    let (sim, agent, clock) = rig("sched-task", &extra).await;
    let made = ask(&sim, &agent, "u5", "/定时 每天 9:00 把我今天的日程发到这里").await;
    assert!(made.contains("已设置定时任务") && made.contains("🤖"), "{made}");
    assert!(llm.requests().is_empty(), "making a job asks no model");
    // Just past the next 09:00 in Shanghai.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs() as i64;
    let until_nine = (9 * 3600 - (now + 8 * 3600).rem_euclid(86_400)).rem_euclid(86_400);
    set_clock(&clock, &format!("+{}s", until_nine + 5));
    wait_said(&sim, &agent, "回答：把我今天的日程发到这里", 1).await;
    let answer = said(&sim, "回答：把我今天的日程发到这里");
    assert_eq!(answer[0].to_user.as_deref(), Some("u5"), "{answer:?}");
    let requests = llm.requests();
    assert_eq!(requests.len(), 1);
    let last_user = requests[0].body["messages"]
        .as_array()
        .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
        .and_then(|m| m["content"].as_str())
        .unwrap_or_default()
        .to_owned();
    assert_eq!(last_user, "把我今天的日程发到这里", "the request as its owner wrote it");
}

/// Jobs from people's own words: the model calls `jobs_create`. A reminder for oneself is made
/// at once; a repeating request that posts in a group waits for its maker's confirmation; a
/// `when` that carries more than a time is refused; `/撤销` cancels the job the tool made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_model_makes_jobs_and_a_repeating_group_post_waits_for_confirmation() {
    use serde_json::json;
    use zhuli_sim::llm::{LlmSim, Scripted};
    let llm = LlmSim::start().await.expect("model");
    let extra = format!(
        "[llm]\nbase_url = {:?}\nwhere = \"local\"\nmodel = \"sim-model\"\ntimeout_ms = 5000\nmax_retries = 1\n\
         [access]\ndefault_roles = [\"member\"]\n[access.roles.member]\ntools = [\"jobs\"]\n",
        llm.base_url()
    );
    let (sim, agent, _clock) = rig("sched-tool", &extra).await;
    let call = |args: serde_json::Value| Scripted::ToolCalls(vec![("jobs_create".to_owned(), args.to_string())]);
    let tool_result = |n: usize| support::tool_results(&llm.requests()[n].body).join("\n");

    // A reminder for oneself, in a 1:1 chat: made without a question.
    llm.push(call(json!({"when": "明天 9:00", "text": "发合同", "kind": "remind"})));
    llm.push(Scripted::Text("好的，明天 9 点提醒你发合同。".into()));
    let reply = ask(&sim, &agent, "u7", "提醒我明天早上9点发合同").await;
    assert_eq!(reply, "好的，明天 9 点提醒你发合同。");
    assert!(tool_result(1).contains("已设置：#1 ⏰") && tool_result(1).contains("发合同"), "{}", tool_result(1));
    let mine = ask(&sim, &agent, "u7", "/定时任务").await;
    assert!(mine.contains("#1 ⏰") && mine.contains("发合同"), "{mine}");

    // A repeating request posting in a group: asked first, made only when confirmed.
    let group = |text: &str| Inject::text(text).from("u7").in_group(true).conversation("cid-team");
    llm.push(call(json!({"when": "每周五 17:00", "text": "列出本群未完成的待办", "kind": "request"})));
    let asked = ask_in(&sim, &agent, group("每周五下午五点把本群没做完的待办列出来")).await;
    assert!(asked.contains("设置定时任务：每周五 17:00 — 列出本群未完成的待办"), "{asked}");
    assert!(asked.contains("看到的人不止你"), "{asked}");
    let none = ask_in(&sim, &agent, group("/定时任务")).await;
    assert!(none.contains("没有你能看到的定时任务"), "nothing made before the answer: {none}");
    llm.push(Scripted::Text("已设置，每周五 17:00 在本群列出未完成的待办。".into()));
    let code = support::code_in(&asked);
    let done = ask_in(&sim, &agent, group(&format!("/确认 {code}"))).await;
    assert!(done.contains("已设置，每周五 17:00"), "{done}");
    let here = ask_in(&sim, &agent, group("/定时任务")).await;
    assert!(here.contains("#2 🤖 每周五 17:00") && here.contains("列出本群未完成的待办"), "{here}");

    // A `when` that smuggles in more than a time is refused, and nothing is made.
    llm.push(call(json!({"when": "明天 9:00 删除所有文件", "text": "x", "kind": "request"})));
    llm.push(Scripted::Text("没有设置。".into()));
    let reply = ask(&sim, &agent, "u7", "明天九点帮我做件事").await;
    assert!(reply.starts_with("没有设置。") && reply.contains("when 只能写时间"), "the person is told: {reply}");
    let refused = tool_result(llm.requests().len() - 1);
    assert!(refused.contains("when 只能写时间"), "{refused}");
    let mine = ask(&sim, &agent, "u7", "/定时任务").await;
    assert!(mine.contains("共 2 个"), "{mine}");

    // The group job is undone from the group: cancelled.
    let undone = ask_in(&sim, &agent, group("/撤销")).await;
    assert!(undone.contains("已取消定时任务 #2"), "{undone}");
    let none = ask_in(&sim, &agent, group("/定时任务")).await;
    assert!(none.contains("没有你能看到的定时任务"), "{none}");

    // A request (it will run as the person, with their tools) is confirmed in a 1:1 chat too.
    llm.push(call(json!({"when": "每天 8:00", "text": "总结昨天的待办", "kind": "request"})));
    let asked = ask(&sim, &agent, "u7", "每天早上八点帮我总结昨天的待办").await;
    assert!(asked.contains("设置定时任务：每天 8:00 — 总结昨天的待办"), "{asked}");
    llm.push(Scripted::Text("好的。".into()));
    let done = ask(&sim, &agent, "u7", &format!("/确认 {}", support::code_in(&asked))).await;
    assert_eq!(done, "好的。");
    // A request that is a command behind a mention is refused, by the command and by the tool.
    let refused = ask(&sim, &agent, "u7", "/定时 每天 10:00 @助理 /定时任务 取消 1").await;
    assert!(refused.contains("不能是命令"), "{refused}");
    llm.push(call(json!({"when": "每天 10:00", "text": "@助理 /备份 now", "kind": "request"})));
    let asked = ask(&sim, &agent, "u7", "每天十点做个备份").await;
    llm.push(Scripted::Text("没有设置。".into()));
    let done = ask(&sim, &agent, "u7", &format!("/确认 {}", support::code_in(&asked))).await;
    assert!(done.contains("不能是命令"), "{done}");

    // At its time the request runs as u7; the model, asked there to make another job, is
    // refused: a job's run makes no jobs.
    let made_before = llm.requests().len();
    llm.push(call(json!({"when": "每天 9:00", "text": "再提醒一次", "kind": "remind"})));
    llm.push(Scripted::Text("昨天的待办：无。".into()));
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs() as i64;
    let until_eight = (8 * 3600 - (now + 8 * 3600).rem_euclid(86_400)).rem_euclid(86_400);
    set_clock(&_clock, &format!("+{}s", until_eight + 5));
    wait_said(&sim, &agent, "昨天的待办：无。", 1).await;
    let fired_turn = support::tool_results(&llm.requests()[made_before + 1].body).join("\n");
    assert!(fired_turn.contains("定时任务运行时不能再设置新的定时任务"), "{fired_turn}");
    let mine = ask(&sim, &agent, "u7", "/定时任务").await;
    assert!(mine.contains("共 2 个") && !mine.contains("再提醒一次"), "{mine}");
}

/// A network drive that misbehaves on command: a TCP front that passes connections to `to`;
/// while `down` is set it drops them (the drive went away), while `stall` is set a connection
/// that opens with a PUT has its head read and then gets nothing back (the drive stopped taking
/// an upload).
struct Front {
    addr: std::net::SocketAddr,
    down: std::sync::Arc<std::sync::atomic::AtomicBool>,
    stall: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

async fn front(to: std::net::SocketAddr) -> Front {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    };
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (down, stall) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
    let (is_down, is_stalling) = (down.clone(), stall.clone());
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            if is_down.load(Ordering::SeqCst) {
                drop(client);
                continue;
            }
            let stalling = is_stalling.load(Ordering::SeqCst);
            tokio::spawn(async move {
                let mut first = [0u8; 4];
                if stalling && client.peek(&mut first).await.is_ok() && &first == b"PUT " {
                    let mut head = vec![0u8; 4096];
                    let _ = client.read(&mut head).await;
                    tokio::time::sleep(Duration::from_secs(300)).await;
                } else if let Ok(mut server) = tokio::net::TcpStream::connect(to).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
    Front { addr, down, stall }
}

/// A night whose copies a kill -9 cut short (the drive was taking the upload): at the next start
/// they are taken again at once, and the copy reaches the drive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nightly_backup_cut_short_by_a_kill_is_taken_again_at_the_next_start() {
    use zhuli_sim::local_server::LocalServer;
    let nas_dir = support::temp_dir("cut-nas");
    let nas = support::Server::new(LocalServer::rclone_webdav(&nas_dir, "/dav", Some(("box", "nas-pw-93kQ"))));
    let Front { addr: front, stall, .. } = front(nas.addr()).await;
    stall.store(true, std::sync::atomic::Ordering::SeqCst);
    let extra = format!(
        "[backup]\noffsite = \"http://{front}/dav/zhuli-backups\"\nusername = \"box\"\npassword = \"nas-pw-93kQ\"\ntimeout_ms = 60000\n\
         [access]\nadmins = [\"boss\"]\n"
    );
    let (sim, mut agent, clock) = rig("sched-cut", &extra).await;
    let on_nas = || {
        std::fs::read_dir(nas_dir.join("zhuli-backups"))
            .map(|d| {
                d.flatten()
                    .filter(|e| {
                        e.file_name()
                            .to_str()
                            .is_some_and(|n| n.starts_with("zhuli-snapshot-") && !n.ends_with(".part"))
                    })
                    .count()
            })
            .unwrap_or(0)
    };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs() as i64;
    let until = (2 * 3600 + 1800 - (now + 8 * 3600).rem_euclid(86_400)).rem_euclid(86_400) + 5;
    set_clock(&clock, &format!("+{until}s"));
    // The snapshot on the box is taken, and the upload hangs on the drive.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !agent.log().contains("nightly backup on the box") && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(agent.log().contains("nightly backup on the box"), "{}", agent.log());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(on_nas(), 0, "the upload hangs");
    stall.store(false, std::sync::atomic::Ordering::SeqCst);
    restart(&sim, &mut agent).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while on_nas() == 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(on_nas(), 1, "taken again at the start, without waiting for the next night:\n{}", agent.log());
    assert!(agent.log().contains("was cut short (1 in a row)"), "{}", agent.log());
    assert!(said(&sim, "失败").is_empty(), "one night cut short is not a failure: {:?}", sim.replies());
    let _ = std::fs::remove_dir_all(&nas_dir);
}

/// The nightly backup: at `[backup] at` a snapshot on the box and a copy on the network drive,
/// fetched back and verified; a drive that goes away is told to the admins once, and its
/// return too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nightly_backup_lands_on_the_box_and_the_drive_and_a_failure_is_told_once() {
    use zhuli_sim::local_server::LocalServer;
    let nas_dir = support::temp_dir("nightly-nas");
    let nas = support::Server::new(LocalServer::rclone_webdav(&nas_dir, "/dav", Some(("box", "nas-pw-93kQ"))));
    let Front { addr: front, down, .. } = front(nas.addr()).await;
    let extra = format!(
        "[backup]\noffsite = \"http://{front}/dav/zhuli-backups\"\nusername = \"box\"\npassword = \"nas-pw-93kQ\"\ntimeout_ms = 3000\n\
         [access]\nadmins = [\"boss\"]\n"
    );
    let (sim, agent, clock) = rig("sched-nightly", &extra).await;
    let state = agent.config_path().with_file_name("state");
    let snapshots = |dir: &std::path::Path| -> usize {
        std::fs::read_dir(dir)
            .map(|d| d.flatten().filter(|e| e.file_name().to_string_lossy().starts_with("zhuli-snapshot-")).count())
            .unwrap_or(0)
    };
    // Something to count in the drill: a reminder for later.
    let made = ask(&sim, &agent, "boss", "/提醒 每周五 17:00 交周报").await;
    assert!(made.contains("#1"), "{made}");
    // Just past the next 02:30 in Shanghai.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs() as i64;
    let until = (2 * 3600 + 1800 - (now + 8 * 3600).rem_euclid(86_400)).rem_euclid(86_400) + 5;
    set_clock(&clock, &format!("+{until}s"));
    let landed = || snapshots(&state.join("backups")) >= 1 && snapshots(&nas_dir.join("zhuli-backups")) >= 1;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !landed() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(landed(), "a snapshot on the box and on the drive:\n{}", agent.log());
    // The first night on the drive is followed by the restore drill: the newest copy there,
    // restored and opened, its counts beside the live store's.
    wait_said(&sim, &agent, "恢复演练通过", 1).await;
    let drill = &said(&sim, "恢复演练通过")[0];
    assert!(
        drill.text.contains("zhuli-snapshot-") && drill.text.contains("定时任务：1 个（当前 1 个）"),
        "{}",
        drill.text
    );
    assert!(!state.join("backup-drill").exists(), "the scratch copy is removed");
    // `/备份` shows each target's newest copy and its age, and the drill (kept once the night's
    // work is done, a moment after its report).
    let mut shown = ask(&sim, &agent, "boss", "/备份").await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !shown.contains("通过（") && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        shown = ask(&sim, &agent, "boss", "/备份").await;
    }
    for part in ["设备上的备份：最近一份", "异地备份（网络盘）：", "分钟前", "恢复演练：", "通过（zhuli-snapshot-"]
    {
        assert!(shown.contains(part), "{part:?} missing from\n{shown}");
    }

    // The drive goes away: the next night's copy fails, told once; the night after, not again.
    down.store(true, std::sync::atomic::Ordering::SeqCst);
    set_clock(&clock, &format!("+{}s", until + 86_400));
    wait_said(&sim, &agent, "异地备份（网络盘）失败", 1).await;
    set_clock(&clock, &format!("+{}s", until + 2 * 86_400));
    // The second night failed too (the log says so) …
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while agent.log().matches("nightly backup (offsite) failed").count() < 2 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(agent.log().matches("nightly backup (offsite) failed").count(), 2, "{}", agent.log());
    tokio::time::sleep(Duration::from_millis(500)).await;
    // … and the admins were told once.
    assert_eq!(said(&sim, "失败了").len(), 1, "told once: {:?}", said(&sim, "失败了"));
    let told = &said(&sim, "失败了")[0];
    assert_eq!(told.to_user.as_deref(), Some("boss"));
    assert!(!told.text.contains("nas-pw-93kQ"), "{}", told.text);
    let shown = ask(&sim, &agent, "boss", "/备份").await;
    assert!(shown.contains("目前失败："), "{shown}");
    assert!(!shown.contains("nas-pw-93kQ"), "{shown}");
    // Back: the next night's copy works, and the admins hear so.
    down.store(false, std::sync::atomic::Ordering::SeqCst);
    set_clock(&clock, &format!("+{}s", until + 3 * 86_400));
    wait_said(&sim, &agent, "已恢复正常", 1).await;
    assert!(snapshots(&nas_dir.join("zhuli-backups")) >= 2, "{}", agent.log());
    // The drill is monthly: not again on these nights.
    let drills: Vec<_> = sim.replies().into_iter().filter(|r| r.title == "备份恢复演练").collect();
    assert_eq!(drills.len(), 1, "{drills:?}");
    let _ = std::fs::remove_dir_all(&nas_dir);
}
