//! The configuration stick: a FAT file system labelled `ZHULI-CFG`, read and written in place
//! through the block device or an image file — never mounted, so it needs no root on the
//! installer's laptop and tests can use plain image files.
//!
//! FAT frees a file's clusters without clearing them, so a secret once written to the stick
//! outlives the file that held it (truncated, rewritten, deleted, an editor's temporary copy).
//! Two rules keep that from happening: a file is only ever replaced after its old bytes have
//! been overwritten where they lie ([`write`]), and removing secrets after an import
//! overwrites them in place in the configuration file, then erases every other copy anywhere
//! on the device ([`erase_everywhere`]) — free clusters, the slack after a file's end, other
//! files. Nothing here logs a file's contents.

use std::{
    fs::{File, OpenOptions},
    io::{Read, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
};

pub const LABEL: &str = "ZHULI-CFG";
pub const CONFIG: &str = "zhuli.toml";
pub const SIGNATURE: &str = "zhuli.toml.sig";
pub const RECEIPT: &str = "zhuli-receipt.txt";
/// The box's diagnostics report, written at every insertion (text for people, JSON for tools).
pub const DIAGNOSTICS_TEXT: &str = "zhuli-diagnostics.txt";
pub const DIAGNOSTICS_JSON: &str = "zhuli-diagnostics.json";
/// Files on the stick larger than this are refused unread.
pub const MAX_FILE: u64 = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum StickError {
    #[error("cannot open {path}: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    #[error(
        "{0} holds no FAT file system; format it as a configuration stick with `zhuli provision write --device … --format` (this erases it)"
    )]
    NotFat(PathBuf),
    #[error(
        "{path} is labelled `{found}`, not `{LABEL}`; this is not a zhuli configuration stick (`zhuli provision write --device … --format` makes it one, erasing it)"
    )]
    Label { path: PathBuf, found: String },
    #[error(
        "{0} is read-only (a lock switch?): its secrets could not be removed after the import, so nothing was imported; unlock it and plug it in again"
    )]
    ReadOnly(PathBuf),
    #[error("{file} on the stick is {size} bytes; at most {MAX_FILE} are accepted")]
    TooLarge { file: String, size: u64 },
    #[error("reading or writing the stick failed ({0}); was it pulled out? Plug it in again")]
    Io(String),
    #[error("{file} on the stick changed during the import (its size is not what was read); plug the stick in again")]
    Changed { file: String },
}

fn io(e: std::io::Error) -> StickError {
    StickError::Io(e.to_string())
}

/// A read-only device for fatfs: writes fail, so reading never changes the stick.
struct ReadOnly(File);

impl Read for ReadOnly {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}
impl Seek for ReadOnly {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        self.0.seek(pos)
    }
}
impl Write for ReadOnly {
    fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
        Err(std::io::Error::new(std::io::ErrorKind::PermissionDenied, "opened read-only"))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn label_of<T: fatfs::ReadWriteSeek>(fs: &fatfs::FileSystem<T>) -> String {
    fs.volume_label().trim().to_owned()
}

/// The stick's file system, opened so that nothing can be written.
fn open_read_only(dev: &Path) -> Result<fatfs::FileSystem<ReadOnly>, StickError> {
    let f = File::open(dev).map_err(|source| StickError::Open { path: dev.to_owned(), source })?;
    fatfs::FileSystem::new(ReadOnly(f), fatfs::FsOptions::new()).map_err(|_| StickError::NotFat(dev.to_owned()))
}

/// The file `name` in the stick's root folder.
fn file_entry<'a, T: fatfs::ReadWriteSeek>(
    root: &fatfs::Dir<'a, T>,
    name: &str,
) -> Result<fatfs::DirEntry<'a, T>, StickError> {
    root.iter()
        .filter_map(Result::ok)
        .find(|e| e.is_file() && e.file_name() == name)
        .ok_or_else(|| StickError::Io(format!("{name} is not on the stick")))
}

/// Create an image file of `size` bytes with a fresh `ZHULI-CFG` file system holding `files`.
pub fn create_image(path: &Path, size: u64, files: &[(&str, &[u8])]) -> Result<(), StickError> {
    let open = |source| StickError::Open { path: path.to_owned(), source };
    let mut file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(path).map_err(open)?;
    file.set_len(size).map_err(io)?;
    format(&mut file)?;
    file.seek(SeekFrom::Start(0)).map_err(io)?;
    write_into(&mut file, path, files)
}

