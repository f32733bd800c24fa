//! The physical limit of this design on this machine: PostgreSQL alone
//! writing the rows the pipeline wrote per document in the ceiling run just
//! before, in the same batches and transactions, with the services stopped
//! (no TLS, no encryption, no broker, no HTTP). The pipeline's ceiling as a
//! fraction of it says how much is left to gain outside the database.
//!
//! The rows are the run's own, copied under new keys: each document's row,
//! its sealed text, its result and concept rows, and the run's audit rows
//! and disclosures, the same sizes and the same index entries. Per batch,
//! the statements the services send: the api's insert (documents, texts,
//! one outbox job per document and its share of the packed audit
//! messages), the relay's delete, the worker's claim (a HOT update), its
//! store (results, concept names and rows, `done`, its audit messages), the
//! relay's delete, and the sink's insert of the audit rows and disclosures
//! (into copies of their tables: the real chain stays whole). The new
//! patients' data keys go in with the documents.
//! The outbox bodies are the only rows made up: a job's body is its id, as
//! the api writes it; an audit message is as long as the run's audit rows
//! as JSON, 100 to a message (the producers' packing).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::Context;
use serde::Serialize;
use sqlx::{PgPool, Row};
use uuid::Uuid;

/// Events per AMQP message (the producers' packing, clinflow::outbox).
const EVENTS_PER_MESSAGE: f64 = 100.0;

/// Opened before a pipeline run: where the audit trail and the tables'
/// write counters stood, and the clock.
pub struct Opening {
    audit_seq: i64,
    at: String,
    writes: Writes,
    wal_bytes: i64,
}

/// A pipeline run's rows: its documents (created in [from, to]) and audit
/// rows (seq in (audit_after, audit_last]), and what it wrote per document.
#[derive(Debug, Clone)]
pub struct Window {
    docs: usize,
    from: String,
    to: String,
    audit_after: i64,
    audit_last: i64,
    rows_per_doc: Vec<TableWrites>,
    wal_bytes_per_doc: f64,
}

impl Opening {
    /// After a checkpoint, as the limit run starts after one: how much WAL
    /// a run writes depends on it (the first change to a page after a
    /// checkpoint logs the whole page), and both should pay alike.
    pub async fn take(db: &PgPool) -> anyhow::Result<Self> {
        sqlx::query("CHECKPOINT").execute(db).await?;
        let writes = table_writes(db).await?;
        let (audit_seq, at, wal_bytes): (i64, String, i64) = sqlx::query_as(
            "SELECT (SELECT coalesce(max(seq), 0) FROM audit_events), clock_timestamp()::text,
                    (SELECT wal_bytes::int8 FROM pg_stat_wal)",
        )
        .fetch_one(db)
        .await?;
        Ok(Self { audit_seq, at, writes, wal_bytes })
    }

    /// After the run's `docs` documents are done and its audit rows stored.
    pub async fn close(self, db: &PgPool, docs: usize) -> anyhow::Result<Window> {
        let (audit_last, to, wal_bytes): (i64, String, i64) = sqlx::query_as(
            "SELECT (SELECT coalesce(max(seq), 0) FROM audit_events), clock_timestamp()::text,
                    (SELECT wal_bytes::int8 FROM pg_stat_wal)",
        )
        .fetch_one(db)
        .await?;
        let rows_per_doc = rows_per_doc(&self.writes, &table_writes(db).await?, docs);
        let wal_bytes_per_doc = (wal_bytes - self.wal_bytes) as f64 / docs as f64;
        Ok(Window { docs, from: self.at, to, audit_after: self.audit_seq, audit_last, rows_per_doc, wal_bytes_per_doc })
    }
}

#[derive(Debug, Serialize, Clone)]
pub struct Limit {
    pub docs: usize,
    pub batch: usize,
    pub connections: usize,
    pub wall_s: f64,
    pub docs_per_s: f64,
    /// PostgreSQL's CPU per document while it ran.
    pub postgres_cpu_ms_per_doc: f64,
    pub wal_bytes_per_doc: f64,
    /// The pipeline's, in its run (the copy's fidelity, seen in the WAL).
    pub pipeline_wal_bytes_per_doc: f64,
    pub audit_rows_per_doc: f64,
    pub concept_rows_per_doc: f64,
    /// Rows the pipeline wrote per document in its run, by table
    /// (partitions summed into their parent).
    pub pipeline_rows_per_doc: Vec<TableWrites>,
}

#[derive(Debug, Serialize, Clone)]
pub struct TableWrites {
    pub table: String,
    pub inserted: f64,
    pub updated: f64,
    pub hot_updated: f64,
    pub deleted: f64,
}

