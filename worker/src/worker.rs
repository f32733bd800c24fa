//! What a worker holds: its database, keys, MedCAT client and topology, and
//! how it batches and retries. Every stage of a batch is a method of
//! [`Worker`], in the module of what it serves (`consume`, `settle`,
//! `store`, `annotate`).

use std::sync::Arc;
use std::time::Duration;

use clinflow::amqp::Topology;
use clinflow::config::{self, ConfigError};
use clinflow::keys::Keys;
use sqlx::PgPool;

use crate::medcat::MedcatClient;

pub const SERVICE_NAME: &str = "clinflow-worker";

pub struct Worker {
    pub db: PgPool,
    /// The key-encryption keys and the cache of patients' data keys.
    pub keys: Arc<Keys>,
    pub medcat: MedcatClient,
    /// From `GET /api/info` at start-up; a response that names its model
    /// overrides it for that result.
    pub model_version: String,
    pub topology: Topology,
    /// Signs the worker's audit events (`AUDIT_SIGNING_KEY`, key id
    /// `worker` by default).
    pub audit_signer: Arc<clinflow::audit::Signer>,
    pub batch: BatchConfig,
    pub retry: RetryConfig,
}

/// Attempts beyond the in-process retries: a job whose batch still fails
/// transiently while MedCAT says it is ready waits in its lane's retry queue
/// and comes back; after `max_attempts` it is dead-lettered and its document
/// marked failed.
#[derive(Debug, Clone, Copy)]
pub struct RetryConfig {
    pub max_attempts: u32,
    /// Wait before the second attempt; doubled for each later one.
    pub first_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self { max_attempts: 5, first_delay: Duration::from_secs(30), max_delay: Duration::from_secs(600) }
    }
}

impl RetryConfig {
    /// `WORKER_MAX_ATTEMPTS` and `WORKER_RETRY_DELAY_S`, or the defaults.
    pub fn from_env() -> Result<Self, ConfigError> {
        let defaults = Self::default();
        Ok(Self {
            max_attempts: config::positive("WORKER_MAX_ATTEMPTS", defaults.max_attempts as u16)?.into(),
            first_delay: Duration::from_secs(config::positive("WORKER_RETRY_DELAY_S", 30)?.into()),
            ..defaults
        })
    }

    /// How long a job waits after its `attempts`-th failed attempt.
    pub fn delay(&self, attempts: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempts.saturating_sub(1).min(16));
        self.first_delay.saturating_mul(factor).min(self.max_delay)
    }
}

#[derive(Debug, Clone, Copy)]
pub struct BatchConfig {
    /// Most documents per batch (and the prefetch of each channel).
    pub size: u16,
    /// How long a batch waits for more deliveries after its first.
    pub max_wait: Duration,
    /// Batches processed at once, each on its own channel.
    pub in_flight: u16,
    /// Longest pause between two tries of a batch held by a transient failure.
    pub max_pause: Duration,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self { size: 50, max_wait: Duration::from_millis(50), in_flight: 3, max_pause: Duration::from_secs(30) }
    }
}

impl BatchConfig {
    /// `WORKER_BATCH_SIZE`, `WORKER_BATCH_WAIT_MS` and `WORKER_IN_FLIGHT`,
    /// or the defaults.
    pub fn from_env() -> Result<Self, ConfigError> {
        let defaults = Self::default();
        Ok(Self {
            size: config::positive("WORKER_BATCH_SIZE", defaults.size)?,
            max_wait: Duration::from_millis(
                config::positive("WORKER_BATCH_WAIT_MS", defaults.max_wait.as_millis() as u16)?.into(),
            ),
            in_flight: config::positive("WORKER_IN_FLIGHT", defaults.in_flight)?,
            ..defaults
        })
    }
}
