//! The retry and parking policy: every delivery of a batch is acked, sent
//! to its lane's retry queue, parked in its `.dead` queue or requeued —
//! none is left unsettled. In the order [`Worker::settle`] applies it:
//!
//! 1. A delivery that is not JSON of a job is poison: parked at once
//!    (`malformed_job`), never retried. A job delivered as often as the
//!    queue allows (a worker died on it each time) has its document marked
//!    failed and is parked (`redelivered_too_often`).
//! 2. The rest are processed (`store`). While the database is away, or
//!    MedCAT's readiness fails, the batch is held: no new work, no attempt
//!    spent. A document that cannot be decrypted requeues the batch and
//!    stops the worker; a broker failure ends the session (the batch comes
//!    back by redelivery).
//! 3. A batch that still fails transiently while MedCAT says it is ready,
//!    and a re-check that does, send their jobs to the lane's retry queue
//!    with one more attempt counted; past `max_attempts` the document is
//!    marked failed and the job parked (`retries_exhausted`). A job naming
//!    no document is parked (`no_such_document`).
//! 4. Parked jobs are confirmed in `.dead` before anything is acked; then
//!    one `multiple` ack per lane settles the batch.

use std::time::Duration;

use clinflow::amqp::{DELIVERY_LIMIT, Lane, Outgoing, Publisher};
use clinflow::documents;
use clinflow::link::{self, SessionEnd};
use lapin::options::{BasicAckOptions, BasicNackOptions};
use tokio_util::sync::CancellationToken;
use tracing::Span;
use uuid::Uuid;

use crate::job::{Channels, Job};
use crate::store::{BatchError, Settled};
use crate::telemetry::{self, STAGE};
use crate::worker::Worker;

