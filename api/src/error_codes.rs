//! Every error code the api answers with: its status and one line saying
//! when. The OpenAPI description ([`crate::openapi`]) takes its error
//! answers from here, so each code is described once.
//!
//! A handler names the codes it can answer with in its `#[utoipa::path]`:
//! `extensions(("x-errors" = json!(["busy", "not_found: no such team"])))`,
//! where `code: text` words one code for that route alone (what is not
//! found, which service is unavailable). The router's own codes (the
//! guard's, a parameter's, a body's, the time limit's) are added to every
//! operation they apply to. A code named here but not catalogued stops the
//! description from being built.

/// (code, HTTP status, when it is answered).
const CODES: &[(&str, u16, &str)] = &[
    // Before or around every handler.
    ("unauthenticated", 401, "no credentials, or a token or key that is invalid, expired or revoked"),
    ("forbidden", 403, "the caller's role may not call this"),
    (
        "csrf_token",
        403,
        "a request with the console's session cookie lacks its CSRF token (`X-CSRF-Token`, the value of the \
         `__Host-clinflow-csrf` cookie)",
    ),
    ("internal", 500, "an unexpected failure; the `x-request-id` header identifies it"),
    ("unavailable", 503, "the database is unreachable; retry after `Retry-After`"),
    (
        "timeout",
        503,
        "no answer within the time limit (`API_REQUEST_TIMEOUT_SECONDS`, for a batch `API_BATCH_TIMEOUT_SECONDS`), \
         the body's upload included",
    ),
    ("invalid_path", 400, "a path parameter is not valid (an id that is no UUID); the message names it"),
    (
        "invalid_query",
        400,
        "a query parameter is unknown, of the wrong type, not UTF-8 or holds a NUL; the message names it",
    ),
    ("invalid_json", 400, "the body is not valid JSON (invalid UTF-8 included); the message names the field"),
    ("payload_too_large", 413, "the body is too large"),
    ("unsupported_media_type", 415, "the body is not sent as `application/json` (a batch: NDJSON)"),
    (
        "invalid_body",
        422,
        "a field is missing, unknown, of the wrong type or holds a NUL character; the message names it",
    ),
    ("body_timeout", 408, "the body sent nothing for `API_BODY_STALL_SECONDS`"),
    // Logging in, and what needs the caller's password again.
    (
        "invalid_credentials",
        401,
        "wrong username or password, or a locked, disabled or service account (the same answer for each)",
    ),
    ("too_many_logins", 429, "too many attempts from this address; retry after `Retry-After`"),
    ("login_busy", 503, "too many password checks waiting; retry after `Retry-After`"),
    (
        "erasure_refused",
        409,
        "erasure would miss rows: documents without a patient index remain (run `keys migrate-v1`, then \
         `reindex-patients`)",
    ),
    ("wrong_password", 403, "the password given is not the caller's"),
    ("not_a_session", 422, "an API key has no session (an admin revokes keys)"),
    (
        "password_change_required",
        403,
        "the caller's password was set by an admin and is one-time: `POST /v1/auth/password` first",
    ),
    ("same_password", 422, "`new_password` is the current one"),
    // Care-team scope.
    ("out_of_scope", 403, "the patient is outside the caller's care teams and no break-glass grant covers it"),
    ("invalid_reason", 422, "the reason given is not one this operation takes"),
    ("break_glass_limit", 429, "the clinician took `BREAK_GLASS_GRANTS_PER_DAY` grants in the last 24 hours"),
    // Privacy.
    ("invalid_case_ref", 422, "`case_ref` is missing or not 1-64 letters, digits and ._/-"),
    ("erasure_pending", 409, "the patient already has an open erasure request"),
    ("four_eyes_required", 403, "the privacy officer who asked for an erasure cannot approve it"),
    // Uploads.
    ("busy", 429, "the pipeline is behind; retry after `Retry-After`"),
    ("care_team_forbidden", 403, "only ingest accounts may name a care team"),
    ("care_team_not_bound", 403, "the ingest account is not bound to this care team (an admin adds it as a member)"),
    ("duplicate_source_ref", 409, "the caller sent this `source_ref` before; `id` is that document"),
    ("text_too_large", 413, "`text` is over 1,000,000 bytes"),
    ("invalid_patient_ref", 422, "not 1-128 characters without control characters"),
    ("empty_text", 422, "`text` is empty"),
    ("invalid_source_ref", 422, "`source_ref` is over 256 characters or has control characters"),
    ("invalid_document_date", 422, "`document_date` is not a date as YYYY-MM-DD"),
    ("unknown_care_team", 404, "no care team has this name"),
    ("missing_lawful_basis", 422, "the upload names no `lawful_basis` and the account has no default basis"),
    ("invalid_lawful_basis", 422, "`lawful_basis` is not direct_care, research or legal_obligation"),
    ("missing_consent_ref", 422, "`lawful_basis` research needs the `consent_ref` it rests on"),
    (
        "invalid_consent_ref",
        422,
        "`consent_ref` is over 128 characters, has control characters, or comes without `lawful_basis` research",
    ),
    ("idempotency_key_reused", 409, "this `Idempotency-Key` came with another body"),
    ("invalid_idempotency_key", 422, "the key is not 1-255 visible ASCII characters"),
    ("batch_too_large", 413, "the announced `Content-Length` is over `BATCH_MAX_BYTES`"),
    ("body_unreadable", 422, "the body could not be read to its end"),
    // Reads.
    ("not_found", 404, "no such resource"),
    ("method_not_allowed", 405, "the path does not take this method (`Allow` lists those it takes)"),
    ("too_many_ids", 422, "more than 1000 ids"),
    ("invalid_limit", 422, "`limit` is not 1-1000"),
    ("invalid_cursor", 422, "`after` is not a `next_cursor`"),
    ("invalid_cui", 422, "a CUI is not 1-32 letters or digits"),
    ("invalid_date", 422, "`from` or `until` is not a date as YYYY-MM-DD"),
    // Administration and operations.
    ("user_exists", 409, "a user with this username exists"),
    ("invalid_username", 422, "not 1-64 characters of letters, digits and . _ @ -"),
    ("weak_password", 422, "under 12 characters"),
    ("own_account", 403, "an admin cannot disable or demote themselves, nor reset their own password"),
    ("service_account_role", 409, "service accounts hold the ingest role only"),
    ("no_change", 422, "neither `role` nor `disabled` given"),
    ("invalid_label", 422, "not up to 64 characters of letters, digits and ._@ -"),
    ("not_a_service_account", 409, "API keys are for service accounts only"),
    ("team_exists", 409, "a care team with this name exists"),
    ("invalid_team_name", 422, "not 1-64 characters of letters, digits and ._@ -"),
    ("invalid_member_role", 422, "care team members are clinicians, or ingest service accounts bound to the team"),
    ("invalid_selection", 422, "not one of the selections this operation takes"),
    ("case_required", 403, "a privacy officer's export names its `reason` and `case_ref`"),
];

