//! Figures for docs/ARCHITECTURE.md's performance goals, printed, never asserted:
//!
//! 1. frames parsed and dispatched per second (envelope + robot message + answer, with the
//!    audit events written to journald's socket or a stand-in that drains it);
//! 2. the store: sealed durable writes per second (one message per commit, and 64 per commit),
//!    the same on plain redb in the same run, reads per second, open time with a store over 100 MB;
//! 3. reply latency p50/p99 through the agent and the simulator on loopback, one message at a
//!    time (durable store included);
//! 4. sustained messages per second through agent + simulator;
//! 5. with `ZHULI_BIN` set to a built `zhuli`: the idle footprint of `zhuli run` connected to
//!    the simulator, a minute after its first answer and then each minute (VmRSS, RssAnon,
//!    RssFile, threads, CPU and wake-ups of that minute; `ZHULI_IDLE_MINUTES`, 3 by default);
//! 6. the assistant's own cost per LLM turn (one tool call, two model requests), with the time
//!    waiting for the (scripted, loopback) model taken out, p50/p99; and memory per active
//!    conversation: stored history, and turns held open awaiting a confirmation;
//! 7. the cost of one monitoring sample;
//! 8. the DingTalk workspace tools: the cost of one call of each against the simulator's
//!    organisation on loopback (HTTP, JSON, the pacing limiter and the address-book cache
//!    included), and the cache's hit rate over that workload;
//! 9. the other backends: one call of the github tools against the loopback GitHub server, of
//!    the drive tools against rclone's WebDAV server, of the caldav tools against Radicale and of
//!    an MCP plugin (the reference filesystem server in its sandbox); and the plugin's start
//!    time and memory. Servers that are not installed are reported as skipped.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio_util::sync::CancellationToken;
use zhuli::{
    app::{self, AgentHandles},
    config::Config,
    dingtalk::{frame::StreamFrame, message::RobotMessage},
    store::{Acceptance, Retention, Store, WriteOp, key::StoreKey},
    tools::{Context, Tool},
};
use zhuli_sim::dingtalk::{Inject, SimConfig, Simulator};

fn parse_and_dispatch() {
    let data =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/messages/text_single.json"))
            .expect("fixture");
    let n = 200_000;
    let frames: Vec<String> = (0..n)
        .map(|i| {
            let d = data.replace("m-text", &format!("m-{i}")).replace("hello there", if i % 2 == 0 { "/ping" } else { "hello" });
            serde_json::json!({
                "specVersion": "1.0", "type": "CALLBACK",
                "headers": {"topic": "/v1.0/im/bot/messages/get", "messageId": format!("f{i}"), "contentType": "application/json", "time": "1700000000000"},
                "data": d,
            })
            .to_string()
        })
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let dir = bench_dir("dispatch");
    let (journal, which) = journal_socket(&dir);
    let journal = journal.display().to_string();
    let assistant = in_process_assistant(&rt, &dir, &format!("[audit]\njournal_socket = {journal:?}\n"));
    let start = Instant::now();
    let mut answered = 0usize;
    for f in &frames {
        let frame = StreamFrame::parse(f).expect("valid frame");
        let m = RobotMessage::parse(&frame.data).expect("valid message");
        answered += rt.block_on(assistant.answer(&m, None)).markdown.len().min(1);
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "parse+dispatch (audit events to {which}): {n} frames in {secs:.3} s = {:.0} frames/s ({answered} answered)",
        n as f64 / secs
    );
}

/// Where a benchmark's audit events go: journald's own socket when this machine has one that
/// takes datagrams from us, else a stand-in that drains them as journald would. Either way each
/// event costs what it costs on the box — a datagram written — and not the cheap failure of a
/// socket nobody listens on. The socket, and which one it is for the figure's line.
fn journal_socket(dir: &std::path::Path) -> (PathBuf, &'static str) {
    let real = std::path::Path::new(zhuli::audit::JOURNAL_SOCKET);
    let live = std::os::unix::net::UnixDatagram::unbound().and_then(|s| s.connect(real)).is_ok();
    if live {
        return (real.to_owned(), zhuli::audit::JOURNAL_SOCKET);
    }
    let path = dir.join("journal.sock");
    let sink = std::os::unix::net::UnixDatagram::bind(&path).expect("journal socket");
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        while sink.recv(&mut buf).is_ok() {}
    });
    (path, "a stand-in socket drained like journald's")
}

