//! The appliance image updating itself under qemu: release N is flashed and provisioned, the
//! admin chat asks for the update, the box pulls release N+1 from an HTTPS folder (the vendor's,
//! here on the host's loopback behind a TLS front), installs it into its spare slot, boots it on
//! trial and keeps it once the agent is healthy, with the conversation stored under N intact.
//! Bundles that are unsigned, older or changed by one byte are refused and nothing is written.
//! Release N+2, whose agent never gets READY, is installed next: the box finds it bad and comes
//! back to N+1 by itself, and the admin chat hears which release failed, why, and what runs.
//!
//! Run by `tests/boot/run` with `ZHULI_BOOT_IMAGE` (release N's disk image, built with the vendor
//! key) and `ZHULI_BOOT_RELEASES`, a folder with the signed bundles `base/` (N), `n1/` and `n2/`
//! (`image/variant`, the broken agent in `n2`); ignored in the ordinary test run.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::Full;
use tokio::net::TcpListener;
use zhuli_sim::{dingtalk::Simulator, llm::Scripted};

use crate::{
    boot::{
        ADMIN, ADMIN_CHAT, Guest, RELEASES_IP, ask, base_config, services, start_guest, stick_and_disk, tls, tls_front,
        to_admins,
    },
    support,
};

/// A release folder over HTTP: the files of whichever folder is current, with range requests
/// (a download resumes where it stopped).
async fn release_server(current: Arc<Mutex<PathBuf>>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    zhuli_sim::serve::spawn(listener, tokio_util::sync::CancellationToken::new(), move |req| {
        let current = current.clone();
        async move {
            let name = req.uri().path().trim_start_matches('/').to_owned();
            let dir = current.lock().expect("current").clone();
            let respond = |status: u16, body: Vec<u8>| {
                http::Response::builder().status(status).body(Full::new(Bytes::from(body))).expect("response")
            };
            if name.contains('/') || name.is_empty() {
                return respond(404, vec![]);
            }
            let Ok(all) = std::fs::read(dir.join(&name)) else { return respond(404, vec![]) };
            let from = req
                .headers()
                .get("range")
                .and_then(|v| v.to_str().ok())
                .and_then(|r| r.strip_prefix("bytes="))
                .and_then(|r| r.strip_suffix('-'))
                .and_then(|n| n.parse::<usize>().ok());
            match from {
                Some(n) if n >= all.len() => respond(416, vec![]),
                Some(n) => respond(206, all[n..].to_vec()),
                None => respond(200, all),
            }
        }
    });
    addr
}

/// Wait until a message to the admins contains `needle`, showing what the box's update units
/// say every minute meanwhile (a stuck update is seen in the log as it happens).
async fn wait_for_news(sim: &Simulator, guest: &Guest, needle: &str, limit: Duration) -> bool {
    let started = Instant::now();
    while started.elapsed() < limit {
        if sim.wait_until(Duration::from_secs(60), |s| to_admins(s).iter().any(|t| t.contains(needle))).await {
            return true;
        }
        let said = guest
            .run(
                "journalctl -b --no-pager -o short-monotonic -u zhuli-update.service -u zhuli-update.path -u zhuli-boot-check.service -u 'zhuli-provision@*' | tail -n 12",
                Duration::from_secs(30),
            )
            .map(|(_, out)| out)
            .unwrap_or_else(|| "(the probe did not answer: rebooting?)".into());
        eprintln!(
            "boot-update: waiting {:.0} s for {needle:?}; the update units say:\n{said}",
            started.elapsed().as_secs_f64()
        );
    }
    false
}

fn version_of(bundle: &Path) -> String {
    let text = std::fs::read_to_string(bundle.join("zhuli-release.toml")).expect("manifest");
    text.lines().find_map(|l| l.strip_prefix("version = ")).expect("version").trim_matches('"').to_owned()
}

/// A copy of `from` made of links (the big files are not copied), as `to`.
fn linked_copy(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("dir");
    for e in std::fs::read_dir(from).expect("bundle") {
        let e = e.expect("entry");
        std::os::unix::fs::symlink(e.path().canonicalize().expect("path"), to.join(e.file_name())).expect("link");
    }
}

