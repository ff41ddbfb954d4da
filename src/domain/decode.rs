//! From a captured MQTT message to a `Reading`, or to the precise reason it is not one.
//!
//! This is the only judge of what counts as a reading. It is pure and total: every input, however
//! hostile, ends in `Ok` or in a `Rejection` with a reason code and a message, never in a panic
//! (a cargo-fuzz target holds it to that). It must not do I/O or depend on the wall clock: the
//! "future" limit is measured from the instant the message was captured, so a replay judges a
//! message exactly as the first pass did.
//!
//! One message may hold several readings: a JSON array of reading objects, or one sensor's
//! `values` object of kinds. Each element is judged alone, so one bad element is a dead letter
//! of its own (naming its index) while the others are stored. A topic that matches one of the
//! operator's templates (`domain::Templates`) gives the sensor id, kind and tags itself.

use std::borrow::Cow;
use std::fmt;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::template::{MAX_TAG_VALUE_BYTES, Templates};
use super::{Kind, NaiveZone, Reading, SensorId, Tags, Timestamp};

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

/// Whether a message on `topic` is captured and judged: `sensors/#`, or a topic one of the
/// operator's templates matches. The capture codec and the external-broker subscriber both ask.
pub fn is_captured(topic: &[u8], templates: &Templates) -> bool {
    is_reading_topic(topic) || templates.matches(topic)
}

/// Prefixed to the topic of a captured message whose publisher may not write its sensor id
/// (the broker's access control): such a message is judged `Reason::Forbidden`. No device can
/// send a topic like it into the pipeline: captured topics are under `sensors` or match a
/// template, and no template may begin with `$`.
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
    /// Most readings one message may hold (a batch's elements, a `values` object's kinds).
    pub max_batch_readings: usize,
    /// The operator's topic templates, beside `sensors/#`.
    pub templates: Templates,
}

/// The default of `Limits::max_batch_readings`.
pub const MAX_BATCH_READINGS: usize = 1000;

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
            max_batch_readings: MAX_BATCH_READINGS,
            templates: Templates::default(),
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
    BatchEmpty,
    BatchTooLarge,
    KindInvalid,
    SensorIdConflict,
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
    pub const ALL: [Reason; 21] = [
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
        Reason::BatchEmpty,
        Reason::BatchTooLarge,
        Reason::KindInvalid,
        Reason::SensorIdConflict,
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
            Reason::BatchEmpty => "batch_empty",
            Reason::BatchTooLarge => "batch_too_large",
            Reason::KindInvalid => "kind_invalid",
            Reason::SensorIdConflict => "sensor_id_conflict",
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

/// The `values` field of an object without `value`, read only then: an object with `value` is a
/// single reading, whatever else it holds, exactly as before batches existed.
#[derive(Deserialize)]
struct RawValues<'a> {
    #[serde(borrow, default, deserialize_with = "present")]
    values: Option<&'a RawValue>,
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// The entries of a JSON object in the order written, values unparsed; a repeated key fails.
struct Entries<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'de> Deserialize<'de> for Entries<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Entries<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Entries<'de>, A::Error> {
                let mut entries: Vec<(Cow<'de, str>, &'de RawValue)> = Vec::new();
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    if entries.iter().any(|(k, _)| *k == key) {
                        return Err(serde::de::Error::custom(format_args!(
                            "the key '{}' appears twice",
                            quote(&key)
                        )));
                    }
                    let value = map.next_value::<&'de RawValue>()?;
                    entries.push((key, value));
                }
                Ok(Entries(entries))
            }
        }
        d.deserialize_map(Visitor)
    }
}

/// Every reading a message holds, and the elements that are not readings.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Decoded {
    /// In the order of the message's elements.
    pub readings: Vec<Reading>,
    /// (element index from 0, why): a dead letter each, named `<log id>:<lsn>:<index>`.
    pub rejected: Vec<(usize, Rejection)>,
}

/// What the topic says of the readings a message holds.
struct TopicParts {
    /// Required of single readings and batch elements; the `values` form takes its keys.
    kind: Result<Kind, Rejection>,
    /// From a template: payloads may leave `sensor_id` out, and must not contradict it.
    sensor_id: Option<SensorId>,
    tags: Tags,
}

