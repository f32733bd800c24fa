//! The auditor's endpoints: the audit trail read with filters and keyset
//! pagination (by `seq`), and the chain verified on demand (with the
//! external checkpoints when this api knows their file). Audit rows hold
//! ids and codes only, never document content. Each call is itself audited
//! before it is answered.

use axum::Json;
use axum::extract::State;
use clinflow::audit::{Action, Outcome};
use clinflow::chain::{self, ChainError};
use clinflow::checkpoint;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::auth::AuthUser;
use crate::error::ApiError;
use crate::extract::{JsonBody, QueryParams};
use crate::state::AppState;
use crate::validate::valid_patient_ref;

const MAX_PAGE: i64 = 1_000;

/// `limit`: 1 to [`MAX_PAGE`], or absent.
fn page_limit() -> utoipa::openapi::schema::Object {
    crate::validate::schema::page_limit(MAX_PAGE)
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct EventQuery {
    /// Actor's name (username or service name).
    actor: Option<String>,
    actor_id: Option<Uuid>,
    action: Option<String>,
    resource_kind: Option<String>,
    resource_id: Option<String>,
    outcome: Option<String>,
    /// `occurred_at >= from` (RFC 3339).
    #[serde(default, with = "time::serde::rfc3339::option")]
    from: Option<OffsetDateTime>,
    /// `occurred_at < until` (RFC 3339).
    #[serde(default, with = "time::serde::rfc3339::option")]
    until: Option<OffsetDateTime>,
    /// The `next_cursor` of the previous page.
    after: Option<i64>,
    /// Events per page (default 100).
    #[param(schema_with = page_limit)]
    limit: Option<i64>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct EventPage {
    events: Vec<StoredEvent>,
    /// Pass as `after` for the next page; absent on the last one.
    #[serde(skip_serializing_if = "Option::is_none")]
    next_cursor: Option<i64>,
}

/// One audit event: ids and codes, never document content.
#[derive(Serialize, utoipa::ToSchema)]
pub struct StoredEvent {
    seq: i64,
    event_id: Uuid,
    #[serde(with = "time::serde::rfc3339")]
    occurred_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    recorded_at: OffsetDateTime,
    actor_kind: String,
    actor_id: Option<Uuid>,
    actor_name: Option<String>,
    actor_role: Option<String>,
    source_ip: Option<String>,
    request_id: Option<String>,
    action: String,
    resource_kind: Option<String>,
    resource_id: Option<String>,
    outcome: String,
    reason: Option<String>,
    /// The patients the event disclosed, by blind index (hex).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    patients: Vec<String>,
}

/// The audit trail in `seq` order, filtered, a page at a time (pass
/// `next_cursor` as `after`). Audited (`audit.read`).
#[utoipa::path(
    get,
    path = "/v1/audit/events",
    tag = "audit",
    params(EventQuery),
    responses(
        (status = 200, description = "A page of events", body = EventPage),
    ),
    extensions(("x-errors" = json!([
        "invalid_limit", "unavailable: the api has no audit reader connection (`AUDIT_READER_DATABASE_URL`)",
    ]))),
)]
#[tracing::instrument(skip_all, fields(user_id = %user.id))]
pub(crate) async fn events(
    State(state): State<AppState>,
    user: AuthUser,
    QueryParams(q): QueryParams<EventQuery>,
) -> Result<Json<EventPage>, ApiError> {
    let db = audit_db(&state)?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::invalid("invalid_limit", format!("limit must be 1-{MAX_PAGE}")));
    }
    let rows = sqlx::query!(
        r#"SELECT seq, event_id, occurred_at, recorded_at, actor_kind, actor_id, actor_name, actor_role,
                  host(source_ip) AS source_ip, request_id, action, resource_kind, resource_id, outcome, reason,
                  patients
           FROM audit_events
           WHERE seq > $1
             AND ($2::text IS NULL OR actor_name = $2)
             AND ($3::uuid IS NULL OR actor_id = $3)
             AND ($4::text IS NULL OR action = $4)
             AND ($5::text IS NULL OR resource_kind = $5)
             AND ($6::text IS NULL OR resource_id = $6)
             AND ($7::text IS NULL OR outcome = $7)
             AND ($8::timestamptz IS NULL OR occurred_at >= $8)
             AND ($9::timestamptz IS NULL OR occurred_at < $9)
           ORDER BY seq
           LIMIT $10"#,
        q.after.unwrap_or(0),
        q.actor,
        q.actor_id,
        q.action,
        q.resource_kind,
        q.resource_id,
        q.outcome,
        q.from,
        q.until,
        limit,
    )
    .fetch_all(db)
    .await?;
    let next_cursor = (rows.len() as i64 == limit).then(|| rows.last().map(|r| r.seq)).flatten();
    let events = rows
        .into_iter()
        .map(|r| StoredEvent {
            seq: r.seq,
            event_id: r.event_id,
            occurred_at: r.occurred_at,
            recorded_at: r.recorded_at,
            actor_kind: r.actor_kind,
            actor_id: r.actor_id,
            actor_name: r.actor_name,
            actor_role: r.actor_role,
            source_ip: r.source_ip,
            request_id: r.request_id,
            action: r.action,
            resource_kind: r.resource_kind,
            resource_id: r.resource_id,
            outcome: r.outcome,
            reason: r.reason,
            patients: r.patients.unwrap_or_default(),
        })
        .collect();
    state.audit(&user.event(Action::AuditRead, Outcome::Success)).await?;
    Ok(Json(EventPage { events, next_cursor }))
}

