//! `zhuli update install|pull|rollback|survey|boot-check`: the box's side of updates, run as
//! root by zhuli-update.service and zhuli-boot-check.service. See `zhuli::update`.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use zhuli::{
    provision::sign::{self, Role},
    update::{
        Version,
        boot::{self, Event, Limits, Probe, Verdict},
        gpt::Gpt,
        install, pull, state,
    },
};

const OS_RELEASE: &str = "/etc/os-release";
const VENDOR_KEY: &str = "/usr/share/zhuli/vendor.pub";
const ESP: &str = "/efi";

/// What the running box is: its release, its root hash, its boot disk.
struct Running {
    version: Version,
    root_hash: String,
    disk: PathBuf,
    sector: u64,
}

fn running_version() -> anyhow::Result<Version> {
    let text = std::fs::read_to_string(OS_RELEASE).with_context(|| format!("cannot read {OS_RELEASE}"))?;
    let v = boot::running_version(&text)
        .context("/etc/os-release has no IMAGE_VERSION: this is not a zhuli image that takes updates")?;
    v.parse().map_err(anyhow::Error::msg)
}

fn running() -> anyhow::Result<Running> {
    let version = running_version()?;
    let cmdline = std::fs::read_to_string("/proc/cmdline").context("cannot read /proc/cmdline")?;
    let root_hash = install::running_root_hash(&cmdline).context(
        "the running kernel has no roothash= on its command line: this box is not laid out for updates; flash the current image once",
    )?;
    let (disk, sector) = install::boot_disk(&root_hash)?;
    Ok(Running { version, root_hash, disk, sector })
}

fn vendor_key() -> anyhow::Result<String> {
    let text = std::fs::read_to_string(VENDOR_KEY).with_context(|| {
        format!("this image has no vendor key ({VENDOR_KEY}), so it installs no update; flash an image built with ZHULI_VENDOR_KEY")
    })?;
    Ok(sign::public_key_for(Role::Vendor, &text, VENDOR_KEY)?)
}

fn record(what: &str, version: &str, code: &str, why: String) {
    record_event(Event {
        at_ms: zhuli::clock::now_ms(),
        what: what.into(),
        version: version.into(),
        why,
        code: code.into(),
        from: String::new(),
    });
}

fn record_event(e: Event) {
    if let Err(err) = boot::record(&boot::events_path(), &e) {
        eprintln!("cannot write {}: {err}", boot::events_path().display());
    }
}

/// Survey the box and write it for the agent; `available` is a fetched release waiting.
fn write_survey(available: Option<String>) -> anyhow::Result<state::Survey> {
    let r = running()?;
    let mut disk = std::fs::File::open(&r.disk).with_context(|| format!("cannot open {}", r.disk.display()))?;
    let entries = Gpt::read(&mut disk, r.sector)?.entries();
    let mut survey = state::survey(Path::new(ESP), &entries, &r.version.to_string(), zhuli::clock::now_ms());
    survey.available = available;
    state::write(&state::survey_path(), &survey)
        .with_context(|| format!("cannot write {}", state::survey_path().display()))?;
    Ok(survey)
}

fn reboot() {
    println!("rebooting");
    let _ = std::process::Command::new("systemctl").arg("reboot").status();
}

fn manifest_version(dir: &Path) -> String {
    std::fs::read_to_string(dir.join(zhuli::update::MANIFEST))
        .ok()
        .and_then(|t| t.lines().find_map(|l| l.strip_prefix("version = ").map(|v| v.trim_matches('"').to_owned())))
        .unwrap_or_else(|| "?".into())
}

