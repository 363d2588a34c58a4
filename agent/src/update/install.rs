//! Installing a checked release into the inactive slot.
//!
//! The order is what keeps every moment safe to lose power in:
//! 1. the bundle is checked (signature, sha256, product, version, room) before anything else;
//! 2. kernel images of releases other than the running one leave the ESP, so nothing can boot
//!    the slot about to be overwritten;
//! 3. the inactive slot is named empty in the partition table;
//! 4. root and verity data are written, then read back from the disk and their sha256 compared;
//! 5. the slot takes the new release's name and the UUIDs its root hash gives it;
//! 6. the new kernel image lands on the ESP under a temporary name and is renamed, with its try
//!    counter, into `EFI/Linux/`: only then can the boot loader see it.
//!
//! Cut short anywhere, the running release and its kernel image are as they were, and the next
//! boot starts it; installing again starts over.

use std::{
    fs::{File, OpenOptions},
    io::{Read, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
};

use super::{
    BundleError, Checked, Room, Version,
    gpt::{self, Entry, Gpt, GptError},
};

/// The inactive slot's UUIDs while it holds no release.
pub const EMPTY_ROOT_UUID: &str = "7a1b0c52-0004-4e5f-8a9b-0c1d2e3f4a5b";
pub const EMPTY_VERITY_UUID: &str = "7a1b0c52-0005-4e5f-8a9b-0c1d2e3f4a5b";

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error(transparent)]
    Gpt(#[from] GptError),
    #[error("this box's disk is not laid out for updates: {0}; flash the current image once")]
    Layout(String),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("{file} cannot be unpacked: {why}; the bundle is damaged, get it again")]
    Unpack { file: String, why: String },
    #[error(
        "the {part} written to the inactive slot does not read back as it should (sha256 differs): the disk may be failing; nothing was switched, the running release stays"
    )]
    Verify { part: &'static str },
    #[error(
        "release {0} is still on trial (not kept yet); installing another now would remove the last kept release; try again once it is kept"
    )]
    OnTrial(Version),
    #[error(
        "the kernel image {uki} is not signed with a key this box's firmware trusts, and Secure Boot is on: it would not start; build the release with the same ZHULI_SB_KEYS as the image the box was flashed with (docs/UPDATES.md, Secure Boot)"
    )]
    NotTrusted { uki: String },
}

