//! Counters of what went through the pipeline, shared by every stage and rendered in the
//! Prometheus text format at `/metrics`.
//!
//! Plain atomics, incremented with relaxed ordering: a counter is a count, not a lock. This module
//! imports only `domain` and does no I/O.

use std::fmt::Write as _;
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
    /// Bytes of the local log skipped as corrupt (set from the writer's reader, which only
    /// ever counts up).
    pub journal_corrupt_bytes: AtomicU64,
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

    pub fn dead_letters_total(&self) -> u64 {
        self.dead_letters
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }

    /// The Prometheus text exposition of every counter and `gauges`.
    pub fn render(&self, gauges: Gauges) -> String {
        let mut out = String::with_capacity(4096);
        let counters: [(&str, &str, &AtomicU64); 14] = [
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
        let gauges = [
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
}
