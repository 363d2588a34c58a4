//! Which releases are on the box, in what state, and going back to the one before.
//!
//! Only root may read the ESP and the disk, so root writes what it sees to
//! `/var/lib/zhuli-update/releases.json` (at every boot, by zhuli-survey.service once boot
//! counting has had its say, at each run of `zhuli update pull`, and after every install,
//! check or rollback); the agent reads that file for `/update` and `zhuli doctor`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{
    Version,
    gpt::{self, Entry},
    install::{InstallError, uki_version},
};

/// Where the survey is kept (`/var/lib/zhuli-update/releases.json` on the box).
pub fn survey_path() -> std::path::PathBuf {
    super::dir().join("releases.json")
}

/// Where the firmware's variables are (efivarfs).
pub const EFIVARS: &str = "/sys/firmware/efi/efivars";

/// What the firmware says of Secure Boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecureBoot {
    /// Enforced: only what an enrolled key signed starts.
    On,
    /// Keys may be in place, but nothing is checked.
    Off,
    /// No platform key: nothing is checked, and keys may be enrolled (systemd-boot does so from
    /// the ESP at the next boot when the image carries them).
    SetupMode,
    /// Not booted through UEFI, or its variables cannot be read.
    Unknown,
}

impl SecureBoot {
    /// Read from the firmware's global variables (each file: 4 bytes of attributes, then the
    /// value).
    pub fn read(efivars: &Path) -> SecureBoot {
        const GLOBAL: &str = "8be4df61-93ca-11d2-aa0d-00e098032b8c";
        let flag =
            |name: &str| std::fs::read(efivars.join(format!("{name}-{GLOBAL}"))).ok().map(|v| v.get(4) == Some(&1));
        match (flag("SecureBoot"), flag("SetupMode")) {
            (Some(true), _) => SecureBoot::On,
            (_, Some(true)) => SecureBoot::SetupMode,
            (Some(false), _) => SecureBoot::Off,
            (None, _) => SecureBoot::Unknown,
        }
    }

    /// For the diagnostics report and the doctor.
    pub fn says(self) -> &'static str {
        match self {
            SecureBoot::On => "on (only kernel images signed with an enrolled key start)",
            SecureBoot::Off => "off (the firmware starts any kernel image; docs/SECURITY.md, Secure Boot)",
            SecureBoot::SetupMode => {
                "setup mode (no keys enrolled, nothing checked; docs/INSTALL.md, Secure Boot, enrolls them)"
            }
            SecureBoot::Unknown => "unknown (not booted through UEFI, or its variables are not readable)",
        }
    }
}

/// One kernel image on the ESP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    pub version: String,
    /// Its file in `EFI/Linux/`.
    pub file: String,
    /// `kept` (no counter), `trial` (tries left), `bad` (no tries left).
    pub state: String,
    /// Tries left while on trial.
    #[serde(default)]
    pub tries_left: u32,
    /// Its root slot is on the disk with the UUIDs its root hash gives (so it can boot).
    pub slot_present: bool,
    /// The store schema it writes (`ZHULI_STORE_SCHEMA` in its os-release), when it says.
    #[serde(default)]
    pub store_schema: Option<u32>,
}

/// What root saw.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Survey {
    pub at_ms: i64,
    pub running: String,
    /// Newest first.
    pub releases: Vec<Release>,
    /// A release newer than the running one, fetched and waiting for its window.
    #[serde(default)]
    pub available: Option<String>,
}

impl Survey {
    /// The release a rollback would start: the newest older than the running one that is not
    /// bad and whose slot is there.
    pub fn previous(&self) -> Option<&Release> {
        let running: Version = self.running.parse().ok()?;
        self.releases
            .iter()
            .filter(|r| r.version.parse::<Version>().is_ok_and(|v| v < running))
            .find(|r| r.slot_present && r.state != "bad")
    }
}

/// The root hash a kernel image carries (`roothash=` in its `.cmdline` section), found by
/// reading the file: the section is plain text inside the PE image.
pub fn uki_root_hash(image: &[u8]) -> Option<String> {
    memchr::memmem::find_iter(image, b"roothash=").find_map(|at| {
        let hex = &image[at + 9..];
        let len = hex.iter().take_while(|b| b.is_ascii_hexdigit()).count();
        (len == 64).then(|| String::from_utf8_lossy(&hex[..64]).into_owned())
    })
}

