//! `GET /openapi.json` and `/docs`: this api's description, as the route
//! table declares it (`openapi::spec`, handed to these handlers by the
//! server as an extension), and an interactive page over it (Scalar).
//!
//! The page loads nothing from outside: Scalar's script is compiled into
//! the binary (`api/vendor/scalar/`, pinned, with its sha256) and served at
//! [`SCALAR_PATH`], the description is inside the page, and the page's
//! Content-Security-Policy allows scripts from this origin only (no inline
//! script, no eval), so it works on a network without internet access.
//! `API_DOCS=off` answers both with 404.

use std::sync::OnceLock;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::{Extension, Json};
use utoipa::openapi::OpenApi;

use crate::error::ApiError;
use crate::state::AppState;

pub const SPEC_PATH: &str = "/openapi.json";
pub const DOCS_PATH: &str = "/docs";
pub const SCALAR_PATH: &str = "/docs/scalar.js";

/// What the page and its script answer when `API_DOCS=off` (named in their `x-errors`).
const DOCS_OFF: &str = "not_found: the page is off (`API_DOCS=off`)";

/// `@scalar/api-reference` 1.76.4, `dist/browser/standalone.js`, unchanged
/// (api/vendor/scalar/README.md says where from).
const SCALAR_JS: &[u8] = include_bytes!("../vendor/scalar/standalone.js");
/// Its sha256, hex (as its ETag) and base64 (the page's `integrity`); a
/// test holds both to the file.
const SCALAR_ETAG: &str = "\"93951f1794b0463b87ab58d0557a6610075af79a9f94c2a3f261c993bc7f3913\"";
const SCALAR_INTEGRITY: &str = "sha256-k5UfF5SwRjuHq1jQVXpmEAda95qflMKj8mHJk7x/ORM=";

/// What the page needs and no more: scripts from here only (no inline
/// script, no eval); inline styles, which Scalar injects; images and fonts
/// from here or inline; requests ("Try it") to this api only; no framing.
const PAGE_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
     img-src 'self' data:; font-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

/// This description, as OpenAPI 3.1 JSON.
#[utoipa::path(
    get,
    path = SPEC_PATH,
    tag = "docs",
    responses((status = 200, description = "The OpenAPI 3.1 document of this api", body = Object)),
)]
#[tracing::instrument(skip_all)]
pub(crate) async fn openapi_json(Extension(spec): Extension<&'static OpenApi>) -> Json<&'static OpenApi> {
    Json(spec)
}

/// Lets a request through to the page or its script unless `API_DOCS=off`;
/// then both answer [`DOCS_OFF`].
pub(crate) struct PageOn;

impl FromRequestParts<AppState> for PageOn {
    type Rejection = ApiError;

    async fn from_request_parts(_: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        if state.edge.docs { Ok(Self) } else { Err(ApiError::NotFound) }
    }
}

/// An interactive page over this description (Scalar), which loads its
/// script from this api ([`SCALAR_PATH`]) and nothing from elsewhere.
#[utoipa::path(
    get,
    path = DOCS_PATH,
    tag = "docs",
    responses(
        (status = 200, description = "An HTML page", content_type = "text/html", body = String),
    ),
    extensions(("x-errors" = json!([DOCS_OFF]))),
)]
#[tracing::instrument(skip_all)]
pub(crate) async fn docs(_: PageOn, Extension(spec): Extension<&'static OpenApi>) -> Response {
    static PAGE: OnceLock<String> = OnceLock::new();
    let page = PAGE.get_or_init(|| page(spec));
    ([(header::CONTENT_SECURITY_POLICY, PAGE_POLICY)], Html(page.as_str())).into_response()
}

/// The script of the `/docs` page: Scalar's standalone bundle, from the binary.
#[utoipa::path(
    get,
    path = SCALAR_PATH,
    tag = "docs",
    responses(
        (status = 200, description = "JavaScript (Scalar, MIT licence)", content_type = "text/javascript", body = String),
        (status = 304, description = "Not modified since the copy whose `ETag` was sent in `If-None-Match`"),
    ),
    extensions(("x-errors" = json!([DOCS_OFF]))),
)]
#[tracing::instrument(skip_all)]
pub(crate) async fn scalar_script(_: PageOn, headers: HeaderMap) -> Response {
    let etag = HeaderValue::from_static(SCALAR_ETAG);
    // Revalidated on each visit (a 304 while the binary is the same), so a
    // new version is never held back by a cache and refused by `integrity`.
    let cache = (header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if headers.get(header::IF_NONE_MATCH).is_some_and(|v| v == etag) {
        return (StatusCode::NOT_MODIFIED, [(header::ETAG, etag), cache]).into_response();
    }
    let content_type = (header::CONTENT_TYPE, HeaderValue::from_static("text/javascript; charset=utf-8"));
    ([content_type, (header::ETAG, etag), cache], SCALAR_JS).into_response()
}

/// The page: the description as a JSON data block (Scalar's HTML
/// integration reads it; a data block is not script, so the policy needs
/// no inline script), Scalar told not to fetch its fonts from its CDN, and
/// the script with its hash.
fn page(spec: &OpenApi) -> String {
    // `<` escaped, so no text in the description can close the element.
    let json = serde_json::to_string(spec).unwrap_or_default().replace('<', "\\u003c");
    format!(
        r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>clinflow API</title>
</head>
<body>
<script id="api-reference" type="application/json" data-configuration="{{&quot;withDefaultFonts&quot;:false,&quot;telemetry&quot;:false}}">{json}</script>
<script src="{SCALAR_PATH}" integrity="{SCALAR_INTEGRITY}"></script>
</body>
</html>
"#
    )
}

#[cfg(test)]
mod tests {
    use base64::Engine as _;
    use sha2::{Digest, Sha256};

    use super::*;

    #[test]
    fn the_vendored_script_is_the_pinned_one() {
        let digest = Sha256::digest(SCALAR_JS);
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        let changed = "api/vendor/scalar/standalone.js is not the pinned file: update its README and docs.rs";
        assert_eq!(SCALAR_ETAG, format!("\"{hex}\""), "{changed}");
        let base64 = base64::engine::general_purpose::STANDARD.encode(digest);
        assert_eq!(SCALAR_INTEGRITY, format!("sha256-{base64}"), "{changed}");
    }

    #[test]
    fn the_page_cannot_be_closed_by_the_description() {
        let mut spec = crate::openapi::spec().clone();
        spec.info.description = Some("</script><script>alert(1)</script>".into());
        let html = page(&spec);
        assert_eq!(html.matches("</script>").count(), 2, "{html}");
    }
}
