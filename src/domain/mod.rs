//! The vocabulary of sensorhub: what a reading is and how a raw MQTT message becomes one.
//!
//! Pure code. It imports nothing of ours and does no I/O, so every other module can depend on
//! it and everything in it is tested without services.

mod buckets;
mod dead_letter;
mod dead_letter_budget;
mod decode;
mod reading;
mod timestamp;

pub use buckets::{Interval, bucket_end, bucket_start, bucket_starts};
pub use dead_letter::DeadLetter;
pub use dead_letter_budget::DeadLetterBudget;
pub use decode::{
    Captured, DEAD_LETTER_RAW_BYTES, FORBIDDEN_TOPIC_PREFIX, Limits, Reason, Rejection,
    TOPIC_PREFIX, decode, is_reading_topic,
};
pub use reading::{Kind, MAX_KIND_BYTES, MAX_SENSOR_ID_BYTES, Reading, SensorId, json_array};
pub use timestamp::{NaiveZone, Timestamp, TimestampError};
