//! The `zhuli-sim` binary: the DingTalk gateway simulator on loopback, and the terminal demo.
//! A developer's tool; the box never carries it.

use std::net::SocketAddr;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use zhuli::logging;
use zhuli_sim::{
    demo,
    dingtalk::{SimConfig, Simulator},
};

#[derive(Parser)]
#[command(name = "zhuli-sim", version, about = "zhuli's DingTalk simulator and terminal demo (for developers)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn run_command(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
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
                zhuli::app::until_signal(cancel).await;
                sim.shutdown().await;
                anyhow::Ok(())
            })?;
        }
        Command::Demo { llm_url, llm_model, llm_key_env } => {
            // The demo prints the agent's log lines itself, between its own.
            let logs = logging::init_queue(log::LevelFilter::Warn, 256);
            let key = match llm_key_env {
                Some(var) => Some(std::env::var(&var).with_context(|| format!("--llm-key-env: {var} is not set"))?),
                None => None,
            };
            let llm = llm_url.map(|url| demo::Llm { url, model: llm_model, key });
            let rt = runtime()?;
            let stopped = rt.block_on(demo::run(llm, logs));
            // A read of the terminal cannot be cancelled: after Ctrl-C, do not wait for Enter.
            rt.shutdown_background();
            if let Some(signo) = stopped? {
                std::process::exit(128 + signo);
            }
        }
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    match run_command(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
