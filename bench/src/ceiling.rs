//! The store's own ceiling: the fleet's readings inserted straight into the database with
//! `insert_many(..).ordered(false)`, through sensorhub's own `Store` adapter, so the documents,
//! the `_id`s and the indexes are exactly the ones sensorhub writes (whatever their format),
//! with none of the path in front (MQTT, local log, decoding, Redis).
//!
//! The server is faster with more writes in flight, up to a point, and batch size matters too,
//! so one configuration would understate it: the ceiling is the best cell of a sweep over 1, 2,
//! 4 and 8 concurrent inserters and batches of 500 to 16,000 readings, each cell for a few
//! seconds in a fresh database. The whole grid goes in the report: it is also what tells
//! sensorhub's writer how many batches to keep in flight and how large to make them.
//!
//! The cells run in a Latin-square order: each quarter of the sweep holds every batch size once
//! and every inserter count once. On a shared machine the load drifts during the sweep; run row
//! by row, a busy minute would read as "large batches are slow". Each cell also shows the CPU
//! the store got: a cell where it got much less than in the others was starved by other work.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use sensorhub::domain::{Reading, Timestamp};
use sensorhub::store::{Store, StoreConfig};
use tokio::task::JoinSet;

use super::env::Env;
use super::load::Fleet;
use super::procfs::{CpuMeter, describe};
use super::report::{Report, Table, Verdict, thousands};
use super::targets::SENSORS;
use super::{Findings, Plan};

/// The name under which the store's process is measured (see `Options::mongo_pid`).
const STORE: &str = "secantusd-rs";
/// Readings per `insert_many`, the rows of the sweep.
const BATCHES: [usize; 4] = [500, 2000, 8000, 16000];
/// Concurrent inserters (each one write in flight), the columns of the sweep.
const INSERTERS: [usize; 4] = [1, 2, 4, 8];

pub async fn run(
    env: &Env,
    plan: &Plan,
    findings: &mut Findings,
    report: &mut Report,
) -> anyhow::Result<()> {
    let mut rates = vec![vec![None; INSERTERS.len()]; BATCHES.len()];
    for (b, i) in order() {
        let (batch, inserters) = (BATCHES[b], INSERTERS[i]);
        let config = configuration(batch, inserters);
        let scenario = format!("ceiling_{batch}x{inserters}");
        let measured = fresh(
            env,
            &scenario,
            batch,
            inserters,
            Until::Elapsed(plan.ceiling),
        )
        .await;
        match measured {
            Ok(cell) => {
                report.detail(
                    "ceiling",
                    format!(
                        "{config}: {} docs/s (CPU: {})",
                        thousands(cell.rate),
                        cell.cpu
                    ),
                );
                rates[b][i] = Some(cell);
            }
            // One cell failing leaves the others worth reporting.
            Err(e) => report.problem("ceiling", format!("{config} failed: {e:#}")),
        }
    }
    let (rate, batch, inserters) = best(&rates).context("no ceiling configuration ran")?;
    findings.ceiling = Some(rate);
    findings.ceiling_config = Some((batch, inserters));
    let ran = rates.iter().flatten().flatten().count();
    let cells = BATCHES.len() * INSERTERS.len();
    let of = if ran == cells {
        format!("best of {cells}")
    } else {
        format!("best of {ran} ({} failed)", cells - ran)
    };
    report.row(
        "Store ceiling: insert_many, same docs and indexes",
        "reference",
        format!("{} docs/s", thousands(rate)),
        format!("{of}: {}", configuration(batch, inserters)),
        Verdict::Info,
    );
    report.table(sweep_table(&rates, plan.ceiling));

    // The sweep's cells last seconds, in fresh collections; ingest runs for a minute into one
    // collection, and the store slows as its collection and indexes grow. The best cell again,
    // for as long as ingest runs, is the reference that ingest is measured against.
    let sustained = plan.ingest_warmup + plan.ingest_window;
    let measured = fresh(
        env,
        "ceiling_sustained",
        batch,
        inserters,
        Until::Elapsed(sustained),
    )
    .await;
    match measured {
        Ok(cell) => {
            report.detail(
                "ceiling",
                format!(
                    "sustained, {} for {:.0} s: {} docs/s ({} documents; CPU: {})",
                    configuration(batch, inserters),
                    sustained.as_secs_f64(),
                    thousands(cell.rate),
                    thousands(cell.documents as f64),
                    cell.cpu
                ),
            );
            report.row(
                format!(
                    "Store ceiling, sustained: the best cell for {:.0} s",
                    sustained.as_secs_f64()
                ),
                "reference for ingest",
                format!("{} docs/s", thousands(cell.rate)),
                format!("{:.2} of the sweep's best", cell.rate / rate),
                Verdict::Info,
            );
            findings.sustained_ceiling = Some(cell.rate);
        }
        Err(e) => report.problem("ceiling", format!("sustained run failed: {e:#}")),
    }
    Ok(())
}

