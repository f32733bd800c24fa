//! "My patients with this concept", and their documents: answered from the
//! concept index (`document_concepts`) without decrypting anything but the
//! patient references shown.

use axum::Json;
use axum::extract::State;
use clinflow::audit::{Action, Outcome};
use serde::{Deserialize, Serialize};
use time::{Date, OffsetDateTime};
use uuid::Uuid;

use super::{Page, hex, page_size, unhex};
use crate::auth::AuthUser;
use crate::error::ApiError;
use crate::extract::{PathParams, QueryParams};
use crate::state::AppState;

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct Cursor {
    /// The `next_cursor` of the previous page.
    #[param(schema_with = patient_cursor)]
    after: Option<String>,
    #[param(schema_with = super::page_size_schema)]
    limit: Option<i64>,
}

/// The same for `concept_documents`, whose cursor also names a document.
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct DocumentCursor {
    /// The `next_cursor` of the previous page.
    #[param(schema_with = document_cursor)]
    after: Option<String>,
    #[param(schema_with = super::page_size_schema)]
    limit: Option<i64>,
}

/// Hex bytes, as [`unhex`] takes them: a blind index.
const HEX: &str = "([0-9a-fA-F]{2})*";

fn cursor_schema(pattern: String) -> utoipa::openapi::schema::Object {
    use utoipa::openapi::schema::{ObjectBuilder, SchemaType, Type};
    let kind = SchemaType::from_iter([Type::String, Type::Null]);
    ObjectBuilder::new().schema_type(kind).pattern(Some(pattern)).build()
}

fn patient_cursor() -> utoipa::openapi::schema::Object {
    cursor_schema(format!("^{HEX}$"))
}

/// A blind index, `.` and a document id.
fn document_cursor() -> utoipa::openapi::schema::Object {
    let uuid = "[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}";
    cursor_schema(format!("^{HEX}\\.{uuid}$"))
}

/// Longest CUI: SNOMED CT ids are digits; other vocabularies' (UMLS
/// C0011849) letters and digits.
const MAX_CUI_CHARS: usize = 32;

fn valid_cui(cui: &str) -> Result<&str, ApiError> {
    if cui.is_empty() || cui.len() > MAX_CUI_CHARS || !cui.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Err(ApiError::invalid("invalid_cui", format!("a CUI is 1-{MAX_CUI_CHARS} letters or digits")));
    }
    Ok(cui)
}

fn cui_schema() -> utoipa::openapi::schema::Object {
    use utoipa::openapi::schema::{ObjectBuilder, Type};
    let max = MAX_CUI_CHARS;
    ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(Some(1))
        .max_length(Some(max))
        .pattern(Some(format!("^[A-Za-z0-9]{{1,{max}}}$")))
        .build()
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ConceptPatient {
    patient_ref: String,
    documents: i64,
    #[serde(with = "crate::dates::ymd::option")]
    first_date: Option<Date>,
    #[serde(with = "crate::dates::ymd::option")]
    last_date: Option<Date>,
}

/// The concept a path names (`/v1/concepts/{cui}/…`).
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
pub(crate) struct ConceptPath {
    /// SNOMED CT concept id
    #[param(schema_with = cui_schema)]
    cui: String,
}

/// `GET /v1/concepts/{cui}/patients`: the caller's patients (care teams and
/// live break-glass grants) whose current results affirm this concept.
/// Like `concept_documents`: the caller's patients in order, one probe of the
/// concept index each (the aggregate keeps the LATERAL a nested loop).
#[utoipa::path(get, path = "/v1/concepts/{cui}/patients", tag = "patients",
    params(ConceptPath, Cursor),
    responses((status = 200, description = "The caller's patients with the concept", body = Page<ConceptPatient>)),
    extensions(("x-errors" = json!(["invalid_cui", "invalid_limit", "invalid_cursor"]))))]
