//! Logging in and out: `POST /v1/auth/login` (a bearer token), the
//! console's cookie session (`/v1/auth/session`), `/v1/auth/logout` and the
//! password change.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use clinflow::audit::{Action, Actor, ActorKind, Outcome};
use clinflow::wire::{LOGIN_PATH, LoginRequest, LoginResponse};
use serde::Serialize;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::auth::{self, AuthUser, RequestMeta, TOKEN_LIFETIME};
use crate::error::ApiError;
use crate::extract::JsonBody;
use crate::lockout;
use crate::state::AppState;
use crate::users::{self, Role};

/// The console's session: opened by `POST`, read by `GET`.
pub const SESSION_PATH: &str = "/v1/auth/session";

/// Log in with a username and password.
///
/// The token lasts 8 hours at most and ends after 15 idle minutes, at
/// logout, or when an admin disables the user, resets their password or
/// forces a logout. Service accounts cannot log in: they use API keys.
#[utoipa::path(
    post,
    path = LOGIN_PATH,
    tag = "auth",
    request_body = LoginRequest,
    responses(
        (status = 200, description = "A session token", body = LoginResponse),
    ),
    extensions(("x-errors" = json!([
        "invalid_credentials", "too_many_logins", "internal", "login_busy", "unavailable",
    ]))),
)]
#[tracing::instrument(skip_all, fields(user_id))]
pub(crate) async fn login(
    State(state): State<AppState>,
    meta: RequestMeta,
    JsonBody(req): JsonBody<LoginRequest>,
) -> Result<Json<LoginResponse>, ApiError> {
    let opened = open_session(&state, &meta, &req).await?;
    Ok(Json(LoginResponse {
        access_token: opened.token,
        token_type: "bearer".into(),
        expires_at: opened.expires_at,
        password_change_required: opened.password_change_required,
    }))
}

/// A session a login opened.
struct Opened {
    token: String,
    session_id: Uuid,
    expires_at: OffsetDateTime,
    password_change_required: bool,
    username: String,
    role: Role,
}

/// Checks the password (throttled, counted toward the lockout, each
/// refusal audited) and opens a session: what both logins share.
async fn open_session(state: &AppState, meta: &RequestMeta, req: &LoginRequest) -> Result<Opened, ApiError> {
    // An over-long or malformed name cannot exist; still spend the hashing time.
    let attempted = users::valid_username(&req.username).then_some(req.username.as_str());
    let outcome = |o: &'static str| metrics::counter!("clinflow_logins_total", "outcome" => o).increment(1);
    if let Some(wait) = state.login.throttled(meta.source_ip) {
        outcome("throttled");
        let event = meta.event(Action::Login, Actor::anonymous(attempted), Outcome::Denied).reason("rate_limited");
        state.audit_denial(event).await;
        return Err(ApiError::LoginThrottled(wait));
    }
    let Ok(admitted) = state.passwords.admit() else {
        outcome("shed");
        return Err(ApiError::LoginBusy);
    };
    let policy = state.login.lockout;
    // The attempt is counted before the password is checked, so concurrent
    // guesses cannot pass the threshold; a locked, disabled, unknown or
    // service account gets no attempt and is checked against a dummy hash:
    // every refusal is the same 401 after the same work.
    let attempt = match attempted {
        Some(name) => lockout::begin_attempt(&state.db, name, &policy).await?,
        None => None,
    };
    let over = attempt.as_ref().is_some_and(|a| a.failures > i64::from(policy.threshold));
    let hash = attempt.as_ref().filter(|_| !over).map(|a| a.password_hash.clone());
    let ok = state.passwords.verify(&admitted, req.password.clone(), hash).await;
    drop(admitted);
    let attempt = match attempt {
        Some(a) if ok => a,
        attempt => {
            let reason = match (&attempt, attempted) {
                (Some(_), _) if over => "locked",
                (Some(a), _) => {
                    if a.failures >= i64::from(policy.threshold) && lockout::lock(&state.db, a.id, &policy).await? {
                        metrics::counter!("clinflow_account_lockouts_total").increment(1);
                        let actor = Actor::anonymous(attempted);
                        state
                            .audit(
                                &meta
                                    .event(Action::Lockout, actor, Outcome::Success)
                                    .resource("user", &a.id.to_string()),
                            )
                            .await?;
                    }
                    "bad_credentials"
                }
                (None, Some(name)) => lockout::refusal_reason(&state.db, name).await?,
                (None, None) => "bad_credentials",
            };
            outcome(if reason == "locked" { "locked" } else { "failure" });
            let event = meta.event(Action::Login, Actor::anonymous(attempted), Outcome::Failure).reason(reason);
            state.audit(&event).await?;
            return Err(ApiError::InvalidCredentials);
        }
    };
    tracing::Span::current().record("user_id", tracing::field::display(attempt.id));
    let rehash = if users::needs_rehash(&attempt.password_hash) {
        Some(state.passwords.hash(req.password.clone()).await.map_err(anyhow::Error::new)?)
    } else {
        None
    };
    lockout::login_succeeded(&state.db, attempt.id, rehash.as_deref()).await?;

    let now = OffsetDateTime::now_utc();
    let expires_at = now + TOKEN_LIFETIME;
    let session_id = Uuid::now_v7();
    sqlx::query!(
        "INSERT INTO sessions (id, user_id, expires_at, source_ip) VALUES ($1, $2, $3, $4)",
        session_id,
        attempt.id,
        expires_at,
        meta.source_ip.map(sqlx::types::ipnet::IpNet::from),
    )
    .execute(&state.db)
    .await?;
    let token = state.jwt.sign(attempt.id, session_id, now, expires_at)?;
    let actor = Actor {
        kind: ActorKind::User,
        id: Some(attempt.id),
        name: attempted.map(str::to_owned),
        role: Some(attempt.role.clone()),
    };
    if let Err(e) = state.audit(&meta.event(Action::Login, actor, Outcome::Success)).await {
        revoke(state, session_id).await?;
        return Err(e);
    }
    outcome("success");
    let role = Role::parse(&attempt.role).ok_or_else(|| anyhow::anyhow!("unknown role"))?;
    Ok(Opened {
        token,
        session_id,
        expires_at,
        password_change_required: attempt.password_change_required,
        username: req.username.clone(),
        role,
    })
}

