//! The `zhuli` binary: argument parsing and wiring only.

use std::{net::SocketAddr, path::PathBuf};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use zhuli::{
    app,
    config::Config,
    demo,
    dingtalk::sim::{SimConfig, Simulator},
    health, logging,
    store::{Retention, Store, backup, key::StoreKey},
};

#[derive(Parser)]
#[command(name = "zhuli", version, about = "An office assistant box that answers in DingTalk")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent with a configuration file.
    Run {
        #[arg(long, value_name = "PATH")]
        config: PathBuf,
    },
    /// Run a local DingTalk gateway simulator on loopback.
    Sim {
        /// Address of the simulator's HTTP API (the WebSocket gets its own port).
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
    },
    /// Chat with the agent in the terminal, against the simulator: no credentials, no network.
    Demo {
        /// An OpenAI-compatible endpoint to answer questions, e.g. a local Ollama at
        /// http://127.0.0.1:11434/v1 (without it the demo answers commands only).
        #[arg(long)]
        llm_url: Option<String>,
        /// The model to ask (with --llm-url).
        #[arg(long, default_value = "qwen2.5")]
        llm_model: String,
        /// The environment variable holding the endpoint's API key, if it needs one.
        #[arg(long)]
        llm_key_env: Option<String>,
    },
    /// Show the running agent's status (over its Unix socket).
    Status {
        /// The agent's configuration (to find the socket).
        #[arg(long, value_name = "PATH", default_value = "/etc/zhuli/zhuli.toml", conflicts_with = "socket")]
        config: PathBuf,
        /// The status socket itself.
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
        /// Print the JSON snapshot instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Check the channel step by step (network, credentials, Stream API, recent errors, version).
    Doctor {
        #[arg(long, value_name = "PATH", default_value = "/etc/zhuli/zhuli.toml")]
        config: PathBuf,
        /// How long to wait for the gateway's first frame.
        #[arg(long, default_value_t = 30_000)]
        wait_ms: u64,
    },
    /// Manage the encrypted store.
    Store {
        #[command(subcommand)]
        command: StoreCommand,
    },
    /// Snapshot the store (still encrypted) into a new directory under DIR, or verify a snapshot.
    Backup {
        #[arg(long, value_name = "PATH")]
        config: PathBuf,
        /// Directory to create the snapshot in.
        #[arg(long, value_name = "DIR", conflicts_with = "verify", required_unless_present = "verify")]
        to: Option<PathBuf>,
        /// Snapshot directory to check (checksums, key, every sealed value).
        #[arg(long, value_name = "SNAPSHOT")]
        verify: Option<PathBuf>,
    },
    /// Replace the store with a verified snapshot (the agent must be stopped).
    Restore {
        #[arg(long, value_name = "PATH")]
        config: PathBuf,
        #[arg(long, value_name = "SNAPSHOT")]
        from: PathBuf,
    },
}

#[derive(Subcommand)]
enum StoreCommand {
    /// Write a new random store key to PATH (for development; the box uses a systemd credential).
    NewKey { path: PathBuf },
    /// Re-seal every value of the store under the key in NEW_KEY, in one transaction.
    Rekey {
        #[arg(long, value_name = "PATH")]
        config: PathBuf,
        #[arg(long, value_name = "NEW_KEY")]
        new_key: PathBuf,
    },
}

