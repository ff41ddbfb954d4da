//! What the HTTP API sends and how the OpenAPI document describes it. Nothing here reaches
//! storage; storage types never reach here.

use std::marker::PhantomData;

use bytes::Bytes;
use futures_util::{Stream, StreamExt, stream};
use poem::{Body, IntoResponse};
use poem_openapi::payload::{Json, Payload};
use poem_openapi::registry::{MetaSchemaRef, Registry};
use poem_openapi::types::Type;
use poem_openapi::{ApiResponse, Object};

use crate::domain::DeadLetter;

const JSON_CONTENT_TYPE: &str = "application/json; charset=utf-8";

/// One reading, as every endpoint returns it.
#[derive(Debug, Object)]
#[oai(rename = "Reading")]
// Documents the bytes `Reading::to_json` writes (a test holds the two equal); responses are
// built from those bytes, not from this struct.
#[allow(dead_code)]
pub struct ReadingOut {
    /// The sensor's id, as it published it.
    pub sensor_id: String,
    /// What the sensor measures: the last level of its topic (`sensors/<kind>`).
    pub kind: String,
    /// The measured value.
    pub value: f64,
    /// When the sensor took the reading (RFC 3339, UTC, millisecond precision).
    pub timestamp: time::OffsetDateTime,
}

/// A message that was not a reading.
#[derive(Debug, Object)]
#[oai(rename = "DeadLetter")]
pub struct DeadLetterOut {
    /// Unique id of the captured message.
    pub id: String,
    /// When sensorhub received it (RFC 3339, UTC).
    pub received_at: String,
    /// The MQTT topic it was published on.
    pub topic: String,
    /// Why it was rejected: payload_too_large, topic_invalid, invalid_utf8, invalid_json,
    /// missing_field, wrong_type, sensor_id_invalid, value_not_numeric, value_not_finite,
    /// timestamp_invalid, timestamp_out_of_range.
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
pub struct ErrorBody {
    /// bad_request, not_found or unavailable.
    pub error: String,
    /// What went wrong and, where it helps, what to send instead.
    pub message: String,
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
    /// Nothing is known under that name.
    #[oai(status = 404)]
    NotFound(Json<ErrorBody>),
    /// MongoDB is unreachable; retry later. Ingest continues meanwhile.
    #[oai(status = 503)]
    Unavailable(Json<ErrorBody>),
}
