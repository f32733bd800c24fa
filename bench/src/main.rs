//! clinflow-bench: the harness behind `./bench/run` (see BENCHMARKS.md).
//!
//! In one run, on one machine, side by side: the same notes sent straight to
//! MedCAT's `/api/process_bulk` and through the whole pipeline (the ratio),
//! the pipeline with a STAND-IN for MedCAT (its ceiling, upload latency and
//! the per-stage breakdown), the audit sink draining a pre-filled queue, and
//! in `full` mode a backlog drain, and last the clinician queries over
//! bulk-loaded documents. Figures go to stdout as a table and to
//! `bench/results/*.json`; the last line is the `RESULT` line.

mod disk;
mod notes;
mod phases;
mod pin;
mod prom;
mod queries;
mod report;
mod stack;
mod standin;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, ValueEnum};
use serde::Serialize;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection};

use crate::stack::{API, SINK, Stack, WORKER};

#[derive(Parser)]
#[command(about = "clinflow benchmark harness; run it through ./bench/run")]
struct Cli {
    #[arg(value_enum)]
    mode: Mode,
    /// The real MedCAT (medcat-service contract) to compare against.
    #[arg(long)]
    medcat_url: String,
    /// Its process: with it, each ratio round is measured a second time with
    /// MedCAT alone on core 0 (see `pin`).
    #[arg(long)]
    medcat_pid: Option<u32>,
    /// Where the clinflow-api, -worker and -audit-sink binaries are.
    #[arg(long)]
    bin_dir: PathBuf,
    #[arg(long)]
    results_dir: PathBuf,
    /// Where the services' logs go.
    #[arg(long)]
    log_dir: PathBuf,
    #[arg(long)]
    concepts: PathBuf,
    /// A PostgreSQL superuser on the maintenance database.
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    admin_url: String,
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    amqp_url: String,
    /// The bench's own database (dropped and created afresh) and queue
    /// prefix; another name lets two runs share a machine.
    #[arg(long, default_value = "clinflow_bench", value_parser = plain_name)]
    database: String,
    #[arg(long, default_value = "clinflow-bench", value_parser = plain_name)]
    queue_prefix: String,
    /// Leave the database in place at the end (to inspect plans on the
    /// loaded data); the next run drops it.
    #[arg(long)]
    keep_database: bool,
    /// Documents queued for the backlog drain (full mode).
    #[arg(long)]
    backlog: Option<usize>,
    /// Documents bulk-loaded for the clinician queries (0 skips them).
    #[arg(long)]
    query_docs: Option<usize>,
    /// Requests per second each clinician client sends in the paced query runs.
    #[arg(long)]
    query_rate: Option<f64>,
    /// Run this phase alone.
    #[arg(long, value_enum)]
    only: Option<Only>,
    /// Recorded with the results: the cargo profile the binaries were built with.
    #[arg(long, default_value = "release")]
    profile: String,
}

#[derive(Debug, Clone, Copy, ValueEnum, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Mode {
    /// A few hundred documents, for CI: proves the harness runs, asserts nothing.
    Tiny,
    /// At most 4 minutes here.
    Quick,
    /// Larger runs and the 1,000,000-document backlog drain.
    Full,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Only {
    /// The clinician queries over bulk-loaded documents.
    Queries,
    /// The warm-up and the ratio rounds.
    Ratio,
}

/// How much work each phase does.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// Notes per round of the direct-vs-pipeline comparison.
    pub notes: usize,
    pub rounds: usize,
    /// Documents per `/api/process_bulk` call of the direct client.
    pub bulk_batch: usize,
    /// Notes per `/v1/documents/batch` request, and requests at once, in the
    /// comparison rounds and the ceiling run (a bulk loader's way in).
    pub batch_lines: usize,
    pub batch_clients: usize,
    pub ceiling_notes: usize,
    /// Single-document uploads, and uploaders at once, of the latency runs.
    pub latency_uploads: usize,
    pub upload_clients: usize,
    /// Uploads per second each client sends in the paced latency run.
    pub upload_rate_per_client: f64,
    /// Backfill documents drained during the live-lane run, and the rate of
    /// live uploads meanwhile.
    pub lanes_backfill: usize,
    pub live_rate: f64,
    pub sink_events: usize,
    pub backlog: usize,
    pub note_bytes: usize,
    /// Documents bulk-loaded for the clinician queries (0: none).
    pub query_docs: usize,
    /// Clinicians asking at once (one per care team), each at this rate,
    /// for this many requests per endpoint in all.
    pub query_clients: usize,
    pub query_rate_per_client: f64,
    pub query_requests: usize,
    /// Times each endpoint is measured so (the four in turn, round after
    /// round); its p99 is over all of them, each round's beside it.
    pub query_rounds: usize,
    /// Length of the mixed saturation run.
    pub query_saturation_s: f64,
}

