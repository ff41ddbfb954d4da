//! The destructive operations, behind an admin key: deleting a sensor's readings in a range, and
//! replaying dead letters once what rejected them is fixed.
//!
//! Both keep the promise the pipeline makes: a replayed dead letter becomes the reading a first
//! pass would have stored (same decoder, same capture time, same `_id`), stored once whatever
//! fails or runs twice, and only then removed from the dead letters. A delete corrects MongoDB
//! first, then the summary and Redis; when Redis cannot be corrected it says so (503), and the
//! same request sent again finishes the job. Handlers here translate; the store and the cache
//! do the work.

use bytes::Bytes;
use poem_openapi::param::{Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::{Object, OpenApi};

use super::access::AdminKey;
use super::error::ApiError;
use super::params::{DateTimeParam, ReasonParam};
use super::types::Reply;
use super::{ApiState, Tag};
use crate::domain::{
    Captured, DeadLetter, Decoded, Kind, Reading, Reason, Rejection, SensorId, decode,
};
use crate::store::{DeadLetterCursor, DeadLetterQuery, SummaryFold};

/// Dead letters read per step of a replay.
const REPLAY_STEP: u32 = 1000;

pub struct Admin {
    pub state: ApiState,
}

/// What a delete removed.
#[derive(Debug, Object)]
#[oai(rename = "Deleted")]
pub struct DeletedOut {
    pub sensor_id: String,
    /// Readings deleted from MongoDB.
    pub deleted: u64,
    /// The same, by kind (kinds with none deleted are left out).
    pub by_kind: Vec<KindDeletedOut>,
}

#[derive(Debug, Object)]
#[oai(rename = "KindDeleted")]
pub struct KindDeletedOut {
    pub kind: String,
    pub deleted: u64,
}

/// What a replay did.
#[derive(Debug, Default, Object)]
#[oai(rename = "Replay")]
pub struct ReplayOut {
    /// The reason replayed.
    pub reason: String,
    /// Dead letters of that reason looked at.
    pub examined: u64,
    /// Dead letters that now decode: stored as readings and removed from the dead letters.
    pub replayed: u64,
    /// Of those, readings MongoDB did not hold yet (the rest were already stored).
    pub stored: u64,
    /// Dead letters that still fail; they stay, under the reason they fail with now.
    pub still_failing: u64,
    /// Dead letters skipped because only the head of their payload was kept (payloads over
    /// 4 KiB): they cannot be decoded again. They stay.
    pub skipped_truncated: u64,
    /// More dead letters of that reason remain past `limit`: call again.
    pub has_more: bool,
}

#[OpenApi(tag = "Tag::Admin")]
impl Admin {
    /// Delete a sensor's readings in a time range
    ///
    /// Deletes the readings of `sensor_id` with `start <= timestamp <= end` (of `kind` only,
    /// when given) from MongoDB, then takes them out of Redis's latest ten (refilled from
    /// MongoDB) and out of the sensor summary of `/sensors`: its counts go down by exactly what
    /// was deleted, its first and last seen are read again from the readings that remain (for a
    /// sensor reporting during the delete they may show a deleted or older reading until its
    /// next one). A sensor left without readings disappears from `/sensors`. An end before
    /// the start deletes nothing. 404 when the sensor has no readings at all; 503 when MongoDB,
    /// or Redis after the delete, is unreachable: the same request sent again completes it.
    /// Needs an admin key when the server runs with API keys.
    #[oai(path = "/sensors/:sensor_id/readings", method = "delete")]
    async fn delete_readings(
        &self,
        key: AdminKey,
        /// The sensor's id.
        sensor_id: Path<String>,
        /// Start of the range, inclusive (RFC 3339; naive ISO 8601 is read as UTC).
        start: Query<DateTimeParam>,
        /// End of the range, inclusive.
        end: Query<DateTimeParam>,
        /// Only readings of this kind.
        kind: Query<Option<String>>,
    ) -> Reply<Json<DeletedOut>> {
        self.delete(&key, &sensor_id.0, start.0.0, end.0.0, kind.0)
            .await
            .map(|out| Reply::Ok(Json(out), None, None))
            .unwrap_or_else(Reply::from)
    }

    /// Replay dead letters of one reason
    ///
    /// Decodes the dead letters of `reason` again with the decoder as the server now runs it
    /// (after `--max-payload-bytes` was raised, `--earliest-timestamp` moved back or
    /// `--max-future-skew-secs` widened, say), judged at the instant each was first received.
    /// Those that now pass are stored exactly once, under the id a first pass would have given
    /// them, and removed from the dead letters; the others stay, under the reason they fail
    /// with now. `forbidden` dead letters fail again: who sent them is not kept, so their
    /// grant cannot be checked anew. At most `limit` dead letters per call (`has_more` says when
    /// more remain). Needs an admin key when the server runs with API keys.
    #[oai(path = "/dead-letters/replay", method = "post")]
    async fn replay(
        &self,
        key: AdminKey,
        /// The reason whose dead letters are replayed.
        reason: Query<ReasonParam>,
        /// Dead letters looked at, at most (default 10000).
        #[oai(validator(minimum(value = "1"), maximum(value = "100000")))]
        limit: Query<Option<u32>>,
    ) -> Reply<Json<ReplayOut>> {
        self.replay_reason(&key, reason.0.0, limit.0.unwrap_or(10_000))
            .await
            .map(|out| Reply::Ok(Json(out), None, None))
            .unwrap_or_else(Reply::from)
    }
}

impl Admin {
    async fn delete(
        &self,
        key: &AdminKey,
        sensor_id: &str,
        start: crate::domain::Timestamp,
        end: crate::domain::Timestamp,
        kind: Option<String>,
    ) -> Result<DeletedOut, ApiError> {
        let unknown = || ApiError::NotFound(format!("no readings for sensor '{sensor_id}'"));
        let id = SensorId::parse(sensor_id).map_err(|_| unknown())?;
        let store = &self.state.store;
        if !store.has_readings(&id).await? {
            return Err(unknown());
        }
        let mut out = DeletedOut {
            sensor_id: id.as_str().to_owned(),
            deleted: 0,
            by_kind: Vec::new(),
        };
        // No reading can be of a kind that does not parse, or in a reversed range.
        let kind = match kind.as_deref().map(Kind::parse).transpose() {
            Ok(kind) if start <= end => kind,
            _ => return Ok(out),
        };
        let deleted = store
            .delete_readings(&id, start, end, kind.as_ref())
            .await?;
        tracing::info!(
            key = key.name.as_deref().unwrap_or("-"),
            sensor_id = %id,
            %start,
            %end,
            kind = kind.as_ref().map(Kind::as_str),
            deleted = deleted.total(),
            "readings deleted"
        );
        out.deleted = deleted.total();
        out.by_kind = deleted
            .by_kind
            .iter()
            .map(|(kind, n)| KindDeletedOut {
                kind: kind.as_str().to_owned(),
                deleted: *n,
            })
            .collect();
        store.forget_in_summary(&id, &deleted).await?;
        self.forget_in_cache(&id, start, end, kind.as_ref())
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, sensor_id = %id, "cannot correct Redis after a delete");
                ApiError::Unavailable(format!(
                    "{} readings were deleted from MongoDB, but Redis's latest ten could not be \
                     corrected ({e}); send the same request again",
                    out.deleted
                ))
            })?;
        Ok(out)
    }

    /// Takes the deleted readings out of the sensor's and the overall latest ten, then refills
    /// both from MongoDB.
    async fn forget_in_cache(
        &self,
        id: &SensorId,
        start: crate::domain::Timestamp,
        end: crate::domain::Timestamp,
        kind: Option<&Kind>,
    ) -> Result<(), String> {
        let (cache, store) = (&self.state.cache, &self.state.store);
        cache
            .forget(id, start, end, kind)
            .await
            .map_err(|e| crate::error_chain(&e))?;
        let latest = crate::cache::LATEST as u32;
        for sensor in [Some(id), None] {
            let readings = store
                .latest(sensor, None, latest)
                .await
                .map_err(|e| crate::error_chain(&e))?;
            cache
                .rebuild(sensor, &readings)
                .await
                .map_err(|e| crate::error_chain(&e))?;
        }
        Ok(())
    }

    async fn replay_reason(
        &self,
        key: &AdminKey,
        reason: Reason,
        limit: u32,
    ) -> Result<ReplayOut, ApiError> {
        let store = &self.state.store;
        let mut out = ReplayOut {
            reason: reason.code().to_owned(),
            ..ReplayOut::default()
        };
        let mut fold = SummaryFold::default();
        let mut before: Option<DeadLetterCursor> = None;
        let mut left = limit;
        while left > 0 {
            let letters = store
                .dead_letters(&DeadLetterQuery {
                    reason: Some(reason),
                    before: before.clone(),
                    limit: left.min(REPLAY_STEP),
                })
                .await?;
            let Some(last) = letters.last() else {
                break;
            };
            before = Some(DeadLetterCursor {
                received_at: last.received_at,
                id: last.id.clone(),
            });
            left -= letters.len() as u32;
            out.examined += letters.len() as u64;
            let (readings, passed) = self.rejudge(letters, &mut out).await?;
            let inserted = store.insert_readings(&readings).await?;
            let duplicates: std::collections::HashSet<usize> =
                inserted.duplicates.into_iter().collect();
            let new: Vec<Reading> = (readings.into_iter().enumerate())
                .filter_map(|(i, r)| (!duplicates.contains(&i)).then_some(r))
                .collect();
            // Stored first, removed after: a failure in between leaves a dead letter whose
            // reading is stored, and the next replay finds it a duplicate.
            store.remove_dead_letters(&passed).await?;
            out.replayed += passed.len() as u64;
            out.stored += new.len() as u64;
            fold.add(&new);
            self.announce(&new).await;
        }
        if left == 0 {
            out.has_more = !store
                .dead_letters(&DeadLetterQuery {
                    reason: Some(reason),
                    before,
                    limit: 1,
                })
                .await?
                .is_empty();
        }
        if let Err((e, _)) = store.record_summaries(&fold).await {
            tracing::warn!(
                error = crate::error_chain(&e),
                "cannot add replayed readings to the sensor summary; its counts miss them"
            );
        }
        tracing::info!(
            key = key.name.as_deref().unwrap_or("-"),
            reason = reason.code(),
            examined = out.examined,
            replayed = out.replayed,
            stored = out.stored,
            still_failing = out.still_failing,
            skipped_truncated = out.skipped_truncated,
            "dead letters replayed"
        );
        Ok(out)
    }

    /// Judges dead letters again: the readings that now pass with their dead letters' ids. The
    /// ones that fail with another reason get it.
    async fn rejudge(
        &self,
        letters: Vec<DeadLetter>,
        out: &mut ReplayOut,
    ) -> Result<(Vec<Reading>, Vec<String>), ApiError> {
        let limits = &self.state.options.limits;
        let (mut readings, mut passed) = (Vec::new(), Vec::new());
        for letter in letters {
            if letter.payload.len() < letter.payload_len {
                out.skipped_truncated += 1;
                continue;
            }
            // A topic that was not UTF-8 was kept with replacement characters: not the topic
            // the device sent, so it is not judged again.
            if letter.topic.contains(char::REPLACEMENT_CHARACTER) {
                out.still_failing += 1;
                continue;
            }
            let captured = Captured {
                received_at: letter.received_at,
                topic: Bytes::from(letter.topic.into_bytes()),
                payload: letter.payload,
                payload_len: letter.payload_len,
            };
            match decode(&captured, limits).map(|decoded| element_of(&letter.id, decoded)) {
                Ok(Ok(now)) => {
                    readings.extend(now);
                    passed.push(letter.id);
                }
                Ok(Err(rejection)) | Err(rejection) => {
                    out.still_failing += 1;
                    if rejection.reason != letter.reason {
                        self.state
                            .store
                            .rejudge_dead_letter(&letter.id, rejection.reason, &rejection.message)
                            .await?;
                    }
                }
            }
        }
        Ok((readings, passed))
    }

    /// Newly stored readings go where the writer's go: Redis (or a stale mark) and `/stream`.
    async fn announce(&self, new: &[Reading]) {
        if new.is_empty() {
            return;
        }
        let (cache, health) = (&self.state.cache, &self.state.health);
        if !health.is_up() || !cache.is_connected() {
            health.mark_dirty(new);
        } else if let Err(e) = cache.apply(new).await {
            health.set_up(false);
            health.mark_dirty(new);
            tracing::warn!(
                error = crate::error_chain(&e),
                "Redis update failed; latest sets will be rebuilt from MongoDB"
            );
        }
        self.state.live.publish(new);
    }
}

