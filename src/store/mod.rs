//! MongoDB: the full history of readings and the dead letters.
//!
//! The only module that speaks BSON. Readings go in as batches (`insert_many`, unordered) under a
//! deterministic `_id` (sensor id, kind and millisecond), so a redelivery or a replay is a duplicate-key
//! error, counted as success. Everything that comes out is a `domain` type; documents never
//! leave this module. It must not decide anything about readings (that is `domain`) nor retry
//! (that is the caller's policy).

mod deletes;
mod history;
mod retention;
mod roster;
mod sparkplug;
mod summaries;
mod writes;

use std::sync::Arc;
use std::time::Duration;

use bson::{Bson, DateTime, doc, spec::BinarySubtype};
use futures_util::{Stream, StreamExt, TryStreamExt};
use mongodb::error::{Error as MongoError, ErrorKind};
use mongodb::options::{Acknowledgment, ClientOptions, IndexOptions};
use mongodb::{Client, Collection, IndexModel};
use serde::{Deserialize, Serialize};

use crate::domain::{DeadLetter, Kind, Reading, Reason, SensorId, Tags, Timestamp};
pub use deletes::Deleted;
pub use history::{
    AggregateQuery, Bucket, Order, RangeCursor, RangeQuery, ReadingFilter, SeriesPoint,
    SeriesQuery, Stat, Stats,
};
pub use retention::TtlChange;
pub use summaries::{KindSummary, LatestHint, SensorSummary, SummaryFold, SummaryQuery};
pub use writes::WriteLog;

/// Where the history lives.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    pub uri: String,
    pub database: String,
    pub collection: String,
    pub dead_letter_collection: String,
    /// Dead letters are deleted this long after they arrived.
    pub dead_letter_ttl: Duration,
    /// How long an operation waits for a reachable server before it fails.
    pub server_selection_timeout: Duration,
    /// The write concern's `w`; `None`: the URI's, else `majority` on a replica set.
    pub write_concern: Option<WriteConcern>,
}

/// A write concern's `w` as the setting writes it: `majority`, a node count, or a tag set's
/// name. (`0`, no acknowledgement, is refused: the local log would drop readings MongoDB never
/// confirmed.)
#[derive(Clone, Debug, PartialEq)]
pub struct WriteConcern(Acknowledgment);

