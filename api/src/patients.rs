//! The questions clinicians ask: a patient's documents and problem list,
//! "my patients with this concept" and their documents; a patient's GDPR
//! export (FHIR R4) and erasure.
//!
//! Patients are found by their blind index; the concept index
//! (`document_concepts`) answers the concept questions without decrypting
//! anything but the patient references shown. A clinician sees the patients
//! of their care teams and those they broke the glass for; every call is
//! audited with the patient's blind index (hex), never the reference.

use axum::Json;
use axum::extract::State;
use axum::http::Method;
use clinflow::annotation::Annotation;
use clinflow::audit::{Action, Outcome};
use clinflow::documents;
use clinflow::wire::Status;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use time::{Date, OffsetDateTime};
use uuid::Uuid;

use crate::AppState;
use crate::access::{Access, Endpoint};
use crate::auth::{AuthUser, JsonBody, PathParams, QueryParams};
use crate::care::{self, Grant};
use crate::error::ApiError;
use crate::users::Role;
use clinflow::wire::ErrorBody;

const CLINICIANS: &[Role] = &[Role::Clinician];
const DEFAULT_PAGE: i64 = 100;
const MAX_PAGE: i64 = 1000;

#[derive(utoipa::OpenApi)]
#[openapi(paths(patient_documents, patient_concepts, concept_patients, concept_documents, export, erase))]
pub(crate) struct Doc;

pub fn endpoints() -> Vec<Endpoint> {
    vec![
        Endpoint::new(
            Method::GET,
            "/v1/patients/{patient_ref}/documents",
            Access::roles(CLINICIANS, Action::PatientRead),
            patient_documents,
        ),
        Endpoint::new(
            Method::GET,
            "/v1/patients/{patient_ref}/concepts",
            Access::roles(CLINICIANS, Action::PatientRead),
            patient_concepts,
        ),
        Endpoint::new(
            Method::GET,
            "/v1/concepts/{cui}/patients",
            Access::roles(CLINICIANS, Action::ConceptRead),
            concept_patients,
        ),
        Endpoint::new(
            Method::GET,
            "/v1/concepts/{cui}/documents",
            Access::roles(CLINICIANS, Action::ConceptRead),
            concept_documents,
        ),
        Endpoint::new(
            Method::GET,
            "/v1/patients/{patient_ref}/export",
            Access::roles(&[Role::Clinician, Role::Admin], Action::PatientExport),
            export,
        ),
        Endpoint::new(
            Method::DELETE,
            "/v1/patients/{patient_ref}",
            Access::roles(&[Role::Admin], Action::PatientErase),
            erase,
        ),
    ]
}

/// A patient as the caller named them: the blind index, and its hex for
/// the audit trail.
struct Patient {
    reference: String,
    index: Vec<u8>,
}

impl Patient {
    fn parse(state: &AppState, raw: &str) -> Result<Self, ApiError> {
        let reference = crate::documents::valid_patient_ref(raw)?;
        let index = documents::patient_index(&state.index_key, &reference);
        Ok(Self { reference, index })
    }

