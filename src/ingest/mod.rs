//! The writer side of the pipeline: from the local log into MongoDB and Redis.
//!
//! Three tasks:
//! - `writer`: reads the log in order, judges each message (`domain::decode`, or the Sparkplug
//!   edge nodes' sessions), stores readings and dead letters in MongoDB (retrying until it
//!   succeeds: the log holds them meanwhile), then the sessions the batch changed, and marks the
//!   log position stored;
//! - `cache_updater`: adds newly stored readings to the Redis latest sets. It is fed through a
//!   bounded queue the writer never waits on: when the queue is full or Redis is down, the sets
//!   are marked stale instead;
//! - `repair`: probes Redis, and rebuilds from MongoDB every set marked stale, or all of them
//!   after Redis restarted or was flushed.
//!
//! Ingest is where the adapters meet; it must not touch the broker or serve HTTP.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::{StreamExt as _, TryStreamExt as _};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::cache::{Cache, Health, LATEST};
use crate::domain::{DeadLetter, DeadLetterBudget, Limits, Reading, Reason, SensorId, decode};
use crate::journal::{Journal, JournalReader, Record};
use crate::metrics::{Histogram, Metrics, Seconds};
use crate::sparkplug::{self, NodeKey, NodeSession, Sessions};
use crate::store::{Store, StoreError};

/// How much of the log one batch takes at most.
const BATCH_BYTES: usize = 1 << 20;
/// Batches on their way to MongoDB at once.
const IN_FLIGHT: usize = 4;
/// Writes of readings to MongoDB at once, each for its own share of the sensors (`lane_of`).
const LANES: usize = 2;
/// A MongoDB write not answered within this time is abandoned and tried again.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Dead letters logged one by one per batch; the rest are counted in one line.
const LOGGED_DEAD_LETTERS: usize = 5;
/// Redis updates queued before the writer marks sets stale instead.
const CACHE_QUEUE: usize = 16;

/// When the writer stops.
#[derive(Clone, Debug)]
pub struct WriterStop {
    /// Intake has stopped: store what the log holds, then return.
    pub drain: CancellationToken,
    /// The grace period is over: return now, leaving the rest to the next start's replay.
    pub abort: CancellationToken,
}

/// Everything the writer needs.
#[derive(Debug)]
pub struct Writer {
    pub journal: Journal,
    pub reader: JournalReader,
    pub store: Store,
    pub limits: Limits,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub cache_tx: mpsc::Sender<Vec<Reading>>,
    /// Newly stored readings go out here, to `/stream` subscribers; never waits.
    pub live: Arc<crate::live::Live>,
    /// Which dead letters are stored; the rest are counted and dropped. Readings never pass
    /// through it.
    pub dead_letter_budget: DeadLetterBudget,
    /// The Sparkplug edge nodes' sessions, as stored when the writer started.
    pub sparkplug: Sessions,
    /// Edge nodes to ask for a rebirth, for the broker side to publish; never waits.
    pub rebirths: mpsc::Sender<NodeKey>,
}

/// The summary's writes are paced to take about 1/`SUMMARY_SHARE` of the time at most.
const SUMMARY_SHARE: u32 = 50;

/// How long `summaries` pauses between writes.
#[derive(Clone, Copy, Debug)]
pub struct SummaryPace {
    /// The pause after a cheap write: how far the summary trails the readings at light load.
    pub least: Duration,
    /// The longest pause, however costly the last write was.
    pub most: Duration,
}

impl SummaryPace {
    /// The pause after a write that took `took`: `SUMMARY_SHARE` times as long, within bounds.
    pub fn next(&self, took: Duration) -> Duration {
        took.saturating_mul(SUMMARY_SHARE)
            .clamp(self.least, self.most)
    }
}

/// Under load, Redis is updated at most this often. Each update sends a sensor only its newest
/// ten of the interval, so at full ingest (about 9 readings per sensor per batch of the log,
/// several batches a second) one update per interval costs Redis and this process less than one
/// per batch: 6% of a core for Redis against 8%, and ingest 5% faster (BENCHMARKS.md). The
/// latest ten then trail MongoDB by this much at most.
const CACHE_EVERY: Duration = Duration::from_millis(250);
/// An update of at least this many readings is under load: the next one waits for
/// `CACHE_EVERY`. Below it, every batch goes to Redis at once.
const CACHE_BUSY: usize = 2_000;

/// A queue to the cache updater; the writer never waits on it.
pub fn cache_queue() -> (mpsc::Sender<Vec<Reading>>, mpsc::Receiver<Vec<Reading>>) {
    mpsc::channel(CACHE_QUEUE)
}

/// A batch MongoDB took, with the positions of its readings, then of its dead letters, that
/// were already stored.
type Stored = (Batch, Vec<usize>, Vec<usize>);

