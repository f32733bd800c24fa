//! `Idempotency-Key` on single uploads: a retry with the same key and the
//! same body gets the first answer (the same document id) and stores
//! nothing new; the same key with another body is refused. Keys and request
//! fingerprints are stored as keyed hashes, never in clear. Keys are kept
//! for a retention period (`IDEMPOTENCY_KEY_HOURS`, default 24) and then
//! purged: a retry later than that is a new request.

use axum::http::HeaderMap;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::error::ApiError;
use crate::state::AppState;
use crate::validate::ValidUpload;

const HEADER: &str = "idempotency-key";
const MAX_KEY_LEN: usize = 255;

/// The header as the OpenAPI description states it (`params(KeyHeader)`);
/// [`Key::from_request`] reads it.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Header)]
#[expect(dead_code, reason = "only its description is used")]
pub(crate) struct KeyHeader {
    /// Makes a retry safe: the same key answers as the first request did
    #[param(rename = "Idempotency-Key", schema_with = key_schema)]
    idempotency_key: Option<String>,
}

/// 1 to [`MAX_KEY_LEN`] visible ASCII characters.
fn key_schema() -> utoipa::openapi::schema::Object {
    use utoipa::openapi::schema::{ObjectBuilder, Type};
    let pattern = format!("^[\\x21-\\x7e]{{1,{MAX_KEY_LEN}}}$");
    ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(Some(1))
        .max_length(Some(MAX_KEY_LEN))
        .pattern(Some(pattern))
        .build()
}

/// A validated key and the fingerprint of the request it came with.
pub(crate) struct Key {
    key_hmac: Vec<u8>,
    request_hmac: Vec<u8>,
}

impl Key {
    /// The request's key, if it sent one; a malformed key is a 422.
    pub(crate) fn from_request(
        state: &AppState,
        headers: &HeaderMap,
        upload: &ValidUpload,
    ) -> Result<Option<Self>, ApiError> {
        let Some(value) = headers.get(HEADER) else { return Ok(None) };
        let key = value
            .to_str()
            .ok()
            .filter(|k| !k.is_empty() && k.len() <= MAX_KEY_LEN && k.bytes().all(|b| b.is_ascii_graphic()))
            .ok_or_else(|| {
                ApiError::invalid(
                    "invalid_idempotency_key",
                    format!("Idempotency-Key must be 1-{MAX_KEY_LEN} visible ASCII characters"),
                )
            })?;
        let mut request = Vec::with_capacity(upload.text.len() + 64);
        for part in [
            upload.patient_ref.as_bytes(),
            upload.text.as_bytes(),
            upload.source_ref.as_deref().unwrap_or("").as_bytes(),
            upload.document_date.map(|d| d.to_string()).unwrap_or_default().as_bytes(),
        ] {
            request.extend_from_slice(&(part.len() as u64).to_be_bytes());
            request.extend_from_slice(part);
        }
        Ok(Some(Self {
            key_hmac: state.index_key.hash("idempotency_keys.key", key.as_bytes()),
            request_hmac: state.index_key.hash("idempotency_keys.request", &request),
        }))
    }

    /// The document of an earlier request with this key, if there was one.
    pub(crate) async fn earlier(&self, conn: &mut PgConnection, user: Uuid) -> Result<Option<Uuid>, ApiError> {
        let row = sqlx::query!(
            "SELECT document_id, request_hmac FROM idempotency_keys WHERE user_id = $1 AND key_hmac = $2",
            user,
            self.key_hmac
        )
        .fetch_optional(conn)
        .await?;
        match row {
            Some(r) if r.request_hmac == self.request_hmac => Ok(Some(r.document_id)),
            // 409, not the draft standard's 422: the request is well formed
            // (the api's 422 means it breaks the OpenAPI description); what
            // refuses it is the state the first request left.
            Some(_) => Err(ApiError::BadRequest {
                status: axum::http::StatusCode::CONFLICT,
                code: "idempotency_key_reused",
                message: "this Idempotency-Key was used for another request".into(),
            }),
            None => Ok(None),
        }
    }

    /// Records the key for `document`, in the upload's transaction; false if
    /// a concurrent request with the same key got there first (its
    /// transaction has committed by then: roll this one back and answer
    /// with [`earlier`](Self::earlier)).
    pub(crate) async fn record(&self, conn: &mut PgConnection, user: Uuid, document: Uuid) -> Result<bool, ApiError> {
        let stored = sqlx::query!(
            "INSERT INTO idempotency_keys (user_id, key_hmac, request_hmac, document_id) VALUES ($1, $2, $3, $4)
             ON CONFLICT (user_id, key_hmac) DO NOTHING",
            user,
            self.key_hmac,
            self.request_hmac,
            document
        )
        .execute(conn)
        .await?;
        Ok(stored.rows_affected() == 1)
    }
}

/// Deletes the keys older than `retention`; returns how many.
pub async fn purge(db: &sqlx::PgPool, retention: std::time::Duration) -> Result<u64, sqlx::Error> {
    let seconds = retention.as_secs_f64();
    let purged =
        sqlx::query!("DELETE FROM idempotency_keys WHERE created_at < now() - make_interval(secs => $1)", seconds)
            .execute(db)
            .await?;
    Ok(purged.rows_affected())
}

/// Purges expired keys now and then every `every`, until `shutdown`.
pub async fn purge_periodically(
    db: sqlx::PgPool,
    retention: std::time::Duration,
    every: std::time::Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    loop {
        match purge(&db, retention).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(purged = n, "expired idempotency keys purged"),
            Err(e) => tracing::warn!(error = %e, "purging expired idempotency keys failed; trying again later"),
        }
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = shutdown.cancelled() => return,
        }
    }
}