impl WriteConcern {
    pub fn parse(text: &str) -> Result<Self, String> {
        let w = match text.trim() {
            "" => return Err("it is empty: use majority, a number of nodes, or a tag".into()),
            "majority" => Acknowledgment::Majority,
            "0" => return Err("w: 0 would let the local log drop unconfirmed readings".into()),
            n if n.bytes().all(|b| b.is_ascii_digit()) => n
                .parse()
                .map(Acknowledgment::Nodes)
                .map_err(|_| format!("{n} nodes is too many"))?,
            tag => Acknowledgment::Custom(tag.to_owned()),
        };
        Ok(Self(w))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("MONGODB_URI is not a valid MongoDB connection string")]
    InvalidUri(#[source] MongoError),
    #[error("MongoDB is unreachable")]
    Unavailable(#[source] MongoError),
    #[error("MongoDB gave no answer within {} s", .0.as_secs())]
    TimedOut(Duration),
    #[error("MongoDB refused the operation")]
    Failed(#[source] MongoError),
    #[error("MongoDB refused {0} sensor summary updates")]
    SummaryRejected(usize),
}

impl StoreError {
    /// Whether the server could not be reached (as opposed to refusing what was asked).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable(_) | Self::TimedOut(_))
    }
}

impl From<MongoError> for StoreError {
    fn from(e: MongoError) -> Self {
        match e.kind.as_ref() {
            ErrorKind::Io(_)
            | ErrorKind::ServerSelection { .. }
            | ErrorKind::ConnectionPoolCleared { .. }
            | ErrorKind::DnsResolve { .. } => Self::Unavailable(e),
            _ => Self::Failed(e),
        }
    }
}

const DUPLICATE_KEY: i32 = 11000;
const INDEX_NOT_FOUND: i32 = 27;

/// Indexes of earlier versions, whose identity had no kind; dropped at start.
const LEGACY_INDEXES: [&str; 2] = ["sensor_id_timestamp", "timestamp_sensor_id"];

fn is_index_not_found(e: &MongoError) -> bool {
    match e.kind.as_ref() {
        ErrorKind::Command(c) => c.code == INDEX_NOT_FOUND || c.code_name == "IndexNotFound",
        _ => false,
    }
}

/// How far back `latest` looks before it looks everywhere: 10 s, 10 min, 1 day, 30 days.
const LATEST_WINDOWS_MS: [i64; 4] = [10_000, 600_000, 86_400_000, 2_592_000_000];

#[derive(Debug, Serialize, Deserialize)]
struct ReadingDoc {
    // First, and set by us: the driver then neither generates nor prepends one.
    #[serde(rename = "_id")]
    id: String,
    sensor_id: String,
    kind: String,
    value: f64,
    timestamp: DateTime,
    /// A topic template's tags; left out when there are none, as in documents of earlier
    /// versions.
    #[serde(default, skip_serializing_if = "Tags::is_empty")]
    tags: Tags,
}

impl ReadingDoc {
    fn from_reading(r: &Reading) -> Self {
        Self {
            id: r.key(),
            sensor_id: r.sensor_id().as_str().to_owned(),
            kind: r.kind().as_str().to_owned(),
            value: r.value(),
            timestamp: DateTime::from_millis(r.timestamp().as_millis()),
            tags: r.tags().clone(),
        }
    }

    /// `None` for a document that is not a valid reading (written by someone else).
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

#[derive(Debug, Serialize, Deserialize)]
struct DeadLetterDoc {
    #[serde(rename = "_id")]
    id: String,
    received_at: DateTime,
    topic: String,
    payload: bson::Binary,
    payload_bytes: i64,
    reason: String,
    message: String,
}

/// Where a page of dead letters starts: after this one in newest-first order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetterCursor {
    pub received_at: Timestamp,
    pub id: String,
}

#[derive(Clone, Debug)]
pub struct DeadLetterQuery {
    pub reason: Option<Reason>,
    pub before: Option<DeadLetterCursor>,
    pub limit: u32,
}

/// The outcome of storing a batch: which readings were already there.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Inserted {
    /// Positions in the batch of documents whose `_id` was already stored.
    pub duplicates: Vec<usize>,
}

#[derive(Clone, Debug)]
pub struct Store {
    client: Client,
    readings: Collection<ReadingDoc>,
    dead_letters: Collection<DeadLetterDoc>,
    /// One document per sensor (`summaries.rs`), named after the readings collection.
    summaries: Collection<summaries::SummaryDoc>,
    /// One document per Sparkplug edge node (`sparkplug.rs`), named after the readings.
    sparkplug: Collection<bson::Document>,
    config: StoreConfig,
    /// The time ranges this process wrote readings into, for readers that cache.
    writes: Arc<WriteLog>,
    /// The sensor summary's part this process has not written yet, added to its reads.
    unwritten: Arc<summaries::Unwritten>,
    /// The summary's sensor ids, for paging `sensors` (`roster.rs`).
    roster: Arc<roster::Roster>,
}

impl Store {
    /// Connects and checks the server answers; fails fast when it does not.
    pub async fn connect(config: StoreConfig) -> Result<Self, StoreError> {
        let mut options = ClientOptions::parse(&config.uri)
            .await
            .map_err(StoreError::InvalidUri)?;
        options
            .app_name
            .get_or_insert_with(|| "sensorhub".to_owned());
        // The local log lets go of a reading once MongoDB acknowledged it, so that
        // acknowledgement must mean "on disk" (journaled) and, on a replica set, "on a majority"
        // (a write only the old primary held is rolled back after a failover). The setting
        // wins over the URI, the URI over these defaults.
        let replica_set = options.repl_set_name.is_some();
        let concern = options.write_concern.get_or_insert_with(Default::default);
        concern.journal.get_or_insert(true);
        match &config.write_concern {
            Some(WriteConcern(w)) => concern.w = Some(w.clone()),
            None if replica_set => {
                concern.w.get_or_insert(Acknowledgment::Majority);
            }
            None => {}
        }
        // A write interrupted by a failover is retried once by the driver, with the same ids.
        options.retry_writes.get_or_insert(true);
        let w = concern.w.as_ref().map_or_else(
            || "the server's default".to_owned(),
            |w| match w {
                Acknowledgment::Majority => "majority".to_owned(),
                Acknowledgment::Nodes(n) => n.to_string(),
                other => format!("{other:?}"),
            },
        );
        tracing::info!(
            replica_set = options.repl_set_name.as_deref().unwrap_or(""),
            write_concern = %w,
            journaled = concern.journal.unwrap_or(false),
            "MongoDB write concern"
        );
        options.server_selection_timeout = Some(config.server_selection_timeout);
        options
            .connect_timeout
            .get_or_insert(config.server_selection_timeout);
        let client = Client::with_options(options)?;
        let db = client.database(&config.database);
        let store = Self {
            readings: db.collection(&config.collection),
            dead_letters: db.collection(&config.dead_letter_collection),
            summaries: db.collection(&format!("{}.sensors", config.collection)),
            sparkplug: db.collection(&format!("{}.sparkplug", config.collection)),
            client,
            config,
            writes: Arc::default(),
            unwritten: Arc::default(),
            roster: Arc::default(),
        };
        store.ping().await?;
        Ok(store)
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        self.client
            .database("admin")
            .run_command(doc! {"ping": 1})
            .await?;
        Ok(())
    }

