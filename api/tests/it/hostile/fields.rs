//! Hostile values in every string field of every JSON body and batch
//! line, and in every query parameter: a NUL (which PostgreSQL's `text`
//! cannot hold: it was a 500) and invalid UTF-8; unknown, misspelled and
//! mistyped fields and parameters. Each refusal names the field.

use clinflow_api::users::Role;
use serde_json::{Value, json};

use super::{Case, Expect, Hostile, MARK, Who};
use crate::common::PASSWORD;

/// A JSON endpoint: a body it takes (every string field filled) and the
/// JSON pointers of its string fields.
struct Endpoint {
    method: &'static str,
    path: String,
    who: Who,
    body: Value,
    strings: &'static [&'static str],
}

fn endpoints(h: &Hostile) -> Vec<Endpoint> {
    use Role::*;
    let uuid = "018f0000-0000-7000-8000-000000000000";
    let (user, team) = (h.user_id, h.team_id);
    let e = |method, path: &str, who, body, strings| Endpoint { method, path: path.to_owned(), who, body, strings };
    let login = json!({"username": "hostile-ingest", "password": PASSWORD});
    vec![
        e("POST", "/v1/auth/login", Who::Anonymous, login.clone(), &["/username", "/password"]),
        e("POST", "/v1/auth/session", Who::Anonymous, login, &["/username", "/password"]),
        e(
            "POST",
            "/v1/auth/password",
            Who::As(Clinician),
            json!({"current_password": PASSWORD, "new_password": "another long password"}),
            &["/current_password", "/new_password"],
        ),
        e("POST", "/v1/documents", Who::As(Ingest), upload(), UPLOAD_STRINGS),
        e("POST", "/v1/documents/status", Who::As(Ingest), json!({"ids": [uuid]}), &["/ids/0"]),
        e(
            "POST",
            "/v1/break-glass",
            Who::As(Clinician),
            json!({"patient_ref": "PAT-H", "reason": "emergency_care", "password": PASSWORD}),
            &["/patient_ref", "/reason", "/password"],
        ),
        e(
            "POST",
            "/v1/patients/documents",
            Who::As(Clinician),
            json!({"patient_ref": "PAT-H", "from": "2026-01-01", "until": "2026-02-01", "status": "done", "after": "x"}),
            &["/patient_ref", "/from", "/until", "/status", "/after"],
        ),
        e("POST", "/v1/patients/concepts", Who::As(Clinician), json!({"patient_ref": "PAT-H"}), &["/patient_ref"]),
        e(
            "POST",
            "/v1/patients/export",
            Who::As(PrivacyOfficer),
            json!({"patient_ref": "PAT-H", "reason": "gdpr_access_request", "case_ref": "DSAR-1"}),
            &["/patient_ref", "/reason", "/case_ref"],
        ),
        e(
            "POST",
            "/v1/privacy/erasures",
            Who::As(PrivacyOfficer),
            json!({"patient_ref": "PAT-H", "reason": "gdpr_erasure_request", "case_ref": "DSAR-1"}),
            &["/patient_ref", "/reason", "/case_ref"],
        ),
        e(
            "POST",
            "/v1/privacy/consents/withdraw",
            Who::As(PrivacyOfficer),
            json!({"consent_ref": "C-1", "case_ref": "DSAR-1"}),
            &["/consent_ref", "/case_ref"],
        ),
        e(
            "POST",
            "/v1/admin/users",
            Who::As(Admin),
            json!({"username": "h-new", "role": "clinician", "password": PASSWORD}),
            &["/username", "/role", "/password"],
        ),
        e("PATCH", &format!("/v1/admin/users/{user}"), Who::As(Admin), json!({"role": "ops"}), &["/role"]),
        e(
            "POST",
            &format!("/v1/admin/users/{user}/password"),
            Who::As(Admin),
            json!({"password": PASSWORD}),
            &["/password"],
        ),
        e(
            "POST",
            "/v1/admin/service-accounts",
            Who::As(Admin),
            json!({"username": "h-loader", "lawful_basis": "direct_care"}),
            &["/username", "/lawful_basis"],
        ),
        e("POST", &format!("/v1/admin/users/{user}/api-keys"), Who::As(Admin), json!({"label": "l"}), &["/label"]),
        e("POST", "/v1/admin/teams", Who::As(Admin), json!({"name": "ward 9"}), &["/name"]),
        e(
            "POST",
            &format!("/v1/admin/teams/{team}/patients"),
            Who::As(Admin),
            json!({"patient_ref": "PAT-H"}),
            &["/patient_ref"],
        ),
        e(
            "POST",
            &format!("/v1/admin/teams/{team}/patients/remove"),
            Who::As(Admin),
            json!({"patient_ref": "PAT-H"}),
            &["/patient_ref"],
        ),
        e("POST", "/v1/ops/dead-letters/replay", Who::As(Ops), json!({"ids": [uuid]}), &["/ids/0"]),
        e(
            "POST",
            "/v1/ops/reprocess",
            Who::As(Ops),
            json!({"uploaded_from": "2026-01-01", "uploaded_until": "2026-02-01", "without_result_from": "m"}),
            &["/uploaded_from", "/uploaded_until", "/without_result_from"],
        ),
        e("POST", "/v1/audit/disclosures", Who::As(Auditor), json!({"patient_ref": "PAT-H"}), &["/patient_ref"]),
    ]
}

