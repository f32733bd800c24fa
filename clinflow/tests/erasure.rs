//! A patient's erasure through `clinflow::erasure::erase_patient`, against
//! the real PostgreSQL: every row of the patient goes (documents of both
//! ciphertext formats, results, concept rows, team entries, grants, the data
//! key), the journal holds it, documents erasure could not find make it
//! refuse, every process's key cache drops the key on the commit's NOTIFY,
//! and `reapply` finds the patient again by the data key it names.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use clinflow::audit::{Actor, Operator};
use clinflow::crypto::Field;
use clinflow::documents::{self, NewDocument};
use clinflow::erasure::{self, Counts, Entry, ErasureError, JournalError};
use clinflow::keys::{Keys, PatientRef};
use clinflow::testing::{self, TestDb};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const DEADLINE: Duration = Duration::from_secs(10);

/// What was seeded of one patient.
struct Seeded {
    index: Vec<u8>,
    key: Uuid,
    documents: Vec<Uuid>,
}

fn field(row: Uuid) -> Field {
    Field { table: "test", column: "value", row }
}

async fn user(db: &PgPool) -> Uuid {
    let id = Uuid::now_v7();
    sqlx::query("INSERT INTO users (id, username, password_hash, role) VALUES ($1, $2, 'x', 'clinician')")
        .bind(id)
        .bind(format!("u{}", id.simple()))
        .execute(db)
        .await
        .unwrap();
    id
}

/// A patient with a document under their data key and its result and
/// concept row, a format-1 document (indexed), a care-team entry and a
/// break-glass grant.
async fn seed(db: &PgPool, keys: &Keys, patient: &str, uploader: Uuid) -> Seeded {
    let index = documents::patient_index(&testing::index_key(), patient);
    let mut tx = db.begin().await.unwrap();
    let key = keys.for_patient(&mut tx, PatientRef::new(&index, patient)).await.unwrap();
    let id = Uuid::now_v7();
    let doc = NewDocument {
        id,
        data_key_id: key.id(),
        patient_ref_ct: key.seal_str(documents::patient_ref_field(id), patient).unwrap(),
        patient_index: index.clone(),
        text_ct: key.seal_str(documents::text_field(id), "Known AF, on warfarin.").unwrap(),
        source_ref_hmac: None,
        document_date: None,
        uploaded_by: uploader,
        lawful_basis: "direct_care",
        consent_index: None,
    };
    documents::insert(&mut tx, &doc).await.unwrap();
    sqlx::query(
        "INSERT INTO document_results (document_id, model_version, annotations_ct, annotation_count)
         VALUES ($1, 'm1', $2, 1)",
    )
    .bind(id)
    .bind(key.seal(documents::annotations_field(id), b"[]").unwrap())
    .execute(&mut *tx)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO document_concepts (document_id, model_version, cui, patient_index, mentions, first_offset,
                                        document_date, created_at)
         VALUES ($1, 'm1', '49436004', $2, 1, 6, current_date, now())",
    )
    .bind(id)
    .bind(&index)
    .execute(&mut *tx)
    .await
    .unwrap();
    // Format 1, from before data keys: under the master key itself.
    let old = Uuid::now_v7();
    let ring = keys.keyring();
    sqlx::query(
        "WITH d AS (INSERT INTO documents (id, patient_ref_ct, uploaded_by, patient_index, lawful_basis)
                    VALUES ($1, $2, $4, $5, 'direct_care') RETURNING id)
         INSERT INTO document_texts (document_id, text_ct) SELECT id, $3 FROM d",
    )
    .bind(old)
    .bind(ring.seal_v1(documents::patient_ref_field(old), patient.as_bytes()).unwrap())
    .bind(ring.seal_v1(documents::text_field(old), b"Hypertension.").unwrap())
    .bind(uploader)
    .bind(&index)
    .execute(&mut *tx)
    .await
    .unwrap();
    let team = Uuid::now_v7();
    sqlx::query("INSERT INTO care_teams (id, name) VALUES ($1, $2)")
        .bind(team)
        .bind(format!("team {team}"))
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("INSERT INTO care_team_patients (team_id, patient_index) VALUES ($1, $2)")
        .bind(team)
        .bind(&index)
        .execute(&mut *tx)
        .await
        .unwrap();
    let grant = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO break_glass_grants (id, user_id, patient_index, reason_ct, expires_at)
         VALUES ($1, $2, $3, $4, now() + interval '1 hour')",
    )
    .bind(grant)
    .bind(uploader)
    .bind(&index)
    .bind(key.seal(clinflow::keys::break_glass_reason_field(grant), b"emergency").unwrap())
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
    Seeded { index, key: key.id(), documents: vec![id, old] }
}

