//! The measurements: direct MedCAT, the pipeline, the audit sink, the
//! backlog drain.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clinflow::amqp::{Lane, Outgoing, Publisher, Topology};
use clinflow::audit::{Action, Actor, AuditEvent, Outcome};
use clinflow::crypto::Keyring;
use clinflow::documents;
use clinflow::jobs::DocumentJob;
use clinflow::keys::{Keys, PatientRef};
use lapin::options::QueueDeleteOptions;
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

use crate::notes::{Note, Vocabulary};
use crate::observe::{PipelineRun, THROTTLED};
use crate::plan::Plan;
use crate::poll::wait_for;
use crate::prom::{self};
use crate::report;
use crate::stack::{self, API, SINK, Stack, WORKER};

const POLL: Duration = Duration::from_millis(20);
/// For checks that count rows: often enough, without loading the database.
const CONFIRM_POLL: Duration = Duration::from_millis(250);

pub struct Context<'a> {
    /// The bench database as its owner, for arranging and observing.
    pub db: &'a PgPool,
    vocabulary: &'a Vocabulary,
    note_bytes: usize,
}

impl<'a> Context<'a> {
    pub fn new(db: &'a PgPool, vocabulary: &'a Vocabulary, plan: &Plan) -> Self {
        Self { db, vocabulary, note_bytes: plan.note_bytes }
    }

    pub fn notes(&self, first: u64, n: usize) -> Vec<Note> {
        (first..first + n as u64).map(|i| self.vocabulary.note(i, self.note_bytes)).collect()
    }
}

/// How the pipeline runs get their notes into the API.
#[derive(Debug, Clone, Copy)]
pub enum Upload {
    /// `POST /v1/documents`, one note per request, `clients` at once, each
    /// sending its next as soon as the last is answered (saturation).
    Single { clients: usize },
    /// `POST /v1/documents`, `clients` each sending one note every
    /// `interval` (spread evenly), whatever the answers take: a steady
    /// offered load. Latency is counted from the scheduled send time, so a
    /// slow answer that delays the next send is not hidden.
    Paced { clients: usize, interval: Duration },
    /// `POST /v1/documents/batch`, `lines` notes per request, `clients` at once.
    Batch { lines: usize, clients: usize },
}

