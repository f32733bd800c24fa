//! The audit table and its hash chain, which anyone holding the public keys
//! can verify and only the sink can extend.
//!
//! Row `n` stores its event with the producer's key id and Ed25519
//! signature ([`SignedEvent`]), and `row_hash = SHA-256("clinflow audit row
//! v2\n" ‖ n ‖ row_hash(n-1) ‖ key id ‖ signature ‖ event)` where `event` is
//! [`AuditEvent::canonical_bytes`]; row 1 chains from 32 zero bytes. The last
//! row of every appended batch also carries the sink's signature of its
//! `(seq, row_hash)` (the head). `seq` is gap-free: batches are appended
//! under one advisory lock. So an edited or inserted event fails its
//! producer's signature, and deleting or reordering rows breaks every later
//! hash up to a head that only the sink's key can sign again.
//!
//! Rows written before events were signed (format 1: no key id) were
//! chained with `HMAC-SHA256(AUDIT_HMAC_KEY, n ‖ row_hash(n-1) ‖ event)`;
//! they verify only with that key ([`Trust::legacy`]).

use std::collections::HashSet;

use crate::audit::signing::{self, PublicKeys, SignedEvent, Signer};
use crate::audit::{Action, Actor, ActorKind, AuditEvent, Outcome, Resource};
use futures_util::TryStreamExt;
use hmac::{Hmac, KeyInit, Mac};
use secrecy::{ExposeSecret, SecretBox};
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use sqlx::types::ipnet::IpNet;
use uuid::Uuid;

/// Any constant works; it only has to be the same for every sink.
const CHAIN_LOCK: i64 = 0x636c_696e_6175_6469; // "clinaudi"
const GENESIS: [u8; 32] = [0; 32];
const ROW_CONTEXT: &[u8] = b"clinflow audit row v2\n";
const HEAD_CONTEXT: &[u8] = b"clinflow audit head v2\n";
/// The producer whose keys sign heads and checkpoints.
pub const SINK_PRODUCER: &str = "audit-sink";

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

/// What verifying the chain takes: public keys only (the producers' and
/// the sink's), and for format-1 rows the HMAC key they were chained with.
pub struct Trust {
    pub keys: PublicKeys,
    pub legacy: Option<ChainKey>,
}

impl Trust {
    pub fn new(keys: PublicKeys) -> Self {
        Self { keys, legacy: None }
    }

    /// The sink's signature over `context` ‖ `parts` holds.
    pub(crate) fn signed_by_sink(&self, key_id: &str, context: &[u8], parts: &[&[u8]], signature: &[u8]) -> bool {
        signing::producer_of(key_id) == SINK_PRODUCER && self.keys.holds_parts(key_id, context, parts, signature)
    }
}

/// The HMAC key of format-1 rows and checkpoints (`AUDIT_HMAC_KEY`).
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
/// returns how many were new; the last new row carries `sink`'s signature of
/// the head. Redelivered events are skipped, not repeated. The events'
/// signatures are the caller's to check (the sink refuses bad ones before).
pub async fn append(db: &PgPool, sink: &Signer, events: &[SignedEvent]) -> Result<usize, ChainError> {
    let mut tx = db.begin().await?;
    sqlx::query!("SELECT pg_advisory_xact_lock($1)", CHAIN_LOCK).execute(&mut *tx).await?;
    let ids: Vec<Uuid> = events.iter().map(|e| e.event.event_id).collect();
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
    for signed in events.iter().filter(|e| !stored.contains(&e.event.event_id) && seen.insert(e.event.event_id)) {
        seq += 1;
        let hash = row_hash(seq, &prev, signed)?;
        rows.push(seq, signed, prev, hash.clone());
        prev = hash;
    }
    let written = rows.seq.len();
    if written > 0 {
        rows.sign_head(sink, seq, &prev);
        rows.insert(&mut tx).await?;
    }
    tx.commit().await?;
    Ok(written)
}

