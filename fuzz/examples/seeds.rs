//! Writes the seed corpora, fuzz/corpus/<target>/, from the real shapes:
//! a job as the outbox publishes it, audit messages as the api and the
//! worker sign them, ciphertexts and a wrapped key as `crypto` makes them
//! (under the fixed keys of `clinflow_fuzz`), tokens as the api signs them,
//! MedCAT answers as dev/medcat/service.py gives them, batches and ingest
//! inputs as the tests send them. Every value that could be PHI holds
//! [`CANARY`]. Beside them, kept by hand: `medcat_response/dev_medcat_*`,
//! answers of the real dev/medcat service to a note holding the canary,
//! and inputs that once failed a target (`ingest_jsonl/blank_source_ref`).
//! Run again after a format changes:
//!
//! ```text
//! cargo run --manifest-path fuzz/Cargo.toml --example seeds
//! ```

use std::path::Path;

use clinflow::audit::{Action, Actor, ActorKind, AuditEvent, Outcome};
use clinflow::crypto::DataKey;
use clinflow::jobs::DocumentJob;
use clinflow_fuzz::{CANARY, FIELD, audit_signers, data_key, jwt_keys, jwt_seed_tokens, keyring, wrapped_key};
use serde_json::json;
use time::OffsetDateTime;
use uuid::Uuid;

