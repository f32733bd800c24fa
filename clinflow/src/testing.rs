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

pub mod tls;

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

/// The development CA and server certificate (`CLINFLOW_TEST_TLS_DIR`:
/// `ca.pem`, `server.pem`, `server.key`), if the tests run with TLS.
pub fn tls_dir() -> Option<std::path::PathBuf> {
    std::env::var_os("CLINFLOW_TEST_TLS_DIR").map(Into::into)
}

/// The query that asks PostgreSQL for a verified TLS connection with the
/// development CA (empty without it).
fn pg_tls_query() -> String {
    match tls_dir() {
        Some(dir) => format!("?sslmode=verify-full&sslrootcert={}", dir.join("ca.pem").display()),
        None => String::new(),
    }
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

/// A RabbitMQ node of a test's own, on its own ports, for tests that stop
/// and start the broker: the machine's node (which other tests and
/// `./dev/up` use) is never touched. Started with the machine's
/// `rabbitmq-server` (as its `rabbitmq` user) and stopped on drop.
pub struct RabbitNode {
    pub name: String,
    pub port: u16,
    dir: std::path::PathBuf,
}

impl RabbitNode {
    pub async fn start() -> Self {
        let id = Uuid::new_v4().simple().to_string();
        let port = free_port();
        let dist_port = free_port();
        let name = format!("clinflow-test-{}@localhost", &id[..12]);
        let dir = std::env::temp_dir().join(format!("clinflow-rabbit-{}", &id[..12]));
        for sub in ["mnesia", "log"] {
            std::fs::create_dir_all(dir.join(sub)).expect("node directory");
        }
        std::fs::write(dir.join("rabbitmq.conf"), rabbit_listener_conf(port, &dir)).expect("conf");
        std::fs::write(dir.join("enabled_plugins"), "[].\n").expect("plugins");
        let chown = tokio::process::Command::new("chown").arg("-R").arg("rabbitmq:rabbitmq").arg(&dir).status().await;
        assert!(chown.is_ok_and(|s| s.success()), "chown the node directory to the rabbitmq user");
        let started = tokio::process::Command::new("rabbitmq-server")
            .arg("-detached")
            .env("RABBITMQ_NODENAME", &name)
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq.conf"))
            .env("RABBITMQ_DIST_PORT", dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_PID_FILE", dir.join("pid"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .status()
            .await;
        assert!(started.is_ok_and(|s| s.success()), "rabbitmq-server -detached");
        let node = Self { name, port, dir };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !node.ctl(&["await_startup", "--timeout", "5"]).await {
            assert!(std::time::Instant::now() < deadline, "RabbitMQ node {} did not start", node.name);
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        node
    }

    pub fn amqp_url(&self) -> SecretString {
        match tls_dir() {
            Some(tls) => {
                format!("amqps://guest:guest@127.0.0.1:{}/%2f?cacertfile={}", self.port, tls.join("ca.pem").display())
                    .into()
            }
            None => format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port).into(),
        }
    }

    /// The fault: the broker stops serving (connections are closed) while
    /// the node's Erlang VM keeps running.
    pub async fn stop_app(&self) {
        assert!(self.ctl(&["stop_app"]).await, "rabbitmqctl stop_app");
    }

    pub async fn start_app(&self) {
        assert!(self.ctl(&["start_app"]).await, "rabbitmqctl start_app");
    }

    async fn ctl(&self, args: &[&str]) -> bool {
        tokio::process::Command::new("rabbitmqctl")
            .arg("-q")
            .arg("-n")
            .arg(&self.name)
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .await
            .is_ok_and(|s| s.success())
    }
}

/// The node's listener: TLS only with the development certificate (copies
/// the `rabbitmq` user can read, in the node's directory), else plain TCP.
fn rabbit_listener_conf(port: u16, dir: &std::path::Path) -> String {
    let Some(tls) = tls_dir() else { return format!("listeners.tcp.local = 127.0.0.1:{port}\n") };
    for file in ["ca.pem", "server.pem", "server.key"] {
        std::fs::copy(tls.join(file), dir.join(file)).expect("copy the development certificate");
    }
    format!(
        "listeners.tcp = none\nlisteners.ssl.local = 127.0.0.1:{port}\n\
         ssl_options.cacertfile = {d}/ca.pem\nssl_options.certfile = {d}/server.pem\n\
         ssl_options.keyfile = {d}/server.key\nssl_options.verify = verify_none\n\
         ssl_options.fail_if_no_peer_cert = false\n",
        d = dir.display()
    )
}

impl Drop for RabbitNode {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["-q", "-n", &self.name, "stop"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A port, free when asked, for a process a test starts. Picked at random
/// below the kernel's range for outgoing connections (32768–60999 on these
/// machines), not with `bind(":0")`, which takes it from that range: the
/// tests' own connections to PostgreSQL, RabbitMQ and HTTP servers could
/// then take it before the started process binds it (seen in CI: an api
/// process exiting with "Address already in use" on its metrics port).
pub fn free_port() -> u16 {
    loop {
        let random = Uuid::new_v4();
        let port = 20_000 + u16::from_le_bytes([random.as_bytes()[0], random.as_bytes()[1]]) % 12_000;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// `127.0.0.1:<free_port()>`.
pub fn free_addr() -> String {
    format!("127.0.0.1:{}", free_port())
}

/// A PostgreSQL server of a test's own (initdb into a temporary directory,
/// its own port), for tests that stop and start the database: the machine's
/// server, which other tests and `./dev/up` use, is never touched. Runs as
/// the `postgres` user (initdb refuses root); removed on drop.
pub struct Postgres {
    pub port: u16,
    dir: std::path::PathBuf,
    bin: std::path::PathBuf,
}

impl Postgres {
    pub async fn start() -> Self {
        let version = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL binaries under /usr/lib/postgresql")
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .max()
            .expect("a PostgreSQL version");
        let bin = std::path::PathBuf::from(format!("/usr/lib/postgresql/{version}/bin"));
        let dir = std::env::temp_dir().join(format!("clinflow-pg-{}", &Uuid::new_v4().simple().to_string()[..12]));
        std::fs::create_dir_all(&dir).expect("data directory");
        let chown = tokio::process::Command::new("chown").arg("postgres:postgres").arg(&dir).status().await;
        assert!(chown.is_ok_and(|s| s.success()), "chown the data directory to postgres");
        let pg = Self { port: free_port(), dir, bin };
        let initdb = format!("{}/initdb -D {}/data -A trust -U postgres", pg.bin.display(), pg.dir.display());
        assert!(pg.as_postgres(&initdb).await, "initdb");
        if let Some(tls) = tls_dir() {
            // ssl = on with the development certificate; the key must be
            // the server's own (postgres, 0600).
            let data = pg.dir.join("data");
            std::fs::copy(tls.join("server.pem"), data.join("server.crt")).expect("server certificate");
            std::fs::copy(tls.join("server.key"), data.join("server.key")).expect("server key");
            let own = format!(
                "chown postgres:postgres {d}/server.crt {d}/server.key && chmod 600 {d}/server.key",
                d = data.display()
            );
            assert!(pg.as_postgres_root(&own).await, "the server key for postgres");
            let conf = std::fs::OpenOptions::new().append(true).open(data.join("postgresql.conf"));
            std::io::Write::write_all(&mut conf.expect("postgresql.conf"), b"ssl = on\n").expect("ssl = on");
        }
        pg.start_server().await;
        pg
    }

    /// Superuser URL of the maintenance database (over TLS when the tests
    /// run with it).
    pub fn admin_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres{}", self.port, pg_tls_query())
    }

    /// The fault: a fast shutdown (connections are cut, nothing is lost).
    pub async fn stop(&self) {
        let stop = format!("{}/pg_ctl -D {}/data stop -m fast -w", self.bin.display(), self.dir.display());
        assert!(self.as_postgres(&stop).await, "pg_ctl stop");
    }

    pub async fn start_server(&self) {
        let start = format!(
            "{}/pg_ctl -D {d}/data -o '-p {} -k {d} -c listen_addresses=127.0.0.1' -l {d}/log start -w",
            self.bin.display(),
            self.port,
            d = self.dir.display()
        );
        assert!(self.as_postgres(&start).await, "pg_ctl start");
    }

    async fn as_postgres_root(&self, command: &str) -> bool {
        tokio::process::Command::new("sh").args(["-c", command]).status().await.is_ok_and(|s| s.success())
    }

    async fn as_postgres(&self, command: &str) -> bool {
        tokio::process::Command::new("su")
            .args(["postgres", "-s", "/bin/sh", "-c", command])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .await
            .is_ok_and(|s| s.success())
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let stop = format!("{}/pg_ctl -D {}/data stop -m immediate", self.bin.display(), self.dir.display());
        let _ = std::process::Command::new("su")
            .args(["postgres", "-s", "/bin/sh", "-c", &stop])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Polls `check` every 50 ms until it holds; fails the test at `deadline`.
pub async fn wait_until(what: &str, deadline: std::time::Duration, mut check: impl AsyncFnMut() -> bool) {
    let until = std::time::Instant::now() + deadline;
    while !check().await {
        assert!(std::time::Instant::now() < until, "{what}: not within {deadline:?}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
