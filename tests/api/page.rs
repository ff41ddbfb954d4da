//! The page at `/` in a real browser (headless Chromium, driven over the DevTools protocol by
//! `tests/browser/page_check.py`): it renders, lists the sensors, and a reading published while
//! it is open appears on it, with and without API keys. And the OpenAPI UI at `/docs` shows the
//! document's text as written.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use crate::helpers::{AppOptions, Publisher, TestApp, reading_json, unique};
fn chromium() -> Option<String> {
    if let Ok(path) = std::env::var("SENSORHUB_CHROMIUM") {
        return Some(path);
    }
    ["chromium", "chromium-browser"]
        .into_iter()
        .find_map(|name| {
            let found = Command::new("which").arg(name).output().ok()?;
            found
                .status
                .success()
                .then(|| String::from_utf8_lossy(&found.stdout).trim().to_owned())
        })
}

fn no_chromium(test: &str) {
    // Only when scripts/setup could not install it: say so where nobody can miss it.
    eprintln!(
        "\n*** SKIPPED {test}: no chromium (scripts/setup installs Debian's chromium; \
         SENSORHUB_CHROMIUM names another) ***\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_page_lists_sensors_and_shows_a_reading_published_while_open() {
    let Some(chromium) = chromium() else {
        return no_chromium("the_live_page_lists_sensors_and_shows_a_reading_published_while_open");
    };
    let app = TestApp::spawn().await;
    live_page_shows_readings(&app, &chromium, "/").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_page_works_with_api_keys_given_a_read_key_in_the_fragment() {
    let Some(chromium) = chromium() else {
        return no_chromium("the_live_page_works_with_api_keys_given_a_read_key_in_the_fragment");
    };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys.toml");
    let mut keys = sensorhub::auth::KeyFile::default();
    let key = keys.issue("page", sensorhub::auth::Role::Read).unwrap();
    keys.save(&file).unwrap();
    let app = TestApp::spawn_with(AppOptions {
        args: vec!["--api-keys".into(), file.display().to_string()],
        ..AppOptions::default()
    })
    .await;
    assert_eq!(app.get("/sensors").await.status(), 401, "keys are on");
    live_page_shows_readings(&app, &chromium, &format!("/#key={key}")).await;
}

/// Opens `path`, waits for the sensors published before, then publishes one more reading that
/// can reach the page only through `/stream`.
async fn live_page_shows_readings(app: &TestApp, chromium: &str, path: &str) {
    let publisher = Publisher::connect(app.mqtt_port, &unique("page")).await;
    let now = sensorhub::domain::Timestamp::now();
    publisher
        .publish(
            0,
            "sensors/temperature",
            reading_json("oven-3", 180.5, &now.to_string()),
        )
        .await;
    publisher
        .publish(
            1,
            "sensors/humidity",
            reading_json("cellar-1", 71.25, &now.to_string()),
        )
        .await;
    publisher.wait_acked(2).await;
    app.wait_for_count(2).await;

    let (mut browser, mut rx) = open(
        chromium,
        &app.url(path),
        &["oven-3", "cellar-1", "180.5", "71.25", "dead letters"],
        Some("4242.125"),
    );
    let mut said = Vec::new();
    while let Some(line) = rx.recv().await {
        said.push(line.clone());
        if line == "READY" {
            break;
        }
    }
    assert_eq!(said.last().map(String::as_str), Some("READY"), "{said:?}");
    let later = now.saturating_add_millis(1000);
    publisher
        .publish(
            2,
            "sensors/temperature",
            reading_json("oven-3", 4242.125, &later.to_string()),
        )
        .await;
    publisher.wait_acked(3).await;
    while let Some(line) = rx.recv().await {
        said.push(line);
    }
    let status = browser.wait().unwrap();
    assert!(
        status.success(),
        "the page did not show it: {said:?}\n{}",
        app.logs()
    );
    assert_eq!(said.last().map(String::as_str), Some("SEEN"), "{said:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_docs_page_shows_the_topic_placeholder_as_written() {
    let Some(chromium) = chromium() else {
        return no_chromium("the_docs_page_shows_the_topic_placeholder_as_written");
    };
    let app = TestApp::spawn().await;
    // Swagger UI renders the description as Markdown: unescaped, `<kind>` was a tag and vanished.
    let (mut browser, mut rx) = open(&chromium, &app.url("/docs"), &["to sensors/<kind> ("], None);
    let mut said = Vec::new();
    while let Some(line) = rx.recv().await {
        said.push(line);
    }
    assert!(browser.wait().unwrap().success(), "{said:?}");
}

/// Starts the browser driver on `url`; its lines arrive on the receiver.
fn open(
    chromium: &str,
    url: &str,
    expect: &[&str],
    then: Option<&str>,
) -> (
    std::process::Child,
    tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser/page_check.py");
    let mut command = Command::new("python3");
    command
        .arg(script)
        .arg(chromium)
        .arg(url)
        .arg("--expect")
        .args(expect);
    if let Some(then) = then {
        command.args(["--then", then]);
    }
    let mut browser = command
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 runs the browser driver");
    let stdout = browser.stdout.take().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    (browser, rx)
}
