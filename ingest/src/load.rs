//! `load`: streams records from the inputs into concurrent uploads.
//!
//! A blocking thread reads the inputs into a bounded channel (so memory stays
//! flat however large the input), skipping source_refs already in the state
//! file. Up to `concurrency` uploads run at once; their results come back to
//! this one task, which alone writes the state and rejects files. When an
//! upload still fails after its retries, no new record is started, the
//! uploads in flight finish and are recorded, and the run ends: a rerun
//! resumes from the state file.

use std::collections::HashSet;
use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures_util::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::client::{ApiClient, ApiError, Uploaded};
use crate::progress::Progress;
use crate::rejects::{RejectsError, RejectsFile};
use crate::source::{self, Record, Records, Rejection, SourceError};
use crate::state::{self, StateEntry, StateError, StateWriter};
use crate::summary::{LoadCounts, LoadSummary};

pub struct LoadOptions {
    pub inputs: Vec<PathBuf>,
    pub concurrency: usize,
    pub state: PathBuf,
    pub rejects: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Rejects(#[from] RejectsError),
}

/// Why a run ended before the end of its input.
#[derive(Debug)]
pub enum StopReason {
    Upload { source_ref: String, error: ApiError },
    Source(SourceError),
    Interrupted,
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StopReason::Upload { source_ref, error } => {
                write!(f, "uploading {source_ref} failed: {error}")
            }
            StopReason::Source(error) => write!(f, "{error}"),
            StopReason::Interrupted => f.write_str("interrupted"),
        }
    }
}

#[derive(Debug)]
pub struct LoadReport {
    pub counts: LoadCounts,
    pub elapsed: Duration,
    pub stop: Option<StopReason>,
    /// Set when at least one record was rejected.
    pub rejects_file: Option<PathBuf>,
}

impl LoadReport {
    pub fn summary(&self) -> LoadSummary {
        LoadSummary { counts: self.counts, elapsed: self.elapsed }
    }

    /// 0: all done (rejects allowed); 1: stopped early; 2: rejects with
    /// `--strict`; 130: interrupted.
    pub fn exit_code(&self, strict: bool) -> u8 {
        match &self.stop {
            Some(StopReason::Interrupted) => 130,
            Some(_) => 1,
            None if self.counts.failed > 0 => 1,
            None if strict && self.counts.rejected > 0 => 2,
            None => 0,
        }
    }
}

enum Work {
    Skip,
    Record(Record),
    SourceFailed(SourceError),
}

enum Outcome {
    Uploaded { source_ref: String, id: Uuid },
    AlreadyDone { source_ref: String, id: Option<Uuid> },
    Skipped,
    Rejected(Rejection),
    Failed { source_ref: String, error: ApiError },
    SourceFailed(SourceError),
}

pub async fn run(
    options: &LoadOptions,
    client: &ApiClient,
    progress: &Progress,
    shutdown: &CancellationToken,
) -> Result<LoadReport, LoadError> {
    let started = Instant::now();
    let state = state::read(&options.state)?;
    if state.torn_tail {
        tracing::warn!(state = %options.state.display(), "state file ended in a partial line (a crash?); ignoring it");
    }
    let done = state.done_source_refs();
    if !done.is_empty() {
        tracing::info!(already_done = done.len(), "resuming: skipping documents in the state file");
    }
    let mut state_writer = StateWriter::open(&options.state, &state)?;
    drop(state);
    let mut rejects = RejectsFile::start(&options.rejects)?;
    let records = source::open_all(&options.inputs)?;
    if progress.is_visible() {
        count_in_background(options.inputs.clone(), progress.clone());
    }

    let stop = shutdown.child_token();
    let (tx, rx) = mpsc::channel(options.concurrency.max(1) * 4);
    let reader = tokio::task::spawn_blocking(move || read_inputs(records, &done, &tx));
    // Boxed (not `pin!`) so that `drop` below really drops it, receiver included.
    let mut outcomes = Box::pin(
        work_stream(rx, stop.clone()).map(|work| process(client, work)).buffer_unordered(options.concurrency.max(1)),
    );

    let mut counts = LoadCounts::default();
    let mut stop_reason = None;
    while let Some(outcome) = outcomes.next().await {
        let failure = record_outcome(outcome, &mut counts, &mut state_writer, &mut rejects)?;
        if let Some(reason) = failure {
            stop.cancel();
            stop_reason.get_or_insert(reason);
        }
        progress.record(&counts);
    }
    drop(outcomes);
    // The reader ends at its next send now that the receiver is gone.
    let _ = reader.await;
    state_writer.sync()?;

    if stop_reason.is_none() && shutdown.is_cancelled() {
        stop_reason = Some(StopReason::Interrupted);
    }
    Ok(LoadReport {
        counts,
        elapsed: started.elapsed(),
        stop: stop_reason,
        rejects_file: (rejects.written() > 0).then(|| rejects.path().to_path_buf()),
    })
}

