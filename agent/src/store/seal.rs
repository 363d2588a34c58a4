//! Sealing of store values: XChaCha20-Poly1305 with a random 192-bit nonce per write and the
//! table name plus the redb key as associated data, so a value copied to another key or table
//! fails to open. Layout: `[format 1][nonce 24][ciphertext + tag 16]`.

use chacha20poly1305::{
    XChaCha20Poly1305, XNonce,
    aead::{Aead, KeyInit, Payload},
};

use super::key::StoreKey;

const FORMAT: u8 = 1;
const NONCE: usize = 24;
/// Bytes a sealed value adds to its plaintext.
pub const OVERHEAD: usize = 1 + NONCE + 16;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    #[error(
        "a value in table {table:?} failed authentication: the store was tampered with, is corrupt, or the key is wrong"
    )]
    Tampered { table: &'static str },
    #[error("a value in table {table:?} has unknown format {format}; the store was written by a newer zhuli")]
    Format { table: &'static str, format: u8 },
}

pub struct Sealer {
    cipher: XChaCha20Poly1305,
}

fn aad(table: &str, key: &[u8]) -> Vec<u8> {
    let mut a = Vec::with_capacity(table.len() + 1 + key.len());
    a.extend_from_slice(table.as_bytes());
    a.push(0);
    a.extend_from_slice(key);
    a
}

impl Sealer {
    pub fn new(key: &StoreKey) -> Self {
        Sealer { cipher: XChaCha20Poly1305::new(key.bytes().into()) }
    }

    pub fn seal(&self, table: &'static str, key: &[u8], plain: &[u8]) -> Vec<u8> {
        let nonce: [u8; NONCE] = rand::random();
        let ct = self
            .cipher
            .encrypt(XNonce::from_slice(&nonce), Payload { msg: plain, aad: &aad(table, key) })
            .expect("XChaCha20-Poly1305 encryption cannot fail for in-memory buffers");
        let mut out = Vec::with_capacity(OVERHEAD + plain.len());
        out.push(FORMAT);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        out
    }

    pub fn open(&self, table: &'static str, key: &[u8], sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        if sealed.len() < OVERHEAD {
            return Err(SealError::Tampered { table });
        }
        if sealed[0] != FORMAT {
            return Err(SealError::Format { table, format: sealed[0] });
        }
        let nonce = XNonce::from_slice(&sealed[1..1 + NONCE]);
        self.cipher
            .decrypt(nonce, Payload { msg: &sealed[1 + NONCE..], aad: &aad(table, key) })
            .map_err(|_| SealError::Tampered { table })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_are_bound_to_table_and_key() {
        let s = Sealer::new(&StoreKey::generate());
        let a = s.seal("inbox", b"k1", b"hello");
        let b = s.seal("inbox", b"k1", b"hello");
        assert_ne!(a, b, "a fresh nonce per write");
        assert_eq!(s.open("inbox", b"k1", &a).expect("opens"), b"hello");
        assert_eq!(s.open("inbox", b"k2", &a), Err(SealError::Tampered { table: "inbox" }));
        assert!(s.open("outbox", b"k1", &a).is_err());
        let mut flipped = a.clone();
        flipped[30] ^= 1;
        assert!(s.open("inbox", b"k1", &flipped).is_err());
        assert!(Sealer::new(&StoreKey::generate()).open("inbox", b"k1", &a).is_err(), "another key");
        assert!(!a.windows(5).any(|w| w == b"hello"));
    }
}
