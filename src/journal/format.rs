//! The on-disk form of one captured message. Little-endian, framed and checksummed so that a
//! torn tail (a crash in the middle of a write) is detected and cut off on recovery:
//!
//! ```text
//! u32 body length | u32 CRC-32 of body | body
//! body = u8 version (1) | i64 received_at ms | u32 payload length as published
//!        | u16 topic length | topic | payload (possibly only its head)
//! ```

use bytes::Bytes;

use crate::domain::{Captured, Timestamp};

pub const HEADER_BYTES: usize = 8;
const VERSION: u8 = 1;
const FIXED_BODY_BYTES: usize = 1 + 8 + 4 + 2;
/// A frame larger than this is corruption, not a record (payloads are capped far below).
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// Appends the frame of `message` to `out`.
pub fn encode(message: &Captured, out: &mut Vec<u8>) {
    // Topics are capped by MQTT at 65,535 bytes; payloads by the capture limit.
    let topic_len = u16::try_from(message.topic.len()).unwrap_or(u16::MAX);
    let topic = &message.topic[..usize::from(topic_len)];
    let body_len = FIXED_BODY_BYTES + topic.len() + message.payload.len();
    let start = out.len();
    out.extend_from_slice(&u32::try_from(body_len).unwrap_or(u32::MAX).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.push(VERSION);
    out.extend_from_slice(&message.received_at.as_millis().to_le_bytes());
    out.extend_from_slice(
        &u32::try_from(message.payload_len)
            .unwrap_or(u32::MAX)
            .to_le_bytes(),
    );
    out.extend_from_slice(&topic_len.to_le_bytes());
    out.extend_from_slice(topic);
    out.extend_from_slice(&message.payload);
    let crc = crc32fast::hash(&out[start + HEADER_BYTES..]);
    out[start + 4..start + HEADER_BYTES].copy_from_slice(&crc.to_le_bytes());
}

/// What the front of a buffer holds.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// A whole, intact record and the number of bytes it took.
    Record(Captured, usize),
    /// The buffer ends inside a record: read more, or (at the tail after a crash) cut here.
    Incomplete,
    /// The bytes are not a record: a checksum mismatch or an impossible length.
    Corrupt,
}

/// Reads the record at the front of `buf`. `buf` is shared so payloads are sliced, not copied.
pub fn decode(buf: &Bytes) -> Frame {
    let Some(header) = buf.get(..HEADER_BYTES) else {
        return Frame::Incomplete;
    };
    let body_len = u32_at(header, 0) as usize;
    if !(FIXED_BODY_BYTES..=MAX_BODY_BYTES).contains(&body_len) {
        return Frame::Corrupt;
    }
    let Some(body) = buf.get(HEADER_BYTES..HEADER_BYTES + body_len) else {
        return Frame::Incomplete;
    };
    if crc32fast::hash(body) != u32_at(header, 4) || body[0] != VERSION {
        return Frame::Corrupt;
    }
    let millis = i64::from_le_bytes(body[1..9].try_into().unwrap_or_default());
    let payload_len = u32_at(body, 9) as usize;
    let topic_len = usize::from(u16::from_le_bytes([body[13], body[14]]));
    let topic_start = HEADER_BYTES + FIXED_BODY_BYTES;
    if FIXED_BODY_BYTES + topic_len > body_len {
        return Frame::Corrupt;
    }
    let Some(received_at) = Timestamp::from_millis(millis) else {
        return Frame::Corrupt;
    };
    let record = Captured {
        received_at,
        topic: buf.slice(topic_start..topic_start + topic_len),
        payload: buf.slice(topic_start + topic_len..HEADER_BYTES + body_len),
        payload_len,
    };
    Frame::Record(record, HEADER_BYTES + body_len)
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(topic: &str, payload: &[u8]) -> Captured {
        Captured::new(
            Timestamp::from_millis(1_714_557_600_123).unwrap(),
            Bytes::copy_from_slice(topic.as_bytes()),
            Bytes::copy_from_slice(payload),
            16 * 1024,
        )
    }

    #[test]
    fn round_trips_back_to_back_records() {
        let a = message("sensors/t", br#"{"x":1}"#);
        let b = message("sensors/h", b"");
        let mut out = Vec::new();
        encode(&a, &mut out);
        encode(&b, &mut out);
        let buf = Bytes::from(out);
        let Frame::Record(first, used) = decode(&buf) else {
            panic!("first record unreadable")
        };
        assert_eq!(first, a);
        assert_eq!(
            decode(&buf.slice(used..)),
            Frame::Record(b, buf.len() - used)
        );
    }

    #[test]
    fn a_torn_tail_is_incomplete_and_a_flipped_bit_is_corrupt() {
        let mut out = Vec::new();
        encode(&message("sensors/t", b"payload"), &mut out);
        for cut in 0..out.len() {
            assert_eq!(
                decode(&Bytes::copy_from_slice(&out[..cut])),
                Frame::Incomplete,
                "cut {cut}"
            );
        }
        for at in HEADER_BYTES..out.len() {
            let mut bad = out.clone();
            bad[at] ^= 0x10;
            assert_eq!(decode(&Bytes::from(bad)), Frame::Corrupt, "flip at {at}");
        }
        let mut huge = out.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode(&Bytes::from(huge)), Frame::Corrupt);
    }

    #[test]
    fn oversize_payloads_keep_their_declared_length() {
        let big = vec![b'x'; 100_000];
        let m = message("sensors/t", &big);
        let mut out = Vec::new();
        encode(&m, &mut out);
        let Frame::Record(back, _) = decode(&Bytes::from(out)) else {
            panic!("unreadable")
        };
        assert_eq!(back.payload_len, 100_000);
        assert!(back.payload.len() < 100_000);
    }
}
