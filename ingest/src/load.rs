//! `load`: streams records from the inputs into batch uploads.
//!
//! A blocking thread reads the inputs (skipping source_refs already in the
//! state file) and packs the valid records into NDJSON batches on a bounded
//! channel, so memory stays flat however large the input. Up to
//! `concurrency` batches are in flight; their answers come back to this one
//! task, which alone writes the state and rejects files and counts. Each
//! line's outcome comes from the API: `accepted` and `duplicate` (the caller's
//! own earlier upload of that source_ref) go to the state file with the id,
//! `rejected` to the rejects file with the API's reason. Lines the API did not
//! read (the batch was over its limits) are sent again in a smaller batch.
//!
//! When a batch still fails after its retries, no new batch is started, the
//! ones in flight finish and are recorded, and the run ends: a rerun resumes
//! from the state file, and whatever the lost answer had accepted comes back
//! as `duplicate` with its id, so nothing is stored twice.

use std::collections::HashSet;
use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clinflow::wire::{LineOutcome, RESEND_CODES};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::client::{ApiClient, ClientError};
use crate::counts::LoadCounts;
use crate::progress::Progress;
use crate::rejects::RejectsFile;
use crate::source::{self, Document, Record, Rejection};
use crate::state::{self, StateEntry, StateWriter};

pub struct LoadOptions {
    pub inputs: Vec<PathBuf>,
    pub state: PathBuf,
    pub rejects: PathBuf,
    /// Batches in flight at once.
    pub concurrency: usize,
    /// Most records per batch request.
    pub batch_lines: usize,
    /// Most bytes of NDJSON per batch request (a single larger note still
    /// goes alone).
    pub batch_bytes: usize,
}

#[derive(Debug)]
pub struct LoadReport {
    pub counts: LoadCounts,
    pub elapsed: Duration,
    /// Why the run ended before the end of its input.
    pub stop: Option<String>,
    pub interrupted: bool,
}

impl LoadReport {
    /// 0: every record read ended accepted, duplicate or rejected; 1: the run
    /// stopped early; 2: records were rejected and `strict` is set; 130:
    /// interrupted.
    pub fn exit_code(&self, strict: bool) -> u8 {
        let rejected = self.counts.rejected_here + self.counts.rejected_by_api;
        if self.interrupted {
            130
        } else if self.stop.is_some() || !self.counts.reconciles() {
            1
        } else if strict && rejected > 0 {
            2
        } else {
            0
        }
    }
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.counts;
        writeln!(f, "read {} record(s) in {:.1}s", c.read, self.elapsed.as_secs_f64())?;
        writeln!(f, "  skipped (in the state file from an earlier run): {}", c.skipped)?;
        writeln!(f, "  rejected before sending: {}", c.rejected_here)?;
        write!(
            f,
            "  sent {} = accepted {} + duplicate {} + rejected by the API {}",
            c.sent(),
            c.accepted,
            c.duplicate,
            c.rejected_by_api
        )?;
        if c.unanswered > 0 {
            write!(f, " + unanswered {} (a rerun sends them again)", c.unanswered)?;
        }
        if !c.reconciles() {
            write!(f, "\n  COUNTS DO NOT RECONCILE: please report this")?;
        }
        Ok(())
    }
}

/// What the reader thread hands to the uploading task.
enum Item {
    Batch(Vec<Document>),
    Skipped,
    Rejected(Rejection),
}