/// How long a measured insert runs.
#[derive(Clone, Copy, Debug)]
pub enum Until {
    /// Rounds start until this much time has passed.
    Elapsed(Duration),
    /// Rounds start until the inserters together inserted at least this many documents.
    Documents(u64),
}

/// Inserts `documents` of the fleet's readings into a fresh database with `batch` x
/// `inserters`: the store's rate for a run of that size. Returns (documents/s, CPU).
pub async fn run_of(
    env: &Env,
    scenario: &str,
    (batch, inserters): (usize, usize),
    documents: u64,
) -> anyhow::Result<(f64, String)> {
    let cell = fresh(env, scenario, batch, inserters, Until::Documents(documents)).await?;
    Ok((cell.rate, cell.cpu))
}

/// `measure` in a database of its own, dropped afterwards.
async fn fresh(
    env: &Env,
    scenario: &str,
    batch: usize,
    inserters: usize,
    until: Until,
) -> anyhow::Result<Cell> {
    let database = env.database(scenario);
    let measured = measure(env, &database, batch, inserters, until).await;
    env.drop_database(&database).await;
    measured
}

/// The cells as (batch index, inserters index), in the order they run: quarter `q` of the
/// sweep holds the cells whose indexes add up to `q` modulo the side of the square.
fn order() -> Vec<(usize, usize)> {
    const SIDE: usize = BATCHES.len();
    const _: () = assert!(INSERTERS.len() == SIDE, "the sweep is a square");
    (0..SIDE)
        .flat_map(|q| (0..SIDE).map(move |b| (b, (q + SIDE - b) % SIDE)))
        .collect()
}

fn configuration(batch: usize, inserters: usize) -> String {
    format!("batch {batch} x {inserters} inserter(s)")
}

/// What one cell measured.
#[derive(Debug, Clone)]
struct Cell {
    /// Documents/s.
    rate: f64,
    /// Documents inserted while measured.
    documents: u64,
    /// The store's CPU over the cell, % of one core (when its process is known).
    store_cpu: Option<f64>,
    /// Every measured process's CPU, for the details.
    cpu: String,
}

/// The best cell of the sweep: (documents/s, batch, inserters).
fn best(rates: &[Vec<Option<Cell>>]) -> Option<(f64, usize, usize)> {
    let mut best: Option<(f64, usize, usize)> = None;
    for (row, batch) in rates.iter().zip(BATCHES) {
        for (cell, inserters) in row.iter().zip(INSERTERS) {
            if let Some(Cell { rate, .. }) = *cell
                && best.is_none_or(|(b, _, _)| rate > b)
            {
                best = Some((rate, batch, inserters));
            }
        }
    }
    best
}

