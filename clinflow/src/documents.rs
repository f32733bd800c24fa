//! The documents and document_results tables: plain functions over sqlx.
//! Callers own the transaction; PHI goes in and out only as ciphertext here.

use sqlx::{PgConnection, PgExecutor};
use time::{Date, OffsetDateTime};
use uuid::Uuid;

use crate::crypto::Field;

pub mod reprocess;
pub mod results;

pub fn text_field(id: Uuid) -> Field {
    Field { table: "documents", column: "text", row: id }
}

pub fn patient_ref_field(id: Uuid) -> Field {
    Field { table: "documents", column: "patient_ref", row: id }
}

pub fn annotations_field(id: Uuid) -> Field {
    Field { table: "document_results", column: "annotations", row: id }
}

pub use crate::wire::Status;

#[derive(Debug)]
pub struct NewDocument {
    pub id: Uuid,
    /// The patient's data key, which sealed `patient_ref_ct` and `text_ct`.
    pub data_key_id: Uuid,
    pub patient_ref_ct: Vec<u8>,
    /// [`patient_index`] of the patient reference.
    pub patient_index: Vec<u8>,
    pub text_ct: Vec<u8>,
    /// HMAC of the uploader's `source_ref` (see `crypto::IndexKey`).
    pub source_ref_hmac: Option<Vec<u8>>,
    pub document_date: Option<Date>,
    pub uploaded_by: Uuid,
    /// Why it is held (`retention::Basis::as_str`).
    pub lawful_basis: &'static str,
    /// The research consent it rests on (`retention::consent_index`).
    pub consent_index: Option<Vec<u8>>,
}

/// Domain of `source_ref` hashes under the index key.
pub const SOURCE_REF_DOMAIN: &str = "documents.source_ref";

/// Domain of the patient blind index under the index key.
pub const PATIENT_DOMAIN: &str = "patients.ref";

/// The blind index of a patient reference: what `documents.patient_index`,
/// care teams and break-glass grants hold instead of the reference.
pub fn patient_index(key: &crate::crypto::IndexKey, patient_ref: &str) -> Vec<u8> {
    key.hash(PATIENT_DOMAIN, patient_ref.as_bytes())
}

#[derive(Debug, PartialEq, Eq)]
pub enum Inserted {
    New,
    /// The same uploader sent this `source_ref` before: their document's id.
    DuplicateSourceRef(Uuid),
}

pub async fn insert(conn: &mut PgConnection, doc: &NewDocument) -> Result<Inserted, sqlx::Error> {
    let inserted = sqlx::query_scalar!(
        r#"WITH d AS (
               INSERT INTO documents (id, patient_ref_ct, source_ref_hmac, document_date, uploaded_by, patient_index, data_key_id,
                                      lawful_basis, consent_index)
               VALUES ($1, $2, $4, $5, $6, $7, $8, $9, $10)
               ON CONFLICT (uploaded_by, source_ref_hmac) DO NOTHING
               RETURNING id
           )
           INSERT INTO document_texts (document_id, text_ct) SELECT id, $3 FROM d
           RETURNING document_id"#,
        doc.id,
        doc.patient_ref_ct,
        doc.text_ct,
        doc.source_ref_hmac,
        doc.document_date,
        doc.uploaded_by,
        doc.patient_index,
        doc.data_key_id,
        doc.lawful_basis,
        doc.consent_index,
    )
    .fetch_optional(&mut *conn)
    .await?;
    if inserted.is_some() {
        return Ok(Inserted::New);
    }
    let existing = sqlx::query_scalar!(
        "SELECT id FROM documents WHERE uploaded_by = $1 AND source_ref_hmac = $2",
        doc.uploaded_by,
        doc.source_ref_hmac
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok(Inserted::DuplicateSourceRef(existing))
}

