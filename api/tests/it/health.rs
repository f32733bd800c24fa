//! The api process's metrics port: `/healthz`, `/readyz` (PostgreSQL) and
//! `/metrics`, where requests are counted by route template and status
//! class, never by path.

use std::process::Stdio;
use std::time::Duration;

use base64::Engine as _;
use clinflow::testing::{self, TestDb, wait_until};

/// The api binary on `db` and `topology`'s queues, on free ports: the
/// process (killed when dropped), its API address and its metrics address.
fn spawn_api(db: &TestDb, topology: &clinflow::amqp::Topology) -> (tokio::process::Child, String, String) {
    let (api_addr, metrics_addr) = (testing::free_addr(), testing::free_addr());
    let api = tokio::process::Command::new(env!("CARGO_BIN_EXE_clinflow-api"))
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
    (api, api_addr, metrics_addr)
}

#[tokio::test]
async fn the_metrics_port_answers_healthz_readyz_and_metrics_by_route_and_status_class() {
    let db = TestDb::new().await;
    let (topology, _amqp) = testing::topology().await;
    let (_api, api_addr, metrics_addr) = spawn_api(&db, &topology);
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

/// Every export, erasure (asked) and break-glass grant is counted for the
/// privacy officer's alerts (prometheus/rules: ClinflowPatientExported,
/// ClinflowPatientErasure, ClinflowBreakGlassGranted), by event and nothing
/// else: no patient, user or id in the series.
#[tokio::test]
async fn exports_erasures_and_break_glass_grants_are_counted_for_their_alerts() {
    use clinflow_api::users::{self, Passwords, Role};
    let db = TestDb::new().await;
    let (topology, _amqp) = testing::topology().await;
    let (_api, api_addr, metrics_addr) = spawn_api(&db, &topology);
    let passwords = Passwords::new().await.unwrap();
    let password = "a long enough test password";
    for (name, role) in [("loader", Role::Ingest), ("doctor", Role::Clinician), ("privacy", Role::PrivacyOfficer)] {
        users::create(&db.api, &passwords, name, password, role).await.unwrap();
    }
    sqlx::query("UPDATE users SET default_lawful_basis = 'direct_care' WHERE username = 'loader'")
        .execute(&db.owner)
        .await
        .unwrap();
    let http = testing::http();
    let (api, ops) = (format!("http://{api_addr}"), format!("http://{metrics_addr}"));
    wait_until("the api ready", Duration::from_secs(30), async || {
        http.get(format!("{ops}/readyz")).send().await.is_ok_and(|r| r.status() == 200)
    })
    .await;
    let post = async |path: &str, token: Option<&str>, body: serde_json::Value| {
        let mut req = http.post(format!("{api}{path}")).json(&body);
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        let resp = req.send().await.unwrap();
        (resp.status().as_u16(), resp.json::<serde_json::Value>().await.unwrap_or_default())
    };
    let login = async |name: &str| {
        let (status, body) =
            post("/v1/auth/login", None, serde_json::json!({"username": name, "password": password})).await;
        assert_eq!(status, 200, "{body}");
        body["access_token"].as_str().unwrap().to_owned()
    };
    let count = async |event: &str| -> String {
        let text = http.get(format!("{ops}/metrics")).send().await.unwrap().text().await.unwrap();
        let prefix = format!("clinflow_privacy_events_total{{event=\"{event}\"}} ");
        text.lines().find_map(|l| l.strip_prefix(&prefix).map(str::to_owned)).unwrap_or_default()
    };
    assert_eq!(count("export").await, "0", "exported at 0 before the first");

    let (loader, doctor, privacy) = (login("loader").await, login("doctor").await, login("privacy").await);
    let note = serde_json::json!({"patient_ref": "PAT-METRIC", "text": "Known atrial fibrillation."});
    assert_eq!(post("/v1/documents", Some(&loader), note).await.0, 202);
    let case = serde_json::json!({"patient_ref": "PAT-METRIC", "reason": "gdpr_access_request", "case_ref": "DSAR-1"});
    assert_eq!(post("/v1/patients/export", Some(&privacy), case).await.0, 200);
    let erase =
        serde_json::json!({"patient_ref": "PAT-METRIC", "reason": "gdpr_erasure_request", "case_ref": "DSAR-1"});
    assert_eq!(post("/v1/privacy/erasures", Some(&privacy), erase).await.0, 201);
    let glass =
        serde_json::json!({"patient_ref": "PAT-METRIC", "reason": "covering the ward tonight", "password": password});
    assert_eq!(post("/v1/break-glass", Some(&doctor), glass).await.0, 201);
    // A clinician's export (under the grant) counts as well; a refused one
    // (the loader's role) does not.
    let theirs = serde_json::json!({"patient_ref": "PAT-METRIC"});
    assert_eq!(post("/v1/patients/export", Some(&doctor), theirs.clone()).await.0, 200, "under the grant");
    assert_eq!(post("/v1/patients/export", Some(&loader), theirs).await.0, 403);
    for (event, n) in [("export", "2"), ("erasure_request", "1"), ("break_glass", "1"), ("erasure", "0")] {
        assert_eq!(count(event).await, n, "clinflow_privacy_events_total{{event={event:?}}}");
    }
    let text = http.get(format!("{ops}/metrics")).send().await.unwrap().text().await.unwrap();
    for phi in ["PAT-METRIC", "DSAR-1", "doctor", "loader"] {
        assert!(!text.lines().any(|l| l.starts_with("clinflow_privacy") && l.contains(phi)), "{phi} in a series");
    }
}