/// A batch read from the log and judged, on its way to MongoDB.
#[derive(Debug)]
struct Batch {
    readings: Vec<Reading>,
    dead: Vec<DeadLetter>,
    /// Dead letters over the budget, by reason: counted, not stored.
    dropped: Vec<(Reason, u64)>,
    /// Records read from the log for this batch.
    records: usize,
    /// The log position just past the batch.
    end: u64,
    /// Read from the part of the log a previous run had not marked stored.
    replayed: bool,
    /// Positions of Sparkplug historical readings: stored, but neither in Redis nor live.
    historical: HashSet<usize>,
    /// The Sparkplug sessions the batch changed, as they are at its end.
    sessions: Vec<(NodeKey, NodeSession)>,
}

impl Writer {
    /// Runs until stopped. The log's contents at start (past the checkpoint) are a replay: a
    /// crash may have stored them without updating Redis, so their sensors are rebuilt.
    ///
    /// Up to `IN_FLIGHT` batches are on their way to MongoDB at once. Each batch's readings are
    /// split between `LANES` lanes by sensor, and each lane writes its parts one after another:
    /// the server always has a write of each lane in hand, the lanes' writes never touch the
    /// same sensor, and a lane ahead of the other goes on with its part of the next batches.
    /// Batches complete in log order: the stored mark moves past a batch only once every lane
    /// wrote its part.
    pub async fn run(mut self, stop: WriterStop) {
        let replay_end = self.journal.end();
        if replay_end > self.reader.position() {
            tracing::info!(
                bytes = replay_end - self.reader.position(),
                "replaying the local log past its checkpoint"
            );
        }
        let lanes: Vec<mpsc::Sender<Part>> = (0..LANES)
            .map(|_| {
                let (tx, rx) = mpsc::channel(IN_FLIGHT);
                tokio::spawn(lane(
                    self.store.clone(),
                    Arc::clone(&self.metrics),
                    self.journal.clone(),
                    rx,
                    stop.abort.clone(),
                ));
                tx
            })
            .collect();
        let mut in_flight: VecDeque<JoinHandle<Option<Stored>>> = VecDeque::new();
        loop {
            if stop.abort.is_cancelled() {
                return;
            }
            while in_flight.len() < IN_FLIGHT && self.reader.position() < self.journal.end() {
                let Some(batch) = self.next_batch(replay_end, &stop.abort).await else {
                    return;
                };
                // Handed to the lanes here, in log order, so each lane writes its parts in order.
                let Some(submitted) = submit(batch, &lanes).await else {
                    return;
                };
                in_flight.push_back(tokio::spawn(store_batch(
                    self.store.clone(),
                    Arc::clone(&self.metrics),
                    self.journal.clone(),
                    submitted,
                    stop.abort.clone(),
                )));
            }
            // With room in the pipeline, new data is worth waking for too.
            let room = self.reader.position() >= self.journal.end() && in_flight.len() < IN_FLIGHT;
            let Some(oldest) = in_flight.front_mut() else {
                // The app closes the log before it asks for a drain, so this end is final.
                if stop.drain.is_cancelled() && self.journal.is_closed() {
                    return;
                }
                let woke = self.wait_for_more(&stop).await;
                if !woke && !self.journal.is_closed() && !stop.abort.is_cancelled() {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                continue;
            };
            tokio::select! {
                done = oldest => {
                    in_flight.pop_front();
                    match done {
                        Ok(Some((batch, duplicates, dead_duplicates))) => {
                            // In log order and after the batch's readings: a stored session
                            // never runs ahead of the stored readings (see `Sessions::judge`).
                            if !batch.sessions.is_empty()
                                && until_done(
                                    || self.store.save_sparkplug_sessions(&batch.sessions),
                                    None,
                                    &self.metrics,
                                    &self.journal,
                                    &stop.abort,
                                )
                                .await
                                .is_none()
                            {
                                return;
                            }
                            self.finish(batch, &duplicates, &dead_duplicates);
                        }
                        // Aborted (or the task panicked): the log keeps the rest.
                        _ => return,
                    }
                }
                _ = self.reader.wait(std::future::pending()), if room => {}
            }
        }
    }

    /// Waits for data past our position, or for a drain or abort. False when it gave up.
    async fn wait_for_more(&mut self, stop: &WriterStop) -> bool {
        let (drain, abort) = (stop.drain.clone(), stop.abort.clone());
        self.reader
            .wait(async move {
                tokio::select! {
                    () = drain.cancelled() => {}
                    () = abort.cancelled() => {}
                }
            })
            .await
    }

    /// Reads and judges the next batch. `None` when aborted.
    async fn next_batch(&mut self, replay_end: u64, abort: &CancellationToken) -> Option<Batch> {
        let records = loop {
            match tokio::task::block_in_place(|| self.reader.read(BATCH_BYTES)) {
                Ok(records) => break records,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the local log; retrying");
                    if sleep_or_abort(Duration::from_secs(1), abort).await {
                        return None;
                    }
                }
            }
        };
        // The reader's count only grows; `fetch_max` keeps the counter a counter.
        self.metrics
            .journal_corrupt_bytes
            .fetch_max(self.reader.corrupt_bytes(), Ordering::Relaxed);
        let replayed = records
            .records
            .iter()
            .filter(|r| r.lsn < replay_end)
            .count();
        self.metrics
            .journal_records_replayed
            .fetch_add(replayed as u64, Ordering::Relaxed);
        self.metrics
            .batch_records
            .observe(records.records.len() as f64);
        let (readings, mut dead) = judge(
            &records.records,
            &self.limits,
            self.journal.log_id(),
            &mut self.sparkplug,
        );
        for node in self.sparkplug.take_rebirths() {
            // A request lost here is asked again by the node's next message after a while.
            if self.rebirths.try_send(node.clone()).is_err() {
                tracing::warn!(%node, "cannot queue a Sparkplug rebirth request");
            }
        }
        let dropped = self.dead_letter_budget.retain(&mut dead);
        Some(Batch {
            readings,
            dead,
            dropped,
            records: records.records.len(),
            end: records.end,
            replayed: replayed > 0,
            historical: self.sparkplug.take_historical().into_iter().collect(),
            sessions: self
                .sparkplug
                .take_changed(self.journal.log_id(), records.end),
        })
    }

