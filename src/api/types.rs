//! What the HTTP API sends and how the OpenAPI document describes it. Nothing here reaches
//! storage; storage types never reach here.

use std::marker::PhantomData;

use bytes::Bytes;
use futures_util::{Stream, StreamExt, stream};
use poem::{Body, IntoResponse};
use poem_openapi::payload::{Json, Payload};
use poem_openapi::registry::{MetaSchemaRef, Registry};
use poem_openapi::types::Example;
use poem_openapi::types::Type;
use poem_openapi::{ApiResponse, Object};

use crate::domain::DeadLetter;

const JSON_CONTENT_TYPE: &str = "application/json; charset=utf-8";

/// One reading, as every endpoint returns it.
#[derive(Debug, Object)]
#[oai(rename = "Reading", example)]
// Documents the bytes `Reading::to_json` writes (a test holds the two equal); responses are
// built from those bytes, not from this struct.
#[allow(dead_code)]
pub struct ReadingOut {
    /// The sensor's id, as it published it.
    pub sensor_id: String,
    /// What the sensor measures: the last level of its topic (`sensors/<kind>`), the `+kind`
    /// level of a topic template, or a key of a `values` object.
    pub kind: String,
    /// The measured value.
    pub value: f64,
    /// When the sensor took the reading (RFC 3339, UTC, millisecond precision).
    pub timestamp: time::OffsetDateTime,
    /// The named levels of the topic template it was published under (`+site` of
    /// `plant/+site/+sensor_id/+kind`), in the template's order. Absent for readings published
    /// under `sensors/`. Tags describe a reading; they are not part of its identity (sensor id,
    /// kind, millisecond). `/latest` and `/sensors` answer from the sensor summary, which keeps
    /// no tags.
    #[oai(skip_serializing_if_is_none)]
    pub tags: Option<std::collections::BTreeMap<String, String>>,
}

/// A message that was not a reading.
#[derive(Debug, Object)]
#[oai(rename = "DeadLetter")]
pub struct DeadLetterOut {
    /// Unique id of the captured message (`<log id>:<position>`), or of one element of it
    /// (`<log id>:<position>:<index>`, index from 0: a bad element of a JSON batch or a
    /// `values` object, whose message begins `element <index>`, or metric i of a Sparkplug
    /// payload).
    pub id: String,
    /// When sensorhub received it (RFC 3339, UTC).
    pub received_at: String,
    /// The MQTT topic it was published on.
    pub topic: String,
    /// Why it was rejected: payload_too_large, topic_invalid, invalid_utf8, invalid_json,
    /// missing_field, wrong_type, sensor_id_invalid, value_not_numeric, value_not_finite,
    /// timestamp_invalid, timestamp_out_of_range, forbidden, batch_empty, batch_too_large,
    /// kind_invalid, sensor_id_conflict; Sparkplug B: sparkplug_invalid,
    /// sparkplug_unknown_alias and sparkplug_seq_gap (kept for a replay once the rebirth
    /// sensorhub asked for arrives), sparkplug_no_birth, sparkplug_unsupported_type.
    pub reason: String,
    /// What exactly was wrong, for the person who sent it.
    pub message: String,
    /// The payload's first 4 KiB as text (invalid UTF-8 replaced by U+FFFD).
    pub payload: String,
    /// The payload's length in bytes as published.
    pub payload_bytes: u64,
}

impl From<DeadLetter> for DeadLetterOut {
    fn from(d: DeadLetter) -> Self {
        Self {
            id: d.id,
            received_at: d.received_at.to_string(),
            topic: d.topic,
            reason: d.reason.code().to_owned(),
            message: d.message,
            payload: String::from_utf8_lossy(&d.payload).into_owned(),
            payload_bytes: d.payload_len as u64,
        }
    }
}

/// An error, in words.
#[derive(Debug, Object)]
#[oai(example)]
pub struct ErrorBody {
    /// bad_request, unauthorized, forbidden, not_found, method_not_allowed,
    /// payload_too_large or unavailable.
    pub error: String,
    /// What went wrong and, where it helps, what to send instead.
    pub message: String,
}

impl Example for ErrorBody {
    fn example() -> Self {
        Self {
            error: "bad_request".into(),
            message: "query parameter 'limit' is missing or invalid: must be at most 10000".into(),
        }
    }
}

