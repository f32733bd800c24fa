//! clinflow-ingest against the real API (and through it the real broker,
//! worker and MedCAT): folders with the same file names, a load interrupted
//! and resumed after losing part of its state file, lines the API rejects,
//! a token that stops working mid-run, and the API's backpressure (429).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clinflow_api::UploadLimits;
use clinflow_api::users::Role;
use clinflow_ingest::client::{ApiClient, ClientConfig, RetryPolicy};
use clinflow_ingest::load::{self, LoadOptions, LoadReport};
use clinflow_ingest::progress::Progress;
use clinflow_ingest::source::Rejection;
use clinflow_ingest::state;
use clinflow_ingest::wait::{self, WaitOptions, WaitSummary};
use secrecy::SecretString;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::common::{PASSWORD, Stack, wait_until};

pub fn ingest_client(stack: &Stack, user: &str) -> ApiClient {
    ApiClient::new(ClientConfig {
        base_url: stack.base.parse().unwrap(),
        username: user.into(),
        password: PASSWORD.to_owned().into(),
        api_key: None,
        care_team: None,
        retry: RetryPolicy { max_tries: 4, min_delay: Duration::from_millis(50), max_delay: Duration::from_secs(1) },
        timeout: Duration::from_secs(30),
        ca_certs: Vec::new(),
    })
    .unwrap()
}

/// Batches larger than the test api's 50-line limit, so that the loader's
/// resending of lines the API did not read is exercised too.
pub fn load_options(work: &Path, inputs: Vec<PathBuf>) -> LoadOptions {
    LoadOptions {
        inputs,
        state: work.join("state.jsonl"),
        rejects: work.join("rejects.jsonl"),
        concurrency: 2,
        batch_lines: 80,
        batch_bytes: 1024 * 1024,
    }
}

async fn load(options: &LoadOptions, client: &ApiClient) -> LoadReport {
    let report = load::run(options, client, &Progress::hidden(), &CancellationToken::new()).await.unwrap();
    assert!(report.counts.reconciles(), "{report}");
    report
}

async fn wait_for(options: &LoadOptions, client: &ApiClient) -> WaitSummary {
    let options = WaitOptions {
        state: options.state.clone(),
        concurrency: 2,
        timeout: Duration::from_secs(120),
        poll_interval: Duration::from_millis(200),
    };
    wait::run(&options, client, &Progress::hidden(), &CancellationToken::new()).await.unwrap()
}

fn note(patient: &str, body: &str) -> String {
    format!("---\npatient_ref: {patient}\n---\n{body}\n")
}

async fn documents_of(stack: &Stack, user: Uuid) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM documents WHERE uploaded_by = $1")
        .bind(user)
        .fetch_one(&stack.db.owner)
        .await
        .unwrap()
}

#[tokio::test]
async fn two_folders_with_the_same_file_names_are_both_loaded_and_reported_when_done_or_failed() {
    let stack = Stack::start().await;
    let loader = stack.user("loader", Role::Ingest).await;
    let (a, b, work) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    for (dir, patient) in [(&a, "PAT-A"), (&b, "PAT-B")] {
        std::fs::write(dir.path().join("n.txt"), note(patient, "Known atrial fibrillation, on metformin.")).unwrap();
        std::fs::write(dir.path().join("m.txt"), note(patient, "Type 2 diabetes mellitus.")).unwrap();
    }
    // A note the test MedCAT fails on (MEDCAT_DEV_FAIL_MARKER): it must end
    // `failed` with its reason, and `wait` must say so.
    let marker = std::env::var("MEDCAT_DEV_FAIL_MARKER").expect("MEDCAT_DEV_FAIL_MARKER (./dev/test sets it)");
    std::fs::write(b.path().join("x.txt"), note("PAT-B", &format!("Known AF. {marker}"))).unwrap();
    let client = ingest_client(&stack, "loader");
    let options = load_options(work.path(), vec![a.path().into(), b.path().into()]);

    let first = load(&options, &client).await;
    assert_eq!((first.counts.read, first.counts.accepted), (5, 5), "{first}");
    assert_eq!(documents_of(&stack, loader).await, 5);

    // Rerun: everything is in the state file, nothing is sent.
    let again = load(&options, &client).await;
    assert_eq!((again.counts.skipped, again.counts.sent()), (5, 0), "{again}");

    // The state file lost, and the session revoked behind the client's
    // back: the client logs in again, and the API answers `duplicate` with
    // the ids of the first run.
    let first_ids: HashSet<Uuid> = state::read(&options.state).unwrap().ids().into_iter().collect();
    std::fs::remove_file(&options.state).unwrap();
    sqlx::query("DELETE FROM sessions").execute(&stack.db.owner).await.unwrap();
    let lost = load(&options, &client).await;
    assert_eq!((lost.counts.duplicate, lost.counts.accepted), (5, 0), "{lost}");
    let again_ids: HashSet<Uuid> = state::read(&options.state).unwrap().ids().into_iter().collect();
    assert_eq!(again_ids, first_ids);
    assert_eq!(documents_of(&stack, loader).await, 5);

    let summary = wait_for(&options, &client).await;
    assert_eq!((summary.documents, summary.done, summary.failed, summary.pending), (5, 4, 1, 0), "{summary}");
    assert_eq!(summary.failure_codes.get("nlp_error"), Some(&1), "{summary}");
    assert!(!summary.all_done());
    stack.stop().await;
}

