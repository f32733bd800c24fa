//! The api's configuration, read once at start-up.

use std::net::SocketAddr;

use clinflow::config::{self, ConfigError};
use secrecy::{ExposeSecret, SecretBox, SecretString};

pub struct ApiConfig {
    pub database_url: SecretString,
    pub amqp_url: SecretString,
    pub queue_prefix: String,
    pub keyring: clinflow::crypto::Keyring,
    pub jwt_secret: SecretBox<Vec<u8>>,
    pub index_key: SecretBox<Vec<u8>>,
    pub limits: crate::state::UploadLimits,
    pub batch_limits: crate::state::BatchLimits,
    /// How long an Idempotency-Key is remembered.
    pub idempotency_retention: std::time::Duration,
    pub audit_signer: clinflow::audit::Signer,
    pub audit_keys: Option<clinflow::audit::signing::PublicKeys>,
    pub audit_reader_url: Option<SecretString>,
    /// Refusals audited one by one per source address and minute.
    pub denials_per_minute: u32,
    pub audit_checkpoints: Option<std::path::PathBuf>,
    pub lockout: crate::lockout::LockoutPolicy,
    /// Login attempts per source address and minute.
    pub logins_per_minute: u32,
    /// Password checks that may wait for a core before logins are shed.
    pub password_queue: usize,
    pub break_glass_for: std::time::Duration,
    pub break_glass_per_day: u32,
    /// `ERASURE_JOURNAL_DIR` and `ERASURE_JOURNAL_KEY`: without them erasure
    /// answers 503 (an erasure must outlive a restore).
    pub erasure_journal: Option<clinflow::erasure::Journal>,
    pub api_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub edge: crate::state::Edge,
    /// HTTPS on `api_addr` (`API_TLS_CERT`, `API_TLS_KEY`); plain HTTP without.
    pub tls: Option<crate::https::ApiTls>,
}

impl ApiConfig {
    pub fn from_env() -> Result<Self, ConfigError> {
        let config = Self {
            database_url: database_url()?,
            amqp_url: clinflow::tls::amqp_url("AMQP_URL")?,
            queue_prefix: config::optional("CLINFLOW_QUEUE_PREFIX")?.unwrap_or_else(|| "clinflow".into()),
            keyring: config::master_keys()?,
            jwt_secret: config::secret_bytes("JWT_SECRET")?,
            index_key: config::secret_bytes("CLINFLOW_INDEX_KEY")?,
            limits: crate::state::UploadLimits {
                max_outbox: count("UPLOAD_MAX_OUTBOX", crate::state::UploadLimits::default().max_outbox)?,
                max_queued: count("UPLOAD_MAX_QUEUED", crate::state::UploadLimits::default().max_queued)?,
            },
            batch_limits: {
                let d = crate::state::BatchLimits::default();
                crate::state::BatchLimits {
                    max_lines: usize::try_from(count("BATCH_MAX_LINES", d.max_lines as u64)?).unwrap_or(d.max_lines),
                    max_bytes: usize::try_from(count("BATCH_MAX_BYTES", d.max_bytes as u64)?).unwrap_or(d.max_bytes),
                    ..d
                }
            },
            audit_signer: clinflow::audit::Signer::from_env("api")?,
            audit_keys: clinflow::audit::signing::PublicKeys::from_env("AUDIT_PUBLIC_KEYS")?,
            audit_checkpoints: config::optional("AUDIT_CHECKPOINT_FILE")?.map(Into::into),
            audit_reader_url: match config::optional("AUDIT_READER_DATABASE_URL")? {
                Some(_) => Some(clinflow::tls::postgres_url("AUDIT_READER_DATABASE_URL")?),
                None => None,
            },
            denials_per_minute: u32::try_from(count("AUTH_DENIALS_AUDITED_PER_MINUTE", 60)?.max(1)).unwrap_or(60),
            idempotency_retention: std::time::Duration::from_secs(3600 * count("IDEMPOTENCY_KEY_HOURS", 24)?.max(1)),
            lockout: {
                let d = crate::lockout::LockoutPolicy::default();
                let secs = |name, default: std::time::Duration| {
                    count(name, default.as_secs()).map(|s| std::time::Duration::from_secs(s.max(1)))
                };
                crate::lockout::LockoutPolicy {
                    threshold: u32::try_from(count("LOGIN_LOCKOUT_THRESHOLD", u64::from(d.threshold))?.max(1))
                        .unwrap_or(d.threshold),
                    window: secs("LOGIN_LOCKOUT_WINDOW_SECONDS", d.window)?,
                    base: secs("LOGIN_LOCKOUT_SECONDS", d.base)?,
                    max: secs("LOGIN_LOCKOUT_MAX_SECONDS", d.max)?,
                }
            },
            logins_per_minute: u32::try_from(count("LOGINS_PER_SOURCE_PER_MINUTE", 30)?.max(1)).unwrap_or(30),
            password_queue: usize::try_from(count("PASSWORD_CHECK_QUEUE", crate::users::DEFAULT_QUEUE as u64)?)
                .unwrap_or(crate::users::DEFAULT_QUEUE),
            break_glass_for: std::time::Duration::from_secs(60 * count("BREAK_GLASS_MINUTES", 60)?.max(1)),
            break_glass_per_day: u32::try_from(count("BREAK_GLASS_GRANTS_PER_DAY", 5)?.max(1)).unwrap_or(5),
            erasure_journal: clinflow::erasure::Journal::from_env()?,
            api_addr: config::socket_addr("API_ADDR", "127.0.0.1:8080")?,
            metrics_addr: config::socket_addr("METRICS_ADDR", "127.0.0.1:9101")?,
            edge: edge()?,
            tls: tls()?,
        };
        let secrets: Vec<(&'static str, &[u8])> = vec![
            ("JWT_SECRET", config.jwt_secret.expose_secret()),
            ("CLINFLOW_INDEX_KEY", config.index_key.expose_secret()),
        ];
        config::distinct(&secrets)?;
        // Whoever holds it could rewrite format-1 audit rows and checkpoints.
        if config::optional("AUDIT_HMAC_KEY")?.is_some() {
            return Err(ConfigError {
                name: "AUDIT_HMAC_KEY",
                problem: "is the audit sink's alone; the api verifies with public keys (AUDIT_PUBLIC_KEYS): remove it"
                    .into(),
            });
        }
        Ok(config)
    }
}