/// A logged-in client of the API (the ingest account, or a clinician).
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Client {
    pub async fn login(base: &str, username: &str, password: &str) -> anyhow::Result<Self> {
        let http = crate::http::builder().pool_max_idle_per_host(256).build()?;
        let response = http
            .post(format!("{base}/v1/auth/login"))
            .json(&json!({"username": username, "password": password}))
            .send()
            .await?
            .error_for_status()
            .context("logging in to the API")?;
        let body: serde_json::Value = response.json().await?;
        let token = body["access_token"].as_str().context("no access_token in the login answer")?.to_owned();
        Ok(Self { http, base: base.to_owned(), token })
    }

    /// Sends a request, waiting out 429 answers for their `Retry-After` as
    /// a well-behaved loader does. The latency includes those waits.
    async fn send(&self, request: impl Fn() -> reqwest::RequestBuilder) -> anyhow::Result<reqwest::Response> {
        loop {
            let response = request().bearer_auth(&self.token).send().await?;
            if response.status().as_u16() != 429 {
                return Ok(response);
            }
            THROTTLED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let wait =
                response.headers().get("retry-after").and_then(|v| v.to_str().ok()?.parse::<u64>().ok()).unwrap_or(1);
            tokio::time::sleep(Duration::from_secs(wait)).await;
        }
    }

    /// `GET path` (such as `/v1/concepts/38341003/documents`): the status
    /// and the body.
    pub async fn get(&self, path: &str) -> anyhow::Result<(u16, Vec<u8>)> {
        let url = format!("{}{path}", self.base);
        let response = self.send(|| self.http.get(&url)).await?;
        let status = response.status().as_u16();
        Ok((status, response.bytes().await?.to_vec()))
    }

    /// `POST path` with a JSON body (such as `/v1/patients/documents`,
    /// whose patient reference travels in the body): the status and the body.
    pub async fn post(&self, path: &str, body: &serde_json::Value) -> anyhow::Result<(u16, Vec<u8>)> {
        let url = format!("{}{path}", self.base);
        let response = self.send(|| self.http.post(&url).json(body)).await?;
        let status = response.status().as_u16();
        Ok((status, response.bytes().await?.to_vec()))
    }

    /// One upload; its latency counted from `started` (the scheduled send
    /// time of a paced client).
    async fn upload(&self, note: &Note, started: Instant) -> anyhow::Result<Duration> {
        self.upload_text(&note.patient_ref, &note.text, started).await
    }

    /// One upload of `text` for `patient`; its latency counted from
    /// `started`.
    pub async fn upload_text(&self, patient: &str, text: &str, started: Instant) -> anyhow::Result<Duration> {
        let body = json!({"patient_ref": patient, "text": text});
        let url = format!("{}/v1/documents", self.base);
        let response = self.send(|| self.http.post(&url).json(&body)).await?;
        let status = response.status();
        // Error bodies of the API never quote the request, so they are safe to show.
        let body = response.bytes().await?;
        let elapsed = started.elapsed();
        anyhow::ensure!(status.as_u16() == 202, "upload answered {status}: {}", String::from_utf8_lossy(&body));
        Ok(elapsed)
    }

    /// One live upload; its document id.
    async fn upload_for_id(&self, note: &Note) -> anyhow::Result<Uuid> {
        let body = json!({"patient_ref": note.patient_ref, "text": note.text});
        let url = format!("{}/v1/documents", self.base);
        let response = self.send(|| self.http.post(&url).json(&body)).await?;
        let status = response.status();
        let answer: serde_json::Value = response.json().await?;
        anyhow::ensure!(status.as_u16() == 202, "upload answered {status}: {answer}");
        Ok(answer["id"].as_str().context("no id in the upload answer")?.parse()?)
    }

    async fn upload_batch(&self, notes: &[Note]) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let mut body = Vec::with_capacity(notes.len() * 1_200);
        for note in notes {
            serde_json::to_writer(&mut body, &json!({"patient_ref": note.patient_ref, "text": note.text}))?;
            body.push(b'\n');
        }
        let url = format!("{}/v1/documents/batch", self.base);
        let response = self
            .send(|| self.http.post(&url).header("content-type", "application/x-ndjson").body(body.clone()))
            .await?;
        let status = response.status();
        let answer: serde_json::Value = response.json().await?;
        let elapsed = started.elapsed();
        // Outcomes name lines and codes only, never content.
        anyhow::ensure!(
            status.as_u16() == 200 && answer["accepted"].as_u64() == Some(notes.len() as u64),
            "batch upload answered {status}: accepted {} of {}, e.g. {}",
            answer["accepted"],
            notes.len(),
            answer["outcomes"]
                .as_array()
                .and_then(|o| o.iter().find(|o| o["outcome"] != "accepted"))
                .unwrap_or(&answer)
        );
        Ok(elapsed)
    }
}

/// The notes straight to MedCAT's `/api/process_bulk`, `batch` at a time, one
/// request after another: what a user's own loop would get. Returns docs/s.
pub async fn direct(medcat_url: &str, notes: &[Note], batch: usize) -> anyhow::Result<f64> {
    let http = crate::http::client();
    let started = Instant::now();
    for chunk in notes.chunks(batch) {
        let content: Vec<_> = chunk.iter().map(|n| json!({"text": n.text})).collect();
        let answer: serde_json::Value = http
            .post(format!("{medcat_url}/api/process_bulk"))
            .json(&json!({ "content": content }))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let results = answer["result"].as_array().map_or(0, Vec::len);
        anyhow::ensure!(results == chunk.len(), "process_bulk answered {results} results for {} notes", chunk.len());
    }
    Ok(notes.len() as f64 / started.elapsed().as_secs_f64())
}

