//! The `clinflow-worker` command line: without a command it consumes
//! document jobs; the commands are the operators' (`dead-letters`,
//! `reprocess`).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use clinflow::amqp::Topology;
use clinflow::audit::Operator;
use clinflow::config;
use clinflow::deadletters;
use clinflow::deadletters::command::{DeadLetters, DocumentJobs};
use clinflow::documents::reprocess::Reprocess;
use clinflow::keys::Keys;
use clinflow::link::LinkState;
use secrecy::ExposeSecret;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use crate::medcat::MedcatClient;
use crate::telemetry::MedcatHealth;
use crate::worker::{BatchConfig, RetryConfig, SERVICE_NAME, Worker};

clinflow::service_cli!(
    /// Without a command: consume document jobs (configured by environment
    /// variables, see README). The commands are for operators; they print ids
    /// and counts, never document content, and are audited.
    Command
);

#[derive(Subcommand)]
pub enum Command {
    /// Dead-lettered document jobs
    #[command(subcommand)]
    DeadLetters(DeadLetters<DocumentJobs>),
    /// Put documents through the pipeline again (on the backfill lane)
    Reprocess {
        /// Every document
        #[arg(long, conflicts_with_all = ["since", "without_current_model"])]
        all: bool,
        /// Documents uploaded from this date (YYYY-MM-DD, UTC) …
        #[arg(long, value_parser = parse_date, requires = "until")]
        since: Option<time::Date>,
        /// … up to, not including, this date
        #[arg(long, value_parser = parse_date, requires = "since")]
        until: Option<time::Date>,
        /// Documents without a result from the model MedCAT serves now (GET /api/info)
        #[arg(long)]
        without_current_model: bool,
    },
}

/// Runs what `cli` asks for: the worker until SIGTERM, or a command.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        None => work().await,
        Some(command) => operate(command).await,
    }
}

fn parse_date(s: &str) -> Result<time::Date, String> {
    time::Date::parse(s, time::macros::format_description!("[year]-[month]-[day]"))
        .map_err(|_| "expected a date as YYYY-MM-DD".to_owned())
}

fn topology() -> anyhow::Result<Topology> {
    Ok(Topology::new(config::optional("CLINFLOW_QUEUE_PREFIX")?.unwrap_or_else(|| "clinflow".into())))
}

async fn database() -> anyhow::Result<PgPool> {
    let url = clinflow::tls::postgres_url("DATABASE_URL")?;
    PgPoolOptions::new()
        .max_connections(2)
        .connect(url.expose_secret())
        .await
        .context("connecting to PostgreSQL (DATABASE_URL)")
}

async fn operate(command: Command) -> anyhow::Result<()> {
    let amqp_url = clinflow::tls::amqp_url("AMQP_URL")?;
    let topology = topology()?;
    let connection =
        clinflow::amqp::connect(&amqp_url, "clinflow-worker-cli").await.context("connecting to RabbitMQ (AMQP_URL)")?;
    topology.check(&connection).await?;
    let operator = Operator::from_env(SERVICE_NAME)?;
    match command {
        Command::DeadLetters(command) => command.run(&connection, &topology, &operator, database).await?,
        Command::Reprocess { all, since, until, without_current_model } => {
            let which = match (all, since.zip(until), without_current_model) {
                (true, None, false) => Reprocess::All,
                (false, Some((from, to)), false) => {
                    Reprocess::UploadedBetween(from.midnight().assume_utc(), to.midnight().assume_utc())
                }
                (false, None, true) => {
                    let medcat = medcat_client()?;
                    let model = medcat.model_version().await.context("asking MedCAT for its model (MEDCAT_URL)")?;
                    println!("current model: {model}");
                    Reprocess::WithoutResultFrom(model)
                }
                _ => anyhow::bail!("choose one of --all, --since/--until, --without-current-model"),
            };
            let db = database().await?;
            let total = deadletters::reprocess(&connection, &db, &topology, &which, &operator, |n| {
                eprint!("\rqueued {n}");
            })
            .await?;
            eprintln!();
            println!("queued {total} document(s) for processing on the backfill lane");
        }
    }
    let _ = connection.close(200, "done".into()).await;
    Ok(())
}

