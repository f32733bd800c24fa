//! The clinician queries, the FHIR export and erasure, on notes processed
//! by the real pipeline and MedCAT.

use std::collections::BTreeSet;
use std::io::Write;
use std::time::Duration;

use clinflow_api::users::Role;
use serde_json::{Value, json};

use crate::common::{Stack, wait_for_all_done, wait_until};

const AF: &str = "49436004";
const HTN: &str = "38341003";
const METFORMIN: &str = "372567009";

/// (patient, date, text): A has AF twice and hypertension, B AF and
/// metformin, C (another team's) AF.
const NOTES: &[(&str, &str, &str)] = &[
    ("PAT-A", "2025-01-10", "Known atrial fibrillation, rate controlled."),
    ("PAT-A", "2025-03-02", "Atrial fibrillation follow-up. Hypertension noted."),
    ("PAT-A", "2025-06-20", "Hypertension review, BP 150/90."),
    ("PAT-B", "2025-02-14", "New atrial fibrillation. Started metformin for diabetes."),
    ("PAT-C", "2025-04-01", "Paroxysmal atrial fibrillation."),
];

async fn seed(stack: &Stack) -> Vec<String> {
    stack.user("loader", Role::Ingest).await;
    stack.user("doctor", Role::Clinician).await;
    stack.user("elsewhere", Role::Clinician).await;
    stack.care_team("doctor", &["PAT-A", "PAT-B"]).await;
    stack.care_team("elsewhere", &["PAT-C"]).await;
    let loader = stack.login("loader").await;
    let mut ids = Vec::new();
    for (patient, date, text) in NOTES {
        let doc = json!({"patient_ref": patient, "text": text, "document_date": date});
        let (status, body) = stack.post("/v1/documents", Some(&loader), &doc).await;
        assert_eq!(status, 202, "{body}");
        ids.push(body["id"].as_str().unwrap().to_owned());
    }
    wait_for_all_done(stack, &ids).await;
    ids
}

fn strings(v: &Value, key: &str) -> BTreeSet<String> {
    v["items"].as_array().unwrap().iter().map(|i| i[key].as_str().unwrap().to_owned()).collect()
}

/// The ids of every page of a patient's documents, one a page, following
/// `next_cursor` (the reference in the body, as the route takes it).
async fn walk_patient_pages(stack: &Stack, token: &str, patient: &str) -> Vec<String> {
    let mut ids = Vec::new();
    let mut query = json!({"patient_ref": patient, "limit": 1});
    loop {
        let (status, page) = stack.post("/v1/patients/documents", Some(token), &query).await;
        assert_eq!(status, 200, "{page}");
        ids.extend(page["items"].as_array().unwrap().iter().map(|d| d["id"].as_str().unwrap().to_owned()));
        let Some(next) = page["next_cursor"].as_str() else { return ids };
        query["after"] = json!(next);
    }
}

/// The ids of every page of `path`, one item a page, following `next_cursor`.
async fn walk_pages(stack: &Stack, token: &str, path: &str) -> Vec<String> {
    let mut ids = Vec::new();
    let mut page_path = format!("{path}?limit=1");
    loop {
        let (status, page) = stack.get(&page_path, Some(token)).await;
        assert_eq!(status, 200, "{page}");
        ids.extend(page["items"].as_array().unwrap().iter().map(|d| d["id"].as_str().unwrap().to_owned()));
        let Some(next) = page["next_cursor"].as_str() else { return ids };
        page_path = format!("{path}?limit=1&after={next}");
    }
}

