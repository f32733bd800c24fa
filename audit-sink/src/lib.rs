//! clinflow-audit-sink: the only writer of the audit trail.
//!
//! It takes audit events off `{prefix}.audit` in batches, appends them to the
//! hash-chained `audit_events` table in one transaction per batch, and acks
//! them only after the commit. A message that is not an audit event is
//! dead-lettered (kept, never dropped).

pub mod chain;

use std::time::Duration;

use clinflow::amqp::Topology;
use clinflow::audit::AuditEvent;
use futures_util::{FutureExt, StreamExt};
use lapin::Channel;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, BasicRejectOptions};
use lapin::types::FieldTable;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::chain::ChainKey;

pub const SERVICE_NAME: &str = "clinflow-audit-sink";

pub struct Sink {
    pub db: PgPool,
    pub key: ChainKey,
    pub topology: Topology,
    /// Most events written in one transaction.
    pub batch_size: usize,
}

impl Sink {
    pub async fn run(&self, channel: Channel, shutdown: CancellationToken) -> anyhow::Result<()> {
        let prefetch = u16::try_from(self.batch_size * 2).unwrap_or(u16::MAX);
        channel.basic_qos(prefetch, BasicQosOptions::default()).await?;
        let queue = self.topology.audit().queue;
        let tag = format!("{SERVICE_NAME}-{}", Uuid::new_v4().simple());
        let mut consumer = channel
            .basic_consume(
                queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        tracing::info!(queue, batch_size = self.batch_size, "audit sink consuming");
        loop {
            let next = tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                next = consumer.next() => next,
            };
            let Some(first) = next else { anyhow::bail!("the audit queue consumer was closed by the broker") };
            let mut batch = Vec::with_capacity(self.batch_size);
            let mut next = Some(first);
            // Take what has already arrived, without waiting for more.
            while let Some(delivery) = next {
                match delivery {
                    Ok(d) => batch.push(d),
                    Err(e) => tracing::error!(error = %e, "consumer error"),
                }
                next = if batch.len() < self.batch_size { consumer.next().now_or_never().flatten() } else { None };
            }
            if !self.write(batch).await {
                // The database is down: back off instead of spinning on
                // redeliveries.
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }

    /// Stores one batch and settles every delivery in it; false if the
    /// batch had to be requeued.
    async fn write(&self, batch: Vec<Delivery>) -> bool {
        let mut events = Vec::with_capacity(batch.len());
        let mut good = Vec::with_capacity(batch.len());
        for delivery in batch {
            match serde_json::from_slice::<AuditEvent>(&delivery.data) {
                Ok(event) => {
                    events.push(event);
                    good.push(delivery);
                }
                Err(_) => {
                    tracing::error!(bytes = delivery.data.len(), "not an audit event; dead-lettering it");
                    metrics::counter!("clinflow_audit_sink_malformed_total").increment(1);
                    settle(delivery.reject(BasicRejectOptions { requeue: false }).await);
                }
            }
        }
        if good.is_empty() {
            return true;
        }
        let started = std::time::Instant::now();
        match chain::append(&self.db, &self.key, &events).await {
            Ok(written) => {
                metrics::counter!("clinflow_audit_events_written_total").increment(written as u64);
                metrics::histogram!("clinflow_audit_batch_seconds").record(started.elapsed().as_secs_f64());
                for delivery in good {
                    settle(delivery.ack(BasicAckOptions::default()).await);
                }
                true
            }
            Err(e) => {
                tracing::error!(error = %e, events = good.len(), "audit batch not stored; requeueing");
                for delivery in good {
                    settle(delivery.nack(BasicNackOptions { requeue: true, multiple: false }).await);
                }
                false
            }
        }
    }
}

fn settle(result: Result<bool, lapin::Error>) {
    if let Err(e) = result {
        // Unsettled deliveries come back; event ids make the retry harmless.
        tracing::error!(error = %e, "could not settle an audit delivery");
    }
}
