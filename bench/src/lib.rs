//! The end-to-end benchmark of sensorhub: MQTT clients over TCP at QoS 1, the embedded broker,
//! the local log, MongoDB and Redis, measured side by side with the database's own ceiling in
//! one run so the machine's noise cancels out of the ratios. A crate of its own
//! (`sensorhub-bench`), so the service's crate holds only the service: the binary (`main.rs`)
//! prints the report, and `sensorhub` is used only for its domain types and its `Store`
//! adapter, through which the ceiling inserts exactly the service's documents.
//!
//! # Layout
//!
//! - `env`: the services under test and the sensorhub processes, one per scenario;
//! - `load`: the fleet of sensors and the MQTT publishers;
//! - `client`, `wrk`: HTTP (one keep-alive connection; wrk for throughput) and a bare MQTT
//!   CONNECT;
//! - `procfs`: memory and CPU of processes, from `/proc`;
//! - one module per scenario: `ceiling`, `ingest`, `burst`, `latency`, `http`, `memory`,
//!   `outage`, `slowdisk`, `restart`, `startup`, `scaling`, `sparkplug`, `idle`, `queries`;
//! - `report`: the final table.
//!
//! It measures and reports; it never changes sensorhub's settings to flatter a number.

mod burst;
mod ceiling;
mod client;
mod env;
mod http;
mod idle;
mod ingest;
mod latency;
mod load;
mod memory;
mod outage;
mod procfs;
mod queries;
mod report;
mod restart;
mod scaling;
mod slowdisk;
mod sparkplug;
mod startup;
mod wrk;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

pub use report::Report;

use env::{Env, HubLog};
use load::Rate;

/// The targets, in one place.
mod targets {
    use std::time::Duration;

    /// Sensors publishing, round-robin over the connections.
    pub const SENSORS: usize = 1000;
    /// Publisher connections.
    pub const CONNECTIONS: usize = 4;
    /// Unacknowledged QoS 1 publishes per connection (rumqttd's `max_inflight_count` is 500).
    pub const INFLIGHT: u16 = 500;
    /// Sustained ingest, as a share of the store's own insert_many ceiling.
    pub const INGEST_SHARE_OF_CEILING: f64 = 0.85;
    /// Background ingest while latency is probed.
    pub const LATENCY_RATE: f64 = 20_000.0;
    /// p99 from publish to visible in `/latestten/{id}`.
    pub const LATENCY_P99: Duration = Duration::from_millis(250);
    /// Background ingest while HTTP is loaded.
    pub const HTTP_INGEST_RATE: f64 = 10_000.0;
    pub const LATEST_RPS: f64 = 20_000.0;
    pub const LATEST_P99: Duration = Duration::from_millis(5);
    pub const RANGE_RPS: f64 = 1_000.0;
    /// Readings one `/startoenddate` request returns.
    pub const RANGE_READINGS: usize = 1000;
    /// RSS limit, in bytes (MB = 10^6 bytes).
    pub const RSS_LIMIT: u64 = 150_000_000;
    /// The ingest target rate, at which memory is watched (about 60% of the ceiling here).
    pub const MEMORY_RATE: f64 = 40_000.0;
    /// RSS growth over the memory run (least-squares trend) that still counts as flat.
    pub const FLAT_GROWTH: u64 = 10_000_000;
    /// Ingest while MongoDB is out, and for how long it is out.
    pub const OUTAGE_RATE: f64 = 20_000.0;
    pub const OUTAGE: Duration = Duration::from_secs(60);
    /// From spawn to serving HTTP and MQTT.
    pub const STARTUP: Duration = Duration::from_secs(1);
    /// sensorhub processes started to measure start-up.
    pub const STARTUP_RUNS: usize = 5;
    /// Idle MQTT 3.1.1 connections held, and what each may cost in RSS, in bytes (issue 13).
    pub const IDLE_CONNECTIONS: usize = 10_000;
    pub const IDLE_BYTES: f64 = 5_000.0;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub enum Scenario {
    /// insert_many straight into the database: the reference.
    Ceiling,
    /// Sustained MQTT ingest, loss, duplicates, RSS.
    Ingest,
    /// 200,000 readings end to end against the store taking the same.
    Burst,
    /// Publish to visible in /latestten/{id}.
    Latency,
    /// /latestten/{id} and /startoenddate under wrk, while ingesting.
    Http,
    /// RSS over minutes at the ingest target.
    Memory,
    /// MongoDB frozen for a minute mid-stream: nothing lost.
    Outage,
    /// Every fdatasync delayed 300 ms (strace): the API stays fast, nothing acked is lost.
    Slowdisk,
    /// Restart on 600,000 readings of 60,000 sensors: Redis serves within 2 s; a flushed
    /// Redis is rebuilt in steps.
    Restart,
    /// Spawn to ready.
    Startup,
    /// 1, 2 and 3 instances on one shared subscription of an external broker.
    Scaling,
    /// Sparkplug B DDATA of 20 metrics against JSON readings, values stored/s.
    Sparkplug,
    /// RSS per idle MQTT connection (10,000 held), beside Mosquitto.
    Idle,
    /// Aggregate and export against MongoDB's own rate, /sensors and /latest p99 (issue 9).
    Queries,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Self::Ceiling => "ceiling",
            Self::Ingest => "ingest",
            Self::Burst => "burst",
            Self::Latency => "latency",
            Self::Http => "http",
            Self::Memory => "memory",
            Self::Outage => "outage",
            Self::Slowdisk => "slowdisk",
            Self::Restart => "restart",
            Self::Startup => "startup",
            Self::Scaling => "scaling",
            Self::Sparkplug => "sparkplug",
            Self::Idle => "idle",
            Self::Queries => "queries",
        }
    }
}

