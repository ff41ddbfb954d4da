//! The orchestrators' probes against real outages: a MongoDB that is stopped, one that is
//! frozen (SIGSTOP: connections stay open and nothing answers), a local log whose disk is full,
//! and a log that holds more than its threshold.

use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::external_broker::external_args;
use crate::helpers::{
    AppOptions, Publisher, TestApp, reading_json, start_mongo, start_mosquitto, ts, unique,
};

/// `/health/ready`: its status code and body.
async fn ready(app: &TestApp) -> (u16, Value) {
    app.get_json("/health/ready").await
}

/// Waits until `/health/ready` answers `code`, and returns that body.
async fn ready_becomes(app: &TestApp, code: u16) -> Value {
    app.eventually(&format!("/health/ready answering {code}"), || async {
        let (status, body) = ready(app).await;
        (status == code).then_some(body)
    })
    .await
}

fn component<'a>(body: &'a Value, name: &str) -> &'a str {
    body["components"][name]["status"]
        .as_str()
        .unwrap_or("absent")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_is_503_while_mongodb_is_stopped_or_the_log_over_its_threshold_and_200_after() {
    let mut mongo = start_mongo();
    let app = TestApp::spawn_with(AppOptions {
        mongodb_uri: Some(format!("mongodb://127.0.0.1:{}", mongo.port)),
        args: vec!["--ready-max-pending-bytes".into(), "2000".into()],
        ..AppOptions::default()
    })
    .await;
    let body = ready_becomes(&app, 200).await;
    assert_eq!(body["status"], "ready");
    for name in ["broker", "journal", "mongodb", "redis"] {
        assert_eq!(component(&body, name), "up", "{name}: {body}");
    }
    let (status, live) = app.get_json("/health/live").await;
    assert_eq!((status, live["status"].as_str()), (200, Some("alive")));

    mongo.stop();
    let body = ready_becomes(&app, 503).await;
    assert_eq!(body["status"], "not_ready");
    assert_eq!(component(&body, "mongodb"), "down", "{body}");
    assert!(body["components"]["mongodb"]["error"].is_string(), "{body}");
    assert_eq!(component(&body, "redis"), "up", "{body}");
    // Liveness does not depend on MongoDB: restarting would not bring it back.
    assert_eq!(app.get("/health/live").await.status(), 200);
    // The legacy summary stays 200.
    let (status, legacy) = app.get_json("/health").await;
    assert_eq!((status, legacy["mongodb"].as_str()), (200, Some("down")));

    // Readings wait in the log; beyond the threshold the log itself is not ready.
    let publisher = Publisher::connect(app.mqtt_port, "health-threshold").await;
    for i in 0..40 {
        let payload = reading_json("threshold", f64::from(i), &ts(i64::from(i) * 1000));
        publisher
            .publish(i as usize, "sensors/temperature", payload)
            .await;
    }
    publisher.wait_acked(40).await;
    let body = app
        .eventually("the log over its threshold", || async {
            let (_, body) = ready(&app).await;
            (component(&body, "journal") == "down").then_some(body)
        })
        .await;
    let error = body["components"]["journal"]["error"].as_str().unwrap();
    assert!(error.contains("threshold is 2000"), "{error}");

    mongo.resume();
    let body = ready_becomes(&app, 200).await;
    assert_eq!(component(&body, "journal"), "up", "drained: {body}");
    assert_eq!(app.count_readings().await, 40);
    publisher.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_mongodb_turns_readiness_503_within_the_timeout_while_probes_answer_at_once() {
    let mongo = start_mongo();
    let app = TestApp::spawn_with(AppOptions {
        mongodb_uri: Some(format!("mongodb://127.0.0.1:{}", mongo.port)),
        args: vec!["--ready-timeout-ms".into(), "3000".into()],
        ..AppOptions::default()
    })
    .await;
    ready_becomes(&app, 200).await;
    // Half the check's timeout: a probe that waited on the frozen server would take longer.
    let quick = reqwest::Client::builder()
        .timeout(Duration::from_millis(1500))
        .build()
        .unwrap();
    let probe = || async {
        let response = quick
            .get(app.url("/health/ready"))
            .send()
            .await
            .expect("/health/ready answered within half the check's timeout");
        let status = response.status().as_u16();
        (status, response.json::<Value>().await.unwrap())
    };

    mongo.freeze();
    let body = app
        .eventually("503 for the frozen MongoDB", || async {
            let (status, body) = probe().await;
            (status == 503).then_some(body)
        })
        .await;
    assert_eq!(component(&body, "mongodb"), "down", "{body}");
    assert_eq!(
        body["components"]["mongodb"]["error"], "no answer within 3000 ms",
        "a timeout, not a refused connection: {body}"
    );
    for _ in 0..5 {
        assert_eq!(probe().await.0, 503);
    }

    mongo.thaw();
    app.eventually("200 once MongoDB answers again", || async {
        (probe().await.0 == 200).then_some(())
    })
    .await;
}

/// A tmpfs of 1 MiB mounted on a directory, unmounted when dropped.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    /// `None` where a tmpfs cannot be mounted (not root, or a container without the right).
    fn mount(at: &std::path::Path) -> Option<Self> {
        std::fs::create_dir_all(at).unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        mounted.then(|| Self(at.to_owned()))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Needs root (a tmpfs mount); elsewhere it says so and checks nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_under_the_local_log_turns_readiness_503_and_freeing_it_200() {
    let mut app = TestApp::spawn().await;
    app.kill();
    let Some(_disk) = SmallDisk::mount(&app.journal_dir) else {
        eprintln!(
            "SKIPPED: cannot mount a tmpfs here (needs root); the full-disk case is untested"
        );
        return;
    };
    app.start().await;
    ready_becomes(&app, 200).await;

    // Fill the disk to the last byte.
    let filler = app.journal_dir.join("filler");
    let status = Command::new("dd")
        .args(["if=/dev/zero", "bs=4k"])
        .arg(format!("of={}", filler.display()))
        .status()
        .unwrap();
    assert!(!status.success(), "dd stops at a full disk");
    let body = ready_becomes(&app, 503).await;
    let error = body["components"]["journal"]["error"].as_str().unwrap();
    assert!(error.contains("No space left on device"), "{error}");
    assert_eq!(component(&body, "mongodb"), "up", "{body}");

    std::fs::remove_file(&filler).unwrap();
    ready_becomes(&app, 200).await;
    app.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_external_broker_readiness_follows_its_connection() {
    let mut mosquitto = start_mosquitto();
    let app = TestApp::spawn_with(AppOptions {
        args: external_args(mosquitto.port, "", &unique("ready-ext")),
        ..AppOptions::default()
    })
    .await;
    let body = ready_becomes(&app, 200).await;
    assert_eq!(
        body["components"]["broker"]["detail"],
        "subscribed to the external broker"
    );
    mosquitto.stop();
    let body = ready_becomes(&app, 503).await;
    assert_eq!(
        body["components"]["broker"]["error"], "not connected to the external broker",
        "{body}"
    );
    mosquitto.resume();
    ready_becomes(&app, 200).await;
}
