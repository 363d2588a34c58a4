//! What the firmware will start: the Secure Boot signature database (`db`) and the signer of a
//! kernel image.
//!
//! With Secure Boot on, the firmware refuses a kernel image that no certificate in `db` signed,
//! and systemd-boot then hands the machine back to the firmware, which stops until the next
//! power-on. So an update whose kernel image is signed with another key (or not at all) is
//! refused before anything is written: its signer's certificate must be one of `db`'s. The
//! signature itself is the firmware's to check at boot; here the bundle's own signature already
//! vouches for the bytes.

use std::{
    io::{Read, Seek, SeekFrom},
    path::Path,
};

/// The signature database's variable (`EFI_IMAGE_SECURITY_DATABASE_GUID`).
const DB: &str = "db-d719b2cb-3d3a-4596-a3bc-dad00e67656f";
/// `EFI_CERT_X509_GUID` as it is laid out in memory.
const CERT_X509: [u8; 16] =
    [0xa1, 0x59, 0xc0, 0xa5, 0xe4, 0x94, 0xa7, 0x4a, 0x87, 0xb5, 0xab, 0x15, 0x5c, 0x2b, 0xf0, 0x72];
/// Far more than any signature a kernel image carries.
const SIGNATURES_MAX: u64 = 1 << 20;

/// The X.509 certificates (DER) in the firmware's `db`, from efivarfs; `None` when it cannot
/// be read.
pub fn db_certificates(efivars: &Path) -> Option<Vec<Vec<u8>>> {
    let v = std::fs::read(efivars.join(DB)).ok()?;
    Some(certificates(v.get(4..)?))
}

/// The X.509 entries of a run of `EFI_SIGNATURE_LIST`s.
fn certificates(mut lists: &[u8]) -> Vec<Vec<u8>> {
    let u32_at = |b: &[u8], at: usize| b.get(at..at + 4).map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]) as usize);
    let mut found = Vec::new();
    while lists.len() >= 28 {
        let (Some(size), Some(header), Some(each)) = (u32_at(lists, 16), u32_at(lists, 20), u32_at(lists, 24)) else {
            break;
        };
        if size < 28 || size > lists.len() {
            break;
        }
        let list = &lists[..size];
        if list[..16] == CERT_X509 && each > 16 {
            let entries = list.get(28 + header..).unwrap_or_default();
            // Each entry: the owner's GUID, then the certificate.
            found.extend(entries.chunks_exact(each).map(|e| e[16..].to_vec()));
        }
        lists = &lists[size..];
    }
    found
}

/// The signatures a PE image carries (its certificate table: the security data directory),
/// read from `path`; empty when it carries none.
pub fn pe_signatures(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut f = std::fs::File::open(path)?;
    let mut head = vec![0u8; 4096];
    let n = f.read(&mut head)?;
    head.truncate(n);
    let Some((at, size)) = security_directory(&head) else { return Ok(vec![]) };
    if size == 0 || u64::from(size) > SIGNATURES_MAX {
        return Ok(vec![]);
    }
    f.seek(SeekFrom::Start(u64::from(at)))?;
    let mut table = vec![0u8; size as usize];
    f.read_exact(&mut table)?;
    Ok(table)
}

/// The certificate table's file offset and size, from a PE image's headers.
fn security_directory(head: &[u8]) -> Option<(u32, u32)> {
    let u16_at = |at: usize| head.get(at..at + 2).map(|s| u16::from_le_bytes([s[0], s[1]]));
    let u32_at = |at: usize| head.get(at..at + 4).map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]));
    if head.get(..2)? != b"MZ" {
        return None;
    }
    let pe = u32_at(0x3c)? as usize;
    if head.get(pe..pe + 4)? != b"PE\0\0" {
        return None;
    }
    let optional = pe + 24;
    let directories = match u16_at(optional)? {
        0x20b => optional + 112,
        0x10b => optional + 96,
        _ => return None,
    };
    let count = u32_at(optional + if u16_at(optional)? == 0x20b { 108 } else { 92 })?;
    if count < 5 {
        return None;
    }
    let entry = directories + 4 * 8;
    Some((u32_at(entry)?, u32_at(entry + 4)?))
}