/// Copies the rows of `window`'s run, `connections` loaders at once,
/// `batch` documents per set of transactions, with the services stopped.
/// The audit rows go to copies of `audit_events` and `audit_disclosures`
/// (same columns, defaults and indexes), so that the real trail's chain
/// stays whole.
pub async fn run(db: &PgPool, window: &Window, batch: usize, connections: usize) -> anyhow::Result<Limit> {
    let docs = window.docs;
    let sources: Vec<Uuid> = sqlx::query_scalar(
        "SELECT id FROM documents WHERE created_at BETWEEN $1::timestamptz AND $2::timestamptz AND status = 'done'
         ORDER BY created_at, id",
    )
    .bind(&window.from)
    .bind(&window.to)
    .fetch_all(db)
    .await?;
    anyhow::ensure!(sources.len() == docs, "the limit needs the run's {docs} documents, found {}", sources.len());
    let audit: Vec<i64> = sqlx::query_scalar("SELECT seq FROM audit_events WHERE seq > $1 AND seq <= $2 ORDER BY seq")
        .bind(window.audit_after)
        .bind(window.audit_last)
        .fetch_all(db)
        .await?;
    let audit_per_doc = audit.len() as f64 / docs as f64;
    // The data keys of the patients the run saw first.
    let keys: Vec<Uuid> = sqlx::query_scalar(
        "SELECT id FROM data_keys WHERE created_at BETWEEN $1::timestamptz AND $2::timestamptz ORDER BY created_at, id",
    )
    .bind(&window.from)
    .bind(&window.to)
    .fetch_all(db)
    .await?;
    let audit_json_bytes: f64 = sqlx::query_scalar(
        "SELECT coalesce(avg(octet_length(row_to_json(a)::text)), 0)::float8 FROM audit_events a
         WHERE seq > $1 AND seq <= $2",
    )
    .bind(window.audit_after)
    .bind(window.audit_last)
    .fetch_one(db)
    .await?;
    for ddl in [
        "DROP TABLE IF EXISTS bench_limit_audit, bench_limit_disclosures, bench_limit_src_concepts,
                              bench_limit_src_disclosures",
        "DROP SEQUENCE IF EXISTS bench_limit_seq",
        "CREATE TABLE bench_limit_audit (LIKE audit_events INCLUDING ALL)",
        "CREATE TABLE bench_limit_disclosures (LIKE audit_disclosures INCLUDING ALL)",
        "CREATE SEQUENCE bench_limit_seq",
        // The source rows that no index of theirs finds by document or by
        // seq, set apart (and indexed) before the clock starts: the services
        // send these rows from memory; the copy must not scan for them.
        "CREATE TABLE bench_limit_src_concepts (LIKE document_concepts)",
        "CREATE TABLE bench_limit_src_disclosures (LIKE audit_disclosures)",
    ] {
        sqlx::query(ddl).execute(db).await.with_context(|| ddl.to_owned())?;
    }
    let concept_rows =
        sqlx::query("INSERT INTO bench_limit_src_concepts SELECT * FROM document_concepts WHERE document_id = ANY($1)")
            .bind(&sources)
            .execute(db)
            .await?
            .rows_affected();
    sqlx::query("INSERT INTO bench_limit_src_disclosures SELECT * FROM audit_disclosures WHERE seq > $1 AND seq <= $2")
        .bind(window.audit_after)
        .bind(window.audit_last)
        .execute(db)
        .await?;
    for ddl in [
        "CREATE INDEX ON bench_limit_src_concepts (document_id)",
        "CREATE INDEX ON bench_limit_src_disclosures (seq)",
        "ANALYZE bench_limit_src_concepts, bench_limit_src_disclosures",
    ] {
        sqlx::query(ddl).execute(db).await.with_context(|| ddl.to_owned())?;
    }
    // One message body as long as a packed audit message of the run.
    let audit_body = vec![b'x'; (audit_json_bytes * EVENTS_PER_MESSAGE) as usize];

    // Each batch its share of the run's audit rows and data keys.
    fn share<T: Clone>(all: &[T], docs: usize, first: usize, n: usize) -> Vec<T> {
        let at = |d: usize| (d as f64 * all.len() as f64 / docs as f64).round() as usize;
        all[at(first)..at(first + n).min(all.len())].to_vec()
    }
    let batches: Vec<Batch> = sources
        .chunks(batch)
        .enumerate()
        .map(|(i, ids)| Batch {
            documents: ids.to_vec(),
            audit: share(&audit, docs, i * batch, ids.len()),
            keys: share(&keys, docs, i * batch, ids.len()),
        })
        .collect();
    let (batches, body) = (Arc::new(batches), Arc::new(audit_body));
    let next = Arc::new(AtomicUsize::new(0));
    sqlx::query("CHECKPOINT").execute(db).await?;
    let wal_before: i64 = sqlx::query_scalar("SELECT wal_bytes::int8 FROM pg_stat_wal").fetch_one(db).await?;
    let cpu_before = crate::stack::cpu_seconds_of(&["postgres"]);
    let started = Instant::now();
    let mut loaders = tokio::task::JoinSet::new();
    for _ in 0..connections {
        let (db, batches, body, next) = (db.clone(), Arc::clone(&batches), Arc::clone(&body), Arc::clone(&next));
        loaders.spawn(async move {
            while let Some(b) = batches.get(next.fetch_add(1, Ordering::Relaxed)) {
                one_batch(&db, b, &body).await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(loader) = loaders.join_next().await {
        loader??;
    }
    let wall_s = started.elapsed().as_secs_f64();
    let cpu = crate::stack::cpu_seconds_of(&["postgres"]) - cpu_before;
    let wal_after: i64 = sqlx::query_scalar("SELECT wal_bytes::int8 FROM pg_stat_wal").fetch_one(db).await?;
    Ok(Limit {
        docs,
        batch,
        connections,
        wall_s,
        docs_per_s: docs as f64 / wall_s,
        postgres_cpu_ms_per_doc: cpu * 1000.0 / docs as f64,
        wal_bytes_per_doc: (wal_after - wal_before) as f64 / docs as f64,
        pipeline_wal_bytes_per_doc: window.wal_bytes_per_doc,
        audit_rows_per_doc: audit_per_doc,
        concept_rows_per_doc: concept_rows as f64 / docs as f64,
        pipeline_rows_per_doc: window.rows_per_doc.clone(),
    })
}

/// One batch of documents, through the services' transactions in order.
/// Source rows of one batch: documents, audit rows (by seq), data keys.
struct Batch {
    documents: Vec<Uuid>,
    audit: Vec<i64>,
    keys: Vec<Uuid>,
}

async fn one_batch(db: &PgPool, batch: &Batch, audit_body: &[u8]) -> anyhow::Result<()> {
    let (sources, audit) = (&batch.documents, &batch.audit);
    // Time-ordered, as the api's and the sink's ids are (their indexes grow
    // at one end).
    let ids: Vec<Uuid> = sources.iter().map(|_| Uuid::now_v7()).collect();
    let event_ids: Vec<Uuid> = audit.iter().map(|_| Uuid::now_v7()).collect();
    // Audit messages: half the batch's events come from the api, half from
    // the worker, packed 100 to a message.
    let messages = (audit.len() as f64 / EVENTS_PER_MESSAGE).ceil() as i64;
    let (api_messages, worker_messages) = (messages - messages / 2, messages / 2);

    // The api: new patients' data keys, the documents, their texts, a job
    // each, its audit messages.
    let mut tx = db.begin().await?;
    let key_ids: Vec<Uuid> = batch.keys.iter().map(|_| Uuid::now_v7()).collect();
    sqlx::query(
        "INSERT INTO data_keys (id, patient_index, kek_id, wrapped, patient_ref_ct)
         SELECT m.id, sha256(k.patient_index || uuid_send(m.id)), k.kek_id, k.wrapped, k.patient_ref_ct
         FROM UNNEST($1::uuid[], $2::uuid[]) AS m(src, id) JOIN data_keys k ON k.id = m.src",
    )
    .bind(&batch.keys)
    .bind(&key_ids)
    .execute(&mut *tx)
    .await?;
    let inserted = sqlx::query(
        "WITH m AS (SELECT * FROM UNNEST($1::uuid[], $2::uuid[]) AS m(src, id)),
         d AS (
             INSERT INTO documents (id, patient_ref_ct, source_ref_hmac, document_date, uploaded_by, patient_index,
                                    data_key_id, lawful_basis, consent_index, lane)
             SELECT m.id, s.patient_ref_ct, sha256(s.source_ref_hmac || uuid_send(m.id)), s.document_date, s.uploaded_by,
                    s.patient_index, s.data_key_id, s.lawful_basis, s.consent_index, s.lane
             FROM m JOIN documents s ON s.id = m.src
             RETURNING id
         )
         INSERT INTO document_texts (document_id, text_ct)
         SELECT m.id, t.text_ct FROM m JOIN d ON d.id = m.id JOIN document_texts t ON t.document_id = m.src",
    )
    .bind(sources)
    .bind(&ids)
    .execute(&mut *tx)
    .await
    .context("the api's insert")?;
    anyhow::ensure!(
        inserted.rows_affected() == ids.len() as u64,
        "copied {} of {} texts",
        inserted.rows_affected(),
        ids.len()
    );
    let outbox = enqueue(&mut tx, &ids, api_messages, audit_body).await?;
    tx.commit().await?;
    relay(db, &outbox).await?;

    // The worker: the claim (texts read), then the results stored.
    let claimed = sqlx::query(
        "WITH claimed AS (
             UPDATE documents SET status = 'processing', attempts = attempts + 1, updated_at = now()
             WHERE id = ANY($1) AND status IN ('queued', 'processing')
             RETURNING id
         )
         SELECT c.id, t.text_ct FROM claimed c JOIN document_texts t ON t.document_id = c.id",
    )
    .bind(&ids)
    .fetch_all(db)
    .await?;
    anyhow::ensure!(claimed.len() == ids.len(), "claimed {} of {}", claimed.len(), ids.len());
    let mut tx = db.begin().await?;
    sqlx::query(
        "INSERT INTO document_results (document_id, model_version, annotations_ct, annotation_count)
         SELECT m.id, r.model_version, r.annotations_ct, r.annotation_count
         FROM UNNEST($1::uuid[], $2::uuid[]) AS m(src, id) JOIN document_results r ON r.document_id = m.src",
    )
    .bind(sources)
    .bind(&ids)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO concept_names (cui, pretty_name, type_ids)
         SELECT DISTINCT ON (c.cui) c.cui, n.pretty_name, n.type_ids
         FROM bench_limit_src_concepts c JOIN concept_names n ON n.cui = c.cui WHERE c.document_id = ANY($1)
         ON CONFLICT (cui) DO NOTHING",
    )
    .bind(sources)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO document_concepts (document_id, patient_index, document_date, created_at, model_version, cui,
                                        mentions, negated, first_offset)
         SELECT m.id, c.patient_index, c.document_date, c.created_at, c.model_version, c.cui, c.mentions, c.negated,
                c.first_offset
         FROM UNNEST($1::uuid[], $2::uuid[]) AS m(src, id) JOIN bench_limit_src_concepts c ON c.document_id = m.src
         ON CONFLICT (patient_index, document_id, cui) DO NOTHING",
    )
    .bind(sources)
    .bind(&ids)
    .execute(&mut *tx)
    .await?;
    let done = sqlx::query(
        "UPDATE documents d SET status = 'done', failure_code = NULL, updated_at = now(), result_model = s.result_model
         FROM UNNEST($1::uuid[], $2::uuid[]) AS m(src, id) JOIN documents s ON s.id = m.src
         WHERE d.id = m.id AND d.status = 'processing'",
    )
    .bind(sources)
    .bind(&ids)
    .execute(&mut *tx)
    .await?;
    anyhow::ensure!(done.rows_affected() == ids.len() as u64, "{} of {} done", done.rows_affected(), ids.len());
    let outbox = enqueue(&mut tx, &[], worker_messages, audit_body).await?;
    tx.commit().await?;
    relay(db, &outbox).await?;

    // The sink: the audit rows (with the chain head read first, as the
    // sink reads it) and their disclosures.
    let mut tx = db.begin().await?;
    sqlx::query("SELECT seq, row_hash FROM bench_limit_audit ORDER BY seq DESC LIMIT 1")
        .fetch_optional(&mut *tx)
        .await?;
    sqlx::query(
        "WITH s AS (
             SELECT a.*, m.event_id AS new_event_id, nextval('bench_limit_seq') AS new_seq
             FROM UNNEST($1::int8[], $2::uuid[]) AS m(seq, event_id) JOIN audit_events a ON a.seq = m.seq
         ),
         e AS (
             INSERT INTO bench_limit_audit (seq, event_id, occurred_at, actor_kind, actor_id, actor_name, actor_role, source_ip,
                                       request_id, action, resource_kind, resource_id, outcome, reason, prev_hash, row_hash,
                                       key_id, signature, head_key_id, head_signature, patients)
             SELECT new_seq, new_event_id, occurred_at, actor_kind, actor_id, actor_name, actor_role, source_ip,
                    request_id, action, resource_kind, resource_id, outcome, reason, prev_hash, row_hash,
                    key_id, signature, head_key_id, head_signature, patients
             FROM s
             RETURNING seq
         )
         INSERT INTO bench_limit_disclosures (patient_index, seq)
         SELECT d.patient_index, s.new_seq FROM s JOIN bench_limit_src_disclosures d ON d.seq = s.seq",
    )
    .bind(audit)
    .bind(&event_ids)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// A job for each of `jobs` and `audit_messages` packed audit messages into
/// the outbox, in the caller's transaction; their ids.
async fn enqueue(
    tx: &mut sqlx::PgConnection,
    jobs: &[Uuid],
    audit_messages: i64,
    audit_body: &[u8],
) -> anyhow::Result<Vec<i64>> {
    Ok(sqlx::query_scalar(
        "INSERT INTO outbox (topic, message_id, body)
         SELECT 'documents.' || d.lane, d.id::text, convert_to(d.id::text, 'UTF8') FROM documents d WHERE d.id = ANY($1)
         UNION ALL
         SELECT 'audit', gen_random_uuid()::text, $3 FROM generate_series(1, $2)
         RETURNING id",
    )
    .bind(jobs)
    .bind(audit_messages)
    .bind(audit_body)
    .fetch_all(tx)
    .await?)
}

/// The relay's delete of what it published.
async fn relay(db: &PgPool, ids: &[i64]) -> anyhow::Result<()> {
    if !ids.is_empty() {
        sqlx::query("DELETE FROM outbox WHERE id = ANY($1)").bind(ids).execute(db).await?;
    }
    Ok(())
}

/// Inserted, updated, HOT-updated and deleted rows of every table so far,
/// partitions summed into their parent.
type Writes = Vec<(String, [i64; 4])>;

/// The tables' write counters, once they count every row of the tables
/// that only grow (the services' backends report their counters up to ten
/// seconds after their last transaction; a deadline of 30 s).
async fn table_writes(db: &PgPool) -> anyhow::Result<Writes> {
    let deadline = Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let rows = sqlx::query(
            "SELECT coalesce(p.inhparent::regclass::text, s.relname::text) AS t,
                    sum(s.n_tup_ins)::int8, sum(s.n_tup_upd)::int8, sum(s.n_tup_hot_upd)::int8, sum(s.n_tup_del)::int8
             FROM pg_stat_user_tables s LEFT JOIN pg_inherits p ON p.inhrelid = s.relid
             GROUP BY 1 ORDER BY 1",
        )
        .fetch_all(db)
        .await?;
        let writes: Writes =
            rows.iter().map(|r| (r.get::<String, _>(0), [r.get(1), r.get(2), r.get(3), r.get(4)])).collect();
        let counts: (i64, i64, i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM documents), (SELECT count(*) FROM document_results),
                    (SELECT count(*) FROM document_concepts), (SELECT count(*) FROM audit_events)",
        )
        .fetch_one(db)
        .await?;
        let inserted = |table: &str| writes.iter().find(|(t, _)| t == table).map_or(0, |(_, w)| w[0]);
        let counted = inserted("documents") >= counts.0
            && inserted("document_results") >= counts.1
            && inserted("document_concepts") >= counts.2
            && inserted("audit_events") >= counts.3;
        if counted || Instant::now() > deadline {
            return Ok(writes);
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        sqlx::query("SELECT pg_stat_clear_snapshot()").execute(db).await?;
    }
}

