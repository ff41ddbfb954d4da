//! From a captured MQTT message to a `Reading`, or to the precise reason it is not one.
//!
//! This is the only judge of what counts as a reading. It is pure and total: every input, however
//! hostile, ends in `Ok` or in a `Rejection` with a reason code and a message, never in a panic
//! (a cargo-fuzz target holds it to that). It must not do I/O or depend on the wall clock: the
//! "future" limit is measured from the instant the message was captured, so a replay judges a
//! message exactly as the first pass did.

use std::borrow::Cow;
use std::fmt;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::{Kind, NaiveZone, Reading, SensorId, Timestamp};

/// The topic level every reading is published under: `sensors/<kind>`.
pub const TOPIC_PREFIX: &str = "sensors/";
/// Whether a message on `topic` belongs to the reading pipeline: everything the subscription
/// `sensors/#` matches, which in MQTT includes the parent level `sensors` itself. Such a
/// message is captured and judged, so one that is not a reading becomes a dead letter instead
/// of vanishing.
pub fn is_reading_topic(topic: &[u8]) -> bool {
    let parent = &TOPIC_PREFIX.as_bytes()[..TOPIC_PREFIX.len() - 1];
    topic == parent || topic.starts_with(TOPIC_PREFIX.as_bytes())
}

/// Prefixed to the topic of a captured message whose publisher may not write its sensor id
/// (the broker's access control): such a message is judged `Reason::Forbidden`. No device can
/// send a topic like it into the pipeline, since only topics under `sensors` are captured.
pub const FORBIDDEN_TOPIC_PREFIX: &str = "$forbidden/";

/// How many bytes of a rejected payload are kept with its dead letter.
pub const DEAD_LETTER_RAW_BYTES: usize = 4096;

/// A message as the broker handed it over, before any judgement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Captured {
    pub received_at: Timestamp,
    pub topic: Bytes,
    /// The payload, or only its first `DEAD_LETTER_RAW_BYTES` when it was larger than the limit.
    pub payload: Bytes,
    /// The payload's length as published.
    pub payload_len: usize,
}

impl Captured {
    /// Keeps only the head of a payload over `max_payload_bytes`: it will be rejected anyway,
    /// and the local log must not fill up with megabytes of garbage.
    pub fn new(
        received_at: Timestamp,
        topic: Bytes,
        payload: Bytes,
        max_payload_bytes: usize,
    ) -> Self {
        let payload_len = payload.len();
        let payload = if payload_len > max_payload_bytes {
            payload.slice(..DEAD_LETTER_RAW_BYTES.min(payload_len))
        } else {
            payload
        };
        Self {
            received_at,
            topic,
            payload,
            payload_len,
        }
    }
}

/// What a message may be, beyond being well formed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Payloads longer than this are rejected.
    pub max_payload_bytes: usize,
    /// Topics longer than this are rejected.
    pub max_topic_bytes: usize,
    /// Readings timestamped before this are rejected.
    pub earliest: Timestamp,
    /// Readings timestamped more than this after their capture are rejected.
    pub max_future_skew_ms: i64,
    /// The zone of timestamps sent without an offset.
    pub naive_zone: NaiveZone,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_payload_bytes: 16 * 1024,
            max_topic_bytes: 256,
            // 2000-01-01T00:00:00Z: older than any plant historian we replace, younger than
            // the zero dates of misconfigured device clocks.
            earliest: Timestamp::from_millis(946_684_800_000).unwrap_or_else(Timestamp::now),
            max_future_skew_ms: 24 * 3600 * 1000,
            naive_zone: NaiveZone::UTC,
        }
    }
}

/// Why a message is not a reading, as a stable code for counters, filters and dashboards.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    PayloadTooLarge,
    TopicInvalid,
    InvalidUtf8,
    InvalidJson,
    MissingField,
    WrongType,
    SensorIdInvalid,
    ValueNotNumeric,
    ValueNotFinite,
    TimestampInvalid,
    TimestampOutOfRange,
    Forbidden,
    /// A Sparkplug B payload that is not valid protobuf, or a birth that declares no usable
    /// metric list (no name, no data type, a repeated alias).
    SparkplugInvalid,
    /// A Sparkplug data message naming an alias or metric its node's birth did not declare.
    SparkplugUnknownAlias,
    /// A Sparkplug message whose `seq` does not follow the previous one of its edge node.
    SparkplugSeqGap,
    /// A Sparkplug data or device birth message from a node or device with no birth in force.
    SparkplugNoBirth,
    /// A Sparkplug metric of a type that is no number (string, bytes, data set, template...).
    SparkplugUnsupportedType,
}

