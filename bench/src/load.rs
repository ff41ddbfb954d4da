//! The load: a fleet of sensors whose readings are a pure function of a sequence number, and
//! MQTT publishers (rumqttc, QoS 1) that send them and count the broker's acknowledgements.
//!
//! Reading `n` belongs to sensor `n % sensors` at millisecond `base + n / sensors`, so every
//! sequence number is a distinct (sensor, millisecond) pair: no accidental duplicates, and the
//! store ceiling inserts exactly the documents sensorhub would build from the same numbers.
//! Connection `c` of `P` publishes `c, c + P, c + 2P, ...`, so connections never overlap either.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use rumqttc::{AsyncClient, Event, EventLoop, Incoming, MqttOptions, Outgoing, QoS};
use sensorhub::domain::{Kind, Reading, SensorId, Timestamp};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// One simulated sensor.
#[derive(Debug)]
struct Sensor {
    id: SensorId,
    kind: Kind,
    topic: &'static str,
    set_point: f64,
    swing: f64,
}

/// Sensors and the readings they produce, half temperature, half humidity.
#[derive(Debug)]
pub struct Fleet {
    sensors: Vec<Sensor>,
    base: Timestamp,
}

impl Fleet {
    /// `count` sensors named `temp-0001`.., `hum-0001`.. after `prefix`; their readings start
    /// at `base`.
    pub fn new(prefix: &str, count: usize, base: Timestamp) -> anyhow::Result<Self> {
        anyhow::ensure!(count > 0, "a fleet needs sensors");
        let half = count.div_ceil(2);
        let sensors = (0..count)
            .map(|i| {
                let (name, kind, topic, set_point, swing) = if i < half {
                    let n = i + 1;
                    (
                        format!("{prefix}temp-{n:04}"),
                        "temperature",
                        "sensors/temperature",
                        18.0 + (i % 7) as f64,
                        2.5,
                    )
                } else {
                    let n = i - half + 1;
                    (
                        format!("{prefix}hum-{n:04}"),
                        "humidity",
                        "sensors/humidity",
                        38.0 + (i % 13) as f64,
                        6.0,
                    )
                };
                Ok(Sensor {
                    id: SensorId::parse(&name).map_err(anyhow::Error::msg)?,
                    kind: Kind::parse(kind).map_err(anyhow::Error::msg)?,
                    topic,
                    set_point,
                    swing,
                })
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Self { sensors, base })
    }

    /// The id of sensor `index` (0-based).
    pub fn sensor_id(&self, index: usize) -> Option<&str> {
        self.sensors.get(index).map(|s| s.id.as_str())
    }

    /// Reading `n`: its sensor, timestamp and a plausible value.
    fn at(&self, n: u64) -> (&Sensor, Timestamp, f64) {
        let count = self.sensors.len() as u64;
        let sensor = &self.sensors[(n % count) as usize];
        let round = n / count;
        let at = self
            .base
            .saturating_add_millis(i64::try_from(round).unwrap_or(i64::MAX));
        // A slow swing plus noise from a hash of n: realistic spread, no RNG state to share.
        let noise = (splitmix64(n) >> 11) as f64 / (1u64 << 53) as f64 - 0.5;
        let value = sensor.set_point + sensor.swing * (round as f64 / 500.0).sin() + 0.4 * noise;
        (sensor, at, (value * 100.0).round() / 100.0)
    }

    /// The MQTT topic and JSON payload of reading `n`, as a device sends it.
    pub fn message(&self, n: u64) -> (&'static str, Vec<u8>) {
        let (sensor, at, value) = self.at(n);
        let payload = format!(
            r#"{{"sensor_id":"{}","value":{value},"timestamp":"{at}"}}"#,
            sensor.id
        );
        (sensor.topic, payload.into_bytes())
    }

    /// Reading `n` as the domain type sensorhub stores.
    pub fn reading(&self, n: u64) -> Option<Reading> {
        let (sensor, at, value) = self.at(n);
        Reading::new(sensor.id.clone(), sensor.kind.clone(), value, at)
    }
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// How fast publishers send.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Rate {
    /// As fast as the broker's acknowledgements (and the optional pause flag) allow.
    Max,
    /// This many readings per second over all connections.
    PerSecond(f64),
}

/// Counters of one MQTT connection.
#[derive(Debug, Default)]
pub struct ConnStats {
    pub published: AtomicU64,
    pub acked: AtomicU64,
    pub errors: AtomicU64,
    connected: AtomicBool,
    last_error: Mutex<Option<String>>,
}

/// One QoS 1 MQTT connection whose acknowledgements are counted by its own polling task
/// (rumqttc must never be published to from the task that polls it).
#[derive(Debug)]
pub struct Connection {
    client: AsyncClient,
    pub stats: Arc<ConnStats>,
    done: CancellationToken,
    poller: tokio::task::JoinHandle<()>,
}

impl Connection {
    /// Connects and waits for the CONNACK.
    pub async fn open(port: u16, client_id: &str, inflight: u16) -> anyhow::Result<Self> {
        let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
        options.set_keep_alive(Duration::from_secs(30));
        options.set_inflight(inflight);
        let (client, eventloop) = AsyncClient::new(options, usize::from(inflight).max(100) * 2);
        let stats = Arc::new(ConnStats::default());
        let done = CancellationToken::new();
        let poller = tokio::spawn(poll(eventloop, Arc::clone(&stats), done.clone()));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !stats.connected.load(Ordering::Acquire) {
            if Instant::now() > deadline {
                done.cancel();
                let error = stats.last_error.lock().ok().and_then(|e| e.clone());
                bail!("MQTT client {client_id} could not connect to port {port}: {error:?}");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(Self {
            client,
            stats,
            done,
            poller,
        })
    }

    /// Queues one QoS 1 publish; returns when rumqttc took it.
    pub async fn publish(&self, topic: &str, payload: Vec<u8>) -> anyhow::Result<()> {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .context("the MQTT client's queue closed")?;
        self.stats.published.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    pub fn last_error(&self) -> Option<String> {
        self.stats.last_error.lock().ok().and_then(|e| e.clone())
    }

    /// Waits (up to `patience`) for every publish to be acknowledged, then disconnects.
    pub async fn close(self, patience: Duration) {
        let deadline = Instant::now() + patience;
        while self.stats.acked.load(Ordering::Relaxed)
            < self.stats.published.load(Ordering::Relaxed)
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = self.client.disconnect().await;
        let mut poller = self.poller;
        if tokio::time::timeout(Duration::from_secs(2), &mut poller)
            .await
            .is_err()
        {
            self.done.cancel();
            let _ = poller.await;
        }
    }
}

async fn poll(mut eventloop: EventLoop, stats: Arc<ConnStats>, done: CancellationToken) {
    loop {
        let event = tokio::select! {
            event = eventloop.poll() => event,
            () = done.cancelled() => return,
        };
        match event {
            Ok(Event::Incoming(Incoming::PubAck(_))) => {
                stats.acked.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                stats.connected.store(true, Ordering::Release);
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
            Ok(_) => {}
            Err(e) => {
                // A reconnect starts a clean session: rumqttc forgets what was in flight, so the
                // acknowledgement count no longer proves anything. Counted; the run is invalid.
                stats.errors.fetch_add(1, Ordering::Relaxed);
                stats.connected.store(false, Ordering::Release);
                if let Ok(mut last) = stats.last_error.lock() {
                    *last = Some(e.to_string());
                }
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(200)) => {}
                    () = done.cancelled() => return,
                }
            }
        }
    }
}

/// What a load run is.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub port: u16,
    pub connections: usize,
    pub rate: Rate,
    /// Unacknowledged publishes per connection.
    pub inflight: u16,
    pub fleet: Arc<Fleet>,
    /// Client ids are `<name>-<c>`.
    pub name: String,
    /// While set, publishers wait (the ingest scenario's bound on unstored readings).
    pub pause: Option<Arc<AtomicBool>>,
}

impl LoadSpec {
    /// The usual shape: the benchmark's fleet of sensors with readings from an hour ago on,
    /// over its usual connections, paced at `per_second`.
    pub fn paced(port: u16, per_second: f64, name: String) -> anyhow::Result<Self> {
        use super::targets::{CONNECTIONS, INFLIGHT, SENSORS};
        Ok(Self {
            port,
            connections: CONNECTIONS,
            rate: Rate::PerSecond(per_second),
            inflight: INFLIGHT,
            fleet: Arc::new(Fleet::new(
                "",
                SENSORS,
                Timestamp::now().saturating_add_millis(-3_600_000),
            )?),
            name,
            pause: None,
        })
    }
}

/// The counters of a load's connections, readable while it runs.
#[derive(Debug, Clone, Default)]
pub struct Counters(Vec<Arc<ConnStats>>);

impl Counters {
    pub fn published(&self) -> u64 {
        self.sum(|s| &s.published)
    }