/// Format an existing device or image as `ZHULI-CFG` (FAT32 from about 512 MiB up, as a shop
/// stick comes), with a random volume id: the box tells sticks apart by it.
fn format(dev: &mut File) -> Result<(), StickError> {
    let mut label = [b' '; 11];
    label[..LABEL.len()].copy_from_slice(LABEL.as_bytes());
    let options = fatfs::FormatVolumeOptions::new().volume_label(label).volume_id(rand::random());
    fatfs::format_volume(&mut *dev, options).map_err(io)?;
    dev.sync_all().map_err(io)
}

/// Write `files` onto the stick at `dev` (a block device or an image file); with `format`, the
/// stick is formatted first (everything on it is lost).
pub fn write(dev: &Path, files: &[(&str, &[u8])], format_first: bool) -> Result<(), StickError> {
    let open = |source| StickError::Open { path: dev.to_owned(), source };
    let mut f = OpenOptions::new().read(true).write(true).open(dev).map_err(open)?;
    if format_first {
        format(&mut f)?;
        f.seek(SeekFrom::Start(0)).map_err(io)?;
    }
    write_into(&mut f, dev, files)
}

fn write_into(f: &mut File, path: &Path, files: &[(&str, &[u8])]) -> Result<(), StickError> {
    {
        let fs = fatfs::FileSystem::new(&mut *f, fatfs::FsOptions::new())
            .map_err(|_| StickError::NotFat(path.to_owned()))?;
        let found = label_of(&fs);
        if found != LABEL {
            return Err(StickError::Label { path: path.to_owned(), found });
        }
        {
            let root = fs.root_dir();
            let cluster = u64::from(fs.cluster_size());
            for (name, bytes) in files {
                let old_len = file_entry(&root, name).map(|e| e.len()).unwrap_or(0);
                let mut file = root.create_file(name).map_err(io)?;
                // The old bytes are overwritten where they lie, up to the end of their last
                // cluster, before any cluster is freed: a shorter file never leaves its
                // predecessor's tail (a secret, perhaps) in free space or in its own slack.
                let wipe = old_len.div_ceil(cluster) * cluster;
                zeros(&mut file, wipe)?;
                file.seek(SeekFrom::Start(0)).map_err(io)?;
                file.write_all(bytes).map_err(io)?;
                file.truncate().map_err(io)?;
                file.flush().map_err(io)?;
            }
        }
        fs.unmount().map_err(io)?;
    }
    f.sync_all().map_err(io)
}

fn zeros(out: &mut impl Write, mut n: u64) -> Result<(), StickError> {
    let block = [0u8; 8192];
    while n > 0 {
        let k = n.min(block.len() as u64) as usize;
        out.write_all(&block[..k]).map_err(io)?;
        n -= k as u64;
    }
    Ok(())
}

/// The stick's volume id (random per format; a cloned stick shares it).
pub fn volume_id(dev: &Path) -> Result<u32, StickError> {
    Ok(open_read_only(dev)?.volume_id())
}

/// Replace the bytes of file `name` with `bytes` of the same length, where they lie: no cluster
/// is freed or taken, so nothing of the old contents is left anywhere else. Refused when the
/// file's size is not `bytes.len()`.
pub fn overwrite_in_place(dev: &Path, name: &str, bytes: &[u8]) -> Result<(), StickError> {
    edit(dev, |fs| {
        let entry = file_entry(&fs.root_dir(), name)?;
        if entry.len() != bytes.len() as u64 {
            return Err(StickError::Changed { file: name.to_owned() });
        }
        let mut file = entry.to_file();
        file.write_all(bytes).map_err(io)?;
        file.flush().map_err(io)
    })
}

/// Open the stick `dev` for writing, check its label, let `change` do its work, then unmount
/// and flush it to the device.
fn edit(
    dev: &Path,
    change: impl FnOnce(&fatfs::FileSystem<&mut File>) -> Result<(), StickError>,
) -> Result<(), StickError> {
    let open = |source| StickError::Open { path: dev.to_owned(), source };
    let mut f = OpenOptions::new().read(true).write(true).open(dev).map_err(open)?;
    {
        let fs =
            fatfs::FileSystem::new(&mut f, fatfs::FsOptions::new()).map_err(|_| StickError::NotFat(dev.to_owned()))?;
        let found = label_of(&fs);
        if found != LABEL {
            return Err(StickError::Label { path: dev.to_owned(), found });
        }
        change(&fs)?;
        fs.unmount().map_err(io)?;
    }
    f.sync_all().map_err(io)
}