    /// Accounts for a stored batch, passes its new readings to Redis and moves the stored mark.
    /// Dead letters MongoDB already held (a replay after a crash) are not counted again, as
    /// readings are not.
    fn finish(&self, batch: Batch, duplicates: &[usize], dead_duplicates: &[usize]) {
        let duplicates: HashSet<usize> = duplicates.iter().copied().collect();
        let stored_now = || {
            (batch.readings.iter().enumerate())
                .filter_map(|(i, r)| (!duplicates.contains(&i)).then_some(r))
        };
        // Before the counter moves: whoever sees a reading counted finds it on `/sensors`.
        self.store.summarise(stored_now());
        self.metrics.stored.fetch_add(
            (batch.readings.len() - duplicates.len()) as u64,
            Ordering::Relaxed,
        );
        self.metrics
            .duplicates
            .fetch_add(duplicates.len() as u64, Ordering::Relaxed);
        let new_letters = (batch.dead.iter().enumerate())
            .filter(|(i, _)| !dead_duplicates.contains(i))
            .map(|(_, letter)| letter);
        for (i, letter) in new_letters.enumerate() {
            self.metrics.dead_letter(letter.reason);
            // A device gone haywire must not flood the log: a few per batch, then a count.
            if i < LOGGED_DEAD_LETTERS {
                tracing::warn!(
                    reason = letter.reason.code(),
                    topic = %letter.topic,
                    detail = %letter.message,
                    "dead letter"
                );
            }
        }
        if batch.dead.len() > LOGGED_DEAD_LETTERS {
            tracing::warn!(
                more = batch.dead.len() - LOGGED_DEAD_LETTERS,
                "more dead letters in this batch; see GET /deadletters"
            );
        }
        for &(reason, n) in &batch.dropped {
            self.metrics.dead_letters_over_budget(reason, n);
            tracing::warn!(
                reason = reason.code(),
                dropped = n,
                "dead letters over the budget (--dead-letters-per-second) counted, not stored"
            );
        }
        self.metrics
            .journal_records_done
            .fetch_add(batch.records as u64, Ordering::Relaxed);
        // Historical readings fill in the past: they move neither the latest ten nor the stream.
        let quiet: HashSet<usize> = duplicates.union(&batch.historical).copied().collect();
        self.live.publish(
            (batch.readings.iter().enumerate())
                .filter_map(|(i, r)| (!quiet.contains(&i)).then_some(r)),
        );
        if batch.replayed {
            self.health.mark_dirty(&batch.readings);
        } else {
            let new = newly_stored(batch.readings, &quiet);
            if !new.is_empty()
                && let Err(
                    mpsc::error::TrySendError::Full(lost) | mpsc::error::TrySendError::Closed(lost),
                ) = self.cache_tx.try_send(new)
            {
                self.health.mark_dirty(&lost);
            }
        }
        self.journal.mark_stored(batch.end);
    }
}

/// Writes the sensor summary (`/sensors`, `/latest`) off the writer's path: what the writer
/// summarised since the last write (`Store::summarise`) goes out as one command per 1,000
/// sensors, so its cost follows the sensors that reported, not the batches. A failed write keeps
/// its part for the next round. Runs until `stop`, then writes what is left once more.
///
/// An upsert costs the store several inserts, so the pause between writes follows their cost:
/// `pace.next` gives the summary a small share of the time (`SUMMARY_SHARE`). Reads in this
/// process add what is not written yet, so its `/sensors` and `/latest` never trail; other
/// instances' trail by `pace.least` when writes are cheap, by up to `pace.most` under load. A
/// crash loses the counts of that interval (first and last seen and the last value are set
/// again by the sensor's next reading).
pub async fn summaries(
    store: Store,
    metrics: Arc<Metrics>,
    pace: SummaryPace,
    stop: CancellationToken,
) {
    let mut failures: u32 = 0;
    let mut pause = pace.least;
    loop {
        let stopping = tokio::select! {
            () = tokio::time::sleep(pause) => false,
            () = stop.cancelled() => true,
        };
        let began = tokio::time::Instant::now();
        pause = match store.flush_summaries(WRITE_TIMEOUT).await {
            Ok(0) => pace.least,
            Ok(_) => {
                failures = 0;
                pace.next(began.elapsed())
            }
            Err((error, kept)) => {
                metrics.store_errors.fetch_add(1, Ordering::Relaxed);
                if failures.is_multiple_of(10) {
                    tracing::warn!(
                        error = crate::error_chain(&error),
                        sensors = kept,
                        "cannot update the sensor summary; trying again"
                    );
                }
                failures += 1;
                pace.next(began.elapsed())
            }
        };
        if stopping {
            return;
        }
    }
}