fn audit_db(state: &AppState) -> Result<&sqlx::PgPool, ApiError> {
    state.audit_db.as_ref().ok_or(ApiError::Unavailable("the audit trail (AUDIT_READER_DATABASE_URL is not set)"))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct Verified {
    intact: bool,
    /// Rows verified (up to the first broken one).
    rows: i64,
    checkpoints: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    newest_checkpoint: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    broken_at: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    problem: Option<String>,
}

/// Walk the audit hash chain with the public keys of `AUDIT_PUBLIC_KEYS`
/// (every event's signature, link and hash, and the sink's signed heads),
/// then check it against
/// the sink's checkpoint file when this api can read it. Audited
/// (`audit.verify`).
#[utoipa::path(
    post,
    path = "/v1/audit/verify",
    tag = "audit",
    responses(
        (status = 200, description = "Whether the chain is intact, and where it broke if not", body = Verified),
    ),
    extensions(("x-errors" = json!([
        "unavailable: the api has no audit reader connection (`AUDIT_READER_DATABASE_URL`) or no `AUDIT_PUBLIC_KEYS`",
    ]))),
)]
#[tracing::instrument(skip_all, fields(user_id = %user.id))]
pub(crate) async fn verify(State(state): State<AppState>, user: AuthUser) -> Result<Json<Verified>, ApiError> {
    let db = audit_db(&state)?;
    let Some(trust) = &state.audit_trust else {
        return Err(ApiError::Unavailable("audit verification (AUDIT_PUBLIC_KEYS is not set for the api)"));
    };
    let mut answer =
        Verified { intact: true, rows: 0, checkpoints: 0, newest_checkpoint: None, broken_at: None, problem: None };
    let outcome = async {
        answer.rows = chain::verify(db, trust).await?;
        if let Some(path) = &state.audit_checkpoints {
            let read = checkpoint::read(path, trust)?;
            answer.checkpoints = read.len();
            answer.newest_checkpoint = read.iter().map(|c| c.seq).max();
            checkpoint::check(db, answer.rows, &read).await?;
        }
        Ok::<_, ChainError>(())
    }
    .await;
    match outcome {
        Ok(()) => {}
        Err(ChainError::Broken { seq, problem }) => {
            answer.intact = false;
            answer.broken_at = Some(seq);
            answer.rows = seq - 1;
            answer.problem = Some(problem.to_owned());
        }
        Err(ChainError::Checkpoint(problem)) => {
            answer.intact = false;
            answer.problem = Some(problem);
        }
        Err(ChainError::Db(e)) => return Err(e.into()),
        Err(e) => return Err(anyhow::Error::new(e).into()),
    }
    let outcome = if answer.intact { Outcome::Success } else { Outcome::Failure };
    let mut event = user.event(Action::AuditVerify, outcome);
    if !answer.intact {
        event = event.reason("chain_broken");
    }
    state.audit(&event).await?;
    Ok(Json(answer))
}

/// Whose accesses: the body of `POST /v1/audit/disclosures` (the reference
/// travels in the body, never in a URL).
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DisclosureQuery {
    /// The patient reference, as uploaded
    #[schema(schema_with = crate::validate::schema::patient_ref)]
    patient_ref: String,
    /// The `next_cursor` of the previous page.
    #[serde(default, deserialize_with = "crate::validate::integer")]
    after: Option<i64>,
    /// Accesses per page (default 100).
    #[schema(schema_with = page_limit)]
    #[serde(default, deserialize_with = "crate::validate::integer")]
    limit: Option<i64>,
}

