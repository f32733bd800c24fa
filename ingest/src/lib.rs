//! clinflow-ingest: bulk upload of clinical notes to the clinflow API
//! (`load`, through the batch endpoint) and a wait for their processing
//! (`wait`, through the status endpoint).
//!
//! PHI (note text, patient_ref) only ever travels in upload bodies: it is not
//! logged, not put in errors, the rejects file or summaries. The request and
//! answer types are the API's own, from `clinflow::wire`.

pub mod cli;
pub mod client;
pub mod counts;
pub mod credentials;
pub mod load;
pub mod progress;
pub mod rejects;
pub mod source;
pub mod state;
pub mod telemetry;
pub mod wait;

#[cfg(test)]
mod test_support;