/// Judges records read from the log: readings, and dead letters whose ids are unique per
/// captured message, or per element of one (`<log id>:<LSN>` for the whole message,
/// `<log id>:<LSN>:<index>` for one element of a batch or one metric of a Sparkplug payload),
/// and the same when a replay judges it again. Sparkplug messages go to their edge node's
/// session, in log order.
fn judge(
    records: &[Record],
    limits: &Limits,
    log_id: &str,
    sparkplug: &mut Sessions,
) -> (Vec<Reading>, Vec<DeadLetter>) {
    let mut readings = Vec::with_capacity(records.len());
    let mut dead = Vec::new();
    for record in records {
        if sparkplug::is_sparkplug_topic(&record.message.topic) {
            sparkplug.judge(
                log_id,
                record.lsn,
                &record.message,
                limits,
                &mut readings,
                &mut dead,
            );
            continue;
        }
        match decode(&record.message, limits) {
            Ok(decoded) => {
                readings.extend(decoded.readings);
                for (i, rejection) in decoded.rejected {
                    let id = format!("{log_id}:{}:{i}", record.lsn);
                    dead.push(DeadLetter::new(id, &record.message, rejection));
                }
            }
            Err(rejection) => {
                let id = format!("{log_id}:{}", record.lsn);
                dead.push(DeadLetter::new(id, &record.message, rejection));
            }
        }
    }
    (readings, dead)
}

/// The readings a batch stored, without those MongoDB already had: only these go to Redis,
/// since a duplicate with another value must not show where MongoDB kept the first.
fn newly_stored(readings: Vec<Reading>, duplicates: &HashSet<usize>) -> Vec<Reading> {
    readings
        .into_iter()
        .enumerate()
        .filter_map(|(i, r)| (!duplicates.contains(&i)).then_some(r))
        .collect()
}

/// One lane's share of a batch's readings: positions in `readings`.
#[derive(Debug)]
struct Part {
    readings: Arc<Vec<Reading>>,
    which: Vec<usize>,
    /// The positions (in `readings`) of those already stored; dropped unsent when aborted.
    done: tokio::sync::oneshot::Sender<Vec<usize>>,
}

/// The lane that writes a sensor's readings: a sensor always goes to the same one, so
/// concurrent writes touch disjoint parts of the indexes that lead with the sensor, and each
/// write holds longer runs of one sensor's readings (two inserters of 8,000 sorted readings
/// each, for 35 s: 51,200 documents/s with the sensors split between them, 48,100 with every
/// sensor in both; an experiment with `scripts/bench`'s ceiling).
fn lane_of(sensor: &SensorId, lanes: usize) -> usize {
    sensor.stable_hash() as usize % lanes
}

/// Writes the parts it is handed, one at a time, in order, each until MongoDB takes it.
async fn lane(
    store: Store,
    metrics: Arc<Metrics>,
    journal: Journal,
    mut parts: mpsc::Receiver<Part>,
    abort: CancellationToken,
) {
    while let Some(Part {
        readings,
        which,
        done,
    }) = parts.recv().await
    {
        let Some(inserted) = until_done(
            || store.insert_some(&readings, &which),
            Some(&metrics.mongodb_write_readings),
            &metrics,
            &journal,
            &abort,
        )
        .await
        else {
            return;
        };
        // Let go of the batch first, so that its task takes it back without a copy.
        drop(readings);
        // The batch's task is gone only when the writer stopped.
        let _ = done.send(inserted.duplicates);
    }
}

/// A batch whose readings the lanes are writing.
#[derive(Debug)]
struct Submitted {
    batch: Batch,
    readings: Arc<Vec<Reading>>,
    parts: Vec<tokio::sync::oneshot::Receiver<Vec<usize>>>,
}

/// Splits a batch's readings between the lanes and hands each its part. `None` when a lane
/// is gone (the writer is stopping).
async fn submit(mut batch: Batch, lanes: &[mpsc::Sender<Part>]) -> Option<Submitted> {
    let readings = Arc::new(std::mem::take(&mut batch.readings));
    let mut shares = vec![Vec::new(); lanes.len()];
    for (i, r) in readings.iter().enumerate() {
        shares[lane_of(r.sensor_id(), lanes.len())].push(i);
    }
    let mut parts = Vec::with_capacity(lanes.len());
    for (lane, which) in lanes.iter().zip(shares) {
        if which.is_empty() {
            continue;
        }
        let (done, part) = tokio::sync::oneshot::channel();
        let readings = Arc::clone(&readings);
        lane.send(Part {
            readings,
            which,
            done,
        })
        .await
        .ok()?;
        parts.push(part);
    }
    Some(Submitted {
        batch,
        readings,
        parts,
    })
}

