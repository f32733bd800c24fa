//! Longer outages and the lanes, against the real PostgreSQL, RabbitMQ and
//! MedCAT, with the FAULT-INJECTING PROXY of support/ in front of MedCAT
//! where an outage must be produced on demand: a budget used up (dead
//! letters, documents failed, then replayed to done), MedCAT down (the
//! worker pauses and spends no attempt), and live jobs served before a
//! backlog of backfill jobs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashSet;
use std::time::Duration;

use axum::http::StatusCode;
use clinflow::amqp::Lane;
use clinflow::deadletters::{self, Selection};
use clinflow::testing::{self, wait_until};
use clinflow_worker::RetryConfig;
use support::{Setup, fault_proxy};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Three attempts, 100 ms then 200 ms apart: a short budget for tests.
fn short_budget() -> RetryConfig {
    RetryConfig { max_attempts: 3, first_delay: Duration::from_millis(100), max_delay: Duration::from_secs(1) }
}

#[tokio::test]
async fn past_its_budget_a_job_is_dead_lettered_with_its_document_failed_and_replay_brings_it_to_done() {
    let setup = Setup::new().await;
    let ids = setup.enqueue(&testing::keys(), &["Known AF.", "Started metformin."]).await;
    // MedCAT ready, but every processing call answers 503: more than the
    // three attempts can absorb.
    let proxy = fault_proxy(usize::MAX, StatusCode::SERVICE_UNAVAILABLE).await;
    let shutdown = CancellationToken::new();
    let worker = setup.start_worker_with(&proxy.url, &shutdown, short_budget()).await;

    let rows = setup.wait_final(&ids).await;
    assert!(rows.iter().all(|r| r.0 == "failed" && r.1.as_deref() == Some("retries_exhausted")), "{rows:?}");
    let lane = setup.topology.documents_live();
    wait_until("both jobs parked", Duration::from_secs(10), async || setup.queue_depth(&lane.dead_queue).await == 2)
        .await;
    let claims: Vec<i32> =
        sqlx::query_scalar("SELECT attempts FROM documents").fetch_all(&setup.db.owner).await.unwrap();
    assert!(claims.iter().all(|c| *c == 3), "three attempts each: {claims:?}");

    // Listing consumes nothing, names ids and reasons only.
    let operator = testing::audit_keys().operator("clinflow-worker");
    let listing = deadletters::list(&setup.amqp, &setup.topology, &operator).await.unwrap();
    assert_eq!(listing.by_reason.get("retries_exhausted"), Some(&2), "{listing:?}");
    let listed: HashSet<Uuid> = listing.jobs.iter().filter_map(|j| j.document_id).collect();
    assert_eq!(listed, ids.iter().copied().collect());
    assert!(listing.jobs.iter().all(|j| j.attempts == 3 && j.lane == "live"));
    assert_eq!(setup.queue_depth(&lane.dead_queue).await, 2, "listing put every message back");

    // MedCAT recovers; the operator replays one job, then the rest.
    proxy.set_failures(0);
    let one = deadletters::replay(
        &setup.amqp,
        &setup.db.worker,
        &setup.topology,
        &Selection::Documents([ids[0]].into()),
        &operator,
    )
    .await
    .unwrap();
    assert_eq!(one.replayed, [ids[0]]);
    assert_eq!(setup.queue_depth(&lane.dead_queue).await, 1);
    let rest =
        deadletters::replay(&setup.amqp, &setup.db.worker, &setup.topology, &Selection::All, &operator).await.unwrap();
    assert_eq!(rest.replayed, [ids[1]]);
    let rows = setup.wait_final(&ids).await;
    assert!(rows.iter().all(|r| r.0 == "done" && r.2 == 1), "{rows:?}");
    assert_eq!(setup.queue_depth(&lane.dead_queue).await, 0);

    shutdown.cancel();
    worker.await.unwrap().unwrap();
    setup.finish().await;
}

