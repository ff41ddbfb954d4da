//! Reading the history back: keyset pages, streams for export, and aggregates computed by MongoDB
//! (`$dateTrunc` buckets in a time zone, fixed-width buckets for charts).
//!
//! Filters take sensor ids and kinds as the client wrote them: a name no reading can carry
//! (control characters, too long) simply matches nothing, it is not an error here.

use bson::{Bson, DateTime, Document, doc};
use futures_util::{Stream, StreamExt, TryStreamExt};
use serde::Deserialize;

use super::{Store, StoreError};
use crate::domain::{Kind, Reading, SensorId, Tags, Timestamp};

/// Documents per round trip of a streamed read.
const STREAM_BATCH: u32 = 2000;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Order {
    #[default]
    Asc,
    Desc,
}

/// Which readings a query covers: `start <= timestamp <= end`, any of `sensor_ids` (all when
/// empty), of `kind` (all when `None`).
#[derive(Clone, Debug)]
pub struct ReadingFilter {
    pub start: Timestamp,
    pub end: Timestamp,
    pub sensor_ids: Vec<String>,
    pub kind: Option<String>,
}

impl ReadingFilter {
    fn to_document(&self) -> Document {
        let mut filter = doc! {"timestamp": {"$gte": date(self.start), "$lte": date(self.end)}};
        match self.sensor_ids.as_slice() {
            [] => {}
            [one] => {
                filter.insert("sensor_id", one.as_str());
            }
            many => {
                filter.insert("sensor_id", doc! {"$in": many.to_vec()});
            }
        }
        if let Some(kind) = &self.kind {
            filter.insert("kind", kind.as_str());
        }
        filter
    }

    fn one_sensor(&self) -> bool {
        self.sensor_ids.len() == 1
    }
}

/// Where a page starts: just past this reading in the query's order, which is total because
/// (sensor id, kind, millisecond) is a reading's identity. Parts are kept as written: a cursor
/// that names no stored reading still marks a place in the order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RangeCursor {
    pub millis: i64,
    pub kind: String,
    pub sensor_id: String,
}

#[derive(Clone, Debug)]
pub struct RangeQuery {
    pub filter: ReadingFilter,
    pub order: Order,
    pub after: Option<RangeCursor>,
    pub limit: u32,
}

/// A reading as a query reads it: without `_id`, which the reader never needs.
#[derive(Debug, Deserialize)]
struct RowDoc {
    sensor_id: String,
    kind: String,
    value: f64,
    timestamp: DateTime,
    #[serde(default)]
    tags: Tags,
}

impl RowDoc {
    fn into_reading(self) -> Option<Reading> {
        Reading::new(
            SensorId::parse(&self.sensor_id).ok()?,
            Kind::parse(&self.kind).ok()?,
            self.value,
            Timestamp::from_millis(self.timestamp.timestamp_millis())?,
        )
        .map(|r| r.with_tags(self.tags))
    }
}

/// A statistic of a bucket, as `$group` computes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stat {
    Min,
    Max,
    Avg,
    Count,
    First,
    Last,
}

impl Stat {
    pub const ALL: [Stat; 6] = [
        Stat::Min,
        Stat::Max,
        Stat::Avg,
        Stat::Count,
        Stat::First,
        Stat::Last,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Stat::Min => "min",
            Stat::Max => "max",
            Stat::Avg => "avg",
            Stat::Count => "count",
            Stat::First => "first",
            Stat::Last => "last",
        }
    }

    fn accumulator(self) -> Document {
        match self {
            Stat::Min => doc! {"$min": "$value"},
            Stat::Max => doc! {"$max": "$value"},
            Stat::Avg => doc! {"$avg": "$value"},
            Stat::Count => doc! {"$sum": 1},
            Stat::First => doc! {"$first": "$value"},
            Stat::Last => doc! {"$last": "$value"},
        }
    }
}

