//! The consumer: takes audit messages off `{prefix}.audit` (each one signed
//! event, or a producer's batch of them as a JSON array) in batches, checks
//! each event's signature, appends the batch to the chain in one
//! transaction, then acks it. An event whose signature does not hold, or
//! whose key may not speak for its actor, is never stored: the message
//! carrying it is parked whole in the audit dead-letter queue with its
//! reason (`bad_signature`, `producer_mismatch`) and counted.

use std::time::Duration;

use clinflow::amqp::{Outgoing, Publisher, Topology};
use clinflow::audit::AuditEvent;
use clinflow::audit::signing::{self, PublicKeys, SignedEvent, Signer};
use clinflow::chain;
use clinflow::checkpoint;
use clinflow::link::{self, LinkState, SessionEnd};
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use secrecy::SecretString;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::Span;
use uuid::Uuid;

use crate::telemetry;

pub const SERVICE_NAME: &str = "clinflow-audit-sink";
/// Longest pause between two tries of a batch the database refused.
const MAX_PAUSE: Duration = Duration::from_secs(5);

pub struct Sink {
    pub db: PgPool,
    /// The sink's own key: it signs the chain's heads and the checkpoints.
    pub signer: std::sync::Arc<Signer>,
    /// The producers' public keys: an event is stored only if one of them
    /// signed it and may speak for its actor.
    pub keys: PublicKeys,
    pub topology: Topology,
    /// Most events written in one transaction.
    pub batch_size: usize,
    /// How long a batch waits for more events after its first: fewer, larger
    /// transactions at moderate rates, for this much more audit lag.
    pub max_wait: Duration,
    /// The external anchor (see [`checkpoint`]); `None`: no checkpoints.
    pub checkpoints: Option<tokio::sync::Mutex<checkpoint::Checkpointer>>,
}

impl Sink {
    /// Consumes until `shutdown` fires, on a broker connection rebuilt after
    /// every broker error (see `clinflow::link`).
    pub async fn run(
        &self,
        amqp_url: &SecretString,
        link: &LinkState,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        link::supervise(amqp_url, "audit-sink", &self.topology, link, &shutdown, |connection| {
            self.session(connection, shutdown.clone())
        })
        .await
    }