#[tokio::test]
async fn while_medcat_is_down_the_worker_pauses_and_spends_no_attempt() {
    let setup = Setup::new().await;
    let proxy = fault_proxy(0, StatusCode::SERVICE_UNAVAILABLE).await;
    let shutdown = CancellationToken::new();
    let worker = setup.start_worker_with(&proxy.url, &shutdown, short_budget()).await;
    proxy.set_down(true);
    let ids = setup.enqueue(&testing::keys(), &["Known AF.", "Known HTN."]).await;

    // Down (health checks failing too): the worker polls readiness once a
    // second. Six refusals past the batch's own three calls is longer than
    // three attempts would last if each were spent (100 + 200 ms apart).
    wait_until("the worker polling a MedCAT that is down", Duration::from_secs(20), async || {
        proxy.refused.load(std::sync::atomic::Ordering::SeqCst) >= 9
    })
    .await;
    let statuses: Vec<String> =
        sqlx::query_scalar("SELECT status FROM documents").fetch_all(&setup.db.owner).await.unwrap();
    assert!(statuses.iter().all(|s| s == "processing"), "held, not failed: {statuses:?}");
    proxy.set_down(false);

    let rows = setup.wait_final(&ids).await;
    assert!(rows.iter().all(|r| r.0 == "done" && r.2 == 1), "{rows:?}");
    let lane = setup.topology.documents_live();
    assert_eq!(setup.queue_depth(&lane.dead_queue).await, 0, "nothing dead-lettered");
    let claims: Vec<i32> =
        sqlx::query_scalar("SELECT attempts FROM documents").fetch_all(&setup.db.owner).await.unwrap();
    // Claimed when it came, and once more when MedCAT was back: the held
    // batch was run again, none of its jobs went through the retry queue
    // (three attempts would have dead-lettered them long before).
    assert!(claims.iter().all(|c| *c == 2), "{claims:?}");
    shutdown.cancel();
    worker.await.unwrap().unwrap();
    setup.finish().await;
}

#[tokio::test]
async fn a_live_job_is_served_before_a_backlog_of_backfill_jobs() {
    let setup = Setup::new().await;
    let keys = testing::keys();
    let texts: Vec<String> = (0..300).map(|i| format!("Note {i}: known atrial fibrillation, on metformin.")).collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let backfill = setup.enqueue_on(&keys, &refs, Lane::Backfill).await;
    // Every MedCAT call held 100 ms (SLOW PROXY), so the backlog takes
    // seconds to drain and the order is not blurred by polling.
    let medcat = support::slow_proxy(Duration::from_millis(100)).await;
    let shutdown = CancellationToken::new();
    let worker = setup.start_worker(&medcat, &shutdown).await;
    let done_count = async || -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM documents WHERE status = 'done'")
            .fetch_one(&setup.db.owner)
            .await
            .unwrap()
    };
    wait_until("backfill under way", Duration::from_secs(20), async || done_count().await > 0).await;
    let live = setup.enqueue_on(&keys, &["Known HTN."], Lane::Live).await[0];
    let done_when_queued = done_count().await;
    let rows = setup.wait_final(&[live]).await;
    assert_eq!(rows[0].0, "done");
    let done_before_live: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM documents WHERE id = ANY($1) AND status = 'done'
           AND updated_at <= (SELECT updated_at FROM documents WHERE id = $2)",
    )
    .bind(&backfill)
    .bind(live)
    .fetch_one(&setup.db.owner)
    .await
    .unwrap();
    // It waits only for the batches in hand: the two slots' (2 × 16), one
    // more of the other slot if its job went to a slot mid-batch (16), and
    // the backfill jobs that filled its own batch (15).
    let waited = done_before_live - done_when_queued;
    assert!(waited <= 3 * 16 + 15, "the live job waited for {waited} backfill documents");
    assert!(done_before_live < 300 - 100, "most of the backlog was still waiting: {done_before_live} done before");
    let rows = setup.wait_final(&backfill).await;
    assert!(rows.iter().all(|r| r.0 == "done"));
    shutdown.cancel();
    worker.await.unwrap().unwrap();
    setup.finish().await;
}
