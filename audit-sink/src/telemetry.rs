//! The sink's metrics: events persisted, batch size, audit lag, dead
//! letters, and the result of its periodic verification of the chain.
//!
//! The periodic verification stays cheap however long the trail is: each
//! round walks the chain from the newest checkpoint of
//! `AUDIT_CHECKPOINT_FILE` (its signature makes it a trusted starting point) to
//! the end — the rows of the last `AUDIT_CHECKPOINT_EVERY` events or
//! `AUDIT_CHECKPOINT_SECONDS` — and checks the newest checkpoints against the
//! table (every checkpoint in the first round after start-up). Without a
//! checkpoint file it walks from the last row it verified (the whole chain
//! at start-up). A rewrite of an older row between two checkpoints is found
//! by the full `verify` command, not here.

use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use clinflow::audit::SignedEvent;
use clinflow::chain::{self, ChainError, Head, Trust};
use clinflow::checkpoint::{self, Checkpoint};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

pub const WRITTEN: &str = "clinflow_audit_events_written_total";
pub const BATCH_SIZE: &str = "clinflow_audit_batch_size";
pub const LAG: &str = "clinflow_audit_lag_seconds";
pub const DEAD_LETTERED: &str = "clinflow_audit_sink_dead_lettered_total";
pub const VERIFY_OK: &str = "clinflow_audit_verify_ok";
pub const VERIFY_TIME: &str = "clinflow_audit_verify_timestamp_seconds";
pub const VERIFIED_SEQ: &str = "clinflow_audit_verified_seq";

/// Describes the sink's metrics and exports the counters at 0.
pub fn register() {
    metrics::describe_counter!(WRITTEN, "Audit events appended to the chain");
    metrics::describe_histogram!(BATCH_SIZE, "Audit events per batch (one transaction)");
    metrics::describe_histogram!(
        "clinflow_audit_batch_seconds",
        metrics::Unit::Seconds,
        "Time to append one batch to the chain"
    );
    metrics::describe_gauge!(
        LAG,
        metrics::Unit::Seconds,
        "Now minus the occurred_at of the newest persisted event (grows while idle: read it with the audit \
         queue's depth)"
    );
    metrics::describe_counter!(DEAD_LETTERED, "Audit messages parked in the audit dead-letter queue, by reason");
    metrics::describe_counter!("clinflow_audit_batch_retries_total", "Tries of a batch the database refused");
    metrics::describe_counter!("clinflow_audit_checkpoint_failures_total", "Checkpoints that could not be written");
    metrics::describe_gauge!(VERIFY_OK, "1 if the last periodic verification held, 0 if it found a break");
    metrics::describe_gauge!(VERIFY_TIME, metrics::Unit::Seconds, "Unix time of the last periodic verification");
    metrics::describe_gauge!(VERIFIED_SEQ, "The last seq the periodic verification vouches for");
    metrics::counter!(WRITTEN).absolute(0);
    for reason in ["undecodable", "schema_invalid", "bad_signature", "producer_mismatch"] {
        metrics::counter!(DEAD_LETTERED, "reason" => reason).absolute(0);
    }
    metrics::counter!("clinflow_audit_batch_retries_total").absolute(0);
    metrics::counter!("clinflow_audit_checkpoint_failures_total").absolute(0);
}

/// Unix microseconds of the newest persisted `occurred_at` (0: none seen).
static NEWEST: AtomicI64 = AtomicI64::new(0);

/// After a committed batch: its newest event moves the audit lag.
pub(crate) fn persisted(events: &[SignedEvent]) {
    if let Some(newest) = events.iter().map(|e| e.event.occurred_at).max() {
        see(newest);
    }
}

fn see(at: time::OffsetDateTime) {
    let micros = i64::try_from(at.unix_timestamp_nanos() / 1000).unwrap_or(i64::MAX);
    NEWEST.fetch_max(micros, Ordering::Relaxed);
    refresh_lag();
}

