//! Shared by the worker's integration tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use backon::ExponentialBuilder;
use clinflow::amqp::{Lane, Publisher, Topology};
use clinflow::documents::{self, NewDocument};
use clinflow::keys::{Keys, PatientRef};
use clinflow::link::LinkState;
use clinflow::testing::{self, TestDb};
use clinflow_worker::medcat::MedcatClient;
use clinflow_worker::{BatchConfig, RetryConfig, Worker};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// FAULT-INJECTING PROXY in front of the real MedCAT: answers `status` to the
/// first `failures` POSTs, then forwards every request to the real service.
/// It exists for what the real service cannot be made to do on demand:
/// answer 503 (or 429 with Retry-After) a given number of times.
/// `set_failures` changes how many POSTs (counted from the start) fail, so
/// a test can end an outage; `set_down(true)` makes every request, health
/// checks included, answer 503 (MedCAT down).
pub struct FaultProxy {
    pub url: String,
    pub posts: Arc<AtomicUsize>,
    /// Requests refused while down.
    pub refused: Arc<AtomicUsize>,
    failures: Arc<AtomicUsize>,
    down: Arc<std::sync::atomic::AtomicBool>,
}

impl FaultProxy {
    pub fn set_failures(&self, failures: usize) {
        self.failures.store(failures, Ordering::SeqCst);
    }

    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }
}

type ProxyState = (
    Arc<AtomicUsize>,
    Arc<AtomicUsize>,
    Arc<std::sync::atomic::AtomicBool>,
    Arc<AtomicUsize>,
    StatusCode,
    reqwest::Client,
);

