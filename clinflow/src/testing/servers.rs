//! Servers of a test's own, for tests that stop or restart them: a RabbitMQ
//! node and a PostgreSQL cluster, never the machine's shared ones; with the
//! development certificate when the tests run with TLS.

use secrecy::SecretString;
use uuid::Uuid;

use super::tls::{pg_tls_query, tls_dir};

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
