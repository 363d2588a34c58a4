//! MCP plugins end to end: the real agent runs third-party MCP servers over stdio in its
//! sandbox — the reference filesystem server from npm (`@modelcontextprotocol/server-filesystem`,
//! installed under tests/mcp by `tests/run`) and a probe server (tests/mcp/probe.mjs) that tries
//! what a plugin must not manage. Each escape attempt is stopped, and the agent keeps serving.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    time::Duration,
};

use serde_json::json;
use zhuli::audit::Kind;
use zhuli_sim::{
    dingtalk::{Inject, Simulator},
    llm::{LlmSim, Scripted},
};

use crate::support::{self, Agent, Journal, calls, code_in};

const PROBE_TOKEN: &str = "probe-token-Vb82nQ";

struct Rig {
    sim: Simulator,
    llm: LlmSim,
    agent: Agent,
    journal: Journal,
    share: PathBuf,
    out: PathBuf,
    scratch: PathBuf,
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.scratch);
    }
}

fn plugins_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/mcp").canonicalize().expect("tests/mcp")
}

fn node() -> PathBuf {
    let found = ["/usr/bin/node", "/usr/local/bin/node"].into_iter().map(PathBuf::from).find(|p| p.exists());
    found.expect("node is needed for the plugin tests: apt-get install nodejs")
}

async fn rig(tag: &str) -> Rig {
    let scratch = support::temp_dir(&format!("{tag}-mcp"));
    let (share, out) = (scratch.join("share"), scratch.join("probe-out"));
    std::fs::create_dir_all(share.join("minutes")).expect("share");
    std::fs::write(share.join("minutes/2026-11-30.md"), "# Weekly\n- budget approved\n").expect("minutes");
    std::fs::create_dir_all(&out).expect("probe out");
    let dir = plugins_dir();
    support::npm_install(&dir, "@modelcontextprotocol/server-filesystem/package.json");
    let fs_server = dir.join("node_modules/@modelcontextprotocol/server-filesystem/dist/index.js");
    let journal = Journal::start(&scratch);
    let sim = Simulator::start(support::sim_config()).await.expect("simulator");
    let llm = LlmSim::start().await.expect("llm sim");
    let (node, s) = (node(), |p: &Path| p.display().to_string());
    let config = format!(
        "{base}[tools.mcp.fs]\ncommand = {node:?}\nargs = [\"--jitless\", {server:?}, {share:?}]\nread = [{dir:?}]\nwrite = [{share:?}]\n\
         read_only_tools = [\"list_directory\", \"read_text_file\", \"search_files\", \"get_file_info\"]\n\
         [tools.mcp.probe]\ncommand = {node:?}\nargs = [\"--jitless\", {probe:?}]\nread = [{probe:?}]\nwrite = [{out:?}]\n\
         memory_mb = 160\ntimeout_ms = 3000\nread_only_tools = [\"read\", \"connect\", \"spawn\", \"fork_bomb\", \"eat\", \"sleep\", \"env\", \"write\"]\n\
         env = {{ PROBE_TOKEN = {{ credential = \"mcp-probe-PROBE_TOKEN\" }} }}\n\
         [tools.mcp.netprobe]\ncommand = {node:?}\nargs = [\"--jitless\", {probe:?}]\nread = [{probe:?}]\nnetwork = true\nprocesses = 1\n\
         cpu_seconds = 2\ntimeout_ms = 60000\nread_only_tools = [\"connect\", \"spawn\", \"spin\", \"sleep\"]\n",
        base = support::assistant_config(&llm, &["fs", "probe", "netprobe"], &journal),
        node = s(&node),
        server = s(&fs_server),
        share = s(&share),
        dir = s(&dir),
        probe = s(&dir.join("probe.mjs")),
        out = s(&out),
    );
    // The plugin's secret as on the box: a credential, in the agent's memory only while it
    // starts the plugin.
    let credentials = scratch.join("credentials");
    std::fs::create_dir_all(&credentials).expect("credentials");
    std::fs::write(credentials.join("mcp-probe-PROBE_TOKEN"), PROBE_TOKEN).expect("credential");
    let env = [("CREDENTIALS_DIRECTORY", credentials.display().to_string())];
    let agent = support::connected_agent_with_env(tag, &sim, &config, &env).await;
    Rig { sim, llm, agent, journal, share, out, scratch }
}

impl Rig {
    async fn ask(&self, text: &str) -> String {
        support::ask(&self.sim, &self.agent, Inject::text(text).from("hanmei")).await
    }

