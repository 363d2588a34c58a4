//! The store key's recovery copy with the real binary: a box's import puts its store key,
//! sealed to the organisation key, on the stick's receipt (never the key itself); on a laptop
//! the receipt and org.key open the box's backups, another organisation's key is refused; on a
//! new box a restored store is re-sealed under that box's own key.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use zhuli::{
    provision::sign,
    store::{Store, key::StoreKey},
};
use zhuli_sim::dingtalk::Simulator;

use crate::{
    provision::{Box, config_text, receipt_on, s, zhuli},
    support,
};

fn said(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn holds(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Write, sign and put `text` on a new stick image.
fn stick_with(laptop: &Path, org_key: &Path, text: &str, serial: u64) -> PathBuf {
    let cfg = laptop.join(format!("zhuli-{serial}.toml"));
    std::fs::write(&cfg, text).expect("config");
    let signed = zhuli(&["provision", "sign", "--key", &s(org_key), &s(&cfg)]);
    assert!(signed.status.success(), "{}", said(&signed));
    let img = laptop.join(format!("stick-{serial}.img"));
    let written = zhuli(&["provision", "write", "--config", &s(&cfg), "--image", &s(&img)]);
    assert!(written.status.success(), "{}", said(&written));
    img
}

fn snapshot_in(dir: &Path) -> PathBuf {
    std::fs::read_dir(dir)
        .expect("backups")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("zhuli-snapshot-")))
        .expect("a snapshot")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receipts_recovery_copy_opens_the_boxs_backups_with_org_key_and_only_with_it() {
    let sim = Simulator::start(support::sim_config()).await.expect("simulator");
    let b = Box::new("recovery");
    let laptop = b.dir.join("laptop");
    for keys in ["keys", "other"] {
        let out = zhuli(&["provision", "keygen", "--out", &s(&laptop.join(keys))]);
        assert!(out.status.success(), "{}", said(&out));
    }
    let org_key = laptop.join("keys/org.key");
    let other_key = laptop.join("other/org.key");
    let org_id: String =
        sign::public_key(&std::fs::read_to_string(laptop.join("keys/org.pub")).expect("org.pub"), "org.pub")
            .expect("public key")
            .chars()
            .take(16)
            .collect();

    // The box's store key, sealed as zhuli-store-key.service seals it.
    let text = config_text(&sim, &b.dir, 1);
    let key = StoreKey::read(&b.dir.join("store-key")).expect("store key");
    std::fs::create_dir_all(&b.root).expect("root");
    let sealed = b.root.join("store-key.cred");
    let out = Command::new("systemd-creds")
        .args(["encrypt", "--with-key=auto", "--name=store-key"])
        .arg(b.dir.join("store-key"))
        .arg(&sealed)
        .output()
        .expect("systemd-creds is needed for this test: apt-get install systemd (or run .ci/run)");
    assert!(out.status.success(), "{}", said(&out));

    // The import (secrets sealed too, as on a box) puts the copy on the receipt.
    let img = stick_with(&laptop, &org_key, &text, 1);
    let imported = b.import_command(&img, false).output().expect("import");
    assert!(imported.status.success(), "{}", said(&imported));
    let receipt = receipt_on(&img);
    assert!(
        receipt.contains(&format!("store key recovery copy: zhuli-store-key-recovery v1 x25519 org:{org_id} box:")),
        "{receipt}"
    );
    assert!(receipt.contains("`zhuli restore --recovery`") && !receipt.contains("error:"), "{receipt}");
    // The plain key is nowhere: not on the receipt, not anywhere on the stick, not in what the
    // import said.
    let stick_bytes = std::fs::read(&img).expect("stick");
    for (what, bytes) in [
        ("the receipt", receipt.as_bytes()),
        ("the stick", stick_bytes.as_slice()),
        ("stdout", imported.stdout.as_slice()),
        ("stderr", imported.stderr.as_slice()),
    ] {
        for needle in [hex(key.bytes()), hex(key.bytes()).to_ascii_uppercase()] {
            assert!(!holds(bytes, needle.as_bytes()), "{what} holds the store key in hex");
        }
        assert!(!holds(bytes, key.bytes()), "{what} holds the store key's bytes");
    }

    // A store on the box, and a backup of it.
    let store_file = b.dir.join("state/zhuli.redb");
    std::fs::create_dir_all(b.dir.join("state")).expect("state");
    Store::open(&store_file, &key, Default::default())
        .expect("store")
        .set_setting("kept", "across boxes")
        .expect("setting");
    let backups = b.dir.join("backups");
    let out = zhuli(&["backup", "--config", &s(&laptop.join("zhuli-1.toml")), "--to", &s(&backups)]);
    assert!(out.status.success(), "{}", said(&out));
    let snap = s(&snapshot_in(&backups));

    // On a laptop: the receipt, the snapshot and org.key; no configuration, no store key.
    let desk = laptop.join("desk");
    std::fs::create_dir_all(&desk).expect("desk");
    let copy = desk.join("zhuli-receipt.txt");
    std::fs::write(&copy, &receipt).expect("receipt");
    let (copy, recovered_key, restored) = (s(&copy), desk.join("store-key"), desk.join("zhuli.redb"));

    // Another organisation's key: refused by name, nothing written.
    for args in [
        vec!["store", "recover-key", "--recovery", &copy, "--org-key", &s(&other_key), "--out", &s(&recovered_key)],
        vec!["backup", "--verify", &snap, "--recovery", &copy, "--org-key", &s(&other_key)],
        vec!["restore", "--from", &snap, "--store", &s(&restored), "--recovery", &copy, "--org-key", &s(&other_key)],
    ] {
        let out = zhuli(&args);
        let said = said(&out);
        assert!(!out.status.success(), "{args:?}: {said}");
        assert!(
            said.contains(&format!("was sealed to the organisation key {org_id}…"))
                && said.contains("use that key's org.key"),
            "{args:?}: {said}"
        );
    }
    assert!(!recovered_key.exists() && !restored.exists(), "a refused key writes nothing");
    // A copy changed by one character: refused, it does not open.
    let changed = desk.join("changed.txt");
    let line = receipt.lines().find(|l| l.contains("zhuli-store-key-recovery")).expect("line");
    let last = line.chars().last().expect("a last character");
    let flipped = format!("{}{}", &line[..line.len() - 1], if last == '0' { '1' } else { '0' });
    std::fs::write(&changed, flipped).expect("changed copy");
    let out = zhuli(&[
        "store",
        "recover-key",
        "--recovery",
        &s(&changed),
        "--org-key",
        &s(&org_key),
        "--out",
        &s(&recovered_key),
    ]);
    assert!(!out.status.success() && said(&out).contains("does not open"), "{}", said(&out));
    // Not a copy at all.
    let out = zhuli(&["backup", "--verify", &snap, "--recovery", &s(&org_key), "--org-key", &s(&org_key)]);
    assert!(!out.status.success() && said(&out).contains("holds no store key recovery copy"), "{}", said(&out));

    // With org.key: the snapshot is checked and restored, and the key written for later.
    let out = zhuli(&["backup", "--verify", &snap, "--recovery", &copy, "--org-key", &s(&org_key)]);
    assert!(out.status.success() && said(&out).contains("is good"), "{}", said(&out));
    let out =
        zhuli(&["store", "recover-key", "--recovery", &copy, "--org-key", &s(&org_key), "--out", &s(&recovered_key)]);
    assert!(out.status.success(), "{}", said(&out));
    assert_eq!(StoreKey::read(&recovered_key).expect("recovered").bytes(), key.bytes());
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&recovered_key).expect("stat").permissions());
    assert_eq!(mode & 0o777, 0o600);
    assert!(!holds(&out.stdout, hex(key.bytes()).as_bytes()), "the key is written to its file only");
    let again =
        zhuli(&["store", "recover-key", "--recovery", &copy, "--org-key", &s(&org_key), "--out", &s(&recovered_key)]);
    assert!(!again.status.success() && said(&again).contains("cannot write a new store key"), "{}", said(&again));
    let out = zhuli(&["backup", "--verify", &snap, "--key-file", &s(&recovered_key)]);
    assert!(out.status.success() && said(&out).contains("is good"), "{}", said(&out));
    let out =
        zhuli(&["restore", "--from", &snap, "--store", &s(&restored), "--recovery", &copy, "--org-key", &s(&org_key)]);
    assert!(out.status.success() && said(&out).contains("restored"), "{}", said(&out));
    let store = Store::open(&restored, &key, Default::default()).expect("the restored store opens with the box's key");
    assert_eq!(store.setting("kept").expect("setting").as_deref(), Some("across boxes"));
    drop(store);

    // A new box with its own store key: restored under its configuration, the store is
    // re-sealed under that key, which its agent opens it with.
    let new_box = support::temp_dir("recovery-newbox");
    let new_config = new_box.join("zhuli.toml");
    std::fs::write(&new_config, config_text(&sim, &new_box, 1)).expect("new box config");
    std::fs::create_dir_all(new_box.join("state")).expect("state");
    let out = zhuli(&["restore", "--config", &s(&new_config), "--from", &snap, "--key-file", &s(&recovered_key)]);
    assert!(out.status.success() && said(&out).contains("re-sealed"), "{}", said(&out));
    let new_key = StoreKey::read(&new_box.join("store-key")).expect("new box key");
    let store = Store::open(&new_box.join("state/zhuli.redb"), &new_key, Default::default()).expect("opens");
    assert_eq!(store.setting("kept").expect("setting").as_deref(), Some("across boxes"));
    drop(store);
    let _ = std::fs::remove_dir_all(&new_box);

    // A box whose store key is missing says so on the receipt, and imports all the same.
    std::fs::remove_file(&sealed).expect("remove the sealed key");
    let img = stick_with(&laptop, &org_key, &config_text(&sim, &b.dir, 2), 2);
    let out = b.import_command(&img, false).output().expect("import");
    let receipt = receipt_on(&img);
    assert!(out.status.success() && receipt.contains("result: imported serial 2"), "{}", said(&out));
    assert!(
        receipt.contains("error: no store key recovery copy on this receipt: the box has no store key yet"),
        "{receipt}"
    );
    // A development box (plain credentials) seals the key its configuration names.
    let img = stick_with(&laptop, &org_key, &config_text(&sim, &b.dir, 3), 3);
    let out = b.import_command(&img, true).output().expect("import");
    assert!(out.status.success(), "{}", said(&out));
    std::fs::write(&copy, receipt_on(&img)).expect("receipt");
    let out = zhuli(&[
        "store",
        "recover-key",
        "--recovery",
        &copy,
        "--org-key",
        &s(&org_key),
        "--out",
        &s(&desk.join("dev-key")),
    ]);
    assert!(out.status.success(), "{}", said(&out));
    assert_eq!(StoreKey::read(&desk.join("dev-key")).expect("dev key").bytes(), key.bytes());
}