/// Judges one captured message: a single reading `{"sensor_id", "value", "timestamp"}`, a batch
/// `[reading, ...]`, or one sensor's several kinds `{"sensor_id", "timestamp", "values":
/// {kind: value, ...}}`. `Err` rejects the whole message (one dead letter); `Ok` lists its
/// readings and the elements that are not readings (a dead letter each, naming the index).
pub fn decode(message: &Captured, limits: &Limits) -> Result<Decoded, Rejection> {
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
    let topic = topic_parts(&message.topic, limits)?;
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
    let judge = Judge {
        topic: &topic,
        limits,
        received_at: message.received_at,
    };
    // serde would also read a struct from a JSON array; a reading is an object.
    match text.trim_start().as_bytes().first() {
        Some(b'{') => judge.object(text),
        Some(b'[') => judge.batch(text),
        _ => Err(reject(
            Reason::InvalidJson,
            "the payload must be a JSON object {\"sensor_id\", \"value\", \"timestamp\"} or an \
             array of them",
        )),
    }
}

/// The sensor ids a message on `topic` claims, read the way `decode` reads them, for access
/// control: whenever `decode` accepts a reading, its sensor id is among these. A templated
/// topic claims its `+sensor_id` level; otherwise the payload's `sensor_id`, or each batch
/// element's. Elements without a readable id are left out: `decode` rejects them.
pub fn claimed_sensor_ids<'a>(
    topic: &'a [u8],
    payload: &'a [u8],
    templates: &Templates,
) -> Vec<Cow<'a, str>> {
    if let Some(fields) = std::str::from_utf8(topic)
        .ok()
        .and_then(|topic| templates.fields(topic))
    {
        return vec![Cow::Owned(fields.sensor_id.to_owned())];
    }
    let Ok(text) = std::str::from_utf8(payload) else {
        return Vec::new();
    };
    if text.trim_start().starts_with('[') {
        let Ok(elements) = serde_json::from_str::<Vec<&RawValue>>(text) else {
            return Vec::new();
        };
        return elements
            .into_iter()
            .filter_map(|e| sensor_id_of(e.get()))
            .collect();
    }
    sensor_id_of(text).into_iter().collect()
}

/// The `sensor_id` of one JSON object, read as `decode` reads it; other fields skipped unparsed.
fn sensor_id_of(text: &str) -> Option<Cow<'_, str>> {
    #[derive(Deserialize)]
    struct OnlyId<'a> {
        #[serde(borrow, default)]
        sensor_id: Option<&'a RawValue>,
    }
    if !text.trim_start().starts_with('{') {
        return None;
    }
    let raw = serde_json::from_str::<OnlyId<'_>>(text).ok()?.sensor_id?;
    if !raw.get().starts_with('"') {
        return None;
    }
    serde_json::from_str::<Cow<'_, str>>(raw.get()).ok()
}

/// Judges the readings of one message against its topic and the limits.
struct Judge<'a> {
    topic: &'a TopicParts,
    limits: &'a Limits,
    received_at: Timestamp,
}

