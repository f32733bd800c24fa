//! Client for the medcat-service HTTP contract (dev/medcat/check_contract.py
//! checks a service against it).
//!
//! Response bodies are never logged or put into errors: MedCAT echoes the
//! document text back, and a 422 body may quote it.

use std::path::Path;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use clinflow::annotation::Annotation;
use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::{Map, Value};

#[derive(Debug, thiserror::Error)]
pub enum MedcatError {
    #[error("MedCAT unreachable or timed out: {0}")]
    Transport(#[source] reqwest::Error),
    #[error("MedCAT answered HTTP {0}")]
    Status(StatusCode, Option<Duration>),
    #[error("MedCAT reported success=false")]
    NotSuccessful,
    #[error("MedCAT echoed another document's footer")]
    FooterMismatch,
    #[error("MedCAT response not understood: {0}")]
    Decode(String),
}

impl MedcatError {
    /// Worth retrying: the service is unreachable, timed out, overloaded or
    /// restarting (connection errors, timeouts, 408, 429, 502, 503, 504).
    /// A 500 is MedCAT failing on this input, and a 4xx or an unreadable
    /// answer will not improve either: those fail the document at once.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Transport(_) | Self::FooterMismatch => true,
            Self::Status(s, _) => matches!(s.as_u16(), 408 | 429 | 502 | 503 | 504),
            Self::NotSuccessful | Self::Decode(_) => false,
        }
    }

    /// The TLS handshake failed (a certificate not from MedCAT's CA, or not
    /// for its name): a configuration error, not an outage.
    pub fn is_tls(&self) -> bool {
        let Self::Transport(e) = self else { return false };
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(err) = source {
            if err.downcast_ref::<rustls::Error>().is_some() {
                return true;
            }
            // An io::Error answers `source()` with its payload's source,
            // skipping the payload: step into it instead.
            let payload = err.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref());
            source = match payload {
                Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
                None => err.source(),
            };
        }
        false
    }

    /// A short, fixed code for the document's `failure_code` (no PHI).
    pub fn failure_code(&self) -> &'static str {
        match self {
            Self::Status(s, _) if s.is_server_error() => "nlp_error",
            Self::Status(..) => "nlp_rejected",
            Self::NotSuccessful => "nlp_unsuccessful",
            Self::Decode(_) => "nlp_bad_answer",
            Self::Transport(_) | Self::FooterMismatch => "nlp_unavailable",
        }
    }

    /// The `outcome` label of `clinflow_medcat_request_seconds`.
    pub fn outcome(&self) -> &'static str {
        if self.is_transient() { "unavailable" } else { self.failure_code().trim_start_matches("nlp_") }
    }

    /// The server's `Retry-After`, which overrides the backoff's next delay.
    fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Status(_, after) => *after,
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Processed {
    /// `medcat_info.service_model` of the answer, when the service sends it.
    pub model_version: Option<String>,
    pub annotations: Vec<Annotation>,
}

#[derive(Clone)]
pub struct MedcatClient {
    http: reqwest::Client,
    base: String,
    backoff: ExponentialBuilder,
}

impl MedcatClient {
    /// A client of the MedCAT at `base_url`. An `https://` server is
    /// verified against `ca_file` alone when one is given (`MEDCAT_CA_FILE`),
    /// else against the system's roots.
    pub fn new(base_url: &str, ca_file: Option<&Path>, backoff: ExponentialBuilder) -> Result<Self, MedcatError> {
        clinflow::tls::install_crypto_provider();
        let mut builder =
            reqwest::Client::builder().connect_timeout(Duration::from_secs(5)).timeout(Duration::from_secs(120));
        if let Some(path) = ca_file {
            let pem = std::fs::read(path).map_err(|e| MedcatError::Decode(format!("MEDCAT_CA_FILE: {e}")))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(MedcatError::Transport)?;
            builder = builder.tls_certs_only(certs);
        }
        let http = builder.build().map_err(MedcatError::Transport)?;
        Ok(Self { http, base: base_url.trim_end_matches('/').to_owned(), backoff })
    }

    /// The backoff used in production: 0.5 s doubling to 20 s, with jitter,
    /// 6 retries (about a minute in all).
    pub fn default_backoff() -> ExponentialBuilder {
        ExponentialBuilder::default()
            .with_jitter()
            .with_min_delay(Duration::from_millis(500))
            .with_max_delay(Duration::from_secs(20))
            .with_max_times(6)
    }

