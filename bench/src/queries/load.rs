//! The bulk-load path of the query benchmark (benchmark data only): patients
//! with their data keys, care teams, documents sealed as the api seals them
//! and their concept index, streamed with `COPY … FROM STDIN` as the owner.
//! The loaded tables' secondary indexes are dropped and their triggers
//! disabled meanwhile, then put back; both found in the catalogue, so the
//! loader follows schema changes.

use std::io::Write as _;
use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use clinflow::crypto::{DataKey, IndexKey, Keyring, WrappedKey};
use clinflow::{documents, keys};
use sqlx::postgres::PgPoolCopyExt;
use sqlx::{AssertSqlSafe, PgPool};
use time::OffsetDateTime;
use uuid::Uuid;

use super::concepts::Concepts;
use crate::notes::{SplitMix64, Vocabulary};
use crate::report::TableLoad;

/// The model version of every loaded result.
pub const MODEL: &str = "bench-query-model-1";
pub const TEAMS: usize = 100;
const DOCS_PER_PATIENT: usize = 10;
const NOTE_BYTES: usize = 1_000;
/// Note numbers of the loaded documents (apart from the other phases' notes).
const NOTE_SEED: u64 = 7_000_000_000;
/// Rows generated per COPY message.
const CHUNK: usize = 2_000;
const FIVE_YEARS_MS: i64 = 5 * 365 * 24 * 3600 * 1000;

/// The tables COPYed into, whose secondary indexes and triggers are set aside.
const COPIED: &[&str] = &["data_keys", "care_team_patients", "documents", "document_texts", "document_concepts"];

/// How many of what: patients are `bench-q-<n>`, patient `n` in team `n % teams`.
#[derive(Debug, Clone, Copy)]
pub struct Dataset {
    pub docs: usize,
    pub patients: usize,
    pub teams: usize,
}

impl Dataset {
    pub fn new(docs: usize) -> Self {
        let patients = (docs / DOCS_PER_PATIENT / TEAMS).max(1) * TEAMS;
        Self { docs, patients, teams: TEAMS }
    }

    pub fn patient_ref(patient: usize) -> String {
        format!("bench-q-{patient}")
    }

    pub fn team_size(&self) -> usize {
        self.patients / self.teams
    }

    /// Patient `k` of team `team`.
    pub fn team_patient(&self, team: usize, k: usize) -> usize {
        team + k * self.teams
    }
}

/// Everything a document row is made from, deterministic per document
/// number, so any part of the load can be generated again (see `patient_of`).
pub struct Generator {
    pub set: Dataset,
    keys: Vec<DataKey>,
    indexes: Vec<Vec<u8>>,
    vocabulary: Vocabulary,
    concepts: Arc<Concepts>,
    uploader: Uuid,
    start_ms: i64,
}

struct Document {
    id: Uuid,
    patient: usize,
    at: OffsetDateTime,
}

impl Generator {
    pub fn new(
        set: Dataset,
        index_key: &IndexKey,
        vocabulary: Vocabulary,
        concepts: Arc<Concepts>,
        uploader: Uuid,
    ) -> Self {
        let indexes =
            (0..set.patients).map(|p| documents::patient_index(index_key, &Dataset::patient_ref(p))).collect();
        let keys = (0..set.patients).map(|_| DataKey::generate()).collect();
        let start_ms = (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64 - FIVE_YEARS_MS;
        Self { set, keys, indexes, vocabulary, concepts, uploader, start_ms }
    }

    /// The patient of document `j` (documents are numbered oldest first).
    pub fn patient_of(&self, j: usize) -> usize {
        SplitMix64::new(seed(j, 1)).below(self.set.patients as u64) as usize
    }

    /// Document `j`: its date spread evenly over the last five years, plus
    /// less than one step, so UUIDv7 ids sort as the dates do.
    fn document(&self, j: usize) -> Document {
        let mut rng = SplitMix64::new(seed(j, 2));
        let (docs, span) = (self.set.docs as i64, FIVE_YEARS_MS);
        let step = (span / docs).max(1) as u64;
        let ms = self.start_ms + span * j as i64 / docs + rng.below(step) as i64;
        let mut random = [0u8; 10];
        random[..8].copy_from_slice(&rng.next().to_le_bytes());
        random[8..].copy_from_slice(&rng.next().to_le_bytes()[..2]);
        let id = uuid::Builder::from_unix_timestamp_millis(ms as u64, &random).into_uuid();
        let at =
            OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).unwrap_or(OffsetDateTime::UNIX_EPOCH);
        Document { id, patient: self.patient_of(j), at }
    }

