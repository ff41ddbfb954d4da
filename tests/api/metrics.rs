//! `/metrics` against what MongoDB holds after a run, and the dead-letter budget under a
//! flood of malformed messages.

use std::collections::HashMap;

use futures_util::TryStreamExt as _;
use mongodb::bson::{Document, doc};

use crate::helpers::{AppOptions, Publisher, TestApp, reading_json, ts};

/// Every dead letter in MongoDB.
async fn dead_letters(app: &TestApp) -> Vec<Document> {
    app.mongo()
        .await
        .collection::<Document>("dead_letters")
        .find(doc! {})
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap()
}

/// Dead letters in MongoDB by reason.
async fn stored_dead_letters(app: &TestApp) -> HashMap<String, u64> {
    let mut by_reason = HashMap::new();
    for letter in dead_letters(app).await {
        *by_reason
            .entry(letter.get_str("reason").unwrap().to_owned())
            .or_default() += 1;
    }
    by_reason
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_counters_equal_what_mongodb_holds_after_a_run() {
    let app = TestApp::spawn().await;
    let publisher = Publisher::connect(app.mqtt_port, "metrics-run").await;
    assert_eq!(app.metric("sensorhub_mqtt_clients").await, 1);
    let mut id = 0;
    let mut send = async |topic: &str, payload: Vec<u8>| {
        publisher.publish(id, topic, payload).await;
        id += 1;
    };
    for i in 0..120 {
        let reading = reading_json(&format!("m{}", i % 6), f64::from(i), &ts(i64::from(i)));
        send("sensors/temperature", reading.clone().into_bytes()).await;
        // Every fourth reading again: the same sensor, kind and millisecond.
        if i % 4 == 0 {
            send("sensors/temperature", reading.into_bytes()).await;
        }
        if i % 10 == 0 {
            send("sensors/temperature", b"{not json".to_vec()).await;
            send(
                "sensors/humidity",
                br#"{"sensor_id":"m0","value":"dry","timestamp":"2026-01-01"}"#.to_vec(),
            )
            .await;
        }
    }
    send("sensors/", reading_json("m0", 1.0, &ts(0)).into_bytes()).await;
    let published = id;
    publisher.wait_acked(published).await;
    app.wait_for_count(120).await;
    app.eventually("every record finished", || async {
        (app.metric("sensorhub_journal_pending_records").await == 0
            && app
                .metric("sensorhub_dead_letters_total{reason=\"topic_invalid\"}")
                .await
                == 1)
            .then_some(())
    })
    .await;

    assert_eq!(
        app.metric("sensorhub_readings_stored_total").await,
        app.count_readings().await
    );
    assert_eq!(app.metric("sensorhub_readings_duplicate_total").await, 30);
    let stored = stored_dead_letters(&app).await;
    assert_eq!(
        stored,
        HashMap::from([
            ("invalid_json".to_owned(), 12),
            ("value_not_numeric".to_owned(), 12),
            ("topic_invalid".to_owned(), 1),
        ])
    );
    for (reason, count) in &stored {
        let name = format!("sensorhub_dead_letters_total{{reason=\"{reason}\"}}");
        assert_eq!(app.metric(&name).await, *count, "{reason}");
        let name = format!("sensorhub_dead_letters_dropped_total{{reason=\"{reason}\"}}");
        assert_eq!(app.metric(&name).await, 0, "{reason}");
    }
    // Every record passed through a batch once.
    assert_eq!(
        app.metric("sensorhub_ingest_batch_records_sum").await,
        published as u64
    );
    assert_eq!(
        app.metric("sensorhub_messages_captured_total").await,
        published as u64
    );
    assert!(
        app.metric("sensorhub_mongodb_write_duration_seconds_count{op=\"readings\"}")
            .await
            >= 1
    );
    assert!(
        app.metric("sensorhub_mongodb_write_duration_seconds_count{op=\"dead_letters\"}")
            .await
            >= 1
    );

    // HTTP by route template, never by raw path.
    for sensor in ["m1", "m2", "nobody"] {
        app.get(&format!("/latestten/{sensor}")).await;
    }
    app.get("/no/such/path").await;
    let text = app.get("/metrics").await.text().await.unwrap();
    let route = "route=\"/latestten/{sensor_id}\"";
    assert!(
        text.contains(&format!(
            "sensorhub_http_responses_total{{{route},class=\"2xx\",code=\"200\"}} 2\n"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "sensorhub_http_responses_total{{{route},class=\"4xx\",code=\"404\"}} 1\n"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "sensorhub_http_request_duration_seconds_count{{{route}}} 3\n"
        )),
        "{text}"
    );
    assert!(
        text.contains(
            "sensorhub_http_responses_total{route=\"unmatched\",class=\"4xx\",code=\"404\"} 1\n"
        ),
        "{text}"
    );
    assert!(!text.contains("m1"), "no raw path in a label");

    publisher.disconnect().await;
    app.eventually("the client gone from the gauge", || async {
        (app.metric("sensorhub_mqtt_clients").await == 0).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_malformed_messages_stores_at_most_the_budget_and_every_reading() {
    const BUDGET: u64 = 5;
    const BAD: u64 = 600;
    const GOOD: u64 = 150;
    let app = TestApp::spawn_with(AppOptions {
        args: vec!["--dead-letters-per-second".into(), BUDGET.to_string()],
        ..AppOptions::default()
    })
    .await;
    let flood = Publisher::connect(app.mqtt_port, "budget-flood").await;
    let good = Publisher::connect(app.mqtt_port, "budget-good").await;
    let bad_ones = async {
        for i in 0..BAD {
            flood
                .publish(i as usize, "sensors/temperature", b"{oops".to_vec())
                .await;
        }
        flood.wait_acked(BAD as usize).await;
    };
    let good_ones = async {
        for i in 0..GOOD {
            let payload = reading_json("steady", i as f64, &ts(i as i64 * 10));
            good.publish(i as usize, "sensors/temperature", payload)
                .await;
        }
        good.wait_acked(GOOD as usize).await;
    };
    tokio::join!(bad_ones, good_ones);

    app.wait_for_count(GOOD).await;
    let total = "sensorhub_dead_letters_total{reason=\"invalid_json\"}";
    app.eventually("every bad message judged", || async {
        (app.metric(total).await == BAD).then_some(())
    })
    .await;
    let dropped = app
        .metric("sensorhub_dead_letters_dropped_total{reason=\"invalid_json\"}")
        .await;
    let letters = dead_letters(&app).await;
    assert_eq!(letters.len() as u64 + dropped, BAD, "stored + dropped");
    assert!(dropped > 0, "a flood of {BAD} goes over {BUDGET} a second");
    // At most the budget in each second of arrival.
    let mut per_second: HashMap<i64, u64> = HashMap::new();
    for letter in &letters {
        let at = letter
            .get_datetime("received_at")
            .unwrap()
            .timestamp_millis();
        *per_second.entry(at.div_euclid(1000)).or_default() += 1;
    }
    assert!(
        per_second.values().all(|n| *n <= BUDGET),
        "more than {BUDGET} in a second: {per_second:?}"
    );
    assert_eq!(
        app.metric("sensorhub_readings_stored_total").await,
        GOOD,
        "no reading dropped"
    );
    flood.disconnect().await;
    good.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_of_the_whole_log_counts_nothing_twice() {
    let mut app = TestApp::spawn().await;
    let publisher = Publisher::connect(app.mqtt_port, "replay-count").await;
    for i in 0..20 {
        let reading = reading_json("replayed", f64::from(i), &ts(i64::from(i)));
        publisher
            .publish(2 * i as usize, "sensors/temperature", reading)
            .await;
        publisher
            .publish(2 * i as usize + 1, "sensors/temperature", b"[bad".to_vec())
            .await;
    }
    publisher.wait_acked(40).await;
    app.wait_for_count(20).await;
    let bad = "sensorhub_dead_letters_total{reason=\"invalid_json\"}";
    app.eventually("the dead letters stored", || async {
        (app.metric(bad).await == 20).then_some(())
    })
    .await;
    publisher.disconnect().await;

    // A crash that lost the checkpoint: the next start judges the whole log again.
    app.kill();
    let _ = std::fs::remove_file(app.journal_dir.join("checkpoint"));
    app.start().await;
    app.eventually("the replay judged", || async {
        (app.metric("sensorhub_readings_duplicate_total").await == 20).then_some(())
    })
    .await;
    app.eventually("the replay finished", || async {
        (app.metric("sensorhub_journal_pending_bytes").await == 0).then_some(())
    })
    .await;
    assert_eq!(app.metric("sensorhub_readings_stored_total").await, 0);
    assert_eq!(app.metric(bad).await, 0, "dead letters MongoDB held");
    assert_eq!(dead_letters(&app).await.len(), 20);
    assert_eq!(app.count_readings().await, 20);
}