/// Look at the ESP's kernel images and the partition table.
pub fn survey(esp: &Path, entries: &[Entry], running: &str, now_ms: i64) -> Survey {
    let linux = esp.join("EFI/Linux");
    let mut releases: Vec<(Version, Release)> = std::fs::read_dir(&linux)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| {
            let file = e.file_name().to_string_lossy().into_owned();
            let version = uki_version(&file)?;
            let left = super::install::tries_left(&file);
            let state = match left {
                None => "kept",
                Some(0) => "bad",
                Some(_) => "trial",
            };
            let head = super::uki_head(&e.path()).ok();
            let slot_present = head.as_deref().and_then(uki_root_hash).is_some_and(|h| {
                let (root, verity) = gpt::slot_uuids(&h);
                entries.iter().any(|e| e.uuid == root) && entries.iter().any(|e| e.uuid == verity)
            });
            let store_schema = head.as_deref().and_then(|h| super::uki_os_release_number(h, "ZHULI_STORE_SCHEMA"));
            let r = Release {
                version: version.to_string(),
                file,
                state: state.into(),
                tries_left: left.unwrap_or(0),
                slot_present,
                store_schema,
            };
            Some((version, r))
        })
        .collect();
    releases.sort_by(|a, b| b.0.cmp(&a.0));
    Survey {
        at_ms: now_ms,
        running: running.to_owned(),
        releases: releases.into_iter().map(|(_, r)| r).collect(),
        available: None,
    }
}

/// Read the survey root last wrote; None when there is none.
pub fn read(path: &Path) -> Option<Survey> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// Write the survey (readable by the agent), replacing the last one whole.
pub fn write(path: &Path, survey: &Survey) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    let mut text = serde_json::to_vec_pretty(survey).map_err(std::io::Error::other)?;
    text.push(b'\n');
    std::fs::write(&tmp, text)?;
    std::fs::rename(tmp, path)
}

