//! `POST /v1/documents/batch` and the status endpoints.

use std::time::{Duration, Instant};

use clinflow_api::users::Role;
use serde_json::{Value, json};

use crate::common::Stack;

async fn batch(stack: &Stack, token: &str, body: String) -> (u16, Value) {
    stack.batch(token, body).await
}

fn line(v: Value) -> String {
    format!("{v}\n")
}

#[tokio::test]
async fn every_line_gets_its_own_outcome_and_one_bad_line_fails_no_other() {
    let stack = Stack::start().await;
    stack.user("ing", Role::Ingest).await;
    stack.user("ing2", Role::Ingest).await;
    let token = stack.login("ing").await;
    let secret = "Mrs Example, metformin-resistant T2DM";
    // A note this account uploaded before, one at a time.
    let (status, earlier) = stack
        .post(
            "/v1/documents",
            Some(&token),
            &json!({"patient_ref": "PAT-0", "text": "Known AF.", "source_ref": "a/n.txt"}),
        )
        .await;
    assert_eq!(status, 202);

    let body = [
        line(json!({"patient_ref": "PAT-1", "text": "Started metformin.", "source_ref": "b/n.txt"})), // 1 accepted
        line(json!({"patient_ref": "PAT-2", "text": "Known AF.", "source_ref": "a/n.txt"})), // 2 duplicate of the earlier one
        "{not json\n".to_owned(),                                                            // 3 rejected
        line(json!({"patient_ref": "PAT-3", "text": secret, "colour": "red"})), // 4 rejected: unknown field
        "\n".to_owned(),                                                        // blank: skipped
        line(json!({"patient_ref": "", "text": secret})),                       // 6 rejected: patient_ref
        line(json!({"patient_ref": "PAT-4", "text": "x".repeat(5_000)})),       // 7 rejected: line too large
        line(json!({"patient_ref": "PAT-5", "text": "Known HTN.", "source_ref": "b/n.txt"})), // 8 duplicate of line 1
        line(json!({"patient_ref": "PAT-6", "text": "Known HTN.", "document_date": "2026-02-30"})), // 9 rejected: date
        json!({"patient_ref": "PAT-7", "text": "Chest pain."}).to_string(),     // 10 accepted, no final newline
    ]
    .concat();
    let (status, resp) = batch(&stack, &token, body).await;
    assert_eq!(status, 200, "{resp}");
    let outcome = |n: usize| resp["outcomes"].as_array().unwrap().iter().find(|o| o["line"] == n).cloned().unwrap();
    assert_eq!(
        (resp["accepted"].as_u64(), resp["duplicate"].as_u64(), resp["rejected"].as_u64()),
        (Some(2), Some(2), Some(5))
    );
    assert_eq!(outcome(1)["outcome"], "accepted");
    assert_eq!(outcome(2)["outcome"], "duplicate");
    assert_eq!(outcome(2)["id"], earlier["id"], "the caller's own existing document");
    assert_eq!(outcome(3)["code"], "invalid_json");
    assert_eq!(outcome(4)["code"], "invalid_body");
    assert_eq!(outcome(6)["code"], "invalid_patient_ref");
    assert_eq!(outcome(7)["code"], "line_too_large");
    assert_eq!(outcome(8)["outcome"], "duplicate");
    assert_eq!(outcome(8)["id"], outcome(1)["id"]);
    assert_eq!(outcome(9)["code"], "invalid_document_date");
    assert_eq!(outcome(10)["outcome"], "accepted");
    let text = resp.to_string();
    assert!(!text.contains("metformin-resistant") && !text.contains("red") && !text.contains("PAT-"), "{text}");

    // Another account may use the same source_ref: source refs are per uploader.
    let token2 = stack.login("ing2").await;
    let (_, other) =
        batch(&stack, &token2, line(json!({"patient_ref": "PAT-9", "text": "Known AF.", "source_ref": "a/n.txt"})))
            .await;
    assert_eq!(other["accepted"], 1, "{other}");

    // Every accepted document is processed and its upload audited.
    let accepted = [outcome(1)["id"].clone(), outcome(10)["id"].clone(), other["outcomes"][0]["id"].clone()];
    let deadline = Instant::now() + Duration::from_secs(30);
    for id in &accepted {
        loop {
            let (status, body) =
                stack.get(&format!("/v1/documents/{}/status", id.as_str().unwrap()), Some(&token)).await;
            if id == &accepted[2] {
                assert_eq!(status, 404, "another account's upload is not visible");
                break;
            }
            assert_eq!(status, 200, "{body}");
            assert!(body.get("patient_ref").is_none() && body.get("text").is_none(), "{body}");
            if body["status"] == "done" {
                break;
            }
            assert!(Instant::now() < deadline, "{body}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM documents").fetch_one(&stack.db.owner).await.unwrap();
    assert_eq!(rows, 4, "the earlier upload, two from this batch, one from the other account");
    // 2 logins + 4 uploads + 4 worker reads; status reads are not PHI reads.
    assert_eq!(stack.wait_for_audit_rows(10).await, 10);
    stack.stop().await;
}

#[tokio::test]
async fn batch_limits_and_roles() {
    let stack = Stack::start().await;
    stack.user("ing", Role::Ingest).await;
    stack.user("clin", Role::Clinician).await;
    stack.user("ops", Role::Ops).await;
    let token = stack.login("ing").await;

    // Past the line limit (50 in tests): those lines are refused, the rest stored.
    let body: String = (1..=53).map(|i| line(json!({"patient_ref": format!("P{i}"), "text": "Known AF."}))).collect();
    let (status, resp) = batch(&stack, &token, body).await;
    assert_eq!(status, 200);
    assert_eq!((resp["accepted"].as_u64(), resp["rejected"].as_u64()), (Some(50), Some(3)));
    assert_eq!(resp["outcomes"][52]["code"], "too_many_lines");

    // Past the byte limit (64 KiB in tests), announced up front: 413, nothing stored.
    let body: String =
        (1..=40).map(|i| line(json!({"patient_ref": format!("Q{i}"), "text": "y".repeat(2_000)}))).collect();
    let (status, resp) = batch(&stack, &token, body).await;
    assert_eq!((status, resp["error"]["code"].as_str()), (413, Some("batch_too_large")));
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM documents").fetch_one(&stack.db.owner).await.unwrap();
    assert_eq!(rows, 50);

    // Batches are for ingest accounts.
    let clin = stack.login("clin").await;
    let (status, _) = batch(&stack, &clin, line(json!({"patient_ref": "P", "text": "x"}))).await;
    assert_eq!(status, 403);

    // ops sees every document's status; a list answer names the unknown ids.
    let ops = stack.login("ops").await;
    let first: Vec<String> = sqlx::query_scalar("SELECT id::text FROM documents ORDER BY id LIMIT 2")
        .fetch_all(&stack.db.owner)
        .await
        .unwrap();
    let unknown = uuid::Uuid::now_v7().to_string();
    let (status, body) =
        stack.post("/v1/documents/status", Some(&ops), &json!({"ids": [first[0], first[1], unknown]})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["documents"].as_array().unwrap().len(), 2);
    assert_eq!(body["missing"], json!([unknown]));
    let (status, body) = stack.post("/v1/documents/status", Some(&clin), &json!({"ids": [first[0]]})).await;
    assert_eq!(status, 200, "a clinician may ask, and sees only their own uploads");
    assert_eq!((body["documents"].as_array().map(Vec::len), &body["missing"]), (Some(0), &json!([first[0]])));
    stack.stop().await;
}

#[tokio::test]
async fn an_idempotent_retry_gets_the_first_answer_and_stores_nothing_new() {
    let stack = Stack::start().await;
    stack.user("ing", Role::Ingest).await;
    let token = stack.login("ing").await;
    let doc = json!({"patient_ref": "PAT-1", "text": "Known AF."});
    let post = |key: &'static str, body: Value| {
        let req = stack.http.post(format!("{}/v1/documents", stack.base)).bearer_auth(&token).json(&body);
        async move {
            let resp = req.header("idempotency-key", key).send().await.unwrap();
            (resp.status().as_u16(), resp.json::<Value>().await.unwrap())
        }
    };
    let (status, first) = post("k-1", doc.clone()).await;
    assert_eq!(status, 202);
    let (status, again) = post("k-1", doc.clone()).await;
    assert_eq!((status, &again["id"]), (202, &first["id"]));
    let (status, other) = post("k-1", json!({"patient_ref": "PAT-1", "text": "Known HTN."})).await;
    assert_eq!((status, other["error"]["code"].as_str()), (409, Some("idempotency_key_reused")));

    // Ten concurrent retries of one request: one document, one id.
    let answers =
        futures_util::future::join_all((0..10).map(|_| post("k-2", json!({"patient_ref": "PAT-2", "text": "x"}))))
            .await;
    let ids: std::collections::HashSet<String> = answers
        .iter()
        .map(|(s, b)| {
            assert_eq!(*s, 202, "{b}");
            b["id"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(ids.len(), 1);
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM documents").fetch_one(&stack.db.owner).await.unwrap();
    assert_eq!(rows, 2);
    // 1 login, 2 uploads, 2 worker reads: a replayed request is not a new upload.
    assert_eq!(stack.wait_for_audit_rows(5).await, 5);

    // Past the retention period the key is purged (as the app role, which
    // runs the purge), and a retry with it is a new request.
    sqlx::query("UPDATE idempotency_keys SET created_at = now() - interval '25 hours' WHERE document_id = $1::uuid")
        .bind(first["id"].as_str().unwrap())
        .execute(&stack.db.owner)
        .await
        .unwrap();
    let purged = clinflow_api::idempotency::purge(&stack.db.api, Duration::from_secs(24 * 3600)).await.unwrap();
    assert_eq!(purged, 1, "only the expired key");
    let (status, later) = post("k-1", doc.clone()).await;
    assert_eq!(status, 202);
    assert_ne!(later["id"], first["id"]);
    let (_, again) = post("k-2", json!({"patient_ref": "PAT-2", "text": "x"})).await;
    assert!(ids.contains(again["id"].as_str().unwrap()), "a key within its retention still answers");
    stack.stop().await;
}
