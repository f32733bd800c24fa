//! `GET /healthz` and `/readyz`: public (they say nothing of any patient).

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::state::AppState;

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
#[tracing::instrument(skip_all)]
pub(crate) async fn live(State(state): State<AppState>) -> Response {
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
#[tracing::instrument(skip_all)]
pub(crate) async fn ready(State(state): State<AppState>) -> Response {
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
