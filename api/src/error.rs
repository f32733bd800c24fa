//! The API's one error type. Every error is JSON `{"error": {"code",
//! "message"}}`; messages are written here, never copied from input, so they
//! cannot carry document text or patient references. 5xx causes are logged
//! (ids only) and the client gets a generic message.

use axum::Json;
use axum::extract::rejection::PathRejection;
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
    /// The path exists, not with this method (the `Allow` header lists those it has).
    #[error("this path does not take this method; the Allow header lists those it takes")]
    MethodNotAllowed,
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

    /// A request body that stopped arriving (`API_BODY_STALL_SECONDS`).
    pub(crate) fn body_stalled() -> Self {
        Self::BadRequest {
            status: StatusCode::REQUEST_TIMEOUT,
            code: "body_timeout",
            message: "the request body stopped arriving; send the request again".into(),
        }
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
            Self::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
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

/// axum's messages quote the offending value: only the parameter's name
/// (the route's own) is passed on.
impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        use axum::extract::path::ErrorKind;
        match rejection {
            PathRejection::FailedToDeserializePathParams(e) => {
                let message = match e.kind() {
                    ErrorKind::InvalidUtf8InPathParam { key } => format!("path parameter `{key}` is not valid UTF-8"),
                    ErrorKind::ParseErrorAtKey { key, .. } | ErrorKind::DeserializeError { key, .. } => {
                        format!("path parameter `{key}` is not valid: ids are UUIDs")
                    }
                    _ => "a path parameter is not valid: ids are UUIDs".to_owned(),
                };
                Self::BadRequest { status: StatusCode::BAD_REQUEST, code: "invalid_path", message }
            }
            other => Self::Unexpected(anyhow::anyhow!("path parameters: {}", other.body_text())),
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
