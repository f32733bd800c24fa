//! The api as a service: the route table ([`access::router`], where each
//! route has its timeout) with the layers every request passes (request
//! id, trace span, security headers, metrics, panics and timeouts as JSON,
//! the client's address, body limit and stalls), served until shutdown
//! over plain HTTP or, with its own certificate, HTTPS (with HSTS), within
//! the connection limit and time limits of [`connections`].

use std::any::Any;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, MatchedPath, Request};
use axum::http::{HeaderName, HeaderValue, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Router};
use axum_server::tls_rustls::RustlsAcceptor;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::set_header::SetResponseHeaderLayer;
use tower_http::trace::TraceLayer;

use crate::access;
use crate::connections::{self, Limited};
use crate::error::ApiError;
use crate::https::ApiTls;
use crate::openapi;
use crate::proxies::{ClientAddr, TrustedProxies};
use crate::state::{AppState, Edge};

/// Request bodies above this are refused with 413 before they are parsed.
const MAX_BODY_BYTES: usize = 2 * crate::validate::MAX_TEXT_BYTES;

/// The policy of every answer but the `/docs` page (which sets its own):
/// JSON needs nothing loaded, and nothing may frame it.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; frame-ancestors 'none'";

pub fn app(state: AppState) -> Router {
    let edge = state.edge.clone();
    let routes = access::router(&state)
        // After the routes: it reaches every route's method router.
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .fallback(|| async { ApiError::NotFound })
        // The description of this router, for `GET /openapi.json` and `/docs`.
        .layer(Extension(openapi::spec()))
        .with_state(state);
    with_layers(routes, &edge)
}

