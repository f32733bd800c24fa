//! The chain's external anchor. Every `every_events` events, or after
//! `every` when something was appended, the sink appends a checkpoint line
//! `{"seq","row_hash","at","key_id","signature"}` (the sink's Ed25519
//! signature of the first three) to an append-only file outside the
//! database, and syncs it. Verifying a checkpoint takes the sink's public
//! key only; lines of format 1 carry `mac` (HMAC-SHA256 under
//! `AUDIT_HMAC_KEY`) instead and verify only with that key.
//! `verify --checkpoints FILE` checks that the table still holds every
//! checkpointed row with its hash: deleting or rewriting the newest rows,
//! which the chain alone cannot reveal, is then reported at the first
//! missing or changed `seq`. Several sinks may write to the same file; each
//! line stands on its own.

use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use time::OffsetDateTime;

use crate::audit::signing::Signer;
use crate::chain::{ChainError, Trust};

const CHECKPOINT_CONTEXT: &[u8] = b"clinflow audit checkpoint v2\n";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub seq: i64,
    /// Hex of the row's `row_hash`.
    pub row_hash: String,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// The sink key's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    /// Hex of its Ed25519 signature over "clinflow audit checkpoint v2\n" ‖
    /// seq ‖ row_hash (hex) ‖ at (Unix nanoseconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
    /// Format 1: hex of HMAC-SHA256(AUDIT_HMAC_KEY, "checkpoint" ‖ seq ‖
    /// row_hash ‖ at).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

impl Checkpoint {
    pub fn new(sink: &Signer, seq: i64, row_hash: &[u8], at: OffsetDateTime) -> Self {
        let row_hash = hex(row_hash);
        let signature = hex(&sink.sign_parts(CHECKPOINT_CONTEXT, &signed_parts(seq, &row_hash, at).each()));
        Self { seq, row_hash, at, key_id: Some(sink.key_id().to_owned()), signature: Some(signature), mac: None }
    }

    fn genuine(&self, trust: &Trust) -> Result<(), &'static str> {
        match (&self.key_id, &self.signature, &self.mac, &trust.legacy) {
            (Some(key_id), Some(signature), None, _) => {
                let parts = signed_parts(self.seq, &self.row_hash, self.at);
                let signature = unhex(signature).ok_or("its signature is not hex")?;
                if trust.signed_by_sink(key_id, CHECKPOINT_CONTEXT, &parts.each(), &signature) {
                    Ok(())
                } else {
                    Err("its signature does not hold under the sink's public key (forged, or another key)")
                }
            }
            (None, None, Some(mac), Some(key))
                if hex(&key.checkpoint_mac(self.seq, &self.row_hash, self.at)) == *mac =>
            {
                Ok(())
            }
            (None, None, Some(_), Some(_)) => Err("its MAC does not hold (forged, or another key)"),
            (None, None, Some(_), None) => Err("of format 1 (a MAC): verify it with AUDIT_HMAC_KEY"),
            _ => Err("neither signed nor MACed"),
        }
    }
}

/// What a checkpoint's signature covers after its context.
struct SignedParts {
    seq: [u8; 8],
    row_hash: Vec<u8>,
    at: [u8; 16],
}

impl SignedParts {
    fn each(&self) -> [&[u8]; 3] {
        [&self.seq, &self.row_hash, &self.at]
    }
}

fn signed_parts(seq: i64, row_hash_hex: &str, at: OffsetDateTime) -> SignedParts {
    SignedParts {
        seq: seq.to_be_bytes(),
        row_hash: row_hash_hex.as_bytes().to_vec(),
        at: at.unix_timestamp_nanos().to_be_bytes(),
    }
}

/// Hex as the audit trail writes it (defined once, in `audit`).
pub use crate::audit::{hex, unhex};

/// When the sink writes checkpoints, and where.
#[derive(Debug, Clone)]
pub struct CheckpointConfig {
    pub path: PathBuf,
    pub every_events: u64,
    pub every: Duration,
}

/// The sink's side: counts what it appended and writes a checkpoint when
/// one is due.
#[derive(Debug)]
pub struct Checkpointer {
    config: CheckpointConfig,
    since_events: u64,
    /// `None` until the first checkpoint: the first batch after a start is
    /// anchored at once.
    last: Option<Instant>,
}