const UPLOAD_STRINGS: &[&str] =
    &["/patient_ref", "/text", "/source_ref", "/document_date", "/care_team", "/lawful_basis", "/consent_ref"];

fn upload() -> Value {
    json!({
        "patient_ref": "PAT-H", "text": "Known AF.", "source_ref": "h-1", "document_date": "2026-01-02",
        "care_team": "ward 9", "lawful_basis": "research", "consent_ref": "C-1",
    })
}

/// `/ids/0` → `ids[0]`.
fn name_of(pointer: &str) -> String {
    pointer.trim_start_matches('/').split('/').fold(String::new(), |name, step| match step.parse::<usize>() {
        Ok(i) => format!("{name}[{i}]"),
        Err(_) if name.is_empty() => step.to_owned(),
        Err(_) => format!("{name}.{step}"),
    })
}

/// `body` serialised, the field at `pointer` replaced by `raw` (the bytes
/// of a JSON string literal, which may be no valid JSON at all).
fn spliced(body: &Value, pointer: &str, raw: &[u8]) -> Vec<u8> {
    const SPLICE: &str = "@@SPLICE@@";
    let mut body = body.clone();
    *body.pointer_mut(pointer).unwrap() = json!(SPLICE);
    let text = body.to_string();
    let at = text.find(&format!("\"{SPLICE}\"")).unwrap();
    let text = text.as_bytes();
    [&text[..at], raw, &text[at + SPLICE.len() + 2..]].concat()
}

