//! The audit trail by month: every partition refuses change, however it was
//! made; the sink may create only this month's and next month's; a batch
//! never straddles two months; past months are archived to files that
//! verify offline, dropped only past retention and only once archived, and
//! the chain left in the table still verifies.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use clinflow::audit::{Action, Actor, AuditEvent, Outcome as EventOutcome, SignedEvent};
use clinflow::testing::{self, API_ROLE, AUDIT_READER_ROLE, SINK_ROLE, TestDb, WORKER_ROLE, audit_keys};
use clinflow_audit_sink::archive::{self, Archiver, Outcome};
use clinflow_audit_sink::chain::{self, ChainError};
use clinflow_audit_sink::checkpoint::{self, CheckpointConfig, Checkpointer};
use sqlx::{Connection, PgConnection};
use time::macros::date;
use uuid::Uuid;

/// `n` events of the worker, each disclosing one patient.
fn events(n: u32) -> Vec<SignedEvent> {
    (1..=n)
        .map(|i| {
            let event =
                AuditEvent::new(Action::DocumentProcess, Actor::service("clinflow-worker"), EventOutcome::Success)
                    .document(Uuid::now_v7())
                    .reason(&format!("r{i}"))
                    .patient(&[u8::try_from(i % 7).unwrap(); 32]);
            audit_keys().worker.sign(&event).unwrap()
        })
        .collect()
}

/// The SQLSTATE and message of a statement that must fail.
async fn refused(conn: &mut PgConnection, sql: &str) -> (String, String) {
    let err = sqlx::query(sqlx::AssertSqlSafe(sql.to_owned())).execute(&mut *conn).await.expect_err(sql);
    let db = err.as_database_error().expect(sql);
    (db.code().map(|c| c.into_owned()).unwrap_or_default(), db.message().to_owned())
}

async fn owner(db: &TestDb) -> sqlx::pool::PoolConnection<sqlx::Postgres> {
    db.owner.acquire().await.unwrap()
}

/// A few rows in `partition`'s month (ids only; no chain needed here).
async fn rows_in(conn: &mut PgConnection, at: &str) {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO audit_events (seq, event_id, occurred_at, recorded_at, actor_kind, action, outcome, prev_hash, row_hash)
         SELECT 1000 + g, gen_random_uuid(), now(), '{at}', 'service', 'document.process', 'success', '\\x00', '\\x01'
         FROM generate_series(1, 3) g"
    )))
    .execute(conn)
    .await
    .unwrap();
}

/// UPDATE, DELETE and TRUNCATE named at `partition` itself, as every service
/// role (no privilege on a partition) and as the owner (the triggers).
async fn every_change_refused(db: &TestDb, partition: &str) {
    let changes = [
        format!("UPDATE {partition} SET reason = 'x' WHERE seq = 1001"),
        format!("UPDATE {partition} SET reason = 'x' WHERE false"),
        format!("DELETE FROM {partition} WHERE seq = 1001"),
        format!("DELETE FROM {partition} WHERE false"),
        format!("TRUNCATE {partition}"),
    ];
    for role in [SINK_ROLE, AUDIT_READER_ROLE, API_ROLE, WORKER_ROLE] {
        let mut conn = db.connection_as(role).await;
        for sql in &changes {
            let (code, message) = refused(&mut conn, sql).await;
            assert_eq!(code, "42501", "{role}: {sql}: {message}");
        }
        conn.close().await.unwrap();
    }
    let mut conn = owner(db).await;
    for sql in &changes {
        let (code, message) = refused(&mut conn, sql).await;
        assert_eq!(code, "42501", "owner: {sql}: {message}");
        assert!(message.contains("append-only"), "owner: {sql}: {message}");
    }
    let left: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {partition}")))
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(left, 3, "{partition} kept its rows");
}

