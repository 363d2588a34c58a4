//! The configuration stick: a FAT file system labelled `ZHULI-CFG`, read and written in place
//! through the block device or an image file — never mounted, so it needs no root on the
//! installer's laptop and tests can use plain image files.

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

/// Create an image file of `size` bytes with a fresh `ZHULI-CFG` file system holding `files`.
pub fn create_image(path: &Path, size: u64, files: &[(&str, &[u8])]) -> Result<(), StickError> {
    let open = |source| StickError::Open { path: path.to_owned(), source };
    let mut file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(path).map_err(open)?;
    file.set_len(size).map_err(io)?;
    format(&mut file)?;
    file.seek(SeekFrom::Start(0)).map_err(io)?;
    write_into(&mut file, path, files)
}

/// Format an existing device or image as `ZHULI-CFG`.
fn format(dev: &mut File) -> Result<(), StickError> {
    let mut label = [b' '; 11];
    label[..LABEL.len()].copy_from_slice(LABEL.as_bytes());
    fatfs::format_volume(&mut *dev, fatfs::FormatVolumeOptions::new().volume_label(label)).map_err(io)?;
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
            for (name, bytes) in files {
                let mut file = root.create_file(name).map_err(io)?;
                file.truncate().map_err(io)?;
                file.write_all(bytes).map_err(io)?;
                file.flush().map_err(io)?;
            }
        }
        fs.unmount().map_err(io)?;
    }
    f.sync_all().map_err(io)
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
    let f = File::open(dev).map_err(|source| StickError::Open { path: dev.to_owned(), source })?;
    let fs =
        fatfs::FileSystem::new(ReadOnly(f), fatfs::FsOptions::new()).map_err(|_| StickError::NotFat(dev.to_owned()))?;
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
    let f = File::open(dev).map_err(|source| StickError::Open { path: dev.to_owned(), source })?;
    let fs =
        fatfs::FileSystem::new(ReadOnly(f), fatfs::FsOptions::new()).map_err(|_| StickError::NotFat(dev.to_owned()))?;
    let root = fs.root_dir();
    let entry = root
        .iter()
        .filter_map(Result::ok)
        .find(|e| e.is_file() && e.file_name() == name)
        .ok_or_else(|| StickError::Io(format!("{name} is not on the stick")))?;
    if entry.len() > MAX_FILE {
        return Err(StickError::TooLarge { file: name.to_owned(), size: entry.len() });
    }
    let mut bytes = Vec::with_capacity(entry.len() as usize);
    entry.to_file().take(MAX_FILE + 1).read_to_end(&mut bytes).map_err(io)?;
    Ok(bytes)
}
