//! The roster: the id of every sensor in the summary, with the kinds it reported, held in memory
//! in id order. A page of `/sensors` or `/latest` is then a read of ids known in advance
//! (`_id: {$in: [...]}`), whose cost follows the page, instead of a sorted scan with a limit,
//! which the MongoDB wire server this is tested against answers by walking every summary
//! document (about 120 ms at 100,000 sensors, against about 12 ms for 1,000 ids).
//!
//! It holds ids only, never what is read from them: the documents are read from MongoDB on every
//! call, so a value is as fresh as the summary. The ids come from two places: this process's
//! summary writes (added before the write is sent, so a sensor is listed as soon as its summary
//! exists) and a reload of every summary id that runs every `sensor_list_refresh_secs`, which
//! adds the sensors and kinds other instances created and drops deleted ones. A reload reads the
//! summary in `_id` ranges of about 2,000 sensors cut at the ids it already lists, with a short
//! pause between them, so requests are never queued behind one scan of the whole summary. It is a superset
//! filter: an id whose document is gone, or lost the kind asked for, is skipped by the read.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Kinds with a bit of their own; the last bit stands for "some kind beyond these".
const KIND_BITS: usize = 63;
const OTHER_KINDS: u64 = 1 << KIND_BITS;

#[derive(Debug, Default)]
pub struct Roster {
    inner: RwLock<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Whether a reload completed: before that the roster may miss sensors and is not used.
    loaded: bool,
    /// Sensor id -> the bits of its kinds.
    ids: BTreeMap<Box<str>, u64>,
    /// Kind names in the order they were first seen; a kind's bit is its position.
    kinds: Vec<Box<str>>,
    /// While a reload runs: what was added meanwhile, merged into the reload's result.
    added: Option<Vec<(Box<str>, u64)>>,
}

impl Inner {
    fn bit(&mut self, kind: &str) -> u64 {
        let at = match self.kinds.iter().position(|k| &**k == kind) {
            Some(at) => at,
            None => {
                self.kinds.push(kind.into());
                self.kinds.len() - 1
            }
        };
        if at < KIND_BITS { 1 << at } else { OTHER_KINDS }
    }

    /// The bits a sensor must have one of to report `kind`; 0 when none can.
    fn wanted(&self, kind: &str) -> u64 {
        match self.kinds.iter().position(|k| &**k == kind) {
            Some(at) if at < KIND_BITS => 1 << at,
            Some(_) => OTHER_KINDS,
            None if self.kinds.len() > KIND_BITS => OTHER_KINDS,
            None => 0,
        }
    }
}

/// Sensors found by a reload, to be installed with `Roster::finish_reload`.
#[derive(Debug, Default)]
pub struct Reloaded {
    ids: Vec<(Box<str>, Vec<String>)>,
}

impl Reloaded {
    pub fn push(&mut self, id: &str, kinds: Vec<String>) {
        self.ids.push((id.into(), kinds));
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }
}

impl Roster {
    fn read(&self) -> RwLockReadGuard<'_, Inner> {
        self.inner
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, Inner> {
        self.inner
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Lists `id` with `kinds` (a summary write of this process is about to create them).
    pub fn add<'a>(&self, id: &str, kinds: impl IntoIterator<Item = &'a str>) {
        let mut inner = self.write();
        let mut bits = 0;
        for kind in kinds {
            bits |= inner.bit(kind);
        }
        *inner.ids.entry(id.into()).or_default() |= bits;
        if let Some(added) = inner.added.as_mut() {
            added.push((id.into(), bits));
        }
    }

    /// Starts remembering additions, for the reload about to read every summary id.
    pub fn begin_reload(&self) {
        self.write().added = Some(Vec::new());
    }

    /// Replaces the roster with what a reload read, plus what was added since it began.
    pub fn finish_reload(&self, reloaded: Reloaded) {
        let mut inner = self.write();
        let mut ids = BTreeMap::new();
        for (id, kinds) in reloaded.ids {
            let mut bits = 0;
            for kind in &kinds {
                bits |= inner.bit(kind);
            }
            ids.insert(id, bits);
        }
        for (id, bits) in inner.added.take().unwrap_or_default() {
            *ids.entry(id).or_default() |= bits;
        }
        inner.ids = ids;
        inner.loaded = true;
    }

    /// Forgets the additions of a reload that failed (the roster stays as it was).
    pub fn abandon_reload(&self) {
        self.write().added = None;
    }

    /// Ids that cut the listed ones into runs of `every`: a reload reads the summary one range
    /// between two of them at a time, so it never holds the server for a whole scan.
    pub fn boundaries(&self, every: usize) -> Vec<String> {
        self.read()
            .ids
            .keys()
            .skip(every)
            .step_by(every.max(1))
            .map(|id| id.to_string())
            .collect()
    }

