//! Key management runs of `clinflow-api keys` (as the schema owner):
//!
//! - [`rotate`]: every data key not yet under the primary KEK is re-wrapped
//!   under it — no document is decrypted, the data keys themselves do not
//!   change, readers see no difference. Batches, each a transaction with its
//!   audit event; resumable (it selects what is left).
//! - [`reencrypt`]: a patient's data key is suspected compromised: a new key,
//!   every ciphertext of the patient opened and sealed again under it, the
//!   old key deleted, in one transaction.
//! - `migrate_v1` (its own module): ciphertexts of format 1 sealed again
//!   under data keys.
//! - [`seal_refs`]: each patient's reference sealed beside their data key,
//!   for keys from before the concept endpoints read it there.

use sqlx::PgPool;
use uuid::Uuid;

pub use super::reseal::Batches;
use super::reseal::{audit, results_for_update, store_reasons, store_results, store_texts};
use super::{KeyError, Keys, break_glass_reason_field, data_key_ref_field};

/// `keys migrate-v1` lives in its own module.
pub use super::migrate_v1::migrate_v1;
use crate::audit::{Action, AuditEvent, Operator, Outcome};
use crate::crypto::{CryptoError, DataKey, Envelope, Field, WrappedKey, envelope};
use crate::documents::{annotations_field, patient_ref_field, text_field};

/// How many data keys are not under the primary KEK, by KEK id.
pub async fn pending_rotation(db: &PgPool, keys: &Keys) -> Result<Vec<(String, i64)>, KeyError> {
    let rows = sqlx::query!(
        r#"SELECT kek_id, count(*) AS "n!" FROM data_keys WHERE kek_id <> $1 GROUP BY kek_id ORDER BY kek_id"#,
        keys.keyring().primary()
    )
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().map(|r| (r.kek_id, r.n)).collect())
}

/// Re-wraps every data key not under the primary KEK, a batch at a time;
/// `progress(done)` after each committed batch. A key whose KEK this
/// process does not hold stops the run (fail closed, naming the KEK);
/// run it again with that KEK in `CLINFLOW_MASTER_KEY`.
pub async fn rotate(batches: Batches<'_>, mut progress: impl FnMut(u64)) -> Result<u64, KeyError> {
    let Batches { db, keys, operator, size: batch } = batches;
    let primary = keys.keyring().primary().to_owned();
    let mut done = 0_u64;
    loop {
        let mut tx = db.begin().await?;
        // NO KEY UPDATE: uploads referencing these keys (KEY SHARE) go on.
        let rows = sqlx::query_as!(
            WrappedKey,
            "SELECT id, patient_index, kek_id, wrapped FROM data_keys
             WHERE kek_id <> $1 ORDER BY id LIMIT $2 FOR NO KEY UPDATE",
            primary,
            batch
        )
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            return Ok(done);
        }
        let mut ids = Vec::with_capacity(rows.len());
        let mut wrapped = Vec::with_capacity(rows.len());
        for row in &rows {
            let key = keys.keyring().unwrap(row)?;
            ids.push(row.id);
            wrapped.push(keys.keyring().wrap(&key, &row.patient_index)?.wrapped);
        }
        sqlx::query!(
            "UPDATE data_keys k SET kek_id = $1, wrapped = u.wrapped, rotated_at = now()
             FROM UNNEST($2::uuid[], $3::bytea[]) AS u(id, wrapped) WHERE k.id = u.id",
            primary,
            &ids,
            &wrapped,
        )
        .execute(&mut *tx)
        .await?;
        let event = AuditEvent::new(Action::KeysRotate, operator.actor.clone(), Outcome::Success)
            .resource("data_keys", &ids.len().to_string())
            .reason(&format!("kek:{primary}"));
        audit(&mut tx, operator, event).await?;
        tx.commit().await?;
        done += ids.len() as u64;
        progress(done);
    }
}

/// What [`reencrypt`] rewrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reencrypted {
    pub old_key: Uuid,
    pub new_key: Uuid,
    pub documents: usize,
    pub results: usize,
    pub grants: usize,
}

/// Opens with the old data key (or the master key, format 1).
fn open_with(keys: &Keys, old: &DataKey, field: Field, ct: &[u8]) -> Result<Vec<u8>, CryptoError> {
    match envelope(ct)? {
        Envelope::V1 => keys.keyring().open_v1(field, ct),
        Envelope::V2(_) => old.open(field, ct),
    }
}

