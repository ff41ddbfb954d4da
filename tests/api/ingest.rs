use std::collections::HashSet;
use std::time::Duration;

use bson::{Bson, doc};

use crate::helpers::{Publisher, TestApp, reading_json, ts};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_published_reading_becomes_one_typed_document() {
    let app = TestApp::spawn().await;
    let publisher = Publisher::connect(app.mqtt_port, "typed").await;
    // The original contract: a quoted value and Python's naive isoformat() timestamp.
    let payload =
        r#"{"sensor_id": "t-1", "value": "21.5", "timestamp": "2026-01-01T10:00:00.123456"}"#;
    publisher.publish(0, "sensors/temperature", payload).await;
    publisher.wait_acked(1).await;
    app.wait_for_count(1).await;

    let document = app
        .readings()
        .await
        .find_one(doc! {})
        .await
        .unwrap()
        .expect("stored");
    assert_eq!(document.get("sensor_id"), Some(&Bson::String("t-1".into())));
    assert_eq!(
        document.get("kind"),
        Some(&Bson::String("temperature".into()))
    );
    assert_eq!(document.get("value"), Some(&Bson::Double(21.5)));
    let Some(Bson::DateTime(at)) = document.get("timestamp") else {
        panic!("timestamp is not a BSON Date: {document:?}");
    };
    assert_eq!(
        at.try_to_rfc3339_string().unwrap(),
        "2026-01-01T10:00:00.123Z"
    );
    assert!(matches!(document.get("_id"), Some(Bson::String(_))));
    assert_eq!(app.metric("sensorhub_readings_stored_total").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_and_keep_alive_zero_clients_are_accepted() {
    let app = TestApp::spawn().await;

    mosquitto_pub(
        app.mqtt5_port,
        &["-V", "mqttv5"],
        "sensors/humidity",
        &reading_json("h-5", 40.0, &ts(0)),
    );

    // MQTT allows keep-alive 0 ("no keep-alive"); rumqttd alone refuses it.
    let mut options = rumqttc::MqttOptions::new("no-keepalive", "127.0.0.1", app.mqtt_port);
    options.set_keep_alive(Duration::ZERO);
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 10);
    client
        .publish(
            "sensors/temperature",
            rumqttc::QoS::AtLeastOnce,
            false,
            reading_json("k-0", 1.0, &ts(0)),
        )
        .await
        .unwrap();
    let acked = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match eventloop.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Incoming::PubAck(_))) => return true,
                Ok(_) => {}
                Err(e) => panic!("keep-alive 0 client refused: {e}"),
            }
        }
    })
    .await
    .expect("no PUBACK");
    assert!(acked);

    app.wait_for_count(2).await;
    assert_eq!(app.metric("sensorhub_keep_alive_zero_total").await, 1);
    let (status, body) = app.get_json("/latestten/h-5").await;
    assert_eq!(status, 200);
    assert_eq!(body[0]["kind"], "humidity");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_reading_is_stored_once_and_counted_as_duplicate() {
    let app = TestApp::spawn().await;
    let publisher = Publisher::connect(app.mqtt_port, "dup").await;
    let payload = reading_json("d-1", 3.0, &ts(5));
    for id in 0..3 {
        publisher
            .publish(id, "sensors/temperature", payload.clone())
            .await;
    }
    publisher.wait_acked(3).await;
    app.eventually("two duplicates counted", || async {
        (app.metric("sensorhub_readings_duplicate_total").await == 2).then_some(())
    })
    .await;
    assert_eq!(app.count_readings().await, 1);
    assert_eq!(app.metric("sensorhub_readings_stored_total").await, 1);
}

