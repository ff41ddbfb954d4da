use std::collections::HashSet;

use serde_json::Value;

use crate::helpers::{Publisher, TestApp, reading_json, ts};

async fn app_with_readings(readings: &[(&str, i64)]) -> TestApp {
    let app = TestApp::spawn().await;
    let publisher = Publisher::connect(app.mqtt_port, "range").await;
    for (i, (sensor, at)) in readings.iter().enumerate() {
        publisher
            .publish(
                i,
                "sensors/temperature",
                reading_json(sensor, i as f64, &ts(*at)),
            )
            .await;
    }
    publisher.wait_acked(readings.len()).await;
    app.wait_for_count(readings.len() as u64).await;
    app
}

fn encode(s: &str) -> String {
    s.replace(':', "%3A").replace('+', "%2B")
}

async fn range(app: &TestApp, start: &str, end: &str) -> (u16, Value) {
    app.get_json(&format!(
        "/startoenddate?startDate={}&endDate={}",
        encode(start),
        encode(end)
    ))
    .await
}

fn sensor_times(body: &Value) -> Vec<(String, String)> {
    body.as_array()
        .unwrap_or_else(|| panic!("not an array: {body}"))
        .iter()
        .map(|r| {
            (
                r["sensor_id"].as_str().unwrap().to_owned(),
                r["timestamp"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_are_inclusive_ascending_and_agree_across_date_forms() {
    let app =
        app_with_readings(&[("a", 0), ("b", 1000), ("a", 2000), ("b", 2000), ("a", 3000)]).await;

    let (status, body) = range(&app, &ts(1000), &ts(2000)).await;
    assert_eq!(status, 200);
    assert_eq!(
        sensor_times(&body),
        vec![
            ("b".into(), ts(1000)),
            ("a".into(), ts(2000)),
            ("b".into(), ts(2000))
        ]
    );
    // One millisecond inside each bound excludes the readings on it.
    let (_, body) = range(&app, "2026-01-01T00:00:01.001Z", "2026-01-01T00:00:01.999Z").await;
    assert_eq!(body, serde_json::json!([]));

    // The same instants written as naive ISO 8601 (read as UTC) and with an offset.
    let (_, naive) = range(&app, "2026-01-01T00:00:01", "2026-01-01T00:00:02.000000").await;
    let (_, offset) = range(
        &app,
        "2026-01-01T01:00:01+01:00",
        "2025-12-31T19:00:02-05:00",
    )
    .await;
    assert_eq!(naive, body_of(&app, 1000, 2000).await);
    assert_eq!(offset, naive);
    assert_eq!(sensor_times(&naive).len(), 3);

    let (_, only_a) = app
        .get_json(&format!(
            "/startoenddate?startDate={}&endDate={}&sensor_id=a",
            encode(&ts(0)),
            encode(&ts(3000))
        ))
        .await;
    assert_eq!(
        sensor_times(&only_a),
        vec![
            ("a".into(), ts(0)),
            ("a".into(), ts(2000)),
            ("a".into(), ts(3000))
        ]
    );
}

async fn body_of(app: &TestApp, from: i64, to: i64) -> Value {
    range(app, &ts(from), &ts(to)).await.1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_ranges_are_400s_that_name_the_parameter() {
    let app = TestApp::spawn().await;
    let cases = [
        (
            "/startoenddate?startDate=yesterday&endDate=2026-01-01T00:00:00Z",
            "startDate",
        ),
        (
            "/startoenddate?startDate=2026-01-01T00:00:00Z&endDate=2026-13-01",
            "endDate",
        ),
        ("/startoenddate?endDate=2026-01-01T00:00:00Z", "startDate"),
        ("/startoenddate?startDate=2026-01-01T00:00:00Z", "endDate"),
        (
            "/startoenddate?startDate=2026-01-01&endDate=2026-01-02&limit=0",
            "limit",
        ),
        (
            "/startoenddate?startDate=2026-01-01&endDate=2026-01-02&limit=ten",
            "limit",
        ),
        (
            "/startoenddate?startDate=2026-01-01&endDate=2026-01-02&cursor=zzz",
            "cursor",
        ),
    ];
    for (path, names) in cases {
        let (status, body) = app.get_json(path).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(body["error"], "bad_request", "{path}");
        let message = body["message"].as_str().unwrap();
        assert!(
            message.contains(names),
            "{path}: '{message}' does not name {names}"
        );
    }
    // What the OpenAPI document allows is answered, not refused: an end before the start and a
    // sensor id no device can have are ranges without readings.
    for path in [
        "/startoenddate?startDate=2026-01-02T00:00:00Z&endDate=2026-01-01T00:00:00Z",
        "/startoenddate?startDate=2026-01-01&endDate=2026-01-02&sensor_id=%07",
    ] {
        let (status, body) = app.get_json(path).await;
        assert_eq!((status, body), (200, serde_json::json!([])), "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_chain_through_the_link_header_without_gaps_or_repeats() {
    // 25 readings, several sharing a millisecond across sensors.
    let readings: Vec<(String, i64)> = (0..25)
        .map(|i| (format!("p{}", i % 3), (i / 2) * 100))
        .collect();
    let refs: Vec<(&str, i64)> = readings.iter().map(|(s, t)| (s.as_str(), *t)).collect();
    let app = app_with_readings(&refs).await;

    let mut url = format!(
        "/startoenddate?startDate={}&endDate={}&limit=4",
        encode(&ts(0)),
        encode(&ts(10_000))
    );
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let response = app.get(&url).await;
        assert_eq!(response.status(), 200);
        let link = response
            .headers()
            .get("link")
            .map(|v| v.to_str().unwrap().to_owned());
        let body: Value = response.json().await.unwrap();
        seen.extend(sensor_times(&body));
        pages += 1;
        match link {
            Some(link) => {
                assert!(link.ends_with("; rel=\"next\""), "{link}");
                url = link
                    .trim_start_matches('<')
                    .split('>')
                    .next()
                    .unwrap()
                    .to_owned();
            }
            None => break,
        }
        assert!(pages < 20, "paging does not end");
    }
    assert_eq!(pages, 7);
    assert_eq!(seen.len(), 25);
    assert_eq!(
        seen.iter().collect::<HashSet<_>>().len(),
        25,
        "a reading repeated"
    );
    let mut sorted = seen.clone();
    sorted.sort_by(|a, b| (&a.1, &a.0).cmp(&(&b.1, &b.0)));
    assert_eq!(seen, sorted, "pages are not in (timestamp, sensor) order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_reading_shows_in_a_range_read_before_it_arrived() {
    // Answers may be kept for a minute: only exact invalidation can make the late reading show.
    let app = TestApp::spawn_with(crate::helpers::AppOptions {
        args: vec!["--read-cache-ms".into(), "60000".into()],
        ..Default::default()
    })
    .await;
    let publisher = Publisher::connect(app.mqtt_port, "late").await;
    publisher
        .publish(
            0,
            "sensors/temperature",
            reading_json("late", 1.0, &ts(1000)),
        )
        .await;
    publisher.wait_acked(1).await;
    app.wait_for_count(1).await;
    let (_, before) = range(&app, &ts(0), &ts(5000)).await;
    assert_eq!(sensor_times(&before).len(), 1);
    let (_, again) = range(&app, &ts(0), &ts(5000)).await;
    assert_eq!(again, before, "a repeated query gets the same page");

    // A reading outside the range leaves the page as it was; one inside it shows at once.
    publisher
        .publish(
            1,
            "sensors/temperature",
            reading_json("late", 2.0, &ts(9000)),
        )
        .await;
    publisher
        .publish(
            2,
            "sensors/temperature",
            reading_json("late", 3.0, &ts(2000)),
        )
        .await;
    publisher.wait_acked(3).await;
    app.wait_for_count(3).await;
    app.eventually("the stored mark to pass the late reading", || async {
        (app.metric("sensorhub_readings_stored_total").await == 3).then_some(())
    })
    .await;
    let (_, after) = range(&app, &ts(0), &ts(5000)).await;
    assert_eq!(
        sensor_times(&after),
        vec![("late".into(), ts(1000)), ("late".into(), ts(2000))]
    );
}
