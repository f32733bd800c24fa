//! The extractors handlers use, whose refusals are the api's JSON errors.
//! A refusal names the offending field or parameter (when its name is a
//! plain field name) and never quotes a value. Every string a body, query
//! or batch line carries is refused if it holds a NUL character:
//! PostgreSQL's `text` cannot store one, and a NUL that reached a query
//! was a 500.

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, FailedToBufferBody, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use serde::de::DeserializeOwned;
use serde_path_to_error::Segment;

use crate::error::ApiError;

/// The body as JSON `T`, sent as `application/json` (or a `+json` type).
/// Refusals: `unsupported_media_type` (415), `payload_too_large` (413),
/// `body_timeout` (408), `invalid_json` (400), `invalid_body` (422).
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        if !is_json(req.headers()) {
            return Err(ApiError::BadRequest {
                status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
                code: "unsupported_media_type",
                message: "send the body as JSON with Content-Type: application/json".into(),
            });
        }
        let bytes = Bytes::from_request(req, state).await.map_err(unread_body)?;
        json(&bytes).map(Self).map_err(|fault| fault.into_error("the JSON body"))
    }
}

fn is_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) else { return false };
    let essence = value.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// Why a body could not be had: too large, stalled (`connections`), or cut off.
fn unread_body(rejection: BytesRejection) -> ApiError {
    match rejection {
        BytesRejection::FailedToBufferBody(FailedToBufferBody::LengthLimitError(_)) => ApiError::BadRequest {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            code: "payload_too_large",
            message: "the body is too large".into(),
        },
        e if crate::connections::stalled(&e) => ApiError::body_stalled(),
        _ => ApiError::BadRequest {
            status: StatusCode::BAD_REQUEST,
            code: "invalid_body",
            message: "the body could not be read".into(),
        },
    }
}

/// Why JSON bytes are not a `T`: its syntax, or its content. The caller
/// says what the bytes were (a body, a batch line).
#[derive(Debug)]
pub(crate) struct JsonFault {
    syntax: bool,
    detail: String,
}

impl JsonFault {
    /// `invalid_json` (400) or `invalid_body` (422), for `what` ("the JSON body").
    pub(crate) fn into_error(self, what: &str) -> ApiError {
        let (code, message) = self.code_and_message(what);
        let status = if self.syntax { StatusCode::BAD_REQUEST } else { StatusCode::UNPROCESSABLE_ENTITY };
        ApiError::BadRequest { status, code, message }
    }

    pub(crate) fn code_and_message(&self, what: &str) -> (&'static str, String) {
        if self.syntax {
            ("invalid_json", format!("{what} is not valid JSON: {}", self.detail))
        } else {
            ("invalid_body", format!("{what} is not what this endpoint expects: {}", self.detail))
        }
    }
}

/// JSON bytes (a body, a batch line) as a `T`, or the fault, naming the
/// field where it lies.
pub(crate) fn json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, JsonFault> {
    if let Some(field) = nul_in(bytes) {
        return Err(JsonFault { syntax: false, detail: format!("{field} holds a NUL character (\\u0000)") });
    }
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
        let inner = e.inner();
        match inner.classify() {
            serde_json::error::Category::Data => {
                JsonFault { syntax: false, detail: data_fault(e.path(), "field", &inner.to_string()) }
            }
            _ => JsonFault { syntax: true, detail: syntax_fault(field_name(e.path().iter(), "field"), inner) },
        }
    })?;
    deserializer.end().map_err(|e| JsonFault { syntax: true, detail: syntax_fault(None, &e) })?;
    Ok(value)
}

/// serde_json's syntax messages are its own fixed words (`invalid unicode
/// code point`, `recursion limit exceeded`) with a position: none quotes
/// the input.
fn syntax_fault(field: Option<String>, e: &serde_json::Error) -> String {
    let text = e.to_string();
    let what = text.split(" at line ").next().unwrap_or(&text);
    let place = format!("line {} column {}", e.line(), e.column());
    match field {
        Some(field) => format!("{what} ({field}, {place})"),
        None => format!("{what} ({place})"),
    }
}

