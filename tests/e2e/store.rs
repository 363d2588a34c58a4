//! The encrypted store as the running agent uses it: kill -9 at random points while messages
//! pour in, and no message is lost, none is answered twice because of a redelivery, and a reply
//! is repeated only if it was in flight at the instant of the kill; a wrong or missing key stops
//! the agent at start with a clear message and leaves the store as it was.
//!
//! Why "in flight": DingTalk's send APIs take no idempotency key, so a reply that reached DingTalk
//! in the last moment before a crash, before its durable "delivered" mark, cannot be told apart
//! from one that did not, and is sent again. The group-commit writer keeps that moment to about
//! one commit.

/// A repeated reply must have been first delivered at most this long before a kill (debug build,
/// two busy cores; the release figure is in the benchmark).
const IN_FLIGHT_MS: i64 = 300;

use std::time::Duration;

use rand::{Rng, SeedableRng, rngs::StdRng};
use zhuli_sim::dingtalk::{Inject, Simulator};

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_points_loses_nothing_and_repeats_only_replies_in_flight() {
    let mut cfg = sim_config();
    // The gateway pushes an unACKed frame again after this long (DingTalk: about a minute).
    cfg.redeliver_after = Duration::from_secs(2);
    let sim = Simulator::start(cfg).await.expect("sim");
    let mut agent = spawn_agent("kill9", &config_for(&sim, SECRET, ""));
    assert!(sim.wait_until(Duration::from_secs(15), |s| !s.connections().is_empty()).await, "{}", agent.log());

    let total = 1_000usize;
    let seed = rand::random::<u64>();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut ids = Vec::with_capacity(total);
    let mut kills = 0;
    let mut kill_times: Vec<u64> = Vec::new();
    let mut next_kill = rng.random_range(5..120);
    for i in 0..total {
        ids.push(sim.inject(Inject::text(format!("/ping {i}")).from(format!("staff-k{i}"))));
        if i == next_kill {
            agent.kill9();
            kill_times.push(sim.elapsed_ms());
            agent.restart();
            kills += 1;
            next_kill = i + rng.random_range(100..250);
        }
        if i % 10 == 0 {
            tokio::time::sleep(Duration::from_millis(rng.random_range(1..15))).await;
        }
    }
    let answered =
        |s: &Simulator, id: &String| s.replies().iter().filter(|r| r.in_reply_to.as_ref() == Some(id)).count();
    let all = sim.wait_until(Duration::from_secs(90), |s| ids.iter().all(|id| answered(s, id) >= 1)).await;
    let missing = ids.iter().filter(|id| answered(&sim, id) == 0).count();
    assert!(all, "seed {seed}: {missing} of {total} messages unanswered after {kills} kills\n{:?}", sim.counters());
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Every copy but the last must have been followed by a kill within IN_FLIGHT_MS. (A request
    // the agent sent just before dying can be recorded by the simulator just after: the kill
    // time is taken once the process is gone, and a few milliseconds after it still count.)
    let replies = sim.replies();
    let mut repeated = 0;
    let mut gaps = Vec::new();
    for id in &ids {
        let times: Vec<u64> = replies.iter().filter(|r| r.in_reply_to.as_ref() == Some(id)).map(|r| r.at_ms).collect();
        for t in &times[..times.len().saturating_sub(1)] {
            repeated += 1;
            let gap = kill_times.iter().map(|k| *k as i64 - *t as i64).filter(|g| *g >= -50).min().unwrap_or(i64::MIN);
            assert!(
                (-50..=IN_FLIGHT_MS).contains(&gap),
                "seed {seed}: {id} was answered again though its reply at {t} ms was not in flight at a kill {kill_times:?}"
            );
            gaps.push(gap);
        }
    }
    gaps.sort_unstable();
    eprintln!(
        "seed {seed}: {kills} kills, {total} messages, none lost, {repeated} replies repeated; ms from copy to kill: median {:?} max {:?}",
        gaps.get(gaps.len() / 2),
        gaps.last()
    );
    assert!(kills >= 4, "the test killed the agent {kills} times");
    assert!(agent.log().contains("resuming") || agent.log().contains("duplicate"), "restarts picked up work");
    assert_no_secret(&agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_or_missing_key_stops_the_agent_at_start_and_touches_nothing() {
    let sim = Simulator::start(sim_config()).await.expect("sim");
    let mut agent = spawn_agent("wrongkey", &config_for(&sim, SECRET, ""));
    assert!(sim.wait_until(Duration::from_secs(15), |s| !s.connections().is_empty()).await, "{}", agent.log());
    let id = sim.inject(Inject::text("/ping"));
    assert_each_answered_once(&sim, &agent, std::slice::from_ref(&id), Duration::from_secs(10)).await;
    agent.kill9();
    let store_file = agent.dir.join("state/zhuli.redb");
    let key_file = agent.dir.join("store-key");
    let good_key = std::fs::read(&key_file).expect("key");

    // Another key in the key file.
    std::fs::remove_file(&key_file).expect("remove key");
    zhuli::store::key::StoreKey::generate().write_new(&key_file).expect("new key");
    let opens = sim.counters().opens;
    agent.restart();
    assert_ne!(agent.wait_exit(Duration::from_secs(10)), Some(0), "{}", agent.log());
    assert!(agent.log().contains("does not open") && agent.log().contains("nothing was changed"), "{}", agent.log());
    assert_eq!(sim.counters().opens, opens, "no connection is opened with a store that cannot be read");
    assert!(store_file.exists());

    // No key at all.
    std::fs::remove_file(&key_file).expect("remove key");
    agent.restart();
    assert_ne!(agent.wait_exit(Duration::from_secs(10)), Some(0));
    assert!(agent.log().contains("cannot read the store key"), "{}", agent.log());

    // The right key again: everything the store knew is still there.
    std::fs::write(&key_file, good_key).expect("restore key");
    agent.restart();
    assert!(sim.wait_until(Duration::from_secs(15), |s| s.connections().len() == 1).await, "{}", agent.log());
    sim.inject(Inject::text("/ping").with_msg_id(id.clone()));
    let fresh = sim.inject(Inject::text("/help"));
    assert_each_answered_once(&sim, &agent, &[id, fresh], Duration::from_secs(10)).await;
    assert_eq!(sim.counters().opens, opens + 1);
}

/// The bytes of `path`, hashed.
fn sha256_of(path: &std::path::Path) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, &std::fs::read(path).expect("read")).as_ref().to_vec()
}

/// Whether redb finds `path` in need of repair (left open for writing by a process that died).
fn is_dirty(path: &std::path::Path) -> bool {
    let mut b = redb::Database::builder();
    b.set_concurrency_mode(redb::ConcurrencyMode::SingleWriter);
    matches!(b.open_read_only(path), Err(redb::DatabaseError::RepairAborted))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_key_on_a_store_left_dirty_by_kill_9_changes_no_byte() {
    let (sim, mut agent) = rig("dirtykey").await;
    let id = sim.inject(Inject::text("/ping"));
    assert_each_answered_once(&sim, &agent, std::slice::from_ref(&id), Duration::from_secs(10)).await;
    // The agent holds the store open for writing; SIGKILL leaves it needing a repair.
    agent.kill9();
    let store_file = agent.dir.join("state/zhuli.redb");
    assert!(is_dirty(&store_file), "the killed agent left the store in need of repair");
    let before = sha256_of(&store_file);

    let wrong = zhuli::store::key::StoreKey::generate();
    let e = zhuli::store::Store::open(&store_file, &wrong, Default::default()).err().expect("a wrong key is refused");
    let text = e.to_string();
    assert!(text.contains("does not open") && text.contains("zhuli.redb"), "{text}");
    assert_eq!(sha256_of(&store_file), before, "a wrong key changed the dirty store");
    assert!(is_dirty(&store_file), "still exactly as the crash left it");

    let right = zhuli::store::key::StoreKey::read(&agent.dir.join("store-key")).expect("key");
    let store = zhuli::store::Store::open(&store_file, &right, Default::default()).expect("the right key opens it");
    let again = zhuli::dingtalk::message::RobotMessage {
        msg_id: id,
        conversation_id: "c".into(),
        conversation_kind: zhuli::dingtalk::message::ConversationKind::Single,
        conversation_title: None,
        sender_id: "u".into(),
        sender_staff_id: None,
        sender_nick: "n".into(),
        is_admin: false,
        mentions_robot: true,
        robot_code: None,
        created_at_ms: None,
        session_webhook: None,
        content: zhuli::dingtalk::message::Content::Text("/ping".into()),
    };
    assert_eq!(
        store.accept_batch(&[(&again, true)], 1).expect("accept"),
        vec![zhuli::store::Acceptance::Duplicate],
        "the message processed before the kill is still remembered"
    );
    drop(store);
    assert!(!is_dirty(&store_file), "opened with the right key, the store was repaired");
}

/// A small tmpfs for the state directory, unmounted on drop.
struct SmallDisk {
    dir: std::path::PathBuf,
}

impl SmallDisk {
    fn mount(dir: &std::path::Path, size: &str) -> SmallDisk {
        std::fs::create_dir_all(dir).expect("mount point");
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs"])
            .arg(dir)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "this test mounts a small tmpfs as the state directory and needs root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        SmallDisk { dir: dir.to_owned() }
    }

    fn remount(&self, opts: &str) {
        let ok = std::process::Command::new("mount").args(["-o", &format!("remount,{opts}")]).arg(&self.dir).status();
        assert!(ok.is_ok_and(|s| s.success()), "remount {opts}");
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_and_read_only_state_lose_nothing() {
    let mut cfg = sim_config();
    cfg.redeliver_after = Duration::from_secs(1);
    let sim = Simulator::start(cfg).await.expect("sim");
    let mut agent = spawn_agent("diskfull", &config_for(&sim, SECRET, ""));
    agent.kill9();
    let state = agent.dir.join("state");
    let disk = SmallDisk::mount(&state, "4m");
    agent.restart();
    assert!(sim.wait_until(Duration::from_secs(15), |s| !s.connections().is_empty()).await, "{}", agent.log());
    let before = burst(&sim, 5, "ok");
    assert_each_answered_once(&sim, &agent, &before, Duration::from_secs(10)).await;

    // Fill the disk to the last byte.
    let filler = state.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).expect("filler");
        let chunk = vec![0u8; 64 * 1024];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
    }
    let during: Vec<String> =
        (0..20).map(|i| sim.inject(Inject::text(format!("/ping full {i}")).from(format!("staff-full-{i}")))).collect();
    assert!(
        sim.wait_until(Duration::from_secs(10), |_| agent.log().contains("free space")).await,
        "a full disk is reported: {}",
        agent.log()
    );
    assert!(agent.is_running(), "a full disk does not stop the agent");
    std::fs::remove_file(&filler).expect("free the disk");
    assert_each_answered_once(&sim, &agent, &during, Duration::from_secs(20)).await;

    // A read-only state directory: the agent refuses to start, saying why, and loses nothing.
    agent.kill9();
    disk.remount("ro");
    agent.restart();
    assert_ne!(agent.wait_exit(Duration::from_secs(10)), Some(0), "{}", agent.log());
    assert!(agent.log().contains("Read-only file system"), "{}", agent.log());
    disk.remount("rw");
    agent.restart();
    assert!(sim.wait_until(Duration::from_secs(15), |s| s.connections().len() == 1).await, "{}", agent.log());
    let after = burst(&sim, 3, "rw");
    assert_each_answered_once(&sim, &agent, &after, Duration::from_secs(10)).await;
    assert!(!agent.log().contains("panicked"));
    agent.kill9();
    drop(disk);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rekey_by_the_binary_keeps_dedupe_across_the_new_key_and_index_secret() {
    let (sim, mut agent) = rig("rekey").await;
    let id = sim.inject(Inject::text("/ping"));
    assert_each_answered_once(&sim, &agent, std::slice::from_ref(&id), Duration::from_secs(10)).await;
    agent.kill9();
    let zhuli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_zhuli")).args(args).output().expect("run zhuli");
        (
            out.status.success(),
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
        )
    };
    let new_key = agent.dir.join("new-store-key").display().to_string();
    let (ok, out) = zhuli(&["store", "new-key", &new_key]);
    assert!(ok, "{out}");
    let cfg = agent.config_path().display().to_string();
    let (ok, out) = zhuli(&["store", "rekey", "--config", &cfg, "--new-key", &new_key]);
    assert!(ok && out.contains("with a new index secret: 1 processed msgIds"), "{out}");
    assert!(!out.contains("dropped"), "a store written by this version keeps every id: {out}");
    std::fs::copy(&new_key, agent.dir.join("store-key")).expect("install the new key");

    agent.restart();
    assert!(sim.wait_until(Duration::from_secs(15), |s| s.connections().len() == 1).await, "{}", agent.log());
    sim.inject(Inject::text("/ping").with_msg_id(id.clone()));
    let fresh = sim.inject(Inject::text("/help"));
    assert_each_answered_once(&sim, &agent, &[id, fresh], Duration::from_secs(10)).await;
}
