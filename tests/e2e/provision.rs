//! USB provisioning end to end with FAT image files: keygen → check → sign → write → import →
//! the agent runs on the imported configuration with its secrets as credentials; and every bad
//! stick leaves the previous configuration as it was, with a receipt that says why.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use zhuli::provision::{self, sign, stick};
use zhuli_sim::dingtalk::{Inject, Simulator};

use crate::support::{self, SECRET};

pub(crate) fn zhuli(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_zhuli")).args(args).env("ZHULI_LOG", "info").output().expect("run zhuli")
}

pub(crate) fn s(p: &Path) -> String {
    p.display().to_string()
}

pub(crate) struct Box {
    pub dir: PathBuf,
    pub root: PathBuf,
}

impl Drop for Box {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Box {
    /// `zhuli provision import` of `image` into this box, to adjust before running;
    /// `plain` keeps the secrets as plain files instead of sealed credentials.
    pub fn import_command(&self, image: &Path, plain: bool) -> Command {
        self.import_command_with(Path::new(env!("CARGO_BIN_EXE_zhuli")), image, plain)
    }

    fn import_command_with(&self, bin: &Path, image: &Path, plain: bool) -> Command {
        // With the unit's UMask=0077, so the modes the agent relies on are set, not inherited.
        let mut c = Command::new("sh");
        c.args(["-c", "umask 077; exec \"$0\" \"$@\""]).arg(bin);
        c.env("ZHULI_UPDATE_DIR", self.dir.join("zhuli-update"));
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

    pub fn new(tag: &str) -> Box {
        let dir = support::temp_dir(tag);
        let root = dir.join("provisioning");
        Box { dir, root }
    }

    /// `zhuli provision import` of `image` into this box.
    fn import(&self, image: &Path) -> Output {
        self.import_command(image, true).output().expect("run zhuli")
    }

    /// `zhuli run` on the current generation, its secrets handed over as credentials (output
    /// discarded).
    fn run_agent(&self) -> std::process::Child {
        Command::new(env!("CARGO_BIN_EXE_zhuli"))
            .args(["run", "--config", &s(&self.root.join("current/zhuli.toml"))])
            .env("CREDENTIALS_DIRECTORY", self.root.join("current"))
            .env("ZHULI_UPDATE_DIR", self.dir.join("zhuli-update"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("agent")
    }

    fn current_config(&self) -> Option<String> {
        std::fs::read_to_string(self.root.join("current/zhuli.toml")).ok()
    }
}

/// A configuration for `sim` with `serial`, its store key and state in `dir`.
pub(crate) fn config_text(sim: &Simulator, dir: &Path, serial: u64) -> String {
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

pub(crate) fn receipt_on(image: &Path) -> String {
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
    // The untouched template is refused for its placeholders, each named.
    let untouched = zhuli(&["provision", "check", &s(&template)]);
    let said = String::from_utf8_lossy(&untouched.stderr).into_owned();
    assert!(
        !untouched.status.success() && said.contains("[dingtalk] client_secret: is still the template's placeholder"),
        "{said}"
    );
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
    let stars = "*".repeat(SECRET.len());
    assert!(!on_stick.contains(SECRET) && on_stick.contains(&format!("\"{stars}\"")), "secret starred on the stick");
    let receipt = receipt_on(&img);
    assert!(receipt.contains("result: imported serial 1") && receipt.contains("config sha256: "), "{receipt}");
    assert!(receipt.contains("secrets on this stick: removed: the whole stick was checked"), "{receipt}");
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
    let mut agent = b.run_agent();
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
            "unknown setting `colour`",
        ),
        (
            "missing secret",
            stick_of(
                "nosecret.img",
                &config_text(&sim, &b.dir, 6).replace(&format!("client_secret = \"{SECRET}\"\n"), ""),
                &org_private,
            ),
            "[dingtalk] client_secret: is missing",
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
        // What `zhuli run` would refuse at every start, refused before the switch instead.
        (
            "a grant of a tool that does not exist",
            stick_of(
                "typo.img",
                &format!("{}\n[access.roles.member]\ntools = [\"files_reed\"]\n", config_text(&sim, &b.dir, 6)),
                &org_private,
            ),
            "did you mean `files_read`?",
        ),
        (
            "an undefined role",
            stick_of(
                "role.img",
                &format!("{}\n[access]\ndefault_roles = [\"ghost\"]\n", config_text(&sim, &b.dir, 6)),
                &org_private,
            ),
            "the role `ghost`",
        ),
        (
            "a model on the LAN over plain http",
            stick_of(
                "lan.img",
                &format!(
                    "{}\n[llm]\nbase_url = \"http://192.168.1.5:11434/v1\"\nmodel = \"qwen2.5\"\n",
                    config_text(&sim, &b.dir, 6)
                ),
                &org_private,
            ),
            "[llm] base_url",
        ),
        (
            "the template's placeholder credentials",
            stick_of("template.img", &config_text(&sim, &b.dir, 6).replace(SECRET, "paste-the-secret"), &org_private),
            "[dingtalk] client_secret: is still the template's placeholder",
        ),
        // What only the box can tell.
        (
            "a plugin whose program is not on the box",
            stick_of(
                "plugin.img",
                &format!("{}\n[tools.mcp.search]\ncommand = \"/opt/none/node\"\n", config_text(&sim, &b.dir, 6)),
                &org_private,
            ),
            "/opt/none/node must be the absolute path of a program that exists on the box",
        ),
        (
            "a time zone the box does not know",
            stick_of(
                "zone.img",
                &config_text(&sim, &b.dir, 6).replace("[agent]", "[agent]\ntime_zone = \"Mars/Olympus_Mons\""),
                &org_private,
            ),
            "[agent] time_zone",
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
            // The admin chat hears the same reasons (the agent reads them at its next sample).
            let refusal = provision::Refusal::last(&b.root).expect("the refusal is noted for the agent");
            assert!(refusal.reasons.iter().any(|r| r.contains(expect)), "{what}: {refusal:?}");
        }
        assert!(!stdout.contains(SECRET) && !stderr.contains(SECRET), "{what}: secret leaked");
    }
    // None of these sticks carries a release: the update journal hears nothing of them.
    let journal = b.dir.join("zhuli-update/events.jsonl");
    assert!(!journal.exists(), "{}", std::fs::read_to_string(&journal).unwrap_or_default());

    // The stick pulled out mid-import: the image is cut short under the importer.
    let (c, sig) = signed(&config_text(&sim, &b.dir, 7), &org_private);
    let img = image(&b.dir, "pulled.img", &[(stick::CONFIG, &c), (stick::SIGNATURE, &sig)]);
    let bytes = std::fs::read(&img).expect("image");
    std::fs::write(&img, &bytes[..16 * 1024]).expect("cut");
    let out = b.import(&img);
    assert!(!out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(b.current_config().as_deref(), Some(before.as_str()));

    // Pulled out while its secrets are being removed: the configuration is in, and the stick
    // says the removal is not finished (tested in full on a 1 GiB stick below).
    let (c, sig) = signed(&config_text(&sim, &b.dir, 7), &org_private);
    let img = image(&b.dir, "pulled-late.img", &[(stick::CONFIG, &c), (stick::SIGNATURE, &sig)]);
    let out = b.import_command(&img, true).env("ZHULI_TEST_PULL", "scrub").output().expect("import");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && stdout.contains("NOT all removed"), "{stdout}");
    assert_eq!(provision::current_serial(&b.root), 7);
    let before = b.current_config().expect("serial 7");
    let out = b.import(&img);
    assert!(String::from_utf8_lossy(&out.stdout).contains("now finished"), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(occurrences(&img, SECRET.as_bytes()) == 0, "the next insertion finished the removal");

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
    assert!(sealed, "systemd-creds is needed for this test: apt-get install systemd (or run tests/run)");
    let out = b.import_command(&img, false).output().expect("import");
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
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
        assert!(b.root.join(format!("current/{name}.cred")).exists(), "every credential the unit loads exists: {name}");
    }
    // Nothing under the provisioning root holds a secret in plain: not the configuration, not
    // the drop-in, not the record of the stick's scrub.
    let mut files = vec![b.root.clone()];
    while let Some(p) = files.pop() {
        if p.is_dir() && !p.is_symlink() {
            files.extend(std::fs::read_dir(&p).expect("dir").flatten().map(|e| e.path()));
        } else if p.is_file() {
            let bytes = std::fs::read(&p).expect("file");
            assert!(!bytes.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()), "{} holds the secret", p.display());
        }
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

/// Where `needle` first occurs in the raw bytes of `path`.
fn first_offset(path: &Path, needle: &[u8]) -> Option<u64> {
    let bytes = std::fs::read(path).expect("read image");
    memchr::memmem::find(&bytes, needle).map(|at| at as u64)
}

/// Whether any half of `secret` (as cut in two) is still in the raw bytes of `path`.
fn halves_left(path: &Path, secret: &str) -> u64 {
    let (head, tail) = secret.as_bytes().split_at(secret.len() / 2);
    occurrences(path, head) + occurrences(path, tail)
}

/// How many times `needle` occurs in the raw bytes of `path` (read in chunks that overlap by
/// the needle's length, so a copy across two chunks counts).
fn occurrences(path: &Path, needle: &[u8]) -> u64 {
    use std::io::Read;
    let mut f = std::fs::File::open(path).expect("open image");
    let finder = memchr::memmem::Finder::new(needle);
    let mut buf = vec![0u8; 4 << 20];
    let (mut carried, mut n) = (0usize, 0u64);
    loop {
        let read = f.read(&mut buf[carried..]).expect("read image");
        let len = carried + read;
        n += finder.find_iter(&buf[..len]).filter(|at| at + needle.len() > carried).count() as u64;
        if read == 0 {
            return n;
        }
        let keep = (needle.len() - 1).min(len);
        buf.copy_within(len - keep..len, 0);
        carried = keep;
    }
}

/// One value of every kind of secret a configuration can carry.
const EVERY_SECRET: [(&str, &str); 8] = [
    ("[dingtalk] client_secret", SECRET),
    ("[llm] api_key", "sk-llm-key-7hW2qLx9"),
    ("[tools.github] token", "github_pat_11AZ9kQ0rT5u"),
    ("[tools.drive] password", "drive-app-pass-Xq7v2M"),
    ("[tools.caldav] password", "caldav-app-pass-Lm3k8R"),
    ("[tools.mcp.search] env.API_KEY", "search-api-key-Pz5nW1"),
    ("[[models]] \"office\" api_key", "model-office-key-Rt6yU2"),
    ("[backup] password", "nas-backup-pass-Hy4tE8"),
];

/// A configuration holding every kind of secret, a shared folder the import makes, a plugin.
fn config_with_every_secret(sim: &Simulator, dir: &Path, serial: u64, note: &str) -> String {
    let [_, llm, github, drive, caldav, plugin, model, nas] = EVERY_SECRET.map(|(_, v)| v);
    format!(
        "# {note}\n{}\n[llm]\nbase_url = \"http://127.0.0.1:9/v1\"\nmodel = \"m\"\napi_key = \"{llm}\"\n\
         [[models]]\nname = \"office\"\nwhere = \"local\"\nbase_url = \"http://127.0.0.1:8/v1\"\nmodel = \"qwen\"\napi_key = \"{model}\"\n\
         [tools.files.roots]\nshare = {share:?}\n\
         [tools.github]\ntoken = \"{github}\"\nrepos = [\"office/website\"]\n\
         [tools.drive]\nurl = \"https://dav.office.test/remote.php/dav/files/zhuli/\"\nusername = \"zhuli\"\npassword = \"{drive}\"\n\
         [tools.caldav]\nusername = \"zhuli\"\npassword = \"{caldav}\"\ndefault_calendar = \"team\"\n\
         [tools.caldav.calendars]\nteam = \"https://dav.office.test/remote.php/dav/calendars/zhuli/team/\"\n\
         [tools.mcp.search]\ncommand = \"/bin/true\"\nwrite = [{share:?}]\nenv = {{ API_KEY = \"{plugin}\", LEVEL = \"info\" }}\n\
         [health]\nadmin_chat = \"cid-admins\"\n\
         [backup]\noffsite = \"https://nas.office.test/dav/zhuli-backups\"\nusername = \"zhuli\"\npassword = \"{nas}\"\n",
        config_text(sim, dir, serial),
        share = s(&dir.join("srv/office/share")),
    )
}

/// A stick the way an office has one: a shop stick of `size` bytes (FAT32 from `mkfs.vfat`, or
/// formatted by `zhuli provision write --format`), written once with an earlier, longer draft
/// of the configuration, an editor's backup copy made and deleted beside it, then the final
/// signed file written over the draft.
fn office_stick(dir: &Path, name: &str, size: u64, how: &str, draft: &str, config: &Path) -> PathBuf {
    let img = dir.join(name);
    std::fs::File::create(&img).and_then(|f| f.set_len(size)).expect("stick image");
    let draft_path = dir.join(format!("{name}-draft.toml"));
    std::fs::write(&draft_path, draft).expect("draft");
    let write = |file: &Path, format: bool| {
        let mut args = vec!["provision", "write", "--unsigned", "--device"];
        let (img, file) = (s(&img), s(file));
        args.push(&img);
        args.extend(["--config", &file]);
        if format {
            args.push("--format");
        }
        let out = zhuli(&args);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    match how {
        "mkfs.vfat" => {
            let out =
                Command::new("mkfs.vfat").args(["-F", "32", "-n", stick::LABEL]).arg(&img).output().unwrap_or_else(
                    |e| {
                        panic!("mkfs.vfat is needed for this test ({e}): apt-get install dosfstools (or run tests/run)")
                    },
                );
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            write(&draft_path, false);
        }
        _ => write(&draft_path, true),
    }
    // An editor's backup beside it, deleted: its clusters are free now, its bytes still there.
    {
        use std::io::Write;
        let file = std::fs::OpenOptions::new().read(true).write(true).open(&img).expect("open stick");
        let fs = fatfs::FileSystem::new(file, fatfs::FsOptions::new()).expect("FAT");
        let expected = if size >= 1 << 30 { fatfs::FatType::Fat32 } else { fatfs::FatType::Fat16 };
        assert_eq!(fs.fat_type(), expected, "{how}, {} MiB", size >> 20);
        fs.root_dir().create_file("zhuli.toml~").and_then(|mut f| f.write_all(draft.as_bytes())).expect("backup");
        fs.root_dir().remove("zhuli.toml~").expect("delete backup");
        // A deleted file whose clusters were not side by side: a marker file shows where a
        // cluster starts; once it is deleted, a secret's first half ends that cluster and its
        // second half starts one five clusters on (both free).
        let cluster = u64::from(fs.cluster_size());
        fs.root_dir().create_file("marker.tmp").and_then(|mut f| f.write_all(b"CLUSTER-START-MARKER")).expect("marker");
        fs.unmount().expect("unmount");
        let start = first_offset(&img, b"CLUSTER-START-MARKER").expect("the marker's cluster");
        let file = std::fs::OpenOptions::new().read(true).write(true).open(&img).expect("open stick");
        let fs = fatfs::FileSystem::new(file, fatfs::FsOptions::new()).expect("FAT");
        fs.root_dir().remove("marker.tmp").expect("delete marker");
        fs.unmount().expect("unmount");
        use std::os::unix::fs::FileExt;
        let raw = std::fs::OpenOptions::new().write(true).open(&img).expect("open device");
        for (i, (_, secret)) in EVERY_SECRET.iter().enumerate() {
            let (head, tail) = secret.as_bytes().split_at(secret.len() / 2);
            let at = start + (10 * i as u64) * cluster;
            raw.write_all_at(head, at + cluster - head.len() as u64).expect("first half");
            raw.write_all_at(tail, at + 5 * cluster).expect("second half");
        }
    }
    write(config, false);
    img
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_byte_of_any_secret_is_left_anywhere_on_the_stick() {
    let sim = Simulator::start(support::sim_config()).await.expect("simulator");
    let b = Box::new("provision-scrub");
    let (key, _) = sign::keygen();
    let sticks = [
        ("shop.img", 1u64 << 30, "mkfs.vfat"),
        ("formatted.img", 1u64 << 30, "zhuli provision write --format"),
        ("small.img", 64 << 20, "zhuli provision write --format"),
    ];
    for (serial, (name, size, how)) in (1u64..).zip(sticks) {
        let text = config_with_every_secret(&sim, &b.dir, serial, "final");
        let draft = config_with_every_secret(&sim, &b.dir, serial, &format!("draft {}", "-".repeat(3000)));
        let cfg = b.dir.join(format!("{name}.toml"));
        std::fs::write(&cfg, &text).expect("config");
        std::fs::write(b.dir.join(format!("{name}.toml.sig")), sign::sign(text.as_bytes(), &key, "k").expect("sign"))
            .expect("signature");
        let img = office_stick(&b.dir, name, size, how, &draft, &cfg);
        for (field, value) in EVERY_SECRET {
            assert!(occurrences(&img, value.as_bytes()) >= 2, "{how}: {field} is on the stick before the import");
            assert!(halves_left(&img, value) >= 6, "{how}: {field} cut in two is on the stick before the import");
        }

        let out = b.import(&img);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success() && stdout.contains(&format!("imported serial {serial}")), "{how}: {stdout}");
        for (field, value) in EVERY_SECRET {
            assert_eq!(occurrences(&img, value.as_bytes()), 0, "{how}: {field} is still on the stick's device");
            assert_eq!(halves_left(&img, value), 0, "{how}: a piece of {field} is still on the stick's device");
        }
        let receipt = receipt_on(&img);
        let line = receipt.lines().find(|l| l.starts_with("secrets on this stick:")).unwrap_or_default().to_owned();
        assert!(line.contains("removed: the whole stick was checked"), "{how}: {receipt}");
        eprintln!("{how}, {} MiB: {line}", size >> 20);
        // What is left is the file with its secrets starred, readable and refused if re-used.
        let left = String::from_utf8(stick::read(&img, stick::CONFIG).expect("config")).expect("utf-8");
        assert_eq!(left.len(), text.len());
        assert!(left.contains("api_key = \"*******************\"") && left.contains("LEVEL = \"****\""), "{left}");
        assert!(zhuli(&["provision", "check", &s(&cfg)]).status.success());
        assert!(std::fs::read_dir(b.root.join(provision::scrub::PENDING)).is_ok_and(|mut d| d.next().is_none()));

        // The generation: plugin secrets as credentials the drop-in loads, the shared folder
        // made and writable for the agent.
        let current = b.root.join("current");
        assert_eq!(
            std::fs::read_to_string(current.join("mcp-search-API_KEY")).expect("plugin credential"),
            EVERY_SECRET[5].1
        );
        let dropin = std::fs::read_to_string(current.join(provision::unit::DROPIN)).expect("drop-in");
        let share = std::fs::canonicalize(b.dir.join("srv/office/share")).expect("the import made the shared folder");
        // Made under the import's umask 077, yet every folder on the way is open to the agent.
        let mode = |p: &Path| {
            std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(p).expect("stat").permissions()) & 0o777
        };
        assert_eq!((mode(&b.dir.join("srv/office")), mode(&share)), (0o755, 0o750));
        assert!(dropin.contains(&format!("ReadWritePaths=\"-{}\"", share.display())), "{dropin}");
        assert!(
            dropin.contains(&format!("LoadCredential=mcp-search-API_KEY:{}", s(&current.join("mcp-search-API_KEY")))),
            "{dropin}"
        );
        let imported = std::fs::read_to_string(current.join("zhuli.toml")).expect("config");
        for (field, value) in EVERY_SECRET {
            assert!(!imported.contains(value), "{field} in the imported configuration");
        }
        assert!(imported.contains("API_KEY = { credential = \"mcp-search-API_KEY\" }"), "{imported}");
        // A model endpoint's key too: sealed, loaded by the drop-in, named in the configuration.
        assert_eq!(
            std::fs::read_to_string(current.join("model-office-api-key")).expect("model credential"),
            EVERY_SECRET[6].1
        );
        assert!(
            dropin
                .contains(&format!("LoadCredential=model-office-api-key:{}", s(&current.join("model-office-api-key")))),
            "{dropin}"
        );
        assert!(imported.contains("api_key = { credential = \"model-office-api-key\" }"), "{imported}");
        // The off-site backup's password the same way.
        assert_eq!(
            std::fs::read_to_string(current.join("backup-password")).expect("backup credential"),
            EVERY_SECRET[7].1
        );
        assert!(
            dropin.contains(&format!("LoadCredential=backup-password:{}", s(&current.join("backup-password")))),
            "{dropin}"
        );
        assert!(imported.contains("password = { credential = \"backup-password\" }"), "{imported}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stick_pulled_out_during_the_removal_is_finished_at_its_next_insertion() {
    let sim = Simulator::start(support::sim_config()).await.expect("simulator");
    let b = Box::new("provision-pulled");
    let (key, _) = sign::keygen();
    let text = config_with_every_secret(&sim, &b.dir, 1, "final");
    let cfg = b.dir.join("zhuli.toml");
    std::fs::write(&cfg, &text).expect("config");
    std::fs::write(b.dir.join("zhuli.toml.sig"), sign::sign(text.as_bytes(), &key, "k").expect("sign")).expect("sig");
    let draft = config_with_every_secret(&sim, &b.dir, 1, &format!("draft {}", "-".repeat(3000)));
    let img = office_stick(&b.dir, "stick.img", 1 << 30, "mkfs.vfat", &draft, &cfg);
    // A copy in the second half of the stick, where the erasure has not reached when it stops.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&img).expect("open");
        f.write_all_at(EVERY_SECRET[1].1.as_bytes(), (3 << 28) + 123).expect("a copy far out");
    }

    let out = b.import_command(&img, true).env("ZHULI_TEST_PULL", "scrub").output().expect("import");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success() && stdout.contains("imported serial 1"), "{stdout}");
    assert!(stdout.contains("NOT all removed"), "{stdout}");
    assert_eq!(provision::current_serial(&b.root), 1, "the configuration is in");
    assert!(receipt_on(&img).contains("NOT all removed"), "{}", receipt_on(&img));
    assert!(occurrences(&img, EVERY_SECRET[1].1.as_bytes()) >= 1, "the far copy is still there");
    let pending = provision::scrub::unattended(&b.root);
    assert_eq!(pending.len(), 1, "the unfinished removal is recorded");
    let record = std::fs::read_dir(b.root.join(provision::scrub::PENDING)).expect("records");
    for entry in record.flatten() {
        let bytes = std::fs::read(entry.path()).expect("record");
        for (field, value) in EVERY_SECRET {
            assert!(
                !bytes.windows(value.len()).any(|w| w == value.as_bytes())
                    || entry.path().extension().is_some_and(|e| e == "cred"),
                "{field} in the record {}",
                entry.path().display()
            );
        }
    }

    // The agent, started on that configuration, tells the admins the stick still holds secrets.
    let mut agent = b.run_agent();
    let told = sim
        .wait_until(Duration::from_secs(20), |s| {
            s.replies().iter().any(|r| r.conversation_id.as_deref() == Some("cid-admins") && r.text.contains("U 盘"))
        })
        .await;
    let _ = agent.kill();
    let _ = agent.wait();
    assert!(told, "the admins were told: {:?}", sim.replies());

    // Plugged in again: recognised, the removal finished, nothing else changed.
    let out = b.import(&img);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success() && stdout.contains("now finished"), "{stdout}");
    for (field, value) in EVERY_SECRET {
        assert_eq!(occurrences(&img, value.as_bytes()), 0, "{field} is still on the stick");
    }
    assert!(receipt_on(&img).contains("removed: the whole stick was checked"), "{}", receipt_on(&img));
    assert!(provision::scrub::unattended(&b.root).is_empty());
    assert_eq!(provision::current_serial(&b.root), 1);
    // And once more: the stick this box imported, left alone.
    let out = b.import(&img);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("imported already"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pinned_key_is_durable_before_the_switch_that_relies_on_it() {
    let sim = Simulator::start(support::sim_config()).await.expect("simulator");
    let b = Box::new("provision-pin");
    let (org, _) = sign::keygen();
    let stick_of = |name: &str, serial: u64, key: &str| {
        let text = config_text(&sim, &b.dir, serial);
        let sig = sign::sign(text.as_bytes(), key, "k").expect("sign");
        image(&b.dir, name, &[(stick::CONFIG, text.as_bytes()), (stick::SIGNATURE, sig.as_bytes())])
    };
    // The first signed import cannot pin its key (something in the way where the pin goes):
    // nothing is switched, so the box never runs a configuration whose signer it forgot.
    std::fs::create_dir_all(b.root.join("org.pub/in-the-way")).expect("an obstacle");
    let first = stick_of("first.img", 1, &org);
    let out = b.import(&first);
    assert!(!out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(b.current_config().is_none(), "switched without a pinned key");
    assert_eq!(provision::current_serial(&b.root), 0);
    // Nothing else is left behind for an import that did not happen: no scrub is pending, the
    // stick was not touched.
    assert!(provision::scrub::unattended(&b.root).is_empty(), "a scrub recorded for a stick not imported");
    assert_eq!(occurrences(&first, SECRET.as_bytes()), 1, "the stick of a refused import keeps its file");
    std::fs::remove_dir_all(b.root.join("org.pub")).expect("obstacle gone");
    // Then it works, and the key is pinned: a stranger's newer stick is refused.
    assert!(b.import(&stick_of("first-again.img", 1, &org)).status.success());
    let (stranger, _) = sign::keygen();
    let out = b.import(&stick_of("stranger.img", 2, &stranger));
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stdout).contains("trusts only"));
    assert_eq!(provision::current_serial(&b.root), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_stopped_before_its_switch_is_imported_at_the_next_insertion() {
    let sim = Simulator::start(support::sim_config()).await.expect("simulator");
    let b = Box::new("provision-stopped");
    let (key, _) = sign::keygen();
    let text = config_text(&sim, &b.dir, 1);
    let sig = sign::sign(text.as_bytes(), &key, "k").expect("sign");
    let img = image(&b.dir, "stick.img", &[(stick::CONFIG, text.as_bytes()), (stick::SIGNATURE, sig.as_bytes())]);
    // Power lost after the scrub was recorded, before the switch.
    let out = b.import_command(&img, true).env("ZHULI_TEST_STOP", "before-switch").output().expect("import");
    assert!(!out.status.success());
    assert!(b.current_config().is_none());
    assert_eq!(occurrences(&img, SECRET.as_bytes()), 1, "the stick was not touched");
    // Plugged in again: imported for real, not mistaken for a stick whose scrub was cut short.
    let out = b.import(&img);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success() && stdout.contains("imported serial 1"), "{stdout}");
    assert_eq!(provision::current_serial(&b.root), 1);
    assert_eq!(occurrences(&img, SECRET.as_bytes()), 0);
}

/// The laptop refuses what the box would, with the same words; a stick signed anyway is refused
/// by the box with the previous configuration kept, and the admin chat hears why, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configuration_the_box_cannot_run_is_refused_on_the_laptop_and_explained_in_the_admin_chat() {
    let sim = Simulator::start(support::sim_config()).await.expect("simulator");
    let b = Box::new("provision-refused");
    let laptop = b.dir.join("laptop");
    std::fs::create_dir_all(&laptop).expect("laptop");
    let (org, org_public) = sign::keygen();
    let admins = "[health]\nadmin_chat = \"cid-admins\"\nsample_ms = 200\n";
    let good = format!("{}{admins}", config_text(&sim, &b.dir, 1));
    let sig = sign::sign(good.as_bytes(), &org, "k").expect("sign");
    let img = image(&b.dir, "good.img", &[(stick::CONFIG, good.as_bytes()), (stick::SIGNATURE, sig.as_bytes())]);
    assert!(b.import(&img).status.success());
    let before = b.current_config().expect("imported");

    // On the laptop: `check` and `sign` refuse it, naming the setting and a guess.
    let bad = format!("{}{admins}[access.roles.member]\ntools = [\"files_reed\"]\n", config_text(&sim, &b.dir, 2));
    let file = laptop.join("office.toml");
    std::fs::write(&file, &bad).expect("file");
    for args in [vec!["provision", "check", &s(&file)], vec!["provision", "sign", "--key", "/nonexistent", &s(&file)]] {
        let out = zhuli(&args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "{args:?}");
        assert!(stderr.contains("office.toml cannot run on a box"), "{args:?}: {stderr}");
        assert!(stderr.contains("[access.roles.member] grants `files_reed`"), "{stderr}");
        assert!(stderr.contains("did you mean `files_read`?"), "{stderr}");
        assert!(!stderr.contains("Caused by") && !stderr.contains("backtrace"), "{stderr}");
    }
    // Signed anyway (by hand): the box refuses it the same way and keeps serial 1.
    let sig = sign::sign(bad.as_bytes(), &org, "k").expect("sign");
    let bad_img = image(&b.dir, "bad.img", &[(stick::CONFIG, bad.as_bytes()), (stick::SIGNATURE, sig.as_bytes())]);
    let out = b.import(&bad_img);
    assert!(!out.status.success());
    assert_eq!(b.current_config().as_deref(), Some(before.as_str()));
    let receipt = receipt_on(&bad_img);
    assert!(receipt.contains("result: refused: the previous configuration is unchanged"), "{receipt}");
    assert!(receipt.contains("error: [access.roles.member] grants `files_reed`"), "{receipt}");

    // The agent, running on the previous configuration, tells the admin chat why, once.
    let mut agent = b.run_agent();
    let refusals = |s: &Simulator| {
        s.replies()
            .into_iter()
            .filter(|r| r.conversation_id.as_deref() == Some("cid-admins") && r.text.contains("未被导入"))
            .collect::<Vec<_>>()
    };
    let told = sim.wait_until(Duration::from_secs(20), |s| !refusals(s).is_empty()).await;
    // Many samples later (200 ms apart), still said once.
    tokio::time::sleep(Duration::from_secs(2)).await;

    // An empty stick labelled for the box, plugged in while the agent runs: the agent's full
    // diagnostics are written onto it, readable on any laptop.
    let empty = image(&b.dir, "empty.img", &[]);
    let out = b.import_command(&empty, true).output().expect("import");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success() && stdout.contains("result: diagnostics only"), "{stdout}");
    let _ = agent.kill();
    let _ = agent.wait();
    let text = String::from_utf8(stick::read(&empty, stick::DIAGNOSTICS_TEXT).expect("diagnostics on the stick"))
        .expect("utf-8");
    for part in [
        "zhuli diagnostics",
        "running agent: 0.",
        "== configuration\nserial 1\nno problems found",
        "[PASS] network",
        "[PASS] credentials",
        "== status",
        "connected",
        "== warnings and errors of the last 24 hours (redacted; from ",
        "== disks\n/: ",
        "no backup yet",
    ] {
        assert!(text.contains(part), "{part:?} missing from\n{text}");
    }
    assert!(!text.contains(SECRET), "a secret in the diagnostics");
    let json: zhuli::health::diagnostics::Report =
        serde_json::from_slice(&stick::read(&empty, stick::DIAGNOSTICS_JSON).expect("json")).expect("a report");
    assert!(
        matches!(json.doctor, zhuli::health::diagnostics::Section::Found(ref s) if s.len() >= 5),
        "{:?}",
        json.doctor
    );
    // The refused stick got the diagnostics too (made without the agent's help: it was not running).
    let refused = String::from_utf8(stick::read(&bad_img, stick::DIAGNOSTICS_TEXT).expect("on the refused stick"))
        .expect("utf-8");
    assert!(refused.contains("not run: the agent did not answer"), "{refused}");
    assert!(
        refused.contains("== configuration\nserial 1"),
        "the running configuration, not the refused one\n{refused}"
    );
    assert!(told, "the admins were told: {:?}", sim.replies());
    let said = refusals(&sim);
    assert_eq!(said.len(), 1, "{said:?}");
    assert!(said[0].text.contains("files_reed") && said[0].text.contains("第 2 号配置"), "{}", said[0].text);
    // The reason in the box's language, the setting named as the file writes it.
    assert!(
        said[0].text.contains("`[access.roles.member]`：授予了 `files_reed`")
            && said[0].text.contains("`files_read`？"),
        "{}",
        said[0].text
    );
    assert!(!said[0].text.contains(SECRET));

    // `provision write` checks the signature and the template's examples before the stick.
    let ok = format!("{}{admins}", config_text(&sim, &b.dir, 3));
    std::fs::write(&file, &ok).expect("file");
    let key = laptop.join("org.key");
    std::fs::write(&key, &org).expect("key");
    assert!(zhuli(&["provision", "sign", "--key", &s(&key), &s(&file)]).status.success());
    std::fs::write(&file, format!("{ok}[access]\nadmins = [\"intruder\"]\n")).expect("changed after signing");
    let out = zhuli(&["provision", "write", "--config", &s(&file), "--image", &s(&laptop.join("t.img"))]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success() && stderr.contains("does not match") && stderr.contains("provision sign"),
        "{stderr}"
    );
    assert!(!laptop.join("t.img").exists(), "no stick written");
    let example = format!("{ok}[access]\nadmins = [\"manager001\"]\n");
    std::fs::write(&file, &example).expect("example");
    assert!(zhuli(&["provision", "sign", "--key", &s(&key), &s(&file)]).status.success());
    let out = zhuli(&["provision", "write", "--config", &s(&file), "--image", &s(&laptop.join("e.img"))]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success() && stderr.contains("\"manager001\" is the template's example"), "{stderr}");
    // With the organisation's public key, `write` refuses a file signed with another key.
    let (stranger, stranger_pub) = sign::keygen();
    let (stranger_key, stranger_pub_file) = (laptop.join("stranger.key"), laptop.join("stranger.pub"));
    std::fs::write(&stranger_key, &stranger).expect("key");
    std::fs::write(&stranger_pub_file, &stranger_pub).expect("pub");
    let org_pub = laptop.join("org.pub");
    std::fs::write(&org_pub, &org_public).expect("org.pub");
    assert!(zhuli(&["provision", "sign", "--key", &s(&stranger_key), &s(&file)]).status.success());
    let write = |org_key: &std::path::Path, img: &str| {
        let (org_key, img) = (s(org_key), s(&laptop.join(img)));
        zhuli(&["provision", "write", "--config", &s(&file), "--image", &img, "--force", "--org-key", &org_key])
    };
    let out = write(&org_pub, "x.img");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success() && stderr.contains("not by") && stderr.contains("--org-key"), "{stderr}");
    assert!(!laptop.join("x.img").exists(), "no stick written");
    assert!(write(&stranger_pub_file, "x.img").status.success(), "the stranger's own key accepts it");
    assert!(zhuli(&["provision", "sign", "--key", &s(&key), &s(&file)]).status.success());
    let out = write(&org_pub, "e.img");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // A good stick clears the refusal; after a factory reset, the last stick (its secrets
    // removed at its import) is refused with what to do, and written again it is imported.
    let img3 = laptop.join("e.img");
    assert!(b.import(&img3).status.success());
    assert!(provision::Refusal::last(&b.root).is_none(), "a good import clears the refusal");
    let out = zhuli(&["provision", "factory-reset", "--root", &s(&b.root), "--yes"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = b.import(&img3);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!out.status.success() && stdout.contains("holds only `*`"), "{stdout}");
    let again = laptop.join("again.img");
    let out = zhuli(&["provision", "write", "--config", &s(&file), "--image", &s(&again), "--force"]);
    assert!(out.status.success());
    let out = b.import(&again);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(provision::current_serial(&b.root), 3);
}

/// A 1 GiB shop stick (sparse), FAT32 from `mkfs.vfat`, holding nothing: it comes for the
/// diagnostics, and takes the box's newest snapshot.
fn empty_shop_stick(dir: &Path, name: &str) -> PathBuf {
    let img = dir.join(name);
    std::fs::File::create(&img).and_then(|f| f.set_len(1 << 30)).expect("stick image");
    let out = Command::new("mkfs.vfat").args(["-F", "32", "-n", stick::LABEL]).arg(&img).output().unwrap_or_else(|e| {
        panic!("mkfs.vfat is needed for this test ({e}): apt-get install dosfstools (or run tests/run)")
    });
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    img
}

/// A box configured from a signed stick, with a store holding something; its store key.
fn configured_box(sim: &Simulator, tag: &str) -> (Box, zhuli::store::key::StoreKey) {
    let b = Box::new(tag);
    let (org, _) = sign::keygen();
    let text = config_text(sim, &b.dir, 1);
    let sig = sign::sign(text.as_bytes(), &org, "k").expect("sign");
    let img = image(&b.dir, "config.img", &[(stick::CONFIG, text.as_bytes()), (stick::SIGNATURE, sig.as_bytes())]);
    let out = b.import(&img);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let key = zhuli::store::key::StoreKey::read(&b.dir.join("store-key")).expect("store key");
    std::fs::create_dir_all(b.dir.join("state")).expect("state dir");
    let store = zhuli::store::Store::open(&b.store_file(), &key, zhuli::store::Retention::default()).expect("store");
    store.set_setting("office.note", &"the Lotus acquisition closes on Friday. ".repeat(2000)).expect("a setting");
    (b, key)
}

impl Box {
    fn store_file(&self) -> PathBuf {
        zhuli::store::file_in(&self.dir.join("state"))
    }

    fn backups(&self) -> PathBuf {
        self.dir.join("state").join(zhuli::health::diagnostics::BACKUPS)
    }

    /// A new snapshot in the box's backups folder, as the nightly backup takes it; its name.
    fn snapshot(&self, key: &zhuli::store::key::StoreKey) -> String {
        let (dir, _) = zhuli::store::backup::backup(&self.store_file(), key, &self.backups()).expect("snapshot");
        dir.file_name().expect("a name").to_string_lossy().into_owned()
    }

    /// Insert `img`: the import's printed receipt.
    fn insert(&self, img: &Path) -> String {
        let out = self.import(img);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
        text
    }
}

/// The snapshot folders in the stick's `zhuli-backups/`, sorted.
fn snapshots_on(img: &Path) -> Vec<String> {
    let mut names: Vec<String> = stick::list_subfolders(img, provision::stick_backup::DIR)
        .expect("the stick's backups")
        .into_iter()
        .map(|f| f.name)
        .filter(|n| n.starts_with("zhuli-snapshot-"))
        .collect();
    names.sort();
    names
}

/// Read snapshot `name` off the stick into `into` and verify it as a restore would.
fn verify_on_stick(
    img: &Path,
    name: &str,
    into: &Path,
    key: &zhuli::store::key::StoreKey,
) -> zhuli::store::backup::Manifest {
    let dir = into.join(name);
    std::fs::create_dir_all(&dir).expect("dir");
    for file in [zhuli::store::backup::SNAPSHOT_FILE, zhuli::store::backup::MANIFEST] {
        let mut out = std::fs::File::create(dir.join(file)).expect("file");
        stick::copy_from_folder(img, &format!("zhuli-backups/{name}"), file, &mut out, 1 << 32).expect("read back");
    }
    match zhuli::store::backup::verify(&dir, key).expect("the copy on the stick verifies") {
        zhuli::store::backup::Verified::Bound(m) => m,
        other => panic!("not a bound snapshot: {other:?}"),
    }
}

/// Change the stick with fatfs directly (as another computer would).
fn on_fat(img: &Path, change: impl FnOnce(&fatfs::Dir<'_, std::fs::File>)) {
    let file = std::fs::OpenOptions::new().read(true).write(true).open(img).expect("open stick");
    let fs = fatfs::FileSystem::new(file, fatfs::FsOptions::new()).expect("FAT");
    change(&fs.root_dir());
    fs.unmount().expect("unmount");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_insertion_copies_the_newest_snapshot_onto_the_stick_verified_and_keeps_two() {
    let sim = Simulator::start(support::sim_config()).await.expect("simulator");
    let (b, key) = configured_box(&sim, "stick-backup");
    let img = empty_shop_stick(&b.dir, "shop.img");
    let check = b.dir.join("check");

    // No snapshot yet: said, nothing written.
    let out = b.insert(&img);
    assert!(out.contains("backup on this stick: not copied: no snapshot on the box yet"), "{out}");
    let record = provision::stick_backup::last(&b.root).expect("a record");
    assert!(record.ok_ms.is_none() && record.failing.as_deref().is_some_and(|f| f.contains("no snapshot")));
    assert!(record.failing_zh.as_deref().is_some_and(|f| f.contains("设备上还没有快照")), "{record:?}");

    let first = b.snapshot(&key);
    let out = b.insert(&img);
    assert!(out.contains(&format!("backup on this stick: zhuli-backups/{first} (backup 1, ")), "{out}");
    assert!(out.contains("copied and verified with the store key; 1 kept on this stick"), "{out}");
    assert_eq!(snapshots_on(&img), std::slice::from_ref(&first));
    assert_eq!(verify_on_stick(&img, &first, &check, &key).seq, 1);
    let record = provision::stick_backup::last(&b.root).expect("a record");
    assert_eq!((record.name.as_deref(), record.failing.as_deref()), (Some(first.as_str()), None));
    assert_eq!(record.failing_zh, None);
    let ok_ms = record.ok_ms.expect("when");
    assert!((zhuli::clock::now_ms() - ok_ms).abs() < 60_000, "{ok_ms}");
    assert!(
        receipt_on(&img).contains(&format!("backup on this stick: zhuli-backups/{first} ")),
        "{}",
        receipt_on(&img)
    );
    // The agent (group zhuli on the box) reads the record.
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(b.root.join(provision::stick_backup::RECORD)).expect("record").permissions(),
    );
    assert_eq!(mode & 0o777, 0o640);

    // The same snapshot again: verified again, not written twice.
    let out = b.insert(&img);
    assert!(out.contains("on the stick already, verified again"), "{out}");

    let second = b.snapshot(&key);
    let out = b.insert(&img);
    assert!(out.contains(&format!("zhuli-backups/{second} (backup 2, ")) && out.contains("2 kept"), "{out}");
    // The third is named with an earlier time (a clock set back): the backup number orders them.
    let third = {
        let taken = b.snapshot(&key);
        let renamed = "zhuli-snapshot-1000-3".to_owned();
        std::fs::rename(b.backups().join(&taken), b.backups().join(&renamed)).expect("rename");
        renamed
    };
    let out = b.insert(&img);
    assert!(out.contains(&format!("zhuli-backups/{third} (backup 3, ")), "{out}");
    assert!(out.contains("2 kept on this stick, 1 older removed"), "{out}");
    let mut expected = vec![second.clone(), third.clone()];
    expected.sort();
    assert_eq!(snapshots_on(&img), expected);
    assert_eq!(verify_on_stick(&img, &second, &check, &key).seq, 2);
    assert_eq!(verify_on_stick(&img, &third, &check, &key).seq, 3);

    // What a pulled stick leaves, a copy cut short, and a newest copy with a flipped byte: the
    // first two are removed, the third written again; someone else's folder is left alone.
    let manifest = std::fs::read(b.backups().join(&third).join("manifest.json")).expect("manifest");
    let file = std::fs::read(b.backups().join(&third).join("zhuli.redb")).expect("snapshot file");
    on_fat(&img, |root| {
        use std::io::{Seek, SeekFrom, Write};
        let dir = root.open_dir("zhuli-backups").expect("backups");
        let part = dir.create_dir("zhuli-snapshot-5000-9.part").expect("part");
        part.create_file("zhuli.redb").and_then(|mut f| f.write_all(&file[..file.len() / 2])).expect("half");
        let cut = dir.create_dir("zhuli-snapshot-6000-4").expect("cut");
        cut.create_file("zhuli.redb").and_then(|mut f| f.write_all(&file[..file.len() / 3])).expect("a third");
        cut.create_file("manifest.json").and_then(|mut f| f.write_all(&manifest)).expect("manifest");
        let mut copy = dir.open_file(&format!("{third}/zhuli.redb")).expect("the copy");
        copy.seek(SeekFrom::Start(file.len() as u64 / 2)).expect("seek");
        copy.write_all(&[file[file.len() / 2] ^ 0xff]).expect("flip");
        copy.flush().expect("flush");
        root.create_dir("photos").and_then(|d| d.create_file("team.jpg")).expect("someone's folder");
    });
    let out = b.insert(&img);
    assert!(out.contains(&format!("zhuli-backups/{third} (backup 3, ")), "{out}");
    assert!(out.contains("copied and verified") && out.contains("2 partial copies removed"), "{out}");
    assert_eq!(snapshots_on(&img), expected);
    verify_on_stick(&img, &third, &check, &key);
    assert_eq!(stick::list_folder(&img, "photos").expect("someone's folder"), [("team.jpg".to_owned(), 0)]);

    // The configuration stick again (imported already): its receipt stays, but for its backup line.
    let config_stick = b.dir.join("config.img");
    let before = receipt_on(&config_stick);
    assert!(before.contains("backup on this stick: not copied: no snapshot on the box yet"), "{before}");
    let out = b.insert(&config_stick);
    assert!(out.contains("imported already"), "{out}");
    let after = receipt_on(&config_stick);
    let others = |r: &str| r.lines().filter(|l| !l.starts_with(provision::BACKUP_LINE)).collect::<Vec<_>>().join("\n");
    assert_eq!(others(&after), others(&before), "{after}");
    let line = after.lines().find(|l| l.starts_with(provision::BACKUP_LINE)).expect("a backup line");
    assert!(line.contains(&third), "{after}");
    // Once more with nothing new: the receipt is not touched.
    b.insert(&config_stick);
    assert_eq!(receipt_on(&config_stick), after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stick_without_room_is_refused_with_what_it_needs_and_its_copy_kept() {
    let sim = Simulator::start(support::sim_config()).await.expect("simulator");
    let (b, key) = configured_box(&sim, "stick-backup-full");
    let first = b.snapshot(&key);
    let img = b.dir.join("small.img");
    stick::create_image(&img, 32 << 20, &[]).expect("a 32 MiB stick");
    let out = b.insert(&img);
    assert!(out.contains(&format!("zhuli-backups/{first} (backup 1, ")), "{out}");
    let ok_ms = provision::stick_backup::last(&b.root).and_then(|r| r.ok_ms).expect("copied");

    // The stick fills up with other things: less than half a snapshot is left.
    let bytes = std::fs::metadata(b.backups().join(&first).join("zhuli.redb")).expect("snapshot").len();
    let free = stick::space(&img).expect("space").free;
    on_fat(&img, |root| {
        use std::io::Write;
        let mut f = root.create_file("videos.bin").expect("file");
        let block = vec![7u8; 1 << 20];
        let mut left = free - bytes / 2;
        while left > 0 {
            let n = left.min(block.len() as u64) as usize;
            f.write_all(&block[..n]).expect("fill");
            left -= n as u64;
        }
        f.flush().expect("flush");
    });
    let second = b.snapshot(&key);
    let out = b.insert(&img);
    assert!(out.contains("backup on this stick: not copied: the stick has "), "{out}");
    assert!(out.contains("MiB free, the snapshot needs ") && out.contains("the copies on it were kept"), "{out}");
    assert_eq!(snapshots_on(&img), std::slice::from_ref(&first), "the only copy is kept");
    verify_on_stick(&img, &first, &b.dir.join("check"), &key);
    assert!(receipt_on(&img).contains("not copied: the stick has "), "{}", receipt_on(&img));
    let record = provision::stick_backup::last(&b.root).expect("a record");
    assert_eq!(record.ok_ms, Some(ok_ms), "the last good copy is still known");
    assert_eq!(record.name.as_deref(), Some(first.as_str()));
    assert!(record.failing.as_deref().is_some_and(|f| f.contains("MiB free")), "{record:?}");
    assert!(record.failing_zh.as_deref().is_some_and(|f| f.contains("U 盘剩余") && f.contains("MiB")), "{record:?}");

    // Room made: the new one goes on, the old one stays (two kept).
    on_fat(&img, |root| root.remove("videos.bin").expect("remove"));
    let out = b.insert(&img);
    assert!(out.contains(&format!("zhuli-backups/{second} (backup 2, ")) && out.contains("2 kept"), "{out}");
    assert!(provision::stick_backup::last(&b.root).is_some_and(|r| r.failing.is_none()));

    // No store key for the import: said, nothing on the stick changed.
    std::fs::rename(b.dir.join("store-key"), b.dir.join("store-key.away")).expect("move the key");
    b.snapshot(&key);
    let out = b.insert(&img);
    assert!(out.contains("backup on this stick: not copied: the store key cannot be loaded (cannot read"), "{out}");
    let mut both = vec![first, second];
    both.sort();
    assert_eq!(snapshots_on(&img), both);
    assert!(provision::stick_backup::last(&b.root).is_some_and(|r| r.failing.is_some_and(|f| f.contains("store key"))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_linked_elsewhere_is_refused_and_nothing_of_its_target_reaches_the_stick() {
    use std::os::unix::fs::symlink;
    let sim = Simulator::start(support::sim_config()).await.expect("simulator");
    let (b, key) = configured_box(&sim, "stick-backup-link");
    let img = b.dir.join("small.img");
    stick::create_image(&img, 32 << 20, &[]).expect("a 32 MiB stick");
    // A file root reads and the agent may not (the sealed credentials, /etc/shadow).
    let marker = "root-only-marker-Qv8dK2pX";
    let target = b.dir.join("root-only.txt");
    std::fs::write(&target, marker.repeat(500)).expect("the target");
    let refused = |out: &str, why: &str| {
        assert!(out.contains("backup on this stick: not copied: ") && out.contains(why), "{out}");
        assert!(out.contains("nothing was written to the stick"), "{out}");
        assert_eq!(occurrences(&img, marker.as_bytes()), 0, "nothing of the target is on the stick");
        assert!(snapshots_on(&img).is_empty());
        let record = provision::stick_backup::last(&b.root).expect("a record");
        assert!(record.failing_zh.as_deref().is_some_and(|f| f.contains("符号链接")), "{record:?}");
    };

    // The snapshot's file a link to it.
    let first = b.snapshot(&key);
    let file = b.backups().join(&first).join("zhuli.redb");
    std::fs::remove_file(&file).expect("remove");
    symlink(&target, &file).expect("link");
    refused(&b.insert(&img), "zhuli.redb is refused: a symbolic link");

    // The newest snapshot's folder a link to a folder holding it as a snapshot's file.
    let elsewhere = b.dir.join("elsewhere");
    std::fs::create_dir(&elsewhere).expect("folder");
    std::fs::copy(b.backups().join(&first).join("manifest.json"), elsewhere.join("manifest.json")).expect("manifest");
    std::fs::copy(&target, elsewhere.join("zhuli.redb")).expect("file");
    let linked = b.backups().join("zhuli-snapshot-9000-90");
    symlink(&elsewhere, &linked).expect("link");
    refused(&b.insert(&img), "zhuli-snapshot-9000-90 is refused: a symbolic link, or not a folder");
    std::fs::remove_file(&linked).expect("unlink");

    // A hard link to it as the newest snapshot's file.
    let hard = b.backups().join("zhuli-snapshot-9100-91");
    std::fs::create_dir(&hard).expect("folder");
    std::fs::copy(elsewhere.join("manifest.json"), hard.join("manifest.json")).expect("manifest");
    std::fs::hard_link(&target, hard.join("zhuli.redb")).expect("hard link");
    refused(&b.insert(&img), "a file of 2 links");
    std::fs::remove_dir_all(&hard).expect("remove");

    // A snapshot as the backup takes it goes on.
    let second = b.snapshot(&key);
    let out = b.insert(&img);
    assert!(out.contains(&format!("zhuli-backups/{second} (backup 2, ")), "{out}");
    assert_eq!(snapshots_on(&img), std::slice::from_ref(&second));
    verify_on_stick(&img, &second, &b.dir.join("check"), &key);
    assert_eq!(occurrences(&img, marker.as_bytes()), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_on_the_stick_longer_than_the_snapshot_is_written_again_unread() {
    let sim = Simulator::start(support::sim_config()).await.expect("simulator");
    let (b, key) = configured_box(&sim, "stick-backup-long");
    let img = b.dir.join("small.img");
    stick::create_image(&img, 32 << 20, &[]).expect("a 32 MiB stick");
    let first = b.snapshot(&key);
    let bytes = std::fs::metadata(b.backups().join(&first).join("zhuli.redb")).expect("snapshot").len();
    // A folder under this snapshot's name, its manifest this store's but for a longer file, and
    // its file that long (4 GiB at most, into the box's provisioning root, were it read).
    let longer = bytes + (4 << 20);
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(b.backups().join(&first).join("manifest.json")).expect("manifest"))
            .expect("json");
    manifest["bytes"] = longer.into();
    on_fat(&img, |root| {
        use std::io::Write;
        let dir = root.create_dir("zhuli-backups").and_then(|d| d.create_dir(&first)).expect("folder");
        let mut f = dir.create_file("zhuli.redb").expect("file");
        let block = vec![0x5a_u8; 1 << 20];
        let mut left = longer;
        while left > 0 {
            let n = left.min(block.len() as u64) as usize;
            f.write_all(&block[..n]).expect("fill");
            left -= n as u64;
        }
        f.flush().expect("flush");
        dir.create_file("manifest.json")
            .and_then(|mut f| f.write_all(&serde_json::to_vec(&manifest).expect("json")))
            .expect("manifest");
    });
    let out = b.import(&img);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains(&format!("zhuli-backups/{first} (backup 1, ")), "{stdout}");
    assert!(stdout.contains("copied and verified"), "{stdout}");
    // Told apart by the length in its entry, before anything of it was read.
    assert!(stderr.contains(&format!("its zhuli.redb is {longer} bytes, the snapshot's {bytes}")), "{stderr}");
    assert_eq!(snapshots_on(&img), std::slice::from_ref(&first));
    verify_on_stick(&img, &first, &b.dir.join("check"), &key);
}

/// Make the directory entry of the file holding `content` (which starts a cluster of the stick
/// `img`) say it is `by` bytes longer than its clusters hold: reading it fails, as on a failing
/// stick.
fn lengthen_entry(img: &Path, content: &[u8], by: u32) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().read(true).write(true).open(img).expect("open stick");
    let mut boot = [0u8; 512];
    f.read_exact_at(&mut boot, 0).expect("boot sector");
    let u16_at = |i: usize| u64::from(u16::from_le_bytes([boot[i], boot[i + 1]]));
    let u32_at = |i: usize| u64::from(u32::from_le_bytes([boot[i], boot[i + 1], boot[i + 2], boot[i + 3]]));
    let (sector, per_cluster, reserved, fats) = (u16_at(11), u64::from(boot[13]), u16_at(14), u64::from(boot[16]));
    let fat_sectors = if u16_at(22) != 0 { u16_at(22) } else { u32_at(36) };
    let root_sectors = (u16_at(17) * 32).div_ceil(sector);
    let data_start = (reserved + fats * fat_sectors) * sector;
    let first_cluster = data_start + root_sectors * sector;
    let at = first_offset(img, content).expect("the file on the stick");
    let cluster = (at - first_cluster) / (per_cluster * sector) + 2;
    let mut bytes = std::fs::read(img).expect("read stick");
    let len = content.len() as u32;
    let entry = (data_start as usize..bytes.len() - 32)
        .step_by(32)
        .find(|&e| {
            let d = &bytes[e..e + 32];
            let start =
                u64::from(u16::from_le_bytes([d[20], d[21]])) << 16 | u64::from(u16::from_le_bytes([d[26], d[27]]));
            d[11] & 0x18 == 0 && d[11] != 0x0f && start == cluster && d[28..32] == len.to_le_bytes()
        })
        .expect("its directory entry");
    bytes[entry + 28..entry + 32].copy_from_slice(&(len + by).to_le_bytes());
    f.write_all_at(&bytes[entry + 28..entry + 32], entry as u64 + 28).expect("write");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_the_stick_cannot_read_stops_the_copy_and_the_stick_is_left_as_it_is() {
    let sim = Simulator::start(support::sim_config()).await.expect("simulator");
    let (b, key) = configured_box(&sim, "stick-backup-unread");
    let img = b.dir.join("small.img");
    stick::create_image(&img, 32 << 20, &[]).expect("a 32 MiB stick");
    let first = b.snapshot(&key);
    b.insert(&img);

    // A folder under a snapshot's name without a manifest: a box renames a copy to its name
    // only once whole, so it is not one a box left; it is left alone.
    on_fat(&img, |root| {
        use std::io::Write;
        let dir = root.open_dir("zhuli-backups").and_then(|d| d.create_dir("zhuli-snapshot-8000-7")).expect("folder");
        dir.create_file("zhuli.redb").and_then(|mut f| f.write_all(b"someone's")).expect("file");
    });
    let second = b.snapshot(&key);
    let out = b.insert(&img);
    assert!(out.contains(&format!("zhuli-backups/{second} (backup 2, ")) && out.contains("2 kept"), "{out}");
    assert!(!out.contains("partial"), "{out}");
    let mut all = vec![first.clone(), second.clone(), "zhuli-snapshot-8000-7".to_owned()];
    all.sort();
    assert_eq!(snapshots_on(&img), all);

    // The stick fails under the first copy's manifest: the copy stops there, nothing removed.
    let manifest = std::fs::read(b.backups().join(&first).join("manifest.json")).expect("manifest");
    lengthen_entry(&img, &manifest, 4096);
    b.snapshot(&key);
    let out = b.insert(&img);
    assert!(
        out.contains(&format!("not copied: zhuli-backups/{first}/manifest.json on the stick cannot be read")),
        "{out}"
    );
    assert!(out.contains("the copies on the stick were left as they are"), "{out}");
    assert_eq!(snapshots_on(&img), all);
    verify_on_stick(&img, &second, &b.dir.join("check"), &key);
    let record = provision::stick_backup::last(&b.root).expect("a record");
    assert_eq!(record.name.as_deref(), Some(second.as_str()), "the last good copy is still known");
    assert!(record.failing_zh.as_deref().is_some_and(|f| f.contains("读不出来")), "{record:?}");
}
