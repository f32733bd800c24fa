//! The documents and document_results tables: plain functions over sqlx.
//! Callers own the transaction; PHI goes in and out only as ciphertext here.

use sqlx::{PgConnection, PgExecutor};
use time::{Date, OffsetDateTime};
use uuid::Uuid;

use crate::crypto::Field;

pub fn text_field(id: Uuid) -> Field {
    Field { table: "documents", column: "text", row: id }
}

pub fn patient_ref_field(id: Uuid) -> Field {
    Field { table: "documents", column: "patient_ref", row: id }
}

pub fn annotations_field(id: Uuid) -> Field {
    Field { table: "document_results", column: "annotations", row: id }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Queued,
    Processing,
    Done,
    Failed,
}

impl Status {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "queued" => Some(Self::Queued),
            "processing" => Some(Self::Processing),
            "done" => Some(Self::Done),
            "failed" => Some(Self::Failed),
            _ => None,
        }
    }
}

#[derive(Debug)]
pub struct NewDocument {
    pub id: Uuid,
    pub patient_ref_ct: Vec<u8>,
    pub text_ct: Vec<u8>,
    pub source_ref: Option<String>,
    pub document_date: Option<Date>,
    pub uploaded_by: Uuid,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Inserted {
    New,
    /// A document with this `source_ref` exists already: its id.
    DuplicateSourceRef(Uuid),
}

pub async fn insert(conn: &mut PgConnection, doc: &NewDocument) -> Result<Inserted, sqlx::Error> {
    let inserted = sqlx::query_scalar!(
        r#"INSERT INTO documents (id, patient_ref_ct, text_ct, source_ref, document_date, uploaded_by)
           VALUES ($1, $2, $3, $4, $5, $6)
           ON CONFLICT (source_ref) DO NOTHING
           RETURNING id"#,
        doc.id,
        doc.patient_ref_ct,
        doc.text_ct,
        doc.source_ref,
        doc.document_date,
        doc.uploaded_by,
    )
    .fetch_optional(&mut *conn)
    .await?;
    if inserted.is_some() {
        return Ok(Inserted::New);
    }
    let existing = sqlx::query_scalar!("SELECT id FROM documents WHERE source_ref = $1", doc.source_ref)
        .fetch_one(&mut *conn)
        .await?;
    Ok(Inserted::DuplicateSourceRef(existing))
}

/// Removes a document whose hand-off to the queue failed, so the client's
/// retry starts clean.
pub async fn delete(db: impl PgExecutor<'_>, id: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query!("DELETE FROM documents WHERE id = $1", id).execute(db).await?;
    Ok(())
}

#[derive(Debug)]
pub struct DocumentRow {
    pub id: Uuid,
    pub status: String,
    pub patient_ref_ct: Vec<u8>,
    pub source_ref: Option<String>,
    pub document_date: Option<Date>,
    pub created_at: OffsetDateTime,
    pub failure_code: Option<String>,
}

pub async fn get(db: impl PgExecutor<'_>, id: Uuid) -> Result<Option<DocumentRow>, sqlx::Error> {
    sqlx::query_as!(
        DocumentRow,
        "SELECT id, status, patient_ref_ct, source_ref, document_date, created_at, failure_code
         FROM documents WHERE id = $1",
        id
    )
    .fetch_optional(db)
    .await
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

#[derive(Debug)]
pub enum Claim {
    /// The document is now `processing`; here is its encrypted text.
    Claimed { text_ct: Vec<u8>, attempts: i32 },
    /// A redelivered job for a document that is finished already.
    Finished,
    /// No such document (deleted after a failed hand-off, or a bad id).
    Missing,
}

/// Marks a queued (or interrupted) document as processing.
pub async fn claim(conn: &mut PgConnection, id: Uuid) -> Result<Claim, sqlx::Error> {
    let claimed = sqlx::query!(
        "UPDATE documents SET status = 'processing', attempts = attempts + 1, updated_at = now()
         WHERE id = $1 AND status IN ('queued', 'processing')
         RETURNING text_ct, attempts",
        id
    )
    .fetch_optional(&mut *conn)
    .await?;
    if let Some(row) = claimed {
        return Ok(Claim::Claimed { text_ct: row.text_ct, attempts: row.attempts });
    }
    let exists =
        sqlx::query_scalar!("SELECT 1 AS one FROM documents WHERE id = $1", id).fetch_optional(&mut *conn).await?;
    Ok(if exists.is_some() { Claim::Finished } else { Claim::Missing })
}

/// Stores a result and marks the document done. Run it in the transaction
/// whose commit precedes the ack.
pub async fn store_result(
    conn: &mut PgConnection,
    id: Uuid,
    model_version: &str,
    annotations_ct: &[u8],
    annotation_count: i32,
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "INSERT INTO document_results (document_id, model_version, annotations_ct, annotation_count)
         VALUES ($1, $2, $3, $4)
         ON CONFLICT (document_id, model_version) DO NOTHING",
        id,
        model_version,
        annotations_ct,
        annotation_count,
    )
    .execute(&mut *conn)
    .await?;
    sqlx::query!("UPDATE documents SET status = 'done', failure_code = NULL, updated_at = now() WHERE id = $1", id)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Marks a document failed with a machine-readable code.
pub async fn mark_failed(db: impl PgExecutor<'_>, id: Uuid, code: &str) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "UPDATE documents SET status = 'failed', failure_code = $2, updated_at = now() WHERE id = $1",
        id,
        code
    )
    .execute(db)
    .await?;
    Ok(())
}