/// One access to the patient: who, when, what, and under which grant.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Disclosure {
    seq: i64,
    #[serde(with = "time::serde::rfc3339")]
    occurred_at: OffsetDateTime,
    actor_kind: String,
    actor_id: Option<Uuid>,
    actor_name: Option<String>,
    actor_role: Option<String>,
    source_ip: Option<String>,
    action: String,
    outcome: String,
    resource_kind: Option<String>,
    resource_id: Option<String>,
    /// The reason code the event carries (`out_of_scope`, a privacy
    /// officer's reason and `case:…`, …).
    reason: Option<String>,
    /// The break-glass grant the access was made under, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    break_glass_grant: Option<Uuid>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct DisclosurePage {
    disclosures: Vec<Disclosure>,
    /// Pass as `after` for the next page; absent on the last one.
    #[serde(skip_serializing_if = "Option::is_none")]
    next_cursor: Option<i64>,
}

/// The accounting of disclosures (HIPAA §164.528, GDPR Art. 15): every
/// access to one patient on the audit trail, newest first, a page at a time.
/// Reads, concept pages that listed them, exports, break-glass grants for
/// them, refusals, care-team additions and erasure; the lookup itself is
/// audited and names the patient too.
#[utoipa::path(
    post,
    path = "/v1/audit/disclosures",
    tag = "audit",
    request_body = DisclosureQuery,
    responses(
        (status = 200, description = "A page of the patient's disclosures, newest first", body = DisclosurePage),
    ),
    extensions(("x-errors" = json!([
        "invalid_patient_ref", "invalid_limit",
        "unavailable: the api has no audit reader connection (`AUDIT_READER_DATABASE_URL`)",
    ]))),
)]
#[tracing::instrument(skip_all, fields(user_id = %user.id))]
pub(crate) async fn disclosures(
    State(state): State<AppState>,
    user: AuthUser,
    JsonBody(q): JsonBody<DisclosureQuery>,
) -> Result<Json<DisclosurePage>, ApiError> {
    let db = audit_db(&state)?;
    let patient = clinflow::documents::patient_index(&state.index_key, &valid_patient_ref(&q.patient_ref)?);
    let limit = q.limit.unwrap_or(100);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::invalid("invalid_limit", format!("limit must be 1-{MAX_PAGE}")));
    }
    // The lookup is on the trail before anything is answered.
    let event = user.event(Action::AuditDisclosures, Outcome::Success).patient(&patient);
    state.audit(&event).await?;
    let rows = sqlx::query!(
        r#"SELECT e.seq, e.occurred_at, e.actor_kind, e.actor_id, e.actor_name, e.actor_role,
                  host(e.source_ip) AS source_ip, e.action, e.outcome, e.resource_kind, e.resource_id, e.reason
           FROM audit_disclosures d
           JOIN audit_events e ON e.seq = d.seq AND e.recorded_at = d.recorded_at
           WHERE d.patient_index = $1 AND ($2::bigint IS NULL OR d.seq < $2)
           ORDER BY d.seq DESC
           LIMIT $3"#,
        patient,
        q.after,
        limit,
    )
    .fetch_all(db)
    .await?;
    let next_cursor = (rows.len() as i64 == limit).then(|| rows.last().map(|r| r.seq)).flatten();
    let disclosures = rows
        .into_iter()
        .map(|r| Disclosure {
            // A read under a grant names it in its reason; the grant itself
            // is its resource.
            break_glass_grant: match (r.resource_kind.as_deref(), r.resource_id.as_deref()) {
                (Some("break_glass"), Some(id)) => Uuid::try_parse(id).ok(),
                _ => r.reason.as_deref().and_then(break_glass_grant),
            },
            seq: r.seq,
            occurred_at: r.occurred_at,
            actor_kind: r.actor_kind,
            actor_id: r.actor_id,
            actor_name: r.actor_name,
            actor_role: r.actor_role,
            source_ip: r.source_ip,
            action: r.action,
            outcome: r.outcome,
            resource_kind: r.resource_kind,
            resource_id: r.resource_id,
            reason: r.reason,
        })
        .collect();
    Ok(Json(DisclosurePage { disclosures, next_cursor }))
}

/// The grant a read was made under: `break_glass:<id>` in its reason (a
/// grant itself names its id as its resource).
fn break_glass_grant(reason: &str) -> Option<Uuid> {
    reason.split(' ').find_map(|word| word.strip_prefix("break_glass:")).and_then(|id| Uuid::try_parse(id).ok())
}
