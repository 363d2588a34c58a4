//! The GUID partition table, as much of it as an update needs: read the slots' entries, give a
//! slot its new release's name and UUIDs, and write both copies back with their checksums.
//!
//! The kernel parses the table at boot only, so changing it while the disk is in use is safe:
//! the new names and UUIDs take effect at the next boot, which is when they are wanted. The
//! primary copy is written first, entries before header; a write cut short leaves one copy
//! whose checksums do not match, and readers (the kernel, systemd, us) use the other.

use std::{
    fs::File,
    io::{Read, Seek, SeekFrom, Write},
};

/// Partition type: Linux root (x86-64).
pub const ROOT_X86_64: &str = "4f68bce3-e8cd-4db1-96e7-fbcaf984b709";
/// Partition type: Linux root verity (x86-64).
pub const ROOT_VERITY_X86_64: &str = "2c7357ed-ebd2-46d9-aec1-23d437ec2bf5";

const SIGNATURE: &[u8; 8] = b"EFI PART";
const HEADER_SIZE: usize = 92;
const NAME_UNITS: usize = 36;

#[derive(Debug, thiserror::Error)]
pub enum GptError {
    #[error("cannot read or write the partition table: {0}")]
    Io(#[from] std::io::Error),
    #[error("the disk has no valid GUID partition table ({0})")]
    Invalid(&'static str),
    #[error("no partition {0} in the table")]
    NoEntry(usize),
    #[error("{0:?} is not a partition name (at most 36 characters)")]
    Name(String),
}

/// One used entry of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// 1-based, as the kernel numbers partitions (`vda2` is 2).
    pub number: usize,
    pub type_guid: String,
    pub uuid: String,
    pub first_lba: u64,
    pub last_lba: u64,
    pub name: String,
}

impl Entry {
    /// Bytes the partition holds.
    pub fn bytes(&self, sector: u64) -> u64 {
        (self.last_lba + 1 - self.first_lba) * sector
    }
}

/// The table read from a disk: the primary header, the entry array, and where the backup lives.
#[derive(Debug, Clone)]
pub struct Gpt {
    sector: u64,
    header: Vec<u8>,
    entries: Vec<u8>,
    entry_size: usize,
}

/// CRC-32 (IEEE 802.3, as UEFI uses it).
pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// A GUID's text form (`01234567-89ab-…`) from its on-disk bytes (the first three fields are
/// little-endian).
pub fn guid_text(b: &[u8]) -> String {
    format!(
        "{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
        b[3], b[2], b[1], b[0], b[5], b[4], b[7], b[6], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]
    )
}

/// A GUID's on-disk bytes from its text form; None when it is not one.
pub fn guid_bytes(text: &str) -> Option<[u8; 16]> {
    let hex: String = text.chars().filter(|c| *c != '-').collect();
    let groups: Vec<usize> = text.split('-').map(str::len).collect();
    if hex.len() != 32 || groups != [8, 4, 4, 4, 12] || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let mut plain = [0u8; 16];
    for (i, b) in plain.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    let mut out = plain;
    out[..4].copy_from_slice(&[plain[3], plain[2], plain[1], plain[0]]);
    out[4..6].copy_from_slice(&[plain[5], plain[4]]);
    out[6..8].copy_from_slice(&[plain[7], plain[6]]);
    Some(out)
}