/// Uploads `notes` and waits until every document is done and every audit
/// event is stored.
pub async fn pipeline(
    ctx: &Context<'_>,
    stack: &Stack,
    client: &Client,
    notes: &[Note],
    upload: Upload,
) -> anyhow::Result<PipelineRun> {
    let http = crate::http::client();
    let (_, failed_before) = document_counts(ctx.db).await?;
    let finished_before = worker_finished(stack, &http).await?;
    let audit_before = audit_progress(ctx.db, stack, &http).await?;
    let started = Instant::now();
    let (upload_sent, upload_latencies) = upload_all(client, notes, upload, started).await?.into_iter().unzip();
    let uploaded_after = started.elapsed();

    // Watched through the worker's own counters, which cost the database
    // nothing (a count over `documents` every 20 ms took a third of one of
    // PostgreSQL's cores), then confirmed from the database.
    let deadline = Duration::from_secs(120) + Duration::from_secs(notes.len() as u64 / 5);
    wait_for(deadline, POLL, || async {
        let (done, failed) = worker_finished(stack, &http).await?;
        anyhow::ensure!(
            failed == finished_before.1,
            "{} documents failed (see the worker log)",
            failed - finished_before.1
        );
        Ok((done - finished_before.0 >= notes.len() as f64).then_some(()))
    })
    .await?;
    let all_done = wait_for(deadline, CONFIRM_POLL, || async {
        let (pending, failed) = document_counts(ctx.db).await?;
        anyhow::ensure!(failed == failed_before, "{} documents failed (see the worker log)", failed - failed_before);
        Ok((pending == 0).then_some(()))
    })
    .await?;
    anyhow::ensure!(all_done.is_some(), "documents still pending after {deadline:?}");
    let audited = wait_for(Duration::from_secs(120), POLL, || async {
        let now = audit_progress(ctx.db, stack, &http).await?;
        Ok((now.0 - audit_before.0 >= now.1 - audit_before.1).then_some(()))
    })
    .await?;
    anyhow::ensure!(audited.is_some(), "audit events still unpersisted after 120 s");
    Ok(PipelineRun {
        docs: notes.len(),
        upload_latencies,
        upload_sent,
        started,
        uploaded_after,
        done_after: started.elapsed(),
    })
}

/// When each request was sent (from `t0`) and its latency, seen by the
/// client.
async fn upload_all(
    client: &Client,
    notes: &[Note],
    upload: Upload,
    t0: Instant,
) -> anyhow::Result<Vec<(Duration, Duration)>> {
    let (per_request, clients) = match upload {
        Upload::Single { clients } => (1, clients),
        Upload::Batch { lines, clients } => (lines, clients),
        Upload::Paced { clients, interval } => return upload_paced(client, notes, clients, interval, t0).await,
    };
    let requests: Arc<Vec<Vec<Note>>> = Arc::new(notes.chunks(per_request).map(<[Note]>::to_vec).collect());
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..clients {
        let (client, requests, next) = (client.clone(), Arc::clone(&requests), Arc::clone(&next));
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(notes) = requests.get(i) else { return anyhow::Ok(latencies) };
                let sent = t0.elapsed();
                latencies.push((
                    sent,
                    match upload {
                        Upload::Batch { .. } => client.upload_batch(notes).await?,
                        _ => client.upload(&notes[0], Instant::now()).await?,
                    },
                ));
            }
        });
    }
    let mut all = Vec::with_capacity(requests.len());
    while let Some(result) = tasks.join_next().await {
        all.extend(result??);
    }
    Ok(all)
}

/// Client `c` sends notes c, c + clients, … at start + offset_c + k·interval.
async fn upload_paced(
    client: &Client,
    notes: &[Note],
    clients: usize,
    interval: Duration,
    t0: Instant,
) -> anyhow::Result<Vec<(Duration, Duration)>> {
    let notes = Arc::new(notes.to_vec());
    let start = tokio::time::Instant::now() + Duration::from_millis(50);
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..clients {
        let (client, notes) = (client.clone(), Arc::clone(&notes));
        let offset = interval.mul_f64(c as f64 / clients as f64);
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            for (k, note) in notes.iter().skip(c).step_by(clients).enumerate() {
                let at = start + offset + interval * k as u32;
                tokio::time::sleep_until(at).await;
                latencies
                    .push((at.into_std().saturating_duration_since(t0), client.upload(note, at.into_std()).await?));
            }
            anyhow::Ok(latencies)
        });
    }
    let mut all = Vec::with_capacity(notes.len());
    while let Some(result) = tasks.join_next().await {
        all.extend(result??);
    }
    Ok(all)
}

