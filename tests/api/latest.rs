use serde_json::Value;

use crate::helpers::{Publisher, TestApp, reading_json, ts};

fn timestamps(body: &Value) -> Vec<String> {
    body.as_array()
        .expect("array")
        .iter()
        .map(|r| r["timestamp"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_ten_per_sensor_is_by_device_time_trimmed_and_never_mixed() {
    let app = TestApp::spawn().await;
    let publisher = Publisher::connect(app.mqtt_port, "latest").await;
    // Out of order on purpose: device time, not arrival, decides.
    let order_a = [7, 14, 0, 3, 12, 9, 1, 13, 5, 2, 11, 4, 10, 6, 8];
    let mut id = 0;
    for n in order_a {
        publisher
            .publish(
                id,
                "sensors/temperature",
                reading_json("A", n as f64, &ts(n * 1000)),
            )
            .await;
        id += 1;
    }
    for n in 0..12 {
        publisher
            .publish(
                id,
                "sensors/humidity",
                reading_json("B", 100.0 + n as f64, &ts(n * 1000 + 500)),
            )
            .await;
        id += 1;
    }
    publisher.wait_acked(id).await;
    app.wait_for_count(27).await;

    let expected_a: Vec<String> = (5..15).rev().map(|n| ts(n * 1000)).collect();
    let expected_b: Vec<String> = (2..12).rev().map(|n| ts(n * 1000 + 500)).collect();
    // Back to back, alternating: each answer belongs to the sensor asked for.
    for _ in 0..5 {
        for (sensor, expected) in [("A", &expected_a), ("B", &expected_b)] {
            let (status, body) = app.get_json(&format!("/latestten/{sensor}")).await;
            assert_eq!(status, 200);
            assert_eq!(&timestamps(&body), expected, "sensor {sensor}");
            assert!(
                body.as_array()
                    .unwrap()
                    .iter()
                    .all(|r| r["sensor_id"] == sensor)
            );
        }
    }

    // A late reading older than A's ten does not displace them; a newer one does.
    publisher
        .publish(
            id,
            "sensors/temperature",
            reading_json("A", -1.0, &ts(-5000)),
        )
        .await;
    publisher
        .publish(
            id + 1,
            "sensors/temperature",
            reading_json("A", 99.0, &ts(99_000)),
        )
        .await;
    publisher.wait_acked(id + 2).await;
    app.wait_for_count(29).await;
    let body = app
        .eventually("the newer reading on top", || async {
            let (_, body) = app.get_json("/latestten/A").await;
            (body[0]["timestamp"] == ts(99_000).as_str()).then_some(body)
        })
        .await;
    let mut expected: Vec<String> = vec![ts(99_000)];
    expected.extend((6..15).rev().map(|n| ts(n * 1000)));
    assert_eq!(timestamps(&body), expected);
    assert_eq!(body[0]["value"], 99.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_ten_overall_spans_sensors() {
    let app = TestApp::spawn().await;
    let publisher = Publisher::connect(app.mqtt_port, "overall").await;
    for n in 0..30 {
        let sensor = format!("s{}", n % 4);
        publisher
            .publish(
                n as usize,
                "sensors/temperature",
                reading_json(&sensor, n as f64, &ts(n * 10)),
            )
            .await;
    }
    publisher.wait_acked(30).await;
    app.wait_for_count(30).await;
    let body = app
        .eventually("the newest reading overall", || async {
            let (_, body) = app.get_json("/latestten").await;
            (body.as_array().is_some_and(|a| a.len() == 10)
                && body[0]["timestamp"] == ts(290).as_str())
            .then_some(body)
        })
        .await;
    let expected: Vec<String> = (20..30).rev().map(|n| ts(n * 10)).collect();
    assert_eq!(timestamps(&body), expected);
    let values: Vec<f64> = body
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["value"].as_f64().unwrap())
        .collect();
    assert_eq!(values, (20..30).rev().map(f64::from).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_sensor_is_a_404_with_a_message() {
    let app = TestApp::spawn().await;
    let (status, body) = app.get_json("/latestten/nobody-here").await;
    assert_eq!(status, 404);
    assert_eq!(body["error"], "not_found");
    assert!(body["message"].as_str().unwrap().contains("nobody-here"));
    let (status, body) = app.get_json("/latestten").await;
    assert_eq!(status, 200);
    assert_eq!(body, serde_json::json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_reading_replaces_a_latest_ten_answer_kept_in_memory() {
    // Answers may be kept for a minute: only invalidation on write can make the new one show.
    let app = TestApp::spawn_with(crate::helpers::AppOptions {
        args: vec!["--read-cache-ms".into(), "60000".into()],
        ..Default::default()
    })
    .await;
    let publisher = Publisher::connect(app.mqtt_port, "memo").await;
    publisher
        .publish(0, "sensors/temperature", reading_json("M", 1.0, &ts(1000)))
        .await;
    publisher.wait_acked(1).await;
    let first = app
        .eventually("M served from Redis", || async {
            let response = app.get("/latestten/M").await;
            let from_redis = response
                .headers()
                .get("x-sensorhub-source")
                .is_some_and(|v| v == "redis");
            let body: Value = response.json().await.ok()?;
            (from_redis && body.as_array().is_some_and(|a| a.len() == 1)).then_some(body)
        })
        .await;
    assert_eq!(first[0]["value"], 1.0);
    publisher
        .publish(1, "sensors/temperature", reading_json("M", 2.0, &ts(2000)))
        .await;
    publisher.wait_acked(2).await;
    let body = app
        .eventually("the new reading on top", || async {
            let (_, body) = app.get_json("/latestten/M").await;
            (body.as_array().is_some_and(|a| a.len() == 2)).then_some(body)
        })
        .await;
    assert_eq!(timestamps(&body), vec![ts(2000), ts(1000)]);
}
