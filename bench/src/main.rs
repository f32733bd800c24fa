use std::process::ExitCode;

use clap::Parser;
use clinflow_bench::cli::Cli;

#[tokio::main]
async fn main() -> ExitCode {
    clinflow::tls::install_crypto_provider();
    clinflow::telemetry::exit_code("clinflow-bench", clinflow_bench::run(Cli::parse()).await)
}
