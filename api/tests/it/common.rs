//! The whole pipeline in one test process: the api on an ephemeral port, a
//! worker and an audit sink, against the machine's real PostgreSQL, RabbitMQ
//! and the local MedCAT service — each test with its own database and its own
//! queue names.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use backon::ExponentialBuilder;
use clinflow::amqp::Topology;
use clinflow::link::LinkState;
use clinflow::relay::{Relay, RelayHandle};
use clinflow::testing::{self, TestDb};
use clinflow_api::auth::{IDLE_TIMEOUT, JwtKeys, LockoutPolicy, LoginGuard};
use clinflow_api::batch::BatchLimits;
use clinflow_api::users::{self, Passwords, Role};
use clinflow_api::{AppState, Edge, UploadLimits};
use clinflow_audit_sink::Sink;
use clinflow_audit_sink::chain::Trust;
use clinflow_audit_sink::checkpoint::{CheckpointConfig, Checkpointer};
use clinflow_worker::medcat::MedcatClient;
use clinflow_worker::{BatchConfig, RetryConfig, Worker};
use secrecy::{SecretBox, SecretString};
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const PASSWORD: &str = "a long test password";

/// What verifies the stack's audit chain: the public keys of the tests'
/// producers (`clinflow::testing::audit_keys`), no secret.
pub fn audit_trust() -> Trust {
    testing::audit_keys().trust()
}

/// Login and access settings of a test stack. The default allows many
/// logins a minute from one address (every test client is 127.0.0.1).
pub struct AccessOptions {
    pub lockout: LockoutPolicy,
    pub logins_per_minute: u32,
    pub break_glass_for: Duration,
    pub break_glass_per_day: u32,
    pub idle_timeout: Duration,
}

impl Default for AccessOptions {
    fn default() -> Self {
        Self {
            lockout: LockoutPolicy::default(),
            logins_per_minute: 100_000,
            break_glass_for: Duration::from_secs(3600),
            break_glass_per_day: 50,
            idle_timeout: IDLE_TIMEOUT,
        }
    }
}

pub struct Stack {
    pub db: TestDb,
    pub topology: Topology,
    pub amqp: lapin::Connection,
    pub base: String,
    pub http: reqwest::Client,
    pub passwords: Passwords,
    pub shutdown: CancellationToken,
    pub worker: JoinHandle<anyhow::Result<()>>,
    pub sink: JoinHandle<anyhow::Result<()>>,
    pub api: JoinHandle<std::io::Result<()>>,
    pub relay: Option<JoinHandle<()>>,
    relay_handle: RelayHandle,
    /// The in-process api's state (for another api on other keys).
    state: AppState,
    amqp_url: SecretString,
    /// The sink's checkpoint file (one every 10 events or second).
    pub checkpoints: std::path::PathBuf,
    _checkpoint_dir: tempfile::TempDir,
    /// The api's erasure journal (`ERASURE_JOURNAL_DIR`), under
    /// `testing::ERASURE_JOURNAL_KEY`.
    pub erasure_journal: std::path::PathBuf,
    _erasure_journal_dir: tempfile::TempDir,
}

impl Stack {
    pub async fn start() -> Self {
        Self::start_on(testing::amqp_url()).await
    }

    /// The stack on another broker (a test's own RabbitMQ node).
    pub async fn start_on(amqp_url: SecretString) -> Self {
        let mut stack = Self::start_without_relay_on(amqp_url, TestDb::new().await).await;
        stack.start_relay();
        stack
    }

    /// The stack on another database server (a test's own PostgreSQL).
    pub async fn start_on_database(admin_url: &str) -> Self {
        let mut stack = Self::start_without_relay_on(testing::amqp_url(), TestDb::new_on(admin_url).await).await;
        stack.start_relay();
        stack
    }

