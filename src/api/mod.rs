//! The HTTP API (poem + poem-openapi): history from MongoDB, latest readings from Redis, the
//! OpenAPI document and UI, health and metrics.
//!
//! The paths of the system sensorhub replaces stay valid: `/startoenddate`, `/latestten`,
//! `/latestten/{sensor_id}`, `/allData`, `/`, `/docs`. Handlers translate between HTTP and the
//! domain; they never build queries or cache keys (store and cache do) and never touch the broker.

mod error;
mod memo;
mod types;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use poem::listener::TcpAcceptor;
use poem::{Route, Server};
use poem_openapi::param::{Path, Query};
use poem_openapi::payload::{Html, Json, PlainText};
use poem_openapi::{OpenApi, OpenApiService};

use crate::cache::{Cache, Health};
use crate::domain::{Kind, Reading, Reason, SensorId, Timestamp, json_array};
use crate::metrics::{Gauges, Metrics};
use crate::store::{DeadLetterCursor, DeadLetterQuery, RangeCursor, RangeQuery, Store};
pub use error::ApiError;
use types::{DeadLetterOut, HealthOut, JsonArrayStream, RawJsonArray, ReadingOut, Reply};

/// Range pages hold this many readings unless `limit` says otherwise.
pub const DEFAULT_PAGE: u32 = 1000;
/// The largest page `limit` may ask for.
pub const MAX_PAGE: u32 = 10_000;

/// What the handlers read from.
#[derive(Clone)]
pub struct ApiState {
    pub store: Store,
    pub cache: Cache,
    pub health: Arc<Health>,
    pub metrics: Arc<Metrics>,
    /// Gauges owned elsewhere (the local log), read when `/metrics` is scraped.
    pub gauges: Arc<dyn Fn() -> Gauges + Send + Sync>,
    /// Range pages answered recently.
    pub ranges: Arc<memo::RangeMemo>,
}

impl ApiState {
    /// `read_cache` bounds how long a range page may be served again from memory (writes
    /// through this process retire it at once). Zero: never.
    pub fn new(
        store: Store,
        cache: Cache,
        health: Arc<Health>,
        metrics: Arc<Metrics>,
        gauges: Arc<dyn Fn() -> Gauges + Send + Sync>,
        read_cache: Duration,
    ) -> Self {
        Self {
            store,
            cache,
            health,
            metrics,
            gauges,
            ranges: Arc::new(memo::RangeMemo::new(read_cache)),
        }
    }
}

impl std::fmt::Debug for ApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiState").finish_non_exhaustive()
    }
}

struct Api {
    state: ApiState,
}

struct Pages;

#[OpenApi]
impl Pages {
    /// The implementation page.
    #[oai(path = "/", method = "get", hidden)]
    async fn index(&self) -> Html<&'static str> {
        Html(include_str!("index.html"))
    }
}

type Readings = Reply<RawJsonArray<ReadingOut>>;

#[OpenApi]
impl Api {
    /// Readings in a time range
    ///
    /// Readings with `startDate <= timestamp <= endDate`, oldest first (ties in sensor id
    /// order), at most `limit` per page. When more follow, the `Link` header carries the URL of
    /// the next page (`rel="next"`); follow it until it is absent. Dates are RFC 3339
    /// (`2024-05-01T12:00:00Z`, `2024-05-01T14:00:00+02:00`) or naive ISO 8601 read as UTC
    /// (`2024-05-01T12:00:00.123456`, `2024-05-01`).
    #[oai(path = "/startoenddate", method = "get")]
    async fn range(
        &self,
        /// Start of the range, inclusive.
        #[oai(name = "startDate")]
        start_date: Query<Option<String>>,
        /// End of the range, inclusive.
        #[oai(name = "endDate")]
        end_date: Query<Option<String>>,
        /// Only this sensor's readings.
        sensor_id: Query<Option<String>>,
        /// Only readings of this kind (the last level of their topic, e.g. temperature).
        kind: Query<Option<String>>,
        /// Readings per page, 1 to 10000 (default 1000).
        limit: Query<Option<u32>>,
        /// Where the page starts: the opaque value from the previous page's `Link` header.
        cursor: Query<Option<String>>,
    ) -> Readings {
        let filter = RangeFilter {
            sensor_id: sensor_id.0,
            kind: kind.0,
        };
        self.range_page(start_date.0, end_date.0, filter, limit.0, cursor.0)
            .await
            .unwrap_or_else(Reply::from)
    }

