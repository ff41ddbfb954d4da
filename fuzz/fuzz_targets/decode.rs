//! Holds `domain::decode` to its promise: total and pure. Any bytes, split into a topic and a
//! payload, end in a reading or a rejection with a reason and a message, never in a panic; a
//! reading has a finite value and passes the limits; judging the same message twice gives the
//! same verdict (a replay must agree with the first pass); and a reading's own public JSON,
//! published on its kind's topic, decodes to the same reading.
//!
//! Input: `topic 0x00 payload`; without a 0x00 byte the whole input is the payload of
//! `sensors/temperature`.

#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use sensorhub::domain::{Captured, Limits, MAX_KIND_BYTES, MAX_SENSOR_ID_BYTES, Timestamp, decode};

fuzz_target!(|data: &[u8]| {
    let (topic, payload) = match data.iter().position(|&b| b == 0) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (&b"sensors/temperature"[..], data),
    };
    let limits = Limits::default();
    let received_at = Timestamp::now();
    let message = Captured::new(
        received_at,
        Bytes::copy_from_slice(topic),
        Bytes::copy_from_slice(payload),
        limits.max_payload_bytes,
    );
    assert_eq!(message.payload_len, payload.len());
    assert!(message.payload.len() <= payload.len());

    let verdict = decode(&message, &limits);
    assert_eq!(
        verdict,
        decode(&message, &limits),
        "a replay judged differently"
    );
    match verdict {
        Ok(reading) => {
            assert!(reading.value().is_finite(), "{reading:?}");
            assert!(payload.len() <= limits.max_payload_bytes);
            assert!(topic.len() <= limits.max_topic_bytes);
            assert!(reading.timestamp() >= limits.earliest, "{reading:?}");
            assert!(
                reading.timestamp() <= received_at.saturating_add_millis(limits.max_future_skew_ms),
                "{reading:?}"
            );
            let id = reading.sensor_id().as_str();
            assert!(!id.is_empty() && id.len() <= MAX_SENSOR_ID_BYTES);
            assert!(!id.chars().any(char::is_control));
            let kind = reading.kind().as_str();
            assert!(!kind.is_empty() && kind.len() <= MAX_KIND_BYTES);

            // What the API serves and the cache keeps, published again, is the same reading.
            let again = Captured::new(
                received_at,
                Bytes::from(format!("sensors/{kind}")),
                Bytes::from(reading.to_json()),
                limits.max_payload_bytes,
            );
            assert_eq!(decode(&again, &limits).as_ref(), Ok(&reading));
        }
        Err(rejection) => assert!(!rejection.message.is_empty(), "{rejection:?}"),
    }
});
