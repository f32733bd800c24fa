//! The phases of a run, in order: the ratio rounds against the real
//! MedCAT, then the runs with the STAND-IN (ceiling, upload latency and
//! saturation, lanes, audit sink, backlog), then the clinician queries;
//! `--only` runs one of them (the uploads: the latency and saturation runs).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clinflow::amqp::Topology;

use crate::cli::{Cli, HopsArg, Only};
use crate::notes::Note;
use crate::observe::Observation;
use crate::phases;
use crate::pin;
use crate::plan::Plan;
use crate::report::{self, Figures};
use crate::stack::{self, API, Hops, SINK, Stack, WORKER};
use crate::standin;

/// What every phase reads.
pub(crate) struct Bench<'a> {
    pub(crate) cli: &'a Cli,
    pub(crate) plan: &'a Plan,
    pub(crate) ctx: &'a phases::Context<'a>,
    pub(crate) amqp: &'a lapin::Connection,
    pub(crate) topology: &'a Topology,
    /// Of the `bench-ingest` user.
    pub(crate) password: &'a str,
}

/// Runs the phases, with the services of `stack`; `master_key` is theirs.
pub(crate) async fn measure(b: &Bench<'_>, master_key: &[u8; 32], stack: &mut Stack) -> anyhow::Result<Figures> {
    let mut figures = Figures { hops: stack.hops, ..Figures::default() };
    if matches!(b.cli.only, Some(Only::Queries | Only::Privacy)) {
        stack.start(SINK, &[]).await?;
        stack.start(API, &[]).await?;
        figures.queries = queries_phase(b, stack).await?;
        if b.cli.only == Some(Only::Privacy) {
            figures.privacy = privacy_phase(b, stack).await?;
        }
        return Ok(figures);
    }
    if b.cli.only == Some(Only::Sink) {
        stack.start(SINK, &[]).await?;
        eprintln!("== audit sink: draining {} pre-filled events", b.plan.sink_events);
        figures.sink = Some(phases::sink(b.ctx, stack, b.amqp, b.topology, b.plan.sink_events).await?);
        return Ok(figures);
    }
    let mut client = start(b, stack, &b.cli.medcat_url).await?;
    if b.cli.only == Some(Only::Ceiling) {
        let standins = Standins::start(b).await?;
        ceilings(b, stack, &mut client, &standins, &mut figures).await?;
        return Ok(figures);
    }
    if b.cli.only == Some(Only::Uploads) {
        let standins = Standins::start(b).await?;
        client = restart(b, stack, stack.hops, &standins.url(stack.hops)?).await?;
        uploads(b, stack, &client, &mut figures).await?;
        return Ok(figures);
    }
    ratio(b, stack, &mut client, &mut figures).await?;
    if b.cli.only == Some(Only::Ratio) {
        return Ok(figures);
    }
    with_standin(b, master_key, stack, &mut client, &mut figures).await?;
    figures.queries = queries_phase(b, stack).await?;
    figures.privacy = privacy_phase(b, stack).await?;
    Ok(figures)
}

/// Disclosure lookups among many audit rows, then a purge of many expired
/// documents under paced single uploads (after the queries phase, whose
/// patients' data keys the expired documents use).
async fn privacy_phase(b: &Bench<'_>, stack: &Stack) -> anyhow::Result<Option<report::Privacy>> {
    if b.plan.purge_docs == 0 || b.plan.query_docs == 0 {
        return Ok(None);
    }
    eprintln!(
        "== privacy: disclosures among {} audit rows; purge of {} expired documents under uploads",
        b.plan.disclosure_rows, b.plan.purge_docs
    );
    Ok(Some(crate::privacy::run(b.ctx.db, stack, b.plan, b.password).await?))
}

/// Starts the services, the worker with the NLP service at `medcat_url`,
/// and logs in.
async fn start(b: &Bench<'_>, stack: &mut Stack, medcat_url: &str) -> anyhow::Result<phases::Client> {
    stack.start(SINK, &[]).await?;
    stack.start(WORKER, &[("MEDCAT_URL", medcat_url)]).await?;
    stack.start(API, &[]).await?;
    phases::Client::login(&stack.api_url, "bench-ingest", b.password).await
}

