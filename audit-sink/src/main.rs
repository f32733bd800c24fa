use std::process::ExitCode;

use clap::Parser;
use clinflow_audit_sink::SERVICE_NAME;
use clinflow_audit_sink::cli::{self, Cli};

#[tokio::main]
async fn main() -> ExitCode {
    clinflow::telemetry::init_tracing();
    clinflow::tls::install_crypto_provider();
    clinflow::telemetry::log_panics_without_their_message();
    clinflow::telemetry::exit_code(SERVICE_NAME, cli::run(Cli::parse()).await)
}
