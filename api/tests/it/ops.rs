//! `/v1/ops/...` against the real stack: dead letters listed and replayed,
//! documents reprocessed, each call audited, and refused to other roles.

use std::time::Duration;

use clinflow::amqp::{Outgoing, Publisher};
use clinflow_api::users::Role;
use serde_json::{Value, json};

use crate::common::{Stack, wait_for_all_done, wait_until};

async fn results_per_document(stack: &Stack) -> Vec<i64> {
    sqlx::query_scalar("SELECT (SELECT count(*) FROM document_results r WHERE r.document_id = d.id) FROM documents d")
        .fetch_all(&stack.db.owner)
        .await
        .unwrap()
}

#[tokio::test]
async fn operators_list_and_replay_dead_letters_and_reprocess_documents() {
    let stack = Stack::start().await;
    stack.user("loader", Role::Ingest).await;
    stack.user("operator", Role::Ops).await;
    stack.user("doctor", Role::Clinician).await;
    stack.care_team("doctor", &["PAT-1"]).await;
    let (loader, operator, doctor) =
        (stack.login("loader").await, stack.login("operator").await, stack.login("doctor").await);
    let mut ids = Vec::new();
    for text in ["Known AF.", "Started metformin.", "Known HTN."] {
        let (status, up) =
            stack.post("/v1/documents", Some(&loader), &json!({"patient_ref": "PAT-1", "text": text})).await;
        assert_eq!(status, 202);
        ids.push(up["id"].as_str().unwrap().to_owned());
    }
    wait_for_all_done(&stack, &ids).await;

    // A job parked as a worker does when its budget is used up: the
    // document failed, the job in the dead-letter queue with the reason.
    sqlx::query("UPDATE documents SET status = 'failed', failure_code = 'retries_exhausted' WHERE id = $1::uuid")
        .bind(&ids[0])
        .execute(&stack.db.owner)
        .await
        .unwrap();
    let publisher = Publisher::new(&stack.amqp).await.unwrap();
    let (dead, body) = (stack.topology.dead_letter_exchange(), format!(r#"{{"document_id":"{}"}}"#, ids[0]));
    let parked = Outgoing {
        reason: Some("retries_exhausted"),
        attempts: 5,
        ..Outgoing::new(&dead, "documents.live", &ids[0], body.as_bytes())
    };
    publisher.publish_many(&[parked]).await.unwrap();
    let dead_queue = stack.topology.documents_live().dead_queue;
    wait_until("the job parked", Duration::from_secs(10), async || stack.queue_depth(&dead_queue).await == 1).await;

    // Other roles are refused (and the refusal audited).
    let (status, _) = stack.get("/v1/ops/dead-letters", Some(&doctor)).await;
    assert_eq!(status, 403);

    let (status, listing) = stack.get("/v1/ops/dead-letters", Some(&operator)).await;
    assert_eq!(status, 200, "{listing}");
    assert_eq!(listing["total"], 1);
    assert_eq!(listing["by_reason"], json!({"retries_exhausted": 1}));
    assert_eq!(
        listing["jobs"][0],
        json!({"lane": "live", "document_id": ids[0], "reason": "retries_exhausted", "attempts": 5})
    );
    assert_eq!(stack.queue_depth(&dead_queue).await, 1, "listing consumes nothing");

    let (status, body) = stack.post("/v1/ops/dead-letters/replay", Some(&operator), &json!({})).await;
    assert_eq!((status, body["error"]["code"].as_str()), (422, Some("invalid_selection")));
    let (status, replayed) = stack.post("/v1/ops/dead-letters/replay", Some(&operator), &json!({"all": true})).await;
    assert_eq!(status, 200, "{replayed}");
    assert_eq!(replayed["replayed"], json!([ids[0]]));
    wait_for_all_done(&stack, &ids).await;
    assert_eq!(stack.queue_depth(&dead_queue).await, 0);
    assert_eq!(results_per_document(&stack).await, [1, 1, 1], "one result per document and model");

    // Reprocess the documents without a result from another model: all of
    // them, again to done, still one result each from this model.
    let (status, body) =
        stack.post("/v1/ops/reprocess", Some(&operator), &json!({"without_result_from": "some-other-model"})).await;
    assert_eq!((status, &body), (200, &json!({"queued": 3})));
    wait_for_all_done(&stack, &ids).await;
    assert_eq!(results_per_document(&stack).await, [1, 1, 1]);
    let lanes: Vec<String> = sqlx::query_scalar("SELECT lane FROM documents").fetch_all(&stack.db.owner).await.unwrap();
    assert!(lanes.iter().all(|l| l == "live"), "a document keeps the lane it was uploaded on");

    // Every call is on the audit trail, as the operator's.
    let expected = [
        ("ops.dead_letters.list", "denied", "doctor"),
        ("ops.dead_letters.list", "success", "operator"),
        ("ops.dead_letters.replay", "success", "operator"),
        ("ops.reprocess", "success", "operator"),
    ];
    wait_until("the ops events audited", Duration::from_secs(20), async || {
        let rows: Vec<(String, String, String)> = sqlx::query_as(
            "SELECT action, outcome, actor_name FROM audit_events WHERE action LIKE 'ops.%' ORDER BY action, outcome",
        )
        .fetch_all(&stack.db.owner)
        .await
        .unwrap();
        let rows: Vec<(&str, &str, &str)> = rows.iter().map(|(a, o, n)| (a.as_str(), o.as_str(), n.as_str())).collect();
        rows == expected
    })
    .await;
    let replay_event: Value =
        sqlx::query_scalar("SELECT to_jsonb(resource_id) FROM audit_events WHERE action = 'ops.dead_letters.replay'")
            .fetch_one(&stack.db.owner)
            .await
            .unwrap();
    assert_eq!(replay_event, json!(ids[0]));
    stack.stop().await;
}
