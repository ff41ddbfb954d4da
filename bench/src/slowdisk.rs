//! A slow disk under `--journal-fsync always`: every `fdatasync` of the running sensorhub is
//! delayed by 300 ms with strace's fault injection (the local log's syncer calls `fdatasync`,
//! and only it does on the ingest path), while 4 MQTT connections publish 2,000 readings/s in
//! all, then 2,000 readings/s each. Meanwhile `GET /health` and `GET /latestten/{id}` are each
//! polled every 100 ms on a connection of their own: a slow disk may slow acknowledgements, never
//! the API. Afterwards every acknowledged reading must be stored.
//!
//! strace attaches to every thread (`-f -p`) and stops each at every system call it makes, not
//! only at `fdatasync`: a cost the API's latencies include, so they are an upper bound.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use super::client::HttpClient;
use super::env::{Env, Hub, fetch_metrics};
use super::load::{Load, LoadSpec};
use super::report::{Report, Verdict, millis, percentile, thousands};
use super::targets::CONNECTIONS;
use super::{Plan, eventually, note_log};

/// What strace adds to each `fdatasync`.
const SLOW_DISK_DELAY: Duration = Duration::from_millis(300);
/// Readings/s over all connections: the 2,000 in all, then 2,000 on each.
const SLOW_DISK_RATES: [f64; 2] = [2_000.0, 8_000.0];
/// Longest an API request may take meanwhile.
const SLOW_DISK_API: Duration = Duration::from_millis(250);

/// How often each API probe asks.
const PROBE_EVERY: Duration = Duration::from_millis(100);
/// A probe that takes longer is cut off and counted as taking this long.
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);

pub async fn run(env: &Env, plan: &Plan, report: &mut Report) -> anyhow::Result<()> {
    let version = std::process::Command::new("strace")
        .arg("-V")
        .output()
        .context("strace is not installed (Debian package `strace`; scripts/bench installs it)")?;
    anyhow::ensure!(version.status.success(), "strace -V failed");
    for (i, rate) in SLOW_DISK_RATES.iter().copied().enumerate() {
        let instance = format!("slowdisk-{i}");
        let database = env.database(&instance);
        let extra = ["--journal-fsync".to_owned(), "always".to_owned()];
        let mut hub = env.launch_with(&instance, &database, &extra)?;
        let outcome = match hub.wait_ready(Duration::from_secs(30)).await {
            Ok(_) => measure(env, plan, &hub, rate).await,
            Err(e) => Err(e),
        };
        let log = hub.stop().await;
        note_log(report, "slowdisk", &log);
        env.drop_database(&database).await;
        record(report, rate, &outcome?);
    }
    Ok(())
}

/// What one run measured.
#[derive(Debug)]
struct Measured {
    window: Duration,
    /// `fdatasync` calls strace delayed during the window.
    delayed_syncs: usize,
    health: Probed,
    latest: Probed,
    acked_rate: f64,
    stored_rate: f64,
    acked: u64,
    documents: u64,
    connection_errors: u64,
}

/// One API probe's latencies, sorted; failed requests count as their time until the failure.
#[derive(Debug, Default)]
struct Probed {
    latencies: Vec<Duration>,
    failures: usize,
}

impl Probed {
    fn max(&self) -> Duration {
        self.latencies.last().copied().unwrap_or_default()
    }

    fn p99(&self) -> Duration {
        percentile(&self.latencies, 99.0).unwrap_or_default()
    }

    fn within(&self, limit: Duration) -> bool {
        !self.latencies.is_empty() && self.failures == 0 && self.max() < limit
    }
}

fn record(report: &mut Report, rate: f64, m: &Measured) {
    let per_connection = rate / CONNECTIONS as f64;
    let shape = format!(
        "{}/s ({}/s on each of {CONNECTIONS} connections)",
        thousands(rate),
        thousands(per_connection)
    );
    let delay = millis(SLOW_DISK_DELAY);
    report.detail(
        "slowdisk",
        format!(
            "{shape}, every fdatasync +{delay}: {} fdatasync calls delayed in {:.0} s; {} acked/s, \
             {} stored/s; /health {} requests, /latestten/{{id}} {}",
            m.delayed_syncs,
            m.window.as_secs_f64(),
            thousands(m.acked_rate),
            thousands(m.stored_rate),
            m.health.latencies.len(),
            m.latest.latencies.len()
        ),
    );
    if m.delayed_syncs == 0 {
        report.problem(
            "slowdisk",
            "strace delayed no fdatasync: the disk was not slow",
        );
    }
    for (path, probed) in [("/health", &m.health), ("/latestten/{id}", &m.latest)] {
        let failures = if probed.failures > 0 {
            format!(", {} failed", probed.failures)
        } else {
            String::new()
        };
        report.row(
            format!("Slow disk (fdatasync +{delay}, {shape}): GET {path} max"),
            format!("< {}", millis(SLOW_DISK_API)),
            format!(
                "max {}, p99 {} ({} requests{failures})",
                millis(probed.max()),
                millis(probed.p99()),
                probed.latencies.len()
            ),
            format!(
                "{:.2} of limit (max)",
                probed.max().as_secs_f64() / SLOW_DISK_API.as_secs_f64()
            ),
            if probed.within(SLOW_DISK_API) && m.delayed_syncs > 0 {
                Verdict::Pass
            } else {
                Verdict::Fail
            },
        );
    }
    let lost = m.acked.saturating_sub(m.documents);
    report.row(
        format!("Slow disk ({shape}): acked/s, stored/s; loss (acked - stored)"),
        "loss 0",
        format!(
            "{} acked/s, {} stored/s; {lost} of {} acked lost",
            thousands(m.acked_rate),
            thousands(m.stored_rate),
            thousands(m.acked as f64)
        ),
        "",
        if lost == 0 && m.connection_errors == 0 {
            Verdict::Pass
        } else {
            Verdict::Fail
        },
    );
}