/// The store file and its key, as the agent would find them.
fn store_of(config: &std::path::Path) -> anyhow::Result<(PathBuf, StoreKey)> {
    let config = Config::load(config)?;
    let key = StoreKey::load(config.store.key_file.as_deref())?;
    Ok((zhuli::store::file_in(&config.agent.state_dir), key))
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

async fn until_signal(cancel: CancellationToken) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            log::warn!("cannot watch SIGTERM ({e}); stop with Ctrl-C");
            let _ = tokio::signal::ctrl_c().await;
            cancel.cancel();
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    cancel.cancel();
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config } => {
            logging::init(log::LevelFilter::Info);
            let config = Config::load(&config)?;
            runtime()?.block_on(async {
                let cancel = CancellationToken::new();
                tokio::spawn(until_signal(cancel.clone()));
                app::run(config, cancel).await
            })?;
        }
        Command::Sim { listen } => {
            logging::init(log::LevelFilter::Info);
            if !zhuli::dingtalk::settings::is_loopback_host(&listen.ip().to_string()) {
                anyhow::bail!("the simulator binds loopback only; use --listen 127.0.0.1:PORT");
            }
            runtime()?.block_on(async {
                let cfg = SimConfig::default();
                let sim = Simulator::start_on(cfg.clone(), listen).await?;
                println!(
                    "DingTalk simulator on {base}\n\n# agent configuration for it:\n[dingtalk]\nclient_id = {id:?}\nclient_secret = {secret:?}\nrobot_code = {robot:?}\napi_base = {base:?}\n\n\
                     # inject a message:  curl -s {base}/_sim/messages -d '{{\"text\":\"/ping\"}}'\n\
                     # see the replies:   curl -s {base}/_sim/replies\n# status:            curl -s {base}/_sim/status\n\
                     # a failure:         curl -s {base}/_sim/faults -d '{{\"fault\":\"disconnect\"}}'  (or zombie, frozen, drop, refuse_opens, outage, throttle, cut, revoke_tokens, bad_tickets, raw)",
                    base = sim.api_base(),
                    id = cfg.client_id,
                    secret = cfg.client_secret,
                    robot = cfg.robot_code,
                );
                let cancel = CancellationToken::new();
                until_signal(cancel).await;
                sim.shutdown().await;
                anyhow::Ok(())
            })?;
        }
        Command::Store { command: StoreCommand::NewKey { path } } => {
            StoreKey::generate().write_new(&path)?;
            println!("wrote a new store key to {}", path.display());
        }
        Command::Store { command: StoreCommand::Rekey { config, new_key } } => {
            let (file, key) = store_of(&config)?;
            let new = StoreKey::read(&new_key)?;
            let store = Store::open(&file, &key, Retention::default())?;
            let n = store.rekey(&new)?;
            println!(
                "re-sealed {n} values of {} under the key in {}.\nInstall that key now (the store-key credential, or [store] key_file); the old key no longer opens the store.",
                file.display(),
                new_key.display()
            );
        }
        Command::Backup { config, to, verify } => {
            let (file, key) = store_of(&config)?;
            if let Some(snapshot) = verify {
                let m = backup::verify(&snapshot, &key)?;
                println!(
                    "snapshot {} is good: {} bytes, sha256 {}, {} values authenticated, schema {}",
                    snapshot.display(),
                    m.bytes,
                    m.sha256,
                    m.values,
                    m.schema_version
                );
            } else if let Some(to) = to {
                let (dir, m) = backup::backup(&file, &key, &to)?;
                println!(
                    "snapshot written to {} ({} bytes, {} values, sha256 {})",
                    dir.display(),
                    m.bytes,
                    m.values,
                    m.sha256
                );
            }
        }
        Command::Restore { config, from } => {
            let (file, key) = store_of(&config)?;
            match backup::restore(&from, &file, &key)? {
                Some(kept) => println!(
                    "restored {} from {}; the replaced store is kept at {}",
                    file.display(),
                    from.display(),
                    kept.display()
                ),
                None => println!("restored {} from {}", file.display(), from.display()),
            }
        }
        Command::Status { config, socket, json } => {
            let socket = match socket {
                Some(s) => s,
                None => {
                    let config = Config::load(&config)?;
                    config.health.socket_path(&config.agent.state_dir)
                }
            };
            let snapshot = health::status::fetch(&socket)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&snapshot)?);
            } else {
                print!("{}", health::status::table(&snapshot));
            }
        }
        Command::Doctor { config, wait_ms } => {
            logging::init(log::LevelFilter::Error);
            let config = Config::load(&config)?;
            let socket = config.health.socket_path(&config.agent.state_dir);
            let steps =
                runtime()?.block_on(health::doctor::run(&config, &socket, std::time::Duration::from_millis(wait_ms)));
            print!("{}", health::doctor::report(&steps));
            if steps.iter().any(|s| s.verdict == health::doctor::Verdict::Fail) {
                std::process::exit(1);
            }
        }
        Command::Demo { llm_url, llm_model, llm_key_env } => {
            logging::init(log::LevelFilter::Warn);
            let key = match llm_key_env {
                Some(var) => Some(std::env::var(&var).with_context(|| format!("--llm-key-env: {var} is not set"))?),
                None => None,
            };
            let llm = llm_url.map(|url| demo::Llm { url, model: llm_model, key });
            runtime()?.block_on(demo::run(llm))?;
        }
    }
    Ok(())
}
