use crate::helpers::{Publisher, TestApp, reading_json, ts};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_payloads_are_counted_and_kept_while_good_ones_flow() {
    let app = TestApp::spawn().await;
    let publisher = Publisher::connect(app.mqtt_port, "mixed").await;
    let bad: Vec<(&str, Vec<u8>, &str)> = vec![
        ("sensors/temperature", b"not json".to_vec(), "invalid_json"),
        (
            "sensors/temperature",
            vec![0xff, 0xfe, 0x00],
            "invalid_utf8",
        ),
        (
            "sensors/temperature",
            br#"{"sensor_id":"x","value":1}"#.to_vec(),
            "missing_field",
        ),
        (
            "sensors/temperature",
            br#"{"sensor_id":"x","value":"warm","timestamp":"2026-01-01"}"#.to_vec(),
            "value_not_numeric",
        ),
        (
            "sensors/temperature",
            br#"{"sensor_id":"x","value":"NaN","timestamp":"2026-01-01"}"#.to_vec(),
            "value_not_finite",
        ),
        (
            "sensors/temperature",
            br#"{"sensor_id":"x","value":1,"timestamp":"noon"}"#.to_vec(),
            "timestamp_invalid",
        ),
        (
            "sensors/temperature",
            vec![b' '; 64 * 1024],
            "payload_too_large",
        ),
    ];
    let mut id = 0;
    for round in 0..10 {
        for (topic, payload, _) in &bad {
            publisher.publish(id, topic, payload.clone()).await;
            id += 1;
        }
        publisher
            .publish(
                id,
                "sensors/temperature",
                reading_json("good", round as f64, &ts(round)),
            )
            .await;
        id += 1;
    }
    publisher.wait_acked(id).await;
    app.wait_for_count(10).await;
    app.eventually("every dead letter counted", || async {
        let total: u64 = futures_sum(&app, &bad).await;
        (total == 70).then_some(())
    })
    .await;
    for (_, _, reason) in &bad {
        let metric = format!("sensorhub_dead_letters_total{{reason=\"{reason}\"}}");
        assert_eq!(app.metric(&metric).await, 10, "{reason}");
        let (status, body) = app
            .get_json(&format!("/deadletters?reason={reason}&limit=1000"))
            .await;
        assert_eq!(status, 200);
        let letters = body.as_array().unwrap();
        assert_eq!(letters.len(), 10, "{reason}: {body}");
        assert!(
            letters
                .iter()
                .all(|l| l["reason"] == *reason && !l["message"].as_str().unwrap().is_empty())
        );
    }
    let (_, body) = app
        .get_json("/deadletters?reason=payload_too_large&limit=1")
        .await;
    assert_eq!(body[0]["payload_bytes"], 64 * 1024);
    assert_eq!(
        body[0]["payload"].as_str().unwrap().len(),
        4096,
        "the head is kept"
    );
    let (status, body) = app.get_json("/deadletters?reason=bogus").await;
    assert_eq!(status, 400, "{body}");
    let (_, latest) = app.get_json("/latestten/good").await;
    assert_eq!(latest.as_array().unwrap().len(), 10);
}

async fn futures_sum(app: &TestApp, bad: &[(&str, Vec<u8>, &str)]) -> u64 {
    let mut total = 0;
    for (_, _, reason) in bad {
        total += app
            .metric(&format!(
                "sensorhub_dead_letters_total{{reason=\"{reason}\"}}"
            ))
            .await;
    }
    total
}

/// `sensors/#` matches the parent level `sensors` too: such a message is acknowledged, so it
/// must end as a dead letter, not vanish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_on_the_bare_sensors_topic_is_a_dead_letter() {
    let app = TestApp::spawn().await;
    let publisher = Publisher::connect(app.mqtt_port, "bare").await;
    publisher
        .publish(0, "sensors", reading_json("bare", 1.0, &ts(0)))
        .await;
    publisher
        .publish(1, "sensors/temperature", reading_json("bare", 2.0, &ts(1)))
        .await;
    publisher.wait_acked(2).await;
    app.wait_for_count(1).await;
    let body = app
        .eventually("the dead letter", || async {
            let (_, body) = app.get_json("/deadletters?reason=topic_invalid").await;
            (body.as_array().is_some_and(|a| a.len() == 1)).then_some(body)
        })
        .await;
    assert_eq!(body[0]["topic"], "sensors");
    assert!(
        body[0]["message"]
            .as_str()
            .unwrap()
            .contains("names no kind"),
        "{body}"
    );
    assert_eq!(app.count_readings().await, 1);
}
