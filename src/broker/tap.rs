//! The in-process subscriber on `sensors/#`: rumqttd's local link, drained as fast as the router
//! fills it.
//!
//! Readings do not depend on it (the capture codec has already logged them); it exists so the
//! router always has a reader for the filter, and to measure what the router itself loses. A
//! reader that falls behind makes rumqttd drop whole segments and jump its cursor with only a
//! warning: the tap sees that as a gap in the offsets of forwarded messages and counts it. It
//! runs on its own thread, so a busy async runtime never makes it fall behind, and it must never
//! wait on anything but the link.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rumqttd::Notification;
use rumqttd::local::LinkRx;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// How often a quiet tap looks at `stop`.
const STOP_CHECK: Duration = Duration::from_millis(200);

/// Drains `link` until `stop` fires or the router goes away. Blocking: run it on its own thread.
pub fn run(mut link: LinkRx, metrics: &Metrics, stop: &CancellationToken) {
    let mut last_offset: Option<u64> = None;
    while !stop.is_cancelled() {
        let next = match link.recv_deadline(Instant::now() + STOP_CHECK) {
            Ok(next) => next,
            Err(rumqttd::local::LinkError::RecvTimeout(flume::RecvTimeoutError::Timeout)) => {
                continue;
            }
            Err(e) => {
                tracing::error!(error = %e, "broker link closed");
                return;
            }
        };
        match next {
            Some(Notification::Forward(forward)) => {
                metrics.link_delivered.fetch_add(1, Ordering::Relaxed);
                if let Some((_, offset)) = forward.cursor {
                    if let Some(last) = last_offset {
                        let lost = offset.saturating_sub(last + 1);
                        if lost > 0 {
                            metrics.link_lost.fetch_add(lost, Ordering::Relaxed);
                            // Not an error for sensorhub (readings were logged on arrival), but
                            // other subscribers of sensors/# lose the same messages.
                            tracing::warn!(
                                lost,
                                "the broker dropped messages before its internal subscriber read \
                                 them (its memory log overflowed); readings are unaffected, they \
                                 were logged on arrival"
                            );
                        }
                    }
                    last_offset = Some(offset);
                }
            }
            Some(Notification::Unschedule) => {
                // The router paused us because our buffer filled; without this it never
                // delivers again.
                if let Err(e) = link.ready() {
                    tracing::error!(error = %e, "broker link closed");
                    return;
                }
            }
            Some(_) | None => {}
        }
    }
}
