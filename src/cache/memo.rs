//! The answers of recent latest-ten reads, kept in process for a moment.
//!
//! A hot sensor's set is read far more often than it changes. Every write to a set through this
//! process invalidates its entry after Redis acknowledged it, and a read that raced such a write
//! is not kept (each key carries a version bumped by every invalidation), so what is served
//! equals what Redis holds. Writes by other processes (other sensorhub instances sharing the
//! Redis) are only bounded by the time to live.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;

/// Entries kept at most; past it the memo starts over (it refills in one round trip per key).
const MAX_ENTRIES: usize = 16_384;

#[derive(Debug)]
pub struct Memo {
    ttl: Duration,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    entries: HashMap<String, (Bytes, Instant)>,
    /// The version each invalidated key got: a number no key had before.
    versions: HashMap<String, u64>,
    /// The last version handed out.
    counter: u64,
    /// The version of a key not in `versions`: 0 at first, and after `versions` is cleared the
    /// counter at that moment, so no read that began before the clear can match it.
    floor: u64,
}

impl Inner {
    fn version(&self, key: &str) -> u64 {
        self.versions.get(key).copied().unwrap_or(self.floor)
    }
}

impl Memo {
    /// A zero `ttl` keeps nothing.
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            inner: Mutex::default(),
        }
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The kept answer for `key`, or the version to hand to `keep` after reading Redis.
    pub fn get(&self, key: &str) -> Result<Bytes, u64> {
        let inner = self.inner();
        match inner.entries.get(key) {
            Some((body, at)) if at.elapsed() < self.ttl => Ok(body.clone()),
            _ => Err(inner.version(key)),
        }
    }

    /// Keeps `body` for `key` unless the key was invalidated since `version` was read.
    pub fn keep(&self, key: &str, version: u64, body: Bytes) {
        if self.ttl.is_zero() {
            return;
        }
        let mut inner = self.inner();
        if inner.version(key) != version {
            return;
        }
        if inner.entries.len() >= MAX_ENTRIES {
            inner.entries.clear();
        }
        inner.entries.insert(key.to_owned(), (body, Instant::now()));
    }

    /// Forgets `keys`; reads of them that are under way will not be kept.
    pub fn invalidate<'a>(&self, keys: impl IntoIterator<Item = &'a str>) {
        let mut inner = self.inner();
        for key in keys {
            inner.entries.remove(key);
            inner.counter += 1;
            let version = inner.counter;
            inner.versions.insert(key.to_owned(), version);
        }
        if inner.versions.len() > MAX_ENTRIES * 4 {
            // Versions only need to outlive reads in flight. Every key now has the floor, a
            // version newer than any handed out, so reads under way will not be kept.
            inner.versions.clear();
            inner.entries.clear();
            inner.floor = inner.counter;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_that_raced_a_write_is_not_kept_even_when_the_versions_start_over() {
        let memo = Memo::new(Duration::from_secs(60));
        let version = memo.get("k").unwrap_err();
        memo.invalidate(["k"]);
        // Enough other keys written that the memo forgets every version, "k"'s included.
        let others: Vec<String> = (0..=MAX_ENTRIES * 4).map(|i| format!("o{i}")).collect();
        memo.invalidate(others.iter().map(String::as_str));
        memo.keep("k", version, Bytes::from_static(b"old"));
        assert!(
            memo.get("k").is_err(),
            "the read began before the write to k"
        );
    }

    #[test]
    fn a_read_that_raced_a_write_is_not_kept() {
        let memo = Memo::new(Duration::from_secs(60));
        let version = memo.get("k").unwrap_err();
        memo.invalidate(["k"]);
        memo.keep("k", version, Bytes::from_static(b"old"));
        let version = memo.get("k").unwrap_err();
        memo.keep("k", version, Bytes::from_static(b"new"));
        assert_eq!(memo.get("k"), Ok(Bytes::from_static(b"new")));
        memo.invalidate(["k"]);
        assert!(memo.get("k").is_err());
    }

    #[test]
    fn entries_expire_and_zero_keeps_nothing() {
        let memo = Memo::new(Duration::ZERO);
        memo.keep("k", 0, Bytes::from_static(b"x"));
        assert!(memo.get("k").is_err());
        let memo = Memo::new(Duration::from_millis(1));
        memo.keep("k", 0, Bytes::from_static(b"x"));
        std::thread::sleep(Duration::from_millis(5));
        assert!(memo.get("k").is_err());
    }
}
