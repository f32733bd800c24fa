//! Login, logout and the one extractor every protected handler uses.
//!
//! A token is an HS256 JWT (algorithm pinned; `iss`, `aud`, `sub`, `exp`,
//! `nbf`, `iat` and `jti` required) whose `jti` names a row in `sessions`.
//! Each request checks and touches that row, so logout, a disabled user and
//! the 15-minute idle timeout take effect at once; the role is read from the
//! database on every request, never trusted from the token.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::time::Duration;

use axum::Json;
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{Method, StatusCode};
use clinflow::audit::{Action, Actor, ActorKind, AuditEvent, Outcome};
use clinflow::wire::{ErrorBody, LOGIN_PATH, LoginRequest, LoginResponse};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use secrecy::{ExposeSecret, SecretBox};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::AppState;
use crate::access::{Access, Endpoint};
use crate::error::ApiError;
use crate::users::{self, Role};

const ISSUER: &str = "clinflow";
const AUDIENCE: &str = "clinflow-api";
/// Absolute lifetime of a token; the idle timeout usually ends it sooner.
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(8 * 3600);
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(15 * 60);

#[derive(utoipa::OpenApi)]
#[openapi(paths(login, logout))]
pub(crate) struct Doc;

pub fn endpoints() -> Vec<Endpoint> {
    const ANY_USER: &[Role] = &[Role::Admin, Role::Clinician, Role::Ingest, Role::Ops, Role::Auditor];
    vec![
        Endpoint::new(Method::POST, LOGIN_PATH, Access::Public, login),
        Endpoint::new(Method::POST, "/v1/auth/logout", Access::roles(ANY_USER, Action::Logout), logout),
    ]
}

/// Login throttling: per account, `threshold` failures within `window` lock
/// it for `base`, doubling with each lockout up to `max` (reset by a
/// successful login); per source address, at most so many attempts a minute.
#[derive(Debug, Clone, Copy)]
pub struct LockoutPolicy {
    pub threshold: u32,
    pub window: Duration,
    pub base: Duration,
    pub max: Duration,
}

impl Default for LockoutPolicy {
    fn default() -> Self {
        Self {
            threshold: 5,
            window: Duration::from_secs(15 * 60),
            base: Duration::from_secs(5 * 60),
            max: Duration::from_secs(24 * 3600),
        }
    }
}

pub struct LoginGuard {
    pub lockout: LockoutPolicy,
    per_source: DefaultKeyedRateLimiter<IpAddr>,
}

impl LoginGuard {
    /// `per_source_per_minute` login attempts per address and minute, in
    /// bursts of as many.
    pub fn new(lockout: LockoutPolicy, per_source_per_minute: NonZeroU32) -> Self {
        Self { lockout, per_source: RateLimiter::keyed(Quota::per_minute(per_source_per_minute)) }
    }

    /// Seconds to wait when this address is over its rate.
    fn throttled(&self, source: Option<IpAddr>) -> Option<u64> {
        let ip = source?;
        let not_until = self.per_source.check_key(&ip).err()?;
        let wait = not_until.wait_time_from(governor::clock::Clock::now(&governor::clock::DefaultClock::default()));
        Some(wait.as_secs_f64().ceil().max(1.0) as u64)
    }
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

/// An authenticated user with a live session or API key, as the access
/// guard found it (see `access`): a handler that takes one runs only for the
/// roles its endpoint declares.
#[derive(Debug, Clone)]
pub struct AuthUser {
    pub id: Uuid,
    pub username: String,
    pub role: Role,
    /// The session of a token; None for an API key.
    pub session_id: Option<Uuid>,
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
}

impl FromRequestParts<AppState> for AuthUser {
    type Rejection = ApiError;

    /// The caller the access guard authenticated; a handler reached without
    /// the guard (impossible for routes built by `access::router`) fails.
    async fn from_request_parts(parts: &mut Parts, _: &AppState) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<AuthUser>()
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("a handler that needs a user was reached without the access guard").into())
    }
}

/// API keys: `cfk_<key id, 32 hex>_<secret>`; the secret is 244 random bits
/// (two UUIDv4, from the OS's generator) and only its keyed hash is stored.
pub const API_KEY_PREFIX: &str = "cfk_";
pub const API_KEY_DOMAIN: &str = "api_keys.secret";

/// A new API key: (id, the key as shown once, the hash to store).
pub fn new_api_key(index_key: &clinflow::crypto::IndexKey) -> (Uuid, String, Vec<u8>) {
    let id = Uuid::now_v7();
    let secret = format!("{}{}", Uuid::new_v4().simple(), Uuid::new_v4().simple());
    let hash = index_key.hash(API_KEY_DOMAIN, secret.as_bytes());
    (id, format!("{API_KEY_PREFIX}{}_{secret}", id.simple()), hash)
}

