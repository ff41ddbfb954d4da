//! `sensorhub-bench`: the end-to-end benchmark. `scripts/bench` builds it, starts a MongoDB
//! wire server and Redis, and runs it; BENCHMARKS.md says what each scenario measures.

// This binary is a report printer: its product is the table on stdout. Progress and problems go
// to stderr through tracing, like the service's logs.
#![allow(clippy::print_stdout)]

use clap::Parser as _;
use tracing_subscriber::EnvFilter;

use sensorhub_bench::Options;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let options = Options::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    match sensorhub_bench::run(options).await {
        Ok((report, failed)) => {
            println!("{}", report.render());
            if failed == 0 {
                std::process::ExitCode::SUCCESS
            } else {
                std::process::ExitCode::FAILURE
            }
        }
        Err(e) => {
            tracing::error!("benchmark could not run: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
