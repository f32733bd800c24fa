//! Identity and access against the real database: forged tokens, ended
//! sessions, lockout, per-address throttling, the role matrix, care-team
//! scope, break-glass, administration and API keys.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use clinflow_api::access::{self, Access};
use clinflow_api::auth::LockoutPolicy;
use clinflow_api::users::Role;
use serde_json::{Value, json};

use crate::common::{AccessOptions, PASSWORD, Stack, audit_summary, wait_for_all_done, wait_until};

const JWT_SECRET: &[u8] = b"test jwt secret that is long enough!!";
const ROLES: [Role; 6] = [Role::Admin, Role::Clinician, Role::Ingest, Role::Ops, Role::Auditor, Role::PrivacyOfficer];

fn role_name(role: Role) -> &'static str {
    role.as_str()
}

/// The claims of a real token (sub, jti of a live session).
fn claims_of(token: &str) -> Value {
    let payload = token.split('.').nth(1).unwrap();
    serde_json::from_slice(&B64.decode(payload).unwrap()).unwrap()
}

fn sign(header: &Value, claims: &Value, alg: jsonwebtoken::Algorithm) -> String {
    use hmac::{Hmac, Mac};
    let signing_input = format!("{}.{}", B64.encode(header.to_string()), B64.encode(claims.to_string()));
    let signature = match alg {
        jsonwebtoken::Algorithm::HS256 => {
            let mut mac = <Hmac<sha2::Sha256> as hmac::KeyInit>::new_from_slice(JWT_SECRET).unwrap();
            mac.update(signing_input.as_bytes());
            mac.finalize().into_bytes().to_vec()
        }
        jsonwebtoken::Algorithm::HS384 => {
            let mut mac = <Hmac<sha2::Sha384> as hmac::KeyInit>::new_from_slice(JWT_SECRET).unwrap();
            mac.update(signing_input.as_bytes());
            mac.finalize().into_bytes().to_vec()
        }
        jsonwebtoken::Algorithm::HS512 => {
            let mut mac = <Hmac<sha2::Sha512> as hmac::KeyInit>::new_from_slice(JWT_SECRET).unwrap();
            mac.update(signing_input.as_bytes());
            mac.finalize().into_bytes().to_vec()
        }
        _ => unreachable!(),
    };
    format!("{signing_input}.{}", B64.encode(signature))
}

async fn status_with_raw_header(stack: &Stack, path: &str, value: &[u8]) -> u16 {
    let value = reqwest::header::HeaderValue::from_bytes(value).unwrap();
    let resp = stack.http.get(format!("{}{path}", stack.base)).header("authorization", value).send().await.unwrap();
    resp.status().as_u16()
}

