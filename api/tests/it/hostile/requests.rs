//! Hostile requests beyond their fields: ids that are no UUID or climb the
//! path, deep JSON, wrong content types, oversized bodies and tokens, and
//! what the HTTP parser itself refuses (a 1 MB token, too many headers, a
//! NUL in a header).

use clinflow_api::users::Role;
use serde_json::json;

use super::{Case, Expect, Hostile, MARK, Who, raw, request_head, stored};
use crate::common::PASSWORD;

/// Every route with an id in its path: method, template (`{id}`,
/// `{user_id}`), who may call it, and a body when it takes one.
fn id_routes() -> Vec<(&'static str, &'static str, Role, Option<serde_json::Value>)> {
    use Role::*;
    vec![
        ("GET", "/v1/documents/{id}", Clinician, None),
        ("GET", "/v1/documents/{id}/status", Ingest, None),
        ("PATCH", "/v1/admin/users/{id}", Admin, Some(json!({"role": "ops"}))),
        ("POST", "/v1/admin/users/{id}/password", Admin, Some(json!({"password": PASSWORD}))),
        ("GET", "/v1/admin/users/{id}/sessions", Admin, None),
        ("DELETE", "/v1/admin/users/{id}/sessions", Admin, None),
        ("GET", "/v1/admin/users/{id}/api-keys", Admin, None),
        ("POST", "/v1/admin/users/{id}/api-keys", Admin, Some(json!({}))),
        ("DELETE", "/v1/admin/api-keys/{id}", Admin, None),
        ("PUT", "/v1/admin/teams/{id}/members/{user_id}", Admin, None),
        ("DELETE", "/v1/admin/teams/{id}/members/{user_id}", Admin, None),
        ("POST", "/v1/admin/teams/{id}/patients", Admin, Some(json!({"patient_ref": "PAT-H"}))),
        ("POST", "/v1/admin/teams/{id}/patients/remove", Admin, Some(json!({"patient_ref": "PAT-H"}))),
        ("POST", "/v1/privacy/erasures/{id}/approve", PrivacyOfficer, None),
    ]
}

