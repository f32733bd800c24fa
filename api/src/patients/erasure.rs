//! A patient's erasure (GDPR Art. 17), by crypto-shredding their data key.

use axum::Json;
use axum::extract::State;
use clinflow::audit::{Action, Outcome};
use clinflow::erasure::ErasureError;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{Patient, PatientPath};
use crate::auth::AuthUser;
use crate::error::ApiError;
use crate::extract::{JsonBody, PathParams};
use crate::state::AppState;

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EraseRequest {
    /// Why, as a code (`gdpr_erasure_request`, `data_entry_error`, …): it
    /// goes on the audit trail, which takes no free text.
    reason: String,
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

/// `DELETE /v1/patients/{patient_ref}`: every row of the patient goes, in one
/// transaction with its audit event. 404 when nothing was held.
#[utoipa::path(delete, path = "/v1/patients/{patient_ref}", tag = "patients",
    params(PatientPath),
    request_body = EraseRequest,
    responses((status = 200, description = "What was erased", body = Erased)),
    extensions(("x-errors" = json!([
        "not_found: nothing is held on this patient", "invalid_patient_ref",
        "invalid_reason: not a code of 3-64 lowercase letters and `_`",
        "erasure_refused: documents without a patient index remain (`keys migrate-v1`, `reindex-patients`)",
        "unavailable: the database, or the erasure journal (`ERASURE_JOURNAL_DIR`), cannot be written",
    ]))))]
#[tracing::instrument(skip_all, fields(user_id = %user.id))]
pub(crate) async fn erase(
    State(state): State<AppState>,
    user: AuthUser,
    PathParams(PatientPath { patient_ref }): PathParams<PatientPath>,
    JsonBody(req): JsonBody<EraseRequest>,
) -> Result<Json<Erased>, ApiError> {
    let patient = Patient::parse(&state, &patient_ref)?;
    let reason = req.reason.trim();
    if !(3..=64).contains(&reason.len()) || !reason.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
        return Err(ApiError::invalid(
            "invalid_reason",
            "reason must be a code of 3-64 lowercase letters and _, e.g. gdpr_erasure_request",
        ));
    }
    let journal = state.erasure_journal.as_deref().ok_or(ApiError::Unavailable("the erasure journal"))?;
    let event_id = Uuid::now_v7();
    let mut tx = state.db.begin().await?;
    let erased = clinflow::erasure::erase_patient(&mut tx, journal, &patient.index, event_id).await.map_err(refused)?;
    let counts = erased.counts;
    if counts.is_empty() {
        tx.rollback().await?;
        return Err(ApiError::NotFound);
    }
    let event = user
        .event(Action::PatientErase, Outcome::Success)
        .id(event_id)
        .resource("patient", &patient.audit_id())
        .reason(&format!("{reason} documents:{} data_keys:{}", counts.documents, counts.data_keys));
    state.audit_in(&mut tx, &[event]).await?;
    tx.commit().await?;
    // Every process, this one included, drops the keys when it hears the
    // commit's NOTIFY; this one at once.
    erased.after_commit(&state.keys);
    state.relay.wake();
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
        ErasureError::Unindexed => ApiError::BadRequest {
            status: axum::http::StatusCode::CONFLICT,
            code: "erasure_refused",
            message: e.to_string(),
        },
        ErasureError::Journal(e) => {
            tracing::error!(error = %e, "the erasure journal cannot be written; erasure refused");
            ApiError::Unavailable("the erasure journal")
        }
        ErasureError::Database(e) => e.into(),
    }
}
