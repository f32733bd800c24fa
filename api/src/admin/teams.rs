//! Care teams: their clinicians and their patients (by blind index).

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use clinflow::audit::{Action, Outcome};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::Created;
use crate::auth::AuthUser;
use crate::error::ApiError;
use crate::extract::{JsonBody, PathParams};
use crate::scope;
use crate::state::AppState;
use crate::users::Role;
use crate::validate::{plain_name, valid_patient_ref};

#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct TeamView {
    id: Uuid,
    name: String,
    members: Vec<Uuid>,
    patients: i64,
}

/// Every care team: its members and how many patients it holds.
#[utoipa::path(
    get,
    path = "/v1/admin/teams",
    tag = "admin",
    responses(
        (status = 200, description = "The teams", body = Vec<TeamView>),
    ),
)]
#[tracing::instrument(skip_all, fields(user_id = %admin.id))]
pub(crate) async fn list_teams(
    State(state): State<AppState>,
    admin: AuthUser,
) -> Result<Json<Vec<TeamView>>, ApiError> {
    let rows = sqlx::query!(
        r#"SELECT t.id, t.name,
                  coalesce((SELECT array_agg(user_id ORDER BY user_id) FROM care_team_members m WHERE m.team_id = t.id),
                           '{}') AS "members!",
                  (SELECT count(*) FROM care_team_patients p WHERE p.team_id = t.id) AS "patients!"
           FROM care_teams t ORDER BY t.name"#
    )
    .fetch_all(&state.db)
    .await?;
    state.audit(&admin.event(Action::AdminRead, Outcome::Success).resource("care_teams", "all")).await?;
    Ok(Json(
        rows.into_iter()
            .map(|r| TeamView { id: r.id, name: r.name, members: r.members, patients: r.patients })
            .collect(),
    ))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewTeam {
    #[schema(schema_with = team_name)]
    name: String,
}

fn team_name() -> utoipa::openapi::schema::Object {
    crate::validate::schema::plain_name(false)
}

/// Create a care team.
#[utoipa::path(
    post,
    path = "/v1/admin/teams",
    tag = "admin",
    request_body = NewTeam,
    responses(
        (status = 201, description = "Created", body = Created),
    ),
    extensions(("x-errors" = json!(["team_exists", "invalid_team_name"]))),
)]
#[tracing::instrument(skip_all, fields(user_id = %admin.id))]
pub(crate) async fn create_team(
    State(state): State<AppState>,
    admin: AuthUser,
    JsonBody(req): JsonBody<NewTeam>,
) -> Result<(StatusCode, Json<Created>), ApiError> {
    let name = req.name.trim();
    if !plain_name(name) {
        return Err(ApiError::invalid(
            "invalid_team_name",
            "name must be 1-64 characters of letters, digits and ._@ -",
        ));
    }
    let id = Uuid::now_v7();
    let inserted = sqlx::query_scalar!(
        "INSERT INTO care_teams (id, name) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING RETURNING id",
        id,
        name
    )
    .fetch_optional(&state.db)
    .await?
    .ok_or(ApiError::BadRequest {
        status: StatusCode::CONFLICT,
        code: "team_exists",
        message: "a care team with this name exists".into(),
    })?;
    let event = admin.event(Action::AdminTeam, Outcome::Success).resource("care_team", &id.to_string());
    state.audit(&event.reason("create")).await?;
    Ok((StatusCode::CREATED, Json(Created { id: inserted })))
}

async fn team_change(state: &AppState, admin: &AuthUser, team: Uuid, change: &str) -> Result<(), ApiError> {
    let event = admin.event(Action::AdminTeam, Outcome::Success).resource("care_team", &team.to_string());
    state.audit(&event.reason(change)).await
}

/// The care team a path names (`/v1/admin/teams/{id}/…`).
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
pub(crate) struct TeamPath {
    /// The care team's id
    id: Uuid,
}

/// A member of a care team, as a path names them (`/v1/admin/teams/{id}/members/{user_id}`).
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
pub(crate) struct MemberPath {
    /// The care team's id
    id: Uuid,
    /// The clinician's user id
    user_id: Uuid,
}

