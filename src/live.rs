//! The live fan-out: every reading the writer newly stored, in log order, to whoever listens
//! (the `/stream` Server-Sent Events endpoint).
//!
//! The writer publishes each stored batch once, without ever waiting: a bounded broadcast keeps
//! the last `capacity` batches for subscribers, and a subscriber that falls further behind is
//! told it lagged (the API then drops it and counts it). Each reading gets an id, increasing
//! across batches and, because the first id derives from the clock, across restarts too; the
//! last `window` readings are kept so that a client reconnecting with `Last-Event-ID` gets what
//! it missed. This module does no I/O and knows nothing of HTTP.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::broadcast;

use crate::domain::{Reading, Timestamp};

/// Readings a reconnecting client can catch up on.
pub const WINDOW: usize = 10_000;
/// Batches a subscriber may be behind before it is dropped.
pub const CAPACITY: usize = 1024;
/// Readings a subscriber may be behind before it is dropped (whichever bound it reaches first).
pub const MAX_LAG: u64 = WINDOW as u64;

/// Consecutive readings with consecutive ids, starting at `first_id`.
#[derive(Debug)]
pub struct Chunk {
    pub first_id: u64,
    pub readings: Vec<Reading>,
}

impl Chunk {
    /// The readings with their ids.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &Reading)> {
        (self.first_id..).zip(&self.readings)
    }

    pub fn last_id(&self) -> u64 {
        self.first_id + self.readings.len() as u64 - 1
    }
}

#[derive(Debug)]
struct Recent {
    next_id: u64,
    chunks: VecDeque<Arc<Chunk>>,
    readings: usize,
}

#[derive(Debug)]
pub struct Live {
    tx: broadcast::Sender<Arc<Chunk>>,
    recent: Mutex<Recent>,
    window: usize,
    /// Subscribers dropped for falling behind.
    pub dropped: AtomicU64,
    /// Subscribers connected now.
    pub subscribers: AtomicU64,
    /// The id the next reading will get.
    next_id: AtomicU64,
}

/// What a new subscriber gets: the readings it missed (if it said where it was), then the live
/// feed. `gap` says some it missed are no longer kept.
#[derive(Debug)]
pub struct Subscription {
    pub missed: Vec<Arc<Chunk>>,
    pub gap: bool,
    pub rx: broadcast::Receiver<Arc<Chunk>>,
}

impl Default for Live {
    fn default() -> Self {
        Self::new(WINDOW, CAPACITY)
    }
}

impl Live {
    pub fn new(window: usize, capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(capacity.max(1));
        // Microseconds of the clock: a restarted process continues above the ids it handed out
        // (unless it published over a million readings a second).
        let first = u64::try_from(Timestamp::now().as_millis()).unwrap_or(1) * 1000;
        Self {
            tx,
            recent: Mutex::new(Recent {
                next_id: first,
                chunks: VecDeque::new(),
                readings: 0,
            }),
            window,
            dropped: AtomicU64::new(0),
            subscribers: AtomicU64::new(0),
            next_id: AtomicU64::new(first),
        }
    }

