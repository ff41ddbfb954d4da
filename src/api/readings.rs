//! History endpoints: keyset pages (`/readings`, and the original `/startoenddate`), streamed
//! exports, calendar aggregates and the Grafana series. MongoDB does the work (indexes, cursors,
//! `$group`); handlers only translate parameters and shape answers.

use bytes::Bytes;
use futures_util::StreamExt;
use poem_openapi::param::Query;
use poem_openapi::payload::Json;
use poem_openapi::{Enum, OpenApi};

use super::access::ReadKey;
use super::error::ApiError;
use super::memo;
use super::params::{
    ChartTime, DateTimeParam, OrderParam, StatChoice, Zone, encode, parse_range_cursor,
    range_cursor,
};
use super::types::{
    AggregateOut, BucketOut, CSV_CONTENT_TYPE, Export, JsonArrayStream, NDJSON_CONTENT_TYPE,
    RawJson, RawJsonArray, ReadingOut, ReadingPageOut, Reply, SeriesRow, page_json,
};
use super::{ApiState, DEFAULT_PAGE, Tag, to_datetime};
use crate::domain::{Interval, Reading, Timestamp, bucket_end, bucket_starts};
use crate::store::{
    AggregateQuery, Bucket, Order, RangeQuery, ReadingFilter, SeriesQuery, Stat, Stats,
};

/// Buckets an aggregate fills in at most; past that only the span with readings is filled.
const MAX_FILLED_BUCKETS: usize = 100_000;
/// Rows per chunk of an export body.
const EXPORT_CHUNK: usize = 1024;

pub struct History {
    pub state: ApiState,
}

/// Bucket width of `/readings/aggregate`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Enum)]
pub enum IntervalParam {
    #[oai(rename = "1m")]
    OneMinute,
    #[oai(rename = "5m")]
    FiveMinutes,
    #[oai(rename = "15m")]
    FifteenMinutes,
    #[oai(rename = "1h")]
    OneHour,
    #[oai(rename = "1d")]
    OneDay,
}

impl IntervalParam {
    fn interval(self) -> Interval {
        match self {
            IntervalParam::OneMinute => Interval::Minutes(1),
            IntervalParam::FiveMinutes => Interval::Minutes(5),
            IntervalParam::FifteenMinutes => Interval::Minutes(15),
            IntervalParam::OneHour => Interval::Hours(1),
            IntervalParam::OneDay => Interval::Days,
        }
    }

    fn name(self) -> &'static str {
        match self {
            IntervalParam::OneMinute => "1m",
            IntervalParam::FiveMinutes => "5m",
            IntervalParam::FifteenMinutes => "15m",
            IntervalParam::OneHour => "1h",
            IntervalParam::OneDay => "1d",
        }
    }
}

/// What `/readings/aggregate` does with buckets that hold no reading.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Enum)]
#[oai(rename_all = "lowercase")]
pub enum EmptyParam {
    /// Leave them out.
    #[default]
    Omit,
    /// List them with `count: 0` and no other statistic.
    Fill,
}

/// Format of `/readings/export`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Enum)]
#[oai(rename_all = "lowercase")]
pub enum FormatParam {
    #[default]
    Csv,
    Ndjson,
}

/// A range as the client gave it, before it became a filter.
struct Range {
    start: Option<Timestamp>,
    end: Option<Timestamp>,
    sensor_ids: Vec<String>,
    kind: Option<String>,
}

impl Range {
    fn filter(&self) -> ReadingFilter {
        ReadingFilter {
            start: self.start.unwrap_or(Timestamp::MIN),
            end: self.end.unwrap_or(Timestamp::MAX),
            sensor_ids: self.sensor_ids.clone(),
            kind: self.kind.clone(),
        }
    }

