//! Consuming: one session per broker connection, `in_flight` slots in it,
//! each with a channel per lane, taking batches of deliveries live jobs
//! first and handing each to `settle`.

use std::sync::Arc;
use std::time::Duration;

use clinflow::amqp::{Lane, Publisher};
use clinflow::link::{self, LinkState, SessionEnd};
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};
use secrecy::SecretString;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::job::{Channels, Job};
use crate::telemetry;
use crate::worker::{SERVICE_NAME, Worker};

impl Worker {
    /// Consumes the live documents queue until `shutdown` fires, on a broker
    /// connection rebuilt after every broker error (see `clinflow::link`).
    /// Returns an error only for what no reconnection cures: a document
    /// that cannot be decrypted.
    pub async fn run(
        self: Arc<Self>,
        amqp_url: &SecretString,
        link: &LinkState,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        link::supervise(amqp_url, "worker", &self.topology, link, &shutdown, |connection| {
            Arc::clone(&self).session(connection, shutdown.clone())
        })
        .await
    }

    /// One connection's worth of work: a confirm channel for audit events
    /// and `in_flight` consuming channels. The first slot that fails ends
    /// the session (and stops the others).
    async fn session(self: Arc<Self>, connection: Connection, shutdown: CancellationToken) -> SessionEnd {
        let publisher = match link::within(Publisher::new(&connection)).await {
            Ok(p) => p,
            Err(end) => return end,
        };
        let stop = shutdown.child_token();
        let mut slots = tokio::task::JoinSet::new();
        for slot in 0..self.batch.in_flight {
            let channels = async {
                Ok::<_, lapin::Error>((connection.create_channel().await?, connection.create_channel().await?))
            };
            match link::within(channels).await {
                Ok(channels) => {
                    slots.spawn(Arc::clone(&self).consume(channels, publisher.clone(), slot, stop.clone()));
                }
                Err(end) => {
                    stop.cancel();
                    return end;
                }
            }
        }
        tracing::info!(
            live = self.topology.documents_live().queue,
            backfill = self.topology.documents_backfill().queue,
            batch_size = self.batch.size,
            in_flight = self.batch.in_flight,
            model_version = self.model_version,
            "worker consuming"
        );
        let mut end = SessionEnd::Shutdown;
        while let Some(ended) = slots.join_next().await {
            let ended = ended.unwrap_or_else(|e| SessionEnd::Fatal(anyhow::anyhow!("a batch loop panicked: {e}")));
            match (&end, ended) {
                (_, SessionEnd::Shutdown) => {}
                (SessionEnd::Fatal(_), _) => {}
                (_, other) => {
                    stop.cancel();
                    end = other;
                }
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), connection.close(200, "bye".into())).await;
        end
    }

    /// One slot: a channel (and consumer) per lane, batches taken live
    /// first. Each lane has its own channel so that a `multiple` ack on it
    /// covers only deliveries of that lane, all of them in this slot's
    /// batches, settled in order.
    async fn consume(
        self: Arc<Self>,
        (live, backfill): (Channel, Channel),
        publisher: Publisher,
        slot: u16,
        stop: CancellationToken,
    ) -> SessionEnd {
        let tag = Uuid::new_v4().simple().to_string();
        let subscribe = async |channel: &Channel, lane: Lane| {
            channel.basic_qos(self.batch.size, BasicQosOptions::default()).await?;
            let queue = self.topology.lane(lane).queue;
            let tag = format!("{SERVICE_NAME}-{tag}-{slot}-{}", lane.as_str());
            channel
                .basic_consume(
                    queue.as_str().into(),
                    tag.as_str().into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
        };
        let consumers = async {
            Ok::<_, lapin::Error>((subscribe(&live, Lane::Live).await?, subscribe(&backfill, Lane::Backfill).await?))
        };
        let (mut live_consumer, mut backfill_consumer) = match link::within(consumers).await {
            Ok(c) => c,
            Err(end) => return end,
        };
        let channels = Channels { live: &live, backfill: &backfill };
        loop {
            let batch = match self.next_batch(&mut live_consumer, &mut backfill_consumer, &channels, &stop).await {
                Ok(Some(batch)) => batch,
                Ok(None) => return SessionEnd::Shutdown,
                Err(e) => return SessionEnd::Broker(e),
            };
            let _in_flight = telemetry::in_flight();
            let lives = batch.iter().filter(|j| j.lane == Lane::Live).count();
            let span = tracing::info_span!("batch", slot, documents = batch.len(), live = lives);
            if let Err(end) = self.settle(batch, &channels, &publisher, &stop).instrument(span).await {
                return end;
            }
        }
    }

    /// The next batch, live jobs first, or `None` once `stop` fires while
    /// waiting for one.
    async fn next_batch(
        &self,
        live: &mut Consumer,
        backfill: &mut Consumer,
        channels: &Channels<'_>,
        stop: &CancellationToken,
    ) -> anyhow::Result<Option<Vec<Job>>> {
        let mut batch = Vec::with_capacity(usize::from(self.batch.size));
        let (live_queue, backfill_queue) =
            (self.topology.documents_live().queue, self.topology.documents_backfill().queue);
        let first = tokio::select! {
            biased;
            () = stop.cancelled() => return Ok(None),
            lost = link::lost(channels.live, &live_queue) => return Err(lost),
            lost = link::lost(channels.backfill, &backfill_queue) => return Err(lost),
            next = live.next() => Job { lane: Lane::Live, delivery: delivery(next)? },
            next = backfill.next() => Job { lane: Lane::Backfill, delivery: delivery(next)? },
        };
        batch.push(first);
        let deadline = tokio::time::Instant::now() + self.batch.max_wait;
        while batch.len() < usize::from(self.batch.size) {
            let job = tokio::select! {
                biased;
                next = live.next() => Job { lane: Lane::Live, delivery: delivery(next)? },
                next = backfill.next() => Job { lane: Lane::Backfill, delivery: delivery(next)? },
                () = tokio::time::sleep_until(deadline) => break,
            };
            batch.push(job);
        }
        metrics::histogram!("clinflow_worker_batch_size").record(batch.len() as f64);
        Ok(Some(batch))
    }
}

/// A delivery from the consumer stream; an error or its end means the
/// channel is gone (the session is rebuilt), never a quiet exit.
fn delivery(next: Option<Result<Delivery, lapin::Error>>) -> anyhow::Result<Delivery> {
    match next {
        Some(Ok(delivery)) => Ok(delivery),
        Some(Err(e)) => Err(anyhow::Error::new(e).context("document consumer")),
        None => anyhow::bail!("the broker closed the document consumer"),
    }
}
