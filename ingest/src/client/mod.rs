//! The API client: one login shared by all requests, a new login and one
//! retry when a token is refused (tokens expire after 15 idle minutes), and
//! exponential backoff with jitter for transient failures.

mod error;
mod wire;

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use reqwest::header::CONTENT_TYPE;
use reqwest::{Client, RequestBuilder, Response, StatusCode, Url};
use secrecy::{ExposeSecret, SecretString};
use time::macros::format_description;
use tokio::sync::{Mutex, RwLock};
use uuid::Uuid;

pub use error::{ApiError, chain};
pub use wire::{AnnotationView, DocumentStatus, DocumentView};

use crate::source::Document;
use error::{classify, describe_json_error};
use wire::{Accepted, LoginRequest, LoginResponse, NewDocument};

#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts in all, the first one included.
    pub max_tries: usize,
    pub min_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self { max_tries: 6, min_delay: Duration::from_millis(500), max_delay: Duration::from_secs(20) }
    }
}

impl RetryPolicy {
    fn backoff(&self) -> ExponentialBuilder {
        ExponentialBuilder::default()
            .with_jitter()
            .with_min_delay(self.min_delay)
            .with_max_delay(self.max_delay)
            .with_max_times(self.max_tries.saturating_sub(1))
    }

    /// A `Retry-After` from the server wins over our own delay, within bounds.
    fn adjust(&self, error: &ApiError, delay: Option<Duration>) -> Option<Duration> {
        match (delay, error.retry_after()) {
            (Some(delay), Some(asked)) => Some(delay.max(asked.min(self.max_delay))),
            (delay, _) => delay,
        }
    }
}

pub struct ClientConfig {
    pub base_url: Url,
    pub username: String,
    pub password: SecretString,
    pub retry: RetryPolicy,
    /// Per request, connecting included.
    pub timeout: Duration,
}

/// What the API said to an upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Uploaded {
    /// 202: queued under this id.
    Accepted(Uuid),
    /// 409: this source_ref was uploaded before (id if the API said it).
    AlreadyDone(Option<Uuid>),
}

struct Session {
    token: Option<SecretString>,
    /// Bumped at each login, so that many requests refused at once trigger
    /// one new login, not one each.
    generation: u64,
}

pub struct ApiClient {
    http: Client,
    base: String,
    username: String,
    password: SecretString,
    retry: RetryPolicy,
    session: RwLock<Session>,
    login_lock: Mutex<()>,
}

