//! Configuration from environment variables.
//!
//! Secrets are read here rather than through clap's `env` support on purpose:
//! clap echoes a rejected value back in its error message, and a rejected
//! secret (or a database URL with a password in it) must never reach a
//! terminal or a log. Every error is one line naming the variable.

use std::net::SocketAddr;

use base64::Engine as _;
use secrecy::{ExposeSecret, SecretBox, SecretString};

/// A configuration problem found at start-up: the variable and what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{name}: {problem}")]
pub struct ConfigError {
    pub name: &'static str,
    pub problem: String,
}

impl ConfigError {
    fn new(name: &'static str, problem: impl Into<String>) -> Self {
        Self { name, problem: problem.into() }
    }
}

/// A required variable; empty counts as missing.
pub fn required(name: &'static str) -> Result<String, ConfigError> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => Ok(v),
        Ok(_) => Err(ConfigError::new(name, "is set but empty")),
        Err(std::env::VarError::NotPresent) => Err(ConfigError::new(name, "is not set")),
        Err(std::env::VarError::NotUnicode(_)) => Err(ConfigError::new(name, "is not valid UTF-8")),
    }
}

/// An optional variable; empty counts as unset.
pub fn optional(name: &'static str) -> Result<Option<String>, ConfigError> {
    match std::env::var(name) {
        Ok(v) if v.trim().is_empty() => Ok(None),
        Ok(v) => Ok(Some(v)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => Err(ConfigError::new(name, "is not valid UTF-8")),
    }
}

/// A URL that may carry a password: kept secret, checked only for its scheme.
pub fn url(name: &'static str, schemes: &[&str]) -> Result<SecretString, ConfigError> {
    let value = required(name)?;
    let scheme = value.split_once("://").map(|(s, _)| s);
    match scheme {
        Some(s) if schemes.contains(&s) => Ok(SecretString::from(value)),
        _ => Err(ConfigError::new(name, format!("must be a URL starting with {}://", schemes.join(":// or ")))),
    }
}

/// A whole number from 1 up, with a default.
pub fn positive(name: &'static str, default: u16) -> Result<u16, ConfigError> {
    match optional(name)? {
        None => Ok(default),
        Some(v) => v
            .trim()
            .parse::<u16>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| ConfigError::new(name, "must be a whole number from 1 to 65535")),
    }
}

/// A socket address such as `127.0.0.1:8080`, with a default.
pub fn socket_addr(name: &'static str, default: &str) -> Result<SocketAddr, ConfigError> {
    let value = optional(name)?.unwrap_or_else(|| default.to_owned());
    value.parse().map_err(|_| ConfigError::new(name, format!("must be host:port such as {default}, got {value:?}")))
}

/// `CLINFLOW_MASTER_KEY`: base64 of exactly 32 random bytes (AES-256).
pub fn master_key() -> Result<SecretBox<[u8; 32]>, ConfigError> {
    parse_master_key(SecretString::from(required("CLINFLOW_MASTER_KEY")?))
}

fn parse_master_key(value: SecretString) -> Result<SecretBox<[u8; 32]>, ConfigError> {
    const NAME: &str = "CLINFLOW_MASTER_KEY";
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(value.expose_secret().trim())
        .map_err(|_| ConfigError::new(NAME, "is not valid base64 (generate one with: openssl rand -base64 32)"))?;
    let key: [u8; 32] = decoded
        .as_slice()
        .try_into()
        .map_err(|_| ConfigError::new(NAME, format!("must decode to exactly 32 bytes, got {} bytes", decoded.len())))?;
    if is_weak(&key) {
        return Err(ConfigError::new(NAME, "is not random (too few distinct bytes); use: openssl rand -base64 32"));
    }
    Ok(SecretBox::new(Box::new(key)))
}

/// A shared secret given as a string of at least 32 bytes (`JWT_SECRET`,
/// `AUDIT_HMAC_KEY`).
pub fn secret_bytes(name: &'static str) -> Result<SecretBox<Vec<u8>>, ConfigError> {
    parse_secret_bytes(name, SecretString::from(required(name)?))
}

fn parse_secret_bytes(name: &'static str, value: SecretString) -> Result<SecretBox<Vec<u8>>, ConfigError> {
    let bytes = value.expose_secret().as_bytes().to_vec();
    if bytes.len() < 32 {
        return Err(ConfigError::new(name, format!("must be at least 32 bytes, got {}", bytes.len())));
    }
    if is_weak(&bytes) {
        return Err(ConfigError::new(
            name,
            "is not random (too few distinct characters); use: openssl rand -base64 48",
        ));
    }
    Ok(SecretBox::new(Box::new(bytes)))
}

/// Catches the placeholders people paste ("aaaa…", "changeme" repeated),
/// not a real entropy estimate.
fn is_weak(bytes: &[u8]) -> bool {
    let mut seen = [false; 256];
    for b in bytes {
        seen[usize::from(*b)] = true;
    }
    seen.iter().filter(|s| **s).count() < 10
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weak_secrets_are_recognised() {
        assert!(is_weak(&[b'a'; 40]));
        assert!(is_weak(b"changemechangemechangemechangeme"));
        assert!(!is_weak(b"Zx9!kq2#Lm4$Pw7&Rt1*Vb8(Yn3)Hd6_"));
    }

    #[test]
    fn master_key_must_be_32_random_bytes_in_base64() {
        let short = parse_master_key("AAEC".into()).err().map(|e| e.to_string());
        assert_eq!(short.as_deref(), Some("CLINFLOW_MASTER_KEY: must decode to exactly 32 bytes, got 3 bytes"));
        assert!(parse_master_key("not base64!".into()).is_err());
        let zeros = base64::engine::general_purpose::STANDARD.encode([0u8; 32]);
        assert!(parse_master_key(zeros.into()).is_err());
        let good: Vec<u8> = (0u8..32).map(|i| i.wrapping_mul(37)).collect();
        let good = base64::engine::general_purpose::STANDARD.encode(good);
        assert!(parse_master_key(good.into()).is_ok());
    }

    #[test]
    fn short_shared_secret_is_refused_without_echoing_it() {
        let e = parse_secret_bytes("JWT_SECRET", "hunter2".into()).err().map(|e| e.to_string());
        assert_eq!(e.as_deref(), Some("JWT_SECRET: must be at least 32 bytes, got 7"));
    }

    #[test]
    fn config_error_is_one_line_naming_the_variable() {
        let e = ConfigError::new("JWT_SECRET", "must be at least 32 bytes, got 5");
        assert_eq!(e.to_string(), "JWT_SECRET: must be at least 32 bytes, got 5");
    }
}
