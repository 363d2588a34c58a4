//! The appliance image booted under qemu (UEFI, headless): it imports a configuration stick,
//! starts the agent under the real `zhuli.service`, answers through the gateway simulator,
//! writes, undoes and refuses files in the configured shared folder, stops a plugin that
//! fork-bombs or fills its home while answering `/ping`, listens on nothing, survives a hung
//! agent through the watchdog, and keeps its conversation across a reboot.
//!
//! Run by `tests/boot/run` (from `.ci/run`) with `ZHULI_BOOT_IMAGE` pointing at a built
//! `zhuli.img`; ignored in the ordinary test run. The guest reaches the host only through qemu's
//! user networking with `restrict=on` and one `guestfwd` per service, each to a TLS front on the
//! host's loopback (the agent speaks TLS to anything that is not its own loopback). A test-only
//! probe unit comes in as a systemd credential over SMBIOS (honoured in VMs only), so the image
//! under test is the shipped one; it runs the commands the test sends over a virtio-serial port.

use std::{
    io::{BufRead, BufReader, Write},
    net::SocketAddr,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::net::TcpListener;
use zhuli::provision::stick;
use zhuli_sim::{
    dingtalk::{Inject, SimConfig, Simulator},
    llm::{LlmSim, Scripted},
};

use crate::support::{self, calls, code_in};

pub(crate) const API_IP: &str = "10.0.2.100";
pub(crate) const WS_IP: &str = "10.0.2.101";
pub(crate) const LLM_IP: &str = "10.0.2.102";
/// The vendor's release folder, as the box sees it (the update test).
pub(crate) const RELEASES_IP: &str = "10.0.2.103";
const MACHINE_UUID: &str = "5a48554c-0b00-4e57-9a11-7e57b0070001";
pub(crate) const ADMIN: &str = "boot-admin";
/// The group the agent tells its admins in.
pub(crate) const ADMIN_CHAT: &str = "cid-boot-admins";
/// The hostile plugin's script, put on the box before the stick (tests/boot/mcp.sh).
const PLUGIN_DIR: &str = "/var/lib/zhuli-test";

/// Send `text` as the admin and wait for the one reply; its text and how long it took.
pub(crate) async fn ask(sim: &Simulator, text: &str) -> (String, Duration) {
    ask_as(sim, ADMIN, text).await
}

/// [`ask`] as `staff`.
pub(crate) async fn ask_as(sim: &Simulator, staff: &str, text: &str) -> (String, Duration) {
    let asked = Instant::now();
    let id = sim.inject(Inject { sender_staff_id: staff.into(), ..Inject::text(text) });
    let got = sim.wait_until(Duration::from_secs(120), |s| !support::replies_to(s, &id).is_empty()).await;
    assert!(got, "no reply to {text:?}");
    (support::replies_to(sim, &id).remove(0).text, asked.elapsed())
}

/// Messages the agent sent to the admin chat.
pub(crate) fn to_admins(sim: &Simulator) -> Vec<String> {
    sim.replies().into_iter().filter(|r| r.conversation_id.as_deref() == Some(ADMIN_CHAT)).map(|r| r.text).collect()
}

pub(crate) fn s(p: &Path) -> String {
    p.display().to_string()
}

/// A CA and a server certificate for the forwarded addresses.
pub(crate) struct Tls {
    pub(crate) ca_pem: String,
    pub(crate) acceptor: tokio_rustls::TlsAcceptor,
}

pub(crate) fn tls() -> Tls {
    tls_for(&[API_IP, WS_IP, LLM_IP, RELEASES_IP])
}

/// [`tls`] with a server certificate for these IP addresses.
pub(crate) fn tls_for(ips: &[&str]) -> Tls {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
    let ca_key = KeyPair::generate().expect("ca key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "zhuli boot test CA");
    let ca_cert = ca_params.self_signed(&ca_key).expect("ca cert");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().expect("server key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("server params");
    params.subject_alt_names = ips.iter().map(|ip| SanType::IpAddress(ip.parse().expect("ip"))).collect();
    let cert = params.signed_by(&key, &issuer).expect("server cert");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).expect("key der"),
        )
        .expect("server config");
    Tls { ca_pem: ca_cert.pem(), acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)) }
}

/// A TLS front on loopback that hands each connection's plain bytes to `to`.
pub(crate) async fn tls_front(acceptor: tokio_rustls::TlsAcceptor, to: SocketAddr) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind front");
    let addr = listener.local_addr().expect("front addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                let Ok(mut plain) = tokio::net::TcpStream::connect(to).await else { return };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    addr
}

/// The probe script, its unit and the drop-in that starts it, as SMBIOS type 11 credentials.
/// The script runs each line it reads from the virtio port and ends its output with a marker.
fn probe_credentials() -> Vec<String> {
    let script = "while [ ! -e /dev/virtio-ports/zhuli.probe ]; do sleep 0.2; done\n\
                  exec <>/dev/virtio-ports/zhuli.probe >&0 2>&0\n\
                  echo @@ready\n\
                  while IFS= read -r line; do sh -c \"$line\" </dev/null; echo \"@@done $?\"; done\n";
    let unit = "[Unit]\nDescription=boot test probe\nAfter=sysinit.target\n\
                [Service]\nImportCredential=zhuli.probe\n\
                ExecStart=/bin/sh -c 'exec /bin/sh $${CREDENTIALS_DIRECTORY}/zhuli.probe'\nRestart=always\n";
    let dropin = "[Unit]\nWants=zhuli-probe.service\n";
    // qemu's option syntax: a comma in a value is written twice.
    let cred = |name: &str, value: &str| format!("io.systemd.credential:{name}={}", value.replace(',', ",,"));
    vec![
        cred("zhuli.probe", script),
        cred("systemd.extra-unit.zhuli-probe.service", unit),
        cred("systemd.unit-dropin.multi-user.target", dropin),
    ]
}

pub(crate) struct Guest {
    /// The qemu process; replaced when a power cycle is needed (`watch_resets`).
    qemu: Arc<std::sync::Mutex<Child>>,
    probe: PathBuf,
    console: PathBuf,
    monitor: PathBuf,
    pub(crate) started: Instant,
    conn: std::sync::Mutex<Option<(UnixStream, BufReader<UnixStream>)>>,
    next: std::sync::atomic::AtomicU64,
    /// Ends the watch over resets (`watch_resets`).
    watching: Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.watching.store(false, std::sync::atomic::Ordering::Relaxed);
        let mut qemu = self.qemu.lock().unwrap_or_else(|p| p.into_inner());
        let _ = qemu.kill();
        let _ = qemu.wait();
    }
}

