//! What more than one clinflow binary needs: configuration from the
//! environment, PHI encryption, the RabbitMQ topology and publisher, the audit
//! event, the document tables, telemetry and shutdown.
//!
//! Nothing in here knows about HTTP handlers, MedCAT or the audit hash chain:
//! those belong to the one binary that owns them.
//!
//! Without the `server` feature only [`wire`] (the HTTP API's JSON bodies) and
//! [`shutdown`] are built, so an API client such as clinflow-ingest shares
//! those definitions without pulling in sqlx or lapin.

pub mod shutdown;
pub mod wire;

#[cfg(feature = "server")]
pub mod amqp;
#[cfg(feature = "server")]
pub mod annotation;
#[cfg(feature = "server")]
pub mod audit;
#[cfg(feature = "server")]
pub mod chain;
#[cfg(feature = "server")]
pub mod checkpoint;
#[cfg(feature = "server")]
pub mod concepts;
#[cfg(feature = "server")]
pub mod config;
#[cfg(feature = "server")]
pub mod crypto;
#[cfg(feature = "server")]
pub mod deadletters;
#[cfg(feature = "server")]
pub mod documents;
#[cfg(feature = "server")]
pub mod jobs;
#[cfg(feature = "server")]
pub mod keys;
#[cfg(feature = "server")]
pub mod link;
#[cfg(feature = "server")]
pub mod outbox;
#[cfg(feature = "server")]
pub mod relay;
#[cfg(feature = "server")]
pub mod telemetry;

/// The schema migrations in `migrations/`, embedded at build time.
#[cfg(feature = "server")]
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

#[cfg(feature = "testing")]
pub mod testing;
