//! `reindex-patients`: fills the patient blind index of documents stored
//! before it existed (the api offers it as `clinflow-api reindex-patients`).

use sqlx::PgPool;
use uuid::Uuid;

use crate::crypto::IndexKey;
use crate::documents::{patient_index, patient_ref_field};
use crate::keys::Keys;

/// Fills `documents.patient_index` where it is NULL, a thousand documents
/// at a time in id order, decrypting each patient reference once; progress
/// on stderr, the outcome on stdout. Resumable and idempotent. A reference
/// that cannot be decrypted (sealed under another key) is left as it is and
/// reported: then it fails, naming up to ten such documents.
pub async fn run(db: &PgPool, keys: &Keys, index_key: &IndexKey) -> anyhow::Result<()> {
    let (mut done, mut unreadable, mut after) = (0_u64, Vec::new(), Uuid::nil());
    loop {
        let rows = sqlx::query!(
            "SELECT id, patient_ref_ct FROM documents WHERE patient_index IS NULL AND id > $1 ORDER BY id LIMIT 1000",
            after
        )
        .fetch_all(db)
        .await?;
        let Some(last) = rows.last() else { break };
        after = last.id;
        let mut ids = Vec::with_capacity(rows.len());
        let mut indexes = Vec::with_capacity(rows.len());
        let opener = keys.opener(db, rows.iter().map(|r| r.patient_ref_ct.as_slice())).await?;
        for row in rows {
            match opener.open_string(patient_ref_field(row.id), &row.patient_ref_ct) {
                Ok(patient_ref) => {
                    ids.push(row.id);
                    indexes.push(patient_index(index_key, &patient_ref));
                }
                // Sealed under another key: left as it is, and reported.
                Err(_) => unreadable.push(row.id),
            }
        }
        sqlx::query!(
            "UPDATE documents d SET patient_index = u.idx
             FROM UNNEST($1::uuid[], $2::bytea[]) AS u(id, idx) WHERE d.id = u.id",
            &ids,
            &indexes,
        )
        .execute(db)
        .await?;
        done += ids.len() as u64;
        eprintln!("reindexed {done} documents");
    }
    if !unreadable.is_empty() {
        let shown: Vec<String> = unreadable.iter().take(10).map(ToString::to_string).collect();
        anyhow::bail!(
            "{done} documents indexed; {} could not be decrypted with CLINFLOW_MASTER_KEY (another key sealed them?) and have no patient index, e.g. {}",
            unreadable.len(),
            shown.join(", ")
        );
    }
    println!("patient index complete ({done} documents filled)");
    Ok(())
}