/// Rows that name the patient (by blind index or document id), per table.
async fn rows_of(db: &PgPool, s: &Seeded) -> Vec<i64> {
    let mut counts = Vec::new();
    for table in ["documents", "document_concepts", "care_team_patients", "break_glass_grants", "data_keys"] {
        let n: i64 =
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table} WHERE patient_index = $1")))
                .bind(&s.index)
                .fetch_one(db)
                .await
                .unwrap();
        counts.push(n);
    }
    let results: i64 = sqlx::query_scalar("SELECT count(*) FROM document_results WHERE document_id = ANY($1)")
        .bind(&s.documents)
        .fetch_one(db)
        .await
        .unwrap();
    counts.push(results);
    counts
}

const ALL_GONE: [i64; 6] = [0; 6];
const SEEDED: [i64; 6] = [2, 1, 1, 1, 1, 1];

async fn erase(db: &PgPool, journal: &erasure::Journal, index: &[u8]) -> Result<erasure::Erased, ErasureError> {
    let mut tx = db.begin().await.unwrap();
    let erased = erasure::erase_patient(&mut tx, journal, index, Uuid::now_v7()).await?;
    tx.commit().await.unwrap();
    Ok(erased)
}

#[tokio::test]
async fn erasure_reaches_every_row_of_the_patient_and_is_journalled() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let journal = testing::erasure_journal(dir.path());
    let keys = testing::keys();
    let uploader = user(&db.owner).await;
    let gone = seed(&db.owner, &keys, "PAT-ERASE-A", uploader).await;
    let kept = seed(&db.owner, &keys, "PAT-ERASE-B", uploader).await;
    assert_eq!(rows_of(&db.owner, &gone).await, SEEDED);

    // As the api's role, as the route does.
    let erased = erase(&db.api, &journal, &gone.index).await.unwrap();
    assert_eq!(
        erased.counts,
        Counts { documents: 2, results: 1, concepts: 1, team_entries: 1, grants: 1, data_keys: 1 }
    );
    assert_eq!(erased.data_keys, vec![gone.key]);
    assert_eq!(rows_of(&db.owner, &gone).await, ALL_GONE);
    assert_eq!(rows_of(&db.owner, &kept).await, SEEDED);

    let entries = journal.read_all().unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].index().unwrap(), gone.index);
    assert_eq!(entries[0].data_keys, vec![gone.key]);
    // Nothing left: nothing erased, nothing journalled.
    let again = erase(&db.api, &journal, &gone.index).await.unwrap();
    assert!(again.counts.is_empty() && again.journal_entry.is_none());
    assert_eq!(journal.read_all().unwrap().len(), 1);
    db.drop_database().await;
}

