//! The worker as a process, killed with -9 or sent SIGTERM while batches are
//! in flight (MedCAT is reached through a proxy that holds every call for a
//! while, so there always is a batch in flight).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::Stdio;
use std::time::{Duration, Instant};

use base64::Engine as _;
use clinflow::testing;
use support::{Setup, slow_proxy};
use tokio_util::sync::CancellationToken;

fn spawn_worker(setup: &Setup, medcat_url: &str) -> tokio::process::Child {
    let metrics = clinflow::testing::free_addr();
    tokio::process::Command::new(env!("CARGO_BIN_EXE_clinflow-worker"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", setup.db.url_as(testing::WORKER_ROLE))
        .env("AMQP_URL", testing::amqp_url_string())
        .envs(testing::medcat_env(medcat_url))
        .envs(clinflow::testing::audit_keys().env("worker"))
        .env("CLINFLOW_MASTER_KEY", base64::engine::general_purpose::STANDARD.encode(testing::master_key()))
        .env("CLINFLOW_QUEUE_PREFIX", setup.topology.prefix())
        .env("METRICS_ADDR", metrics)
        .env("WORKER_BATCH_SIZE", "8")
        .env("WORKER_IN_FLIGHT", "2")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

async fn done(setup: &Setup) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM documents WHERE status = 'done'").fetch_one(&setup.db.owner).await.unwrap()
}

async fn wait_done_at_least(setup: &Setup, n: i64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while done(setup).await < n {
        assert!(Instant::now() < deadline, "fewer than {n} documents done");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn texts(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("Note {i}: known AF, started on metformin.")).collect()
}

#[tokio::test]
async fn kill_9_mid_batch_then_every_document_is_done_with_exactly_one_result() {
    let setup = Setup::new().await;
    let notes = texts(48);
    let ids = setup.enqueue(&testing::keys(), &notes.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let proxy = slow_proxy(Duration::from_millis(400)).await;
    let mut worker = spawn_worker(&setup, &proxy);
    wait_done_at_least(&setup, 8).await;
    worker.start_kill().unwrap();
    worker.wait().await.unwrap();
    let after_kill = done(&setup).await;
    assert!(after_kill < 48, "killed mid-run: {after_kill} of 48 done");

    // A fresh worker takes over what the killed one left: claimed
    // ('processing') documents come back by redelivery.
    let shutdown = CancellationToken::new();
    let second = setup.start_worker(&testing::medcat_url(), &shutdown).await;
    let rows = setup.wait_final(&ids).await;
    assert!(rows.iter().all(|r| r.0 == "done" && r.2 == 1), "every document done with exactly one result: {rows:?}");
    let results: i64 =
        sqlx::query_scalar("SELECT count(*) FROM document_results").fetch_one(&setup.db.owner).await.unwrap();
    assert_eq!(results, 48);
    assert_eq!(setup.queue_depth(&setup.topology.documents_live().dead_queue).await, 0);
    shutdown.cancel();
    second.await.unwrap().unwrap();
    setup.finish().await;
}

#[tokio::test]
async fn sigterm_finishes_the_batches_in_flight_and_exits_0() {
    let setup = Setup::new().await;
    let notes = texts(64);
    let ids = setup.enqueue(&testing::keys(), &notes.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let proxy = slow_proxy(Duration::from_millis(400)).await;
    let mut worker = spawn_worker(&setup, &proxy);
    wait_done_at_least(&setup, 8).await;
    let pid = worker.id().unwrap().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = tokio::time::timeout(Duration::from_secs(30), worker.wait()).await.expect("exits in time").unwrap();
    assert!(status.success(), "SIGTERM is a clean stop: {status}");

    // Nothing is left half-done: every document not done has its job back in the queue.
    let not_done: i64 = sqlx::query_scalar("SELECT count(*) FROM documents WHERE status <> 'done'")
        .fetch_one(&setup.db.owner)
        .await
        .unwrap();
    assert!(not_done > 0, "stopped before the end of the work");
    let lane = setup.topology.documents_live();
    let deadline = Instant::now() + Duration::from_secs(10);
    while i64::from(setup.queue_depth(&lane.queue).await) != not_done {
        assert!(Instant::now() < deadline, "{not_done} documents not done but not all their jobs are queued");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let shutdown = CancellationToken::new();
    let second = setup.start_worker(&testing::medcat_url(), &shutdown).await;
    let rows = setup.wait_final(&ids).await;
    assert!(rows.iter().all(|r| r.0 == "done" && r.2 == 1), "{rows:?}");
    shutdown.cancel();
    second.await.unwrap().unwrap();
    setup.finish().await;
}