/// Waits for the lanes to store a batch's readings, then stores its dead letters, retrying
/// until MongoDB takes them. Returns the batch with the positions of readings already stored;
/// `None` when aborted first.
async fn store_batch(
    store: Store,
    metrics: Arc<Metrics>,
    journal: Journal,
    submitted: Submitted,
    abort: CancellationToken,
) -> Option<Stored> {
    let Submitted {
        mut batch,
        readings,
        parts,
    } = submitted;
    let mut duplicates = Vec::new();
    for part in parts {
        duplicates.extend(part.await.ok()?);
    }
    // The lanes let go of their share once they answered.
    batch.readings = Arc::try_unwrap(readings).unwrap_or_else(|shared| shared.to_vec());
    let kept = until_done(
        || store.insert_dead_letters(&batch.dead),
        (!batch.dead.is_empty()).then_some(&metrics.mongodb_write_dead_letters),
        &metrics,
        &journal,
        &abort,
    )
    .await?;
    Some((batch, duplicates, kept.duplicates))
}

/// Runs `write` until MongoDB accepts it, with backoff, timing each attempt in `timed`;
/// `None` when aborted first.
async fn until_done<T, F, Fut>(
    mut write: F,
    timed: Option<&Histogram<Seconds>>,
    metrics: &Metrics,
    journal: &Journal,
    abort: &CancellationToken,
) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StoreError>>,
{
    let mut backoff = Backoff::default();
    loop {
        // A server that hangs rather than fails would otherwise stall here without a word; the
        // abandoned attempt may still complete, which the retry then sees as duplicates.
        let started = std::time::Instant::now();
        let outcome = tokio::time::timeout(WRITE_TIMEOUT, write()).await;
        if let Some(histogram) = timed {
            histogram.observe(started.elapsed().as_secs_f64());
        }
        let error = match outcome {
            Ok(Ok(done)) => return Some(done),
            Ok(Err(e)) => e,
            Err(_) => StoreError::TimedOut(WRITE_TIMEOUT),
        };
        metrics.store_errors.fetch_add(1, Ordering::Relaxed);
        backoff.log(&error, journal.pending_bytes());
        if sleep_or_abort(backoff.next(), abort).await {
            return None;
        }
    }
}

/// Exponential backoff from 50 ms to 2 s, logging the first failure and then every tenth.
#[derive(Debug, Default)]
struct Backoff {
    failures: u32,
}

impl Backoff {
    fn next(&mut self) -> Duration {
        self.failures += 1;
        Duration::from_millis(
            50u64
                .saturating_mul(1 << (self.failures - 1).min(6))
                .min(2_000),
        )
    }

    fn log(&self, error: &(dyn std::error::Error + 'static), pending_bytes: u64) {
        if self.failures.is_multiple_of(10) {
            tracing::error!(
                error = crate::error_chain(error),
                attempt = self.failures + 1,
                pending_bytes,
                "MongoDB write failed; readings stay in the local log and are retried"
            );
        }
    }
}

/// Sleeps; true when `abort` fired first.
async fn sleep_or_abort(duration: Duration, abort: &CancellationToken) -> bool {
    tokio::select! {
        () = tokio::time::sleep(duration) => false,
        () = abort.cancelled() => true,
    }
}

/// Applies stored readings to Redis until the queue closes, at most every `CACHE_EVERY` under load.
pub async fn cache_updater(
    mut rx: mpsc::Receiver<Vec<Reading>>,
    cache: Cache,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
) {
    let mut pending: Vec<Reading> = Vec::new();
    // When the last update began, if it was a busy one.
    let mut busy: Option<tokio::time::Instant> = None;
    let mut open = true;
    while open && let Some(batch) = rx.recv().await {
        pending.extend(batch);
        // Under load, wait for the rest of the interval, taking in what comes meanwhile (the
        // queue never fills): one update then carries the interval's readings.
        if let Some(due) = busy.map(|at| at + CACHE_EVERY) {
            loop {
                tokio::select! {
                    more = rx.recv() => match more {
                        Some(more) => pending.extend(more),
                        None => {
                            open = false;
                            break;
                        }
                    },
                    () = tokio::time::sleep_until(due) => break,
                }
            }
        }
        while let Ok(more) = rx.try_recv() {
            pending.extend(more);
        }
        busy = (pending.len() >= CACHE_BUSY).then(tokio::time::Instant::now);
        if !health.is_up() || !cache.is_connected() {
            health.mark_dirty(&pending);
        } else if let Err(e) = cache.apply(&pending).await {
            metrics.cache_errors.fetch_add(1, Ordering::Relaxed);
            health.set_up(false);
            health.mark_dirty(&pending);
            tracing::warn!(
                error = crate::error_chain(&e),
                "Redis update failed; latest sets will be rebuilt from MongoDB"
            );
        }
        pending.clear();
    }
}

/// What this process knew of Redis, kept in a file beside the local log so that a restart can
/// trust a Redis that kept its data: Redis's run id when last seen, and whether any set was
/// stale. Written without fsync: it guards against a process restart, and a machine that lost
/// power also restarted Redis (a new run id).
#[derive(Debug)]
pub struct CacheState {
    path: std::path::PathBuf,
    /// (run id, stale) as last written; the lock also orders "stale" against "clean".
    written: std::sync::Mutex<(String, bool)>,
}

impl CacheState {
    pub fn new(dir: &std::path::Path) -> Self {
        Self {
            path: dir.join("cache-state"),
            written: std::sync::Mutex::new((String::new(), true)),
        }
    }

