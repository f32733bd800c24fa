//! Input readers. Every reader is a lazy iterator of [`Record`]s so that a
//! million-note input is streamed, never held in memory.
//!
//! A record that cannot be uploaded (no patient_ref, a bad date, an unparsable
//! line, ...) becomes a [`Rejection`] and the stream goes on; only an I/O
//! failure on the input itself stops it. Rejection reasons name fields and
//! line numbers, never the values, because the values are PHI.

mod csv_file;
mod folder;
pub mod front_matter;
mod jsonl;
mod record;

use std::path::{Path, PathBuf};

pub use csv_file::CsvSource;
pub use folder::FolderSource;
pub use jsonl::JsonlSource;
pub use record::{Document, Record, RecordResult, Records, Rejection, SourceError};

/// What kind of input a path is, decided from the file system and extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InputKind {
    Folder,
    Jsonl,
    Csv,
}

fn input_kind(path: &Path) -> Result<InputKind, SourceError> {
    let meta = std::fs::metadata(path).map_err(|e| SourceError::io(path, e))?;
    if meta.is_dir() {
        return Ok(InputKind::Folder);
    }
    let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("jsonl" | "ndjson") => Ok(InputKind::Jsonl),
        Some("csv") => Ok(InputKind::Csv),
        _ => Err(SourceError::Unsupported { path: path.to_path_buf() }),
    }
}

/// Opens one input. Errors that make the whole input unusable (missing file,
/// unknown type, CSV header without a required column) show up here, before
/// anything is uploaded.
///
/// Default source_refs are built from the absolute path, so that two folders
/// holding the same file names give different source_refs, and a rerun from
/// another working directory gives the same ones.
pub fn open(path: &Path) -> Result<Records, SourceError> {
    let kind = input_kind(path)?;
    let path = std::fs::canonicalize(path).map_err(|e| SourceError::io(path, e))?;
    Ok(match kind {
        InputKind::Folder => Box::new(FolderSource::open(&path)?),
        InputKind::Jsonl => Box::new(JsonlSource::open(&path)?),
        InputKind::Csv => Box::new(CsvSource::open(&path)?),
    })
}

/// Opens every input up front (so a typo in the last one fails fast) and
/// chains them in the order given.
pub fn open_all(paths: &[PathBuf]) -> Result<Records, SourceError> {
    let opened = paths.iter().map(|p| open(p)).collect::<Result<Vec<_>, _>>()?;
    Ok(Box::new(opened.into_iter().flatten()))
}

/// Counts the records of the inputs (for the progress bar's length and ETA).
/// Cheap compared with uploading: it reads but does not parse the notes.
pub fn count_records(paths: &[PathBuf]) -> Result<u64, SourceError> {
    let mut total = 0;
    for path in paths {
        total += match input_kind(path)? {
            InputKind::Folder => folder::count(path)?,
            InputKind::Jsonl => jsonl::count(path)?,
            InputKind::Csv => csv_file::count(path)?,
        };
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsupported_input_is_an_error() {
        let dir = crate::test_support::TempDir::new("unsupported");
        let file = dir.write("notes.xml", "<x/>");
        assert!(matches!(open(&file), Err(SourceError::Unsupported { .. })));
        assert!(matches!(open(&dir.path().join("missing.csv")), Err(SourceError::Io { .. })));
    }
}