/// Documents/s by batch size (rows) and inserters (columns), with the store's CPU; the best
/// cell is marked.
fn sweep_table(rates: &[Vec<Option<Cell>>], duration: Duration) -> Table {
    let top = best(rates).map(|(rate, _, _)| rate);
    let mut header = vec!["batch \\ inserters".to_owned()];
    header.extend(INSERTERS.iter().map(ToString::to_string));
    let rows = rates
        .iter()
        .zip(BATCHES)
        .map(|(row, batch)| {
            let mut cells = vec![batch.to_string()];
            cells.extend(row.iter().map(|cell| {
                let Some(cell) = cell else {
                    return "failed".to_owned();
                };
                let mut text = thousands(cell.rate);
                if let Some(cpu) = cell.store_cpu {
                    text.push_str(&format!(" ({cpu:.0}%)"));
                }
                if Some(cell.rate) == top {
                    text.push_str(" best");
                }
                text
            }));
            cells
        })
        .collect();
    Table {
        title: format!(
            "Store ceiling sweep: insert_many documents/s by batch size (rows) and concurrent \
             inserters (columns), {:.0} s per cell, each in a fresh database; in brackets the \
             CPU {STORE} used, % of one core:",
            duration.as_secs_f64()
        ),
        header,
        rows,
    }
}

/// Inserts with `inserters` concurrent writers, `until` says how much.
async fn measure(
    env: &Env,
    database: &str,
    batch: usize,
    inserters: usize,
    until: Until,
) -> anyhow::Result<Cell> {
    let store = Store::connect(StoreConfig {
        uri: env.mongodb_uri.clone(),
        database: database.to_owned(),
        collection: "sensor_readings".into(),
        dead_letter_collection: "dead_letters".into(),
        dead_letter_ttl: Duration::from_secs(7 * 86_400),
        server_selection_timeout: Duration::from_secs(5),
        write_concern: None,
    })
    .await?;
    store.ensure_indexes().await?;
    let base = Timestamp::now().saturating_add_millis(-3_600_000);
    let fleet = Arc::new(Fleet::new("", SENSORS, base)?);
    let lanes = Lanes { batch, inserters };

    // Round 0 of every inserter, at once and unclocked: it opens the connections the timed
    // rounds reuse, so a short cell does not measure connection set-up.
    let mut warm_up = JoinSet::new();
    for lane in 0..inserters {
        let (store, fleet) = (store.clone(), Arc::clone(&fleet));
        warm_up.spawn(async move { lanes.insert(&store, &fleet, lane, 0).await });
    }
    let mut warmed = 0;
    while let Some(joined) = warm_up.join_next().await {
        warmed += joined.context("an inserter panicked")??;
    }

    let cpu = CpuMeter::start(&env.services);
    let started = Instant::now();
    // Rounds are claimed one at a time, so a run by volume stops at the first round past it
    // whichever inserter claims it.
    let claimed = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    for lane in 0..inserters {
        let (store, fleet, claimed) = (store.clone(), Arc::clone(&fleet), Arc::clone(&claimed));
        tasks.spawn(async move {
            let mut inserted: u64 = 0;
            let mut round = 1;
            loop {
                let more = match until {
                    Until::Elapsed(duration) => started.elapsed() < duration,
                    Until::Documents(documents) => {
                        claimed.fetch_add(batch as u64, Ordering::Relaxed) < documents
                    }
                };
                if !more {
                    break;
                }
                inserted += lanes.insert(&store, &fleet, lane, round).await?;
                round += 1;
            }
            anyhow::Ok(inserted)
        });
    }
    let mut inserted = 0;
    while let Some(joined) = tasks.join_next().await {
        inserted += joined.context("an inserter panicked")??;
    }
    // Until the last write in flight returned: every document counted was acknowledged.
    let elapsed = started.elapsed().as_secs_f64();
    let shares = cpu.shares();
    let stored = env.count_readings(database, true).await?;
    anyhow::ensure!(
        stored == warmed + inserted,
        "inserted {} documents but the collection holds {stored}",
        warmed + inserted
    );
    Ok(Cell {
        rate: inserted as f64 / elapsed,
        documents: inserted,
        store_cpu: shares
            .iter()
            .find_map(|(name, share)| (name == STORE).then_some(*share)),
        cpu: describe(&shares),
    })
}

/// How a cell splits the fleet's sequence numbers between its inserters.
#[derive(Clone, Copy, Debug)]
struct Lanes {
    batch: usize,
    inserters: usize,
}

