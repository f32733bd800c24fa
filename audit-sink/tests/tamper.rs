//! Tampering with the audit table as a superuser (the trigger switched off
//! for the edit), each case reported by verify at the right seq: a flipped
//! byte, a deleted middle row, two rows swapped, the chain recomputed
//! without the key, and the newest rows deleted (caught only with the
//! external checkpoints).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use clinflow::audit::{Action, Actor, AuditEvent, Outcome};
use clinflow::testing::TestDb;
use clinflow_audit_sink::chain::{self, ChainError, ChainKey};
use clinflow_audit_sink::checkpoint::{self, CheckpointConfig, Checkpointer};
use secrecy::SecretBox;
use sqlx::Connection;
use uuid::Uuid;

fn key() -> ChainKey {
    ChainKey::new(SecretBox::new(Box::new(b"audit chain key of the tamper tests, long enough".to_vec())))
}

fn events(n: u32) -> Vec<AuditEvent> {
    (1..=n)
        .map(|i| {
            AuditEvent::new(Action::DocumentRead, Actor::service("tamper-test"), Outcome::Success)
                .document(Uuid::now_v7())
                .reason(&format!("r{i}"))
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
    for batch in events(10).chunks(5) {
        let written = chain::append(&db.sink, &key(), batch).await.unwrap();
        assert!(checkpointer.after_batch(&db.sink, &key(), written).await.unwrap().is_some());
    }
    (db, dir, path)
}

/// Runs `sql` as the owner with the append-only trigger switched off.
async fn tamper(db: &TestDb, sql: &'static str) {
    let mut owner = db.owner.acquire().await.unwrap();
    let mut tx = owner.begin().await.unwrap();
    sqlx::query("ALTER TABLE audit_events DISABLE TRIGGER audit_events_append_only").execute(&mut *tx).await.unwrap();
    sqlx::query(sql).execute(&mut *tx).await.unwrap();
    sqlx::query("ALTER TABLE audit_events ENABLE ALWAYS TRIGGER audit_events_append_only")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
}

/// verify, then the checkpoints: the seq reported, or the rows if intact.
async fn verify_all(db: &TestDb, path: &std::path::Path) -> Result<i64, ChainError> {
    let rows = chain::verify(&db.sink, &key()).await?;
    let checkpoints = checkpoint::read(path, &key())?;
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
    let read = checkpoint::read(&path, &key()).unwrap();
    assert_eq!(read.iter().map(|c| c.seq).collect::<Vec<_>>(), [5, 10]);
    db.drop_database().await;
}

#[tokio::test]
async fn a_flipped_byte_is_reported_at_its_row() {
    let (db, _dir, path) = chain_of_ten().await;
    tamper(&db, "UPDATE audit_events SET reason = 'R5' WHERE seq = 5").await;
    let (seq, problem) = broken_at(verify_all(&db, &path).await);
    assert_eq!(seq, 5, "{problem}");
    assert!(problem.contains("row_hash"), "{problem}");
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
async fn a_chain_recomputed_without_the_key_fails_at_its_first_row() {
    let (db, _dir, path) = chain_of_ten().await;
    // The forger rewrites every row (one reason changed) and rebuilds a
    // consistent chain, with a key of their own.
    let stored: Vec<AuditEvent> = {
        let mut evs = events(10);
        evs[6] = evs[6].clone().reason("forged");
        evs
    };
    tamper(&db, "DELETE FROM audit_events").await;
    let forger = ChainKey::new(SecretBox::new(Box::new(b"not the key, but long enough anyway".to_vec())));
    chain::append(&db.sink, &forger, &stored).await.unwrap();
    assert_eq!(chain::verify(&db.sink, &forger).await.unwrap(), 10, "consistent under the forger's key");
    let (seq, problem) = broken_at(verify_all(&db, &path).await);
    assert_eq!(seq, 1, "{problem}");
    db.drop_database().await;
}

#[tokio::test]
async fn deleting_the_newest_rows_is_caught_by_the_checkpoints() {
    let (db, _dir, path) = chain_of_ten().await;
    tamper(&db, "DELETE FROM audit_events WHERE seq > 8").await;
    // The chain alone cannot tell: what is left is consistent.
    assert_eq!(chain::verify(&db.sink, &key()).await.unwrap(), 8);
    let (seq, problem) = broken_at(verify_all(&db, &path).await);
    assert_eq!(seq, 9, "{problem}");
    assert!(problem.contains("newest rows were deleted"), "{problem}");
    db.drop_database().await;
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
