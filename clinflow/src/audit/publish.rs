//! Publishing audit events from the services and their commands, signed.

use std::sync::Arc;

use super::event::{Actor, AuditEvent};
use super::signing::{MAX_EVENTS_PER_MESSAGE, SignedEvent, Signer, message_body};
use crate::amqp::{self, AmqpError, Outgoing, Publisher, Topology};

/// Who runs an operation (an operator's command, or an ops endpoint's
/// caller), and the key that signs its events.
#[derive(Debug, Clone)]
pub struct Operator {
    pub actor: Actor,
    pub signer: Arc<Signer>,
}

impl Operator {
    /// The OS user running `tool` (`clinflow-api`, …), signing with the key
    /// of that service's deployment (`AUDIT_SIGNING_KEY`).
    pub fn from_env(tool: &str) -> Result<Self, crate::config::ConfigError> {
        let producer = tool.strip_prefix("clinflow-").unwrap_or(tool);
        Ok(Self { actor: Actor::operator(tool), signer: Arc::new(Signer::from_env(producer)?) })
    }
}

/// Signs the events with `signer`, publishes them (as few messages as
/// [`MAX_EVENTS_PER_MESSAGE`] allows) and waits for all their confirmations
/// at once (the worker's and the commands' path; the api's events go
/// through its outbox).
pub async fn publish_many(
    publisher: &Publisher,
    topology: &Topology,
    signer: &Signer,
    events: &[AuditEvent],
) -> Result<(), AmqpError> {
    let started = std::time::Instant::now();
    let signed = events.iter().map(|e| signer.sign(e)).collect::<Result<Vec<_>, _>>()?;
    // One message per MAX_EVENTS_PER_MESSAGE events, named after its first.
    let chunks: Vec<&[SignedEvent]> = signed.chunks(MAX_EVENTS_PER_MESSAGE).collect();
    let ids: Vec<String> = chunks.iter().map(|c| c[0].event.event_id.to_string()).collect();
    let bodies = chunks.iter().map(|c| message_body(c)).collect::<Result<Vec<_>, _>>()?;
    let exchange = topology.audit_exchange();
    let outgoing: Vec<Outgoing<'_>> =
        ids.iter().zip(&bodies).map(|(id, body)| Outgoing::new(&exchange, amqp::AUDIT, id, body)).collect();
    let result = publisher.publish_many(&outgoing).await;
    metrics::histogram!("clinflow_audit_publish_seconds").record(started.elapsed().as_secs_f64());
    let counter =
        if result.is_ok() { "clinflow_audit_events_published_total" } else { "clinflow_audit_publish_failures_total" };
    metrics::counter!(counter).increment(events.len() as u64);
    result
}