/// sensorhub-bench: the end-to-end benchmark (usually run through scripts/bench).
#[derive(Debug, Parser)]
#[command(name = "sensorhub-bench", version)]
pub struct Options {
    /// Short durations, for a smoke run of about two minutes.
    #[arg(long)]
    pub quick: bool,
    /// Only these scenarios (comma-separated). The ingest ratio needs `ceiling` too.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub only: Vec<Scenario>,
    /// Minutes of the memory scenario [default: 10, quick: 0.5].
    #[arg(long)]
    pub memory_minutes: Option<f64>,
    /// Readings/s of the memory scenario [default: 40,000, or 95% of the rate the ingest
    /// scenario sustained when that is lower].
    #[arg(long)]
    pub memory_rate: Option<f64>,
    /// Seconds of each cell of the ceiling sweep (4 batch sizes x 4 inserter counts)
    /// [default: 4, quick: 1].
    #[arg(long)]
    pub ceiling_secs: Option<u64>,
    /// Seconds of the measured ingest window [default: 60, quick: 15].
    #[arg(long)]
    pub ingest_secs: Option<u64>,
    /// Ingest publishing rate: `max` (as fast as acknowledgements allow) or readings/s.
    #[arg(long, default_value = "max", value_parser = parse_rate)]
    pub ingest_rate: Rate,
    /// With `--ingest-rate max`, publishers pause while more than this many acknowledged
    /// readings are not yet stored (0: never pause).
    #[arg(long, default_value_t = 100_000)]
    pub max_backlog: u64,
    /// MongoDB (wire server) the benchmark uses.
    #[arg(long, env = "MONGODB_URI")]
    pub mongodb_uri: String,
    /// Redis the benchmark uses.
    #[arg(long, env = "REDIS_URL")]
    pub redis_url: String,
    /// The sensorhub binary under test.
    #[arg(long, default_value = "target/release/sensorhub")]
    pub sensorhub: PathBuf,
    /// An extra flag for every `sensorhub serve` (repeatable), for experiments such as
    /// `--sensorhub-arg=--journal-fsync=never`. The report lists them.
    #[arg(long = "sensorhub-arg", allow_hyphen_values = true)]
    pub sensorhub_args: Vec<String>,
    /// Scratch directory for local logs and sensorhub's logs [default: a new temporary one].
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Process id of the MongoDB server, to report its CPU use.
    #[arg(long)]
    pub mongo_pid: Option<u32>,
    /// Process id of Redis, to report its CPU use.
    #[arg(long)]
    pub redis_pid: Option<u32>,
}