#[tokio::test]
async fn a_partition_the_test_creates_refuses_change_as_every_role_and_the_owner() {
    let db = TestDb::new().await;
    let mut conn = owner(&db).await;
    // The way partitions are made: the function the sink's ensure calls.
    let made: String =
        sqlx::query_scalar("SELECT audit_events_create_partition('2031-03-01')").fetch_one(&mut *conn).await.unwrap();
    assert_eq!(made, "audit_events_2031_03");
    rows_in(&mut conn, "2031-03-15 12:00:00+00").await;
    every_change_refused(&db, "audit_events_2031_03").await;

    // A partition made by hand, by the owner: the cloned row triggers refuse
    // UPDATE and DELETE of its rows at once; the sink's next ensure adds
    // the statement trigger (TRUNCATE, and statements that match no row).
    sqlx::query(
        "CREATE TABLE audit_events_by_hand PARTITION OF audit_events
         FOR VALUES FROM ('2032-01-01 00:00:00+00') TO ('2032-02-01 00:00:00+00')",
    )
    .execute(&mut *conn)
    .await
    .unwrap();
    rows_in(&mut conn, "2032-01-10 00:00:00+00").await;
    for sql in ["UPDATE audit_events_by_hand SET reason = 'x'", "DELETE FROM audit_events_by_hand"] {
        let (code, message) = refused(&mut conn, sql).await;
        assert_eq!(code, "42501", "{sql}: {message}");
    }
    archive::create_ahead(&db.sink).await.unwrap();
    every_change_refused(&db, "audit_events_by_hand").await;

    // Through the table, as before.
    for sql in ["UPDATE audit_events SET reason = 'x' WHERE false", "DELETE FROM audit_events", "TRUNCATE audit_events"]
    {
        let (code, message) = refused(&mut conn, sql).await;
        assert_eq!(code, "42501", "{sql}: {message}");
    }
    drop(conn);
    db.drop_database().await;
}

#[tokio::test]
async fn the_sink_creates_this_and_next_month_and_nothing_else() {
    let db = TestDb::new().await;
    let mut sink = db.connection_as(SINK_ROLE).await;
    for sql in [
        "SELECT audit_events_create_partition('2040-01-01')",
        "SELECT audit_events_protect_partition('audit_events_2040_01')",
        "CREATE TABLE audit_events_2040_01 PARTITION OF audit_events FOR VALUES FROM ('2040-01-01') TO ('2040-02-01')",
        "ALTER TABLE audit_events DETACH PARTITION audit_events_2040_01",
        "DROP TABLE audit_archives",
        "SELECT audit_events_drop_partition(current_date, 2555)",
        "UPDATE audit_archives SET dropped_at = now()",
    ] {
        let (code, message) = refused(&mut sink, sql).await;
        assert_eq!(code, "42501", "{sql}: {message}");
    }
    // The migration made this month and the next; a month later, the sink
    // would add the one after. Here: drop next month's as the owner, and
    // the sink's ensure puts it back, with its triggers.
    let this = time::OffsetDateTime::now_utc().date().replace_day(1).unwrap();
    let next = archive::add_months(this, 1);
    let next_name = format!("audit_events_{}", archive::month_name(next).replace('-', "_"));
    let mut conn = owner(&db).await;
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP TABLE {next_name}"))).execute(&mut *conn).await.unwrap();
    assert_eq!(archive::create_ahead(&db.sink).await.unwrap(), 1);
    assert_eq!(archive::create_ahead(&db.sink).await.unwrap(), 0, "only once");
    let months = archive::partitions(&db.sink).await.unwrap();
    assert!(months.contains(&this) && months.contains(&next), "{months:?}");
    let triggers: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_trigger WHERE tgrelid = $1::regclass AND tgenabled = 'A'
           AND tgname IN ('audit_events_append_only', 'audit_events_append_only_rows')",
    )
    .bind(&next_name)
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    assert_eq!(triggers, 2);
    drop(conn);
    db.drop_database().await;
}