/// Replaces the data key `old_key` with a new one: every document, result
/// and break-glass reason of its patient is opened and sealed again under
/// the new key, and the old key deleted, in one transaction (uploads for the
/// patient wait for it).
pub async fn reencrypt(db: &PgPool, keys: &Keys, operator: &Operator, old_key: Uuid) -> Result<Reencrypted, KeyError> {
    let mut tx = db.begin().await?;
    sqlx::query!("SET CONSTRAINTS documents_data_key_id_fkey DEFERRED").execute(&mut *tx).await?;
    let row = sqlx::query!(
        "SELECT id, patient_index, kek_id, wrapped, patient_ref_ct FROM data_keys WHERE id = $1 FOR UPDATE",
        old_key
    )
    .fetch_optional(&mut *tx)
    .await?
    .ok_or(CryptoError::UnknownDataKey(old_key))?;
    let stored = WrappedKey { id: row.id, patient_index: row.patient_index, kek_id: row.kek_id, wrapped: row.wrapped };
    let old = keys.keyring().unwrap(&stored)?;
    let docs = sqlx::query!(
        r#"SELECT d.id, d.patient_ref_ct, t.text_ct AS "text_ct!"
           FROM documents d JOIN document_texts t ON t.document_id = d.id
           WHERE d.data_key_id = $1 ORDER BY d.id FOR UPDATE"#,
        old_key
    )
    .fetch_all(&mut *tx)
    .await?;
    let doc_ids: Vec<Uuid> = docs.iter().map(|d| d.id).collect();
    let results = results_for_update(&mut tx, &doc_ids).await?;
    let grants = sqlx::query!(
        "SELECT id, reason_ct FROM break_glass_grants WHERE patient_index = $1 FOR UPDATE",
        stored.patient_index
    )
    .fetch_all(&mut *tx)
    .await?;

    let new = DataKey::generate();
    let (mut refs, mut texts) = (Vec::with_capacity(docs.len()), Vec::with_capacity(docs.len()));
    let mut patient = match &row.patient_ref_ct {
        Some(ct) => Some(old.open(data_key_ref_field(old_key), ct)?),
        None => None,
    };
    for d in &docs {
        let reference = open_with(keys, &old, patient_ref_field(d.id), &d.patient_ref_ct)?;
        refs.push(new.seal(patient_ref_field(d.id), &reference)?);
        let text = open_with(keys, &old, text_field(d.id), &d.text_ct)?;
        texts.push(new.seal(text_field(d.id), &text)?);
        // A key from before references were sealed beside keys gets one.
        patient.get_or_insert(reference);
    }

    sqlx::query!("DELETE FROM data_keys WHERE id = $1", old_key).execute(&mut *tx).await?;
    let wrapped = keys.keyring().wrap(&new, &stored.patient_index)?;
    let patient_ref = patient.map(|p| new.seal(data_key_ref_field(new.id()), &p)).transpose()?;
    sqlx::query!(
        "INSERT INTO data_keys (id, patient_index, kek_id, wrapped, patient_ref_ct) VALUES ($1, $2, $3, $4, $5)",
        new.id(),
        wrapped.patient_index,
        wrapped.kek_id,
        wrapped.wrapped,
        patient_ref,
    )
    .execute(&mut *tx)
    .await?;

    sqlx::query!(
        "UPDATE documents d SET data_key_id = $1, patient_ref_ct = u.p
         FROM UNNEST($2::uuid[], $3::bytea[]) AS u(id, p) WHERE d.id = u.id",
        new.id(),
        &doc_ids,
        &refs,
    )
    .execute(&mut *tx)
    .await?;
    store_texts(&mut tx, &doc_ids, &texts).await?;
    let mut sealed = Vec::with_capacity(results.len());
    for r in &results {
        let plain = open_with(keys, &old, annotations_field(r.document_id), &r.annotations_ct)?;
        sealed.push(new.seal(annotations_field(r.document_id), &plain)?);
    }
    let result_docs: Vec<Uuid> = results.iter().map(|r| r.document_id).collect();
    let models: Vec<String> = results.iter().map(|r| r.model_version.clone()).collect();
    store_results(&mut tx, &result_docs, &models, &sealed).await?;
    let mut reasons = Vec::with_capacity(grants.len());
    for g in &grants {
        let plain = open_with(keys, &old, break_glass_reason_field(g.id), &g.reason_ct)?;
        reasons.push(new.seal(break_glass_reason_field(g.id), &plain)?);
    }
    let grant_ids: Vec<Uuid> = grants.iter().map(|g| g.id).collect();
    store_reasons(&mut tx, &grant_ids, &reasons).await?;

    let event = AuditEvent::new(Action::KeysReencrypt, operator.actor.clone(), Outcome::Success)
        .resource("data_key", &old_key.to_string())
        .reason(&format!("replaced_by:{}", new.id()));
    audit(&mut tx, operator, event).await?;
    tx.commit().await?;
    keys.forget(old_key);
    Ok(Reencrypted { old_key, new_key: new.id(), documents: docs.len(), results: results.len(), grants: grants.len() })
}

