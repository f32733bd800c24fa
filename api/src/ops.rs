//! `/v1/ops/...`: what `clinflow-worker dead-letters` and `reprocess` do,
//! for the ops role over HTTP. Answers hold ids, counts and reason codes,
//! never document content; every call is audited (by the shared functions,
//! as the calling user).

use axum::Json;
use axum::extract::State;
use clinflow::deadletters::{self, Listing, OpsError, Replayed, Selection};
use clinflow::documents::reprocess::Reprocess;
use serde::{Deserialize, Serialize};
use time::Date;
use uuid::Uuid;

use crate::auth::AuthUser;
use crate::error::ApiError;
use crate::extract::JsonBody;
use crate::state::AppState;
use clinflow::audit::Operator;

/// What every operation here answers while RabbitMQ is away (named in its `x-errors`).
const RABBITMQ_UNREACHABLE: &str = "unavailable: RabbitMQ is unreachable; retry after `Retry-After`";

/// Either `ids` or `"all": true`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayRequest {
    #[serde(default)]
    ids: Vec<Uuid>,
    #[serde(default)]
    all: bool,
}

/// One of: `"all": true`; `uploaded_from` with `uploaded_until`;
/// `without_result_from`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReprocessRequest {
    #[serde(default)]
    all: bool,
    /// `YYYY-MM-DD`, with `uploaded_until` (exclusive).
    #[serde(default, with = "crate::dates::ymd::option")]
    uploaded_from: Option<Date>,
    #[serde(default, with = "crate::dates::ymd::option")]
    uploaded_until: Option<Date>,
    /// A model version: documents without a result from it.
    without_result_from: Option<String>,
}

/// The selections [`replay`] and [`reprocess`] take, each a branch of a
/// `oneOf`: what they refuse as `invalid_selection`, the description
/// forbids. Fields a branch leaves out must be absent or null (or false,
/// or empty).
mod selections {
    use utoipa::openapi::schema::{
        AdditionalProperties, ArrayBuilder, KnownFormat, ObjectBuilder, OneOfBuilder, SchemaFormat, Type,
    };
    use utoipa::openapi::{RefOr, Schema};

    fn null() -> ObjectBuilder {
        ObjectBuilder::new().schema_type(Type::Null)
    }

    fn boolean(value: bool) -> ObjectBuilder {
        ObjectBuilder::new().schema_type(Type::Boolean).enum_values(Some([value]))
    }

    fn date() -> ObjectBuilder {
        ObjectBuilder::new().schema_type(Type::String).format(Some(SchemaFormat::KnownFormat(KnownFormat::Date)))
    }

    fn ids(min: usize, max: Option<usize>) -> ArrayBuilder {
        let id =
            ObjectBuilder::new().schema_type(Type::String).format(Some(SchemaFormat::KnownFormat(KnownFormat::Uuid)));
        ArrayBuilder::new().items(id).min_items(Some(min)).max_items(max)
    }

    impl utoipa::PartialSchema for super::ReplayRequest {
        fn schema() -> RefOr<Schema> {
            let all =
                ObjectBuilder::new().property("all", boolean(true)).required("all").property("ids", ids(0, Some(0)));
            let some =
                ObjectBuilder::new().property("ids", ids(1, None)).required("ids").property("all", boolean(false));
            OneOfBuilder::new()
                .item(all.additional_properties(Some(AdditionalProperties::FreeForm(false))))
                .item(some.additional_properties(Some(AdditionalProperties::FreeForm(false))))
                .description(Some("Either `\"all\": true` or the `ids` of the jobs to replay"))
                .into()
        }
    }
    impl utoipa::ToSchema for super::ReplayRequest {}

