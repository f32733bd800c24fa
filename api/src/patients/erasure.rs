//! A patient's erasure (GDPR Art. 17), by crypto-shredding their data key.

use axum::Json;
use axum::extract::State;
use clinflow::audit::{Action, Outcome};
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
    let mut tx = state.db.begin().await?;
    let destroyed: Vec<Uuid> = sqlx::query_scalar!("SELECT id FROM data_keys WHERE patient_index = $1", patient.index)
        .fetch_all(&mut *tx)
        .await?;
    let counts = sqlx::query!(
        r#"SELECT documents AS "documents!", results AS "results!", concepts AS "concepts!",
                  team_entries AS "team_entries!", grants AS "grants!", data_keys AS "data_keys!"
           FROM erase_patient($1)"#,
        patient.index
    )
    .fetch_one(&mut *tx)
    .await?;
    if counts.documents == 0 && counts.team_entries == 0 && counts.grants == 0 {
        tx.rollback().await?;
        return Err(ApiError::NotFound);
    }
    let event = user
        .event(Action::PatientErase, Outcome::Success)
        .resource("patient", &patient.audit_id())
        .reason(&format!("{reason} documents:{} data_keys:{}", counts.documents, counts.data_keys));
    state.audit_in(&mut tx, &[event]).await?;
    tx.commit().await?;
    // This process forgets the key at once; others' caches drop it within
    // their time limit (5 minutes), and no row names it any more.
    for id in destroyed {
        state.keys.forget(id);
    }
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
