//! Slow and idle clients: slow-loris headers and bodies, connections that
//! send nothing (HTTP/1.1, HTTP/2, TLS), and 10,000 idle connections
//! against the connection limit. Each is closed or answered within its
//! limit, stores nothing, and the api goes on serving others.

use std::time::{Duration, Instant};

use clinflow_api::users::Role;
use futures_util::StreamExt as _;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{Hostile, MARK, parse_answer, request_head, stored};
use crate::common::wait_until;

const HEADERS: Duration = Duration::from_secs(1);
const BODY_STALL: Duration = Duration::from_secs(1);
const IDLE: Duration = Duration::from_secs(3);
const REQUEST: Duration = Duration::from_secs(4);
const TEST: &str = "hostile_slow_and_idle_clients_are_cut_off_within_their_limits";

async fn connect(base: &str) -> TcpStream {
    TcpStream::connect(base.trim_start_matches("http://").trim_start_matches("https://")).await.unwrap()
}

/// Reads until the api closes the connection (or resets it), writing
/// `drip` a byte every 250 ms meanwhile; what was received, and when the
/// connection closed. Fails past `within`.
async fn until_closed(stream: TcpStream, drip: &[u8], within: Duration) -> (Vec<u8>, Duration) {
    let started = Instant::now();
    let (mut reader, mut writer) = stream.into_split();
    let drip = drip.to_vec();
    let dripping = tokio::spawn(async move {
        for byte in drip {
            tokio::time::sleep(Duration::from_millis(250)).await;
            if writer.write_all(&[byte]).await.is_err() {
                return;
            }
        }
        // Then hold the write side open.
        std::future::pending::<()>().await;
    });
    let read = async {
        let mut received = Vec::new();
        let mut chunk = [0_u8; 4096];
        while let Ok(n @ 1..) = reader.read(&mut chunk).await {
            received.extend_from_slice(&chunk[..n]);
        }
        received
    };
    let received = tokio::time::timeout(within, read).await.unwrap_or_else(|_| panic!("still open after {within:?}"));
    dripping.abort();
    (received, started.elapsed())
}

/// One row: checks nothing was stored and `base` still serves.
async fn row(h: &Hostile, base: &str, before: &super::Stored, what: &str, answer: &str) {
    assert_eq!(&stored(&h.stack).await, before, "{what}: nothing stored");
    h.still_serving(base).await;
    println!("| {what} | raw connection | {answer} | `{TEST}` |");
}

fn json_error(received: &[u8]) -> (u16, String) {
    let answer = parse_answer(received).unwrap_or_else(|| panic!("no answer: {}", String::from_utf8_lossy(received)));
    let body: serde_json::Value = serde_json::from_str(&answer.body).unwrap_or_else(|_| panic!("{}", answer.body));
    assert!(!answer.body.contains(MARK), "{}", answer.body);
    (answer.status, body["error"]["code"].as_str().unwrap_or_default().to_owned())
}

/// The connection is closed with no answer at all, or (hyper's own) a bare 408.
fn closed_unanswered(what: &str, received: &[u8]) -> &'static str {
    match parse_answer(received) {
        None => {
            assert!(received.is_empty(), "{what}: {}", String::from_utf8_lossy(received));
            "closed, no answer"
        }
        Some(answer) => {
            assert_eq!(answer.status, 408, "{what}");
            "closed with a bare 408"
        }
    }
}

