//! The audit table and its hash chain.
//!
//! Row `n` stores `row_hash = HMAC-SHA256(key, n || row_hash(n-1) || event)`
//! where `event` is [`AuditEvent::canonical_bytes`]; row 1 chains from 32
//! zero bytes. `seq` is gap-free: batches are appended under one advisory
//! lock, so deleting, inserting or editing a row anywhere breaks every later
//! hash, and only the key holder can forge a new chain.

use std::collections::HashSet;

use crate::audit::{Action, Actor, ActorKind, AuditEvent, Outcome, Resource};
use futures_util::TryStreamExt;
use hmac::{Hmac, KeyInit, Mac};
use secrecy::{ExposeSecret, SecretBox};
use sha2::Sha256;
use sqlx::PgPool;
use sqlx::types::ipnet::IpNet;
use uuid::Uuid;

/// Any constant works; it only has to be the same for every sink.
const CHAIN_LOCK: i64 = 0x636c_696e_6175_6469; // "clinaudi"
const GENESIS: [u8; 32] = [0; 32];

#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("event {0} cannot be encoded: {1}")]
    Encode(Uuid, serde_json::Error),
    #[error("audit chain broken at seq {seq}: {problem}")]
    Broken { seq: i64, problem: &'static str },
    #[error("audit checkpoints: {0}")]
    Checkpoint(String),
}

/// Now, to the microsecond (what the checkpoint file and the table keep).
pub fn now() -> time::OffsetDateTime {
    crate::audit::now_micros()
}

pub struct ChainKey(SecretBox<Vec<u8>>);

impl ChainKey {
    pub fn new(key: SecretBox<Vec<u8>>) -> Self {
        Self(key)
    }

    /// The MAC of a checkpoint line (domain-separated from row hashes).
    pub fn checkpoint_mac(&self, seq: i64, row_hash_hex: &str, at: time::OffsetDateTime) -> Vec<u8> {
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(self.0.expose_secret()) else { return Vec::new() };
        mac.update(b"checkpoint");
        mac.update(&seq.to_be_bytes());
        mac.update(row_hash_hex.as_bytes());
        mac.update(&at.unix_timestamp_nanos().to_be_bytes());
        mac.finalize().into_bytes().to_vec()
    }

    fn row_hash(&self, seq: i64, prev: &[u8], event: &AuditEvent) -> Result<Vec<u8>, ChainError> {
        let canonical = event.canonical_bytes().map_err(|e| ChainError::Encode(event.event_id, e))?;
        let mut mac = Hmac::<Sha256>::new_from_slice(self.0.expose_secret())
            .map_err(|_| ChainError::Broken { seq, problem: "HMAC key rejected" })?;
        mac.update(&seq.to_be_bytes());
        mac.update(prev);
        mac.update(&canonical);
        Ok(mac.finalize().into_bytes().to_vec())
    }
}

/// Appends the events not stored yet (by `event_id`) in one transaction and
/// returns how many were new. Redelivered events are skipped, not repeated.
pub async fn append(db: &PgPool, key: &ChainKey, events: &[AuditEvent]) -> Result<usize, ChainError> {
    let mut tx = db.begin().await?;
    sqlx::query!("SELECT pg_advisory_xact_lock($1)", CHAIN_LOCK).execute(&mut *tx).await?;
    let ids: Vec<Uuid> = events.iter().map(|e| e.event_id).collect();
    let stored: HashSet<Uuid> = sqlx::query_scalar!("SELECT event_id FROM audit_events WHERE event_id = ANY($1)", &ids)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .collect();
    let last = sqlx::query!("SELECT seq, row_hash FROM audit_events ORDER BY seq DESC LIMIT 1")
        .fetch_optional(&mut *tx)
        .await?;
    let (mut seq, mut prev) = last.map_or((0, GENESIS.to_vec()), |r| (r.seq, r.row_hash));

    let mut rows = Rows::default();
    let mut seen = HashSet::new();
    for event in events.iter().filter(|e| !stored.contains(&e.event_id) && seen.insert(e.event_id)) {
        seq += 1;
        let hash = key.row_hash(seq, &prev, event)?;
        rows.push(seq, event, prev, hash.clone());
        prev = hash;
    }
    let written = rows.seq.len();
    if written > 0 {
        rows.insert(&mut tx).await?;
    }
    tx.commit().await?;
    Ok(written)
}

