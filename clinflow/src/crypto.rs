//! Encryption of PHI at rest: AES-256-GCM in a versioned envelope.
//!
//! Every ciphertext is self-describing so keys can rotate and the format can
//! evolve without a flag day:
//!
//! ```text
//! byte 0      format version (1)
//! bytes 1..5  key id, big-endian u32
//! bytes 5..17 96-bit random nonce
//! bytes 17..  AES-256-GCM ciphertext followed by its 16-byte tag
//! ```
//!
//! The associated data binds a ciphertext to its table, column and row, so a
//! value copied into another row or column fails to decrypt instead of
//! silently showing one patient's data under another's record.

use std::collections::HashMap;

use aes_gcm::aead::{Aead, Generate, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use secrecy::{ExposeSecret, SecretBox};
use uuid::Uuid;

const FORMAT_V1: u8 = 1;
const HEADER_LEN: usize = 1 + 4 + 12;

/// The key id given to `CLINFLOW_MASTER_KEY`. Rotation adds keys with new ids
/// and moves `current` to them; old ids stay readable.
pub const MASTER_KEY_ID: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("ciphertext is too short or has an unknown format version")]
    Malformed,
    #[error("ciphertext was written with key id {0}, which this process does not hold")]
    UnknownKey(u32),
    #[error("ciphertext failed authentication (wrong key, wrong row, or tampered)")]
    Authentication,
    #[error("encryption failed")]
    Encrypt,
}

/// Where a ciphertext lives; it becomes the AEAD associated data.
#[derive(Debug, Clone, Copy)]
pub struct Field {
    pub table: &'static str,
    pub column: &'static str,
    pub row: Uuid,
}

impl Field {
    fn associated_data(&self) -> Vec<u8> {
        format!("clinflow/v1/{}/{}/{}", self.table, self.column, self.row).into_bytes()
    }
}

/// The data-encryption keys this process holds, by id.
pub struct Keyring {
    current: u32,
    keys: HashMap<u32, Aes256Gcm>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring").field("current", &self.current).field("key_ids", &self.keys.keys()).finish()
    }
}

impl Keyring {
    pub fn from_master_key(key: &SecretBox<[u8; 32]>) -> Self {
        let cipher = Aes256Gcm::new(key.expose_secret().into());
        Self { current: MASTER_KEY_ID, keys: HashMap::from([(MASTER_KEY_ID, cipher)]) }
    }

    pub fn seal(&self, field: Field, plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let cipher = self.keys.get(&self.current).ok_or(CryptoError::UnknownKey(self.current))?;
        let nonce = Nonce::generate();
        let aad = field.associated_data();
        let sealed = cipher.encrypt(&nonce, Payload { msg: plaintext, aad: &aad }).map_err(|_| CryptoError::Encrypt)?;
        let mut out = Vec::with_capacity(HEADER_LEN + sealed.len());
        out.push(FORMAT_V1);
        out.extend_from_slice(&self.current.to_be_bytes());
        out.extend_from_slice(nonce.as_slice());
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    pub fn open(&self, field: Field, ciphertext: &[u8]) -> Result<Vec<u8>, CryptoError> {
        if ciphertext.len() < HEADER_LEN + 16 || ciphertext[0] != FORMAT_V1 {
            return Err(CryptoError::Malformed);
        }
        let key_id = u32::from_be_bytes([ciphertext[1], ciphertext[2], ciphertext[3], ciphertext[4]]);
        let cipher = self.keys.get(&key_id).ok_or(CryptoError::UnknownKey(key_id))?;
        let nonce = Nonce::try_from(&ciphertext[5..HEADER_LEN]).map_err(|_| CryptoError::Malformed)?;
        let aad = field.associated_data();
        cipher
            .decrypt(&nonce, Payload { msg: &ciphertext[HEADER_LEN..], aad: &aad })
            .map_err(|_| CryptoError::Authentication)
    }

    /// `seal` for text.
    pub fn seal_str(&self, field: Field, plaintext: &str) -> Result<Vec<u8>, CryptoError> {
        self.seal(field, plaintext.as_bytes())
    }

    /// `open` for text; invalid UTF-8 after a successful open is treated as
    /// corruption.
    pub fn open_string(&self, field: Field, ciphertext: &[u8]) -> Result<String, CryptoError> {
        String::from_utf8(self.open(field, ciphertext)?).map_err(|_| CryptoError::Malformed)
    }
}

/// Keyed hashes (HMAC-SHA256) of values that must be matched but never
/// stored in clear: an uploader's `source_ref`, an `Idempotency-Key`, and
/// (issue 21) patient references. Its own key (`CLINFLOW_INDEX_KEY`), which
/// never rotates with the encryption keys, or every index would break.
pub struct IndexKey(SecretBox<Vec<u8>>);

impl std::fmt::Debug for IndexKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IndexKey(..)")
    }
}