#[tokio::test]
async fn an_interrupted_load_resumes_with_nothing_missing_and_nothing_twice() {
    let stack = Stack::start().await;
    let loader = stack.user("loader", Role::Ingest).await;
    let (input, work) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let notes: String = (0..400)
        .map(|i| format!("{{\"patient_ref\":\"PAT-{}\",\"text\":\"Note {i}: known atrial fibrillation.\"}}\n", i % 17))
        .collect();
    let file = input.path().join("notes.jsonl");
    std::fs::write(&file, notes).unwrap();
    let client = ingest_client(&stack, "loader");
    let options = LoadOptions { batch_lines: 20, ..load_options(work.path(), vec![file]) };

    // Interrupted (as by ctrl-c) once the API holds some of the notes.
    let shutdown = CancellationToken::new();
    let interrupt = async {
        wait_until("part of the load stored", Duration::from_secs(60), async || {
            documents_of(&stack, loader).await >= 60
        })
        .await;
        shutdown.cancel();
    };
    let hidden = Progress::hidden();
    let (first, ()) = tokio::join!(load::run(&options, &client, &hidden, &shutdown), interrupt);
    let first = first.unwrap();
    assert!(first.interrupted && first.stop.is_some(), "{first}");
    assert_eq!(first.exit_code(false), 130);
    assert!(first.counts.reconciles(), "{first}");
    assert!(first.counts.read < 400, "the run stopped early: {first}");

    // A crash loses the last answers: the state file's tail is cut.
    let kept = state::read(&options.state).unwrap().entries.len();
    assert!(kept >= 20, "{kept} entries");
    let text = std::fs::read_to_string(&options.state).unwrap();
    let cut: String = text.lines().take(kept - 15).map(|l| format!("{l}\n")).collect();
    std::fs::write(&options.state, cut).unwrap();

    let second = load(&options, &client).await;
    assert!(second.stop.is_none(), "{second}");
    assert_eq!(second.counts.skipped, (kept - 15) as u64);
    assert!(second.counts.duplicate >= 15, "the lost answers come back as duplicates: {second}");
    assert_eq!(first.counts.accepted + second.counts.accepted, 400, "{first}\n{second}");

    // Nothing twice, nothing missing: 400 documents, 400 distinct ids.
    assert_eq!(documents_of(&stack, loader).await, 400);
    let state = state::read(&options.state).unwrap();
    let refs: HashSet<&str> = state.entries.iter().map(|e| e.source_ref.as_str()).collect();
    assert_eq!((refs.len(), state.ids().len()), (400, 400));
    let summary = wait_for(&options, &client).await;
    assert!(summary.all_done(), "{summary}");
    stack.stop().await;
}

