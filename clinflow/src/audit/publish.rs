//! Publishing audit events from the services and their commands, signed.

use std::sync::Arc;

use super::event::{Actor, AuditEvent};
use super::signing::{SignedEvent, Signer};
use crate::amqp::{self, AmqpError, Publisher, Topology};

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

/// Signs the events with `signer`, publishes them and waits for all their
/// confirmations at once (the worker's and the commands' path; the api's
/// events go through its outbox).
pub async fn publish_many(
    publisher: &Publisher,
    topology: &Topology,
    signer: &Signer,
    events: &[AuditEvent],
) -> Result<(), AmqpError> {
    let started = std::time::Instant::now();
    let ids: Vec<String> = events.iter().map(|e| e.event_id.to_string()).collect();
    let signed = events.iter().map(|e| signer.sign(e)).collect::<Result<Vec<_>, _>>()?;
    let messages: Vec<(&str, &SignedEvent)> = ids.iter().map(String::as_str).zip(&signed).collect();
    let result = publisher.publish_json_many(&topology.audit_exchange(), amqp::AUDIT, &messages).await;
    metrics::histogram!("clinflow_audit_publish_seconds").record(started.elapsed().as_secs_f64());
    let counter =
        if result.is_ok() { "clinflow_audit_events_published_total" } else { "clinflow_audit_publish_failures_total" };
    metrics::counter!(counter).increment(events.len() as u64);
    result
}
