//! The MedCAT client against the real local MedCAT service (MEDCAT_URL, which
//! ./dev/test starts), and through the fault-injecting proxy of `support`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::http::StatusCode;
use backon::ExponentialBuilder;
use clinflow::testing;
use clinflow_worker::medcat::{MedcatClient, MedcatError};
use support::fault_proxy;

fn fast() -> ExponentialBuilder {
    ExponentialBuilder::default().with_min_delay(Duration::from_millis(20)).with_max_times(3)
}

#[tokio::test]
async fn real_medcat_finds_concepts_at_their_offsets() {
    let client = MedcatClient::new(&testing::medcat_url(), testing::medcat_ca_file().as_deref(), fast()).unwrap();
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

#[tokio::test]
async fn transient_failures_are_retried_with_backoff_then_give_up() {
    let proxy = fault_proxy(2, StatusCode::SERVICE_UNAVAILABLE).await;
    let (url, calls) = (proxy.url, proxy.posts);
    let client = MedcatClient::new(&url, None, fast()).unwrap();
    let got = client.process("Known HTN.", "doc-3").await.unwrap();
    assert!(got.annotations.iter().any(|a| a.cui == "38341003"));
    assert_eq!(calls.load(Ordering::SeqCst), 3, "two 503s, then success");

    let proxy = fault_proxy(usize::MAX, StatusCode::SERVICE_UNAVAILABLE).await;
    let (url, calls) = (proxy.url, proxy.posts);
    let client = MedcatClient::new(&url, None, fast()).unwrap();
    let err = client.process("Known HTN.", "doc-4").await.unwrap_err();
    assert!(matches!(err, MedcatError::Status(StatusCode::SERVICE_UNAVAILABLE, _)), "{err}");
    assert!(err.is_transient());
    assert_eq!(calls.load(Ordering::SeqCst), 4, "one try and three retries");
}

/// The error and its causes, as `{:#}` of anyhow prints them (one line).
fn chain(err: &MedcatError) -> String {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(e) = source {
        text = format!("{text}: {e}");
        source = e.source();
    }
    text
}

/// MedCAT's hop from the wrong side: an IMPOSTOR (clinflow::testing::tls)
/// with a certificate from another CA, or from MedCAT's CA for another name,
/// is refused at once (no retry: a certificate does not fix itself), and an
/// https:// URL to a plain HTTP server fails instead of falling back.
#[tokio::test]
async fn medcat_refuses_a_server_it_cannot_verify_and_never_falls_back_to_http() {
    use clinflow::testing::tls::{Preamble, TestCa, impostor};
    let trusted = TestCa::new("MedCAT's CA");
    let other = TestCa::new("another CA");
    for ((cert, key), why) in
        [(other.leaf(&["127.0.0.1"]), "unknownissuer"), (trusted.leaf(&["medcat.example"]), "not valid for name")]
    {
        let port = impostor(cert, key, Preamble::None).await;
        let url = format!("https://127.0.0.1:{port}");
        let client = MedcatClient::new(&url, Some(trusted.pem_path()), fast()).unwrap();
        let err = client.model_version().await.unwrap_err();
        let text = chain(&err);
        assert!(err.is_tls(), "a TLS refusal: {text}");
        assert!(text.to_lowercase().contains(why) && !text.contains('\n'), "{text}");
    }
    // A plain HTTP server (the fault proxy) behind an https:// URL.
    let proxy = fault_proxy(0, StatusCode::OK).await;
    let url = proxy.url.replacen("http://", "https://", 1);
    let client = MedcatClient::new(&url, Some(trusted.pem_path()), fast()).unwrap();
    let err = client.model_version().await.unwrap_err();
    assert!(matches!(err, MedcatError::Transport(_)), "{}", chain(&err));
    assert_eq!(proxy.posts.load(Ordering::SeqCst), 0);
}
