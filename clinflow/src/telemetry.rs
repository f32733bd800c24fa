//! Logging, metrics and health endpoints shared by every binary.
//!
//! Logs are JSON lines on stderr (`LOG_FORMAT=text` for humans), filtered by
//! `RUST_LOG` (default `info`). Fields carry ids — document id, request id,
//! user id — and never document text or patient references.
//!
//! Each service serves, on its own port (`METRICS_ADDR`), `/metrics`
//! (Prometheus text), `/healthz` (the process is alive) and `/readyz` (its
//! dependencies answer, as the service's [`Probes`] say). Metric labels are
//! fixed, low-cardinality words (route templates, outcomes, reasons), never
//! ids or text.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::future::BoxFuture;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde_json::json;
use tracing_subscriber::EnvFilter;

/// A service's `main` (worker, audit sink): logs set up, the TLS crypto
/// provider installed, panics logged without their message, then `run`
/// (which parses the command line) and its outcome as the exit code.
pub async fn service_main<F>(binary: &str, run: impl FnOnce() -> F) -> std::process::ExitCode
where
    F: Future<Output = anyhow::Result<()>>,
{
    init_tracing();
    crate::tls::install_crypto_provider();
    log_panics_without_their_message();
    exit_code(binary, run().await)
}

/// How a binary's `main` ends: success, or the error with its causes on one
/// line of stderr, after the binary's name (a start-up error names the
/// variable; nothing here logs a secret).
pub fn exit_code(binary: &str, result: anyhow::Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{binary}: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Replaces the default panic hook, which prints the panic's message:
/// a message can quote what the code was holding (a failed slice of a
/// string prints the string), and here that may be a note. The hook logs
/// where, never what; the api answers the request with its JSON 500
/// (request id only); the worker and sink end or retry the batch.
pub fn log_panics_without_their_message() {
    std::panic::set_hook(Box::new(|info| {
        let location = info.location().map(|l| format!("{}:{}", l.file(), l.line()));
        let thread = std::thread::current().name().map(str::to_owned);
        tracing::error!(location, thread, "panicked (the message is not logged: it may quote PHI)");
    }));
}

pub fn init_tracing() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let text = std::env::var("LOG_FORMAT").is_ok_and(|f| f == "text");
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    // A second initialisation (tests) is harmless: keep the first subscriber.
    let _ = if text { builder.try_init() } else { builder.json().flatten_event(true).try_init() };
}

/// Bucket bounds (seconds) of every `*_seconds` histogram: requests, MedCAT
/// calls, batch stages. Rendered as real Prometheus histograms, so
/// `histogram_quantile` works across instances.
const LATENCY_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.02, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];
/// Upload → done: seconds to hours (a backfill may queue for long).
const PIPELINE_BUCKETS: &[f64] =
    &[0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 4.0 * 3600.0, 86400.0];
/// Items per batch (worker documents, audit events).
const SIZE_BUCKETS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0];

/// The upload → done histogram's name (bucketed for long waits).
pub const UPLOAD_TO_DONE: &str = "clinflow_worker_upload_to_done_seconds";

/// How often the recorder's upkeep runs (the exporter's own listener would
/// do it; ours must): histogram buckets are drained on it.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// The process's Prometheus recorder, installed on first use. Tests that
/// start several services in one process share it.
pub fn recorder() -> anyhow::Result<PrometheusHandle> {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    if let Some(handle) = HANDLE.get() {
        return Ok(handle.clone());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(UPLOAD_TO_DONE.into()), PIPELINE_BUCKETS)?
        .set_buckets_for_metric(Matcher::Suffix("_batch_size".into()), SIZE_BUCKETS)?
        .install_recorder();
    match handle {
        Ok(handle) => Ok(HANDLE.get_or_init(|| handle).clone()),
        // Another thread installed it in between.
        Err(_) => {
            HANDLE.get().cloned().ok_or_else(|| anyhow::anyhow!("a metrics recorder of another kind is installed"))
        }
    }
}

/// One dependency's state at `/readyz`.
pub type Check = (&'static str, bool);

/// What `/healthz` and `/readyz` answer for one service.
#[derive(Clone)]
pub struct Probes {
    live: Arc<dyn Fn() -> bool + Send + Sync>,
    ready: Arc<dyn Fn() -> BoxFuture<'static, Vec<Check>> + Send + Sync>,
}

impl Probes {
    /// Ready when every check `ready` returns is up; alive while the
    /// process answers.
    pub fn new<F, Fut>(ready: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<Check>> + Send + 'static,
    {
        Self { live: Arc::new(|| true), ready: Arc::new(move || Box::pin(ready())) }
    }

    /// Alive only while `live` holds (something that cannot come back
    /// without a restart).
    pub fn with_liveness(self, live: impl Fn() -> bool + Send + Sync + 'static) -> Self {
        Self { live: Arc::new(live), ..self }
    }
}

/// Whether PostgreSQL answers within 2 s, for readiness.
pub async fn database_ready(db: &sqlx::PgPool) -> bool {
    let ping = sqlx::query_scalar!("SELECT 1 AS one").fetch_one(db);
    matches!(tokio::time::timeout(Duration::from_secs(2), ping).await, Ok(Ok(_)))
}

/// Binds `addr` (failing at start-up if it cannot) and serves `/metrics`,
/// `/healthz` and `/readyz` there until the process ends; runs the
/// recorder's upkeep.
pub async fn serve_ops(addr: SocketAddr, probes: Probes) -> anyhow::Result<SocketAddr> {
    let handle = recorder()?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("METRICS_ADDR {addr}: cannot serve metrics: {e}"))?;
    let bound = listener.local_addr()?;
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(UPKEEP_EVERY);
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    let app = ops_router(handle, probes);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the metrics listener stopped");
        }
    });
    tracing::info!(addr = %bound, "serving /metrics, /healthz, /readyz");
    Ok(bound)
}

fn ops_router(handle: PrometheusHandle, probes: Probes) -> Router {
    Router::new()
        .route("/metrics", get(render))
        .with_state(handle)
        .merge(Router::new().route("/healthz", get(live)).route("/readyz", get(ready)).with_state(probes))
}

async fn render(State(handle): State<PrometheusHandle>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], handle.render()).into_response()
}

async fn live(State(probes): State<Probes>) -> Response {
    if (probes.live)() {
        axum::Json(json!({"status": "ok"})).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, axum::Json(json!({"status": "stopped"}))).into_response()
    }
}

async fn ready(State(probes): State<Probes>) -> Response {
    let checks = (probes.ready)().await;
    let all = checks.iter().all(|(_, up)| *up);
    let body: serde_json::Map<String, serde_json::Value> =
        checks.iter().map(|(name, up)| ((*name).to_owned(), json!(if *up { "up" } else { "down" }))).collect();
    let status = if all { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, axum::Json(json!({"status": if all { "ready" } else { "not ready" }, "checks": body}))).into_response()
}

/// Awaits `work` and records its duration in the histogram `metric` under
/// the label `stage`: the per-stage breakdown that `./bench/run` reports.
pub async fn timed<F: Future>(metric: &'static str, stage: &'static str, work: F) -> F::Output {
    let started = Instant::now();
    let output = work.await;
    metrics::histogram!(metric, "stage" => stage).record(started.elapsed().as_secs_f64());
    output
}

/// [`timed`] for synchronous work.
pub fn timed_sync<T>(metric: &'static str, stage: &'static str, work: impl FnOnce() -> T) -> T {
    let started = Instant::now();
    let output = work();
    metrics::histogram!(metric, "stage" => stage).record(started.elapsed().as_secs_f64());
    output
}
