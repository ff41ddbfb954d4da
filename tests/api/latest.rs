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
    // The point is the Redis answer (the original system's cache mixed sensors up): wait until
    // that is what serves, and check every answer says so.
    app.eventually("A served from Redis", || async {
        app.get_from_redis("/latestten/A").await.map(drop)
    })
    .await;
    for _ in 0..5 {
        for (sensor, expected) in [("A", &expected_a), ("B", &expected_b)] {
            let response = app.get(&format!("/latestten/{sensor}")).await;
            assert_eq!(response.status(), 200);
            assert_eq!(
                response
                    .headers()
                    .get("x-sensorhub-source")
                    .and_then(|v| v.to_str().ok()),
                Some("redis"),
                "sensor {sensor}"
            );
            let body: Value = response.json().await.expect("json");
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

/// A BME280-style device: temperature, humidity and pressure under one id at one instant are
/// three readings, not one reading and two duplicates; a true redelivery is still one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_device_reports_several_quantities_at_one_instant() {
    let app = TestApp::spawn().await;
    let publisher = Publisher::connect(app.mqtt_port, "bme280").await;
    let kinds = ["temperature", "humidity", "pressure"];
    let mut id = 0;
    for n in 0..5 {
        for (k, kind) in kinds.iter().enumerate() {
            let value = (n * 10 + k) as f64;
            publisher
                .publish(
                    id,
                    &format!("sensors/{kind}"),
                    reading_json("bme-1", value, &ts(n as i64 * 1000)),
                )
                .await;
            id += 1;
        }
    }
    // The same reading twice: QoS 1 redelivery or a resend after a reconnect.
    publisher
        .publish(
            id,
            "sensors/humidity",
            reading_json("bme-1", 999.0, &ts(4000)),
        )
        .await;
    id += 1;
    publisher.wait_acked(id).await;
    app.wait_for_count(15).await;
    let duplicates = app
        .eventually("the redelivery counted", || async {
            let d = app.metric("sensorhub_readings_duplicate_total").await;
            (d > 0).then_some(d)
        })
        .await;
    assert_eq!(duplicates, 1);
    assert_eq!(app.count_readings().await, 15);

    // Newest first over all kinds; ties at one instant in a stable order, each with its kind.
    let body = app
        .eventually("bme-1 from Redis", || async {
            let body = app.get_from_redis("/latestten/bme-1").await?;
            body.as_array()
                .is_some_and(|a| a.len() == 10)
                .then_some(body)
        })
        .await;
    let rows = body.as_array().unwrap();
    let mut seen: Vec<(String, String)> = rows
        .iter()
        .map(|r| {
            (
                r["timestamp"].as_str().unwrap().to_owned(),
                r["kind"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(seen[0].0, ts(4000));
    seen.sort();
    let mut expected: Vec<(String, String)> = (0..5)
        .rev()
        .flat_map(|n| kinds.iter().map(move |k| (ts(n * 1000), (*k).to_owned())))
        .take(10)
        .collect();
    expected.sort();
    // The ten newest of fifteen: the last three instants whole, and one of the second.
    assert_eq!(
        seen.iter().filter(|(t, _)| *t == ts(4000)).count(),
        3,
        "{seen:?}"
    );
    assert_eq!(seen.len(), expected.len());
    let humidity_at_4000 = rows
        .iter()
        .find(|r| r["kind"] == "humidity" && r["timestamp"] == ts(4000).as_str())
        .unwrap();
    assert_eq!(humidity_at_4000["value"], 41.0, "the first stored wins");

    // One kind only.
    let (status, body) = app.get_json("/latestten/bme-1?kind=pressure").await;
    assert_eq!(status, 200);
    let rows = body.as_array().unwrap();
    assert_eq!(rows.len(), 5);
    assert!(rows.iter().all(|r| r["kind"] == "pressure"));
    assert_eq!(rows[0]["timestamp"], ts(4000).as_str());
    assert_eq!(rows[0]["value"], 42.0);
    let (status, body) = app.get_json("/latestten/bme-1?kind=co2").await;
    assert_eq!(status, 404, "{body}");
    // A kind no topic can carry has no readings either.
    let (status, body) = app.get_json("/latestten/bme-1?kind=a%2Fb").await;
    assert_eq!((status, body["error"].as_str()), (404, Some("not_found")));

    // The range keeps all three kinds, pages through them exactly once, and filters by kind.
    let range = |extra: &str| {
        format!(
            "/startoenddate?startDate={}&endDate={}&sensor_id=bme-1{extra}",
            ts(0),
            ts(4000)
        )
    };
    let mut url = range("&limit=4");
    let mut all = Vec::new();
    loop {
        let response = app.get(&url).await;
        assert_eq!(response.status(), 200);
        let next = response
            .headers()
            .get("link")
            .and_then(|v| v.to_str().ok())
            .map(|l| {
                l.trim_start_matches('<')
                    .split('>')
                    .next()
                    .unwrap()
                    .to_owned()
            });
        let page: Value = response.json().await.unwrap();
        all.extend(page.as_array().unwrap().iter().cloned());
        match next {
            Some(next) => url = next,
            None => break,
        }
    }
    assert_eq!(all.len(), 15);
    let mut keys: Vec<(String, String)> = all
        .iter()
        .map(|r| {
            (
                r["timestamp"].as_str().unwrap().into(),
                r["kind"].as_str().unwrap().into(),
            )
        })
        .collect();
    let in_order = keys.clone();
    keys.sort();
    assert_eq!(in_order, keys, "ascending by time, then kind");
    keys.dedup();
    assert_eq!(keys.len(), 15, "no reading twice across pages");
    let (_, body) = app.get_json(&range("&kind=humidity")).await;
    assert_eq!(body.as_array().unwrap().len(), 5);
    assert!(
        body.as_array()
            .unwrap()
            .iter()
            .all(|r| r["kind"] == "humidity")
    );
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
