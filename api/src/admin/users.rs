//! Users (people and service accounts alike): list, create, change, reset a
//! password; their sessions, and a forced logout.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use clinflow::audit::{Action, Outcome};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

use super::{Created, UserPath, user_error};
use crate::auth::AuthUser;
use crate::error::ApiError;
use crate::extract::{JsonBody, PathParams};
use crate::state::AppState;
use crate::users::{self, Role};

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
#[tracing::instrument(skip_all, fields(user_id = %admin.id))]
pub(crate) async fn list_users(
    State(state): State<AppState>,
    admin: AuthUser,
) -> Result<Json<Vec<UserView>>, ApiError> {
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
pub(crate) struct NewUser {
    #[schema(schema_with = crate::validate::schema::username)]
    username: String,
    role: Role,
    #[schema(schema_with = crate::validate::schema::new_password)]
    password: String,
}

/// Create a person's account. The password is one-time: the next login
/// must replace it (`POST /v1/auth/password`) before any other call.
#[utoipa::path(
    post,
    path = "/v1/admin/users",
    tag = "admin",
    request_body = NewUser,
    responses(
        (status = 201, description = "Created", body = Created),
    ),
    extensions(("x-errors" = json!(["user_exists", "invalid_username", "weak_password"]))),
)]
#[tracing::instrument(skip_all, fields(user_id = %admin.id))]
pub(crate) async fn create_user(
    State(state): State<AppState>,
    admin: AuthUser,
    JsonBody(req): JsonBody<NewUser>,
) -> Result<(StatusCode, Json<Created>), ApiError> {
    let id =
        users::create(&state.db, &state.passwords, &req.username, &req.password, req.role).await.map_err(user_error)?;
    // The admin knows this password: its holder must replace it first.
    sqlx::query!("UPDATE users SET password_change_required = true WHERE id = $1", id).execute(&state.db).await?;
    let event = admin.event(Action::AdminUser, Outcome::Success).resource("user", &id.to_string());
    state.audit(&event.reason(&format!("create:{}", req.role.as_str()))).await?;
    Ok((StatusCode::CREATED, Json(Created { id })))
}

/// What an admin may not do to their own account (a well-formed request,
/// refused for whose it is).
fn own_account(message: &str) -> ApiError {
    ApiError::BadRequest { status: StatusCode::FORBIDDEN, code: "own_account", message: message.into() }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct UserChange {
    role: Option<Role>,
    disabled: Option<bool>,
}

/// `role`, `disabled` or both; one of them at least (else `no_change`).
impl utoipa::PartialSchema for UserChange {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::Ref;
        use utoipa::openapi::schema::{AdditionalProperties, AllOfBuilder, AnyOfBuilder, ObjectBuilder, Type};
        let role = || Ref::from_schema_name("Role");
        let fields = ObjectBuilder::new()
            .property("role", AnyOfBuilder::new().item(role()).item(ObjectBuilder::new().schema_type(Type::Null)))
            .property(
                "disabled",
                ObjectBuilder::new()
                    .schema_type(utoipa::openapi::schema::SchemaType::from_iter([Type::Boolean, Type::Null])),
            )
            .additional_properties(Some(AdditionalProperties::FreeForm(false)));
        let with_role = ObjectBuilder::new().property("role", role()).required("role");
        let disabled = ObjectBuilder::new().property("disabled", ObjectBuilder::new().schema_type(Type::Boolean));
        let any = AnyOfBuilder::new().item(with_role).item(disabled.required("disabled"));
        AllOfBuilder::new().item(fields).item(any).into()
    }
}

impl utoipa::ToSchema for UserChange {
    fn schemas(schemas: &mut Vec<(String, utoipa::openapi::RefOr<utoipa::openapi::schema::Schema>)>) {
        use utoipa::PartialSchema;
        schemas.push((Role::name().into(), Role::schema()));
    }
}