fn parse_rate(text: &str) -> Result<Rate, String> {
    if text == "max" {
        return Ok(Rate::Max);
    }
    match text.parse::<f64>() {
        Ok(rate) if rate > 0.0 && rate.is_finite() => Ok(Rate::PerSecond(rate)),
        _ => Err(format!("'{text}' is neither `max` nor a positive rate")),
    }
}

/// How long each scenario runs.
#[derive(Debug, Clone)]
pub struct Plan {
    pub quick: bool,
    /// Per cell of the ceiling sweep (batch size x inserters).
    pub ceiling: Duration,
    pub ingest_warmup: Duration,
    pub ingest_window: Duration,
    pub ingest_rate: Rate,
    pub max_backlog: u64,
    pub latency_probes: usize,
    pub http: Duration,
    pub memory: Duration,
    pub memory_rate: Option<f64>,
    /// Let background load settle before measuring.
    pub settle: Duration,
}

impl Plan {
    fn new(o: &Options) -> Self {
        let q = o.quick;
        let secs = Duration::from_secs;
        Self {
            quick: q,
            ceiling: secs(o.ceiling_secs.unwrap_or(if q { 1 } else { 4 }).max(1)),
            ingest_warmup: if q { secs(3) } else { secs(5) },
            ingest_window: secs(o.ingest_secs.unwrap_or(if q { 15 } else { 60 })),
            ingest_rate: o.ingest_rate,
            max_backlog: o.max_backlog,
            latency_probes: if q { 50 } else { 200 },
            http: if q { secs(5) } else { secs(20) },
            memory: Duration::from_secs_f64(
                60.0 * o.memory_minutes.unwrap_or(if q { 0.5 } else { 10.0 }),
            ),
            memory_rate: o.memory_rate,
            settle: if q { secs(2) } else { secs(5) },
        }
    }
}

/// What one scenario learned that a later one uses.
#[derive(Debug, Default)]
pub struct Findings {
    /// Best insert_many documents/s of the sweep.
    pub ceiling: Option<f64>,
    /// The best cell's (batch size, inserters).
    pub ceiling_config: Option<(usize, usize)>,
    /// The best cell's documents/s over as long as the ingest scenario runs.
    pub sustained_ceiling: Option<f64>,
    /// Stored readings/s through the whole path.
    pub ingest: Option<f64>,
}

