//! The in-process subscriber on `sensors/#`: rumqttd's local link, drained as fast as the router
//! fills it.
//!
//! Readings do not depend on it (the capture codec has already logged them); it exists so the
//! router always has a reader for the filter, and to measure what the router itself loses. A
//! reader that falls behind makes rumqttd drop whole segments and jump its cursor with only a
//! warning: the tap sees that as a gap in the offsets of forwarded messages and counts it. It
//! must never wait on anything but the link.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use rumqttd::Notification;
use rumqttd::local::LinkRx;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// Drains `link` until `stop` fires or the router goes away.
pub async fn run(mut link: LinkRx, metrics: Arc<Metrics>, stop: CancellationToken) {
    let mut last_offset: Option<u64> = None;
    loop {
        let next = tokio::select! {
            next = link.next() => next,
            () = stop.cancelled() => return,
        };
        match next {
            Ok(Some(Notification::Forward(forward))) => {
                metrics.link_delivered.fetch_add(1, Ordering::Relaxed);
                if let Some((_, offset)) = forward.cursor {
                    if let Some(last) = last_offset {
                        let lost = offset.saturating_sub(last + 1);
                        if lost > 0 {
                            metrics.link_lost.fetch_add(lost, Ordering::Relaxed);
                            tracing::error!(
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
            Ok(Some(Notification::Unschedule)) => {
                // The router paused us because our buffer filled; without this wake it never
                // delivers again.
                if let Err(e) = link.wake().await {
                    tracing::error!(error = %e, "broker link closed");
                    return;
                }
            }
            Ok(Some(_) | None) => {}
            Err(e) => {
                tracing::error!(error = %e, "broker link closed");
                return;
            }
        }
    }
}