impl Judge<'_> {
    /// A single reading, or the `values` form.
    fn object(&self, text: &str) -> Result<Decoded, Rejection> {
        let raw: RawPayload<'_> = serde_json::from_str(text).map_err(|e| {
            reject(
                Reason::InvalidJson,
                format!("the payload is not a JSON object of a reading: {e}"),
            )
        })?;
        if raw.value.is_none()
            && let Some(values) = serde_json::from_str::<RawValues<'_>>(text)
                .map_err(|e| {
                    reject(
                        Reason::InvalidJson,
                        format!("the payload is not a JSON object of a reading: {e}"),
                    )
                })?
                .values
        {
            return self.values(&raw, values);
        }
        let reading = self.reading(&raw)?;
        Ok(Decoded {
            readings: vec![reading],
            rejected: Vec::new(),
        })
    }

    /// `[reading, ...]`: each element judged alone. What is wrong with the array as a whole (not
    /// JSON, empty, too long, an element that is no object) rejects the whole message.
    fn batch(&self, text: &str) -> Result<Decoded, Rejection> {
        let elements: Vec<&RawValue> = serde_json::from_str(text).map_err(|e| {
            reject(
                Reason::InvalidJson,
                format!("the payload is not a JSON array of readings: {e}"),
            )
        })?;
        self.check_count(elements.len(), "batch")?;
        // A templated topic without +kind leaves every element without one: one dead letter.
        if let Err(no_kind) = &self.topic.kind {
            return Err(no_kind.clone());
        }
        if let Some((i, e)) = elements
            .iter()
            .enumerate()
            .find(|(_, e)| !e.get().starts_with('{'))
        {
            return Err(reject(
                Reason::InvalidJson,
                format!(
                    "element {i} is {}: a batch is an array of reading objects",
                    type_name(e)
                ),
            ));
        }
        let mut decoded = Decoded::default();
        for (i, element) in elements.into_iter().enumerate() {
            let judged = serde_json::from_str::<RawPayload<'_>>(element.get())
                .map_err(|e| {
                    reject(
                        Reason::InvalidJson,
                        format!("not a JSON object of a reading: {e}"),
                    )
                })
                .and_then(|raw| self.reading(&raw));
            match judged {
                Ok(reading) => decoded.readings.push(reading),
                Err(e) => decoded.rejected.push((i, element_rejection(i, None, e))),
            }
        }
        Ok(decoded)
    }

    /// `{"sensor_id", "timestamp", "values": {kind: value, ...}}`: one sensor, one instant,
    /// several kinds, each key a kind (whatever kind the topic names is not used). The sensor id
    /// and timestamp are the whole message's; each value is judged alone.
    fn values(&self, raw: &RawPayload<'_>, values: &RawValue) -> Result<Decoded, Rejection> {
        let missing: Vec<&str> = [
            (
                "sensor_id",
                raw.sensor_id.is_none() && self.topic.sensor_id.is_none(),
            ),
            ("timestamp", raw.timestamp.is_none()),
        ]
        .into_iter()
        .filter_map(|(name, absent)| absent.then_some(name))
        .collect();
        if !missing.is_empty() {
            return Err(reject(
                Reason::MissingField,
                format!("missing field(s): {}", missing.join(", ")),
            ));
        }
        if !values.get().starts_with('{') {
            return Err(reject(
                Reason::WrongType,
                format!(
                    "values must be an object of kinds and values, got {}",
                    type_name(values)
                ),
            ));
        }
        let Entries(entries) = serde_json::from_str(values.get()).map_err(|e| {
            reject(
                Reason::InvalidJson,
                format!("values is not a JSON object: {e}"),
            )
        })?;
        self.check_count(entries.len(), "values object")?;
        let sensor_id = self.sensor_id(raw.sensor_id)?;
        let timestamp = self.timestamp(raw.timestamp)?;
        let mut decoded = Decoded::default();
        for (i, (key, value)) in entries.into_iter().enumerate() {
            let judged = Kind::parse(&key)
                .map_err(|why| {
                    reject(
                        Reason::KindInvalid,
                        format!("'{}' is not a kind: {why}", quote(&key)),
                    )
                })
                .and_then(|kind| Ok((kind, number(value)?)))
                .and_then(|(kind, value)| self.finish(sensor_id.clone(), kind, value, timestamp));
            match judged {
                Ok(reading) => decoded.readings.push(reading),
                Err(e) => decoded
                    .rejected
                    .push((i, element_rejection(i, Some(&key), e))),
            }
        }
        Ok(decoded)
    }

    fn check_count(&self, count: usize, what: &str) -> Result<(), Rejection> {
        if count == 0 {
            return Err(reject(
                Reason::BatchEmpty,
                format!("the {what} is empty: it holds no reading"),
            ));
        }
        if count > self.limits.max_batch_readings {
            return Err(reject(
                Reason::BatchTooLarge,
                format!(
                    "the {what} holds {count} readings, the limit is {}",
                    self.limits.max_batch_readings
                ),
            ));
        }
        Ok(())
    }

    /// One reading object (the single form, or a batch element).
    fn reading(&self, raw: &RawPayload<'_>) -> Result<Reading, Rejection> {
        let missing: Vec<&str> = [
            (
                "sensor_id",
                raw.sensor_id.is_none() && self.topic.sensor_id.is_none(),
            ),
            ("value", raw.value.is_none()),
            ("timestamp", raw.timestamp.is_none()),
        ]
        .into_iter()
        .filter_map(|(name, absent)| absent.then_some(name))
        .collect();
        let (Some(value), Some(timestamp)) = (raw.value, raw.timestamp) else {
            return Err(reject(
                Reason::MissingField,
                format!("missing field(s): {}", missing.join(", ")),
            ));
        };
        if !missing.is_empty() {
            return Err(reject(
                Reason::MissingField,
                format!("missing field(s): {}", missing.join(", ")),
            ));
        }
        let sensor_id = self.sensor_id(raw.sensor_id)?;
        let value = number(value)?;
        let timestamp = self.timestamp(Some(timestamp))?;
        let kind = self.topic.kind.clone()?;
        self.finish(sensor_id, kind, value, timestamp)
    }

    /// The payload's sensor id, or the topic's; both must agree when both are given.
    fn sensor_id(&self, raw: Option<&RawValue>) -> Result<SensorId, Rejection> {
        let from_payload = match raw {
            None => None,
            Some(raw) => {
                let text = json_string(raw, "sensor_id")?;
                Some(SensorId::parse(&text).map_err(|why| {
                    reject(
                        Reason::SensorIdInvalid,
                        format!("sensor_id '{}' is not valid: {why}", quote(&text)),
                    )
                })?)
            }
        };
        match (from_payload, &self.topic.sensor_id) {
            (Some(payload), Some(topic)) if payload != *topic => Err(reject(
                Reason::SensorIdConflict,
                format!(
                    "sensor_id '{}' contradicts the topic's sensor id '{}'",
                    quote(payload.as_str()),
                    quote(topic.as_str())
                ),
            )),
            (Some(id), _) => Ok(id),
            (None, Some(topic)) => Ok(topic.clone()),
            (None, None) => Err(reject(Reason::MissingField, "missing field(s): sensor_id")),
        }
    }

    fn timestamp(&self, raw: Option<&RawValue>) -> Result<Timestamp, Rejection> {
        let Some(raw) = raw else {
            return Err(reject(Reason::MissingField, "missing field(s): timestamp"));
        };
        let timestamp = json_string(raw, "timestamp")?;
        let timestamp = Timestamp::parse_in(&timestamp, &self.limits.naive_zone)
            .map_err(|e| reject(Reason::TimestampInvalid, format!("timestamp {e}")))?;
        let latest = self
            .received_at
            .saturating_add_millis(self.limits.max_future_skew_ms);
        if timestamp < self.limits.earliest || timestamp > latest {
            return Err(reject(
                Reason::TimestampOutOfRange,
                format!(
                    "timestamp {timestamp} lies outside the accepted range {} to {latest} \
                     (capture time plus the allowed clock skew)",
                    self.limits.earliest
                ),
            ));
        }
        Ok(timestamp)
    }

    fn finish(
        &self,
        sensor_id: SensorId,
        kind: Kind,
        value: f64,
        timestamp: Timestamp,
    ) -> Result<Reading, Rejection> {
        Reading::new(sensor_id, kind, value, timestamp)
            .map(|r| r.with_tags(self.topic.tags.clone()))
            .ok_or_else(|| reject(Reason::ValueNotFinite, "value is not finite"))
    }
}

