//! Backup and restore with the real binary: a snapshot taken while the agent runs, verified,
//! restored over a destroyed store; corrupt, foreign and other stores' snapshots refused with the
//! store untouched.

use std::{path::Path, process::Command, time::Duration};

use zhuli_sim::dingtalk::{Inject, Simulator};

use crate::support::*;

fn zhuli(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_zhuli")).args(args).output().expect("run zhuli");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

fn snapshot_dir(under: &Path) -> std::path::PathBuf {
    std::fs::read_dir(under)
        .expect("backup dir")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("zhuli-snapshot-")))
        .expect("a snapshot directory")
}

fn hash(path: &Path) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, &std::fs::read(path).expect("read")).as_ref().to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_while_running_restores_a_destroyed_store() {
    let sim = Simulator::start(sim_config()).await.expect("sim");
    let mut agent = spawn_agent("backup", &config_for(&sim, SECRET, ""));
    assert!(sim.wait_until(Duration::from_secs(15), |s| !s.connections().is_empty()).await, "{}", agent.log());
    let first = sim.inject(Inject::text("/ping"));
    let secret_text = "the Lotus acquisition closes at 9 on Friday";
    let private = sim.inject(Inject::text(secret_text).from("staff-ceo"));
    assert_each_answered_once(&sim, &agent, &[first.clone(), private], Duration::from_secs(10)).await;

    let cfg = agent.config_path().display().to_string();
    let to = agent.dir.join("backups");
    let (ok, out) = zhuli(&["backup", "--config", &cfg, "--to", &to.display().to_string()]);
    assert!(ok, "backup while the agent runs: {out}");
    let snap = snapshot_dir(&to);
    for file in [agent.dir.join("state/zhuli.redb"), snap.join("zhuli.redb")] {
        let bytes = std::fs::read(&file).expect("read");
        for needle in [secret_text.as_bytes(), SECRET.as_bytes(), b"staff-ceo"] {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle),
                "{} holds {:?} in the clear",
                file.display(),
                String::from_utf8_lossy(needle)
            );
        }
    }
    let (ok, out) = zhuli(&["backup", "--config", &cfg, "--verify", &snap.display().to_string()]);
    assert!(ok && out.contains("is good"), "{out}");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(snap.join("manifest.json")).expect("manifest")).expect("json");
    assert_eq!(manifest["sha256"].as_str().map(str::len), Some(64));

    // Restore refuses while the agent has the store open.
    let (ok, out) = zhuli(&["restore", "--config", &cfg, "--from", &snap.display().to_string()]);
    assert!(!ok && out.contains("stop it first"), "{out}");

    // Lose the store: the agent refuses to start on it.
    agent.kill9();
    let store = agent.dir.join("state/zhuli.redb");
    std::fs::write(&store, b"").expect("destroy");
    agent.restart();
    assert_ne!(agent.wait_exit(Duration::from_secs(10)), Some(0));
    assert!(agent.log().contains("is not a zhuli store"), "{}", agent.log());

    let (ok, out) = zhuli(&["restore", "--config", &cfg, "--from", &snap.display().to_string()]);
    assert!(ok && out.contains("kept at"), "{out}");
    agent.restart();
    assert!(sim.wait_until(Duration::from_secs(15), |s| s.connections().len() == 1).await, "{}", agent.log());
    // The restored store still knows the first message: a redelivery is not answered again.
    sim.inject(Inject::text("/ping").with_msg_id(first.clone()));
    let second = sim.inject(Inject::text("/help"));
    assert_each_answered_once(&sim, &agent, &[first, second], Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_and_foreign_snapshots_are_refused() {
    let sim = Simulator::start(sim_config()).await.expect("sim");
    let mut agent = spawn_agent("badsnap", &config_for(&sim, SECRET, ""));
    assert!(sim.wait_until(Duration::from_secs(15), |s| !s.connections().is_empty()).await, "{}", agent.log());
    let id = sim.inject(Inject::text("/ping"));
    assert_each_answered_once(&sim, &agent, std::slice::from_ref(&id), Duration::from_secs(10)).await;
    agent.kill9();
    let cfg = agent.config_path().display().to_string();
    let to = agent.dir.join("backups");
    let (ok, out) = zhuli(&["backup", "--config", &cfg, "--to", &to.display().to_string()]);
    assert!(ok, "{out}");
    let snap = snapshot_dir(&to);
    let store = agent.dir.join("state/zhuli.redb");
    let live = hash(&store);

    // One flipped byte: the checksum says so.
    let file = snap.join("zhuli.redb");
    let mut bytes = std::fs::read(&file).expect("snapshot");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&file, &bytes).expect("corrupt");
    let (ok, out) = zhuli(&["backup", "--config", &cfg, "--verify", &snap.display().to_string()]);
    assert!(!ok && out.contains("is corrupt"), "{out}");
    let (ok, out) = zhuli(&["restore", "--config", &cfg, "--from", &snap.display().to_string()]);
    assert!(!ok && out.contains("is corrupt"), "{out}");
    assert_eq!(hash(&store), live, "a refused restore leaves the store as it was");

    // Another box's snapshot: sealed with another key.
    let other = temp_dir("otherbox");
    let other_key = zhuli::store::key::StoreKey::generate();
    {
        let s =
            zhuli::store::Store::open(&other.join("zhuli.redb"), &other_key, Default::default()).expect("other store");
        s.set_setting("x", "y").expect("setting");
    }
    let (foreign, _) =
        zhuli::store::backup::backup(&other.join("zhuli.redb"), &other_key, &other).expect("other backup");
    let (ok, out) = zhuli(&["restore", "--config", &cfg, "--from", &foreign.display().to_string()]);
    assert!(!ok && out.contains("is foreign"), "{out}");
    assert_eq!(hash(&store), live);

    // Another store's snapshot under this box's own key (a store moved away and started
    // afresh, or a second box sharing the key): refused, and the message says what to do.
    let other_store = other.join("same-key.redb");
    let key = zhuli::store::key::StoreKey::read(&agent.dir.join("store-key")).expect("key");
    zhuli::store::Store::open(&other_store, &key, Default::default())
        .expect("store")
        .set_setting("x", "z")
        .expect("set");
    let to_other = other.join("same-key-backups");
    let (same_key, _) = zhuli::store::backup::backup(&other_store, &key, &to_other).expect("same-key backup");
    let (ok, out) = zhuli(&["restore", "--config", &cfg, "--from", &same_key.display().to_string()]);
    assert!(!ok && out.contains("of another store") && out.contains("move the live store away"), "{out}");
    assert_eq!(hash(&store), live);
    // Doing what it says: move the live store away, then restore.
    std::fs::rename(&store, agent.dir.join("state/zhuli.redb.moved")).expect("move away");
    let (ok, out) = zhuli(&["restore", "--config", &cfg, "--from", &same_key.display().to_string()]);
    assert!(ok && out.contains("restored"), "{out}");

    // Not a snapshot at all.
    let (ok, out) = zhuli(&["backup", "--config", &cfg, "--verify", &agent.dir.display().to_string()]);
    assert!(!ok && out.contains("not a zhuli snapshot"), "{out}");
    let _ = std::fs::remove_dir_all(other);
}