    fn recent(&self) -> MutexGuard<'_, Recent> {
        self.recent
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Hands newly stored readings to every subscriber. Never waits for one.
    pub fn publish<'a>(&self, readings: impl IntoIterator<Item = &'a Reading>) {
        let readings: Vec<Reading> = readings.into_iter().cloned().collect();
        if readings.is_empty() {
            return;
        }
        let mut recent = self.recent();
        let chunk = Arc::new(Chunk {
            first_id: recent.next_id,
            readings,
        });
        recent.next_id += chunk.readings.len() as u64;
        self.next_id.store(recent.next_id, Ordering::Relaxed);
        recent.readings += chunk.readings.len();
        recent.chunks.push_back(Arc::clone(&chunk));
        while recent.readings > self.window && recent.chunks.len() > 1 {
            if let Some(old) = recent.chunks.pop_front() {
                recent.readings -= old.readings.len();
            }
        }
        // Sent under the lock, so a subscriber sees every chunk exactly once: either in what it
        // missed or on its receiver. No receiver is not an error.
        let _ = self.tx.send(chunk);
    }

    /// Subscribes; with `last_id`, the readings after it that are still kept come first.
    pub fn subscribe(&self, last_id: Option<u64>) -> Subscription {
        let recent = self.recent();
        let rx = self.tx.subscribe();
        let Some(last) = last_id else {
            return Subscription {
                missed: Vec::new(),
                gap: false,
                rx,
            };
        };
        let oldest = recent.chunks.front().map_or(recent.next_id, |c| c.first_id);
        // An id this process never handed out (from the future, or long ago) is a gap too.
        let gap = last.saturating_add(1) < oldest || last >= recent.next_id;
        let missed = recent
            .chunks
            .iter()
            .filter(|c| c.last_id() > last)
            .cloned()
            .collect();
        Subscription { missed, gap, rx }
    }

    /// How many readings were published after `chunk`: how far behind its reader is.
    pub fn behind(&self, chunk: &Chunk) -> u64 {
        self.next_id
            .load(Ordering::Relaxed)
            .saturating_sub(chunk.last_id() + 1)
    }

    /// The id the next reading will get: a reader whose next expected id is `n` is
    /// `head() - n` readings behind.
    pub fn head(&self) -> u64 {
        self.next_id.load(Ordering::Relaxed)
    }

    pub fn count_dropped(&self) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Kind, SensorId};

    fn readings(n: usize) -> Vec<Reading> {
        (0..n)
            .map(|i| {
                Reading::new(
                    SensorId::parse("s").unwrap(),
                    Kind::parse("t").unwrap(),
                    i as f64,
                    Timestamp::from_millis(i as i64).unwrap(),
                )
                .unwrap()
            })
            .collect()
    }

    fn ids(chunks: &[Arc<Chunk>]) -> Vec<u64> {
        chunks
            .iter()
            .flat_map(|c| c.iter().map(|(id, _)| id).collect::<Vec<_>>())
            .collect()
    }

    #[test]
    fn a_reconnecting_subscriber_gets_what_it_missed_once() {
        let live = Live::new(100, 16);
        let mut first = live.subscribe(None);
        live.publish(&readings(3));
        let chunk = first.rx.try_recv().unwrap();
        let last = chunk.last_id();
        live.publish(&readings(2));
        let again = live.subscribe(Some(last));
        assert!(!again.gap);
        assert_eq!(ids(&again.missed), vec![last + 1, last + 2]);
        let from_start = live.subscribe(Some(chunk.first_id - 1));
        assert!(!from_start.gap);
        assert_eq!(ids(&from_start.missed).len(), 5);
    }

    #[test]
    fn the_window_is_bounded_and_beyond_it_is_a_gap() {
        let live = Live::new(10, 16);
        let first = {
            let mut sub = live.subscribe(None);
            live.publish(&readings(4));
            sub.rx.try_recv().unwrap().first_id
        };
        for _ in 0..5 {
            live.publish(&readings(4));
        }
        let late = live.subscribe(Some(first));
        assert!(late.gap);
        assert!(ids(&late.missed).len() <= 12);
        assert!(live.subscribe(Some(u64::MAX - 1)).gap);
    }

    #[test]
    fn a_subscriber_that_falls_behind_is_told() {
        let live = Live::new(10, 2);
        let mut sub = live.subscribe(None);
        for _ in 0..5 {
            live.publish(&readings(1));
        }
        assert!(matches!(
            sub.rx.try_recv(),
            Err(broadcast::error::TryRecvError::Lagged(_))
        ));
        let mut next = live.subscribe(None);
        live.publish(&readings(3));
        let chunk = next.rx.try_recv().unwrap();
        assert_eq!(live.behind(&chunk), 0);
        live.publish(&readings(4));
        assert_eq!(live.behind(&chunk), 4);
    }
}