#[tokio::test]
async fn erasure_refuses_while_documents_without_a_patient_index_remain() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let journal = testing::erasure_journal(dir.path());
    let keys = testing::keys();
    let uploader = user(&db.owner).await;
    let patient = seed(&db.owner, &keys, "PAT-ERASE-C", uploader).await;
    // A format-1 document from before the blind index: nothing says whose.
    let orphan = Uuid::now_v7();
    let ring = keys.keyring();
    sqlx::query(
        "WITH d AS (INSERT INTO documents (id, patient_ref_ct, uploaded_by, lawful_basis)
                    VALUES ($1, $2, $4, 'direct_care') RETURNING id)
         INSERT INTO document_texts (document_id, text_ct) SELECT id, $3 FROM d",
    )
    .bind(orphan)
    .bind(ring.seal_v1(documents::patient_ref_field(orphan), b"PAT-ERASE-C").unwrap())
    .bind(ring.seal_v1(documents::text_field(orphan), b"Old note.").unwrap())
    .bind(uploader)
    .execute(&db.owner)
    .await
    .unwrap();

    let refused = erase(&db.api, &journal, &patient.index).await.unwrap_err();
    assert!(matches!(refused, ErasureError::Unindexed), "{refused}");
    assert!(refused.to_string().contains("keys migrate-v1"), "{refused}");
    assert_eq!(rows_of(&db.owner, &patient).await, SEEDED, "nothing erased");
    assert!(journal.read_all().unwrap().is_empty(), "nothing journalled");

    // Once the index is filled (`reindex-patients`), the old row goes too.
    clinflow::keys::reindex::run(&db.owner, &keys, &testing::index_key()).await.unwrap();
    let erased = erase(&db.api, &journal, &patient.index).await.unwrap();
    assert_eq!(erased.counts.documents, 3);
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM documents WHERE id = $1")
        .bind(orphan)
        .fetch_one(&db.owner)
        .await
        .unwrap();
    assert_eq!(left, 0);
    db.drop_database().await;
}

/// Another process's pool: the same role and database, its own connections.
fn own_pool(like: &PgPool) -> PgPool {
    sqlx::postgres::PgPoolOptions::new().max_connections(3).connect_lazy_with((*like.connect_options()).clone())
}

/// Opens `ct` (sealed under `key` for `row`) through `keys`, its cache first.
async fn opens(keys: &Keys, db: &PgPool, row: Uuid, ct: &[u8]) -> bool {
    keys.open(db, field(row), ct).await.is_ok()
}

#[tokio::test]
async fn every_process_drops_an_erased_key_from_its_cache_at_once() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let journal = testing::erasure_journal(dir.path());
    let shutdown = CancellationToken::new();
    let uploader = user(&db.owner).await;
    // Another process: its own keys and pool, listening. A third, not
    // listening, shows what the cache would still serve.
    let other_db = own_pool(&db.api);
    let other = Arc::new(testing::keys());
    clinflow::keys::destroyed::watch_destroyed_keys(&other_db, Arc::clone(&other), shutdown.clone()).await.unwrap();
    let deaf = testing::keys();
    let eraser = testing::keys();
    let patient = seed(&db.owner, &eraser, "PAT-ERASE-D", uploader).await;
    let row = Uuid::now_v7();
    let key = eraser.by_id(&db.owner, &[patient.key]).await.unwrap().remove(&patient.key).unwrap().unwrap();
    let ct = key.seal(field(row), b"a value of the patient").unwrap();
    assert!(opens(&other, &other_db, row, &ct).await && opens(&deaf, &db.api, row, &ct).await);

    erase(&db.api, &journal, &patient.index).await.unwrap();

    // Well within the cache's time limit (5 minutes).
    testing::wait_until("the other process forgets the erased key", DEADLINE, async || {
        !opens(&other, &other_db, row, &ct).await
    })
    .await;
    assert!(opens(&deaf, &db.api, row, &ct).await, "without the notification the cache would still open it");
    shutdown.cancel();
    other_db.close().await;
    db.drop_database().await;
}

