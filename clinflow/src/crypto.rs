//! Encryption of PHI at rest: envelope encryption with AES-256-GCM.
//!
//! Each patient has a data key (DEK: 32 random bytes, table `data_keys`),
//! stored only wrapped under a key-encryption key (KEK) of
//! `CLINFLOW_MASTER_KEY`, which may hold several, each with an id; the first
//! is primary (new wraps). Erasing a patient destroys their data key, so every
//! copy of their ciphertexts, backups included, becomes unreadable; rotating
//! a KEK re-wraps data keys without touching a document (`keys` in
//! clinflow-api, [`crate::keys`]).
//!
//! Ciphertext, format 2 (everything written now):
//!
//! ```text
//! byte 0       format version (2)
//! bytes 1..17  data key id (UUID, 16 bytes)
//! bytes 17..29 96-bit random nonce
//! bytes 29..   AES-256-GCM ciphertext followed by its 16-byte tag
//! AAD          "clinflow/v2/{table}/{column}/{row uuid}/{data key uuid}"
//! ```
//!
//! Format 1 (before envelope keys; still read, `keys migrate-v1` rewrites it):
//! version 1, a big-endian u32 key id (always 1 = KEK id "1"), the nonce,
//! ciphertext and tag, sealed directly under the master key, AAD
//! `clinflow/v1/{table}/{column}/{row}`.
//!
//! A wrapped data key (`data_keys.wrapped`, 61 bytes): version 1, a 96-bit
//! nonce, the 32-byte key encrypted under the KEK named in `data_keys.kek_id`
//! and its tag; AAD `clinflow/dek/v1`, 0, the data key id (16 bytes), the KEK
//! id, 0, the patient's blind index — so a wrapped key copied to another
//! row or patient does not unwrap.
//!
//! The associated data binds a ciphertext to its table, column and row (and
//! data key), so a value copied into another row, column or patient's key
//! fails to decrypt instead of silently showing one patient's data under
//! another's record.

use std::collections::HashMap;

use aes_gcm::aead::{Aead, Generate, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use secrecy::zeroize::Zeroize;
use secrecy::{ExposeSecret, SecretBox};
use uuid::Uuid;

const FORMAT_V1: u8 = 1;
const FORMAT_V2: u8 = 2;
const V1_HEADER: usize = 1 + 4 + 12;
const V2_HEADER: usize = 1 + 16 + 12;
const TAG: usize = 16;
const WRAP_V1: u8 = 1;
/// Length of a wrapped data key.
pub const WRAPPED_LEN: usize = 1 + 12 + 32 + TAG;

/// The KEK id of a master key given alone (`CLINFLOW_MASTER_KEY=<base64>`),
/// and the key that format-1 ciphertexts (key id 1) were sealed under.
pub const LEGACY_KEK_ID: &str = "1";
const LEGACY_KEY_NUMBER: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    #[error("ciphertext is too short for its format")]
    Malformed,
    #[error("ciphertext has an unknown format version ({0})")]
    UnknownFormat(u8),
    #[error("format-1 ciphertext was written with key id {0}, which this process does not hold")]
    UnknownKey(u32),
    #[error("data key {0} does not exist (destroyed by an erasure or a re-encryption, or never stored)")]
    UnknownDataKey(Uuid),
    #[error("data key {0} is wrapped under key-encryption key {1:?}, which is not in CLINFLOW_MASTER_KEY")]
    UnknownKek(Uuid, String),
    #[error("wrapped data key {0} failed authentication under key-encryption key {1:?} (tampered or moved)")]
    Unwrap(Uuid, String),
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
    fn associated_data_v1(&self) -> Vec<u8> {
        format!("clinflow/v1/{}/{}/{}", self.table, self.column, self.row).into_bytes()
    }

    fn associated_data_v2(&self, data_key: Uuid) -> Vec<u8> {
        format!("clinflow/v2/{}/{}/{}/{}", self.table, self.column, self.row, data_key).into_bytes()
    }
}

/// Which key opens a ciphertext, read from its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Envelope {
    /// Format 1: directly under the master key (KEK "1").
    V1,
    /// Format 2: under this data key.
    V2(Uuid),
}

/// The header of a ciphertext, checked for length and version only.
pub fn envelope(ciphertext: &[u8]) -> Result<Envelope, CryptoError> {
    match ciphertext.first() {
        Some(&FORMAT_V1) if ciphertext.len() >= V1_HEADER + TAG => Ok(Envelope::V1),
        Some(&FORMAT_V2) if ciphertext.len() >= V2_HEADER + TAG => {
            let id: [u8; 16] = ciphertext[1..17].try_into().map_err(|_| CryptoError::Malformed)?;
            Ok(Envelope::V2(Uuid::from_bytes(id)))
        }
        Some(&FORMAT_V1 | &FORMAT_V2) | None => Err(CryptoError::Malformed),
        Some(&other) => Err(CryptoError::UnknownFormat(other)),
    }
}

