//! The clinician queries (issue 21): a patient's documents and concepts, a
//! concept's documents and patients, over `Plan::query_docs` documents
//! bulk-loaded with their concept index, asked by clinicians each within
//! their own care team at a steady rate, then back to back.

mod concepts;
mod explain;
mod load;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use uuid::Uuid;

use crate::disk::{self, FlushProbe};
use crate::notes::{SplitMix64, Vocabulary};
use crate::observe::Observation;
use crate::phases::{self, Client};
use crate::plan::Plan;
use crate::report::{self, EndpointRun, QuerySaturation};
use crate::stack::Stack;
use concepts::Concepts;
use load::{Dataset, Generator};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    PatientDocuments,
    PatientConcepts,
    ConceptDocuments,
    ConceptPatients,
}

const ENDPOINTS: [Endpoint; 4] =
    [Endpoint::PatientDocuments, Endpoint::PatientConcepts, Endpoint::ConceptDocuments, Endpoint::ConceptPatients];

impl Endpoint {
    fn name(self) -> &'static str {
        match self {
            Self::PatientDocuments => "patient documents",
            Self::PatientConcepts => "patient concepts",
            Self::ConceptDocuments => "concept documents",
            Self::ConceptPatients => "concept patients",
        }
    }

    fn route(self) -> &'static str {
        match self {
            Self::PatientDocuments => "POST /v1/patients/documents",
            Self::PatientConcepts => "POST /v1/patients/concepts",
            Self::ConceptDocuments => "GET /v1/concepts/{cui}/documents",
            Self::ConceptPatients => "GET /v1/concepts/{cui}/patients",
        }
    }

    /// Whether the 25 ms p99 target applies (the fourth is measured only).
    fn targeted(self) -> bool {
        self != Self::ConceptPatients
    }

    /// A field every item of the page has.
    fn item_field(self) -> &'static str {
        match self {
            Self::PatientDocuments | Self::ConceptDocuments => "id",
            Self::PatientConcepts => "cui",
            Self::ConceptPatients => "patient_ref",
        }
    }
}

/// What the clients ask about, shared by them.
struct Questions {
    set: Dataset,
    concepts: Arc<Concepts>,
}

impl Questions {
    /// A request of `endpoint` by a member of `team`: one of the team's
    /// patients (in a POST body: references never travel in URLs), or a
    /// concept picked as often as documents name it.
    fn request(&self, endpoint: Endpoint, team: usize, rng: &mut SplitMix64) -> (String, Option<serde_json::Value>) {
        let patient = |rng: &mut SplitMix64| {
            let patient_ref =
                Dataset::patient_ref(self.set.team_patient(team, rng.below(self.set.team_size() as u64) as usize));
            Some(serde_json::json!({ "patient_ref": patient_ref }))
        };
        match endpoint {
            Endpoint::PatientDocuments => ("/v1/patients/documents".into(), patient(rng)),
            Endpoint::PatientConcepts => ("/v1/patients/concepts".into(), patient(rng)),
            Endpoint::ConceptDocuments => (format!("/v1/concepts/{}/documents", self.concepts.pick(rng).cui), None),
            Endpoint::ConceptPatients => (format!("/v1/concepts/{}/patients", self.concepts.pick(rng).cui), None),
        }
    }

    /// What is wrong with an answer, if anything: not 200, not a page, or
    /// a patient outside the caller's team. Names codes only, never content.
    fn problem(&self, endpoint: Endpoint, team: usize, status: u16, body: &[u8]) -> Option<String> {
        let Ok(page) = serde_json::from_slice::<serde_json::Value>(body) else {
            return Some(format!("answered {status} with a body that is not JSON"));
        };
        if status != 200 {
            return Some(format!("answered {status} {}", page["error"]["code"]));
        }
        let Some(items) = page["items"].as_array() else { return Some("answered a page without items".into()) };
        if !(page["next_cursor"].is_null() || page["next_cursor"].is_string()) {
            return Some("answered a page with a malformed next_cursor".into());
        }
        if items.iter().any(|i| i.get(endpoint.item_field()).is_none()) {
            return Some(format!("answered an item without {}", endpoint.item_field()));
        }
        let outside = |item: &serde_json::Value| {
            let n = item["patient_ref"].as_str().and_then(|r| r.strip_prefix("bench-q-")?.parse::<usize>().ok());
            n.is_none_or(|n| n % self.set.teams != team)
        };
        let with_patients = matches!(endpoint, Endpoint::ConceptDocuments | Endpoint::ConceptPatients);
        (with_patients && items.iter().any(outside)).then(|| "answered a patient outside the caller's team".into())
    }