#[tokio::test]
async fn hostile_ids_that_are_no_uuid_or_climb_the_path_are_refused_naming_the_parameter() {
    let h = Hostile::start().await;
    let uuid = "018f0000-0000-7000-8000-000000000000";
    let values = [
        ("an id that is no UUID", MARK.to_owned(), "is not valid: ids are UUIDs"),
        ("an id climbing the path, escaped", format!("..%2F..%2Fetc%2F{MARK}"), "is not valid: ids are UUIDs"),
        ("an id holding a NUL", format!("{MARK}%00"), "is not valid: ids are UUIDs"),
        ("an id of invalid UTF-8", format!("{MARK}%FF%FE"), "is not valid UTF-8"),
        ("an id of 1,000 characters", format!("{MARK}{}", "0".repeat(1_000)), "is not valid: ids are UUIDs"),
        ("a UUID with a letter past f", "018f0000-0000-7000-8000-00000000000g".to_owned(), "is not valid"),
        ("an id of SQL", format!("{MARK}'%20OR%20'1'%3D'1"), "is not valid: ids are UUIDs"),
    ];
    let mut cases = Vec::new();
    for (method, template, role, body) in id_routes() {
        let params: Vec<&str> =
            ["id", "user_id"].into_iter().filter(|p| template.contains(&format!("{{{p}}}"))).collect();
        for param in params {
            for (what, value, why) in &values {
                let path = ["id", "user_id"].iter().fold(template.to_owned(), |path, p| {
                    path.replace(&format!("{{{p}}}"), if *p == param { value } else { uuid })
                });
                let mut case = Case::new(format!("{what} as `{param}`"), method, path, Who::As(role));
                if let Some(body) = &body {
                    case = case.json(body.to_string().into_bytes());
                }
                cases.push(case.expect(Expect::error(400, "invalid_path", &format!("path parameter `{param}` {why}"))));
            }
        }
    }
    // A CUI is text: its own check refuses a NUL (422); invalid UTF-8 is the path's.
    for what in ["patients", "documents"] {
        cases.push(
            Case::new("a CUI holding a NUL", "GET", format!("/v1/concepts/{MARK}%00/{what}"), Who::As(Role::Clinician))
                .expect(Expect::error(422, "invalid_cui", "CUI")),
        );
        cases.push(
            Case::new("a CUI of invalid UTF-8", "GET", format!("/v1/concepts/%FF%FE/{what}"), Who::As(Role::Clinician))
                .expect(Expect::error(400, "invalid_path", "path parameter `cui` is not valid UTF-8")),
        );
    }
    // Dot segments as sent, unnormalised: no route has them.
    for (what, path, who) in [
        ("a path climbing out of a document", format!("/v1/documents/../../etc/{MARK}"), Who::As(Role::Clinician)),
        ("escaped dots climbing out", format!("/v1/documents/%2e%2e/%2e%2e/etc/{MARK}"), Who::As(Role::Clinician)),
        ("a path climbing out of the console", format!("/ui/../../../etc/{MARK}"), Who::Anonymous),
        ("a path climbing out of /docs", format!("/docs/..%2f..%2fetc%2f{MARK}"), Who::Anonymous),
        ("a path of two slashes", format!("//etc/{MARK}"), Who::Anonymous),
    ] {
        cases.push(Case::new(what, "GET", path, who).raw().expect(Expect::unnamed(404, "not_found")));
    }
    // A method the path does not take: the JSON 405 (it was an empty one).
    for (method, path, who) in [
        ("POST", format!("/v1/admin/teams/{uuid}/members/{uuid}"), Who::As(Role::Admin)),
        ("DELETE", "/v1/documents".to_owned(), Who::As(Role::Ingest)),
        ("PUT", "/v1/auth/login".to_owned(), Who::Anonymous),
        ("TRACE", "/healthz".to_owned(), Who::Anonymous),
    ] {
        cases.push(
            Case::new(format!("{method}, a method the path does not take"), method, path, who)
                .expect(Expect::unnamed(405, "method_not_allowed")),
        );
    }
    h.run("hostile_ids_that_are_no_uuid_or_climb_the_path_are_refused_naming_the_parameter", cases, false).await;
    h.stop().await;
}

