//! The transactional outbox: messages written to PostgreSQL in the same
//! transaction as the state they announce, published later by the
//! [`relay`](crate::relay). A committed upload always gets its job and its
//! audit event, whatever the broker does, and no request waits on RabbitMQ.
//!
//! Bodies are the exact JSON that will be published: ids only, never PHI.

use sqlx::PgConnection;
use uuid::Uuid;

use crate::amqp::{Lane, Topology, WorkQueue};
use crate::audit::{AuditEvent, Signer};
use crate::jobs::DocumentJob;

/// Where an outbox message goes: the relay publishes it to the work queue
/// of the [`Topology`] that [`Topic::queue`] names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topic {
    Documents(Lane),
    Audit,
}

impl Topic {
    pub const ALL: [Topic; 3] = [Topic::Documents(Lane::Live), Topic::Documents(Lane::Backfill), Topic::Audit];

    pub fn as_str(self) -> &'static str {
        match self {
            Topic::Documents(lane) => lane.key(),
            Topic::Audit => crate::amqp::AUDIT,
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// The work queue of `topology` this topic is published to.
    pub fn queue(self, topology: &Topology) -> WorkQueue {
        match self {
            Topic::Documents(lane) => topology.lane(lane),
            Topic::Audit => topology.audit(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Message {
    pub topic: Topic,
    pub message_id: String,
    pub body: Vec<u8>,
}

impl Message {
    pub fn job(document_id: Uuid, lane: Lane) -> Self {
        let body = serde_json::to_vec(&DocumentJob { document_id }).unwrap_or_default();
        Self { topic: Topic::Documents(lane), message_id: document_id.to_string(), body }
    }

    /// The event signed by `signer`, as the sink will receive it: signed
    /// where it is made, so nothing that can write the outbox table can
    /// make an event the sink accepts.
    pub fn audit(signer: &Signer, event: &AuditEvent) -> Result<Self, serde_json::Error> {
        Ok(Self { topic: Topic::Audit, message_id: event.event_id.to_string(), body: signer.body(event)? })
    }

    /// The events, each signed by `signer`, in as few messages as
    /// [`Signer::messages`] packs them into.
    pub fn audits(signer: &Signer, events: &[AuditEvent]) -> Result<Vec<Self>, serde_json::Error> {
        let messages = signer.messages(events)?;
        Ok(messages.into_iter().map(|(message_id, body)| Self { topic: Topic::Audit, message_id, body }).collect())
    }
}

/// Adds messages to the outbox, in the caller's transaction.
pub async fn enqueue(conn: &mut PgConnection, messages: &[Message]) -> Result<(), sqlx::Error> {
    if messages.is_empty() {
        return Ok(());
    }
    let topics: Vec<&str> = messages.iter().map(|m| m.topic.as_str()).collect();
    let ids: Vec<&str> = messages.iter().map(|m| m.message_id.as_str()).collect();
    let bodies: Vec<&[u8]> = messages.iter().map(|m| m.body.as_slice()).collect();
    sqlx::query!(
        "INSERT INTO outbox (topic, message_id, body)
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::bytea[])",
        &topics as &[&str],
        &ids as &[&str],
        &bodies as &[&[u8]],
    )
    .execute(conn)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_round_trip_and_job_bodies_are_ids_only() {
        for t in Topic::ALL {
            assert_eq!(Topic::parse(t.as_str()), Some(t));
        }
        let m = Message::job(Uuid::nil(), Lane::Backfill);
        assert_eq!(m.topic.as_str(), "documents.backfill");
        assert_eq!(m.body, br#"{"document_id":"00000000-0000-0000-0000-000000000000"}"#);
    }
}
