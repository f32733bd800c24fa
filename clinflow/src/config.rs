//! Configuration from environment variables.
//!
//! Secrets are read here rather than through clap's `env` support on purpose:
//! clap echoes a rejected value back in its error message, and a rejected
//! secret (or a database URL with a password in it) must never reach a
//! terminal or a log. Every error is one line naming the variable.

use std::net::SocketAddr;

use base64::Engine as _;
use secrecy::{ExposeSecret, SecretBox, SecretString};

use crate::crypto::Keyring;

/// A configuration problem found at start-up: the variable and what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{name}: {problem}")]
pub struct ConfigError {
    pub name: &'static str,
    pub problem: String,
}

impl ConfigError {
    pub(crate) fn new(name: &'static str, problem: impl Into<String>) -> Self {
        Self { name, problem: problem.into() }
    }
}

/// A required variable; empty counts as missing.
pub fn required(name: &'static str) -> Result<String, ConfigError> {
    match read(name)? {
        Some(v) if !v.trim().is_empty() => Ok(v),
        Some(_) => Err(ConfigError::new(name, "is set but empty")),
        None => Err(ConfigError::new(name, "is not set")),
    }
}

/// An optional variable; empty counts as unset.
pub fn optional(name: &'static str) -> Result<Option<String>, ConfigError> {
    Ok(read(name)?.filter(|v| !v.trim().is_empty()))
}

/// `NAME`, or the content of the file `NAME_FILE` names (how Docker and
/// Kubernetes hand over secrets; one trailing newline is dropped). Setting
/// both is an error: which one counts would be a guess.
fn read(name: &'static str) -> Result<Option<String>, ConfigError> {
    let file_var = format!("{name}_FILE");
    let direct = match std::env::var(name) {
        Ok(v) => Some(v),
        Err(std::env::VarError::NotPresent) => None,
        Err(std::env::VarError::NotUnicode(_)) => return Err(ConfigError::new(name, "is not valid UTF-8")),
    };
    let Some(path) = std::env::var_os(&file_var).filter(|p| !p.is_empty()) else { return Ok(direct) };
    if direct.is_some() {
        return Err(ConfigError::new(name, format!("is set and so is {file_var}: set one of them")));
    }
    let content = std::fs::read_to_string(&path)
        .map_err(|e| ConfigError::new(name, format!("{file_var} {:?}: {e}", std::path::Path::new(&path))))?;
    let content = content.strip_suffix('\n').map(|c| c.strip_suffix('\r').unwrap_or(c)).unwrap_or(&content);
    Ok(Some(content.to_owned()))
}