#[tokio::test]
async fn clinicians_query_patients_and_concepts_within_their_scope() {
    let stack = Stack::start().await;
    let ids = seed(&stack).await;
    let doctor = stack.login("doctor").await;
    let get = async |path: &str| stack.get(path, Some(&doctor)).await;
    let post = async |path: &str, body: Value| stack.post(path, Some(&doctor), &body).await;
    let documents = async |body: Value| post("/v1/patients/documents", body).await;

    // A patient's documents, newest first, paged by cursor.
    let (status, page) = documents(json!({"patient_ref": "PAT-A"})).await;
    assert_eq!(status, 200, "{page}");
    let listed: Vec<&str> = page["items"].as_array().unwrap().iter().map(|d| d["id"].as_str().unwrap()).collect();
    assert_eq!(listed, [ids[2].as_str(), ids[1].as_str(), ids[0].as_str()]);
    assert!(page["items"][0].get("text").is_none() && page["items"][0].get("patient_ref").is_none());
    let walked = walk_patient_pages(&stack, &doctor, "PAT-A").await;
    assert_eq!(walked, [ids[2].clone(), ids[1].clone(), ids[0].clone()]);
    let filtered = json!({"patient_ref": "PAT-A", "from": "2025-02-01", "until": "2025-04-01", "status": "done"});
    let (_, page) = documents(filtered).await;
    assert_eq!(strings(&page, "id"), BTreeSet::from([ids[1].clone()]));
    let (status, refused) = documents(json!({"patient_ref": "PAT-A", "from": "2025-13-01"})).await;
    assert_eq!((status, refused["error"]["code"].as_str()), (422, Some("invalid_date")));
    let (status, refused) = documents(json!({"patient_ref": ""})).await;
    assert_eq!((status, refused["error"]["code"].as_str()), (422, Some("invalid_patient_ref")));

    // The problem list.
    let (status, problems) = post("/v1/patients/concepts", json!({"patient_ref": "PAT-A"})).await;
    assert_eq!(status, 200, "{problems}");
    let entry = |cui: &str| problems["items"].as_array().unwrap().iter().find(|c| c["cui"] == cui).cloned();
    let af = entry(AF).expect("AF in A's problem list");
    assert_eq!(
        (af["documents"].as_i64(), af["first_date"].as_str(), af["last_date"].as_str()),
        (Some(2), Some("2025-01-10"), Some("2025-03-02"))
    );
    assert!(af["pretty_name"].as_str().unwrap().to_lowercase().contains("fibrillation"));
    let htn = entry(HTN).expect("hypertension in A's problem list");
    assert_eq!((htn["documents"].as_i64(), htn["last_date"].as_str()), (Some(2), Some("2025-06-20")));
    assert!(entry(METFORMIN).is_none(), "metformin is B's");

    // Which of my patients have AF, and in which documents: not C's.
    let (status, patients) = get(&format!("/v1/concepts/{AF}/patients")).await;
    assert_eq!(status, 200, "{patients}");
    assert_eq!(strings(&patients, "patient_ref"), BTreeSet::from(["PAT-A".to_owned(), "PAT-B".to_owned()]));
    let (_, first) = get(&format!("/v1/concepts/{AF}/patients?limit=1")).await;
    let next = first["next_cursor"].as_str().expect("a second page");
    let (_, second) = get(&format!("/v1/concepts/{AF}/patients?limit=1&after={next}")).await;
    let both: BTreeSet<String> =
        strings(&first, "patient_ref").union(&strings(&second, "patient_ref")).cloned().collect();
    assert_eq!(both.len(), 2);
    let (status, docs) = get(&format!("/v1/concepts/{AF}/documents")).await;
    assert_eq!(status, 200, "{docs}");
    assert_eq!(strings(&docs, "id"), BTreeSet::from([ids[0].clone(), ids[1].clone(), ids[3].clone()]));
    // Each with its date and upload time as its patient's document list
    // gives them (which reads `documents`; this reads the concept index).
    for doc in docs["items"].as_array().unwrap() {
        let patient = doc["patient_ref"].as_str().unwrap();
        let (_, theirs) = documents(json!({"patient_ref": patient})).await;
        let same = theirs["items"].as_array().unwrap().iter().find(|d| d["id"] == doc["id"]).expect("listed");
        assert_eq!((&doc["document_date"], &doc["created_at"]), (&same["document_date"], &same["created_at"]));
        assert!(doc["document_date"].is_string(), "{doc}");
    }
    // Paged one at a time: patient by patient, each one's newest first.
    let walked = walk_pages(&stack, &doctor, &format!("/v1/concepts/{AF}/documents")).await;
    let (a_newest, a_oldest) = (walked.iter().position(|d| *d == ids[1]), walked.iter().position(|d| *d == ids[0]));
    assert_eq!(walked.len(), 3, "{walked:?}");
    assert_eq!(a_newest.unwrap() + 1, a_oldest.unwrap(), "A's two AF notes together, newest first: {walked:?}");
    assert_eq!(get(&format!("/v1/concepts/{AF}/documents?after=zz.{}", ids[0])).await.0, 422);
    let (_, docs) = get(&format!("/v1/concepts/{METFORMIN}/documents")).await;
    assert_eq!(strings(&docs, "patient_ref"), BTreeSet::from(["PAT-B".to_owned()]));
    assert_eq!(get("/v1/concepts/bad%20cui/documents").await.0, 422);

    // Out of scope: C's patient, and a clinician of C's team sees only C.
    assert_eq!(documents(json!({"patient_ref": "PAT-C"})).await.0, 403);
    assert_eq!(post("/v1/patients/concepts", json!({"patient_ref": "PAT-C"})).await.0, 403);
    let elsewhere = stack.login("elsewhere").await;
    let (_, theirs) = stack.get(&format!("/v1/concepts/{AF}/patients"), Some(&elsewhere)).await;
    assert_eq!(strings(&theirs, "patient_ref"), BTreeSet::from(["PAT-C".to_owned()]));

    // The text only when asked for.
    let (_, doc) = get(&format!("/v1/documents/{}", ids[0])).await;
    assert!(doc.get("text").is_none());
    let (_, doc) = get(&format!("/v1/documents/{}?include=text", ids[0])).await;
    assert_eq!(doc["text"], NOTES[0].2);
    assert_eq!(get(&format!("/v1/documents/{}?include=secrets", ids[0])).await.0, 422);

    // Every call on the trail, with the patient as its blind index only.
    wait_until("patient reads audited", Duration::from_secs(30), async || {
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM audit_events WHERE action IN ('patient.read', 'concept.read')")
                .fetch_one(&stack.db.owner)
                .await
                .unwrap();
        n >= 12
    })
    .await;
    let leaked: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_events WHERE resource_id LIKE '%PAT-%'")
        .fetch_one(&stack.db.owner)
        .await
        .unwrap();
    assert_eq!(leaked, 0);
    stack.stop().await;
}

