//! `keys …`, the operator's side of envelope encryption (the api offers it
//! as `clinflow-api keys`). The work is in [`rotation`]; this reads the
//! environment, connects as the schema owner and reports progress on
//! stderr, the outcome on stdout.

use std::io::BufRead;

use anyhow::Context;
use clap::{ArgGroup, Subcommand};
use secrecy::ExposeSecret;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use uuid::Uuid;

use crate::audit::Operator;
use crate::config;
use crate::crypto::IndexKey;
use crate::keys::Keys;
use crate::keys::rotation::{self, Batches};

#[derive(Subcommand)]
pub enum KeysCommand {
    /// Data keys per key-encryption key (KEK), and format-1 rows left.
    Status,
    /// Re-wrap every data key not under the primary KEK (the first of
    /// CLINFLOW_MASTER_KEY) under it, in batches; no document is decrypted.
    /// Resumable: run it again after an interruption. Afterwards the old KEK
    /// can be removed from CLINFLOW_MASTER_KEY.
    Rotate {
        /// Data keys per transaction.
        #[arg(long, default_value_t = 1000)]
        batch: i64,
    },
    /// Replace data keys suspected compromised: a new key per patient,
    /// every document, result and break-glass reason of the patient sealed
    /// again under it, the old key deleted (one transaction per patient).
    #[command(group(ArgGroup::new("which").required(true).args(["data_key", "patient_stdin", "all"])))]
    Reencrypt {
        /// A data key by id (repeatable).
        #[arg(long)]
        data_key: Vec<Uuid>,
        /// The patient whose reference is read from stdin (one line), so it
        /// never appears in a process list or a shell history.
        #[arg(long)]
        patient_stdin: bool,
        /// Every data key that exists when the command starts.
        #[arg(long)]
        all: bool,
    },
    /// Seal the ciphertexts written before envelope keys (format 1, directly
    /// under the master key, KEK "1") again under their patients' data keys;
    /// afterwards KEK "1" can be retired. Resumable.
    MigrateV1 {
        /// Documents per transaction.
        #[arg(long, default_value_t = 500)]
        batch: i64,
    },
    /// Seal each patient's reference beside their data key, for keys
    /// created before the concept endpoints read it there (they fall back
    /// to one of the patient's documents meanwhile). Resumable.
    SealRefs {
        /// Data keys per transaction.
        #[arg(long, default_value_t = 1000)]
        batch: i64,
    },
}

/// Runs `command`; each step is audited as the operator's, through `tool`
/// (the binary that runs it).
pub async fn run(command: KeysCommand, tool: &str) -> anyhow::Result<()> {
    let keys = Keys::new(config::master_keys()?);
    let db = owner_pool().await?;
    let operator = Operator::from_env(tool)?;
    let batches = |size: i64| Batches { db: &db, keys: &keys, operator: &operator, size: size.max(1) };
    match command {
        KeysCommand::Status => status(&db, &keys).await,
        KeysCommand::Rotate { batch } => {
            let pending = rotation::pending_rotation(&db, &keys).await?;
            let total: i64 = pending.iter().map(|(_, n)| n).sum();
            let from: Vec<String> = pending.iter().map(|(kek, n)| format!("{n} under {kek:?}")).collect();
            eprintln!("rotating {total} data keys to KEK {:?} ({})", keys.keyring().primary(), from.join(", "));
            let done = rotation::rotate(batches(batch), |done| {
                eprintln!("re-wrapped {done}/{total}");
            })
            .await?;
            println!("{done} data keys re-wrapped; every data key is under KEK {:?}", keys.keyring().primary());
            Ok(())
        }
        KeysCommand::Reencrypt { data_key, patient_stdin, all } => {
            let ids = if all {
                rotation::keys_created_before(&db, time::OffsetDateTime::now_utc()).await?
            } else if patient_stdin {
                vec![patient_key(&db).await?]
            } else {
                data_key
            };
            let total = ids.len();
            for (n, id) in ids.into_iter().enumerate() {
                let r =
                    rotation::reencrypt(&db, &keys, &operator, id).await.with_context(|| format!("data key {id}"))?;
                eprintln!(
                    "{}/{total}: data key {} replaced by {} ({} documents, {} results, {} break-glass reasons)",
                    n + 1,
                    r.old_key,
                    r.new_key,
                    r.documents,
                    r.results,
                    r.grants
                );
            }
            println!("{total} data keys replaced");
            Ok(())
        }
        KeysCommand::MigrateV1 { batch } => {
            let index_key = IndexKey::new(config::secret_bytes("CLINFLOW_INDEX_KEY")?);
            let (documents, grants) = rotation::migrate_v1(batches(batch), &index_key, |done| {
                eprintln!("migrated {done} documents");
            })
            .await?;
            println!("{documents} documents and {grants} break-glass reasons moved to data keys; no format-1 row left");
            Ok(())
        }
        KeysCommand::SealRefs { batch } => {
            let done = rotation::seal_refs(batches(batch), |done| {
                eprintln!("sealed {done} patient references");
            })
            .await?;
            println!("{done} patient references sealed beside their data keys");
            Ok(())
        }
    }
}

/// As the schema owner: `MIGRATION_DATABASE_URL`, or `DATABASE_URL` if unset.
async fn owner_pool() -> anyhow::Result<PgPool> {
    let url = match config::optional("MIGRATION_DATABASE_URL")? {
        Some(_) => crate::tls::postgres_url("MIGRATION_DATABASE_URL")?,
        None => crate::tls::postgres_url("DATABASE_URL")?,
    };
    PgPoolOptions::new().max_connections(2).connect(url.expose_secret()).await.context("connecting to PostgreSQL")
}

async fn patient_key(db: &PgPool) -> anyhow::Result<Uuid> {
    let index_key = IndexKey::new(config::secret_bytes("CLINFLOW_INDEX_KEY")?);
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).context("reading the patient reference from stdin")?;
    let patient_ref = line.trim();
    anyhow::ensure!(!patient_ref.is_empty(), "no patient reference on stdin");
    let index = crate::documents::patient_index(&index_key, patient_ref);
    rotation::key_of_patient(db, &index).await?.context("this patient has no data key (nothing stored for them)")
}

async fn status(db: &PgPool, keys: &Keys) -> anyhow::Result<()> {
    let rows = sqlx::query!(r#"SELECT kek_id, count(*) AS "n!" FROM data_keys GROUP BY kek_id ORDER BY kek_id"#)
        .fetch_all(db)
        .await?;
    for r in rows {
        let note = match r.kek_id.as_str() {
            k if k == keys.keyring().primary() => "primary",
            k if keys.keyring().holds(k) => "held, not primary: run keys rotate",
            _ => "NOT HELD: these keys cannot be opened",
        };
        println!("{:>10} data keys under KEK {:?} ({note})", r.n, r.kek_id);
    }
    let v1 = sqlx::query_scalar!(r#"SELECT count(*) AS "n!" FROM documents WHERE data_key_id IS NULL"#)
        .fetch_one(db)
        .await?;
    println!("{v1:>10} documents of format 1 (run keys migrate-v1)");
    let unsealed = sqlx::query_scalar!(
        r#"SELECT count(*) AS "n!" FROM data_keys k
           WHERE patient_ref_ct IS NULL AND EXISTS (SELECT FROM documents d WHERE d.data_key_id = k.id)"#
    )
    .fetch_one(db)
    .await?;
    println!("{unsealed:>10} data keys without their patient's reference (run keys seal-refs)");
    Ok(())
}
