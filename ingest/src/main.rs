use std::io::{IsTerminal, stderr};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;

use clinflow_ingest::cli::{ApiArgs, Cli, Command, LoadArgs, WaitArgs};
use clinflow_ingest::client::{ApiClient, ClientConfig, RetryPolicy};
use clinflow_ingest::progress::Progress;
use clinflow_ingest::telemetry::{self, LogSink};
use clinflow_ingest::{credentials, load, wait};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let logs = LogSink::default();
    telemetry::init(logs.clone());
    let shutdown = clinflow::shutdown::on_signal();
    let result = match cli.command {
        Command::Load(args) => run_load(args, &logs, &shutdown).await,
        Command::Wait(args) => run_wait(args, &logs, &shutdown).await,
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(error) => {
            eprintln!("clinflow-ingest: error: {error:#}");
            ExitCode::FAILURE
        }
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
    })?;
    client.login(shutdown).await.with_context(|| format!("cannot log in to {} as {username}", api.api_url))?;
    Ok(client)
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
