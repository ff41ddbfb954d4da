//! The sensor summary: one small document per sensor, kept up to date on the write path, so that
//! "which sensors are there, and what did each say last" never scans the readings.
//!
//! `{_id: <sensor id>, first_seen, last_seen, count, kinds: {<kind, escaped>: {first, count,
//! last: {t, v}}}}`. A stored batch becomes one `update` command with one upsert per sensor, and
//! every operator in it commutes: `$min` of the first time, `$max` of the last time and of the
//! embedded `{t, v}` document (BSON compares it by `t` first, so the newest reading's value wins,
//! whatever order two writers apply their batches in), `$inc` of the count by readings newly
//! stored. Two instances sharing MongoDB therefore never undo each other.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bson::{Bson, DateTime, Document, RawDocumentBuf, doc};
use futures_util::TryStreamExt;
use serde::Deserialize;

use super::roster::{Reloaded, Roster};
use super::{Store, StoreError};
use crate::domain::{Kind, Reading, SensorId, Timestamp};

/// Statements sent again after a write error (an upsert race on a new sensor) before giving up.
/// What the summary knows of one kind of one sensor.
#[derive(Clone, Debug, PartialEq)]
pub struct KindSummary {
    pub kind: Kind,
    pub first_seen: Timestamp,
    pub last_seen: Timestamp,
    pub last_value: f64,
    pub count: u64,
}

/// What the summary knows of one sensor, its kinds in name order.
#[derive(Clone, Debug, PartialEq)]
pub struct SensorSummary {
    pub sensor_id: SensorId,
    pub first_seen: Timestamp,
    pub last_seen: Timestamp,
    pub count: u64,
    pub kinds: Vec<KindSummary>,
}

impl SensorSummary {
    /// A sensor with no kind yet, for a fold to fill in.
    fn empty(sensor_id: SensorId) -> Self {
        Self {
            sensor_id,
            first_seen: Timestamp::MAX,
            last_seen: Timestamp::MIN,
            count: 0,
            kinds: Vec::new(),
        }
    }

    /// The latest reading of each kind.
    pub fn latest(&self) -> impl Iterator<Item = Reading> + '_ {
        self.kinds.iter().filter_map(|k| {
            Reading::new(
                self.sensor_id.clone(),
                k.kind.clone(),
                k.last_value,
                k.last_seen,
            )
        })
    }
}

/// Which sensors a summary read returns.
#[derive(Clone, Debug, Default)]
pub struct SummaryQuery {
    /// Only sensors whose id starts with this.
    pub prefix: Option<String>,
    /// Only sensors that reported this kind.
    pub kind: Option<String>,
    /// Only sensors after this id (paging).
    pub after: Option<String>,
    pub limit: u32,
}

#[derive(Debug, Deserialize)]
struct LastDoc {
    t: DateTime,
    v: f64,
}

#[derive(Debug, Deserialize)]
struct KindDoc {
    first: Option<DateTime>,
    last: Option<LastDoc>,
    #[serde(default)]
    count: i64,
}

#[derive(Debug, Deserialize)]
pub(super) struct SummaryDoc {
    #[serde(rename = "_id")]
    id: String,
    first_seen: Option<DateTime>,
    last_seen: Option<DateTime>,
    #[serde(default)]
    count: i64,
    #[serde(default)]
    kinds: BTreeMap<String, KindDoc>,
}

impl SummaryDoc {
    /// `None` for a document that names no valid sensor.
    fn into_summary(self) -> Option<SensorSummary> {
        let kinds: Vec<KindSummary> = self
            .kinds
            .into_iter()
            .filter_map(|(key, k)| {
                let last = k.last?;
                let last_seen = Timestamp::from_millis(last.t.timestamp_millis())?;
                Some(KindSummary {
                    kind: Kind::parse(&unescape_field(&key)).ok()?,
                    first_seen: k
                        .first
                        .and_then(|t| Timestamp::from_millis(t.timestamp_millis()))
                        .unwrap_or(last_seen),
                    last_seen,
                    last_value: last.v,
                    count: u64::try_from(k.count).unwrap_or(0),
                })
            })
            .collect();
        let first = kinds.iter().map(|k| k.first_seen).min()?;
        let last = kinds.iter().map(|k| k.last_seen).max()?;
        let at = |t: Option<DateTime>| t.and_then(|t| Timestamp::from_millis(t.timestamp_millis()));
        Some(SensorSummary {
            sensor_id: SensorId::parse(&self.id).ok()?,
            first_seen: at(self.first_seen).unwrap_or(first),
            last_seen: at(self.last_seen).unwrap_or(last),
            count: u64::try_from(self.count).unwrap_or(0),
            kinds,
        })
    }
}

/// A kind as a field name: `.` and a leading `$` would be read as paths and operators.
pub(super) fn escape_field(kind: &str) -> String {
    let mut out = String::with_capacity(kind.len());
    for c in kind.chars() {
        match c {
            '%' => out.push_str("%25"),
            '.' => out.push_str("%2E"),
            '$' => out.push_str("%24"),
            c => out.push(c),
        }
    }
    out
}

