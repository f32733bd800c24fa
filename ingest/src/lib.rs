//! clinflow-ingest: bulk upload of clinical notes to the clinflow API
//! (`load`) and a summary of the concepts found in them (`wait`).
//!
//! PHI (note text, patient_ref) only ever travels in upload bodies: it is not
//! logged, not put in errors, the rejects file or summaries, and the response
//! types do not even parse it.

pub mod cli;
pub mod client;
pub mod credentials;
pub mod load;
pub mod progress;
pub mod rejects;
pub mod shutdown;
pub mod source;
pub mod state;
pub mod summary;
pub mod telemetry;
pub mod wait;

#[cfg(test)]
mod test_support;
