//! Wrapped data keys (`data_keys.wrapped`, 61 bytes) as `Keyring::unwrap`
//! reads them: no panic on any bytes; only a genuine wrap of the key for
//! its id, KEK and patient unwraps, to that key (bytes past the 61st stand
//! for another patient's blind index, which must not unwrap it); a key
//! wrapped for the input as a blind index unwraps to the same key; no error
//! quotes the input.
#![no_main]

use std::sync::LazyLock;

use clinflow::crypto::{DataKey, Keyring, WRAPPED_LEN, WrappedKey};
use clinflow_fuzz::{FIELD, assert_quotes_nothing, data_key, keyring, wrapped_key};
use libfuzzer_sys::fuzz_target;

static KEYRING: LazyLock<Keyring> = LazyLock::new(keyring);
static SEED: LazyLock<WrappedKey> = LazyLock::new(wrapped_key);
static KEY: LazyLock<DataKey> = LazyLock::new(data_key);

fuzz_target!(|data: &[u8]| {
    let (ring, seed, key) = (&*KEYRING, &*SEED, &*KEY);
    let (wrapped, patient_index) = match data.split_at_checked(WRAPPED_LEN) {
        Some((wrapped, rest)) if !rest.is_empty() => (wrapped, rest),
        _ => (data, &seed.patient_index[..]),
    };
    let stored = WrappedKey { wrapped: wrapped.to_vec(), patient_index: patient_index.to_vec(), ..seed.clone() };
    match ring.unwrap(&stored) {
        Ok(unwrapped) => {
            // Only a genuine wrap (the seed's, or another of the same key)
            // for the same patient: the same key comes out.
            assert_eq!(stored.patient_index, seed.patient_index, "unwrapped for another patient");
            let ct = key.seal(FIELD, b"note").expect("seals");
            assert_eq!(unwrapped.open(FIELD, &ct).as_deref(), Ok(&b"note"[..]), "another key came out");
        }
        Err(e) => assert_quotes_nothing(&e.to_string()),
    }

    // Wrapped for the input as a patient's blind index: it unwraps for that
    // patient only.
    let wrapped = ring.wrap(key, data).expect("wraps");
    assert_eq!(wrapped.wrapped.len(), WRAPPED_LEN);
    let back = ring.unwrap(&wrapped).expect("a key wrapped here unwraps");
    let ct = key.seal(FIELD, data).expect("seals");
    assert_eq!(back.open(FIELD, &ct).as_deref(), Ok(data));
    let mut elsewhere = wrapped.clone();
    elsewhere.patient_index.push(0);
    assert!(ring.unwrap(&elsewhere).is_err(), "unwrapped for another patient");
});