/// The partition UUIDs of the slot whose verity root hash is `root_hash` (64 hex digits): the
/// data partition takes its first 128 bits, the verity partition its last (the initrd finds the
/// slot by them).
pub fn slot_uuids(root_hash: &str) -> (String, String) {
    let as_uuid = |h: &str| format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32]);
    (as_uuid(&root_hash[..32]), as_uuid(&root_hash[32..64]))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl Gpt {
    /// Read the primary table of `disk` (a disk device or image) with `sector`-byte sectors;
    /// the backup copy when the primary's checksums do not match.
    pub fn read(disk: &mut File, sector: u64) -> Result<Gpt, GptError> {
        match Self::read_at(disk, sector, 1) {
            Ok(g) => Ok(g),
            Err(GptError::Invalid(_)) => {
                let end = disk.seek(SeekFrom::End(0))?;
                Self::read_at(disk, sector, end / sector - 1)
            }
            Err(e) => Err(e),
        }
    }

    fn read_at(disk: &mut File, sector: u64, lba: u64) -> Result<Gpt, GptError> {
        let mut header = vec![0u8; sector as usize];
        disk.seek(SeekFrom::Start(lba * sector))?;
        disk.read_exact(&mut header)?;
        if &header[..8] != SIGNATURE {
            return Err(GptError::Invalid("no \"EFI PART\" signature"));
        }
        if u32_at(&header, 12) as usize != HEADER_SIZE {
            return Err(GptError::Invalid("unexpected header size"));
        }
        let mut check = header[..HEADER_SIZE].to_vec();
        check[16..20].fill(0);
        if crc32(&check) != u32_at(&header, 16) {
            return Err(GptError::Invalid("header checksum"));
        }
        let entries_lba = u64_at(&header, 72);
        let count = u32_at(&header, 80) as usize;
        let entry_size = u32_at(&header, 84) as usize;
        if !(128..=4096).contains(&entry_size) || count > 1024 {
            return Err(GptError::Invalid("entry array size"));
        }
        let mut entries = vec![0u8; count * entry_size];
        disk.seek(SeekFrom::Start(entries_lba * sector))?;
        disk.read_exact(&mut entries)?;
        if crc32(&entries) != u32_at(&header, 88) {
            return Err(GptError::Invalid("entry array checksum"));
        }
        // Always keep the primary's view of where things are, even when read from the backup.
        if lba != 1 {
            let mut primary = header.clone();
            let (mine, other) = (u64_at(&header, 24), u64_at(&header, 32));
            primary[24..32].copy_from_slice(&other.to_le_bytes());
            primary[32..40].copy_from_slice(&mine.to_le_bytes());
            primary[72..80].copy_from_slice(&2u64.to_le_bytes());
            header = primary;
        }
        Ok(Gpt { sector, header, entries, entry_size })
    }

    /// The used entries, in table order.
    pub fn entries(&self) -> Vec<Entry> {
        self.entries
            .chunks(self.entry_size)
            .enumerate()
            .filter(|(_, e)| e[..16].iter().any(|b| *b != 0))
            .map(|(i, e)| {
                let units: Vec<u16> = e[56..56 + 2 * NAME_UNITS]
                    .chunks(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]))
                    .take_while(|u| *u != 0)
                    .collect();
                Entry {
                    number: i + 1,
                    type_guid: guid_text(&e[..16]),
                    uuid: guid_text(&e[16..32]),
                    first_lba: u64_at(e, 32),
                    last_lba: u64_at(e, 40),
                    name: String::from_utf16_lossy(&units),
                }
            })
            .collect()
    }

    /// Give partition `number` a new UUID and name.
    pub fn set(&mut self, number: usize, uuid: &str, name: &str) -> Result<(), GptError> {
        let size = self.entry_size;
        let e = self
            .entries
            .chunks_mut(size)
            .nth(number.wrapping_sub(1))
            .filter(|e| e[..16].iter().any(|b| *b != 0))
            .ok_or(GptError::NoEntry(number))?;
        let units: Vec<u16> = name.encode_utf16().collect();
        if units.len() > NAME_UNITS {
            return Err(GptError::Name(name.to_owned()));
        }
        let id = guid_bytes(uuid).ok_or(GptError::Invalid("a UUID that is not one"))?;
        e[16..32].copy_from_slice(&id);
        e[56..56 + 2 * NAME_UNITS].fill(0);
        for (i, u) in units.iter().enumerate() {
            e[56 + 2 * i..58 + 2 * i].copy_from_slice(&u.to_le_bytes());
        }
        Ok(())
    }

    /// Write both copies: the primary (entries, then header), then the backup.
    pub fn write(&self, disk: &mut File) -> Result<(), GptError> {
        let entries_crc = crc32(&self.entries);
        let header_for = |my: u64, other: u64, entries_lba: u64| {
            let mut h = self.header.clone();
            h[24..32].copy_from_slice(&my.to_le_bytes());
            h[32..40].copy_from_slice(&other.to_le_bytes());
            h[72..80].copy_from_slice(&entries_lba.to_le_bytes());
            h[88..92].copy_from_slice(&entries_crc.to_le_bytes());
            h[16..20].fill(0);
            let crc = crc32(&h[..HEADER_SIZE]);
            h[16..20].copy_from_slice(&crc.to_le_bytes());
            h
        };
        let primary_lba = u64_at(&self.header, 24);
        let backup_lba = u64_at(&self.header, 32);
        let entry_sectors = (self.entries.len() as u64).div_ceil(self.sector);
        let backup_entries_lba = backup_lba - entry_sectors;
        for (my, other, entries_lba) in [(primary_lba, backup_lba, 2), (backup_lba, primary_lba, backup_entries_lba)] {
            disk.seek(SeekFrom::Start(entries_lba * self.sector))?;
            disk.write_all(&self.entries)?;
            disk.seek(SeekFrom::Start(my * self.sector))?;
            disk.write_all(&header_for(my, other, entries_lba))?;
            disk.sync_data()?;
        }
        Ok(())
    }

    pub fn sector(&self) -> u64 {
        self.sector
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A disk image of `sectors` 512-byte sectors with a GPT of `parts` (type, uuid, first, last,
    /// name), laid out as the UEFI specification says (protective MBR left out: not read).
    pub fn disk(path: &std::path::Path, sectors: u64, parts: &[(&str, &str, u64, u64, &str)]) {
        let mut entries = vec![0u8; 128 * 128];
        for (i, (t, u, first, last, name)) in parts.iter().enumerate() {
            let e = &mut entries[i * 128..(i + 1) * 128];
            e[..16].copy_from_slice(&guid_bytes(t).expect("type"));
            e[16..32].copy_from_slice(&guid_bytes(u).expect("uuid"));
            e[32..40].copy_from_slice(&first.to_le_bytes());
            e[40..48].copy_from_slice(&last.to_le_bytes());
            for (j, c) in name.encode_utf16().enumerate() {
                e[56 + 2 * j..58 + 2 * j].copy_from_slice(&c.to_le_bytes());
            }
        }
        let mut h = vec![0u8; 512];
        h[..8].copy_from_slice(SIGNATURE);
        h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
        h[12..16].copy_from_slice(&(HEADER_SIZE as u32).to_le_bytes());
        h[24..32].copy_from_slice(&1u64.to_le_bytes());
        h[32..40].copy_from_slice(&(sectors - 1).to_le_bytes());
        h[40..48].copy_from_slice(&34u64.to_le_bytes());
        h[48..56].copy_from_slice(&(sectors - 34).to_le_bytes());
        h[56..72].copy_from_slice(&guid_bytes("7a1b0c52-9d1e-4b8e-a1c3-2f6d5e4a3b21").expect("disk"));
        h[80..84].copy_from_slice(&128u32.to_le_bytes());
        h[84..88].copy_from_slice(&128u32.to_le_bytes());
        let gpt = Gpt { sector: 512, header: h, entries, entry_size: 128 };
        let mut f =
            std::fs::OpenOptions::new().create(true).truncate(true).read(true).write(true).open(path).expect("disk");
        f.set_len(sectors * 512).expect("size");
        gpt.write(&mut f).expect("write gpt");
    }

    fn tmp(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("zhuli-gpt-{}-{:x}-{name}", std::process::id(), rand::random::<u32>()))
    }

    #[test]
    fn crc32_is_the_ieee_one() {
        // The standard check value.
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn guids_go_to_disk_in_mixed_endian_and_back() {
        let t = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b";
        let b = guid_bytes(t).expect("guid");
        // The ESP type as it is on every disk: 28 73 2a c1 1f f8 d2 11 ba 4b …
        assert_eq!(&b[..8], &[0x28, 0x73, 0x2a, 0xc1, 0x1f, 0xf8, 0xd2, 0x11]);
        assert_eq!(guid_text(&b), t);
        for bad in [
            "",
            "c12a7328f81f11d2ba4b00a0c93ec93b",
            "c12a7328-f81f-11d2-ba4b-00a0c93ec93",
            "g12a7328-f81f-11d2-ba4b-00a0c93ec93b",
        ] {
            assert_eq!(guid_bytes(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_slot_gets_its_name_and_uuids_and_both_copies_agree() {
        let path = tmp("disk");
        let empty = "7a1b0c52-0004-4e5f-8a9b-0c1d2e3f4a5b";
        disk(
            &path,
            4096,
            &[
                (ROOT_X86_64, "11111111-2222-3333-4444-555555555555", 2048, 2559, "zhuli-root_1.0.0"),
                (ROOT_X86_64, empty, 2560, 3071, "zhuli-root_empty"),
            ],
        );
        let mut f = std::fs::OpenOptions::new().read(true).write(true).open(&path).expect("open");
        let mut g = Gpt::read(&mut f, 512).expect("read");
        assert_eq!(g.entries()[1].name, "zhuli-root_empty");
        assert_eq!(g.entries()[1].bytes(512), 512 * 512);
        let (data, _) = slot_uuids(&"0123456789abcdef".repeat(4));
        assert_eq!(data, "01234567-89ab-cdef-0123-456789abcdef");
        g.set(2, &data, "zhuli-root_1.1.0").expect("set");
        assert!(matches!(g.set(3, &data, "x"), Err(GptError::NoEntry(3))));
        assert!(matches!(g.set(2, &data, &"x".repeat(37)), Err(GptError::Name(_))));
        g.write(&mut f).expect("write");
        let again = Gpt::read(&mut f, 512).expect("reread").entries();
        assert_eq!((again[1].uuid.as_str(), again[1].name.as_str()), (data.as_str(), "zhuli-root_1.1.0"));
        assert_eq!(again[0].name, "zhuli-root_1.0.0", "the other slot is untouched");
        // Break the primary header: the backup says the same.
        f.seek(SeekFrom::Start(512 + 100)).expect("seek");
        f.write_all(b"x").expect("write");
        f.seek(SeekFrom::Start(512 + 20)).expect("seek");
        f.write_all(b"\xff").expect("break");
        let backup = Gpt::read(&mut f, 512).expect("read backup").entries();
        assert_eq!(backup, again);
        std::fs::remove_file(&path).expect("clean");
    }
}