    fn audit_id(&self) -> String {
        hex(&self.index)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// The caller's grant on this patient, or a 403 audited as out of scope.
async fn in_scope(state: &AppState, user: &AuthUser, patient: &Patient, action: Action) -> Result<Grant, ApiError> {
    if let Some(grant) = care::patient_grant(&state.db, user.id, &patient.index).await? {
        return Ok(grant);
    }
    metrics::counter!("clinflow_api_forbidden_total", "reason" => "out_of_scope").increment(1);
    let event = user.event(action, Outcome::Denied).resource("patient", &patient.audit_id()).reason("out_of_scope");
    state.audit(&event).await?;
    Err(ApiError::OutOfScope)
}

async fn audit_read(
    state: &AppState,
    user: &AuthUser,
    action: Action,
    kind: &str,
    id: &str,
    grant: Option<Grant>,
) -> Result<(), ApiError> {
    let mut event = user.event(action, Outcome::Success).resource(kind, id);
    if let Some(reason) = grant.and_then(Grant::audit_reason) {
        event = event.reason(&reason);
    }
    state.audit(&event).await
}

fn page_size(limit: Option<i64>) -> Result<i64, ApiError> {
    match limit {
        None => Ok(DEFAULT_PAGE),
        Some(n) if (1..=MAX_PAGE).contains(&n) => Ok(n),
        Some(_) => Err(ApiError::invalid("invalid_limit", format!("limit must be 1-{MAX_PAGE}"))),
    }
}

fn date_param(name: &'static str, value: Option<&str>) -> Result<Option<Date>, ApiError> {
    let format = time::macros::format_description!("[year]-[month]-[day]");
    value
        .map(|v| {
            Date::parse(v, &format).map_err(|_| ApiError::invalid("invalid_date", format!("{name} must be YYYY-MM-DD")))
        })
        .transpose()
}

fn cursor_id(after: Option<&str>) -> Result<Option<Uuid>, ApiError> {
    after
        .map(|a| Uuid::try_parse(a).map_err(|_| ApiError::invalid("invalid_cursor", "after must be a next_cursor")))
        .transpose()
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// Pass as `after` for the next page; absent on the last.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct DocumentFilter {
    /// Document date (or upload date when the note has none) from,
    /// inclusive, as YYYY-MM-DD.
    from: Option<String>,
    /// … until, inclusive.
    until: Option<String>,
    status: Option<Status>,
    after: Option<String>,
    limit: Option<i64>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct DocumentSummary {
    id: Uuid,
    status: Status,
    #[serde(skip_serializing_if = "Option::is_none", with = "crate::ymd::option")]
    document_date: Option<Date>,
    #[serde(with = "time::serde::rfc3339")]
    created_at: OffsetDateTime,
    #[serde(skip_serializing_if = "Option::is_none")]
    model_version: Option<String>,
}

/// `GET /v1/patients/{patient_ref}/documents`: newest first, no text.
#[utoipa::path(get, path = "/v1/patients/{patient_ref}/documents", tag = "patients",
    params(("patient_ref" = String, Path, description = "The patient reference, as uploaded"), DocumentFilter),
    responses((status = 200, description = "The patient's documents, newest first", body = Page<DocumentSummary>),
              (status = 403, description = "- `out_of_scope`: the patient is outside the caller's care teams and no break-glass grant covers it", body = ErrorBody),
              (status = 422, description = "- `invalid_patient_ref`\n- `invalid_date`\n- `invalid_limit`\n- `invalid_cursor`", body = ErrorBody)))]
async fn patient_documents(
    State(state): State<AppState>,
    user: AuthUser,
    PathParams(patient_ref): PathParams<String>,
    QueryParams(filter): QueryParams<DocumentFilter>,
) -> Result<Json<Page<DocumentSummary>>, ApiError> {
    let patient = Patient::parse(&state, &patient_ref)?;
    let limit = page_size(filter.limit)?;
    let after = cursor_id(filter.after.as_deref())?;
    let (from, until) = (date_param("from", filter.from.as_deref())?, date_param("until", filter.until.as_deref())?);
    let grant = in_scope(&state, &user, &patient, Action::PatientRead).await?;
    let rows = sqlx::query!(
        r#"SELECT id, status, document_date, created_at, result_model
           FROM documents
           WHERE patient_index = $1
             AND ($2::uuid IS NULL OR id < $2)
             AND ($3::date IS NULL OR coalesce(document_date, created_at::date) >= $3)
             AND ($4::date IS NULL OR coalesce(document_date, created_at::date) <= $4)
             AND ($5::text IS NULL OR status = $5)
           ORDER BY id DESC LIMIT $6"#,
        patient.index,
        after,
        from,
        until,
        filter.status.map(Status::as_str),
        limit + 1,
    )
    .fetch_all(&state.db)
    .await?;
    let mut items = Vec::with_capacity(rows.len());
    for r in rows.into_iter().take(limit as usize) {
        let status = Status::parse(&r.status).ok_or_else(|| anyhow::anyhow!("unknown document status"))?;
        items.push(DocumentSummary {
            id: r.id,
            status,
            document_date: r.document_date,
            created_at: r.created_at,
            model_version: r.result_model,
        });
    }
    let next_cursor = (items.len() as i64 == limit).then(|| items.last().map(|d| d.id.to_string())).flatten();
    audit_read(&state, &user, Action::PatientRead, "patient", &patient.audit_id(), Some(grant)).await?;
    Ok(Json(Page { items, next_cursor }))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ConceptFilter {
    /// Count negated / hypothetical mentions too (default: only affirmed).
    #[serde(default)]
    include_negated: bool,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ProblemListEntry {
    cui: String,
    pretty_name: String,
    documents: i64,
    mentions: i64,
    #[serde(with = "crate::ymd::option")]
    first_date: Option<Date>,
    #[serde(with = "crate::ymd::option")]
    last_date: Option<Date>,
}

/// `GET /v1/patients/{patient_ref}/concepts`: the problem list — each
/// concept in the patient's current results with its number of documents and
/// first and last document date; concepts only ever mentioned negated (by
/// MetaCAT) are left out unless `include_negated=true`.
#[utoipa::path(get, path = "/v1/patients/{patient_ref}/concepts", tag = "patients",
    params(("patient_ref" = String, Path, description = "The patient reference, as uploaded"), ConceptFilter),
    responses((status = 200, description = "The patient's problem list", body = Page<ProblemListEntry>),
              (status = 403, description = "- `out_of_scope`: the patient is outside the caller's care teams and no break-glass grant covers it", body = ErrorBody),
              (status = 422, description = "- `invalid_patient_ref`", body = ErrorBody)))]
async fn patient_concepts(
    State(state): State<AppState>,
    user: AuthUser,
    PathParams(patient_ref): PathParams<String>,
    QueryParams(filter): QueryParams<ConceptFilter>,
) -> Result<Json<Page<ProblemListEntry>>, ApiError> {
    let patient = Patient::parse(&state, &patient_ref)?;
    let grant = in_scope(&state, &user, &patient, Action::PatientRead).await?;
    let items = sqlx::query_as!(
        ProblemListEntry,
        r#"SELECT dc.cui, coalesce(n.pretty_name, dc.cui) AS "pretty_name!",
                  count(*) AS "documents!",
                  sum(CASE WHEN $2 THEN dc.mentions ELSE dc.mentions - dc.negated END)::int8 AS "mentions!",
                  min(coalesce(dc.document_date, dc.created_at::date)) AS first_date,
                  max(coalesce(dc.document_date, dc.created_at::date)) AS last_date
           FROM document_concepts dc
           LEFT JOIN concept_names n ON n.cui = dc.cui
           WHERE dc.patient_index = $1 AND ($2 OR dc.mentions > dc.negated)
           GROUP BY dc.cui, n.pretty_name
           ORDER BY count(*) DESC, dc.cui"#,
        patient.index,
        filter.include_negated,
    )
    .fetch_all(&state.db)
    .await?;
    audit_read(&state, &user, Action::PatientRead, "patient", &patient.audit_id(), Some(grant)).await?;
    Ok(Json(Page { items, next_cursor: None }))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct Cursor {
    after: Option<String>,
    limit: Option<i64>,
}

fn valid_cui(cui: &str) -> Result<&str, ApiError> {
    // SNOMED CT ids are digits; other vocabularies' (UMLS C0011849) letters
    // and digits.
    if cui.is_empty() || cui.len() > 32 || !cui.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Err(ApiError::invalid("invalid_cui", "a CUI is 1-32 letters or digits"));
    }
    Ok(cui)
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ConceptPatient {
    patient_ref: String,
    documents: i64,
    #[serde(with = "crate::ymd::option")]
    first_date: Option<Date>,
    #[serde(with = "crate::ymd::option")]
    last_date: Option<Date>,
}

/// `GET /v1/concepts/{cui}/patients`: the caller's patients (care teams and
/// live break-glass grants) whose current results affirm this concept.
/// Like `concept_documents`: the caller's patients in order, one probe of the
/// concept index each (the aggregate keeps the LATERAL a nested loop).
#[utoipa::path(get, path = "/v1/concepts/{cui}/patients", tag = "patients",
    params(("cui" = String, Path, description = "SNOMED CT concept id"), Cursor),
    responses((status = 200, description = "The caller's patients with the concept", body = Page<ConceptPatient>),
              (status = 422, description = "- `invalid_cui`\n- `invalid_limit`\n- `invalid_cursor`", body = ErrorBody)))]
