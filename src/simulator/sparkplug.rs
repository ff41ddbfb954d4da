//! A simulated Sparkplug B edge node (`sensorhub simulate --sparkplug`): group `sensorhub`, one
//! edge node, and devices `dev-001`... each with a temperature, a humidity, a signed setpoint
//! offset and a running flag.
//!
//! It follows the edge node's side of Sparkplug 3.0: an NDEATH with the session's bdSeq as its
//! MQTT will; NBIRTH and the DBIRTHs (names, aliases, data types) after every CONNACK; then data
//! by exception (DDATA carries only the metrics that moved past their deadband, by alias); a
//! new NBIRTH and DBIRTHs when a host sends NCMD `Node Control/Rebirth` = true; an NDEATH on
//! Ctrl-C. bdSeq is taken from the start time, so each run of the simulator is a new session.

use std::time::Duration;

use prost::Message as _;
use rand::rngs::StdRng;
use rand::{SeedableRng, rng};
use rumqttc::{AsyncClient, Event, EventLoop, Incoming, LastWill, MqttOptions, QoS};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Sensor;
use crate::domain::Timestamp;
use crate::sparkplug::proto::{Metric, Payload, Value, datatype};
use crate::sparkplug::{BD_SEQ_METRIC, REBIRTH_METRIC, is_rebirth_request};

/// The simulated node's group.
pub const GROUP: &str = "sensorhub";

#[derive(Clone, Debug)]
pub struct SparkplugConfig {
    pub host: String,
    pub port: u16,
    /// The edge node's id.
    pub node: String,
    /// Devices of the node.
    pub devices: usize,
    /// Time between two looks at the devices' values.
    pub interval: Duration,
    pub credentials: Option<(String, String)>,
}

/// A device's metrics, in alias order from `alias_base + 1`.
#[derive(Debug)]
struct Device {
    id: String,
    temperature: Sensor,
    humidity: Sensor,
    offset: i16,
    running: bool,
    /// The values last published: what "by exception" compares against.
    sent: [f64; 4],
    alias_base: u64,
}

const NAMES: [&str; 4] = ["Temperature", "Humidity", "Setpoint Offset", "Running"];
const TYPES: [u32; 4] = [
    datatype::FLOAT,
    datatype::FLOAT,
    datatype::INT16,
    datatype::BOOLEAN,
];
/// A value moves past its deadband when it changes by more than this.
const DEADBAND: [f64; 4] = [0.05, 0.2, 0.5, 0.5];

impl Device {
    fn current(&self, temperature: f64, humidity: f64) -> [f64; 4] {
        [
            temperature,
            humidity,
            f64::from(self.offset),
            f64::from(u8::from(self.running)),
        ]
    }
}

fn value(i: usize, v: f64) -> Value {
    match TYPES[i] {
        datatype::FLOAT => Value::FloatValue(v as f32),
        // Int16 travels in the unsigned 32-bit field, as its two's complement.
        datatype::INT16 => Value::IntValue(u32::from(v as i16 as u16)),
        _ => Value::BooleanValue(v != 0.0),
    }
}

fn now_ms() -> u64 {
    u64::try_from(Timestamp::now().as_millis()).unwrap_or(0)
}

fn bd_seq_metric(bd_seq: u64, at: u64) -> Metric {
    Metric {
        name: Some(BD_SEQ_METRIC.to_owned()),
        timestamp: Some(at),
        datatype: Some(datatype::INT64),
        value: Some(Value::LongValue(bd_seq)),
        ..Metric::default()
    }
}

/// The edge node's state: the next seq, and its devices.
#[derive(Debug)]
struct Node {
    id: String,
    bd_seq: u64,
    seq: u8,
    devices: Vec<Device>,
    started: std::time::Instant,
}

impl Node {
    fn topic(&self, kind: &str, device: Option<&str>) -> String {
        match device {
            Some(d) => format!("spBv1.0/{GROUP}/{kind}/{}/{d}", self.id),
            None => format!("spBv1.0/{GROUP}/{kind}/{}", self.id),
        }
    }

    fn next_seq(&mut self) -> u64 {
        let seq = self.seq;
        self.seq = self.seq.wrapping_add(1);
        u64::from(seq)
    }

