//! Login, logout and the one extractor every protected handler uses.
//!
//! A token is an HS256 JWT (algorithm pinned; `iss`, `aud`, `sub`, `exp`,
//! `nbf`, `iat` and `jti` required) whose `jti` names a row in `sessions`.
//! Each request checks and touches that row, so logout, a disabled user and
//! the 15-minute idle timeout take effect at once; the role is read from the
//! database on every request, never trusted from the token.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::{Json, Router, routing::post};
use clinflow::audit::{Action, Actor, ActorKind, AuditEvent, Outcome};
use clinflow::wire::{LOGIN_PATH, LoginRequest, LoginResponse};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use secrecy::{ExposeSecret, SecretBox};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::AppState;
use crate::error::ApiError;
use crate::users::{self, Role};

const ISSUER: &str = "clinflow";
const AUDIENCE: &str = "clinflow-api";
/// Absolute lifetime of a token; the idle timeout usually ends it sooner.
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(8 * 3600);
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(15 * 60);

pub fn router() -> Router<AppState> {
    Router::new().route(LOGIN_PATH, post(login)).route("/v1/auth/logout", post(logout))
}

pub struct JwtKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

impl JwtKeys {
    pub fn new(secret: &SecretBox<Vec<u8>>) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&[ISSUER]);
        validation.set_audience(&[AUDIENCE]);
        validation.set_required_spec_claims(&["iss", "aud", "sub", "exp", "nbf"]);
        validation.validate_nbf = true;
        validation.leeway = 30;
        Self {
            encoding: EncodingKey::from_secret(secret.expose_secret()),
            decoding: DecodingKey::from_secret(secret.expose_secret()),
            validation,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    iss: String,
    aud: String,
    sub: Uuid,
    exp: i64,
    nbf: i64,
    iat: i64,
    jti: Uuid,
}

/// Where a request came from, for the audit trail.
#[derive(Debug, Clone)]
pub struct RequestMeta {
    pub source_ip: Option<IpAddr>,
    pub request_id: Option<String>,
}

impl<S: Send + Sync> FromRequestParts<S> for RequestMeta {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let source_ip = parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip());
        let request_id =
            parts.headers.get("x-request-id").and_then(|v| v.to_str().ok()).map(|v| v.chars().take(64).collect());
        Ok(Self { source_ip, request_id })
    }
}

impl RequestMeta {
    pub fn event(&self, action: Action, actor: Actor, outcome: Outcome) -> AuditEvent {
        AuditEvent::new(action, actor, outcome).from_request(self.source_ip, self.request_id.clone())
    }
}

/// An authenticated user with a live session.
#[derive(Debug, Clone)]
pub struct AuthUser {
    pub id: Uuid,
    pub username: String,
    pub role: Role,
    pub session_id: Uuid,
    pub meta: RequestMeta,
}

impl AuthUser {
    pub fn actor(&self) -> Actor {
        Actor {
            kind: ActorKind::User,
            id: Some(self.id),
            name: Some(self.username.clone()),
            role: Some(self.role.as_str().to_owned()),
        }
    }

    pub fn event(&self, action: Action, outcome: Outcome) -> AuditEvent {
        self.meta.event(action, self.actor(), outcome)
    }

    /// Deny by default: the caller lists the roles allowed. A denial is
    /// audited before it is answered.
    pub async fn require(
        &self,
        state: &AppState,
        allowed: &[Role],
        action: Action,
        resource: Option<Uuid>,
    ) -> Result<(), ApiError> {
        if allowed.contains(&self.role) {
            return Ok(());
        }
        let mut event = self.event(action, Outcome::Denied).reason("role_forbidden");
        if let Some(id) = resource {
            event = event.document(id);
        }
        state.audit_denial(event).await;
        Err(ApiError::Forbidden)
    }
}

