//! The RabbitMQ topology, declared in one place, and a confirming publisher.
//!
//! ```text
//! {p}.jobs  (direct) --documents.live------> {p}.documents.live      (quorum)
//!                    --documents.backfill--> {p}.documents.backfill  (quorum)
//! {p}.audit (direct) --audit---------------> {p}.audit               (quorum)
//! {p}.retry (direct) --documents.live------> {p}.documents.live.retry      ─┐ per-message TTL, then
//!                    --documents.backfill--> {p}.documents.backfill.retry  ─┘ dead-lettered to {p}.jobs
//! {p}.dead  (direct) --documents.live------> {p}.documents.live.dead
//!                    --documents.backfill--> {p}.documents.backfill.dead
//!                    --audit---------------> {p}.audit.dead
//! ```
//!
//! Every work queue is a durable quorum queue with a delivery limit, and
//! dead-letters (at-least-once) into its own `.dead` queue: a message that is
//! rejected as malformed, or that keeps failing, is parked for inspection
//! instead of being dropped or blocking the queue. Document jobs travel on
//! two lanes: `live` (single uploads, served first) and `backfill` (batch
//! uploads). A job whose document could not be processed for a transient
//! reason waits in its lane's `.retry` queue (no consumer) for its
//! per-message TTL, then the broker dead-letters it back onto its lane. The
//! prefix lets tests run beside a live stack on the same broker without
//! touching its queues.
//!
//! The topology is declared once, by `clinflow-api broker setup` as the
//! broker's administrator ([`command`]); each service logs in as its own
//! user, which may not declare anything (no configure permission,
//! `scripts/broker-users`), and only [`check`](Topology::check)s it.

pub mod command;

use std::time::{Duration, SystemTime};

use lapin::Confirmation;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;

// The headers a publish sets, read back through these (see `headers`).
use crate::headers::unix_micros;
pub use crate::headers::{ATTEMPTS_HEADER, PUBLISHED_AT_HEADER, REASON_HEADER, header_int, header_str, queue_wait};

/// How many times a quorum queue redelivers a message before dead-lettering it.
pub const DELIVERY_LIMIT: i64 = 5;

pub const DOCUMENTS_LIVE: &str = "documents.live";
pub const DOCUMENTS_BACKFILL: &str = "documents.backfill";
pub const AUDIT: &str = "audit";

/// The lane of a document job: single uploads are `Live` and served first;
/// batch uploads are `Backfill`, given what the live lane leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lane {
    Live,
    Backfill,
}

impl Lane {
    pub const ALL: [Lane; 2] = [Lane::Live, Lane::Backfill];

    /// The routing key, and the `documents.lane` column's value without
    /// the `documents.` prefix.
    pub fn key(self) -> &'static str {
        match self {
            Lane::Live => DOCUMENTS_LIVE,
            Lane::Backfill => DOCUMENTS_BACKFILL,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Lane::Live => "live",
            Lane::Backfill => "backfill",
        }
    }

    pub fn from_key(key: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|l| l.key() == key)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AmqpError {
    #[error("RabbitMQ: {0}")]
    Broker(#[from] lapin::Error),
    #[error("RabbitMQ refused the message (nack)")]
    Nacked,
    #[error("RabbitMQ could not route the message to any queue")]
    Unroutable,
    #[error("message could not be encoded: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("RabbitMQ did not confirm a publish within {} s", CONFIRM_TIMEOUT.as_secs())]
    Timeout,
    #[error("RabbitMQ connection closed")]
    Closed,
    #[error("RabbitMQ (AMQP_URL): TLS settings: {0}")]
    Tls(String),
    /// Not a `#[source]`: the broker's reason is in the one line already,
    /// and lapin's error would repeat it in a chain.
    #[error("RabbitMQ: {what} is missing or out of reach (`clinflow-api broker setup` declares it): {cause}")]
    Missing { what: String, cause: lapin::Error },
}

/// A message body that is not what its queue carries: the kind of fault
/// and where it is, never what the body held (a poison message may hold
/// anything, PHI included; serde's own messages quote the values they
/// could not read).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Undecodable {
    pub fault: &'static str,
    /// Line and column (1-based) where reading stopped, when known.
    pub at: Option<(usize, usize)>,
}

impl std::fmt::Display for Undecodable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.at {
            Some((line, column)) => write!(f, "{} at line {line} column {column}", self.fault),
            None => f.write_str(self.fault),
        }
    }
}

impl std::error::Error for Undecodable {}

impl From<serde_json::Error> for Undecodable {
    fn from(e: serde_json::Error) -> Self {
        use serde_json::error::Category;
        let fault = match e.classify() {
            Category::Syntax => "not JSON",
            Category::Eof => "JSON cut short",
            Category::Data => "JSON of another shape",
            Category::Io => "unreadable",
        };
        Self { fault, at: (e.line() > 0).then(|| (e.line(), e.column())) }
    }
}

