//! Upload a document; read a document and its results.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use clinflow::amqp::Lane;
use clinflow::annotation::Annotation;
use clinflow::audit::{Action, Outcome};
use clinflow::documents::{self, Inserted, StatusRow};
use clinflow::keys::PatientRef;
use clinflow::outbox;
use clinflow::telemetry::{timed, timed_sync};
use clinflow::wire::{
    DOCUMENTS_PATH, DocumentStatus, MAX_STATUS_IDS, STATUSES_PATH, Status, StatusRequest, StatusesResponse,
    UploadRequest, UploadResponse,
};
use serde::Serialize;
use time::{Date, OffsetDateTime};
use uuid::Uuid;

use crate::auth::AuthUser;
use crate::error::ApiError;
use crate::extract::{JsonBody, PathParams, QueryParams};
use crate::idempotency;
use crate::scope;
use crate::seal::seal;
use crate::state::AppState;
use crate::users::Role;
use crate::validate::{check_care_team, validate};

/// Per-stage timings of the request path (see BENCHMARKS.md).
const STAGE: &str = "clinflow_api_stage_seconds";

async fn visible_statuses(state: &AppState, user: &AuthUser, ids: &[Uuid]) -> Result<StatusesResponse, ApiError> {
    let all = matches!(user.role, Role::Ops | Role::Admin);
    let mut documents = Vec::with_capacity(ids.len());
    for row in documents::statuses(&state.db, ids).await? {
        if all || row.uploaded_by == user.id {
            let status = Status::parse(&row.status).ok_or_else(|| anyhow::anyhow!("unknown document status"))?;
            let StatusRow { id, created_at, updated_at, failure_code, .. } = row;
            documents.push(DocumentStatus { id, status, created_at, updated_at, failure_code });
        }
    }
    let missing = ids.iter().filter(|id| !documents.iter().any(|d| d.id == **id)).copied().collect();
    Ok(StatusesResponse { documents, missing })
}

/// Where one document is: status and times, no content (not audited).
///
/// Ingest and clinician accounts see the documents they uploaded; ops and
/// admin see all.
#[utoipa::path(
    get,
    path = "/v1/documents/{id}/status",
    tag = "documents",
    params(DocumentPath, ReadParams),
    responses(
        (status = 200, description = "Its status", body = DocumentStatus),
    ),
    extensions(("x-errors" = json!(["not_found: no such document, or not one the caller may see"]))),
)]
#[tracing::instrument(skip_all, fields(user_id = %user.id, document_id = %id))]
pub(crate) async fn status(
    State(state): State<AppState>,
    user: AuthUser,
    PathParams(DocumentPath { id }): PathParams<DocumentPath>,
) -> Result<Json<DocumentStatus>, ApiError> {
    let found = visible_statuses(&state, &user, &[id]).await?;
    found.documents.into_iter().next().map(Json).ok_or(ApiError::NotFound)
}

/// Where many documents are (at most 1000 ids), without content.
///
/// Ids that do not exist or that the caller may not see are listed as
/// `missing`.
#[utoipa::path(
    post,
    path = STATUSES_PATH,
    tag = "documents",
    request_body = StatusRequest,
    responses(
        (status = 200, description = "The statuses found and the ids missing", body = StatusesResponse),
    ),
    extensions(("x-errors" = json!(["too_many_ids"]))),
)]
#[tracing::instrument(skip_all, fields(user_id = %user.id))]
pub(crate) async fn statuses(
    State(state): State<AppState>,
    user: AuthUser,
    JsonBody(req): JsonBody<StatusRequest>,
) -> Result<Json<StatusesResponse>, ApiError> {
    if req.ids.len() > MAX_STATUS_IDS {
        return Err(ApiError::invalid("too_many_ids", format!("ask for at most {MAX_STATUS_IDS} ids at a time")));
    }
    Ok(Json(visible_statuses(&state, &user, &req.ids).await?))
}

/// Upload one note.
///
/// Answered once the document, its job and its audit event are committed.
/// A retry with the same `Idempotency-Key` gets the first answer and stores
/// nothing. Only ingest accounts may name a `care_team` (the patient is
/// added to it).
#[utoipa::path(
    post,
    path = DOCUMENTS_PATH,
    tag = "documents",
    request_body = UploadRequest,
    params(crate::idempotency::KeyHeader),
    responses(
        (status = 202, description = "Stored and queued for coding", body = UploadResponse),
    ),
    extensions(("x-errors" = json!([
        "care_team_forbidden", "duplicate_source_ref", "text_too_large", "invalid_patient_ref", "empty_text",
        "invalid_source_ref", "invalid_document_date", "unknown_care_team", "idempotency_key_reused",
        "invalid_idempotency_key", "busy", "care_team_not_bound", "missing_lawful_basis", "invalid_lawful_basis",
        "missing_consent_ref", "invalid_consent_ref",
    ]))),
)]
#[tracing::instrument(skip_all, fields(user_id = %user.id, document_id))]
pub(crate) async fn upload(
    State(state): State<AppState>,
    user: AuthUser,
    headers: HeaderMap,
    JsonBody(req): JsonBody<UploadRequest>,
) -> Result<(StatusCode, Json<UploadResponse>), ApiError> {
    let answer = upload_one(state, user, headers, req).await;
    crate::telemetry::count_upload(&answer);
    answer
}

