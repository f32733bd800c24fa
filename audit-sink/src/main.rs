use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use clinflow::amqp::Topology;
use clinflow::audit::Actor;
use clinflow::config;
use clinflow::deadletters;
use clinflow::link::LinkState;
use clinflow_audit_sink::chain::{self, ChainKey};
use clinflow_audit_sink::checkpoint::{self, CheckpointConfig, Checkpointer};
use clinflow_audit_sink::telemetry::Verifier;
use clinflow_audit_sink::{SERVICE_NAME, Sink};
use secrecy::ExposeSecret;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

/// Writes audit events to the append-only, hash-chained audit table.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Consume audit events (the default).
    Run,
    /// Walk the hash chain and report the first broken row, if any; with
    /// checkpoints (default: AUDIT_CHECKPOINT_FILE), also that the table
    /// still holds every checkpointed row.
    Verify {
        #[arg(long, value_name = "FILE")]
        checkpoints: Option<std::path::PathBuf>,
    },
    /// Audit messages the sink could not store (ids, reasons and sizes only)
    #[command(subcommand)]
    DeadLetters(DeadLetters),
}

#[derive(Subcommand)]
enum DeadLetters {
    /// Count the parked messages by reason and list their ids
    List {
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// Put parked messages back on the audit queue (each event is stored once)
    Replay {
        /// Message (event) ids to replay
        #[arg(long = "id", required_unless_present = "all", conflicts_with = "all")]
        ids: Vec<String>,
        /// Every parked message
        #[arg(long)]
        all: bool,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    clinflow::telemetry::init_tracing();
    let result = match Cli::parse().command.unwrap_or(Command::Run) {
        Command::Run => run().await,
        Command::Verify { checkpoints } => verify(checkpoints).await,
        Command::DeadLetters(command) => dead_letters(command).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{SERVICE_NAME}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn connect_db() -> anyhow::Result<PgPool> {
    connect_as("DATABASE_URL").await
}

async fn connect_as(variable: &'static str) -> anyhow::Result<PgPool> {
    let url = config::url(variable, &["postgres", "postgresql"])?;
    PgPoolOptions::new()
        .max_connections(4)
        .connect_with(clinflow::batch_connect_options(url.expose_secret())?)
        .await
        .with_context(|| format!("connecting to PostgreSQL ({variable})"))
}

async fn run() -> anyhow::Result<()> {
    let amqp_url = config::url("AMQP_URL", &["amqp", "amqps"])?;
    let key = ChainKey::new(config::secret_bytes("AUDIT_HMAC_KEY")?);
    let prefix = config::optional("CLINFLOW_QUEUE_PREFIX")?.unwrap_or_else(|| "clinflow".into());
    let metrics_addr = config::socket_addr("METRICS_ADDR", "127.0.0.1:9103")?;
    clinflow::telemetry::recorder()?;
    clinflow_audit_sink::telemetry::register();
    let db = connect_db().await?;
    let verify_every = config::optional("AUDIT_VERIFY_SECONDS")?
        .map(|v| v.trim().parse::<u64>())
        .transpose()
        .map_err(|_| anyhow::anyhow!("AUDIT_VERIFY_SECONDS must be a whole number of seconds (0: never)"))?
        .unwrap_or(60);
    let batch_size = usize::from(config::positive("AUDIT_BATCH_SIZE", 256)?);
    let max_wait = std::time::Duration::from_millis(config::positive("AUDIT_BATCH_WAIT_MS", 50)?.into());
    let checkpoints = match config::optional("AUDIT_CHECKPOINT_FILE")? {
        Some(path) => Some(tokio::sync::Mutex::new(Checkpointer::new(CheckpointConfig {
            path: path.into(),
            every_events: config::positive("AUDIT_CHECKPOINT_EVERY", 1000)?.into(),
            every: std::time::Duration::from_secs(config::positive("AUDIT_CHECKPOINT_SECONDS", 60)?.into()),
        }))),
        None => {
            tracing::warn!(
                "AUDIT_CHECKPOINT_FILE is not set: no external checkpoints, so deleting the newest audit rows \
                 would go unnoticed by verify"
            );
            None
        }
    };
    let verifier = Verifier {
        db: db.clone(),
        key: ChainKey::new(config::secret_bytes("AUDIT_HMAC_KEY")?),
        checkpoints: config::optional("AUDIT_CHECKPOINT_FILE")?.map(Into::into),
        every: (verify_every > 0).then(|| std::time::Duration::from_secs(verify_every)),
    };
    let link = LinkState::default();
    let shutdown = clinflow::shutdown::on_signal();
    clinflow::telemetry::serve_ops(metrics_addr, probes(&db, &link)).await?;
    tokio::spawn(verifier.run(shutdown.clone()));
    let sink = Sink { db, key, topology: Topology::new(prefix), batch_size, max_wait, checkpoints };
    // RabbitMQ is connected (and reconnected) inside `run`.
    sink.run(&amqp_url, &link, shutdown).await
}

/// Ready = PostgreSQL answers and RabbitMQ is connected.
fn probes(db: &PgPool, link: &LinkState) -> clinflow::telemetry::Probes {
    let (db, link) = (db.clone(), link.clone());
    clinflow::telemetry::Probes::new(move || {
        let (db, link) = (db.clone(), link.clone());
        async move { vec![("postgres", clinflow::telemetry::database_ready(&db).await), ("rabbitmq", link.connected())] }
    })
}

async fn verify(checkpoints: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    let key = ChainKey::new(config::secret_bytes("AUDIT_HMAC_KEY")?);
    let checkpoints = match checkpoints {
        Some(path) => Some(path),
        None => config::optional("AUDIT_CHECKPOINT_FILE")?.map(Into::into),
    };
    // Verifying only reads: as the read-only audit role when one is given.
    let db = match config::optional("AUDIT_READER_DATABASE_URL")? {
        Some(_) => connect_as("AUDIT_READER_DATABASE_URL").await?,
        None => connect_db().await?,
    };
    let rows = chain::verify(&db, &key).await?;
    match checkpoints {
        Some(path) => {
            let read = checkpoint::read(&path, &key)?;
            checkpoint::check(&db, rows, &read).await?;
            let newest = read.iter().map(|c| c.seq).max().unwrap_or(0);
            println!("audit chain intact: {rows} events; {} checkpoints hold (newest at seq {newest})", read.len());
        }
        None => println!("audit chain intact: {rows} events (no checkpoints given: the newest rows are not anchored)"),
    }
    Ok(())
}

async fn dead_letters(command: DeadLetters) -> anyhow::Result<()> {
    let amqp_url = config::url("AMQP_URL", &["amqp", "amqps"])?;
    let prefix = config::optional("CLINFLOW_QUEUE_PREFIX")?.unwrap_or_else(|| "clinflow".into());
    let topology = Topology::new(prefix);
    let connection = clinflow::amqp::connect(&amqp_url, "clinflow-audit-sink-cli").await?;
    let channel = connection.create_channel().await?;
    topology.declare(&channel).await?;
    channel.close(200, "declared".into()).await?;
    let operator = Actor::operator(SERVICE_NAME);
    match command {
        DeadLetters::List { json } => {
            let listing = deadletters::list_audit(&connection, &topology, &operator).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&listing)?);
            } else {
                println!("{} parked audit message(s)", listing.total);
                for (reason, n) in &listing.by_reason {
                    println!("  {reason}: {n}");
                }
                for m in &listing.messages {
                    println!(
                        "{}  {}  {} bytes",
                        if m.message_id.is_empty() { "(no id)" } else { &m.message_id },
                        m.reason,
                        m.bytes
                    );
                }
            }
        }
        DeadLetters::Replay { ids, all } => {
            let ids: std::collections::HashSet<String> = ids.into_iter().collect();
            let selection = if all { None } else { Some(&ids) };
            let n = deadletters::replay_audit(&connection, &topology, selection, &operator).await?;
            println!("replayed {n} audit message(s)");
        }
    }
    let _ = connection.close(200, "done".into()).await;
    Ok(())
}
