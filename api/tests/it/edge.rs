//! The HTTP edge: time limits answered as JSON (a body that stops sending,
//! from a raw TCP client), security headers on every kind of answer, /docs
//! with nothing loaded from elsewhere (or off), and the client's address
//! behind a trusted proxy, never from a header a client may forge.
//! A panicking handler is tested in api/src/server.rs (no production route
//! panics on demand).

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clinflow_api::auth::{LockoutPolicy, LoginGuard};
use clinflow_api::users::Role;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::{PASSWORD, Stack, wait_until};

const STRICT_CSP: &str = "default-src 'none'; frame-ancestors 'none'";

/// An answer read off a raw connection.
struct Answer {
    status: u16,
    headers: HashMap<String, String>,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|_| panic!("not JSON: {}", self.body))
    }
}

/// A connection to the api at `base` that has sent `head` (request line and
/// headers, blank line included) and `body`, and sends nothing more until
/// told.
async fn send_raw(base: &str, head: &str, body: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(base.trim_start_matches("http://")).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    stream.flush().await.unwrap();
    stream
}

/// Reads one answer (headers, then `Content-Length` bytes), failing past `within`.
async fn read_answer(stream: &mut TcpStream, within: Duration) -> Answer {
    let read = async {
        let mut buf = Vec::new();
        let mut chunk = [0_u8; 8192];
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                let mut lines = head.split("\r\n");
                let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
                let headers: HashMap<String, String> = lines
                    .filter_map(|l| l.split_once(':'))
                    .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
                    .collect();
                let length: usize = headers.get("content-length").map_or(0, |v| v.parse().unwrap());
                if buf.len() >= end + 4 + length {
                    let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + length]).into_owned();
                    return Answer { status, headers, body };
                }
            }
            let n = stream.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the connection closed before a whole answer: {}", String::from_utf8_lossy(&buf));
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(within, read).await.unwrap_or_else(|_| panic!("no answer within {within:?}"))
}

fn head(method: &str, path: &str, headers: &[(&str, &str)], length: usize) -> String {
    let mut head = format!("{method} {path} HTTP/1.1\r\nhost: localhost\r\ncontent-length: {length}\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head + "\r\n"
}

/// A login whose body stops after its first bytes.
async fn stalled_login(base: &str) -> TcpStream {
    let body = br#"{"username": "edge", "password": "a long test password"}"#;
    let head = head("POST", "/v1/auth/login", &[("content-type", "application/json")], body.len());
    send_raw(base, &head, &body[..10]).await
}

fn assert_timeout_answer(answer: &Answer) {
    assert_eq!(answer.status, 503, "{}", answer.body);
    assert_eq!(answer.json()["error"]["code"], "timeout", "{}", answer.body);
    assert!(answer.json()["error"]["message"].is_string());
    assert!(answer.headers["content-type"].starts_with("application/json"));
    assert!(!answer.headers["x-request-id"].is_empty());
    assert_eq!(answer.headers["content-security-policy"], STRICT_CSP);
    assert_eq!(answer.headers["cache-control"], "no-store");
}

#[tokio::test]
async fn edge_a_body_that_stops_sending_is_answered_with_the_json_timeout_and_a_batch_has_a_longer_limit() {
    let stack = Stack::start().await;
    let (request_limit, batch_limit) = (Duration::from_secs(1), Duration::from_secs(4));
    let base = stack
        .serve_another_api(|s| {
            s.edge.request_timeout = request_limit;
            s.edge.batch_timeout = batch_limit;
        })
        .await;

    // A login whose body stops coming: the JSON timeout, after the limit.
    let started = Instant::now();
    let mut stalled = stalled_login(&base).await;
    let answer = read_answer(&mut stalled, Duration::from_secs(20)).await;
    assert!(started.elapsed() >= request_limit, "answered after {:?}", started.elapsed());
    assert_timeout_answer(&answer);
    // The same login sent whole is answered by its handler.
    let http = reqwest::Client::new();
    let login = json!({"username": "edge", "password": PASSWORD});
    let whole = http.post(format!("{base}/v1/auth/login")).json(&login).send().await.unwrap();
    assert_eq!(whole.status(), 401);

    // A batch that pauses for longer than the request limit is still read
    // to its end: it has its own limit. The pause ends when a login started
    // after it has timed out, so it lasted at least the request limit.
    stack.user("edge-ingest", Role::Ingest).await;
    let token = stack.login("edge-ingest").await;
    let lines: Vec<String> = (1..=2)
        .map(|n| {
            json!({"patient_ref": "PAT-EDGE-1", "text": "Known AF.", "source_ref": format!("edge-{n}")}).to_string()
        })
        .collect();
    let body = format!("{}\n{}\n", lines[0], lines[1]);
    let auth = format!("Bearer {token}");
    let batch_head = head(
        "POST",
        "/v1/documents/batch",
        &[("content-type", "application/x-ndjson"), ("authorization", &auth)],
        body.len(),
    );
    let first_line = lines[0].len() + 1;
    let mut batch = send_raw(&base, &batch_head, &body.as_bytes()[..first_line]).await;
    let mut probe = stalled_login(&base).await;
    assert_timeout_answer(&read_answer(&mut probe, Duration::from_secs(20)).await);
    batch.write_all(&body.as_bytes()[first_line..]).await.unwrap();
    let answer = read_answer(&mut batch, Duration::from_secs(20)).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.json()["accepted"], 2, "{}", answer.body);

    // A batch that stops for good: the JSON timeout, after the batch limit.
    let started = Instant::now();
    let mut stuck = send_raw(&base, &batch_head, &body.as_bytes()[..first_line]).await;
    let answer = read_answer(&mut stuck, Duration::from_secs(30)).await;
    assert!(started.elapsed() >= batch_limit, "answered after {:?}", started.elapsed());
    assert_timeout_answer(&answer);
    stack.stop().await;
}

