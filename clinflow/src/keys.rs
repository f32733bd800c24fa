//! Patients' data keys (table `data_keys`): created with a patient's first
//! ciphertext in the caller's transaction, unwrapped through a bounded,
//! time-limited cache shared by the process, and used to open any
//! ciphertext (format 1 or 2). Rotation and re-encryption: [`rotation`];
//! the `keys` command over them: [`command`]; filling the patient blind
//! index of documents stored before it existed: [`reindex`]; dropping
//! destroyed keys from the cache as the database announces them:
//! [`destroyed`].

pub mod command;
pub mod destroyed;
mod migrate_v1;
pub mod reindex;
mod reseal;
pub mod rotation;

use std::collections::{HashMap, HashSet};
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use lru::LruCache;
use sqlx::{PgConnection, PgExecutor, PgPool};
use uuid::Uuid;

use crate::crypto::{CryptoError, DataKey, Envelope, Field, Keyring, WrappedKey, envelope};

/// Unwrapped data keys a process keeps by default, and for how long (the
/// api keeps more: `KEY_CACHE_ENTRIES` in api/src/cli.rs).
pub const CACHE_CAPACITY: usize = 10_000;
pub const CACHE_TTL: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// Where a break-glass grant's reason is sealed (under the patient's key:
/// free text about them, shredded with them).
pub fn break_glass_reason_field(id: Uuid) -> Field {
    Field { table: "break_glass_grants", column: "reason", row: id }
}

/// Where a patient's reference is sealed beside their data key, under it
/// (the concept endpoints open it there rather than in `documents`).
pub fn data_key_ref_field(key_id: Uuid) -> Field {
    Field { table: "data_keys", column: "patient_ref", row: key_id }
}

/// A patient whose data key is wanted: their blind index, and their
/// reference, sealed beside a key created for them. `None` only where the
/// caller never had it in clear (`keys migrate-v1` for a patient known only
/// by a break-glass grant).
#[derive(Debug, Clone, Copy)]
pub struct PatientRef<'a> {
    pub index: &'a [u8],
    pub reference: Option<&'a str>,
}

impl<'a> PatientRef<'a> {
    pub fn new(index: &'a [u8], reference: &'a str) -> Self {
        Self { index, reference: Some(reference) }
    }
}

/// The key-encryption keys of this process and its cache of unwrapped data
/// keys. One per process, shared (`Arc`).
pub struct Keys {
    keyring: Keyring,
    cache: Cache,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys").field("keyring", &self.keyring).finish_non_exhaustive()
    }
}

impl Keys {
    pub fn new(keyring: Keyring) -> Self {
        Self::with_cache(keyring, CACHE_CAPACITY, CACHE_TTL)
    }

    pub fn with_cache(keyring: Keyring, capacity: usize, ttl: Duration) -> Self {
        Self { keyring, cache: Cache::new(capacity, ttl) }
    }

    pub fn keyring(&self) -> &Keyring {
        &self.keyring
    }

    /// The data key of a patient, created if they have none, in the caller's
    /// transaction.
    pub async fn for_patient(
        &self,
        conn: &mut PgConnection,
        patient: PatientRef<'_>,
    ) -> Result<Arc<DataKey>, KeyError> {
        let mut keys = self.for_patients(conn, &[patient]).await?;
        keys.remove(patient.index).ok_or_else(|| KeyError::Database(sqlx::Error::RowNotFound))
    }

