use std::process::ExitCode;

use clap::Parser;
use clinflow_worker::SERVICE_NAME;
use clinflow_worker::cli::{self, Cli};

#[tokio::main]
async fn main() -> ExitCode {
    clinflow::telemetry::service_main(SERVICE_NAME, || cli::run(Cli::parse())).await
}