/// The status of `code` and the line that describes it.
pub(crate) fn lookup(code: &str) -> Option<(u16, &'static str)> {
    CODES.iter().find(|(c, ..)| *c == code).map(|&(_, status, text)| (status, text))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::error::ApiError;

    #[test]
    fn each_code_is_catalogued_once() {
        let mut seen = BTreeSet::new();
        for (code, ..) in CODES {
            assert!(seen.insert(code), "{code} is catalogued twice");
        }
    }

    /// The catalogue says the status the error type answers with.
    #[test]
    fn statuses_are_those_the_api_answers_with() {
        let errors = [
            ApiError::Unauthenticated,
            ApiError::InvalidCredentials,
            ApiError::Forbidden,
            ApiError::OutOfScope,
            ApiError::NotFound,
            ApiError::MethodNotAllowed,
            ApiError::DuplicateSourceRef(uuid::Uuid::nil()),
            ApiError::Unavailable("the database"),
            ApiError::Busy,
            ApiError::Timeout,
            ApiError::LoginThrottled(1),
            ApiError::LoginBusy,
            ApiError::WrongPassword,
            ApiError::Unexpected(anyhow::anyhow!("failure")),
            ApiError::invalid("invalid_patient_ref", "message"),
            ApiError::body_stalled(),
        ];
        for error in errors {
            let (code, _) = error.code_and_message();
            let (status, _) = lookup(code).unwrap_or_else(|| panic!("{code} is not catalogued"));
            assert_eq!(status, error.status().as_u16(), "{code}");
        }
    }
}