    /// NBIRTH and every DBIRTH, with a new seq from 0.
    fn births(&mut self) -> Vec<(String, Vec<u8>)> {
        self.seq = 0;
        let at = now_ms();
        let uptime = self.started.elapsed().as_secs();
        let nbirth = Payload {
            timestamp: Some(at),
            seq: Some(self.next_seq()),
            metrics: vec![
                bd_seq_metric(self.bd_seq, at),
                Metric {
                    name: Some(REBIRTH_METRIC.to_owned()),
                    alias: Some(1),
                    timestamp: Some(at),
                    datatype: Some(datatype::BOOLEAN),
                    value: Some(Value::BooleanValue(false)),
                    ..Metric::default()
                },
                Metric {
                    name: Some("Uptime".to_owned()),
                    alias: Some(2),
                    timestamp: Some(at),
                    datatype: Some(datatype::UINT64),
                    value: Some(Value::LongValue(uptime)),
                    ..Metric::default()
                },
            ],
            ..Payload::default()
        };
        let mut out = vec![(self.topic("NBIRTH", None), nbirth.encode_to_vec())];
        for d in 0..self.devices.len() {
            let seq = self.next_seq();
            let device = &self.devices[d];
            let metrics = (0..4)
                .map(|i| Metric {
                    name: Some(NAMES[i].to_owned()),
                    alias: Some(device.alias_base + i as u64 + 1),
                    timestamp: Some(at),
                    datatype: Some(TYPES[i]),
                    value: Some(value(i, device.sent[i])),
                    ..Metric::default()
                })
                .collect();
            let payload = Payload {
                timestamp: Some(at),
                seq: Some(seq),
                metrics,
                ..Payload::default()
            };
            out.push((
                self.topic("DBIRTH", Some(&device.id)),
                payload.encode_to_vec(),
            ));
        }
        out
    }

    /// The DDATA of every device with a metric past its deadband.
    fn data(&mut self, rng: &mut StdRng, dt: f64) -> Vec<(String, Vec<u8>)> {
        let now = Timestamp::now();
        let at = now_ms();
        let mut out = Vec::new();
        for d in 0..self.devices.len() {
            let device = &mut self.devices[d];
            let temperature = f64::from(device.temperature.step(dt, now, rng) as f32);
            let humidity = f64::from(device.humidity.step(dt, now, rng) as f32);
            // The offset wanders in whole steps, below zero as often as above.
            if rand::Rng::random_bool(rng, 0.05) {
                device.offset = (device.offset
                    + if rand::Rng::random_bool(rng, 0.5) {
                        1
                    } else {
                        -1
                    })
                .clamp(-20, 20);
            }
            if rand::Rng::random_bool(rng, 0.01) {
                device.running = !device.running;
            }
            let current = device.current(temperature, humidity);
            let changed: Vec<usize> = (0..4)
                .filter(|i| (current[*i] - device.sent[*i]).abs() > DEADBAND[*i])
                .collect();
            if changed.is_empty() {
                continue;
            }
            let metrics = changed
                .iter()
                .map(|i| {
                    device.sent[*i] = current[*i];
                    Metric {
                        alias: Some(device.alias_base + *i as u64 + 1),
                        timestamp: Some(at),
                        value: Some(value(*i, current[*i])),
                        ..Metric::default()
                    }
                })
                .collect();
            let topic = format!("spBv1.0/{GROUP}/DDATA/{}/{}", self.id, device.id);
            let seq = self.next_seq();
            let payload = Payload {
                timestamp: Some(at),
                seq: Some(seq),
                metrics,
                ..Payload::default()
            };
            out.push((topic, payload.encode_to_vec()));
        }
        out
    }

    fn death(&self) -> Vec<u8> {
        let at = now_ms();
        Payload {
            timestamp: Some(at),
            metrics: vec![bd_seq_metric(self.bd_seq, at)],
            ..Payload::default()
        }
        .encode_to_vec()
    }
}

/// What the polling task tells the publishing one.
#[derive(Debug)]
enum Heard {
    Connected,
    Rebirth,
}

/// Runs the edge node until `stop`, then publishes its NDEATH.
pub async fn run(config: SparkplugConfig, stop: CancellationToken) -> anyhow::Result<()> {
    let mut rng = StdRng::from_rng(&mut rng());
    let devices = (1..=config.devices)
        .map(|n| {
            let mut temperature = Sensor::temperature(n, &mut rng);
            let mut humidity = Sensor::humidity(n, &mut rng);
            let now = Timestamp::now();
            let sent = [
                f64::from(temperature.step(1.0, now, &mut rng) as f32),
                f64::from(humidity.step(1.0, now, &mut rng) as f32),
                0.0,
                1.0,
            ];
            Device {
                id: format!("dev-{n:03}"),
                temperature,
                humidity,
                offset: 0,
                running: true,
                sent,
                alias_base: 100 * n as u64,
            }
        })
        .collect();
    let mut node = Node {
        id: config.node.clone(),
        bd_seq: (now_ms() / 1000) % 256,
        seq: 0,
        devices,
        started: std::time::Instant::now(),
    };
    let mut options = MqttOptions::new(
        format!("sensorhub-sparkplug-{}", config.node),
        &config.host,
        config.port,
    );
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_max_packet_size(256 * 1024, 256 * 1024)
        .set_last_will(LastWill::new(
            node.topic("NDEATH", None),
            node.death(),
            QoS::AtLeastOnce,
            false,
        ));
    if let Some((user, password)) = &config.credentials {
        options.set_credentials(user, password);
    }
    let (client, eventloop) = AsyncClient::new(options, 1024);
    let (heard_tx, mut heard) = mpsc::channel(16);
    let poller = tokio::spawn(poll(eventloop, heard_tx, stop.clone()));
    let ncmd = node.topic("NCMD", None);
    tracing::info!(
        broker = %format!("{}:{}", config.host, config.port),
        group = GROUP,
        node = %node.id,
        devices = node.devices.len(),
        bd_seq = node.bd_seq,
        "Sparkplug edge node simulator publishing"
    );
    let mut ticker = tokio::time::interval(config.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let dt = config.interval.as_secs_f64();
    let mut born = false;
    loop {
        let messages = tokio::select! {
            () = stop.cancelled() => break,
            Some(event) = heard.recv() => {
                if matches!(event, Heard::Connected) {
                    client.subscribe(&ncmd, QoS::AtLeastOnce).await?;
                } else {
                    tracing::info!("rebirth requested: publishing the births again");
                }
                born = true;
                node.births()
            }
            _ = ticker.tick(), if born => node.data(&mut rng, dt),
        };
        for (topic, payload) in messages {
            client
                .publish(topic, QoS::AtLeastOnce, false, payload)
                .await?;
        }
    }
    // A clean end: the NDEATH ourselves, since a DISCONNECT discards the will.
    let _ = client
        .publish(
            node.topic("NDEATH", None),
            QoS::AtLeastOnce,
            false,
            node.death(),
        )
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), poller).await;
    Ok(())
}

