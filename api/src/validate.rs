//! Validation shared by the handlers: an upload's fields, patient
//! references, names. A refusal names the field and never echoes its value.
//! [`schema`] states each check in the OpenAPI description, from the same
//! constants: what the description allows, the check accepts.

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
/// Bounds of a reason code and of a case reference, in (ASCII) characters.
const REASON_CHARS: (usize, usize) = (3, 64);
const CASE_REF_CHARS: (usize, usize) = (1, 64);
/// The characters a case reference may hold besides letters and digits.
const CASE_REF_PUNCTUATION: &str = "._/-";
/// Longest team name or key label; the characters they may hold besides
/// letters and digits.
const MAX_NAME_CHARS: usize = 64;
const NAME_PUNCTUATION: &str = "._@ -";

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
pub(crate) fn valid_patient_ref(sent: &str) -> Result<String, ApiError> {
    let patient_ref = sent.trim().to_owned();
    if patient_ref.is_empty() || sent.chars().count() > MAX_PATIENT_REF_CHARS {
        return Err(ApiError::invalid(
            "invalid_patient_ref",
            format!("patient_ref must be 1-{MAX_PATIENT_REF_CHARS} characters"),
        ));
    }
    if sent.chars().any(char::is_control) {
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
    if req
        .source_ref
        .as_ref()
        .is_some_and(|s| s.chars().count() > MAX_SOURCE_REF_CHARS || s.chars().any(char::is_control))
    {
        return Err(ApiError::invalid(
            "invalid_source_ref",
            format!("source_ref must be at most {MAX_SOURCE_REF_CHARS} characters, without control characters"),
        ));
    }
    let source_ref = req.source_ref.map(|s| s.trim().to_owned()).filter(|s| !s.is_empty());
    // An empty date is no date; any other must be one, as sent.
    let format = time::macros::format_description!("[year]-[month]-[day]");
    let document_date =
        match req.document_date.as_deref().filter(|d| !d.is_empty()) {
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
pub(crate) fn consent_ref(sent: &str) -> Result<String, ApiError> {
    let value = sent.trim();
    if value.is_empty() || sent.chars().count() > MAX_CONSENT_REF_CHARS || sent.chars().any(char::is_control) {
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
    let basis = match req.lawful_basis.as_deref() {
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
    match (basis, req.consent_ref.as_deref()) {
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
    let (min, max) = REASON_CHARS;
    if !(min..=max).contains(&value.len()) || !value.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
        return Err(ApiError::invalid(
            "invalid_reason",
            format!("{field} must be a code of {min}-{max} lowercase letters and _, e.g. gdpr_erasure_request"),
        ));
    }
    Ok(value.to_owned())
}

/// The privacy case's reference (`DSAR-2026-0042`): 1-64 letters, digits and
/// `._/-`. It goes on the audit trail, so it must name the case, never the
/// patient.
pub(crate) fn case_ref(value: &str) -> Result<String, ApiError> {
    let (min, max) = CASE_REF_CHARS;
    if !(min..=max).contains(&value.len())
        || !value.chars().all(|c| c.is_ascii_alphanumeric() || CASE_REF_PUNCTUATION.contains(c))
    {
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
    (1..=MAX_NAME_CHARS).contains(&s.len())
        && s.chars().all(|c| c.is_ascii_alphanumeric() || NAME_PUNCTUATION.contains(c))
}

/// An optional integer in a JSON body (`#[serde(default, deserialize_with =
/// "crate::validate::integer")]`): JSON Schema's `integer` is any number
/// without a fraction, `2.0` as well as `2`, and so is this.
pub(crate) fn integer<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<i64>, D::Error> {
    use serde::Deserialize;
    use serde::de::Error;
    match Option::<serde_json::Number>::deserialize(deserializer)? {
        None => Ok(None),
        Some(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => Ok(Some(i)),
            // Integral, and exact: past 2^53 a float may be a larger
            // integer rounded (-2^63 - 1 reads as i64::MIN).
            (None, Some(f)) if f.fract() == 0.0 && f.abs() < 2f64.powi(53) => Ok(Some(f as i64)),
            _ => Err(D::Error::custom("expected an integer")),
        },
    }
}

/// The checks above as the OpenAPI description states them (each field's
/// `#[schema(schema_with = …)]`, and `openapi` for the shared wire types):
/// lengths, patterns and enums from the same constants. Patterns are
/// ECMA-262 regular expressions, as JSON Schema's are.
pub(crate) mod schema {
    use std::sync::LazyLock;

    use utoipa::openapi::schema::{Object, ObjectBuilder, SchemaFormat, SchemaType, Type};
    use utoipa::openapi::{KnownFormat, RefOr, Schema};

    use super::*;
    use crate::users::{MAX_USERNAME_CHARS, MIN_PASSWORD_CHARS, USERNAME_PUNCTUATION};

    /// Any character but a control character (`char::is_control`: Unicode Cc).
    const NOT_CONTROL: &str = r"[^\x00-\x1f\x7f-\x9f]";
    /// What `str::trim` removes (`char::is_whitespace`, Unicode White_Space),
    /// for a character class: regular expressions' `\s` differs (ECMA-262's
    /// takes U+FEFF and not U+0085, Python's the reverse).
    pub(super) const WHITE_SPACE: &str = r"\x09-\x0d\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000";
    /// Neither a control character nor white space.
    static VISIBLE: LazyLock<String> = LazyLock::new(|| format!(r"[^{WHITE_SPACE}\x00-\x1f\x7f-\x9f]"));
    /// Not blank, and (as every string the api takes) without NUL.
    pub(crate) static NOT_BLANK: LazyLock<String> =
        LazyLock::new(|| format!(r"^[^\x00]*[^{WHITE_SPACE}\x00][^\x00]*$"));

    fn string(nullable: bool) -> ObjectBuilder {
        let kind =
            if nullable { SchemaType::from_iter([Type::String, Type::Null]) } else { SchemaType::new(Type::String) };
        ObjectBuilder::new().schema_type(kind)
    }

    /// Text of at most `max` characters without control characters, with
    /// something besides white space (which is trimmed).
    fn reference(max: usize, nullable: bool) -> ObjectBuilder {
        string(nullable)
            .min_length(Some(1))
            .max_length(Some(max))
            .pattern(Some(format!("^{NOT_CONTROL}*{}{NOT_CONTROL}*$", *VISIBLE)))
    }

    /// A character class of ASCII letters and digits and `punctuation`.
    fn ascii_class(punctuation: &str) -> String {
        let escaped: String =
            punctuation.chars().flat_map(|c| if c == '-' { vec!['\\', c] } else { vec![c] }).collect();
        format!("[A-Za-z0-9{escaped}]")
    }

    pub(crate) fn patient_ref() -> Object {
        reference(MAX_PATIENT_REF_CHARS, false).description(Some("The patient reference, as uploaded")).build()
    }

    /// `text`: not blank, at most [`MAX_TEXT_BYTES`] bytes of UTF-8 (as many
    /// characters when they are ASCII).
    pub(crate) fn text() -> Object {
        string(false)
            .min_length(Some(1))
            .max_length(Some(MAX_TEXT_BYTES))
            .pattern(Some(NOT_BLANK.clone()))
            .description(Some(format!("The note; at most {MAX_TEXT_BYTES} bytes of UTF-8, not only white space")))
            .build()
    }

    /// `source_ref`: empty (none) or up to [`MAX_SOURCE_REF_CHARS`] characters.
    pub(crate) fn source_ref() -> Object {
        string(true).max_length(Some(MAX_SOURCE_REF_CHARS)).pattern(Some(format!("^{NOT_CONTROL}*$"))).build()
    }

    /// `document_date`: a date, or empty (none).
    pub(crate) fn document_date() -> RefOr<Schema> {
        let date = string(false).format(Some(SchemaFormat::KnownFormat(KnownFormat::Date)));
        let schema = utoipa::openapi::schema::OneOfBuilder::new()
            .item(date)
            .item(string(false).max_length(Some(0)))
            .item(ObjectBuilder::new().schema_type(Type::Null))
            .description(Some("YYYY-MM-DD; empty or null for none"));
        schema.into()
    }

    pub(crate) fn lawful_basis(nullable: bool, bases: &[Basis]) -> Object {
        let mut values: Vec<serde_json::Value> = bases.iter().map(|b| b.as_str().into()).collect();
        if nullable {
            values.push(serde_json::Value::Null);
        }
        string(nullable).enum_values(Some(values)).build()
    }

    pub(crate) fn consent_ref(nullable: bool) -> Object {
        reference(MAX_CONSENT_REF_CHARS, nullable).build()
    }

    /// `reason` as a code, as [`reason_code`] takes it.
    pub(crate) fn reason_code(nullable: bool) -> Object {
        let (min, max) = REASON_CHARS;
        string(nullable)
            .min_length(Some(min))
            .max_length(Some(max))
            .pattern(Some(format!("^[a-z_]{{{min},{max}}}$")))
            .build()
    }

    pub(crate) fn case_ref(nullable: bool) -> Object {
        let (min, max) = CASE_REF_CHARS;
        let class = ascii_class(CASE_REF_PUNCTUATION);
        string(nullable)
            .min_length(Some(min))
            .max_length(Some(max))
            .pattern(Some(format!("^{class}{{{min},{max}}}$")))
            .build()
    }

    /// A key label as `create_api_key` takes it: a plain name, or empty,
    /// white space or null for none.
    pub(crate) fn plain_name_or_empty() -> Object {
        let class = ascii_class(NAME_PUNCTUATION);
        string(true).max_length(Some(MAX_NAME_CHARS)).pattern(Some(format!("^{class}*$"))).build()
    }

    /// A page size: 1 to `max`, or absent.
    pub(crate) fn page_limit(max: i64) -> Object {
        let kind = SchemaType::from_iter([Type::Integer, Type::Null]);
        ObjectBuilder::new().schema_type(kind).minimum(Some(1)).maximum(Some(max)).build()
    }

    /// Free text of `min` to `max` characters, `min` of them from the first
    /// to the last that is not white space.
    pub(crate) fn trimmed_text(min: usize, max: usize) -> Object {
        let inner = min.saturating_sub(2);
        let visible = format!(r"[^{WHITE_SPACE}\x00]");
        let pattern = format!(r"^[^\x00]*{visible}[^\x00]{{{inner},}}{visible}[^\x00]*$");
        string(false).min_length(Some(min)).max_length(Some(max)).pattern(Some(pattern)).build()
    }

    /// A team name or key label, as [`plain_name`] takes it.
    pub(crate) fn plain_name(nullable: bool) -> Object {
        let class = ascii_class(NAME_PUNCTUATION);
        string(nullable)
            .min_length(Some(1))
            .max_length(Some(MAX_NAME_CHARS))
            .pattern(Some(format!("^{class}{{1,{MAX_NAME_CHARS}}}$")))
            .build()
    }

    pub(crate) fn username() -> Object {
        let class = ascii_class(USERNAME_PUNCTUATION);
        let max = MAX_USERNAME_CHARS;
        string(false).min_length(Some(1)).max_length(Some(max)).pattern(Some(format!("^{class}{{1,{max}}}$"))).build()
    }

    /// A new password: at least [`MIN_PASSWORD_CHARS`] characters.
    pub(crate) fn new_password() -> Object {
        string(false).min_length(Some(MIN_PASSWORD_CHARS)).format(Some(SchemaFormat::Custom("password".into()))).build()
    }
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

    /// The description's white space is what `trim` takes away.
    #[test]
    fn the_described_white_space_is_rusts() {
        fn escape(s: &str) -> (u32, &str) {
            let (digits, s) = match s.strip_prefix(r"\x") {
                Some(s) => (2, s),
                None => (4, s.strip_prefix(r"\u").unwrap()),
            };
            (u32::from_str_radix(&s[..digits], 16).unwrap(), &s[digits..])
        }
        let (mut ranges, mut rest) = (Vec::new(), schema::WHITE_SPACE);
        while !rest.is_empty() {
            let (first, after) = escape(rest);
            let (last, after) = after.strip_prefix('-').map_or((first, after), escape);
            ranges.push(first..=last);
            rest = after;
        }
        for c in (0..=0x10FFFF).filter_map(char::from_u32) {
            assert_eq!(c.is_whitespace(), ranges.iter().any(|r| r.contains(&u32::from(c))), "{c:?}");
        }
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
