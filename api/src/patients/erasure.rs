//! A patient's erasure (GDPR Art. 17), by crypto-shredding their data key.
//! Two privacy officers: one asks (`POST /v1/privacy/erasures`, with a
//! reason code and the case's reference), another approves
//! (`…/{id}/approve`), and only the approval erases. The patient is named by
//! blind index only, in the request as on the audit trail.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use clinflow::audit::{Action, Outcome};
use clinflow::erasure::ErasureError;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

use super::{Patient, hex};
use crate::auth::AuthUser;
use crate::error::ApiError;
use crate::extract::{JsonBody, PathParams};
use crate::state::AppState;
use crate::validate::{case_ref, reason_code};

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ErasureRequest {
    /// The patient reference, as uploaded
    #[schema(schema_with = crate::validate::schema::patient_ref)]
    patient_ref: String,
    /// Why, as a code (`gdpr_erasure_request`, `data_entry_error`, …): it
    /// goes on the audit trail, which takes no free text.
    #[schema(schema_with = reason)]
    reason: String,
    /// The privacy case's reference (`DSAR-2026-0042`), never the patient's.
    #[schema(schema_with = case)]
    case_ref: String,
}

fn reason() -> utoipa::openapi::schema::Object {
    crate::validate::schema::reason_code(false)
}

fn case() -> utoipa::openapi::schema::Object {
    crate::validate::schema::case_ref(false)
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct PendingErasure {
    id: Uuid,
    /// The patient's blind index (hex): the approver checks it against the
    /// case, and it is what the audit trail names.
    patient: String,
    reason: String,
    case_ref: String,
    requested_by: Uuid,
    #[serde(with = "time::serde::rfc3339")]
    requested_at: OffsetDateTime,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct Erased {
    documents: i64,
    results: i64,
    concepts: i64,
    team_entries: i64,
    break_glass_grants: i64,
    /// Destroyed: every copy of the patient's data, backups included, is
    /// unreadable without it.
    data_keys: i64,
}

/// The request a path names (`/v1/privacy/erasures/{id}…`).
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
pub(crate) struct ErasurePath {
    /// The erasure request's id
    id: Uuid,
}

/// `POST /v1/privacy/erasures`: ask for a patient's erasure. Nothing is
/// erased until a second privacy officer approves; one open request per
/// patient.
#[utoipa::path(post, path = "/v1/privacy/erasures", tag = "privacy",
    request_body = ErasureRequest,
    responses((status = 201, description = "The pending request", body = PendingErasure)),
    extensions(("x-errors" = json!([
        "not_found: nothing is held on this patient", "invalid_patient_ref",
        "invalid_reason: not a code of 3-64 lowercase letters and `_`", "invalid_case_ref",
        "erasure_pending: this patient already has an open erasure request",
    ]))))]
#[tracing::instrument(skip_all, fields(user_id = %user.id))]
pub(crate) async fn request_erasure(
    State(state): State<AppState>,
    user: AuthUser,
    JsonBody(req): JsonBody<ErasureRequest>,
) -> Result<(StatusCode, Json<PendingErasure>), ApiError> {
    let patient = Patient::parse(&state, &req.patient_ref)?;
    let reason = reason_code("reason", &req.reason)?;
    let case = case_ref(&req.case_ref)?;
    let held = sqlx::query_scalar!(
        r#"SELECT EXISTS (SELECT 1 FROM documents WHERE patient_index = $1)
               OR EXISTS (SELECT 1 FROM care_team_patients WHERE patient_index = $1)
               OR EXISTS (SELECT 1 FROM break_glass_grants WHERE patient_index = $1) AS "held!""#,
        patient.index
    )
    .fetch_one(&state.db)
    .await?;
    let event = user
        .event(Action::PatientEraseRequest, Outcome::Success)
        .resource("patient", &patient.audit_id())
        .patient(&patient.index);
    if !held {
        state.audit(&event.outcome(Outcome::Failure).reason("not_found")).await?;
        return Err(ApiError::NotFound);
    }
    let id = Uuid::now_v7();
    let mut tx = state.db.begin().await?;
    let requested_at = sqlx::query_scalar!(
        "INSERT INTO erasure_requests (id, patient_index, reason, case_ref, requested_by)
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (patient_index) WHERE approved_at IS NULL DO NOTHING
         RETURNING requested_at",
        id,
        patient.index,
        reason,
        case,
        user.id,
    )
    .fetch_optional(&mut *tx)
    .await?;
    let Some(requested_at) = requested_at else {
        return Err(ApiError::BadRequest {
            status: StatusCode::CONFLICT,
            code: "erasure_pending",
            message: "this patient already has an open erasure request: approve it (GET /v1/privacy/erasures)".into(),
        });
    };
    let event = event.reason(&format!("{reason} case:{case} request:{id}"));
    state.audit_in(&mut tx, &[event]).await?;
    tx.commit().await?;
    state.relay.wake();
    crate::telemetry::privacy_event("erasure_request");
    let pending =
        PendingErasure { id, patient: patient.audit_id(), reason, case_ref: case, requested_by: user.id, requested_at };
    Ok((StatusCode::CREATED, Json(pending)))
}