/// Names of exchanges and queues under one prefix (`clinflow` in production).
#[derive(Debug, Clone)]
pub struct Topology {
    prefix: String,
}

/// A queue's depth, as [`Topology::depths`] measures it.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct QueueDepth {
    /// Without the prefix: `documents.live`, `documents.live.retry`, `audit.dead`, …
    pub name: String,
    /// Ready messages (not those delivered and unacknowledged).
    pub messages: u32,
    pub consumers: u32,
}

/// One work queue: bound to `exchange` with routing key `key`.
#[derive(Debug, Clone)]
pub struct WorkQueue {
    pub exchange: String,
    pub key: &'static str,
    pub queue: String,
    pub dead_queue: String,
    /// Document lanes only: where a job waits before its next attempt
    /// (bound to the retry exchange with `key`).
    pub retry_queue: Option<String>,
}

impl Topology {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self { prefix: prefix.into() }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn jobs_exchange(&self) -> String {
        format!("{}.jobs", self.prefix)
    }

    pub fn audit_exchange(&self) -> String {
        format!("{}.audit", self.prefix)
    }

    pub fn dead_letter_exchange(&self) -> String {
        format!("{}.dead", self.prefix)
    }

    pub fn retry_exchange(&self) -> String {
        format!("{}.retry", self.prefix)
    }

    pub fn lane(&self, lane: Lane) -> WorkQueue {
        let mut wq = self.work_queue(self.jobs_exchange(), lane.key());
        wq.retry_queue = Some(format!("{}.retry", wq.queue));
        wq
    }

    pub fn documents_live(&self) -> WorkQueue {
        self.lane(Lane::Live)
    }

    pub fn documents_backfill(&self) -> WorkQueue {
        self.lane(Lane::Backfill)
    }

    pub fn audit(&self) -> WorkQueue {
        self.work_queue(self.audit_exchange(), AUDIT)
    }

    pub fn work_queues(&self) -> Vec<WorkQueue> {
        vec![self.documents_live(), self.documents_backfill(), self.audit()]
    }

    fn work_queue(&self, exchange: String, key: &'static str) -> WorkQueue {
        let queue = format!("{}.{key}", self.prefix);
        WorkQueue { exchange, key, dead_queue: format!("{queue}.dead"), queue, retry_queue: None }
    }

    /// Checks, with passive declares (which need no permission), that every
    /// exchange and queue exists: what a service does on each connection,
    /// logged in as a user that may not declare. The first missing one is
    /// named. Bindings cannot be checked so; a missing one makes a publish
    /// [`Unroutable`](AmqpError::Unroutable) (every publish is mandatory).
    pub async fn check(&self, connection: &Connection) -> Result<(), AmqpError> {
        // A failed passive declare closes its channel: one channel for the
        // lot, as the first failure ends the check.
        let channel = connection.create_channel().await?;
        let missing = |what: String| move |cause| AmqpError::Missing { what, cause };
        let exchange = ExchangeDeclareOptions { passive: true, ..Default::default() };
        for name in self.exchanges() {
            channel
                .exchange_declare(name.as_str().into(), ExchangeKind::Direct, exchange, FieldTable::default())
                .await
                .map_err(missing(format!("exchange {name}")))?;
        }
        let queue = QueueDeclareOptions { passive: true, ..Default::default() };
        for name in self.queues() {
            channel
                .queue_declare(name.as_str().into(), queue, FieldTable::default())
                .await
                .map_err(missing(format!("queue {name}")))?;
        }
        // Best effort: the connection is what matters.
        let _ = channel.close(200, "checked".into()).await;
        Ok(())
    }

    /// Each queue's ready messages and consumers, by passive declares (the
    /// operators' overview). The names lose the prefix: `documents.live`,
    /// `documents.live.dead`, …
    pub async fn depths(&self, connection: &Connection) -> Result<Vec<QueueDepth>, AmqpError> {
        let channel = connection.create_channel().await?;
        let passive = QueueDeclareOptions { passive: true, ..Default::default() };
        let mut depths = Vec::new();
        for name in self.queues() {
            let declare = channel.queue_declare(name.as_str().into(), passive, FieldTable::default());
            let q = tokio::time::timeout(Duration::from_secs(5), declare).await.map_err(|_| AmqpError::Timeout)??;
            let short = name.strip_prefix(&self.prefix).and_then(|n| n.strip_prefix('.')).unwrap_or(&name);
            depths.push(QueueDepth {
                name: short.to_owned(),
                messages: q.message_count(),
                consumers: q.consumer_count(),
            });
        }
        let _ = channel.close(200, "measured".into()).await;
        Ok(depths)
    }