/// What [`erase_everywhere`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Erased {
    /// Bytes of the device read.
    pub scanned: u64,
    /// Copies of a pattern found, and overwritten with zeros (a piece of one at the edge of a
    /// free cluster counts as one).
    pub found: u64,
}

/// How much of the device is read at a time.
const ERASE_CHUNK: usize = 8 * 1024 * 1024;
/// A piece of a secret at least this long, at the edge of a free cluster, is erased: a deleted
/// file's clusters need not lie side by side, so a copy may be cut at any cluster boundary.
const MIN_PIECE: usize = 4;

/// Where the clusters of a FAT file system are, and which are free.
struct Clusters {
    /// Device offset of cluster 2.
    data_start: u64,
    size: u64,
    /// Cluster number − 2 → free.
    free: Vec<bool>,
}

impl Clusters {
    /// Read from the boot sector and the first FAT (12, 16 or 32 bits an entry).
    fn read(f: &File) -> std::io::Result<Clusters> {
        use std::os::unix::fs::FileExt;
        let mut boot = [0u8; 512];
        f.read_exact_at(&mut boot, 0)?;
        let u16_at = |i: usize| u64::from(u16::from_le_bytes([boot[i], boot[i + 1]]));
        let u32_at = |i: usize| u64::from(u32::from_le_bytes([boot[i], boot[i + 1], boot[i + 2], boot[i + 3]]));
        let sector = u16_at(11);
        let per_cluster = u64::from(boot[13]);
        let reserved = u16_at(14);
        let fats = u64::from(boot[16]);
        let root_entries = u16_at(17);
        let total = if u16_at(19) != 0 { u16_at(19) } else { u32_at(32) };
        let fat_sectors = if u16_at(22) != 0 { u16_at(22) } else { u32_at(36) };
        if sector == 0 || per_cluster == 0 || fat_sectors == 0 {
            return Err(std::io::Error::other("not a FAT boot sector"));
        }
        let root_sectors = (root_entries * 32).div_ceil(sector);
        let data_sector = reserved + fats * fat_sectors + root_sectors;
        let count = total.saturating_sub(data_sector) / per_cluster;
        let mut fat = vec![0u8; (fat_sectors * sector) as usize];
        f.read_exact_at(&mut fat, reserved * sector)?;
        let entry = |n: u64| -> u32 {
            let n = n as usize;
            let byte = |i: usize| u32::from(fat.get(i).copied().unwrap_or(0xff));
            if count < 4085 {
                let at = n + n / 2;
                let v = byte(at) | byte(at + 1) << 8;
                if n.is_multiple_of(2) { v & 0xfff } else { v >> 4 }
            } else if count < 65525 {
                byte(2 * n) | byte(2 * n + 1) << 8
            } else {
                (byte(4 * n) | byte(4 * n + 1) << 8 | byte(4 * n + 2) << 16 | byte(4 * n + 3) << 24) & 0x0fff_ffff
            }
        };
        Ok(Clusters {
            data_start: data_sector * sector,
            size: per_cluster * sector,
            free: (2..count + 2).map(|n| entry(n) == 0).collect(),
        })
    }

    fn free_at(&self, offset: u64) -> bool {
        offset >= self.data_start
            && self.free.get(((offset - self.data_start) / self.size) as usize).copied().unwrap_or(false)
    }
}

