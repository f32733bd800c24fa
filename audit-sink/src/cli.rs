//! The `clinflow-audit-sink` command line: consume audit events (the
//! default), `verify` the chain, or work on its `dead-letters`.

use anyhow::Context;
use clap::Subcommand;
use clinflow::amqp::Topology;
use clinflow::audit::Operator;
use clinflow::audit::signing::{PublicKeys, Signer};
use clinflow::chain::{self, ChainKey, Trust};
use clinflow::checkpoint::{self, CheckpointConfig, Checkpointer};
use clinflow::config;
use clinflow::deadletters::command::{AuditMessages, DeadLetters};
use clinflow::link::LinkState;
use secrecy::ExposeSecret;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use crate::archive::{self, Archiver};
use crate::sink::{SERVICE_NAME, Sink};
use crate::telemetry::Verifier;

clinflow::service_cli!(
    /// Writes audit events to the append-only, hash-chained audit table.
    Command
);

#[derive(Subcommand)]
pub enum Command {
    /// Consume audit events (the default).
    Run,
    /// Walk the hash chain and report the first broken row, if any: every
    /// event's signature, every link and hash, the sink's signed heads; with
    /// checkpoints (default: AUDIT_CHECKPOINT_FILE), also that the table
    /// still holds every checkpointed row. Needs public keys only.
    Verify {
        #[arg(long, value_name = "FILE")]
        checkpoints: Option<std::path::PathBuf>,
        /// The directory of `<key id>.pem` public keys, the producers' and
        /// the sink's (default: AUDIT_PUBLIC_KEYS).
        #[arg(long, visible_alias = "public-key", value_name = "DIR")]
        public_keys: Option<std::path::PathBuf>,
        /// Verify archive files offline instead (no database): each one's
        /// checksum, chain, signatures and checkpoints; several given in
        /// order (oldest first) must also follow one another.
        #[arg(long, value_name = "FILE")]
        archive: Vec<std::path::PathBuf>,
    },
    /// Archive the months past the hot window (AUDIT_ARCHIVE_HOT_MONTHS,
    /// default 13 with the current one) to checksummed, compressed files
    /// with their checkpoints, each verified and recorded; with `--drop`,
    /// then drop from the table the oldest archived months that ended more
    /// than AUDIT_LOG_RETENTION_DAYS ago (at least 2555). Runs as the sink
    /// (DATABASE_URL, AUDIT_SIGNING_KEY); safe to run again.
    Archive {
        /// Where the archive files are written (and looked for by `--drop`).
        #[arg(long, value_name = "DIR")]
        out: std::path::PathBuf,
        /// Archive only the months before this one (YYYY-MM); never a month
        /// of the hot window.
        #[arg(long, value_name = "YYYY-MM")]
        before: Option<String>,
        /// Then drop the months past retention, oldest first.
        #[arg(long)]
        drop: bool,
        /// The public keys the archives are verified with (default:
        /// AUDIT_PUBLIC_KEYS).
        #[arg(long, value_name = "DIR")]
        public_keys: Option<std::path::PathBuf>,
        /// Write the run's results here for a Prometheus textfile collector.
        #[arg(long, value_name = "FILE")]
        metrics_file: Option<std::path::PathBuf>,
    },
    /// Audit messages the sink could not store (ids, reasons and sizes only)
    #[command(subcommand)]
    DeadLetters(DeadLetters<AuditMessages>),
}

/// Runs what `cli` asks for.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => consume().await,
        Command::Verify { checkpoints, public_keys, archive } if !archive.is_empty() => {
            verify_archives(&archive, public_keys, checkpoints.is_some())
        }
        Command::Verify { checkpoints, public_keys, .. } => verify(checkpoints, public_keys).await,
        Command::Archive { out, before, drop, public_keys, metrics_file } => {
            archive(out, before, drop, public_keys, metrics_file).await
        }
        Command::DeadLetters(command) => dead_letters(command).await,
    }
}

