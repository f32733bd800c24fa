//! RabbitMQ stopped and started again under upload load, several times, on a
//! node of the test's own: nothing accepted is lost, and every service comes
//! back by itself (no process restarted).

use std::sync::Arc;
use std::time::{Duration, Instant};

use clinflow::testing::RabbitNode;
use clinflow_api::users::Role;
use serde_json::json;

use crate::common::{Stack, Uploaders, wait_for_all_done, wait_until};

const RESTARTS: usize = 3;

async fn status(stack: &Stack, id: &str) -> String {
    sqlx::query_scalar("SELECT status FROM documents WHERE id = $1::uuid")
        .bind(id)
        .fetch_one(&stack.db.owner)
        .await
        .unwrap()
}

#[tokio::test]
async fn broker_restarts_under_upload_load_lose_nothing_and_need_no_process_restart() {
    let node = RabbitNode::start().await;
    let stack = Stack::start_on(node.amqp_url()).await;
    stack.user("ing", Role::Ingest).await;
    let token = stack.login("ing").await;

    let uploads = Uploaders::start(&stack, &token, 4);
    let accepted = Arc::clone(&uploads.accepted);
    let count = || accepted.lock().unwrap().len();

    for restart in 1..=RESTARTS {
        let before = count();
        wait_until("uploads on a healthy broker", Duration::from_secs(20), async || count() >= before + 20).await;
        node.stop_app().await;
        let down = count();
        wait_until("uploads while the broker is down", Duration::from_secs(20), async || count() >= down + 20).await;
        // Still ready (it serves everything from PostgreSQL), and says the broker is down.
        wait_until("readiness showing the broker down", Duration::from_secs(10), async || {
            readiness(&stack).await == (200, "down".to_owned())
        })
        .await;
        node.start_app().await;
        let back = Instant::now();

        // Within 10 s of start_app the api is ready again and a document
        // uploaded now has gone all the way through.
        wait_until("readiness after start_app", Duration::from_secs(10), async || {
            readiness(&stack).await == (200, "up".to_owned())
        })
        .await;
        let (code, probe) =
            stack.post("/v1/documents", Some(&token), &json!({"patient_ref": "PROBE", "text": "Known HTN."})).await;
        assert_eq!(code, 202);
        let probe = probe["id"].as_str().unwrap().to_owned();
        accepted.lock().unwrap().push(probe.clone());
        wait_until("a new upload processed after start_app", Duration::from_secs(10), async || {
            status(&stack, &probe).await == "done"
        })
        .await;
        let recovered = back.elapsed();
        assert!(recovered < Duration::from_secs(10), "restart {restart}: recovered after {recovered:?}");
        eprintln!("restart {restart}: a fresh upload was done {recovered:?} after start_app");
    }
    let (ids, refused) = uploads.stop().await;
    assert!(refused.is_empty(), "the broker is not on the upload path: {refused:?}");
    wait_for_all_done(&stack, &ids).await;
    let (docs, results): (i64, i64) =
        sqlx::query_as("SELECT (SELECT count(*) FROM documents), (SELECT count(*) FROM document_results)")
            .fetch_one(&stack.db.owner)
            .await
            .unwrap();
    assert_eq!((docs, results), (ids.len() as i64, ids.len() as i64), "one result per document, none extra");
    let audited = async || -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM audit_events WHERE action = 'document.upload'")
            .fetch_one(&stack.db.owner)
            .await
            .unwrap()
    };
    let until = Instant::now() + Duration::from_secs(30);
    while audited().await != ids.len() as i64 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let outbox: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox").fetch_one(&stack.db.owner).await.unwrap();
    let audit = stack.topology.audit();
    assert_eq!(
        audited().await,
        ids.len() as i64,
        "every upload audited (outbox left: {outbox}, audit queue: {}, audit dead-letters: {})",
        stack.queue_depth(&audit.queue).await,
        stack.queue_depth(&audit.dead_queue).await
    );
    let lane = stack.topology.documents_live();
    assert_eq!(stack.queue_depth(&lane.dead_queue).await, 0);
    assert_eq!(stack.queue_depth(&stack.topology.audit().dead_queue).await, 0);
    eprintln!("{} uploads accepted across {RESTARTS} broker restarts, all done, each with one result", ids.len());
    stack.stop().await;
    drop(node);
}

/// `/readyz`: status code and what it says of RabbitMQ.
async fn readiness(stack: &Stack) -> (u16, String) {
    let Ok(response) = stack.http.get(format!("{}/readyz", stack.base)).send().await else {
        return (0, String::new());
    };
    let status = response.status().as_u16();
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    (status, body["rabbitmq"].as_str().unwrap_or_default().to_owned())
}