/// A page of readings.
#[derive(Debug, Object)]
#[oai(rename = "ReadingPage", example)]
// Documents the bytes `page_json` writes; responses are built from those bytes.
#[allow(dead_code)]
pub struct ReadingPageOut {
    /// The readings, in the order asked for.
    pub readings: Vec<ReadingOut>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    pub next_cursor: Option<String>,
    /// Whether more readings follow this page.
    pub has_more: bool,
}

impl Example for ReadingPageOut {
    fn example() -> Self {
        Self {
            readings: vec![ReadingOut::example()],
            next_cursor: Some("1764238500000:temperature:boiler-7".into()),
            has_more: true,
        }
    }
}

impl Example for ReadingOut {
    fn example() -> Self {
        Self {
            sensor_id: "boiler-7".into(),
            kind: "temperature".into(),
            value: 21.5,
            timestamp: time::macros::datetime!(2026-11-27 10:15:00 UTC),
            tags: None,
        }
    }
}

/// The page of `readings` as JSON, from readings already serialized.
pub fn page_json(readings: &[String], next_cursor: Option<&str>) -> Bytes {
    let mut out = Vec::with_capacity(readings.iter().map(|r| r.len() + 1).sum::<usize>() + 96);
    out.extend_from_slice(b"{\"readings\":");
    out.extend_from_slice(&crate::domain::json_array(readings));
    out.extend_from_slice(b",\"has_more\":");
    out.extend_from_slice(if next_cursor.is_some() {
        b"true"
    } else {
        b"false"
    });
    if let Some(cursor) = next_cursor {
        out.extend_from_slice(b",\"next_cursor\":");
        out.extend_from_slice(
            serde_json::to_string(cursor)
                .unwrap_or_else(|_| "\"\"".into())
                .as_bytes(),
        );
    }
    out.push(b'}');
    Bytes::from(out)
}

/// What the summary knows of one kind of a sensor.
#[derive(Debug, Object)]
#[oai(rename = "SensorKind")]
pub struct KindOut {
    /// The kind (last topic level).
    pub kind: String,
    /// Timestamp of its oldest reading.
    pub first_seen: time::OffsetDateTime,
    /// Timestamp of its newest reading.
    pub last_seen: time::OffsetDateTime,
    /// Its newest reading's value.
    pub last_value: f64,
    /// Readings of this kind stored.
    pub count: u64,
}

/// A sensor, from the summary kept on the write path.
#[derive(Debug, Object)]
#[oai(rename = "Sensor", example)]
pub struct SensorOut {
    /// The sensor's id.
    pub sensor_id: String,
    /// The kinds it reported, in name order.
    pub kinds: Vec<String>,
    /// Timestamp of its oldest reading.
    pub first_seen: time::OffsetDateTime,
    /// Timestamp of its newest reading.
    pub last_seen: time::OffsetDateTime,
    /// Readings stored.
    pub count: u64,
    /// Its newest reading (of any kind).
    pub last: ReadingOut,
    /// No reading within the configured time (`--sensor-stale-secs`, 300 s by default).
    pub stale: bool,
    /// Sparkplug B sensors only: whether the edge node (and device) it belongs to is online;
    /// an NDEATH or DDEATH sets it false until the next birth. Absent for other sensors.
    #[oai(skip_serializing_if_is_none)]
    pub online: Option<bool>,
    /// The same, kind by kind.
    pub by_kind: Vec<KindOut>,
}

impl Example for SensorOut {
    fn example() -> Self {
        let at = time::macros::datetime!(2026-11-27 10:15:00 UTC);
        Self {
            sensor_id: "boiler-7".into(),
            kinds: vec!["temperature".into()],
            first_seen: time::macros::datetime!(2026-11-01 00:00:00 UTC),
            last_seen: at,
            count: 2_280_960,
            last: ReadingOut::example(),
            stale: false,
            online: None,
            by_kind: vec![KindOut {
                kind: "temperature".into(),
                first_seen: time::macros::datetime!(2026-11-01 00:00:00 UTC),
                last_seen: at,
                last_value: 21.5,
                count: 2_280_960,
            }],
        }
    }
}

/// A page of sensors, in id order.
#[derive(Debug, Object)]
#[oai(rename = "SensorPage")]
pub struct SensorPageOut {
    pub sensors: Vec<SensorOut>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    #[oai(skip_serializing_if_is_none)]
    pub next_cursor: Option<String>,
    /// Whether more sensors follow.
    pub has_more: bool,
}

