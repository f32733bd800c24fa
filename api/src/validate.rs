//! Validation shared by the handlers: an upload's fields, patient
//! references, names. A refusal names the field and never echoes its value.

use axum::http::StatusCode;
use clinflow::retention::Basis;
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
    pub(crate) lawful_basis: Basis,
    /// The research consent (`lawful_basis: research` only).
    pub(crate) consent_ref: Option<String>,
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

/// An upload's fields, checked; `default_basis` is the uploading account's
/// (used when the upload names no lawful basis).
pub(crate) fn validate(req: UploadRequest, default_basis: Option<Basis>) -> Result<ValidUpload, ApiError> {
    let patient_ref = valid_patient_ref(&req.patient_ref)?;
    let (lawful_basis, consent_ref) = lawful_basis(&req, default_basis)?;
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
    Ok(ValidUpload { patient_ref, text: req.text, source_ref, document_date, care_team, lawful_basis, consent_ref })
}

const MAX_CONSENT_REF_CHARS: usize = 128;

/// A research consent's reference, trimmed: 1-128 characters without
/// control characters (the message does not echo it).
pub(crate) fn consent_ref(value: &str) -> Result<String, ApiError> {
    let value = value.trim();
    if value.is_empty() || value.chars().count() > MAX_CONSENT_REF_CHARS || value.chars().any(char::is_control) {
        return Err(ApiError::invalid(
            "invalid_consent_ref",
            format!("consent_ref must be 1-{MAX_CONSENT_REF_CHARS} characters without control characters"),
        ));
    }
    Ok(value.to_owned())
}

/// Why the note is held: the upload's own basis, else the account's; research
/// needs the consent it rests on, and only research takes one.
fn lawful_basis(req: &UploadRequest, default_basis: Option<Basis>) -> Result<(Basis, Option<String>), ApiError> {
    let basis = match req.lawful_basis.as_deref().map(str::trim) {
        Some(b) => Basis::parse(b).ok_or_else(|| {
            ApiError::invalid("invalid_lawful_basis", "lawful_basis must be direct_care, research or legal_obligation")
        })?,
        None => default_basis.ok_or_else(|| {
            ApiError::invalid(
                "missing_lawful_basis",
                "lawful_basis is required (direct_care, research with consent_ref, or legal_obligation): \
                 this account has no default basis",
            )
        })?,
    };
    let consent = req.consent_ref.as_deref().map(str::trim).filter(|c| !c.is_empty());
    match (basis, consent) {
        (Basis::Research, None) => {
            Err(ApiError::invalid("missing_consent_ref", "consent_ref is required when lawful_basis is research"))
        }
        (Basis::Research, Some(c)) => Ok((basis, Some(consent_ref(c)?))),
        (_, Some(_)) => Err(ApiError::invalid("invalid_consent_ref", "consent_ref is for lawful_basis research only")),
        (_, None) => Ok((basis, None)),
    }
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
            lawful_basis: None,
            consent_ref: None,
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
            let err = validate(bad, Some(Basis::DirectCare)).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(!err.is_empty());
            assert!(!err.contains("14/02") && !err.contains("PAT"), "{err}");
        }
        let ok = validate(req(" PAT-1 ", "metformin", Some("2026-02-14")), Some(Basis::DirectCare)).unwrap();
        assert_eq!(ok.patient_ref, "PAT-1");
        assert_eq!(ok.document_date, Some(time::macros::date!(2026 - 02 - 14)));
    }

    #[test]
    fn every_upload_has_a_lawful_basis_and_research_its_consent() {
        let with = |basis: Option<&str>, consent: Option<&str>| UploadRequest {
            lawful_basis: basis.map(Into::into),
            consent_ref: consent.map(Into::into),
            ..req("PAT-1", "x", None)
        };
        let code = |r: Result<ValidUpload, ApiError>| r.err().map(|e| e.code_and_message().0);
        assert_eq!(code(validate(with(None, None), None)), Some("missing_lawful_basis"));
        assert_eq!(code(validate(with(Some("marketing"), None), None)), Some("invalid_lawful_basis"));
        assert_eq!(code(validate(with(Some("research"), None), None)), Some("missing_consent_ref"));
        assert_eq!(code(validate(with(Some("direct_care"), Some("C-1")), None)), Some("invalid_consent_ref"));
        assert_eq!(code(validate(with(None, Some("C-1")), Some(Basis::DirectCare))), Some("invalid_consent_ref"));
        let account = validate(with(None, None), Some(Basis::LegalObligation)).unwrap();
        assert_eq!((account.lawful_basis, account.consent_ref), (Basis::LegalObligation, None));
        let own = validate(with(Some("research"), Some(" C-1 ")), Some(Basis::DirectCare)).unwrap();
        assert_eq!((own.lawful_basis, own.consent_ref.as_deref()), (Basis::Research, Some("C-1")));
    }
}
