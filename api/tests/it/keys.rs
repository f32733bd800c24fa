//! Envelope keys against the real database: the pipeline runs on a few notes,
//! then the master key is rotated (and the old one removed), a patient's data
//! key replaced, format-1 rows read and migrated — and everything is read back
//! through the API as a clinician of the patients' care team.

use std::collections::BTreeMap;
use std::time::Duration;

use clinflow::crypto::{CryptoError, Keyring};
use clinflow::documents;
use clinflow::keys::rotation::{self, Batches};
use clinflow::keys::{self, KeyError, Keys};
use clinflow::testing;
use clinflow_api::users::Role;
use secrecy::SecretBox;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::common::{PASSWORD, Stack, wait_for_all_done, wait_until};

const NOTES: [(&str, &str); 5] = [
    ("KEYS-PAT-A", "Known AF, started metformin."),
    ("KEYS-PAT-A", "Review: metformin continued."),
    ("KEYS-PAT-B", "Known HTN."),
    ("KEYS-PAT-B", "Started metformin today."),
    ("KEYS-PAT-C", "Known AF."),
];

fn new_kek() -> SecretBox<[u8; 32]> {
    let mut key = [0u8; 32];
    key[..16].copy_from_slice(Uuid::new_v4().as_bytes());
    key[16..].copy_from_slice(Uuid::new_v4().as_bytes());
    SecretBox::new(Box::new(key))
}

/// Uploads the notes (three singly, two in a batch), puts the patients in
/// `doctor`'s team, breaks the glass for patient A as `other-doctor`, waits
/// until every note is processed; returns the document ids.
async fn run_pipeline(stack: &Stack) -> Vec<String> {
    stack.user("loader", Role::Ingest).await;
    stack.user("doctor", Role::Clinician).await;
    stack.user("other-doctor", Role::Clinician).await;
    stack.care_team("doctor", &["KEYS-PAT-A", "KEYS-PAT-B", "KEYS-PAT-C"]).await;
    let loader = stack.login("loader").await;
    let mut ids = Vec::new();
    for (patient, text) in &NOTES[..3] {
        let (status, body) =
            stack.post("/v1/documents", Some(&loader), &json!({"patient_ref": patient, "text": text})).await;
        assert_eq!(status, 202, "{body}");
        ids.push(body["id"].as_str().unwrap().to_owned());
    }
    let ndjson: String =
        NOTES[3..].iter().map(|(p, t)| format!("{}\n", json!({"patient_ref": p, "text": t}))).collect();
    let response = stack
        .http
        .post(format!("{}/v1/documents/batch", stack.base))
        .bearer_auth(&loader)
        .header("content-type", "application/x-ndjson")
        .body(ndjson)
        .send()
        .await
        .unwrap();
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["accepted"], 2, "{body}");
    for outcome in body["outcomes"].as_array().unwrap() {
        ids.push(outcome["id"].as_str().unwrap().to_owned());
    }
    let other = stack.login("other-doctor").await;
    let glass =
        json!({"patient_ref": "KEYS-PAT-A", "reason": "unconscious in ED, no team on call", "password": PASSWORD});
    let (status, body) = stack.post("/v1/break-glass", Some(&other), &glass).await;
    assert_eq!(status, 201, "{body}");
    wait_for_all_done(stack, &ids).await;
    ids
}

const METFORMIN: &str = "372567009";

/// Every document as the doctor reads it (patient_ref, model, annotations),
/// and their patients with metformin and those documents as the concept
/// endpoints list them (patient references opened beside the data keys).
async fn read_all(stack: &Stack, ids: &[String]) -> BTreeMap<String, Value> {
    let doctor = stack.login("doctor").await;
    let mut read = read_concepts(stack).await;
    for id in ids {
        let (status, body) = stack.get(&format!("/v1/documents/{id}"), Some(&doctor)).await;
        assert_eq!(status, 200, "{id}: {body}");
        assert_eq!(body["status"], "done");
        assert!(!body["annotations"].as_array().unwrap().is_empty(), "{body}");
        read.insert(id.clone(), json!([body["patient_ref"], body["model_version"], body["annotations"]]));
    }
    read
}

