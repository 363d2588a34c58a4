//! A copy-on-write view of a store file: reads come from the file, writes stay in memory. A
//! file left open for writing by a process that died (kill -9, power loss) must be repaired
//! before redb reads it, and a repair writes; over this view redb repairs it in memory, so the
//! store can check its key, and backups can read it, while the file keeps every byte.
//!
//! Never writes to the file. It is opened read-write only because the byte-range locks redb
//! takes as the single writer (which keep an agent out while the view is open, and tell us
//! when one is running) need a writable descriptor.

use std::{collections::HashMap, io, ops::Bound, path::Path, sync::Mutex};

use redb::{BackendError, Database, DatabaseError, StorageBackend, backends::FileBackend};

/// Granularity of the copy-on-write blocks (redb's page size).
const BLOCK: u64 = 4096;

#[derive(Debug)]
pub(crate) struct Overlay {
    file: FileBackend,
    state: Mutex<State>,
}

/// What redb wrote, and the length it set. Every byte at or beyond `len` reads as zero: blocks
/// are zeroed past a shrink, and `file_valid` never exceeds `len`.
#[derive(Debug)]
struct State {
    len: u64,
    /// The file's bytes below this offset are still the view's; above it the file was cut off.
    file_valid: u64,
    blocks: HashMap<u64, Box<[u8]>>,
}

/// Open `path` as redb's single writer over an overlay: a dirty file is repaired in memory only.
/// Fails with `DatabaseAlreadyOpen` while another process writes the file.
pub(crate) fn open(path: &Path, builder: &redb::Builder) -> Result<Database, DatabaseError> {
    let file = std::fs::OpenOptions::new().read(true).write(true).open(path)?;
    builder.create_with_backend(Overlay::new(FileBackend::new(file)?)?)
}

impl Overlay {
    fn new(file: FileBackend) -> io::Result<Self> {
        let len = file.len()?;
        Ok(Overlay { file, state: Mutex::new(State { len, file_valid: len, blocks: HashMap::new() }) })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves `State` whole (every update is a single step).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bytes `[offset, offset + out.len())` of the file as the view sees it (zero past
    /// `file_valid`), ignoring written blocks.
    fn read_file(&self, file_valid: u64, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let from_file = file_valid.saturating_sub(offset).min(out.len() as u64) as usize;
        self.file.read(offset, &mut out[..from_file])?;
        out[from_file..].fill(0);
        Ok(())
    }
}

impl StorageBackend for Overlay {
    fn len(&self) -> io::Result<u64> {
        Ok(self.state().len)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let state = self.state();
        let end = offset.checked_add(out.len() as u64).filter(|e| *e <= state.len);
        let Some(end) = end else {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "read past the end of the store file"));
        };
        self.read_file(state.file_valid, offset, out)?;
        if state.blocks.is_empty() {
            return Ok(());
        }
        for index in offset / BLOCK..end.div_ceil(BLOCK) {
            let Some(block) = state.blocks.get(&index) else { continue };
            let start = index * BLOCK;
            let (from, to) = (offset.max(start), end.min(start + BLOCK));
            out[(from - offset) as usize..(to - offset) as usize]
                .copy_from_slice(&block[(from - start) as usize..(to - start) as usize]);
        }
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut state = self.state();
        if len < state.len {
            state.blocks.retain(|index, _| index * BLOCK < len);
            if let Some(block) = state.blocks.get_mut(&(len / BLOCK)) {
                block[(len % BLOCK) as usize..].fill(0);
            }
            state.file_valid = state.file_valid.min(len);
        }
        state.len = len;
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        // Nothing reaches the disk, so there is nothing to make durable.
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut state = self.state();
        let end = offset
            .checked_add(data.len() as u64)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "write past the largest offset"))?;
        for index in offset / BLOCK..end.div_ceil(BLOCK) {
            let start = index * BLOCK;
            if !state.blocks.contains_key(&index) {
                let mut fresh = vec![0u8; BLOCK as usize].into_boxed_slice();
                self.read_file(state.file_valid, start, &mut fresh)?;
                state.blocks.insert(index, fresh);
            }
            let block = state.blocks.get_mut(&index).expect("the block was inserted above");
            let (from, to) = (offset.max(start), end.min(start + BLOCK));
            block[(from - start) as usize..(to - start) as usize]
                .copy_from_slice(&data[(from - offset) as usize..(to - offset) as usize]);
        }
        state.len = state.len.max(end);
        Ok(())
    }

    fn close(&self) -> io::Result<()> {
        self.file.close()
    }

    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.file.try_lock_range(start, end)
    }

    fn try_lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.file.try_lock_shared_range(start, end)
    }

    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.file.lock_range(start, end)
    }

    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.file.lock_shared_range(start, end)
    }

    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.file.unlock_range(start, end)
    }

    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.file.query_lock_range(start, end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_file(bytes: &[u8]) -> (std::path::PathBuf, FileBackend) {
        let dir =
            std::env::temp_dir().join(format!("zhuli-overlay-{}-{:x}", std::process::id(), rand::random::<u64>()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("f");
        std::fs::write(&path, bytes).expect("write");
        let file = std::fs::OpenOptions::new().read(true).write(true).open(&path).expect("open");
        (path, FileBackend::new(file).expect("backend"))
    }

    #[test]
    fn writes_shrinks_and_growth_are_seen_through_the_view_and_never_reach_the_file() {
        let original: Vec<u8> = (0..3 * BLOCK + 100).map(|i| (i % 251) as u8).collect();
        let (path, file) = temp_file(&original);
        let view = Overlay::new(file).expect("view");
        let mut model = original.clone();
        let check = |view: &Overlay, model: &[u8]| {
            assert_eq!(view.len().expect("len"), model.len() as u64);
            let mut all = vec![0u8; model.len()];
            view.read(0, &mut all).expect("read");
            assert!(all == model, "the view differs from the model");
            let end = model.len().min((BLOCK + 150) as usize);
            let mut straddling = vec![0u8; end - (BLOCK - 150) as usize];
            view.read(BLOCK - 150, &mut straddling).expect("read");
            assert_eq!(straddling, model[(BLOCK - 150) as usize..end]);
        };
        check(&view, &model);
        // A write across a block boundary, and one that extends the end.
        view.write(BLOCK - 10, &[0xaa; 20]).expect("write");
        model[(BLOCK - 10) as usize..(BLOCK + 10) as usize].fill(0xaa);
        check(&view, &model);
        let at = model.len() as u64 + 50;
        view.write(at, &[7; 10]).expect("write past the end");
        model.resize(at as usize, 0);
        model.extend_from_slice(&[7; 10]);
        check(&view, &model);
        // Shrink into a written block, then grow: the cut-off bytes come back as zeros, not as
        // the file's or the old block's.
        view.set_len(BLOCK + 5).expect("shrink");
        model.truncate((BLOCK + 5) as usize);
        check(&view, &model);
        view.set_len(3 * BLOCK).expect("grow");
        model.resize((3 * BLOCK) as usize, 0);
        check(&view, &model);
        let mut past = [0u8; 2];
        assert!(view.read(3 * BLOCK - 1, &mut past).is_err(), "a read past the end fails");
        view.sync_data().expect("sync");
        view.close().expect("close");
        assert_eq!(std::fs::read(&path).expect("file"), original, "the file kept every byte");
        let _ = std::fs::remove_dir_all(path.parent().expect("dir"));
    }
}
