//! Deny by default: who may call an endpoint ([`Access`]) and the one guard
//! that enforces it before any handler runs. The guard authenticates the
//! caller (a session token or an API key), checks the role, audits a
//! refusal with the endpoint's action, and hands the handler the caller as
//! [`AuthUser`], which only the guard can provide.

use axum::extract::{FromRequestParts, RawPathParams, Request, State};
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use clinflow::audit::{Action, Actor, ActorKind, Outcome};
use uuid::Uuid;

use crate::auth::{self, API_KEY_DOMAIN, API_KEY_PREFIX, AuthUser, CSRF_HEADER, RequestMeta, SESSION_COOKIE};
use crate::error::ApiError;
use crate::state::AppState;
use crate::users::Role;

/// Who may call an endpoint.
#[derive(Debug, Clone, Copy)]
pub enum Access {
    /// Anyone, without credentials (login, health).
    Public,
    /// An authenticated user holding one of these roles. A refusal is
    /// audited as `action`, with the `{id}` path parameter as a resource of
    /// kind `resource` when there is one.
    Roles { roles: &'static [Role], action: Action, resource: Option<&'static str> },
}

impl Access {
    pub const fn roles(roles: &'static [Role], action: Action) -> Self {
        Self::Roles { roles, action, resource: None }
    }

    /// As [`roles`](Self::roles); the `{id}` in the path names a `resource`.
    pub const fn on(roles: &'static [Role], action: Action, resource: &'static str) -> Self {
        Self::Roles { roles, action, resource: Some(resource) }
    }

    /// Whether a caller whose password an admin set (one-time) may call
    /// this before replacing it: only the password change, logout, and
    /// the console's read of its own session (which tells it to ask for
    /// the new password).
    pub fn open_before_password_change(&self) -> bool {
        match self {
            Self::Public => true,
            Self::Roles { action, .. } => matches!(action, Action::PasswordChange | Action::Logout | Action::Session),
        }
    }

    pub fn allows(&self, role: Role) -> bool {
        match self {
            Self::Public => true,
            Self::Roles { roles, .. } => roles.contains(&role),
        }
    }
}

pub(crate) async fn guard(State(state): State<AppState>, access: Access, req: Request, next: Next) -> Response {
    let Access::Roles { roles, action, resource } = access else { return next.run(req).await };
    let (mut parts, body) = req.into_parts();
    let (user, password_change_required) = match authenticate(&mut parts, &state).await {
        Ok(user) => user,
        Err(e) => return e.into_response(),
    };
    if password_change_required && !access.open_before_password_change() {
        metrics::counter!("clinflow_api_forbidden_total", "reason" => "password_change_required").increment(1);
        state.audit_denial(user.event(action, Outcome::Denied).reason("password_change_required")).await;
        return ApiError::BadRequest {
            status: axum::http::StatusCode::FORBIDDEN,
            code: "password_change_required",
            message: "your password was set by an admin and is one-time: replace it with POST /v1/auth/password".into(),
        }
        .into_response();
    }
    if !roles.contains(&user.role) {
        let mut event = user.event(action, Outcome::Denied).reason("role_forbidden");
        if let Some(kind) = resource
            && let Ok(params) = RawPathParams::from_request_parts(&mut parts, &state).await
            && let Some((_, id)) = params.iter().find(|(name, _)| *name == "id")
            && let Ok(id) = id.parse::<Uuid>()
        {
            event = event.resource(kind, &id.to_string());
        }
        metrics::counter!("clinflow_api_forbidden_total", "reason" => "role_forbidden").increment(1);
        state.audit_denial(event).await;
        return ApiError::Forbidden.into_response();
    }
    parts.extensions.insert(user);
    next.run(Request::from_parts(parts, body)).await
}

