//! The sink process's metrics port: `/healthz`, `/readyz` (PostgreSQL,
//! RabbitMQ) and `/metrics`, and its periodic verification: the gauge holds
//! on an intact chain and drops to 0 once a row after the newest checkpoint
//! is rewritten.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Stdio;
use std::time::Duration;

use clinflow::audit::SignedEvent;
use clinflow::audit::{Action, Actor, AuditEvent, Outcome};
use clinflow::testing::{self, TestDb, wait_until};
use clinflow_audit_sink::chain;
use clinflow_audit_sink::checkpoint::{CheckpointConfig, Checkpointer};
use sqlx::Connection;
use uuid::Uuid;

fn events(n: u32) -> Vec<SignedEvent> {
    (1..=n)
        .map(|i| {
            let event = AuditEvent::new(Action::DocumentRead, Actor::service("clinflow-api"), Outcome::Success)
                .document(Uuid::now_v7())
                .reason(&format!("r{i}"));
            testing::audit_keys().api.sign(&event).unwrap()
        })
        .collect()
}

async fn metric(http: &reqwest::Client, url: &str, series: &str) -> Option<f64> {
    let text = http.get(url).send().await.ok()?.text().await.ok()?;
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn the_metrics_port_answers_and_the_periodic_verification_catches_a_rewritten_row() {
    let db = TestDb::new().await;
    let (topology, _amqp) = testing::topology().await;
    let dir = tempfile::tempdir().unwrap();
    let checkpoints = dir.path().join("checkpoints.jsonl");
    // Five rows anchored by a checkpoint, five more after it.
    let mut checkpointer = Checkpointer::new(CheckpointConfig {
        path: checkpoints.clone(),
        every_events: 5,
        every: Duration::from_secs(3600),
    });
    let all = events(10);
    let sink = &testing::audit_keys().sink;
    let written = chain::append(&db.sink, sink, &all[..5]).await.unwrap();
    assert_eq!(checkpointer.after_batch(&db.sink, sink, written).await.unwrap(), Some(5));
    chain::append(&db.sink, sink, &all[5..]).await.unwrap();

    let metrics = clinflow::testing::free_addr();
    let _sink = tokio::process::Command::new(env!("CARGO_BIN_EXE_clinflow-audit-sink"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", db.url_as(testing::SINK_ROLE))
        .env("AMQP_URL", testing::amqp_url_string())
        .envs(testing::audit_keys().env("audit-sink"))
        .env("AUDIT_CHECKPOINT_FILE", &checkpoints)
        .env("AUDIT_VERIFY_SECONDS", "1")
        .env("CLINFLOW_QUEUE_PREFIX", topology.prefix())
        .env("METRICS_ADDR", &metrics)
        .env("RUST_LOG", "error")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let http = clinflow::testing::http();
    let base = format!("http://{metrics}");

    wait_until("the sink ready", Duration::from_secs(30), async || {
        http.get(format!("{base}/readyz")).send().await.is_ok_and(|r| r.status() == 200)
    })
    .await;
    let ready: serde_json::Value = http.get(format!("{base}/readyz")).send().await.unwrap().json().await.unwrap();
    assert_eq!(ready["checks"], serde_json::json!({"postgres": "up", "rabbitmq": "up"}));
    assert_eq!(http.get(format!("{base}/healthz")).send().await.unwrap().status(), 200);

    let url = format!("{base}/metrics");
    wait_until("the chain verified up to seq 10", Duration::from_secs(20), async || {
        metric(&http, &url, "clinflow_audit_verified_seq").await == Some(10.0)
    })
    .await;
    assert_eq!(metric(&http, &url, "clinflow_audit_verify_ok").await, Some(1.0));
    let verified_at = metric(&http, &url, "clinflow_audit_verify_timestamp_seconds").await.unwrap();
    let now = time::OffsetDateTime::now_utc().unix_timestamp() as f64;
    assert!((now - verified_at).abs() < 30.0, "verified at {verified_at}, now {now}");
    // The newest stored event is a few seconds old: the lag says so.
    let lag = metric(&http, &url, "clinflow_audit_lag_seconds").await.unwrap();
    assert!((0.0..60.0).contains(&lag), "lag {lag}");
    assert_eq!(metric(&http, &url, "clinflow_audit_events_written_total").await, Some(0.0));

    // Row 8 rewritten by someone who can switch the trigger off, but
    // without the key: its hash no longer matches its content.
    let mut owner = db.owner.acquire().await.unwrap();
    let mut tx = owner.begin().await.unwrap();
    // The statement trigger and the row triggers cloned onto each month.
    sqlx::query("ALTER TABLE audit_events DISABLE TRIGGER USER").execute(&mut *tx).await.unwrap();
    sqlx::query("UPDATE audit_events SET reason = 'rewritten' WHERE seq = 8").execute(&mut *tx).await.unwrap();
    for trigger in ["audit_events_append_only", "audit_events_append_only_rows"] {
        sqlx::query(sqlx::AssertSqlSafe(format!("ALTER TABLE audit_events ENABLE ALWAYS TRIGGER {trigger}")))
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    wait_until("the periodic verification to fail", Duration::from_secs(20), async || {
        metric(&http, &url, "clinflow_audit_verify_ok").await == Some(0.0)
    })
    .await;
}
