//! The on-disk form of the local log: block framing in the manner of LevelDB's and RocksDB's
//! write-ahead logs, each fragment also tagged with the log's secret key, around a versioned
//! record body. Pure code over byte buffers; reading files is `segment`'s job, keeping the key
//! is `meta`'s, and judging what a payload means is `domain::decode`'s.
//!
//! ```text
//! segment  = block*                   32 KiB blocks counted from the segment's first byte;
//!                                     the last block may be short
//! block    = fragment* trailer
//! fragment = u32 CRC-32 of (lsn, tag, length, type, data)
//!          | u64 tag: SipHash-2-4 under the log's key of (lsn, length, type, data)
//!          | u16 data length | u8 type | data
//! lsn      = u64 log position of the fragment's first byte (not stored: where it lies)
//! type     = 1 FULL | 2 FIRST | 3 MIDDLE | 4 LAST
//! trailer  = fewer than 15 zero bytes, where no fragment header fits
//! record   = FULL | FIRST MIDDLE* LAST     its fragments' data, in order, is the body
//! body     = u8 version (1) | i64 received_at ms | u32 payload length as published
//!            | u16 topic length | topic | payload (possibly only its head)
//! ```
//!
//! (Little-endian throughout.) A fragment never crosses a block boundary, so the writer
//! guarantees that a fragment header starts every block. After damage the reader looks for the
//! next fragment the writer wrote, and resumes there (dropping MIDDLE and LAST fragments until a
//! FULL or FIRST begins a record). A CRC alone cannot tell it where that is: payloads are
//! whatever publishers sent, and a publisher can embed a well-formed fragment, checksum and all,
//! in one. The tag can: only a holder of the key can make one, and publishers never see it. So
//! with the key (`Framing::Keyed`) the reader scans forward byte by byte (cheap checks first:
//! type, length within the block, CRC, then the tag) and damage costs only the records whose
//! bytes it touched. Without it (`Framing::Unkeyed`: the key was lost, or the segment predates
//! it) the CRC still reads every intact record, but after damage the reader trusts nothing
//! before the next block boundary, where the writer put a header, as the unkeyed format did.
//!
//! The position is part of both checks, though not stored: a fragment is intact only where it
//! was written, so bytes of an old segment that a crash leaves in a new file (a filesystem may
//! expose stale blocks after power loss) are never read as records, as RocksDB's recyclable
//! logs do with their log number.
//!
//! `Framing::V1` reads the previous version (7-byte headers, CRC of type and data, no tag, no
//! position), only so that `legacy` can convert such segments.
//!
//! The body keeps its version byte so a later version can add fields; this decoder reads
//! version 1 and treats any other as damage.

use std::fmt;
use std::hash::Hasher as _;
use std::ops::Range;

use bytes::{Bytes, BytesMut};
use siphasher::sip::SipHasher24;

use crate::domain::{Captured, DEAD_LETTER_RAW_BYTES, Timestamp};

/// The largest payload any configuration may admit (`--max-payload-bytes` is validated against
/// it), so every admitted reading fits in one record.
pub const MAX_PAYLOAD_BYTES: usize = 1 << 20;
/// MQTT caps topics at 65,535 bytes; so does the body's u16 length.
const MAX_TOPIC_BYTES: usize = u16::MAX as usize;
pub const BLOCK_BYTES: usize = 32 << 10;
pub const HEADER_BYTES: usize = 15;
const V1_HEADER_BYTES: usize = 7;
const VERSION: u8 = 1;
const FIXED_BODY_BYTES: usize = 1 + 8 + 4 + 2;
/// No writer produces a larger body; a reader that assembles one is looking at damage.
pub const MAX_BODY_BYTES: usize = FIXED_BODY_BYTES + MAX_TOPIC_BYTES + MAX_PAYLOAD_BYTES;

const FULL: u8 = 1;
const FIRST: u8 = 2;
const MIDDLE: u8 = 3;
const LAST: u8 = 4;

