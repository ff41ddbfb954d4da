//! Sustained ingest through the whole path: 4 MQTT connections at QoS 1 publishing the readings
//! of 1,000 sensors round-robin, measured over a window as documents in MongoDB at its end minus
//! at its start; then every acknowledged reading must be stored exactly once.
//!
//! With `--ingest-rate max` the publishers go as fast as acknowledgements allow, but pause while
//! more than `--max-backlog` acknowledged readings wait in the local log: acknowledgements cost
//! far less than storage, and unbounded publishers on the same two cores would take the CPU the
//! pipeline needs, and measure a fight over cores instead of what sensorhub sustains.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sensorhub::domain::Timestamp;
use tokio_util::sync::CancellationToken;

use super::env::{Env, Hub, HubMetrics, fetch_metrics};
use super::load::{Counters, Fleet, Load, LoadSpec, Rate};
use super::procfs::{CpuMeter, RssSampler};
use super::report::{Report, Verdict, megabytes, thousands};
use super::targets::{CONNECTIONS, INFLIGHT, INGEST_SHARE_OF_CEILING, RSS_LIMIT, SENSORS};
use super::{Findings, Plan, note_log};

/// What the run measured.
#[derive(Debug)]
struct Measured {
    window: Duration,
    /// Documents/s over the window, counted in MongoDB.
    stored_rate: f64,
    /// The same from sensorhub's stored counter, as a cross-check.
    metric_rate: f64,
    acked_rate: f64,
    published: u64,
    acked: u64,
    connection_errors: u64,
    documents: u64,
    end: HubMetrics,
    max_backlog: u64,
    drain: Duration,
    max_rss: u64,
    max_anon: u64,
    cpu: String,
}

