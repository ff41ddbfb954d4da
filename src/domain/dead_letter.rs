//! A message that was not a reading, kept with the evidence: what arrived, when, and why it was
//! turned away.

use bytes::Bytes;

use super::{Captured, DEAD_LETTER_RAW_BYTES, Reason, Rejection, Timestamp};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetter {
    /// Unique per captured message, and the same when a replay judges it again.
    pub id: String,
    pub received_at: Timestamp,
    /// The topic, with invalid UTF-8 replaced.
    pub topic: String,
    /// The payload's first `DEAD_LETTER_RAW_BYTES` bytes.
    pub payload: Bytes,
    /// The payload's length as published.
    pub payload_len: usize,
    pub reason: Reason,
    pub message: String,
}

impl DeadLetter {
    pub fn new(id: String, captured: &Captured, rejection: Rejection) -> Self {
        let keep = captured.payload.len().min(DEAD_LETTER_RAW_BYTES);
        Self {
            id,
            received_at: captured.received_at,
            topic: String::from_utf8_lossy(&captured.topic).into_owned(),
            payload: captured.payload.slice(..keep),
            payload_len: captured.payload_len,
            reason: rejection.reason,
            message: rejection.message,
        }
    }
}