impl Reason {
    pub const ALL: [Reason; 17] = [
        Reason::PayloadTooLarge,
        Reason::TopicInvalid,
        Reason::InvalidUtf8,
        Reason::InvalidJson,
        Reason::MissingField,
        Reason::WrongType,
        Reason::SensorIdInvalid,
        Reason::ValueNotNumeric,
        Reason::ValueNotFinite,
        Reason::TimestampInvalid,
        Reason::TimestampOutOfRange,
        Reason::Forbidden,
        Reason::SparkplugInvalid,
        Reason::SparkplugUnknownAlias,
        Reason::SparkplugSeqGap,
        Reason::SparkplugNoBirth,
        Reason::SparkplugUnsupportedType,
    ];

    pub fn code(self) -> &'static str {
        match self {
            Reason::PayloadTooLarge => "payload_too_large",
            Reason::TopicInvalid => "topic_invalid",
            Reason::InvalidUtf8 => "invalid_utf8",
            Reason::InvalidJson => "invalid_json",
            Reason::MissingField => "missing_field",
            Reason::WrongType => "wrong_type",
            Reason::SensorIdInvalid => "sensor_id_invalid",
            Reason::ValueNotNumeric => "value_not_numeric",
            Reason::ValueNotFinite => "value_not_finite",
            Reason::TimestampInvalid => "timestamp_invalid",
            Reason::TimestampOutOfRange => "timestamp_out_of_range",
            Reason::Forbidden => "forbidden",
            Reason::SparkplugInvalid => "sparkplug_invalid",
            Reason::SparkplugUnknownAlias => "sparkplug_unknown_alias",
            Reason::SparkplugSeqGap => "sparkplug_seq_gap",
            Reason::SparkplugNoBirth => "sparkplug_no_birth",
            Reason::SparkplugUnsupportedType => "sparkplug_unsupported_type",
        }
    }

    pub fn from_code(code: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.code() == code)
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// A message that is not a reading: the reason code and a sentence for the person who sent it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {message}")]
pub struct Rejection {
    pub reason: Reason,
    pub message: String,
}

fn reject(reason: Reason, message: impl Into<String>) -> Rejection {
    Rejection {
        reason,
        message: message.into(),
    }
}

/// At most 64 characters of `text`, for messages that quote what was sent.
fn quote(text: &str) -> Cow<'_, str> {
    match text.char_indices().nth(64) {
        Some((cut, _)) => Cow::Owned(format!("{}…", &text[..cut])),
        None => Cow::Borrowed(text),
    }
}

