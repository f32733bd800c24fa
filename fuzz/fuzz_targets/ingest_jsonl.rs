//! The ingest tool's JSON Lines reader (`source::JsonlSource`): no panic;
//! every rejection names its line and quotes no value; the documents it
//! reads, written back as JSON Lines and as CSV, read back the same.
#![no_main]

use clinflow_fuzz::ingest::{read_jsonl, round_trip};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(documents) = read_jsonl(data) {
        round_trip(&documents);
    }
});