#[tokio::test]
async fn lines_rejected_here_or_by_the_api_are_reported_without_their_content() {
    let stack = Stack::start().await;
    stack.user("loader", Role::Ingest).await;
    let (input, work) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let long_patient = "PAT-SECRET-".repeat(20);
    let big_text = "secret ".repeat(1000); // over the test api's 4 KiB line limit
    let lines = [
        r#"{"patient_ref":"PAT-1","text":"Known atrial fibrillation."}"#.to_owned(),
        r#"{"text":"secret note without a patient"}"#.to_owned(),
        format!(r#"{{"patient_ref":"{long_patient}","text":"secret note"}}"#),
        format!(r#"{{"patient_ref":"PAT-2","text":"{big_text}"}}"#),
    ];
    let file = input.path().join("notes.jsonl");
    std::fs::write(&file, lines.join("\n")).unwrap();
    let client = ingest_client(&stack, "loader");
    let options = load_options(work.path(), vec![file]);

    let report = load(&options, &client).await;
    let c = report.counts;
    assert_eq!((c.read, c.rejected_here, c.accepted, c.rejected_by_api, c.unanswered), (4, 1, 1, 2, 0), "{report}");
    assert_eq!(report.exit_code(false), 0);
    assert_eq!(report.exit_code(true), 2);
    let written = std::fs::read_to_string(&options.rejects).unwrap();
    let rejected: Vec<Rejection> = written.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let reasons: Vec<&str> = rejected.iter().map(|r| r.reason.as_str()).collect();
    assert_eq!(reasons.len(), 3, "{written}");
    assert!(reasons[0].contains("missing patient_ref"), "{written}");
    assert!(reasons.iter().any(|r| r.starts_with("invalid_patient_ref:")), "{written}");
    assert!(reasons.iter().any(|r| r.starts_with("line_too_large:")), "{written}");
    assert!(!written.contains("secret") && !written.contains("SECRET"), "{written}");
    stack.stop().await;
}

#[tokio::test]
async fn the_loader_waits_out_backpressure_and_finishes_when_the_backlog_drains() {
    // No relay yet: uploads pile up in the outbox, whose limit is 5 rows.
    let mut stack = Stack::start_limited(UploadLimits { max_outbox: 5, ..UploadLimits::default() }).await;
    let loader = stack.user("loader", Role::Ingest).await;
    let token = stack.login("loader").await;
    // A relay for a broker that is not there: it measures the backlog but
    // publishes nothing.
    let away = stack.spawn_relay(SecretString::from("amqp://guest:guest@127.0.0.1:1/%2f"));
    for i in 0..4 {
        let doc = serde_json::json!({"patient_ref": "PAT-1", "text": format!("Known AF {i}.")});
        assert_eq!(stack.post("/v1/documents", Some(&token), &doc).await.0, 202);
    }
    let doc = serde_json::json!({"patient_ref": "PAT-1", "text": "Probe."});
    wait_until("uploads throttled", Duration::from_secs(20), async || {
        stack.post("/v1/documents", Some(&token), &doc).await.0 == 429
    })
    .await;
    let stored = documents_of(&stack, loader).await;

    let (input, work) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    for i in 0..30 {
        std::fs::write(input.path().join(format!("{i:02}.txt")), note("PAT-2", &format!("Note {i}: metformin.")))
            .unwrap();
    }
    let options = load_options(work.path(), vec![input.path().into()]);
    let client = ingest_client(&stack, "loader");
    let (hidden, never) = (Progress::hidden(), CancellationToken::new());
    let loading = load::run(&options, &client, &hidden, &never);
    let unblock = async {
        // Told to wait (Retry-After: 2) twice, the loader neither gives up
        // nor has anything stored.
        wait_until("the loader throttled twice", Duration::from_secs(20), async || client.busy_answers() >= 2).await;
        assert_eq!(documents_of(&stack, loader).await, stored);
        // The broker "comes back": the real relay drains the outbox.
        away.abort();
        stack.start_relay();
    };
    let (report, ()) =
        tokio::time::timeout(Duration::from_secs(60), async { tokio::join!(loading, unblock) }).await.unwrap();
    let report = report.unwrap();
    assert!(report.stop.is_none(), "{report}");
    assert_eq!(report.counts.accepted, 30, "{report}");
    assert_eq!(documents_of(&stack, loader).await, stored + 30);
    stack.stop().await;
}