impl IndexKey {
    pub fn new(key: SecretBox<Vec<u8>>) -> Self {
        Self(key)
    }

    /// HMAC over `domain`, a zero byte and `value`: the domain keeps hashes
    /// of different kinds of value apart.
    pub fn hash(&self, domain: &str, value: &[u8]) -> Vec<u8> {
        use hmac::Mac;
        self.mac(domain, value).finalize().into_bytes().to_vec()
    }

    /// Whether `tag` is [`hash`](Self::hash) of `value`, compared in
    /// constant time (for secrets such as API keys).
    pub fn verify(&self, domain: &str, value: &[u8], tag: &[u8]) -> bool {
        use hmac::Mac;
        self.mac(domain, value).verify_slice(tag).is_ok()
    }

    fn mac(&self, domain: &str, value: &[u8]) -> hmac::Hmac<sha2::Sha256> {
        use hmac::{Hmac, Mac};
        let mut mac = <Hmac<sha2::Sha256> as hmac::KeyInit>::new_from_slice(self.0.expose_secret())
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(domain.as_bytes());
        mac.update(&[0]);
        mac.update(value);
        mac
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_hashes_are_keyed_and_domain_separated() {
        let a = IndexKey::new(SecretBox::new(Box::new(vec![1; 32])));
        let b = IndexKey::new(SecretBox::new(Box::new(vec![2; 32])));
        assert_eq!(a.hash("source_ref", b"n.txt"), a.hash("source_ref", b"n.txt"));
        assert_ne!(a.hash("source_ref", b"n.txt"), b.hash("source_ref", b"n.txt"));
        assert_ne!(a.hash("source_ref", b"n.txt"), a.hash("idempotency_key", b"n.txt"));
        assert_eq!(a.hash("x", b"").len(), 32);
    }

    fn keyring(byte: u8) -> Keyring {
        Keyring::from_master_key(&SecretBox::new(Box::new([byte; 32])))
    }

    fn field(column: &'static str, row: Uuid) -> Field {
        Field { table: "documents", column, row }
    }

    #[test]
    fn round_trip_and_header() {
        let k = keyring(7);
        let row = Uuid::now_v7();
        let ct = k.seal_str(field("text", row), "Patient on metformin").unwrap();
        assert_eq!(ct[0], FORMAT_V1);
        assert_eq!(&ct[1..5], &MASTER_KEY_ID.to_be_bytes());
        assert_eq!(ct.len(), HEADER_LEN + "Patient on metformin".len() + 16);
        assert!(!ct.windows(9).any(|w| w == b"metformin"));
        assert_eq!(k.open_string(field("text", row), &ct).unwrap(), "Patient on metformin");
    }

    #[test]
    fn nonces_differ_between_seals() {
        let k = keyring(7);
        let row = Uuid::now_v7();
        let a = k.seal(field("text", row), b"same").unwrap();
        let b = k.seal(field("text", row), b"same").unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn ciphertext_is_bound_to_its_row_and_column() {
        let k = keyring(7);
        let row = Uuid::now_v7();
        let ct = k.seal(field("text", row), b"x").unwrap();
        assert!(matches!(k.open(field("text", Uuid::now_v7()), &ct), Err(CryptoError::Authentication)));
        assert!(matches!(k.open(field("patient_ref", row), &ct), Err(CryptoError::Authentication)));
    }

    #[test]
    fn wrong_key_tamper_and_garbage_are_refused() {
        let row = Uuid::now_v7();
        let mut ct = keyring(7).seal(field("text", row), b"hello").unwrap();
        assert!(matches!(keyring(8).open(field("text", row), &ct), Err(CryptoError::Authentication)));
        let last = ct.len() - 1;
        ct[last] ^= 1;
        assert!(matches!(keyring(7).open(field("text", row), &ct), Err(CryptoError::Authentication)));
        assert!(matches!(keyring(7).open(field("text", row), b"short"), Err(CryptoError::Malformed)));
        ct[1] = 9;
        assert!(matches!(keyring(7).open(field("text", row), &ct), Err(CryptoError::UnknownKey(_))));
    }
}
