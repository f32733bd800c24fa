//! Unit tests of `crypto`.

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

fn kek(byte: u8) -> SecretBox<[u8; 32]> {
    SecretBox::new(Box::new([byte; 32]))
}

fn keyring(byte: u8) -> Keyring {
    Keyring::from_master_key(&kek(byte))
}

fn field(column: &'static str, row: Uuid) -> Field {
    Field { table: "documents", column, row }
}

#[test]
fn format_2_round_trip_and_header() {
    let key = DataKey::generate();
    let row = Uuid::now_v7();
    let ct = key.seal_str(field("text", row), "Patient on metformin").unwrap();
    assert_eq!(ct[0], FORMAT_V2);
    assert_eq!(&ct[1..17], key.id().as_bytes());
    assert_eq!(ct.len(), V2_HEADER + "Patient on metformin".len() + TAG);
    assert!(!ct.windows(9).any(|w| w == b"metformin"));
    assert_eq!(envelope(&ct), Ok(Envelope::V2(key.id())));
    assert_eq!(key.open(field("text", row), &ct).unwrap(), b"Patient on metformin");
}

#[test]
fn nonces_differ_between_seals() {
    let key = DataKey::generate();
    let row = Uuid::now_v7();
    let a = key.seal(field("text", row), b"same").unwrap();
    let b = key.seal(field("text", row), b"same").unwrap();
    assert_ne!(a[17..29], b[17..29]);
    assert_ne!(a, b);
}

#[test]
fn ciphertext_is_bound_to_its_row_column_and_data_key() {
    let key = DataKey::generate();
    let row = Uuid::now_v7();
    let ct = key.seal(field("text", row), b"x").unwrap();
    assert_eq!(key.open(field("text", Uuid::now_v7()), &ct), Err(CryptoError::Authentication));
    assert_eq!(key.open(field("patient_ref", row), &ct), Err(CryptoError::Authentication));
    let other_table = Field { table: "document_results", column: "text", row };
    assert_eq!(key.open(other_table, &ct), Err(CryptoError::Authentication));
    // Another patient's key refuses it by id; with the id rewritten, by tag.
    let other = DataKey::generate();
    assert_eq!(other.open(field("text", row), &ct), Err(CryptoError::UnknownDataKey(key.id())));
    let mut moved = ct.clone();
    moved[1..17].copy_from_slice(other.id().as_bytes());
    assert_eq!(other.open(field("text", row), &moved), Err(CryptoError::Authentication));
}

#[test]
fn flipped_bytes_truncation_and_unknown_formats_are_refused() {
    let key = DataKey::generate();
    let row = Uuid::now_v7();
    let ct = key.seal(field("text", row), b"hello").unwrap();
    for i in 17..ct.len() {
        let mut bad = ct.clone();
        bad[i] ^= 0x01;
        assert_eq!(key.open(field("text", row), &bad), Err(CryptoError::Authentication), "byte {i}");
    }
    for len in [0, 1, 17, V2_HEADER, V2_HEADER + TAG - 1] {
        assert_eq!(key.open(field("text", row), &ct[..len]), Err(CryptoError::Malformed), "length {len}");
    }
    assert_eq!(key.open(field("text", row), &ct[..ct.len() - 1]), Err(CryptoError::Authentication));
    let mut v9 = ct.clone();
    v9[0] = 9;
    assert_eq!(key.open(field("text", row), &v9), Err(CryptoError::UnknownFormat(9)));
}

#[test]
fn data_keys_wrap_and_unwrap_bound_to_id_and_patient() {
    let keyring = Keyring::new("k2", [("k2".to_owned(), &kek(2)), ("k1".to_owned(), &kek(1))]);
    let key = DataKey::generate();
    let wrapped = keyring.wrap(&key, b"patient-a").unwrap();
    assert_eq!((wrapped.kek_id.as_str(), wrapped.wrapped.len()), ("k2", WRAPPED_LEN));
    let back = keyring.unwrap(&wrapped).unwrap();
    let row = Uuid::now_v7();
    assert_eq!(back.open(field("text", row), &key.seal(field("text", row), b"x").unwrap()).unwrap(), b"x");

    let other_patient = WrappedKey { patient_index: b"patient-b".to_vec(), ..wrapped.clone() };
    assert_eq!(keyring.unwrap(&other_patient).err(), Some(CryptoError::Unwrap(key.id(), "k2".into())));
    let other_id = WrappedKey { id: Uuid::now_v7(), ..wrapped.clone() };
    assert!(matches!(keyring.unwrap(&other_id), Err(CryptoError::Unwrap(..))));
    let other_kek = WrappedKey { kek_id: "k1".into(), ..wrapped.clone() };
    assert_eq!(keyring.unwrap(&other_kek).err(), Some(CryptoError::Unwrap(key.id(), "k1".into())));
    let mut flipped = wrapped.clone();
    flipped.wrapped[20] ^= 1;
    assert!(matches!(keyring.unwrap(&flipped), Err(CryptoError::Unwrap(..))));
    let mut short = wrapped.clone();
    short.wrapped.pop();
    assert!(matches!(keyring.unwrap(&short), Err(CryptoError::Unwrap(..))));

    // Without its KEK the key fails closed, naming the KEK id.
    let without = Keyring::new("k3", [("k3".to_owned(), &kek(3))]);
    let err = without.unwrap(&wrapped).err().unwrap();
    assert_eq!(err, CryptoError::UnknownKek(key.id(), "k2".into()));
    assert!(err.to_string().contains("\"k2\""), "{err}");
}

#[test]
fn format_1_still_opens_under_kek_1_only() {
    let row = Uuid::now_v7();
    let k = keyring(7);
    let ct = k.seal_v1(field("text", row), b"legacy").unwrap();
    assert_eq!((ct[0], &ct[1..5]), (FORMAT_V1, &1u32.to_be_bytes()[..]));
    assert_eq!(envelope(&ct), Ok(Envelope::V1));
    assert_eq!(k.open_v1(field("text", row), &ct).unwrap(), b"legacy");
    assert_eq!(k.open_v1(field("patient_ref", row), &ct), Err(CryptoError::Authentication));
    assert_eq!(keyring(8).open_v1(field("text", row), &ct), Err(CryptoError::Authentication));
    let without_1 = Keyring::new("k2", [("k2".to_owned(), &kek(7))]);
    assert_eq!(without_1.open_v1(field("text", row), &ct), Err(CryptoError::UnknownKey(1)));
    let mut other_number = ct.clone();
    other_number[4] = 9;
    assert_eq!(k.open_v1(field("text", row), &other_number), Err(CryptoError::UnknownKey(9)));
    assert_eq!(k.open_v1(field("text", row), b"short"), Err(CryptoError::UnknownFormat(b's')));
}