#[tokio::test]
async fn forged_and_broken_tokens_are_refused() {
    let stack = Stack::start().await;
    stack.user("ing", Role::Ingest).await;
    let token = stack.login("ing").await;
    let path = "/v1/documents/status";
    let ask = async |t: &str| stack.post(path, Some(t), &json!({"ids": []})).await.0;
    assert_eq!(ask(&token).await, 200, "the real token works");

    let claims = claims_of(&token);
    let hs256 = json!({"alg": "HS256", "typ": "JWT"});
    // Control: the same claims re-signed here are accepted, so each refusal
    // below is due to the one thing changed.
    assert_eq!(ask(&sign(&hs256, &claims, jsonwebtoken::Algorithm::HS256)).await, 200, "re-signed control");

    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let with = |key: &str, value: Value| {
        let mut c = claims.clone();
        c[key] = value;
        c
    };
    let without = |key: &str| {
        let mut c = claims.clone();
        c.as_object_mut().unwrap().remove(key);
        c
    };
    let unsigned = format!("{}.{}.", B64.encode(r#"{"alg":"none","typ":"JWT"}"#), B64.encode(claims.to_string()));
    let rs256_header = sign(&json!({"alg": "RS256", "typ": "JWT"}), &claims, jsonwebtoken::Algorithm::HS256);
    let mut bad_signature = sign(&hs256, &claims, jsonwebtoken::Algorithm::HS256);
    let last = bad_signature.pop().unwrap();
    bad_signature.push(if last == 'A' { 'B' } else { 'A' });
    let cases: Vec<(&str, String)> = vec![
        ("alg none", unsigned),
        ("HS384", sign(&json!({"alg": "HS384", "typ": "JWT"}), &claims, jsonwebtoken::Algorithm::HS384)),
        ("HS512", sign(&json!({"alg": "HS512", "typ": "JWT"}), &claims, jsonwebtoken::Algorithm::HS512)),
        ("RS256 header, HMAC signature", rs256_header),
        ("string exp", sign(&hs256, &with("exp", json!((now + 3600).to_string())), jsonwebtoken::Algorithm::HS256)),
        ("no iss", sign(&hs256, &without("iss"), jsonwebtoken::Algorithm::HS256)),
        ("wrong iss", sign(&hs256, &with("iss", json!("someone-else")), jsonwebtoken::Algorithm::HS256)),
        ("no aud", sign(&hs256, &without("aud"), jsonwebtoken::Algorithm::HS256)),
        ("wrong aud", sign(&hs256, &with("aud", json!("another-api")), jsonwebtoken::Algorithm::HS256)),
        ("expired", sign(&hs256, &with("exp", json!(now - 3600)), jsonwebtoken::Algorithm::HS256)),
        ("not yet valid", sign(&hs256, &with("nbf", json!(now + 3600)), jsonwebtoken::Algorithm::HS256)),
        ("bad signature", bad_signature),
        ("truncated", token[..token.len() - 10].to_owned()),
        ("oversized", format!("{token}{}", "A".repeat(6_000))),
        ("unknown session", sign(&hs256, &with("jti", json!(uuid::Uuid::now_v7())), jsonwebtoken::Algorithm::HS256)),
        ("api key shape, unknown", format!("cfk_{}_{}", uuid::Uuid::now_v7().simple(), "0".repeat(64))),
        ("api key shape, garbage", "cfk_garbage".to_owned()),
    ];
    let mut observed = Vec::new();
    for (name, forged) in &cases {
        let status = ask(forged).await;
        observed.push(format!("{name}: {status}"));
        assert_eq!(status, 401, "{name}");
    }
    // Not UTF-8, not a bearer token at all.
    let mut raw = b"Bearer ".to_vec();
    raw.extend_from_slice(&[0xff, 0xfe, 0x80, b'a']);
    assert_eq!(status_with_raw_header(&stack, "/v1/documents/018f0000-0000-7000-8000-000000000000", &raw).await, 401);
    assert_eq!(
        status_with_raw_header(&stack, "/v1/documents/018f0000-0000-7000-8000-000000000000", b"Basic Zm9v").await,
        401
    );
    println!("forged tokens: {}", observed.join("; "));
    stack.stop().await;
}

#[tokio::test]
async fn lockout_engages_at_the_threshold_grows_and_releases_and_unknown_users_look_the_same() {
    let lockout = LockoutPolicy {
        threshold: 3,
        window: Duration::from_secs(600),
        base: Duration::from_secs(2),
        max: Duration::from_secs(60),
    };
    let stack = Stack::start_with_access(AccessOptions { lockout, ..AccessOptions::default() }).await;
    stack.user("clin", Role::Clinician).await;
    let attempt = async |user: &str, password: &str| {
        let started = Instant::now();
        let (status, body) = stack.post("/v1/auth/login", None, &json!({"username": user, "password": password})).await;
        (status, body, started.elapsed())
    };
    let (_, unknown_body, _) = attempt("nobody", "wrong password!").await;
    for _ in 0..3 {
        let (status, body, _) = attempt("clin", "wrong password!").await;
        assert_eq!((status, &body), (401, &unknown_body), "a wrong password looks like an unknown user");
    }
    // Locked: the right password is refused, with the very same answer.
    let (status, body, _) = attempt("clin", PASSWORD).await;
    assert_eq!((status, &body), (401, &unknown_body));
    let locks: (i32, bool) = sqlx::query_as("SELECT lockouts, locked_until > now() FROM users WHERE username = 'clin'")
        .fetch_one(&stack.db.owner)
        .await
        .unwrap();
    assert_eq!(locks, (1, true));

    // Released after its period (2 s): wait on the condition, not a sleep.
    wait_until("the lock released", Duration::from_secs(15), async || {
        sqlx::query_scalar::<_, bool>("SELECT locked_until <= now() FROM users WHERE username = 'clin'")
            .fetch_one(&stack.db.owner)
            .await
            .unwrap()
    })
    .await;
    // Three more failures without a success in between: twice as long.
    for _ in 0..3 {
        assert_eq!(attempt("clin", "wrong password!").await.0, 401);
    }
    let (lockouts, seconds): (i32, f64) = sqlx::query_as(
        "SELECT lockouts, extract(epoch FROM locked_until - now())::float8 FROM users WHERE username = 'clin'",
    )
    .fetch_one(&stack.db.owner)
    .await
    .unwrap();
    assert_eq!(lockouts, 2);
    assert!(seconds > 2.5 && seconds <= 4.0, "second lock lasts 4 s, {seconds} s left");
    wait_until("the second lock released", Duration::from_secs(20), async || attempt("clin", PASSWORD).await.0 == 200)
        .await;
    let lockouts: i32 = sqlx::query_scalar("SELECT lockouts FROM users WHERE username = 'clin'")
        .fetch_one(&stack.db.owner)
        .await
        .unwrap();
    assert_eq!(lockouts, 0, "a successful login resets the growth");

    // Comparable time: an unknown user costs a password check too (the
    // median of 5 at least half the known user's; without the dummy check
    // it is a database round trip, ~50x less).
    let mut known = Vec::new();
    let mut unknown = Vec::new();
    for _ in 0..5 {
        known.push(attempt("clin", "wrong password!").await.2);
        unknown.push(attempt("nobody-else", "wrong password!").await.2);
        sqlx::query("UPDATE users SET failed_logins = 0, locked_until = NULL WHERE username = 'clin'")
            .execute(&stack.db.owner)
            .await
            .unwrap();
    }
    known.sort();
    unknown.sort();
    println!("login refusal medians: known {:?}, unknown {:?}", known[2], unknown[2]);
    assert!(
        unknown[2] * 2 >= known[2] && known[2] * 2 >= unknown[2],
        "known {:?} vs unknown {:?}",
        known[2],
        unknown[2]
    );

    stack.wait_for_audit_rows(1).await;
    wait_until("lockouts audited", Duration::from_secs(30), async || {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM audit_events WHERE action = 'auth.lockout'")
            .fetch_one(&stack.db.owner)
            .await
            .unwrap()
            >= 2
    })
    .await;
    let locked_refusals: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_events WHERE action = 'auth.login' AND reason = 'locked' AND actor_name = 'clin'",
    )
    .fetch_one(&stack.db.owner)
    .await
    .unwrap();
    assert!(locked_refusals >= 1);
    stack.stop().await;
}

#[tokio::test]
async fn concurrent_guesses_cannot_pass_the_threshold() {
    let stack = Stack::start().await; // threshold 5
    stack.user("clin", Role::Clinician).await;
    let guesses = (0..20).map(|i| {
        let body = json!({"username": "clin", "password": format!("wrong password {i}")});
        let req = stack.http.post(format!("{}/v1/auth/login", stack.base)).json(&body);
        async move { req.send().await.unwrap().status().as_u16() }
    });
    let statuses = futures_util::future::join_all(guesses).await;
    assert!(statuses.iter().all(|s| *s == 401), "{statuses:?}");
    assert_eq!(stack.post("/v1/auth/login", None, &json!({"username": "clin", "password": PASSWORD})).await.0, 401);
    // Exactly `threshold` guesses had their password checked; the rest
    // were refused as locked without one.
    wait_until("21 login failures audited", Duration::from_secs(30), async || {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM audit_events WHERE action = 'auth.login'")
            .fetch_one(&stack.db.owner)
            .await
            .unwrap()
            == 21
    })
    .await;
    let checked: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_events WHERE action = 'auth.login' AND reason = 'bad_credentials'",
    )
    .fetch_one(&stack.db.owner)
    .await
    .unwrap();
    assert_eq!(checked, 5);
    stack.stop().await;
}

