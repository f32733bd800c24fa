//! clinflow-api: log in, upload documents, read their results.

pub mod access;
mod admin;
mod audit_api;
pub mod auth;
pub mod batch;
pub mod care;
pub mod cli;
pub mod config;
pub mod denials;
pub mod documents;
pub mod error;
pub mod idempotency;
pub mod openapi;
mod ops;
mod patients;
pub mod telemetry;
pub mod users;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderName, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use clinflow::audit::AuditEvent;
use clinflow::crypto::IndexKey;
use clinflow::keys::Keys;
use clinflow::outbox;
use clinflow::relay::RelayHandle;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::auth::JwtKeys;
use crate::error::ApiError;
use crate::users::Passwords;

// Dates in JSON as `YYYY-MM-DD` (`#[serde(with = "crate::ymd::option")]`).
time::serde::format_description!(pub(crate) ymd, Date, "[year]-[month]-[day]");

/// Request bodies above this are refused with 413 before they are parsed.
const MAX_BODY_BYTES: usize = 2 * documents::MAX_TEXT_BYTES;

#[derive(Clone)]
pub struct AppState {
    pub db: PgPool,
    /// The key-encryption keys and the cache of patients' data keys.
    pub keys: Arc<Keys>,
    /// Keyed hashes of source refs and idempotency keys.
    pub index_key: Arc<IndexKey>,
    /// The outbox relay of this process: woken after each commit, and the
    /// source of readiness and backpressure.
    pub relay: RelayHandle,
    pub jwt: Arc<JwtKeys>,
    pub passwords: Passwords,
    pub idle_timeout: Duration,
    pub limits: UploadLimits,
    pub batch_limits: batch::BatchLimits,
    /// For the ops endpoints, which open their own broker connection.
    pub amqp_url: secrecy::SecretString,
    pub topology: clinflow::amqp::Topology,
    /// The auditor endpoints' own connection, as the read-only
    /// `clinflow_audit_reader` role (`AUDIT_READER_DATABASE_URL`): the
    /// api's own role cannot touch `audit_events`.
    pub audit_db: Option<PgPool>,
    /// For `POST /v1/audit/verify` (`AUDIT_HMAC_KEY`, optional for the api).
    pub audit_key: Option<Arc<clinflow::chain::ChainKey>>,
    /// The sink's checkpoint file, if this api can read it.
    pub audit_checkpoints: Option<std::path::PathBuf>,
    /// How many refusals per source address are audited one by one.
    pub denials: Arc<denials::DenialLimiter>,
    /// Lockout policy and per-address login rate.
    pub login: Arc<auth::LoginGuard>,
    /// How long a break-glass grant lasts (`BREAK_GLASS_MINUTES`).
    pub break_glass_for: Duration,
}

/// Backpressure: uploads answer 429 while the outbox or the live queue holds
/// more than this (as last measured by the relay).
#[derive(Debug, Clone, Copy)]
pub struct UploadLimits {
    pub max_outbox: u64,
    pub max_queued: u64,
}

impl Default for UploadLimits {
    fn default() -> Self {
        Self { max_outbox: 100_000, max_queued: 2_000_000 }
    }
}

impl AppState {
    /// Writes an audit event to the outbox (committed in PostgreSQL before
    /// this returns); a failure fails the request with 503 before anything is
    /// shown. Where the audited action itself writes, use
    /// `outbox::enqueue` in its transaction instead.
    pub async fn audit(&self, event: &AuditEvent) -> Result<(), ApiError> {
        let message = outbox::Message::audit(event).map_err(anyhow::Error::new)?;
        let mut conn = self.db.acquire().await.map_err(|e| audit_unavailable(event, &e))?;
        outbox::enqueue(&mut conn, &[message]).await.map_err(|e| audit_unavailable(event, &e))?;
        self.relay.wake();
        Ok(())
    }

    /// Audits a refusal (401 or 403), rate-limited per source address; best
    /// effort: the refusal is answered whatever happens to its event.
    pub async fn audit_denial(&self, event: AuditEvent) {
        let denials::Verdict::Audit { suppressed } = self.denials.verdict(event.source_ip) else { return };
        let mut messages = Vec::with_capacity(2);
        if suppressed > 0 {
            let summary = AuditEvent::new(
                clinflow::audit::Action::DenialsSuppressed,
                event.actor.clone(),
                clinflow::audit::Outcome::Denied,
            )
            .from_request(event.source_ip, None)
            .resource("count", &suppressed.to_string());
            messages.extend(outbox::Message::audit(&summary));
        }
        messages.extend(outbox::Message::audit(&event));
        let stored = async {
            let mut conn = self.db.acquire().await?;
            outbox::enqueue(&mut conn, &messages).await
        };
        match stored.await {
            Ok(()) => self.relay.wake(),
            Err(e) => tracing::warn!(error = %e, action = event.action.as_str(), "refusal not audited"),
        }
    }

    /// 429 while the pipeline is this far behind.
    pub fn check_backpressure(&self) -> Result<(), ApiError> {
        if self.check_backpressure_quietly() {
            metrics::counter!("clinflow_uploads_throttled_total").increment(1);
            return Err(ApiError::Busy);
        }
        Ok(())
    }

    /// Whether uploads are being answered 429 now.
    fn check_backpressure_quietly(&self) -> bool {
        self.relay.backlog() > self.limits.max_outbox || self.relay.queue_depth() > self.limits.max_queued
    }
}

