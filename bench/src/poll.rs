//! Waiting for a condition, polled.

use std::time::{Duration, Instant};

/// Polls `probe` every `every` until it returns `Some`, or `deadline` passes.
pub async fn wait_for<T, F, Fut>(deadline: Duration, every: Duration, mut probe: F) -> anyhow::Result<Option<T>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let until = Instant::now() + deadline;
    loop {
        if let Some(v) = probe().await? {
            return Ok(Some(v));
        }
        if Instant::now() >= until {
            return Ok(None);
        }
        tokio::time::sleep(every).await;
    }
}
