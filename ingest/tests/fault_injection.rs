//! FAULT-INJECTING FAKE of the clinflow API, for the paths the real API
//! cannot be made to take on demand: a token that expires mid-run (401 →
//! one new login → retry) and transient failures (503 → backoff → retry, or
//! give up and stop cleanly so that a rerun resumes).
//!
//! It is not a model of the API: end-to-end behaviour is tested against the
//! real API elsewhere.

#![allow(clippy::unwrap_used, reason = "test helpers: a panic is a test failure")]

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use clinflow_ingest::client::{ApiClient, ClientConfig, RetryPolicy};
use clinflow_ingest::load::{self, LoadOptions, StopReason};
use clinflow_ingest::progress::Progress;
use clinflow_ingest::state;
use clinflow_ingest::wait::{self, WaitOptions};

/// What the fake does wrong, and what it saw.
#[derive(Default)]
struct Fake {
    logins: AtomicU32,
    valid_token: Mutex<String>,
    /// Upload number (1-based) at which the current token "expires".
    expire_token_at_upload: u32,
    uploads_seen: AtomicU32,
    /// source_ref → number of 503 answers before accepting; u32::MAX = never.
    unavailable: HashMap<String, u32>,
    attempts: Mutex<HashMap<String, u32>>,
    accepted: Mutex<Vec<String>>,
    /// GETs answered 401 before the document answers succeed.
    expire_token_at_first_get: bool,
    gets_seen: AtomicU32,
}

type Shared = Arc<Fake>;

fn error(status: StatusCode, code: &str) -> Response {
    (status, Json(json!({"error": {"code": code, "message": "injected"}}))).into_response()
}

fn authorized(fake: &Fake, headers: &HeaderMap) -> bool {
    let expected = format!("Bearer {}", fake.valid_token.lock().unwrap());
    headers.get("authorization").and_then(|v| v.to_str().ok()) == Some(expected.as_str())
}

async fn login(State(fake): State<Shared>, Json(body): Json<Value>) -> Response {
    if body["username"] != "loader" || body["password"] != "s3cret" {
        return error(StatusCode::UNAUTHORIZED, "invalid_credentials");
    }
    let n = fake.logins.fetch_add(1, Ordering::SeqCst) + 1;
    let token = format!("token-{n}");
    *fake.valid_token.lock().unwrap() = token.clone();
    Json(json!({"access_token": token, "token_type": "bearer", "expires_at": "2026-11-23T12:00:00Z"})).into_response()
}

async fn upload(State(fake): State<Shared>, headers: HeaderMap, Json(body): Json<Value>) -> Response {
    let n = fake.uploads_seen.fetch_add(1, Ordering::SeqCst) + 1;
    if n == fake.expire_token_at_upload {
        *fake.valid_token.lock().unwrap() = "expired".into();
    }
    if !authorized(&fake, &headers) {
        return error(StatusCode::UNAUTHORIZED, "token_expired");
    }
    let source_ref = body["source_ref"].as_str().unwrap_or_default().to_owned();
    assert!(body["patient_ref"].is_string() && body["text"].is_string());
    let attempt = {
        let mut attempts = fake.attempts.lock().unwrap();
        let a = attempts.entry(source_ref.clone()).or_default();
        *a += 1;
        *a
    };
    if fake.unavailable.get(&source_ref).is_some_and(|&failures| attempt <= failures) {
        return error(StatusCode::SERVICE_UNAVAILABLE, "overloaded");
    }
    fake.accepted.lock().unwrap().push(source_ref);
    (StatusCode::ACCEPTED, Json(json!({"id": Uuid::new_v4(), "status": "queued"}))).into_response()
}

async fn document(State(fake): State<Shared>, headers: HeaderMap, UrlPath(id): UrlPath<Uuid>) -> Response {
    if fake.gets_seen.fetch_add(1, Ordering::SeqCst) == 0 && fake.expire_token_at_first_get {
        *fake.valid_token.lock().unwrap() = "expired".into();
    }
    if !authorized(&fake, &headers) {
        return error(StatusCode::UNAUTHORIZED, "token_expired");
    }
    Json(json!({
        "id": id, "status": "done", "patient_ref": "PAT-1", "created_at": "2026-11-23T10:00:00Z",
        "annotations": [
            {"cui": "C0015967", "pretty_name": "Fever", "start": 0, "end": 5, "acc": 0.9, "meta_anns": {}},
            {"cui": "C0015967", "pretty_name": "Fever", "start": 9, "end": 14, "acc": 0.9, "meta_anns": {}}
        ]
    }))
    .into_response()
}

async fn start(fake: Fake) -> (String, Shared) {
    let shared = Arc::new(fake);
    let app = Router::new()
        .route("/v1/auth/login", post(login))
        .route("/v1/documents", post(upload))
        .route("/v1/documents/{id}", get(document))
        .with_state(shared.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, shared)
}

async fn client(url: &str) -> ApiClient {
    let client = ApiClient::new(ClientConfig {
        base_url: url.parse().unwrap(),
        username: "loader".into(),
        password: "s3cret".to_owned().into(),
        retry: RetryPolicy { max_tries: 4, min_delay: Duration::from_millis(1), max_delay: Duration::from_millis(5) },
        timeout: Duration::from_secs(5),
    })
    .unwrap();
    client.login().await.unwrap();
    client
}

struct Workdir(PathBuf);

