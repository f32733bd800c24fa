//! `/v1/admin`: users and service accounts, sessions (force logout), API
//! keys, care teams and the break-glass review. Admin only; every call is
//! audited; nothing here returns document content or a patient reference.

use axum::Json;
use axum::extract::State;
use axum::http::{Method, StatusCode};
use clinflow::audit::{Action, Outcome};
use clinflow::wire::ErrorBody;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::access::{Access, Endpoint};
use crate::auth::{AuthUser, JsonBody, PathParams};
use crate::care;
use crate::error::ApiError;
use crate::users::{self, Role, UserError};
use crate::{AppState, audit_in};

const ADMINS: &[Role] = &[Role::Admin];

#[derive(utoipa::OpenApi)]
#[openapi(paths(
    list_users,
    create_user,
    update_user,
    reset_password,
    sessions,
    revoke_sessions,
    create_service_account,
    api_keys,
    create_api_key,
    revoke_api_key,
    list_teams,
    create_team,
    add_member,
    remove_member,
    add_patient,
    remove_patient,
    break_glass_grants
))]
pub(crate) struct Doc;

pub fn endpoints() -> Vec<Endpoint> {
    use Method as M;
    let read = Access::roles(ADMINS, Action::AdminRead);
    let user = Access::on(ADMINS, Action::AdminUser, "user");
    let team = Access::on(ADMINS, Action::AdminTeam, "care_team");
    vec![
        Endpoint::new(M::GET, "/v1/admin/users", read, list_users),
        Endpoint::new(M::POST, "/v1/admin/users", Access::roles(ADMINS, Action::AdminUser), create_user),
        Endpoint::new(M::PATCH, "/v1/admin/users/{id}", user, update_user),
        Endpoint::new(M::POST, "/v1/admin/users/{id}/password", user, reset_password),
        Endpoint::new(M::GET, "/v1/admin/users/{id}/sessions", Access::on(ADMINS, Action::AdminRead, "user"), sessions),
        Endpoint::new(
            M::DELETE,
            "/v1/admin/users/{id}/sessions",
            Access::on(ADMINS, Action::AdminSessionsRevoke, "user"),
            revoke_sessions,
        ),
        Endpoint::new(
            M::POST,
            "/v1/admin/service-accounts",
            Access::roles(ADMINS, Action::AdminUser),
            create_service_account,
        ),
        Endpoint::new(M::GET, "/v1/admin/users/{id}/api-keys", Access::on(ADMINS, Action::AdminRead, "user"), api_keys),
        Endpoint::new(
            M::POST,
            "/v1/admin/users/{id}/api-keys",
            Access::on(ADMINS, Action::AdminApiKey, "user"),
            create_api_key,
        ),
        Endpoint::new(
            M::DELETE,
            "/v1/admin/api-keys/{id}",
            Access::on(ADMINS, Action::AdminApiKey, "api_key"),
            revoke_api_key,
        ),
        Endpoint::new(M::GET, "/v1/admin/teams", read, list_teams),
        Endpoint::new(M::POST, "/v1/admin/teams", Access::roles(ADMINS, Action::AdminTeam), create_team),
        Endpoint::new(M::PUT, "/v1/admin/teams/{id}/members/{user_id}", team, add_member),
        Endpoint::new(M::DELETE, "/v1/admin/teams/{id}/members/{user_id}", team, remove_member),
        Endpoint::new(M::POST, "/v1/admin/teams/{id}/patients", team, add_patient),
        Endpoint::new(M::POST, "/v1/admin/teams/{id}/patients/remove", team, remove_patient),
        Endpoint::new(M::GET, "/v1/admin/break-glass", read, break_glass_grants),
    ]
}

/// A team name or key label: 1-64 letters, digits and `._@ -` (the
/// database's CHECKs say the same).
fn plain_name(s: &str) -> bool {
    (1..=64).contains(&s.len()) && s.chars().all(|c| c.is_ascii_alphanumeric() || "._@ -".contains(c))
}