    async fn call(&self, tool: &str, args: serde_json::Value) -> String {
        support::call_tool(&self.sim, &self.llm, &self.agent, tool, args).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_mcp_server_becomes_tools_granted_confirmed_and_audited() {
    let rig = rig("mcp-fs").await;
    let share = rig.share.display().to_string();
    let listed = rig.call("fs_list_directory", json!({"path": format!("{share}/minutes")})).await;
    assert!(listed.contains("[FILE] 2026-11-30.md"), "{listed}");
    let offered = rig.llm.requests().last().expect("request").body["tools"].to_string();
    for t in ["fs_read_text_file", "fs_write_file", "probe_read", "probe_fds"] {
        assert!(offered.contains(t), "{t} offered: {offered}");
    }
    assert!(!offered.contains("$schema"), "schemas are passed on without $schema");
    let read = rig.call("fs_read_text_file", json!({"path": format!("{share}/minutes/2026-11-30.md")})).await;
    assert!(read.contains("budget approved"), "{read}");

    // Not listed as read-only: asked first.
    let path = format!("{share}/minutes/2026-12-07.md");
    rig.llm.push(calls(&[("fs_write_file", json!({"path": path, "content": "# Weekly\n- hiring\n"}))]));
    let question = rig.ask("write next week's minutes").await;
    assert!(question.contains("/确认") && question.contains("write_file"), "{question}");
    assert!(!Path::new(&path).exists(), "nothing written before the confirmation");
    rig.llm.push(Scripted::Text("Written.".into()));
    rig.ask(&format!("/confirm {}", code_in(&question))).await;
    assert_eq!(std::fs::read_to_string(&path).expect("written"), "# Weekly\n- hiring\n");
    rig.journal.expect(1, Kind::ToolExecuted, &[("TOOL", "fs_write_file"), ("ACTOR", "hanmei")]);

    // Outside its folder: the server refuses, and the sandbox would too.
    let outside = rig.call("fs_read_text_file", json!({"path": rig.agent.config_path().display().to_string()})).await;
    assert!(outside.to_lowercase().contains("denied") || outside.contains("outside"), "{outside}");
    assert!(!outside.contains(support::SECRET), "the agent's configuration stayed closed: {outside}");
    support::assert_no_secret(&rig.agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sandbox_stops_what_a_plugin_was_not_granted() {
    let rig = rig("mcp-sandbox").await;
    // Files outside its grant: the agent's configuration (with its secrets), system files.
    for path in [rig.agent.config_path().display().to_string(), "/etc/passwd".into(), "/proc/1/environ".into()] {
        let r = rig.call("probe_read", json!({"path": path})).await;
        assert!(r.contains("EACCES") || r.contains("EPERM"), "{path}: {r}");
        assert!(!r.contains(support::SECRET) && !r.contains("root:"), "{r}");
    }
    let inside = rig.out.join("note.txt");
    assert!(
        rig.call("probe_write", json!({"path": inside.display().to_string(), "text": "ok"})).await.contains("written")
    );
    assert_eq!(std::fs::read_to_string(&inside).expect("granted write"), "ok");
    let outside = rig.share.join("planted.txt");
    let r = rig.call("probe_write", json!({"path": outside.display().to_string(), "text": "x"})).await;
    assert!(r.contains("EACCES") && !outside.exists(), "{r}");

    // A socket it was not granted: nothing reaches the listener.
    let listener = TcpListener::bind("127.0.0.1:0").expect("listener");
    listener.set_nonblocking(true).expect("nonblocking");
    let port = listener.local_addr().expect("addr").port();
    let r = rig.call("probe_connect", json!({"port": port})).await;
    assert!(r.starts_with("refused: E"), "{r}");
    std::thread::sleep(Duration::from_millis(100));
    assert!(listener.accept().is_err(), "no connection arrived");

    // The same server granted the network and a process gets both.
    let granted = rig.call("netprobe_connect", json!({"port": port})).await;
    assert_eq!(granted, "connected");
    assert!(listener.accept().is_ok(), "the granted connection arrived");
    assert_eq!(rig.call("netprobe_spawn", json!({})).await, "started, exit 0");

    // No processes: one, or two hundred.
    let r = rig.call("probe_spawn", json!({})).await;
    assert!(r.starts_with("refused: EPERM") || r.starts_with("refused: EAGAIN"), "{r}");
    let r = rig.call("probe_fork_bomb", json!({})).await;
    assert!(r.starts_with("started 0 of 200; refused: E"), "{r}");

    // A scrubbed environment (its configured values redacted on the way out) and no inherited
    // descriptors: no sockets, no files of the agent.
    let env = rig.call("probe_env", json!({})).await;
    assert!(env.contains("\"PROBE_TOKEN\":\"<redacted>\"") && !env.contains(PROBE_TOKEN), "{env}");
    // The credential reached the plugin's environment, and only that: not the agent's.
    let own = std::fs::read(format!("/proc/{}/environ", rig.agent.pid())).expect("the agent's environment");
    assert!(
        !own.windows(PROBE_TOKEN.len()).any(|w| w == PROBE_TOKEN.as_bytes()),
        "the secret is in the agent's environment"
    );
    for leaked in ["ZHULI_LOG", "CARGO", "RUST", "CREDENTIALS_DIRECTORY"] {
        assert!(!env.contains(leaked), "{leaked} leaked into the plugin: {env}");
    }
    // `fds` is not configured read-only and says it is destructive: asked as such.
    rig.llm.push(calls(&[("probe_fds", json!({}))]));
    let question = rig.ask("list your descriptors").await;
    assert!(question.contains("删除或覆盖"), "the server's destructiveHint raises the risk: {question}");
    rig.llm.push(Scripted::Text("done".into()));
    rig.ask(&format!("/confirm {}", code_in(&question))).await;
    let fds = support::tool_results(&rig.llm.requests().last().expect("request").body).remove(0);
    assert!(!fds.contains("socket") && !fds.contains("file"), "inherited descriptors: {fds}");
    assert!(!rig.agent.log().contains(PROBE_TOKEN), "the plugin's secret reached the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_that_hangs_or_exceeds_its_memory_or_cpu_is_stopped_and_the_agent_keeps_serving() {
    let rig = rig("mcp-faults").await;
    assert!(rig.call("probe_sleep", json!({"ms": 10})).await.contains("slept 10 ms"));
    let hung = rig.call("probe_sleep", json!({"ms": 20_000})).await;
    assert!(hung.contains("did not answer within 3000 ms and was stopped"), "{hung}");
    // Still serving: a plain answer, the status (which says what happened), then the plugin
    // again (started anew).
    rig.llm.push(Scripted::Text("Still here.".into()));
    assert_eq!(rig.ask("are you there?").await, "Still here.");
    let status = rig.ask("/status").await;
    assert!(status.contains("probe: not running (10 tools, 1 start; starts on the next call; last: "), "{status}");
    assert!(status.contains("fs: running (pid ") && status.contains("netprobe: running"), "{status}");
    assert!(rig.call("probe_sleep", json!({"ms": 10})).await.contains("slept 10 ms"));

    let eaten = rig.call("probe_eat", json!({"mb": 2048})).await;
    assert!(eaten.contains("plugin probe stopped"), "{eaten}");
    assert!(rig.call("probe_sleep", json!({"ms": 10})).await.contains("slept 10 ms"), "started again after it died");
    let small = rig.call("probe_eat", json!({"mb": 16})).await;
    assert!(small.contains("holding 16 MB"), "within its limit it works: {small}");

    // Its CPU time limit (2 s) ends a plugin long before its call timeout (60 s).
    let spun = rig.call("netprobe_spin", json!({"ms": 50_000})).await;
    assert!(spun.contains("plugin netprobe stopped (SIGXCPU — its CPU time limit"), "{spun}");
    assert!(rig.call("netprobe_sleep", json!({"ms": 10})).await.contains("slept 10 ms"));
    rig.journal.expect(3, Kind::ToolFailed, &[("ACTOR", "hanmei")]);
    support::assert_no_secret(&rig.agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugins_arguments_and_error_output_stay_out_of_the_audit_trail() {
    use support::PRIVATE_TEXT;
    let rig = rig("mcp-audit").await;
    // A plugin's own argument: the audit trail counts arguments, it does not quote them.
    let slept = rig.call("probe_sleep", json!({"ms": 5, "name": PRIVATE_TEXT, "id": PRIVATE_TEXT})).await;
    assert!(slept.contains("slept 5 ms"), "{slept}");
    // The server's error echoes the text it was given: the model sees it, the audit trail does not.
    let file = rig.share.join("minutes/2026-11-30.md").display().to_string();
    let (_, failed) = support::confirmed_call(
        &rig.sim,
        &rig.llm,
        &rig.agent,
        "fs_edit_file",
        json!({"path": file, "edits": [{"oldText": PRIVATE_TEXT, "newText": "x"}]}),
    )
    .await;
    assert!(failed.contains("zq7741"), "the server names the text it could not find: {failed}");
    rig.journal.expect(1, Kind::ToolExecuted, &[("TOOL", "probe_sleep"), ("ACTOR", "hanmei")]);
    let edit = rig.journal.expect(1, Kind::ToolFailed, &[("TOOL", "fs_edit_file"), ("ACTOR", "hanmei")]);
    assert!(support::field(&edit[0], "TARGET").is_some_and(|t| t.ends_with("2026-11-30.md")), "{edit:?}");
    rig.journal.assert_no_private_text();
    support::assert_no_secret(&rig.agent);
}
