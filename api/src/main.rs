use std::process::ExitCode;

use clap::Parser;
use clinflow_api::cli::{self, Cli};

#[tokio::main]
async fn main() -> ExitCode {
    clinflow::telemetry::init_tracing();
    match cli::run(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("clinflow-api: {e:#}");
            ExitCode::FAILURE
        }
    }
}
