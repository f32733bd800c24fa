//! Every `*.txt` file under a folder, recursively, in path order, read lazily.
//!
//! The walk is a depth-first search over directories whose entries are sorted
//! by name, which yields exactly the order of sorting all relative paths
//! (`Path` compares component by component) while holding only the listings
//! of the directories on the current branch in memory.

use std::fs;
use std::path::{Path, PathBuf};

use super::front_matter;
use super::record::{RawFields, Record, RecordResult, SourceError, validate};

pub struct FolderSource {
    walk: TxtWalk,
}

impl FolderSource {
    pub fn open(root: &Path) -> Result<Self, SourceError> {
        Ok(Self { walk: TxtWalk::new(root)? })
    }
}

impl Iterator for FolderSource {
    type Item = RecordResult;

    fn next(&mut self) -> Option<RecordResult> {
        let path = match self.walk.next()? {
            Ok(path) => path,
            Err(e) => return Some(Err(e)),
        };
        Some(Ok(read_note(&path)))
    }
}

pub(super) fn count(root: &Path) -> Result<u64, SourceError> {
    let mut n = 0;
    for path in TxtWalk::new(root)? {
        path?;
        n += 1;
    }
    Ok(n)
}

fn read_note(path: &Path) -> Record {
    // The walk starts at the canonical folder, so this is an absolute path.
    let default_ref = path.to_string_lossy().into_owned();
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) => return Record::rejected(default_ref, format!("cannot read file: {}", e.kind())),
    };
    let Ok(content) = String::from_utf8(bytes) else {
        return Record::rejected(default_ref, "file is not valid UTF-8");
    };
    let fm = match front_matter::parse(&content) {
        Ok(fm) => fm,
        Err(e) => return Record::rejected(default_ref, e.to_string()),
    };
    let source_ref = match fm.source_ref {
        Some(s) if !s.is_empty() => s.to_owned(),
        _ => default_ref,
    };
    let raw = RawFields {
        patient_ref: fm.patient_ref.map(str::to_owned),
        text: Some(fm.text.to_owned()),
        document_date: fm.document_date.map(str::to_owned),
    };
    validate(source_ref, "", raw)
}

/// Paths of `*.txt` files (extension case-insensitive) in path order.
/// Symbolic links to directories are not followed (no cycles).
struct TxtWalk {
    stack: Vec<std::vec::IntoIter<PathBuf>>,
}

impl TxtWalk {
    fn new(root: &Path) -> Result<Self, SourceError> {
        Ok(Self { stack: vec![sorted_entries(root)?.into_iter()] })
    }
}

impl Iterator for TxtWalk {
    type Item = Result<PathBuf, SourceError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let top = self.stack.last_mut()?;
            let Some(path) = top.next() else {
                self.stack.pop();
                continue;
            };
            let meta = match fs::symlink_metadata(&path) {
                Ok(meta) => meta,
                Err(e) => return Some(Err(SourceError::io(&path, e))),
            };
            if meta.is_dir() {
                match sorted_entries(&path) {
                    Ok(entries) => self.stack.push(entries.into_iter()),
                    Err(e) => return Some(Err(e)),
                }
            } else if is_txt(&path) && (meta.is_file() || path.is_file()) {
                return Some(Ok(path));
            }
        }
    }
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>, SourceError> {
    let mut entries = fs::read_dir(dir)
        .and_then(|rd| rd.map(|e| e.map(|e| e.path())).collect::<Result<Vec<_>, _>>())
        .map_err(|e| SourceError::io(dir, e))?;
    entries.sort();
    Ok(entries)
}