    /// The data key of each patient (by blind index), those missing created
    /// in one statement, each with the patient's reference sealed beside it
    /// (a key another transaction created meanwhile wins, and is used).
    pub async fn for_patients(
        &self,
        conn: &mut PgConnection,
        patients: &[PatientRef<'_>],
    ) -> Result<HashMap<Vec<u8>, Arc<DataKey>>, KeyError> {
        let mut wanted = patients.to_vec();
        wanted.sort_unstable_by_key(|p| p.index);
        wanted.dedup_by_key(|p| p.index);
        let indexes: Vec<&[u8]> = wanted.iter().map(|p| p.index).collect();
        let mut found = self.select_for_patients(&mut *conn, &indexes).await?;
        let missing: Vec<PatientRef> = wanted.into_iter().filter(|p| !found.contains_key(p.index)).collect();
        if missing.is_empty() {
            return Ok(found);
        }
        let mut fresh = Vec::with_capacity(missing.len());
        let mut refs = Vec::with_capacity(missing.len());
        for patient in &missing {
            let key = DataKey::generate();
            let wrapped = self.keyring.wrap(&key, patient.index)?;
            refs.push(patient.reference.map(|r| key.seal_str(data_key_ref_field(key.id()), r)).transpose()?);
            fresh.push((key, wrapped));
        }
        let ids: Vec<Uuid> = fresh.iter().map(|(k, _)| k.id()).collect();
        let missing: Vec<&[u8]> = missing.iter().map(|p| p.index).collect();
        let keks: Vec<&str> = fresh.iter().map(|(_, w)| w.kek_id.as_str()).collect();
        let wrapped: Vec<&[u8]> = fresh.iter().map(|(_, w)| w.wrapped.as_slice()).collect();
        let inserted: HashSet<Uuid> = sqlx::query_scalar!(
            "INSERT INTO data_keys (id, patient_index, kek_id, wrapped, patient_ref_ct)
             SELECT * FROM UNNEST($1::uuid[], $2::bytea[], $3::text[], $4::bytea[], $5::bytea[])
             ON CONFLICT (patient_index) DO NOTHING
             RETURNING id",
            &ids,
            &missing as &[&[u8]],
            &keks as &[&str],
            &wrapped as &[&[u8]],
            &refs as &[Option<Vec<u8>>],
        )
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .collect();
        let mut raced = Vec::new();
        for (key, wrapped) in fresh {
            if inserted.contains(&key.id()) {
                let key = Arc::new(key);
                self.cache.insert(Arc::clone(&key));
                found.insert(wrapped.patient_index, key);
            } else {
                raced.push(wrapped.patient_index);
            }
        }
        if !raced.is_empty() {
            let raced: Vec<&[u8]> = raced.iter().map(Vec::as_slice).collect();
            found.extend(self.select_for_patients(conn, &raced).await?);
        }
        Ok(found)
    }

    /// FOR KEY SHARE: a `keys reencrypt` replacing one of these keys waits
    /// for the caller's transaction, and the caller, if it came second, sees
    /// the old key gone and picks up the new one (through the insert's
    /// conflict), never sealing under a key being deleted.
    async fn select_for_patients(
        &self,
        db: impl PgExecutor<'_>,
        patient_indexes: &[&[u8]],
    ) -> Result<HashMap<Vec<u8>, Arc<DataKey>>, KeyError> {
        let rows = sqlx::query_as!(
            WrappedKey,
            "SELECT id, patient_index, kek_id, wrapped FROM data_keys WHERE patient_index = ANY($1) FOR KEY SHARE",
            patient_indexes as &[&[u8]],
        )
        .fetch_all(db)
        .await?;
        rows.into_iter().map(|w| Ok((w.patient_index.clone(), self.unwrap(&w)?))).collect()
    }

    /// The references of these patients (by blind index), opened: from
    /// beside their data keys, or, for a key from before they were sealed
    /// there (until `keys seal-refs`) or a patient whose documents are all of
    /// format 1, from one of their documents. A patient with neither (erased
    /// meanwhile) is absent.
    pub async fn patient_refs(&self, db: &PgPool, indexes: &[&[u8]]) -> Result<HashMap<Vec<u8>, String>, KeyError> {
        let rows = sqlx::query!(
            "SELECT id, patient_index, kek_id, wrapped, patient_ref_ct FROM data_keys WHERE patient_index = ANY($1)",
            indexes as &[&[u8]],
        )
        .fetch_all(db)
        .await?;
        let mut refs = HashMap::with_capacity(rows.len());
        for r in rows {
            let Some(sealed) = r.patient_ref_ct else { continue };
            let stored = WrappedKey { id: r.id, patient_index: r.patient_index, kek_id: r.kek_id, wrapped: r.wrapped };
            let key = self.unwrap(&stored)?;
            let reference = key.open(data_key_ref_field(r.id), &sealed)?;
            refs.insert(stored.patient_index, String::from_utf8(reference).map_err(|_| CryptoError::Malformed)?);
        }
        // Keys from before, and documents from before data keys (format 1).
        let unsealed: Vec<&[u8]> = indexes.iter().copied().filter(|i| !refs.contains_key(*i)).collect();
        if !unsealed.is_empty() {
            let docs = sqlx::query!(
                r#"SELECT DISTINCT ON (patient_index) patient_index AS "patient_index!", id, patient_ref_ct
                   FROM documents WHERE patient_index = ANY($1) ORDER BY patient_index, id"#,
                &unsealed as &[&[u8]],
            )
            .fetch_all(db)
            .await?;
            let opener = self.opener(db, docs.iter().map(|d| d.patient_ref_ct.as_slice())).await?;
            for d in docs {
                let reference = opener.open_string(crate::documents::patient_ref_field(d.id), &d.patient_ref_ct)?;
                refs.insert(d.patient_index, reference);
            }
        }
        Ok(refs)
    }

    /// Unwraps a stored key, through the cache.
    pub fn unwrap(&self, stored: &WrappedKey) -> Result<Arc<DataKey>, CryptoError> {
        if let Some(key) = self.cache.get(stored.id) {
            return Ok(key);
        }
        let key = Arc::new(self.keyring.unwrap(stored)?);
        self.cache.insert(Arc::clone(&key));
        Ok(key)
    }

    /// The data keys of `ids` (one query for those not cached); each is the
    /// key or why it cannot be had (destroyed, or its KEK not held).
    pub async fn by_id(
        &self,
        db: impl PgExecutor<'_>,
        ids: &[Uuid],
    ) -> Result<HashMap<Uuid, Result<Arc<DataKey>, CryptoError>>, KeyError> {
        let mut keys = HashMap::with_capacity(ids.len());
        let mut fetch = Vec::new();
        for id in ids {
            if keys.contains_key(id) {
                continue;
            }
            match self.cache.get(*id) {
                Some(key) => {
                    keys.insert(*id, Ok(key));
                }
                None => fetch.push(*id),
            }
        }
        fetch.sort_unstable();
        fetch.dedup();
        if !fetch.is_empty() {
            let rows = sqlx::query_as!(
                WrappedKey,
                "SELECT id, patient_index, kek_id, wrapped FROM data_keys WHERE id = ANY($1)",
                &fetch
            )
            .fetch_all(db)
            .await?;
            for row in rows {
                keys.insert(row.id, self.unwrap(&row));
            }
            for id in fetch {
                keys.entry(id).or_insert(Err(CryptoError::UnknownDataKey(id)));
            }
        }
        Ok(keys)
    }

    /// An opener for `ciphertexts`: the data keys they name are loaded at
    /// once, so opening each is then a map lookup and AES.
    pub async fn opener<'c>(
        &self,
        db: impl PgExecutor<'_>,
        ciphertexts: impl IntoIterator<Item = &'c [u8]>,
    ) -> Result<Opener<'_>, KeyError> {
        let ids: Vec<Uuid> = ciphertexts
            .into_iter()
            .filter_map(|ct| match envelope(ct) {
                Ok(Envelope::V2(id)) => Some(id),
                _ => None,
            })
            .collect();
        Ok(Opener { keyring: &self.keyring, keys: self.by_id(db, &ids).await? })
    }

    /// Opens one ciphertext of either format.
    pub async fn open(&self, db: impl PgExecutor<'_>, field: Field, ciphertext: &[u8]) -> Result<Vec<u8>, KeyError> {
        Ok(self.opener(db, [ciphertext]).await?.open(field, ciphertext)?)
    }

    /// `open` for text.
    pub async fn open_string(
        &self,
        db: impl PgExecutor<'_>,
        field: Field,
        ciphertext: &[u8],
    ) -> Result<String, KeyError> {
        Ok(self.opener(db, [ciphertext]).await?.open_string(field, ciphertext)?)
    }

    /// Drops a destroyed key from this process's cache.
    pub fn forget(&self, id: Uuid) {
        self.cache.remove(id);
    }

    /// Drops every key from this process's cache (when announcements of
    /// destroyed keys may have been missed).
    pub fn forget_all(&self) {
        self.cache.clear();
    }
}