/// The worker itself, configured by environment variables: consumes until
/// SIGTERM, then finishes the batches in flight, for at most
/// `WORKER_SHUTDOWN_GRACE_S`.
async fn work() -> anyhow::Result<()> {
    let database_url = clinflow::tls::postgres_url("DATABASE_URL")?;
    let amqp_url = clinflow::tls::amqp_url("AMQP_URL")?;
    let medcat = medcat_client()?;
    clinflow::tls::warn_if_plaintext_allowed()?;
    let keyring = config::master_keys()?;
    let audit_signer = Arc::new(clinflow::audit::Signer::from_env("worker")?);
    let metrics_addr = config::socket_addr("METRICS_ADDR", "127.0.0.1:9102")?;
    let batch = BatchConfig::from_env()?;
    let retry = RetryConfig::from_env()?;
    let grace = Duration::from_secs(config::positive("WORKER_SHUTDOWN_GRACE_S", 30)?.into());
    clinflow::telemetry::recorder()?;
    crate::telemetry::register();

    let model_version = medcat.model_version().await.context("asking MedCAT for its model (MEDCAT_URL)")?;
    let db = PgPoolOptions::new()
        .max_connections(u32::from(batch.in_flight) * 2 + 2)
        .connect_with(clinflow::batch_connect_options(database_url.expose_secret())?)
        .await
        .context("connecting to PostgreSQL (DATABASE_URL)")?;
    let keys = Arc::new(Keys::new(keyring));
    let shutdown = clinflow::shutdown::on_signal();
    // Destroyed data keys leave the cache when erasure commits.
    clinflow::keys::destroyed::watch_destroyed_keys(&db, Arc::clone(&keys), shutdown.clone())
        .await
        .context("listening for destroyed data keys")?;
    let worker =
        Arc::new(Worker { db, keys, medcat, model_version, topology: topology()?, audit_signer, batch, retry });
    // RabbitMQ is connected (and reconnected) inside `run`.
    let link = LinkState::default();
    let medcat_health = MedcatHealth::default();
    tokio::spawn(medcat_health.clone().watch(worker.medcat.clone(), Duration::from_secs(5), shutdown.clone()));
    clinflow::telemetry::serve_ops(metrics_addr, probes(&worker.db, &link, &medcat_health)).await?;
    let run = worker.run(&amqp_url, &link, shutdown.clone());
    if let Some(ended) = clinflow::shutdown::with_grace(run, &shutdown, grace).await {
        ended?;
    }
    tracing::info!("worker stopped");
    Ok(())
}

/// Ready = PostgreSQL answers, RabbitMQ is connected and MedCAT says ready.
fn probes(db: &PgPool, link: &LinkState, medcat: &MedcatHealth) -> clinflow::telemetry::Probes {
    let (db, link, medcat) = (db.clone(), link.clone(), medcat.clone());
    clinflow::telemetry::Probes::new(move || {
        let (db, link, medcat) = (db.clone(), link.clone(), medcat.clone());
        async move {
            vec![
                ("postgres", clinflow::telemetry::database_ready(&db).await),
                ("rabbitmq", link.connected()),
                ("medcat", medcat.ready()),
            ]
        }
    })
}

/// The MedCAT of `MEDCAT_URL`, verified against `MEDCAT_CA_FILE` when set.
fn medcat_client() -> anyhow::Result<MedcatClient> {
    let (url, protection) = clinflow::tls::https_url("MEDCAT_URL", "MEDCAT_CA_FILE")?;
    let ca_file = match protection {
        clinflow::tls::Protection::Verified { ca_file } => ca_file,
        clinflow::tls::Protection::Plaintext => None,
    };
    Ok(MedcatClient::new(url.expose_secret(), ca_file.as_deref(), MedcatClient::default_backoff())?)
}
