//! Unit tests of the MedCAT client's parsing.

use super::*;
use serde_json::json;

fn ent(cui: &str, start: u32, end: u32) -> Value {
    json!({"pretty_name": "X", "cui": cui, "type_ids": ["T047"], "acc": 1, "start": start, "end": end, "meta_anns": {}})
}

#[test]
fn accepts_dict_list_and_empty_shapes() {
    let dict = json!([{"1": ent("b", 10, 12), "0": ent("a", 0, 3)}]);
    let got = parse_annotations(&dict).unwrap();
    assert_eq!(got.iter().map(|a| a.cui.as_str()).collect::<Vec<_>>(), ["a", "b"]);
    assert_eq!(got[0].acc, 1.0);
    assert_eq!(parse_annotations(&json!([[ent("a", 0, 3), ent("b", 4, 5)]])).unwrap().len(), 2);
    for empty in [json!([{}]), json!([[]]), json!([]), Value::Null] {
        assert!(parse_annotations(&empty).unwrap().is_empty());
    }
}

#[test]
fn rejects_entities_without_offsets() {
    assert!(parse_annotations(&json!([{"0": {"cui": "a", "start": -1, "end": 2}}])).is_err());
    assert!(parse_annotations(&json!([{"0": {"cui": "a", "start": 5, "end": 2}}])).is_err());
    assert!(parse_annotations(&json!("nope")).is_err());
}

/// The bodies as the client reads them: MedCAT echoes the note, and no
/// error may quote it.
#[test]
fn answers_parse_and_their_errors_quote_nothing() {
    let answer = |annotations: Value, footer: Value| {
        json!({"medcat_info": {"service_model": "m-1"},
            "result": {"text": "PAT-SECRET", "annotations": annotations, "success": true, "footer": footer}})
    };
    let body = serde_json::to_vec(&answer(json!([{"0": ent("a", 0, 3)}]), json!("f-1"))).unwrap();
    let processed = parse_process(&body, "f-1").unwrap();
    assert_eq!((processed.model_version.as_deref(), processed.annotations.len()), (Some("m-1"), 1));
    assert!(matches!(parse_process(&body, "f-2"), Err(MedcatError::FooterMismatch)));
    let bulk = serde_json::to_vec(&json!({"result": [answer(json!([]), Value::Null)["result"].clone()]})).unwrap();
    assert_eq!(parse_bulk(&bulk, 1).unwrap().len(), 1);
    assert!(matches!(parse_bulk(&bulk, 2), Err(MedcatError::Decode(_))));
    for bad in [
        answer(json!("PAT-SECRET"), Value::Null),
        answer(json!([{"0": {"cui": "PAT-SECRET", "start": "PAT-SECRET", "end": 1}}]), Value::Null),
        json!({"result": "PAT-SECRET"}),
    ] {
        let error = parse_process(&serde_json::to_vec(&bad).unwrap(), "f").unwrap_err().to_string();
        assert!(!error.contains("SECRET"), "{error}");
    }
}

#[test]
fn transient_classification() {
    for code in [408, 429, 502, 503, 504] {
        assert!(MedcatError::Status(StatusCode::from_u16(code).unwrap(), None).is_transient(), "{code}");
    }
    for code in [400, 404, 422, 500, 501] {
        assert!(!MedcatError::Status(StatusCode::from_u16(code).unwrap(), None).is_transient(), "{code}");
    }
    assert!(!MedcatError::Decode("x".into()).is_transient());
    assert!(!MedcatError::NotSuccessful.is_transient());
}

#[test]
fn retry_after_replaces_the_backoff_delay_but_not_the_budget() {
    let busy = MedcatError::Status(StatusCode::SERVICE_UNAVAILABLE, Some(Duration::from_secs(7)));
    assert_eq!(adjust(&busy, Some(Duration::from_millis(500))), Some(Duration::from_secs(7)));
    assert_eq!(adjust(&busy, None), None, "no retries left");
    let long = MedcatError::Status(StatusCode::TOO_MANY_REQUESTS, Some(Duration::from_secs(3600)));
    assert_eq!(adjust(&long, Some(Duration::from_millis(500))), Some(Duration::from_secs(60)));
}
