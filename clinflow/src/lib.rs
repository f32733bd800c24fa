//! What more than one clinflow binary needs, defined once: the HTTP API's
//! JSON bodies ([`wire`]) and shutdown on a signal ([`shutdown`]); with the
//! `server` feature also configuration from the environment (`config`), PHI
//! encryption and patients' data keys (`crypto`, `keys`), the RabbitMQ
//! topology, publisher and supervised connection (`amqp`, `link`), the
//! document job and the audit event (`jobs`, `audit`), the transactional
//! outbox and its relay (`outbox`, `relay`), the document, result and concept
//! tables (`documents`, `annotation`, `concepts`), dead-lettered jobs and
//! reprocessing (`deadletters`), the audit table's hash chain and its external
//! checkpoints (`chain`, `checkpoint`: the audit sink appends, the api
//! verifies), and telemetry.
//!
//! HTTP handlers and the MedCAT client are not here: each belongs to the one
//! binary that owns it.
//!
//! Modules import in one direction only (`tests/module_graph.rs` fails on an
//! import circle): `wire`, `crypto`, `amqp` and `annotation` import nothing
//! of the crate; `config` builds on `crypto`; `audit` on `amqp` and `config`
//! (the producers' signing keys); `jobs` and `link` on `amqp`; `outbox` on
//! `audit` and `jobs`, `relay` on `outbox`; `documents` on `crypto`,
//! `concepts` and `amqp`'s lanes; `keys` on `documents`; `erasure` (a
//! patient's erasure, its journal outside the database) on `keys`, `audit`
//! and `outbox`;
//! `deadletters` and key rotation on what they run; `chain` on `audit`,
//! `checkpoint` on `chain`.
//!
//! Without the `server` feature only [`wire`] and [`shutdown`] are built, so
//! an API client such as clinflow-ingest shares those definitions without
//! pulling in sqlx or lapin.

pub mod shutdown;
pub mod wire;

/// Declares a service's command line, `pub struct Cli`: one of the
/// service's commands (`$command`, a `clap::Subcommand`), or none for what
/// the service does by default. The doc comment given is its `--help`.
///
/// A macro, not a generic struct, because clap's derive takes the program's
/// name and version from the crate it is expanded in: here, the binary's.
#[macro_export]
macro_rules! service_cli {
    ($(#[$doc:meta])* $command:ty) => {
        $(#[$doc])*
        #[derive(clap::Parser)]
        #[command(version)]
        pub struct Cli {
            #[command(subcommand)]
            pub command: Option<$command>,
        }
    };
}

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
pub mod erasure;
#[cfg(feature = "server")]
pub mod headers;
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
#[cfg(feature = "server")]
pub mod tls;

/// The schema migrations in `migrations/`, embedded at build time.
#[cfg(feature = "server")]
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// Connection options for the services that write in batches (worker, audit
/// sink): every statement planned for its own parameters. A cached generic
/// plan is made once per connection; made while a table was nearly empty
/// (a fresh deployment, a worker started before the backlog) it keeps
/// scanning the whole table when `= ANY($1)` of 500 ids should probe an
/// index, and a connection lives 30 minutes. Planning costs these
/// statements a few hundred microseconds per batch.
#[cfg(feature = "server")]
pub fn batch_connect_options(url: &str) -> Result<sqlx::postgres::PgConnectOptions, sqlx::Error> {
    let options: sqlx::postgres::PgConnectOptions = url.parse()?;
    Ok(options.options([("plan_cache_mode", "force_custom_plan")]))
}

#[cfg(feature = "testing")]
pub mod testing;
