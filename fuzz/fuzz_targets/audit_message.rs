//! An audit message as the sink reads it (`signing::parse_message`, then
//! the signature checks, then the fallbacks that choose its dead-letter
//! reason): no panic; 1 to MAX_EVENTS_PER_MESSAGE events; the events read
//! back from their own message body are the same events with the same
//! verdict; the batch check (`check_all`, batch verification) agrees with
//! checking each event alone; a refused body's error quotes nothing of it.
#![no_main]

use std::sync::LazyLock;

use clinflow::audit::signing::{self, PublicKeys};
use clinflow::audit::{AuditEvent, MAX_EVENTS_PER_MESSAGE};
use clinflow_fuzz::{assert_quotes_nothing, audit_public_keys};
use libfuzzer_sys::fuzz_target;

static KEYS: LazyLock<PublicKeys> = LazyLock::new(audit_public_keys);

fuzz_target!(|data: &[u8]| {
    let keys = &*KEYS;
    match signing::parse_message(data) {
        Ok(events) => {
            assert!((1..=MAX_EVENTS_PER_MESSAGE).contains(&events.len()));
            let verdict = keys.check_all(&events);
            let alone: Vec<_> = events.iter().map(|e| keys.check(e)).collect();
            assert_eq!(verdict.is_ok(), alone.iter().all(Result::is_ok), "batch {verdict:?}, alone {alone:?}");
            let body = signing::message_body(&events).expect("events encode");
            let back = signing::parse_message(&body).expect("a body of ours parses");
            assert_eq!(back, events);
            assert_eq!(keys.check_all(&back), verdict);
            for (event, again) in events.iter().zip(&back) {
                let canonical = event.event.canonical_bytes().expect("encodes");
                assert_eq!(canonical, again.event.canonical_bytes().expect("encodes"));
            }
        }
        Err(e) => {
            assert_quotes_nothing(&e.to_string());
            // The sink's reason for a body that is no signed message.
            let _ = serde_json::from_slice::<AuditEvent>(data);
            let _ = serde_json::from_slice::<Vec<AuditEvent>>(data);
        }
    }
});
