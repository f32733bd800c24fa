use std::collections::HashSet;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use clinflow::amqp::Topology;
use clinflow::audit::Actor;
use clinflow::config;
use clinflow::deadletters::{self, Selection};
use clinflow::documents::Reprocess;
use clinflow::keys::Keys;
use clinflow::link::LinkState;
use clinflow_worker::medcat::MedcatClient;
use clinflow_worker::telemetry::MedcatHealth;
use clinflow_worker::{BatchConfig, RetryConfig, SERVICE_NAME, Worker};
use secrecy::ExposeSecret;
use sqlx::postgres::PgPoolOptions;
use uuid::Uuid;

/// Without a command: consume document jobs (configured by environment
/// variables, see README). The commands are for operators; they print ids
/// and counts, never document content, and are audited.
#[derive(Parser)]
#[command(name = "clinflow-worker", version)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Dead-lettered document jobs
    #[command(subcommand)]
    DeadLetters(DeadLetters),
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

#[derive(Subcommand)]
enum DeadLetters {
    /// Count the dead-lettered jobs by reason and list their document ids
    List {
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// Put dead-lettered jobs back on their lane (their documents become queued)
    Replay {
        /// Documents whose jobs to replay
        #[arg(long = "id", required_unless_present = "all", conflicts_with = "all")]
        ids: Vec<Uuid>,
        /// Every dead-lettered job
        #[arg(long)]
        all: bool,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    clinflow::telemetry::init_tracing();
    let cli = Cli::parse();
    let result = match cli.command {
        None => run().await,
        Some(command) => operate(command).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{SERVICE_NAME}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn parse_date(s: &str) -> Result<time::Date, String> {
    time::Date::parse(s, time::macros::format_description!("[year]-[month]-[day]"))
        .map_err(|_| "expected a date as YYYY-MM-DD".to_owned())
}

fn topology() -> anyhow::Result<Topology> {
    Ok(Topology::new(config::optional("CLINFLOW_QUEUE_PREFIX")?.unwrap_or_else(|| "clinflow".into())))
}

fn operator() -> Actor {
    Actor::operator(SERVICE_NAME)
}

async fn operate(command: Command) -> anyhow::Result<()> {
    let amqp_url = config::url("AMQP_URL", &["amqp", "amqps"])?;
    let topology = topology()?;
    let connection =
        clinflow::amqp::connect(&amqp_url, "clinflow-worker-cli").await.context("connecting to RabbitMQ")?;
    let channel = connection.create_channel().await?;
    topology.declare(&channel).await?;
    channel.close(200, "declared".into()).await?;
    let database = || async {
        let url = config::url("DATABASE_URL", &["postgres", "postgresql"])?;
        PgPoolOptions::new().max_connections(2).connect(url.expose_secret()).await.context("connecting to PostgreSQL")
    };
    match command {
        Command::DeadLetters(DeadLetters::List { json }) => {
            let listing = deadletters::list(&connection, &topology, &operator()).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&listing)?);
            } else {
                println!("{} dead-lettered job(s)", listing.total);
                for (reason, n) in &listing.by_reason {
                    println!("  {reason}: {n}");
                }
                for job in &listing.jobs {
                    let id = job.document_id.map_or_else(|| "(not a job)".to_owned(), |id| id.to_string());
                    println!("{id}  {}  {}  attempts {}", job.lane, job.reason, job.attempts);
                }
            }
        }
        Command::DeadLetters(DeadLetters::Replay { ids, all }) => {
            let selection =
                if all { Selection::All } else { Selection::Documents(ids.into_iter().collect::<HashSet<_>>()) };
            let db = database().await?;
            let replayed = deadletters::replay(&connection, &db, &topology, &selection, &operator()).await?;
            println!(
                "replayed {}; dropped {} whose document is already done; left {} in the dead-letter queues",
                replayed.replayed.len(),
                replayed.already_done.len(),
                replayed.left
            );
        }
        Command::Reprocess { all, since, until, without_current_model } => {
            let which = match (all, since.zip(until), without_current_model) {
                (true, None, false) => Reprocess::All,
                (false, Some((from, to)), false) => {
                    Reprocess::UploadedBetween(from.midnight().assume_utc(), to.midnight().assume_utc())
                }
                (false, None, true) => {
                    let medcat_url = config::url("MEDCAT_URL", &["http", "https"])?;
                    let medcat = MedcatClient::new(medcat_url.expose_secret(), MedcatClient::default_backoff())?;
                    let model = medcat.model_version().await.context("asking MedCAT for its model (MEDCAT_URL)")?;
                    println!("current model: {model}");
                    Reprocess::WithoutResultFrom(model)
                }
                _ => anyhow::bail!("choose one of --all, --since/--until, --without-current-model"),
            };
            let db = database().await?;
            let total = deadletters::reprocess(&connection, &db, &topology, &which, &operator(), |n| {
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

async fn run() -> anyhow::Result<()> {
    let database_url = config::url("DATABASE_URL", &["postgres", "postgresql"])?;
    let amqp_url = config::url("AMQP_URL", &["amqp", "amqps"])?;
    let medcat_url = config::url("MEDCAT_URL", &["http", "https"])?;
    let keyring = config::master_keys()?;
    let metrics_addr = config::socket_addr("METRICS_ADDR", "127.0.0.1:9102")?;
    let defaults = BatchConfig::default();
    let batch = BatchConfig {
        size: config::positive("WORKER_BATCH_SIZE", defaults.size)?,
        max_wait: Duration::from_millis(
            config::positive("WORKER_BATCH_WAIT_MS", defaults.max_wait.as_millis() as u16)?.into(),
        ),
        in_flight: config::positive("WORKER_IN_FLIGHT", defaults.in_flight)?,
        ..defaults
    };
    let retry_defaults = RetryConfig::default();
    let retry = RetryConfig {
        max_attempts: config::positive("WORKER_MAX_ATTEMPTS", retry_defaults.max_attempts as u16)?.into(),
        first_delay: Duration::from_secs(config::positive("WORKER_RETRY_DELAY_S", 30)?.into()),
        ..retry_defaults
    };
    let grace = Duration::from_secs(config::positive("WORKER_SHUTDOWN_GRACE_S", 30)?.into());
    clinflow::telemetry::recorder()?;
    clinflow_worker::telemetry::register();

    let medcat = MedcatClient::new(medcat_url.expose_secret(), MedcatClient::default_backoff())?;
    let model_version = medcat.model_version().await.context("asking MedCAT for its model (MEDCAT_URL)")?;
    let db = PgPoolOptions::new()
        .max_connections(u32::from(batch.in_flight) * 2 + 2)
        .connect_with(clinflow::batch_connect_options(database_url.expose_secret())?)
        .await
        .context("connecting to PostgreSQL (DATABASE_URL)")?;
    let worker = Arc::new(Worker {
        db,
        keys: Arc::new(Keys::new(keyring)),
        medcat,
        model_version,
        topology: topology()?,
        batch,
        retry,
    });
    // RabbitMQ is connected (and reconnected) inside `run`. On SIGTERM the
    // batches in flight are finished, for at most WORKER_SHUTDOWN_GRACE_S.
    let shutdown = clinflow::shutdown::on_signal();
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
fn probes(db: &sqlx::PgPool, link: &LinkState, medcat: &MedcatHealth) -> clinflow::telemetry::Probes {
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
