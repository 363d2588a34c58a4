//! Memory and disk under sustained load (issue 24), printed, never asserted: the real
//! `zhuli run` (`ZHULI_BIN`, a release build) against the DingTalk simulator on loopback, through
//! `ZHULI_BENCH_MESSAGES` messages (300,000 by default; `.ci/bench` runs the default).
//!
//! Messages come in waves of 2,000, one per conversation of 2,000 people, each wave answered
//! before the next is pushed (so no texts are merged and the work in flight stays one wave):
//! nine in ten are `/ping`, one in ten a question to a scripted model on loopback that echoes it
//! (so 200 conversations keep a history, up to its bounds). At intervals it prints the agent's
//! RssAnon (and the highest RssAnon sampled every 100 ms since the line before), VmRSS and the
//! store file's size; then the same after `ZHULI_BENCH_IDLE_S` seconds idle (60 by default);
//! then the agent is stopped, started again on the big store, and given 10,000 more messages
//! (the restarted box of the issue).
//!
//! First, in this process, the store's upkeep on a big file: 300,000 message ids recorded (in
//! commits of 64, as the recorder makes them), 250,000 of them expired and mixed with the live ones:
//! how fast the upkeep's batches forget them, and how long a compaction of what is left takes
//! (every store call waits that long).
//!
//! The agent runs with the environment this process has; the box's unit sets the allocator's
//! (`Environment=` in `systemd/zhuli.service`), and this benchmark passes those lines on too,
//! so the figures are the box's.