/// A log's secret: 128 bits for SipHash-2-4. Its `Debug` shows nothing of it.
#[derive(Clone)]
pub struct Key(SipHasher24);

impl Key {
    pub fn random() -> Self {
        Self::from_bytes(rand::random())
    }

    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(SipHasher24::new_with_key(&bytes))
    }

    pub fn to_bytes(&self) -> [u8; 16] {
        self.0.key()
    }

    /// The tag of `bytes` at log position `lsn`.
    pub fn tag(&self, lsn: u64, bytes: &[u8]) -> u64 {
        let mut hasher = self.0;
        hasher.write(&lsn.to_le_bytes());
        hasher.write(bytes);
        hasher.finish()
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(..)")
    }
}

/// How a segment's fragments are checked, and where a reader resumes after damage.
#[derive(Clone, Debug)]
pub enum Framing {
    /// CRC and tag; after damage, at the next fragment whose tag verifies.
    Keyed(Key),
    /// CRC only (the key is not known for this segment); after damage, at the next block
    /// boundary.
    Unkeyed,
    /// The previous version, read only to convert it; after damage, at the next block boundary.
    V1,
}

/// What is at a position where a fragment may start.
enum Fragment {
    Intact {
        kind: u8,
        data: Range<usize>,
    },
    /// Not a fragment the writer wrote here.
    Broken,
    /// Its header says it runs past the buffer, which is not the whole segment: read more.
    Short,
}

impl Framing {
    fn header_bytes(&self) -> usize {
        match self {
            Self::V1 => V1_HEADER_BYTES,
            Self::Keyed(_) | Self::Unkeyed => HEADER_BYTES,
        }
    }

    /// Checks the fragment at `pos`, whose header is wholly in `buf`; `lsn` is the log position
    /// of `buf[0]`, a block boundary.
    fn fragment(&self, buf: &[u8], lsn: u64, pos: usize, complete: bool) -> Fragment {
        let header_bytes = self.header_bytes();
        let header = &buf[pos..pos + header_bytes];
        let (kind, len) = match self {
            Self::V1 => (header[6], u16::from_le_bytes([header[4], header[5]])),
            Self::Keyed(_) | Self::Unkeyed => {
                (header[14], u16::from_le_bytes([header[12], header[13]]))
            }
        };
        // Cheap checks first: after damage, this runs at every byte.
        let end = pos + header_bytes + usize::from(len);
        if !(FULL..=LAST).contains(&kind) || end - pos > block_left(pos as u64) {
            return Fragment::Broken;
        }
        let Some(fragment) = buf.get(pos..end) else {
            return if complete {
                Fragment::Broken
            } else {
                Fragment::Short
            };
        };
        let stored_crc = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let at = lsn + pos as u64;
        let intact = match self {
            Self::V1 => v1_crc(kind, &fragment[V1_HEADER_BYTES..]) == stored_crc,
            Self::Unkeyed => crc(at, &fragment[4..]) == stored_crc,
            Self::Keyed(key) => {
                crc(at, &fragment[4..]) == stored_crc
                    && key.tag(at, &fragment[12..]).to_le_bytes() == fragment[4..12]
            }
        };
        if intact {
            Fragment::Intact {
                kind,
                data: pos + header_bytes..end,
            }
        } else {
            Fragment::Broken
        }
    }

