//! How an API answer is classified: success, a per-record rejection, a
//! transient failure worth retrying, or a failure that must stop the run.

use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{HeaderMap, RETRY_AFTER};

use super::wire::ErrorBody;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("cannot set up the HTTP client: {0}")]
    Setup(#[source] reqwest::Error),
    /// Connection refused or reset, timeout, broken body: transient. The
    /// message already holds the causes (reqwest's own hides them), so the
    /// error is not also exposed as a `source`, which would print them twice.
    #[error("cannot reach the API: {}", chain(.0))]
    Transport(reqwest::Error),
    /// 408, 429 and 5xx: transient.
    #[error("the API is busy or unavailable (HTTP {status}{})", code.as_deref().map(|c| format!(": {c}")).unwrap_or_default())]
    Unavailable { status: u16, code: Option<String>, retry_after: Option<Duration> },
    /// A 4xx about this one request (400, 413, 422, ...).
    #[error("HTTP {status}: {code}: {message}")]
    Rejected { status: u16, code: String, message: String },
    /// 404 or 405: a missing document, or a wrong --api-url.
    #[error("not found (HTTP {status}): {code}: {message}")]
    NotFound { status: u16, code: String, message: String },
    #[error("login failed: wrong username or password")]
    BadCredentials,
    #[error("the API refused the token again right after a new login (HTTP 401)")]
    Unauthorized,
    #[error("forbidden (HTTP 403): {code}: {message}")]
    Forbidden { code: String, message: String },
    #[error("unexpected answer from the API (HTTP {status}): {detail}")]
    Protocol { status: u16, detail: String },
}

impl ApiError {
    /// Worth retrying with backoff: the same request may succeed later.
    pub fn is_transient(&self) -> bool {
        match self {
            ApiError::Transport(e) => !e.is_builder(),
            ApiError::Unavailable { .. } => true,
            _ => false,
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ApiError::Unavailable { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// Longest error message kept from an API answer (they end up in the rejects
/// file and in logs).
const MAX_MESSAGE_CHARS: usize = 300;

/// Maps a non-success answer to an error. 401 is handled before this by the
/// caller (one new login, one retry); reaching here with 401 means the new
/// token was refused too.
pub(crate) fn classify(status: StatusCode, headers: &HeaderMap, body: &[u8]) -> ApiError {
    let (code, message) = error_fields(status, body);
    match status.as_u16() {
        401 => ApiError::Unauthorized,
        403 => ApiError::Forbidden { code, message },
        404 | 405 => ApiError::NotFound { status: status.as_u16(), code, message },
        408 | 429 | 500..=599 => ApiError::Unavailable {
            status: status.as_u16(),
            code: ErrorBody::parse(body).map(|b| b.error.code),
            retry_after: retry_after(headers),
        },
        400..=499 => ApiError::Rejected { status: status.as_u16(), code, message },
        _ => ApiError::Protocol { status: status.as_u16(), detail: "unexpected status".into() },
    }
}

/// `{"error":{"code","message"}}`, or a stand-in when the body is not that
/// (a proxy's HTML page, an empty body).
fn error_fields(status: StatusCode, body: &[u8]) -> (String, String) {
    match ErrorBody::parse(body) {
        Some(body) => (body.error.code, clean_message(&body.error.message)),
        None => (format!("http_{}", status.as_u16()), status.canonical_reason().unwrap_or("").to_lowercase()),
    }
}

fn clean_message(message: &str) -> String {
    message.chars().map(|c| if c.is_control() { ' ' } else { c }).take(MAX_MESSAGE_CHARS).collect()
}

/// Only the delay-seconds form; an HTTP date falls back to our own backoff.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?;
    value.trim().parse().ok().map(Duration::from_secs)
}

/// Describes a JSON decoding error without quoting the body: serde's messages
/// can contain values from it.
pub(crate) fn describe_json_error(e: &serde_json::Error) -> String {
    use serde_json::error::Category;
    let what = match e.classify() {
        Category::Syntax | Category::Io => "body is not valid JSON",
        Category::Eof => "body ends too early",
        Category::Data => "body does not have the expected fields",
    };
    format!("{what} (line {}, column {})", e.line(), e.column())
}

/// An error and its causes on one line (reqwest's top-level message alone
/// hides whether the connection was refused or timed out).
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn classify_body(status: u16, body: &str) -> ApiError {
        let status = StatusCode::from_u16(status).unwrap();
        classify(status, &HeaderMap::new(), body.as_bytes())
    }

    const BODY: &str = r#"{"error":{"code":"text_too_large","message":"text exceeds 1 MiB"}}"#;

    #[test]
    fn client_errors_are_rejections_with_code_and_message() {
        for status in [400, 413, 422] {
            let err = classify_body(status, BODY);
            assert!(!err.is_transient());
            assert_eq!(err.to_string(), format!("HTTP {status}: text_too_large: text exceeds 1 MiB"));
        }
    }

    #[test]
    fn busy_and_server_errors_are_transient() {
        for status in [408, 429, 500, 502, 503, 504] {
            assert!(classify_body(status, "").is_transient(), "{status}");
        }
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from_static("3"));
        let err = classify(StatusCode::SERVICE_UNAVAILABLE, &headers, BODY.as_bytes());
        assert_eq!(err.retry_after(), Some(Duration::from_secs(3)));
        assert_eq!(err.to_string(), "the API is busy or unavailable (HTTP 503: text_too_large)");
    }

    #[test]
    fn auth_and_routing_errors_are_not_rejections() {
        assert!(matches!(classify_body(401, BODY), ApiError::Unauthorized));
        assert!(matches!(classify_body(403, BODY), ApiError::Forbidden { .. }));
        assert!(matches!(classify_body(404, ""), ApiError::NotFound { .. }));
        assert!(matches!(classify_body(405, ""), ApiError::NotFound { .. }));
    }

    #[test]
    fn a_body_that_is_not_the_error_shape_gets_a_stand_in_code() {
        let err = classify_body(422, "<html>bad</html>");
        assert_eq!(err.to_string(), "HTTP 422: http_422: unprocessable entity");
    }

    #[test]
    fn messages_are_cut_and_control_characters_removed() {
        let long = format!(r#"{{"error":{{"code":"c","message":"a\nb{}"}}}}"#, "x".repeat(1000));
        let ApiError::Rejected { message, .. } = classify_body(400, &long) else {
            panic!("expected a rejection");
        };
        assert!(message.starts_with("a b"));
        assert_eq!(message.chars().count(), MAX_MESSAGE_CHARS);
    }

    #[test]
    fn json_errors_are_described_without_quoting_the_body() {
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct Count {
            count: u32,
        }
        let err = serde_json::from_str::<Count>(r#"{"count":"PAT-SECRET"}"#).unwrap_err();
        assert!(err.to_string().contains("PAT-SECRET"), "serde quotes values");
        let described = describe_json_error(&err);
        assert!(!described.contains("SECRET"), "{described}");
    }
}