async fn concept_patients(
    State(state): State<AppState>,
    user: AuthUser,
    PathParams(cui): PathParams<String>,
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
    let event = user.event(Action::ConceptRead, Outcome::Success).resource("concept", cui);
    state.audit(&event.reason(&format!("patients:{}", items.len()))).await?;
    Ok(Json(Page { items, next_cursor }))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ConceptDocument {
    id: Uuid,
    patient_ref: String,
    #[serde(skip_serializing_if = "Option::is_none", with = "crate::ymd::option")]
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
    params(("cui" = String, Path, description = "SNOMED CT concept id"), Cursor),
    responses((status = 200, description = "The caller's patients' documents with the concept, patient by patient, newest first within each", body = Page<ConceptDocument>),
              (status = 422, description = "- `invalid_cui`\n- `invalid_limit`\n- `invalid_cursor`", body = ErrorBody)))]
async fn concept_documents(
    State(state): State<AppState>,
    user: AuthUser,
    PathParams(cui): PathParams<String>,
    QueryParams(cursor): QueryParams<Cursor>,
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
    let event = user.event(Action::ConceptRead, Outcome::Success).resource("concept", cui);
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

const SNOMED: &str = "http://snomed.info/sct";
const SPAN_EXTENSION: &str = "https://clinflow.dev/fhir/StructureDefinition/evidence-span";

/// The FHIR resource a concept becomes, by its semantic type.
fn resource_kind(type_ids: &[String]) -> &'static str {
    let has = |t: &str| type_ids.iter().any(|x| x == t);
    if has("T121") || has("T200") || has("T195") {
        "MedicationStatement"
    } else if has("T060") || has("T061") || has("T059") {
        "Procedure"
    } else if has("T047") || has("T046") || has("T048") || has("T191") || has("T019") {
        "Condition"
    } else {
        "Observation"
    }
}

