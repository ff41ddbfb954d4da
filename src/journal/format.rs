//! The on-disk form of the local log: block framing in the manner of LevelDB's and RocksDB's
//! write-ahead logs, around a versioned record body. Pure code over byte buffers; reading files
//! is `segment`'s job, and judging what a payload means is `domain::decode`'s.
//!
//! ```text
//! segment  = block*                   32 KiB blocks counted from the segment's first byte;
//!                                     the last block may be short
//! block    = fragment* trailer
//! fragment = u32 CRC-32 of (type, data) | u16 data length | u8 type | data
//! type     = 1 FULL | 2 FIRST | 3 MIDDLE | 4 LAST
//! trailer  = fewer than 7 zero bytes, where no fragment header fits
//! record   = FULL | FIRST MIDDLE* LAST     its fragments' data, in order, is the body
//! body     = u8 version (1) | i64 received_at ms | u32 payload length as published
//!            | u16 topic length | topic | payload (possibly only its head)
//! ```
//!
//! (Little-endian throughout.) A fragment never crosses a block boundary, so the writer
//! guarantees that a fragment header starts every block. A reader that meets damage skips to the
//! next block boundary and drops MIDDLE and LAST fragments until a FULL or FIRST begins a record.
//! It never searches bytes for something that looks like a header: payloads are whatever
//! publishers sent, and a publisher can embed a well-formed fragment, checksum and all, in one.
//! Resynchronising only where the writer put a header is what keeps such a forgery from ever
//! being read as a record; a per-record sync marker would be found inside payloads just the same.
//!
//! The body keeps its version byte so a later version can add fields; this decoder reads
//! version 1 and treats any other as damage.

use std::ops::Range;

use bytes::{Bytes, BytesMut};

use crate::domain::{Captured, DEAD_LETTER_RAW_BYTES, Timestamp};

/// The largest payload any configuration may admit (`--max-payload-bytes` is validated against
/// it), so every admitted reading fits in one record.
pub const MAX_PAYLOAD_BYTES: usize = 1 << 20;
/// MQTT caps topics at 65,535 bytes; so does the body's u16 length.
const MAX_TOPIC_BYTES: usize = u16::MAX as usize;
pub const BLOCK_BYTES: usize = 32 << 10;
pub const HEADER_BYTES: usize = 7;
const VERSION: u8 = 1;
const FIXED_BODY_BYTES: usize = 1 + 8 + 4 + 2;
/// No writer produces a larger body; a reader that assembles one is looking at damage.
pub const MAX_BODY_BYTES: usize = FIXED_BODY_BYTES + MAX_TOPIC_BYTES + MAX_PAYLOAD_BYTES;

const FULL: u8 = 1;
const FIRST: u8 = 2;
const MIDDLE: u8 = 3;
const LAST: u8 = 4;

/// Appends the body of `message` to `out`.
pub fn encode_body(message: &Captured, out: &mut Vec<u8>) {
    let topic = &message.topic[..message.topic.len().min(MAX_TOPIC_BYTES)];
    // A payload no configuration admits is rejected whatever the limit: like the capture, keep
    // only its head (its declared length says it was too large).
    let payload = if message.payload.len() > MAX_PAYLOAD_BYTES {
        &message.payload[..DEAD_LETTER_RAW_BYTES]
    } else {
        &message.payload[..]
    };
    let payload_len = message.payload_len.max(message.payload.len());
    out.push(VERSION);
    out.extend_from_slice(&message.received_at.as_millis().to_le_bytes());
    out.extend_from_slice(&u32::try_from(payload_len).unwrap_or(u32::MAX).to_le_bytes());
    out.extend_from_slice(&(topic.len() as u16).to_le_bytes());
    out.extend_from_slice(topic);
    out.extend_from_slice(payload);
}

/// Reads a body; `None` when it is not one this version can read (damage, to the reader).
/// `body` is shared so topic and payload are sliced, not copied.
pub fn decode_body(body: &Bytes) -> Option<Captured> {
    if !(FIXED_BODY_BYTES..=MAX_BODY_BYTES).contains(&body.len()) || body[0] != VERSION {
        return None;
    }
    let millis = i64::from_le_bytes(body[1..9].try_into().ok()?);
    let payload_len = u32::from_le_bytes(body[9..13].try_into().ok()?) as usize;
    let topic_len = usize::from(u16::from_le_bytes([body[13], body[14]]));
    let topic_end = FIXED_BODY_BYTES + topic_len;
    if topic_end > body.len() {
        return None;
    }
    Some(Captured {
        received_at: Timestamp::from_millis(millis)?,
        topic: body.slice(FIXED_BODY_BYTES..topic_end),
        payload: body.slice(topic_end..),
        payload_len,
    })
}