/// The assistant as `zhuli run` builds it, in this process, with its store under `dir` and
/// `extra` appended to a minimal configuration.
fn in_process_assistant(
    rt: &tokio::runtime::Runtime,
    dir: &std::path::Path,
    extra: &str,
) -> zhuli::assistant::Assistant {
    let config = Config::parse(
        &format!(
            "[agent]\nstate_dir = {:?}\n[store]\nkey_file = {:?}\n[dingtalk]\nclient_id = \"b\"\nclient_secret = \"b\"\nrobot_code = \"b\"\napi_base = \"http://127.0.0.1:9\"\n{extra}",
            dir.join("state").display().to_string(),
            dir.join("key").display().to_string(),
        ),
        std::path::Path::new("bench.toml"),
    )
    .expect("bench config");
    StoreKey::generate().write_new(&dir.join("key")).expect("key");
    let store = Arc::new(app::open_store(&config).expect("store"));
    let handles = AgentHandles { stream: Arc::default(), sender: Arc::default() };
    let health = zhuli::health::Health::new(config.health.clone());
    let http = zhuli::dingtalk::http::HttpClient::new(zhuli::dingtalk::http::tls_config(), Duration::from_secs(5));
    let api = Arc::new(zhuli::dingtalk::openapi::OpenApi::new(config.dingtalk.clone(), http));
    rt.block_on(app::build_assistant(&config, &handles, store, api, None, health)).expect("assistant")
}

/// A fresh scratch directory for one figure.
fn bench_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("zhuli-bench-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("bench dir");
    dir
}

fn config_toml(sim: &Simulator, state: &std::path::Path, fast: bool) -> String {
    let stream = if fast { "[dingtalk.stream]\nbackoff_initial_ms = 50\n" } else { "" };
    std::fs::create_dir_all(state).expect("state dir");
    let key = state.join("bench-store-key");
    if !key.exists() {
        StoreKey::generate().write_new(&key).expect("store key");
    }
    format!(
        "[agent]\nstate_dir = {state:?}\ninbox_capacity = 4096\nworkers = 256\n[store]\nkey_file = {key:?}\n[dingtalk]\nclient_id = {id:?}\nclient_secret = {secret:?}\nrobot_code = {id:?}\napi_base = {base:?}\n{stream}\
         [dingtalk.limits]\nchat_messages_per_minute = 1000000\nopenapi_per_second = 100000\n",
        state = state.display().to_string(),
        key = key.display().to_string(),
        id = sim.config().client_id,
        secret = sim.config().client_secret,
        base = sim.api_base(),
    )
}

fn bench_message(i: usize, text: &str) -> RobotMessage {
    let data =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/messages/text_single.json"))
            .expect("fixture");
    let mut m = RobotMessage::parse(&data).expect("fixture parses");
    // DingTalk's msgIds are random-looking; sequential ones would flatter plain redb's B-tree.
    let mut z = (i as u64).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    m.msg_id = format!("msg{:016x}", z ^ (z >> 31));
    m.content = zhuli::dingtalk::Content::Text(text.to_owned());
    m
}

/// The same bookkeeping on plain redb (dedupe lookup, processed + expiry + inbox inserts,
/// postcard values) without sealing or keyed hashes: what sealing costs, measured in the same run.
fn plain_redb(path: &std::path::Path, msgs: &[RobotMessage], per_commit: usize) -> f64 {
    use redb::ReadableTable;
    const INBOX: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("inbox");
    const PROCESSED: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("processed");
    const EXPIRY: redb::TableDefinition<(u64, &str), ()> = redb::TableDefinition::new("expiry");
    let db = redb::Database::create(path).expect("plain db");
    let start = Instant::now();
    for (c, chunk) in msgs.chunks(per_commit).enumerate() {
        let txn = db.begin_write().expect("txn");
        {
            let mut inbox = txn.open_table(INBOX).expect("table");
            let mut processed = txn.open_table(PROCESSED).expect("table");
            let mut expiry = txn.open_table(EXPIRY).expect("table");
            for (i, m) in chunk.iter().enumerate() {
                if processed.get(m.msg_id.as_str()).expect("get").is_some() {
                    continue;
                }
                processed.insert(m.msg_id.as_str(), &86_400_001u64.to_be_bytes()[..]).expect("insert");
                expiry.insert((86_400_001u64, m.msg_id.as_str()), ()).expect("insert");
                let bytes = postcard::to_allocvec(m).expect("encode");
                inbox.insert((c * per_commit + i) as u64, bytes.as_slice()).expect("insert");
            }
        }
        txn.commit().expect("commit");
    }
    msgs.len() as f64 / start.elapsed().as_secs_f64()
}

fn sealed_store(store: &Store, msgs: &[RobotMessage], per_commit: usize) -> f64 {
    let start = Instant::now();
    for chunk in msgs.chunks(per_commit) {
        let batch: Vec<(RobotMessage, bool)> = chunk.iter().map(|m| (m.clone(), true)).collect();
        let out = store.write(&[WriteOp::Accept { batch: &batch, now_ms: 1 }]).expect("write");
        assert_eq!(out.len(), 1);
    }
    msgs.len() as f64 / start.elapsed().as_secs_f64()
}

