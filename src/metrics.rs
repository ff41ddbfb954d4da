//! Counters of what went through the pipeline, shared by every stage and rendered in the
//! Prometheus text format (0.0.4) at `/metrics`.
//!
//! Plain atomics, incremented with relaxed ordering: a counter is a count, not a lock. The
//! histograms are atomics too (fixed buckets); only the HTTP statistics, labelled by route
//! template, take a lock, once per request. This module imports only `domain` and does no I/O.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::marker::PhantomData;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::domain::Reason;

#[derive(Debug, Default)]
pub struct Metrics {
    /// Messages on `sensors/#` written to the local log (before their acknowledgement).
    pub captured: AtomicU64,
    /// Messages the local log refused (full or closing); their publishers were disconnected
    /// without an acknowledgement.
    pub refused: AtomicU64,
    /// CONNECTs with keep-alive 0 accepted (rumqttd alone would refuse them).
    pub keep_alive_zero: AtomicU64,
    /// Messages the broker delivered to the internal subscriber.
    pub link_delivered: AtomicU64,
    /// Messages the broker dropped before the internal subscriber read them.
    pub link_lost: AtomicU64,
    /// Readings newly stored in MongoDB.
    pub stored: AtomicU64,
    /// Readings already stored (same sensor and timestamp): redeliveries and replays.
    pub duplicates: AtomicU64,
    /// Rejected messages, by reason (index = position in `Reason::ALL`).
    pub dead_letters: [AtomicU64; Reason::ALL.len()],
    /// Failed MongoDB writes (each retried until it succeeds).
    pub store_errors: AtomicU64,
    /// Failed Redis updates (the affected sensors are rebuilt from MongoDB).
    pub cache_errors: AtomicU64,
    /// Per-sensor latest sets rebuilt from MongoDB.
    pub cache_rebuilds: AtomicU64,
    /// Bytes of the local log skipped as corrupt (disk damage), added as the writer's reader
    /// skips them.
    pub journal_corrupt_bytes: AtomicU64,
    /// Records of the log's replay (past the previous run's checkpoint) read by the writer.
    pub journal_records_replayed: AtomicU64,
    /// Records whose batch the writer finished (stored, dead-lettered or dropped).
    pub journal_records_done: AtomicU64,
    /// Dead letters over `--dead-letters-per-second`, not stored, by reason (as `dead_letters`).
    pub dead_letters_dropped: [AtomicU64; Reason::ALL.len()],
    /// MQTT connections whose CONNECT was accepted and that are still open.
    pub mqtt_clients: AtomicU64,
    /// HTTP connections closed because a write made no progress (`--http-write-timeout-secs`).
    pub http_write_timeouts: AtomicU64,
    /// HTTP connections closed because a request head was late (`--http-header-timeout-secs`).
    pub http_header_timeouts: AtomicU64,
    /// Records (readings and dead letters) per batch the writer took from the log.
    pub batch_records: Histogram<Records>,
    /// Time of each MongoDB `insert_many` of readings, failed attempts included.
    pub mongodb_write_readings: Histogram<Seconds>,
    /// Time of each MongoDB `insert_many` of dead letters, failed attempts included.
    pub mongodb_write_dead_letters: Histogram<Seconds>,
    /// HTTP requests by route template: latency and status codes.
    pub http: HttpStats,
    /// MQTT CONNECTs refused (bad credentials, not authorized, reserved client id, busy).
    pub mqtt_logins_refused: AtomicU64,
    /// PUBLISHes refused by a credential's grant (acked and dropped on 3.1.1, 0x87 on 5).
    pub mqtt_publishes_refused: AtomicU64,
    /// Subscription filters refused by a credential's grant.
    pub mqtt_subscriptions_refused: AtomicU64,
}

/// Values read at render time from their owners.
#[derive(Debug, Default, Clone, Copy)]
pub struct Gauges {
    pub journal_pending_bytes: u64,
    pub journal_segments: u64,
    pub cache_dirty_sensors: u64,
    pub cache_healthy: bool,
}

