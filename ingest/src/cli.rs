//! Command-line interface. Every option can be given as a flag; the API
//! location and user also from the environment. The password never is a flag.
//! [`run`] runs a command: logs in, shows progress around [`load::run`] or
//! [`wait::run`], prints the summary and chooses the exit status.

use std::io::{IsTerminal, stderr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use reqwest::Url;
use tokio_util::sync::CancellationToken;

use crate::client::{ApiClient, ClientConfig, RetryPolicy};
use crate::credentials;
use crate::load::{self, LoadOptions};
use crate::progress::Progress;
use crate::telemetry::LogSink;
use crate::wait::{self, WaitOptions};

#[derive(Debug, Parser)]
#[command(
    name = "clinflow-ingest",
    version,
    about = "Uploads clinical notes to the clinflow API and waits for their coded concepts"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Upload notes from folders of .txt files, .jsonl/.ndjson or .csv files
    Load(LoadArgs),
    /// Wait until the uploaded documents are processed, and count how they ended
    Wait(WaitArgs),
}

const PASSWORD_HELP: &str = "The password is read from CLINFLOW_PASSWORD, or else from one line of standard\n\
input (prompted without echo on a terminal). A service account uses its API key instead:\n\
set CLINFLOW_API_KEY (never a flag, which would show in ps and shell history). Logs go to stderr (filter with RUST_LOG);\n\
they name document ids and counts, never note text or patient_refs.";

#[derive(Debug, Args)]
pub struct ApiArgs {
    /// Base URL of the clinflow API
    #[arg(long, env = "CLINFLOW_API_URL", default_value = "http://127.0.0.1:8080", value_parser = parse_api_url)]
    pub api_url: Url,
    /// PEM file of the CA that signed an https:// API's certificate (else the system's roots)
    #[arg(long, value_name = "FILE", env = "CLINFLOW_API_CA_FILE")]
    pub api_ca_file: Option<PathBuf>,
    /// User to log in as (not needed with an API key in CLINFLOW_API_KEY)
    #[arg(long, env = "CLINFLOW_USERNAME")]
    pub username: Option<String>,
    /// Seconds before one HTTP request is given up (then retried)
    #[arg(long, value_name = "SECONDS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub request_timeout: u64,
}

#[derive(Debug, Args)]
#[command(after_help = format!("{PASSWORD_HELP}\n\n\
Each INPUT is a folder (every *.txt below it, in path order, each starting with a\n\
front-matter block: ---, patient_ref: ..., document_date: YYYY-MM-DD, ---), a\n\
.jsonl/.ndjson file (one object per line: patient_ref, text, source_ref?, document_date?)\n\
or a .csv file with a header row (patient_ref, text, source_ref?, document_date?).\n\
Default source_ref: the file's absolute path, <absolute file>:<line> for JSON Lines,\n\
<absolute file>:<record> for CSV. The API keeps source_refs per account (as a keyed\n\
hash): sending one again answers `duplicate` with the first upload's id.\n\n\
The summary accounts for every record read: skipped (in the state file), rejected\n\
before sending, or sent = accepted + duplicate + rejected by the API (+ unanswered).\n\
While the API answers 429 (its backlog is full) the loader waits as it asks.\n\n\
Exit status: 0 when every record was accepted, duplicate, skipped or rejected; 1 when\n\
the run stopped early (rerun the same command to resume); 2 with --strict when records\n\
were rejected; 130 when interrupted."))]
pub struct LoadArgs {
    /// Folders, .jsonl/.ndjson or .csv files
    #[arg(required = true, value_name = "INPUT")]
    pub inputs: Vec<PathBuf>,
    #[command(flatten)]
    pub api: ApiArgs,
    /// Batch requests in flight at once
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub concurrency: u16,
    /// Most records per batch request
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub batch_lines: u32,
    /// Most MiB per batch request (a larger single note still goes, alone)
    #[arg(long, value_name = "MIB", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub batch_mib: u32,
    /// Resume file: one line per accepted upload; source_refs in it are skipped
    #[arg(long, value_name = "FILE", default_value = "./clinflow-ingest.state.jsonl")]
    pub state: PathBuf,
    /// Where rejected records are listed, with the reason (replaced each run)
    #[arg(long, value_name = "FILE", default_value = "./clinflow-ingest.rejects.jsonl")]
    pub rejects: PathBuf,
    /// Exit with status 2 if any record was rejected
    #[arg(long)]
    pub strict: bool,
    /// Put every patient loaded in this care team (by name; ingest accounts only)
    #[arg(long, value_name = "NAME")]
    pub care_team: Option<String>,
    /// No progress bar
    #[arg(short, long)]
    pub quiet: bool,
}