#[tokio::test]
async fn a_batch_has_one_recorded_at_and_recorded_at_never_goes_back() {
    let db = TestDb::new().await;
    for batch in events(12).chunks(4) {
        chain::append(&db.sink, &audit_keys().sink, batch).await.unwrap();
    }
    let rows: Vec<(i64, time::OffsetDateTime)> =
        sqlx::query_as("SELECT seq, recorded_at FROM audit_events ORDER BY seq").fetch_all(&db.owner).await.unwrap();
    assert_eq!(rows.len(), 12);
    for batch in rows.chunks(4) {
        assert!(batch.iter().all(|(_, at)| *at == batch[0].1), "one recorded_at per batch: {batch:?}");
    }
    assert!(rows.windows(2).all(|w| w[0].1 <= w[1].1), "{rows:?}");
    assert!(rows[0].1 < rows[4].1 && rows[4].1 < rows[8].1, "each batch its own time: {rows:?}");
    // The disclosures written with them carry the same time.
    let (disclosures, matching): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(e.seq) FROM audit_disclosures d
         LEFT JOIN audit_events e ON e.seq = d.seq AND e.recorded_at = d.recorded_at",
    )
    .fetch_one(&db.owner)
    .await
    .unwrap();
    assert_eq!((disclosures, matching), (12, 12));
    db.drop_database().await;
}

/// Seven rows in three batches: seq 1–3 in January 2018, 4–5 in February
/// 2018 (moved there as the owner, triggers off: a test cannot wait eight
/// years), 6–7 this month; a checkpoint after every batch.
async fn eight_years_of_audit() -> (TestDb, tempfile::TempDir) {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let mut checkpointer = Checkpointer::new(CheckpointConfig {
        path: dir.path().join("checkpoints.jsonl"),
        every_events: 1,
        every: Duration::from_secs(3600),
    });
    let all = events(7);
    for batch in [&all[0..3], &all[3..5], &all[5..7]] {
        let written = chain::append(&db.sink, &audit_keys().sink, batch).await.unwrap();
        checkpointer.after_batch(&db.sink, &audit_keys().sink, written).await.unwrap();
    }
    let mut conn = owner(&db).await;
    let mut tx = (*conn).begin().await.unwrap();
    for sql in [
        "SELECT audit_events_create_partition('2018-01-01')",
        "SELECT audit_events_create_partition('2018-02-01')",
        "ALTER TABLE audit_events DISABLE TRIGGER audit_events_append_only_rows",
        "ALTER TABLE audit_events DISABLE TRIGGER audit_events_append_only",
        "UPDATE audit_events SET recorded_at = '2018-01-20 10:00:00+00' WHERE seq <= 3",
        "UPDATE audit_events SET recorded_at = '2018-02-20 10:00:00+00' WHERE seq IN (4, 5)",
        "ALTER TABLE audit_events ENABLE ALWAYS TRIGGER audit_events_append_only_rows",
        "ALTER TABLE audit_events ENABLE ALWAYS TRIGGER audit_events_append_only",
    ] {
        sqlx::query(sql).execute(&mut *tx).await.unwrap();
    }
    tx.commit().await.unwrap();
    drop(conn);
    (db, dir)
}

fn archiver<'a>(db: &'a TestDb, trust: &'a chain::Trust, dir: &'a Path) -> Archiver<'a> {
    Archiver { db: &db.sink, trust, signer: &audit_keys().sink, dir, checkpoint_file: None }
}