impl ApiClient {
    pub fn new(config: ClientConfig) -> Result<Self, ApiError> {
        let http = Client::builder()
            .user_agent(concat!("clinflow-ingest/", env!("CARGO_PKG_VERSION")))
            .timeout(config.timeout)
            .connect_timeout(config.timeout.min(Duration::from_secs(10)))
            .build()
            .map_err(ApiError::Setup)?;
        Ok(Self {
            http,
            base: config.base_url.as_str().trim_end_matches('/').to_owned(),
            username: config.username,
            password: config.password,
            retry: config.retry,
            session: RwLock::new(Session { token: None, generation: 0 }),
            login_lock: Mutex::new(()),
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Logs in, retrying transient failures. Called once at start so that
    /// wrong credentials fail before any input is read.
    pub async fn login(&self) -> Result<(), ApiError> {
        let policy = self.retry;
        (|| async {
            let generation = self.session.read().await.generation;
            self.relogin(generation).await
        })
        .retry(policy.backoff())
        .when(ApiError::is_transient)
        .adjust(|e, d| policy.adjust(e, d))
        .notify(|e, delay| tracing::warn!(error = %e, ?delay, "login failed; retrying"))
        .await
    }

    /// Logs in unless someone else already did since `seen_generation`.
    async fn relogin(&self, seen_generation: u64) -> Result<(), ApiError> {
        let _one_login_at_a_time = self.login_lock.lock().await;
        if self.session.read().await.generation != seen_generation {
            return Ok(());
        }
        let token = self.request_token().await?;
        let mut session = self.session.write().await;
        session.token = Some(token);
        session.generation += 1;
        tracing::debug!(generation = session.generation, "logged in");
        Ok(())
    }

    async fn request_token(&self) -> Result<SecretString, ApiError> {
        let body = LoginRequest { username: &self.username, password: self.password.expose_secret() };
        let response =
            self.http.post(self.url("/v1/auth/login")).json(&body).send().await.map_err(ApiError::Transport)?;
        let status = response.status();
        if status == StatusCode::UNAUTHORIZED {
            return Err(ApiError::BadCredentials);
        }
        let login: LoginResponse = read_json(response).await?;
        Ok(SecretString::from(login.access_token))
    }

    async fn current_token(&self) -> Result<(SecretString, u64), ApiError> {
        for _ in 0..2 {
            let (token, generation) = {
                let session = self.session.read().await;
                (session.token.clone(), session.generation)
            };
            match token {
                Some(token) => return Ok((token, generation)),
                None => self.relogin(generation).await?,
            }
        }
        Err(ApiError::Unauthorized)
    }

    /// Sends an authenticated request; on 401 logs in again once and resends.
    async fn send_authed(&self, build: impl Fn(&str) -> RequestBuilder) -> Result<Response, ApiError> {
        let (token, generation) = self.current_token().await?;
        let response = send(build(token.expose_secret())).await?;
        if response.status() != StatusCode::UNAUTHORIZED {
            return Ok(response);
        }
        tracing::info!("token refused (expired?); logging in again");
        self.relogin(generation).await?;
        let (token, _) = self.current_token().await?;
        let response = send(build(token.expose_secret())).await?;
        if response.status() == StatusCode::UNAUTHORIZED {
            return Err(ApiError::Unauthorized);
        }
        Ok(response)
    }

    /// Uploads one document, retrying transient failures with backoff.
    pub async fn upload(&self, doc: &Document) -> Result<Uploaded, ApiError> {
        let body = upload_body(doc)?;
        let policy = self.retry;
        (|| self.upload_once(&body))
            .retry(policy.backoff())
            .when(ApiError::is_transient)
            .adjust(|e, d| policy.adjust(e, d))
            .notify(|e, delay| {
                tracing::warn!(source_ref = %doc.source_ref, error = %e, ?delay, "upload failed; retrying");
            })
            .await
    }

    async fn upload_once(&self, body: &[u8]) -> Result<Uploaded, ApiError> {
        let url = self.url("/v1/documents");
        let response = self
            .send_authed(|token| {
                self.http.post(&url).bearer_auth(token).header(CONTENT_TYPE, "application/json").body(body.to_vec())
            })
            .await?;
        if response.status() == StatusCode::CONFLICT {
            let body = response.bytes().await.map_err(ApiError::Transport)?;
            let id = serde_json::from_slice::<Accepted>(&body).ok().map(|a| a.id);
            return Ok(Uploaded::AlreadyDone(id));
        }
        let accepted: Accepted = read_json(response).await?;
        Ok(Uploaded::Accepted(accepted.id))
    }

    /// Fetches a document's status and annotations, retrying transient
    /// failures with backoff.
    pub async fn document(&self, id: Uuid) -> Result<DocumentView, ApiError> {
        let url = self.url(&format!("/v1/documents/{id}"));
        let policy = self.retry;
        (|| async {
            let response = self.send_authed(|token| self.http.get(&url).bearer_auth(token)).await?;
            read_json::<DocumentView>(response).await
        })
        .retry(policy.backoff())
        .when(ApiError::is_transient)
        .adjust(|e, d| policy.adjust(e, d))
        .notify(|e, delay| tracing::warn!(%id, error = %e, ?delay, "status request failed; retrying"))
        .await
    }
}

async fn send(request: RequestBuilder) -> Result<Response, ApiError> {
    request.send().await.map_err(ApiError::Transport)
}

/// Reads a 2xx answer as `T`, anything else as the matching error.
async fn read_json<T: serde::de::DeserializeOwned>(response: Response) -> Result<T, ApiError> {
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.bytes().await.map_err(ApiError::Transport)?;
    if !status.is_success() {
        return Err(classify(status, &headers, &body));
    }
    serde_json::from_slice(&body)
        .map_err(|e| ApiError::Protocol { status: status.as_u16(), detail: describe_json_error(&e) })
}

fn upload_body(doc: &Document) -> Result<Vec<u8>, ApiError> {
    let document_date = doc.document_date.and_then(|d| d.format(format_description!("[year]-[month]-[day]")).ok());
    let body =
        NewDocument { patient_ref: &doc.patient_ref, text: &doc.text, source_ref: &doc.source_ref, document_date };
    serde_json::to_vec(&body).map_err(|e| ApiError::Protocol { status: 0, detail: describe_json_error(&e) })
}
