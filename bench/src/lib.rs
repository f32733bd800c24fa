//! clinflow-bench: the harness behind `./bench/run` (see BENCHMARKS.md).
//!
//! In one run, on one machine, side by side: the same notes sent straight to
//! MedCAT's `/api/process_bulk` and through the whole pipeline (the ratio),
//! the pipeline with a STAND-IN for MedCAT (its ceiling, upload latency and
//! the per-stage breakdown), the audit sink draining a pre-filled queue, and
//! in `full` mode a backlog drain, the clinician queries over bulk-loaded
//! documents, and last the privacy phase (disclosure lookups among many
//! audit rows, a purge under uploads). The services run with TLS on every hop; the
//! ratio and the ceiling are also measured with plaintext hops, alternated
//! with the TLS ones (`--hops`). Figures go to stdout as a table and to
//! `bench/results/*.json`; the last line is the `RESULT` line.

//!
//! The modules: `cli` (the flags) and `plan` (how much work each mode
//! does); `stack` (the services under test), `standin`, `notes`, `pin`,
//! `prom`, `disk`, `stalls` and `poll` (what the phases use); `phases`, `queries`,
//! `privacy` and `limit` (the measurements); `measure` (the phases in order), `report` (the
//! table and the JSON) and `run` (a whole run, database and queues
//! included).

pub mod cli;
mod disk;
mod http;
mod limit;
mod measure;
mod notes;
mod observe;
mod phases;
mod pin;
mod plan;
mod poll;
mod privacy;
mod prom;
mod queries;
mod report;
mod run;
mod stack;
mod stalls;
mod standin;

pub use run::run;