    /// Creates the indexes every query here relies on (idempotent).
    pub async fn ensure_indexes(&self) -> Result<(), StoreError> {
        let named = |keys, name: &str| {
            IndexModel::builder()
                .keys(keys)
                .options(IndexOptions::builder().name(name.to_owned()).build())
                .build()
        };
        self.readings
            .create_indexes([
                // Per-sensor ranges and latest: equality then time; kind last makes the order
                // total (one reading per sensor, kind and millisecond), for paging.
                named(
                    doc! {"sensor_id": 1, "timestamp": 1, "kind": 1},
                    "sensor_id_timestamp_kind",
                ),
                // Ranges over all sensors, in the same total order.
                named(
                    doc! {"timestamp": 1, "sensor_id": 1, "kind": 1},
                    "timestamp_sensor_id_kind",
                ),
            ])
            .await?;
        // The indexes of the identity without kind are prefixes of these: every write would
        // pay for them and no query needs them.
        for legacy in LEGACY_INDEXES {
            if let Err(e) = self.readings.drop_index(legacy).await
                && !is_index_not_found(&e)
            {
                return Err(e.into());
            }
        }
        self.dead_letters
            .create_indexes([named(
                doc! {"reason": 1, "received_at": 1},
                "reason_received_at",
            )])
            .await?;
        // The TTL index is changed in place when the setting changes (retention.rs).
        self.set_dead_letter_retention().await?;
        Ok(())
    }

    /// Stores a batch. A reading whose key is already stored is reported, not an error.
    pub async fn insert_readings(&self, readings: &[Reading]) -> Result<Inserted, StoreError> {
        let all: Vec<usize> = (0..readings.len()).collect();
        self.insert_some(readings, &all).await
    }

    /// Stores the readings at positions `which` of `readings`; duplicates are reported as
    /// positions in `readings`.
    ///
    /// They go in the order of the index that leads with the sensor: a sensor's readings of
    /// the batch then land side by side in two of the three indexes (`_id` and
    /// `sensor_id_timestamp_kind`), where arrival order scatters them over every sensor's
    /// pages. Measured on the MongoDB wire server, 1 MiB of the log per write: 38,500
    /// readings/s stored against 32,000 in arrival order.
    pub async fn insert_some(
        &self,
        readings: &[Reading],
        which: &[usize],
    ) -> Result<Inserted, StoreError> {
        if which.is_empty() {
            return Ok(Inserted::default());
        }
        let mut order = which.to_vec();
        order.sort_unstable_by(|&a, &b| index_order(&readings[a]).cmp(&index_order(&readings[b])));
        let docs: Vec<ReadingDoc> = (order.iter())
            .map(|&i| ReadingDoc::from_reading(&readings[i]))
            .collect();
        let result = self.readings.insert_many(&docs).ordered(false).await;
        // Recorded whatever the outcome: a failed insert may still have stored some.
        let times = order.iter().map(|&i| readings[i].timestamp());
        if let (Some(earliest), Some(latest)) = (times.clone().min(), times.max()) {
            self.writes.record(earliest, latest);
        }
        match result {
            Ok(_) => Ok(Inserted::default()),
            Err(e) => match only_duplicates(&e) {
                Some(duplicates) => Ok(Inserted {
                    duplicates: duplicates.into_iter().map(|d| order[d]).collect(),
                }),
                None => Err(e.into()),
            },
        }
    }