/// Writes audit events to the outbox in the caller's transaction, so they
/// commit with the change they record (wake the relay after the commit).
pub(crate) async fn audit_in(conn: &mut sqlx::PgConnection, events: &[AuditEvent]) -> Result<(), ApiError> {
    let messages =
        events.iter().map(outbox::Message::audit).collect::<Result<Vec<_>, _>>().map_err(anyhow::Error::new)?;
    outbox::enqueue(conn, &messages).await?;
    Ok(())
}

fn audit_unavailable(event: &AuditEvent, e: &sqlx::Error) -> ApiError {
    tracing::error!(error = %e, action = event.action.as_str(), "audit event not stored");
    ApiError::Unavailable("the audit trail")
}

/// Liveness and readiness: public (they say nothing of any patient).
pub(crate) fn health_endpoints() -> Vec<access::Endpoint> {
    use access::{Access, Endpoint};
    use axum::http::Method;
    vec![
        Endpoint::new(Method::GET, "/healthz", Access::Public, live),
        Endpoint::new(Method::GET, "/readyz", Access::Public, ready),
    ]
}

pub fn app(state: AppState) -> Router {
    let request_id = HeaderName::from_static("x-request-id");
    access::router(&state)
        .fallback(|| async { ApiError::NotFound })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn(record_metrics))
        .layer(PropagateRequestIdLayer::new(request_id.clone()))
        .layer(TraceLayer::new_for_http().make_span_with(|req: &Request| {
            let route = req.extensions().get::<MatchedPath>().map_or("unmatched", MatchedPath::as_str);
            let request_id = req.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or("");
            // The route template, never the raw path: ids stay out of span names.
            tracing::info_span!("request", method = %req.method(), route, request_id)
        }))
        .layer(SetRequestIdLayer::new(request_id, MakeRequestUuid))
        // Outermost: a client's request id reaches spans, logs and audit
        // events only if it is a plain token; anything else is replaced.
        .layer(middleware::from_fn(drop_unsafe_request_id))
        .with_state(state)
}

/// `GET /healthz`.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct Liveness {
    /// `ok`, or `relay stopped` (503).
    status: &'static str,
}

/// `GET /readyz`.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct Readiness {
    /// `up` or `down` (then 503).
    postgres: &'static str,
    /// Whether the outbox relay is connected to RabbitMQ: `up` or `down`
    /// (a broker away does not make the api unready).
    rabbitmq: &'static str,
    /// Messages committed but not yet published.
    outbox_backlog: u64,
    /// Whether uploads are answered 429 now.
    throttling_uploads: bool,
}

#[derive(utoipa::OpenApi)]
#[openapi(paths(live, ready))]
struct HealthDoc;

/// Live while the outbox relay runs: a relay that has ended cannot come back
/// without a restart.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "health",
    responses(
        (status = 200, description = "Live", body = Liveness),
        (status = 503, description = "The outbox relay has stopped: restart the process", body = Liveness),
    ),
)]
async fn live(State(state): State<AppState>) -> Response {
    if state.relay.alive() {
        Json(Liveness { status: "ok" }).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, Json(Liveness { status: "relay stopped" })).into_response()
    }
}

/// Ready = PostgreSQL answers: every request the api serves needs only the
/// database (uploads and audit events go to the outbox, which the relay
/// publishes when RabbitMQ is there). A broker away is reported, with the
/// outbox backlog it leaves, but does not take the api out of rotation;
/// uploads answer 429 once the backlog passes its limit.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "health",
    responses(
        (status = 200, description = "Ready", body = Readiness),
        (status = 503, description = "PostgreSQL is unreachable", body = Readiness),
    ),
)]
async fn ready(State(state): State<AppState>) -> Response {
    let db = sqlx::query_scalar!("SELECT 1 AS one").fetch_one(&state.db).await.is_ok();
    let status = if db { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let word = |ok: bool| if ok { "up" } else { "down" };
    let body = Readiness {
        postgres: word(db),
        rabbitmq: word(state.relay.connected()),
        outbox_backlog: state.relay.backlog(),
        throttling_uploads: state.check_backpressure_quietly(),
    };
    (status, Json(body)).into_response()
}

/// Longest client-supplied request id kept.
const MAX_REQUEST_ID: usize = 64;

/// A client's `x-request-id` that is not 1–64 characters of `A-Z a-z 0-9 . _ -`
/// is removed (and a fresh UUID set in its place), so free text — a name, a
/// note, a forged log line — never reaches a span, a log or the audit trail.
async fn drop_unsafe_request_id(mut req: Request, next: Next) -> Response {
    let safe = |v: &axum::http::HeaderValue| {
        let b = v.as_bytes();
        !b.is_empty() && b.len() <= MAX_REQUEST_ID && b.iter().all(|c| c.is_ascii_alphanumeric() || b"._-".contains(c))
    };
    if req.headers().get("x-request-id").is_some_and(|v| !safe(v)) {
        req.headers_mut().remove("x-request-id");
    }
    next.run(req).await
}

async fn record_metrics(req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = req.method().to_string();
    let started = Instant::now();
    let response = next.run(req).await;
    // The class (2xx, 4xx, 5xx), not the code: alerts and dashboards read
    // classes, and the series stay few.
    let status_class = match response.status().as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    };
    metrics::counter!("clinflow_http_requests_total", "method" => method.clone(), "route" => route.clone(), "status_class" => status_class)
        .increment(1);
    metrics::histogram!("clinflow_http_request_seconds", "method" => method, "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}

/// Serves until `shutdown` fires, then finishes in-flight requests.
pub async fn serve(listener: TcpListener, state: AppState, shutdown: CancellationToken) -> std::io::Result<()> {
    axum::serve(listener, app(state).into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}