/// An element's rejection, its message naming the element: `element 3: ...`, or for the
/// `values` form `element 1 (values.humidity): ...`.
fn element_rejection(index: usize, key: Option<&str>, rejection: Rejection) -> Rejection {
    let message = match key {
        Some(key) => format!(
            "element {index} (values.{}): {}",
            quote(key),
            rejection.message
        ),
        None => format!("element {index}: {}", rejection.message),
    };
    Rejection {
        reason: rejection.reason,
        message,
    }
}

/// The topic's kind, sensor id and tags: `sensors/<kind>`, or a template's levels.
fn topic_parts(topic: &[u8], limits: &Limits) -> Result<TopicParts, Rejection> {
    let text = std::str::from_utf8(topic)
        .map_err(|_| reject(Reason::TopicInvalid, "the topic is not UTF-8"))?;
    if text.len() > limits.max_topic_bytes {
        return Err(reject(
            Reason::TopicInvalid,
            format!(
                "the topic is {} bytes, the limit is {}",
                text.len(),
                limits.max_topic_bytes
            ),
        ));
    }
    let Some(fields) = limits.templates.fields(text) else {
        return Ok(TopicParts {
            kind: Ok(kind_of(text)?),
            sensor_id: None,
            tags: Tags::default(),
        });
    };
    let template = quote(fields.template);
    let sensor_id = SensorId::parse(fields.sensor_id).map_err(|why| {
        reject(
            Reason::SensorIdInvalid,
            format!(
                "the sensor id level of topic '{}' (template '{template}') is not valid: {why}",
                quote(text)
            ),
        )
    })?;
    let kind = match fields.kind {
        Some(kind) => Ok(Kind::parse(kind).map_err(|why| {
            reject(
                Reason::TopicInvalid,
                format!(
                    "the kind level of topic '{}' (template '{template}') is not a kind: {why}",
                    quote(text)
                ),
            )
        })?),
        None => Err(reject(
            Reason::MissingField,
            format!(
                "template '{template}' names no +kind level: send {{\"timestamp\", \"values\": \
                 {{kind: value, ...}}}} on topic '{}'",
                quote(text)
            ),
        )),
    };
    let mut tags = Vec::with_capacity(fields.tags.len());
    for (name, value) in fields.tags {
        if value.is_empty()
            || value.len() > MAX_TAG_VALUE_BYTES
            || value.chars().any(char::is_control)
        {
            return Err(reject(
                Reason::TopicInvalid,
                format!(
                    "the level +{name} of topic '{}' (template '{template}') must be 1 to \
                     {MAX_TAG_VALUE_BYTES} bytes without control characters",
                    quote(text)
                ),
            ));
        }
        tags.push((name.to_owned(), value.to_owned()));
    }
    Ok(TopicParts {
        kind,
        sensor_id: Some(sensor_id),
        tags: Tags::new(tags),
    })
}