/// Read the whole device and overwrite with zeros every place where one of `patterns` occurs —
/// in a file, in a file's slack, in free clusters — and, at the edges of free clusters, every
/// piece of one ([`MIN_PIECE`] bytes or more) that a copy cut at a cluster boundary left; then
/// flush it to the device. `progress` is told (bytes read, device size) after each chunk. Empty
/// patterns are ignored.
pub fn erase_everywhere(
    dev: &Path,
    patterns: &[Vec<u8>],
    mut progress: impl FnMut(u64, u64) -> Result<(), StickError>,
) -> Result<Erased, StickError> {
    use std::os::unix::fs::FileExt;
    let open = |source| StickError::Open { path: dev.to_owned(), source };
    let mut f = OpenOptions::new().read(true).write(true).open(dev).map_err(open)?;
    let size = f.seek(SeekFrom::End(0)).map_err(io)?;
    let clusters = Clusters::read(&f).map_err(|_| StickError::NotFat(dev.to_owned()))?;
    let patterns: Vec<&[u8]> = patterns.iter().filter(|p| !p.is_empty()).map(Vec::as_slice).collect();
    let finders: Vec<memchr::memmem::Finder> = patterns.iter().map(memchr::memmem::Finder::new).collect();
    let longest = patterns.iter().map(|p| p.len()).max().unwrap_or(1);
    // A chunk's last `2 × longest` bytes are read again at the start of the next one, so a copy
    // that straddles two chunks is found, and a cluster boundary near the end is looked at with
    // the bytes on both sides.
    let keep = 2 * longest;
    let mut buf = vec![0u8; ERASE_CHUNK + keep];
    let (mut at, mut carried, mut found) = (0u64, 0usize, 0u64);
    // The next cluster boundary to look at.
    let mut boundary = clusters.data_start + clusters.size;
    loop {
        let mut filled = carried;
        while filled < buf.len() {
            let n = f.read_at(&mut buf[filled..], at + filled as u64).map_err(io)?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        let end = at + filled as u64;
        let last = end >= size || filled < buf.len();
        // Ranges (in `buf`) to erase.
        let mut hits: Vec<(usize, usize)> = Vec::new();
        for finder in &finders {
            hits.extend(finder.find_iter(&buf[..filled]).map(|start| (start, start + finder.needle().len())));
        }
        while boundary < end && (boundary + longest as u64 <= end || last) {
            let b = (boundary - at) as usize;
            let before = &buf[b.saturating_sub(longest)..b];
            let after = &buf[b..(b + longest).min(filled)];
            let (free_before, free_after) = (clusters.free_at(boundary - 1), clusters.free_at(boundary));
            for p in &patterns {
                // The first k bytes of a pattern ending a free cluster: only where its first byte is.
                if free_before {
                    for j in memchr::memchr_iter(p[0], before) {
                        let k = before.len() - j;
                        if (MIN_PIECE..p.len()).contains(&k) && before[j..] == p[..k] {
                            hits.push((b - k, b));
                        }
                    }
                }
                // The last k bytes of a pattern starting a free cluster: only where the byte
                // the cluster starts with is.
                if free_after && let Some(&first) = after.first() {
                    for i in memchr::memchr_iter(first, p) {
                        let k = p.len() - i;
                        if (MIN_PIECE..p.len()).contains(&k) && after.starts_with(&p[i..]) {
                            hits.push((b, b + k));
                        }
                    }
                }
            }
            boundary += clusters.size;
        }
        for (start, stop) in hits {
            if buf[start..stop].iter().all(|b| *b == 0) {
                continue;
            }
            buf[start..stop].fill(0);
            f.write_all_at(&buf[start..stop], at + start as u64).map_err(io)?;
            found += 1;
        }
        progress(end.min(size), size)?;
        if last {
            break;
        }
        let kept = keep.min(filled);
        buf.copy_within(filled - kept..filled, 0);
        at = end - kept as u64;
        carried = kept;
    }
    f.sync_all().map_err(io)?;
    Ok(Erased { scanned: size, found })
}

/// The folder of a release bundle on the stick (docs/UPDATES.md).
pub const UPDATE_DIR: &str = "update";

/// The files of folder `dir` on the stick with their sizes; empty when there is no such folder.
pub fn list_folder(dev: &Path, dir: &str) -> Result<Vec<(String, u64)>, StickError> {
    let fs = open_read_only(dev)?;
    let found = label_of(&fs);
    if found != LABEL {
        return Err(StickError::Label { path: dev.to_owned(), found });
    }
    let root = fs.root_dir();
    let Some(folder) =
        root.iter().filter_map(Result::ok).find(|e| e.is_dir() && e.file_name().eq_ignore_ascii_case(dir))
    else {
        return Ok(vec![]);
    };
    let mut files = Vec::new();
    for e in folder.to_dir().iter() {
        let e = e.map_err(io)?;
        if e.is_file() {
            files.push((e.file_name(), e.len()));
        }
    }
    Ok(files)
}

/// Copy file `name` of folder `dir` (a `/`-separated path) on the stick into `out`, at most `max` bytes; the bytes
/// copied.
pub fn copy_from_folder(dev: &Path, dir: &str, name: &str, out: &mut impl Write, max: u64) -> Result<u64, StickError> {
    let fs = open_read_only(dev)?;
    // `dir` may be a `/`-separated path; names are matched regardless of case.
    let folder = fs.root_dir().open_dir(dir).map_err(|_| StickError::Io(format!("{dir}/ is not on the stick")))?;
    let entry = file_entry(&folder, name)?;
    if entry.len() > max {
        return Err(StickError::TooLarge { file: format!("{dir}/{name}"), size: entry.len() });
    }
    let copied = std::io::copy(&mut entry.to_file().take(max), out).map_err(io)?;
    if copied != entry.len() {
        return Err(StickError::Changed { file: format!("{dir}/{name}") });
    }
    Ok(copied)
}

/// Put the files of `from` (a local folder, e.g. a release bundle) into folder `dir` on the
/// stick, replacing files of the same names; they are streamed, not held in memory.
pub fn write_folder(dev: &Path, dir: &str, from: &[(String, PathBuf)]) -> Result<(), StickError> {
    edit(dev, |fs| {
        let folder = fs.root_dir().create_dir(dir).map_err(io)?;
        for (name, path) in from {
            let mut source = File::open(path).map_err(|source| StickError::Open { path: path.clone(), source })?;
            let mut file = folder.create_file(name).map_err(io)?;
            file.truncate().map_err(io)?;
            std::io::copy(&mut source, &mut file).map_err(io)?;
            file.flush().map_err(io)?;
        }
        Ok(())
    })
}

/// What is on a stick.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contents {
    /// Every file in the root folder with its size.
    pub files: Vec<(String, u64)>,
    pub writable: bool,
}