/// Refuses to start when two secrets that must differ are the same (one
/// leaked would give away the other's use too); never echoes them.
pub fn distinct(secrets: &[(&'static str, &[u8])]) -> Result<(), ConfigError> {
    for (i, (a, a_value)) in secrets.iter().enumerate() {
        if let Some((b, _)) = secrets[i + 1..].iter().find(|(_, b_value)| b_value == a_value) {
            return Err(ConfigError::new(a, format!("is the same as {b}: each key must be its own")));
        }
    }
    Ok(())
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

/// `CLINFLOW_MASTER_KEY`: the key-encryption keys. Either one key, base64 of
/// exactly 32 random bytes (its KEK id is "1"), or a comma-separated list of
/// `ID:BASE64` entries, the first being primary (it wraps new data keys), e.g.
/// `k2:BASE64,k1:BASE64`. Ids are 1-32 of `A-Z a-z 0-9 . _ -`, unique; every
/// key is checked like a single one; no key is ever echoed in an error.
pub fn master_keys() -> Result<Keyring, ConfigError> {
    parse_master_keys(SecretString::from(required("CLINFLOW_MASTER_KEY")?))
}

const MASTER_KEY: &str = "CLINFLOW_MASTER_KEY";

fn parse_master_keys(value: SecretString) -> Result<Keyring, ConfigError> {
    let value = value.expose_secret().trim();
    if !value.contains(':') {
        let key = parse_master_key(value, "")?;
        return Ok(Keyring::from_master_key(&key));
    }
    let mut keys: Vec<(String, SecretBox<[u8; 32]>)> = Vec::new();
    for (n, entry) in value.split(',').enumerate() {
        let what = format!("entry {}", n + 1);
        let (id, key) = entry.trim().split_once(':').ok_or_else(|| {
            ConfigError::new(MASTER_KEY, format!("{what} is not ID:BASE64 (a list needs an id on every key)"))
        })?;
        let id = id.trim();
        let id_ok =
            (1..=32).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !id_ok {
            return Err(ConfigError::new(MASTER_KEY, format!("{what}: a key id is 1-32 of A-Z a-z 0-9 . _ -")));
        }
        if keys.iter().any(|(seen, _)| seen == id) {
            return Err(ConfigError::new(MASTER_KEY, format!("key id {id:?} is listed twice")));
        }
        let key = parse_master_key(key, &format!("key {id:?} "))?;
        if keys.iter().any(|(_, k)| k.expose_secret() == key.expose_secret()) {
            return Err(ConfigError::new(MASTER_KEY, format!("key {id:?} is the same key as an earlier id")));
        }
        keys.push((id.to_owned(), key));
    }
    let primary = keys[0].0.clone();
    Ok(Keyring::new(&primary, keys.iter().map(|(id, k)| (id.clone(), k))))
}

/// One key; `what` prefixes the problem ("" for a lone key, `key "k1" `).
fn parse_master_key(value: &str, what: &str) -> Result<SecretBox<[u8; 32]>, ConfigError> {
    let decoded = base64::engine::general_purpose::STANDARD.decode(value.trim()).map_err(|_| {
        ConfigError::new(MASTER_KEY, format!("{what}is not valid base64 (generate one with: openssl rand -base64 32)"))
    })?;
    let key: [u8; 32] = decoded.as_slice().try_into().map_err(|_| {
        ConfigError::new(MASTER_KEY, format!("{what}must decode to exactly 32 bytes, got {} bytes", decoded.len()))
    })?;
    if is_weak(&key) {
        return Err(ConfigError::new(
            MASTER_KEY,
            format!("{what}is not random (too few distinct bytes); use: openssl rand -base64 32"),
        ));
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

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    fn good_key(seed: u8) -> String {
        b64(&(0u8..32).map(|i| i.wrapping_mul(37).wrapping_add(seed)).collect::<Vec<_>>())
    }

    fn problem(value: String) -> Option<String> {
        parse_master_keys(value.into()).err().map(|e| e.to_string())
    }

    #[test]
    fn master_key_must_be_32_random_bytes_in_base64() {
        assert_eq!(
            problem("AAEC".into()).as_deref(),
            Some("CLINFLOW_MASTER_KEY: must decode to exactly 32 bytes, got 3 bytes")
        );
        assert!(problem("not base64!".into()).is_some());
        assert!(problem(b64(&[0u8; 32])).is_some());
        let single = parse_master_keys(good_key(0).into()).unwrap();
        assert_eq!(single.primary(), "1");
    }

    #[test]
    fn master_key_lists_have_ids_and_a_primary() {
        let keyring = parse_master_keys(format!("k2:{}, k1:{}", good_key(1), good_key(2)).into()).unwrap();
        assert_eq!(keyring.primary(), "k2");
        assert!(keyring.holds("k1") && keyring.holds("k2") && !keyring.holds("1"));
        let refused = [
            (format!("k2:{},{}", good_key(1), good_key(2)), "entry 2 is not ID:BASE64"),
            (format!("k2:{},k2:{}", good_key(1), good_key(2)), "key id \"k2\" is listed twice"),
            (format!("k2:{},k1:{}", good_key(1), good_key(1)), "key \"k1\" is the same key"),
            (format!("k 2:{}", good_key(1)), "a key id is 1-32 of"),
            (format!(":{}", good_key(1)), "a key id is 1-32 of"),
            (format!("k2:{},k1:AAEC", good_key(1)), "key \"k1\" must decode to exactly 32 bytes"),
            (format!("k2:{},", good_key(1)), "entry 2 is not ID:BASE64"),
        ];
        for (value, expected) in refused {
            let got = problem(value.clone()).unwrap_or_default();
            assert!(got.contains(expected), "{got}");
            for part in value.split([',', ':']).filter(|p| p.len() > 8) {
                assert!(!got.contains(part.trim()), "a key is echoed: {got}");
            }
        }
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