    /// The stack with no outbox relay running: uploads are committed but
    /// nothing is published until [`start_relay`](Self::start_relay).
    pub async fn start_without_relay() -> Self {
        Self::start_without_relay_on(testing::amqp_url(), TestDb::new().await).await
    }

    /// The stack without a relay, with these upload limits (backpressure).
    pub async fn start_limited(limits: UploadLimits) -> Self {
        Self::start_with(testing::amqp_url(), TestDb::new().await, limits, AccessOptions::default()).await
    }

    async fn start_without_relay_on(amqp_url: SecretString, db: TestDb) -> Self {
        Self::start_with(amqp_url, db, UploadLimits::default(), AccessOptions::default()).await
    }

    /// The stack with these login and break-glass settings.
    pub async fn start_with_access(access: AccessOptions) -> Self {
        let mut stack =
            Self::start_with(testing::amqp_url(), TestDb::new().await, UploadLimits::default(), access).await;
        stack.start_relay();
        stack
    }

    async fn start_with(amqp_url: SecretString, db: TestDb, limits: UploadLimits, access: AccessOptions) -> Self {
        let AccessOptions { lockout, logins_per_minute, break_glass_for, break_glass_per_day, idle_timeout } = access;
        clinflow::telemetry::init_tracing();
        let (topology, amqp) = testing::topology_on(&amqp_url).await;
        let keys = Arc::new(testing::keys());
        let shutdown = CancellationToken::new();
        let passwords = Passwords::new().await.unwrap();

        let relay = RelayHandle::default();
        let checkpoint_dir = tempfile::tempdir().unwrap();
        let checkpoints = checkpoint_dir.path().join("audit-checkpoints.jsonl");
        let erasure_journal_dir = tempfile::tempdir().unwrap();
        let state = AppState {
            db: db.api.clone(),
            audit_db: Some(db.audit_reader.clone()),
            keys: Arc::clone(&keys),
            index_key: Arc::new(testing::index_key()),
            relay: relay.clone(),
            jwt: Arc::new(JwtKeys::new(&SecretBox::new(Box::new(b"test jwt secret that is long enough!!".to_vec())))),
            passwords: passwords.clone(),
            idle_timeout,
            limits,
            batch_limits: BatchLimits { max_lines: 50, max_bytes: 64 * 1024, max_line_bytes: 4 * 1024 },
            amqp_url: amqp_url.clone(),
            topology: topology.clone(),
            audit_signer: testing::audit_keys().api.clone(),
            audit_trust: Some(Arc::new(audit_trust())),
            audit_checkpoints: Some(checkpoints.clone()),
            denials: Arc::new(clinflow_api::denials::DenialLimiter::per_minute(std::num::NonZeroU32::new(60).unwrap())),
            login: Arc::new(LoginGuard::new(lockout, std::num::NonZeroU32::new(logins_per_minute).unwrap())),
            break_glass_for,
            break_glass_per_day,
            erasure_journal: Some(Arc::new(testing::erasure_journal(erasure_journal_dir.path()))),
            edge: Edge::default(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let api = tokio::spawn(clinflow_api::serve(listener, state.clone(), shutdown.clone()));

        let backoff = ExponentialBuilder::default().with_min_delay(Duration::from_millis(50)).with_max_times(3);
        let medcat = MedcatClient::new(&testing::medcat_url(), testing::medcat_ca_file().as_deref(), backoff).unwrap();
        let model_version = medcat.model_version().await.expect("MedCAT at MEDCAT_URL (./dev/test starts one)");
        let worker = Arc::new(Worker {
            db: db.worker.clone(),
            keys,
            medcat,
            model_version,
            topology: topology.clone(),
            audit_signer: testing::audit_keys().worker.clone(),
            batch: BatchConfig { size: 8, in_flight: 2, ..BatchConfig::default() },
            retry: RetryConfig::default(),
        });
        let worker = {
            let (url, shutdown) = (amqp_url.clone(), shutdown.clone());
            tokio::spawn(async move { worker.run(&url, &LinkState::default(), shutdown).await })
        };

        let sink = Sink {
            db: db.sink.clone(),
            signer: testing::audit_keys().sink.clone(),
            keys: testing::audit_keys().public(),
            topology: topology.clone(),
            batch_size: 64,
            max_wait: Duration::from_millis(20),
            checkpoints: Some(tokio::sync::Mutex::new(Checkpointer::new(CheckpointConfig {
                path: checkpoints.clone(),
                every_events: 10,
                every: Duration::from_secs(1),
            }))),
        };
        let sink = {
            let (url, shutdown) = (amqp_url.clone(), shutdown.clone());
            tokio::spawn(async move { sink.run(&url, &LinkState::default(), shutdown).await })
        };

        Self {
            db,
            topology,
            amqp,
            base: format!("http://{addr}"),
            http: clinflow::testing::http(),
            passwords,
            shutdown,
            worker,
            sink,
            api,
            relay: None,
            relay_handle: relay,
            state,
            checkpoints,
            _checkpoint_dir: checkpoint_dir,
            erasure_journal: erasure_journal_dir.path().to_owned(),
            _erasure_journal_dir: erasure_journal_dir,
            amqp_url,
        }
    }

    /// Serves the api again, on a new address that `base` then names, as a
    /// restarted api with `keyring` as CLINFLOW_MASTER_KEY would: nothing of
    /// the first api's keys or cache is kept. The first api and the worker
    /// run on with theirs.
    pub async fn serve_api_with(&mut self, keyring: clinflow::crypto::Keyring) {
        let state = AppState { keys: Arc::new(clinflow::keys::Keys::new(keyring)), ..self.state.clone() };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        self.base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(clinflow_api::serve(listener, state, self.shutdown.clone()));
    }

    /// Serves another api beside the first, on the same database, keys and
    /// relay, with `change` made to its state (another edge, other login
    /// limits); returns its base URL. It stops with the stack.
    pub async fn serve_another_api(&self, change: impl FnOnce(&mut AppState)) -> String {
        let mut state = self.state.clone();
        change(&mut state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(clinflow_api::serve(listener, state, self.shutdown.clone()));
        base
    }

    /// Serves the api over HTTPS with `cert`, as deployed, beside the
    /// first (same database, keys and relay), with `change` made to its
    /// state; returns its base URL. It stops with the stack.
    pub async fn serve_https(&self, cert: &crate::https::ApiCert, change: impl FnOnce(&mut AppState)) -> String {
        use clinflow_api::https::{ApiTls, MinVersion, TlsFiles};
        let files = TlsFiles {
            cert: cert.cert.clone(),
            key: cert.key.clone(),
            min_version: MinVersion::Tls13,
            reload_every: Duration::from_secs(60),
        };
        let tls = ApiTls::load(files).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("https://127.0.0.1:{}", listener.local_addr().unwrap().port());
        let mut state = self.state.clone();
        change(&mut state);
        tokio::spawn(clinflow_api::serve_tls(listener, state, tls, self.shutdown.clone()));
        base
    }

    /// Starts the outbox relay of the in-process api.
    pub fn start_relay(&mut self) {
        self.relay = Some(self.spawn_relay(self.amqp_url.clone()));
    }

    /// A relay of the in-process api publishing to `amqp_url` (which may be
    /// a broker that is not there: its backlog is still measured).
    pub fn spawn_relay(&self, amqp_url: SecretString) -> JoinHandle<()> {
        let relay = Relay {
            db: self.db.api.clone(),
            amqp_url,
            topology: self.topology.clone(),
            name: "clinflow-test-api".into(),
            handle: self.relay_handle.clone(),
        };
        tokio::spawn(relay.run(self.shutdown.clone()))
    }

    /// A user with the tests' password; an uploader's account holds its
    /// notes for direct care (its default lawful basis), as `./dev/up`'s do.
    pub async fn user(&self, name: &str, role: Role) -> uuid::Uuid {
        let id = users::create(&self.db.api, &self.passwords, name, PASSWORD, role).await.unwrap();
        if matches!(role, Role::Ingest | Role::Clinician) {
            sqlx::query("UPDATE users SET default_lawful_basis = 'direct_care' WHERE id = $1")
                .bind(id)
                .execute(&self.db.owner)
                .await
                .unwrap();
        }
        id
    }

    /// Puts these patients in a care team of `clinician`'s own (straight
    /// into the database: the admin endpoints have their own tests).
    pub async fn care_team(&self, clinician: &str, patients: &[&str]) {
        let team = uuid::Uuid::now_v7();
        sqlx::query("INSERT INTO care_teams (id, name) VALUES ($1, $2)")
            .bind(team)
            .bind(format!("team-of-{clinician}"))
            .execute(&self.db.owner)
            .await
            .unwrap();
        sqlx::query("INSERT INTO care_team_members (team_id, user_id) SELECT $1, id FROM users WHERE username = $2")
            .bind(team)
            .bind(clinician)
            .execute(&self.db.owner)
            .await
            .unwrap();
        for patient in patients {
            sqlx::query(
                "INSERT INTO care_team_patients (team_id, patient_index) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            )
            .bind(team)
            .bind(clinflow::documents::patient_index(&testing::index_key(), patient))
            .execute(&self.db.owner)
            .await
            .unwrap();
        }
    }

    pub async fn login(&self, name: &str) -> String {
        let (status, body) = self.post("/v1/auth/login", None, &json!({"username": name, "password": PASSWORD})).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["token_type"], "bearer");
        body["access_token"].as_str().unwrap().to_owned()
    }

    /// `POST /v1/documents/batch` with this NDJSON body.
    pub async fn batch(&self, token: &str, body: String) -> (u16, Value) {
        let resp = self
            .http
            .post(format!("{}/v1/documents/batch", self.base))
            .bearer_auth(token)
            .header("content-type", "application/x-ndjson")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    pub async fn post(&self, path: &str, token: Option<&str>, body: &Value) -> (u16, Value) {
        let mut req = self.http.post(format!("{}{path}", self.base)).json(body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// Any method, a JSON body if given; the status and the JSON answer.
    pub async fn call(&self, method: &str, path: &str, token: Option<&str>, body: Option<&Value>) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(body) = body {
            req = req.json(body);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> (u16, Value) {
        let mut req = self.http.get(format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// Waits until the audit table holds `n` rows (the sink is asynchronous).
    pub async fn wait_for_audit_rows(&self, n: i64) -> i64 {
        let mut count = 0;
        for _ in 0..200 {
            count = sqlx::query_scalar::<_, i64>("SELECT count(*) FROM audit_events")
                .fetch_one(&self.db.owner)
                .await
                .unwrap();
            if count >= n {
                // Give a late straggler the chance to show up and break equality.
                tokio::time::sleep(Duration::from_millis(300)).await;
                return sqlx::query_scalar::<_, i64>("SELECT count(*) FROM audit_events")
                    .fetch_one(&self.db.owner)
                    .await
                    .unwrap();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        count
    }

    /// Message count of a queue (passive declare).
    /// Message count of a queue (passive declare), on a fresh connection:
    /// the stack's own may have died with a broker restart.
    pub async fn queue_depth(&self, queue: &str) -> u32 {
        let connection = clinflow::amqp::connect(&self.amqp_url, "clinflow-test-inspect").await.unwrap();
        let channel = connection.create_channel().await.unwrap();
        let options = lapin::options::QueueDeclareOptions { passive: true, ..Default::default() };
        channel.queue_declare(queue.into(), options, lapin::types::FieldTable::default()).await.unwrap().message_count()
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        for (name, result) in [
            ("worker", self.worker.await.map(|r| r.map_err(|e| e.to_string()))),
            ("sink", self.sink.await.map(|r| r.map_err(|e| e.to_string()))),
            ("api", self.api.await.map(|r| r.map_err(|e| e.to_string()))),
            (
                "relay",
                match self.relay {
                    Some(relay) => relay.await.map(Ok),
                    None => Ok(Ok(())),
                },
            ),
        ] {
            assert!(matches!(result, Ok(Ok(()))), "{name} did not stop cleanly: {result:?}");
        }
        if let Ok(connection) = clinflow::amqp::connect(&self.amqp_url, "clinflow-test-cleanup").await {
            testing::delete_queues(&self.topology, &connection).await;
        }
        self.db.drop_database().await;
    }
}

/// Audit rows as (action, outcome, actor_name) triples, sorted, for exact
/// comparison.
pub async fn audit_summary(db: &sqlx::PgPool) -> Vec<(String, String, String)> {
    let mut rows: Vec<(String, String, Option<String>)> =
        sqlx::query_as("SELECT action, outcome, actor_name FROM audit_events").fetch_all(db).await.unwrap();
    rows.sort();
    rows.into_iter().map(|(a, o, n)| (a, o, n.unwrap_or_default())).collect()
}

pub use clinflow::testing::wait_until;

/// Waits until every one of `ids` is `done` (60 s at most); none may fail.
pub async fn wait_for_all_done(stack: &Stack, ids: &[String]) {
    wait_until("every accepted document done", Duration::from_secs(60), async || {
        let (done, failed): (i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE status = 'done'), count(*) FILTER (WHERE status = 'failed')
             FROM documents WHERE id = ANY($1::uuid[])",
        )
        .bind(ids)
        .fetch_one(&stack.db.owner)
        .await
        .unwrap();
        assert_eq!(failed, 0, "no accepted document may fail");
        done == ids.len() as i64
    })
    .await;
}

/// Clients uploading one note after another until stopped, recording the
/// ids of accepted uploads and the status of refused ones.
pub struct Uploaders {
    pub accepted: Arc<std::sync::Mutex<Vec<String>>>,
    pub refused: Arc<std::sync::Mutex<Vec<u16>>>,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Uploaders {
    pub fn start(stack: &Stack, token: &str, clients: usize) -> Self {
        let this =
            Self { accepted: Arc::default(), refused: Arc::default(), stop: CancellationToken::new(), tasks: vec![] };
        let tasks = (0..clients)
            .map(|client| {
                let (http, base, token) = (stack.http.clone(), stack.base.clone(), token.to_owned());
                let (accepted, refused, stop) =
                    (Arc::clone(&this.accepted), Arc::clone(&this.refused), this.stop.clone());
                tokio::spawn(async move {
                    let mut n = 0;
                    while !stop.is_cancelled() {
                        n += 1;
                        let doc =
                            json!({"patient_ref": format!("PAT-{client}-{n}"), "text": "Known AF, on metformin."});
                        let sent =
                            http.post(format!("{base}/v1/documents")).bearer_auth(&token).json(&doc).send().await;
                        let Ok(resp) = sent else { continue };
                        let code = resp.status().as_u16();
                        let body: Value = resp.json().await.unwrap_or_default();
                        match (code, body["id"].as_str()) {
                            (202, Some(id)) => accepted.lock().unwrap().push(id.to_owned()),
                            _ => refused.lock().unwrap().push(code),
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                })
            })
            .collect();
        Self { tasks, ..this }
    }

    /// Stops the clients; returns (accepted ids, refused statuses).
    pub async fn stop(self) -> (Vec<String>, Vec<u16>) {
        self.stop.cancel();
        for task in self.tasks {
            task.await.unwrap();
        }
        let accepted = self.accepted.lock().unwrap().clone();
        let refused = self.refused.lock().unwrap().clone();
        (accepted, refused)
    }
}
