//! Holds the local log's framing (private to `journal::format` and `journal::segment`) to its
//! promise, through the log's public API, in two ways.
//!
//! Raw: whatever bytes a crash or a damaged disk leaves in the segment files, `Journal::open`
//! recovers without panicking and without cutting a sealed segment, and a reader gets from the
//! start of the log to its end, skipping damage, without ever stalling, and still reads intact
//! the record appended after it. The input's first byte chooses the format and where the rest is
//! cut: the head becomes a sealed segment (damage in the middle of the log), the tail the active
//! segment (a torn tail after a crash). Bit 7 set: segments of an earlier format (bit 6: the
//! second, `.wal`, else the first, `.seg`), which `open` converts; low six bits the cut. Bits 7
//! and 6 clear: segments of the current format read with the log's key (bit 5 set: with the key
//! lost, so by CRC alone); low five bits the cut.
//!
//! Damaged (bit 7 clear, bit 6 set): genuine records, then damage. The rest of the input holds
//! up to three damage specs and then the records' payloads; the records are appended, bytes of
//! the segment files are flipped, and the log is reopened and read. No record is read that was
//! not written there, and every record whose bytes (up to the next record) the damage left
//! alone is read: a damaged stretch costs nothing beyond what it touched.

#![no_main]

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::FileExt as _;
use std::path::Path;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use sensorhub::domain::{Captured, Timestamp};
use sensorhub::journal::{FsyncPolicy, Journal, JournalConfig, Record};

/// A block trailer: the zero bytes before a block boundary too close for a fragment header.
const MAX_TRAILER_BYTES: u64 = 14;
const CURRENT: &str = "wal2";

fuzz_target!(|data: &[u8]| {
    let Some((&choice, rest)) = data.split_first() else {
        return;
    };
    if choice & 0xc0 == 0x40 {
        damaged(rest);
    } else {
        raw(choice, rest);
    }
});

fn config(dir: &Path, segment_bytes: u64) -> JournalConfig {
    JournalConfig {
        dir: dir.to_owned(),
        segment_bytes,
        max_bytes: 1 << 30,
        fsync: FsyncPolicy::Never,
    }
}

fn reading(n: usize, payload: Bytes) -> Captured {
    Captured::new(
        Timestamp::from_millis(1_767_225_600_000 + n as i64).expect("in range"),
        Bytes::from_static(b"sensors/temperature"),
        payload,
        1 << 20,
    )
}

/// Reads the whole log, checking that the reader never stalls and hands out records in order.
fn read_to_end(journal: &Journal, what: &str) -> Vec<Record> {
    let end = journal.end();
    let mut reader = journal.reader();
    let mut records: Vec<Record> = Vec::new();
    while reader.position() < end {
        let before = reader.position();
        let batch = reader.read(64 * 1024).expect("read");
        for record in &batch.records {
            assert!(record.lsn < end);
            assert!(
                records.last().is_none_or(|p| record.lsn > p.lsn),
                "records out of order"
            );
        }
        assert_eq!(batch.end, reader.position());
        assert!(
            reader.position() > before || !batch.records.is_empty(),
            "the reader is stuck at {before} of {end} ({what}, corrupt bytes skipped so far {})",
            reader.corrupt_bytes()
        );
        records.extend(batch.records);
    }
    assert_eq!(reader.position(), end);
    records
}