/// Adds a clinician to a team (members must be clinicians).
#[utoipa::path(
    put,
    path = "/v1/admin/teams/{id}/members/{user_id}",
    tag = "admin",
    params(MemberPath),
    responses(
        (status = 204, description = "A member (already or now)"),
    ),
    extensions(("x-errors" = json!(["not_found: no such team or user", "invalid_member_role"]))),
)]
#[tracing::instrument(skip_all, fields(user_id = %admin.id, team_id = %team, member_id = %user))]
pub(crate) async fn add_member(
    State(state): State<AppState>,
    admin: AuthUser,
    PathParams(MemberPath { id: team, user_id: user }): PathParams<MemberPath>,
) -> Result<StatusCode, ApiError> {
    let role = sqlx::query_scalar!("SELECT role FROM users WHERE id = $1", user)
        .fetch_optional(&state.db)
        .await?
        .ok_or(ApiError::NotFound)?;
    // A clinician member reads the team's patients; an ingest account
    // member may add patients to the team with its uploads (`care_team`).
    if role != Role::Clinician.as_str() && role != Role::Ingest.as_str() {
        return Err(ApiError::invalid(
            "invalid_member_role",
            "care team members are clinicians, or ingest accounts the team's uploads come from",
        ));
    }
    let added = sqlx::query!(
        "INSERT INTO care_team_members (team_id, user_id) SELECT id, $2 FROM care_teams WHERE id = $1
         ON CONFLICT DO NOTHING",
        team,
        user
    )
    .execute(&state.db)
    .await?;
    if added.rows_affected() == 0 && !team_exists(&state, team).await? {
        return Err(ApiError::NotFound);
    }
    team_change(&state, &admin, team, &format!("member_add:{user}")).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Remove a clinician from a team.
#[utoipa::path(
    delete,
    path = "/v1/admin/teams/{id}/members/{user_id}",
    tag = "admin",
    params(MemberPath),
    responses(
        (status = 204, description = "Removed"),
    ),
    extensions(("x-errors" = json!(["not_found: not a member of this team"]))),
)]
#[tracing::instrument(skip_all, fields(user_id = %admin.id, team_id = %team, member_id = %user))]
pub(crate) async fn remove_member(
    State(state): State<AppState>,
    admin: AuthUser,
    PathParams(MemberPath { id: team, user_id: user }): PathParams<MemberPath>,
) -> Result<StatusCode, ApiError> {
    let removed = sqlx::query!("DELETE FROM care_team_members WHERE team_id = $1 AND user_id = $2", team, user)
        .execute(&state.db)
        .await?;
    if removed.rows_affected() == 0 {
        return Err(ApiError::NotFound);
    }
    team_change(&state, &admin, team, &format!("member_remove:{user}")).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn team_exists(state: &AppState, team: Uuid) -> Result<bool, ApiError> {
    Ok(sqlx::query_scalar!("SELECT id FROM care_teams WHERE id = $1", team).fetch_optional(&state.db).await?.is_some())
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct PatientRef {
    #[schema(schema_with = crate::validate::schema::patient_ref)]
    patient_ref: String,
}

impl PatientRef {
    /// The patient's blind index, which is what a team holds; the
    /// reference itself is not kept.
    fn index(&self, state: &AppState) -> Result<Vec<u8>, ApiError> {
        let patient_ref = valid_patient_ref(&self.patient_ref)?;
        Ok(clinflow::documents::patient_index(&state.index_key, &patient_ref))
    }
}

/// Puts a patient (by reference; stored as its blind index) in a team.
#[utoipa::path(
    post,
    path = "/v1/admin/teams/{id}/patients",
    tag = "admin",
    params(TeamPath),
    request_body = PatientRef,
    responses(
        (status = 204, description = "In the team (already or now)"),
    ),
    extensions(("x-errors" = json!(["not_found: no such team", "invalid_patient_ref"]))),
)]
#[tracing::instrument(skip_all, fields(user_id = %admin.id, team_id = %team))]
pub(crate) async fn add_patient(
    State(state): State<AppState>,
    admin: AuthUser,
    PathParams(TeamPath { id: team }): PathParams<TeamPath>,
    JsonBody(req): JsonBody<PatientRef>,
) -> Result<StatusCode, ApiError> {
    let index = req.index(&state)?;
    if !team_exists(&state, team).await? {
        return Err(ApiError::NotFound);
    }
    let mut tx = state.db.begin().await?;
    scope::add_patients(&mut tx, &[(team, index.clone())]).await?;
    let event =
        admin.event(Action::TeamPatientAdd, Outcome::Success).resource("care_team", &team.to_string()).patient(&index);
    state.audit_in(&mut tx, &[event]).await?;
    tx.commit().await?;
    state.relay.wake();
    Ok(StatusCode::NO_CONTENT)
}

/// Take a patient (by reference) out of a team.
#[utoipa::path(
    post,
    path = "/v1/admin/teams/{id}/patients/remove",
    tag = "admin",
    params(TeamPath),
    request_body = PatientRef,
    responses(
        (status = 204, description = "Removed"),
    ),
    extensions(("x-errors" = json!(["not_found: the patient is not in this team", "invalid_patient_ref"]))),
)]
#[tracing::instrument(skip_all, fields(user_id = %admin.id, team_id = %team))]
pub(crate) async fn remove_patient(
    State(state): State<AppState>,
    admin: AuthUser,
    PathParams(TeamPath { id: team }): PathParams<TeamPath>,
    JsonBody(req): JsonBody<PatientRef>,
) -> Result<StatusCode, ApiError> {
    let index = req.index(&state)?;
    let removed = sqlx::query!("DELETE FROM care_team_patients WHERE team_id = $1 AND patient_index = $2", team, index)
        .execute(&state.db)
        .await?;
    if removed.rows_affected() == 0 {
        return Err(ApiError::NotFound);
    }
    let event = admin.event(Action::AdminTeam, Outcome::Success).resource("care_team", &team.to_string());
    state.audit(&event.patient(&index).reason("patient_remove")).await?;
    Ok(StatusCode::NO_CONTENT)
}
