//! Care-team scope and break-glass.
//!
//! A clinician reads the patients of the care teams they belong to. Outside
//! them, `POST /v1/break-glass` (patient reference, a reason, and their
//! password again) grants one patient for `BREAK_GLASS_MINUTES`; every read
//! under a grant says so on the audit trail. Patients are held by their blind
//! index (`clinflow::documents::patient_index`), never in clear.

use std::collections::HashMap;

use axum::Json;
use axum::extract::State;
use axum::http::{Method, StatusCode};
use clinflow::audit::{Action, Outcome};
use clinflow::crypto::Field;
use clinflow::keys::PatientRef;
use clinflow::wire::ErrorBody;
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgExecutor};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::AppState;
use crate::access::{Access, Endpoint};
use crate::auth::{AuthUser, JsonBody};
use crate::error::ApiError;
use crate::users::Role;

#[derive(utoipa::OpenApi)]
#[openapi(paths(break_glass))]
pub(crate) struct Doc;

pub fn endpoints() -> Vec<Endpoint> {
    vec![Endpoint::new(
        Method::POST,
        "/v1/break-glass",
        Access::roles(&[Role::Clinician], Action::BreakGlass),
        break_glass,
    )]
}

/// Why a clinician may read a patient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    CareTeam,
    BreakGlass(Uuid),
}

impl Grant {
    /// The audit `reason` of a read under this grant: reads under
    /// break-glass are marked with their grant.
    pub fn audit_reason(self) -> Option<String> {
        match self {
            Grant::CareTeam => None,
            Grant::BreakGlass(id) => Some(format!("break_glass:{id}")),
        }
    }
}

/// Whether `user` may read the patient with this blind index: through a care
/// team, else through a live break-glass grant.
pub async fn patient_grant(
    db: impl PgExecutor<'_>,
    user: Uuid,
    patient_index: &[u8],
) -> Result<Option<Grant>, sqlx::Error> {
    let row = sqlx::query!(
        r#"SELECT EXISTS (SELECT 1 FROM care_team_members m
                          JOIN care_team_patients p ON p.team_id = m.team_id
                          WHERE m.user_id = $1 AND p.patient_index = $2) AS "team!",
                  (SELECT id FROM break_glass_grants
                   WHERE user_id = $1 AND patient_index = $2 AND expires_at > now()
                   ORDER BY expires_at DESC LIMIT 1) AS glass"#,
        user,
        patient_index,
    )
    .fetch_one(db)
    .await?;
    Ok(if row.team { Some(Grant::CareTeam) } else { row.glass.map(Grant::BreakGlass) })
}

/// The ids of these care teams, by name.
pub async fn team_ids(db: impl PgExecutor<'_>, names: &[String]) -> Result<HashMap<String, Uuid>, sqlx::Error> {
    if names.is_empty() {
        return Ok(HashMap::new());
    }
    let rows = sqlx::query!("SELECT id, name FROM care_teams WHERE name = ANY($1)", names).fetch_all(db).await?;
    Ok(rows.into_iter().map(|r| (r.name, r.id)).collect())
}

/// Puts patients (blind indexes) in teams; pairs already there are kept.
pub async fn add_patients(conn: &mut PgConnection, pairs: &[(Uuid, Vec<u8>)]) -> Result<(), sqlx::Error> {
    if pairs.is_empty() {
        return Ok(());
    }
    let (teams, patients): (Vec<Uuid>, Vec<Vec<u8>>) = pairs.iter().cloned().unzip();
    sqlx::query!(
        "INSERT INTO care_team_patients (team_id, patient_index)
         SELECT * FROM UNNEST($1::uuid[], $2::bytea[]) ON CONFLICT DO NOTHING",
        &teams,
        &patients,
    )
    .execute(conn)
    .await?;
    Ok(())
}

pub const MIN_REASON_CHARS: usize = 10;
const MAX_REASON_CHARS: usize = 1000;

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BreakGlassRequest {
    pub patient_ref: String,
    /// Why the glass is broken: kept (encrypted) for the reviewers.
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

pub fn reason_field(id: Uuid) -> Field {
    clinflow::keys::break_glass_reason_field(id)
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
        (status = 403, description = "- `wrong_password`: the password given is not the caller's", body = ErrorBody),
        (status = 422, description = "- `invalid_patient_ref`: not 1-128 characters without control characters\n- `invalid_reason`: not 10-1000 characters", body = ErrorBody),
        (status = 503, description = "- `login_busy`: too many password checks waiting; retry after `Retry-After`", body = ErrorBody),
    ),
)]
async fn break_glass(
    State(state): State<AppState>,
    user: AuthUser,
    JsonBody(req): JsonBody<BreakGlassRequest>,
) -> Result<(StatusCode, Json<BreakGlassResponse>), ApiError> {
    let patient_ref = crate::documents::valid_patient_ref(&req.patient_ref)?;
    let reason = req.reason.trim();
    if reason.chars().count() < MIN_REASON_CHARS || reason.chars().count() > MAX_REASON_CHARS {
        return Err(ApiError::invalid(
            "invalid_reason",
            format!("reason must be {MIN_REASON_CHARS}-{MAX_REASON_CHARS} characters: say why you need this record"),
        ));
    }
    let creds = crate::users::credentials(&state.db, user.id).await?;
    let admitted = state.passwords.admit().map_err(|_| ApiError::LoginBusy)?;
    let ok = state.passwords.verify(&admitted, req.password, creds.map(|c| c.password_hash)).await;
    drop(admitted);
    if !ok {
        state.audit(&user.event(Action::BreakGlass, Outcome::Denied).reason("wrong_password")).await?;
        return Err(ApiError::WrongPassword);
    }
    let id = Uuid::now_v7();
    let patient_index = clinflow::documents::patient_index(&state.index_key, &patient_ref);
    let minutes = state.break_glass_for.as_secs_f64();
    let event = user.event(Action::BreakGlass, Outcome::Success).resource("break_glass", &id.to_string());
    let mut tx = state.db.begin().await?;
    // The reason is free text about the patient: sealed under their data
    // key (created here if they have none yet), shredded with it.
    let key = state.keys.for_patient(&mut tx, PatientRef::new(&patient_index, &patient_ref)).await?;
    let reason_ct = key.seal_str(reason_field(id), reason).map_err(anyhow::Error::new)?;
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
    crate::audit_in(&mut tx, &[event]).await?;
    tx.commit().await?;
    state.relay.wake();
    metrics::counter!("clinflow_break_glass_grants_total").increment(1);
    Ok((StatusCode::CREATED, Json(BreakGlassResponse { id, expires_at })))
}
