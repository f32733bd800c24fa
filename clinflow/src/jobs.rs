//! The document job message. It carries the document id and nothing else:
//! no text, no patient reference — the worker reads those from PostgreSQL.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::amqp::{AmqpError, Lane, Publisher, Topology, Undecodable};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocumentJob {
    pub document_id: Uuid,
}

/// A job message's body, as the worker and the dead-letter commands read
/// it; anything else is poison, and the error names the fault, not the
/// body's content.
pub fn decode(body: &[u8]) -> Result<DocumentJob, Undecodable> {
    Ok(serde_json::from_slice(body)?)
}

/// Publishes the job for `document_id` on `lane` and waits for the broker's
/// confirmation.
pub async fn publish(
    publisher: &Publisher,
    topology: &Topology,
    lane: Lane,
    document_id: Uuid,
) -> Result<(), AmqpError> {
    let lane = topology.lane(lane);
    let job = DocumentJob { document_id };
    publisher.publish_json(&lane.exchange, lane.key, &document_id.to_string(), &job).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_body_is_the_id_only() {
        let id = Uuid::nil();
        let body = serde_json::to_string(&DocumentJob { document_id: id }).unwrap();
        assert_eq!(body, r#"{"document_id":"00000000-0000-0000-0000-000000000000"}"#);
        assert_eq!(decode(body.as_bytes()), Ok(DocumentJob { document_id: id }));
    }

    /// serde's messages quote what they could not read; a poison job's
    /// error names only the fault and where it is.
    #[test]
    fn a_poison_job_error_does_not_quote_the_body() {
        for body in
            [r#""PAT-SECRET""#, r#"{"document_id":"PAT-SECRET"}"#, r#"{"document_id":["PAT-SECRET"]}"#, "PAT-SECRET"]
        {
            let error = decode(body.as_bytes()).unwrap_err().to_string();
            assert!(!error.contains("SECRET"), "{error}");
            assert!(error.contains(" at line 1 column "), "{error}");
        }
    }
}
