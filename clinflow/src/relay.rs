//! The outbox relay: publishes [`outbox`](crate::outbox) rows with publisher
//! confirms, hundreds in flight at once, and deletes them in the same
//! transaction that locked them, after the broker confirmed them. A crash
//! between publish and commit publishes those rows again; every consumer is
//! idempotent (the worker's claim, the audit sink's `event_id`).
//!
//! The relay owns its broker connection. On any broker error it drops the
//! connection and builds a new one (connect, declare the topology, open a
//! confirm channel) with capped backoff, instead of relying on lapin's
//! built-in recovery, which was seen stuck for good after a broker restart
//! (../shared/CRATES.md). Several api processes may each run one: rows are
//! locked with `SKIP LOCKED`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use secrecy::SecretString;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::amqp::{self, AmqpError, Outgoing, Publisher, Topology};
use crate::outbox::Topic;

/// Rows published per round trip.
const BATCH: i64 = 500;
/// How often an idle relay looks for rows another process left behind.
const IDLE_POLL: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// How often the backlog and the queue depth are measured.
const MEASURE_EVERY: Duration = Duration::from_secs(1);

/// What the relay knows, shared with request handlers (readiness,
/// backpressure) without locks.
#[derive(Debug, Default)]
struct Health {
    connected: AtomicBool,
    stopped: AtomicBool,
    backlog: AtomicU64,
    queue_depth: AtomicU64,
}

/// A cheap handle to a running relay.
#[derive(Debug, Clone, Default)]
pub struct RelayHandle {
    wake: Arc<Notify>,
    health: Arc<Health>,
}

impl RelayHandle {
    /// Asks the relay to look at the outbox now (after a commit).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Connected to the broker with a confirm channel.
    pub fn connected(&self) -> bool {
        self.health.connected.load(Ordering::Relaxed)
    }

    /// False once the relay has ended: the process can no longer deliver.
    pub fn alive(&self) -> bool {
        !self.health.stopped.load(Ordering::Relaxed)
    }

    /// Outbox rows waiting (measured about once a second).
    pub fn backlog(&self) -> u64 {
        self.health.backlog.load(Ordering::Relaxed)
    }

    /// Messages ready in the live documents queue (about once a second).
    pub fn queue_depth(&self) -> u64 {
        self.health.queue_depth.load(Ordering::Relaxed)
    }
}

pub struct Relay {
    pub db: PgPool,
    pub amqp_url: SecretString,
    pub topology: Topology,
    /// The connection name shown by RabbitMQ.
    pub name: String,
    pub handle: RelayHandle,
}

#[derive(Debug, thiserror::Error)]
enum RelayError {
    #[error(transparent)]
    Broker(#[from] AmqpError),
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
}

impl Relay {
    /// Publishes until `shutdown` fires, then drains what is left (for at
    /// most a few seconds) while the broker is there.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        while !shutdown.is_cancelled() {
            match self.connect().await {
                Ok((connection, publisher)) => {
                    self.handle.health.connected.store(true, Ordering::Relaxed);
                    metrics::gauge!("clinflow_relay_connected").set(1.0);
                    tracing::info!("outbox relay connected to RabbitMQ");
                    backoff = Duration::from_millis(100);
                    let pumped = self.pump(&publisher, &shutdown).await;
                    self.handle.health.connected.store(false, Ordering::Relaxed);
                    metrics::gauge!("clinflow_relay_connected").set(0.0);
                    let _ = tokio::time::timeout(Duration::from_secs(2), connection.close(200, "bye".into())).await;
                    match pumped {
                        Ok(()) => break,
                        Err(e) => tracing::warn!(error = %e, "outbox relay lost RabbitMQ; reconnecting"),
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "outbox relay cannot reach RabbitMQ")
                }
            }
            metrics::counter!("clinflow_relay_reconnects_total").increment(1);
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
        self.handle.health.stopped.store(true, Ordering::Relaxed);
    }

    async fn connect(&self) -> Result<(lapin::Connection, Publisher), AmqpError> {
        let connection = amqp::connect_fresh(&self.amqp_url, &self.name).await?;
        let publisher = Publisher::new(&connection).await?;
        self.topology.declare(publisher.channel()).await?;
        Ok((connection, publisher))
    }

