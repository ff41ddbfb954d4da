//! Readings in batches over the real broker: a JSON array of readings and one sensor's `values`
//! object, each element stored as its own reading, a bad element a dead letter naming its
//! index while the others are stored, and the limit on readings per message.

use bson::doc;
use serde_json::{Value, json};
use tokio::net::TcpStream;

use crate::helpers::{AppOptions, Publisher, TestApp, ts};
use crate::raw_mqtt::{V, connack_code, puback_code};
use crate::security::app_with_credentials;

/// The dead letters `/deadletters?reason=` lists, once `count` of them are there.
async fn dead_letters(app: &TestApp, reason: &str, count: usize) -> Vec<Value> {
    app.eventually(&format!("{count} dead letters {reason}"), || async {
        let (_, body) = app.get_json(&format!("/deadletters?reason={reason}")).await;
        let letters = body.as_array().cloned().unwrap_or_default();
        (letters.len() == count).then_some(letters)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_with_one_bad_element_stores_the_others_and_names_the_index() {
    const N: usize = 50;
    const BAD: usize = 17;
    let app = TestApp::spawn().await;
    let batch: Vec<Value> = (0..N)
        .map(|i| {
            let value = if i == BAD {
                json!("n/a")
            } else {
                json!(i as f64 + 0.5)
            };
            json!({"sensor_id": format!("gw-{i:02}"), "value": value, "timestamp": ts(1_000)})
        })
        .collect();
    let payload = serde_json::to_vec(&batch).unwrap();
    let publisher = Publisher::connect(app.mqtt_port, "batch-gw").await;
    publisher
        .publish(0, "sensors/temperature", payload.clone())
        .await;
    publisher.wait_acked(1).await;
    app.wait_for_count(N as u64 - 1).await;

    let letters = dead_letters(&app, "value_not_numeric", 1).await;
    let id = letters[0]["id"].as_str().unwrap();
    assert!(id.ends_with(&format!(":{BAD}")), "{id}");
    assert_eq!(id.matches(':').count(), 2, "<log id>:<lsn>:<index>: {id}");
    let message = letters[0]["message"].as_str().unwrap();
    assert!(
        message.starts_with(&format!("element {BAD}: ")),
        "{message}"
    );
    assert_eq!(letters[0]["topic"], "sensors/temperature");

    // Each stored element is its own reading, with its own value and the topic's kind.
    let docs = app.reading_docs().await;
    assert_eq!(docs.len(), N - 1);
    for d in &docs {
        let sensor = d.get_str("sensor_id").unwrap();
        let i: usize = sensor.trim_start_matches("gw-").parse().unwrap();
        assert_ne!(i, BAD);
        assert_eq!(d.get_f64("value").unwrap(), i as f64 + 0.5, "{sensor}");
        assert_eq!(d.get_str("kind").unwrap(), "temperature");
        assert!(!d.contains_key("tags"), "no template, no tags: {d}");
    }
    let (status, body) = app.get_json("/latestten/gw-03").await;
    assert_eq!(status, 200);
    assert_eq!(body[0]["value"], 3.5);

    // The same batch again is the same readings: duplicates, nothing stored twice.
    publisher.publish(1, "sensors/temperature", payload).await;
    publisher.wait_acked(2).await;
    app.eventually("the repeat counted as duplicates", || async {
        (app.metric("sensorhub_readings_duplicate_total").await == N as u64 - 1).then_some(())
    })
    .await;
    assert_eq!(app.count_readings().await, N as u64 - 1);
    // Its bad element is a dead letter of the second message, under its own id.
    let letters = dead_letters(&app, "value_not_numeric", 2).await;
    assert_ne!(letters[0]["id"], letters[1]["id"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_values_form_stores_each_kind_of_one_sensor() {
    let app = TestApp::spawn().await;
    let publisher = Publisher::connect(app.mqtt_port, "bme-gw").await;
    let payload = json!({
        "sensor_id": "bme-1",
        "timestamp": ts(2_000),
        "values": {"temperature": 21.5, "humidity": 48, "pressure": "1013.25", "co2": "high"}
    });
    publisher
        .publish(0, "sensors/bme280", payload.to_string())
        .await;
    publisher.wait_acked(1).await;
    app.wait_for_count(3).await;
    let (status, body) = app.get_json("/readings?sensor_id=bme-1").await;
    assert_eq!(status, 200);
    let mut kinds: Vec<(String, f64)> = body["readings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            assert_eq!(r["timestamp"], ts(2_000));
            (
                r["kind"].as_str().unwrap().to_owned(),
                r["value"].as_f64().unwrap(),
            )
        })
        .collect();
    kinds.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        kinds,
        [
            ("humidity".to_owned(), 48.0),
            ("pressure".to_owned(), 1013.25),
            ("temperature".to_owned(), 21.5)
        ]
    );
    let letters = dead_letters(&app, "value_not_numeric", 1).await;
    assert!(letters[0]["id"].as_str().unwrap().ends_with(":3"));
    assert!(
        letters[0]["message"]
            .as_str()
            .unwrap()
            .starts_with("element 3 (values.co2): "),
        "{}",
        letters[0]["message"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_over_the_limit_is_one_dead_letter_and_stores_nothing() {
    let app = TestApp::spawn_with(AppOptions {
        args: vec!["--max-batch-readings".into(), "5".into()],
        ..AppOptions::default()
    })
    .await;
    let batch = |n: usize, at: i64| {
        let elements: Vec<Value> = (0..n)
            .map(|i| json!({"sensor_id": format!("lim-{i}"), "value": i, "timestamp": ts(at)}))
            .collect();
        serde_json::to_vec(&elements).unwrap()
    };
    let publisher = Publisher::connect(app.mqtt_port, "lim-gw").await;
    publisher.publish(0, "sensors/t", batch(6, 1_000)).await;
    publisher.publish(1, "sensors/t", batch(5, 2_000)).await;
    publisher.publish(2, "sensors/t", "[]").await;
    publisher.wait_acked(3).await;
    app.wait_for_count(5).await;
    let letters = dead_letters(&app, "batch_too_large", 1).await;
    let message = letters[0]["message"].as_str().unwrap();
    assert!(message.contains("6 readings, the limit is 5"), "{message}");
    assert_eq!(
        letters[0]["id"].as_str().unwrap().matches(':').count(),
        1,
        "a dead letter of the whole message"
    );
    dead_letters(&app, "batch_empty", 1).await;
    assert_eq!(
        app.metric("sensorhub_dead_letters_total{reason=\"batch_too_large\"}")
            .await,
        1
    );
    // Nothing of the refused batch (timestamp 1 s) was stored.
    let readings = app.readings().await;
    let early = readings
        .count_documents(doc! {"timestamp": bson::DateTime::from_millis(1_767_225_601_000)})
        .await
        .unwrap();
    assert_eq!(early, 0);
}

#[tokio::test]
async fn a_batch_naming_a_sensor_outside_the_grant_is_refused_whole() {
    let (app, _dir) = app_with_credentials(&[]).await;
    let mut s = TcpStream::connect(("127.0.0.1", app.mqtt5_port))
        .await
        .unwrap();
    assert_eq!(
        connack_code(&mut s, V::V5, "p3-batch", Some(("plant3", "right horse"))).await,
        0
    );
    let mixed = json!([
        {"sensor_id": "plant3/a", "value": 1, "timestamp": ts(1_000)},
        {"sensor_id": "plant4/b", "value": 2, "timestamp": ts(1_000)}
    ]);
    assert_eq!(
        puback_code(&mut s, V::V5, "sensors/t", 1, &mixed.to_string()).await,
        0x87,
        "one foreign sensor id refuses the message"
    );
    let mine = json!([
        {"sensor_id": "plant3/a", "value": 1, "timestamp": ts(2_000)},
        {"sensor_id": "plant3/b", "value": 2, "timestamp": ts(2_000)}
    ]);
    assert_eq!(
        puback_code(&mut s, V::V5, "sensors/t", 2, &mine.to_string()).await,
        0
    );
    app.wait_for_count(2).await;
    dead_letters(&app, "forbidden", 1).await;
    let stored = app
        .readings()
        .await
        .count_documents(doc! {"sensor_id": "plant3/a"})
        .await
        .unwrap();
    assert_eq!(
        stored, 1,
        "the refused batch stored nothing, its own element neither"
    );
}
