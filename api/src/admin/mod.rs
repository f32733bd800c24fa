//! `/v1/admin`: users and their sessions (`users`), service accounts and
//! their API keys (`service_accounts`), care teams (`teams`) and the
//! break-glass review (`break_glass`). Admin only; every call is audited;
//! nothing here returns document content or a patient reference.

pub mod break_glass;
pub mod service_accounts;
pub mod teams;
pub mod users;

use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::ApiError;
use crate::users::UserError;

/// The user a path names (`/v1/admin/users/{id}…`).
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
pub(crate) struct UserPath {
    /// The user's id
    id: Uuid,
}

/// The refusal of a user's creation or change.
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

// What an admin created: its id. (A plain comment: a doc comment would
// become the schema's description in the OpenAPI document.)
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct Created {
    pub(crate) id: Uuid,
}