/// The services stopped and started again with `hops`.
async fn restart(b: &Bench<'_>, stack: &mut Stack, hops: Hops, medcat_url: &str) -> anyhow::Result<phases::Client> {
    eprintln!("   (services restarted, {} hops)", hops.name());
    stack.stop_all().await;
    stack.set_hops(hops)?;
    start(b, stack, medcat_url).await
}

/// The hops of ratio round `i` (from 0), in order: with `--hops both`, TLS
/// and plaintext, which comes first alternating (ABBA…), so neither always
/// runs on a machine the other has just warmed or loaded.
fn round_hops(b: &Bench<'_>, i: usize) -> Vec<Hops> {
    match b.cli.hops {
        HopsArg::Both if i.is_multiple_of(2) => vec![Hops::Tls, Hops::Plain],
        HopsArg::Both => vec![Hops::Plain, Hops::Tls],
        HopsArg::Tls => vec![Hops::Tls],
        HopsArg::Plain => vec![Hops::Plain],
    }
}

/// The hops of the ceiling runs, in order: with `--hops both`, `pairs`
/// alternating pairs ending on TLS (… T P P T), which the runs after them
/// keep; else one run.
fn ceiling_hops(b: &Bench<'_>, pairs: usize) -> Vec<Hops> {
    match b.cli.hops {
        HopsArg::Both => (0..pairs)
            .flat_map(|i| {
                if (pairs - 1 - i).is_multiple_of(2) { [Hops::Plain, Hops::Tls] } else { [Hops::Tls, Hops::Plain] }
            })
            .collect(),
        HopsArg::Tls => vec![Hops::Tls],
        HopsArg::Plain => vec![Hops::Plain],
    }
}

/// Batch uploads, as a bulk loader sends them.
fn bulk(plan: &Plan) -> phases::Upload {
    phases::Upload::Batch { lines: plan.batch_lines, clients: plan.batch_clients }
}

/// The warm-up, then the rounds: the same notes straight to MedCAT and
/// through the pipeline, with every process sharing every core and, given
/// MedCAT's process, again with MedCAT alone on core 0; with `--hops both`
/// each round also with plaintext hops, MedCAT placed as for the headline
/// ratio (alone on core 0 where it can be).
async fn ratio(
    b: &Bench<'_>,
    stack: &mut Stack,
    client: &mut phases::Client,
    figures: &mut Figures,
) -> anyhow::Result<()> {
    let (cli, plan, ctx) = (b.cli, b.plan, b.ctx);
    eprintln!("== warm-up");
    phases::direct(&cli.medcat_url, &ctx.notes(0, plan.bulk_batch), plan.bulk_batch).await?;
    let warm_up = ctx.notes(1_000_000_000, 50);
    phases::pipeline(ctx, stack, client, &warm_up, bulk(plan)).await?;

    let round_notes = ctx.notes(0, plan.notes);
    let mut pipeline_busy = Duration::ZERO;
    let mut cpu_before = None;
    let mut stages = Vec::new();
    for round in 1..=plan.rounds {
        for hops in round_hops(b, round - 1) {
            if stack.hops != hops {
                *client = restart(b, stack, hops, &cli.medcat_url).await?;
                // Fresh processes: warmed as at the start.
                phases::pipeline(ctx, stack, client, &warm_up, bulk(plan)).await?;
            }
            let placements: &[bool] = if hops == figures.hops { &[false, true] } else { &[true] };
            for &own_core in placements {
                // The other hops' round falls back to sharing every core.
                let placed = place_medcat(own_core, cli.medcat_pid, stack).or((hops != figures.hops).then_some(None));
                let Some(pinned) = placed else { break };
                let own_core = pinned.is_some();
                let r = one_round(b, stack, client, &round_notes, pinned).await?;
                if !own_core && hops == figures.hops {
                    // The breakdown and CPU table describe the shared rounds.
                    pipeline_busy += r.after.at - r.before.at;
                    report::add_stages(&mut stages, report::stages(&r.before, &r.after));
                    let cpu = cpu_before.get_or_insert_with(BTreeMap::new);
                    for (name, s) in &r.after.cpu_seconds {
                        *cpu.entry(name.clone()).or_insert(0.0) +=
                            s - r.before.cpu_seconds.get(name).copied().unwrap_or(0.0);
                    }
                }
                eprintln!(
                    "== round {round}, {} hops{}: direct {:.0} docs/s, pipeline {:.0} docs/s, ratio {:.3} \
                     (MedCAT waiting for a CPU: {:.0} % of direct, {:.0} % of pipeline)",
                    hops.name(),
                    if own_core { ", MedCAT alone on core 0" } else { ", all sharing every core" },
                    r.direct,
                    r.pipeline,
                    r.pipeline / r.direct,
                    r.direct_wait * 100.0,
                    r.pipeline_wait * 100.0
                );
                figures.rounds.push(report::Round {
                    hops,
                    medcat_own_core: own_core,
                    direct_docs_per_s: r.direct,
                    pipeline_docs_per_s: r.pipeline,
                    direct_medcat_cpu_wait: r.direct_wait,
                    pipeline_medcat_cpu_wait: r.pipeline_wait,
                });
            }
        }
    }
    figures.pipeline_cpu_seconds = cpu_before.unwrap_or_default();
    figures.pipeline_stages = stages;
    figures.pipeline_wall_s = pipeline_busy.as_secs_f64();
    Ok(())
}

