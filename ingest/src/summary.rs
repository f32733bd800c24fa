//! End-of-run summaries. Aggregate counts only: no patient_ref, no text.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use serde::Serialize;

use crate::client::AnnotationView;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LoadCounts {
    pub uploaded: u64,
    /// Already in the state file, or answered 409 (uploaded before).
    pub skipped: u64,
    pub rejected: u64,
    /// Still failing after the retries (or stopped by a fatal API answer).
    pub failed: u64,
}

#[derive(Debug, Clone, Copy)]
pub struct LoadSummary {
    pub counts: LoadCounts,
    pub elapsed: Duration,
}

impl fmt::Display for LoadSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let LoadCounts { uploaded, skipped, rejected, failed } = self.counts;
        let secs = self.elapsed.as_secs_f64();
        let rate = if secs > 0.0 { uploaded as f64 / secs } else { 0.0 };
        write!(
            f,
            "uploaded {uploaded}, skipped {skipped} (already done), rejected {rejected}, \
             failed {failed} in {secs:.1}s ({rate:.1} docs/s)"
        )
    }
}

/// Per concept: in how many documents it occurs, and how often in all.
#[derive(Debug, Default)]
pub struct ConceptTally {
    concepts: HashMap<String, ConceptCount>,
}

#[derive(Debug, Default)]
struct ConceptCount {
    pretty_name: String,
    documents: u64,
    mentions: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TopConcept {
    pub cui: String,
    pub pretty_name: String,
    pub documents: u64,
    pub mentions: u64,
}

impl ConceptTally {
    pub fn add_document(&mut self, annotations: &[AnnotationView]) {
        let mut in_this_document: HashMap<&str, (&str, u64)> = HashMap::new();
        for annotation in annotations {
            let entry = in_this_document.entry(annotation.cui.as_str()).or_insert((annotation.pretty_name.as_str(), 0));
            entry.1 += 1;
        }
        for (cui, (pretty_name, mentions)) in in_this_document {
            let count = self.concepts.entry(cui.to_owned()).or_default();
            if count.pretty_name.is_empty() {
                pretty_name.clone_into(&mut count.pretty_name);
            }
            count.documents += 1;
            count.mentions += mentions;
        }
    }

    /// Most widespread first; ties by mentions, then by CUI for a stable order.
    pub fn top(&self, n: usize) -> Vec<TopConcept> {
        let mut all: Vec<_> = self
            .concepts
            .iter()
            .map(|(cui, c)| TopConcept {
                cui: cui.clone(),
                pretty_name: c.pretty_name.clone(),
                documents: c.documents,
                mentions: c.mentions,
            })
            .collect();
        all.sort_by(|a, b| (b.documents, b.mentions).cmp(&(a.documents, a.mentions)).then_with(|| a.cui.cmp(&b.cui)));
        all.truncate(n);
        all
    }
}

/// The result of `wait`; serialized as is for `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct WaitSummary {
    pub done: u64,
    pub failed: u64,
    pub pending: u64,
    /// State entries without an id (409 answers without one): not checked.
    pub without_id: u64,
    pub elapsed_seconds: f64,
    pub top_concepts: Vec<TopConcept>,
}

impl WaitSummary {
    pub fn all_done(&self) -> bool {
        self.failed == 0 && self.pending == 0
    }
}

impl fmt::Display for WaitSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "documents: done {}, failed {}, pending {} in {:.1}s",
            self.done, self.failed, self.pending, self.elapsed_seconds
        )?;
        if self.without_id > 0 {
            writeln!(f, "({} state entries have no id and were not checked)", self.without_id)?;
        }
        if self.top_concepts.is_empty() {
            return writeln!(f, "no concepts found");
        }
        let count_width = self.top_concepts.iter().map(|c| c.documents.to_string().len()).max().unwrap_or(0).max(5);
        let cui_width = self.top_concepts.iter().map(|c| c.cui.len()).max().unwrap_or(0).max(3);
        writeln!(f, "{:>count_width$}  {:<cui_width$}  pretty_name", "count", "cui")?;
        for c in &self.top_concepts {
            writeln!(f, "{:>count_width$}  {:<cui_width$}  {}", c.documents, c.cui, c.pretty_name)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(cui: &str, name: &str) -> AnnotationView {
        AnnotationView { cui: cui.into(), pretty_name: name.into() }
    }

    #[test]
    fn load_summary_line() {
        let summary = LoadSummary {
            counts: LoadCounts { uploaded: 90, skipped: 5, rejected: 3, failed: 0 },
            elapsed: Duration::from_millis(4500),
        };
        assert_eq!(
            summary.to_string(),
            "uploaded 90, skipped 5 (already done), rejected 3, failed 0 in 4.5s (20.0 docs/s)"
        );
    }

    #[test]
    fn concepts_are_ranked_by_documents_then_mentions() {
        let mut tally = ConceptTally::default();
        tally.add_document(&[ann("C1", "Fever"), ann("C1", "Fever"), ann("C2", "Cough")]);
        tally.add_document(&[ann("C2", "Cough"), ann("C3", "Rash")]);
        tally.add_document(&[ann("C1", "Fever")]);
        tally.add_document(&[]);
        let top = tally.top(2);
        assert_eq!(
            top,
            [
                TopConcept { cui: "C1".into(), pretty_name: "Fever".into(), documents: 2, mentions: 3 },
                TopConcept { cui: "C2".into(), pretty_name: "Cough".into(), documents: 2, mentions: 2 },
            ]
        );
    }

    #[test]
    fn wait_summary_text_and_json() {
        let summary = WaitSummary {
            done: 3,
            failed: 1,
            pending: 0,
            without_id: 0,
            elapsed_seconds: 2.24,
            top_concepts: vec![TopConcept {
                cui: "C0011849".into(),
                pretty_name: "Diabetes mellitus".into(),
                documents: 2,
                mentions: 5,
            }],
        };
        assert_eq!(
            summary.to_string(),
            "documents: done 3, failed 1, pending 0 in 2.2s\ncount  cui       pretty_name\n    2  C0011849  Diabetes mellitus\n"
        );
        assert!(!summary.all_done());
        let json: serde_json::Value = serde_json::to_value(&summary).unwrap();
        assert_eq!(json["top_concepts"][0]["documents"], 2);
        assert_eq!(json["pending"], 0);
    }
}
