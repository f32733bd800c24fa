//! Break-glass: a clinician reads the patients of their care teams
//! (`scope`). Outside them, `POST /v1/break-glass` (patient reference, a
//! reason, and their password again) grants one patient for
//! `BREAK_GLASS_MINUTES`; every read under a grant says so on the audit
//! trail.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use clinflow::audit::{Action, Outcome};
use clinflow::keys::{PatientRef, break_glass_reason_field};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::auth::AuthUser;
use crate::error::ApiError;
use crate::extract::JsonBody;
use crate::state::AppState;
use crate::validate::valid_patient_ref;

const MIN_REASON_CHARS: usize = 10;
const MAX_REASON_CHARS: usize = 1000;

fn reason_text() -> utoipa::openapi::schema::Object {
    crate::validate::schema::trimmed_text(MIN_REASON_CHARS, MAX_REASON_CHARS)
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BreakGlassRequest {
    #[schema(schema_with = crate::validate::schema::patient_ref)]
    pub patient_ref: String,
    /// Why the glass is broken: kept (encrypted) for the reviewers.
    #[schema(schema_with = reason_text)]
    pub reason: String,
    /// The caller's own password, asked again.
    #[schema(format = Password)]
    pub password: String,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct BreakGlassResponse {
    pub id: Uuid,
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
}

/// Break the glass: read one patient outside the caller's care teams for
/// `BREAK_GLASS_MINUTES` (60 by default).
///
/// Needs a reason (10-1000 characters, kept encrypted for review) and the
/// caller's password again. Audited; every read under the grant names it.
#[utoipa::path(
    post,
    path = "/v1/break-glass",
    tag = "care",
    request_body = BreakGlassRequest,
    responses(
        (status = 201, description = "The grant and when it ends", body = BreakGlassResponse),
    ),
    extensions(("x-errors" = json!([
        "wrong_password: also once the account is locked (wrong passwords here count toward its lockout)",
        "invalid_patient_ref", "invalid_reason: not 10-1000 characters", "login_busy",
        "break_glass_limit: BREAK_GLASS_GRANTS_PER_DAY grants in the last 24 hours",
    ]))),
)]
#[tracing::instrument(skip_all, fields(user_id = %user.id))]
pub(crate) async fn break_glass(
    State(state): State<AppState>,
    user: AuthUser,
    JsonBody(req): JsonBody<BreakGlassRequest>,
) -> Result<(StatusCode, Json<BreakGlassResponse>), ApiError> {
    let patient_ref = valid_patient_ref(&req.patient_ref)?;
    let reason = req.reason.trim();
    if reason.chars().count() < MIN_REASON_CHARS || req.reason.chars().count() > MAX_REASON_CHARS {
        return Err(ApiError::invalid(
            "invalid_reason",
            format!("reason must be {MIN_REASON_CHARS}-{MAX_REASON_CHARS} characters: say why you need this record"),
        ));
    }
    let patient_index = clinflow::documents::patient_index(&state.index_key, &patient_ref);
    // A wrong password counts toward the account's lockout, as at login.
    crate::reauth::confirm_password(&state, &user, req.password, Action::BreakGlass, Some(&patient_index)).await?;
    let mut tx = state.db.begin().await?;
    // At most `break_glass_per_day` grants per clinician in 24 hours: the
    // count is taken under a lock on the clinician's row, so concurrent
    // requests cannot pass it together.
    sqlx::query!("SELECT id FROM users WHERE id = $1 FOR UPDATE", user.id).fetch_one(&mut *tx).await?;
    let taken = sqlx::query_scalar!(
        r#"SELECT count(*) AS "n!" FROM break_glass_grants
           WHERE user_id = $1 AND granted_at > now() - interval '24 hours'"#,
        user.id
    )
    .fetch_one(&mut *tx)
    .await?;
    if taken >= i64::from(state.break_glass_per_day) {
        tx.rollback().await?;
        let event = user.event(Action::BreakGlass, Outcome::Denied).patient(&patient_index).reason("daily_limit");
        state.audit(&event).await?;
        return Err(ApiError::BadRequest {
            status: StatusCode::TOO_MANY_REQUESTS,
            code: "break_glass_limit",
            message: format!(
                "at most {} break-glass grants per clinician in 24 hours; ask a colleague in the patient's care team, \
                 or an admin to add the patient to yours",
                state.break_glass_per_day
            ),
        });
    }
    let id = Uuid::now_v7();
    let minutes = state.break_glass_for.as_secs_f64();
    // The grant names the patient (by blind index): who broke the glass for
    // whom is part of that patient's accounting of disclosures.
    let event = user
        .event(Action::BreakGlass, Outcome::Success)
        .resource("break_glass", &id.to_string())
        .patient(&patient_index);
    // The reason is free text about the patient: sealed under their data
    // key (created here if they have none yet), shredded with it.
    let key = state.keys.for_patient(&mut tx, PatientRef::new(&patient_index, &patient_ref)).await?;
    let reason_ct = key.seal_str(break_glass_reason_field(id), reason).map_err(anyhow::Error::new)?;
    let expires_at = sqlx::query_scalar!(
        "INSERT INTO break_glass_grants (id, user_id, patient_index, reason_ct, expires_at)
         VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5)) RETURNING expires_at",
        id,
        user.id,
        patient_index,
        reason_ct,
        minutes,
    )
    .fetch_one(&mut *tx)
    .await?;
    state.audit_in(&mut tx, &[event]).await?;
    tx.commit().await?;
    state.relay.wake();
    metrics::counter!("clinflow_break_glass_grants_total").increment(1);
    crate::telemetry::privacy_event("break_glass");
    Ok((StatusCode::CREATED, Json(BreakGlassResponse { id, expires_at })))
}
