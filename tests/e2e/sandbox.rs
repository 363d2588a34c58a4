//! The plugin sandbox's system-call filter, end to end: the real agent runs a hostile plugin
//! (tests/mcp/hostile.rs, a native MCP server built here with plain `rustc`) under the two
//! profiles — stdio only, and network with one process — and every escape it tries gets
//! exactly the answer the filter promises (docs/PLUGINS.md), while what the profile grants
//! still works. The tests run as root on CI, so nothing but the filter stands between the
//! plugin and new namespaces, mounts or raw sockets.

use std::{
    collections::BTreeMap,
    net::TcpListener,
    os::unix::net::UnixListener,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use serde_json::json;
use zhuli_sim::{dingtalk::Simulator, llm::LlmSim};

use crate::support::{self, Agent, Journal};

/// Every escape attempt of the plugin's `escape` tool and the one answer the filter gives it,
/// whatever the profile grants: namespaces, mounts, kernel interfaces, the agent's limits and
/// UNIX sockets are refused with EPERM; clone3, and what the allow-list leaves out, fail with
/// ENOSYS (clone3's flags are out of the filter's sight, so runtimes are sent back to clone).
const REFUSED: &[(&str, &str)] = &[
    ("mount", "EPERM"),
    ("fsopen", "EPERM"),
    ("open_tree", "EPERM"),
    ("bpf", "EPERM"),
    ("keyctl", "EPERM"),
    ("userfaultfd", "EPERM"),
    ("io_uring_setup", "EPERM"),
    ("perf_event_open", "EPERM"),
    ("clone_newuser_newnet", "EPERM"),
    ("clone3", "ENOSYS"),
    ("setns", "EPERM"),
    ("prlimit_agent", "EPERM"),
    // Not refused by name, only left out of the allow-list: ENOSYS.
    ("setpriority_agent", "ENOSYS"),
    ("unix_status", "EPERM"),
    ("unix_listener", "EPERM"),
    ("unix_journal", "EPERM"),
    ("netlink", "EPERM"),
    ("packet", "EPERM"),
    ("unshare_newuser", "EPERM"),
    ("ptrace_traceme", "EPERM"),
];

/// What the `allowed` tool reports with no grant: threads and socket pairs only. A failed name
/// lookup is glibc's message, so it is only checked not to be `ok`.
const STDIO_ONLY: &[(&str, &str)] = &[
    ("thread", "ok"),
    ("socketpair", "ok"),
    ("process", "EPERM"),
    ("fork", "EPERM"),
    ("tcp", "EPERM"),
    ("lookup", "not ok"),
];

/// …and granted the network and one process: all of it.
const NETWORK_AND_PROCESS: &[(&str, &str)] =
    &[("thread", "ok"), ("socketpair", "ok"), ("process", "ok"), ("fork", "ok"), ("tcp", "ok"), ("lookup", "ok")];

/// The forged audit line the plugin sends to the journal socket.
const FORGED: &str = "forged by a plugin";

struct Rig {
    sim: Simulator,
    llm: LlmSim,
    agent: Agent,
    journal: Journal,
    scratch: PathBuf,
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.scratch);
    }
}

/// tests/mcp/hostile.rs compiled into `dir`: rustc of the toolchain running the tests (next to
/// `$CARGO`), else the one on PATH.
fn hostile_plugin(dir: &Path) -> PathBuf {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/mcp/hostile.rs");
    let beside_cargo = std::env::var_os("CARGO").map(|c| Path::new(&c).with_file_name("rustc"));
    let rustc = beside_cargo.filter(|p| p.exists()).unwrap_or_else(|| PathBuf::from("rustc"));
    let out = dir.join("hostile");
    let built = Command::new(&rustc)
        .args(["--edition", "2024", "-C", "debuginfo=0", "-o"])
        .arg(&out)
        .arg(&source)
        .output()
        .unwrap_or_else(|e| panic!("{} is needed to build the hostile plugin: {e}", rustc.display()));
    assert!(built.status.success(), "rustc tests/mcp/hostile.rs: {}", String::from_utf8_lossy(&built.stderr));
    out
}

