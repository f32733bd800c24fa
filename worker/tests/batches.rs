//! The worker's batch loop against the real PostgreSQL, RabbitMQ and MedCAT
//! (the test MedCAT of ./dev/test raises on texts holding
//! MEDCAT_DEV_FAIL_MARKER: a real model failure on demand). Jobs are queued
//! before the worker starts, so each test's documents form one batch.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use axum::http::StatusCode;
use clinflow::crypto::Keyring;
use clinflow::keys::Keys;
use clinflow::testing;
use secrecy::SecretBox;
use support::{Setup, fault_proxy};
use tokio_util::sync::CancellationToken;

fn fail_marker() -> String {
    std::env::var("MEDCAT_DEV_FAIL_MARKER").expect("MEDCAT_DEV_FAIL_MARKER (./dev/test sets it for its MedCAT)")
}

#[tokio::test]
async fn a_silent_bulk_failure_is_rechecked_alone_and_fails_only_its_document() {
    let setup = Setup::new().await;
    let poison = format!("Known AF. {}", fail_marker());
    let texts = ["Started metformin for T2DM.", poison.as_str(), "Patient well, reviewed today.", "Known HTN."];
    let ids = setup.enqueue(&testing::keys(), &texts).await;
    let shutdown = CancellationToken::new();
    let worker = setup.start_worker(&testing::medcat_url(), &shutdown).await;

    let rows = setup.wait_final(&ids).await;
    // Bulk answered `success: true` with no annotations for every document of
    // the batch; each was re-checked alone. Only the one MedCAT raises on fails.
    assert_eq!(rows[0], ("done".into(), None, 1));
    assert_eq!(rows[1], ("failed".into(), Some("nlp_error".into()), 0));
    assert_eq!(rows[2], ("done".into(), None, 1), "no concepts is a result too");
    assert_eq!(rows[3], ("done".into(), None, 1));
    let counts: Vec<i32> =
        sqlx::query_scalar("SELECT annotation_count FROM document_results WHERE document_id = ANY($1) ORDER BY 1")
            .bind(&ids)
            .fetch_all(&setup.db.owner)
            .await
            .unwrap();
    assert_eq!(counts.iter().filter(|c| **c == 0).count(), 1, "only the concept-free note has no annotations");
    assert_eq!(setup.queue_depth(&setup.topology.documents_live().queue).await, 0);

    shutdown.cancel();
    worker.await.unwrap().unwrap();
    setup.finish().await;
}

#[tokio::test]
async fn redelivered_jobs_never_create_a_second_result() {
    let setup = Setup::new().await;
    let ids = setup.enqueue(&testing::keys(), &["Known AF.", "Started metformin."]).await;
    // The same jobs again, as a redelivery or a replay would bring them.
    for id in &ids {
        clinflow::jobs::publish(&setup.publisher, &setup.topology, clinflow::amqp::Lane::Live, *id).await.unwrap();
    }
    let shutdown = CancellationToken::new();
    let worker = setup.start_worker(&testing::medcat_url(), &shutdown).await;
    let rows = setup.wait_final(&ids).await;
    assert!(rows.iter().all(|r| r.0 == "done" && r.2 == 1), "{rows:?}");

    // And once more after they are done.
    clinflow::jobs::publish(&setup.publisher, &setup.topology, clinflow::amqp::Lane::Live, ids[0]).await.unwrap();
    let lane = setup.topology.documents_live();
    let deadline = Instant::now() + Duration::from_secs(10);
    while setup.queue_depth(&lane.queue).await > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let results: i64 =
        sqlx::query_scalar("SELECT count(*) FROM document_results").fetch_one(&setup.db.owner).await.unwrap();
    assert_eq!(results, 2);
    assert_eq!(setup.queue_depth(&lane.queue).await, 0);
    assert_eq!(setup.queue_depth(&lane.dead_queue).await, 0);

    shutdown.cancel();
    worker.await.unwrap().unwrap();
    setup.finish().await;
}

#[tokio::test]
async fn medcat_overloaded_past_the_retries_sends_jobs_through_the_retry_queue_within_their_budget() {
    let setup = Setup::new().await;
    let ids = setup.enqueue(&testing::keys(), &["Known AF.", "Started metformin.", "Known HTN."]).await;
    // MedCAT says it is ready but answers 503: each try of a batch makes 3
    // calls (2 in-process retries), then its jobs wait in the retry queue
    // and come back. 18 answers of 503 are more tries than the queue's
    // delivery limit (5) would allow if each were a redelivery; the budget
    // (10 attempts) is not used up, so nothing is dead-lettered.
    let proxy = fault_proxy(18, StatusCode::SERVICE_UNAVAILABLE).await;
    let shutdown = CancellationToken::new();
    let worker = setup.start_worker(&proxy.url, &shutdown).await;

    let rows = setup.wait_final(&ids).await;
    assert!(rows.iter().all(|r| r.0 == "done" && r.2 == 1), "{rows:?}");
    assert!(proxy.posts.load(std::sync::atomic::Ordering::SeqCst) >= 19);
    let lane = setup.topology.documents_live();
    assert_eq!(setup.queue_depth(&lane.dead_queue).await, 0, "nothing dead-lettered");
    let attempts: Vec<i32> =
        sqlx::query_scalar("SELECT attempts FROM documents").fetch_all(&setup.db.owner).await.unwrap();
    assert!(attempts.iter().all(|a| *a >= 2), "each job was tried again, not dropped: {attempts:?}");
    let retry = lane.retry_queue.as_deref().unwrap();
    assert_eq!(setup.queue_depth(retry).await, 0, "nothing left waiting");

    shutdown.cancel();
    worker.await.unwrap().unwrap();
    setup.finish().await;
}

#[tokio::test]
async fn a_worker_with_the_wrong_key_stops_without_failing_documents() {
    let setup = Setup::new().await;
    let wrong = Keys::new(Keyring::from_master_key(&SecretBox::new(Box::new([7u8; 32]))));
    let ids = setup.enqueue(&wrong, &["Known AF."]).await;
    let shutdown = CancellationToken::new();
    let worker = setup.start_worker(&testing::medcat_url(), &shutdown).await;

    let ended = tokio::time::timeout(Duration::from_secs(20), worker).await.expect("the worker stops by itself");
    let err = ended.unwrap().unwrap_err().to_string();
    assert!(err.contains("CLINFLOW_MASTER_KEY") && err.contains(&ids[0].to_string()), "{err}");
    let status: String = sqlx::query_scalar("SELECT status FROM documents").fetch_one(&setup.db.owner).await.unwrap();
    assert_ne!(status, "failed");
    let lane = setup.topology.documents_live();
    let deadline = Instant::now() + Duration::from_secs(10);
    while setup.queue_depth(&lane.queue).await == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(setup.queue_depth(&lane.queue).await, 1, "the job is back in the queue for a worker with the right key");
    assert_eq!(setup.queue_depth(&lane.dead_queue).await, 0);
    setup.finish().await;
}