#[tokio::test]
async fn logins_are_rate_limited_per_source_address() {
    let stack = Stack::start_with_access(AccessOptions { logins_per_minute: 5, ..AccessOptions::default() }).await;
    for i in 0..5 {
        let (status, _) =
            stack.post("/v1/auth/login", None, &json!({"username": format!("u{i}"), "password": "x"})).await;
        assert_eq!(status, 401);
    }
    let resp = stack
        .http
        .post(format!("{}/v1/auth/login", stack.base))
        .json(&json!({"username": "u9", "password": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 429);
    let retry_after: u64 = resp.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "too_many_logins");
    stack.stop().await;
}

/// The matrix of docs/access-control.md: (method, path) → allowed roles, or
/// None for public.
fn documented_matrix() -> BTreeSet<(String, String, Option<BTreeSet<String>>)> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/access-control.md")).unwrap();
    let table = doc.split("## Matrix").nth(1).unwrap().split("\n## ").next().unwrap();
    table
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| Method"))
        .map(|l| {
            let cells: Vec<&str> = l.trim_matches('|').split('|').map(str::trim).collect();
            let allowed = match cells[2] {
                "public" => None,
                roles => Some(roles.split(',').map(|r| r.trim().to_owned()).collect()),
            };
            (cells[0].to_owned(), cells[1].to_owned(), allowed)
        })
        .collect()
}

