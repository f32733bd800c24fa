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

/// The concept rows of one document's current result.
pub struct Indexed<'a> {
    pub document_id: Uuid,
    pub patient_index: &'a [u8],
    /// The document's own date, if it has one, and its upload time.
    pub document_date: Option<time::Date>,
    pub created_at: time::OffsetDateTime,
    pub model_version: &'a str,
    /// The model version of the result this one replaces, if any: its rows go.
    pub replaces: Option<&'a str>,
    pub concepts: &'a [ConceptCount],
}

/// Stores the concept rows of these results (and the names of their CUIs),
/// set-based, in the caller's transaction, which holds their documents
/// locked. Rows that exist are kept; rows of a replaced model version go.
pub async fn store(conn: &mut PgConnection, results: &[Indexed<'_>]) -> Result<(), sqlx::Error> {
    let replaced: Vec<&Indexed> = results.iter().filter(|r| r.replaces.is_some_and(|m| m != r.model_version)).collect();
    if !replaced.is_empty() {
        let ids: Vec<Uuid> = replaced.iter().map(|r| r.document_id).collect();
        let patients: Vec<&[u8]> = replaced.iter().map(|r| r.patient_index).collect();
        let models: Vec<&str> = replaced.iter().map(|r| r.model_version).collect();
        sqlx::query!(
            "DELETE FROM document_concepts dc
             USING UNNEST($1::uuid[], $2::bytea[], $3::text[]) AS r(document_id, patient_index, model_version)
             WHERE dc.patient_index = r.patient_index AND dc.document_id = r.document_id
               AND dc.model_version <> r.model_version",
            &ids,
            &patients as &[&[u8]],
            &models as &[&str],
        )
        .execute(&mut *conn)
        .await?;
    }
    let rows = results.iter().map(|r| r.concepts.len()).sum();
    if rows == 0 {
        return Ok(());
    }
    let mut documents = Vec::with_capacity(rows);
    let mut patients: Vec<&[u8]> = Vec::with_capacity(rows);
    let mut dates = Vec::with_capacity(rows);
    let mut uploaded = Vec::with_capacity(rows);
    let mut models: Vec<&str> = Vec::with_capacity(rows);
    let mut cuis: Vec<&str> = Vec::with_capacity(rows);
    let mut mentions = Vec::with_capacity(rows);
    let mut negated = Vec::with_capacity(rows);
    let mut offsets = Vec::with_capacity(rows);
    let mut names: BTreeMap<&str, (&str, String)> = BTreeMap::new();
    for r in results {
        for c in r.concepts {
            documents.push(r.document_id);
            patients.push(r.patient_index);
            dates.push(r.document_date);
            uploaded.push(r.created_at);
            models.push(r.model_version);
            cuis.push(&c.cui);
            mentions.push(c.mentions);
            negated.push(c.negated);
            offsets.push(c.first_offset);
            names.entry(&c.cui).or_insert((&c.pretty_name, c.type_ids.join(",")));
        }
    }
    let (name_cuis, (pretty, types)): (Vec<&str>, (Vec<&str>, Vec<String>)) = names.into_iter().unzip();
    sqlx::query!(
        "INSERT INTO concept_names (cui, pretty_name, type_ids)
         SELECT cui, name, string_to_array(NULLIF(types, ''), ',')::text[] FROM UNNEST($1::text[], $2::text[], $3::text[]) AS n(cui, name, types)
         ON CONFLICT (cui) DO NOTHING",
        &name_cuis as &[&str],
        &pretty as &[&str],
        &types,
    )
    .execute(&mut *conn)
    .await?;
    sqlx::query!(
        "INSERT INTO document_concepts (document_id, patient_index, document_date, created_at, model_version, cui,
                                        mentions, negated, first_offset)
         SELECT * FROM UNNEST($1::uuid[], $2::bytea[], $3::date[], $4::timestamptz[], $5::text[], $6::text[],
                              $7::int[], $8::int[], $9::int[])
         ON CONFLICT (patient_index, document_id, cui) DO NOTHING",
        &documents,
        &patients as &[&[u8]],
        &dates as &[Option<time::Date>],
        &uploaded,
        &models as &[&str],
        &cuis as &[&str],
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
