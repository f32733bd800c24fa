//! The api process's metrics port: `/healthz`, `/readyz` (PostgreSQL) and
//! `/metrics`, where requests are counted by route template and status
//! class, never by path.

use std::process::Stdio;
use std::time::Duration;

use base64::Engine as _;
use clinflow::testing::{self, TestDb, wait_until};

#[tokio::test]
async fn the_metrics_port_answers_healthz_readyz_and_metrics_by_route_and_status_class() {
    let db = TestDb::new().await;
    let (topology, _amqp) = testing::topology().await;
    let free = clinflow::testing::free_addr;
    let (api_addr, metrics_addr) = (free(), free());
    let _api = tokio::process::Command::new(env!("CARGO_BIN_EXE_clinflow-api"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", db.url_as(testing::API_ROLE))
        .env("AMQP_URL", testing::amqp_url_string())
        .env("CLINFLOW_QUEUE_PREFIX", topology.prefix())
        .envs(testing::audit_keys().env("api"))
        .env("CLINFLOW_MASTER_KEY", base64::engine::general_purpose::STANDARD.encode(testing::master_key()))
        .env("JWT_SECRET", "the health test's jwt secret, long enough!!")
        .env("CLINFLOW_INDEX_KEY", "the health test's index key, long enough!!")
        .env("API_ADDR", &api_addr)
        .env("METRICS_ADDR", &metrics_addr)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let http = clinflow::testing::http();
    let ops = format!("http://{metrics_addr}");

    wait_until("the api ready on its metrics port", Duration::from_secs(30), async || {
        http.get(format!("{ops}/readyz")).send().await.is_ok_and(|r| r.status() == 200)
    })
    .await;
    let ready: serde_json::Value = http.get(format!("{ops}/readyz")).send().await.unwrap().json().await.unwrap();
    assert_eq!(ready["checks"], serde_json::json!({"postgres": "up"}));
    assert_eq!(http.get(format!("{ops}/healthz")).send().await.unwrap().status(), 200);

    // A read without a token: 401, counted under the route's template.
    let id = uuid::Uuid::now_v7();
    let refused = http.get(format!("http://{api_addr}/v1/documents/{id}")).send().await.unwrap();
    assert_eq!(refused.status(), 401);
    let text = http.get(format!("{ops}/metrics")).send().await.unwrap().text().await.unwrap();
    let counted = r#"clinflow_http_requests_total{method="GET",route="/v1/documents/{id}",status_class="4xx"} 1"#;
    assert!(text.lines().any(|l| l == counted), "{counted} missing from:\n{text}");
    assert!(text.contains("# TYPE clinflow_http_request_seconds histogram"), "{text}");
    for series in [
        r#"clinflow_uploads_total{via="single",outcome="accepted"} 0"#,
        r#"clinflow_uploads_total{via="batch",outcome="rejected"} 0"#,
        "clinflow_outbox_backlog 0",
    ] {
        assert!(text.lines().any(|l| l == series), "{series} missing from:\n{text}");
    }
    assert!(!text.contains(&id.to_string()), "an id in the metrics");
}
