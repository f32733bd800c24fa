//! `wait`: polls every id in the state file until each document is `done` or
//! `failed`, or the timeout passes, and tallies the concepts found. Each
//! round asks about the documents still pending, `concurrency` at a time.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::client::{ApiClient, ApiError, DocumentStatus, DocumentView};
use crate::progress::Progress;
use crate::state::{self, StateError};
use crate::summary::{ConceptTally, WaitSummary};

pub struct WaitOptions {
    pub state: PathBuf,
    pub concurrency: usize,
    pub timeout: Duration,
    pub poll_interval: Duration,
    pub top: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("state file {} not found: nothing to wait for (run `load` first, or pass --state)", .0.display())]
    NoState(PathBuf),
    #[error("this user may not read documents (a clinician account is needed): {0}")]
    Forbidden(#[source] ApiError),
    #[error("asking for document {id} failed: {error}")]
    Api {
        id: Uuid,
        #[source]
        error: ApiError,
    },
}

#[derive(Default)]
struct Tally {
    done: u64,
    failed: u64,
    concepts: ConceptTally,
}

impl Tally {
    /// Applies one answer; returns whether the document reached a final state.
    fn apply(&mut self, id: Uuid, answer: Result<DocumentView, ApiError>) -> Result<bool, WaitError> {
        match answer {
            Ok(view) => match view.status {
                DocumentStatus::Done => {
                    self.done += 1;
                    self.concepts.add_document(view.annotations.as_deref().unwrap_or_default());
                    Ok(true)
                }
                DocumentStatus::Failed => {
                    tracing::warn!(%id, "document processing failed");
                    self.failed += 1;
                    Ok(true)
                }
                DocumentStatus::Queued | DocumentStatus::Processing | DocumentStatus::Unknown => Ok(false),
            },
            Err(error @ (ApiError::NotFound { .. } | ApiError::Rejected { .. })) => {
                tracing::warn!(%id, %error, "document cannot be read; counted as failed");
                self.failed += 1;
                Ok(true)
            }
            Err(error) if error.is_transient() => {
                tracing::warn!(%id, %error, "no answer; will ask again");
                Ok(false)
            }
            Err(error @ ApiError::Forbidden { .. }) => Err(WaitError::Forbidden(error)),
            Err(error) => Err(WaitError::Api { id, error }),
        }
    }
}

pub async fn run(
    options: &WaitOptions,
    client: &ApiClient,
    progress: &Progress,
    shutdown: &CancellationToken,
) -> Result<WaitSummary, WaitError> {
    let started = Instant::now();
    let deadline = started + options.timeout;
    if !options.state.exists() {
        return Err(WaitError::NoState(options.state.clone()));
    }
    let state = state::read(&options.state)?;
    let without_id = state.entries.iter().filter(|e| e.id.is_none()).count() as u64;
    let mut pending = state.ids();
    drop(state);
    progress.set_total(pending.len() as u64);
    tracing::info!(documents = pending.len(), "waiting for the documents in the state file");

    let mut tally = Tally::default();
    loop {
        let finished =
            poll_round(client, &pending, options.concurrency, deadline, shutdown, &mut tally, progress).await?;
        pending.retain(|id| !finished.contains(id));
        progress.set_message(format!("pending {}", pending.len()));
        if pending.is_empty() || Instant::now() >= deadline || shutdown.is_cancelled() {
            break;
        }
        tokio::select! {
            () = tokio::time::sleep_until(deadline.min(Instant::now() + options.poll_interval)) => {}
            () = shutdown.cancelled() => {}
        }
    }
    Ok(WaitSummary {
        done: tally.done,
        failed: tally.failed,
        pending: pending.len() as u64,
        without_id,
        elapsed_seconds: started.elapsed().as_secs_f64(),
        top_concepts: tally.concepts.top(options.top),
    })
}

/// Asks once about each pending document (until the deadline); returns the
/// ids that reached a final state.
async fn poll_round(
    client: &ApiClient,
    pending: &[Uuid],
    concurrency: usize,
    deadline: Instant,
    shutdown: &CancellationToken,
    tally: &mut Tally,
    progress: &Progress,
) -> Result<HashSet<Uuid>, WaitError> {
    let stop = async {
        tokio::select! {
            () = tokio::time::sleep_until(deadline) => {}
            () = shutdown.cancelled() => {}
        }
    };
    let mut answers = std::pin::pin!(
        futures_util::stream::iter(pending.iter().copied())
            .map(|id| async move { (id, client.document(id).await) })
            .buffer_unordered(concurrency.max(1))
            .take_until(stop)
    );
    let mut finished = HashSet::new();
    while let Some((id, answer)) = answers.next().await {
        if tally.apply(id, answer)? {
            finished.insert(id);
            progress.set_finished(tally.done + tally.failed);
        }
    }
    Ok(finished)
}
