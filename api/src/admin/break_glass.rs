//! The break-glass review: every grant, with its reason opened for the
//! reviewer.

use axum::Json;
use axum::extract::State;
use clinflow::audit::{Action, Outcome};
use serde::Serialize;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::auth::AuthUser;
use crate::error::ApiError;
use crate::state::AppState;

#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct GrantView {
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
#[tracing::instrument(skip_all, fields(user_id = %admin.id))]
pub(crate) async fn break_glass_grants(
    State(state): State<AppState>,
    admin: AuthUser,
) -> Result<Json<Vec<GrantView>>, ApiError> {
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
        let reason = match opener.open_string(clinflow::keys::break_glass_reason_field(r.id), &r.reason_ct) {
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