#[tokio::test]
async fn hostile_deep_json_wrong_content_types_and_oversized_bodies_are_refused() {
    let h = Hostile::start().await;
    let ingest = Who::As(Role::Ingest);
    let upload = || json!({"patient_ref": "PAT-H", "text": MARK}).to_string().into_bytes();
    let deep = |open: &str, depth: usize| open.repeat(depth);
    let mut cases = vec![
        Case::new("arrays nested 100,000 deep in `patient_ref`", "POST", "/v1/documents", ingest)
            .json(format!(r#"{{"text": "{MARK}", "patient_ref": {}"#, deep("[", 100_000)).into_bytes())
            .expect(Expect::error(422, "invalid_body", "field `patient_ref` has the wrong type")),
        Case::new("a body of 1,000,000 `[`", "POST", "/v1/documents", ingest)
            .json(deep("[", 1_000_000).into_bytes())
            .expect(Expect::error(422, "invalid_body", "has the wrong type")),
        Case::new("objects nested 200,000 deep", "POST", "/v1/documents", ingest)
            .json(deep(r#"{"a":"#, 200_000).into_bytes())
            .expect(Expect::error(422, "invalid_body", "unknown field `a`")),
        Case::new("nesting 100,000 deep around a NUL", "POST", "/v1/documents", ingest)
            .json(
                format!(r#"{{"patient_ref": "P", "text": "t", "source_ref": {}"{MARK}\u0000"}}"#, deep("[", 100_000))
                    .into_bytes(),
            )
            .expect(Expect::error(422, "invalid_body", "field `source_ref` has the wrong type")),
        Case::new("objects nested 100,000 deep as the username", "POST", "/v1/auth/login", Who::Anonymous)
            .json(format!(r#"{{"password": "p", "username": {}"#, deep(r#"{"a":"#, 100_000)).into_bytes())
            .expect(Expect::error(422, "invalid_body", "field `username` has the wrong type")),
        Case::new("a batch line nested 4,000 deep", "POST", "/v1/documents/batch", ingest)
            .ndjson(format!("{}\n", deep("[", 4_000)).into_bytes())
            .expect(Expect::LineRejected { code: "invalid_body", names: None }),
        Case::new("a body of 2.5 MB (over the 2 MB limit)", "POST", "/v1/documents", ingest)
            .json(json!({"patient_ref": "PAT-H", "text": MARK.repeat(210_000)}).to_string().into_bytes())
            .expect(Expect::unnamed(413, "payload_too_large")),
        Case::new("JSON with 100,000 unknown keys", "POST", "/v1/documents", ingest)
            .json(
                format!("{{{}\"text\": \"t\"}}", (0..100_000).map(|i| format!("\"k{i}\": 1, ")).collect::<String>())
                    .into_bytes(),
            )
            .expect(Expect::error(422, "invalid_body", "unknown field `k0`")),
    ];
    let media = |what: &str, content_type: Option<&'static str>, path: &'static str, who, body: Vec<u8>| {
        let mut case = Case::new(what, "POST", path, who);
        case.content_type = content_type;
        case.body = body;
        case
    };
    for (what, content_type) in [
        ("no content type", None),
        ("text/plain", Some("text/plain")),
        ("a form", Some("application/x-www-form-urlencoded")),
        ("multipart", Some("multipart/form-data; boundary=HOSTILE")),
        ("XML", Some("application/xml")),
        ("NDJSON", Some("application/x-ndjson")),
        ("application/jsonx", Some("application/jsonx")),
        ("a type that is no type", Some("HOSTILE-4242")),
    ] {
        cases.push(
            media(&format!("an upload sent as {what}"), content_type, "/v1/documents", ingest, upload())
                .expect(Expect::unnamed(415, "unsupported_media_type")),
        );
    }
    let form = format!("username={MARK}&password=x").into_bytes();
    cases.push(
        media(
            "a login sent as a form",
            Some("application/x-www-form-urlencoded"),
            "/v1/auth/login",
            Who::Anonymous,
            form,
        )
        .expect(Expect::unnamed(415, "unsupported_media_type")),
    );
    let line = || format!("{}\n", json!({"patient_ref": "PAT-H", "text": MARK})).into_bytes();
    for (what, content_type) in [
        ("JSON", Some("application/json")),
        ("text/plain", Some("text/plain")),
        ("no content type", None),
        ("multipart", Some("multipart/form-data; boundary=HOSTILE")),
    ] {
        cases.push(
            media(&format!("a batch sent as {what}"), content_type, "/v1/documents/batch", ingest, line())
                .expect(Expect::unnamed(415, "unsupported_media_type")),
        );
    }
    // Idempotency-Key: 1-255 visible ASCII characters.
    for (what, key) in [
        ("an Idempotency-Key of invalid UTF-8", [MARK.as_bytes(), b"\xff\xfe".as_slice()].concat()),
        ("an Idempotency-Key of 300 characters", format!("{MARK}{}", "k".repeat(290)).into_bytes()),
        ("an Idempotency-Key with a space", format!("{MARK} x").into_bytes()),
    ] {
        cases.push(
            Case::new(what, "POST", "/v1/documents", ingest)
                .json(json!({"patient_ref": "PAT-H", "text": "Known AF."}).to_string().into_bytes())
                .header("idempotency-key", key)
                .expect(Expect::error(422, "invalid_idempotency_key", "Idempotency-Key")),
        );
    }
    h.run("hostile_deep_json_wrong_content_types_and_oversized_bodies_are_refused", cases, false).await;

    // Oversized credentials reach the guard: 401, the refusal audited (and
    // nothing else written).
    let big = |prefix: &str, n: usize| format!("{prefix}{MARK}{}", "A".repeat(n)).into_bytes();
    let mut cases = Vec::new();
    for (what, value) in [
        ("a JWT of 256 KB", big("Bearer eyJhbGciOiJIUzI1NiJ9.", 256 * 1024)),
        ("a bearer token of 256 KB of one letter", big("Bearer ", 256 * 1024)),
        ("an API key with a secret of 256 KB", big("Bearer cfk_018f0000000070008000000000000000_", 256 * 1024)),
        ("a session cookie of 256 KB", big("__Host-clinflow-session=", 256 * 1024)),
    ] {
        let header = if what.contains("cookie") { "cookie" } else { "authorization" };
        cases.push(
            Case::new(what, "POST", "/v1/documents", Who::Anonymous)
                .json(upload())
                .header(header, value)
                .expect(Expect::unnamed(401, "unauthenticated")),
        );
    }
    h.run("hostile_deep_json_wrong_content_types_and_oversized_bodies_are_refused", cases, true).await;
    h.stop().await;
}

/// What the HTTP parser refuses before the api sees it: its own bare 4xx
/// (no JSON: there is no request yet), or the connection closed; nothing
/// stored, and the next client served.
#[tokio::test]
async fn hostile_a_1_mb_token_too_many_headers_and_bytes_no_http_allows_are_refused_by_the_parser() {
    let h = Hostile::start().await;
    let body = json!({"patient_ref": "PAT-H", "text": MARK}).to_string();
    let auth = format!("Bearer eyJhbGciOiJIUzI1NiJ9.{MARK}{}", "A".repeat(1024 * 1024));
    let ingest = format!("Bearer {}", h.token(Role::Ingest));
    let many: Vec<(String, String)> = (0..200).map(|i| (format!("x-hostile-{i}"), MARK.to_owned())).collect();
    let many: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let json_type = ("content-type", "application/json");
    // (what, the request, its status; for a megabyte, the connection may
    // also close before the answer is read: the api stops reading there).
    let one_mb = 1024 * 1024;
    let heads: Vec<(&str, Vec<u8>, u16)> = vec![
        (
            "a JWT of 1 MB",
            request_head("POST", "/v1/documents", &[json_type, ("authorization", &auth)], body.len()).into_bytes(),
            431,
        ),
        (
            "200 headers",
            request_head(
                "POST",
                "/v1/documents",
                &[&[json_type, ("authorization", &ingest)], many.as_slice()].concat(),
                body.len(),
            )
            .into_bytes(),
            431,
        ),
        (
            "a NUL in a header",
            request_head(
                "POST",
                "/v1/documents",
                &[json_type, ("authorization", &ingest), ("x-note", "HOSTILE-4242\0")],
                body.len(),
            )
            .into_bytes(),
            400,
        ),
        (
            "bytes no URL allows in the path",
            [
                b"GET /v1/documents/".as_slice(),
                MARK.as_bytes(),
                b"\xff\xfe HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
            ]
            .concat(),
            400,
        ),
        ("a request line that is no HTTP", format!("{MARK} \0\0\0\r\n\r\n").into_bytes(), 400),
        (
            "a URL of 1 MB",
            request_head("GET", &format!("/v1/documents/{MARK}{}", "a".repeat(one_mb)), &[], 0).into_bytes(),
            431,
        ),
    ];
    for (what, head, status) in heads {
        let before = stored(&h.stack).await;
        let answer = raw(&h.stack.base, &head, body.as_bytes()).await;
        match &answer {
            Some(answer) => {
                assert_eq!(answer.status, status, "{what}");
                assert!(!answer.body.contains(MARK), "{what}: {}", answer.body);
            }
            None => assert!(head.len() > one_mb, "{what}: closed without an answer"),
        }
        assert_eq!(stored(&h.stack).await, before, "{what}: nothing stored");
        h.still_serving(&h.stack.base).await;
        let or_closed = if head.len() > one_mb { " (or the connection closed before it is read)" } else { "" };
        println!(
            "| {what} | raw HTTP/1.1 | a bare {status} from the HTTP parser{or_closed} | \
             `hostile_a_1_mb_token_too_many_headers_and_bytes_no_http_allows_are_refused_by_the_parser` |"
        );
    }
    h.stop().await;
}