async fn connect_db() -> anyhow::Result<PgPool> {
    connect_as("DATABASE_URL").await
}

async fn connect_as(variable: &'static str) -> anyhow::Result<PgPool> {
    let url = clinflow::tls::postgres_url(variable)?;
    PgPoolOptions::new()
        .max_connections(4)
        .connect_with(clinflow::batch_connect_options(url.expose_secret())?)
        .await
        .with_context(|| format!("connecting to PostgreSQL ({variable})"))
}

/// The sink itself, configured by environment variables, until SIGTERM.
async fn consume() -> anyhow::Result<()> {
    let amqp_url = clinflow::tls::amqp_url("AMQP_URL")?;
    clinflow::tls::warn_if_plaintext_allowed()?;
    let signer = Signer::from_env(chain::SINK_PRODUCER)?;
    let mut keys = PublicKeys::from_env(PUBLIC_KEYS)?
        .ok_or_else(|| anyhow::anyhow!("{PUBLIC_KEYS}: is not set (the directory of the producers' public keys)"))?;
    keys.insert(signer.key_id(), signer.verifying_key());
    let prefix = config::optional("CLINFLOW_QUEUE_PREFIX")?.unwrap_or_else(|| "clinflow".into());
    let metrics_addr = config::socket_addr("METRICS_ADDR", "127.0.0.1:9103")?;
    // The sink never deletes; refusing a shorter retention here keeps the
    // deployment's setting honest for the archive runs it shares.
    archive::retention_days()?;
    let hot_months = archive::hot_months()?;
    clinflow::telemetry::recorder()?;
    crate::telemetry::register();
    archive::register();
    let db = connect_db().await?;
    // This month's and next month's partitions, before any batch needs them.
    archive::ensure_partitions(&db, hot_months).await.context("creating the audit partitions ahead")?;
    let verify_every = config::optional("AUDIT_VERIFY_SECONDS")?
        .map(|v| v.trim().parse::<u64>())
        .transpose()
        .map_err(|_| anyhow::anyhow!("AUDIT_VERIFY_SECONDS must be a whole number of seconds (0: never)"))?
        .unwrap_or(60);
    let batch_size = usize::from(config::positive("AUDIT_BATCH_SIZE", 256)?);
    let max_wait = std::time::Duration::from_millis(config::positive("AUDIT_BATCH_WAIT_MS", 50)?.into());
    let checkpoints = checkpointer()?;
    let verifier = Verifier {
        db: db.clone(),
        trust: Trust { keys: keys.clone(), legacy: legacy_key()? },
        checkpoints: config::optional("AUDIT_CHECKPOINT_FILE")?.map(Into::into),
        every: (verify_every > 0).then(|| std::time::Duration::from_secs(verify_every)),
    };
    let link = LinkState::default();
    let shutdown = clinflow::shutdown::on_signal();
    clinflow::telemetry::serve_ops(metrics_addr, probes(&db, &link)).await?;
    tokio::spawn(verifier.run(shutdown.clone()));
    tokio::spawn(crate::telemetry::keep_partitions_ahead(db.clone(), hot_months, shutdown.clone()));
    let sink = Sink {
        db,
        signer: std::sync::Arc::new(signer),
        keys,
        topology: Topology::new(prefix),
        batch_size,
        max_wait,
        checkpoints,
    };
    // RabbitMQ is connected (and reconnected) inside `run`.
    sink.run(&amqp_url, &link, shutdown).await
}

/// The checkpoint writer of `AUDIT_CHECKPOINT_FILE`, if it is set.
fn checkpointer() -> anyhow::Result<Option<tokio::sync::Mutex<Checkpointer>>> {
    match config::optional("AUDIT_CHECKPOINT_FILE")? {
        Some(path) => Ok(Some(tokio::sync::Mutex::new(Checkpointer::new(CheckpointConfig {
            path: path.into(),
            every_events: config::positive("AUDIT_CHECKPOINT_EVERY", 1000)?.into(),
            every: std::time::Duration::from_secs(config::positive("AUDIT_CHECKPOINT_SECONDS", 60)?.into()),
        })))),
        None => {
            tracing::warn!(
                "AUDIT_CHECKPOINT_FILE is not set: no external checkpoints, so deleting the newest audit rows \
                 would go unnoticed by verify"
            );
            Ok(None)
        }
    }
}

