//! Lawful basis and retention: why each document is held (GDPR Art. 6 and
//! 9), how long each basis allows, and the purge that removes what is kept
//! longer (`clinflow-api purge`) or whose research consent was withdrawn.
//!
//! A purge deletes the documents with their results and concept rows
//! (`purge_documents()`, migrations/20261208000030_lawful_basis_and_retention.sql)
//! and, for a patient left with nothing, destroys the data key
//! (crypto-shredding), a batch per transaction with one audit event per
//! document in the same transaction's outbox.

use std::time::Instant;

use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::audit::{Action, AuditEvent, Operator, Outcome};
use crate::config::{self, ConfigError};
use crate::crypto::IndexKey;
use crate::outbox;

/// Documents purged, by basis (a counter of the process that purged them).
pub const PURGED: &str = "clinflow_documents_purged_total";

/// Domain of consent references' hashes under the index key.
pub const CONSENT_DOMAIN: &str = "consents.ref";

/// Why a document is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Basis {
    /// Care of the patient (GDPR Art. 6(1)(e), 9(2)(h)).
    DirectCare,
    /// Research, on the patient's consent (Art. 6(1)(a), 9(2)(a)): each
    /// document names its consent, and its withdrawal purges them.
    Research,
    /// A legal obligation (Art. 6(1)(c)).
    LegalObligation,
}

pub const BASES: [Basis; 3] = [Basis::DirectCare, Basis::Research, Basis::LegalObligation];

impl Basis {
    pub fn as_str(self) -> &'static str {
        match self {
            Basis::DirectCare => "direct_care",
            Basis::Research => "research",
            Basis::LegalObligation => "legal_obligation",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        BASES.into_iter().find(|b| b.as_str() == s)
    }
}

/// The blind index of a consent reference.
pub fn consent_index(key: &IndexKey, consent_ref: &str) -> Vec<u8> {
    key.hash(CONSENT_DOMAIN, consent_ref.as_bytes())
}

/// How long each basis allows a document to be kept, in whole years from its
/// date (its upload date when it has none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub direct_care_years: u32,
    pub research_years: u32,
    pub legal_obligation_years: u32,
}

impl Default for Policy {
    /// England's Records Management Code keeps adult records 8 years after
    /// the last treatment; research data and legal records are kept 10 here.
    fn default() -> Self {
        Self { direct_care_years: 8, research_years: 10, legal_obligation_years: 10 }
    }
}

impl Policy {
    /// `RETENTION_YEARS_DIRECT_CARE`, `RETENTION_YEARS_RESEARCH`,
    /// `RETENTION_YEARS_LEGAL_OBLIGATION` (whole years, at least 1).
    pub fn from_env() -> Result<Self, ConfigError> {
        let years = |name: &'static str, default: u32| -> Result<u32, ConfigError> {
            match config::optional(name)? {
                None => Ok(default),
                Some(v) => match v.trim().parse::<u32>() {
                    Ok(n) if (1..=200).contains(&n) => Ok(n),
                    _ => Err(ConfigError::new(name, "must be a whole number of years, 1-200")),
                },
            }
        };
        let default = Self::default();
        Ok(Self {
            direct_care_years: years("RETENTION_YEARS_DIRECT_CARE", default.direct_care_years)?,
            research_years: years("RETENTION_YEARS_RESEARCH", default.research_years)?,
            legal_obligation_years: years("RETENTION_YEARS_LEGAL_OBLIGATION", default.legal_obligation_years)?,
        })
    }

    fn years(self) -> [i32; 3] {
        [self.direct_care_years, self.research_years, self.legal_obligation_years].map(|y| y as i32)
    }
}

/// Which documents a purge removes.
#[derive(Debug, Clone)]
pub enum Selection {
    /// Those kept longer than their basis allows.
    Expired(Policy),
    /// The research documents resting on this consent (its blind index):
    /// the consent was withdrawn.
    Consent(Vec<u8>),
}

impl Selection {
    fn reason(&self, basis: &str) -> String {
        match self {
            Selection::Expired(_) => format!("retention:{basis}"),
            Selection::Consent(_) => "consent_withdrawn".to_owned(),
        }
    }
}

/// Documents a purge would remove, by basis (the dry run).
pub async fn count(db: &PgPool, selection: &Selection) -> Result<Vec<(Basis, i64)>, sqlx::Error> {
    let rows: Vec<(String, i64)> = match selection {
        Selection::Expired(policy) => {
            let [care, research, legal] = policy.years();
            sqlx::query!(
                r#"SELECT lawful_basis, count(*) AS "n!" FROM documents
                   WHERE (lawful_basis = 'direct_care'
                          AND retention_date(document_date, created_at) < current_date - make_interval(years => $1))
                      OR (lawful_basis = 'research'
                          AND retention_date(document_date, created_at) < current_date - make_interval(years => $2))
                      OR (lawful_basis = 'legal_obligation'
                          AND retention_date(document_date, created_at) < current_date - make_interval(years => $3))
                   GROUP BY lawful_basis"#,
                care,
                research,
                legal,
            )
            .fetch_all(db)
            .await?
            .into_iter()
            .map(|r| (r.lawful_basis, r.n))
            .collect()
        }
        Selection::Consent(index) => sqlx::query!(
            r#"SELECT lawful_basis, count(*) AS "n!" FROM documents WHERE consent_index = $1 GROUP BY lawful_basis"#,
            index
        )
        .fetch_all(db)
        .await?
        .into_iter()
        .map(|r| (r.lawful_basis, r.n))
        .collect(),
    };
    Ok(BASES.into_iter().map(|b| (b, rows.iter().find(|r| r.0 == b.as_str()).map_or(0, |r| r.1))).collect())
}