pub async fn run(
    options: &LoadOptions,
    client: &ApiClient,
    progress: &Progress,
    shutdown: &CancellationToken,
) -> anyhow::Result<LoadReport> {
    let started = Instant::now();
    let state = state::read(&options.state)?;
    let done = state.done_source_refs();
    let mut state_file = StateWriter::open(&options.state, &state)?;
    drop(state);
    let mut rejects = RejectsFile::start(&options.rejects)?;
    // Opened before anything is sent, so that a typo in the last input fails fast.
    let records = source::open_all(&options.inputs)?;
    let inputs = options.inputs.clone();
    if progress.is_visible() {
        let total = tokio::task::spawn_blocking(move || source::count_records(&inputs)).await??;
        progress.set_total(total);
    }

    let stop_reading = CancellationToken::new();
    let (tx, mut rx) = mpsc::channel(options.concurrency.max(1));
    let limits = (options.batch_lines.max(1), options.batch_bytes);
    let reader = {
        let stop = stop_reading.clone();
        tokio::task::spawn_blocking(move || read_batches(records, &done, limits, &tx, &stop))
    };

    let mut counts = LoadCounts::default();
    let mut stop: Option<String> = None;
    let mut in_flight = FuturesUnordered::new();
    let mut reading = true;
    loop {
        tokio::select! {
            biased;
            Some(done) = in_flight.next(), if !in_flight.is_empty() => {
                let (docs, answer): (Vec<Document>, Answer) = done;
                if let Err(error) = record(&docs, answer, &mut counts, &mut state_file, &mut rejects, progress) {
                    stop.get_or_insert(error);
                    reading = false;
                }
            }
            () = shutdown.cancelled(), if reading => {
                stop.get_or_insert_with(|| "interrupted".to_owned());
                reading = false;
            }
            item = rx.recv(), if reading && in_flight.len() < options.concurrency.max(1) => match item {
                Some(Item::Batch(docs)) => {
                    counts.read += docs.len() as u64;
                    in_flight.push(upload(client, docs, shutdown));
                }
                Some(Item::Skipped) => {
                    counts.read += 1;
                    counts.skipped += 1;
                    progress.record(&counts);
                }
                Some(Item::Rejected(rejection)) => {
                    counts.read += 1;
                    counts.rejected_here += 1;
                    rejects.write(&rejection)?;
                    progress.record(&counts);
                }
                None => reading = false,
            },
            else => break,
        }
    }
    stop_reading.cancel();
    drop(rx);
    if let Err(error) = reader.await? {
        stop.get_or_insert(error.to_string());
    }
    state_file.sync()?;
    let interrupted = shutdown.is_cancelled();
    Ok(LoadReport { counts, elapsed: started.elapsed(), stop, interrupted })
}

/// The reader thread: skips what the state file has, sends rejections one
/// by one and documents in batches of at most `max_lines` / `max_bytes`.
fn read_batches(
    records: source::Records,
    done: &HashSet<String>,
    (max_lines, max_bytes): (usize, usize),
    tx: &mpsc::Sender<Item>,
    stop: &CancellationToken,
) -> Result<(), source::SourceError> {
    let send = |item| tx.blocking_send(item).is_ok() && !stop.is_cancelled();
    let (mut batch, mut bytes) = (Vec::new(), 0);
    for record in records {
        let item = match record? {
            Record::Rejected(rejection) => Item::Rejected(rejection),
            Record::Document(doc) if done.contains(&doc.source_ref) => Item::Skipped,
            Record::Document(doc) => {
                let size = doc.text.len() + doc.patient_ref.len() + doc.source_ref.len() + 100;
                if !batch.is_empty() && (batch.len() == max_lines || bytes + size > max_bytes) {
                    if !send(Item::Batch(std::mem::take(&mut batch))) {
                        return Ok(());
                    }
                    bytes = 0;
                }
                batch.push(doc);
                bytes += size;
                continue;
            }
        };
        if !send(item) {
            return Ok(());
        }
    }
    if !batch.is_empty() {
        send(Item::Batch(batch));
    }
    Ok(())
}

/// The outcomes the API gave, and the error that ended the batch early, if
/// any (lines without an outcome then count as unanswered).
type Answer = (Vec<LineOutcome>, Option<ClientError>);