fn unescape_field(field: &str) -> String {
    field
        .replace("%2E", ".")
        .replace("%24", "$")
        .replace("%25", "%")
}

/// One kind of one sensor's newly stored readings, folded.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Fold {
    first: Timestamp,
    last: Timestamp,
    last_value: f64,
    count: i64,
}

/// Newly stored readings folded per sensor and kind, across as many batches as it is given:
/// what one update command then adds to the sensor summary. Memory grows with the sensors it
/// has seen since it was last written, not with the readings.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SummaryFold {
    /// In id order, so a page of `/sensors` finds what the fold adds to it by range.
    sensors: BTreeMap<SensorId, HashMap<Kind, Fold>>,
}

impl SummaryFold {
    /// Adds newly stored readings. Duplicates must be left out by the caller: they were
    /// summarised when MongoDB first stored them, and their value may differ from the stored one
    /// (the first stored wins).
    pub fn add<'a>(&mut self, readings: impl IntoIterator<Item = &'a Reading>) {
        for r in readings {
            // Looked up before inserting: the writer calls this for every stored reading, and
            // a sensor and kind already folded need no copy of their names.
            if !self.sensors.contains_key(r.sensor_id()) {
                self.sensors.insert(r.sensor_id().clone(), HashMap::new());
            }
            let Some(kinds) = self.sensors.get_mut(r.sensor_id()) else {
                continue;
            };
            if !kinds.contains_key(r.kind()) {
                let first = Fold {
                    first: r.timestamp(),
                    last: r.timestamp(),
                    last_value: r.value(),
                    count: 0,
                };
                kinds.insert(r.kind().clone(), first);
            }
            let Some(fold) = kinds.get_mut(r.kind()) else {
                continue;
            };
            fold.first = fold.first.min(r.timestamp());
            if r.timestamp() > fold.last {
                fold.last = r.timestamp();
                fold.last_value = r.value();
            }
            fold.count += 1;
        }
    }

    /// Adds what another fold holds (a write that failed goes back to be tried again).
    pub fn merge(&mut self, other: SummaryFold) {
        for (id, kinds) in other.sensors {
            let mine = self.sensors.entry(id).or_default();
            for (kind, theirs) in kinds {
                mine.entry(kind)
                    .and_modify(|fold| {
                        fold.first = fold.first.min(theirs.first);
                        if theirs.last > fold.last {
                            fold.last = theirs.last;
                            fold.last_value = theirs.last_value;
                        }
                        fold.count += theirs.count;
                    })
                    .or_insert(theirs);
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.sensors.is_empty()
    }

    /// Sensors it holds.
    pub fn len(&self) -> usize {
        self.sensors.len()
    }

    /// Adds what the fold holds for `s`'s sensor to a summary read from MongoDB. First and last
    /// times and the last value are a minimum and a maximum, right however often applied; the
    /// counts only with `counts`, for a fold that MongoDB cannot hold yet.
    fn apply(&self, s: &mut SensorSummary, counts: bool) {
        let Some(kinds) = self.sensors.get(&s.sensor_id) else {
            return;
        };
        for (kind, fold) in kinds {
            let count = if counts { fold.count.max(0) as u64 } else { 0 };
            match s.kinds.iter_mut().find(|k| &k.kind == kind) {
                Some(k) => {
                    k.first_seen = k.first_seen.min(fold.first);
                    if fold.last > k.last_seen {
                        k.last_seen = fold.last;
                        k.last_value = fold.last_value;
                    }
                    k.count += count;
                }
                None => s.kinds.push(KindSummary {
                    kind: kind.clone(),
                    first_seen: fold.first,
                    last_seen: fold.last,
                    last_value: fold.last_value,
                    count,
                }),
            }
            s.first_seen = s.first_seen.min(fold.first);
            s.last_seen = s.last_seen.max(fold.last);
            s.count += count;
        }
        s.kinds.sort_by(|a, b| a.kind.cmp(&b.kind));
    }

    /// Sensors of the fold that `query` selects, in id order, below `below` when given, at most
    /// `query.limit`.
    fn selected<'a>(
        &'a self,
        query: &'a SummaryQuery,
        below: Option<&'a SensorId>,
    ) -> impl Iterator<Item = &'a SensorId> + 'a {
        let prefix = query.prefix.as_deref().unwrap_or("");
        let from = match &query.after {
            Some(after) if after.as_str() >= prefix => Bound::Excluded(after.as_str()),
            _ => Bound::Included(prefix),
        };
        self.sensors
            .range::<str, _>((from, Bound::Unbounded))
            .take_while(move |(id, _)| {
                id.as_str().starts_with(prefix) && below.is_none_or(|b| *id < b)
            })
            .filter(|(_, kinds)| {
                query
                    .kind
                    .as_deref()
                    .is_none_or(|kind| kinds.keys().any(|k| k.as_str() == kind))
            })
            .map(|(id, _)| id)
            .take(query.limit as usize)
    }
}

