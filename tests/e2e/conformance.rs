//! The simulator speaks DingTalk's protocol, not only our reading of it: DingTalk's official
//! Stream SDK (npm `dingtalk-stream`, pinned in tests/sdk-conformance) connects to it, receives
//! a robot message, ACKs it, answers through the session webhook, and echoes SYSTEM pings.
//!
//! Needs Node.js and npm (`tests/run` installs them); the SDK is installed from the lock file.

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use zhuli_sim::dingtalk::{Inject, ReplyRoute, Simulator};

use crate::support::sim_config;

fn sdk_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/sdk-conformance")
}

fn ensure_sdk_installed() {
    crate::support::npm_install(&sdk_dir(), "dingtalk-stream/package.json");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_sdk_connects_receives_acks_and_answers_pings() {
    ensure_sdk_installed();
    let mut cfg = sim_config();
    cfg.ping_interval = Some(Duration::from_millis(200));
    let sim = Simulator::start(cfg.clone()).await.expect("simulator");
    let mut child = Command::new("node")
        .arg("conformance.mjs")
        .current_dir(sdk_dir())
        .env("SIM_API_BASE", sim.api_base())
        .env("SIM_CLIENT_ID", &cfg.client_id)
        .env("SIM_CLIENT_SECRET", &cfg.client_secret)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn node");
    let out = Arc::new(Mutex::new(Vec::<String>::new()));
    for pipe in [
        child.stdout.take().map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        child.stderr.take().map(|p| Box::new(p) as _),
    ]
    .into_iter()
    .flatten()
    {
        let sink = out.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if let Ok(mut o) = sink.lock() {
                    o.push(line);
                }
            }
        });
    }
    let output = || out.lock().map(|o| o.join("\n")).unwrap_or_default();

    let connected = sim.wait_until(Duration::from_secs(20), |s| !s.connections().is_empty()).await;
    assert!(connected, "the official SDK did not connect:\n{}", output());

    let msg_id = sim.inject(Inject::text("hello from the simulator"));
    let acked_and_replied = sim
        .wait_until(Duration::from_secs(10), |s| {
            s.unacked() == 0 && s.replies().iter().any(|r| r.in_reply_to.as_deref() == Some(msg_id.as_str()))
        })
        .await;
    assert!(acked_and_replied, "no ACK or reply from the SDK:\n{}\nacks: {:?}", output(), sim.acks());
    let ack = sim.acks().into_iter().find(|a| a.data.contains("response")).expect("callback ACK recorded");
    assert_eq!(ack.code, 200);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&ack.data).expect("ACK data is JSON"),
        serde_json::json!({"response": null})
    );
    let reply = sim.replies().into_iter().find(|r| r.in_reply_to.as_deref() == Some(msg_id.as_str())).expect("reply");
    assert_eq!(reply.route, ReplyRoute::SessionWebhook);
    assert_eq!(reply.text, "sdk echo: hello from the simulator");
    assert!(output().contains(&msg_id), "the SDK saw the msgId:\n{}", output());

    let pinged = sim.wait_until(Duration::from_secs(10), |s| s.counters().pings_echoed >= 2).await;
    assert!(pinged, "the SDK did not echo SYSTEM pings: {:?}\n{}", sim.counters(), output());
    assert_eq!(sim.counters().ping_echo_mismatch, 0);

    let _ = child.kill();
    let _ = child.wait();
}