fn raw(choice: u8, rest: &[u8]) {
    let (extension, cut_bits) = match choice >> 6 {
        0 => (CURRENT, choice & 0x1f),
        2 => ("seg", choice & 0x3f),
        _ => ("wal", choice & 0x3f),
    };
    let cut_of = if extension == CURRENT { 31 } else { 63 };
    let cut = rest.len() * usize::from(cut_bits) / cut_of;
    let (sealed, active) = rest.split_at(cut);
    let dir = tempfile::tempdir().expect("temp dir");
    if extension == CURRENT {
        // A log with a key, whose segments are then replaced by the input.
        Journal::open(config(dir.path(), 1 << 30))
            .expect("a new log opens")
            .shutdown();
        fs::remove_file(dir.path().join(format!("{:020}.{CURRENT}", 0))).expect("segment");
        if choice & 0x20 != 0 {
            fs::remove_file(dir.path().join("meta")).expect("meta");
        }
    }
    let segment = |base: usize| dir.path().join(format!("{base:020}.{extension}"));
    if !sealed.is_empty() {
        fs::write(segment(0), sealed).expect("write sealed segment");
    }
    fs::write(segment(sealed.len()), active).expect("write active segment");

    let journal = Journal::open(config(dir.path(), 1 << 30))
        .expect("the log opens whatever its segments hold");
    let recovered_end = journal.end();
    if extension == CURRENT {
        assert!(
            recovered_end >= sealed.len() as u64,
            "the sealed segment was cut"
        );
        assert!(recovered_end <= rest.len() as u64);
    } else {
        // Converted into one segment based at the old log's end.
        assert!(recovered_end >= rest.len() as u64);
        let leftovers = fs::read_dir(dir.path())
            .expect("list the log")
            .filter_map(Result::ok)
            .filter(|entry| {
                entry
                    .file_name()
                    .to_string_lossy()
                    .ends_with(&format!(".{extension}"))
            })
            .count();
        assert_eq!(
            leftovers, 0,
            "old-format segments left after the conversion"
        );
    }

    // One more record after whatever was recovered: it must come back intact.
    let appended = reading(
        0,
        Bytes::from_static(br#"{"sensor_id":"f","value":1,"timestamp":"2026-01-01"}"#),
    );
    journal
        .append(std::slice::from_ref(&appended))
        .expect("append");
    let records = read_to_end(&journal, &format!("sealed segment {} bytes", sealed.len()));
    let last = records.last().expect("the appended record was read");
    // It starts where recovery ended, or after the trailer of a block too full for it.
    assert!(last.lsn >= recovered_end && last.lsn - recovered_end <= MAX_TRAILER_BYTES);
    assert_eq!(last.message, appended);
    journal.shutdown();
}

/// A damage spec: where (a fraction of the log), how many bytes, and what they are XORed with.
struct Damage {
    at: u32,
    len: u8,
    xor: u8,
}

fn damaged(rest: &[u8]) {
    let Some((&count, rest)) = rest.split_first() else {
        return;
    };
    let count = usize::from(count % 4);
    if rest.len() < 6 * count {
        return;
    }
    let (specs, payloads) = rest.split_at(6 * count);
    let damages: Vec<Damage> = specs
        .chunks(6)
        .map(|spec| Damage {
            at: u32::from_le_bytes([spec[0], spec[1], spec[2], spec[3]]),
            len: spec[4] % 64 + 1,
            xor: spec[5] | 1,
        })
        .collect();
    // Each payload: a size byte (under 0xf0: that many bytes; above, that many times 8,000, to
    // span blocks) and its bytes, taken from the input as far as it goes.
    let mut messages = Vec::new();
    let mut input = payloads;
    while let Some((&size, after)) = input.split_first() {
        let size = match size {
            s if s < 0xf0 => usize::from(s),
            s => usize::from(s - 0xef) * 8000,
        };
        let take = size.min(after.len());
        let mut payload = after[..take].to_vec();
        payload.resize(size, b'~');
        messages.push(reading(messages.len(), Bytes::from(payload)));
        input = &after[take..];
        if messages.len() == 64 {
            break;
        }
    }
    if messages.is_empty() {
        return;
    }

    let dir = tempfile::tempdir().expect("temp dir");
    // Small segments: damage lands in sealed segments and the active one.
    let config = config(dir.path(), 64 << 10);
    let journal = Journal::open(config.clone()).expect("a new log opens");
    for batch in messages.chunks(3) {
        journal.append(batch).expect("append");
    }
    let end = journal.end();
    let written = read_to_end(&journal, "before the damage");
    assert_eq!(written.len(), messages.len());
    journal.shutdown();
    drop(journal);

    let mut segments: Vec<u64> = fs::read_dir(dir.path())
        .expect("list the log")
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            name.strip_suffix(&format!(".{CURRENT}"))?.parse().ok()
        })
        .collect();
    segments.sort_unstable();
    let mut changed = Vec::new();
    for damage in &damages {
        let from = u64::from(damage.at) % end;
        for lsn in from..(from + u64::from(damage.len)).min(end) {
            let base = *segments
                .iter()
                .rev()
                .find(|&&b| b <= lsn)
                .expect("a segment");
            let file = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(dir.path().join(format!("{base:020}.{CURRENT}")))
                .expect("open segment");
            let mut byte = [0_u8];
            file.read_exact_at(&mut byte, lsn - base).expect("read");
            byte[0] ^= damage.xor;
            file.write_all_at(&byte, lsn - base).expect("write");
            changed.push(lsn);
        }
    }

    let journal = Journal::open(config).expect("the damaged log opens");
    let back = read_to_end(&journal, "after the damage");
    let by_lsn: BTreeMap<u64, &Captured> = written.iter().map(|r| (r.lsn, &r.message)).collect();
    for record in &back {
        assert_eq!(
            by_lsn.get(&record.lsn),
            Some(&&record.message),
            "a record read at {} that was not written there",
            record.lsn
        );
    }
    let read: std::collections::BTreeSet<u64> = back.iter().map(|r| r.lsn).collect();
    for (i, record) in written.iter().enumerate() {
        let until = written.get(i + 1).map_or(end, |next| next.lsn);
        let untouched = !changed
            .iter()
            .any(|&lsn| (record.lsn..until).contains(&lsn));
        assert!(
            !untouched || read.contains(&record.lsn),
            "the record at {} was lost though no damage touched it",
            record.lsn
        );
    }
    journal.shutdown();
}
