//! The erasure journal: one file per erasure in a directory outside the
//! database (`ERASURE_JOURNAL_DIR`), so that no backup of the database
//! holds it and a restore of an older backup can be followed by the
//! erasures made since (`erasures reapply`). Each entry names the patient by
//! blind index and by the ids of the data keys destroyed (never the
//! reference), with the time and the audit event id, and is authenticated
//! with HMAC-SHA256 under `ERASURE_JOURNAL_KEY`: an entry altered or forged
//! without the key is refused, and so is the whole journal with it.
//!
//! File: `<erased_at as yyyymmddThhmmss.ffffffZ>-<audit event id>.entry`,
//! two lines: the entry as JSON, then the hex MAC of that line. Written to
//! a `.tmp` name, synced, renamed, and the directory synced; a `.tmp` left
//! behind is an entry whose erasure never committed (the entry is written
//! before the commit) and is ignored.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::checkpoint::{hex, unhex};
use crate::config::{self, ConfigError};
use crate::crypto::IndexKey;

const MAC_DOMAIN: &str = "clinflow/erasure-journal/v1";
const SUFFIX: &str = ".entry";

/// One erasure, as the journal keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The patient's blind index (hex), under the index key of the time.
    pub patient_index: String,
    /// The data keys the erasure destroyed: a copy restored from before it
    /// holds them under the same ids, whatever its index key.
    pub data_keys: Vec<Uuid>,
    #[serde(with = "time::serde::rfc3339")]
    pub erased_at: OffsetDateTime,
    /// The `patient.erase` audit event of the erasure.
    pub audit_event_id: Uuid,
}

impl Entry {
    pub fn index(&self) -> Option<Vec<u8>> {
        unhex(&self.patient_index)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("erasure journal {dir}: {source}")]
    Io { dir: PathBuf, source: std::io::Error },
    /// Names the file only: an entry's content is never echoed.
    #[error(
        "erasure journal entry {file} fails its check (altered, damaged, or made with another ERASURE_JOURNAL_KEY)"
    )]
    Tampered { file: String },
    #[error("erasure journal entry {file} exists already")]
    Exists { file: String },
}

/// The journal directory and the key its entries are authenticated with.
pub struct Journal {
    dir: PathBuf,
    key: IndexKey,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal").field("dir", &self.dir).finish_non_exhaustive()
    }
}

impl Journal {
    pub fn new(dir: impl Into<PathBuf>, key: IndexKey) -> Self {
        Self { dir: dir.into(), key }
    }

