//! A patient's documents and problem list.

use axum::Json;
use axum::extract::State;
use clinflow::audit::Action;
use clinflow::wire::Status;
use serde::{Deserialize, Serialize};
use time::{Date, OffsetDateTime};
use uuid::Uuid;

use super::{Page, Patient, audit_read, cursor_id, date_param, in_scope, page_size};
use crate::auth::AuthUser;
use crate::error::ApiError;
use crate::extract::JsonBody;
use crate::state::AppState;

/// Which patient, and which of their documents. The reference travels in
/// the body, never in a URL (proxies' access logs keep URLs).
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PatientDocumentsQuery {
    /// The patient reference, as uploaded
    #[schema(schema_with = crate::validate::schema::patient_ref)]
    patient_ref: String,
    /// Document date (or upload date when the note has none) from,
    /// inclusive, as YYYY-MM-DD.
    #[schema(schema_with = super::date_schema)]
    from: Option<String>,
    /// … until, inclusive.
    #[schema(schema_with = super::date_schema)]
    until: Option<String>,
    status: Option<Status>,
    /// The `next_cursor` of the previous page.
    #[schema(schema_with = super::uuid_cursor_schema)]
    after: Option<String>,
    #[schema(schema_with = super::page_size_schema)]
    #[serde(default, deserialize_with = "crate::validate::integer")]
    limit: Option<i64>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct DocumentSummary {
    id: Uuid,
    status: Status,
    #[serde(skip_serializing_if = "Option::is_none", with = "crate::dates::ymd::option")]
    document_date: Option<Date>,
    #[serde(with = "time::serde::rfc3339")]
    created_at: OffsetDateTime,
    #[serde(skip_serializing_if = "Option::is_none")]
    model_version: Option<String>,
}

/// `POST /v1/patients/documents`: a patient's documents, newest first, no
/// text.
#[utoipa::path(post, path = "/v1/patients/documents", tag = "patients",
    request_body = PatientDocumentsQuery,
    responses((status = 200, description = "The patient's documents, newest first", body = Page<DocumentSummary>)),
    extensions(("x-errors" = json!([
        "out_of_scope", "invalid_patient_ref", "invalid_date", "invalid_limit", "invalid_cursor",
    ]))))]
#[tracing::instrument(skip_all, fields(user_id = %user.id))]
pub(crate) async fn patient_documents(
    State(state): State<AppState>,
    user: AuthUser,
    JsonBody(filter): JsonBody<PatientDocumentsQuery>,
) -> Result<Json<Page<DocumentSummary>>, ApiError> {
    let patient = Patient::parse(&state, &filter.patient_ref)?;
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
    audit_read(&state, &user, Action::PatientRead, &patient, Some(grant)).await?;
    Ok(Json(Page { items, next_cursor }))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProblemListQuery {
    /// The patient reference, as uploaded
    #[schema(schema_with = crate::validate::schema::patient_ref)]
    patient_ref: String,
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
    #[serde(with = "crate::dates::ymd::option")]
    first_date: Option<Date>,
    #[serde(with = "crate::dates::ymd::option")]
    last_date: Option<Date>,
}

/// `POST /v1/patients/concepts`: the problem list — each
/// concept in the patient's current results with its number of documents and
/// first and last document date; concepts only ever mentioned negated (by
/// MetaCAT) are left out unless `include_negated=true`.
#[utoipa::path(post, path = "/v1/patients/concepts", tag = "patients",
    request_body = ProblemListQuery,
    responses((status = 200, description = "The patient's problem list", body = Page<ProblemListEntry>)),
    extensions(("x-errors" = json!(["out_of_scope", "invalid_patient_ref"]))))]
#[tracing::instrument(skip_all, fields(user_id = %user.id))]
pub(crate) async fn patient_concepts(
    State(state): State<AppState>,
    user: AuthUser,
    JsonBody(filter): JsonBody<ProblemListQuery>,
) -> Result<Json<Page<ProblemListEntry>>, ApiError> {
    let patient = Patient::parse(&state, &filter.patient_ref)?;
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
    audit_read(&state, &user, Action::PatientRead, &patient, Some(grant)).await?;
    Ok(Json(Page { items, next_cursor: None }))
}