fn user_error(e: UserError) -> ApiError {
    match e {
        UserError::BadUsername => ApiError::invalid("invalid_username", e.to_string()),
        UserError::WeakPassword => ApiError::invalid("weak_password", e.to_string()),
        UserError::Exists(_) => ApiError::BadRequest {
            status: StatusCode::CONFLICT,
            code: "user_exists",
            message: "a user with this username exists".into(),
        },
        UserError::Hash => ApiError::Unexpected(anyhow::anyhow!("password hashing failed")),
        UserError::Db(e) => e.into(),
    }
}

#[derive(Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct UserView {
    id: Uuid,
    username: String,
    role: String,
    kind: String,
    #[serde(with = "time::serde::rfc3339")]
    created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    disabled_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    locked_until: Option<OffsetDateTime>,
}

/// Every account, by username (no password hashes).
#[utoipa::path(
    get,
    path = "/v1/admin/users",
    tag = "admin",
    responses(
        (status = 200, description = "The accounts", body = Vec<UserView>),
    ),
)]
async fn list_users(State(state): State<AppState>, admin: AuthUser) -> Result<Json<Vec<UserView>>, ApiError> {
    let users = sqlx::query_as!(
        UserView,
        "SELECT id, username, role, kind, created_at, disabled_at,
                CASE WHEN locked_until > now() THEN locked_until END AS locked_until
         FROM users ORDER BY username"
    )
    .fetch_all(&state.db)
    .await?;
    state.audit(&admin.event(Action::AdminRead, Outcome::Success).resource("users", "all")).await?;
    Ok(Json(users))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct NewUser {
    username: String,
    role: Role,
    password: String,
}

#[derive(Serialize, utoipa::ToSchema)]
struct Created {
    id: Uuid,
}

/// Create a person's account.
#[utoipa::path(
    post,
    path = "/v1/admin/users",
    tag = "admin",
    request_body = NewUser,
    responses(
        (status = 201, description = "Created", body = Created),
        (status = 409, description = "- `user_exists`: a user with this username exists", body = ErrorBody),
        (status = 422, description = "- `invalid_username`: not 1-64 characters of letters, digits and . _ @ -\n- `weak_password`: under 12 characters", body = ErrorBody),
    ),
)]
async fn create_user(
    State(state): State<AppState>,
    admin: AuthUser,
    JsonBody(req): JsonBody<NewUser>,
) -> Result<(StatusCode, Json<Created>), ApiError> {
    let id =
        users::create(&state.db, &state.passwords, &req.username, &req.password, req.role).await.map_err(user_error)?;
    let event = admin.event(Action::AdminUser, Outcome::Success).resource("user", &id.to_string());
    state.audit(&event.reason(&format!("create:{}", req.role.as_str()))).await?;
    Ok((StatusCode::CREATED, Json(Created { id })))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct NewServiceAccount {
    username: String,
}

/// A service account: role ingest, no password (it cannot log in), used
/// only with API keys.
#[utoipa::path(
    post,
    path = "/v1/admin/service-accounts",
    tag = "admin",
    request_body = NewServiceAccount,
    responses(
        (status = 201, description = "Created", body = Created),
        (status = 409, description = "- `user_exists`: a user with this username exists", body = ErrorBody),
        (status = 422, description = "- `invalid_username`: not 1-64 characters of letters, digits and . _ @ -", body = ErrorBody),
    ),
)]
async fn create_service_account(
    State(state): State<AppState>,
    admin: AuthUser,
    JsonBody(req): JsonBody<NewServiceAccount>,
) -> Result<(StatusCode, Json<Created>), ApiError> {
    if !users::valid_username(&req.username) {
        return Err(user_error(UserError::BadUsername));
    }
    let id = Uuid::now_v7();
    let inserted = sqlx::query_scalar!(
        "INSERT INTO users (id, username, password_hash, role, kind) VALUES ($1, $2, '!', 'ingest', 'service')
         ON CONFLICT (username) DO NOTHING RETURNING id",
        id,
        req.username,
    )
    .fetch_optional(&state.db)
    .await?;
    let id = inserted.ok_or_else(|| user_error(UserError::Exists(String::new())))?;
    let event = admin.event(Action::AdminUser, Outcome::Success).resource("user", &id.to_string());
    state.audit(&event.reason("create_service_account")).await?;
    Ok((StatusCode::CREATED, Json(Created { id })))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct UserChange {
    role: Option<Role>,
    disabled: Option<bool>,
}

/// Changes a user's role or disables (or enables) them. Disabling also
/// ends their sessions; both take effect on their next request.
#[utoipa::path(
    patch,
    path = "/v1/admin/users/{id}",
    tag = "admin",
    params(("id" = Uuid, Path, description = "The user's id")),
    request_body = UserChange,
    responses(
        (status = 204, description = "Changed"),
        (status = 404, description = "- `not_found`: no such user", body = ErrorBody),
        (status = 422, description = "- `own_account`: an admin cannot disable or demote themselves\n- `service_account_role`: service accounts hold the ingest role only\n- `no_change`: neither `role` nor `disabled` given", body = ErrorBody),
    ),
)]
async fn update_user(
    State(state): State<AppState>,
    admin: AuthUser,
    PathParams(id): PathParams<Uuid>,
    JsonBody(req): JsonBody<UserChange>,
) -> Result<StatusCode, ApiError> {
    if id == admin.id && (req.disabled == Some(true) || req.role.is_some_and(|r| r != Role::Admin)) {
        return Err(ApiError::invalid("own_account", "an admin cannot disable or demote themselves"));
    }
    let mut tx = state.db.begin().await?;
    let kind = sqlx::query_scalar!("SELECT kind FROM users WHERE id = $1 FOR UPDATE", id)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(ApiError::NotFound)?;
    let mut changes = Vec::new();
    if let Some(role) = req.role {
        if kind == "service" && role != Role::Ingest {
            return Err(ApiError::invalid("service_account_role", "service accounts hold the ingest role only"));
        }
        sqlx::query!("UPDATE users SET role = $2 WHERE id = $1", id, role.as_str()).execute(&mut *tx).await?;
        changes.push(format!("role:{}", role.as_str()));
    }
    match req.disabled {
        Some(true) => {
            sqlx::query!("UPDATE users SET disabled_at = coalesce(disabled_at, now()) WHERE id = $1", id)
                .execute(&mut *tx)
                .await?;
            sqlx::query!("UPDATE sessions SET revoked_at = now() WHERE user_id = $1 AND revoked_at IS NULL", id)
                .execute(&mut *tx)
                .await?;
            changes.push("disable".into());
        }
        Some(false) => {
            sqlx::query!("UPDATE users SET disabled_at = NULL WHERE id = $1", id).execute(&mut *tx).await?;
            changes.push("enable".into());
        }
        None => {}
    }
    if changes.is_empty() {
        return Err(ApiError::invalid("no_change", "give role and/or disabled"));
    }
    let events: Vec<_> = changes
        .iter()
        .map(|change| admin.event(Action::AdminUser, Outcome::Success).resource("user", &id.to_string()).reason(change))
        .collect();
    audit_in(&mut tx, &events).await?;
    tx.commit().await?;
    state.relay.wake();
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct NewPassword {
    password: String,
}

/// Sets a person's password, clears their lockout and ends their sessions.
#[utoipa::path(
    post,
    path = "/v1/admin/users/{id}/password",
    tag = "admin",
    params(("id" = Uuid, Path, description = "The user's id")),
    request_body = NewPassword,
    responses(
        (status = 204, description = "Set; their lockout cleared and their sessions ended"),
        (status = 404, description = "- `not_found`: no such person (service accounts have no password)", body = ErrorBody),
        (status = 422, description = "- `weak_password`: under 12 characters", body = ErrorBody),
    ),
)]
async fn reset_password(
    State(state): State<AppState>,
    admin: AuthUser,
    PathParams(id): PathParams<Uuid>,
    JsonBody(req): JsonBody<NewPassword>,
) -> Result<StatusCode, ApiError> {
    users::valid_password(&req.password).map_err(user_error)?;
    let hash = state.passwords.hash(req.password).await.map_err(user_error)?;
    let mut tx = state.db.begin().await?;
    let changed = sqlx::query!(
        "UPDATE users SET password_hash = $2, failed_logins = 0, failed_since = NULL, locked_until = NULL,
                          lockouts = 0
         WHERE id = $1 AND kind = 'person'",
        id,
        hash
    )
    .execute(&mut *tx)
    .await?;
    if changed.rows_affected() == 0 {
        return Err(ApiError::NotFound);
    }
    sqlx::query!("UPDATE sessions SET revoked_at = now() WHERE user_id = $1 AND revoked_at IS NULL", id)
        .execute(&mut *tx)
        .await?;
    let event = admin.event(Action::AdminUser, Outcome::Success).resource("user", &id.to_string()).reason("password");
    audit_in(&mut tx, &[event]).await?;
    tx.commit().await?;
    state.relay.wake();
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Serialize, utoipa::ToSchema)]
struct SessionView {
    id: Uuid,
    #[serde(with = "time::serde::rfc3339")]
    created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    last_seen_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    expires_at: OffsetDateTime,
    source_ip: Option<String>,
}