use std::{
    path::{Path, PathBuf},
    process::Child,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use zhuli::store::key::StoreKey;
use zhuli_sim::{
    dingtalk::{Inject, SimConfig, Simulator},
    llm::LlmSim,
};

/// Conversations (and people); one message each per wave.
const PEOPLE: usize = 2_000;
/// Messages after the restart.
const AFTER_RESTART: usize = 10_000;

fn main() {
    store_upkeep();
    let Some(bin) = std::env::var_os("ZHULI_BIN").map(PathBuf::from) else {
        println!("memory under load: skipped (set ZHULI_BIN to a built zhuli binary)");
        return;
    };
    let total: usize =
        std::env::var("ZHULI_BENCH_MESSAGES").ok().and_then(|v| v.parse().ok()).unwrap_or(300_000).max(PEOPLE);
    let idle = Duration::from_secs(std::env::var("ZHULI_BENCH_IDLE_S").ok().and_then(|v| v.parse().ok()).unwrap_or(60));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
    rt.block_on(run(bin, total, idle));
}

async fn run(bin: PathBuf, total: usize, idle: Duration) {
    let started = Instant::now();
    let sim = Simulator::start(SimConfig::default()).await.expect("sim");
    let llm = LlmSim::start().await.expect("llm sim");
    llm.set_echo(true);
    llm.stop_recording();
    let dir = std::env::temp_dir().join(format!("zhuli-bench-memory-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let state = dir.join("state");
    std::fs::create_dir_all(&state).expect("state dir");
    let config = dir.join("zhuli.toml");
    std::fs::write(&config, config_toml(&sim, &llm, &dir)).expect("config");
    let env = unit_environment();
    println!(
        "memory under load: {total} messages in waves of {PEOPLE} (1 in 10 a model turn), the agent's environment from the unit: {}",
        if env.is_empty() {
            "none".to_owned()
        } else {
            env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ")
        }
    );
    let store = zhuli::store::file_in(&state);

    let agent = Running::start(&bin, &config, &env);
    assert!(sim.wait_until(Duration::from_secs(15), |s| !s.connections().is_empty()).await, "agent did not connect");
    let every = (total / 30).max(PEOPLE).div_ceil(PEOPLE) * PEOPLE;
    let mut sent = 0usize;
    let mut replies = 0usize;
    agent.line("start", 0, &store, started);
    while sent < total {
        let wave = PEOPLE.min(total - sent);
        (sent, replies) = push_wave(&sim, sent, wave, replies).await;
        if sent.is_multiple_of(every) || sent == total || sent == 10_000 {
            agent.line("after", sent, &store, started);
        }
    }
    let idle_from = Instant::now();
    for mark in [10, 30, idle.as_secs()] {
        let at = Duration::from_secs(mark.min(idle.as_secs()));
        tokio::time::sleep(at.saturating_sub(idle_from.elapsed())).await;
        agent.line(&format!("idle {}s, after", at.as_secs()), sent, &store, started);
        if at == idle {
            break;
        }
    }

    // The restarted box: a clean stop, a start on the big store, 10,000 more messages.
    agent.stop();
    let connections = sim.connections().len();
    let agent = Running::start(&bin, &config, &env);
    assert!(
        sim.wait_until(Duration::from_secs(30), |s| s.connections().len() > connections).await,
        "agent did not connect again"
    );
    agent.line("restarted on the store of", sent, &store, started);
    let restart_from = sent;
    while sent < restart_from + AFTER_RESTART {
        (sent, replies) = push_wave(&sim, sent, PEOPLE, replies).await;
    }
    agent.line(&format!("restarted, {AFTER_RESTART} more, after"), sent, &store, started);
    agent.stop();
    println!("memory under load: done in {:.0} s", started.elapsed().as_secs_f64());
    sim.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Push one wave (one message per conversation) and wait until it is ACKed and answered; the
/// messages and replies counted so far.
async fn push_wave(sim: &Simulator, sent: usize, wave: usize, replies: usize) -> (usize, usize) {
    for p in 0..wave {
        let i = sent + p;
        let text = if p % 10 == 0 {
            format!("请把第 {i} 号报告的要点整理一下，下午开会前发给我，谢谢。")
        } else {
            "/ping".to_owned()
        };
        sim.inject(Inject::text(text).conversation(format!("cid-{p}")).from(format!("staff-{p}")));
    }
    let target = sent + wave;
    let acked = sim.wait_until(Duration::from_secs(120), |s| s.counters().acked as usize >= target).await;
    assert!(acked, "wave up to {target} not ACKed: {:?}", sim.counters());
    // Replies are counted by copying the simulator's record, so not on every change.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let n = sim.replies().len();
        if n >= replies + wave {
            return (target, n);
        }
        assert!(Instant::now() < deadline, "wave up to {target}: {} of {wave} answered", n - replies);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn config_toml(sim: &Simulator, llm: &LlmSim, dir: &Path) -> String {
    let key = dir.join("store-key");
    StoreKey::generate().write_new(&key).expect("store key");
    format!(
        "[agent]\nstate_dir = {state:?}\nworkers = 32\n[store]\nkey_file = {key:?}\n\
         [dingtalk]\nclient_id = {id:?}\nclient_secret = {secret:?}\nrobot_code = {id:?}\napi_base = {base:?}\n\
         [dingtalk.limits]\nchat_messages_per_minute = 1000000\nopenapi_per_second = 100000\n\
         [llm]\nbase_url = {llm:?}\nwhere = \"local\"\nmodel = \"bench\"\nrequests_per_minute = 10000000\n",
        state = dir.join("state").display().to_string(),
        key = key.display().to_string(),
        id = sim.config().client_id,
        secret = sim.config().client_secret,
        base = sim.api_base(),
        llm = llm.base_url(),
    )
}

/// The `Environment=` settings of `systemd/zhuli.service` that shape memory (`MALLOC_*`), so the
/// agent runs here as on the box.
fn unit_environment() -> Vec<(String, String)> {
    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../systemd/zhuli.service"))
        .expect("the unit file");
    unit.lines()
        .filter_map(|l| l.strip_prefix("Environment="))
        .filter_map(|kv| kv.split_once('='))
        .filter(|(k, _)| k.starts_with("MALLOC_"))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// The agent process and a sampler of its RssAnon every 100 ms (the highest since the last line).
struct Running {
    child: Child,
    peak_kib: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Running {
    fn start(bin: &Path, config: &Path, env: &[(String, String)]) -> Running {
        let child = std::process::Command::new(bin)
            .args(["run", "--config"])
            .arg(config)
            .env("ZHULI_LOG", "warn")
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .spawn()
            .expect("spawn zhuli");
        let peak_kib = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        {
            let (pid, peak, stop) = (child.id(), peak_kib.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Some(kib) = kib_field(pid, "RssAnon:") {
                        peak.fetch_max(kib, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            });
        }
        Running { child, peak_kib, stop }
    }

    /// One line of figures, `what` `messages` so far.
    fn line(&self, what: &str, messages: usize, store: &Path, started: Instant) {
        let pid = self.child.id();
        let anon = kib_field(pid, "RssAnon:").unwrap_or(0);
        let peak = self.peak_kib.swap(0, Ordering::Relaxed).max(anon);
        let size = std::fs::metadata(store).map(|m| m.len()).unwrap_or(0);
        println!(
            "  {what} {messages:>7} messages ({:>4.0} s): RssAnon {:>5.1} MiB (peak since last line {:>5.1} MiB), VmRSS {:>5.1} MiB, store {:>6.1} MiB",
            started.elapsed().as_secs_f64(),
            mib(anon),
            mib(peak),
            mib(kib_field(pid, "VmRSS:").unwrap_or(0)),
            size as f64 / 1048576.0,
        );
    }

    /// SIGTERM, as systemd stops it, and wait for the exit.
    fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
        }
        let _ = self.child.wait();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn kib_field(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    line[key.len()..].split_whitespace().next()?.parse().ok()
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn store_upkeep() {
    use zhuli::{
        dingtalk::message::RobotMessage,
        store::{Retention, Store},
    };
    let dir = std::env::temp_dir().join(format!("zhuli-bench-upkeep-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("zhuli.redb");
    let store = Store::open(&path, &StoreKey::generate(), Retention::default()).expect("store");
    let data =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/messages/text_single.json"))
            .expect("fixture");
    let template = RobotMessage::parse(&data).expect("fixture parses");
    let (n, expired_every) = (300_000usize, 6usize);
    let now = 1_000 * 86_400_000i64;
    let messages: Vec<RobotMessage> = (0..n)
        .map(|i| {
            let mut m = template.clone();
            m.msg_id = format!("msg{:016x}", (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            m
        })
        .collect();
    for (c, chunk) in messages.chunks(64).enumerate() {
        // Five commits in six are a day old: expired by now.
        let at = if c % expired_every == 0 { now } else { now - 25 * 3_600_000 };
        let refs: Vec<(&RobotMessage, bool)> = chunk.iter().map(|m| (m, false)).collect();
        store.accept_batch(&refs, at).expect("accept");
    }
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0) as f64 / 1048576.0;
    let full = size(&path);
    let t = Instant::now();
    let (mut forgotten, mut batches) = (0, 0);
    loop {
        let k = store.prune(now, 2_000).expect("prune");
        forgotten += k;
        batches += 1;
        if k < 2_000 {
            break;
        }
    }
    let took = t.elapsed();
    let pruned = size(&path);
    let compaction = store.compact_if_mostly_free(0).expect("compact");
    println!(
        "store upkeep: {n} ids in a {full:.1} MiB file; {forgotten} expired forgotten in {batches} batches of 2,000 in {:.2} s = {:.0} ids/s (the recorder waits at most one batch: ≈ {:.1} ms on average); file then {pruned:.1} MiB; {}",
        took.as_secs_f64(),
        forgotten as f64 / took.as_secs_f64(),
        took.as_secs_f64() * 1000.0 / batches as f64,
        match compaction {
            Some(c) => format!("compacted to {:.1} MiB in {} ms", c.after_bytes as f64 / 1048576.0, c.took.as_millis()),
            None => "not worth compacting (over half in use)".to_owned(),
        }
    );
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}
