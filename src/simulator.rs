//! A fleet of simulated temperature and humidity sensors publishing over real MQTT (and, in
//! `sparkplug`, a simulated Sparkplug B edge node).
//!
//! Values are physical-looking: each sensor drifts around its own set point (a mean-reverting
//! random walk) on top of a slow daily swing, and humidity moves against temperature. Publishes
//! are QoS 1. The MQTT client lives only here; the connection is polled by its own task (rumqttc
//! must never be published to from the task that polls it) and reconnects with backoff,
//! republishing what the broker had not acknowledged. It knows nothing of the rest of sensorhub.

use std::f64::consts::TAU;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use rand::rngs::StdRng;
use rand::{SeedableRng, rng};
use rumqttc::{AsyncClient, Event, EventLoop, Incoming, MqttOptions, QoS, Request};
use tokio_util::sync::CancellationToken;

use crate::domain::Timestamp;

pub mod sparkplug;

#[derive(Clone, Debug)]
pub struct SimulatorConfig {
    /// Broker host.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// Sensors of each kind.
    pub sensors: usize,
    /// Time between two readings of one sensor.
    pub interval: Duration,
    /// MQTT client id.
    pub client_id: String,
    /// MQTT user name and password, when the broker asks for them.
    pub credentials: Option<(String, String)>,
}

/// One simulated sensor's state.
#[derive(Debug)]
struct Sensor {
    id: String,
    topic: &'static str,
    set_point: f64,
    deviation: f64,
    /// Strength of the pull back to the set point, per second.
    reversion: f64,
    /// Random-walk intensity, per square root of a second.
    volatility: f64,
    daily_swing: f64,
    min: f64,
    max: f64,
}

impl Sensor {
    fn temperature(n: usize, rng: &mut StdRng) -> Self {
        Self {
            id: format!("temp-{n:03}"),
            topic: "sensors/temperature",
            set_point: 21.0 + rng.random_range(-3.0..3.0),
            deviation: 0.0,
            reversion: 0.05,
            volatility: 0.08,
            daily_swing: 2.5,
            min: -40.0,
            max: 85.0,
        }
    }

    fn humidity(n: usize, rng: &mut StdRng) -> Self {
        Self {
            id: format!("hum-{n:03}"),
            topic: "sensors/humidity",
            set_point: 45.0 + rng.random_range(-8.0..8.0),
            deviation: 0.0,
            reversion: 0.03,
            volatility: 0.25,
            // Relative humidity falls as the air warms during the day.
            daily_swing: -6.0,
            min: 0.0,
            max: 100.0,
        }
    }

    /// Advances the sensor by `dt` seconds and returns its value at `at`.
    fn step(&mut self, dt: f64, at: Timestamp, rng: &mut StdRng) -> f64 {
        // Ornstein-Uhlenbeck step with a standard normal draw (Box-Muller).
        let (u1, u2): (f64, f64) = (rng.random_range(f64::EPSILON..1.0), rng.random());
        let normal = (-2.0 * u1.ln()).sqrt() * (TAU * u2).cos();
        self.deviation +=
            -self.reversion * self.deviation * dt + self.volatility * dt.sqrt() * normal;
        let day_fraction = (at.as_millis().rem_euclid(86_400_000)) as f64 / 86_400_000.0;
        // Warmest around 15:00 UTC.
        let daily = self.daily_swing * (TAU * (day_fraction - 0.375)).cos();
        let value = (self.set_point + daily + self.deviation).clamp(self.min, self.max);
        (value * 100.0).round() / 100.0
    }
}