pub async fn fault_proxy(failures: usize, status: StatusCode) -> FaultProxy {
    let posts = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(AtomicUsize::new(failures));
    let down = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let refused = Arc::new(AtomicUsize::new(0));
    let state = (
        Arc::clone(&posts),
        Arc::clone(&failures),
        Arc::clone(&down),
        Arc::clone(&refused),
        status,
        clinflow::testing::http(),
    );
    async fn forward(
        State((posts, failures, down, refused, status, http)): State<ProxyState>,
        uri: Uri,
        method: Method,
        body: Bytes,
    ) -> Response {
        if down.load(Ordering::SeqCst) {
            refused.fetch_add(1, Ordering::SeqCst);
            return StatusCode::SERVICE_UNAVAILABLE.into_response();
        }
        if method == Method::POST && posts.fetch_add(1, Ordering::SeqCst) < failures.load(Ordering::SeqCst) {
            return status.into_response();
        }
        let url = format!("{}{}", testing::medcat_url(), uri.path());
        let resp =
            http.request(method, url).header("content-type", "application/json").body(body).send().await.unwrap();
        (StatusCode::from_u16(resp.status().as_u16()).unwrap(), resp.bytes().await.unwrap()).into_response()
    }
    let app = Router::new().fallback(forward).with_state(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    FaultProxy { url: format!("http://{addr}"), posts, refused, failures, down }
}

/// FAULT-INJECTING PROXY: forwards to the real MedCAT, holding every POST
/// for `delay` first, so a test can act while a batch is in flight.
pub async fn slow_proxy(delay: Duration) -> String {
    let http = clinflow::testing::http();
    async fn forward(
        State((delay, http)): State<(Duration, reqwest::Client)>,
        uri: Uri,
        method: Method,
        body: Bytes,
    ) -> Response {
        if method == Method::POST {
            tokio::time::sleep(delay).await;
        }
        let url = format!("{}{}", testing::medcat_url(), uri.path());
        let resp =
            http.request(method, url).header("content-type", "application/json").body(body).send().await.unwrap();
        (StatusCode::from_u16(resp.status().as_u16()).unwrap(), resp.bytes().await.unwrap()).into_response()
    }
    let app = Router::new().fallback(forward).with_state((delay, http));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

/// A worker's test bed: its own database and queue names, jobs queued before it starts.
pub struct Setup {
    pub db: TestDb,
    pub topology: Topology,
    pub amqp: lapin::Connection,
    pub publisher: Publisher,
    uploader: Uuid,
}

impl Setup {
    pub async fn new() -> Self {
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

    /// Stores each text as a document of patient PAT-1 (sealed under their
    /// data key, created with `keys` if missing) and queues its
    /// job on the live lane.
    pub async fn enqueue(&self, keys: &Keys, texts: &[&str]) -> Vec<Uuid> {
        self.enqueue_on(keys, texts, Lane::Live).await
    }

    pub async fn enqueue_on(&self, keys: &Keys, texts: &[&str], lane: Lane) -> Vec<Uuid> {
        let mut ids = Vec::new();
        let patient_index = documents::patient_index(&clinflow::testing::index_key(), "PAT-1");
        for text in texts {
            let id = Uuid::now_v7();
            let mut conn = self.db.api.acquire().await.unwrap();
            let key = keys.for_patient(&mut conn, PatientRef::new(&patient_index, "PAT-1")).await.unwrap();
            let doc = NewDocument {
                id,
                data_key_id: key.id(),
                patient_ref_ct: key.seal_str(documents::patient_ref_field(id), "PAT-1").unwrap(),
                patient_index: patient_index.clone(),
                text_ct: key.seal_str(documents::text_field(id), text).unwrap(),
                source_ref_hmac: None,
                document_date: None,
                uploaded_by: self.uploader,
                lawful_basis: "direct_care",
                consent_index: None,
            };
            documents::insert(&mut conn, &doc).await.unwrap();
            clinflow::jobs::publish(&self.publisher, &self.topology, lane, id).await.unwrap();
            ids.push(id);
        }
        ids
    }

    /// A worker whose jobs get 10 attempts, 100 ms apart at first.
    pub async fn start_worker(&self, medcat_url: &str, shutdown: &CancellationToken) -> JoinHandle<anyhow::Result<()>> {
        let retry = RetryConfig {
            max_attempts: 10,
            first_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
        };
        self.start_worker_with(medcat_url, shutdown, retry).await
    }

    pub async fn start_worker_with(
        &self,
        medcat_url: &str,
        shutdown: &CancellationToken,
        retry: RetryConfig,
    ) -> JoinHandle<anyhow::Result<()>> {
        let backoff = ExponentialBuilder::default().with_min_delay(Duration::from_millis(20)).with_max_times(2);
        let medcat = MedcatClient::new(medcat_url, testing::medcat_ca_file().as_deref(), backoff).unwrap();
        let worker = Arc::new(Worker {
            db: self.db.worker.clone(),
            keys: Arc::new(testing::keys()),
            model_version: medcat.model_version().await.unwrap(),
            medcat,
            topology: self.topology.clone(),
            audit_signer: testing::audit_keys().worker.clone(),
            batch: BatchConfig {
                size: 16,
                max_wait: Duration::from_millis(200),
                in_flight: 2,
                max_pause: Duration::from_millis(200),
            },
            retry,
        });
        let shutdown = shutdown.clone();
        tokio::spawn(async move { worker.run(&testing::amqp_url(), &LinkState::default(), shutdown).await })
    }

    /// (status, failure_code, result rows) of each document once none is
    /// queued or processing, or at the deadline.
    pub async fn wait_final(&self, ids: &[Uuid]) -> Vec<(String, Option<String>, i64)> {
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

    pub async fn queue_depth(&self, queue: &str) -> u32 {
        let channel = self.amqp.create_channel().await.unwrap();
        let options = lapin::options::QueueDeclareOptions { passive: true, ..Default::default() };
        channel.queue_declare(queue.into(), options, lapin::types::FieldTable::default()).await.unwrap().message_count()
    }

    pub async fn finish(self) {
        testing::delete_queues(&self.topology, &self.amqp).await;
        self.db.drop_database().await;
    }
}
