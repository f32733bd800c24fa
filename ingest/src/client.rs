//! The API client. One login shared by every request, logged in again once
//! when a token is refused (sessions end after 15 idle minutes); 429 answers
//! are waited out as long as the API asks (its backpressure), and transient
//! failures (no answer, 408, 502, 503, 504) are retried with exponential
//! backoff and jitter, a bounded number of times. The request and answer
//! bodies are the API's own types from `clinflow::wire`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use bytes::Bytes;
use clinflow::wire::{
    BATCH_PATH, BatchResponse, ErrorBody, LOGIN_PATH, LoginRequest, LoginResponse, STATUSES_PATH, StatusRequest,
    StatusesResponse,
};
use reqwest::header::{CONTENT_TYPE, RETRY_AFTER};
use reqwest::{Response, StatusCode, Url};
use secrecy::{ExposeSecret, SecretString};
use serde::de::DeserializeOwned;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Longest wait a `Retry-After` may ask for before we cap it.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Tries in all for a transient failure, the first one included.
    pub max_tries: usize,
    pub min_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self { max_tries: 8, min_delay: Duration::from_millis(500), max_delay: Duration::from_secs(30) }
    }
}

pub struct ClientConfig {
    pub base_url: Url,
    pub username: String,
    pub password: SecretString,
    /// A service account's API key: sent as the bearer token, no login.
    pub api_key: Option<SecretString>,
    /// The care team named in every upload (ingest accounts only).
    pub care_team: Option<String>,
    pub retry: RetryPolicy,
    /// Per request, connecting included.
    pub timeout: Duration,
    /// The CAs an `https://` API is verified against (`CLINFLOW_API_CA_FILE`);
    /// empty: the system's roots.
    pub ca_certs: Vec<reqwest::Certificate>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the API refused the login ({0})")]
    Login(String),
    /// An answer that retrying will not change (a 4xx other than 401/408/429).
    #[error("the API answered {status}: {code}: {message}")]
    Refused { status: u16, code: String, message: String },
    #[error("no usable answer from the API after {tries} tries; last: {last}")]
    GaveUp { tries: usize, last: String },
    #[error("interrupted")]
    Interrupted,
}

pub struct ApiClient {
    http: reqwest::Client,
    base: Url,
    username: String,
    password: SecretString,
    api_key: Option<SecretString>,
    care_team: Option<String>,
    retry: RetryPolicy,
    /// The bearer token, and how many logins produced it (so that many
    /// requests refused at once cause one new login, not one each).
    session: Mutex<(u64, Option<SecretString>)>,
    busy_answers: AtomicU64,
}

enum Attempt<T> {
    Done(T),
    /// Worth another try, after at least this long.
    Transient(String, Option<Duration>),
    Busy(Duration),
    Unauthorized,
    Refused(ClientError),
}