async fn measure(env: &Env, plan: &Plan, hub: &Hub, rate: f64) -> anyhow::Result<Measured> {
    let database = &hub.database;
    let mut http = hub.http_client();
    let load = Load::start(LoadSpec::paced(
        hub.mqtt.port(),
        rate,
        format!("bench-{}-slowdisk-{}", env.run_id, rate as u64),
    )?)
    .await?;
    let counters = load.counters();
    // Readings of temp-0001 exist before its latest ten is polled.
    tokio::time::sleep(plan.settle).await;

    let trace = hub.log.with_file_name("strace.out");
    let strace = Strace::attach(hub.pid, &trace).await?;
    let (acked0, stored0, began) = (
        counters.acked(),
        fetch_metrics(&mut http).await?.stored,
        Instant::now(),
    );
    let stop = CancellationToken::new();
    let health = tokio::spawn(probe(hub.http_client(), "/health", stop.clone()));
    let latest = tokio::spawn(probe(
        hub.http_client(),
        "/latestten/temp-0001",
        stop.clone(),
    ));
    tokio::time::sleep(if plan.quick {
        Duration::from_secs(10)
    } else {
        Duration::from_secs(30)
    })
    .await;
    stop.cancel();
    let (health, latest) = (health.await?, latest.await?);
    let (acked1, stored1, window) = (
        counters.acked(),
        fetch_metrics(&mut http).await?.stored,
        began.elapsed(),
    );
    let delayed_syncs = strace.detach().await?;

    let totals = load.stop().await?;
    let acked = totals.acked;
    eventually(
        "MongoDB to hold every acknowledged reading",
        Duration::from_secs(300),
        Duration::from_millis(200),
        || async {
            let m = fetch_metrics(&mut hub.http_client()).await.ok()?;
            m.settled(acked).then_some(())
        },
    )
    .await?;
    let documents = env.count_readings(database, true).await?;
    let secs = window.as_secs_f64();
    Ok(Measured {
        window,
        delayed_syncs,
        health,
        latest,
        acked_rate: (acked1 - acked0) as f64 / secs,
        stored_rate: stored1.saturating_sub(stored0) as f64 / secs,
        acked,
        documents,
        connection_errors: totals.errors,
    })
}

/// GETs `path` every `PROBE_EVERY` on one keep-alive connection until `stop`.
async fn probe(mut http: HttpClient, path: &'static str, stop: CancellationToken) -> Probed {
    let mut probed = Probed::default();
    let mut tick = tokio::time::interval(PROBE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => break,
        }
        let sent = Instant::now();
        let ok = http
            .get(path, PROBE_TIMEOUT)
            .await
            .is_ok_and(|r| r.status == 200);
        probed.latencies.push(sent.elapsed());
        if !ok {
            probed.failures += 1;
        }
    }
    probed.latencies.sort();
    probed
}

/// strace attached to every thread of a process, delaying each `fdatasync` on entry.
struct Strace {
    child: Child,
    output: std::path::PathBuf,
}

impl Strace {
    /// Attaches, and returns once a delayed `fdatasync` shows the injection works.
    async fn attach(pid: u32, output: &Path) -> anyhow::Result<Self> {
        let delay = format!(
            "inject=fdatasync:delay_enter={}",
            SLOW_DISK_DELAY.as_micros()
        );
        let child = Command::new("strace")
            .args(["-f", "-qq", "-e", "trace=fdatasync", "-e", &delay, "-o"])
            .arg(output)
            .args(["-p", &pid.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start strace")?;
        let mut strace = Self {
            child,
            output: output.to_owned(),
        };
        eventually(
            "strace to delay a first fdatasync",
            Duration::from_secs(15),
            Duration::from_millis(50),
            || {
                let seen = strace.delayed() > 0;
                let exited = strace.child.try_wait().ok().flatten().is_some();
                async move { (seen || exited).then_some(()) }
            },
        )
        .await?;
        if let Some(status) = strace.child.try_wait()? {
            let output = strace.child.wait_with_output().await?;
            anyhow::bail!(
                "strace exited with {status} (ptrace allowed?): {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(strace)
    }

    /// `fdatasync` calls traced so far.
    fn delayed(&self) -> usize {
        std::fs::read_to_string(&self.output)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("fdatasync("))
            .count()
    }

    /// Detaches (SIGTERM: strace lets every thread go) and counts the delayed calls.
    async fn detach(mut self) -> anyhow::Result<usize> {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .context("strace did not detach within 10 s")??;
        Ok(self.delayed())
    }
}
