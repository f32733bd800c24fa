//! The `clinflow-api` command line: serve the API (the default), and the
//! operators' commands `migrate`, `create-user`, `reindex-patients`, `keys`
//! and `broker` (the last three live in the shared crate, beside what they
//! work on).

use std::io::BufRead;
use std::sync::Arc;

use anyhow::Context;
use clap::Subcommand;
use clinflow::amqp::Topology;
use clinflow::amqp::command::BrokerCommand;
use clinflow::crypto::IndexKey;
use clinflow::erasure::command::ErasuresCommand;
use clinflow::keys::Keys;
use clinflow::keys::command::KeysCommand;
use clinflow::relay::{Relay, RelayHandle};
use secrecy::ExposeSecret;
use sqlx::postgres::PgPoolOptions;
use tokio_util::sync::CancellationToken;

use crate::auth::{IDLE_TIMEOUT, JwtKeys};
use crate::config::{self, ApiConfig};
use crate::server::{serve, serve_tls};
use crate::state::AppState;
use crate::users::{self, Passwords, Role, UserError};

/// Unwrapped data keys the api keeps (for `keys::CACHE_TTL`). A concept
/// query opens the references of a page of patients from anywhere in the
/// caller's scope, so the cache must hold the scopes in use, not just the
/// shared default of 10,000 (one `data_keys` query per page when it misses).
/// With 20 clinicians of 1,000 patients each at a million documents, the
/// concept documents endpoint's p99 over the second half of each run went
/// from 15.5–20.1 ms (four runs) to 11.6–13.3 ms (three), its p50 from
/// 7.4–7.8 to 6.4–7.1 ms, and the api's peak RSS from 55 to 63 MB
/// (BENCHMARKS.md, 2026-11-27). The process holds the key-encryption keys
/// that unwrap every data key anyway.
const KEY_CACHE_ENTRIES: usize = 50_000;

clinflow::service_cli!(
    /// clinflow HTTP API. Configuration comes from the environment (see README).
    Command
);

#[derive(Subcommand)]
pub enum Command {
    /// Serve the API (the default).
    Serve,
    /// Apply the database migrations; run it as the role that owns the schema
    /// (MIGRATION_DATABASE_URL, or DATABASE_URL if unset).
    Migrate,
    /// Create a user; the password is read from stdin (one line).
    CreateUser {
        #[arg(long)]
        username: String,
        #[arg(long, value_enum)]
        role: Role,
        /// Succeed without changes when the user exists already.
        #[arg(long)]
        if_not_exists: bool,
    },
    /// Fill the patient blind index of documents stored before it existed
    /// (decrypts each patient reference once; resumable, idempotent).
    ReindexPatients,
    /// Key management, as the schema owner (MIGRATION_DATABASE_URL, or
    /// DATABASE_URL if unset); each step audited.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// The RabbitMQ topology: `setup` declares it as the broker's
    /// administrator (AMQP_URL), before the services start; `check` looks.
    #[command(subcommand)]
    Broker(BrokerCommand),
    /// The erasure journal (ERASURE_JOURNAL_DIR, ERASURE_JOURNAL_KEY):
    /// `reapply` to a copy restored from a backup (DATABASE_URL, as its
    /// schema owner), `check` its entries.
    #[command(subcommand)]
    Erasures(ErasuresCommand),
}

/// Runs what `cli` asks for.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => run_server().await,
        Command::Migrate => migrate().await,
        Command::CreateUser { username, role, if_not_exists } => create_user(&username, role, if_not_exists).await,
        Command::ReindexPatients => reindex_patients().await,
        Command::Keys(command) => clinflow::keys::command::run(command, "clinflow-api").await,
        Command::Broker(command) => clinflow::amqp::command::run(command, "clinflow-api-broker").await,
        Command::Erasures(command) => clinflow::erasure::command::run(command, "clinflow-api").await,
    }
}

