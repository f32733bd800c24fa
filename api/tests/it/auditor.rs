//! The auditor's endpoints against the real stack: filters, pagination by
//! cursor, verification (with the sink's checkpoints), roles, and each call
//! on the trail itself.

use std::time::Duration;

use clinflow_api::users::Role;
use serde_json::json;

use crate::common::{Stack, wait_until};

#[tokio::test]
async fn auditors_read_the_trail_page_by_page_and_have_it_verified() {
    let stack = Stack::start().await;
    stack.user("loader", Role::Ingest).await;
    stack.user("doctor", Role::Clinician).await;
    stack.care_team("doctor", &["PAT-SECRET-1"]).await;
    stack.user("inspector", Role::Auditor).await;
    let (loader, doctor, inspector) =
        (stack.login("loader").await, stack.login("doctor").await, stack.login("inspector").await);
    for i in 0..5 {
        let doc = json!({"patient_ref": "PAT-SECRET-1", "text": format!("Known AF {i}.")});
        assert_eq!(stack.post("/v1/documents", Some(&loader), &doc).await.0, 202);
    }
    // 3 logins + 5 uploads (worker reads come later; wait for those too).
    wait_until("uploads and worker reads audited", Duration::from_secs(30), async || {
        stack.wait_for_audit_rows(13).await >= 13
    })
    .await;

    // Other roles may not read the trail.
    assert_eq!(stack.get("/v1/audit/events", Some(&doctor)).await.0, 403);
    assert_eq!(stack.post("/v1/audit/verify", Some(&loader), &json!({})).await.0, 403);

    // Filtered: the loader's uploads, two at a time.
    let mut seen = Vec::new();
    let mut cursor: Option<i64> = None;
    loop {
        let after = cursor.map(|c| format!("&after={c}")).unwrap_or_default();
        let (status, page) = stack
            .get(&format!("/v1/audit/events?actor=loader&action=document.upload&limit=2{after}"), Some(&inspector))
            .await;
        assert_eq!(status, 200, "{page}");
        let events = page["events"].as_array().unwrap();
        seen.extend(events.iter().map(|e| e["seq"].as_i64().unwrap()));
        assert!(events.iter().all(|e| e["actor_name"] == "loader" && e["outcome"] == "success"));
        match page["next_cursor"].as_i64() {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    assert_eq!(seen.len(), 5, "{seen:?}");
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "in seq order, no repeats: {seen:?}");
    let (_, everything) = stack.get("/v1/audit/events?limit=1000", Some(&inspector)).await;
    assert!(!everything.to_string().contains("PAT-SECRET"), "no patient reference in the trail");
    let (status, bad) = stack.get("/v1/audit/events?limit=0", Some(&inspector)).await;
    assert_eq!((status, bad["error"]["code"].as_str()), (422, Some("invalid_limit")));

    let (status, verified) = stack.post("/v1/audit/verify", Some(&inspector), &json!({})).await;
    assert_eq!(status, 200, "{verified}");
    assert_eq!(verified["intact"], true, "{verified}");
    assert!(verified["rows"].as_i64().unwrap() >= 13);

    // The auditor's own calls are on the trail, and the refusals.
    wait_until("the auditor's calls audited", Duration::from_secs(20), async || {
        let rows: Vec<(String, String, String)> = sqlx::query_as(
            "SELECT action, outcome, actor_name FROM audit_events WHERE action LIKE 'audit.%' ORDER BY seq",
        )
        .fetch_all(&stack.db.owner)
        .await
        .unwrap();
        let reads = rows.iter().filter(|r| r.0 == "audit.read" && r.1 == "success").count();
        let denied = rows.iter().filter(|r| r.1 == "denied").count();
        let verifies = rows.iter().filter(|r| r.0 == "audit.verify" && r.1 == "success").count();
        reads == 4 && denied == 2 && verifies == 1
    })
    .await;
    stack.stop().await;
}