#[tokio::test]
async fn archived_months_verify_offline_and_drop_only_past_retention() {
    let (db, dir) = eight_years_of_audit().await;
    let trust = audit_keys().trust();
    let out = dir.path().join("archive");
    let mut archiver = archiver(&db, &trust, &out);
    let checkpoints = dir.path().join("checkpoints.jsonl");
    archiver.checkpoint_file = Some(&checkpoints);
    let (january, february) = (date!(2018 - 01 - 01), date!(2018 - 02 - 01));

    // Dropping before archiving is refused by the database itself.
    let mut sink = db.connection_as(SINK_ROLE).await;
    let (code, message) = refused(&mut sink, "SELECT audit_events_drop_partition('2018-01-01', 2555)").await;
    assert_eq!(code, "42501", "{message}");
    assert!(message.contains("no archive record"), "{message}");

    assert_eq!(archiver.archive(january).await.unwrap(), Outcome::Archived { rows: 3 });
    assert_eq!(archiver.archive(february).await.unwrap(), Outcome::Archived { rows: 2 });
    assert_eq!(archiver.archive(january).await.unwrap(), Outcome::AlreadyArchived, "a second run changes nothing");

    // Offline: each archive, and the two in order.
    let files = |m| archive::ArchiveFiles::in_dir(&out, m);
    let first = archive::verify(&files(january).rows, &trust, None).unwrap();
    assert_eq!((first.first_seq, first.last.seq, first.rows), (1, 3, 3));
    assert_eq!(first.checkpoints, 2, "the sink's checkpoint at seq 3 and the archive run's");
    let second = archive::verify(&files(february).rows, &trust, Some(&first.last)).unwrap();
    assert_eq!((second.first_seq, second.last.seq), (4, 5));
    assert!(archive::verify(&files(february).rows, &trust, Some(&chain::Head::genesis())).is_err());

    // Retention: never fewer than 2,555 days, never a young month, oldest first.
    for (sql, expected) in [
        ("SELECT audit_events_drop_partition('2018-01-01', 2554)", "at least 2555 days"),
        ("SELECT audit_events_drop_partition('2018-01-01', 4000)", "younger than"),
        ("SELECT audit_events_drop_partition('2018-02-01', 2555)", "not the oldest"),
    ] {
        let (code, message) = refused(&mut sink, sql).await;
        assert_eq!(code, "42501", "{sql}: {message}");
        assert!(message.contains(expected), "{sql}: {message}");
    }
    let this = time::OffsetDateTime::now_utc().date().replace_day(1).unwrap();
    assert!(archiver.drop_month(this, 2555).await.is_err(), "this month is not dropped");
    sink.close().await.unwrap();

    assert_eq!(archiver.drop_month(january, 2555).await.unwrap(), Outcome::Dropped { rows: 3 });
    // Online, the chain now starts after the archived January, and the
    // checkpoints of January are left to its archive.
    assert_eq!(chain::start(&db.audit_reader, &trust).await.unwrap().seq, 3);
    assert_eq!(chain::verify(&db.audit_reader, &trust).await.unwrap(), 7);
    let read = checkpoint::read(&checkpoints, &trust).unwrap();
    checkpoint::check(&db.audit_reader, 7, &read).await.unwrap();
    assert_eq!(archiver.drop_month(february, 2555).await.unwrap(), Outcome::Dropped { rows: 2 });
    assert_eq!(chain::verify(&db.audit_reader, &trust).await.unwrap(), 7);
    db.drop_database().await;
}

#[tokio::test]
async fn a_tampered_archive_or_a_month_dropped_unarchived_is_reported() {
    let (db, dir) = eight_years_of_audit().await;
    let trust = audit_keys().trust();
    let out = dir.path().join("archive");
    let archiver = archiver(&db, &trust, &out);
    let january = date!(2018 - 01 - 01);
    archiver.archive(january).await.unwrap();
    let files = archive::ArchiveFiles::in_dir(&out, january);
    let original = std::fs::read(&files.rows).unwrap();

    // A byte changed: the checksum no longer matches.
    let mut flipped = original.clone();
    let last = flipped.len() - 12;
    flipped[last] ^= 1;
    std::fs::write(&files.rows, &flipped).unwrap();
    let err = archive::verify(&files.rows, &trust, None).unwrap_err().to_string();
    assert!(err.contains("checksum"), "{err}");

    // An event rewritten and the checksum made again: its signature fails.
    let mut text = String::new();
    std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&original[..]), &mut text).unwrap();
    let forged = text.replacen("\"reason\": \"r2\"", "\"reason\": \"forged\"", 1);
    assert_ne!(forged, text);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, forged.as_bytes()).unwrap();
    std::fs::write(&files.rows, gz.finish().unwrap()).unwrap();
    let sum = {
        use sha2::Digest;
        checkpoint::hex(&sha2::Sha256::digest(std::fs::read(&files.rows).unwrap()))
    };
    std::fs::write(&files.checksum, format!("{sum}  audit-2018-01.jsonl.gz\n")).unwrap();
    match archive::verify(&files.rows, &trust, None) {
        Err(archive::ArchiveError::Chain(ChainError::Broken { seq, problem })) => {
            assert_eq!(seq, 2, "{problem}");
            assert!(problem.contains("signature"), "{problem}");
        }
        other => panic!("a forged archive verified: {other:?}"),
    }

    // The last row dropped from the archive: no checkpoint, no signed head.
    let shorter: String = text.lines().take(2).map(|l| format!("{l}\n")).collect();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, shorter.as_bytes()).unwrap();
    std::fs::write(&files.rows, gz.finish().unwrap()).unwrap();
    let sum = {
        use sha2::Digest;
        checkpoint::hex(&sha2::Sha256::digest(std::fs::read(&files.rows).unwrap()))
    };
    std::fs::write(&files.checksum, format!("{sum}  audit-2018-01.jsonl.gz\n")).unwrap();
    assert!(archive::verify(&files.rows, &trust, None).is_err(), "a truncated archive verified");

    // The table: a month dropped by hand, with no archive, breaks verify.
    let mut conn = owner(&db).await;
    sqlx::query("DROP TABLE audit_events_2018_02").execute(&mut *conn).await.unwrap();
    match chain::verify(&db.audit_reader, &trust).await {
        Err(ChainError::Broken { seq, problem }) => assert_eq!(seq, 4, "{problem}"),
        other => panic!("a dropped month went unnoticed: {other:?}"),
    }
    drop(conn);
    db.drop_database().await;
}