/// A job and the document it names.
type Named = (Job, Uuid);
/// A job for its lane's `.dead` queue, and why.
type Parked = (Job, &'static str);

/// How a batch's processing ended.
enum Processed {
    /// It got through: every job is acked but those `Settled` names.
    Through(Settled),
    /// It failed transiently while MedCAT said it was ready: every job
    /// goes to the retry queue, an attempt counted.
    RetryLater,
}

/// What a failed try of a batch leads to, when the session goes on.
enum Failure {
    /// The database, or MedCAT not ready: hold the batch and try again.
    Hold(BatchError),
    RetryLater,
}

impl Worker {
    /// Processes one batch and settles every delivery in it. `Err` ends the
    /// session: the broker is gone (the batch comes back by redelivery), or
    /// the worker cannot decrypt (the batch is requeued).
    pub(crate) async fn settle(
        &self,
        batch: Vec<Job>,
        channels: &Channels<'_>,
        publisher: &Publisher,
        stop: &CancellationToken,
    ) -> Result<(), SessionEnd> {
        let (jobs, parked) = self.read_jobs(batch, stop).await?;
        let Some(processed) = self.process_held(&jobs, channels, publisher, stop).await? else {
            // `stop` fired while the batch was held; its jobs are requeued.
            return Ok(());
        };
        self.conclude(jobs, parked, processed, channels, publisher, stop).await
    }

    /// Reads each delivery's job; poison, and a job delivered as often as
    /// the queue allows, go straight to `parked`. The latter is stopped
    /// here, its document failed, rather than let the broker park it with
    /// the document left `processing`.
    async fn read_jobs(
        &self,
        batch: Vec<Job>,
        stop: &CancellationToken,
    ) -> Result<(Vec<Named>, Vec<Parked>), SessionEnd> {
        let mut jobs = Vec::with_capacity(batch.len());
        let mut parked = Vec::new();
        for job in batch {
            if let Some(wait) = clinflow::amqp::queue_wait(&job.delivery.properties) {
                metrics::histogram!(STAGE, "stage" => "queue_wait", "lane" => job.lane.as_str())
                    .record(wait.as_secs_f64());
            }
            match clinflow::jobs::decode(&job.delivery.data) {
                Ok(j) if job.redeliveries() >= DELIVERY_LIMIT - 1 => {
                    self.fail_until_stored(&[(j.document_id, "redelivered_too_often")], stop).await?;
                    parked.push((job, "redelivered_too_often"));
                }
                Ok(j) => jobs.push((job, j.document_id)),
                Err(_) => parked.push((job, "malformed_job")),
            }
        }
        Ok((jobs, parked))
    }

    /// Processes the batch until it gets through, holding it (no new work,
    /// no attempt spent) while the database is away or MedCAT is not
    /// ready. `None`: `stop` fired while it was held; its jobs are requeued.
    async fn process_held(
        &self,
        jobs: &[Named],
        channels: &Channels<'_>,
        publisher: &Publisher,
        stop: &CancellationToken,
    ) -> Result<Option<Processed>, SessionEnd> {
        let ids: Vec<Uuid> = jobs.iter().map(|(_, id)| *id).collect();
        if ids.is_empty() {
            return Ok(Some(Processed::Through(Settled::default())));
        }
        let mut pause = Duration::from_millis(250);
        // Set at the first hold, dropped once the batch gets through or leaves.
        let mut paused = None;
        loop {
            let failure = match self.process(&ids, publisher).await {
                Ok(settled) => return Ok(Some(Processed::Through(settled))),
                Err(error) => self.classify(error, jobs, channels).await?,
            };
            let error = match failure {
                Failure::RetryLater => return Ok(Some(Processed::RetryLater)),
                Failure::Hold(error) => error,
            };
            metrics::counter!("clinflow_worker_batch_retries_total").increment(1);
            paused.get_or_insert_with(telemetry::hold);
            tracing::warn!(error = %error, pause_ms = pause.as_millis() as u64, "batch failed transiently; holding it");
            let held = tokio::select! {
                () = stop.cancelled() => false,
                () = self.until_ready(&error, pause) => true,
            };
            if !held {
                requeue_all(jobs).await?;
                return Ok(None);
            }
            pause = (pause * 2).min(self.batch.max_pause);
        }
    }

    /// What a failed try of the batch leads to. `Err` ends the session: a
    /// document that cannot be decrypted (the batch is requeued first), or
    /// the broker in trouble (the batch, unsettled, is redelivered to the
    /// next session).
    async fn classify(
        &self,
        error: BatchError,
        jobs: &[Named],
        channels: &Channels<'_>,
    ) -> Result<Failure, SessionEnd> {
        match error {
            e @ BatchError::Decrypt(..) => {
                // Best effort: if the requeue fails, closing the channel requeues them.
                let _ = requeue_all(jobs).await;
                Err(SessionEnd::Fatal(e.into()))
            }
            e @ BatchError::Audit(_) => Err(broker_gone(e)),
            e if !channels.connected() => Err(broker_gone(e)),
            e @ BatchError::Medcat(_) if self.medcat.ready().await => {
                // MedCAT says it is ready, yet the batch failed past the
                // in-process retries: this costs each job an attempt.
                tracing::warn!(error = %e, "batch failed while MedCAT is ready; its jobs go to the retry queue");
                Ok(Failure::RetryLater)
            }
            e => Ok(Failure::Hold(e)),
        }
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

    /// Settles the jobs of a batch that got through (or is to be retried):
    /// retried, parked, and every other acked.
    #[tracing::instrument(skip_all, name = "settle", fields(jobs = jobs.len() + parked.len(), retried, parked))]
    async fn conclude(
        &self,
        jobs: Vec<Named>,
        mut parked: Vec<Parked>,
        processed: Processed,
        channels: &Channels<'_>,
        publisher: &Publisher,
        stop: &CancellationToken,
    ) -> Result<(), SessionEnd> {
        let (mut acked, again) = sort_out(jobs, &processed, &mut parked);
        let (waiting, exhausted) = self.retry_later(publisher, again, stop).await?;
        Span::current().record("retried", waiting.len());
        acked.extend(waiting);
        parked.extend(exhausted);
        self.park(publisher, &parked).await?;
        Span::current().record("parked", parked.len());
        acked.extend(parked.into_iter().map(|(job, _)| job));
        ack(channels, &acked).await
    }

    /// Sends each job to its lane's retry queue with one more attempt
    /// counted, or, past `max_attempts`, marks its document failed and
    /// returns it to be parked. Returns (jobs now waiting, jobs exhausted).
    #[tracing::instrument(skip_all, fields(jobs = jobs.len(), exhausted))]
    async fn retry_later(
        &self,
        publisher: &Publisher,
        jobs: Vec<Named>,
        stop: &CancellationToken,
    ) -> Result<(Vec<Job>, Vec<Parked>), SessionEnd> {
        let (waiting, exhausted): (Vec<_>, Vec<_>) =
            jobs.into_iter().partition(|(job, _)| job.attempts() + 1 < self.retry.max_attempts);
        Span::current().record("exhausted", exhausted.len());
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
                    ..Outgoing::new(&exchange, job.lane.key(), job.message_id(), &job.delivery.data)
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
    #[tracing::instrument(skip_all, fields(documents = failed.len()))]
    async fn fail_until_stored(
        &self,
        failed: &[(Uuid, &'static str)],
        stop: &CancellationToken,
    ) -> Result<(), SessionEnd> {
        let mut pause = Duration::from_millis(250);
        while !failed.is_empty() {
            match documents::results::mark_failed(&self.db, failed).await {
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
    #[tracing::instrument(skip_all, fields(jobs = parked.len()))]
    async fn park(&self, publisher: &Publisher, parked: &[Parked]) -> Result<(), SessionEnd> {
        if parked.is_empty() {
            return Ok(());
        }
        let exchange = self.topology.dead_letter_exchange();
        let outgoing: Vec<Outgoing<'_>> = parked
            .iter()
            .map(|(job, reason)| Outgoing {
                reason: Some(reason),
                attempts: job.attempts() + 1,
                ..Outgoing::new(&exchange, job.lane.key(), job.message_id(), &job.delivery.data)
            })
            .collect();
        publisher.publish_many(&outgoing).await.map_err(|e| SessionEnd::Broker(e.into()))?;
        for (job, reason) in parked {
            tracing::warn!(bytes = job.delivery.data.len(), reason, lane = job.lane.as_str(), "job dead-lettered");
            metrics::counter!(telemetry::DEAD_LETTERED, "reason" => *reason).increment(1);
        }
        Ok(())
    }
}

/// Splits the processed jobs into those to ack and those for the retry
/// queue; a job naming no document goes to `parked`.
fn sort_out(jobs: Vec<Named>, processed: &Processed, parked: &mut Vec<Parked>) -> (Vec<Job>, Vec<Named>) {
    let mut acked = Vec::with_capacity(jobs.len());
    let mut again = Vec::new();
    for (job, id) in jobs {
        match processed {
            // A re-check that failed transiently also waits in the retry
            // queue (an attempt counted, a pause), rather than coming
            // straight back and spending the queue's delivery limit.
            Processed::RetryLater => again.push((job, id)),
            Processed::Through(settled) if settled.requeue.contains(&id) => again.push((job, id)),
            Processed::Through(settled) if settled.missing.contains(&id) => parked.push((job, "no_such_document")),
            Processed::Through(_) => acked.push(job),
        }
    }
    (acked, again)
}

/// One `multiple` ack per lane, on its highest tag: every other delivery
/// of the batch has a lower tag on its lane's channel, and the requeued
/// ones are settled already.
async fn ack(channels: &Channels<'_>, acked: &[Job]) -> Result<(), SessionEnd> {
    for lane in Lane::ALL {
        let last = acked.iter().filter(|j| j.lane == lane).max_by_key(|j| j.delivery.delivery_tag);
        if let Some(last) = last {
            let ack = channels.get(lane).basic_ack(last.delivery.delivery_tag, BasicAckOptions { multiple: true });
            link::within(ack).await?;
        }
    }
    Ok(())
}

fn broker_gone(e: BatchError) -> SessionEnd {
    SessionEnd::Broker(anyhow::Error::new(e).context("broker gone during a batch"))
}

async fn requeue_all(jobs: &[Named]) -> Result<(), SessionEnd> {
    for (job, _) in jobs {
        link::settle(job.delivery.nack(BasicNackOptions { requeue: true, multiple: false })).await?;
    }
    Ok(())
}