fn store_figures() {
    let dir = std::env::temp_dir().join(format!("zhuli-bench-store-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let key = StoreKey::generate();
    let text = "Please put the Q3 report from the share into the drive folder and tell me when it is there.";
    // Sealed and plain alternate, three rounds each on fresh files, medians reported: fsync
    // times drift over a run and would otherwise favour whichever went first.
    for (label, per_commit, n) in
        [("one message per commit", 1usize, 1_000usize), ("64 messages per commit", 64, 12_800)]
    {
        let msgs: Vec<RobotMessage> = (0..n).map(|i| bench_message(i, text)).collect();
        let (mut sealed, mut plain) = (Vec::new(), Vec::new());
        for round in 0..3 {
            let sealed_path = dir.join(format!("sealed-{per_commit}-{round}.redb"));
            let store = Store::open(&sealed_path, &key, Retention::default()).expect("store");
            sealed.push(sealed_store(&store, &msgs, per_commit));
            if per_commit == 64 && round == 0 {
                let start = Instant::now();
                let (inbox, _) = store.pending().expect("read");
                let secs = start.elapsed().as_secs_f64();
                println!(
                    "store reads: {} sealed inbox entries opened in {secs:.3} s = {:.0} entries/s",
                    inbox.len(),
                    inbox.len() as f64 / secs
                );
            }
            plain.push(plain_redb(&dir.join(format!("plain-{per_commit}-{round}.redb")), &msgs, per_commit));
        }
        sealed.sort_by(f64::total_cmp);
        plain.sort_by(f64::total_cmp);
        let (sealed, plain) = (sealed[1], plain[1]);
        println!(
            "store writes, durable, {label}: sealed {sealed:.0} msg/s, plain redb {plain:.0} msg/s, sealed costs {:.2}x (medians of 3)",
            plain / sealed
        );
    }

    // A store well over 100 MB: 25,000 messages of 4 KiB, 1,000 per commit.
    let big_path = dir.join("big.redb");
    {
        let store = Store::open(&big_path, &key, Retention::default()).expect("store");
        let body = "x".repeat(4096);
        for i in (0..25_000).step_by(1000) {
            let batch: Vec<(RobotMessage, bool)> = (i..i + 1000).map(|j| (bench_message(j, &body), true)).collect();
            let out = store.write(&[WriteOp::Accept { batch: &batch, now_ms: 1 }]).expect("fill");
            assert!(
                matches!(out.first(), Some(zhuli::store::WriteOutcome::Accepted(a)) if matches!(a[0], Acceptance::Queued(_)))
            );
        }
    }
    let size = std::fs::metadata(&big_path).map(|m| m.len()).unwrap_or(0);
    let mut times: Vec<Duration> = (0..5)
        .map(|_| {
            let t = Instant::now();
            let s = Store::open(&big_path, &key, Retention::default()).expect("open");
            let took = t.elapsed();
            drop(s);
            took
        })
        .collect();
    times.sort();
    println!(
        "store open with a {:.0} MB store (key check + schema + tables): median {:?}",
        size as f64 / 1e6,
        times[2]
    );
    // The same store as a crash leaves it: copied while open for writing, so it needs a repair.
    // The key is checked on a repair in memory first, then the file is repaired.
    let dirty = dir.join("dirty.redb");
    {
        let _open = Store::open(&big_path, &key, Retention::default()).expect("open");
        std::fs::copy(&big_path, &dirty).expect("copy while open");
    }
    let (mut wrong, mut right, mut repair) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..3 {
        let copy = dir.join("dirty-copy.redb");
        std::fs::copy(&dirty, &copy).expect("copy");
        let t = Instant::now();
        assert!(Store::open(&copy, &StoreKey::generate(), Retention::default()).is_err(), "a wrong key is refused");
        wrong.push(t.elapsed());
        let t = Instant::now();
        drop(Store::open(&copy, &key, Retention::default()).expect("open"));
        right.push(t.elapsed());
        // What redb's repair alone costs (all a dirty open did before the key was checked first).
        std::fs::copy(&dirty, &copy).expect("copy");
        let t = Instant::now();
        let mut b = redb::Database::builder();
        b.set_concurrency_mode(redb::ConcurrencyMode::SingleWriter).set_cache_size(16 * 1024 * 1024);
        drop(b.create(&copy).expect("repair"));
        repair.push(t.elapsed());
    }
    wrong.sort();
    right.sort();
    repair.sort();
    println!(
        "store open after a crash, {:.0} MB: wrong key refused in {:?}, right key (check + repair) {:?}; redb's repair alone {:?} (medians of 3)",
        size as f64 / 1e6,
        wrong[1],
        right[1],
        repair[1]
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn through_the_agent() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async {
        let sim = Simulator::start(SimConfig::default()).await.expect("sim");
        let state = std::env::temp_dir().join(format!("zhuli-bench-{}", std::process::id()));
        let config = Config::parse(&config_toml(&sim, &state, true), std::path::Path::new("(bench)")).expect("config");
        let cancel = CancellationToken::new();
        let handles = AgentHandles { stream: Arc::default(), sender: Arc::default() };
        let agent = tokio::spawn(app::run_with(config, cancel.clone(), handles));
        assert!(
            sim.wait_until(Duration::from_secs(10), |s| !s.connections().is_empty()).await,
            "agent did not connect"
        );

        // Latency, one message at a time.
        let n = 2_000;
        let mut lat = Vec::with_capacity(n);
        for i in 0..n {
            let before = sim.replies().len();
            let t = Instant::now();
            sim.inject(Inject::text("/ping").from(format!("u{}", i % 50)));
            sim.wait_until(Duration::from_secs(5), |s| s.replies().len() > before).await;
            lat.push(t.elapsed());
        }
        lat.sort();
        println!(
            "reply latency (inject → reply recorded, agent + simulator, loopback): n={n} p50={:?} p99={:?} max={:?}",
            percentile(&lat, 0.50),
            percentile(&lat, 0.99),
            lat[lat.len() - 1]
        );

        // Sustained throughput.
        let n = 5_000;
        let before = sim.replies().len();
        let t = Instant::now();
        for i in 0..n {
            sim.inject(Inject::text("/ping").from(format!("u{}", i % 500)));
        }
        let done = sim.wait_until(Duration::from_secs(120), |s| s.replies().len() >= before + n).await;
        let secs = t.elapsed().as_secs_f64();
        println!(
            "throughput (agent + simulator share 2 cores): {n} messages answered in {secs:.2} s = {:.0} msg/s{}",
            n as f64 / secs,
            if done { "" } else { " (INCOMPLETE)" }
        );
        cancel.cancel();
        let _ = agent.await;
        sim.shutdown().await;
        let _ = std::fs::remove_dir_all(&state);
    });
}

fn proc_field(pid: u32, key: &str) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find(|l| l.starts_with(key)).map(|l| l[key.len()..].trim().to_owned())
}

fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// Context switches of every thread of `pid` (each is a wake-up of a sleeping thread, or a
/// preemption).
fn context_switches(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0 };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .map(|s| {
            s.lines()
                .filter(|l| l.starts_with("voluntary_ctxt_switches") || l.starts_with("nonvoluntary_ctxt_switches"))
                .filter_map(|l| l.split_whitespace().nth(1).and_then(|n| n.parse::<u64>().ok()))
                .sum::<u64>()
        })
        .sum()
}

