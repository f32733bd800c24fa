//! One supervised broker connection per service: a *session* runs on a fresh
//! connection (topology checked) until it ends; after a broker error the
//! connection is dropped and a new session starts, with backoff capped at
//! 2 s, so a broker restart never needs a process restart.
//!
//! This replaces lapin's built-in recovery, which was seen here to stay in
//! `Reconnecting` for good, or to spin at 100 % CPU, after broker restarts
//! under load (upstream: amqp-rs/lapin issue 450; docs/reliability.md,
//! "Broker connections"). Rebuilding everything is simple and always the
//! same path: connect, check the topology, open channels, consume again.
//!
//! The services do not declare the topology: their broker users may not
//! (`scripts/broker-users`); `clinflow-api broker setup` has declared it.
//! A missing exchange or queue is named in the reconnection warning, and
//! readiness fails until it exists.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use secrecy::SecretString;
use tokio_util::sync::CancellationToken;

use crate::amqp::{self, Topology};

const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// How a session on one connection ended.
#[derive(Debug)]
pub enum SessionEnd {
    /// Shutdown was asked for and the session has wound down.
    Shutdown,
    /// The broker went away or refused something: start a new session.
    Broker(anyhow::Error),
    /// Nothing a reconnection can cure (e.g. a worker with the wrong key):
    /// the process must stop, non-zero.
    Fatal(anyhow::Error),
}

impl From<lapin::Error> for SessionEnd {
    fn from(e: lapin::Error) -> Self {
        Self::Broker(e.into())
    }
}

impl From<amqp::AmqpError> for SessionEnd {
    fn from(e: amqp::AmqpError) -> Self {
        Self::Broker(e.into())
    }
}

/// Whether the service holds a live broker connection, for readiness.
#[derive(Debug, Clone, Default)]
pub struct LinkState(Arc<AtomicBool>);

impl LinkState {
    pub fn connected(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    fn set(&self, service: &'static str, up: bool) {
        self.0.store(up, Ordering::Relaxed);
        metrics::gauge!("clinflow_amqp_connected", "service" => service).set(if up { 1.0 } else { 0.0 });
    }
}

/// Runs `session` on fresh connections until it ends with `Shutdown` (then
/// `Ok`) or `Fatal` (then `Err`), or `shutdown` fires while reconnecting.
pub async fn supervise<F, Fut>(
    url: &SecretString,
    service: &'static str,
    topology: &Topology,
    state: &LinkState,
    shutdown: &CancellationToken,
    mut session: F,
) -> anyhow::Result<()>
where
    F: FnMut(Connection) -> Fut,
    Fut: Future<Output = SessionEnd>,
{
    let mut backoff = FIRST_BACKOFF;
    while !shutdown.is_cancelled() {
        match connect(url, service, topology).await {
            Ok(connection) => {
                state.set(service, true);
                tracing::info!(service, "connected to RabbitMQ");
                backoff = FIRST_BACKOFF;
                let ended = session(connection).await;
                state.set(service, false);
                match ended {
                    SessionEnd::Shutdown => return Ok(()),
                    SessionEnd::Fatal(e) => return Err(e),
                    SessionEnd::Broker(e) => {
                        tracing::warn!(service, error = format!("{e:#}"), "lost RabbitMQ; reconnecting")
                    }
                }
            }
            Err(e) => tracing::warn!(
                service,
                error = format!("{e:#}"),
                retry_in_ms = backoff.as_millis() as u64,
                "cannot reach RabbitMQ"
            ),
        }
        metrics::counter!("clinflow_amqp_reconnects_total", "service" => service).increment(1);
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
    Ok(())
}

/// Connects and checks the topology, within 15 s.
async fn connect(url: &SecretString, service: &str, topology: &Topology) -> anyhow::Result<Connection> {
    let connect = async {
        let connection = amqp::connect(url, service).await?;
        topology.check(&connection).await?;
        Ok::<_, amqp::AmqpError>(connection)
    };
    Ok(tokio::time::timeout(Duration::from_secs(15), connect)
        .await
        .map_err(|_| anyhow::anyhow!("no answer within 15 s"))??)
}

/// How often an idle consumer checks that its connection still works.
const PROBE_EVERY: Duration = Duration::from_secs(1);
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Resolves, with the reason, once a cheap round trip on `channel` (a
/// passive declare of `queue`) fails or times out; probes every second.
/// Consumers wait on it beside their deliveries: lapin was seen here to log
/// a connection reset and yet never wake an idle consumer of that
/// connection, which then waited for good.
pub async fn lost(channel: &Channel, queue: &str) -> anyhow::Error {
    let options = QueueDeclareOptions { passive: true, ..Default::default() };
    loop {
        tokio::time::sleep(PROBE_EVERY).await;
        let probe = channel.queue_declare(queue.into(), options, FieldTable::default());
        match tokio::time::timeout(PROBE_TIMEOUT, probe).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return anyhow::Error::new(e).context("broker probe failed"),
            Err(_) => return anyhow::anyhow!("broker probe got no answer within {} s", PROBE_TIMEOUT.as_secs()),
        }
    }
}

/// Longest wait for a broker operation of a session (opening a channel,
/// consuming, settling a delivery).
const OP_TIMEOUT: Duration = Duration::from_secs(5);

/// A broker operation of a session, within a deadline: lapin was seen to
/// leave an ack sent just as its connection died pending for good. An error
/// or a timeout ends the session; the broker redelivers what was not settled.
pub async fn within<T, E>(op: impl Future<Output = Result<T, E>>) -> Result<T, SessionEnd>
where
    E: std::error::Error + Send + Sync + 'static,
{
    match tokio::time::timeout(OP_TIMEOUT, op).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(SessionEnd::Broker(anyhow::Error::new(e))),
        Err(_) => Err(SessionEnd::Broker(anyhow::anyhow!("RabbitMQ gave no answer within {} s", OP_TIMEOUT.as_secs()))),
    }
}

/// Acks, nacks or rejects a delivery [`within`] the deadline.
pub async fn settle(op: impl Future<Output = Result<bool, lapin::Error>>) -> Result<(), SessionEnd> {
    within(op).await.map(|_| ())
}