/// One bucket of an aggregate; only the statistics asked for (`fn`) are present.
#[derive(Debug, Object)]
#[oai(rename = "Bucket", example)]
pub struct BucketOut {
    /// Where the bucket starts (RFC 3339, UTC): a wall-clock boundary in the requested zone.
    pub start: time::OffsetDateTime,
    /// Where the next bucket starts.
    pub end: time::OffsetDateTime,
    /// The kind of the readings in it.
    pub kind: String,
    #[oai(skip_serializing_if_is_none)]
    pub count: Option<u64>,
    #[oai(skip_serializing_if_is_none)]
    pub min: Option<f64>,
    #[oai(skip_serializing_if_is_none)]
    pub max: Option<f64>,
    #[oai(skip_serializing_if_is_none)]
    pub avg: Option<f64>,
    /// The value of the bucket's oldest reading.
    #[oai(skip_serializing_if_is_none)]
    pub first: Option<f64>,
    /// The value of the bucket's newest reading.
    #[oai(skip_serializing_if_is_none)]
    pub last: Option<f64>,
}

impl Example for BucketOut {
    fn example() -> Self {
        Self {
            start: time::macros::datetime!(2026-11-26 23:00:00 UTC),
            end: time::macros::datetime!(2026-11-27 23:00:00 UTC),
            kind: "temperature".into(),
            count: Some(86_400),
            min: Some(18.25),
            max: Some(23.5),
            avg: Some(21.02),
            first: Some(18.5),
            last: Some(19.0),
        }
    }
}

/// Readings of one sensor in calendar buckets.
#[derive(Debug, Object)]
#[oai(rename = "Aggregate")]
pub struct AggregateOut {
    pub sensor_id: String,
    /// 1m, 5m, 15m, 1h or 1d.
    pub interval: String,
    /// The IANA zone the buckets are aligned to.
    pub tz: String,
    /// Oldest first (then by kind).
    pub buckets: Vec<BucketOut>,
}

/// One point of a chart series: the readings of one sensor and kind within one bucket.
#[derive(Debug, Object)]
#[oai(rename = "SeriesPoint", example)]
pub struct SeriesRow {
    /// Start of the bucket (RFC 3339, UTC).
    pub time: time::OffsetDateTime,
    pub sensor_id: String,
    pub kind: String,
    /// Average of the bucket's readings.
    pub value: f64,
    pub min: f64,
    pub max: f64,
    /// Readings in the bucket.
    pub count: u64,
}

impl Example for SeriesRow {
    fn example() -> Self {
        Self {
            time: time::macros::datetime!(2026-11-27 10:00:00 UTC),
            sensor_id: "boiler-7".into(),
            kind: "temperature".into(),
            value: 21.4,
            min: 21.1,
            max: 21.9,
            count: 600,
        }
    }
}

/// The service's view of its dependencies.
#[derive(Debug, Object)]
pub struct HealthOut {
    /// "ok", or "degraded" while MongoDB or Redis is unreachable (ingest continues into the
    /// local log either way).
    pub status: String,
    /// "up" or "down".
    pub mongodb: String,
    /// "up" or "down".
    pub redis: String,
    /// Bytes received and not yet stored in MongoDB.
    pub journal_pending_bytes: u64,
}

/// A JSON array already serialized, documented as an array of `T`.
#[derive(Debug)]
pub struct RawJsonArray<T> {
    bytes: Bytes,
    _t: PhantomData<fn() -> T>,
}

impl<T> RawJsonArray<T> {
    /// A body that already is a JSON array.
    pub fn from_bytes(bytes: Bytes) -> Self {
        Self {
            bytes,
            _t: PhantomData,
        }
    }
}

impl<T: Type> Payload for RawJsonArray<T> {
    const CONTENT_TYPE: &'static str = JSON_CONTENT_TYPE;

    fn schema_ref() -> MetaSchemaRef {
        <Vec<T> as Type>::schema_ref()
    }

    fn register(registry: &mut Registry) {
        <Vec<T> as Type>::register(registry);
    }
}

impl<T> IntoResponse for RawJsonArray<T> {
    fn into_response(self) -> poem::Response {
        poem::Response::builder()
            .content_type(JSON_CONTENT_TYPE)
            .body(self.bytes)
    }
}

