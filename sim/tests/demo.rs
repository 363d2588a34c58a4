//! `zhuli-sim demo`, the README's first command, fed from a pipe: its transcript, its log lines
//! kept off the prompt, and its folder (which holds a store key) gone after Ctrl-C or SIGTERM.

use std::{
    io::{Read, Write},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("zhuli-e2e-{tag}-{}-{:x}", std::process::id(), rand::random::<u32>()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

#[test]
fn demo_answers_a_chat_from_a_pipe() {
    let mut demo = Command::new(env!("CARGO_BIN_EXE_zhuli-sim"))
        .arg("demo")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn zhuli-sim demo");
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
        "— connection closed by the gateway; reconnected in ",
        ", nothing lost —",
        "需要大模型",
        "(the demo has no model: to have questions answered, start it with --llm-url",
        "notes.txt",
    ] {
        assert!(out.contains(expect), "demo output lacks {expect:?}:\n{out}\n{err}");
    }
}

/// `zhuli-sim demo` with a pipe for its input that stays open, and its output as it comes.
struct Demo {
    child: Child,
    input: ChildStdin,
    output: Arc<Mutex<String>>,
}

impl Demo {
    fn start(tmp: &Path, env: &[(&str, &str)]) -> Demo {
        let mut child = Command::new(env!("CARGO_BIN_EXE_zhuli-sim"))
            .arg("demo")
            .env("TMPDIR", tmp)
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn zhuli-sim demo");
        let output = Arc::new(Mutex::new(String::new()));
        for stream in [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let sink = output.clone();
            std::thread::spawn(move || {
                let mut stream = stream;
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = stream.read(&mut buf) {
                    if let Ok(mut o) = sink.lock() {
                        o.push_str(&String::from_utf8_lossy(&buf[..n]));
                    }
                }
            });
        }
        let input = child.stdin.take().expect("stdin");
        Demo { child, input, output }
    }

    fn output(&self) -> String {
        self.output.lock().map(|o| o.clone()).unwrap_or_default()
    }

    fn wait_for(&self, text: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !self.output().contains(text) {
            assert!(Instant::now() < deadline, "the demo did not print {text:?}:\n{}", self.output());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn type_line(&mut self, line: &str) {
        writeln!(self.input, "{line}").expect("type into the demo");
    }

    fn wait(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "the demo did not end:\n{}", self.output());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn demo_prints_log_lines_on_lines_of_their_own() {
    let tmp = temp_dir("demo-log");
    // Every info line, so the agent logs while the demo waits at its prompt: the old
    // connection closes seconds after the reconnect is shown.
    let mut demo = Demo::start(&tmp, &[("ZHULI_LOG", "info")]);
    demo.wait_for("(agent connected", Duration::from_secs(30));
    demo.type_line("!disconnect");
    demo.wait_for("reconnected in", Duration::from_secs(20));
    demo.wait_for("INFO  stream connection 1 closed", Duration::from_secs(20));
    demo.type_line("/ping");
    demo.wait_for("zhuli> pong", Duration::from_secs(20));
    demo.type_line("!quit");
    assert!(demo.wait(Duration::from_secs(30)).success());
    let out = demo.output();
    let lines: Vec<&str> = out.lines().collect();
    for line in &lines {
        if let Some(rest) = line.strip_prefix("you> ") {
            assert!(
                ["", "!disconnect", "/ping", "!quit"].contains(&rest),
                "something printed on the prompt line: {line:?}\n{out}"
            );
        }
    }
    let logs = lines.iter().filter(|l| l.starts_with("INFO  ") || l.starts_with("WARN  ")).count();
    assert!(logs >= 3, "the log lines are in the demo's output:\n{out}");
    // A log line that came while the demo waited at its prompt: on its own line, and the prompt
    // drawn again after it.
    let at_prompt =
        lines.windows(3).any(|w| w[0] == "you> " && w[1].starts_with("INFO  ") && w[2].starts_with("you> "));
    assert!(at_prompt, "no log line came at the prompt:\n{out}");
    let _ = std::fs::remove_dir_all(tmp);
}

#[test]
fn demo_removes_its_folder_and_key_on_ctrl_c_and_sigterm() {
    use nix::sys::signal::{Signal, kill};
    for signal in [Signal::SIGINT, Signal::SIGTERM] {
        let tmp = temp_dir("demo-signal");
        let mut demo = Demo::start(&tmp, &[]);
        demo.wait_for("(agent connected", Duration::from_secs(30));
        demo.type_line("/ping");
        demo.wait_for("zhuli> pong", Duration::from_secs(20));
        let folders: Vec<_> =
            std::fs::read_dir(&tmp).expect("TMPDIR").map_while(Result::ok).map(|e| e.path()).collect();
        assert_eq!(folders.len(), 1, "{folders:?}");
        assert!(folders[0].join("store-key").is_file(), "the demo's folder holds its key: {folders:?}");

        let pid = nix::unistd::Pid::from_raw(demo.child.id() as i32);
        kill(pid, signal).expect("signal the demo");
        let status = demo.wait(Duration::from_secs(30));
        assert_eq!(status.code(), Some(128 + signal as i32), "{signal}: {status:?}\n{}", demo.output());
        demo.wait_for("(stopped; the demo's folder", Duration::from_secs(5));
        let left: Vec<_> = std::fs::read_dir(&tmp).expect("TMPDIR").map_while(Result::ok).map(|e| e.path()).collect();
        assert!(left.is_empty(), "{signal} left {left:?}\n{}", demo.output());
        let _ = std::fs::remove_dir_all(tmp);
    }
}
