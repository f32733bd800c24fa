//! Privacy at scale (issue 34): the accounting of disclosures looked up
//! among many audit rows, and `clinflow-api purge` removing many expired
//! documents while single uploads go on.
//!
//! The audit rows are written straight into `audit_events` and
//! `audit_disclosures` (as the sink's batches leave them, past the real
//! chain's sequence numbers; the lookup reads them, nobody verifies them),
//! each naming one of the patients by the api's blind index. The expired
//! documents are written by SQL too, each with a result and two concept
//! rows; their ciphertexts are random bytes, which the purge never opens.

use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::process::Command;

use crate::phases::Client;
use crate::plan::Plan;
use crate::report::{Privacy, Uploads};
use crate::stack::Stack;

/// Where the bench's audit rows start: far past any sequence the sink reaches.
const SEQ_BASE: i64 = 1_000_000_000_000;
/// Patients the audit rows are spread over (so ~100 rows each at 1M).
const PATIENTS: usize = 10_000;
const CHUNK: i64 = 100_000;

pub async fn run(db: &sqlx::PgPool, stack: &Stack, plan: &Plan, password: &str) -> anyhow::Result<Privacy> {
    let index_key = stack.index_key();
    let patients: Vec<String> = (0..PATIENTS).map(|p| format!("bench-privacy-{p}")).collect();
    let indexes: Vec<Vec<u8>> = patients.iter().map(|p| clinflow::documents::patient_index(&index_key, p)).collect();

    eprintln!("   writing {} audit rows over {PATIENTS} patients", plan.disclosure_rows);
    let started = Instant::now();
    let mut written = 0_i64;
    while written < plan.disclosure_rows as i64 {
        let n = CHUNK.min(plan.disclosure_rows as i64 - written);
        let mut tx = db.begin().await?;
        sqlx::query(
            "INSERT INTO audit_events (seq, event_id, occurred_at, actor_kind, actor_name, actor_role, action,
                                       resource_kind, resource_id, outcome, prev_hash, row_hash, patients)
             SELECT $1 + g, gen_random_uuid(), now() - make_interval(secs => g), 'user', 'bench-clinician',
                    'clinician', 'document.read', 'document', gen_random_uuid()::text, 'success', '\\x00', '\\x00',
                    ARRAY[encode(($3::bytea[])[1 + g % cardinality($3::bytea[])], 'hex')]
             FROM generate_series(1, $2) AS g",
        )
        .bind(SEQ_BASE + written)
        .bind(n)
        .bind(&indexes)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO audit_disclosures (patient_index, seq)
             SELECT ($3::bytea[])[1 + g % cardinality($3::bytea[])], $1 + g FROM generate_series(1, $2) AS g",
        )
        .bind(SEQ_BASE + written)
        .bind(n)
        .bind(&indexes)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        written += n;
    }
    sqlx::query("ANALYZE audit_events").execute(db).await?;
    sqlx::query("ANALYZE audit_disclosures").execute(db).await?;
    let audit_load_s = started.elapsed().as_secs_f64();

    stack.create_user("bench-auditor", "auditor", password).await?;
    let auditor = Client::login(&stack.api_url, "bench-auditor", password).await?;
    let clients = plan.disclosure_clients;
    eprintln!(
        "   {} disclosure lookups (first page), {clients} auditors × {}/s",
        plan.disclosure_requests, plan.disclosure_rate_per_client
    );
    let per_client = plan.disclosure_requests.div_ceil(clients);
    let interval = Duration::from_secs_f64(1.0 / plan.disclosure_rate_per_client);
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (auditor, patients) = (auditor.clone(), patients.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(per_client);
            let mut next = Instant::now();
            for i in 0..per_client {
                tokio::time::sleep_until(next.into()).await;
                let scheduled = next;
                next += interval;
                let patient = &patients[(c * 7919 + i * 104_729) % patients.len()];
                let body = serde_json::json!({"patient_ref": patient, "limit": 100});
                let (status, answer) = auditor.post("/v1/audit/disclosures", &body).await?;
                latencies.push(scheduled.elapsed());
                let page: serde_json::Value = serde_json::from_slice(&answer)?;
                let items = page["disclosures"].as_array().map_or(0, Vec::len);
                anyhow::ensure!(
                    status == 200 && items > 0,
                    "a disclosures lookup answered {status} with {items} items"
                );
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await??);
    }
    let (d50, d99, dmax) = percentiles(&mut latencies);

    // The purge: baseline uploads, then the expired documents, then uploads
    // again while `clinflow-api purge --apply` runs.
    let uploader = Client::login(&stack.api_url, "bench-ingest", password).await?;
    let duration = Duration::from_secs_f64(plan.purge_upload_s);
    eprintln!("   single uploads for {duration:?} without a purge");
    let uploads_without = paced_uploads(&uploader, plan, duration, None).await?;
    eprintln!("   writing {} expired documents", plan.purge_docs);
    let docs = expired_documents(db, plan.purge_docs as i64).await?;
    eprintln!("   purging {docs} expired documents while single uploads go on");
    let started = Instant::now();
    let mut purge = Command::new(stack.bin_dir.join("clinflow-api"))
        .envs(&stack.env)
        .args(["purge", "--apply", "--batch-size", "500"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("starting clinflow-api purge")?;
    let uploads_during = paced_uploads(&uploader, plan, Duration::from_secs(3600), Some(&mut purge)).await?;
    let purge_s = started.elapsed().as_secs_f64();
    let output = purge.wait_with_output().await?;
    anyhow::ensure!(output.status.success(), "clinflow-api purge failed");
    let said = String::from_utf8_lossy(&output.stdout);
    anyhow::ensure!(said.contains(&format!("purged {docs} documents")), "purge said: {said}");
    Ok(Privacy {
        audit_rows: written,
        audit_load_s,
        disclosure_requests: latencies.len(),
        disclosure_clients: clients,
        disclosure_p50_ms: d50,
        disclosure_p99_ms: d99,
        disclosure_max_ms: dmax,
        purge_docs: docs,
        purge_s,
        purge_docs_per_s: docs as f64 / purge_s,
        uploads_without,
        uploads_during,
    })
}

/// `n` documents dated 2001 (past every basis's retention), spread over the
/// patients that hold data keys, each with a result and two concept rows.
async fn expired_documents(db: &sqlx::PgPool, n: i64) -> anyhow::Result<i64> {
    let uploader: uuid::Uuid =
        sqlx::query_scalar("SELECT id FROM users WHERE username = 'bench-ingest'").fetch_one(db).await?;
    let mut tx = db.begin().await?;
    sqlx::query(
        "CREATE TEMP TABLE expired ON COMMIT DROP AS
         WITH keys AS (SELECT row_number() OVER () AS n, id, patient_index FROM data_keys),
              total AS (SELECT count(*) AS n FROM keys)
         SELECT gen_random_uuid() AS id, keys.id AS key_id, keys.patient_index
         FROM generate_series(1, $1) AS g, total JOIN keys ON true
         WHERE keys.n = 1 + g % total.n",
    )
    .bind(n)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO documents (id, status, patient_ref_ct, document_date, uploaded_by, lane, data_key_id,
                                patient_index, result_model, lawful_basis)
         SELECT id, 'done', decode(repeat(replace(id::text, '-', ''), 3), 'hex'), '2001-01-01', $1, 'backfill', key_id,
                patient_index, 'bench-model', 'direct_care'
         FROM expired",
    )
    .bind(uploader)
    .execute(&mut *tx)
    .await
    .context("writing the expired documents")?;
    sqlx::query(
        "INSERT INTO document_texts (document_id, text_ct)
         SELECT id, decode(repeat(replace(id::text, '-', ''), 62), 'hex') FROM expired",
    )
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO document_results (document_id, model_version, annotations_ct, annotation_count)
         SELECT id, 'bench-model', decode(repeat(replace(id::text, '-', ''), 25), 'hex'), 2 FROM expired",
    )
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO document_concepts (document_id, patient_index, document_date, created_at, model_version, cui,
                                        mentions, negated, first_offset)
         SELECT id, patient_index, '2001-01-01', now(), 'bench-model', cui, 1, 0, 0
         FROM expired, (VALUES ('49436004'), ('38341003')) AS c (cui)",
    )
    .execute(&mut *tx)
    .await?;
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM expired").fetch_one(&mut *tx).await?;
    tx.commit().await?;
    sqlx::query("ANALYZE documents").execute(db).await?;
    Ok(count)
}

