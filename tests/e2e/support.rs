//! Shared rig: a simulator in the test process, the agent as a child process configured to
//! reach it, and the agent's log captured so tests can read it (and prove secrets stay out).

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use zhuli_sim::dingtalk::{Inject, RecordedReply, SimConfig, Simulator};

pub const SECRET: &str = "e2e-client-secret-Zq8Xv4";

/// Text people write (a query, a title, a comment) that the audit trail must never hold: tests
/// put it into tool arguments. Chinese with spaces, as a real message would be.
pub const PRIVATE_TEXT: &str = "机密 zq7741 季度预算";

/// Fast timings so each fault plays out in about a second.
pub fn sim_config() -> SimConfig {
    SimConfig {
        client_id: "dinge2eclient".into(),
        client_secret: SECRET.into(),
        robot_code: "dinge2eclient".into(),
        ping_interval: Some(Duration::from_millis(250)),
        disconnect_grace: Duration::from_millis(1500),
        redeliver_after: Duration::from_secs(30),
        ..SimConfig::default()
    }
}

pub struct Agent {
    child: Child,
    log: Arc<Mutex<String>>,
    pub dir: PathBuf,
    config: PathBuf,
    env: Vec<(String, String)>,
    launcher: Vec<String>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Agent {
    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The agent's configuration file (for the store subcommands).
    pub fn config_path(&self) -> &std::path::Path {
        &self.config
    }

    /// kill -9 the process.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Start the agent again with the same configuration, state and key.
    pub fn restart(&mut self) {
        self.kill9();
        self.child = start(&self.config, &self.env, &self.launcher, self.log.clone());
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Wait for the process to exit; its exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + limit;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                // Its last lines are still being read: the reader thread holds the other
                // reference to the log until it reaches the end of the output.
                let read = std::time::Instant::now() + Duration::from_secs(5);
                while Arc::strong_count(&self.log) > 1 && std::time::Instant::now() < read {
                    std::thread::sleep(Duration::from_millis(10));
                }
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

pub fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("zhuli-e2e-{tag}-{}-{:x}", std::process::id(), rand::random::<u32>()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// The `[dingtalk]` config for `sim`, with test timings; `extra` is appended verbatim.
pub fn config_for(sim: &Simulator, secret: &str, extra: &str) -> String {
    config_with(
        sim,
        secret,
        "idle_window_ms = 1000\n",
        "retry_initial_ms = 50\nchat_messages_per_minute = 6000\nopenapi_per_second = 500\n",
        extra,
    )
}

/// [`config_for`] with the given idle window line(s) of `[dingtalk.stream]` (empty: the
/// product's default) and `[dingtalk.limits]` body (empty: the product's defaults).
pub fn config_with(sim: &Simulator, secret: &str, idle: &str, limits: &str, extra: &str) -> String {
    format!(
        "[dingtalk]\nclient_id = \"{id}\"\nclient_secret = \"{secret}\"\nrobot_code = \"{id}\"\napi_base = \"{base}\"\n\
         [dingtalk.stream]\n{idle}keepalive_ms = 300\npong_timeout_ms = 600\nconnect_timeout_ms = 2000\n\
         backoff_initial_ms = 50\nbackoff_max_ms = 400\ndrain_ms = 3000\n\
         [dingtalk.limits]\n{limits}{extra}",
        id = sim.config().client_id,
        base = sim.api_base(),
    )
}

/// Start `zhuli run` with `dingtalk_toml` (the `[agent]` table is added here).
pub fn spawn_agent(tag: &str, dingtalk_toml: &str) -> Agent {
    spawn_agent_with_env(tag, dingtalk_toml, &[])
}

/// [`spawn_agent`] with extra environment variables.
pub fn spawn_agent_with_env(tag: &str, dingtalk_toml: &str, env: &[(&str, String)]) -> Agent {
    spawn_agent_launched(tag, dingtalk_toml, env, &[])
}

/// [`spawn_agent_with_env`] started through `launcher`: a program and its arguments that end by
/// running the rest of the command line (`unshare … sh -c '…; exec "$@"'`).
pub fn spawn_agent_launched(tag: &str, dingtalk_toml: &str, env: &[(&str, String)], launcher: &[String]) -> Agent {
    spawn_agent_configured(tag, "", dingtalk_toml, env, launcher)
}

/// [`spawn_agent_launched`] with more lines for the `[agent]` table (`language = "en"\n`).
pub fn spawn_agent_configured(
    tag: &str,
    agent_lines: &str,
    dingtalk_toml: &str,
    env: &[(&str, String)],
    launcher: &[String],
) -> Agent {
    let dir = temp_dir(tag);
    let key = dir.join("store-key");
    zhuli::store::key::StoreKey::generate().write_new(&key).expect("store key");
    let config = format!(
        "[agent]\n{agent_lines}state_dir = {:?}\n[store]\nkey_file = {:?}\n{dingtalk_toml}",
        dir.join("state").display().to_string(),
        key.display().to_string()
    );
    let path = dir.join("zhuli.toml");
    std::fs::write(&path, config).expect("write config");
    let env: Vec<(String, String)> = env.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect();
    let log = Arc::new(Mutex::new(String::new()));
    let launcher = launcher.to_vec();
    let child = start(&path, &env, &launcher, log.clone());
    Agent { child, log, dir, config: path, env, launcher }
}

fn start(config: &std::path::Path, env: &[(String, String)], launcher: &[String], log: Arc<Mutex<String>>) -> Child {
    let mut command = match launcher.split_first() {
        Some((program, args)) => {
            let mut c = Command::new(program);
            c.args(args).arg(env!("CARGO_BIN_EXE_zhuli"));
            c
        }
        None => Command::new(env!("CARGO_BIN_EXE_zhuli")),
    };
    let mut child = command
        .args(["run", "--config"])
        .arg(config)
        .env("ZHULI_LOG", "debug")
        // Root's update journal of this test, never the machine's own.
        .env("ZHULI_UPDATE_DIR", config.with_file_name("zhuli-update"))
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn zhuli");
    let stderr = child.stderr.take().expect("piped stderr");
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Ok(mut l) = log.lock() {
                l.push_str(&line);
                l.push('\n');
            }
        }
    });
    child
}

/// Simulator plus a connected agent.
pub async fn rig(tag: &str) -> (Simulator, Agent) {
    let sim = Simulator::start(sim_config()).await.expect("simulator starts");
    let agent = spawn_agent(tag, &config_for(&sim, SECRET, ""));
    assert!(
        sim.wait_until(Duration::from_secs(15), |s| !s.connections().is_empty()).await,
        "agent did not connect; log:\n{}",
        agent.log()
    );
    (sim, agent)
}

/// Start `zhuli run` with `config` (the `[dingtalk]` table for `sim` is added) and wait until it
/// is connected.
pub async fn connected_agent(tag: &str, sim: &Simulator, config: &str) -> Agent {
    connected_agent_with_env(tag, sim, config, &[]).await
}

/// [`connected_agent`] with extra environment variables.
pub async fn connected_agent_with_env(tag: &str, sim: &Simulator, config: &str, env: &[(&str, String)]) -> Agent {
    connected_agent_in(tag, sim, "", config, env).await
}

/// [`connected_agent_with_env`] with more lines for the `[agent]` table (`language = "en"\n`).
pub async fn connected_agent_in(
    tag: &str,
    sim: &Simulator,
    agent_lines: &str,
    config: &str,
    env: &[(&str, String)],
) -> Agent {
    let agent = spawn_agent_configured(tag, agent_lines, &config_for(sim, SECRET, config), env, &[]);
    assert!(
        sim.wait_until(Duration::from_secs(15), |s| !s.connections().is_empty()).await,
        "agent did not connect; log:\n{}",
        agent.log()
    );
    agent
}

/// Send `m` and wait for its one reply; its text. The wait is long: on a loaded machine a
/// plugin spinning to its CPU-time limit takes many seconds of wall-clock time.
pub async fn ask(sim: &Simulator, agent: &Agent, m: Inject) -> String {
    let id = sim.inject(m);
    let got = sim.wait_until(Duration::from_secs(60), |s| !replies_to(s, &id).is_empty()).await;
    assert!(got, "no reply to {id}; log:\n{}", agent.log());
    replies_to(sim, &id).remove(0).text
}

/// A scripted model turn that calls `list` tools (name, arguments).
pub fn calls(list: &[(&str, serde_json::Value)]) -> zhuli_sim::llm::Scripted {
    zhuli_sim::llm::Scripted::ToolCalls(list.iter().map(|(n, a)| ((*n).to_owned(), a.to_string())).collect())
}

/// The code of the `/确认 NNNN` (`/confirm NNNN` in English) a confirmation question asks for.
pub fn code_in(text: &str) -> String {
    let rest = ["/确认 ", "/confirm "]
        .iter()
        .find_map(|c| text.split_once(c).map(|(_, rest)| rest))
        .unwrap_or_else(|| panic!("no confirmation asked: {text}"));
    rest.chars().take_while(char::is_ascii_digit).collect()
}

/// One tool call, asked by `hanmei` through the scripted model; the tool's result.
pub async fn call_tool(
    sim: &Simulator,
    llm: &zhuli_sim::llm::LlmSim,
    agent: &Agent,
    tool: &str,
    args: serde_json::Value,
) -> String {
    llm.push(calls(&[(tool, args)]));
    llm.push(zhuli_sim::llm::Scripted::Text("done".into()));
    ask(sim, agent, Inject::text(format!("please use {tool}")).from("hanmei")).await;
    tool_results(&llm.requests().last().expect("a model request").body).remove(0)
}

/// A call that needs a confirmation: asked, confirmed by `hanmei`; the question and the result.
pub async fn confirmed_call(
    sim: &Simulator,
    llm: &zhuli_sim::llm::LlmSim,
    agent: &Agent,
    tool: &str,
    args: serde_json::Value,
) -> (String, String) {
    llm.push(calls(&[(tool, args)]));
    let question = ask(sim, agent, Inject::text(format!("please use {tool}")).from("hanmei")).await;
    llm.push(zhuli_sim::llm::Scripted::Text("done".into()));
    ask(sim, agent, Inject::text(format!("/confirm {}", code_in(&question))).from("hanmei")).await;
    (question, tool_results(&llm.requests().last().expect("a model request").body).remove(0))
}

/// `[llm]` for a scripted model, `[access]` granting `tools` to everyone, `[audit]` to `journal`.
pub fn assistant_config(llm: &zhuli_sim::llm::LlmSim, tools: &[&str], journal: &Journal) -> String {
    format!(
        "[llm]\nbase_url = {base:?}\nwhere = \"local\"\nmodel = \"sim-model\"\napi_key = \"sk-e2e\"\ntimeout_ms = 5000\nmax_retries = 1\n\
         requests_per_minute = 6000\n\
         [access]\ndefault_roles = [\"member\"]\n\
         [access.roles.member]\ntools = {tools:?}\n\
         [audit]\njournal_socket = {journal:?}\n",
        base = llm.base_url(),
        journal = journal.path.display().to_string(),
    )
}

/// The tool results shown to the model in one recorded chat-completions request body.
pub fn tool_results(body: &serde_json::Value) -> Vec<String> {
    body["messages"]
        .as_array()
        .map(|m| {
            m.iter()
                .filter(|m| m["role"] == "tool")
                .map(|m| m["content"].as_str().unwrap_or_default().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Replies that answer `msg_id` (session-webhook route).
pub fn replies_to(sim: &Simulator, msg_id: &str) -> Vec<RecordedReply> {
    sim.replies().into_iter().filter(|r| r.in_reply_to.as_deref() == Some(msg_id)).collect()
}

/// Wait until every id in `ids` has a reply; then check none has two.
pub async fn assert_each_answered_once(sim: &Simulator, agent: &Agent, ids: &[String], limit: Duration) {
    let all = sim.wait_until(limit, |s| ids.iter().all(|id| !replies_to(s, id).is_empty())).await;
    let missing: Vec<&String> = ids.iter().filter(|id| replies_to(sim, id).is_empty()).collect();
    assert!(
        all,
        "{} of {} messages unanswered: {missing:?}\nsim: {:?}\nagent log:\n{}",
        missing.len(),
        ids.len(),
        sim.counters(),
        agent.log()
    );
    // Give stragglers (a duplicate reply) a moment to show up before counting.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for id in ids {
        assert_eq!(replies_to(sim, id).len(), 1, "message {id} answered more than once");
    }
}

/// Every test ends by checking the agent never printed the secret.
pub fn assert_no_secret(agent: &Agent) {
    assert!(!agent.log().contains(SECRET), "client secret appeared in the agent log");
}

/// `n` `/ping` messages, each from its own user `staff-{tag}-{i}`; their msgIds.
pub fn burst(sim: &Simulator, n: usize, tag: &str) -> Vec<String> {
    (0..n).map(|i| sim.inject(Inject::text(format!("/ping {tag} {i}")).from(format!("staff-{tag}-{i}")))).collect()
}

pub type Entry = Vec<(String, String)>;

/// A journal socket that keeps every datagram it receives.
pub struct Journal {
    pub path: PathBuf,
    entries: Arc<Mutex<Vec<Entry>>>,
}

impl Journal {
    pub fn start(dir: &std::path::Path) -> Journal {
        let path = dir.join("journal.sock");
        let socket = std::os::unix::net::UnixDatagram::bind(&path).expect("bind journal socket");
        let entries = Arc::new(Mutex::new(Vec::new()));
        let sink = entries.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 256 * 1024];
            while let Ok(n) = socket.recv(&mut buf) {
                if let Ok(mut e) = sink.lock() {
                    e.push(zhuli::audit::decode(&buf[..n]));
                }
            }
        });
        Journal { path, entries }
    }

    pub fn all(&self) -> Vec<Entry> {
        self.entries.lock().map(|e| e.clone()).unwrap_or_default()
    }

    /// [`Journal::find`], once `n` such entries have arrived (datagrams are read on a thread,
    /// so one may trail the chat reply it belongs to by a moment).
    pub fn expect(&self, n: usize, kind: zhuli::audit::Kind, having: &[(&str, &str)]) -> Vec<Entry> {
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        loop {
            let found = self.find(kind, having);
            if found.len() >= n || std::time::Instant::now() > deadline {
                assert_eq!(found.len(), n, "{kind:?} {having:?}: {found:?}");
                return found;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// No field of any entry so far holds [`PRIVATE_TEXT`] or its distinctive parts (a cut
    /// copy is still a leak).
    pub fn assert_no_private_text(&self) {
        for e in self.all() {
            for (k, v) in &e {
                assert!(!v.contains("zq7741") && !v.contains("季度预算"), "{k} holds what a person wrote: {e:?}");
            }
        }
    }

    /// Entries of `kind` (by MESSAGE_ID) with every `(field, value)` of `having`.
    pub fn find(&self, kind: zhuli::audit::Kind, having: &[(&str, &str)]) -> Vec<Entry> {
        self.all()
            .into_iter()
            .filter(|e| field(e, "MESSAGE_ID") == Some(kind.message_id()))
            .filter(|e| having.iter().all(|(k, v)| field(e, k) == Some(*v)))
            .collect()
    }
}

pub fn field<'a>(entry: &'a Entry, name: &str) -> Option<&'a str> {
    entry.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// A server program the test started on loopback (Radicale, rclone).
pub struct Server(zhuli_sim::local_server::LocalServer);

impl Server {
    pub fn new(
        started: Result<zhuli_sim::local_server::LocalServer, zhuli_sim::local_server::LocalServerError>,
    ) -> Server {
        Server(started.unwrap_or_else(|e| panic!("{e}")))
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        self.0.addr
    }
}

/// `npm ci` in `dir` unless `marker` (a file under its node_modules) is there already; one test
/// process at a time (nextest runs tests in parallel processes).
pub fn npm_install(dir: &std::path::Path, marker: &str) {
    if Command::new("node").arg("--version").output().is_err() {
        panic!("Node.js is needed for this test: apt-get install nodejs npm (or run tests/run)");
    }
    let lock = std::fs::File::create(dir.join(".npm-install.lock")).expect("lock file");
    lock.lock().expect("lock");
    if dir.join("node_modules").join(marker).exists() {
        return;
    }
    let status = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
        .current_dir(dir)
        .status()
        .unwrap_or_else(|e| panic!("npm is needed to install the test's packages ({e}): apt-get install npm"));
    assert!(status.success(), "npm ci in {} failed", dir.display());
}

/// A copy of the `zhuli` binary in `dir` that any user may run: tests that run it as another
/// user must not depend on the checkout's folder being open to them.
pub fn binary_for_any_user(dir: &std::path::Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let copy = dir.join("zhuli-for-any-user");
    std::fs::copy(env!("CARGO_BIN_EXE_zhuli"), &copy).expect("copy the binary");
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    copy
}

/// libfaketime, which moves an agent's wall clock while its monotonic clock (its timers) runs on.
pub const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";

/// A clock file (`+0` to start; write `+30m`, `-2h`, `+1805s` to move the clock) and the
/// environment that makes an agent read its wall clock through it, anew at every look.
pub fn fake_clock(tag: &str) -> (PathBuf, Vec<(&'static str, String)>) {
    assert!(
        std::path::Path::new(LIBFAKETIME).exists(),
        "this test moves the agent's wall clock with libfaketime: apt-get install libfaketime (or run tests/run)"
    );
    let clock = temp_dir(&format!("{tag}-clock")).join("faketime");
    std::fs::write(&clock, "+0").expect("clock file");
    let env = vec![
        ("LD_PRELOAD", LIBFAKETIME.to_owned()),
        ("FAKETIME_TIMESTAMP_FILE", clock.display().to_string()),
        ("FAKETIME_NO_CACHE", "1".to_owned()),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1".to_owned()),
    ];
    (clock, env)
}

/// `zhuli doctor --config config`, its standard output.
pub fn doctor(config: &std::path::Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_zhuli"))
        .args(["doctor", "--wait-ms", "3000", "--config"])
        .arg(config)
        .env("ZHULI_UPDATE_DIR", config.with_file_name("zhuli-update"))
        .output()
        .expect("doctor");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The simulator crate's binary (`zhuli-sim`), built beside `zhuli` by a workspace build
/// (`tests/run`, or `cargo build --workspace`).
pub fn sim_bin() -> PathBuf {
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_zhuli")).with_file_name("zhuli-sim");
    assert!(
        bin.is_file(),
        "{} is missing: build the workspace (cargo build --workspace), or run tests/run",
        bin.display()
    );
    bin
}