/// A JSON array streamed element by element, documented as an array of `T`.
pub struct JsonArrayStream<T> {
    body: Body,
    _t: PhantomData<fn() -> T>,
}

impl<T> std::fmt::Debug for JsonArrayStream<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JsonArrayStream")
    }
}

impl<T> JsonArrayStream<T> {
    /// Each item is one serialized element. An error ends the response early: the status has
    /// already been sent, so the client sees a truncated document.
    pub fn from_elements<S>(items: S) -> Self
    where
        S: Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static,
    {
        let body = stream::once(async { Ok::<_, std::io::Error>(Bytes::from_static(b"[")) })
            .chain(items.enumerate().map(|(i, item)| {
                item.map(|bytes| {
                    if i == 0 {
                        bytes
                    } else {
                        let mut joined = Vec::with_capacity(bytes.len() + 1);
                        joined.push(b',');
                        joined.extend_from_slice(&bytes);
                        Bytes::from(joined)
                    }
                })
            }))
            .chain(stream::once(async { Ok(Bytes::from_static(b"]")) }));
        Self {
            body: Body::from_bytes_stream(body),
            _t: PhantomData,
        }
    }
}

impl<T: Type> Payload for JsonArrayStream<T> {
    const CONTENT_TYPE: &'static str = JSON_CONTENT_TYPE;

    fn schema_ref() -> MetaSchemaRef {
        <Vec<T> as Type>::schema_ref()
    }

    fn register(registry: &mut Registry) {
        <Vec<T> as Type>::register(registry);
    }
}

impl<T: Send> IntoResponse for JsonArrayStream<T> {
    fn into_response(self) -> poem::Response {
        poem::Response::builder()
            .content_type(JSON_CONTENT_TYPE)
            .body(self.body)
    }
}

/// The response of every endpoint: its payload, or an error. The one place that decides which
/// status an error gets is `ApiError` in `error.rs`.
#[derive(Debug, ApiResponse)]
#[oai(bad_request_handler = "super::error::bad_request")]
pub enum Reply<T: Payload + IntoResponse + Send> {
    /// Success.
    #[oai(status = 200)]
    Ok(
        T,
        /// RFC 8288 link to the next page (`rel="next"`), on paged endpoints when more results
        /// follow.
        #[oai(header = "Link")]
        Option<String>,
        /// Where latest-ten readings came from: `redis`, or `mongodb` while the Redis copy is
        /// unavailable or being rebuilt.
        #[oai(header = "X-Sensorhub-Source")]
        Option<String>,
    ),
    /// A parameter is missing or invalid; the message names it.
    #[oai(status = 400)]
    BadRequest(Json<ErrorBody>),
    /// No API key, or one the server does not hold (only when it runs with `--api-keys`).
    #[oai(status = 401)]
    Unauthorized(
        Json<ErrorBody>,
        /// `Bearer realm="sensorhub"`, with `error="invalid_token"` when a key was refused.
        #[oai(header = "WWW-Authenticate")]
        String,
    ),
    /// The key is valid but its role does not allow this operation (a read key on an admin
    /// operation).
    #[oai(status = 403)]
    Forbidden(Json<ErrorBody>),
    /// Nothing is known under that name.
    #[oai(status = 404)]
    NotFound(Json<ErrorBody>),
    /// MongoDB is unreachable; retry after the seconds `Retry-After` says. Ingest continues
    /// meanwhile.
    #[oai(status = 503)]
    Unavailable(
        Json<ErrorBody>,
        /// Seconds to wait before trying again.
        #[oai(header = "Retry-After")]
        u32,
    ),
}

/// A JSON document already serialized, documented as `T`.
#[derive(Debug)]
pub struct RawJson<T> {
    bytes: Bytes,
    _t: PhantomData<fn() -> T>,
}

impl<T> RawJson<T> {
    pub fn from_bytes(bytes: Bytes) -> Self {
        Self {
            bytes,
            _t: PhantomData,
        }
    }
}

impl<T: Type> Payload for RawJson<T> {
    const CONTENT_TYPE: &'static str = JSON_CONTENT_TYPE;

    fn schema_ref() -> MetaSchemaRef {
        T::schema_ref()
    }

    fn register(registry: &mut Registry) {
        T::register(registry);
    }
}