/// Where MedCAT runs in a round: `Some(None)` sharing every core,
/// `Some(Some(_))` alone on core 0 (`own_core`), `None` when it cannot be
/// (no MedCAT process given, too few cores, or not allowed to move the
/// others): that round is measured shared only.
fn place_medcat(own_core: bool, medcat_pid: Option<u32>, stack: &Stack) -> Option<Option<pin::Pinned>> {
    match (own_core, medcat_pid) {
        (false, _) => Some(None),
        (true, None) => None,
        (true, Some(pid)) => {
            let services = stack.pids().into_iter().map(|(_, pid)| pid).collect();
            match pin::Pinned::medcat_alone(pid, services) {
                Ok(Some(pinned)) => Some(Some(pinned)),
                Ok(None) => None,
                // E.g. not allowed to move PostgreSQL's processes
                // (another user's): measured shared only.
                Err(e) => {
                    eprintln!("   MedCAT not placed on its own core ({e:#}); this round shared only");
                    None
                }
            }
        }
    }
}

/// One round's measurements: docs/s, and the share of the time MedCAT
/// waited for a CPU, straight and through the pipeline.
struct Round {
    direct: f64,
    direct_wait: f64,
    pipeline: f64,
    pipeline_wait: f64,
    before: Observation,
    after: Observation,
}

async fn one_round(
    b: &Bench<'_>,
    stack: &Stack,
    client: &phases::Client,
    notes: &[Note],
    pinned: Option<pin::Pinned>,
) -> anyhow::Result<Round> {
    // MedCAT's time runnable but without a CPU, per second of each run: on a
    // machine the whole pipeline shares, what it loses to the rest.
    let medcat_wait = || stack::cpu_wait_seconds(&stack.medcat_pids());
    let (wait_0, started) = (medcat_wait(), Instant::now());
    let direct = phases::direct(&b.cli.medcat_url, notes, b.plan.bulk_batch).await?;
    // A thread that exits takes its wait with it: lower bounds.
    let direct_wait = ((medcat_wait() - wait_0) / started.elapsed().as_secs_f64()).max(0.0);
    let before = Observation::take(stack).await?;
    let wait_0 = medcat_wait();
    let pipeline = phases::pipeline(b.ctx, stack, client, notes, bulk(b.plan)).await?;
    let after = Observation::take(stack).await?;
    let pipeline_wait = ((medcat_wait() - wait_0) / (after.at - before.at).as_secs_f64()).max(0.0);
    if let Some(pinned) = pinned {
        pinned.release();
    }
    Ok(Round { direct, direct_wait, pipeline: pipeline.docs_per_s(), pipeline_wait, before, after })
}