    /// One request, timed from `scheduled`: its latency, and what was wrong.
    async fn ask(
        &self,
        client: &Client,
        team: usize,
        endpoint: Endpoint,
        rng: &mut SplitMix64,
        scheduled: Instant,
    ) -> anyhow::Result<(Duration, Option<String>)> {
        let (status, body) = match self.request(endpoint, team, rng) {
            (path, Some(body)) => client.post(&path, &body).await?,
            (path, None) => client.get(&path).await?,
        };
        let latency = scheduled.elapsed();
        Ok((latency, self.problem(endpoint, team, status, &body)))
    }
}

/// Loads the data, checks a few answers, captures the plans, then measures
/// each endpoint and a mixed saturation run.
pub async fn run(
    ctx: &phases::Context<'_>,
    stack: &Stack,
    plan: &Plan,
    concepts_csv: &std::path::Path,
) -> anyhow::Result<report::Queries> {
    let set = Dataset::new(plan.query_docs);
    anyhow::ensure!(plan.query_clients <= set.teams, "at most one clinician per team ({} teams)", set.teams);
    let concepts = Arc::new(Concepts::load(concepts_csv)?);
    let password = Uuid::new_v4().to_string();
    let mut clinicians = Vec::new();
    for i in 0..plan.query_clients {
        let username = format!("bench-clinician-{i}");
        stack.create_user(&username, "clinician", &password).await?;
        clinicians.push(user_id(ctx.db, &username).await?);
    }
    let uploader = user_id(ctx.db, "bench-ingest").await?;

    eprintln!(
        "   {} documents of {} patients in {} teams, {:.1} concepts per document",
        set.docs,
        set.patients,
        set.teams,
        concepts.per_document()
    );
    let load_started = Instant::now();
    let vocabulary = Vocabulary::load(concepts_csv)?;
    let generator = Arc::new(Generator::new(set, &stack.index_key(), vocabulary, Arc::clone(&concepts), uploader));
    let tables = load::load(ctx.db, Arc::clone(&generator), &stack.keyring()?, &clinicians).await?;
    let load_s = load_started.elapsed().as_secs_f64();
    // The load wrote gigabytes of WAL and data: let its checkpoint finish,
    // and the kernel write the rest out, now rather than under the measured
    // queries (the first seconds of the first endpoint measured 160 ms at
    // p99, 4 ms after, while the disk still took 1 GB/s of the load).
    let settle = Instant::now();
    sqlx::query("CHECKPOINT").execute(ctx.db).await?;
    let synced = tokio::process::Command::new("sync").status().await;
    anyhow::ensure!(synced.as_ref().is_ok_and(|s| s.success()), "sync: {synced:?}");
    eprintln!("   checkpoint and sync: {:.1} s", settle.elapsed().as_secs_f64());

    let mut callers = Vec::new();
    for i in 0..plan.query_clients {
        callers.push(Client::login(&stack.api_url, &format!("bench-clinician-{i}"), &password).await?);
    }
    let questions = Arc::new(Questions { set, concepts: Arc::clone(&concepts) });
    sanity(ctx, stack, &generator, &callers[0]).await?;
    // A diagnostic: a statement it cannot find costs a line, not the run.
    let patient = clinflow::documents::patient_index(&stack.index_key(), &Dataset::patient_ref(0));
    match explain::plans(ctx.db, clinicians[0], &patient, &concepts.commonest().cui, &concepts.rarest().cui).await {
        Ok(plans) => {
            let explain_file = stack.log_dir.join("queries-explain.txt");
            std::fs::write(&explain_file, plans)?;
            eprintln!("   plans written to {}", explain_file.display());
        }
        Err(e) => eprintln!("   no plans: {e:#}"),
    }

    let interval = Duration::from_secs_f64(1.0 / plan.query_rate_per_client);
    let per_client = plan.query_requests.div_ceil(plan.query_clients);
    let probe = FlushProbe::start(&stack.log_dir)?;
    let before = Observation::take(stack).await?;
    // Round after round of the four endpoints in turn: the first round
    // shows the cold start after the load, and a moment of the shared host
    // (a flush held for half a second lands on whichever endpoint runs
    // then) shows as one round out of line, beside its disk figures.
    let mut measured: Vec<(Vec<f64>, Vec<report::EndpointRound>)> =
        ENDPOINTS.iter().map(|_| Default::default()).collect();
    for round in 1..=plan.query_rounds {
        for (endpoint, (all, rounds)) in ENDPOINTS.into_iter().zip(&mut measured) {
            let (began, read_before) = (Instant::now(), disk::bytes_read());
            let (mut ms, windows) = paced(&callers, &questions, endpoint, round, per_client, interval).await?;
            let longest_flush_ms = probe.longest(began, Instant::now()).as_secs_f64() * 1_000.0;
            let disk_read_mib = disk::bytes_read().saturating_sub(read_before) as f64 / (1024.0 * 1024.0);
            ms.sort_by(f64::total_cmp);
            let r = report::EndpointRound {
                p50_ms: report::percentile(&ms, 0.50),
                p99_ms: report::percentile(&ms, 0.99),
                max_ms: ms.last().copied().unwrap_or(0.0),
                window_p99_ms: windows,
                longest_flush_ms,
                disk_read_mib,
            };
            let windows: Vec<String> = r.window_p99_ms.iter().map(|w| format!("{w:.1}")).collect();
            eprintln!(
                "   round {round}, {}: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; p99 by {} s: {} ms; longest disk flush {:.0} ms; read from disk {:.0} MiB",
                endpoint.route(),
                r.p50_ms,
                r.p99_ms,
                r.max_ms,
                WINDOW.as_secs(),
                windows.join(" "),
                r.longest_flush_ms,
                r.disk_read_mib
            );
            all.append(&mut ms);
            rounds.push(r);
        }
    }
    let endpoints: Vec<EndpointRun> = ENDPOINTS
        .into_iter()
        .zip(measured)
        .map(|(endpoint, (mut all, rounds))| {
            all.sort_by(f64::total_cmp);
            EndpointRun {
                name: endpoint.name(),
                route: endpoint.route(),
                targeted: endpoint.targeted(),
                requests: all.len(),
                p50_ms: report::percentile(&all, 0.50),
                p99_ms: report::percentile(&all, 0.99),
                max_ms: all.last().copied().unwrap_or(0.0),
                median_round_p99_ms: report::median(rounds.iter().map(|r| r.p99_ms).collect()),
                rounds,
            }
        })
        .collect();
    let saturation = saturation(&callers, &questions, Duration::from_secs_f64(plan.query_saturation_s)).await?;
    let after = Observation::take(stack).await?;
    let cpu_seconds = after
        .cpu_seconds
        .iter()
        .map(|(name, s)| (name.clone(), s - before.cpu_seconds.get(name).copied().unwrap_or(0.0)))
        .collect();
    Ok(report::Queries {
        docs: set.docs,
        patients: set.patients,
        teams: set.teams,
        concepts_per_document: concepts.per_document(),
        load_s,
        tables,
        clients: plan.query_clients,
        rate_per_client: plan.query_rate_per_client,
        endpoints,
        saturation,
        wall_s: (after.at - before.at).as_secs_f64(),
        cpu_seconds,
    })
}