    /// The run id and staleness recorded by the previous run, if it left a record.
    pub fn previous(&self) -> Option<(String, bool)> {
        let text = std::fs::read_to_string(&self.path).ok()?;
        let mut lines = text.lines();
        let run_id = lines.next()?.trim().to_owned();
        let stale = lines.next()?.trim() != "clean";
        Some((run_id, stale))
    }

    fn written(&self) -> std::sync::MutexGuard<'_, (String, bool)> {
        self.written
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self, state: &mut (String, bool), run_id: Option<&str>, stale: bool) {
        let run_id = run_id.unwrap_or(&state.0).to_owned();
        if state.0 == run_id && state.1 == stale {
            return;
        }
        let tmp = self.path.with_extension("tmp");
        let text = format!("{run_id}\n{}\n", if stale { "stale" } else { "clean" });
        match std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, &self.path)) {
            Ok(()) => *state = (run_id, stale),
            Err(e) => tracing::warn!(
                error = %e,
                path = %self.path.display(),
                "cannot record the Redis cache state; the next start rebuilds every set"
            ),
        }
    }

    /// Some set is stale: a restart must not trust Redis until it was rebuilt.
    pub fn mark_stale(&self) {
        let mut state = self.written();
        self.write(&mut state, None, true);
    }

    /// Records Redis's run id, and "clean" when `health` has no mark left.
    fn settle(&self, run_id: &str, health: &Health) {
        let mut state = self.written();
        let clean = health.unflag();
        self.write(&mut state, Some(run_id), !clean);
    }
}

/// Keeps Redis honest: every `every`, checks whether it restarted or was flushed, and rebuilds
/// from MongoDB the sets marked stale. Runs until `stop`.
///
/// At start every set counts as stale until the first probe. A Redis that still holds the
/// marker, with the run id the previous run recorded and no stale set recorded, is trusted:
/// only the sensors the log's replay touches are rebuilt. Otherwise every set is.
pub async fn repair(
    cache: Cache,
    store: Store,
    health: Arc<Health>,
    state: Arc<CacheState>,
    metrics: Arc<Metrics>,
    every: Duration,
    stop: CancellationToken,
) {
    let previous = state.previous();
    let started = health.generation();
    let mut known_run_id: Option<String> = None;
    loop {
        match cache.probe().await {
            Ok(probe) => {
                match &known_run_id {
                    None => {
                        let trusted = probe.marked
                            && previous
                                .as_ref()
                                .is_some_and(|(id, stale)| *id == probe.run_id && !stale);
                        if trusted {
                            health.clear_all(started);
                            health.clear_overall(started);
                        } else {
                            tracing::info!(
                                marker = probe.marked,
                                recorded = previous.is_some(),
                                "Redis may not hold what MongoDB does; rebuilding every latest set"
                            );
                        }
                    }
                    Some(id) if *id != probe.run_id || !probe.marked => {
                        tracing::warn!(
                            restarted = *id != probe.run_id,
                            flushed = !probe.marked,
                            "Redis lost its data; rebuilding every latest set from MongoDB"
                        );
                        health.mark_all_dirty();
                    }
                    Some(_) if !probe.marked => health.mark_all_dirty(),
                    Some(_) => {}
                }
                known_run_id = Some(probe.run_id.clone());
                health.set_up(true);
                // A shutdown does not wait for a rebuild (60,000 sets take minutes): the marker
                // is set only once every set is rebuilt, so the next start rebuilds them again.
                let rebuilt = tokio::select! {
                    rebuilt = rebuild_stale(&cache, &store, &health, &metrics) => rebuilt,
                    () = stop.cancelled() => return,
                };
                if let Err(e) = rebuilt {
                    tracing::warn!(
                        error = crate::error_chain(&*e),
                        "rebuilding Redis latest sets failed; will retry"
                    );
                }
                let state = Arc::clone(&state);
                let health = Arc::clone(&health);
                let run_id = probe.run_id;
                let _ = tokio::task::spawn_blocking(move || state.settle(&run_id, &health)).await;
            }
            Err(e) => {
                if health.is_up() {
                    tracing::warn!(
                        error = crate::error_chain(&e),
                        "Redis is down; latest-ten reads go to MongoDB"
                    );
                }
                health.set_up(false);
            }
        }
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = stop.cancelled() => return,
        }
    }
}

