//! What more than one clinflow binary needs: configuration from the
//! environment, PHI encryption, the RabbitMQ topology and publisher, the audit
//! event, the document tables, telemetry and shutdown.
//!
//! Nothing in here knows about HTTP handlers, MedCAT or the audit hash chain:
//! those belong to the one binary that owns them.

pub mod amqp;
pub mod annotation;
pub mod audit;
pub mod config;
pub mod crypto;
pub mod documents;
pub mod jobs;
pub mod link;
pub mod outbox;
pub mod relay;
pub mod shutdown;
pub mod telemetry;

/// The schema migrations in `migrations/`, embedded at build time.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

#[cfg(feature = "testing")]
pub mod testing;
