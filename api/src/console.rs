//! `/ui`: the web console (docs/console.md). One page and its script and
//! style sheet, compiled into the binary from `api/console/`: nothing is
//! loaded from elsewhere, so it works on a network without internet
//! access. The page holds no data: its script logs in through
//! `POST /v1/auth/session` (the token in an HttpOnly cookie, a CSRF token
//! beside it) and calls this api's own endpoints, under the same roles,
//! care-team scope and audit as any client. `API_CONSOLE=off` answers all
//! three with 404.

use std::sync::OnceLock;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;
use crate::state::AppState;

pub const CONSOLE_PATH: &str = "/ui";
const SCRIPT_PATH: &str = "/ui/console.js";
const STYLE_PATH: &str = "/ui/console.css";

/// What the answers are when `API_CONSOLE=off` (named in their `x-errors`).
const CONSOLE_OFF: &str = "not_found: the console is off (`API_CONSOLE=off`)";

const PAGE: &[u8] = include_bytes!("../console/index.html");
const SCRIPT: &[u8] = include_bytes!("../console/console.js");
const STYLE: &[u8] = include_bytes!("../console/console.css");

/// Scripts and styles from this origin only: no inline script or style, no
/// eval; requests to this api only; no form posts anywhere (the script
/// sends every request); no framing.
const PAGE_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
     connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// Lets a request through unless `API_CONSOLE=off`.
pub(crate) struct ConsoleOn;

impl FromRequestParts<AppState> for ConsoleOn {
    type Rejection = ApiError;

    async fn from_request_parts(_: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        if state.edge.console { Ok(Self) } else { Err(ApiError::NotFound) }
    }
}

/// The console's page. It holds no PHI; what the script later shows does,
/// and every API answer it reads is `no-store`.
#[utoipa::path(
    get,
    path = CONSOLE_PATH,
    tag = "console",
    responses((status = 200, description = "An HTML page", content_type = "text/html", body = String)),
    extensions(("x-errors" = json!([CONSOLE_OFF]))),
)]
#[tracing::instrument(skip_all)]
pub(crate) async fn page(_: ConsoleOn) -> Response {
    let policy = (header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(PAGE_POLICY));
    let content_type = (header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    ([policy, content_type], PAGE).into_response()
}

/// The console's script.
#[utoipa::path(
    get,
    path = SCRIPT_PATH,
    tag = "console",
    responses(
        (status = 200, description = "JavaScript", content_type = "text/javascript", body = String),
        (status = 304, description = "Not modified since the copy whose `ETag` was sent in `If-None-Match`"),
    ),
    extensions(("x-errors" = json!([CONSOLE_OFF]))),
)]
#[tracing::instrument(skip_all)]
pub(crate) async fn script(_: ConsoleOn, headers: HeaderMap) -> Response {
    static ETAG: OnceLock<HeaderValue> = OnceLock::new();
    asset(&headers, ETAG.get_or_init(|| etag(SCRIPT)), "text/javascript; charset=utf-8", SCRIPT)
}

/// The console's style sheet.
#[utoipa::path(
    get,
    path = STYLE_PATH,
    tag = "console",
    responses(
        (status = 200, description = "CSS", content_type = "text/css", body = String),
        (status = 304, description = "Not modified since the copy whose `ETag` was sent in `If-None-Match`"),
    ),
    extensions(("x-errors" = json!([CONSOLE_OFF]))),
)]
#[tracing::instrument(skip_all)]
pub(crate) async fn style(_: ConsoleOn, headers: HeaderMap) -> Response {
    static ETAG: OnceLock<HeaderValue> = OnceLock::new();
    asset(&headers, ETAG.get_or_init(|| etag(STYLE)), "text/css; charset=utf-8", STYLE)
}

/// A file of the binary, revalidated on each visit (a 304 while the binary
/// is the same), so a new version is never held back by a cache.
fn asset(headers: &HeaderMap, etag: &HeaderValue, content_type: &'static str, body: &'static [u8]) -> Response {
    let cache = (header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if headers.get(header::IF_NONE_MATCH).is_some_and(|v| v == etag) {
        return (StatusCode::NOT_MODIFIED, [(header::ETAG, etag.clone()), cache]).into_response();
    }
    let content_type = (header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    ([content_type, (header::ETAG, etag.clone()), cache], body).into_response()
}

/// The strong `ETag` of a file: its SHA-256, hex.
fn etag(body: &[u8]) -> HeaderValue {
    use sha2::{Digest, Sha256};
    let hex: String = Sha256::digest(body).iter().map(|b| format!("{b:02x}")).collect();
    HeaderValue::try_from(format!("\"{hex}\"")).unwrap_or_else(|_| unreachable!("hex in quotes is a header value"))
}
