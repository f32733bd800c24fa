//! Shared by the worker's integration tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use clinflow::testing;

/// FAULT-INJECTING PROXY in front of the real MedCAT: answers `status` to the
/// first `failures` POSTs, then forwards every request to the real service.
/// It exists for what the real service cannot be made to do on demand:
/// answer 503 (or 429 with Retry-After) a given number of times.
pub struct FaultProxy {
    pub url: String,
    pub posts: Arc<AtomicUsize>,
}

pub async fn fault_proxy(failures: usize, status: StatusCode) -> FaultProxy {
    let posts = Arc::new(AtomicUsize::new(0));
    let state = (Arc::clone(&posts), failures, status, reqwest::Client::new());
    async fn forward(
        State((posts, failures, status, http)): State<(Arc<AtomicUsize>, usize, StatusCode, reqwest::Client)>,
        uri: Uri,
        method: Method,
        body: Bytes,
    ) -> Response {
        if method == Method::POST && posts.fetch_add(1, Ordering::SeqCst) < failures {
            return status.into_response();
        }
        let url = format!("{}{}", testing::medcat_url(), uri.path());
        let resp =
            http.request(method, url).header("content-type", "application/json").body(body).send().await.unwrap();
        (StatusCode::from_u16(resp.status().as_u16()).unwrap(), resp.bytes().await.unwrap()).into_response()
    }
    let app = Router::new().fallback(forward).with_state(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    FaultProxy { url: format!("http://{addr}"), posts }
}