/// Runs the chosen scenarios; a failed scenario becomes a row and a problem, not an abort.
pub async fn run(options: Options) -> anyhow::Result<(Report, usize)> {
    let plan = Plan::new(&options);
    let mut report = Report {
        facts: report::machine_facts(),
        ..Report::default()
    };
    let wrk_version = wrk::version().await;
    report.facts.push((
        "wrk".into(),
        wrk_version
            .clone()
            .unwrap_or_else(|| "not installed".into()),
    ));
    report.facts.push((
        "mode".into(),
        if plan.quick {
            "QUICK smoke run (short durations: not comparable with a full run)".into()
        } else {
            "full run".into()
        },
    ));
    if !options.sensorhub_args.is_empty() {
        report.facts.push((
            "extra sensorhub flags".into(),
            options.sensorhub_args.join(" "),
        ));
    }
    let work = match &options.work_dir {
        Some(dir) => dir.clone(),
        None => std::env::temp_dir().join(format!("sensorhub-bench-{}", std::process::id())),
    };
    let mut services = Vec::new();
    if let Some(pid) = options.mongo_pid {
        services.push(("secantusd-rs".to_owned(), pid));
    }
    if let Some(pid) = options.redis_pid {
        services.push(("redis".to_owned(), pid));
    }
    services.push(("bench client (and wrk)".to_owned(), std::process::id()));
    let env = Env::new(
        options.mongodb_uri.clone(),
        options.redis_url.clone(),
        options.sensorhub.clone(),
        options.sensorhub_args.clone(),
        work,
        services,
    )
    .await?;
    report
        .facts
        .push(("work directory".into(), env.work.display().to_string()));

    let mut selected = if options.only.is_empty() {
        vec![
            Scenario::Ceiling,
            Scenario::Ingest,
            Scenario::Burst,
            Scenario::Latency,
            Scenario::Http,
            Scenario::Memory,
            Scenario::Outage,
            Scenario::Slowdisk,
            Scenario::Restart,
            Scenario::Startup,
            Scenario::Scaling,
            Scenario::Sparkplug,
            Scenario::Idle,
            Scenario::Queries,
        ]
    } else {
        options.only.clone()
    };
    // Always in the same order: ingest right after the ceiling, memory after ingest.
    selected.sort();
    selected.dedup();

    let mut findings = Findings::default();
    let mut failed = 0;
    for scenario in selected {
        let name = scenario.name();
        tracing::info!(scenario = name, "scenario starting");
        let outcome = match scenario {
            Scenario::Ceiling => ceiling::run(&env, &plan, &mut findings, &mut report).await,
            Scenario::Ingest => ingest::run(&env, &plan, &mut findings, &mut report).await,
            Scenario::Burst => burst::run(&env, &plan, &findings, &mut report).await,
            Scenario::Latency => latency::run(&env, &plan, &mut report).await,
            Scenario::Http if wrk_version.is_none() => Err(anyhow::anyhow!(
                "wrk is not installed (Debian package `wrk`; scripts/bench installs it)"
            )),
            Scenario::Http => http::run(&env, &plan, &mut report).await,
            Scenario::Memory => memory::run(&env, &plan, &findings, &mut report).await,
            Scenario::Outage => outage::run(&env, &plan, &mut report).await,
            Scenario::Slowdisk => slowdisk::run(&env, &plan, &mut report).await,
            Scenario::Restart => restart::run(&env, &plan, &mut report).await,
            Scenario::Startup => startup::run(&env, &mut report).await,
            Scenario::Scaling => scaling::run(&env, &plan, &mut report).await,
            Scenario::Sparkplug => sparkplug::run(&env, &plan, &mut report).await,
            Scenario::Idle => idle::run(&env, &mut report).await,
            Scenario::Queries => queries::run(&env, &plan, &mut report).await,
        };
        if let Err(e) = outcome {
            failed += 1;
            let message = format!("{e:#}");
            let short: String = message.chars().take(120).collect();
            report.row(
                name,
                "",
                format!("did not run: {short}"),
                "",
                report::Verdict::Fail,
            );
            report.problem(name, format!("scenario failed: {message}"));
        }
    }
    Ok((report, failed))
}

/// Adds what sensorhub's log said to the report's problems.
fn note_log(report: &mut Report, scenario: &str, log: &HubLog) {
    if log.exit != "exited cleanly" {
        report.problem(scenario, format!("sensorhub {}", log.exit));
    }
    if log.shutdown > Duration::from_secs(5) {
        report.problem(
            scenario,
            format!(
                "sensorhub took {:.1} s to shut down",
                log.shutdown.as_secs_f64()
            ),
        );
    }
    for (message, count) in &log.messages {
        report.problem(scenario, format!("sensorhub log, {count}x: {message}"));
    }
}

/// Polls `check` every `every` until it yields, or fails after `patience` with `what`.
async fn eventually<T, F, Fut>(
    what: &str,
    patience: Duration,
    every: Duration,
    mut check: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        if let Some(value) = check().await {
            return Ok(value);
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "timed out after {patience:?} waiting for {what}"
        );
        tokio::time::sleep(every).await;
    }
}
