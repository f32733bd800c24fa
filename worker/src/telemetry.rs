//! The worker's metrics and MedCAT's readiness as the worker sees it.
//! Labels are fixed words (lane, outcome, reason, endpoint), never ids.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use clinflow::telemetry::UPLOAD_TO_DONE;
use tokio_util::sync::CancellationToken;

use crate::medcat::MedcatClient;

pub const DOCUMENTS: &str = "clinflow_worker_documents_total";
pub const DEAD_LETTERED: &str = "clinflow_worker_dead_lettered_total";
pub const IN_FLIGHT: &str = "clinflow_worker_batches_in_flight";
pub const PAUSED: &str = "clinflow_worker_paused";
pub const MEDCAT_READY: &str = "clinflow_medcat_ready";
pub const MEDCAT_SECONDS: &str = "clinflow_medcat_request_seconds";
/// Per-stage timings of a batch (see BENCHMARKS.md).
pub const STAGE: &str = "clinflow_worker_stage_seconds";

/// What becomes of a document: `done`, or its failure code.
const OUTCOMES: [&str; 8] = [
    "done",
    "nlp_error",
    "nlp_rejected",
    "nlp_unsuccessful",
    "nlp_bad_answer",
    "nlp_unavailable",
    "encrypt_failed",
    "retries_exhausted",
];
const DEAD_REASONS: [&str; 4] = ["malformed_job", "no_such_document", "retries_exhausted", "redelivered_too_often"];

/// Describes the worker's metrics and exports the counters at 0 (and the
/// gauges at their resting value), so that alerts and dashboards find them
/// before the first event.
pub fn register() {
    metrics::describe_counter!(DOCUMENTS, "Documents finished, by outcome: done or the failure code");
    metrics::describe_histogram!(
        UPLOAD_TO_DONE,
        metrics::Unit::Seconds,
        "From a document's upload (created_at) to its result stored, by lane"
    );
    metrics::describe_histogram!(
        MEDCAT_SECONDS,
        metrics::Unit::Seconds,
        "Calls to MedCAT by endpoint (process_bulk, process) and outcome (ok, unavailable, error, rejected, \
         unsuccessful, bad_answer)"
    );
    metrics::describe_counter!("clinflow_medcat_retries_total", "In-process retries of a MedCAT call");
    metrics::describe_counter!(
        "clinflow_worker_batch_retries_total",
        "Tries of a batch held while the database or MedCAT was unavailable"
    );
    metrics::describe_counter!(
        "clinflow_worker_delayed_retries_total",
        "Jobs sent to their lane's retry queue (an attempt counted)"
    );
    metrics::describe_counter!(DEAD_LETTERED, "Jobs parked in a .dead queue, by reason");
    metrics::describe_histogram!("clinflow_worker_batch_size", "Jobs per batch");
    metrics::describe_gauge!(IN_FLIGHT, "Batches being processed now");
    metrics::describe_gauge!(PAUSED, "1 while a batch is held because MedCAT or the database is unavailable");
    metrics::describe_gauge!(MEDCAT_READY, "1 while MedCAT's /api/health/ready answers 200 (polled every 5 s)");
    for outcome in OUTCOMES {
        metrics::counter!(DOCUMENTS, "outcome" => outcome).absolute(0);
    }
    for reason in DEAD_REASONS {
        metrics::counter!(DEAD_LETTERED, "reason" => reason).absolute(0);
    }
    for name in [
        "clinflow_medcat_retries_total",
        "clinflow_worker_batch_retries_total",
        "clinflow_worker_delayed_retries_total",
        "clinflow_worker_rechecks_total",
        "clinflow_worker_jobs_skipped_total",
        "clinflow_audit_events_published_total",
    ] {
        metrics::counter!(name).absolute(0);
    }
    metrics::gauge!(IN_FLIGHT).set(0.0);
    metrics::gauge!(PAUSED).set(0.0);
}

/// Batches held now (any slot); the `paused` gauge is 1 while any is.
static HELD: AtomicUsize = AtomicUsize::new(0);

/// Marks a batch held until the guard drops.
pub(crate) fn hold() -> Held {
    HELD.fetch_add(1, Ordering::Relaxed);
    metrics::gauge!(PAUSED).set(1.0);
    Held
}

pub(crate) struct Held;

impl Drop for Held {
    fn drop(&mut self) {
        if HELD.fetch_sub(1, Ordering::Relaxed) == 1 {
            metrics::gauge!(PAUSED).set(0.0);
        }
    }
}

/// Counts a batch in flight until the guard drops.
pub(crate) fn in_flight() -> InFlight {
    metrics::gauge!(IN_FLIGHT).increment(1.0);
    InFlight
}

pub(crate) struct InFlight;

impl Drop for InFlight {
    fn drop(&mut self) {
        metrics::gauge!(IN_FLIGHT).decrement(1.0);
    }
}

/// Records the upload → done time of documents just stored.
pub(crate) fn record_done(done: &[(String, f64)]) {
    for (lane, seconds) in done {
        let lane = if lane == "backfill" { "backfill" } else { "live" };
        metrics::histogram!(UPLOAD_TO_DONE, "lane" => lane).record(*seconds);
    }
}

/// MedCAT's readiness as last polled: for `/readyz` and the
/// `clinflow_medcat_ready` gauge.
#[derive(Debug, Clone, Default)]
pub struct MedcatHealth(Arc<AtomicBool>);

impl MedcatHealth {
    pub fn ready(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    /// Polls `GET /api/health/ready` every `every` until `shutdown` fires.
    pub async fn watch(self, medcat: MedcatClient, every: Duration, shutdown: CancellationToken) {
        loop {
            let ready = medcat.ready().await;
            self.0.store(ready, Ordering::Relaxed);
            metrics::gauge!(MEDCAT_READY).set(if ready { 1.0 } else { 0.0 });
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
        }
    }
}