#[tokio::test]
async fn a_cache_whose_listener_lost_its_connection_is_emptied_when_it_listens_again() {
    let db = TestDb::new().await;
    let shutdown = CancellationToken::new();
    let pool = own_pool(&db.api);
    let keys = Arc::new(testing::keys());
    clinflow::keys::destroyed::watch_destroyed_keys(&pool, Arc::clone(&keys), shutdown.clone()).await.unwrap();
    let index = documents::patient_index(&testing::index_key(), "PAT-ERASE-E");
    let mut tx = db.owner.begin().await.unwrap();
    let key = keys.for_patient(&mut tx, PatientRef::new(&index, "PAT-ERASE-E")).await.unwrap();
    tx.commit().await.unwrap();
    let row = Uuid::now_v7();
    let ct = key.seal(field(row), b"a value of the patient").unwrap();
    assert!(opens(&keys, &pool, row, &ct).await);
    // Destroyed while no one could hear it: no NOTIFY at all.
    sqlx::query("DELETE FROM data_keys WHERE id = $1").bind(key.id()).execute(&db.owner).await.unwrap();
    assert!(opens(&keys, &pool, row, &ct).await, "still cached");

    let listener = "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND query LIKE 'LISTEN %'";
    let pid: i32 = sqlx::query_scalar(listener).fetch_one(&db.owner).await.unwrap();
    sqlx::query("SELECT pg_terminate_backend($1)").bind(pid).execute(&db.owner).await.unwrap();

    testing::wait_until("the cache is emptied once the listener is back", DEADLINE, async || {
        !opens(&keys, &pool, row, &ct).await
    })
    .await;
    testing::wait_until("a new listening connection", DEADLINE, async || {
        let pids: Vec<i32> = sqlx::query_scalar(listener).fetch_all(&db.owner).await.unwrap();
        pids.iter().any(|p| *p != pid)
    })
    .await;
    shutdown.cancel();
    pool.close().await;
    db.drop_database().await;
}

#[tokio::test]
async fn reapply_finds_the_patient_by_the_erased_data_key_and_refuses_an_altered_journal() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let journal = testing::erasure_journal(dir.path());
    let keys = testing::keys();
    let uploader = user(&db.owner).await;
    // As a copy restored from before the erasure holds the patient; the
    // journal names them under another index key (rotated since).
    let patient = seed(&db.owner, &keys, "PAT-ERASE-F", uploader).await;
    let kept = seed(&db.owner, &keys, "PAT-ERASE-G", uploader).await;
    let rotated = documents::patient_index(&testing::index_key(), "PAT-ERASE-F under another index key");
    let event = Uuid::now_v7();
    let entry = Entry {
        patient_index: clinflow::checkpoint::hex(&rotated),
        data_keys: vec![patient.key],
        erased_at: time::OffsetDateTime::now_utc(),
        audit_event_id: event,
    };
    let path = journal.append(&entry).await.unwrap();
    let operator = Operator { actor: Actor::operator("clinflow-test"), signer: testing::audit_keys().api.clone() };

    // An altered entry: refused, nothing changed.
    let original = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, original.replace(&patient.key.to_string(), &kept.key.to_string())).unwrap();
    let refused = erasure::command::reapply(&db.owner, &journal, &operator).await.unwrap_err();
    assert!(matches!(refused, ErasureError::Journal(JournalError::Tampered { .. })), "{refused}");
    assert_eq!(rows_of(&db.owner, &kept).await, SEEDED);
    assert_eq!(rows_of(&db.owner, &patient).await, SEEDED);

    std::fs::write(&path, original).unwrap();
    let done = erasure::command::reapply(&db.owner, &journal, &operator).await.unwrap();
    assert_eq!((done.entries, done.applied, done.counts.documents, done.counts.concepts), (1, 1, 2, 1));
    assert_eq!(rows_of(&db.owner, &patient).await, ALL_GONE);
    assert_eq!(rows_of(&db.owner, &kept).await, SEEDED);
    // Audited, through the outbox, naming the journal's event.
    let audited: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE convert_from(body, 'UTF8') LIKE $1")
        .bind(format!("%patient.erase.reapply%journal_event:{event}%"))
        .fetch_one(&db.owner)
        .await
        .unwrap();
    assert_eq!(audited, 1);
    // Again: nothing left to find.
    let again = erasure::command::reapply(&db.owner, &journal, &operator).await.unwrap();
    assert_eq!((again.entries, again.applied), (1, 0));
    db.drop_database().await;
}