    /// The time ranges this process wrote readings into, for readers that cache.
    pub fn writes(&self) -> &WriteLog {
        &self.writes
    }

    /// Keeps dead letters; one already kept (a replay, or a retry of a write that did land)
    /// is reported, not an error.
    pub async fn insert_dead_letters(
        &self,
        letters: &[DeadLetter],
    ) -> Result<Inserted, StoreError> {
        if letters.is_empty() {
            return Ok(Inserted::default());
        }
        let docs: Vec<DeadLetterDoc> = letters
            .iter()
            .map(|d| DeadLetterDoc {
                id: d.id.clone(),
                received_at: DateTime::from_millis(d.received_at.as_millis()),
                topic: d.topic.clone(),
                payload: bson::Binary {
                    subtype: BinarySubtype::Generic,
                    bytes: d.payload.to_vec(),
                },
                payload_bytes: i64::try_from(d.payload_len).unwrap_or(i64::MAX),
                reason: d.reason.code().to_owned(),
                message: d.message.clone(),
            })
            .collect();
        match self.dead_letters.insert_many(&docs).ordered(false).await {
            Ok(_) => Ok(Inserted::default()),
            Err(e) => match only_duplicates(&e) {
                Some(duplicates) => Ok(Inserted { duplicates }),
                None => Err(e.into()),
            },
        }
    }

    /// The `n` newest readings of one sensor, or of all sensors, newest first.
    ///
    /// Asked first for a recent window, then for wider ones: the MongoDB wire server this is
    /// tested against walks every index entry a query matches before it applies the limit, so
    /// an unbounded "newest ten" costs the sensor's whole history. The first window answers for
    /// any sensor that reported lately; on MongoDB each step is an index seek either way.
    /// With `kind`, only readings of that kind (of that sensor, or of all sensors).
    pub async fn latest(
        &self,
        sensor: Option<&SensorId>,
        kind: Option<&Kind>,
        n: u32,
    ) -> Result<Vec<Reading>, StoreError> {
        self.latest_from(sensor, kind, n, Timestamp::now(), &LATEST_WINDOWS_MS)
            .await
    }

    /// `latest` for one sensor, with what its summary says (`LatestHint`): the windows end at
    /// the summary's newest reading rather than now, and a sensor with no more readings than
    /// asked for is read whole at once. A hint only moves where the search starts, never what
    /// it finds: a window counts only when it holds `n` readings, whatever its start.
    pub async fn latest_hinted(
        &self,
        sensor: &SensorId,
        n: u32,
        hint: Option<LatestHint>,
    ) -> Result<Vec<Reading>, StoreError> {
        let Some(hint) = hint else {
            return self.latest(Some(sensor), None, n).await;
        };
        let windows: &[i64] = if hint.count <= u64::from(n) {
            &[]
        } else {
            &LATEST_WINDOWS_MS
        };
        self.latest_from(Some(sensor), None, n, hint.newest, windows)
            .await
    }

    /// The `n` newest readings, asked for since `end - window` for each window in turn, then
    /// with no bound.
    async fn latest_from(
        &self,
        sensor: Option<&SensorId>,
        kind: Option<&Kind>,
        n: u32,
        end: Timestamp,
        windows: &[i64],
    ) -> Result<Vec<Reading>, StoreError> {
        let mut readings = Vec::new();
        for window in windows.iter().map(Some).chain([None]) {
            let mut filter = match sensor {
                Some(id) => doc! {"sensor_id": id.as_str()},
                None => doc! {},
            };
            if let Some(kind) = kind {
                filter.insert("kind", kind.as_str());
            }
            if let Some(window) = window {
                let since = end.saturating_add_millis(-window);
                filter.insert(
                    "timestamp",
                    doc! {"$gte": DateTime::from_millis(since.as_millis())},
                );
            }
            let sort = match sensor {
                Some(_) => doc! {"timestamp": -1, "kind": -1},
                None => doc! {"timestamp": -1, "sensor_id": -1, "kind": -1},
            };
            let cursor = self
                .readings
                .find(filter)
                .sort(sort)
                .limit(i64::from(n))
                .await?;
            readings = collect_readings(cursor).await?;
            // Everything newer than the window's start is in it: n found means the n newest.
            if readings.len() >= n as usize {
                break;
            }
        }
        Ok(readings)
    }

