//! CSV with a header row naming `patient_ref` and `text` (required) and
//! `source_ref`, `document_date` (optional), in any order. Quoted fields may
//! span lines. A record that lacks a field becomes a rejection carrying its
//! record and line numbers.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use csv::{ByteRecord, ReaderBuilder};

use super::record::{RawFields, Record, RecordResult, SourceError, file_label, validate};

#[derive(Debug, Clone, Copy)]
struct Columns {
    patient_ref: usize,
    text: usize,
    source_ref: Option<usize>,
    document_date: Option<usize>,
    width: usize,
}

pub struct CsvSource<R = File> {
    path: PathBuf,
    label: String,
    reader: csv::Reader<R>,
    columns: Columns,
    record: ByteRecord,
    record_no: u64,
}

impl CsvSource {
    pub fn open(path: &Path) -> Result<Self, SourceError> {
        let file = File::open(path).map_err(|e| SourceError::io(path, e))?;
        Self::from_reader(path, file)
    }
}

impl<R: Read> CsvSource<R> {
    /// The CSV that `reader` yields; `path` names it in errors and in
    /// default source_refs.
    pub fn from_reader(path: &Path, reader: R) -> Result<Self, SourceError> {
        let csv_error = |source| SourceError::Csv { path: path.to_path_buf(), source };
        let mut reader = ReaderBuilder::new().flexible(true).from_reader(reader);
        let header = reader.byte_headers().map_err(csv_error)?;
        let columns =
            Columns::find(header).map_err(|column| SourceError::MissingColumn { path: path.to_path_buf(), column })?;
        Ok(Self {
            path: path.to_path_buf(),
            label: file_label(path),
            reader,
            columns,
            record: ByteRecord::new(),
            record_no: 0,
        })
    }
}

impl Columns {
    /// Returns the name of a required column that is missing.
    fn find(header: &ByteRecord) -> Result<Self, &'static str> {
        let position = |name: &str| {
            header.iter().position(|h| {
                let h = String::from_utf8_lossy(h);
                h.trim_start_matches('\u{feff}').trim().eq_ignore_ascii_case(name)
            })
        };
        Ok(Self {
            patient_ref: position("patient_ref").ok_or("patient_ref")?,
            text: position("text").ok_or("text")?,
            source_ref: position("source_ref"),
            document_date: position("document_date"),
            width: header.len(),
        })
    }
}

impl<R: Read> Iterator for CsvSource<R> {
    type Item = RecordResult;

    fn next(&mut self) -> Option<RecordResult> {
        match self.reader.read_byte_record(&mut self.record) {
            Ok(true) => {}
            Ok(false) => return None,
            Err(source) => {
                return Some(Err(SourceError::Csv { path: self.path.clone(), source }));
            }
        }
        self.record_no += 1;
        let default_ref = format!("{}:{}", self.label, self.record_no);
        let line = self.record.position().map_or(0, csv::Position::line);
        let location = format!("record {} (line {line}): ", self.record_no);
        Some(Ok(to_record(&self.record, self.columns, default_ref, &location)))
    }
}

pub(super) fn count(path: &Path) -> Result<u64, SourceError> {
    let mut reader = ReaderBuilder::new()
        .flexible(true)
        .from_path(path)
        .map_err(|source| SourceError::Csv { path: path.to_path_buf(), source })?;
    let mut record = ByteRecord::new();
    let mut n = 0;
    while reader
        .read_byte_record(&mut record)
        .map_err(|source| SourceError::Csv { path: path.to_path_buf(), source })?
    {
        n += 1;
    }
    Ok(n)
}

