//! The questions clinicians ask: a patient's documents and problem list
//! (`reads`), "my patients with this concept" and their documents
//! (`concepts`); a patient's GDPR export (`fhir`, FHIR R4) and erasure
//! (`erasure`). This module holds what they share: the patient as named,
//! the scope check, the audit of a read, paging.
//!
//! Patients are found by their blind index; the concept index
//! (`document_concepts`) answers the concept questions without decrypting
//! anything but the patient references shown. A clinician sees the patients
//! of their care teams and those they broke the glass for; every call is
//! audited with the patient's blind index (hex), never the reference.

pub mod concepts;
pub mod erasure;
pub mod fhir;
pub mod reads;

use clinflow::audit::{Action, Outcome};
use clinflow::documents;
use serde::Serialize;
use time::Date;
use uuid::Uuid;

use crate::auth::AuthUser;
use crate::error::ApiError;
use crate::scope::{self, Grant};
use crate::state::AppState;
use crate::validate::valid_patient_ref;

const DEFAULT_PAGE: i64 = 100;
const MAX_PAGE: i64 = 1000;

/// A patient as the caller named them: the blind index, and its hex for
/// the audit trail.
pub(super) struct Patient {
    pub(super) reference: String,
    pub(super) index: Vec<u8>,
}

impl Patient {
    pub(super) fn parse(state: &AppState, raw: &str) -> Result<Self, ApiError> {
        let reference = valid_patient_ref(raw)?;
        let index = documents::patient_index(&state.index_key, &reference);
        Ok(Self { reference, index })
    }

    pub(super) fn audit_id(&self) -> String {
        hex(&self.index)
    }
}

pub(super) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(super) fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// The caller's grant on this patient, or a 403 audited as out of scope.
pub(super) async fn in_scope(
    state: &AppState,
    user: &AuthUser,
    patient: &Patient,
    action: Action,
) -> Result<Grant, ApiError> {
    if let Some(grant) = scope::patient_grant(&state.db, user.id, &patient.index).await? {
        return Ok(grant);
    }
    metrics::counter!("clinflow_api_forbidden_total", "reason" => "out_of_scope").increment(1);
    let event = user
        .event(action, Outcome::Denied)
        .resource("patient", &patient.audit_id())
        .patient(&patient.index)
        .reason("out_of_scope");
    state.audit(&event).await?;
    Err(ApiError::OutOfScope)
}

/// A patient's data was read: on the audit trail, the patient named for the
/// accounting of disclosures, with the break-glass grant it was read under.
pub(super) async fn audit_read(
    state: &AppState,
    user: &AuthUser,
    action: Action,
    patient: &Patient,
    grant: Option<Grant>,
) -> Result<(), ApiError> {
    let mut event =
        user.event(action, Outcome::Success).resource("patient", &patient.audit_id()).patient(&patient.index);
    if let Some(reason) = grant.and_then(Grant::audit_reason) {
        event = event.reason(&reason);
    }
    state.audit(&event).await
}

pub(super) fn page_size(limit: Option<i64>) -> Result<i64, ApiError> {
    match limit {
        None => Ok(DEFAULT_PAGE),
        Some(n) if (1..=MAX_PAGE).contains(&n) => Ok(n),
        Some(_) => Err(ApiError::invalid("invalid_limit", format!("limit must be 1-{MAX_PAGE}"))),
    }
}

/// `limit` as [`page_size`] takes it.
pub(super) fn page_size_schema() -> utoipa::openapi::schema::Object {
    crate::validate::schema::page_limit(MAX_PAGE)
}

/// A date as [`date_param`] takes it, or null.
pub(super) fn date_schema() -> utoipa::openapi::schema::Object {
    use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, SchemaFormat, SchemaType, Type};
    let kind = SchemaType::from_iter([Type::String, Type::Null]);
    ObjectBuilder::new().schema_type(kind).format(Some(SchemaFormat::KnownFormat(KnownFormat::Date))).build()
}

/// A cursor as [`cursor_id`] takes it, or null.
pub(super) fn uuid_cursor_schema() -> utoipa::openapi::schema::Object {
    use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, SchemaFormat, SchemaType, Type};
    let kind = SchemaType::from_iter([Type::String, Type::Null]);
    ObjectBuilder::new().schema_type(kind).format(Some(SchemaFormat::KnownFormat(KnownFormat::Uuid))).build()
}

pub(super) fn date_param(name: &'static str, value: Option<&str>) -> Result<Option<Date>, ApiError> {
    let format = time::macros::format_description!("[year]-[month]-[day]");
    value
        .map(|v| {
            Date::parse(v, &format).map_err(|_| ApiError::invalid("invalid_date", format!("{name} must be YYYY-MM-DD")))
        })
        .transpose()
}

pub(super) fn cursor_id(after: Option<&str>) -> Result<Option<Uuid>, ApiError> {
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
}
