//! Who is calling: session tokens, API keys, and the caller as handlers
//! see it.
//!
//! A token is an HS256 JWT (algorithm pinned; `iss`, `aud`, `sub`, `exp`,
//! `nbf`, `iat` and `jti` required) whose `jti` names a row in `sessions`.
//! Each request checks and touches that row (`guard::authenticate`), so
//! logout, a disabled user and the 15-minute idle timeout take effect at
//! once; the role is read from the database on every request, never
//! trusted from the token.

use std::net::IpAddr;
use std::time::Duration;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use clinflow::audit::{Action, Actor, ActorKind, AuditEvent, Outcome};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use secrecy::{ExposeSecret, SecretBox};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::error::ApiError;
pub use crate::lockout::{LockoutPolicy, LoginGuard};
use crate::proxies::ClientAddr;
use crate::users::Role;

const ISSUER: &str = "clinflow";
const AUDIENCE: &str = "clinflow-api";
/// Absolute lifetime of a token; the idle timeout usually ends it sooner.
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(8 * 3600);
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(15 * 60);

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
pub(crate) struct Claims {
    iss: String,
    aud: String,
    /// The user.
    pub(crate) sub: Uuid,
    exp: i64,
    nbf: i64,
    iat: i64,
    /// The session.
    pub(crate) jti: Uuid,
}

impl JwtKeys {
    /// A token for `user`'s session `session`, valid from `now` until
    /// `expires_at`.
    pub(crate) fn sign(
        &self,
        user: Uuid,
        session: Uuid,
        now: OffsetDateTime,
        expires_at: OffsetDateTime,
    ) -> anyhow::Result<String> {
        let claims = Claims {
            iss: ISSUER.into(),
            aud: AUDIENCE.into(),
            sub: user,
            exp: expires_at.unix_timestamp(),
            nbf: now.unix_timestamp(),
            iat: now.unix_timestamp(),
            jti: session,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| anyhow::anyhow!("signing a token: {e}"))
    }

    /// The claims of a token signed here and valid now.
    pub(crate) fn verify(&self, token: &str) -> Result<Claims, jsonwebtoken::errors::Error> {
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation).map(|d| d.claims)
    }
}

/// The token signer and validator as the fuzz targets (fuzz/) reach them:
/// a verified token's (user, session).
#[cfg(feature = "fuzzing")]
impl JwtKeys {
    #[doc(hidden)]
    pub fn fuzz_sign(
        &self,
        user: Uuid,
        session: Uuid,
        now: OffsetDateTime,
        expires_at: OffsetDateTime,
    ) -> anyhow::Result<String> {
        self.sign(user, session, now, expires_at)
    }

    #[doc(hidden)]
    pub fn fuzz_verify(&self, token: &str) -> Result<(Uuid, Uuid), jsonwebtoken::errors::Error> {
        self.verify(token).map(|claims| (claims.sub, claims.jti))
    }
}

/// Where a request came from, for the audit trail.
#[derive(Debug, Clone)]
pub struct RequestMeta {
    /// The client's address: the TCP peer, or behind a trusted proxy the
    /// address it forwarded (`proxies`).
    pub source_ip: Option<IpAddr>,
    pub request_id: Option<String>,
}

impl<S: Send + Sync> FromRequestParts<S> for RequestMeta {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let source_ip = parts.extensions.get::<ClientAddr>().map(|c| c.0);
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
    /// The lawful basis of this account's uploads that name none.
    pub default_basis: Option<clinflow::retention::Basis>,
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

impl<S: Send + Sync> FromRequestParts<S> for AuthUser {
    type Rejection = ApiError;

    /// The caller the access guard authenticated; a handler reached without
    /// the guard (impossible for routes built by `access::router`) fails.
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
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

/// The console's session ([`crate::console`]): the token in an HttpOnly
/// cookie the page's script cannot read, `__Host-` (Secure, this host only,
/// path `/`), `SameSite=Strict`, and no `Max-Age` (it ends with the
/// browser; the session's own timeouts end it sooner).
pub const SESSION_COOKIE: &str = "__Host-clinflow-session";
/// The session's CSRF token, readable by the page's script, which sends it
/// back in [`CSRF_HEADER`] on every request: a cookie-authenticated request
/// without it is refused (`guard::authenticate`). Another site's page can
/// make the browser send the cookies, but cannot read this one to put it in
/// a header.
pub const CSRF_COOKIE: &str = "__Host-clinflow-csrf";
pub const CSRF_HEADER: &str = "x-csrf-token";
const CSRF_DOMAIN: &str = "sessions.csrf";

/// The CSRF token of `session`: a keyed hash of its id, so nothing is stored
/// and a token fits one session only.
pub fn csrf_token(index_key: &clinflow::crypto::IndexKey, session: Uuid) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(index_key.hash(CSRF_DOMAIN, session.as_bytes()))
}

/// Whether `presented` is `session`'s CSRF token (compared in constant time).
pub fn csrf_valid(index_key: &clinflow::crypto::IndexKey, session: Uuid, presented: &str) -> bool {
    use base64::Engine;
    let Ok(tag) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(presented) else { return false };
    index_key.verify(CSRF_DOMAIN, session.as_bytes(), &tag)
}

/// The `Set-Cookie` values that open a console session.
pub fn session_cookies(token: &str, csrf: &str) -> [String; 2] {
    [
        format!("{SESSION_COOKIE}={token}; Path=/; Secure; HttpOnly; SameSite=Strict"),
        format!("{CSRF_COOKIE}={csrf}; Path=/; Secure; SameSite=Strict"),
    ]
}

/// The `Set-Cookie` values that end one (at logout).
pub fn cleared_cookies() -> [String; 2] {
    [SESSION_COOKIE, CSRF_COOKIE].map(|name| format!("{name}=; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age=0"))
}

/// The value of cookie `name` in a request's `Cookie` headers.
pub fn cookie<'a>(headers: &'a axum::http::HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find_map(|(k, v)| (k == name).then_some(v))
}