/// Appends `body` to `out` as fragments, for bytes that will be written `offset` bytes into a
/// segment (`offset` is where `out`'s end lands). Returns the segment offset of the record's
/// first fragment, which follows the zero trailer of a block too full for a header.
pub fn frame(body: &[u8], offset: u64, out: &mut Vec<u8>) -> u64 {
    let mut offset = offset;
    let mut rest = body;
    let mut start = None;
    loop {
        let left = block_left(offset);
        if left < HEADER_BYTES {
            out.resize(out.len() + left, 0);
            offset += left as u64;
            continue;
        }
        let take = rest.len().min(left - HEADER_BYTES);
        let kind = match (start.is_none(), take == rest.len()) {
            (true, true) => FULL,
            (true, false) => FIRST,
            (false, false) => MIDDLE,
            (false, true) => LAST,
        };
        let (data, after) = rest.split_at(take);
        out.extend_from_slice(&crc(kind, data).to_le_bytes());
        out.extend_from_slice(&(take as u16).to_le_bytes());
        out.push(kind);
        out.extend_from_slice(data);
        let first = *start.get_or_insert(offset);
        offset += (HEADER_BYTES + take) as u64;
        rest = after;
        if matches!(kind, FULL | LAST) {
            return first;
        }
    }
}

/// What `scan` found from a position on. Offsets are indices into the scanned buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Scan {
    /// A record whose fragments are all intact: its first fragment's start, the end of its last
    /// fragment, and its body (not yet decoded).
    Record {
        start: usize,
        end: usize,
        body: Bytes,
    },
    /// Bytes that hold no readable record. Scanning resumes at `end`: a block boundary, the end
    /// of an orphan fragment, the start of the record that cut a broken one short, or the end of
    /// the buffer.
    Damage { start: usize, end: usize },
    /// The buffer ends before the next record does: scan again with more of the segment.
    NeedMore,
    /// Nothing more: the buffer (which `complete` said is the whole segment) ends here.
    End,
}

/// Scans `buf` from `at` for the next record or stretch of damage. `buf` must begin at a block
/// boundary of its segment, and `at` must be where a record may start (a record's end, a block
/// boundary, a position a previous scan resumed at). `complete`: the segment ends where `buf`
/// does, so a record cut off by that end is damage rather than a reason to read more.
pub fn scan(buf: &Bytes, at: usize, complete: bool) -> Scan {
    let mut pos = at;
    // The record being assembled: where its first fragment starts and its fragments' data.
    let mut pending: Option<(usize, Vec<Range<usize>>)> = None;
    let mut pending_len = 0;
    loop {
        let left = block_left(pos as u64);
        if left < HEADER_BYTES {
            pos += left;
        }
        let Some(header) = buf.get(pos..pos + HEADER_BYTES) else {
            if !complete {
                return Scan::NeedMore;
            }
            return match pending {
                Some((start, _)) => Scan::Damage {
                    start,
                    end: buf.len(),
                },
                None if pos >= buf.len() => Scan::End,
                // A torn header.
                None => Scan::Damage {
                    start: pos,
                    end: buf.len(),
                },
            };
        };
        let stored_crc = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let len = usize::from(u16::from_le_bytes([header[4], header[5]]));
        let kind = header[6];
        let data = pos + HEADER_BYTES..pos + HEADER_BYTES + len;
        let damaged_from = pending.as_ref().map_or(pos, |(start, _)| *start);
        let sane = (FULL..=LAST).contains(&kind) && HEADER_BYTES + len <= block_left(pos as u64);
        if sane && data.end > buf.len() && !complete {
            return Scan::NeedMore;
        }
        let intact = sane
            && buf
                .get(data.clone())
                .is_some_and(|bytes| crc(kind, bytes) == stored_crc);
        if !intact {
            // Nothing in the rest of this block can be trusted: the next header the writer
            // guarantees is at the next block boundary.
            let boundary = (pos / BLOCK_BYTES + 1) * BLOCK_BYTES;
            let end = if complete {
                boundary.min(buf.len())
            } else {
                boundary
            };
            return Scan::Damage {
                start: damaged_from,
                end,
            };
        }
        match (kind, pending.as_mut()) {
            (FULL, None) => {
                return Scan::Record {
                    start: pos,
                    end: data.end,
                    body: buf.slice(data),
                };
            }
            (FIRST, None) => {
                pending_len = len;
                pending = Some((pos, vec![data.clone()]));
            }
            // The record before never got its LAST fragment: it ends where this one begins.
            (FULL | FIRST, Some((start, _))) => {
                return Scan::Damage {
                    start: *start,
                    end: pos,
                };
            }
            // The rest of a record whose beginning was damaged (or precedes `at`).
            (_, None) => {
                return Scan::Damage {
                    start: pos,
                    end: data.end,
                };
            }
            (_, Some((start, pieces))) => {
                pending_len += len;
                if pending_len > MAX_BODY_BYTES {
                    return Scan::Damage {
                        start: *start,
                        end: data.end,
                    };
                }
                pieces.push(data.clone());
                if kind == LAST {
                    let mut body = BytesMut::with_capacity(pending_len);
                    for piece in pieces.iter() {
                        body.extend_from_slice(&buf[piece.clone()]);
                    }
                    return Scan::Record {
                        start: *start,
                        end: data.end,
                        body: body.freeze(),
                    };
                }
            }
        }
        pos = data.end;
    }
}

