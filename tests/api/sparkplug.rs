//! Sparkplug B against the real embedded broker, with an independent implementation as the edge
//! node and as a late host application: tests/sparkplug/edge.py, whose payloads pysparkplug
//! encodes and decodes (installed by tests/sparkplug/install, which scripts/setup runs).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use bson::doc;
use futures_util::TryStreamExt;
use serde_json::Value;

use crate::helpers::TestApp;

/// The data's timestamps are T0 + i ms (edge.py).
const T0: i64 = 1_767_225_600_000;
const DEVICE: &str = "plant/edge1/plc";

/// The Python of the venv that has pysparkplug, installed on first use.
fn python() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/sparkplug");
    let out = Command::new("bash")
        .arg(root.join("install"))
        .output()
        .expect("cannot run tests/sparkplug/install");
    assert!(
        out.status.success(),
        "tests/sparkplug/install failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/sparkplug/edge.py")
}

fn edge_command(app: &TestApp, args: &[&str]) -> Command {
    let mut cmd = Command::new(python());
    cmd.arg(script())
        .args(["--port", &app.mqtt_port.to_string()])
        .args(args);
    cmd
}

/// Runs one scenario of edge.py to its end; its JSON report.
async fn edge(app: &TestApp, args: &[&str]) -> Value {
    let mut cmd = edge_command(app, args);
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .expect("cannot run edge.py");
    assert!(
        out.status.success(),
        "edge.py {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        app.logs()
    );
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("edge.py printed no report ({e}): {text}"))
}

/// The value edge.py sends for device metric `name` in data message `i`.
fn value(name: &str, i: i64) -> f64 {
    match name {
        "Line/Temp" => (-1000 + i % 2000) as f64,
        "Line/Pressure" => (-128 + i % 256) as f64,
        "Counter" => (-2_000_000_000 + i) as f64,
        "Level" => i as f64 / 4.0,
        _ => f64::from(u8::from(i % 2 == 0)),
    }
}

const METRICS: [(&str, &str); 5] = [
    ("Line/Temp", "Temp"),
    ("Line/Pressure", "Pressure"),
    ("Counter", "Counter"),
    ("Level", "Level"),
    ("Running", "Running"),
];

/// The stored readings of one device metric: (ms after T0, value), by time.
async fn series(app: &TestApp, metric: &str) -> Vec<(i64, f64)> {
    let docs: Vec<bson::Document> = app
        .readings()
        .await
        .find(doc! {"sensor_id": format!("{DEVICE}/{metric}")})
        .sort(doc! {"timestamp": 1})
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    docs.iter()
        .map(|d| {
            let at = d.get_datetime("timestamp").unwrap().timestamp_millis();
            (at - T0, d.get_f64("value").unwrap())
        })
        .collect()
}

/// Checks every stored reading of the device against what edge.py sent for message `i` (0 is
/// the DBIRTH), `range` being the messages expected.
async fn assert_device_readings(app: &TestApp, range: std::ops::RangeInclusive<i64>) {
    for (metric, kind) in METRICS {
        let got = series(app, metric).await;
        let expected: Vec<(i64, f64)> = range.clone().map(|i| (i, value(metric, i))).collect();
        assert_eq!(got.len(), expected.len(), "{metric}: readings stored");
        assert!(
            got == expected,
            "{metric}: values and timestamps differ from those sent"
        );
        let kinds: Vec<bson::Bson> = app
            .readings()
            .await
            .distinct("kind", doc! {"sensor_id": format!("{DEVICE}/{metric}")})
            .await
            .unwrap();
        assert_eq!(kinds, [bson::Bson::String(kind.into())], "{metric}");
    }
}

async fn dead_letters(app: &TestApp) -> Vec<bson::Document> {
    app.mongo()
        .await
        .collection::<bson::Document>("dead_letters")
        .find(doc! {})
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap()
}

