//! The subcommands a person runs: `zhuli sim` driven over its control API with a real agent,
//! and `zhuli demo` fed from a pipe, as the README's first command: its transcript, its log
//! lines kept off the prompt, and its folder (which holds a store key) gone after Ctrl-C.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    path::Path,
    process::{Child, ChildStdin, Command, Stdio},
    sync::{Arc, Mutex},
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
        "— connection closed by the gateway; reconnected in ",
        ", nothing lost —",
        "需要大模型",
        "(the demo has no model: to have questions answered, start it with --llm-url",
        "notes.txt",
    ] {
        assert!(out.contains(expect), "demo output lacks {expect:?}:\n{out}\n{err}");
    }
}

/// `zhuli demo` with a pipe for its input that stays open, and its output as it comes.
struct Demo {
    child: Child,
    input: ChildStdin,
    output: Arc<Mutex<String>>,
}

impl Demo {
    fn start(tmp: &Path, env: &[(&str, &str)]) -> Demo {
        let mut child = Command::new(env!("CARGO_BIN_EXE_zhuli"))
            .arg("demo")
            .env("TMPDIR", tmp)
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn zhuli demo");
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

/// Ordinary mistakes, said as one plain paragraph that names the file and the setting and says
/// what to do; never a backtrace (whatever RUST_BACKTRACE says), never the same cause twice.
#[test]
fn mistakes_are_said_plainly_with_what_to_do() {
    let dir = temp_dir("cli-errors");
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_zhuli"))
            .args(args)
            .env("RUST_BACKTRACE", "full")
            .env("RUST_LIB_BACKTRACE", "1")
            .output()
            .expect("run zhuli");
        assert!(!out.status.success(), "{args:?} must fail");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let bad = dir.join("office.toml");
    std::fs::write(&bad, "serial = 1\n[dingtalk]\nclient_secret = \"s3cr3t-value-xyz\"\nclient_id = 5\n")
        .expect("file");
    let syntax = dir.join("broken.toml");
    std::fs::write(&syntax, "serial = 1\n[dingtalk\n").expect("file");
    let key = dir.join("missing-key");
    let cfg = dir.join("run.toml");
    std::fs::write(
        &cfg,
        format!(
            "[agent]\nstate_dir = {:?}\n[store]\nkey_file = {:?}\n[dingtalk]\nclient_id = \"dingabcdefg\"\nclient_secret = \"s3cr3t-value-xyz\"\nrobot_code = \"dingabcdefg\"\n",
            dir.join("state").display().to_string(),
            key.display().to_string()
        ),
    )
    .expect("config");
    let blank = dir.join("blank.img");
    std::fs::write(&blank, vec![0u8; 1024 * 1024]).expect("blank");
    let cases: Vec<(Vec<String>, Vec<&str>)> = vec![
        (
            vec!["provision".into(), "check".into(), bad.display().to_string()],
            vec!["office.toml, line 4, [dingtalk] client_id", "a whole number", "text in quotes"],
        ),
        (vec!["provision".into(), "check".into(), syntax.display().to_string()], vec!["broken.toml, line 2"]),
        (
            vec![
                "backup".into(),
                "--config".into(),
                cfg.display().to_string(),
                "--to".into(),
                dir.join("b").display().to_string(),
            ],
            vec!["missing-key", "zhuli store new-key"],
        ),
        (
            vec![
                "provision".into(),
                "write".into(),
                "--config".into(),
                cfg.display().to_string(),
                "--device".into(),
                blank.display().to_string(),
                "--unsigned".into(),
            ],
            vec![],
        ),
    ];
    for (args, expect) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let said = run(&args);
        assert!(said.starts_with("error: "), "{args:?}: {said}");
        for e in expect {
            assert!(said.contains(e), "{args:?}: {e:?} missing from {said}");
        }
        for never in ["backtrace", "Caused by", "u64", "sequence", "invalid type", "s3cr3t"] {
            assert!(!said.contains(never), "{args:?}: {never:?} in {said}");
        }
    }
    // A device that is not a stick: the fix is named (a serial makes the file valid to write).
    std::fs::write(&cfg, format!("serial = 1\n{}", std::fs::read_to_string(&cfg).expect("cfg"))).expect("cfg");
    let said = run(&[
        "provision",
        "write",
        "--config",
        &cfg.display().to_string(),
        "--device",
        &blank.display().to_string(),
        "--unsigned",
    ]);
    assert!(said.contains("no FAT file system") && said.contains("--format"), "{said}");
}

/// `zhuli update`: the vendor makes a key and signs a bundle; a box's check passes it, and refuses
/// it once one byte changed, for a downgrade, and when signed by another key — saying why.
#[test]
fn update_bundles_are_signed_by_the_vendor_and_checked_before_anything_is_written() {
    let dir = temp_dir("update-cli");
    let (keys, other, bundle) = (dir.join("keys"), dir.join("other"), dir.join("bundle"));
    let zhuli = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_zhuli")).args(args).output().expect("run zhuli");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let s = |p: &Path| p.display().to_string();
    assert!(zhuli(&["update", "keygen", "--out", &s(&keys)]).0);
    assert!(zhuli(&["update", "keygen", "--out", &s(&other)]).0);
    assert!(std::fs::read_to_string(keys.join("vendor.pub")).expect("pub").starts_with("zhuli-vendor-key ed25519 "));
    std::fs::create_dir_all(&bundle).expect("bundle");
    std::fs::write(
        bundle.join("zhuli-release.toml"),
        format!(
            "product = \"zhuli\"\nversion = \"1.4.0\"\narchitecture = \"x86-64\"\nuki = \"zhuli_1.4.0.efi\"\nroot_hash = \"{}\"\n\
             [root]\nfile = \"zhuli_1.4.0.root.raw\"\nbytes = 8192\nsha256 = \"{}\"\n\
             [verity]\nfile = \"zhuli_1.4.0.verity.raw\"\nbytes = 4096\nsha256 = \"{}\"\n",
            "cd".repeat(32),
            "ab".repeat(32),
            "ef".repeat(32)
        ),
    )
    .expect("manifest");
    std::fs::write(bundle.join("zhuli_1.4.0.root.raw"), vec![1u8; 8192]).expect("root");
    std::fs::write(bundle.join("zhuli_1.4.0.verity.raw"), vec![2u8; 4096]).expect("verity");
    // A stand-in kernel image with the sections the check reads: os-release and command line.
    let uki = format!(
        "MZ\0.osrel\0IMAGE_ID=zhuli\nIMAGE_VERSION=1.4.0\nZHULI_STORE_SCHEMA=4\nZHULI_STORE_OLDEST_READER=4\n\0.cmdline\0roothash={} root=/dev/mapper/zhuli-root ro\0",
        "cd".repeat(32)
    );
    std::fs::write(bundle.join("zhuli_1.4.0.efi"), uki).expect("uki");
    // An organisation key cannot sign a release.
    assert!(zhuli(&["provision", "keygen", "--out", &s(&dir.join("org"))]).0);
    let (ok, said) = zhuli(&["update", "sign", &s(&bundle), "--key", &s(&dir.join("org/org.key"))]);
    assert!(!ok && said.contains("zhuli-vendor-private-key"), "{said}");
    let (ok, said) = zhuli(&["update", "sign", &s(&bundle), "--key", &s(&keys.join("vendor.key"))]);
    assert!(ok, "{said}");
    let check = |key: &Path, running: &str| {
        zhuli(&[
            "update",
            "check",
            &s(&bundle),
            "--vendor-key",
            &s(key),
            "--running",
            running,
            "--root-slot",
            "1048576",
        ])
    };
    let (ok, said) = check(&keys.join("vendor.pub"), "1.3.2");
    assert!(ok && said.contains("release 1.4.0 of zhuli") && said.contains("may replace 1.3.2"), "{said}");
    let (ok, said) = check(&keys.join("vendor.pub"), "1.10.0");
    assert!(!ok && said.contains("older than the running 1.10.0"), "{said}");
    let (ok, said) = check(&other.join("vendor.pub"), "1.3.2");
    assert!(!ok && said.contains("installs only releases signed by"), "{said}");
    let mut root = std::fs::read(bundle.join("zhuli_1.4.0.root.raw")).expect("root");
    root[100] ^= 0x80;
    std::fs::write(bundle.join("zhuli_1.4.0.root.raw"), root).expect("tamper");
    let (ok, said) = check(&keys.join("vendor.pub"), "1.3.2");
    assert!(!ok && said.contains("zhuli_1.4.0.root.raw does not match its sha256"), "{said}");
    let _ = std::fs::remove_dir_all(&dir);
}