/// A user's live sessions (not revoked, expired or idle past the timeout).
#[utoipa::path(
    get,
    path = "/v1/admin/users/{id}/sessions",
    tag = "admin",
    params(("id" = Uuid, Path, description = "The user's id")),
    responses(
        (status = 200, description = "Their live sessions", body = Vec<SessionView>),
    ),
)]
async fn sessions(
    State(state): State<AppState>,
    admin: AuthUser,
    PathParams(id): PathParams<Uuid>,
) -> Result<Json<Vec<SessionView>>, ApiError> {
    let rows = sqlx::query!(
        "SELECT id, created_at, last_seen_at, expires_at, source_ip FROM sessions
         WHERE user_id = $1 AND revoked_at IS NULL AND expires_at > now()
           AND last_seen_at > now() - make_interval(secs => $2)
         ORDER BY created_at",
        id,
        state.idle_timeout.as_secs_f64(),
    )
    .fetch_all(&state.db)
    .await?;
    state
        .audit(&admin.event(Action::AdminRead, Outcome::Success).resource("sessions_of_user", &id.to_string()))
        .await?;
    Ok(Json(
        rows.into_iter()
            .map(|r| SessionView {
                id: r.id,
                created_at: r.created_at,
                last_seen_at: r.last_seen_at,
                expires_at: r.expires_at,
                source_ip: r.source_ip.map(|ip| ip.addr().to_string()),
            })
            .collect(),
    ))
}

