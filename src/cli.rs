//! The command line: `sensorhub [serve]`, `sensorhub simulate`, `sensorhub passwd`,
//! `sensorhub apikey`, and how logs are written.

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use crate::app::Application;
use crate::auth::{self, CredentialsFile, DeviceEntry};
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
    /// Publish simulated temperature and humidity readings to a broker until Ctrl-C (with
    /// --sparkplug, as a Sparkplug B edge node).
    Simulate(SimulateArgs),
    /// Add or replace an MQTT credential in a credentials file (created if missing). The
    /// password is read from stdin, one line; only its Argon2id hash is stored.
    Passwd(PasswdArgs),
    /// Create or replace an HTTP API key in a key file (created if missing) and print it, once,
    /// on stdout; only its hash is stored. A running sensorhub picks it up on SIGHUP.
    Apikey(ApikeyArgs),
    /// Work with the settings of `serve`.
    #[command(subcommand)]
    Config(ConfigCommand),
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate the settings `serve` would run with (the file, then the environment and the
    /// flags over it) and print them as TOML, passwords masked. Exits 1 naming the first bad
    /// key.
    Check(Box<ServeArgs>),
}

#[derive(Debug, Args)]
pub struct PasswdArgs {
    /// The credentials file (`--mqtt-auth` of `serve`).
    pub file: PathBuf,
    /// The user name (and the common name of the device's client certificate, if it has one).
    pub user: String,
    /// Sensor ids it may publish readings for; `*` matches any characters (`plant3/*`).
    #[arg(long = "allow", value_name = "PATTERN", num_args = 1..)]
    pub allow: Vec<String>,
    /// Topic filters it may subscribe within (`sensors/#`); none unless given.
    #[arg(long = "subscribe", value_name = "FILTER", num_args = 1..)]
    pub subscribe: Vec<String>,
    /// No password: the device logs in with a client certificate only.
    #[arg(long, conflicts_with = "delete")]
    pub no_password: bool,
    /// Remove the user's credential instead.
    #[arg(long, conflicts_with_all = ["allow", "subscribe"])]
    pub delete: bool,
}

#[derive(Debug, Args)]
pub struct ApikeyArgs {
    /// The key file (`--api-keys` of `serve`).
    pub file: PathBuf,
    /// The key's name, to tell keys apart (and replace or delete one).
    pub name: String,
    /// read: every GET data endpoint; admin: also deleting readings and replaying dead letters.
    #[arg(long, value_enum, required_unless_present = "delete")]
    pub role: Option<RoleArg>,
    /// Remove the named key instead.
    #[arg(long, conflicts_with = "role")]
    pub delete: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum RoleArg {
    Read,
    Admin,
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
    /// Sensors of each kind (temperature and humidity); with --sparkplug, devices.
    #[arg(long, default_value_t = 5)]
    pub sensors: usize,
    /// Milliseconds between two readings of one sensor.
    #[arg(long, default_value_t = 1000)]
    pub interval_ms: u64,
    /// MQTT client id [default: random]
    #[arg(long)]
    pub client_id: Option<String>,
    /// Be a Sparkplug B edge node instead: group `sensorhub`, `--sensors` devices, births,
    /// data by exception, rebirth on request, NDEATH on Ctrl-C
    #[arg(long)]
    pub sparkplug: bool,
    /// The Sparkplug edge node's id
    #[arg(long, default_value = "sim-edge", requires = "sparkplug")]
    pub sparkplug_node: String,
    /// MQTT user name, when the broker asks for credentials
    #[arg(long, env = "SENSORHUB_SIMULATE_USERNAME")]
    pub username: Option<String>,
    /// MQTT password (prefer the environment variable or the file: flags show in `ps`)
    #[arg(long, env = "SENSORHUB_SIMULATE_PASSWORD", requires = "username")]
    pub password: Option<String>,
    /// File holding the MQTT password (a Docker secret); SENSORHUB_SIMULATE_PASSWORD wins
    #[arg(
        long,
        env = "SENSORHUB_SIMULATE_PASSWORD_FILE",
        value_name = "FILE",
        requires = "username"
    )]
    pub password_file: Option<PathBuf>,
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
        Some(Command::Passwd(args)) => passwd(args),
        Some(Command::Apikey(args)) => apikey(&args),
        Some(Command::Config(ConfigCommand::Check(args))) => config_check(&args),
    }
}

/// `sensorhub config check`: the settings `serve` would use, validated, on stdout.
fn config_check(args: &ServeArgs) -> anyhow::Result<()> {
    use std::io::Write as _;
    let settings = Settings::load(args)?;
    // The broker's own file is part of what `serve` reads at start.
    crate::broker::load_config(
        &settings.broker_config,
        settings.broker_config != Settings::default().broker_config,
        &crate::broker::ListenOverrides {
            mqtt: settings.mqtt_listen,
            mqtt5: settings.mqtt5_listen,
        },
    )?;
    if let Some(path) = &settings.mqtt_auth {
        auth::Gatekeeper::from_file(path, settings.mqtt_allow_anonymous, Vec::new())
            .context("cannot load the MQTT credentials (mqtt_auth)")?;
    }
    if let Some(path) = &settings.api_keys {
        auth::ApiKeys::from_file(path).context("cannot load the HTTP API keys (api_keys)")?;
    }
    if let Some(files) = settings.tls_files()? {
        crate::tls::Certificates::load(files).context("cannot load the TLS certificate")?;
    }
    let source = match &args.config {
        Some(path) => path.display().to_string(),
        None if std::path::Path::new("sensorhub.toml").exists() => "sensorhub.toml".to_owned(),
        None => "no file (defaults)".to_owned(),
    };
    let text = settings.masked().to_toml()?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "# Valid. Effective settings from {source}, the environment and the flags \
         (passwords masked):\n{text}"
    )
    .and_then(|()| out.flush())
    .context("cannot write to stdout")
}