#[tracing::instrument(skip_all, fields(user_id = %user.id))]
pub(crate) async fn concept_patients(
    State(state): State<AppState>,
    user: AuthUser,
    PathParams(ConceptPath { cui }): PathParams<ConceptPath>,
    QueryParams(cursor): QueryParams<Cursor>,
) -> Result<Json<Page<ConceptPatient>>, ApiError> {
    let cui = valid_cui(&cui)?;
    let limit = page_size(cursor.limit)?;
    let after = match cursor.after.as_deref() {
        None => None,
        Some(a) => Some(unhex(a).ok_or_else(|| ApiError::invalid("invalid_cursor", "after must be a next_cursor"))?),
    };
    let rows = sqlx::query!(
        r#"SELECT s.patient_index AS "patient_index!", a.documents AS "documents!", a.first_date, a.last_date
           FROM (SELECT patient_index FROM patients_in_scope($1)
                 WHERE $3::bytea IS NULL OR patient_index < $3
                 ORDER BY patient_index DESC) s
           CROSS JOIN LATERAL (SELECT count(*) AS documents,
                                      min(coalesce(dc.document_date, dc.created_at::date)) AS first_date,
                                      max(coalesce(dc.document_date, dc.created_at::date)) AS last_date
                               FROM document_concepts dc
                               WHERE dc.cui = $2 AND dc.patient_index = s.patient_index
                                 AND dc.mentions > dc.negated) a
           WHERE a.documents > 0
           ORDER BY s.patient_index DESC LIMIT $4"#,
        user.id,
        cui,
        after,
        limit + 1,
    )
    .fetch_all(&state.db)
    .await?;
    let more = rows.len() as i64 > limit;
    let rows: Vec<_> = rows.into_iter().take(limit as usize).collect();
    let mut refs = patient_refs(&state, rows.iter().map(|r| r.patient_index.as_slice())).await?;
    // Every patient the page shows is disclosed to the caller: named on the
    // audit trail (by blind index), for the accounting of disclosures.
    let event = user
        .event(Action::ConceptRead, Outcome::Success)
        .resource("concept", cui)
        .patients(rows.iter().map(|r| r.patient_index.as_slice()));
    let mut items = Vec::with_capacity(rows.len());
    let mut last = None;
    for r in rows {
        let patient_ref = refs
            .remove(&r.patient_index)
            .ok_or_else(|| anyhow::anyhow!("a listed patient has no reference (erased meanwhile?)"))?;
        items.push(ConceptPatient {
            patient_ref,
            documents: r.documents,
            first_date: r.first_date,
            last_date: r.last_date,
        });
        last = Some(r.patient_index);
    }
    let next_cursor = if more { last.as_deref().map(hex) } else { None };
    state.audit(&event.reason(&format!("patients:{}", items.len()))).await?;
    Ok(Json(Page { items, next_cursor }))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ConceptDocument {
    id: Uuid,
    patient_ref: String,
    #[serde(skip_serializing_if = "Option::is_none", with = "crate::dates::ymd::option")]
    document_date: Option<Date>,
    #[serde(with = "time::serde::rfc3339")]
    created_at: OffsetDateTime,
    mentions: i32,
    negated: i32,
    first_offset: i32,
}

/// `GET /v1/concepts/{cui}/documents`: the caller's patients' documents
/// whose current result names this concept, patient by patient (in the
/// order of `/v1/concepts/{cui}/patients`), each patient's newest first.
///
/// By patient, not newest first across all patients: a page takes the
/// caller's patients in order and probes the concept index (cui, patient)
/// for each, stopping when the page is full. A rare concept's probes land in
/// a few index pages, a common one fills the page early; the cost follows
/// the caller's scope, not the table (migration 20261129000001). The ORDER BY
/// inside the LATERAL keeps the planner from flattening it into a merge join
/// that reads every row of the concept.
#[utoipa::path(get, path = "/v1/concepts/{cui}/documents", tag = "patients",
    params(ConceptPath, DocumentCursor),
    responses((status = 200, description = "The caller's patients' documents with the concept, patient by patient, newest first within each", body = Page<ConceptDocument>)),
    extensions(("x-errors" = json!(["invalid_cui", "invalid_limit", "invalid_cursor"]))))]
