//! What the fuzz targets share: the fixed keys their seed corpora were made
//! with (`examples/seeds.rs`), and the check that an error quotes nothing
//! of its input.
//!
//! The keys are fixed, not random, so that a crash found on one machine
//! reproduces on another and the seeds (signed audit events, sealed
//! ciphertexts, tokens) still verify here. They protect nothing.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use clinflow::audit::Signer;
use clinflow::audit::signing::PublicKeys;
use clinflow::crypto::{DataKey, Field, Keyring, LEGACY_KEK_ID, WrappedKey};
use ed25519_dalek::SigningKey;
use secrecy::SecretBox;
use time::OffsetDateTime;
use uuid::Uuid;

/// Planted in the seeds wherever a value could be PHI (note text, patient
/// references, footers, unknown fields and enum values): no error may ever
/// show it. The targets' dictionaries (`fuzz/dict/`) hand it to libFuzzer,
/// which splices it anywhere.
pub const CANARY: &str = "PHI-CANARY";

/// The error text `message`, made from an input, does not quote it: the
/// canary planted in the seeds (and spliced anywhere by libFuzzer from the
/// dictionary) never shows in it.
///
/// Not "no run of N input bytes": libFuzzer learns every string this
/// check compares (the message included) and puts it in the next inputs,
/// so the message's own words come back as input and such a check fails on
/// an error that quotes nothing. The canary is no word of any message.
pub fn assert_quotes_nothing(message: &str) {
    assert!(!message.contains(CANARY), "the error quotes its input: {message:?}");
}

// --- audit messages -------------------------------------------------------

/// The producers that signed the audit seeds.
pub fn audit_signers() -> [Signer; 2] {
    [
        Signer::new("api", SigningKey::from_bytes(&[0x11; 32])),
        Signer::new("worker", SigningKey::from_bytes(&[0x22; 32])),
    ]
}

/// The public keys of [`audit_signers`], as the sink holds them.
pub fn audit_public_keys() -> PublicKeys {
    let [api, worker] = audit_signers();
    PublicKeys::of(&[&api, &worker])
}

// --- ciphertexts and wrapped keys ------------------------------------------

/// `CLINFLOW_MASTER_KEY` of the seeds: one key, KEK id "1" (which also
/// opens format-1 ciphertexts).
pub const KEK: [u8; 32] = [
    0x3a, 0x91, 0x5c, 0x07, 0xe2, 0x4f, 0xb8, 0x16, 0x6d, 0xa0, 0x2b, 0xc9, 0x74, 0x58, 0x0e, 0xf3, 0x81, 0x2c, 0x9e,
    0x45, 0xd7, 0x6a, 0x13, 0xbf, 0x08, 0xe6, 0x59, 0xa2, 0x37, 0xcd, 0x90, 0x1b,
];
/// The seeds' data key: its id, its material, its patient's blind index.
pub const DATA_KEY_ID: Uuid = Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0001);
const DATA_KEY_MATERIAL: [u8; 32] = [0x5a; 32];
pub const PATIENT_INDEX: &[u8] = b"\x8c\x1f fuzz patient blind index \x00\x01";
/// Where the seeds' ciphertexts live (the AAD binds them to it).
pub const FIELD: Field =
    Field { table: "document_texts", column: "text", row: Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_00aa) };

pub fn keyring() -> Keyring {
    Keyring::from_master_key(&SecretBox::new(Box::new(KEK)))
}

/// The seeds' data key as `data_keys` stores it, wrapped by hand from the
/// format docs/encryption.md and `crypto` describe (version 1, nonce,
/// AES-256-GCM of the key under the KEK with the AAD `clinflow/dek/v1`, 0,
/// key id, KEK id, 0, blind index): [`Keyring::unwrap`] accepting it checks
/// the code against its description.
pub fn wrapped_key() -> WrappedKey {
    let nonce = [0x07; 12];
    let mut aad = b"clinflow/dek/v1\0".to_vec();
    aad.extend_from_slice(DATA_KEY_ID.as_bytes());
    aad.extend_from_slice(LEGACY_KEK_ID.as_bytes());
    aad.push(0);
    aad.extend_from_slice(PATIENT_INDEX);
    let kek = Aes256Gcm::new(&KEK.into());
    let sealed = kek
        .encrypt(&Nonce::try_from(&nonce[..]).expect("12 bytes"), Payload { msg: &DATA_KEY_MATERIAL, aad: &aad })
        .expect("AES-GCM seals");
    let mut wrapped = vec![1];
    wrapped.extend_from_slice(&nonce);
    wrapped.extend_from_slice(&sealed);
    WrappedKey { id: DATA_KEY_ID, patient_index: PATIENT_INDEX.to_vec(), kek_id: LEGACY_KEK_ID.into(), wrapped }
}

