//! One cancellation token per process, fired by SIGTERM or ctrl-c; a second
//! signal ends the process at once.

use tokio_util::sync::CancellationToken;

/// Returns a token that is cancelled on the first SIGINT or SIGTERM; the
/// second signal exits the process at once (status 130), for an operator
/// who will not wait for in-flight work.
pub fn on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let fire = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown signal received; finishing in-flight work (a second signal stops at once)");
        fire.cancel();
        wait_for_signal().await;
        tracing::warn!("second shutdown signal: exiting now; unfinished work returns to its queue");
        std::process::exit(130);
    });
    token
}

/// Runs `work` until it ends by itself, or until `grace` after `shutdown`
/// fired, whichever is first. What is still in flight then is abandoned to
/// the broker, which redelivers it.
pub async fn with_grace<T>(
    work: impl Future<Output = T>,
    shutdown: &CancellationToken,
    grace: std::time::Duration,
) -> Option<T> {
    tokio::select! {
        out = work => Some(out),
        () = async { shutdown.cancelled().await; tokio::time::sleep(grace).await } => {
            tracing::warn!(grace_s = grace.as_secs(), "grace period over; leaving in-flight work to be redelivered");
            None
        }
    }
}

#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM; ctrl-c only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}