    /// `service_model` from `GET /api/info`: the model version recorded with
    /// every result.
    pub async fn model_version(&self) -> Result<String, MedcatError> {
        #[derive(Deserialize)]
        struct Info {
            service_model: Value,
        }
        let fetch = || async {
            let response =
                self.http.get(format!("{}/api/info", self.base)).send().await.map_err(MedcatError::Transport)?;
            let info: Info = json(response).await?;
            value_to_string(&info.service_model).ok_or_else(|| MedcatError::Decode("service_model is missing".into()))
        };
        // A certificate MedCAT's CA did not sign will not sign itself: no retry.
        let retry = |e: &MedcatError| e.is_transient() && !e.is_tls();
        fetch.retry(self.backoff).when(retry).notify(notify).adjust(adjust).await
    }

    /// `GET /api/health/ready` answers 200.
    pub async fn ready(&self) -> bool {
        let url = format!("{}/api/health/ready", self.base);
        self.http.get(url).timeout(Duration::from_secs(5)).send().await.is_ok_and(|r| r.status().is_success())
    }

    /// `POST /api/process` with retries on transient failures.
    pub async fn process(&self, text: &str, footer: &str) -> Result<Processed, MedcatError> {
        let attempt = || self.process_once(text, footer);
        attempt.retry(self.backoff).when(MedcatError::is_transient).notify(notify).adjust(adjust).await
    }

    /// `POST /api/process_bulk` with retries on transient failures of the
    /// whole call. The outer error is the call's; the inner ones are per
    /// document, in input order (`NotSuccessful` or `Decode`).
    pub async fn process_bulk(&self, texts: &[&str]) -> Result<Vec<Result<Processed, MedcatError>>, MedcatError> {
        let attempt = || self.process_bulk_once(texts);
        attempt.retry(self.backoff).when(MedcatError::is_transient).notify(notify).adjust(adjust).await
    }

    async fn process_bulk_once(&self, texts: &[&str]) -> Result<Vec<Result<Processed, MedcatError>>, MedcatError> {
        let started = std::time::Instant::now();
        let answer = self.process_bulk_call(texts).await;
        observe("process_bulk", started, answer.as_ref().err());
        answer
    }

    async fn process_bulk_call(&self, texts: &[&str]) -> Result<Vec<Result<Processed, MedcatError>>, MedcatError> {
        let content: Vec<_> = texts.iter().map(|t| serde_json::json!({ "text": t })).collect();
        let response = self
            .http
            .post(format!("{}/api/process_bulk", self.base))
            .json(&serde_json::json!({ "content": content }))
            .send()
            .await
            .map_err(MedcatError::Transport)?;
        bulk_results(json(response).await?, texts.len())
    }

    async fn process_once(&self, text: &str, footer: &str) -> Result<Processed, MedcatError> {
        let started = std::time::Instant::now();
        let answer = self.process_call(text, footer).await;
        observe("process", started, answer.as_ref().err());
        answer
    }

    async fn process_call(&self, text: &str, footer: &str) -> Result<Processed, MedcatError> {
        let body = serde_json::json!({ "content": { "text": text, "footer": footer } });
        let response = self
            .http
            .post(format!("{}/api/process", self.base))
            .json(&body)
            .send()
            .await
            .map_err(MedcatError::Transport)?;
        processed(json(response).await?, footer)
    }
}

/// The body of a `POST /api/process` answer for a document sent with
/// `footer`, as [`MedcatClient::process`] reads it.
pub fn parse_process(body: &[u8], footer: &str) -> Result<Processed, MedcatError> {
    processed(decode(body)?, footer)
}

/// The body of a `POST /api/process_bulk` answer for `documents` documents,
/// as [`MedcatClient::process_bulk`] reads it.
pub fn parse_bulk(body: &[u8], documents: usize) -> Result<Vec<Result<Processed, MedcatError>>, MedcatError> {
    bulk_results(decode(body)?, documents)
}

fn processed(parsed: ProcessResponse, footer: &str) -> Result<Processed, MedcatError> {
    if parsed.result.success == Some(false) {
        return Err(MedcatError::NotSuccessful);
    }
    if parsed.result.footer.as_ref().and_then(value_to_string).is_some_and(|f| f != footer) {
        return Err(MedcatError::FooterMismatch);
    }
    Ok(Processed {
        model_version: parsed.medcat_info.and_then(|i| i.service_model).as_ref().and_then(value_to_string),
        annotations: parse_annotations(&parsed.result.annotations)?,
    })
}

fn bulk_results(parsed: BulkResponse, documents: usize) -> Result<Vec<Result<Processed, MedcatError>>, MedcatError> {
    if parsed.result.len() != documents {
        return Err(MedcatError::Decode(format!(
            "process_bulk answered {} results for {documents} documents",
            parsed.result.len()
        )));
    }
    let model_version = parsed.medcat_info.and_then(|i| i.service_model).as_ref().and_then(value_to_string);
    Ok(parsed
        .result
        .into_iter()
        .map(|result| {
            if result.success == Some(false) {
                return Err(MedcatError::NotSuccessful);
            }
            Ok(Processed { model_version: model_version.clone(), annotations: parse_annotations(&result.annotations)? })
        })
        .collect())
}