async fn read_concepts(stack: &Stack) -> BTreeMap<String, Value> {
    let doctor = stack.login("doctor").await;
    let mut read = BTreeMap::new();
    for what in ["patients", "documents"] {
        let (status, body) = stack.get(&format!("/v1/concepts/{METFORMIN}/{what}"), Some(&doctor)).await;
        assert_eq!(status, 200, "{what}: {body}");
        read.insert(format!("concept {what}"), body["items"].clone());
    }
    read
}

async fn break_glass_reasons(stack: &Stack) -> Vec<Value> {
    if sqlx::query_scalar::<_, i64>("SELECT count(*) FROM users WHERE username = 'keys-admin'")
        .fetch_one(&stack.db.owner)
        .await
        .unwrap()
        == 0
    {
        stack.user("keys-admin", Role::Admin).await;
    }
    let admin = stack.login("keys-admin").await;
    let (status, grants) = stack.get("/v1/admin/break-glass", Some(&admin)).await;
    assert_eq!(status, 200, "{grants}");
    grants.as_array().unwrap().iter().map(|g| g["reason"].clone()).collect()
}

/// Every ciphertext in the database: (table/column/row, bytes).
async fn ciphertexts(stack: &Stack) -> BTreeMap<String, Vec<u8>> {
    let mut all = BTreeMap::new();
    // Labelled by patient: re-encryption replaces the key row.
    let refs: Vec<(Vec<u8>, Vec<u8>)> =
        sqlx::query_as("SELECT patient_index, patient_ref_ct FROM data_keys").fetch_all(&stack.db.owner).await.unwrap();
    for (patient, p) in refs {
        all.insert(format!("data_keys/patient_ref/{}", hex(&patient)), p);
    }
    let docs: Vec<(Uuid, Vec<u8>, Vec<u8>)> = sqlx::query_as(
        "SELECT d.id, d.patient_ref_ct, t.text_ct FROM documents d JOIN document_texts t ON t.document_id = d.id",
    )
    .fetch_all(&stack.db.owner)
    .await
    .unwrap();
    for (id, p, t) in docs {
        all.insert(format!("documents/patient_ref/{id}"), p);
        all.insert(format!("documents/text/{id}"), t);
    }
    let results: Vec<(Uuid, Vec<u8>)> = sqlx::query_as("SELECT document_id, annotations_ct FROM document_results")
        .fetch_all(&stack.db.owner)
        .await
        .unwrap();
    for (id, a) in results {
        all.insert(format!("document_results/annotations/{id}"), a);
    }
    let grants: Vec<(Uuid, Vec<u8>)> =
        sqlx::query_as("SELECT id, reason_ct FROM break_glass_grants").fetch_all(&stack.db.owner).await.unwrap();
    for (id, r) in grants {
        all.insert(format!("break_glass_grants/reason/{id}"), r);
    }
    all
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn audited(stack: &Stack, action: &str) -> Vec<(String, String, Option<String>)> {
    sqlx::query_as("SELECT resource_kind, resource_id, reason FROM audit_events WHERE action = $1 ORDER BY seq")
        .bind(action)
        .fetch_all(&stack.db.owner)
        .await
        .unwrap()
}

#[tokio::test]
async fn rotation_then_removal_of_the_old_key_leaves_everything_readable() {
    let mut stack = Stack::start().await;
    let ids = run_pipeline(&stack).await;
    let before = read_all(&stack, &ids).await;
    let reasons_before = break_glass_reasons(&stack).await;
    assert_eq!(reasons_before, vec![json!("unconscious in ED, no team on call")]);

    // One data key per patient, under the master key "1"; every ciphertext
    // of format 2 names its patient's key.
    let keys: Vec<(Uuid, String)> =
        sqlx::query_as("SELECT id, kek_id FROM data_keys ORDER BY id").fetch_all(&stack.db.owner).await.unwrap();
    assert_eq!(keys.len(), 3);
    assert!(keys.iter().all(|(_, kek)| kek == "1"), "{keys:?}");
    let sealed = ciphertexts(&stack).await;
    assert_eq!(sealed.len(), 5 * 3 + 1 + 3);
    for (what, ct) in &sealed {
        assert_eq!(ct[0], 2, "{what}");
        let key = Uuid::from_slice(&ct[1..17]).unwrap();
        assert!(keys.iter().any(|(id, _)| *id == key), "{what} names an unknown key");
    }

    // Act: rotate to k2, two keys per transaction, with "1" still held.
    let k2 = new_kek();
    let master = SecretBox::new(Box::new(testing::master_key()));
    let both = Keys::new(Keyring::new("k2", [("k2".to_owned(), &k2), ("1".to_owned(), &master)]));
    let mut progress = Vec::new();
    let actor = testing::audit_keys().operator("clinflow-api");
    let batches = Batches { db: &stack.db.owner, keys: &both, operator: &actor, size: 2 };
    let done = rotation::rotate(batches, |n| progress.push(n)).await.unwrap();
    assert_eq!((done, progress), (3, vec![2, 3]));
    assert_eq!(rotation::rotate(batches, |_| {}).await.unwrap(), 0, "nothing left");

    // Assert: every key re-wrapped under k2, no ciphertext touched.
    let after: Vec<(Uuid, String, bool)> =
        sqlx::query_as("SELECT id, kek_id, rotated_at IS NOT NULL FROM data_keys ORDER BY id")
            .fetch_all(&stack.db.owner)
            .await
            .unwrap();
    assert_eq!(
        after.iter().map(|(id, _, _)| *id).collect::<Vec<_>>(),
        keys.iter().map(|(id, _)| *id).collect::<Vec<_>>()
    );
    assert!(after.iter().all(|(_, kek, rotated)| kek == "k2" && *rotated), "{after:?}");
    assert_eq!(ciphertexts(&stack).await, sealed, "rotation decrypts and rewrites no document");

    // A process holding only the old key fails closed, naming the KEK.
    let old_only = testing::keys();
    let (doc_id, text_ct): (Uuid, Vec<u8>) = sqlx::query_as("SELECT document_id, text_ct FROM document_texts LIMIT 1")
        .fetch_one(&stack.db.owner)
        .await
        .unwrap();
    let err = old_only.open(&stack.db.owner, documents::text_field(doc_id), &text_ct).await.unwrap_err();
    assert!(matches!(&err, KeyError::Crypto(CryptoError::UnknownKek(_, kek)) if kek == "k2"), "{err}");
    assert!(err.to_string().contains("\"k2\"") && err.to_string().contains("CLINFLOW_MASTER_KEY"), "{err}");

    // The api restarted with only k2: documents, results, patient refs and
    // break-glass reasons all read as before.
    stack.serve_api_with(Keyring::new("k2", [("k2".to_owned(), &k2)])).await;
    assert_eq!(read_all(&stack, &ids).await, before);
    assert_eq!(break_glass_reasons(&stack).await, reasons_before);

    let rotations = async || audited(&stack, "keys.rotate").await;
    wait_until("the rotation audited", Duration::from_secs(30), async || rotations().await.len() == 2).await;
    let events = rotations().await;
    assert_eq!(events[0], ("data_keys".into(), "2".into(), Some("kek:k2".into())));
    assert_eq!(events[1], ("data_keys".into(), "1".into(), Some("kek:k2".into())));
    stack.stop().await;
}

#[tokio::test]
async fn reencryption_replaces_a_patients_key_and_moved_ciphertexts_fail() {
    let stack = Stack::start().await;
    let ids = run_pipeline(&stack).await;
    let before = read_all(&stack, &ids).await;
    let index_a = documents::patient_index(&testing::index_key(), "KEYS-PAT-A");
    let old = rotation::key_of_patient(&stack.db.owner, &index_a).await.unwrap().unwrap();
    let sealed = ciphertexts(&stack).await;

    let keys = testing::keys();
    let done = rotation::reencrypt(&stack.db.owner, &keys, &testing::audit_keys().operator("clinflow-api"), old)
        .await
        .unwrap();
    assert_eq!((done.old_key, done.documents, done.results, done.grants), (old, 2, 2, 1));

    // The old key is gone, the patient has the new one, and every ciphertext
    // of theirs changed and names it; the other patients' did not change.
    let new = rotation::key_of_patient(&stack.db.owner, &index_a).await.unwrap();
    assert_eq!(new, Some(done.new_key));
    assert_ne!(done.new_key, old);
    let old_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM data_keys WHERE id = $1")
        .bind(old)
        .fetch_one(&stack.db.owner)
        .await
        .unwrap();
    assert_eq!(old_rows, 0);
    let resealed = ciphertexts(&stack).await;
    let mut changed = 0;
    for (what, ct) in &resealed {
        let was = &sealed[what];
        if was[1..17] == *old.as_bytes() {
            assert_ne!(ct, was, "{what}");
            assert_eq!(&ct[1..17], done.new_key.as_bytes(), "{what}");
            changed += 1;
        } else {
            assert_eq!(ct, was, "{what} is another patient's");
        }
    }
    assert_eq!(changed, 2 * 3 + 1 + 1, "A's documents, results, grant and the reference beside the key");
    assert_eq!(read_all(&stack, &ids).await, before, "everything reads as before");
    assert_eq!(break_glass_reasons(&stack).await, vec![json!("unconscious in ED, no team on call")]);

    // A ciphertext sealed under the destroyed key fails closed.
    let (what, stale) =
        sealed.iter().find(|(w, ct)| w.starts_with("documents/text/") && ct[1..17] == *old.as_bytes()).unwrap();
    let row: Uuid = what.rsplit('/').next().unwrap().parse().unwrap();
    let err = keys.open(&stack.db.owner, documents::text_field(row), stale).await.unwrap_err();
    assert!(matches!(err, KeyError::Crypto(CryptoError::UnknownDataKey(id)) if id == old), "{err}");

    // Patient A's text moved to patient B's document (under A's key, or
    // with B's key id written in), or to another column, does not open.
    let index_b = documents::patient_index(&testing::index_key(), "KEYS-PAT-B");
    let key_b = rotation::key_of_patient(&stack.db.owner, &index_b).await.unwrap().unwrap();
    let (doc_a, text_a): (Uuid, Vec<u8>) =
        sqlx::query_as("SELECT d.id, t.text_ct FROM documents d JOIN document_texts t ON t.document_id = d.id WHERE d.data_key_id = $1 LIMIT 1")
            .bind(done.new_key)
            .fetch_one(&stack.db.owner)
            .await
            .unwrap();
    let doc_b: Uuid = sqlx::query_scalar("SELECT id FROM documents WHERE data_key_id = $1 LIMIT 1")
        .bind(key_b)
        .fetch_one(&stack.db.owner)
        .await
        .unwrap();
    let mut relabelled = text_a.clone();
    relabelled[1..17].copy_from_slice(key_b.as_bytes());
    let beside_key: Vec<u8> = sqlx::query_scalar("SELECT patient_ref_ct FROM data_keys WHERE id = $1")
        .bind(done.new_key)
        .fetch_one(&stack.db.owner)
        .await
        .unwrap();
    assert_eq!(
        keys.open_string(&stack.db.owner, keys::data_key_ref_field(done.new_key), &beside_key).await.unwrap(),
        "KEYS-PAT-A"
    );
    for (field, ct) in [
        (documents::text_field(doc_b), &text_a),
        (documents::text_field(doc_b), &relabelled),
        (documents::patient_ref_field(doc_a), &text_a),
        (documents::annotations_field(doc_a), &text_a),
        (documents::patient_ref_field(doc_a), &beside_key),
        (keys::data_key_ref_field(key_b), &beside_key),
    ] {
        let err = keys.open(&stack.db.owner, field, ct).await.unwrap_err();
        assert!(matches!(err, KeyError::Crypto(CryptoError::Authentication)), "{field:?}: {err}");
    }
    // Through the API: B's patient reference replaced by A's text is a 500
    // that shows nothing of either.
    sqlx::query("UPDATE documents SET patient_ref_ct = $1 WHERE id = $2")
        .bind(&text_a)
        .bind(doc_b)
        .execute(&stack.db.owner)
        .await
        .unwrap();
    let doctor = stack.login("doctor").await;
    let (status, body) = stack.get(&format!("/v1/documents/{doc_b}"), Some(&doctor)).await;
    assert_eq!(status, 500, "{body}");
    assert!(!body.to_string().contains("metformin") && !body.to_string().contains("KEYS-PAT"), "{body}");

    let events = async || audited(&stack, "keys.reencrypt").await;
    wait_until("the re-encryption audited", Duration::from_secs(30), async || events().await.len() == 1).await;
    let expected = ("data_key".to_owned(), old.to_string(), Some(format!("replaced_by:{}", done.new_key)));
    assert_eq!(events().await, vec![expected]);
    stack.stop().await;
}

#[tokio::test]
async fn format_1_rows_still_read_and_migrate_to_the_patients_key() {
    let stack = Stack::start().await;
    let uploader = stack.user("loader", Role::Ingest).await;
    stack.user("doctor", Role::Clinician).await;
    stack.care_team("doctor", &["KEYS-PAT-V1"]).await;
    // A document and its result as stored before envelope keys.
    let ring = testing::keyring();
    let id = Uuid::now_v7();
    let annotations = json!([{"cui": "372567009", "pretty_name": "Metformin", "start": 8, "end": 17, "acc": 1.0, "type_ids": [], "meta_anns": {}}]);
    let index = documents::patient_index(&testing::index_key(), "KEYS-PAT-V1");
    sqlx::query(
        "WITH d AS (INSERT INTO documents (id, status, patient_ref_ct, uploaded_by, patient_index, lawful_basis)
                    VALUES ($1, 'done', $2, $4, $5, 'direct_care') RETURNING id)
         INSERT INTO document_texts (document_id, text_ct) SELECT id, $3 FROM d",
    )
    .bind(id)
    .bind(ring.seal_v1(documents::patient_ref_field(id), b"KEYS-PAT-V1").unwrap())
    .bind(ring.seal_v1(documents::text_field(id), b"Started metformin.").unwrap())
    .bind(uploader)
    .bind(&index)
    .execute(&stack.db.owner)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO document_results (document_id, model_version, annotations_ct, annotation_count)
         VALUES ($1, 'old-model', $2, 1)",
    )
    .bind(id)
    .bind(ring.seal_v1(documents::annotations_field(id), annotations.to_string().as_bytes()).unwrap())
    .execute(&stack.db.owner)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO document_concepts (document_id, patient_index, created_at, model_version, cui,
                                        mentions, negated, first_offset)
         VALUES ($1, $2, now(), 'old-model', $3, 1, 0, 8)",
    )
    .bind(id)
    .bind(&index)
    .bind(METFORMIN)
    .execute(&stack.db.owner)
    .await
    .unwrap();
    let ids = [id.to_string()];
    let before = read_all(&stack, &ids).await;
    assert_eq!(before[&ids[0]], json!(["KEYS-PAT-V1", "old-model", annotations]));
    // No data key yet: the concept endpoints open the document's reference.
    assert_eq!(before["concept documents"][0]["patient_ref"], "KEYS-PAT-V1", "{before:?}");

    let (keys, index_key, actor) =
        (testing::keys(), testing::index_key(), testing::audit_keys().operator("clinflow-api"));
    let batches = Batches { db: &stack.db.owner, keys: &keys, operator: &actor, size: 10 };
    let moved = rotation::migrate_v1(batches, &index_key, |_| {}).await.unwrap();
    assert_eq!(moved, (1, 0));
    let (key, p, t): (Option<Uuid>, Vec<u8>, Vec<u8>) =
        sqlx::query_as("SELECT d.data_key_id, d.patient_ref_ct, t.text_ct FROM documents d JOIN document_texts t ON t.document_id = d.id WHERE d.id = $1")
            .bind(id)
            .fetch_one(&stack.db.owner)
            .await
            .unwrap();
    let key = key.expect("a data key now");
    assert_eq!(rotation::key_of_patient(&stack.db.owner, &index).await.unwrap(), Some(key));
    let beside: Option<Vec<u8>> = sqlx::query_scalar("SELECT patient_ref_ct FROM data_keys WHERE id = $1")
        .bind(key)
        .fetch_one(&stack.db.owner)
        .await
        .unwrap();
    let beside = beside.expect("the reference sealed beside the new key");
    assert_eq!(keys.open_string(&stack.db.owner, keys::data_key_ref_field(key), &beside).await.unwrap(), "KEYS-PAT-V1");
    let a: Vec<u8> = sqlx::query_scalar("SELECT annotations_ct FROM document_results WHERE document_id = $1")
        .bind(id)
        .fetch_one(&stack.db.owner)
        .await
        .unwrap();
    for ct in [&p, &t, &a] {
        assert_eq!((ct[0], &ct[1..17]), (2, &key.as_bytes()[..]));
    }
    assert_eq!(keys.open_string(&stack.db.owner, documents::text_field(id), &t).await.unwrap(), "Started metformin.");
    assert_eq!(read_all(&stack, &ids).await, before);
    let again = rotation::migrate_v1(batches, &index_key, |_| {}).await.unwrap();
    assert_eq!(again, (0, 0), "nothing left");
    stack.stop().await;
}

