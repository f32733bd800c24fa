//! clinflow-worker: takes document jobs off its two lanes in batches (live
//! jobs first, backfill jobs in what is left), annotates them through
//! MedCAT's bulk endpoint and stores the results encrypted.
//!
//! Per batch (up to `size` deliveries, or what came within `max_wait` of the
//! first): claim the documents in one statement, decrypt them, audit the
//! reads (one confirm round trip for the batch), call `/api/process_bulk`
//! once, re-check alone through `/api/process` every non-blank document bulk
//! found nothing in (bulk fails silently: it answers no annotations for a
//! document MedCAT raised on, as dev/medcat/check_contract.py checks), store
//! all results and failures in one transaction, and only after the commit
//! ack the batch with one `multiple` ack per lane. Several batches are in
//! flight, each slot with a channel per lane, so MedCAT is never idle while
//! a batch is being stored.
//!
//! Failures: a job that is not JSON of a job, or names no document, is
//! poison: dead-lettered at once with the reason in `x-clinflow-reason`,
//! never retried. A document MedCAT refuses (4xx, 500, an unreadable answer)
//! is marked failed with a code and its batch-mates go on. While the
//! database is away, or MedCAT's readiness fails, the batch is held (no new
//! work, no attempt spent). A batch that still fails transiently while
//! MedCAT says it is ready — or a re-check that does — sends its jobs to
//! their lane's retry queue with one more attempt counted; past the budget
//! the document is marked failed and the job parked in `.dead`. A broker
//! failure ends the session: the connection is rebuilt (`clinflow::link`)
//! and the unsettled batch comes back by redelivery. A document that cannot
//! be decrypted means the worker runs with the wrong key: it stops, leaving
//! everything queued.
//!
//! The modules, each using only those listed before it: `medcat` (the
//! client), `telemetry`, `worker` (the [`Worker`] and its settings), `job`
//! (a delivery and its lane), `annotate` (the MedCAT calls of a batch),
//! `store` (claim, decrypt, audit, store), `settle` (the retry and parking
//! policy), `consume` (sessions, slots, batching), `cli`.

mod annotate;
pub mod cli;
mod consume;
mod job;
pub mod medcat;
mod settle;
mod store;
pub mod telemetry;
mod worker;

pub use worker::{BatchConfig, RetryConfig, SERVICE_NAME, Worker};