/// Who is calling: a bearer JWT whose session is live, or a live API key of
/// a service account, or the console's session cookie with its CSRF token;
/// and whether they must replace their password first. Every refusal is
/// audited (rate-limited) and answered 401 without saying why, but for a
/// cookie without its CSRF token (403 `csrf_token`).
async fn authenticate(parts: &mut Parts, state: &AppState) -> Result<(AuthUser, bool), ApiError> {
    let started = std::time::Instant::now();
    let Ok(meta) = RequestMeta::from_request_parts(parts, state).await;
    let refuse = async |actor: Actor, reason: &'static str| {
        metrics::counter!("clinflow_api_auth_rejected_total", "reason" => reason).increment(1);
        state.audit_denial(meta.event(Action::Access, actor, Outcome::Denied).reason(reason)).await;
        ApiError::Unauthenticated
    };
    let bearer = parts
        .headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")));
    // The console's cookie, only when no Authorization header is sent: a
    // session token, never an API key, and held to its CSRF token below.
    let cookie = bearer.is_none().then(|| auth::cookie(&parts.headers, SESSION_COOKIE)).flatten();
    let Some(token) = bearer.or(cookie) else { return Err(refuse(Actor::anonymous(None), "missing_token").await) };
    if let Some(key) = token.strip_prefix(API_KEY_PREFIX).filter(|_| cookie.is_none()) {
        let parsed = key.split_once('_').and_then(|(id, secret)| Some((Uuid::try_parse(id).ok()?, secret)));
        let Some((key_id, secret)) = parsed else {
            return Err(refuse(Actor::anonymous(None), "invalid_api_key").await);
        };
        let row = sqlx::query!(
            r#"WITH live AS (
                   SELECT k.id, k.user_id, k.secret_hash, k.last_used_at, u.username, u.role, u.default_lawful_basis
                   FROM api_keys k JOIN users u ON u.id = k.user_id
                   WHERE k.id = $1 AND k.revoked_at IS NULL AND u.disabled_at IS NULL AND u.kind = 'service'
               ), touched AS (
                   UPDATE api_keys SET last_used_at = now()
                   WHERE id IN (SELECT id FROM live
                                WHERE last_used_at IS NULL OR last_used_at < now() - interval '60 seconds')
               )
               SELECT user_id, secret_hash, username, role, default_lawful_basis FROM live"#,
            key_id,
        )
        .fetch_optional(&state.db)
        .await?;
        let Some(row) = row.filter(|r| state.index_key.verify(API_KEY_DOMAIN, secret.as_bytes(), &r.secret_hash))
        else {
            return Err(refuse(Actor::anonymous(None), "invalid_api_key").await);
        };
        let role = Role::parse(&row.role).ok_or(ApiError::Unauthenticated)?;
        metrics::histogram!("clinflow_api_stage_seconds", "stage" => "auth").record(started.elapsed().as_secs_f64());
        let default_basis = row.default_lawful_basis.as_deref().and_then(clinflow::retention::Basis::parse);
        let user = AuthUser { id: row.user_id, username: row.username, role, session_id: None, default_basis, meta };
        return Ok((user, false));
    }
    let claims = match state.jwt.verify(token) {
        Ok(claims) => claims,
        Err(e) if matches!(e.kind(), jsonwebtoken::errors::ErrorKind::ExpiredSignature) => {
            return Err(refuse(Actor::anonymous(None), "expired_token").await);
        }
        Err(_) => return Err(refuse(Actor::anonymous(None), "invalid_token").await),
    };
    if cookie.is_some() {
        let presented = parts.headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("");
        if !auth::csrf_valid(&state.index_key, claims.jti, presented) {
            let actor = Actor { kind: ActorKind::User, id: Some(claims.sub), name: None, role: None };
            metrics::counter!("clinflow_api_auth_rejected_total", "reason" => "csrf_token").increment(1);
            state.audit_denial(meta.event(Action::Access, actor, Outcome::Denied).reason("csrf_token")).await;
            return Err(ApiError::CsrfToken);
        }
    }
    let idle = state.idle_timeout.as_secs_f64();
    // Touching the session on every request made concurrent requests of
    // one session queue on its row lock; a touch at most every few
    // seconds keeps the idle timeout exact to that much.
    let touch_every = (idle / 10.0).min(5.0);
    let row = sqlx::query!(
        r#"WITH live AS (
               SELECT s.id, u.username, u.role, u.password_change_required, u.default_lawful_basis, s.last_seen_at
               FROM sessions s JOIN users u ON u.id = s.user_id
               WHERE s.id = $1 AND s.user_id = $2
                 AND s.revoked_at IS NULL AND u.disabled_at IS NULL
                 AND s.expires_at > now()
                 AND s.last_seen_at > now() - make_interval(secs => $3)
           ), touched AS (
               UPDATE sessions SET last_seen_at = now()
               WHERE id IN (SELECT id FROM live WHERE last_seen_at < now() - make_interval(secs => $4))
           )
           SELECT username, role, password_change_required, default_lawful_basis FROM live"#,
        claims.jti,
        claims.sub,
        idle,
        touch_every,
    )
    .fetch_optional(&state.db)
    .await?;
    let Some(row) = row else {
        let actor = Actor { kind: ActorKind::User, id: Some(claims.sub), name: None, role: None };
        return Err(refuse(actor, "session_ended").await);
    };
    let role = Role::parse(&row.role).ok_or(ApiError::Unauthenticated)?;
    metrics::histogram!("clinflow_api_stage_seconds", "stage" => "auth").record(started.elapsed().as_secs_f64());
    let default_basis = row.default_lawful_basis.as_deref().and_then(clinflow::retention::Basis::parse);
    let user =
        AuthUser { id: claims.sub, username: row.username, role, session_id: Some(claims.jti), default_basis, meta };
    Ok((user, row.password_change_required))
}
