//! Test support (feature `testing`): every test gets its own PostgreSQL
//! database and its own RabbitMQ names, so tests run in parallel with each
//! other and beside a running `./dev/up` stack.
//!
//! Environment (all optional): `CLINFLOW_TEST_ADMIN_URL` (a superuser on the
//! maintenance database, default `postgres://postgres@127.0.0.1:5432/postgres`),
//! `CLINFLOW_TEST_AMQP_URL` (default guest on 127.0.0.1:5672), `MEDCAT_URL`
//! and `MEDCAT_CA_FILE`, and `CLINFLOW_TEST_TLS_DIR`: the development CA and
//! server certificate (dev/tls.sh), with which the servers a test starts
//! itself serve TLS too. `./dev/test` sets them all, with TLS on every hop.

#![allow(clippy::expect_used)] // test support: a failed set-up should stop the test loudly

use lapin::options::QueueDeleteOptions;
use secrecy::{SecretBox, SecretString};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, PgConnection, PgPool};
use uuid::Uuid;

mod audit_keys;
mod broker;
mod servers;
pub mod tls;

pub use audit_keys::{AuditKeys, audit_keys};
pub use broker::{BrokerUser, BrokerUsers};
pub use servers::{Postgres, RabbitNode, free_addr, free_port};
pub use tls::tls_dir;

use crate::amqp::Topology;
use crate::crypto::{IndexKey, Keyring};