fn monitoring_sample() {
    let mut m = zhuli::health::monitor::Monitor::new(std::env::temp_dir());
    let _ = m.sample();
    let mut times: Vec<Duration> = (0..200).map(|_| zhuli::health::monitor::time_one_sample(&mut m)).collect();
    times.sort();
    println!(
        "one monitoring sample (CPU, memory, disk, load, temperature): median {:?}, p99 {:?}",
        percentile(&times, 0.5),
        percentile(&times, 0.99)
    );
}

fn idle_process(bin: PathBuf) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
    rt.block_on(async {
        let sim = Simulator::start(SimConfig::default()).await.expect("sim");
        let dir = std::env::temp_dir().join(format!("zhuli-bench-idle-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("zhuli.toml");
        std::fs::write(&path, config_toml(&sim, &dir.join("state"), false)).expect("config");
        let mut child = std::process::Command::new(&bin)
            .args(["run", "--config"])
            .arg(&path)
            .env("ZHULI_LOG", "warn")
            .spawn()
            .expect("spawn zhuli");
        assert!(sim.wait_until(Duration::from_secs(10), |s| !s.connections().is_empty()).await);
        sim.inject(Inject::text("/ping"));
        sim.wait_until(Duration::from_secs(5), |s| !s.replies().is_empty()).await;
        // Settled first: a minute after the first answer, then one line per minute (three by
        // default; `ZHULI_IDLE_MINUTES` for more), each with that minute's CPU and wake-ups.
        tokio::time::sleep(Duration::from_secs(60)).await;
        let minutes: u32 = std::env::var("ZHULI_IDLE_MINUTES").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
        let window = Duration::from_secs(60);
        println!("idle `zhuli run` connected to the simulator, a minute after its first answer, then each minute:");
        for minute in 1..=minutes {
            let t0 = cpu_ticks(child.id()).unwrap_or(0);
            let w0 = context_switches(child.id());
            tokio::time::sleep(window).await;
            let t1 = cpu_ticks(child.id()).unwrap_or(0);
            let wakeups = (context_switches(child.id()) - w0) as f64 / window.as_secs_f64();
            let hz = 100.0; // USER_HZ on Linux
            let cpu = (t1 - t0) as f64 / hz / window.as_secs_f64() * 100.0;
            println!(
                "  minute {minute}: VmRSS {} (RssAnon {}, RssFile {}; VmHWM {}), {} threads, CPU {cpu:.3}% of one core, {wakeups:.1} wake-ups/s",
                proc_field(child.id(), "VmRSS:").unwrap_or_default(),
                proc_field(child.id(), "RssAnon:").unwrap_or_default(),
                proc_field(child.id(), "RssFile:").unwrap_or_default(),
                proc_field(child.id(), "VmHWM:").unwrap_or_default(),
                proc_field(child.id(), "Threads:").unwrap_or_default(),
            );
        }
        let _ = child.kill();
        let _ = child.wait();
        sim.shutdown().await;
        let _ = std::fs::remove_dir_all(&dir);
    });
}

/// Counts the bytes this process holds on the heap, for memory figures that RSS cannot give
/// (freed pages are reused, so RSS deltas hide what a phase keeps).
struct CountingAlloc;

static LIVE_BYTES: std::sync::atomic::AtomicIsize = std::sync::atomic::AtomicIsize::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; only a counter is added.
#[allow(unsafe_code)]
unsafe impl std::alloc::GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as isize, std::sync::atomic::Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { std::alloc::System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as isize, std::sync::atomic::Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        LIVE_BYTES.fetch_add(new_size as isize - layout.size() as isize, std::sync::atomic::Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { std::alloc::System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

fn live_kib() -> f64 {
    LIVE_BYTES.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1024.0
}

/// Resident memory of this process, in KiB.
fn own_rss_kib() -> u64 {
    proc_field(std::process::id(), "VmRSS:")
        .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
        .unwrap_or(0)
}

fn assistant_turns() {
    use zhuli_sim::llm::{LlmSim, Scripted};
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let dir = bench_dir("turns");
    std::fs::create_dir_all(dir.join("share")).expect("share");
    std::fs::write(dir.join("share/q3.txt"), "Q3 revenue up 12%, costs flat.").expect("file");
    let (journal, which) = journal_socket(&dir);
    let llm = rt.block_on(LlmSim::start()).expect("llm sim");
    llm.stop_recording();
    let assistant = in_process_assistant(
        &rt,
        &dir,
        &format!(
            "[llm]\nbase_url = {base:?}\nwhere = \"local\"\nmodel = \"bench\"\nrequests_per_minute = 10000000\n\
             [access]\ndefault_roles = [\"all\"]\n[access.roles.all]\ntools = [\"*\"]\n\
             [tools.files.roots]\nshare = {share:?}\n[audit]\njournal_socket = {journal:?}\n",
            base = llm.base_url(),
            share = dir.join("share").display().to_string(),
            journal = journal.display().to_string(),
        ),
    );
    let turn = |i: usize, user: &str| {
        llm.push(Scripted::ToolCalls(vec![("files_read".into(), r#"{"path":"share/q3.txt"}"#.into())]));
        llm.push(Scripted::Text("Revenue is up 12% and costs are flat.".into()));
        let mut m = bench_message(i, "What does the Q3 report say?");
        m.sender_staff_id = Some(user.to_owned());
        let waited = assistant.llm_wait();
        let start = Instant::now();
        let a = rt.block_on(assistant.answer(&m, None));
        let total = start.elapsed();
        assert!(a.markdown.starts_with("Revenue"), "{}", a.markdown);
        total.saturating_sub(assistant.llm_wait() - waited)
    };
    for i in 0..100 {
        turn(i, "warm-up");
    }
    let n = 2_000;
    let rss0 = own_rss_kib();
    let live0 = live_kib();
    let mut overhead: Vec<Duration> = (0..n).map(|i| turn(1_000 + i, &format!("user-{i}"))).collect();
    let rss1 = own_rss_kib();
    let live1 = live_kib();
    overhead.sort();
    println!(
        "assistant overhead per LLM turn (1 tool call, 2 model requests; model wait excluded; store, audit to {which}, tool included): n={n} p50={:?} p99={:?} max={:?}",
        percentile(&overhead, 0.50),
        percentile(&overhead, 0.99),
        overhead.last().copied().unwrap_or_default(),
    );
    println!(
        "memory per conversation with stored history ({n} conversations, each one turn): heap {:.2} KiB, RSS {:.2} KiB each (history lives in the store; the store's cache is bounded)",
        (live1 - live0) / n as f64,
        rss1.saturating_sub(rss0) as f64 / n as f64
    );
    // Turns held open, waiting for a confirmation: these keep their whole message list in memory.
    let held = 1_000;
    let live2 = live_kib();
    for i in 0..held {
        llm.push(Scripted::ToolCalls(vec![(
            "files_write".into(),
            format!(r#"{{"path":"share/out-{i}.txt","content":"draft {i}"}}"#),
        )]));
        let mut m = bench_message(10_000 + i, "Write a draft for me, please.");
        m.sender_staff_id = Some(format!("writer-{i}"));
        let a = rt.block_on(assistant.answer(&m, None));
        // A confirmation question, in the box's language (zh-CN unless set otherwise).
        assert!(a.markdown.contains("/确认") || a.markdown.contains("/confirm"), "{}", a.markdown);
    }
    println!(
        "memory per turn awaiting confirmation ({} held, each with its message list): heap {:.2} KiB each",
        assistant.pending_confirmations(),
        (live_kib() - live2) / held as f64
    );
    drop(assistant);
    drop(rt);
    let _ = std::fs::remove_dir_all(&dir);
}

/// One call of each workspace tool against the simulator, many times: p50/p99 per tool.
fn workspace_calls() {
    use zhuli::tools::workspace;
    use zhuli_sim::dingtalk::org::{Org, OrgEvent};
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let dir = bench_dir("workspace");
    let sim = rt.block_on(Simulator::start(SimConfig::default())).expect("simulator");
    let mut org = Org::default().dept(2, "Team", 1);
    for i in 0..200 {
        org = org.person(&format!("p{i}"), &format!("Person {i}"), "Staff", &[2]);
    }
    let now = zhuli::clock::now_ms();
    for i in 0..40 {
        let start = now + 86_400_000 + i * 3_600_000;
        org.events.push(OrgEvent {
            id: format!("e{i}"),
            owner: "union-p0".into(),
            summary: format!("Meeting {i}"),
            description: String::new(),
            location: String::new(),
            start_ms: start,
            end_ms: start + 1_800_000,
            attendees: vec!["union-p1".into()],
        });
    }
    sim.seed_org(org);
    let cfg = SimConfig::default();
    let config = Config::parse(
        &format!(
            "[agent]\nstate_dir = {:?}\n[store]\nkey_file = {:?}\n[dingtalk]\nclient_id = {:?}\nclient_secret = {:?}\nrobot_code = {:?}\napi_base = {:?}\n[dingtalk.limits]\nopenapi_per_second = 100000\n",
            dir.join("state").display().to_string(),
            dir.join("key").display().to_string(),
            cfg.client_id,
            cfg.client_secret,
            cfg.robot_code,
            sim.api_base(),
        ),
        std::path::Path::new("bench.toml"),
    )
    .expect("bench config");
    StoreKey::generate().write_new(&dir.join("key")).expect("key");
    let store = Arc::new(app::open_store(&config).expect("store"));
    let http = zhuli::dingtalk::http::HttpClient::new(zhuli::dingtalk::http::tls_config(), Duration::from_secs(5));
    let api = Arc::new(zhuli::dingtalk::openapi::OpenApi::new(config.dingtalk.clone(), http));
    let roots = zhuli::tools::files::Roots::open(&config.tools.files, &dir.join("state"), None, store.file_sealer())
        .expect("roots");
    let ws = workspace::Workspace::new(api, store, config.tools.dingtalk.clone(), 480, None, roots).expect("workspace");
    let tools = workspace::tools(&ws);
    let tool = |name: &str| tools.iter().find(|t| t.name() == name).expect("tool").clone();
    let ctx = bench_context();
    let day = |d: i64| zhuli::tools::when::rfc3339(now + d * 86_400_000, 480);
    let workload: Vec<(&str, serde_json::Value)> = vec![
        ("people_search", serde_json::json!({"query": "Person 17"})),
        ("people_members", serde_json::json!({"department": "Team"})),
        ("calendar_list", serde_json::json!({"from": day(0), "to": day(3)})),
        ("calendar_free", serde_json::json!({"people": ["p1", "p2"], "from": day(1), "to": day(4), "minutes": 30})),
        ("todo_list", serde_json::json!({})),
        ("approvals_pending", serde_json::json!({})),
    ];
    const N: usize = 200;
    for (name, args) in &workload {
        let t = tool(name);
        let mut times = Vec::with_capacity(N);
        for _ in 0..N {
            let started = Instant::now();
            let out = rt.block_on(t.execute(&ctx, args.clone()));
            times.push(started.elapsed());
            assert!(out.is_ok(), "{name}: {out:?}");
        }
        times.sort();
        println!(
            "workspace {name}: p50 {:.0} µs, p99 {:.0} µs per call (loopback simulator, {N} calls)",
            percentile(&times, 0.50).as_secs_f64() * 1e6,
            percentile(&times, 0.99).as_secs_f64() * 1e6
        );
    }
    let (hits, misses) = (
        ws.people.hits.load(std::sync::atomic::Ordering::Relaxed),
        ws.people.misses.load(std::sync::atomic::Ordering::Relaxed),
    );
    println!(
        "workspace address-book cache: {hits} hits, {misses} misses = {:.1} % hit rate over the workload above",
        100.0 * hits as f64 / (hits + misses).max(1) as f64
    );
    // Without the cache every call resolves the asker again: the cost of one user/get.
    let mut times = Vec::with_capacity(N);
    for _ in 0..N {
        rt.block_on(ws.people.clear());
        let started = Instant::now();
        rt.block_on(ws.people.person("p5")).expect("person");
        times.push(started.elapsed());
    }
    times.sort();
    println!(
        "workspace person look-up, cache emptied each time (user/get + department walk): p50 {:.0} µs, p99 {:.0} µs",
        percentile(&times, 0.50).as_secs_f64() * 1e6,
        percentile(&times, 0.99).as_secs_f64() * 1e6
    );
    drop(sim);
    let _ = std::fs::remove_dir_all(&dir);
}

fn time_calls(rt: &tokio::runtime::Runtime, label: &str, tool: &Arc<dyn Tool>, args: serde_json::Value, n: usize) {
    let ctx = bench_context();
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        let out = rt.block_on(tool.execute(&ctx, args.clone()));
        times.push(started.elapsed());
        if let Err(e) = out {
            println!("{label} {}: failed ({e}); figures skipped", tool.name());
            return;
        }
    }
    times.sort();
    println!(
        "{label} {}: p50 {:.0} µs, p99 {:.0} µs per call ({n} calls)",
        tool.name(),
        percentile(&times, 0.50).as_secs_f64() * 1e6,
        percentile(&times, 0.99).as_secs_f64() * 1e6
    );
}

fn find<'a>(tools: &'a [Arc<dyn Tool>], name: &str) -> &'a Arc<dyn Tool> {
    tools.iter().find(|t| t.name() == name).expect("tool")
}

fn backend_calls() {
    use zhuli::tools::{caldav, drive, github, mcp};
    use zhuli_sim::{github::GithubSim, local_server::LocalServer};
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let dir = bench_dir("backends");
    const N: usize = 200;

    // GitHub: the loopback server with GitHub's shapes and headers.
    let gh = rt.block_on(GithubSim::start("bench-token")).expect("github sim");
    gh.seed_repo("acme/site", 60, 5);
    gh.state().limit = 1_000_000;
    gh.state().remaining = 1_000_000;
    let settings: github::GithubSettings =
        toml::from_str(&format!("api_base = {:?}\ntoken = \"bench-token\"\nrepos = [\"acme/site\"]\n", gh.base_url()))
            .expect("github settings");
    let tools = github::tools(&github::GithubTools::new(&settings, 480).expect("github").expect("configured"));
    time_calls(
        &rt,
        "github (loopback server)",
        find(&tools, "github_list"),
        serde_json::json!({"repo": "acme/site"}),
        N,
    );
    time_calls(
        &rt,
        "github (loopback server)",
        find(&tools, "github_show"),
        serde_json::json!({"repo": "acme/site", "number": 62}),
        N,
    );

    // WebDAV: rclone serving a folder of 200 files in 20 folders.
    let share = dir.join("drive");
    for f in 0..20 {
        std::fs::create_dir_all(share.join(format!("folder{f}"))).expect("folder");
        for i in 0..10 {
            std::fs::write(share.join(format!("folder{f}/report-{i}.txt")), "x".repeat(1000)).expect("file");
        }
    }
    let share_s = share.display().to_string();
    match LocalServer::rclone_webdav(&share, "/", None) {
        Ok(dav) => {
            let settings: drive::DriveSettings =
                toml::from_str(&format!("url = \"http://{}/\"\n", dav.addr)).expect("drive settings");
            let sealer = Arc::new(zhuli::store::seal::FileSealer::new(&StoreKey::generate()));
            let roots =
                zhuli::tools::files::Roots::open(&Default::default(), &dir.join("state"), None, sealer).expect("roots");
            let tools = drive::tools(&drive::Drive::new(&settings, roots).expect("drive").expect("configured"));
            time_calls(
                &rt,
                "drive (rclone WebDAV)",
                find(&tools, "drive_list"),
                serde_json::json!({"path": "folder3"}),
                N,
            );
            time_calls(
                &rt,
                "drive (rclone WebDAV, 21 folders)",
                find(&tools, "drive_search"),
                serde_json::json!({"query": "report-7"}),
                20,
            );
        }
        Err(e) => println!("drive: skipped ({e})"),
    }

    // CalDAV: Radicale with a calendar of 40 events, one repeating.
    let store = dir.join("radicale");
    let cal = store.join("collection-root/bench/team");
    std::fs::create_dir_all(&cal).expect("calendar");
    std::fs::write(cal.join(".Radicale.props"), r#"{"tag": "VCALENDAR"}"#).expect("props");
    let now = zhuli::clock::now_ms();
    for i in 0..40i64 {
        let start = zhuli::tools::caldav::ical::utc_value(now + i * 7_200_000);
        let rule = if i == 0 { "RRULE:FREQ=DAILY\r\n" } else { "" };
        std::fs::write(
            cal.join(format!("e{i}.ics")),
            format!("BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//bench//EN\r\nBEGIN:VEVENT\r\nUID:e{i}\r\nDTSTAMP:20261101T000000Z\r\nDTSTART:{start}\r\nDURATION:PT1H\r\nSUMMARY:Event {i}\r\n{rule}END:VEVENT\r\nEND:VCALENDAR\r\n"),
        )
        .expect("event");
    }
    match LocalServer::radicale(&store, None) {
        Ok(rad) => {
            let settings: caldav::CaldavSettings = toml::from_str(&format!(
                "username = \"bench\"\n[calendars]\nteam = \"http://{}/bench/team/\"\n",
                rad.addr
            ))
            .expect("caldav settings");
            let tools = caldav::tools(&caldav::Caldav::new(&settings, 480, None).expect("caldav").expect("configured"));
            let day = |d: i64| zhuli::tools::when::rfc3339(now + d * 86_400_000, 480);
            time_calls(
                &rt,
                "caldav (Radicale, 40 events)",
                find(&tools, "caldav_list"),
                serde_json::json!({"from": day(0), "to": day(4)}),
                N,
            );
            time_calls(
                &rt,
                "caldav (Radicale, 40 events)",
                find(&tools, "caldav_free"),
                serde_json::json!({"calendars": ["team"], "from": day(0), "to": day(4), "minutes": 30}),
                N,
            );
        }
        Err(e) => println!("caldav: skipped ({e})"),
    }

    // An MCP plugin: the reference filesystem server (node, --jitless) in the sandbox.
    let plugins = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/mcp");
    let server = plugins.join("node_modules/@modelcontextprotocol/server-filesystem/dist/index.js");
    if !server.exists() || !std::path::Path::new("/usr/bin/node").exists() {
        println!("mcp plugin: skipped (needs /usr/bin/node and `npm ci` in tests/mcp)");
    } else {
        let plugins_s = plugins.canonicalize().expect("tests/mcp").display().to_string();
        let settings: mcp::PluginSettings = toml::from_str(&format!(
            "command = \"/usr/bin/node\"\nargs = [\"--jitless\", {:?}, {share_s:?}]\nread = [{plugins_s:?}, {share_s:?}]\nread_only_tools = [\"list_directory\", \"read_text_file\"]\n",
            server.display().to_string()
        ))
        .expect("plugin settings");
        let plugin = mcp::Plugin::new("fs", &settings, &dir.join("state"), None).expect("plugin");
        let mut starts = Vec::new();
        let mut tools = Vec::new();
        for _ in 0..5 {
            rt.block_on(plugin.stop());
            let list = rt.block_on(plugin.list_tools()).expect("tools/list");
            starts.push(plugin.stats().start_ms.unwrap_or(0));
            tools = list
                .iter()
                .filter_map(|e| mcp::McpTool::new(&plugin, e))
                .map(|t| Arc::new(t) as Arc<dyn Tool>)
                .collect();
        }
        starts.sort();
        let (rss, _) = plugin.memory_kb().unwrap_or((0, 0));
        println!(
            "mcp plugin start (spawn, sandbox, initialize): median {} ms, max {} ms over 5 starts; {} tools; RSS after start {} KiB",
            starts[2],
            starts[4],
            tools.len(),
            rss
        );
        time_calls(
            &rt,
            "mcp plugin (filesystem server)",
            find(&tools, "fs_list_directory"),
            serde_json::json!({"path": format!("{share_s}/folder3")}),
            N,
        );
        time_calls(
            &rt,
            "mcp plugin (filesystem server)",
            find(&tools, "fs_read_text_file"),
            serde_json::json!({"path": format!("{share_s}/folder3/report-1.txt")}),
            N,
        );
        let (rss, peak) = plugin.memory_kb().unwrap_or((0, 0));
        println!(
            "mcp plugin memory after {} calls: RSS {rss} KiB, peak {peak} KiB (limit: data segment 256 MiB)",
            2 * N
        );
        rt.block_on(plugin.stop());
    }
    drop(gh);
    let _ = std::fs::remove_dir_all(&dir);
}

/// What classing a turn costs: the personal-data detectors and the patterns over the largest
/// tool result the model is shown (16 KiB, `max_tool_output_bytes`) and over a typical message.
fn privacy_checks() {
    let settings: zhuli::privacy::Settings = toml::from_str(
        &std::env::var("ZHULI_BENCH_PRIVACY").unwrap_or("patterns = ['合同编号\\s*\\d+', \"项目代号\"]".into()),
    )
    .expect("settings");
    let policy = zhuli::privacy::Policy::new(&settings).expect("policy");
    let line = "会议纪要：订单 2024120300001 已发货，302 会议室周五 14:00 见，预算 12,345.67 元。 version 1.2.3 ";
    let mut big = String::new();
    while big.len() < 16 * 1024 {
        big.push_str(line);
    }
    let message = "帮我看看下周三下午三点到五点的会议室安排，顺便提醒一下张三准备季度报告";
    for (label, text, n) in [("16 KiB tool result", big.as_str(), 2_000), ("one message", message, 200_000)] {
        let start = Instant::now();
        let mut hits = 0usize;
        for _ in 0..n {
            hits += usize::from(policy.tool_result("github_show", &serde_json::Value::Null, text).is_some());
        }
        let per = start.elapsed() / n;
        println!(
            "privacy check, {label} ({} bytes, nothing found: {}): {per:?} each, {:.0} MB/s",
            text.len(),
            hits == 0,
            text.len() as f64 / per.as_secs_f64() / 1e6
        );
    }
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is accepted. `ZHULI_BENCH_ONLY=through` (a
    // section's name) runs one section, for before-and-after figures of one change.
    let only = std::env::var("ZHULI_BENCH_ONLY").ok();
    let run = |name: &str| only.as_deref().is_none_or(|o| o == name);
    if run("parse") {
        parse_and_dispatch();
    }
    if run("store") {
        store_figures();
    }
    if run("through") {
        through_the_agent();
    }
    if run("turns") {
        assistant_turns();
    }
    if run("monitor") {
        monitoring_sample();
    }
    if run("privacy") {
        privacy_checks();
    }
    if run("workspace") {
        workspace_calls();
    }
    if run("backends") {
        backend_calls();
    }
    if run("idle") {
        match std::env::var_os("ZHULI_BIN") {
            Some(bin) => idle_process(PathBuf::from(bin)),
            None => println!("idle RSS: skipped (set ZHULI_BIN to a built zhuli binary)"),
        }
    }
}

/// The asker the tools' figures are taken for.
fn bench_context() -> Context {
    Context {
        actor: "p0".into(),
        chat: "cid-bench".into(),
        group: false,
        offset_minutes: 480,
        nick: String::new(),
        message: String::new(),
        protected: false,
    }
}