/// The commands, as an operator runs them.
async fn sink_command(db: &TestDb, args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_clinflow-audit-sink"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", db.url_as(SINK_ROLE))
        .envs(audit_keys().env("audit-sink"))
        .envs(env.iter().copied())
        .env("RUST_LOG", "error")
        .output()
        .await
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.success(), text)
}

#[tokio::test]
async fn the_archive_command_archives_drops_and_verifies_and_refuses_a_short_retention() {
    let (db, dir) = eight_years_of_audit().await;
    let out = dir.path().join("archive");
    let out_arg = out.display().to_string();
    let metrics = dir.path().join("archive.prom");
    let metrics_arg = metrics.display().to_string();

    let (ok, text) =
        sink_command(&db, &["archive", "--out", &out_arg, "--drop"], &[("AUDIT_LOG_RETENTION_DAYS", "2000")]).await;
    assert!(!ok && text.contains("AUDIT_LOG_RETENTION_DAYS"), "{text}");
    let (ok, text) = sink_command(&db, &["archive", "--out", &out_arg, "--before", "2999-01"], &[]).await;
    assert!(!ok && text.contains("hot window"), "{text}");
    assert!(!out.exists(), "nothing written");

    let (ok, text) = sink_command(
        &db,
        &["archive", "--out", &out_arg, "--before", "2018-03", "--drop", "--metrics-file", &metrics_arg],
        &[],
    )
    .await;
    assert!(ok, "{text}");
    assert!(text.contains("2018-01: Archived { rows: 3 }") && text.contains("2018-02: Dropped { rows: 2 }"), "{text}");
    let prom = std::fs::read_to_string(&metrics).unwrap();
    assert!(prom.contains("clinflow_audit_archive_run_months{outcome=\"archived\"} 2"), "{prom}");
    assert!(prom.contains("clinflow_audit_archive_run_months{outcome=\"dropped\"} 2"), "{prom}");
    assert!(prom.contains("clinflow_audit_archive_run_success 1"), "{prom}");
    let months = archive::partitions(&db.sink).await.unwrap();
    assert!(months.iter().all(|m| m.year() > 2018), "{months:?}");

    let keys = audit_keys().public_dir().display().to_string();
    let (january, february) = (out.join("audit-2018-01.jsonl.gz"), out.join("audit-2018-02.jsonl.gz"));
    let (ok, text) = sink_command(
        &db,
        &[
            "verify",
            "--public-keys",
            &keys,
            "--archive",
            &january.display().to_string(),
            "--archive",
            &february.display().to_string(),
        ],
        &[("DATABASE_URL", "postgres://nowhere.invalid/none")],
    )
    .await;
    assert!(ok, "{text}");
    assert!(text.contains("seq 4..5 (2 events)") && text.contains("follows the archive before it"), "{text}");
    // In the wrong order they do not follow one another.
    let (ok, text) = sink_command(
        &db,
        &[
            "verify",
            "--public-keys",
            &keys,
            "--archive",
            &february.display().to_string(),
            "--archive",
            &january.display().to_string(),
        ],
        &[],
    )
    .await;
    assert!(!ok, "{text}");

    // Online verify, with the two months gone.
    let (ok, text) = sink_command(
        &db,
        &["verify", "--public-keys", &keys],
        &[("AUDIT_READER_DATABASE_URL", &db.url_as(AUDIT_READER_ROLE))],
    )
    .await;
    assert!(ok && text.contains("audit chain intact: 7 events"), "{text}");
    db.drop_database().await;
}

