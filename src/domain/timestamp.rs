//! Instants as sensorhub stores them: UTC, millisecond precision, the unit of BSON Date.
//!
//! Parsing accepts what devices and people actually send: RFC 3339 with an offset, and the naive
//! ISO 8601 form of Python's `datetime.isoformat()`, which is read as UTC unless a `NaiveZone`
//! says in which zone such devices keep their clocks (`datetime.now()` is local time). Anything
//! finer than a millisecond is truncated (floored), so a reading and its replay always map to
//! the same instant.

use std::fmt;

use time::{Date, Month, OffsetDateTime, Time, UtcOffset};

/// Milliseconds since the Unix epoch, UTC, within years 0000..=9999 (what RFC 3339 can print).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(i64);

/// Why a text is not a timestamp. The message is written for the person who sent it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TimestampError(String);

const MIN_MILLIS: i64 = -62_167_219_200_000; // 0000-01-01T00:00:00Z
const MAX_MILLIS: i64 = 253_402_300_799_999; // 9999-12-31T23:59:59.999Z

impl Timestamp {
    /// The earliest instant there is: 0000-01-01T00:00:00Z.
    pub const MIN: Timestamp = Timestamp(MIN_MILLIS);
    /// The latest instant there is: 9999-12-31T23:59:59.999Z.
    pub const MAX: Timestamp = Timestamp(MAX_MILLIS);

    /// The instant `millis` after the epoch, if it can be printed as RFC 3339.
    pub fn from_millis(millis: i64) -> Option<Self> {
        (MIN_MILLIS..=MAX_MILLIS)
            .contains(&millis)
            .then_some(Self(millis))
    }

    /// The current instant, truncated to the millisecond.
    pub fn now() -> Self {
        Self::from_datetime(OffsetDateTime::now_utc())
    }

    pub fn as_millis(self) -> i64 {
        self.0
    }

    /// `self` moved by `millis` (negative goes back), clamped to the printable range.
    pub fn saturating_add_millis(self, millis: i64) -> Self {
        Self(self.0.saturating_add(millis).clamp(MIN_MILLIS, MAX_MILLIS))
    }

    fn from_datetime(at: OffsetDateTime) -> Self {
        let millis = at.unix_timestamp_nanos().div_euclid(1_000_000);
        // An OffsetDateTime built by `parse` or `now_utc` lies within years -9999..=9999, so the
        // quotient fits an i64; the clamp only matters for years before 0000, which `parse`
        // rejects earlier.
        Self(
            i64::try_from(millis)
                .unwrap_or(MIN_MILLIS)
                .clamp(MIN_MILLIS, MAX_MILLIS),
        )
    }

    /// Parses RFC 3339 (`2024-05-01T12:00:00.5+02:00`, `...Z`), naive ISO 8601 read as UTC
    /// (`2024-05-01T12:00:00.123456`, with `T` or a space), and a bare date (midnight UTC).
    pub fn parse(text: &str) -> Result<Self, TimestampError> {
        Parser::new(text).timestamp(&NaiveZone::UTC)
    }

    /// Like `parse`, but a time without an offset (and a bare date) is local time in `zone`.
    pub fn parse_in(text: &str, zone: &NaiveZone) -> Result<Self, TimestampError> {
        Parser::new(text).timestamp(zone)
    }
}

/// The zone in which a timestamp without an offset is read: UTC, or an IANA zone such as
/// `Europe/Berlin`, daylight-saving time included. A local time that a clock change skips
/// (spring forward) is read as if the clock had not changed yet, and one that occurs twice
/// (fall back) as its first occurrence: the "compatible" rule of RFC 5545 and Temporal.
#[derive(Clone, Debug)]
pub struct NaiveZone {
    name: String,
    zone: Option<jiff::tz::TimeZone>,
}

impl NaiveZone {
    pub const UTC: NaiveZone = NaiveZone {
        name: String::new(),
        zone: None,
    };

    /// `UTC` (or `Z`), or an IANA zone name.
    pub fn parse(name: &str) -> Result<Self, TimestampError> {
        let name = name.trim();
        if name.is_empty() || name.eq_ignore_ascii_case("utc") || name == "Z" {
            return Ok(Self::UTC);
        }
        let zone = jiff::tz::TimeZone::get(name).map_err(|e| {
            TimestampError(format!(
                "'{name}' is not a time zone ({e}); use UTC or an IANA name such as Europe/Berlin"
            ))
        })?;
        Ok(Self {
            name: name.to_owned(),
            zone: Some(zone),
        })
    }

    pub fn name(&self) -> &str {
        if self.zone.is_none() {
            "UTC"
        } else {
            &self.name
        }
    }

