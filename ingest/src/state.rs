//! The resume file: append-only JSON Lines of `{"source_ref","id"}`, one line
//! per document the API accepted (or answered `duplicate` for, with the id of
//! the earlier upload), written and flushed as soon as the API answers. A run
//! skips every source_ref already in it, so rerunning after a crash or a stop
//! resumes where the last run left off; a line lost in a crash only means
//! that record is sent again and answered `duplicate`. `wait` reads the ids.
//!
//! A crash can leave a torn last line. Reading ignores it and [`StateWriter`]
//! cuts it off before appending, so the next entry starts on a clean line.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateEntry {
    pub source_ref: String,
    pub id: Uuid,
    /// The API answered `duplicate`: this account uploaded this source_ref
    /// before (in a run whose answer was lost, or with another tool).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub duplicate: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot use state file {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("state file {} is corrupt at line {line}; fix or move it", path.display())]
    Corrupt { path: PathBuf, line: u64 },
}

/// What a state file holds, and where a clean append may start.
#[derive(Debug, Default)]
pub struct State {
    pub entries: Vec<StateEntry>,
    /// Bytes up to the end of the last complete line.
    valid_len: u64,
    /// The last entry parsed but its newline never made it to disk.
    needs_newline: bool,
    /// Whether a partial last line was dropped.
    pub torn_tail: bool,
}

impl State {
    pub fn done_source_refs(&self) -> HashSet<String> {
        self.entries.iter().map(|e| e.source_ref.clone()).collect()
    }

    /// Distinct ids in file order.
    pub fn ids(&self) -> Vec<Uuid> {
        let mut seen = HashSet::new();
        self.entries.iter().map(|e| e.id).filter(|id| seen.insert(*id)).collect()
    }
}

/// Reads a state file; a missing file is an empty state.
pub fn read(path: &Path) -> Result<State, StateError> {
    let io_error = |source| StateError::Io { path: path.to_path_buf(), source };
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(State::default()),
        Err(e) => return Err(io_error(e)),
    };
    let mut reader = BufReader::new(file);
    let (mut state, mut line, mut line_no) = (State::default(), Vec::new(), 0);
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line).map_err(io_error)?;
        if n == 0 {
            return Ok(state);
        }
        line_no += 1;
        let complete = line.ends_with(b"\n");
        if line.iter().all(u8::is_ascii_whitespace) {
            if complete {
                state.valid_len += n as u64;
            }
            continue;
        }
        match serde_json::from_slice::<StateEntry>(&line) {
            Ok(entry) => {
                state.entries.push(entry);
                state.valid_len += n as u64;
                state.needs_newline = !complete;
            }
            Err(_) if !complete => state.torn_tail = true,
            Err(_) => {
                return Err(StateError::Corrupt { path: path.to_path_buf(), line: line_no });
            }
        }
    }
}

/// Appends entries to the state file, one `write` per line.
pub struct StateWriter {
    path: PathBuf,
    file: File,
}

impl StateWriter {
    /// Opens `path` for appending after what `state` (read from the same
    /// path) found valid, cutting off a torn last line.
    pub fn open(path: &Path, state: &State) -> Result<Self, StateError> {
        let io_error = |source| StateError::Io { path: path.to_path_buf(), source };
        let mut file = OpenOptions::new().create(true).append(true).open(path).map_err(io_error)?;
        if state.torn_tail {
            file.set_len(state.valid_len).map_err(io_error)?;
        }
        if state.needs_newline {
            file.write_all(b"\n").map_err(io_error)?;
        }
        Ok(Self { path: path.to_path_buf(), file })
    }

    pub fn append(&mut self, entry: &StateEntry) -> Result<(), StateError> {
        let mut line =
            serde_json::to_vec(entry).map_err(|e| StateError::Io { path: self.path.clone(), source: e.into() })?;
        line.push(b'\n');
        // `File` is unbuffered: the line reaches the OS in this one call.
        self.file
            .write_all(&line)
            .and_then(|()| self.file.flush())
            .map_err(|source| StateError::Io { path: self.path.clone(), source })
    }

    /// Asks the OS to put the appended lines on disk (end of run).
    pub fn sync(&self) -> Result<(), StateError> {
        self.file.sync_data().map_err(|source| StateError::Io { path: self.path.clone(), source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::TempDir;

    fn entry(source_ref: &str, id: Option<Uuid>) -> StateEntry {
        StateEntry { source_ref: source_ref.into(), id: id.unwrap_or(Uuid::nil()), duplicate: false }
    }

    #[test]
    fn a_missing_file_is_an_empty_state() {
        let dir = TempDir::new("state-missing");
        let state = read(&dir.path().join("none.jsonl")).unwrap();
        assert!(state.entries.is_empty() && !state.torn_tail);
    }

    #[test]
    fn written_entries_are_read_back_for_the_next_run() {
        let dir = TempDir::new("state-roundtrip");
        let path = dir.path().join("state.jsonl");
        let id = Uuid::new_v4();
        let mut writer = StateWriter::open(&path, &read(&path).unwrap()).unwrap();
        writer.append(&entry("a.txt", Some(id))).unwrap();
        writer.append(&StateEntry { duplicate: true, ..entry("b.txt", Some(id)) }).unwrap();
        writer.append(&entry("c.txt", None)).unwrap();
        drop(writer);

        let state = read(&path).unwrap();
        let done = state.done_source_refs();
        assert!(done.contains("a.txt") && done.contains("b.txt") && done.contains("c.txt"));
        assert!(!done.contains("d.txt"));
        assert_eq!(state.ids(), [id, Uuid::nil()]);
        assert!(state.entries[1].duplicate && !state.entries[0].duplicate);
    }

    #[test]
    fn a_torn_last_line_is_ignored_and_cut_before_appending() {
        let dir = TempDir::new("state-torn");
        let path = dir.write(
            "state.jsonl",
            "{\"source_ref\":\"a.txt\",\"id\":\"00000000-0000-0000-0000-000000000000\"}\n{\"source_ref\":\"b.t",
        );
        let state = read(&path).unwrap();
        assert!(state.torn_tail);
        assert_eq!(state.entries, [entry("a.txt", None)]);

        let mut writer = StateWriter::open(&path, &state).unwrap();
        writer.append(&entry("b.txt", None)).unwrap();
        drop(writer);
        let state = read(&path).unwrap();
        assert!(!state.torn_tail);
        assert_eq!(state.entries, [entry("a.txt", None), entry("b.txt", None)]);
    }

    #[test]
    fn a_complete_last_line_without_newline_is_kept() {
        let dir = TempDir::new("state-nonl");
        let path =
            dir.write("state.jsonl", "{\"source_ref\":\"a.txt\",\"id\":\"00000000-0000-0000-0000-000000000000\"}");
        let state = read(&path).unwrap();
        assert_eq!(state.entries.len(), 1);
        let mut writer = StateWriter::open(&path, &state).unwrap();
        writer.append(&entry("b.txt", None)).unwrap();
        drop(writer);
        assert_eq!(read(&path).unwrap().entries.len(), 2);
    }

    #[test]
    fn a_corrupt_middle_line_is_an_error() {
        let dir = TempDir::new("state-corrupt");
        let path = dir
            .write("state.jsonl", "{\"source_ref\":\"a\",\"id\":\"00000000-0000-0000-0000-000000000000\"}\ngarbage\n{\"source_ref\":\"b\",\"id\":\"00000000-0000-0000-0000-000000000000\"}\n");
        let err = read(&path).unwrap_err().to_string();
        assert!(err.contains("corrupt at line 2"), "{err}");
    }
}
