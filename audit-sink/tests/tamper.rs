//! Tampering with the audit table as a superuser (the trigger switched off
//! for the edit), each case reported by verify, with public keys only, at
//! the right seq: a flipped byte, a deleted middle row, two rows swapped,
//! the chain recomputed under other keys, a row deleted and the chain's
//! hashes recomputed, the newest rows deleted mid-batch (the last row is no
//! signed head) and at a batch's end (caught only with the external
//! checkpoints).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use clinflow::audit::{Action, Actor, AuditEvent, Outcome};
use clinflow::audit::{SignedEvent, Signer};
use clinflow::testing::TestDb;
use clinflow::testing::audit_keys;
use clinflow_audit_sink::chain::{self, ChainError, Trust};
use clinflow_audit_sink::checkpoint::{self, CheckpointConfig, Checkpointer};
use sqlx::Connection;
use uuid::Uuid;

/// What an auditor holds: the public keys.
fn trust() -> Trust {
    audit_keys().trust()
}

/// `n` events of the worker, signed by `signer` (the worker's own, or a forger's).
fn events(n: u32, signer: &Signer) -> Vec<SignedEvent> {
    (1..=n)
        .map(|i| {
            let event = AuditEvent::new(Action::DocumentProcess, Actor::service("clinflow-worker"), Outcome::Success)
                .document(Uuid::now_v7())
                .reason(&format!("r{i}"));
            signer.sign(&event).unwrap()
        })
        .collect()
}

/// Ten rows, and a checkpoint file vouching for all ten.
async fn chain_of_ten() -> (TestDb, tempfile::TempDir, std::path::PathBuf) {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("checkpoints.jsonl");
    let mut checkpointer =
        Checkpointer::new(CheckpointConfig { path: path.clone(), every_events: 5, every: Duration::from_secs(3600) });
    for batch in events(10, &audit_keys().worker).chunks(5) {
        let written = chain::append(&db.sink, &audit_keys().sink, batch).await.unwrap();
        assert!(checkpointer.after_batch(&db.sink, &audit_keys().sink, written).await.unwrap().is_some());
    }
    (db, dir, path)
}

