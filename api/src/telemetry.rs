//! The api's own metrics (beside the request counter and histogram of the
//! middleware in lib.rs, and the outbox gauges of `clinflow::relay`). Labels
//! are fixed words: how a document came, what became of it.

use axum::Json;
use axum::http::StatusCode;
use clinflow::wire::{BatchResponse, UploadResponse};

use crate::error::ApiError;

const UPLOADS: &str = "clinflow_uploads_total";
const VIA: [&str; 2] = ["single", "batch"];
const OUTCOMES: [&str; 5] = ["accepted", "duplicate", "rejected", "throttled", "error"];

/// Describes the api's metrics and exports each series at 0, so dashboards
/// and alerts find them before the first event.
pub fn register() {
    metrics::describe_counter!(
        "clinflow_http_requests_total",
        "HTTP requests answered, by method, route template and status class"
    );
    metrics::describe_histogram!(
        "clinflow_http_request_seconds",
        metrics::Unit::Seconds,
        "Time to answer an HTTP request, by method and route template"
    );
    metrics::describe_counter!(
        UPLOADS,
        "Documents offered for upload, by way (single, batch: one per line) and outcome \
         (accepted, duplicate source_ref, rejected, throttled: 429, error: 5xx)"
    );
    metrics::describe_counter!("clinflow_documents_uploaded_total", "Documents accepted, by way (single, batch)");
    metrics::describe_counter!("clinflow_uploads_throttled_total", "Upload requests answered 429 (backpressure)");
    metrics::describe_gauge!("clinflow_outbox_backlog", "Outbox rows not yet published to RabbitMQ");
    metrics::describe_gauge!(
        "clinflow_outbox_oldest_seconds",
        metrics::Unit::Seconds,
        "Age of the oldest unpublished outbox row: the relay's lag"
    );
    for via in VIA {
        metrics::counter!("clinflow_documents_uploaded_total", "via" => via).absolute(0);
        for outcome in OUTCOMES {
            metrics::counter!(UPLOADS, "via" => via, "outcome" => outcome).absolute(0);
        }
    }
    metrics::counter!("clinflow_uploads_throttled_total").absolute(0);
    metrics::counter!("clinflow_audit_denials_suppressed_total").absolute(0);
    metrics::counter!("clinflow_audit_events_published_total").absolute(0);
    metrics::gauge!("clinflow_outbox_backlog").set(0.0);
    metrics::gauge!("clinflow_outbox_oldest_seconds").set(0.0);
    // Security: logins, lockouts, refusals and break-glass grants.
    for outcome in ["success", "failure", "locked", "throttled", "shed"] {
        metrics::counter!("clinflow_logins_total", "outcome" => outcome).absolute(0);
    }
    metrics::counter!("clinflow_account_lockouts_total").absolute(0);
    metrics::counter!("clinflow_break_glass_grants_total").absolute(0);
    metrics::describe_counter!(
        PRIVACY_EVENTS,
        "Disclosures and erasures a privacy officer must hear of, by event (export, erasure_request, erasure, \
         break_glass); each one raises an alert"
    );
    for event in PRIVACY {
        metrics::counter!(PRIVACY_EVENTS, "event" => event).absolute(0);
    }
    for reason in ["role_forbidden", "out_of_scope", "password_change_required"] {
        metrics::counter!("clinflow_api_forbidden_total", "reason" => reason).absolute(0);
    }
    for reason in ["missing_token", "invalid_token", "expired_token", "session_ended", "invalid_api_key"] {
        metrics::counter!("clinflow_api_auth_rejected_total", "reason" => reason).absolute(0);
    }
}

const PRIVACY_EVENTS: &str = "clinflow_privacy_events_total";
const PRIVACY: [&str; 4] = ["export", "erasure_request", "erasure", "break_glass"];

/// Counts an export, an erasure (asked or done) or a break-glass grant:
/// `event` is one of [`PRIVACY`].
pub(crate) fn privacy_event(event: &'static str) {
    debug_assert!(PRIVACY.contains(&event));
    metrics::counter!(PRIVACY_EVENTS, "event" => event).increment(1);
}

/// Counts one single upload by what it was answered.
pub(crate) fn count_upload(answer: &Result<(StatusCode, Json<UploadResponse>), ApiError>) {
    let outcome = match answer {
        Ok(_) => "accepted",
        Err(ApiError::DuplicateSourceRef(_)) => "duplicate",
        Err(ApiError::Busy) => "throttled",
        Err(e) if e.status().is_server_error() => "error",
        Err(_) => "rejected",
    };
    metrics::counter!(UPLOADS, "via" => "single", "outcome" => outcome).increment(1);
}

/// Counts the lines of one batch upload by outcome.
pub(crate) fn count_batch(response: &BatchResponse) {
    for (outcome, n) in
        [("accepted", response.accepted), ("duplicate", response.duplicate), ("rejected", response.rejected)]
    {
        metrics::counter!(UPLOADS, "via" => "batch", "outcome" => outcome).increment(n as u64);
    }
}
