//! Restarting on a big history: 600,000 readings of 60,000 sensors (ten each) published over
//! MQTT and stored by sensorhub itself, so MongoDB, Redis and the record of Redis's state beside
//! the local log are exactly what a service that ran leaves. Then two restarts:
//!
//! 1. SIGTERM, restart with Redis untouched: from spawn, `/latestten/{id}` is polled round-robin
//!    over 100 sampled sensors until one answer carries `X-Sensorhub-Source: redis`, then until
//!    every sampled sensor did. Nothing is stale, so nothing may be rebuilt.
//! 2. SIGTERM, Redis flushed (FLUSHDB), restart: every set must be rebuilt from MongoDB. The
//!    `sensorhub_cache_rebuilds_total` counter is sampled every 20 ms to see the rebuild
//!    advance (it counts sets as each step of the rebuild ends), and the sampled sensors are
//!    polled throughout: until its set is rebuilt a sensor is answered from MongoDB.
//!
//! In both, every answer (whichever store gave it) must equal that sensor's answer before the
//! restarts, compared as JSON.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use sensorhub::domain::Timestamp;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio_util::sync::CancellationToken;

use super::client::HttpClient;
use super::env::{Env, Hub, fetch_metrics};
use super::load::{Fleet, Load, LoadSpec, Rate};
use super::report::{Report, Verdict, millis, thousands};
use super::targets::{CONNECTIONS, INFLIGHT};
use super::{Plan, eventually, note_log};

/// Sensors of the history, and readings over them (quick: a tenth of each).
const SENSORS: usize = 60_000;
const READINGS: u64 = 600_000;
/// Publishing pace while the history is built.
const LOAD_RATE: f64 = 20_000.0;
/// Sensors whose latest ten are read after each restart, spread over the whole fleet.
const SAMPLED: usize = 100;
/// Spawn to the first latest-ten read answered from Redis, with Redis intact.
const REDIS_WITHIN: Duration = Duration::from_secs(2);
/// How long a restart may take to serve every sampled sensor from Redis.
const PATIENCE: Duration = Duration::from_secs(900);

pub async fn run(env: &Env, plan: &Plan, report: &mut Report) -> anyhow::Result<()> {
    let database = env.database("restart");
    let outcome = measure(env, plan, &database, report).await;
    env.drop_database(&database).await;
    outcome
}

/// What polling one restart saw.
#[derive(Debug, Default)]
struct Restart {
    /// Spawn to the first 200 answer, whichever store gave it.
    first_answer: Option<Duration>,
    /// Spawn to the first answer from Redis.
    first_redis: Option<Duration>,
    /// Spawn until every sampled sensor was answered from Redis at least once.
    all_redis: Option<Duration>,
    from_redis: u64,
    from_mongodb: u64,
    /// Answers that differ from the reference (or are not 200 once the API answers).
    wrong: u64,
    first_wrong: Option<String>,
    /// `sensorhub_cache_rebuilds_total` after `all_redis`.
    rebuilt: u64,
    /// Rebuild progress: (since spawn, sets rebuilt) whenever the counter changed.
    progress: Vec<(Duration, u64)>,
}