/// The statistics of one bucket; those not asked for are `None`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Stats {
    pub min: Option<f64>,
    pub max: Option<f64>,
    pub avg: Option<f64>,
    pub count: Option<u64>,
    pub first: Option<f64>,
    pub last: Option<f64>,
}

/// Calendar buckets: `$dateTrunc` with `unit` and `bin_size`, in the IANA zone `zone`.
#[derive(Clone, Debug)]
pub struct AggregateQuery {
    pub filter: ReadingFilter,
    pub unit: &'static str,
    pub bin_size: i64,
    pub zone: String,
    pub stats: Vec<Stat>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Bucket {
    pub start: Timestamp,
    pub kind: String,
    pub stats: Stats,
}

/// Fixed-width buckets of `width_ms` counted from `filter.start`: what a chart of at most
/// (end - start) / width points needs.
#[derive(Clone, Debug)]
pub struct SeriesQuery {
    pub filter: ReadingFilter,
    pub width_ms: i64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct SeriesPoint {
    pub time: Timestamp,
    pub sensor_id: String,
    pub kind: String,
    pub avg: f64,
    pub min: f64,
    pub max: f64,
    pub count: u64,
}

fn date(t: Timestamp) -> DateTime {
    DateTime::from_millis(t.as_millis())
}

fn number(doc: &Document, key: &str) -> Option<f64> {
    match doc.get(key)? {
        Bson::Double(v) => Some(*v),
        Bson::Int32(v) => Some(f64::from(*v)),
        Bson::Int64(v) => Some(*v as f64),
        _ => None,
    }
}

impl Store {
    /// A page of readings in (timestamp, sensor id, kind) order, ascending or descending, after
    /// `query.after`.
    pub async fn range(&self, query: &RangeQuery) -> Result<Vec<Reading>, StoreError> {
        let mut filter = query.filter.to_document();
        let (gt, dir) = match query.order {
            Order::Asc => ("$gt", 1),
            Order::Desc => ("$lt", -1),
        };
        let one = query.filter.one_sensor();
        if let Some(after) = &query.after {
            let at = DateTime::from_millis(after.millis);
            let mut past = vec![doc! {"timestamp": {gt: at}}];
            if one {
                // One sensor: time, then kind, orders its readings.
                past.push(doc! {"timestamp": at, "kind": {gt: after.kind.as_str()}});
            } else {
                let id = after.sensor_id.as_str();
                past.push(doc! {"timestamp": at, "sensor_id": {gt: id}});
                past.push(
                    doc! {"timestamp": at, "sensor_id": id, "kind": {gt: after.kind.as_str()}},
                );
            }
            filter = doc! {"$and": [filter, {"$or": past}]};
        }
        let sort = if one {
            doc! {"timestamp": dir, "kind": dir}
        } else {
            doc! {"timestamp": dir, "sensor_id": dir, "kind": dir}
        };
        // One round trip: the first batch holds the whole page (the default is 101 documents).
        let rows: Vec<RowDoc> = self
            .readings
            .clone_with_type::<RowDoc>()
            .find(filter)
            .projection(doc! {"_id": 0})
            .sort(sort)
            .limit(i64::from(query.limit))
            .batch_size(query.limit)
            .await?
            .try_collect()
            .await?;
        Ok(rows.into_iter().filter_map(RowDoc::into_reading).collect())
    }

    /// Every reading `filter` covers, in order, streamed from one server cursor: memory stays
    /// flat however many there are.
    pub async fn stream(
        &self,
        filter: &ReadingFilter,
        order: Order,
    ) -> Result<impl Stream<Item = Result<Reading, StoreError>> + Send + 'static, StoreError> {
        let dir = match order {
            Order::Asc => 1,
            Order::Desc => -1,
        };
        let sort = if filter.one_sensor() {
            doc! {"timestamp": dir, "kind": dir}
        } else {
            doc! {"timestamp": dir, "sensor_id": dir, "kind": dir}
        };
        let cursor = self
            .readings
            .clone_with_type::<RowDoc>()
            .find(filter.to_document())
            .projection(doc! {"_id": 0})
            .sort(sort)
            .batch_size(STREAM_BATCH)
            .await?;
        Ok(cursor.filter_map(|row| async move {
            match row {
                Ok(row) => row.into_reading().map(Ok),
                Err(e) => Some(Err(StoreError::from(e))),
            }
        }))
    }

