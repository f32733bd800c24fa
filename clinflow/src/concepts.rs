//! The concept index: per current result, each CUI found with its count,
//! first offset and negated mentions, stored beside the encrypted result so
//! that problem lists and "patients with this condition" decrypt nothing.

use std::collections::BTreeMap;

use sqlx::PgConnection;
use uuid::Uuid;

use crate::annotation::Annotation;

/// What one result says about one concept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConceptCount {
    pub cui: String,
    pub pretty_name: String,
    pub type_ids: Vec<String>,
    pub mentions: i32,
    pub negated: i32,
    pub first_offset: i32,
}

/// Whether MetaCAT marked this mention as not a current, affirmed finding:
/// `Presence`/`Negation`/`Status` meta-annotations saying negated, absent,
/// false or hypothetical. Without meta-annotations nothing is negated.
pub fn is_negated(annotation: &Annotation) -> bool {
    annotation.meta_anns.iter().any(|(task, result)| {
        let value = result.get("value").and_then(|v| v.as_str()).unwrap_or_default().to_ascii_lowercase();
        match task.to_ascii_lowercase().as_str() {
            "presence" => matches!(value.as_str(), "false" | "negated" | "absent" | "hypothetical"),
            "negation" => matches!(value.as_str(), "negated" | "true" | "yes"),
            "status" | "experiencer" => matches!(value.as_str(), "hypothetical" | "other" | "patient's relative"),
            _ => false,
        }
    })
}

/// The concept counts of one document's annotations, by CUI.
pub fn summarize(annotations: &[Annotation]) -> Vec<ConceptCount> {
    let mut by_cui: BTreeMap<&str, ConceptCount> = BTreeMap::new();
    for a in annotations {
        let offset = i32::try_from(a.start).unwrap_or(i32::MAX);
        let entry = by_cui.entry(a.cui.as_str()).or_insert_with(|| ConceptCount {
            cui: a.cui.clone(),
            pretty_name: a.pretty_name.clone(),
            type_ids: a.type_ids.clone(),
            mentions: 0,
            negated: 0,
            first_offset: offset,
        });
        entry.mentions += 1;
        entry.negated += i32::from(is_negated(a));
        entry.first_offset = entry.first_offset.min(offset);
    }
    by_cui.into_values().collect()
}

/// Stores the concept rows of these results (and the names of their CUIs),
/// set-based, in the caller's transaction. Rows that exist are kept.
pub async fn store(conn: &mut PgConnection, results: &[(Uuid, &str, &[ConceptCount])]) -> Result<(), sqlx::Error> {
    let mut documents = Vec::new();
    let mut models = Vec::new();
    let mut cuis = Vec::new();
    let mut mentions = Vec::new();
    let mut negated = Vec::new();
    let mut offsets = Vec::new();
    let mut names: BTreeMap<&str, (&str, String)> = BTreeMap::new();
    for (document, model, concepts) in results {
        for c in *concepts {
            documents.push(*document);
            models.push((*model).to_owned());
            cuis.push(c.cui.clone());
            mentions.push(c.mentions);
            negated.push(c.negated);
            offsets.push(c.first_offset);
            names.entry(&c.cui).or_insert((&c.pretty_name, c.type_ids.join(",")));
        }
    }
    if documents.is_empty() {
        return Ok(());
    }
    let (name_cuis, (pretty, types)): (Vec<String>, (Vec<String>, Vec<String>)) =
        names.into_iter().map(|(cui, (name, types))| (cui.to_owned(), (name.to_owned(), types))).unzip();
    sqlx::query!(
        "INSERT INTO concept_names (cui, pretty_name, type_ids)
         SELECT cui, name, string_to_array(NULLIF(types, ''), ',')::text[] FROM UNNEST($1::text[], $2::text[], $3::text[]) AS n(cui, name, types)
         ON CONFLICT (cui) DO NOTHING",
        &name_cuis,
        &pretty,
        &types,
    )
    .execute(&mut *conn)
    .await?;
    sqlx::query!(
        "INSERT INTO document_concepts (document_id, model_version, cui, patient_index, mentions, negated, first_offset)
         SELECT c.document_id, c.model_version, c.cui, d.patient_index, c.mentions, c.negated, c.first_offset
         FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::int[], $5::int[], $6::int[])
                AS c(document_id, model_version, cui, mentions, negated, first_offset)
         JOIN documents d ON d.id = c.document_id
         WHERE d.patient_index IS NOT NULL
         ON CONFLICT (document_id, model_version, cui) DO NOTHING",
        &documents,
        &models,
        &cuis,
        &mentions,
        &negated,
        &offsets,
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(cui: &str, start: u32, meta: serde_json::Value) -> Annotation {
        Annotation {
            cui: cui.into(),
            pretty_name: format!("name of {cui}"),
            start,
            end: start + 3,
            acc: 1.0,
            type_ids: vec!["T047".into()],
            meta_anns: meta.as_object().cloned().unwrap_or_default(),
        }
    }

    #[test]
    fn counts_mentions_first_offsets_and_negations_by_cui() {
        let anns = [
            ann("49436004", 40, serde_json::json!({})),
            ann("38341003", 5, serde_json::json!({"Presence": {"value": "True", "confidence": 0.9}})),
            ann("49436004", 12, serde_json::json!({"Presence": {"value": "False", "confidence": 0.8}})),
            ann("38341003", 90, serde_json::json!({"Negation": {"value": "Negated"}})),
        ];
        let summary = summarize(&anns);
        assert_eq!(summary.len(), 2);
        let htn = &summary[0];
        assert_eq!((htn.cui.as_str(), htn.mentions, htn.negated, htn.first_offset), ("38341003", 2, 1, 5));
        let af = &summary[1];
        assert_eq!((af.cui.as_str(), af.mentions, af.negated, af.first_offset), ("49436004", 2, 1, 12));
        assert!(summarize(&[]).is_empty());
    }
}