/// Ready = PostgreSQL answers and RabbitMQ is connected.
fn probes(db: &PgPool, link: &LinkState) -> clinflow::telemetry::Probes {
    let (db, link) = (db.clone(), link.clone());
    clinflow::telemetry::Probes::new(move || {
        let (db, link) = (db.clone(), link.clone());
        async move { vec![("postgres", clinflow::telemetry::database_ready(&db).await), ("rabbitmq", link.connected())] }
    })
}

/// Where the public keys are: a directory of `<key id>.pem`.
const PUBLIC_KEYS: &str = "AUDIT_PUBLIC_KEYS";

/// The HMAC key of format-1 rows and checkpoints, written before events
/// were signed (`AUDIT_HMAC_KEY`, needed only where such rows exist).
fn legacy_key() -> anyhow::Result<Option<ChainKey>> {
    Ok(match config::optional("AUDIT_HMAC_KEY")? {
        Some(_) => Some(ChainKey::new(config::secret_bytes("AUDIT_HMAC_KEY")?)),
        None => None,
    })
}

async fn verify(
    checkpoints: Option<std::path::PathBuf>,
    public_keys: Option<std::path::PathBuf>,
) -> anyhow::Result<()> {
    let keys = match public_keys {
        Some(dir) => PublicKeys::from_dir(&dir).map_err(anyhow::Error::msg)?,
        None => PublicKeys::from_env(PUBLIC_KEYS)?
            .ok_or_else(|| anyhow::anyhow!("give --public-keys DIR or set {PUBLIC_KEYS}"))?,
    };
    let trust = Trust { keys, legacy: legacy_key()? };
    let checkpoints = match checkpoints {
        Some(path) => Some(path),
        None => config::optional("AUDIT_CHECKPOINT_FILE")?.map(Into::into),
    };
    // Verifying only reads: as the read-only audit role when one is given.
    let db = match config::optional("AUDIT_READER_DATABASE_URL")? {
        Some(_) => connect_as("AUDIT_READER_DATABASE_URL").await?,
        None => connect_db().await?,
    };
    let rows = chain::verify(&db, &trust).await?;
    match checkpoints {
        Some(path) => {
            let read = checkpoint::read(&path, &trust)?;
            checkpoint::check(&db, rows, &read).await?;
            let newest = read.iter().map(|c| c.seq).max().unwrap_or(0);
            println!("audit chain intact: {rows} events; {} checkpoints hold (newest at seq {newest})", read.len());
        }
        None => println!("audit chain intact: {rows} events (no checkpoints given: the newest rows are not anchored)"),
    }
    Ok(())
}

async fn dead_letters(command: DeadLetters<AuditMessages>) -> anyhow::Result<()> {
    let amqp_url = clinflow::tls::amqp_url("AMQP_URL")?;
    let prefix = config::optional("CLINFLOW_QUEUE_PREFIX")?.unwrap_or_else(|| "clinflow".into());
    let topology = Topology::new(prefix);
    let connection = clinflow::amqp::connect(&amqp_url, "clinflow-audit-sink-cli").await?;
    topology.check(&connection).await?;
    command.run(&connection, &topology, &Operator::from_env(SERVICE_NAME)?).await?;
    let _ = connection.close(200, "done".into()).await;
    Ok(())
}

/// The public keys from `--public-keys DIR` or AUDIT_PUBLIC_KEYS.
fn public_keys(dir: Option<std::path::PathBuf>) -> anyhow::Result<PublicKeys> {
    match dir {
        Some(dir) => PublicKeys::from_dir(&dir).map_err(anyhow::Error::msg),
        None => PublicKeys::from_env(PUBLIC_KEYS)?
            .ok_or_else(|| anyhow::anyhow!("give --public-keys DIR or set {PUBLIC_KEYS}")),
    }
}