    /// The query string that asks for this range again (for `Link`).
    fn query(&self, start_name: &str, end_name: &str) -> String {
        let mut parts = Vec::new();
        if let Some(start) = self.start {
            parts.push(format!("{start_name}={}", encode(&start.to_string())));
        }
        if let Some(end) = self.end {
            parts.push(format!("{end_name}={}", encode(&end.to_string())));
        }
        for id in &self.sensor_ids {
            parts.push(format!("sensor_id={}", encode(id)));
        }
        if let Some(kind) = &self.kind {
            parts.push(format!("kind={}", encode(kind)));
        }
        parts.join("&")
    }
}

/// One page, serialized, with its continuation.
struct Page {
    readings: Vec<String>,
    next_cursor: Option<String>,
}

impl History {
    /// Refuses a range longer than `max_range_days` (or open at either end while a limit is set),
    /// naming the parameter to change. A reversed range is empty, never too long.
    fn check_span(
        &self,
        start: Option<Timestamp>,
        end: Option<Timestamp>,
        (start_name, end_name): (&str, &str),
    ) -> Result<(), ApiError> {
        let Some(max) = self.state.options.max_range else {
            return Ok(());
        };
        let days = max.as_secs() / 86_400;
        let (Some(start), Some(end)) = (start, end) else {
            let missing = if start.is_none() {
                start_name
            } else {
                end_name
            };
            return Err(ApiError::BadRequest(format!(
                "parameter '{missing}' is required: this server answers ranges of at most \
                 {days} days (max_range_days)"
            )));
        };
        let span_ms = end.as_millis().saturating_sub(start.as_millis());
        if span_ms > i64::try_from(max.as_millis()).unwrap_or(i64::MAX) {
            return Err(ApiError::BadRequest(format!(
                "parameter '{end_name}': the range from {start_name} to {end_name} spans more \
                 than {days} days, the most this server answers (max_range_days); ask for \
                 shorter ranges"
            )));
        }
        Ok(())
    }

