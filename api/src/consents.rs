//! A research consent withdrawn (GDPR Art. 7(3)): the documents resting on
//! it are purged, each audited as `document.purge` (`consent_withdrawn`).

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use clinflow::audit::{Action, Operator, Outcome};
use clinflow::retention::{self, Selection};
use serde::{Deserialize, Serialize};

use crate::auth::AuthUser;
use crate::error::ApiError;
use crate::extract::JsonBody;
use crate::state::AppState;
use crate::validate::{case_ref, consent_ref};

/// Documents per transaction while a consent's documents are purged.
const BATCH: i64 = 500;

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConsentWithdrawal {
    /// The consent's reference, as the research uploads named it.
    #[schema(schema_with = consent)]
    consent_ref: String,
    /// The privacy case's reference (`DSAR-2026-0042`), never the patient's.
    #[schema(schema_with = case)]
    case_ref: String,
}

fn consent() -> utoipa::openapi::schema::Object {
    crate::validate::schema::consent_ref(false)
}

fn case() -> utoipa::openapi::schema::Object {
    crate::validate::schema::case_ref(false)
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct Withdrawn {
    documents: i64,
    results: i64,
    concepts: i64,
    /// Patients left with nothing: their data keys destroyed.
    data_keys: i64,
}

/// `POST /v1/privacy/consents/withdraw`: a research consent is withdrawn;
/// every document resting on it is purged now (with its results and concept
/// rows), each audited. Answers what went (zeros when none rested on it: the
/// withdrawal is recorded either way).
#[utoipa::path(post, path = "/v1/privacy/consents/withdraw", tag = "privacy",
    request_body = ConsentWithdrawal,
    responses((status = 200, description = "What was purged", body = Withdrawn)),
    extensions(("x-errors" = json!(["invalid_consent_ref", "invalid_case_ref"]))))]
#[tracing::instrument(skip_all, fields(user_id = %user.id))]
pub(crate) async fn withdraw(
    State(state): State<AppState>,
    user: AuthUser,
    JsonBody(req): JsonBody<ConsentWithdrawal>,
) -> Result<Json<Withdrawn>, ApiError> {
    let consent = consent_ref(&req.consent_ref)?;
    let case = case_ref(&req.case_ref)?;
    let index = retention::consent_index(&state.index_key, &consent);
    let operator = Operator { actor: user.actor(), signer: Arc::clone(&state.audit_signer) };
    let purged =
        retention::purge(&state.db, &Selection::Consent(index), &operator, BATCH, |_| state.relay.wake()).await?;
    let event = user.event(Action::ConsentWithdraw, Outcome::Success).resource("consent", "withdrawn");
    state.audit(&event.reason(&format!("case:{case} documents:{}", purged.documents))).await?;
    Ok(Json(Withdrawn {
        documents: purged.documents,
        results: purged.results,
        concepts: purged.concepts,
        data_keys: purged.data_keys,
    }))
}
