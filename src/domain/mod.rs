//! The vocabulary of sensorhub: what a reading is and how a raw MQTT message becomes one.
//!
//! Pure code. It imports nothing of ours and does no I/O, so every other module can depend on
//! it and everything in it is tested without services.

mod buckets;
mod dead_letter;
mod dead_letter_budget;
mod decode;
mod reading;
mod template;
mod timestamp;

pub use buckets::{Interval, bucket_end, bucket_start, bucket_starts};
pub use dead_letter::DeadLetter;
pub use dead_letter_budget::DeadLetterBudget;
pub use decode::{
    Captured, DEAD_LETTER_RAW_BYTES, Decoded, FORBIDDEN_TOPIC_PREFIX, Limits, MAX_BATCH_READINGS,
    Reason, Rejection, TOPIC_PREFIX, claimed_sensor_ids, decode, is_captured, is_reading_topic,
};
pub use reading::{Kind, MAX_KIND_BYTES, MAX_SENSOR_ID_BYTES, Reading, SensorId, Tags, json_array};
pub use template::{
    MAX_TAG_NAME_BYTES, MAX_TAG_VALUE_BYTES, Templates, TopicFields, TopicTemplate,
};
pub use timestamp::{NaiveZone, Timestamp, TimestampError};