/// The console's session: who the caller is, when the session ends, and
/// their live break-glass grants (never the patients they name).
#[derive(Serialize, utoipa::ToSchema)]
pub struct SessionInfo {
    username: String,
    role: Role,
    #[serde(with = "time::serde::rfc3339")]
    expires_at: OffsetDateTime,
    /// The session ends after this many seconds without a request.
    idle_timeout_seconds: u64,
    /// Until it is replaced (`POST /v1/auth/password`), every other call is
    /// refused.
    password_change_required: bool,
    break_glass: Vec<LiveGrant>,
}

/// A live break-glass grant of the caller's.
#[derive(Serialize, utoipa::ToSchema)]
pub struct LiveGrant {
    id: Uuid,
    #[serde(with = "time::serde::rfc3339")]
    expires_at: OffsetDateTime,
}

/// Log in to the console: the session token is set in an HttpOnly cookie
/// (`__Host-clinflow-session`), which the page's script never sees, and its
/// CSRF token in a second cookie (`__Host-clinflow-csrf`), which the script
/// sends back in the `X-CSRF-Token` header of every request; a request with
/// the session cookie and without that header is refused (`csrf_token`).
/// The same password checks, lockout and timeouts as `POST /v1/auth/login`.
#[utoipa::path(
    post,
    path = SESSION_PATH,
    tag = "auth",
    request_body = LoginRequest,
    responses(
        (status = 200, description = "The session, its token and CSRF token set as cookies", body = SessionInfo,
            headers(("set-cookie" = String, description = "`__Host-clinflow-session` (HttpOnly) and `__Host-clinflow-csrf`"))),
    ),
    extensions(("x-errors" = json!([
        "invalid_credentials", "too_many_logins", "internal", "login_busy", "unavailable",
    ]))),
)]
#[tracing::instrument(skip_all, fields(user_id))]
pub(crate) async fn console_login(
    State(state): State<AppState>,
    meta: RequestMeta,
    JsonBody(req): JsonBody<LoginRequest>,
) -> Result<Response, ApiError> {
    let opened = open_session(&state, &meta, &req).await?;
    let info = SessionInfo {
        username: opened.username,
        role: opened.role,
        expires_at: opened.expires_at,
        idle_timeout_seconds: state.idle_timeout.as_secs(),
        password_change_required: opened.password_change_required,
        break_glass: Vec::new(),
    };
    let csrf = auth::csrf_token(&state.index_key, opened.session_id);
    with_cookies(Json(info).into_response(), auth::session_cookies(&opened.token, &csrf))
}