pub async fn run(
    env: &Env,
    plan: &Plan,
    findings: &mut Findings,
    report: &mut Report,
) -> anyhow::Result<()> {
    let hub = env.spawn("ingest").await?;
    let database = hub.database.clone();
    let outcome = measure(env, plan, &hub).await;
    let log = hub.stop().await;
    note_log(report, "ingest", &log);
    env.drop_database(&database).await;
    let m = outcome?;

    findings.ingest = Some(m.stored_rate);
    let rate = match plan.ingest_rate {
        Rate::Max => format!("max (backlog <= {})", thousands(plan.max_backlog as f64)),
        Rate::PerSecond(r) => format!("paced {}/s", thousands(r)),
    };
    report.detail(
        "ingest",
        format!(
            "publishing {rate}; window {:.0} s: {} docs/s counted in MongoDB, {} by the stored \
             counter, {} acked/s; largest unstored backlog {}; drain after publishing {:.1} s",
            m.window.as_secs_f64(),
            thousands(m.stored_rate),
            thousands(m.metric_rate),
            thousands(m.acked_rate),
            thousands(m.max_backlog as f64),
            m.drain.as_secs_f64()
        ),
    );
    report.detail(
        "ingest",
        format!(
            "CPU over the window: {}; sensorhub's largest RSS {}, of which anonymous {}",
            m.cpu,
            megabytes(m.max_rss),
            megabytes(m.max_anon)
        ),
    );
    if m.end.refused + m.end.dead_letters + m.end.store_errors + m.end.cache_errors > 0 {
        report.problem(
            "ingest",
            format!(
                "refused {}, dead letters {}, MongoDB write errors {}, Redis errors {}",
                m.end.refused, m.end.dead_letters, m.end.store_errors, m.end.cache_errors
            ),
        );
    }
    // A rebuild means live Redis updates were dropped (queue full, Redis errors) and the sets
    // were read back from MongoDB, which competes with the inserts.
    if m.end.cache_rebuilds > 0 {
        report.detail(
            "ingest",
            format!(
                "{} latest-ten sets rebuilt from MongoDB",
                thousands(m.end.cache_rebuilds as f64)
            ),
        );
    }

    let title = format!(
        "Ingest: stored/s, {CONNECTIONS} MQTT conns QoS 1, {} sensors, {:.0} s",
        thousands(SENSORS as f64),
        m.window.as_secs_f64()
    );
    let measured = format!(
        "{}/s (acked {}/s)",
        thousands(m.stored_rate),
        thousands(m.acked_rate)
    );
    // Against the store's rate over the same time into one growing collection; the sweep's
    // best, from short runs into fresh ones, is shown beside it.
    if let Some(ceiling) = findings.ceiling {
        report.detail(
            "ingest",
            format!(
                "{:.2} of the sweep's best cell ({}/s, {:.0} s per cell in a fresh database)",
                m.stored_rate / ceiling,
                thousands(ceiling),
                plan.ceiling.as_secs_f64()
            ),
        );
    }
    match findings.sustained_ceiling.or(findings.ceiling) {
        Some(ceiling) => {
            let share = m.stored_rate / ceiling;
            let of = if findings.sustained_ceiling.is_some() {
                "sustained ceiling"
            } else {
                "ceiling"
            };
            report.row(
                title,
                format!(
                    ">= {:.0}% of {of} (>= {}/s)",
                    INGEST_SHARE_OF_CEILING * 100.0,
                    thousands(INGEST_SHARE_OF_CEILING * ceiling)
                ),
                measured,
                format!("{share:.2} of {of}"),
                verdict(share >= INGEST_SHARE_OF_CEILING),
            );
        }
        None => report.row(
            title,
            format!(">= {:.0}% of ceiling", INGEST_SHARE_OF_CEILING * 100.0),
            measured,
            "no ceiling in this run (add `ceiling` to --only)",
            Verdict::Info,
        ),
    }
    let valid = m.connection_errors == 0;
    if !valid {
        report.problem(
            "ingest",
            format!(
                "{} MQTT connection errors: the acknowledgement count is no proof of loss or \
                 not; the loss row is FAIL",
                m.connection_errors
            ),
        );
    }
    let loss = m.acked.saturating_sub(m.documents);
    report.row(
        "Ingest: loss (acked - stored)",
        "0",
        format!("{loss} of {} acked", thousands(m.acked as f64)),
        "",
        verdict(valid && loss == 0),
    );
    report.row(
        "Ingest: duplicates (sensorhub_readings_duplicate_total)",
        "0",
        m.end.duplicates.to_string(),
        "",
        verdict(m.end.duplicates == 0),
    );
    report.row(
        "Ingest: documents = distinct readings published",
        "equal",
        format!(
            "{} / {}",
            thousands(m.documents as f64),
            thousands(m.published as f64)
        ),
        "",
        verdict(m.documents == m.published),
    );
    report.row(
        "Ingest: max RSS of sensorhub",
        format!("< {}", megabytes(RSS_LIMIT)),
        megabytes(m.max_rss),
        format!("{:.2} of limit", m.max_rss as f64 / RSS_LIMIT as f64),
        verdict(m.max_rss < RSS_LIMIT),
    );
    Ok(())
}

fn verdict(pass: bool) -> Verdict {
    if pass { Verdict::Pass } else { Verdict::Fail }
}

