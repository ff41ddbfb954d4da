//! The read side under load: `GET /latestten/{id}` (Redis) and `GET /startoenddate` returning
//! 1,000 readings (MongoDB), each driven by `wrk -t2 -c32 --latency` while 4 MQTT connections
//! ingest 10,000 readings/s, as the issue asks.
//!
//! The range's readings are published first, through MQTT like any other, for one sensor in a
//! year no other reading falls in, so the request without a sensor filter (the original API's
//! form) returns exactly those 1,000, in one page.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use sensorhub::domain::Timestamp;

use super::client::HttpClient;
use super::env::{Env, Hub};
use super::ingest::with_hub;
use super::load::{Connection, Counters, Fleet, Load, LoadSpec, Rate};
use super::procfs::CpuMeter;
use super::report::{Report, Verdict, millis, thousands};
use super::targets::{
    CONNECTIONS, HTTP_INGEST_RATE, INFLIGHT, LATEST_P99, LATEST_RPS, RANGE_READINGS, RANGE_RPS,
    SENSORS,
};
use super::wrk::{self, WrkResult};
use super::{Plan, eventually, note_log};

/// 2025-01-01T00:00:00Z: the range readings, one per second from here.
const RANGE_START_MS: i64 = 1_735_689_600_000;
const WRK_THREADS: u32 = 2;
const WRK_CONNECTIONS: u32 = 32;

#[derive(Debug)]
struct Measured {
    latest: WrkResult,
    latest_ingest: f64,
    latest_cpu: String,
    range: WrkResult,
    range_ingest: f64,
    range_cpu: String,
}

pub async fn run(env: &Env, plan: &Plan, report: &mut Report) -> anyhow::Result<()> {
    let hub = env.spawn("http").await?;
    let database = hub.database.clone();
    let outcome = measure(env, plan, &hub).await;
    let log = hub.stop().await;
    note_log(report, "http", &log);
    env.drop_database(&database).await;
    let m = outcome?;

    for (what, result, ingest, cpu) in [
        ("/latestten/{id}", &m.latest, m.latest_ingest, &m.latest_cpu),
        ("/startoenddate", &m.range, m.range_ingest, &m.range_cpu),
    ] {
        report.detail(
            "http",
            format!(
                "{what}: {} requests, p50 {}, background ingest {} acked/s; CPU: {cpu}",
                thousands(result.requests as f64),
                millis(result.p50),
                thousands(ingest),
            ),
        );
        if result.non_2xx + result.socket_errors > 0 {
            report.problem(
                "http",
                format!(
                    "{what}: {} non-2xx responses, {} socket errors",
                    result.non_2xx, result.socket_errors
                ),
            );
        }
        if ingest < 0.95 * HTTP_INGEST_RATE {
            report.problem(
                "http",
                format!(
                    "{what}: the background ingest reached only {}/s of {}/s",
                    thousands(ingest),
                    thousands(HTTP_INGEST_RATE)
                ),
            );
        }
    }
    let clean = |r: &WrkResult| r.non_2xx + r.socket_errors == 0;
    let load = format!(
        "wrk -t{WRK_THREADS} -c{WRK_CONNECTIONS}, ingest {}/s",
        thousands(HTTP_INGEST_RATE)
    );
    report.row(
        format!("HTTP: GET /latestten/{{id}} req/s ({load})"),
        format!(">= {}/s", thousands(LATEST_RPS)),
        format!("{}/s", thousands(m.latest.requests_per_sec)),
        format!("{:.2}x target", m.latest.requests_per_sec / LATEST_RPS),
        pass(m.latest.requests_per_sec >= LATEST_RPS && clean(&m.latest)),
    );
    report.row(
        "HTTP: GET /latestten/{id} p99",
        format!("< {}", millis(LATEST_P99)),
        millis(m.latest.p99),
        format!(
            "{:.2} of limit",
            m.latest.p99.as_secs_f64() / LATEST_P99.as_secs_f64()
        ),
        pass(m.latest.p99 < LATEST_P99),
    );
    report.row(
        format!(
            "HTTP: GET /startoenddate, {} readings each ({load})",
            thousands(RANGE_READINGS as f64)
        ),
        format!(">= {}/s", thousands(RANGE_RPS)),
        format!(
            "{}/s (p99 {})",
            thousands(m.range.requests_per_sec),
            millis(m.range.p99)
        ),
        format!("{:.2}x target", m.range.requests_per_sec / RANGE_RPS),
        pass(m.range.requests_per_sec >= RANGE_RPS && clean(&m.range)),
    );
    Ok(())
}

