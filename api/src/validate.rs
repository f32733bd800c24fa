//! Validation shared by the handlers: an upload's fields, patient
//! references, names. A refusal names the field and never echoes its value.

use axum::http::StatusCode;
use clinflow::wire::UploadRequest;
use time::Date;

use crate::auth::AuthUser;
use crate::error::ApiError;
use crate::users::Role;

/// Largest accepted note, in bytes of UTF-8.
pub const MAX_TEXT_BYTES: usize = 1_000_000;
const MAX_PATIENT_REF_CHARS: usize = 128;
const MAX_SOURCE_REF_CHARS: usize = 256;

pub(crate) struct ValidUpload {
    pub(crate) patient_ref: String,
    pub(crate) text: String,
    pub(crate) source_ref: Option<String>,
    pub(crate) document_date: Option<Date>,
    pub(crate) care_team: Option<String>,
}

/// A patient reference, trimmed, or a message that does not echo it.
pub(crate) fn valid_patient_ref(patient_ref: &str) -> Result<String, ApiError> {
    let patient_ref = patient_ref.trim().to_owned();
    if patient_ref.is_empty() || patient_ref.chars().count() > MAX_PATIENT_REF_CHARS {
        return Err(ApiError::invalid(
            "invalid_patient_ref",
            format!("patient_ref must be 1-{MAX_PATIENT_REF_CHARS} characters"),
        ));
    }
    if patient_ref.chars().any(char::is_control) {
        return Err(ApiError::invalid("invalid_patient_ref", "patient_ref must not contain control characters"));
    }
    Ok(patient_ref)
}

/// Only ingest accounts may put a patient in a care team with an upload: a
/// clinician who could would widen their own scope.
pub(crate) fn check_care_team(user: &AuthUser, upload: &ValidUpload) -> Result<(), ApiError> {
    if upload.care_team.is_some() && user.role != Role::Ingest {
        return Err(ApiError::BadRequest {
            status: StatusCode::FORBIDDEN,
            code: "care_team_forbidden",
            message: "only ingest accounts may name a care team; an admin adds patients to teams".into(),
        });
    }
    Ok(())
}

pub(crate) fn validate(req: UploadRequest) -> Result<ValidUpload, ApiError> {
    let patient_ref = valid_patient_ref(&req.patient_ref)?;
    if req.text.trim().is_empty() {
        return Err(ApiError::invalid("empty_text", "text must not be empty"));
    }
    if req.text.len() > MAX_TEXT_BYTES {
        return Err(ApiError::BadRequest {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            code: "text_too_large",
            message: format!("text must be at most {MAX_TEXT_BYTES} bytes, got {}", req.text.len()),
        });
    }
    let source_ref = req.source_ref.map(|s| s.trim().to_owned()).filter(|s| !s.is_empty());
    if source_ref.as_ref().is_some_and(|s| s.chars().count() > MAX_SOURCE_REF_CHARS || s.chars().any(char::is_control))
    {
        return Err(ApiError::invalid(
            "invalid_source_ref",
            format!("source_ref must be at most {MAX_SOURCE_REF_CHARS} characters, without control characters"),
        ));
    }
    let format = time::macros::format_description!("[year]-[month]-[day]");
    let document_date =
        match req.document_date.as_deref().map(str::trim).filter(|d| !d.is_empty()) {
            None => None,
            Some(d) => Some(Date::parse(d, &format).map_err(|_| {
                ApiError::invalid("invalid_document_date", "document_date must be a date as YYYY-MM-DD")
            })?),
        };
    let care_team = req.care_team.map(|t| t.trim().to_owned()).filter(|t| !t.is_empty());
    Ok(ValidUpload { patient_ref, text: req.text, source_ref, document_date, care_team })
}

/// Why, as a code (`gdpr_erasure_request`, `data_entry_error`, …): 3-64
/// lowercase letters and `_`. It goes on the audit trail, which takes no
/// free text.
pub(crate) fn reason_code(field: &'static str, value: &str) -> Result<String, ApiError> {
    let value = value.trim();
    if !(3..=64).contains(&value.len()) || !value.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
        return Err(ApiError::invalid(
            "invalid_reason",
            format!("{field} must be a code of 3-64 lowercase letters and _, e.g. gdpr_erasure_request"),
        ));
    }
    Ok(value.to_owned())
}

/// The privacy case's reference (`DSAR-2026-0042`): 1-64 letters, digits and
/// `._/-`. It goes on the audit trail, so it must name the case, never the
/// patient.
pub(crate) fn case_ref(value: &str) -> Result<String, ApiError> {
    let value = value.trim();
    if !(1..=64).contains(&value.len()) || !value.chars().all(|c| c.is_ascii_alphanumeric() || "._/-".contains(c)) {
        return Err(ApiError::invalid(
            "invalid_case_ref",
            "case_ref must be 1-64 letters, digits and ._/- (the case's reference, never the patient's)",
        ));
    }
    Ok(value.to_owned())
}

/// A team name or key label: 1-64 letters, digits and `._@ -` (the
/// database's CHECKs say the same).
pub(crate) fn plain_name(s: &str) -> bool {
    (1..=64).contains(&s.len()) && s.chars().all(|c| c.is_ascii_alphanumeric() || "._@ -".contains(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(patient_ref: &str, text: &str, date: Option<&str>) -> UploadRequest {
        UploadRequest {
            patient_ref: patient_ref.into(),
            text: text.into(),
            source_ref: None,
            document_date: date.map(Into::into),
            care_team: None,
        }
    }

    #[test]
    fn validation_messages_never_echo_the_input() {
        for bad in [
            req("", "x", None),
            req("PAT-1", "  ", None),
            req("PAT-1", "x", Some("14/02/2026")),
            req("PAT\u{7}", "x", None),
        ] {
            let err = validate(bad).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(!err.is_empty());
            assert!(!err.contains("14/02") && !err.contains("PAT"), "{err}");
        }
        let ok = validate(req(" PAT-1 ", "metformin", Some("2026-02-14"))).unwrap();
        assert_eq!(ok.patient_ref, "PAT-1");
        assert_eq!(ok.document_date, Some(time::macros::date!(2026 - 02 - 14)));
    }
}
