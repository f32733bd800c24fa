//! The upload hand-off through the outbox: a committed upload is processed
//! whatever happens to the broker or to the api process that accepted it.

use std::process::Stdio;
use std::time::{Duration, Instant};

use base64::Engine as _;
use clinflow::testing;
use clinflow_api::users::Role;
use serde_json::{Value, json};

use crate::common::{PASSWORD, Stack};

/// A `clinflow-api` process on the stack's database and queue prefix.
struct ApiProcess {
    child: tokio::process::Child,
    base: String,
    http: reqwest::Client,
}

impl ApiProcess {
    async fn spawn(stack: &Stack, amqp_url: &str, extra_env: &[(&str, &str)]) -> Self {
        let free = testing::free_addr;
        let (api_addr, metrics_addr) = (free(), free());
        let b64 = base64::engine::general_purpose::STANDARD;
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_clinflow-api"))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("DATABASE_URL", stack.db.url_as(testing::API_ROLE))
            .env("AMQP_URL", amqp_url)
            .env("CLINFLOW_QUEUE_PREFIX", stack.topology.prefix())
            .envs(testing::audit_keys().env("api"))
            .env("CLINFLOW_MASTER_KEY", b64.encode(testing::master_key()))
            .env("JWT_SECRET", "another test jwt secret, long enough!!")
            .env("CLINFLOW_INDEX_KEY", "test index key of the api process, long enough")
            .env("API_ADDR", &api_addr)
            .env("METRICS_ADDR", &metrics_addr)
            .env("RUST_LOG", "warn")
            .envs(extra_env.iter().copied())
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let this = Self { child, base: format!("http://{api_addr}"), http: clinflow::testing::http() };
        let deadline = Instant::now() + Duration::from_secs(20);
        while this.http.get(format!("{}/healthz", this.base)).send().await.is_err() {
            assert!(Instant::now() < deadline, "the api process did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        this
    }

    async fn call(&self, path: &str, token: Option<&str>, body: Option<&Value>) -> (u16, Value) {
        let mut req = match body {
            Some(b) => self.http.post(format!("{}{path}", self.base)).json(b),
            None => self.http.get(format!("{}{path}", self.base)),
        };
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.unwrap();
        (resp.status().as_u16(), resp.json().await.unwrap_or(Value::Null))
    }
}

#[tokio::test]
async fn uploads_accepted_while_the_broker_is_away_survive_a_kill_9_and_are_processed() {
    let mut stack = Stack::start_without_relay().await;
    stack.user("ing", Role::Ingest).await;
    // RabbitMQ unreachable (nothing listens on port 1) for this api process.
    let mut api = ApiProcess::spawn(&stack, &testing::unreachable_amqp_url(), &[]).await;
    // Ready (uploads and reads need only PostgreSQL), with the broker shown down.
    let (status, ready) = api.call("/readyz", None, None).await;
    assert_eq!((status, ready["postgres"].as_str(), ready["rabbitmq"].as_str()), (200, Some("up"), Some("down")));
    assert_eq!(api.call("/healthz", None, None).await.0, 200, "alive: the relay keeps trying");

    let (status, login) =
        api.call("/v1/auth/login", None, Some(&json!({"username": "ing", "password": PASSWORD}))).await;
    assert_eq!(status, 200, "{login}");
    let token = login["access_token"].as_str().unwrap().to_owned();
    let mut ids = Vec::new();
    for i in 0..5 {
        let doc = json!({"patient_ref": format!("PAT-{i}"), "text": "Known AF, started on metformin."});
        let (status, body) = api.call("/v1/documents", Some(&token), Some(&doc)).await;
        assert_eq!(status, 202, "{body}");
        ids.push(body["id"].as_str().unwrap().to_owned());
    }

    // kill -9: whatever the process held in memory is gone; what it committed is not.
    api.child.start_kill().unwrap();
    api.child.wait().await.unwrap();
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE topic = 'documents.live'")
        .fetch_one(&stack.db.owner)
        .await
        .unwrap();
    assert_eq!(jobs, 5, "every accepted upload has its job in the outbox");
    assert_eq!(stack.queue_depth(&stack.topology.documents_live().queue).await, 0, "nothing was published");

    // Any other relay (here the in-process api's) publishes what the dead one committed.
    stack.start_relay();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let done: i64 = sqlx::query_scalar("SELECT count(*) FROM documents WHERE status = 'done'")
            .fetch_one(&stack.db.owner)
            .await
            .unwrap();
        if done == 5 {
            break;
        }
        assert!(Instant::now() < deadline, "{done} of 5 documents done");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // 1 login, 5 uploads, 5 reads by the worker.
    assert_eq!(stack.wait_for_audit_rows(11).await, 11);
    let uploads: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_events WHERE action = 'document.upload' AND actor_name = 'ing' AND resource_id = ANY($1)",
    )
    .bind(&ids)
    .fetch_one(&stack.db.owner)
    .await
    .unwrap();
    assert_eq!(uploads, 5);
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox").fetch_one(&stack.db.owner).await.unwrap();
    assert_eq!(left, 0);
    stack.stop().await;
}

#[tokio::test]
async fn uploads_are_throttled_with_retry_after_while_the_outbox_is_over_its_limit() {
    let stack = Stack::start_without_relay().await;
    stack.user("ing", Role::Ingest).await;
    // The broker is away, so the outbox only grows; its limit is 5 rows.
    let api = ApiProcess::spawn(&stack, &testing::unreachable_amqp_url(), &[("UPLOAD_MAX_OUTBOX", "5")]).await;
    let (_, login) = api.call("/v1/auth/login", None, Some(&json!({"username": "ing", "password": PASSWORD}))).await;
    let token = login["access_token"].as_str().unwrap().to_owned();
    let doc = json!({"patient_ref": "PAT-1", "text": "Known AF."});
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut accepted = 0;
    let throttled = loop {
        let resp =
            api.http.post(format!("{}/v1/documents", api.base)).bearer_auth(&token).json(&doc).send().await.unwrap();
        match resp.status().as_u16() {
            202 => accepted += 1,
            429 => break resp,
            other => panic!("unexpected {other}"),
        }
        assert!(Instant::now() < deadline, "never throttled after {accepted} uploads");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(accepted >= 3, "uploads were accepted until the outbox passed its limit: {accepted}");
    assert_eq!(throttled.headers().get("retry-after").and_then(|v| v.to_str().ok()), Some("2"));
    let body: Value = throttled.json().await.unwrap();
    assert_eq!(body["error"]["code"], "busy");
    let outbox: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE topic = 'documents.live'")
        .fetch_one(&stack.db.owner)
        .await
        .unwrap();
    assert_eq!(outbox, accepted, "a throttled upload stores nothing");
    stack.stop().await;
}