async fn node(app: &TestApp) -> Value {
    let (status, body) = app.get_json("/sparkplug/nodes").await;
    assert_eq!(status, 200, "{body}");
    body["nodes"]
        .as_array()
        .and_then(|n| n.iter().find(|n| n["node"] == "plant/edge1"))
        .cloned()
        .unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn births_then_10000_aliased_data_messages_are_stored_once_with_names_types_and_times() {
    let app = TestApp::spawn().await;
    let report = edge(&app, &["bulk", "10000"]).await;
    assert_eq!(report["published"], 10_002);
    // The node's two metrics (bdSeq is the session's), and each device metric per message.
    let expected = 2 + 5 * 10_001;
    app.wait_for_count(expected).await;
    assert_device_readings(&app, 0..=10_000).await;
    let negative = series(&app, "Line/Pressure").await;
    assert!(
        negative.iter().any(|(_, v)| *v == -128.0),
        "Int8 sign-extended"
    );
    assert!(dead_letters(&app).await.is_empty());
    let node = node(&app).await;
    assert_eq!(node["online"], true, "{node}");
    assert_eq!(node["seq"], 10_001 % 256, "{node}");
    assert_eq!(node["devices"][0]["device_id"], "plc", "{node}");
    // Redis serves the latest ten of a device metric.
    let latest = app
        .eventually("the latest ten from Redis", || {
            app.get_from_redis("/latestten/plant%2Fedge1%2Fplc%2FLevel")
        })
        .await;
    assert_eq!(latest[0]["value"], 10_000.0 / 4.0, "{latest}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seq_gap_asks_for_exactly_one_rebirth_and_stores_nothing_under_a_wrong_name() {
    let app = TestApp::spawn().await;
    let report = edge(&app, &["gap"]).await;
    let commands = report["commands"].as_array().unwrap();
    assert_eq!(commands.len(), 1, "one rebirth request: {report}");
    assert_eq!(commands[0]["Node Control/Rebirth"], true, "{report}");
    // Before the gap: the birth and messages 1-10; after the rebirth: its birth (the same
    // readings as the first at T0) and messages 21-30. Messages 11-20 are dead letters.
    let expected_device: Vec<i64> = (0..=10).chain(21..=30).collect();
    app.wait_for_count(2 + 5 * expected_device.len() as u64)
        .await;
    for (metric, _) in METRICS {
        let got = series(&app, metric).await;
        let expected: Vec<(i64, f64)> = expected_device
            .iter()
            .map(|i| (*i, value(metric, *i)))
            .collect();
        assert!(got == expected, "{metric}: {got:?}");
    }
    let letters = app
        .eventually("the ten dead letters after the gap", || async {
            let letters = dead_letters(&app).await;
            (letters.len() >= 10).then_some(letters)
        })
        .await;
    assert_eq!(letters.len(), 10);
    assert!(
        letters
            .iter()
            .all(|d| d.get_str("reason").unwrap() == "sparkplug_seq_gap"),
        "{letters:?}"
    );
    let node = node(&app).await;
    assert_eq!(node["online"], true, "{node}");
    assert!(node.get("awaiting_rebirth").is_none(), "{node}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_between_birth_and_data_loses_nothing() {
    let mut app = TestApp::spawn().await;
    edge(&app, &["birth"]).await;
    app.wait_for_count(2 + 5).await;
    // The session is stored by the writer after the births' readings.
    app.eventually("the session stored", || async {
        (node(&app).await["online"] == true).then_some(())
    })
    .await;
    assert!(app.terminate().await, "SIGTERM did not end in exit 0");
    app.start().await;
    // The edge node goes on with its session: data of aliases only, no new birth.
    edge(&app, &["resume", "300"]).await;
    app.wait_for_count(2 + 5 * 301).await;
    assert_device_readings(&app, 0..=300).await;
    assert!(dead_letters(&app).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ndeath_with_a_stale_bdseq_is_ignored_and_the_current_one_takes_the_node_offline() {
    let app = TestApp::spawn().await;
    let mut child: Child = edge_command(&app, &["deaths"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("edge.py");
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert!(line.contains("stale death sent"), "edge.py said {line:?}");
    app.wait_for_count(2 + 5).await;
    // The stale NDEATH came after the births, in the same connection: once the births' session
    // is stored, so is whatever the NDEATH did to it.
    let before = app
        .eventually("the node stored", || async {
            let node = node(&app).await;
            (node["devices"][0]["online"] == true).then_some(node)
        })
        .await;
    assert_eq!(before["online"], true, "{before}");
    assert_eq!(before["bd_seq"], 5, "{before}");
    // The sensor summary trails the readings by up to half a second.
    let sensor = app
        .eventually("the sensor in the summary", || async {
            let (status, sensor) = app.get_json("/sensors/plant%2Fedge1%2Fplc%2FLevel").await;
            (status == 200).then_some(sensor)
        })
        .await;
    assert_eq!(sensor["online"], true, "{sensor}");
    child.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap();
    assert!(status.unwrap().success());
    app.eventually("the node offline", || async {
        (node(&app).await["online"] == false).then_some(())
    })
    .await;
    let (_, sensor) = app.get_json("/sensors/plant%2Fedge1%2Fplc%2FLevel").await;
    assert_eq!(sensor["online"], false, "{sensor}");
    let (_, sensors) = app.get_json("/sensors").await;
    let all = sensors["sensors"].as_array().unwrap();
    assert_eq!(all.len(), 7, "{sensors}");
    assert!(all.iter().all(|s| s["online"] == false), "{sensors}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_host_application_finds_the_births_under_sparkplug_certificates() {
    let app = TestApp::spawn().await;
    edge(&app, &["birth"]).await;
    let report = edge(&app, &["host"]).await;
    let births = &report["births"];
    let nbirth = &births["$sparkplug/certificates/spBv1.0/plant/NBIRTH/edge1"];
    let dbirth = &births["$sparkplug/certificates/spBv1.0/plant/DBIRTH/edge1/plc"];
    assert_eq!(nbirth["retain"], true, "{report}");
    assert_eq!(nbirth["metrics"]["Uptime"], 2, "{report}");
    assert_eq!(dbirth["retain"], true, "{report}");
    let aliases: HashMap<String, u64> =
        serde_json::from_value(dbirth["metrics"].clone()).unwrap_or_default();
    assert_eq!(aliases.get("Line/Temp"), Some(&10), "{report}");
    assert_eq!(aliases.len(), 5, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sparkplug_simulator_is_born_reports_is_reborn_on_request_and_dies_on_ctrl_c() {
    let app = TestApp::spawn().await;
    let mut simulator = Command::new(env!("CARGO_BIN_EXE_sensorhub"))
        .args(["simulate", "--sparkplug", "--sparkplug-node", "sim"])
        .args(["--mqtt", &format!("127.0.0.1:{}", app.mqtt_port)])
        .args(["--sensors", "2", "--interval-ms", "50"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let sim_node = || async {
        let (_, body) = app.get_json("/sparkplug/nodes").await;
        body["nodes"]
            .as_array()
            .and_then(|n| n.iter().find(|n| n["node"] == "sensorhub/sim").cloned())
    };
    let born = app
        .eventually("the simulated node online with its devices", || async {
            sim_node()
                .await
                .filter(|n| n["online"] == true && n["devices"][1]["online"] == true)
        })
        .await;
    app.eventually("data by exception after the births", || async {
        let n = app
            .readings()
            .await
            .count_documents(doc! {"sensor_id": "sensorhub/sim/dev-002/Temperature"})
            .await
            .unwrap();
        (n > 1).then_some(())
    })
    .await;
    // A host asks for a rebirth: the node publishes its births again.
    let host = crate::helpers::Publisher::connect(app.mqtt_port, "host-app").await;
    host.publish(
        0,
        "spBv1.0/sensorhub/NCMD/sim",
        sensorhub::sparkplug::rebirth_request(1),
    )
    .await;
    host.wait_acked(1).await;
    app.eventually("a second birth", || async {
        sim_node()
            .await
            .filter(|n| n["last_birth"] != born["last_birth"] && n["online"] == true)
    })
    .await;
    Command::new("kill")
        .args(["-INT", &simulator.id().to_string()])
        .status()
        .unwrap();
    let status = tokio::task::spawn_blocking(move || simulator.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "simulator exited with {status}");
    app.eventually("the node offline after its NDEATH", || async {
        sim_node().await.filter(|n| n["online"] == false)
    })
    .await;
    assert!(
        dead_letters(&app).await.is_empty(),
        "{:?}",
        dead_letters(&app).await
    );
}