pub fn admin_url() -> String {
    std::env::var("CLINFLOW_TEST_ADMIN_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

pub fn amqp_url() -> SecretString {
    std::env::var("CLINFLOW_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
        .into()
}

pub fn medcat_url() -> String {
    std::env::var("MEDCAT_URL").unwrap_or_else(|_| "http://127.0.0.1:5000".to_owned())
}

/// The CA of the test MedCAT's certificate (`MEDCAT_CA_FILE`), if any.
pub fn medcat_ca_file() -> Option<std::path::PathBuf> {
    std::env::var_os("MEDCAT_CA_FILE").map(Into::into)
}

/// An HTTP client for tests, trusting the development CA (as well as the
/// system's roots) when the tests run with TLS.
pub fn http() -> reqwest::Client {
    crate::tls::install_crypto_provider();
    let mut builder = reqwest::Client::builder();
    if let Some(dir) = tls_dir() {
        let pem = std::fs::read(dir.join("ca.pem")).expect("the development CA");
        for cert in reqwest::Certificate::from_pem_bundle(&pem).expect("the development CA") {
            builder = builder.add_root_certificate(cert);
        }
    }
    builder.build().expect("an HTTP client")
}

/// The environment a service a test starts needs to reach the MedCAT at
/// `url`: its CA (`MEDCAT_CA_FILE`), or, for a test's own fault-injecting
/// proxy (plain HTTP on loopback), `CLINFLOW_ALLOW_PLAINTEXT=1`.
pub fn medcat_env(url: &str) -> Vec<(&'static str, String)> {
    let mut env = vec![("MEDCAT_URL", url.to_owned())];
    if url.starts_with("http://") {
        env.push((crate::tls::ALLOW_PLAINTEXT, "1".to_owned()));
    } else if let Some(ca) = medcat_ca_file() {
        env.push(("MEDCAT_CA_FILE", ca.display().to_string()));
    }
    env
}

/// A broker URL nothing answers at (port 1), over TLS when the tests are:
/// RabbitMQ away from the start.
pub fn unreachable_amqp_url() -> String {
    match tls_dir() {
        Some(tls) => format!("amqps://guest:guest@127.0.0.1:1/%2f?cacertfile={}", tls.join("ca.pem").display()),
        None => "amqp://guest:guest@127.0.0.1:1/%2f".to_owned(),
    }
}

/// `amqp_url()` as a string, for a service a test starts.
pub fn amqp_url_string() -> String {
    secrecy::ExposeSecret::expose_secret(&amqp_url()).to_owned()
}

/// The services' login roles (migrations/20261126000003_service_roles.sql).
pub const API_ROLE: &str = "clinflow_api";
pub const WORKER_ROLE: &str = "clinflow_worker";
pub const SINK_ROLE: &str = "clinflow_sink";
pub const AUDIT_READER_ROLE: &str = "clinflow_audit_reader";

/// A fresh, migrated database named `clinflow_test_<uuid>`.
pub struct TestDb {
    pub name: String,
    /// Connected as each service's own role, like the services.
    pub api: PgPool,
    pub worker: PgPool,
    pub sink: PgPool,
    pub audit_reader: PgPool,
    /// Connected as the owner (superuser), for arranging and inspecting.
    pub owner: PgPool,
    /// The superuser URL of the server it lives on.
    admin: String,
}

impl TestDb {
    pub async fn new() -> Self {
        Self::new_on(&admin_url()).await
    }

    /// A fresh, migrated database on the server of `admin_url` (a test's
    /// own PostgreSQL).
    pub async fn new_on(admin_url: &str) -> Self {
        let name = format!("clinflow_test_{}", Uuid::new_v4().simple());
        let admin: PgConnectOptions = admin_url.parse().expect("admin URL");
        let mut conn = admin.connect().await.expect("connect as test admin");
        sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .expect("create test database");
        conn.close().await.ok();

        let owner_opts = admin.clone().database(&name);
        let owner = PgPoolOptions::new().max_connections(4).connect_with(owner_opts.clone()).await.expect("owner pool");
        crate::MIGRATOR.run(&owner).await.expect("migrate test database");
        // Lazy: a test opens only the connections it uses.
        let pool = |role: &str, max: u32| {
            PgPoolOptions::new()
                .max_connections(max)
                .acquire_timeout(std::time::Duration::from_secs(5))
                .connect_lazy_with(owner_opts.clone().username(role))
        };
        Self {
            api: pool(API_ROLE, 10),
            worker: pool(WORKER_ROLE, 6),
            sink: pool(SINK_ROLE, 4),
            audit_reader: pool(AUDIT_READER_ROLE, 2),
            name,
            owner,
            admin: admin_url.to_owned(),
        }
    }

    /// A single connection as `role` (for privilege tests).
    pub async fn connection_as(&self, role: &str) -> PgConnection {
        let admin: PgConnectOptions = self.admin.parse().expect("admin URL");
        admin.database(&self.name).username(role).connect().await.expect("role connection")
    }

    /// A database URL for `role`, for tests that start a binary.
    pub fn url_as(&self, role: &str) -> String {
        let admin: PgConnectOptions = self.admin.parse().expect("admin URL");
        // The admin URL's query (its TLS settings) goes with it.
        let query = self.admin.split_once('?').map(|(_, q)| format!("?{q}")).unwrap_or_default();
        format!("postgres://{role}@{}:{}/{}{query}", admin.get_host(), admin.get_port(), self.name)
    }

    /// Drops the database. Tests that fail before this leave theirs behind;
    /// `./dev/test` drops leftovers before each run.
    pub async fn drop_database(self) {
        for pool in [&self.api, &self.worker, &self.sink, &self.audit_reader] {
            pool.close().await;
        }
        self.owner.close().await;
        let admin: PgConnectOptions = self.admin.parse().expect("admin URL");
        if let Ok(mut conn) = admin.connect().await {
            let _ = sqlx::query(AssertSqlSafe(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)))
                .execute(&mut conn)
                .await;
        }
    }
}

/// A topology under a random prefix, declared on the machine's broker.
pub async fn topology() -> (Topology, lapin::Connection) {
    topology_on(&amqp_url()).await
}

/// A topology under a random prefix, declared on the broker at `url`.
pub async fn topology_on(url: &SecretString) -> (Topology, lapin::Connection) {
    let topology = Topology::new(format!("clinflow-test-{}", Uuid::new_v4().simple()));
    let conn = crate::amqp::connect(url, "clinflow-test").await.expect("connect to RabbitMQ");
    let channel = conn.create_channel().await.expect("channel");
    topology.declare(&channel).await.expect("declare test topology");
    (topology, conn)
}

/// Deletes the queues of a test topology (exchanges are left: they hold no
/// messages and cost nothing).
pub async fn delete_queues(topology: &Topology, conn: &lapin::Connection) {
    if let Ok(channel) = conn.create_channel().await {
        for wq in topology.work_queues() {
            for q in [Some(wq.queue), Some(wq.dead_queue), wq.retry_queue].into_iter().flatten() {
                let _ = channel.queue_delete(q.as_str().into(), QueueDeleteOptions::default()).await;
            }
        }
        for exchange in [
            topology.jobs_exchange(),
            topology.audit_exchange(),
            topology.dead_letter_exchange(),
            topology.retry_exchange(),
        ] {
            let options = lapin::options::ExchangeDeleteOptions::default();
            let _ = channel.exchange_delete(exchange.as_str().into(), options).await;
        }
    }
}

pub fn index_key() -> IndexKey {
    IndexKey::new(SecretBox::new(Box::new(b"test index key, at least 32 bytes long".to_vec())))
}

/// The tests' `ERASURE_JOURNAL_KEY` (as a binary reads it).
pub const ERASURE_JOURNAL_KEY: &str = "test erasure journal key, 32 bytes or more";

/// A journal of erasures in `dir` under [`ERASURE_JOURNAL_KEY`].
pub fn erasure_journal(dir: &std::path::Path) -> crate::erasure::Journal {
    crate::erasure::Journal::new(dir, IndexKey::new(SecretBox::new(Box::new(ERASURE_JOURNAL_KEY.as_bytes().to_vec()))))
}

/// The tests' master key (base64 of it for a binary's CLINFLOW_MASTER_KEY).
pub fn master_key() -> [u8; 32] {
    let mut key = [0u8; 32];
    for (i, b) in key.iter_mut().enumerate() {
        *b = u8::try_from(i).unwrap_or(0).wrapping_mul(73).wrapping_add(11);
    }
    key
}

pub fn keyring() -> Keyring {
    Keyring::from_master_key(&SecretBox::new(Box::new(master_key())))
}

/// The tests' keys: [`keyring`] (KEK "1") and a cache of data keys.
pub fn keys() -> crate::keys::Keys {
    crate::keys::Keys::new(keyring())
}

/// Polls `check` every 50 ms until it holds; fails the test at `deadline`.
pub async fn wait_until(what: &str, deadline: std::time::Duration, mut check: impl AsyncFnMut() -> bool) {
    let until = std::time::Instant::now() + deadline;
    while !check().await {
        assert!(std::time::Instant::now() < until, "{what}: not within {deadline:?}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
