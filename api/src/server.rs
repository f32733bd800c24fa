//! The api as a service: the route table ([`access::router`]) with the
//! layers every request passes (request id, trace span, metrics, body
//! limit), served until shutdown.

use std::net::SocketAddr;
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::HeaderName;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::{Extension, Router};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::access;
use crate::error::ApiError;
use crate::openapi;
use crate::state::AppState;

/// Request bodies above this are refused with 413 before they are parsed.
const MAX_BODY_BYTES: usize = 2 * crate::validate::MAX_TEXT_BYTES;

pub fn app(state: AppState) -> Router {
    let request_id = HeaderName::from_static("x-request-id");
    access::router(&state)
        .fallback(|| async { ApiError::NotFound })
        // The description of this router, for `GET /openapi.json` and `/docs`.
        .layer(Extension(openapi::spec()))
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