/// A patient's data key, unwrapped. The key bytes and the cipher's key
/// schedule are zeroized when it is dropped.
pub struct DataKey {
    id: Uuid,
    cipher: Aes256Gcm,
    material: SecretBox<[u8; 32]>,
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataKey").field("id", &self.id).finish_non_exhaustive()
    }
}

/// 32 bytes from the operating system's random source (through the
/// `getrandom` that aes-gcm's key generation uses).
pub fn random_32() -> [u8; 32] {
    let mut key = Key::<Aes256Gcm>::generate();
    let mut bytes = [0u8; 32];
    bytes.copy_from_slice(key.as_slice());
    key.as_mut_slice().zeroize();
    bytes
}

impl DataKey {
    /// A fresh random key with a new id.
    pub fn generate() -> Self {
        let mut key = Key::<Aes256Gcm>::generate();
        let mut material = Box::new([0u8; 32]);
        material.copy_from_slice(key.as_slice());
        key.as_mut_slice().zeroize();
        Self::from_material(Uuid::now_v7(), SecretBox::new(material))
    }

    fn from_material(id: Uuid, material: SecretBox<[u8; 32]>) -> Self {
        let cipher = Aes256Gcm::new(material.expose_secret().into());
        Self { id, cipher, material }
    }

    pub fn id(&self) -> Uuid {
        self.id
    }

    pub fn seal(&self, field: Field, plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let nonce = Nonce::generate();
        let aad = field.associated_data_v2(self.id);
        let sealed =
            self.cipher.encrypt(&nonce, Payload { msg: plaintext, aad: &aad }).map_err(|_| CryptoError::Encrypt)?;
        let mut out = Vec::with_capacity(V2_HEADER + sealed.len());
        out.push(FORMAT_V2);
        out.extend_from_slice(self.id.as_bytes());
        out.extend_from_slice(nonce.as_slice());
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// Opens a format-2 ciphertext sealed under this key.
    pub fn open(&self, field: Field, ciphertext: &[u8]) -> Result<Vec<u8>, CryptoError> {
        match envelope(ciphertext)? {
            Envelope::V2(id) if id == self.id => {}
            Envelope::V2(id) => return Err(CryptoError::UnknownDataKey(id)),
            Envelope::V1 => return Err(CryptoError::UnknownKey(LEGACY_KEY_NUMBER)),
        }
        let nonce = Nonce::try_from(&ciphertext[17..V2_HEADER]).map_err(|_| CryptoError::Malformed)?;
        let aad = field.associated_data_v2(self.id);
        self.cipher
            .decrypt(&nonce, Payload { msg: &ciphertext[V2_HEADER..], aad: &aad })
            .map_err(|_| CryptoError::Authentication)
    }

    /// `seal` for text.
    pub fn seal_str(&self, field: Field, plaintext: &str) -> Result<Vec<u8>, CryptoError> {
        self.seal(field, plaintext.as_bytes())
    }
}

/// A data key as stored: wrapped under the KEK `kek_id`, bound to its id
/// and its patient's blind index.
#[derive(Debug, Clone)]
pub struct WrappedKey {
    pub id: Uuid,
    pub patient_index: Vec<u8>,
    pub kek_id: String,
    pub wrapped: Vec<u8>,
}

fn wrap_aad(id: Uuid, kek_id: &str, patient_index: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(16 + 1 + 16 + kek_id.len() + 1 + patient_index.len());
    aad.extend_from_slice(b"clinflow/dek/v1\0");
    aad.extend_from_slice(id.as_bytes());
    aad.extend_from_slice(kek_id.as_bytes());
    aad.push(0);
    aad.extend_from_slice(patient_index);
    aad
}

/// The key-encryption keys this process holds (`CLINFLOW_MASTER_KEY`), by
/// id; one is primary.
pub struct Keyring {
    primary: String,
    keks: HashMap<String, Aes256Gcm>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring").field("primary", &self.primary).field("kek_ids", &self.keks.keys()).finish()
    }
}

impl Keyring {
    /// A keyring of one key, KEK id "1" (a `CLINFLOW_MASTER_KEY` without ids).
    pub fn from_master_key(key: &SecretBox<[u8; 32]>) -> Self {
        Self::new(LEGACY_KEK_ID, [(LEGACY_KEK_ID.to_owned(), key)])
    }