/// serde's data messages, reworded to name the field (`kind`: a field, a
/// parameter) and what it must be, never the value sent (`invalid type:
/// string "PAT-1", expected ...`).
fn data_fault(path: &serde_path_to_error::Path, kind: &str, message: &str) -> String {
    let message = message.split(" at line ").next().unwrap_or(message);
    let segments: Vec<&Segment> = path.iter().collect();
    let field = field_name(segments.iter().copied(), kind);
    let in_field = |fault: &str| match &field {
        Some(field) => format!("{field} {fault}"),
        None => format!("the value {fault}"),
    };
    // `unknown field `x`, expected ...`: `x` is the client's, shown only
    // when it is a plain field name (a misspelling, not a patient's name).
    if let Some((name, expected)) = quoted_with_expectation(message, "unknown field `") {
        let name = if plain(name) { format!("unknown {kind} `{name}`") } else { format!("an unknown {kind}") };
        // The path ends at the unknown name itself.
        let parent = field_name(segments.iter().take(segments.len().saturating_sub(1)).copied(), "field");
        let place = parent.map(|f| format!(" in {f}")).unwrap_or_default();
        return format!("{name}{place}, {expected}");
    }
    if let Some((_, expected)) = quoted_with_expectation(message, "unknown variant `") {
        return in_field(&format!("has a value this endpoint does not know: {expected}"));
    }
    // Field names from the type itself: safe to quote.
    if message.starts_with("missing field `") || message.starts_with("duplicate field `") {
        return match field {
            Some(field) => format!("{message} in {field}"),
            None => message.to_owned(),
        };
    }
    // serde's own faults end with what the type expects (its words, last:
    // the value sent comes before); a type's custom message may quote the
    // value anywhere, so it is not passed on.
    let fault = [
        ("invalid type: ", "has the wrong type"),
        ("invalid value: ", "is not valid"),
        ("invalid length ", "has the wrong length"),
    ]
    .into_iter()
    .find(|(prefix, _)| message.starts_with(prefix));
    match fault.and_then(|(_, fault)| Some((fault, message.rsplit_once(", expected ")?.1))) {
        Some((fault, expected)) => {
            let expected = if expected.starts_with("struct ") { "a JSON object" } else { expected };
            in_field(&format!("{fault}: expected {expected}"))
        }
        None => in_field("is not valid"),
    }
}

/// From `<prefix>name`, expected ...`: the name (the client's) and the
/// expectation (the type's). The name may itself hold a backtick; the
/// expectation, a list of field names, holds no `` `, expected ``.
fn quoted_with_expectation<'a>(message: &'a str, prefix: &str) -> Option<(&'a str, &'a str)> {
    let rest = message.strip_prefix(prefix)?;
    for separator in ["`, expected ", "`, there are no "] {
        if let Some(at) = rest.rfind(separator) {
            let expectation = &rest[at + 3..];
            return Some((&rest[..at], expectation));
        }
    }
    None
}

/// A name this api may quote back: a plain field name, never free text.
fn plain(name: &str) -> bool {
    (1..=40).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// `field `ids[2]`` (`kind`: field or parameter), from the path serde
/// took to the fault; a map key that is not a plain name shows as `*`.
/// None at the top.
fn field_name<'a>(path: impl Iterator<Item = &'a Segment>, kind: &str) -> Option<String> {
    let mut name = String::new();
    for segment in path {
        match segment {
            Segment::Seq { index } => name.push_str(&format!("[{index}]")),
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if !name.is_empty() {
                    name.push('.');
                }
                name.push_str(if plain(key) { key } else { "*" });
            }
            Segment::Unknown => {}
        }
    }
    (!name.is_empty()).then(|| format!("{kind} `{name}`"))
}