    /// The latest ten readings of one sensor
    ///
    /// Newest first, by the sensor's own timestamps, over all the kinds the sensor reports
    /// (a device that measures temperature and humidity under one id has both; each reading
    /// names its kind). With `kind`, the latest ten of that kind only. Served from Redis; while
    /// Redis is down or being rebuilt, and for `kind`, from MongoDB (header
    /// `X-Sensorhub-Source` says which). 404 when the sensor has no readings (of that kind).
    #[oai(path = "/latestten/:sensor_id", method = "get")]
    async fn latest_of_sensor(
        &self,
        /// The sensor's id.
        sensor_id: Path<String>,
        /// Only readings of this kind (e.g. temperature).
        kind: Query<Option<String>>,
    ) -> Readings {
        let id = match SensorId::parse(&sensor_id.0) {
            Ok(id) => id,
            Err(why) => {
                return ApiError::BadRequest(format!(
                    "sensor_id '{}' is not valid: {why}",
                    sensor_id.0
                ))
                .into();
            }
        };
        let kind = match kind.0.as_deref().map(parse_kind).transpose() {
            Ok(kind) => kind,
            Err(e) => return e.into(),
        };
        let found = match &kind {
            None => self.latest(Some(&id)).await,
            Some(kind) => self.latest_of_kind(&id, kind).await,
        };
        match found {
            Ok((None, _)) => {
                let of_kind = kind.map(|k| format!(" of kind '{k}'")).unwrap_or_default();
                ApiError::NotFound(format!("no readings{of_kind} for sensor '{id}'")).into()
            }
            Ok((Some(body), source)) => {
                Reply::Ok(RawJsonArray::from_bytes(body), None, Some(source.into()))
            }
            Err(e) => e.into(),
        }
    }

    /// The latest ten readings over all sensors
    ///
    /// Newest first, by the sensors' own timestamps. Served from Redis; while Redis is down or
    /// being rebuilt, from MongoDB (header `X-Sensorhub-Source: mongodb`).
    #[oai(path = "/latestten", method = "get")]
    async fn latest_overall(&self) -> Readings {
        match self.latest(None).await {
            Ok((body, source)) => Reply::Ok(
                RawJsonArray::from_bytes(body.unwrap_or_else(|| Bytes::from_static(b"[]"))),
                None,
                Some(source.into()),
            ),
            Err(e) => e.into(),
        }
    }

    /// Every reading
    ///
    /// The whole history, oldest first, streamed from a database cursor as one JSON array:
    /// memory stays flat however large it is. For bounded pages use `/startoenddate`.
    #[oai(path = "/allData", method = "get")]
    async fn all_data(&self) -> Reply<JsonArrayStream<ReadingOut>> {
        match self.state.store.stream_all().await {
            Ok(readings) => {
                let items = readings.map(|r| match r {
                    Ok(r) => Ok(Bytes::from(r.to_json())),
                    Err(e) => {
                        tracing::warn!(error = crate::error_chain(&e), "/allData stream cut short");
                        Err(std::io::Error::other(e))
                    }
                });
                Reply::Ok(JsonArrayStream::from_elements(items), None, None)
            }
            Err(e) => ApiError::from(e).into(),
        }
    }

    /// Rejected messages
    ///
    /// Messages on `sensors/#` that were not readings, newest first, each with its reason and
    /// raw payload (first 4 KiB). Kept for the configured time (7 days by default). Paged like
    /// `/startoenddate`: follow the `Link` header.
    #[oai(path = "/deadletters", method = "get")]
    async fn dead_letters(
        &self,
        /// Only this reason (e.g. invalid_json, timestamp_out_of_range).
        reason: Query<Option<String>>,
        /// Dead letters per page, 1 to 1000 (default 100).
        limit: Query<Option<u32>>,
        /// Where the page starts: the opaque value from the previous page's `Link` header.
        cursor: Query<Option<String>>,
    ) -> Reply<Json<Vec<DeadLetterOut>>> {
        self.dead_letter_page(reason.0, limit.0, cursor.0)
            .await
            .unwrap_or_else(Reply::from)
    }

    /// Health
    ///
    /// Always 200 while the process serves; `status` is "degraded" while MongoDB or Redis is
    /// unreachable.
    #[oai(path = "/health", method = "get")]
    async fn health(&self) -> Json<HealthOut> {
        let mongodb = tokio::time::timeout(Duration::from_secs(2), self.state.store.ping())
            .await
            .is_ok_and(|r| r.is_ok());
        let redis = self.state.health.is_up();
        let up = |ok: bool| if ok { "up" } else { "down" }.to_owned();
        Json(HealthOut {
            status: if mongodb && redis { "ok" } else { "degraded" }.to_owned(),
            mongodb: up(mongodb),
            redis: up(redis),
            journal_pending_bytes: (self.state.gauges)().journal_pending_bytes,
        })
    }

