use std::process::ExitCode;

use clap::Parser;
use clinflow_audit_sink::SERVICE_NAME;
use clinflow_audit_sink::cli::{self, Cli};

#[tokio::main]
async fn main() -> ExitCode {
    clinflow::telemetry::init_tracing();
    match cli::run(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{SERVICE_NAME}: {e:#}");
            ExitCode::FAILURE
        }
    }
}