/// The format-2 row hash (see the module).
fn row_hash(seq: i64, prev: &[u8], signed: &SignedEvent) -> Result<Vec<u8>, ChainError> {
    let canonical = signed.event.canonical_bytes().map_err(|e| ChainError::Encode(signed.event.event_id, e))?;
    let mut hash = Sha256::new();
    hash.update(ROW_CONTEXT);
    hash.update(seq.to_be_bytes());
    hash.update(prev);
    hash.update((signed.key_id.len() as u64).to_be_bytes());
    hash.update(signed.key_id.as_bytes());
    hash.update((signed.signature.len() as u64).to_be_bytes());
    hash.update(&signed.signature);
    hash.update(&canonical);
    Ok(hash.finalize().to_vec())
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
    key_id: Vec<String>,
    signature: Vec<Vec<u8>>,
    prev_hash: Vec<Vec<u8>>,
    row_hash: Vec<Vec<u8>>,
    head_key_id: Vec<Option<String>>,
    head_signature: Vec<Option<Vec<u8>>>,
    /// Per row, its patients' blind indexes (hex) joined by spaces: arrays
    /// of arrays do not pass through UNNEST.
    patients: Vec<Option<String>>,
}

impl Rows {
    fn push(&mut self, seq: i64, signed: &SignedEvent, prev: Vec<u8>, hash: Vec<u8>) {
        let e = &signed.event;
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
        self.key_id.push(signed.key_id.clone());
        self.signature.push(signed.signature.clone());
        self.prev_hash.push(prev);
        self.row_hash.push(hash);
        self.head_key_id.push(None);
        self.head_signature.push(None);
        self.patients.push((!e.patients.is_empty()).then(|| e.patients.join(" ")));
    }

    /// The sink's signature of the last row pushed (`seq`, `hash`).
    fn sign_head(&mut self, sink: &Signer, seq: i64, hash: &[u8]) {
        if let (Some(key_id), Some(signature)) = (self.head_key_id.last_mut(), self.head_signature.last_mut()) {
            *key_id = Some(sink.key_id().to_owned());
            *signature = Some(sink.sign_parts(HEAD_CONTEXT, &[&seq.to_be_bytes(), hash]));
        }
    }