impl Guest {
    /// The whole serial console so far, escape codes and carriage returns taken out.
    pub(crate) fn console_all(&self) -> String {
        let text = std::fs::read(&self.console).unwrap_or_default();
        let text = String::from_utf8_lossy(&text).replace('\r', "");
        let mut out = String::with_capacity(text.len());
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' {
                // CSI: ESC [ parameters final-byte.
                if chars.peek() == Some(&'[') {
                    chars.next();
                    for p in chars.by_ref() {
                        if p.is_ascii_alphabetic() {
                            break;
                        }
                    }
                }
                continue;
            }
            out.push(c);
        }
        out
    }

    pub(crate) fn console(&self) -> String {
        let text = std::fs::read(&self.console).unwrap_or_default();
        let text = String::from_utf8_lossy(&text);
        let tail: Vec<&str> = text.lines().rev().take(60).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// Run `command` in the guest through the probe; `None` if no answer came within `limit`
    /// (the probe not up yet, or the guest rebooting).
    pub(crate) fn run(&self, command: &str, limit: Duration) -> Option<(i32, String)> {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if conn.is_none() {
            let stream = UnixStream::connect(&self.probe).ok()?;
            let reader = BufReader::new(stream.try_clone().ok()?);
            *conn = Some((stream, reader));
        }
        let (writer, reader) = conn.as_mut()?;
        // One connection for the guest's life (qemu keeps it across reboots); each command
        // ends with its own marker, so a late answer to an earlier command is never taken.
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let sent = writeln!(writer, "( {command} ); echo \"@@end {id} $?\"");
        if sent.is_err() {
            *conn = None;
            return None;
        }
        let deadline = Instant::now() + limit;
        let mut out = String::new();
        let marker = format!("@@end {id} ");
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            reader.get_ref().set_read_timeout(Some(left.max(Duration::from_millis(10)))).ok()?;
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(0) => {
                    *conn = None;
                    return None;
                }
                Ok(_) => {}
                Err(_) => return None,
            }
            let line = line.trim_end_matches(['\r', '\n']);
            // Output without a final newline runs into the marker: keep what comes before it.
            if let Some(at) = line.find(&marker) {
                out.push_str(&line[..at]);
                return Some((line[at + marker.len()..].trim().parse().unwrap_or(-1), out));
            }
            if line.contains("@@end ") {
                // An earlier command's late end (it was sent while the guest rebooted): what came
                // before it was that command's output, not this one's.
                out.clear();
            } else if !line.starts_with("@@") {
                out.push_str(line);
                out.push('\n');
            }
        }
    }

    /// Run `command` until it succeeds (the probe may not be up yet), within `limit`.
    pub(crate) fn run_until_ok(&self, command: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            if let Some((0, out)) = self.run(command, Duration::from_secs(20)) {
                return out;
            }
            assert!(Instant::now() < deadline, "`{command}` did not succeed in {limit:?}; {}", self.diagnose());
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// What the guest says about itself (through the probe, if it is up), and the console.
    pub(crate) fn diagnose(&self) -> String {
        let inside = self
            .run(
                "systemctl --failed --no-pager; ls -lL /var/lib/zhuli-provisioning/current/ 2>&1; \
                 journalctl -b --no-pager -o short-monotonic -u 'zhuli*' | tail -n 60; \
                 ls -l /efi/EFI/Linux /var/lib/zhuli/update /var/lib/zhuli-update 2>&1",
                Duration::from_secs(30),
            )
            .map(|(_, out)| out)
            .unwrap_or_else(|| "(the probe did not answer)".into());
        format!("in the guest:\n{inside}\nconsole:\n{}", self.console())
    }

    /// Plug the configuration stick into the running guest (qemu's monitor).
    pub(crate) fn plug_stick(&self) {
        let mut monitor = UnixStream::connect(&self.monitor).expect("qemu monitor");
        writeln!(monitor, "device_add usb-storage,drive=stick,id=stickdev").expect("device_add");
        std::thread::sleep(Duration::from_millis(500));
    }

    /// Plug the file `path` into the running guest as a USB disk whose serial is `serial`
    /// (`/dev/disk/by-id/usb-QEMU_QEMU_HARDDISK_<serial>-0:0`).
    pub(crate) fn plug_file(&self, path: &Path, serial: &str) {
        let mut monitor = UnixStream::connect(&self.monitor).expect("qemu monitor");
        let id = serial.to_lowercase();
        writeln!(monitor, "drive_add 0 if=none,id={id},format=raw,readonly=on,file={}", s(path)).expect("drive_add");
        std::thread::sleep(Duration::from_millis(500));
        writeln!(monitor, "device_add usb-storage,drive={id},id={id}dev,serial={serial}").expect("device_add");
        std::thread::sleep(Duration::from_millis(500));
    }

    /// Press the reset button (qemu's monitor): what switching the box off and on does.
    pub(crate) fn reset(&self) {
        let mut monitor = UnixStream::connect(&self.monitor).expect("qemu monitor");
        writeln!(monitor, "system_reset").expect("system_reset");
        std::thread::sleep(Duration::from_millis(500));
    }

    /// Pull the stick out of the running guest.
    pub(crate) fn unplug_stick(&self) {
        let mut monitor = UnixStream::connect(&self.monitor).expect("qemu monitor");
        writeln!(monitor, "device_del stickdev").expect("device_del");
        std::thread::sleep(Duration::from_millis(1000));
    }

    /// Plug another stick, the image file `stick`, into the running guest as drive `id`.
    pub(crate) fn plug_other_stick(&self, stick: &Path, id: &str) {
        let mut monitor = UnixStream::connect(&self.monitor).expect("qemu monitor");
        writeln!(monitor, "drive_add 0 if=none,id={id},format=raw,file={}", s(stick)).expect("drive_add");
        std::thread::sleep(Duration::from_millis(500));
        writeln!(monitor, "device_add usb-storage,drive={id},id={id}dev").expect("device_add");
        std::thread::sleep(Duration::from_millis(500));
    }

    pub(crate) fn must(&self, command: &str) -> String {
        match self.run(command, Duration::from_secs(60)) {
            Some((0, out)) => out,
            other => panic!("`{command}` failed: {other:?}; {}", self.diagnose()),
        }
    }
}