impl ApiClient {
    pub fn new(config: ClientConfig) -> Result<Self, reqwest::Error> {
        // reqwest's TLS needs the process's rustls provider: ring, as in
        // every clinflow binary (an error: one is installed already).
        #[allow(deprecated)] // ring lacks post-quantum key exchange; see clinflow::tls
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut http = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout.min(Duration::from_secs(10)))
            .user_agent(concat!("clinflow-ingest/", env!("CARGO_PKG_VERSION")));
        if !config.ca_certs.is_empty() {
            http = http.tls_certs_only(config.ca_certs);
        }
        let http = http.build()?;
        Ok(Self {
            http,
            base: config.base_url,
            username: config.username,
            password: config.password,
            api_key: config.api_key,
            care_team: config.care_team,
            retry: config.retry,
            session: Mutex::new((0, None)),
            busy_answers: AtomicU64::new(0),
        })
    }

    pub fn username(&self) -> &str {
        &self.username
    }

    /// The care team named in every upload.
    pub fn care_team(&self) -> Option<&str> {
        self.care_team.as_deref()
    }

    /// How many 429 answers (the API's backpressure) were waited out so far.
    pub fn busy_answers(&self) -> u64 {
        self.busy_answers.load(Ordering::Relaxed)
    }

    /// Logs in now (so that bad credentials fail before any work starts);
    /// with an API key, asks for no statuses to have the key checked.
    pub async fn login(&self, cancel: &CancellationToken) -> Result<(), ClientError> {
        if self.api_key.is_some() {
            return self.statuses(&[], cancel).await.map(drop);
        }
        self.token(cancel).await.map(drop)
    }

    /// `POST /v1/documents/batch` with an NDJSON body of upload lines.
    pub async fn upload_batch(&self, ndjson: Bytes, cancel: &CancellationToken) -> Result<BatchResponse, ClientError> {
        self.post(BATCH_PATH, "application/x-ndjson", ndjson, cancel).await
    }

    /// `POST /v1/documents/status`: status, times and failure code of each id.
    pub async fn statuses(&self, ids: &[Uuid], cancel: &CancellationToken) -> Result<StatusesResponse, ClientError> {
        let body = serde_json::to_vec(&StatusRequest { ids: ids.to_vec() }).map_err(|e| ClientError::Refused {
            status: 0,
            code: "encode".into(),
            message: e.to_string(),
        })?;
        self.post(STATUSES_PATH, "application/json", body.into(), cancel).await
    }

    async fn token(&self, cancel: &CancellationToken) -> Result<(u64, SecretString), ClientError> {
        if let Some(key) = &self.api_key {
            return Ok((0, key.clone()));
        }
        let mut session = self.session.lock().await;
        if let (generation, Some(token)) = &*session {
            return Ok((*generation, token.clone()));
        }
        let body = serde_json::to_vec(&LoginRequest {
            username: self.username.clone(),
            password: self.password.expose_secret().to_owned(),
        })
        .map_err(|e| ClientError::Login(e.to_string()))?;
        let login: LoginResponse = self
            .with_retries(cancel, || async {
                match self.send(LOGIN_PATH, "application/json", body.clone().into(), None).await {
                    Attempt::Unauthorized => Attempt::Refused(ClientError::Login("wrong username or password".into())),
                    other => other,
                }
            })
            .await?;
        session.0 += 1;
        session.1 = Some(login.access_token.into());
        Ok((session.0, session.1.clone().unwrap_or_else(|| SecretString::from(""))))
    }

    async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        content_type: &'static str,
        body: Bytes,
        cancel: &CancellationToken,
    ) -> Result<T, ClientError> {
        let mut logged_in_again = false;
        loop {
            let (generation, token) = self.token(cancel).await?;
            let answer = self.with_retries(cancel, || self.send(path, content_type, body.clone(), Some(&token))).await;
            match answer {
                Err(ClientError::Login(_)) if !logged_in_again => {
                    // The token was refused: log in once more, then try again.
                    logged_in_again = true;
                    let mut session = self.session.lock().await;
                    if session.0 == generation {
                        session.1 = None;
                    }
                }
                other => return other,
            }
        }
    }

    /// Runs `attempt` until it is done, refused, or out of transient retries;
    /// waits out 429s without counting them. An unauthorized answer ends it
    /// as `ClientError::Login`.
    async fn with_retries<T, F: Future<Output = Attempt<T>>>(
        &self,
        cancel: &CancellationToken,
        mut attempt: impl FnMut() -> F,
    ) -> Result<T, ClientError> {
        let mut delays = ExponentialBuilder::default()
            .with_jitter()
            .with_min_delay(self.retry.min_delay)
            .with_max_delay(self.retry.max_delay)
            .with_max_times(self.retry.max_tries.saturating_sub(1))
            .build();
        let mut tries = 0;
        let mut busy_since: Option<tokio::time::Instant> = None;
        loop {
            if cancel.is_cancelled() {
                return Err(ClientError::Interrupted);
            }
            let wait = match attempt().await {
                Attempt::Done(value) => return Ok(value),
                Attempt::Refused(error) => return Err(error),
                Attempt::Unauthorized => return Err(ClientError::Login("token refused".into())),
                Attempt::Busy(wait) => {
                    self.busy_answers.fetch_add(1, Ordering::Relaxed);
                    if busy_since.is_none() {
                        busy_since = Some(tokio::time::Instant::now());
                        tracing::info!(retry_after_s = wait.as_secs(), "the API is busy (429); waiting as it asks");
                    }
                    wait
                }
                Attempt::Transient(last, asked) => {
                    tries += 1;
                    let Some(delay) = delays.next() else {
                        return Err(ClientError::GaveUp { tries, last });
                    };
                    let delay = asked.map_or(delay, |asked| delay.max(asked));
                    tracing::warn!(error = %last, retry_in_ms = delay.as_millis() as u64, "request failed; retrying");
                    delay
                }
            };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = cancel.cancelled() => return Err(ClientError::Interrupted),
            }
        }
    }

    async fn send<T: DeserializeOwned>(
        &self,
        path: &str,
        content_type: &'static str,
        body: Bytes,
        token: Option<&SecretString>,
    ) -> Attempt<T> {
        let url = match self.base.join(path) {
            Ok(url) => url,
            Err(e) => {
                return Attempt::Refused(ClientError::Refused {
                    status: 0,
                    code: "url".into(),
                    message: e.to_string(),
                });
            }
        };
        let mut request = self.http.post(url).header(CONTENT_TYPE, content_type).body(body);
        if let Some(token) = token {
            request = request.bearer_auth(token.expose_secret());
        }
        let response = match request.send().await {
            Ok(response) => response,
            Err(e) => return Attempt::Transient(without_url(&e), None),
        };
        let status = response.status();
        let asked = retry_after(&response);
        if status.is_success() {
            return match response.bytes().await {
                Ok(bytes) => match serde_json::from_slice(&bytes) {
                    Ok(value) => Attempt::Done(value),
                    Err(e) => Attempt::Refused(ClientError::Refused {
                        status: status.as_u16(),
                        code: "undecodable_answer".into(),
                        message: format!("the answer is not what this client expects: {e}"),
                    }),
                },
                Err(e) => Attempt::Transient(without_url(&e), None),
            };
        }
        match status {
            StatusCode::UNAUTHORIZED => Attempt::Unauthorized,
            StatusCode::TOO_MANY_REQUESTS => Attempt::Busy(asked.unwrap_or(Duration::from_secs(2))),
            StatusCode::REQUEST_TIMEOUT
            | StatusCode::BAD_GATEWAY
            | StatusCode::SERVICE_UNAVAILABLE
            | StatusCode::GATEWAY_TIMEOUT => Attempt::Transient(format!("HTTP {}", status.as_u16()), asked),
            _ => {
                let (code, message) = match response.json::<ErrorBody>().await {
                    Ok(body) => (body.error.code.into_owned(), body.error.message),
                    Err(_) => ("unknown".to_owned(), "no error body".to_owned()),
                };
                Attempt::Refused(ClientError::Refused { status: status.as_u16(), code, message })
            }
        }
    }
}

fn retry_after(response: &Response) -> Option<Duration> {
    let seconds: u64 = response.headers().get(RETRY_AFTER)?.to_str().ok()?.trim().parse().ok()?;
    Some(Duration::from_secs(seconds).min(MAX_RETRY_AFTER))
}

/// reqwest's message without the URL (which holds nothing secret here, but
/// keeps log lines short) and with its cause.
fn without_url(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else if e.is_body() || e.is_decode() {
        "answer cut short"
    } else {
        "request failed"
    };
    match std::error::Error::source(e) {
        Some(cause) => format!("{kind}: {cause}"),
        None => kind.to_owned(),
    }
}
