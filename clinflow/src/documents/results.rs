//! The worker's side of the documents table: claiming a batch, storing its
//! results (and their concept index) or failures.

use sqlx::{PgConnection, PgExecutor};
use time::{Date, OffsetDateTime};
use uuid::Uuid;

/// Marks the queued (or interrupted) documents among `ids` as processing,
/// in one statement, and returns their encrypted texts. Ids that are not
/// returned are finished already (a redelivered job) or do not exist.
pub async fn claim_many(db: impl PgExecutor<'_>, ids: &[Uuid]) -> Result<Vec<(Uuid, Vec<u8>)>, sqlx::Error> {
    let rows = sqlx::query!(
        "WITH claimed AS (
             UPDATE documents SET status = 'processing', attempts = attempts + 1, updated_at = now()
             WHERE id = ANY($1) AND status IN ('queued', 'processing')
             RETURNING id
         )
         SELECT c.id, t.text_ct FROM claimed c JOIN document_texts t ON t.document_id = c.id",
        ids
    )
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().map(|r| (r.id, r.text_ct)).collect())
}

/// What storing a result needs to know of its document.
#[derive(Debug)]
pub struct ResultTarget {
    pub id: Uuid,
    /// None: a format-1 document from before envelope keys.
    pub data_key_id: Option<Uuid>,
    /// None: a document from before blind indexes (it gets no concept rows).
    pub patient_index: Option<Vec<u8>>,
    /// Its own date, if it has one, and its upload time (both go into its
    /// concept rows).
    pub document_date: Option<Date>,
    pub created_at: OffsetDateTime,
    pub status: String,
    /// The model version of the result it currently shows.
    pub result_model: Option<String>,
}

/// The documents of `ids`, locked FOR SHARE so that a concurrent `keys
/// reencrypt` of their patient waits for the caller's transaction (results
/// sealed under a key it is replacing would be lost) and nothing changes
/// their status or current result meanwhile.
pub async fn result_targets(conn: &mut PgConnection, ids: &[Uuid]) -> Result<Vec<ResultTarget>, sqlx::Error> {
    sqlx::query_as!(
        ResultTarget,
        r#"SELECT id, data_key_id, patient_index, document_date, created_at, status, result_model
           FROM documents WHERE id = ANY($1) FOR SHARE"#,
        ids
    )
    .fetch_all(conn)
    .await
}

/// Which of `ids` exist at all (for jobs that claimed nothing: finished
/// documents exist, a job naming none is poison).
pub async fn existing(db: impl PgExecutor<'_>, ids: &[Uuid]) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar!("SELECT id FROM documents WHERE id = ANY($1)", ids).fetch_all(db).await
}

/// The result of one document, sealed, ready to store.
#[derive(Debug)]
pub struct NewResult {
    pub document_id: Uuid,
    pub model_version: String,
    pub annotations_ct: Vec<u8>,
    pub annotation_count: i32,
    /// The concept index rows of this result, and where they go: the
    /// patient's blind index and the model version of the result this one
    /// replaces (see [`crate::concepts::store`]). Only a document moving to
    /// `done` is indexed.
    pub concepts: Vec<crate::concepts::ConceptCount>,
    pub patient_index: Option<Vec<u8>>,
    pub document_date: Option<Date>,
    pub created_at: OffsetDateTime,
    pub replaces: Option<String>,
}

/// Stores results and marks their documents done, set-based. Exactly one
/// result per (document, model version): a redelivered job adds nothing.
/// Status only moves forward: only a `processing` document becomes `done`.
/// Run it in the transaction whose commit precedes the ack. Returns, for
/// each document it moved to `done`, its lane and the seconds since its
/// upload (the database's clock at both ends).
pub async fn store_results(conn: &mut PgConnection, results: &[NewResult]) -> Result<Vec<(String, f64)>, sqlx::Error> {
    if results.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<Uuid> = results.iter().map(|r| r.document_id).collect();
    let models: Vec<String> = results.iter().map(|r| r.model_version.clone()).collect();
    let sealed: Vec<Vec<u8>> = results.iter().map(|r| r.annotations_ct.clone()).collect();
    let counts: Vec<i32> = results.iter().map(|r| r.annotation_count).collect();
    sqlx::query!(
        "INSERT INTO document_results (document_id, model_version, annotations_ct, annotation_count)
         SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::bytea[], $4::int[])
         ON CONFLICT (document_id, model_version) DO NOTHING",
        &ids,
        &models,
        &sealed,
        &counts,
    )
    .execute(&mut *conn)
    .await?;
    let indexed: Vec<crate::concepts::Indexed> = results
        .iter()
        .filter_map(|r| {
            Some(crate::concepts::Indexed {
                document_id: r.document_id,
                patient_index: r.patient_index.as_deref()?,
                document_date: r.document_date,
                created_at: r.created_at,
                model_version: &r.model_version,
                replaces: r.replaces.as_deref(),
                concepts: &r.concepts,
            })
        })
        .collect();
    crate::concepts::store(conn, &indexed).await?;
    let done = sqlx::query!(
        r#"UPDATE documents d SET status = 'done', failure_code = NULL, updated_at = now(), result_model = r.model
           FROM UNNEST($1::uuid[], $2::text[]) AS r(id, model)
           WHERE d.id = r.id AND d.status = 'processing'
           RETURNING d.lane AS "lane!", extract(epoch FROM clock_timestamp() - d.created_at)::float8 AS "waited!""#,
        &ids,
        &models,
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(done.into_iter().map(|r| (r.lane, r.waited)).collect())
}

/// Marks documents failed, each with a machine-readable code (never text
/// from the note). A finished document stays as it is.
pub async fn mark_failed(db: impl PgExecutor<'_>, failures: &[(Uuid, &str)]) -> Result<(), sqlx::Error> {
    if failures.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = failures.iter().map(|f| f.0).collect();
    let codes: Vec<String> = failures.iter().map(|f| f.1.to_owned()).collect();
    sqlx::query!(
        "UPDATE documents d SET status = 'failed', failure_code = f.code, updated_at = now()
         FROM UNNEST($1::uuid[], $2::text[]) AS f(id, code)
         WHERE d.id = f.id AND d.status IN ('queued', 'processing')",
        &ids,
        &codes
    )
    .execute(db)
    .await?;
    Ok(())
}