/// (documents the worker stored as done, documents it marked failed), from
/// its counters.
async fn worker_finished(stack: &Stack, http: &reqwest::Client) -> anyhow::Result<(f64, f64)> {
    let service = stack.service(WORKER).ok_or_else(|| anyhow::anyhow!("the worker is not running"))?;
    let m = prom::scrape(http, &service.metrics_url).await?;
    let all = m.sum("clinflow_worker_documents_total", &[]);
    let done = m.sum("clinflow_worker_documents_total", &[("outcome", "done")]);
    Ok((done, all - done))
}

/// (documents queued or processing, documents failed): a scan of every
/// document, for confirming what the worker's counters said.
async fn document_counts(db: &PgPool) -> anyhow::Result<(i64, i64)> {
    let (pending, failed): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE status IN ('queued', 'processing')), count(*) FILTER (WHERE status = 'failed')
         FROM documents WHERE status <> 'done'",
    )
    .fetch_one(db)
    .await?;
    Ok((pending, failed))
}

/// (audit rows stored, audit events the api and worker had confirmed).
async fn audit_progress(db: &PgPool, stack: &Stack, http: &reqwest::Client) -> anyhow::Result<(f64, f64)> {
    let mut published = 0.0;
    for name in [API, WORKER] {
        if let Some(service) = stack.service(name) {
            let m = prom::scrape(http, &service.metrics_url).await?;
            published += m.sum("clinflow_audit_events_published_total", &[]);
        }
    }
    let rows: i64 = sqlx::query_scalar("SELECT coalesce(max(seq), 0) FROM audit_events").fetch_one(db).await?;
    Ok((rows as f64, published))
}

/// The audit sink alone, draining `events` events published while it was
/// stopped.
pub async fn sink(
    ctx: &Context<'_>,
    stack: &mut Stack,
    amqp: &lapin::Connection,
    topology: &Topology,
    events: usize,
) -> anyhow::Result<report::Sink> {
    stack.stop(SINK).await?;
    let seq_before: i64 =
        sqlx::query_scalar("SELECT coalesce(max(seq), 0) FROM audit_events").fetch_one(ctx.db).await?;
    // Signed as the worker signs its own (the sink parks unsigned events
    // and events whose key may not speak for their actor).
    let bodies = (0..events).map(|_| {
        let event = AuditEvent::new(Action::DocumentProcess, Actor::service("clinflow-worker"), Outcome::Success)
            .document(Uuid::now_v7());
        stack.worker_signer.body(&event)
    });
    publish_all(amqp, &topology.audit_exchange(), clinflow::amqp::AUDIT, bodies).await?;

    let started = Instant::now();
    stack.start(SINK, &[]).await?;
    let pid = stack.pids().into_iter().find(|(n, _)| *n == SINK).map(|(_, p)| p);
    let cpu_before = pid.and_then(stack::cpu_seconds).unwrap_or(0.0);
    let target = seq_before + events as i64;
    let deadline = Duration::from_secs(60 + events as u64 / 500);
    let drained = wait_for(deadline, POLL, || async {
        let seq: i64 = sqlx::query_scalar("SELECT coalesce(max(seq), 0) FROM audit_events").fetch_one(ctx.db).await?;
        Ok((seq >= target).then_some(()))
    })
    .await?;
    anyhow::ensure!(drained.is_some(), "the sink did not store {events} events within {deadline:?}");
    let wall = started.elapsed();
    let cpu = pid.and_then(stack::cpu_seconds).unwrap_or(0.0) - cpu_before;

    // Steady state from the sink's own commit times: the rows after its first
    // batch, over the time from the first batch to the last.
    let (span, rows, first_batch): (f64, i64, i64) = sqlx::query_as(
        "WITH r AS (SELECT recorded_at FROM audit_events WHERE seq > $1)
         SELECT coalesce(extract(epoch FROM max(recorded_at) - min(recorded_at))::float8, 0),
                count(*),
                count(*) FILTER (WHERE recorded_at = (SELECT min(recorded_at) FROM r))
         FROM r",
    )
    .bind(seq_before)
    .fetch_one(ctx.db)
    .await?;
    let wall_rate = events as f64 / wall.as_secs_f64();
    let steady = if span > 0.0 { (rows - first_batch) as f64 / span } else { wall_rate };
    Ok(report::Sink { events, events_per_s: steady, wall_events_per_s: wall_rate, sink_cpu_s: cpu })
}