/// Column arrays for one multi-row `INSERT … SELECT FROM UNNEST(…)`.
#[derive(Default)]
struct Rows {
    seq: Vec<i64>,
    event_id: Vec<Uuid>,
    occurred_at: Vec<time::OffsetDateTime>,
    actor_kind: Vec<String>,
    actor_id: Vec<Option<Uuid>>,
    actor_name: Vec<Option<String>>,
    actor_role: Vec<Option<String>>,
    source_ip: Vec<Option<IpNet>>,
    request_id: Vec<Option<String>>,
    action: Vec<String>,
    resource_kind: Vec<Option<String>>,
    resource_id: Vec<Option<String>>,
    outcome: Vec<String>,
    reason: Vec<Option<String>>,
    prev_hash: Vec<Vec<u8>>,
    row_hash: Vec<Vec<u8>>,
}

impl Rows {
    fn push(&mut self, seq: i64, e: &AuditEvent, prev: Vec<u8>, hash: Vec<u8>) {
        self.seq.push(seq);
        self.event_id.push(e.event_id);
        self.occurred_at.push(crate::audit::truncate_to_micros(e.occurred_at));
        self.actor_kind.push(actor_kind_str(e.actor.kind).to_owned());
        self.actor_id.push(e.actor.id);
        self.actor_name.push(e.actor.name.clone());
        self.actor_role.push(e.actor.role.clone());
        self.source_ip.push(e.source_ip.map(IpNet::from));
        self.request_id.push(e.request_id.clone());
        self.action.push(e.action.as_str().to_owned());
        self.resource_kind.push(e.resource.as_ref().map(|r| r.kind.clone()));
        self.resource_id.push(e.resource.as_ref().map(|r| r.id.clone()));
        self.outcome.push(e.outcome.as_str().to_owned());
        self.reason.push(e.reason.clone());
        self.prev_hash.push(prev);
        self.row_hash.push(hash);
    }

    async fn insert(&self, tx: &mut sqlx::PgConnection) -> Result<(), sqlx::Error> {
        sqlx::query!(
            r#"INSERT INTO audit_events (seq, event_id, occurred_at, actor_kind, actor_id, actor_name, actor_role,
                                         source_ip, request_id, action, resource_kind, resource_id, outcome, reason,
                                         prev_hash, row_hash)
               SELECT * FROM UNNEST($1::bigint[], $2::uuid[], $3::timestamptz[], $4::text[], $5::uuid[], $6::text[],
                                    $7::text[], $8::inet[], $9::text[], $10::text[], $11::text[], $12::text[],
                                    $13::text[], $14::text[], $15::bytea[], $16::bytea[])"#,
            &self.seq,
            &self.event_id,
            &self.occurred_at,
            &self.actor_kind,
            &self.actor_id as &[Option<Uuid>],
            &self.actor_name as &[Option<String>],
            &self.actor_role as &[Option<String>],
            &self.source_ip as &[Option<IpNet>],
            &self.request_id as &[Option<String>],
            &self.action,
            &self.resource_kind as &[Option<String>],
            &self.resource_id as &[Option<String>],
            &self.outcome,
            &self.reason as &[Option<String>],
            &self.prev_hash,
            &self.row_hash,
        )
        .execute(tx)
        .await?;
        Ok(())
    }
}

fn actor_kind_str(kind: ActorKind) -> &'static str {
    match kind {
        ActorKind::User => "user",
        ActorKind::Service => "service",
        ActorKind::Anonymous => "anonymous",
    }
}

