//! A run of a fixed size, as the issue measured it: 200,000 readings of 1,000 sensors from 4 MQTT
//! connections at QoS 1, published as fast as acknowledgements allow, and the time from the first
//! publish until MongoDB holds all of them. The reference is the store itself taking the same
//! number of the same documents, with the sweep's best batch size and inserter count, into a
//! fresh database: the same volume on both sides, so neither is measured on a larger collection
//! than the other.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use sensorhub::domain::Timestamp;
use tokio::task::JoinSet;

use super::ceiling;
use super::env::{Env, Hub, fetch_metrics};
use super::ingest::with_hub;
use super::load::{Connection, Fleet};
use super::procfs::CpuMeter;
use super::report::{Report, Verdict, thousands};
use super::targets::{CONNECTIONS, INFLIGHT, INGEST_SHARE_OF_CEILING, SENSORS};
use super::{Findings, Plan, note_log};

/// The run; a quick run sends a quarter of it.
const READINGS: u64 = 200_000;
/// The store's reference configuration when the sweep did not run: the (batches of 500
/// from 4 clients).
const DEFAULT_CONFIG: (usize, usize) = (500, 4);

pub async fn run(
    env: &Env,
    plan: &Plan,
    findings: &Findings,
    report: &mut Report,
) -> anyhow::Result<()> {
    let readings = if plan.quick { READINGS / 4 } else { READINGS };
    let config = findings.ceiling_config.unwrap_or(DEFAULT_CONFIG);
    let (store_rate, store_cpu) = ceiling::run_of(env, "burst_store", config, readings).await?;
    report.detail(
        "burst",
        format!(
            "the store alone: {} documents, batch {} x {} inserter(s): {} docs/s (CPU: {store_cpu})",
            thousands(readings as f64),
            config.0,
            config.1,
            thousands(store_rate)
        ),
    );

    let hub = env.spawn("burst").await?;
    let database = hub.database.clone();
    let outcome = measure(env, &hub, readings).await;
    let log = hub.stop().await;
    note_log(report, "burst", &log);
    env.drop_database(&database).await;
    let (elapsed, documents, cpu) = outcome?;

    let rate = documents as f64 / elapsed.as_secs_f64();
    report.detail(
        "burst",
        format!(
            "end to end: {} readings stored in {:.1} s (CPU: {cpu})",
            thousands(documents as f64),
            elapsed.as_secs_f64()
        ),
    );
    let share = rate / store_rate;
    report.row(
        format!(
            "Ingest, a run of {} readings: stored/s vs the store taking the same",
            thousands(readings as f64)
        ),
        format!(
            ">= {:.0}% of the store's {}/s",
            INGEST_SHARE_OF_CEILING * 100.0,
            thousands(store_rate)
        ),
        format!("{}/s", thousands(rate)),
        format!("{share:.2} of the store"),
        if share >= INGEST_SHARE_OF_CEILING && documents == readings {
            Verdict::Pass
        } else {
            Verdict::Fail
        },
    );
    if documents != readings {
        report.problem(
            "burst",
            format!(
                "{} of {} readings stored",
                thousands(documents as f64),
                thousands(readings as f64)
            ),
        );
    }
    Ok(())
}

/// Publishes `readings` and waits until all are stored: (time from the first publish until the
/// last was stored, documents in MongoDB, CPU over that time).
async fn measure(env: &Env, hub: &Hub, readings: u64) -> anyhow::Result<(Duration, u64, String)> {
    let fleet = Arc::new(Fleet::new(
        "",
        SENSORS,
        Timestamp::now().saturating_add_millis(-3_600_000),
    )?);
    let mut connections = Vec::with_capacity(CONNECTIONS);
    for c in 0..CONNECTIONS {
        let id = format!("bench-{}-burst-{c}", env.run_id);
        connections.push(Arc::new(
            Connection::open(hub.mqtt.port(), &id, INFLIGHT).await?,
        ));
    }
    let mut http = hub.http_client();
    let before = fetch_metrics(&mut http).await?.stored;
    let cpu = CpuMeter::start(&with_hub(&env.services, hub.pid));
    let started = Instant::now();
    let mut publishers = JoinSet::new();
    for (c, connection) in connections.iter().enumerate() {
        let (connection, fleet) = (Arc::clone(connection), Arc::clone(&fleet));
        publishers.spawn(async move {
            let mut n = c as u64;
            while n < readings {
                let (topic, payload) = fleet.message(n);
                connection.publish(topic, payload).await?;
                n += CONNECTIONS as u64;
            }
            anyhow::Ok(())
        });
    }
    while let Some(joined) = publishers.join_next().await {
        joined.context("a publisher panicked")??;
    }
    let deadline = started + Duration::from_secs(600);
    loop {
        let m = fetch_metrics(&mut http).await?;
        if m.stored.saturating_sub(before) + m.duplicates + m.dead_letters >= readings {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {} of {readings} readings stored after 10 minutes",
            m.stored.saturating_sub(before)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed();
    let cpu = cpu.finish();
    for connection in connections {
        if let Ok(connection) = Arc::try_unwrap(connection) {
            connection.close(Duration::from_secs(5)).await;
        }
    }
    let documents = env.count_readings(&hub.database, true).await?;
    Ok((elapsed, documents, cpu))
}