impl Metrics {
    pub fn dead_letter(&self, reason: Reason) {
        if let Some(i) = Reason::ALL.iter().position(|r| *r == reason) {
            self.dead_letters[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts `n` dead letters of `reason` that were over the budget: rejected like every other
    /// (`sensorhub_dead_letters_total`) and dropped, not stored.
    pub fn dead_letters_over_budget(&self, reason: Reason, n: u64) {
        if let Some(i) = Reason::ALL.iter().position(|r| *r == reason) {
            self.dead_letters[i].fetch_add(n, Ordering::Relaxed);
            self.dead_letters_dropped[i].fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Records read from the log and not yet finished: those appended by this process (the
    /// captured ones) and those of the replay the writer has read, less those it finished.
    /// Records of a replay the writer has not read yet are not counted (they are in
    /// `sensorhub_journal_pending_bytes`): counting them would mean reading them.
    pub fn journal_pending_records(&self) -> u64 {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        (load(&self.captured) + load(&self.journal_records_replayed))
            .saturating_sub(load(&self.journal_records_done))
    }

    pub fn dead_letters_total(&self) -> u64 {
        self.dead_letters
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }

    /// The Prometheus text exposition of every counter and `gauges`.
    pub fn render(&self, gauges: Gauges) -> String {
        let mut out = String::with_capacity(4096);
        let counters: [(&str, &str, &AtomicU64); 16] = [
            (
                "sensorhub_messages_captured_total",
                "Messages on sensors/# written to the local log before their acknowledgement.",
                &self.captured,
            ),
            (
                "sensorhub_messages_refused_total",
                "Messages refused because the local log was full or closing; publishers were disconnected unacknowledged.",
                &self.refused,
            ),
            (
                "sensorhub_keep_alive_zero_total",
                "CONNECTs with keep-alive 0 accepted.",
                &self.keep_alive_zero,
            ),
            (
                "sensorhub_broker_link_delivered_total",
                "Messages the embedded broker delivered to the internal subscriber.",
                &self.link_delivered,
            ),
            (
                "sensorhub_broker_link_lost_total",
                "Messages the embedded broker dropped before the internal subscriber read them.",
                &self.link_lost,
            ),
            (
                "sensorhub_readings_stored_total",
                "Readings newly stored in MongoDB.",
                &self.stored,
            ),
            (
                "sensorhub_readings_duplicate_total",
                "Readings already stored (redeliveries, replays).",
                &self.duplicates,
            ),
            (
                "sensorhub_store_errors_total",
                "Failed MongoDB writes, each retried.",
                &self.store_errors,
            ),
            (
                "sensorhub_cache_errors_total",
                "Failed Redis updates.",
                &self.cache_errors,
            ),
            (
                "sensorhub_cache_rebuilds_total",
                "Latest-ten sets rebuilt from MongoDB.",
                &self.cache_rebuilds,
            ),
            (
                "sensorhub_journal_corrupt_bytes_total",
                "Bytes of the local log skipped as corrupt (disk damage).",
                &self.journal_corrupt_bytes,
            ),
            (
                "sensorhub_mqtt_logins_refused_total",
                "MQTT CONNECTs refused: bad credentials, not authorized, reserved client id, busy.",
                &self.mqtt_logins_refused,
            ),
            (
                "sensorhub_mqtt_publishes_refused_total",
                "PUBLISHes a credential may not make (sensor id or topic not granted).",
                &self.mqtt_publishes_refused,
            ),
            (
                "sensorhub_mqtt_subscriptions_refused_total",
                "Subscription filters a credential may not use.",
                &self.mqtt_subscriptions_refused,
            ),
            (
                "sensorhub_http_write_timeouts_total",
                "HTTP connections closed because the client read nothing for the write timeout (a /stream client that stopped reading among them).",
                &self.http_write_timeouts,
            ),
            (
                "sensorhub_http_header_timeouts_total",
                "HTTP connections closed because a request head was not complete within the header timeout (slowloris).",
                &self.http_header_timeouts,
            ),
        ];
        for (name, help, counter) in counters {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            let _ = writeln!(out, "{name} {}", counter.load(Ordering::Relaxed));
        }
        let name = "sensorhub_dead_letters_total";
        let _ = writeln!(
            out,
            "# HELP {name} Rejected messages by reason.\n# TYPE {name} counter"
        );
        for (reason, counter) in Reason::ALL.iter().zip(&self.dead_letters) {
            let _ = writeln!(
                out,
                "{name}{{reason=\"{}\"}} {}",
                reason.code(),
                counter.load(Ordering::Relaxed)
            );
        }
        let name = "sensorhub_dead_letters_dropped_total";
        let _ = writeln!(
            out,
            "# HELP {name} Dead letters over the budget (--dead-letters-per-second), counted and not stored, by reason.\n# TYPE {name} counter"
        );
        for (reason, counter) in Reason::ALL.iter().zip(&self.dead_letters_dropped) {
            let _ = writeln!(
                out,
                "{name}{{reason=\"{}\"}} {}",
                reason.code(),
                counter.load(Ordering::Relaxed)
            );
        }
        Histogram::render_family(
            &mut out,
            "sensorhub_ingest_batch_records",
            "Records (readings and dead letters) per batch the writer took from the local log.",
            &[("", &self.batch_records)],
        );
        Histogram::render_family(
            &mut out,
            "sensorhub_mongodb_write_duration_seconds",
            "Time of each MongoDB insert_many, failed attempts included, by what it wrote.",
            &[
                ("op=\"readings\"", &self.mongodb_write_readings),
                ("op=\"dead_letters\"", &self.mongodb_write_dead_letters),
            ],
        );
        self.http.render(&mut out);
        let gauges = [
            (
                "sensorhub_mqtt_clients",
                "MQTT connections logged in and open (embedded broker).",
                self.mqtt_clients.load(Ordering::Relaxed),
            ),
            (
                "sensorhub_journal_pending_records",
                "Records in the local log not yet stored (of a replay, only those already read).",
                self.journal_pending_records(),
            ),
            (
                "sensorhub_journal_pending_bytes",
                "Bytes in the local log not yet stored.",
                gauges.journal_pending_bytes,
            ),
            (
                "sensorhub_journal_segments",
                "Segment files of the local log.",
                gauges.journal_segments,
            ),
            (
                "sensorhub_cache_dirty_sensors",
                "Sensors whose Redis latest set awaits a rebuild.",
                gauges.cache_dirty_sensors,
            ),
            (
                "sensorhub_cache_healthy",
                "1 when Redis serves the latest-ten endpoints.",
                u64::from(gauges.cache_healthy),
            ),
        ];
        for (name, help, value) in gauges {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        }
        out
    }
}

/// Bucket bounds of a kind of histogram.
pub trait Bounds {
    const BOUNDS: &'static [f64];
}

/// Durations in seconds, from a millisecond to the writer's 30 s timeout.
#[derive(Debug)]
pub struct Seconds;

impl Bounds for Seconds {
    const BOUNDS: &'static [f64] = &[
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ];
}

/// Counts of records: a batch holds up to 512 KiB, about 4,000 ordinary readings.
#[derive(Debug)]
pub struct Records;

impl Bounds for Records {
    const BOUNDS: &'static [f64] = &[
        1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0,
    ];
}

/// The most bounds a kind may have.
const MAX_BOUNDS: usize = 16;

/// A Prometheus histogram: one counter per bucket (not cumulative until rendered), the count
/// and the sum (an `f64`'s bits).
#[derive(Debug)]
pub struct Histogram<B> {
    buckets: [AtomicU64; MAX_BOUNDS],
    count: AtomicU64,
    sum: AtomicU64,
    kind: PhantomData<B>,
}

impl<B: Bounds> Default for Histogram<B> {
    fn default() -> Self {
        const { assert!(B::BOUNDS.len() <= MAX_BOUNDS) };
        Self {
            buckets: Default::default(),
            count: AtomicU64::new(0),
            sum: AtomicU64::new(0f64.to_bits()),
            kind: PhantomData,
        }
    }
}

impl<B: Bounds> Histogram<B> {
    pub fn observe(&self, value: f64) {
        if let Some(i) = B::BOUNDS.iter().position(|bound| value <= *bound) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        let _ = self
            .sum
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + value).to_bits())
            });
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Renders `series` (label text without braces, each with its histogram) under one name.
    fn render_family(out: &mut String, name: &str, help: &str, series: &[(&str, &Self)]) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (labels, histogram) in series {
            histogram.render_series(out, name, labels);
        }
    }

