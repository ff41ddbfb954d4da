//! Freshness: how long from a device's publish until `GET /latestten/{id}` shows the reading,
//! while 4 other connections ingest 20,000 readings/s in the background.
//!
//! Probes go one at a time on their own connection, for their own sensors (seeded first, so
//! every poll is answered from Redis, as a user's would be, and never falls back to MongoDB for
//! an unknown sensor). Each probe's timestamp is unique; the clock starts before the publish and
//! stops at the first poll (every ~2 ms, on one keep-alive connection) whose body holds it.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use sensorhub::domain::Timestamp;

use super::client::HttpClient;
use super::env::{Env, Hub};
use super::ingest::with_hub;
use super::load::{Connection, Load, LoadSpec};
use super::procfs::CpuMeter;
use super::report::{Report, Verdict, millis, percentile, thousands};
use super::targets::{LATENCY_P99, LATENCY_RATE};
use super::{Plan, eventually, note_log};

/// Probe sensors, used in turn.
const PROBE_SENSORS: usize = 10;
/// A probe not visible after this long counts as lost.
const GIVE_UP: Duration = Duration::from_secs(10);
const POLL_EVERY: Duration = Duration::from_millis(2);
/// Pause between probes, so they sample the load rather than follow each other.
const GAP: Duration = Duration::from_millis(20);

#[derive(Debug)]
struct Measured {
    latencies: Vec<Duration>,
    lost: usize,
    background_rate: f64,
    cpu: String,
}

pub async fn run(env: &Env, plan: &Plan, report: &mut Report) -> anyhow::Result<()> {
    let hub = env.spawn("latency").await?;
    let database = hub.database.clone();
    let outcome = measure(env, plan, &hub).await;
    let log = hub.stop().await;
    note_log(report, "latency", &log);
    env.drop_database(&database).await;
    let m = outcome?;

    report.detail(
        "latency",
        format!(
            "background achieved {} acked/s (target {}/s); CPU: {}",
            thousands(m.background_rate),
            thousands(LATENCY_RATE),
            m.cpu
        ),
    );
    if m.background_rate < 0.95 * LATENCY_RATE {
        report.problem(
            "latency",
            format!(
                "the background load reached only {}/s of {}/s",
                thousands(m.background_rate),
                thousands(LATENCY_RATE)
            ),
        );
    }
    // A probe never seen counts as GIVE_UP: leaving it out would flatter the percentiles.
    let mut sorted = m.latencies.clone();
    sorted.extend(std::iter::repeat_n(GIVE_UP, m.lost));
    sorted.sort();
    let p99 = percentile(&sorted, 99.0).context("no probe was sent")?;
    let p50 = percentile(&sorted, 50.0).unwrap_or_default();
    let max = sorted.last().copied().unwrap_or_default();
    let lost = if m.lost > 0 {
        format!(
            ", {} not visible after {} s, counted as such",
            m.lost,
            GIVE_UP.as_secs()
        )
    } else {
        String::new()
    };
    report.row(
        format!(
            "Latency: p99 publish -> /latestten/{{id}}, ingest {}/s",
            thousands(LATENCY_RATE)
        ),
        format!("< {}", millis(LATENCY_P99)),
        format!(
            "{} (p50 {}, max {}, {} probes{lost})",
            millis(p99),
            millis(p50),
            millis(max),
            sorted.len()
        ),
        format!(
            "{:.2} of limit",
            p99.as_secs_f64() / LATENCY_P99.as_secs_f64()
        ),
        if p99 < LATENCY_P99 && m.lost == 0 {
            Verdict::Pass
        } else {
            Verdict::Fail
        },
    );
    Ok(())
}

async fn measure(env: &Env, plan: &Plan, hub: &Hub) -> anyhow::Result<Measured> {
    let load = Load::start(LoadSpec::paced(
        hub.mqtt.port(),
        LATENCY_RATE,
        format!("bench-{}-latency", env.run_id),
    )?)
    .await?;
    let probe =
        Connection::open(hub.mqtt.port(), &format!("bench-{}-probe", env.run_id), 10).await?;
    let outcome = probe_all(env, plan, hub, &probe, &load).await;
    probe.close(Duration::from_secs(5)).await;
    load.stop().await?;
    outcome
}

async fn probe_all(
    env: &Env,
    plan: &Plan,
    hub: &Hub,
    probe: &Connection,
    load: &Load,
) -> anyhow::Result<Measured> {
    let ids: Vec<String> = (1..=PROBE_SENSORS)
        .map(|i| format!("probe-{i:02}"))
        .collect();
    let start = Timestamp::now();
    for id in &ids {
        probe
            .publish("sensors/temperature", payload(id, 0.0, start))
            .await?;
    }
    let mut http = hub.http_client();
    for id in &ids {
        let path = format!("/latestten/{id}");
        let addr = hub.http;
        eventually(
            &format!("{id} visible"),
            Duration::from_secs(30),
            Duration::from_millis(20),
            || {
                let path = path.clone();
                async move {
                    let mut http = HttpClient::new(addr);
                    let r = http.get(&path, Duration::from_secs(2)).await.ok()?;
                    (r.status == 200).then_some(())
                }
            },
        )
        .await?;
    }
    tokio::time::sleep(plan.settle).await;

    let counters = load.counters();
    let (began, acked_before) = (Instant::now(), counters.acked());
    let cpu = CpuMeter::start(&with_hub(&env.services, hub.pid));
    let mut latencies = Vec::with_capacity(plan.latency_probes);
    let mut lost = 0;
    for k in 0..plan.latency_probes {
        let id = &ids[k % ids.len()];
        // Newer than the seed and unique per probe: the reading the poll must find.
        let at = start.saturating_add_millis(1 + k as i64);
        let needle = format!("\"timestamp\":\"{at}\"");
        let path = format!("/latestten/{id}");
        let sent = Instant::now();
        probe
            .publish("sensors/temperature", payload(id, k as f64, at))
            .await?;
        loop {
            let polled = Instant::now();
            let visible = http
                .get(&path, Duration::from_secs(2))
                .await
                .is_ok_and(|r| r.status == 200 && r.text().contains(&needle));
            if visible {
                latencies.push(sent.elapsed());
                break;
            }
            if sent.elapsed() > GIVE_UP {
                lost += 1;
                break;
            }
            tokio::time::sleep(POLL_EVERY.saturating_sub(polled.elapsed())).await;
        }
        tokio::time::sleep(GAP).await;
    }
    let background_rate =
        counters.acked().saturating_sub(acked_before) as f64 / began.elapsed().as_secs_f64();
    Ok(Measured {
        latencies,
        lost,
        background_rate,
        cpu: cpu.finish(),
    })
}

fn payload(id: &str, value: f64, at: Timestamp) -> Vec<u8> {
    format!(r#"{{"sensor_id":"{id}","value":{value},"timestamp":"{at}"}}"#).into_bytes()
}