#[tokio::test]
async fn the_migration_carries_an_existing_chain_into_month_partitions() {
    use sqlx::ConnectOptions;
    use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
    // A database migrated to just before the partitions, with a chain in it.
    let admin: PgConnectOptions = testing::admin_url().parse().unwrap();
    let name = format!("clinflow_test_{}", Uuid::new_v4().simple());
    let mut conn = admin.connect().await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut conn).await.unwrap();
    let pool = |role: Option<&str>| {
        let options = admin.clone().database(&name);
        let options = match role {
            Some(role) => options.username(role),
            None => options,
        };
        PgPoolOptions::new().max_connections(2).connect_lazy_with(options)
    };
    let (owner, sink, reader) = (pool(None), pool(Some(SINK_ROLE)), pool(Some(AUDIT_READER_ROLE)));
    clinflow::MIGRATOR.run_to(20261208000009, &owner).await.unwrap();
    let all = events(8);
    for batch in [&all[0..2], &all[2..4], &all[4..6]] {
        chain::append(&sink, &audit_keys().sink, batch).await.unwrap();
    }
    // seq 1–2 in January, 3–4 earlier still (a batch that waited for the
    // lock under now() could), 5–6 now.
    let mut tx = owner.begin().await.unwrap();
    for sql in [
        "ALTER TABLE audit_events DISABLE TRIGGER audit_events_append_only",
        "UPDATE audit_events SET recorded_at = '2026-01-10 10:00:00+00' WHERE seq <= 2",
        "UPDATE audit_events SET recorded_at = '2026-01-05 10:00:00+00' WHERE seq IN (3, 4)",
        "ALTER TABLE audit_events ENABLE ALWAYS TRIGGER audit_events_append_only",
    ] {
        sqlx::query(sql).execute(&mut *tx).await.unwrap();
    }
    tx.commit().await.unwrap();

    clinflow::MIGRATOR.run(&owner).await.unwrap();

    let rows: Vec<(String, i64, time::OffsetDateTime)> =
        sqlx::query_as("SELECT tableoid::regclass::text, seq, recorded_at FROM audit_events ORDER BY seq")
            .fetch_all(&owner)
            .await
            .unwrap();
    assert_eq!(rows.len(), 6);
    assert!(rows[..4].iter().all(|(p, ..)| p == "audit_events_2026_01"), "{rows:?}");
    assert!(rows[2].2 == rows[0].2, "moved up to the batch before it, never down: {rows:?}");
    assert!(rows.windows(2).all(|w| w[0].2 <= w[1].2), "{rows:?}");
    let months = archive::partitions(&sink).await.unwrap();
    assert_eq!(months.first(), Some(&date!(2026 - 01 - 01)), "{months:?}");
    let this = time::OffsetDateTime::now_utc().date().replace_day(1).unwrap();
    assert!(months.contains(&this) && months.contains(&archive::add_months(this, 1)), "{months:?}");
    // The chain holds, the sink goes on appending, the reader reads.
    let trust = audit_keys().trust();
    assert_eq!(chain::verify(&reader, &trust).await.unwrap(), 6);
    chain::append(&sink, &audit_keys().sink, &all[6..8]).await.unwrap();
    assert_eq!(chain::verify(&reader, &trust).await.unwrap(), 8);
    let (code, _) = refused(&mut reader.acquire().await.unwrap(), "DELETE FROM audit_events_2026_01").await;
    assert_eq!(code, "42501");

    for p in [&owner, &sink, &reader] {
        p.close().await;
    }
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE {name} WITH (FORCE)"))).execute(&mut conn).await.unwrap();
}