    /// Calendar buckets computed by MongoDB, oldest first; empty buckets are absent.
    pub async fn aggregate(&self, query: &AggregateQuery) -> Result<Vec<Bucket>, StoreError> {
        let mut group = doc! {"_id": {
            "t": {"$dateTrunc": {
                "date": "$timestamp",
                "unit": query.unit,
                "binSize": query.bin_size,
                "timezone": query.zone.as_str(),
            }},
            "k": "$kind",
        }};
        for stat in &query.stats {
            group.insert(stat.name(), stat.accumulator());
        }
        let mut pipeline = vec![doc! {"$match": query.filter.to_document()}];
        if query
            .stats
            .iter()
            .any(|s| matches!(s, Stat::First | Stat::Last))
        {
            pipeline.push(doc! {"$sort": {"timestamp": 1}});
        }
        pipeline.push(doc! {"$group": group});
        pipeline.push(doc! {"$sort": {"_id.t": 1, "_id.k": 1}});
        let groups: Vec<Document> = self
            .readings
            .aggregate(pipeline)
            .allow_disk_use(true)
            .await?
            .try_collect()
            .await?;
        Ok(groups
            .iter()
            .filter_map(|g| {
                let id = g.get_document("_id").ok()?;
                let start = Timestamp::from_millis(id.get_datetime("t").ok()?.timestamp_millis())?;
                let stats = Stats {
                    min: number(g, "min"),
                    max: number(g, "max"),
                    avg: number(g, "avg"),
                    count: number(g, "count").map(|c| c as u64),
                    first: number(g, "first"),
                    last: number(g, "last"),
                };
                Some(Bucket {
                    start,
                    kind: id.get_str("k").ok()?.to_owned(),
                    stats,
                })
            })
            .collect())
    }

    /// Fixed-width buckets per sensor and kind (avg, min, max), oldest first.
    pub async fn series(&self, query: &SeriesQuery) -> Result<Vec<SeriesPoint>, StoreError> {
        let from = query.filter.start.as_millis();
        let width = query.width_ms.max(1);
        let bucket = doc! {"$floor": {"$divide": [
            {"$subtract": [{"$toLong": "$timestamp"}, from]},
            width,
        ]}};
        let pipeline = vec![
            doc! {"$match": query.filter.to_document()},
            doc! {"$group": {
                "_id": {"b": bucket, "s": "$sensor_id", "k": "$kind"},
                "avg": {"$avg": "$value"},
                "min": {"$min": "$value"},
                "max": {"$max": "$value"},
                "count": {"$sum": 1},
            }},
            doc! {"$sort": {"_id.b": 1, "_id.s": 1, "_id.k": 1}},
        ];
        let groups: Vec<Document> = self
            .readings
            .aggregate(pipeline)
            .allow_disk_use(true)
            .await?
            .try_collect()
            .await?;
        Ok(groups
            .iter()
            .filter_map(|g| {
                let id = g.get_document("_id").ok()?;
                let b = number(id, "b")? as i64;
                Some(SeriesPoint {
                    time: Timestamp::from_millis(from.checked_add(b.checked_mul(width)?)?)?,
                    sensor_id: id.get_str("s").ok()?.to_owned(),
                    kind: id.get_str("k").ok()?.to_owned(),
                    avg: number(g, "avg")?,
                    min: number(g, "min")?,
                    max: number(g, "max")?,
                    count: number(g, "count")? as u64,
                })
            })
            .collect())
    }
}