/// Publishes every body through the shared publisher (persistent,
/// `mandatory`, pipelined confirms), a window at a time.
async fn publish_all(
    amqp: &lapin::Connection,
    exchange: &str,
    key: &str,
    bodies: impl Iterator<Item = Result<Vec<u8>, serde_json::Error>>,
) -> anyhow::Result<()> {
    const WINDOW: usize = 2_000;
    let publisher = Publisher::new(amqp).await?;
    let bodies = bodies.collect::<Result<Vec<_>, _>>()?;
    for window in bodies.chunks(WINDOW) {
        let outgoing: Vec<Outgoing<'_>> = window.iter().map(|body| Outgoing::new(exchange, key, "", body)).collect();
        publisher.publish_many(&outgoing).await?;
    }
    publisher.channel().close(200, "done".into()).await?;
    Ok(())
}

/// `n` documents written straight into the database and queued on `lane`
/// (the benchmark's bulk-load path; `seed` picks the notes).
async fn prefill(
    ctx: &Context<'_>,
    amqp: &lapin::Connection,
    topology: &Topology,
    master_key: &[u8; 32],
    lane: Lane,
    seed: u64,
    n: usize,
) -> anyhow::Result<()> {
    const CHUNK: usize = 5_000;
    let keys = Keys::new(Keyring::from_master_key(&secrecy::SecretBox::new(Box::new(*master_key))));
    // Its own blind-index key: these documents are never looked up by
    // patient, but each patient gets a data key as through the api.
    let index_key = clinflow::crypto::IndexKey::new(secrecy::SecretBox::new(Box::new(master_key.to_vec())));
    let uploader: Uuid =
        sqlx::query_scalar("SELECT id FROM users WHERE username = 'bench-ingest'").fetch_one(ctx.db).await?;
    let queue = topology.lane(lane);
    let load_started = Instant::now();
    for first in (0..n).step_by(CHUNK) {
        let notes = ctx.notes(seed + first as u64, CHUNK.min(n - first));
        let ids: Vec<Uuid> = notes.iter().map(|_| Uuid::now_v7()).collect();
        let indexes: Vec<Vec<u8>> =
            notes.iter().map(|n| documents::patient_index(&index_key, &n.patient_ref)).collect();
        let mut tx = ctx.db.begin().await?;
        let patients: Vec<PatientRef> =
            indexes.iter().zip(&notes).map(|(i, n)| PatientRef::new(i, &n.patient_ref)).collect();
        let data_keys = keys.for_patients(&mut tx, &patients).await?;
        let mut texts = Vec::with_capacity(notes.len());
        let mut patients = Vec::with_capacity(notes.len());
        let mut key_ids = Vec::with_capacity(notes.len());
        for ((id, note), index) in ids.iter().zip(&notes).zip(&indexes) {
            let key = data_keys.get(index).context("a data key per patient")?;
            texts.push(key.seal_str(documents::text_field(*id), &note.text)?);
            patients.push(key.seal_str(documents::patient_ref_field(*id), &note.patient_ref)?);
            key_ids.push(key.id());
        }
        sqlx::query(
            "WITH u AS (SELECT * FROM UNNEST($1::uuid[], $2::bytea[], $3::bytea[], $6::uuid[], $7::bytea[]) AS u(id, p, t, k, i)),
                  d AS (INSERT INTO documents (id, patient_ref_ct, uploaded_by, lane, data_key_id, patient_index, lawful_basis)
                        SELECT id, p, $4, $5, k, i, 'direct_care' FROM u)
             INSERT INTO document_texts (document_id, text_ct) SELECT id, t FROM u",
        )
        .bind(&ids)
        .bind(&patients)
        .bind(&texts)
        .bind(uploader)
        .bind(lane.as_str())
        .bind(&key_ids)
        .bind(&indexes)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        let jobs = ids.iter().map(|id| serde_json::to_vec(&DocumentJob { document_id: *id }));
        publish_all(amqp, &queue.exchange, queue.key, jobs).await?;
        if (first + CHUNK).is_multiple_of(100_000) {
            eprintln!("   loaded {} documents ({:.0} s)", first + CHUNK, load_started.elapsed().as_secs_f64());
        }
    }
    Ok(())
}