impl Checkpointer {
    pub fn new(config: CheckpointConfig) -> Self {
        Self { config, since_events: 0, last: None }
    }

    /// After a committed batch of `written` new rows: writes a checkpoint of
    /// the chain's head if one is due. Returns the seq checkpointed.
    pub async fn after_batch(&mut self, db: &PgPool, sink: &Signer, written: usize) -> Result<Option<i64>, ChainError> {
        self.since_events += written as u64;
        let due = self.since_events >= self.config.every_events
            || (self.since_events > 0 && self.last.is_none_or(|t| t.elapsed() >= self.config.every));
        if !due {
            return Ok(None);
        }
        let Some(head) =
            sqlx::query!("SELECT seq, row_hash FROM audit_events ORDER BY seq DESC LIMIT 1").fetch_optional(db).await?
        else {
            return Ok(None);
        };
        let checkpoint = Checkpoint::new(sink, head.seq, &head.row_hash, crate::chain::now());
        append_line(&self.config.path, &checkpoint).map_err(|e| ChainError::Checkpoint(e.to_string()))?;
        self.since_events = 0;
        self.last = Some(Instant::now());
        metrics::gauge!("clinflow_audit_checkpoint_seq").set(head.seq as f64);
        Ok(Some(head.seq))
    }
}

fn append_line(path: &Path, checkpoint: &Checkpoint) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(checkpoint).map_err(std::io::Error::other)?;
    line.push(b'\n');
    let mut file = OpenOptions::new().create(true).append(true).open(path)?;
    file.write_all(&line)?;
    file.sync_data()
}

/// Every checkpoint in the file; a line that is not one (or whose signature
/// does not hold) is reported with its line number.
pub fn read(path: &Path, trust: &Trust) -> Result<Vec<Checkpoint>, ChainError> {
    let file = std::fs::File::open(path)
        .map_err(|e| ChainError::Checkpoint(format!("cannot read {}: {e}", path.display())))?;
    let mut out = Vec::new();
    for (n, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| ChainError::Checkpoint(format!("{}: {e}", path.display())))?;
        if line.trim().is_empty() {
            continue;
        }
        let bad = |what: &str| ChainError::Checkpoint(format!("{} line {}: {what}", path.display(), n + 1));
        let checkpoint: Checkpoint = serde_json::from_str(&line).map_err(|_| bad("not a checkpoint"))?;
        checkpoint.genuine(trust).map_err(bad)?;
        out.push(checkpoint);
    }
    Ok(out)
}

/// Checks that the table holds every checkpointed row with the same hash
/// (those of archived and dropped months aside).
/// Run after [`crate::chain::verify`] succeeded for `rows` rows.
pub async fn check(db: &PgPool, rows: i64, checkpoints: &[Checkpoint]) -> Result<(), ChainError> {
    let Some(newest) = checkpoints.iter().max_by_key(|c| c.seq) else { return Ok(()) };
    if newest.seq > rows {
        return Err(ChainError::Broken {
            seq: rows + 1,
            problem: "missing: a checkpoint vouches for rows up to a later seq (the newest rows were deleted)",
        });
    }
    // Checkpoints of months archived and dropped are checked against their
    // archives (`verify --archive`), not here.
    let first = sqlx::query_scalar!("SELECT seq FROM audit_events ORDER BY seq LIMIT 1").fetch_optional(db).await?;
    let checkpoints: Vec<&Checkpoint> =
        checkpoints.iter().filter(|c| first.is_none_or(|first| c.seq >= first)).collect();
    let seqs: Vec<i64> = checkpoints.iter().map(|c| c.seq).collect();
    let stored =
        sqlx::query!("SELECT seq, row_hash FROM audit_events WHERE seq = ANY($1)", &seqs).fetch_all(db).await?;
    let mut mismatched: Vec<i64> = checkpoints
        .iter()
        .filter(|c| !stored.iter().any(|r| r.seq == c.seq && hex(&r.row_hash) == c.row_hash))
        .map(|c| c.seq)
        .collect();
    mismatched.sort_unstable();
    match mismatched.first() {
        Some(&seq) => Err(ChainError::Broken { seq, problem: "row_hash differs from the checkpoint (rows rewritten)" }),
        None => Ok(()),
    }
}