fn is_txt(path: &Path) -> bool {
    path.extension().is_some_and(|ext| ext.eq_ignore_ascii_case("txt"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::TempDir;

    fn note(patient: &str, body: &str) -> String {
        format!("---\npatient_ref: {patient}\ndocument_type: x\n---\n{body}")
    }

    /// Source refs relative to the folder (they are absolute paths).
    fn refs_and_reasons(dir: &TempDir) -> Vec<(String, Option<String>)> {
        let root = format!("{}/", dir.path().display());
        let relative = |r: String| r.strip_prefix(&root).map(str::to_owned).unwrap_or(r);
        FolderSource::open(dir.path())
            .unwrap()
            .map(|r| match r.unwrap() {
                Record::Document(d) => (relative(d.source_ref), None),
                Record::Rejected(r) => (relative(r.source_ref), Some(r.reason)),
            })
            .collect()
    }

    #[test]
    fn walks_txt_files_recursively_in_path_order() {
        let dir = TempDir::new("folder-order");
        dir.write("b.txt", &note("P2", "b"));
        dir.write("a/z.txt", &note("P1", "az"));
        dir.write("a/b/c.txt", &note("P1", "abc"));
        dir.write("a.txt", &note("P3", "a"));
        dir.write("a/readme.md", "not a note");
        dir.write("UPPER.TXT", &note("P4", "upper"));
        let refs: Vec<_> = refs_and_reasons(&dir).into_iter().map(|(r, _)| r).collect();
        assert_eq!(refs, ["UPPER.TXT", "a/b/c.txt", "a/z.txt", "a.txt", "b.txt"]);
        assert_eq!(count(dir.path()).unwrap(), 5);
    }

    #[test]
    fn reads_fields_and_text() {
        let dir = TempDir::new("folder-fields");
        dir.write("n.txt", "---\r\npatient_ref: PAT-9\r\ndocument_date: 2026-01-02\r\n---\r\nBody\r\n");
        let Some(Ok(Record::Document(doc))) = FolderSource::open(dir.path()).unwrap().next() else {
            panic!("expected a document");
        };
        assert_eq!(doc.source_ref, dir.path().join("n.txt").to_string_lossy());
        assert_eq!(doc.patient_ref, "PAT-9");
        assert_eq!(doc.text, "Body\r\n");
        assert!(doc.document_date.is_some());
    }

    #[test]
    fn front_matter_source_ref_overrides_the_path() {
        let dir = TempDir::new("folder-ref");
        dir.write("n.txt", "---\npatient_ref: P\nsource_ref: ehr-77\n---\nx");
        let refs = refs_and_reasons(&dir);
        assert_eq!(refs, [("ehr-77".to_owned(), None)]);
    }

    #[test]
    fn bad_files_become_rejects_and_the_walk_goes_on() {
        let dir = TempDir::new("folder-rejects");
        dir.write("1-missing.txt", "no front matter here");
        dir.write("2-empty.txt", "---\npatient_ref: P\n---\n  \n");
        dir.write("3-nopatient.txt", "---\ndocument_date: 2026-01-01\n---\ntext");
        dir.write_bytes("4-binary.txt", &[0xff, 0xfe, 0x00]);
        dir.write("5-good.txt", &note("P", "fine"));
        let got = refs_and_reasons(&dir);
        let reasons: Vec<_> = got.iter().map(|(_, r)| r.as_deref()).collect();
        assert_eq!(
            reasons,
            [
                Some("missing front matter (the file must start with a `---` line)"),
                Some("empty text"),
                Some("missing patient_ref"),
                Some("file is not valid UTF-8"),
                None,
            ]
        );
    }

    #[test]
    fn the_same_file_names_in_two_folders_have_different_source_refs() {
        let (a, b) = (TempDir::new("folder-a"), TempDir::new("folder-b"));
        a.write("n.txt", &note("P1", "a"));
        b.write("n.txt", &note("P2", "b"));
        let refs: Vec<String> = crate::source::open_all(&[a.path().to_path_buf(), b.path().to_path_buf()])
            .unwrap()
            .map(|r| r.unwrap().source_ref().to_owned())
            .collect();
        assert_eq!(refs.len(), 2);
        assert_ne!(refs[0], refs[1]);
        assert!(refs.iter().all(|r| Path::new(r).is_absolute() && r.ends_with("/n.txt")), "{refs:?}");
    }
}