/// The concept index holds each document's current result only: a result
/// of another model version replaces the document's rows, so a concept the
/// old model found and the new one does not leaves the problem list.
#[tokio::test]
async fn a_result_from_another_model_replaces_its_documents_concepts() {
    let stack = Stack::start().await;
    let ids = seed(&stack).await;
    stack.user("operator", Role::Ops).await;
    let (doctor, operator) = (stack.login("doctor").await, stack.login("operator").await);
    let problems = async || {
        let (status, list) = stack.post("/v1/patients/concepts", Some(&doctor), &json!({"patient_ref": "PAT-A"})).await;
        assert_eq!(status, 200, "{list}");
        strings(&list, "cui")
    };
    let current = problems().await;
    assert!(current.contains(HTN), "{current:?}");

    // The third note as if an older model had coded it, finding one more
    // concept than today's model does.
    const OLD_ONLY: &str = "999999001";
    let doc: uuid::Uuid = ids[2].parse().unwrap();
    let mut tx = stack.db.owner.begin().await.unwrap();
    sqlx::query("UPDATE documents SET result_model = 'model-0' WHERE id = $1")
        .bind(doc)
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("UPDATE document_concepts SET model_version = 'model-0' WHERE document_id = $1")
        .bind(doc)
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO document_concepts (document_id, patient_index, document_date, created_at, model_version, cui,
                                        mentions, negated, first_offset)
         SELECT id, patient_index, document_date, created_at, 'model-0', $2, 1, 0, 0 FROM documents WHERE id = $1",
    )
    .bind(doc)
    .bind(OLD_ONLY)
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
    assert!(problems().await.contains(OLD_ONLY));

    // Coded again by today's model: its rows replace the old model's.
    let (status, body) = stack.post("/v1/ops/reprocess", Some(&operator), &json!({"all": true})).await;
    assert_eq!((status, &body), (200, &json!({"queued": 5})));
    wait_for_all_done(&stack, &ids).await;
    assert_eq!(problems().await, current);
    let old_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM document_concepts WHERE model_version = 'model-0'")
        .fetch_one(&stack.db.owner)
        .await
        .unwrap();
    assert_eq!(old_rows, 0);
    let stale: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM document_concepts dc JOIN documents d ON d.id = dc.document_id
         WHERE d.result_model IS DISTINCT FROM dc.model_version",
    )
    .fetch_one(&stack.db.owner)
    .await
    .unwrap();
    assert_eq!(stale, 0, "every row is of its document's current result");
    stack.stop().await;
}

/// Every table's rows as text (bytea as hex), for scanning.
async fn every_row(db: &sqlx::PgPool) -> Vec<(String, String)> {
    let tables: Vec<String> =
        sqlx::query_scalar("SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' ORDER BY 1")
            .fetch_all(db)
            .await
            .unwrap();
    let mut rows = Vec::new();
    for table in tables {
        let texts: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT t::text FROM \"{table}\" t")))
            .fetch_all(db)
            .await
            .unwrap();
        rows.extend(texts.into_iter().map(|t| (table.clone(), t)));
    }
    rows
}

