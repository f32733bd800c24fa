use std::process::ExitCode;

use clap::Parser;
use clinflow_api::cli::{self, Cli};

#[tokio::main]
async fn main() -> ExitCode {
    clinflow::telemetry::init_tracing();
    clinflow::tls::install_crypto_provider();
    clinflow::telemetry::exit_code("clinflow-api", cli::run(Cli::parse()).await)
}