/// The headers every JSON answer carries, PHI or not, error or not.
fn assert_json_headers(what: &str, response: &reqwest::Response) {
    let h = response.headers();
    assert_eq!(h["content-security-policy"], STRICT_CSP, "{what}");
    assert_eq!(h["x-content-type-options"], "nosniff", "{what}");
    assert_eq!(h["referrer-policy"], "no-referrer", "{what}");
    assert_eq!(h["cache-control"], "no-store", "{what}");
}

#[tokio::test]
async fn edge_every_answer_carries_the_security_headers_and_phi_is_never_cached() {
    let stack = Stack::start().await;
    let get = |path: &str, token: Option<&str>| {
        let mut request = stack.http.get(format!("{}{path}", stack.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send()
    };
    // JSON answers without PHI, and error answers (the guard's, a
    // handler's, the router's fallback).
    for (path, status) in [("/healthz", 200), ("/openapi.json", 200), ("/nowhere", 404)] {
        let response = get(path, None).await.unwrap();
        assert_eq!(response.status(), status, "{path}");
        assert_json_headers(path, &response);
    }
    let refused = get(&format!("/v1/documents/{}", uuid::Uuid::now_v7()), None).await.unwrap();
    assert_eq!(refused.status(), 401);
    assert_json_headers("a 401", &refused);
    let login = format!("{}/v1/auth/login", stack.base);
    let bad = stack.http.post(login).header("content-type", "application/json").body("{").send().await.unwrap();
    assert_eq!(bad.status(), 400);
    assert_json_headers("a 400", &bad);

    // A PHI answer: a clinician reading a note of a patient of theirs.
    stack.user("edge-ingest", Role::Ingest).await;
    stack.user("edge-clinician", Role::Clinician).await;
    stack.care_team("edge-clinician", &["PAT-EDGE-7"]).await;
    let ingest = stack.login("edge-ingest").await;
    let clinician = stack.login("edge-clinician").await;
    let doc = json!({"patient_ref": "PAT-EDGE-7", "text": "Known AF, on warfarin."});
    let (status, uploaded) = stack.post("/v1/documents", Some(&ingest), &doc).await;
    assert_eq!(status, 202, "{uploaded}");
    let read = get(&format!("/v1/documents/{}", uploaded["id"].as_str().unwrap()), Some(&clinician)).await.unwrap();
    assert_eq!(read.status(), 200);
    assert_json_headers("a PHI answer", &read);
    assert_eq!(read.json::<Value>().await.unwrap()["patient_ref"], "PAT-EDGE-7");

    // The page: its own policy, as strict as it can be for a script page.
    let page = get("/docs", None).await.unwrap();
    assert_eq!(page.status(), 200);
    let policy = page.headers()["content-security-policy"].to_str().unwrap().to_owned();
    let directives: HashMap<&str, &str> = policy.split(';').filter_map(|d| d.trim().split_once(' ')).collect();
    assert_eq!(directives["default-src"], "'none'", "{policy}");
    assert_eq!(directives["script-src"], "'self'", "no inline script, no eval, no other origin: {policy}");
    assert_eq!(directives["connect-src"], "'self'", "{policy}");
    assert_eq!(directives["frame-ancestors"], "'none'", "{policy}");
    assert!(!policy.contains("http") && !policy.contains('*'), "{policy}");
    assert_eq!(page.headers()["x-content-type-options"], "nosniff");
    assert_eq!(page.headers()["referrer-policy"], "no-referrer");
    stack.stop().await;
}

/// `src` of each `<script>` element of a page.
fn script_sources(html: &str) -> Vec<String> {
    html.split("<script")
        .skip(1)
        .filter_map(|element| {
            let tag = &element[..element.find('>').unwrap()];
            let at = tag.find("src=\"")? + 5;
            Some(tag[at..at + tag[at..].find('"').unwrap()].to_owned())
        })
        .collect()
}

#[tokio::test]
async fn edge_docs_serve_their_script_from_the_api_and_api_docs_off_answers_404() {
    let stack = Stack::start().await;
    let html = stack.http.get(format!("{}/docs", stack.base)).send().await.unwrap().text().await.unwrap();
    let sources = script_sources(&html);
    assert_eq!(sources, ["/docs/scalar.js"], "{html}");
    assert!(!html.contains("src=\"http") && !html.contains("src=\"//"), "{html}");
    assert!(html.contains(r#"integrity="sha256-"#) && html.contains("withDefaultFonts"), "{html}");

    let script = stack.http.get(format!("{}{}", stack.base, sources[0])).send().await.unwrap();
    assert_eq!(script.status(), 200);
    assert!(script.headers()["content-type"].to_str().unwrap().starts_with("text/javascript"));
    assert_eq!(script.headers()["cache-control"], "no-cache");
    let etag = script.headers()["etag"].clone();
    let bytes = script.bytes().await.unwrap();
    let sha256: String = Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(sha256, "93951f1794b0463b87ab58d0557a6610075af79a9f94c2a3f261c993bc7f3913", "the pinned Scalar");
    assert_eq!(etag.to_str().unwrap(), format!("\"{sha256}\""));
    let again = stack.http.get(format!("{}/docs/scalar.js", stack.base)).header("if-none-match", etag).send().await;
    assert_eq!(again.unwrap().status(), 304);

    // API_DOCS=off: both 404 (the JSON error), the description stays.
    let off = stack.serve_another_api(|s| s.edge.docs = false).await;
    for path in ["/docs", "/docs/scalar.js"] {
        let response = stack.http.get(format!("{off}{path}")).send().await.unwrap();
        assert_eq!(response.status(), 404, "{path}");
        assert_eq!(response.headers()["content-security-policy"], STRICT_CSP);
        assert_eq!(response.json::<Value>().await.unwrap()["error"]["code"], "not_found", "{path}");
    }
    assert_eq!(stack.http.get(format!("{off}/openapi.json")).send().await.unwrap().status(), 200);
    stack.stop().await;
}

/// Logs in as `user` through `base`, as if forwarded for `forwarded_for`;
/// the status.
async fn login_from(stack: &Stack, base: &str, user: &str, forwarded_for: Option<&str>) -> u16 {
    let mut request =
        stack.http.post(format!("{base}/v1/auth/login")).json(&json!({"username": user, "password": PASSWORD}));
    if let Some(addr) = forwarded_for {
        request = request.header("x-forwarded-for", addr);
    }
    request.send().await.unwrap().status().as_u16()
}

/// A request without a token (a refusal the guard audits), as if forwarded for `addr`.
async fn refused_from(stack: &Stack, base: &str, addr: &str) {
    let response = stack
        .http
        .get(format!("{base}/v1/documents/{}", uuid::Uuid::now_v7()))
        .header("x-forwarded-for", addr)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
}

/// (action, outcome, source address) of every audit row, sorted.
async fn audited_sources(stack: &Stack) -> Vec<(String, String, String)> {
    let mut rows: Vec<(String, String, Option<String>)> =
        sqlx::query_as("SELECT action, outcome, host(source_ip) FROM audit_events")
            .fetch_all(&stack.db.owner)
            .await
            .unwrap();
    rows.sort();
    rows.into_iter().map(|(a, o, ip)| (a, o, ip.unwrap_or_default())).collect()
}

/// Source addresses of the sessions of `user`, sorted.
async fn session_sources(stack: &Stack, user: &str) -> Vec<String> {
    let mut ips: Vec<String> = sqlx::query_scalar(
        "SELECT host(s.source_ip) FROM sessions s JOIN users u ON u.id = s.user_id WHERE u.username = $1",
    )
    .bind(user)
    .fetch_all(&stack.db.owner)
    .await
    .unwrap();
    ips.sort();
    ips
}

fn rows(expected: &[(&str, &str, &str)]) -> Vec<(String, String, String)> {
    let mut rows: Vec<_> = expected.iter().map(|(a, o, ip)| ((*a).into(), (*o).into(), (*ip).into())).collect();
    rows.sort();
    rows
}

/// The api at `base` with this edge's trusted proxies and `per_minute`
/// logins per source address.
async fn api_with(stack: &Stack, trusted: &str, per_minute: u32) -> String {
    let trusted = trusted.parse().unwrap();
    stack
        .serve_another_api(|s| {
            s.edge.trusted_proxies = trusted;
            s.login = Arc::new(LoginGuard::new(LockoutPolicy::default(), NonZeroU32::new(per_minute).unwrap()));
        })
        .await
}

#[tokio::test]
async fn edge_without_a_trusted_proxy_x_forwarded_for_is_ignored() {
    let stack = Stack::start().await;
    stack.user("edge-user", Role::Ingest).await;
    let base = api_with(&stack, "", 3).await;

    // Each attempt claims another address: all are 127.0.0.1's, whose
    // three a minute are spent; the fourth is refused whatever it claims.
    for n in 1..=3 {
        assert_eq!(login_from(&stack, &base, "edge-user", Some(&format!("10.9.9.{n}"))).await, 200);
    }
    assert_eq!(login_from(&stack, &base, "edge-user", Some("10.9.9.9")).await, 429);
    assert_eq!(login_from(&stack, &base, "edge-user", None).await, 429);
    refused_from(&stack, &base, "10.9.9.9").await;

    let local = "127.0.0.1";
    let expected = rows(&[
        ("auth.login", "success", local),
        ("auth.login", "success", local),
        ("auth.login", "success", local),
        ("auth.login", "denied", local),
        ("auth.login", "denied", local),
        ("auth.access", "denied", local),
    ]);
    wait_until("the audit rows", Duration::from_secs(30), async || audited_sources(&stack).await.len() >= 6).await;
    assert_eq!(audited_sources(&stack).await, expected);
    assert_eq!(session_sources(&stack, "edge-user").await, [local, local, local]);
    stack.stop().await;
}

#[tokio::test]
async fn edge_behind_a_trusted_proxy_each_forwarded_client_has_its_own_address_and_login_limit() {
    let stack = Stack::start().await;
    stack.user("edge-user", Role::Ingest).await;
    let base = api_with(&stack, "127.0.0.1/32", 2).await;
    let (a, b) = ("10.9.9.9", "10.8.8.8");

    // Client A spends its two logins a minute; claiming another address
    // left of what the proxy appended does not help it.
    assert_eq!(login_from(&stack, &base, "edge-user", Some(a)).await, 200);
    assert_eq!(login_from(&stack, &base, "edge-user", Some(a)).await, 200);
    assert_eq!(login_from(&stack, &base, "edge-user", Some(a)).await, 429);
    assert_eq!(login_from(&stack, &base, "edge-user", Some(&format!("6.6.6.6, {a}"))).await, 429);
    // Client B, behind the same proxy, has its own; so has the proxy itself.
    assert_eq!(login_from(&stack, &base, "edge-user", Some(b)).await, 200);
    assert_eq!(login_from(&stack, &base, "edge-user", Some(&format!("{b}, 127.0.0.1"))).await, 200);
    assert_eq!(login_from(&stack, &base, "edge-user", None).await, 200);
    refused_from(&stack, &base, "10.7.7.7").await;

    let expected = rows(&[
        ("auth.login", "success", a),
        ("auth.login", "success", a),
        ("auth.login", "denied", a),
        ("auth.login", "denied", a),
        ("auth.login", "success", b),
        ("auth.login", "success", b),
        ("auth.login", "success", "127.0.0.1"),
        ("auth.access", "denied", "10.7.7.7"),
    ]);
    wait_until("the audit rows", Duration::from_secs(30), async || audited_sources(&stack).await.len() >= 8).await;
    assert_eq!(audited_sources(&stack).await, expected);
    assert_eq!(session_sources(&stack, "edge-user").await, ["10.8.8.8", "10.8.8.8", a, a, "127.0.0.1"]);
    stack.stop().await;
}