fn parse_enum<T: serde::de::DeserializeOwned>(s: &str) -> Option<T> {
    serde_json::from_value(serde_json::Value::String(s.to_owned())).ok()
}

/// Walks the whole chain in `seq` order and returns the number of rows, or
/// the first row whose sequence, link or hash does not hold.
pub async fn verify(db: &PgPool, key: &ChainKey) -> Result<i64, ChainError> {
    Ok(verify_from(db, key, &Head::genesis()).await?.seq)
}

/// A verified end of the chain: its last row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub seq: i64,
    pub row_hash: Vec<u8>,
    /// The `occurred_at` of that row (`None` before the first row).
    pub occurred_at: Option<time::OffsetDateTime>,
}

impl Head {
    pub fn genesis() -> Self {
        Self { seq: 0, row_hash: GENESIS.to_vec(), occurred_at: None }
    }
}

/// Walks the chain from `from` (a row verified before, or a checkpoint; or
/// [`Head::genesis`]) to its end: that row must still hold the same hash,
/// and every later one must follow it by sequence, link and hash. Returns
/// the new end.
pub async fn verify_from(db: &PgPool, key: &ChainKey, from: &Head) -> Result<Head, ChainError> {
    let mut rows = sqlx::query!(
        r#"SELECT seq, event_id, occurred_at, actor_kind, actor_id, actor_name, actor_role, source_ip, request_id,
                  action, resource_kind, resource_id, outcome, reason, prev_hash, row_hash
           FROM audit_events WHERE seq >= $1 ORDER BY seq"#,
        from.seq
    )
    .fetch(db);
    let mut head = from.clone();
    let mut expected_seq = from.seq + 1;
    let mut prev = from.row_hash.clone();
    // The row verified before must still be there (genesis has no row).
    let mut anchored = from.seq == 0;
    let gone = ChainError::Broken { seq: from.seq, problem: "deleted since it was verified or checkpointed" };
    while let Some(r) = rows.try_next().await? {
        let broken = |problem| ChainError::Broken { seq: r.seq, problem };
        if !anchored {
            if r.seq != from.seq {
                return Err(gone);
            }
            if r.row_hash != from.row_hash {
                return Err(broken("row_hash changed since it was verified or checkpointed"));
            }
            anchored = true;
            head.occurred_at = Some(r.occurred_at);
            continue;
        }
        if r.seq != expected_seq {
            return Err(ChainError::Broken { seq: expected_seq, problem: "missing (a later row follows it)" });
        }
        if r.prev_hash != prev {
            return Err(broken("prev_hash does not match the previous row"));
        }
        let event = AuditEvent {
            event_id: r.event_id,
            occurred_at: r.occurred_at,
            actor: Actor {
                kind: parse_enum(&r.actor_kind).ok_or_else(|| broken("unknown actor_kind"))?,
                id: r.actor_id,
                name: r.actor_name,
                role: r.actor_role,
            },
            source_ip: r.source_ip.map(|n| n.addr()),
            request_id: r.request_id,
            action: parse_enum::<Action>(&r.action).ok_or_else(|| broken("unknown action"))?,
            resource: match (r.resource_kind, r.resource_id) {
                (Some(kind), Some(id)) => Some(Resource { kind, id }),
                _ => None,
            },
            outcome: parse_enum::<Outcome>(&r.outcome).ok_or_else(|| broken("unknown outcome"))?,
            reason: r.reason,
        };
        if key.row_hash(r.seq, &prev, &event)? != r.row_hash {
            return Err(broken("row_hash does not match the row's content"));
        }
        prev = r.row_hash;
        head = Head { seq: r.seq, row_hash: prev.clone(), occurred_at: Some(event.occurred_at) };
        expected_seq += 1;
    }
    if !anchored {
        return Err(gone);
    }
    Ok(head)
}
