//! USB provisioning end to end with FAT image files: keygen → check → sign → write → import →
//! the agent runs on the imported configuration with its secrets as credentials; and every bad
//! stick leaves the previous configuration as it was, with a receipt that says why.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use zhuli::{
    dingtalk::sim::{Inject, Simulator},
    provision::{self, sign, stick},
};

use crate::support::{self, SECRET};

fn zhuli(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_zhuli")).args(args).env("ZHULI_LOG", "info").output().expect("run zhuli")
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

struct Box {
    dir: PathBuf,
    root: PathBuf,
}

impl Drop for Box {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Box {
    /// `zhuli provision import` of `image` into this box, to adjust before running;
    /// `plain` keeps the secrets as plain files instead of sealed credentials.
    fn import_command(&self, image: &Path, plain: bool) -> Command {
        self.import_command_with(Path::new(env!("CARGO_BIN_EXE_zhuli")), image, plain)
    }

    fn import_command_with(&self, bin: &Path, image: &Path, plain: bool) -> Command {
        // With the unit's UMask=0077, so the modes the agent relies on are set, not inherited.
        let mut c = Command::new("sh");
        c.args(["-c", "umask 077; exec \"$0\" \"$@\""]).arg(bin);
        c.args(["provision", "import", "--device", &s(image), "--root", &s(&self.root)]).args([
            "--org-key",
            &s(&self.dir.join("no-baked-key.pub")),
            "--no-restart",
        ]);
        if plain {
            c.arg("--plain-credentials");
        }
        c
    }

    fn new(tag: &str) -> Box {
        let dir = support::temp_dir(tag);
        let root = dir.join("provisioning");
        Box { dir, root }
    }

    /// `zhuli provision import` of `image` into this box.
    fn import(&self, image: &Path) -> Output {
        self.import_command(image, true).output().expect("run zhuli")
    }

    fn current_config(&self) -> Option<String> {
        std::fs::read_to_string(self.root.join("current/zhuli.toml")).ok()
    }
}

/// A configuration for `sim` with `serial`, its store key and state in `dir`.
fn config_text(sim: &Simulator, dir: &Path, serial: u64) -> String {
    let key = dir.join("store-key");
    if !key.exists() {
        zhuli::store::key::StoreKey::generate().write_new(&key).expect("store key");
    }
    format!(
        "serial = {serial}\n[agent]\nstate_dir = {:?}\n[store]\nkey_file = {:?}\n{}",
        s(&dir.join("state")),
        s(&key),
        support::config_for(sim, SECRET, "")
    )
}

/// An image holding `files`.
fn image(dir: &Path, name: &str, files: &[(&str, &[u8])]) -> PathBuf {
    let path = dir.join(name);
    stick::create_image(&path, 4 * 1024 * 1024, files).expect("image");
    path
}

fn receipt_on(image: &Path) -> String {
    String::from_utf8(stick::read(image, stick::RECEIPT).expect("receipt on the stick")).expect("utf-8")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_stick_configures_the_box_and_its_secrets_leave_the_stick() {
    let sim = Simulator::start(support::sim_config()).await.expect("simulator");
    let b = Box::new("provision");
    let laptop = b.dir.join("laptop");
    std::fs::create_dir_all(&laptop).expect("laptop");

    // On the installer's laptop.
    let out = zhuli(&["provision", "keygen", "--out", &s(&laptop.join("keys"))]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let template = laptop.join("template.toml");
    assert!(zhuli(&["provision", "init", "--out", &s(&template)]).status.success());
    assert!(zhuli(&["provision", "check", &s(&template)]).status.success(), "the template checks");
    let cfg = laptop.join("zhuli.toml");
    std::fs::write(&cfg, config_text(&sim, &b.dir, 1)).expect("config");
    let check = zhuli(&["provision", "check", &s(&cfg)]);
    assert!(String::from_utf8_lossy(&check.stdout).contains("valid, serial 1"));
    let key = s(&laptop.join("keys/org.key"));
    assert!(zhuli(&["provision", "sign", "--key", &key, &s(&cfg)]).status.success());
    let verify = zhuli(&["provision", "verify", "--org-key", &s(&laptop.join("keys/org.pub")), &s(&cfg)]);
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stderr));
    let img = laptop.join("stick.img");
    let write = zhuli(&["provision", "write", "--config", &s(&cfg), "--image", &s(&img)]);
    assert!(write.status.success(), "{}", String::from_utf8_lossy(&write.stderr));
    assert!(!String::from_utf8_lossy(&write.stdout).contains(SECRET));
    // A stick's block device: formatted on request, refused when it is not a ZHULI-CFG stick.
    let device = laptop.join("sdb1");
    std::fs::write(&device, vec![0u8; 8 * 1024 * 1024]).expect("blank device");
    let refused = zhuli(&["provision", "write", "--config", &s(&cfg), "--device", &s(&device)]);
    assert!(!refused.status.success() && String::from_utf8_lossy(&refused.stderr).contains("no FAT file system"));
    let formatted = zhuli(&["provision", "write", "--config", &s(&cfg), "--device", &s(&device), "--format"]);
    assert!(formatted.status.success(), "{}", String::from_utf8_lossy(&formatted.stderr));
    let listed = stick::list(&device).expect("a ZHULI-CFG stick");
    assert!(
        listed.files.iter().any(|(n, _)| n == stick::CONFIG) && listed.files.iter().any(|(n, _)| n == stick::SIGNATURE)
    );

    // On the box.
    let out = b.import(&img);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("imported serial 1"), "{text}");
    let imported = b.current_config().expect("current config");
    assert!(!imported.contains(SECRET), "no secret in the imported configuration");
    assert!(imported.contains("client_secret = { credential = \"dingtalk-client-secret\" }"));
    let on_stick = String::from_utf8(stick::read(&img, stick::CONFIG).expect("config on stick")).expect("utf-8");
    assert!(!on_stick.contains(SECRET) && on_stick.contains("REMOVED-AFTER-IMPORT"), "secret scrubbed from the stick");
    let receipt = receipt_on(&img);
    assert!(receipt.contains("result: imported serial 1") && receipt.contains("config sha256: "), "{receipt}");
    assert!(!receipt.contains(SECRET));
    assert!(b.root.join("org.pub").exists(), "the signer's key is pinned at the first import");
    // The same stick again (left in at a reboot): recognised, left alone, its receipt kept.
    let again = b.import(&img);
    let again_text = String::from_utf8_lossy(&again.stdout).into_owned();
    assert!(again.status.success() && again_text.contains("imported already"), "{again_text}");
    assert_eq!(receipt_on(&img), receipt, "the first receipt stays on the stick");
    assert_eq!(provision::current_serial(&b.root), 1);
    // The agent (group zhuli on the box) reads its configuration through these modes.
    let mode =
        |p: &Path| std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(p).expect("stat").permissions()) & 0o777;
    assert_eq!(mode(&b.root.join("generations")), 0o755);
    assert_eq!(mode(&b.root.join("current")), 0o750);
    assert_eq!(mode(&b.root.join("current/zhuli.toml")), 0o640);
    assert_eq!(provision::current_serial(&b.root), 1);

    // The agent runs on it, with the secret handed over as a credential.
    let mut agent = Command::new(env!("CARGO_BIN_EXE_zhuli"))
        .args(["run", "--config", &s(&b.root.join("current/zhuli.toml"))])
        .env("CREDENTIALS_DIRECTORY", b.root.join("current"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("agent");
    assert!(sim.wait_until(Duration::from_secs(15), |s| !s.connections().is_empty()).await, "agent connects");
    let id = sim.inject(Inject::text("/ping"));
    assert!(sim.wait_until(Duration::from_secs(10), |s| !support::replies_to(s, &id).is_empty()).await);
    let _ = agent.kill();
    let _ = agent.wait();

    // A newer serial, signed with the same key, replaces it; the old generation stays for rollback.
    std::fs::write(&cfg, config_text(&sim, &b.dir, 2).replace("workers = 32", "")).expect("config 2");
    assert!(zhuli(&["provision", "sign", "--key", &key, &s(&cfg)]).status.success());
    let img2 = laptop.join("stick2.img");
    assert!(zhuli(&["provision", "write", "--config", &s(&cfg), "--image", &s(&img2)]).status.success());
    assert!(b.import(&img2).status.success());
    assert_eq!(provision::current_serial(&b.root), 2);
    assert_eq!(std::fs::read_dir(b.root.join("generations")).map(|d| d.count()).unwrap_or(0), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_stick_leaves_the_previous_configuration_intact() {
    let sim = Simulator::start(support::sim_config()).await.expect("simulator");
    let b = Box::new("provision-bad");
    let (org_private, _) = sign::keygen();
    let (stranger_private, _) = sign::keygen();
    let signed = |text: &str, key: &str| -> (Vec<u8>, Vec<u8>) {
        let sig = sign::sign(text.as_bytes(), key, "key").expect("sign");
        (text.as_bytes().to_vec(), sig.into_bytes())
    };
    let stick_of = |name: &str, text: &str, key: &str| {
        let (c, sig) = signed(text, key);
        image(&b.dir, name, &[(stick::CONFIG, &c), (stick::SIGNATURE, &sig)])
    };

    // A good first import pins the organisation key.
    let good = config_text(&sim, &b.dir, 5);
    assert!(b.import(&stick_of("good.img", &good, &org_private)).status.success());
    let before = b.current_config().expect("imported");

    let bad_utf8 = {
        let mut v = good.clone().into_bytes();
        v.extend_from_slice(b"# \xff\xfe not utf-8\n");
        v
    };
    let huge = format!("{}\n#{}\n", config_text(&sim, &b.dir, 9), "x".repeat(10 * 1024 * 1024));
    let cases: Vec<(&str, PathBuf, &str)> = vec![
        (
            "unsigned",
            image(&b.dir, "unsigned.img", &[(stick::CONFIG, config_text(&sim, &b.dir, 6).as_bytes())]),
            "not signed",
        ),
        ("wrong key", stick_of("stranger.img", &config_text(&sim, &b.dir, 6), &stranger_private), "trusts only"),
        ("replayed serial", stick_of("replay.img", &good, &org_private), "not newer than the box's current serial 5"),
        ("older serial", stick_of("older.img", &config_text(&sim, &b.dir, 4), &org_private), "not newer"),
        (
            "malformed TOML",
            stick_of("malformed.img", &format!("{}\n[dingtalk\n", config_text(&sim, &b.dir, 6)), &org_private),
            "line",
        ),
        (
            "unknown field",
            stick_of(
                "unknown.img",
                &config_text(&sim, &b.dir, 6).replace("[agent]", "[agent]\ncolour = \"red\""),
                &org_private,
            ),
            "unknown field `colour`",
        ),
        (
            "missing secret",
            stick_of(
                "nosecret.img",
                &config_text(&sim, &b.dir, 6).replace(&format!("client_secret = \"{SECRET}\"\n"), ""),
                &org_private,
            ),
            "client_secret is missing",
        ),
        (
            "wrong type",
            stick_of(
                "type.img",
                &config_text(&sim, &b.dir, 6).replace("[agent]", "[agent]\nworkers = \"many\""),
                &org_private,
            ),
            "line",
        ),
        ("no serial", stick_of("noserial.img", &config_text(&sim, &b.dir, 0), &org_private), "serial"),
        (
            "non-UTF-8",
            {
                let sig = sign::sign(&bad_utf8, &org_private, "k").expect("sign");
                image(&b.dir, "utf8.img", &[(stick::CONFIG, &bad_utf8), (stick::SIGNATURE, sig.as_bytes())])
            },
            "not UTF-8",
        ),
        (
            "10 MB file",
            {
                let path = b.dir.join("huge.img");
                stick::create_image(&path, 16 * 1024 * 1024, &[(stick::CONFIG, huge.as_bytes())]).expect("huge image");
                path
            },
            "at most 1048576",
        ),
        (
            "two config files",
            {
                let (c, sig) = signed(&config_text(&sim, &b.dir, 6), &org_private);
                image(&b.dir, "two.img", &[(stick::CONFIG, &c), (stick::SIGNATURE, &sig), ("zhuli (1).toml", &c)])
            },
            "several configuration files",
        ),
        (
            "tampered after signing",
            {
                let (c, sig) = signed(&config_text(&sim, &b.dir, 6), &org_private);
                let mut c2 = c.clone();
                c2.extend_from_slice(b"\n[access]\nadmins = [\"intruder\"]\n");
                image(&b.dir, "tampered.img", &[(stick::CONFIG, &c2), (stick::SIGNATURE, &sig)])
            },
            "does not match",
        ),
        (
            "not a config stick",
            {
                let path = b.dir.join("blank.img");
                std::fs::write(&path, vec![0u8; 1024 * 1024]).expect("blank");
                path
            },
            "no FAT file system",
        ),
    ];
    for (what, img, expect) in cases {
        let out = b.import(&img);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "{what}: must be refused\n{stdout}");
        assert!(stdout.contains(expect), "{what}: expected {expect:?} in\n{stdout}");
        assert!(stderr.contains("provisioning refused"), "{what}: a journal line\n{stderr}");
        assert_eq!(b.current_config().as_deref(), Some(before.as_str()), "{what}: previous configuration intact");
        assert_eq!(provision::current_serial(&b.root), 5, "{what}");
        if what != "not a config stick" {
            let receipt = receipt_on(&img);
            assert!(receipt.contains("refused") && receipt.contains(expect), "{what}: receipt\n{receipt}");
        }
        assert!(!stdout.contains(SECRET) && !stderr.contains(SECRET), "{what}: secret leaked");
    }

    // The stick pulled out mid-import: the image is cut short under the importer.
    let (c, sig) = signed(&config_text(&sim, &b.dir, 7), &org_private);
    let img = image(&b.dir, "pulled.img", &[(stick::CONFIG, &c), (stick::SIGNATURE, &sig)]);
    let bytes = std::fs::read(&img).expect("image");
    std::fs::write(&img, &bytes[..16 * 1024]).expect("cut");
    let out = b.import(&img);
    assert!(!out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(b.current_config().as_deref(), Some(before.as_str()));

    // Pulled out at the worst moment — while its secrets are being removed: nothing switches,
    // and the staged generation is gone.
    let (c, sig) = signed(&config_text(&sim, &b.dir, 7), &org_private);
    let img = image(&b.dir, "pulled-late.img", &[(stick::CONFIG, &c), (stick::SIGNATURE, &sig)]);
    let generations = || std::fs::read_dir(b.root.join("generations")).map(|d| d.count()).unwrap_or(0);
    let before_generations = generations();
    let out = b.import_command(&img, true).env("ZHULI_TEST_PULL", "scrub").output().expect("import");
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stdout).contains("pulled out"));
    assert_eq!(b.current_config().as_deref(), Some(before.as_str()));
    assert_eq!(provision::current_serial(&b.root), 5);
    assert_eq!(generations(), before_generations, "the staged generation was removed");

    // A read-only stick (a lock switch): nothing is imported, since its secrets could not be
    // removed. Root can write any file, so this runs as another user.
    if std::fs::read_to_string("/proc/self/status").is_ok_and(|s| s.lines().any(|l| l.starts_with("Uid:\t0\t"))) {
        let (c, sig) = signed(&config_text(&sim, &b.dir, 8), &org_private);
        let img = image(&b.dir, "locked.img", &[(stick::CONFIG, &c), (stick::SIGNATURE, &sig)]);
        std::fs::set_permissions(&img, std::os::unix::fs::PermissionsExt::from_mode(0o444)).expect("chmod");
        let mut opened = vec![b.dir.clone()];
        opened.extend([b.root.clone(), b.root.join("generations")]);
        for p in &opened {
            std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(0o777)).expect("chmod");
        }
        let bin = crate::support::binary_for_any_user(&b.dir);
        let out = std::os::unix::process::CommandExt::uid(&mut b.import_command_with(&bin, &img, true), 65534)
            .output()
            .expect("import as another user");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            !out.status.success() && stdout.contains("read-only"),
            "{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("read-only stick: {}", stdout.lines().last().unwrap_or_default());
        assert_eq!(b.current_config().as_deref(), Some(before.as_str()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_sealed_by_systemd_and_a_factory_reset_trusts_a_new_key() {
    let sim = Simulator::start(support::sim_config()).await.expect("simulator");
    let b = Box::new("provision-creds");
    let (first_key, _) = sign::keygen();
    let text = config_text(&sim, &b.dir, 1);
    let sig = sign::sign(text.as_bytes(), &first_key, "k").expect("sign");
    let img = image(&b.dir, "stick.img", &[(stick::CONFIG, text.as_bytes()), (stick::SIGNATURE, sig.as_bytes())]);

    let sealed = Command::new("systemd-creds").arg("--version").output().is_ok_and(|o| o.status.success());
    if sealed {
        let out = b.import_command(&img, false).output().expect("import");
        assert!(
            out.status.success(),
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let cred = b.root.join("current/dingtalk-client-secret.cred");
        let bytes = std::fs::read(&cred).expect("sealed credential");
        assert!(!String::from_utf8_lossy(&bytes).contains(SECRET), "the credential file is sealed");
        let open = Command::new("systemd-creds")
            .args(["decrypt", "--name=dingtalk-client-secret"])
            .arg(&cred)
            .arg("-")
            .output()
            .expect("decrypt");
        assert_eq!(String::from_utf8_lossy(&open.stdout), SECRET, "systemd gives the agent the secret back");
        for name in zhuli::provision::CREDENTIALS {
            assert!(
                b.root.join(format!("current/{name}.cred")).exists(),
                "every credential the unit loads exists: {name}"
            );
        }
    } else {
        eprintln!("systemd-creds is not installed: sealing is not checked here");
        assert!(b.import(&img).status.success());
    }

    // A stick signed by another organisation key is refused … until a factory reset.
    let (second_key, _) = sign::keygen();
    let text2 = config_text(&sim, &b.dir, 2);
    let sig2 = sign::sign(text2.as_bytes(), &second_key, "k").expect("sign");
    let files: [(&str, &[u8]); 2] = [(stick::CONFIG, text2.as_bytes()), (stick::SIGNATURE, sig2.as_bytes())];
    let img2 = image(&b.dir, "stick2.img", &files);
    assert!(!b.import(&img2).status.success());
    assert!(!zhuli(&["provision", "factory-reset", "--root", &s(&b.root)]).status.success(), "needs --yes");
    assert!(zhuli(&["provision", "factory-reset", "--root", &s(&b.root), "--yes"]).status.success());
    assert!(!b.root.join("org.pub").exists() && b.current_config().is_none());
    let img3 = image(&b.dir, "stick3.img", &files);
    let out = b.import(&img3);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(provision::current_serial(&b.root), 2);
}