async fn upload_one(
    state: AppState,
    user: AuthUser,
    headers: HeaderMap,
    req: UploadRequest,
) -> Result<(StatusCode, Json<UploadResponse>), ApiError> {
    let upload = validate(req, user.default_basis)?;
    check_care_team(&user, &upload)?;
    let idempotency = idempotency::Key::from_request(&state, &headers, &upload)?;
    let replay = |id| Ok((StatusCode::ACCEPTED, Json(UploadResponse { id, status: Status::Queued })));
    if let Some(key) = &idempotency
        && let Some(first) = key.earlier(&mut *state.db.acquire().await?, user.id).await?
    {
        return replay(first);
    }
    let id = Uuid::now_v7();
    tracing::Span::current().record("document_id", tracing::field::display(id));

    state.check_backpressure()?;
    let team = match &upload.care_team {
        None => None,
        Some(name) => {
            let teams = scope::upload_teams(&state.db, user.id, std::slice::from_ref(name)).await?;
            let team = teams.get(name).ok_or_else(|| ApiError::BadRequest {
                status: StatusCode::NOT_FOUND,
                code: "unknown_care_team",
                message: "no care team has this name".into(),
            })?;
            Some(scope::bound(team)?)
        }
    };
    let event = user.event(Action::DocumentUpload, Outcome::Success).document(id);
    let messages = [
        outbox::Message::job(id, Lane::Live),
        outbox::Message::audit(&state.audit_signer, &event).map_err(anyhow::Error::new)?,
    ];

    // The document, its job and its audit event commit together: a 2xx
    // document always has a job (the relay publishes it, now or after an
    // outage), and a failed request leaves nothing behind. The patient's
    // data key is created in it too, with their first document.
    // "begin" holds the wait for a pooled connection.
    let mut tx = timed(STAGE, "begin", state.db.begin()).await?;
    let patient_index = documents::patient_index(&state.index_key, &upload.patient_ref);
    let key =
        timed(STAGE, "data_key", state.keys.for_patient(&mut tx, PatientRef::new(&patient_index, &upload.patient_ref)))
            .await?;
    let doc = timed_sync(STAGE, "seal", || seal(&state, &key, patient_index, user.id, id, upload))?;
    if let Inserted::DuplicateSourceRef(existing) = timed(STAGE, "insert", documents::insert(&mut tx, &doc)).await? {
        return Err(ApiError::DuplicateSourceRef(existing));
    }
    timed(STAGE, "outbox", outbox::enqueue(&mut tx, &messages)).await?;
    if let Some(team) = team {
        let added = scope::add_patients(&mut tx, &[(team, doc.patient_index.clone())]).await?;
        outbox::enqueue(&mut tx, &scope::additions_audited(&state.audit_signer, &user, &added)?).await?;
    }
    if let Some(key) = &idempotency
        && !key.record(&mut tx, user.id, id).await?
    {
        // A concurrent retry with this key committed first: answer as it did.
        tx.rollback().await?;
        let first = key.earlier(&mut *state.db.acquire().await?, user.id).await?;
        return replay(first.ok_or_else(|| anyhow::anyhow!("idempotency key vanished"))?);
    }
    timed(STAGE, "commit", tx.commit()).await?;
    state.relay.wake();
    metrics::counter!("clinflow_documents_uploaded_total", "via" => "single").increment(1);
    Ok((StatusCode::ACCEPTED, Json(UploadResponse { id, status: Status::Queued })))
}

/// A document and, once `done`, the concepts coded in it.
#[derive(Serialize, utoipa::ToSchema)]
pub struct DocumentResponse {
    id: Uuid,
    status: Status,
    patient_ref: String,
    #[serde(with = "time::serde::rfc3339")]
    created_at: OffsetDateTime,
    #[serde(skip_serializing_if = "Option::is_none", with = "crate::dates::ymd::option")]
    document_date: Option<Date>,
    #[serde(skip_serializing_if = "Option::is_none")]
    failure_code: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    model_version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    annotations: Option<Vec<Annotation>>,
    /// The note itself, only with `?include=text`.
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<String>,
}