impl InstallError {
    /// The reason as a code the admin chat says in the box's language (see [`super::news`]).
    pub fn code(&self) -> &'static str {
        match self {
            InstallError::Bundle(b) => b.code(),
            InstallError::OnTrial(_) => "trial",
            InstallError::NotTrusted { .. } => "secure_boot",
            InstallError::Unpack { .. } => "malformed",
            InstallError::Gpt(_) | InstallError::Layout(_) | InstallError::Io { .. } | InstallError::Verify { .. } => {
                "write"
            }
        }
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> InstallError {
    let what = what.into();
    move |source| InstallError::Io { what, source }
}

/// The two slots on the boot disk: the one running and the one an update fills.
#[derive(Debug, Clone)]
pub struct Slots {
    pub active: (Entry, Entry),
    pub inactive: (Entry, Entry),
}

/// Find the slots in the partition table: each root partition with the verity partition right
/// after it; the active one is the one whose UUID the running root hash gives.
pub fn slots(entries: &[Entry], running_root_hash: &str) -> Result<Slots, InstallError> {
    let (active_uuid, _) = gpt::slot_uuids(running_root_hash);
    let pairs: Vec<(Entry, Entry)> = entries
        .iter()
        .filter(|e| e.type_guid == gpt::ROOT_X86_64)
        .filter_map(|root| {
            let verity =
                entries.iter().find(|v| v.number == root.number + 1 && v.type_guid == gpt::ROOT_VERITY_X86_64)?;
            Some((root.clone(), verity.clone()))
        })
        .collect();
    if pairs.len() != 2 {
        return Err(InstallError::Layout(format!("{} root slots with verity data, not 2", pairs.len())));
    }
    let (active, inactive): (Vec<_>, Vec<_>) = pairs.into_iter().partition(|(r, _)| r.uuid == active_uuid);
    match (active.into_iter().next(), inactive.into_iter().next()) {
        (Some(active), Some(inactive)) => Ok(Slots { active, inactive }),
        _ => Err(InstallError::Layout(format!("no root slot has the UUID {active_uuid} of the running root hash"))),
    }
}

/// The try counter in a kernel image's name: `+LEFT` or `+LEFT-DONE`; None without one.
pub fn tries_left(file: &str) -> Option<u32> {
    let stem = file.strip_suffix(".efi")?;
    let (_, counter) = stem.split_once('+')?;
    counter.split('-').next()?.parse().ok()
}

/// The version in a kernel image's file name on the ESP (`zhuli_1.4.0.efi`, `zhuli_1.4.0+2-1.efi`).
pub fn uki_version(name: &str) -> Option<Version> {
    let stem = name.strip_prefix("zhuli_")?.strip_suffix(".efi")?;
    stem.split('+').next()?.parse().ok()
}

/// What to install into, and from what.
pub struct Target<'a> {
    /// The boot disk (a block device; a disk image in tests).
    pub disk: &'a Path,
    /// Its logical sector size.
    pub sector: u64,
    /// The ESP's mount point.
    pub esp: &'a Path,
    /// The running release and its root hash.
    pub running: &'a Version,
    pub running_root_hash: &'a str,
    /// The vendor's public key (hex).
    pub vendor_key: &'a str,
    /// Tries the new release gets before the boot loader gives up on it.
    pub tries: u32,
    /// With Secure Boot on: the certificates of the firmware's `db`, one of which must have
    /// signed the new kernel image (see [`super::firmware`]).
    pub secure_boot_db: Option<&'a [Vec<u8>]>,
}

/// What an install did.
#[derive(Debug)]
pub struct Installed {
    pub version: Version,
    /// The slot's partition numbers (root, verity).
    pub slot: (usize, usize),
    /// The kernel image's file name on the ESP.
    pub uki: String,
    /// Kernel images of older releases taken off the ESP.
    pub removed: Vec<String>,
}

