//! What the key runs share: what they run with, their audit event, in their
//! transaction, and reading and writing back the ciphertexts they seal again.

use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::{KeyError, Keys};
use crate::audit::{AuditEvent, Operator};
use crate::outbox;

/// What a resumable key run works with: the schema owner's pool, the keys,
/// the operator each batch is audited as, and how many rows a batch (one
/// transaction) takes.
#[derive(Clone, Copy)]
pub struct Batches<'a> {
    pub db: &'a PgPool,
    pub keys: &'a Keys,
    pub operator: &'a Operator,
    pub size: i64,
}

pub(super) async fn audit(conn: &mut PgConnection, operator: &Operator, event: AuditEvent) -> Result<(), KeyError> {
    let message = outbox::Message::audit(&operator.signer, &event)
        .map_err(|e| KeyError::Database(sqlx::Error::Encode(Box::new(e))))?;
    outbox::enqueue(conn, &[message]).await?;
    Ok(())
}

/// A result's sealed annotations, to be sealed again.
pub(super) struct SealedResult {
    pub(super) document_id: Uuid,
    pub(super) model_version: String,
    pub(super) annotations_ct: Vec<u8>,
}

/// The results of these documents, locked until the transaction ends.
pub(super) async fn results_for_update(conn: &mut PgConnection, ids: &[Uuid]) -> Result<Vec<SealedResult>, KeyError> {
    Ok(sqlx::query_as!(
        SealedResult,
        "SELECT document_id, model_version, annotations_ct FROM document_results
         WHERE document_id = ANY($1) FOR UPDATE",
        ids
    )
    .fetch_all(conn)
    .await?)
}

pub(super) async fn store_results(
    conn: &mut PgConnection,
    docs: &[Uuid],
    models: &[String],
    sealed: &[Vec<u8>],
) -> Result<(), KeyError> {
    sqlx::query!(
        "UPDATE document_results r SET annotations_ct = u.ct
         FROM UNNEST($1::uuid[], $2::text[], $3::bytea[]) AS u(id, model, ct)
         WHERE r.document_id = u.id AND r.model_version = u.model",
        docs,
        models,
        sealed,
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// The documents' texts, sealed anew (`document_texts`).
pub(super) async fn store_texts(conn: &mut PgConnection, ids: &[Uuid], texts: &[Vec<u8>]) -> Result<(), KeyError> {
    sqlx::query!(
        "UPDATE document_texts t SET text_ct = u.t
         FROM UNNEST($1::uuid[], $2::bytea[]) AS u(id, t) WHERE t.document_id = u.id",
        ids,
        texts,
    )
    .execute(conn)
    .await?;
    Ok(())
}

pub(super) async fn store_reasons(conn: &mut PgConnection, ids: &[Uuid], sealed: &[Vec<u8>]) -> Result<(), KeyError> {
    sqlx::query!(
        "UPDATE break_glass_grants g SET reason_ct = u.ct
         FROM UNNEST($1::uuid[], $2::bytea[]) AS u(id, ct) WHERE g.id = u.id",
        ids,
        sealed,
    )
    .execute(conn)
    .await?;
    Ok(())
}
