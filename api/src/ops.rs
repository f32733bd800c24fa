//! `/v1/ops/...`: what `clinflow-worker dead-letters` and `reprocess` do,
//! for the ops role over HTTP. Answers hold ids, counts and reason codes,
//! never document content; every call is audited (by the shared functions,
//! as the calling user).

use axum::Json;
use axum::extract::State;
use axum::http::Method;
use clinflow::audit::Action;
use clinflow::deadletters::{self, Listing, OpsError, Replayed, Reprocess, Selection};
use serde::{Deserialize, Serialize};
use time::Date;
use uuid::Uuid;

use crate::AppState;
use crate::access::{Access, Endpoint};
use crate::auth::{AuthUser, JsonBody};
use crate::error::ApiError;
use crate::users::Role;

const OPERATORS: &[Role] = &[Role::Ops];

pub fn endpoints() -> Vec<Endpoint> {
    vec![
        Endpoint::new(Method::GET, "/v1/ops/dead-letters", Access::roles(OPERATORS, Action::DeadLettersList), list),
        Endpoint::new(
            Method::POST,
            "/v1/ops/dead-letters/replay",
            Access::roles(OPERATORS, Action::DeadLettersReplay),
            replay,
        ),
        Endpoint::new(Method::POST, "/v1/ops/reprocess", Access::roles(OPERATORS, Action::Reprocess), reprocess),
    ]
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayRequest {
    #[serde(default)]
    ids: Vec<Uuid>,
    #[serde(default)]
    all: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReprocessRequest {
    #[serde(default)]
    all: bool,
    /// `YYYY-MM-DD`, with `uploaded_until` (exclusive).
    uploaded_from: Option<Date>,
    uploaded_until: Option<Date>,
    /// A model version: documents without a result from it.
    without_result_from: Option<String>,
}

#[derive(Serialize)]
pub struct ReprocessResponse {
    queued: usize,
}

async fn connection(state: &AppState) -> Result<lapin::Connection, ApiError> {
    clinflow::amqp::connect(&state.amqp_url, "clinflow-api-ops").await.map_err(|e| {
        tracing::warn!(error = %e, "ops request: RabbitMQ unreachable");
        ApiError::Unavailable("RabbitMQ")
    })
}

fn ops_error(e: OpsError) -> ApiError {
    match e {
        OpsError::Db(e) => e.into(),
        other => {
            tracing::warn!(error = %other, "ops request: RabbitMQ failed");
            ApiError::Unavailable("RabbitMQ")
        }
    }
}

async fn list(State(state): State<AppState>, user: AuthUser) -> Result<Json<Listing>, ApiError> {
    let connection = connection(&state).await?;
    let listing = deadletters::list(&connection, &state.topology, &user.actor()).await.map_err(ops_error);
    let _ = connection.close(200, "done".into()).await;
    Ok(Json(listing?))
}

async fn replay(
    State(state): State<AppState>,
    user: AuthUser,
    JsonBody(req): JsonBody<ReplayRequest>,
) -> Result<Json<Replayed>, ApiError> {
    let selection = match (req.all, req.ids.is_empty()) {
        (true, true) => Selection::All,
        (false, false) => Selection::Documents(req.ids.into_iter().collect()),
        _ => return Err(ApiError::invalid("invalid_selection", "give either \"ids\" or \"all\": true")),
    };
    let connection = connection(&state).await?;
    let replayed = deadletters::replay(&connection, &state.db, &state.topology, &selection, &user.actor())
        .await
        .map_err(ops_error);
    let _ = connection.close(200, "done".into()).await;
    Ok(Json(replayed?))
}

async fn reprocess(
    State(state): State<AppState>,
    user: AuthUser,
    JsonBody(req): JsonBody<ReprocessRequest>,
) -> Result<Json<ReprocessResponse>, ApiError> {
    let which = match (req.all, req.uploaded_from.zip(req.uploaded_until), req.without_result_from) {
        (true, None, None) => Reprocess::All,
        (false, Some((from, until)), None) if from < until => {
            Reprocess::UploadedBetween(from.midnight().assume_utc(), until.midnight().assume_utc())
        }
        (false, None, Some(model)) if !model.trim().is_empty() => Reprocess::WithoutResultFrom(model),
        _ => {
            return Err(ApiError::invalid(
                "invalid_selection",
                "give one of \"all\": true, \"uploaded_from\" with a later \"uploaded_until\", or \"without_result_from\"",
            ));
        }
    };
    let connection = connection(&state).await?;
    let queued = deadletters::reprocess(&connection, &state.db, &state.topology, &which, &user.actor(), |_| {})
        .await
        .map_err(ops_error);
    let _ = connection.close(200, "done".into()).await;
    Ok(Json(ReprocessResponse { queued: queued? }))
}