#[tokio::test]
async fn the_role_matrix_is_this_document_and_the_router_enforces_it() {
    // The declarations, as the router is built from them.
    let declared: BTreeSet<_> = access::endpoints()
        .iter()
        .map(|e| {
            let allowed = match e.access {
                Access::Public => None,
                Access::Roles { roles, .. } => Some(roles.iter().map(|r| r.as_str().to_owned()).collect()),
            };
            (e.method.to_string(), e.path.to_owned(), allowed)
        })
        .collect();
    let documented = documented_matrix();
    assert_eq!(declared, documented, "docs/access-control.md and the code disagree");

    let stack = Stack::start().await;
    for role in ROLES {
        stack.user(role_name(role), role).await;
    }
    let mut tokens = std::collections::HashMap::new();
    for role in ROLES {
        tokens.insert(role_name(role), stack.login(role_name(role)).await);
    }
    let mut calls = 0;
    for (method, path, allowed) in &documented {
        let concrete = path
            .replace("{id}", &uuid::Uuid::now_v7().to_string())
            .replace("{user_id}", &uuid::Uuid::now_v7().to_string());
        let body = (method != "GET" && method != "DELETE").then(|| json!({}));
        // No credentials: 401 unless public.
        let (status, _) = stack.call(method, &concrete, None, body.as_ref()).await;
        match allowed {
            None => assert!(status != 401 && status != 403, "{method} {path} anonymous: {status}"),
            Some(_) => assert_eq!(status, 401, "{method} {path} anonymous"),
        }
        for role in ROLES {
            let name = role_name(role);
            let (status, answer) = stack.call(method, &concrete, Some(&tokens[name]), body.as_ref()).await;
            calls += 1;
            let may = allowed.as_ref().is_none_or(|roles| roles.contains(name));
            if may {
                // Let through by the guard: a 403 here can only be the
                // care-team scope of a handler (a random patient).
                let scope = status == 403 && answer["error"]["code"] == "out_of_scope";
                assert!(status != 401 && (status != 403 || scope), "{method} {path} as {name}: {status} {answer}");
            } else {
                assert_eq!(status, 403, "{method} {path} as {name}");
            }
            if path == "/v1/auth/logout" && may {
                tokens.insert(name, stack.login(name).await);
            }
        }
    }
    assert_eq!(calls, documented.len() * ROLES.len());
    // A path no route declares is 404 for everyone, authenticated or not.
    assert_eq!(stack.get("/v1/nowhere", Some(&tokens["admin"])).await.0, 404);
    assert_eq!(stack.get("/v1/nowhere", None).await.0, 404);
    stack.stop().await;
}

async fn upload(stack: &Stack, token: &str, patient: &str, team: Option<&str>) -> (u16, Value) {
    let mut doc = json!({"patient_ref": patient, "text": "Known AF, started apixaban."});
    if let Some(team) = team {
        doc["care_team"] = json!(team);
    }
    stack.post("/v1/documents", Some(token), &doc).await
}

