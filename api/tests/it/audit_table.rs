use std::time::Duration;

use clinflow::amqp::Publisher;
use clinflow::audit::{Action, Actor, AuditEvent, Outcome};
use clinflow::link::LinkState;
use clinflow::testing::{API_ROLE, AUDIT_READER_ROLE, SINK_ROLE, TestDb, WORKER_ROLE};
use clinflow_api::users::Role;
use clinflow_audit_sink::Sink;
use clinflow_audit_sink::chain::{self, ChainError};
use serde_json::json;
use sqlx::Connection;
use uuid::Uuid;

use crate::common::{Stack, audit_trust, wait_until};

fn event(n: u32) -> AuditEvent {
    AuditEvent::new(Action::DocumentRead, Actor::service("clinflow-api"), Outcome::Success)
        .document(Uuid::now_v7())
        .reason(&format!("r{n}"))
}

/// The events as the api signs them.
fn signed(events: &[AuditEvent]) -> Vec<clinflow::audit::SignedEvent> {
    events.iter().map(|e| clinflow::testing::audit_keys().api.sign(e).unwrap()).collect()
}

/// The error code of a statement that must fail for lack of privilege.
async fn refused(conn: &mut sqlx::PgConnection, sql: &'static str) -> String {
    let err = sqlx::query(sql).execute(&mut *conn).await.expect_err(sql);
    err.as_database_error().and_then(|e| e.code()).map(|c| c.into_owned()).unwrap_or_default()
}

#[tokio::test]
async fn each_service_role_has_only_its_own_privileges() {
    let db = TestDb::new().await;
    let (sink, trust) = (&clinflow::testing::audit_keys().sink, audit_trust());
    assert_eq!(chain::append(&db.sink, sink, &signed(&[event(1), event(2), event(3)])).await.unwrap(), 3);

    // No service role may change or unprotect the audit table.
    for role in [API_ROLE, WORKER_ROLE, SINK_ROLE, AUDIT_READER_ROLE] {
        let mut conn = db.connection_as(role).await;
        for sql in [
            "UPDATE audit_events SET outcome = 'denied' WHERE seq = 2",
            "UPDATE audit_events SET outcome = 'denied' WHERE false",
            "DELETE FROM audit_events WHERE seq = 2",
            "TRUNCATE audit_events",
            "ALTER TABLE audit_events DISABLE TRIGGER audit_events_append_only",
            "DROP TRIGGER audit_events_append_only ON audit_events",
            "SET session_replication_role = replica",
        ] {
            assert_eq!(refused(&mut conn, sql).await, "42501", "{role}: {sql}"); // insufficient_privilege
        }
        // Even after that attempt, deleting stays refused.
        assert_eq!(refused(&mut conn, "DELETE FROM audit_events").await, "42501", "{role}");
        conn.close().await.unwrap();
    }
    // The api and the worker cannot touch it at all: they publish events.
    for role in [API_ROLE, WORKER_ROLE] {
        let mut conn = db.connection_as(role).await;
        assert_eq!(refused(&mut conn, "SELECT count(*) FROM audit_events").await, "42501", "{role}");
        assert_eq!(
            refused(&mut conn, "INSERT INTO audit_events (seq) VALUES (99)").await,
            "42501",
            "{role} may not append"
        );
        conn.close().await.unwrap();
    }
    // The reader only reads.
    let mut reader = db.connection_as(AUDIT_READER_ROLE).await;
    assert_eq!(refused(&mut reader, "INSERT INTO audit_events (seq) VALUES (99)").await, "42501");
    assert_eq!(refused(&mut reader, "SELECT count(*) FROM documents").await, "42501");
    // The worker writes neither users nor sessions, nor anything of the api's.
    let mut worker = db.connection_as(WORKER_ROLE).await;
    for sql in [
        "UPDATE users SET role = 'admin'",
        "INSERT INTO users (id, username, password_hash, role) VALUES (gen_random_uuid(), 'x', 'x', 'admin')",
        "UPDATE sessions SET revoked_at = NULL",
        "SELECT count(*) FROM sessions",
        "INSERT INTO outbox (topic, message_id, body) VALUES ('audit', 'x', '')",
        "DELETE FROM documents",
    ] {
        assert_eq!(refused(&mut worker, sql).await, "42501", "worker: {sql}");
    }
    // The sink touches nothing but the audit table.
    let mut sink = db.connection_as(SINK_ROLE).await;
    for sql in ["SELECT count(*) FROM documents", "SELECT count(*) FROM users", "SELECT count(*) FROM outbox"] {
        assert_eq!(refused(&mut sink, sql).await, "42501", "sink: {sql}");
    }
    // The api cannot delete documents or results.
    let mut api = db.connection_as(API_ROLE).await;
    for sql in [
        "DELETE FROM documents",
        "DELETE FROM document_results",
        "INSERT INTO document_results (document_id) VALUES (gen_random_uuid())",
    ] {
        assert_eq!(refused(&mut api, sql).await, "42501", "api: {sql}");
    }
    // No service role owns a table.
    let owned: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_tables WHERE schemaname = 'public' AND tableowner LIKE 'clinflow%'",
    )
    .fetch_one(&db.owner)
    .await
    .unwrap();
    assert_eq!(owned, 0);

    // Even the owner (a superuser here) is stopped by the triggers, loudly.
    for sql in [
        "UPDATE audit_events SET outcome = 'denied' WHERE seq = 2",
        "UPDATE audit_events SET outcome = 'denied' WHERE false",
        "DELETE FROM audit_events",
        "TRUNCATE audit_events",
    ] {
        let err = sqlx::query(sql).execute(&db.owner).await.expect_err(sql);
        assert!(err.to_string().contains("append-only"), "{sql}: {err}");
    }
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_events").fetch_one(&db.owner).await.unwrap();
    assert_eq!(rows, 3);
    assert_eq!(chain::verify(&db.audit_reader, &trust).await.unwrap(), 3);
    for conn in [reader, worker, sink, api] {
        conn.close().await.unwrap();
    }
    db.drop_database().await;
}