/// Applies one outcome to the counts and files; returns why to stop, if so.
fn record_outcome(
    outcome: Outcome,
    counts: &mut LoadCounts,
    state: &mut StateWriter,
    rejects: &mut RejectsFile,
) -> Result<Option<StopReason>, LoadError> {
    match outcome {
        Outcome::Uploaded { source_ref, id } => {
            tracing::debug!(%source_ref, %id, "uploaded");
            state.append(&StateEntry { source_ref, id: Some(id) })?;
            counts.uploaded += 1;
        }
        Outcome::AlreadyDone { source_ref, id } => {
            tracing::debug!(%source_ref, "already uploaded before (409); recorded as done");
            state.append(&StateEntry { source_ref, id })?;
            counts.skipped += 1;
        }
        Outcome::Skipped => counts.skipped += 1,
        Outcome::Rejected(rejection) => {
            // Debug only: the rejects file has them all, and there may be many.
            tracing::debug!(source_ref = %rejection.source_ref, reason = %rejection.reason, "rejected");
            rejects.write(&rejection)?;
            counts.rejected += 1;
        }
        Outcome::Failed { source_ref, error } => {
            tracing::error!(%source_ref, %error, "upload failed; stopping");
            counts.failed += 1;
            return Ok(Some(StopReason::Upload { source_ref, error }));
        }
        Outcome::SourceFailed(error) => {
            tracing::error!(%error, "cannot read the input; stopping");
            return Ok(Some(StopReason::Source(error)));
        }
    }
    Ok(None)
}

fn read_inputs(records: Records, done: &HashSet<String>, tx: &mpsc::Sender<Work>) {
    for item in records {
        let work = match item {
            Ok(record) if done.contains(record.source_ref()) => Work::Skip,
            Ok(record) => Work::Record(record),
            Err(error) => Work::SourceFailed(error),
        };
        let last = matches!(work, Work::SourceFailed(_));
        if tx.blocking_send(work).is_err() || last {
            return;
        }
    }
}

/// The channel as a stream that ends as soon as `stop` is cancelled.
fn work_stream(rx: mpsc::Receiver<Work>, stop: CancellationToken) -> impl Stream<Item = Work> {
    futures_util::stream::unfold((rx, stop), |(mut rx, stop)| async move {
        let work = tokio::select! {
            biased;
            () = stop.cancelled() => None,
            work = rx.recv() => work,
        }?;
        Some((work, (rx, stop)))
    })
}

async fn process(client: &ApiClient, work: Work) -> Outcome {
    let doc = match work {
        Work::Skip => return Outcome::Skipped,
        Work::SourceFailed(error) => return Outcome::SourceFailed(error),
        Work::Record(Record::Rejected(rejection)) => return Outcome::Rejected(rejection),
        Work::Record(Record::Document(doc)) => doc,
    };
    let source_ref = doc.source_ref.clone();
    match client.upload(&doc).await {
        Ok(Uploaded::Accepted(id)) => Outcome::Uploaded { source_ref, id },
        Ok(Uploaded::AlreadyDone(id)) => Outcome::AlreadyDone { source_ref, id },
        Err(error @ ApiError::Rejected { .. }) => {
            Outcome::Rejected(Rejection { source_ref, reason: error.to_string() })
        }
        Err(error) => Outcome::Failed { source_ref, error },
    }
}

/// Counts the records on a detached thread (not `spawn_blocking`: the
/// runtime would wait for it at exit) and gives the bar its length.
fn count_in_background(inputs: Vec<PathBuf>, progress: Progress) {
    let spawned =
        std::thread::Builder::new().name("count-records".into()).spawn(move || match source::count_records(&inputs) {
            Ok(total) => progress.set_total(total),
            Err(error) => tracing::debug!(%error, "cannot count the records; no ETA"),
        });
    if let Err(error) = spawned {
        tracing::debug!(%error, "cannot start the counting thread; no ETA");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(stop: Option<StopReason>, rejected: u64, failed: u64) -> LoadReport {
        LoadReport {
            counts: LoadCounts { uploaded: 1, skipped: 0, rejected, failed },
            elapsed: Duration::from_secs(1),
            stop,
            rejects_file: None,
        }
    }

    #[test]
    fn exit_codes() {
        assert_eq!(report(None, 0, 0).exit_code(true), 0);
        assert_eq!(report(None, 3, 0).exit_code(false), 0);
        assert_eq!(report(None, 3, 0).exit_code(true), 2);
        assert_eq!(report(None, 0, 1).exit_code(false), 1);
        assert_eq!(report(Some(StopReason::Interrupted), 0, 0).exit_code(false), 130);
        let upload = StopReason::Upload { source_ref: "a.txt".into(), error: ApiError::Unauthorized };
        assert_eq!(report(Some(upload), 3, 1).exit_code(true), 1);
    }

    #[tokio::test]
    async fn the_reader_skips_done_records_and_stops_after_a_source_error() {
        let records: Records = Box::new(
            vec![
                Ok(Record::rejected("a".into(), "x")),
                Ok(Record::rejected("b".into(), "x")),
                Err(SourceError::Unsupported { path: "z".into() }),
                Ok(Record::rejected("c".into(), "x")),
            ]
            .into_iter(),
        );
        let done: HashSet<String> = ["a".to_owned()].into();
        let (tx, mut rx) = mpsc::channel(8);
        tokio::task::spawn_blocking(move || read_inputs(records, &done, &tx)).await.unwrap();
        let mut kinds = Vec::new();
        while let Some(work) = rx.recv().await {
            kinds.push(match work {
                Work::Skip => "skip".to_owned(),
                Work::Record(r) => r.source_ref().to_owned(),
                Work::SourceFailed(_) => "error".to_owned(),
            });
        }
        assert_eq!(kinds, ["skip", "b", "error"]);
    }
}