/// The writer stores a batch in the order of the sensor index, split between lanes by sensor,
/// and MongoDB reports duplicates by position in what it was sent: the positions must come back
/// to the readings they belong to, or a new reading is taken for a redelivery and never
/// reaches Redis (and a redelivery reaches it twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redeliveries_among_new_readings_are_told_apart_whatever_order_the_store_writes() {
    let app = TestApp::spawn().await;
    let publisher = Publisher::connect(app.mqtt_port, "mixed").await;
    let stored_first = ["sort-m", "sort-s"];
    for (id, sensor) in stored_first.iter().enumerate() {
        let payload = reading_json(sensor, 1.0, &ts(1_000));
        publisher.publish(id, "sensors/temperature", payload).await;
    }
    publisher.wait_acked(stored_first.len()).await;
    app.eventually("the first readings stored", || async {
        (app.metric("sensorhub_readings_stored_total").await == 2).then_some(())
    })
    .await;
    // Arrival order is neither the sensors' order nor the lanes': new, old, new, old, new.
    let second = [
        ("sort-z", 1_000, 2.0),
        ("sort-s", 1_000, 1.0),
        ("sort-a", 1_000, 3.0),
        ("sort-m", 1_000, 1.0),
        ("sort-b", 1_000, 4.0),
        ("sort-s", 2_000, 5.0),
    ];
    for (i, (sensor, at, value)) in second.iter().enumerate() {
        let payload = reading_json(sensor, *value, &ts(*at));
        publisher
            .publish(10 + i, "sensors/temperature", payload)
            .await;
    }
    publisher
        .wait_acked(stored_first.len() + second.len())
        .await;
    app.eventually("the second readings settled", || async {
        let settled = app.metric("sensorhub_readings_stored_total").await
            + app.metric("sensorhub_readings_duplicate_total").await;
        (settled == 8).then_some(())
    })
    .await;
    assert_eq!(app.metric("sensorhub_readings_duplicate_total").await, 2);
    assert_eq!(app.metric("sensorhub_readings_stored_total").await, 6);
    assert_eq!(app.count_readings().await, 6);
    // Each sensor's set in Redis holds its readings once: the new ones reached it, the
    // redeliveries were not added again.
    for (sensor, values) in [
        ("sort-z", vec![2.0]),
        ("sort-a", vec![3.0]),
        ("sort-b", vec![4.0]),
        ("sort-m", vec![1.0]),
        ("sort-s", vec![5.0, 1.0]),
    ] {
        let path = format!("/latestten/{sensor}");
        let got = app
            .eventually(&format!("{sensor}'s readings in Redis"), || async {
                let body = app.get_from_redis(&path).await?;
                let got: Vec<f64> = (body.as_array()?.iter())
                    .filter_map(|r| r["value"].as_f64())
                    .collect();
                (got.len() == values.len()).then_some(got)
            })
            .await;
        assert_eq!(got, values, "{sensor}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_qos1_readings_from_four_clients_are_all_stored_once() {
    let app = TestApp::spawn().await;
    const PER_CLIENT: usize = 2500;
    let mut tasks = Vec::new();
    for client in 0..4 {
        let port = app.mqtt_port;
        tasks.push(tokio::spawn(async move {
            let publisher = Publisher::connect(port, &format!("load-{client}")).await;
            for n in 0..PER_CLIENT {
                let id = client * PER_CLIENT + n;
                let sensor = format!("load-{}", id % 100);
                let payload = reading_json(&sensor, id as f64, &ts(id as i64));
                publisher.publish(id, "sensors/temperature", payload).await;
            }
            publisher.wait_acked(PER_CLIENT).await;
            publisher.acked()
        }));
    }
    let mut acked = HashSet::new();
    for task in tasks {
        acked.extend(task.await.unwrap());
    }
    assert_eq!(acked.len(), 4 * PER_CLIENT);
    app.wait_for_count(4 * PER_CLIENT as u64).await;

    let ids: Vec<Bson> = app.readings().await.distinct("_id", doc! {}).await.unwrap();
    assert_eq!(ids.len(), 4 * PER_CLIENT, "every reading exactly once");
    assert_eq!(app.metric("sensorhub_readings_duplicate_total").await, 0);
    assert_eq!(
        app.metric("sensorhub_messages_captured_total").await,
        10_000
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mosquitto_pub_reading_shows_in_latestten() {
    let app = TestApp::spawn().await;
    mosquitto_pub(
        app.mqtt_port,
        &[],
        "sensors/temperature",
        r#"{"sensor_id": "boiler-7", "value": 21.5, "timestamp": "2026-11-27T10:15:00+01:00"}"#,
    );
    let body = app
        .eventually("boiler-7 in /latestten/boiler-7", || async {
            let (status, body) = app.get_json("/latestten/boiler-7").await;
            (status == 200).then_some(body)
        })
        .await;
    assert_eq!(
        body,
        serde_json::json!([{
            "sensor_id": "boiler-7",
            "kind": "temperature",
            "value": 21.5,
            "timestamp": "2026-11-27T09:15:00.000Z"
        }])
    );
}

/// Publishes one message at QoS 1 with Mosquitto's own client, as an operator would.
fn mosquitto_pub(port: u16, extra: &[&str], topic: &str, message: &str) {
    let status = std::process::Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1"])
        .args(extra)
        .args(["-t", topic, "-m", message])
        .status()
        .expect("mosquitto_pub");
    assert!(status.success(), "mosquitto_pub failed: {status}");
}
