//! The page at `/` in a real browser (headless Chromium, driven over the DevTools protocol by
//! `tests/browser/page_check.py`): it renders, lists the sensors, and a reading published while
//! it is open appears on it.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use crate::helpers::{Publisher, TestApp, reading_json, unique};

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_page_lists_sensors_and_shows_a_reading_published_while_open() {
    let Some(chromium) = chromium() else {
        // Only when scripts/setup could not install it: say so where nobody can miss it.
        eprintln!(
            "\n*** SKIPPED the_live_page_lists_sensors_and_shows_a_reading_published_while_open: \
             no chromium (scripts/setup installs Debian's chromium; SENSORHUB_CHROMIUM names \
             another) ***\n"
        );
        return;
    };
    let app = TestApp::spawn().await;
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

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser/page_check.py");
    let mut browser = Command::new("python3")
        .arg(script)
        .arg(&chromium)
        .arg(app.url("/"))
        .args([
            "--expect",
            "oven-3",
            "cellar-1",
            "180.5",
            "71.25",
            "dead letters",
        ])
        .args(["--then", "4242.125"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 runs the browser driver");
    let stdout = browser.stdout.take().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut said = Vec::new();
    while let Some(line) = rx.recv().await {
        said.push(line.clone());
        if line == "READY" {
            break;
        }
    }
    assert_eq!(said.last().map(String::as_str), Some("READY"), "{said:?}");
    // Published only now that the page is open: it can reach the page only through /stream.
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