async fn user_id(db: &sqlx::PgPool, username: &str) -> anyhow::Result<Uuid> {
    let id = sqlx::query_scalar("SELECT id FROM users WHERE username = $1").bind(username).fetch_one(db).await;
    id.with_context(|| format!("the user {username}"))
}

/// Clinician 0 sees exactly the documents loaded for a patient of their
/// team, and is refused a patient of another team as out of scope.
async fn sanity(
    ctx: &phases::Context<'_>,
    stack: &Stack,
    generator: &Generator,
    clinician: &Client,
) -> anyhow::Result<()> {
    let set = generator.set;
    let mut loaded = vec![0usize; set.patients];
    for j in 0..set.docs {
        loaded[generator.patient_of(j)] += 1;
    }
    let ours = (0..set.team_size()).map(|k| set.team_patient(0, k)).find(|p| loaded[*p] > 0);
    let ours = ours.context("no patient of team 0 has a document")?;
    let index = clinflow::documents::patient_index(&stack.index_key(), &Dataset::patient_ref(ours));
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM documents WHERE patient_index = $1")
        .bind(&index)
        .fetch_one(ctx.db)
        .await?;
    anyhow::ensure!(
        stored as usize == loaded[ours],
        "{stored} documents stored for a patient, {} loaded",
        loaded[ours]
    );
    let (status, body) = clinician
        .post("/v1/patients/documents", &serde_json::json!({"patient_ref": Dataset::patient_ref(ours), "limit": 1000}))
        .await?;
    let page: serde_json::Value = serde_json::from_slice(&body)?;
    let items = page["items"].as_array().map_or(0, Vec::len);
    anyhow::ensure!(
        status == 200 && items == loaded[ours],
        "a patient's documents answered {status} with {items} items; {} loaded",
        loaded[ours]
    );
    let theirs = Dataset::patient_ref(set.team_patient(1, 0));
    let (status, body) = clinician.post("/v1/patients/documents", &serde_json::json!({"patient_ref": theirs})).await?;
    let answer: serde_json::Value = serde_json::from_slice(&body)?;
    anyhow::ensure!(
        status == 403 && answer["error"]["code"] == "out_of_scope",
        "another team's patient answered {status} {}",
        answer["error"]["code"]
    );
    eprintln!("   checked: a patient's {items} documents in scope; another team's patient refused (out_of_scope)");
    Ok(())
}

