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
/// Files on the stick larger than this are refused unread.
pub const MAX_FILE: u64 = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum StickError {
    #[error("cannot open {path}: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("{0} holds no FAT file system; write the stick with `zhuli provision write`")]
    NotFat(PathBuf),
    #[error("{path} is labelled `{found}`, not `{LABEL}`; this is not a zhuli configuration stick")]
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
    let open = |source| StickError::Open { path: dev.to_owned(), source };
    let mut f = OpenOptions::new().read(true).write(true).open(dev).map_err(open)?;
    {
        let fs =
            fatfs::FileSystem::new(&mut f, fatfs::FsOptions::new()).map_err(|_| StickError::NotFat(dev.to_owned()))?;
        let found = label_of(&fs);
        if found != LABEL {
            return Err(StickError::Label { path: dev.to_owned(), found });
        }
        {
            let entry = file_entry(&fs.root_dir(), name)?;
            if entry.len() != bytes.len() as u64 {
                return Err(StickError::Changed { file: name.to_owned() });
            }
            let mut file = entry.to_file();
            file.write_all(bytes).map_err(io)?;
            file.flush().map_err(io)?;
        }
        fs.unmount().map_err(io)?;
    }
    f.sync_all().map_err(io)
}

/// What [`erase_everywhere`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Erased {
    /// Bytes of the device read.
    pub scanned: u64,
    /// Copies of a pattern found, and overwritten with zeros.
    pub found: u64,
}

/// How much of the device is read at a time.
const ERASE_CHUNK: usize = 8 * 1024 * 1024;

/// Read the whole device and overwrite with zeros every place where one of `patterns` occurs —
/// in a file, in a file's slack, in free clusters — then flush it to the device. `progress` is
/// told (bytes read, device size) after each chunk. Empty patterns are ignored.
pub fn erase_everywhere(
    dev: &Path,
    patterns: &[Vec<u8>],
    mut progress: impl FnMut(u64, u64) -> Result<(), StickError>,
) -> Result<Erased, StickError> {
    use std::os::unix::fs::FileExt;
    let open = |source| StickError::Open { path: dev.to_owned(), source };
    let mut f = OpenOptions::new().read(true).write(true).open(dev).map_err(open)?;
    let size = f.seek(SeekFrom::End(0)).map_err(io)?;
    let finders: Vec<memchr::memmem::Finder> =
        patterns.iter().filter(|p| !p.is_empty()).map(memchr::memmem::Finder::new).collect();
    let longest = finders.iter().map(|f| f.needle().len()).max().unwrap_or(1);
    // A chunk's last `longest - 1` bytes are read again at the start of the next one, so a copy
    // that straddles two chunks is found.
    let mut buf = vec![0u8; ERASE_CHUNK + longest];
    let (mut at, mut carried, mut found) = (0u64, 0usize, 0u64);
    loop {
        let mut filled = carried;
        while filled < buf.len() {
            let n = f.read_at(&mut buf[filled..], at + filled as u64).map_err(io)?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        let mut hits: Vec<(usize, usize)> = Vec::new();
        for finder in &finders {
            hits.extend(finder.find_iter(&buf[..filled]).map(|start| (start, finder.needle().len())));
        }
        for (start, len) in hits {
            if buf[start..start + len].iter().all(|b| *b == 0) {
                continue;
            }
            buf[start..start + len].fill(0);
            f.write_all_at(&buf[start..start + len], at + start as u64).map_err(io)?;
            found += 1;
        }
        let end = at + filled as u64;
        progress(end.min(size), size)?;
        if end >= size || filled < buf.len() {
            break;
        }
        let keep = (longest - 1).min(filled);
        buf.copy_within(filled - keep..filled, 0);
        at = end - keep as u64;
        carried = keep;
    }
    f.sync_all().map_err(io)?;
    Ok(Erased { scanned: size, found })
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