/// One coded resource for the concept `cui` in one document, with every
/// mention as an evidence span.
fn concept_resource(patient: &str, doc: Uuid, mentions: &[&Annotation], recorded: &str) -> Value {
    let first = mentions[0];
    let negated = mentions.iter().all(|a| clinflow::concepts::is_negated(a));
    let code = json!({"coding": [{"system": SNOMED, "code": first.cui, "display": first.pretty_name}], "text": first.pretty_name});
    let spans: Vec<Value> = mentions
        .iter()
        .map(|a| {
            json!({"url": SPAN_EXTENSION, "extension": [
                {"url": "document", "valueReference": {"reference": format!("urn:uuid:{doc}")}},
                {"url": "start", "valueInteger": a.start},
                {"url": "end", "valueInteger": a.end},
            ]})
        })
        .collect();
    let id = Uuid::new_v5(&doc, first.cui.as_bytes());
    let subject = json!({"reference": format!("urn:uuid:{patient}")});
    let source = json!({"reference": format!("urn:uuid:{doc}")});
    let mut resource = match resource_kind(&first.type_ids) {
        "Condition" => json!({
            "resourceType": "Condition",
            "verificationStatus": {"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                "code": if negated { "refuted" } else { "unconfirmed" },
            }]},
            "code": code, "subject": subject, "recordedDate": recorded,
            "evidence": [{"detail": [source]}],
        }),
        "MedicationStatement" => json!({
            "resourceType": "MedicationStatement",
            "status": if negated { "not-taken" } else { "unknown" },
            "medicationCodeableConcept": code, "subject": subject, "dateAsserted": recorded,
            "derivedFrom": [source],
        }),
        "Procedure" => json!({
            "resourceType": "Procedure",
            "status": if negated { "not-done" } else { "unknown" },
            "code": code, "subject": subject, "reasonReference": [],
        }),
        _ => json!({
            "resourceType": "Observation",
            "status": "preliminary",
            "code": code, "subject": subject, "issued": recorded,
            "derivedFrom": [source],
        }),
    };
    if let Some(obj) = resource.as_object_mut() {
        obj.retain(|_, v| !v.as_array().is_some_and(Vec::is_empty));
        obj.insert("id".into(), json!(id));
        obj.insert("extension".into(), Value::Array(spans));
    }
    json!({"fullUrl": format!("urn:uuid:{id}"), "resource": resource})
}