    pub fn acked(&self) -> u64 {
        self.sum(|s| &s.acked)
    }

    pub fn errors(&self) -> u64 {
        self.sum(|s| &s.errors)
    }

    fn sum(&self, field: impl Fn(&ConnStats) -> &AtomicU64) -> u64 {
        self.0
            .iter()
            .map(|s| field(s).load(Ordering::Relaxed))
            .sum()
    }
}

/// Publishers running in the background.
#[derive(Debug)]
pub struct Load {
    counters: Counters,
    stop: CancellationToken,
    tasks: JoinSet<(Connection, anyhow::Result<()>)>,
}

/// Totals of a finished load.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadTotals {
    pub published: u64,
    pub acked: u64,
    pub errors: u64,
}

impl Load {
    /// Connects every publisher, then starts them together.
    pub async fn start(spec: LoadSpec) -> anyhow::Result<Self> {
        let mut connections = Vec::with_capacity(spec.connections);
        for c in 0..spec.connections {
            let id = format!("{}-{c}", spec.name);
            connections.push(Connection::open(spec.port, &id, spec.inflight).await?);
        }
        let stop = CancellationToken::new();
        let counters = Counters(connections.iter().map(|c| Arc::clone(&c.stats)).collect());
        let mut tasks = JoinSet::new();
        let per_connection = match spec.rate {
            Rate::Max => None,
            Rate::PerSecond(rate) => Some(rate / spec.connections as f64),
        };
        for (c, connection) in connections.into_iter().enumerate() {
            let (spec, stop) = (spec.clone(), stop.clone());
            tasks.spawn(async move {
                let result =
                    publish_loop(&connection, c as u64, &spec, per_connection, &stop).await;
                (connection, result)
            });
        }
        Ok(Self {
            counters,
            stop,
            tasks,
        })
    }

