//! What every handler shares: the state of the process, and the audit
//! trail's entry points (an event committed before a PHI read is answered,
//! or in the transaction of the change it records).

use std::sync::Arc;
use std::time::Duration;

use clinflow::audit::AuditEvent;
use clinflow::audit::Signer;
use clinflow::chain::Trust;
use clinflow::crypto::IndexKey;
use clinflow::keys::Keys;
use clinflow::outbox;
use clinflow::relay::RelayHandle;
use sqlx::PgPool;

use crate::auth::JwtKeys;
use crate::denials::{DenialLimiter, Verdict};
use crate::error::ApiError;
use crate::lockout::LoginGuard;
use crate::users::Passwords;

#[derive(Clone)]
pub struct AppState {
    pub db: PgPool,
    /// The key-encryption keys and the cache of patients' data keys.
    pub keys: Arc<Keys>,
    /// Keyed hashes of source refs and idempotency keys.
    pub index_key: Arc<IndexKey>,
    /// The outbox relay of this process: woken after each commit, and the
    /// source of readiness and backpressure.
    pub relay: RelayHandle,
    pub jwt: Arc<JwtKeys>,
    pub passwords: Passwords,
    pub idle_timeout: Duration,
    pub limits: UploadLimits,
    pub batch_limits: BatchLimits,
    /// For the ops endpoints, which open their own broker connection.
    pub amqp_url: secrecy::SecretString,
    pub topology: clinflow::amqp::Topology,
    /// The auditor endpoints' own connection, as the read-only
    /// `clinflow_audit_reader` role (`AUDIT_READER_DATABASE_URL`): the
    /// api's own role cannot touch `audit_events`.
    pub audit_db: Option<PgPool>,
    /// Signs every audit event this api writes (`AUDIT_SIGNING_KEY`, key
    /// id `api` by default).
    pub audit_signer: Arc<Signer>,
    /// For `POST /v1/audit/verify`: the producers' and the sink's public
    /// keys (`AUDIT_PUBLIC_KEYS`, optional for the api). The api holds no
    /// key that can write the chain or a checkpoint.
    pub audit_trust: Option<Arc<Trust>>,
    /// The sink's checkpoint file, if this api can read it.
    pub audit_checkpoints: Option<std::path::PathBuf>,
    /// How many refusals per source address are audited one by one.
    pub denials: Arc<DenialLimiter>,
    /// Lockout policy and per-address login rate.
    pub login: Arc<LoginGuard>,
    /// How long a break-glass grant lasts (`BREAK_GLASS_MINUTES`).
    pub break_glass_for: Duration,
    /// Grants one clinician may take in 24 hours
    /// (`BREAK_GLASS_GRANTS_PER_DAY`); past it, 429 `break_glass_limit`.
    pub break_glass_per_day: u32,
    /// Where erasures are journalled, outside the database
    /// (`ERASURE_JOURNAL_DIR`); without it erasure answers 503.
    pub erasure_journal: Option<Arc<clinflow::erasure::Journal>>,
    /// Request timeouts, `/docs`, `/ui`, trusted proxies, connections.
    pub edge: Edge,
}

/// The HTTP edge (README, Configuration; docs/operations.md).
#[derive(Debug, Clone)]
pub struct Edge {
    /// Longest a request may take, body included (`API_REQUEST_TIMEOUT_SECONDS`).
    pub request_timeout: Duration,
    /// The same for a batch upload, whose body may be `BATCH_MAX_BYTES`
    /// (`API_BATCH_TIMEOUT_SECONDS`).
    pub batch_timeout: Duration,
    /// Whether `/docs` and its script are served (`API_DOCS`).
    pub docs: bool,
    /// Whether the web console (`/ui`) is served (`API_CONSOLE`).
    pub console: bool,
    /// Whose `X-Forwarded-For` is believed (`TRUSTED_PROXIES`).
    pub trusted_proxies: crate::proxies::TrustedProxies,
    /// Connections served at once; one past it is closed unread
    /// (`API_MAX_CONNECTIONS`).
    pub max_connections: usize,
    /// Longest a new connection's first request may take to arrive, its
    /// TLS handshake and headers (`API_HEADER_TIMEOUT_SECONDS`).
    pub header_timeout: Duration,
    /// A kept-alive connection's next request headers must have come
    /// within this of the answer before, and a connection that moves no
    /// byte for this long is closed (`API_IDLE_TIMEOUT_SECONDS`).
    pub idle_timeout: Duration,
    /// A request body that sends nothing for this long is answered 408
    /// `body_timeout` (`API_BODY_STALL_SECONDS`).
    pub body_stall: Duration,
}