    fn resolve(&self, date: Date, time: Time) -> Option<OffsetDateTime> {
        let Some(zone) = &self.zone else {
            return Some(date.with_time(time).assume_offset(UtcOffset::UTC));
        };
        let civil = jiff::civil::DateTime::new(
            i16::try_from(date.year()).ok()?,
            i8::try_from(u8::from(date.month())).ok()?,
            i8::try_from(date.day()).ok()?,
            i8::try_from(time.hour()).ok()?,
            i8::try_from(time.minute()).ok()?,
            i8::try_from(time.second()).ok()?,
            i32::try_from(time.nanosecond()).ok()?,
        )
        .ok()?;
        // The instant, not just the offset: in a gap the civil time itself moves forward.
        let instant = zone
            .to_ambiguous_zoned_datetime(civil)
            .compatible()
            .ok()?
            .timestamp();
        OffsetDateTime::from_unix_timestamp_nanos(instant.as_nanosecond()).ok()
    }
}

impl PartialEq for NaiveZone {
    fn eq(&self, other: &Self) -> bool {
        self.name() == other.name()
    }
}

impl Eq for NaiveZone {}

impl Default for NaiveZone {
    fn default() -> Self {
        Self::UTC
    }
}

impl fmt::Display for Timestamp {
    /// RFC 3339 in UTC with milliseconds, e.g. `2024-05-01T10:00:00.500Z`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let days = self.0.div_euclid(86_400_000);
        let ms_of_day = self.0.rem_euclid(86_400_000);
        let (year, month, day) = civil_from_days(days);
        let (h, rem) = (ms_of_day / 3_600_000, ms_of_day % 3_600_000);
        let (m, rem) = (rem / 60_000, rem % 60_000);
        let (s, ms) = (rem / 1000, rem % 1000);
        write!(
            f,
            "{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{ms:03}Z"
        )
    }
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar
/// (H. Hinnant's `civil_from_days`); exact over the whole `Timestamp` range.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

