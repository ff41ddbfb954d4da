//! A short memory of the time ranges this process wrote readings into, so a reader that cached
//! a query's answer can ask "did anything land in my range since?" without asking MongoDB.

use std::collections::VecDeque;
use std::sync::Mutex;

use crate::domain::Timestamp;

/// Writes remembered; older ones are forgotten, and a question reaching past them is answered
/// "maybe" (true), never "no".
const REMEMBERED: usize = 4096;

#[derive(Debug, Default)]
pub struct WriteLog {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// The epoch of the newest write.
    epoch: u64,
    /// (epoch, earliest, latest timestamp written), oldest first.
    writes: VecDeque<(u64, Timestamp, Timestamp)>,
}

impl WriteLog {
    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The current epoch: read it before a query, pass it to `touched_since` after.
    pub fn epoch(&self) -> u64 {
        self.inner().epoch
    }

    /// Records a write of readings timestamped within `earliest..=latest`. Call it after the
    /// write completed (or failed: it may have been partly applied).
    pub fn record(&self, earliest: Timestamp, latest: Timestamp) {
        let mut inner = self.inner();
        inner.epoch += 1;
        let epoch = inner.epoch;
        inner.writes.push_back((epoch, earliest, latest));
        if inner.writes.len() > REMEMBERED {
            inner.writes.pop_front();
        }
    }

    /// Whether a write after `epoch` may have touched `start..=end`.
    pub fn touched_since(&self, epoch: u64, start: Timestamp, end: Timestamp) -> bool {
        let inner = self.inner();
        if inner.epoch == epoch {
            return false;
        }
        let remembered_from = inner.writes.front().map_or(u64::MAX, |(e, ..)| *e);
        if remembered_from > epoch + 1 {
            return true;
        }
        inner
            .writes
            .iter()
            .rev()
            .take_while(|(e, ..)| *e > epoch)
            .any(|(_, earliest, latest)| *earliest <= end && start <= *latest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(ms: i64) -> Timestamp {
        Timestamp::from_millis(ms).unwrap()
    }

    #[test]
    fn only_overlapping_later_writes_count() {
        let log = WriteLog::default();
        log.record(t(0), t(10));
        let epoch = log.epoch();
        assert!(
            !log.touched_since(epoch, t(0), t(10)),
            "writes before the epoch do not count"
        );
        log.record(t(100), t(200));
        assert!(!log.touched_since(epoch, t(0), t(99)));
        assert!(log.touched_since(epoch, t(0), t(100)));
        assert!(log.touched_since(epoch, t(150), t(160)));
        assert!(log.touched_since(epoch, t(200), t(300)));
        assert!(!log.touched_since(log.epoch(), t(0), t(1000)));
    }

    #[test]
    fn a_forgotten_past_is_a_maybe() {
        let log = WriteLog::default();
        let epoch = log.epoch();
        for _ in 0..=REMEMBERED {
            log.record(t(1_000_000), t(1_000_000));
        }
        assert!(log.touched_since(epoch, t(0), t(1)));
    }
}
