//! The API's one error type. Every error is JSON `{"error": {"code",
//! "message"}}`; messages are written here, never copied from input, so they
//! cannot carry document text or patient references. 5xx causes are logged
//! (ids only) and the client gets a generic message.

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use clinflow::wire::{ErrorBody, ErrorDetail};
use uuid::Uuid;

/// What a throttled or briefly unavailable client is told to wait.
const RETRY_AFTER_SECONDS: &str = "2";

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{message}")]
    BadRequest { status: StatusCode, code: &'static str, message: String },
    #[error("authentication required")]
    Unauthenticated,
    #[error("invalid username or password")]
    InvalidCredentials,
    #[error("your role may not do this")]
    Forbidden,
    /// A request authenticated by the console's session cookie without its
    /// CSRF token in the `X-CSRF-Token` header.
    #[error("a request with the console's session cookie carries its CSRF token in the X-CSRF-Token header")]
    CsrfToken,
    /// A clinician asking for a patient outside their care teams.
    #[error("this patient is outside your care teams; POST /v1/break-glass if you must")]
    OutOfScope,
    #[error("not found")]
    NotFound,
    #[error("a document with this source_ref exists")]
    DuplicateSourceRef(Uuid),
    #[error("{0} is unavailable; try again")]
    Unavailable(&'static str),
    #[error("the pipeline is busy; retry after the time in Retry-After")]
    Busy,
    /// The request took longer than its limit (`API_REQUEST_TIMEOUT_SECONDS`,
    /// for a batch `API_BATCH_TIMEOUT_SECONDS`), its body included.
    #[error("the request took longer than this api allows; try again")]
    Timeout,
    /// Too many login attempts from this address: retry after this many seconds.
    #[error("too many login attempts from this address; retry after the time in Retry-After")]
    LoginThrottled(u64),
    /// Password checks are queued past their bound: shed, not queued.
    #[error("logins are busy; retry after the time in Retry-After")]
    LoginBusy,
    /// A break-glass request or admin change that needs the caller's password.
    #[error("the password given is not yours")]
    WrongPassword,
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

impl ApiError {
    /// The code and the client-facing message (what the JSON body carries).
    pub fn code_and_message(&self) -> (&'static str, String) {
        let message = match self {
            Self::Unexpected(_) => "internal error; the request id in the x-request-id header identifies it".to_owned(),
            other => other.to_string(),
        };
        (self.status_and_code().1, message)
    }

    /// The status this error answers with.
    pub fn status(&self) -> StatusCode {
        self.status_and_code().0
    }

    pub fn invalid(code: &'static str, message: impl Into<String>) -> Self {
        Self::BadRequest { status: StatusCode::UNPROCESSABLE_ENTITY, code, message: message.into() }
    }

    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            Self::BadRequest { status, code, .. } => (*status, code),
            Self::Unauthenticated => (StatusCode::UNAUTHORIZED, "unauthenticated"),
            Self::InvalidCredentials => (StatusCode::UNAUTHORIZED, "invalid_credentials"),
            Self::Forbidden => (StatusCode::FORBIDDEN, "forbidden"),
            Self::CsrfToken => (StatusCode::FORBIDDEN, "csrf_token"),
            Self::OutOfScope => (StatusCode::FORBIDDEN, "out_of_scope"),
            Self::NotFound => (StatusCode::NOT_FOUND, "not_found"),
            Self::DuplicateSourceRef(_) => (StatusCode::CONFLICT, "duplicate_source_ref"),
            Self::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            Self::Busy => (StatusCode::TOO_MANY_REQUESTS, "busy"),
            // 503, not 408: most often the api or its database is slow, and
            // a 5xx is what alerts on the api's error rate count.
            Self::Timeout => (StatusCode::SERVICE_UNAVAILABLE, "timeout"),
            Self::LoginThrottled(_) => (StatusCode::TOO_MANY_REQUESTS, "too_many_logins"),
            Self::LoginBusy => (StatusCode::SERVICE_UNAVAILABLE, "login_busy"),
            Self::WrongPassword => (StatusCode::FORBIDDEN, "wrong_password"),
            Self::Unexpected(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            // The database is away (restarting, unreachable): try again soon.
            sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed => {
                tracing::warn!(error = %e, "database unavailable");
                Self::Unavailable("the database")
            }
            // Shutting down or restarting (57P01-57P03), or the connection
            // broke (08xxx): the same, seen from inside a query.
            sqlx::Error::Database(ref db) if db.code().is_some_and(|c| c.starts_with("57P") || c.starts_with("08")) => {
                tracing::warn!(error = %e, "database unavailable");
                Self::Unavailable("the database")
            }
            e => Self::Unexpected(anyhow::Error::new(e).context("database")),
        }
    }
}

/// A database failure while fetching or creating a data key is a database
/// failure (503 while it is away); a key that cannot be had is a 500 whose
/// cause (ids only) is logged.
impl From<clinflow::keys::KeyError> for ApiError {
    fn from(e: clinflow::keys::KeyError) -> Self {
        match e {
            clinflow::keys::KeyError::Database(e) => e.into(),
            clinflow::keys::KeyError::Crypto(e) => anyhow::Error::new(e).into(),
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        let status = rejection.status();
        let (code, message) = match &rejection {
            JsonRejection::MissingJsonContentType(_) => {
                ("unsupported_media_type", "send the body as JSON with Content-Type: application/json".to_owned())
            }
            JsonRejection::JsonSyntaxError(_) => ("invalid_json", "the body is not valid JSON".to_owned()),
            JsonRejection::JsonDataError(e) => ("invalid_body", describe_data_error(&e.body_text())),
            _ if status == StatusCode::PAYLOAD_TOO_LARGE => ("payload_too_large", "the body is too large".to_owned()),
            _ => ("invalid_body", "the body could not be read".to_owned()),
        };
        Self::BadRequest { status, code, message }
    }
}

/// axum's messages quote the offending value: neither is passed on.
impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        match rejection {
            PathRejection::FailedToDeserializePathParams(_) => Self::BadRequest {
                status: StatusCode::BAD_REQUEST,
                code: "invalid_path",
                message: "a path parameter is not valid: ids are UUIDs".into(),
            },
            other => Self::Unexpected(anyhow::anyhow!("path parameters: {}", other.body_text())),
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(_: QueryRejection) -> Self {
        Self::BadRequest {
            status: StatusCode::BAD_REQUEST,
            code: "invalid_query",
            message: "the query string is not what this endpoint expects: a parameter is unknown or of the wrong type"
                .into(),
        }
    }
}

/// serde's messages for a wrong type quote the offending value, which may be
/// PHI; only the missing/unknown-field messages (which quote field names)
/// are passed on.
fn describe_data_error(text: &str) -> String {
    let detail = text.split_once(": ").map_or(text, |(_, d)| d);
    let detail = detail.split(" at line ").next().unwrap_or(detail);
    if detail.starts_with("missing field") || detail.starts_with("unknown field") {
        format!("the JSON body is not what this endpoint expects: {detail}")
    } else {
        "the JSON body is not what this endpoint expects: a field has the wrong type".to_owned()
    }
}

/// A JSON document that is not an upload: the code and a message that
/// never quotes the input.
pub fn describe_json_error(e: &serde_json::Error) -> (&'static str, String) {
    use serde_json::error::Category;
    match e.classify() {
        Category::Syntax | Category::Eof | Category::Io => ("invalid_json", "the line is not valid JSON".to_owned()),
        Category::Data => {
            let text = e.to_string();
            let detail = text.split(" at line ").next().unwrap_or(&text);
            let message = if detail.starts_with("missing field") || detail.starts_with("unknown field") {
                format!("the line is not an upload: {detail}")
            } else {
                "the line is not an upload: a field has the wrong type".to_owned()
            };
            ("invalid_body", message)
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status_and_code().0;
        if let Self::Unexpected(e) = &self {
            tracing::error!(error = format!("{e:#}"), "request failed");
        }
        let (code, message) = self.code_and_message();
        let retry_after = match &self {
            Self::LoginThrottled(seconds) => Some(axum::http::HeaderValue::from(*seconds)),
            _ if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE => {
                Some(axum::http::HeaderValue::from_static(RETRY_AFTER_SECONDS))
            }
            _ => None,
        };
        let id = if let Self::DuplicateSourceRef(id) = self { Some(id) } else { None };
        let body = ErrorBody { error: ErrorDetail { code: code.into(), message }, id };
        let mut response = (status, Json(body)).into_response();
        if let Some(seconds) = retry_after {
            response.headers_mut().insert(axum::http::header::RETRY_AFTER, seconds);
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrong_type_errors_do_not_echo_values() {
        let m = describe_data_error(
            "Failed to deserialize the JSON body into the target type: patient_ref: invalid type: integer `1234567`, expected a string at line 1 column 25",
        );
        assert!(!m.contains("1234567"), "{m}");
        let m = describe_data_error(
            "Failed to deserialize the JSON body into the target type: missing field `text` at line 1 column 25",
        );
        assert_eq!(m, "the JSON body is not what this endpoint expects: missing field `text`");
        let e = serde_json::from_str::<std::collections::HashMap<String, String>>(r#"{"a": 1234567}"#).unwrap_err();
        let (code, m) = describe_json_error(&e);
        assert_eq!(code, "invalid_body");
        assert!(!m.contains("1234567"), "{m}");
    }
}
