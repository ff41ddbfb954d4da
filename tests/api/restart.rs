//! Restarting on a history: a Redis that kept its data is trusted, one that lost it (or that
//! the previous run knew to be stale) is rebuilt, and in both cases the latest ten are right.

use std::process::Command;

use serde_json::Value;

use crate::helpers::{Publisher, TestApp, reading_json, ts};

const SENSORS: usize = 30;
const PER_SENSOR: usize = 12;

/// Publishes `PER_SENSOR` readings to each of `SENSORS` sensors and waits until Redis serves them.
async fn fill(app: &TestApp) {
    let publisher = Publisher::connect(app.mqtt_port, "restart-fill").await;
    let mut id = 0;
    for n in 0..PER_SENSOR {
        for s in 0..SENSORS {
            let at = ts((n * 1000 + s) as i64);
            publisher
                .publish(
                    id,
                    "sensors/temperature",
                    reading_json(&format!("r{s}"), n as f64, &at),
                )
                .await;
            id += 1;
        }
    }
    publisher.wait_acked(id).await;
    app.wait_for_count((SENSORS * PER_SENSOR) as u64).await;
    for s in [0, SENSORS - 1] {
        app.eventually("served from Redis before the stop", || async {
            app.get_from_redis(&format!("/latestten/r{s}"))
                .await
                .map(drop)
        })
        .await;
    }
}

/// Every sensor's latest ten, from Redis, exactly as published.
async fn assert_latest_right(app: &TestApp) {
    for s in 0..SENSORS {
        let path = format!("/latestten/r{s}");
        let body: Value = app
            .eventually("served from Redis after the restart", || {
                app.get_from_redis(&path)
            })
            .await;
        let got: Vec<&str> = body
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["timestamp"].as_str().unwrap())
            .collect();
        let expected: Vec<String> = (PER_SENSOR - 10..PER_SENSOR)
            .rev()
            .map(|n| ts((n * 1000 + s) as i64))
            .collect();
        assert_eq!(got, expected, "sensor r{s}");
    }
}

