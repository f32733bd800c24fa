//! Ciphertexts (formats 1 and 2) as `clinflow::crypto` opens them: the
//! header (`envelope`) reads the version and key id it claims and nothing
//! else; opening never panics and opens only a genuine ciphertext of its
//! row; the input as a plaintext seals and opens back to itself, and a
//! single flipped bit of that ciphertext, or another row, is refused; no
//! error quotes the input.
#![no_main]

use std::sync::LazyLock;

use clinflow::crypto::{CryptoError, DataKey, Envelope, Field, Keyring, envelope};
use clinflow_fuzz::{FIELD, assert_quotes_nothing, data_key, keyring, mix};
use libfuzzer_sys::fuzz_target;

static KEY: LazyLock<DataKey> = LazyLock::new(data_key);
static KEYRING: LazyLock<Keyring> = LazyLock::new(keyring);

fuzz_target!(|data: &[u8]| {
    let (key, ring) = (&*KEY, &*KEYRING);
    match envelope(data) {
        Ok(Envelope::V1) => assert!(data[0] == 1 && data.len() >= 1 + 4 + 12 + 16),
        Ok(Envelope::V2(id)) => {
            assert!(data[0] == 2 && data.len() >= 1 + 16 + 12 + 16 && id.as_bytes() == &data[1..17])
        }
        Err(CryptoError::Malformed) => assert!(matches!(data.first(), None | Some(1 | 2))),
        Err(CryptoError::UnknownFormat(v)) => assert_eq!(Some(&v), data.first()),
        Err(other) => panic!("the header alone answered {other:?}"),
    }
    for opened in [key.open(FIELD, data), ring.open_v1(FIELD, data)] {
        match opened {
            Ok(plain) => {
                assert_eq!(key.open(FIELD, &key.seal(FIELD, &plain).expect("seals")).as_deref(), Ok(&plain[..]))
            }
            Err(e) => assert_quotes_nothing(&e.to_string()),
        }
    }

    // The input as a note: it seals and opens back, and nothing else opens.
    let other_row = Field { row: uuid::Uuid::from_u128(mix(data) as u128), ..FIELD };
    let sealed = [key.seal(FIELD, data).expect("seals"), ring.seal_v1(FIELD, data).expect("seals")];
    for (i, ct) in sealed.iter().enumerate() {
        let open = |field: Field, ct: &[u8]| if i == 0 { key.open(field, ct) } else { ring.open_v1(field, ct) };
        assert_eq!(open(FIELD, ct).as_deref(), Ok(data));
        if other_row.row != FIELD.row {
            assert_eq!(open(other_row, ct), Err(CryptoError::Authentication));
        }
        let bit = mix(data) % (ct.len() * 8);
        let mut flipped = ct.clone();
        flipped[bit / 8] ^= 1 << (bit % 8);
        let refused = open(FIELD, &flipped).expect_err("a flipped bit is refused");
        assert_quotes_nothing(&refused.to_string());
        assert_quotes_nothing(&format!("{refused:?}"));
        assert!(open(FIELD, &ct[..ct.len() - 1]).is_err(), "a truncated ciphertext is refused");
    }
});
