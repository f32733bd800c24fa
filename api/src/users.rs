//! Users, roles and password hashing.

use std::sync::Arc;

use argon2::Argon2;
use argon2::password_hash::PasswordHasher;
use argon2::password_hash::phc::PasswordHash;
use sqlx::PgExecutor;
use tokio::sync::Semaphore;
use uuid::Uuid;

pub const MIN_PASSWORD_CHARS: usize = 12;

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Admin,
    Clinician,
    Ingest,
    Ops,
    Auditor,
    /// Performs a patient's GDPR export and (with a second one) erasure,
    /// and reads the accounting of disclosures.
    #[value(name = "privacy_officer")]
    PrivacyOfficer,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Clinician => "clinician",
            Role::Ingest => "ingest",
            Role::Ops => "ops",
            Role::Auditor => "auditor",
            Role::PrivacyOfficer => "privacy_officer",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Role::Admin, Role::Clinician, Role::Ingest, Role::Ops, Role::Auditor, Role::PrivacyOfficer]
            .into_iter()
            .find(|r| r.as_str() == s)
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

/// Longest username; the characters it may hold besides ASCII letters and digits.
pub const MAX_USERNAME_CHARS: usize = 64;
pub const USERNAME_PUNCTUATION: &str = "._@-";

pub fn valid_username(name: &str) -> bool {
    (1..=MAX_USERNAME_CHARS).contains(&name.len())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || USERNAME_PUNCTUATION.contains(c))
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
    valid_password(password)?;
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

/// A person's credentials by id (break-glass asks for the password again).
pub async fn credentials(db: impl PgExecutor<'_>, id: Uuid) -> Result<Option<Credentials>, sqlx::Error> {
    sqlx::query_as!(
        Credentials,
        "SELECT id, password_hash, role FROM users WHERE id = $1 AND disabled_at IS NULL AND kind = 'person'",
        id
    )
    .fetch_optional(db)
    .await
}

/// argon2id (the crate's defaults: 19 MiB, t=2, p=1) on the blocking pool,
/// at most one hash per core at a time so a burst of logins cannot exhaust
/// memory or starve the runtime; checks that would wait behind more than
/// `queue` others are shed ([`Busy`]) instead of queued without bound.
///
/// Checks work in argon2 memory kept here, one block set per permit,
/// allocated once: allocated per check, glibc kept the freed 19 MiB in the
/// arenas of the blocking threads (the bench's api peaked at 156 MiB after
/// 20 logins, 55 MiB with glibc made to hand such blocks back).
#[derive(Clone)]
pub struct Passwords {
    permits: Arc<Semaphore>,
    memory: Arc<std::sync::Mutex<Vec<Vec<argon2::Block>>>>,
    /// Running plus waiting password checks.
    admitted: Arc<Semaphore>,
    /// Verified against when the username is unknown, so both answers take
    /// the same time.
    dummy_hash: Arc<str>,
}

/// Too many password checks are waiting already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Busy;

/// How many password checks may wait for a core by default.
pub const DEFAULT_QUEUE: usize = 64;

impl Passwords {
    pub async fn new() -> Result<Self, UserError> {
        Self::with_queue(DEFAULT_QUEUE).await
    }

    pub async fn with_queue(queue: usize) -> Result<Self, UserError> {
        let cores = std::thread::available_parallelism().map_or(2, usize::from);
        let mut this = Self {
            permits: Arc::new(Semaphore::new(cores)),
            memory: Arc::default(),
            admitted: Arc::new(Semaphore::new(cores + queue)),
            dummy_hash: Arc::from(""),
        };
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

    /// A place among the running and waiting password checks; `Busy` when
    /// the queue is full (the caller answers 503 at once).
    pub fn admit(&self) -> Result<Admitted<'_>, Busy> {
        self.admitted.try_acquire().map(Admitted).map_err(|_| {
            metrics::counter!("clinflow_password_checks_shed_total").increment(1);
            Busy
        })
    }

    /// Checks `password` against `hash`, or against a dummy hash when there is
    /// no user (and answers false then), so both take the same time.
    pub async fn verify(&self, _: &Admitted<'_>, password: String, hash: Option<String>) -> bool {
        let Ok(_permit) = self.permits.acquire().await else { return false };
        let known = hash.is_some();
        let hash = hash.unwrap_or_else(|| self.dummy_hash.to_string());
        let memory = Arc::clone(&self.memory);
        let ok = tokio::task::spawn_blocking(move || {
            // One block set per permit: there is always one free, or room
            // for one more.
            let mut blocks = memory.lock().unwrap_or_else(std::sync::PoisonError::into_inner).pop().unwrap_or_default();
            let ok = PasswordHash::new(&hash).is_ok_and(|h| verify_in(&mut blocks, password.as_bytes(), &h));
            memory.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(blocks);
            ok
        })
        .await
        .unwrap_or(false);
        ok && known
    }
}

