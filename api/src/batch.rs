//! `POST /v1/documents/batch`: many documents in one request, as NDJSON (one
//! upload object per line), read as a stream rather than whole. Every line
//! gets its own outcome — `accepted` (new id), `duplicate` (the caller's own
//! existing id for that `source_ref`) or `rejected` (code and message, never
//! the line's content) — and one bad line never fails the others. Valid lines
//! are stored in chunks: one transaction, one multi-row insert of documents
//! and one of outbox rows (each document's job, and one audit message
//! carrying the chunk's upload events, each signed) per chunk.

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use clinflow::amqp::Lane;
use clinflow::audit::{Action, Outcome};
use clinflow::documents::{self, Inserted};
use clinflow::keys::PatientRef;
use clinflow::outbox;
use clinflow::wire::{BATCH_PATH, BatchResponse, LineOutcome, UploadRequest};
use futures_util::StreamExt;
use uuid::Uuid;

use crate::auth::AuthUser;
use crate::extract;
use crate::scope;
use crate::seal::seal;
use crate::state::AppState;
use crate::validate::{ValidUpload, check_care_team, validate};

use crate::error::ApiError;
/// The limits this endpoint applies (`BATCH_MAX_LINES`, `BATCH_MAX_BYTES`).
pub use crate::state::BatchLimits;

/// Documents per transaction.
const CHUNK: usize = 500;

/// A valid line, not yet sealed (its patient's data key is fetched or
/// created with the chunk's transaction).
struct Pending {
    line: usize,
    id: Uuid,
    patient_index: Vec<u8>,
    upload: ValidUpload,
}

/// Upload many notes as NDJSON: one `UploadRequest` object per line, read
/// as a stream.
///
/// Each line gets its own outcome (`accepted`, `duplicate` with the caller's
/// existing id for that `source_ref`, or `rejected` with a code); one bad
/// line fails no other. Documents go on the backfill lane. Lines past
/// `BATCH_MAX_LINES` (10,000) are `too_many_lines`, a line where reading
/// stopped at `BATCH_MAX_BYTES` (64 MiB) is `batch_too_large` (send those
/// again in another batch); lines over 2 MB are `line_too_large`.
#[utoipa::path(
    post,
    path = BATCH_PATH,
    tag = "documents",
    request_body(
        content = Vec<UploadRequest>,
        content_type = "application/x-ndjson",
        description = "NDJSON: each item of this array is one line, a JSON `UploadRequest` (blank lines are \
            counted, not read). A line that is not one is `rejected` in its outcome, as one that breaks a rule \
            of the account or its care teams is; the others are stored.",
    ),
    responses(
        (status = 200, description = "One outcome per non-blank line, in line order, and their counts", body = BatchResponse),
    ),
    extensions(("x-errors" = json!([
        "batch_too_large", "body_unreadable", "busy", "unsupported_media_type: not sent as NDJSON",
        "body_timeout",
    ]))),
)]
#[tracing::instrument(skip_all, fields(user_id = %user.id, lines))]
pub(crate) async fn upload_batch(
    State(state): State<AppState>,
    user: AuthUser,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<BatchResponse>), ApiError> {
    if !is_ndjson(&headers) {
        return Err(ApiError::BadRequest {
            status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
            code: "unsupported_media_type",
            message: format!("send the batch as NDJSON with Content-Type: {}", NDJSON[0]),
        });
    }
    let limits = state.batch_limits;
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limits.max_bytes) {
        return Err(too_large(limits));
    }
    state.check_backpressure()?;

    let mut response = BatchResponse::default();
    let mut pending: Vec<Pending> = Vec::with_capacity(CHUNK);
    let mut lines = Lines::new(body, limits);
    while let Some(line) = lines.next().await? {
        let number = line.number;
        let outcome = match line.content {
            Err((code, message)) => Err(LineOutcome::Rejected { line: number, code: code.into(), message }),
            Ok(bytes) => parse_line(&state, &user, number, &bytes),
        };
        match outcome {
            Ok(doc) => pending.push(doc),
            Err(rejected) => response.push(rejected),
        }
        if pending.len() == CHUNK {
            store(&state, &user, std::mem::take(&mut pending), &mut response).await?;
        }
    }
    store(&state, &user, pending, &mut response).await?;
    response.outcomes.sort_by_key(LineOutcome::line);
    tracing::Span::current().record("lines", response.outcomes.len());
    metrics::counter!("clinflow_documents_uploaded_total", "via" => "batch").increment(response.accepted as u64);
    crate::telemetry::count_batch(&response);
    Ok((StatusCode::OK, Json(response)))
}