/// What this process summarised and MongoDB does not hold yet: readings stored since the summary
/// was last written (`pending`), and the write under way (`writing`). Reads of the summary in
/// this process add both, so `/sensors` and `/latest` show a reading as soon as it is stored,
/// however long the summary waits between writes; other processes see it once it is written.
#[derive(Debug, Default)]
pub struct Unwritten {
    pending: Mutex<SummaryFold>,
    writing: Mutex<SummaryFold>,
    /// Held for a whole flush: one write at a time, and a flush waits for the one under way.
    flushing: tokio::sync::Mutex<()>,
    /// Flushes ended, whatever their outcome, counted as `writing` empties (under its lock). A
    /// read that finds the same count before it asks MongoDB and after its overlay missed no
    /// write: a flush that ended in between took what it wrote out of the fold after the read
    /// was answered without it.
    flushes: AtomicU64,
}

/// Reads of the summary made again when a flush ended between MongoDB's answer and the overlay
/// (flushes are at least half a second apart, a read takes milliseconds).
const READ_ATTEMPTS: u32 = 4;

impl Unwritten {
    fn pending(&self) -> MutexGuard<'_, SummaryFold> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn writing(&self) -> MutexGuard<'_, SummaryFold> {
        self.writing.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn flushes(&self) -> u64 {
        self.flushes.load(Ordering::Acquire)
    }

    /// Both parts, locked in the one order every caller uses (`pending` first).
    fn both(&self) -> (MutexGuard<'_, SummaryFold>, MutexGuard<'_, SummaryFold>) {
        let pending = self.pending();
        (pending, self.writing())
    }

    /// `overlay(read())`, read again while a flush ended between MongoDB's answer and the
    /// overlay (at most `READ_ATTEMPTS` reads): that flush took what it wrote out of the fold
    /// after the read was answered without it.
    async fn consistent<R, T, F: Future<Output = Result<R, StoreError>>>(
        &self,
        mut read: impl FnMut() -> F,
        mut overlay: impl FnMut(R) -> T,
    ) -> Result<T, StoreError> {
        let mut attempt = 1;
        loop {
            let flushes = self.flushes();
            let answer = read().await?;
            let overlaid = overlay(answer);
            if self.flushes() == flushes || attempt == READ_ATTEMPTS {
                return Ok(overlaid);
            }
            attempt += 1;
        }
    }

    /// Moves what is pending to `writing` for a flush, under both locks so that a read never
    /// finds it in neither; `None` when nothing is pending.
    fn begin_flush(&self) -> Option<SummaryFold> {
        let (mut pending, mut writing) = self.both();
        let fold = std::mem::take(&mut *pending);
        if fold.is_empty() {
            return None;
        }
        *writing = fold.clone();
        Some(fold)
    }

    /// Ends a flush: what it did not apply goes back into pending as `writing` empties, and
    /// the flush is counted for the reads under way (`flushes`).
    fn end_flush(&self, unapplied: SummaryFold) {
        let (mut pending, mut writing) = self.both();
        pending.merge(unapplied);
        *writing = SummaryFold::default();
        self.flushes.fetch_add(1, Ordering::AcqRel);
    }

    /// Adds the unwritten part to a page read from MongoDB for `query`, and the sensors only
    /// this process knows of yet. Returns the ids of sensors that may have a stored summary
    /// the read left out (it lacked the kind asked for, which only the fold holds): the caller
    /// reads them and passes them to `add_read`.
    ///
    /// Called after the read: what is pending then was not written before it, so its counts
    /// are added; what is being written may or may not be in the read, so its counts are added
    /// only to sensors the read did not return.
    fn overlay(&self, page: &mut Vec<SensorSummary>, query: &SummaryQuery) -> Vec<SensorId> {
        let (pending, writing) = self.both();
        if pending.is_empty() && writing.is_empty() {
            return Vec::new();
        }
        for s in page.iter_mut() {
            writing.apply(s, false);
            pending.apply(s, true);
        }
        // A full page ends at its last id: sensors past it belong to a later page.
        let below = (page.len() >= query.limit as usize)
            .then(|| page.last().map(|s| s.sensor_id.clone()))
            .flatten();
        let known: HashSet<&SensorId> = page.iter().map(|s| &s.sensor_id).collect();
        let mut unread = Vec::new();
        let mut added = BTreeMap::new();
        for fold in [&*pending, &*writing] {
            for id in fold.selected(query, below.as_ref()) {
                if known.contains(id) || added.contains_key(id) {
                    continue;
                }
                let mut s = SensorSummary::empty(id.clone());
                writing.apply(&mut s, true);
                pending.apply(&mut s, true);
                if query.kind.is_some() {
                    unread.push(id.clone());
                }
                added.insert(id.clone(), s);
            }
        }
        page.extend(added.into_values());
        page.sort_by(|a, b| a.sensor_id.cmp(&b.sensor_id));
        page.truncate(query.limit as usize);
        unread
    }

    /// `overlay` for one sensor's summary, read from MongoDB (`None`: not there).
    fn overlay_one(&self, found: Option<SensorSummary>, id: &SensorId) -> Option<SensorSummary> {
        let (pending, writing) = self.both();
        let counted = found.is_none();
        let mut s = found.unwrap_or_else(|| SensorSummary::empty(id.clone()));
        writing.apply(&mut s, counted);
        pending.apply(&mut s, true);
        (!s.kinds.is_empty()).then_some(s)
    }

    /// Puts summaries read after `overlay` asked for them in place of the ones it built from
    /// the fold alone.
    fn add_read(&self, page: &mut [SensorSummary], read: Vec<SensorSummary>) {
        let (pending, writing) = self.both();
        for mut stored in read {
            if let Some(slot) = page.iter_mut().find(|s| s.sensor_id == stored.sensor_id) {
                writing.apply(&mut stored, false);
                pending.apply(&mut stored, true);
                *slot = stored;
            }
        }
    }
}

impl SummaryFold {
    /// One update statement per sensor, every operator one that commutes (`$min`, `$max`,
    /// `$inc`), so instances writing the same summary never undo each other.
    fn statements(&self) -> Vec<(SensorId, Document)> {
        self.sensors
            .iter()
            .map(|(id, kinds)| {
                let (mut min, mut max, mut inc) =
                    (Document::new(), Document::new(), Document::new());
                let mut total = 0;
                let (mut first, mut last) = (Timestamp::MAX, Timestamp::MIN);
                for (kind, fold) in kinds {
                    let field = escape_field(kind.as_str());
                    min.insert(format!("kinds.{field}.first"), date(fold.first));
                    max.insert(
                        format!("kinds.{field}.last"),
                        doc! {"t": date(fold.last), "v": fold.last_value},
                    );
                    inc.insert(format!("kinds.{field}.count"), fold.count);
                    total += fold.count;
                    first = first.min(fold.first);
                    last = last.max(fold.last);
                }
                min.insert("first_seen", date(first));
                max.insert("last_seen", date(last));
                inc.insert("count", total);
                let statement = doc! {
                    "q": {"_id": id.as_str()},
                    "u": {"$min": min, "$max": max, "$inc": inc},
                    "upsert": true,
                };
                (id.clone(), statement)
            })
            .collect()
    }

