//! Session tokens as the api's guard validates them (`JwtKeys::verify`,
//! reached through `fuzz_verify`): no panic on any string; only a token
//! signed with the api's secret verifies, and as its own claims; a token
//! signed for ids taken from the input verifies to those ids, and no
//! single changed character of it does. (The guard turns every failure
//! into a fixed code, `expired_token` or `invalid_token`: the library's
//! error text is never shown, so it is not checked here.)
#![no_main]

use std::sync::LazyLock;

use clinflow_api::auth::JwtKeys;
use clinflow_fuzz::{jwt_keys, jwt_seed_tokens, mix};
use libfuzzer_sys::fuzz_target;
use time::OffsetDateTime;
use uuid::Uuid;

static KEYS: LazyLock<JwtKeys> = LazyLock::new(jwt_keys);
static SEEDS: LazyLock<Vec<((Uuid, Uuid), String)>> = LazyLock::new(jwt_seed_tokens);

fuzz_target!(|data: &[u8]| {
    let keys = &*KEYS;
    if let Ok(token) = std::str::from_utf8(data) {
        if let Ok(ids) = keys.fuzz_verify(token) {
            let seed = SEEDS.iter().find(|(_, t)| t == token);
            assert_eq!(seed.map(|(ids, _)| *ids), Some(ids), "a token not signed here verified: {token:?}");
        }
    }

    // Ids from the input, signed now: they verify as themselves, and a
    // token with any one character changed does not.
    let mut bytes = [0u8; 32];
    for (i, b) in data.iter().take(32).enumerate() {
        bytes[i] = *b;
    }
    let user = Uuid::from_slice(&bytes[..16]).expect("16 bytes");
    let session = Uuid::from_slice(&bytes[16..]).expect("16 bytes");
    let now = OffsetDateTime::now_utc();
    let token = keys.fuzz_sign(user, session, now, now + time::Duration::hours(8)).expect("signs");
    assert_eq!(keys.fuzz_verify(&token).ok(), Some((user, session)));
    let at = mix(data) % token.len();
    let original = token.as_bytes()[at];
    let replacement = data
        .get(32)
        .copied()
        .filter(|b| b.is_ascii_graphic() && *b != original)
        .unwrap_or(if original == b'A' { b'B' } else { b'A' });
    let mut changed = token.clone().into_bytes();
    changed[at] = replacement;
    let changed = String::from_utf8(changed).expect("ASCII");
    assert!(keys.fuzz_verify(&changed).is_err(), "{token} changed at {at} to {changed} still verifies");
});
