//! A record as every reader yields it: a document to upload or a rejection
//! (a reason that names fields and lines, never values), and the checks
//! that decide which.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use time::Date;
use time::macros::format_description;

/// One note, validated and ready to upload.
#[derive(Clone, PartialEq, Eq)]
pub struct Document {
    pub source_ref: String,
    pub patient_ref: String,
    pub text: String,
    pub document_date: Option<Date>,
}

impl Document {
    /// The API's upload body for this note.
    pub fn upload(&self, care_team: Option<&str>) -> clinflow::wire::UploadRequest {
        clinflow::wire::UploadRequest {
            patient_ref: self.patient_ref.clone(),
            text: self.text.clone(),
            source_ref: Some(self.source_ref.clone()),
            document_date: self.document_date.map(|d| d.to_string()),
            care_team: care_team.map(str::to_owned),
            // The account's default basis (a service account's, set by an admin).
            lawful_basis: None,
            consent_ref: None,
        }
    }
}

// Hand-written so that `{:?}` can never put PHI in a log line.
impl fmt::Debug for Document {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Document")
            .field("source_ref", &self.source_ref)
            .field("patient_ref", &"<redacted>")
            .field("text_bytes", &self.text.len())
            .field("document_date", &self.document_date.map(|_| "<redacted>"))
            .finish()
    }
}

/// A record that will not be uploaded, and why (no PHI in `reason`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Rejection {
    pub source_ref: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Document(Document),
    Rejected(Rejection),
}

impl Record {
    pub fn source_ref(&self) -> &str {
        match self {
            Record::Document(doc) => &doc.source_ref,
            Record::Rejected(rejection) => &rejection.source_ref,
        }
    }

    pub(crate) fn rejected(source_ref: String, reason: impl Into<String>) -> Self {
        Record::Rejected(Rejection { source_ref, reason: reason.into() })
    }
}

/// A failure of the input itself (not of one record): it ends the run.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{}: unsupported input (expected a folder, a .jsonl/.ndjson file or a .csv file)",
        path.display()
    )]
    Unsupported { path: PathBuf },
    #[error("{}: the CSV header has no `{column}` column", path.display())]
    MissingColumn { path: PathBuf, column: &'static str },
    #[error("cannot read {}: {source}", path.display())]
    Csv {
        path: PathBuf,
        #[source]
        source: csv::Error,
    },
}

impl SourceError {
    pub(crate) fn io(path: &Path, source: io::Error) -> Self {
        SourceError::Io { path: path.to_path_buf(), source }
    }
}

pub type RecordResult = Result<Record, SourceError>;
pub type Records = Box<dyn Iterator<Item = RecordResult> + Send>;

/// The fields every reader extracts, before validation.
#[derive(Default)]
pub(crate) struct RawFields {
    pub patient_ref: Option<String>,
    pub text: Option<String>,
    pub document_date: Option<String>,
}

/// Validates the fields shared by every input format. `location` prefixes the
/// reason (e.g. "line 12: ") so a reject can be found in its file.
pub(crate) fn validate(source_ref: String, location: &str, raw: RawFields) -> Record {
    let patient_ref = match raw.patient_ref.as_deref().map(str::trim) {
        Some(p) if !p.is_empty() => p.to_owned(),
        _ => return Record::rejected(source_ref, format!("{location}missing patient_ref")),
    };
    let Some(text) = raw.text else {
        return Record::rejected(source_ref, format!("{location}missing text"));
    };
    if text.trim().is_empty() {
        return Record::rejected(source_ref, format!("{location}empty text"));
    }
    let document_date = match raw.document_date.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(d) => match parse_date(d) {
            Some(date) => Some(date),
            None => {
                return Record::rejected(source_ref, format!("{location}invalid document_date (expected YYYY-MM-DD)"));
            }
        },
    };
    Record::Document(Document { source_ref, patient_ref, text, document_date })
}

fn parse_date(s: &str) -> Option<Date> {
    Date::parse(s, format_description!("[year]-[month]-[day]")).ok()
}

/// The file name used in default source_refs (`/data/notes.jsonl:12`).
pub(crate) fn file_label(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(p: Option<&str>, t: Option<&str>, d: Option<&str>) -> RawFields {
        RawFields { patient_ref: p.map(str::to_owned), text: t.map(str::to_owned), document_date: d.map(str::to_owned) }
    }

    fn reason(record: Record) -> String {
        match record {
            Record::Rejected(r) => r.reason,
            Record::Document(d) => panic!("expected a rejection, got {d:?}"),
        }
    }

    #[test]
    fn validate_accepts_a_full_record_and_trims_patient_ref() {
        let record = validate("a".into(), "", raw(Some(" PAT-1 "), Some("note"), Some("2026-02-14")));
        let Record::Document(doc) = record else {
            panic!("expected a document");
        };
        assert_eq!(doc.patient_ref, "PAT-1");
        assert_eq!(doc.text, "note");
        assert_eq!(doc.document_date.map(|d| d.to_string()).as_deref(), Some("2026-02-14"));
    }

    #[test]
    fn validate_rejects_without_echoing_values() {
        assert_eq!(reason(validate("a".into(), "", raw(None, Some("x"), None))), "missing patient_ref");
        assert_eq!(reason(validate("a".into(), "", raw(Some("  "), Some("x"), None))), "missing patient_ref");
        assert_eq!(reason(validate("a".into(), "line 3: ", raw(Some("P"), None, None))), "line 3: missing text");
        assert_eq!(reason(validate("a".into(), "", raw(Some("P"), Some(" \n\t"), None))), "empty text");
        let bad_date = reason(validate("a".into(), "", raw(Some("P"), Some("x"), Some("14/02/2026"))));
        assert_eq!(bad_date, "invalid document_date (expected YYYY-MM-DD)");
        assert!(!bad_date.contains("14/02"));
        let impossible = reason(validate("a".into(), "", raw(Some("P"), Some("x"), Some("2026-02-30"))));
        assert!(impossible.starts_with("invalid document_date"));
    }

    #[test]
    fn empty_date_means_no_date() {
        let Record::Document(doc) = validate("a".into(), "", raw(Some("P"), Some("x"), Some(""))) else {
            panic!("expected a document");
        };
        assert_eq!(doc.document_date, None);
    }

    #[test]
    fn debug_output_redacts_phi() {
        let doc = Document {
            source_ref: "a.txt".into(),
            patient_ref: "PAT-SECRET".into(),
            text: "the patient has a secret".into(),
            document_date: None,
        };
        let shown = format!("{doc:?}");
        assert!(shown.contains("a.txt"));
        assert!(!shown.contains("SECRET") && !shown.contains("secret"));
    }
}
