//! The work on a batch's documents: claim them in one statement, decrypt
//! them, audit the reads, annotate them (`annotate`), and store the results
//! (sealed under each document's data key) and the failures in one
//! transaction.

use std::collections::{HashMap, HashSet};

use clinflow::amqp::Publisher;
use clinflow::audit::{self, Action, Actor, AuditEvent, Outcome};
use clinflow::crypto::CryptoError;
use clinflow::documents::{self, results::NewResult, results::ResultTarget};
use clinflow::telemetry::{timed, timed_sync};
use sqlx::PgConnection;
use tracing::Span;
use uuid::Uuid;

use crate::annotate::Outcomes;
use crate::medcat::{MedcatError, Processed};
use crate::telemetry::{self, STAGE};
use crate::worker::{SERVICE_NAME, Worker};

/// What a processed batch asks of its deliveries beyond a plain ack.
#[derive(Debug, Default)]
pub(crate) struct Settled {
    /// To the retry queue: a re-check that failed transiently.
    pub(crate) requeue: HashSet<Uuid>,
    /// Jobs naming no document: poison, dead-lettered.
    pub(crate) missing: HashSet<Uuid>,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum BatchError {
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

/// A document's id and its ciphertext, as claimed.
type Claimed = (Uuid, Vec<u8>);

impl Worker {
    /// Claims, annotates and stores the documents of `ids`; says which jobs
    /// go back to the queue (a re-check that failed transiently) and which
    /// name no document at all.
    pub(crate) async fn process(&self, ids: &[Uuid], publisher: &Publisher) -> Result<Settled, BatchError> {
        let (claimed, missing) = self.claim(ids).await?;
        let mut settled = Settled { missing, ..Settled::default() };
        if claimed.is_empty() {
            return Ok(settled);
        }
        let docs = self.decrypt(claimed).await?;
        // Every read is on the audit trail before any text leaves for MedCAT.
        self.audit_reads(&docs, publisher).await?;
        let outcomes = timed(STAGE, "nlp", self.annotate(&docs)).await.map_err(BatchError::Medcat)?;
        settled.requeue = timed(STAGE, "store", self.store(&docs, outcomes)).await?;
        Ok(settled)
    }

    /// Claims the documents still to process; returns them and the ids that
    /// name no document. A finished document (a redelivered or replayed
    /// job) is neither: its job is acked.
    #[tracing::instrument(skip_all, fields(documents = ids.len(), claimed, finished, missing))]
    async fn claim(&self, ids: &[Uuid]) -> Result<(Vec<Claimed>, HashSet<Uuid>), BatchError> {
        let claimed = timed(STAGE, "claim", documents::results::claim_many(&self.db, ids)).await?;
        Span::current().record("claimed", claimed.len());
        let unclaimed: Vec<Uuid> = ids.iter().filter(|id| !claimed.iter().any(|(c, _)| c == *id)).copied().collect();
        if unclaimed.is_empty() {
            return Ok((claimed, HashSet::new()));
        }
        let existing = documents::results::existing(&self.db, &unclaimed).await?;
        let finished = unclaimed.iter().filter(|id| existing.contains(id)).count();
        metrics::counter!("clinflow_worker_jobs_skipped_total").increment(finished as u64);
        let missing: HashSet<Uuid> = unclaimed.into_iter().filter(|id| !existing.contains(id)).collect();
        Span::current().record("finished", finished).record("missing", missing.len());
        Ok((claimed, missing))
    }

    /// Opens the claimed texts with their data keys (one query for the
    /// keys not cached).
    #[tracing::instrument(skip_all, fields(documents = claimed.len()))]
    async fn decrypt(&self, claimed: Vec<Claimed>) -> Result<Vec<(Uuid, String)>, BatchError> {
        let opener = timed(STAGE, "data_keys", self.keys.opener(&self.db, claimed.iter().map(|(_, ct)| ct.as_slice())))
            .await
            .map_err(key_error)?;
        timed_sync(STAGE, "decrypt", || {
            claimed
                .into_iter()
                .map(|(id, ct)| {
                    let text = opener.open_string(documents::text_field(id), &ct);
                    text.map(|t| (id, t)).map_err(|e| BatchError::Decrypt(id, e))
                })
                .collect::<Result<Vec<_>, _>>()
        })
    }

    /// Puts the reads on the audit trail: one event per document, one
    /// confirm round trip for the batch.
    #[tracing::instrument(skip_all, fields(events = docs.len()))]
    async fn audit_reads(&self, docs: &[(Uuid, String)], publisher: &Publisher) -> Result<(), BatchError> {
        let events: Vec<AuditEvent> = docs
            .iter()
            .map(|(id, _)| {
                AuditEvent::new(Action::DocumentProcess, Actor::service(SERVICE_NAME), Outcome::Success).document(*id)
            })
            .collect();
        timed(STAGE, "audit", audit::publish_many(publisher, &self.topology, &self.audit_signer, &events)).await?;
        Ok(())
    }

    /// Seals the results (each under its document's data key, read in the
    /// same transaction) and writes them, and the failures, in one
    /// transaction; returns the documents to requeue.
    #[tracing::instrument(skip_all, fields(documents = docs.len(), done, failed, requeued))]
    async fn store(&self, docs: &[(Uuid, String)], outcomes: Outcomes) -> Result<HashSet<Uuid>, BatchError> {
        let Sorted { done, mut failed, requeue } = sort(docs, outcomes);
        let mut tx = self.db.begin().await?;
        let results = self.seal(&mut tx, done, &mut failed).await?;
        let done = documents::results::store_results(&mut tx, &results).await?;
        documents::results::mark_failed(&mut *tx, &failed).await?;
        tx.commit().await?;
        telemetry::record_done(&done);
        metrics::counter!(telemetry::DOCUMENTS, "outcome" => "done").increment(results.len() as u64);
        for (_, code) in &failed {
            metrics::counter!(telemetry::DOCUMENTS, "outcome" => *code).increment(1);
        }
        tracing::debug!(done = results.len(), failed = failed.len(), requeued = requeue.len(), "batch stored");
        Span::current().record("done", results.len()).record("failed", failed.len()).record("requeued", requeue.len());
        Ok(requeue)
    }

    /// The results to write, each sealed under its document's data key; a
    /// result that cannot be sealed fails its document instead.
    async fn seal(
        &self,
        conn: &mut PgConnection,
        done: Vec<(Uuid, Processed)>,
        failed: &mut Vec<(Uuid, &'static str)>,
    ) -> Result<Vec<NewResult>, BatchError> {
        let ids: Vec<Uuid> = done.iter().map(|(id, _)| *id).collect();
        let mut targets: HashMap<Uuid, ResultTarget> =
            documents::results::result_targets(conn, &ids).await?.into_iter().map(|t| (t.id, t)).collect();
        let wanted: Vec<Uuid> = targets.values().filter_map(|t| t.data_key_id).collect();
        let keys = self.keys.by_id(&mut *conn, &wanted).await.map_err(key_error)?;
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
            match sealed {
                Some(annotations_ct) => results.push(self.new_result(id, processed, target, annotations_ct)),
                None => failed.push((id, "encrypt_failed")),
            }
        }
        Ok(results)
    }

    fn new_result(&self, id: Uuid, processed: Processed, target: ResultTarget, annotations_ct: Vec<u8>) -> NewResult {
        // Only a document this result moves to `done` is (re)indexed.
        let indexed = target.status == "processing";
        NewResult {
            document_id: id,
            model_version: processed.model_version.unwrap_or_else(|| self.model_version.clone()),
            annotation_count: i32::try_from(processed.annotations.len()).unwrap_or(i32::MAX),
            annotations_ct,
            concepts: if indexed { clinflow::concepts::summarize(&processed.annotations) } else { Vec::new() },
            patient_index: target.patient_index.filter(|_| indexed),
            document_date: target.document_date,
            created_at: target.created_at,
            replaces: target.result_model.filter(|_| indexed),
        }
    }
}

/// A batch's MedCAT outcomes, sorted.
struct Sorted {
    done: Vec<(Uuid, Processed)>,
    /// With their failure codes.
    failed: Vec<(Uuid, &'static str)>,
    /// Re-checks that failed transiently: to the retry queue.
    requeue: HashSet<Uuid>,
}

fn sort(docs: &[(Uuid, String)], outcomes: Outcomes) -> Sorted {
    let mut sorted = Sorted { done: Vec::with_capacity(docs.len()), failed: Vec::new(), requeue: HashSet::new() };
    for ((id, _), outcome) in docs.iter().zip(outcomes) {
        let id = *id;
        match outcome {
            Ok(p) => sorted.done.push((id, p)),
            Err(e) if e.is_transient() => {
                tracing::warn!(document_id = %id, error = %e, "MedCAT unavailable for a re-check; the job goes to the retry queue");
                sorted.requeue.insert(id);
            }
            Err(e) => {
                tracing::warn!(document_id = %id, error = %e, "MedCAT could not process the document");
                sorted.failed.push((id, e.failure_code()));
            }
        }
    }
    sorted
}

/// A database failure while loading keys is a database failure (the batch
/// is held); a key that cannot be had is not.
fn key_error(e: clinflow::keys::KeyError) -> BatchError {
    match e {
        clinflow::keys::KeyError::Database(e) => BatchError::Db(e),
        clinflow::keys::KeyError::Crypto(e) => BatchError::Decrypt(Uuid::nil(), e),
    }
}