#[tokio::test]
async fn hostile_slow_and_idle_clients_are_cut_off_within_their_limits() {
    let h = Hostile::start().await;
    let base = h
        .stack
        .serve_another_api(|s| {
            (s.edge.header_timeout, s.edge.body_stall, s.edge.idle_timeout) = (HEADERS, BODY_STALL, IDLE);
            s.edge.request_timeout = REQUEST;
            s.edge.batch_timeout = REQUEST;
        })
        .await;
    let bound = HEADERS + Duration::from_secs(4);

    // Headers: nothing at all, then headers a byte at a time, on a fresh
    // connection and on a kept-alive one after its first answer.
    let before = stored(&h.stack).await;
    let (received, took) = until_closed(connect(&base).await, b"", bound).await;
    assert!(took >= HEADERS - Duration::from_millis(100), "{took:?}");
    let what = "a connection that sends nothing";
    row(&h, &base, &before, what, &format!("{} after API_HEADER_TIMEOUT_SECONDS", closed_unanswered(what, &received)))
        .await;

    let drip = format!("GET /healthz HTTP/1.1\r\nhost: localhost\r\nx-hostile: {}", "a".repeat(100));
    let (received, took) = until_closed(connect(&base).await, drip.as_bytes(), bound).await;
    assert!(took >= HEADERS - Duration::from_millis(100), "{took:?}");
    let what = "headers sent a byte every 250 ms (slow loris)";
    row(&h, &base, &before, what, &format!("{} after API_HEADER_TIMEOUT_SECONDS", closed_unanswered(what, &received)))
        .await;

    for (what, drip) in [
        ("a kept-alive connection left idle after its answer", ""),
        ("a kept-alive connection's next headers sent a byte every 250 ms", drip.as_str()),
    ] {
        let mut stream = connect(&base).await;
        stream.write_all(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\n\r\n").await.unwrap();
        let mut first = vec![0_u8; 4096];
        let n = stream.read(&mut first).await.unwrap();
        assert_eq!(parse_answer(&first[..n]).map(|a| a.status), Some(200));
        let (received, took) = until_closed(stream, drip.as_bytes(), IDLE + Duration::from_secs(4)).await;
        assert!(took >= IDLE - Duration::from_millis(100), "{what}: {took:?}");
        row(
            &h,
            &base,
            &before,
            what,
            &format!("{} after API_IDLE_TIMEOUT_SECONDS", closed_unanswered(what, &received)),
        )
        .await;
    }

    // Bodies: one that stops is answered 408 at API_BODY_STALL_SECONDS;
    // one that trickles, 503 `timeout` at the request's time limit.
    let ingest = format!("Bearer {}", h.token(Role::Ingest));
    let upload = json!({"patient_ref": "PAT-H-SLOW", "text": MARK}).to_string();
    let line = format!("{upload}\n");
    for (what, path, content_type, body) in [
        ("an upload whose body stops halfway", "/v1/documents", "application/json", upload.as_str()),
        ("a batch whose body stops halfway", "/v1/documents/batch", "application/x-ndjson", line.as_str()),
        (
            "a login whose body stops halfway",
            "/v1/auth/login",
            "application/json",
            r#"{"username": "u", "password": "p"}"#,
        ),
    ] {
        let head =
            request_head("POST", path, &[("content-type", content_type), ("authorization", &ingest)], body.len());
        let mut stream = connect(&base).await;
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(&body.as_bytes()[..body.len() / 2]).await.unwrap();
        let (received, took) = until_closed(stream, b"", REQUEST + Duration::from_secs(4)).await;
        assert!(took >= BODY_STALL - Duration::from_millis(100) && took < REQUEST, "{what}: {took:?}");
        assert_eq!(json_error(&received), (408, "body_timeout".to_owned()), "{what}");
        row(&h, &base, &before, what, "408 `body_timeout` after API_BODY_STALL_SECONDS").await;
    }
    let padded = json!({"patient_ref": "PAT-H-SLOW", "text": MARK.repeat(10)}).to_string();
    let head = request_head(
        "POST",
        "/v1/documents",
        &[("content-type", "application/json"), ("authorization", &ingest)],
        padded.len(),
    );
    let mut stream = connect(&base).await;
    stream.write_all(head.as_bytes()).await.unwrap();
    let (received, took) = until_closed(stream, padded.as_bytes(), REQUEST + Duration::from_secs(4)).await;
    assert!(took >= REQUEST - Duration::from_millis(100), "{took:?}");
    assert_eq!(json_error(&received), (503, "timeout".to_owned()));
    let what = "an upload whose body comes a byte every 250 ms";
    row(&h, &base, &before, what, "503 `timeout` at API_REQUEST_TIMEOUT_SECONDS").await;

    // HTTP/2 (cleartext, prior knowledge): a connection that sends only
    // its preface; one left idle after its answer.
    let preface = [b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".as_slice(), &[0, 0, 0, 4, 0, 0, 0, 0, 0]].concat();
    let mut stream = connect(&base).await;
    stream.write_all(&preface).await.unwrap();
    let (_, took) = until_closed(stream, b"", bound).await;
    assert!(took >= HEADERS - Duration::from_millis(100), "{took:?}");
    row(
        &h,
        &base,
        &before,
        "an HTTP/2 connection that sends only its preface",
        "closed after API_HEADER_TIMEOUT_SECONDS",
    )
    .await;

    let mut stream = connect(&base).await;
    stream.write_all(&[preface, h2_get("/healthz")].concat()).await.unwrap();
    read_h2_answer(&mut stream).await;
    let (_, took) = until_closed(stream, b"", IDLE + Duration::from_secs(5)).await;
    assert!(took >= IDLE - Duration::from_millis(300), "{took:?}");
    let what = "an HTTP/2 connection left idle after its answer";
    row(&h, &base, &before, what, "closed after API_IDLE_TIMEOUT_SECONDS").await;

    // TLS: a connection that never says hello.
    let cert = crate::https::ApiCert::new();
    let tls_base = h
        .stack
        .serve_https(&cert, |s| {
            (s.edge.header_timeout, s.edge.body_stall, s.edge.idle_timeout) = (HEADERS, BODY_STALL, IDLE);
        })
        .await;
    let (received, took) = until_closed(connect(&tls_base).await, b"", bound).await;
    assert!(received.is_empty() && took >= HEADERS - Duration::from_millis(100), "{took:?}");
    let pem = std::fs::read(cert.ca.pem_path()).unwrap();
    let https = reqwest::Client::builder()
        .tls_certs_only(reqwest::Certificate::from_pem_bundle(&pem).unwrap())
        .build()
        .unwrap();
    assert_eq!(https.get(format!("{tls_base}/healthz")).send().await.unwrap().status(), 200);
    let what = "a TLS connection that never says hello";
    row(&h, &base, &before, what, "closed after API_HEADER_TIMEOUT_SECONDS (the handshake's limit)").await;
    h.stop().await;
}

/// A HEADERS frame (stream 1, END_STREAM | END_HEADERS) of `GET path`:
/// HPACK `:method GET`, `:scheme http` (indexed), `:path` and
/// `:authority` (literal, indexed names).
fn h2_get(path: &str) -> Vec<u8> {
    let mut block = vec![0x82, 0x86, 0x04, u8::try_from(path.len()).unwrap()];
    block.extend_from_slice(path.as_bytes());
    block.extend_from_slice(&[0x01, 9]);
    block.extend_from_slice(b"localhost");
    let length = u32::try_from(block.len()).unwrap().to_be_bytes();
    [&length[1..], &[0x1, 0x5, 0, 0, 0, 1], &block].concat()
}

/// Reads frames until stream 1 ends (a HEADERS or DATA frame with END_STREAM).
async fn read_h2_answer(stream: &mut TcpStream) {
    let read = async {
        loop {
            let mut header = [0_u8; 9];
            stream.read_exact(&mut header).await.unwrap();
            let length = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
            let mut payload = vec![0_u8; length];
            stream.read_exact(&mut payload).await.unwrap();
            let (kind, flags, id) =
                (header[3], header[4], u32::from_be_bytes([header[5], header[6], header[7], header[8]]));
            if id == 1 && (kind == 0 || kind == 1) && flags & 0x1 == 1 {
                return;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read).await.expect("an HTTP/2 answer");
}

/// Opens `n` connections to `base`, 100 at a time (faster, they would
/// overflow the listen backlog: a connection the kernel then leaves
/// half-open is none the api holds).
async fn open(base: &str, n: usize) -> Vec<TcpStream> {
    futures_util::stream::iter(0..n).map(|_| async { connect(base).await }).buffer_unordered(100).collect().await
}

/// Which of `streams` the api has closed (a read finds the end, or a
/// reset); each is given 100 ms to show it.
async fn closed(streams: &[TcpStream]) -> Vec<bool> {
    let checks = streams.iter().map(|s| async move {
        if tokio::time::timeout(Duration::from_millis(100), s.readable()).await.is_err() {
            return false;
        }
        match s.try_read(&mut [0_u8; 64]) {
            Ok(n) => n == 0,
            Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
        }
    });
    futures_util::future::join_all(checks).await
}

fn count(closed: &[bool]) -> usize {
    closed.iter().filter(|c| **c).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_ten_thousand_idle_connections_hold_at_most_the_limit_and_others_are_served() {
    const LIMIT: usize = 50;
    const IDLE_CONNECTIONS: usize = 10_000;
    let test = "hostile_ten_thousand_idle_connections_hold_at_most_the_limit_and_others_are_served";
    let h = Hostile::start().await;
    let before = stored(&h.stack).await;
    let http = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let status = |base: String| {
        let http = http.clone();
        async move {
            tokio::time::timeout(Duration::from_secs(5), http.get(format!("{base}/healthz")).send())
                .await
                .expect("an answer or a refusal, not a hang")
                .map(|r| r.status().as_u16())
        }
    };

    // Idle connections held for long (60 s headers): the api keeps LIMIT
    // and closes every other at once; a client beyond them is refused
    // cleanly (closed, no hang), and served as soon as one is let go.
    let base = h
        .stack
        .serve_another_api(|s| (s.edge.max_connections, s.edge.header_timeout) = (LIMIT, Duration::from_secs(60)))
        .await;
    let mut idle = open(&base, IDLE_CONNECTIONS).await;
    wait_until("every connection past the limit closed", Duration::from_secs(30), async || {
        count(&closed(&idle).await) >= IDLE_CONNECTIONS - LIMIT
    })
    .await;
    let held: Vec<bool> = closed(&idle).await.into_iter().map(|closed| !closed).collect();
    assert_eq!(count(&held), LIMIT, "the api holds exactly its limit");
    match status(base.clone()).await {
        Err(e) => assert!(e.is_request() || e.is_connect(), "{e}"),
        Ok(status) => panic!("a connection past the limit was served: {status}"),
    }
    let mut held = held.into_iter();
    idle.retain(|_| held.next() == Some(true));
    assert_eq!(idle.len(), LIMIT);
    idle.pop();
    wait_until("a client served once a connection is let go", Duration::from_secs(10), async || {
        status(base.clone()).await.is_ok_and(|s| s == 200)
    })
    .await;
    // Let go of all: their places come back as the api sees them close.
    drop(idle);
    wait_until("the places of the idle connections back", Duration::from_secs(10), async || {
        futures_util::future::join_all((0..LIMIT).map(|_| status(base.clone())))
            .await
            .iter()
            .all(|s| s.as_ref().is_ok_and(|s| *s == 200))
    })
    .await;
    println!(
        "| 10,000 idle connections, the limit {LIMIT} | raw connections | all but {LIMIT} closed at once; \
         a client past the limit refused (closed), served once one is let go | `{test}` |"
    );

    // The same with the api's short header limit (2 s): the idle ones are
    // cut off, and a client is served while the 10,000 stay open on their side.
    let base = h
        .stack
        .serve_another_api(|s| (s.edge.max_connections, s.edge.header_timeout) = (LIMIT, Duration::from_secs(2)))
        .await;
    let idle = open(&base, IDLE_CONNECTIONS).await;
    wait_until("a client served while 10,000 idle ones are held", Duration::from_secs(30), async || {
        status(base.clone()).await.is_ok_and(|s| s == 200)
    })
    .await;
    wait_until("every idle connection closed", Duration::from_secs(30), async || {
        count(&closed(&idle).await) == IDLE_CONNECTIONS
    })
    .await;
    drop(idle);
    assert_eq!(stored(&h.stack).await, before, "nothing stored");
    h.still_serving(&base).await;
    println!(
        "| 10,000 idle connections kept open by the client, the limit {LIMIT} | raw connections | \
         past the limit closed at once, the rest at API_HEADER_TIMEOUT_SECONDS; another client served meanwhile | `{test}` |"
    );
    h.stop().await;
}