/// The NLP STAND-IN, served over HTTPS (for TLS hops) and plain HTTP.
struct Standins {
    tls: Option<String>,
    plain: String,
}

impl Standins {
    async fn start(b: &Bench<'_>) -> anyhow::Result<Self> {
        let tls = match b.cli.tls_cert.as_deref().zip(b.cli.tls_key.as_deref()) {
            Some(files) => Some(standin::start(Some(files)).await?),
            None => None,
        };
        Ok(Self { tls, plain: standin::start(None).await? })
    }

    fn url(&self, hops: Hops) -> anyhow::Result<String> {
        match hops {
            Hops::Tls => self.tls.clone().context("TLS hops need --tls-cert and --tls-key"),
            Hops::Plain => Ok(self.plain.clone()),
        }
    }
}

/// The ceiling: the pipeline with the STAND-IN, batch uploads (with
/// `--hops both` alternated with plaintext hops), each run on freshly
/// started services.
async fn ceilings(
    b: &Bench<'_>,
    stack: &mut Stack,
    client: &mut phases::Client,
    standins: &Standins,
    figures: &mut Figures,
) -> anyhow::Result<()> {
    let (plan, ctx) = (b.plan, b.ctx);
    let mut window = None;
    for hops in ceiling_hops(b, plan.ceiling_pairs) {
        eprintln!("== ceiling: the pipeline with the NLP STAND-IN, batch uploads, {} hops", hops.name());
        *client = restart(b, stack, hops, &standins.url(hops)?).await?;
        phases::pipeline(ctx, stack, client, &ctx.notes(2_000_000_000, 1_000), bulk(plan)).await?;
        let opening = crate::limit::Opening::take(ctx.db).await?;
        let before = Observation::take(stack).await?;
        let ceiling =
            phases::pipeline(ctx, stack, client, &ctx.notes(3_000_000_000, plan.ceiling_notes), bulk(plan)).await?;
        let after = Observation::take(stack).await?;
        if hops == Hops::Tls {
            window = Some(opening.close(ctx.db, plan.ceiling_notes).await?);
        }
        eprintln!("   {:.0} docs/s", ceiling.docs_per_s());
        figures.ceilings.push(report::Ceiling { hops, run: report::Run::new(&ceiling, &before, &after) });
    }
    // The limit: PostgreSQL alone writing the last TLS run's rows, right
    // after the ceilings (the database much as it was then), the services
    // stopped, then started again for what follows.
    if let Some(window) = window {
        stack.stop_all().await;
        eprintln!("== limit: PostgreSQL alone writing the ceiling run's rows ({LIMIT_CONNECTIONS} connections)");
        let limit = crate::limit::run(ctx.db, &window, plan.batch_lines, LIMIT_CONNECTIONS).await?;
        eprintln!("   {:.0} docs/s", limit.docs_per_s);
        figures.limit = Some(limit);
        if b.cli.only != Some(Only::Ceiling) {
            *client = restart(b, stack, stack.hops, &standins.url(stack.hops)?).await?;
        }
    }
    Ok(())
}

/// Writers at once in the limit run: the api's two batch clients, the
/// relay, the worker and the sink write at once in the ceiling run; four
/// connections keep both of this machine's cores busy.
const LIMIT_CONNECTIONS: usize = 4;