fn main() -> std::io::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let write = |target: &str, name: &str, bytes: &[u8]| -> std::io::Result<()> {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(name), bytes)
    };
    let document = Uuid::from_u128(0x0190_a1b2_c3d4_7e5f_8a6b_7c8d_9e0f_1a2b);
    let note = format!("Patient {CANARY} (DOB 1961-03-02) seen for type 2 diabetes; started metformin 500 mg.");

    // Jobs: the outbox's body, and poison.
    write("job_message", "job.json", &serde_json::to_vec(&DocumentJob { document_id: document }).expect("encodes"))?;
    write("job_message", "poison_string.json", format!("\"{CANARY}\"").as_bytes())?;
    write("job_message", "poison_id.json", format!("{{\"document_id\":\"{CANARY}\"}}").as_bytes())?;
    write(
        "job_message",
        "extra_field.json",
        format!("{{\"document_id\":\"{document}\",\"text\":\"{note}\"}}").as_bytes(),
    )?;

    // Audit: a worker batch, an api login refusal, an api upload batch
    // naming patients, one event edited after signing, one unsigned.
    let [api, worker] = audit_signers();
    let at = OffsetDateTime::from_unix_timestamp(1_767_225_600).expect("2026-01-01");
    let stamp = |e: AuditEvent, n: u128| e.id(Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0100 + n));
    let processed: Vec<AuditEvent> = (0..3)
        .map(|n| {
            let mut e = AuditEvent::new(Action::DocumentProcess, Actor::service("clinflow-worker"), Outcome::Success)
                .document(Uuid::from_u128(document.as_u128() + n));
            e.occurred_at = at;
            stamp(e, n)
        })
        .collect();
    write("audit_message", "worker_batch.json", &worker.messages(&processed).expect("signs")[0].1)?;
    let mut login = AuditEvent::new(Action::Login, Actor::anonymous(Some(CANARY)), Outcome::Denied)
        .reason("bad_credentials")
        .from_request(Some("203.0.113.7".parse().expect("an address")), Some("req-7f3a".into()));
    login.occurred_at = at;
    let login = stamp(login, 10);
    write("audit_message", "api_login.json", &api.body(&login).expect("signs"))?;
    let uploads: Vec<AuditEvent> = (0..2)
        .map(|n| {
            let clinician = Actor {
                kind: ActorKind::User,
                id: Some(document),
                name: Some("dr.o".into()),
                role: Some("clinician".into()),
            };
            let mut e = AuditEvent::new(Action::DocumentUpload, clinician, Outcome::Success)
                .document(document)
                .patient(&[0xab; 32]);
            e.occurred_at = at;
            stamp(e, 20 + n)
        })
        .collect();
    write("audit_message", "api_uploads.json", &api.messages(&uploads).expect("signs")[0].1)?;
    let mut edited = api.sign(&login).expect("signs");
    edited.event.reason = Some(CANARY.into());
    write("audit_message", "edited.json", &serde_json::to_vec(&edited).expect("encodes"))?;
    write("audit_message", "unsigned.json", &serde_json::to_vec(&login).expect("encodes"))?;
    write("audit_message", "worker_for_api.json", &worker.body(&login).expect("signs"))?;

    // Ciphertexts: format 2 under the seed data key, format 1 under the
    // KEK, and format 2 under some other key.
    let key = data_key();
    write("crypto_envelope", "v2_note.bin", &key.seal(FIELD, note.as_bytes()).expect("seals"))?;
    write("crypto_envelope", "v2_empty.bin", &key.seal(FIELD, b"").expect("seals"))?;
    write("crypto_envelope", "v1_result.bin", &keyring().seal_v1(FIELD, b"[{\"cui\":\"44054006\"}]").expect("seals"))?;
    write("crypto_envelope", "v2_other_key.bin", &DataKey::generate().seal(FIELD, note.as_bytes()).expect("seals"))?;

    // Wrapped keys: the seed key, the same for another patient (the bytes
    // past the 61st), and one freshly wrapped by the keyring.
    let wrapped = wrapped_key();
    write("wrapped_key", "wrapped.bin", &wrapped.wrapped)?;
    write("wrapped_key", "other_patient.bin", &[&wrapped.wrapped[..], b"another patient"].concat())?;
    write("wrapped_key", "rewrapped.bin", &keyring().wrap(&key, &wrapped.patient_index).expect("wraps").wrapped)?;

    // MedCAT: /api/process in dict and list modes, blank, unsuccessful,
    // /api/process_bulk, an unreadable answer; as dev/medcat/service.py.
    let info = json!({"service_app_name": "MedCAT", "service_language": "en", "service_version": "1.2.0",
        "service_model": "clinflow_dev_snomed_2026_01", "model_card_info": {"model_concept_id": "clinflow-dev"}});
    let entity = |id: u32, cui: &str, name: &str, start: u32, end: u32| {
        json!({"pretty_name": name, "cui": cui, "type_ids": ["T047"], "source_value": name, "detected_name": name,
            "acc": 0.987_654_321, "context_similarity": 1.0, "start": start, "end": end, "id": id,
            "meta_anns": {"Presence": {"value": "True", "confidence": 0.99, "name": "Presence"}}})
    };
    let diabetes = entity(0, "44054006", "type 2 diabetes", 45, 60);
    let metformin = entity(1, "109081006", "metformin", 70, 79);
    let result = |annotations: serde_json::Value, footer: serde_json::Value| {
        json!({"text": note, "annotations": annotations, "success": true, "timestamp": "2026-11-22T21:48:37.665+00:00",
            "elapsed_time": 0.0123, "footer": footer})
    };
    let process = |annotations, footer| json!({"medcat_info": info, "result": result(annotations, footer)});
    let dict = json!([{"0": diabetes, "1": metformin}]);
    write(
        "medcat_response",
        "process_dict.json",
        &serde_json::to_vec(&process(dict.clone(), json!("doc-0190a1b2"))).expect("encodes"),
    )?;
    write(
        "medcat_response",
        "process_list.json",
        &serde_json::to_vec(&process(json!([[diabetes, metformin]]), json!(null))).expect("encodes"),
    )?;
    write(
        "medcat_response",
        "process_blank.json",
        &serde_json::to_vec(&process(json!([[]]), json!({"doc_id": "doc-43", "n": 7}))).expect("encodes"),
    )?;
    let mut failed = process(json!([]), json!(null));
    failed["result"]["success"] = json!(false);
    write("medcat_response", "process_failed.json", &serde_json::to_vec(&failed).expect("encodes"))?;
    let bulk = json!({"medcat_info": info, "result": [result(dict, json!(null)), result(json!([]), json!(null)), result(json!([{}]), json!(null))]});
    write("medcat_response", "bulk.json", &serde_json::to_vec(&bulk).expect("encodes"))?;
    write("medcat_response", "truncated.json", &serde_json::to_vec(&bulk).expect("encodes")[..200])?;

    // Tokens: the seeds', one expired, one with "alg": "none".
    for (n, (_, token)) in jwt_seed_tokens().into_iter().enumerate() {
        write("jwt", &format!("token_{n}.txt"), token.as_bytes())?;
    }
    let past = OffsetDateTime::from_unix_timestamp(1_577_836_800).expect("2020-01-01");
    let expired = jwt_keys().fuzz_sign(document, document, past, past + time::Duration::hours(8)).expect("signs");
    write("jwt", "expired.txt", expired.as_bytes())?;
    let seed = &jwt_seed_tokens()[0].1;
    let payload = seed.split('.').nth(1).expect("three parts");
    write("jwt", "alg_none.txt", format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{payload}.").as_bytes())?;

    // NDJSON batches (the first byte sets the chunk sizes): lines as the
    // batch tests send them, blank and CRLF lines, one over the line limit.
    let line = |v: serde_json::Value| serde_json::to_string(&v).expect("encodes");
    let batch = [
        line(json!({"patient_ref": "PAT-1", "text": "Started metformin.", "source_ref": "b/n.txt"})),
        String::new(),
        line(json!({"patient_ref": "PAT-2", "text": "Known AF.", "source_ref": "a/n.txt", "document_date": "2026-02-14"})),
        "  \r".into(),
        line(json!({"patient_ref": CANARY, "text": note, "colour": "red"})),
        line(json!({"patient_ref": "PAT-4", "text": CANARY.repeat(30)})),
        "{not json".into(),
    ]
    .join("\n");
    write("ndjson_lines", "batch.ndjson", &[&[0x35], batch.as_bytes()].concat())?;
    write("ndjson_lines", "crlf.ndjson", &[&[0x01], batch.replace('\n', "\r\n").as_bytes()].concat())?;

    // Ingest inputs, as ingest's own tests read them.
    write(
        "ingest_csv",
        "quoted_multiline.csv",
        b"text,document_date,patient_ref\n\"Line one,\nline \"\"two\"\"\",2026-02-14,P1\nplain,,P2\n",
    )?;
    write("ingest_csv", "bom_source_ref.csv", "\u{feff}Source_Ref,patient_ref,text\nehr-1,P,t\n,P,t\n".as_bytes())?;
    write(
        "ingest_csv",
        "rejects.csv",
        format!("patient_ref,text,document_date\nP1,\"multi\nline\",2026-01-01\nP2,short\n,{CANARY},\nP4,{CANARY},yesterday\nP5,fine,\n").as_bytes(),
    )?;
    write("ingest_csv", "bad_utf8.csv", b"patient_ref,text\nP,\xff\xfe\n")?;
    write("ingest_csv", "no_text_column.csv", format!("patient_ref,body\n{CANARY},t\n").as_bytes())?;
    write(
        "ingest_jsonl",
        "records.jsonl",
        concat!(
            r#"{"patient_ref":"P1","text":"one","document_date":"2026-02-14"}"#,
            "\n\n",
            r#"{"patient_ref":"P2","text":"two","source_ref":"ehr-2","extra":1}"#,
            "\r\n",
            r#"{"patient_ref":"P3","text":"three","source_ref":""}"#,
        )
        .as_bytes(),
    )?;
    write(
        "ingest_jsonl",
        "rejects.jsonl",
        format!(
            "{{\"patient_ref\":\"{CANARY}\",\"text\":\n[1,2]\n{{\"patient_ref\":\"P\",\"text\":42}}\n{{\"text\":\"{CANARY}\",\"source_ref\":\"s-4\"}}\n\
             {{\"patient_ref\":\"P\",\"text\":\"t\",\"document_date\":\"{CANARY}\"}}\n\u{feff}{{\"patient_ref\":\"P\",\"text\":\"fine\"}}\n"
        )
        .as_bytes(),
    )?;
    write("ingest_jsonl", "bad_utf8.jsonl", b"{\xff}\n{\"patient_ref\":\"P\",\"text\":\"t\"}")?;
    Ok(())
}
