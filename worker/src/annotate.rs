//! A batch's texts through MedCAT: one `/api/process_bulk` call, then a
//! re-check alone through `/api/process` of every document bulk could not
//! vouch for. Bulk fails silently: a document MedCAT raised on comes back
//! with no annotations and no error (the contract check,
//! dev/medcat/check_contract.py, tests exactly that), so an empty answer
//! for a non-blank text is asked again.

use tracing::Span;
use uuid::Uuid;

use crate::medcat::{MedcatError, Processed};
use crate::worker::Worker;

/// Each document's annotations, or why MedCAT gave none.
pub(crate) type Outcomes = Vec<Result<Processed, MedcatError>>;

impl Worker {
    /// One bulk call for the batch; documents it could not vouch for are
    /// re-checked alone, so one bad document never fails its batch-mates.
    /// `Err` only when the bulk call fails transiently.
    pub(crate) async fn annotate(&self, docs: &[(Uuid, String)]) -> Result<Outcomes, MedcatError> {
        let mut outcomes = self.bulk(docs).await?;
        self.recheck(docs, &mut outcomes).await;
        Ok(outcomes)
    }

    /// The bulk call; a failure that is not transient fails no document
    /// yet: each is then re-checked alone.
    #[tracing::instrument(skip_all, fields(documents = docs.len(), outcome))]
    async fn bulk(&self, docs: &[(Uuid, String)]) -> Result<Outcomes, MedcatError> {
        let texts: Vec<&str> = docs.iter().map(|(_, text)| text.as_str()).collect();
        let outcomes = match self.medcat.process_bulk(&texts).await {
            Ok(outcomes) => outcomes,
            Err(e) if e.is_transient() => {
                Span::current().record("outcome", "unavailable");
                return Err(e);
            }
            Err(e) => {
                Span::current().record("outcome", "failed");
                tracing::warn!(error = %e, "process_bulk failed for the whole batch; taking its documents one by one");
                return Ok(docs.iter().map(|_| Err(MedcatError::NotSuccessful)).collect());
            }
        };
        Span::current().record("outcome", "ok");
        Ok(outcomes)
    }

    /// Asks again, alone, for every document bulk found nothing in (or
    /// failed on), unless its text is blank.
    #[tracing::instrument(skip_all, fields(documents = docs.len(), rechecked))]
    async fn recheck(&self, docs: &[(Uuid, String)], outcomes: &mut Outcomes) {
        let mut rechecked = 0_usize;
        for ((id, text), outcome) in docs.iter().zip(outcomes.iter_mut()) {
            let vouched = outcome.as_ref().is_ok_and(|p| !p.annotations.is_empty() || text.trim().is_empty());
            if !vouched {
                metrics::counter!("clinflow_worker_rechecks_total").increment(1);
                *outcome = self.medcat.process(text, &id.to_string()).await;
                rechecked += 1;
            }
        }
        Span::current().record("rechecked", rechecked);
    }
}