/// The three fields, unparsed: absent is `None`, and `null` is kept (a wrong type, not a gap).
#[derive(Deserialize)]
struct RawPayload<'a> {
    #[serde(borrow, default, deserialize_with = "present")]
    sensor_id: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    value: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    timestamp: Option<&'a RawValue>,
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// Judges one captured message.
pub fn decode(message: &Captured, limits: &Limits) -> Result<Reading, Rejection> {
    if let Some(topic) = message
        .topic
        .strip_prefix(FORBIDDEN_TOPIC_PREFIX.as_bytes())
    {
        return Err(reject(
            Reason::Forbidden,
            format!(
                "the publisher's credential may not write readings for this sensor_id (topic \
                 '{}')",
                quote(&String::from_utf8_lossy(topic))
            ),
        ));
    }
    if message.payload_len > limits.max_payload_bytes {
        return Err(reject(
            Reason::PayloadTooLarge,
            format!(
                "the payload is {} bytes, the limit is {}",
                message.payload_len, limits.max_payload_bytes
            ),
        ));
    }
    let kind = kind_of(&message.topic, limits)?;
    let text = std::str::from_utf8(&message.payload).map_err(|e| {
        reject(
            Reason::InvalidUtf8,
            format!(
                "the payload is not UTF-8 (bad byte at offset {})",
                e.valid_up_to()
            ),
        )
    })?;
    if text.trim().is_empty() {
        return Err(reject(Reason::InvalidJson, "the payload is empty"));
    }
    // serde would also read a struct from a JSON array; a reading is an object.
    if !text.trim_start().starts_with('{') {
        return Err(reject(
            Reason::InvalidJson,
            "the payload must be a JSON object {\"sensor_id\", \"value\", \"timestamp\"}",
        ));
    }
    let raw: RawPayload<'_> = serde_json::from_str(text).map_err(|e| {
        reject(
            Reason::InvalidJson,
            format!("the payload is not a JSON object of a reading: {e}"),
        )
    })?;
    let missing: Vec<&str> = [
        ("sensor_id", raw.sensor_id.is_none()),
        ("value", raw.value.is_none()),
        ("timestamp", raw.timestamp.is_none()),
    ]
    .into_iter()
    .filter_map(|(name, absent)| absent.then_some(name))
    .collect();
    let (Some(sensor_id), Some(value), Some(timestamp)) = (raw.sensor_id, raw.value, raw.timestamp)
    else {
        return Err(reject(
            Reason::MissingField,
            format!("missing field(s): {}", missing.join(", ")),
        ));
    };

    let sensor_id = json_string(sensor_id, "sensor_id")?;
    let sensor_id = SensorId::parse(&sensor_id).map_err(|why| {
        reject(
            Reason::SensorIdInvalid,
            format!("sensor_id '{}' is not valid: {why}", quote(&sensor_id)),
        )
    })?;
    let value = number(value)?;
    let timestamp = json_string(timestamp, "timestamp")?;
    let timestamp = Timestamp::parse_in(&timestamp, &limits.naive_zone)
        .map_err(|e| reject(Reason::TimestampInvalid, format!("timestamp {e}")))?;
    let latest = message
        .received_at
        .saturating_add_millis(limits.max_future_skew_ms);
    if timestamp < limits.earliest || timestamp > latest {
        return Err(reject(
            Reason::TimestampOutOfRange,
            format!(
                "timestamp {timestamp} lies outside the accepted range {} to {latest} \
                 (capture time plus the allowed clock skew)",
                limits.earliest
            ),
        ));
    }
    Reading::new(sensor_id, kind, value, timestamp)
        .ok_or_else(|| reject(Reason::ValueNotFinite, "value is not finite"))
}

fn kind_of(topic: &[u8], limits: &Limits) -> Result<Kind, Rejection> {
    let topic = std::str::from_utf8(topic)
        .map_err(|_| reject(Reason::TopicInvalid, "the topic is not UTF-8"))?;
    if topic.len() > limits.max_topic_bytes {
        return Err(reject(
            Reason::TopicInvalid,
            format!(
                "the topic is {} bytes, the limit is {}",
                topic.len(),
                limits.max_topic_bytes
            ),
        ));
    }
    if is_reading_topic(topic.as_bytes()) && !topic.starts_with(TOPIC_PREFIX) {
        return Err(reject(
            Reason::TopicInvalid,
            format!(
                "topic '{topic}' names no kind: publish to {TOPIC_PREFIX}<kind>, such as \
                 sensors/temperature"
            ),
        ));
    }
    let Some(rest) = topic.strip_prefix(TOPIC_PREFIX) else {
        return Err(reject(
            Reason::TopicInvalid,
            format!("topic '{}' is not under {TOPIC_PREFIX}", quote(topic)),
        ));
    };
    let last = rest.rsplit('/').next().unwrap_or(rest);
    Kind::parse(last).map_err(|why| {
        reject(
            Reason::TopicInvalid,
            format!(
                "topic '{}' does not end in a kind such as sensors/temperature: {why}",
                quote(topic)
            ),
        )
    })
}

fn type_name(raw: &RawValue) -> &'static str {
    match raw.get().as_bytes().first() {
        Some(b'"') => "a string",
        Some(b'{') => "an object",
        Some(b'[') => "an array",
        Some(b't' | b'f') => "a boolean",
        Some(b'n') => "null",
        _ => "a number",
    }
}