async fn poll(mut eventloop: EventLoop, heard: mpsc::Sender<Heard>, stop: CancellationToken) {
    let mut failures: u32 = 0;
    loop {
        let event = tokio::select! {
            event = eventloop.poll() => event,
            () = stop.cancelled() => {
                // Let the NDEATH and DISCONNECT out.
                let _ = tokio::time::timeout(Duration::from_secs(1), async {
                    while eventloop.poll().await.is_ok() {}
                })
                .await;
                return;
            }
        };
        let tell = match event {
            Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                failures = 0;
                Some(Heard::Connected)
            }
            Ok(Event::Incoming(Incoming::Publish(p))) if is_rebirth_request(&p.payload) => {
                Some(Heard::Rebirth)
            }
            Ok(_) => None,
            Err(e) => {
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
                None
            }
        };
        if let Some(tell) = tell
            && heard.send(tell).await.is_err()
        {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Limits, Reading};
    use crate::sparkplug::Sessions;

    fn node() -> Node {
        let mut rng = StdRng::seed_from_u64(3);
        Node {
            id: "n".into(),
            bd_seq: 9,
            seq: 0,
            devices: (1..=2)
                .map(|n| Device {
                    id: format!("dev-{n:03}"),
                    temperature: Sensor::temperature(n, &mut rng),
                    humidity: Sensor::humidity(n, &mut rng),
                    offset: -3,
                    running: true,
                    sent: [20.0, 40.0, -3.0, 1.0],
                    alias_base: 100 * n as u64,
                })
                .collect(),
            started: std::time::Instant::now(),
        }
    }

    /// What sensorhub's own Sparkplug judge makes of the simulator's messages.
    fn judge(
        messages: &[(String, Vec<u8>)],
        sessions: &mut Sessions,
        lsn: &mut u64,
    ) -> (Vec<Reading>, usize) {
        let (mut readings, mut dead) = (Vec::new(), Vec::new());
        for (topic, payload) in messages {
            *lsn += 1;
            let captured = crate::domain::Captured::new(
                Timestamp::now(),
                bytes::Bytes::copy_from_slice(topic.as_bytes()),
                bytes::Bytes::copy_from_slice(payload),
                1 << 20,
            );
            sessions.judge(
                "l",
                *lsn,
                &captured,
                &Limits::default(),
                &mut readings,
                &mut dead,
            );
        }
        (readings, dead.len())
    }

    #[test]
    fn births_then_data_by_exception_are_judged_without_dead_letters() {
        let mut node = node();
        let mut sessions = Sessions::default();
        let mut lsn = 0;
        let (born, dead) = judge(&node.births(), &mut sessions, &mut lsn);
        assert_eq!(dead, 0);
        // Uptime and the rebirth flag of the node, four metrics per device.
        assert_eq!(born.len(), 2 + 2 * 4);
        let offset = born
            .iter()
            .find(|r| r.sensor_id().as_str() == "sensorhub/n/dev-001/Setpoint Offset")
            .unwrap();
        assert_eq!(offset.value(), -3.0, "Int16 below zero survives the trip");
        let mut rng = StdRng::seed_from_u64(5);
        let mut total = 0;
        for _ in 0..300 {
            let data = node.data(&mut rng, 1.0);
            let (readings, dead) = judge(&data, &mut sessions, &mut lsn);
            assert_eq!(dead, 0);
            total += readings.len();
        }
        assert!(
            total > 0 && total < 300 * 8,
            "by exception: {total} readings"
        );
        // A rebirth starts a new seq at 0 and is taken as well.
        let (again, dead) = judge(&node.births(), &mut sessions, &mut lsn);
        assert_eq!((again.len(), dead), (10, 0));
        let death = Payload::decode(&node.death()[..]).unwrap();
        assert_eq!(
            death.metrics[0].value,
            Some(Value::LongValue(9)),
            "the session's bdSeq"
        );
    }
}