    /// Each patient's wrapped key and reference sealed beside it.
    fn data_keys(&self, keyring: &Keyring) -> anyhow::Result<Vec<(WrappedKey, Vec<u8>)>> {
        (0..self.set.patients)
            .map(|p| {
                let key = &self.keys[p];
                let sealed = key.seal_str(keys::data_key_ref_field(key.id()), &Dataset::patient_ref(p))?;
                Ok((keyring.wrap(key, &self.indexes[p])?, sealed))
            })
            .collect()
    }

    fn care_team_patients(&self, teams: &[Uuid], patients: Range<usize>) -> Vec<u8> {
        let mut out = Vec::with_capacity(patients.len() * 120);
        for p in patients {
            let _ = write!(out, "{}\t", teams[p % self.set.teams]);
            bytea(&mut out, &self.indexes[p]);
            out.push(b'\n');
        }
        out
    }

    fn documents(&self, range: Range<usize>) -> anyhow::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(range.len() * 2_700);
        for j in range {
            let d = self.document(j);
            let key = &self.keys[d.patient];
            let patient_ct = key.seal_str(documents::patient_ref_field(d.id), &Dataset::patient_ref(d.patient))?;
            write!(out, "{}\tdone\t", d.id)?;
            bytea(&mut out, &patient_ct);
            let done = d.at + time::Duration::seconds(2);
            write!(
                out,
                "\t{}\t{}\t{}\t{}\t1\tbackfill\t{}\t",
                d.at.date(),
                self.uploader,
                ts(d.at),
                ts(done),
                key.id()
            )?;
            bytea(&mut out, &self.indexes[d.patient]);
            writeln!(out, "\t{MODEL}\tdirect_care")?;
        }
        Ok(out)
    }

    /// The sealed texts of documents `range`.
    fn document_texts(&self, range: Range<usize>) -> anyhow::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(range.len() * 2_400);
        for j in range {
            let d = self.document(j);
            let note = self.vocabulary.note(NOTE_SEED + j as u64, NOTE_BYTES);
            let text_ct = self.keys[d.patient].seal_str(documents::text_field(d.id), &note.text)?;
            write!(out, "{}\t", d.id)?;
            bytea(&mut out, &text_ct);
            out.push(b'\n');
        }
        Ok(out)
    }

    /// The concept rows of documents `range`: a tenth of them only ever
    /// mentioned negated.
    fn document_concepts(&self, range: Range<usize>) -> Vec<u8> {
        let mut out = Vec::with_capacity(range.len() * 22 * 140);
        for j in range {
            let d = self.document(j);
            let mut rng = SplitMix64::new(seed(j, 3));
            for concept in self.concepts.for_document(&mut rng) {
                let mentions = 1 + rng.below(3);
                let negated = if rng.below(10) == 0 { mentions } else { 0 };
                let _ = write!(out, "{}\t{MODEL}\t{}\t", d.id, concept.cui);
                bytea(&mut out, &self.indexes[d.patient]);
                let _ = writeln!(
                    out,
                    "\t{mentions}\t{negated}\t{}\t{}\t{}",
                    rng.below(NOTE_BYTES as u64),
                    d.at.date(),
                    ts(d.at)
                );
            }
        }
        out
    }
}

fn seed(j: usize, stream: u64) -> u64 {
    (j as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03)
}

/// A bytea in COPY's text format (`\\x` and hex; the backslash escaped).
fn bytea(out: &mut Vec<u8>, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.extend_from_slice(b"\\\\x");
    for b in bytes {
        out.push(HEX[usize::from(b >> 4)]);
        out.push(HEX[usize::from(b & 0xf)]);
    }
}

fn ts(t: OffsetDateTime) -> String {
    format!("{} {:02}:{:02}:{:02}.{:03}+00", t.date(), t.hour(), t.minute(), t.second(), t.millisecond())
}