pub(crate) fn accel() -> &'static str {
    // KVM only where a probe boot works (here it does not: guests fail with an internal error).
    match std::env::var("ZHULI_BOOT_ACCEL").as_deref() {
        Ok("kvm") => "kvm",
        _ => "tcg",
    }
}

/// Does this run expect Secure Boot (an image signed with ZHULI_SB_KEYS: tests/boot/run says so)?
pub(crate) fn secure_boot() -> bool {
    std::env::var("ZHULI_BOOT_SECURE_BOOT").as_deref() == Ok("1")
}

/// The firmware is OVMF with Secure Boot (its variables protected by SMM), starting in setup
/// mode with no keys, as a mini-PC whose keys were cleared: a signed image's systemd-boot enrolls
/// the keys on its ESP and resets, and from then on only signed kernel images start. An unsigned
/// image boots in setup mode, enforcing nothing.
pub(crate) fn start_guest(dir: &Path, disk: &Path, stick: &Path, fronts: &[(&str, SocketAddr)]) -> Guest {
    let vars = dir.join("vars.fd");
    std::fs::copy("/usr/share/OVMF/OVMF_VARS_4M.fd", &vars).expect("OVMF vars (package ovmf)");
    let probe = dir.join("probe.sock");
    let console = dir.join("console.log");
    let forward = |ip: &str, port: SocketAddr| format!("guestfwd=tcp:{ip}:443-cmd:socat STDIO TCP:{port}");
    let forwards: Vec<String> = fronts.iter().map(|(ip, port)| forward(ip, *port)).collect();
    let netdev = format!("user,id=net0,restrict=on,{}", forwards.join(","));
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args([
        "-machine",
        "q35,smm=on",
        "-accel",
        accel(),
        "-m",
        "1024",
        "-smp",
        "2",
        "-nographic",
        "-no-user-config",
    ])
    .args(["-global", "driver=cfi.pflash01,property=secure,value=on", "-global", "ICH9-LPC.disable_s3=1"])
    .args(["-uuid", MACHINE_UUID])
    .args(["-drive", "if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.secboot.fd"])
    .args(["-drive", &format!("if=pflash,format=raw,file={}", s(&vars))])
    .args(["-drive", &format!("if=virtio,format=qcow2,file={}", s(disk))])
    // The stick's drive exists from the start; the USB device is plugged in later (`plug_stick`).
    .args(["-device", "qemu-xhci", "-drive", &format!("if=none,id=stick,format=raw,file={}", s(stick))])
    .args(["-monitor", &format!("unix:{},server=on,wait=off", s(&dir.join("monitor.sock")))])
    .args(["-netdev", &netdev, "-device", "virtio-net-pci,netdev=net0"])
    .args(["-device", "i6300esb", "-action", "watchdog=reset"])
    .args(["-chardev", &format!("socket,id=probe,path={},server=on,wait=off", s(&probe))])
    .args(["-device", "virtio-serial-pci", "-device", "virtserialport,chardev=probe,name=zhuli.probe"])
    // Appended to, so a power cycle (`watch_resets`) keeps what was said before it.
    .args(["-chardev", &format!("file,id=serial0,append=on,path={}", s(&console))])
    .args(["-serial", "chardev:serial0"]);
    for cred in probe_credentials() {
        qemu.args(["-smbios", &format!("type=11,value={cred}")]);
    }
    let args: Vec<std::ffi::OsString> = qemu.get_args().map(ToOwned::to_owned).collect();
    let qemu = Arc::new(std::sync::Mutex::new(spawn_qemu(&args)));
    let watching = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let (c, q, w) = (console.clone(), qemu.clone(), watching.clone());
    std::thread::spawn(move || watch_resets(&c, &q, &args, &w));
    Guest {
        qemu,
        probe,
        console,
        monitor: dir.join("monitor.sock"),
        started: Instant::now(),
        conn: Default::default(),
        next: Default::default(),
        watching,
    }
}

fn spawn_qemu(args: &[std::ffi::OsString]) -> Child {
    Command::new("qemu-system-x86_64")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("qemu-system-x86_64 (package qemu-system-x86)")
}

/// Under TCG, OVMF with SMM now and then stops for good right after a reset, before it prints
/// its first line, and stays stopped through further resets; a new qemu process on the same
/// disk and firmware variables starts normally. (The firmware of a real box does not run under
/// TCG.) So a reset whose firmware has said nothing within 30 s ends in a power cycle:
/// qemu is started again, and that is said on the test's output. Devices plugged in through the
/// monitor are not plugged in again.
fn watch_resets(
    console: &Path,
    qemu: &std::sync::Mutex<Child>,
    args: &[std::ffi::OsString],
    watching: &std::sync::atomic::AtomicBool,
) {
    const RESETS: [&str; 3] = ["reboot: Restarting system", "rebooting the system now!", "Rebooting in "];
    let mut last: Option<(usize, Instant)> = None;
    while watching.load(std::sync::atomic::Ordering::Relaxed) {
        std::thread::sleep(Duration::from_secs(2));
        let text = std::fs::read(console).unwrap_or_default();
        let text = String::from_utf8_lossy(&text);
        let Some(at) = RESETS.iter().filter_map(|m| text.rfind(m)).max() else { continue };
        match last {
            Some((seen, since)) if seen == at => {
                // The firmware's first words are a screen clear (an escape sequence).
                let silent = !text[at..].contains('\u{1b}') && !text[at..].contains("BdsDxe");
                if silent && since.elapsed() > Duration::from_secs(30) {
                    eprintln!(
                        "boot: the firmware said nothing for 30 s after a reset (OVMF with SMM under TCG); power cycle"
                    );
                    let mut q = qemu.lock().unwrap_or_else(|p| p.into_inner());
                    if !watching.load(std::sync::atomic::Ordering::Relaxed) {
                        return;
                    }
                    let _ = q.kill();
                    let _ = q.wait();
                    *q = spawn_qemu(args);
                    last = Some((at, Instant::now()));
                }
            }
            _ => last = Some((at, Instant::now())),
        }
    }
}