/// The layers around every route (axum applies them to each route and the
/// fallback, after routing: the route template is known). The last added
/// is the outermost.
fn with_layers(routes: Router, edge: &Edge) -> Router {
    let request_id = HeaderName::from_static("x-request-id");
    let proxies = edge.trusted_proxies.clone();
    let stall = edge.body_stall;
    routes
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn(move |req: Request, next: Next| connections::limit_body_stalls(stall, req, next)))
        .layer(middleware::from_fn(move |req: Request, next: Next| client_addr(proxies.clone(), req, next)))
        .layer(middleware::map_response(timeout_as_json))
        // Inside the metrics, so that a panic is counted as the 500 it becomes.
        .layer(CatchPanicLayer::custom(panic_as_json))
        .layer(middleware::from_fn(record_metrics))
        // On every answer, unless its handler set its own (the `/docs`
        // page's policy, its script's caching). `no-store` on everything:
        // most answers carry PHI or credentials, and the few that do not
        // (health, the OpenAPI document) are cheap to answer again.
        .layer(SetResponseHeaderLayer::if_not_present(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CONTENT_SECURITY_POLICY),
        ))
        .layer(SetResponseHeaderLayer::overriding(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")))
        .layer(SetResponseHeaderLayer::overriding(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer")))
        .layer(SetResponseHeaderLayer::if_not_present(header::CACHE_CONTROL, HeaderValue::from_static("no-store")))
        // Outside the panic and timeout answers, so that they carry the id.
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
}

/// The client's address ([`ClientAddr`]) for `RequestMeta`: the TCP peer,
/// or the address a trusted proxy forwarded.
async fn client_addr(proxies: TrustedProxies, mut req: Request, next: Next) -> Response {
    if let Some(ConnectInfo(peer)) = req.extensions().get::<ConnectInfo<SocketAddr>>() {
        let client = proxies.client(peer.ip(), req.headers());
        req.extensions_mut().insert(ClientAddr(client));
    }
    next.run(req).await
}

/// tower-http's timeout (each route's, in `access::router`) answers an
/// empty 503; every answer of this api has a content type, so an empty
/// 503 is the timeout's, and becomes the JSON error.
async fn timeout_as_json(response: Response) -> Response {
    let timed_out =
        response.status() == ApiError::Timeout.status() && !response.headers().contains_key(header::CONTENT_TYPE);
    if !timed_out {
        return response;
    }
    tracing::warn!("request timed out");
    ApiError::Timeout.into_response()
}

/// A handler's panic is a JSON 500 that says only that the request id
/// identifies it. The payload is dropped unread: its message may quote
/// what the handler held, a note or a patient reference.
fn panic_as_json(_payload: Box<dyn Any + Send + 'static>) -> Response {
    ApiError::Unexpected(anyhow::anyhow!("a handler panicked")).into_response()
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

/// Serves until `shutdown` fires, then finishes in-flight requests, within
/// the edge's connection limit and time limits ([`connections`]).
pub async fn serve(listener: TcpListener, state: AppState, shutdown: CancellationToken) -> std::io::Result<()> {
    let handle = axum_server::Handle::new();
    let server = connections::server(listener, &state.edge)?
        .acceptor(Limited::new(&state.edge))
        .handle(handle.clone())
        .serve(app(state).into_make_service_with_connect_info::<SocketAddr>());
    until_shut_down(server, &handle, &shutdown).await
}

/// HSTS on every answer over TLS: browsers use HTTPS only for this host
/// for a year. Without `includeSubDomains`: a hospital's other hosts under
/// the api's name are not this service's to decide.
const STRICT_TRANSPORT_SECURITY: &str = "max-age=31536000";

/// Serves HTTPS with `tls` until `shutdown` fires, then finishes in-flight
/// requests. While it serves, the certificate is reloaded when its files
/// change ([`ApiTls::watch`]): new connections get the new one, open ones
/// keep theirs.
pub async fn serve_tls(
    listener: TcpListener,
    state: AppState,
    tls: ApiTls,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let edge = state.edge.clone();
    let app = app(state).layer(SetResponseHeaderLayer::overriding(
        header::STRICT_TRANSPORT_SECURITY,
        HeaderValue::from_static(STRICT_TRANSPORT_SECURITY),
    ));
    let handle = axum_server::Handle::new();
    let acceptor =
        RustlsAcceptor::new(tls.rustls()).handshake_timeout(edge.header_timeout).acceptor(Limited::new(&edge));
    let server = connections::server(listener, &edge)?
        .acceptor(acceptor)
        .handle(handle.clone())
        .serve(app.into_make_service_with_connect_info::<SocketAddr>());
    let stop_watching = shutdown.child_token();
    tokio::spawn(tls.watch(stop_watching.clone()));
    let served = until_shut_down(server, &handle, &shutdown).await;
    stop_watching.cancel();
    served
}

/// Runs `server` until `shutdown`, then until its connections are done.
/// axum-server's graceful shutdown reaches only the accept loop and the
/// connections waiting at that moment (a notification, not a state): one
/// being set up then would miss it and keep the server open, so it is
/// asked again until the server has stopped.
async fn until_shut_down(
    server: impl Future<Output = std::io::Result<()>>,
    handle: &axum_server::Handle<SocketAddr>,
    shutdown: &CancellationToken,
) -> std::io::Result<()> {
    tokio::pin!(server);
    tokio::select! {
        served = &mut server => return served,
        () = shutdown.cancelled() => {}
    }
    loop {
        handle.graceful_shutdown(None);
        tokio::select! {
            served = &mut server => return served,
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use axum::body::Body;
    use axum::http::StatusCode;
    use axum::routing::get;
    use serde_json::Value;
    use tower::ServiceExt as _;

    use super::*;

    /// The layers of [`app`] around a router of routes no production table has.
    fn layered(routes: Router) -> Router {
        with_layers(routes, &Edge::default())
    }

    async fn call(app: Router, path: &str) -> (StatusCode, axum::http::HeaderMap, String) {
        let request = Request::get(path).header("x-request-id", "edge-test-42").body(Body::empty()).unwrap();
        let response = app.oneshot(request).await.unwrap();
        let (parts, body) = response.into_parts();
        let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
        (parts.status, parts.headers, String::from_utf8(body.to_vec()).unwrap())
    }

    fn error_code(body: &str) -> String {
        let value: Value = serde_json::from_str(body).unwrap();
        value["error"]["code"].as_str().unwrap().to_owned()
    }

    /// A handler that fails the way a bug would, with PHI in the message.
    async fn boom() -> &'static str {
        let note = "PAT-100234 note: known AF";
        panic!("cannot slice {note}")
    }

    #[tokio::test]
    async fn edge_a_panicking_handler_answers_a_json_500_with_the_request_id_and_nothing_of_the_panic() {
        let app = layered(Router::new().route("/v1/boom", get(boom)).route("/v1/fine", get(|| async { "fine" })));
        let (status, headers, body) = call(app.clone(), "/v1/boom").await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(error_code(&body), "internal");
        assert!(!body.contains("PAT-100234") && !body.contains("panicked") && !body.contains(".rs"), "{body}");
        assert_eq!(headers["x-request-id"], "edge-test-42");
        assert_eq!(headers["content-type"], "application/json");
        assert_eq!(headers["content-security-policy"], CONTENT_SECURITY_POLICY);
        assert_eq!(headers["cache-control"], "no-store");
        // The router is still whole: the next request is answered.
        let (status, _, body) = call(app, "/v1/fine").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "fine"));
    }

    #[tokio::test]
    async fn edge_a_handler_past_its_time_limit_answers_the_json_timeout_error() {
        let limit = Duration::from_millis(200);
        let app = layered(
            Router::new()
                .route("/v1/stuck", get(std::future::pending::<&'static str>).layer(access::time_limit(limit)))
                .route("/v1/prompt", get(|| async { "prompt" }).layer(access::time_limit(limit)))
                .route(
                    "/v1/away",
                    get(|| async { ApiError::Unavailable("the database") }).layer(access::time_limit(limit)),
                ),
        );
        let started = Instant::now();
        let (status, headers, body) = call(app.clone(), "/v1/stuck").await;
        assert!(started.elapsed() >= limit);
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(error_code(&body), "timeout");
        assert_eq!(headers["x-request-id"], "edge-test-42");
        assert_eq!(headers["retry-after"], "2");
        // Within the limit: the handler's own answer, and its own 503 stays its own.
        let (status, _, body) = call(app.clone(), "/v1/prompt").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "prompt"));
        let (status, _, body) = call(app, "/v1/away").await;
        assert_eq!((status, error_code(&body).as_str()), (StatusCode::SERVICE_UNAVAILABLE, "unavailable"));
    }
}