fn redis_cli(app: &TestApp, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-u", &app.redis_url])
        .args(args)
        .output()
        .expect("redis-cli");
    assert!(out.status.success(), "redis-cli {args:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_with_redis_intact_rebuilds_nothing() {
    let mut app = TestApp::spawn().await;
    fill(&app).await;
    assert!(app.terminate().await, "SIGTERM did not end in exit 0");
    app.start().await;
    assert_latest_right(&app).await;
    assert_eq!(app.metric("sensorhub_cache_rebuilds_total").await, 0);
    assert!(
        app.logs().contains("rebuilding every latest set"),
        "the first start did rebuild (an empty Redis)"
    );
    assert_eq!(
        app.logs().matches("rebuilding every latest set").count(),
        1,
        "only the first start rebuilt"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_lost_our_keys_while_we_were_stopped_is_rebuilt() {
    let mut app = TestApp::spawn().await;
    fill(&app).await;
    assert!(app.terminate().await);
    let keys = redis_cli(
        &app,
        &["--scan", "--pattern", &format!("{{{}}}:*", app.prefix)],
    );
    let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
    assert!(keys.len() > SENSORS, "{keys:?}");
    let mut del = vec!["del"];
    del.extend(&keys);
    redis_cli(&app, &del);
    app.start().await;
    assert_latest_right(&app).await;
    assert!(app.metric("sensorhub_cache_rebuilds_total").await >= SENSORS as u64);
}

/// The rebuild reads where each sensor's newest readings are from its summary; a summary that is
/// behind, ahead, short of readings or missing moves where the search starts, never its answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_is_exact_whatever_the_summary_says() {
    let mut app = TestApp::spawn().await;
    fill(&app).await;
    assert!(app.terminate().await);
    let summary = app
        .mongo()
        .await
        .collection::<bson::Document>("sensor_readings.sensors");
    let at = |millis: i64| bson::DateTime::from_millis(1_767_225_600_000 + millis);
    let wrong = [
        // Behind, and counting fewer readings than the latest ten.
        ("r0", at(0), 3),
        // Ahead of every reading by a year, with more readings than it has.
        ("r1", at(366 * 86_400_000), 1000),
        // Behind by a day, the count right.
        ("r2", at(-86_400_000), PER_SENSOR as i64),
    ];
    for (id, last_seen, count) in wrong {
        let changed = summary
            .update_one(
                bson::doc! {"_id": id},
                bson::doc! {"$set": {"last_seen": last_seen, "count": count}},
            )
            .await
            .unwrap();
        assert_eq!(changed.matched_count, 1, "{id} has a summary");
    }
    // And none at all.
    summary.delete_one(bson::doc! {"_id": "r3"}).await.unwrap();
    let keys = redis_cli(
        &app,
        &["--scan", "--pattern", &format!("{{{}}}:*", app.prefix)],
    );
    let mut del = vec!["del"];
    del.extend(keys.lines().filter(|k| !k.is_empty()));
    redis_cli(&app, &del);
    app.start().await;
    assert_latest_right(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sets_known_stale_at_the_stop_are_not_trusted_after_it() {
    let mut app = TestApp::spawn().await;
    fill(&app).await;
    assert!(app.terminate().await);
    // What a run leaves when Redis failed it and it stopped before the repair: the sets may
    // miss readings MongoDB has. Make one visibly wrong, and record the run as stale.
    let key = format!("{{{}}}:latest:r0", app.prefix);
    redis_cli(&app, &["del", &key]);
    let state = app.journal_dir.join("cache-state");
    let text = std::fs::read_to_string(&state).expect("the run recorded Redis's state");
    let run_id = text.lines().next().unwrap().to_owned();
    assert!(text.contains("clean"), "{text}");
    std::fs::write(&state, format!("{run_id}\nstale\n")).unwrap();
    app.start().await;
    assert_latest_right(&app).await;
    assert!(app.metric("sensorhub_cache_rebuilds_total").await >= SENSORS as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_does_not_wait_for_a_rebuild_and_the_next_start_redoes_it() {
    const MANY: usize = 1500;
    let mut app = TestApp::spawn().await;
    let publisher = Publisher::connect(app.mqtt_port, "restart-many").await;
    for s in 0..MANY {
        let payload = reading_json(&format!("m{s:04}"), s as f64, &ts(s as i64));
        publisher.publish(s, "sensors/temperature", payload).await;
    }
    publisher.wait_acked(MANY).await;
    app.wait_for_count(MANY as u64).await;
    assert!(app.terminate().await);
    let keys = redis_cli(
        &app,
        &["--scan", "--pattern", &format!("{{{}}}:*", app.prefix)],
    );
    let mut del = vec!["del"];
    del.extend(keys.lines().filter(|k| !k.is_empty()));
    assert!(del.len() > MANY, "{} keys", del.len() - 1);
    redis_cli(&app, &del);

    // Stopped while it rebuilds 1,500 sets from MongoDB, one step of 1,000 at a time.
    const DONE: &str = "Redis latest sets rebuilt from MongoDB";
    let finished_before = app.logs().matches(DONE).count();
    app.start().await;
    assert!(app.terminate().await, "SIGTERM did not end in exit 0");
    assert_eq!(
        app.logs().matches(DONE).count(),
        finished_before,
        "the stop waited for the rebuild to finish:\n{}",
        app.logs()
    );

    // The marker is set only by a finished rebuild: the next start does it all again.
    app.start().await;
    for s in [0, MANY / 2, MANY - 1] {
        let path = format!("/latestten/m{s:04}");
        let body: Value = app
            .eventually("served from Redis after the rebuild", || {
                app.get_from_redis(&path)
            })
            .await;
        assert_eq!(body[0]["timestamp"], ts(s as i64), "{path}");
    }
    assert!(app.metric("sensorhub_cache_rebuilds_total").await >= MANY as u64);
}