/// The gateway simulator, the scripted model, and a TLS front for each (API, Stream, model) on
/// the host's loopback, as the guest reaches them through qemu's forwards.
pub(crate) async fn services(tls: &Tls) -> (Simulator, LlmSim, [(&'static str, SocketAddr); 3]) {
    let sim = Simulator::start(SimConfig {
        public_http_base: Some(format!("https://{API_IP}")),
        public_ws_endpoint: Some(format!("wss://{WS_IP}/connect")),
        ping_interval: Some(Duration::from_secs(20)),
        ..support::sim_config()
    })
    .await
    .expect("simulator");
    let llm = LlmSim::start().await.expect("llm sim");
    let api: SocketAddr = sim.api_base().trim_start_matches("http://").parse().expect("api addr");
    let llm_addr: SocketAddr =
        llm.base_url().trim_start_matches("http://").split('/').next().and_then(|a| a.parse().ok()).expect("llm addr");
    let fronts = [
        (API_IP, tls_front(tls.acceptor.clone(), api).await),
        (WS_IP, tls_front(tls.acceptor.clone(), sim.ws_addr()).await),
        (LLM_IP, tls_front(tls.acceptor.clone(), llm_addr).await),
    ];
    (sim, llm, fronts)
}

/// A configuration for the box reaching the simulator, the model and the test CA through the
/// forwards, then `rest` (access, tools, health…).
pub(crate) fn base_config(tls: &Tls, sim: &Simulator, llm: &LlmSim, rest: &str) -> String {
    let path = llm.base_url().split_once("//").and_then(|(_, r)| r.split_once('/')).map(|(_, p)| p.to_owned());
    format!(
        "serial = 1\n[agent]\ntime_zone = \"Asia/Shanghai\"\nextra_ca_pem = \"\"\"\n{ca}\"\"\"\n\
         [dingtalk]\nclient_id = \"{id}\"\nclient_secret = \"{secret}\"\nrobot_code = \"{id}\"\napi_base = \"https://{API_IP}\"\n\
         [llm]\nbase_url = \"https://{LLM_IP}/{path}\"\nwhere = \"local\"\nmodel = \"sim-model\"\napi_key = \"sk-boot-test-key\"\n{rest}",
        ca = tls.ca_pem,
        id = sim.config().client_id,
        secret = support::SECRET,
        path = path.unwrap_or_else(|| "v1".into()),
    )
}

/// The stick with `config` signed by the organisation key (the one baked into the image,
/// `ZHULI_BOOT_ORG_KEY`, or one made now and pinned by the box at its first import), and the
/// disk: a copy-on-write overlay of `image`, larger than it, so /var has room to grow into.
pub(crate) fn stick_and_disk(dir: &Path, config: &str, image: &Path) -> (PathBuf, PathBuf) {
    let zhuli = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_zhuli")).args(args).output().expect("run zhuli");
        assert!(out.status.success(), "zhuli {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    match std::env::var("ZHULI_BOOT_ORG_KEY") {
        Ok(key) => {
            std::fs::create_dir_all(dir.join("keys")).expect("keys");
            std::fs::copy(key, dir.join("keys/org.key")).expect("the baked key's private half");
        }
        Err(_) => zhuli(&["provision", "keygen", "--out", &s(&dir.join("keys"))]),
    }
    let cfg = dir.join("zhuli.toml");
    std::fs::write(&cfg, config).expect("config");
    zhuli(&["provision", "sign", "--key", &s(&dir.join("keys/org.key")), &s(&cfg)]);
    let stick = dir.join("stick.img");
    zhuli(&["provision", "write", "--config", &s(&cfg), "--image", &s(&stick)]);
    let disk = dir.join("disk.qcow2");
    let made = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-b", &s(&image.canonicalize().expect("image")), "-F", "raw"])
        .arg(&disk)
        .arg("6G")
        .status()
        .expect("qemu-img (package qemu-utils)");
    assert!(made.success());
    (stick, disk)
}

/// Every listening TCP/UDP socket in `ss -ltnupH` output that is not on loopback, except the
/// DHCP client's own socket (udp 68, or 546 for DHCPv6, owned by systemd-networkd): a client
/// bound for its lease renewals, answered only through the firewall's DHCP-reply rule.
fn non_loopback_listeners(ss: &str) -> Vec<String> {
    ss.lines()
        .filter(|l| !l.trim().is_empty())
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local = fields.get(4).copied().unwrap_or("");
            let (host, port) = local.rsplit_once(':').unwrap_or((local, ""));
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let host = host.split('%').next().unwrap_or(host);
            let loopback = host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
            let dhcp_client =
                fields.first() == Some(&"udp") && (port == "68" || port == "546") && line.contains("\"systemd-network");
            !loopback && !dhcp_client
        })
        .map(str::to_owned)
        .collect()
}