    /// Where to resume after the fragment at `pos` proved broken; `damaged_from` is where the
    /// damaged stretch began (`pos`, or the start of the record it broke).
    fn resync(
        &self,
        buf: &[u8],
        lsn: u64,
        pos: usize,
        damaged_from: usize,
        complete: bool,
    ) -> Scan {
        let damage = |end| Scan::Damage {
            start: damaged_from,
            end,
        };
        let Self::Keyed(_) = self else {
            // Nothing in the rest of this block can be trusted: the next header the writer
            // guarantees is at the next block boundary.
            let boundary = (pos / BLOCK_BYTES + 1) * BLOCK_BYTES;
            return damage(if complete {
                boundary.min(buf.len())
            } else {
                boundary
            });
        };
        let mut at = pos + 1;
        loop {
            let left = block_left(at as u64);
            if left < HEADER_BYTES {
                at += left;
            }
            let found = if at + HEADER_BYTES > buf.len() {
                if complete {
                    return damage(buf.len());
                }
                Fragment::Short
            } else {
                self.fragment(buf, lsn, at, complete)
            };
            match found {
                Fragment::Intact { .. } => return damage(at),
                Fragment::Broken => at += 1,
                Fragment::Short => {
                    // Everything before `at` was searched. Give back the searched blocks (a
                    // block boundary is a place to resume from in any framing) and search the
                    // rest once more is read.
                    let boundary = at - at % BLOCK_BYTES;
                    return if boundary > pos {
                        damage(boundary)
                    } else {
                        Scan::NeedMore
                    };
                }
            }
        }
    }
}

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

/// Appends `body` to `out` as fragments tagged with `key`, for bytes that will be written
/// `offset` bytes into the segment based at log position `base` (`offset` is where `out`'s end
/// lands). Returns the segment offset of the record's first fragment, which follows the zero
/// trailer of a block too full for a header.
pub fn frame(body: &[u8], key: &Key, base: u64, offset: u64, out: &mut Vec<u8>) -> u64 {
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
        let at = out.len();
        // CRC and tag are filled in once the bytes they cover are in place.
        out.extend_from_slice(&[0; 12]);
        out.extend_from_slice(&(take as u16).to_le_bytes());
        out.push(kind);
        out.extend_from_slice(data);
        let lsn = base + offset;
        let tag = key.tag(lsn, &out[at + 12..]);
        out[at + 4..at + 12].copy_from_slice(&tag.to_le_bytes());
        let crc = crc(lsn, &out[at + 4..]);
        out[at..at + 4].copy_from_slice(&crc.to_le_bytes());
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
    /// Bytes that hold no readable record. Scanning resumes at `end`: the next fragment whose tag
    /// verifies (keyed; the last block boundary searched, if the buffer ended first) or the next
    /// block boundary (unkeyed), the end of an orphan fragment, the start of the record that cut
    /// a broken one short, or the end of the buffer. Each is a place where the writer put a
    /// fragment header (or a block boundary), so a reader may resume there in either framing.
    Damage { start: usize, end: usize },
    /// The buffer ends before the next record does: scan again with more of the segment.
    NeedMore,
    /// Nothing more: the buffer (which `complete` said is the whole segment) ends here.
    End,
}

