//! Destroyed data keys leave every process's cache at once: `erase_patient()`
//! announces the keys it destroyed with NOTIFY (delivered on commit), and
//! each process holding a [`Keys`] listens. A process that lost its
//! listening connection may have missed announcements, so once it listens
//! again it drops its whole cache: keys unwrapped meanwhile are read again
//! from `data_keys`, where a destroyed one is no longer found.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::Keys;

/// The channel `erase_patient()` notifies; the payload is the destroyed
/// keys' ids, comma-separated (ids only, never a patient's index).
pub const DESTROYED_CHANNEL: &str = "clinflow_data_keys_destroyed";

const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MOST: Duration = Duration::from_secs(5);

/// Listens on [`DESTROYED_CHANNEL`] on a connection of `db` and drops each
/// announced key from `keys`' cache until `shutdown`. Returns once it is
/// listening (so a key cached from then on cannot miss its announcement),
/// with the task that goes on listening, reconnecting with backoff.
pub async fn watch_destroyed_keys(
    db: &PgPool,
    keys: Arc<Keys>,
    shutdown: CancellationToken,
) -> Result<JoinHandle<()>, sqlx::Error> {
    let listener = listen(db).await?;
    // Anything cached before the LISTEN could have missed an announcement.
    keys.forget_all();
    let db = db.clone();
    Ok(tokio::spawn(async move {
        tokio::select! {
            () = watch(listener, &db, &keys) => {}
            () = shutdown.cancelled() => {}
        }
    }))
}

async fn listen(db: &PgPool) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(db).await?;
    listener.listen(DESTROYED_CHANNEL).await?;
    Ok(listener)
}

async fn watch(mut listener: PgListener, db: &PgPool, keys: &Keys) {
    loop {
        match listener.try_recv().await {
            Ok(Some(notification)) => forget_announced(keys, notification.payload()),
            // The connection was lost and is back, listening again
            // (sqlx reconnects before it answers None).
            Ok(None) => flush(keys, "reconnected"),
            Err(e) => {
                tracing::warn!(error = %e, "lost the database connection that hears of destroyed data keys");
                flush(keys, "disconnected");
                listener = relisten(db).await;
                flush(keys, "reconnected");
            }
        }
    }
}

/// A new listening connection, retried with backoff until it is had.
async fn relisten(db: &PgPool) -> PgListener {
    let mut delay = RETRY_FIRST;
    loop {
        match listen(db).await {
            Ok(listener) => return listener,
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "cannot listen for destroyed data keys");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(RETRY_MOST);
            }
        }
    }
}

fn forget_announced(keys: &Keys, payload: &str) {
    let ids: Result<Vec<Uuid>, _> = payload.split(',').map(str::parse).collect();
    match ids {
        Ok(ids) => {
            for id in &ids {
                keys.forget(*id);
            }
            metrics::counter!("clinflow_data_keys_forgotten_total").increment(ids.len() as u64);
            tracing::info!(data_keys = ids.len(), "destroyed data keys dropped from the cache");
        }
        // Not ours to read: forgetting everything is always safe.
        Err(_) => flush(keys, "unreadable_announcement"),
    }
}

fn flush(keys: &Keys, why: &'static str) {
    keys.forget_all();
    metrics::counter!("clinflow_key_cache_flushes_total", "reason" => why).increment(1);
    tracing::info!(reason = why, "data key cache emptied");
}