/// Check the bundle in `dir` and install it into the inactive slot (module docs: the order).
/// `progress` hears each step in one line.
pub fn install(dir: &Path, target: &Target, mut progress: impl FnMut(String)) -> Result<Installed, InstallError> {
    let mut disk = OpenOptions::new()
        .read(true)
        .write(true)
        .open(target.disk)
        .map_err(io(format!("cannot open {}", target.disk.display())))?;
    let mut table = Gpt::read(&mut disk, target.sector)?;
    let slots = slots(&table.entries(), target.running_root_hash)?;
    let (root, verity) = &slots.inactive;
    let linux = target.esp.join("EFI/Linux");
    let room = Room {
        root_slot: root.bytes(target.sector),
        verity_slot: verity.bytes(target.sector),
        esp_free: esp_free(target.esp)? + kept_elsewhere(&linux, target.running)?,
    };
    let checked = super::check(dir, target.vendor_key, target.running, room)?;
    let m = &checked.manifest;
    // The running release on trial: the other slot holds the last kept release, and only that
    // one can take the box back should the running one be found bad.
    if on_trial(&linux, target.running)? {
        return Err(InstallError::OnTrial(target.running.clone()));
    }
    if let Some(db) = target.secure_boot_db {
        let uki = checked.dir.join(&m.uki);
        let signatures = super::firmware::pe_signatures(&uki).map_err(io(format!("cannot read {}", uki.display())))?;
        if !super::firmware::signed_by(&signatures, db) {
            return Err(InstallError::NotTrusted { uki: m.uki.clone() });
        }
        progress(format!("{} is signed with a key in the firmware's Secure Boot db", m.uki));
    }
    progress(format!("release {} checked: signed, every sha256 matches, it fits", m.version));

    let removed = remove_others(&linux, target.running)?;
    for name in &removed {
        progress(format!("took {name} off the ESP (its slot is about to be overwritten)"));
    }
    table.set(root.number, EMPTY_ROOT_UUID, "zhuli-root_empty")?;
    table.set(verity.number, EMPTY_VERITY_UUID, "zhuli-verity_empty")?;
    table.write(&mut disk)?;

    for (part, what, entry) in [(&m.root, "root file system", root), (&m.verity, "verity data", verity)] {
        progress(format!("writing the {what} ({} bytes) to partition {}", part.bytes, entry.number));
        let offset = entry.first_lba * target.sector;
        write_part(&checked, &part.file, part.bytes, &mut disk, offset)?;
        let read_back = read_back(&mut disk, offset, part.bytes).map_err(io(format!("cannot read back the {what}")))?;
        if read_back != part.sha256 {
            return Err(InstallError::Verify { part: what });
        }
    }
    progress("both parts read back with the right sha256".into());

    let (root_uuid, verity_uuid) = gpt::slot_uuids(&m.root_hash);
    table.set(root.number, &root_uuid, &format!("zhuli-root_{}", m.version))?;
    table.set(verity.number, &verity_uuid, &format!("zhuli-verity_{}", m.version))?;
    table.write(&mut disk)?;

    let uki = format!("zhuli_{}+{}.efi", m.version, target.tries);
    let digest = checked.digest(&m.uki).unwrap_or_default();
    place_uki(&checked.dir.join(&m.uki), &digest, &linux, &uki)?;
    progress(format!("{uki} is on the ESP: the next boot tries release {} ({} tries)", m.version, target.tries));
    Ok(Installed { version: m.version.clone(), slot: (root.number, verity.number), uki, removed })
}

/// The running root hash: `roothash=` on the kernel command line.
pub fn running_root_hash(cmdline: &str) -> Option<String> {
    cmdline.split_whitespace().find_map(|a| a.strip_prefix("roothash=")).map(str::to_owned)
}

/// The disk the running root slot is on, and its logical sector size, found through the
/// partition UUID the root hash gives (`/dev/disk/by-partuuid/…`) and sysfs.
pub fn boot_disk(running_root_hash: &str) -> Result<(PathBuf, u64), InstallError> {
    let (uuid, _) = gpt::slot_uuids(running_root_hash);
    let link = PathBuf::from("/dev/disk/by-partuuid").join(&uuid);
    let part =
        link.canonicalize().map_err(|_| InstallError::Layout(format!("no partition {uuid} holds the running root")))?;
    let name = part.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let sys =
        Path::new("/sys/class/block").join(&name).canonicalize().map_err(io(format!("no sysfs entry for {name}")))?;
    let disk = sys.parent().and_then(Path::file_name).map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let sector = std::fs::read_to_string(Path::new("/sys/class/block").join(&disk).join("queue/logical_block_size"))
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .ok_or_else(|| InstallError::Layout(format!("{name} is not a partition of a disk")))?;
    Ok((PathBuf::from("/dev").join(disk), sector))
}

fn esp_free(esp: &Path) -> Result<u64, InstallError> {
    let s = nix::sys::statvfs::statvfs(esp).map_err(|e| InstallError::Io {
        what: format!("cannot see the free space of {}", esp.display()),
        source: e.into(),
    })?;
    Ok(s.blocks_available() * s.fragment_size())
}

/// Kernel images of the ESP that the install removes: their room counts as free.
fn kept_elsewhere(linux: &Path, running: &Version) -> Result<u64, InstallError> {
    Ok(others(linux, running)?.iter().filter_map(|p| p.metadata().ok()).map(|m| m.len()).sum())
}

fn others(linux: &Path, running: &Version) -> Result<Vec<PathBuf>, InstallError> {
    let list = match std::fs::read_dir(linux) {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(io(format!("cannot list {}", linux.display()))(e)),
    };
    let mut found: Vec<PathBuf> = list
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            // A half-copied image from an install cut short goes too.
            name.ends_with(".part") || uki_version(name).is_some_and(|v| &v != running)
        })
        .collect();
    found.sort();
    Ok(found)
}

