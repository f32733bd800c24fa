//! clinflow-worker: takes document jobs off its two lanes in batches (live
//! jobs first, backfill jobs in what is left), annotates them through
//! MedCAT's bulk endpoint and stores the results encrypted.
//!
//! Per batch (up to `size` deliveries, or what came within `max_wait` of the
//! first): claim the documents in one statement, decrypt them, audit the
//! reads (one confirm round trip for the batch), call `/api/process_bulk`
//! once, re-check alone through `/api/process` every non-blank document bulk
//! found nothing in (bulk fails silently, see ../shared/MEDCAT.md), store all
//! results and failures in one transaction, and only after the commit ack the
//! batch with one `multiple` ack per lane. Several batches are in flight,
//! each slot with a channel per lane, so MedCAT is never idle while a batch
//! is being stored.
//!
//! Failures: a job that is not JSON of a job, or names no document, is
//! poison: dead-lettered at once with the reason in `x-clinflow-reason`,
//! never retried. A document MedCAT refuses (4xx, 500, an unreadable answer)
//! is marked failed with a code and its batch-mates go on. While the
//! database is away, or MedCAT's readiness fails, the batch is held (no new
//! work, no attempt spent). A batch that still fails transiently while
//! MedCAT says it is ready — or a re-check that does — sends its jobs to
//! their lane's retry queue with one more attempt counted; past the budget
//! the document is marked failed and the job parked in `.dead`. A broker
//! failure ends the session: the connection is rebuilt (`clinflow::link`)
//! and the unsettled batch comes back by redelivery. A document that cannot
//! be decrypted means the worker runs with the wrong key: it stops, leaving
//! everything queued.

pub mod medcat;
pub mod telemetry;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use clinflow::amqp::{ATTEMPTS_HEADER, DELIVERY_LIMIT, Lane, Outgoing, Publisher, Topology};
use clinflow::audit::{self, Action, Actor, AuditEvent, Outcome};
use clinflow::crypto::CryptoError;
use clinflow::documents::{self, NewResult};
use clinflow::jobs::DocumentJob;
use clinflow::keys::Keys;
use clinflow::link::{self, LinkState, SessionEnd};
use clinflow::telemetry::{timed, timed_sync};
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};
use secrecy::SecretString;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::medcat::{MedcatClient, MedcatError, Processed};

pub const SERVICE_NAME: &str = "clinflow-worker";
/// Per-stage timings of a batch (see BENCHMARKS.md).
const STAGE: &str = "clinflow_worker_stage_seconds";

pub struct Worker {
    pub db: PgPool,
    /// The key-encryption keys and the cache of patients' data keys.
    pub keys: Arc<Keys>,
    pub medcat: MedcatClient,
    /// From `GET /api/info` at start-up; a response that names its model
    /// overrides it for that result.
    pub model_version: String,
    pub topology: Topology,
    pub batch: BatchConfig,
    pub retry: RetryConfig,
}

/// Attempts beyond the in-process retries: a job whose batch still fails
/// transiently while MedCAT says it is ready waits in its lane's retry queue
/// and comes back; after `max_attempts` it is dead-lettered and its document
/// marked failed.
#[derive(Debug, Clone, Copy)]
pub struct RetryConfig {
    pub max_attempts: u32,
    /// Wait before the second attempt; doubled for each later one.
    pub first_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self { max_attempts: 5, first_delay: Duration::from_secs(30), max_delay: Duration::from_secs(600) }
    }
}

impl RetryConfig {
    /// How long a job waits after its `attempts`-th failed attempt.
    pub fn delay(&self, attempts: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempts.saturating_sub(1).min(16));
        self.first_delay.saturating_mul(factor).min(self.max_delay)
    }
}

/// A job taken off one of the lanes.
struct Job {
    lane: Lane,
    delivery: Delivery,
}

impl Job {
    /// Attempts made before this delivery (from the retry queue's header).
    fn attempts(&self) -> u32 {
        clinflow::amqp::header_int(&self.delivery.properties, ATTEMPTS_HEADER)
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(0)
    }

    /// Deliveries of this message so far (the quorum queue's count).
    fn redeliveries(&self) -> i64 {
        clinflow::amqp::header_int(&self.delivery.properties, "x-delivery-count").unwrap_or(0)
    }
}