/// `verify --archive FILE…`: offline, public keys only.
fn verify_archives(
    files: &[std::path::PathBuf],
    keys: Option<std::path::PathBuf>,
    checkpoints_given: bool,
) -> anyhow::Result<()> {
    if checkpoints_given {
        anyhow::bail!("--checkpoints is for the table: an archive carries its own checkpoints file");
    }
    let trust = Trust { keys: public_keys(keys)?, legacy: legacy_key()? };
    let mut previous: Option<chain::Head> = None;
    for file in files {
        let verified = archive::verify(file, &trust, previous.as_ref())
            .with_context(|| format!("archive {} does not verify", file.display()))?;
        println!(
            "archive {} intact: seq {}..{} ({} events), checksum {}, {} checkpoints hold{}",
            file.display(),
            verified.first_seq,
            verified.last.seq,
            verified.rows,
            verified.sha256,
            verified.checkpoints,
            if previous.is_some() { ", follows the archive before it" } else { "" },
        );
        previous = Some(verified.last);
    }
    Ok(())
}

async fn archive(
    out: std::path::PathBuf,
    before: Option<String>,
    drop: bool,
    keys: Option<std::path::PathBuf>,
    metrics_file: Option<std::path::PathBuf>,
) -> anyhow::Result<()> {
    let retention = archive::retention_days()?;
    let hot_start = archive::hot_window_start(archive::hot_months()?);
    let cutoff = match before {
        Some(text) => {
            let month = archive::parse_month(&text).ok_or_else(|| anyhow::anyhow!("--before {text}: not YYYY-MM"))?;
            if month > hot_start {
                anyhow::bail!(
                    "--before {text} reaches into the hot window: months from {} on stay in the table \
                     (AUDIT_ARCHIVE_HOT_MONTHS)",
                    archive::month_name(hot_start)
                );
            }
            month
        }
        None => hot_start,
    };
    let signer = Signer::from_env(chain::SINK_PRODUCER)?;
    let mut keys = public_keys(keys)?;
    keys.insert(signer.key_id(), signer.verifying_key());
    let trust = Trust { keys, legacy: legacy_key()? };
    let checkpoint_file: Option<std::path::PathBuf> = config::optional("AUDIT_CHECKPOINT_FILE")?.map(Into::into);
    let db = connect_db().await?;
    let archiver =
        Archiver { db: &db, trust: &trust, signer: &signer, dir: &out, checkpoint_file: checkpoint_file.as_deref() };
    let mut run = archive::RunMetrics::default();
    let mut failure = None;
    for month in archive::partitions(&db).await?.into_iter().filter(|m| *m < cutoff) {
        let name = archive::month_name(month);
        match archiver.archive(month).await {
            Ok(outcome) => {
                println!("{name}: {outcome:?}");
                run.count(&outcome);
            }
            Err(e) => {
                // The later months wait: their chain follows this one.
                eprintln!("{name}: not archived: {e}");
                run.failed += 1;
                failure = Some(e);
                break;
            }
        }
    }
    if drop && failure.is_none() {
        let now = time::OffsetDateTime::now_utc();
        for month in archive::partitions(&db).await? {
            let ended = archive::add_months(month, 1).midnight().assume_utc();
            if month >= cutoff || ended + time::Duration::days(retention.into()) > now {
                break;
            }
            let name = archive::month_name(month);
            match archiver.drop_month(month, retention).await {
                Ok(outcome) => {
                    println!("{name}: {outcome:?}");
                    run.count(&outcome);
                }
                Err(e) => {
                    eprintln!("{name}: not dropped: {e}");
                    run.failed += 1;
                    failure = Some(e);
                    break;
                }
            }
        }
    }
    if let Some(path) = metrics_file {
        run.write(&path)?;
    }
    match failure {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}