/// The batch's media types: NDJSON under its common names.
const NDJSON: [&str; 3] = ["application/x-ndjson", "application/ndjson", "application/jsonl"];

fn is_ndjson(headers: &HeaderMap) -> bool {
    let value = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let essence = value.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    NDJSON.contains(&essence.as_str())
}

fn parse_line(state: &AppState, user: &AuthUser, number: usize, bytes: &[u8]) -> Result<Pending, LineOutcome> {
    let rejected = |e: ApiError| {
        let (code, message) = e.code_and_message();
        LineOutcome::Rejected { line: number, code: code.into(), message }
    };
    let request: UploadRequest = extract::json(bytes).map_err(|fault| {
        let (code, message) = fault.code_and_message("the line");
        LineOutcome::Rejected { line: number, code: code.into(), message }
    })?;
    let upload = validate(request, user.default_basis).map_err(rejected)?;
    check_care_team(user, &upload).map_err(rejected)?;
    let patient_index = documents::patient_index(&state.index_key, &upload.patient_ref);
    Ok(Pending { line: number, id: Uuid::now_v7(), patient_index, upload })
}

/// One transaction: the patients' data keys (created where missing, in one
/// statement), the documents sealed under them, then for each new one its
/// job and its audit event in the outbox.
async fn store(
    state: &AppState,
    user: &AuthUser,
    pending: Vec<Pending>,
    response: &mut BatchResponse,
) -> Result<(), ApiError> {
    if pending.is_empty() {
        return Ok(());
    }
    let mut tx = state.db.begin().await?;
    // Lines naming a care team that does not exist are rejected.
    let mut names: Vec<String> = pending.iter().filter_map(|p| p.upload.care_team.clone()).collect();
    names.sort_unstable();
    names.dedup();
    let teams = scope::upload_teams(&mut *tx, user.id, &names).await?;
    let patients: Vec<PatientRef> =
        pending.iter().map(|p| PatientRef::new(&p.patient_index, &p.upload.patient_ref)).collect();
    let keys = state.keys.for_patients(&mut tx, &patients).await?;
    let mut numbers = Vec::with_capacity(pending.len());
    let mut docs = Vec::with_capacity(pending.len());
    let mut memberships = Vec::new();
    for p in pending {
        let team = match p.upload.care_team.as_ref().map(|name| teams.get(name)) {
            None => Ok(None),
            Some(None) => Err(ApiError::invalid("unknown_care_team", "no care team has this name")),
            Some(Some(team)) => scope::bound(team).map(Some),
        };
        match team {
            Err(e) => {
                let (code, message) = e.code_and_message();
                response.push(LineOutcome::Rejected { line: p.line, code: code.into(), message });
            }
            Ok(team) => {
                if let Some(team) = team {
                    memberships.push((team, p.patient_index.clone()));
                }
                let key = keys.get(&p.patient_index).ok_or_else(|| anyhow::anyhow!("no data key for a patient"))?;
                numbers.push(p.line);
                docs.push(seal(state, key, p.patient_index, user.id, p.id, p.upload)?);
            }
        }
    }
    // Batch uploads travel on the backfill lane, so that a bulk load never
    // holds up documents uploaded one at a time.
    let inserted = documents::insert_many(&mut tx, &docs, Lane::Backfill).await?;
    let mut messages = Vec::new();
    let mut events = Vec::new();
    for ((number, doc), fate) in numbers.iter().zip(&docs).zip(&inserted) {
        match fate {
            Inserted::New => {
                events.push(user.event(Action::DocumentUpload, Outcome::Success).document(doc.id));
                messages.push(outbox::Message::job(doc.id, Lane::Backfill));
                response.push(LineOutcome::Accepted { line: *number, id: doc.id });
            }
            Inserted::DuplicateSourceRef(id) => response.push(LineOutcome::Duplicate { line: *number, id: *id }),
        }
    }
    // Only the accepted lines' patients join their teams.
    let accepted: std::collections::HashSet<&[u8]> = docs
        .iter()
        .zip(&inserted)
        .filter(|(_, fate)| matches!(fate, Inserted::New))
        .map(|(doc, _)| doc.patient_index.as_slice())
        .collect();
    // The chunk's upload events travel together: one audit message (each
    // event signed on its own), not one per document.
    messages.extend(outbox::Message::audits(&state.audit_signer, &events).map_err(anyhow::Error::new)?);
    memberships.retain(|(_, patient)| accepted.contains(patient.as_slice()));
    let added = scope::add_patients(&mut tx, &memberships).await?;
    messages.extend(scope::additions_audited(&state.audit_signer, user, &added)?);
    outbox::enqueue(&mut tx, &messages).await?;
    tx.commit().await?;
    state.relay.wake();
    Ok(())
}