    /// Metrics
    ///
    /// Counters and gauges in the Prometheus text format.
    #[oai(path = "/metrics", method = "get")]
    async fn metrics(&self) -> PlainText<String> {
        let mut gauges = (self.state.gauges)();
        gauges.cache_healthy = self.state.health.is_up();
        gauges.cache_dirty_sensors = self.state.health.dirty_count() as u64;
        PlainText(self.state.metrics.render(gauges))
    }
}

impl Api {
    /// The latest ten as a JSON array (`None`: there are none), and where they came from.
    async fn latest(
        &self,
        sensor: Option<&SensorId>,
    ) -> Result<(Option<Bytes>, &'static str), ApiError> {
        if self.state.health.serves(sensor) {
            match self.state.cache.latest(sensor).await {
                Ok(Some(body)) => return Ok((Some(body), "redis")),
                // An empty set may only mean the cache has not caught up: ask MongoDB.
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(
                        error = crate::error_chain(&e),
                        "Redis read failed; answering from MongoDB"
                    );
                    self.state.health.set_up(false);
                }
            }
        }
        self.latest_from_store(sensor, None).await
    }

    /// One kind of one sensor: Redis keeps a sensor's latest ten over all its kinds, so the
    /// latest ten of one kind come from MongoDB's (sensor_id, timestamp, kind) index.
    async fn latest_of_kind(
        &self,
        sensor: &SensorId,
        kind: &Kind,
    ) -> Result<(Option<Bytes>, &'static str), ApiError> {
        self.latest_from_store(Some(sensor), Some(kind)).await
    }

    async fn latest_from_store(
        &self,
        sensor: Option<&SensorId>,
        kind: Option<&Kind>,
    ) -> Result<(Option<Bytes>, &'static str), ApiError> {
        let readings = self
            .state
            .store
            .latest(sensor, kind, crate::cache::LATEST as u32)
            .await?;
        let json: Vec<String> = readings.iter().map(Reading::to_json).collect();
        let body = (!json.is_empty()).then(|| Bytes::from(json_array(&json)));
        Ok((body, "mongodb"))
    }

    async fn range_page(
        &self,
        start: Option<String>,
        end: Option<String>,
        filter: RangeFilter,
        limit: Option<u32>,
        cursor: Option<String>,
    ) -> Result<Readings, ApiError> {
        let start_text = required(start, "startDate")?;
        let end_text = required(end, "endDate")?;
        let start = parse_date(&start_text, "startDate")?;
        let end = parse_date(&end_text, "endDate")?;
        if end < start {
            return Err(ApiError::BadRequest(format!(
                "endDate ({end}) is before startDate ({start})"
            )));
        }
        let sensor = filter
            .sensor_id
            .as_deref()
            .map(|id| {
                SensorId::parse(id).map_err(|why| {
                    ApiError::BadRequest(format!("sensor_id '{id}' is not valid: {why}"))
                })
            })
            .transpose()?;
        let kind = filter.kind.as_deref().map(parse_kind).transpose()?;
        let limit = page_limit(limit, DEFAULT_PAGE, MAX_PAGE)?;
        let after = cursor.as_deref().map(parse_range_cursor).transpose()?;
        // The same request gets the same page: key on what was asked, as it was written.
        let key = format!(
            "{start_text}\u{0}{end_text}\u{0}{}\u{0}{}\u{0}{limit}\u{0}{}",
            sensor.as_ref().map_or("", SensorId::as_str),
            kind.as_ref().map_or("", Kind::as_str),
            cursor.as_deref().unwrap_or("")
        );
        let writes = self.state.store.writes();
        if let Some(page) = self.state.ranges.get(&key, writes) {
            return Ok(Reply::Ok(
                RawJsonArray::from_bytes(page.body),
                page.link,
                None,
            ));
        }
        let epoch = writes.epoch();
        let mut readings = self
            .state
            .store
            .range(&RangeQuery {
                start,
                end,
                sensor_id: sensor.clone(),
                kind: kind.clone(),
                after,
                limit: limit + 1,
            })
            .await?;
        let link = (readings.len() > limit as usize).then(|| {
            readings.truncate(limit as usize);
            let cursor = range_cursor(&readings[readings.len() - 1]);
            let mut url = format!(
                "/startoenddate?startDate={}&endDate={}&limit={limit}&cursor={}",
                encode(&start_text),
                encode(&end_text),
                encode(&cursor)
            );
            if let Some(id) = &sensor {
                url.push_str(&format!("&sensor_id={}", encode(id.as_str())));
            }
            if let Some(kind) = &kind {
                url.push_str(&format!("&kind={}", encode(kind.as_str())));
            }
            format!("<{url}>; rel=\"next\"")
        });
        let json: Vec<String> = readings.iter().map(Reading::to_json).collect();
        let body = Bytes::from(json_array(&json));
        let page = memo::Page {
            body: body.clone(),
            link: link.clone(),
        };
        self.state.ranges.keep(key, start, end, epoch, page, writes);
        Ok(Reply::Ok(RawJsonArray::from_bytes(body), link, None))
    }

    async fn dead_letter_page(
        &self,
        reason: Option<String>,
        limit: Option<u32>,
        cursor: Option<String>,
    ) -> Result<Reply<Json<Vec<DeadLetterOut>>>, ApiError> {
        let reason_filter = reason
            .as_deref()
            .map(|code| {
                Reason::from_code(code).ok_or_else(|| {
                    let known: Vec<&str> = Reason::ALL.iter().map(|r| r.code()).collect();
                    ApiError::BadRequest(format!(
                        "reason '{code}' is not one of: {}",
                        known.join(", ")
                    ))
                })
            })
            .transpose()?;
        let limit = page_limit(limit, 100, 1000)?;
        let before = cursor
            .as_deref()
            .map(|c| {
                let (millis, id) = c.split_once(':').unwrap_or_default();
                let received_at = millis.parse().ok().and_then(Timestamp::from_millis);
                match received_at {
                    Some(received_at) if !id.is_empty() => Ok(DeadLetterCursor {
                        received_at,
                        id: id.to_owned(),
                    }),
                    _ => Err(ApiError::BadRequest(format!(
                        "cursor '{c}' is not a cursor this endpoint returned"
                    ))),
                }
            })
            .transpose()?;
        let mut letters = self
            .state
            .store
            .dead_letters(&DeadLetterQuery {
                reason: reason_filter,
                before,
                limit: limit + 1,
            })
            .await?;
        let link = (letters.len() > limit as usize).then(|| {
            letters.truncate(limit as usize);
            let last = &letters[letters.len() - 1];
            let cursor = format!("{}:{}", last.received_at.as_millis(), last.id);
            let mut url = format!("/deadletters?limit={limit}&cursor={}", encode(&cursor));
            if let Some(reason) = &reason {
                url.push_str(&format!("&reason={}", encode(reason)));
            }
            format!("<{url}>; rel=\"next\"")
        });
        let out = letters.into_iter().map(DeadLetterOut::from).collect();
        Ok(Reply::Ok(Json(out), link, None))
    }
}

