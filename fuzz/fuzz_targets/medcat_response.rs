//! MedCAT's answers as the worker reads them (`medcat::parse_process`,
//! `medcat::parse_bulk`): no panic; every annotation's span is in order;
//! annotations read back from a MedCAT answer made of them, and from the
//! JSON the worker stores, are the same; an answer's error quotes nothing
//! of it (MedCAT echoes the note's text, and a failed document's error is
//! logged).
#![no_main]

use clinflow::annotation::Annotation;
use clinflow_fuzz::assert_quotes_nothing;
use clinflow_worker::medcat::{MedcatError, Processed, parse_bulk, parse_process};
use libfuzzer_sys::fuzz_target;
use serde_json::json;

const FOOTER: &str = "doc-0190a1b2";

fuzz_target!(|data: &[u8]| {
    match parse_process(data, FOOTER) {
        Ok(processed) => round_trip(&processed),
        Err(e) => refused(&e),
    }
    let documents = serde_json::from_slice::<serde_json::Value>(data)
        .ok()
        .and_then(|v| v.get("result").and_then(|r| r.as_array()).map(Vec::len))
        .unwrap_or(1);
    for n in [documents, documents + 1] {
        match parse_bulk(data, n) {
            Ok(results) => {
                assert_eq!(results.len(), n);
                for result in results {
                    match result {
                        Ok(processed) => round_trip(&processed),
                        Err(e) => refused(&e),
                    }
                }
            }
            Err(e) => refused(&e),
        }
    }
});

fn refused(e: &MedcatError) {
    assert_quotes_nothing(&e.to_string());
    assert_quotes_nothing(&format!("{e:?}"));
    assert!(!e.is_transient() || matches!(e, MedcatError::FooterMismatch), "{e:?}");
}

fn round_trip(processed: &Processed) {
    let annotations = &processed.annotations;
    for a in annotations {
        assert!(a.start <= a.end, "{a:?}");
    }
    // As the worker stores them (sealed JSON) and the api reads them back.
    let stored = serde_json::to_vec(annotations).expect("annotations encode");
    let read: Vec<Annotation> = serde_json::from_slice(&stored).expect("stored annotations decode");
    assert_eq!(&read, annotations);
    // As MedCAT would answer them again, in list mode.
    let answer = json!({
        "medcat_info": {"service_model": processed.model_version},
        "result": {"annotations": [annotations], "success": true, "footer": FOOTER},
    });
    let again = parse_process(&serde_json::to_vec(&answer).expect("encodes"), FOOTER).expect("our own answer parses");
    assert_eq!(&again.annotations, annotations);
    assert_eq!(again.model_version, processed.model_version);
}