/// Every call to MedCAT, by endpoint and outcome (`ok` or
/// [`MedcatError::outcome`]).
fn observe(endpoint: &'static str, started: std::time::Instant, error: Option<&MedcatError>) {
    let outcome = error.map_or("ok", MedcatError::outcome);
    metrics::histogram!("clinflow_medcat_request_seconds", "endpoint" => endpoint, "outcome" => outcome)
        .record(started.elapsed().as_secs_f64());
}

fn adjust(e: &MedcatError, next: Option<Duration>) -> Option<Duration> {
    // Honour Retry-After, but only while the backoff still allows a retry,
    // and never for longer than a minute.
    next.map(|n| e.retry_after().map_or(n, |after| after.min(Duration::from_secs(60))))
}

fn notify(e: &MedcatError, after: Duration) {
    metrics::counter!("clinflow_medcat_retries_total").increment(1);
    tracing::warn!(error = %e, retry_in_ms = after.as_millis() as u64, "MedCAT call failed; retrying");
}

async fn json<T: serde::de::DeserializeOwned>(response: reqwest::Response) -> Result<T, MedcatError> {
    let status = response.status();
    if !status.is_success() {
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        return Err(MedcatError::Status(status, retry_after));
    }
    let bytes = response.bytes().await.map_err(MedcatError::Transport)?;
    decode(&bytes)
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, MedcatError> {
    // serde's message names the position, not the content.
    serde_json::from_slice(bytes)
        .map_err(|e| MedcatError::Decode(format!("line {} column {}: {:?}", e.line(), e.column(), e.classify())))
}

#[derive(Deserialize)]
struct ProcessResponse {
    medcat_info: Option<MedcatInfo>,
    result: ResultBody,
}

#[derive(Deserialize)]
struct BulkResponse {
    medcat_info: Option<MedcatInfo>,
    result: Vec<ResultBody>,
}

#[derive(Deserialize)]
struct MedcatInfo {
    service_model: Option<Value>,
}

#[derive(Deserialize)]
struct ResultBody {
    #[serde(default)]
    annotations: Value,
    success: Option<bool>,
    footer: Option<Value>,
}

fn value_to_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Accepts every shape the service produces: `[{"0": ent, "1": ent}]`
/// (dict mode), `[[ent, ent]]` (list mode), `[{}]`, `[[]]` and `[]`.
pub fn parse_annotations(value: &Value) -> Result<Vec<Annotation>, MedcatError> {
    let mut out = Vec::new();
    let groups = match value {
        Value::Null => return Ok(out),
        Value::Array(groups) => groups,
        _ => return Err(MedcatError::Decode("annotations is not a list".into())),
    };
    for group in groups {
        match group {
            Value::Object(by_id) => {
                for entity in by_id.values() {
                    out.push(entity_to_annotation(entity)?);
                }
            }
            Value::Array(entities) => {
                for entity in entities {
                    out.push(entity_to_annotation(entity)?);
                }
            }
            _ => return Err(MedcatError::Decode("annotations holds neither objects nor lists".into())),
        }
    }
    out.sort_by(|a, b| (a.start, a.end, &a.cui).cmp(&(b.start, b.end, &b.cui)));
    Ok(out)
}

fn entity_to_annotation(entity: &Value) -> Result<Annotation, MedcatError> {
    let field = |name: &str| entity.get(name).ok_or_else(|| MedcatError::Decode(format!("an entity has no {name}")));
    let offset = |name: &str| {
        field(name)?
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| MedcatError::Decode(format!("an entity's {name} is not an offset")))
    };
    let start = offset("start")?;
    let end = offset("end")?;
    if end < start {
        return Err(MedcatError::Decode("an entity ends before it starts".into()));
    }
    Ok(Annotation {
        cui: value_to_string(field("cui")?)
            .ok_or_else(|| MedcatError::Decode("an entity's cui is not a string".into()))?,
        pretty_name: entity.get("pretty_name").and_then(value_to_string).unwrap_or_default(),
        start,
        end,
        acc: entity.get("acc").and_then(Value::as_f64).unwrap_or(0.0),
        type_ids: entity
            .get("type_ids")
            .and_then(Value::as_array)
            .map(|ids| ids.iter().filter_map(value_to_string).collect())
            .unwrap_or_default(),
        meta_anns: entity.get("meta_anns").and_then(Value::as_object).cloned().unwrap_or_else(Map::new),
    })
}

#[cfg(test)]
mod tests;