    /// Publishes while the connection lasts; `Ok` once `shutdown` fired and
    /// the outbox is drained (or the drain ran out of time).
    async fn pump(&self, publisher: &Publisher, shutdown: &CancellationToken) -> Result<(), AmqpError> {
        let mut measured = Instant::now() - MEASURE_EVERY;
        loop {
            if !publisher.channel().status().connected() {
                return Err(AmqpError::Closed);
            }
            let published = match self.publish_pending(publisher).await {
                Ok(n) => n,
                Err(RelayError::Broker(e)) => return Err(e),
                Err(RelayError::Db(e)) => {
                    tracing::warn!(error = %e, "outbox relay cannot read the outbox; retrying");
                    0
                }
            };
            if measured.elapsed() >= MEASURE_EVERY {
                self.measure(publisher).await;
                measured = Instant::now();
            }
            if published == BATCH as usize {
                continue;
            }
            if shutdown.is_cancelled() {
                return self.drain(publisher).await;
            }
            tokio::select! {
                () = shutdown.cancelled() => return self.drain(publisher).await,
                () = self.handle.wake.notified() => {}
                () = tokio::time::sleep(IDLE_POLL) => {}
            }
        }
    }

    async fn drain(&self, publisher: &Publisher) -> Result<(), AmqpError> {
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until {
            match self.publish_pending(publisher).await {
                Ok(n) if n == BATCH as usize => continue,
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "outbox not drained at shutdown; the next start publishes the rest");
                    break;
                }
            }
        }
        Ok(())
    }

    /// One round: lock up to `BATCH` rows, publish them, await every
    /// confirmation, delete them, commit. Returns how many were published.
    async fn publish_pending(&self, publisher: &Publisher) -> Result<usize, RelayError> {
        let mut tx = self.db.begin().await?;
        let rows = sqlx::query!(
            "SELECT id, topic, message_id, body FROM outbox ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
            BATCH
        )
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let queues: Vec<_> = rows.iter().map(|r| Topic::parse(&r.topic).map(|t| self.topology.route(t))).collect();
        let mut outgoing = Vec::with_capacity(rows.len());
        let mut audits = 0;
        for (row, queue) in rows.iter().zip(&queues) {
            // The table's CHECK makes an unknown topic impossible; skip rather
            // than block the outbox if one ever appears.
            let Some(queue) = queue else {
                tracing::error!(outbox_id = row.id, "outbox row with an unknown topic; left in place");
                continue;
            };
            audits += usize::from(queue.key == amqp::AUDIT);
            outgoing.push(Outgoing {
                exchange: &queue.exchange,
                routing_key: queue.key,
                message_id: &row.message_id,
                body: &row.body,
            });
        }
        let started = Instant::now();
        publisher.publish_many(&outgoing).await?;
        metrics::histogram!("clinflow_relay_publish_seconds").record(started.elapsed().as_secs_f64());
        let ids: Vec<i64> = rows.iter().zip(&queues).filter(|(_, q)| q.is_some()).map(|(r, _)| r.id).collect();
        sqlx::query!("DELETE FROM outbox WHERE id = ANY($1)", &ids).execute(&mut *tx).await?;
        tx.commit().await?;
        metrics::counter!("clinflow_outbox_published_total").increment(ids.len() as u64);
        metrics::counter!("clinflow_audit_events_published_total").increment(audits as u64);
        Ok(ids.len())
    }

    /// Backlog of the outbox and depth of the live queue, for readiness,
    /// backpressure and the dashboards.
    async fn measure(&self, publisher: &Publisher) {
        let backlog = sqlx::query!(
            r#"SELECT count(*) AS "rows!", coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 AS "oldest!"
               FROM outbox"#
        )
        .fetch_one(&self.db)
        .await;
        if let Ok(b) = backlog {
            self.handle.health.backlog.store(u64::try_from(b.rows).unwrap_or(0), Ordering::Relaxed);
            metrics::gauge!("clinflow_outbox_backlog").set(b.rows as f64);
            metrics::gauge!("clinflow_outbox_oldest_seconds").set(b.oldest);
        }
        let queue = self.topology.documents_live().queue;
        let options = QueueDeclareOptions { passive: true, ..Default::default() };
        if let Ok(q) = publisher.channel().queue_declare(queue.as_str().into(), options, FieldTable::default()).await {
            self.handle.health.queue_depth.store(u64::from(q.message_count()), Ordering::Relaxed);
        }
    }
}
