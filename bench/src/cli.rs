//! The harness's flags (`./bench/run` passes them).

use std::path::PathBuf;

use clap::{Parser, ValueEnum};
use serde::Serialize;

#[derive(Parser)]
#[command(about = "clinflow benchmark harness; run it through ./bench/run")]
pub struct Cli {
    #[arg(value_enum)]
    pub mode: Mode,
    /// The real MedCAT (medcat-service contract) to compare against.
    #[arg(long)]
    pub medcat_url: String,
    /// Its process: with it, each ratio round is measured a second time with
    /// MedCAT alone on core 0 (see `pin`).
    #[arg(long)]
    pub medcat_pid: Option<u32>,
    /// Where the clinflow-api, -worker and -audit-sink binaries are.
    #[arg(long)]
    pub bin_dir: PathBuf,
    #[arg(long)]
    pub results_dir: PathBuf,
    /// Where the services' logs go.
    #[arg(long)]
    pub log_dir: PathBuf,
    #[arg(long)]
    pub concepts: PathBuf,
    /// A PostgreSQL superuser on the maintenance database.
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    pub admin_url: String,
    /// The broker, plaintext: the harness's own connection, and the
    /// services' with `--hops plain`.
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    pub amqp_url: String,
    /// The broker over TLS (`amqps://…?cacertfile=…`): the services' with
    /// `--hops tls` or `both`.
    #[arg(long)]
    pub amqp_tls_url: Option<String>,
    /// The CA the servers' certificates are signed by (PostgreSQL's
    /// `sslrootcert`; MedCAT, the api and the stand-in are verified against
    /// it too).
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// The certificate and key the api and the stand-in serve HTTPS with.
    #[arg(long)]
    pub tls_cert: Option<PathBuf>,
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
    /// How the services' connections are carried: `both` measures the ratio
    /// rounds and the ceiling with TLS and with plaintext hops, alternated,
    /// and everything else with TLS.
    #[arg(long, value_enum, default_value = "both")]
    pub hops: HopsArg,
    /// The bench's own database (dropped and created afresh) and queue
    /// prefix; another name lets two runs share a machine.
    #[arg(long, default_value = "clinflow_bench", value_parser = plain_name)]
    pub database: String,
    #[arg(long, default_value = "clinflow-bench", value_parser = plain_name)]
    pub queue_prefix: String,
    /// Leave the database in place at the end (to inspect plans on the
    /// loaded data); the next run drops it.
    #[arg(long)]
    pub keep_database: bool,
    /// Documents queued for the backlog drain (full mode).
    #[arg(long)]
    pub backlog: Option<usize>,
    /// Documents bulk-loaded for the clinician queries (0 skips them).
    #[arg(long)]
    pub query_docs: Option<usize>,
    /// Requests per second each clinician client sends in the paced query runs.
    #[arg(long)]
    pub query_rate: Option<f64>,
    /// Run this phase alone.
    #[arg(long, value_enum)]
    pub only: Option<Only>,
    /// Recorded with the results: the cargo profile the binaries were built with.
    #[arg(long, default_value = "release")]
    pub profile: String,
}

#[derive(Debug, Clone, Copy, ValueEnum, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// A few hundred documents, for CI: proves the harness runs, asserts nothing.
    Tiny,
    /// Every phase at its smaller size (about 12 minutes here).
    Quick,
    /// Larger runs and the 1,000,000-document backlog drain.
    Full,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum HopsArg {
    /// TLS on every hop; the ratio and ceiling also with plaintext hops.
    Both,
    /// TLS on every hop only.
    Tls,
    /// Plaintext database and broker hops, plain HTTP to the api and the
    /// stand-in (`CLINFLOW_ALLOW_PLAINTEXT=1`) only.
    Plain,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Only {
    /// The clinician queries over bulk-loaded documents.
    Queries,
    /// The warm-up and the ratio rounds.
    Ratio,
    /// The ceiling runs with the NLP stand-in (and the CPU per document).
    Ceiling,
    /// The single uploads with the NLP stand-in: the paced latency run
    /// (each slow second attributed) and the saturation run.
    Uploads,
    /// The audit sink alone, draining pre-filled events.
    Sink,
    /// The clinician queries' data, then the privacy phase: disclosure
    /// lookups among many audit rows, a purge under uploads.
    Privacy,
}

/// A database name or queue prefix: lowercase letters, digits, `_` and `-`
/// (the database name is put into SQL as is).
fn plain_name(s: &str) -> Result<String, String> {
    let ok = !s.is_empty() && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if ok { Ok(s.to_owned()) } else { Err("use lowercase letters, digits, _ and -".into()) }
}