    /// Up to `n` ids in ascending order, after `after`, starting with `prefix`, that may have
    /// reported `kind`; `None` until the first reload completed.
    pub fn page(
        &self,
        prefix: Option<&str>,
        kind: Option<&str>,
        after: Option<&str>,
        n: usize,
    ) -> Option<Vec<String>> {
        let inner = self.read();
        if !inner.loaded {
            return None;
        }
        let wanted = kind.map(|k| inner.wanted(k));
        if wanted == Some(0) {
            return Some(Vec::new());
        }
        let prefix = prefix.unwrap_or_default();
        let start = match after {
            Some(after) if after >= prefix => Bound::Excluded(after),
            _ => Bound::Included(prefix),
        };
        Some(
            inner
                .ids
                .range::<str, _>((start, Bound::Unbounded))
                .take_while(|(id, _)| id.starts_with(prefix))
                .filter(|(_, bits)| wanted.is_none_or(|w| *bits & w != 0))
                .take(n)
                .map(|(id, _)| id.to_string())
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loaded(sensors: &[(&str, &[&str])]) -> Roster {
        let roster = Roster::default();
        roster.begin_reload();
        let mut reloaded = Reloaded::default();
        for (id, kinds) in sensors {
            reloaded.push(id, kinds.iter().map(|k| (*k).to_owned()).collect());
        }
        roster.finish_reload(reloaded);
        roster
    }

    #[test]
    fn unused_until_a_reload_completed() {
        let roster = Roster::default();
        roster.add("a", ["t"]);
        assert_eq!(roster.page(None, None, None, 10), None);
        roster.begin_reload();
        roster.add("b", ["t"]);
        assert_eq!(roster.page(None, None, None, 10), None);
        roster.finish_reload(Reloaded::default());
        assert_eq!(
            roster.page(None, None, None, 10),
            Some(vec!["b".to_owned()]),
            "what was added during the reload is kept; a, added before, is the reload's to find"
        );
    }

    #[test]
    fn pages_in_id_order_after_a_cursor_within_a_prefix() {
        let roster = loaded(&[
            ("b-2", &["t"]),
            ("a-1", &["t"]),
            ("b-1", &["t"]),
            ("b-10", &["t"]),
            ("c", &["t"]),
        ]);
        let page = |prefix, after, n| roster.page(prefix, None, after, n).unwrap();
        assert_eq!(page(None, None, 2), ["a-1", "b-1"]);
        assert_eq!(page(None, Some("b-1"), 2), ["b-10", "b-2"]);
        assert_eq!(page(Some("b-"), None, 10), ["b-1", "b-10", "b-2"]);
        assert_eq!(page(Some("b-"), Some("a"), 10), ["b-1", "b-10", "b-2"]);
        assert_eq!(page(Some("b-"), Some("b-10"), 10), ["b-2"]);
        assert!(page(Some("b-"), Some("b-2"), 10).is_empty());
        assert!(page(Some("a-"), Some("b"), 10).is_empty());
    }

    #[test]
    fn boundaries_cut_runs_of_the_given_length() {
        let ids: Vec<String> = (0..7).map(|i| format!("s{i}")).collect();
        let sensors: Vec<(&str, &[&str])> = ids.iter().map(|id| (id.as_str(), &[][..])).collect();
        let roster = loaded(&sensors);
        assert_eq!(roster.boundaries(3), ["s3", "s6"]);
        assert_eq!(roster.boundaries(7), Vec::<String>::new());
        assert!(Roster::default().boundaries(3).is_empty());
    }

    #[test]
    fn filters_by_kind_and_keeps_additions() {
        let roster = loaded(&[("a", &["t"]), ("b", &["h", "t"]), ("c", &["h"])]);
        assert_eq!(roster.page(None, Some("h"), None, 10).unwrap(), ["b", "c"]);
        assert!(roster.page(None, Some("p"), None, 10).unwrap().is_empty());
        roster.add("a", ["p"]);
        roster.add("d", ["p"]);
        assert_eq!(roster.page(None, Some("p"), None, 10).unwrap(), ["a", "d"]);
        assert_eq!(roster.page(None, Some("t"), None, 10).unwrap(), ["a", "b"]);
        assert_eq!(roster.page(None, None, None, 10).unwrap().len(), 4);
    }

    #[test]
    fn a_reload_drops_what_is_gone() {
        let roster = loaded(&[("a", &["t"]), ("b", &["t"])]);
        roster.begin_reload();
        let mut reloaded = Reloaded::default();
        reloaded.push("b", vec!["t".into()]);
        roster.finish_reload(reloaded);
        assert_eq!(roster.page(None, None, None, 10).unwrap(), ["b"]);
        roster.begin_reload();
        roster.add("c", ["t"]);
        roster.abandon_reload();
        assert_eq!(roster.page(None, None, None, 10).unwrap(), ["b", "c"]);
    }

    #[test]
    fn kinds_beyond_the_bits_are_candidates_for_any_rare_kind() {
        let kinds: Vec<String> = (0..70).map(|i| format!("k{i}")).collect();
        let roster = loaded(&[]);
        for (i, kind) in kinds.iter().enumerate() {
            roster.add(&format!("s{i:02}"), [kind.as_str()]);
        }
        assert_eq!(roster.page(None, Some("k0"), None, 10).unwrap(), ["s00"]);
        let rare = roster.page(None, Some("k65"), None, 10).unwrap();
        assert!(rare.contains(&"s65".to_owned()), "{rare:?}");
        assert!(!rare.contains(&"s00".to_owned()), "{rare:?}");
        assert_eq!(
            roster.page(None, Some("never"), None, 10).unwrap().len(),
            7,
            "an unknown kind past the bits may be any of the sensors beyond them"
        );
    }
}
