//! The walking skeleton end to end: the bundled sample notes go in through
//! clinflow-ingest and the API, MedCAT annotates them, and a clinician reads
//! the results — checked against the note text, the database bytes and the
//! audit trail.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use clinflow::documents;
use clinflow_api::users::Role;
use clinflow_ingest::load;
use clinflow_ingest::progress::Progress;
use clinflow_ingest::source::{self, Record};
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::common::{Stack, audit_trust};
use crate::ingest::{ingest_client, load_options};

const METFORMIN: &str = "372567009";
const ATRIAL_FIBRILLATION: &str = "49436004";

fn repo_path(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

/// cui -> normalised names, from the concept list the model is built from.
fn concept_names() -> HashMap<String, HashSet<String>> {
    let mut names: HashMap<String, HashSet<String>> = HashMap::new();
    let mut reader = csv::Reader::from_path(repo_path("dev/medcat/concepts.csv")).unwrap();
    for row in reader.records() {
        let row = row.unwrap();
        names.entry(row[0].to_owned()).or_default().insert(normalise(&row[1]));
    }
    names
}

/// MedCAT matches case-insensitively and tokenises on punctuation.
fn normalise(s: &str) -> String {
    s.chars().filter(|c| c.is_alphanumeric()).flat_map(char::to_lowercase).collect()
}

/// Code-point spans of whole-word occurrences of `word` (case-sensitive).
fn occurrences(text: &str, word: &str) -> Vec<(u32, u32)> {
    let chars: Vec<char> = text.chars().collect();
    let w: Vec<char> = word.chars().collect();
    let mut out = Vec::new();
    for i in 0..chars.len().saturating_sub(w.len() - 1) {
        let boundary_before = i == 0 || !chars[i - 1].is_alphanumeric();
        let boundary_after = chars.get(i + w.len()).is_none_or(|c| !c.is_alphanumeric());
        if boundary_before && boundary_after && chars[i..i + w.len()] == w[..] {
            out.push((i as u32, (i + w.len()) as u32));
        }
    }
    out
}

fn span_text(text: &str, start: u32, end: u32) -> String {
    text.chars().skip(start as usize).take((end - start) as usize).collect()
}

#[tokio::test]
async fn sample_notes_flow_from_upload_to_an_encrypted_audited_result() {
    let stack = Stack::start().await;
    stack.user("loader", Role::Ingest).await;
    stack.user("doctor", Role::Clinician).await;

    // Arrange: the notes as clinflow-ingest reads them.
    let notes_dir = repo_path("dev/sample-notes");
    let notes: HashMap<String, source::Document> = source::open(&notes_dir)
        .unwrap()
        .map(|r| match r.unwrap() {
            Record::Document(d) => (d.source_ref.clone(), d),
            Record::Rejected(r) => panic!("sample note rejected: {r:?}"),
        })
        .collect();
    assert!(notes.len() >= 30, "{} sample notes", notes.len());
    let patients: Vec<&str> = notes.values().map(|n| n.patient_ref.as_str()).collect();
    stack.care_team("doctor", &patients).await;

    // Act 1: upload them all with clinflow-ingest's loader.
    let work = tempfile::tempdir().unwrap();
    let client = ingest_client(&stack, "loader");
    let options = load_options(work.path(), vec![notes_dir.clone()]);
    let report = load::run(&options, &client, &Progress::hidden(), &CancellationToken::new()).await.unwrap();
    assert!(report.stop.is_none(), "load stopped: {:?}", report.stop);
    assert_eq!(report.counts.accepted, notes.len() as u64, "{report}");
    let state = clinflow_ingest::state::read(&options.state).unwrap();
    let ids: HashMap<Uuid, String> = state.entries.iter().map(|e| (e.id, e.source_ref.clone())).collect();
    assert_eq!(ids.len(), notes.len());

    // Act 2: a clinician polls every document until it is done.
    let token = stack.login("doctor").await;
    let mut reads = 0usize;
    let mut results: HashMap<Uuid, Value> = HashMap::new();
    for _ in 0..600 {
        for id in ids.keys().filter(|id| !results.contains_key(id)).copied().collect::<Vec<_>>() {
            let (status, body) = stack.get(&format!("/v1/documents/{id}"), Some(&token)).await;
            reads += 1;
            assert_eq!(status, 200, "{body}");
            assert_ne!(body["status"], "failed", "{body}");
            if body["status"] == "done" {
                results.insert(id, body);
            }
        }
        if results.len() == ids.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(results.len(), ids.len(), "all documents done");

    // Assert: annotations point at the words they name.
    let names = concept_names();
    let mut metformin_checked = 0;
    let mut af_checked = 0;
    let mut after_non_ascii = 0;
    for (id, body) in &results {
        let note = &notes[&ids[id]];
        assert_eq!(body["patient_ref"], note.patient_ref.as_str());
        assert!(body["model_version"].as_str().unwrap().starts_with("clinflow-dev-"), "{}", body["model_version"]);
        let annotations = body["annotations"].as_array().unwrap();
        assert!(!annotations.is_empty(), "{} has no annotations", note.source_ref);
        let first_non_ascii = note.text.chars().position(|c| !c.is_ascii());
        for a in annotations {
            let (cui, start, end) =
                (a["cui"].as_str().unwrap(), a["start"].as_u64().unwrap() as u32, a["end"].as_u64().unwrap() as u32);
            let said = span_text(&note.text, start, end);
            assert!(
                names[cui].contains(&normalise(&said)),
                "{}: [{start},{end}) is {said:?}, not a name of {cui}",
                note.source_ref
            );
            if first_non_ascii.is_some_and(|p| (p as u32) < start) {
                after_non_ascii += 1;
            }
        }
        let has = |cui: &str, (s, e): (u32, u32)| {
            annotations.iter().any(|a| a["cui"] == cui && a["start"] == s && a["end"] == e)
        };
        for span in occurrences(&note.text, "metformin") {
            assert!(has(METFORMIN, span), "{}: metformin at {span:?} not annotated", note.source_ref);
            metformin_checked += 1;
        }
        for span in occurrences(&note.text, "AF") {
            assert!(has(ATRIAL_FIBRILLATION, span), "{}: AF at {span:?} not annotated", note.source_ref);
            af_checked += 1;
        }
    }
    assert!(metformin_checked >= 3 && af_checked >= 3, "metformin {metformin_checked}, AF {af_checked}");
    assert!(after_non_ascii > 0, "offsets after non-ASCII text were exercised");

    // Assert: PostgreSQL holds ciphertext only — and it is the notes' ciphertext.
    let keys = clinflow::testing::keys();
    let rows: Vec<(Uuid, Vec<u8>, Vec<u8>)> = sqlx::query_as(
        "SELECT d.id, t.text_ct, d.patient_ref_ct FROM documents d JOIN document_texts t ON t.document_id = d.id",
    )
    .fetch_all(&stack.db.owner)
    .await
    .unwrap();
    assert_eq!(rows.len(), notes.len());
    for (id, text_ct, patient_ct) in &rows {
        let note = &notes[&ids[id]];
        for needle in [note.patient_ref.as_bytes(), &note.text.as_bytes()[..24], b"metformin", b"PAT-"] {
            assert!(!contains(text_ct, needle) && !contains(patient_ct, needle), "plaintext in documents row {id}");
        }
        assert_eq!(keys.open_string(&stack.db.owner, documents::text_field(*id), text_ct).await.unwrap(), note.text);
    }
    let results_ct: Vec<(Uuid, Vec<u8>)> = sqlx::query_as("SELECT document_id, annotations_ct FROM document_results")
        .fetch_all(&stack.db.owner)
        .await
        .unwrap();
    assert_eq!(results_ct.len(), notes.len());
    for (id, ct) in &results_ct {
        for needle in [&b"pretty_name"[..], METFORMIN.as_bytes(), b"cui"] {
            assert!(!contains(ct, needle), "plaintext in document_results row {id}");
        }
    }
    let leaked: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM documents d JOIN document_texts t ON t.document_id = d.id
         WHERE position('metformin'::bytea in t.text_ct) > 0 OR position('PAT-'::bytea in d.patient_ref_ct) > 0",
    )
    .fetch_one(&stack.db.owner)
    .await
    .unwrap();
    assert_eq!(leaked, 0);

    // Assert: the audit trail holds exactly this run's events, chained.
    let n = notes.len();
    let expected_total = 2 + n + n + reads;
    assert_eq!(stack.wait_for_audit_rows(expected_total as i64).await, expected_total as i64);
    let counts: Vec<(String, String, Option<String>, i64)> = sqlx::query_as(
        "SELECT action, outcome, actor_name, count(*) FROM audit_events GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
    )
    .fetch_all(&stack.db.owner)
    .await
    .unwrap();
    let got: BTreeMap<String, i64> =
        counts.into_iter().map(|(a, o, actor, c)| (format!("{a} {o} {}", actor.unwrap_or_default()), c)).collect();
    let expected: BTreeMap<String, i64> = [
        ("auth.login success doctor".to_owned(), 1),
        ("auth.login success loader".to_owned(), 1),
        ("document.process success clinflow-worker".to_owned(), n as i64),
        ("document.read success doctor".to_owned(), reads as i64),
        ("document.upload success loader".to_owned(), n as i64),
    ]
    .into_iter()
    .collect();
    assert_eq!(got, expected);
    let uploaded: HashSet<String> =
        sqlx::query_scalar("SELECT resource_id FROM audit_events WHERE action = 'document.upload'")
            .fetch_all(&stack.db.owner)
            .await
            .unwrap()
            .into_iter()
            .collect();
    assert_eq!(uploaded, ids.keys().map(Uuid::to_string).collect::<HashSet<_>>());
    // No event holds a patient reference, a piece of note text or a
    // source_ref in clear: every row, every column, as text.
    let trail: Vec<String> =
        sqlx::query_scalar("SELECT a::text FROM audit_events a").fetch_all(&stack.db.owner).await.unwrap();
    assert_eq!(trail.len(), expected_total);
    for note in notes.values() {
        let text_piece: String = note.text.trim().chars().take(24).collect();
        let file_name = note.source_ref.rsplit('/').next().unwrap_or(&note.source_ref);
        for row in &trail {
            assert!(!row.contains(&note.patient_ref), "a patient reference in the audit trail: {row}");
            assert!(!row.contains(&text_piece), "note text in the audit trail: {row}");
            assert!(!row.contains(file_name), "a source_ref in the audit trail: {row}");
        }
    }
    let rows = clinflow_audit_sink::chain::verify(&stack.db.audit_reader, &audit_trust()).await.unwrap();
    assert_eq!(rows, expected_total as i64);
    // The sink anchored the chain outside the database as it went.
    let checkpoints = clinflow_audit_sink::checkpoint::read(&stack.checkpoints, &audit_trust()).unwrap();
    assert!(!checkpoints.is_empty(), "the sink wrote checkpoints");
    clinflow_audit_sink::checkpoint::check(&stack.db.audit_reader, rows, &checkpoints).await.unwrap();

    stack.stop().await;
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
