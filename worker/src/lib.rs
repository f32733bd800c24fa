//! clinflow-worker: takes document jobs off the queue, annotates them with
//! MedCAT and stores the result encrypted.
//!
//! Per delivery: claim the document, decrypt it, audit the read, call MedCAT
//! (retrying transient failures with backoff), then store the encrypted result
//! and mark the document done in one transaction — and only after the commit
//! ack the message. A malformed message is dead-lettered, a document MedCAT
//! refuses is marked failed, and anything transient is requeued (the quorum
//! queue's delivery limit dead-letters it if it never succeeds).

pub mod medcat;

use std::sync::Arc;

use clinflow::amqp::{Publisher, Topology};
use clinflow::audit::{self, Action, Actor, AuditEvent, Outcome};
use clinflow::crypto::Keyring;
use clinflow::documents::{self, Claim};
use clinflow::jobs::DocumentJob;
use clinflow::telemetry::{timed, timed_sync};
use futures_util::StreamExt;
use lapin::Channel;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, BasicRejectOptions};
use lapin::types::FieldTable;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::medcat::MedcatClient;

pub const SERVICE_NAME: &str = "clinflow-worker";
/// Per-stage timings of one document (see BENCHMARKS.md).
const STAGE: &str = "clinflow_worker_stage_seconds";

pub struct Worker {
    pub db: PgPool,
    pub keyring: Arc<Keyring>,
    pub medcat: MedcatClient,
    /// From `GET /api/info` at start-up; a response that names its model
    /// overrides it for that result.
    pub model_version: String,
    pub publisher: Publisher,
    pub topology: Topology,
}

/// What to do with a delivery once handling is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    Ack,
    /// Reject without requeue: the dead-letter queue keeps it.
    DeadLetter,
    /// Put back for another attempt.
    Requeue,
}

#[derive(Debug, thiserror::Error)]
enum Transient {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("audit event not confirmed: {0}")]
    Audit(#[from] clinflow::amqp::AmqpError),
    #[error("{0}")]
    Medcat(medcat::MedcatError),
}

impl Worker {
    /// Consumes the live documents queue until `shutdown` fires; deliveries in
    /// progress are finished and acked, prefetched ones go back to the queue
    /// when the channel closes.
    pub async fn run(
        self: Arc<Self>,
        channel: Channel,
        prefetch: u16,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        channel.basic_qos(prefetch, BasicQosOptions::default()).await?;
        let queue = self.topology.documents_live().queue;
        let tag = format!("{SERVICE_NAME}-{}", Uuid::new_v4().simple());
        let consumer = channel
            .basic_consume(
                queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        tracing::info!(queue, prefetch, model_version = self.model_version, "worker consuming");
        consumer
            .take_until(shutdown.cancelled_owned())
            .for_each_concurrent(usize::from(prefetch), |delivery| {
                let worker = Arc::clone(&self);
                async move {
                    match delivery {
                        Ok(delivery) => worker.settle(delivery).await,
                        Err(e) => tracing::error!(error = %e, "consumer error"),
                    }
                }
            })
            .await;
        Ok(())
    }

    async fn settle(&self, delivery: Delivery) {
        if let Some(wait) = clinflow::amqp::queue_wait(&delivery.properties) {
            metrics::histogram!(STAGE, "stage" => "queue_wait").record(wait.as_secs_f64());
        }
        let disposition = self.handle(&delivery.data).await;
        metrics::counter!("clinflow_worker_deliveries_total", "disposition" => format!("{disposition:?}").to_lowercase()).increment(1);
        let settled = match disposition {
            Disposition::Ack => delivery.ack(BasicAckOptions::default()).await,
            Disposition::DeadLetter => delivery.reject(BasicRejectOptions { requeue: false }).await,
            Disposition::Requeue => delivery.nack(BasicNackOptions { requeue: true, multiple: false }).await,
        };
        if let Err(e) = settled {
            // The broker redelivers an unsettled message; the claim makes
            // that safe.
            tracing::error!(error = %e, ?disposition, "could not settle delivery");
        }
    }

    /// Handles one job body. Public so tests can drive it without a queue.
    pub async fn handle(&self, body: &[u8]) -> Disposition {
        let Ok(job) = serde_json::from_slice::<DocumentJob>(body) else {
            tracing::warn!(bytes = body.len(), "malformed job message; dead-lettering it");
            metrics::counter!("clinflow_worker_malformed_total").increment(1);
            return Disposition::DeadLetter;
        };
        let id = job.document_id;
        let span = tracing::info_span!("document", document_id = %id);
        match self.process(id).instrument(span).await {
            Ok(disposition) => disposition,
            Err(e) => {
                tracing::warn!(error = %e, "transient failure; requeueing");
                Disposition::Requeue
            }
        }
    }

    async fn process(&self, id: Uuid) -> Result<Disposition, Transient> {
        let mut conn = self.db.acquire().await?;
        let text_ct = match timed(STAGE, "claim", documents::claim(&mut conn, id)).await? {
            Claim::Claimed { text_ct, .. } => text_ct,
            Claim::Finished => {
                tracing::info!("document finished already; acking the duplicate job");
                return Ok(Disposition::Ack);
            }
            Claim::Missing => {
                tracing::warn!("no such document; acking the job");
                return Ok(Disposition::Ack);
            }
        };
        drop(conn);
        let opened = timed_sync(STAGE, "decrypt", || self.keyring.open_string(documents::text_field(id), &text_ct));
        let Ok(text) = opened else {
            return self.fail(id, "decrypt_failed").await;
        };

        let event =
            AuditEvent::new(Action::DocumentProcess, Actor::service(SERVICE_NAME), Outcome::Success).document(id);
        timed(STAGE, "audit", audit::publish(&self.publisher, &self.topology, &event)).await?;

        let started = std::time::Instant::now();
        let processed = match timed(STAGE, "nlp", self.medcat.process(&text, &id.to_string())).await {
            Ok(p) => p,
            Err(e) if e.is_transient() => return Err(Transient::Medcat(e)),
            Err(e) => {
                tracing::warn!(error = %e, "MedCAT refused the document");
                return self.fail(id, "nlp_rejected").await;
            }
        };
        metrics::histogram!("clinflow_worker_nlp_seconds").record(started.elapsed().as_secs_f64());

        let stored_at = std::time::Instant::now();
        let model_version = processed.model_version.as_deref().unwrap_or(&self.model_version);
        let plain = serde_json::to_vec(&processed.annotations).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
        let Ok(sealed) = self.keyring.seal(documents::annotations_field(id), &plain) else {
            return self.fail(id, "encrypt_failed").await;
        };
        let count = i32::try_from(processed.annotations.len()).unwrap_or(i32::MAX);
        let mut tx = self.db.begin().await?;
        documents::store_result(&mut tx, id, model_version, &sealed, count).await?;
        tx.commit().await?;
        metrics::histogram!(STAGE, "stage" => "store").record(stored_at.elapsed().as_secs_f64());
        metrics::counter!("clinflow_worker_documents_total", "outcome" => "done").increment(1);
        tracing::info!(annotations = count, model_version, "document done");
        Ok(Disposition::Ack)
    }

    async fn fail(&self, id: Uuid, code: &'static str) -> Result<Disposition, Transient> {
        documents::mark_failed(&self.db, id, code).await?;
        metrics::counter!("clinflow_worker_documents_total", "outcome" => code).increment(1);
        tracing::warn!(failure_code = code, "document failed");
        Ok(Disposition::Ack)
    }
}
