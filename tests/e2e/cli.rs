//! The subcommands a person runs: `zhuli sim` driven over its control API with a real agent,
//! and `zhuli demo` fed from a pipe, as the README's first command.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use zhuli::dingtalk::sim::SimConfig;

use crate::support::{spawn_agent, temp_dir};

/// A minimal HTTP/1.1 exchange with the simulator's control API.
fn http(base: &str, method: &str, path: &str, body: &str) -> String {
    let addr = base.trim_start_matches("http://");
    let mut s = TcpStream::connect(addr).expect("connect to sim");
    s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    write!(s, "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())
        .expect("write request");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[test]
fn sim_subcommand_drives_a_real_agent_over_its_control_api() {
    let dir = temp_dir("simcli");
    let mut sim = Command::new(env!("CARGO_BIN_EXE_zhuli"))
        .args(["sim", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn zhuli sim");
    let mut lines = BufReader::new(sim.stdout.take().expect("stdout")).lines();
    let first = lines.next().and_then(Result::ok).expect("banner line");
    let base = first.rsplit(' ').next().expect("address").to_owned();
    assert!(base.starts_with("http://127.0.0.1:"), "{first}");
    // The printed [dingtalk] section is what an operator pastes into the agent's config.
    let mut section = String::new();
    for line in lines.by_ref().map_while(Result::ok) {
        if line.starts_with("[dingtalk]") || !section.is_empty() {
            if line.is_empty() {
                break;
            }
            section.push_str(&line);
            section.push('\n');
        }
    }
    assert!(section.contains(&SimConfig::default().client_id), "{section}");
    let fast = "[dingtalk.stream]\nbackoff_initial_ms = 50\nbackoff_max_ms = 200\n";
    let agent = spawn_agent("simcli", &format!("{section}{fast}"));

    let ask = |text: &str| http(&base, "POST", "/_sim/messages", &format!("{{\"text\":\"{text}\"}}"));
    let replies = || http(&base, "GET", "/_sim/replies", "");
    let wait_for = |needle: &str| {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if replies().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    };
    assert!(ask("/ping").contains("msgId"));
    assert!(wait_for("pong"), "no pong; agent log:\n{}", agent.log());
    let fault = http(&base, "POST", "/_sim/faults", r#"{"fault":"disconnect"}"#);
    assert!(fault.contains("\"ok\":true"), "{fault}");
    ask("/help");
    assert!(wait_for("/status"), "no help after a disconnect; agent log:\n{}", agent.log());
    let bad = http(&base, "POST", "/_sim/faults", r#"{"fault":"meteor"}"#);
    assert!(bad.contains("400") && bad.contains("unknown fault"), "{bad}");
    let _ = sim.kill();
    let _ = sim.wait();
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn demo_answers_a_chat_from_a_pipe() {
    let mut demo = Command::new(env!("CARGO_BIN_EXE_zhuli"))
        .arg("demo")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn zhuli demo");
    demo.stdin
        .take()
        .expect("stdin")
        .write_all(b"/ping\n!group /status\n!quiet nobody asked\n!disconnect\nwhat is on my calendar?\n!file notes.txt\n!quit\n")
        .expect("write chat");
    let started = Instant::now();
    let status = loop {
        if let Some(s) = demo.try_wait().expect("wait") {
            break s;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "demo did not finish");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut out = String::new();
    demo.stdout.take().expect("stdout").read_to_string(&mut out).expect("read stdout");
    let mut err = String::new();
    demo.stderr.take().expect("stderr").read_to_string(&mut err).expect("read stderr");
    assert!(status.success(), "{out}\n{err}");
    for expect in [
        "zhuli> pong",
        "zhuli> **zhuli 助理状态**",
        "(no reply: the robot was not @mentioned)",
        "(gateway sent SYSTEM disconnect)",
        "需要大模型",
        "notes.txt",
    ] {
        assert!(out.contains(expect), "demo output lacks {expect:?}:\n{out}\n{err}");
    }
}