/// The off-site copy against a real WebDAV server (rclone's, with a login): snapshots go up,
/// come back verified with the key, the oldest beyond `keep` go, and a copy changed on the
/// server fails its verification.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_go_off_site_verified_and_rotated() {
    use zhuli::{
        offsite::Offsite,
        secret::Secret,
        store::{Retention, Store, backup, key::StoreKey},
    };
    use zhuli_sim::local_server::LocalServer;
    let dir = temp_dir("offsite");
    let served = dir.join("nas");
    std::fs::create_dir_all(&served).expect("nas");
    let dav = Server::new(LocalServer::rclone_webdav(&served, "/dav", Some(("box", "nas-pw-93kQ"))));
    let key = StoreKey::generate();
    let file = dir.join("zhuli.redb");
    {
        let store = Store::open(&file, &key, Retention::default()).expect("store");
        store.set_setting("a", "b").expect("write");
    }
    let local = dir.join("backups");
    let offsite = Offsite::new(
        &format!("http://{}/dav/zhuli-backups", dav.addr()),
        "box",
        Some(&Secret::new("nas-pw-93kQ")),
        2,
        Duration::from_secs(10),
    );
    let mut names = Vec::new();
    for _ in 0..3 {
        let (snapshot, _) = backup::backup(&file, &key, &local).expect("snapshot");
        let name = offsite.upload(&snapshot).await.expect("upload");
        offsite.verify(&name, &key, &dir.join("scratch")).await.expect("verified after upload");
        names.push(name);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(offsite.list().await.expect("list"), names);
    assert_eq!(offsite.prune(&names[2], None).await.expect("prune"), 1);
    assert_eq!(offsite.list().await.expect("list"), names[1..].to_vec(), "the oldest went");
    // The restore drill: the newest restored and opened, holding what the store held.
    let scratch = dir.join("drill");
    let drill = || offsite.drill(StoreKey::from_bytes(*key.bytes()), &scratch, None);
    let (name, got) = drill().await;
    assert_eq!(name, names[2]);
    assert_eq!(got.expect("restored and opened").settings, 1);
    assert!(!scratch.exists(), "the scratch folder is removed");
    // The server's copy is changed: it no longer verifies.
    let on_nas = served.join("zhuli-backups").join(&names[2]).join(backup::SNAPSHOT_FILE);
    let mut bytes = std::fs::read(&on_nas).expect("on the nas");
    let at = bytes.len() / 2;
    bytes[at] ^= 0x40;
    std::fs::write(&on_nas, bytes).expect("tamper");
    let e = offsite.verify(&names[2], &key, &dir.join("scratch")).await.expect_err("a changed copy");
    assert!(e.contains("does not match the checksum"), "{e}");
    // The restore drill takes the newest, and now fails on it.
    let (name, got) = drill().await;
    assert_eq!(name, names[2]);
    assert!(got.is_err(), "{got:?}");
    assert!(!scratch.exists(), "the scratch folder is removed");
    // A wrong password is said as such.
    let wrong = Offsite::new(
        &format!("http://{}/dav/zhuli-backups", dav.addr()),
        "box",
        Some(&Secret::new("wrong")),
        2,
        Duration::from_secs(10),
    );
    let e = wrong.list().await.expect_err("refused");
    assert!(e.contains("401"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The doctor looks at the off-site folder itself: the newest snapshot there and its age; none,
/// or one older than two days, is a warning (the nightly copy is not arriving).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_doctor_warns_when_the_newest_off_site_copy_is_old() {
    use zhuli::{
        offsite::Offsite,
        secret::Secret,
        store::{Retention, Store, backup, key::StoreKey},
    };
    use zhuli_sim::local_server::LocalServer;
    let dir = temp_dir("offsite-age");
    let served = dir.join("nas");
    std::fs::create_dir_all(&served).expect("nas");
    let dav = Server::new(LocalServer::rclone_webdav(&served, "/dav", Some(("box", "nas-pw-93kQ"))));
    let url = format!("http://{}/dav/zhuli-backups", dav.addr());
    let config = dir.join("zhuli.toml");
    std::fs::write(
        &config,
        format!(
            "[dingtalk]\nclient_id = \"x\"\nclient_secret = \"y\"\nrobot_code = \"r\"\napi_base = \"http://127.0.0.1:9\"\n\
             [llm]\nbase_url = \"http://127.0.0.1:9/v1\"\nmodel = \"m\"\n\
             [agent]\nstate_dir = \"{}\"\n\
             [backup]\noffsite = \"{url}\"\nusername = \"box\"\npassword = \"nas-pw-93kQ\"\n",
            dir.join("state").display(),
        ),
    )
    .expect("config");
    let doctor = |config: std::path::PathBuf| async move {
        let report = tokio::task::spawn_blocking(move || crate::support::doctor(&config)).await.expect("doctor");
        let step = report.split("6. tools").nth(1).and_then(|r| r.split("\n7. ").next()).unwrap_or_default().to_owned();
        (report, step)
    };
    let (report, step) = doctor(config.clone()).await;
    assert!(step.contains("none on the drive yet") && step.trim_start().starts_with("WARN"), "{report}");

    // Snapshots sent up as the nightly backup does, named as if taken three days and an hour ago.
    let key = StoreKey::generate();
    let file = dir.join("zhuli.redb");
    Store::open(&file, &key, Retention::default()).expect("store").set_setting("a", "b").expect("write");
    let offsite = Offsite::new(&url, "box", Some(&Secret::new("nas-pw-93kQ")), 5, Duration::from_secs(10));
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis() as i64;
    let send_as = |ago_ms: i64, seq: u32| {
        let (snapshot, _) = backup::backup(&file, &key, &dir.join("backups")).expect("snapshot");
        let named = snapshot.with_file_name(format!("zhuli-snapshot-{}-{seq}", now_ms - ago_ms));
        std::fs::rename(&snapshot, &named).expect("rename");
        named
    };
    offsite.upload(&send_as(3 * 86_400_000 + 60_000, 1)).await.expect("upload");
    let (report, step) = doctor(config.clone()).await;
    assert!(step.contains("72 h old (more than two days)") && step.trim_start().starts_with("WARN"), "{report}");
    assert!(report.contains("not reaching the network drive"), "{report}");
    assert!(!report.contains("nas-pw-93kQ"), "{report}");
    // A newer one, by sequence, an hour old: no warning.
    offsite.upload(&send_as(3_600_000 + 60_000, 2)).await.expect("upload");
    let (report, step) = doctor(config).await;
    assert!(step.contains("is 1 h old") && step.trim_start().starts_with("PASS"), "{report}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A drive that stops taking an upload half-way (it reads the request's head, then nothing):
/// the nightly copy fails within `timeout_ms` of the last byte it took, instead of waiting for
/// ever, and the snapshot's files went up as a stream (the store's size is not held in memory).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drive_that_stops_taking_an_upload_fails_it_within_the_idle_time() {
    use tokio::io::AsyncReadExt;
    use zhuli::{
        offsite::Offsite,
        secret::Secret,
        store::{Retention, Store, backup, key::StoreKey},
    };
    use zhuli_sim::local_server::LocalServer;
    let dir = temp_dir("offsite-stall");
    let served = dir.join("nas");
    std::fs::create_dir_all(&served).expect("nas");
    let dav = Server::new(LocalServer::rclone_webdav(&served, "/dav", Some(("box", "nas-pw-93kQ"))));
    // A front that passes every request on, except that a connection opening with a PUT gets
    // its head read and then no answer, and nothing more read from it.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let front = listener.local_addr().expect("addr");
    let to = dav.addr();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut first = [0u8; 4];
                if client.peek(&mut first).await.is_ok() && &first == b"PUT " {
                    let mut head = vec![0u8; 4096];
                    let _ = client.read(&mut head).await;
                    tokio::time::sleep(Duration::from_secs(120)).await;
                    drop(client);
                } else if let Ok(mut server) = tokio::net::TcpStream::connect(to).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
    let key = StoreKey::generate();
    let file = dir.join("zhuli.redb");
    {
        // Some megabytes of sealed history: more than the socket takes without being read.
        let store = Store::open(&file, &key, Retention::default()).expect("store");
        let filler: String = "会议纪要：下周一九点在三楼会议室讨论第三季度的预算。".repeat(400);
        for i in 0..200 {
            store.set_setting(&format!("filler-{i}"), &filler).expect("write");
        }
    }
    let (snapshot, _) = backup::backup(&file, &key, &dir.join("backups")).expect("snapshot");
    let offsite = Offsite::new(
        &format!("http://{front}/dav/zhuli-backups"),
        "box",
        Some(&Secret::new("nas-pw-93kQ")),
        3,
        Duration::from_secs(1),
    );
    let started = std::time::Instant::now();
    let e = offsite.upload(&snapshot).await.expect_err("a stalled upload fails");
    let took = started.elapsed();
    assert!(e.contains("timed out"), "{e}");
    assert!(took < Duration::from_secs(30), "failed after {took:?}, not when the drive stopped");
    // Nothing half-sent counts as a snapshot there; through the front, the next upload (PUTs
    // straight to the drive) works and cleans up.
    let direct = Offsite::new(
        &format!("http://{}/dav/zhuli-backups", dav.addr()),
        "box",
        Some(&Secret::new("nas-pw-93kQ")),
        3,
        Duration::from_secs(10),
    );
    assert!(direct.list().await.expect("list").is_empty());
    let name = direct.upload(&snapshot).await.expect("upload");
    direct.verify(&name, &key, &dir.join("scratch")).await.expect("verified");
    assert_eq!(direct.list().await.expect("list"), vec![name]);
    let _ = std::fs::remove_dir_all(&dir);
}
