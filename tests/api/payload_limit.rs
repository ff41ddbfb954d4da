//! Readings at the largest payload the configuration admits (`--max-payload-bytes 1048576`)
//! travel the whole path among ordinary ones: captured, logged, read back (each larger than a
//! batch of the writer), stored once. One byte more is a `payload_too_large` dead letter. None of
//! the ordinary readings around them may be lost.

use std::collections::HashMap;

use bson::doc;
use futures_util::TryStreamExt;

use crate::helpers::{AppOptions, Publisher, TestApp, reading_json, ts, unique};

const LIMIT: usize = 1_048_576;

/// A reading padded with a field the decoder ignores to exactly `len` bytes.
fn padded(sensor: &str, value: f64, timestamp: &str, len: usize) -> Vec<u8> {
    let json = |pad: usize| {
        format!(
            r#"{{"sensor_id":"{sensor}","value":{value},"timestamp":"{timestamp}","pad":"{}"}}"#,
            "x".repeat(pad)
        )
    };
    let payload = json(len - json(0).len()).into_bytes();
    assert_eq!(payload.len(), len);
    payload
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_at_the_payload_limit_are_stored_and_one_byte_more_is_a_dead_letter() {
    const ORDINARY: usize = 300;
    const LARGE_EVERY: usize = 30;
    let app = TestApp::spawn_with(AppOptions {
        args: vec!["--max-payload-bytes".into(), LIMIT.to_string()],
        ..AppOptions::default()
    })
    .await;
    let publisher = Publisher::connect(app.mqtt_port, &unique("limit")).await;
    // (sensor, millis) -> value of every reading that must be stored.
    let mut expected: HashMap<(String, i64), f64> = HashMap::new();
    let mut id = 0;
    for n in 0..ORDINARY {
        let sensor = format!("limit-{}", n % 7);
        publisher
            .publish(
                id,
                "sensors/temperature",
                reading_json(&sensor, n as f64, &ts(n as i64)),
            )
            .await;
        expected.insert((sensor, n as i64), n as f64);
        id += 1;
        if n % LARGE_EVERY == 5 {
            let sensor = format!("limit-large-{n}");
            let payload = padded(&sensor, -(n as f64), &ts(n as i64), LIMIT);
            publisher.publish(id, "sensors/humidity", payload).await;
            expected.insert((sensor, n as i64), -(n as f64));
            id += 1;
        }
        if n == ORDINARY / 2 {
            let payload = padded("limit-over", 1.0, &ts(0), LIMIT + 1);
            publisher.publish(id, "sensors/humidity", payload).await;
            id += 1;
        }
    }
    publisher.wait_acked(id).await;
    assert_eq!(publisher.acked().len(), id, "every publish acknowledged");

    app.wait_for_count(expected.len() as u64).await;
    let too_large = "sensorhub_dead_letters_total{reason=\"payload_too_large\"}";
    app.eventually("the over-limit reading dead-lettered", || async {
        (app.metric(too_large).await == 1).then_some(())
    })
    .await;
    let docs: Vec<bson::Document> = app
        .readings()
        .await
        .find(doc! {})
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let mut stored: HashMap<(String, i64), f64> = HashMap::new();
    let base = 1_767_225_600_000_i64; // the origin of `ts`
    for d in &docs {
        let key = (
            d.get_str("sensor_id").unwrap().to_owned(),
            d.get_datetime("timestamp").unwrap().timestamp_millis() - base,
        );
        assert!(
            stored
                .insert(key.clone(), d.get_f64("value").unwrap())
                .is_none(),
            "{key:?} stored twice"
        );
    }
    assert_eq!(
        stored, expected,
        "each reading, large or not, stored exactly once"
    );
    assert!(!stored.contains_key(&("limit-over".to_owned(), 0)));

    let (status, body) = app
        .get_json("/deadletters?reason=payload_too_large&limit=10")
        .await;
    assert_eq!(status, 200);
    let letters = body.as_array().unwrap();
    assert_eq!(letters.len(), 1, "{body}");
    assert_eq!(letters[0]["payload_bytes"], LIMIT + 1);
    assert_eq!(app.metric("sensorhub_journal_corrupt_bytes_total").await, 0);
    let large = expected.keys().filter(|(s, _)| s.contains("large")).count();
    eprintln!(
        "payload limit: {} readings stored, {large} of them of {LIMIT} bytes; one of {} bytes \
         dead-lettered",
        stored.len(),
        LIMIT + 1
    );
}