fn kind_of(topic: &str) -> Result<Kind, Rejection> {
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

    /// The one reading of a single-reading message.
    fn ok(topic: &str, payload: &str) -> Reading {
        match decode(&captured(topic, payload.as_bytes()), &Limits::default()) {
            Ok(Decoded {
                mut readings,
                rejected,
            }) if readings.len() == 1 && rejected.is_empty() => readings.remove(0),
            Ok(d) => panic!("{payload}: not one reading: {d:?}"),
            Err(e) => panic!("{payload}: {e}"),
        }
    }

    /// The reason a message is rejected as a whole.
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
        let r = decode(&message, &limits).unwrap().readings.remove(0);
        assert_eq!(r.timestamp().to_string(), "2024-05-01T10:00:00.250Z");
        let r = decode(&message, &Limits::default())
            .unwrap()
            .readings
            .remove(0);
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

    fn decoded(topic: &str, payload: &str, limits: &Limits) -> Decoded {
        match decode(&captured(topic, payload.as_bytes()), limits) {
            Ok(d) => d,
            Err(e) => panic!("{payload}: rejected whole: {e}"),
        }
    }

    #[test]
    fn a_batch_stores_each_element_and_names_the_bad_ones() {
        let d = decoded(
            "sensors/temperature",
            r#" [{"sensor_id":"a","value":1,"timestamp":"2024-05-01T09:00:00Z"},
                 {"sensor_id":"b","value":"x","timestamp":"2024-05-01T09:00:00Z"},
                 {"sensor_id":"c","value":3,"timestamp":"2024-05-01T09:00:00Z","unit":"C"},
                 {"sensor_id":"d","value":4},
                 {"sensor_id":"e","value":5,"value":6,"timestamp":"2024-05-01T09:00:00Z"}]"#,
            &Limits::default(),
        );
        let ids: Vec<&str> = d.readings.iter().map(|r| r.sensor_id().as_str()).collect();
        assert_eq!(ids, ["a", "c"]);
        assert!(
            d.readings
                .iter()
                .all(|r| r.kind().as_str() == "temperature")
        );
        let rejected: Vec<(usize, Reason)> =
            d.rejected.iter().map(|(i, r)| (*i, r.reason)).collect();
        assert_eq!(
            rejected,
            [
                (1, Reason::ValueNotNumeric),
                (3, Reason::MissingField),
                (4, Reason::InvalidJson)
            ]
        );
        assert!(
            d.rejected[0].1.message.starts_with("element 1: value 'x'"),
            "{:?}",
            d.rejected
        );
        assert!(d.rejected[1].1.message.contains("timestamp"));
        // Judged again, the same verdict.
        assert_eq!(
            decoded(
                "sensors/temperature",
                r#"[{"sensor_id":"a","value":1,"timestamp":"2024-05-01T09:00:00Z"}]"#,
                &Limits::default()
            )
            .readings,
            d.readings[..1]
        );
    }

    #[test]
    fn what_is_wrong_with_a_batch_as_a_whole_rejects_it_whole() {
        let t = "sensors/t";
        let r = |payload: &str| reason(t, payload.as_bytes());
        assert_eq!(r("[]"), Reason::BatchEmpty);
        assert_eq!(r(" [ ] "), Reason::BatchEmpty);
        assert_eq!(
            r(r#"[{"sensor_id":"a","value":1,"timestamp":"2024-01-01"},1]"#),
            Reason::InvalidJson
        );
        assert_eq!(
            r(r#"[{"sensor_id":"a","value":1,"timestamp":"2024-01-01"}"#),
            Reason::InvalidJson
        );
        assert_eq!(
            r(r#"[[{"sensor_id":"a","value":1,"timestamp":"2024-01-01"}]]"#),
            Reason::InvalidJson
        );
        let limits = Limits {
            max_batch_readings: 3,
            ..Limits::default()
        };
        let element = r#"{"sensor_id":"a","value":1,"timestamp":"2024-01-01"}"#;
        let four = format!("[{}]", [element; 4].join(","));
        let e = decode(&captured(t, four.as_bytes()), &limits).unwrap_err();
        assert_eq!(e.reason, Reason::BatchTooLarge);
        assert!(
            e.message.contains("4 readings, the limit is 3"),
            "{}",
            e.message
        );
        let three = format!("[{}]", [element; 3].join(","));
        let d = decode(&captured(t, three.as_bytes()), &limits).unwrap();
        assert_eq!(
            d.readings.len(),
            3,
            "the same reading thrice: one identity, stored once"
        );
        assert_eq!(
            r(&format!(
                "[{}]",
                [element; MAX_BATCH_READINGS + 1].join(",")
            )),
            Reason::PayloadTooLarge
        );
    }

    #[test]
    fn the_values_form_gives_one_reading_per_kind() {
        let d = decoded(
            "sensors/bme280",
            r#"{"sensor_id":"bme-1","timestamp":"2024-05-01T09:00:00Z",
                "values":{"temperature":21.5,"humidity":"48","pressure":"high","a/b":1,"co2":null}}"#,
            &Limits::default(),
        );
        let kinds: Vec<(&str, f64)> = d
            .readings
            .iter()
            .map(|r| (r.kind().as_str(), r.value()))
            .collect();
        assert_eq!(kinds, [("temperature", 21.5), ("humidity", 48.0)]);
        assert!(d.readings.iter().all(|r| r.sensor_id().as_str() == "bme-1"
            && r.timestamp().to_string() == "2024-05-01T09:00:00.000Z"));
        let rejected: Vec<(usize, Reason)> =
            d.rejected.iter().map(|(i, r)| (*i, r.reason)).collect();
        assert_eq!(
            rejected,
            [
                (2, Reason::ValueNotNumeric),
                (3, Reason::KindInvalid),
                (4, Reason::WrongType)
            ]
        );
        assert!(
            d.rejected[0]
                .1
                .message
                .starts_with("element 2 (values.pressure): "),
            "{}",
            d.rejected[0].1.message
        );
        let t = "sensors/bme280";
        let r = |payload: &str| reason(t, payload.as_bytes());
        assert_eq!(
            r(r#"{"sensor_id":"a","timestamp":"2024-01-01","values":{}}"#),
            Reason::BatchEmpty
        );
        assert_eq!(
            r(r#"{"sensor_id":"a","timestamp":"2024-01-01","values":[1]}"#),
            Reason::WrongType
        );
        assert_eq!(
            r(r#"{"sensor_id":"a","values":{"t":1}}"#),
            Reason::MissingField
        );
        assert_eq!(
            r(r#"{"timestamp":"2024-01-01","values":{"t":1}}"#),
            Reason::MissingField
        );
        assert_eq!(
            r(r#"{"sensor_id":"a","timestamp":"2024-01-01","values":{"t":1,"t":2}}"#),
            Reason::InvalidJson
        );
        assert_eq!(
            r(r#"{"sensor_id":"a","timestamp":"1990-01-01","values":{"t":1}}"#),
            Reason::TimestampOutOfRange
        );
        assert_eq!(
            r(r#"{"sensor_id":"","timestamp":"2024-01-01","values":{"t":1}}"#),
            Reason::SensorIdInvalid
        );
        // With `value`, an object is one reading, as it always was: `values` is an extra field.
        let single = ok(
            t,
            r#"{"sensor_id":"a","value":2,"timestamp":"2024-01-01","values":{"t":1}}"#,
        );
        assert_eq!((single.kind().as_str(), single.value()), ("bme280", 2.0));
        // The topic is judged first, as for any reading.
        assert_eq!(
            reason(
                "sensors",
                br#"{"sensor_id":"a","timestamp":"2024-01-01","values":{"t":1}}"#
            ),
            Reason::TopicInvalid
        );
    }

    fn templated() -> Limits {
        Limits {
            templates: Templates::parse(&[
                "plant/+site/+line/+sensor_id/+kind",
                "lab/+room/+sensor_id",
            ])
            .unwrap(),
            ..Limits::default()
        }
    }

    #[test]
    fn a_templated_topic_gives_sensor_id_kind_and_tags() {
        let limits = templated();
        let d = decoded(
            "plant/berlin/l2/press-4/temperature",
            r#"{"value":21.5,"timestamp":"2024-05-01T09:00:00Z"}"#,
            &limits,
        );
        let r = &d.readings[0];
        assert_eq!(
            (r.sensor_id().as_str(), r.kind().as_str(), r.value()),
            ("press-4", "temperature", 21.5)
        );
        let tags: Vec<(&str, &str)> = r.tags().iter().collect();
        assert_eq!(tags, [("site", "berlin"), ("line", "l2")]);
        // A payload sensor_id may repeat the topic's, not contradict it.
        let same = decoded(
            "plant/berlin/l2/press-4/temperature",
            r#"{"sensor_id":"press-4","value":1,"timestamp":"2024-05-01T09:00:00Z"}"#,
            &limits,
        );
        assert_eq!(same.readings.len(), 1);
        let other = decode(
            &captured(
                "plant/berlin/l2/press-4/temperature",
                br#"{"sensor_id":"press-5","value":1,"timestamp":"2024-05-01T09:00:00Z"}"#,
            ),
            &limits,
        )
        .unwrap_err();
        assert_eq!(other.reason, Reason::SensorIdConflict);
        assert!(
            other.message.contains("press-5") && other.message.contains("press-4"),
            "{}",
            other.message
        );
        // A batch on a templated topic: each element's identity from the topic.
        let d = decoded(
            "plant/berlin/l2/press-4/temperature",
            r#"[{"value":1,"timestamp":"2024-05-01T09:00:00Z"},{"value":2,"timestamp":"2024-05-01T09:00:01Z"},{"sensor_id":"x","value":3,"timestamp":"2024-05-01T09:00:02Z"}]"#,
            &limits,
        );
        assert_eq!(d.readings.len(), 2);
        assert_eq!(d.rejected[0].0, 2);
        assert_eq!(d.rejected[0].1.reason, Reason::SensorIdConflict);
        // Without +kind: the values form, or a dead letter that says so.
        let d = decoded(
            "lab/r1/probe-1",
            r#"{"timestamp":"2024-05-01T09:00:00Z","values":{"temperature":20,"humidity":40}}"#,
            &limits,
        );
        assert_eq!(d.readings.len(), 2);
        assert_eq!(
            d.readings[1].tags().iter().collect::<Vec<_>>(),
            [("room", "r1")]
        );
        let e = decode(
            &captured(
                "lab/r1/probe-1",
                br#"{"value":1,"timestamp":"2024-05-01T09:00:00Z"}"#,
            ),
            &limits,
        )
        .unwrap_err();
        assert_eq!(e.reason, Reason::MissingField);
        assert!(e.message.contains("+kind"), "{}", e.message);
        let e = decode(
            &captured(
                "lab/r1/probe-1",
                br#"[{"value":1,"timestamp":"2024-05-01T09:00:00Z"},{"value":2,"timestamp":"2024-05-01T09:00:00Z"}]"#,
            ),
            &limits,
        )
        .unwrap_err();
        assert_eq!(
            e.reason,
            Reason::MissingField,
            "one dead letter, not one per element"
        );
        // Bad levels are the topic's fault.
        let good = br#"{"value":1,"timestamp":"2024-05-01T09:00:00Z"}"#;
        for (topic, expected) in [
            ("plant/berlin/l2//temperature", Reason::SensorIdInvalid),
            ("plant/berlin/l2/p/", Reason::TopicInvalid),
            ("plant//l2/p/temperature", Reason::TopicInvalid),
            ("plant/berlin/l2/p/t/extra", Reason::TopicInvalid),
        ] {
            assert_eq!(
                decode(&captured(topic, good), &limits).unwrap_err().reason,
                expected,
                "{topic}"
            );
        }
        // sensors/ works beside the templates, exactly as before.
        let r = decoded(
            "sensors/t",
            r#"{"sensor_id":"s","value":1,"timestamp":"2024-05-01T09:00:00Z"}"#,
            &limits,
        );
        assert!(r.readings[0].tags().is_empty());
    }

    #[test]
    fn the_sensor_ids_a_message_claims_are_the_ones_decode_stores() {
        let templates = templated().templates;
        let ids = |topic: &str, payload: &str| -> Vec<String> {
            claimed_sensor_ids(topic.as_bytes(), payload.as_bytes(), &templates)
                .into_iter()
                .map(Cow::into_owned)
                .collect()
        };
        assert_eq!(
            ids("sensors/t", r#"{"value":1,"sensor_id":"a\/b"}"#),
            ["a/b"]
        );
        assert!(ids("sensors/t", r#"{"sensor_id":7}"#).is_empty());
        assert!(ids("sensors/t", r#"{"sensor_id":"a","sensor_id":"b"}"#).is_empty());
        assert!(ids("sensors/t", "not json").is_empty());
        // Each element of a batch; an unreadable element claims nothing (decode rejects it).
        assert_eq!(
            ids(
                "sensors/t",
                r#"[{"sensor_id":"a"},{"sensor_id":1},{"sensor_id":"b","sensor_id":"c"},{"sensor_id":"d"}]"#
            ),
            ["a", "d"]
        );
        assert_eq!(
            ids("sensors/t", r#"{"sensor_id":"v","values":{"t":1}}"#),
            ["v"]
        );
        // A templated topic claims its level, whatever the payload says.
        assert_eq!(ids("plant/b/l/p-1/t", r#"{"sensor_id":"other"}"#), ["p-1"]);
        // Whatever decode stores, the claimed ids cover it.
        for (topic, payload) in [
            (
                "sensors/t",
                r#"[{"sensor_id":"a","value":1,"timestamp":"2024-01-01"},{"sensor_id":"b","value":1,"timestamp":"2024-01-01"}]"#,
            ),
            ("plant/b/l/p-1/t", r#"{"value":1,"timestamp":"2024-01-01"}"#),
        ] {
            let stored = decode(&captured(topic, payload.as_bytes()), &templated())
                .unwrap()
                .readings;
            let claimed = ids(topic, payload);
            assert!(
                stored
                    .iter()
                    .all(|r| claimed.iter().any(|c| c == r.sensor_id().as_str())),
                "{payload}"
            );
        }
    }

    #[test]
    fn templated_topics_are_captured_beside_sensors() {
        let templates = templated().templates;
        assert!(is_captured(b"sensors/t", &templates));
        assert!(is_captured(b"sensors", &templates));
        assert!(is_captured(b"plant/a/b/c/d", &templates));
        assert!(!is_captured(b"plant/a/b/c", &templates));
        assert!(!is_captured(b"other/t", &templates));
        assert!(!is_captured(b"plant/a/b/c/d", &Templates::default()));
    }
}