#[derive(Debug, Clone, Copy)]
pub struct BatchConfig {
    /// Most documents per batch (and the prefetch of each channel).
    pub size: u16,
    /// How long a batch waits for more deliveries after its first.
    pub max_wait: Duration,
    /// Batches processed at once, each on its own channel.
    pub in_flight: u16,
    /// Longest pause between two tries of a batch held by a transient failure.
    pub max_pause: Duration,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self { size: 50, max_wait: Duration::from_millis(50), in_flight: 3, max_pause: Duration::from_secs(30) }
    }
}

/// What a processed batch asks of its deliveries beyond a plain ack.
#[derive(Debug, Default)]
struct Settled {
    /// To the retry queue: a re-check that failed transiently.
    requeue: HashSet<Uuid>,
    /// Jobs naming no document: poison, dead-lettered.
    missing: HashSet<Uuid>,
}

#[derive(Debug, thiserror::Error)]
enum BatchError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("audit events not confirmed: {0}")]
    Audit(#[from] clinflow::amqp::AmqpError),
    #[error("{0}")]
    Medcat(MedcatError),
    /// Not transient: the worker holds the wrong key (or lacks a KEK).
    #[error(
        "document {0} cannot be decrypted with CLINFLOW_MASTER_KEY ({1}): is this worker started with the keys \
         the api uses? Stopping; nothing was marked failed"
    )]
    Decrypt(Uuid, CryptoError),
}

impl Worker {
    /// Consumes the live documents queue until `shutdown` fires, on a broker
    /// connection rebuilt after every broker error (see `clinflow::link`).
    /// Returns an error only for what no reconnection cures: a document
    /// that cannot be decrypted.
    pub async fn run(
        self: Arc<Self>,
        amqp_url: &SecretString,
        link: &LinkState,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        link::supervise(amqp_url, "worker", &self.topology, link, &shutdown, |connection| {
            Arc::clone(&self).session(connection, shutdown.clone())
        })
        .await
    }

    /// One connection's worth of work: a confirm channel for audit events
    /// and `in_flight` consuming channels. The first slot that fails ends
    /// the session (and stops the others).
    async fn session(self: Arc<Self>, connection: Connection, shutdown: CancellationToken) -> SessionEnd {
        let publisher = match link::within(Publisher::new(&connection)).await {
            Ok(p) => p,
            Err(end) => return end,
        };
        let stop = shutdown.child_token();
        let mut slots = tokio::task::JoinSet::new();
        for slot in 0..self.batch.in_flight {
            let channels = async {
                Ok::<_, lapin::Error>((connection.create_channel().await?, connection.create_channel().await?))
            };
            match link::within(channels).await {
                Ok(channels) => {
                    slots.spawn(Arc::clone(&self).consume(channels, publisher.clone(), slot, stop.clone()));
                }
                Err(end) => {
                    stop.cancel();
                    return end;
                }
            }
        }
        tracing::info!(
            live = self.topology.documents_live().queue,
            backfill = self.topology.documents_backfill().queue,
            batch_size = self.batch.size,
            in_flight = self.batch.in_flight,
            model_version = self.model_version,
            "worker consuming"
        );
        let mut end = SessionEnd::Shutdown;
        while let Some(ended) = slots.join_next().await {
            let ended = ended.unwrap_or_else(|e| SessionEnd::Fatal(anyhow::anyhow!("a batch loop panicked: {e}")));
            match (&end, ended) {
                (_, SessionEnd::Shutdown) => {}
                (SessionEnd::Fatal(_), _) => {}
                (_, other) => {
                    stop.cancel();
                    end = other;
                }
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), connection.close(200, "bye".into())).await;
        end
    }

