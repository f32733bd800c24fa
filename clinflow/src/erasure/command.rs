//! `erasures …` (the api offers it as `clinflow-api erasures`): the
//! erasure journal against a database, above all a copy just restored from
//! a backup (`scripts/restore` runs `erasures reapply`).

use std::collections::BTreeSet;
use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use secrecy::ExposeSecret;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use super::{Counts, ErasureError, Journal, erase_rows};
use crate::audit::{Action, AuditEvent, Operator, Outcome};
use crate::checkpoint::hex;
use crate::config;
use crate::crypto::IndexKey;
use crate::outbox;

#[derive(Subcommand)]
pub enum ErasuresCommand {
    /// Apply every erasure of the journal again to the database of
    /// DATABASE_URL (as its schema owner): for a copy restored from a
    /// backup, before any service uses it. All or nothing, each erasure that
    /// found rows audited; fails if any entry fails its check
    /// (ERASURE_JOURNAL_KEY) or the copy holds documents erasure cannot find.
    Reapply {
        /// The journal directory (ERASURE_JOURNAL_DIR of the api).
        #[arg(long, env = "ERASURE_JOURNAL_DIR")]
        journal: PathBuf,
    },
    /// Check every entry of the journal and count them; changes nothing.
    Check {
        #[arg(long, env = "ERASURE_JOURNAL_DIR")]
        journal: PathBuf,
    },
}

/// What a re-application did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reapplied {
    /// Entries in the journal.
    pub entries: usize,
    /// Entries that still found rows (erased after the backup was taken).
    pub applied: usize,
    pub counts: Counts,
}

/// Runs `command`, as `tool` (the binary that runs it) for the audit trail.
pub async fn run(command: ErasuresCommand, tool: &str) -> anyhow::Result<()> {
    let key = || Ok::<_, anyhow::Error>(IndexKey::new(config::secret_bytes("ERASURE_JOURNAL_KEY")?));
    match command {
        ErasuresCommand::Check { journal } => {
            let entries = Journal::new(journal, key()?).read_all()?;
            println!("erasure journal: {} entries, every one intact", entries.len());
            Ok(())
        }
        ErasuresCommand::Reapply { journal } => {
            let journal = Journal::new(journal, key()?);
            let operator = Operator::from_env(tool)?;
            let url = crate::tls::postgres_url("DATABASE_URL")?;
            let db = PgPoolOptions::new()
                .max_connections(1)
                .connect(url.expose_secret())
                .await
                .context("connecting to PostgreSQL (DATABASE_URL)")?;
            let done = reapply(&db, &journal, &operator).await?;
            let c = done.counts;
            println!(
                "erasure journal re-applied: {} entries, {} found rows again (documents {}, results {}, \
                 concepts {}, team entries {}, break-glass grants {}, data keys {})",
                done.entries, done.applied, c.documents, c.results, c.concepts, c.team_entries, c.grants, c.data_keys
            );
            Ok(())
        }
    }
}

/// Applies every erasure of `journal` again to `db`, in one transaction.
/// Each entry's patient is found by the blind index it names and by the
/// data keys it names (so a copy whose index key differs still loses every
/// patient that had a key). Every entry is checked before anything changes.
pub async fn reapply(db: &PgPool, journal: &Journal, operator: &Operator) -> Result<Reapplied, ErasureError> {
    let entries = journal.read_all()?;
    let mut done = Reapplied { entries: entries.len(), ..Reapplied::default() };
    let mut tx = db.begin().await?;
    for entry in &entries {
        let mut indexes: BTreeSet<Vec<u8>> = entry.index().into_iter().collect();
        indexes.extend(
            sqlx::query_scalar!("SELECT patient_index FROM data_keys WHERE id = ANY($1)", &entry.data_keys)
                .fetch_all(&mut *tx)
                .await?,
        );
        let mut found = Counts::default();
        for index in &indexes {
            let (counts, _) = erase_rows(&mut tx, index).await?;
            if counts.is_empty() {
                continue;
            }
            found.add(counts);
            let event = AuditEvent::new(Action::PatientEraseReapply, operator.actor.clone(), Outcome::Success)
                .resource("patient", &hex(index))
                .reason(&format!("journal_event:{}", entry.audit_event_id));
            let message = outbox::Message::audit(&operator.signer, &event)
                .map_err(|e| ErasureError::Database(sqlx::Error::Encode(Box::new(e))))?;
            outbox::enqueue(&mut tx, &[message]).await?;
        }
        if !found.is_empty() {
            done.applied += 1;
            done.counts.add(found);
        }
    }
    tx.commit().await?;
    Ok(done)
}