    /// The part of the fold for these sensors only.
    fn only(&self, ids: &[SensorId]) -> SummaryFold {
        SummaryFold {
            sensors: ids
                .iter()
                .filter_map(|id| self.sensors.get(id).map(|k| (id.clone(), k.clone())))
                .collect(),
        }
    }
}

/// Statements per update command: far below the server's 100,000 and 16 MB.
const STATEMENTS_PER_COMMAND: usize = 1000;

/// Sensors a roster reload reads per range, and its pause between two ranges.
const ROSTER_RANGE: usize = 2000;
const ROSTER_PAUSE: std::time::Duration = std::time::Duration::from_millis(10);

fn date(t: Timestamp) -> DateTime {
    DateTime::from_millis(t.as_millis())
}

impl Store {
    /// Adds `fold` to the sensor summary, in commands of up to 1,000 sensors. On failure,
    /// returns the part of the fold that was not applied, to be tried again: statements the
    /// server did apply are not in it, since `$inc` must not count them twice.
    pub async fn record_summaries(
        &self,
        fold: &SummaryFold,
    ) -> Result<(), (StoreError, SummaryFold)> {
        let statements = fold.statements();
        let db = self.client.database(&self.config.database);
        let collection = self.summaries.name().to_owned();
        for (n, chunk) in statements.chunks(STATEMENTS_PER_COMMAND).enumerate() {
            let updates: Vec<Document> = chunk.iter().map(|(_, d)| d.clone()).collect();
            let unapplied = |failed: &mut dyn Iterator<Item = usize>| {
                let mut ids: Vec<SensorId> = failed
                    .filter_map(|i| chunk.get(i).map(|(id, _)| id.clone()))
                    .collect();
                ids.extend(
                    statements
                        .iter()
                        .skip((n + 1) * STATEMENTS_PER_COMMAND)
                        .map(|(id, _)| id.clone()),
                );
                fold.only(&ids)
            };
            let sent = db
                .run_command(doc! {
                    "update": &collection,
                    "updates": updates,
                    "ordered": false,
                })
                .await;
            // Listed after the write, whatever its outcome (a listed sensor without a summary
            // is skipped by the read): a roster reload that began before it then keeps it, and
            // one that begins after it finds its summary.
            for (id, _) in chunk {
                let kinds = fold.sensors.get(id).into_iter().flat_map(HashMap::keys);
                self.roster.add(id.as_str(), kinds.map(Kind::as_str));
            }
            let reply = match sent {
                Ok(reply) => reply,
                // Whether any of it applied is unknown: trying this chunk again may count it
                // twice, dropping it may count it never; again is the lesser error for a count.
                Err(e) => return Err((e.into(), unapplied(&mut (0..chunk.len())))),
            };
            let failed: Vec<usize> = reply
                .get_array("writeErrors")
                .map(|errors| {
                    errors
                        .iter()
                        .filter_map(Bson::as_document)
                        .filter_map(|e| e.get_i32("index").ok())
                        .filter_map(|i| usize::try_from(i).ok())
                        .collect()
                })
                .unwrap_or_default();
            if !failed.is_empty() {
                let count = failed.len();
                return Err((
                    StoreError::SummaryRejected(count),
                    unapplied(&mut failed.into_iter()),
                ));
            }
        }
        Ok(())
    }

