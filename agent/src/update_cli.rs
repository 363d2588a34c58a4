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

fn record(what: &str, version: &str, why: String) {
    let e = Event { at_ms: zhuli::assistant::now_ms(), what: what.into(), version: version.into(), why };
    if let Err(err) = boot::record(Path::new(boot::EVENTS), &e) {
        eprintln!("cannot write {}: {err}", boot::EVENTS);
    }
}

/// Survey the box and write it for the agent; `available` is a fetched release waiting.
fn write_survey(available: Option<String>) -> anyhow::Result<state::Survey> {
    let r = running()?;
    let mut disk = std::fs::File::open(&r.disk).with_context(|| format!("cannot open {}", r.disk.display()))?;
    let entries = Gpt::read(&mut disk, r.sector)?.entries();
    let mut survey = state::survey(Path::new(ESP), &entries, &r.version.to_string(), zhuli::assistant::now_ms());
    survey.available = available;
    state::write(Path::new(state::SURVEY), &survey).with_context(|| format!("cannot write {}", state::SURVEY))?;
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
    let result = (|| -> anyhow::Result<install::Installed> {
        let r = running()?;
        let key = vendor_key()?;
        let target = install::Target {
            disk: &r.disk,
            sector: r.sector,
            esp: Path::new(ESP),
            running: &r.version,
            running_root_hash: &r.root_hash,
            vendor_key: &key,
            tries,
        };
        Ok(install::install(dir, &target, |line| println!("{line}"))?)
    })();
    match result {
        Ok(done) => {
            record("installed", &done.version.to_string(), String::new());
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
        Err(e) => {
            record("refused", &manifest_version(dir), format!("{e:#}"));
            Err(e)
        }
    }
}

/// The admin chat's request left by the agent: read once, then removed. A link or anything
/// that is not a short word is ignored.
fn take_request(path: &Path) -> Option<String> {
    use std::{io::Read, os::unix::fs::OpenOptionsExt};
    let mut f = std::fs::OpenOptions::new().read(true).custom_flags(libc_o_nofollow()).open(path).ok()?;
    let mut text = String::new();
    let _ = f.by_ref().take(64).read_to_string(&mut text);
    let _ = std::fs::remove_file(path);
    let word = text.trim().to_owned();
    matches!(word.as_str(), "install" | "rollback" | "check").then_some(word)
}

fn libc_o_nofollow() -> i32 {
    nix::fcntl::OFlag::O_NOFOLLOW.bits()
}

/// `zhuli update pull`.
pub fn pull(config_path: &Path, now: bool, request_path: &Path, downloads: &Path) -> anyhow::Result<()> {
    let request = take_request(request_path);
    if request.as_deref() == Some("rollback") {
        return rollback(true);
    }
    let survey = write_survey(None)?;
    let config = match std::fs::read_to_string(config_path) {
        Ok(text) => pull::ForUpdates::parse(&text).map_err(anyhow::Error::msg)?,
        Err(_) => pull::ForUpdates::default(),
    };
    let settings = config.update.clone();
    if settings.source.is_empty() {
        println!("release {}: no [update] source, so releases come from the stick only", survey.running);
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
            // A refusal (signature, sha256, product, downgrade) is news for the admins; a
            // network hiccup is tried again next hour, and told only when an admin asked.
            if !matches!(e, pull::PullError::Bundle(_) | pull::PullError::Damaged { .. }) {
                if request.is_some() {
                    record("failed", "?", e.to_string());
                }
            } else {
                let offered = match &e {
                    pull::PullError::Bundle(zhuli::update::BundleError::Downgrade { offered, .. }) => {
                        offered.to_string()
                    }
                    _ => "?".into(),
                };
                record("refused", &offered, e.to_string());
            }
            return Err(e.into());
        }
    };
    let (version, dir) = match found {
        pull::Found::UpToDate(v) => {
            println!("release {} runs; the release folder offers {v}: nothing to do", r.version);
            if request.is_some() {
                record("uptodate", &v.to_string(), String::new());
            }
            return Ok(());
        }
        pull::Found::Fetched { version, dir } => (version, dir),
    };
    let announced =
        boot::events(Path::new(boot::EVENTS)).iter().any(|e| e.what == "available" && e.version == version.to_string());
    if !announced {
        record("available", &version.to_string(), String::new());
    }
    let window: pull::Window = settings.window.parse().map_err(anyhow::Error::msg)?;
    let offset = config.utc_offset_minutes;
    let asked = request.as_deref() == Some("install");
    if now || asked || window.contains(zhuli::assistant::now_ms(), offset) {
        install(&dir, settings.tries, true)
    } else {
        write_survey(Some(version.to_string()))?;
        println!("release {version} fetched; it installs in the window {:?} or at /update install", settings.window);
        Ok(())
    }
}

/// `zhuli update rollback`.
pub fn rollback(and_reboot: bool) -> anyhow::Result<()> {
    let survey = write_survey(None)?;
    match state::rollback(Path::new(ESP), &survey) {
        Ok(previous) => {
            record("rollback", &previous, format!("asked to go back from {}", survey.running));
            write_survey(None)?;
            println!("release {previous} boots next, on trial; {} stays on the box", survey.running);
            if and_reboot {
                reboot();
            }
            Ok(())
        }
        Err(e) => {
            record("refused", &survey.running, format!("rollback: {e}"));
            Err(e.into())
        }
    }
}

/// `zhuli update survey`.
pub fn survey() -> anyhow::Result<()> {
    let s = write_survey(None)?;
    println!("{}", serde_json::to_string_pretty(&s)?);
    Ok(())
}

/// `zhuli update boot-check`: the judge of a release on trial (see `update::boot`).
pub fn boot_check(hold: Option<u64>, within: Option<u64>, config: &Path, socket: &Path) -> anyhow::Result<()> {
    let version = running_version().map(|v| v.to_string()).unwrap_or_else(|_| "unknown".into());
    if !config.exists() {
        println!("release {version}: no configuration yet, so booting is enough; keeping it");
        record("good", &version, String::new());
        return Ok(());
    }
    let settings = std::fs::read_to_string(config)
        .ok()
        .and_then(|t| pull::ForUpdates::parse(&t).ok())
        .map(|f| f.update)
        .unwrap_or_default();
    let hold = hold.unwrap_or(settings.healthy_for_s);
    let within = within.unwrap_or(settings.healthy_within_s);
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
            record("good", &version, String::new());
            Ok(())
        }
        Verdict::Bad(why) => {
            eprintln!("release {version} is bad: {why}; going back to the previous release");
            record("bad", &version, why.clone());
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
