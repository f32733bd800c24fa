//! clinflow-audit-sink: the only writer of the audit trail.
//!
//! It takes audit events off `{prefix}.audit` in batches, appends them to the
//! hash-chained `audit_events` table in one transaction per batch, and acks
//! them (one `multiple` ack) only after the commit. A message that is not an
//! audit event is dead-lettered (kept, never dropped); a batch the database
//! refuses is held and retried, never dead-lettered.
//!
//! The modules: `sink` (the consumer, [`Sink`]), `telemetry` (metrics and
//! the periodic verification), `archive` (months archived to files and
//! dropped past retention), `cli` (the commands: run, `verify`, `archive`,
//! `dead-letters`).

/// The chain and its checkpoints live in the shared crate (the api's
/// auditor endpoints verify too).
pub use clinflow::{chain, checkpoint};

pub mod archive;
pub mod cli;
mod sink;
pub mod telemetry;

pub use sink::{SERVICE_NAME, Sink};
