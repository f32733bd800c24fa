//! TLS on every connection clinflow makes, with rustls (ring; no OpenSSL),
//! and no silent downgrade.
//!
//! Each hop says in its own URL how it is protected, as its server's own
//! clients do:
//! - PostgreSQL: `sslmode=verify-full&sslrootcert=CA_FILE` (libpq's words;
//!   sqlx reads them);
//! - RabbitMQ: `amqps://…?cacertfile=CA_FILE` (the parameter names of
//!   RabbitMQ's URI spec; `certfile` and `keyfile` add a client
//!   certificate), read here because lapin takes the CA apart from the URL;
//! - MedCAT: `https://…`, with its CA in `MEDCAT_CA_FILE`.
//!
//! A URL that does not ask for a verified TLS connection is refused at
//! start with one line naming its variable, unless
//! `CLINFLOW_ALLOW_PLAINTEXT=1` (a developer's loopback only; each process
//! warns at start that it is on). A URL that asks for TLS gets it or fails:
//! every TLS backend is compiled in, so none falls back to plain TCP.

use std::path::PathBuf;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use secrecy::{ExposeSecret, SecretString};

use crate::config::{ConfigError, optional, url};

/// The flag that lets a process use plaintext hops.
pub const ALLOW_PLAINTEXT: &str = "CLINFLOW_ALLOW_PLAINTEXT";

/// Makes ring the process's rustls crypto provider; every TLS client and
/// server here (sqlx, lapin, reqwest, the api's listener) then agrees on
/// it. Call it first thing in `main` and in test set-up; calling it again
/// does nothing.
// rustls 0.23.48 deprecates ring's provider for its lack of post-quantum key
// exchange (X25519MLKEM768, aws-lc-rs only). Chosen anyway: sqlx, lapin and
// reqwest are built with ring here (a pure-Rust build, no C toolchain for
// aws-lc), and every hop is inside the deployment; docs/security.md says so.
#[allow(deprecated)]
pub fn install_crypto_provider() {
    // An error means a provider is installed already: the same one, since
    // only this function installs one.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Whether plaintext hops are allowed (`CLINFLOW_ALLOW_PLAINTEXT=1`).
fn plaintext_allowed() -> Result<bool, ConfigError> {
    match optional(ALLOW_PLAINTEXT)?.as_deref().map(str::trim) {
        None | Some("0") => Ok(false),
        Some("1") => Ok(true),
        Some(_) => Err(ConfigError::new(ALLOW_PLAINTEXT, "must be 1 (allow plaintext hops) or 0")),
    }
}

/// Warns once at start when plaintext hops are allowed.
pub fn warn_if_plaintext_allowed() -> Result<(), ConfigError> {
    if plaintext_allowed()? {
        tracing::warn!(
            "{ALLOW_PLAINTEXT}=1: connections without verified TLS are allowed; this is for a developer's loopback only"
        );
    }
    Ok(())
}

/// How a hop is protected, as its URL says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Protection {
    /// TLS with the server's certificate verified (against this CA file, or
    /// the built-in roots when none is named).
    Verified { ca_file: Option<PathBuf> },
    /// Plain TCP, or TLS without verifying the server: allowed only with
    /// `CLINFLOW_ALLOW_PLAINTEXT=1`.
    Plaintext,
}

/// The value of query parameter `key` in `url` (first occurrence, decoded
/// from `%XX`), if any.
pub fn query_param(url: &str, key: &str) -> Option<String> {
    let query = url.split_once('?')?.1;
    let query = query.split('#').next().unwrap_or(query);
    query.split('&').filter_map(|pair| pair.split_once('=')).find(|(k, _)| *k == key).map(|(_, v)| percent_decode(v))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = || std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok().and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex()) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A CA file named by `what` (of variable `name`) must be a readable PEM
/// file holding at least one certificate.
fn check_ca_file(name: &'static str, what: &str, path: &str) -> Result<PathBuf, ConfigError> {
    let pem = std::fs::read(path).map_err(|e| ConfigError::new(name, format!("{what} {path:?}: {e}")))?;
    let certs = CertificateDer::pem_slice_iter(&pem).collect::<Result<Vec<_>, _>>();
    match certs {
        Ok(certs) if !certs.is_empty() => Ok(PathBuf::from(path)),
        _ => Err(ConfigError::new(name, format!("{what} {path:?} holds no PEM certificate"))),
    }
}

/// How the PostgreSQL URL in variable `name` is protected: `verify-full`
/// (with `sslrootcert`, if given, a readable CA file), or plaintext for any
/// other `sslmode` (`require` and `verify-ca` encrypt, but do not prove
/// whom to).
fn postgres_protection(name: &'static str, url: &SecretString) -> Result<Protection, ConfigError> {
    let url = url.expose_secret();
    let mode = query_param(url, "sslmode").map(|m| m.to_ascii_lowercase());
    if mode.as_deref() != Some("verify-full") {
        return Ok(Protection::Plaintext);
    }
    let ca_file = query_param(url, "sslrootcert").map(|p| check_ca_file(name, "sslrootcert", &p)).transpose()?;
    Ok(Protection::Verified { ca_file })
}

