//! Holds the Sparkplug judge (`sparkplug::Sessions::judge`) to the promises of `domain::decode`:
//! any sequence of messages on any edge node topics ends in readings and dead letters with a
//! reason and a message, never in a panic; every reading is finite and named under its node; and
//! the same sequence judged again from the same state gives the same verdicts (a replay must
//! agree with the first pass).
//!
//! Input: messages separated by the byte 0x00; each message's first byte picks its topic from a
//! fixed set (births, data, deaths of one node and one device, and a malformed topic), the rest
//! is its payload.

#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use sensorhub::domain::{Captured, Limits, Timestamp};
use sensorhub::sparkplug::Sessions;

const TOPICS: [&str; 8] = [
    "spBv1.0/g/NBIRTH/n",
    "spBv1.0/g/NDATA/n",
    "spBv1.0/g/NDEATH/n",
    "spBv1.0/g/DBIRTH/n/d",
    "spBv1.0/g/DDATA/n/d",
    "spBv1.0/g/DDEATH/n/d",
    "spBv1.0/g/DDATA/n",
    "spBv1.0/g/NBIRTH/n/x/y",
];

fn run(data: &[u8]) -> (Vec<String>, Vec<String>) {
    let limits = Limits::default();
    let at = Timestamp::from_millis(1_767_225_600_000).unwrap_or_else(Timestamp::now);
    let mut sessions = Sessions::default();
    let (mut readings, mut dead) = (Vec::new(), Vec::new());
    for (lsn, chunk) in data.split(|b| *b == 0).enumerate() {
        let Some((&pick, payload)) = chunk.split_first() else {
            continue;
        };
        let message = Captured::new(
            at,
            Bytes::from_static(TOPICS[usize::from(pick) % TOPICS.len()].as_bytes()),
            Bytes::copy_from_slice(payload),
            limits.max_payload_bytes,
        );
        sessions.judge("fuzz", lsn as u64, &message, &limits, &mut readings, &mut dead);
    }
    for r in &readings {
        assert!(r.value().is_finite(), "{r:?}");
        assert!(r.sensor_id().as_str().starts_with("g/n/"), "{r:?}");
    }
    for d in &dead {
        assert!(!d.message.is_empty(), "{d:?}");
    }
    (
        readings.iter().map(|r| r.key()).collect(),
        dead.iter().map(|d| format!("{} {} {}", d.id, d.reason, d.message)).collect(),
    )
}

fuzz_target!(|data: &[u8]| {
    assert_eq!(run(data), run(data), "a replay judged differently");
});