    /// The rows, and one `audit_disclosures` row per patient each names.
    async fn insert(&self, tx: &mut sqlx::PgConnection) -> Result<(), sqlx::Error> {
        sqlx::query!(
            r#"INSERT INTO audit_events (seq, event_id, occurred_at, actor_kind, actor_id, actor_name, actor_role,
                                         source_ip, request_id, action, resource_kind, resource_id, outcome, reason,
                                         key_id, signature, prev_hash, row_hash, head_key_id, head_signature, patients)
               SELECT seq, event_id, occurred_at, actor_kind, actor_id, actor_name, actor_role, source_ip, request_id,
                      action, resource_kind, resource_id, outcome, reason, key_id, signature, prev_hash, row_hash,
                      head_key_id, head_signature, string_to_array(patients, ' ')
               FROM UNNEST($1::bigint[], $2::uuid[], $3::timestamptz[], $4::text[], $5::uuid[], $6::text[],
                           $7::text[], $8::inet[], $9::text[], $10::text[], $11::text[], $12::text[],
                           $13::text[], $14::text[], $15::text[], $16::bytea[], $17::bytea[], $18::bytea[],
                           $19::text[], $20::bytea[], $21::text[])
                    AS t (seq, event_id, occurred_at, actor_kind, actor_id, actor_name, actor_role, source_ip,
                          request_id, action, resource_kind, resource_id, outcome, reason, key_id, signature,
                          prev_hash, row_hash, head_key_id, head_signature, patients)"#,
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
            &self.key_id,
            &self.signature,
            &self.prev_hash,
            &self.row_hash,
            &self.head_key_id as &[Option<String>],
            &self.head_signature as &[Option<Vec<u8>>],
            &self.patients as &[Option<String>],
        )
        .execute(&mut *tx)
        .await?;
        if self.patients.iter().any(Option::is_some) {
            // A patient named twice in one event is one disclosure.
            sqlx::query!(
                "INSERT INTO audit_disclosures (patient_index, seq)
                 SELECT DISTINCT decode(p, 'hex'), t.seq
                 FROM UNNEST($1::bigint[], $2::text[]) AS t (seq, patients),
                      unnest(string_to_array(t.patients, ' ')) AS p",
                &self.seq,
                &self.patients as &[Option<String>],
            )
            .execute(tx)
            .await?;
        }
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

/// Walks the whole chain in `seq` order, from its first row present (see
/// [`start`]), and returns the last seq, or the first row whose sequence,
/// link, hash or signatures do not hold.
pub async fn verify(db: &PgPool, trust: &Trust) -> Result<i64, ChainError> {
    let from = start(db, trust).await?;
    Ok(verify_from(db, trust, &from).await?.seq)
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

/// Where the chain in the table starts: [`Head::genesis`] while its first
/// row is there; once the oldest months were archived and dropped, the last
/// archived row (`audit_archives`), whose head signature by the sink must
/// hold. The first row present must then follow it (checked by the walk).
pub async fn start(db: &PgPool, trust: &Trust) -> Result<Head, ChainError> {
    let Some(first) =
        sqlx::query_scalar!("SELECT seq FROM audit_events ORDER BY seq LIMIT 1").fetch_optional(db).await?
    else {
        return Ok(Head::genesis());
    };
    if first <= 1 {
        return Ok(Head::genesis());
    }
    archived_boundary(db, trust, first - 1).await?.ok_or(ChainError::Broken {
        seq: first - 1,
        problem: "missing, with every row before it, and no archived month ends there",
    })
}

/// The last row of an archived and dropped month, if one ends at `seq`;
/// its head signature is checked.
async fn archived_boundary(db: &PgPool, trust: &Trust, seq: i64) -> Result<Option<Head>, ChainError> {
    let Some(a) = sqlx::query!(
        "SELECT last_seq, last_row_hash, head_key_id, head_signature FROM audit_archives
         WHERE last_seq = $1 AND dropped_at IS NOT NULL",
        seq
    )
    .fetch_optional(db)
    .await?
    else {
        return Ok(None);
    };
    if !head_signed(trust, a.last_seq, &a.last_row_hash, &a.head_key_id, &a.head_signature) {
        return Err(ChainError::Broken {
            seq,
            problem: "the archive record's head signature does not hold (audit_archives rewritten?)",
        });
    }
    Ok(Some(Head { seq: a.last_seq, row_hash: a.last_row_hash, occurred_at: None }))
}

/// The sink's signature of the head (`seq`, `row_hash`) holds.
pub fn head_signed(trust: &Trust, seq: i64, row_hash: &[u8], key_id: &str, signature: &[u8]) -> bool {
    trust.signed_by_sink(key_id, HEAD_CONTEXT, &[&seq.to_be_bytes(), row_hash], signature)
}

/// Walks the chain from `from` (a row verified before, or a checkpoint; or
/// [`start`]) to its end: that row must still hold the same hash (unless
/// it is the last row of a dropped, archived month), and every later one
/// must follow it (see [`Walk`]); the last row must be a head the sink
/// signed. Returns the new end.
pub async fn verify_from(db: &PgPool, trust: &Trust, from: &Head) -> Result<Head, ChainError> {
    // The row verified before must still be there (genesis and an archived
    // boundary have none).
    let mut anchored = from.seq == 0 || archived_boundary(db, trust, from.seq).await?.as_ref() == Some(from);
    let mut rows = sqlx::query_as!(
        StoredRow,
        r#"SELECT seq, event_id, occurred_at, actor_kind, actor_id, actor_name, actor_role, source_ip, request_id,
                  action, resource_kind, resource_id, outcome, reason, key_id, signature, prev_hash, row_hash,
                  head_key_id, head_signature, patients
           FROM audit_events WHERE seq >= $1 ORDER BY seq"#,
        from.seq
    )
    .fetch(db);
    let mut walk = Walk::from(from);
    let gone = || ChainError::Broken { seq: from.seq, problem: "deleted since it was verified or checkpointed" };
    while let Some(r) = rows.try_next().await? {
        if !anchored {
            if r.seq != from.seq {
                return Err(gone());
            }
            if r.row_hash != from.row_hash {
                return Err(ChainError::Broken {
                    seq: r.seq,
                    problem: "row_hash changed since it was verified or checkpointed",
                });
            }
            anchored = true;
            walk.head.occurred_at = Some(r.occurred_at);
            continue;
        }
        if r.seq == from.seq {
            // An archived boundary still present: already vouched for.
            continue;
        }
        walk.step(trust, r)?;
    }
    if !anchored {
        return Err(gone());
    }
    walk.end()
}

/// One row as stored: what the table holds and what an archive file holds
/// (a row's `to_jsonb`, bytes as PostgreSQL's `\\x…` hex).
#[derive(Debug, Clone, serde::Deserialize)]
pub struct StoredRow {
    pub seq: i64,
    pub event_id: Uuid,
    #[serde(with = "time::serde::rfc3339")]
    pub occurred_at: time::OffsetDateTime,
    pub actor_kind: String,
    pub actor_id: Option<Uuid>,
    pub actor_name: Option<String>,
    pub actor_role: Option<String>,
    #[serde(default, deserialize_with = "pg_json::inet")]
    pub source_ip: Option<IpNet>,
    pub request_id: Option<String>,
    pub action: String,
    pub resource_kind: Option<String>,
    pub resource_id: Option<String>,
    pub outcome: String,
    pub reason: Option<String>,
    pub key_id: Option<String>,
    #[serde(default, deserialize_with = "pg_json::bytea_opt")]
    pub signature: Option<Vec<u8>>,
    #[serde(deserialize_with = "pg_json::bytea")]
    pub prev_hash: Vec<u8>,
    #[serde(deserialize_with = "pg_json::bytea")]
    pub row_hash: Vec<u8>,
    pub head_key_id: Option<String>,
    #[serde(default, deserialize_with = "pg_json::bytea_opt")]
    pub head_signature: Option<Vec<u8>>,
    /// The patients the event disclosed (blind indexes, hex).
    #[serde(default)]
    pub patients: Option<Vec<String>>,
}

/// How `to_jsonb` writes `bytea` and `inet`.
mod pg_json {
    use serde::{Deserialize, Deserializer, de::Error};
    use sqlx::types::ipnet::IpNet;

    fn hex(text: &str) -> Option<Vec<u8>> {
        let digits = text.strip_prefix("\\x")?;
        if !digits.len().is_multiple_of(2) {
            return None;
        }
        (0..digits.len()).step_by(2).map(|i| u8::from_str_radix(digits.get(i..i + 2)?, 16).ok()).collect()
    }

    pub fn bytea<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        hex(&text).ok_or_else(|| D::Error::custom("not a bytea in hex"))
    }

    pub fn bytea_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|text| hex(&text).ok_or_else(|| D::Error::custom("not a bytea in hex")))
            .transpose()
    }

    pub fn inet<'de, D: Deserializer<'de>>(d: D) -> Result<Option<IpNet>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|text| {
                text.parse::<IpNet>()
                    .or_else(|_| text.parse::<std::net::IpAddr>().map(IpNet::from))
                    .map_err(|_| D::Error::custom("not an inet"))
            })
            .transpose()
    }
}

