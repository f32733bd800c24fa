//! What a phase measures and the report reads: a run of the pipeline, the
//! processes' metrics and CPU time at an instant, uploads throttled.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::prom::{self, Snapshot};
use crate::stack::{self, Stack};

/// Uploads answered 429 (backpressure) and sent again after `Retry-After`.
pub static THROTTLED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

pub struct PipelineRun {
    pub docs: usize,
    pub upload_latencies: Vec<Duration>,
    /// When each of those requests was sent (due, for a paced client), from
    /// `started`, in the same order.
    pub upload_sent: Vec<Duration>,
    pub started: Instant,
    /// From the first upload sent until the last one answered.
    pub uploaded_after: Duration,
    /// From the first upload sent until every document is `done` and every
    /// audit event of the run is in the audit table.
    pub done_after: Duration,
}

impl PipelineRun {
    pub fn docs_per_s(&self) -> f64 {
        self.docs as f64 / self.done_after.as_secs_f64()
    }
}

/// Metrics and CPU time of every process at one instant.
pub struct Observation {
    pub at: Instant,
    pub metrics: BTreeMap<&'static str, Snapshot>,
    pub cpu_seconds: BTreeMap<String, f64>,
}

impl Observation {
    pub async fn take(stack: &Stack) -> anyhow::Result<Self> {
        let http = crate::http::client();
        let mut metrics = BTreeMap::new();
        let mut cpu_seconds = BTreeMap::new();
        for (name, pid) in stack.pids() {
            if let Some(service) = stack.service(name) {
                metrics.insert(name, prom::scrape(&http, &service.metrics_url).await?);
            }
            cpu_seconds.insert(format!("clinflow-{name}"), stack::cpu_seconds(pid).unwrap_or(0.0));
        }
        cpu_seconds.insert("postgresql (all backends)".into(), stack::cpu_seconds_of(&["postgres"]));
        cpu_seconds.insert("rabbitmq".into(), stack::cpu_seconds_of(&["beam.smp"]));
        let medcat = stack.medcat_pids().into_iter().filter_map(stack::cpu_seconds).sum();
        cpu_seconds.insert("medcat (python)".into(), medcat);
        cpu_seconds.insert("bench client + stand-in".into(), stack::cpu_seconds(std::process::id()).unwrap_or(0.0));
        Ok(Self { at: Instant::now(), metrics, cpu_seconds })
    }
}
