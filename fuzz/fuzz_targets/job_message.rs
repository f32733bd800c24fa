//! The document job as the worker and the dead-letter commands read it off
//! the queue (`clinflow::jobs::decode`): no panic; a job read back from its
//! own encoding is the same job; a poison body's error quotes nothing of it.
#![no_main]

use clinflow::jobs::{self, DocumentJob};
use clinflow_fuzz::assert_quotes_nothing;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match jobs::decode(data) {
        Ok(job) => {
            let body = serde_json::to_vec(&job).expect("a job encodes");
            assert_eq!(jobs::decode(&body), Ok(job));
            assert_eq!(body, serde_json::to_vec(&DocumentJob { document_id: job.document_id }).expect("encodes"));
        }
        Err(e) => assert_quotes_nothing(&e.to_string()),
    }
});