fn required(value: Option<String>, name: &str) -> Result<String, ApiError> {
    value.filter(|v| !v.trim().is_empty()).ok_or_else(|| {
        ApiError::BadRequest(format!(
            "{name} is required: an RFC 3339 or naive ISO 8601 time such as 2024-05-01T12:00:00Z"
        ))
    })
}

fn parse_date(text: &str, name: &str) -> Result<Timestamp, ApiError> {
    Timestamp::parse(text).map_err(|e| ApiError::BadRequest(format!("{name}: {e}")))
}

fn page_limit(limit: Option<u32>, default: u32, max: u32) -> Result<u32, ApiError> {
    match limit {
        None => Ok(default),
        Some(n) if (1..=max).contains(&n) => Ok(n),
        Some(n) => Err(ApiError::BadRequest(format!(
            "limit {n} is out of range: use 1 to {max}"
        ))),
    }
}

/// The filters of a range query, as the request wrote them.
struct RangeFilter {
    sensor_id: Option<String>,
    kind: Option<String>,
}

fn parse_kind(text: &str) -> Result<Kind, ApiError> {
    Kind::parse(text)
        .map_err(|why| ApiError::BadRequest(format!("kind '{text}' is not valid: {why}")))
}

/// `<ms>:<kind, percent-encoded>:<sensor id>`: the kind is encoded so that it holds no `:`,
/// and the sensor id, which may, comes last.
fn range_cursor(last: &Reading) -> String {
    format!(
        "{}:{}:{}",
        last.timestamp().as_millis(),
        encode(last.kind().as_str()),
        last.sensor_id()
    )
}

