//! Sensor endpoints: the sensors and the latest reading of each, read from the summary the writer
//! keeps (one document per sensor), never from the readings themselves.

use poem_openapi::OpenApi;
use poem_openapi::param::{Path, Query};
use poem_openapi::payload::Json;

use super::access::ReadKey;
use super::error::ApiError;
use super::types::{
    KindOut, RawJson, ReadingOut, ReadingPageOut, Reply, SensorOut, SensorPageOut, page_json,
};
use super::{ApiState, DEFAULT_PAGE, Tag, to_datetime};
use crate::domain::{Reading, Timestamp};
use crate::store::{SensorSummary, SummaryQuery};

pub struct Sensors {
    pub state: ApiState,
}

impl Sensors {
    fn sensor_out(&self, s: SensorSummary, now: Timestamp, online: Option<bool>) -> SensorOut {
        let stale_ms = i64::try_from(self.state.stale_after.as_millis()).unwrap_or(i64::MAX);
        let newest = s
            .kinds
            .iter()
            .max_by_key(|k| (k.last_seen, std::cmp::Reverse(k.kind.clone())))
            .cloned();
        let last = match newest {
            Some(k) => ReadingOut {
                sensor_id: s.sensor_id.to_string(),
                kind: k.kind.to_string(),
                value: k.last_value,
                timestamp: to_datetime(k.last_seen),
                tags: None,
            },
            None => ReadingOut {
                sensor_id: s.sensor_id.to_string(),
                kind: String::new(),
                value: 0.0,
                timestamp: to_datetime(s.last_seen),
                tags: None,
            },
        };
        SensorOut {
            sensor_id: s.sensor_id.to_string(),
            kinds: s.kinds.iter().map(|k| k.kind.to_string()).collect(),
            first_seen: to_datetime(s.first_seen),
            last_seen: to_datetime(s.last_seen),
            count: s.count,
            last,
            stale: now.as_millis().saturating_sub(s.last_seen.as_millis()) > stale_ms,
            online,
            by_kind: s
                .kinds
                .into_iter()
                .map(|k| KindOut {
                    kind: k.kind.to_string(),
                    first_seen: to_datetime(k.first_seen),
                    last_seen: to_datetime(k.last_seen),
                    last_value: k.last_value,
                    count: k.count,
                })
                .collect(),
        }
    }

    async fn summaries(
        &self,
        prefix: Option<String>,
        kind: Option<String>,
        limit: Option<u32>,
        cursor: Option<String>,
    ) -> Result<(Vec<SensorSummary>, Option<String>), ApiError> {
        let limit = limit.unwrap_or(DEFAULT_PAGE);
        let mut found = self
            .state
            .store
            .sensors(&SummaryQuery {
                prefix,
                kind,
                after: cursor,
                limit: limit + 1,
            })
            .await?;
        let next = (found.len() > limit as usize).then(|| {
            found.truncate(limit as usize);
            found[found.len() - 1].sensor_id.to_string()
        });
        Ok((found, next))
    }
}

#[OpenApi(tag = "Tag::Sensors")]
impl Sensors {
    /// Sensors
    ///
    /// Every sensor that ever reported, in id order, with its kinds, first and last reading
    /// time, reading count, newest reading, `stale` (no reading within the configured time), and
    /// for Sparkplug B sensors `online` (false after their edge node's NDEATH or device's DDEATH).
    /// Read from a summary the writer keeps up to date, so it costs the same at a billion
    /// readings. Paged: pass `next_cursor` as `cursor` until `has_more` is false.
    #[oai(path = "/sensors", method = "get")]
    async fn sensors(
        &self,
        _key: ReadKey,
        /// Only sensors whose id starts with this.
        prefix: Query<Option<String>>,
        /// Only sensors that reported this kind.
        kind: Query<Option<String>>,
        /// Sensors per page (default 1000).
        #[oai(validator(minimum(value = "1"), maximum(value = "10000")))]
        limit: Query<Option<u32>>,
        /// Where the page starts: the previous page's `next_cursor` (a sensor id).
        cursor: Query<Option<String>>,
    ) -> Reply<Json<SensorPageOut>> {
        match self.summaries(prefix.0, kind.0, limit.0, cursor.0).await {
            Ok((found, next)) => {
                let now = Timestamp::now();
                let ids: Vec<&str> = found.iter().map(|s| s.sensor_id.as_str()).collect();
                let online = match super::sparkplug::online(&self.state, &ids).await {
                    Ok(online) => online,
                    Err(e) => return e.into(),
                };
                Reply::Ok(
                    Json(SensorPageOut {
                        sensors: found
                            .into_iter()
                            .map(|s| {
                                let on = online.get(s.sensor_id.as_str()).copied();
                                self.sensor_out(s, now, on)
                            })
                            .collect(),
                        has_more: next.is_some(),
                        next_cursor: next,
                    }),
                    None,
                    None,
                )
            }
            Err(e) => e.into(),
        }
    }

    /// One sensor
    ///
    /// What `/sensors` says of one sensor; 404 when it never reported.
    #[oai(path = "/sensors/:sensor_id", method = "get")]
    async fn sensor(
        &self,
        _key: ReadKey,
        /// The sensor's id.
        sensor_id: Path<String>,
    ) -> Reply<Json<SensorOut>> {
        match self.state.store.sensor(&sensor_id.0).await {
            Ok(Some(s)) => {
                let online =
                    match super::sparkplug::online(&self.state, &[s.sensor_id.as_str()]).await {
                        Ok(online) => online.get(s.sensor_id.as_str()).copied(),
                        Err(e) => return e.into(),
                    };
                Reply::Ok(
                    Json(self.sensor_out(s, Timestamp::now(), online)),
                    None,
                    None,
                )
            }
            Ok(None) => {
                ApiError::NotFound(format!("no sensor '{}' has reported", sensor_id.0)).into()
            }
            Err(e) => ApiError::from(e).into(),
        }
    }

    /// The latest reading of every sensor
    ///
    /// The newest reading of each kind of each sensor, in sensor id then kind order, in one
    /// call (up to `limit` sensors, 1000 by default; page on with `cursor` for more). Filter by
    /// `kind` and by sensor id `prefix`.
    #[oai(path = "/latest", method = "get")]
    async fn latest(
        &self,
        _key: ReadKey,
        /// Only readings of this kind.
        kind: Query<Option<String>>,
        /// Only sensors whose id starts with this.
        prefix: Query<Option<String>>,
        /// Sensors per page (default 1000).
        #[oai(validator(minimum(value = "1"), maximum(value = "10000")))]
        limit: Query<Option<u32>>,
        /// Where the page starts: the previous page's `next_cursor` (a sensor id).
        cursor: Query<Option<String>>,
    ) -> Reply<RawJson<ReadingPageOut>> {
        let kind_filter = kind.0.clone();
        match self.summaries(prefix.0, kind.0, limit.0, cursor.0).await {
            Ok((found, next)) => {
                let readings: Vec<String> = found
                    .iter()
                    .flat_map(SensorSummary::latest)
                    .filter(|r| {
                        kind_filter
                            .as_deref()
                            .is_none_or(|k| r.kind().as_str() == k)
                    })
                    .map(|r: Reading| r.to_json())
                    .collect();
                Reply::Ok(
                    RawJson::from_bytes(page_json(&readings, next.as_deref())),
                    None,
                    None,
                )
            }
            Err(e) => e.into(),
        }
    }
}
