//! Deterministic synthetic clinical notes of about 1 KB, written from the
//! concept list the dev MedCAT model is built from, so the real model finds
//! concepts in them. Note `i` is the same on every run and every machine.

use std::path::Path;

use anyhow::Context;

/// Concept names grouped the way a note uses them.
pub struct Vocabulary {
    problems: Vec<String>,
    drugs: Vec<String>,
    findings: Vec<String>,
    procedures: Vec<String>,
}

#[derive(Debug, serde::Deserialize)]
struct ConceptRow {
    name: String,
    type_ids: String,
}

impl Vocabulary {
    pub fn load(concepts_csv: &Path) -> anyhow::Result<Self> {
        let mut reader = csv::Reader::from_path(concepts_csv)
            .with_context(|| format!("reading the concept list {}", concepts_csv.display()))?;
        let mut v = Self { problems: vec![], drugs: vec![], findings: vec![], procedures: vec![] };
        for row in reader.deserialize::<ConceptRow>() {
            let row = row.context("a row of the concept list")?;
            let bucket = match row.type_ids.as_str() {
                "T121" => &mut v.drugs,
                "T184" | "T033" => &mut v.findings,
                "T060" | "T061" => &mut v.procedures,
                _ => &mut v.problems,
            };
            bucket.push(row.name);
        }
        anyhow::ensure!(
            [&v.problems, &v.drugs, &v.findings, &v.procedures].iter().all(|b| !b.is_empty()),
            "the concept list lacks problems, drugs, findings or procedures"
        );
        Ok(v)
    }

    /// Note number `index`: about `target_bytes` of text (never more than
    /// `target_bytes` + one sentence).
    pub fn note(&self, index: u64, target_bytes: usize) -> Note {
        let mut rng = SplitMix64(index.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x00C1_F10F);
        let mut text = format!(
            "Clinic letter. Seen today in the outpatient clinic, accompanied by a relative. Age {}.\n",
            18 + rng.below(80)
        );
        while text.len() < target_bytes {
            let sentence = match rng.below(6) {
                0 => format!("Past medical history of {} and {}.", rng.pick(&self.problems), rng.pick(&self.problems)),
                1 => format!("Current medication: {} and {} daily.", rng.pick(&self.drugs), rng.pick(&self.drugs)),
                2 => format!("Presents with {} for {} days.", rng.pick(&self.findings), 1 + rng.below(14)),
                3 => format!("Plan: {} next week; continue {}.", rng.pick(&self.procedures), rng.pick(&self.drugs)),
                4 => format!("No evidence of {} on examination.", rng.pick(&self.problems)),
                _ => format!(
                    "Observations stable: temperature 36.{} °C, pulse {} bpm, SpO₂ {}% on room air.",
                    rng.below(10),
                    60 + rng.below(40),
                    94 + rng.below(6)
                ),
            };
            text.push_str(&sentence);
            text.push(if rng.below(4) == 0 { '\n' } else { ' ' });
        }
        Note { patient_ref: format!("BENCH-{:06}", index % 5_000), text }
    }
}

#[derive(Debug, Clone)]
pub struct Note {
    pub patient_ref: String,
    pub text: String,
}

/// A tiny, well-known PRNG: enough for reproducible test data, and no
/// dependency whose output could change with its version.
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn pick<'a>(&mut self, items: &'a [String]) -> &'a str {
        let i = usize::try_from(self.below(items.len() as u64)).unwrap_or(0);
        &items[i]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocabulary() -> Vocabulary {
        Vocabulary::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../dev/medcat/concepts.csv")).unwrap()
    }

    #[test]
    fn notes_are_deterministic_and_about_the_requested_size() {
        let v = vocabulary();
        let a = v.note(42, 1_000);
        assert_eq!(a.text, v.note(42, 1_000).text);
        assert_ne!(a.text, v.note(43, 1_000).text);
        for i in 0..200 {
            let n = v.note(i, 1_000);
            assert!((1_000..1_200).contains(&n.text.len()), "note {i}: {} bytes", n.text.len());
        }
    }

    #[test]
    fn notes_name_concepts_of_the_list() {
        let v = vocabulary();
        let note = v.note(7, 1_000).text;
        let found = v.drugs.iter().chain(&v.problems).filter(|name| note.contains(name.as_str())).count();
        assert!(found >= 3, "{note}");
    }
}