/// How the RabbitMQ URL in variable `name` is protected: `amqps://` needs a
/// `cacertfile` (the broker is verified against it and nothing else).
fn amqp_protection(name: &'static str, url: &SecretString) -> Result<Protection, ConfigError> {
    let url = url.expose_secret();
    if !url.starts_with("amqps://") {
        return Ok(Protection::Plaintext);
    }
    let Some(ca) = query_param(url, "cacertfile") else {
        return Err(ConfigError::new(
            name,
            "amqps:// needs ?cacertfile=PATH, the CA that signed the broker's certificate",
        ));
    };
    for (key, what) in [("certfile", "certfile"), ("keyfile", "keyfile")] {
        if let Some(path) = query_param(url, key) {
            std::fs::metadata(&path).map_err(|e| ConfigError::new(name, format!("{what} {path:?}: {e}")))?;
        }
    }
    Ok(Protection::Verified { ca_file: Some(check_ca_file(name, "cacertfile", &ca)?) })
}

/// How an HTTP URL in variable `name` is protected: `https://`, verified
/// against the CA file in variable `ca_name` when set, else the built-in
/// roots.
fn https_protection(url: &SecretString, ca_name: &'static str) -> Result<Protection, ConfigError> {
    if !url.expose_secret().starts_with("https://") {
        return Ok(Protection::Plaintext);
    }
    let ca_file = optional(ca_name)?.map(|p| check_ca_file(ca_name, "the file", p.trim())).transpose()?;
    Ok(Protection::Verified { ca_file })
}

/// Refuses a plaintext hop unless `CLINFLOW_ALLOW_PLAINTEXT=1`.
fn require_verified(name: &'static str, protection: &Protection, how: &str) -> Result<(), ConfigError> {
    if *protection == Protection::Plaintext && !plaintext_allowed()? {
        return Err(ConfigError::new(
            name,
            format!("is not a verified TLS connection: {how}, or set {ALLOW_PLAINTEXT}=1 on a developer's loopback"),
        ));
    }
    Ok(())
}

/// A PostgreSQL URL from variable `name` that asks for a verified TLS
/// connection (or any, with `CLINFLOW_ALLOW_PLAINTEXT=1`).
pub fn postgres_url(name: &'static str) -> Result<SecretString, ConfigError> {
    let url = url(name, &["postgres", "postgresql"])?;
    let protection = postgres_protection(name, &url)?;
    require_verified(name, &protection, "add sslmode=verify-full&sslrootcert=CA_FILE")?;
    Ok(url)
}

/// A RabbitMQ URL from variable `name`, likewise.
pub fn amqp_url(name: &'static str) -> Result<SecretString, ConfigError> {
    let url = url(name, &["amqp", "amqps"])?;
    let protection = amqp_protection(name, &url)?;
    require_verified(name, &protection, "use amqps://…?cacertfile=CA_FILE")?;
    Ok(url)
}

/// An HTTP URL from variable `name`, likewise, with the CA file of its
/// server in variable `ca_name` (optional: the built-in roots otherwise).
pub fn https_url(name: &'static str, ca_name: &'static str) -> Result<(SecretString, Protection), ConfigError> {
    let url = url(name, &["http", "https"])?;
    let protection = https_protection(&url, ca_name)?;
    require_verified(name, &protection, &format!("use https:// (its CA in {ca_name})"))?;
    Ok((url, protection))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_params_are_found_and_decoded() {
        let url = "amqps://u:p@h:5671/%2f?heartbeat=10&cacertfile=%2Ftmp%2Fca.pem&x=1";
        assert_eq!(query_param(url, "cacertfile").as_deref(), Some("/tmp/ca.pem"));
        assert_eq!(query_param(url, "heartbeat").as_deref(), Some("10"));
        assert_eq!(query_param(url, "missing"), None);
        assert_eq!(query_param("postgres://h/db", "sslmode"), None);
    }

    #[test]
    fn postgres_urls_other_than_verify_full_are_plaintext() {
        for url in ["postgres://h/db", "postgres://h/db?sslmode=require", "postgres://h/db?sslmode=verify-ca"] {
            let p = postgres_protection("DATABASE_URL", &SecretString::from(url)).unwrap();
            assert_eq!(p, Protection::Plaintext, "{url}");
        }
        let p = postgres_protection("DATABASE_URL", &SecretString::from("postgres://h/db?sslmode=verify-full"));
        assert_eq!(p.unwrap(), Protection::Verified { ca_file: None });
    }

    #[test]
    fn a_missing_ca_file_names_the_variable() {
        let url = SecretString::from("postgres://h/db?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem");
        let err = postgres_protection("DATABASE_URL", &url).unwrap_err().to_string();
        assert!(err.starts_with("DATABASE_URL: sslrootcert"), "{err}");
        let err = amqp_protection("AMQP_URL", &SecretString::from("amqps://h")).unwrap_err().to_string();
        assert!(err.starts_with("AMQP_URL: amqps:// needs ?cacertfile"), "{err}");
    }
}