/// Runs `sql` as the owner with the append-only trigger switched off.
async fn tamper(db: &TestDb, sql: &'static str) {
    let mut owner = db.owner.acquire().await.unwrap();
    let mut tx = owner.begin().await.unwrap();
    // The statement trigger and the row triggers cloned onto each month.
    sqlx::query("ALTER TABLE audit_events DISABLE TRIGGER USER").execute(&mut *tx).await.unwrap();
    sqlx::query(sql).execute(&mut *tx).await.unwrap();
    for trigger in ["audit_events_append_only", "audit_events_append_only_rows"] {
        sqlx::query(sqlx::AssertSqlSafe(format!("ALTER TABLE audit_events ENABLE ALWAYS TRIGGER {trigger}")))
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
}

/// verify, then the checkpoints: the seq reported, or the rows if intact.
async fn verify_all(db: &TestDb, path: &std::path::Path) -> Result<i64, ChainError> {
    let rows = chain::verify(&db.sink, &trust()).await?;
    let checkpoints = checkpoint::read(path, &trust())?;
    checkpoint::check(&db.sink, rows, &checkpoints).await?;
    Ok(rows)
}

fn broken_at(result: Result<i64, ChainError>) -> (i64, String) {
    match result {
        Err(ChainError::Broken { seq, problem }) => (seq, problem.to_owned()),
        other => panic!("tampering not detected: {other:?}"),
    }
}

#[tokio::test]
async fn an_intact_chain_and_its_checkpoints_verify() {
    let (db, _dir, path) = chain_of_ten().await;
    assert_eq!(verify_all(&db, &path).await.unwrap(), 10);
    let read = checkpoint::read(&path, &trust()).unwrap();
    assert_eq!(read.iter().map(|c| c.seq).collect::<Vec<_>>(), [5, 10]);
    db.drop_database().await;
}

#[tokio::test]
async fn a_flipped_byte_is_reported_at_its_row() {
    let (db, _dir, path) = chain_of_ten().await;
    tamper(&db, "UPDATE audit_events SET reason = 'R5' WHERE seq = 5").await;
    let (seq, problem) = broken_at(verify_all(&db, &path).await);
    assert_eq!(seq, 5, "{problem}");
    assert!(problem.contains("signature does not hold"), "{problem}");
    db.drop_database().await;
}

#[tokio::test]
async fn a_deleted_middle_row_is_reported_as_missing() {
    let (db, _dir, path) = chain_of_ten().await;
    tamper(&db, "DELETE FROM audit_events WHERE seq = 6").await;
    let (seq, problem) = broken_at(verify_all(&db, &path).await);
    assert_eq!(seq, 6, "{problem}");
    assert!(problem.contains("missing"), "{problem}");
    db.drop_database().await;
}

#[tokio::test]
async fn two_swapped_rows_are_reported_at_the_first() {
    let (db, _dir, path) = chain_of_ten().await;
    tamper(&db, "UPDATE audit_events SET seq = CASE seq WHEN 3 THEN 1004 ELSE 1003 END WHERE seq IN (3, 4)").await;
    tamper(&db, "UPDATE audit_events SET seq = seq - 1000 WHERE seq > 1000").await;
    let (seq, problem) = broken_at(verify_all(&db, &path).await);
    assert_eq!(seq, 3, "{problem}");
    db.drop_database().await;
}

#[tokio::test]
async fn a_chain_rewritten_under_other_keys_fails_at_its_first_row() {
    let (db, _dir, path) = chain_of_ten().await;
    // The forger rewrites every row (one reason changed) and rebuilds a
    // consistent chain, with a producer key and a sink key of their own.
    let (producer, sink) = (Signer::generate("worker"), Signer::generate("audit-sink"));
    let mut forged = events(10, &producer);
    forged[6] = producer.sign(&forged[6].event.clone().reason("forged")).unwrap();
    tamper(&db, "DELETE FROM audit_events").await;
    chain::append(&db.sink, &sink, &forged).await.unwrap();
    let theirs = Trust::new(clinflow::audit::signing::PublicKeys::of(&[&producer, &sink]));
    assert_eq!(chain::verify(&db.sink, &theirs).await.unwrap(), 10, "consistent under the forger's keys");
    let (seq, problem) = broken_at(verify_all(&db, &path).await);
    assert_eq!(seq, 1, "{problem}");
    db.drop_database().await;
}

#[tokio::test]
async fn a_row_deleted_and_the_hashes_recomputed_fails_at_the_sinks_signature() {
    let (db, _dir, path) = chain_of_ten().await;
    // Every event keeps its genuine signature; the forger drops one and
    // rebuilds the (keyless) hashes, but must sign the head with a key of
    // their own.
    let genuine = stored_events(&db).await;
    let without_sixth: Vec<SignedEvent> =
        genuine.into_iter().enumerate().filter(|(i, _)| *i != 5).map(|(_, e)| e).collect();
    tamper(&db, "DELETE FROM audit_events").await;
    chain::append(&db.sink, &Signer::generate("audit-sink"), &without_sixth).await.unwrap();
    let (seq, problem) = broken_at(chain::verify(&db.sink, &trust()).await);
    assert_eq!(seq, 9, "{problem}");
    assert!(problem.contains("sink's signature"), "{problem}");
    // The checkpoints, signed by the genuine sink, disagree as well.
    assert!(verify_all(&db, &path).await.is_err());
    db.drop_database().await;
}

/// event_id, occurred_at, resource_id, reason, key_id, signature (base64).
type StoredRow = (Uuid, time::OffsetDateTime, Option<String>, String, String, Option<String>);

/// The stored events with their signatures, in seq order.
async fn stored_events(db: &TestDb) -> Vec<SignedEvent> {
    let rows: Vec<StoredRow> = sqlx::query_as(
        "SELECT event_id, occurred_at, resource_id, reason, key_id, encode(signature, 'base64') FROM audit_events ORDER BY seq",
    )
    .fetch_all(&db.owner)
    .await
    .unwrap();
    rows.into_iter()
        .map(|(event_id, occurred_at, resource_id, reason, key_id, signature)| {
            let mut event = AuditEvent::new(Action::DocumentProcess, Actor::service("clinflow-worker"), Outcome::Success)
                .reason(&reason);
            event.event_id = event_id;
            event.occurred_at = occurred_at;
            event.resource = resource_id.map(|id| clinflow::audit::Resource { kind: "document".into(), id });
            let body = serde_json::json!({"event": event, "key_id": key_id, "signature": signature.unwrap().replace('\n', "")});
            serde_json::from_value(body).unwrap()
        })
        .collect()
}

#[tokio::test]
async fn a_forged_checkpoint_line_is_refused() {
    let (db, _dir, path) = chain_of_ten().await;
    let text = std::fs::read_to_string(&path).unwrap();
    let forged = text.replacen("\"seq\":10", "\"seq\":11", 1);
    assert_ne!(forged, text);
    std::fs::write(&path, forged).unwrap();
    match verify_all(&db, &path).await {
        Err(ChainError::Checkpoint(message)) => assert!(message.contains("line 2"), "{message}"),
        other => panic!("forged checkpoint accepted: {other:?}"),
    }
    db.drop_database().await;
}
