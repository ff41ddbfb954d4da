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

use bson::{Bson, DateTime, Document, doc};
use futures_util::TryStreamExt;
use serde::Deserialize;

use super::{Store, StoreError};
use crate::domain::{Kind, Reading, SensorId, Timestamp};

/// Statements sent again after a write error (an upsert race on a new sensor) before giving up.
const RETRIES: usize = 3;

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
fn escape_field(kind: &str) -> String {
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

/// One batch's readings of one kind of one sensor, folded.
#[derive(Debug)]
struct Fold {
    first: Timestamp,
    last: Timestamp,
    last_value: f64,
    count: i64,
}

/// The update statements for `readings` (newly stored ones counted, all others only widening
/// the times), one per sensor.
fn statements<'a>(readings: impl Iterator<Item = (&'a Reading, bool)>) -> Vec<Document> {
    let mut sensors: HashMap<&SensorId, HashMap<&Kind, Fold>> = HashMap::new();
    for (r, new) in readings {
        let fold = sensors
            .entry(r.sensor_id())
            .or_default()
            .entry(r.kind())
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
        fold.count += i64::from(new);
    }
    sensors
        .into_iter()
        .map(|(id, kinds)| {
            let (mut min, mut max, mut inc) = (Document::new(), Document::new(), Document::new());
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
            doc! {
                "q": {"_id": id.as_str()},
                "u": {"$min": min, "$max": max, "$inc": inc},
                "upsert": true,
            }
        })
        .collect()
}

fn date(t: Timestamp) -> DateTime {
    DateTime::from_millis(t.as_millis())
}

impl Store {
    /// Folds a stored batch into the sensor summary: `duplicates` (positions in `readings`, as
    /// `insert_readings` reported them) are not counted again. One command for the whole batch.
    pub async fn record_summaries(
        &self,
        readings: &[Reading],
        duplicates: &[usize],
    ) -> Result<(), StoreError> {
        if readings.is_empty() {
            return Ok(());
        }
        let mut is_new = vec![true; readings.len()];
        for &i in duplicates {
            if let Some(flag) = is_new.get_mut(i) {
                *flag = false;
            }
        }
        // A duplicate is a reading MongoDB already had, and already summarised when it stored it;
        // its value may even differ from the stored one (the first stored wins), so it must not
        // become the last value.
        let mut pending = statements(readings.iter().zip(is_new).filter(|(_, new)| *new));
        let db = self.client.database(&self.config.database);
        let collection = self.summaries.name().to_owned();
        for _ in 0..RETRIES {
            if pending.is_empty() {
                return Ok(());
            }
            let reply = db
                .run_command(doc! {
                    "update": &collection,
                    "updates": pending.clone(),
                    "ordered": false,
                })
                .await?;
            // Only failed statements go again: `$inc` of the others already applied.
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
            pending = failed
                .into_iter()
                .filter_map(|i| pending.get(i).cloned())
                .collect();
        }
        if pending.is_empty() {
            Ok(())
        } else {
            Err(StoreError::SummaryRejected(pending.len()))
        }
    }

    /// Sensors in id order, from the summary: one indexed read, however long the history.
    pub async fn sensors(&self, query: &SummaryQuery) -> Result<Vec<SensorSummary>, StoreError> {
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
    fn a_batch_folds_into_one_statement_per_sensor() {
        let readings = [
            reading("a", "t", 1.0, 3000),
            reading("a", "t", 2.0, 1000),
            reading("a", "h", 3.0, 2000),
            reading("b", "t", 4.0, 5000),
        ];
        let mut docs = statements(readings.iter().map(|r| (r, r.value() != 4.0)));
        docs.sort_by_key(|d| {
            d.get_document("q")
                .unwrap()
                .get_str("_id")
                .unwrap()
                .to_owned()
        });
        assert_eq!(docs.len(), 2);
        let u = docs[0].get_document("u").unwrap();
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
        let b = docs[1].get_document("u").unwrap();
        assert_eq!(b.get_document("$inc").unwrap().get_i64("count").unwrap(), 0);
    }

    #[test]
    fn prefixes_match_literally() {
        assert_eq!(regex_escape("a.b*"), "a\\.b\\*");
    }
}
