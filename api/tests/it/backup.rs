//! scripts/backup and scripts/restore on what the real pipeline made: notes
//! uploaded, annotated by MedCAT and read by a clinician, with their audit
//! events chained by the sink. The backup is restored into a new database,
//! which must hold the same rows byte for byte, decrypt with the master key,
//! keep the grants and the append-only trigger, and pass
//! `clinflow-audit-sink verify` with the sink's checkpoints.

use std::path::{Path, PathBuf};
use std::process::Output;

use clinflow::testing::{self, TestDb};
use clinflow_api::users::Role;
use serde_json::json;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, PgPool};
use uuid::Uuid;

use crate::common::{Stack, wait_for_all_done};

const NOTES: &[&str] = &[
    "Known AF, on warfarin. Type 2 diabetes mellitus on metformin.",
    "Hypertension, well controlled. Started metformin last month.",
    "Chest pain on exertion; history of MI. AF noted on ECG.",
];

fn repo_path(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

async fn run(program: impl AsRef<std::ffi::OsStr>, args: &[&str], envs: &[(&str, &str)]) -> Output {
    let program = program.as_ref().to_owned();
    tokio::process::Command::new(&program).args(args).envs(envs.iter().copied()).output().await.unwrap_or_else(|e| {
        panic!("cannot run {program:?}: {e} (age comes from Debian's `age`; ./dev/test installs it)")
    })
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// The superuser of the test server and a URL for `database` as `role`.
fn url(role: &str, database: &str) -> String {
    let admin: PgConnectOptions = testing::admin_url().parse().unwrap();
    format!("postgres://{role}@{}:{}/{database}", admin.get_host(), admin.get_port())
}

fn superuser() -> String {
    let admin: PgConnectOptions = testing::admin_url().parse().unwrap();
    admin.get_username().to_owned()
}

async fn new_key(dir: &Path) -> PathBuf {
    let key = dir.join("backup.key");
    let out = run("age-keygen", &["-o", key.to_str().unwrap()], &[]).await;
    assert!(out.status.success(), "age-keygen: {}", text(&out));
    key
}

/// The backups in `dir`, oldest first.
fn backups_in(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".dump.age"))
        .collect();
    found.sort();
    found
}

/// Row count and a digest of every row as text (bytea as hex), per table.
async fn fingerprint(db: &PgPool, table: &str) -> (i64, String) {
    sqlx::query_as(AssertSqlSafe(format!(
        "SELECT count(*), md5(coalesce(string_agg(t::text, E'\\n' ORDER BY t::text), '')) FROM {table} t"
    )))
    .fetch_one(db)
    .await
    .unwrap()
}

