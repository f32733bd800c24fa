//! The ingest tool's CSV reader (`source::CsvSource`): no panic; every
//! rejection names its record and line and quotes no value; the documents
//! it reads, written back as CSV and as JSON Lines, read back the same.
#![no_main]

use clinflow_fuzz::ingest::{read_csv, round_trip};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(documents) = read_csv(data) {
        round_trip(&documents);
    }
});
