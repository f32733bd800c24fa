//! `wait`: asks the API's status endpoint (not a PHI read) about every id in
//! the state file until each document is `done` or `failed`, or the timeout
//! passes. Accepted and duplicate uploads alike are counted as done only when
//! the API says so.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use clinflow::wire::{MAX_STATUS_IDS, Status};
use futures_util::StreamExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::client::ApiClient;
use crate::progress::Progress;
use crate::state;

pub struct WaitOptions {
    pub state: PathBuf,
    /// Status requests (of up to 1,000 ids each) in flight at once.
    pub concurrency: usize,
    pub timeout: Duration,
    pub poll_interval: Duration,
}

#[derive(Debug, Default, serde::Serialize)]
pub struct WaitSummary {
    pub documents: u64,
    pub done: u64,
    pub failed: u64,
    /// Failure code → documents.
    pub failure_codes: BTreeMap<String, u64>,
    /// Still queued or processing at the timeout.
    pub pending: u64,
    /// Ids the API does not know, or will not show this account.
    pub unknown: u64,
    pub elapsed_seconds: f64,
}

impl WaitSummary {
    pub fn all_done(&self) -> bool {
        self.done == self.documents
    }
}

impl fmt::Display for WaitSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} document(s) after {:.1}s: done {}, failed {}, pending {}, unknown to the API {}",
            self.documents, self.elapsed_seconds, self.done, self.failed, self.pending, self.unknown
        )?;
        for (code, n) in &self.failure_codes {
            writeln!(f, "  failed with {code}: {n}")?;
        }
        Ok(())
    }
}

pub async fn run(
    options: &WaitOptions,
    client: &ApiClient,
    progress: &Progress,
    shutdown: &CancellationToken,
) -> anyhow::Result<WaitSummary> {
    let started = Instant::now();
    let deadline = started + options.timeout;
    anyhow::ensure!(
        options.state.exists(),
        "state file {} not found: nothing to wait for (run `load` first, or pass --state)",
        options.state.display()
    );
    let mut pending = state::read(&options.state)?.ids();
    let mut summary = WaitSummary { documents: pending.len() as u64, ..WaitSummary::default() };
    progress.set_total(summary.documents);
    loop {
        let finished = poll_round(client, &pending, options.concurrency, shutdown, &mut summary).await?;
        pending.retain(|id| !finished.contains(id));
        progress.set_position(summary.documents - pending.len() as u64, &format!("pending {}", pending.len()));
        if pending.is_empty() || Instant::now() >= deadline || shutdown.is_cancelled() {
            break;
        }
        tokio::select! {
            () = tokio::time::sleep_until(deadline.min(Instant::now() + options.poll_interval)) => {}
            () = shutdown.cancelled() => {}
        }
    }
    summary.pending = pending.len() as u64;
    summary.elapsed_seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

/// Asks once about each pending document; returns the ids that reached a
/// final state or that the API does not know.
async fn poll_round(
    client: &ApiClient,
    pending: &[Uuid],
    concurrency: usize,
    shutdown: &CancellationToken,
    summary: &mut WaitSummary,
) -> anyhow::Result<HashSet<Uuid>> {
    let mut answers = futures_util::stream::iter(pending.chunks(MAX_STATUS_IDS))
        .map(|ids| client.statuses(ids, shutdown))
        .buffer_unordered(concurrency.max(1));
    let mut finished = HashSet::new();
    while let Some(answer) = answers.next().await {
        let answer = answer?;
        for doc in answer.documents.into_iter().filter(|d| d.status.is_final()) {
            if doc.status == Status::Done {
                summary.done += 1;
            } else {
                summary.failed += 1;
                *summary.failure_codes.entry(doc.failure_code.unwrap_or_else(|| "unknown".into())).or_default() += 1;
            }
            finished.insert(doc.id);
        }
        summary.unknown += answer.missing.len() as u64;
        finished.extend(answer.missing);
    }
    Ok(finished)
}
