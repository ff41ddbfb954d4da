//! Redis: the latest ten readings of each sensor, and of all sensors, for hot reads.
//!
//! Each set is a sorted set scored by the reading's device timestamp and trimmed to ten, so late
//! and out-of-order readings land where their time says and an old one never displaces the
//! newest ten. Members are the readings' public JSON (`Reading::to_json`), so a read is one
//! `ZRANGE` joined into an array, with no parsing. Redis keys and commands stay in this module.
//!
//! Redis is a cache of MongoDB here, never the record: `Health` tracks which sets may be stale
//! (Redis down, restarted, or flushed) so readers can go to MongoDB instead, and the ingest
//! repair task rebuilds them. This module must not read MongoDB itself.

mod memo;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use fred::prelude::{
    Builder, Client, ClientLike, ClusterInterface, Config, KeysInterface, ReconnectPolicy,
    SortedSetsInterface,
};
use fred::types::InfoKind;
use fred::types::scripts::Script;

use bytes::Bytes;

use crate::domain::{Kind, Reading, SensorId, Timestamp, json_array};
use memo::Memo;

/// How many readings each latest set keeps.
pub const LATEST: usize = 10;

#[derive(Clone, Debug)]
pub struct CacheConfig {
    pub url: String,
    /// Prepended to every key, so several deployments (or tests) can share one Redis.
    pub prefix: String,
    /// A command not answered within this time fails (and the caller falls back).
    pub command_timeout: Duration,
    /// How long a latest-ten answer read from Redis may be served again from memory. Writes
    /// through this process invalidate it at once; this bounds only other writers. Zero: never.
    pub memo_ttl: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("REDIS_URL is not a valid Redis connection string")]
    Config(#[source] fred::error::Error),
    #[error("Redis is unreachable or failed the command")]
    Unavailable(#[from] fred::error::Error),
}

/// Hash-tag groups the sensors' sets are spread over on a Redis Cluster: enough that each of a
/// few dozen masters holds a share, few enough that a batch costs a handful of script calls.
const CLUSTER_GROUPS: u32 = 64;

#[derive(Clone)]
pub struct Cache {
    client: Client,
    prefix: String,
    /// A Redis Cluster: the sensors' sets are spread over `CLUSTER_GROUPS` slots.
    clustered: bool,
    memo: std::sync::Arc<Memo>,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// What a consistency check of Redis found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// Redis's run id; it changes whenever Redis restarts.
    pub run_id: String,
    /// Whether our marker key survived (it does not survive a flush).
    pub marked: bool,
}

impl Cache {
    /// Connects, failing fast when Redis is down; afterwards reconnects forever with backoff.
    pub async fn connect(config: &CacheConfig) -> Result<Self, CacheError> {
        let redis = Config::from_url(&config.url).map_err(CacheError::Config)?;
        let timeout = config.command_timeout;
        let client = Builder::from_config(redis)
            .with_connection_config(|c| {
                c.connection_timeout = timeout;
                c.internal_command_timeout = timeout;
                // Bounded: when Redis stalls, commands fail instead of piling up in memory.
                c.max_command_buffer_len = 100_000;
            })
            .with_performance_config(|p| p.default_command_timeout = timeout)
            .set_policy(ReconnectPolicy::new_exponential(0, 100, 2_000, 2))
            .build()
            .map_err(CacheError::Config)?;
        let clustered = client.client_config().server.is_clustered();
        // The connection task ends with the client; its result is the client's state.
        let _connection = client.init().await?;
        Ok(Self {
            client,
            prefix: config.prefix.clone(),
            clustered,
            memo: std::sync::Arc::new(Memo::new(config.memo_ttl)),
        })
    }

    pub fn is_connected(&self) -> bool {
        self.client.is_connected()
    }

    /// One PING (on a cluster, to the node fred picks), for readiness.
    pub async fn ping(&self) -> Result<(), CacheError> {
        let _: String = self.client.ping(None).await?;
        Ok(())
    }

    // Keys are `{<prefix>}:latest:<sensor id>`, `{<prefix>}:latest` and `{<prefix>}:intact`. The
    // braces are a Redis Cluster hash tag. On a single Redis every key shares it, so one script
    // call updates a whole batch. On a Redis Cluster a script may only touch one slot, and one
    // tag would put the whole cache on one master: there a sensor's set is tagged
    // `{<prefix>:<group>}` with the group a hash of its id, each group has its own marker, and
    // a batch costs one script call per group it touches (plus one for the overall set).
    fn group_tag(&self, id: &SensorId) -> String {
        if self.clustered {
            format!("{}:{:02}", self.prefix, group_of(id))
        } else {
            self.prefix.clone()
        }
    }

    fn sensor_key(&self, id: &SensorId) -> String {
        format!("{{{}}}:latest:{}", self.group_tag(id), id.as_str())
    }

    fn overall_key(&self) -> String {
        format!("{{{}}}:latest", self.prefix)
    }

    /// The markers whose absence reveals a flush or a master that lost its data.
    fn marker_keys(&self) -> Vec<String> {
        let mut keys = vec![format!("{{{}}}:intact", self.prefix)];
        if self.clustered {
            keys.extend((0..CLUSTER_GROUPS).map(|g| format!("{{{}:{g:02}}}:intact", self.prefix)));
        }
        keys
    }

    /// Adds `readings` to their sensors' sets and to the overall set, keeping ten in each, in
    /// one round trip. Adding a reading that is already there changes nothing.
    pub async fn apply(&self, readings: &[Reading]) -> Result<(), CacheError> {
        if readings.is_empty() {
            return Ok(());
        }
        let mut by_sensor: HashMap<&SensorId, Vec<&Reading>> = HashMap::new();
        for r in readings {
            by_sensor.entry(r.sensor_id()).or_default().push(r);
        }
        let overall = (self.overall_key(), readings.iter().collect());
        if !self.clustered {
            let mut sets: Vec<(String, Vec<&Reading>)> = by_sensor
                .into_iter()
                .map(|(id, rs)| (self.sensor_key(id), rs))
                .collect();
            sets.push(overall);
            return self.merge(sets).await;
        }
        let mut by_tag: HashMap<String, Vec<(String, Vec<&Reading>)>> = HashMap::new();
        for (id, rs) in by_sensor {
            by_tag
                .entry(self.group_tag(id))
                .or_default()
                .push((self.sensor_key(id), rs));
        }
        let calls = by_tag
            .into_values()
            .chain([vec![overall]])
            .map(|sets| self.merge(sets));
        futures_util::future::try_join_all(calls).await?;
        Ok(())
    }

    /// Merges readings taken from MongoDB into one set (a sensor's, or the overall one).
    /// Readings are only ever added, so a concurrent live update is never undone.
    pub async fn rebuild(
        &self,
        sensor: Option<&SensorId>,
        readings: &[Reading],
    ) -> Result<(), CacheError> {
        if readings.is_empty() {
            return Ok(());
        }
        let key = sensor.map_or_else(|| self.overall_key(), |id| self.sensor_key(id));
        self.merge(vec![(key, readings.iter().collect())]).await
    }

    /// Removes from the sensor's set and from the overall set the readings of `sensor` timestamped
    /// within `start..=end` (of `kind` only, when given): what a delete in MongoDB removed.
    /// Only those members go, so readings added meanwhile stay; refill the sets with `rebuild`.
    pub async fn forget(
        &self,
        sensor: &SensorId,
        start: Timestamp,
        end: Timestamp,
        kind: Option<&Kind>,
    ) -> Result<(), CacheError> {
        for key in [self.sensor_key(sensor), self.overall_key()] {
            let members: Vec<String> = self
                .client
                .zrangebyscore(&key, start.as_millis(), end.as_millis(), false, None)
                .await?;
            let gone: Vec<String> = members
                .into_iter()
                .filter(|m| {
                    let Ok(v) = serde_json::from_str::<serde_json::Value>(m) else {
                        return false;
                    };
                    v["sensor_id"] == sensor.as_str()
                        && kind.is_none_or(|k| v["kind"] == k.as_str())
                })
                .collect();
            if !gone.is_empty() {
                let result: Result<i64, _> = self.client.zrem(&key, gone).await;
                self.memo.invalidate([key.as_str()]);
                result?;
            }
        }
        Ok(())
    }

    /// `ZADD` then trim to ten, for every set, in one script call. A pipeline would do too, but
    /// fred flushes the socket after each command of a pipeline: one write(2) per command.
    async fn merge(&self, sets: Vec<(String, Vec<&Reading>)>) -> Result<(), CacheError> {
        let mut keys = Vec::with_capacity(sets.len());
        let mut args: Vec<String> = Vec::with_capacity(1 + sets.len() * 4);
        args.push(LATEST.to_string());
        for (key, mut readings) in sets {
            // Only the newest ten of a batch can survive the trim.
            readings.sort_by_key(|r| std::cmp::Reverse(r.timestamp()));
            readings.truncate(LATEST);
            keys.push(key);
            args.push(readings.len().to_string());
            for r in readings {
                args.push(r.timestamp().as_millis().to_string());
                args.push(r.to_json());
            }
        }
        let result: Result<i64, _> = MERGE
            .evalsha_with_reload(&self.client, keys.clone(), args)
            .await;
        // After the write (it may have applied even if it failed): reads from now on see it.
        self.memo.invalidate(keys.iter().map(String::as_str));
        result?;
        Ok(())
    }

    /// The latest ten as one JSON array, newest first; `None` when the set is empty or absent.
    pub async fn latest(&self, sensor: Option<&SensorId>) -> Result<Option<Bytes>, CacheError> {
        let key = sensor.map_or_else(|| self.overall_key(), |id| self.sensor_key(id));
        let version = match self.memo.get(&key) {
            Ok(body) => return Ok(Some(body)),
            Err(version) => version,
        };
        let members: Vec<String> = self
            .client
            .zrange(&key, 0i64, LATEST as i64 - 1, None, true, None, false)
            .await?;
        if members.is_empty() {
            return Ok(None);
        }
        let body = Bytes::from(json_array(&members));
        self.memo.keep(&key, version, body.clone());
        Ok(Some(body))
    }

    /// Reads Redis's run id (on a cluster, every master's, joined) and whether every marker is
    /// still there.
    pub async fn probe(&self) -> Result<Probe, CacheError> {
        let run_id = if self.clustered {
            let mut primaries = self
                .client
                .cached_cluster_state()
                .map(|state| state.unique_primary_nodes())
                .unwrap_or_default();
            primaries.sort_by_key(ToString::to_string);
            let mut ids = Vec::with_capacity(primaries.len());
            for node in primaries {
                let info: String = self
                    .client
                    .with_cluster_node(&node)
                    .info(Some(InfoKind::Server))
                    .await?;
                ids.push(run_id_of(&info));
            }
            ids.join(",")
        } else {
            let info: String = self.client.info(Some(InfoKind::Server)).await?;
            run_id_of(&info)
        };
        let checks = self.marker_keys().into_iter().map(|key| async move {
            let found: i64 = self.client.exists(key).await?;
            Ok::<_, CacheError>(found > 0)
        });
        let marked = futures_util::future::try_join_all(checks)
            .await?
            .into_iter()
            .all(|found| found);
        Ok(Probe { run_id, marked })
    }

    /// Sets the markers whose absence later reveals a flush.
    pub async fn mark(&self) -> Result<(), CacheError> {
        let sets = self.marker_keys().into_iter().map(|key| async move {
            let () = self.client.set(key, "1", None, None, false).await?;
            Ok::<_, CacheError>(())
        });
        futures_util::future::try_join_all(sets).await?;
        Ok(())
    }
}

fn run_id_of(info: &str) -> String {
    info.lines()
        .find_map(|line| line.strip_prefix("run_id:"))
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// The cluster group of a sensor, stable across processes and versions.
fn group_of(id: &SensorId) -> u32 {
    id.stable_hash() % CLUSTER_GROUPS
}

/// Adds members to sorted sets and trims each to the newest `ARGV[1]`.
/// `ARGV[2..]`, per key in order: a member count n, then n pairs of (score, member).
static MERGE: std::sync::LazyLock<Script> = std::sync::LazyLock::new(|| {
    Script::from_lua(
        r#"
local keep = tonumber(ARGV[1])
local at = 2
for i = 1, #KEYS do
  local n = tonumber(ARGV[at])
  if n > 0 then
    local members = {}
    for j = 1, 2 * n do
      members[j] = ARGV[at + j]
    end
    redis.call('ZADD', KEYS[i], unpack(members))
    redis.call('ZREMRANGEBYRANK', KEYS[i], 0, -keep - 1)
  end
  at = at + 1 + 2 * n
end
return #KEYS
"#,
    )
});

/// Which latest sets may be stale, shared by the ingest stages that find out and the readers
/// that must then go to MongoDB.
///
/// Each mark carries a generation, so a rebuild that read MongoDB before a newer failure
/// cannot clear the newer mark. A full rebuild walks the sensors in id order and records how
/// far it got, so the sets already rebuilt are served again before the walk ends.
#[derive(Default)]
pub struct Health {
    /// Redis answered the last command or probe.
    up: AtomicBool,
    generation: AtomicU64,
    /// Sensors whose set missed an update, with the generation of their latest mark.
    dirty: Mutex<BTreeMap<SensorId, u64>>,
    /// The overall set missed an update (generation, 0 when clean).
    overall_dirty: AtomicU64,
    /// Redis lost data wholesale (restart, flush): every set is suspect (generation, 0 when clean).
    all_dirty: AtomicU64,
    /// How far the running full rebuild got: the generation it covers and the last sensor id
    /// whose set it rebuilt.
    progress: Mutex<Option<(u64, SensorId)>>,
    /// Set once `on_dirty` was told of an outstanding mark, cleared by `unflag`.
    flagged: AtomicBool,
    /// Told, once per clean-to-dirty change, that a mark exists: the owner persists that, so a
    /// restart does not trust sets this process knew to be stale.
    on_dirty: std::sync::OnceLock<Box<dyn Fn() + Send + Sync>>,
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Health")
            .field("up", &self.is_up())
            .field("dirty", &self.dirty_count())
            .field("all_dirty", &self.all_dirty.load(Ordering::Acquire))
            .finish_non_exhaustive()
    }
}

impl Health {
    /// Starts pessimistic: nothing is served from Redis until a probe says it is intact.
    pub fn new() -> Self {
        let health = Self::default();
        health.mark_all_dirty();
        health
    }

    /// Sets the hook told of the first mark after a clean state (once; later calls are ignored).
    pub fn on_dirty(&self, hook: Box<dyn Fn() + Send + Sync>) {
        let _ = self.on_dirty.set(hook);
    }

    fn next_generation(&self) -> u64 {
        self.generation.fetch_add(1, Ordering::AcqRel) + 1
    }

    fn dirty(&self) -> MutexGuard<'_, BTreeMap<SensorId, u64>> {
        self.dirty
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn progress(&self) -> MutexGuard<'_, Option<(u64, SensorId)>> {
        self.progress
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// After the marks are in place: tells the hook if nobody told it since the last `unflag`.
    fn flag(&self) {
        if !self.flagged.swap(true, Ordering::AcqRel)
            && let Some(hook) = self.on_dirty.get()
        {
            hook();
        }
    }

    pub fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::Release);
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Records that these readings did not reach their sets.
    pub fn mark_dirty<'a>(&self, readings: impl IntoIterator<Item = &'a Reading>) {
        let generation = self.next_generation();
        let mut dirty = self.dirty();
        for r in readings {
            dirty.insert(r.sensor_id().clone(), generation);
        }
        drop(dirty);
        self.overall_dirty.store(generation, Ordering::Release);
        self.flag();
    }

    pub fn mark_all_dirty(&self) {
        let generation = self.next_generation();
        self.all_dirty.store(generation, Ordering::Release);
        self.overall_dirty.store(generation, Ordering::Release);
        self.flag();
    }

    /// Whether the set of `sensor` (or the overall set) can be served from Redis now.
    pub fn serves(&self, sensor: Option<&SensorId>) -> bool {
        if !self.is_up() {
            return false;
        }
        let all = self.all_dirty.load(Ordering::Acquire);
        match sensor {
            Some(id) => {
                let rebuilt = all == 0
                    || self
                        .progress()
                        .as_ref()
                        .is_some_and(|(covers, upto)| *covers >= all && id <= upto);
                rebuilt && !self.dirty().contains_key(id)
            }
            None => all == 0 && self.overall_dirty.load(Ordering::Acquire) == 0,
        }
    }

    pub fn dirty_count(&self) -> usize {
        self.dirty().len()
    }

    /// No mark of any kind is outstanding.
    pub fn is_clean(&self) -> bool {
        self.all_dirty.load(Ordering::Acquire) == 0
            && self.overall_dirty.load(Ordering::Acquire) == 0
            && self.dirty().is_empty()
    }

    /// Re-arms the hook, then says whether everything is clean. A mark that lands after this
    /// call tells the hook again, so the owner may record "clean" only when this returns true
    /// and no hook call can overtake that record (the owner serialises the two).
    pub fn unflag(&self) -> bool {
        self.flagged.store(false, Ordering::Release);
        self.is_clean()
    }

    /// A snapshot of the repair work: (all-dirty generation, overall generation, up to `max`
    /// dirty sensors with their generations).
    pub fn pending(&self, max: usize) -> (u64, u64, Vec<(SensorId, u64)>) {
        let sensors = self
            .dirty()
            .iter()
            .take(max)
            .map(|(id, g)| (id.clone(), *g))
            .collect();
        (
            self.all_dirty.load(Ordering::Acquire),
            self.overall_dirty.load(Ordering::Acquire),
            sensors,
        )
    }

    /// The current generation: a rebuild started now covers every mark up to it.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// A full rebuild that started at `generation` has rebuilt every set up to `upto`.
    pub fn rebuilt_up_to(&self, generation: u64, upto: SensorId) {
        *self.progress() = Some((generation, upto));
    }

    /// Clears a sensor's mark if no newer mark came in since `generation`.
    pub fn clear_sensor(&self, id: &SensorId, generation: u64) {
        let mut dirty = self.dirty();
        if dirty.get(id).is_some_and(|g| *g <= generation) {
            dirty.remove(id);
        }
    }

    pub fn clear_overall(&self, generation: u64) {
        let _ = self
            .overall_dirty
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |g| {
                (g <= generation).then_some(0)
            });
    }

    /// Clears the wholesale mark, and every sensor mark older than `generation` with it.
    pub fn clear_all(&self, generation: u64) {
        let cleared = self
            .all_dirty
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |g| {
                (g <= generation).then_some(0)
            })
            .is_ok();
        if cleared {
            self.dirty().retain(|_, g| *g > generation);
            *self.progress() = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Kind, Timestamp};

    fn reading(id: &str) -> Reading {
        Reading::new(
            SensorId::parse(id).unwrap(),
            Kind::parse("t").unwrap(),
            1.0,
            Timestamp::from_millis(0).unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn starts_unserved_until_a_full_rebuild() {
        let h = Health::new();
        h.set_up(true);
        assert!(!h.serves(None));
        let g = h.generation();
        h.clear_all(g);
        h.clear_overall(g);
        assert!(h.serves(None));
        assert!(h.serves(Some(&SensorId::parse("a").unwrap())));
    }

    #[test]
    fn a_newer_mark_survives_an_older_rebuild() {
        let h = Health::new();
        h.set_up(true);
        h.clear_all(h.generation());
        let a = reading("a");
        h.mark_dirty([&a]);
        let rebuild_started = h.generation();
        h.mark_dirty([&a]);
        h.clear_sensor(a.sensor_id(), rebuild_started);
        assert!(!h.serves(Some(a.sensor_id())));
        h.clear_sensor(a.sensor_id(), h.generation());
        assert!(h.serves(Some(a.sensor_id())));
        assert!(h.serves(Some(reading("b").sensor_id())));
    }

    #[test]
    fn a_full_rebuild_serves_what_it_has_walked() {
        let h = Health::new();
        h.set_up(true);
        h.mark_all_dirty();
        let started = h.generation();
        let (a, m, z) = (reading("a"), reading("m"), reading("z"));
        assert!(!h.serves(Some(a.sensor_id())));
        h.rebuilt_up_to(started, m.sensor_id().clone());
        assert!(h.serves(Some(a.sensor_id())));
        assert!(h.serves(Some(m.sensor_id())));
        assert!(!h.serves(Some(z.sensor_id())), "not walked yet");
        assert!(!h.serves(None), "the overall set waits for the end");
        // Redis lost its data again: the walk so far no longer counts.
        h.mark_all_dirty();
        assert!(!h.serves(Some(a.sensor_id())));
        h.clear_all(started);
        assert!(
            !h.serves(Some(a.sensor_id())),
            "an older rebuild clears nothing newer"
        );
        h.clear_all(h.generation());
        h.clear_overall(h.generation());
        assert!(h.serves(Some(z.sensor_id())) && h.serves(None));
    }

    #[test]
    fn the_hook_hears_of_each_change_from_clean_to_dirty_once() {
        use std::sync::Arc;
        use std::sync::atomic::AtomicUsize;
        let h = Health::new();
        let told = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&told);
        h.on_dirty(Box::new(move || {
            counter.fetch_add(1, Ordering::Relaxed);
        }));
        let a = reading("a");
        h.mark_dirty([&a]);
        assert_eq!(told.load(Ordering::Relaxed), 0, "flagged already by new()");
        assert!(!h.unflag(), "still dirty");
        h.mark_dirty([&a]);
        assert_eq!(told.load(Ordering::Relaxed), 1);
        h.mark_dirty([&a]);
        assert_eq!(told.load(Ordering::Relaxed), 1, "once per change");
        let g = h.generation();
        h.clear_all(g);
        h.clear_overall(g);
        h.clear_sensor(a.sensor_id(), g);
        assert!(h.unflag(), "clean");
        h.mark_dirty([&a]);
        assert_eq!(told.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn down_serves_nothing() {
        let h = Health::new();
        h.clear_all(h.generation());
        h.clear_overall(h.generation());
        assert!(!h.serves(None));
        h.set_up(true);
        assert!(h.serves(None));
    }
}
