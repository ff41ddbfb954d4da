//! A damaged local log loses only what is damaged. Readings pile up in the log while MongoDB is
//! down; sensorhub is killed (SIGKILL); 64 random bytes in the middle of the segment file are
//! overwritten; after a restart, every reading outside the damage is stored.
//!
//! The log's reader resumes after damage at the next fragment whose keyed tag verifies (a
//! fragment forged inside a payload has none), so the damage costs exactly the records whose
//! bytes it changed. This test reads the segment itself to know which records those are, and
//! checks that exactly they are missing.

use std::collections::BTreeSet;
use std::os::unix::fs::FileExt as _;

use bson::doc;
use futures_util::TryStreamExt;
use serde_json::Value;

use crate::helpers::{AppOptions, PATIENCE, Publisher, TestApp, reading_json, start_mongo, ts};

const BLOCK: usize = 32 * 1024;
const HEADER: usize = 15;

/// A record as the segment holds it: its extent and the value of its reading (its number).
struct OnDisk {
    start: usize,
    end: usize,
    value: usize,
}

/// The records of an undamaged segment (block framing: `u32 crc | u64 tag | u16 len | u8 type |
/// data`, types FULL 1, FIRST 2, MIDDLE 3, LAST 4; body `u8 version | i64 ms | u32 payload
/// length | u16 topic length | topic | payload`).
fn records_on_disk(bytes: &[u8]) -> Vec<OnDisk> {
    let record = |start: usize, end: usize, body: &[u8]| {
        let topic_len = usize::from(u16::from_le_bytes([body[13], body[14]]));
        let payload: Value = serde_json::from_slice(&body[15 + topic_len..]).unwrap();
        OnDisk {
            start,
            end,
            value: payload["value"].as_f64().unwrap() as usize,
        }
    };
    let mut out = Vec::new();
    let mut pending: Option<(usize, Vec<u8>)> = None;
    let mut pos = 0;
    while pos + HEADER <= bytes.len() {
        let left = BLOCK - pos % BLOCK;
        if left < HEADER {
            pos += left;
            continue;
        }
        let len = usize::from(u16::from_le_bytes([bytes[pos + 12], bytes[pos + 13]]));
        let data = &bytes[pos + HEADER..pos + HEADER + len];
        let end = pos + HEADER + len;
        match bytes[pos + 14] {
            1 => out.push(record(pos, end, data)),
            2 => pending = Some((pos, data.to_vec())),
            3 => pending.as_mut().unwrap().1.extend_from_slice(data),
            4 => {
                let (start, mut body) = pending.take().unwrap();
                body.extend_from_slice(data);
                out.push(record(start, end, &body));
            }
            other => panic!("fragment type {other} at {pos} in an undamaged segment"),
        }
        pos = end;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_damaged_bytes_cost_only_the_records_they_overlap() {
    const READINGS: usize = 3_000;
    let mut mongo = start_mongo();
    let mut app = TestApp::spawn_with(AppOptions {
        mongodb_uri: Some(format!("mongodb://127.0.0.1:{}", mongo.port)),
        ..AppOptions::default()
    })
    .await;
    // MongoDB goes away: what is published now stays in the log.
    mongo.stop();
    let publisher = Publisher::connect(app.mqtt_port, "damage").await;
    for n in 0..READINGS {
        let sensor = format!("damage-{}", n % 10);
        let payload = reading_json(&sensor, n as f64, &ts(n as i64 * 10));
        publisher.publish(n, "sensors/temperature", payload).await;
    }
    publisher.wait_acked(READINGS).await;
    publisher.disconnect().await;
    app.kill();

    let segments: Vec<_> = std::fs::read_dir(&app.journal_dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "wal2"))
        .collect();
    assert_eq!(segments.len(), 1, "{segments:?}");
    let bytes = std::fs::read(&segments[0]).unwrap();
    let on_disk = records_on_disk(&bytes);
    assert_eq!(
        on_disk.len(),
        READINGS,
        "every acknowledged reading is in the log"
    );
    assert!(bytes.len() > 4 * BLOCK);

    // 64 random bytes from the middle of the segment.
    let at = bytes.len() / 2 + 1234;
    let noise: Vec<u8> = (0..64).map(|_| rand::random::<u8>()).collect();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&segments[0])
        .unwrap()
        .write_all_at(&noise, at as u64)
        .unwrap();
    let damaged = std::fs::read(&segments[0]).unwrap();
    // The records whose bytes changed (a random byte may equal the one it replaced).
    let lost: BTreeSet<usize> = on_disk
        .iter()
        .filter(|r| bytes[r.start..r.end] != damaged[r.start..r.end])
        .map(|r| r.value)
        .collect();
    assert!(
        !lost.is_empty() && lost.len() <= 2,
        "{} records",
        lost.len()
    );
    // What the reader must count as corrupt: the lost records whole, and at most a block
    // trailer between them.
    let of_lost = || on_disk.iter().filter(|r| lost.contains(&r.value));
    let lost_bytes: usize = of_lost().map(|r| r.end - r.start).sum();
    let lost_span =
        of_lost().map(|r| r.end).max().unwrap() - of_lost().map(|r| r.start).min().unwrap();

    mongo.resume();
    app.start().await;
    let expected = READINGS - lost.len();
    // Polled with a deadline; a shortfall is then reported as numbers.
    let deadline = std::time::Instant::now() + PATIENCE;
    while app.count_readings().await < expected as u64 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let docs: Vec<bson::Document> = app
        .readings()
        .await
        .find(doc! {})
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let stored: BTreeSet<usize> = docs
        .iter()
        .map(|d| d.get_f64("value").unwrap() as usize)
        .collect();
    assert_eq!(stored.len(), docs.len(), "a reading stored twice");
    let missing: BTreeSet<usize> = (0..READINGS).filter(|n| !stored.contains(n)).collect();
    assert_eq!(
        missing,
        lost,
        "missing: {} readings; the damage changed the bytes of {}",
        missing.len(),
        lost.len()
    );
    let corrupt = app.metric("sensorhub_journal_corrupt_bytes_total").await;
    assert!(
        corrupt >= lost_bytes as u64,
        "{corrupt} corrupt bytes counted"
    );
    assert!(
        corrupt <= (lost_span + HEADER) as u64,
        "{corrupt} corrupt bytes counted"
    );
    assert!(
        app.logs().matches("the local log is damaged here").count() == 1,
        "the damage is logged once"
    );
    eprintln!(
        "log damage: 64 bytes overwritten at {at} of a {} byte segment holding {READINGS} \
         readings; they changed {} readings; {} lost; {} stored; {corrupt} corrupt bytes counted",
        bytes.len(),
        lost.len(),
        missing.len(),
        stored.len()
    );
}
