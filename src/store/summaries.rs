//! The sensor summary: one small document per sensor, kept up to date on the write path, so that
//! "which sensors are there, and what did each say last" never scans the readings.
//!
//! `{_id: <sensor id>, first_seen, last_seen, count, kinds: {<kind, escaped>: {first, count,
//! last: {t, v}}}}`. A stored batch becomes one `update` command with one upsert per sensor, and
//! every operator in it commutes: `$min` of the first time, `$max` of the last time and of the
//! embedded `{t, v}` document (BSON compares it by `t` first, so the newest reading's value wins,
//! whatever order two writers apply their batches in), `$inc` of the count by readings newly
//! stored. Two instances sharing MongoDB therefore never undo each other.

use std::collections::{BTreeMap, HashMap};

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
    sensors: HashMap<SensorId, HashMap<Kind, Fold>>,
}

impl SummaryFold {
    /// Adds newly stored readings. Duplicates must be left out by the caller: they were
    /// summarised when MongoDB first stored them, and their value may differ from the stored one
    /// (the first stored wins).
    pub fn add<'a>(&mut self, readings: impl IntoIterator<Item = &'a Reading>) {
        for r in readings {
            let fold = self
                .sensors
                .entry(r.sensor_id().clone())
                .or_default()
                .entry(r.kind().clone())
                .or_insert(Fold {
                    first: r.timestamp(),
                    last: r.timestamp(),
                    last_value: r.value(),
                    count: 0,
                });
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

    /// Sensors in id order, from the summary: one indexed read, however long the history. The
    /// ids of the page come from the roster once it is loaded (see `roster.rs`).
    pub async fn sensors(&self, query: &SummaryQuery) -> Result<Vec<SensorSummary>, StoreError> {
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
        let found = self.summaries.find_one(doc! {"_id": id}).await?;
        Ok(found.and_then(SummaryDoc::into_summary))
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

    #[test]
    fn prefixes_match_literally() {
        assert_eq!(regex_escape("a.b*"), "a\\.b\\*");
    }
}
