//! Topic templates over the real broker: readings on `plant/<site>/<line>/<sensor>/<kind>`
//! stored with the fields and tags the template names, queryable through `/readings`; the
//! credential's grant checked against the sensor id the template yields; external broker mode
//! subscribed to the templates' topics; bad templates refused at start, naming the key.

use std::process::Command;
use std::time::Duration;

use bson::doc;
use serde_json::{Value, json};
use tokio::net::TcpStream;

use crate::helpers::{AppOptions, Publisher, TestApp, start_mosquitto, ts, unique};
use crate::raw_mqtt::{V, connack_code, puback_code};
use crate::security::passwd;

const PLANT: &str = "plant/+site/+line/+sensor_id/+kind";
const LAB: &str = "lab/+room/+sensor_id";

fn template_args() -> Vec<String> {
    ["--topic-template", PLANT, "--topic-template", LAB]
        .map(str::to_owned)
        .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_templated_topic_is_stored_with_its_fields_and_tags() {
    let app = TestApp::spawn_with(AppOptions {
        args: template_args(),
        ..AppOptions::default()
    })
    .await;
    let publisher = Publisher::connect(app.mqtt_port, "plant-gw").await;
    let value = |v: f64, at: i64| json!({"value": v, "timestamp": ts(at)}).to_string();
    publisher
        .publish(0, "plant/berlin/l2/press-4/temperature", value(21.5, 1_000))
        .await;
    // A batch on a templated topic: the topic gives every element's identity.
    let batch = json!([
        {"value": 22.0, "timestamp": ts(2_000)},
        {"value": 22.5, "timestamp": ts(3_000), "sensor_id": "press-4"}
    ]);
    publisher
        .publish(1, "plant/berlin/l2/press-4/temperature", batch.to_string())
        .await;
    // Without +kind, the values form.
    let values = json!({"timestamp": ts(1_000), "values": {"temperature": 19.0, "humidity": 40}});
    publisher
        .publish(2, "lab/r1/probe-1", values.to_string())
        .await;
    // A payload sensor id that contradicts the topic's: a dead letter, nothing stored.
    let conflict = json!({"sensor_id": "press-5", "value": 1, "timestamp": ts(4_000)});
    publisher
        .publish(
            3,
            "plant/berlin/l2/press-4/temperature",
            conflict.to_string(),
        )
        .await;
    // sensors/# works beside the templates, unchanged.
    let plain = json!({"sensor_id": "boiler-7", "value": 60, "timestamp": ts(1_000)});
    publisher
        .publish(4, "sensors/temperature", plain.to_string())
        .await;
    publisher.wait_acked(5).await;
    app.wait_for_count(6).await;

    let readings = app.readings().await;
    let stored = readings
        .find_one(doc! {"sensor_id": "press-4", "value": 21.5})
        .await
        .unwrap()
        .expect("the templated reading");
    assert_eq!(stored.get_str("kind").unwrap(), "temperature");
    let tags = stored.get_document("tags").unwrap();
    assert_eq!(tags, &doc! {"site": "berlin", "line": "l2"});
    let plain = readings
        .find_one(doc! {"sensor_id": "boiler-7"})
        .await
        .unwrap()
        .unwrap();
    assert!(!plain.contains_key("tags"), "{plain}");

    let (status, body) = app.get_json("/readings?sensor_id=press-4").await;
    assert_eq!(status, 200);
    let got: Vec<&Value> = body["readings"].as_array().unwrap().iter().collect();
    assert_eq!(got.len(), 3, "{body}");
    for r in &got {
        assert_eq!(r["kind"], "temperature");
        assert_eq!(r["tags"], json!({"site": "berlin", "line": "l2"}), "{r}");
    }
    let (_, lab) = app.get_json("/readings?sensor_id=probe-1").await;
    let lab = lab["readings"].as_array().unwrap();
    assert_eq!(lab.len(), 2);
    assert!(
        lab.iter().all(|r| r["tags"] == json!({"room": "r1"})),
        "{lab:?}"
    );
    // The latest ten come from Redis with their tags.
    let latest = app.get_from_redis("/latestten/press-4").await.unwrap();
    assert_eq!(latest[0]["value"], 22.5);
    assert_eq!(latest[0]["tags"]["site"], "berlin");

    let letters = app
        .eventually("the conflict dead-lettered", || async {
            let (_, body) = app.get_json("/deadletters?reason=sensor_id_conflict").await;
            body.as_array().filter(|l| l.len() == 1).cloned()
        })
        .await;
    assert!(
        letters[0]["message"].as_str().unwrap().contains("press-5"),
        "{}",
        letters[0]["message"]
    );
}

#[tokio::test]
async fn the_grant_is_checked_against_the_sensor_id_the_template_yields() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mqtt.toml");
    passwd(&file, "line3", Some("pw-line3"), &["--allow", "p3-*"]);
    let mut args = vec!["--mqtt-auth".to_owned(), file.display().to_string()];
    args.extend(template_args());
    let app = TestApp::spawn_with(AppOptions {
        args,
        ..AppOptions::default()
    })
    .await;
    let mut s = TcpStream::connect(("127.0.0.1", app.mqtt5_port))
        .await
        .unwrap();
    assert_eq!(
        connack_code(&mut s, V::V5, "line3-gw", Some(("line3", "pw-line3"))).await,
        0
    );
    let payload = json!({"value": 1, "timestamp": ts(1_000)}).to_string();
    assert_eq!(
        puback_code(
            &mut s,
            V::V5,
            "plant/berlin/l3/p4-press/temperature",
            1,
            &payload
        )
        .await,
        0x87,
        "another line's sensor"
    );
    // The payload cannot talk its way past the topic's sensor id either.
    let claims_mine = json!({"sensor_id": "p3-press", "value": 1, "timestamp": ts(1_000)});
    assert_eq!(
        puback_code(
            &mut s,
            V::V5,
            "plant/berlin/l3/p4-press/temperature",
            2,
            &claims_mine.to_string()
        )
        .await,
        0x87
    );
    assert_eq!(
        puback_code(
            &mut s,
            V::V5,
            "plant/berlin/l3/p3-press/temperature",
            3,
            &payload
        )
        .await,
        0
    );
    app.wait_for_count(1).await;
    let letters = app
        .eventually("two forbidden dead letters", || async {
            let (_, body) = app.get_json("/deadletters?reason=forbidden").await;
            body.as_array().filter(|l| l.len() == 2).cloned()
        })
        .await;
    assert_eq!(
        letters[0]["topic"],
        "$forbidden/plant/berlin/l3/p4-press/temperature"
    );
    let stored = app
        .readings()
        .await
        .count_documents(doc! {"sensor_id": "p4-press"})
        .await
        .unwrap();
    assert_eq!(stored, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_broker_mode_subscribes_to_the_templates_topics() {
    let mosquitto = start_mosquitto();
    let mut args = [
        "--external-broker",
        &format!("mqtt://127.0.0.1:{}", mosquitto.port),
        "--share-group",
        "",
        "--external-client-id",
        &unique("hub-tpl"),
    ]
    .map(str::to_owned)
    .to_vec();
    args.extend(template_args());
    let app = TestApp::spawn_with(AppOptions {
        args,
        ..AppOptions::default()
    })
    .await;
    app.eventually("connected to the broker", || async {
        app.logs()
            .contains("connected to the external MQTT broker")
            .then_some(())
    })
    .await;
    assert!(app.logs().contains("plant/+/+/+/+"), "{}", app.logs());
    // The SUBACK follows the CONNACK the log reports.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &mosquitto.port.to_string(),
            "-q",
            "1",
        ])
        .args(["-t", "plant/hamburg/l1/mixer-2/humidity", "-m"])
        .arg(json!({"value": 55.5, "timestamp": ts(1_000)}).to_string())
        .status()
        .unwrap();
    assert!(status.success());
    app.wait_for_count(1).await;
    let stored = app
        .readings()
        .await
        .find_one(doc! {})
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.get_str("sensor_id").unwrap(), "mixer-2");
    assert_eq!(stored.get_str("kind").unwrap(), "humidity");
    assert_eq!(
        stored.get_document("tags").unwrap(),
        &doc! {"site": "hamburg", "line": "l1"}
    );
}