async fn drop_database(name: &str) {
    let admin: PgConnectOptions = testing::admin_url().parse().unwrap();
    let mut conn = admin.connect().await.unwrap();
    sqlx::query(AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")))
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.ok();
}

#[tokio::test]
async fn a_backup_of_the_pipelines_data_restores_into_a_new_database_with_an_intact_audit_chain() {
    // Arrange: real documents, results and audit events.
    let stack = Stack::start().await;
    stack.user("loader", Role::Ingest).await;
    stack.user("doctor", Role::Clinician).await;
    let loader = stack.login("loader").await;
    let mut ids = Vec::new();
    for (i, note) in NOTES.iter().enumerate() {
        let doc = json!({"patient_ref": format!("PAT-BACKUP-{i}"), "text": note});
        let (status, body) = stack.post("/v1/documents", Some(&loader), &doc).await;
        assert_eq!(status, 202, "{body}");
        ids.push(body["id"].as_str().unwrap().to_owned());
    }
    wait_for_all_done(&stack, &ids).await;
    let patients: Vec<String> = (0..NOTES.len()).map(|i| format!("PAT-BACKUP-{i}")).collect();
    stack.care_team("doctor", &patients.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let doctor = stack.login("doctor").await;
    for id in &ids {
        let (status, body) = stack.get(&format!("/v1/documents/{id}"), Some(&doctor)).await;
        assert_eq!(status, 200, "{body}");
        assert!(!body["annotations"].as_array().unwrap().is_empty(), "MedCAT found concepts: {body}");
    }
    // Two logins, and per note an upload, its processing and a read.
    let events = 2 + 3 * ids.len() as i64;
    assert_eq!(stack.wait_for_audit_rows(events).await, events);
    // The services stop, the database stays: nothing changes under the dump.
    stack.shutdown.cancel();
    stack.worker.await.unwrap().unwrap();
    stack.sink.await.unwrap().unwrap();
    stack.api.await.unwrap().unwrap();
    if let Some(relay) = stack.relay {
        relay.await.unwrap();
    }

    // Act 1: back up.
    let work = tempfile::tempdir().unwrap();
    let key = new_key(work.path()).await;
    let dir = work.path().join("backups");
    let source_url = url(&superuser(), &stack.db.name);
    let backup_args =
        ["--database-url", &source_url, "--out-dir", dir.to_str().unwrap(), "--key", key.to_str().unwrap()];
    let out = run(repo_path("scripts/backup"), &backup_args, &[]).await;
    assert!(out.status.success(), "backup: {}", text(&out));
    assert!(text(&out).contains("verified"), "{}", text(&out));
    let backups = backups_in(&dir);
    assert_eq!(backups.len(), 1);
    let backup = &backups[0];
    // Encrypted at rest: an age file, no trace of pg_dump's archive in it.
    let bytes = std::fs::read(backup).unwrap();
    assert!(bytes.starts_with(b"age-encryption.org/v1"));
    for plain in [&b"PGDMP"[..], b"audit_events", b"document_results", b"clinflow_api"] {
        assert!(!bytes.windows(plain.len()).any(|w| w == plain), "{} in the backup", String::from_utf8_lossy(plain));
    }

    // Act 2: restore into a new database.
    let restored = format!("{}_restored", stack.db.name);
    let target_url = url(&superuser(), &restored);
    let restore_args =
        ["--key", key.to_str().unwrap(), "--target-url", &target_url, "--no-erasure-journal", backup.to_str().unwrap()];
    let out = run(repo_path("scripts/restore"), &restore_args, &[]).await;
    assert!(out.status.success(), "restore: {}", text(&out));
    let summary =
        format!("documents 3, document_results 3, audit_events {events}, users 2; append-only trigger enabled always");
    assert!(text(&out).contains(&summary), "{}", text(&out));

    // Assert: the same rows, byte for byte.
    let copy_options: PgConnectOptions = target_url.parse().unwrap();
    let copy = PgPoolOptions::new().max_connections(2).connect_with(copy_options.clone()).await.unwrap();
    for table in ["documents", "document_texts", "document_results", "audit_events", "users", "_sqlx_migrations"] {
        let (source, restored) = (fingerprint(&stack.db.owner, table).await, fingerprint(&copy, table).await);
        assert_eq!(source, restored, "{table} differs after the restore");
    }
    // ... which the master key still opens: the patients' data keys came
    // back with them (each ciphertext is bound to its row id and data key).
    let keys = testing::keys();
    let rows: Vec<(Uuid, Vec<u8>)> =
        sqlx::query_as("SELECT document_id, text_ct FROM document_texts").fetch_all(&copy).await.unwrap();
    let opener = keys.opener(&copy, rows.iter().map(|(_, ct)| ct.as_slice())).await.unwrap();
    let mut texts: Vec<String> =
        rows.iter().map(|(id, ct)| opener.open_string(clinflow::documents::text_field(*id), ct).unwrap()).collect();
    texts.sort();
    let mut expected: Vec<String> = NOTES.iter().map(|n| (*n).to_owned()).collect();
    expected.sort();
    assert_eq!(texts, expected);

    // Assert: the grants and the append-only trigger came back.
    let as_role = |role: &str| copy_options.clone().username(role);
    let mut api = as_role(testing::API_ROLE).connect().await.unwrap();
    let visible: i64 = sqlx::query_scalar("SELECT count(*) FROM documents").fetch_one(&mut api).await.unwrap();
    assert_eq!(visible, 3);
    let denied = sqlx::query("SELECT count(*) FROM audit_events").fetch_one(&mut api).await.unwrap_err();
    assert!(denied.to_string().contains("permission denied"), "{denied}");
    api.close().await.ok();
    let tampered = sqlx::query("UPDATE audit_events SET reason = 'x' WHERE seq = 1").execute(&copy).await.unwrap_err();
    assert!(tampered.to_string().contains("append-only"), "{tampered}");

    // Assert: clinflow-audit-sink verify, as the audit reader, with the
    // checkpoints the sink wrote while the pipeline ran.
    let verify = Path::new(env!("CARGO_BIN_EXE_clinflow-api")).with_file_name("clinflow-audit-sink");
    assert!(verify.exists(), "{} is not built (cargo build --workspace; ./dev/test builds it)", verify.display());
    // As the services connect: over TLS when the tests do (the admin URL's query).
    let tls = testing::admin_url().split_once('?').map(|(_, q)| format!("?{q}")).unwrap_or_default();
    let reader_url = format!("{}{tls}", url(testing::AUDIT_READER_ROLE, &restored));
    let checkpoints = stack.checkpoints.to_str().unwrap().to_owned();
    let verify_env = [
        ("AUDIT_READER_DATABASE_URL", reader_url.as_str()),
        ("AUDIT_CHECKPOINT_FILE", checkpoints.as_str()),
        ("LOG_FORMAT", "text"),
    ];
    // An auditor's verify: public keys only, no secret in its environment.
    let public = testing::audit_keys().public_dir();
    let out = run(&verify, &["verify", "--public-keys", public.to_str().unwrap()], &verify_env).await;
    assert!(out.status.success(), "verify: {}", text(&out));
    assert!(text(&out).contains(&format!("audit chain intact: {events} events;")), "{}", text(&out));
    // The check has teeth: other public keys (the same ids) break the chain
    // at its first row.
    let others = tempfile::tempdir().unwrap();
    for id in ["api", "worker", "audit-sink"] {
        let pem = clinflow::audit::Signer::generate(id).public_pem().unwrap();
        std::fs::write(others.path().join(format!("{id}.pem")), pem).unwrap();
    }
    let out = run(&verify, &["verify", "--public-keys", others.path().to_str().unwrap()], &verify_env).await;
    assert!(!out.status.success(), "verify passed with the wrong keys: {}", text(&out));
    assert!(text(&out).contains("seq 1"), "{}", text(&out));

    // Act 3: a second restore into the same, now filled, database is refused.
    let out = run(repo_path("scripts/restore"), &restore_args, &[]).await;
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(text(&out).contains("not empty"), "{}", text(&out));
    assert_eq!(fingerprint(&copy, "audit_events").await.0, events);

    copy.close().await;
    drop_database(&restored).await;
    testing::delete_queues(&stack.topology, &stack.amqp).await;
    stack.db.drop_database().await;
}

/// Rows naming the patient of `index`, per table: documents, results,
/// concept rows, care-team entries, data keys.
async fn rows_of(db: &PgPool, index: &[u8]) -> [i64; 5] {
    let mut counts = [0; 5];
    let queries = [
        "SELECT count(*) FROM documents WHERE patient_index = $1",
        "SELECT count(*) FROM document_results r JOIN documents d ON d.id = r.document_id WHERE d.patient_index = $1",
        "SELECT count(*) FROM document_concepts WHERE patient_index = $1",
        "SELECT count(*) FROM care_team_patients WHERE patient_index = $1",
        "SELECT count(*) FROM data_keys WHERE patient_index = $1",
    ];
    for (count, query) in counts.iter_mut().zip(queries) {
        *count = sqlx::query_scalar(query).bind(index).fetch_one(db).await.unwrap();
    }
    counts
}

#[tokio::test]
async fn a_patient_erased_after_a_backup_is_erased_again_when_the_backup_is_restored() {
    // Arrange: two patients through the real pipeline (concept rows by
    // MedCAT), in a care team; a backup holds both.
    let stack = Stack::start().await;
    stack.user("loader", Role::Ingest).await;
    stack.user("doctor", Role::Clinician).await;
    let loader = stack.login("loader").await;
    let mut ids = Vec::new();
    for (patient, note) in [("PAT-GONE", NOTES[0]), ("PAT-GONE", NOTES[1]), ("PAT-KEPT", NOTES[2])] {
        let (status, body) =
            stack.post("/v1/documents", Some(&loader), &json!({"patient_ref": patient, "text": note})).await;
        assert_eq!(status, 202, "{body}");
        ids.push(body["id"].as_str().unwrap().to_owned());
    }
    wait_for_all_done(&stack, &ids).await;
    stack.care_team("doctor", &["PAT-GONE", "PAT-KEPT"]).await;
    let index = |p: &str| clinflow::documents::patient_index(&testing::index_key(), p);
    let (gone, kept) = (index("PAT-GONE"), index("PAT-KEPT"));
    let before = rows_of(&stack.db.owner, &gone).await;
    assert_eq!((before[0], before[1], before[3], before[4]), (2, 2, 1, 1), "{before:?}");
    assert!(before[2] > 0, "MedCAT found concepts: {before:?}");
    let kept_rows = rows_of(&stack.db.owner, &kept).await;

    let work = tempfile::tempdir().unwrap();
    let key = new_key(work.path()).await;
    let dir = work.path().join("backups");
    let source_url = url(&superuser(), &stack.db.name);
    let backup_args =
        ["--database-url", &source_url, "--out-dir", dir.to_str().unwrap(), "--key", key.to_str().unwrap()];
    let out = run(repo_path("scripts/backup"), &backup_args, &[]).await;
    assert!(out.status.success(), "backup: {}", text(&out));
    let backup = backups_in(&dir).pop().unwrap();

    // Act: erase one patient (one privacy officer asks, another approves),
    // then restore the backup taken before it, with the api's erasure
    // journal.
    stack.user("privacy", Role::PrivacyOfficer).await;
    stack.user("privacy2", Role::PrivacyOfficer).await;
    let (privacy, privacy2) = (stack.login("privacy").await, stack.login("privacy2").await);
    let ask = json!({"patient_ref": "PAT-GONE", "reason": "gdpr_erasure_request", "case_ref": "DSAR-1"});
    let (status, pending) = stack.post("/v1/privacy/erasures", Some(&privacy), &ask).await;
    assert_eq!(status, 201, "{pending}");
    let approve = format!("/v1/privacy/erasures/{}/approve", pending["id"].as_str().unwrap());
    let (status, erased) = stack.post(&approve, Some(&privacy2), &json!({})).await;
    assert_eq!(status, 200, "{erased}");
    assert_eq!(rows_of(&stack.db.owner, &gone).await, [0; 5]);
    // The journal lives outside the database, so outside its backups.
    assert_eq!(std::fs::read_dir(&stack.erasure_journal).unwrap().count(), 1);

    let api = env!("CARGO_BIN_EXE_clinflow-api");
    let journal = stack.erasure_journal.to_str().unwrap();
    // clinflow-api connects as the services do: over verified TLS.
    let tls = testing::admin_url().split_once('?').map(|(_, q)| format!("?{q}")).unwrap_or_default();
    let mut env: Vec<(&str, String)> = testing::audit_keys().env("api");
    env.extend([
        ("CLINFLOW_API", api.to_owned()),
        ("ERASURE_JOURNAL_KEY", testing::ERASURE_JOURNAL_KEY.to_owned()),
        ("LOG_FORMAT", "text".to_owned()),
    ]);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let restore = async |db: &str, journal: Option<&str>| {
        let target = format!("{}{tls}", url(&superuser(), db));
        let mut args = vec!["--key", key.to_str().unwrap(), "--target-url", &target];
        args.extend(journal.map_or(vec![], |j| vec!["--erasure-journal", j]));
        args.push(backup.to_str().unwrap());
        run(repo_path("scripts/restore"), &args, &env).await
    };

    // Without a journal (nor --no-erasure-journal), no restore at all.
    let refused = format!("{}_nojournal", stack.db.name);
    let out = restore(&refused, None).await;
    assert!(!out.status.success() && text(&out).contains("--erasure-journal DIR is required"), "{}", text(&out));

    let restored = format!("{}_restored", stack.db.name);
    let out = restore(&restored, Some(journal)).await;
    assert!(out.status.success(), "restore: {}", text(&out));
    assert!(text(&out).contains("erasure journal re-applied: 1 entries, 1 found rows again"), "{}", text(&out));

    // Assert: the patient is gone again, concept rows included; the other
    // is whole; the re-application is on the copy's audit trail (outbox).
    let copy = PgPoolOptions::new().max_connections(2).connect(&url(&superuser(), &restored)).await.unwrap();
    assert_eq!(rows_of(&copy, &gone).await, [0; 5]);
    assert_eq!(rows_of(&copy, &kept).await, kept_rows);
    let grants: i64 = sqlx::query_scalar("SELECT count(*) FROM break_glass_grants WHERE patient_index = $1")
        .bind(&gone)
        .fetch_one(&copy)
        .await
        .unwrap();
    assert_eq!(grants, 0);
    let audited: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM outbox WHERE convert_from(body, 'UTF8') LIKE '%patient.erase.reapply%'",
    )
    .fetch_one(&copy)
    .await
    .unwrap();
    assert_eq!(audited, 1);
    copy.close().await;

    // An altered journal entry: the restore is not done, and nothing kept.
    let entry = std::fs::read_dir(&stack.erasure_journal).unwrap().next().unwrap().unwrap().path();
    let original = std::fs::read_to_string(&entry).unwrap();
    let hex_gone: String = gone.iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write(&entry, original.replace(&hex_gone, &hex_gone.replace('a', "b").replace('1', "2"))).unwrap();
    let tampered = format!("{}_tampered", stack.db.name);
    let out = restore(&tampered, Some(journal)).await;
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    assert!(text(&out).contains("fails its check") && text(&out).contains("NOT done"), "{}", text(&out));
    let made: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_database WHERE datname = $1")
        .bind(&tampered)
        .fetch_one(&stack.db.owner)
        .await
        .unwrap();
    assert_eq!(made, 0, "the copy without the erasure is dropped");
    assert!(!text(&out).contains("PAT-"), "no patient reference in the output: {}", text(&out));

    drop_database(&restored).await;
    drop_database(&refused).await;
    testing::delete_queues(&stack.topology, &stack.amqp).await;
    stack.db.drop_database().await;
}

#[tokio::test]
async fn retention_keeps_the_newest_backups_and_a_damaged_one_is_not_restored() {
    let db = TestDb::new().await;
    let work = tempfile::tempdir().unwrap();
    let key = new_key(work.path()).await;
    let dir = work.path().join("backups");
    let source_url = url(&superuser(), &db.name);
    let backup = |extra: &'static [&'static str]| {
        let mut args = vec![
            "--database-url".to_owned(),
            source_url.clone(),
            "--out-dir".to_owned(),
            dir.to_string_lossy().into_owned(),
            "--key".to_owned(),
            key.to_string_lossy().into_owned(),
        ];
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = run(repo_path("scripts/backup"), &args, &[]).await;
            assert!(out.status.success(), "backup: {}", text(&out));
        }
    };

    // --keep 2: the third backup removes the first.
    for _ in 0..3 {
        backup(&["--keep", "2"]).await;
    }
    let kept = backups_in(&dir);
    assert_eq!(kept.len(), 2, "{kept:?}");
    for b in &kept {
        assert!(PathBuf::from(format!("{}.sha256", b.display())).exists(), "checksum of {}", b.display());
    }
    // --max-age-days: beyond the newest --keep, only old ones go.
    let old = &kept[0];
    let out = run("touch", &["-d", "10 days ago", old.to_str().unwrap()], &[]).await;
    assert!(out.status.success());
    backup(&["--keep", "1", "--max-age-days", "7"]).await;
    let now = backups_in(&dir);
    assert_eq!(now.len(), 2, "{now:?}");
    assert!(!now.contains(old), "the 10-day-old backup is gone");
    assert!(!PathBuf::from(format!("{}.sha256", old.display())).exists());

    // A damaged backup (one byte) fails its checksum: no database is made.
    let newest = now.last().unwrap();
    let mut bytes = std::fs::read(newest).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(newest, bytes).unwrap();
    let restored = format!("{}_damaged", db.name);
    let target_url = url(&superuser(), &restored);
    let out = run(
        repo_path("scripts/restore"),
        &[
            "--key",
            key.to_str().unwrap(),
            "--target-url",
            &target_url,
            "--no-erasure-journal",
            newest.to_str().unwrap(),
        ],
        &[],
    )
    .await;
    assert!(!out.status.success());
    assert!(text(&out).contains("checksum mismatch"), "{}", text(&out));
    let made: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_database WHERE datname = $1")
        .bind(&restored)
        .fetch_one(&db.owner)
        .await
        .unwrap();
    assert_eq!(made, 0);

    db.drop_database().await;
}
