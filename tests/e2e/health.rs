//! The health service end to end: systemd's notification socket owned by the test (READY,
//! STATUS, the WATCHDOG pings and their stopping when a task hangs), alerts in the admin chat
//! once per threshold crossing, the status socket and `zhuli status`, and `zhuli doctor`.

use std::{
    os::unix::net::UnixDatagram,
    process::Command,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use zhuli::audit::Kind;
use zhuli_sim::dingtalk::{Inject, Simulator};

use crate::support::{self, Journal, SECRET};

/// Datagrams received on a notify socket, with when they arrived.
struct Notify {
    path: std::path::PathBuf,
    got: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl Notify {
    fn start(dir: &std::path::Path) -> Notify {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind notify socket");
        let got = Arc::new(Mutex::new(Vec::new()));
        let sink = got.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = socket.recv(&mut buf) {
                if let Ok(mut g) = sink.lock() {
                    g.push((Instant::now(), String::from_utf8_lossy(&buf[..n]).into_owned()));
                }
            }
        });
        Notify { path, got }
    }

    fn all(&self) -> Vec<(Instant, String)> {
        self.got.lock().map(|g| g.clone()).unwrap_or_default()
    }
}

const FAST: &str = "[health]\nbeat_ms = 100\ntask_deadline_ms = 1000\nsample_ms = 100\n";
/// Resource alerts after 0.3 s of pinned readings instead of 5 minutes (the tests that leave
/// the window at its default cannot see a resource alert, however busy the machine).
const SUSTAIN: &str = "sustain_ms = 300\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchdog_pings_stop_when_a_task_hangs() {
    let sim = Simulator::start(support::sim_config()).await.expect("simulator");
    let scratch = support::temp_dir("notify");
    let notify = Notify::start(&scratch);
    let env = [
        ("NOTIFY_SOCKET", notify.path.display().to_string()),
        ("WATCHDOG_USEC", "400000".to_owned()),
        ("ZHULI_TEST_HANG", "store upkeep:2500".to_owned()),
    ];
    let agent = support::spawn_agent_with_env("watchdog", &support::config_for(&sim, SECRET, FAST), &env);
    let hung_at = {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if agent.log().contains("task store upkeep now hangs") {
                break Instant::now();
            }
            assert!(Instant::now() < deadline, "the hang switch never fired; log:\n{}", agent.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    // Deadline 1 s after the hang, plus two ping intervals of slack.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let got = notify.all();
    let ready = got.iter().position(|(_, m)| m == "READY=1").expect("READY=1 sent");
    let pings: Vec<Instant> = got.iter().filter(|(_, m)| m == "WATCHDOG=1").map(|(t, _)| *t).collect();
    let before = pings.iter().filter(|t| **t < hung_at).count();
    assert!(before >= 5, "regular pings while healthy: {before}; got {got:?}");
    assert!(got.iter().position(|(_, m)| m == "WATCHDOG=1").is_some_and(|p| p > ready), "READY comes first");
    let late = pings.iter().filter(|t| **t > hung_at + Duration::from_millis(1400)).count();
    assert_eq!(late, 0, "pings must stop once the store upkeep is silent past its deadline: {got:?}");
    assert!(got.iter().any(|(_, m)| m.starts_with("STATUS=connected")), "{got:?}");
    assert!(got.iter().any(|(_, m)| m == "STATUS=hung: store upkeep"), "{got:?}");
    assert!(agent.log().contains("task hung: store upkeep"), "{}", agent.log());
    support::assert_no_secret(&agent);
    let _ = std::fs::remove_dir_all(&scratch);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_notify_socket_nothing_breaks_and_no_task_is_hung() {
    let sim = Simulator::start(support::sim_config()).await.expect("simulator");
    let agent = support::spawn_agent("no-notify", &support::config_for(&sim, SECRET, FAST));
    assert!(sim.wait_until(Duration::from_secs(15), |s| !s.connections().is_empty()).await);
    // Several deadlines pass with every task idle: none is reported hung.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(!agent.log().contains("task hung"), "{}", agent.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_reach_the_admin_chat_once_per_crossing() {
    let sim = Simulator::start(support::sim_config()).await.expect("simulator");
    let scratch = support::temp_dir("alerts");
    let journal = Journal::start(&scratch);
    let metrics = scratch.join("metrics");
    // Every reading pinned, so a busy test machine's real CPU or load cannot add an alert.
    let disk = |percent: u32| {
        let readings =
            format!("disk_percent={percent}\ncpu_percent=5\nmemory_percent=5\nload_per_core=0.1\ntemperature_c=40\n");
        std::fs::write(&metrics, readings).expect("metrics");
    };
    disk(97);
    let extra = format!(
        "{FAST}{SUSTAIN}alert_every_ms = 10\nadmin_chat = \"cid-admins\"\n[audit]\njournal_socket = {:?}\n",
        journal.path.display().to_string()
    );
    let agent = support::spawn_agent_with_env(
        "alerts",
        &support::config_for(&sim, SECRET, &extra),
        &[("ZHULI_TEST_METRICS", metrics.display().to_string())],
    );
    let to_admins = |s: &Simulator| {
        s.replies().into_iter().filter(|r| r.conversation_id.as_deref() == Some("cid-admins")).collect::<Vec<_>>()
    };
    assert!(sim.wait_until(Duration::from_secs(10), |s| !to_admins(s).is_empty()).await, "{}", agent.log());
    // Many samples above the threshold: still one alert.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let alerts = to_admins(&sim);
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert!(alerts[0].text.contains("数据盘已用 97%（阈值 90）"), "{}", alerts[0].text);

    disk(20);
    assert!(sim.wait_until(Duration::from_secs(5), |s| to_admins(s).len() == 2).await);
    assert!(to_admins(&sim)[1].text.contains("已回落到 90 以下"), "{:?}", to_admins(&sim));
    disk(98);
    assert!(sim.wait_until(Duration::from_secs(5), |s| to_admins(s).len() == 3).await);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(to_admins(&sim).len(), 3, "one message per crossing");
    journal.expect(2, Kind::Alert, &[("TARGET", "disk"), ("OUTCOME", "raised")]);
    journal.expect(1, Kind::Alert, &[("TARGET", "disk"), ("OUTCOME", "cleared")]);
    support::assert_no_secret(&agent);
    let _ = std::fs::remove_dir_all(&scratch);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_go_to_each_admin_without_an_admin_chat() {
    let sim = Simulator::start(support::sim_config()).await.expect("simulator");
    let scratch = support::temp_dir("alerts-1to1");
    let metrics = scratch.join("metrics");
    let readings = "memory_percent=99\ncpu_percent=5\ndisk_percent=5\nload_per_core=0.1\ntemperature_c=40\n";
    std::fs::write(&metrics, readings).expect("metrics");
    let extra = format!("{FAST}{SUSTAIN}[access]\nadmins = [\"boss\", \"ops\"]\n");
    // A box set to English tells its admins in English.
    let _agent = support::spawn_agent_configured(
        "alerts-1to1",
        "language = \"en\"\n",
        &support::config_for(&sim, SECRET, &extra),
        &[("ZHULI_TEST_METRICS", metrics.display().to_string())],
        &[],
    );
    let got = sim.wait_until(Duration::from_secs(10), |s| s.replies().len() >= 2).await;
    assert!(got);
    let mut to: Vec<String> = sim.replies().into_iter().filter_map(|r| r.to_user).collect();
    to.sort();
    assert_eq!(to, vec!["boss".to_owned(), "ops".to_owned()]);
    assert!(sim.replies().iter().all(|r| r.text.contains("zhuli alert**: memory 99% used (threshold 90)")));
    let _ = std::fs::remove_dir_all(&scratch);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_socket_serves_the_agents_user_and_refuses_others() {
    let sim = Simulator::start(support::sim_config()).await.expect("simulator");
    let agent = support::spawn_agent("status", &support::config_for(&sim, SECRET, FAST));
    assert!(sim.wait_until(Duration::from_secs(15), |s| !s.connections().is_empty()).await);
    sim.inject(zhuli_sim::dingtalk::Inject::text("/ping"));
    assert!(sim.wait_until(Duration::from_secs(5), |s| !s.replies().is_empty()).await);
    let socket = agent.dir.join("state/status.sock");
    let wait = Instant::now() + Duration::from_secs(5);
    while !socket.exists() && Instant::now() < wait {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&socket).expect("socket").permissions());
    assert_eq!(mode & 0o777, 0o660, "owner and group only");

    let bin = env!("CARGO_BIN_EXE_zhuli");
    let status = || {
        let json = Command::new(bin).args(["status", "--json", "--socket"]).arg(&socket).output().expect("run status");
        assert!(json.status.success(), "{}", String::from_utf8_lossy(&json.stderr));
        serde_json::from_slice::<serde_json::Value>(&json.stdout).expect("JSON")
    };
    // The reply reaches DingTalk a moment before the agent counts it answered.
    let mut v = status();
    let wait = Instant::now() + Duration::from_secs(5);
    while v["messages_answered"] != 1 && Instant::now() < wait {
        tokio::time::sleep(Duration::from_millis(50)).await;
        v = status();
    }
    assert_eq!(v["connected"], true);
    assert_eq!(v["messages_accepted"], 1);
    assert_eq!(v["messages_answered"], 1);
    assert!(v["latency_ms"].is_array(), "{v}");
    let table = Command::new(bin).args(["status", "--config"]).arg(agent.config_path()).output().expect("status");
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(table.status.success() && text.contains("DingTalk") && text.contains("1 accepted, 1 answered"), "{text}");

    // Another user: refused by the socket's permissions (and, past them, by the peer check).
    if nix_is_root() {
        std::fs::set_permissions(&agent.dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
        std::fs::set_permissions(agent.dir.join("state"), std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod");
        let other = Command::new(support::binary_for_any_user(&agent.dir))
            .args(["status", "--socket"])
            .arg(&socket)
            .env_clear()
            .uid_gid(65534)
            .output()
            .expect("run as nobody");
        assert!(!other.status.success(), "another user must be refused");
        let err = String::from_utf8_lossy(&other.stderr);
        assert!(err.contains("Permission denied") || err.contains("refused"), "{err}");
    } else {
        eprintln!("not root: the other-user check of the status socket needs root to switch users");
    }
    let missing = Command::new(bin).args(["status", "--socket", "/nonexistent/zhuli.sock"]).output().expect("status");
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("is `zhuli run` running"));
}

pub fn nix_is_root() -> bool {
    // SAFETY-free check: the effective uid as the kernel reports it for this process.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(2) == Some("0")))
        .unwrap_or(false)
}

trait UidGid {
    fn uid_gid(&mut self, id: u32) -> &mut Self;
}

impl UidGid for Command {
    fn uid_gid(&mut self, id: u32) -> &mut Self {
        std::os::unix::process::CommandExt::gid(std::os::unix::process::CommandExt::uid(self, id), id)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_gives_a_verdict_per_step() {
    let sim = Simulator::start(support::sim_config()).await.expect("simulator");
    let agent = support::spawn_agent("doctor", &support::config_for(&sim, SECRET, FAST));
    assert!(sim.wait_until(Duration::from_secs(15), |s| !s.connections().is_empty()).await);
    let bin = env!("CARGO_BIN_EXE_zhuli");
    let run = |config: &std::path::Path| {
        Command::new(bin)
            .args(["doctor", "--wait-ms", "5000", "--config"])
            .arg(config)
            .env("ZHULI_UPDATE_DIR", config.with_file_name("zhuli-update"))
            .output()
            .expect("doctor")
    };
    let good = run(agent.config_path());
    let out = String::from_utf8_lossy(&good.stdout).into_owned();
    assert!(good.status.success(), "{out}\n{}", String::from_utf8_lossy(&good.stderr));
    for expect in [
        "1. network        PASS",
        "2. credentials    PASS",
        "3. basic API      PASS",
        "4. recent errors",
        "5. rollback",
        "6. tools          PASS  no GitHub",
    ] {
        assert!(out.contains(expect), "{expect} in\n{out}");
    }
    assert!(out.contains(&format!("running agent {}", env!("CARGO_PKG_VERSION"))), "{out}");
    // Off the box, nothing has surveyed the releases: said, with what to do.
    assert!(out.contains("the releases on the box are not known yet") && out.contains("zhuli update survey"), "{out}");

    // Wrong credentials: the credentials step fails with the fix to try.
    let text = std::fs::read_to_string(agent.config_path()).expect("config");
    let bad = agent.dir.join("bad.toml");
    std::fs::write(&bad, text.replace(SECRET, "not-the-secret")).expect("write");
    let failed = run(&bad);
    let out = String::from_utf8_lossy(&failed.stdout).into_owned();
    assert!(!failed.status.success());
    assert!(out.contains("2. credentials    FAIL") && out.contains("fix: copy Client ID"), "{out}");
    assert!(!out.contains("not-the-secret") && !out.contains(SECRET), "no secret in the report");

    // Nothing listening: the network step fails and says what to check.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("port");
    let port = closed.local_addr().expect("addr").port();
    drop(closed);
    let unreachable = agent.dir.join("unreachable.toml");
    std::fs::write(&unreachable, text.replace(&sim.api_base(), &format!("http://127.0.0.1:{port}"))).expect("write");
    let failed = run(&unreachable);
    let out = String::from_utf8_lossy(&failed.stdout).into_owned();
    assert!(!failed.status.success());
    assert!(out.contains("1. network        FAIL") && out.contains("TCP failed"), "{out}");
}

/// Folders the files tools (and drive downloads) use are checked when the agent starts and by
/// `zhuli doctor`, not first when someone confirms a write. `frozen` is what systemd's
/// `ProtectSystem=strict` makes of a folder the unit does not list in `ReadWritePaths=`: the
/// agent runs in a mount namespace of its own where the folder is a read-only bind mount, while
/// outside it (where doctor runs) it is writable. `gone` does not exist, `paper` is a file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_roots_are_named_in_the_log_the_admin_chat_and_by_doctor() {
    let unshare = Command::new("unshare").arg("--version").output().is_ok_and(|o| o.status.success());
    if !nix_is_root() || !unshare {
        eprintln!("skipped: a read-only bind mount in the agent's own mount namespace needs root and unshare(1)");
        return;
    }
    let sim = Simulator::start(support::sim_config()).await.expect("simulator");
    let scratch = support::temp_dir("roots");
    let (share, frozen, gone, paper) =
        (scratch.join("share"), scratch.join("frozen"), scratch.join("gone"), scratch.join("paper"));
    std::fs::create_dir_all(&share).expect("share");
    std::fs::create_dir_all(&frozen).expect("frozen");
    std::fs::write(&paper, "not a folder").expect("paper");
    let s = |p: &std::path::Path| p.display().to_string();
    let extra = format!(
        "{FAST}admin_chat = \"cid-admins\"\n[tools.files.roots]\nshare = {:?}\nfrozen = {:?}\ngone = {:?}\npaper = {:?}\n",
        s(&share),
        s(&frozen),
        s(&gone),
        s(&paper)
    );
    let launcher: Vec<String> = ["unshare", "--mount", "--propagation", "private", "sh", "-c"]
        .into_iter()
        .map(str::to_owned)
        .chain([r#"mount --bind -o ro "$0" "$0" && exec "$@""#.to_owned(), s(&frozen)])
        .collect();
    let agent = support::spawn_agent_launched("roots", &support::config_for(&sim, SECRET, &extra), &[], &launcher);
    assert!(
        sim.wait_until(Duration::from_secs(15), |s| !s.connections().is_empty()).await,
        "the agent keeps running with unusable roots; log:\n{}",
        agent.log()
    );
    // The check really ran in the agent's namespace: outside it the folder takes files.
    std::fs::write(frozen.join("outside.txt"), "x").expect("writable outside the agent's namespace");

    let to_admins = |s: &Simulator| {
        s.replies()
            .into_iter()
            .filter(|r| r.conversation_id.as_deref() == Some("cid-admins") && r.text.contains("frozen"))
            .collect::<Vec<_>>()
    };
    assert!(sim.wait_until(Duration::from_secs(10), |s| !to_admins(s).is_empty()).await, "{}", agent.log());
    let notice = to_admins(&sim).remove(0).text;
    for expect in [s(&frozen), "只读文件系统".into(), "重新写入 U 盘".into(), s(&gone), "paper".into()] {
        assert!(notice.contains(&expect), "{expect} in the admins' notice:\n{notice}");
    }
    assert!(!notice.contains("read-only file system"), "the box's language only: {notice}");
    assert!(!notice.contains(&format!("share = {}", s(&share))), "a usable root is not reported: {notice}");
    let expected = [
        format!("frozen = {}: not writable: read-only file system", s(&frozen)),
        format!("gone = {}: missing", s(&gone)),
        format!("paper = {}: not a folder", s(&paper)),
    ];
    // The log file may trail the notice a moment on a busy machine.
    let wait = Instant::now() + Duration::from_secs(10);
    while !expected.iter().all(|e| agent.log().contains(e)) && Instant::now() < wait {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = agent.log();
    for expect in &expected {
        assert!(log.contains(expect), "{expect} in the log:\n{log}");
    }

    let doctor = Command::new(env!("CARGO_BIN_EXE_zhuli"))
        .args(["doctor", "--wait-ms", "2000", "--config"])
        .arg(agent.config_path())
        .env("ZHULI_UPDATE_DIR", agent.config_path().with_file_name("zhuli-update"))
        .output()
        .expect("doctor");
    let out = String::from_utf8_lossy(&doctor.stdout).into_owned();
    assert!(!doctor.status.success(), "{out}");
    for expect in [
        "7. folders        FAIL".to_owned(),
        "as the running agent finds them".to_owned(),
        format!("share = {}: writable", s(&share)),
        format!("frozen = {}: not writable: read-only file system", s(&frozen)),
        "the service unit does not allow writing there".to_owned(),
        format!("ReadWritePaths={}", s(&frozen)),
        format!("gone = {}: missing", s(&gone)),
        format!("paper = {}: not a folder", s(&paper)),
    ] {
        assert!(out.contains(&expect), "{expect} in\n{out}");
    }
    assert!(!out.contains(SECRET));
    drop(agent);
    let _ = std::fs::remove_dir_all(&scratch);
}

/// A reconnect storm reaches the admin chat when it starts and when it ends, once each; the
/// replies go over HTTPS while the Stream connection cannot open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_storm_is_told_to_the_admins_when_it_starts_and_ends() {
    let sim = Simulator::start(support::sim_config()).await.expect("simulator");
    let scratch = support::temp_dir("storm");
    let metrics = scratch.join("metrics");
    // Resources pinned low: only the storm is an alert here.
    let readings = "disk_percent=10\ncpu_percent=5\nmemory_percent=5\nload_per_core=0.1\ntemperature_c=40\n";
    std::fs::write(&metrics, readings).expect("metrics");
    let extra = format!("{FAST}admin_chat = \"cid-admins\"\n");
    // Five attempts within three seconds make a storm; its end is said after three steady seconds.
    let stream = "idle_window_ms = 1000\nstorm_attempts = 5\nstorm_window_ms = 3000\n";
    let limits = "retry_initial_ms = 50\nchat_messages_per_minute = 6000\nopenapi_per_second = 500\n";
    let agent = support::spawn_agent_with_env(
        "storm",
        &support::config_with(&sim, SECRET, stream, limits, &extra),
        &[("ZHULI_TEST_METRICS", metrics.display().to_string())],
    );
    assert!(sim.wait_until(Duration::from_secs(15), |s| !s.connections().is_empty()).await, "{}", agent.log());
    let told = |s: &Simulator, what: &str| {
        s.replies()
            .into_iter()
            .filter(|r| r.conversation_id.as_deref() == Some("cid-admins") && r.text.contains(what))
            .count()
    };
    assert_eq!(told(&sim, "钉钉连接"), 0, "a steady connection is not an alert");
    // Refused openings in a row make a storm.
    sim.fail_opens(12);
    sim.drop_all();
    let started = sim.wait_until(Duration::from_secs(30), |s| told(s, "钉钉连接反复失败") > 0).await;
    assert!(started, "the storm was not told; log:\n{}", agent.log());
    // Connections that open and drop again at once keep it a storm: no end is told meanwhile.
    for _ in 0..3 {
        assert!(sim.wait_until(Duration::from_secs(15), |s| !s.connections().is_empty()).await);
        sim.drop_all();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let ended = sim.wait_until(Duration::from_secs(30), |s| told(s, "钉钉连接已恢复稳定") > 0).await;
    assert!(ended, "its end was not told; log:\n{}", agent.log());
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(told(&sim, "钉钉连接反复失败"), 1, "once per storm");
    assert_eq!(told(&sim, "钉钉连接已恢复稳定"), 1);
    let _ = std::fs::remove_dir_all(&scratch);
}

/// `/诊断`, `/日志`, `/备份 now` and `/备份` in the admin's chat, refused to anyone else: the
/// box's upkeep without a shell.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admins_diagnose_read_logs_and_back_up_from_the_chat() {
    use zhuli_sim::dingtalk::Inject;
    let sim = Simulator::start(support::sim_config()).await.expect("simulator");
    let extra = "[access]\nadmins = [\"boss\"]\ndirect_chats = \"org\"\n";
    let agent = support::spawn_agent("upkeep", &support::config_for(&sim, SECRET, extra));
    assert!(sim.wait_until(Duration::from_secs(15), |s| !s.connections().is_empty()).await);
    let ask = |text: &str, who: &str| sim.inject(Inject { sender_staff_id: who.into(), ..Inject::text(text) });
    let sim = &sim;
    let answer = |id: String| async move {
        assert!(
            sim.wait_until(Duration::from_secs(90), |s| !support::replies_to(s, &id).is_empty()).await,
            "no answer"
        );
        support::replies_to(sim, &id).into_iter().map(|r| r.text).collect::<Vec<_>>().join("\n")
    };

    // Anyone else is refused, and the refusal is audited.
    let refused = answer(ask("/诊断", "intern")).await;
    assert!(refused.contains("只有这台设备的管理员"), "{refused}");

    let doctor = answer(ask("/诊断", "boss")).await;
    // The agent answers for itself: its own version and its own view of the folders.
    for part in [
        "zhuli 助理诊断",
        "✅ **网络**",
        "✅ **凭据**",
        "✅ **钉钉连接**",
        "running agent 0.",
        "**文件夹**：inbox (received files, read-only)",
        "MiB",
        "还没有做过备份",
    ] {
        assert!(doctor.contains(part), "{part:?} missing from\n{doctor}");
    }
    // What to do is said for an admin without a shell: no console commands.
    assert!(doctor.contains("建议："), "a step to act on\n{doctor}");
    for shell in ["systemctl", "timedatectl", "chown", "journalctl", "zhuli doctor"] {
        assert!(!doctor.contains(shell), "{shell} in\n{doctor}");
    }
    assert!(!doctor.contains(SECRET));

    let backup = answer(ask("/备份 now", "boss")).await;
    assert!(backup.contains("备份已完成并通过校验"), "{backup}");
    let snapshots: Vec<_> = std::fs::read_dir(agent.dir.join("state/backups"))
        .expect("the backups folder")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(snapshots.len(), 1, "{snapshots:?}");
    let verify = Command::new(env!("CARGO_BIN_EXE_zhuli"))
        .args(["backup", "--config", &agent.config_path().display().to_string(), "--verify"])
        .arg(&snapshots[0])
        .output()
        .expect("zhuli backup --verify");
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stderr));
    let last = answer(ask("／备份", "boss")).await;
    // Each target with its newest copy and how old it is; no drive configured says how to set
    // one.
    let path = snapshots[0].display().to_string();
    for part in [
        "设备上的备份：最近一份",
        "分钟前",
        path.as_str(),
        "UTC+8",
        "异地备份（网络盘）：未设置",
        "U 盘上的备份：还没有",
        "下一次夜间备份",
    ] {
        assert!(last.contains(part), "{part:?} missing from\n{last}");
    }

    // The agent's own warnings and errors since it started, redacted (the intern's refusal is
    // audited, not logged; what the run logged at warning level, if anything, is listed).
    let logs = answer(ask("/logs", "boss")).await;
    assert!(logs.contains("助理启动以来"), "{logs}");
    assert!(!logs.contains(SECRET), "{logs}");
}

/// Under systemd the agent's log goes to the journal as structured entries, not as stderr lines:
/// the agent is started with `$JOURNAL_STREAM` naming its stderr (as systemd does for
/// `zhuli.service`) and, in a mount namespace of its own, with the test's datagram socket as
/// `/run/systemd/journal/socket`. Entries carry `SYSLOG_IDENTIFIER=zhuli`, a priority, the
/// module, and the conversation where the record names one; never the message's text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_systemd_the_log_goes_to_the_journal_as_structured_entries() {
    let unshare = Command::new("unshare").arg("--version").output().is_ok_and(|o| o.status.success());
    if !nix_is_root() || !unshare {
        eprintln!("skipped: the journal's socket in the agent's own mount namespace needs root and unshare(1)");
        return;
    }
    let sim = Simulator::start(support::sim_config()).await.expect("simulator");
    let scratch = support::temp_dir("journal-log");
    let journal = Journal::start(&scratch);
    // `$0` is the test's socket. The namespace gets a journal folder of its own holding it.
    let setup = r#"mkdir -p /run/systemd/journal && mount -t tmpfs -o size=64k zhuli-journal /run/systemd/journal \
        && ln -s "$0" /run/systemd/journal/socket \
        && JOURNAL_STREAM="$(stat -L -c %d:%i /proc/self/fd/2)" && export JOURNAL_STREAM && exec "$@""#;
    let launcher: Vec<String> = ["unshare", "--mount", "--propagation", "private", "sh", "-c", setup]
        .into_iter()
        .map(str::to_owned)
        .chain([journal.path.display().to_string()])
        .collect();
    let agent = support::spawn_agent_launched("journal-log", &support::config_for(&sim, SECRET, FAST), &[], &launcher);
    assert!(sim.wait_until(Duration::from_secs(15), |s| !s.connections().is_empty()).await, "{}", agent.log());
    sim.inject(Inject::text("请把合同JOURNAL-BODY-5521发给我").conversation("cid-journal"));
    assert!(sim.wait_until(Duration::from_secs(15), |s| !s.replies().is_empty()).await, "{}", agent.log());

    let field = |e: &support::Entry, name: &str| e.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let logged = loop {
        let logged: Vec<support::Entry> =
            journal.all().into_iter().filter(|e| field(e, "SYSLOG_IDENTIFIER").as_deref() == Some("zhuli")).collect();
        let delivered = logged.iter().any(|e| field(e, "MESSAGE").is_some_and(|m| m.starts_with("reply to ")));
        if delivered || std::time::Instant::now() > deadline {
            break logged;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let accepted = logged
        .iter()
        .find(|e| field(e, "MESSAGE").is_some_and(|m| m.contains("accepted from conversation")))
        .unwrap_or_else(|| panic!("no entry for the accepted message: {logged:?}\nstderr:\n{}", agent.log()));
    assert_eq!(field(accepted, "CONVERSATION").as_deref(), Some("cid-journal"), "{accepted:?}");
    assert_eq!(field(accepted, "PRIORITY").as_deref(), Some("5"), "info is notice: {accepted:?}");
    assert_eq!(field(accepted, "CODE_MODULE").as_deref(), Some("zhuli::app"), "{accepted:?}");
    assert!(
        logged.iter().any(|e| field(e, "MESSAGE").is_some_and(|m| m.starts_with("reply to "))
            && field(e, "CONVERSATION").as_deref() == Some("cid-journal")),
        "{logged:?}"
    );
    // The journal took them: stderr holds none of these records, and no entry holds the text.
    assert!(!agent.log().contains("accepted from conversation"), "{}", agent.log());
    for e in journal.all() {
        assert!(!e.iter().any(|(_, v)| v.contains("JOURNAL-BODY-5521")), "a message body reached the journal: {e:?}");
    }
    drop(agent);
    let _ = std::fs::remove_dir_all(scratch);
}
