//! The destructive operations an admin asks for: deleting one sensor's readings in a range (and
//! correcting its summary), and retiring dead letters that a replay stored.
//!
//! A delete counts what it removed kind by kind (one `deleteMany` per kind), so the summary's
//! counts can go down by exactly that with `$inc`, which commutes with the writer's own `$inc`s
//! however they interleave. First and last seen cannot be moved back by a commuting operator:
//! they are read again from the readings that remain and set, which the writer's summary of
//! readings stored just before or during the delete can overtake (the summary then shows a
//! deleted or an older last value until the sensor's next reading). What this process has
//! summarised but not written yet is written before, so only readings stored during the delete
//! can do that.

use bson::{DateTime, Document, doc};

use super::{ReadingDoc, Store, StoreError};
use crate::domain::{Kind, Reason, SensorId, Timestamp};

/// How long a delete waits for the summary this process has not written yet.
const FLUSH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// What a delete removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Deleted {
    /// Readings removed, by kind.
    pub by_kind: Vec<(Kind, u64)>,
}

impl Deleted {
    pub fn total(&self) -> u64 {
        self.by_kind.iter().map(|(_, n)| n).sum()
    }
}

fn range_filter(sensor: &SensorId, start: Timestamp, end: Timestamp) -> Document {
    doc! {
        "sensor_id": sensor.as_str(),
        "timestamp": {
            "$gte": DateTime::from_millis(start.as_millis()),
            "$lte": DateTime::from_millis(end.as_millis()),
        },
    }
}

impl Store {
    /// Whether `sensor` has any reading at all.
    pub async fn has_readings(&self, sensor: &SensorId) -> Result<bool, StoreError> {
        Ok(self
            .readings
            .find_one(doc! {"sensor_id": sensor.as_str()})
            .await?
            .is_some())
    }

    /// Deletes `sensor`'s readings with `start <= timestamp <= end` (of `kind` only, when
    /// given), one kind at a time, and tells cached range answers of this process about it.
    pub async fn delete_readings(
        &self,
        sensor: &SensorId,
        start: Timestamp,
        end: Timestamp,
        kind: Option<&Kind>,
    ) -> Result<Deleted, StoreError> {
        let filter = range_filter(sensor, start, end);
        let kinds: Vec<Kind> = match kind {
            Some(kind) => vec![kind.clone()],
            None => self
                .readings
                .distinct("kind", filter.clone())
                .await?
                .iter()
                .filter_map(|k| k.as_str().and_then(|k| Kind::parse(k).ok()))
                .collect(),
        };
        let mut deleted = Deleted::default();
        let result = async {
            for kind in kinds {
                let mut of_kind = filter.clone();
                of_kind.insert("kind", kind.as_str());
                let n = self.readings.delete_many(of_kind).await?.deleted_count;
                if n > 0 {
                    deleted.by_kind.push((kind, n));
                }
            }
            Ok::<_, StoreError>(())
        }
        .await;
        // Recorded whatever the outcome: a failed delete may still have removed some.
        self.writes.record(start, end);
        result.map(|()| deleted)
    }

    /// Takes what a delete removed out of `sensor`'s summary: counts down by exactly what was
    /// deleted, first and last seen read again from the readings that remain. A sensor left
    /// without readings loses its summary.
    pub async fn forget_in_summary(
        &self,
        sensor: &SensorId,
        deleted: &Deleted,
    ) -> Result<(), StoreError> {
        if deleted.by_kind.is_empty() {
            return Ok(());
        }
        // What this process summarised and has not written may hold deleted readings: written
        // first (after any write under way), the times read again below overrule it.
        self.flush_summaries(FLUSH_TIMEOUT)
            .await
            .map_err(|(error, _)| error)?;
        let id = sensor.as_str();
        let Some((first, last)) = self.bounds(id, None).await? else {
            self.summaries.delete_one(doc! {"_id": id}).await?;
            return Ok(());
        };
        let mut set = doc! {"first_seen": first.timestamp, "last_seen": last.timestamp};
        let (mut inc, mut unset) = (Document::new(), Document::new());
        inc.insert("count", -i64::try_from(deleted.total()).unwrap_or(i64::MAX));
        for (kind, n) in &deleted.by_kind {
            let field = super::summaries::escape_field(kind.as_str());
            match self.bounds(id, Some(kind)).await? {
                None => {
                    unset.insert(format!("kinds.{field}"), "");
                }
                Some((first, last)) => {
                    inc.insert(
                        format!("kinds.{field}.count"),
                        -i64::try_from(*n).unwrap_or(i64::MAX),
                    );
                    set.insert(format!("kinds.{field}.first"), first.timestamp);
                    set.insert(
                        format!("kinds.{field}.last"),
                        doc! {"t": last.timestamp, "v": last.value},
                    );
                }
            }
        }
        let mut update = doc! {"$set": set, "$inc": inc};
        if !unset.is_empty() {
            update.insert("$unset", unset);
        }
        self.summaries.update_one(doc! {"_id": id}, update).await?;
        Ok(())
    }

    /// The oldest and the newest reading of a sensor (of one kind), if it has any.
    async fn bounds(
        &self,
        sensor: &str,
        kind: Option<&Kind>,
    ) -> Result<Option<(ReadingDoc, ReadingDoc)>, StoreError> {
        let mut filter = doc! {"sensor_id": sensor};
        if let Some(kind) = kind {
            filter.insert("kind", kind.as_str());
        }
        let one = |order: i32| {
            self.readings
                .find_one(filter.clone())
                .sort(doc! {"sensor_id": order, "timestamp": order, "kind": order})
        };
        let (Some(first), Some(last)) = (one(1).await?, one(-1).await?) else {
            return Ok(None);
        };
        Ok(Some((first, last)))
    }

    /// Deletes these dead letters; how many there were.
    pub async fn remove_dead_letters(&self, ids: &[String]) -> Result<u64, StoreError> {
        if ids.is_empty() {
            return Ok(0);
        }
        Ok(self
            .dead_letters
            .delete_many(doc! {"_id": {"$in": ids}})
            .await?
            .deleted_count)
    }

    /// Gives a dead letter the reason a new judgement found.
    pub async fn rejudge_dead_letter(
        &self,
        id: &str,
        reason: Reason,
        message: &str,
    ) -> Result<(), StoreError> {
        self.dead_letters
            .update_one(
                doc! {"_id": id},
                doc! {"$set": {"reason": reason.code(), "message": message}},
            )
            .await?;
        Ok(())
    }
}