impl<T> IntoResponse for RawJson<T> {
    fn into_response(self) -> poem::Response {
        poem::Response::builder()
            .content_type(JSON_CONTENT_TYPE)
            .body(self.bytes)
    }
}

/// Server-Sent Events, each `data` a `Reading`, with comment heartbeats.
pub struct EventStreamOf<T> {
    events: futures_util::stream::BoxStream<'static, poem::web::sse::Event>,
    heartbeat: std::time::Duration,
    _t: PhantomData<fn() -> T>,
}

impl<T> std::fmt::Debug for EventStreamOf<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EventStreamOf")
    }
}

impl<T> EventStreamOf<T> {
    pub fn new(
        events: impl Stream<Item = poem::web::sse::Event> + Send + 'static,
        heartbeat: std::time::Duration,
    ) -> Self {
        Self {
            events: events.boxed(),
            heartbeat,
            _t: PhantomData,
        }
    }
}

impl<T: Type> Payload for EventStreamOf<T> {
    const CONTENT_TYPE: &'static str = "text/event-stream";

    fn schema_ref() -> MetaSchemaRef {
        T::schema_ref()
    }

    fn register(registry: &mut Registry) {
        T::register(registry);
    }
}

impl<T: Send> IntoResponse for EventStreamOf<T> {
    fn into_response(self) -> poem::Response {
        let mut response = poem::web::sse::SSE::new(self.events)
            .keep_alive(self.heartbeat)
            .into_response();
        // Proxies such as nginx buffer responses unless told not to.
        response.headers_mut().insert(
            "X-Accel-Buffering",
            poem::http::HeaderValue::from_static("no"),
        );
        response
    }
}

/// A streamed export: CSV or newline-delimited JSON, with a file name.
pub enum Export {
    Ok {
        body: Body,
        content_type: &'static str,
        file_name: String,
    },
    Error(Reply<PlainTextBody>),
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Export")
    }
}

/// Stands in for the success payload of `Reply` inside `Export`, which never uses it.
pub type PlainTextBody = poem_openapi::payload::PlainText<String>;

pub const CSV_CONTENT_TYPE: &str = "text/csv; charset=utf-8";
pub const NDJSON_CONTENT_TYPE: &str = "application/x-ndjson";

impl IntoResponse for Export {
    fn into_response(self) -> poem::Response {
        match self {
            Export::Ok {
                body,
                content_type,
                file_name,
            } => poem::Response::builder()
                .content_type(content_type)
                .header(
                    "Content-Disposition",
                    format!("attachment; filename=\"{file_name}\""),
                )
                .body(body),
            Export::Error(reply) => reply.into_response(),
        }
    }
}

impl poem_openapi::ApiResponse for Export {
    const BAD_REQUEST_HANDLER: bool = true;

    fn meta() -> poem_openapi::registry::MetaResponses {
        use poem_openapi::registry::{MetaHeader, MetaMediaType, MetaResponse, MetaSchema};
        let mut errors = <Reply<PlainTextBody> as poem_openapi::ApiResponse>::meta();
        errors.responses.retain(|r| r.status != Some(200));
        let ok = MetaResponse {
            description: "The readings, streamed: CSV with a header line \
                          (sensor_id,kind,value,timestamp), or one JSON reading per line.",
            status: Some(200),
            status_range: None,
            content: vec![
                MetaMediaType {
                    content_type: CSV_CONTENT_TYPE,
                    schema: MetaSchemaRef::Inline(Box::new(MetaSchema::new("string"))),
                },
                MetaMediaType {
                    content_type: NDJSON_CONTENT_TYPE,
                    schema: <ReadingOut as Type>::schema_ref(),
                },
            ],
            headers: vec![MetaHeader {
                name: "Content-Disposition".into(),
                description: Some(
                    "`attachment; filename=\"readings-<start>-<end>.<csv|ndjson>\"`".into(),
                ),
                required: true,
                deprecated: false,
                schema: <String as Type>::schema_ref(),
            }],
        };
        errors.responses.insert(0, ok);
        errors
    }

    fn register(registry: &mut Registry) {
        <Reply<PlainTextBody> as poem_openapi::ApiResponse>::register(registry);
        <ReadingOut as Type>::register(registry);
    }

    fn from_parse_request_error(err: poem::Error) -> Self {
        Export::Error(super::error::bad_request(err))
    }
}
