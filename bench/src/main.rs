use std::process::ExitCode;

use clap::Parser;
use clinflow_bench::cli::Cli;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match clinflow_bench::run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("clinflow-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
