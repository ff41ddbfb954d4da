//! External broker mode against Debian's Mosquitto: two sensorhub instances share one stream
//! through `$share/<group>/sensors/#` and store it exactly once between them, also when one is
//! killed mid-stream; one instance on a plain persistent subscription loses nothing the broker
//! acknowledged when the broker restarts.

use std::time::Duration;

use crate::faults::{Shared, assert_exactly_stored, join, plan, spawn_feeds, wait_acked};
use crate::helpers::{
    AppOptions, Publisher, TestApp, free_port, reading_json, start_mosquitto, start_mosquitto_with,
    ts, unique,
};
use crate::tls::Ca;

const READINGS: usize = 20_000;

pub fn external_args(broker_port: u16, group: &str, client_id: &str) -> Vec<String> {
    [
        "--external-broker",
        &format!("mqtt://127.0.0.1:{broker_port}"),
        "--share-group",
        group,
        "--external-client-id",
        client_id,
    ]
    .map(str::to_owned)
    .to_vec()
}

async fn wait_subscribed(app: &TestApp) {
    app.eventually("connected to the broker", || async {
        app.logs()
            .contains("connected to the external MQTT broker")
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_split_a_shared_subscription_and_survive_a_kill() {
    let mosquitto = start_mosquitto();
    let group = unique("g");
    let mut a = TestApp::spawn_with(AppOptions {
        args: external_args(mosquitto.port, &group, &unique("hub-a")),
        ..AppOptions::default()
    })
    .await;
    let b = TestApp::spawn_with(AppOptions {
        args: external_args(mosquitto.port, &group, &unique("hub-b")),
        share_store_with: Some((a.database.clone(), a.prefix.clone())),
        ..AppOptions::default()
    })
    .await;
    wait_subscribed(&a).await;
    wait_subscribed(&b).await;
    // The SUBACK follows the CONNACK the log reports.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let readings = plan("ext", READINGS, 200);
    let tally = Shared::default();
    let feeds = spawn_feeds(mosquitto.port, "ext-pub", &readings, 4, 2_000, &tally);
    wait_acked(&a, &tally, READINGS / 3).await;
    // What the broker had sent a and a had not acknowledged stays in a's session, for a.
    a.kill();
    tokio::time::sleep(Duration::from_secs(1)).await;
    a.start().await;

    join(feeds).await;
    let acked = tally.lock().unwrap().acked.clone();
    assert_exactly_stored(&a, &readings, &acked).await;
    let (stored_a, stored_b) = (
        a.metric("sensorhub_readings_stored_total").await,
        b.metric("sensorhub_readings_stored_total").await,
    );
    eprintln!(
        "shared subscription: {READINGS} documents from 2 instances; stored by b: {stored_b}, by \
         a since its restart: {stored_a}, sensorhub_readings_duplicate_total of a after the \
         restart: {}",
        a.metric("sensorhub_readings_duplicate_total").await
    );
    assert!(stored_a > 0, "a did part of the work after its restart");
    assert!(
        stored_b > 0 && (stored_b as usize) < READINGS,
        "b did part of the work, not all of it: {stored_b}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_mid_stream_loses_nothing_it_acknowledged() {
    let mut mosquitto = start_mosquitto();
    let app = TestApp::spawn_with(AppOptions {
        args: external_args(mosquitto.port, "", &unique("hub")),
        ..AppOptions::default()
    })
    .await;
    wait_subscribed(&app).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let readings = plan("extr", READINGS / 2, 100);
    let tally = Shared::default();
    let feeds = spawn_feeds(mosquitto.port, "extr-pub", &readings, 4, 2_000, &tally);
    wait_acked(&app, &tally, READINGS / 6).await;
    // SIGTERM: Mosquitto saves its sessions and queued messages, and restores them.
    mosquitto.terminate();
    tokio::time::sleep(Duration::from_millis(500)).await;
    mosquitto.resume();

    join(feeds).await;
    let acked = tally.lock().unwrap().acked.clone();
    assert_exactly_stored(&app, &readings, &acked).await;
    let tally = tally.lock().unwrap().clone();
    eprintln!(
        "broker restart: {} documents; publishers resent {}, disconnects {}",
        readings.len(),
        tally.resent,
        tally.disconnects
    );
    assert!(tally.disconnects >= 4, "the restart cut the publishers off");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtts_with_a_ca_and_a_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test broker CA");
    let ca_file = ca.write(&dir.path().join("ca.pem"));
    let (server_cert, server_key) = ca.issue(dir.path(), "broker", "localhost", true);
    let (client_cert, client_key) = ca.issue(dir.path(), "hub", "sensorhub-hub", false);
    let tls_port = free_port();
    let mosquitto = start_mosquitto_with(&format!(
        "listener {tls_port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\n\
         require_certificate true\n",
        ca_file.display(),
        server_cert.display(),
        server_key.display()
    ));
    for file in [&server_key, &client_key] {
        // Mosquitto drops to its own user before it reads the key.
        std::fs::set_permissions(file, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .unwrap();
    }
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let mut args = vec![
        "--external-broker".to_owned(),
        format!("mqtts://localhost:{tls_port}"),
        "--share-group".into(),
        unique("g"),
        "--external-client-id".into(),
        unique("hub-tls"),
        "--external-ca".into(),
        ca_file.display().to_string(),
    ];
    // Without the client certificate the broker refuses the handshake: nothing connects.
    let refused = TestApp::spawn_with(AppOptions {
        args: args.clone(),
        ..AppOptions::default()
    })
    .await;
    args.extend([
        "--external-cert".into(),
        client_cert.display().to_string(),
        "--external-key".into(),
        client_key.display().to_string(),
    ]);
    let app = TestApp::spawn_with(AppOptions {
        args,
        ..AppOptions::default()
    })
    .await;
    wait_subscribed(&app).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let publisher = Publisher::connect(mosquitto.port, "tls-dev").await;
    for n in 0..50 {
        publisher
            .publish(
                n,
                "sensors/temperature",
                reading_json("tls-1", n as f64, &ts(n as i64)),
            )
            .await;
    }
    publisher.wait_acked(50).await;
    app.wait_for_count(50).await;
    assert!(
        !refused
            .logs()
            .contains("connected to the external MQTT broker"),
        "a client without a certificate got in"
    );
}
