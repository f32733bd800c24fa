use std::process::ExitCode;

use clap::Parser;
use clinflow_ingest::cli::{self, Cli};
use clinflow_ingest::telemetry::{self, LogSink};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let logs = LogSink::default();
    telemetry::init(logs.clone());
    let shutdown = clinflow::shutdown::on_signal();
    match cli::run(cli.command, &logs, &shutdown).await {
        Ok(code) => ExitCode::from(code),
        Err(error) => {
            eprintln!("clinflow-ingest: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
