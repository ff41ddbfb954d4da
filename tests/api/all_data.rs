use std::time::Duration;

use bson::{DateTime, doc};
use futures_util::StreamExt;

use crate::helpers::TestApp;

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_data_streams_a_million_readings_in_flat_memory() {
    const READINGS: i64 = 1_000_000;
    let app = TestApp::spawn().await;
    // Loaded straight into MongoDB: this test is about reading a large history back.
    let collection = app.readings().await;
    let base = 1_767_225_600_000_i64;
    for chunk in 0..(READINGS / 20_000) {
        let docs: Vec<_> = (chunk * 20_000..(chunk + 1) * 20_000)
            .map(|i| {
                let sensor = format!("bulk-{}", i % 1000);
                doc! {
                    "_id": format!("{sensor}|{}", base + i),
                    "sensor_id": sensor,
                    "kind": "temperature",
                    "value": i as f64,
                    "timestamp": DateTime::from_millis(base + i),
                }
            })
            .collect();
        collection.insert_many(docs).await.unwrap();
    }
    eprintln!("loaded {READINGS} readings");
    let pid = app.pid().unwrap();
    let before = rss_kib(pid);

    let started = std::time::Instant::now();
    // No overall timeout: a million readings take a while to stream.
    let client = reqwest::Client::new();
    let response = client.get(app.url("/allData")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let mut stream = response.bytes_stream();
    let (mut bytes, mut elements, mut peak) = (0usize, 0usize, before);
    let (mut first, mut tail) = (Vec::new(), Vec::new());
    let mut sampled = tokio::time::Instant::now();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.expect("stream cut short");
        if first.len() < 200 {
            first.extend_from_slice(&chunk[..chunk.len().min(200)]);
        }
        // Count element keys, including one split across two chunks.
        tail.extend_from_slice(&chunk);
        elements += tail.windows(12).filter(|w| w == b"\"sensor_id\":").count();
        tail.drain(..tail.len().saturating_sub(11));
        bytes += chunk.len();
        if sampled.elapsed() > Duration::from_millis(100) {
            peak = peak.max(rss_kib(pid));
            sampled = tokio::time::Instant::now();
        }
    }
    peak = peak.max(rss_kib(pid));
    eprintln!(
        "streamed {elements} readings, {} MiB in {:?}; RSS {before} KiB -> peak {peak} KiB",
        bytes >> 20,
        started.elapsed()
    );
    assert_eq!(elements, READINGS as usize);
    assert!(
        first.starts_with(b"[{\"sensor_id\":\"bulk-0\""),
        "{}",
        String::from_utf8_lossy(&first)
    );
    assert!(tail.ends_with(b"}]"), "{}", String::from_utf8_lossy(&tail));
    // ~100 MB of JSON went out; the process must not have held it.
    let growth_mib = peak.saturating_sub(before) / 1024;
    assert!(
        growth_mib < 64,
        "RSS grew by {growth_mib} MiB while streaming {} MiB ({before} KiB -> {peak} KiB)",
        bytes >> 20
    );
}