/// The document a path names (`/v1/documents/{id}…`).
#[derive(serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
pub(crate) struct DocumentPath {
    /// The document's id
    id: Uuid,
}

#[derive(serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ReadParams {
    /// `text`: the decrypted note too.
    #[param(schema_with = include_schema)]
    include: Option<String>,
}

fn include_schema() -> utoipa::openapi::schema::Object {
    use utoipa::openapi::schema::{ObjectBuilder, Type};
    ObjectBuilder::new().schema_type(Type::String).enum_values(Some(["text"])).build()
}

/// Read a document: its patient, status and, once `done`, the coded
/// concepts (offsets in Unicode code points).
///
/// Within the clinician's care teams, or under break-glass; audited either
/// way (a refusal as `out_of_scope`).
#[utoipa::path(
    get,
    path = "/v1/documents/{id}",
    tag = "documents",
    params(DocumentPath),
    responses(
        (status = 200, description = "The document and its results", body = DocumentResponse),
    ),
    extensions(("x-errors" = json!(["out_of_scope", "not_found: no such document"]))),
)]
#[tracing::instrument(skip_all, fields(user_id = %user.id, document_id = %id))]
pub(crate) async fn read(
    State(state): State<AppState>,
    user: AuthUser,
    PathParams(DocumentPath { id }): PathParams<DocumentPath>,
    QueryParams(params): QueryParams<ReadParams>,
) -> Result<Json<DocumentResponse>, ApiError> {
    let with_text = match params.include.as_deref() {
        None | Some("") => false,
        Some("text") => true,
        Some(_) => return Err(ApiError::invalid("invalid_include", "include may only be text")),
    };
    let Some(row) = documents::get(&state.db, id).await? else {
        state.audit(&user.event(Action::DocumentRead, Outcome::Failure).document(id).reason("not_found")).await?;
        return Err(ApiError::NotFound);
    };
    // Care-team scope (or break-glass): checked before anything is decrypted.
    let grant = match &row.patient_index {
        Some(patient) => scope::patient_grant(&state.db, user.id, patient).await?,
        None => None,
    };
    let Some(grant) = grant else {
        metrics::counter!("clinflow_api_forbidden_total", "reason" => "out_of_scope").increment(1);
        let mut event = user.event(Action::DocumentRead, Outcome::Denied).document(id).reason("out_of_scope");
        if let Some(patient) = &row.patient_index {
            event = event.patient(patient);
        }
        state.audit(&event).await?;
        return Err(ApiError::OutOfScope);
    };
    let status = Status::parse(&row.status).ok_or_else(|| anyhow::anyhow!("unknown document status"))?;
    let result = match status {
        Status::Done => Some(
            documents::latest_result(&state.db, id)
                .await?
                .ok_or_else(|| anyhow::anyhow!("done document has no result"))?,
        ),
        _ => None,
    };
    let sealed =
        std::iter::once(row.patient_ref_ct.as_slice()).chain(result.iter().map(|r| r.annotations_ct.as_slice()));
    let opener = state.keys.opener(&state.db, sealed).await?;
    let patient_ref =
        opener.open_string(documents::patient_ref_field(id), &row.patient_ref_ct).map_err(anyhow::Error::new)?;
    let (model_version, annotations) = match result {
        Some(result) => {
            let plain =
                opener.open(documents::annotations_field(id), &result.annotations_ct).map_err(anyhow::Error::new)?;
            let annotations: Vec<Annotation> = serde_json::from_slice(&plain).map_err(anyhow::Error::new)?;
            (Some(result.model_version), Some(annotations))
        }
        None => (None, None),
    };
    let text = match with_text {
        false => None,
        true => {
            let sealed = documents::text(&state.db, id).await?.ok_or(ApiError::NotFound)?;
            Some(state.keys.open_string(&state.db, documents::text_field(id), &sealed).await?)
        }
    };
    // No PHI leaves unless its read is on the audit trail.
    let mut event = user.event(Action::DocumentRead, Outcome::Success).document(id);
    if let Some(patient) = &row.patient_index {
        event = event.patient(patient);
    }
    let reason = [with_text.then(|| "with_text".to_owned()), grant.audit_reason()];
    let reason: Vec<String> = reason.into_iter().flatten().collect();
    if !reason.is_empty() {
        event = event.reason(&reason.join(" "));
    }
    state.audit(&event).await?;
    Ok(Json(DocumentResponse {
        id,
        status,
        patient_ref,
        created_at: row.created_at,
        document_date: row.document_date,
        failure_code: row.failure_code,
        model_version,
        annotations,
        text,
    }))
}
