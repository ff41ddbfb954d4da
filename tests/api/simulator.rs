use std::process::{Command, Stdio};

use crate::helpers::{TestApp, shared};

async fn wait_for_sensors(app: &TestApp, sensors: &[&str]) {
    for sensor in sensors {
        let body = app
            .eventually(&format!("simulated {sensor}"), || async {
                let (status, body) = app.get_json(&format!("/latestten/{sensor}")).await;
                (status == 200 && body.as_array().is_some_and(|a| a.len() >= 3)).then_some(body)
            })
            .await;
        for reading in body.as_array().unwrap() {
            let value = reading["value"].as_f64().unwrap();
            match reading["kind"].as_str().unwrap() {
                "temperature" => assert!((-40.0..=85.0).contains(&value), "{reading}"),
                "humidity" => assert!((0.0..=100.0).contains(&value), "{reading}"),
                other => panic!("unexpected kind {other}"),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulate_command_feeds_readings_until_interrupted() {
    let app = TestApp::spawn().await;
    let mut simulator = Command::new(env!("CARGO_BIN_EXE_sensorhub"))
        .args([
            "simulate",
            "--mqtt",
            &format!("127.0.0.1:{}", app.mqtt_port),
        ])
        .args(["--sensors", "3", "--interval-ms", "100"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_sensors(&app, &["temp-001", "temp-003", "hum-001", "hum-003"]).await;
    Command::new("kill")
        .args(["-INT", &simulator.id().to_string()])
        .status()
        .unwrap();
    let status = simulator.wait().unwrap();
    assert!(status.success(), "simulator exited with {status}");
    assert_eq!(
        app.metric("sensorhub_dead_letters_total{reason=\"invalid_json\"}")
            .await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_simulate_feeds_itself() {
    let _ = shared();
    let app = TestApp::spawn_with(crate::helpers::AppOptions {
        args: vec![
            "--simulate".into(),
            "--simulate-sensors".into(),
            "2".into(),
            "--simulate-interval-ms".into(),
            "100".into(),
        ],
        ..Default::default()
    })
    .await;
    wait_for_sensors(&app, &["temp-002", "hum-002"]).await;
}