    /// Every exchange of the topology.
    pub fn exchanges(&self) -> [String; 4] {
        [self.jobs_exchange(), self.audit_exchange(), self.dead_letter_exchange(), self.retry_exchange()]
    }

    /// Every queue of the topology: work queues, their `.dead` and `.retry` queues.
    pub fn queues(&self) -> Vec<String> {
        self.work_queues()
            .into_iter()
            .flat_map(|wq| [Some(wq.queue), Some(wq.dead_queue), wq.retry_queue])
            .flatten()
            .collect()
    }

    /// Declares everything; idempotent. Needs configure permission on every
    /// name, so only the set-up step ([`command`]) and the tests' fixtures
    /// call it, as an administrator.
    pub async fn declare(&self, channel: &Channel) -> Result<(), AmqpError> {
        let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
        for exchange in self.exchanges() {
            channel
                .exchange_declare(exchange.as_str().into(), ExchangeKind::Direct, durable, FieldTable::default())
                .await?;
        }
        for wq in self.work_queues() {
            self.declare_quorum(channel, &wq.dead_queue, quorum_args()).await?;
            self.bind(channel, &wq.dead_queue, &self.dead_letter_exchange(), wq.key).await?;

            let mut args = quorum_args();
            args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(DELIVERY_LIMIT));
            args.insert("x-dead-letter-exchange".into(), long_string(&self.dead_letter_exchange()));
            args.insert("x-dead-letter-strategy".into(), long_string("at-least-once"));
            // at-least-once dead-lettering requires reject-publish overflow.
            args.insert("x-overflow".into(), long_string("reject-publish"));
            self.declare_quorum(channel, &wq.queue, args).await?;
            self.bind(channel, &wq.queue, &wq.exchange, wq.key).await?;

            if let Some(retry) = &wq.retry_queue {
                // No consumer: messages wait out their per-message TTL, then
                // go back to their lane (the routing key is kept).
                let mut args = quorum_args();
                args.insert("x-dead-letter-exchange".into(), long_string(&wq.exchange));
                args.insert("x-dead-letter-strategy".into(), long_string("at-least-once"));
                args.insert("x-overflow".into(), long_string("reject-publish"));
                self.declare_quorum(channel, retry, args).await?;
                self.bind(channel, retry, &self.retry_exchange(), wq.key).await?;
            }
        }
        Ok(())
    }

    async fn declare_quorum(&self, channel: &Channel, name: &str, args: FieldTable) -> Result<(), AmqpError> {
        let options = QueueDeclareOptions { durable: true, ..Default::default() };
        channel.queue_declare(name.into(), options, args).await?;
        Ok(())
    }

    async fn bind(&self, channel: &Channel, queue: &str, exchange: &str, key: &str) -> Result<(), AmqpError> {
        channel
            .queue_bind(queue.into(), exchange.into(), key.into(), QueueBindOptions::default(), FieldTable::default())
            .await?;
        Ok(())
    }
}

fn quorum_args() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), long_string("quorum"));
    args
}

fn long_string(s: &str) -> AMQPValue {
    AMQPValue::LongString(s.into())
}

/// Connects, without lapin's built-in recovery: services run their
/// connections under [`link::supervise`](crate::link::supervise), which
/// rebuilds the whole connection after any error.
///
/// An `amqps://` URL is verified against its `cacertfile` only (and may log
/// in with a client certificate, `certfile` and `keyfile`); an error of the
/// handshake says so, naming RabbitMQ.
pub async fn connect(url: &SecretString, name: &str) -> Result<Connection, AmqpError> {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    let tls = tls_config(url.expose_secret()).map_err(AmqpError::Tls)?;
    let runtime = lapin::runtime::default_runtime()?;
    Ok(Connection::connect_with_config(url.expose_secret(), properties, tls, runtime).await?)
}

/// The TLS settings an `amqps://` URL names (RabbitMQ's URI query
/// parameters `cacertfile`, `certfile`, `keyfile`); none for `amqp://`.
fn tls_config(url: &str) -> Result<OwnedTLSConfig, String> {
    if !url.starts_with("amqps://") {
        return Ok(OwnedTLSConfig::default());
    }
    let read = |key: &str| -> Result<Option<String>, String> {
        crate::tls::query_param(url, key)
            .map(|path| std::fs::read_to_string(&path).map_err(|e| format!("{key} {path:?}: {e}")))
            .transpose()
    };
    let cert_chain = read("cacertfile")?.ok_or("amqps:// needs ?cacertfile=PATH")?;
    let identity = match (read("certfile")?, read("keyfile")?) {
        (Some(pem), Some(key)) => Some(OwnedIdentity::PKCS8 { pem: pem.into_bytes(), key: key.into_bytes() }),
        (None, None) => None,
        _ => return Err("certfile and keyfile go together".into()),
    };
    Ok(OwnedTLSConfig { identity, cert_chain: Some(cert_chain) })
}