/// List the stick's root folder, checking its label; `writable` says whether it can be changed.
pub fn list(dev: &Path) -> Result<Contents, StickError> {
    let writable = OpenOptions::new().read(true).write(true).open(dev).is_ok();
    let fs = open_read_only(dev)?;
    let found = label_of(&fs);
    if found != LABEL {
        return Err(StickError::Label { path: dev.to_owned(), found });
    }
    let mut files = Vec::new();
    for e in fs.root_dir().iter() {
        let e = e.map_err(io)?;
        if e.is_file() {
            files.push((e.file_name(), e.len()));
        }
    }
    Ok(Contents { files, writable })
}

/// Read one file of the stick (at most [`MAX_FILE`] bytes).
pub fn read(dev: &Path, name: &str) -> Result<Vec<u8>, StickError> {
    let fs = open_read_only(dev)?;
    let entry = file_entry(&fs.root_dir(), name)?;
    if entry.len() > MAX_FILE {
        return Err(StickError::TooLarge { file: name.to_owned(), size: entry.len() });
    }
    let mut bytes = Vec::with_capacity(entry.len() as usize);
    entry.to_file().take(MAX_FILE + 1).read_to_end(&mut bytes).map_err(io)?;
    Ok(bytes)
}

/// The suffix of a folder [`write_whole_folder`] is still writing (or a pulled stick left).
pub const PARTIAL: &str = ".part";

/// A folder on the stick and the files in it with their sizes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Folder {
    pub name: String,
    pub files: Vec<(String, u64)>,
}

/// The folders inside folder `dir` (a `/`-separated path) with their files; empty when there
/// is no such folder.
pub fn list_subfolders(dev: &Path, dir: &str) -> Result<Vec<Folder>, StickError> {
    let fs = open_read_only(dev)?;
    let found = label_of(&fs);
    if found != LABEL {
        return Err(StickError::Label { path: dev.to_owned(), found });
    }
    let Ok(parent) = fs.root_dir().open_dir(dir) else { return Ok(vec![]) };
    let mut folders = Vec::new();
    for e in parent.iter() {
        let e = e.map_err(io)?;
        let name = e.file_name();
        if !e.is_dir() || name == "." || name == ".." {
            continue;
        }
        let mut files = Vec::new();
        for f in e.to_dir().iter() {
            let f = f.map_err(io)?;
            if f.is_file() {
                files.push((f.file_name(), f.len()));
            }
        }
        folders.push(Folder { name, files });
    }
    Ok(folders)
}

/// What the stick has room for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Space {
    /// Bytes in free clusters, counted in the FAT (not taken from FAT32's FSInfo hint, which
    /// another system may have left wrong).
    pub free: u64,
    pub cluster: u64,
}

impl Space {
    /// What a file of `bytes` takes on this stick: whole clusters.
    pub fn taken_by(&self, bytes: u64) -> u64 {
        bytes.div_ceil(self.cluster.max(1)) * self.cluster
    }
}

pub fn space(dev: &Path) -> Result<Space, StickError> {
    let f = File::open(dev).map_err(|source| StickError::Open { path: dev.to_owned(), source })?;
    let clusters = Clusters::read(&f).map_err(|_| StickError::NotFat(dev.to_owned()))?;
    let free = clusters.free.iter().filter(|f| **f).count() as u64;
    Ok(Space { free: free * clusters.size, cluster: clusters.size })
}