impl Default for Edge {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(30),
            // 64 MiB in five minutes: about 1.8 Mbit/s, a slow WAN link.
            batch_timeout: Duration::from_secs(300),
            docs: true,
            console: true,
            trusted_proxies: crate::proxies::TrustedProxies::default(),
            // Below a default open-file limit of 1,024, with room for the
            // database pools and the broker.
            max_connections: 900,
            header_timeout: Duration::from_secs(10),
            // Above the request timeout (a handler may work that long
            // without a byte moving) and load balancers' 60 s (one must
            // not reuse a connection the api is closing).
            idle_timeout: Duration::from_secs(75),
            body_stall: Duration::from_secs(20),
        }
    }
}

/// Backpressure: uploads answer 429 while the outbox or the live queue holds
/// more than this (as last measured by the relay).
#[derive(Debug, Clone, Copy)]
pub struct UploadLimits {
    pub max_outbox: u64,
    pub max_queued: u64,
}

impl Default for UploadLimits {
    fn default() -> Self {
        Self { max_outbox: 100_000, max_queued: 2_000_000 }
    }
}

impl AppState {
    /// Writes an audit event to the outbox (committed in PostgreSQL before
    /// this returns); a failure fails the request with 503 before anything is
    /// shown. Where the audited action itself writes, use
    /// `outbox::enqueue` in its transaction instead.
    pub async fn audit(&self, event: &AuditEvent) -> Result<(), ApiError> {
        let message = outbox::Message::audit(&self.audit_signer, event).map_err(anyhow::Error::new)?;
        let mut conn = self.db.acquire().await.map_err(|e| audit_unavailable(event, &e))?;
        outbox::enqueue(&mut conn, &[message]).await.map_err(|e| audit_unavailable(event, &e))?;
        self.relay.wake();
        Ok(())
    }

    /// Audits a refusal (401 or 403), rate-limited per source address; best
    /// effort: the refusal is answered whatever happens to its event.
    pub async fn audit_denial(&self, event: AuditEvent) {
        let Verdict::Audit { suppressed } = self.denials.verdict(event.source_ip) else { return };
        let mut messages = Vec::with_capacity(2);
        if suppressed > 0 {
            let summary = AuditEvent::new(
                clinflow::audit::Action::DenialsSuppressed,
                event.actor.clone(),
                clinflow::audit::Outcome::Denied,
            )
            .from_request(event.source_ip, None)
            .resource("count", &suppressed.to_string());
            messages.extend(outbox::Message::audit(&self.audit_signer, &summary));
        }
        messages.extend(outbox::Message::audit(&self.audit_signer, &event));
        let stored = async {
            let mut conn = self.db.acquire().await?;
            outbox::enqueue(&mut conn, &messages).await
        };
        match stored.await {
            Ok(()) => self.relay.wake(),
            Err(e) => tracing::warn!(error = %e, action = event.action.as_str(), "refusal not audited"),
        }
    }

    /// Writes audit events to the outbox in the caller's transaction, so
    /// they commit with the change they record (wake the relay after the
    /// commit).
    pub(crate) async fn audit_in(&self, conn: &mut sqlx::PgConnection, events: &[AuditEvent]) -> Result<(), ApiError> {
        let messages = events
            .iter()
            .map(|e| outbox::Message::audit(&self.audit_signer, e))
            .collect::<Result<Vec<_>, _>>()
            .map_err(anyhow::Error::new)?;
        outbox::enqueue(conn, &messages).await?;
        Ok(())
    }

    /// 429 while the pipeline is this far behind.
    pub fn check_backpressure(&self) -> Result<(), ApiError> {
        if self.check_backpressure_quietly() {
            metrics::counter!("clinflow_uploads_throttled_total").increment(1);
            return Err(ApiError::Busy);
        }
        Ok(())
    }

    /// Whether uploads are being answered 429 now.
    pub(crate) fn check_backpressure_quietly(&self) -> bool {
        self.relay.backlog() > self.limits.max_outbox || self.relay.queue_depth() > self.limits.max_queued
    }
}

fn audit_unavailable(event: &AuditEvent, e: &sqlx::Error) -> ApiError {
    tracing::error!(error = %e, action = event.action.as_str(), "audit event not stored");
    ApiError::Unavailable("the audit trail")
}

/// Limits of one batch request (`BATCH_MAX_LINES`, `BATCH_MAX_BYTES`).
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    pub max_lines: usize,
    pub max_bytes: usize,
    /// Longest line kept: by default the largest single upload (text plus
    /// JSON overhead).
    pub max_line_bytes: usize,
}

impl Default for BatchLimits {
    fn default() -> Self {
        Self { max_lines: 10_000, max_bytes: 64 * 1024 * 1024, max_line_bytes: 2 * crate::validate::MAX_TEXT_BYTES }
    }
}
