use std::time::Duration;

use clinflow::amqp::Publisher;
use clinflow::audit::{Action, Actor, AuditEvent, Outcome};
use clinflow::link::LinkState;
use clinflow::testing::TestDb;
use clinflow_api::users::Role;
use clinflow_audit_sink::Sink;
use clinflow_audit_sink::chain::{self, ChainError};
use serde_json::json;
use sqlx::Connection;
use uuid::Uuid;

use crate::common::{Stack, audit_key, wait_until};

fn event(n: u32) -> AuditEvent {
    AuditEvent::new(Action::DocumentRead, Actor::service("test"), Outcome::Success)
        .document(Uuid::now_v7())
        .reason(&format!("r{n}"))
}

#[tokio::test]
async fn the_application_role_cannot_change_the_audit_table() {
    let db = TestDb::new().await;
    let key = audit_key();
    assert_eq!(chain::append(&db.app, &key, &[event(1), event(2), event(3)]).await.unwrap(), 3);

    let mut app = db.app_connection().await;
    for sql in [
        "UPDATE audit_events SET outcome = 'denied' WHERE seq = 2",
        "UPDATE audit_events SET outcome = 'denied' WHERE false",
        "DELETE FROM audit_events WHERE seq = 2",
        "TRUNCATE audit_events",
    ] {
        let err = sqlx::query(sql).execute(&mut app).await.expect_err(sql);
        let code = err.as_database_error().and_then(|e| e.code()).map(|c| c.into_owned());
        assert_eq!(code.as_deref(), Some("42501"), "{sql}: {err}"); // insufficient_privilege
    }
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
    assert_eq!(chain::verify(&db.app, &key).await.unwrap(), 3);
    app.close().await.unwrap();
    db.drop_database().await;
}

#[tokio::test]
async fn the_hash_chain_detects_tampering_and_ignores_redelivery() {
    let db = TestDb::new().await;
    let key = audit_key();
    let first = [event(1), event(2), event(3)];
    chain::append(&db.app, &key, &first).await.unwrap();
    // A redelivered batch adds nothing; a new event continues the chain.
    assert_eq!(chain::append(&db.app, &key, &[first[1].clone(), event(4), event(4)]).await.unwrap(), 2);
    assert_eq!(chain::verify(&db.app, &key).await.unwrap(), 5);

    // Someone with the owner's rights switches the trigger off and edits a row.
    let mut owner = db.owner.acquire().await.unwrap();
    let mut tx = owner.begin().await.unwrap();
    sqlx::query("ALTER TABLE audit_events DISABLE TRIGGER audit_events_append_only").execute(&mut *tx).await.unwrap();
    sqlx::query("UPDATE audit_events SET outcome = 'denied' WHERE seq = 3").execute(&mut *tx).await.unwrap();
    sqlx::query("ALTER TABLE audit_events ENABLE ALWAYS TRIGGER audit_events_append_only")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    match chain::verify(&db.app, &key).await {
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
        db: stack.db.app.clone(),
        key: audit_key(),
        topology: stack.topology.clone(),
        batch_size: 16,
        max_wait: Duration::from_millis(5),
        checkpoints: None,
    };
    let (url, shutdown) = (clinflow::testing::amqp_url(), stack.shutdown.clone());
    let second = tokio::spawn(async move { second.run(&url, &LinkState::default(), shutdown).await });
    let publisher = Publisher::new(&stack.amqp).await.unwrap();
    let events: Vec<AuditEvent> = (0..2_000).map(event).collect();
    for chunk in events.chunks(100) {
        clinflow::audit::publish_many(&publisher, &stack.topology, chunk).await.unwrap();
    }
    // Redelivery and a repeated publish add nothing.
    clinflow::audit::publish_many(&publisher, &stack.topology, &events[..100]).await.unwrap();
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
    assert_eq!(chain::verify(&stack.db.app, &audit_key()).await.unwrap(), 2_000);
    stack.stop().await;
    second.await.unwrap().unwrap();
}

#[tokio::test]
async fn n_reads_of_a_document_are_n_read_events() {
    let stack = Stack::start().await;
    stack.user("loader", Role::Ingest).await;
    stack.user("doctor", Role::Clinician).await;
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
