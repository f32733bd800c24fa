//! The MedCAT client against the real local MedCAT service (MEDCAT_URL, which
//! ./dev/test starts), plus one fault-injecting fake for what the real service
//! cannot be made to do on demand: answer 503 a given number of times.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use backon::ExponentialBuilder;
use clinflow::testing;
use clinflow_worker::medcat::{MedcatClient, MedcatError};

fn fast() -> ExponentialBuilder {
    ExponentialBuilder::default().with_min_delay(Duration::from_millis(20)).with_max_times(3)
}

#[tokio::test]
async fn real_medcat_finds_concepts_at_their_offsets() {
    let client = MedcatClient::new(&testing::medcat_url(), fast()).unwrap();
    let model = client.model_version().await.unwrap();
    assert!(model.starts_with("clinflow-dev-"), "{model}");

    let text = "Temp 38.5°C. Known AF, started on metformin for T2DM.";
    let got = client.process(text, "doc-1").await.unwrap();
    assert_eq!(got.model_version.as_deref(), Some(model.as_str()));
    let find = |cui: &str| got.annotations.iter().find(|a| a.cui == cui).unwrap_or_else(|| panic!("{cui} missing"));
    let span = |a: &clinflow::annotation::Annotation| -> String {
        text.chars().skip(a.start as usize).take((a.end - a.start) as usize).collect()
    };
    assert_eq!(span(find("372567009")), "metformin");
    assert_eq!(span(find("49436004")), "AF");
    assert_eq!(span(find("44054006")), "T2DM");

    assert!(client.process("  ", "doc-2").await.unwrap().annotations.is_empty());
}

/// FAULT-INJECTING FAKE: answers 503 to the first `failures` POSTs, then
/// forwards every request to the real MedCAT.
async fn flaky_medcat(failures: usize) -> (String, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let state = (Arc::clone(&calls), failures, reqwest::Client::new());
    async fn forward(
        State((calls, failures, http)): State<(Arc<AtomicUsize>, usize, reqwest::Client)>,
        uri: Uri,
        method: axum::http::Method,
        body: Bytes,
    ) -> Response {
        if method == axum::http::Method::POST && calls.fetch_add(1, Ordering::SeqCst) < failures {
            return StatusCode::SERVICE_UNAVAILABLE.into_response();
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
    (format!("http://{addr}"), calls)
}

#[tokio::test]
async fn transient_failures_are_retried_with_backoff_then_give_up() {
    let (url, calls) = flaky_medcat(2).await;
    let client = MedcatClient::new(&url, fast()).unwrap();
    let got = client.process("Known HTN.", "doc-3").await.unwrap();
    assert!(got.annotations.iter().any(|a| a.cui == "38341003"));
    assert_eq!(calls.load(Ordering::SeqCst), 3, "two 503s, then success");

    let (url, calls) = flaky_medcat(usize::MAX).await;
    let client = MedcatClient::new(&url, fast()).unwrap();
    let err = client.process("Known HTN.", "doc-4").await.unwrap_err();
    assert!(matches!(err, MedcatError::Status(StatusCode::SERVICE_UNAVAILABLE)), "{err}");
    assert!(err.is_transient());
    assert_eq!(calls.load(Ordering::SeqCst), 4, "one try and three retries");
}