#[derive(Serialize, utoipa::ToSchema)]
struct Revoked {
    revoked: u64,
}

/// Force logout: every session of the user ends; their next request is 401.
#[utoipa::path(
    delete,
    path = "/v1/admin/users/{id}/sessions",
    tag = "admin",
    params(("id" = Uuid, Path, description = "The user's id")),
    responses(
        (status = 200, description = "How many sessions ended", body = Revoked),
    ),
)]
async fn revoke_sessions(
    State(state): State<AppState>,
    admin: AuthUser,
    PathParams(id): PathParams<Uuid>,
) -> Result<Json<Revoked>, ApiError> {
    let mut tx = state.db.begin().await?;
    let revoked = sqlx::query!("UPDATE sessions SET revoked_at = now() WHERE user_id = $1 AND revoked_at IS NULL", id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    let event = admin
        .event(Action::AdminSessionsRevoke, Outcome::Success)
        .resource("user", &id.to_string())
        .reason(&format!("count:{revoked}"));
    audit_in(&mut tx, &[event]).await?;
    tx.commit().await?;
    state.relay.wake();
    Ok(Json(Revoked { revoked }))
}

#[derive(Deserialize, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct NewApiKey {
    #[serde(default)]
    label: Option<String>,
}

#[derive(Serialize, utoipa::ToSchema)]
struct ApiKeyCreated {
    id: Uuid,
    /// Shown once: only its keyed hash is stored.
    key: String,
}

