//! The rejects file: one JSON line `{"source_ref","reason"}` per record that
//! was not uploaded. It describes the latest run only, so a stale file from an
//! earlier run is removed at the start and the file is created on the first
//! reject.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::source::Rejection;

#[derive(Debug, thiserror::Error)]
#[error("cannot write rejects file {}: {source}", path.display())]
pub struct RejectsError {
    path: PathBuf,
    #[source]
    source: io::Error,
}

pub struct RejectsFile {
    path: PathBuf,
    file: Option<BufWriter<File>>,
    written: u64,
}

impl RejectsFile {
    pub fn start(path: &Path) -> Result<Self, RejectsError> {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(RejectsError { path: path.to_path_buf(), source });
            }
        }
        Ok(Self { path: path.to_path_buf(), file: None, written: 0 })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn written(&self) -> u64 {
        self.written
    }

    pub fn write(&mut self, rejection: &Rejection) -> Result<(), RejectsError> {
        let result = (|| {
            let file = match &mut self.file {
                Some(file) => file,
                None => self.file.insert(BufWriter::new(File::create(&self.path)?)),
            };
            serde_json::to_writer(&mut *file, rejection)?;
            file.write_all(b"\n")?;
            file.flush()
        })();
        self.written += 1;
        result.map_err(|source| RejectsError { path: self.path.clone(), source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::TempDir;

    #[test]
    fn removes_a_stale_file_and_writes_one_line_per_reject() {
        let dir = TempDir::new("rejects");
        let path = dir.write("rejects.jsonl", "stale\n");
        let mut rejects = RejectsFile::start(&path).unwrap();
        assert!(!path.exists());
        for n in 1..=2 {
            rejects
                .write(&Rejection { source_ref: format!("f.jsonl:{n}"), reason: "line 1: missing text".into() })
                .unwrap();
        }
        let content = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<Rejection> = content.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1].source_ref, "f.jsonl:2");
        assert_eq!(rejects.written(), 2);
    }
}
