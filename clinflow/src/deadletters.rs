//! Dead-lettered document jobs, and putting documents through the pipeline
//! again: what `clinflow-worker dead-letters list|replay`, `clinflow-worker
//! reprocess` and the api's `/v1/ops/...` endpoints share.
//!
//! Listing takes every message of the lanes' `.dead` queues without acking
//! it and closes the channel, which puts them all back: nothing is consumed.
//! Replay sets the document back to `queued` (the only way out of `failed`
//! besides reprocess), publishes its job on its lane with confirms and only
//! then acks the dead message; a crash in between leaves the message in the
//! dead queue to be replayed again (a job twice is harmless: the worker's
//! claim and the one result per model version absorb it).
//!
//! The `dead-letters` command of the worker and of the audit sink (whose
//! queue `list_audit` and `replay_audit` serve) is one: [`command`].

pub mod command;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicGetOptions};
use lapin::{BasicProperties, Channel, Connection};
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use crate::amqp::{self, AmqpError, Lane, Publisher, Topology};
use crate::audit::{self, Action, AuditEvent, Operator, Outcome};
use crate::documents::reprocess::Reprocess;
use crate::jobs::DocumentJob;

/// One parked job, without anything of the document's content.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Parked {
    pub lane: &'static str,
    /// `None` when the message is not a job at all.
    pub document_id: Option<Uuid>,
    /// Why it was parked: clinflow's own reason (`retries_exhausted`,
    /// `malformed_job`, …) or the broker's (`delivery_limit`, …).
    pub reason: String,
    pub attempts: u32,
}

#[derive(Debug, Default, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Listing {
    pub total: usize,
    /// Reason → number of jobs.
    pub by_reason: BTreeMap<String, usize>,
    pub jobs: Vec<Parked>,
}

/// Which dead jobs to replay.
#[derive(Debug, Clone)]
pub enum Selection {
    All,
    Documents(HashSet<Uuid>),
}