/// Go back to the release before: the running one's image is marked bad (no tries left), the
/// previous one's put on trial for one boot; if the previous is healthy it is kept, if not the
/// boot loader comes back to the running one. Returns the previous version.
pub fn rollback(esp: &Path, survey: &Survey) -> Result<String, InstallError> {
    let layout = |m: &str| InstallError::Layout(m.to_owned());
    let previous = survey.previous().ok_or_else(|| {
        InstallError::Layout(
            "there is no earlier release on this box to go back to (or its slot was overwritten)".into(),
        )
    })?;
    let running = survey
        .releases
        .iter()
        .find(|r| r.version == survey.running)
        .ok_or_else(|| layout("the running release's kernel image is not on the ESP"))?;
    let linux = esp.join("EFI/Linux");
    let rename = |from: &str, to: String| {
        std::fs::rename(linux.join(from), linux.join(&to))
            .map_err(|source| InstallError::Io { what: format!("cannot rename {from} to {to}"), source })
    };
    // The previous first: should the second rename fail, the running one still boots first.
    rename(&previous.file, format!("zhuli_{}+1.efi", previous.version))?;
    rename(&running.file, format!("zhuli_{}+0.efi", running.version))?;
    std::fs::File::open(&linux)
        .and_then(|d| d.sync_all())
        .map_err(|source| InstallError::Io { what: "cannot sync the ESP".into(), source })?;
    Ok(previous.version.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secure_boot_is_read_from_the_firmware_variables() {
        let dir =
            std::env::temp_dir().join(format!("zhuli-efivars-{}-{:x}", std::process::id(), rand::random::<u32>()));
        std::fs::create_dir_all(&dir).expect("dir");
        let set = |name: &str, v: u8| {
            std::fs::write(dir.join(format!("{name}-8be4df61-93ca-11d2-aa0d-00e098032b8c")), [6, 0, 0, 0, v])
                .expect("var")
        };
        assert_eq!(SecureBoot::read(&dir), SecureBoot::Unknown);
        set("SecureBoot", 0);
        set("SetupMode", 1);
        assert_eq!(SecureBoot::read(&dir), SecureBoot::SetupMode);
        set("SetupMode", 0);
        assert_eq!(SecureBoot::read(&dir), SecureBoot::Off);
        set("SecureBoot", 1);
        assert_eq!(SecureBoot::read(&dir), SecureBoot::On);
        assert!(SecureBoot::read(&dir).says().starts_with("on"));
        std::fs::remove_dir_all(&dir).expect("clean");
    }

    fn esp_with(files: &[(&str, &str)]) -> std::path::PathBuf {
        let esp = std::env::temp_dir().join(format!("zhuli-esp-{}-{:x}", std::process::id(), rand::random::<u32>()));
        std::fs::create_dir_all(esp.join("EFI/Linux")).expect("esp");
        for (name, hash) in files {
            let image = format!("MZ\0\0stub\0.cmdline\0roothash={hash} root=/dev/mapper/zhuli-root ro\0.linux\0");
            std::fs::write(esp.join("EFI/Linux").join(name), image).expect("uki");
        }
        esp
    }

    fn entries_for(hashes: &[&str]) -> Vec<Entry> {
        hashes
            .iter()
            .enumerate()
            .flat_map(|(i, h)| {
                let (r, v) = gpt::slot_uuids(h);
                [(r, gpt::ROOT_X86_64), (v, gpt::ROOT_VERITY_X86_64)].into_iter().enumerate().map(
                    move |(j, (uuid, t))| Entry {
                        number: 2 + 2 * i + j,
                        type_guid: t.into(),
                        uuid,
                        first_lba: 0,
                        last_lba: 0,
                        name: String::new(),
                    },
                )
            })
            .collect()
    }

    #[test]
    fn the_survey_reads_states_and_slots_and_names_the_previous_release() {
        let (a, b, gone) = ("a".repeat(64), "b".repeat(64), "c".repeat(64));
        let esp = esp_with(&[("zhuli_1.1.0+2-1.efi", &b), ("zhuli_1.0.0.efi", &a), ("zhuli_0.9.0.efi", &gone)]);
        let s = survey(&esp, &entries_for(&[&a, &b]), "1.1.0", 7);
        let seen: Vec<(&str, &str, u32, bool)> =
            s.releases.iter().map(|r| (r.version.as_str(), r.state.as_str(), r.tries_left, r.slot_present)).collect();
        assert_eq!(seen, vec![("1.1.0", "trial", 2, true), ("1.0.0", "kept", 0, true), ("0.9.0", "kept", 0, false)]);
        assert_eq!(s.previous().map(|r| r.version.as_str()), Some("1.0.0"));
        // Its slot overwritten: no previous.
        let s = survey(&esp, &entries_for(&[&b]), "1.1.0", 7);
        assert_eq!(s.previous(), None);
        std::fs::remove_dir_all(&esp).expect("clean");
    }

    #[test]
    fn a_rollback_puts_the_previous_on_trial_and_the_running_last() {
        let (a, b) = ("a".repeat(64), "b".repeat(64));
        let esp = esp_with(&[("zhuli_1.1.0.efi", &b), ("zhuli_1.0.0.efi", &a)]);
        let s = survey(&esp, &entries_for(&[&a, &b]), "1.1.0", 7);
        assert_eq!(rollback(&esp, &s).expect("rollback"), "1.0.0");
        let mut names: Vec<String> = std::fs::read_dir(esp.join("EFI/Linux"))
            .expect("ls")
            .map(|e| e.expect("e").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, vec!["zhuli_1.0.0+1.efi", "zhuli_1.1.0+0.efi"]);
        // Nothing to go back to from the oldest.
        let s = survey(&esp, &entries_for(&[&a, &b]), "1.0.0", 8);
        let e = rollback(&esp, &s).expect_err("nothing older");
        assert!(e.to_string().contains("no earlier release"), "{e}");
        std::fs::remove_dir_all(&esp).expect("clean");
    }

    #[test]
    fn counters_and_root_hashes_are_read_from_names_and_images() {
        assert_eq!(super::super::install::tries_left("zhuli_1.0.0+3.efi"), Some(3));
        assert_eq!(super::super::install::tries_left("zhuli_1.0.0+0-3.efi"), Some(0));
        assert_eq!(super::super::install::tries_left("zhuli_1.0.0.efi"), None);
        let h = "0123456789abcdef".repeat(4);
        assert_eq!(uki_root_hash(format!("xx roothash={h} ro").as_bytes()), Some(h.clone()));
        assert_eq!(uki_root_hash(b"roothash=abc ro"), None);
        assert_eq!(uki_root_hash(format!("roothash=%s roothash={h}").as_bytes()), Some(h.clone()));
        assert_eq!(uki_root_hash(b"no command line"), None);
    }
}
