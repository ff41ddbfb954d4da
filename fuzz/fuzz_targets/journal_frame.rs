//! Holds the local log's framing (private to `journal::format` and `journal::segment`) to its
//! promise, through the log's public API: whatever bytes a crash or a damaged disk leaves in
//! the segment files, `Journal::open` recovers without panicking and without cutting a sealed
//! segment, and a reader gets from the start of the log to its end, skipping damage, without
//! ever stalling, and still reads intact the record appended after it.
//!
//! Input: the first byte's low seven bits choose where the rest is cut; the head becomes a
//! sealed segment (damage in the middle of the log), the tail the active segment (a torn tail
//! after a crash). Its high bit writes them as segments of the first format (`.seg`) instead,
//! which `open` converts.

#![no_main]

use std::fs;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use sensorhub::domain::{Captured, Timestamp};
use sensorhub::journal::{FsyncPolicy, Journal, JournalConfig};

/// A block trailer: the zero bytes before a block boundary too close for a fragment header.
const MAX_TRAILER_BYTES: u64 = 6;

fuzz_target!(|data: &[u8]| {
    let Some((&choice, rest)) = data.split_first() else {
        return;
    };
    let legacy = choice & 0x80 != 0;
    let cut = rest.len() * usize::from(choice & 0x7f) / 127;
    let (sealed, active) = rest.split_at(cut);
    let dir = tempfile::tempdir().expect("temp dir");
    let extension = if legacy { "seg" } else { "wal" };
    let segment = |base: usize| dir.path().join(format!("{base:020}.{extension}"));
    if !sealed.is_empty() {
        fs::write(segment(0), sealed).expect("write sealed segment");
    }
    fs::write(segment(sealed.len()), active).expect("write active segment");

    let journal = Journal::open(JournalConfig {
        dir: dir.path().to_owned(),
        segment_bytes: 1 << 30,
        max_bytes: 1 << 30,
        fsync: FsyncPolicy::Never,
    })
    .expect("the log opens whatever its segments hold");
    let recovered_end = journal.end();
    if legacy {
        // Converted into one segment based at the old log's end.
        assert!(recovered_end >= rest.len() as u64);
        let leftovers = fs::read_dir(dir.path())
            .expect("list the log")
            .filter_map(Result::ok)
            .filter(|entry| entry.file_name().to_string_lossy().ends_with(".seg"))
            .count();
        assert_eq!(leftovers, 0, "first-format segments left after the conversion");
    } else {
        assert!(
            recovered_end >= sealed.len() as u64,
            "the sealed segment was cut"
        );
        assert!(recovered_end <= rest.len() as u64);
    }

    // One more record after whatever was recovered: it must come back intact.
    let appended = Captured::new(
        Timestamp::from_millis(1_767_225_600_000).expect("in range"),
        Bytes::from_static(b"sensors/temperature"),
        Bytes::from_static(br#"{"sensor_id":"f","value":1,"timestamp":"2026-01-01"}"#),
        16 * 1024,
    );
    journal
        .append(std::slice::from_ref(&appended))
        .expect("append");
    let end = journal.end();

    let mut reader = journal.reader();
    let mut last = None;
    let mut previous_lsn = None;
    while reader.position() < end {
        let before = reader.position();
        let batch = reader.read(64 * 1024).expect("read");
        for record in &batch.records {
            assert!(record.lsn < end);
            assert!(
                previous_lsn.is_none_or(|p| record.lsn > p),
                "records out of order"
            );
            previous_lsn = Some(record.lsn);
        }
        assert_eq!(batch.end, reader.position());
        assert!(
            reader.position() > before || !batch.records.is_empty(),
            "the reader is stuck at {before} of {end} (sealed segment {} bytes, corrupt bytes \
             skipped so far {})",
            sealed.len(),
            reader.corrupt_bytes()
        );
        if let Some(record) = batch.records.last() {
            last = Some(record.clone());
        }
    }
    assert_eq!(reader.position(), end);
    let last = last.expect("the appended record was read");
    // It starts where recovery ended, or after the trailer of a block too full for it.
    assert!(last.lsn >= recovered_end && last.lsn - recovered_end <= MAX_TRAILER_BYTES);
    assert_eq!(last.message, appended);
    journal.shutdown();
});