struct Parser<'a> {
    text: &'a str,
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Parser<'a> {
    fn new(text: &'a str) -> Self {
        Self {
            text,
            bytes: text.as_bytes(),
            pos: 0,
        }
    }

    fn fail(&self, what: &str) -> TimestampError {
        let shown: String = self.text.chars().take(64).collect();
        TimestampError(format!(
            "'{shown}' is not a timestamp: {what} (expected RFC 3339 such as \
             2024-05-01T12:00:00Z, or naive ISO 8601 such as 2024-05-01T12:00:00.123, read as UTC)"
        ))
    }

    fn digits(&mut self, count: usize, what: &str) -> Result<u32, TimestampError> {
        let end = self.pos + count;
        let Some(chunk) = self.bytes.get(self.pos..end) else {
            return Err(self.fail(&format!("{what} needs {count} digits")));
        };
        if !chunk.iter().all(u8::is_ascii_digit) {
            return Err(self.fail(&format!("{what} needs {count} digits")));
        }
        self.pos = end;
        Ok(chunk
            .iter()
            .fold(0, |acc, d| acc * 10 + u32::from(d - b'0')))
    }

    fn expect(&mut self, byte: u8, what: &str) -> Result<(), TimestampError> {
        if self.peek() == Some(byte) {
            self.pos += 1;
            Ok(())
        } else {
            Err(self.fail(what))
        }
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    fn timestamp(mut self, zone: &NaiveZone) -> Result<Timestamp, TimestampError> {
        let text = self.text.trim();
        if text.is_empty() {
            return Err(self.fail("it is empty"));
        }
        self.text = text;
        self.bytes = text.as_bytes();

        let year = self.digits(4, "the year")?;
        self.expect(b'-', "a '-' must follow the year")?;
        let month = self.digits(2, "the month")?;
        self.expect(b'-', "a '-' must follow the month")?;
        let day = self.digits(2, "the day")?;
        let month = u8::try_from(month)
            .ok()
            .and_then(|m| Month::try_from(m).ok())
            .ok_or_else(|| self.fail("the month must be 01 to 12"))?;
        let date = i32::try_from(year)
            .ok()
            .and_then(|y| u8::try_from(day).ok().map(|d| (y, d)))
            .and_then(|(y, d)| Date::from_calendar_date(y, month, d).ok())
            .ok_or_else(|| self.fail("that day does not exist"))?;

        let mut time = Time::MIDNIGHT;
        let mut offset = None;
        if let Some(b'T' | b't' | b' ') = self.peek() {
            self.pos += 1;
            time = self.time_of_day()?;
            offset = self.offset()?;
        }
        if self.pos != self.bytes.len() {
            return Err(self.fail("unexpected text after the time"));
        }
        let at = match offset {
            Some(offset) => date.with_time(time).assume_offset(offset),
            None => zone
                .resolve(date, time)
                .ok_or_else(|| self.fail("it lies outside the range of the time zone database"))?,
        };
        Timestamp::from_millis(Timestamp::from_datetime(at).0)
            .filter(|_| (0..=9999).contains(&at.to_offset(UtcOffset::UTC).year()))
            .ok_or_else(|| self.fail("it lies outside years 0000 to 9999"))
    }

    fn time_of_day(&mut self) -> Result<Time, TimestampError> {
        let hour = self.digits(2, "the hour")?;
        self.expect(b':', "a ':' must follow the hour")?;
        let minute = self.digits(2, "the minute")?;
        let (mut second, mut nanos) = (0, 0);
        if self.peek() == Some(b':') {
            self.pos += 1;
            second = self.digits(2, "the second")?;
            if let Some(b'.' | b',') = self.peek() {
                self.pos += 1;
                let start = self.pos;
                while self.peek().is_some_and(|b| b.is_ascii_digit()) {
                    self.pos += 1;
                }
                let fraction = &self.bytes[start..self.pos];
                if fraction.is_empty() {
                    return Err(self.fail("a fraction of a second needs digits"));
                }
                // Digits past the nanosecond cannot change the millisecond we keep.
                nanos = fraction
                    .iter()
                    .chain(std::iter::repeat(&b'0'))
                    .take(9)
                    .fold(0, |acc, d| acc * 10 + u32::from(d - b'0'));
            }
        }
        if second == 60 {
            return Err(self.fail("leap seconds (:60) are not supported"));
        }
        let (Ok(h), Ok(m), Ok(s)) = (
            u8::try_from(hour),
            u8::try_from(minute),
            u8::try_from(second),
        ) else {
            return Err(self.fail("the time of day is out of range"));
        };
        Time::from_hms_nano(h, m, s, nanos)
            .map_err(|_| self.fail("the time of day is out of range"))
    }

    /// The offset, `None` when the time is naive.
    fn offset(&mut self) -> Result<Option<UtcOffset>, TimestampError> {
        match self.peek() {
            None => Ok(None),
            Some(b'Z' | b'z') => {
                self.pos += 1;
                Ok(Some(UtcOffset::UTC))
            }
            Some(sign @ (b'+' | b'-')) => {
                self.pos += 1;
                let hours = self.digits(2, "the offset hours")?;
                let mut minutes = 0;
                if self.peek() == Some(b':') {
                    self.pos += 1;
                    minutes = self.digits(2, "the offset minutes")?;
                } else if self.peek().is_some_and(|b| b.is_ascii_digit()) {
                    minutes = self.digits(2, "the offset minutes")?;
                }
                if hours > 23 || minutes > 59 {
                    return Err(self.fail("the offset is out of range"));
                }
                let seconds = i32::try_from(hours * 3600 + minutes * 60).unwrap_or(0);
                let seconds = if sign == b'-' { -seconds } else { seconds };
                UtcOffset::from_whole_seconds(seconds)
                    .map(Some)
                    .map_err(|_| self.fail("the offset is out of range"))
            }
            Some(_) => Err(self.fail("expected an offset (Z, +hh:mm or -hh:mm) or the end")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(text: &str) -> i64 {
        match Timestamp::parse(text) {
            Ok(t) => t.as_millis(),
            Err(e) => panic!("{text}: {e}"),
        }
    }

    #[test]
    fn rfc3339_forms_agree() {
        let utc = ms("2024-05-01T10:00:00Z");
        assert_eq!(utc, 1_714_557_600_000);
        assert_eq!(ms("2024-05-01T12:00:00+02:00"), utc);
        assert_eq!(ms("2024-05-01T05:30:00-04:30"), utc);
        assert_eq!(ms("2024-05-01t10:00:00z"), utc);
        assert_eq!(ms("2024-05-01 10:00:00+00:00"), utc);
        assert_eq!(ms("2024-05-01T12:00:00+0200"), utc);
    }

    #[test]
    fn naive_iso_is_utc() {
        assert_eq!(ms("2024-05-01T10:00:00"), ms("2024-05-01T10:00:00Z"));
        // What Python's datetime.now().isoformat() prints.
        assert_eq!(
            ms("2024-05-01T10:00:00.123456"),
            ms("2024-05-01T10:00:00Z") + 123
        );
        assert_eq!(ms("2024-05-01"), ms("2024-05-01T00:00:00Z"));
        assert_eq!(ms("2024-05-01T10:00"), ms("2024-05-01T10:00:00Z"));
    }

    #[test]
    fn naive_times_can_be_local_to_a_zone() {
        let berlin = NaiveZone::parse("Europe/Berlin").unwrap();
        let at = |text: &str| Timestamp::parse_in(text, &berlin).unwrap().as_millis();
        // Summer (UTC+2) and winter (UTC+1).
        assert_eq!(at("2024-07-01T12:00:00"), ms("2024-07-01T10:00:00Z"));
        assert_eq!(at("2024-01-15T12:00:00.5"), ms("2024-01-15T11:00:00.5Z"));
        assert_eq!(at("2024-01-15"), ms("2024-01-14T23:00:00Z"));
        // An explicit offset is never reinterpreted.
        assert_eq!(at("2024-07-01T12:00:00Z"), ms("2024-07-01T12:00:00Z"));
        // 2024-03-31 02:30 does not exist in Berlin; 2024-10-27 02:30 occurs twice.
        assert_eq!(at("2024-03-31T02:30:00"), ms("2024-03-31T01:30:00Z"));
        assert_eq!(at("2024-10-27T02:30:00"), ms("2024-10-27T00:30:00Z"));
        assert_eq!(NaiveZone::parse("utc").unwrap(), NaiveZone::UTC);
        assert_eq!(berlin.name(), "Europe/Berlin");
        assert!(NaiveZone::parse("Mars/Olympus").is_err());
        let utc = Timestamp::parse_in("2024-07-01T12:00:00", &NaiveZone::UTC).unwrap();
        assert_eq!(utc.as_millis(), ms("2024-07-01T12:00:00Z"));
    }

    #[test]
    fn fractions_truncate_to_the_millisecond() {
        assert_eq!(ms("1970-01-01T00:00:00.0019Z"), 1);
        assert_eq!(ms("1970-01-01T00:00:00.999999999999Z"), 999);
        // Before the epoch the instant is floored, never rounded towards zero.
        assert_eq!(ms("1969-12-31T23:59:59.9995Z"), -1);
    }

    #[test]
    fn rejects_what_is_not_a_time() {
        for bad in [
            "",
            "yesterday",
            "2024-13-01T00:00:00Z",
            "2024-02-30T00:00:00Z",
            "2024-05-01T24:00:00Z",
            "2024-05-01T10:00:60Z",
            "2024-05-01T10:00:00+24:00",
            "2024-05-01T10:00:00.Z",
            "2024-05-01T10:00:00Zjunk",
            "24-05-01T10:00:00Z",
            "+2024-05-01T10:00:00Z",
            "2024-05-01T10",
        ] {
            let err = Timestamp::parse(bad).expect_err(bad);
            assert!(err.to_string().contains("not a timestamp"), "{bad}: {err}");
        }
    }

    #[test]
    fn year_zero_offset_below_range_is_rejected() {
        assert!(Timestamp::parse("0000-01-01T00:00:00+01:00").is_err());
        assert!(Timestamp::parse("0000-01-01T00:00:00Z").is_ok());
        assert!(Timestamp::parse("9999-12-31T23:59:59.999Z").is_ok());
        assert!(Timestamp::parse("9999-12-31T23:59:59.999-01:00").is_err());
    }

    #[test]
    fn display_is_rfc3339_utc_millis() {
        let t = Timestamp::parse("2024-05-01T12:00:00.5+02:00").unwrap_or(Timestamp(0));
        assert_eq!(t.to_string(), "2024-05-01T10:00:00.500Z");
        assert_eq!(Timestamp(-1).to_string(), "1969-12-31T23:59:59.999Z");
        assert_eq!(
            Timestamp::from_millis(MIN_MILLIS).map(|t| t.to_string()),
            Some("0000-01-01T00:00:00.000Z".to_owned())
        );
        assert_eq!(
            Timestamp::from_millis(MAX_MILLIS).map(|t| t.to_string()),
            Some("9999-12-31T23:59:59.999Z".to_owned())
        );
        assert_eq!(Timestamp::from_millis(MAX_MILLIS + 1), None);
    }

    #[test]
    fn display_parses_back_to_the_same_instant() {
        for millis in [
            0,
            1,
            -1,
            1_714_557_600_123,
            MIN_MILLIS,
            MAX_MILLIS,
            951_782_400_000,
        ] {
            let Some(t) = Timestamp::from_millis(millis) else {
                panic!("{millis} out of range")
            };
            assert_eq!(ms(&t.to_string()), millis, "{t}");
        }
    }
}