/// Inserts many documents in one statement, on `lane`; returns, in input
/// order, each one's fate. A `source_ref` the same uploader sent before (or
/// earlier in `docs`) is a duplicate with the existing id.
pub async fn insert_many(
    conn: &mut PgConnection,
    docs: &[NewDocument],
    lane: crate::amqp::Lane,
) -> Result<Vec<Inserted>, sqlx::Error> {
    let ids: Vec<Uuid> = docs.iter().map(|d| d.id).collect();
    let patients: Vec<&[u8]> = docs.iter().map(|d| d.patient_ref_ct.as_slice()).collect();
    let texts: Vec<&[u8]> = docs.iter().map(|d| d.text_ct.as_slice()).collect();
    let refs: Vec<Option<&[u8]>> = docs.iter().map(|d| d.source_ref_hmac.as_deref()).collect();
    let dates: Vec<Option<Date>> = docs.iter().map(|d| d.document_date).collect();
    let uploaders: Vec<Uuid> = docs.iter().map(|d| d.uploaded_by).collect();
    let patient_indexes: Vec<&[u8]> = docs.iter().map(|d| d.patient_index.as_slice()).collect();
    let data_keys: Vec<Uuid> = docs.iter().map(|d| d.data_key_id).collect();
    let bases: Vec<&str> = docs.iter().map(|d| d.lawful_basis).collect();
    let consents: Vec<Option<&[u8]>> = docs.iter().map(|d| d.consent_index.as_deref()).collect();
    // The text goes to its own table, written once (the documents row is
    // the one the worker updates: small, so its updates are HOT).
    let inserted: std::collections::HashSet<Uuid> = sqlx::query_scalar!(
        r#"WITH u AS (
               SELECT * FROM UNNEST($1::uuid[], $2::bytea[], $3::bytea[], $4::bytea[], $5::date[], $6::uuid[], $7::bytea[],
                                    $8::uuid[], $9::text[], $10::bytea[])
                   AS u(id, patient_ref_ct, text_ct, source_ref_hmac, document_date, uploaded_by, patient_index, data_key_id,
                        lawful_basis, consent_index)
           ),
           d AS (
               INSERT INTO documents (id, patient_ref_ct, source_ref_hmac, document_date, uploaded_by, patient_index, data_key_id,
                                      lawful_basis, consent_index, lane)
               SELECT id, patient_ref_ct, source_ref_hmac, document_date, uploaded_by, patient_index, data_key_id,
                      lawful_basis, consent_index, $11 FROM u
               ON CONFLICT (uploaded_by, source_ref_hmac) DO NOTHING
               RETURNING id
           )
           INSERT INTO document_texts (document_id, text_ct) SELECT u.id, u.text_ct FROM u JOIN d ON d.id = u.id
           RETURNING document_id"#,
        &ids,
        &patients as &[&[u8]],
        &texts as &[&[u8]],
        &refs as &[Option<&[u8]>],
        &dates as &[Option<Date>],
        &uploaders,
        &patient_indexes as &[&[u8]],
        &data_keys,
        &bases as &[&str],
        &consents as &[Option<&[u8]>],
        lane.as_str(),
    )
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .collect();
    // The rest collided with an existing (uploader, source_ref): find those ids.
    let (dup_uploaders, dup_refs): (Vec<Uuid>, Vec<&[u8]>) = docs
        .iter()
        .filter(|d| !inserted.contains(&d.id))
        .filter_map(|d| Some((d.uploaded_by, d.source_ref_hmac.as_deref()?)))
        .unzip();
    let existing: std::collections::HashMap<(Uuid, Vec<u8>), Uuid> = if dup_refs.is_empty() {
        Default::default()
    } else {
        sqlx::query!(
            r#"SELECT d.id, d.uploaded_by, d.source_ref_hmac AS "source_ref_hmac!"
               FROM documents d JOIN UNNEST($1::uuid[], $2::bytea[]) AS k(uploaded_by, source_ref_hmac)
                 ON d.uploaded_by = k.uploaded_by AND d.source_ref_hmac = k.source_ref_hmac"#,
            &dup_uploaders,
            &dup_refs as &[&[u8]],
        )
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .map(|r| ((r.uploaded_by, r.source_ref_hmac), r.id))
        .collect()
    };
    docs.iter()
        .map(|d| {
            if inserted.contains(&d.id) {
                return Ok(Inserted::New);
            }
            let key = (d.uploaded_by, d.source_ref_hmac.clone().unwrap_or_default());
            existing.get(&key).map(|id| Inserted::DuplicateSourceRef(*id)).ok_or(sqlx::Error::RowNotFound)
        })
        .collect()
}

/// Where a document is, without anything of its content.
#[derive(Debug, serde::Serialize)]
pub struct StatusRow {
    pub id: Uuid,
    pub status: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure_code: Option<String>,
    #[serde(skip)]
    pub uploaded_by: Uuid,
}

pub async fn statuses(db: impl PgExecutor<'_>, ids: &[Uuid]) -> Result<Vec<StatusRow>, sqlx::Error> {
    sqlx::query_as!(
        StatusRow,
        "SELECT id, status, created_at, updated_at, failure_code, uploaded_by FROM documents WHERE id = ANY($1)",
        ids
    )
    .fetch_all(db)
    .await
}

#[derive(Debug)]
pub struct DocumentRow {
    pub id: Uuid,
    pub status: String,
    pub patient_ref_ct: Vec<u8>,
    /// None only for rows from before the index (`clinflow-api reindex-patients`).
    pub patient_index: Option<Vec<u8>>,
    pub document_date: Option<Date>,
    pub created_at: OffsetDateTime,
    pub failure_code: Option<String>,
}

pub async fn get(db: impl PgExecutor<'_>, id: Uuid) -> Result<Option<DocumentRow>, sqlx::Error> {
    sqlx::query_as!(
        DocumentRow,
        "SELECT id, status, patient_ref_ct, patient_index, document_date, created_at, failure_code
         FROM documents WHERE id = $1",
        id
    )
    .fetch_optional(db)
    .await
}

/// A document's sealed text (for a clinician's `?include=text`).
pub async fn text(db: impl PgExecutor<'_>, id: Uuid) -> Result<Option<Vec<u8>>, sqlx::Error> {
    sqlx::query_scalar!("SELECT text_ct FROM document_texts WHERE document_id = $1", id).fetch_optional(db).await
}

#[derive(Debug)]
pub struct ResultRow {
    pub model_version: String,
    pub annotations_ct: Vec<u8>,
    pub annotation_count: i32,
    pub created_at: OffsetDateTime,
}

/// The newest result of a document, if any.
pub async fn latest_result(db: impl PgExecutor<'_>, id: Uuid) -> Result<Option<ResultRow>, sqlx::Error> {
    sqlx::query_as!(
        ResultRow,
        "SELECT model_version, annotations_ct, annotation_count, created_at
         FROM document_results WHERE document_id = $1
         ORDER BY created_at DESC LIMIT 1",
        id
    )
    .fetch_optional(db)
    .await
}