    /// Adds newly stored readings to the summary's unwritten part (see `flush_summaries`).
    /// Duplicates must be left out, as for `SummaryFold::add`.
    pub fn summarise<'a>(&self, readings: impl IntoIterator<Item = &'a Reading>) {
        self.unwritten.pending().add(readings);
    }

    /// Writes what `summarise` gathered since the last flush, after any flush under way; reads
    /// in this process show it meanwhile. What a failed or timed-out write did not apply is kept for the next flush.
    /// Returns the sensors written, or the error and the sensors kept.
    pub async fn flush_summaries(&self, timeout: Duration) -> Result<usize, (StoreError, usize)> {
        let _flushing = self.unwritten.flushing.lock().await;
        let Some(fold) = self.unwritten.begin_flush() else {
            return Ok(0);
        };
        match tokio::time::timeout(timeout, self.record_summaries(&fold)).await {
            Ok(Ok(())) => {
                self.unwritten.end_flush(SummaryFold::default());
                Ok(fold.len())
            }
            Ok(Err((error, unapplied))) => {
                let kept = unapplied.len();
                self.unwritten.end_flush(unapplied);
                Err((error, kept))
            }
            Err(_) => {
                let kept = fold.len();
                self.unwritten.end_flush(fold);
                Err((StoreError::TimedOut(timeout), kept))
            }
        }
    }

    /// Sensors in id order, from the summary: one indexed read, however long the history, plus
    /// what this process has not written yet.
    pub async fn sensors(&self, query: &SummaryQuery) -> Result<Vec<SensorSummary>, StoreError> {
        let (mut page, unread) = self
            .unwritten
            .consistent(
                || self.stored_sensors(query),
                |mut page| {
                    let unread = self.unwritten.overlay(&mut page, query);
                    (page, unread)
                },
            )
            .await?;
        if !unread.is_empty() {
            let ids: Vec<&str> = unread.iter().map(SensorId::as_str).collect();
            let read: Vec<SensorSummary> = self
                .summaries
                .find(doc! {"_id": {"$in": ids}})
                .await?
                .try_collect::<Vec<SummaryDoc>>()
                .await?
                .into_iter()
                .filter_map(SummaryDoc::into_summary)
                .collect();
            self.unwritten.add_read(&mut page, read);
        }
        Ok(page)
    }

    /// The page as MongoDB holds it. Its ids come from the roster once it is loaded (see
    /// `roster.rs`).
    async fn stored_sensors(&self, query: &SummaryQuery) -> Result<Vec<SensorSummary>, StoreError> {
        match self.sensors_by_roster(query).await? {
            Some(found) => Ok(found),
            None => self.sensors_by_scan(query).await,
        }
    }

    /// A page read as the documents of the ids the roster lists; `None` while it is not loaded.
    /// Ids whose document is gone (or lost the kind) are skipped, and the next ones read.
    async fn sensors_by_roster(
        &self,
        query: &SummaryQuery,
    ) -> Result<Option<Vec<SensorSummary>>, StoreError> {
        let limit = query.limit as usize;
        let mut found = Vec::with_capacity(limit);
        let mut after = query.after.clone();
        let mut first = true;
        while found.len() < limit {
            let want = limit - found.len();
            let Some(ids) = self.roster.page(
                query.prefix.as_deref(),
                query.kind.as_deref(),
                after.as_deref(),
                want,
            ) else {
                return Ok(None);
            };
            let exhausted = ids.len() < want;
            // Nothing to read, unless this is the first read: an empty answer must still mean
            // MongoDB answered (a page served while it is down would hide the outage).
            if ids.is_empty() && !first {
                break;
            }
            first = false;
            let last = ids.last().cloned();
            let mut filter = doc! {"_id": {"$in": &ids}};
            if let Some(kind) = &query.kind {
                let field = format!("kinds.{}", escape_field(kind));
                filter.insert(field, doc! {"$exists": true});
            }
            let batch = u32::try_from(ids.len()).unwrap_or(u32::MAX);
            let mut docs: Vec<SummaryDoc> = self
                .summaries
                .find(filter)
                .batch_size(batch)
                .await?
                .try_collect()
                .await?;
            // The same order as the scan's `sort: {_id: 1}` (binary string order).
            docs.sort_unstable_by(|a, b| a.id.cmp(&b.id));
            found.extend(docs.into_iter().filter_map(SummaryDoc::into_summary));
            if exhausted {
                break;
            }
            after = last;
        }
        Ok(Some(found))
    }