/// Loads the whole dataset; clinician `i` joins team `i`.
pub async fn load(
    db: &PgPool,
    generator: Arc<Generator>,
    keyring: &Keyring,
    clinicians: &[Uuid],
) -> anyhow::Result<Vec<TableLoad>> {
    let set = generator.set;
    let set_aside = SetAside::take(db, COPIED).await?;
    let mut loads = Vec::new();

    let wrapped = Arc::new(generator.data_keys(keyring)?);
    let chunks = (0..wrapped.len()).step_by(CHUNK).map(move |first| {
        let mut out = Vec::new();
        for (w, patient_ref) in &wrapped[first..(first + CHUNK).min(wrapped.len())] {
            write!(out, "{}\t", w.id)?;
            bytea(&mut out, &w.patient_index);
            write!(out, "\t{}\t", w.kek_id)?;
            bytea(&mut out, &w.wrapped);
            out.push(b'\t');
            bytea(&mut out, patient_ref);
            out.push(b'\n');
        }
        Ok(out)
    });
    loads.push(copy_in(db, "data_keys", "(id, patient_index, kek_id, wrapped, patient_ref_ct)", chunks).await?);

    let teams: Vec<Uuid> = (0..set.teams).map(|_| Uuid::now_v7()).collect();
    let names: Vec<String> = (0..set.teams).map(|i| format!("bench-team-{i}")).collect();
    sqlx::query("INSERT INTO care_teams (id, name) SELECT * FROM UNNEST($1::uuid[], $2::text[])")
        .bind(&teams)
        .bind(&names)
        .execute(db)
        .await?;
    sqlx::query("INSERT INTO care_team_members (team_id, user_id) SELECT * FROM UNNEST($1::uuid[], $2::uuid[])")
        .bind(&teams[..clinicians.len()])
        .bind(clinicians)
        .execute(db)
        .await?;
    let g = Arc::clone(&generator);
    let chunks = (0..set.patients)
        .step_by(CHUNK)
        .map(move |first| Ok(g.care_team_patients(&teams, first..(first + CHUNK).min(g.set.patients))));
    loads.push(copy_in(db, "care_team_patients", "(team_id, patient_index)", chunks).await?);

    let g = Arc::clone(&generator);
    let chunks = (0..set.docs).step_by(CHUNK).map(move |first| g.documents(first..(first + CHUNK).min(g.set.docs)));
    let columns = "(id, status, patient_ref_ct, document_date, uploaded_by, created_at, updated_at, \
                   attempts, lane, data_key_id, patient_index, result_model, lawful_basis)";
    loads.push(copy_in(db, "documents", columns, chunks).await?);
    let g = Arc::clone(&generator);
    let chunks =
        (0..set.docs).step_by(CHUNK).map(move |first| g.document_texts(first..(first + CHUNK).min(g.set.docs)));
    loads.push(copy_in(db, "document_texts", "(document_id, text_ct)", chunks).await?);

    let g = Arc::clone(&generator);
    let chunks =
        (0..set.docs).step_by(CHUNK).map(move |first| Ok(g.document_concepts(first..(first + CHUNK).min(g.set.docs))));
    let columns =
        "(document_id, model_version, cui, patient_index, mentions, negated, first_offset, document_date, created_at)";
    loads.push(copy_in(db, "document_concepts", columns, chunks).await?);

    let all = generator.concepts.all();
    sqlx::query(
        "INSERT INTO concept_names (cui, pretty_name, type_ids)
         SELECT c, n, ARRAY[t] FROM UNNEST($1::text[], $2::text[], $3::text[]) AS u(c, n, t)
         ON CONFLICT (cui) DO NOTHING",
    )
    .bind(all.iter().map(|c| c.cui.as_str()).collect::<Vec<_>>())
    .bind(all.iter().map(|c| c.name.as_str()).collect::<Vec<_>>())
    .bind(all.iter().map(|c| c.type_id.as_str()).collect::<Vec<_>>())
    .execute(db)
    .await?;

    set_aside.restore(db, &mut loads).await?;
    Ok(loads)
}