fn too_large(limits: BatchLimits) -> ApiError {
    ApiError::BadRequest {
        status: StatusCode::PAYLOAD_TOO_LARGE,
        code: "batch_too_large",
        message: format!("a batch may hold at most {} bytes; split it", limits.max_bytes),
    }
}

/// The line splitter alone, as the fuzz target (fuzz/) reaches it: each
/// line's number and bytes, or the code and message it was refused with.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub async fn fuzz_split_lines(
    body: Body,
    limits: BatchLimits,
) -> Result<Vec<(usize, Result<Vec<u8>, (&'static str, String)>)>, ApiError> {
    let mut lines = Lines::new(body, limits);
    let mut out = Vec::new();
    while let Some(line) = lines.next().await? {
        out.push((line.number, line.content));
    }
    Ok(out)
}

/// One line of the body: its 1-based number and its bytes, or why it was
/// refused without being parsed.
struct Line {
    number: usize,
    content: Result<Vec<u8>, (&'static str, String)>,
}

/// Splits a streamed body into lines without holding more than one line
/// (capped at the largest valid upload) in memory.
struct Lines {
    stream: axum::body::BodyDataStream,
    limits: BatchLimits,
    buffer: Vec<u8>,
    /// Bytes of the current line were dropped: it is over the size limit.
    oversize: bool,
    read: usize,
    number: usize,
    done: bool,
}

impl Lines {
    fn new(body: Body, limits: BatchLimits) -> Self {
        Self {
            stream: body.into_data_stream(),
            limits,
            buffer: Vec::new(),
            oversize: false,
            read: 0,
            number: 0,
            done: false,
        }
    }

    async fn next(&mut self) -> Result<Option<Line>, ApiError> {
        loop {
            if let Some(end) = self.buffer.iter().position(|b| *b == b'\n') {
                let rest = self.buffer.split_off(end + 1);
                let mut line = std::mem::replace(&mut self.buffer, rest);
                line.truncate(end);
                if let Some(line) = self.finish(line) {
                    return Ok(Some(line));
                }
                continue;
            }
            if self.done {
                let line = std::mem::take(&mut self.buffer);
                return Ok(if line.is_empty() && !self.oversize { None } else { self.finish(line) });
            }
            match self.stream.next().await {
                Some(Ok(chunk)) => {
                    self.read += chunk.len();
                    if self.read > self.limits.max_bytes {
                        // Earlier lines may be stored already: answer what
                        // happened to them, and where reading stopped.
                        self.done = true;
                        self.buffer.clear();
                        self.oversize = false;
                        self.number += 1;
                        let message = format!(
                            "the batch passed {} bytes here: this line and every later one were not read; send them again",
                            self.limits.max_bytes
                        );
                        return Ok(Some(Line { number: self.number, content: Err(("batch_too_large", message)) }));
                    }
                    self.buffer.extend_from_slice(&chunk);
                    if self.buffer.len() > self.limits.max_line_bytes && !self.buffer.contains(&b'\n') {
                        // Keep counting the line but not its bytes.
                        self.oversize = true;
                        self.buffer.clear();
                    }
                }
                Some(Err(e)) if crate::connections::stalled(&e) => return Err(ApiError::body_stalled()),
                Some(Err(_)) => {
                    return Err(ApiError::invalid("body_unreadable", "the request body could not be read to its end"));
                }
                None => self.done = true,
            }
        }
    }

    /// Numbers a complete line; blank lines are skipped (but counted).
    fn finish(&mut self, line: Vec<u8>) -> Option<Line> {
        self.number += 1;
        let oversize = std::mem::take(&mut self.oversize);
        let content = if oversize || line.len() > self.limits.max_line_bytes {
            Err(("line_too_large", format!("a line may hold at most {} bytes", self.limits.max_line_bytes)))
        } else if line.iter().all(u8::is_ascii_whitespace) {
            return None;
        } else if self.number > self.limits.max_lines {
            Err((
                "too_many_lines",
                format!("a batch may hold at most {} lines; send this one again in another", self.limits.max_lines),
            ))
        } else {
            Ok(line)
        };
        Some(Line { number: self.number, content })
    }
}
