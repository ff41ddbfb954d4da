//! The store's own ceiling: the fleet's readings inserted straight into the database with
//! `insert_many(..).ordered(false)`, through sensorhub's own `Store` adapter, so the documents,
//! the `_id`s and the indexes are exactly the ones sensorhub writes, with none of the path in
//! front (MQTT, local log, decoding, Redis).
//!
//! It tries batch sizes around sensorhub's (its writer takes up to 1 MiB of log per batch,
//! several thousand readings) with one and two concurrent inserters, each configuration in a
//! fresh database, and keeps the best: the ceiling is what the server can take, however asked.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use sensorhub::domain::{Reading, Timestamp};
use sensorhub::store::{Store, StoreConfig};
use tokio::task::JoinSet;

use super::env::Env;
use super::load::Fleet;
use super::procfs::CpuMeter;
use super::report::{Report, Verdict, thousands};
use super::targets::SENSORS;
use super::{Findings, Plan};

const BATCHES: [usize; 2] = [1000, 5000];
const INSERTERS: [usize; 2] = [1, 2];

pub async fn run(
    env: &Env,
    plan: &Plan,
    findings: &mut Findings,
    report: &mut Report,
) -> anyhow::Result<()> {
    let mut best: Option<(f64, String)> = None;
    for batch in BATCHES {
        for inserters in INSERTERS {
            let config = format!("batch {batch} x {inserters} inserter(s)");
            let database = env.database(&format!("ceiling_{batch}x{inserters}"));
            let measured = measure(env, &database, batch, inserters, plan.ceiling).await;
            env.drop_database(&database).await;
            let (rate, cpu) = measured.with_context(|| format!("ceiling, {config}"))?;
            report.detail(
                "ceiling",
                format!("{config}: {} docs/s (CPU: {cpu})", thousands(rate)),
            );
            if best.as_ref().is_none_or(|(b, _)| rate > *b) {
                best = Some((rate, config));
            }
        }
    }
    let (rate, config) = best.context("no ceiling configuration ran")?;
    findings.ceiling = Some(rate);
    report.row(
        "Store ceiling: insert_many, same docs and indexes",
        "reference",
        format!("{} docs/s", thousands(rate)),
        format!("best of {}: {config}", BATCHES.len() * INSERTERS.len()),
        Verdict::Info,
    );
    Ok(())
}

/// Inserts for `duration`; returns documents/s and the CPU shares.
async fn measure(
    env: &Env,
    database: &str,
    batch: usize,
    inserters: usize,
    duration: Duration,
) -> anyhow::Result<(f64, String)> {
    let store = Store::connect(StoreConfig {
        uri: env.mongodb_uri.clone(),
        database: database.to_owned(),
        collection: "sensor_readings".into(),
        dead_letter_collection: "dead_letters".into(),
        dead_letter_ttl: Duration::from_secs(7 * 86_400),
        server_selection_timeout: Duration::from_secs(5),
    })
    .await?;
    store.ensure_indexes().await?;
    let base = Timestamp::now().saturating_add_millis(-3_600_000);
    let fleet = Arc::new(Fleet::new("", SENSORS, base)?);
    let cpu = CpuMeter::start(&env.services);
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = JoinSet::new();
    for j in 0..inserters as u64 {
        let (store, fleet) = (store.clone(), Arc::clone(&fleet));
        let stride = inserters as u64;
        tasks.spawn(async move {
            let mut inserted: u64 = 0;
            let mut next: u64 = 0;
            while Instant::now() < deadline {
                // Inserter j takes sequence numbers j, j + stride, ...: never another's.
                let readings: Vec<Reading> = (next..next + batch as u64)
                    .filter_map(|k| fleet.reading(k * stride + j))
                    .collect();
                next += batch as u64;
                let outcome = store.insert_readings(&readings).await?;
                anyhow::ensure!(
                    outcome.duplicates.is_empty(),
                    "{} duplicates in the ceiling's own inserts",
                    outcome.duplicates.len()
                );
                inserted += readings.len() as u64;
            }
            anyhow::Ok(inserted)
        });
    }
    let mut inserted = 0;
    while let Some(joined) = tasks.join_next().await {
        inserted += joined.context("an inserter panicked")??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu.finish();
    let stored = env.count_readings(database, true).await?;
    anyhow::ensure!(
        stored == inserted,
        "inserted {inserted} documents but the collection holds {stored}"
    );
    Ok((inserted as f64 / elapsed, cpu))
}