fn to_record(record: &ByteRecord, columns: Columns, default_ref: String, location: &str) -> Record {
    if record.len() != columns.width {
        let reason = format!("{location}has {} fields but the header has {}", record.len(), columns.width);
        return Record::rejected(default_ref, reason);
    }
    let field = |index: Option<usize>, name: &'static str| -> Result<Option<String>, &'static str> {
        match index.and_then(|i| record.get(i)) {
            None => Ok(None),
            Some(bytes) => std::str::from_utf8(bytes).map(|s| Some(s.to_owned())).map_err(|_| name),
        }
    };
    let fields = (|| {
        let source_ref = field(columns.source_ref, "source_ref")?;
        let raw = RawFields {
            patient_ref: field(Some(columns.patient_ref), "patient_ref")?,
            text: field(Some(columns.text), "text")?,
            document_date: field(columns.document_date, "document_date")?,
        };
        Ok::<_, &'static str>((source_ref, raw))
    })();
    match fields {
        Ok((source_ref, raw)) => {
            let source_ref = source_ref.filter(|s| !s.trim().is_empty()).unwrap_or(default_ref);
            validate(source_ref, location, raw)
        }
        Err(name) => Record::rejected(default_ref, format!("{location}{name} is not valid UTF-8")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::TempDir;

    /// (file name part of the source_ref, reason or "ok").
    fn summarize(records: &[Record]) -> Vec<(&str, &str)> {
        records
            .iter()
            .map(|r| match r {
                Record::Rejected(r) => (file_name(&r.source_ref), r.reason.as_str()),
                Record::Document(d) => (file_name(&d.source_ref), "ok"),
            })
            .collect()
    }

    fn file_name(source_ref: &str) -> &str {
        source_ref.rsplit('/').next().unwrap_or(source_ref)
    }

    fn read_all(content: &str) -> Vec<Record> {
        let dir = TempDir::new("csv");
        let path = dir.write("export.csv", content);
        CsvSource::open(&path).unwrap().map(Result::unwrap).collect()
    }

    #[test]
    fn reads_columns_in_any_order_with_quoted_multiline_text() {
        let records =
            read_all("text,document_date,patient_ref\n\"Line one,\nline \"\"two\"\"\",2026-02-14,P1\nplain,,P2\n");
        assert_eq!(summarize(&records), [("export.csv:1", "ok"), ("export.csv:2", "ok")]);
        let Record::Document(first) = &records[0] else { panic!("expected a document") };
        assert_eq!(first.text, "Line one,\nline \"two\"");
        assert_eq!(first.patient_ref, "P1");
        assert!(first.document_date.is_some());
        let Record::Document(second) = &records[1] else { panic!("expected a document") };
        assert_eq!(second.document_date, None);
    }

    #[test]
    fn uses_the_source_ref_column_when_present() {
        let records = read_all("\u{feff}Source_Ref,patient_ref,text\nehr-1,P,t\n,P,t\n");
        assert_eq!(summarize(&records), [("ehr-1", "ok"), ("export.csv:2", "ok")]);
    }

    #[test]
    fn bad_records_become_rejects_with_record_and_line_numbers() {
        let records = read_all(concat!(
            "patient_ref,text,document_date\n",
            "P1,\"multi\nline\",2026-01-01\n",
            "P2,short\n",
            ",secret text,\n",
            "P4,text,yesterday\n",
            "P5,fine,\n",
        ));
        assert_eq!(
            summarize(&records),
            [
                ("export.csv:1", "ok"),
                ("export.csv:2", "record 2 (line 4): has 2 fields but the header has 3"),
                ("export.csv:3", "record 3 (line 5): missing patient_ref"),
                ("export.csv:4", "record 4 (line 6): invalid document_date (expected YYYY-MM-DD)"),
                ("export.csv:5", "ok"),
            ]
        );
    }

    #[test]
    fn invalid_utf8_in_a_field_is_a_reject() {
        let dir = TempDir::new("csv-utf8");
        let path = dir.write_bytes("x.csv", b"patient_ref,text\nP,\xff\xfe\n");
        let records: Vec<_> = CsvSource::open(&path).unwrap().map(Result::unwrap).collect();
        assert_eq!(summarize(&records), [("x.csv:1", "record 1 (line 2): text is not valid UTF-8")]);
    }

    #[test]
    fn a_header_without_required_columns_fails_at_open() {
        let dir = TempDir::new("csv-header");
        let path = dir.write("x.csv", "patient_ref,body\nP,t\n");
        let err = CsvSource::open(&path).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.ends_with("the CSV header has no `text` column"), "{err}");
    }

    #[test]
    fn counts_records_not_lines() {
        let dir = TempDir::new("csv-count");
        let path = dir.write("x.csv", "patient_ref,text\nP,\"a\nb\nc\"\nP,d\n");
        assert_eq!(count(&path).unwrap(), 2);
    }
}