/// What a dead letter stands for in its message judged again: one element (an id
/// `<log id>:<lsn>:<index>`, the log id being hex) or the whole message (`<log id>:<lsn>`).
/// The readings that now pass, or the first reason the letter still fails for. A whole message
/// of which some elements still fail stays a dead letter (its passing elements are stored
/// once the rest pass too, with the same ids).
fn element_of(id: &str, decoded: Decoded) -> Result<Vec<Reading>, Rejection> {
    let element = id
        .splitn(3, ':')
        .nth(2)
        .and_then(|index| index.parse::<usize>().ok());
    let Some(element) = element else {
        return match decoded.rejected.into_iter().next() {
            Some((_, rejection)) => Err(rejection),
            None => Ok(decoded.readings),
        };
    };
    if let Some((_, rejection)) = decoded.rejected.iter().find(|(i, _)| *i == element) {
        return Err(rejection.clone());
    }
    // `readings` holds the elements that passed, in order: this one's place among them.
    let before = decoded
        .rejected
        .iter()
        .filter(|(i, _)| *i < element)
        .count();
    match decoded.readings.into_iter().nth(element - before) {
        Some(reading) => Ok(vec![reading]),
        None => Err(Rejection {
            reason: Reason::MissingField,
            message: format!("the message no longer has an element {element}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Limits, Timestamp};

    fn judged(payload: &str) -> Decoded {
        let captured = Captured::new(
            Timestamp::now(),
            Bytes::from_static(b"sensors/temperature"),
            Bytes::from(payload.to_owned()),
            1 << 20,
        );
        decode(&captured, &Limits::default()).unwrap()
    }

    #[test]
    fn a_replayed_element_is_that_element_and_a_whole_message_all_of_it() {
        let now = Timestamp::now().to_string();
        let batch = format!(
            r#"[{{"sensor_id":"a","value":1,"timestamp":"{now}"}},
                {{"sensor_id":"b","value":"x","timestamp":"{now}"}},
                {{"sensor_id":"c","value":3,"timestamp":"{now}"}}]"#
        );
        let third = element_of("0123456789abcdef:7:2", judged(&batch)).unwrap();
        assert_eq!(third.len(), 1);
        assert_eq!(third[0].sensor_id().as_str(), "c");
        let second = element_of("0123456789abcdef:7:1", judged(&batch)).unwrap_err();
        assert_eq!(second.reason, Reason::ValueNotNumeric);
        // The whole message still fails while one element does.
        assert!(element_of("0123456789abcdef:7", judged(&batch)).is_err());
        let good = format!(r#"[{{"sensor_id":"a","value":1,"timestamp":"{now}"}}]"#);
        assert_eq!(
            element_of("0123456789abcdef:7", judged(&good))
                .unwrap()
                .len(),
            1
        );
        assert!(element_of("0123456789abcdef:7:5", judged(&good)).is_err());
    }
}
