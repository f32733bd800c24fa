//! The extractors handlers use, whose refusals are the api's JSON errors.

use axum::extract::{FromRequest, FromRequestParts};

use crate::error::ApiError;

/// `axum::Json` whose refusal is the JSON error `invalid_json`,
/// `invalid_body`, `unsupported_media_type` or `payload_too_large`.
#[derive(FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct JsonBody<T>(pub T);

/// `axum::extract::Path` whose refusal (an id that is no UUID) is the JSON
/// error `invalid_path`, not axum's plain text that quotes the value.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct PathParams<T>(pub T);

/// `axum::extract::Query` whose refusal is the JSON error `invalid_query`.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct QueryParams<T>(pub T);