/// `sensorhub config check` with `args`: (success, stdout, stderr).
fn config_check(args: &[&str]) -> (bool, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("empty.toml");
    std::fs::write(&file, "").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sensorhub"))
        .args(["config", "check", "--config"])
        .arg(&file)
        .args(args)
        .env_remove("SENSORHUB_TOPIC_TEMPLATES")
        .env_remove("SENSORHUB_CONFIG")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn config_check_shows_the_templates_and_refuses_bad_ones_naming_the_key() {
    let (ok, out, err) = config_check(&["--topic-template", PLANT, "--topic-template", LAB]);
    assert!(ok, "{err}");
    assert!(
        out.contains(&format!(r#"topic_templates = ["{PLANT}", "{LAB}"]"#)),
        "{out}"
    );
    for (template, says) in [
        ("plant/+site/+kind", "has no +sensor_id level"),
        ("sensors/+sensor_id", "starts with 'sensors'"),
        ("plant/#", "'#' is not allowed"),
    ] {
        let (ok, _, err) = config_check(&["--topic-template", template]);
        assert!(!ok, "{template} accepted");
        assert!(err.contains("topic_templates[0]"), "{err}");
        assert!(err.contains(says), "{template}: {err}");
    }
    let (ok, _, err) = config_check(&[
        "--topic-template",
        "plant/+site/+sensor_id",
        "--topic-template",
        "plant/berlin/+sensor_id",
    ]);
    assert!(!ok);
    assert!(err.contains("overlap"), "{err}");
    // The variable takes a comma-separated list.
    let out = Command::new(env!("CARGO_BIN_EXE_sensorhub"))
        .args(["config", "check", "--config", "/dev/null"])
        .env("SENSORHUB_TOPIC_TEMPLATES", format!("{PLANT},{LAB}"))
        .env_remove("SENSORHUB_CONFIG")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(LAB), "{stdout}");
}