impl FromRequestParts<AppState> for AuthUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let started = std::time::Instant::now();
        let Ok(meta) = RequestMeta::from_request_parts(parts, state).await;
        let refuse = async |actor: Actor, reason: &'static str| {
            metrics::counter!("clinflow_api_auth_rejected_total", "reason" => reason).increment(1);
            state.audit_denial(meta.event(Action::Access, actor, Outcome::Denied).reason(reason)).await;
            ApiError::Unauthenticated
        };
        let token = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")));
        let Some(token) = token else { return Err(refuse(Actor::anonymous(None), "missing_token").await) };
        let claims = match jsonwebtoken::decode::<Claims>(token, &state.jwt.decoding, &state.jwt.validation) {
            Ok(decoded) => decoded.claims,
            Err(e) if matches!(e.kind(), jsonwebtoken::errors::ErrorKind::ExpiredSignature) => {
                return Err(refuse(Actor::anonymous(None), "expired_token").await);
            }
            Err(_) => return Err(refuse(Actor::anonymous(None), "invalid_token").await),
        };
        let idle = state.idle_timeout.as_secs_f64();
        // Touching the session on every request made concurrent requests of
        // one session queue on its row lock; a touch at most every few
        // seconds keeps the idle timeout exact to that much.
        let touch_every = (idle / 10.0).min(5.0);
        let row = sqlx::query!(
            r#"WITH live AS (
                   SELECT s.id, u.username, u.role, s.last_seen_at
                   FROM sessions s JOIN users u ON u.id = s.user_id
                   WHERE s.id = $1 AND s.user_id = $2
                     AND s.revoked_at IS NULL AND u.disabled_at IS NULL
                     AND s.expires_at > now()
                     AND s.last_seen_at > now() - make_interval(secs => $3)
               ), touched AS (
                   UPDATE sessions SET last_seen_at = now()
                   WHERE id IN (SELECT id FROM live WHERE last_seen_at < now() - make_interval(secs => $4))
               )
               SELECT username, role FROM live"#,
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
        Ok(Self { id: claims.sub, username: row.username, role, session_id: claims.jti, meta })
    }
}

#[derive(FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct JsonBody<T>(pub T);

#[tracing::instrument(skip_all, fields(user_id))]
async fn login(
    State(state): State<AppState>,
    meta: RequestMeta,
    JsonBody(req): JsonBody<LoginRequest>,
) -> Result<Json<LoginResponse>, ApiError> {
    // An over-long or malformed name cannot exist; still spend the hashing time.
    let attempted = users::valid_username(&req.username).then_some(req.username.as_str());
    let creds = match attempted {
        Some(name) => users::credentials(&state.db, name).await?,
        None => None,
    };
    let ok = state.passwords.verify(req.password, creds.as_ref().map(|c| c.password_hash.clone())).await;
    let (Some(creds), true) = (creds, ok) else {
        let event = meta.event(Action::Login, Actor::anonymous(attempted), Outcome::Failure).reason("bad_credentials");
        state.audit(&event).await?;
        return Err(ApiError::InvalidCredentials);
    };
    tracing::Span::current().record("user_id", tracing::field::display(creds.id));

    let now = OffsetDateTime::now_utc();
    let expires_at = now + TOKEN_LIFETIME;
    let session_id = Uuid::now_v7();
    sqlx::query!(
        "INSERT INTO sessions (id, user_id, expires_at, source_ip) VALUES ($1, $2, $3, $4)",
        session_id,
        creds.id,
        expires_at,
        meta.source_ip.map(sqlx::types::ipnet::IpNet::from),
    )
    .execute(&state.db)
    .await?;
    let claims = Claims {
        iss: ISSUER.into(),
        aud: AUDIENCE.into(),
        sub: creds.id,
        exp: expires_at.unix_timestamp(),
        nbf: now.unix_timestamp(),
        iat: now.unix_timestamp(),
        jti: session_id,
    };
    let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &state.jwt.encoding)
        .map_err(|e| anyhow::anyhow!("signing a token: {e}"))?;
    let actor =
        Actor { kind: ActorKind::User, id: Some(creds.id), name: attempted.map(str::to_owned), role: Some(creds.role) };
    if let Err(e) = state.audit(&meta.event(Action::Login, actor, Outcome::Success)).await {
        revoke(&state, session_id).await?;
        return Err(e);
    }
    Ok(Json(LoginResponse { access_token: token, token_type: "bearer".into(), expires_at }))
}

async fn logout(State(state): State<AppState>, user: AuthUser) -> Result<StatusCode, ApiError> {
    revoke(&state, user.session_id).await?;
    state.audit(&user.event(Action::Logout, Outcome::Success)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn revoke(state: &AppState, session_id: Uuid) -> Result<(), ApiError> {
    sqlx::query!("UPDATE sessions SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL", session_id)
        .execute(&state.db)
        .await?;
    Ok(())
}
