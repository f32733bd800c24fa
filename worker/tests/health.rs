//! The worker process's metrics port: `/healthz`, `/readyz` (PostgreSQL,
//! RabbitMQ, MedCAT) and `/metrics`, with MedCAT going away and coming back
//! (through a proxy that can answer 503 to everything).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::Stdio;
use std::time::Duration;

use base64::Engine as _;
use clinflow::testing::{self, wait_until};
use reqwest::StatusCode;
use support::{Setup, fault_proxy};

fn spawn_worker(setup: &Setup, medcat_url: &str, metrics: &str) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_clinflow-worker"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", setup.db.url_as(testing::WORKER_ROLE))
        .env("AMQP_URL", testing::amqp_url_string())
        .envs(testing::medcat_env(medcat_url))
        .envs(clinflow::testing::audit_keys().env("worker"))
        .env("CLINFLOW_MASTER_KEY", base64::engine::general_purpose::STANDARD.encode(testing::master_key()))
        .env("CLINFLOW_QUEUE_PREFIX", setup.topology.prefix())
        .env("METRICS_ADDR", metrics)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

async fn get(http: &reqwest::Client, url: &str) -> Option<(StatusCode, String)> {
    let resp = http.get(url).send().await.ok()?;
    Some((resp.status(), resp.text().await.ok()?))
}

#[tokio::test]
async fn the_metrics_port_answers_healthz_readyz_and_metrics_and_readyz_follows_medcat() {
    let setup = Setup::new().await;
    let proxy = fault_proxy(0, StatusCode::SERVICE_UNAVAILABLE).await;
    let metrics = clinflow::testing::free_addr();
    let _worker = spawn_worker(&setup, &proxy.url, &metrics);
    let http = clinflow::testing::http();
    let base = format!("http://{metrics}");

    wait_until("the worker ready", Duration::from_secs(30), async || {
        get(&http, &format!("{base}/readyz")).await.is_some_and(|(s, _)| s == StatusCode::OK)
    })
    .await;
    let (status, body) = get(&http, &format!("{base}/readyz")).await.unwrap();
    let ready: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(ready["checks"], serde_json::json!({"postgres": "up", "rabbitmq": "up", "medcat": "up"}));
    assert_eq!(get(&http, &format!("{base}/healthz")).await.unwrap().0, StatusCode::OK);

    let (status, text) = get(&http, &format!("{base}/metrics")).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    for series in [
        "clinflow_medcat_ready 1",
        "clinflow_worker_paused 0",
        "clinflow_worker_batches_in_flight 0",
        "clinflow_worker_documents_total{outcome=\"done\"} 0",
        "clinflow_worker_dead_lettered_total{reason=\"retries_exhausted\"} 0",
        "clinflow_medcat_retries_total 0",
    ] {
        assert!(text.lines().any(|l| l == series), "{series} missing from:\n{text}");
    }

    // MedCAT answers 503 to everything: the worker is alive but not ready.
    proxy.set_down(true);
    wait_until("readyz to report MedCAT down", Duration::from_secs(20), async || {
        get(&http, &format!("{base}/readyz")).await.is_some_and(|(s, b)| {
            s == StatusCode::SERVICE_UNAVAILABLE && b.contains(r#""medcat":"down""#) && b.contains(r#""postgres":"up""#)
        })
    })
    .await;
    assert_eq!(get(&http, &format!("{base}/healthz")).await.unwrap().0, StatusCode::OK);
    let (_, text) = get(&http, &format!("{base}/metrics")).await.unwrap();
    assert!(text.lines().any(|l| l == "clinflow_medcat_ready 0"), "{text}");

    proxy.set_down(false);
    wait_until("ready again once MedCAT is back", Duration::from_secs(20), async || {
        get(&http, &format!("{base}/readyz")).await.is_some_and(|(s, _)| s == StatusCode::OK)
    })
    .await;
}

#[tokio::test]
async fn documents_processed_show_as_real_histograms_of_upload_to_done_and_medcat_calls() {
    let setup = Setup::new().await;
    let metrics = clinflow::testing::free_addr();
    let _worker = spawn_worker(&setup, &testing::medcat_url(), &metrics);
    let notes = ["Known AF, started on metformin.", "Type 2 diabetes; hypertension."];
    let ids = setup.enqueue(&testing::keys(), &notes).await;
    let finals = setup.wait_final(&ids).await;
    assert!(finals.iter().all(|(status, _, results)| status == "done" && *results == 1), "{finals:?}");

    let http = clinflow::testing::http();
    let url = format!("http://{metrics}/metrics");
    // The counters move after the commit; the scrape may come first.
    wait_until("two documents counted done", Duration::from_secs(10), async || {
        get(&http, &url)
            .await
            .is_some_and(|(_, t)| t.lines().any(|l| l == "clinflow_worker_documents_total{outcome=\"done\"} 2"))
    })
    .await;
    let (_, text) = get(&http, &url).await.unwrap();
    // Buckets, not quantiles: histogram_quantile works on these.
    assert!(text.contains("# TYPE clinflow_worker_upload_to_done_seconds histogram"), "{text}");
    assert!(text.contains("clinflow_worker_upload_to_done_seconds_count{lane=\"live\"} 2"), "{text}");
    assert!(text.contains("clinflow_worker_upload_to_done_seconds_bucket{lane=\"live\",le=\"+Inf\"} 2"), "{text}");
    assert!(text.contains("# TYPE clinflow_medcat_request_seconds histogram"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("clinflow_medcat_request_seconds_count{endpoint=\"process_bulk\",outcome=\"ok\"}")),
        "{text}"
    );
    assert!(text.contains("# TYPE clinflow_worker_batch_size histogram"), "{text}");
    // No id of any kind in a label.
    for id in &ids {
        assert!(!text.contains(&id.to_string()), "a document id in the metrics");
    }
}
