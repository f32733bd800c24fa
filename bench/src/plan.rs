//! How much work each phase of a run does, by mode.

use serde::Serialize;

use crate::cli::Mode;

/// How much work each phase does.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// Notes per round of the direct-vs-pipeline comparison.
    pub notes: usize,
    pub rounds: usize,
    /// Documents per `/api/process_bulk` call of the direct client.
    pub bulk_batch: usize,
    /// Notes per `/v1/documents/batch` request, and requests at once, in the
    /// comparison rounds and the ceiling run (a bulk loader's way in).
    pub batch_lines: usize,
    pub batch_clients: usize,
    pub ceiling_notes: usize,
    /// Ceiling runs with TLS hops and as many with plaintext hops,
    /// alternated (`--hops both`).
    pub ceiling_pairs: usize,
    /// Single-document uploads, and uploaders at once, of the latency runs:
    /// the paced run lasts latency_uploads ÷ (clients × rate) seconds
    /// (quick 30, full 120), the saturation run sends saturation_uploads.
    pub latency_uploads: usize,
    pub saturation_uploads: usize,
    pub upload_clients: usize,
    /// Uploads per second each client sends in the paced latency run.
    pub upload_rate_per_client: f64,
    /// Backfill documents drained during the live-lane run, and the rate of
    /// live uploads meanwhile.
    pub lanes_backfill: usize,
    pub live_rate: f64,
    pub sink_events: usize,
    pub backlog: usize,
    pub note_bytes: usize,
    /// Documents bulk-loaded for the clinician queries (0: none).
    pub query_docs: usize,
    /// Clinicians asking at once (one per care team), each at this rate,
    /// for this many requests per endpoint in all.
    pub query_clients: usize,
    pub query_rate_per_client: f64,
    pub query_requests: usize,
    /// Times each endpoint is measured so (the four in turn, round after
    /// round); its p99 is over all of them, each round's beside it.
    pub query_rounds: usize,
    /// Length of the mixed saturation run.
    pub query_saturation_s: f64,
    /// Audit rows the disclosures lookup is measured among, and the lookups
    /// (auditors at once, each at this rate).
    pub disclosure_rows: usize,
    pub disclosure_requests: usize,
    pub disclosure_clients: usize,
    pub disclosure_rate_per_client: f64,
    /// Expired documents `clinflow-api purge` removes while single uploads
    /// go on (0: no privacy phase), and how long uploads are measured
    /// without a purge.
    pub purge_docs: usize,
    pub purge_upload_s: f64,
}

impl Plan {
    pub fn for_mode(mode: Mode, backlog: Option<usize>, query_docs: Option<usize>) -> Self {
        let base = Plan {
            notes: 3_000,
            rounds: 3,
            bulk_batch: 50,
            batch_lines: 500,
            batch_clients: 2,
            ceiling_notes: 20_000,
            ceiling_pairs: 2,
            latency_uploads: 15_000,
            saturation_uploads: 3_000,
            upload_clients: 50,
            upload_rate_per_client: 10.0,
            lanes_backfill: 20_000,
            live_rate: 20.0,
            sink_events: 50_000,
            backlog: 0,
            note_bytes: 1_000,
            query_docs: 50_000,
            query_clients: 20,
            query_rate_per_client: 10.0,
            query_requests: 2_000,
            query_rounds: 1,
            query_saturation_s: 10.0,
            disclosure_rows: 1_000_000,
            disclosure_requests: 2_000,
            disclosure_clients: 10,
            disclosure_rate_per_client: 10.0,
            purge_docs: 100_000,
            purge_upload_s: 20.0,
        };
        let plan = match mode {
            Mode::Tiny => Plan {
                notes: 100,
                rounds: 1,
                ceiling_notes: 500,
                ceiling_pairs: 1,
                latency_uploads: 300,
                saturation_uploads: 300,
                sink_events: 2_000,
                lanes_backfill: 2_000,
                query_docs: 2_000,
                query_requests: 200,
                query_saturation_s: 2.0,
                disclosure_rows: 20_000,
                disclosure_requests: 100,
                purge_docs: 2_000,
                purge_upload_s: 3.0,
                ..base
            },
            Mode::Quick => base,
            Mode::Full => Plan {
                notes: 10_000,
                rounds: 3,
                ceiling_notes: 100_000,
                latency_uploads: 60_000,
                saturation_uploads: 10_000,
                sink_events: 200_000,
                lanes_backfill: 100_000,
                backlog: 1_000_000,
                query_docs: 1_000_000,
                query_requests: 4_000,
                query_rounds: 3,
                ..base
            },
        };
        Plan { backlog: backlog.unwrap_or(plan.backlog), query_docs: query_docs.unwrap_or(plan.query_docs), ..plan }
    }

    pub fn with_query_rate(self, rate: Option<f64>) -> Self {
        Plan { query_rate_per_client: rate.unwrap_or(self.query_rate_per_client), ..self }
    }
}
