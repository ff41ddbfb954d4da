//! `/stream`: Server-Sent Events of readings as they are stored, fed by `live`.
//!
//! Each event is one reading (`id:` its live id, `data:` its JSON). A client that reconnects
//! with `Last-Event-ID` first gets what it missed, if it is still kept; if not, an event of type
//! `gap` says so. A client that cannot keep up is dropped (its connection ends) and counted: the
//! writer never waits for it.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::stream;
use poem::web::sse::Event;
use poem_openapi::OpenApi;
use poem_openapi::param::{Header, Query};
use tokio::sync::broadcast::error::RecvError;

use super::access::ReadKey;
use super::types::{EventStreamOf, ReadingOut, Reply};
use super::{ApiState, Tag};
use crate::domain::Reading;
use crate::live::{Chunk, Live, MAX_LAG};

pub struct Stream {
    pub state: ApiState,
}

/// Which readings a subscriber wants.
struct Filter {
    sensor_ids: Vec<String>,
    kind: Option<String>,
}

impl Filter {
    fn wants(&self, r: &Reading) -> bool {
        (self.sensor_ids.is_empty()
            || self
                .sensor_ids
                .iter()
                .any(|id| id == r.sensor_id().as_str()))
            && self.kind.as_deref().is_none_or(|k| k == r.kind().as_str())
    }
}

/// Counts the subscriber while it is connected.
struct Connected(Arc<Live>);

impl Drop for Connected {
    fn drop(&mut self) {
        self.0.subscribers.fetch_sub(1, Ordering::Relaxed);
    }
}

struct State {
    pending: VecDeque<Event>,
    rx: tokio::sync::broadcast::Receiver<Arc<Chunk>>,
    filter: Filter,
    /// Readings with an id up to this were sent (or skipped) already.
    sent_up_to: u64,
    /// The id of the next reading this subscriber would receive from the feed.
    position: u64,
    /// Already counted as dropped.
    counted: bool,
    connected: Connected,
}

impl Drop for State {
    /// A client that stopped reading is not polled any more, so it never sees that it lagged:
    /// its connection is cut by the HTTP write deadline (`api::deadline`), and counted here.
    fn drop(&mut self) {
        let live = &self.connected.0;
        if !self.counted && live.head().saturating_sub(self.position) > MAX_LAG {
            live.count_dropped();
            tracing::info!("a /stream client stopped reading and was cut off");
        }
    }
}

impl State {
    fn take(&mut self, chunk: &Chunk) {
        for (id, r) in chunk.iter() {
            if id > self.sent_up_to && self.filter.wants(r) {
                self.pending
                    .push_back(Event::message(r.to_json()).id(id.to_string()));
            }
        }
        self.sent_up_to = self
            .sent_up_to
            .max(chunk.first_id + chunk.readings.len() as u64 - 1);
    }
}

#[OpenApi(tag = "Tag::Live")]
impl Stream {
    /// Live readings (Server-Sent Events)
    ///
    /// Each reading once it is stored, as an SSE event: `id` (for `Last-Event-ID`), `data` the
    /// reading's JSON. Comment lines (`:`) are heartbeats. Reconnecting with `Last-Event-ID`
    /// replays what was missed, within the last 10,000 readings; beyond that an event of type
    /// `gap` comes first. A client that falls behind is disconnected (counted in
    /// `sensorhub_stream_dropped_total`); it never slows ingest.
    #[oai(path = "/stream", method = "get")]
    async fn stream(
        &self,
        _key: ReadKey,
        /// Only these sensors (repeat the parameter for several).
        sensor_id: Query<Vec<String>>,
        /// Only readings of this kind.
        kind: Query<Option<String>>,
        /// Seconds between heartbeats (default 15).
        #[oai(validator(minimum(value = "1"), maximum(value = "300")))]
        heartbeat_secs: Query<Option<u32>>,
        /// The id of the last event received, to resume after it.
        #[oai(name = "Last-Event-ID")]
        last_event_id: Header<Option<String>>,
    ) -> Reply<EventStreamOf<ReadingOut>> {
        let live = Arc::clone(&self.state.live);
        // An id that is not a number names no place in the stream: resume from nothing, a gap.
        let last = last_event_id
            .0
            .as_deref()
            .map(|t| t.trim().parse::<u64>().unwrap_or(u64::MAX));
        let subscription = live.subscribe(last);
        live.subscribers.fetch_add(1, Ordering::Relaxed);
        let mut state = State {
            pending: VecDeque::new(),
            rx: subscription.rx,
            filter: Filter {
                sensor_ids: sensor_id.0,
                kind: kind.0,
            },
            sent_up_to: last.filter(|_| !subscription.gap).unwrap_or(0),
            position: live.head(),
            counted: false,
            connected: Connected(Arc::clone(&live)),
        };
        if subscription.gap {
            state.pending.push_back(
                Event::message(
                    "{\"message\":\"readings after Last-Event-ID are no longer kept; some were missed\"}",
                )
                .event_type("gap"),
            );
        }
        for chunk in &subscription.missed {
            state.take(chunk);
        }
        let events = stream::unfold(state, |mut state| async move {
            loop {
                if let Some(event) = state.pending.pop_front() {
                    return Some((event, state));
                }
                let next = match state.rx.recv().await {
                    Ok(chunk) if state.connected.0.behind(&chunk) <= MAX_LAG => Ok(chunk),
                    Ok(_) => Err(RecvError::Lagged(0)),
                    Err(e) => Err(e),
                };
                match next {
                    Ok(chunk) => {
                        state.position = state.position.max(chunk.last_id() + 1);
                        state.take(&chunk);
                    }
                    Err(RecvError::Lagged(_)) => {
                        state.counted = true;
                        state.connected.0.count_dropped();
                        tracing::info!("a /stream client fell behind and was dropped");
                        return None;
                    }
                    Err(RecvError::Closed) => return None,
                }
            }
        });
        let heartbeat = Duration::from_secs(u64::from(heartbeat_secs.0.unwrap_or(15)));
        Reply::Ok(EventStreamOf::new(events, heartbeat), None, None)
    }
}
