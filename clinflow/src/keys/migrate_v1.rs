//! `keys migrate-v1`: ciphertexts of format 1 (sealed directly under the
//! master key, before envelope keys) sealed again under their patients'
//! data keys, so KEK "1" can be retired.

use sqlx::PgPool;
use uuid::Uuid;

use super::reseal::{Batches, audit, results_for_update, store_reasons, store_results, store_texts};
use super::{KeyError, Keys, PatientRef, break_glass_reason_field};
use crate::audit::{Action, AuditEvent, Operator, Outcome};
use crate::crypto::{CryptoError, Envelope, IndexKey, envelope};
use crate::documents::{annotations_field, patient_index, patient_ref_field, text_field};

/// Seals every format-1 ciphertext again under its patient's data key
/// (created where missing), a batch of documents per transaction, then the
/// break-glass reasons; fills the patient index of rows from before it.
/// Returns (documents, grants) moved. Resumable: it selects what is left.
pub async fn migrate_v1(
    batches: Batches<'_>,
    index_key: &IndexKey,
    mut progress: impl FnMut(u64),
) -> Result<(u64, u64), KeyError> {
    let Batches { db, keys, operator, size: batch } = batches;
    let mut documents = 0_u64;
    loop {
        let mut tx = db.begin().await?;
        let docs = sqlx::query!(
            r#"SELECT d.id, d.patient_ref_ct, t.text_ct AS "text_ct!"
               FROM documents d JOIN document_texts t ON t.document_id = d.id
               WHERE d.data_key_id IS NULL
               ORDER BY d.id LIMIT $1 FOR UPDATE"#,
            batch
        )
        .fetch_all(&mut *tx)
        .await?;
        if docs.is_empty() {
            break;
        }
        let ring = keys.keyring();
        let mut plain = Vec::with_capacity(docs.len());
        for d in &docs {
            let patient = String::from_utf8(ring.open_v1(patient_ref_field(d.id), &d.patient_ref_ct)?)
                .map_err(|_| CryptoError::Malformed)?;
            let text = ring.open_v1(text_field(d.id), &d.text_ct)?;
            plain.push((d.id, patient_index(index_key, &patient), patient, text));
        }
        let patients: Vec<PatientRef> = plain.iter().map(|p| PatientRef::new(&p.1, &p.2)).collect();
        let data_keys = keys.for_patients(&mut tx, &patients).await?;
        let key_of = |index: &[u8]| data_keys.get(index).ok_or(CryptoError::UnknownDataKey(Uuid::nil()));
        let ids: Vec<Uuid> = plain.iter().map(|p| p.0).collect();
        let (mut key_ids, mut pidx, mut refs, mut texts) = (vec![], vec![], vec![], vec![]);
        for (id, index, patient, text) in &plain {
            let key = key_of(index)?;
            key_ids.push(key.id());
            pidx.push(index.clone());
            refs.push(key.seal_str(patient_ref_field(*id), patient)?);
            texts.push(key.seal(text_field(*id), text)?);
        }
        sqlx::query!(
            "UPDATE documents d SET data_key_id = u.k, patient_index = u.pi, patient_ref_ct = u.p
             FROM UNNEST($1::uuid[], $2::uuid[], $3::bytea[], $4::bytea[]) AS u(id, k, pi, p)
             WHERE d.id = u.id",
            &ids,
            &key_ids,
            &pidx,
            &refs,
        )
        .execute(&mut *tx)
        .await?;
        store_texts(&mut tx, &ids, &texts).await?;
        let results = results_for_update(&mut tx, &ids).await?;
        let mut sealed = Vec::with_capacity(results.len());
        for r in &results {
            let index = &plain.iter().find(|p| p.0 == r.document_id).ok_or(CryptoError::Malformed)?.1;
            let annotations = match envelope(&r.annotations_ct)? {
                Envelope::V1 => ring.open_v1(annotations_field(r.document_id), &r.annotations_ct)?,
                Envelope::V2(_) => keys
                    .opener(&mut *tx, [r.annotations_ct.as_slice()])
                    .await?
                    .open(annotations_field(r.document_id), &r.annotations_ct)?,
            };
            sealed.push(key_of(index)?.seal(annotations_field(r.document_id), &annotations)?);
        }
        let result_docs: Vec<Uuid> = results.iter().map(|r| r.document_id).collect();
        let models: Vec<String> = results.iter().map(|r| r.model_version.clone()).collect();
        store_results(&mut tx, &result_docs, &models, &sealed).await?;
        let event = AuditEvent::new(Action::KeysMigrateV1, operator.actor.clone(), Outcome::Success)
            .resource("documents", &ids.len().to_string());
        audit(&mut tx, operator, event).await?;
        tx.commit().await?;
        documents += ids.len() as u64;
        progress(documents);
    }
    let grants = migrate_v1_reasons(db, keys, operator).await?;
    Ok((documents, grants))
}

/// Break-glass reasons of format 1, under their patients' data keys.
async fn migrate_v1_reasons(db: &PgPool, keys: &Keys, operator: &Operator) -> Result<u64, KeyError> {
    let mut tx = db.begin().await?;
    let grants = sqlx::query!(
        "SELECT id, patient_index, reason_ct FROM break_glass_grants
         WHERE get_byte(reason_ct, 0) = 1 FOR UPDATE"
    )
    .fetch_all(&mut *tx)
    .await?;
    if grants.is_empty() {
        return Ok(0);
    }
    // A patient known only by a grant (no document): their key holds no
    // reference; the grant never had it in clear.
    let patients: Vec<PatientRef> =
        grants.iter().map(|g| PatientRef { index: &g.patient_index, reference: None }).collect();
    let data_keys = keys.for_patients(&mut tx, &patients).await?;
    let mut sealed = Vec::with_capacity(grants.len());
    for g in &grants {
        let reason = keys.keyring().open_v1(break_glass_reason_field(g.id), &g.reason_ct)?;
        let key = data_keys.get(&g.patient_index).ok_or(CryptoError::UnknownDataKey(Uuid::nil()))?;
        sealed.push(key.seal(break_glass_reason_field(g.id), &reason)?);
    }
    let ids: Vec<Uuid> = grants.iter().map(|g| g.id).collect();
    store_reasons(&mut tx, &ids, &sealed).await?;
    let event = AuditEvent::new(Action::KeysMigrateV1, operator.actor.clone(), Outcome::Success)
        .resource("break_glass_grants", &ids.len().to_string());
    audit(&mut tx, operator, event).await?;
    tx.commit().await?;
    Ok(ids.len() as u64)
}
