//! The concepts of the query benchmark and how often each appears: the 100
//! CUIs of dev/medcat/concepts.csv, commonest first, then a synthetic tail
//! (`BENCH00101` …), concept number `r` (from 1) in a share of the documents
//! falling as `r^-EXPONENT` (Zipf-like): the commonest in a third of the
//! documents, concept 100 in 2.4 %, the last in 0.4 %, about 20 per document.
//!
//! Why a tail: the notes generator picks names uniformly and does not keep
//! their CUIs, and 15–25 concepts per document drawn from 100 CUIs would put
//! the average concept in a fifth of all documents, so none could be rare.

use std::path::Path;

use anyhow::Context;

use crate::notes::SplitMix64;

/// Concepts in all, the real ones included.
const CONCEPTS: usize = 2_000;
/// Share of the documents that name the commonest concept.
const TOP_SHARE: f64 = 1.0 / 3.0;
const EXPONENT: f64 = 0.57;

pub struct Concept {
    pub cui: String,
    pub name: String,
    pub type_id: String,
}

pub struct Concepts {
    list: Vec<Concept>,
    /// Share of the documents naming each concept.
    share: Vec<f64>,
    /// Running sum of `share`, for picking a concept as often as documents name it.
    cumulative: Vec<f64>,
}

#[derive(serde::Deserialize)]
struct Row {
    cui: String,
    name: String,
    name_status: String,
    type_ids: String,
}

impl Concepts {
    pub fn load(concepts_csv: &Path) -> anyhow::Result<Self> {
        let mut reader = csv::Reader::from_path(concepts_csv)
            .with_context(|| format!("reading the concept list {}", concepts_csv.display()))?;
        let mut list: Vec<Concept> = Vec::new();
        for row in reader.deserialize::<Row>() {
            let row = row.context("a row of the concept list")?;
            // One entry per CUI, under its preferred name (status P).
            match list.iter_mut().find(|c| c.cui == row.cui) {
                Some(c) if row.name_status == "P" => c.name = row.name,
                Some(_) => {}
                None => list.push(Concept { cui: row.cui, name: row.name, type_id: row.type_ids }),
            }
        }
        for r in list.len() + 1..=CONCEPTS {
            list.push(Concept {
                cui: format!("BENCH{r:05}"),
                name: format!("bench concept {r}"),
                type_id: "T047".into(),
            });
        }
        let share: Vec<f64> = (1..=list.len()).map(|r| TOP_SHARE * (r as f64).powf(-EXPONENT)).collect();
        let cumulative = share
            .iter()
            .scan(0.0, |sum, s| {
                *sum += s;
                Some(*sum)
            })
            .collect();
        Ok(Self { list, share, cumulative })
    }

    pub fn all(&self) -> &[Concept] {
        &self.list
    }

    /// Concepts a document names, on average.
    pub fn per_document(&self) -> f64 {
        self.share.iter().sum()
    }

    /// The concepts of one document: each concept with its own share.
    pub fn for_document(&self, rng: &mut SplitMix64) -> Vec<&Concept> {
        self.list.iter().zip(&self.share).filter(|(_, share)| rng.unit() < **share).map(|(c, _)| c).collect()
    }

    /// A concept picked as often as documents name it (what clinicians ask about).
    pub fn pick(&self, rng: &mut SplitMix64) -> &Concept {
        let total = self.cumulative.last().copied().unwrap_or(0.0);
        let at = rng.unit() * total;
        let i = self.cumulative.partition_point(|c| *c <= at).min(self.list.len() - 1);
        &self.list[i]
    }

    /// The commonest concept.
    pub fn commonest(&self) -> &Concept {
        &self.list[0]
    }

    /// The rarest concept.
    pub fn rarest(&self) -> &Concept {
        &self.list[self.list.len() - 1]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn concepts() -> Concepts {
        Concepts::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../dev/medcat/concepts.csv")).unwrap()
    }

    #[test]
    fn the_commonest_is_in_a_third_and_most_are_rare() {
        let c = concepts();
        assert_eq!(c.all().len(), CONCEPTS);
        assert_eq!(c.commonest().cui, "38341003", "the list's first CUI leads");
        assert_eq!(c.rarest().cui, "BENCH02000");
        assert!((18.0..23.0).contains(&c.per_document()), "{} per document", c.per_document());
        let rare = c.share.iter().filter(|s| **s < 0.03).count();
        assert!(rare > CONCEPTS * 9 / 10, "{rare} of {CONCEPTS} in under 3 % of documents");

        let mut rng = SplitMix64::new(1);
        let docs = 3_000;
        let with_top =
            (0..docs).filter(|_| c.for_document(&mut rng).iter().any(|k| k.cui == c.commonest().cui)).count();
        assert!((800..1200).contains(&with_top), "{with_top} of {docs}");
        let picked_top = (0..docs).filter(|_| c.pick(&mut rng).cui == c.commonest().cui).count();
        assert!((30..120).contains(&picked_top), "{picked_top} of {docs} picks");
    }
}