    /// A keyset page: `limit + 1` asked for, so "more follow" is known without counting.
    async fn page(
        &self,
        range: &Range,
        order: Order,
        limit: u32,
        cursor: Option<&str>,
    ) -> Result<Page, ApiError> {
        let after = match cursor {
            Some(text) => Some(parse_range_cursor(text).ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "cursor '{text}' is not a cursor this endpoint returned"
                ))
            })?),
            None => None,
        };
        let mut readings = self
            .state
            .store
            .range(&RangeQuery {
                filter: range.filter(),
                order,
                after,
                limit: limit + 1,
            })
            .await?;
        let next_cursor = (readings.len() > limit as usize).then(|| {
            readings.truncate(limit as usize);
            range_cursor(&readings[readings.len() - 1])
        });
        Ok(Page {
            readings: readings.iter().map(Reading::to_json).collect(),
            next_cursor,
        })
    }

    /// A page, from the memo when no write touched its range since it was read.
    async fn kept_page(
        &self,
        endpoint: &str,
        range: &Range,
        order: Order,
        limit: u32,
        cursor: Option<&str>,
        render: impl Fn(&Page) -> (Bytes, Option<String>),
    ) -> Result<memo::Page, ApiError> {
        let filter = range.filter();
        let key = format!(
            "{endpoint}\u{0}{}\u{0}{}\u{0}{}\u{0}{}\u{0}{order:?}\u{0}{limit}\u{0}{}",
            filter.start.as_millis(),
            filter.end.as_millis(),
            filter.sensor_ids.join("\u{1}"),
            filter.kind.as_deref().unwrap_or(""),
            cursor.unwrap_or("")
        );
        let writes = self.state.store.writes();
        if let Some(page) = self.state.ranges.get(&key, writes) {
            return Ok(page);
        }
        let epoch = writes.epoch();
        let page = self.page(range, order, limit, cursor).await?;
        let (body, link) = render(&page);
        let kept = memo::Page { body, link };
        self.state
            .ranges
            .keep(key, filter.start, filter.end, epoch, kept.clone(), writes);
        Ok(kept)
    }

    async fn readings_page(
        &self,
        range: Range,
        order: OrderParam,
        limit: Option<u32>,
        cursor: Option<String>,
    ) -> Result<Reply<RawJson<ReadingPageOut>>, ApiError> {
        self.check_span(range.start, range.end, ("start", "end"))?;
        let limit = limit.unwrap_or(DEFAULT_PAGE);
        let again = range.query("start", "end");
        let order_name = match order {
            OrderParam::Asc => "asc",
            OrderParam::Desc => "desc",
        };
        let page = self
            .kept_page("readings", &range, order.into(), limit, cursor.as_deref(), |page| {
                let link = page.next_cursor.as_ref().map(|c| {
                    let sep = if again.is_empty() { "" } else { "&" };
                    format!(
                        "</readings?{again}{sep}order={order_name}&limit={limit}&cursor={}>; rel=\"next\"",
                        encode(c)
                    )
                });
                (page_json(&page.readings, page.next_cursor.as_deref()), link)
            })
            .await?;
        Ok(Reply::Ok(RawJson::from_bytes(page.body), page.link, None))
    }

    async fn legacy_page(
        &self,
        range: Range,
        limit: Option<u32>,
        cursor: Option<String>,
    ) -> Result<Reply<RawJsonArray<ReadingOut>>, ApiError> {
        self.check_span(range.start, range.end, ("startDate", "endDate"))?;
        let limit = limit.unwrap_or(DEFAULT_PAGE);
        let again = range.query("startDate", "endDate");
        let page = self
            .kept_page(
                "startoenddate",
                &range,
                Order::Asc,
                limit,
                cursor.as_deref(),
                |page| {
                    let link = page.next_cursor.as_ref().map(|c| {
                        format!(
                            "</startoenddate?{again}&limit={limit}&cursor={}>; rel=\"next\"",
                            encode(c)
                        )
                    });
                    (Bytes::from(crate::domain::json_array(&page.readings)), link)
                },
            )
            .await?;
        Ok(Reply::Ok(
            RawJsonArray::from_bytes(page.body),
            page.link,
            None,
        ))
    }

    async fn aggregate_buckets(
        &self,
        range: Range,
        interval: IntervalParam,
        stats: Vec<StatChoice>,
        zone: Zone,
        empty: EmptyParam,
    ) -> Result<AggregateOut, ApiError> {
        self.check_span(range.start, range.end, ("start", "end"))?;
        let mut wanted: Vec<Stat> = Vec::new();
        for stat in stats.into_iter().filter_map(|s| s.0) {
            if !wanted.contains(&stat) {
                wanted.push(stat);
            }
        }
        if wanted.is_empty() {
            wanted = Stat::ALL.to_vec();
        }
        let filter = range.filter();
        let (unit, bin_size) = interval.interval().unit_and_bin();
        let mut buckets = self
            .state
            .store
            .aggregate(&AggregateQuery {
                filter: filter.clone(),
                unit,
                bin_size,
                zone: zone.0.clone(),
                stats: wanted.clone(),
            })
            .await?;
        let tz = zone.time_zone();
        if empty == EmptyParam::Fill {
            fill(&mut buckets, &filter, interval.interval(), &tz, &wanted);
        }
        let next = |start: Timestamp| bucket_end(start, interval.interval(), &tz).unwrap_or(start);
        Ok(AggregateOut {
            sensor_id: range.sensor_ids.first().cloned().unwrap_or_default(),
            interval: interval.name().to_owned(),
            tz: zone.0,
            buckets: buckets
                .into_iter()
                .map(|b| BucketOut {
                    start: to_datetime(b.start),
                    end: to_datetime(next(b.start)),
                    kind: b.kind,
                    count: b.stats.count,
                    min: b.stats.min,
                    max: b.stats.max,
                    avg: b.stats.avg,
                    first: b.stats.first,
                    last: b.stats.last,
                })
                .collect(),
        })
    }
}