#[tokio::test]
async fn clinicians_read_their_teams_patients_and_break_the_glass_for_others() {
    let stack = Stack::start().await;
    let loader_id = stack.user("loader", Role::Ingest).await;
    stack.user("admin", Role::Admin).await;
    let doctor_id = stack.user("doctor", Role::Clinician).await;
    stack.user("other", Role::Clinician).await;
    let (loader, admin) = (stack.login("loader").await, stack.login("admin").await);

    // The admin makes a team with the doctor in it; an upload names it.
    let (status, team) = stack.post("/v1/admin/teams", Some(&admin), &json!({"name": "ward 7"})).await;
    assert_eq!(status, 201, "{team}");
    let team = team["id"].as_str().unwrap().to_owned();
    assert_eq!(
        stack.call("PUT", &format!("/v1/admin/teams/{team}/members/{doctor_id}"), Some(&admin), None).await.0,
        204
    );
    // The loader may put patients only in teams it is bound to.
    let (status, body) = upload(&stack, &loader, "PAT-IN", Some("ward 7")).await;
    assert_eq!((status, body["error"]["code"].as_str()), (403, Some("care_team_not_bound")), "{body}");
    assert_eq!(
        stack.call("PUT", &format!("/v1/admin/teams/{team}/members/{loader_id}"), Some(&admin), None).await.0,
        204
    );
    let (status, body) = upload(&stack, &loader, "PAT-IN", Some("ward 7")).await;
    assert_eq!(status, 202, "{body}");
    let inside = body["id"].as_str().unwrap().to_owned();
    let (status, body) = upload(&stack, &loader, "PAT-OUT", None).await;
    assert_eq!(status, 202, "{body}");
    let outside = body["id"].as_str().unwrap().to_owned();
    let (status, body) = upload(&stack, &loader, "PAT-X", Some("no such team")).await;
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("unknown_care_team")));
    wait_for_all_done(&stack, &[inside.clone(), outside.clone()]).await;

    let doctor = stack.login("doctor").await;
    let other = stack.login("other").await;
    // A clinician may not name a team (it would widen their own scope).
    let (status, body) = upload(&stack, &doctor, "PAT-OUT", Some("ward 7")).await;
    assert_eq!((status, body["error"]["code"].as_str()), (403, Some("care_team_forbidden")));

    let read = async |token: &str, id: &str| stack.get(&format!("/v1/documents/{id}"), Some(token)).await;
    let (status, body) = read(&doctor, &inside).await;
    assert_eq!((status, body["patient_ref"].as_str()), (200, Some("PAT-IN")));
    assert_eq!(read(&doctor, &outside).await.0, 403, "outside the doctor's teams");
    assert_eq!(read(&other, &inside).await.0, 403, "not in the team");

    // The admin adds the patient to the team by reference, then removes it.
    let patients = format!("/v1/admin/teams/{team}/patients");
    assert_eq!(stack.post(&patients, Some(&admin), &json!({"patient_ref": "PAT-OUT"})).await.0, 204);
    assert_eq!(read(&doctor, &outside).await.0, 200);
    assert_eq!(
        stack.post(&format!("{patients}/remove"), Some(&admin), &json!({"patient_ref": "PAT-OUT"})).await.0,
        204
    );
    assert_eq!(read(&doctor, &outside).await.0, 403);
    // Admin reads no PHI.
    assert_eq!(read(&admin, &inside).await.0, 403);

    // Break-glass: the reason and the password again.
    let glass =
        |reason: &str, password: &str| json!({"patient_ref": "PAT-OUT", "reason": reason, "password": password});
    let (status, body) = stack.post("/v1/break-glass", Some(&doctor), &glass("urgent", PASSWORD)).await;
    assert_eq!((status, body["error"]["code"].as_str()), (422, Some("invalid_reason")));
    let (status, body) = stack
        .post("/v1/break-glass", Some(&doctor), &glass("unconscious in ED, no team on call", "not my password"))
        .await;
    assert_eq!((status, body["error"]["code"].as_str()), (403, Some("wrong_password")));
    assert_eq!(read(&doctor, &outside).await.0, 403);
    let (status, grant) =
        stack.post("/v1/break-glass", Some(&doctor), &glass("unconscious in ED, no team on call", PASSWORD)).await;
    assert_eq!(status, 201, "{grant}");
    let grant_id = grant["id"].as_str().unwrap().to_owned();
    let expires = time::OffsetDateTime::parse(
        grant["expires_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let minutes = (expires - time::OffsetDateTime::now_utc()).whole_minutes();
    assert!((58..=60).contains(&minutes), "{minutes}");
    let (status, body) = read(&doctor, &outside).await;
    assert_eq!((status, body["patient_ref"].as_str()), (200, Some("PAT-OUT")));
    assert_eq!(read(&other, &outside).await.0, 403, "a grant is the doctor's only");

    // The admin reviews grants, with the reason given.
    let (status, grants) = stack.get("/v1/admin/break-glass", Some(&admin)).await;
    assert_eq!(status, 200);
    assert_eq!(grants[0]["id"], grant_id.as_str());
    assert_eq!(grants[0]["username"], "doctor");
    assert_eq!(grants[0]["reason"], "unconscious in ED, no team on call");
    assert_eq!(grants[0]["active"], true);
    assert!(grants[0].get("patient_ref").is_none());

    // Expiry: the grant's clock moved past its end.
    sqlx::query("UPDATE break_glass_grants SET expires_at = now() - interval '1 second'")
        .execute(&stack.db.owner)
        .await
        .unwrap();
    assert_eq!(read(&doctor, &outside).await.0, 403, "expired grant");

    // The trail: reads under the grant marked, refusals as out of scope.
    wait_until("break-glass audited", Duration::from_secs(30), async || {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_events WHERE reason = $1")
            .bind(format!("break_glass:{grant_id}"))
            .fetch_one(&stack.db.owner)
            .await
            .unwrap();
        n == 1
    })
    .await;
    wait_until("refusals audited", Duration::from_secs(30), async || {
        let rows: Vec<(String, String, String)> = audit_summary(&stack.db.owner).await;
        let denied = rows.iter().filter(|r| r.0 == "document.read" && r.1 == "denied").count();
        let glass = rows.iter().filter(|r| r.0 == "auth.break_glass").count();
        denied == 7 && glass == 2
    })
    .await;
    let out_of_scope: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_events WHERE action = 'document.read' AND reason = 'out_of_scope'",
    )
    .fetch_one(&stack.db.owner)
    .await
    .unwrap();
    assert_eq!(out_of_scope, 6, "7 refused reads: 6 out of scope, the admin's for its role");
    stack.stop().await;
}