/// Seals each patient's reference beside their data key where the key is
/// from before that (migration 20261130000001), opened from one of their
/// documents, a batch of keys per transaction, `progress(done)` after each.
/// Resumable: it selects what is left. A key of a patient with no document
/// (known only by a break-glass grant) stays without: nothing holds the
/// reference, and no concept endpoint lists such a patient.
pub async fn seal_refs(batches: Batches<'_>, mut progress: impl FnMut(u64)) -> Result<u64, KeyError> {
    let Batches { db, keys, operator, size: batch } = batches;
    let (mut done, mut after) = (0_u64, Uuid::nil());
    loop {
        let mut tx = db.begin().await?;
        let rows = sqlx::query!(
            r#"SELECT k.id, k.patient_index, k.kek_id, k.wrapped, d.id AS "document_id!", d.patient_ref_ct
               FROM data_keys k
               CROSS JOIN LATERAL (SELECT id, patient_ref_ct FROM documents
                                   WHERE data_key_id = k.id ORDER BY id LIMIT 1) d
               WHERE k.patient_ref_ct IS NULL AND k.id > $1
               ORDER BY k.id LIMIT $2 FOR NO KEY UPDATE OF k"#,
            after,
            batch
        )
        .fetch_all(&mut *tx)
        .await?;
        let Some(last) = rows.last() else {
            return Ok(done);
        };
        after = last.id;
        let mut ids = Vec::with_capacity(rows.len());
        let mut sealed = Vec::with_capacity(rows.len());
        for r in rows {
            // Not through the process's cache: each key is used once here.
            let key = keys.keyring().unwrap(&WrappedKey {
                id: r.id,
                patient_index: r.patient_index,
                kek_id: r.kek_id,
                wrapped: r.wrapped,
            })?;
            let reference = key.open(patient_ref_field(r.document_id), &r.patient_ref_ct)?;
            sealed.push(key.seal(data_key_ref_field(r.id), &reference)?);
            ids.push(r.id);
        }
        sqlx::query!(
            "UPDATE data_keys k SET patient_ref_ct = u.ct FROM UNNEST($1::uuid[], $2::bytea[]) AS u(id, ct)
             WHERE k.id = u.id",
            &ids,
            &sealed,
        )
        .execute(&mut *tx)
        .await?;
        let event = AuditEvent::new(Action::KeysSealRefs, operator.actor.clone(), Outcome::Success)
            .resource("data_keys", &ids.len().to_string());
        audit(&mut tx, operator, event).await?;
        tx.commit().await?;
        done += ids.len() as u64;
        progress(done);
    }
}

/// Every data key id, oldest first, created before `before` (for
/// `reencrypt --all`, which must not visit the keys it creates).
pub async fn keys_created_before(db: &PgPool, before: time::OffsetDateTime) -> Result<Vec<Uuid>, KeyError> {
    Ok(sqlx::query_scalar!("SELECT id FROM data_keys WHERE created_at < $1 ORDER BY id", before).fetch_all(db).await?)
}

/// The data key of a patient, if they have one.
pub async fn key_of_patient(db: &PgPool, patient_index: &[u8]) -> Result<Option<Uuid>, KeyError> {
    Ok(sqlx::query_scalar!("SELECT id FROM data_keys WHERE patient_index = $1", patient_index)
        .fetch_optional(db)
        .await?)
}
