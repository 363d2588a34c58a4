//! `zhuli demo`: the whole path on one machine with no credentials and no network. A simulator
//! plays DingTalk on loopback, the real agent connects to it over the Stream protocol, and the
//! terminal is a DingTalk chat: each line you type is a message from a user, each answer is
//! what the agent posted back through the session webhook or the OpenAPI.

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio_util::sync::CancellationToken;

use crate::{
    app,
    config::Config,
    dingtalk::sim::{ConnMode, Inject, SimConfig, Simulator},
    store::key::StoreKey,
};

const INTRO: &str = "\
zhuli demo — a DingTalk chat with the agent, all on this machine.
Type a message and press Enter. Try /help, /ping, /status, or a question (with --llm-url,
e.g. \"what is in the shared folder?\"; changes ask for /confirm, and /undo reverses them).
  !group TEXT     the same in a group chat, @mentioning the robot
  !quiet TEXT     a group message that does not @mention the robot (ignored)
  !file NAME      send a file;  !picture  send a picture;  !voice TEXT  a voice message
  !disconnect     the gateway asks to reconnect (nothing is lost)
  !zombie         the connection goes silent (the agent notices and reconnects)
  !quit           leave (or Ctrl-D)
";

/// A model for the demo to ask.
pub struct Llm {
    pub url: String,
    pub model: String,
    pub key: Option<String>,
}

fn random_hex(n: usize) -> String {
    (0..n).map(|_| format!("{:x}", rand::random::<u8>() & 0xf)).collect()
}

/// Run the demo on stdin/stdout until EOF or `!quit`.
pub async fn run(llm: Option<Llm>) -> anyhow::Result<()> {
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
        crate::dingtalk::sim::org::Org::default()
            .dept(2, "Office", 1)
            .person("staff-demo", "Demo User", "Manager", &[2])
            .person("lilei", "Li Lei", "Engineer", &[2])
            .person("wangfang", "Wang Fang", "Accountant", &[2]),
    );
    let state_dir: PathBuf = std::env::temp_dir().join(format!("zhuli-demo-{}", std::process::id()));
    std::fs::create_dir_all(&state_dir).context("creating the demo's state directory")?;
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
            "\n[llm]\nbase_url = {url:?}\nmodel = {model:?}\n{key}",
            url = llm.url,
            model = llm.model,
            key = llm.key.as_ref().map(|k| format!("api_key = {k:?}\n")).unwrap_or_default()
        ));
    }
    let config = Config::parse(&toml, std::path::Path::new("(demo)")).context("building the demo configuration")?;
    let cancel = CancellationToken::new();
    let agent = tokio::spawn(app::run(config, cancel.clone()));

    let mut out = tokio::io::stdout();
    out.write_all(INTRO.as_bytes()).await?;
    let connected = sim.wait_until(Duration::from_secs(10), |s| !s.connections().is_empty()).await;
    out.write_all(if connected {
        b"(agent connected to the simulated gateway)\n"
    } else {
        b"(agent not connected yet; messages will wait)\n"
    })
    .await?;

    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    loop {
        out.write_all(b"you> ").await?;
        out.flush().await?;
        let Some(line) = lines.next_line().await? else { break };
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let (cmd, arg) = line.split_once(' ').unwrap_or((line, ""));
        let inject = match cmd {
            "!quit" | "!exit" => break,
            "!disconnect" => {
                sim.disconnect_all();
                out.write_all(b"(gateway sent SYSTEM disconnect)\n").await?;
                continue;
            }
            "!zombie" => {
                sim.degrade_all(ConnMode::Zombie);
                out.write_all(b"(connection is now a zombie: pings answered, nothing delivered)\n").await?;
                continue;
            }
            "!group" => Inject::text(arg).in_group(true),
            "!quiet" => Inject::text(arg).in_group(false),
            "!file" => Inject::of("file", if arg.is_empty() { "report.pdf" } else { arg }),
            "!picture" => Inject::of("picture", ""),
            "!voice" => Inject::of("audio", arg),
            _ => Inject::text(line),
        };
        let expect_reply = inject.mentioned;
        let before = sim.replies().len();
        sim.inject(inject);
        if !expect_reply {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let note = if sim.replies().len() == before {
                "(no reply: the robot was not @mentioned)\n"
            } else {
                "(unexpected reply)\n"
            };
            out.write_all(note.as_bytes()).await?;
            continue;
        }
        if sim.wait_until(Duration::from_secs(30), |s| s.replies().len() > before).await {
            for r in sim.replies().into_iter().skip(before) {
                out.write_all(format!("zhuli> {}\n", r.text.replace('\n', "\n       ")).as_bytes()).await?;
            }
        } else {
            out.write_all(b"(no reply within 30 s; see the log above)\n").await?;
        }
    }
    cancel.cancel();
    let _ = agent.await;
    sim.shutdown().await;
    let _ = tokio::fs::remove_dir_all(&state_dir).await;
    Ok(())
}