/// Is the running release's kernel image still counting tries (`zhuli_1.4.0+2-1.efi`)?
fn on_trial(linux: &Path, running: &Version) -> Result<bool, InstallError> {
    let list = match std::fs::read_dir(linux) {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io(format!("cannot list {}", linux.display()))(e)),
    };
    Ok(list.filter_map(Result::ok).any(|e| {
        let name = e.file_name().to_string_lossy().into_owned();
        uki_version(&name).is_some_and(|v| &v == running) && tries_left(&name).is_some()
    }))
}

fn remove_others(linux: &Path, running: &Version) -> Result<Vec<String>, InstallError> {
    let mut removed = Vec::new();
    for path in others(linux, running)? {
        std::fs::remove_file(&path).map_err(io(format!("cannot remove {}", path.display())))?;
        removed.push(path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
    }
    sync_dir(linux)?;
    Ok(removed)
}

fn sync_dir(dir: &Path) -> Result<(), InstallError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(format!("cannot sync {}", dir.display())))
}

/// Copy `part` (unpacked with zstd when it ends in `.zst`) to `disk` at `offset`: exactly
/// `bytes` bytes, or an error.
fn write_part(checked: &Checked, file: &str, bytes: u64, disk: &mut File, offset: u64) -> Result<(), InstallError> {
    let path = checked.dir.join(file);
    let unpack = |why: String| InstallError::Unpack { file: file.to_owned(), why };
    let mut child = None;
    let mut source: Box<dyn Read> = if file.ends_with(".zst") {
        let mut c = std::process::Command::new("zstd")
            .args(["-dc", "--no-progress", "--"])
            .arg(&path)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| unpack(format!("zstd does not start: {e}")))?;
        let out = c.stdout.take().ok_or_else(|| unpack("no output from zstd".into()))?;
        child = Some(c);
        Box::new(out)
    } else {
        Box::new(File::open(&path).map_err(io(format!("cannot open {}", path.display())))?)
    };
    let mut buf = vec![0u8; 1 << 20];
    let mut written = 0u64;
    loop {
        // Whole pieces: a piece of zeros (most of a file system's free space) is zeroed by the
        // disk itself where it can (no data through the bus, nothing allocated on thin disks).
        let mut n = 0;
        while n < buf.len() {
            match source.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(unpack(e.to_string())),
            }
        }
        if n == 0 {
            break;
        }
        if written + n as u64 > bytes {
            return Err(unpack(format!("it holds more than the {bytes} bytes its manifest says")));
        }
        let at = offset + written;
        if !(buf[..n].iter().all(|b| *b == 0) && zero_out(disk, at, n as u64)) {
            disk.seek(SeekFrom::Start(at)).map_err(io("cannot seek on the disk"))?;
            disk.write_all(&buf[..n]).map_err(io("cannot write the inactive slot"))?;
        }
        written += n as u64;
    }
    if let Some(c) = child {
        let out = c.wait_with_output().map_err(|e| unpack(e.to_string()))?;
        if !out.status.success() {
            return Err(unpack(String::from_utf8_lossy(&out.stderr).trim().to_owned()));
        }
    }
    if written != bytes {
        return Err(unpack(format!("it holds {written} bytes, not the {bytes} its manifest says")));
    }
    disk.sync_data().map_err(io("cannot flush the inactive slot to the disk"))
}

/// Zero `len` bytes at `at` without writing them (the disk's write-zeroes, or a hole); false
/// where that is not possible, and the caller writes the zeros.
fn zero_out(disk: &File, at: u64, len: u64) -> bool {
    use nix::fcntl::{FallocateFlags, fallocate};
    let (Ok(at), Ok(len)) = (i64::try_from(at), i64::try_from(len)) else { return false };
    fallocate(disk, FallocateFlags::FALLOC_FL_ZERO_RANGE, at, len).is_ok()
        || fallocate(disk, FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE, at, len).is_ok()
}