#[tokio::test]
async fn admins_manage_users_sessions_and_api_keys_and_each_change_takes_effect_at_once() {
    let stack = Stack::start().await;
    stack.user("admin", Role::Admin).await;
    let admin = stack.login("admin").await;

    // Create a user; log in; change the role; disable; enable; reset.
    let (status, body) = stack
        .post("/v1/admin/users", Some(&admin), &json!({"username": "nurse", "role": "clinician", "password": PASSWORD}))
        .await;
    assert_eq!(status, 201, "{body}");
    let nurse = body["id"].as_str().unwrap().to_owned();
    let (status, body) = stack
        .post("/v1/admin/users", Some(&admin), &json!({"username": "nurse", "role": "clinician", "password": PASSWORD}))
        .await;
    assert_eq!((status, body["error"]["code"].as_str()), (409, Some("user_exists")));
    let (status, body) = stack
        .post("/v1/admin/users", Some(&admin), &json!({"username": "weak", "role": "ops", "password": "short"}))
        .await;
    assert_eq!((status, body["error"]["code"].as_str()), (422, Some("weak_password")));

    // The admin's password is one-time (privacy.rs tests that at length):
    // refused until replaced, then the nurse's own.
    let token = stack.login("nurse").await;
    let status_ask = async |t: &str| stack.post("/v1/documents/status", Some(t), &json!({"ids": []})).await.0;
    assert_eq!(status_ask(&token).await, 403);
    let own = json!({"current_password": PASSWORD, "new_password": "the nurse's own password"});
    assert_eq!(stack.post("/v1/auth/password", Some(&token), &own).await.0, 204);
    // (Set back to the tests' password, straight in the database, for the
    // logins below.)
    sqlx::query("UPDATE users SET password_hash = (SELECT password_hash FROM users WHERE username = 'admin') WHERE username = 'nurse'")
        .execute(&stack.db.owner)
        .await
        .unwrap();
    assert_eq!(status_ask(&token).await, 200);
    let user_path = format!("/v1/admin/users/{nurse}");
    assert_eq!(stack.call("PATCH", &user_path, Some(&admin), Some(&json!({"role": "auditor"}))).await.0, 204);
    assert_eq!(status_ask(&token).await, 403, "the new role applies to the live session");
    assert_eq!(stack.call("PATCH", &user_path, Some(&admin), Some(&json!({"role": "clinician"}))).await.0, 204);

    // Sessions: listed, then force logout ends them on the next request.
    let second = stack.login("nurse").await;
    let (status, sessions) = stack.get(&format!("{user_path}/sessions"), Some(&admin)).await;
    assert_eq!((status, sessions.as_array().map(Vec::len)), (200, Some(2)));
    let (status, revoked) = stack.call("DELETE", &format!("{user_path}/sessions"), Some(&admin), None).await;
    assert_eq!((status, revoked["revoked"].as_u64()), (200, Some(2)));
    assert_eq!(status_ask(&token).await, 401, "after force logout");
    assert_eq!(status_ask(&second).await, 401, "after force logout");

    // Disabled: the live session ends and no login works; enabled again.
    let token = stack.login("nurse").await;
    assert_eq!(stack.call("PATCH", &user_path, Some(&admin), Some(&json!({"disabled": true}))).await.0, 204);
    assert_eq!(status_ask(&token).await, 401, "disabled user");
    let login = json!({"username": "nurse", "password": PASSWORD});
    assert_eq!(stack.post("/v1/auth/login", None, &login).await.0, 401);
    assert_eq!(stack.call("PATCH", &user_path, Some(&admin), Some(&json!({"disabled": false}))).await.0, 204);
    let token = stack.login("nurse").await;

    // Password reset: sessions end, the old password stops working.
    let new_password = json!({"password": "a brand new long password"});
    assert_eq!(stack.post(&format!("{user_path}/password"), Some(&admin), &new_password).await.0, 204);
    assert_eq!(status_ask(&token).await, 401);
    assert_eq!(stack.post("/v1/auth/login", None, &login).await.0, 401);
    let login = json!({"username": "nurse", "password": "a brand new long password"});
    assert_eq!(stack.post("/v1/auth/login", None, &login).await.0, 200);

    // An admin cannot lock themselves out.
    let admin_id: uuid::Uuid =
        sqlx::query_scalar("SELECT id FROM users WHERE username = 'admin'").fetch_one(&stack.db.owner).await.unwrap();
    let (status, body) = stack
        .call("PATCH", &format!("/v1/admin/users/{admin_id}"), Some(&admin), Some(&json!({"disabled": true})))
        .await;
    assert_eq!((status, body["error"]["code"].as_str()), (403, Some("own_account")));

    // Service account and API key: shown once, stored hashed, works for
    // uploads, last use recorded, revocable; no password login.
    let (status, body) =
        stack.post("/v1/admin/service-accounts", Some(&admin), &json!({"username": "etl-loader"})).await;
    assert_eq!(status, 201, "{body}");
    let service = body["id"].as_str().unwrap().to_owned();
    let (status, body) = stack.post(&format!("/v1/admin/users/{nurse}/api-keys"), Some(&admin), &json!({})).await;
    assert_eq!((status, body["error"]["code"].as_str()), (409, Some("not_a_service_account")));
    let (status, key) = stack
        .post(&format!("/v1/admin/users/{service}/api-keys"), Some(&admin), &json!({"label": "nightly etl"}))
        .await;
    assert_eq!(status, 201, "{key}");
    let (key_id, key) = (key["id"].as_str().unwrap().to_owned(), key["key"].as_str().unwrap().to_owned());
    assert!(key.starts_with("cfk_"));
    let stored: Vec<u8> =
        sqlx::query_scalar("SELECT secret_hash FROM api_keys").fetch_one(&stack.db.owner).await.unwrap();
    let secret = key.rsplit('_').next().unwrap();
    assert!(!stored.windows(16).any(|w| secret.as_bytes().windows(16).any(|s| s == w)), "only a hash is stored");
    let (status, up) = upload(&stack, &key, "PAT-K", None).await;
    assert_eq!(status, 202, "{up}");
    assert_eq!(status_ask(&key).await, 200);
    assert_eq!(stack.get(&format!("/v1/documents/{}", up["id"].as_str().unwrap()), Some(&key)).await.0, 403);
    let (status, keys) = stack.get(&format!("/v1/admin/users/{service}/api-keys"), Some(&admin)).await;
    assert_eq!(status, 200);
    assert_eq!(keys[0]["label"], "nightly etl");
    assert!(keys[0]["last_used_at"].is_string(), "{keys}");
    assert!(keys[0].get("key").is_none() && keys[0].get("secret_hash").is_none());
    let service_login = json!({"username": "etl-loader", "password": "!"});
    assert_eq!(stack.post("/v1/auth/login", None, &service_login).await.0, 401);
    let mut wrong = key.clone();
    wrong.pop();
    wrong.push('x');
    assert_eq!(status_ask(&wrong).await, 401, "a key with a wrong secret");
    assert_eq!(stack.call("DELETE", &format!("/v1/admin/api-keys/{key_id}"), Some(&admin), None).await.0, 204);
    assert_eq!(status_ask(&key).await, 401, "revoked key");

    // Every change is on the audit trail.
    wait_until("admin actions audited", Duration::from_secs(30), async || {
        let rows = audit_summary(&stack.db.owner).await;
        let users = rows.iter().filter(|r| r.0 == "admin.user").count();
        let keys = rows.iter().filter(|r| r.0 == "admin.api_key").count();
        let revokes = rows.iter().filter(|r| r.0 == "admin.sessions.revoke").count();
        users == 7 && keys == 2 && revokes == 1
    })
    .await;
    stack.stop().await;
}