    pub fn counters(&self) -> Counters {
        self.counters.clone()
    }

    /// Stops publishing, waits for the outstanding acknowledgements and disconnects.
    pub async fn stop(mut self) -> anyhow::Result<LoadTotals> {
        self.stop.cancel();
        let mut failure = None;
        while let Some(joined) =
            tokio::time::timeout(Duration::from_secs(30), self.tasks.join_next())
                .await
                .context("publishers did not stop within 30 s")?
        {
            let (connection, result) = joined.context("a publisher panicked")?;
            if let Err(e) = result {
                failure.get_or_insert(e.context(format!(
                    "publisher failed (last connection error: {:?})",
                    connection.last_error()
                )));
            }
            connection.close(Duration::from_secs(30)).await;
        }
        let totals = LoadTotals {
            published: self.counters.published(),
            acked: self.counters.acked(),
            errors: self.counters.errors(),
        };
        match failure {
            Some(e) => Err(e),
            None => Ok(totals),
        }
    }
}

async fn publish_loop(
    connection: &Connection,
    c: u64,
    spec: &LoadSpec,
    per_second: Option<f64>,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let stride = spec.connections as u64;
    let started = Instant::now();
    let mut sent: u64 = 0;
    while !stop.is_cancelled() {
        if let Some(rate) = per_second {
            let due = (started.elapsed().as_secs_f64() * rate) as u64;
            if sent >= due {
                // Sub-millisecond sleeps round up to the timer's tick; the next round sends what
                // fell due meanwhile, so the average rate holds.
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(1)) => {}
                    () = stop.cancelled() => break,
                }
                continue;
            }
        }
        if spec
            .pause
            .as_ref()
            .is_some_and(|p| p.load(Ordering::Relaxed))
        {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(2)) => {}
                () = stop.cancelled() => break,
            }
            continue;
        }
        let (topic, payload) = spec.fleet.message(sent * stride + c);
        // Not raced against `stop`: a cancelled send may still have been taken by rumqttc,
        // and then the published count would no longer match what was sent. The wait is
        // short, since the event loop keeps draining the queue.
        connection.publish(topic, payload).await?;
        sent += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn readings_are_distinct_and_plausible() {
        let base = Timestamp::from_millis(1_767_225_600_000).unwrap();
        let fleet = Fleet::new("", 1000, base).unwrap();
        assert_eq!(fleet.sensor_id(0), Some("temp-0001"));
        assert_eq!(fleet.sensor_id(999), Some("hum-0500"));
        let mut keys = HashSet::new();
        for n in 0..5000 {
            let r = fleet.reading(n).unwrap();
            assert!((-40.0..=100.0).contains(&r.value()), "{}", r.value());
            assert!(keys.insert(r.key()), "duplicate key {}", r.key());
        }
        let (topic, payload) = fleet.message(1001);
        assert_eq!(topic, "sensors/temperature");
        let json: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        assert_eq!(json["sensor_id"], "temp-0002");
        assert_eq!(json["timestamp"], "2026-01-01T00:00:00.001Z");
    }
}