    /// Every reading, ascending by time, as a stream read from a server cursor in batches: memory
    /// stays flat however many there are.
    pub async fn stream_all(
        &self,
    ) -> Result<impl Stream<Item = Result<Reading, StoreError>> + Send + 'static, StoreError> {
        let cursor = self
            .readings
            .find(doc! {})
            .sort(doc! {"timestamp": 1, "sensor_id": 1, "kind": 1})
            .batch_size(1000)
            .await?;
        Ok(cursor.filter_map(|doc| async move {
            match doc {
                Ok(doc) => doc.into_reading().map(Ok),
                Err(e) => Some(Err(StoreError::from(e))),
            }
        }))
    }

    /// Up to `limit` sensor ids that have readings, in ascending order, after `after`: a walk
    /// over every sensor in bounded steps (one `distinct` over the whole collection fails past
    /// 16 MB of ids). The sort before the group lets MongoDB answer from the
    /// (sensor_id, timestamp, kind) index with a distinct scan.
    pub async fn sensor_ids_after(
        &self,
        after: Option<&SensorId>,
        limit: u32,
    ) -> Result<Vec<SensorId>, StoreError> {
        let mut pipeline = Vec::with_capacity(5);
        if let Some(after) = after {
            pipeline.push(doc! {"$match": {"sensor_id": {"$gt": after.as_str()}}});
        }
        pipeline.extend([
            doc! {"$sort": {"sensor_id": 1}},
            doc! {"$group": {"_id": "$sensor_id"}},
            doc! {"$sort": {"_id": 1}},
            doc! {"$limit": i64::from(limit)},
        ]);
        let groups: Vec<bson::Document> = self
            .readings
            .aggregate(pipeline)
            .allow_disk_use(true)
            .await?
            .try_collect()
            .await?;
        Ok(groups
            .iter()
            .filter_map(|g| g.get("_id").and_then(Bson::as_str))
            .filter_map(|id| SensorId::parse(id).ok())
            .collect())
    }

    /// Dead letters, newest first.
    pub async fn dead_letters(
        &self,
        query: &DeadLetterQuery,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        let mut filter = doc! {};
        if let Some(reason) = query.reason {
            filter.insert("reason", reason.code());
        }
        if let Some(before) = &query.before {
            let at = DateTime::from_millis(before.received_at.as_millis());
            filter = doc! {"$and": [filter, {"$or": [
                {"received_at": {"$lt": at}},
                {"received_at": at, "_id": {"$lt": before.id.as_str()}},
            ]}]};
        }
        let docs: Vec<DeadLetterDoc> = self
            .dead_letters
            .find(filter)
            .sort(doc! {"received_at": -1, "_id": -1})
            .limit(i64::from(query.limit))
            .await?
            .try_collect()
            .await?;
        Ok(docs
            .into_iter()
            .filter_map(|d| {
                Some(DeadLetter {
                    id: d.id,
                    received_at: Timestamp::from_millis(d.received_at.timestamp_millis())?,
                    topic: d.topic,
                    payload: d.payload.bytes.into(),
                    payload_len: usize::try_from(d.payload_bytes).unwrap_or(0),
                    reason: Reason::from_code(&d.reason)?,
                    message: d.message,
                })
            })
            .collect())
    }

    pub async fn count_readings(&self) -> Result<u64, StoreError> {
        Ok(self.readings.count_documents(doc! {}).await?)
    }
}

async fn collect_readings(cursor: mongodb::Cursor<ReadingDoc>) -> Result<Vec<Reading>, StoreError> {
    let docs: Vec<ReadingDoc> = cursor.try_collect().await?;
    Ok(docs
        .into_iter()
        .filter_map(ReadingDoc::into_reading)
        .collect())
}

/// A reading's place in the `sensor_id_timestamp_kind` index.
fn index_order(r: &Reading) -> (&str, Timestamp, &str) {
    (r.sensor_id().as_str(), r.timestamp(), r.kind().as_str())
}

/// The positions of the duplicates when an unordered insert failed only on duplicate keys.
fn only_duplicates(e: &MongoError) -> Option<Vec<usize>> {
    let ErrorKind::InsertMany(failure) = e.kind.as_ref() else {
        return None;
    };
    if failure.write_concern_error.is_some() {
        return None;
    }
    let errors = failure.write_errors.as_deref().unwrap_or_default();
    errors
        .iter()
        .map(|w| (w.code == DUPLICATE_KEY).then_some(w.index))
        .collect()
}
