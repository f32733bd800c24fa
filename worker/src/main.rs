use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clinflow::amqp::Topology;
use clinflow::config;
use clinflow::crypto::Keyring;
use clinflow::link::LinkState;
use clinflow_worker::medcat::MedcatClient;
use clinflow_worker::{BatchConfig, SERVICE_NAME, Worker};
use secrecy::ExposeSecret;
use sqlx::postgres::PgPoolOptions;

#[tokio::main]
async fn main() -> ExitCode {
    clinflow::telemetry::init_tracing();
    if std::env::args().len() > 1 {
        eprintln!("clinflow-worker takes no arguments; configure it with environment variables (see README)");
        return ExitCode::from(2);
    }
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{SERVICE_NAME}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let database_url = config::url("DATABASE_URL", &["postgres", "postgresql"])?;
    let amqp_url = config::url("AMQP_URL", &["amqp", "amqps"])?;
    let medcat_url = config::url("MEDCAT_URL", &["http", "https"])?;
    let master_key = config::master_key()?;
    let prefix = config::optional("CLINFLOW_QUEUE_PREFIX")?.unwrap_or_else(|| "clinflow".into());
    let metrics_addr = config::socket_addr("METRICS_ADDR", "127.0.0.1:9102")?;
    let defaults = BatchConfig::default();
    let batch = BatchConfig {
        size: config::positive("WORKER_BATCH_SIZE", defaults.size)?,
        max_wait: Duration::from_millis(config::positive("WORKER_BATCH_WAIT_MS", 20)?.into()),
        in_flight: config::positive("WORKER_IN_FLIGHT", defaults.in_flight)?,
        ..defaults
    };
    let grace = Duration::from_secs(config::positive("WORKER_SHUTDOWN_GRACE_S", 30)?.into());
    clinflow::telemetry::install_metrics(metrics_addr)?;

    let medcat = MedcatClient::new(medcat_url.expose_secret(), MedcatClient::default_backoff())?;
    let model_version = medcat.model_version().await.context("asking MedCAT for its model (MEDCAT_URL)")?;
    let db = PgPoolOptions::new()
        .max_connections(u32::from(batch.in_flight) * 2 + 2)
        .connect(database_url.expose_secret())
        .await
        .context("connecting to PostgreSQL (DATABASE_URL)")?;
    let worker = Arc::new(Worker {
        db,
        keyring: Arc::new(Keyring::from_master_key(&master_key)),
        medcat,
        model_version,
        topology: Topology::new(prefix),
        batch,
    });
    // RabbitMQ is connected (and reconnected) inside `run`. On SIGTERM the
    // batches in flight are finished, for at most WORKER_SHUTDOWN_GRACE_S.
    let shutdown = clinflow::shutdown::on_signal();
    let link = LinkState::default();
    let run = worker.run(&amqp_url, &link, shutdown.clone());
    if let Some(ended) = clinflow::shutdown::with_grace(run, &shutdown, grace).await {
        ended?;
    }
    tracing::info!("worker stopped");
    Ok(())
}