/// `GET /v1/patients/{patient_ref}/export`: everything held on the patient
/// as a FHIR R4 `collection` Bundle: the Patient, a DocumentReference per
/// note (its text as an attachment), and for each concept of each current
/// result a Condition, MedicationStatement, Procedure or Observation coded in
/// SNOMED CT, with its evidence spans. 404 when nothing is held.
#[utoipa::path(get, path = "/v1/patients/{patient_ref}/export", tag = "patients",
    params(("patient_ref" = String, Path, description = "The patient reference, as uploaded")),
    responses((status = 200, description = "A FHIR R4 Bundle (type collection)", body = Object),
              (status = 403, description = "- `out_of_scope`: the patient is outside the caller's care teams and no break-glass grant covers it", body = ErrorBody),
              (status = 404, description = "- `not_found`: nothing is held on this patient", body = ErrorBody),
              (status = 422, description = "- `invalid_patient_ref`", body = ErrorBody)))]
async fn export(
    State(state): State<AppState>,
    user: AuthUser,
    PathParams(patient_ref): PathParams<String>,
) -> Result<Json<Value>, ApiError> {
    let patient = Patient::parse(&state, &patient_ref)?;
    let grant = match user.role {
        Role::Admin => None,
        _ => Some(in_scope(&state, &user, &patient, Action::PatientExport).await?),
    };
    let docs = sqlx::query!(
        r#"SELECT d.id, d.status, d.text_ct, d.document_date, d.created_at, r.model_version AS "model_version?",
                  r.annotations_ct AS "annotations_ct?"
           FROM documents d
           LEFT JOIN document_results r ON r.document_id = d.id AND r.model_version = d.result_model
           WHERE d.patient_index = $1 ORDER BY d.id"#,
        patient.index,
    )
    .fetch_all(&state.db)
    .await?;
    if docs.is_empty() {
        let event = user.event(Action::PatientExport, Outcome::Failure).resource("patient", &patient.audit_id());
        state.audit(&event.reason("not_found")).await?;
        return Err(ApiError::NotFound);
    }
    let patient_id = Uuid::new_v5(&Uuid::NAMESPACE_OID, &patient.index);
    let mut entries = vec![json!({
        "fullUrl": format!("urn:uuid:{patient_id}"),
        "resource": {
            "resourceType": "Patient",
            "id": patient_id,
            "identifier": [{"system": "urn:clinflow:patient-ref", "value": patient.reference}],
        },
    })];
    let rfc3339 = |t: OffsetDateTime| t.format(&time::format_description::well_known::Rfc3339).unwrap_or_default();
    let mut sealed: Vec<&[u8]> = docs.iter().map(|d| d.text_ct.as_slice()).collect();
    sealed.extend(docs.iter().filter_map(|d| d.annotations_ct.as_deref()));
    let opener = state.keys.opener(&state.db, sealed).await?;
    let mut concepts = 0;
    for d in &docs {
        let text = opener.open(documents::text_field(d.id), &d.text_ct).map_err(anyhow::Error::new)?;
        let created = rfc3339(d.created_at);
        let mut attachment = json!({"contentType": "text/plain; charset=utf-8", "data": base64_encode(&text)});
        if let Some(date) = d.document_date {
            attachment["creation"] = json!(format!("{date}T00:00:00Z"));
        }
        entries.push(json!({
            "fullUrl": format!("urn:uuid:{}", d.id),
            "resource": {
                "resourceType": "DocumentReference",
                "id": d.id,
                "status": "current",
                "docStatus": if d.status == "done" { "final" } else { "preliminary" },
                "subject": {"reference": format!("urn:uuid:{patient_id}")},
                "date": created,
                "content": [{"attachment": attachment}],
            },
        }));
        let Some(sealed) = &d.annotations_ct else { continue };
        let plain = opener.open(documents::annotations_field(d.id), sealed).map_err(anyhow::Error::new)?;
        let annotations: Vec<Annotation> = serde_json::from_slice(&plain).map_err(anyhow::Error::new)?;
        let mut by_cui: std::collections::BTreeMap<&str, Vec<&Annotation>> = Default::default();
        for a in &annotations {
            by_cui.entry(a.cui.as_str()).or_default().push(a);
        }
        for mentions in by_cui.values() {
            entries.push(concept_resource(&patient_id.to_string(), d.id, mentions, &created));
            concepts += 1;
        }
    }
    let bundle = json!({
        "resourceType": "Bundle",
        "type": "collection",
        "timestamp": rfc3339(OffsetDateTime::now_utc()),
        "entry": entries,
    });
    let mut reason = format!("documents:{} concepts:{concepts}", docs.len());
    if let Some(glass) = grant.and_then(Grant::audit_reason) {
        reason = format!("{reason} {glass}");
    }
    let event = user.event(Action::PatientExport, Outcome::Success).resource("patient", &patient.audit_id());
    state.audit(&event.reason(&reason)).await?;
    Ok(Json(bundle))
}

fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EraseRequest {
    /// Why, as a code (`gdpr_erasure_request`, `data_entry_error`, …): it
    /// goes on the audit trail, which takes no free text.
    reason: String,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct Erased {
    documents: i64,
    results: i64,
    concepts: i64,
    team_entries: i64,
    break_glass_grants: i64,
    /// Destroyed: every copy of the patient's data, backups included, is
    /// unreadable without it.
    data_keys: i64,
}

/// `DELETE /v1/patients/{patient_ref}`: every row of the patient goes, in one
/// transaction with its audit event. 404 when nothing was held.
#[utoipa::path(delete, path = "/v1/patients/{patient_ref}", tag = "patients",
    params(("patient_ref" = String, Path, description = "The patient reference, as uploaded")),
    request_body = EraseRequest,
    responses((status = 200, description = "What was erased", body = Erased),
              (status = 404, description = "- `not_found`: nothing is held on this patient", body = ErrorBody),
              (status = 422, description = "- `invalid_patient_ref`\n- `invalid_reason`", body = ErrorBody)))]
async fn erase(
    State(state): State<AppState>,
    user: AuthUser,
    PathParams(patient_ref): PathParams<String>,
    JsonBody(req): JsonBody<EraseRequest>,
) -> Result<Json<Erased>, ApiError> {
    let patient = Patient::parse(&state, &patient_ref)?;
    let reason = req.reason.trim();
    if !(3..=64).contains(&reason.len()) || !reason.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
        return Err(ApiError::invalid(
            "invalid_reason",
            "reason must be a code of 3-64 lowercase letters and _, e.g. gdpr_erasure_request",
        ));
    }
    let mut tx = state.db.begin().await?;
    let destroyed: Vec<Uuid> = sqlx::query_scalar!("SELECT id FROM data_keys WHERE patient_index = $1", patient.index)
        .fetch_all(&mut *tx)
        .await?;
    let counts = sqlx::query!(
        r#"SELECT documents AS "documents!", results AS "results!", concepts AS "concepts!",
                  team_entries AS "team_entries!", grants AS "grants!", data_keys AS "data_keys!"
           FROM erase_patient($1)"#,
        patient.index
    )
    .fetch_one(&mut *tx)
    .await?;
    if counts.documents == 0 && counts.team_entries == 0 && counts.grants == 0 {
        tx.rollback().await?;
        return Err(ApiError::NotFound);
    }
    let event = user
        .event(Action::PatientErase, Outcome::Success)
        .resource("patient", &patient.audit_id())
        .reason(&format!("{reason} documents:{} data_keys:{}", counts.documents, counts.data_keys));
    crate::audit_in(&mut tx, &[event]).await?;
    tx.commit().await?;
    // This process forgets the key at once; others' caches drop it within
    // their time limit (5 minutes), and no row names it any more.
    for id in destroyed {
        state.keys.forget(id);
    }
    state.relay.wake();
    Ok(Json(Erased {
        documents: counts.documents,
        results: counts.results,
        concepts: counts.concepts,
        team_entries: counts.team_entries,
        break_glass_grants: counts.grants,
        data_keys: counts.data_keys,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_rejects_garbage() {
        let bytes = [0u8, 1, 0xab, 0xff];
        assert_eq!(hex(&bytes), "0001abff");
        assert_eq!(unhex("0001abff").as_deref(), Some(&bytes[..]));
        assert_eq!(unhex("0g"), None);
        assert_eq!(unhex("abc"), None);
    }

    #[test]
    fn semantic_types_choose_the_resource() {
        let t = |s: &str| vec![s.to_owned()];
        assert_eq!(resource_kind(&t("T047")), "Condition");
        assert_eq!(resource_kind(&t("T121")), "MedicationStatement");
        assert_eq!(resource_kind(&t("T060")), "Procedure");
        assert_eq!(resource_kind(&t("T184")), "Observation");
        assert_eq!(resource_kind(&[]), "Observation");
    }
}
