//! `GET /openapi.json` and `/docs`: this api's description, as the route
//! table declares it (`openapi::spec`, handed to these handlers by the
//! server as an extension).

use std::sync::OnceLock;

use axum::response::Html;
use axum::{Extension, Json};
use utoipa::openapi::OpenApi;

pub const SPEC_PATH: &str = "/openapi.json";
pub const DOCS_PATH: &str = "/docs";

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

/// An interactive page over this description (Scalar). The page is served
/// from here; the browser loads Scalar's script from its CDN (jsDelivr).
#[utoipa::path(
    get,
    path = DOCS_PATH,
    tag = "docs",
    responses((status = 200, description = "An HTML page", content_type = "text/html", body = String)),
)]
#[tracing::instrument(skip_all)]
pub(crate) async fn docs(Extension(spec): Extension<&'static OpenApi>) -> Html<&'static str> {
    static PAGE: OnceLock<String> = OnceLock::new();
    Html(PAGE.get_or_init(|| utoipa_scalar::Scalar::new(spec.clone()).title("clinflow API").to_html()))
}
