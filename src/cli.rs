//! The command line: `sensorhub [serve]`, `sensorhub simulate`, and how logs are written.

use std::io::IsTerminal as _;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use crate::app::Application;
use crate::config::{ServeArgs, Settings};
use crate::simulator::{self, SimulatorConfig};

#[derive(Debug, Parser)]
#[command(
    name = "sensorhub",
    version,
    about = "MQTT sensor readings in, queryable history out: embedded broker, MongoDB, Redis, HTTP API.",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// `serve` is the default: its flags work without the subcommand too.
    #[command(flatten)]
    pub serve: ServeArgs,
    /// Log format.
    #[arg(long, env = "SENSORHUB_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the broker, the ingest pipeline and the HTTP API (the default).
    Serve(Box<ServeArgs>),
    /// Publish simulated temperature and humidity readings to a broker until Ctrl-C.
    Simulate(SimulateArgs),
}

#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// Broker address.
    #[arg(
        long,
        env = "SENSORHUB_SIMULATE_MQTT",
        default_value = "127.0.0.1:1883"
    )]
    pub mqtt: String,
    /// Sensors of each kind (temperature and humidity).
    #[arg(long, default_value_t = 5)]
    pub sensors: usize,
    /// Milliseconds between two readings of one sensor.
    #[arg(long, default_value_t = 1000)]
    pub interval_ms: u64,
    /// MQTT client id [default: random]
    #[arg(long)]
    pub client_id: Option<String>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Structured logs on stderr; `RUST_LOG` overrides the default filter.
pub fn init_tracing(format: LogFormat) {
    // rumqttd logs every ordinary disconnect at ERROR; its real failures reach us as errors.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,rumqttd=off,poem=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

/// Runs the chosen command to completion.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        None => serve(cli.serve).await,
        Some(Command::Serve(args)) => serve(*args).await,
        Some(Command::Simulate(args)) => simulate(args).await,
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let settings = Settings::load(&args)?;
    let app = Application::build(settings).await?;
    app.run_until_stopped(shutdown_signal()).await
}

async fn simulate(args: SimulateArgs) -> anyhow::Result<()> {
    let (host, port) = args
        .mqtt
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.to_owned(), p.parse::<u16>().ok()?)))
        .with_context(|| format!("--mqtt '{}' is not HOST:PORT", args.mqtt))?;
    anyhow::ensure!(args.sensors > 0, "--sensors must be at least 1");
    anyhow::ensure!(args.interval_ms > 0, "--interval-ms must be at least 1");
    let stop = CancellationToken::new();
    let config = SimulatorConfig {
        host,
        port,
        sensors: args.sensors,
        interval: Duration::from_millis(args.interval_ms),
        client_id: args
            .client_id
            .unwrap_or_else(|| format!("sensorhub-simulator-{:08x}", rand::random::<u32>())),
    };
    let run = tokio::spawn(simulator::run(config, stop.clone()));
    shutdown_signal().await;
    stop.cancel();
    run.await.context("the simulator panicked")?
}