async fn measure(
    env: &Env,
    plan: &Plan,
    database: &str,
    report: &mut Report,
) -> anyhow::Result<()> {
    let (sensors, readings) = if plan.quick {
        (SENSORS / 10, READINGS / 10)
    } else {
        (SENSORS, READINGS)
    };
    let fleet = Arc::new(Fleet::new(
        "r",
        sensors,
        Timestamp::now().saturating_add_millis(-3_600_000),
    )?);
    let sampled: Vec<String> = (0..SAMPLED)
        .filter_map(|i| fleet.sensor_id(i * sensors / SAMPLED).map(str::to_owned))
        .collect();

    // The history, stored by sensorhub.
    let mut hub = env.launch_with("restart", database, &[])?;
    hub.wait_ready(Duration::from_secs(30)).await?;
    let built = Instant::now();
    let history = build_history(env, &hub, &fleet, readings).await;
    let reference = match history {
        Ok(published) => reference(&hub, &sampled).await.map(|r| (published, r)),
        Err(e) => Err(e),
    };
    let log = hub.stop().await;
    note_log(report, "restart", &log);
    let (published, reference) = reference?;
    report.detail(
        "restart",
        format!(
            "history: {} readings of {} sensors published over MQTT and stored in {:.0} s; \
             SIGTERM took {}",
            thousands(published as f64),
            thousands(sensors as f64),
            built.elapsed().as_secs_f64(),
            millis(log.shutdown)
        ),
    );

    // 1. Redis intact.
    let hub = env.relaunch("restart", database, &[])?;
    let intact = watch(hub, &sampled, &reference, None, report).await?;
    let first = intact.first_redis.context("no answer came from Redis")?;
    report.detail("restart", describe("Redis intact", &intact));
    report.row(
        format!(
            "Restart, Redis intact ({} readings, {} sensors): spawn -> first /latestten/{{id}} \
             from Redis",
            thousands(published as f64),
            thousands(sensors as f64)
        ),
        format!("<= {}", millis(REDIS_WITHIN)),
        format!(
            "{} (all {SAMPLED} sampled from Redis after {}; {} sets rebuilt)",
            millis(first),
            intact.all_redis.map(millis).unwrap_or_default(),
            intact.rebuilt
        ),
        format!(
            "{:.2} of limit",
            first.as_secs_f64() / REDIS_WITHIN.as_secs_f64()
        ),
        verdict(first <= REDIS_WITHIN && intact.wrong == 0),
    );

    // 2. Redis flushed while sensorhub was down.
    flush_redis(&env.redis_url).await?;
    let hub = env.relaunch("restart", database, &[])?;
    let flushed = watch(hub, &sampled, &reference, Some(sensors as u64), report).await?;
    report.detail("restart", describe("Redis flushed", &flushed));
    let done = flushed
        .progress
        .iter()
        .find(|(_, sets)| *sets >= sensors as u64)
        .map(|(at, _)| *at);
    let steps = flushed.progress.windows(2).map(|w| w[1].1 - w[0].1);
    let largest = steps.max().unwrap_or(flushed.rebuilt);
    report.row(
        "Restart, Redis flushed: spawn -> every set rebuilt from MongoDB",
        "bounded steps",
        format!(
            "{} for {} sets; counter seen at {} values, largest rise per 20 ms sample {}",
            done.map(millis).unwrap_or_else(|| "never".into()),
            thousands(flushed.rebuilt as f64),
            flushed.progress.len(),
            thousands(largest as f64)
        ),
        "",
        verdict(done.is_some() && flushed.progress.len() > 2),
    );
    report.row(
        "Restart, Redis flushed: /latestten/{id} answers during the rebuild",
        "all correct",
        format!(
            "{} wrong of {} ({} from MongoDB, {} from Redis)",
            flushed.wrong,
            flushed.from_mongodb + flushed.from_redis,
            flushed.from_mongodb,
            flushed.from_redis
        ),
        "",
        verdict(flushed.wrong == 0 && flushed.from_mongodb > 0),
    );
    Ok(())
}

fn verdict(pass: bool) -> Verdict {
    if pass { Verdict::Pass } else { Verdict::Fail }
}

fn describe(case: &str, r: &Restart) -> String {
    let at = |d: Option<Duration>| d.map(millis).unwrap_or_else(|| "never".into());
    let wrong = r
        .first_wrong
        .as_ref()
        .map(|w| format!(" (first: {w})"))
        .unwrap_or_default();
    format!(
        "{case}: first answer {}, first from Redis {}, every sampled sensor from Redis {}; \
         answers: {} from MongoDB, {} from Redis, {} wrong{wrong}; {} sets rebuilt",
        at(r.first_answer),
        at(r.first_redis),
        at(r.all_redis),
        r.from_mongodb,
        r.from_redis,
        r.wrong,
        r.rebuilt
    )
}

