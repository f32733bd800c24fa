//! The worker's batch loop against the real PostgreSQL, RabbitMQ and MedCAT
//! (the test MedCAT of ./dev/test raises on texts holding
//! MEDCAT_DEV_FAIL_MARKER: a real model failure on demand). Jobs are queued
//! before the worker starts, so each test's documents form one batch.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use backon::ExponentialBuilder;
use clinflow::amqp::{Publisher, Topology};
use clinflow::crypto::Keyring;
use clinflow::documents::{self, NewDocument};
use clinflow::link::LinkState;
use clinflow::testing::{self, TestDb};
use clinflow_worker::medcat::MedcatClient;
use clinflow_worker::{BatchConfig, Worker};
use secrecy::SecretBox;
use support::fault_proxy;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

struct Setup {
    db: TestDb,
    topology: Topology,
    amqp: lapin::Connection,
    publisher: Publisher,
    uploader: Uuid,
}

impl Setup {
    async fn new() -> Self {
        clinflow::telemetry::init_tracing();
        let db = TestDb::new().await;
        let (topology, amqp) = testing::topology().await;
        let uploader = Uuid::now_v7();
        sqlx::query("INSERT INTO users (id, username, password_hash, role) VALUES ($1, 'up', 'x', 'ingest')")
            .bind(uploader)
            .execute(&db.owner)
            .await
            .unwrap();
        let publisher = Publisher::new(&amqp).await.unwrap();
        Self { db, topology, amqp, publisher, uploader }
    }

    /// Stores each text as a document (sealed with `keyring`) and queues its job.
    async fn enqueue(&self, keyring: &Keyring, texts: &[&str]) -> Vec<Uuid> {
        let mut ids = Vec::new();
        for text in texts {
            let id = Uuid::now_v7();
            let doc = NewDocument {
                id,
                patient_ref_ct: keyring.seal_str(documents::patient_ref_field(id), "PAT-1").unwrap(),
                text_ct: keyring.seal_str(documents::text_field(id), text).unwrap(),
                source_ref_hmac: None,
                document_date: None,
                uploaded_by: self.uploader,
            };
            let mut conn = self.db.app.acquire().await.unwrap();
            documents::insert(&mut conn, &doc).await.unwrap();
            clinflow::jobs::publish(&self.publisher, &self.topology, id).await.unwrap();
            ids.push(id);
        }
        ids
    }

    async fn start_worker(&self, medcat_url: &str, shutdown: &CancellationToken) -> JoinHandle<anyhow::Result<()>> {
        let backoff = ExponentialBuilder::default().with_min_delay(Duration::from_millis(20)).with_max_times(2);
        let medcat = MedcatClient::new(medcat_url, backoff).unwrap();
        let worker = Arc::new(Worker {
            db: self.db.app.clone(),
            keyring: Arc::new(testing::keyring()),
            model_version: medcat.model_version().await.unwrap(),
            medcat,
            topology: self.topology.clone(),
            batch: BatchConfig {
                size: 16,
                max_wait: Duration::from_millis(200),
                in_flight: 2,
                max_pause: Duration::from_millis(200),
            },
        });
        let shutdown = shutdown.clone();
        tokio::spawn(async move { worker.run(&testing::amqp_url(), &LinkState::default(), shutdown).await })
    }

    /// (status, failure_code, result rows) of each document once none is
    /// queued or processing, or at the deadline.
    async fn wait_final(&self, ids: &[Uuid]) -> Vec<(String, Option<String>, i64)> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut rows = Vec::new();
            for id in ids {
                let row: (String, Option<String>, i64) = sqlx::query_as(
                    "SELECT status, failure_code, (SELECT count(*) FROM document_results WHERE document_id = d.id)
                     FROM documents d WHERE id = $1",
                )
                .bind(id)
                .fetch_one(&self.db.owner)
                .await
                .unwrap();
                rows.push(row);
            }
            if rows.iter().all(|r| r.0 == "done" || r.0 == "failed") || Instant::now() > deadline {
                return rows;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn queue_depth(&self, queue: &str) -> u32 {
        let channel = self.amqp.create_channel().await.unwrap();
        let options = lapin::options::QueueDeclareOptions { passive: true, ..Default::default() };
        channel.queue_declare(queue.into(), options, lapin::types::FieldTable::default()).await.unwrap().message_count()
    }

    async fn finish(self) {
        testing::delete_queues(&self.topology, &self.amqp).await;
        self.db.drop_database().await;
    }
}

fn fail_marker() -> String {
    std::env::var("MEDCAT_DEV_FAIL_MARKER").expect("MEDCAT_DEV_FAIL_MARKER (./dev/test sets it for its MedCAT)")
}

#[tokio::test]
async fn a_silent_bulk_failure_is_rechecked_alone_and_fails_only_its_document() {
    let setup = Setup::new().await;
    let poison = format!("Known AF. {}", fail_marker());
    let texts = ["Started metformin for T2DM.", poison.as_str(), "Patient well, reviewed today.", "Known HTN."];
    let ids = setup.enqueue(&testing::keyring(), &texts).await;
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
    let ids = setup.enqueue(&testing::keyring(), &["Known AF.", "Started metformin."]).await;
    // The same jobs again, as a redelivery or a replay would bring them.
    for id in &ids {
        clinflow::jobs::publish(&setup.publisher, &setup.topology, *id).await.unwrap();
    }
    let shutdown = CancellationToken::new();
    let worker = setup.start_worker(&testing::medcat_url(), &shutdown).await;
    let rows = setup.wait_final(&ids).await;
    assert!(rows.iter().all(|r| r.0 == "done" && r.2 == 1), "{rows:?}");

    // And once more after they are done.
    clinflow::jobs::publish(&setup.publisher, &setup.topology, ids[0]).await.unwrap();
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
async fn medcat_overloaded_past_the_retries_holds_the_batch_and_dead_letters_nothing() {
    let setup = Setup::new().await;
    let ids = setup.enqueue(&testing::keyring(), &["Known AF.", "Started metformin.", "Known HTN."]).await;
    // Each try of the batch makes 3 calls (2 retries): 18 answers of 503 are
    // six exhausted tries, more than the queue's delivery limit (5) would
    // allow if each try were a redelivery. Held, the batch is simply retried.
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
    assert!(attempts.iter().all(|a| *a >= 7), "the batch was tried again, not dropped: {attempts:?}");

    shutdown.cancel();
    worker.await.unwrap().unwrap();
    setup.finish().await;
}

#[tokio::test]
async fn a_worker_with_the_wrong_key_stops_without_failing_documents() {
    let setup = Setup::new().await;
    let wrong = Keyring::from_master_key(&SecretBox::new(Box::new([7u8; 32])));
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