#[tokio::test]
async fn the_hash_chain_detects_tampering_and_ignores_redelivery() {
    let db = TestDb::new().await;
    let (sink, trust) = (&clinflow::testing::audit_keys().sink, audit_trust());
    let first = signed(&[event(1), event(2), event(3)]);
    chain::append(&db.sink, sink, &first).await.unwrap();
    // A redelivered batch adds nothing; a new event continues the chain.
    let fourth = signed(&[event(4)]).remove(0);
    assert_eq!(chain::append(&db.sink, sink, &[first[1].clone(), fourth.clone(), fourth]).await.unwrap(), 1);
    assert_eq!(chain::append(&db.sink, sink, &signed(&[event(5)])).await.unwrap(), 1);
    assert_eq!(chain::verify(&db.sink, &trust).await.unwrap(), 5);

    // Someone with the owner's rights switches the trigger off and edits a row.
    let mut owner = db.owner.acquire().await.unwrap();
    let mut tx = owner.begin().await.unwrap();
    // The statement trigger and the row triggers cloned onto each month.
    sqlx::query("ALTER TABLE audit_events DISABLE TRIGGER USER").execute(&mut *tx).await.unwrap();
    sqlx::query("UPDATE audit_events SET outcome = 'denied' WHERE seq = 3").execute(&mut *tx).await.unwrap();
    for trigger in ["audit_events_append_only", "audit_events_append_only_rows"] {
        sqlx::query(sqlx::AssertSqlSafe(format!("ALTER TABLE audit_events ENABLE ALWAYS TRIGGER {trigger}")))
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    match chain::verify(&db.sink, &trust).await {
        Err(ChainError::Broken { seq: 3, .. }) => {}
        other => panic!("tampering not detected at seq 3: {other:?}"),
    }
    drop(owner);
    db.drop_database().await;
}

#[tokio::test]
async fn two_sinks_at_once_write_one_unbroken_chain_with_every_event_once() {
    let stack = Stack::start().await;
    // A second sink on the same queue and table, beside the stack's own.
    let second = Sink {
        db: stack.db.sink.clone(),
        signer: clinflow::testing::audit_keys().sink.clone(),
        keys: clinflow::testing::audit_keys().public(),
        topology: stack.topology.clone(),
        batch_size: 16,
        max_wait: Duration::from_millis(5),
        checkpoints: None,
    };
    let (url, shutdown) = (clinflow::testing::amqp_url(), stack.shutdown.clone());
    let second = tokio::spawn(async move { second.run(&url, &LinkState::default(), shutdown).await });
    let publisher = Publisher::new(&stack.amqp).await.unwrap();
    let events: Vec<AuditEvent> = (0..2_000).map(event).collect();
    let api = &clinflow::testing::audit_keys().api;
    for chunk in events.chunks(100) {
        clinflow::audit::publish_many(&publisher, &stack.topology, api, chunk).await.unwrap();
    }
    // Redelivery and a repeated publish add nothing.
    clinflow::audit::publish_many(&publisher, &stack.topology, api, &events[..100]).await.unwrap();
    wait_until("every event stored", Duration::from_secs(60), async || {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM audit_events").fetch_one(&stack.db.owner).await.unwrap()
            >= 2_000
    })
    .await;
    assert_eq!(stack.wait_for_audit_rows(2_000).await, 2_000);
    let distinct: i64 = sqlx::query_scalar("SELECT count(DISTINCT event_id) FROM audit_events")
        .fetch_one(&stack.db.owner)
        .await
        .unwrap();
    assert_eq!(distinct, 2_000);
    assert_eq!(chain::verify(&stack.db.sink, &audit_trust()).await.unwrap(), 2_000);
    stack.stop().await;
    second.await.unwrap().unwrap();
}

#[tokio::test]
async fn n_reads_of_a_document_are_n_read_events() {
    let stack = Stack::start().await;
    stack.user("loader", Role::Ingest).await;
    stack.user("doctor", Role::Clinician).await;
    stack.care_team("doctor", &["PAT-1"]).await;
    let (loader, doctor) = (stack.login("loader").await, stack.login("doctor").await);
    let (status, up) =
        stack.post("/v1/documents", Some(&loader), &json!({"patient_ref": "PAT-1", "text": "Known AF."})).await;
    assert_eq!(status, 202);
    let id = up["id"].as_str().unwrap().to_owned();
    crate::common::wait_for_all_done(&stack, std::slice::from_ref(&id)).await;
    for _ in 0..7 {
        assert_eq!(stack.get(&format!("/v1/documents/{id}"), Some(&doctor)).await.0, 200);
    }
    // Status reads are not PHI reads: not audited.
    assert_eq!(stack.get(&format!("/v1/documents/{id}/status"), Some(&loader)).await.0, 200);
    // 2 logins, 1 upload, 1 worker read, 7 clinician reads.
    assert_eq!(stack.wait_for_audit_rows(11).await, 11);
    let reads: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_events WHERE action = 'document.read' AND resource_id = $1 AND actor_name = 'doctor'",
    )
    .bind(&id)
    .fetch_one(&stack.db.owner)
    .await
    .unwrap();
    assert_eq!(reads, 7);
    stack.stop().await;
}