    impl utoipa::PartialSchema for super::ReprocessRequest {
        fn schema() -> RefOr<Schema> {
            let unset = |b: ObjectBuilder, fields: &[&str]| fields.iter().fold(b, |b, f| b.property(*f, null()));
            let all = unset(
                ObjectBuilder::new().property("all", boolean(true)).required("all"),
                &["uploaded_from", "uploaded_until", "without_result_from"],
            );
            let dates = ObjectBuilder::new()
                .property("all", boolean(false))
                .property("uploaded_from", date().description(Some("YYYY-MM-DD")))
                .property("uploaded_until", date().description(Some("YYYY-MM-DD, exclusive")))
                .required("uploaded_from")
                .required("uploaded_until");
            let model = ObjectBuilder::new()
                .property("all", boolean(false))
                .property(
                    "without_result_from",
                    ObjectBuilder::new()
                        .schema_type(Type::String)
                        .pattern(Some(crate::validate::schema::NOT_BLANK.clone()))
                        .description(Some("A model version: documents without a result from it")),
                )
                .required("without_result_from");
            OneOfBuilder::new()
                .item(all.additional_properties(Some(AdditionalProperties::FreeForm(false))))
                .item(
                    unset(dates, &["without_result_from"])
                        .additional_properties(Some(AdditionalProperties::FreeForm(false))),
                )
                .item(
                    unset(model, &["uploaded_from", "uploaded_until"])
                        .additional_properties(Some(AdditionalProperties::FreeForm(false))),
                )
                .description(Some(
                    "One of: `\"all\": true`; documents uploaded from `uploaded_from` until `uploaded_until` \
                     (none when it is not later); documents `without_result_from` a model version",
                ))
                .into()
        }
    }
    impl utoipa::ToSchema for super::ReprocessRequest {}
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ReprocessResponse {
    /// Documents set back to `queued`.
    queued: usize,
}

async fn connection(state: &AppState) -> Result<lapin::Connection, ApiError> {
    clinflow::amqp::connect(&state.amqp_url, "clinflow-api-ops").await.map_err(|e| {
        tracing::warn!(error = %e, "ops request: RabbitMQ unreachable");
        ApiError::Unavailable("RabbitMQ")
    })
}

fn ops_error(e: OpsError) -> ApiError {
    match e {
        OpsError::Db(e) => e.into(),
        other => {
            tracing::warn!(error = %other, "ops request: RabbitMQ failed");
            ApiError::Unavailable("RabbitMQ")
        }
    }
}

/// The dead-lettered jobs, counted by reason; nothing is consumed. Audited.
#[utoipa::path(
    get,
    path = "/v1/ops/dead-letters",
    tag = "ops",
    responses(
        (status = 200, description = "The parked jobs (ids and reason codes, no content)", body = Listing),
    ),
    extensions(("x-errors" = json!([RABBITMQ_UNREACHABLE]))),
)]
#[tracing::instrument(skip_all, fields(user_id = %user.id))]
pub(crate) async fn list(State(state): State<AppState>, user: AuthUser) -> Result<Json<Listing>, ApiError> {
    let connection = connection(&state).await?;
    let listing = deadletters::list(&connection, &state.topology, &operator(&state, &user)).await.map_err(ops_error);
    let _ = connection.close(200, "done".into()).await;
    Ok(Json(listing?))
}

/// Put dead-lettered jobs back on their lane (their documents `queued`);
/// jobs of documents already `done` are dropped. Each replay audited.
#[utoipa::path(
    post,
    path = "/v1/ops/dead-letters/replay",
    tag = "ops",
    request_body = ReplayRequest,
    responses(
        (status = 200, description = "What was replayed, dropped and left", body = Replayed),
    ),
    extensions(("x-errors" = json!(["invalid_selection: give either `ids` or `\"all\": true`", RABBITMQ_UNREACHABLE]))),
)]
#[tracing::instrument(skip_all, fields(user_id = %user.id))]
pub(crate) async fn replay(
    State(state): State<AppState>,
    user: AuthUser,
    JsonBody(req): JsonBody<ReplayRequest>,
) -> Result<Json<Replayed>, ApiError> {
    let selection = match (req.all, req.ids.is_empty()) {
        (true, true) => Selection::All,
        (false, false) => Selection::Documents(req.ids.into_iter().collect()),
        _ => return Err(ApiError::invalid("invalid_selection", "give either \"ids\" or \"all\": true")),
    };
    let connection = connection(&state).await?;
    let replayed = deadletters::replay(&connection, &state.db, &state.topology, &selection, &operator(&state, &user))
        .await
        .map_err(ops_error);
    let _ = connection.close(200, "done".into()).await;
    Ok(Json(replayed?))
}

