//! Hostile clients (issue 37): requests a broken or hostile client sends,
//! each answered with a JSON 4xx that names the offending field or
//! parameter and never quotes what was sent, with nothing stored, no 500,
//! and the api still serving a normal request afterwards. Every case is a
//! row of docs/reliability.md, "Hostile clients" (the runner prints the
//! rows: `--no-capture`).
//!
//! - `fields`: NUL and invalid UTF-8 in every string field of every JSON
//!   body and batch line and in every query parameter; unknown, misspelled
//!   and mistyped fields and parameters;
//! - `requests`: ids that are no UUID or climb the path, deep JSON, wrong
//!   content types, oversized bodies, tokens and headers;
//! - `slow`: slow-loris headers and bodies, idle connections, 10,000 of
//!   them against the connection limit;
//! - `bulk`: a 2 MB line in a batch of 10,000 lines.
//!
//! Elsewhere already: forged and malformed tokens (access.rs), a body that
//! stops until the request's time limit (edge.rs), a wrong type, an
//! unknown field and a missing content type on an upload (auth.rs).

mod bulk;
mod fields;
mod requests;
mod slow;

use std::collections::HashMap;
use std::time::Duration;

use clinflow_api::users::Role;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::Stack;

/// In every hostile value: no answer may hold it.
pub(crate) const MARK: &str = "HOSTILE-4242";

/// Who sends a case: nobody, or a user of this role.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Who {
    Anonymous,
    As(Role),
}