async fn rig(tag: &str, grant: &str) -> Rig {
    let scratch = support::temp_dir(&format!("{tag}-seccomp"));
    let plugin = hostile_plugin(&scratch);
    let journal = Journal::start(&scratch);
    let sim = Simulator::start(support::sim_config()).await.expect("simulator");
    let llm = LlmSim::start().await.expect("llm sim");
    let config = format!(
        "{base}[tools.mcp.hostile]\ncommand = {plugin:?}\ntimeout_ms = 10000\n\
         read_only_tools = [\"escape\", \"x32\", \"allowed\"]\n{grant}",
        base = support::assistant_config(&llm, &["hostile"], &journal),
        plugin = plugin.display().to_string(),
    );
    let agent = support::connected_agent(tag, &sim, &config).await;
    Rig { sim, llm, agent, journal, scratch }
}

impl Rig {
    async fn call(&self, tool: &str, args: serde_json::Value) -> String {
        support::call_tool(&self.sim, &self.llm, &self.agent, tool, args).await
    }

    /// The agent's status socket, once it is there.
    async fn status_socket(&self) -> PathBuf {
        let socket = self.agent.dir.join("state/status.sock");
        let wait = Instant::now() + Duration::from_secs(5);
        while !socket.exists() && Instant::now() < wait {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(socket.exists(), "the agent's status socket is at {}", socket.display());
        socket
    }
}

/// `name: answer` lines into a map.
fn answers(text: &str) -> BTreeMap<String, String> {
    text.lines().filter_map(|l| l.split_once(": ")).map(|(k, v)| (k.to_owned(), v.to_owned())).collect()
}

fn assert_answers(text: &str, expected: &[(&str, &str)]) {
    let got = answers(text);
    let names: Vec<&str> = got.keys().map(String::as_str).collect();
    let mut wanted: Vec<&str> = expected.iter().map(|(n, _)| *n).collect();
    wanted.sort_unstable();
    assert_eq!(names, wanted, "the plugin tried something else: {text}");
    let wrong: Vec<String> = expected
        .iter()
        .filter(|(name, want)| match (*want, got[*name].as_str()) {
            ("not ok", answer) => answer == "ok",
            (want, answer) => want != answer,
        })
        .map(|(name, want)| format!("{name}: {} (expected {want})", got[*name]))
        .collect();
    assert!(wrong.is_empty(), "{}\nall answers:\n{text}", wrong.join("\n"));
}

/// Everything in REFUSED, then the x32 table (the plugin is killed), then the plugin again.
async fn escapes_are_refused(rig: &Rig) {
    let listener_path = rig.scratch.join("listener.sock");
    let listener = UnixListener::bind(&listener_path).expect("listener");
    listener.set_nonblocking(true).expect("nonblocking");
    let args = json!({
        "status": rig.status_socket().await.display().to_string(),
        "listener": listener_path.display().to_string(),
        "journal": rig.journal.path.display().to_string(),
    });
    let escaped = rig.call("hostile_escape", args).await;
    assert_answers(&escaped, REFUSED);
    assert!(listener.accept().is_err(), "no connection reached the test's UNIX socket");
    let forged = rig.journal.all().into_iter().filter(|e| support::field(e, "MESSAGE") == Some(FORGED)).count();
    assert_eq!(forged, 0, "the plugin wrote into the audit journal");

    // A system call through the x32 table is never a runtime's: the plugin is killed.
    let x32 = rig.call("hostile_x32", json!({})).await;
    assert!(x32.contains("plugin hostile stopped (SIGSYS — a forbidden system call"), "{x32}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stdio_only_plugin_is_refused_every_escape_and_keeps_threads() {
    let rig = rig("seccomp-stdio", "").await;
    assert_answers(&rig.call("hostile_allowed", json!({})).await, STDIO_ONLY);
    escapes_are_refused(&rig).await;
    // Started again on the next call, still in its sandbox.
    assert_answers(&rig.call("hostile_allowed", json!({})).await, STDIO_ONLY);
    support::assert_no_secret(&rig.agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_granted_network_and_a_process_gets_tcp_and_a_child_but_no_escape() {
    let rig = rig("seccomp-net", "network = true\nprocesses = 1\n").await;
    let tcp = TcpListener::bind("127.0.0.1:0").expect("tcp listener");
    let port = tcp.local_addr().expect("addr").port();
    tcp.set_nonblocking(true).expect("nonblocking");
    let allowed = rig.call("hostile_allowed", json!({"port": port})).await;
    assert_answers(&allowed, NETWORK_AND_PROCESS);
    assert!(tcp.accept().is_ok(), "the granted connection arrived");
    escapes_are_refused(&rig).await;
    assert_answers(&rig.call("hostile_allowed", json!({"port": port})).await, NETWORK_AND_PROCESS);
    support::assert_no_secret(&rig.agent);
}