/// Code documents again: set them back to `queued` and publish their jobs
/// on the backfill lane. Audited.
#[utoipa::path(
    post,
    path = "/v1/ops/reprocess",
    tag = "ops",
    request_body = ReprocessRequest,
    responses(
        (status = 200, description = "How many documents were queued", body = ReprocessResponse),
    ),
    extensions(("x-errors" = json!([
        "invalid_selection: not exactly one of the three selections", RABBITMQ_UNREACHABLE,
    ]))),
)]
#[tracing::instrument(skip_all, fields(user_id = %user.id))]
pub(crate) async fn reprocess(
    State(state): State<AppState>,
    user: AuthUser,
    JsonBody(req): JsonBody<ReprocessRequest>,
) -> Result<Json<ReprocessResponse>, ApiError> {
    let which = match (req.all, req.uploaded_from.zip(req.uploaded_until), req.without_result_from) {
        (true, None, None) => Reprocess::All,
        // An empty range selects nothing.
        (false, Some((from, until)), None) => {
            Reprocess::UploadedBetween(from.midnight().assume_utc(), until.midnight().assume_utc())
        }
        (false, None, Some(model)) if !model.trim().is_empty() => Reprocess::WithoutResultFrom(model),
        _ => {
            return Err(ApiError::invalid(
                "invalid_selection",
                "give one of \"all\": true, \"uploaded_from\" with a later \"uploaded_until\", or \"without_result_from\"",
            ));
        }
    };
    let connection = connection(&state).await?;
    let queued =
        deadletters::reprocess(&connection, &state.db, &state.topology, &which, &operator(&state, &user), |_| {})
            .await
            .map_err(ops_error);
    let _ = connection.close(200, "done".into()).await;
    Ok(Json(ReprocessResponse { queued: queued? }))
}

/// What an operator watches: queue depths, documents by status, and the
/// model versions of the current results.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Overview {
    queues: Vec<clinflow::amqp::QueueDepth>,
    /// Documents per status (`queued`, `processing`, `done`, `failed`).
    documents: std::collections::BTreeMap<String, i64>,
    models: Vec<ModelCount>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ModelCount {
    model_version: String,
    /// Documents whose current result is from this version.
    documents: i64,
}

/// Queue depths (ready messages and consumers per queue), documents by
/// status, and documents per model version of their current result. Counts
/// only; audited when refused. The counts read the whole `documents` table:
/// a second or so per few million documents.
#[utoipa::path(
    get,
    path = "/v1/ops/overview",
    tag = "ops",
    responses((status = 200, description = "Counts of queues, documents and model versions", body = Overview)),
    extensions(("x-errors" = json!([RABBITMQ_UNREACHABLE]))),
)]
#[tracing::instrument(skip_all)]
pub(crate) async fn overview(State(state): State<AppState>) -> Result<Json<Overview>, ApiError> {
    let connection = connection(&state).await?;
    let queues = state.topology.depths(&connection).await;
    let _ = connection.close(200, "done".into()).await;
    let queues = queues.map_err(|e| ops_error(OpsError::from(e)))?;
    let rows =
        sqlx::query!(r#"SELECT status, result_model, count(*) AS "n!" FROM documents GROUP BY status, result_model"#)
            .fetch_all(&state.db)
            .await?;
    let mut documents = std::collections::BTreeMap::new();
    let mut models = std::collections::BTreeMap::new();
    for r in rows {
        *documents.entry(r.status).or_insert(0) += r.n;
        if let Some(model) = r.result_model {
            *models.entry(model).or_insert(0) += r.n;
        }
    }
    for status in ["queued", "processing", "done", "failed"] {
        documents.entry(status.to_owned()).or_insert(0);
    }
    let models = models.into_iter().map(|(model_version, documents)| ModelCount { model_version, documents }).collect();
    Ok(Json(Overview { queues, documents, models }))
}

/// The caller, signing with the api's key.
fn operator(state: &AppState, user: &AuthUser) -> Operator {
    Operator { actor: user.actor(), signer: state.audit_signer.clone() }
}