/// Live uploads (single, through the API, `rate` per second) while a
/// backfill of `n` queued documents drains with the STAND-IN: upload → done
/// latency of the live documents (from their rows' times).
#[allow(clippy::too_many_arguments)]
pub async fn lanes(
    ctx: &Context<'_>,
    stack: &mut Stack,
    client: &Client,
    amqp: &lapin::Connection,
    topology: &Topology,
    master_key: &[u8; 32],
    standin_url: &str,
    n: usize,
    rate: f64,
) -> anyhow::Result<report::Lanes> {
    stack.stop(WORKER).await?;
    prefill(ctx, amqp, topology, master_key, Lane::Backfill, 5_000_000_000, n).await?;
    let started = Instant::now();
    stack.start(WORKER, &[("MEDCAT_URL", standin_url)]).await?;
    let remaining = async || -> anyhow::Result<i64> {
        Ok(sqlx::query_scalar("SELECT count(*) FROM documents WHERE status <> 'done' AND lane = 'backfill'")
            .fetch_one(ctx.db)
            .await?)
    };
    // The backfill's progress from the worker's counter (free for the
    // database, which is what is measured here).
    let http = crate::http::client();
    let worker = stack.service(WORKER).ok_or_else(|| anyhow::anyhow!("the worker is not running"))?.metrics_url.clone();
    let backfill_done = async || -> anyhow::Result<f64> {
        let m = prom::scrape(&http, &worker).await?;
        Ok(m.sum("clinflow_worker_upload_to_done_seconds_count", &[("lane", "backfill")]))
    };
    let backfill_before = backfill_done().await?;
    // Live uploads while at least a tenth of the backfill is still waiting.
    let interval = Duration::from_secs_f64(1.0 / rate);
    let mut live = Vec::new();
    let mut next = tokio::time::Instant::now();
    let mut k = 0u64;
    while n as f64 - (backfill_done().await? - backfill_before) > (n / 10) as f64 {
        tokio::time::sleep_until(next).await;
        next += interval;
        live.push(client.upload_for_id(&ctx.notes(6_000_000_000 + k, 1)[0]).await?);
        k += 1;
        anyhow::ensure!(started.elapsed() < Duration::from_secs(3600), "backfill not drained after an hour");
    }
    let during = started.elapsed();
    let live_pending = async || -> anyhow::Result<i64> {
        Ok(sqlx::query_scalar("SELECT count(*) FROM documents WHERE id = ANY($1) AND status <> 'done'")
            .bind(&live)
            .fetch_one(ctx.db)
            .await?)
    };
    let drained = wait_for(Duration::from_secs(600), CONFIRM_POLL, || async {
        Ok((remaining().await? == 0 && live_pending().await? == 0).then_some(()))
    })
    .await?;
    anyhow::ensure!(drained.is_some(), "backfill or live documents still pending after 10 minutes");
    let latencies: Vec<f64> = sqlx::query_scalar(
        "SELECT EXTRACT(EPOCH FROM (updated_at - created_at))::float8 * 1000 FROM documents
         WHERE id = ANY($1) AND status = 'done' ORDER BY 1",
    )
    .bind(&live)
    .fetch_all(ctx.db)
    .await?;
    anyhow::ensure!(latencies.len() == live.len(), "{} of {} live documents done", latencies.len(), live.len());
    Ok(report::Lanes {
        backfill_docs: n,
        backfill_docs_per_s: n as f64 / started.elapsed().as_secs_f64(),
        live_uploads: live.len(),
        live_rate_per_s: rate,
        live_seconds: during.as_secs_f64(),
        live_p50_ms: report::percentile(&latencies, 0.50),
        live_p99_ms: report::percentile(&latencies, 0.99),
        live_max_ms: latencies.last().copied().unwrap_or(0.0),
    })
}