/// Adds a `count: 0` bucket wherever a kind has none, over the range asked for (or, when that
/// holds more than `MAX_FILLED_BUCKETS`, over the span that has readings).
fn fill(
    buckets: &mut Vec<Bucket>,
    filter: &ReadingFilter,
    interval: Interval,
    tz: &jiff::tz::TimeZone,
    wanted: &[Stat],
) {
    let mut kinds: Vec<String> = buckets.iter().map(|b| b.kind.clone()).collect();
    if let Some(kind) = &filter.kind {
        kinds.push(kind.clone());
    }
    kinds.sort_unstable();
    kinds.dedup();
    let starts = bucket_starts(filter.start, filter.end, interval, tz, MAX_FILLED_BUCKETS)
        .or_else(|| {
            let first = buckets.iter().map(|b| b.start).min()?;
            let last = buckets.iter().map(|b| b.start).max()?;
            bucket_starts(first, last, interval, tz, MAX_FILLED_BUCKETS)
        })
        .unwrap_or_default();
    let have: std::collections::HashSet<(i64, String)> = buckets
        .iter()
        .map(|b| (b.start.as_millis(), b.kind.clone()))
        .collect();
    let count = wanted.contains(&Stat::Count).then_some(0);
    for start in starts {
        for kind in &kinds {
            if !have.contains(&(start.as_millis(), kind.clone())) {
                buckets.push(Bucket {
                    start,
                    kind: kind.clone(),
                    stats: Stats {
                        count,
                        ..Stats::default()
                    },
                });
            }
        }
    }
    buckets.sort_by(|a, b| (a.start, &a.kind).cmp(&(b.start, &b.kind)));
}