    /// A page read by a sorted scan of the summary.
    async fn sensors_by_scan(
        &self,
        query: &SummaryQuery,
    ) -> Result<Vec<SensorSummary>, StoreError> {
        let mut id = Document::new();
        if let Some(prefix) = &query.prefix {
            id.insert("$regex", format!("^{}", regex_escape(prefix)));
        }
        if let Some(after) = &query.after {
            id.insert("$gt", after.as_str());
        }
        let mut filter = Document::new();
        if !id.is_empty() {
            filter.insert("_id", id);
        }
        if let Some(kind) = &query.kind {
            let field = format!("kinds.{}", escape_field(kind));
            filter.insert(field, doc! {"$exists": true});
        }
        let docs: Vec<SummaryDoc> = self
            .summaries
            .find(filter)
            .sort(doc! {"_id": 1})
            .limit(i64::from(query.limit))
            .batch_size(query.limit)
            .await?
            .try_collect()
            .await?;
        Ok(docs
            .into_iter()
            .filter_map(SummaryDoc::into_summary)
            .collect())
    }

    /// Reads every summary id and its kinds into the roster (`roster.rs`): one scan of the
    /// summary, never of the readings. Returns the sensors listed.
    /// Dropping the future before it completes leaves the roster as it was.
    pub async fn reload_roster(&self) -> Result<usize, StoreError> {
        /// Abandons the reload unless it was finished (an error, or the future dropped).
        struct Reloading<'a>(&'a Roster);
        impl Drop for Reloading<'_> {
            fn drop(&mut self) {
                self.0.abandon_reload();
            }
        }
        self.roster.begin_reload();
        let reloading = Reloading(&self.roster);
        let reloaded = self.read_roster().await?;
        let n = reloaded.len();
        self.roster.finish_reload(reloaded);
        drop(reloading);
        Ok(n)
    }

    async fn read_roster(&self) -> Result<Reloaded, StoreError> {
        let cuts = self.roster.boundaries(ROSTER_RANGE);
        let mut reloaded = Reloaded::default();
        // Every range, from below the first cut to above the last: together, every string id.
        let lows = std::iter::once(None).chain(cuts.iter().map(Some));
        let highs = cuts.iter().map(Some).chain(std::iter::once(None));
        for (n, (low, high)) in lows.zip(highs).enumerate() {
            if n > 0 {
                tokio::time::sleep(ROSTER_PAUSE).await;
            }
            let mut range = Document::new();
            if let Some(low) = low {
                range.insert("$gte", low.as_str());
            }
            if let Some(high) = high {
                range.insert("$lt", high.as_str());
            }
            let filter = if range.is_empty() {
                doc! {}
            } else {
                doc! {"_id": range}
            };
            self.read_roster_range(filter, &mut reloaded).await?;
        }
        Ok(reloaded)
    }

    async fn read_roster_range(
        &self,
        filter: Document,
        reloaded: &mut Reloaded,
    ) -> Result<(), StoreError> {
        // Raw documents: only the id and the kinds' names are read, nothing is decoded.
        let mut cursor = self
            .summaries
            .clone_with_type::<RawDocumentBuf>()
            .find(filter)
            .batch_size(10_000)
            .await?;
        while let Some(doc) = cursor.try_next().await? {
            let Ok(id) = doc.get_str("_id") else {
                continue;
            };
            let kinds = doc
                .get_document("kinds")
                .map(|kinds| {
                    kinds
                        .into_iter()
                        .filter_map(Result::ok)
                        .map(|(field, _)| unescape_field(field))
                        .collect()
                })
                .unwrap_or_default();
            reloaded.push(id, kinds);
        }
        Ok(())
    }

    /// One sensor's summary; `None` when it never reported.
    pub async fn sensor(&self, id: &str) -> Result<Option<SensorSummary>, StoreError> {
        let read = || async move {
            let found = self.summaries.find_one(doc! {"_id": id}).await?;
            Ok(found.and_then(SummaryDoc::into_summary))
        };
        let Ok(sensor) = SensorId::parse(id) else {
            return read().await;
        };
        self.unwritten
            .consistent(read, |found| self.unwritten.overlay_one(found, &sensor))
            .await
    }
}

/// What the summary says of a sensor, for `Store::latest_hinted`: the time of its newest
/// reading and how many it has (short by a pause's worth at most, never too high).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LatestHint {
    pub newest: Timestamp,
    pub count: u64,
}

impl Store {
    /// The summary's `LatestHint` of each of `ids` that has one, in one read.
    pub async fn latest_hints(
        &self,
        ids: &[SensorId],
    ) -> Result<HashMap<SensorId, LatestHint>, StoreError> {
        let wanted: Vec<&str> = ids.iter().map(SensorId::as_str).collect();
        let docs: Vec<SummaryDoc> = self
            .summaries
            .find(doc! {"_id": {"$in": wanted}})
            .projection(doc! {"last_seen": 1, "count": 1})
            .await?
            .try_collect()
            .await?;
        Ok(docs
            .into_iter()
            .filter_map(|d| {
                let newest = Timestamp::from_millis(d.last_seen?.timestamp_millis())?;
                let count = u64::try_from(d.count).ok()?;
                Some((SensorId::parse(&d.id).ok()?, LatestHint { newest, count }))
            })
            .collect())
    }
}