/// A new API key for a service account, shown once.
#[utoipa::path(
    post,
    path = "/v1/admin/users/{id}/api-keys",
    tag = "admin",
    params(("id" = Uuid, Path, description = "The user's id")),
    request_body = NewApiKey,
    responses(
        (status = 201, description = "The key, shown this once", body = ApiKeyCreated),
        (status = 404, description = "- `not_found`: no such enabled user", body = ErrorBody),
        (status = 422, description = "- `invalid_label`: not up to 64 characters of letters, digits and ._@ -\n- `not_a_service_account`: API keys are for service accounts only", body = ErrorBody),
    ),
)]
async fn create_api_key(
    State(state): State<AppState>,
    admin: AuthUser,
    PathParams(id): PathParams<Uuid>,
    JsonBody(body): JsonBody<NewApiKey>,
) -> Result<(StatusCode, Json<ApiKeyCreated>), ApiError> {
    let label = body.label.map(|l| l.trim().to_owned()).filter(|l| !l.is_empty());
    if label.as_ref().is_some_and(|l| !plain_name(l)) {
        return Err(ApiError::invalid(
            "invalid_label",
            "label must be up to 64 characters of letters, digits and ._@ -",
        ));
    }
    let kind = sqlx::query_scalar!("SELECT kind FROM users WHERE id = $1 AND disabled_at IS NULL", id)
        .fetch_optional(&state.db)
        .await?
        .ok_or(ApiError::NotFound)?;
    if kind != "service" {
        return Err(ApiError::invalid("not_a_service_account", "API keys are for service accounts only"));
    }
    let (key_id, key, hash) = crate::auth::new_api_key(&state.index_key);
    let event = admin.event(Action::AdminApiKey, Outcome::Success).resource("api_key", &key_id.to_string());
    let mut tx = state.db.begin().await?;
    sqlx::query!(
        "INSERT INTO api_keys (id, user_id, secret_hash, label) VALUES ($1, $2, $3, $4)",
        key_id,
        id,
        hash,
        label
    )
    .execute(&mut *tx)
    .await?;
    audit_in(&mut tx, &[event.reason("create")]).await?;
    tx.commit().await?;
    state.relay.wake();
    Ok((StatusCode::CREATED, Json(ApiKeyCreated { id: key_id, key })))
}

#[derive(Serialize, utoipa::ToSchema)]
struct ApiKeyView {
    id: Uuid,
    label: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    last_used_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    revoked_at: Option<OffsetDateTime>,
}

/// A service account's API keys (never the keys themselves).
#[utoipa::path(
    get,
    path = "/v1/admin/users/{id}/api-keys",
    tag = "admin",
    params(("id" = Uuid, Path, description = "The user's id")),
    responses(
        (status = 200, description = "Its keys", body = Vec<ApiKeyView>),
    ),
)]
async fn api_keys(
    State(state): State<AppState>,
    admin: AuthUser,
    PathParams(id): PathParams<Uuid>,
) -> Result<Json<Vec<ApiKeyView>>, ApiError> {
    let keys = sqlx::query_as!(
        ApiKeyView,
        "SELECT id, label, created_at, last_used_at, revoked_at FROM api_keys WHERE user_id = $1 ORDER BY created_at",
        id
    )
    .fetch_all(&state.db)
    .await?;
    state
        .audit(&admin.event(Action::AdminRead, Outcome::Success).resource("api_keys_of_user", &id.to_string()))
        .await?;
    Ok(Json(keys))
}