fn passwd(args: PasswdArgs) -> anyhow::Result<()> {
    auth::check_user(&args.user).map_err(anyhow::Error::msg)?;
    let mut file = CredentialsFile::read_raw(&args.file)?;
    if args.delete {
        anyhow::ensure!(
            file.remove(&args.user),
            "{} has no credential for '{}'",
            args.file.display(),
            args.user
        );
        file.save(&args.file)?;
        tracing::info!(user = %args.user, file = %args.file.display(), "credential removed");
        return Ok(());
    }
    anyhow::ensure!(
        !args.allow.is_empty() || !args.subscribe.is_empty(),
        "say what '{}' may do: --allow PATTERN (sensor ids) and/or --subscribe FILTER",
        args.user
    );
    for pattern in &args.allow {
        auth::SensorPattern::parse(pattern).map_err(anyhow::Error::msg)?;
    }
    for filter in &args.subscribe {
        auth::FilterPattern::parse(filter).map_err(anyhow::Error::msg)?;
    }
    let password_hash = if args.no_password {
        None
    } else {
        let password = read_password()?;
        anyhow::ensure!(!password.is_empty(), "the password is empty");
        Some(auth::hash_password(&password)?)
    };
    file.upsert(DeviceEntry {
        user: args.user.clone(),
        password_hash,
        publish: args.allow,
        subscribe: args.subscribe,
    });
    file.save(&args.file)?;
    tracing::info!(
        user = %args.user,
        file = %args.file.display(),
        "credential saved; a running sensorhub picks it up on SIGHUP"
    );
    Ok(())
}

/// `sensorhub apikey`: the new key goes to stdout, once; the file keeps its hash.
fn apikey(args: &ApikeyArgs) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut file = auth::KeyFile::read_or_new(&args.file)?;
    if args.delete {
        let before = file.keys.len();
        file.keys.retain(|k| k.name != args.name);
        anyhow::ensure!(
            file.keys.len() != before,
            "{} has no key named '{}'",
            args.file.display(),
            args.name
        );
        file.save(&args.file)?;
        tracing::info!(name = %args.name, file = %args.file.display(), "API key removed");
        return Ok(());
    }
    let role = match args.role {
        Some(RoleArg::Admin) => auth::Role::Admin,
        Some(RoleArg::Read) | None => auth::Role::Read,
    };
    let key = file.issue(&args.name, role).map_err(anyhow::Error::msg)?;
    file.save(&args.file)?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{key}")
        .and_then(|()| out.flush())
        .context("cannot write the key to stdout")?;
    tracing::info!(
        name = %args.name,
        role = role.name(),
        file = %args.file.display(),
        "API key saved (shown once, above); a running sensorhub picks it up on SIGHUP"
    );
    Ok(())
}

/// One line from stdin, without its line end. On a terminal, asks for it without echo.
fn read_password() -> anyhow::Result<String> {
    use std::io::{BufRead as _, Write as _};
    let stdin = std::io::stdin();
    let terminal = stdin.is_terminal();
    let stty = |arg: &str| {
        std::process::Command::new("stty")
            .arg(arg)
            .stdin(std::process::Stdio::inherit())
            .status()
            .is_ok_and(|s| s.success())
    };
    let silenced = terminal && {
        let _ = write!(std::io::stderr(), "Password: ");
        let _ = std::io::stderr().flush();
        stty("-echo")
    };
    let mut line = String::new();
    let read = stdin.lock().read_line(&mut line);
    if silenced {
        stty("echo");
        let _ = writeln!(std::io::stderr());
    }
    read.context("cannot read the password from stdin")?;
    Ok(line.trim_end_matches(['\r', '\n']).to_owned())
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
    let password = match (args.password, &args.password_file) {
        (Some(password), _) => Some(password),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path).with_context(|| {
                format!(
                    "cannot read the simulator's password from {}",
                    path.display()
                )
            })?;
            Some(text.trim_end_matches(['\r', '\n']).to_owned())
        }
        (None, None) => None,
    };
    anyhow::ensure!(
        args.username.is_none() || password.is_some(),
        "--username needs --password, SENSORHUB_SIMULATE_PASSWORD or \
         SENSORHUB_SIMULATE_PASSWORD_FILE"
    );
    let stop = CancellationToken::new();
    if args.sparkplug {
        let config = simulator::sparkplug::SparkplugConfig {
            host,
            port,
            node: args.sparkplug_node,
            devices: args.sensors,
            interval: Duration::from_millis(args.interval_ms),
            credentials: args.username.zip(password),
        };
        let run = tokio::spawn(simulator::sparkplug::run(config, stop.clone()));
        shutdown_signal().await;
        stop.cancel();
        return run.await.context("the simulator panicked")?;
    }
    let config = SimulatorConfig {
        host,
        port,
        sensors: args.sensors,
        interval: Duration::from_millis(args.interval_ms),
        client_id: args
            .client_id
            .unwrap_or_else(|| format!("sensorhub-simulator-{:08x}", rand::random::<u32>())),
        credentials: args.username.zip(password),
    };
    let run = tokio::spawn(simulator::run(config, stop.clone()));
    shutdown_signal().await;
    stop.cancel();
    run.await.context("the simulator panicked")?
}