fn pass(ok: bool) -> Verdict {
    if ok { Verdict::Pass } else { Verdict::Fail }
}

async fn measure(env: &Env, plan: &Plan, hub: &Hub) -> anyhow::Result<Measured> {
    let range_path = preload_range(env, hub).await?;

    let fleet = Fleet::new(
        "",
        SENSORS,
        Timestamp::now().saturating_add_millis(-3_600_000),
    )?;
    let hot = fleet
        .sensor_id(0)
        .context("the fleet has no sensor")?
        .to_owned();
    let load = Load::start(LoadSpec {
        port: hub.mqtt.port(),
        connections: CONNECTIONS,
        rate: Rate::PerSecond(HTTP_INGEST_RATE),
        inflight: INFLIGHT,
        fleet: Arc::new(fleet),
        name: format!("bench-{}-http", env.run_id),
        pause: None,
    })
    .await?;
    let outcome = drive(env, plan, hub, &load.counters(), &hot, &range_path).await;
    load.stop().await?;
    outcome
}

async fn drive(
    env: &Env,
    plan: &Plan,
    hub: &Hub,
    counters: &Counters,
    hot: &str,
    range_path: &str,
) -> anyhow::Result<Measured> {
    let latest_path = format!("/latestten/{hot}");
    let addr = hub.http;
    eventually(
        &format!("{hot} visible in {latest_path}"),
        Duration::from_secs(30),
        Duration::from_millis(50),
        || {
            let path = latest_path.clone();
            async move {
                let r = HttpClient::new(addr)
                    .get(&path, Duration::from_secs(2))
                    .await
                    .ok()?;
                (r.status == 200).then_some(())
            }
        },
    )
    .await?;
    tokio::time::sleep(plan.settle).await;

    let processes = with_hub(&env.services, hub.pid);
    let under_load = async |path: &str| -> anyhow::Result<(WrkResult, f64, String)> {
        let (began, acked) = (Instant::now(), counters.acked());
        let cpu = CpuMeter::start(&processes);
        let result = wrk::run(&hub.url(path), WRK_THREADS, WRK_CONNECTIONS, plan.http).await?;
        let ingest = counters.acked().saturating_sub(acked) as f64 / began.elapsed().as_secs_f64();
        Ok((result, ingest, cpu.finish()))
    };
    let (latest, latest_ingest, latest_cpu) = under_load(&latest_path).await?;
    let (range, range_ingest, range_cpu) = under_load(range_path).await?;
    Ok(Measured {
        latest,
        latest_ingest,
        latest_cpu,
        range,
        range_ingest,
        range_cpu,
    })
}

/// Publishes the range's readings and waits until the range query returns all of them; returns
/// the query's path.
async fn preload_range(env: &Env, hub: &Hub) -> anyhow::Result<String> {
    let connection = Connection::open(
        hub.mqtt.port(),
        &format!("bench-{}-range", env.run_id),
        INFLIGHT,
    )
    .await?;
    let start = Timestamp::from_millis(RANGE_START_MS).context("range start")?;
    for i in 0..RANGE_READINGS as i64 {
        let at = start.saturating_add_millis(i * 1000);
        let value = 20.0 + (i % 50) as f64 / 10.0;
        let payload = format!(r#"{{"sensor_id":"range-0001","value":{value},"timestamp":"{at}"}}"#);
        connection
            .publish("sensors/temperature", payload.into_bytes())
            .await?;
    }
    connection.close(Duration::from_secs(30)).await;
    let end = start.saturating_add_millis((RANGE_READINGS as i64 - 1) * 1000);
    let path = format!("/startoenddate?startDate={start}&endDate={end}");
    let addr = hub.http;
    eventually(
        "the range readings stored",
        Duration::from_secs(60),
        Duration::from_millis(100),
        || {
            let path = path.clone();
            async move {
                let r = HttpClient::new(addr)
                    .get(&path, Duration::from_secs(5))
                    .await
                    .ok()?;
                let readings: Vec<serde_json::Value> = serde_json::from_slice(&r.body).ok()?;
                (r.status == 200 && readings.len() == RANGE_READINGS).then_some(())
            }
        },
    )
    .await?;
    Ok(path)
}
