//! A MongoDB URI that names a replica set: writes ask a majority of it (the test server
//! advertises a single-node replica set named `secantus`), and a setting overrides that.

use crate::helpers::{AppOptions, Publisher, TestApp, reading_json, shared, ts};

fn with_replica_set(uri: &str) -> String {
    let sep = if uri.contains('?') { '&' } else { '?' };
    let base = if uri.contains('?') || uri.ends_with('/') {
        uri.to_owned()
    } else {
        format!("{uri}/")
    };
    format!("{base}{sep}replicaSet=secantus")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_set_uri_stores_with_majority_writes() {
    if std::env::var("SENSORHUB_TEST_MONGOD").is_ok() {
        // A real mongod is not a replica set named `secantus`.
        return;
    }
    let app = TestApp::spawn_with(AppOptions {
        mongodb_uri: Some(with_replica_set(&shared().mongodb_uri)),
        ..AppOptions::default()
    })
    .await;
    let publisher = Publisher::connect(app.mqtt_port, "rs").await;
    for n in 0..20 {
        publisher
            .publish(
                n,
                "sensors/temperature",
                reading_json("rs-1", n as f64, &ts(n as i64)),
            )
            .await;
    }
    publisher.wait_acked(20).await;
    app.wait_for_count(20).await;
    let logs = app.logs();
    let line = logs
        .lines()
        .find(|l| l.contains("MongoDB write concern"))
        .expect("the write concern is logged at start");
    assert!(line.contains("replica_set=\"secantus\""), "{line}");
    assert!(line.contains("write_concern=majority"), "{line}");

    let explicit = TestApp::spawn_with(AppOptions {
        mongodb_uri: Some(with_replica_set(&shared().mongodb_uri)),
        args: vec!["--mongodb-write-concern".into(), "1".into()],
        ..AppOptions::default()
    })
    .await;
    let logs = explicit.logs();
    let line = logs
        .lines()
        .find(|l| l.contains("MongoDB write concern"))
        .unwrap();
    assert!(line.contains("write_concern=1"), "{line}");
}