impl StoredRow {
    /// The event the row stores, as its producer signed it.
    fn event(&self) -> Result<AuditEvent, ChainError> {
        let broken = |problem| ChainError::Broken { seq: self.seq, problem };
        Ok(AuditEvent {
            event_id: self.event_id,
            occurred_at: self.occurred_at,
            actor: Actor {
                kind: parse_enum(&self.actor_kind).ok_or_else(|| broken("unknown actor_kind"))?,
                id: self.actor_id,
                name: self.actor_name.clone(),
                role: self.actor_role.clone(),
            },
            source_ip: self.source_ip.map(|n| n.addr()),
            request_id: self.request_id.clone(),
            action: parse_enum::<Action>(&self.action).ok_or_else(|| broken("unknown action"))?,
            resource: match (&self.resource_kind, &self.resource_id) {
                (Some(kind), Some(id)) => Some(Resource { kind: kind.clone(), id: id.clone() }),
                _ => None,
            },
            outcome: parse_enum::<Outcome>(&self.outcome).ok_or_else(|| broken("unknown outcome"))?,
            reason: self.reason.clone(),
            patients: self.patients.clone().unwrap_or_default(),
        })
    }
}

/// Walking rows in `seq` order from a trusted head: each must follow it by
/// sequence and link, its event must carry a signature that holds under a
/// key that may speak for its actor, its hash must match, and each head the
/// sink signed must hold. The table's rows and an archive's are walked alike.
pub struct Walk {
    head: Head,
    /// Whether the last row walked is a head the sink signed (or format 1).
    ends_signed: bool,
}

