//! Calendar buckets in a time zone, the way MongoDB's `$dateTrunc` cuts them: a bucket starts at
//! a local wall-clock time (bins of minutes and hours counted from 2000-01-01 00:00 local, days
//! at local midnight), so a day bucket lasts 23 or 25 hours across a daylight-saving change.
//! Used to list the buckets a range holds, including those without readings.

use jiff::SignedDuration;
use jiff::civil::DateTime;
use jiff::tz::TimeZone;

use super::Timestamp;

/// The width of a bucket, in wall-clock units.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Interval {
    Minutes(i64),
    Hours(i64),
    Days,
}

impl Interval {
    /// `$dateTrunc`'s `unit` and `binSize`.
    pub fn unit_and_bin(self) -> (&'static str, i64) {
        match self {
            Interval::Minutes(n) => ("minute", n),
            Interval::Hours(n) => ("hour", n),
            Interval::Days => ("day", 1),
        }
    }

    fn truncate(self, civil: DateTime) -> Option<DateTime> {
        let reference = DateTime::constant(2000, 1, 1, 0, 0, 0, 0);
        let bin_secs = match self {
            Interval::Minutes(n) => n * 60,
            Interval::Hours(n) => n * 3600,
            Interval::Days => return Some(civil.date().to_datetime(jiff::civil::Time::midnight())),
        };
        let secs = civil.duration_since(reference).as_secs();
        let start = secs.div_euclid(bin_secs) * bin_secs;
        reference.checked_add(SignedDuration::from_secs(start)).ok()
    }

    fn next(self, civil: DateTime) -> Option<DateTime> {
        match self {
            Interval::Minutes(n) => civil.checked_add(SignedDuration::from_mins(n)).ok(),
            Interval::Hours(n) => civil.checked_add(SignedDuration::from_hours(n)).ok(),
            Interval::Days => civil
                .date()
                .tomorrow()
                .ok()
                .map(|d| d.to_datetime(civil.time())),
        }
    }
}

fn civil(t: Timestamp, zone: &TimeZone) -> Option<DateTime> {
    let at = jiff::Timestamp::from_millisecond(t.as_millis()).ok()?;
    Some(zone.to_datetime(at))
}

fn instant(civil: DateTime, zone: &TimeZone) -> Option<Timestamp> {
    let zoned = zone.to_ambiguous_zoned_datetime(civil).compatible().ok()?;
    Timestamp::from_millis(zoned.timestamp().as_millisecond())
}

/// The start of the bucket holding `t`.
pub fn bucket_start(t: Timestamp, interval: Interval, zone: &TimeZone) -> Option<Timestamp> {
    instant(interval.truncate(civil(t, zone)?)?, zone)
}

/// Where the bucket holding `t` ends: the start of the next one.
pub fn bucket_end(t: Timestamp, interval: Interval, zone: &TimeZone) -> Option<Timestamp> {
    let start = bucket_start(t, interval, zone)?;
    let mut wall = interval.truncate(civil(t, zone)?)?;
    loop {
        wall = interval.next(wall)?;
        let at = instant(wall, zone)?;
        if at > start {
            return Some(at);
        }
    }
}

/// The starts of every bucket that overlaps `start..=end`, oldest first; `None` when there
/// would be more than `max`.
pub fn bucket_starts(
    start: Timestamp,
    end: Timestamp,
    interval: Interval,
    zone: &TimeZone,
    max: usize,
) -> Option<Vec<Timestamp>> {
    let mut out: Vec<Timestamp> = Vec::new();
    if end < start {
        return Some(out);
    }
    let mut wall = interval.truncate(civil(start, zone)?)?;
    loop {
        // A wall time the clock skips (spring forward) lands an hour later, like `$dateTrunc`.
        let at = instant(wall, zone)?;
        if at > end {
            return Some(out);
        }
        if out.last().is_none_or(|last| *last < at) {
            if out.len() == max {
                return None;
            }
            out.push(at);
        }
        wall = interval.next(wall)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(text: &str) -> Timestamp {
        Timestamp::parse(text).unwrap()
    }

    #[test]
    fn berlin_days_last_23_and_25_hours_across_clock_changes() {
        let berlin = TimeZone::get("Europe/Berlin").unwrap();
        let spring = bucket_starts(
            t("2026-03-28T12:00:00Z"),
            t("2026-03-30T12:00:00Z"),
            Interval::Days,
            &berlin,
            10,
        )
        .unwrap();
        assert_eq!(
            spring,
            vec![
                t("2026-03-27T23:00:00Z"),
                t("2026-03-28T23:00:00Z"),
                t("2026-03-29T22:00:00Z")
            ]
        );
        let autumn = bucket_starts(
            t("2026-10-25T00:00:00Z"),
            t("2026-10-26T00:00:00Z"),
            Interval::Days,
            &berlin,
            10,
        )
        .unwrap();
        assert_eq!(
            autumn[1].as_millis() - autumn[0].as_millis(),
            25 * 3_600_000
        );
        assert_eq!(
            bucket_end(t("2026-03-29T12:00:00Z"), Interval::Days, &berlin),
            Some(t("2026-03-29T22:00:00Z"))
        );
        assert_eq!(
            bucket_end(t("2026-03-29T12:00:30Z"), Interval::Minutes(1), &berlin),
            Some(t("2026-03-29T12:01:00Z"))
        );
    }

    #[test]
    fn minutes_align_to_the_local_clock_and_are_bounded() {
        let kolkata = TimeZone::get("Asia/Kolkata").unwrap();
        let starts = bucket_starts(
            t("2026-01-01T00:07:00Z"),
            t("2026-01-01T00:40:00Z"),
            Interval::Minutes(15),
            &kolkata,
            10,
        )
        .unwrap();
        // 05:37 local is in the 05:30 bucket (00:00 UTC).
        assert_eq!(starts[0], t("2026-01-01T00:00:00Z"));
        assert_eq!(starts.len(), 3);
        assert_eq!(
            bucket_start(t("2026-01-01T00:44:59Z"), Interval::Minutes(15), &kolkata),
            Some(t("2026-01-01T00:30:00Z"))
        );
        assert!(
            bucket_starts(
                t("2026-01-01T00:00:00Z"),
                t("2026-01-02T00:00:00Z"),
                Interval::Minutes(1),
                &TimeZone::UTC,
                100
            )
            .is_none()
        );
    }
}