/// What argon2's `PasswordVerifier` does, in `memory` (grown to the hash's
/// block count when short, then kept): the hash's algorithm, version,
/// parameters and salt, the output compared in constant time.
fn verify_in(memory: &mut Vec<argon2::Block>, password: &[u8], hash: &PasswordHash) -> bool {
    let (Some(salt), Some(expected)) = (&hash.salt, &hash.hash) else { return false };
    let (Ok(params), Ok(algorithm)) =
        (argon2::Params::try_from(hash), argon2::Algorithm::try_from(hash.algorithm.as_str()))
    else {
        return false;
    };
    let Ok(version) = hash.version.map(argon2::Version::try_from).transpose() else { return false };
    if memory.len() < params.block_count() {
        memory.resize(params.block_count(), argon2::Block::default());
    }
    let mut buffer = [0u8; 64];
    let Some(out) = buffer.get_mut(..expected.len()) else { return false };
    Argon2::new(algorithm, version.unwrap_or_default(), params)
        .hash_password_into_with_memory(password, salt, out, &mut memory[..])
        .is_ok()
        && argon2::password_hash::phc::Output::new(out).is_ok_and(|computed| computed == *expected)
}

/// See [`Passwords::admit`].
pub struct Admitted<'a>(#[allow(dead_code)] tokio::sync::SemaphorePermit<'a>);

/// Whether a stored hash was made with other parameters than today's
/// (another algorithm, version or cost): it is replaced at the next
/// successful login.
pub fn needs_rehash(stored: &str) -> bool {
    let Ok(hash) = PasswordHash::new(stored) else { return true };
    let current = argon2::Params::default();
    let same = hash.algorithm.as_str() == argon2::Algorithm::Argon2id.as_str()
        && hash.version == Some(argon2::Version::V0x13.into())
        && argon2::Params::try_from(&hash).is_ok_and(|p| {
            p.m_cost() == current.m_cost() && p.t_cost() == current.t_cost() && p.p_cost() == current.p_cost()
        });
    !same
}

pub fn valid_password(password: &str) -> Result<(), UserError> {
    if password.chars().count() < MIN_PASSWORD_CHARS {
        return Err(UserError::WeakPassword);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifying_in_kept_memory_agrees_with_the_crate() {
        use argon2::password_hash::PasswordVerifier;
        let mut memory = Vec::new();
        for params in [argon2::Params::default(), argon2::Params::new(8192, 1, 1, None).unwrap()] {
            let argon = Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
            let stored = argon.hash_password(b"correct horse battery").unwrap().to_string();
            let hash = PasswordHash::new(&stored).unwrap();
            assert!(Argon2::default().verify_password(b"correct horse battery", &hash).is_ok());
            assert!(verify_in(&mut memory, b"correct horse battery", &hash));
            assert!(!verify_in(&mut memory, b"correct horse batterz", &hash));
        }
        assert_eq!(memory.len(), argon2::Params::default().block_count(), "grown once, then reused");
    }

    #[tokio::test]
    async fn hashes_are_argon2id_and_verify() {
        let p = Passwords::new().await.unwrap();
        let h = p.hash("correct horse battery".into()).await.unwrap();
        assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{h}");
        let a = p.admit().unwrap();
        assert!(p.verify(&a, "correct horse battery".into(), Some(h.clone())).await);
        assert!(!p.verify(&a, "wrong".into(), Some(h.clone())).await);
        assert!(!p.verify(&a, "anything".into(), None).await);
        assert!(!needs_rehash(&h));
        let weaker = argon2::Argon2::new(
            argon2::Algorithm::Argon2id,
            argon2::Version::V0x13,
            argon2::Params::new(8192, 1, 1, None).unwrap(),
        )
        .hash_password(b"correct horse battery")
        .unwrap()
        .to_string();
        assert!(needs_rehash(&weaker));
        assert!(needs_rehash("not a hash"));
    }

    #[tokio::test]
    async fn checks_past_the_queue_are_shed() {
        let p = Passwords::with_queue(0).await.unwrap();
        let h = p.hash("correct horse battery".into()).await.unwrap();
        let cores = std::thread::available_parallelism().map_or(2, usize::from);
        // Hold every admission: the next check is refused at once.
        let held: Vec<_> = (0..cores).map(|_| p.admit().unwrap()).collect();
        assert!(p.admit().is_err());
        drop(held);
        let a = p.admit().unwrap();
        assert!(p.verify(&a, "correct horse battery".into(), Some(h)).await);
    }

    #[test]
    fn usernames() {
        assert!(valid_username("dr.jones@ward-7"));
        assert!(!valid_username(""));
        assert!(!valid_username("a b"));
        assert!(!valid_username(&"x".repeat(65)));
    }
}