impl Plan {
    fn for_mode(mode: Mode, backlog: Option<usize>, query_docs: Option<usize>) -> Self {
        let base = Plan {
            notes: 3_000,
            rounds: 3,
            bulk_batch: 50,
            batch_lines: 500,
            batch_clients: 2,
            ceiling_notes: 20_000,
            latency_uploads: 3_000,
            upload_clients: 50,
            upload_rate_per_client: 10.0,
            lanes_backfill: 20_000,
            live_rate: 20.0,
            sink_events: 50_000,
            backlog: 0,
            note_bytes: 1_000,
            query_docs: 50_000,
            query_clients: 20,
            query_rate_per_client: 10.0,
            query_requests: 2_000,
            query_rounds: 1,
            query_saturation_s: 10.0,
        };
        let plan = match mode {
            Mode::Tiny => Plan {
                notes: 100,
                rounds: 1,
                ceiling_notes: 500,
                latency_uploads: 300,
                sink_events: 2_000,
                lanes_backfill: 2_000,
                query_docs: 2_000,
                query_requests: 200,
                query_saturation_s: 2.0,
                ..base
            },
            Mode::Quick => base,
            Mode::Full => Plan {
                notes: 10_000,
                rounds: 3,
                ceiling_notes: 100_000,
                latency_uploads: 10_000,
                sink_events: 200_000,
                lanes_backfill: 100_000,
                backlog: 1_000_000,
                query_docs: 1_000_000,
                query_requests: 4_000,
                query_rounds: 3,
                ..base
            },
        };
        Plan { backlog: backlog.unwrap_or(plan.backlog), query_docs: query_docs.unwrap_or(plan.query_docs), ..plan }
    }