/// The field of the first string (or key) holding a NUL, if any. A NUL
/// can only reach a JSON string as the escape `\u0000` (a raw one is a
/// syntax error): bytes without it are not parsed twice.
fn nul_in(bytes: &[u8]) -> Option<String> {
    if !bytes.split(|b| *b == b'\\').skip(1).any(|after| after.starts_with(b"u0000")) {
        return None;
    }
    // Not JSON: the typed parse answers with the syntax fault.
    let value: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    let mut path = Vec::new();
    find_nul(&value, &mut path).then(|| {
        let mut name = String::new();
        for step in &path {
            match step {
                Step::Index(i) => name.push_str(&format!("[{i}]")),
                Step::Key(key) => {
                    if !name.is_empty() {
                        name.push('.');
                    }
                    name.push_str(if plain(key) { key } else { "*" });
                }
            }
        }
        if name.is_empty() { "the value".to_owned() } else { format!("field `{name}`") }
    })
}

enum Step {
    Index(usize),
    Key(String),
}

fn find_nul(value: &serde_json::Value, path: &mut Vec<Step>) -> bool {
    match value {
        serde_json::Value::String(s) => s.contains('\0'),
        serde_json::Value::Array(items) => items.iter().enumerate().any(|(i, item)| {
            path.push(Step::Index(i));
            let found = find_nul(item, path);
            if !found {
                path.pop();
            }
            found
        }),
        serde_json::Value::Object(map) => map.iter().any(|(key, item)| {
            path.push(Step::Key(if key.contains('\0') { String::new() } else { key.clone() }));
            let found = key.contains('\0') || find_nul(item, path);
            if !found {
                path.pop();
            }
            found
        }),
        _ => false,
    }
}

/// `axum::extract::Path` whose refusal (an id that is no UUID) is the JSON
/// error `invalid_path`, naming the parameter, not axum's plain text that
/// quotes the value.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct PathParams<T>(pub T);

/// The query string as `T`, or the JSON error `invalid_query` (400) naming
/// the parameter: unknown, of the wrong type, not UTF-8 once decoded, or
/// holding a NUL.
pub struct QueryParams<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for QueryParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let invalid = |detail: String| ApiError::BadRequest {
            status: StatusCode::BAD_REQUEST,
            code: "invalid_query",
            message: format!("the query string is not what this endpoint expects: {detail}"),
        };
        if let Some(fault) = parts.uri.query().and_then(query_fault) {
            return Err(invalid(fault));
        }
        axum::extract::Query::try_from_uri(&parts.uri).map(|q| Self(q.0)).map_err(|e| invalid(query_data_fault(&e)))
    }
}

/// A parameter whose name or value is not UTF-8 once percent-decoded, or
/// holds a NUL (serde_urlencoded would pass the one on with replacement
/// characters, the other as it is).
fn query_fault(query: &str) -> Option<String> {
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let Ok(key) = String::from_utf8(percent_decoded(key)) else {
            return Some("a parameter's name is not valid UTF-8".to_owned());
        };
        let name = if plain(&key) { format!("parameter `{key}`") } else { "a parameter".to_owned() };
        if key.contains('\0') {
            return Some("a parameter's name holds a NUL character".to_owned());
        }
        match String::from_utf8(percent_decoded(value)) {
            Err(_) => return Some(format!("{name} is not valid UTF-8")),
            Ok(value) if value.contains('\0') => return Some(format!("{name} holds a NUL character")),
            Ok(_) => {}
        }
    }
    None
}

/// `application/x-www-form-urlencoded` decoding: `+` is a space, `%XX` a byte.
fn percent_decoded(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(high), Some(low)) => {
                    out.push((high * 16 + low) as u8);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    out
}

