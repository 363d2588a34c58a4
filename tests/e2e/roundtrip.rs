//! A message in, a reply out: every msgtype, group rules, duplicates, and the OpenAPI fallback.

use std::time::Duration;

use zhuli_sim::dingtalk::{Inject, ReplyRoute};

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_msgtype_gets_its_answer() {
    let (sim, agent) = rig("msgtypes").await;
    let cases = [
        (Inject::text("/ping"), "pong"),
        (Inject::text("/help"), "/status"),
        (Inject::text("what is on my calendar tomorrow?"), "需要大模型"),
        (Inject::of("richText", "summarise this"), "需要大模型"),
        (Inject::of("picture", ""), "收到你的图片"),
        (Inject::of("audio", "/ping"), "pong"),
        (Inject::of("video", ""), "收到你的视频"),
        (Inject::of("file", "Q3 report.pdf"), "Q3 report.pdf"),
        (Inject::of("interactiveCard", ""), "读不了 `interactiveCard` 类型的消息"),
    ];
    let mut ids = Vec::new();
    for (inject, _) in &cases {
        ids.push(sim.inject(inject.clone()));
    }
    assert_each_answered_once(&sim, &agent, &ids, Duration::from_secs(15)).await;
    for ((inject, expect), id) in cases.iter().zip(&ids) {
        let r = &replies_to(&sim, id)[0];
        assert_eq!(r.route, ReplyRoute::SessionWebhook);
        assert!(r.text.contains(expect), "{}: reply {:?} lacks {expect:?}", inject.msgtype, r.text);
    }
    let acked: Vec<String> = sim.acks().into_iter().filter(|a| a.code == 200).map(|a| a.message_id).collect();
    assert!(acked.len() >= ids.len(), "every callback frame is ACKed");
    assert_eq!(sim.unacked(), 0);
    assert_no_secret(&agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_messages_need_an_at_mention() {
    let (sim, agent) = rig("group").await;
    let ignored = sim.inject(Inject::text("/ping").in_group(false).conversation("cidG"));
    let answered = sim.inject(Inject::text("@zhuli /ping").in_group(true).conversation("cidG"));
    assert_each_answered_once(&sim, &agent, std::slice::from_ref(&answered), Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(replies_to(&sim, &ignored).is_empty(), "a group message without @ must not be answered");
    assert_eq!(sim.unacked(), 0, "the ignored message is still ACKed, so it is not redelivered");
    assert_eq!(sim.replies().len(), 1);
    // `/status` in a group says the group's id, which `[health] admin_chat` takes; not in 1:1.
    let in_group = sim.inject(Inject::text("@zhuli /status").in_group(true).conversation("cidG"));
    let direct = sim.inject(Inject::text("/status"));
    assert_each_answered_once(&sim, &agent, &[in_group.clone(), direct.clone()], Duration::from_secs(10)).await;
    let said = &replies_to(&sim, &in_group)[0].text;
    assert!(said.contains("本群的会话 ID 是 `cidG`") && said.contains("admin_chat"), "{said}");
    assert!(!replies_to(&sim, &direct)[0].text.contains("会话 ID"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_msg_ids_are_answered_once() {
    let (sim, agent) = rig("dupes").await;
    let id = sim.inject(Inject::text("/ping"));
    assert_each_answered_once(&sim, &agent, std::slice::from_ref(&id), Duration::from_secs(10)).await;
    for _ in 0..3 {
        sim.inject(Inject::text("/ping").with_msg_id(id.clone()));
    }
    let marker = sim.inject(Inject::text("/help"));
    assert_each_answered_once(&sim, &agent, std::slice::from_ref(&marker), Duration::from_secs(10)).await;
    assert_eq!(replies_to(&sim, &id).len(), 1, "a duplicate was answered");
    assert_eq!(sim.replies().iter().filter(|r| r.text == "pong").count(), 1);
    assert!(agent.log().contains("duplicate"), "dedupe is logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_webhook_falls_back_to_openapi() {
    let (sim, agent) = rig("openapi").await;
    sim.inject(Inject::text("/ping").from("staff-42").expired_webhook());
    sim.inject(Inject::text("/ping").in_group(true).conversation("cidGroupX").expired_webhook());
    let done = sim.wait_until(Duration::from_secs(10), |s| s.replies().len() >= 2).await;
    assert!(done, "replies missing: {:?}\n{}", sim.replies(), agent.log());
    let replies = sim.replies();
    assert!(
        replies
            .iter()
            .any(|r| r.route == ReplyRoute::OtoSend && r.to_user.as_deref() == Some("staff-42") && r.text == "pong")
    );
    assert!(
        replies.iter().any(|r| r.route == ReplyRoute::GroupSend && r.conversation_id.as_deref() == Some("cidGroupX"))
    );
    assert_eq!(sim.counters().tokens_issued, 1, "the access token is cached");

    // A revoked token: the next send gets a 401, the agent fetches a new token and delivers.
    sim.revoke_tokens();
    sim.inject(Inject::text("/ping").from("staff-43").expired_webhook());
    let done = sim.wait_until(Duration::from_secs(10), |s| s.replies().len() >= 3).await;
    assert!(done, "{}", agent.log());
    assert_eq!(sim.counters().tokens_issued, 2);
    assert_no_secret(&agent);
}