impl Lanes {
    /// Sequence numbers of round `round` of inserter `lane`: `k * inserters + lane` for the
    /// round's `batch` values of `k`, so never another inserter's or another round's, and each
    /// a distinct (sensor, kind, millisecond) reading.
    fn sequence(self, lane: usize, round: u64) -> impl Iterator<Item = u64> {
        let (batch, stride, lane) = (self.batch as u64, self.inserters as u64, lane as u64);
        (round * batch..(round + 1) * batch).map(move |k| k * stride + lane)
    }

    /// Inserts one round; returns the documents inserted.
    async fn insert(
        self,
        store: &Store,
        fleet: &Fleet,
        lane: usize,
        round: u64,
    ) -> anyhow::Result<u64> {
        let readings: Vec<Reading> = self
            .sequence(lane, round)
            .filter_map(|n| fleet.reading(n))
            .collect();
        let outcome = store.insert_readings(&readings).await?;
        anyhow::ensure!(
            outcome.duplicates.is_empty(),
            "{} duplicates in the ceiling's own inserts",
            outcome.duplicates.len()
        );
        Ok(readings.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn lanes_never_share_a_reading() {
        let lanes = Lanes {
            batch: 250,
            inserters: 8,
        };
        let mut seen = HashSet::new();
        for lane in 0..8 {
            for round in 0..5 {
                for n in lanes.sequence(lane, round) {
                    assert!(seen.insert(n), "{n} twice");
                }
            }
        }
        assert_eq!(seen.len(), 8 * 5 * 250);
        // Together the lanes cover a prefix of the sequence: the fleet's first readings.
        assert_eq!(seen.iter().max(), Some(&(8 * 5 * 250 - 1)));

        let base = Timestamp::parse("2026-11-27T10:00:00Z").unwrap();
        let fleet = Fleet::new("", SENSORS, base).unwrap();
        let identities: HashSet<(String, String, i64)> = seen
            .iter()
            .map(|&n| {
                let r = fleet.reading(n).unwrap();
                (
                    r.sensor_id().as_str().to_owned(),
                    r.kind().as_str().to_owned(),
                    r.timestamp().as_millis(),
                )
            })
            .collect();
        assert_eq!(identities.len(), seen.len());
    }

    #[test]
    fn every_quarter_of_the_sweep_covers_each_row_and_column_once() {
        let cells = order();
        let side = BATCHES.len();
        assert_eq!(cells.iter().collect::<HashSet<_>>().len(), side * side);
        for quarter in cells.chunks(side) {
            let rows: HashSet<usize> = quarter.iter().map(|&(b, _)| b).collect();
            let columns: HashSet<usize> = quarter.iter().map(|&(_, i)| i).collect();
            assert_eq!((rows.len(), columns.len()), (side, side), "{quarter:?}");
        }
    }

    #[test]
    fn the_sweep_table_marks_the_best_cell_and_failures() {
        let cell = |rate, store_cpu| {
            Some(Cell {
                rate,
                documents: 0,
                store_cpu,
                cpu: String::new(),
            })
        };
        let mut rates = vec![vec![cell(10_000.0, Some(99.6)); INSERTERS.len()]; BATCHES.len()];
        rates[2][1] = cell(41_467.0, Some(124.0));
        rates[0][2] = cell(9_000.0, None);
        rates[3][3] = None;
        assert_eq!(best(&rates), Some((41_467.0, BATCHES[2], 2)));
        let table = sweep_table(&rates, Duration::from_secs(5));
        assert_eq!(table.header.len(), INSERTERS.len() + 1);
        assert_eq!(table.rows.len(), BATCHES.len());
        assert_eq!(table.rows[2][0], BATCHES[2].to_string());
        assert_eq!(table.rows[2][2], "41,467 (124%) best");
        assert_eq!(table.rows[0][1], "10,000 (100%)");
        assert_eq!(table.rows[0][3], "9,000");
        assert_eq!(table.rows[3][4], "failed");
        assert!(table.title.contains("5 s per cell"), "{}", table.title);
        assert_eq!(best(&[vec![None; 4]]), None);
    }
}