/// A channel in confirm mode: `publish` returns only once the broker has
/// taken responsibility for the message (written to a quorum of nodes).
#[derive(Clone)]
pub struct Publisher {
    channel: Channel,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher").field("channel", &self.channel.id()).finish()
    }
}

impl Publisher {
    pub async fn new(connection: &Connection) -> Result<Self, AmqpError> {
        let channel = connection.create_channel().await?;
        channel.confirm_select(ConfirmSelectOptions::default()).await?;
        Ok(Self { channel })
    }

    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Publishes `message` as persistent JSON; `mandatory` so that a missing
    /// binding is an error rather than a silent drop.
    pub async fn publish_json<T: Serialize>(
        &self,
        exchange: &str,
        routing_key: &str,
        message_id: &str,
        message: &T,
    ) -> Result<(), AmqpError> {
        self.publish_json_many(exchange, routing_key, &[(message_id, message)]).await
    }

    /// [`publish_many`](Self::publish_many) for values serialised here.
    pub async fn publish_json_many<T: Serialize>(
        &self,
        exchange: &str,
        routing_key: &str,
        messages: &[(&str, &T)],
    ) -> Result<(), AmqpError> {
        let bodies = messages.iter().map(|(_, m)| serde_json::to_vec(m)).collect::<Result<Vec<_>, _>>()?;
        let outgoing: Vec<Outgoing<'_>> = messages
            .iter()
            .zip(&bodies)
            .map(|((message_id, _), body)| Outgoing::new(exchange, routing_key, message_id, body))
            .collect();
        self.publish_many(&outgoing).await
    }

    /// Publishes every message (persistent JSON, `mandatory`, with the
    /// publish-time header), then awaits all their confirmations: one round
    /// trip for the lot instead of one per message. An error means some may
    /// not have been taken: publish them again (consumers are idempotent).
    pub async fn publish_many(&self, messages: &[Outgoing<'_>]) -> Result<(), AmqpError> {
        let mut confirms = Vec::with_capacity(messages.len());
        for m in messages {
            let mut headers = FieldTable::default();
            headers.insert(PUBLISHED_AT_HEADER.into(), AMQPValue::LongLongInt(unix_micros(SystemTime::now())));
            if let Some(reason) = m.reason {
                headers.insert(REASON_HEADER.into(), long_string(reason));
            }
            if m.attempts > 0 {
                headers.insert(ATTEMPTS_HEADER.into(), AMQPValue::LongLongInt(i64::from(m.attempts)));
            }
            let mut properties = BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type(ShortString::from("application/json"))
                .with_message_id(m.message_id.into())
                .with_headers(headers);
            if let Some(ttl) = m.expiration {
                properties = properties.with_expiration(ttl.as_millis().to_string().as_str().into());
            }
            let options = BasicPublishOptions { mandatory: true, ..Default::default() };
            confirms.push(
                self.channel
                    .basic_publish(m.exchange.into(), m.routing_key.into(), options, m.body, properties)
                    .await?,
            );
        }
        let mut outcome = Ok(());
        for confirm in confirms {
            let result = match tokio::time::timeout(CONFIRM_TIMEOUT, confirm).await {
                Err(_) => Err(AmqpError::Timeout),
                Ok(confirmation) => match confirmation? {
                    Confirmation::Ack(None) => Ok(()),
                    Confirmation::Ack(Some(_)) => Err(AmqpError::Unroutable),
                    Confirmation::Nack(_) | Confirmation::NotRequested => Err(AmqpError::Nacked),
                },
            };
            // Await every confirmation even after a failure, so none is left
            // pending on the channel.
            outcome = outcome.and(result);
        }
        outcome
    }
}

/// One message for [`Publisher::publish_many`].
#[derive(Debug, Clone, Copy)]
pub struct Outgoing<'a> {
    pub exchange: &'a str,
    pub routing_key: &'a str,
    pub message_id: &'a str,
    pub body: &'a [u8],
    /// Why a message is parked in a dead-letter queue ([`REASON_HEADER`]).
    pub reason: Option<&'a str>,
    /// Attempts already made at the job ([`ATTEMPTS_HEADER`]; 0: none sent).
    pub attempts: u32,
    /// Per-message TTL (for the retry queues).
    pub expiration: Option<Duration>,
}

impl<'a> Outgoing<'a> {
    pub fn new(exchange: &'a str, routing_key: &'a str, message_id: &'a str, body: &'a [u8]) -> Self {
        Self { exchange, routing_key, message_id, body, reason: None, attempts: 0, expiration: None }
    }
}

/// How long a publish waits for the broker's confirmation before the
/// connection is taken for dead. Confirms of a healthy broker take
/// milliseconds; lapin was seen to leave them pending for good when the
/// connection died under it.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);