/// The runs with the STAND-IN in MedCAT's place: the ceiling, upload
/// latency and saturation, the lanes, the audit sink and (full mode) the
/// backlog.
async fn with_standin(
    b: &Bench<'_>,
    master_key: &[u8; 32],
    stack: &mut Stack,
    client: &mut phases::Client,
    figures: &mut Figures,
) -> anyhow::Result<()> {
    let (plan, ctx, amqp, topology) = (b.plan, b.ctx, b.amqp, b.topology);
    let standins = Standins::start(b).await?;
    ceilings(b, stack, client, &standins, figures).await?;
    let standin = standins.url(stack.hops)?;

    uploads(b, stack, client, figures).await?;

    eprintln!(
        "== lanes: live uploads at {}/s while {} backfill documents drain with the STAND-IN",
        plan.live_rate, plan.lanes_backfill
    );
    figures.lanes = Some(
        phases::lanes(ctx, stack, client, amqp, topology, master_key, &standin, plan.lanes_backfill, plan.live_rate)
            .await?,
    );

    eprintln!("== audit sink: draining {} pre-filled events", plan.sink_events);
    figures.sink = Some(phases::sink(ctx, stack, amqp, topology, plan.sink_events).await?);

    if plan.backlog > 0 {
        eprintln!("== backlog: {} queued documents drained with the STAND-IN", plan.backlog);
        figures.peak_rss_mib.extend(report::peak_rss(stack));
        figures.backlog = Some(phases::backlog(ctx, stack, amqp, topology, master_key, &standin, plan.backlog).await?);
    }
    Ok(())
}

/// Single uploads: at a steady offered load (latency), then back to back
/// (saturation).
async fn uploads(b: &Bench<'_>, stack: &Stack, client: &phases::Client, figures: &mut Figures) -> anyhow::Result<()> {
    let (plan, ctx) = (b.plan, b.ctx);
    let paced = phases::Upload::Paced {
        clients: plan.upload_clients,
        interval: Duration::from_secs_f64(1.0 / plan.upload_rate_per_client),
    };
    eprintln!(
        "== upload latency: {} single uploads, {} clients each sending {}/s",
        plan.latency_uploads, plan.upload_clients, plan.upload_rate_per_client
    );
    // A second of the same load first, unmeasured: each client's connection
    // made (50 TLS handshakes at once held a cold start's first second's
    // requests up to 200 ms: that is connection set-up, not an upload).
    phases::pipeline(ctx, stack, client, &ctx.notes(3_400_000_000, plan.upload_clients * 10), paced).await?;
    // The disk's flush time sampled throughout: a second whose longest
    // request is over 20 ms is put beside the longest flush under way then.
    // The api's stages and PostgreSQL's WAL and checkpointer, each second,
    // to put each slow second down to a stage.
    let probe = crate::disk::FlushProbe::start(&stack.log_dir)?;
    let sampler = crate::stalls::Sampler::start(stack, ctx.db)?;
    let before = Observation::take(stack).await?;
    let latency = phases::pipeline(ctx, stack, client, &ctx.notes(3_500_000_000, plan.latency_uploads), paced).await?;
    let after = Observation::take(stack).await?;
    figures.latency = Some(report::Run::new(&latency, &before, &after));
    figures.latency_seconds = report::seconds(&latency, &probe, &sampler.stop());
    drop(probe);

    eprintln!(
        "== upload saturation: {} single uploads, {} clients back to back",
        plan.saturation_uploads, plan.upload_clients
    );
    let single = phases::Upload::Single { clients: plan.upload_clients };
    let before = Observation::take(stack).await?;
    let saturated =
        phases::pipeline(ctx, stack, client, &ctx.notes(3_700_000_000, plan.saturation_uploads), single).await?;
    let after = Observation::take(stack).await?;
    figures.saturation = Some(report::Run::new(&saturated, &before, &after));
    Ok(())
}

/// The clinician queries over bulk-loaded documents (none with
/// `--query-docs 0`).
async fn queries_phase(b: &Bench<'_>, stack: &Stack) -> anyhow::Result<Option<report::Queries>> {
    let plan = b.plan;
    if plan.query_docs == 0 {
        return Ok(None);
    }
    eprintln!(
        "== clinician queries: {} documents loaded, {} clients × {}/s per endpoint",
        plan.query_docs, plan.query_clients, plan.query_rate_per_client
    );
    Ok(Some(crate::queries::run(b.ctx, stack, plan, &b.cli.concepts).await?))
}
