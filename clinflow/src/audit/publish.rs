//! Publishing audit events from the services and their commands, signed.

use std::sync::Arc;

use super::event::{Actor, AuditEvent};
use super::signing::Signer;
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

/// Signs the events with `signer`, publishes them (packed by
/// [`Signer::messages`]) and waits for all their confirmations
/// at once (the worker's and the commands' path; the api's events go
/// through its outbox).
pub async fn publish_many(
    publisher: &Publisher,
    topology: &Topology,
    signer: &Signer,
    events: &[AuditEvent],
) -> Result<(), AmqpError> {
    let started = std::time::Instant::now();
    let messages = signer.messages(events)?;
    let exchange = topology.audit_exchange();
    let outgoing: Vec<Outgoing<'_>> =
        messages.iter().map(|(id, body)| Outgoing::new(&exchange, amqp::AUDIT, id, body)).collect();
    let result = publisher.publish_many(&outgoing).await;
    metrics::histogram!("clinflow_audit_publish_seconds").record(started.elapsed().as_secs_f64());
    let counter =
        if result.is_ok() { "clinflow_audit_events_published_total" } else { "clinflow_audit_publish_failures_total" };
    metrics::counter!(counter).increment(events.len() as u64);
    result
}