    /// `ERASURE_JOURNAL_DIR` with `ERASURE_JOURNAL_KEY` (a secret of at
    /// least 32 bytes), both or neither; `None` when neither is set.
    pub fn from_env() -> Result<Option<Self>, ConfigError> {
        match config::optional("ERASURE_JOURNAL_DIR")? {
            None => match config::optional("ERASURE_JOURNAL_KEY")? {
                Some(_) => Err(ConfigError::new("ERASURE_JOURNAL_DIR", "is not set, but ERASURE_JOURNAL_KEY is")),
                None => Ok(None),
            },
            Some(dir) => Ok(Some(Self::new(dir, IndexKey::new(config::secret_bytes("ERASURE_JOURNAL_KEY")?)))),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends `entry`, durably (synced, then renamed into place, then the
    /// directory synced) before it returns.
    pub async fn append(&self, entry: &Entry) -> Result<PathBuf, JournalError> {
        let line = serde_json::to_string(entry).map_err(|e| self.io(std::io::Error::other(e)))?;
        let content = format!("{line}\n{}\n", hex(&self.key.hash(MAC_DOMAIN, line.as_bytes())));
        let at = entry.erased_at.to_offset(time::UtcOffset::UTC);
        let name = format!(
            "{:04}{:02}{:02}T{:02}{:02}{:02}.{:06}Z-{}{SUFFIX}",
            at.year(),
            u8::from(at.month()),
            at.day(),
            at.hour(),
            at.minute(),
            at.second(),
            at.microsecond(),
            entry.audit_event_id
        );
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || write_durably(&dir, &name, content.as_bytes()))
            .await
            .map_err(|e| self.io(std::io::Error::other(e)))?
    }

    /// Every entry, oldest first, each checked; the first that fails its
    /// check fails the whole read (a restore must not go on without it).
    pub fn read_all(&self) -> Result<Vec<Entry>, JournalError> {
        let mut names = Vec::new();
        for item in std::fs::read_dir(&self.dir).map_err(|e| self.io(e))? {
            let name = item.map_err(|e| self.io(e))?.file_name().to_string_lossy().into_owned();
            if name.ends_with(SUFFIX) {
                names.push(name);
            }
        }
        names.sort();
        names.iter().map(|name| self.read_one(name)).collect()
    }

    fn read_one(&self, name: &str) -> Result<Entry, JournalError> {
        let tampered = || JournalError::Tampered { file: name.to_owned() };
        let content = std::fs::read_to_string(self.dir.join(name)).map_err(|e| self.io(e))?;
        let mut lines = content.lines();
        let (Some(line), Some(mac), None) = (lines.next(), lines.next(), lines.next()) else { return Err(tampered()) };
        let mac = unhex(mac).ok_or_else(tampered)?;
        if !self.key.verify(MAC_DOMAIN, line.as_bytes(), &mac) {
            return Err(tampered());
        }
        let entry: Entry = serde_json::from_str(line).map_err(|_| tampered())?;
        // The name is not covered by the MAC; the event id in it must agree.
        if !name.contains(&entry.audit_event_id.to_string()) || entry.index().is_none() {
            return Err(tampered());
        }
        Ok(entry)
    }

    fn io(&self, source: std::io::Error) -> JournalError {
        JournalError::Io { dir: self.dir.clone(), source }
    }
}

fn write_durably(dir: &Path, name: &str, content: &[u8]) -> Result<PathBuf, JournalError> {
    let io = |source| JournalError::Io { dir: dir.to_owned(), source };
    let path = dir.join(name);
    if path.exists() {
        return Err(JournalError::Exists { file: name.to_owned() });
    }
    let tmp = dir.join(format!("{name}.tmp"));
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp).map_err(io)?;
    file.write_all(content).map_err(io)?;
    file.sync_all().map_err(io)?;
    drop(file);
    std::fs::rename(&tmp, &path).map_err(io)?;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use secrecy::SecretBox;

    use super::*;

    fn key(byte: u8) -> IndexKey {
        IndexKey::new(SecretBox::new(Box::new((0..32).map(|i| i ^ byte).collect())))
    }

    fn entry() -> Entry {
        Entry {
            patient_index: hex(&[7; 32]),
            data_keys: vec![Uuid::now_v7()],
            erased_at: OffsetDateTime::now_utc(),
            audit_event_id: Uuid::now_v7(),
        }
    }

    #[tokio::test]
    async fn entries_read_back_and_an_altered_one_or_another_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::new(dir.path(), key(1));
        let (first, second) = (entry(), entry());
        journal.append(&first).await.unwrap();
        let path = journal.append(&second).await.unwrap();
        assert_eq!(journal.read_all().unwrap(), vec![first.clone(), second.clone()]);
        assert!(matches!(journal.append(&first).await, Err(JournalError::Exists { .. })));
        // A leftover of an interrupted write is not an entry.
        std::fs::write(dir.path().join("x.entry.tmp"), "half").unwrap();
        assert_eq!(journal.read_all().unwrap().len(), 2);

        assert!(matches!(Journal::new(dir.path(), key(2)).read_all(), Err(JournalError::Tampered { .. })));
        let text = std::fs::read_to_string(&path).unwrap();
        let other = hex(&[8; 32]);
        std::fs::write(&path, text.replace(&second.patient_index, &other)).unwrap();
        let refused = journal.read_all().unwrap_err();
        assert!(matches!(&refused, JournalError::Tampered { file } if path.ends_with(file)), "{refused}");
        assert!(!refused.to_string().contains(&other), "no content in the error");
    }
}