#[tracing::instrument(skip_all, fields(user_id = %user.id))]
pub(crate) async fn concept_documents(
    State(state): State<AppState>,
    user: AuthUser,
    PathParams(ConceptPath { cui }): PathParams<ConceptPath>,
    QueryParams(cursor): QueryParams<DocumentCursor>,
) -> Result<Json<Page<ConceptDocument>>, ApiError> {
    let cui = valid_cui(&cui)?;
    let limit = page_size(cursor.limit)?;
    let (after_patient, after_document) = match cursor.after.as_deref() {
        None => (None, None),
        Some(a) => {
            let (patient, document) = a
                .split_once('.')
                .and_then(|(p, d)| Some((unhex(p)?, Uuid::try_parse(d).ok()?)))
                .ok_or_else(|| ApiError::invalid("invalid_cursor", "after must be a next_cursor"))?;
            (Some(patient), Some(document))
        }
    };
    let rows = sqlx::query!(
        r#"SELECT s.patient_index AS "patient_index!", x.document_id AS id, x.document_date, x.created_at,
                  x.mentions, x.negated, x.first_offset
           FROM (SELECT patient_index FROM patients_in_scope($1)
                 WHERE $3::bytea IS NULL OR patient_index <= $3
                 ORDER BY patient_index DESC) s
           CROSS JOIN LATERAL (SELECT dc.document_id, dc.document_date, dc.created_at,
                                      dc.mentions, dc.negated, dc.first_offset
                               FROM document_concepts dc
                               WHERE dc.cui = $2 AND dc.patient_index = s.patient_index
                                 AND ($3::bytea IS NULL OR dc.patient_index < $3 OR dc.document_id < $4)
                               ORDER BY dc.document_id DESC) x
           ORDER BY s.patient_index DESC, x.document_id DESC LIMIT $5"#,
        user.id,
        cui,
        after_patient,
        after_document,
        limit + 1,
    )
    .fetch_all(&state.db)
    .await?;
    let more = rows.len() as i64 > limit;
    let rows: Vec<_> = rows.into_iter().take(limit as usize).collect();
    let refs = patient_refs(&state, rows.iter().map(|r| r.patient_index.as_slice())).await?;
    // Rows come patient by patient: each patient shown is named once.
    let mut shown: Vec<&[u8]> = rows.iter().map(|r| r.patient_index.as_slice()).collect();
    shown.dedup();
    let event = user.event(Action::ConceptRead, Outcome::Success).resource("concept", cui).patients(shown);
    let mut items = Vec::with_capacity(rows.len());
    let mut last = None;
    for r in rows {
        let patient_ref = refs
            .get(&r.patient_index)
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("a listed patient has no reference (erased meanwhile?)"))?;
        last = Some((r.patient_index, r.id));
        items.push(ConceptDocument {
            id: r.id,
            patient_ref,
            document_date: r.document_date,
            created_at: r.created_at,
            mentions: r.mentions,
            negated: r.negated,
            first_offset: r.first_offset,
        });
    }
    let next_cursor = if more { last.map(|(patient, id)| format!("{}.{id}", hex(&patient))) } else { None };
    state.audit(&event.reason(&format!("documents:{}", items.len()))).await?;
    Ok(Json(Page { items, next_cursor }))
}

/// The references of the patients of a page (blind indexes), opened from
/// beside their data keys: the concept endpoints read nothing of `documents`
/// (migration 20261130000001).
async fn patient_refs<'a>(
    state: &AppState,
    patients: impl Iterator<Item = &'a [u8]>,
) -> Result<std::collections::HashMap<Vec<u8>, String>, ApiError> {
    let mut indexes: Vec<&[u8]> = patients.collect();
    indexes.sort_unstable();
    indexes.dedup();
    Ok(state.keys.patient_refs(&state.db, &indexes).await?)
}