/// Changes a user's role or disables (or enables) them. Disabling also
/// ends their sessions; both take effect on their next request.
#[utoipa::path(
    patch,
    path = "/v1/admin/users/{id}",
    tag = "admin",
    params(UserPath),
    request_body = UserChange,
    responses(
        (status = 204, description = "Changed"),
    ),
    extensions(("x-errors" = json!(["not_found: no such user", "own_account", "service_account_role", "no_change"]))),
)]
#[tracing::instrument(skip_all, fields(user_id = %admin.id, target_user_id = %id))]
pub(crate) async fn update_user(
    State(state): State<AppState>,
    admin: AuthUser,
    PathParams(UserPath { id }): PathParams<UserPath>,
    JsonBody(req): JsonBody<UserChange>,
) -> Result<StatusCode, ApiError> {
    if id == admin.id && (req.disabled == Some(true) || req.role.is_some_and(|r| r != Role::Admin)) {
        return Err(own_account("an admin cannot disable or demote themselves"));
    }
    let mut tx = state.db.begin().await?;
    let kind = sqlx::query_scalar!("SELECT kind FROM users WHERE id = $1 FOR UPDATE", id)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(ApiError::NotFound)?;
    let mut changes = Vec::new();
    if let Some(role) = req.role {
        if kind == "service" && role != Role::Ingest {
            // Well formed; the account is of a kind that holds one role.
            return Err(ApiError::BadRequest {
                status: StatusCode::CONFLICT,
                code: "service_account_role",
                message: "service accounts hold the ingest role only".into(),
            });
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
    state.audit_in(&mut tx, &events).await?;
    tx.commit().await?;
    state.relay.wake();
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewPassword {
    #[schema(schema_with = crate::validate::schema::new_password)]
    password: String,
}

/// Sets a person's password, clears their lockout and ends their sessions.
/// The password is one-time, as at creation.
#[utoipa::path(
    post,
    path = "/v1/admin/users/{id}/password",
    tag = "admin",
    params(UserPath),
    request_body = NewPassword,
    responses(
        (status = 204, description = "Set; their lockout cleared and their sessions ended"),
    ),
    extensions(("x-errors" = json!([
        "not_found: no such person (service accounts have no password)", "weak_password", "own_account",
    ]))),
)]
#[tracing::instrument(skip_all, fields(user_id = %admin.id, target_user_id = %id))]
pub(crate) async fn reset_password(
    State(state): State<AppState>,
    admin: AuthUser,
    PathParams(UserPath { id }): PathParams<UserPath>,
    JsonBody(req): JsonBody<NewPassword>,
) -> Result<StatusCode, ApiError> {
    users::valid_password(&req.password).map_err(user_error)?;
    // Their own goes through `POST /v1/auth/password`, which asks for the
    // current one: a stolen admin session cannot take the account over.
    if id == admin.id {
        return Err(own_account("an admin changes their own password with POST /v1/auth/password"));
    }
    let hash = state.passwords.hash(req.password).await.map_err(user_error)?;
    let mut tx = state.db.begin().await?;
    let changed = sqlx::query!(
        "UPDATE users SET password_hash = $2, failed_logins = 0, failed_since = NULL, locked_until = NULL,
                          lockouts = 0, password_change_required = true
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
    state.audit_in(&mut tx, &[event]).await?;
    tx.commit().await?;
    state.relay.wake();
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct SessionView {
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
    params(UserPath),
    responses(
        (status = 200, description = "Their live sessions", body = Vec<SessionView>),
    ),
)]
#[tracing::instrument(skip_all, fields(user_id = %admin.id, target_user_id = %id))]
pub(crate) async fn sessions(
    State(state): State<AppState>,
    admin: AuthUser,
    PathParams(UserPath { id }): PathParams<UserPath>,
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
pub(crate) struct Revoked {
    revoked: u64,
}

/// Force logout: every session of the user ends; their next request is 401.
#[utoipa::path(
    delete,
    path = "/v1/admin/users/{id}/sessions",
    tag = "admin",
    params(UserPath),
    responses(
        (status = 200, description = "How many sessions ended", body = Revoked),
    ),
)]
#[tracing::instrument(skip_all, fields(user_id = %admin.id, target_user_id = %id))]
pub(crate) async fn revoke_sessions(
    State(state): State<AppState>,
    admin: AuthUser,
    PathParams(UserPath { id }): PathParams<UserPath>,
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
    state.audit_in(&mut tx, &[event]).await?;
    tx.commit().await?;
    state.relay.wake();
    Ok(Json(Revoked { revoked }))
}