async fn measure(env: &Env, plan: &Plan, hub: &Hub) -> anyhow::Result<Measured> {
    let rss = RssSampler::start(hub.pid);
    let fleet = Fleet::new(
        "",
        SENSORS,
        Timestamp::now().saturating_add_millis(-3_600_000),
    )?;
    let pause = Arc::new(AtomicBool::new(false));
    let load = Load::start(LoadSpec {
        port: hub.mqtt.port(),
        connections: CONNECTIONS,
        rate: plan.ingest_rate,
        inflight: INFLIGHT,
        fleet: Arc::new(fleet),
        name: format!("bench-{}-ingest", env.run_id),
        pause: Some(Arc::clone(&pause)),
    })
    .await?;
    let bound = (plan.ingest_rate == Rate::Max && plan.max_backlog > 0).then_some(plan.max_backlog);
    let monitor_stop = CancellationToken::new();
    let monitor = tokio::spawn(watch_backlog(
        hub.http_client(),
        load.counters(),
        bound,
        pause,
        monitor_stop.clone(),
    ));

    tokio::time::sleep(plan.ingest_warmup).await;
    let mut http = hub.http_client();
    let counters = load.counters();
    let (t0, c0) = counted(env, &hub.database).await?;
    let (a0, s0) = (counters.acked(), fetch_metrics(&mut http).await?.stored);
    let cpu = CpuMeter::start(&with_hub(&env.services, hub.pid));
    tokio::time::sleep(plan.ingest_window).await;
    let (t1, c1) = counted(env, &hub.database).await?;
    let (a1, s1) = (counters.acked(), fetch_metrics(&mut http).await?.stored);
    let cpu = cpu.finish();
    let window = t1 - t0;
    let secs = window.as_secs_f64();

    let totals = load.stop().await?;
    monitor_stop.cancel();
    let max_backlog = monitor.await.unwrap_or(0);

    // Every acknowledged reading must reach MongoDB; the local log holds them meanwhile.
    let draining = Instant::now();
    let expected = totals.published;
    let deadline = draining + Duration::from_secs(600);
    let (mut progress, mut last_stored) = (Instant::now(), 0);
    let end = loop {
        let m = fetch_metrics(&mut http).await?;
        let settled = m.stored + m.duplicates + m.dead_letters;
        if settled >= expected && m.journal_pending_bytes == 0 {
            break m;
        }
        if settled > last_stored {
            (progress, last_stored) = (Instant::now(), settled);
        }
        // Give up when nothing moves for a minute: the shortfall is then the finding.
        if Instant::now() > deadline || progress.elapsed() > Duration::from_secs(60) {
            break m;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let drain = draining.elapsed();
    let documents = env.count_readings(&hub.database, true).await?;
    let samples = rss.finish().await;
    Ok(Measured {
        window,
        stored_rate: c1.saturating_sub(c0) as f64 / secs,
        metric_rate: s1.saturating_sub(s0) as f64 / secs,
        acked_rate: a1.saturating_sub(a0) as f64 / secs,
        published: totals.published,
        acked: totals.acked,
        connection_errors: totals.errors,
        documents,
        end,
        max_backlog,
        drain,
        max_rss: samples.iter().map(|(_, m)| m.rss).max().unwrap_or(0),
        max_anon: samples.iter().map(|(_, m)| m.anon).max().unwrap_or(0),
        cpu,
    })
}

/// Documents now, and when they were counted (the middle of the count's round trip).
async fn counted(env: &Env, database: &str) -> anyhow::Result<(Instant, u64)> {
    let before = Instant::now();
    let count = env.count_readings(database, false).await?;
    Ok((before + before.elapsed() / 2, count))
}

pub fn with_hub(services: &[(String, u32)], pid: u32) -> Vec<(String, u32)> {
    let mut all = vec![("sensorhub".to_owned(), pid)];
    all.extend(services.iter().cloned());
    all
}

/// Follows acknowledged-but-unstored readings every 50 ms; with a bound, pauses the
/// publishers above it. Returns the largest backlog seen.
async fn watch_backlog(
    mut http: super::client::HttpClient,
    counters: Counters,
    bound: Option<u64>,
    pause: Arc<AtomicBool>,
    stop: CancellationToken,
) -> u64 {
    let mut largest = 0;
    loop {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(50)) => {}
            () = stop.cancelled() => break,
        }
        let Ok(m) = fetch_metrics(&mut http).await else {
            continue;
        };
        let backlog = counters
            .acked()
            .saturating_sub(m.stored + m.duplicates + m.dead_letters);
        largest = largest.max(backlog);
        if let Some(bound) = bound {
            pause.store(backlog > bound, Ordering::Relaxed);
        }
    }
    pause.store(false, Ordering::Relaxed);
    largest
}
