//! Asking a signed-in user for their password again (a password change,
//! break-glass), counted as a login attempt is.

use clinflow::audit::{Action, Outcome};

use crate::auth::AuthUser;
use crate::error::ApiError;
use crate::lockout;
use crate::state::AppState;

/// The caller's own password, asked again (a password change, break-glass):
/// counted like a login attempt, so guesses here lock the account as
/// guesses at the login do. A locked account is refused without a check.
/// A refusal is audited as `action`, naming `patient` (blind index) when
/// the password was asked to reach one.
pub(crate) async fn confirm_password(
    state: &AppState,
    user: &AuthUser,
    password: String,
    action: Action,
    patient: Option<&[u8]>,
) -> Result<(), ApiError> {
    let policy = state.login.lockout;
    let admitted = state.passwords.admit().map_err(|_| ApiError::LoginBusy)?;
    let attempt = lockout::begin_attempt(&state.db, &user.username, &policy).await?;
    let over = attempt.as_ref().is_some_and(|a| a.failures > i64::from(policy.threshold));
    let hash = attempt.as_ref().filter(|a| !over && a.id == user.id).map(|a| a.password_hash.clone());
    let ok = state.passwords.verify(&admitted, password, hash).await;
    drop(admitted);
    match attempt {
        Some(a) if ok => {
            lockout::login_succeeded(&state.db, a.id, None).await?;
            Ok(())
        }
        attempt => {
            let mut reason = if attempt.is_none() || over { "locked" } else { "wrong_password" };
            if let Some(a) = attempt.filter(|_| !over)
                && a.failures >= i64::from(policy.threshold)
                && lockout::lock(&state.db, a.id, &policy).await?
            {
                metrics::counter!("clinflow_account_lockouts_total").increment(1);
                state.audit(&user.event(Action::Lockout, Outcome::Success).resource("user", &a.id.to_string())).await?;
                reason = "locked";
            }
            let event = user.event(action, Outcome::Denied).patients(patient);
            state.audit(&event.reason(reason)).await?;
            Err(ApiError::WrongPassword)
        }
    }
}