impl LoadArgs {
    pub fn options(&self) -> LoadOptions {
        LoadOptions {
            inputs: self.inputs.clone(),
            concurrency: usize::from(self.concurrency),
            batch_lines: self.batch_lines as usize,
            batch_bytes: self.batch_mib as usize * 1024 * 1024,
            state: self.state.clone(),
            rejects: self.rejects.clone(),
        }
    }
}

#[derive(Debug, Args)]
#[command(after_help = format!("{PASSWORD_HELP}\nThe user must be the one that loaded the documents (or an ops account).\n\
Only status, times and failure codes are read: no document content.\n\n\
Exit status: 0 when every document is done; 1 when any failed, is still pending at\n\
the timeout or is unknown to the API, or on an error."))]
pub struct WaitArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    /// State file written by `load`
    #[arg(long, value_name = "FILE", default_value = "./clinflow-ingest.state.jsonl")]
    pub state: PathBuf,
    /// Status requests (of up to 1,000 ids each) in flight at once
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub concurrency: u16,
    /// Seconds to wait in all before giving up on pending documents
    #[arg(long, value_name = "SECONDS", default_value_t = 300)]
    pub timeout: u64,
    /// Seconds between rounds of status requests
    #[arg(long, value_name = "SECONDS", default_value_t = 2.0)]
    pub poll_interval: f64,
    /// Print the summary as JSON
    #[arg(long)]
    pub json: bool,
    /// No progress bar
    #[arg(short, long)]
    pub quiet: bool,
}

impl WaitArgs {
    pub fn options(&self) -> WaitOptions {
        WaitOptions {
            state: self.state.clone(),
            concurrency: usize::from(self.concurrency),
            timeout: Duration::from_secs(self.timeout),
            poll_interval: Duration::try_from_secs_f64(self.poll_interval).unwrap_or(Duration::from_secs(2)),
        }
    }
}

fn parse_api_url(value: &str) -> Result<Url, String> {
    let url = Url::parse(value).map_err(|e| e.to_string())?;
    if !["http", "https"].contains(&url.scheme()) {
        return Err("expected an https:// (or http://) URL".into());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("expected a base URL without ?query or #fragment".into());
    }
    Ok(url)
}

/// Runs `command`; returns the exit status (see each command's help).
pub async fn run(command: Command, logs: &LogSink, shutdown: &CancellationToken) -> anyhow::Result<u8> {
    match command {
        Command::Load(args) => run_load(args, logs, shutdown).await,
        Command::Wait(args) => run_wait(args, logs, shutdown).await,
    }
}

async fn connect(api: &ApiArgs, care_team: Option<String>, shutdown: &CancellationToken) -> anyhow::Result<ApiClient> {
    let api_key = credentials::api_key();
    let (username, password) = match (&api_key, &api.username) {
        (Some(_), name) => (name.clone().unwrap_or_else(|| "(API key)".into()), secrecy::SecretString::from("")),
        (None, Some(name)) => (name.clone(), credentials::read_password()?),
        (None, None) => anyhow::bail!("give --username (or CLINFLOW_USERNAME), or an API key in CLINFLOW_API_KEY"),
    };
    let client = ApiClient::new(ClientConfig {
        base_url: api.api_url.clone(),
        username: username.clone(),
        password,
        api_key,
        care_team,
        retry: RetryPolicy::default(),
        timeout: Duration::from_secs(api.request_timeout),
        ca_certs: api.api_ca_file.as_deref().map(ca_certs).transpose()?.unwrap_or_default(),
    })?;
    client.login(shutdown).await.with_context(|| format!("cannot log in to {} as {username}", api.api_url))?;
    Ok(client)
}