/// Revoke an API key: requests with it are refused from now on.
#[utoipa::path(
    delete,
    path = "/v1/admin/api-keys/{id}",
    tag = "admin",
    params(("id" = Uuid, Path, description = "The API key's id")),
    responses(
        (status = 204, description = "Revoked"),
        (status = 404, description = "- `not_found`: no such key", body = ErrorBody),
    ),
)]
async fn revoke_api_key(
    State(state): State<AppState>,
    admin: AuthUser,
    PathParams(id): PathParams<Uuid>,
) -> Result<StatusCode, ApiError> {
    let event = admin.event(Action::AdminApiKey, Outcome::Success).resource("api_key", &id.to_string());
    let mut tx = state.db.begin().await?;
    let found = sqlx::query!("UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE id = $1", id)
        .execute(&mut *tx)
        .await?;
    if found.rows_affected() == 0 {
        return Err(ApiError::NotFound);
    }
    audit_in(&mut tx, &[event.reason("revoke")]).await?;
    tx.commit().await?;
    state.relay.wake();
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Serialize, utoipa::ToSchema)]
struct TeamView {
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
async fn list_teams(State(state): State<AppState>, admin: AuthUser) -> Result<Json<Vec<TeamView>>, ApiError> {
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
struct NewTeam {
    name: String,
}

/// Create a care team.
#[utoipa::path(
    post,
    path = "/v1/admin/teams",
    tag = "admin",
    request_body = NewTeam,
    responses(
        (status = 201, description = "Created", body = Created),
        (status = 409, description = "- `team_exists`: a care team with this name exists", body = ErrorBody),
        (status = 422, description = "- `invalid_team_name`: not 1-64 characters of letters, digits and ._@ -", body = ErrorBody),
    ),
)]
async fn create_team(
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

/// Adds a clinician to a team (members must be clinicians).
#[utoipa::path(
    put,
    path = "/v1/admin/teams/{id}/members/{user_id}",
    tag = "admin",
    params(("id" = Uuid, Path, description = "The care team's id"), ("user_id" = Uuid, Path, description = "The clinician's user id")),
    responses(
        (status = 204, description = "A member (already or now)"),
        (status = 404, description = "- `not_found`: no such team or user", body = ErrorBody),
        (status = 422, description = "- `not_a_clinician`: care team members are clinicians", body = ErrorBody),
    ),
)]
async fn add_member(
    State(state): State<AppState>,
    admin: AuthUser,
    PathParams((team, user)): PathParams<(Uuid, Uuid)>,
) -> Result<StatusCode, ApiError> {
    let role = sqlx::query_scalar!("SELECT role FROM users WHERE id = $1", user)
        .fetch_optional(&state.db)
        .await?
        .ok_or(ApiError::NotFound)?;
    if role != Role::Clinician.as_str() {
        return Err(ApiError::invalid("not_a_clinician", "care team members are clinicians"));
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
    params(("id" = Uuid, Path, description = "The care team's id"), ("user_id" = Uuid, Path, description = "The clinician's user id")),
    responses(
        (status = 204, description = "Removed"),
        (status = 404, description = "- `not_found`: not a member of this team", body = ErrorBody),
    ),
)]
async fn remove_member(
    State(state): State<AppState>,
    admin: AuthUser,
    PathParams((team, user)): PathParams<(Uuid, Uuid)>,
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
struct PatientRef {
    patient_ref: String,
}

/// Puts a patient (by reference; stored as its blind index) in a team.
#[utoipa::path(
    post,
    path = "/v1/admin/teams/{id}/patients",
    tag = "admin",
    params(("id" = Uuid, Path, description = "The care team's id")),
    request_body = PatientRef,
    responses(
        (status = 204, description = "In the team (already or now)"),
        (status = 404, description = "- `not_found`: no such team", body = ErrorBody),
        (status = 422, description = "- `invalid_patient_ref`: not 1-128 characters without control characters", body = ErrorBody),
    ),
)]
async fn add_patient(
    State(state): State<AppState>,
    admin: AuthUser,
    PathParams(team): PathParams<Uuid>,
    JsonBody(req): JsonBody<PatientRef>,
) -> Result<StatusCode, ApiError> {
    let patient_ref = crate::documents::valid_patient_ref(&req.patient_ref)?;
    if !team_exists(&state, team).await? {
        return Err(ApiError::NotFound);
    }
    let index = clinflow::documents::patient_index(&state.index_key, &patient_ref);
    care::add_patients(&mut *state.db.acquire().await?, &[(team, index)]).await?;
    team_change(&state, &admin, team, "patient_add").await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Take a patient (by reference) out of a team.
#[utoipa::path(
    post,
    path = "/v1/admin/teams/{id}/patients/remove",
    tag = "admin",
    params(("id" = Uuid, Path, description = "The care team's id")),
    request_body = PatientRef,
    responses(
        (status = 204, description = "Removed"),
        (status = 404, description = "- `not_found`: the patient is not in this team", body = ErrorBody),
        (status = 422, description = "- `invalid_patient_ref`: not 1-128 characters without control characters", body = ErrorBody),
    ),
)]
async fn remove_patient(
    State(state): State<AppState>,
    admin: AuthUser,
    PathParams(team): PathParams<Uuid>,
    JsonBody(req): JsonBody<PatientRef>,
) -> Result<StatusCode, ApiError> {
    let patient_ref = crate::documents::valid_patient_ref(&req.patient_ref)?;
    let index = clinflow::documents::patient_index(&state.index_key, &patient_ref);
    let removed = sqlx::query!("DELETE FROM care_team_patients WHERE team_id = $1 AND patient_index = $2", team, index)
        .execute(&state.db)
        .await?;
    if removed.rows_affected() == 0 {
        return Err(ApiError::NotFound);
    }
    team_change(&state, &admin, team, "patient_remove").await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Serialize, utoipa::ToSchema)]