/// The two hostile strings: (what, JSON literal, how it is refused).
fn hostile_strings(field: &str) -> [(String, Vec<u8>, &'static str, u16, String); 2] {
    [
        (
            format!("NUL in `{field}`"),
            format!("\"{MARK}\\u0000\"").into_bytes(),
            "invalid_body",
            422,
            format!("field `{field}` holds a NUL character"),
        ),
        (
            format!("invalid UTF-8 in `{field}`"),
            [b"\"", MARK.as_bytes(), b"\xff\xfe\"".as_slice()].concat(),
            "invalid_json",
            400,
            format!("field `{field}`"),
        ),
    ]
}

#[tokio::test]
async fn hostile_nul_and_invalid_utf8_in_every_string_field_are_refused_naming_the_field() {
    let h = Hostile::start().await;
    let mut cases = Vec::new();
    for e in endpoints(&h) {
        for pointer in e.strings {
            for (what, raw, code, status, names) in hostile_strings(&name_of(pointer)) {
                cases.push(
                    Case::new(what, e.method, e.path.clone(), e.who)
                        .json(spliced(&e.body, pointer, &raw))
                        .expect(Expect::error(status, code, &names)),
                );
            }
        }
    }
    // The same in a batch line: the line is rejected, naming the field.
    for pointer in UPLOAD_STRINGS {
        for (what, raw, code, _, names) in hostile_strings(&name_of(pointer)) {
            let mut line = spliced(&upload(), pointer, &raw);
            line.push(b'\n');
            cases.push(
                Case::new(format!("{what} of a batch line"), "POST", "/v1/documents/batch", Who::As(Role::Ingest))
                    .ndjson(line)
                    .expect(Expect::LineRejected { code, names: Some(names) }),
            );
        }
    }
    assert!(cases.len() >= 100, "{}", cases.len());
    h.run("hostile_nul_and_invalid_utf8_in_every_string_field_are_refused_naming_the_field", cases, false).await;
    h.stop().await;
}

/// The first field of `body` misspelled: its last two letters swapped.
fn misspelled(field: &str) -> String {
    let mut chars: Vec<char> = field.chars().collect();
    let n = chars.len();
    chars.swap(n - 1, n - 2);
    chars.into_iter().collect()
}

#[tokio::test]
async fn hostile_unknown_misspelled_and_mistyped_fields_are_refused_naming_the_field() {
    let h = Hostile::start().await;
    let mut cases = Vec::new();
    let mut batch = vec![];
    for e in endpoints(&h).into_iter().chain(std::iter::once(Endpoint {
        method: "POST",
        path: "/v1/documents/batch".into(),
        who: Who::As(Role::Ingest),
        body: upload(),
        strings: UPLOAD_STRINGS,
    })) {
        let first = &e.strings[0][1..];
        let first = first.split('/').next().unwrap();
        let object = e.body.as_object().unwrap();
        let with = |change: &dyn Fn(&mut serde_json::Map<String, Value>)| {
            let mut body = object.clone();
            change(&mut body);
            Value::Object(body)
        };
        let wrong = misspelled(first);
        let variants: [(String, Value, String); 4] = [
            (
                "an unknown field".into(),
                with(&|b| {
                    b.insert("hostile_extra".into(), json!(MARK));
                }),
                "unknown field `hostile_extra`".into(),
            ),
            (
                format!("`{first}` misspelled `{wrong}`"),
                with(&|b| {
                    let value = b.remove(first).unwrap();
                    b.insert(misspelled(first), value);
                }),
                format!("unknown field `{wrong}`"),
            ),
            (
                "an unknown field whose name is free text".into(),
                with(&|b| {
                    b.insert(format!("{MARK} Smith"), json!(1));
                }),
                "an unknown field, expected".into(),
            ),
            (
                format!("a number in the string field `{first}`"),
                with(&|b| {
                    b.insert(first.to_owned(), json!(4_242_424_242_u64));
                }),
                format!("field `{first}` has the wrong type: expected"),
            ),
        ];
        for (what, body, names) in variants {
            let body = body.to_string();
            assert!(!names.contains("4242424242"));
            if e.path == "/v1/documents/batch" {
                batch.push(
                    Case::new(format!("{what} in a batch line"), "POST", e.path.clone(), e.who)
                        .ndjson(format!("{body}\n").into_bytes())
                        .expect(Expect::LineRejected { code: "invalid_body", names: Some(names) }),
                );
            } else {
                // serde_json reads an enum (`role`) only from a string or an
                // object: a number there is a syntax fault, still named.
                let expect = if names.starts_with("field `role` has the wrong type") {
                    Expect::error(400, "invalid_json", "expected value (field `role`")
                } else {
                    Expect::error(422, "invalid_body", &names)
                };
                cases.push(Case::new(what, e.method, e.path.clone(), e.who).json(body.into_bytes()).expect(expect));
            }
        }
    }
    cases.extend(batch);
    h.run("hostile_unknown_misspelled_and_mistyped_fields_are_refused_naming_the_field", cases, false).await;
    h.stop().await;
}

/// Parameters and a value of each.
type Params = Vec<(&'static str, &'static str)>;

/// A query endpoint: its path and every parameter it takes, with a value.
fn query_endpoints() -> Vec<(String, Who, Params)> {
    let document = "/v1/documents/018f0000-0000-7000-8000-000000000000".to_owned();
    vec![
        (
            "/v1/audit/events".into(),
            Who::As(Role::Auditor),
            vec![
                ("actor", "a"),
                ("actor_id", "018f0000-0000-7000-8000-000000000000"),
                ("action", "auth.login"),
                ("resource_kind", "document"),
                ("resource_id", "x"),
                ("outcome", "success"),
                ("from", "2026-01-01T00:00:00Z"),
                ("until", "2026-01-02T00:00:00Z"),
                ("after", "0"),
                ("limit", "10"),
            ],
        ),
        ("/v1/concepts/C0011849/patients".into(), Who::As(Role::Clinician), vec![("after", "00"), ("limit", "10")]),
        ("/v1/concepts/C0011849/documents".into(), Who::As(Role::Clinician), vec![("after", "00"), ("limit", "10")]),
        (document, Who::As(Role::Clinician), vec![("include", "text")]),
    ]
}

#[tokio::test]
async fn hostile_query_parameters_are_refused_naming_the_parameter() {
    let h = Hostile::start().await;
    let mut cases = Vec::new();
    for (path, who, params) in query_endpoints() {
        let query = |change: &dyn Fn(&str, &str) -> String| {
            params.iter().map(|(k, v)| change(k, v)).collect::<Vec<_>>().join("&")
        };
        for (param, _) in &params {
            for (what, value, names) in [
                ("NUL", format!("{MARK}%00"), format!("parameter `{param}` holds a NUL character")),
                ("invalid UTF-8", format!("{MARK}%FF%FE"), format!("parameter `{param}` is not valid UTF-8")),
            ] {
                let q = query(&|k, v| if k == *param { format!("{k}={value}") } else { format!("{k}={v}") });
                cases.push(
                    Case::new(format!("{what} in the parameter `{param}`"), "GET", format!("{path}?{q}"), who)
                        .expect(Expect::error(400, "invalid_query", &names)),
                );
            }
        }
        let all = query(&|k, v| format!("{k}={v}"));
        let (first, _) = params[0];
        let wrong = misspelled(first);
        cases.push(
            Case::new("an unknown parameter", "GET", format!("{path}?{all}&hostile_extra={MARK}"), who)
                .expect(Expect::error(400, "invalid_query", "unknown parameter `hostile_extra`")),
        );
        cases.push(
            Case::new(format!("`{first}` misspelled `{wrong}`"), "GET", format!("{path}?{wrong}={MARK}"), who)
                .expect(Expect::error(400, "invalid_query", &format!("unknown parameter `{wrong}`"))),
        );
        if params.iter().any(|(k, _)| *k == "limit") {
            cases.push(
                Case::new("text in the number parameter `limit`", "GET", format!("{path}?limit={MARK}"), who)
                    .expect(Expect::error(400, "invalid_query", "parameter `limit` is not valid")),
            );
        }
    }
    cases.push(
        Case::new("NUL in a parameter's name", "GET", format!("/v1/audit/events?{MARK}%00=1"), Who::As(Role::Auditor))
            .expect(Expect::error(400, "invalid_query", "a parameter's name holds a NUL character")),
    );
    h.run("hostile_query_parameters_are_refused_naming_the_parameter", cases, false).await;
    h.stop().await;
}