/// `GET /v1/privacy/erasures`: the open erasure requests, oldest first.
#[utoipa::path(get, path = "/v1/privacy/erasures", tag = "privacy",
    responses((status = 200, description = "Open erasure requests", body = Vec<PendingErasure>)))]
#[tracing::instrument(skip_all, fields(user_id = %user.id))]
pub(crate) async fn pending_erasures(
    State(state): State<AppState>,
    user: AuthUser,
) -> Result<Json<Vec<PendingErasure>>, ApiError> {
    let rows = sqlx::query!(
        "SELECT id, patient_index, reason, case_ref, requested_by, requested_at FROM erasure_requests
         WHERE approved_at IS NULL ORDER BY requested_at LIMIT 1000"
    )
    .fetch_all(&state.db)
    .await?;
    let pending: Vec<PendingErasure> = rows
        .into_iter()
        .map(|r| PendingErasure {
            id: r.id,
            patient: hex(&r.patient_index),
            reason: r.reason,
            case_ref: r.case_ref,
            requested_by: r.requested_by,
            requested_at: r.requested_at,
        })
        .collect();
    let event = user.event(Action::PrivacyRead, Outcome::Success).resource("erasure_requests", "open");
    state.audit(&event.reason(&format!("count:{}", pending.len()))).await?;
    Ok(Json(pending))
}

/// `POST /v1/privacy/erasures/{id}/approve`: a second privacy officer
/// approves, and every row of the patient goes, in one transaction with its
/// audit event. The officer who asked cannot approve (403
/// `four_eyes_required`).
#[utoipa::path(post, path = "/v1/privacy/erasures/{id}/approve", tag = "privacy",
    params(ErasurePath),
    responses((status = 200, description = "What was erased", body = Erased)),
    extensions(("x-errors" = json!([
        "not_found: no open erasure request has this id",
        "four_eyes_required: the officer who asked cannot approve",
        "erasure_refused: documents without a patient index remain (`keys migrate-v1`, `reindex-patients`)",
        "unavailable: the database, or the erasure journal (`ERASURE_JOURNAL_DIR`), cannot be written",
    ]))))]
#[tracing::instrument(skip_all, fields(user_id = %user.id))]
pub(crate) async fn approve_erasure(
    State(state): State<AppState>,
    user: AuthUser,
    PathParams(ErasurePath { id }): PathParams<ErasurePath>,
) -> Result<Json<Erased>, ApiError> {
    let journal = state.erasure_journal.as_deref().ok_or(ApiError::Unavailable("the erasure journal"))?;
    let mut tx = state.db.begin().await?;
    let request = sqlx::query!(
        "SELECT patient_index, reason, case_ref, requested_by FROM erasure_requests
         WHERE id = $1 AND approved_at IS NULL FOR UPDATE",
        id
    )
    .fetch_optional(&mut *tx)
    .await?;
    let Some(request) = request else { return Err(ApiError::NotFound) };
    let event = user
        .event(Action::PatientErase, Outcome::Denied)
        .resource("patient", &hex(&request.patient_index))
        .patient(&request.patient_index);
    if request.requested_by == user.id {
        tx.rollback().await?;
        state.audit(&event.reason("four_eyes_required")).await?;
        return Err(ApiError::BadRequest {
            status: StatusCode::FORBIDDEN,
            code: "four_eyes_required",
            message: "an erasure needs a second privacy officer: the one who asked cannot approve".into(),
        });
    }
    sqlx::query!("UPDATE erasure_requests SET approved_by = $2, approved_at = now() WHERE id = $1", id, user.id)
        .execute(&mut *tx)
        .await?;
    // The journal names the erasure's audit event: its id is chosen first.
    let event_id = Uuid::now_v7();
    let erased =
        clinflow::erasure::erase_patient(&mut tx, journal, &request.patient_index, event_id).await.map_err(refused)?;
    let counts = erased.counts;
    let event = event.id(event_id).outcome(Outcome::Success).reason(&format!(
        "{} case:{} request:{id} documents:{} data_keys:{}",
        request.reason, request.case_ref, counts.documents, counts.data_keys
    ));
    state.audit_in(&mut tx, &[event]).await?;
    tx.commit().await?;
    // Every process, this one included, drops the keys when it hears the
    // commit's NOTIFY; this one at once.
    erased.after_commit(&state.keys);
    state.relay.wake();
    crate::telemetry::privacy_event("erasure");
    Ok(Json(Erased {
        documents: counts.documents,
        results: counts.results,
        concepts: counts.concepts,
        team_entries: counts.team_entries,
        break_glass_grants: counts.grants,
        data_keys: counts.data_keys,
    }))
}

/// Erasure refused while documents it cannot find remain (409), or while
/// the journal cannot be written (503: the erasure would not survive a
/// restore).
fn refused(e: ErasureError) -> ApiError {
    match e {
        ErasureError::Unindexed => {
            ApiError::BadRequest { status: StatusCode::CONFLICT, code: "erasure_refused", message: e.to_string() }
        }
        ErasureError::Journal(e) => {
            tracing::error!(error = %e, "the erasure journal cannot be written; erasure refused");
            ApiError::Unavailable("the erasure journal")
        }
        ErasureError::Database(e) => e.into(),
    }
}