/// Write `files` (local paths, streamed in this order) as folder `path` (a `/`-separated path
/// whose parents are made when missing): into `<path>.part` first, renamed to `path` once every
/// file is whole, so a stick pulled out meanwhile never shows a folder of that name half
/// written. A leftover `<path>.part` is replaced; an existing `path` is refused.
pub fn write_whole_folder(dev: &Path, path: &str, files: &[(String, PathBuf)]) -> Result<(), StickError> {
    let (parent, name) = path.rsplit_once('/').unwrap_or(("", path));
    let part = format!("{name}{PARTIAL}");
    edit(dev, |fs| {
        let mut dir = fs.root_dir();
        for component in parent.split('/').filter(|c| !c.is_empty()) {
            dir = dir.create_dir(component).map_err(io)?;
        }
        if dir.iter().filter_map(Result::ok).any(|e| e.file_name().eq_ignore_ascii_case(name)) {
            return Err(StickError::Io(format!("{path} is on the stick already")));
        }
        if dir.iter().filter_map(Result::ok).any(|e| e.is_dir() && e.file_name().eq_ignore_ascii_case(&part)) {
            remove_tree(&dir, &part)?;
        }
        let folder = dir.create_dir(&part).map_err(io)?;
        let mut buf = vec![0u8; 1 << 20];
        for (file_name, local) in files {
            let mut source = open_regular(local)?;
            let mut file = folder.create_file(file_name).map_err(io)?;
            file.truncate().map_err(io)?;
            loop {
                let n = source.read(&mut buf).map_err(io)?;
                if n == 0 {
                    break;
                }
                file.write_all(&buf[..n]).map_err(io)?;
            }
            file.flush().map_err(io)?;
        }
        drop(folder);
        // One directory entry rewritten: the folder has its final name, or (pulled out in
        // between) no entry at all — its clusters are then lost until the stick is checked.
        dir.rename(&part, &dir, name).map_err(io)
    })
}

/// Open the local file `path` to be copied onto the stick: never through a symbolic link (as
/// its last component), and only a regular file, as the handle read from says — so nothing
/// else swapped in under its name is copied. Opened without blocking, so a named pipe is refused
/// rather than waited on.
fn open_regular(path: &Path) -> Result<File, StickError> {
    use std::os::unix::fs::OpenOptionsExt;
    let refused = |source| StickError::Open { path: path.to_owned(), source };
    let flags = nix::fcntl::OFlag::O_NOFOLLOW | nix::fcntl::OFlag::O_NONBLOCK;
    let file = OpenOptions::new().read(true).custom_flags(flags.bits()).open(path).map_err(refused)?;
    if !file.metadata().map_err(refused)?.is_file() {
        return Err(refused(std::io::Error::other("not a regular file")));
    }
    Ok(file)
}

/// The files of folder `path` (a `/`-separated path) with their sizes, as its entries say;
/// `None` when there is no such folder.
pub fn files_in(dev: &Path, path: &str) -> Result<Option<Vec<(String, u64)>>, StickError> {
    let fs = open_read_only(dev)?;
    let Ok(folder) = fs.root_dir().open_dir(path) else { return Ok(None) };
    let mut files = Vec::new();
    for e in folder.iter() {
        let e = e.map_err(io)?;
        if e.is_file() {
            files.push((e.file_name(), e.len()));
        }
    }
    Ok(Some(files))
}

/// Remove folder `path` (a `/`-separated path) and the files in it.
pub fn remove_folder(dev: &Path, path: &str) -> Result<(), StickError> {
    let (parent, name) = path.rsplit_once('/').unwrap_or(("", path));
    edit(dev, |fs| {
        let root = fs.root_dir();
        let dir = if parent.is_empty() { root } else { root.open_dir(parent).map_err(io)? };
        remove_tree(&dir, name)
    })
}

/// Remove folder `name` of `dir` and the files in it (a folder inside it is an error).
fn remove_tree<T: fatfs::ReadWriteSeek>(dir: &fatfs::Dir<'_, T>, name: &str) -> Result<(), StickError> {
    let folder = dir.open_dir(name).map_err(io)?;
    let files: Vec<String> =
        folder.iter().filter_map(Result::ok).filter(|e| e.is_file()).map(|e| e.file_name()).collect();
    for f in files {
        folder.remove(&f).map_err(io)?;
    }
    drop(folder);
    dir.remove(name).map_err(io)
}