async fn run_server() -> anyhow::Result<()> {
    let config = ApiConfig::from_env()?;
    clinflow::tls::warn_if_plaintext_allowed()?;
    clinflow::telemetry::recorder()?;
    crate::telemetry::register();
    let db = PgPoolOptions::new()
        .max_connections(32)
        // While the database is away requests answer 503 after this, not hang.
        .acquire_timeout(std::time::Duration::from_secs(5))
        .connect(config.database_url.expose_secret())
        .await
        .context("connecting to PostgreSQL (DATABASE_URL)")?;
    let topology = Topology::new(config.queue_prefix);
    let relay = Relay {
        db: db.clone(),
        amqp_url: config.amqp_url.clone(),
        topology: topology.clone(),
        name: "clinflow-api".into(),
        handle: RelayHandle::default(),
    };
    let db_for_purge = db.clone();
    let state = AppState {
        db,
        keys: Arc::new(Keys::with_cache(config.keyring, KEY_CACHE_ENTRIES, clinflow::keys::CACHE_TTL)),
        index_key: Arc::new(IndexKey::new(config.index_key)),
        relay: relay.handle.clone(),
        jwt: Arc::new(JwtKeys::new(&config.jwt_secret)),
        passwords: Passwords::with_queue(config.password_queue).await?,
        idle_timeout: IDLE_TIMEOUT,
        limits: config.limits,
        batch_limits: config.batch_limits,
        amqp_url: config.amqp_url,
        topology,
        audit_db: match &config.audit_reader_url {
            Some(url) => Some(
                PgPoolOptions::new()
                    .max_connections(4)
                    .acquire_timeout(std::time::Duration::from_secs(5))
                    .connect_lazy(url.expose_secret())
                    .context("AUDIT_READER_DATABASE_URL")?,
            ),
            None => None,
        },
        audit_signer: Arc::new(config.audit_signer),
        audit_trust: config.audit_keys.map(|keys| Arc::new(clinflow::chain::Trust::new(keys))),
        audit_checkpoints: config.audit_checkpoints,
        denials: Arc::new(crate::denials::DenialLimiter::per_minute(
            std::num::NonZeroU32::new(config.denials_per_minute).unwrap_or(std::num::NonZeroU32::MIN),
        )),
        login: Arc::new(crate::lockout::LoginGuard::new(
            config.lockout,
            std::num::NonZeroU32::new(config.logins_per_minute).unwrap_or(std::num::NonZeroU32::MIN),
        )),
        break_glass_for: config.break_glass_for,
        break_glass_per_day: config.break_glass_per_day,
        erasure_journal: config.erasure_journal.map(Arc::new),
        edge: config.edge,
    };
    let listener = tokio::net::TcpListener::bind(config.api_addr)
        .await
        .with_context(|| format!("API_ADDR {}", config.api_addr))?;
    match &config.tls {
        None => tracing::info!(addr = %config.api_addr, "clinflow-api listening (HTTP)"),
        Some(tls) => tracing::info!(
            addr = %config.api_addr,
            min_tls_version = tls.min_version().as_str(),
            certificate_sha256 = %tls.fingerprint,
            "clinflow-api listening (HTTPS)"
        ),
    }
    clinflow::telemetry::log_panics_without_their_message();
    // The relay starts at once and keeps trying while RabbitMQ is away:
    // uploads are accepted meanwhile and published when it returns.
    let shutdown = clinflow::shutdown::on_signal();
    let stop_relay = CancellationToken::new();
    let probes = {
        let (db, alive) = (db_for_purge.clone(), relay.handle.clone());
        clinflow::telemetry::Probes::new(move || {
            let db = db.clone();
            async move { vec![("postgres", clinflow::telemetry::database_ready(&db).await)] }
        })
        .with_liveness(move || alive.alive())
    };
    let relay = tokio::spawn(relay.run(stop_relay.clone()));
    // Destroyed data keys leave the cache when erasure commits, in any api.
    clinflow::keys::destroyed::watch_destroyed_keys(&state.db, Arc::clone(&state.keys), shutdown.clone())
        .await
        .context("listening for destroyed data keys")?;
    clinflow::telemetry::serve_ops(config.metrics_addr, probes).await?;
    tokio::spawn(crate::idempotency::purge_periodically(
        db_for_purge,
        config.idempotency_retention,
        std::time::Duration::from_secs(600),
        shutdown.clone(),
    ));
    let served = match config.tls {
        None => serve(listener, state, shutdown).await,
        Some(tls) => serve_tls(listener, state, tls, shutdown).await,
    };
    // Requests are finished: publish what they committed, then stop.
    stop_relay.cancel();
    relay.await.context("the outbox relay panicked")?;
    served?;
    Ok(())
}

async fn migrate() -> anyhow::Result<()> {
    let url = match clinflow::config::optional("MIGRATION_DATABASE_URL")? {
        Some(_) => clinflow::tls::postgres_url("MIGRATION_DATABASE_URL")?,
        None => config::database_url()?,
    };
    let db = PgPoolOptions::new()
        .max_connections(1)
        .connect(url.expose_secret())
        .await
        .context("connecting to PostgreSQL")?;
    clinflow::MIGRATOR.run(&db).await.context("applying migrations")?;
    println!("migrations applied");
    Ok(())
}

async fn create_user(username: &str, role: Role, if_not_exists: bool) -> anyhow::Result<()> {
    let url = config::database_url()?;
    let mut password = String::new();
    std::io::stdin().lock().read_line(&mut password).context("reading the password from stdin")?;
    let password = password.trim_end_matches(['\r', '\n']);
    let db = PgPoolOptions::new()
        .max_connections(1)
        .connect(url.expose_secret())
        .await
        .context("connecting to PostgreSQL")?;
    let passwords = Passwords::new().await?;
    match users::create(&db, &passwords, username, password, role).await {
        Ok(id) => println!("created user {username} ({}) with id {id}", role.as_str()),
        Err(UserError::Exists(_)) if if_not_exists => println!("user {username} exists; unchanged"),
        Err(e) => return Err(e.into()),
    }
    Ok(())
}

async fn reindex_patients() -> anyhow::Result<()> {
    let config = ApiConfig::from_env()?;
    let db = PgPoolOptions::new()
        .max_connections(1)
        .connect(config.database_url.expose_secret())
        .await
        .context("connecting to PostgreSQL")?;
    let keys = Keys::new(config.keyring);
    let index_key = IndexKey::new(config.index_key);
    clinflow::keys::reindex::run(&db, &keys, &index_key).await
}