#[test]
fn loopback_listener_filter() {
    let ss = "udp UNCONN 0 0 127.0.0.54:53 0.0.0.0:* users:((\"systemd-resolve\",pid=1,fd=1))\n\
              tcp LISTEN 0 4096 127.0.0.53%lo:53 0.0.0.0:* users:((\"systemd-resolve\",pid=1,fd=1))\n\
              tcp LISTEN 0 4096 [::1]:8080 [::]:*\n\
              udp UNCONN 0 0 10.0.2.15%enp0s3:68 0.0.0.0:* users:((\"systemd-network\",pid=2,fd=3))\n\
              udp UNCONN 0 0 0.0.0.0:68 0.0.0.0:* users:((\"dhclient\",pid=3,fd=3))\n\
              udp UNCONN 0 0 0.0.0.0:5355 0.0.0.0:*\n\
              tcp LISTEN 0 128 [::]:22 [::]:*\n";
    let open = non_loopback_listeners(ss);
    assert_eq!(open.len(), 3, "{open:?}");
    assert!(open[0].contains("dhclient") && open[1].contains(":5355") && open[2].contains(":22"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "boots the appliance image under qemu: tests/boot/run"]
async fn the_image_boots_provisions_answers_and_heals() {
    let image = PathBuf::from(std::env::var("ZHULI_BOOT_IMAGE").expect("ZHULI_BOOT_IMAGE=path/to/zhuli.img"));
    let dir = support::temp_dir("boot");
    let tls = tls();

    let (sim, llm, fronts) = services(&tls).await;

    let baked = std::env::var("ZHULI_BOOT_ORG_KEY").is_ok();
    // A shared folder the import makes under /srv, and two hostile plugins (their script is put
    // on the box before the stick comes; see below).
    let plugin = |name: &str, extra: &str| {
        format!(
            "[tools.mcp.{name}]\ncommand = \"/bin/sh\"\nargs = [\"{PLUGIN_DIR}/mcp.sh\", \"{name}\"]\nread = [\"{PLUGIN_DIR}\"]\n\
             read_only_tools = [\"run\"]\ntimeout_ms = 120000\n{extra}"
        )
    };
    let config = base_config(
        &tls,
        &sim,
        &llm,
        &format!(
            "[access]\nadmins = [\"{ADMIN}\"]\ndirect_chats = \"org\"\ndefault_roles = [\"member\"]\n\
             [access.roles.member]\ntools = [\"files\", \"bomb\", \"fill\", \"system\"]\n\
             [tools.files.roots]\nshare = \"/srv/share\"\n\
             {bomb}{fill}[health]\nadmin_chat = \"{ADMIN_CHAT}\"\n",
            bomb = plugin("bomb", "processes = 4\n"),
            fill = plugin("fill", "memory_mb = 32\n"),
        ),
    );
    let (stick_img, disk) = stick_and_disk(&dir, &config, &image);

    let guest = start_guest(&dir, &disk, &stick_img, &fronts);
    let accel = accel();

    // No stick yet: the box comes up, says it waits for one, and the agent does not run.
    guest.run_until_ok("true", Duration::from_secs(300));
    // The hostile plugins' script, where the configuration says (an office would ship its
    // plugins in its image or under /var/lib; the probe stands in for that).
    let script = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/boot/mcp.sh")).expect("mcp.sh");
    guest.must(&format!(
        "mkdir -p {PLUGIN_DIR} && echo {} | base64 -d >{PLUGIN_DIR}/mcp.sh && chmod 0755 {PLUGIN_DIR} && chmod 0644 {PLUGIN_DIR}/mcp.sh",
        base64(&script)
    ));
    guest.run_until_ok(
        "journalctl -b -o cat -u zhuli-unconfigured.service | grep -q 'no configuration yet'",
        Duration::from_secs(120),
    );
    let up = guest.started.elapsed();
    assert!(guest.run("systemctl is-active zhuli.service", Duration::from_secs(30)).is_some_and(|(code, _)| code != 0));

    // The stick plugged in: imported, the agent READY.
    guest.plug_stick();
    let plugged = Instant::now();
    guest.run_until_ok("systemctl is-active zhuli.service", Duration::from_secs(180));
    eprintln!(
        "boot: up and waiting for a stick {:.1} s after qemu started ({accel}); stick plugged → zhuli READY in {:.1} s",
        up.as_secs_f64(),
        plugged.elapsed().as_secs_f64()
    );
    // The agent starts while the import goes on removing the secrets from the stick; the final
    // receipt comes when that is done.
    let receipt_now =
        || stick::read(&stick_img, stick::RECEIPT).ok().and_then(|r| String::from_utf8(r).ok()).unwrap_or_default();
    let waited = Instant::now();
    // The receipt is whole once the stick's backup line is there too (the import's last step).
    let whole = |r: &str| r.contains("secrets on this stick: removed") && r.contains("backup on this stick: ");
    while !whole(&receipt_now()) && waited.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(500));
    }
    let receipt = receipt_now();
    assert!(receipt.contains("imported serial 1"), "receipt:\n{receipt}");
    // A box just set up has no snapshot yet: the stick is told so, not given an empty copy.
    assert!(receipt.contains("backup on this stick: not copied: no snapshot on the box yet"), "receipt:\n{receipt}");
    assert!(receipt.contains("secrets on this stick: removed: the whole stick was checked"), "receipt:\n{receipt}");
    // Journal sealing set up by the import; its verification key left with the stick.
    let key = receipt
        .lines()
        .find_map(|l| l.strip_prefix("journal verification key: "))
        .unwrap_or_else(|| panic!("no journal key on the receipt:\n{receipt}"))
        .to_owned();
    assert!(key.contains('/') && key.contains('-'), "an FSS verification key: {key}");
    // Then the box's diagnostics, for a box without a shell: the journal read as root on the box.
    let waited = Instant::now();
    while stick::read(&stick_img, stick::DIAGNOSTICS_JSON).is_err() && waited.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(500));
    }
    let report: zhuli::health::diagnostics::Report =
        serde_json::from_slice(&stick::read(&stick_img, stick::DIAGNOSTICS_JSON).expect("diagnostics on the stick"))
            .expect("a diagnostics report");
    assert!(
        matches!(report.journal, zhuli::health::diagnostics::Section::Found(_)),
        "the journal in the diagnostics: {:?}",
        report.journal
    );
    assert!(matches!(report.configuration, zhuli::health::diagnostics::Section::Found(ref c) if c.serial == 1));
    assert!(report.disks.iter().any(|d| d.path == "/var" && d.free_bytes > 0), "{:?}", report.disks);
    // The installer reads on the stick whether the firmware enforces Secure Boot.
    let expected = if secure_boot() { "on (" } else { "setup mode (" };
    assert!(report.versions.secure_boot.starts_with(expected), "secure boot: {}", report.versions.secure_boot);
    let scrubbed = String::from_utf8(stick::read(&stick_img, stick::CONFIG).expect("config")).expect("utf-8");
    assert!(!scrubbed.contains(support::SECRET) && !scrubbed.contains("sk-boot-test-key"), "secrets left the stick");

    // The agent's own user and group, with the ids the image fixes; it reads its configuration
    // through that group.
    assert_eq!(guest.must("id zhuli").trim(), "uid=800(zhuli) gid=800(zhuli) groups=800(zhuli)");
    assert_eq!(guest.must("stat -L -c %G /var/lib/zhuli-provisioning/current/zhuli.toml").trim(), "zhuli");
    if baked {
        // Trusted through the image's key: nothing pinned, the key is the one baked in.
        assert!(guest.must("test -e /var/lib/zhuli-provisioning/org.pub && echo pinned || echo none").trim() == "none");
        assert!(guest.must("cat /usr/share/zhuli/org.pub").starts_with("zhuli-org-key ed25519 "));
    }

    // The box's identity is the firmware's (stable across reboots), and /var grew to the disk.
    let machine_id = guest.must("cat /etc/machine-id");
    assert_eq!(machine_id.trim(), MACHINE_UUID.replace('-', ""), "machine id from the firmware");
    let var_size: u64 = guest.must("findmnt -bno SIZE /var").trim().parse().expect("size of /var");
    // 256 MiB in the image; the 6 GiB disk less ESP (256 MiB) and two root slots (916 MiB
    // each) leaves about 3.9 GiB.
    assert!(var_size > 3584 * 1024 * 1024, "/var did not grow over the 6 GiB disk: {var_size} bytes");
    assert!(guest.must("findmnt -no OPTIONS /").split(',').any(|o| o == "ro"), "root is read-only");
    // The root is slot A, read through dm-verity; slot B waits empty; the release's kernel image
    // is on the ESP, mounted for boot counting; a fresh flash is not on trial.
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(guest.must("findmnt -no SOURCE /").trim(), "/dev/mapper/zhuli-root");
    let verity = guest.must("veritysetup status zhuli-root");
    assert!(verity.lines().any(|l| l.split_whitespace().eq(["status:", "verified"])), "{verity}");
    assert!(verity.lines().any(|l| l.split_whitespace().eq(["mode:", "readonly"])), "{verity}");
    assert_eq!(guest.must(". /etc/os-release && echo $IMAGE_ID $IMAGE_VERSION").trim(), format!("zhuli {version}"));
    let mut names: Vec<String> = guest
        .must("grep -h '^PARTNAME=' /sys/class/block/*/uevent")
        .lines()
        .map(|l| l.trim()[9..].to_owned())
        .collect();
    names.sort();
    let slot = |kind: &str, v: &str| format!("zhuli-{kind}_{v}");
    let mut want = vec!["esp".to_owned(), slot("root", version), slot("root", "empty"), "zhuli-var".to_owned()];
    want.extend([slot("verity", version), slot("verity", "empty")]);
    assert_eq!(names, want);
    assert_eq!(guest.must("ls /efi/EFI/Linux").trim(), format!("zhuli_{version}.efi"));
    assert!(
        guest.run("systemctl is-active zhuli-boot-check.service", Duration::from_secs(30)).is_some_and(|(c, _)| c != 0)
    );
    assert_eq!(guest.must("date +%z").trim(), "+0800", "the time zone from the stick");
    if secure_boot() {
        // systemd-boot enrolled the image's keys in the firmware (setup mode) and reset; the
        // kernel then started under Secure Boot, locked down.
        let console = guest.console_all();
        assert!(
            console.contains("Custom Secure Boot keys successfully enrolled"),
            "no enrollment:\n{}",
            guest.console()
        );
        assert_eq!(guest.must(SECURE_BOOT_STATE).trim(), "SecureBoot=1 SetupMode=0", "Secure Boot is not on");
        assert!(guest.must("cat /sys/kernel/security/lockdown").contains("[integrity]"));
    }
    guest.must("test -s /var/log/journal/$(cat /etc/machine-id)/fss");

    // The simulator's message answered, through the model.
    assert!(
        sim.wait_until(Duration::from_secs(120), |s| !s.connections().is_empty()).await,
        "agent did not connect; console:\n{}",
        guest.console()
    );
    llm.push(Scripted::Text("The box is up and answering.".into()));
    let first = sim.inject(Inject { sender_staff_id: ADMIN.into(), ..Inject::text("are you there?") });
    assert!(
        sim.wait_until(Duration::from_secs(120), |s| !support::replies_to(s, &first).is_empty()).await,
        "no answer; journal:\n{}",
        guest
            .run("journalctl -u zhuli --no-pager | tail -n 40", Duration::from_secs(30))
            .map(|r| r.1)
            .unwrap_or_default()
    );
    assert!(support::replies_to(&sim, &first)[0].text.contains("The box is up and answering."));

    // Neither secret is anywhere in the box's journal.
    let leaked = guest.run(
        &format!("journalctl --no-pager -o verbose | grep -c -F -e '{}' -e sk-boot-test-key", support::SECRET),
        Duration::from_secs(60),
    );
    assert!(
        leaked.as_ref().is_some_and(|(code, out)| *code == 1 && out.trim() == "0"),
        "secret in the journal: {leaked:?}"
    );

    // Under the real unit: the import made the shared folder and let the agent write there
    // (ReadWritePaths= in its drop-in), and nowhere else.
    let rw = guest.must("systemctl show -P ReadWritePaths zhuli.service");
    assert!(rw.contains("/var/srv/share"), "the unit's writable paths: {rw}");
    llm.push(calls(&[("files_write", serde_json::json!({"path": "share/周会纪要.txt", "content": "预算已批准\n"}))]));
    let (question, _) = ask(&sim, "把周会纪要写进共享文件夹").await;
    assert!(question.contains("/确认"), "{question}");
    assert!(guest.run("test -e /srv/share/周会纪要.txt", Duration::from_secs(30)).is_some_and(|(c, _)| c != 0));
    llm.push(Scripted::Text("写好了。".into()));
    ask(&sim, &format!("/confirm {}", code_in(&question))).await;
    assert_eq!(guest.must("cat /srv/share/周会纪要.txt"), "预算已批准\n", "written under the real unit");
    let (undone, _) = ask(&sim, "/undo").await;
    assert!(
        guest.run("test -e /srv/share/周会纪要.txt", Duration::from_secs(30)).is_some_and(|(c, _)| c != 0),
        "{undone}"
    );
    llm.push(calls(&[("files_write", serde_json::json!({"path": "/var/lib/zhuli/evil.txt", "content": "x"}))]));
    llm.push(Scripted::Text("不行。".into()));
    ask(&sim, "写到别处去").await;
    let result = support::tool_results(&llm.requests().last().expect("request").body).remove(0);
    assert!(result.to_lowercase().contains("refused") || result.contains("root"), "outside the roots: {result}");
    assert!(guest.run("test -e /var/lib/zhuli/evil.txt", Duration::from_secs(30)).is_some_and(|(c, _)| c != 0));

    // Each plugin in a control group of its own, with its limits.
    let service = "/sys/fs/cgroup/system.slice/zhuli.service";
    let group = format!("{service}/plugins");
    assert_eq!(
        guest.must("cat /proc/$(systemctl show -P MainPID zhuli.service)/cgroup").trim(),
        "0::/system.slice/zhuli.service/agent",
        "the agent moved into agent/"
    );
    assert_eq!(
        guest.must(&format!("cat {group}/bomb.*/pids.max")).trim(),
        "112",
        "{}",
        guest.must(&format!("ls {service} {group}"))
    );
    assert_eq!(guest.must(&format!("cat {group}/fill.*/memory.max")).trim(), (32u64 << 20).to_string());
    // A plugin that fork-bombs: stopped whole; /ping is answered meanwhile; admins told; audited.
    // Someone else's /ping, in their own chat, while the admin's turn waits on the plugin.
    let (_, quiet) = ask_as(&sim, "boot-colleague", "/ping").await;
    llm.push(calls(&[("bomb_run", serde_json::json!({}))]));
    llm.push(Scripted::Text("插件出错了。".into()));
    let asked = llm.requests().len();
    let bombed = sim.inject(Inject { sender_staff_id: ADMIN.into(), ..Inject::text("运行 bomb") });
    // The bomb goes off once the model's call has gone out to the plugin.
    assert!(sim.wait_until(Duration::from_secs(60), |_| llm.requests().len() > asked).await);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (pong, busy) = ask_as(&sim, "boot-colleague", "/ping").await;
    assert!(pong.to_lowercase().contains("pong"), "{pong}");
    eprintln!(
        "boot: /ping answered in {} ms while a plugin fork-bombed ({} ms when quiet)",
        busy.as_millis(),
        quiet.as_millis()
    );
    assert!(busy < quiet + Duration::from_secs(1), "/ping took {busy:?} during the fork bomb ({quiet:?} before)");
    assert!(
        sim.wait_until(Duration::from_secs(120), |s| to_admins(s).iter().any(|t| t.contains("bomb"))).await,
        "the admins were not told: {:?}\n{}",
        to_admins(&sim),
        guest.diagnose()
    );
    assert!(sim.wait_until(Duration::from_secs(120), |s| !support::replies_to(s, &bombed).is_empty()).await);
    let told = to_admins(&sim).into_iter().find(|t| t.contains("bomb")).unwrap_or_default();
    assert!(told.contains("任务") && told.contains("112"), "{told}");
    let audit = |plugin: &str| {
        guest.must(&format!(
            "journalctl -o verbose MESSAGE_ID=4c1b6a0e9d2f4e7a8b3c5d6e7f801a0e | grep -E 'TOOL=plugin {plugin}|REASON=' || true"
        ))
    };
    let trail = audit("bomb");
    assert!(trail.contains("TOOL=plugin bomb") && trail.contains("112 tasks"), "audit trail:\n{trail}");
    assert_eq!(guest.must(&format!("ls -d {group}/bomb.* 2>/dev/null || echo gone")).trim(), "gone");

    // A plugin that fills its home: stopped at its memory limit, its home emptied.
    llm.push(calls(&[("fill_run", serde_json::json!({}))]));
    llm.push(Scripted::Text("插件出错了。".into()));
    ask(&sim, "运行 fill").await;
    assert!(
        sim.wait_until(Duration::from_secs(120), |s| to_admins(s).iter().any(|t| t.contains("fill"))).await,
        "the admins were not told: {:?}",
        to_admins(&sim)
    );
    let told = to_admins(&sim).into_iter().find(|t| t.contains("fill")).unwrap_or_default();
    assert!(told.contains("内存") && told.contains("32 MB"), "{told}");
    assert!(audit("fill").contains("memory limit of 32 MB"), "audit trail:\n{}", audit("fill"));
    let home = guest.must(
        "nsenter -t $(systemctl show -P MainPID zhuli.service) -m sh -c 'ls -A /var/lib/zhuli/plugins/fill | wc -l; df --output=used -B1M /var/lib/zhuli/plugins | tail -n 1'",
    );
    assert_eq!(home.split_whitespace().next(), Some("0"), "its home was emptied: {home}");
    let (pong, _) = ask(&sim, "/ping").await;
    assert!(pong.to_lowercase().contains("pong"), "still answering: {pong}");

    // Listening on nothing but loopback; the firewall loaded.
    let ss = guest.must("ss -ltnupH");
    assert_eq!(non_loopback_listeners(&ss), Vec::<String>::new(), "listening sockets:\n{ss}");
    assert!(guest.must("nft list chain inet zhuli input").contains("policy drop"));
    // PID 1 drives the board's watchdog; no login prompt anywhere.
    let held = guest.must("ls -l /proc/1/fd | grep -c /dev/watchdog || true");
    assert!(
        held.trim().parse::<u32>().unwrap_or(0) >= 1,
        "PID 1 holds no watchdog device: {held}\n{}",
        guest.must("ls -l /dev/watchdog* 2>&1; journalctl -b -o cat | grep -i watchdog | head -n 20")
    );
    let gettys =
        guest.must("systemctl list-units --type=service --no-legend --plain --state=active 'getty*' 'serial-getty*' 'autovt*' 'console-getty*'");
    assert!(gettys.trim().is_empty(), "login prompts running:\n{gettys}");

    // A hung agent (SIGSTOP) stops its watchdog pings; systemd kills and restarts it.
    let pid = guest.must("systemctl show -P MainPID zhuli.service").trim().to_owned();
    guest.must(&format!("kill -STOP {pid}"));
    let stopped = Instant::now();
    let restarted = guest.run_until_ok(
        &format!("p=$(systemctl show -P MainPID zhuli.service); [ \"$p\" != 0 ] && [ \"$p\" != {pid} ] && systemctl is-active zhuli.service && echo $p"),
        Duration::from_secs(240),
    );
    eprintln!("boot: the stopped agent was replaced after {:.1} s (WatchdogSec=60s)", stopped.elapsed().as_secs_f64());
    assert!(!restarted.is_empty());
    let why = guest.must("journalctl -u zhuli.service --no-pager -o cat | grep -i watchdog || true");
    assert!(why.to_lowercase().contains("watchdog"), "no watchdog timeout in the journal:\n{why}");

    // Reboot: the store keeps the conversation, so the next question comes with it.
    let before = sim.connections().len();
    // What the imports did in this boot, for the checks after the reboot.
    let imports_before = guest.must(
        "ls -lA /var/lib/zhuli-provisioning/scrub-pending 2>&1; \
         journalctl -b --no-pager -o short-monotonic -u 'zhuli-provision@*' | tail -n 40",
    );
    // Under Secure Boot, a kernel image nobody signed is dropped on the ESP as the newest
    // release, on trial: systemd-boot counts the try, and the firmware refuses to start it.
    // systemd-boot then hands back to the firmware, which stops; at the next power-on the
    // refused image has no tries left and the signed release starts.
    let unsigned = if secure_boot() {
        let dropped = "zhuli_9.9.9+1.efi".to_owned();
        let source = unsigned_uki(&image);
        let size = std::fs::metadata(&source).expect("unsigned kernel image").len();
        // A USB disk holding the file, padded to whole sectors.
        let padded = dir.join("unsigned.img");
        std::fs::copy(&source, &padded).expect("copy");
        std::fs::OpenOptions::new()
            .write(true)
            .open(&padded)
            .and_then(|f| f.set_len(size.next_multiple_of(512)))
            .expect("pad");
        guest.plug_file(&padded, "ZHULIUKI");
        guest.run_until_ok("test -b /dev/disk/by-id/usb-QEMU_QEMU_HARDDISK_ZHULIUKI-0:0", Duration::from_secs(60));
        guest.must(&format!(
            "head -c {size} /dev/disk/by-id/usb-QEMU_QEMU_HARDDISK_ZHULIUKI-0:0 > /efi/EFI/Linux/{dropped} && sync && ls /efi/EFI/Linux"
        ));
        Some(dropped)
    } else {
        None
    };
    let _ = guest.run("systemctl reboot", Duration::from_secs(5));
    std::thread::sleep(Duration::from_secs(5));
    let rebooted = Instant::now();
    if unsigned.is_some() {
        // The try is counted before the start: the refusal names the image as renamed.
        let refused = "Error loading \\EFI\\Linux\\zhuli_9.9.9+0-1.efi: Access denied";
        let deadline = Instant::now() + Duration::from_secs(300);
        while !guest.console_all().contains(refused) {
            assert!(Instant::now() < deadline, "no refusal of the unsigned image on the console:\n{}", guest.console());
            std::thread::sleep(Duration::from_secs(2));
        }
        eprintln!(
            "boot: the firmware refused the unsigned kernel image {:.1} s after the reboot",
            rebooted.elapsed().as_secs_f64()
        );
        std::thread::sleep(Duration::from_secs(2));
        guest.reset();
    }
    guest.run_until_ok("systemctl is-active zhuli.service", Duration::from_secs(420));
    if let Some(dropped) = unsigned {
        assert_eq!(guest.must(". /etc/os-release && echo $IMAGE_VERSION").trim(), version, "the signed release runs");
        let esp = guest.must("ls /efi/EFI/Linux");
        assert!(esp.contains("zhuli_9.9.9+0-1.efi"), "the refused image's try was counted: {esp}");
        assert_eq!(guest.must(SECURE_BOOT_STATE).trim(), "SecureBoot=1 SetupMode=0");
        guest.must("rm /efi/EFI/Linux/zhuli_9.9.9+0-1.efi");
        eprintln!(
            "boot: an unsigned kernel image ({dropped}) on the ESP was refused by the firmware; at the next power-on the signed release started"
        );
    }
    let in_guest = guest.must("echo $(( $(systemctl show -P ActiveEnterTimestampMonotonic zhuli.service) / 1000 ))");
    eprintln!(
        "boot: configured box: zhuli READY {} ms after the kernel started ({accel}; {:.1} s after the reboot was asked)",
        in_guest.trim(),
        rebooted.elapsed().as_secs_f64()
    );
    // The stick is still in: recognised as imported already, nothing failed, its receipt kept.
    let failed = guest.must("systemctl --failed --no-legend --plain");
    assert!(failed.trim().is_empty(), "failed units after the reboot:\n{failed}");
    let receipt_after = receipt_now();
    if receipt_after != receipt {
        let imports = guest.must("journalctl -b --no-pager -o short-monotonic -u 'zhuli-provision@*' | tail -n 40");
        panic!(
            "the first receipt did not stay:\n{receipt_after}\nbefore the reboot:\n{imports_before}\nafter it:\n{imports}"
        );
    }
    assert_eq!(guest.must("cat /etc/machine-id").trim(), machine_id.trim(), "same machine id after the reboot");
    // The provisioned unit settings are read at boot too (zhuli-units.service): the shared
    // folder is writable for the agent, and the plugins are in their groups again.
    let rw = guest.must("systemctl show -P ReadWritePaths zhuli.service");
    assert!(rw.contains("/var/srv/share"), "after the reboot, the unit's writable paths: {rw}");
    assert_eq!(guest.must(&format!("cat {group}/bomb.*/pids.max")).trim(), "112");
    assert!(
        sim.wait_until(Duration::from_secs(120), |s| s.connections().len() > before).await
            || !sim.connections().is_empty()
    );
    llm.push(Scripted::Text("Yes, you asked whether I was there.".into()));
    let second = sim.inject(Inject { sender_staff_id: ADMIN.into(), ..Inject::text("what did I ask before?") });
    assert!(
        sim.wait_until(Duration::from_secs(120), |s| !support::replies_to(s, &second).is_empty()).await,
        "no answer after the reboot; console:\n{}",
        guest.console()
    );
    let last = llm.requests().last().cloned().expect("a model request after the reboot");
    let asked = last.body.to_string();
    assert!(
        asked.contains("are you there?") && asked.contains("The box is up and answering."),
        "the conversation did not survive the reboot: {asked}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `SecureBoot=N SetupMode=N` from the firmware's variables (the last byte of each).
const SECURE_BOOT_STATE: &str = "v() { od -An -tu1 \"/sys/firmware/efi/efivars/$1-8be4df61-93ca-11d2-aa0d-00e098032b8c\" | awk '{ print $NF }' | tail -n 1; }; echo SecureBoot=$(v SecureBoot) SetupMode=$(v SetupMode)";

/// The kernel image of the release in `image`'s folder before it was signed (image/build keeps
/// it when it signs for Secure Boot).
fn unsigned_uki(image: &Path) -> PathBuf {
    let dir = image.parent().expect("the image's folder");
    std::fs::read_dir(dir)
        .expect("the image's folder")
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with(".unsigned.efi"))
        .unwrap_or_else(|| {
            panic!("no zhuli_*.unsigned.efi beside {}: build the image with ZHULI_SB_KEYS", image.display())
        })
}

/// Standard base64 of `data` (the probe's way to carry a file into the guest).
fn base64(data: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [chunk[0], chunk.get(1).copied().unwrap_or(0), chunk.get(2).copied().unwrap_or(0)];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(TABLE[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn base64_as_coreutils_reads_it() {
    assert_eq!(base64(b""), "");
    assert_eq!(base64(b"f"), "Zg==");
    assert_eq!(base64(b"fo"), "Zm8=");
    assert_eq!(base64(b"foo"), "Zm9v");
    assert_eq!(base64("周".as_bytes()), "5ZGo");
}