    fn render_series(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (bound, bucket) in B::BOUNDS.iter().zip(&self.buckets) {
            cumulative += bucket.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}"
            );
        }
        let count = self.count();
        let sum = f64::from_bits(self.sum.load(Ordering::Relaxed));
        let braces = |s: &str| {
            if s.is_empty() {
                String::new()
            } else {
                format!("{{{s}}}")
            }
        };
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}\n{name}_sum{} {sum}\n{name}_count{} {count}",
            braces(labels),
            braces(labels)
        );
    }
}

/// HTTP requests by route template (`/latestten/{sensor_id}`, never the raw path, so the
/// series stay as many as the routes): a latency histogram and a count per status code.
#[derive(Debug, Default)]
pub struct HttpStats {
    routes: Mutex<BTreeMap<String, RouteStats>>,
}

#[derive(Debug, Default)]
struct RouteStats {
    latency: Histogram<Seconds>,
    codes: BTreeMap<u16, u64>,
}

impl HttpStats {
    /// Records one response to `route` (a template) with `status`, `seconds` after the request.
    pub fn observe(&self, route: &str, status: u16, seconds: f64) {
        let mut routes = self
            .routes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !routes.contains_key(route) {
            routes.insert(route.to_owned(), RouteStats::default());
        }
        if let Some(stats) = routes.get_mut(route) {
            stats.latency.observe(seconds);
            *stats.codes.entry(status).or_default() += 1;
        }
    }

