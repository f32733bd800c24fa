//! Putting documents through the pipeline again: after a dead letter is
//! replayed, or a reprocess chosen by date or model.

use sqlx::PgPool;
use time::OffsetDateTime;
use uuid::Uuid;

/// Replay: a dead-lettered document goes back to `queued` unless it is done.
/// Returns the ids moved (or already `queued`).
pub async fn requeue(db: &PgPool, ids: &[Uuid]) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar!(
        "UPDATE documents SET status = 'queued', failure_code = NULL, updated_at = now()
         WHERE id = ANY($1) AND status IN ('queued', 'processing', 'failed')
         RETURNING id",
        ids
    )
    .fetch_all(db)
    .await
}

/// The ids among `ids` whose documents are done.
pub async fn done_among(db: &PgPool, ids: &[Uuid]) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar!("SELECT id FROM documents WHERE id = ANY($1) AND status = 'done'", ids).fetch_all(db).await
}

/// Reprocess: every selected document back to `queued`, done ones
/// included (their earlier results stay; the new model's is added).
pub async fn requeue_any(db: &PgPool, ids: &[Uuid]) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar!(
        "UPDATE documents SET status = 'queued', failure_code = NULL, updated_at = now()
         WHERE id = ANY($1) RETURNING id",
        ids
    )
    .fetch_all(db)
    .await
}

/// Which documents a reprocess puts through the pipeline again.
#[derive(Debug, Clone)]
pub enum Reprocess {
    All,
    /// Uploaded in `[from, to)`.
    UploadedBetween(OffsetDateTime, OffsetDateTime),
    /// Without a result from this model version.
    WithoutResultFrom(String),
}

/// The next `limit` ids after `after` (in id order) that `which` selects.
pub async fn select_for_reprocess(
    db: &PgPool,
    which: &Reprocess,
    after: Uuid,
    limit: i64,
) -> Result<Vec<Uuid>, sqlx::Error> {
    match which {
        Reprocess::All => {
            sqlx::query_scalar!("SELECT id FROM documents WHERE id > $1 ORDER BY id LIMIT $2", after, limit)
                .fetch_all(db)
                .await
        }
        Reprocess::UploadedBetween(from, to) => {
            sqlx::query_scalar!(
                "SELECT id FROM documents WHERE id > $1 AND created_at >= $2 AND created_at < $3 ORDER BY id LIMIT $4",
                after,
                from,
                to,
                limit
            )
            .fetch_all(db)
            .await
        }
        Reprocess::WithoutResultFrom(model) => {
            sqlx::query_scalar!(
                "SELECT d.id FROM documents d
                 WHERE d.id > $1 AND NOT EXISTS
                   (SELECT 1 FROM document_results r WHERE r.document_id = d.id AND r.model_version = $2)
                 ORDER BY d.id LIMIT $3",
                after,
                model,
                limit
            )
            .fetch_all(db)
            .await
        }
    }
}