fn parse_range_cursor(text: &str) -> Result<RangeCursor, ApiError> {
    let bad = || {
        ApiError::BadRequest(format!(
            "cursor '{text}' is not a cursor this endpoint returned"
        ))
    };
    let (millis, rest) = text.split_once(':').ok_or_else(bad)?;
    let (kind, id) = rest.split_once(':').ok_or_else(bad)?;
    let kind = decode_percent(kind).ok_or_else(bad)?;
    Ok(RangeCursor {
        timestamp: millis
            .parse()
            .ok()
            .and_then(Timestamp::from_millis)
            .ok_or_else(bad)?,
        sensor_id: SensorId::parse(id).map_err(|_| bad())?,
        kind: Kind::parse(&kind).map_err(|_| bad())?,
    })
}

/// The inverse of `encode`; `None` for a malformed escape or bytes that are not UTF-8.
fn decode_percent(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// The whole HTTP application: API, page, spec and UI.
pub fn app(state: ApiState) -> impl poem::Endpoint {
    let service = OpenApiService::new(
        (Api { state }, Pages),
        "sensorhub",
        env!("CARGO_PKG_VERSION"),
    )
    .description(
        "MQTT sensor readings as queryable history. Devices publish \
         {\"sensor_id\", \"value\", \"timestamp\"} to sensors/<kind>; sensorhub stores every \
         reading in MongoDB and keeps the latest ten per sensor in Redis.",
    )
    .server("/");
    let ui = service.swagger_ui();
    let spec = service.spec_endpoint();
    Route::new()
        .nest("/docs", ui)
        .at("/openapi.json", spec)
        .nest("/", service)
}

/// Serves `state` on `listener` until `shutdown` resolves, then lets requests in flight finish
/// for up to `grace`.
pub async fn serve(
    listener: std::net::TcpListener,
    state: ApiState,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let acceptor = TcpAcceptor::from_std(listener)?;
    Server::new_with_acceptor(acceptor)
        .run_with_graceful_shutdown(app(state), shutdown, Some(grace))
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reading_json_matches_its_documented_schema() {
        let r = Reading::new(
            SensorId::parse("t\"1").unwrap(),
            Kind::parse("temperature").unwrap(),
            21.5,
            Timestamp::parse("2024-05-01T10:00:00.5Z").unwrap(),
        )
        .unwrap();
        let json: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        let object = json.as_object().unwrap();
        let mut fields: Vec<&str> = object.keys().map(String::as_str).collect();
        fields.sort_unstable();
        let meta = <ReadingOut as poem_openapi::types::Type>::schema_ref();
        let mut registry = poem_openapi::registry::Registry::new();
        <ReadingOut as poem_openapi::types::Type>::register(&mut registry);
        let schema = registry.schemas.get("Reading").unwrap();
        let mut documented: Vec<&str> = schema.properties.iter().map(|(name, _)| *name).collect();
        documented.sort_unstable();
        assert_eq!(fields, documented, "{meta:?}");
        assert_eq!(object["timestamp"], "2024-05-01T10:00:00.500Z");
        assert_eq!(object["sensor_id"], "t\"1");
    }

    #[test]
    fn encodes_query_values() {
        assert_eq!(
            encode("2024-05-01T12:00:00+02:00"),
            "2024-05-01T12%3A00%3A00%2B02%3A00"
        );
        assert_eq!(encode("a b/ü"), "a%20b%2F%C3%BC");
    }

    #[test]
    fn range_cursors_round_trip_and_reject_junk() {
        let r = Reading::new(
            SensorId::parse("sensor:with:colons").unwrap(),
            Kind::parse("odd:kind ü").unwrap(),
            1.0,
            Timestamp::from_millis(1_714_557_600_000).unwrap(),
        )
        .unwrap();
        let c = parse_range_cursor(&range_cursor(&r)).unwrap();
        assert_eq!(c.sensor_id.as_str(), "sensor:with:colons");
        assert_eq!(c.kind.as_str(), "odd:kind ü");
        assert_eq!(c.timestamp.as_millis(), 1_714_557_600_000);
        assert!(parse_range_cursor("nope").is_err());
        assert!(parse_range_cursor("12:").is_err());
        assert!(parse_range_cursor("12:temperature").is_err());
        assert!(parse_range_cursor("12:%zz:s").is_err());
        assert!(parse_range_cursor("12::s").is_err());
    }
}
