//! The subcommands a person runs: `zhuli-sim sim` driven over its control API with a real
//! agent, and `zhuli`'s own commands said plainly when used wrongly. The demo's tests are the
//! simulator crate's (sim/tests/demo.rs).

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use zhuli_sim::dingtalk::SimConfig;

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
    let mut sim = Command::new(crate::support::sim_bin())
        .args(["sim", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn zhuli-sim sim");
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