struct GrantView {
    id: Uuid,
    user_id: Uuid,
    username: String,
    /// The clinician's justification (decrypted for the review); null once
    /// the patient is erased (their data key, which sealed it, destroyed).
    reason: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    granted_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    expires_at: OffsetDateTime,
    active: bool,
}

/// Every break-glass grant, newest first, for review. The patient is not
/// shown: the audit trail links each read to its grant.
#[utoipa::path(
    get,
    path = "/v1/admin/break-glass",
    tag = "admin",
    responses(
        (status = 200, description = "The newest 1000 grants with their reasons", body = Vec<GrantView>),
    ),
)]
async fn break_glass_grants(State(state): State<AppState>, admin: AuthUser) -> Result<Json<Vec<GrantView>>, ApiError> {
    let rows = sqlx::query!(
        r#"SELECT g.id, g.user_id, u.username, g.reason_ct, g.granted_at, g.expires_at,
                  g.expires_at > now() AS "active!"
           FROM break_glass_grants g JOIN users u ON u.id = g.user_id
           ORDER BY g.granted_at DESC LIMIT 1000"#
    )
    .fetch_all(&state.db)
    .await?;
    let opener = state.keys.opener(&state.db, rows.iter().map(|r| r.reason_ct.as_slice())).await?;
    let mut grants = Vec::with_capacity(rows.len());
    for r in rows {
        let reason = match opener.open_string(care::reason_field(r.id), &r.reason_ct) {
            Ok(reason) => Some(reason),
            Err(clinflow::crypto::CryptoError::UnknownDataKey(_)) => None,
            Err(e) => return Err(anyhow::Error::new(e).into()),
        };
        grants.push(GrantView {
            id: r.id,
            user_id: r.user_id,
            username: r.username,
            reason,
            granted_at: r.granted_at,
            expires_at: r.expires_at,
            active: r.active,
        });
    }
    state.audit(&admin.event(Action::AdminRead, Outcome::Success).resource("break_glass_grants", "all")).await?;
    Ok(Json(grants))
}