/// `zhuli update install DIR`.
pub fn install(dir: &Path, tries: u32, and_reboot: bool) -> anyhow::Result<()> {
    let result = (|| -> Result<install::Installed, (&'static str, anyhow::Error)> {
        let r = running().map_err(|e| ("write", e))?;
        let key = vendor_key().map_err(|e| ("write", e))?;
        let efivars = Path::new(state::EFIVARS);
        let db = match state::SecureBoot::read(efivars) {
            state::SecureBoot::On => zhuli::update::firmware::db_certificates(efivars).filter(|c| !c.is_empty()),
            _ => None,
        };
        let target = install::Target {
            disk: &r.disk,
            sector: r.sector,
            esp: Path::new(ESP),
            running: &r.version,
            running_root_hash: &r.root_hash,
            vendor_key: &key,
            tries,
            secure_boot_db: db.as_deref(),
        };
        install::install(dir, &target, |line| println!("{line}")).map_err(|e| (e.code(), e.into()))
    })();
    match result {
        Ok(done) => {
            record("installed", &done.version.to_string(), "", String::new());
            if let Err(e) = write_survey(None) {
                eprintln!("{e:#}");
            }
            println!(
                "release {} installed into partitions {} and {}; it runs after the next reboot",
                done.version, done.slot.0, done.slot.1
            );
            if and_reboot {
                reboot();
            }
            Ok(())
        }
        Err((code, e)) => {
            record("refused", &manifest_version(dir), code, format!("{e:#}"));
            Err(e)
        }
    }
}

/// The admin chat's request left by the agent: read once and removed, whatever it is. Only a
/// regular file holding one of the words counts: a link is not followed, a FIFO not waited on.
fn take_request(path: &Path) -> Option<String> {
    take_note(path, |w| matches!(w, "install" | "rollback" | "check"))
}

/// A note left for root, read once and removed, whatever it is; its word when it is a regular
/// file (no link followed, no FIFO waited on) whose trimmed text `ok` accepts.
fn take_note(path: &Path, ok: impl Fn(&str) -> bool) -> Option<String> {
    use nix::fcntl::OFlag;
    use std::{io::Read, os::unix::fs::OpenOptionsExt};
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags((OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_NOCTTY).bits())
        .open(path);
    let _ = std::fs::remove_file(path);
    let f = opened.ok()?;
    if !f.metadata().is_ok_and(|m| m.file_type().is_file()) {
        return None;
    }
    let mut text = String::new();
    let _ = f.take(64).read_to_string(&mut text);
    let word = text.trim().to_owned();
    ok(&word).then_some(word)
}

