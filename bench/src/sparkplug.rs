//! Sparkplug B against JSON in one sensorhub: first JSON readings (one per message), then a
//! Sparkplug edge node's DDATA with 20 metrics each (aliases only, after NBIRTH and DBIRTHs),
//! both published at QoS 1 as fast as acknowledgements allow over one connection. Each rate is
//! the readings stored in MongoDB divided by the time from the first publish until the last
//! reading is stored; every message must end as readings, none as a dead letter.

use std::time::{Duration, Instant};

use prost::Message as _;
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, QoS};
use sensorhub::sparkplug::proto::{Metric, Payload, Value, datatype};

use super::env::{Env, Hub, fetch_metrics};
use super::report::{Report, Verdict, thousands};
use super::{Plan, note_log};

/// Metrics per DDATA, as the issue asks.
const METRICS: usize = 20;
/// Devices of the edge node; DDATA go to them round-robin.
const DEVICES: usize = 10;
/// T0 of the timestamps: 2026-01-01T00:00:00Z.
const T0: u64 = 1_767_225_600_000;

pub async fn run(env: &Env, plan: &Plan, report: &mut Report) -> anyhow::Result<()> {
    let hub = env.spawn("sparkplug").await?;
    let database = hub.database.clone();
    let outcome = measure(env, plan, &hub).await;
    let log = hub.stop().await;
    note_log(report, "sparkplug", &log);
    env.drop_database(&database).await;
    let (json, sparkplug, messages) = outcome?;
    report.detail(
        "sparkplug",
        format!(
            "JSON: {} readings/s; Sparkplug: {} metric values/s in {} DDATA/s of {METRICS} \
             metrics",
            thousands(json),
            thousands(sparkplug),
            thousands(messages)
        ),
    );
    report.row(
        "Sparkplug",
        "Sparkplug B values stored/s (DDATA of 20 metrics) vs JSON readings/s",
        format!("{}/s vs {}/s", thousands(sparkplug), thousands(json)),
        format!("x{:.1}", sparkplug / json),
        Verdict::Info,
    );
    Ok(())
}

/// (JSON readings/s, Sparkplug values/s, Sparkplug messages/s).
async fn measure(env: &Env, plan: &Plan, hub: &Hub) -> anyhow::Result<(f64, f64, f64)> {
    let (json_messages, ddata) = if plan.quick {
        (50_000, 5_000)
    } else {
        (200_000, 20_000)
    };
    let publisher = Publisher::connect(hub).await?;

    let start = Instant::now();
    for i in 0..json_messages {
        let payload = format!(
            r#"{{"sensor_id":"json-{:03}","value":{},"timestamp":"2026-01-01T00:00:{:02}.{:03}Z"}}"#,
            i % 1000,
            i % 97,
            (i / 1000) / 1000 % 60,
            (i / 1000) % 1000
        );
        publisher
            .publish("sensors/temperature", payload.into_bytes())
            .await?;
    }
    wait_stored(env, hub, json_messages).await?;
    let json = json_messages as f64 / start.elapsed().as_secs_f64();

    let start = Instant::now();
    let births = births();
    // The NBIRTH's only metric is bdSeq, no reading.
    let birth_values = DEVICES * METRICS;
    let mut seq = 0u64;
    for (topic, payload) in births {
        publisher
            .publish(&topic, with_seq(payload, &mut seq))
            .await?;
    }
    for i in 0..ddata {
        let device = i % DEVICES;
        let at = T0 + 1 + (i / DEVICES) as u64;
        let payload = Payload {
            timestamp: Some(at),
            metrics: (0..METRICS)
                .map(|m| Metric {
                    alias: Some(alias(device, m)),
                    timestamp: Some(at),
                    value: Some(Value::DoubleValue((i * METRICS + m) as f64 / 8.0)),
                    ..Metric::default()
                })
                .collect(),
            ..Payload::default()
        };
        let topic = format!("spBv1.0/bench/DDATA/edge/dev-{device:02}");
        publisher
            .publish(&topic, with_seq(payload, &mut seq))
            .await?;
    }
    let values = (ddata * METRICS) as u64;
    wait_stored(env, hub, json_messages + birth_values as u64 + values).await?;
    let elapsed = start.elapsed().as_secs_f64();
    let metrics = fetch_metrics(&mut hub.http_client()).await?;
    anyhow::ensure!(
        metrics.dead_letters == 0,
        "{} dead letters: every message should have been readings",
        metrics.dead_letters
    );
    publisher.close().await;
    Ok((
        json,
        (values + birth_values as u64) as f64 / elapsed,
        ddata as f64 / elapsed,
    ))
}

fn alias(device: usize, metric: usize) -> u64 {
    (device * METRICS + metric) as u64 + 10
}

fn with_seq(mut payload: Payload, seq: &mut u64) -> Vec<u8> {
    payload.seq = Some(*seq % 256);
    *seq += 1;
    payload.encode_to_vec()
}

/// NBIRTH (bdSeq only) and a DBIRTH of `METRICS` Double metrics per device, at T0.
fn births() -> Vec<(String, Payload)> {
    let nbirth = Payload {
        timestamp: Some(T0),
        metrics: vec![Metric {
            name: Some("bdSeq".into()),
            datatype: Some(datatype::INT64),
            value: Some(Value::LongValue(0)),
            ..Metric::default()
        }],
        ..Payload::default()
    };
    let mut out = vec![("spBv1.0/bench/NBIRTH/edge".to_owned(), nbirth)];
    for device in 0..DEVICES {
        let metrics = (0..METRICS)
            .map(|m| Metric {
                name: Some(format!("Line {}/Value {m:02}", device % 3)),
                alias: Some(alias(device, m)),
                timestamp: Some(T0),
                datatype: Some(datatype::DOUBLE),
                value: Some(Value::DoubleValue(0.0)),
                ..Metric::default()
            })
            .collect();
        out.push((
            format!("spBv1.0/bench/DBIRTH/edge/dev-{device:02}"),
            Payload {
                timestamp: Some(T0),
                metrics,
                ..Payload::default()
            },
        ));
    }
    out
}

async fn wait_stored(env: &Env, hub: &Hub, expected: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let stored = env.count_readings(&hub.database, false).await?;
        if stored >= expected && env.count_readings(&hub.database, true).await? >= expected {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {stored} of {expected} readings stored after 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One QoS 1 connection, pipelined up to the broker's inflight window.
struct Publisher {
    client: AsyncClient,
    poller: tokio::task::JoinHandle<()>,
}

impl Publisher {
    async fn connect(hub: &Hub) -> anyhow::Result<Self> {
        let mut options = MqttOptions::new(
            "bench-sparkplug",
            hub.mqtt.ip().to_string(),
            hub.mqtt.port(),
        );
        options
            .set_keep_alive(Duration::from_secs(30))
            .set_inflight(500)
            .set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut eventloop) = AsyncClient::new(options, 1000);
        // The acknowledgements pace the publisher (rumqttc's inflight window); storage is
        // what is measured.
        let poller = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    // Our own goodbye: the broker closing the connection after it is no loss.
                    Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "benchmark publisher lost the broker");
                        return;
                    }
                }
            }
        });
        Ok(Self { client, poller })
    }

    async fn publish(&self, topic: &str, payload: Vec<u8>) -> anyhow::Result<()> {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await?;
        Ok(())
    }

    async fn close(self) {
        let _ = self.client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.poller).await;
    }
}
