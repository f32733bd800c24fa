//! Users, roles and password hashing.

use std::sync::Arc;

use argon2::Argon2;
use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use sqlx::PgExecutor;
use tokio::sync::Semaphore;
use uuid::Uuid;

pub const MIN_PASSWORD_CHARS: usize = 12;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Admin,
    Clinician,
    Ingest,
    Ops,
    Auditor,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Clinician => "clinician",
            Role::Ingest => "ingest",
            Role::Ops => "ops",
            Role::Auditor => "auditor",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Role::Admin, Role::Clinician, Role::Ingest, Role::Ops, Role::Auditor].into_iter().find(|r| r.as_str() == s)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("username must be 1-64 characters of letters, digits and . _ @ -")]
    BadUsername,
    #[error("password must be at least {MIN_PASSWORD_CHARS} characters")]
    WeakPassword,
    #[error("user {0} already exists")]
    Exists(String),
    #[error("password hashing failed")]
    Hash,
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

pub fn valid_username(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '@' | '-'))
}

/// Creates a user; `Exists` when the username is taken.
pub async fn create(
    db: impl PgExecutor<'_>,
    passwords: &Passwords,
    username: &str,
    password: &str,
    role: Role,
) -> Result<Uuid, UserError> {
    if !valid_username(username) {
        return Err(UserError::BadUsername);
    }
    if password.chars().count() < MIN_PASSWORD_CHARS {
        return Err(UserError::WeakPassword);
    }
    let hash = passwords.hash(password.to_owned()).await?;
    let id = Uuid::now_v7();
    let inserted = sqlx::query_scalar!(
        "INSERT INTO users (id, username, password_hash, role) VALUES ($1, $2, $3, $4)
         ON CONFLICT (username) DO NOTHING RETURNING id",
        id,
        username,
        hash,
        role.as_str()
    )
    .fetch_optional(db)
    .await?;
    inserted.ok_or_else(|| UserError::Exists(username.to_owned()))
}

#[derive(Debug)]
pub struct Credentials {
    pub id: Uuid,
    pub password_hash: String,
    pub role: String,
}

pub async fn credentials(db: impl PgExecutor<'_>, username: &str) -> Result<Option<Credentials>, sqlx::Error> {
    sqlx::query_as!(
        Credentials,
        "SELECT id, password_hash, role FROM users WHERE username = $1 AND disabled_at IS NULL",
        username
    )
    .fetch_optional(db)
    .await
}

/// argon2id (the crate's defaults: 19 MiB, t=2, p=1) on the blocking pool,
/// at most one hash per core at a time so a burst of logins cannot exhaust
/// memory or starve the runtime.
#[derive(Clone)]
pub struct Passwords {
    permits: Arc<Semaphore>,
    /// Verified against when the username is unknown, so both answers take
    /// the same time.
    dummy_hash: Arc<str>,
}

impl Passwords {
    pub async fn new() -> Result<Self, UserError> {
        let cores = std::thread::available_parallelism().map_or(2, usize::from);
        let mut this = Self { permits: Arc::new(Semaphore::new(cores)), dummy_hash: Arc::from("") };
        this.dummy_hash = this.hash(Uuid::new_v4().to_string()).await?.into();
        Ok(this)
    }

    pub async fn hash(&self, password: String) -> Result<String, UserError> {
        let _permit = self.permits.acquire().await.map_err(|_| UserError::Hash)?;
        tokio::task::spawn_blocking(move || {
            Argon2::default().hash_password(password.as_bytes()).map(|h| h.to_string()).map_err(|_| UserError::Hash)
        })
        .await
        .map_err(|_| UserError::Hash)?
    }

    /// Checks `password` against `hash`, or against a dummy hash when there is
    /// no user, and answers false in that case.
    pub async fn verify(&self, password: String, hash: Option<String>) -> bool {
        let Ok(_permit) = self.permits.acquire().await else { return false };
        let known = hash.is_some();
        let hash = hash.unwrap_or_else(|| self.dummy_hash.to_string());
        let ok = tokio::task::spawn_blocking(move || {
            PasswordHash::new(&hash).is_ok_and(|h| Argon2::default().verify_password(password.as_bytes(), &h).is_ok())
        })
        .await
        .unwrap_or(false);
        ok && known
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hashes_are_argon2id_and_verify() {
        let p = Passwords::new().await.unwrap();
        let h = p.hash("correct horse battery".into()).await.unwrap();
        assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{h}");
        assert!(p.verify("correct horse battery".into(), Some(h.clone())).await);
        assert!(!p.verify("wrong".into(), Some(h)).await);
        assert!(!p.verify("anything".into(), None).await);
    }

    #[test]
    fn usernames() {
        assert!(valid_username("dr.jones@ward-7"));
        assert!(!valid_username(""));
        assert!(!valid_username("a b"));
        assert!(!valid_username(&"x".repeat(65)));
    }
}