/// What a purge removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Purged {
    pub documents: i64,
    pub results: i64,
    pub concepts: i64,
    /// Patients left with nothing: their data keys destroyed.
    pub data_keys: i64,
    /// Documents removed, by basis (in [`BASES`] order).
    pub by_basis: [i64; 3],
}

/// Removes the selected documents, `batch` per transaction, each audited
/// (`document.purge`, naming the patient) by `operator` in the same
/// transaction's outbox; `progress` hears the running total after each
/// batch. Rows another transaction holds are skipped, not waited for (a
/// later run takes them). Returns what went; the caller wakes its relay.
pub async fn purge(
    db: &PgPool,
    selection: &Selection,
    operator: &Operator,
    batch: i64,
    mut progress: impl FnMut(&Purged),
) -> Result<Purged, sqlx::Error> {
    let mut total = Purged::default();
    loop {
        let started = Instant::now();
        let mut tx = db.begin().await?;
        let done = purge_batch(&mut tx, selection, operator, batch, &mut total).await?;
        tx.commit().await?;
        metrics::histogram!("clinflow_purge_batch_seconds").record(started.elapsed().as_secs_f64());
        progress(&total);
        if done < batch {
            return Ok(total);
        }
    }
}

async fn purge_batch(
    tx: &mut PgConnection,
    selection: &Selection,
    operator: &Operator,
    batch: i64,
    total: &mut Purged,
) -> Result<i64, sqlx::Error> {
    // Each basis's expired documents are a range of documents_retention_idx;
    // rows another transaction holds are skipped, not waited for.
    let docs: Vec<(Uuid, Option<Vec<u8>>, String)> = match selection {
        Selection::Expired(policy) => {
            let [care, research, legal] = policy.years();
            sqlx::query!(
                r#"SELECT id, patient_index, lawful_basis FROM documents
                   WHERE (lawful_basis = 'direct_care'
                          AND retention_date(document_date, created_at) < current_date - make_interval(years => $1))
                      OR (lawful_basis = 'research'
                          AND retention_date(document_date, created_at) < current_date - make_interval(years => $2))
                      OR (lawful_basis = 'legal_obligation'
                          AND retention_date(document_date, created_at) < current_date - make_interval(years => $3))
                   LIMIT $4 FOR UPDATE SKIP LOCKED"#,
                care,
                research,
                legal,
                batch,
            )
            .fetch_all(&mut *tx)
            .await?
            .into_iter()
            .map(|r| (r.id, r.patient_index, r.lawful_basis))
            .collect()
        }
        Selection::Consent(index) => sqlx::query!(
            "SELECT id, patient_index, lawful_basis FROM documents WHERE consent_index = $1
             LIMIT $2 FOR UPDATE SKIP LOCKED",
            index,
            batch
        )
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .map(|r| (r.id, r.patient_index, r.lawful_basis))
        .collect(),
    };
    if docs.is_empty() {
        return Ok(0);
    }
    let ids: Vec<Uuid> = docs.iter().map(|d| d.0).collect();
    let gone = sqlx::query!(
        r#"SELECT documents AS "documents!", results AS "results!", concepts AS "concepts!",
                  data_keys AS "data_keys!" FROM purge_documents($1)"#,
        &ids
    )
    .fetch_one(&mut *tx)
    .await?;
    let mut messages = Vec::with_capacity(docs.len());
    for (id, patient_index, basis) in &docs {
        let mut event = AuditEvent::new(Action::DocumentPurge, operator.actor.clone(), Outcome::Success)
            .document(*id)
            .reason(&selection.reason(basis));
        if let Some(patient) = patient_index {
            event = event.patient(patient);
        }
        messages.push(outbox::Message::audit(&operator.signer, &event).map_err(|e| sqlx::Error::Encode(Box::new(e)))?);
        if let Some(i) = BASES.iter().position(|b| b.as_str() == basis) {
            total.by_basis[i] += 1;
            metrics::counter!(PURGED, "basis" => BASES[i].as_str()).increment(1);
        }
    }
    outbox::enqueue(&mut *tx, &messages).await?;
    total.documents += gone.documents;
    total.results += gone.results;
    total.concepts += gone.concepts;
    total.data_keys += gone.data_keys;
    Ok(docs.len() as i64)
}