/// Sensors whose sets a full rebuild takes from MongoDB in one step.
const REBUILD_STEP: u32 = 1000;
/// Sets rebuilt concurrently.
const REBUILD_CONCURRENCY: usize = 16;

#[derive(Debug, thiserror::Error)]
enum RebuildError {
    #[error("reading MongoDB failed")]
    Store(#[from] StoreError),
    #[error("writing Redis failed")]
    Cache(#[from] crate::cache::CacheError),
}

async fn rebuild_stale(
    cache: &Cache,
    store: &Store,
    health: &Health,
    metrics: &Metrics,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let (all, overall, _) = health.pending(0);
    if all != 0 {
        let generation = health.generation();
        let mut after: Option<SensorId> = None;
        let mut rebuilt = 0;
        loop {
            let step = store.sensor_ids_after(after.as_ref(), REBUILD_STEP).await?;
            let Some(last) = step.last().cloned() else {
                break;
            };
            rebuild_sensors(cache, store, &step).await?;
            rebuilt += step.len();
            metrics
                .cache_rebuilds
                .fetch_add(step.len() as u64, Ordering::Relaxed);
            health.rebuilt_up_to(generation, last.clone());
            after = Some(last);
        }
        // Marked only now: a crash midway leaves the marker absent and the rebuild redone.
        cache.mark().await?;
        health.clear_all(generation);
        tracing::info!(sensors = rebuilt, "Redis latest sets rebuilt from MongoDB");
    }
    loop {
        let generation = health.generation();
        let (_, _, sensors) = health.pending(256);
        if sensors.is_empty() {
            break;
        }
        let ids: Vec<SensorId> = sensors.into_iter().map(|(id, _)| id).collect();
        rebuild_sensors(cache, store, &ids).await?;
        for id in &ids {
            health.clear_sensor(id, generation);
        }
        metrics
            .cache_rebuilds
            .fetch_add(ids.len() as u64, Ordering::Relaxed);
    }
    if overall != 0 || all != 0 {
        let generation = health.generation();
        let latest = store.latest(None, None, LATEST as u32).await?;
        cache.rebuild(None, &latest).await?;
        health.clear_overall(generation);
    }
    Ok(())
}

/// Merges each sensor's latest ten from MongoDB into its Redis set, a few at a time.
async fn rebuild_sensors(
    cache: &Cache,
    store: &Store,
    ids: &[SensorId],
) -> Result<(), RebuildError> {
    // Where each sensor's newest readings are, from its summary: most sensors are then one
    // query, however old their history. Without a summary, the search starts from now.
    let hints = store.latest_hints(ids).await?;
    // Owned futures: borrowed ones make the repair task's future not provably `Send`.
    let rebuilds = ids.iter().cloned().map(|id| {
        let (cache, store) = (cache.clone(), store.clone());
        let hint = hints.get(&id).copied();
        async move {
            let latest = store.latest_hinted(&id, LATEST as u32, hint).await?;
            cache.rebuild(Some(&id), &latest).await?;
            Ok::<_, RebuildError>(())
        }
    });
    futures_util::stream::iter(rebuilds)
        .buffer_unordered(REBUILD_CONCURRENCY)
        .try_collect::<()>()
        .await
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::domain::{Captured, Reason, Timestamp};

    fn record(lsn: u64, topic: &str, payload: &str) -> Record {
        Record {
            lsn,
            message: Captured::new(
                Timestamp::parse("2024-05-01T10:00:00Z").unwrap(),
                Bytes::copy_from_slice(topic.as_bytes()),
                Bytes::copy_from_slice(payload.as_bytes()),
                16 * 1024,
            ),
        }
    }

    #[test]
    fn judging_splits_readings_from_dead_letters_with_stable_ids() {
        let records = [
            record(
                0,
                "sensors/temperature",
                r#"{"sensor_id":"a","value":1,"timestamp":"2024-05-01T09:00:00Z"}"#,
            ),
            record(90, "sensors/temperature", "not json"),
            record(
                120,
                "sensors/humidity",
                r#"{"sensor_id":"a","value":"2.5","timestamp":"2024-05-01T09:00:00Z"}"#,
            ),
            record(
                200,
                "sensors",
                r#"{"sensor_id":"a","value":1,"timestamp":"2024-05-01"}"#,
            ),
        ];
        let (readings, dead) = judge(
            &records,
            &Limits::default(),
            "log7",
            &mut Sessions::default(),
        );
        assert_eq!(readings.len(), 2);
        assert_eq!(readings[1].kind().as_str(), "humidity");
        assert_eq!(readings[1].value(), 2.5);
        let ids: Vec<&str> = dead.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, ["log7:90", "log7:200"]);
        assert_eq!(dead[0].reason, Reason::InvalidJson);
        assert_eq!(dead[1].reason, Reason::TopicInvalid);
        // A replay judges the same records the same way, ids included.
        let (again, dead_again) = judge(
            &records,
            &Limits::default(),
            "log7",
            &mut Sessions::default(),
        );
        assert_eq!(again, readings);
        assert_eq!(
            dead_again.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(),
            ids
        );
    }

    #[test]
    fn a_batch_yields_its_readings_and_a_dead_letter_per_bad_element() {
        let records = [record(
            40,
            "sensors/temperature",
            r#"[{"sensor_id":"a","value":1,"timestamp":"2024-05-01T09:00:00Z"},
                {"sensor_id":"b","value":"x","timestamp":"2024-05-01T09:00:00Z"},
                {"sensor_id":"c","value":3,"timestamp":"2024-05-01T09:00:00Z"}]"#,
        )];
        let (readings, dead) = judge(
            &records,
            &Limits::default(),
            "log7",
            &mut Sessions::default(),
        );
        let ids: Vec<&str> = readings.iter().map(|r| r.sensor_id().as_str()).collect();
        assert_eq!(ids, ["a", "c"]);
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].id, "log7:40:1");
        assert_eq!(dead[0].reason, Reason::ValueNotNumeric);
        assert!(
            dead[0].message.starts_with("element 1: "),
            "{}",
            dead[0].message
        );
        assert_eq!(
            judge(
                &records,
                &Limits::default(),
                "log7",
                &mut Sessions::default()
            ),
            (readings, dead)
        );
    }

    #[test]
    fn a_sensor_keeps_its_lane_and_a_fleet_fills_both() {
        let id = |s: &str| SensorId::parse(s).unwrap();
        // FNV-1a of the id: the same lane on every run and every machine.
        assert_eq!(id("a").stable_hash(), 0xe40c_292c);
        assert_eq!(lane_of(&id("a"), 2), 0);
        assert_eq!(lane_of(&id("b"), 2), 1);
        assert_eq!(lane_of(&id("anything"), 1), 0);
        let mut counts = [0usize; LANES];
        for n in 1..=1000 {
            counts[lane_of(&id(&format!("temp-{n:04}")), LANES)] += 1;
        }
        let even = 1000 / LANES;
        for (lane, count) in counts.iter().enumerate() {
            assert!(
                (even * 4 / 5..=even * 6 / 5).contains(count),
                "lane {lane} has {count} of 1,000 sensors: {counts:?}"
            );
        }
    }

    #[test]
    fn only_newly_stored_readings_go_on_to_redis() {
        let records: Vec<Record> = (0..4)
            .map(|i| {
                record(
                    i,
                    "sensors/t",
                    &format!(r#"{{"sensor_id":"s{i}","value":{i},"timestamp":"2024-05-01"}}"#),
                )
            })
            .collect();
        let (readings, _) = judge(&records, &Limits::default(), "l", &mut Sessions::default());
        let new = newly_stored(readings, &HashSet::from([1, 3]));
        let ids: Vec<&str> = new.iter().map(|r| r.sensor_id().as_str()).collect();
        assert_eq!(ids, ["s0", "s2"]);
    }

    #[test]
    fn summary_writes_pause_fifty_times_their_cost_within_bounds() {
        let pace = SummaryPace {
            least: Duration::from_millis(500),
            most: Duration::from_secs(5),
        };
        let pauses: Vec<u128> = [1, 25, 80, 200, 10_000]
            .map(|ms| pace.next(Duration::from_millis(ms)).as_millis())
            .to_vec();
        assert_eq!(pauses, [500, 1250, 4000, 5000, 5000]);
    }

    #[test]
    fn backoff_grows_from_50_ms_to_a_2_s_cap() {
        let mut backoff = Backoff::default();
        let delays: Vec<u64> = (0..8).map(|_| backoff.next().as_millis() as u64).collect();
        assert_eq!(delays, [50, 100, 200, 400, 800, 1600, 2000, 2000]);
    }

    #[test]
    fn cache_state_survives_a_restart_and_orders_stale_against_clean() {
        let dir = tempfile::tempdir().unwrap();
        let state = CacheState::new(dir.path());
        assert_eq!(state.previous(), None, "a first start has no record");
        let health = Health::new();
        state.settle("run-1", &health);
        assert_eq!(
            CacheState::new(dir.path()).previous(),
            Some(("run-1".to_owned(), true)),
            "dirty at start: recorded stale"
        );
        let g = health.generation();
        health.clear_all(g);
        health.clear_overall(g);
        state.settle("run-1", &health);
        assert_eq!(
            CacheState::new(dir.path()).previous(),
            Some(("run-1".to_owned(), false))
        );
        // A mark after the clean record is told through the hook, and recorded at once.
        let hooked = Arc::new(CacheState::new(dir.path()));
        let for_hook = Arc::clone(&hooked);
        health.on_dirty(Box::new(move || for_hook.mark_stale()));
        hooked.settle("run-1", &health);
        let r = Reading::new(
            SensorId::parse("x").unwrap(),
            crate::domain::Kind::parse("t").unwrap(),
            1.0,
            Timestamp::from_millis(0).unwrap(),
        )
        .unwrap();
        health.mark_dirty([&r]);
        assert_eq!(
            CacheState::new(dir.path()).previous(),
            Some(("run-1".to_owned(), true))
        );
    }
}
