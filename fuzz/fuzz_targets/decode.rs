//! Holds `domain::decode` to its promise: total and pure. Any bytes, split into a topic and a
//! payload, end in a reading or a rejection with a reason and a message, never in a panic; a
//! reading has a finite value and passes the limits; judging the same message twice gives the
//! same verdict (a replay must agree with the first pass); a message that is accepted holds at
//! least one and at most the limit of elements, its rejected elements named by distinct
//! indexes; every stored sensor id is one the access control checked
//! (`claimed_sensor_ids`); and a reading's own public JSON, published on its kind's topic,
//! decodes to the same reading. Batches, `values` objects and templated topics
//! (`plant/+site/+sensor_id/+kind`, `lab/+room/+sensor_id`) are in scope.
//!
//! Input: `topic 0x00 payload`; without a 0x00 byte the whole input is the payload of
//! `sensors/temperature`.

#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use sensorhub::domain::{
    Captured, Limits, MAX_KIND_BYTES, MAX_SENSOR_ID_BYTES, Tags, Templates, Timestamp,
    claimed_sensor_ids, decode,
};

fuzz_target!(|data: &[u8]| {
    let (topic, payload) = match data.iter().position(|&b| b == 0) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (&b"sensors/temperature"[..], data),
    };
    // A batch limit small enough that inputs reach it, and two templates, so that topics of
    // their shapes are judged by their levels.
    let limits = Limits {
        max_batch_readings: 8,
        templates: Templates::parse(&["plant/+site/+sensor_id/+kind", "lab/+room/+sensor_id"])
            .expect("valid templates"),
        ..Limits::default()
    };
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
    // The access control's reading of the message covers every reading decode accepts.
    let claimed = claimed_sensor_ids(topic, payload, &limits.templates);
    match verdict {
        Ok(decoded) => {
            assert!(payload.len() <= limits.max_payload_bytes);
            assert!(topic.len() <= limits.max_topic_bytes);
            let elements = decoded.readings.len() + decoded.rejected.len();
            assert!(
                elements >= 1,
                "a message that holds nothing is rejected whole"
            );
            assert!(elements <= limits.max_batch_readings, "{elements} elements");
            let mut indexes: Vec<usize> = decoded.rejected.iter().map(|(i, _)| *i).collect();
            indexes.dedup();
            assert_eq!(indexes.len(), decoded.rejected.len(), "an index twice");
            assert!(indexes.iter().all(|i| *i < elements), "{indexes:?}");
            for (i, rejection) in &decoded.rejected {
                assert!(
                    rejection.message.starts_with(&format!("element {i}")),
                    "{rejection:?}"
                );
            }
            for reading in &decoded.readings {
                assert!(reading.value().is_finite(), "{reading:?}");
                assert!(reading.timestamp() >= limits.earliest, "{reading:?}");
                assert!(
                    reading.timestamp()
                        <= received_at.saturating_add_millis(limits.max_future_skew_ms),
                    "{reading:?}"
                );
                let id = reading.sensor_id().as_str();
                assert!(!id.is_empty() && id.len() <= MAX_SENSOR_ID_BYTES);
                assert!(!id.chars().any(char::is_control));
                assert!(
                    claimed.iter().any(|c| c == id),
                    "{id} stored but not checked against the grant ({claimed:?})"
                );
                let kind = reading.kind().as_str();
                assert!(!kind.is_empty() && kind.len() <= MAX_KIND_BYTES);

                // What the API serves and the cache keeps, published again on its kind's
                // topic, is the same reading (tags aside: they come from a template's topic).
                let again = Captured::new(
                    received_at,
                    Bytes::from(format!("sensors/{kind}")),
                    Bytes::from(reading.to_json()),
                    limits.max_payload_bytes,
                );
                let plain = reading.clone().with_tags(Tags::default());
                assert_eq!(decode(&again, &limits).map(|d| d.readings), Ok(vec![plain]));
            }
        }
        Err(rejection) => assert!(!rejection.message.is_empty(), "{rejection:?}"),
    }
});