impl Walk {
    pub fn from(head: &Head) -> Self {
        Self { head: head.clone(), ends_signed: true }
    }

    /// The next row.
    pub fn step(&mut self, trust: &Trust, r: StoredRow) -> Result<(), ChainError> {
        let broken = |problem| ChainError::Broken { seq: r.seq, problem };
        if r.seq != self.head.seq + 1 {
            return Err(ChainError::Broken { seq: self.head.seq + 1, problem: "missing (a later row follows it)" });
        }
        let prev = &self.head.row_hash;
        if r.prev_hash != *prev {
            return Err(broken("prev_hash does not match the previous row"));
        }
        let event = r.event()?;
        let occurred_at = event.occurred_at;
        let format_1 = r.key_id.is_none();
        let hash = match (r.key_id, r.signature) {
            (Some(key_id), Some(signature)) => {
                let signed = SignedEvent { event, key_id, signature };
                trust.keys.check(&signed).map_err(|refusal| match refusal {
                    signing::Refusal::BadSignature => broken("the event's signature does not hold under a known key"),
                    signing::Refusal::ProducerMismatch => {
                        broken("the event is signed by a key that may not speak for its actor")
                    }
                })?;
                row_hash(r.seq, prev, &signed)?
            }
            (None, None) => match &trust.legacy {
                Some(key) => key.row_hash(r.seq, prev, &event)?,
                None => return Err(broken("written before audit events were signed: verify it with AUDIT_HMAC_KEY")),
            },
            _ => return Err(broken("has a key id without a signature, or the reverse")),
        };
        if hash != r.row_hash {
            return Err(broken("row_hash does not match the row's content"));
        }
        self.ends_signed = match (r.head_key_id, r.head_signature) {
            (Some(key_id), Some(signature)) => {
                if !head_signed(trust, r.seq, &hash, &key_id, &signature) {
                    return Err(broken("the sink's signature of this head does not hold"));
                }
                true
            }
            // Format 1 had no heads; a format-2 row without one is mid-batch.
            (None, None) => format_1,
            _ => return Err(broken("has a head key id without a head signature, or the reverse")),
        };
        self.head = Head { seq: r.seq, row_hash: hash, occurred_at: Some(occurred_at) };
        Ok(())
    }

    /// The last row walked, if it is a head the sink signed.
    pub fn end(self) -> Result<Head, ChainError> {
        if !self.ends_signed {
            return Err(ChainError::Broken {
                seq: self.head.seq,
                problem: "the chain ends at a row the sink did not sign as a head (later rows deleted?)",
            });
        }
        Ok(self.head)
    }
}
