//! A reading and the names it carries. Each type here can only be built by parsing, so a value of
//! it is valid wherever it travels: storage and cache never re-check.

use std::fmt;

use super::Timestamp;

/// The longest sensor id accepted, in bytes.
pub const MAX_SENSOR_ID_BYTES: usize = 128;
/// The longest kind (last topic level) accepted, in bytes.
pub const MAX_KIND_BYTES: usize = 64;

/// A device's own name for itself: 1 to 128 bytes of UTF-8 without control characters.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SensorId(String);

impl SensorId {
    pub fn parse(text: &str) -> Result<Self, String> {
        check_name(text, MAX_SENSOR_ID_BYTES).map(|()| Self(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// FNV-1a (32 bits) of the id: the same on every run, machine and version (the std hasher
    /// is seeded per process). What spreads sensors over Redis Cluster groups and writer lanes.
    pub fn stable_hash(&self) -> u32 {
        (self.0.bytes()).fold(0x811c_9dc5_u32, |h, b| {
            (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
        })
    }
}

/// Ids order as their text does, so maps keyed by id can be searched by text.
impl std::borrow::Borrow<str> for SensorId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SensorId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a sensor measures, taken from the last level of its topic (`sensors/<kind>`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Kind(String);

impl Kind {
    pub fn parse(text: &str) -> Result<Self, String> {
        check_name(text, MAX_KIND_BYTES)?;
        if text.contains(['+', '#', '/']) {
            return Err(format!("'{text}' contains a wildcard or level separator"));
        }
        Ok(Self(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn check_name(text: &str, max_bytes: usize) -> Result<(), String> {
    if text.is_empty() {
        return Err("it is empty".to_owned());
    }
    if text.len() > max_bytes {
        return Err(format!(
            "it is {} bytes long, the limit is {max_bytes}",
            text.len()
        ));
    }
    if text.trim().is_empty() {
        return Err("it is only whitespace".to_owned());
    }
    if let Some(c) = text.chars().find(|c| c.is_control()) {
        return Err(format!(
            "it contains the control character U+{:04X}",
            u32::from(c)
        ));
    }
    Ok(())
}

/// Names and values a topic template took from a reading's topic (`+site` in
/// `plant/+site/+sensor_id/+kind`), in the template's order. They describe a reading; they are
/// not part of its identity.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tags(Vec<(String, String)>);

impl Tags {
    pub fn new(pairs: Vec<(String, String)>) -> Self {
        Self(pairs)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

impl serde::Serialize for Tags {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap as _;
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

impl<'de> serde::Deserialize<'de> for Tags {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Tags;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map of tag names to strings")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Tags, A::Error> {
                let mut pairs = Vec::new();
                while let Some(pair) = map.next_entry::<String, String>()? {
                    pairs.push(pair);
                }
                Ok(Tags(pairs))
            }
        }
        deserializer.deserialize_map(Visitor)
    }
}

/// One measurement: a finite value a sensor took at a device-reported instant.
#[derive(Clone, Debug, PartialEq)]
pub struct Reading {
    sensor_id: SensorId,
    kind: Kind,
    value: f64,
    timestamp: Timestamp,
    tags: Tags,
}

impl Reading {
    /// `None` when `value` is NaN or infinite: those are not readings.
    pub fn new(sensor_id: SensorId, kind: Kind, value: f64, timestamp: Timestamp) -> Option<Self> {
        value.is_finite().then_some(Self {
            sensor_id,
            kind,
            value,
            timestamp,
            tags: Tags::default(),
        })
    }

    /// The reading with `tags` (from its topic's template); its identity stays the same.
    pub fn with_tags(mut self, tags: Tags) -> Self {
        self.tags = tags;
        self
    }

    pub fn tags(&self) -> &Tags {
        &self.tags
    }

    pub fn sensor_id(&self) -> &SensorId {
        &self.sensor_id
    }

    pub fn kind(&self) -> &Kind {
        &self.kind
    }

    pub fn value(&self) -> f64 {
        self.value
    }

    pub fn timestamp(&self) -> Timestamp {
        self.timestamp
    }

    /// The public JSON form of a reading, as the HTTP API returns it and the cache keeps it:
    /// `{"sensor_id":..,"kind":..,"value":..,"timestamp":"<RFC 3339 UTC>"}`, with `"tags":{..}`
    /// last when the reading has any.
    pub fn to_json(&self) -> String {
        #[derive(serde::Serialize)]
        struct Json<'a> {
            sensor_id: &'a str,
            kind: &'a str,
            value: f64,
            timestamp: String,
            #[serde(skip_serializing_if = "Tags::is_empty")]
            tags: &'a Tags,
        }
        let json = Json {
            sensor_id: self.sensor_id.as_str(),
            kind: self.kind.as_str(),
            value: self.value,
            timestamp: self.timestamp.to_string(),
            tags: &self.tags,
        };
        // Serializing strings and a finite float cannot fail.
        serde_json::to_string(&json).unwrap_or_default()
    }

    /// The reading's identity, `<sensor id>|<kind>|<ms>`: a sensor has at most one reading of
    /// each kind per millisecond, so a redelivery or a replay maps to the same key and is stored
    /// once, while one device's temperature, humidity and pressure taken at one instant are
    /// three readings. `%` and `|` inside the id and kind are percent-escaped, so no two
    /// identities share a key (`a|b` + `c` and `a` + `b|c` would otherwise collide).
    pub fn key(&self) -> String {
        let mut key = String::with_capacity(self.sensor_id.0.len() + self.kind.0.len() + 16);
        escape_into(&mut key, self.sensor_id.as_str());
        key.push('|');
        escape_into(&mut key, self.kind.as_str());
        key.push('|');
        key.push_str(&self.timestamp.as_millis().to_string());
        key
    }
}

fn escape_into(out: &mut String, text: &str) {
    for c in text.chars() {
        match c {
            '%' => out.push_str("%25"),
            '|' => out.push_str("%7C"),
            c => out.push(c),
        }
    }
}

/// JSON texts of elements (such as `Reading::to_json`'s) joined into one JSON array.
pub fn json_array<S: AsRef<str>>(elements: &[S]) -> Vec<u8> {
    let len = elements.iter().map(|e| e.as_ref().len() + 1).sum::<usize>() + 2;
    let mut out = Vec::with_capacity(len);
    out.push(b'[');
    for (i, e) in elements.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(e.as_ref().as_bytes());
    }
    out.push(b']');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sensor_ids_are_checked() {
        assert!(SensorId::parse("temp-01").is_ok());
        assert!(SensorId::parse("Halle 3 / Ofen ü").is_ok());
        assert!(SensorId::parse(&"x".repeat(MAX_SENSOR_ID_BYTES)).is_ok());
        assert!(SensorId::parse(&"x".repeat(MAX_SENSOR_ID_BYTES + 1)).is_err());
        assert!(SensorId::parse("").is_err());
        assert!(SensorId::parse("   ").is_err());
        assert!(SensorId::parse("a\u{0}b").is_err());
        assert!(SensorId::parse("a\nb").is_err());
    }

    #[test]
    fn kinds_are_single_topic_levels() {
        assert!(Kind::parse("temperature").is_ok());
        assert!(Kind::parse("a/b").is_err());
        assert!(Kind::parse("#").is_err());
        assert!(Kind::parse("").is_err());
    }

    #[test]
    fn identity_is_sensor_kind_and_millisecond() {
        let at = Timestamp::from_millis(1_700_000_000_123).unwrap();
        let key = |id: &str, kind: &str| {
            Reading::new(
                SensorId::parse(id).unwrap(),
                Kind::parse(kind).unwrap(),
                1.0,
                at,
            )
            .unwrap()
            .key()
        };
        assert_eq!(
            key("bme-1", "temperature"),
            "bme-1|temperature|1700000000123"
        );
        assert_ne!(key("bme-1", "temperature"), key("bme-1", "humidity"));
        assert_ne!(key("a|b", "c"), key("a", "b|c"));
        assert_ne!(key("a%7Cb", "c"), key("a|b", "c"));
        assert_eq!(key("50%|x", "k"), "50%25%7Cx|k|1700000000123");
    }

    #[test]
    fn non_finite_values_are_not_readings() {
        let id = SensorId::parse("s").unwrap();
        let kind = Kind::parse("k").unwrap();
        let at = Timestamp::from_millis(0).unwrap();
        for v in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            assert!(Reading::new(id.clone(), kind.clone(), v, at).is_none());
        }
        let r = Reading::new(id, kind, -0.5, at).unwrap();
        assert_eq!(r.key(), "s|k|0");
        assert_eq!(json_array::<&str>(&[]), b"[]");
        assert_eq!(json_array(&["1", "{}"]), b"[1,{}]");
        assert_eq!(
            r.to_json(),
            r#"{"sensor_id":"s","kind":"k","value":-0.5,"timestamp":"1970-01-01T00:00:00.000Z"}"#
        );
    }

    #[test]
    fn tags_describe_a_reading_without_changing_its_identity() {
        let at = Timestamp::from_millis(0).unwrap();
        let plain = Reading::new(
            SensorId::parse("s").unwrap(),
            Kind::parse("k").unwrap(),
            1.0,
            at,
        )
        .unwrap();
        let tags = Tags::new(vec![
            ("site".into(), "b\"x".into()),
            ("line".into(), "2".into()),
        ]);
        let tagged = plain.clone().with_tags(tags.clone());
        assert_eq!(tagged.key(), plain.key());
        assert_ne!(tagged, plain);
        assert_eq!(
            tagged.to_json(),
            r#"{"sensor_id":"s","kind":"k","value":1.0,"timestamp":"1970-01-01T00:00:00.000Z","tags":{"site":"b\"x","line":"2"}}"#
        );
        let back: Tags = serde_json::from_str(r#"{"site":"b\"x","line":"2"}"#).unwrap();
        assert_eq!(back, tags, "order kept");
    }
}