/// What a case must be answered with.
#[derive(Clone, Debug)]
pub(crate) enum Expect {
    /// This status and code; the message holds `names` (the field).
    Error { status: u16, code: &'static str, names: Option<String> },
    /// A batch answered 200 whose only line is rejected with this code,
    /// its message holding `names`.
    LineRejected { code: &'static str, names: Option<String> },
}

impl Expect {
    pub(crate) fn error(status: u16, code: &'static str, names: &str) -> Self {
        Self::Error { status, code, names: Some(names.to_owned()) }
    }

    pub(crate) fn unnamed(status: u16, code: &'static str) -> Self {
        Self::Error { status, code, names: None }
    }

    fn describe(&self) -> String {
        let named = |names: &Option<String>| {
            names.as_ref().map(|n| format!(", the message holding `` {n} ``")).unwrap_or_default()
        };
        match self {
            Self::Error { status, code, names } => format!("{status} `{code}`{}", named(names)),
            Self::LineRejected { code, names } => format!("200, the line `{code}`{}", named(names)),
        }
    }
}

/// One hostile request and its answer.
pub(crate) struct Case {
    /// What is hostile about it (a row's first column).
    pub what: String,
    pub method: &'static str,
    /// Sent as it is (percent-escapes included).
    pub path: String,
    pub who: Who,
    pub content_type: Option<&'static str>,
    pub body: Vec<u8>,
    pub expect: Expect,
    /// Sent on a raw connection, the path unnormalised (`/../`).
    pub raw: bool,
    /// More headers (reqwest only).
    pub headers: Vec<(&'static str, Vec<u8>)>,
}

impl Case {
    pub(crate) fn new(what: impl Into<String>, method: &'static str, path: impl Into<String>, who: Who) -> Self {
        Self {
            what: what.into(),
            method,
            path: path.into(),
            who,
            content_type: None,
            body: Vec::new(),
            expect: Expect::unnamed(400, "?"),
            raw: false,
            headers: Vec::new(),
        }
    }

    pub(crate) fn json(mut self, body: Vec<u8>) -> Self {
        self.content_type = Some("application/json");
        self.body = body;
        self
    }

    pub(crate) fn ndjson(mut self, body: Vec<u8>) -> Self {
        self.content_type = Some("application/x-ndjson");
        self.body = body;
        self
    }

    pub(crate) fn header(mut self, name: &'static str, value: impl Into<Vec<u8>>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    pub(crate) fn raw(mut self) -> Self {
        self.raw = true;
        self
    }

    pub(crate) fn expect(mut self, expect: Expect) -> Self {
        self.expect = expect;
        self
    }
}

/// A stack with a user of every role, logged in, and no relay (the outbox
/// keeps every row, so a refused request shows if it wrote one).
pub(crate) struct Hostile {
    pub stack: Stack,
    tokens: HashMap<&'static str, String>,
    /// A user, team and erasure id the paths of the admin and privacy
    /// endpoints name (a refused request never reaches them).
    pub user_id: uuid::Uuid,
    pub team_id: uuid::Uuid,
}

const ROLES: [Role; 6] = [Role::Admin, Role::Clinician, Role::Ingest, Role::Ops, Role::Auditor, Role::PrivacyOfficer];

impl Hostile {
    pub(crate) async fn start() -> Self {
        let stack = Stack::start_without_relay().await;
        let mut tokens = HashMap::new();
        let mut user_id = uuid::Uuid::nil();
        for role in ROLES {
            let name = format!("hostile-{}", role.as_str().replace('_', "-"));
            user_id = stack.user(&name, role).await;
            tokens.insert(role.as_str(), stack.login(&name).await);
        }
        stack.care_team("hostile-clinician", &["PAT-HOSTILE-1"]).await;
        let team_id = sqlx::query_scalar("SELECT id FROM care_teams LIMIT 1").fetch_one(&stack.db.owner).await.unwrap();
        Self { stack, tokens, user_id, team_id }
    }

    pub(crate) fn token(&self, role: Role) -> &str {
        &self.tokens[role.as_str()]
    }

    /// Sends every case, checks its answer, that nothing was stored and that
    /// the api still serves; prints its row of the table in
    /// docs/reliability.md. `audited`: the refusal itself is audited (the
    /// guard's), so the outbox gains audit rows and nothing else.
    pub(crate) async fn run(&self, test: &str, cases: Vec<Case>, audited: bool) {
        assert!(!cases.is_empty());
        for case in &cases {
            let before = stored(&self.stack).await;
            let (status, text) = self.send(case).await;
            let answer = format!("{} {} {}: {status} {text}", case.what, case.method, case.path);
            assert!(status < 500, "no 5xx: {answer}");
            assert!(!text.contains(MARK), "the answer quotes the value: {answer}");
            let body: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {answer}"));
            match &case.expect {
                Expect::Error { status: want, code, names } => {
                    assert_eq!((status, body["error"]["code"].as_str()), (*want, Some(*code)), "{answer}");
                    let message = body["error"]["message"].as_str().unwrap_or_else(|| panic!("{answer}"));
                    if let Some(names) = names {
                        assert!(message.contains(names.as_str()), "the message names {names}: {answer}");
                    }
                }
                Expect::LineRejected { code, names } => {
                    assert_eq!(status, 200, "{answer}");
                    assert_eq!((body["accepted"].as_u64(), body["rejected"].as_u64()), (Some(0), Some(1)), "{answer}");
                    let outcome = &body["outcomes"][0];
                    assert_eq!(
                        (outcome["outcome"].as_str(), outcome["code"].as_str()),
                        (Some("rejected"), Some(*code))
                    );
                    if let Some(names) = names {
                        let message = outcome["message"].as_str().unwrap_or_default();
                        assert!(message.contains(names.as_str()), "the line's message names {names}: {answer}");
                    }
                }
            }
            let after = stored(&self.stack).await;
            if audited {
                assert_eq!(before.without_audit(), after.without_audit(), "nothing stored: {answer}");
            } else {
                assert_eq!(before, after, "nothing stored, nothing audited: {answer}");
            }
            self.still_serving(&self.stack.base).await;
            println!(
                "| {} | `{} {}` | {} | `{test}` |",
                case.what,
                case.method,
                self.shown(&case.path),
                case.expect.describe()
            );
        }
    }

    /// The path as the table shows it: the run's ids as `{user}`, `{team}`,
    /// a run of one character as `c×n`, past 100 characters cut.
    fn shown(&self, path: &str) -> String {
        let path = path.replace(&self.user_id.to_string(), "{user}").replace(&self.team_id.to_string(), "{team}");
        let mut shown = String::new();
        let mut chars = path.chars().peekable();
        while let Some(c) = chars.next() {
            let mut n = 1;
            while chars.next_if_eq(&c).is_some() {
                n += 1;
            }
            if n > 10 {
                shown.push_str(&format!("{c}×{n}"));
            } else {
                shown.extend(std::iter::repeat_n(c, n));
            }
        }
        match shown.char_indices().nth(100) {
            Some((at, _)) => format!("{}…", &shown[..at]),
            None => shown,
        }
    }

    async fn send(&self, case: &Case) -> (u16, String) {
        let token = match case.who {
            Who::Anonymous => None,
            Who::As(role) => Some(self.token(role)),
        };
        if case.raw {
            let mut headers = vec![];
            let auth = token.map(|t| format!("Bearer {t}"));
            if let Some(auth) = &auth {
                headers.push(("authorization", auth.as_str()));
            }
            if let Some(content_type) = case.content_type {
                headers.push(("content-type", content_type));
            }
            let head = request_head(case.method, &case.path, &headers, case.body.len());
            let answer = raw(&self.stack.base, head.as_bytes(), &case.body)
                .await
                .unwrap_or_else(|| panic!("{} {}: the connection closed without an answer", case.method, case.path));
            return (answer.status, answer.body);
        }
        let method = reqwest::Method::from_bytes(case.method.as_bytes()).unwrap();
        let mut request = self.stack.http.request(method, format!("{}{}", self.stack.base, case.path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(content_type) = case.content_type {
            request = request.header("content-type", content_type);
        }
        for (name, value) in &case.headers {
            request = request.header(*name, reqwest::header::HeaderValue::from_bytes(value).unwrap());
        }
        let response = request.body(case.body.clone()).send().await.unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    }

    /// A normal request through `base` is answered.
    pub(crate) async fn still_serving(&self, base: &str) {
        let response = self
            .stack
            .http
            .post(format!("{base}/v1/documents/status"))
            .bearer_auth(self.token(Role::Ingest))
            .json(&json!({"ids": []}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "the api still serves");
    }

    pub(crate) async fn stop(self) {
        self.stack.stop().await;
    }
}

/// Row counts of every table a request could write, and the outbox's
/// audit rows apart.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Stored {
    tables: Vec<i64>,
    audit: i64,
}

impl Stored {
    fn without_audit(&self) -> &[i64] {
        &self.tables
    }
}

pub(crate) async fn stored(stack: &Stack) -> Stored {
    let tables: Vec<i64> = sqlx::query_scalar(
        "SELECT ARRAY[
           (SELECT count(*) FROM documents), (SELECT count(*) FROM document_texts),
           (SELECT count(*) FROM outbox WHERE topic <> 'audit'), (SELECT count(*) FROM users),
           (SELECT count(*) FROM sessions), (SELECT count(*) FROM api_keys), (SELECT count(*) FROM care_teams),
           (SELECT count(*) FROM care_team_members), (SELECT count(*) FROM care_team_patients),
           (SELECT count(*) FROM break_glass_grants), (SELECT count(*) FROM erasure_requests),
           (SELECT count(*) FROM idempotency_keys), (SELECT count(*) FROM data_keys)]",
    )
    .fetch_one(&stack.db.owner)
    .await
    .unwrap();
    let audit = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE topic = 'audit'")
        .fetch_one(&stack.db.owner)
        .await
        .unwrap();
    Stored { tables, audit }
}

/// An answer read off a raw connection.
pub(crate) struct RawAnswer {
    pub status: u16,
    pub body: String,
}

pub(crate) fn request_head(method: &str, path: &str, headers: &[(&str, &str)], length: usize) -> String {
    let mut head = format!("{method} {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n");
    if length > 0 {
        head.push_str(&format!("content-length: {length}\r\n"));
    }
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head + "\r\n"
}

/// Sends `head` and `body` on a new connection and reads until the api
/// closes it: the answer, or None if it closed (or reset) without one.
pub(crate) async fn raw(base: &str, head: &[u8], body: &[u8]) -> Option<RawAnswer> {
    let mut stream = TcpStream::connect(base.trim_start_matches("http://")).await.unwrap();
    let mut request = head.to_vec();
    request.extend_from_slice(body);
    let (mut reader, mut writer) = stream.split();
    // Written while the answer is read: the api may answer (and close)
    // before it has read everything.
    let write = async {
        let _ = writer.write_all(&request).await;
    };
    let read = async {
        let mut received = Vec::new();
        let _ = reader.read_to_end(&mut received).await;
        received
    };
    let (_, received) = tokio::time::timeout(Duration::from_secs(30), async { tokio::join!(write, read) })
        .await
        .expect("an answer or a closed connection within 30 s");
    parse_answer(&received)
}

pub(crate) fn parse_answer(received: &[u8]) -> Option<RawAnswer> {
    let end = received.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&received[..end]);
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some(RawAnswer { status, body: String::from_utf8_lossy(&received[end + 4..]).into_owned() })
}