#[derive(Debug, Default, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Replayed {
    /// Jobs put back on their lane (their documents now `queued`).
    pub replayed: Vec<Uuid>,
    /// Dead messages dropped because their document is already done.
    pub already_done: Vec<Uuid>,
    /// Left in the dead queue: not a job, or naming no document.
    pub left: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error(transparent)]
    Amqp(#[from] AmqpError),
    #[error("RabbitMQ: {0}")]
    Broker(#[from] lapin::Error),
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
}

/// Every dead-lettered document job, counted by reason. Nothing is
/// consumed. Audited as `actor`'s.
pub async fn list(connection: &Connection, topology: &Topology, operator: &Operator) -> Result<Listing, OpsError> {
    let mut listing = Listing::default();
    for lane in Lane::ALL {
        let channel = connection.create_channel().await?;
        for delivery in take_all(&channel, &topology.lane(lane).dead_queue).await? {
            let parked = describe(lane, &delivery.properties, &delivery.data);
            *listing.by_reason.entry(parked.reason.clone()).or_default() += 1;
            listing.jobs.push(parked);
        }
        // Closing without acking puts every message back.
        channel.close(200, "listed".into()).await?;
    }
    listing.total = listing.jobs.len();
    let event =
        AuditEvent::new(Action::DeadLettersList, operator.actor.clone(), Outcome::Success).resource("queue", "dead");
    audit_and_close(connection, topology, operator, &[event]).await?;
    Ok(listing)
}

/// Replays the selected dead jobs: document back to `queued`, job
/// published on its lane (confirmed), dead message acked. Each document
/// replayed is audited as `actor`'s.
pub async fn replay(
    connection: &Connection,
    db: &PgPool,
    topology: &Topology,
    selection: &Selection,
    operator: &Operator,
) -> Result<Replayed, OpsError> {
    let publisher = Publisher::new(connection).await?;
    let mut outcome = Replayed::default();
    for lane in Lane::ALL {
        let channel = connection.create_channel().await?;
        let mut chosen = Vec::new();
        for delivery in take_all(&channel, &topology.lane(lane).dead_queue).await? {
            let id = crate::jobs::decode(&delivery.data).ok().map(|j| j.document_id);
            match (id, selection) {
                (Some(id), Selection::All) => chosen.push((id, delivery.delivery_tag)),
                (Some(id), Selection::Documents(ids)) if ids.contains(&id) => chosen.push((id, delivery.delivery_tag)),
                (None, Selection::All) => outcome.left += 1,
                _ => {}
            }
        }
        let ids: Vec<Uuid> = chosen.iter().map(|(id, _)| *id).collect();
        let requeued: HashSet<Uuid> = crate::documents::reprocess::requeue(db, &ids).await?.into_iter().collect();
        let done: HashSet<Uuid> = crate::documents::reprocess::done_among(db, &ids).await?.into_iter().collect();
        let events: Vec<AuditEvent> = requeued
            .iter()
            .map(|id| {
                AuditEvent::new(Action::DeadLettersReplay, operator.actor.clone(), Outcome::Success).document(*id)
            })
            .collect();
        audit::publish_many(&publisher, topology, &operator.signer, &events).await?;
        publish_jobs(&publisher, topology, lane, &requeued.iter().copied().collect::<Vec<_>>()).await?;
        for (id, tag) in &chosen {
            if requeued.contains(id) {
                outcome.replayed.push(*id);
            } else if done.contains(id) {
                outcome.already_done.push(*id);
            } else {
                outcome.left += 1;
                continue;
            }
            channel.basic_ack(*tag, BasicAckOptions::default()).await?;
        }
        // What was not acked goes back to the dead queue.
        channel.close(200, "replayed".into()).await?;
    }
    publisher.channel().close(200, "done".into()).await?;
    Ok(outcome)
}

/// Sets the selected documents back to `queued` and publishes their jobs on
/// the backfill lane (so that a large reprocess never holds up live
/// uploads), a thousand at a time. Returns how many. Audited as `actor`'s,
/// once, before it starts.
pub async fn reprocess(
    connection: &Connection,
    db: &PgPool,
    topology: &Topology,
    which: &Reprocess,
    operator: &Operator,
    mut progress: impl FnMut(usize),
) -> Result<usize, OpsError> {
    const CHUNK: i64 = 1_000;
    let publisher = Publisher::new(connection).await?;
    let selection = match which {
        Reprocess::All => "all".to_owned(),
        Reprocess::UploadedBetween(from, to) => format!("uploaded:{}..{}", from.unix_timestamp(), to.unix_timestamp()),
        Reprocess::WithoutResultFrom(model) => format!("without_result_from:{model}"),
    };
    let event =
        AuditEvent::new(Action::Reprocess, operator.actor.clone(), Outcome::Success).resource("selection", &selection);
    audit::publish_many(&publisher, topology, &operator.signer, &[event]).await?;
    let (mut after, mut total) = (Uuid::nil(), 0);
    loop {
        let ids = crate::documents::reprocess::select_for_reprocess(db, which, after, CHUNK).await?;
        let Some(last) = ids.last() else { break };
        after = *last;
        let requeued = crate::documents::reprocess::requeue_any(db, &ids).await?;
        publish_jobs(&publisher, topology, Lane::Backfill, &requeued).await?;
        total += requeued.len();
        progress(total);
    }
    publisher.channel().close(200, "done".into()).await?;
    Ok(total)
}

async fn publish_jobs(publisher: &Publisher, topology: &Topology, lane: Lane, ids: &[Uuid]) -> Result<(), AmqpError> {
    let wq = topology.lane(lane);
    for chunk in ids.chunks(500) {
        let jobs: Vec<(String, DocumentJob)> =
            chunk.iter().map(|id| (id.to_string(), DocumentJob { document_id: *id })).collect();
        let refs: Vec<(&str, &DocumentJob)> = jobs.iter().map(|(m, j)| (m.as_str(), j)).collect();
        publisher.publish_json_many(&wq.exchange, wq.key, &refs).await?;
    }
    Ok(())
}

/// Every message of `queue`, taken without ack (the caller closes the
/// channel to put them back, or acks some).
async fn take_all(channel: &Channel, queue: &str) -> Result<Vec<Delivery>, OpsError> {
    let mut out = Vec::new();
    loop {
        let get = channel.basic_get(queue.into(), BasicGetOptions { no_ack: false });
        match tokio::time::timeout(Duration::from_secs(10), get).await {
            Ok(Ok(Some(message))) => out.push(message.delivery),
            Ok(Ok(None)) => return Ok(out),
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => return Err(AmqpError::Timeout.into()),
        }
    }
}

fn describe(lane: Lane, properties: &BasicProperties, data: &[u8]) -> Parked {
    let reason = amqp::header_str(properties, amqp::REASON_HEADER).or_else(|| broker_reason(properties));
    Parked {
        lane: lane.as_str(),
        document_id: crate::jobs::decode(data).ok().map(|j| j.document_id),
        reason: reason.unwrap_or_else(|| "unknown".into()),
        attempts: amqp::header_int(properties, amqp::ATTEMPTS_HEADER).and_then(|n| u32::try_from(n).ok()).unwrap_or(0),
    }
}

/// The broker's own reason from the first `x-death` entry (`delivery_limit`,
/// `rejected`, `expired`, `maxlen`).
fn broker_reason(properties: &BasicProperties) -> Option<String> {
    use lapin::types::AMQPValue;
    let deaths = properties.headers().as_ref()?.inner().get("x-death")?;
    let AMQPValue::FieldArray(deaths) = deaths else { return None };
    let AMQPValue::FieldTable(first) = deaths.as_slice().first()? else { return None };
    match first.inner().get("reason")? {
        AMQPValue::LongString(s) => Some(s.to_string()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

/// One message parked in the audit dead-letter queue: its id (the event
/// id, when the publisher set it), why, and its size. Not its content.
#[derive(Debug, Clone, Serialize)]
pub struct ParkedEvent {
    pub message_id: String,
    pub reason: String,
    pub bytes: usize,
}

#[derive(Debug, Default, Serialize)]
pub struct AuditListing {
    pub total: usize,
    pub by_reason: BTreeMap<String, usize>,
    pub messages: Vec<ParkedEvent>,
}

/// The audit dead-letter queue, counted by reason. Nothing is consumed.
pub async fn list_audit(
    connection: &Connection,
    topology: &Topology,
    operator: &Operator,
) -> Result<AuditListing, OpsError> {
    let channel = connection.create_channel().await?;
    let mut listing = AuditListing::default();
    for delivery in take_all(&channel, &topology.audit().dead_queue).await? {
        let properties = &delivery.properties;
        let reason = amqp::header_str(properties, amqp::REASON_HEADER)
            .or_else(|| broker_reason(properties))
            .unwrap_or_else(|| "unknown".into());
        *listing.by_reason.entry(reason.clone()).or_default() += 1;
        let message_id = properties.message_id().as_ref().map_or_else(String::new, |m| m.to_string());
        listing.messages.push(ParkedEvent { message_id, reason, bytes: delivery.data.len() });
    }
    channel.close(200, "listed".into()).await?;
    listing.total = listing.messages.len();
    let event = AuditEvent::new(Action::DeadLettersList, operator.actor.clone(), Outcome::Success)
        .resource("queue", "audit.dead");
    audit::publish_many(&Publisher::new(connection).await?, topology, &operator.signer, &[event]).await?;
    Ok(listing)
}

/// Puts the selected audit dead letters (all, or by message id) back on the
/// audit queue, confirmed, then acks them. The sink stores each event once
/// (by `event_id`), so a replay never duplicates one; what it still cannot
/// store comes back to the dead-letter queue. Returns how many.
pub async fn replay_audit(
    connection: &Connection,
    topology: &Topology,
    ids: Option<&HashSet<String>>,
    operator: &Operator,
) -> Result<usize, OpsError> {
    let publisher = Publisher::new(connection).await?;
    let channel = connection.create_channel().await?;
    let queue = topology.audit();
    let mut chosen = Vec::new();
    for delivery in take_all(&channel, &queue.dead_queue).await? {
        let id = delivery.properties.message_id().as_ref().map_or_else(String::new, |m| m.to_string());
        if ids.is_none_or(|ids| ids.contains(&id)) {
            chosen.push((id, delivery.delivery_tag, delivery.data));
        }
    }
    let outgoing: Vec<amqp::Outgoing<'_>> =
        chosen.iter().map(|(id, _, data)| amqp::Outgoing::new(&queue.exchange, queue.key, id, data)).collect();
    for chunk in outgoing.chunks(500) {
        publisher.publish_many(chunk).await?;
    }
    for (_, tag, _) in &chosen {
        channel.basic_ack(*tag, BasicAckOptions::default()).await?;
    }
    channel.close(200, "replayed".into()).await?;
    let events: Vec<AuditEvent> = chosen
        .iter()
        .map(|(id, _, _)| {
            AuditEvent::new(Action::DeadLettersReplay, operator.actor.clone(), Outcome::Success)
                .resource("audit_message", id)
        })
        .collect();
    audit::publish_many(&publisher, topology, &operator.signer, &events).await?;
    publisher.channel().close(200, "done".into()).await?;
    Ok(chosen.len())
}

/// Publishes `events` (confirmed) on a channel of their own, then closes it.
async fn audit_and_close(
    connection: &Connection,
    topology: &Topology,
    operator: &Operator,
    events: &[AuditEvent],
) -> Result<(), OpsError> {
    let publisher = Publisher::new(connection).await?;
    audit::publish_many(&publisher, topology, &operator.signer, events).await?;
    publisher.channel().close(200, "done".into()).await?;
    Ok(())
}