/// Single uploads from `plan.upload_clients` clients at their paced rate,
/// for `duration` or until `until` exits.
async fn paced_uploads(
    client: &Client,
    plan: &Plan,
    duration: Duration,
    until: Option<&mut tokio::process::Child>,
) -> anyhow::Result<Uploads> {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let interval = Duration::from_secs_f64(1.0 / plan.upload_rate_per_client);
    let mut tasks = Vec::new();
    for c in 0..plan.upload_clients {
        let (client, stop) = (client.clone(), std::sync::Arc::clone(&stop));
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut next = Instant::now() + interval.mul_f64(c as f64 / 50.0);
            let mut i = 0_u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                tokio::time::sleep_until(next.into()).await;
                let scheduled = next;
                next += interval;
                let patient = format!("bench-privacy-upload-{}", (c as u64 * 1_000_003 + i) % 5_000);
                latencies.push(client.upload_text(&patient, "Atrial fibrillation, rate controlled.", scheduled).await?);
                i += 1;
            }
            anyhow::Ok(latencies)
        }));
    }
    match until {
        Some(child) => {
            tokio::select! {
                _ = child.wait() => {}
                () = tokio::time::sleep(duration) => {}
            }
        }
        None => tokio::time::sleep(duration).await,
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await??);
    }
    let (p50_ms, p99_ms, max_ms) = percentiles(&mut latencies);
    Ok(Uploads { count: latencies.len(), p50_ms, p99_ms, max_ms })
}

fn percentiles(latencies: &mut [Duration]) -> (f64, f64, f64) {
    if latencies.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    latencies.sort_unstable();
    let at = |q: f64| latencies[((latencies.len() as f64 * q).ceil() as usize).clamp(1, latencies.len()) - 1];
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    (ms(at(0.50)), ms(at(0.99)), ms(at(1.0)))
}