/// The certificates of the CA file `--api-ca-file` (`CLINFLOW_API_CA_FILE`) names.
fn ca_certs(path: &std::path::Path) -> anyhow::Result<Vec<reqwest::Certificate>> {
    let what = || format!("--api-ca-file (CLINFLOW_API_CA_FILE) {path:?}");
    let pem = std::fs::read(path).with_context(what)?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem).with_context(what)?;
    anyhow::ensure!(!certs.is_empty(), "{}: holds no PEM certificate", what());
    Ok(certs)
}

fn progress(quiet: bool, logs: &LogSink) -> Progress {
    let progress = Progress::new(!quiet && stderr().is_terminal());
    logs.attach(progress.bar());
    progress
}

async fn run_load(args: LoadArgs, logs: &LogSink, shutdown: &CancellationToken) -> anyhow::Result<u8> {
    let client = connect(&args.api, args.care_team.clone(), shutdown).await?;
    let progress = progress(args.quiet, logs);
    let report = load::run(&args.options(), &client, &progress, shutdown).await;
    progress.finish();
    logs.detach();
    let report = report?;

    println!("{report}");
    let rejected = report.counts.rejected_here + report.counts.rejected_by_api;
    if rejected > 0 {
        eprintln!("{rejected} record(s) rejected; reasons in {}", args.rejects.display());
    }
    if let Some(stop) = &report.stop {
        eprintln!("clinflow-ingest: stopped early ({stop}). Run the same command again to resume.");
    }
    Ok(report.exit_code(args.strict))
}

async fn run_wait(args: WaitArgs, logs: &LogSink, shutdown: &CancellationToken) -> anyhow::Result<u8> {
    let client = connect(&args.api, None, shutdown).await?;
    let progress = progress(args.quiet || args.json, logs);
    let summary = wait::run(&args.options(), &client, &progress, shutdown).await;
    progress.finish();
    logs.detach();
    let summary = summary?;

    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        print!("{summary}");
    }
    if summary.pending > 0 {
        eprintln!("clinflow-ingest: {} document(s) still pending after {}s", summary.pending, args.timeout);
    }
    Ok(if summary.all_done() { 0 } else { 1 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn load_defaults() {
        let cli = Cli::try_parse_from(["clinflow-ingest", "load", "--username", "u", "notes/"]).unwrap();
        let Command::Load(args) = cli.command else { panic!("expected load") };
        let options = args.options();
        assert_eq!(options.concurrency, 4);
        assert_eq!((options.batch_lines, options.batch_bytes), (500, 8 * 1024 * 1024));
        assert_eq!(options.state, PathBuf::from("./clinflow-ingest.state.jsonl"));
        assert_eq!(options.rejects, PathBuf::from("./clinflow-ingest.rejects.jsonl"));
        assert_eq!(args.api.api_url.as_str(), "http://127.0.0.1:8080/");
    }

    #[test]
    fn there_is_no_password_flag() {
        let parsed = Cli::try_parse_from(["clinflow-ingest", "load", "--username", "u", "--password", "p", "x"]);
        assert!(parsed.is_err());
    }

    #[test]
    fn rejects_bad_urls_and_concurrency() {
        for url in ["ftp://x", "https://x/?a=1", "http://x/?a=1"] {
            assert!(Cli::try_parse_from(["clinflow-ingest", "wait", "--username", "u", "--api-url", url]).is_err());
        }
        assert!(Cli::try_parse_from(["clinflow-ingest", "wait", "--username", "u", "--concurrency", "0"]).is_err());
        let https = ["clinflow-ingest", "wait", "--username", "u", "--api-url", "https://api.example:8443"];
        assert!(Cli::try_parse_from(https).is_ok());
    }

    #[test]
    fn a_ca_file_without_a_certificate_is_refused_naming_the_option() {
        let dir = crate::test_support::TempDir::new("ca-file");
        let empty = dir.write("ca.pem", "not a certificate\n");
        for path in [empty, dir.path().join("missing.pem")] {
            let err = format!("{:#}", ca_certs(&path).unwrap_err());
            assert!(err.starts_with("--api-ca-file (CLINFLOW_API_CA_FILE)"), "{err}");
        }
    }
}
