//! The outbox relay: publishes [`outbox`](crate::outbox) rows with publisher
//! confirms, hundreds in flight at once, and deletes them in the same
//! transaction that locked them, after the broker confirmed them. A crash
//! between publish and commit publishes those rows again; every consumer is
//! idempotent (the worker's claim, the audit sink's `event_id`).
//!
//! The relay owns its broker connection, under [`link::supervise`]: on any
//! broker error the connection is rebuilt. Several api processes may each run
//! one: rows are locked with `SKIP LOCKED`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use secrecy::SecretString;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::amqp::{self, AmqpError, Lane, Outgoing, Publisher, Topology};
use crate::link::{self, LinkState, SessionEnd};
use crate::outbox::Topic;

/// Rows published per round trip.
const BATCH: i64 = 500;
/// How often an idle relay looks for rows another process left behind.
const IDLE_POLL: Duration = Duration::from_millis(250);
/// After a wake-up, how long the relay lets other commits join the round:
/// fewer, larger publish rounds (and outbox transactions) under load, for
/// this much more time before a job reaches its queue.
const COALESCE: Duration = Duration::from_millis(20);
/// How often the backlog and the queue depth are measured.
const MEASURE_EVERY: Duration = Duration::from_secs(1);

/// What the relay knows, shared with request handlers (readiness,
/// backpressure) without locks.
#[derive(Debug, Default)]
struct Health {
    stopped: AtomicBool,
    backlog: AtomicU64,
    queue_depth: AtomicU64,
}

/// A cheap handle to a running relay.
#[derive(Debug, Clone, Default)]
pub struct RelayHandle {
    wake: Arc<Notify>,
    health: Arc<Health>,
    link: LinkState,
}

impl RelayHandle {
    /// Asks the relay to look at the outbox now (after a commit).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Connected to the broker with a confirm channel.
    pub fn connected(&self) -> bool {
        self.link.connected()
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
        // The outbox grows precisely while the broker is away: measure it
        // whether or not a session runs.
        let monitor = self.monitor_backlog(&shutdown);
        let publish = self.publish_loop(&shutdown);
        tokio::join!(monitor, publish);
        self.handle.health.stopped.store(true, Ordering::Relaxed);
    }

    async fn monitor_backlog(&self, shutdown: &CancellationToken) {
        loop {
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
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(MEASURE_EVERY) => {}
            }
        }
    }

    async fn publish_loop(&self, shutdown: &CancellationToken) {
        let shutdown = shutdown.clone();
        let link = self.handle.link.clone();
        let supervised = link::supervise(&self.amqp_url, "relay", &self.topology, &link, &shutdown, |connection| {
            let shutdown = shutdown.clone();
            let relay = &self;
            async move {
                let publisher = match link::within(Publisher::new(&connection)).await {
                    Ok(p) => p,
                    Err(end) => return end,
                };
                let pumped = relay.pump(&publisher, &shutdown).await;
                let _ = tokio::time::timeout(Duration::from_secs(2), connection.close(200, "bye".into())).await;
                match pumped {
                    Ok(()) => SessionEnd::Shutdown,
                    Err(e) => SessionEnd::from(e),
                }
            }
        })
        .await;
        if let Err(e) = supervised {
            tracing::error!(error = format!("{e:#}"), "outbox relay stopped");
        }
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
                // Its passive declare doubles as the probe of an idle connection.
                self.measure(publisher).await?;
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
                () = self.handle.wake.notified() => tokio::time::sleep(COALESCE).await,
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
        let queues: Vec<_> = rows.iter().map(|r| Topic::parse(&r.topic).map(|t| t.queue(&self.topology))).collect();
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
            outgoing.push(Outgoing::new(&queue.exchange, queue.key, &row.message_id, &row.body));
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

    /// Depth of both document lanes, for backpressure and the dashboards.
    /// Broker round trips: their failure means the connection is gone.
    async fn measure(&self, publisher: &Publisher) -> Result<(), AmqpError> {
        let mut depth = 0;
        for lane in Lane::ALL {
            let queue = self.topology.lane(lane).queue;
            let options = QueueDeclareOptions { passive: true, ..Default::default() };
            let declare = publisher.channel().queue_declare(queue.as_str().into(), options, FieldTable::default());
            let q = tokio::time::timeout(Duration::from_secs(5), declare).await.map_err(|_| AmqpError::Timeout)??;
            depth += u64::from(q.message_count());
        }
        self.handle.health.queue_depth.store(depth, Ordering::Relaxed);
        Ok(())
    }
}
