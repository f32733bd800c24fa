//! A patient's erasure (GDPR Art. 17), for whichever route decides it: every
//! row of the patient deleted and their data key destroyed
//! (`erase_patient()`, migrations/20261208000020_complete_erasure.sql), the
//! erasure written to the [`journal`] outside the database, and every
//! process told to drop the key from its cache (NOTIFY, delivered on
//! commit; [`crate::keys::destroyed::watch_destroyed_keys`]). A copy restored from a
//! backup taken before the erasure has it applied again by
//! `erasures reapply` ([`command`]). docs/encryption.md, "Erasure".

pub mod command;
pub mod journal;

use sqlx::PgConnection;
use time::OffsetDateTime;
use uuid::Uuid;

pub use journal::{Entry, Journal, JournalError};

use crate::checkpoint::hex;
use crate::keys::Keys;

/// The SQLSTATE `erase_patient()` refuses with while documents without a
/// patient index remain (erasure could not find them).
const UNINDEXED: &str = "CF001";

/// How many rows of each kind an erasure deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub documents: i64,
    pub results: i64,
    pub concepts: i64,
    pub team_entries: i64,
    pub grants: i64,
    pub data_keys: i64,
}

impl Counts {
    /// Nothing was held on the patient.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    fn add(&mut self, other: Counts) {
        self.documents += other.documents;
        self.results += other.results;
        self.concepts += other.concepts;
        self.team_entries += other.team_entries;
        self.grants += other.grants;
        self.data_keys += other.data_keys;
    }
}

/// What [`erase_patient`] did in the caller's transaction.
#[derive(Debug)]
pub struct Erased {
    pub counts: Counts,
    /// The data keys destroyed.
    pub data_keys: Vec<Uuid>,
    /// The journal entry written, `None` when nothing was held (then the
    /// caller rolls back and answers "not found").
    pub journal_entry: Option<std::path::PathBuf>,
}

impl Erased {
    /// After the commit: this process forgets the keys at once (the others
    /// hear the commit's NOTIFY).
    pub fn after_commit(&self, keys: &Keys) {
        for id in &self.data_keys {
            keys.forget(*id);
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ErasureError {
    #[error(
        "erasure refused: documents without a patient index remain, which erasure cannot find; \
         run `clinflow-api keys migrate-v1`, then `clinflow-api reindex-patients`"
    )]
    Unindexed,
    #[error("erasure refused: {0}")]
    Journal(#[from] JournalError),
    #[error(transparent)]
    Database(sqlx::Error),
}

impl From<sqlx::Error> for ErasureError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::Database(db) if db.code().as_deref() == Some(UNINDEXED) => ErasureError::Unindexed,
            _ => ErasureError::Database(e),
        }
    }
}

/// Erases the patient of `patient_index` in the caller's transaction `tx`:
/// their documents (of either ciphertext format), results, concept rows,
/// idempotency keys, care-team entries, break-glass grants and data key.
/// Refuses ([`ErasureError::Unindexed`]) while any document has no patient
/// index. When something was erased, the erasure is written to `journal`
/// (durably) before this returns, so before the caller commits: a failed
/// journal write fails the erasure, and an entry whose transaction then
/// fails to commit is still re-applied after a restore (the erasure was
/// decided; applying it again is harmless). `audit_event_id` is the id of
/// the `patient.erase` event the caller writes in `tx`
/// ([`crate::audit::AuditEvent::id`]). After the commit, call
/// [`Erased::after_commit`].
pub async fn erase_patient(
    tx: &mut PgConnection,
    journal: &Journal,
    patient_index: &[u8],
    audit_event_id: Uuid,
) -> Result<Erased, ErasureError> {
    let (counts, data_keys) = erase_rows(tx, patient_index).await?;
    if counts.is_empty() {
        return Ok(Erased { counts, data_keys, journal_entry: None });
    }
    let entry = Entry {
        patient_index: hex(patient_index),
        data_keys: data_keys.clone(),
        erased_at: OffsetDateTime::now_utc(),
        audit_event_id,
    };
    let path = journal.append(&entry).await?;
    metrics::counter!("clinflow_patients_erased_total").increment(1);
    Ok(Erased { counts, data_keys, journal_entry: Some(path) })
}

/// `erase_patient()` of one blind index: the counts and the keys destroyed.
async fn erase_rows(conn: &mut PgConnection, patient_index: &[u8]) -> Result<(Counts, Vec<Uuid>), ErasureError> {
    let row = sqlx::query!(
        r#"SELECT documents AS "documents!", results AS "results!", concepts AS "concepts!",
                  team_entries AS "team_entries!", grants AS "grants!", data_keys AS "data_keys!",
                  data_key_ids AS "data_key_ids!"
           FROM erase_patient($1)"#,
        patient_index
    )
    .fetch_one(conn)
    .await?;
    let counts = Counts {
        documents: row.documents,
        results: row.results,
        concepts: row.concepts,
        team_entries: row.team_entries,
        grants: row.grants,
        data_keys: row.data_keys,
    };
    Ok((counts, row.data_key_ids))
}