/// `n` documents written straight into the database and queued (the
/// benchmark's bulk-load path), then drained by a fresh worker with the
/// STAND-IN: throughput of the first and the last 100,000.
pub async fn backlog(
    ctx: &Context<'_>,
    stack: &mut Stack,
    amqp: &lapin::Connection,
    topology: &Topology,
    master_key: &[u8; 32],
    standin_url: &str,
    n: usize,
) -> anyhow::Result<report::Backlog> {
    stack.stop(WORKER).await?;
    let load_started = Instant::now();
    prefill(ctx, amqp, topology, master_key, Lane::Live, 4_000_000_000, n).await?;
    let load_s = load_started.elapsed().as_secs_f64();

    let window = 100_000.min(n / 2).max(1) as i64;
    let n = n as i64;
    let started = Instant::now();
    stack.start(WORKER, &[("MEDCAT_URL", standin_url)]).await?;
    let (mut first_window, mut last_window_start) = (None, None);
    let mut last_report = Instant::now();
    // Followed through the fresh worker's counters (a count over a million
    // documents every half second would load the database measured here),
    // then confirmed from the database.
    let http = crate::http::client();
    loop {
        let (done, failed) = worker_finished(stack, &http).await?;
        anyhow::ensure!(failed == 0.0, "{failed} documents failed (see the worker log)");
        let remaining = (n - done as i64).max(0);
        let t = started.elapsed();
        if first_window.is_none() && remaining <= n - window {
            first_window = Some(t);
        }
        if last_window_start.is_none() && remaining <= window {
            last_window_start = Some(t);
        }
        if remaining == 0 {
            break;
        }
        if last_report.elapsed() > Duration::from_secs(30) {
            eprintln!("   {} of {n} done after {:.0} s", n - remaining, t.as_secs_f64());
            last_report = Instant::now();
        }
        anyhow::ensure!(t < Duration::from_secs(6 * 3600), "backlog not drained after 6 hours");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let drain = started.elapsed();
    let (pending, failed) = document_counts(ctx.db).await?;
    anyhow::ensure!(pending == 0 && failed == 0, "after the drain: {pending} documents pending, {failed} failed");
    let first = first_window.unwrap_or(drain);
    let last = drain - last_window_start.unwrap_or_default();
    let worker_rss = report::peak_rss(stack).remove("clinflow-worker");
    Ok(report::Backlog {
        docs: n as usize,
        load_s,
        drain_s: drain.as_secs_f64(),
        window: window as usize,
        first_window_docs_per_s: window as f64 / first.as_secs_f64(),
        last_window_docs_per_s: window as f64 / last.as_secs_f64(),
        worker_peak_rss_mib: worker_rss,
    })
}

/// Removes the benchmark's queues (left over from an interrupted run, or at
/// the end of this one).
pub async fn delete_queues(amqp: &lapin::Connection, topology: &Topology) {
    if let Ok(channel) = amqp.create_channel().await {
        for wq in topology.work_queues() {
            for q in [Some(wq.queue), Some(wq.dead_queue), wq.retry_queue].into_iter().flatten() {
                let _ = channel.queue_delete(q.as_str().into(), QueueDeleteOptions::default()).await;
            }
        }
    }
}