/// `text` matched literally inside a regular expression.
fn regex_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if "\\^$.|?*+()[]{}/-".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(id: &str, kind: &str, v: f64, ms: i64) -> Reading {
        Reading::new(
            SensorId::parse(id).unwrap(),
            Kind::parse(kind).unwrap(),
            v,
            Timestamp::from_millis(ms).unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn kinds_become_safe_field_names_and_back() {
        for kind in ["temperature", "a.b", "$x", "50%.$", "%2E"] {
            let field = escape_field(kind);
            assert!(!field.contains('.') && !field.contains('$'), "{field}");
            assert_eq!(unescape_field(&field), kind);
        }
    }

    #[test]
    fn batches_fold_into_one_statement_per_sensor() {
        let readings = [
            reading("a", "t", 1.0, 3000),
            reading("a", "t", 2.0, 1000),
            reading("a", "h", 3.0, 2000),
            reading("b", "t", 4.0, 5000),
        ];
        let mut fold = SummaryFold::default();
        // b's reading was a duplicate: already summarised when first stored.
        fold.add(&readings[..2]);
        let mut later = SummaryFold::default();
        later.add([&readings[2]]);
        fold.merge(later);
        let docs = fold.statements();
        assert_eq!(docs.len(), 1, "the duplicate adds nothing");
        let (id, doc) = &docs[0];
        assert_eq!(id.as_str(), "a");
        let u = doc.get_document("u").unwrap();
        let max = u.get_document("$max").unwrap();
        assert_eq!(
            max.get_document("kinds.t.last").unwrap(),
            &doc! {"t": DateTime::from_millis(3000), "v": 1.0}
        );
        assert_eq!(
            max.get_datetime("last_seen").unwrap().timestamp_millis(),
            3000
        );
        let min = u.get_document("$min").unwrap();
        assert_eq!(
            min.get_datetime("first_seen").unwrap().timestamp_millis(),
            1000
        );
        let inc = u.get_document("$inc").unwrap();
        assert_eq!(inc.get_i64("count").unwrap(), 3);
        assert_eq!(inc.get_i64("kinds.h.count").unwrap(), 1);
        assert_eq!(fold.only(&[]).len(), 0);
        assert_eq!(fold.only(&[SensorId::parse("a").unwrap()]), fold);
    }

    fn stored(
        id: &str,
        kind: &str,
        first: i64,
        last: i64,
        value: f64,
        count: u64,
    ) -> SensorSummary {
        let kind = KindSummary {
            kind: Kind::parse(kind).unwrap(),
            first_seen: Timestamp::from_millis(first).unwrap(),
            last_seen: Timestamp::from_millis(last).unwrap(),
            last_value: value,
            count,
        };
        SensorSummary {
            sensor_id: SensorId::parse(id).unwrap(),
            first_seen: kind.first_seen,
            last_seen: kind.last_seen,
            count,
            kinds: vec![kind],
        }
    }

    fn query(
        prefix: Option<&str>,
        kind: Option<&str>,
        after: Option<&str>,
        limit: u32,
    ) -> SummaryQuery {
        SummaryQuery {
            prefix: prefix.map(str::to_owned),
            kind: kind.map(str::to_owned),
            after: after.map(str::to_owned),
            limit,
        }
    }

    fn ids(page: &[SensorSummary]) -> Vec<&str> {
        page.iter().map(|s| s.sensor_id.as_str()).collect()
    }

    /// A flush that ends after MongoDB answered a read without it, and before the overlay,
    /// has emptied the fold of what it wrote: the read is made again. (Found by a CI run: a
    /// sensor stored and counted was missing from `/sensors`.)
    #[tokio::test]
    async fn a_read_answered_before_a_flush_ended_is_made_again() {
        let unwritten = Unwritten::default();
        unwritten.pending().add(&[reading("a", "t", 1.0, 10)]);
        // MongoDB, as far as this test goes: the sensors a flush wrote.
        let mongo = Mutex::new(Vec::<SensorSummary>::new());
        let mut reads = 0;
        let page = unwritten
            .consistent(
                || {
                    reads += 1;
                    let answer = mongo.lock().unwrap().clone();
                    if reads == 1 {
                        // The flush runs, and ends, while the first answer is on its way.
                        assert!(unwritten.begin_flush().is_some(), "pending");
                        let mut overlaid = Vec::new();
                        unwritten.overlay(&mut overlaid, &query(None, None, None, 10));
                        assert_eq!(ids(&overlaid), ["a"], "while written: in writing");
                        mongo.lock().unwrap().push(stored("a", "t", 10, 10, 1.0, 1));
                        unwritten.end_flush(SummaryFold::default());
                    }
                    std::future::ready(Ok(answer))
                },
                |mut page| {
                    unwritten.overlay(&mut page, &query(None, None, None, 10));
                    page
                },
            )
            .await
            .unwrap();
        assert_eq!(reads, 2);
        assert_eq!(ids(&page), ["a"]);
        assert_eq!(page[0].count, 1);
    }

    #[test]
    fn reads_add_what_is_pending_and_the_times_of_what_is_being_written() {
        let unwritten = Unwritten::default();
        unwritten
            .pending()
            .add(&[reading("a", "t", 5.0, 9000), reading("a", "h", 1.0, 500)]);
        // Being written: perhaps already in the read, so its count must not be added again.
        unwritten
            .writing()
            .add(&[reading("a", "t", 4.0, 8000), reading("a", "t", 3.0, 100)]);
        let mut page = vec![stored("a", "t", 1000, 7000, 2.0, 10)];
        let unread = unwritten.overlay(&mut page, &query(None, None, None, 10));
        assert!(unread.is_empty());
        let a = &page[0];
        assert_eq!(
            (a.count, a.first_seen.as_millis(), a.last_seen.as_millis()),
            (12, 100, 9000)
        );
        let kinds: Vec<(&str, f64, u64, i64)> = a
            .kinds
            .iter()
            .map(|k| {
                (
                    k.kind.as_str(),
                    k.last_value,
                    k.count,
                    k.first_seen.as_millis(),
                )
            })
            .collect();
        assert_eq!(
            kinds,
            [("h", 1.0, 1, 500), ("t", 5.0, 11, 100)],
            "kinds in name order"
        );
    }

    #[test]
    fn sensors_only_this_process_knows_join_the_page_where_they_belong() {
        let unwritten = Unwritten::default();
        unwritten.pending().add(&[
            reading("b", "t", 1.0, 10),
            reading("d", "t", 2.0, 20),
            reading("x1", "h", 3.0, 30),
            reading("z", "t", 4.0, 40),
        ]);
        unwritten
            .writing()
            .add(&[reading("c", "t", 5.0, 50), reading("c", "t", 6.0, 60)]);
        let page = || {
            vec![
                stored("a", "t", 1, 2, 0.0, 1),
                stored("e", "t", 1, 2, 0.0, 1),
            ]
        };

        // A full page ends at its last id: "z" belongs to a later page.
        let mut full = page();
        unwritten.overlay(&mut full, &query(None, None, None, 2));
        assert_eq!(
            ids(&full),
            ["a", "b"],
            "truncated to the limit, in id order"
        );
        let mut full = page();
        unwritten.overlay(&mut full, &query(None, None, None, 2 + 4));
        assert_eq!(ids(&full), ["a", "b", "c", "d", "e", "x1"]);
        assert_eq!(
            full[2].count, 2,
            "not in the read: what is being written counts"
        );
        let mut last = page();
        unwritten.overlay(&mut last, &query(None, None, None, 10));
        assert_eq!(ids(&last), ["a", "b", "c", "d", "e", "x1", "z"]);

        let mut after = vec![];
        unwritten.overlay(&mut after, &query(None, None, Some("c"), 10));
        assert_eq!(ids(&after), ["d", "x1", "z"]);
        let mut prefixed = vec![];
        unwritten.overlay(&mut prefixed, &query(Some("x"), None, None, 10));
        assert_eq!(ids(&prefixed), ["x1"]);
        let mut prefixed_after = vec![];
        unwritten.overlay(&mut prefixed_after, &query(Some("x"), None, Some("a"), 10));
        assert_eq!(
            ids(&prefixed_after),
            ["x1"],
            "a cursor before the prefix starts at it"
        );

        // With a kind, a sensor the read left out may be stored without that kind.
        let mut by_kind = vec![];
        let unread = unwritten.overlay(&mut by_kind, &query(None, Some("h"), None, 10));
        assert_eq!(ids(&by_kind), ["x1"]);
        assert_eq!(unread, [SensorId::parse("x1").unwrap()]);
        unwritten.add_read(&mut by_kind, vec![stored("x1", "t", 1, 2, 9.0, 7)]);
        let x1 = &by_kind[0];
        assert_eq!(
            (x1.count, x1.kinds.len()),
            (8, 2),
            "the stored kind and the new one"
        );
    }

    #[test]
    fn one_sensor_is_read_with_what_is_unwritten() {
        let unwritten = Unwritten::default();
        let a = SensorId::parse("a").unwrap();
        assert_eq!(unwritten.overlay_one(None, &a), None);
        unwritten.pending().add(&[reading("a", "t", 5.0, 9000)]);
        let only_here = unwritten.overlay_one(None, &a).unwrap();
        assert_eq!(
            (only_here.count, only_here.last_seen.as_millis()),
            (1, 9000)
        );
        let both = unwritten
            .overlay_one(Some(stored("a", "t", 1, 2, 0.0, 4)), &a)
            .unwrap();
        assert_eq!((both.count, both.kinds[0].last_value), (5, 5.0));
    }

    #[test]
    fn prefixes_match_literally() {
        assert_eq!(regex_escape("a.b*"), "a\\.b\\*");
    }
}
