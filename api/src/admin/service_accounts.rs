//! Service accounts and their API keys: a key is shown once, stored as its
//! keyed hash, and revoked by an admin.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use clinflow::audit::{Action, Outcome};
use clinflow::retention::Basis;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

use super::{Created, UserPath, user_error};
use crate::auth::AuthUser;
use crate::error::ApiError;
use crate::extract::{JsonBody, PathParams};
use crate::state::AppState;
use crate::users::UserError;
use crate::users::{self};
use crate::validate::plain_name;

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewServiceAccount {
    #[schema(schema_with = crate::validate::schema::username)]
    username: String,
    /// The lawful basis of its uploads that name none: `direct_care` (the
    /// default) or `legal_obligation`. Research uploads name their basis
    /// and consent each.
    #[serde(default)]
    #[schema(schema_with = service_account_basis)]
    lawful_basis: Option<String>,
}

fn service_account_basis() -> utoipa::openapi::schema::Object {
    crate::validate::schema::lawful_basis(true, &[Basis::DirectCare, Basis::LegalObligation])
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
    ),
    extensions(("x-errors" = json!(["user_exists", "invalid_username", "invalid_lawful_basis"]))),
)]
#[tracing::instrument(skip_all, fields(user_id = %admin.id))]
pub(crate) async fn create_service_account(
    State(state): State<AppState>,
    admin: AuthUser,
    JsonBody(req): JsonBody<NewServiceAccount>,
) -> Result<(StatusCode, Json<Created>), ApiError> {
    if !users::valid_username(&req.username) {
        return Err(user_error(UserError::BadUsername));
    }
    let basis = match req.lawful_basis.as_deref() {
        None => Basis::DirectCare,
        Some(b) => Basis::parse(b).filter(|b| *b != Basis::Research).ok_or_else(|| {
            ApiError::invalid("invalid_lawful_basis", "lawful_basis must be direct_care or legal_obligation")
        })?,
    };
    let id = Uuid::now_v7();
    let inserted = sqlx::query_scalar!(
        "INSERT INTO users (id, username, password_hash, role, kind, default_lawful_basis)
         VALUES ($1, $2, '!', 'ingest', 'service', $3)
         ON CONFLICT (username) DO NOTHING RETURNING id",
        id,
        req.username,
        basis.as_str(),
    )
    .fetch_optional(&state.db)
    .await?;
    let id = inserted.ok_or_else(|| user_error(UserError::Exists(String::new())))?;
    let event = admin.event(Action::AdminUser, Outcome::Success).resource("user", &id.to_string());
    state.audit(&event.reason("create_service_account")).await?;
    Ok((StatusCode::CREATED, Json(Created { id })))
}

#[derive(Deserialize, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewApiKey {
    #[serde(default)]
    #[schema(schema_with = key_label)]
    label: Option<String>,
}

/// A label, or none (empty, white space or null).
fn key_label() -> utoipa::openapi::schema::Object {
    crate::validate::schema::plain_name_or_empty()
}

#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct ApiKeyCreated {
    id: Uuid,
    /// Shown once: only its keyed hash is stored.
    key: String,
}

/// A new API key for a service account, shown once.
#[utoipa::path(
    post,
    path = "/v1/admin/users/{id}/api-keys",
    tag = "admin",
    params(UserPath),
    request_body = NewApiKey,
    responses(
        (status = 201, description = "The key, shown this once", body = ApiKeyCreated),
    ),
    extensions(("x-errors" = json!(["not_found: no such enabled user", "invalid_label", "not_a_service_account"]))),
)]
#[tracing::instrument(skip_all, fields(user_id = %admin.id, target_user_id = %id))]
pub(crate) async fn create_api_key(
    State(state): State<AppState>,
    admin: AuthUser,
    PathParams(UserPath { id }): PathParams<UserPath>,
    JsonBody(body): JsonBody<NewApiKey>,
) -> Result<(StatusCode, Json<ApiKeyCreated>), ApiError> {
    let label = body.label.filter(|l| !l.trim().is_empty());
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
        // The request is well formed; the account is of the other kind.
        return Err(ApiError::BadRequest {
            status: StatusCode::CONFLICT,
            code: "not_a_service_account",
            message: "API keys are for service accounts only".into(),
        });
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
    state.audit_in(&mut tx, &[event.reason("create")]).await?;
    tx.commit().await?;
    state.relay.wake();
    Ok((StatusCode::CREATED, Json(ApiKeyCreated { id: key_id, key })))
}

#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct ApiKeyView {
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
    params(UserPath),
    responses(
        (status = 200, description = "Its keys", body = Vec<ApiKeyView>),
    ),
)]
#[tracing::instrument(skip_all, fields(user_id = %admin.id, target_user_id = %id))]
pub(crate) async fn api_keys(
    State(state): State<AppState>,
    admin: AuthUser,
    PathParams(UserPath { id }): PathParams<UserPath>,
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

/// The API key a path names (`/v1/admin/api-keys/{id}`).
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
pub(crate) struct ApiKeyPath {
    /// The API key's id
    id: Uuid,
}

/// Revoke an API key: requests with it are refused from now on.
#[utoipa::path(
    delete,
    path = "/v1/admin/api-keys/{id}",
    tag = "admin",
    params(ApiKeyPath),
    responses(
        (status = 204, description = "Revoked"),
    ),
    extensions(("x-errors" = json!(["not_found: no such key"]))),
)]
#[tracing::instrument(skip_all, fields(user_id = %admin.id, api_key_id = %id))]
pub(crate) async fn revoke_api_key(
    State(state): State<AppState>,
    admin: AuthUser,
    PathParams(ApiKeyPath { id }): PathParams<ApiKeyPath>,
) -> Result<StatusCode, ApiError> {
    let event = admin.event(Action::AdminApiKey, Outcome::Success).resource("api_key", &id.to_string());
    let mut tx = state.db.begin().await?;
    let found = sqlx::query!("UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE id = $1", id)
        .execute(&mut *tx)
        .await?;
    if found.rows_affected() == 0 {
        return Err(ApiError::NotFound);
    }
    state.audit_in(&mut tx, &[event.reason("revoke")]).await?;
    tx.commit().await?;
    state.relay.wake();
    Ok(StatusCode::NO_CONTENT)
}