/// A switch that is `on` unless set to `off`.
fn on_off(name: &'static str) -> Result<bool, ConfigError> {
    match config::optional(name)?.as_deref().map(str::trim) {
        None | Some("on") => Ok(true),
        Some("off") => Ok(false),
        Some(_) => Err(ConfigError { name, problem: "must be on or off".into() }),
    }
}

fn edge() -> Result<crate::state::Edge, ConfigError> {
    let d = crate::state::Edge::default();
    let secs = |name, default: std::time::Duration| {
        count(name, default.as_secs()).map(|s| std::time::Duration::from_secs(s.max(1)))
    };
    Ok(crate::state::Edge {
        request_timeout: secs("API_REQUEST_TIMEOUT_SECONDS", d.request_timeout)?,
        batch_timeout: secs("API_BATCH_TIMEOUT_SECONDS", d.batch_timeout)?,
        docs: on_off("API_DOCS")?,
        console: on_off("API_CONSOLE")?,
        trusted_proxies: match config::optional("TRUSTED_PROXIES")? {
            None => d.trusted_proxies,
            Some(list) => list.parse().map_err(|problem| ConfigError { name: "TRUSTED_PROXIES", problem })?,
        },
        max_connections: usize::try_from(count("API_MAX_CONNECTIONS", d.max_connections as u64)?.max(1))
            .unwrap_or(d.max_connections),
        header_timeout: secs("API_HEADER_TIMEOUT_SECONDS", d.header_timeout)?,
        idle_timeout: secs("API_IDLE_TIMEOUT_SECONDS", d.idle_timeout)?,
        body_stall: secs("API_BODY_STALL_SECONDS", d.body_stall)?,
    })
}

/// `API_TLS_CERT` and `API_TLS_KEY` (both or neither), the files loaded
/// and checked; `API_TLS_MIN_VERSION` (1.3 by default, or 1.2) and
/// `API_TLS_RELOAD_SECONDS` (5) only with them.
fn tls() -> Result<Option<crate::https::ApiTls>, ConfigError> {
    use crate::https::{ApiTls, CERT, KEY, MinVersion, TlsFiles};
    const MIN_VERSION: &str = "API_TLS_MIN_VERSION";
    const RELOAD: &str = "API_TLS_RELOAD_SECONDS";
    let both = format!("set both {CERT} and {KEY} (HTTPS), or neither (plain HTTP)");
    let (cert, key) = match (config::optional(CERT)?, config::optional(KEY)?) {
        (Some(cert), Some(key)) => (cert, key),
        (Some(_), None) => {
            return Err(ConfigError { name: KEY, problem: format!("is not set, but {CERT} is: {both}") });
        }
        (None, Some(_)) => {
            return Err(ConfigError { name: CERT, problem: format!("is not set, but {KEY} is: {both}") });
        }
        (None, None) => {
            for name in [MIN_VERSION, RELOAD] {
                if config::optional(name)?.is_some() {
                    return Err(ConfigError {
                        name,
                        problem: format!("is set, but the api serves plain HTTP: {both}"),
                    });
                }
            }
            return Ok(None);
        }
    };
    let min_version = match config::optional(MIN_VERSION)?.as_deref().map(str::trim) {
        None | Some("1.3") => MinVersion::Tls13,
        Some("1.2") => MinVersion::Tls12,
        Some(_) => return Err(ConfigError { name: MIN_VERSION, problem: "must be 1.3 (the default) or 1.2".into() }),
    };
    let reload_every = std::time::Duration::from_secs(count(RELOAD, 5)?.max(1));
    let files = TlsFiles { cert: cert.trim().into(), key: key.trim().into(), min_version, reload_every };
    ApiTls::load(files).map(Some)
}

pub fn database_url() -> Result<SecretString, ConfigError> {
    clinflow::tls::postgres_url("DATABASE_URL")
}

fn count(name: &'static str, default: u64) -> Result<u64, ConfigError> {
    match config::optional(name)? {
        None => Ok(default),
        Some(v) => v.trim().parse().map_err(|_| ConfigError { name, problem: "must be a whole number".into() }),
    }
}
