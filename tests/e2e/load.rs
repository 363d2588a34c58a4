//! Sustained load at the gateway's full rate against a gateway that never delivers a frame
//! twice: reading, pings and ACKs never wait behind answering, so nothing is lost and the
//! connection is never dropped.

use std::time::{Duration, Instant};

use zhuli_sim::dingtalk::{Inject, SimConfig, Simulator};

use crate::{chats::covers, support::*};

// A debug build of the agent is some 70 times slower than the box's release build, so this runs
// against a release build, from `.ci/load`.
#[ignore = "run against a release build by .ci/load"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_thousand_messages_at_full_rate_lose_nothing() {
    const N: usize = 100_000;
    // Gateway pings every 250 ms throughout; a write the agent does not read within 5 s drops
    // the connection, and nothing is ever delivered twice.
    let sim = Simulator::start(SimConfig { resend: false, ..sim_config() }).await.expect("sim");
    let agent = connected_agent("load", &sim, "").await;

    let started = Instant::now();
    for i in 0..N {
        // One chat, one person: the heaviest case for the conversation's queue.
        sim.inject(Inject::text(format!("消息 {i}")).conversation("load-chat").from("load-person"));
        if i % 500 == 499 {
            // Let the simulator's writer run; the rate is as fast as the gateway can push.
            tokio::task::yield_now().await;
        }
    }
    let pushed = started.elapsed();
    let acked = sim.wait_until(Duration::from_secs(300), |s| s.counters().acked as usize >= N).await;
    let took = started.elapsed();
    let c = sim.counters();
    assert!(acked, "only {} of {N} ACKed: {c:?}\n{}", c.acked, notable(&agent.log()));
    let lat = sim.ack_latencies();
    let p = |q: f64| lat[((lat.len() - 1) as f64 * q).round() as usize];
    println!(
        "{N} messages queued in {pushed:?}, all ACKed in {took:?} = {:.0} msg/s; queue-to-ACK p50 {:?} p99 {:?} max {:?}",
        N as f64 / took.as_secs_f64(),
        p(0.5),
        p(0.99),
        lat[lat.len() - 1]
    );
    assert_eq!(c.expired, 0, "no frame lost: {c:?}");
    assert_eq!(c.ws_accepted, 1, "the connection was never dropped: {c:?}");
    assert_eq!(c.send_timeouts, 0, "{c:?}");
    // Every gateway ping was answered, the last one perhaps still in flight.
    assert!(c.pings_sent > 0 && c.pings_echoed + 1 >= c.pings_sent, "pings were answered throughout: {c:?}");

    // Each one answered (several together) or its sender told it was left out.
    let all = sim
        .wait_until(Duration::from_secs(300), |s| s.replies().iter().map(|r| covers(&r.text)).sum::<usize>() >= N)
        .await;
    let replies = sim.replies();
    let covered: usize = replies.iter().map(|r| covers(&r.text)).sum();
    assert!(all, "{covered} of {N} answered or told\n{}", tail(&agent.log()));
    assert_eq!(covered, N);
    println!(
        "{N} messages: {} replies, all answered or told in {:?}; 1 connection, {} gateway pings answered",
        replies.len(),
        started.elapsed(),
        c.pings_echoed
    );
    assert!(!agent.log().contains("left unACKed"), "{}", tail(&agent.log()));
}

/// The log's lines about the connection and the store (not the per-message ones).
fn notable(log: &str) -> String {
    log.lines()
        .filter(|l| {
            l.contains("connection") && !l.contains("accepted from") || l.contains("ERROR") || l.contains("WARN")
        })
        .take(80)
        .collect::<Vec<_>>()
        .join("\n")
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}
