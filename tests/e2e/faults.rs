//! The connection never silently dies: each failure the field knows, reproduced by the
//! simulator, and not one message lost or answered twice.

use std::time::Duration;

use zhuli_sim::dingtalk::{ConnMode, Inject, ReplyRoute, SimConfig, Simulator, ThrottleKind};

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_mid_frame_at_any_byte_loses_and_doubles_nothing() {
    let (sim, agent) = rig("midframe").await;
    let mut ids = Vec::new();
    // From inside the WebSocket header to deep in the JSON payload.
    for cut in [1usize, 2, 3, 9, 40, 200, 700] {
        sim.cut_next_frame_at(cut);
        ids.push(sim.inject(Inject::text(format!("/ping cut at {cut}"))));
        ids.extend(burst(&sim, 2, &format!("after{cut}")));
        // Let the agent notice, reconnect and receive the redelivery before the next cut.
        let connects = sim.counters().ws_accepted;
        assert!(
            sim.wait_until(Duration::from_secs(10), |s| s.counters().ws_accepted > connects && s.unacked() == 0).await,
            "no reconnect after a cut at byte {cut}\n{}",
            agent.log()
        );
    }
    assert_each_answered_once(&sim, &agent, &ids, Duration::from_secs(20)).await;
    assert!(sim.counters().redelivered >= 7, "each cut frame was redelivered: {:?}", sim.counters());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_is_make_before_break_and_loses_nothing() {
    let (sim, agent) = rig("disconnect").await;
    let mut ids = burst(&sim, 5, "before");
    for round in 0..3 {
        sim.disconnect_all();
        // Messages sent inside the window where the old socket is open but no longer delivers.
        ids.extend(burst(&sim, 10, &format!("window{round}")));
        tokio::time::sleep(Duration::from_millis(300)).await;
        ids.extend(burst(&sim, 5, &format!("later{round}")));
    }
    assert_each_answered_once(&sim, &agent, &ids, Duration::from_secs(20)).await;
    let c = sim.counters();
    assert!(c.max_concurrent >= 2, "the new connection opens while the old one is still open: {c:?}");
    assert!(c.ws_accepted >= 4, "{c:?}");
    assert!(agent.log().contains("opening the next one before closing it"));
    assert_no_secret(&agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zombie_socket_that_answers_pings_is_replaced() {
    let (sim, agent) = rig("zombie").await;
    sim.degrade_all(ConnMode::Zombie);
    let ids = burst(&sim, 10, "zombie");
    assert_each_answered_once(&sim, &agent, &ids, Duration::from_secs(15)).await;
    assert!(agent.log().contains("zombie connection"), "{}", agent.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_socket_without_close_event_is_replaced() {
    let (sim, agent) = rig("frozen").await;
    sim.degrade_all(ConnMode::Frozen);
    let ids = burst(&sim, 10, "frozen");
    assert_each_answered_once(&sim, &agent, &ids, Duration::from_secs(15)).await;
    let log = agent.log();
    assert!(log.contains("no pong within") || log.contains("zombie connection"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnecting_never_gives_up() {
    let (sim, agent) = rig("nevergiveup").await;
    sim.fail_opens(15);
    sim.drop_all();
    let ids = burst(&sim, 5, "outage");
    assert_each_answered_once(&sim, &agent, &ids, Duration::from_secs(30)).await;
    let c = sim.counters();
    assert!(c.opens_refused >= 15, "{c:?}");
    let log = agent.log();
    assert!(log.contains("reconnect storm"), "15 failures in a row are reported as a storm");
    assert!(log.contains("retrying"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_reboot_blackholes_then_recovers() {
    let (sim, agent) = rig("router").await;
    // The router drops everything silently: sockets freeze with no FIN and no new connection
    // can be opened for two seconds.
    sim.refuse_opens_for(Duration::from_secs(2));
    sim.degrade_all(ConnMode::Frozen);
    let ids = burst(&sim, 10, "reboot");
    assert_each_answered_once(&sim, &agent, &ids, Duration::from_secs(20)).await;
    assert!(sim.counters().opens_refused >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_connection_that_is_a_zombie_from_the_start_is_replaced() {
    let (sim, agent) = rig("zombiestart").await;
    sim.set_next_conn_mode(Some(ConnMode::Zombie));
    sim.drop_all();
    let ids = burst(&sim, 3, "z");
    // The first reconnect lands on a zombie; let it be detected once, then heal the gateway.
    assert!(sim.wait_until(Duration::from_secs(10), |s| s.counters().ws_accepted >= 3).await, "{}", agent.log());
    sim.set_next_conn_mode(None);
    assert_each_answered_once(&sim, &agent, &ids, Duration::from_secs(15)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_backs_off_and_delivers() {
    let (sim, agent) = rig("throttle").await;
    for (kind, n) in [(ThrottleKind::Http429, 4), (ThrottleKind::QpsLimit, 3), (ThrottleKind::Errcode90002, 3)] {
        let before = sim.counters().throttled;
        sim.throttle_sends(n, kind);
        let id = sim.inject(Inject::text("/ping"));
        assert_each_answered_once(&sim, &agent, std::slice::from_ref(&id), Duration::from_secs(15)).await;
        assert_eq!(sim.counters().throttled - before, u64::from(n), "{kind:?}");
    }
    // Flow control on the 1:1 OpenAPI send (expired webhook): the recipient list says "later".
    sim.throttle_sends(2, ThrottleKind::FlowControlled);
    sim.inject(Inject::text("/ping").from("staff-fc").expired_webhook());
    assert!(
        sim.wait_until(Duration::from_secs(15), |s| s
            .replies()
            .iter()
            .any(|r| r.to_user.as_deref() == Some("staff-fc")))
            .await,
        "{}",
        agent.log()
    );
    assert!(agent.log().contains("retrying in"));
    assert_no_secret(&agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_are_refused_and_the_agent_goes_on() {
    let (sim, mut agent) = rig("badframes").await;
    sim.inject_raw("{not json");
    sim.inject_raw("[1,2,3]");
    sim.inject_raw(r#"{"type":"SYSTEM"}"#);
    sim.inject_raw(r#"{"specVersion":"1.0","type":"NEWTYPE","headers":{"messageId":"n1","topic":"x"},"data":"{}"}"#);
    sim.inject_raw(r#"{"specVersion":"1.0","type":"CALLBACK","headers":{"messageId":"t404","topic":"/v1.0/unknown/topic"},"data":"{}"}"#);
    sim.inject_raw(r#"{"specVersion":"1.0","type":"CALLBACK","headers":{"messageId":"badmsg","topic":"/v1.0/im/bot/messages/get"},"data":"{\"msgtype\":\"text\"}"}"#);
    sim.inject_raw(r#"{"specVersion":"1.0","type":"EVENT","headers":{"messageId":"ev1","topic":"chat_update","eventType":"chat_update"},"data":"{}"}"#);
    let big = format!(
        r#"{{"specVersion":"1.0","type":"CALLBACK","headers":{{"messageId":"huge1","topic":"/v1.0/im/bot/messages/get"}},"data":"{}"}}"#,
        "x".repeat(1536 * 1024)
    );
    sim.inject_raw(big);
    assert!(
        sim.wait_until(Duration::from_secs(10), |s| {
            let acks = s.acks();
            let code = |id: &str| acks.iter().find(|a| a.message_id == id).map(|a| a.code);
            code("t404") == Some(404)
                && code("badmsg") == Some(200)
                && code("ev1") == Some(200)
                && code("huge1") == Some(500)
        })
        .await,
        "acks: {:?}\n{}",
        sim.acks().iter().map(|a| (&a.message_id, a.code)).collect::<Vec<_>>(),
        agent.log()
    );
    let id = sim.inject(Inject::text("/ping"));
    assert_each_answered_once(&sim, &agent, std::slice::from_ref(&id), Duration::from_secs(10)).await;

    // A text frame that is not UTF-8 fails the WebSocket (RFC 6455); the agent reconnects.
    let accepted = sim.counters().ws_accepted;
    sim.inject_invalid_utf8();
    assert!(sim.wait_until(Duration::from_secs(10), |s| s.counters().ws_accepted > accepted).await, "{}", agent.log());
    let id = sim.inject(Inject::text("/ping"));
    assert_each_answered_once(&sim, &agent, std::slice::from_ref(&id), Duration::from_secs(10)).await;

    let log = agent.log();
    for expect in [
        "not valid JSON",
        "not a JSON object",
        "no \"headers\" field",
        "unknown frame type",
        "answered 404",
        "exceeds the 1 MiB limit",
        "unusable",
    ] {
        assert!(log.contains(expect), "log lacks {expect:?}:\n{log}");
    }
    assert!(log.contains("socket error") && log.contains("UTF-8"), "the non-UTF-8 frame is named: {log}");
    assert!(!log.contains("panicked"), "{log}");
    assert!(agent.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pings_are_echoed_exactly() {
    let (sim, agent) = rig("pings").await;
    assert!(sim.wait_until(Duration::from_secs(10), |s| s.counters().pings_echoed >= 4).await, "{}", agent.log());
    assert_eq!(sim.counters().ping_echo_mismatch, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_say_so_and_keep_retrying() {
    let sim = Simulator::start(sim_config()).await.expect("sim");
    let wrong = "wrong-secret-Kp2Lm9";
    let mut agent = spawn_agent("badcreds", &config_for(&sim, wrong, ""));
    assert!(sim.wait_until(Duration::from_secs(10), |s| s.counters().opens_refused >= 3).await);
    let log = agent.log();
    assert!(log.contains("refused the credentials") && log.contains("client_secret"), "{log}");
    assert!(!log.contains(wrong), "the secret must not be logged");
    assert!(agent.is_running(), "a refused open is retried, not fatal");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_to_a_remote_host_is_refused_at_start() {
    let sim = Simulator::start(sim_config()).await.expect("sim");
    let toml = config_for(&sim, SECRET, "").replace(&sim.api_base(), "http://192.0.2.10:8080");
    let mut agent = spawn_agent("plainremote", &toml);
    let code = agent.wait_exit(Duration::from_secs(10));
    assert_ne!(code, Some(0));
    assert!(code.is_some(), "the agent must exit");
    let log = agent.log();
    assert!(log.contains("not loopback") && log.contains("https://"), "{log}");
    assert_eq!(sim.counters().opens, 0);
}

/// The wall clock of the agent's process jumps (an RTC reset, NTP stepping a laptop-style clock)
/// while its monotonic clock runs on. Timeouts are monotonic, so the connection is not torn down;
/// the session webhook's expiry is wall-clock (DingTalk's), so a jump forward makes the agent
/// take the OpenAPI route instead; no reply is lost either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wall_clock_jumps_do_not_strand_the_connection() {
    let sim = Simulator::start(sim_config()).await.expect("sim");
    let (clock, env) = crate::support::fake_clock("clockjump");
    let agent = spawn_agent_with_env("clockjump", &config_for(&sim, SECRET, ""), &env);
    assert!(sim.wait_until(Duration::from_secs(15), |s| !s.connections().is_empty()).await, "{}", agent.log());

    // Each message comes from its own user, so a reply is found by webhook or by recipient.
    let answers = |sim: &Simulator, tag: &str, i: usize, id: &str| {
        let staff = format!("staff-{tag}-{i}");
        sim.replies()
            .iter()
            .filter(|r| r.in_reply_to.as_deref() == Some(id) || r.to_user.as_deref() == Some(staff.as_str()))
            .count()
    };
    for (jump, tag) in [("+0", "before"), ("+3h", "forward"), ("-2d", "backward"), ("+0", "back-to-now")] {
        std::fs::write(&clock, jump).expect("clock file");
        // Longer than the idle window, so a wall-clock timer would have fired by now.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let ids = burst(&sim, 3, tag);
        let all = sim
            .wait_until(Duration::from_secs(10), |s| ids.iter().enumerate().all(|(i, id)| answers(s, tag, i, id) >= 1))
            .await;
        assert!(all, "clock {jump}: replies missing: {:?}\n{}", sim.replies(), agent.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(answers(&sim, tag, i, id), 1, "clock {jump}: message {id} answered more than once");
        }
    }
    let c = sim.counters();
    assert_eq!(c.ws_accepted, 1, "a clock jump must not cost the connection: {c:?}\n{}", agent.log());
    // 3 h ahead, every session webhook looks expired: the OpenAPI route carried those replies.
    assert!(sim.replies().iter().any(|r| r.route == ReplyRoute::OtoSend), "{:?}", sim.replies());
    let _ = std::fs::remove_dir_all(clock.parent().expect("temp dir"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_tickets_and_tls_failures_are_logged_and_retried() {
    let sim = Simulator::start(sim_config()).await.expect("sim");
    sim.hand_out_bad_tickets(3);
    let agent = spawn_agent("badticket", &config_for(&sim, SECRET, ""));
    assert!(sim.wait_until(Duration::from_secs(15), |s| !s.connections().is_empty()).await, "{}", agent.log());
    assert_eq!(sim.counters().ws_rejected, 3);
    let log = agent.log();
    assert!(log.contains("WebSocket handshake with") && log.contains("401"), "{log}");
    assert!(!log.contains("ticket="), "the ticket is not logged");
    let id = sim.inject(Inject::text("/ping"));
    assert_each_answered_once(&sim, &agent, std::slice::from_ref(&id), Duration::from_secs(10)).await;
    drop(agent);

    // https:// to a port that speaks plain HTTP: the TLS handshake fails, clearly, and is retried.
    let https = config_for(&sim, SECRET, "").replace("http://", "https://");
    let mut agent = spawn_agent("tlsfail", &https);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline && agent.log().matches("stream connect failed").count() < 3 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = agent.log();
    assert!(log.matches("stream connect failed").count() >= 3, "{log}");
    assert!(
        log.to_lowercase().contains("tls") || log.contains("InvalidContentType") || log.contains("corrupt"),
        "{log}"
    );
    assert!(agent.is_running());
    assert_no_secret(&agent);
}

/// 150 messages at 50 a second from as many people, `fault` struck once a third of the way in,
/// against a gateway that holds an undelivered message for 60 s as DingTalk does: each is
/// answered exactly once.
async fn through_a_fault(tag: &str, fault: impl Fn(&Simulator, &[String])) -> (Simulator, Agent) {
    let sim =
        Simulator::start(SimConfig { hold_for: Some(Duration::from_secs(60)), ..sim_config() }).await.expect("sim");
    let agent = connected_agent(tag, &sim, "").await;
    let mut ids = Vec::new();
    let started = std::time::Instant::now();
    for i in 0..150u32 {
        if i == 50 {
            fault(&sim, &ids);
        }
        ids.push(sim.inject(Inject::text(format!("/ping {tag} {i}")).from(format!("staff-{tag}-{i}"))));
        let next = started + Duration::from_millis(20 * u64::from(i + 1));
        tokio::time::sleep(next.saturating_duration_since(std::time::Instant::now())).await;
    }
    assert_each_answered_once(&sim, &agent, &ids, Duration::from_secs(30)).await;
    let c = sim.counters();
    assert_eq!(c.expired, 0, "nothing held past the gateway's window: {c:?}");
    assert_no_secret(&agent);
    (sim, agent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_disconnect_loses_none_of_150() {
    let (sim, _) = through_a_fault("f-disconnect", |s, _| s.disconnect_all()).await;
    assert!(sim.counters().ws_accepted >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_zombie_loses_none_of_150() {
    let (sim, agent) = through_a_fault("f-zombie", |s, _| s.degrade_all(ConnMode::Zombie)).await;
    assert!(sim.counters().ws_accepted >= 2);
    assert!(agent.log().contains("zombie connection"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_silent_drop_loses_none_of_150() {
    let (sim, _) = through_a_fault("f-silent", |s, _| s.degrade_all(ConnMode::Frozen)).await;
    assert!(sim.counters().ws_accepted >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_hard_close_loses_none_of_150() {
    let (sim, _) = through_a_fault("f-close", |s, _| s.drop_all()).await;
    assert!(sim.counters().ws_accepted >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_duplicates_are_answered_once_of_150() {
    let (_, agent) = through_a_fault("f-dup", |s, ids| {
        // The gateway sends 20 messages again under new frame ids.
        for id in ids.iter().step_by(2).take(20) {
            s.inject(Inject::text("/ping again").with_msg_id(id.clone()));
        }
    })
    .await;
    assert!(agent.log().matches("is a duplicate").count() >= 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_throttle_loses_none_of_150() {
    let (sim, _) = through_a_fault("f-throttle", |s, _| s.throttle_sends(10, ThrottleKind::Http429)).await;
    assert!(sim.counters().throttled >= 10);
}

/// A zombie must be found while the gateway still holds what it swallowed. Scaled down: the
/// gateway pings every 2 s and holds a message 6 s; the agent runs with its default idle window
/// (40 s) and must learn from the pings that the connection is dead after 1.5 × 2 s + 1 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zombie_is_found_inside_the_gateways_hold_window() {
    let sim = Simulator::start(SimConfig {
        ping_interval: Some(Duration::from_secs(2)),
        hold_for: Some(Duration::from_secs(6)),
        ..sim_config()
    })
    .await
    .expect("sim");
    let agent = spawn_agent("zombiehold", &config_with(&sim, SECRET, "", "retry_initial_ms = 50\n", ""));
    assert!(sim.wait_until(Duration::from_secs(15), |s| !s.connections().is_empty()).await, "{}", agent.log());
    // Two gateway pings show their interval.
    assert!(sim.wait_until(Duration::from_secs(10), |s| s.counters().pings_echoed >= 2).await);
    let fault = std::time::Instant::now();
    sim.degrade_all(ConnMode::Zombie);
    let ids = burst(&sim, 5, "held");
    assert!(
        sim.wait_until(Duration::from_secs(10), |s| s.counters().ws_accepted >= 2).await,
        "zombie not found within 10 s\n{}",
        agent.log()
    );
    let found = fault.elapsed();
    println!("zombie found {found:?} after the fault (gateway pings every 2 s, holds 6 s)");
    assert_each_answered_once(&sim, &agent, &ids, Duration::from_secs(10)).await;
    assert_eq!(sim.counters().expired, 0, "what the zombie swallowed was delivered again: {:?}", sim.counters());
    assert!(agent.log().contains("the gateway pings every"), "{}", agent.log());
}