/// Scans `buf` from `at` for the next record or stretch of damage. `buf` must begin at a block
/// boundary of its segment, at log position `lsn`, and `at` must be where a record may start (a
/// record's end, a block boundary, a position a previous scan resumed at). `complete`: the
/// segment ends where `buf` does, so a record cut off by that end is damage rather than a reason
/// to read more.
pub fn scan(buf: &Bytes, lsn: u64, at: usize, complete: bool, framing: &Framing) -> Scan {
    let header_bytes = framing.header_bytes();
    let mut pos = at;
    // The record being assembled: where its first fragment starts and its fragments' data.
    let mut pending: Option<(usize, Vec<Range<usize>>)> = None;
    let mut pending_len = 0;
    loop {
        let left = block_left(pos as u64);
        if left < header_bytes {
            pos += left;
        }
        if pos + header_bytes > buf.len() {
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
        }
        let damaged_from = pending.as_ref().map_or(pos, |(start, _)| *start);
        let (kind, data) = match framing.fragment(buf, lsn, pos, complete) {
            Fragment::Intact { kind, data } => (kind, data),
            Fragment::Short => return Scan::NeedMore,
            Fragment::Broken => return framing.resync(buf, lsn, pos, damaged_from, complete),
        };
        match (kind, pending.as_mut()) {
            (FULL, None) => {
                return Scan::Record {
                    start: pos,
                    end: data.end,
                    body: buf.slice(data),
                };
            }
            (FIRST, None) => {
                pending_len = data.len();
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
                pending_len += data.len();
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

fn crc(lsn: u64, bytes: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&lsn.to_le_bytes());
    hasher.update(bytes);
    hasher.finalize()
}

fn v1_crc(kind: u8, data: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&[kind]);
    hasher.update(data);
    hasher.finalize()
}

/// The previous version's framer, for tests of its conversion.
#[cfg(test)]
pub fn frame_v1(body: &[u8], offset: u64, out: &mut Vec<u8>) -> u64 {
    let mut offset = offset;
    let mut rest = body;
    let mut start = None;
    loop {
        let left = block_left(offset);
        if left < V1_HEADER_BYTES {
            out.resize(out.len() + left, 0);
            offset += left as u64;
            continue;
        }
        let take = rest.len().min(left - V1_HEADER_BYTES);
        let kind = match (start.is_none(), take == rest.len()) {
            (true, true) => FULL,
            (true, false) => FIRST,
            (false, false) => MIDDLE,
            (false, true) => LAST,
        };
        let (data, after) = rest.split_at(take);
        out.extend_from_slice(&v1_crc(kind, data).to_le_bytes());
        out.extend_from_slice(&(take as u16).to_le_bytes());
        out.push(kind);
        out.extend_from_slice(data);
        let first = *start.get_or_insert(offset);
        offset += (V1_HEADER_BYTES + take) as u64;
        rest = after;
        if matches!(kind, FULL | LAST) {
            return first;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The log position the test buffers start at: not a block multiple, as segment bases are
    /// not.
    const BASE: u64 = 1_000_003;

    fn key() -> Key {
        Key::from_bytes(*b"sixteen byte key")
    }

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
            starts.push(frame(&body, &key(), BASE, out.len() as u64, &mut out) as usize);
        }
        (Bytes::from(out), starts)
    }

    /// Every event from the start of `buf`, as a whole segment.
    fn scan_all(buf: &Bytes, framing: &Framing) -> Vec<Scan> {
        let mut at = 0;
        let mut events = Vec::new();
        loop {
            let event = scan(buf, BASE, at, true, framing);
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

    fn damaged(events: &[Scan]) -> Vec<(usize, usize)> {
        events
            .iter()
            .filter_map(|e| match e {
                Scan::Damage { start, end } => Some((*start, *end)),
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
    fn records_span_blocks_and_fill_trailers_with_and_without_the_key() {
        // Sizes chosen to cross block boundaries, end a block in its trailer, and span several.
        let messages: Vec<Captured> = [10, 32_670, 40, 100_000, 0, 5]
            .iter()
            .map(|&n| message("sensors/t", &vec![b'a'; n]))
            .collect();
        let (buf, starts) = framed(&messages);
        for framing in [Framing::Keyed(key()), Framing::Unkeyed] {
            let events = scan_all(&buf, &framing);
            assert_eq!(records(&events), messages, "{framing:?}");
            for (event, start) in events.iter().zip(&starts) {
                assert!(matches!(event, Scan::Record { start: s, .. } if s == start));
            }
        }
        assert!(
            starts[2] % BLOCK_BYTES == 0,
            "the second record ends in a block's trailer"
        );
        // Cut anywhere, an incomplete buffer asks for more rather than inventing damage.
        for cut in (0..buf.len()).step_by(997) {
            let head = buf.slice(..cut);
            let mut at = 0;
            loop {
                match scan(&head, BASE, at, false, &Framing::Keyed(key())) {
                    Scan::Record { end, .. } => at = end,
                    Scan::NeedMore => break,
                    other => panic!("cut {cut} at {at}: {other:?}"),
                }
            }
        }
    }

    #[test]
    fn fragments_are_intact_only_under_their_key_and_at_their_position() {
        let messages = vec![message("sensors/a", b"1"), message("sensors/b", b"2")];
        let (buf, _) = framed(&messages);
        let other = Framing::Keyed(Key::from_bytes(*b"another key, too"));
        assert!(records(&scan_all(&buf, &other)).is_empty());
        // The same bytes at another position: a stale copy, not a record.
        let events = scan(&buf, BASE + BLOCK_BYTES as u64, 0, true, &Framing::Unkeyed);
        assert_eq!(
            events,
            Scan::Damage {
                start: 0,
                end: buf.len()
            }
        );
    }

    #[test]
    fn the_largest_record_holds_the_largest_payload_and_topic() {
        let topic = "t".repeat(MAX_TOPIC_BYTES);
        let m = message(&topic, &vec![b' '; MAX_PAYLOAD_BYTES]);
        assert_eq!(m.payload.len(), MAX_PAYLOAD_BYTES, "admitted whole");
        let (buf, _) = framed(std::slice::from_ref(&m));
        assert_eq!(records(&scan_all(&buf, &Framing::Keyed(key()))), vec![m]);
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

    /// Records of 3 KiB, and a 40 KiB one (the 6th) spanning the first block boundary.
    fn with_a_spanning_record() -> Vec<Captured> {
        let mut messages: Vec<Captured> = (0..30)
            .map(|n| message("sensors/t", &vec![b'a' + n as u8 % 26; 3000]))
            .collect();
        messages.insert(5, message("sensors/big", &vec![b'z'; 40_000]));
        messages
    }

    #[test]
    fn with_the_key_damage_costs_only_the_records_it_touches() {
        let messages = with_a_spanning_record();
        let (buf, starts) = framed(&messages);
        // One byte inside the 3rd record, and one inside the FIRST fragment of the big record:
        // its MIDDLE and LAST fragments in the next blocks are orphans, dropped up to the
        // record after it.
        let mut bad = buf.to_vec();
        bad[starts[2] + 100] ^= 1;
        bad[starts[5] + HEADER_BYTES + 10] ^= 1;
        let events = scan_all(&Bytes::from(bad), &Framing::Keyed(key()));
        let mut expected = messages.clone();
        expected.remove(5);
        expected.remove(2);
        assert_eq!(records(&events), expected);
        let damaged = damaged(&events);
        assert_eq!(damaged[0], (starts[2], starts[3]));
        assert_eq!(damaged[1].0, starts[5]);
        assert_eq!(damaged.last().unwrap().1, starts[6]);
    }

    #[test]
    fn without_the_key_damage_skips_to_the_next_block_and_drops_orphan_fragments() {
        let messages = with_a_spanning_record();
        let (buf, starts) = framed(&messages);
        let mut bad = buf.to_vec();
        bad[starts[5] + HEADER_BYTES + 10] ^= 1;
        let events = scan_all(&Bytes::from(bad), &Framing::Unkeyed);
        let mut expected = messages.clone();
        expected.remove(5);
        assert_eq!(records(&events), expected);
        let damaged = damaged(&events);
        assert_eq!(damaged[0], (starts[5], BLOCK_BYTES));
        assert_eq!(damaged.last().unwrap().1, starts[6]);
    }

    #[test]
    fn a_frame_forged_inside_a_payload_is_never_read() {
        // A payload holding a FULL fragment of another message, CRC and all, and even at the
        // very position it lands on (as if the publisher could know it), but with no valid tag.
        let forged = message("sensors/forged", b"{}");
        let mut body = Vec::new();
        encode_body(&forged, &mut body);
        let forge = |lsn: u64| {
            let mut fragment = vec![0; 12];
            fragment.extend_from_slice(&(body.len() as u16).to_le_bytes());
            fragment.push(FULL);
            fragment.extend_from_slice(&body);
            let crc = crc(lsn, &fragment[4..]);
            fragment[..4].copy_from_slice(&crc.to_le_bytes());
            fragment
        };
        let host = |forgery: &[u8]| {
            let mut payload = vec![b' '; 2000];
            payload.extend_from_slice(forgery);
            payload.extend_from_slice(&[b' '; 2000]);
            message("sensors/t", &payload)
        };
        // Where the forgery lands: after the first record, the host's header and body head.
        let first = message("sensors/a", b"1");
        let (one, _) = framed(std::slice::from_ref(&first));
        let lands = BASE + (one.len() + HEADER_BYTES + FIXED_BODY_BYTES + 9 + 2000) as u64;
        let messages = vec![first, host(&forge(lands)), message("sensors/b", b"2")];
        let (buf, starts) = framed(&messages);
        assert_eq!(
            buf[(lands - BASE) as usize..][..HEADER_BYTES],
            forge(lands)[..HEADER_BYTES]
        );
        // Damage the host's header: the reader must not find the forgery in its payload.
        let mut bad = buf.to_vec();
        bad[starts[1] + 13] ^= 0xff;
        let bad = Bytes::from(bad);
        // With the key the reader resumes at the record after the host; without it, at the
        // next block (here the end).
        let keyed = records(&scan_all(&bad, &Framing::Keyed(key())));
        assert_eq!(keyed, vec![messages[0].clone(), messages[2].clone()]);
        let unkeyed = records(&scan_all(&bad, &Framing::Unkeyed));
        assert_eq!(unkeyed, vec![messages[0].clone()]);
        // Without the damage, read from the forgery on (as a reader that lost its place
        // would): the keyed scan passes over it, the unkeyed one is fooled (the forgery is
        // well-formed), which is why that one resumes nowhere but at a block boundary.
        let from_forgery = |framing| {
            let mut at = (lands - BASE) as usize;
            let mut out = Vec::new();
            loop {
                match scan(&buf, BASE, at, true, &framing) {
                    Scan::Record { end, body, .. } => {
                        out.extend(decode_body(&body));
                        at = end;
                    }
                    Scan::Damage { end, .. } => at = end,
                    _ => return out,
                }
            }
        };
        assert_eq!(
            from_forgery(Framing::Keyed(key())),
            vec![messages[2].clone()]
        );
        assert_eq!(from_forgery(Framing::Unkeyed)[0], forged);
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
            for framing in [Framing::Keyed(key()), Framing::Unkeyed] {
                let events = scan_all(&head, &framing);
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

    #[test]
    fn a_search_that_runs_out_of_buffer_gives_back_whole_blocks_only() {
        // Damage at the start of a buffer that holds a block and a half of a longer segment, all
        // noise after the first record: the search gives back the block it searched, and reads
        // more before it gives back any of the next.
        let (one, _) = framed(&[message("sensors/a", b"1")]);
        let mut bytes = one.to_vec();
        bytes[20] ^= 1;
        bytes.resize(BLOCK_BYTES + BLOCK_BYTES / 2, 0x5a);
        let buf = Bytes::from(bytes);
        let framing = Framing::Keyed(key());
        assert_eq!(
            scan(&buf, BASE, 0, false, &framing),
            Scan::Damage {
                start: 0,
                end: BLOCK_BYTES
            }
        );
        assert_eq!(
            scan(&buf, BASE, BLOCK_BYTES, false, &framing),
            Scan::NeedMore
        );
        assert_eq!(
            scan(&buf, BASE, BLOCK_BYTES, true, &framing),
            Scan::Damage {
                start: BLOCK_BYTES,
                end: buf.len()
            }
        );
    }

    #[test]
    fn the_previous_version_is_read() {
        let messages = with_a_spanning_record();
        let mut out = Vec::new();
        for m in &messages {
            let mut body = Vec::new();
            encode_body(m, &mut body);
            frame_v1(&body, out.len() as u64, &mut out);
        }
        assert_eq!(
            records(&scan_all(&Bytes::from(out), &Framing::V1)),
            messages
        );
    }
}