/// The sha256 of `bytes` bytes at `offset`, read from the disk itself (its cached pages dropped
/// first).
fn read_back(disk: &mut File, offset: u64, bytes: u64) -> std::io::Result<String> {
    use std::os::fd::AsFd;
    let _ = nix::fcntl::posix_fadvise(
        disk.as_fd(),
        offset as i64,
        bytes as i64,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    );
    disk.seek(SeekFrom::Start(offset))?;
    crate::tools::sha256_of_read(&mut disk.take(bytes))
}

/// Copy the kernel image under a name the boot loader ignores, flush it, read it back and
/// compare its sha256 with the signed one, then rename it in.
fn place_uki(from: &Path, sha256: &str, linux: &Path, name: &str) -> Result<(), InstallError> {
    std::fs::create_dir_all(linux).map_err(io(format!("cannot create {}", linux.display())))?;
    let part = linux.join(format!(".{name}.part"));
    std::fs::copy(from, &part).map_err(io(format!("cannot copy the kernel image to {}", linux.display())))?;
    File::open(&part).and_then(|f| f.sync_all()).map_err(io("cannot flush the kernel image"))?;
    let mut copy = File::open(&part).map_err(io("cannot read back the kernel image"))?;
    let _ = nix::fcntl::posix_fadvise(
        std::os::fd::AsFd::as_fd(&copy),
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    );
    let found = crate::tools::sha256_of_read(&mut copy).map_err(io("cannot read back the kernel image"))?;
    if found != sha256 {
        let _ = std::fs::remove_file(&part);
        return Err(InstallError::Verify { part: "kernel image" });
    }
    std::fs::rename(&part, linux.join(name)).map_err(io("cannot rename the kernel image into place"))?;
    sync_dir(linux)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provision::sign::{self, Role};

    fn tmp(name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!(
            "zhuli-install-{}-{:x}-{name}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&p).expect("tmp");
        p
    }

    const RUNNING_HASH: &str = "1111111111111111222222222222222233333333333333334444444444444444";

    /// A box's disk: ESP, slot A (running 1.0.0), slot B (empty), var; 512-byte sectors.
    fn box_disk(path: &Path) {
        let (a, av) = gpt::slot_uuids(RUNNING_HASH);
        gpt::tests::disk(
            path,
            16384,
            &[
                ("c12a7328-f81f-11d2-ba4b-00a0c93ec93b", "7a1b0c52-0001-4e5f-8a9b-0c1d2e3f4a5b", 2048, 2559, "esp"),
                (gpt::ROOT_X86_64, &a, 2560, 6655, "zhuli-root_1.0.0"),
                (gpt::ROOT_VERITY_X86_64, &av, 6656, 6783, "zhuli-verity_1.0.0"),
                (gpt::ROOT_X86_64, EMPTY_ROOT_UUID, 6784, 10879, "zhuli-root_empty"),
                (gpt::ROOT_VERITY_X86_64, EMPTY_VERITY_UUID, 10880, 11007, "zhuli-verity_empty"),
                (
                    "4d21b016-b534-45c2-a9fb-5c16e091fd2d",
                    "7a1b0c52-0003-4e5f-8a9b-0c1d2e3f4a5b",
                    11008,
                    16000,
                    "zhuli-var",
                ),
            ],
        );
    }

    /// A signed bundle of `version` whose root is `root` (zstd-packed when `pack`).
    fn bundle(dir: &Path, key: &str, version: &str, root: &[u8], pack: bool) -> String {
        let verity = vec![0x5au8; 8192];
        let root_hash = "9".repeat(64);
        let mut root_file = format!("zhuli_{version}.root.raw");
        std::fs::write(dir.join(&root_file), root).expect("root");
        if pack {
            let ok = std::process::Command::new("zstd")
                .args(["-q", "--rm"])
                .arg(dir.join(&root_file))
                .status()
                .expect("zstd");
            assert!(ok.success());
            root_file.push_str(".zst");
        }
        std::fs::write(dir.join(format!("zhuli_{version}.verity.raw")), &verity).expect("verity");
        std::fs::write(dir.join(format!("zhuli_{version}.efi")), super::super::tests::fake_uki(version, &root_hash))
            .expect("uki");
        std::fs::write(
            dir.join(super::super::MANIFEST),
            format!(
                "product = \"zhuli\"\nversion = \"{version}\"\narchitecture = \"x86-64\"\nuki = \"zhuli_{version}.efi\"\n\
                 root_hash = \"{root_hash}\"\n[root]\nfile = \"{root_file}\"\nbytes = {}\nsha256 = \"{}\"\n\
                 [verity]\nfile = \"zhuli_{version}.verity.raw\"\nbytes = 8192\nsha256 = \"{}\"\n",
                root.len(),
                crate::tools::sha256_hex(root),
                crate::tools::sha256_hex(&verity)
            ),
        )
        .expect("manifest");
        super::super::seal_bundle(dir, key).expect("sign");
        root_hash
    }

    struct Box_ {
        disk: PathBuf,
        esp: PathBuf,
        vendor_pub: String,
        vendor_key: String,
        running: Version,
    }

    fn a_box() -> Box_ {
        let base = tmp("box");
        let disk = base.join("disk.img");
        box_disk(&disk);
        let esp = base.join("esp");
        std::fs::create_dir_all(esp.join("EFI/Linux")).expect("esp");
        std::fs::write(esp.join("EFI/Linux/zhuli_1.0.0.efi"), b"MZ running").expect("running uki");
        std::fs::write(esp.join("EFI/Linux/zhuli_0.9.0+0-3.efi"), b"MZ an old bad one").expect("old uki");
        let (key, public) = sign::keygen_for(Role::Vendor);
        let vendor_pub = sign::public_key_for(Role::Vendor, &public, "vendor.pub").expect("pub");
        Box_ { disk, esp, vendor_pub, vendor_key: key, running: "1.0.0".parse().expect("v") }
    }

    impl Box_ {
        fn target(&self) -> Target<'_> {
            Target {
                disk: &self.disk,
                sector: 512,
                esp: &self.esp,
                running: &self.running,
                running_root_hash: RUNNING_HASH,
                vendor_key: &self.vendor_pub,
                tries: 3,
                secure_boot_db: None,
            }
        }
        fn read(&self, first_lba: u64, len: usize) -> Vec<u8> {
            let mut f = File::open(&self.disk).expect("disk");
            f.seek(SeekFrom::Start(first_lba * 512)).expect("seek");
            let mut b = vec![0u8; len];
            f.read_exact(&mut b).expect("read");
            b
        }
        fn ukis(&self) -> Vec<String> {
            let mut n: Vec<String> = std::fs::read_dir(self.esp.join("EFI/Linux"))
                .expect("ls")
                .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                .collect();
            n.sort();
            n
        }
    }

    #[test]
    fn a_release_goes_into_the_inactive_slot_and_nothing_else_changes() {
        let b = a_box();
        let dir = tmp("bundle");
        // Data, a whole piece of zeros (zeroed, not written), data again; the slot held old
        // bytes everywhere, which must not show through.
        let mut root: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        root.extend(vec![0u8; 1 << 20]);
        root.extend((0..1000u32).map(|i| (i % 7) as u8));
        {
            let mut f = OpenOptions::new().write(true).open(&b.disk).expect("disk");
            f.seek(SeekFrom::Start(6784 * 512)).expect("seek");
            f.write_all(&vec![0xeeu8; root.len()]).expect("old data");
        }
        let root_hash = bundle(&dir, &b.vendor_key, "1.1.0", &root, true);
        let running_root = b.read(2560, 4096 * 512);
        let mut said = Vec::new();
        let done = install(&dir, &b.target(), |s| said.push(s)).expect("install");
        assert_eq!(done.slot, (4, 5));
        assert_eq!(done.uki, "zhuli_1.1.0+3.efi");
        assert_eq!(done.removed, vec!["zhuli_0.9.0+0-3.efi".to_owned()]);
        assert_eq!(b.read(6784, root.len()), root, "the root is in slot B");
        assert_eq!(b.read(10880, 8192), vec![0x5au8; 8192], "the verity data is beside it");
        assert_eq!(b.read(2560, 4096 * 512), running_root, "slot A is untouched");
        let entries = Gpt::read(&mut File::open(&b.disk).expect("disk"), 512).expect("gpt").entries();
        let (ru, vu) = gpt::slot_uuids(&root_hash);
        assert_eq!((entries[3].name.as_str(), entries[3].uuid.as_str()), ("zhuli-root_1.1.0", ru.as_str()));
        assert_eq!((entries[4].name.as_str(), entries[4].uuid.as_str()), ("zhuli-verity_1.1.0", vu.as_str()));
        assert_eq!(entries[1].name, "zhuli-root_1.0.0");
        assert_eq!(b.ukis(), vec!["zhuli_1.0.0.efi".to_owned(), "zhuli_1.1.0+3.efi".to_owned()]);
        assert!(said.iter().any(|s| s.contains("read back")), "{said:?}");
        // The same release again: already there is not running, but the box runs 1.0.0 still,
        // so it is installed again over itself, cleanly.
        install(&dir, &b.target(), |_| {}).expect("again");
        assert_eq!(b.ukis(), vec!["zhuli_1.0.0.efi".to_owned(), "zhuli_1.1.0+3.efi".to_owned()]);
    }

    #[test]
    fn a_bad_bundle_writes_nothing() {
        let b = a_box();
        let dir = tmp("bundle");
        bundle(&dir, &b.vendor_key, "1.1.0", &[3u8; 4096], false);
        // One byte of the root changed after signing.
        let mut root = std::fs::read(dir.join("zhuli_1.1.0.root.raw")).expect("root");
        root[100] ^= 1;
        std::fs::write(dir.join("zhuli_1.1.0.root.raw"), &root).expect("tamper");
        let before = std::fs::read(&b.disk).expect("disk");
        let e = install(&dir, &b.target(), |_| {}).expect_err("tampered");
        assert!(matches!(e, InstallError::Bundle(BundleError::Digest { .. })), "{e}");
        assert!(std::fs::read(&b.disk).expect("disk") == before, "the disk was written");
        assert_eq!(b.ukis().len(), 2, "the ESP was changed");
        // A root larger than the slot: refused before anything is written.
        let dir = tmp("big");
        bundle(&dir, &b.vendor_key, "1.1.0", &vec![1u8; 4096 * 512 + 1], false);
        let e = install(&dir, &b.target(), |_| {}).expect_err("too big");
        assert!(matches!(e, InstallError::Bundle(BundleError::Space { .. })), "{e}");
        assert!(std::fs::read(&b.disk).expect("disk") == before, "the disk was written");
    }

    #[test]
    fn a_part_that_unpacks_to_the_wrong_size_stops_before_the_switch() {
        let b = a_box();
        let dir = tmp("bundle");
        let root = vec![4u8; 4096];
        bundle(&dir, &b.vendor_key, "1.1.0", &root, false);
        // Signed, but the manifest's byte count disagrees with the file: the vendor's mistake.
        let m = std::fs::read_to_string(dir.join(super::super::MANIFEST)).expect("manifest");
        std::fs::write(dir.join(super::super::MANIFEST), m.replacen("bytes = 4096", "bytes = 4000", 1)).expect("edit");
        super::super::seal_bundle(&dir, &b.vendor_key).expect("re-sign");
        let e = install(&dir, &b.target(), |_| {}).expect_err("wrong size");
        assert!(matches!(e, InstallError::Unpack { .. }), "{e}");
        // The slot was named empty and no kernel image points at it: the next boot is the old one.
        let entries = Gpt::read(&mut File::open(&b.disk).expect("disk"), 512).expect("gpt").entries();
        assert_eq!(entries[3].name, "zhuli-root_empty");
        assert_eq!(b.ukis(), vec!["zhuli_1.0.0.efi".to_owned()]);
    }

    #[test]
    fn no_install_while_the_running_release_is_on_trial() {
        let b = a_box();
        let dir = tmp("bundle");
        bundle(&dir, &b.vendor_key, "1.1.0", &[3u8; 4096], false);
        // 1.0.0 was booted on trial and not judged yet: the other slot holds the last kept one.
        let linux = b.esp.join("EFI/Linux");
        std::fs::rename(linux.join("zhuli_1.0.0.efi"), linux.join("zhuli_1.0.0+2-1.efi")).expect("trial");
        let before = std::fs::read(&b.disk).expect("disk");
        let e = install(&dir, &b.target(), |_| {}).expect_err("on trial");
        assert!(matches!(&e, InstallError::OnTrial(v) if v.to_string() == "1.0.0"), "{e}");
        assert_eq!(e.code(), "trial");
        assert!(std::fs::read(&b.disk).expect("disk") == before, "the disk was written");
        assert_eq!(b.ukis(), vec!["zhuli_0.9.0+0-3.efi".to_owned(), "zhuli_1.0.0+2-1.efi".to_owned()]);
        // Kept: it goes in.
        std::fs::rename(linux.join("zhuli_1.0.0+2-1.efi"), linux.join("zhuli_1.0.0.efi")).expect("kept");
        install(&dir, &b.target(), |_| {}).expect("install");
    }

    #[test]
    fn under_secure_boot_a_kernel_image_the_firmware_would_refuse_is_not_installed() {
        let b = a_box();
        let dir = tmp("bundle");
        bundle(&dir, &b.vendor_key, "1.1.0", &[3u8; 4096], false);
        let before = std::fs::read(&b.disk).expect("disk");
        // The test bundle's kernel image carries no signature table.
        let db = vec![b"0\x82 the organisation's db certificate".to_vec()];
        let target = Target { secure_boot_db: Some(&db), ..b.target() };
        let e = install(&dir, &target, |_| {}).expect_err("not signed for this firmware");
        assert!(matches!(&e, InstallError::NotTrusted { uki } if uki == "zhuli_1.1.0.efi"), "{e}");
        assert_eq!(e.code(), "secure_boot");
        assert!(e.to_string().contains("ZHULI_SB_KEYS"), "{e}");
        assert!(std::fs::read(&b.disk).expect("disk") == before, "the disk was written");
        assert_eq!(b.ukis().len(), 2, "the ESP was changed");
    }

    #[test]
    fn slots_are_found_by_the_running_root_hash() {
        let base = tmp("slots");
        let disk = base.join("disk.img");
        box_disk(&disk);
        let entries = Gpt::read(&mut File::open(&disk).expect("disk"), 512).expect("gpt").entries();
        let s = slots(&entries, RUNNING_HASH).expect("slots");
        assert_eq!((s.active.0.number, s.active.1.number, s.inactive.0.number, s.inactive.1.number), (2, 3, 4, 5));
        let e = slots(&entries, &"f".repeat(64)).expect_err("no such slot");
        assert!(e.to_string().contains("flash the current image"), "{e}");
        assert_eq!(uki_version("zhuli_1.4.0+2-1.efi"), Some("1.4.0".parse().expect("v")));
        assert_eq!(uki_version("zhuli_1.4.0.efi"), Some("1.4.0".parse().expect("v")));
        assert_eq!(uki_version("other.efi"), None);
        assert_eq!(running_root_hash("roothash=ab12 root=/dev/mapper/zhuli-root ro").as_deref(), Some("ab12"));
        assert_eq!(running_root_hash("root=PARTUUID=x ro"), None);
    }
}