#[tokio::test]
async fn keys_from_before_references_beside_them_read_through_documents_until_sealed() {
    let stack = Stack::start().await;
    let ids = run_pipeline(&stack).await;
    let before = read_all(&stack, &ids).await;
    assert_eq!(
        before["concept patients"].as_array().unwrap().len(),
        2,
        "A and B have metformin: {}",
        before["concept patients"]
    );
    // As migration 20261130000001 leaves the keys that existed before it.
    sqlx::query("UPDATE data_keys SET patient_ref_ct = NULL").execute(&stack.db.owner).await.unwrap();
    assert_eq!(read_all(&stack, &ids).await, before, "the references come from the patients' documents");

    let (keys, actor) = (testing::keys(), testing::audit_keys().operator("clinflow-api"));
    let mut progress = Vec::new();
    let batches = Batches { db: &stack.db.owner, keys: &keys, operator: &actor, size: 2 };
    let done = rotation::seal_refs(batches, |n| progress.push(n)).await.unwrap();
    assert_eq!((done, progress), (3, vec![2, 3]));
    assert_eq!(rotation::seal_refs(batches, |_| {}).await.unwrap(), 0, "nothing left");
    let sealed: Vec<(Uuid, Vec<u8>, Vec<u8>)> =
        sqlx::query_as("SELECT id, patient_index, patient_ref_ct FROM data_keys")
            .fetch_all(&stack.db.owner)
            .await
            .unwrap();
    for (id, index, ct) in sealed {
        let patient = keys.open_string(&stack.db.owner, keys::data_key_ref_field(id), &ct).await.unwrap();
        assert_eq!(documents::patient_index(&testing::index_key(), &patient), index);
    }
    // Documents' references no longer needed: the concept endpoints read
    // only beside the keys.
    sqlx::query("UPDATE documents SET patient_ref_ct = '\\x00'").execute(&stack.db.owner).await.unwrap();
    let now = read_concepts(&stack).await;
    assert_eq!(now["concept patients"], before["concept patients"]);
    assert_eq!(now["concept documents"], before["concept documents"]);

    let events = async || audited(&stack, "keys.seal_refs").await;
    wait_until("the sealing audited", Duration::from_secs(30), async || events().await.len() == 2).await;
    assert_eq!(events().await[0], ("data_keys".into(), "2".into(), None));
    stack.stop().await;
}