/// The caller's session (the console asks on every page load).
#[utoipa::path(
    get,
    path = SESSION_PATH,
    tag = "auth",
    responses((status = 200, description = "The caller's session", body = SessionInfo)),
    extensions(("x-errors" = json!(["not_a_session"]))),
)]
#[tracing::instrument(skip_all, fields(user_id = %user.id))]
pub(crate) async fn session(State(state): State<AppState>, user: AuthUser) -> Result<Json<SessionInfo>, ApiError> {
    let Some(session_id) = user.session_id else {
        return Err(ApiError::invalid("not_a_session", "an API key has no session"));
    };
    let row = sqlx::query!(
        r#"SELECT s.expires_at, u.password_change_required,
                  coalesce((SELECT array_agg(g.id ORDER BY g.expires_at) FROM break_glass_grants g
                            WHERE g.user_id = s.user_id AND g.expires_at > now()), '{}') AS "grants!",
                  coalesce((SELECT array_agg(g.expires_at ORDER BY g.expires_at) FROM break_glass_grants g
                            WHERE g.user_id = s.user_id AND g.expires_at > now()), '{}') AS "grant_ends!"
           FROM sessions s JOIN users u ON u.id = s.user_id WHERE s.id = $1"#,
        session_id,
    )
    .fetch_one(&state.db)
    .await?;
    let break_glass =
        row.grants.into_iter().zip(row.grant_ends).map(|(id, expires_at)| LiveGrant { id, expires_at }).collect();
    Ok(Json(SessionInfo {
        username: user.username,
        role: user.role,
        expires_at: row.expires_at,
        idle_timeout_seconds: state.idle_timeout.as_secs(),
        password_change_required: row.password_change_required,
        break_glass,
    }))
}

fn with_cookies(mut response: Response, cookies: [String; 2]) -> Result<Response, ApiError> {
    for cookie in cookies {
        let value = HeaderValue::try_from(cookie).map_err(anyhow::Error::new)?;
        response.headers_mut().append(header::SET_COOKIE, value);
    }
    Ok(response)
}

/// End the caller's session (its token is refused from now on).
#[utoipa::path(
    post,
    path = "/v1/auth/logout",
    tag = "auth",
    responses(
        (status = 204, description = "The session has ended"),
    ),
    extensions(("x-errors" = json!(["not_a_session"]))),
)]
#[tracing::instrument(skip_all, fields(user_id = %user.id))]
pub(crate) async fn logout(State(state): State<AppState>, user: AuthUser) -> Result<Response, ApiError> {
    let Some(session_id) = user.session_id else {
        return Err(ApiError::invalid("not_a_session", "an API key has no session: an admin revokes it"));
    };
    revoke(&state, session_id).await?;
    state.audit(&user.event(Action::Logout, Outcome::Success)).await?;
    // The console's cookies go too (a bearer client has none to drop).
    with_cookies(StatusCode::NO_CONTENT.into_response(), auth::cleared_cookies())
}

async fn revoke(state: &AppState, session_id: Uuid) -> Result<(), ApiError> {
    sqlx::query!("UPDATE sessions SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL", session_id)
        .execute(&state.db)
        .await?;
    Ok(())
}

#[derive(serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct PasswordChange {
    /// The password in use (an admin's one-time password, or the caller's own).
    #[schema(format = Password)]
    current_password: String,
    /// Not the current one.
    #[schema(schema_with = crate::validate::schema::new_password)]
    new_password: String,
}

/// Replace the caller's own password. Ends their other sessions; this one
/// goes on, no longer held to the password change an admin's one-time
/// password requires. A wrong current password counts toward the lockout.
#[utoipa::path(
    post,
    path = "/v1/auth/password",
    tag = "auth",
    request_body = PasswordChange,
    responses((status = 204, description = "Changed")),
    extensions(("x-errors" = json!([
        "wrong_password", "weak_password", "same_password: the new password is the current one",
        "not_a_session", "login_busy",
    ]))),
)]
#[tracing::instrument(skip_all, fields(user_id = %user.id))]
pub(crate) async fn change_password(
    State(state): State<AppState>,
    user: AuthUser,
    JsonBody(req): JsonBody<PasswordChange>,
) -> Result<StatusCode, ApiError> {
    let Some(session_id) = user.session_id else {
        return Err(ApiError::invalid("not_a_session", "a service account has no password"));
    };
    users::valid_password(&req.new_password)
        .map_err(|e| ApiError::invalid("weak_password", format!("new_password: {e}")))?;
    // The current password first: only its holder learns that the new one
    // is the same.
    let same = req.new_password == req.current_password;
    crate::reauth::confirm_password(&state, &user, req.current_password, Action::PasswordChange, None).await?;
    if same {
        return Err(ApiError::invalid("same_password", "new_password must differ from current_password"));
    }
    let hash = state.passwords.hash(req.new_password).await.map_err(anyhow::Error::new)?;
    let mut tx = state.db.begin().await?;
    sqlx::query!("UPDATE users SET password_hash = $2, password_change_required = false WHERE id = $1", user.id, hash)
        .execute(&mut *tx)
        .await?;
    sqlx::query!(
        "UPDATE sessions SET revoked_at = now() WHERE user_id = $1 AND id <> $2 AND revoked_at IS NULL",
        user.id,
        session_id
    )
    .execute(&mut *tx)
    .await?;
    state.audit_in(&mut tx, &[user.event(Action::PasswordChange, Outcome::Success)]).await?;
    tx.commit().await?;
    state.relay.wake();
    Ok(StatusCode::NO_CONTENT)
}
