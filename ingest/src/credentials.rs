//! The password comes from `CLINFLOW_PASSWORD` or else one line of standard
//! input (prompted without echo on a terminal); never from a flag, which
//! would show in `ps` and shell history.

use std::io::{self, BufRead, IsTerminal};

use secrecy::SecretString;

pub const PASSWORD_ENV: &str = "CLINFLOW_PASSWORD";
pub const API_KEY_ENV: &str = "CLINFLOW_API_KEY";

/// A service account's API key, from `CLINFLOW_API_KEY` (never a flag).
pub fn api_key() -> Option<SecretString> {
    std::env::var(API_KEY_ENV).ok().filter(|k| !k.trim().is_empty()).map(|k| k.trim().to_owned().into())
}

#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    #[error("no password: set {PASSWORD_ENV} or give it as one line on standard input")]
    Missing,
    #[error("cannot read the password from standard input: {0}")]
    Io(#[from] io::Error),
}

pub fn read_password() -> Result<SecretString, PasswordError> {
    if let Ok(password) = std::env::var(PASSWORD_ENV)
        && !password.is_empty()
    {
        return Ok(password.into());
    }
    let stdin = io::stdin();
    if stdin.is_terminal() {
        let password = rpassword::prompt_password("Password: ")?;
        return non_empty(password);
    }
    password_from_reader(stdin.lock())
}

pub(crate) fn password_from_reader(mut reader: impl BufRead) -> Result<SecretString, PasswordError> {
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let password = line.strip_suffix('\n').unwrap_or(&line);
    let password = password.strip_suffix('\r').unwrap_or(password);
    non_empty(password.to_owned())
}

fn non_empty(password: String) -> Result<SecretString, PasswordError> {
    if password.is_empty() {
        return Err(PasswordError::Missing);
    }
    Ok(password.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    #[test]
    fn reads_one_line_and_keeps_inner_spaces() {
        let p = password_from_reader(&b" pa ss\r\nsecond line\n"[..]).unwrap();
        assert_eq!(p.expose_secret(), " pa ss");
    }

    #[test]
    fn empty_input_is_missing() {
        assert!(matches!(password_from_reader(&b""[..]), Err(PasswordError::Missing)));
        assert!(matches!(password_from_reader(&b"\n"[..]), Err(PasswordError::Missing)));
    }
}
