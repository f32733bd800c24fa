//! The clinflow services as separate processes (the release binaries), in
//! the benchmark's own database and queue prefix, beside whatever else runs
//! on the machine's PostgreSQL and RabbitMQ.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use base64::Engine as _;
use clinflow::crypto::{IndexKey, Keyring};
use clinflow::tls::ALLOW_PLAINTEXT;
use secrecy::SecretBox;
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, Command};

/// How the services' connections are carried.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Hops {
    /// TLS on every hop, each server verified against the CA: PostgreSQL
    /// `verify-full`, amqps, HTTPS to the api and to the NLP service. No
    /// `CLINFLOW_ALLOW_PLAINTEXT`, so a plaintext URL would stop a service.
    #[default]
    Tls,
    /// Plain TCP to PostgreSQL and RabbitMQ, plain HTTP to the api and the
    /// stand-in, with `CLINFLOW_ALLOW_PLAINTEXT=1` (MedCAT itself serves
    /// HTTPS only: the worker reaches it over TLS either way).
    Plain,
}

impl Hops {
    pub fn name(self) -> &'static str {
        match self {
            Hops::Tls => "TLS",
            Hops::Plain => "plaintext",
        }
    }
}

/// What TLS hops need.
pub struct TlsFiles {
    pub ca_file: PathBuf,
    /// The certificate and key the api and the stand-in serve.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// `amqps://…?cacertfile=…`.
    pub amqp_url: String,
}

/// The services' connections, to be carried either way.
pub struct Links {
    /// `postgres://clinflow_api@host:port/database`, and the same as the
    /// audit reader; `sslmode` is added (verify-full, or disable for plaintext).
    pub database_url: String,
    pub audit_reader_url: String,
    /// The broker, plaintext.
    pub amqp_url: String,
    pub tls: Option<TlsFiles>,
}

/// Everything the services need to find each other.
pub struct Stack {
    pub bin_dir: PathBuf,
    pub log_dir: PathBuf,
    pub env: BTreeMap<String, String>,
    pub api_url: String,
    /// How the services started next connect (`set_hops`).
    pub hops: Hops,
    links: Links,
    /// MedCAT's process, when `bench/run` found it (`--medcat-pid`).
    pub medcat_pid: Option<u32>,
    /// The worker's audit key, for events the harness publishes in its name
    /// (the sink stores only events signed by a producer it knows).
    pub worker_signer: clinflow::audit::Signer,
    services: BTreeMap<&'static str, Service>,
}

pub struct Service {
    pub child: Child,
    pub metrics_url: String,
}

pub const API: &str = "api";
pub const WORKER: &str = "worker";
pub const SINK: &str = "audit-sink";

impl Stack {
    /// MedCAT's process, or (not told which) every python process: the
    /// tests' MedCAT too, if they run meanwhile.
    pub fn medcat_pids(&self) -> Vec<u32> {
        self.medcat_pid.map_or_else(|| pids_of(&["python", "python3"]), |pid| vec![pid])
    }