fn validate_fhir(bundle: &Value) -> String {
    let python = std::env::var("FHIR_PYTHON").expect("FHIR_PYTHON: the venv of dev/fhir/setup (./dev/test sets it)");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../dev/fhir/validate.py");
    let mut child = std::process::Command::new(python)
        .arg(script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(bundle.to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let verdict = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(out.status.success(), "{verdict}");
    verdict
}

#[tokio::test]
async fn a_patient_exports_as_valid_fhir_and_is_erased_from_every_table() {
    let stack = Stack::start().await;
    let ids = seed(&stack).await;
    stack.user("admin", Role::Admin).await;
    stack.user("privacy", Role::PrivacyOfficer).await;
    stack.user("privacy2", Role::PrivacyOfficer).await;
    let (doctor, admin) = (stack.login("doctor").await, stack.login("admin").await);
    let (privacy, privacy2) = (stack.login("privacy").await, stack.login("privacy2").await);
    let export = async |token: &str, body: Value| stack.post("/v1/patients/export", Some(token), &body).await;
    let case =
        |patient: &str| json!({"patient_ref": patient, "reason": "gdpr_access_request", "case_ref": "DSAR-2026-7"});

    // The export: the Patient, A's three notes with their text, coded concepts.
    let (status, bundle) = export(&doctor, json!({"patient_ref": "PAT-A"})).await;
    assert_eq!(status, 200, "{bundle}");
    let verdict = validate_fhir(&bundle);
    println!("FHIR export of PAT-A: {verdict}");
    let entries = bundle["entry"].as_array().unwrap();
    let of = |kind: &str| entries.iter().filter(|e| e["resource"]["resourceType"] == kind).count();
    assert_eq!((of("Patient"), of("DocumentReference")), (1, 3));
    assert!(of("Condition") >= 3, "AF twice, hypertension twice: {verdict}");
    let patient = entries.iter().find(|e| e["resource"]["resourceType"] == "Patient").unwrap();
    assert_eq!(patient["resource"]["identifier"][0]["value"], "PAT-A");
    let texts: BTreeSet<String> = entries
        .iter()
        .filter(|e| e["resource"]["resourceType"] == "DocumentReference")
        .map(|e| {
            use base64::Engine;
            let data = e["resource"]["content"][0]["attachment"]["data"].as_str().unwrap();
            String::from_utf8(base64::engine::general_purpose::STANDARD.decode(data).unwrap()).unwrap()
        })
        .collect();
    assert_eq!(texts, NOTES[..3].iter().map(|n| n.2.to_owned()).collect());
    let coded = entries.iter().any(|e| {
        e["resource"]["resourceType"] == "Condition"
            && e["resource"]["code"]["coding"][0]["system"] == "http://snomed.info/sct"
            && e["resource"]["code"]["coding"][0]["code"] == AF
            && e["resource"]["extension"][0]["extension"][1]["url"] == "start"
    });
    assert!(coded, "an AF Condition with its evidence span");
    // Outside the doctor's scope: 403. A privacy officer exports any
    // patient, with a reason code and the case's reference; the admin no
    // longer can.
    assert_eq!(export(&doctor, json!({"patient_ref": "PAT-C"})).await.0, 403);
    assert_eq!(export(&admin, case("PAT-C")).await.0, 403);
    let (status, refused) = export(&privacy, json!({"patient_ref": "PAT-C"})).await;
    assert_eq!((status, refused["error"]["code"].as_str()), (403, Some("case_required")), "{refused}");
    let (status, refused) =
        export(&privacy, json!({"patient_ref": "PAT-C", "reason": "gdpr_access_request", "case_ref": "DSAR 7"})).await;
    assert_eq!((status, refused["error"]["code"].as_str()), (422, Some("invalid_case_ref")), "{refused}");
    assert_eq!(export(&privacy, case("PAT-C")).await.0, 200);

    // Erasure: a privacy officer asks, with a reason code and the case; a
    // second one approves; only then is A gone everywhere.
    let ask = async |token: &str, reason: &str| {
        let body = json!({"patient_ref": "PAT-A", "reason": reason, "case_ref": "DSAR-2026-7"});
        stack.post("/v1/privacy/erasures", Some(token), &body).await
    };
    let approve = async |token: &str, id: &str| {
        stack.post(&format!("/v1/privacy/erasures/{id}/approve"), Some(token), &json!({})).await
    };
    // A copy of one note's ciphertext, as a backup would hold it.
    let backup: Vec<u8> = sqlx::query_scalar("SELECT text_ct FROM document_texts WHERE document_id = $1::uuid")
        .bind(&ids[0])
        .fetch_one(&stack.db.owner)
        .await
        .unwrap();
    let keys = clinflow::testing::keys();
    let field = clinflow::documents::text_field(ids[0].parse().unwrap());
    assert_eq!(keys.open_string(&stack.db.owner, field, &backup).await.unwrap(), NOTES[0].2);
    assert_eq!(ask(&privacy, "Because the patient asked me to").await.0, 422);
    assert_eq!(ask(&admin, "gdpr_erasure_request").await.0, 403, "the admin no longer erases");
    let (status, pending) = ask(&privacy, "gdpr_erasure_request").await;
    assert_eq!(status, 201, "{pending}");
    let request = pending["id"].as_str().unwrap().to_owned();
    assert_eq!(ask(&privacy2, "gdpr_erasure_request").await.0, 409, "one open request per patient");
    let (status, listed) = stack.get("/v1/privacy/erasures", Some(&privacy2)).await;
    assert_eq!((status, listed[0]["id"].as_str()), (200, Some(request.as_str())), "{listed}");
    assert!(!listed.to_string().contains("PAT-A"), "the list names the patient by blind index only");
    let (status, refused) = approve(&privacy, &request).await;
    assert_eq!((status, refused["error"]["code"].as_str()), (403, Some("four_eyes_required")));
    assert_eq!(approve(&admin, &request).await.0, 403);
    assert_eq!(export(&doctor, json!({"patient_ref": "PAT-A"})).await.0, 200, "nothing erased before approval");
    let (status, erased) = approve(&privacy2, &request).await;
    assert_eq!(status, 200, "{erased}");
    assert_eq!(
        (erased["documents"].as_i64(), erased["team_entries"].as_i64(), erased["data_keys"].as_i64()),
        (Some(3), Some(1), Some(1))
    );
    assert_eq!(approve(&privacy2, &request).await.0, 404, "approved once");
    assert_eq!(ask(&privacy, "gdpr_erasure_request").await.0, 404, "nothing left to erase");
    // Crypto-shredding: the backup's copy no longer opens, with the master key.
    let shredded = clinflow::testing::keys().open_string(&stack.db.owner, field, &backup).await;
    assert!(shredded.is_err(), "an erased patient's ciphertext still opens");
    assert_eq!(export(&privacy, case("PAT-A")).await.0, 404);
    let index = clinflow::documents::patient_index(&clinflow::testing::index_key(), "PAT-A");
    let index_hex: String = index.iter().map(|b| format!("{b:02x}")).collect();
    // The audit trail keeps its events (append-only, by law too) and the
    // erasure its request: they name the patient by blind index only, which
    // now points at nothing. The trail is audit_events and its month
    // partitions (audit_events_YYYY_MM).
    let kept =
        |table: &str| table.starts_with("audit_events") || ["audit_disclosures", "erasure_requests"].contains(&table);
    for (table, row) in every_row(&stack.db.owner).await {
        assert!(kept(&table) || !row.contains(&index_hex), "PAT-A's blind index left in {table}");
        for id in &ids[..3] {
            assert!(kept(&table) || !row.contains(id.as_str()), "erased document {id} left in {table}");
        }
    }
    // B is untouched.
    let (_, patients) = stack.get(&format!("/v1/concepts/{AF}/patients"), Some(&doctor)).await;
    assert_eq!(strings(&patients, "patient_ref"), BTreeSet::from(["PAT-B".to_owned()]));

    // No patient reference, note text or annotation in clear anywhere (as
    // text, hex or base64), the audit trail included.
    use base64::Engine;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let hexed = |s: &str| s.bytes().map(|b| format!("{b:02x}")).collect::<String>();
    let mut needles: Vec<String> = Vec::new();
    for (patient, _, text) in NOTES {
        for s in [*patient, &text[..20]] {
            needles.extend([s.to_owned(), hexed(s), b64(s)]);
        }
    }
    // (The names of concepts are the model's vocabulary, in concept_names;
    // an annotation in clear would carry its JSON keys.)
    needles.extend(["pretty_name".to_owned(), hexed("pretty_name"), "\"start\":".to_owned()]);
    for (table, row) in every_row(&stack.db.owner).await {
        for needle in &needles {
            assert!(!row.contains(needle.as_str()), "{table} holds {needle:?} in clear");
        }
    }
    wait_until("export and erasure audited", Duration::from_secs(30), async || {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM audit_events WHERE action IN ('patient.export', 'patient.erase', 'patient.erase_request')
             AND resource_kind = 'patient'",
        )
        .fetch_one(&stack.db.owner)
        .await
        .unwrap();
        n >= 5
    })
    .await;
    stack.stop().await;
}
