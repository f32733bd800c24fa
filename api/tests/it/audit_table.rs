use clinflow::audit::{Action, Actor, AuditEvent, Outcome};
use clinflow::testing::TestDb;
use clinflow_audit_sink::chain::{self, ChainError};
use sqlx::Connection;
use uuid::Uuid;

use crate::common::audit_key;

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