    async fn session(&self, connection: Connection, shutdown: CancellationToken) -> SessionEnd {
        let ended = self.consume(&connection, &shutdown).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), connection.close(200, "bye".into())).await;
        ended
    }

    async fn consume(&self, connection: &Connection, shutdown: &CancellationToken) -> SessionEnd {
        let prefetch = u16::try_from(self.batch_size * 2).unwrap_or(u16::MAX);
        let queue = self.topology.audit().queue;
        let tag = format!("{SERVICE_NAME}-{}", Uuid::new_v4().simple());
        // Parks what can never be stored in the dead-letter queue, with why.
        let publisher = match link::within(Publisher::new(connection)).await {
            Ok(p) => p,
            Err(end) => return end,
        };
        let opened = async {
            let channel = connection.create_channel().await?;
            channel.basic_qos(prefetch, BasicQosOptions::default()).await?;
            let options = BasicConsumeOptions::default();
            let consumer = channel
                .basic_consume(queue.as_str().into(), tag.as_str().into(), options, FieldTable::default())
                .await?;
            Ok::<_, lapin::Error>((channel, consumer))
        };
        let (channel, mut consumer) = match link::within(opened).await {
            Ok(opened) => opened,
            Err(end) => return end,
        };
        tracing::info!(queue, batch_size = self.batch_size, "audit sink consuming");
        loop {
            let mut next = tokio::select! {
                () = shutdown.cancelled() => return SessionEnd::Shutdown,
                lost = link::lost(&channel, &queue) => return SessionEnd::Broker(lost),
                next = consumer.next() => next,
            };
            let mut batch = Vec::new();
            let mut events = 0;
            // Take what arrives within `max_wait` of the first event, up to
            // `batch_size` events (a message carries one or many).
            let deadline = tokio::time::Instant::now() + self.max_wait;
            loop {
                match next {
                    Some(Ok(d)) => {
                        let read = read_message(&d, &self.keys);
                        events += read.as_ref().map_or(0, Vec::len);
                        batch.push((d, read));
                    }
                    Some(Err(e)) => return e.into(),
                    None => return SessionEnd::Broker(anyhow::anyhow!("the broker closed the audit consumer")),
                }
                if events >= self.batch_size {
                    break;
                }
                match tokio::time::timeout_at(deadline, consumer.next()).await {
                    Ok(n) => next = n,
                    Err(_) => break,
                }
            }
            if let Err(end) = self.write(batch, &channel, &publisher, shutdown).await {
                return end;
            }
        }
    }

    /// Stores one batch and settles every delivery in it. A message that
    /// can never be stored (not JSON: `undecodable`; JSON but not a signed
    /// audit event this sink knows: `schema_invalid`; an event without a
    /// signature that holds under a known key: `bad_signature`; signed by a
    /// key that may not speak for its actor: `producer_mismatch`) is
    /// published to the audit dead-letter queue with that reason
    /// (confirmed) — `dead-letters replay` brings it back, e.g. after an
    /// upgrade that knows its action or once the key is installed.
    #[tracing::instrument(skip_all, name = "batch", fields(messages = batch.len(), parked, written))]
    async fn write(
        &self,
        batch: Vec<(Delivery, Read)>,
        channel: &Channel,
        publisher: &Publisher,
        shutdown: &CancellationToken,
    ) -> Result<(), SessionEnd> {
        let last = batch.iter().map(|(d, _)| d.delivery_tag).max();
        let mut events = Vec::new();
        let mut parked = Vec::new();
        for (delivery, read) in batch {
            match read {
                Ok(signed) => events.extend(signed),
                Err(reason) => parked.push((delivery, reason)),
            }
        }
        metrics::histogram!(telemetry::BATCH_SIZE).record(events.len() as f64);
        Span::current().record("parked", parked.len());
        self.park(publisher, &parked).await?;
        let Some(last) = last else { return Ok(()) };
        let ack = || channel.basic_ack(last, BasicAckOptions { multiple: true });
        if events.is_empty() {
            return link::within(ack()).await;
        }
        let written = self.append_until_stored(&events, channel, shutdown).await?;
        Span::current().record("written", written);
        // Every other delivery of the batch has a lower tag on this channel.
        link::within(ack()).await
    }

    /// Appends the events to the chain in one transaction; returns how many
    /// were new to it (each event is stored once). While the database
    /// refuses them the batch is held, unacknowledged, and retried
    /// with growing pauses: an outage of any length loses no event and
    /// pushes none past the queue's delivery limit.
    async fn append_until_stored(
        &self,
        events: &[SignedEvent],
        channel: &Channel,
        shutdown: &CancellationToken,
    ) -> Result<usize, SessionEnd> {
        let mut pause = Duration::from_millis(100);
        loop {
            let started = std::time::Instant::now();
            match chain::append(&self.db, &self.signer, events).await {
                Ok(written) => {
                    metrics::counter!(telemetry::WRITTEN).increment(written as u64);
                    telemetry::persisted(events);
                    metrics::histogram!("clinflow_audit_batch_seconds").record(started.elapsed().as_secs_f64());
                    if let Some(checkpoints) = &self.checkpoints {
                        // The batch is committed: a failed checkpoint is
                        // retried with the next batch, and said loudly.
                        if let Err(e) = checkpoints.lock().await.after_batch(&self.db, &self.signer, written).await {
                            tracing::error!(error = %e, "audit checkpoint not written");
                            metrics::counter!("clinflow_audit_checkpoint_failures_total").increment(1);
                        }
                    }
                    return Ok(written);
                }
                Err(e) if !channel.status().connected() => {
                    return Err(SessionEnd::Broker(anyhow::Error::new(e).context("broker gone during a batch")));
                }
                Err(e) => {
                    metrics::counter!("clinflow_audit_batch_retries_total").increment(1);
                    if no_partition(&e) {
                        // The month's partition is missing (the hourly task
                        // creates it ahead; this is the safety net).
                        if let Err(e) = crate::archive::create_ahead(&self.db).await {
                            tracing::error!(error = %e, "audit partitions not created");
                        }
                    }
                    tracing::error!(error = %e, events = events.len(), pause_ms = pause.as_millis() as u64, "audit batch not stored; holding it");
                    tokio::select! {
                        // Unsettled, the batch is redelivered to the next sink.
                        () = shutdown.cancelled() => return Err(SessionEnd::Shutdown),
                        () = tokio::time::sleep(pause) => {}
                    }
                    pause = (pause * 2).min(MAX_PAUSE);
                }
            }
        }
    }

    async fn park(&self, publisher: &Publisher, parked: &[(Delivery, &'static str)]) -> Result<(), SessionEnd> {
        if parked.is_empty() {
            return Ok(());
        }
        let exchange = self.topology.dead_letter_exchange();
        let outgoing: Vec<Outgoing<'_>> = parked
            .iter()
            .map(|(d, reason)| Outgoing {
                reason: Some(reason),
                ..Outgoing::new(
                    &exchange,
                    clinflow::amqp::AUDIT,
                    d.properties.message_id().as_ref().map_or("", |m| m.as_str()),
                    &d.data,
                )
            })
            .collect();
        publisher.publish_many(&outgoing).await.map_err(|e| SessionEnd::Broker(e.into()))?;
        for (d, reason) in parked {
            tracing::error!(bytes = d.data.len(), reason, "not an audit event this sink may store; dead-lettered");
            metrics::counter!(telemetry::DEAD_LETTERED, "reason" => *reason).increment(1);
        }
        Ok(())
    }
}

/// A message's events, every one of them signed under a key that may speak
/// for its actor; or why the message is parked, whole: one event of it that
/// does not hold keeps all of them out of the chain.
type Read = Result<Vec<SignedEvent>, &'static str>;

fn read_message(delivery: &Delivery, keys: &PublicKeys) -> Read {
    let body = &delivery.data;
    match signing::parse_message(body) {
        Ok(signed) => match keys.check_all(&signed) {
            Ok(()) => Ok(signed),
            Err(refusal) => Err(refusal.as_str()),
        },
        // Events as they were before signatures, or forged without a key.
        Err(_) if serde_json::from_slice::<AuditEvent>(body).is_ok() => Err("bad_signature"),
        Err(_) if serde_json::from_slice::<Vec<AuditEvent>>(body).is_ok_and(|e| !e.is_empty()) => Err("bad_signature"),
        Err(_) if serde_json::from_slice::<serde_json::Value>(body).is_ok() => Err("schema_invalid"),
        Err(_) => Err("undecodable"),
    }
}

/// The insert found no partition for its rows' month (check_violation).
fn no_partition(e: &chain::ChainError) -> bool {
    matches!(e, chain::ChainError::Db(sqlx::Error::Database(d)) if d.code().as_deref() == Some("23514"))
}