/// Sends one batch. A batch the API finds too large (413) is split in two;
/// lines it did not read (over its line or byte limit) go again in a batch of
/// their own. The outcomes are numbered by position in `docs` (from 1),
/// whatever request answered them.
async fn upload<'a>(
    client: &'a ApiClient,
    docs: Vec<Document>,
    cancel: &'a CancellationToken,
) -> (Vec<Document>, Answer) {
    let mut outcomes = Vec::with_capacity(docs.len());
    // Chunks of positions (0-based) still to send.
    let mut chunks: Vec<Vec<usize>> = vec![(0..docs.len()).collect()];
    while let Some(chunk) = chunks.pop() {
        let mut body = Vec::with_capacity(chunk.len() * 1200);
        for &i in &chunk {
            if let Err(e) = serde_json::to_writer(&mut body, &docs[i].upload(client.care_team())) {
                let e = ClientError::Refused { status: 0, code: "encode".into(), message: e.to_string() };
                return (docs, (outcomes, Some(e)));
            }
            body.push(b'\n');
        }
        let response = match client.upload_batch(Bytes::from(body), cancel).await {
            Ok(response) => response,
            Err(ClientError::Refused { status: 413, .. }) if chunk.len() > 1 => {
                let (first, second) = chunk.split_at(chunk.len() / 2);
                chunks.push(second.to_vec());
                chunks.push(first.to_vec());
                continue;
            }
            Err(e) => return (docs, (outcomes, Some(e))),
        };
        let mut resend = Vec::new();
        for outcome in response.outcomes {
            let Some(&position) = outcome.line().checked_sub(1).and_then(|i| chunk.get(i)) else { continue };
            match &outcome {
                LineOutcome::Rejected { code, .. } if RESEND_CODES.contains(&code.as_ref()) => resend.push(position),
                _ => outcomes.push(renumber(outcome, position + 1)),
            }
        }
        if resend.len() == chunk.len() {
            let e = ClientError::Refused {
                status: 200,
                code: "batch_limits".into(),
                message: "the API read none of the batch; lower --batch-lines or --batch-mib".into(),
            };
            return (docs, (outcomes, Some(e)));
        }
        if !resend.is_empty() {
            chunks.push(resend);
        }
    }
    (docs, (outcomes, None))
}

fn renumber(outcome: LineOutcome, line: usize) -> LineOutcome {
    match outcome {
        LineOutcome::Accepted { id, .. } => LineOutcome::Accepted { line, id },
        LineOutcome::Duplicate { id, .. } => LineOutcome::Duplicate { line, id },
        LineOutcome::Rejected { code, message, .. } => LineOutcome::Rejected { line, code, message },
    }
}

/// Writes a batch's outcomes to the state and rejects files. Returns the
/// reason to stop when the batch (or part of it) got no answer.
fn record(
    docs: &[Document],
    (outcomes, error): Answer,
    counts: &mut LoadCounts,
    state_file: &mut StateWriter,
    rejects: &mut RejectsFile,
    progress: &Progress,
) -> Result<(), String> {
    let mut answered = vec![false; docs.len()];
    let mut failure = None;
    for outcome in outcomes {
        let Some(doc) = outcome.line().checked_sub(1).and_then(|i| docs.get(i)) else { continue };
        if std::mem::replace(&mut answered[outcome.line() - 1], true) {
            continue;
        }
        let written = match outcome {
            LineOutcome::Accepted { id, .. } | LineOutcome::Duplicate { id, .. } => {
                let duplicate = matches!(outcome, LineOutcome::Duplicate { .. });
                if duplicate {
                    counts.duplicate += 1;
                } else {
                    counts.accepted += 1;
                }
                state_file
                    .append(&StateEntry { source_ref: doc.source_ref.clone(), id, duplicate })
                    .map_err(|e| e.to_string())
            }
            LineOutcome::Rejected { code, message, .. } => {
                counts.rejected_by_api += 1;
                let reason = format!("{code}: {message}");
                rejects.write(&Rejection { source_ref: doc.source_ref.clone(), reason }).map_err(|e| e.to_string())
            }
        };
        if let Err(e) = written {
            failure.get_or_insert(e);
        }
    }
    let unanswered = answered.iter().filter(|a| !**a).count() as u64;
    counts.unanswered += unanswered;
    progress.inc(docs.len() as u64, counts);
    if let Some(error) = error {
        failure.get_or_insert(format!("{unanswered} record(s) of a batch got no answer: {error}"));
    } else if unanswered > 0 {
        failure.get_or_insert(format!("the API gave no outcome for {unanswered} record(s) of a batch"));
    }
    failure.map_or(Ok(()), Err)
}
