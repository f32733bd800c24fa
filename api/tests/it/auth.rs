use clinflow_api::users::Role;
use serde_json::json;

use crate::common::{PASSWORD, Stack, audit_summary};

#[tokio::test]
async fn login_logout_idle_timeout_and_roles() {
    let stack = Stack::start().await;
    stack.user("ingest1", Role::Ingest).await;
    stack.user("clin1", Role::Clinician).await;
    stack.care_team("clin1", &["PAT-1"]).await;

    // Wrong password and unknown user: the same 401 with a JSON error body.
    for name in ["clin1", "nobody"] {
        let (status, body) =
            stack.post("/v1/auth/login", None, &json!({"username": name, "password": "wrong password!"})).await;
        assert_eq!(status, 401);
        assert_eq!(body["error"]["code"], "invalid_credentials");
        assert!(body["error"]["message"].is_string());
    }
    let (status, body) = stack.post("/v1/auth/login", None, &json!({"username": "clin1"})).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "invalid_body");

    // No token, a forged token.
    assert_eq!(stack.get("/v1/documents/018f0000-0000-7000-8000-000000000000", None).await.0, 401);
    assert_eq!(stack.get("/v1/documents/018f0000-0000-7000-8000-000000000000", Some("e30.e30.sig")).await.0, 401);

    // ingest may upload but not read.
    let ingest = stack.login("ingest1").await;
    let (status, up) = stack
        .post(
            "/v1/documents",
            Some(&ingest),
            &json!({"patient_ref": "PAT-1", "text": "Known HTN.", "source_ref": "a-1"}),
        )
        .await;
    assert_eq!(status, 202, "{up}");
    assert_eq!(up["status"], "queued");
    let id = up["id"].as_str().unwrap().to_owned();
    let (status, body) = stack.get(&format!("/v1/documents/{id}"), Some(&ingest)).await;
    assert_eq!(status, 403);
    assert_eq!(body["error"]["code"], "forbidden");

    // Logout ends the session at once.
    let clin = stack.login("clin1").await;
    assert_eq!(stack.get(&format!("/v1/documents/{id}"), Some(&clin)).await.0, 200);
    let resp = stack.http.post(format!("{}/v1/auth/logout", stack.base)).bearer_auth(&clin).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 204);
    assert_eq!(stack.get(&format!("/v1/documents/{id}"), Some(&clin)).await.0, 401);

    // A session idle for more than 15 minutes is refused, though its JWT is valid.
    let clin = stack.login("clin1").await;
    assert_eq!(stack.get(&format!("/v1/documents/{id}"), Some(&clin)).await.0, 200);
    sqlx::query("UPDATE sessions SET last_seen_at = now() - interval '16 minutes' WHERE revoked_at IS NULL")
        .execute(&stack.db.owner)
        .await
        .unwrap();
    assert_eq!(stack.get(&format!("/v1/documents/{id}"), Some(&clin)).await.0, 401);

    // Every one of those decisions is on the audit trail, and nothing else is.
    let n = stack.wait_for_audit_rows(15).await;
    let s = |a: &str, o: &str, n: &str| (a.to_owned(), o.to_owned(), n.to_owned());
    let mut expected = vec![
        s("auth.login", "failure", "clin1"),
        s("auth.login", "failure", "nobody"),
        s("auth.login", "success", "ingest1"),
        s("document.upload", "success", "ingest1"),
        s("document.read", "denied", "ingest1"),
        s("auth.login", "success", "clin1"),
        s("document.read", "success", "clin1"),
        s("auth.logout", "success", "clin1"),
        s("auth.login", "success", "clin1"),
        s("document.read", "success", "clin1"),
        s("document.process", "success", "clinflow-worker"),
        s("auth.access", "denied", ""),
        s("auth.access", "denied", ""),
        s("auth.access", "denied", ""),
        s("auth.access", "denied", ""),
    ];
    expected.sort();
    assert_eq!(n, 15);
    assert_eq!(audit_summary(&stack.db.owner).await, expected);
    let reasons: Vec<String> =
        sqlx::query_scalar("SELECT reason FROM audit_events WHERE action = 'auth.access' ORDER BY reason")
            .fetch_all(&stack.db.owner)
            .await
            .unwrap();
    assert_eq!(reasons, ["invalid_token", "missing_token", "session_ended", "session_ended"]);
    let _ = PASSWORD;
    stack.stop().await;
}