/// Whether one of `certificates` signed the image whose certificate table is `signatures`: the
/// signer's certificate travels in the signature (PKCS#7), byte for byte.
pub fn signed_by(signatures: &[u8], certificates: &[Vec<u8>]) -> bool {
    certificates.iter().any(|c| !c.is_empty() && signatures.windows(c.len()).any(|w| w == c.as_slice()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A PE32+ image whose certificate table holds `table`.
    fn pe_with(table: &[u8]) -> Vec<u8> {
        let mut pe = vec![0u8; 512];
        pe[..2].copy_from_slice(b"MZ");
        pe[0x3c..0x40].copy_from_slice(&0x80u32.to_le_bytes());
        pe[0x80..0x84].copy_from_slice(b"PE\0\0");
        let optional = 0x80 + 24;
        pe[optional..optional + 2].copy_from_slice(&0x20bu16.to_le_bytes());
        pe[optional + 108..optional + 112].copy_from_slice(&16u32.to_le_bytes());
        let entry = optional + 112 + 4 * 8;
        pe[entry..entry + 4].copy_from_slice(&512u32.to_le_bytes());
        pe[entry + 4..entry + 8].copy_from_slice(&(table.len() as u32).to_le_bytes());
        pe.extend_from_slice(table);
        pe
    }

    fn signature_list(kind: [u8; 16], certs: &[&[u8]]) -> Vec<u8> {
        let each = 16 + certs.first().map_or(0, |c| c.len());
        let mut l = kind.to_vec();
        l.extend_from_slice(&((28 + each * certs.len()) as u32).to_le_bytes());
        l.extend_from_slice(&0u32.to_le_bytes());
        l.extend_from_slice(&(each as u32).to_le_bytes());
        for c in certs {
            l.extend_from_slice(&[7u8; 16]);
            l.extend_from_slice(c);
        }
        l
    }

    #[test]
    fn a_kernel_image_is_known_by_the_certificate_it_carries() {
        let dir = std::env::temp_dir().join(format!("zhuli-fw-{}-{:x}", std::process::id(), rand::random::<u32>()));
        std::fs::create_dir_all(&dir).expect("dir");
        let ours: &[u8] = b"0\x82\x01\x0aDER of our db certificate";
        let theirs: &[u8] = b"0\x82\x01\x0aDER of a stranger's certificate";
        // db: a SHA-256 list first (not certificates), then ours.
        let mut db = vec![7u8, 0, 0, 0];
        db.extend(signature_list([9u8; 16], &[&[1u8; 32]]));
        db.extend(signature_list(CERT_X509, &[ours]));
        std::fs::write(dir.join(DB), &db).expect("db");
        let certs = db_certificates(&dir).expect("db read");
        assert_eq!(certs, vec![ours.to_vec()]);

        let signed = dir.join("signed.efi");
        let mut table = b"\x00\x00\x00\x00\x00\x02\x02\x00pkcs7 ... ".to_vec();
        table.extend_from_slice(ours);
        table.extend_from_slice(b" ... signer info");
        std::fs::write(&signed, pe_with(&table)).expect("pe");
        assert!(signed_by(&pe_signatures(&signed).expect("read"), &certs));

        let other = dir.join("other.efi");
        let mut table = b"pkcs7 ... ".to_vec();
        table.extend_from_slice(theirs);
        std::fs::write(&other, pe_with(&table)).expect("pe");
        assert!(!signed_by(&pe_signatures(&other).expect("read"), &certs));

        let unsigned = dir.join("unsigned.efi");
        std::fs::write(&unsigned, pe_with(&[])).expect("pe");
        assert!(pe_signatures(&unsigned).expect("read").is_empty());
        assert!(!signed_by(&[], &certs));
        std::fs::write(&unsigned, b"not a PE image at all").expect("junk");
        assert!(pe_signatures(&unsigned).expect("read").is_empty());
        std::fs::remove_dir_all(&dir).expect("clean");
    }
}
