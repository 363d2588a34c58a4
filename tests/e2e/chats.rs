//! One conversation never holds up another: per-conversation order, turns of different chats in
//! parallel, a busy chat told rather than left in silence, and nothing lost under load.

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use zhuli_sim::{
    dingtalk::{Inject, RecordedReply, SimConfig, Simulator},
    llm::LlmSim,
};

use crate::support::*;

/// How many of the person's messages a reply covers: several answered together, several left
/// out, or a notice that covers none.
pub fn covers(text: &str) -> usize {
    let count = |marker: &str, after: &str| -> Option<usize> {
        let at = text.find(marker)? + marker.len();
        let rest = &text[at..];
        let end = rest.find(after)?;
        rest[..end].trim().parse().ok()
    };
    if let Some(n) = count("一并回答你刚才的", "条消息") {
        return n;
    }
    if let Some(n) = count("你的", "条消息没有处理") {
        return n;
    }
    if text.contains("条在排队") {
        return 0;
    }
    1
}

/// The message ids the agent's log says were answered (alone or together) or left out with the
/// sender told.
pub fn covered_ids(log: &str) -> HashSet<String> {
    let mut ids = HashSet::new();
    for line in log.lines() {
        for (marker, end) in
            [("reply to ", " delivered"), ("message ", " answered together with"), ("message ", " left out (")]
        {
            if let Some(at) = line.find(marker) {
                let rest = &line[at + marker.len()..];
                if let Some(stop) = rest.find(end) {
                    ids.insert(rest[..stop].to_owned());
                }
            }
        }
    }
    ids
}