    fn with_query_rate(self, rate: Option<f64>) -> Self {
        Plan { query_rate_per_client: rate.unwrap_or(self.query_rate_per_client), ..self }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("clinflow-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A database name or queue prefix: lowercase letters, digits, `_` and `-`
/// (the database name is put into SQL as is).
fn plain_name(s: &str) -> Result<String, String> {
    let ok = !s.is_empty() && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if ok { Ok(s.to_owned()) } else { Err("use lowercase letters, digits, _ and -".into()) }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let started = Instant::now();
    let plan = Plan::for_mode(cli.mode, cli.backlog, cli.query_docs).with_query_rate(cli.query_rate);
    let vocabulary = notes::Vocabulary::load(&cli.concepts)?;
    let owner = fresh_database(&cli.admin_url, &cli.database).await?;
    let admin: PgConnectOptions = cli.admin_url.parse().context("--admin-url")?;
    let (host, port) = (admin.get_host().to_owned(), admin.get_port());
    let database = cli.database.clone();
    let database_url = move |role: &str| format!("postgres://{role}@{host}:{port}/{database}");
    let topology = clinflow::amqp::Topology::new(&cli.queue_prefix);
    let amqp = clinflow::amqp::connect(&cli.amqp_url.clone().into(), "clinflow-bench").await?;
    phases::delete_queues(&amqp, &topology).await;

    let mut master_key = [0u8; 32];
    master_key[..16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    master_key[16..].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    let mut stack = Stack::new(
        cli.bin_dir.clone(),
        cli.log_dir.clone(),
        database_url,
        cli.amqp_url.clone(),
        &cli.queue_prefix,
        &master_key,
    )?;
    stack.medcat_pid = cli.medcat_pid;
    let password = uuid::Uuid::new_v4().to_string();
    stack.create_user("bench-ingest", "ingest", &password).await?;

    let ctx = phases::Context::new(&owner, &vocabulary, &plan);
    let result = measure(&cli, &plan, &ctx, &mut stack, &amqp, &topology, &password, &master_key).await;
    let rss = report::peak_rss(&stack);
    stack.stop_all().await;
    phases::delete_queues(&amqp, &topology).await;
    owner.close().await;
    if cli.keep_database {
        eprintln!("kept database {}", cli.database);
    } else {
        drop_database(&cli.admin_url, &cli.database).await;
    }
    let mut figures = result?;
    figures.peak_rss_mib = rss.into_iter().chain(figures.peak_rss_mib).collect();
    report::print_and_save(&cli.results_dir, cli.mode, &cli.profile, &plan, &figures, started.elapsed())
}

#[allow(clippy::too_many_arguments)]
async fn measure(
    cli: &Cli,
    plan: &Plan,
    ctx: &phases::Context<'_>,
    stack: &mut Stack,
    amqp: &lapin::Connection,
    topology: &clinflow::amqp::Topology,
    password: &str,
    master_key: &[u8; 32],
) -> anyhow::Result<report::Figures> {
    let mut figures = report::Figures::default();
    if cli.only == Some(Only::Queries) {
        stack.start(SINK, &[]).await?;
        stack.start(API, &[]).await?;
        figures.queries = queries_phase(cli, plan, ctx, stack).await?;
        return Ok(figures);
    }
    let real = [("MEDCAT_URL", cli.medcat_url.as_str())];
    stack.start(SINK, &[]).await?;
    stack.start(WORKER, &real).await?;
    stack.start(API, &[]).await?;
    let client = phases::Client::login(&stack.api_url, "bench-ingest", password).await?;

    eprintln!("== warm-up");
    phases::direct(&cli.medcat_url, &ctx.notes(0, plan.bulk_batch), plan.bulk_batch).await?;
    let bulk = phases::Upload::Batch { lines: plan.batch_lines, clients: plan.batch_clients };
    let single = phases::Upload::Single { clients: plan.upload_clients };
    phases::pipeline(ctx, stack, &client, &ctx.notes(1_000_000_000, 50), bulk).await?;

    let round_notes = ctx.notes(0, plan.notes);
    let mut pipeline_busy = std::time::Duration::ZERO;
    let mut cpu_before = None;
    let mut stages = Vec::new();
    // MedCAT's time runnable but without a CPU, per second of each run: on a
    // machine the whole pipeline shares, what it loses to the rest.
    let medcat_wait = || stack::cpu_wait_seconds(&stack.medcat_pids());
    for round in 1..=plan.rounds {
        for own_core in [false, true] {
            let pinned = match (own_core, cli.medcat_pid) {
                (false, _) => None,
                (true, None) => break,
                (true, Some(pid)) => {
                    let services = stack.pids().into_iter().map(|(_, pid)| pid).collect();
                    match pin::Pinned::medcat_alone(pid, services) {
                        Ok(Some(pinned)) => Some(pinned),
                        Ok(None) => break,
                        // E.g. not allowed to move PostgreSQL's processes
                        // (another user's): measured shared only.
                        Err(e) => {
                            eprintln!("   MedCAT not placed on its own core ({e:#}); this round shared only");
                            break;
                        }
                    }
                }
            };
            let (wait_0, started) = (medcat_wait(), Instant::now());
            let direct = phases::direct(&cli.medcat_url, &round_notes, plan.bulk_batch).await?;
            // A thread that exits takes its wait with it: lower bounds.
            let direct_wait = ((medcat_wait() - wait_0) / started.elapsed().as_secs_f64()).max(0.0);
            let before = phases::Observation::take(stack).await?;
            let wait_0 = medcat_wait();
            let pipeline = phases::pipeline(ctx, stack, &client, &round_notes, bulk).await?;
            let after = phases::Observation::take(stack).await?;
            let pipeline_wait = ((medcat_wait() - wait_0) / (after.at - before.at).as_secs_f64()).max(0.0);
            if let Some(pinned) = pinned {
                pinned.release();
            }
            if !own_core {
                // The breakdown and CPU table describe the shared rounds.
                pipeline_busy += after.at - before.at;
                report::add_stages(&mut stages, report::stages(&before, &after));
                let cpu = cpu_before.get_or_insert_with(std::collections::BTreeMap::new);
                for (name, s) in &after.cpu_seconds {
                    *cpu.entry(name.clone()).or_insert(0.0) += s - before.cpu_seconds.get(name).copied().unwrap_or(0.0);
                }
            }
            eprintln!(
                "== round {round}{}: direct {:.0} docs/s, pipeline {:.0} docs/s, ratio {:.3} \
                 (MedCAT waiting for a CPU: {:.0} % of direct, {:.0} % of pipeline)",
                if own_core { ", MedCAT alone on core 0" } else { ", all sharing every core" },
                direct,
                pipeline.docs_per_s(),
                pipeline.docs_per_s() / direct,
                direct_wait * 100.0,
                pipeline_wait * 100.0
            );
            figures.rounds.push(report::Round {
                medcat_own_core: own_core,
                direct_docs_per_s: direct,
                pipeline_docs_per_s: pipeline.docs_per_s(),
                direct_medcat_cpu_wait: direct_wait,
                pipeline_medcat_cpu_wait: pipeline_wait,
            });
        }
    }
    figures.pipeline_cpu_seconds = cpu_before.unwrap_or_default();
    figures.pipeline_stages = stages;
    figures.pipeline_wall_s = pipeline_busy.as_secs_f64();
    if cli.only == Some(Only::Ratio) {
        return Ok(figures);
    }

    eprintln!("== ceiling: the pipeline with the NLP STAND-IN, batch uploads");
    let standin = standin::start().await?;
    stack.stop(WORKER).await?;
    stack.start(WORKER, &[("MEDCAT_URL", standin.as_str())]).await?;
    phases::pipeline(ctx, stack, &client, &ctx.notes(2_000_000_000, 1_000), bulk).await?;
    let before = phases::Observation::take(stack).await?;
    let ceiling = phases::pipeline(ctx, stack, &client, &ctx.notes(3_000_000_000, plan.ceiling_notes), bulk).await?;
    let after = phases::Observation::take(stack).await?;
    figures.ceiling = Some(report::Run::new(&ceiling, &before, &after));

    let paced = phases::Upload::Paced {
        clients: plan.upload_clients,
        interval: std::time::Duration::from_secs_f64(1.0 / plan.upload_rate_per_client),
    };
    eprintln!(
        "== upload latency: {} single uploads, {} clients each sending {}/s",
        plan.latency_uploads, plan.upload_clients, plan.upload_rate_per_client
    );
    let before = phases::Observation::take(stack).await?;
    let latency = phases::pipeline(ctx, stack, &client, &ctx.notes(3_500_000_000, plan.latency_uploads), paced).await?;
    let after = phases::Observation::take(stack).await?;
    figures.latency = Some(report::Run::new(&latency, &before, &after));

    eprintln!(
        "== upload saturation: {} single uploads, {} clients back to back",
        plan.latency_uploads, plan.upload_clients
    );
    let before = phases::Observation::take(stack).await?;
    let saturated =
        phases::pipeline(ctx, stack, &client, &ctx.notes(3_700_000_000, plan.latency_uploads), single).await?;
    let after = phases::Observation::take(stack).await?;
    figures.saturation = Some(report::Run::new(&saturated, &before, &after));

    eprintln!(
        "== lanes: live uploads at {}/s while {} backfill documents drain with the STAND-IN",
        plan.live_rate, plan.lanes_backfill
    );
    figures.lanes = Some(
        phases::lanes(ctx, stack, &client, amqp, topology, master_key, &standin, plan.lanes_backfill, plan.live_rate)
            .await?,
    );

    eprintln!("== audit sink: draining {} pre-filled events", plan.sink_events);
    figures.sink = Some(phases::sink(ctx, stack, amqp, topology, plan.sink_events).await?);

    if plan.backlog > 0 {
        eprintln!("== backlog: {} queued documents drained with the STAND-IN", plan.backlog);
        figures.peak_rss_mib.extend(report::peak_rss(stack));
        figures.backlog = Some(phases::backlog(ctx, stack, amqp, topology, master_key, &standin, plan.backlog).await?);
    }
    figures.queries = queries_phase(cli, plan, ctx, stack).await?;
    Ok(figures)
}

async fn queries_phase(
    cli: &Cli,
    plan: &Plan,
    ctx: &phases::Context<'_>,
    stack: &Stack,
) -> anyhow::Result<Option<report::Queries>> {
    if plan.query_docs == 0 {
        return Ok(None);
    }
    eprintln!(
        "== clinician queries: {} documents loaded, {} clients × {}/s per endpoint",
        plan.query_docs, plan.query_clients, plan.query_rate_per_client
    );
    Ok(Some(queries::run(ctx, stack, plan, &cli.concepts).await?))
}

async fn fresh_database(admin_url: &str, name: &str) -> anyhow::Result<sqlx::PgPool> {
    drop_database(admin_url, name).await;
    let admin: PgConnectOptions = admin_url.parse().context("--admin-url")?;
    let mut conn = admin.connect().await.context("connecting to PostgreSQL as the admin")?;
    sqlx::query(AssertSqlSafe(format!("CREATE DATABASE \"{name}\""))).execute(&mut conn).await?;
    conn.close().await?;
    let owner = PgPoolOptions::new().max_connections(4).connect_with(admin.database(name)).await?;
    clinflow::MIGRATOR.run(&owner).await.context("migrating the bench database")?;
    Ok(owner)
}

async fn drop_database(admin_url: &str, name: &str) {
    let Ok(admin) = admin_url.parse::<PgConnectOptions>() else { return };
    if let Ok(mut conn) = admin.connect().await {
        let sql = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
        if let Err(e) = sqlx::query(AssertSqlSafe(sql)).execute(&mut conn).await {
            eprintln!("dropping {name}: {e}");
        }
    }
}

/// Polls `probe` every `every` until it returns `Some`, or `deadline` passes.
pub async fn wait_for<T, F, Fut>(deadline: Duration, every: Duration, mut probe: F) -> anyhow::Result<Option<T>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let until = Instant::now() + deadline;
    loop {
        if let Some(v) = probe().await? {
            return Ok(Some(v));
        }
        if Instant::now() >= until {
            return Ok(None);
        }
        tokio::time::sleep(every).await;
    }
}