/// The seeds' data key, unwrapped.
pub fn data_key() -> DataKey {
    keyring().unwrap(&wrapped_key()).expect("the hand-wrapped seed key unwraps as encryption.md says")
}

// --- session tokens -------------------------------------------------------

pub fn jwt_keys() -> clinflow_api::auth::JwtKeys {
    clinflow_api::auth::JwtKeys::new(&SecretBox::new(Box::new(b"fuzz-only JWT secret, 32 bytes or more".to_vec())))
}

/// The tokens of the seeds: (user, session) and the token, signed at a
/// fixed time, valid until 2100.
pub fn jwt_seed_tokens() -> Vec<((Uuid, Uuid), String)> {
    let keys = jwt_keys();
    let now = OffsetDateTime::from_unix_timestamp(1_767_225_600).expect("2026-01-01");
    let until = OffsetDateTime::from_unix_timestamp(4_102_444_800).expect("2100-01-01");
    [(1, 2), (0x0190_7f3e_0000_7000_8000_1111_2222_3333, 0x0190_7f3e_0000_7000_8000_4444_5555_6666)]
        .into_iter()
        .map(|(user, session)| {
            let ids = (Uuid::from_u128(user), Uuid::from_u128(session));
            (ids, keys.fuzz_sign(ids.0, ids.1, now, until).expect("signs"))
        })
        .collect()
}

/// A cheap, fixed mixing of `data` into a number (where to flip a bit).
pub fn mix(data: &[u8]) -> usize {
    data.iter().fold(0x811c_9dc5_usize, |h, b| (h ^ usize::from(*b)).wrapping_mul(0x0100_0193))
}

/// The ingest readers over bytes in memory, and the writers that make
/// their input again.
pub mod ingest {
    use std::path::Path;

    use clinflow_ingest::source::{CsvSource, Document, JsonlSource, Record, RecordResult};

    use super::assert_quotes_nothing;

    /// The documents of a CSV input, or `None` when the input as a whole is
    /// unusable (no header with the required columns); every rejection is
    /// checked on the way.
    pub fn read_csv(data: &[u8]) -> Option<Vec<Document>> {
        let source = match CsvSource::from_reader(Path::new("fuzz.csv"), data) {
            Ok(source) => source,
            Err(e) => {
                assert_quotes_nothing(&e.to_string());
                return None;
            }
        };
        Some(documents(source, "record "))
    }

    /// The documents of a JSON Lines input, every rejection checked.
    pub fn read_jsonl(data: &[u8]) -> Option<Vec<Document>> {
        Some(documents(JsonlSource::from_reader(Path::new("fuzz.jsonl"), data), "line "))
    }

    fn documents(records: impl Iterator<Item = RecordResult>, location: &str) -> Vec<Document> {
        let mut documents = Vec::new();
        for record in records {
            match record {
                Ok(Record::Document(doc)) => {
                    assert!(!doc.patient_ref.trim().is_empty() && !doc.text.trim().is_empty(), "{doc:?}");
                    documents.push(doc);
                }
                Ok(Record::Rejected(rejection)) => {
                    assert!(rejection.reason.starts_with(location), "{rejection:?}");
                    assert_quotes_nothing(&rejection.reason);
                }
                Err(e) => {
                    assert_quotes_nothing(&e.to_string());
                    break;
                }
            }
        }
        documents
    }

    /// `documents` written as CSV and as JSON Lines read back as themselves.
    pub fn round_trip(documents: &[Document]) {
        let csv = write_csv(documents);
        assert_eq!(read_csv(&csv).as_deref(), Some(documents), "through CSV: {:?}", String::from_utf8_lossy(&csv));
        let jsonl = write_jsonl(documents);
        assert_eq!(read_jsonl(&jsonl).as_deref(), Some(documents), "through JSONL");
    }

    fn write_csv(documents: &[Document]) -> Vec<u8> {
        let mut writer = csv::Writer::from_writer(Vec::new());
        writer.write_record(["source_ref", "patient_ref", "text", "document_date"]).expect("writes");
        for doc in documents {
            let date = doc.document_date.map(|d| d.to_string()).unwrap_or_default();
            writer.write_record([&doc.source_ref, &doc.patient_ref, &doc.text, &date]).expect("writes");
        }
        writer.into_inner().expect("flushes")
    }

    fn write_jsonl(documents: &[Document]) -> Vec<u8> {
        let mut out = Vec::new();
        for doc in documents {
            let line = serde_json::json!({
                "source_ref": doc.source_ref,
                "patient_ref": doc.patient_ref,
                "text": doc.text,
                "document_date": doc.document_date.map(|d| d.to_string()),
            });
            out.extend_from_slice(&serde_json::to_vec(&line).expect("encodes"));
            out.push(b'\n');
        }
        out
    }
}