fn rows_per_doc(before: &Writes, after: &Writes, docs: usize) -> Vec<TableWrites> {
    let per = |v: i64| v as f64 / docs as f64;
    after
        .iter()
        .filter_map(|(table, now)| {
            let then = before.iter().find(|(t, _)| t == table).map_or([0; 4], |(_, w)| *w);
            let d = |i: usize| per(now[i] - then[i]);
            let w =
                TableWrites { table: table.clone(), inserted: d(0), updated: d(1), hot_updated: d(2), deleted: d(3) };
            (w.inserted + w.updated + w.deleted > 0.0).then_some(w)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_per_document_are_the_counters_growth_per_document() {
        let before: Writes = vec![("documents".into(), [100, 200, 150, 0]), ("outbox".into(), [7, 0, 0, 7])];
        let after: Writes = vec![
            ("documents".into(), [1100, 2200, 2000, 0]),
            ("outbox".into(), [1017, 0, 0, 1017]),
            ("sessions".into(), [0, 0, 0, 0]),
            ("data_keys".into(), [200, 0, 0, 0]),
        ];
        let rows = rows_per_doc(&before, &after, 1000);
        let names: Vec<&str> = rows.iter().map(|t| t.table.as_str()).collect();
        assert_eq!(names, ["documents", "outbox", "data_keys"], "a table nothing was written to is left out");
        assert_eq!((rows[0].inserted, rows[0].updated, rows[0].hot_updated), (1.0, 2.0, 1.85));
        assert_eq!((rows[1].inserted, rows[1].deleted), (1.01, 1.01));
        assert_eq!(rows[2].inserted, 0.2, "a table new since the first reading counts from zero");
    }
}