#[tokio::test]
async fn upload_validation_and_duplicates() {
    let stack = Stack::start().await;
    stack.user("up1", Role::Ingest).await;
    let token = stack.login("up1").await;
    let secret_text = "Mrs Example has metformin-resistant T2DM";

    for (body, status, code) in [
        (json!({"patient_ref": "", "text": secret_text}), 422, "invalid_patient_ref"),
        (json!({"patient_ref": "PAT-9", "text": "   "}), 422, "empty_text"),
        (
            json!({"patient_ref": "PAT-9", "text": secret_text, "document_date": "12/01/2026"}),
            422,
            "invalid_document_date",
        ),
        (json!({"patient_ref": 12345, "text": secret_text}), 422, "invalid_body"),
        (json!({"patient_ref": "PAT-9", "text": secret_text, "colour": "red"}), 422, "invalid_body"),
        (json!({"patient_ref": "PAT-9", "text": "x".repeat(1_000_001)}), 413, "text_too_large"),
    ] {
        let (got, resp) = stack.post("/v1/documents", Some(&token), &body).await;
        assert_eq!((got, resp["error"]["code"].as_str().unwrap_or("")), (status, code), "{resp}");
        let text = resp.to_string();
        assert!(!text.contains("metformin") && !text.contains("12345") && !text.contains("12/01"), "{text}");
    }
    let resp =
        stack.http.post(format!("{}/v1/documents", stack.base)).bearer_auth(&token).body("{").send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 415);

    let doc = json!({"patient_ref": "PAT-9", "text": secret_text, "source_ref": "batch-1/note-1", "document_date": "2026-01-12"});
    let (status, first) = stack.post("/v1/documents", Some(&token), &doc).await;
    assert_eq!(status, 202);
    let (status, again) = stack.post("/v1/documents", Some(&token), &doc).await;
    assert_eq!(status, 409);
    assert_eq!(again["error"]["code"], "duplicate_source_ref");
    assert_eq!(again["id"], first["id"]);
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM documents").fetch_one(&stack.db.owner).await.unwrap();
    assert_eq!(rows, 1, "rejected uploads store nothing");
    stack.stop().await;
}

#[tokio::test]
async fn a_client_request_id_reaches_the_audit_trail_only_if_it_is_a_plain_token() {
    let stack = Stack::start().await;
    stack.user("ing", Role::Ingest).await;
    let login = |request_id: &'static str| {
        let req = stack.http.post(format!("{}/v1/auth/login", stack.base));
        async move {
            let resp = req
                .header("x-request-id", request_id)
                .json(&json!({"username": "ing", "password": PASSWORD}))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
            resp.headers()["x-request-id"].to_str().unwrap().to_owned()
        }
    };
    assert_eq!(login("batch-7.run_2").await, "batch-7.run_2", "a plain token is kept");
    for bad in [
        "Mrs Example smith_john.txt",
        "patient=PAT-1;note=HTN",
        "0123456789012345678901234567890123456789012345678901234567890123456789",
    ] {
        let echoed = login(bad).await;
        assert_ne!(echoed, bad);
        assert!(uuid::Uuid::parse_str(&echoed).is_ok(), "replaced by a fresh id: {echoed}");
    }
    assert_eq!(stack.wait_for_audit_rows(4).await, 4);
    let ids: Vec<Option<String>> = sqlx::query_scalar("SELECT request_id FROM audit_events ORDER BY seq")
        .fetch_all(&stack.db.owner)
        .await
        .unwrap();
    assert_eq!(ids[0].as_deref(), Some("batch-7.run_2"));
    assert!(ids[1..].iter().all(|id| id.as_deref().is_some_and(|i| uuid::Uuid::parse_str(i).is_ok())), "{ids:?}");
    stack.stop().await;
}

#[tokio::test]
async fn a_flood_of_refused_requests_is_audited_up_to_a_rate_and_the_rest_counted() {
    let stack = Stack::start().await;
    // The test api audits 60 refusals per address and minute (one more each second).
    let refused = async || stack.get("/v1/documents/018f0000-0000-7000-8000-000000000000", Some("e30.e30.sig")).await.0;
    let flood = std::time::Instant::now();
    for _ in 0..80 {
        assert_eq!(refused().await, 401);
    }
    // Each second of the flood let one more refusal be audited.
    let refilled = flood.elapsed().as_secs() as i64 + 1;
    let access_events = async || -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM audit_events WHERE action = 'auth.access'")
            .fetch_one(&stack.db.owner)
            .await
            .unwrap()
    };
    crate::common::wait_until("the first 60 audited", std::time::Duration::from_secs(20), async || {
        access_events().await >= 60
    })
    .await;
    // Once the rate allows again, the next refusal is audited after a
    // summary of those that were only counted.
    crate::common::wait_until("the suppressed ones reported", std::time::Duration::from_secs(20), async || {
        assert_eq!(refused().await, 401);
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM audit_events WHERE action = 'auth.denials_suppressed'")
            .fetch_one(&stack.db.owner)
            .await
            .unwrap()
            == 1
    })
    .await;
    let (kind, count): (String, String) =
        sqlx::query_as("SELECT resource_kind, resource_id FROM audit_events WHERE action = 'auth.denials_suppressed'")
            .fetch_one(&stack.db.owner)
            .await
            .unwrap();
    assert_eq!(kind, "count");
    let count: i64 = count.parse().unwrap();
    assert!(
        count >= 20 - refilled && count > 0,
        "the 20 past the burst were counted, but for {refilled} let through by the refill: {count}"
    );
    let audited = access_events().await;
    assert!((61..=70).contains(&audited), "60 in the burst, then about one a second: {audited}");
    stack.stop().await;
}