fn csv_field(out: &mut String, text: &str) {
    if text.contains([',', '"', '\n', '\r']) {
        out.push('"');
        out.push_str(&text.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(text);
    }
}

fn csv_row(out: &mut String, r: &Reading) {
    csv_field(out, r.sensor_id().as_str());
    out.push(',');
    csv_field(out, r.kind().as_str());
    out.push(',');
    // The shortest text that reads back as the same double.
    out.push_str(&serde_json::to_string(&r.value()).unwrap_or_default());
    out.push(',');
    out.push_str(&r.timestamp().to_string());
    out.push('\n');
}

/// `20260101T000000Z` for a file name.
fn compact(t: Option<Timestamp>, default: &str) -> String {
    match t {
        Some(t) => t
            .to_string()
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .collect(),
        None => default.to_owned(),
    }
}

#[OpenApi(tag = "Tag::History")]
impl History {
    /// Readings in a time range, paged
    ///
    /// Readings with `start <= timestamp <= end` (both optional), of one or more sensors
    /// (`sensor_id` repeated) and one kind, in time order (`order`), at most `limit` per page.
    /// Keyset paging: pass the page's `next_cursor` as `cursor` to get the next one (the `Link`
    /// header holds that URL too) until `has_more` is false. Every reading in the range is
    /// returned exactly once, even while new readings arrive.
    #[oai(path = "/readings", method = "get")]
    #[allow(clippy::too_many_arguments)]
    async fn readings(
        &self,
        _key: ReadKey,
        /// Start of the range, inclusive (RFC 3339; naive ISO 8601 is read as UTC). Default: the
        /// oldest reading.
        start: Query<Option<DateTimeParam>>,
        /// End of the range, inclusive. Default: the newest reading.
        end: Query<Option<DateTimeParam>>,
        /// Only these sensors' readings (repeat the parameter for several).
        sensor_id: Query<Vec<String>>,
        /// Only readings of this kind (the last level of their topic, e.g. temperature).
        kind: Query<Option<String>>,
        /// `asc` (oldest first, the default) or `desc`.
        order: Query<Option<OrderParam>>,
        /// Readings per page (default 1000).
        #[oai(validator(minimum(value = "1"), maximum(value = "10000")))]
        limit: Query<Option<u32>>,
        /// Where the page starts: the previous page's `next_cursor`.
        #[oai(validator(pattern = "^-?[0-9]{1,15}:[^:]*:"))]
        cursor: Query<Option<String>>,
    ) -> Reply<RawJson<ReadingPageOut>> {
        let range = Range {
            start: start.0.map(|d| d.0),
            end: end.0.map(|d| d.0),
            sensor_ids: sensor_id.0,
            kind: kind.0,
        };
        self.readings_page(range, order.0.unwrap_or_default(), limit.0, cursor.0)
            .await
            .unwrap_or_else(Reply::from)
    }

    /// Readings in a time range (the original path)
    ///
    /// Readings with `startDate <= timestamp <= endDate`, oldest first (ties in sensor id
    /// order), at most `limit` per page, as a bare array. When more follow, the `Link` header
    /// carries the URL of the next page (`rel="next"`); follow it until it is absent. Dates are
    /// RFC 3339 (`2024-05-01T12:00:00Z`, `2024-05-01T14:00:00+02:00`) or naive ISO 8601 read as
    /// UTC (`2024-05-01T12:00:00.123456`, `2024-05-01`). An end before the start is an empty
    /// range.
    #[oai(path = "/startoenddate", method = "get")]
    #[allow(clippy::too_many_arguments)]
    async fn range(
        &self,
        _key: ReadKey,
        /// Start of the range, inclusive.
        #[oai(name = "startDate")]
        start_date: Query<DateTimeParam>,
        /// End of the range, inclusive.
        #[oai(name = "endDate")]
        end_date: Query<DateTimeParam>,
        /// Only this sensor's readings (repeat the parameter for several).
        sensor_id: Query<Vec<String>>,
        /// Only readings of this kind (the last level of their topic, e.g. temperature).
        kind: Query<Option<String>>,
        /// Readings per page (default 1000).
        #[oai(validator(minimum(value = "1"), maximum(value = "10000")))]
        limit: Query<Option<u32>>,
        /// Where the page starts: the cursor in the previous page's `Link` header.
        #[oai(validator(pattern = "^-?[0-9]{1,15}:[^:]*:"))]
        cursor: Query<Option<String>>,
    ) -> Reply<RawJsonArray<ReadingOut>> {
        let range = Range {
            start: Some(start_date.0.0),
            end: Some(end_date.0.0),
            sensor_ids: sensor_id.0,
            kind: kind.0,
        };
        self.legacy_page(range, limit.0, cursor.0)
            .await
            .unwrap_or_else(Reply::from)
    }

    /// Readings in a time range (the original README's spelling)
    ///
    /// The same as `/startoenddate`, under the name the original system's README gives it.
    #[oai(path = "/starttoenddate", method = "get", deprecated)]
    #[allow(clippy::too_many_arguments)]
    async fn range_alias(
        &self,
        _key: ReadKey,
        /// Start of the range, inclusive.
        #[oai(name = "startDate")]
        start_date: Query<DateTimeParam>,
        /// End of the range, inclusive.
        #[oai(name = "endDate")]
        end_date: Query<DateTimeParam>,
        /// Only this sensor's readings (repeat the parameter for several).
        sensor_id: Query<Vec<String>>,
        /// Only readings of this kind.
        kind: Query<Option<String>>,
        /// Readings per page (default 1000).
        #[oai(validator(minimum(value = "1"), maximum(value = "10000")))]
        limit: Query<Option<u32>>,
        /// Where the page starts: the cursor in the previous page's `Link` header.
        #[oai(validator(pattern = "^-?[0-9]{1,15}:[^:]*:"))]
        cursor: Query<Option<String>>,
    ) -> Reply<RawJsonArray<ReadingOut>> {
        self.range(_key, start_date, end_date, sensor_id, kind, limit, cursor)
            .await
    }

    /// Export readings
    ///
    /// Every reading the filters cover (the same as `/readings`), streamed from one database
    /// cursor as CSV or newline-delimited JSON: no row cap, and memory stays flat however many
    /// rows there are. `Content-Disposition` names the file.
    #[oai(path = "/readings/export", method = "get")]
    #[allow(clippy::too_many_arguments)]
    async fn export(
        &self,
        _key: ReadKey,
        /// Start of the range, inclusive. Default: the oldest reading.
        start: Query<Option<DateTimeParam>>,
        /// End of the range, inclusive. Default: the newest reading.
        end: Query<Option<DateTimeParam>>,
        /// Only these sensors' readings (repeat the parameter for several).
        sensor_id: Query<Vec<String>>,
        /// Only readings of this kind.
        kind: Query<Option<String>>,
        /// `asc` (oldest first, the default) or `desc`.
        order: Query<Option<OrderParam>>,
        /// `csv` (the default) or `ndjson`.
        format: Query<Option<FormatParam>>,
    ) -> Export {
        let range = Range {
            start: start.0.map(|d| d.0),
            end: end.0.map(|d| d.0),
            sensor_ids: sensor_id.0,
            kind: kind.0,
        };
        if let Err(e) = self.check_span(range.start, range.end, ("start", "end")) {
            return Export::Error(e.into());
        }
        let order: Order = order.0.unwrap_or_default().into();
        let format = format.0.unwrap_or_default();
        let readings = match self.state.store.stream(&range.filter(), order).await {
            Ok(readings) => readings,
            Err(e) => return Export::Error(ApiError::from(e).into()),
        };
        let header = match format {
            FormatParam::Csv => "sensor_id,kind,value,timestamp\n",
            FormatParam::Ndjson => "",
        };
        let rows = readings.ready_chunks(EXPORT_CHUNK).map(move |chunk| {
            let mut out = String::with_capacity(chunk.len() * 96);
            for r in chunk {
                match r {
                    Ok(r) => match format {
                        FormatParam::Csv => csv_row(&mut out, &r),
                        FormatParam::Ndjson => {
                            out.push_str(&r.to_json());
                            out.push('\n');
                        }
                    },
                    Err(e) => {
                        tracing::warn!(error = crate::error_chain(&e), "export cut short");
                        return Err(std::io::Error::other(e));
                    }
                }
            }
            Ok(Bytes::from(out))
        });
        let body =
            futures_util::stream::once(async move { Ok(Bytes::from_static(header.as_bytes())) })
                .chain(rows);
        let (content_type, extension) = match format {
            FormatParam::Csv => (CSV_CONTENT_TYPE, "csv"),
            FormatParam::Ndjson => (NDJSON_CONTENT_TYPE, "ndjson"),
        };
        Export::Ok {
            body: poem::Body::from_bytes_stream(body),
            content_type,
            file_name: format!(
                "readings-{}-{}.{extension}",
                compact(range.start, "start"),
                compact(range.end, "end")
            ),
        }
    }

    /// Aggregates in calendar buckets
    ///
    /// One sensor's readings (of one kind, or each kind) grouped into buckets of `interval`
    /// aligned to the wall clock of `tz`, computed by MongoDB (`$dateTrunc` + `$group`). A day
    /// bucket runs from local midnight to local midnight, so it holds 23 or 25 hours across a
    /// daylight-saving change. `fn` picks the statistics (all by default); `empty=fill` lists
    /// buckets without readings too (`count: 0`).
    #[oai(path = "/readings/aggregate", method = "get")]
    #[allow(clippy::too_many_arguments)]
    async fn aggregate(
        &self,
        _key: ReadKey,
        /// The sensor.
        sensor_id: Query<String>,
        /// Only readings of this kind; without it, each kind has its own buckets.
        kind: Query<Option<String>>,
        /// Start of the range, inclusive. Default: the oldest reading.
        start: Query<Option<DateTimeParam>>,
        /// End of the range, inclusive. Default: the newest reading.
        end: Query<Option<DateTimeParam>>,
        /// Bucket width.
        interval: Query<IntervalParam>,
        /// Statistics, comma-separated (default: all).
        #[oai(name = "fn", explode = false, default)]
        stats: Query<Vec<StatChoice>>,
        /// The IANA time zone buckets align to (default UTC).
        tz: Query<Option<Zone>>,
        /// `omit` (the default) leaves out buckets without readings; `fill` lists them with
        /// `count: 0`.
        empty: Query<Option<EmptyParam>>,
    ) -> Reply<Json<AggregateOut>> {
        let range = Range {
            start: start.0.map(|d| d.0),
            end: end.0.map(|d| d.0),
            sensor_ids: vec![sensor_id.0],
            kind: kind.0,
        };
        let zone = tz.0.unwrap_or_else(|| Zone("UTC".to_owned()));
        match self
            .aggregate_buckets(
                range,
                interval.0,
                stats.0,
                zone,
                empty.0.unwrap_or_default(),
            )
            .await
        {
            Ok(out) => Reply::Ok(Json(out), None, None),
            Err(e) => e.into(),
        }
    }

    /// Chart series for Grafana
    ///
    /// For Grafana's Infinity data source (or any chart): the readings of the given sensors
    /// between `from` and `to`, downsampled by MongoDB into at most `max_points` equal buckets
    /// per sensor and kind, as a flat JSON array of `{time, sensor_id, kind, value, min, max,
    /// count}` (`value` is the average). Paste
    /// `/grafana/series?sensor_id=boiler-7&from=${__from}&to=${__to}&max_points=${__maxDataPoints}`
    /// as the URL: the whole range comes in one response.
    #[oai(path = "/grafana/series", method = "get", tag = "Tag::Grafana")]
    async fn grafana_series(
        &self,
        _key: ReadKey,
        /// The sensors (repeat the parameter for several); all sensors when absent.
        sensor_id: Query<Vec<String>>,
        /// Only readings of this kind.
        kind: Query<Option<String>>,
        /// Start, inclusive: epoch milliseconds (`${__from}`) or RFC 3339.
        from: Query<ChartTime>,
        /// End, inclusive: epoch milliseconds (`${__to}`) or RFC 3339.
        to: Query<ChartTime>,
        /// Buckets per series at most (`${__maxDataPoints}`; default 1000).
        #[oai(validator(minimum(value = "1"), maximum(value = "100000")))]
        max_points: Query<Option<u32>>,
    ) -> Reply<Json<Vec<SeriesRow>>> {
        let (from, to) = (from.0.0, to.0.0);
        if let Err(e) = self.check_span(Some(from), Some(to), ("from", "to")) {
            return e.into();
        }
        if to < from {
            return Reply::Ok(Json(Vec::new()), None, None);
        }
        let points = i64::from(max_points.0.unwrap_or(1000));
        let span = (to.as_millis() - from.as_millis()).saturating_add(1);
        let query = SeriesQuery {
            filter: ReadingFilter {
                start: from,
                end: to,
                sensor_ids: sensor_id.0,
                kind: kind.0,
            },
            width_ms: span.div_euclid(points) + i64::from(span.rem_euclid(points) != 0),
        };
        match self.state.store.series(&query).await {
            Ok(points) => Reply::Ok(
                Json(
                    points
                        .into_iter()
                        .map(|p| SeriesRow {
                            time: to_datetime(p.time),
                            sensor_id: p.sensor_id,
                            kind: p.kind,
                            value: p.avg,
                            min: p.min,
                            max: p.max,
                            count: p.count,
                        })
                        .collect(),
                ),
                None,
                None,
            ),
            Err(e) => ApiError::from(e).into(),
        }
    }

    /// Every reading
    ///
    /// The whole history, oldest first, streamed from a database cursor as one JSON array:
    /// memory stays flat however large it is. For pages use `/readings`; for files
    /// `/readings/export`.
    #[oai(path = "/allData", method = "get")]
    async fn all_data(&self, _key: ReadKey) -> Reply<JsonArrayStream<ReadingOut>> {
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

    /// Every reading (the original code's spelling)
    ///
    /// The same as `/allData`, under the lowercase path the original system's code served.
    #[oai(path = "/alldata", method = "get", deprecated)]
    async fn all_data_alias(&self, _key: ReadKey) -> Reply<JsonArrayStream<ReadingOut>> {
        self.all_data(_key).await
    }
}
