//! Login throttling: per account, failed attempts counted before the
//! password is checked and a lockout that doubles; per source address, a
//! rate of attempts a minute.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use sqlx::PgExecutor;
use uuid::Uuid;

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
    pub(crate) fn throttled(&self, source: Option<IpAddr>) -> Option<u64> {
        let ip = source?;
        let not_until = self.per_source.check_key(&ip).err()?;
        let wait = not_until.wait_time_from(governor::clock::Clock::now(&governor::clock::DefaultClock::default()));
        Some(wait.as_secs_f64().ceil().max(1.0) as u64)
    }
}

/// A login attempt counted against an account that may try now.
#[derive(Debug)]
pub struct Attempt {
    pub id: Uuid,
    pub password_hash: String,
    pub role: String,
    /// Failed attempts in the current window, this one included.
    pub failures: i64,
    /// An admin set the password: it must be replaced before anything else.
    pub password_change_required: bool,
}

/// Counts an attempt against `username` before its password is checked.
/// None for an unknown, disabled, locked or service account.
///
/// Committed without waiting for the WAL flush (`synchronous_commit = off`):
/// a counted attempt would otherwise take one fsync longer than an unknown
/// user's, which counts nothing, and the difference would tell an attacker
/// which accounts exist. A crash may forget the last few counts; it cannot
/// let a guess through uncounted.
pub async fn begin_attempt(
    db: &sqlx::PgPool,
    username: &str,
    policy: &LockoutPolicy,
) -> Result<Option<Attempt>, sqlx::Error> {
    let mut tx = db.begin().await?;
    sqlx::query!("SET LOCAL synchronous_commit = off").execute(&mut *tx).await?;
    let attempt = sqlx::query_as!(
        Attempt,
        r#"UPDATE users SET
               failed_logins = CASE WHEN failed_since IS NULL OR failed_since < now() - make_interval(secs => $2)
                                    THEN 1 ELSE failed_logins + 1 END,
               failed_since = CASE WHEN failed_since IS NULL OR failed_since < now() - make_interval(secs => $2)
                                   THEN now() ELSE failed_since END
           WHERE username = $1 AND disabled_at IS NULL AND kind = 'person'
             AND (locked_until IS NULL OR locked_until <= now())
           RETURNING id, password_hash, role, failed_logins::int8 AS "failures!", password_change_required"#,
        username,
        policy.window.as_secs_f64(),
    )
    .fetch_optional(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(attempt)
}

/// Locks the account for the policy's period, doubled for each lockout
/// since its last successful login; false if it was locked already.
pub async fn lock(db: impl PgExecutor<'_>, id: Uuid, policy: &LockoutPolicy) -> Result<bool, sqlx::Error> {
    let locked = sqlx::query!(
        "UPDATE users SET
             locked_until = now() + make_interval(secs => LEAST($2 * power(2, LEAST(lockouts, 30)), $3)),
             lockouts = lockouts + 1, failed_logins = 0, failed_since = NULL
         WHERE id = $1 AND (locked_until IS NULL OR locked_until <= now())",
        id,
        policy.base.as_secs_f64(),
        policy.max.as_secs_f64(),
    )
    .execute(db)
    .await?;
    Ok(locked.rows_affected() == 1)
}

/// For the audit trail only (the client always gets the same 401): why a
/// login with this name got no attempt.
pub async fn refusal_reason(db: impl PgExecutor<'_>, username: &str) -> Result<&'static str, sqlx::Error> {
    let row = sqlx::query!(
        r#"SELECT disabled_at IS NOT NULL AS "disabled!", coalesce(locked_until > now(), false) AS "locked!",
                  kind FROM users WHERE username = $1"#,
        username
    )
    .fetch_optional(db)
    .await?;
    Ok(match row {
        None => "bad_credentials",
        Some(r) if r.disabled => "disabled",
        Some(r) if r.locked => "locked",
        Some(r) if r.kind == "service" => "service_account",
        Some(_) => "bad_credentials",
    })
}

/// Clears the failure count and lockouts; stores `rehashed` if given.
pub async fn login_succeeded(db: impl PgExecutor<'_>, id: Uuid, rehashed: Option<&str>) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "UPDATE users SET failed_logins = 0, failed_since = NULL, lockouts = 0,
                          password_hash = coalesce($2, password_hash)
         WHERE id = $1",
        id,
        rehashed,
    )
    .execute(db)
    .await?;
    Ok(())
}