/// When the agent last took a snapshot of the store for an update (its note), Unix ms.
fn snapshot_taken(note: &Path) -> Option<i64> {
    use std::{io::Read, os::unix::fs::OpenOptionsExt};
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags((nix::fcntl::OFlag::O_NOFOLLOW | nix::fcntl::OFlag::O_NONBLOCK).bits())
        .open(note)
        .ok()?;
    if !f.metadata().is_ok_and(|m| m.file_type().is_file()) {
        return None;
    }
    let mut text = String::new();
    f.take(32).read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

/// Why a fetched release must not install by itself in the window (it still does when an
/// admin asks): it was found bad on this box, or an admin went back from it; or the agent has
/// taken no snapshot of the store since it arrived.
fn hold_back(events: &[Event], version: &str, snapshot: Option<i64>) -> Option<(&'static str, String)> {
    if let Some(e) = events
        .iter()
        .rev()
        .find(|e| (e.what == "bad" && e.version == version) || (e.what == "rollback" && e.from == version))
    {
        let how = if e.what == "bad" { "was found bad" } else { "was left by a rollback" };
        return Some((
            "was_bad",
            format!("release {version} {how} on this box; it installs again only at /update install"),
        ));
    }
    let arrived = events.iter().rev().find(|e| e.what == "available" && e.version == version).map(|e| e.at_ms)?;
    if snapshot.is_none_or(|at| at < arrived) {
        return Some((
            "no_snapshot",
            format!("release {version} waits for the agent's snapshot of the store, taken before every update"),
        ));
    }
    None
}

/// `zhuli update pull`.
pub fn pull(
    config_path: &Path,
    now: bool,
    request_path: &Path,
    snapshot_note: &Path,
    stick_staged: &Path,
    downloads: &Path,
) -> anyhow::Result<()> {
    let request = take_request(request_path);
    if request.as_deref() == Some("rollback") {
        return rollback(true);
    }
    let survey = write_survey(None)?;
    let (config, configured) = match std::fs::read_to_string(config_path) {
        Ok(text) => (pull::ForUpdates::parse(&text).map_err(anyhow::Error::msg)?, true),
        Err(_) => (pull::ForUpdates::default(), false),
    };
    let settings = config.update.clone();
    // A release from the stick first: someone stood at the box for it.
    let staged = stick_staged.join(zhuli::update::stick::REQUEST);
    if let Some(version) = take_note(&staged, |w| w.parse::<Version>().is_ok()) {
        return install_staged(stick_staged, &version, snapshot_note, configured, settings.tries);
    }
    if settings.source.is_empty() {
        println!("release {}: no [update] source, so releases come from the stick only", survey.running);
        if request.is_some() {
            record("failed", "?", "no_source", "no [update] source is configured".into());
        }
        return Ok(());
    }
    if let Some(pem) = config.extra_ca_pem.as_deref() {
        zhuli::dingtalk::http::trust_extra_roots(pem).map_err(anyhow::Error::msg)?;
    }
    let r = running()?;
    let key = vendor_key()?;
    let client = zhuli::dingtalk::http::HttpClient::new(zhuli::dingtalk::http::tls_config(), Duration::from_secs(30));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let found = rt.block_on(pull::fetch(&client, &settings.source, &key, &r.version, downloads, |l| println!("{l}")));
    let found = match found {
        Ok(f) => f,
        Err(e) => {
            // A refusal (signature, sha256, product, downgrade) is news for the admins, once;
            // a network hiccup or a full disk is tried again next hour, and told only when an
            // admin asked.
            if !e.is_refusal() {
                if request.is_some() {
                    record("failed", "?", e.code(), e.to_string());
                }
            } else {
                let offered = match &e {
                    pull::PullError::Bundle(zhuli::update::BundleError::Downgrade { offered, .. }) => {
                        offered.to_string()
                    }
                    _ => "?".into(),
                };
                let why = e.to_string();
                let told = boot::events(&boot::events_path())
                    .iter()
                    .rev()
                    .find(|ev| ev.what == "refused")
                    .is_some_and(|ev| ev.why == why);
                if !told || request.is_some() {
                    record("refused", &offered, e.code(), why);
                }
            }
            return Err(e.into());
        }
    };
    let (version, dir) = match found {
        pull::Found::UpToDate(v) => {
            println!("release {} runs; the release folder offers {v}: nothing to do", r.version);
            if request.is_some() {
                record("uptodate", &v.to_string(), "", String::new());
            }
            return Ok(());
        }
        pull::Found::Fetched { version, dir } => (version, dir),
    };
    let v = version.to_string();
    let events = boot::events(&boot::events_path());
    if !events.iter().any(|e| e.what == "available" && e.version == v) {
        record("available", &v, "", String::new());
    }
    let window: pull::Window = settings.window.parse().map_err(anyhow::Error::msg)?;
    let offset = config.utc_offset_minutes;
    // The agent took its snapshot right before it asked.
    let asked = request.as_deref() == Some("install");
    if now || asked {
        return install(&dir, settings.tries, true);
    }
    let events = boot::events(&boot::events_path());
    let held = if configured { hold_back(&events, &v, snapshot_taken(snapshot_note)) } else { None };
    let in_window = window.contains(zhuli::clock::now_ms(), offset);
    if let Some((code, why)) = &held {
        println!("{why}");
        // Told once, and only when it keeps the release from its window.
        if in_window && *code == "no_snapshot" && !events.iter().any(|e| e.what == "waiting" && e.version == v) {
            record("waiting", &v, code, why.clone());
        }
    }
    if held.is_none() && in_window {
        install(&dir, settings.tries, true)
    } else {
        write_survey(Some(v.clone()))?;
        println!("release {v} fetched; it installs in the window {:?} or at /update install", settings.window);
        Ok(())
    }
}

/// Written onto the stick beside the receipt: what became of the release in its `update/`
/// folder.
const STICK_NOTE: &str = "zhuli-update.txt";

/// The version the manifest in the stick's `update/` folder names, as far as it can be read.
fn stick_manifest_version(device: &Path) -> String {
    use zhuli::provision::stick;
    let mut m = Vec::new();
    if stick::copy_from_folder(device, stick::UPDATE_DIR, zhuli::update::MANIFEST, &mut m, 1 << 20).is_err() {
        return "?".into();
    }
    String::from_utf8_lossy(&m)
        .lines()
        .find_map(|l| l.strip_prefix("version = ").map(|v| v.trim_matches('"').to_owned()))
        .unwrap_or_else(|| "?".into())
}

/// At a stick's insertion (`zhuli provision import`, root): take the release in its `update/`
/// folder, if any, into the provisioning root for zhuli-update.service (see `update::stick`).
/// What came of it goes into the update journal (the admin chat hears it) and onto the stick.
pub fn from_stick(device: &Path, root: &Path) {
    use zhuli::update::stick::{self, Staged};
    // No update folder, or not a stick of ours (the configuration import says why): nothing to
    // take and nothing to tell.
    match zhuli::provision::stick::list_folder(device, zhuli::provision::stick::UPDATE_DIR) {
        Ok(files) if !files.is_empty() => {}
        _ => return,
    }
    let staged = (|| -> Result<Staged, (&'static str, String)> {
        let key = vendor_key().map_err(|e| ("malformed", format!("{e:#}")))?;
        let running = running_version().map_err(|e| ("malformed", format!("{e:#}")))?;
        stick::stage(device, root, &key, &running).map_err(|e| (e.code(), e.to_string()))
    })();
    let line = match staged {
        Ok(Staged::Nothing) => return,
        Ok(Staged::UpToDate(v)) => {
            record("uptodate", &v.to_string(), "", "from the stick".into());
            format!("release {v} on this stick runs on the box already; nothing to do")
        }
        Ok(Staged::Ready { version, .. }) => format!(
            "release {version} was copied from this stick and checked (signature, every sha256); the box installs it now and restarts, and keeps it only if the assistant is healthy on it (the admin chat hears how it went)"
        ),
        Err((code, why)) => {
            record("refused", &stick_manifest_version(device), code, format!("from the stick: {why}"));
            format!("the release on this stick was refused, nothing was installed: {why}")
        }
    };
    println!("update: {line}");
    let text = format!("zhuli update from this stick\ntime: {}\nresult: {line}\n", zhuli::provision::utc_now());
    if let Err(e) = zhuli::provision::stick::write(device, &[(STICK_NOTE, text.as_bytes())], false) {
        eprintln!("the update note could not be written to the stick: {e}");
    }
}

/// Wait, at most `limit`, for the agent's snapshot of the store taken after `since` (Unix ms).
fn wait_for_snapshot(note: &Path, since: i64, limit: Duration) -> bool {
    let start = Instant::now();
    loop {
        if snapshot_taken(note).is_some_and(|at| at >= since) {
            return true;
        }
        if start.elapsed() >= limit {
            return false;
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// How long a release from the stick waits for the agent's snapshot.
const SNAPSHOT_WAIT: Duration = Duration::from_secs(300);

/// A release staged from the stick (`update::stick`): the agent snapshots the store (it hears
/// the `stick` event), then the release is installed and the box restarts into it.
fn install_staged(
    staged: &Path,
    version: &str,
    snapshot_note: &Path,
    configured: bool,
    tries: u32,
) -> anyhow::Result<()> {
    let dir = staged.join(version);
    let at = zhuli::clock::now_ms();
    record("stick", version, "", String::new());
    if configured && !wait_for_snapshot(snapshot_note, at, SNAPSHOT_WAIT) {
        println!(
            "release {version}: no snapshot of the store from the agent within {} s; installing all the same (someone stood at the box for it)",
            SNAPSHOT_WAIT.as_secs()
        );
    }
    let done = install(&dir, tries, true);
    let _ = std::fs::remove_dir_all(&dir);
    done
}

/// `zhuli update rollback`.
pub fn rollback(and_reboot: bool) -> anyhow::Result<()> {
    let survey = write_survey(None)?;
    match state::rollback(Path::new(ESP), &survey) {
        Ok(previous) => {
            record_event(Event {
                at_ms: zhuli::clock::now_ms(),
                what: "rollback".into(),
                version: previous.clone(),
                why: format!("asked to go back from {}", survey.running),
                code: String::new(),
                from: survey.running.clone(),
            });
            write_survey(None)?;
            println!("release {previous} boots next, on trial; {} stays on the box", survey.running);
            if and_reboot {
                reboot();
            }
            Ok(())
        }
        Err(e) => {
            let code = if survey.previous().is_none() { "no_previous" } else { e.code() };
            record("rollback_refused", &survey.running, code, e.to_string());
            Err(e.into())
        }
    }
}

/// `zhuli update survey`.
pub fn survey() -> anyhow::Result<()> {
    let s = write_survey(None)?;
    for version in boot::never_started(&s, &boot::events(&boot::events_path())) {
        let why = format!(
            "its kernel image did not start (refused by Secure Boot, or the kernel failed before the system came up); release {} runs",
            s.running
        );
        eprintln!("release {version}: {why}");
        record("bad", &version, "no_boot", why);
    }
    println!("{}", serde_json::to_string_pretty(&s)?);
    Ok(())
}

/// `zhuli update boot-check`: the judge of a release on trial (see `update::boot`).
pub fn boot_check(hold: Option<u64>, within: Option<u64>, config: &Path, socket: &Path) -> anyhow::Result<()> {
    let version = running_version().map(|v| v.to_string()).unwrap_or_else(|_| "unknown".into());
    if !config.exists() {
        println!("release {version}: no configuration yet, so booting is enough; keeping it");
        record("good", &version, "", String::new());
        return Ok(());
    }
    let settings = std::fs::read_to_string(config)
        .ok()
        .and_then(|t| pull::ForUpdates::parse(&t).ok())
        .map(|f| f.update)
        .unwrap_or_default();
    // Within the unit's start timeout (15 min), whatever the configuration says: the check
    // must end by itself, not be killed by systemd half-way.
    let within = within.unwrap_or(settings.healthy_within_s).min(pull::HEALTHY_WITHIN_MAX_S);
    let hold = hold.unwrap_or(settings.healthy_for_s).min(within.saturating_sub(5));
    let limits =
        Limits { hold: Duration::from_secs(hold), within: Duration::from_secs(within), every: Duration::from_secs(5) };
    let started = Instant::now();
    let verdict = boot::judge(limits, |at| {
        if let Some(wait) = at.checked_sub(started.elapsed()) {
            std::thread::sleep(wait);
        }
        let mut probe = Probe { state: String::new(), result: String::new(), restarts: 0, status: Err(String::new()) };
        if let Ok(out) = std::process::Command::new("systemctl")
            .args(["show", "zhuli.service", "--property=ActiveState,Result,NRestarts"])
            .output()
        {
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                match line.split_once('=') {
                    Some(("ActiveState", v)) => probe.state = v.into(),
                    Some(("Result", v)) => probe.result = v.into(),
                    Some(("NRestarts", v)) => probe.restarts = v.parse().unwrap_or(0),
                    _ => {}
                }
            }
        }
        probe.status = zhuli::health::status::fetch(socket).map(|s| s.hung_tasks).map_err(|e| e.to_string());
        probe
    });
    match verdict {
        Verdict::Good => {
            println!("release {version}: the agent was healthy for {hold}s; keeping it");
            record("good", &version, "", String::new());
            Ok(())
        }
        Verdict::Bad(code, why) => {
            eprintln!("release {version} is bad: {why}; going back to the previous release");
            record("bad", &version, code, why.clone());
            // Out of tries at once, then a reboot: the boot loader starts the previous release.
            let marked = std::process::Command::new("/usr/lib/systemd/systemd-bless-boot").arg("bad").status();
            if !marked.as_ref().is_ok_and(|s| s.success()) {
                eprintln!("systemd-bless-boot bad failed ({marked:?}); the remaining tries run out boot by boot");
            }
            let _ = write_survey(None);
            reboot();
            anyhow::bail!("release {version} is bad: {why}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp() -> PathBuf {
        let p = std::env::temp_dir().join(format!("zhuli-ucli-{}-{:x}", std::process::id(), rand::random::<u32>()));
        std::fs::create_dir_all(&p).expect("tmp");
        p
    }

    #[test]
    fn a_request_is_taken_once_and_only_as_a_plain_file() {
        let dir = tmp();
        let req = dir.join("request");
        std::fs::write(&req, "install\n").expect("write");
        assert_eq!(take_request(&req).as_deref(), Some("install"));
        assert!(!req.exists(), "a request is removed once read");
        assert_eq!(take_request(&req), None);
        // Not one of the words: removed, ignored.
        std::fs::write(&req, "rm -rf /").expect("write");
        assert_eq!(take_request(&req), None);
        assert!(!req.exists());
        // A link to a file root could read: not followed, removed.
        std::fs::write(dir.join("target"), "rollback").expect("write");
        std::os::unix::fs::symlink(dir.join("target"), &req).expect("link");
        assert_eq!(take_request(&req), None);
        assert!(!req.exists() && dir.join("target").exists());
        // A FIFO: not waited on (the read would block for ever), removed.
        nix::unistd::mkfifo(&req, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("fifo");
        assert_eq!(take_request(&req), None);
        assert!(!req.exists());
        // The snapshot note: a number, from a plain file only.
        let note = dir.join("snapshot");
        assert_eq!(snapshot_taken(&note), None);
        std::fs::write(&note, "1790000000000\n").expect("write");
        assert_eq!(snapshot_taken(&note), Some(1_790_000_000_000));
        std::fs::remove_dir_all(&dir).expect("clean");
    }

    fn ev(what: &str, version: &str, at_ms: i64, from: &str) -> Event {
        Event {
            at_ms,
            what: what.into(),
            version: version.into(),
            why: String::new(),
            code: String::new(),
            from: from.into(),
        }
    }

    #[test]
    fn a_bad_or_left_release_and_one_without_a_snapshot_wait_for_an_admin() {
        let arrived = vec![ev("available", "1.2.0", 1000, "")];
        // A snapshot after it arrived: free to go in the window; none, or an older one: held.
        assert_eq!(hold_back(&arrived, "1.2.0", Some(2000)), None);
        assert_eq!(hold_back(&arrived, "1.2.0", None).map(|h| h.0), Some("no_snapshot"));
        assert_eq!(hold_back(&arrived, "1.2.0", Some(999)).map(|h| h.0), Some("no_snapshot"));
        // Found bad once: held whatever the snapshot says; another version is not.
        let mut bad = arrived.clone();
        bad.extend([ev("installed", "1.2.0", 3000, ""), ev("bad", "1.2.0", 4000, "")]);
        assert_eq!(hold_back(&bad, "1.2.0", Some(5000)).map(|h| h.0), Some("was_bad"));
        let mut next = bad.clone();
        next.push(ev("available", "1.2.1", 6000, ""));
        assert_eq!(hold_back(&next, "1.2.1", Some(7000)), None);
        // An admin went back from it.
        let mut left = arrived.clone();
        left.push(ev("rollback", "1.1.0", 3000, "1.2.0"));
        assert_eq!(hold_back(&left, "1.2.0", Some(5000)).map(|h| h.0), Some("was_bad"));
    }
}
