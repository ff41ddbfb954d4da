//! Range pages answered recently, kept for a moment: dashboards ask for the same window again and
//! again, and a page of a thousand readings costs the database far more than it costs to keep.
//!
//! A kept page is served only while no write through this process touched its time range since
//! the page was read (`store::WriteLog`), and for at most the time to live, which bounds writes by
//! other processes. A page read while a write touched its range is not kept at all.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::domain::Timestamp;
use crate::store::WriteLog;

/// Pages kept at most, and their bytes at most; past either the memo starts over.
const MAX_PAGES: usize = 1024;
const MAX_BYTES: usize = 32 << 20;

#[derive(Clone, Debug)]
pub struct Page {
    pub body: Bytes,
    pub link: Option<String>,
}

#[derive(Debug)]
struct Kept {
    page: Page,
    start: Timestamp,
    end: Timestamp,
    epoch: u64,
    at: Instant,
}

#[derive(Debug)]
pub struct RangeMemo {
    ttl: Duration,
    inner: Mutex<(HashMap<String, Kept>, usize)>,
}

impl RangeMemo {
    /// A zero `ttl` keeps nothing.
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            inner: Mutex::default(),
        }
    }

    fn inner(&self) -> MutexGuard<'_, (HashMap<String, Kept>, usize)> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The kept page for `key`, if it is still exact.
    pub fn get(&self, key: &str, writes: &WriteLog) -> Option<Page> {
        let inner = self.inner();
        let kept = inner.0.get(key)?;
        (kept.at.elapsed() < self.ttl && !writes.touched_since(kept.epoch, kept.start, kept.end))
            .then(|| kept.page.clone())
    }

    /// Keeps `page`, read for `start..=end` by a query that began at `epoch`, unless a write
    /// touched that range since.
    pub fn keep(
        &self,
        key: String,
        start: Timestamp,
        end: Timestamp,
        epoch: u64,
        page: Page,
        writes: &WriteLog,
    ) {
        if self.ttl.is_zero() || writes.touched_since(epoch, start, end) {
            return;
        }
        let key_len = key.len();
        let size = page.body.len() + key_len;
        let mut inner = self.inner();
        if inner.0.len() >= MAX_PAGES || inner.1 + size > MAX_BYTES {
            inner.0.clear();
            inner.1 = 0;
        }
        inner.1 += size;
        let kept = Kept {
            page,
            start,
            end,
            epoch,
            at: Instant::now(),
        };
        if let Some(old) = inner.0.insert(key, kept) {
            inner.1 -= old.page.body.len() + key_len;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(ms: i64) -> Timestamp {
        Timestamp::from_millis(ms).unwrap()
    }

    fn page(body: &'static [u8]) -> Page {
        Page {
            body: Bytes::from_static(body),
            link: None,
        }
    }

    #[test]
    fn a_write_into_the_range_retires_the_page() {
        let writes = WriteLog::default();
        let memo = RangeMemo::new(Duration::from_secs(60));
        memo.keep(
            "q".into(),
            t(0),
            t(100),
            writes.epoch(),
            page(b"[1]"),
            &writes,
        );
        assert_eq!(
            memo.get("q", &writes).map(|p| p.body),
            Some(Bytes::from_static(b"[1]"))
        );
        writes.record(t(500), t(600));
        assert!(
            memo.get("q", &writes).is_some(),
            "a write elsewhere in time changes nothing"
        );
        writes.record(t(50), t(50));
        assert!(memo.get("q", &writes).is_none());
    }

    #[test]
    fn a_page_read_during_a_write_into_its_range_is_not_kept() {
        let writes = WriteLog::default();
        let memo = RangeMemo::new(Duration::from_secs(60));
        let epoch = writes.epoch();
        writes.record(t(10), t(10));
        memo.keep("q".into(), t(0), t(100), epoch, page(b"[]"), &writes);
        assert!(memo.get("q", &writes).is_none());
    }

    #[test]
    fn a_page_kept_again_is_counted_once() {
        let writes = WriteLog::default();
        let memo = RangeMemo::new(Duration::from_secs(60));
        for _ in 0..3 {
            memo.keep(
                "q".into(),
                t(0),
                t(1),
                writes.epoch(),
                page(b"[1]"),
                &writes,
            );
        }
        assert_eq!(memo.inner().1, "q".len() + b"[1]".len());
    }

    #[test]
    fn zero_ttl_keeps_nothing() {
        let writes = WriteLog::default();
        let memo = RangeMemo::new(Duration::ZERO);
        memo.keep("q".into(), t(0), t(1), writes.epoch(), page(b"[]"), &writes);
        assert!(memo.get("q", &writes).is_none());
    }
}