    fn render(&self, out: &mut String) {
        let routes = self
            .routes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let name = "sensorhub_http_request_duration_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Time from a request to its response head, by route template.\n# TYPE {name} histogram"
        );
        for (route, stats) in routes.iter() {
            let labels = format!("route=\"{}\"", escape(route));
            stats.latency.render_series(out, name, &labels);
        }
        let name = "sensorhub_http_responses_total";
        let _ = writeln!(
            out,
            "# HELP {name} HTTP responses by route template, status class and code.\n# TYPE {name} counter"
        );
        for (route, stats) in routes.iter() {
            for (code, n) in &stats.codes {
                let _ = writeln!(
                    out,
                    "{name}{{route=\"{}\",class=\"{}xx\",code=\"{code}\"}} {n}",
                    escape(route),
                    code / 100
                );
            }
        }
    }
}

/// A label value in the text format: backslash, quote and newline escaped.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_labelled_dead_letters() {
        let m = Metrics::default();
        m.stored.fetch_add(3, Ordering::Relaxed);
        m.dead_letter(Reason::InvalidJson);
        m.dead_letter(Reason::InvalidJson);
        let text = m.render(Gauges {
            journal_pending_bytes: 42,
            ..Gauges::default()
        });
        assert!(text.contains("sensorhub_readings_stored_total 3\n"));
        assert!(text.contains("sensorhub_dead_letters_total{reason=\"invalid_json\"} 2\n"));
        assert!(text.contains("sensorhub_journal_pending_bytes 42\n"));
        assert!(text.contains(
            "# TYPE sensorhub_journal_corrupt_bytes_total counter\nsensorhub_journal_corrupt_bytes_total 0\n"
        ));
        assert_eq!(m.dead_letters_total(), 2);
    }

    #[test]
    fn histograms_render_cumulative_buckets_with_their_labels() {
        let m = Metrics::default();
        m.batch_records.observe(1.0);
        m.batch_records.observe(7.0);
        m.batch_records.observe(1e9);
        m.mongodb_write_readings.observe(0.003);
        m.http.observe("/latestten/{sensor_id}", 404, 0.002);
        m.http.observe("/latestten/{sensor_id}", 200, 0.02);
        m.dead_letters_over_budget(Reason::InvalidJson, 5);
        let text = m.render(Gauges::default());
        for line in [
            "# TYPE sensorhub_ingest_batch_records histogram\n",
            "sensorhub_ingest_batch_records_bucket{le=\"1\"} 1\n",
            "sensorhub_ingest_batch_records_bucket{le=\"5\"} 1\n",
            "sensorhub_ingest_batch_records_bucket{le=\"10\"} 2\n",
            "sensorhub_ingest_batch_records_bucket{le=\"5000\"} 2\n",
            "sensorhub_ingest_batch_records_bucket{le=\"+Inf\"} 3\n",
            "sensorhub_ingest_batch_records_count 3\n",
            "sensorhub_mongodb_write_duration_seconds_bucket{op=\"readings\",le=\"0.0025\"} 0\n",
            "sensorhub_mongodb_write_duration_seconds_bucket{op=\"readings\",le=\"0.005\"} 1\n",
            "sensorhub_mongodb_write_duration_seconds_count{op=\"dead_letters\"} 0\n",
            "sensorhub_http_request_duration_seconds_count{route=\"/latestten/{sensor_id}\"} 2\n",
            "sensorhub_http_responses_total{route=\"/latestten/{sensor_id}\",class=\"4xx\",code=\"404\"} 1\n",
            "sensorhub_http_responses_total{route=\"/latestten/{sensor_id}\",class=\"2xx\",code=\"200\"} 1\n",
            "sensorhub_dead_letters_dropped_total{reason=\"invalid_json\"} 5\n",
            "sensorhub_dead_letters_total{reason=\"invalid_json\"} 5\n",
            "sensorhub_mqtt_clients 0\n",
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
    }

    #[test]
    fn pending_records_are_captured_and_replayed_less_done() {
        let m = Metrics::default();
        m.captured.fetch_add(10, Ordering::Relaxed);
        m.journal_records_replayed.fetch_add(4, Ordering::Relaxed);
        m.journal_records_done.fetch_add(9, Ordering::Relaxed);
        assert_eq!(m.journal_pending_records(), 5);
        m.journal_records_done.fetch_add(9, Ordering::Relaxed);
        assert_eq!(m.journal_pending_records(), 0, "never below zero");
    }
}