    /// Keys by id; `primary` wraps new data keys and must be among them
    /// (checked by `config::master_keys`, which builds every production
    /// keyring). Ids are unique there too.
    pub fn new<'a>(primary: &str, keys: impl IntoIterator<Item = (String, &'a SecretBox<[u8; 32]>)>) -> Self {
        let keks = keys.into_iter().map(|(id, k)| (id, Aes256Gcm::new(k.expose_secret().into()))).collect();
        Self { primary: primary.to_owned(), keks }
    }

    pub fn primary(&self) -> &str {
        &self.primary
    }

    pub fn holds(&self, kek_id: &str) -> bool {
        self.keks.contains_key(kek_id)
    }

    /// Wraps `key` under the primary KEK for the patient `patient_index`.
    pub fn wrap(&self, key: &DataKey, patient_index: &[u8]) -> Result<WrappedKey, CryptoError> {
        let kek = self.keks.get(&self.primary).ok_or_else(|| CryptoError::UnknownKek(key.id, self.primary.clone()))?;
        let nonce = Nonce::generate();
        let aad = wrap_aad(key.id, &self.primary, patient_index);
        let sealed = kek
            .encrypt(&nonce, Payload { msg: key.material.expose_secret(), aad: &aad })
            .map_err(|_| CryptoError::Encrypt)?;
        let mut wrapped = Vec::with_capacity(WRAPPED_LEN);
        wrapped.push(WRAP_V1);
        wrapped.extend_from_slice(nonce.as_slice());
        wrapped.extend_from_slice(&sealed);
        Ok(WrappedKey { id: key.id, patient_index: patient_index.to_vec(), kek_id: self.primary.clone(), wrapped })
    }

    pub fn unwrap(&self, stored: &WrappedKey) -> Result<DataKey, CryptoError> {
        let kek =
            self.keks.get(&stored.kek_id).ok_or_else(|| CryptoError::UnknownKek(stored.id, stored.kek_id.clone()))?;
        let failed = || CryptoError::Unwrap(stored.id, stored.kek_id.clone());
        if stored.wrapped.len() != WRAPPED_LEN || stored.wrapped[0] != WRAP_V1 {
            return Err(failed());
        }
        let nonce = Nonce::try_from(&stored.wrapped[1..13]).map_err(|_| failed())?;
        let aad = wrap_aad(stored.id, &stored.kek_id, &stored.patient_index);
        let mut plain = kek.decrypt(&nonce, Payload { msg: &stored.wrapped[13..], aad: &aad }).map_err(|_| failed())?;
        let mut material = Box::new([0u8; 32]);
        let copied = plain.len() == 32;
        if copied {
            material.copy_from_slice(&plain);
        }
        plain.zeroize();
        if !copied {
            return Err(failed());
        }
        Ok(DataKey::from_material(stored.id, SecretBox::new(material)))
    }

    /// Seals in format 1, directly under KEK "1": only for results of
    /// documents stored before envelope keys that have no data key yet
    /// (`keys migrate-v1` moves them).
    pub fn seal_v1(&self, field: Field, plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let cipher = self.keks.get(LEGACY_KEK_ID).ok_or(CryptoError::UnknownKey(LEGACY_KEY_NUMBER))?;
        let nonce = Nonce::generate();
        let aad = field.associated_data_v1();
        let sealed = cipher.encrypt(&nonce, Payload { msg: plaintext, aad: &aad }).map_err(|_| CryptoError::Encrypt)?;
        let mut out = Vec::with_capacity(V1_HEADER + sealed.len());
        out.push(FORMAT_V1);
        out.extend_from_slice(&LEGACY_KEY_NUMBER.to_be_bytes());
        out.extend_from_slice(nonce.as_slice());
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// Opens a format-1 ciphertext.
    pub fn open_v1(&self, field: Field, ciphertext: &[u8]) -> Result<Vec<u8>, CryptoError> {
        if envelope(ciphertext)? != Envelope::V1 {
            return Err(CryptoError::Malformed);
        }
        let number = u32::from_be_bytes([ciphertext[1], ciphertext[2], ciphertext[3], ciphertext[4]]);
        let cipher = match number {
            LEGACY_KEY_NUMBER => self.keks.get(LEGACY_KEK_ID),
            _ => None,
        }
        .ok_or(CryptoError::UnknownKey(number))?;
        let nonce = Nonce::try_from(&ciphertext[5..V1_HEADER]).map_err(|_| CryptoError::Malformed)?;
        let aad = field.associated_data_v1();
        cipher
            .decrypt(&nonce, Payload { msg: &ciphertext[V1_HEADER..], aad: &aad })
            .map_err(|_| CryptoError::Authentication)
    }
}

/// Keyed hashes (HMAC-SHA256) of values that must be matched but never
/// stored in clear: an uploader's `source_ref`, an `Idempotency-Key`, and
/// patient references (the blind index). Its own key (`CLINFLOW_INDEX_KEY`),
/// which never rotates with the encryption keys, or every index would break.
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
mod tests;
