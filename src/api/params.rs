//! Query parameters as the OpenAPI document declares them and as handlers receive them: dates,
//! chart times, time zones, cursors. Each type parses exactly what its schema promises, so a
//! request the document allows is never refused, and one it forbids names the parameter.

use std::borrow::Cow;

use poem_openapi::Enum;
use poem_openapi::registry::{MetaSchema, MetaSchemaRef};
use poem_openapi::types::{ParseError, ParseFromParameter, ParseResult, Type};

use crate::domain::{Reading, Reason, Timestamp};
use crate::store::{Order, RangeCursor, Stat};

/// Epoch milliseconds accepted where a time may be a number (up to the year 2286).
const EPOCH_MS_PATTERN: &str = "^[0-9]{1,13}$";

macro_rules! string_param {
    ($ty:ident, $name:literal, $schema:expr, $parse:expr) => {
        impl Type for $ty {
            const IS_REQUIRED: bool = true;
            type RawValueType = Self;
            type RawElementValueType = Self;

            fn name() -> Cow<'static, str> {
                $name.into()
            }

            fn schema_ref() -> MetaSchemaRef {
                MetaSchemaRef::Inline(Box::new($schema))
            }

            fn as_raw_value(&self) -> Option<&Self> {
                Some(self)
            }

            fn raw_element_iter<'a>(&'a self) -> Box<dyn Iterator<Item = &'a Self> + 'a> {
                Box::new(std::iter::once(self))
            }
        }

        impl ParseFromParameter for $ty {
            fn parse_from_parameter(value: &str) -> ParseResult<Self> {
                let parse: fn(&str) -> Result<$ty, String> = $parse;
                parse(value).map_err(ParseError::custom)
            }
        }
    };
}

/// An instant: RFC 3339 (`2024-05-01T12:00:00Z`, `2024-05-01T14:00:00+02:00`), or naive ISO 8601
/// read as UTC (`2024-05-01T12:00:00.123456`, `2024-05-01`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DateTimeParam(pub Timestamp);

fn date_time_schema() -> MetaSchema {
    MetaSchema {
        format: Some("date-time"),
        example: Some("2026-11-27T10:15:00Z".into()),
        ..MetaSchema::new("string")
    }
}

string_param!(DateTimeParam, "date-time", date_time_schema(), |text| {
    Timestamp::parse(text)
        .map(DateTimeParam)
        .map_err(|e| e.to_string())
});

/// A chart's time: epoch milliseconds (Grafana's `${__from}`) or RFC 3339.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChartTime(pub Timestamp);

fn chart_time_schema() -> MetaSchema {
    MetaSchema {
        any_of: vec![
            MetaSchemaRef::Inline(Box::new(date_time_schema())),
            MetaSchemaRef::Inline(Box::new(MetaSchema {
                pattern: Some(EPOCH_MS_PATTERN.to_owned()),
                example: Some("1764238500000".into()),
                ..MetaSchema::new("string")
            })),
        ],
        example: Some("1764238500000".into()),
        ..MetaSchema::new("string")
    }
}

string_param!(ChartTime, "chart-time", chart_time_schema(), |text| {
    if !text.is_empty() && text.len() <= 13 && text.bytes().all(|b| b.is_ascii_digit()) {
        return text
            .parse()
            .ok()
            .and_then(Timestamp::from_millis)
            .map(ChartTime)
            .ok_or_else(|| format!("{text} is not a time in epoch milliseconds"));
    }
    Timestamp::parse(text)
        .map(ChartTime)
        .map_err(|e| format!("{e}; epoch milliseconds are accepted too"))
});

/// An IANA time zone name (`Europe/Berlin`) or `UTC`: the document lists every name known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Zone(pub String);

fn zone_names() -> Vec<String> {
    let mut names: Vec<String> = jiff::tz::db()
        .available()
        .map(|name| name.as_str().to_owned())
        .collect();
    if !names.iter().any(|n| n == "UTC") {
        names.push("UTC".to_owned());
    }
    names.sort_unstable();
    names
}

fn zone_schema() -> MetaSchema {
    MetaSchema {
        enum_items: zone_names().into_iter().map(Into::into).collect(),
        example: Some("Europe/Berlin".into()),
        ..MetaSchema::new("string")
    }
}

string_param!(Zone, "time-zone", zone_schema(), |text| {
    jiff::tz::TimeZone::get(text)
        .map(|_| Zone(text.to_owned()))
        .map_err(|_| format!("'{text}' is not an IANA time zone name such as Europe/Berlin"))
});

impl Zone {
    pub fn time_zone(&self) -> jiff::tz::TimeZone {
        jiff::tz::TimeZone::get(&self.0).unwrap_or(jiff::tz::TimeZone::UTC)
    }
}

/// A dead letter's reason code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReasonParam(pub Reason);