/// Streams `chunks` (made on a blocking thread, a few ahead) into the table.
async fn copy_in<I>(db: &PgPool, table: &'static str, columns: &str, chunks: I) -> anyhow::Result<TableLoad>
where
    I: Iterator<Item = anyhow::Result<Vec<u8>>> + Send + 'static,
{
    let started = Instant::now();
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    let producer = tokio::task::spawn_blocking(move || {
        for chunk in chunks {
            if tx.blocking_send(chunk).is_err() {
                break;
            }
        }
    });
    let mut copy = db.copy_in_raw(&format!("COPY {table} {columns} FROM STDIN")).await?;
    while let Some(chunk) = rx.recv().await {
        match chunk {
            Ok(bytes) => {
                copy.send(bytes).await.with_context(|| format!("COPY into {table}"))?;
            }
            Err(e) => {
                copy.abort("the bench failed to make the rows").await?;
                return Err(e.context(format!("making the rows of {table}")));
            }
        }
    }
    producer.await?;
    let rows = copy.finish().await.with_context(|| format!("COPY into {table}"))?;
    let copy_s = started.elapsed().as_secs_f64();
    eprintln!("   {table}: {rows} rows in {copy_s:.1} s");
    Ok(TableLoad { table, rows, copy_s, rows_per_s: rows as f64 / copy_s, index_s: 0.0, vacuum_s: 0.0 })
}

/// The secondary indexes (those behind no constraint) and the trigger
/// states of tables being loaded, taken off until `restore`. A failed load
/// leaves them off; the bench database is dropped at the end of every run.
struct SetAside {
    tables: Vec<String>,
    /// (table, index name, CREATE INDEX statement)
    indexes: Vec<(String, String, String)>,
    /// (table, trigger, ENABLE … clause) of user triggers not in the default state.
    triggers: Vec<(String, String, &'static str)>,
}

impl SetAside {
    async fn take(db: &PgPool, tables: &[&str]) -> anyhow::Result<Self> {
        let indexes: Vec<(String, String, String)> = sqlx::query_as(
            "SELECT t.relname::text, i.relname::text, pg_get_indexdef(x.indexrelid)
             FROM pg_index x
             JOIN pg_class i ON i.oid = x.indexrelid
             JOIN pg_class t ON t.oid = x.indrelid
             WHERE t.relnamespace = 'public'::regnamespace AND t.relname = ANY($1)
               AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = x.indexrelid)
             ORDER BY 1, 2",
        )
        .bind(tables)
        .fetch_all(db)
        .await?;
        let triggers: Vec<(String, String, String)> = sqlx::query_as(
            "SELECT c.relname::text, g.tgname::text, g.tgenabled::text
             FROM pg_trigger g JOIN pg_class c ON c.oid = g.tgrelid
             WHERE c.relnamespace = 'public'::regnamespace AND c.relname = ANY($1)
               AND NOT g.tgisinternal AND g.tgenabled <> 'O'",
        )
        .bind(tables)
        .fetch_all(db)
        .await?;
        let triggers = triggers
            .into_iter()
            .map(|(t, g, state)| {
                let clause = match state.as_str() {
                    "A" => "ENABLE ALWAYS TRIGGER",
                    "R" => "ENABLE REPLICA TRIGGER",
                    _ => "DISABLE TRIGGER",
                };
                (t, g, clause)
            })
            .collect();
        for (table, index, _) in &indexes {
            eprintln!("   setting aside index {index} of {table}");
            execute(db, format!("DROP INDEX {}", ident(index))).await?;
        }
        for table in tables {
            execute(db, format!("ALTER TABLE {} DISABLE TRIGGER ALL", ident(table))).await?;
        }
        Ok(Self { tables: tables.iter().map(|t| (*t).to_owned()).collect(), indexes, triggers })
    }

    /// Recreates the indexes, puts the triggers back as they were, and
    /// VACUUM (ANALYZE)s each table; the times go to its `TableLoad`.
    async fn restore(self, db: &PgPool, loads: &mut [TableLoad]) -> anyhow::Result<()> {
        let mut conn = db.acquire().await?;
        sqlx::query("SET maintenance_work_mem = '1GB'").execute(&mut *conn).await?;
        for table in &self.tables {
            let started = Instant::now();
            for (_, _, definition) in self.indexes.iter().filter(|(t, _, _)| t == table) {
                sqlx::query(AssertSqlSafe(definition.clone())).execute(&mut *conn).await?;
            }
            execute(&mut *conn, format!("ALTER TABLE {} ENABLE TRIGGER ALL", ident(table))).await?;
            for (_, trigger, clause) in self.triggers.iter().filter(|(t, _, _)| t == table) {
                execute(&mut *conn, format!("ALTER TABLE {} {clause} {}", ident(table), ident(trigger))).await?;
            }
            let index_s = started.elapsed().as_secs_f64();
            let started = Instant::now();
            execute(&mut *conn, format!("VACUUM (ANALYZE) {}", ident(table))).await?;
            let vacuum_s = started.elapsed().as_secs_f64();
            eprintln!("   {table}: indexes {index_s:.1} s, vacuum (analyze) {vacuum_s:.1} s");
            if let Some(load) = loads.iter_mut().find(|l| l.table == table) {
                (load.index_s, load.vacuum_s) = (index_s, vacuum_s);
            }
        }
        Ok(())
    }
}

async fn execute(db: impl sqlx::PgExecutor<'_>, sql: String) -> anyhow::Result<()> {
    sqlx::query(AssertSqlSafe(sql.clone())).execute(db).await.with_context(|| sql)?;
    Ok(())
}

/// A quoted SQL identifier.
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