/// The stretch of a paced run's schedule each p99 of its timeline covers.
const WINDOW: Duration = Duration::from_secs(5);

/// `endpoint` asked by every clinician, each `per_client` times, one request
/// every `interval` (clients spread evenly), whatever the answers take;
/// latency from the scheduled send time. Each round draws its own patients
/// and concepts (a round replaying the last one's questions would find
/// their pages and keys in the caches). Milliseconds: all of them, and the
/// p99 of each `WINDOW` of the schedule (a diagnostic: where in the run the
/// tail is). Fails on any error.
async fn paced(
    callers: &[Client],
    questions: &Arc<Questions>,
    endpoint: Endpoint,
    round: usize,
    per_client: usize,
    interval: Duration,
) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let start = tokio::time::Instant::now() + Duration::from_millis(50);
    let mut tasks = tokio::task::JoinSet::new();
    for (team, client) in callers.iter().enumerate() {
        let (client, questions) = (client.clone(), Arc::clone(questions));
        let offset = interval.mul_f64(team as f64 / callers.len() as f64);
        tasks.spawn(async move {
            let mut rng = SplitMix64::new(((round as u64) << 32) | (team as u64 * 31 + endpoint as u64));
            let mut answers = Vec::with_capacity(per_client);
            for k in 0..per_client {
                let at = start + offset + interval * k as u32;
                tokio::time::sleep_until(at).await;
                answers.push(questions.ask(&client, team, endpoint, &mut rng, at.into_std()).await?);
            }
            anyhow::Ok((offset, answers))
        });
    }
    let mut answers = Vec::new();
    let mut windows: Vec<Vec<f64>> = Vec::new();
    while let Some(result) = tasks.join_next().await {
        let (offset, mut mine) = result??;
        for (k, (latency, _)) in mine.iter().enumerate() {
            let w = ((offset + interval * k as u32).as_secs_f64() / WINDOW.as_secs_f64()) as usize;
            windows.resize_with(windows.len().max(w + 1), Vec::new);
            windows[w].push(latency.as_secs_f64() * 1_000.0);
        }
        answers.append(&mut mine);
    }
    let windows = windows
        .into_iter()
        .map(|mut w| {
            w.sort_by(f64::total_cmp);
            report::percentile(&w, 0.99)
        })
        .collect();
    Ok((milliseconds(endpoint.route(), answers)?, windows))
}

/// Every clinician back to back, through the four endpoints in turn, for
/// `duration`.
async fn saturation(
    callers: &[Client],
    questions: &Arc<Questions>,
    duration: Duration,
) -> anyhow::Result<QuerySaturation> {
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (team, client) in callers.iter().enumerate() {
        let (client, questions) = (client.clone(), Arc::clone(questions));
        tasks.spawn(async move {
            let mut rng = SplitMix64::new(1_000 + team as u64);
            let mut answers = Vec::new();
            while started.elapsed() < duration {
                let endpoint = ENDPOINTS[(team + answers.len()) % ENDPOINTS.len()];
                answers.push(questions.ask(&client, team, endpoint, &mut rng, Instant::now()).await?);
            }
            anyhow::Ok(answers)
        });
    }
    let mut answers = Vec::new();
    while let Some(result) = tasks.join_next().await {
        answers.extend(result??);
    }
    let seconds = started.elapsed().as_secs_f64();
    let mut ms = milliseconds("the saturation run", answers)?;
    ms.sort_by(f64::total_cmp);
    let run = QuerySaturation {
        seconds,
        requests: ms.len(),
        requests_per_s: ms.len() as f64 / seconds,
        p50_ms: report::percentile(&ms, 0.50),
        p99_ms: report::percentile(&ms, 0.99),
        max_ms: ms.last().copied().unwrap_or(0.0),
    };
    eprintln!(
        "   saturation: {:.0} requests/s, p50 {:.1} ms, p99 {:.1} ms",
        run.requests_per_s, run.p50_ms, run.p99_ms
    );
    Ok(run)
}

/// The latencies in milliseconds, or an error naming how many answers were
/// wrong and the first problem.
fn milliseconds(what: &str, answers: Vec<(Duration, Option<String>)>) -> anyhow::Result<Vec<f64>> {
    let wrong: Vec<&String> = answers.iter().filter_map(|(_, p)| p.as_ref()).collect();
    if let Some(first) = wrong.first() {
        anyhow::bail!("{what}: {} of {} answers wrong, e.g. {first}", wrong.len(), answers.len());
    }
    Ok(answers.iter().map(|(d, _)| d.as_secs_f64() * 1_000.0).collect())
}
