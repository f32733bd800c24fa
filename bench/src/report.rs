//! The figures: the table on stdout, the JSON under `bench/results/`, and
//! the `RESULT` line.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use crate::cli::Mode;
use crate::observe::{Observation, PipelineRun};
use crate::plan::Plan;
use crate::stack::{self, API, Hops, SINK, Stack, WORKER};

#[derive(Debug, Default, Serialize)]
pub struct Figures {
    /// How the services' connections were carried for the headline figures
    /// (and every run but the other hops' ratio rounds and ceiling runs).
    pub hops: Hops,
    pub rounds: Vec<Round>,
    /// CPU seconds each process used during the pipeline rounds (real MedCAT).
    pub pipeline_cpu_seconds: BTreeMap<String, f64>,
    pub pipeline_stages: Vec<Stage>,
    pub pipeline_wall_s: f64,
    /// In the order run (with `--hops both` TLS and plaintext alternated).
    pub ceilings: Vec<Ceiling>,
    /// Single uploads at a steady offered load (the p99 target's run).
    pub latency: Option<Run>,
    /// The latency run second by second.
    pub latency_seconds: Vec<Second>,
    /// Single uploads back to back: what the machine can take, and the
    /// latency queueing then adds.
    pub saturation: Option<Run>,
    pub sink: Option<Sink>,
    pub lanes: Option<Lanes>,
    pub backlog: Option<Backlog>,
    pub queries: Option<Queries>,
    pub privacy: Option<Privacy>,
    /// PostgreSQL alone writing the last TLS ceiling run's rows.
    pub limit: Option<crate::limit::Limit>,
    pub peak_rss_mib: BTreeMap<String, f64>,
}

/// Disclosure lookups among many audit rows, and a purge under uploads.
#[derive(Debug, Serialize)]
pub struct Privacy {
    pub audit_rows: i64,
    pub audit_load_s: f64,
    pub disclosure_requests: usize,
    pub disclosure_clients: usize,
    pub disclosure_p50_ms: f64,
    pub disclosure_p99_ms: f64,
    pub disclosure_max_ms: f64,
    pub purge_docs: i64,
    pub purge_s: f64,
    pub purge_docs_per_s: f64,
    /// Single uploads' latency, paced, without a purge and during one.
    pub uploads_without: Uploads,
    pub uploads_during: Uploads,
}