/// Publishes readings `0..count` of `fleet` and waits until sensorhub stored every one it
/// acknowledged. Returns how many were published.
async fn build_history(
    env: &Env,
    hub: &Hub,
    fleet: &Arc<Fleet>,
    count: u64,
) -> anyhow::Result<u64> {
    let load = Load::start(LoadSpec {
        port: hub.mqtt.port(),
        connections: CONNECTIONS,
        rate: Rate::PerSecond(LOAD_RATE),
        inflight: INFLIGHT,
        fleet: Arc::clone(fleet),
        name: format!("bench-{}-restart", env.run_id),
        pause: None,
    })
    .await?;
    let counters = load.counters();
    // Stopping overshoots by the few readings in flight: some sensors get an eleventh.
    while counters.published() < count {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let totals = load.stop().await?;
    anyhow::ensure!(
        totals.acked == totals.published && totals.errors == 0,
        "{} of {} readings acknowledged, {} connection errors",
        totals.acked,
        totals.published,
        totals.errors
    );
    eventually(
        "sensorhub to store the history",
        Duration::from_secs(900),
        Duration::from_millis(500),
        || async {
            let m = fetch_metrics(&mut hub.http_client()).await.ok()?;
            m.settled(totals.acked).then_some(())
        },
    )
    .await?;
    Ok(totals.published)
}

/// Each sampled sensor's latest ten before the restarts, answered from Redis.
async fn reference(hub: &Hub, sampled: &[String]) -> anyhow::Result<Vec<serde_json::Value>> {
    let mut http = hub.http_client();
    let mut out = Vec::with_capacity(sampled.len());
    for id in sampled {
        let r = http
            .get(&format!("/latestten/{id}"), Duration::from_secs(5))
            .await?;
        anyhow::ensure!(
            r.status == 200 && r.source.as_deref() == Some("redis"),
            "/latestten/{id} answered {} from {:?} before the restart",
            r.status,
            r.source
        );
        let body: serde_json::Value = serde_json::from_slice(&r.body)?;
        anyhow::ensure!(
            body.as_array().is_some_and(|a| a.len() == 10),
            "/latestten/{id} holds not ten readings: {body}"
        );
        out.push(body);
    }
    Ok(out)
}

/// Polls the sampled sensors of a just spawned `hub` round-robin until every one was answered
/// from Redis (and, with `rebuild`, the rebuild counter reached that many sets), then stops it.
async fn watch(
    mut hub: Hub,
    sampled: &[String],
    reference: &[serde_json::Value],
    rebuild: Option<u64>,
    report: &mut Report,
) -> anyhow::Result<Restart> {
    let outcome = poll(&mut hub, sampled, reference, rebuild).await;
    let log = hub.stop().await;
    note_log(report, "restart", &log);
    outcome
}

async fn poll(
    hub: &mut Hub,
    sampled: &[String],
    reference: &[serde_json::Value],
    rebuild: Option<u64>,
) -> anyhow::Result<Restart> {
    let launched = hub.launched;
    let mut seen = Restart::default();
    let mut redis_seen = vec![false; sampled.len()];
    let stop = CancellationToken::new();
    let rebuilt = Arc::new(AtomicBool::new(rebuild.is_none()));
    let counter = rebuild.map(|sets| {
        let done = Arc::clone(&rebuilt);
        tokio::spawn(follow_rebuilds(
            hub.http_client(),
            launched,
            sets,
            done,
            stop.clone(),
        ))
    });
    let mut http = hub.http_client();
    let mut next = 0;
    while seen.all_redis.is_none() || !rebuilt.load(Ordering::Acquire) {
        anyhow::ensure!(
            launched.elapsed() < PATIENCE,
            "not every sampled sensor was answered from Redis within {PATIENCE:?}"
        );
        let i = next % sampled.len();
        next += 1;
        let path = format!("/latestten/{}", sampled[i]);
        let Ok(r) = http.get(&path, Duration::from_secs(5)).await else {
            // Not listening yet.
            tokio::time::sleep(Duration::from_millis(2)).await;
            continue;
        };
        let at = launched.elapsed();
        seen.first_answer.get_or_insert(at);
        let body = serde_json::from_slice::<serde_json::Value>(&r.body).ok();
        if r.status != 200 || body.as_ref() != Some(&reference[i]) {
            seen.wrong += 1;
            seen.first_wrong.get_or_insert_with(|| {
                format!("{path} {} from {:?}: {}", r.status, r.source, r.text())
            });
        }
        match r.source.as_deref() {
            Some("redis") => {
                seen.from_redis += 1;
                seen.first_redis.get_or_insert(at);
                redis_seen[i] = true;
                if seen.all_redis.is_none() && redis_seen.iter().all(|s| *s) {
                    seen.all_redis = Some(at);
                }
            }
            _ => seen.from_mongodb += 1,
        }
    }
    if let Some(counter) = counter {
        stop.cancel();
        seen.progress = counter.await?;
    }
    seen.rebuilt = fetch_metrics(&mut hub.http_client()).await?.cache_rebuilds;
    Ok(seen)
}

/// Samples `sensorhub_cache_rebuilds_total` every 20 ms until `stop`, raising `done` once it
/// reached `sets`; returns its changes.
async fn follow_rebuilds(
    mut http: HttpClient,
    launched: Instant,
    sets: u64,
    done: Arc<AtomicBool>,
    stop: CancellationToken,
) -> Vec<(Duration, u64)> {
    let mut progress: Vec<(Duration, u64)> = Vec::new();
    while !stop.is_cancelled() {
        if let Ok(m) = fetch_metrics(&mut http).await
            && progress.last().is_none_or(|(_, n)| *n != m.cache_rebuilds)
        {
            progress.push((launched.elapsed(), m.cache_rebuilds));
            if m.cache_rebuilds >= sets {
                done.store(true, Ordering::Release);
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    progress
}

/// FLUSHDB on the benchmark's Redis (its own, started by scripts/bench).
async fn flush_redis(url: &str) -> anyhow::Result<()> {
    let addr = redis_addr(url)
        .with_context(|| format!("cannot read host:port from the Redis URL {url}"))?;
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let mut stream = BufReader::new(stream);
    stream.write_all(b"*1\r\n$7\r\nFLUSHDB\r\n").await?;
    let mut line = String::new();
    stream.read_line(&mut line).await?;
    anyhow::ensure!(line.trim_end() == "+OK", "FLUSHDB answered {line:?}");
    Ok(())
}

/// `host:port` of a `redis://host:port[/db]` URL without credentials (what scripts/services
/// gives).
fn redis_addr(url: &str) -> Option<&str> {
    let rest = url.strip_prefix("redis://")?;
    let addr = rest.split('/').next()?;
    (!addr.is_empty() && !addr.contains('@')).then_some(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_redis_address() {
        assert_eq!(redis_addr("redis://127.0.0.1:6379"), Some("127.0.0.1:6379"));
        assert_eq!(
            redis_addr("redis://127.0.0.1:6379/0"),
            Some("127.0.0.1:6379")
        );
        assert_eq!(redis_addr("redis://user:pw@host:1"), None);
        assert_eq!(redis_addr("rediss://host:1"), None);
    }
}
