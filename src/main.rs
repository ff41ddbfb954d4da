use clap::Parser;
use sensorhub::cli::{self, Cli};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    cli::init_tracing(cli.log_format);
    match cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line: what failed and, from the context chain, why.
            tracing::error!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