    /// The services' environment, their connections carried as `hops`.
    pub fn new(
        bin_dir: PathBuf,
        log_dir: PathBuf,
        links: Links,
        hops: Hops,
        prefix: &str,
        master_key: &[u8; 32],
    ) -> anyhow::Result<Self> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut env: BTreeMap<String, String> = [
            ("CLINFLOW_QUEUE_PREFIX", prefix.to_owned()),
            ("CLINFLOW_MASTER_KEY", b64.encode(master_key)),
            ("JWT_SECRET", b64.encode(uuid::Uuid::new_v4().as_bytes().repeat(3))),
            ("CLINFLOW_INDEX_KEY", b64.encode(uuid::Uuid::new_v4().as_bytes().repeat(3))),
            ("RUST_LOG", "warn".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        // The audit sink anchors its chain as in production: afresh, as the
        // database is (a file left by an earlier run names rows this run's
        // database never had, and the periodic verification said FAILED).
        let checkpoints = log_dir.join("audit-checkpoints.jsonl");
        match std::fs::remove_file(&checkpoints) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
        env.insert("AUDIT_CHECKPOINT_FILE".into(), checkpoints.display().to_string());
        // Every service signs its audit events with a key of its own (the
        // api's is the default, for its commands; see `start`).
        let keys = log_dir.join("audit-keys");
        let worker_signer = audit_keys(&keys)?;
        env.insert("AUDIT_PUBLIC_KEYS".into(), keys.join("public").display().to_string());
        env.insert("AUDIT_SIGNING_KEY_FILE".into(), keys.join("api.key").display().to_string());
        // Tuning knobs given to ./bench/run reach the services (and are
        // recorded with the figures).
        for (k, v) in std::env::vars() {
            if ["WORKER_", "AUDIT_BATCH_", "UPLOAD_MAX_", "BATCH_MAX_"].iter().any(|p| k.starts_with(p)) {
                env.insert(k, v);
            }
        }
        std::fs::create_dir_all(&log_dir)?;
        let mut stack = Self {
            bin_dir,
            log_dir,
            env,
            api_url: String::new(),
            hops,
            links,
            medcat_pid: None,
            worker_signer,
            services: BTreeMap::new(),
        };
        stack.set_hops(hops)?;
        Ok(stack)
    }

    /// The services started from now on connect as `hops` (stop them first).
    /// Each service gets its own role in `start`; the api's is the default,
    /// for its commands.
    pub fn set_hops(&mut self, hops: Hops) -> anyhow::Result<()> {
        anyhow::ensure!(self.services.is_empty(), "stop the services before changing their hops");
        let links = &self.links;
        let tls = match hops {
            Hops::Tls => {
                Some(links.tls.as_ref().context("TLS hops need --ca-file, --tls-cert, --tls-key and --amqp-tls-url")?)
            }
            Hops::Plain => None,
        };
        // Plaintext says so: sqlx's default (`prefer`) would take TLS where
        // the server offers it, as PostgreSQL here does.
        let query = tls.map_or("?sslmode=disable".to_owned(), |t| {
            format!("?sslmode=verify-full&sslrootcert={}", t.ca_file.display())
        });
        let mut env = vec![
            ("DATABASE_URL", format!("{}{query}", links.database_url)),
            ("AUDIT_READER_DATABASE_URL", format!("{}{query}", links.audit_reader_url)),
            ("AMQP_URL", tls.map_or(links.amqp_url.clone(), |t| t.amqp_url.clone())),
        ];
        for k in [ALLOW_PLAINTEXT, "API_TLS_CERT", "API_TLS_KEY"] {
            self.env.remove(k);
        }
        match tls {
            Some(t) => env
                .extend([("API_TLS_CERT", t.cert.display().to_string()), ("API_TLS_KEY", t.key.display().to_string())]),
            None => env.push((ALLOW_PLAINTEXT, "1".to_owned())),
        }
        // A fresh port each time: the last api's connections may linger.
        let api_addr = free_addr()?;
        env.push(("API_ADDR", api_addr.clone()));
        self.env.extend(env.into_iter().map(|(k, v)| (k.to_owned(), v)));
        self.api_url = format!("{}://{api_addr}", if tls.is_some() { "https" } else { "http" });
        self.hops = hops;
        Ok(())
    }

    /// Starts service `name` (`api`, `worker`, `audit-sink`) with `extra`
    /// environment, and waits until it is ready (metrics served; the api
    /// also ready for requests).
    pub async fn start(&mut self, name: &'static str, extra: &[(&str, &str)]) -> anyhow::Result<()> {
        let metrics_addr = free_addr()?;
        let log = File::options().create(true).append(true).open(self.log_dir.join(format!("{name}.log")))?;
        let mut command = Command::new(self.bin_dir.join(format!("clinflow-{name}")));
        let role = match name {
            WORKER => "clinflow_worker",
            SINK => "clinflow_sink",
            _ => "clinflow_api",
        };
        let database_url = self.env.get("DATABASE_URL").map(|u| u.replacen("clinflow_api@", &format!("{role}@"), 1));
        let signing_key = self.log_dir.join("audit-keys").join(format!("{name}.key"));
        command
            // Only as `set_hops` says, never inherited from the harness.
            .env_remove(ALLOW_PLAINTEXT)
            .envs(&self.env)
            .envs(database_url.map(|u| ("DATABASE_URL".to_owned(), u)))
            .env("AUDIT_SIGNING_KEY_FILE", signing_key)
            .env("METRICS_ADDR", &metrics_addr)
            .envs(extra.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        let child = command.spawn().with_context(|| format!("starting clinflow-{name} (is it built?)"))?;
        let metrics_url = format!("http://{metrics_addr}/metrics");
        // The api serves metrics before it listens: wait for its readiness.
        let ready_url = if name == API { format!("{}/readyz", self.api_url) } else { metrics_url.clone() };
        self.services.insert(name, Service { child, metrics_url });
        let http = crate::http::client();
        let deadline = Instant::now() + Duration::from_secs(60);
        let log = self.log_dir.join(format!("{name}.log"));
        loop {
            if http.get(&ready_url).send().await.is_ok_and(|r| r.status().is_success()) {
                return Ok(());
            }
            let exited = self.services.get_mut(name).and_then(|s| s.child.try_wait().ok().flatten());
            if let Some(status) = exited {
                anyhow::bail!("clinflow-{name} exited at start-up ({status}); see {}", log.display());
            }
            anyhow::ensure!(Instant::now() < deadline, "clinflow-{name} was not ready within 60 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, then wait for the exit (SIGKILL after 30 s).
    pub async fn stop(&mut self, name: &str) -> anyhow::Result<()> {
        let Some(mut service) = self.services.remove(name) else { return Ok(()) };
        if let Some(pid) = service.child.id() {
            let _ = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
        }
        match tokio::time::timeout(Duration::from_secs(30), service.child.wait()).await {
            Ok(status) => {
                status?;
            }
            Err(_) => service.child.kill().await?,
        }
        Ok(())
    }

    pub async fn stop_all(&mut self) {
        let names: Vec<&'static str> = self.services.keys().copied().collect();
        for name in names {
            if let Err(e) = self.stop(name).await {
                eprintln!("stopping {name}: {e:#}");
            }
        }
    }

    pub fn service(&self, name: &str) -> Option<&Service> {
        self.services.get(name)
    }

    pub fn pids(&self) -> Vec<(&'static str, u32)> {
        self.services.iter().filter_map(|(n, s)| Some((*n, s.child.id()?))).collect()
    }

    /// The services' blind-index key, as the api reads CLINFLOW_INDEX_KEY
    /// (the bytes of the string).
    pub fn index_key(&self) -> IndexKey {
        let key = self.env.get("CLINFLOW_INDEX_KEY").map(|k| k.as_bytes().to_vec()).unwrap_or_default();
        IndexKey::new(SecretBox::new(Box::new(key)))
    }

    /// The services' keyring: CLINFLOW_MASTER_KEY holds one key, without an
    /// id, which `clinflow::config::master_keys` makes KEK "1".
    pub fn keyring(&self) -> anyhow::Result<Keyring> {
        let encoded = self.env.get("CLINFLOW_MASTER_KEY").context("no CLINFLOW_MASTER_KEY")?;
        let bytes = base64::engine::general_purpose::STANDARD.decode(encoded)?;
        let key: [u8; 32] = bytes.as_slice().try_into().context("CLINFLOW_MASTER_KEY is not 32 bytes")?;
        Ok(Keyring::from_master_key(&SecretBox::new(Box::new(key))))
    }

    /// Creates a user through `clinflow-api create-user`, as an operator would.
    pub async fn create_user(&self, username: &str, role: &str, password: &str) -> anyhow::Result<()> {
        // Uploaders' notes are held for direct care (their account's basis).
        let basis: &[&str] = if role == "ingest" { &["--lawful-basis", "direct_care"] } else { &[] };
        let mut child = Command::new(self.bin_dir.join("clinflow-api"))
            .envs(&self.env)
            .args(["create-user", "--username", username, "--role", role, "--if-not-exists"])
            .args(basis)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(format!("{password}\n").as_bytes()).await?;
        }
        anyhow::ensure!(child.wait().await?.success(), "clinflow-api create-user {username} failed");
        Ok(())
    }
}

/// A fresh Ed25519 key per service in `dir` (`<name>.key`), and their
/// public keys in `dir/public` (`<name>.pem`); returns the worker's.
fn audit_keys(dir: &std::path::Path) -> anyhow::Result<clinflow::audit::Signer> {
    std::fs::create_dir_all(dir.join("public"))?;
    let mut worker = None;
    for name in [API, WORKER, SINK] {
        let signer = clinflow::audit::Signer::generate(name);
        std::fs::write(dir.join(format!("{name}.key")), signer.private_pem()?.as_bytes())?;
        std::fs::write(dir.join("public").join(format!("{name}.pem")), signer.public_pem()?)?;
        if name == WORKER {
            worker = Some(signer);
        }
    }
    worker.context("no worker key")
}

fn free_addr() -> anyhow::Result<String> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.to_string())
}

/// CPU seconds (user + system) a process has used so far.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / clock_ticks())
}

fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// Peak resident set size (VmHWM) of a live process, in MiB.
pub fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// CPU seconds used so far by every live process whose command name is one
/// of `names` (PostgreSQL backends, the RabbitMQ VM, MedCAT's python).
pub fn cpu_seconds_of(names: &[&str]) -> f64 {
    pids_of(names).into_iter().filter_map(cpu_seconds).sum()
}

/// Seconds the threads of `pids` have spent runnable but waiting for a CPU
/// (the second field of `/proc/<pid>/task/*/schedstat`).
pub fn cpu_wait_seconds(pids: &[u32]) -> f64 {
    let wait_ns = |pid: u32| -> u64 {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0 };
        tasks
            .filter_map(Result::ok)
            .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
            .filter_map(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum()
    };
    pids.iter().copied().map(wait_ns).sum::<u64>() as f64 / 1e9
}

pub fn pids_of(names: &[&str]) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| names.contains(&c.trim())))
        .collect()
}

pub fn machine() -> serde_json::Value {
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().find(|l| l.starts_with("MemTotal:")).map(str::to_owned))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()))
        .unwrap_or(0);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| c.lines().find(|l| l.starts_with("model name")).map(str::to_owned))
        .and_then(|l| l.split_once(':').map(|(_, v)| v.trim().to_owned()))
        .unwrap_or_default();
    let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default().trim().to_owned();
    serde_json::json!({"nproc": cores, "mem_gib": (mem_kib as f64 / 1048576.0 * 10.0).round() / 10.0, "cpu": cpu, "host": host})
}