/// Who is calling: a bearer JWT whose session is live, or a live API key of
/// a service account. Every refusal is audited (rate-limited) and answered
/// 401 without saying why.
pub async fn authenticate(parts: &mut Parts, state: &AppState) -> Result<AuthUser, ApiError> {
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
    if let Some(key) = token.strip_prefix(API_KEY_PREFIX) {
        let parsed = key.split_once('_').and_then(|(id, secret)| Some((Uuid::try_parse(id).ok()?, secret)));
        let Some((key_id, secret)) = parsed else {
            return Err(refuse(Actor::anonymous(None), "invalid_api_key").await);
        };
        let row = sqlx::query!(
            r#"WITH live AS (
                   SELECT k.id, k.user_id, k.secret_hash, k.last_used_at, u.username, u.role
                   FROM api_keys k JOIN users u ON u.id = k.user_id
                   WHERE k.id = $1 AND k.revoked_at IS NULL AND u.disabled_at IS NULL AND u.kind = 'service'
               ), touched AS (
                   UPDATE api_keys SET last_used_at = now()
                   WHERE id IN (SELECT id FROM live
                                WHERE last_used_at IS NULL OR last_used_at < now() - interval '60 seconds')
               )
               SELECT user_id, secret_hash, username, role FROM live"#,
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
        return Ok(AuthUser { id: row.user_id, username: row.username, role, session_id: None, meta });
    }
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
    Ok(AuthUser { id: claims.sub, username: row.username, role, session_id: Some(claims.jti), meta })
}

#[derive(FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct JsonBody<T>(pub T);

/// `axum::extract::Path` whose refusal (an id that is no UUID) is the JSON
/// error `invalid_path`, not axum's plain text that quotes the value.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct PathParams<T>(pub T);

/// `axum::extract::Query` whose refusal is the JSON error `invalid_query`.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct QueryParams<T>(pub T);

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
        (status = 401, description = "- `invalid_credentials`: wrong username or password, or a locked, disabled or service account (the same answer for each)", body = ErrorBody),
        (status = 429, description = "- `too_many_logins`: too many attempts from this address; retry after `Retry-After`", body = ErrorBody),
        (status = 500, description = "- `internal`: an unexpected failure; the `x-request-id` header identifies it", body = ErrorBody),
        (status = 503, description = "- `login_busy`: too many password checks waiting; retry after `Retry-After`\n- `unavailable`: the database is unreachable", body = ErrorBody),
    ),
)]
#[tracing::instrument(skip_all, fields(user_id))]
async fn login(
    State(state): State<AppState>,
    meta: RequestMeta,
    JsonBody(req): JsonBody<LoginRequest>,
) -> Result<Json<LoginResponse>, ApiError> {
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
        Some(name) => users::begin_attempt(&state.db, name, &policy).await?,
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
                    if a.failures >= i64::from(policy.threshold) && users::lock(&state.db, a.id, &policy).await? {
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
                (None, Some(name)) => users::refusal_reason(&state.db, name).await?,
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
    users::login_succeeded(&state.db, attempt.id, rehash.as_deref()).await?;

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
    let claims = Claims {
        iss: ISSUER.into(),
        aud: AUDIENCE.into(),
        sub: attempt.id,
        exp: expires_at.unix_timestamp(),
        nbf: now.unix_timestamp(),
        iat: now.unix_timestamp(),
        jti: session_id,
    };
    let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &state.jwt.encoding)
        .map_err(|e| anyhow::anyhow!("signing a token: {e}"))?;
    let actor = Actor {
        kind: ActorKind::User,
        id: Some(attempt.id),
        name: attempted.map(str::to_owned),
        role: Some(attempt.role),
    };
    if let Err(e) = state.audit(&meta.event(Action::Login, actor, Outcome::Success)).await {
        revoke(&state, session_id).await?;
        return Err(e);
    }
    outcome("success");
    Ok(Json(LoginResponse { access_token: token, token_type: "bearer".into(), expires_at }))
}

/// End the caller's session (its token is refused from now on).
#[utoipa::path(
    post,
    path = "/v1/auth/logout",
    tag = "auth",
    responses(
        (status = 204, description = "The session has ended"),
        (status = 422, description = "- `not_a_session`: an API key has no session (an admin revokes keys)", body = ErrorBody),
    ),
)]
async fn logout(State(state): State<AppState>, user: AuthUser) -> Result<StatusCode, ApiError> {
    let Some(session_id) = user.session_id else {
        return Err(ApiError::invalid("not_a_session", "an API key has no session: an admin revokes it"));
    };
    revoke(&state, session_id).await?;
    state.audit(&user.event(Action::Logout, Outcome::Success)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn revoke(state: &AppState, session_id: Uuid) -> Result<(), ApiError> {
    sqlx::query!("UPDATE sessions SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL", session_id)
        .execute(&state.db)
        .await?;
    Ok(())
}