fn refresh_lag() {
    let newest = NEWEST.load(Ordering::Relaxed);
    if newest > 0 {
        let now = i64::try_from(time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1000).unwrap_or(i64::MAX);
        metrics::gauge!(LAG).set((now - newest).max(0) as f64 / 1e6);
    }
}

/// The periodic verification and the lag's clock.
pub struct Verifier {
    pub db: PgPool,
    pub trust: Trust,
    pub checkpoints: Option<PathBuf>,
    /// Between rounds; `None`: never (then only the lag is kept).
    pub every: Option<Duration>,
}

/// Checkpoints checked against the table in each round after the first
/// (which checks them all): the newest ones.
const CHECKPOINTS_PER_ROUND: usize = 100;

impl Verifier {
    /// Runs until `shutdown` fires: the lag gauge every second, a
    /// verification round every `every`.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut head: Option<Head> = None;
        let mut next_round = tokio::time::Instant::now();
        loop {
            if let Some(every) = self.every
                && tokio::time::Instant::now() >= next_round
            {
                self.round(&mut head).await;
                next_round = tokio::time::Instant::now() + every;
            }
            refresh_lag();
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// One round; a database that does not answer skips it (that is not a
    /// broken chain), a break sets the gauge to 0 until a later round holds.
    async fn round(&self, head: &mut Option<Head>) {
        match self.verify(head.as_ref()).await {
            Ok(new_head) => {
                if let Some(at) = new_head.occurred_at {
                    see(at);
                }
                metrics::gauge!(VERIFIED_SEQ).set(new_head.seq as f64);
                *head = Some(new_head);
                record(true);
            }
            Err(ChainError::Db(e)) => tracing::warn!(error = %e, "periodic audit verification skipped"),
            Err(e) => {
                tracing::error!(error = %e, "periodic audit verification FAILED");
                record(false);
            }
        }
    }

    /// Walks the chain from its newest checkpoint (its signature
    /// checked, so trusted), or without checkpoints from the last verified row (from
    /// the first at start-up), to its end; then checks the checkpoints
    /// against the table: all of them in the first round, the newest
    /// [`CHECKPOINTS_PER_ROUND`] afterwards. Returns the chain's end.
    async fn verify(&self, last: Option<&Head>) -> Result<Head, ChainError> {
        // Checkpoints first: every one read is then at or below the end
        // the walk reaches, even while the sink keeps appending.
        let mut read = match &self.checkpoints {
            Some(path) if path.exists() => checkpoint::read(path, &self.trust)?,
            _ => Vec::new(),
        };
        read.sort_by_key(|c| std::cmp::Reverse(c.seq));
        let from = match read.first().and_then(anchor) {
            Some(checkpointed) => checkpointed,
            None => match last {
                Some(last) => last.clone(),
                None => chain::start(&self.db, &self.trust).await?,
            },
        };
        let end = chain::verify_from(&self.db, &self.trust, &from).await?;
        if last.is_some() {
            read.truncate(CHECKPOINTS_PER_ROUND);
        }
        checkpoint::check(&self.db, end.seq, &read).await?;
        Ok(end)
    }
}

/// A checkpoint as a place to start walking from (its signature was checked).
fn anchor(c: &Checkpoint) -> Option<Head> {
    Some(Head { seq: c.seq, row_hash: checkpoint::unhex(&c.row_hash)?, occurred_at: None })
}

fn record(ok: bool) {
    metrics::gauge!(VERIFY_OK).set(if ok { 1.0 } else { 0.0 });
    metrics::gauge!(VERIFY_TIME).set(time::OffsetDateTime::now_utc().unix_timestamp() as f64);
}

/// Keeps this month's and next month's audit partitions in place (hourly,
/// after the one at start-up) and the archive's gauges fresh.
pub async fn keep_partitions_ahead(db: PgPool, hot_months: u16, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(3600)) => {}
        }
        if let Err(e) = crate::archive::ensure_partitions(&db, hot_months).await {
            tracing::error!(error = %e, "audit partitions not ensured");
        }
    }
}
