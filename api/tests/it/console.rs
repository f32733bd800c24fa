//! The web console (`/ui`) in a real browser: Debian's Chromium, driven by
//! Playwright (`api/tests/console/console.test.mjs`), against the real
//! stack (PostgreSQL, RabbitMQ, the MedCAT of `./dev/test`, the worker and
//! the audit sink) served over HTTPS as deployed. The browser trusts the
//! api's key alone (`--ignore-certificate-errors-spki-list`).
//!
//! This test puts the data in place and hands the browser script a fixture:
//! the users, the patients, the spans the API returns for one note, a dead
//! letter. The script logs in as each role through the page and checks what
//! the page shows; afterwards this test checks that what the browser did is
//! on the audit trail.

use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;
use clinflow::amqp::{Outgoing, Publisher};
use clinflow_api::users::Role;
use clinflow_ingest::source::{self, Record};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::common::{PASSWORD, Stack, wait_until};
use crate::https::ApiCert;

const PATIENT: &str = "PAT-100234";
const BIG_PATIENT: &str = "PAT-BIG-200";
const DENSE_PATIENT: &str = "PAT-DENSE";
const ATRIAL_FIBRILLATION: &str = "49436004";
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

fn repo_path(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

/// A note naming many concepts, one per line: the concept list's names.
fn dense_note() -> String {
    let mut reader = csv::Reader::from_path(repo_path("dev/medcat/concepts.csv")).unwrap();
    let names: Vec<String> = reader.records().map(|r| r.unwrap()[1].to_owned()).collect();
    let mut text = String::from("PROBLEM LIST REVIEW\n\n");
    for (i, name) in names.iter().take(140).enumerate() {
        text.push_str(&format!("{}. Known {name}.\n", i + 1));
    }
    text
}

async fn upload(stack: &Stack, token: &str, patient: &str, text: &str, date: Option<&str>) -> String {
    let mut body = json!({"patient_ref": patient, "text": text});
    if let Some(date) = date {
        body["document_date"] = json!(date);
    }
    let (status, answer) = stack.post("/v1/documents", Some(token), &body).await;
    assert_eq!(status, 202, "{answer}");
    answer["id"].as_str().unwrap().to_owned()
}

/// The spans the API returns for a document, as the page must show them.
async fn spans(stack: &Stack, token: &str, id: &str) -> Vec<Value> {
    let (status, doc) = stack.get(&format!("/v1/documents/{id}"), Some(token)).await;
    assert_eq!(status, 200, "{doc}");
    doc["annotations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| json!({"cui": a["cui"], "start": a["start"], "end": a["end"], "negated": false}))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clinicians_ops_and_auditors_use_the_console_in_a_real_browser() {
    let console_tests = repo_path("api/tests/console");
    assert!(
        console_tests.join("node_modules/playwright-core").is_dir(),
        "api/tests/console/node_modules is missing: ./dev/test installs it (npm ci) and Debian's chromium"
    );
    let stack = Stack::start().await;
    for (name, role) in [
        ("loader", Role::Ingest),
        ("alice", Role::Clinician),
        ("bob", Role::Clinician),
        ("olga", Role::Ops),
        ("audrey", Role::Auditor),
    ] {
        stack.user(name, role).await;
    }
    stack.care_team("alice", &[PATIENT, BIG_PATIENT, DENSE_PATIENT]).await;
    stack.care_team("bob", &["PAT-OF-BOBS-OWN"]).await;
    let loader = stack.login("loader").await;

    // The sample notes: the patient's own, and 200 notes for another.
    let notes: Vec<source::Document> = source::open(&repo_path("dev/sample-notes"))
        .unwrap()
        .map(|r| match r.unwrap() {
            Record::Document(d) => d,
            Record::Rejected(r) => panic!("sample note rejected: {r:?}"),
        })
        .collect();
    let mut ids = Vec::new();
    let mut patient_notes = Vec::new();
    for note in notes.iter().filter(|n| n.patient_ref == PATIENT) {
        let date = note.document_date.map(|d| d.to_string());
        let id = upload(&stack, &loader, PATIENT, &note.text, date.as_deref()).await;
        patient_notes.push((date, id.clone()));
        ids.push(id);
    }
    assert!(patient_notes.len() >= 2, "{PATIENT} has {} sample notes", patient_notes.len());
    let start = time::Date::from_calendar_date(2024, time::Month::January, 1).unwrap();
    for i in 0..200 {
        let date = (start + time::Duration::days(i)).to_string();
        let note = &notes[i as usize % notes.len()];
        ids.push(upload(&stack, &loader, BIG_PATIENT, &note.text, Some(&date)).await);
    }
    let dense = upload(&stack, &loader, DENSE_PATIENT, &dense_note(), Some("2025-06-01")).await;
    ids.push(dense.clone());
    wait_until("every note annotated", Duration::from_secs(240), async || {
        let (done, failed): (i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE status = 'done'), count(*) FILTER (WHERE status = 'failed')
             FROM documents WHERE id = ANY($1::uuid[])",
        )
        .bind(&ids)
        .fetch_one(&stack.db.owner)
        .await
        .unwrap();
        assert_eq!(failed, 0, "no note may fail");
        done == ids.len() as i64
    })
    .await;

    // What the page must show for the patient's newest note: the API's
    // spans, offsets and all.
    let alice = stack.login("alice").await;
    patient_notes.sort();
    let (_, newest) = patient_notes.last().unwrap().clone();
    let expected = spans(&stack, &alice, &newest).await;
    assert!(!expected.is_empty(), "the newest note of {PATIENT} has concepts");
    let dense_spans = spans(&stack, &alice, &dense).await;
    assert!(dense_spans.len() >= 100, "the dense note has {} concepts", dense_spans.len());

    // A dead letter: a document failed past its budget, its job parked (as
    // a worker parks it) for ops to replay.
    let parked_doc = upload(&stack, &loader, "PAT-OF-BOBS-OWN", "Known AF.", None).await;
    wait_until("the parked document done", Duration::from_secs(60), async || {
        let status: String = sqlx::query_scalar("SELECT status FROM documents WHERE id = $1::uuid")
            .bind(&parked_doc)
            .fetch_one(&stack.db.owner)
            .await
            .unwrap();
        status == "done"
    })
    .await;
    sqlx::query("UPDATE documents SET status = 'failed', failure_code = 'retries_exhausted' WHERE id = $1::uuid")
        .bind(&parked_doc)
        .execute(&stack.db.owner)
        .await
        .unwrap();
    let publisher = Publisher::new(&stack.amqp).await.unwrap();
    let (dead, body) = (stack.topology.dead_letter_exchange(), format!(r#"{{"document_id":"{parked_doc}"}}"#));
    let parked = Outgoing {
        reason: Some("retries_exhausted"),
        attempts: 5,
        ..Outgoing::new(&dead, "documents.live", &parked_doc, body.as_bytes())
    };
    publisher.publish_many(&[parked]).await.unwrap();
    let dead_queue = stack.topology.documents_live().dead_queue;
    wait_until("the job parked", Duration::from_secs(10), async || stack.queue_depth(&dead_queue).await == 1).await;

    // The api over HTTPS; the browser pins its key.
    let cert = ApiCert::new();
    let base = stack.serve_https(&cert, |_| {}).await;
    // The same api with a short idle timeout, for the console's warning
    // before it (at 80% of a timeout this short) and its logout.
    let idle_base = stack.serve_https(&cert, |state| state.idle_timeout = IDLE_TIMEOUT).await;
    let key_pem = std::fs::read_to_string(&cert.key).unwrap();
    let spki =
        base64::engine::general_purpose::STANDARD.encode(Sha256::digest(clinflow::testing::tls::spki_der(&key_pem)));

    let work = tempfile::tempdir().unwrap();
    let screenshots =
        std::env::var_os("CONSOLE_SCREENSHOTS").map(PathBuf::from).unwrap_or_else(|| work.path().join("screenshots"));
    std::fs::create_dir_all(&screenshots).unwrap();
    let timings = work.path().join("timings.json");
    let fixture = json!({
        "base": base,
        "spki": spki,
        "password": PASSWORD,
        "users": {"clinician": "alice", "outsider": "bob", "ops": "olga", "auditor": "audrey"},
        "patient": PATIENT,
        "cui": ATRIAL_FIBRILLATION,
        "cui_name": "Atrial fibrillation",
        "expected": {"document_id": newest, "spans": expected},
        "big_patient": BIG_PATIENT,
        "dense": {"patient_ref": DENSE_PATIENT, "document_id": dense, "spans": dense_spans},
        "dead_letter_document": parked_doc,
        "screenshots": screenshots,
        "timings_out": timings,
        "idle": {"base": idle_base, "timeout_seconds": IDLE_TIMEOUT.as_secs()},
    });
    let fixture_file = work.path().join("fixture.json");
    std::fs::write(&fixture_file, serde_json::to_vec_pretty(&fixture).unwrap()).unwrap();

    let run = tokio::process::Command::new("node")
        .arg("console.test.mjs")
        .current_dir(&console_tests)
        .env("CONSOLE_FIXTURE", &fixture_file)
        // Playwright's own requests (one step reads an answer to rewrite
        // it) trust the api's CA; the browser pins the api's key.
        .env("NODE_EXTRA_CA_CERTS", cert.ca.pem_path())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(300), run).await.expect("the browser test ends").unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    println!("{stdout}");
    eprintln!("{stderr}");
    assert!(output.status.success(), "the browser test failed: {}", output.status);
    let timings: Value = serde_json::from_slice(&std::fs::read(&timings).unwrap()).unwrap();
    println!("console timings: {timings}");

    // What the browser did is on the audit trail, as any client's would be.
    let trail = async |actor: &str, action: &str, outcome: &str| -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM audit_events WHERE actor_name = $1 AND action = $2 AND outcome = $3")
            .bind(actor)
            .bind(action)
            .bind(outcome)
            .fetch_one(&stack.db.owner)
            .await
            .unwrap()
    };
    wait_until("the browser's reads audited", Duration::from_secs(20), async || {
        trail("alice", "document.read", "success").await >= 10
            && trail("alice", "patient.read", "success").await >= 2
            && trail("bob", "auth.break_glass", "success").await == 1
            && trail("bob", "document.read", "success").await >= 1
            && trail("olga", "ops.dead_letters.replay", "success").await == 1
            && trail("audrey", "audit.disclosures", "success").await >= 1
    })
    .await;
    // Bob was refused before he broke the glass, and that is on the trail too.
    assert!(trail("bob", "patient.read", "denied").await >= 1);
    let replayed: String = sqlx::query_scalar("SELECT status FROM documents WHERE id = $1::uuid")
        .bind(&parked_doc)
        .fetch_one(&stack.db.owner)
        .await
        .unwrap();
    assert_ne!(replayed, "failed", "ops replayed the dead letter from the page");
    stack.stop().await;
}

/// A console login's cookies: (session, csrf), from its `Set-Cookie`s,
/// checked for the attributes that keep them to this site and, for the
/// session, away from the page's script.
fn console_cookies(response: &reqwest::Response) -> (String, String) {
    let set: Vec<&str> = response.headers().get_all("set-cookie").iter().map(|v| v.to_str().unwrap()).collect();
    let find = |name: &str| set.iter().find(|c| c.starts_with(&format!("{name}="))).copied().unwrap();
    let (session, csrf) = (find("__Host-clinflow-session"), find("__Host-clinflow-csrf"));
    for cookie in [session, csrf] {
        for attribute in ["Path=/", "Secure", "SameSite=Strict"] {
            assert!(cookie.split("; ").any(|a| a == attribute), "{attribute} missing");
        }
        assert!(!cookie.contains("Domain="), "a __Host- cookie names no domain");
        assert!(!cookie.contains("Max-Age") && !cookie.contains("Expires"), "it ends with the browser");
    }
    assert!(session.split("; ").any(|a| a == "HttpOnly"), "the page's script never reads the session token");
    let value = |c: &str| c.split(';').next().unwrap().split_once('=').unwrap().1.to_owned();
    (value(session), value(csrf))
}

/// Logs `name` in to the console; its (session, csrf) cookie values.
async fn console_login(stack: &Stack, name: &str) -> (String, String) {
    let response = stack
        .http
        .post(format!("{}/v1/auth/session", stack.base))
        .json(&json!({"username": name, "password": PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let cookies = console_cookies(&response);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["username"], name);
    assert!(body.get("access_token").is_none(), "the token stays in its HttpOnly cookie");
    cookies
}

/// A request as a browser sends it with the console's cookies; `csrf` is
/// the header, if any.
async fn with_cookie(
    stack: &Stack,
    method: reqwest::Method,
    path: &str,
    session: &str,
    csrf: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = stack
        .http
        .request(method, format!("{}{path}", stack.base))
        .header("cookie", format!("__Host-clinflow-session={session}; __Host-clinflow-csrf=whatever"));
    if let Some(csrf) = csrf {
        req = req.header("x-csrf-token", csrf);
    }
    if let Some(body) = body {
        req = req.json(&body);
    }
    let resp = req.send().await.unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap_or(Value::Null))
}

/// Cross-site request forgery, tried as another site's page would: the
/// browser sends the console's cookies, but the page cannot read the CSRF
/// cookie to send it back as a header. Every call without it, or with
/// another session's, is refused and audited; the session's own goes
/// through. The cookie carries a session token only: an API key in it is
/// refused.
#[tokio::test]
async fn console_cookies_without_their_csrf_token_are_refused() {
    let stack = Stack::start().await;
    stack.user("alice", Role::Clinician).await;
    stack.user("mallory", Role::Clinician).await;
    stack.care_team("alice", &[PATIENT]).await;
    let (session, csrf) = console_login(&stack, "alice").await;
    let (_, mallorys_csrf) = console_login(&stack, "mallory").await;
    let read = || Some(json!({"patient_ref": PATIENT}));
    use reqwest::Method;

    for (csrf, why) in [(None, "no header"), (Some(mallorys_csrf.as_str()), "another session's"), (Some(""), "empty")] {
        let (status, body) = with_cookie(&stack, Method::POST, "/v1/patients/documents", &session, csrf, read()).await;
        assert_eq!((status, body["error"]["code"].as_str()), (403, Some("csrf_token")), "{why}");
        let (status, _) = with_cookie(&stack, Method::GET, "/v1/auth/session", &session, csrf, None).await;
        assert_eq!(status, 403, "{why}: reads too");
    }
    let (status, _) = with_cookie(&stack, Method::POST, "/v1/auth/logout", &session, None, None).await;
    assert_eq!(status, 403, "not even a forged logout");

    let (status, page) =
        with_cookie(&stack, Method::POST, "/v1/patients/documents", &session, Some(&csrf), read()).await;
    assert_eq!(status, 200, "{page}");
    let (status, me) = with_cookie(&stack, Method::GET, "/v1/auth/session", &session, Some(&csrf), None).await;
    assert_eq!(status, 200);
    assert_eq!((me["username"].as_str(), me["role"].as_str()), (Some("alice"), Some("clinician")));
    assert_eq!(me["idle_timeout_seconds"], 900);
    assert_eq!(me["break_glass"], json!([]));

    // Refusals are on the trail (the request's own audit and the denial's).
    wait_until("the refusals audited", Duration::from_secs(10), async || {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM audit_events WHERE action = 'auth.access' AND reason = 'csrf_token'",
        )
        .fetch_one(&stack.db.owner)
        .await
        .unwrap();
        n >= 1
    })
    .await;

    // An API key is no cookie.
    let operator = stack.user("svc", Role::Ingest).await;
    let key = clinflow_api::auth::new_api_key(&clinflow::testing::index_key());
    sqlx::query("INSERT INTO api_keys (id, user_id, secret_hash, label) VALUES ($1, $2, $3, 'k')")
        .bind(key.0)
        .bind(operator)
        .bind(&key.2)
        .execute(&stack.db.owner)
        .await
        .unwrap();
    sqlx::query("UPDATE users SET kind = 'service' WHERE id = $1")
        .bind(operator)
        .execute(&stack.db.owner)
        .await
        .unwrap();
    let (status, body) = stack.get("/v1/auth/session", Some(&key.1)).await;
    assert_eq!((status, body["error"]["code"].as_str()), (422, Some("not_a_session")), "the key works as a bearer");
    let (status, _) = with_cookie(&stack, Method::GET, "/v1/auth/session", &key.1, Some(&csrf), None).await;
    assert_eq!(status, 401, "and not as a cookie");

    // Logout with the header ends the session and drops both cookies.
    let response = stack
        .http
        .post(format!("{}/v1/auth/logout", stack.base))
        .header("cookie", format!("__Host-clinflow-session={session}"))
        .header("x-csrf-token", &csrf)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    let cleared: Vec<&str> = response.headers().get_all("set-cookie").iter().map(|v| v.to_str().unwrap()).collect();
    assert_eq!(cleared.len(), 2);
    assert!(cleared.iter().all(|c| c.contains("Max-Age=0")), "{cleared:?}");
    let (status, _) = with_cookie(&stack, Method::GET, "/v1/auth/session", &session, Some(&csrf), None).await;
    assert_eq!(status, 401, "the session is over");
    stack.stop().await;
}

/// The page and its files: from the binary, under a policy that allows no
/// inline script, no other origin and no framing; the page `no-store`; all
/// three off with `API_CONSOLE=off`.
#[tokio::test]
async fn the_console_page_is_served_under_a_strict_policy() {
    let stack = Stack::start().await;
    let page = stack.http.get(format!("{}/ui", stack.base)).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let headers = page.headers().clone();
    let policy = headers["content-security-policy"].to_str().unwrap();
    for directive in
        ["default-src 'none'", "script-src 'self'", "style-src 'self'", "connect-src 'self'", "frame-ancestors 'none'"]
    {
        assert!(policy.split("; ").any(|d| d == directive), "{directive} missing from {policy}");
    }
    assert!(!policy.contains("unsafe-inline") && !policy.contains("unsafe-eval"), "{policy}");
    assert_eq!(headers["cache-control"], "no-store");
    assert!(headers["content-type"].to_str().unwrap().starts_with("text/html"));
    let html = page.text().await.unwrap();
    assert!(html.contains("/ui/console.js") && html.contains("/ui/console.css"), "the page loads its files");
    assert!(!html.contains("<script>") && !html.contains(" style="), "no inline script or style");
    for (path, kind) in [("/ui/console.js", "text/javascript"), ("/ui/console.css", "text/css")] {
        let file = stack.http.get(format!("{}{path}", stack.base)).send().await.unwrap();
        assert_eq!(file.status(), 200);
        assert!(file.headers()["content-type"].to_str().unwrap().starts_with(kind));
        let etag = file.headers()["etag"].clone();
        let again = stack.http.get(format!("{}{path}", stack.base)).header("if-none-match", etag).send().await.unwrap();
        assert_eq!(again.status(), 304, "{path} revalidated, not fetched again");
    }
    let off = stack.serve_another_api(|state| state.edge.console = false).await;
    for path in ["/ui", "/ui/console.js", "/ui/console.css"] {
        assert_eq!(stack.http.get(format!("{off}{path}")).send().await.unwrap().status(), 404, "{path}");
    }
    stack.stop().await;
}

/// `GET /v1/ops/overview`: the queues, documents by status and model
/// versions, for ops alone.
#[tokio::test]
async fn operators_see_queues_documents_and_models() {
    let stack = Stack::start().await;
    stack.user("loader", Role::Ingest).await;
    stack.user("olga", Role::Ops).await;
    stack.user("alice", Role::Clinician).await;
    let loader = stack.login("loader").await;
    let mut ids = Vec::new();
    for text in ["Known AF.", "Started metformin."] {
        ids.push(upload(&stack, &loader, "PAT-1", text, None).await);
    }
    crate::common::wait_for_all_done(&stack, &ids).await;
    let (status, _) = stack.get("/v1/ops/overview", Some(&stack.login("alice").await)).await;
    assert_eq!(status, 403);
    let (status, overview) = stack.get("/v1/ops/overview", Some(&stack.login("olga").await)).await;
    assert_eq!(status, 200, "{overview}");
    assert_eq!(overview["documents"], json!({"queued": 0, "processing": 0, "done": 2, "failed": 0}));
    let models = overview["models"].as_array().unwrap();
    assert_eq!(models.len(), 1);
    assert_eq!(models[0]["documents"], 2);
    let names: Vec<&str> = overview["queues"].as_array().unwrap().iter().map(|q| q["name"].as_str().unwrap()).collect();
    for queue in ["documents.live", "documents.backfill", "documents.live.dead", "documents.live.retry", "audit"] {
        assert!(names.contains(&queue), "{queue} in {names:?}");
    }
    let live = overview["queues"].as_array().unwrap().iter().find(|q| q["name"] == "documents.live").unwrap();
    assert!(live["consumers"].as_u64().unwrap() >= 1, "the worker consumes the live lane: {live}");
    stack.stop().await;
}