/// In the guest: flip one bit of a file's first block on the partition under the running root
/// (`/dev/mapper/zhuli-root`'s data device), read the file through the file system with the
/// caches dropped, then put the bit back.
const FLIP_A_BLOCK: &str = r#"set -e
f=/usr/share/doc/zhuli/UPDATES.md
blk=$(filefrag -v -b4096 "$f" | awk '$1 == "0:" { sub(/\.\./, "", $4); print $4; exit }')
dm=$(basename "$(readlink -f /dev/mapper/zhuli-root)")
dev=/dev/$(ls /sys/block/"$dm"/slaves | sort -V | head -n 1)
off=$((blk * 4096 + 100))
orig=$(dd if="$dev" bs=1 skip="$off" count=1 2>/dev/null | od -An -tu1 | tr -d ' ')
put() { printf "\\$(printf %o "$1")" | dd of="$dev" bs=1 seek="$off" count=1 conv=notrunc,fsync 2>/dev/null; }
put $((orig ^ 4))
echo 3 > /proc/sys/vm/drop_caches
echo "block $blk of $f on $dev"
if cat "$f" > /dev/null 2> /tmp/read-err; then echo READ-OK; else echo READ-FAILED; cat /tmp/read-err; fi
dmesg | grep -i verity | tail -n 2
put "$orig"
echo 3 > /proc/sys/vm/drop_caches
cat "$f" > /dev/null && echo RESTORED
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "boots the appliance image under qemu and updates it: tests/boot/run"]
async fn the_image_updates_itself_and_falls_back() {
    let image = PathBuf::from(std::env::var("ZHULI_BOOT_IMAGE").expect("ZHULI_BOOT_IMAGE=path/to/zhuli.img"));
    let releases = PathBuf::from(std::env::var("ZHULI_BOOT_RELEASES").expect("ZHULI_BOOT_RELEASES=folder of bundles"));
    let (base, n1, n2) = (releases.join("base"), releases.join("n1"), releases.join("n2"));
    let (v0, v1, v2) = (version_of(&base), version_of(&n1), version_of(&n2));
    let dir = support::temp_dir("boot-update");
    let tls = tls();

    let (sim, llm, [api, ws, model]) = services(&tls).await;
    // Nothing published yet: an empty folder.
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).expect("empty");
    let current = Arc::new(Mutex::new(empty));
    let publish = |folder: &Path| *current.lock().expect("current") = folder.to_owned();
    let fronts =
        [api, ws, model, (RELEASES_IP, tls_front(tls.acceptor.clone(), release_server(current.clone()).await).await)];

    let config = base_config(
        &tls,
        &sim,
        &llm,
        &format!(
            "[access]\nadmins = [\"{ADMIN}\"]\ndirect_chats = \"org\"\n\
             [health]\nadmin_chat = \"{ADMIN_CHAT}\"\nsample_ms = 5000\n\
             [update]\nsource = \"https://{RELEASES_IP}/\"\nwindow = \"never\"\ntries = 2\nhealthy_for_s = 20\nhealthy_within_s = 300\n"
        ),
    );
    let (stick_img, disk) = stick_and_disk(&dir, &config, &image);

    // Release N, provisioned, answering; a conversation stored under it.
    let guest = start_guest(&dir, &disk, &stick_img, &fronts);
    guest.run_until_ok("true", Duration::from_secs(300));
    guest.plug_stick();
    guest.run_until_ok("systemctl is-active zhuli.service", Duration::from_secs(180));
    assert!(sim.wait_until(Duration::from_secs(120), |s| !s.connections().is_empty()).await, "{}", guest.diagnose());
    let running = || guest.must(". /etc/os-release && echo $IMAGE_VERSION").trim().to_owned();
    assert_eq!(running(), v0);
    llm.push(Scripted::Text("记住了：第三季度预算是三万元。".into()));
    let (said, _) = ask(&sim, "记一下，第三季度预算是三万元").await;
    assert!(said.contains("三万元"), "{said}");
    // The partition table's primary copy (header and entries) and the kernel images on the ESP.
    let partitions = || guest.must("head -c 17408 /dev/vda | sha256sum");
    let esp = || guest.must("ls /efi/EFI/Linux | sort | tr '\\n' ' '; echo");

    // N+1 published and asked for: fetched, installed, booted on trial, kept.
    publish(&n1);
    let asked = Instant::now();
    let (said, _) = ask(&sim, "/更新 安装").await;
    assert!(said.contains("已给存储做了快照"), "{said}");
    let kept = format!("版本 {v1} 运行正常，已保留");
    let good = wait_for_news(&sim, &guest, &kept, Duration::from_secs(1200)).await;
    assert!(good, "N+1 was not kept: {:?}\n{}", to_admins(&sim), guest.diagnose());
    let applied = asked.elapsed();
    assert_eq!(running(), v1);
    // Kept: systemd-bless-boot took the counter off its name, and root noted the releases.
    guest.run_until_ok("! ls /efi/EFI/Linux | grep -q +", Duration::from_secs(120));
    guest.run_until_ok(
        &format!("grep -q '\"running\": \"{v1}\"' /var/lib/zhuli-update/releases.json"),
        Duration::from_secs(120),
    );
    let ukis = esp();
    assert!(ukis.contains(&format!("zhuli_{v0}.efi")) && ukis.contains(&format!("zhuli_{v1}.efi ")), "{ukis}");
    assert!(!ukis.contains('+'), "a kept release carries no counter: {ukis}");
    let survey = guest.must("cat /var/lib/zhuli-update/releases.json; echo");
    assert!(survey.contains(&format!("\"running\": \"{v1}\"")), "{survey}");
    if crate::boot::secure_boot() {
        // Before writing, the installer found the db key's certificate in the new kernel image.
        let said =
            guest.must("journalctl --no-pager -o cat -u zhuli-update.service | grep -c 'Secure Boot db' || true");
        assert_ne!(said.trim(), "0", "no Secure Boot check of the kernel image in the installer's journal");
    }
    // The conversation stored under N is there under N+1.
    llm.push(Scripted::Text("三万元。".into()));
    let (said, _) = ask(&sim, "第三季度预算是多少？").await;
    assert!(said.contains("三万元"), "{said}");
    let last = llm.requests().last().cloned().expect("a model request");
    assert!(last.body.to_string().contains("第三季度预算是三万元"), "the conversation did not survive the update");
    let (status, _) = ask(&sim, "/更新").await;
    assert!(status.contains(&format!("正在运行的版本：{v1}")) && status.contains("/回退"), "{status}");

    // One bit flipped on the disk under the running root (a failing disk, or someone with the
    // raw device): dm-verity refuses the read with an I/O error, never hands out other bytes.
    // The probe runs one line at a time.
    let flipped = guest.must(&FLIP_A_BLOCK.lines().collect::<Vec<_>>().join("; "));
    assert!(flipped.contains("READ-FAILED") && flipped.contains("Input/output error"), "{flipped}");
    assert!(flipped.contains("verity") && flipped.contains("RESTORED"), "{flipped}");

    // Refusals, while N+1 runs: a bundle without its signature, an older release, and N+2
    // with one byte of its kernel image changed. Nothing is written for any of them.
    let news_count = |sim: &Simulator, needle: &str| to_admins(sim).iter().filter(|t| t.contains(needle)).count();
    let (gpt_before, esp_before) = (partitions(), esp());
    let unsigned = dir.join("unsigned");
    linked_copy(&n2, &unsigned);
    std::fs::remove_file(unsigned.join("SHA256SUMS.sig")).expect("unsign");
    let tampered = dir.join("tampered");
    linked_copy(&n2, &tampered);
    let uki = format!("zhuli_{v2}.efi");
    std::fs::remove_file(tampered.join(&uki)).expect("unlink");
    let mut bytes = std::fs::read(n2.join(&uki)).expect("uki");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(tampered.join(&uki), bytes).expect("one byte changed");
    // Each reason said in Chinese first, the journal's line after it.
    for (folder, why) in [(&unsigned, "更新包没有签名"), (&base, "设备不会通过更新降级"), (&tampered, "校验和不符")]
    {
        publish(folder);
        let before = news_count(&sim, "更新被拒绝");
        let (said, _) = ask(&sim, "/更新 安装").await;
        assert!(said.contains("已给存储做了快照"), "{said}");
        let told = sim.wait_until(Duration::from_secs(300), |s| news_count(s, "更新被拒绝") > before).await;
        if !told {
            eprintln!("{}", guest.diagnose());
        }
        assert!(told, "no refusal told for {}: {:?}\n{}", folder.display(), to_admins(&sim), guest.diagnose());
        let last = to_admins(&sim).into_iter().rev().find(|t| t.contains("更新被拒绝")).expect("refusal");
        assert!(last.contains(why), "{why}: {last}");
    }
    assert_eq!(partitions(), gpt_before, "a refused bundle changed the partition table");
    assert_eq!(esp(), esp_before, "a refused bundle changed the ESP");
    assert_eq!(running(), v1);

    // N+2, whose agent never gets READY, from a stick (as an office whose box reaches nothing
    // but DingTalk gets it): the same configuration and N+2's bundle in its update/ folder, on
    // a FAT32 stick of a gigabyte. Found bad, and the box is back on N+1 by itself.
    guest.unplug_stick();
    let stick2 = dir.join("stick-update.img");
    let written = std::process::Command::new(env!("CARGO_BIN_EXE_zhuli"))
        .args(["provision", "write", "--size-mb", "1024", "--config"])
        .arg(dir.join("zhuli.toml"))
        .arg("--image")
        .arg(&stick2)
        .arg("--update")
        .arg(&n2)
        .output()
        .expect("zhuli provision write");
    assert!(written.status.success(), "{}", String::from_utf8_lossy(&written.stderr));
    let asked2 = Instant::now();
    guest.plug_other_stick(&stick2, "stick2");
    let copied = format!("U盘上的版本 {v2} 已复制");
    let staged = wait_for_news(&sim, &guest, &copied, Duration::from_secs(600)).await;
    assert!(staged, "N+2 was not taken from the stick: {:?}\n{}", to_admins(&sim), guest.diagnose());
    let from_stick = asked2.elapsed();
    let bad = format!("版本 {v2} 没有通过健康检查");
    let back = wait_for_news(&sim, &guest, &bad, Duration::from_secs(1200)).await;
    assert!(back, "N+2 was not found bad: {:?}\n{}", to_admins(&sim), guest.diagnose());
    let fell_back = asked2.elapsed();
    let installed = format!("版本 {v2} 已安装");
    assert!(to_admins(&sim).iter().any(|t| t.contains(&installed)), "{:?}", to_admins(&sim));
    // When N+2 started, when its check gave up, when N+1 was up again: the box's own clock.
    let events = guest.must("cat /var/lib/zhuli-update/events.jsonl");
    eprintln!("boot-update: the update journal:\n{events}");
    let told = to_admins(&sim).into_iter().rev().find(|t| t.contains(&bad)).expect("told");
    assert!(told.contains(&format!("当前运行的版本：{v1}")), "{told}");
    assert!(told.contains("助理启动失败") || told.contains("助理没有在规定时间内就绪"), "why it failed: {told}");
    assert!(told.contains("start-limit-hit") || told.contains("not READY"), "the detail: {told}");
    assert_eq!(running(), v1);
    assert!(esp().contains(&format!("zhuli_{v2}+0")), "N+2 is marked bad on the ESP: {}", esp());
    eprintln!(
        "boot-update: N+1 fetched, installed, booted and kept {:.0} s after /更新 安装; N+2's stick plugged in → copied and checked in {:.0} s → installed, booted, found bad → back on N+1 and told in {:.0} s",
        applied.as_secs_f64(),
        from_stick.as_secs_f64(),
        fell_back.as_secs_f64()
    );

    // One flipped bit in the block that starts the system: N+2's slot, the first block of
    // systemd itself, and N+2 put on trial again with one try. dm-verity refuses the read, init
    // cannot be started, the kernel panics and restarts (panic=10), the boot costs the try, and
    // with none left systemd-boot starts N+1.
    let slot = format!("/dev/disk/by-partlabel/zhuli-root_{v2}");
    let corrupt = format!(
        "blk=$(debugfs -R 'bmap /usr/lib/systemd/systemd 0' {slot} 2>/dev/null); off=$((blk * 4096 + 100)); \
         orig=$(dd if={slot} bs=1 skip=$off count=1 2>/dev/null | od -An -tu1 | tr -d ' '); \
         printf \"\\\\$(printf %o $((orig ^ 4)))\" | dd of={slot} bs=1 seek=$off count=1 conv=notrunc,fsync 2>/dev/null; \
         cd /efi/EFI/Linux && mv zhuli_{v2}+0-*.efi zhuli_{v2}+1.efi && sync && echo CORRUPTED block $blk; ls"
    );
    let said = guest.must(&corrupt);
    assert!(said.contains("CORRUPTED block") && said.contains(&format!("zhuli_{v2}+1.efi")), "{said}");
    let console_before = guest.console_all().len();
    let rebooted = Instant::now();
    let _ = guest.run("systemctl reboot", Duration::from_secs(5));
    std::thread::sleep(Duration::from_secs(5));
    guest.run_until_ok("systemctl is-active zhuli.service", Duration::from_secs(900));
    let after = guest.console_all().get(console_before..).unwrap_or_default().to_owned();
    assert_eq!(running(), v1, "N+1 runs again");
    assert!(esp().contains(&format!("zhuli_{v2}+0-1.efi")), "the try of N+2 was spent: {}", esp());
    let panics = after.matches("Kernel panic").count();
    assert!(
        after.contains("verity") && panics >= 1,
        "a boot of N+2 stopped by dm-verity ({panics} panics):\n{}",
        after
            .lines()
            .filter(|l| l.contains("verity") || l.contains("panic") || l.contains("init"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    eprintln!(
        "boot-update: a flipped block under N+2's init: its boot stopped by dm-verity, back on N+1 in {:.0} s",
        rebooted.elapsed().as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