/// Opens the ciphertexts it was made for ([`Keys::opener`]).
pub struct Opener<'k> {
    keyring: &'k Keyring,
    keys: HashMap<Uuid, Result<Arc<DataKey>, CryptoError>>,
}

impl Opener<'_> {
    pub fn open(&self, field: Field, ciphertext: &[u8]) -> Result<Vec<u8>, CryptoError> {
        match envelope(ciphertext)? {
            Envelope::V1 => self.keyring.open_v1(field, ciphertext),
            Envelope::V2(id) => match self.keys.get(&id) {
                Some(Ok(key)) => key.open(field, ciphertext),
                Some(Err(e)) => Err(e.clone()),
                None => Err(CryptoError::UnknownDataKey(id)),
            },
        }
    }

    /// `open` for text; invalid UTF-8 after a successful open is corruption.
    pub fn open_string(&self, field: Field, ciphertext: &[u8]) -> Result<String, CryptoError> {
        String::from_utf8(self.open(field, ciphertext)?).map_err(|_| CryptoError::Malformed)
    }
}

/// Unwrapped data keys by id: at most `capacity`, least recently used
/// evicted first, each for at most `ttl` after it was unwrapped; a key
/// leaving it is zeroized once its last user drops it. Every operation is
/// O(1) under the lock (a query page may bring a hundred keys of a hundred
/// patients).
struct Cache {
    entries: Mutex<LruCache<Uuid, (Arc<DataKey>, Instant)>>,
    ttl: Duration,
}

impl Cache {
    fn new(capacity: usize, ttl: Duration) -> Self {
        let capacity = NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN);
        Cache { entries: Mutex::new(LruCache::new(capacity)), ttl }
    }

    fn get(&self, id: Uuid) -> Option<Arc<DataKey>> {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        match entries.get(&id) {
            Some((key, at)) if at.elapsed() < self.ttl => Some(Arc::clone(key)),
            Some(_) => {
                entries.pop(&id);
                None
            }
            None => None,
        }
    }

    fn insert(&self, key: Arc<DataKey>) {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries.put(key.id(), (key, Instant::now()));
    }

    fn remove(&self, id: Uuid) {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner).pop(&id);
    }

    fn clear(&self) {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner).clear();
    }
}

#[cfg(test)]
mod tests;