fn json_string<'a>(raw: &'a RawValue, field: &str) -> Result<Cow<'a, str>, Rejection> {
    if !raw.get().starts_with('"') {
        return Err(reject(
            Reason::WrongType,
            format!("{field} must be a string, got {}", type_name(raw)),
        ));
    }
    serde_json::from_str::<Cow<'a, str>>(raw.get()).map_err(|e| {
        reject(
            Reason::InvalidJson,
            format!("{field} is not a valid string: {e}"),
        )
    })
}

fn number(raw: &RawValue) -> Result<f64, Rejection> {
    let text = raw.get();
    let value = match text.as_bytes().first() {
        Some(b'-' | b'0'..=b'9') => serde_json::from_str::<f64>(text).map_err(|_| {
            reject(
                Reason::ValueNotFinite,
                format!("value {} is out of range for a double", quote(text)),
            )
        })?,
        Some(b'"') => {
            let inner = serde_json::from_str::<Cow<'_, str>>(text).map_err(|e| {
                reject(
                    Reason::InvalidJson,
                    format!("value is not a valid string: {e}"),
                )
            })?;
            parse_numeric_text(&inner)?
        }
        _ => {
            return Err(reject(
                Reason::WrongType,
                format!(
                    "value must be a number or a numeric string, got {}",
                    type_name(raw)
                ),
            ));
        }
    };
    if value.is_finite() {
        Ok(value)
    } else {
        Err(reject(
            Reason::ValueNotFinite,
            format!("value {} is not a finite number", quote(text)),
        ))
    }
}

