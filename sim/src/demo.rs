//! `zhuli-sim demo`: the whole path on one machine with no credentials and no network. A simulator
//! plays DingTalk on loopback, the real agent connects to it over the Stream protocol, and the
//! terminal is a DingTalk chat: each line you type is a message from a user, each answer is
//! what the agent posted back through the session webhook or the OpenAPI.
//!
//! The demo owns the terminal: the agent's log lines reach it through a queue and are printed on
//! lines of their own, never on the prompt. Its state lives in a private temporary folder that
//! holds a store key; the folder is removed however the demo ends — `!quit`, end of input,
//! Ctrl-C or SIGTERM, an error.

use std::{
    future::Future,
    os::unix::fs::DirBuilderExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Stdout},
    signal::unix::{Signal, SignalKind, signal},
    sync::mpsc,
};
use tokio_util::sync::CancellationToken;

use zhuli::{app, config::Config, store::key::StoreKey};

use crate::dingtalk::{ConnMode, Inject, SimConfig, Simulator};

const INTRO: &str = "\
zhuli-sim demo — a DingTalk chat with the agent, all on this machine.
Type a message and press Enter. Try /help, /ping, /status, or a question (with --llm-url,
e.g. \"what is in the shared folder?\"; changes ask for /confirm, and /undo reverses them).
  !group TEXT     the same in a group chat, @mentioning the robot
  !quiet TEXT     a group message that does not @mention the robot (ignored)
  !file NAME      send a file;  !picture  send a picture;  !voice TEXT  a voice message
  !disconnect     the gateway asks to reconnect (nothing is lost)
  !zombie         the connection goes silent (the agent notices and reconnects)
  !quit           leave (or Ctrl-D, Ctrl-C)
";

/// Printed after an answer that needed a model when the demo has none: the agent's own answer
/// is written for a box, where an administrator adds the model.
const NEEDS_LLM_URL: &str = "(the demo has no model: to have questions answered, start it with --llm-url, \
e.g. `zhuli-sim demo --llm-url http://127.0.0.1:11434/v1 --llm-model qwen2.5` for a local Ollama)\n";

/// How long the agent has to reconnect after `!disconnect` before the demo says it has not.
const RECONNECT_WAIT: Duration = Duration::from_secs(15);

/// How long the agent has to stop when the demo ends; a second Ctrl-C does not wait.
const STOP_WAIT: Duration = Duration::from_secs(10);

/// A model for the demo to ask.
pub struct Llm {
    pub url: String,
    pub model: String,
    pub key: Option<String>,
}

fn random_hex(n: usize) -> String {
    (0..n).map(|_| format!("{:x}", rand::random::<u8>() & 0xf)).collect()
}

/// The demo's state directory, removed when dropped (so also on an error or a panic): it holds
/// the store key.
struct Scratch(PathBuf);

impl Scratch {
    /// A new folder only this user can enter, under a name nobody could have prepared for us.
    fn create() -> anyhow::Result<Scratch> {
        let dir = std::env::temp_dir().join(format!("zhuli-demo-{}-{}", std::process::id(), random_hex(8)));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("creating the demo's state directory {}", dir.display()))?;
        Ok(Scratch(dir))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// SIGINT (Ctrl-C) and SIGTERM: they end the demo as `!quit` does.
struct Stops {
    interrupt: Signal,
    terminate: Signal,
}

impl Stops {
    fn catch() -> anyhow::Result<Stops> {
        Ok(Stops {
            interrupt: signal(SignalKind::interrupt()).context("catching Ctrl-C")?,
            terminate: signal(SignalKind::terminate()).context("catching SIGTERM")?,
        })
    }

    /// The next signal's number.
    async fn next(&mut self) -> i32 {
        tokio::select! {
            _ = self.interrupt.recv() => nix::libc::SIGINT,
            _ = self.terminate.recv() => nix::libc::SIGTERM,
        }
    }
}

/// The terminal: the demo's lines, the agent's log lines, and the prompt.
struct Screen {
    out: Stdout,
    logs: mpsc::Receiver<String>,
    /// "you> " is the last thing printed: anything else must start on a new line.
    at_prompt: bool,
}

impl Screen {
    async fn write(&mut self, text: &str) -> std::io::Result<()> {
        self.out.write_all(text.as_bytes()).await?;
        self.out.flush().await
    }

    async fn prompt(&mut self) -> std::io::Result<()> {
        self.write("you> ").await?;
        self.at_prompt = true;
        Ok(())
    }

    /// Whole lines of the demo's own.
    async fn say(&mut self, text: &str) -> std::io::Result<()> {
        if std::mem::take(&mut self.at_prompt) {
            self.write("\n").await?;
        }
        self.write(text).await
    }

    /// One log line on a line of its own, and the prompt again if it was showing (what someone
    /// had typed stays on the line above and is sent with the rest).
    async fn log(&mut self, line: &str) -> std::io::Result<()> {
        if self.at_prompt {
            self.write(&format!("\n{line}\nyou> ")).await
        } else {
            self.write(&format!("{line}\n")).await
        }
    }

    /// Wait for `work`, printing the agent's log lines as they come.
    async fn during<F: Future>(&mut self, work: F) -> std::io::Result<F::Output> {
        tokio::pin!(work);
        loop {
            tokio::select! {
                biased;
                done = &mut work => return Ok(done),
                Some(line) = self.logs.recv() => self.log(&line).await?,
            }
        }
    }

    /// The log lines still queued.
    async fn drain(&mut self) -> std::io::Result<()> {
        while let Ok(line) = self.logs.try_recv() {
            self.log(&line).await?;
        }
        Ok(())
    }
}

/// Run the demo on stdin/stdout until end of input, `!quit`, or a signal, whose number is
/// returned. `logs` are the agent's log lines, printed between the demo's own.
pub async fn run(llm: Option<Llm>, logs: mpsc::Receiver<String>) -> anyhow::Result<Option<i32>> {
    // Caught before the folder with the key exists, so no signal can leave it behind.
    let mut stops = Stops::catch()?;
    let scratch = Scratch::create()?;
    let mut screen = Screen { out: tokio::io::stdout(), logs, at_prompt: false };
    let has_llm = llm.is_some();
    let (sim, config) = set_up(llm, scratch.path()).await?;
    let cancel = CancellationToken::new();
    let mut agent = tokio::spawn(app::run(config, cancel.clone()));

    let ended = tokio::select! {
        done = chat(&sim, has_llm, &mut screen) => done.map(|()| None),
        signo = stops.next() => Ok(Some(signo)),
    };
    // However the chat ended (a closed terminal too), the agent stops before its folder goes;
    // its last log lines wait in the queue meanwhile.
    cancel.cancel();
    let hurried = tokio::select! {
        _ = tokio::time::timeout(STOP_WAIT, &mut agent) => false,
        _ = stops.next() => true,
    };
    if hurried {
        agent.abort();
    }
    sim.shutdown().await;
    let dir = scratch.path().display().to_string();
    drop(scratch);
    // Off the prompt's line: nobody is asked for anything any more.
    let _ = screen.say("").await;
    let _ = screen.drain().await;
    if let Ok(Some(_)) = ended {
        let _ = screen.say(&format!("(stopped; the demo's folder {dir} and its key are removed)\n")).await;
    }
    ended
}

/// The simulator, with a small organisation, and the agent's configuration in `state_dir`.
async fn set_up(llm: Option<Llm>, state_dir: &Path) -> anyhow::Result<(Simulator, Config)> {
    let client_id = format!("dingdemo{}", random_hex(8));
    let sim_cfg = SimConfig {
        client_id: client_id.clone(),
        client_secret: random_hex(32),
        robot_code: client_id.clone(),
        ping_interval: Some(Duration::from_secs(5)),
        disconnect_grace: Duration::from_secs(3),
        redeliver_after: Duration::from_secs(5),
        ..SimConfig::default()
    };
    let sim = Simulator::start(sim_cfg.clone()).await.context("starting the DingTalk simulator")?;
    // A small organisation for the DingTalk workspace tools (calendar, to-dos, address book).
    sim.seed_org(
        crate::dingtalk::org::Org::default()
            .dept(2, "Office", 1)
            .person("staff-demo", "Demo User", "Manager", &[2])
            .person("lilei", "Li Lei", "Engineer", &[2])
            .person("wangfang", "Wang Fang", "Accountant", &[2]),
    );
    let key_file = state_dir.join("store-key");
    StoreKey::generate().write_new(&key_file).context("writing the demo's store key")?;
    let toml = format!(
        "[agent]\nstate_dir = {state:?}\n\n[store]\nkey_file = {key:?}\n\n[dingtalk]\nclient_id = {id:?}\nclient_secret = {secret:?}\nrobot_code = {id:?}\napi_base = {base:?}\n\n\
         [dingtalk.stream]\nidle_window_ms = 12000\nkeepalive_ms = 4000\npong_timeout_ms = 3000\nbackoff_initial_ms = 200\nbackoff_max_ms = 5000\n",
        state = state_dir.display().to_string(),
        key = key_file.display().to_string(),
        id = sim_cfg.client_id,
        secret = sim_cfg.client_secret,
        base = sim.api_base(),
    );
    // A shared folder to try the files tools on, and every tool granted to the demo user.
    let share = state_dir.join("share");
    std::fs::create_dir_all(&share).context("creating the demo's shared folder")?;
    std::fs::write(share.join("welcome.txt"), "Welcome to zhuli. This file lives in the demo's shared folder.\n")
        .context("writing the demo's sample file")?;
    let mut toml = toml;
    toml.push_str(&format!(
        "\n[access]\ndefault_roles = [\"demo\"]\nadmins = [\"staff-demo\"]\n[access.roles.demo]\ntools = [\"*\"]\n\
         [tools.files.roots]\nshare = {share:?}\n",
        share = share.display().to_string()
    ));
    if let Some(llm) = &llm {
        toml.push_str(&format!(
            "\n[llm]\nbase_url = {url:?}\nwhere = {place:?}\nmodel = {model:?}\n{key}",
            url = llm.url,
            // A model on this machine may see everything; any other is taken for a cloud one.
            place = if ["://127.", "://localhost", "://[::1]"].iter().any(|h| llm.url.contains(h)) {
                "local"
            } else {
                "cloud"
            },
            model = llm.model,
            key = llm.key.as_ref().map(|k| format!("api_key = {k:?}\n")).unwrap_or_default()
        ));
    }
    let config = Config::parse(&toml, Path::new("(demo)")).context("building the demo configuration")?;
    Ok((sim, config))
}

/// The chat on stdin/stdout, until end of input or `!quit`.
async fn chat(sim: &Simulator, has_llm: bool, screen: &mut Screen) -> anyhow::Result<()> {
    screen.say(INTRO).await?;
    let connected = screen.during(sim.wait_until(Duration::from_secs(10), |s| !s.connections().is_empty())).await?;
    screen
        .say(if connected {
            "(agent connected to the simulated gateway)\n"
        } else {
            "(agent not connected yet; messages will wait)\n"
        })
        .await?;

    // A terminal echoes what is typed; input from a pipe is echoed here, so the transcript reads
    // the same and nothing is printed after the prompt on its line.
    let echo = !std::io::IsTerminal::is_terminal(&std::io::stdin());
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    loop {
        screen.prompt().await?;
        let Some(line) = screen.during(lines.next_line()).await?? else { break };
        if echo {
            screen.write(&format!("{line}\n")).await?;
        }
        // Enter was pressed: the terminal has moved to the next line.
        screen.at_prompt = false;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let (cmd, arg) = line.split_once(' ').unwrap_or((line, ""));
        let inject = match cmd {
            "!quit" | "!exit" => break,
            "!disconnect" => {
                disconnect(sim, screen).await?;
                continue;
            }
            "!zombie" => {
                sim.degrade_all(ConnMode::Zombie);
                screen.say("(connection is now a zombie: pings answered, nothing delivered)\n").await?;
                continue;
            }
            "!group" => Inject::text(arg).in_group(true),
            "!quiet" => Inject::text(arg).in_group(false),
            "!file" => Inject::of("file", if arg.is_empty() { "report.pdf" } else { arg }),
            "!picture" => Inject::of("picture", ""),
            "!voice" => Inject::of("audio", arg),
            _ => Inject::text(line),
        };
        // Everything but a command is for the model.
        let for_the_model = match cmd {
            "!group" | "!quiet" => !arg.starts_with('/'),
            _ => !line.starts_with('/'),
        };
        let expect_reply = inject.mentioned;
        let before = sim.replies().len();
        sim.inject(inject);
        if !expect_reply {
            screen.during(tokio::time::sleep(Duration::from_millis(500))).await?;
            let note = if sim.replies().len() == before {
                "(no reply: the robot was not @mentioned)\n"
            } else {
                "(unexpected reply)\n"
            };
            screen.say(note).await?;
            continue;
        }
        if screen.during(sim.wait_until(Duration::from_secs(30), |s| s.replies().len() > before)).await? {
            for r in sim.replies().into_iter().skip(before) {
                screen.say(&format!("zhuli> {}\n", r.text.replace('\n', "\n       "))).await?;
            }
            if for_the_model && !has_llm {
                screen.say(NEEDS_LLM_URL).await?;
            }
        } else {
            screen.say("(no reply within 30 s; see the log above)\n").await?;
        }
    }
    Ok(())
}

/// `!disconnect`: the gateway ends the connection; show the agent's new one, and whether any
/// message was left behind.
async fn disconnect(sim: &Simulator, screen: &mut Screen) -> anyhow::Result<()> {
    let newest = |s: &Simulator| s.connections().iter().map(|(id, _)| *id).max().unwrap_or(0);
    let before = newest(sim);
    let dropped_before = sim.counters().expired;
    let started = Instant::now();
    sim.disconnect_all();
    screen.say("(gateway sent SYSTEM disconnect)\n").await?;
    if !screen.during(sim.wait_until(RECONNECT_WAIT, |s| newest(s) > before)).await? {
        screen.say(&format!("(not reconnected within {} s; see the log above)\n", RECONNECT_WAIT.as_secs())).await?;
        return Ok(());
    }
    let took = match started.elapsed() {
        t if t < Duration::from_secs(1) => format!("{} ms", t.as_millis()),
        t => format!("{:.1} s", t.as_secs_f32()),
    };
    let lost = sim.counters().expired.saturating_sub(dropped_before);
    let waiting = sim.unacked();
    let fate = match (lost, waiting) {
        (0, 0) => "nothing lost".to_owned(),
        (0, n) => format!("{n} messages on their way to the new connection"),
        (n, _) => format!("{n} messages dropped by the gateway"),
    };
    screen.say(&format!("— connection closed by the gateway; reconnected in {took}, {fate} —\n")).await?;
    Ok(())
}