fn in_chat(sim: &Simulator, chat: &str) -> Vec<RecordedReply> {
    sim.replies().into_iter().filter(|r| r.conversation_id.as_deref() == Some(chat)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_busy_chat_never_holds_up_another() {
    // A gateway that never delivers a frame twice: whatever the agent fails to take is lost.
    let sim = Simulator::start(SimConfig { resend: false, ..sim_config() }).await.expect("sim");
    // DingTalk's own limits: 20 messages a minute into one chat.
    let agent =
        spawn_agent("busy", &config_with(&sim, SECRET, "idle_window_ms = 1000\n", "retry_initial_ms = 50\n", ""));
    assert!(sim.wait_until(Duration::from_secs(15), |s| !s.connections().is_empty()).await, "{}", agent.log());

    let (mut busy, mut quiet) = (Vec::new(), Vec::new());
    let started = Instant::now();
    for i in 0..600u32 {
        busy.push(
            sim.inject(Inject::text(format!("第 {i} 条：帮我看看这个")).conversation("busy-chat").from("busy-person")),
        );
        if i % 100 == 50 {
            let at = sim.now_ms();
            quiet.push((
                sim.inject(Inject::text("你好，今天有什么安排？").conversation("quiet-chat").from("second-person")),
                at,
            ));
        }
        // 50 messages a second.
        let next = started + Duration::from_millis(20 * u64::from(i + 1));
        tokio::time::sleep(next.saturating_duration_since(Instant::now())).await;
    }
    let burst = started.elapsed();

    // The second person is answered at the normal latency while the busy chat waits for its budget.
    assert!(
        sim.wait_until(Duration::from_secs(10), |s| quiet.iter().all(|(id, _)| !replies_to(s, id).is_empty())).await,
        "the second person was not answered during the burst\n{:?}\n{}",
        sim.counters(),
        agent.log()
    );
    let mut latencies = Vec::new();
    for (id, at) in &quiet {
        let r = &replies_to(&sim, id)[0];
        latencies.push(r.at_ms.saturating_sub(*at));
    }
    println!("second person's reply latencies during the burst (ms): {latencies:?}");
    assert!(latencies.iter().all(|ms| *ms <= 2_000), "second person waited: {latencies:?} ms");

    // Every one of the 600 is eventually answered or its sender told.
    let all = sim
        .wait_until(Duration::from_secs(240), |s| {
            in_chat(s, "busy-chat").iter().map(|r| covers(&r.text)).sum::<usize>() >= busy.len()
        })
        .await;
    let replies = in_chat(&sim, "busy-chat");
    let told: usize = replies.iter().map(|r| covers(&r.text)).sum();
    assert!(all, "{told} of 600 answered or told\n{:?}\n{}", sim.counters(), agent.log());
    assert_eq!(told, busy.len(), "each message is covered once");
    // The agent logs a reply once DingTalk has answered its send: give the last one a moment.
    let mut missing: Vec<&String> = busy.iter().collect();
    for _ in 0..100 {
        let covered = covered_ids(&agent.log());
        missing.retain(|id| !covered.contains(*id));
        if missing.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        missing.is_empty(),
        "{} messages neither answered nor told: {:?}\n{}",
        missing.len(),
        &missing[..missing.len().min(5)],
        agent
            .log()
            .lines()
            .filter(|l| missing.first().is_some_and(|m| l.contains(m.as_str())))
            .collect::<Vec<_>>()
            .join("\n")
    );

    let c = sim.counters();
    assert_eq!(c.expired, 0, "no frame was left unACKed: {c:?}");
    assert_eq!(c.ws_accepted, 1, "the connection never dropped: {c:?}");
    assert_eq!(c.send_timeouts, 0, "{c:?}");
    let notices = replies.iter().filter(|r| r.text.contains("条在排队")).count();
    assert_eq!(notices, 1, "one notice that answers come in order");
    let together = replies.iter().filter(|r| r.text.contains("一并回答")).count();
    let left_out: usize = replies.iter().filter(|r| r.text.contains("没有处理")).map(|r| covers(&r.text)).sum();
    println!(
        "busy chat: 600 sent in {burst:?}; {} replies: {together} answering several together, {notices} backlog notice, \
         {left_out} messages left out and told; 0 lost; {} ACKed; 1 connection",
        replies.len(),
        c.acked
    );
    assert!(!agent.log().contains(" lost"), "{}", agent.log());
    assert_no_secret(&agent);
}

async fn slow_model() -> LlmSim {
    let llm = LlmSim::start().await.expect("llm sim");
    llm.set_echo(true);
    llm.set_answer_delay(Duration::from_secs(2));
    llm
}

fn llm_config(llm: &LlmSim) -> String {
    format!(
        "[llm]\nbase_url = {:?}\nwhere = \"local\"\nmodel = \"sim-model\"\napi_key = \"sk-e2e-chats-0001\"\ntimeout_ms = 20000\nmax_retries = 1\n",
        llm.base_url()
    )
}

/// The texts of a request's messages, in order.
fn transcript(body: &serde_json::Value) -> Vec<String> {
    body["messages"]
        .as_array()
        .map(|m| {
            m.iter()
                .filter(|m| m["role"] == "user" || m["role"] == "assistant")
                .map(|m| m["content"].as_str().unwrap_or_default().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turns_of_one_conversation_run_in_order_and_chats_overlap() {
    let sim = Simulator::start(sim_config()).await.expect("sim");
    let llm = slow_model().await;
    let agent = connected_agent("order", &sim, &llm_config(&llm)).await;

    // Two messages 10 ms apart in one chat.
    let a = sim.inject(Inject::text("第一个问题：周五的会在哪里？").conversation("order-chat").from("asker"));
    tokio::time::sleep(Duration::from_millis(10)).await;
    let b = sim.inject(Inject::text("第二个问题：需要带电脑吗？").conversation("order-chat").from("asker"));
    assert!(
        sim.wait_until(Duration::from_secs(30), |s| !replies_to(s, &a).is_empty() && !replies_to(s, &b).is_empty())
            .await,
        "{}",
        agent.log()
    );
    let (ra, rb) = (replies_to(&sim, &a).remove(0), replies_to(&sim, &b).remove(0));
    assert!(ra.text.contains("第一个问题") && !ra.text.contains("第二个问题"), "{}", ra.text);
    assert!(rb.text.contains("第二个问题"), "{}", rb.text);
    assert!(ra.at_ms <= rb.at_ms, "replies in order: {} then {}", ra.at_ms, rb.at_ms);
    let requests = llm.requests();
    assert_eq!(requests.len(), 2, "one turn each");
    let first_done = requests[0].answered.expect("answered");
    assert!(requests[1].arrived >= first_done, "the second turn starts after the first ends");
    let second = transcript(&requests[1].body);
    let pos = |needle: &str| second.iter().position(|t| t.contains(needle));
    let (qa, aa, qb) =
        (pos("第一个问题"), pos("回答：").filter(|i| second[*i].contains("第一个问题")), pos("第二个问题"));
    assert!(
        qa.is_some() && aa.is_some() && qa < aa && aa < qb,
        "the second request holds the first exchange before it: {second:?}"
    );

    // 20 chats at once: their turns overlap.
    let before = llm.requests().len();
    let ids: Vec<String> = (0..20)
        .map(|i| {
            sim.inject(
                Inject::text(format!("第 {i} 个会话的问题")).conversation(format!("chat-{i}")).from(format!("p{i}")),
            )
        })
        .collect();
    assert_each_answered_once(&sim, &agent, &ids, Duration::from_secs(60)).await;
    let turns: Vec<_> = llm.requests().into_iter().skip(before).collect();
    assert_eq!(turns.len(), 20);
    // Most turns running at one moment.
    let mut overlap = 0;
    for t in &turns {
        let at = t.arrived;
        overlap = overlap.max(turns.iter().filter(|u| u.arrived <= at && u.answered.is_some_and(|d| d > at)).count());
    }
    println!("20 chats at once, a model that takes 2 s: up to {overlap} turns ran at the same time");
    assert!(overlap >= 10, "turns of different chats run in parallel: at most {overlap} at once");
    assert_no_secret(&agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_survives_kill_9_and_texts_queued_during_a_turn_are_answered_together() {
    let sim = Simulator::start(sim_config()).await.expect("sim");
    let llm = slow_model().await;
    let mut agent = connected_agent("resume", &sim, &llm_config(&llm)).await;

    let a = sim.inject(Inject::text("问题甲：报销单放哪里？").conversation("resume-chat").from("asker"));
    assert!(sim.wait_until(Duration::from_secs(30), |s| !replies_to(s, &a).is_empty()).await, "{}", agent.log());
    // B starts a turn; C waits behind it; the agent dies in the middle of B's turn.
    let b = sim.inject(Inject::text("问题乙：谁来审批？").conversation("resume-chat").from("asker"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while llm.requests().len() < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let c = sim.inject(Inject::text("问题丙：多久能批下来？").conversation("resume-chat").from("asker"));
    assert!(sim.wait_until(Duration::from_secs(5), |s| s.unacked() == 0).await, "B and C are recorded and ACKed");
    agent.restart();

    // After the restart the inbox resumes in order: B, then C, each with the exchanges before
    // it in the history.
    assert!(
        sim.wait_until(Duration::from_secs(40), |s| !replies_to(s, &b).is_empty() && !replies_to(s, &c).is_empty())
            .await,
        "{:?}\n{}",
        sim.counters(),
        agent.log()
    );
    let (rb, rc) = (replies_to(&sim, &b).remove(0), replies_to(&sim, &c).remove(0));
    assert!(rb.at_ms <= rc.at_ms && rb.text.contains("问题乙") && rc.text.contains("问题丙"), "{rb:?} {rc:?}");
    let last = transcript(&llm.requests().pop().expect("a request").body);
    let pos = |needle: &str| last.iter().position(|t| t.contains(needle));
    assert!(
        pos("问题甲").is_some() && pos("问题甲") < pos("问题乙") && pos("问题乙") < pos("问题丙"),
        "C's request holds A's and B's exchanges, in order: {last:?}"
    );
    assert_eq!(replies_to(&sim, &a).len(), 1, "A is not answered again");

    // Texts sent while a turn runs are answered together in the next turn, and the reply says so.
    let d = sim.inject(Inject::text("问题丁：今天几点下班？").conversation("resume-chat").from("asker"));
    let deadline = Instant::now() + Duration::from_secs(10);
    let asked = llm.requests().len();
    while llm.requests().len() == asked && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let e = sim.inject(Inject::text("问题戊：明天呢？").conversation("resume-chat").from("asker"));
    let f = sim.inject(Inject::text("问题己：后天呢？").conversation("resume-chat").from("asker"));
    assert!(sim.wait_until(Duration::from_secs(30), |s| !replies_to(s, &f).is_empty()).await, "{}", agent.log());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(replies_to(&sim, &d).len(), 1, "D has a turn of its own");
    assert!(replies_to(&sim, &e).is_empty(), "E is answered by the reply to F");
    let together = replies_to(&sim, &f).remove(0);
    assert!(together.text.contains("一并回答你刚才的 2 条消息"), "the reply says so: {}", together.text);
    let joined = transcript(&llm.requests().pop().expect("a request").body).pop().unwrap_or_default();
    assert!(
        joined.find("问题戊").is_some_and(|i| joined.find("问题己").is_some_and(|j| i < j)),
        "E before F in one turn: {joined}"
    );
    assert_no_secret(&agent);
}