impl Workdir {
    fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!("clinflow-ingest-fake-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    fn notes(&self, source_refs: &[&str]) -> PathBuf {
        let lines: Vec<String> = source_refs
            .iter()
            .map(|s| json!({"patient_ref": "PAT-1", "text": "Fever.", "source_ref": s}).to_string())
            .collect();
        let path = self.0.join("notes.jsonl");
        std::fs::write(&path, lines.join("\n")).unwrap();
        path
    }

    fn options(&self, input: &Path, concurrency: usize) -> LoadOptions {
        LoadOptions {
            inputs: vec![input.to_path_buf()],
            concurrency,
            state: self.0.join("state.jsonl"),
            rejects: self.0.join("rejects.jsonl"),
        }
    }

    fn done(&self) -> HashSet<String> {
        state::read(&self.0.join("state.jsonl")).unwrap().done_source_refs()
    }
}

impl Drop for Workdir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test]
async fn expired_token_means_one_new_login_and_transient_errors_are_retried() {
    for concurrency in [1, 4] {
        let (url, fake) = start(Fake {
            expire_token_at_upload: 3,
            unavailable: HashMap::from([("flaky".to_owned(), 2)]),
            ..Fake::default()
        })
        .await;
        let dir = Workdir::new(&format!("relogin-{concurrency}"));
        let input = dir.notes(&["a", "b", "c", "flaky", "e", "f", "g", "h"]);
        let client = client(&url).await;

        let report =
            load::run(&dir.options(&input, concurrency), &client, &Progress::hidden(), &CancellationToken::new())
                .await
                .unwrap();

        assert!(report.stop.is_none(), "{:?}", report.stop);
        assert_eq!((report.counts.uploaded, report.counts.failed), (8, 0));
        assert_eq!(
            fake.logins.load(Ordering::SeqCst),
            2,
            "one login at start, one after the 401s (concurrency {concurrency})"
        );
        assert_eq!(fake.attempts.lock().unwrap()["flaky"], 3, "two 503s, then accepted");
        assert_eq!(dir.done().len(), 8);
        assert_eq!(report.exit_code(true), 0);
    }
}

#[tokio::test]
async fn a_persistent_503_stops_the_run_cleanly_and_a_rerun_resumes() {
    let (url, fake) = start(Fake { unavailable: HashMap::from([("doomed".to_owned(), 4)]), ..Fake::default() }).await;
    let dir = Workdir::new("stop");
    let input = dir.notes(&["a", "doomed", "c", "d", "e", "f"]);
    let client = client(&url).await;

    let first =
        load::run(&dir.options(&input, 1), &client, &Progress::hidden(), &CancellationToken::new()).await.unwrap();

    assert!(matches!(&first.stop, Some(StopReason::Upload { source_ref, .. }) if source_ref == "doomed"));
    assert_eq!((first.counts.uploaded, first.counts.failed), (1, 1));
    assert_eq!(first.exit_code(false), 1);
    assert_eq!(fake.attempts.lock().unwrap()["doomed"], 4, "max_tries attempts, then give up");
    assert_eq!(dir.done(), HashSet::from(["a".to_owned()]), "the failed record is not marked done");

    // The fake now accepts "doomed" (its 5th attempt): the rerun skips "a".
    let second =
        load::run(&dir.options(&input, 3), &client, &Progress::hidden(), &CancellationToken::new()).await.unwrap();
    assert!(second.stop.is_none(), "{:?}", second.stop);
    assert_eq!((second.counts.uploaded, second.counts.skipped), (5, 1));
    assert_eq!(dir.done().len(), 6);
    assert_eq!(fake.attempts.lock().unwrap()["a"], 1, "a was not uploaded twice");
}

#[tokio::test]
async fn wait_logs_in_again_on_401_and_tallies_concepts() {
    let (url, fake) = start(Fake { expire_token_at_first_get: true, ..Fake::default() }).await;
    let dir = Workdir::new("wait");
    let input = dir.notes(&["a", "b"]);
    let client = client(&url).await;
    load::run(&dir.options(&input, 2), &client, &Progress::hidden(), &CancellationToken::new()).await.unwrap();

    let options = WaitOptions {
        state: dir.0.join("state.jsonl"),
        concurrency: 1,
        timeout: Duration::from_secs(10),
        poll_interval: Duration::from_millis(10),
        top: 5,
    };
    let summary = wait::run(&options, &client, &Progress::hidden(), &CancellationToken::new()).await.unwrap();

    assert_eq!((summary.done, summary.failed, summary.pending), (2, 0, 0));
    assert_eq!(summary.top_concepts.len(), 1);
    assert_eq!((summary.top_concepts[0].documents, summary.top_concepts[0].mentions), (2, 4));
    assert_eq!(fake.logins.load(Ordering::SeqCst), 2);
    let json = serde_json::to_value(&summary).unwrap();
    assert!(!json.to_string().contains("PAT-1"));
}

#[tokio::test]
async fn wrong_credentials_fail_at_login() {
    let (url, _fake) = start(Fake::default()).await;
    let client = ApiClient::new(ClientConfig {
        base_url: url.parse().unwrap(),
        username: "loader".into(),
        password: "wrong".to_owned().into(),
        retry: RetryPolicy::default(),
        timeout: Duration::from_secs(5),
    })
    .unwrap();
    let err = client.login().await.unwrap_err();
    assert_eq!(err.to_string(), "login failed: wrong username or password");
}