fn payload(id: &str, value: f64, at: Timestamp) -> String {
    format!(r#"{{"sensor_id":"{id}","value":{value},"timestamp":"{at}"}}"#)
}

/// Publishes until `stop` fires.
pub async fn run(config: SimulatorConfig, stop: CancellationToken) -> anyhow::Result<()> {
    let mut rng = StdRng::from_rng(&mut rng());
    let mut sensors: Vec<Sensor> = (1..=config.sensors)
        .map(|n| Sensor::temperature(n, &mut rng))
        .collect();
    sensors.extend((1..=config.sensors).map(|n| Sensor::humidity(n, &mut rng)));
    let mut options = MqttOptions::new(&config.client_id, &config.host, config.port);
    options.set_keep_alive(Duration::from_secs(30));
    options.set_max_packet_size(64 * 1024, 64 * 1024);
    if let Some((user, password)) = &config.credentials {
        options.set_credentials(user, password);
    }
    let capacity = sensors.len().max(100);
    let (client, eventloop) = AsyncClient::new(options, capacity);
    // What a dropped connection left unacknowledged, to publish again.
    let rescued: Arc<Mutex<Vec<rumqttc::Publish>>> = Arc::default();
    let poller = tokio::spawn(poll(eventloop, Arc::clone(&rescued), stop.clone()));
    tracing::info!(
        broker = %format!("{}:{}", config.host, config.port),
        sensors = sensors.len(),
        interval_ms = config.interval.as_millis() as u64,
        "simulator publishing"
    );

    let mut ticker = tokio::time::interval(config.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let dt = config.interval.as_secs_f64();
    while !stop.is_cancelled() {
        tokio::select! {
            _ = ticker.tick() => {}
            () = stop.cancelled() => break,
        }
        let again: Vec<rumqttc::Publish> = std::mem::take(&mut *lock(&rescued));
        for publish in again {
            let topic = publish.topic.clone();
            if client
                .publish(topic, QoS::AtLeastOnce, false, publish.payload)
                .await
                .is_err()
            {
                break;
            }
        }
        let at = Timestamp::now();
        for sensor in &mut sensors {
            let value = sensor.step(dt, at, &mut rng);
            let body = payload(&sensor.id, value, at);
            tokio::select! {
                sent = client.publish(sensor.topic, QoS::AtLeastOnce, false, body) => {
                    if sent.is_err() {
                        break;
                    }
                }
                () = stop.cancelled() => break,
            }
        }
    }
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), poller).await;
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

async fn poll(
    mut eventloop: EventLoop,
    rescued: Arc<Mutex<Vec<rumqttc::Publish>>>,
    stop: CancellationToken,
) {
    let mut failures: u32 = 0;
    loop {
        let event = tokio::select! {
            event = eventloop.poll() => event,
            () = stop.cancelled() => return,
        };
        match event {
            Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                if failures > 0 {
                    tracing::info!("simulator reconnected");
                }
                failures = 0;
            }
            Ok(Event::Incoming(Incoming::Disconnect)) => return,
            Ok(_) => {}
            Err(e) => {
                // rumqttc discards these on reconnect with a clean session; keep them. The
                // broker may have stored some already: sensorhub recognises those duplicates.
                let pending = std::mem::take(&mut eventloop.pending);
                lock(&rescued).extend(pending.into_iter().filter_map(|r| match r {
                    Request::Publish(p) => Some(p),
                    _ => None,
                }));
                failures += 1;
                let backoff = Duration::from_millis(200 * 2u64.pow(failures.min(6)))
                    .min(Duration::from_secs(10));
                if failures == 1 || failures.is_multiple_of(10) {
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "simulator lost the broker");
                }
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = stop.cancelled() => return,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_drift_smoothly_within_physical_bounds() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut t = Sensor::temperature(1, &mut rng);
        let mut h = Sensor::humidity(1, &mut rng);
        let start = Timestamp::parse("2024-05-01T00:00:00Z").unwrap();
        let mut last: Option<f64> = None;
        let mut max_jump: f64 = 0.0;
        let mut values = Vec::new();
        for i in 0..3600 {
            let at = start.saturating_add_millis(i * 1000);
            let v = t.step(1.0, at, &mut rng);
            let hv = h.step(1.0, at, &mut rng);
            assert!((0.0..=100.0).contains(&hv));
            if let Some(prev) = last {
                max_jump = max_jump.max((v - prev).abs());
            }
            last = Some(v);
            values.push(v);
        }
        // Drifting, not noise: consecutive readings stay close, the series still moves.
        assert!(max_jump < 1.0, "jumped {max_jump}");
        let (min, max) = values
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), v| (a.min(*v), b.max(*v)));
        assert!(max - min > 0.2, "flat series {min}..{max}");
        assert!((10.0..35.0).contains(&min) && (10.0..35.0).contains(&max));
    }

    #[test]
    fn payloads_follow_the_contract() {
        let at = Timestamp::parse("2024-05-01T10:00:00Z").unwrap();
        let p = payload("temp-001", 21.5, at);
        assert_eq!(
            p,
            r#"{"sensor_id":"temp-001","value":21.5,"timestamp":"2024-05-01T10:00:00.000Z"}"#
        );
    }
}