#[derive(Debug, Serialize, Default)]
pub struct Uploads {
    pub count: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

#[derive(Debug, Serialize)]
pub struct Round {
    pub hops: Hops,
    /// MedCAT alone on core 0, the rest on the others (`pin`); else every
    /// process shares every core.
    pub medcat_own_core: bool,
    pub direct_docs_per_s: f64,
    pub pipeline_docs_per_s: f64,
    /// Seconds MedCAT's threads were runnable but waited for a CPU, per
    /// second of the direct run and of the pipeline run.
    pub direct_medcat_cpu_wait: f64,
    pub pipeline_medcat_cpu_wait: f64,
}

/// One ceiling run (stand-in NLP) and the hops it ran with.
#[derive(Debug, Serialize)]
pub struct Ceiling {
    pub hops: Hops,
    #[serde(flatten)]
    pub run: Run,
}

#[derive(Debug, Serialize)]
/// One pipeline run with its breakdown: the ceiling run, or the latency run.
pub struct Run {
    pub docs: usize,
    pub docs_per_s: f64,
    pub upload_docs_per_s: f64,
    pub upload_p50_ms: f64,
    pub upload_p99_ms: f64,
    pub upload_p999_ms: f64,
    pub upload_max_ms: f64,
    pub wall_s: f64,
    pub stages: Vec<Stage>,
    /// CPU seconds each process used during the run (2 cores = 2 s per second).
    pub cpu_seconds: BTreeMap<String, f64>,
}

/// One second of the paced latency run: its longest request (by send
/// time) and the longest disk flush under way in it.
#[derive(Debug, Serialize)]
pub struct Second {
    pub second: usize,
    pub requests: usize,
    pub longest_request_ms: f64,
    pub longest_flush_ms: f64,
    /// Where a second with a request over 20 ms went (none: no samples).
    pub attribution: Option<crate::stalls::Attribution>,
}

/// The run's seconds, from its first request to its last.
pub fn seconds(run: &PipelineRun, probe: &crate::disk::FlushProbe, samples: &crate::stalls::Samples) -> Vec<Second> {
    let n = run.upload_sent.iter().map(|s| s.as_secs() as usize + 1).max().unwrap_or(0);
    let mut out: Vec<Second> = (0..n)
        .map(|second| {
            let from = run.started + Duration::from_secs(second as u64);
            let longest_flush_ms = probe.longest(from, from + Duration::from_secs(1)).as_secs_f64() * 1e3;
            Second { second, requests: 0, longest_request_ms: 0.0, longest_flush_ms, attribution: None }
        })
        .collect();
    for (sent, took) in run.upload_sent.iter().zip(&run.upload_latencies) {
        let s = &mut out[sent.as_secs() as usize];
        s.requests += 1;
        s.longest_request_ms = s.longest_request_ms.max(took.as_secs_f64() * 1e3);
    }
    for s in out.iter_mut().filter(|s| s.longest_request_ms > 20.0) {
        let from = run.started + Duration::from_secs(s.second as u64);
        s.attribution = samples.attribute(from, from + Duration::from_secs(1), s.longest_flush_ms);
    }
    out
}

#[derive(Debug, Serialize)]
pub struct Stage {
    pub service: &'static str,
    pub stage: &'static str,
    pub count: f64,
    pub mean_ms: f64,
    /// Seconds spent in the stage, summed over concurrent executions.
    pub busy_s: f64,
}

#[derive(Debug, Serialize)]
pub struct Sink {
    pub events: usize,
    /// Rows committed after the sink's first batch ÷ time from its first
    /// commit to its last.
    pub events_per_s: f64,
    /// All events ÷ time from starting the sink process to the last row.
    pub wall_events_per_s: f64,
    pub sink_cpu_s: f64,
}

/// Live uploads while a backfill drains (stand-in NLP).
#[derive(Debug, Serialize)]
pub struct Lanes {
    pub backfill_docs: usize,
    pub backfill_docs_per_s: f64,
    pub live_uploads: usize,
    pub live_rate_per_s: f64,
    pub live_seconds: f64,
    /// Upload → done, from the document row's times.
    pub live_p50_ms: f64,
    pub live_p99_ms: f64,
    pub live_max_ms: f64,
}

#[derive(Debug, Serialize)]
pub struct Backlog {
    pub docs: usize,
    pub load_s: f64,
    pub drain_s: f64,
    pub window: usize,
    pub first_window_docs_per_s: f64,
    pub last_window_docs_per_s: f64,
    pub worker_peak_rss_mib: Option<f64>,
}

/// The clinician queries over bulk-loaded documents.
#[derive(Debug, Serialize)]
pub struct Queries {
    pub docs: usize,
    pub patients: usize,
    pub teams: usize,
    pub concepts_per_document: f64,
    /// Generating, COPYing, indexing and vacuuming all of it.
    pub load_s: f64,
    pub tables: Vec<TableLoad>,
    pub clients: usize,
    pub rate_per_client: f64,
    pub endpoints: Vec<EndpointRun>,
    pub saturation: QuerySaturation,
    /// The paced runs and the saturation run.
    pub wall_s: f64,
    pub cpu_seconds: BTreeMap<String, f64>,
}

/// One table of the query load.
#[derive(Debug, Serialize)]
pub struct TableLoad {
    pub table: &'static str,
    pub rows: u64,
    pub copy_s: f64,
    pub rows_per_s: f64,
    /// Recreating its secondary indexes (and triggers).
    pub index_s: f64,
    pub vacuum_s: f64,
}

/// One endpoint at a steady offered load, over `Plan::query_rounds` rounds;
/// latency from the scheduled send.
#[derive(Debug, Serialize)]
pub struct EndpointRun {
    pub name: &'static str,
    pub route: &'static str,
    /// Held to `QUERY_P99_TARGET_MS`.
    pub targeted: bool,
    /// In all rounds.
    pub requests: usize,
    /// Over every request of every round: the figure held to the target.
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// The median of the rounds' p99: what is left when one round's
    /// excursion (a moment of the shared host, or the first round's cold
    /// caches) is set aside. A diagnostic, next to `rounds`.
    pub median_round_p99_ms: f64,
    pub rounds: Vec<EndpointRound>,
}

/// One round of one endpoint.
#[derive(Debug, Serialize)]
pub struct EndpointRound {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// p99 of the requests scheduled in each 5 s of the round (diagnostic:
    /// where in the round the tail is).
    pub window_p99_ms: Vec<f64>,
    /// The longest 4 KiB write + fdatasync of the disk probe while the
    /// round ran (crate::disk): how long a commit could have waited on
    /// the disk alone.
    pub longest_flush_ms: f64,
    /// Read from the machine's disks while the round ran (page cache
    /// misses, anyone's: crate::disk::bytes_read).
    pub disk_read_mib: f64,
}

/// The four endpoints in turn, every client back to back.
#[derive(Debug, Serialize)]
pub struct QuerySaturation {
    pub seconds: f64,
    pub requests: usize,
    pub requests_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

const QUERY_P99_TARGET_MS: f64 = 25.0;

impl Queries {
    /// The worst p99 of the endpoints with a target.
    pub fn p99_ms(&self) -> f64 {
        self.endpoints.iter().filter(|e| e.targeted).map(|e| e.p99_ms).fold(0.0, f64::max)
    }
}

/// One stage of a document's way: (service, metric, labels, what it is).
type StageDef = (&'static str, &'static str, &'static [(&'static str, &'static str)], &'static str);

const STAGES: &[StageDef] = &[
    (API, "clinflow_http_request_seconds", &[("route", "/v1/documents"), ("method", "POST")], "upload request, whole"),
    (API, "clinflow_http_request_seconds", &[("route", "/v1/documents/batch")], "batch upload request, whole"),
    (API, "clinflow_api_stage_seconds", &[("stage", "auth")], "  auth: token + session touch"),
    (API, "clinflow_api_stage_seconds", &[("stage", "begin")], "  pooled connection + BEGIN"),
    (API, "clinflow_api_stage_seconds", &[("stage", "data_key")], "  patient's data key (cached, or made)"),
    (API, "clinflow_api_stage_seconds", &[("stage", "seal")], "  encrypt text + patient"),
    (API, "clinflow_api_stage_seconds", &[("stage", "insert")], "  insert row"),
    (API, "clinflow_api_stage_seconds", &[("stage", "outbox")], "  insert job + audit into outbox"),
    (API, "clinflow_api_stage_seconds", &[("stage", "commit")], "  commit"),
    (API, "clinflow_relay_publish_seconds", &[], "relay: publish a round, await confirms"),
    (WORKER, "clinflow_worker_stage_seconds", &[("stage", "queue_wait")], "queue wait: publish → delivery"),
    (WORKER, "clinflow_worker_stage_seconds", &[("stage", "claim")], "claim (UPDATE … RETURNING)"),
    (WORKER, "clinflow_worker_stage_seconds", &[("stage", "decrypt")], "decrypt text"),
    (WORKER, "clinflow_worker_stage_seconds", &[("stage", "audit")], "publish audit, await confirm"),
    (WORKER, "clinflow_worker_stage_seconds", &[("stage", "nlp")], "NLP call"),
    (WORKER, "clinflow_worker_stage_seconds", &[("stage", "store")], "encrypt + store result, commit"),
    (SINK, "clinflow_audit_batch_seconds", &[], "audit batch: chain + insert + commit"),
];

impl Run {
    pub fn new(run: &PipelineRun, before: &Observation, after: &Observation) -> Self {
        let mut ms: Vec<f64> = run.upload_latencies.iter().map(|d| d.as_secs_f64() * 1_000.0).collect();
        ms.sort_by(f64::total_cmp);
        let stages = stages(before, after);
        let cpu_seconds = after
            .cpu_seconds
            .iter()
            .map(|(name, cpu)| (name.clone(), cpu - before.cpu_seconds.get(name).copied().unwrap_or(0.0)))
            .collect();
        Self {
            docs: run.docs,
            docs_per_s: run.docs_per_s(),
            upload_docs_per_s: run.docs as f64 / run.uploaded_after.as_secs_f64(),
            upload_p50_ms: percentile(&ms, 0.50),
            upload_p99_ms: percentile(&ms, 0.99),
            upload_p999_ms: percentile(&ms, 0.999),
            upload_max_ms: ms.last().copied().unwrap_or(0.0),
            wall_s: (after.at - before.at).as_secs_f64(),
            stages,
            cpu_seconds,
        }
    }
}

fn print_cpu(during: &str, cpu: &BTreeMap<String, f64>, wall_s: f64, machine: &serde_json::Value) {
    let available = wall_s * machine["nproc"].as_f64().unwrap_or(1.0);
    println!("\nCPU during {during} ({wall_s:.1} s wall, {available:.1} CPU-s available)");
    let mut cpu: Vec<_> = cpu.iter().collect();
    cpu.sort_by(|a, b| b.1.total_cmp(a.1));
    for (name, s) in cpu {
        println!("  {name:<34} {s:>7.2} CPU-s  {:>5.0} % of one core", s / wall_s * 100.0);
    }
}

/// CPU milliseconds per document of each process over `runs` (the
/// harness and the idle MedCAT excluded: they are not the pipeline).
fn cpu_ms_per_doc(runs: &[&Run]) -> BTreeMap<String, f64> {
    let docs: usize = runs.iter().map(|r| r.docs).sum();
    let mut cpu: BTreeMap<String, f64> = BTreeMap::new();
    for (name, s) in runs.iter().flat_map(|r| &r.cpu_seconds) {
        if name.contains("bench") || name.starts_with("medcat") {
            continue;
        }
        *cpu.entry(name.clone()).or_insert(0.0) += s * 1_000.0 / docs.max(1) as f64;
    }
    cpu
}

/// CPU per 1,000 documents of each process in the ceiling runs, TLS hops
/// beside plaintext: what TLS costs and who pays it.
fn print_cpu_by_hops(tls: &[&Run], plain: &[&Run]) {
    let per_1k = |runs: &[&Run]| {
        let docs: usize = runs.iter().map(|r| r.docs).sum();
        let mut cpu: BTreeMap<String, f64> = BTreeMap::new();
        for (name, s) in runs.iter().flat_map(|r| &r.cpu_seconds) {
            *cpu.entry(name.clone()).or_insert(0.0) += s * 1_000.0 / docs.max(1) as f64;
        }
        cpu
    };
    let (tls_cpu, plain_cpu) = (per_1k(tls), per_1k(plain));
    println!(
        "\nCPU per 1,000 documents in the ceiling runs, TLS / plaintext hops ({} and {} runs)",
        tls.len(),
        plain.len()
    );
    for (name, t) in &tls_cpu {
        let p = plain_cpu.get(name).copied().unwrap_or(0.0);
        let change = if p > 0.0 { format!("{:+.0} %", (t / p - 1.0) * 100.0) } else { String::new() };
        println!("  {name:<34} {t:>6.2} / {p:>6.2} CPU-s  {change:>6}");
    }
}

/// The query rows of the table: the load, each endpoint, saturation.
fn print_queries(row: &impl Fn(&str, String, &str, Option<bool>), q: &Queries) {
    row(&format!("query load: {} docs, {} patients", q.docs, q.patients), format!("{:.0} s", q.load_s), "", None);
    let rounds = q.endpoints.first().map_or(0, |e| e.rounds.len());
    row(
        &format!("  queries paced: {} clients × {}/s", q.clients, q.rate_per_client),
        format!("{rounds} rounds"),
        "",
        None,
    );
    for e in &q.endpoints {
        let (target, met) = if e.targeted {
            (format!("< {QUERY_P99_TARGET_MS:.0} ms"), Some(e.p99_ms < QUERY_P99_TARGET_MS))
        } else {
            (String::new(), None)
        };
        let name = format!("{} p99 (all rounds)", e.name);
        row(&name, format!("{:.1} ms", e.p99_ms), &target, met);
        row(&format!("  p50 / max of all {}", e.requests), format!("{:.1} / {:.0} ms", e.p50_ms, e.max_ms), "", None);
        let each = |f: fn(&EndpointRound) -> String| e.rounds.iter().map(f).collect::<Vec<_>>().join(" / ");
        row("  each round's p99", format!("{} ms", each(|r| format!("{:.1}", r.p99_ms))), "", None);
        row("  median of the rounds' p99", format!("{:.1} ms", e.median_round_p99_ms), "", None);
        row("  longest disk flush in each", format!("{} ms", each(|r| format!("{:.0}", r.longest_flush_ms))), "", None);
        row("  read from disk in each", format!("{} MiB", each(|r| format!("{:.0}", r.disk_read_mib))), "", None);
    }
    let s = &q.saturation;
    row(&format!("  queries: {} clients back to back", q.clients), format!("{:.0} req/s", s.requests_per_s), "", None);
    row("    p50 / p99 at saturation", format!("{:.1} / {:.1} ms", s.p50_ms, s.p99_ms), "", None);
}

fn print_query_load(q: &Queries) {
    println!(
        "\nthe query load ({:.0} s in all; {:.1} concepts per document; COPY, then indexes and triggers back, then VACUUM (ANALYZE))",
        q.load_s, q.concepts_per_document
    );
    println!("{:<20} {:>10} {:>8} {:>10} {:>8} {:>8}", "table", "rows", "copy s", "rows/s", "index s", "vacuum s");
    for t in &q.tables {
        println!(
            "{:<20} {:>10} {:>8.1} {:>10.0} {:>8.1} {:>8.1}",
            t.table, t.rows, t.copy_s, t.rows_per_s, t.index_s, t.vacuum_s
        );
    }
}

/// Each stage's count and busy time between two observations.
pub fn stages(before: &Observation, after: &Observation) -> Vec<Stage> {
    STAGES
        .iter()
        .filter_map(|(service, metric, labels, stage)| {
            let (count, busy_s) =
                after.metrics.get(service)?.histogram_delta(before.metrics.get(service)?, metric, labels);
            let mean_ms = if count > 0.0 { busy_s / count * 1e3 } else { 0.0 };
            Some(Stage { service, stage, count, mean_ms, busy_s })
        })
        .collect()
}

/// The ratio rounds of one CPU placement and hops, as medians.
struct Placement {
    own_core: bool,
    name: &'static str,
    ratios: Vec<f64>,
    ratio: f64,
    direct: f64,
    pipeline: f64,
    direct_wait: f64,
    pipeline_wait: f64,
}

impl Placement {
    fn of(rounds: &[Round], own_core: bool, hops: Hops) -> Option<Self> {
        let rounds: Vec<&Round> = rounds.iter().filter(|r| r.medcat_own_core == own_core && r.hops == hops).collect();
        if rounds.is_empty() {
            return None;
        }
        let of = |f: fn(&Round) -> f64| median(rounds.iter().map(|r| f(r)).collect());
        Some(Self {
            own_core,
            name: if own_core { "MedCAT alone on core 0" } else { "all sharing every core" },
            ratios: rounds.iter().map(|r| r.pipeline_docs_per_s / r.direct_docs_per_s).collect(),
            ratio: of(|r| r.pipeline_docs_per_s / r.direct_docs_per_s),
            direct: of(|r| r.direct_docs_per_s),
            pipeline: of(|r| r.pipeline_docs_per_s),
            direct_wait: of(|r| r.direct_medcat_cpu_wait),
            pipeline_wait: of(|r| r.pipeline_medcat_cpu_wait),
        })
    }
}

/// `more` (stages of another run) added into `sum`, stage by stage.
pub fn add_stages(sum: &mut Vec<Stage>, more: Vec<Stage>) {
    for m in more {
        match sum.iter_mut().find(|s| (s.service, s.stage) == (m.service, m.stage)) {
            Some(s) => {
                s.count += m.count;
                s.busy_s += m.busy_s;
                s.mean_ms = if s.count > 0.0 { s.busy_s / s.count * 1e3 } else { 0.0 };
            }
            None => sum.push(m),
        }
    }
}

/// The latency run's seconds whose longest request passed 20 ms, worst
/// first, each with the longest disk flush under way in it.
fn print_stalls(seconds: &[Second]) {
    let mut stalled: Vec<&Second> = seconds.iter().filter(|s| s.longest_request_ms > 20.0).collect();
    if stalled.is_empty() {
        return;
    }
    stalled.sort_by(|a, b| b.longest_request_ms.total_cmp(&a.longest_request_ms));
    println!(
        "\nLatency run: seconds with a request over 20 ms, worst first (second: longest request / longest disk flush)"
    );
    for s in stalled.iter().take(10) {
        println!(
            "  {:>4} s: {:>7.1} ms / {:>7.1} ms  ({} requests sent)",
            s.second, s.longest_request_ms, s.longest_flush_ms, s.requests
        );
        if let Some(a) = &s.attribution {
            let over: Vec<String> = a.over_20ms.iter().map(|(stage, n)| format!("{stage} {n:.0}")).collect();
            let means: Vec<String> =
                a.mean_ms.iter().filter(|(_, ms)| *ms >= 1.0).map(|(stage, ms)| format!("{stage} {ms:.1}")).collect();
            println!("         cause: {}", a.cause);
            println!(
                "         over 20 ms in the api: {}; stage means ≥ 1 ms: {}",
                if over.is_empty() { "none".to_owned() } else { over.join(", ") },
                if means.is_empty() { "none".to_owned() } else { means.join(", ") },
            );
            println!(
                "         CPU busy {:.0} % (stolen by the host {:.0} %); autovacuum workers {}; WAL syncs {}, WAL buffers full {}, checkpoint buffers written {}{}",
                a.cpu_busy * 100.0,
                a.cpu_steal * 100.0,
                a.autovacuum_workers,
                a.wal_syncs,
                a.wal_buffers_full,
                a.checkpoint_buffers,
                if a.checkpoints_started > 0 { " (a checkpoint started)" } else { "" }
            );
        }
    }
    // Every stalled second, by cause.
    let mut causes: BTreeMap<String, usize> = BTreeMap::new();
    for s in &stalled {
        let cause = s.attribution.as_ref().map_or("unsampled".to_owned(), |a| a.cause.clone());
        let cause = cause.split(" (").next().unwrap_or_default().to_owned();
        *causes.entry(cause).or_default() += 1;
    }
    let causes: Vec<String> = causes.into_iter().map(|(c, n)| format!("{c}: {n}")).collect();
    println!("  by cause: {}", causes.join("; "));
}

fn print_stages(title: &str, stages: &[Stage], wall_s: f64) {
    println!("\nwhere the time goes ({title}, {wall_s:.1} s wall; busy = seconds summed over concurrent work)");
    println!("{:<12} {:<40} {:>8} {:>10} {:>9} {:>7}", "service", "stage", "count", "mean ms", "busy s", "busy/wall");
    for s in stages {
        println!(
            "{:<12} {:<40} {:>8.0} {:>10.2} {:>9.2} {:>7.2}",
            s.service,
            s.stage,
            s.count,
            s.mean_ms,
            s.busy_s,
            s.busy_s / wall_s
        );
    }
}

/// Nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The middle value; of an even number, the mean of the middle two.
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n > 0 && n.is_multiple_of(2) { (values[n / 2 - 1] + values[n / 2]) / 2.0 } else { percentile(&values, 0.5) }
}

/// Peak resident memory (VmHWM) of every running service, by binary name.
pub fn peak_rss(stack: &Stack) -> BTreeMap<String, f64> {
    stack
        .pids()
        .into_iter()
        .filter_map(|(name, pid)| Some((format!("clinflow-{name}"), stack::peak_rss_mib(pid)?)))
        .collect()
}

pub fn print_and_save(
    results_dir: &Path,
    mode: Mode,
    profile: &str,
    plan: &Plan,
    figures: &Figures,
    elapsed: Duration,
) -> anyhow::Result<()> {
    let now = time::OffsetDateTime::now_utc();
    let machine = stack::machine();
    let hops = figures.hops;
    let own_core = Placement::of(&figures.rounds, true, hops);
    let shared = Placement::of(&figures.rounds, false, hops);
    // With `--hops both`: the plaintext rounds (MedCAT placed as for the
    // headline where it could be) beside the TLS rounds placed alike.
    let plain = Placement::of(&figures.rounds, true, Hops::Plain)
        .or_else(|| Placement::of(&figures.rounds, false, Hops::Plain))
        .filter(|_| hops == Hops::Tls);
    let tls_vs_plain = plain.and_then(|p| Some((Placement::of(&figures.rounds, p.own_core, Hops::Tls)?, p)));
    // The headline ratio: MedCAT on its own core where it could be placed so.
    let headline = own_core.as_ref().or(shared.as_ref());
    let ratio = headline.map_or(0.0, |p| p.ratio);
    let (direct, piped) = headline.map_or((0.0, 0.0), |p| (p.direct, p.pipeline));
    let ratio_shared = shared.as_ref().map_or(0.0, |p| p.ratio);
    let ceilings = |h: Hops| -> Vec<&Run> { figures.ceilings.iter().filter(|c| c.hops == h).map(|c| &c.run).collect() };
    let (headline_ceilings, plain_ceilings) = (ceilings(hops), ceilings(Hops::Plain));
    let plain_ceilings = if hops == Hops::Tls { plain_ceilings } else { Vec::new() };
    // The breakdown is the last run's; the figure, the median of the runs.
    let ceiling = headline_ceilings.last().copied();
    let docs_per_s = |runs: &[&Run]| median(runs.iter().map(|r| r.docs_per_s).collect());
    let latency = figures.latency.as_ref();
    let sink = figures.sink.as_ref();
    let ceiling_docs = docs_per_s(&headline_ceilings);
    let ceiling_plain = docs_per_s(&plain_ceilings);
    let ratio_plain = tls_vs_plain.as_ref().map_or(0.0, |(_, p)| p.ratio);
    let ceiling_tls_vs_plain = if ceiling_plain > 0.0 { ceiling_docs / ceiling_plain } else { 0.0 };
    let (p50, p99) = latency.map_or((0.0, 0.0), |l| (l.upload_p50_ms, l.upload_p99_ms));
    let saturated_p99 = figures.saturation.as_ref().map_or(0.0, |l| l.upload_p99_ms);
    let live_p99 = figures.lanes.as_ref().map_or(0.0, |l| l.live_p99_ms);
    let sink_rate = sink.map_or(0.0, |s| s.events_per_s);
    let throttled = crate::observe::THROTTLED.load(std::sync::atomic::Ordering::Relaxed);
    let query_p99 = figures.queries.as_ref().map_or(0.0, Queries::p99_ms);
    let limit_docs = figures.limit.as_ref().map_or(0.0, |l| l.docs_per_s);
    let ceiling_vs_limit = if limit_docs > 0.0 { ceiling_docs / limit_docs } else { 0.0 };

    println!();
    println!(
        "clinflow bench: {mode:?} on {} ({} cores, {} GiB), {profile} build, {} UTC, {:.0} s",
        machine["host"].as_str().unwrap_or("?"),
        machine["nproc"],
        machine["mem_gib"],
        now.format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
        elapsed.as_secs_f64()
    );
    println!(
        "{} hops{}",
        hops.name(),
        match hops {
            Hops::Tls => ": PostgreSQL verify-full, amqps, HTTPS to the api and the NLP service",
            Hops::Plain => " to PostgreSQL, RabbitMQ, the api and the stand-in (MedCAT itself is HTTPS)",
        }
    );
    println!("{:<44} {:>14}  target", "figure", "measured");
    let row = |name: &str, value: String, target: &str, met: Option<bool>| {
        let verdict = match met {
            Some(true) => "met",
            Some(false) => "NOT MET",
            None => "",
        };
        println!("{name:<44} {value:>14}  {target:<10} {verdict}");
    };
    // Absent when a phase ran alone (--only).
    for placement in [own_core.as_ref(), shared.as_ref()].into_iter().flatten() {
        let rounds: Vec<String> = placement.ratios.iter().map(|r| format!("{r:.2}")).collect();
        row(
            &format!("ratio pipeline ÷ direct, {} (rounds {})", placement.name, rounds.join(" ")),
            format!("{:.3}", placement.ratio),
            "≥ 0.95",
            Some(placement.ratio >= 0.95),
        );
        row(
            &format!(
                "  direct, batches of {} / pipeline, {} ×{}",
                plan.bulk_batch, plan.batch_lines, plan.batch_clients
            ),
            format!("{:.0} / {:.0} docs/s", placement.direct, placement.pipeline),
            "",
            None,
        );
        row(
            "  MedCAT waiting for a CPU, direct / pipeline",
            format!("{:.0} % / {:.0} %", placement.direct_wait * 100.0, placement.pipeline_wait * 100.0),
            "",
            None,
        );
    }
    if let Some((tls, plain)) = &tls_vs_plain {
        let rounds: Vec<String> = plain.ratios.iter().map(|r| format!("{r:.2}")).collect();
        row(
            &format!("ratio with plaintext hops, {} (rounds {})", plain.name, rounds.join(" ")),
            format!("{:.3}", plain.ratio),
            "",
            None,
        );
        row("  direct / pipeline", format!("{:.0} / {:.0} docs/s", plain.direct, plain.pipeline), "", None);
        row("  ratio, TLS ÷ plaintext hops", format!("{:.3}", tls.ratio / plain.ratio), "", None);
    }
    if let Some(c) = ceiling {
        let runs = |runs: &[&Run]| runs.iter().map(|r| format!("{:.0}", r.docs_per_s)).collect::<Vec<_>>().join(" ");
        row(
            &format!("ceiling (stand-in NLP), {} docs (runs {})", c.docs, runs(&headline_ceilings)),
            format!("{ceiling_docs:.0} docs/s"),
            "≥ 3000",
            Some(ceiling_docs >= 3000.0),
        );
        let accepted = median(headline_ceilings.iter().map(|r| r.upload_docs_per_s).collect());
        row("  batch uploads accepted", format!("{accepted:.0} docs/s"), "≥ 5000", Some(accepted >= 5000.0));
        row("  uploads throttled (429) and sent again", format!("{throttled}"), "", None);
        let per_doc = cpu_ms_per_doc(&headline_ceilings);
        let total: f64 = per_doc.values().sum();
        row("  CPU per document, all processes", format!("{total:.3} ms"), "≤ 0.6 ms", Some(total <= 0.6));
        for (name, ms) in &per_doc {
            row(&format!("    {name}"), format!("{ms:.3} ms"), "", None);
        }
        if let Some(l) = &figures.limit {
            row(
                &format!("  limit: PostgreSQL alone, the same rows ({} conns)", l.connections),
                format!("{:.0} docs/s", l.docs_per_s),
                "",
                None,
            );
            row("  ceiling ÷ limit", format!("{ceiling_vs_limit:.3}"), "", None);
            row(
                "    PostgreSQL CPU / WAL per doc, alone",
                format!("{:.3} ms / {:.0} B", l.postgres_cpu_ms_per_doc, l.wal_bytes_per_doc),
                "",
                None,
            );
            row("    WAL per doc in the ceiling run", format!("{:.0} B", l.pipeline_wal_bytes_per_doc), "", None);
        }
        if !plain_ceilings.is_empty() {
            row(
                &format!("ceiling with plaintext hops (runs {})", runs(&plain_ceilings)),
                format!("{ceiling_plain:.0} docs/s"),
                "",
                None,
            );
            row(
                "  ceiling, TLS ÷ plaintext hops",
                format!("{ceiling_tls_vs_plain:.3}"),
                "≥ 0.95",
                Some(ceiling_tls_vs_plain >= 0.95),
            );
        }
    }
    if let Some(l) = latency {
        row(
            &format!("upload p99, {} clients × {}/s", plan.upload_clients, plan.upload_rate_per_client),
            format!("{:.1} ms", l.upload_p99_ms),
            "< 20 ms",
            Some(l.upload_p99_ms < 20.0),
        );
        row("  upload p50 / max", format!("{:.1} / {:.0} ms", l.upload_p50_ms, l.upload_max_ms), "", None);
        row("  upload p99.9", format!("{:.1} ms", l.upload_p999_ms), "", None);
        let seconds = &figures.latency_seconds;
        let stalled: Vec<&Second> = seconds.iter().filter(|s| s.longest_request_ms > 20.0).collect();
        let with_flush = stalled.iter().filter(|s| s.longest_flush_ms > 20.0).count();
        row(
            &format!("  seconds with a request over 20 ms (of {})", seconds.len()),
            format!("{} ({with_flush} with a disk flush over 20 ms)", stalled.len()),
            "",
            None,
        );
    }
    if let Some(l) = figures.saturation.as_ref() {
        row(
            &format!("  saturation: {} clients back to back", plan.upload_clients),
            format!("{:.0} docs/s", l.upload_docs_per_s),
            "",
            None,
        );
        row(
            "    upload p50 / p99 at saturation",
            format!("{:.1} / {:.1} ms", l.upload_p50_ms, l.upload_p99_ms),
            "",
            None,
        );
    }
    if let Some(s) = sink {
        row(
            &format!("audit sink, {} pre-filled events", s.events),
            format!("{:.0} ev/s", s.events_per_s),
            "≥ 10000",
            Some(s.events_per_s >= 10_000.0),
        );
        row("  incl. sink start-up", format!("{:.0} ev/s", s.wall_events_per_s), "", None);
    }
    if let Some(l) = &figures.lanes {
        row(
            &format!("live upload → done p99 during a {}k backfill", l.backfill_docs / 1000),
            format!("{:.0} ms", l.live_p99_ms),
            "< 2000 ms",
            Some(l.live_p99_ms < 2000.0),
        );
        row(
            &format!("  live p50 / max ({} uploads, {}/s)", l.live_uploads, l.live_rate_per_s),
            format!("{:.0} / {:.0} ms", l.live_p50_ms, l.live_max_ms),
            "",
            None,
        );
        row("  backfill drained meanwhile", format!("{:.0} docs/s", l.backfill_docs_per_s), "", None);
    }
    if let Some(b) = &figures.backlog {
        let r = b.last_window_docs_per_s / b.first_window_docs_per_s;
        row(
            &format!("backlog {}: last ÷ first {}k", b.docs, b.window / 1000),
            format!("{r:.2}"),
            "≥ 0.9",
            Some(r >= 0.9),
        );
        row(
            "  first / last window",
            format!("{:.0} / {:.0} docs/s", b.first_window_docs_per_s, b.last_window_docs_per_s),
            "",
            None,
        );
        row("  drain / load time", format!("{:.0} / {:.0} s", b.drain_s, b.load_s), "", None);
    }
    if let Some(q) = &figures.queries {
        print_queries(&row, q);
    }
    if let Some(p) = &figures.privacy {
        row(
            &format!("disclosures, first page, among {}k audit rows", p.audit_rows / 1000),
            format!("{:.1} ms p99", p.disclosure_p99_ms),
            "< 50 ms",
            Some(p.disclosure_p99_ms < 50.0),
        );
        row(
            &format!("  p50 / max ({} lookups, {} auditors)", p.disclosure_requests, p.disclosure_clients),
            format!("{:.1} / {:.1} ms", p.disclosure_p50_ms, p.disclosure_max_ms),
            "",
            None,
        );
        row(
            &format!("purge of {}k expired documents under uploads", p.purge_docs / 1000),
            format!("{:.0} docs/s", p.purge_docs_per_s),
            "≥ 1000/s",
            Some(p.purge_docs_per_s >= 1000.0),
        );
        row(
            "  upload p99 without / during the purge",
            format!("{:.1} / {:.1} ms", p.uploads_without.p99_ms, p.uploads_during.p99_ms),
            "",
            None,
        );
        row(
            "  uploads without / during (p50)",
            format!(
                "{} ({:.1} ms) / {} ({:.1} ms)",
                p.uploads_without.count, p.uploads_without.p50_ms, p.uploads_during.count, p.uploads_during.p50_ms
            ),
            "",
            None,
        );
    }
    for (name, mib) in &figures.peak_rss_mib {
        let limit = match name.as_str() {
            "clinflow-worker" => Some(100.0),
            "clinflow-api" => Some(150.0),
            _ => None,
        };
        let target = limit.map_or(String::new(), |l| format!("< {l:.0} MB"));
        row(&format!("peak RSS {name}"), format!("{mib:.1} MiB"), &target, limit.map(|l| *mib < l));
    }
    if let Some(c) = ceiling {
        print_stages("last ceiling run, batch uploads", &c.stages, c.wall_s);
        print_cpu("the last ceiling run", &c.cpu_seconds, c.wall_s, &machine);
    }
    if !plain_ceilings.is_empty() {
        print_cpu_by_hops(&headline_ceilings, &plain_ceilings);
    }
    if let Some(l) = &figures.limit {
        print_rows(l);
    }
    if let Some(l) = latency {
        print_stages("latency run, paced single uploads", &l.stages, l.wall_s);
        print_cpu("the latency run", &l.cpu_seconds, l.wall_s, &machine);
        print_stalls(&figures.latency_seconds);
    }
    if let Some(l) = figures.saturation.as_ref() {
        print_stages("saturation run, single uploads back to back", &l.stages, l.wall_s);
        print_cpu("the saturation run", &l.cpu_seconds, l.wall_s, &machine);
    }
    if figures.pipeline_wall_s > 0.0 {
        print_stages(
            "pipeline rounds, real MedCAT, all sharing every core",
            &figures.pipeline_stages,
            figures.pipeline_wall_s,
        );
        print_cpu(
            "the pipeline rounds (real MedCAT, all sharing every core)",
            &figures.pipeline_cpu_seconds,
            figures.pipeline_wall_s,
            &machine,
        );
    }

    if let Some(q) = &figures.queries {
        print_query_load(q);
        print_cpu("the query runs (paced and saturation)", &q.cpu_seconds, q.wall_s, &machine);
    }

    let json = serde_json::json!({
        "mode": mode, "profile": profile, "date": now.format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
        "git_commit": std::env::var("BENCH_GIT_COMMIT").ok(), "machine": machine, "plan": plan,
        "duration_s": elapsed.as_secs_f64(),
        "result": {"ratio": ratio, "ratio_shared": ratio_shared, "ratio_medcat_own_core": own_core.as_ref().map(|p| p.ratio),
                   "direct_docs_per_s": direct, "pipeline_docs_per_s": piped,
                   "ceiling_docs_per_s": ceiling_docs, "hops": hops,
                   "ratio_plain": tls_vs_plain.as_ref().map(|(_, p)| p.ratio),
                   "ratio_tls_vs_plain": tls_vs_plain.as_ref().map(|(t, p)| t.ratio / p.ratio),
                   "ceiling_plain_docs_per_s": (ceiling_plain > 0.0).then_some(ceiling_plain),
                   "ceiling_tls_vs_plain": (ceiling_plain > 0.0).then_some(ceiling_tls_vs_plain),
                   "upload_p50_ms": p50, "upload_p99_ms": p99,
                   "saturated_upload_p99_ms": saturated_p99, "live_done_p99_ms": live_p99, "sink_events_per_s": sink_rate, "uploads_throttled": throttled,
                   "query_p99_ms": query_p99,
                   "limit_docs_per_s": (limit_docs > 0.0).then_some(limit_docs),
                   "ceiling_vs_limit": (limit_docs > 0.0).then_some(ceiling_vs_limit)},
        "figures": figures,
    });
    std::fs::create_dir_all(results_dir)?;
    let stamp = now.format(time::macros::format_description!("[year][month][day]T[hour][minute][second]Z"))?;
    let path = results_dir.join(format!("{stamp}-{}.json", serde_json::to_value(mode)?.as_str().unwrap_or("run")));
    std::fs::write(&path, serde_json::to_vec_pretty(&json)?)?;
    println!("\nfigures written to {}", path.display());
    println!(
        "RESULT ratio={ratio:.3} ratio_shared={ratio_shared:.3} ceiling_docs_per_s={ceiling_docs:.0} upload_p99_ms={p99:.1} live_done_p99_ms={live_p99:.0} sink_events_per_s={sink_rate:.0} query_p99_ms={query_p99:.1} ratio_plain={ratio_plain:.3} ceiling_plain_docs_per_s={ceiling_plain:.0} ceiling_tls_vs_plain={ceiling_tls_vs_plain:.3} limit_docs_per_s={limit_docs:.0} ceiling_vs_limit={ceiling_vs_limit:.3}"
    );
    Ok(())
}

/// The rows the ceiling run wrote per document, by table, and what the
/// limit run copied of them.
fn print_rows(l: &crate::limit::Limit) {
    println!(
        "\nrows written per document in the last TLS ceiling run (the limit copies them: {:.1} concept rows, {:.2} audit rows)",
        l.concept_rows_per_doc, l.audit_rows_per_doc
    );
    println!("  {:<28} {:>9} {:>9} {:>9} {:>9}", "table", "inserted", "updated", "of them HOT", "deleted");
    for t in &l.pipeline_rows_per_doc {
        println!("  {:<28} {:>9.2} {:>9.2} {:>9.2} {:>9.2}", t.table, t.inserted, t.updated, t.hot_updated, t.deleted);
    }
}