#[tokio::test]
async fn a_hash_with_older_parameters_is_replaced_at_the_next_login() {
    use argon2::password_hash::PasswordHasher;
    let stack = Stack::start().await;
    let weak = argon2::Argon2::new(
        argon2::Algorithm::Argon2id,
        argon2::Version::V0x13,
        argon2::Params::new(8192, 1, 1, None).unwrap(),
    )
    .hash_password(PASSWORD.as_bytes())
    .unwrap()
    .to_string();
    sqlx::query("INSERT INTO users (id, username, password_hash, role) VALUES ($1, 'old', $2, 'ops')")
        .bind(uuid::Uuid::now_v7())
        .bind(&weak)
        .execute(&stack.db.owner)
        .await
        .unwrap();
    stack.login("old").await;
    let stored: String = sqlx::query_scalar("SELECT password_hash FROM users WHERE username = 'old'")
        .fetch_one(&stack.db.owner)
        .await
        .unwrap();
    assert!(stored.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{stored}");
    stack.login("old").await;
    stack.stop().await;
}

#[tokio::test]
async fn clinflow_ingest_loads_with_an_api_key_and_names_a_care_team() {
    use clinflow_ingest::load;
    use clinflow_ingest::progress::Progress;
    let stack = Stack::start().await;
    stack.user("admin", Role::Admin).await;
    let doctor = stack.user("doctor", Role::Clinician).await;
    let admin = stack.login("admin").await;
    let (_, team) = stack.post("/v1/admin/teams", Some(&admin), &json!({"name": "renal"})).await;
    let team = team["id"].as_str().unwrap().to_owned();
    stack.call("PUT", &format!("/v1/admin/teams/{team}/members/{doctor}"), Some(&admin), None).await;
    let (_, service) = stack.post("/v1/admin/service-accounts", Some(&admin), &json!({"username": "etl"})).await;
    let (_, key) = stack
        .post(&format!("/v1/admin/users/{}/api-keys", service["id"].as_str().unwrap()), Some(&admin), &json!({}))
        .await;
    let key = key["key"].as_str().unwrap().to_owned();
    // The service account is bound to the team its uploads name.
    let bind = format!("/v1/admin/teams/{team}/members/{}", service["id"].as_str().unwrap());
    assert_eq!(stack.call("PUT", &bind, Some(&admin), None).await.0, 204);

    let work = tempfile::tempdir().unwrap();
    let notes = work.path().join("notes.jsonl");
    std::fs::write(
        &notes,
        "{\"patient_ref\": \"PAT-R1\", \"text\": \"CKD stage 3.\"}\n{\"patient_ref\": \"PAT-R2\", \"text\": \"Known AF.\"}\n",
    )
    .unwrap();
    let client = clinflow_ingest::client::ApiClient::new(clinflow_ingest::client::ClientConfig {
        base_url: stack.base.parse().unwrap(),
        username: "etl".into(),
        password: String::new().into(),
        api_key: Some(key.clone().into()),
        care_team: Some("renal".into()),
        retry: clinflow_ingest::client::RetryPolicy::default(),
        timeout: Duration::from_secs(30),
        ca_certs: Vec::new(),
    })
    .unwrap();
    let cancel = tokio_util::sync::CancellationToken::new();
    client.login(&cancel).await.unwrap();
    let options = crate::ingest::load_options(work.path(), vec![notes]);
    let report = load::run(&options, &client, &Progress::hidden(), &cancel).await.unwrap();
    assert_eq!(report.counts.accepted, 2, "{report}");
    let ids: Vec<String> =
        clinflow_ingest::state::read(&options.state).unwrap().entries.iter().map(|e| e.id.to_string()).collect();
    wait_for_all_done(&stack, &ids).await;
    let token = stack.login("doctor").await;
    for id in &ids {
        assert_eq!(stack.get(&format!("/v1/documents/{id}"), Some(&token)).await.0, 200, "in the named team");
    }

    // A revoked key stops the loader at its first request.
    let key_id = key.trim_start_matches("cfk_").split('_').next().unwrap().to_owned();
    let key_id = uuid::Uuid::try_parse(&key_id).unwrap();
    assert_eq!(stack.call("DELETE", &format!("/v1/admin/api-keys/{key_id}"), Some(&admin), None).await.0, 204);
    assert!(client.login(&cancel).await.is_err());
    stack.stop().await;
}