/// The parameter a query refusal is about, and why.
fn query_data_fault(rejection: &QueryRejection) -> String {
    use std::error::Error as _;
    type UrlError = serde_path_to_error::Error<serde_urlencoded::de::Error>;
    let mut source = rejection.source();
    while let Some(e) = source {
        if let Some(e) = e.downcast_ref::<UrlError>() {
            return data_fault(e.path(), "parameter", &e.inner().to_string());
        }
        source = e.source();
    }
    "a parameter is unknown or of the wrong type".to_owned()
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Upload {
        patient_ref: String,
        text: String,
        ids: Option<Vec<uuid::Uuid>>,
        limit: Option<i64>,
    }

    fn fault(body: &str) -> (&'static str, String) {
        json::<Upload>(body.as_bytes()).unwrap_err().code_and_message("the JSON body")
    }

    #[test]
    fn refusals_name_the_field_and_never_echo_the_value() {
        let cases = [
            (
                r#"{"patient_ref": 1234567, "text": "x"}"#,
                "invalid_body",
                "field `patient_ref` has the wrong type: expected a string",
            ),
            (
                r#"{"patient_ref": "P", "text": "x", "patient_rfe": "PAT-1234567"}"#,
                "invalid_body",
                "unknown field `patient_rfe`, expected one of",
            ),
            (
                r#"{"patient_ref": "P", "text": "x", "PAT-1234567": 1}"#,
                "invalid_body",
                "an unknown field, expected one of",
            ),
            (r#"{"text": "x"}"#, "invalid_body", "missing field `patient_ref`"),
            (r#"{"patient_ref": "P", "text": "x", "ids": ["1234567"]}"#, "invalid_body", "field `ids[0]` is not valid"),
            (
                r#"{"patient_ref": "P", "text": "x", "limit": "1234567"}"#,
                "invalid_body",
                "field `limit` has the wrong type: expected i64",
            ),
            (
                r#"{"patient_ref": "PAT-1234567\u0000", "text": "x"}"#,
                "invalid_body",
                "field `patient_ref` holds a NUL character",
            ),
            (
                r#"{"patient_ref": "P", "text": "x", "ids": ["\u0000"]}"#,
                "invalid_body",
                "field `ids[0]` holds a NUL character",
            ),
            (r#"{"patient_ref": "PAT-1234567\ud800", "text": "x"}"#, "invalid_json", "(field `patient_ref`, line 1"),
            (r#"{"patient_ref": "PAT-1234567", "text": "x"} 1234567"#, "invalid_json", "trailing characters"),
            (r#"1234567"#, "invalid_body", "the value has the wrong type: expected a JSON object"),
            (r#"[1234567]"#, "invalid_body", "field `[0]` has the wrong type: expected a string"),
        ];
        for (body, code, expected) in cases {
            let (got_code, message) = fault(body);
            assert_eq!(got_code, code, "{body}: {message}");
            assert!(message.contains(expected), "{body}: {message}");
            assert!(!message.contains("1234567"), "{body}: {message}");
        }
        // Invalid UTF-8 inside a string.
        let (code, message) = json::<Upload>(b"{\"patient_ref\": \"PAT-1234567\xff\", \"text\": \"x\"}")
            .unwrap_err()
            .code_and_message("the JSON body");
        assert_eq!(code, "invalid_json");
        assert!(message.contains("field `patient_ref`") && !message.contains("1234567"), "{message}");
        // An escaped backslash before u0000 is text, not a NUL.
        let ok = json::<Upload>(br#"{"patient_ref": "P\\u0000", "text": "x"}"#).unwrap();
        assert_eq!(ok.patient_ref, "P\\u0000");
        // Deep nesting stops at serde_json's recursion limit, not the stack.
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let (code, message) = json::<serde_json::Value>(deep.as_bytes()).unwrap_err().code_and_message("b");
        assert_eq!(code, "invalid_json", "{message}");
        assert!(message.contains("recursion limit exceeded"), "{message}");
        let (code, message) = json::<Upload>(deep.as_bytes()).unwrap_err().code_and_message("b");
        assert_eq!(code, "invalid_body", "{message}");
    }

    #[test]
    fn query_refusals_name_the_parameter() {
        assert_eq!(query_fault("actor=PAT%00-1234567"), Some("parameter `actor` holds a NUL character".into()));
        assert_eq!(query_fault("actor=PAT%FF1234567"), Some("parameter `actor` is not valid UTF-8".into()));
        assert_eq!(query_fault("PAT-1234567=%00"), Some("a parameter holds a NUL character".into()));
        assert_eq!(query_fault("actor=%C3%A9&limit=10"), None);
        assert_eq!(percent_decoded("a+b%41%4"), b"a bA%4");
        assert_eq!(percent_decoded("%"), b"%");
        assert_eq!(percent_decoded("%4"), b"%4");
    }
}
