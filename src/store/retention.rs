//! Retention: how long MongoDB keeps readings and dead letters, as TTL indexes.
//!
//! Each retention is a single-field TTL index (`timestamp` of readings, `received_at` of dead
//! letters): MongoDB's TTL monitor deletes what expired, on every shard of a sharded collection
//! too, without sensorhub scheduling anything. A changed setting changes the index in place
//! (`collMod`, so the index is never missing and never rebuilt); a server without `collMod`
//! gets the index dropped and created again. Retention off drops the readings' TTL index: it
//! is a second index on `timestamp` that every insert would pay for. This module decides
//! nothing about what to keep; the settings do.
//!
//! Also here, because it is the same start-up look at the collection: whether another writer
//! fills the readings collection (`foreign_documents`).

use std::time::Duration;

use bson::{Document, doc};
use mongodb::error::{Error as MongoError, ErrorKind};
use mongodb::options::IndexOptions;
use mongodb::{Collection, IndexModel};

use super::{Store, StoreError, is_index_not_found};

/// The TTL index of readings (device time).
const READINGS_TTL: &str = "timestamp_ttl";
/// The TTL index of dead letters (arrival time).
const DEAD_LETTERS_TTL: &str = "received_at_ttl";

/// What `set_ttl` did to the index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TtlChange {
    /// It already had this expiry (or was absent and retention is off).
    Unchanged,
    /// It did not exist and was created.
    Created,
    /// Its `expireAfterSeconds` was changed with `collMod`.
    ChangedInPlace,
    /// The server refused `collMod`: the index was dropped and created again.
    Recreated,
    /// Retention is off: the index was dropped.
    Dropped,
}

impl Store {
    /// Makes the readings' TTL index match `retention` (`None`: keep readings forever).
    pub async fn set_reading_retention(
        &self,
        retention: Option<Duration>,
    ) -> Result<TtlChange, StoreError> {
        let readings = self.readings.clone_with_type::<Document>();
        set_ttl(&readings, "timestamp", READINGS_TTL, retention).await
    }

    /// Makes the dead letters' TTL index match the configured time to live.
    pub(super) async fn set_dead_letter_retention(&self) -> Result<TtlChange, StoreError> {
        let dead_letters = self.dead_letters.clone_with_type::<Document>();
        let ttl = Some(self.config.dead_letter_ttl);
        set_ttl(&dead_letters, "received_at", DEAD_LETTERS_TTL, ttl).await
    }

    /// How many documents of the first `sample` in the readings collection sensorhub did not
    /// write: an `_id` that is not a string, or no `kind` (another program's documents, such as
    /// the original Python system's, which share the default names `sensor_data.sensor_readings`).
    pub async fn foreign_documents(&self, sample: i64) -> Result<u64, StoreError> {
        let filter = doc! {"$or": [
            {"_id": {"$not": {"$type": "string"}}},
            {"kind": {"$exists": false}},
        ]};
        let readings = self.readings.clone_with_type::<Document>();
        let mut cursor = readings
            .find(filter)
            .limit(sample)
            .projection(doc! {"_id": 1})
            .await?;
        let mut found = 0;
        while cursor.advance().await? {
            found += 1;
        }
        Ok(found)
    }
}

/// Creates, changes or drops the single-field TTL index `name` on `field`.
async fn set_ttl(
    collection: &Collection<Document>,
    field: &str,
    name: &str,
    ttl: Option<Duration>,
) -> Result<TtlChange, StoreError> {
    let mut indexes = collection.list_indexes().await?;
    let mut existing = None;
    while indexes.advance().await? {
        let index: IndexModel = indexes.deserialize_current()?;
        if index.options.as_ref().and_then(|o| o.name.as_deref()) == Some(name) {
            existing = Some(index.options.and_then(|o| o.expire_after));
        }
    }
    let seconds = ttl.map(|t| i64::try_from(t.as_secs()).unwrap_or(i64::MAX));
    let current = existing.map(|e| e.map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX)));
    let change = match (current, seconds) {
        (None, None) => TtlChange::Unchanged,
        (Some(_), None) => {
            drop_index(collection, name).await?;
            TtlChange::Dropped
        }
        (Some(Some(now)), Some(wanted)) if now == wanted => TtlChange::Unchanged,
        (None, Some(wanted)) => {
            create(collection, field, name, wanted).await?;
            TtlChange::Created
        }
        (Some(_), Some(wanted)) => {
            let command = doc! {
                "collMod": collection.name(),
                "index": {"name": name, "expireAfterSeconds": wanted},
            };
            match collection
                .client()
                .database(&collection.namespace().db)
                .run_command(command)
                .await
            {
                Ok(_) => TtlChange::ChangedInPlace,
                Err(e) if is_unsupported(&e) => {
                    drop_index(collection, name).await?;
                    create(collection, field, name, wanted).await?;
                    TtlChange::Recreated
                }
                Err(e) => return Err(e.into()),
            }
        }
    };
    if change != TtlChange::Unchanged {
        tracing::info!(
            collection = %collection.name(),
            index = name,
            expire_after_secs = seconds,
            change = ?change,
            "retention index updated"
        );
    }
    Ok(change)
}

async fn create(
    collection: &Collection<Document>,
    field: &str,
    name: &str,
    seconds: i64,
) -> Result<(), StoreError> {
    let model = IndexModel::builder()
        .keys(doc! {field: 1})
        .options(
            IndexOptions::builder()
                .name(name.to_owned())
                .expire_after(Duration::from_secs(u64::try_from(seconds).unwrap_or(0)))
                .build(),
        )
        .build();
    collection.create_index(model).await?;
    Ok(())
}

async fn drop_index(collection: &Collection<Document>, name: &str) -> Result<(), StoreError> {
    match collection.drop_index(name).await {
        Err(e) if !is_index_not_found(&e) => Err(e.into()),
        _ => Ok(()),
    }
}

/// `collMod` unknown (59, CommandNotFound) or not supported (115) by this server.
fn is_unsupported(e: &MongoError) -> bool {
    matches!(e.kind.as_ref(), ErrorKind::Command(c) if c.code == 59 || c.code == 115)
}