/// Bytes from `offset` to the end of its block.
fn block_left(offset: u64) -> usize {
    BLOCK_BYTES - (offset % BLOCK_BYTES as u64) as usize
}

fn crc(kind: u8, data: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&[kind]);
    hasher.update(data);
    hasher.finalize()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(topic: &str, payload: &[u8]) -> Captured {
        Captured::new(
            Timestamp::from_millis(1_714_557_600_123).unwrap(),
            Bytes::copy_from_slice(topic.as_bytes()),
            Bytes::copy_from_slice(payload),
            MAX_PAYLOAD_BYTES,
        )
    }

    fn framed(messages: &[Captured]) -> (Bytes, Vec<usize>) {
        let mut out = Vec::new();
        let mut starts = Vec::new();
        for m in messages {
            let mut body = Vec::new();
            encode_body(m, &mut body);
            starts.push(frame(&body, out.len() as u64, &mut out) as usize);
        }
        (Bytes::from(out), starts)
    }

    /// Every event from the start of `buf`, as a whole segment.
    fn scan_all(buf: &Bytes) -> Vec<Scan> {
        let mut at = 0;
        let mut events = Vec::new();
        loop {
            let event = scan(buf, at, true);
            at = match &event {
                Scan::Record { end, .. } | Scan::Damage { end, .. } => *end,
                Scan::End => return events,
                Scan::NeedMore => panic!("a complete buffer needs nothing more"),
            };
            events.push(event);
        }
    }

    fn records(events: &[Scan]) -> Vec<Captured> {
        events
            .iter()
            .filter_map(|e| match e {
                Scan::Record { body, .. } => decode_body(body),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn bodies_round_trip_and_unknown_versions_are_refused() {
        let m = message("sensors/t", br#"{"x":1}"#);
        let mut body = Vec::new();
        encode_body(&m, &mut body);
        assert_eq!(decode_body(&Bytes::from(body.clone())), Some(m));
        body[0] = 2;
        assert_eq!(decode_body(&Bytes::from(body)), None);
    }

    #[test]
    fn records_span_blocks_and_fill_trailers() {
        // Sizes chosen to cross block boundaries, end a block in its trailer, and span several.
        let messages: Vec<Captured> = [10, 32_700, 40, 100_000, 0, 5]
            .iter()
            .map(|&n| message("sensors/t", &vec![b'a'; n]))
            .collect();
        let (buf, starts) = framed(&messages);
        let events = scan_all(&buf);
        assert_eq!(records(&events), messages);
        for (event, start) in events.iter().zip(&starts) {
            assert!(matches!(event, Scan::Record { start: s, .. } if s == start));
        }
        // Cut anywhere, an incomplete buffer asks for more rather than inventing damage.
        for cut in (0..buf.len()).step_by(997) {
            let head = buf.slice(..cut);
            let mut at = 0;
            loop {
                match scan(&head, at, false) {
                    Scan::Record { end, .. } => at = end,
                    Scan::NeedMore => break,
                    other => panic!("cut {cut} at {at}: {other:?}"),
                }
            }
        }
    }

    #[test]
    fn the_largest_record_holds_the_largest_payload_and_topic() {
        let topic = "t".repeat(MAX_TOPIC_BYTES);
        let m = message(&topic, &vec![b' '; MAX_PAYLOAD_BYTES]);
        assert_eq!(m.payload.len(), MAX_PAYLOAD_BYTES, "admitted whole");
        let (buf, _) = framed(std::slice::from_ref(&m));
        assert_eq!(records(&scan_all(&buf)), vec![m]);
    }

    #[test]
    fn a_payload_beyond_any_limit_keeps_only_its_head() {
        let m = Captured {
            payload: Bytes::from(vec![b'x'; MAX_PAYLOAD_BYTES + 1]),
            payload_len: MAX_PAYLOAD_BYTES + 1,
            ..message("sensors/t", b"")
        };
        let mut body = Vec::new();
        encode_body(&m, &mut body);
        let back = decode_body(&Bytes::from(body)).unwrap();
        assert_eq!(back.payload_len, MAX_PAYLOAD_BYTES + 1);
        assert_eq!(back.payload.len(), DEAD_LETTER_RAW_BYTES);
    }

    #[test]
    fn damage_skips_to_the_next_block_and_drops_orphan_fragments() {
        // Records of 3 KiB: a 40 KiB one spans the first block boundary.
        let mut messages: Vec<Captured> = (0..30)
            .map(|n| message("sensors/t", &vec![b'a' + n as u8 % 26; 3000]))
            .collect();
        messages.insert(5, message("sensors/big", &vec![b'z'; 40_000]));
        let (buf, starts) = framed(&messages);
        // Damage the FIRST fragment of the big record: its MIDDLE/LAST fragments in the next
        // block are orphans, dropped up to the first record that begins after them.
        let mut bad = buf.to_vec();
        bad[starts[5] + HEADER_BYTES + 10] ^= 1;
        let events = scan_all(&Bytes::from(bad));
        let back = records(&events);
        let mut expected = messages.clone();
        expected.remove(5);
        assert_eq!(back, expected);
        let damaged: Vec<(usize, usize)> = events
            .iter()
            .filter_map(|e| match e {
                Scan::Damage { start, end } => Some((*start, *end)),
                _ => None,
            })
            .collect();
        assert_eq!(damaged[0], (starts[5], BLOCK_BYTES));
        assert_eq!(damaged.last().unwrap().1, starts[6]);
    }

    #[test]
    fn a_frame_forged_inside_a_payload_is_never_read() {
        // A payload holding a well-formed FULL fragment of another message.
        let forged = message("sensors/forged", b"{}");
        let (forgery, _) = framed(std::slice::from_ref(&forged));
        let mut payload = vec![b' '; 2000];
        payload.extend_from_slice(&forgery);
        payload.extend_from_slice(&[b' '; 2000]);
        let host = message("sensors/t", &payload);
        let messages = vec![message("sensors/a", b"1"), host, message("sensors/b", b"2")];
        let (buf, starts) = framed(&messages);
        // Damage the host's header: the reader must not find the forgery in its payload.
        let mut bad = buf.to_vec();
        bad[starts[1] + 4] ^= 0xff;
        let back = records(&scan_all(&Bytes::from(bad)));
        assert_eq!(back, vec![messages[0].clone()]);
        assert!(!back.contains(&forged));
    }

    #[test]
    fn a_torn_record_at_the_end_is_damage_once_complete() {
        let messages = vec![
            message("sensors/a", b"1"),
            message("sensors/b", &[b'x'; 50_000]),
        ];
        let (buf, starts) = framed(&messages);
        for cut in [
            starts[1] + 3,
            starts[1] + 100,
            BLOCK_BYTES + 10,
            buf.len() - 1,
        ] {
            let head = buf.slice(..cut);
            let events = scan_all(&head);
            assert_eq!(records(&events), messages[..1].to_vec(), "cut {cut}");
            assert_eq!(
                events.last(),
                Some(&Scan::Damage {
                    start: starts[1],
                    end: cut
                })
            );
        }
    }
}
