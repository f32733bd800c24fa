//! RabbitMQ stopped and started again under upload load, several times, on a
//! node of the test's own: nothing accepted is lost, and every service comes
//! back by itself (no process restarted).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clinflow::testing::RabbitNode;
use clinflow_api::users::Role;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::common::Stack;

const RESTARTS: usize = 3;

async fn wait_until(what: &str, deadline: Duration, mut check: impl AsyncFnMut() -> bool) {
    let until = Instant::now() + deadline;
    while !check().await {
        assert!(Instant::now() < until, "{what}: not within {deadline:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

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

    let accepted = Arc::new(Mutex::new(Vec::<String>::new()));
    let refused = Arc::new(Mutex::new(Vec::<u16>::new()));
    let stop = CancellationToken::new();
    let mut uploaders = Vec::new();
    for client in 0..4 {
        let (http, base, token) = (stack.http.clone(), stack.base.clone(), token.clone());
        let (accepted, refused, stop) = (Arc::clone(&accepted), Arc::clone(&refused), stop.clone());
        uploaders.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.is_cancelled() {
                n += 1;
                let doc = json!({"patient_ref": format!("PAT-{client}-{n}"), "text": "Known AF, on metformin."});
                let resp =
                    http.post(format!("{base}/v1/documents")).bearer_auth(&token).json(&doc).send().await.unwrap();
                let code = resp.status().as_u16();
                let body: serde_json::Value = resp.json().await.unwrap_or_default();
                match (code, body["id"].as_str()) {
                    (202, Some(id)) => accepted.lock().unwrap().push(id.to_owned()),
                    _ => refused.lock().unwrap().push(code),
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }));
    }
    let count = || accepted.lock().unwrap().len();

    for restart in 1..=RESTARTS {
        let before = count();
        wait_until("uploads on a healthy broker", Duration::from_secs(20), async || count() >= before + 20).await;
        node.stop_app().await;
        let down = count();
        wait_until("uploads while the broker is down", Duration::from_secs(20), async || count() >= down + 20).await;
        node.start_app().await;
        let back = Instant::now();

        // Within 10 s of start_app the api is ready again and a document
        // uploaded now has gone all the way through.
        wait_until("readiness after start_app", Duration::from_secs(10), async || {
            stack.http.get(format!("{}/readyz", stack.base)).send().await.is_ok_and(|r| r.status() == 200)
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
    stop.cancel();
    for u in uploaders {
        u.await.unwrap();
    }

    let ids = accepted.lock().unwrap().clone();
    assert!(refused.lock().unwrap().is_empty(), "the broker is not on the upload path: {:?}", refused.lock().unwrap());
    wait_until("every accepted document done", Duration::from_secs(60), async || {
        let done: i64 =
            sqlx::query_scalar("SELECT count(*) FROM documents WHERE status = 'done' AND id = ANY($1::uuid[])")
                .bind(&ids)
                .fetch_one(&stack.db.owner)
                .await
                .unwrap();
        done == ids.len() as i64
    })
    .await;
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
