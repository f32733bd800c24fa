//! Logging and metrics set-up shared by every binary.
//!
//! Logs are JSON lines on stderr (`LOG_FORMAT=text` for humans), filtered by
//! `RUST_LOG` (default `info`). Fields carry ids — document id, request id,
//! user id — and never document text or patient references.

use std::net::SocketAddr;
use std::time::Instant;

use metrics_exporter_prometheus::PrometheusBuilder;
use tracing_subscriber::EnvFilter;

pub fn init_tracing() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let text = std::env::var("LOG_FORMAT").is_ok_and(|f| f == "text");
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    // A second initialisation (tests) is harmless: keep the first subscriber.
    let _ = if text { builder.try_init() } else { builder.json().flatten_event(true).try_init() };
}

/// Serves Prometheus metrics at `http://{addr}/metrics`.
pub fn install_metrics(addr: SocketAddr) -> anyhow::Result<()> {
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .install()
        .map_err(|e| anyhow::anyhow!("METRICS_ADDR {addr}: cannot serve metrics: {e}"))
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