    /// One slot: a channel (and consumer) per lane, batches taken live
    /// first. Each lane has its own channel so that a `multiple` ack on it
    /// covers only deliveries of that lane, all of them in this slot's
    /// batches, settled in order.
    async fn consume(
        self: Arc<Self>,
        (live, backfill): (Channel, Channel),
        publisher: Publisher,
        slot: u16,
        stop: CancellationToken,
    ) -> SessionEnd {
        let tag = Uuid::new_v4().simple().to_string();
        let subscribe = async |channel: &Channel, lane: Lane| {
            channel.basic_qos(self.batch.size, BasicQosOptions::default()).await?;
            let queue = self.topology.lane(lane).queue;
            let tag = format!("{SERVICE_NAME}-{tag}-{slot}-{}", lane.as_str());
            channel
                .basic_consume(
                    queue.as_str().into(),
                    tag.as_str().into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
        };
        let consumers = async {
            Ok::<_, lapin::Error>((subscribe(&live, Lane::Live).await?, subscribe(&backfill, Lane::Backfill).await?))
        };
        let (mut live_consumer, mut backfill_consumer) = match link::within(consumers).await {
            Ok(c) => c,
            Err(end) => return end,
        };
        let channels = Channels { live: &live, backfill: &backfill };
        loop {
            let batch = match self.next_batch(&mut live_consumer, &mut backfill_consumer, &channels, &stop).await {
                Ok(Some(batch)) => batch,
                Ok(None) => return SessionEnd::Shutdown,
                Err(e) => return SessionEnd::Broker(e),
            };
            let _in_flight = telemetry::in_flight();
            let lives = batch.iter().filter(|j| j.lane == Lane::Live).count();
            let span = tracing::info_span!("batch", slot, documents = batch.len(), live = lives);
            if let Err(end) = self.settle(batch, &channels, &publisher, &stop).instrument(span).await {
                return end;
            }
        }
    }

    /// The next batch, live jobs first, or `None` once `stop` fires while
    /// waiting for one.
    async fn next_batch(
        &self,
        live: &mut Consumer,
        backfill: &mut Consumer,
        channels: &Channels<'_>,
        stop: &CancellationToken,
    ) -> anyhow::Result<Option<Vec<Job>>> {
        let mut batch = Vec::with_capacity(usize::from(self.batch.size));
        let (live_queue, backfill_queue) =
            (self.topology.documents_live().queue, self.topology.documents_backfill().queue);
        let first = tokio::select! {
            biased;
            () = stop.cancelled() => return Ok(None),
            lost = link::lost(channels.live, &live_queue) => return Err(lost),
            lost = link::lost(channels.backfill, &backfill_queue) => return Err(lost),
            next = live.next() => Job { lane: Lane::Live, delivery: delivery(next)? },
            next = backfill.next() => Job { lane: Lane::Backfill, delivery: delivery(next)? },
        };
        batch.push(first);
        let deadline = tokio::time::Instant::now() + self.batch.max_wait;
        while batch.len() < usize::from(self.batch.size) {
            let job = tokio::select! {
                biased;
                next = live.next() => Job { lane: Lane::Live, delivery: delivery(next)? },
                next = backfill.next() => Job { lane: Lane::Backfill, delivery: delivery(next)? },
                () = tokio::time::sleep_until(deadline) => break,
            };
            batch.push(job);
        }
        metrics::histogram!("clinflow_worker_batch_size").record(batch.len() as f64);
        Ok(Some(batch))
    }

    /// Processes one batch and settles every delivery in it. `Err` ends the
    /// session: the broker is gone (the batch comes back by redelivery), or
    /// the worker cannot decrypt (the batch is requeued).
    async fn settle(
        &self,
        batch: Vec<Job>,
        channels: &Channels<'_>,
        publisher: &Publisher,
        stop: &CancellationToken,
    ) -> Result<(), SessionEnd> {
        let mut jobs: Vec<(Job, Uuid)> = Vec::with_capacity(batch.len());
        let mut parked: Vec<(Job, &'static str)> = Vec::new();
        for job in batch {
            if let Some(wait) = clinflow::amqp::queue_wait(&job.delivery.properties) {
                metrics::histogram!(STAGE, "stage" => "queue_wait", "lane" => job.lane.as_str())
                    .record(wait.as_secs_f64());
            }
            match serde_json::from_slice::<DocumentJob>(&job.delivery.data) {
                // Delivered as often as the queue allows (a worker died on it
                // each time): stop here, with its document failed, rather than
                // let the broker park it with the document left `processing`.
                Ok(j) if job.redeliveries() >= DELIVERY_LIMIT - 1 => {
                    self.fail_until_stored(&[(j.document_id, "redelivered_too_often")], stop).await?;
                    parked.push((job, "redelivered_too_often"));
                }
                Ok(j) => jobs.push((job, j.document_id)),
                Err(_) => parked.push((job, "malformed_job")),
            }
        }
        let ids: Vec<Uuid> = jobs.iter().map(|(_, id)| *id).collect();
        let mut pause = Duration::from_millis(250);
        let mut retry_later = false;
        // Set at the first hold, dropped once the batch gets through or leaves.
        let mut paused = None;
        let settled = loop {
            if ids.is_empty() {
                break Settled::default();
            }
            match self.process(&ids, publisher).await {
                Ok(settled) => break settled,
                Err(e @ BatchError::Decrypt(..)) => {
                    // Best effort: if the requeue fails, closing the channel requeues them.
                    let _ = requeue_all(jobs).await;
                    return Err(SessionEnd::Fatal(e.into()));
                }
                Err(e @ BatchError::Audit(_)) => {
                    // The broker is in trouble: start a new session. The
                    // batch, unsettled, is redelivered to it.
                    return Err(SessionEnd::Broker(anyhow::Error::new(e).context("broker gone during a batch")));
                }
                Err(e) if !channels.connected() => {
                    return Err(SessionEnd::Broker(anyhow::Error::new(e).context("broker gone during a batch")));
                }
                Err(e @ BatchError::Medcat(_)) if self.medcat.ready().await => {
                    // MedCAT says it is ready, yet the batch failed past the
                    // in-process retries: this costs each job an attempt.
                    tracing::warn!(error = %e, "batch failed while MedCAT is ready; its jobs go to the retry queue");
                    retry_later = true;
                    break Settled::default();
                }
                Err(e) => {
                    // The database, or MedCAT not ready: hold the batch and
                    // take nothing new until it passes (no attempt is spent).
                    metrics::counter!("clinflow_worker_batch_retries_total").increment(1);
                    paused.get_or_insert_with(telemetry::hold);
                    tracing::warn!(error = %e, pause_ms = pause.as_millis() as u64, "batch failed transiently; holding it");
                    let held = tokio::select! {
                        () = stop.cancelled() => None,
                        () = self.until_ready(&e, pause) => Some(()),
                    };
                    if held.is_none() {
                        return requeue_all(jobs).await;
                    }
                    pause = (pause * 2).min(self.batch.max_pause);
                }
            }
        };
        drop(paused);
        let mut acked = Vec::with_capacity(jobs.len());
        let mut again = Vec::new();
        for (job, id) in jobs {
            if retry_later || settled.requeue.contains(&id) {
                // A re-check that failed transiently also waits in the retry
                // queue (an attempt counted, a pause), rather than coming
                // straight back and spending the queue's delivery limit.
                again.push((job, id));
            } else if settled.missing.contains(&id) {
                parked.push((job, "no_such_document"));
            } else {
                acked.push(job);
            }
        }
        let (waiting, exhausted) = self.retry_later(publisher, again, stop).await?;
        acked.extend(waiting);
        parked.extend(exhausted);
        self.park(publisher, &parked).await?;
        acked.extend(parked.into_iter().map(|(job, _)| job));
        // Every other delivery of the batch has a lower tag on its lane's
        // channel, and the requeued ones are settled already.
        for lane in Lane::ALL {
            let last = acked.iter().filter(|j| j.lane == lane).max_by_key(|j| j.delivery.delivery_tag);
            if let Some(last) = last {
                let ack = channels.get(lane).basic_ack(last.delivery.delivery_tag, BasicAckOptions { multiple: true });
                link::within(ack).await?;
            }
        }
        Ok(())
    }

    /// While the batch is held: MedCAT not ready → until it is (polled every
    /// second). Anything else → `pause`, but if the database does not answer
    /// now, only until it answers again (polled every second): the pause
    /// doubles through a long outage (up to `max_pause`, 30 s), and a batch
    /// that slept it out would resume up to that long after the database's
    /// return; a database that answers and still fails the batch is retried
    /// ever more slowly.
    async fn until_ready(&self, error: &BatchError, pause: Duration) {
        const POLL: Duration = Duration::from_secs(1);
        if matches!(error, BatchError::Medcat(_)) {
            while !self.medcat.ready().await {
                tokio::time::sleep(POLL).await;
            }
            return;
        }
        let until = tokio::time::Instant::now() + pause;
        let away = !clinflow::telemetry::database_ready(&self.db).await;
        loop {
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return;
            }
            tokio::time::sleep(left.min(POLL)).await;
            if away && clinflow::telemetry::database_ready(&self.db).await {
                return;
            }
        }
    }

    /// Sends each job to its lane's retry queue with one more attempt
    /// counted, or, past `max_attempts`, marks its document failed and
    /// returns it to be parked. Returns (jobs now waiting, jobs exhausted).
    #[allow(clippy::type_complexity)]
    async fn retry_later(
        &self,
        publisher: &Publisher,
        jobs: Vec<(Job, Uuid)>,
        stop: &CancellationToken,
    ) -> Result<(Vec<Job>, Vec<(Job, &'static str)>), SessionEnd> {
        let (waiting, exhausted): (Vec<_>, Vec<_>) =
            jobs.into_iter().partition(|(job, _)| job.attempts() + 1 < self.retry.max_attempts);
        let failed: Vec<(Uuid, &str)> = exhausted.iter().map(|(_, id)| (*id, "retries_exhausted")).collect();
        self.fail_until_stored(&failed, stop).await?;
        let exchange = self.topology.retry_exchange();
        let outgoing: Vec<Outgoing<'_>> = waiting
            .iter()
            .map(|(job, _)| {
                let attempts = job.attempts() + 1;
                Outgoing {
                    attempts,
                    expiration: Some(self.retry.delay(attempts)),
                    ..Outgoing::new(&exchange, job.lane.key(), message_id(&job.delivery), &job.delivery.data)
                }
            })
            .collect();
        if !outgoing.is_empty() {
            publisher.publish_many(&outgoing).await.map_err(|e| SessionEnd::Broker(e.into()))?;
            metrics::counter!("clinflow_worker_delayed_retries_total").increment(outgoing.len() as u64);
            tracing::warn!(jobs = outgoing.len(), "jobs sent to the retry queue");
        }
        Ok((
            waiting.into_iter().map(|(job, _)| job).collect(),
            exhausted.into_iter().map(|(job, _)| (job, "retries_exhausted")).collect(),
        ))
    }

    /// Marks documents failed, retrying while the database is away (the
    /// batch is held meanwhile); `Err` only when `stop` fires first.
    async fn fail_until_stored(
        &self,
        failed: &[(Uuid, &'static str)],
        stop: &CancellationToken,
    ) -> Result<(), SessionEnd> {
        let mut pause = Duration::from_millis(250);
        while !failed.is_empty() {
            match documents::mark_failed(&self.db, failed).await {
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot mark documents failed; holding the batch");
                    tokio::select! {
                        () = stop.cancelled() => return Err(SessionEnd::Shutdown),
                        () = tokio::time::sleep(pause) => {}
                    }
                    pause = (pause * 2).min(self.batch.max_pause);
                }
            }
        }
        for (_, code) in failed {
            metrics::counter!(telemetry::DOCUMENTS, "outcome" => *code).increment(1);
        }
        Ok(())
    }

    /// Puts jobs in their lane's dead-letter queue with the reason in a
    /// header (confirmed before their deliveries are acked): never retried
    /// by the worker, kept for inspection and `dead-letters replay`. Ids
    /// only, as every job.
    async fn park(&self, publisher: &Publisher, parked: &[(Job, &'static str)]) -> Result<(), SessionEnd> {
        if parked.is_empty() {
            return Ok(());
        }
        let exchange = self.topology.dead_letter_exchange();
        let outgoing: Vec<Outgoing<'_>> = parked
            .iter()
            .map(|(job, reason)| Outgoing {
                reason: Some(reason),
                attempts: job.attempts() + 1,
                ..Outgoing::new(&exchange, job.lane.key(), message_id(&job.delivery), &job.delivery.data)
            })
            .collect();
        publisher.publish_many(&outgoing).await.map_err(|e| SessionEnd::Broker(e.into()))?;
        for (job, reason) in parked {
            tracing::warn!(bytes = job.delivery.data.len(), reason, lane = job.lane.as_str(), "job dead-lettered");
            metrics::counter!(telemetry::DEAD_LETTERED, "reason" => *reason).increment(1);
        }
        Ok(())
    }

    /// Claims, annotates and stores the documents of `ids`; says which jobs
    /// go back to the queue (a re-check that failed transiently) and which
    /// name no document at all.
    async fn process(&self, ids: &[Uuid], publisher: &Publisher) -> Result<Settled, BatchError> {
        let claimed = timed(STAGE, "claim", documents::claim_many(&self.db, ids)).await?;
        let mut settled = Settled::default();
        let unclaimed: Vec<Uuid> = ids.iter().filter(|id| !claimed.iter().any(|(c, _)| c == *id)).copied().collect();
        if !unclaimed.is_empty() {
            let existing = documents::existing(&self.db, &unclaimed).await?;
            // Finished documents (a redelivered or replayed job) are acked.
            let finished = unclaimed.iter().filter(|id| existing.contains(id)).count();
            metrics::counter!("clinflow_worker_jobs_skipped_total").increment(finished as u64);
            settled.missing = unclaimed.into_iter().filter(|id| !existing.contains(id)).collect();
        }
        if claimed.is_empty() {
            return Ok(settled);
        }
        let opener = timed(STAGE, "data_keys", self.keys.opener(&self.db, claimed.iter().map(|(_, ct)| ct.as_slice())))
            .await
            .map_err(key_error)?;
        let docs = timed_sync(STAGE, "decrypt", || {
            claimed
                .into_iter()
                .map(|(id, ct)| {
                    let text = opener.open_string(documents::text_field(id), &ct);
                    text.map(|t| (id, t)).map_err(|e| BatchError::Decrypt(id, e))
                })
                .collect::<Result<Vec<_>, _>>()
        })?;
        drop(opener);

        // Every read is on the audit trail before any text leaves for MedCAT.
        let events: Vec<AuditEvent> = docs
            .iter()
            .map(|(id, _)| {
                AuditEvent::new(Action::DocumentProcess, Actor::service(SERVICE_NAME), Outcome::Success).document(*id)
            })
            .collect();
        timed(STAGE, "audit", audit::publish_many(publisher, &self.topology, &events)).await?;

        let outcomes = timed(STAGE, "nlp", self.annotate(&docs)).await?;
        settled.requeue = timed(STAGE, "store", self.store(&docs, outcomes)).await?;
        Ok(settled)
    }

    /// One bulk call for the batch; documents it could not vouch for are
    /// re-checked alone, so one bad document never fails its batch-mates.
    async fn annotate(&self, docs: &[(Uuid, String)]) -> Result<Vec<Result<Processed, MedcatError>>, BatchError> {
        let texts: Vec<&str> = docs.iter().map(|(_, text)| text.as_str()).collect();
        let mut outcomes = match self.medcat.process_bulk(&texts).await {
            Ok(outcomes) => outcomes,
            Err(e) if e.is_transient() => return Err(BatchError::Medcat(e)),
            Err(e) => {
                tracing::warn!(error = %e, "process_bulk failed for the whole batch; taking its documents one by one");
                docs.iter().map(|_| Err(MedcatError::NotSuccessful)).collect()
            }
        };
        for ((id, text), outcome) in docs.iter().zip(outcomes.iter_mut()) {
            let vouched = outcome.as_ref().is_ok_and(|p| !p.annotations.is_empty() || text.trim().is_empty());
            if !vouched {
                metrics::counter!("clinflow_worker_rechecks_total").increment(1);
                *outcome = self.medcat.process(text, &id.to_string()).await;
            }
        }
        Ok(outcomes)
    }

    /// Seals the results (each under its document's data key, read in the
    /// same transaction) and writes them, and the failures, in one
    /// transaction; returns the documents to requeue.
    async fn store(
        &self,
        docs: &[(Uuid, String)],
        outcomes: Vec<Result<Processed, MedcatError>>,
    ) -> Result<HashSet<Uuid>, BatchError> {
        let mut done = Vec::with_capacity(docs.len());
        let mut failed: Vec<(Uuid, &str)> = Vec::new();
        let mut requeue = HashSet::new();
        for ((id, _), outcome) in docs.iter().zip(outcomes) {
            let id = *id;
            match outcome {
                Ok(p) => done.push((id, p)),
                Err(e) if e.is_transient() => {
                    tracing::warn!(document_id = %id, error = %e, "MedCAT unavailable for a re-check; the job goes to the retry queue");
                    requeue.insert(id);
                }
                Err(e) => {
                    tracing::warn!(document_id = %id, error = %e, "MedCAT could not process the document");
                    failed.push((id, e.failure_code()));
                }
            }
        }
        let mut tx = self.db.begin().await?;
        let ids: Vec<Uuid> = done.iter().map(|(id, _)| *id).collect();
        let mut targets: std::collections::HashMap<Uuid, documents::ResultTarget> =
            documents::result_targets(&mut tx, &ids).await?.into_iter().map(|t| (t.id, t)).collect();
        let wanted: Vec<Uuid> = targets.values().filter_map(|t| t.data_key_id).collect();
        let keys = self.keys.by_id(&mut *tx, &wanted).await.map_err(key_error)?;
        let mut results = Vec::with_capacity(done.len());
        for (id, processed) in done {
            // Erased (with its patient) while MedCAT read it: nothing to store.
            let Some(target) = targets.remove(&id) else {
                tracing::info!(document_id = %id, "document erased while it was processed; its result is dropped");
                continue;
            };
            let sealed = serde_json::to_vec(&processed.annotations).ok().and_then(|plain| {
                let field = documents::annotations_field(id);
                match target.data_key_id {
                    Some(key) => keys.get(&key)?.as_ref().ok()?.seal(field, &plain).ok(),
                    // A document from before envelope keys: its result is
                    // sealed as it is (format 1) until `keys migrate-v1`.
                    None => self.keys.keyring().seal_v1(field, &plain).ok(),
                }
            });
            let Some(annotations_ct) = sealed else {
                failed.push((id, "encrypt_failed"));
                continue;
            };
            // Only a document this result moves to `done` is (re)indexed.
            let indexed = target.status == "processing";
            results.push(NewResult {
                document_id: id,
                model_version: processed.model_version.unwrap_or_else(|| self.model_version.clone()),
                annotation_count: i32::try_from(processed.annotations.len()).unwrap_or(i32::MAX),
                annotations_ct,
                concepts: if indexed { clinflow::concepts::summarize(&processed.annotations) } else { Vec::new() },
                patient_index: target.patient_index.filter(|_| indexed),
                document_date: target.document_date,
                created_at: target.created_at,
                replaces: target.result_model.filter(|_| indexed),
            });
        }
        let done = documents::store_results(&mut tx, &results).await?;
        documents::mark_failed(&mut *tx, &failed).await?;
        tx.commit().await?;
        telemetry::record_done(&done);
        metrics::counter!(telemetry::DOCUMENTS, "outcome" => "done").increment(results.len() as u64);
        for (_, code) in &failed {
            metrics::counter!(telemetry::DOCUMENTS, "outcome" => *code).increment(1);
        }
        tracing::debug!(done = results.len(), failed = failed.len(), requeued = requeue.len(), "batch stored");
        Ok(requeue)
    }
}

/// A database failure while loading keys is a database failure (the batch
/// is held); a key that cannot be had is not.
fn key_error(e: clinflow::keys::KeyError) -> BatchError {
    match e {
        clinflow::keys::KeyError::Database(e) => BatchError::Db(e),
        clinflow::keys::KeyError::Crypto(e) => BatchError::Decrypt(Uuid::nil(), e),
    }
}

/// The consuming channel of each lane, for one slot.
struct Channels<'a> {
    live: &'a Channel,
    backfill: &'a Channel,
}

impl Channels<'_> {
    fn get(&self, lane: Lane) -> &Channel {
        match lane {
            Lane::Live => self.live,
            Lane::Backfill => self.backfill,
        }
    }

    fn connected(&self) -> bool {
        self.live.status().connected() && self.backfill.status().connected()
    }
}

fn message_id(delivery: &Delivery) -> &str {
    delivery.properties.message_id().as_ref().map_or("", |m| m.as_str())
}

/// A delivery from the consumer stream; an error or its end means the
/// channel is gone (the session is rebuilt), never a quiet exit.
fn delivery(next: Option<Result<Delivery, lapin::Error>>) -> anyhow::Result<Delivery> {
    match next {
        Some(Ok(delivery)) => Ok(delivery),
        Some(Err(e)) => Err(anyhow::Error::new(e).context("document consumer")),
        None => anyhow::bail!("the broker closed the document consumer"),
    }
}

async fn requeue_all(jobs: Vec<(Job, Uuid)>) -> Result<(), SessionEnd> {
    for (job, _) in jobs {
        link::settle(job.delivery.nack(BasicNackOptions { requeue: true, multiple: false })).await?;
    }
    Ok(())
}