/// A number written as text, as the original specification quotes it ("23.5"). Rust's float
/// grammar is the accepted one, minus the spellings of NaN and infinity, which are not readings.
fn parse_numeric_text(text: &str) -> Result<f64, Rejection> {
    let trimmed = text.trim();
    let lower = trimmed.trim_start_matches(['+', '-']).to_ascii_lowercase();
    if matches!(lower.as_str(), "nan" | "inf" | "infinity") {
        return Err(reject(
            Reason::ValueNotFinite,
            format!("value '{}' is not a finite number", quote(text)),
        ));
    }
    trimmed.parse::<f64>().map_err(|_| {
        reject(
            Reason::ValueNotNumeric,
            format!("value '{}' is not a number", quote(text)),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn captured(topic: &str, payload: &[u8]) -> Captured {
        let at = Timestamp::parse("2024-05-01T10:00:00Z").unwrap();
        Captured::new(
            at,
            Bytes::copy_from_slice(topic.as_bytes()),
            Bytes::copy_from_slice(payload),
            Limits::default().max_payload_bytes,
        )
    }

    fn ok(topic: &str, payload: &str) -> Reading {
        match decode(&captured(topic, payload.as_bytes()), &Limits::default()) {
            Ok(r) => r,
            Err(e) => panic!("{payload}: {e}"),
        }
    }

    fn reason(topic: &str, payload: &[u8]) -> Reason {
        match decode(&captured(topic, payload), &Limits::default()) {
            Ok(r) => panic!("accepted {:?} as {r:?}", String::from_utf8_lossy(payload)),
            Err(e) => {
                assert!(!e.message.is_empty());
                e.reason
            }
        }
    }

    #[test]
    fn decodes_the_original_contract() {
        let r = ok(
            "sensors/temperature",
            r#"{"sensor_id": "t-1", "value": "21.5", "timestamp": "2024-05-01T09:59:59.123456"}"#,
        );
        assert_eq!(r.sensor_id().as_str(), "t-1");
        assert_eq!(r.kind().as_str(), "temperature");
        assert_eq!(r.value(), 21.5);
        assert_eq!(r.timestamp().to_string(), "2024-05-01T09:59:59.123Z");
    }

    #[test]
    fn numbers_offsets_extra_fields_and_deep_topics() {
        let r = ok(
            "sensors/plant-1/line-2/humidity",
            r#"{"value": -3e1, "unit": "%", "timestamp": "2024-05-01T11:00:00+02:00", "sensor_id": "h\u00e9"}"#,
        );
        assert_eq!(r.kind().as_str(), "humidity");
        assert_eq!(r.value(), -30.0);
        assert_eq!(r.sensor_id().as_str(), "hé");
        assert_eq!(r.timestamp().to_string(), "2024-05-01T09:00:00.000Z");
        assert_eq!(
            ok(
                "sensors/t",
                r#"{"sensor_id":"a","value":" 7 ","timestamp":"2024-01-01"}"#
            )
            .value(),
            7.0
        );
    }

    #[test]
    fn each_defect_has_its_reason() {
        let t = "sensors/temperature";
        let cases: &[(&str, &[u8], Reason)] = &[
            (t, b"", Reason::InvalidJson),
            (t, b"   ", Reason::InvalidJson),
            (t, b"{\"sensor_id\": \"a\"", Reason::InvalidJson),
            (t, b"[1,2]", Reason::InvalidJson),
            (t, b"\xff\xfe", Reason::InvalidUtf8),
            (t, br#"{"sensor_id":"a","value":1}"#, Reason::MissingField),
            (
                t,
                br#"{"sensor_id":1,"value":1,"timestamp":"2024-01-01"}"#,
                Reason::WrongType,
            ),
            (
                t,
                br#"{"sensor_id":"a","value":true,"timestamp":"2024-01-01"}"#,
                Reason::WrongType,
            ),
            (
                t,
                br#"{"sensor_id":"a","value":null,"timestamp":"2024-01-01"}"#,
                Reason::WrongType,
            ),
            (
                t,
                br#"{"sensor_id":"a","value":[1],"timestamp":"2024-01-01"}"#,
                Reason::WrongType,
            ),
            (
                t,
                br#"{"sensor_id":"a","value":1,"timestamp":1714557600}"#,
                Reason::WrongType,
            ),
            (
                t,
                br#"{"sensor_id":"a","value":"abc","timestamp":"2024-01-01"}"#,
                Reason::ValueNotNumeric,
            ),
            (
                t,
                br#"{"sensor_id":"a","value":"0x10","timestamp":"2024-01-01"}"#,
                Reason::ValueNotNumeric,
            ),
            (
                t,
                br#"{"sensor_id":"a","value":"NaN","timestamp":"2024-01-01"}"#,
                Reason::ValueNotFinite,
            ),
            (
                t,
                br#"{"sensor_id":"a","value":"-inf","timestamp":"2024-01-01"}"#,
                Reason::ValueNotFinite,
            ),
            (
                t,
                br#"{"sensor_id":"a","value":1e400,"timestamp":"2024-01-01"}"#,
                Reason::ValueNotFinite,
            ),
            (
                t,
                br#"{"sensor_id":"a","value":"1e400","timestamp":"2024-01-01"}"#,
                Reason::ValueNotFinite,
            ),
            (
                t,
                br#"{"sensor_id":"","value":1,"timestamp":"2024-01-01"}"#,
                Reason::SensorIdInvalid,
            ),
            (
                t,
                br#"{"sensor_id":"a\u0007","value":1,"timestamp":"2024-01-01"}"#,
                Reason::SensorIdInvalid,
            ),
            (
                t,
                br#"{"sensor_id":"a","value":1,"timestamp":"soon"}"#,
                Reason::TimestampInvalid,
            ),
            (
                t,
                br#"{"sensor_id":"a","value":1,"timestamp":"1999-12-31T23:59:59Z"}"#,
                Reason::TimestampOutOfRange,
            ),
            (
                t,
                br#"{"sensor_id":"a","value":1,"timestamp":"2024-05-02T10:00:00.001Z"}"#,
                Reason::TimestampOutOfRange,
            ),
            (
                t,
                br#"{"sensor_id":"a","sensor_id":"b","value":1,"timestamp":"2024-01-01"}"#,
                Reason::InvalidJson,
            ),
            (
                "sensors/",
                br#"{"sensor_id":"a","value":1,"timestamp":"2024-01-01"}"#,
                Reason::TopicInvalid,
            ),
            (
                "sensors",
                br#"{"sensor_id":"a","value":1,"timestamp":"2024-01-01"}"#,
                Reason::TopicInvalid,
            ),
            (
                "other/temperature",
                br#"{"sensor_id":"a","value":1,"timestamp":"2024-01-01"}"#,
                Reason::TopicInvalid,
            ),
        ];
        for (topic, payload, expected) in cases {
            assert_eq!(
                reason(topic, payload),
                *expected,
                "{topic} {:?}",
                String::from_utf8_lossy(payload)
            );
        }
    }

    #[test]
    fn limits_on_size_and_nesting() {
        let big = vec![b' '; 1024 * 1024];
        let message = captured("sensors/t", &big);
        assert_eq!(message.payload.len(), DEAD_LETTER_RAW_BYTES);
        assert_eq!(message.payload_len, 1024 * 1024);
        assert_eq!(
            decode(&message, &Limits::default()).map_err(|e| e.reason),
            Err(Reason::PayloadTooLarge)
        );
        // Nesting as deep as the payload limit allows, on a thread with a small stack: a
        // rejection, never a stack overflow.
        let depth = Limits::default().max_payload_bytes / 2 - 40;
        let nested_value = format!(
            "{{\"sensor_id\":\"a\",\"value\":{}1{},\"timestamp\":\"2024-01-01\"}}",
            "[".repeat(depth),
            "]".repeat(depth)
        );
        let nested_extra = format!(
            "{{\"sensor_id\":\"a\",\"value\":1,\"timestamp\":\"2024-01-01\",\"x\":{}{}}}",
            "{\"a\":".repeat(depth / 3),
            "}".repeat(depth / 3)
        );
        let unclosed = "[".repeat(depth * 2);
        std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(move || {
                assert_eq!(
                    reason("sensors/t", nested_value.as_bytes()),
                    Reason::WrongType
                );
                assert_eq!(
                    reason("sensors/t", nested_extra.as_bytes()),
                    Reason::InvalidJson
                );
                assert_eq!(
                    reason("sensors/t", unclosed.as_bytes()),
                    Reason::InvalidJson
                );
            })
            .unwrap()
            .join()
            .unwrap();
        let long_topic = format!("sensors/{}", "k".repeat(300));
        assert_eq!(
            reason(
                &long_topic,
                br#"{"sensor_id":"a","value":1,"timestamp":"2024-01-01"}"#
            ),
            Reason::TopicInvalid
        );
    }

    #[test]
    fn naive_timestamps_are_read_in_the_configured_zone() {
        let limits = Limits {
            naive_zone: NaiveZone::parse("Europe/Berlin").unwrap(),
            ..Limits::default()
        };
        let message = captured(
            "sensors/t",
            br#"{"sensor_id":"a","value":1,"timestamp":"2024-05-01T12:00:00.250"}"#,
        );
        let r = decode(&message, &limits).unwrap();
        assert_eq!(r.timestamp().to_string(), "2024-05-01T10:00:00.250Z");
        let r = decode(&message, &Limits::default()).unwrap();
        assert_eq!(r.timestamp().to_string(), "2024-05-01T12:00:00.250Z");
    }

    #[test]
    fn everything_sensors_hash_matches_is_judged() {
        assert!(is_reading_topic(b"sensors"));
        assert!(is_reading_topic(b"sensors/temperature"));
        assert!(is_reading_topic(b"sensors/"));
        assert!(!is_reading_topic(b"sensorsx"));
        assert!(!is_reading_topic(b"sensor"));
        assert!(!is_reading_topic(b"other/sensors"));
    }

    #[test]
    fn reason_codes_round_trip() {
        for reason in Reason::ALL {
            assert_eq!(Reason::from_code(reason.code()), Some(reason));
        }
        assert_eq!(Reason::from_code("nope"), None);
    }

    #[test]
    fn a_forbidden_capture_is_judged_forbidden_whatever_it_holds() {
        let good = r#"{"sensor_id":"s","value":1,"timestamp":"2024-05-01T10:00:00Z"}"#;
        let r = decode(
            &captured("$forbidden/sensors/temperature", good.as_bytes()),
            &Limits::default(),
        )
        .unwrap_err();
        assert_eq!(r.reason, Reason::Forbidden);
        assert!(r.message.contains("sensors/temperature"), "{}", r.message);
    }
}