fn reason_schema() -> MetaSchema {
    MetaSchema {
        enum_items: Reason::ALL.iter().map(|r| r.code().into()).collect(),
        ..MetaSchema::new("string")
    }
}

string_param!(ReasonParam, "dead-letter-reason", reason_schema(), |text| {
    Reason::from_code(text).map(ReasonParam).ok_or_else(|| {
        let known: Vec<&str> = Reason::ALL.iter().map(|r| r.code()).collect();
        format!("'{text}' is not one of: {}", known.join(", "))
    })
});

/// A statistic of `/readings/aggregate` (`fn=min,max`). An empty item (`fn=`) names none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatChoice(pub Option<Stat>);

fn stat_schema() -> MetaSchema {
    MetaSchema {
        enum_items: Stat::ALL.iter().map(|s| s.name().into()).collect(),
        ..MetaSchema::new("string")
    }
}

string_param!(StatChoice, "statistic", stat_schema(), |text| {
    if text.is_empty() {
        return Ok(StatChoice(None));
    }
    Stat::ALL
        .into_iter()
        .find(|s| s.name() == text)
        .map(|s| StatChoice(Some(s)))
        .ok_or_else(|| format!("'{text}' is not one of: min, max, avg, count, first, last"))
});

impl poem_openapi::types::ToJSON for StatChoice {
    fn to_json(&self) -> Option<serde_json::Value> {
        self.0.map(|s| s.name().into())
    }
}

/// Sort order of readings by time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Enum)]
#[oai(rename_all = "lowercase")]
pub enum OrderParam {
    #[default]
    Asc,
    Desc,
}

impl From<OrderParam> for Order {
    fn from(o: OrderParam) -> Self {
        match o {
            OrderParam::Asc => Order::Asc,
            OrderParam::Desc => Order::Desc,
        }
    }
}

/// `<ms>:<kind, percent-encoded>:<sensor id>`: the kind is encoded so that it holds no `:`,
/// and the sensor id, which may, comes last.
pub fn range_cursor(last: &Reading) -> String {
    format!(
        "{}:{}:{}",
        last.timestamp().as_millis(),
        encode(last.kind().as_str()),
        last.sensor_id()
    )
}

/// Reads any text `CURSOR_PATTERN` allows (it only marks a place in the order).
pub fn parse_range_cursor(text: &str) -> Option<RangeCursor> {
    let (millis, rest) = text.split_once(':')?;
    let (kind, id) = rest.split_once(':')?;
    Some(RangeCursor {
        millis: millis.parse().ok()?,
        kind: decode_percent(kind),
        sensor_id: id.to_owned(),
    })
}

/// The inverse of `encode`; a malformed escape stays as it is, invalid UTF-8 is replaced.
pub fn decode_percent(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
pub fn encode(text: &str) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Kind, SensorId};

    #[test]
    fn encodes_query_values() {
        assert_eq!(
            encode("2024-05-01T12:00:00+02:00"),
            "2024-05-01T12%3A00%3A00%2B02%3A00"
        );
        assert_eq!(encode("a b/ü"), "a%20b%2F%C3%BC");
        assert_eq!(decode_percent("a%20b%2F%C3%BC"), "a b/ü");
        assert_eq!(decode_percent("%zz%4"), "%zz%4");
    }

    #[test]
    fn range_cursors_round_trip_and_any_pattern_match_parses() {
        let r = Reading::new(
            SensorId::parse("sensor:with:colons").unwrap(),
            Kind::parse("odd:kind ü").unwrap(),
            1.0,
            Timestamp::from_millis(1_714_557_600_000).unwrap(),
        )
        .unwrap();
        let c = parse_range_cursor(&range_cursor(&r)).unwrap();
        assert_eq!(c.sensor_id, "sensor:with:colons");
        assert_eq!(c.kind, "odd:kind ü");
        assert_eq!(c.millis, 1_714_557_600_000);
        assert!(parse_range_cursor("nope").is_none());
        assert!(parse_range_cursor("12:temperature").is_none());
        assert!(parse_range_cursor("12::").is_some());
        assert!(parse_range_cursor("-5:%zz:\u{1}").is_some());
    }

    #[test]
    fn chart_times_are_epoch_ms_or_rfc_3339() {
        let parse = |t: &str| ChartTime::parse_from_parameter(t).map(|c| c.0.as_millis());
        assert_eq!(parse("1764238500000").ok(), Some(1_764_238_500_000));
        assert_eq!(parse("1970-01-01T00:00:01Z").ok(), Some(1000));
        assert!(parse("soon").is_err());
    }

    #[test]
    fn zones_are_iana_names() {
        assert!(Zone::parse_from_parameter("Europe/Berlin").is_ok());
        assert!(Zone::parse_from_parameter("UTC").is_ok());
        assert!(Zone::parse_from_parameter("Mars/Olympus").is_err());
        assert!(zone_names().len() > 300);
    }
}
