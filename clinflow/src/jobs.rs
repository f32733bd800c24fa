//! The document job message. It carries the document id and nothing else:
//! no text, no patient reference — the worker reads those from PostgreSQL.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::amqp::{AmqpError, Lane, Publisher, Topology};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocumentJob {
    pub document_id: Uuid,
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
    }
}
