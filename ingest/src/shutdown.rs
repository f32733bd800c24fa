//! Ctrl-C / SIGTERM: the first one stops taking new records and lets the
//! requests in flight finish (so their results reach the state file); a
//! second Ctrl-C quits at once.

use tokio_util::sync::CancellationToken;

pub fn on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        if !first_signal().await {
            return;
        }
        tracing::warn!("interrupted: finishing the requests in flight (Ctrl-C again quits at once)");
        cancel.cancel();
        if tokio::signal::ctrl_c().await.is_ok() {
            std::process::exit(130);
        }
    });
    token
}

#[cfg(unix)]
async fn first_signal() -> bool {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        return tokio::signal::ctrl_c().await.is_ok();
    };
    tokio::select! {
        result = tokio::signal::ctrl_c() => result.is_ok(),
        _ = term.recv() => true,
    }
}

#[cfg(not(unix))]
async fn first_signal() -> bool {
    tokio::signal::ctrl_c().await.is_ok()
}
