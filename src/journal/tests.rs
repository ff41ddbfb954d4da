use std::collections::BTreeSet;
use std::os::unix::fs::FileExt as _;

use bytes::Bytes;
use rand::{Rng as _, SeedableRng as _};

use super::format::BLOCK_BYTES;
use super::*;
use crate::domain::Timestamp;

/// Test-only control of the syncer: hold it, or make its next sync fail as a failing disk would.
#[derive(Debug, Default)]
pub(super) struct Hooks {
    fail_next: AtomicBool,
    held: Mutex<bool>,
    released: Condvar,
    /// Sealed segments synced so far.
    pub(super) sealed_synced: AtomicU64,
}

impl Hooks {
    pub(super) fn before_sync(&self) -> io::Result<()> {
        let mut held = lock(&self.held);
        while *held {
            held = self
                .released
                .wait(held)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        if self.fail_next.swap(false, Ordering::AcqRel) {
            return Err(io::Error::other("injected fdatasync failure"));
        }
        Ok(())
    }

    fn hold(&self, held: bool) {
        *lock(&self.held) = held;
        self.released.notify_all();
    }
}

fn config(dir: &Path) -> JournalConfig {
    JournalConfig {
        dir: dir.to_path_buf(),
        segment_bytes: 4096,
        max_bytes: 1 << 20,
        fsync: FsyncPolicy::Never,
    }
}

fn message(n: usize) -> Captured {
    Captured::new(
        Timestamp::from_millis(1_700_000_000_000 + n as i64).unwrap(),
        Bytes::from_static(b"sensors/temperature"),
        Bytes::from(format!(
            r#"{{"sensor_id":"s{n}","value":{n},"timestamp":"2024-01-01"}}"#
        )),
        16 * 1024,
    )
}

/// Mostly ordinary readings; every 10th one 5 KB, every 50th one 100 KB (spanning blocks).
fn mixed(n: usize) -> Captured {
    let pad = match n {
        n if n % 50 == 7 => 100_000,
        n if n % 10 == 3 => 5_000,
        n => n % 90,
    };
    Captured::new(
        Timestamp::from_millis(1_700_000_000_000 + n as i64).unwrap(),
        Bytes::from_static(b"sensors/temperature"),
        Bytes::from(format!(
            r#"{{"sensor_id":"s{n}","value":{n},"timestamp":"2024-01-01","pad":"{}"}}"#,
            "x".repeat(pad)
        )),
        MAX_PAYLOAD_BYTES,
    )
}

fn read_records(reader: &mut JournalReader, max_bytes: usize) -> Vec<Record> {
    let mut out = Vec::new();
    while reader.position() < reader.journal.end() {
        let batch = reader.read(max_bytes).unwrap();
        assert_eq!(batch.end, reader.position());
        out.extend(batch.records);
    }
    out
}

fn read_all(reader: &mut JournalReader) -> Vec<Captured> {
    read_records(reader, 1000)
        .into_iter()
        .map(|r| r.message)
        .collect()
}

/// A log holding 200 messages over several segments, appended five at a time.
fn spread_over_segments() -> (tempfile::TempDir, Journal, Vec<Captured>) {
    let dir = tempfile::tempdir().unwrap();
    let journal = Journal::open(config(dir.path())).unwrap();
    let written: Vec<Captured> = (0..200).map(message).collect();
    for chunk in written.chunks(5) {
        journal.append(chunk).unwrap();
    }
    (dir, journal, written)
}

fn first_segment(dir: &Path) -> PathBuf {
    segment_path(dir, list_segments(dir, EXTENSION).unwrap()[0])
}

/// The key `dir`'s meta holds.
fn key_of(dir: &Path) -> Key {
    meta::read(dir).key.expect("the log has a key").0
}

/// Each record's extent (LSN of its first byte, LSN past its last), from a scan of a clean log.
fn record_extents(journal: &Journal) -> Vec<(u64, u64)> {
    let dir = &journal.shared.config.dir;
    let mut out = Vec::new();
    for base in list_segments(dir, EXTENSION).unwrap() {
        let file = File::open(segment_path(dir, base)).unwrap();
        let len = file.metadata().unwrap().len();
        let mut scan = SegmentScan::new(file, base, len, 1 << 20, journal.shared.framing(base));
        let mut at = 0;
        loop {
            match scan.next(at).unwrap() {
                Event::Record { start, end, .. } => {
                    out.push((base + start, base + end));
                    at = end;
                }
                Event::Damage { start, .. } => panic!("a clean log is damaged at {start}"),
                Event::End => break,
            }
        }
    }
    out
}

/// Overwrites the 64 bytes from `lsn` with random ones, each unlike the byte it replaces (so
/// that the bytes overlapped are the bytes changed).
fn overwrite_64(dir: &Path, lsn: u64, seed: u64) {
    let bases = list_segments(dir, EXTENSION).unwrap();
    let base = *bases.iter().rev().find(|&&b| b <= lsn).unwrap();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(segment_path(dir, base))
        .unwrap();
    assert!(lsn - base + 64 <= file.metadata().unwrap().len());
    let mut bytes = [0_u8; 64];
    file.read_exact_at(&mut bytes, lsn - base).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for byte in &mut bytes {
        *byte ^= rng.random_range(1..=u8::MAX);
    }
    file.write_all_at(&bytes, lsn - base).unwrap();
}

/// Where 64 bytes overlap the last 20 bytes of an ordinary reading and the head of the next
/// one: the first such pair at or after `near`. (Most of a mixed log's bytes are in its large
/// records, so an arbitrary position mostly hits one of those.)
fn between_small(extents: &[(u64, u64)], near: u64) -> u64 {
    let small = |i: usize| extents[i].1 - extents[i].0 < 1000;
    let i = (0..extents.len() - 1)
        .find(|&i| extents[i].0 >= near && small(i) && small(i + 1))
        .expect("ordinary readings after the position");
    extents[i].1 - 20
}

/// The block boundaries among ordinary readings: inside one (its FIRST and LAST fragments on
/// either side) or between two.
fn small_boundaries(extents: &[(u64, u64)], bases: &[u64]) -> Vec<u64> {
    let small = |i: usize| extents[i].1 - extents[i].0 < 1000;
    (1..extents.len() - 1)
        .filter(|&i| small(i - 1) && small(i) && small(i + 1))
        .filter_map(|i| {
            let (start, end) = extents[i];
            let base = *bases.iter().rev().find(|&&b| b <= start).unwrap();
            let boundary = base + (start - base).next_multiple_of(BLOCK_BYTES as u64);
            (base < boundary && boundary < end).then_some(boundary)
        })
        .collect()
}

/// How a reader resumes after damage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Resync {
    /// At the next fragment whose tag verifies: the damage costs the records it overlaps.
    Tagged,
    /// At the next block boundary (no key): it costs every record with a byte between the
    /// first damaged byte and the end of the block the last one is in.
    Block,
}

/// What 64 damaged bytes at `lsn` cost, by record index.
fn lost(extents: &[(u64, u64)], bases: &[u64], lsn: u64, resync: Resync) -> BTreeSet<usize> {
    let last = lsn + 63;
    let to = match resync {
        Resync::Tagged => last + 1,
        Resync::Block => {
            let base = *bases.iter().rev().find(|&&b| b <= last).unwrap();
            base + ((last - base) / BLOCK_BYTES as u64 + 1) * BLOCK_BYTES as u64
        }
    };
    extents
        .iter()
        .enumerate()
        .filter(|(_, (start, end))| *end > lsn && *start < to)
        .map(|(i, _)| i)
        .collect()
}

/// What `damage_and_check` does between the damage and the reading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Then {
    /// Read with the log as it is (damage in sealed segments, or found by a live reader).
    Read,
    /// Reopen first: recovery of the active segment must keep what follows the damage.
    Reopen,
    /// Reopen with the key gone from the meta (which keeps the id): what was written before
    /// is read by CRC alone.
    ReopenWithoutKey,
}

/// Damages `journal`'s log at each of `at` (64 bytes each, far apart), does `then`, reads it
/// all, and checks that exactly the records the damage cost are missing, and their bytes
/// counted.
// What the damage cost is printed for the test log, as the integration tests do.
#[allow(clippy::print_stderr)]
fn damage_and_check(journal: Journal, written: &[Captured], at: &[u64], then: Then, case: &str) {
    let dir = journal.shared.config.dir.clone();
    let extents = record_extents(&journal);
    assert_eq!(extents.len(), written.len());
    let bases = list_segments(&dir, EXTENSION).unwrap();
    let resync = if then == Then::ReopenWithoutKey {
        Resync::Block
    } else {
        Resync::Tagged
    };
    let (mut touched, mut lost_all) = (BTreeSet::new(), BTreeSet::new());
    // Each damage costs a contiguous run of records; what it counts as corrupt lies within
    // that run, plus the trailer of its block.
    let mut bound = 0;
    for (seed, &lsn) in at.iter().enumerate() {
        overwrite_64(&dir, lsn, seed as u64);
        let l = lost(&extents, &bases, lsn, resync);
        let first = l.iter().map(|&i| extents[i].0).min().unwrap();
        let last = l.iter().map(|&i| extents[i].1).max().unwrap();
        bound += last - first + format::HEADER_BYTES as u64;
        touched.extend(lost(&extents, &bases, lsn, Resync::Tagged));
        lost_all.extend(l);
    }
    let end = journal.end();
    let journal = if then == Then::Read {
        journal
    } else {
        let (id, segments) = (journal.log_id().to_owned(), journal.segment_count());
        journal.shutdown();
        drop(journal);
        if then == Then::ReopenWithoutKey {
            fs::write(dir.join("meta"), format!("{id}\n")).unwrap();
        }
        let journal = Journal::open(journal_config_of(&dir)).unwrap();
        assert_eq!(
            journal.end(),
            end,
            "recovery cut intact records after the damage"
        );
        assert_eq!(journal.log_id(), id);
        if then == Then::ReopenWithoutKey {
            assert_eq!(
                journal.segment_count(),
                segments + 1,
                "new records go to a segment of their own, under a new key"
            );
            let (_, keyed_from) = meta::read(&dir).key.unwrap();
            assert_eq!(keyed_from, end);
        }
        journal
    };
    let mut reader = journal.reader();
    let back = read_records(&mut reader, 64 * 1024);
    let expected: Vec<(u64, &Captured)> = extents
        .iter()
        .zip(written)
        .enumerate()
        .filter(|(i, _)| !lost_all.contains(i))
        .map(|(_, ((start, _), message))| (*start, message))
        .collect();
    let got: Vec<(u64, &Captured)> = back.iter().map(|r| (r.lsn, &r.message)).collect();
    assert_eq!(
        got.len(),
        expected.len(),
        "{case}: records read back ({} lost, {} expected lost)",
        written.len() - got.len(),
        lost_all.len()
    );
    assert!(
        got == expected,
        "{case}: another record than the damaged ones went missing"
    );
    // Every damaged byte is counted, but those that fell in a block trailer.
    let trailers = (format::HEADER_BYTES as u64 - 1) * at.len() as u64;
    assert!(reader.corrupt_bytes() >= 64 * at.len() as u64 - trailers);
    assert!(
        reader.corrupt_bytes() <= bound,
        "{case}: {} corrupt bytes counted, the lost records span {bound}",
        reader.corrupt_bytes()
    );
    eprintln!(
        "{case}: {} x 64 bytes damaged in {} records; they overlap {}; {} lost; {} corrupt \
         bytes counted",
        at.len(),
        written.len(),
        touched.len(),
        lost_all.len(),
        reader.corrupt_bytes()
    );
    journal.shutdown();
}

/// The settings `damaged_log` opened with, for the reopen.
fn journal_config_of(dir: &Path) -> JournalConfig {
    JournalConfig {
        segment_bytes: 512 << 10,
        max_bytes: 1 << 30,
        ..config(dir)
    }
}

/// Appends `n` mixed records from record number `from` on, five at a time, then ordinary
/// readings: three blocks of them at least, and until the active segment holds six blocks.
fn fill(journal: &Journal, from: usize, n: usize) -> Vec<Captured> {
    let mut written: Vec<Captured> = (from..from + n).map(mixed).collect();
    for chunk in written.chunks(5) {
        journal.append(chunk).unwrap();
    }
    let active_len = |journal: &Journal| journal.end() - lock(&journal.shared.tail).base();
    let mixed_end = journal.end();
    while journal.end() - mixed_end < 3 * BLOCK_BYTES as u64
        || active_len(journal) < 6 * BLOCK_BYTES as u64
    {
        let next = from + written.len();
        let more: Vec<Captured> = (next..next + 5).map(message).collect();
        journal.append(&more).unwrap();
        written.extend(more);
    }
    written
}

/// A log of 3,000 mixed records in segments of 512 KiB, then ordinary readings (`fill`).
fn damaged_log() -> (tempfile::TempDir, Journal, Vec<Captured>) {
    let dir = tempfile::tempdir().unwrap();
    let journal = Journal::open(journal_config_of(dir.path())).unwrap();
    let written = fill(&journal, 0, 3000);
    assert!(journal.segment_count() >= 4);
    (dir, journal, written)
}

#[test]
fn reads_back_what_was_appended_across_segments() {
    let dir = tempfile::tempdir().unwrap();
    let journal = Journal::open(config(dir.path())).unwrap();
    let written: Vec<Captured> = (0..500).map(message).collect();
    for chunk in written.chunks(7) {
        journal.append(chunk).unwrap();
    }
    assert!(journal.segment_count() > 5, "small segments must roll");
    let mut reader = journal.reader();
    assert_eq!(read_all(&mut reader), written);
    assert_eq!(reader.position(), journal.end());
    assert_eq!(reader.corrupt_bytes(), 0, "a healthy log has no damage");
}

#[test]
fn a_reading_at_the_payload_limit_with_the_longest_topic_is_read_whole() {
    // Larger than a reader's batch (the writer reads 512 KiB at a time) and than the old
    // format's 1 MiB body limit.
    let dir = tempfile::tempdir().unwrap();
    let journal = Journal::open(JournalConfig {
        segment_bytes: 32 << 20,
        max_bytes: 64 << 20,
        ..config(dir.path())
    })
    .unwrap();
    let largest = Captured::new(
        Timestamp::from_millis(1_700_000_000_000).unwrap(),
        Bytes::from(format!("sensors/{}", "t".repeat(usize::from(u16::MAX) - 8))),
        Bytes::from(vec![b' '; MAX_PAYLOAD_BYTES]),
        MAX_PAYLOAD_BYTES,
    );
    assert_eq!(largest.topic.len(), usize::from(u16::MAX));
    let written = vec![message(1), largest.clone(), message(2), largest, message(3)];
    journal.append(&written[..2]).unwrap();
    journal.append(&written[2..]).unwrap();
    let mut reader = journal.reader();
    let back = read_records(&mut reader, 512 << 10);
    assert_eq!(
        back.into_iter().map(|r| r.message).collect::<Vec<_>>(),
        written
    );
    assert_eq!(reader.corrupt_bytes(), 0);
}

#[test]
fn checkpoint_deletes_stored_segments_and_restart_resumes_there() {
    let dir = tempfile::tempdir().unwrap();
    let written: Vec<Captured> = (0..300).map(message).collect();
    let resume_at;
    {
        let journal = Journal::open(config(dir.path())).unwrap();
        for chunk in written.chunks(10) {
            journal.append(chunk).unwrap();
        }
        let mut reader = journal.reader();
        let batch = reader.read(6000).unwrap();
        resume_at = batch.records.len();
        journal.mark_stored(batch.end);
        let before = journal.segment_count();
        journal.checkpoint().unwrap();
        assert!(journal.segment_count() < before);
        journal.shutdown();
    }
    let journal = Journal::open(config(dir.path())).unwrap();
    let mut reader = journal.reader();
    assert_eq!(read_all(&mut reader), written[resume_at..].to_vec());
}

#[test]
fn a_torn_tail_is_cut_and_appends_continue_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = JournalConfig {
        segment_bytes: 1 << 20,
        ..config(dir.path())
    };
    // A short record, and one spanning three blocks, each torn at several places: in its
    // header, in its first fragment, halfway, one byte short.
    let mut torn_cases = 0;
    for torn in [message(3), mixed(7)] {
        let mut body = Vec::new();
        format::encode_body(&torn, &mut body);
        for cut in [3, format::HEADER_BYTES + 10, body.len() / 2, usize::MAX] {
            let written = {
                let journal = Journal::open(config.clone()).unwrap();
                journal.append(&[message(1), message(2)]).unwrap();
                journal.shutdown();
                let mut reader = journal.reader();
                read_all(&mut reader)
            };
            let last = list_segments(dir.path(), EXTENSION).unwrap().pop().unwrap();
            let path = segment_path(dir.path(), last);
            let len = fs::metadata(&path).unwrap().len();
            let mut framed = Vec::new();
            format::frame(&body, &key_of(dir.path()), last, len, &mut framed);
            framed.truncate(cut.min(framed.len() - 1));
            OpenOptions::new()
                .append(true)
                .open(&path)
                .unwrap()
                .write_all(&framed)
                .unwrap();
            let journal = Journal::open(config.clone()).unwrap();
            assert_eq!(journal.end(), last + len, "only the torn record is cut");
            journal.append(&[message(4)]).unwrap();
            let mut reader = journal.reader();
            let mut expected = written.clone();
            expected.push(message(4));
            assert_eq!(read_all(&mut reader), expected, "torn at {cut}");
            assert_eq!(reader.corrupt_bytes(), 0);
            journal.mark_stored(journal.end());
            journal.checkpoint().unwrap();
            journal.shutdown();
            torn_cases += 1;
        }
    }
    assert_eq!(torn_cases, 8);
}

#[test]
fn damage_in_the_middle_of_a_sealed_segment_costs_only_the_records_it_touches() {
    let (dir, journal, written) = damaged_log();
    let bases = list_segments(dir.path(), EXTENSION).unwrap();
    let extents = record_extents(&journal);
    // Inside blocks, several blocks apart, in the first (sealed) segment and the next: where
    // they fall, and across two ordinary readings.
    let block = |segment: usize, n: u64| bases[segment] + n * BLOCK_BYTES as u64;
    let at = [
        block(0, 3) + 1000,
        block(0, 7) + 20_001,
        block(0, 12) + 333,
        block(1, 5) + 12_345,
        between_small(&extents, block(0, 2)),
        between_small(&extents, block(0, 9) + 5000),
        between_small(&extents, block(1, 1)),
    ];
    damage_and_check(journal, &written, &at, Then::Read, "sealed, mid-block");
}

#[test]
fn damage_in_the_middle_of_the_active_segment_survives_recovery() {
    let (dir, journal, written) = damaged_log();
    let active = *list_segments(dir.path(), EXTENSION)
        .unwrap()
        .last()
        .unwrap();
    let len = journal.end() - active;
    assert!(
        len > 4 * BLOCK_BYTES as u64,
        "the active segment is long enough to damage"
    );
    let extents = record_extents(&journal);
    let at = [
        active + BLOCK_BYTES as u64 + 777,
        active + len / 2,
        between_small(&extents, active + 3 * BLOCK_BYTES as u64),
    ];
    damage_and_check(journal, &written, &at, Then::Reopen, "active, mid-block");
}

#[test]
fn damage_across_block_boundaries_costs_only_the_records_it_touches() {
    let (dir, journal, written) = damaged_log();
    let bases = list_segments(dir.path(), EXTENSION).unwrap();
    let extents = record_extents(&journal);
    let boundary = |base: u64, block: u64| base + block * BLOCK_BYTES as u64 - 32;
    let small = small_boundaries(&extents, &bases);
    // Where they fall, and where ordinary readings meet at a boundary.
    let at = [
        boundary(bases[0], 4),
        boundary(bases[0], 9),
        bases[1] + 2 * BLOCK_BYTES as u64,
        small[0] - 32,
        small[small.len() / 3] - 32,
        small[small.len() / 2] - 40,
    ];
    damage_and_check(
        journal,
        &written,
        &at,
        Then::Read,
        "sealed, block boundaries",
    );
    let (dir, journal, written) = damaged_log();
    let bases = list_segments(dir.path(), EXTENSION).unwrap();
    let extents = record_extents(&journal);
    let active = *bases.last().unwrap();
    let at = [
        boundary(active, 2),
        *small_boundaries(&extents, &bases)
            .iter()
            .find(|&&b| b > active + 3 * BLOCK_BYTES as u64)
            .unwrap()
            - 32,
    ];
    damage_and_check(
        journal,
        &written,
        &at,
        Then::Reopen,
        "active, block boundary",
    );
}

#[test]
fn damage_inside_a_record_spanning_blocks_costs_that_record_alone() {
    let (dir, journal, written) = damaged_log();
    let extents = record_extents(&journal);
    // The 100 KB records each span four blocks: damage the middle of each of a few, and the
    // first block boundary inside one (its FIRST fragment's end and its first MIDDLE's header).
    let big: Vec<usize> = (0..written.len())
        .filter(|&i| extents[i].1 - extents[i].0 > 3 * BLOCK_BYTES as u64)
        .collect();
    assert_eq!(big.len(), 60);
    let mut at: Vec<u64> = big
        .iter()
        .step_by(9)
        .map(|&i| (extents[i].0 + extents[i].1) / 2)
        .collect();
    let bases = list_segments(dir.path(), EXTENSION).unwrap();
    let (start, _) = extents[big[4]];
    let base = *bases.iter().rev().find(|&&b| b <= start).unwrap();
    at.push(base + (start - base + 1).next_multiple_of(BLOCK_BYTES as u64) - 20);
    for &lsn in &at {
        let lost = lost(&extents, &bases, lsn, Resync::Tagged);
        assert_eq!(lost.len(), 1, "the damage lies inside one record");
    }
    damage_and_check(
        journal,
        &written,
        &at,
        Then::Read,
        "inside spanning records",
    );
}

#[test]
fn a_log_whose_key_is_lost_is_read_and_resyncs_at_block_boundaries() {
    let (dir, journal, written) = damaged_log();
    let bases = list_segments(dir.path(), EXTENSION).unwrap();
    let active = *bases.last().unwrap();
    let extents = record_extents(&journal);
    let at = [
        bases[0] + 3 * BLOCK_BYTES as u64 + 1000,
        bases[1] + 5 * BLOCK_BYTES as u64 + 12_345,
        between_small(&extents, bases[0] + 9 * BLOCK_BYTES as u64),
        active + BLOCK_BYTES as u64 + 777,
    ];
    damage_and_check(journal, &written, &at, Then::ReopenWithoutKey, "key lost");
    // The new key tags what is written from then on: damage there costs only what it touches.
    let journal = Journal::open(journal_config_of(dir.path())).unwrap();
    let end = journal.end();
    journal.mark_stored(end);
    journal.checkpoint().unwrap();
    assert_eq!(
        journal.segment_count(),
        1,
        "only the new key's segment is left"
    );
    let written = fill(&journal, 10_000, 600);
    let bases = list_segments(dir.path(), EXTENSION).unwrap();
    let active = *bases.last().unwrap();
    let extents = record_extents(&journal);
    let at = [
        bases[0] + 2 * BLOCK_BYTES as u64 + 500,
        between_small(&extents, bases[0] + 4 * BLOCK_BYTES as u64),
        active + BLOCK_BYTES as u64 + 300,
    ];
    damage_and_check(journal, &written, &at, Then::Reopen, "under a new key");
}

#[test]
fn a_meta_from_another_log_cuts_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let other = tempfile::tempdir().unwrap();
    Journal::open(config(other.path())).unwrap().shutdown();
    let written: Vec<Captured> = (0..50).map(message).collect();
    let journal = Journal::open(config(dir.path())).unwrap();
    journal.append(&written).unwrap();
    let end = journal.end();
    journal.shutdown();
    drop(journal);
    let own = fs::read(dir.path().join("meta")).unwrap();
    // Under another log's key every fragment looks damaged: skipped, but kept on disk.
    fs::copy(other.path().join("meta"), dir.path().join("meta")).unwrap();
    let journal = Journal::open(config(dir.path())).unwrap();
    assert_eq!(journal.end(), end, "recovery cut records a CRC still reads");
    let mut reader = journal.reader();
    assert!(read_all(&mut reader).is_empty());
    assert_eq!(reader.corrupt_bytes(), end);
    journal.shutdown();
    drop(journal);
    fs::write(dir.path().join("meta"), own).unwrap();
    let journal = Journal::open(config(dir.path())).unwrap();
    assert_eq!(read_all(&mut journal.reader()), written);
}

/// A FULL fragment of `body` as a publisher could forge it for log position `lsn`: the CRC
/// right, but not the tag, which takes the key.
fn forge(lsn: u64, body: &[u8]) -> Vec<u8> {
    let mut fragment = vec![0; 12];
    fragment.extend_from_slice(&(body.len() as u16).to_le_bytes());
    fragment.push(1);
    fragment.extend_from_slice(body);
    let mut crc = crc32fast::Hasher::new();
    crc.update(&lsn.to_le_bytes());
    crc.update(&fragment[4..]);
    fragment[..4].copy_from_slice(&crc.finalize().to_le_bytes());
    fragment
}

#[test]
fn a_fragment_forged_in_a_payload_is_never_read_after_damage() {
    let dir = tempfile::tempdir().unwrap();
    let config = JournalConfig {
        segment_bytes: 1 << 20,
        ..config(dir.path())
    };
    let journal = Journal::open(config.clone()).unwrap();
    journal.append(&[message(1)]).unwrap();
    // The next reading's payload holds, 100 bytes in, a fragment forged for the very position
    // it lands on.
    let host_lsn = journal.end();
    let topic = Bytes::from_static(b"sensors/temperature");
    let lands = host_lsn + (format::HEADER_BYTES + 15 + topic.len() + 100) as u64;
    let forged = message(666);
    let mut body = Vec::new();
    format::encode_body(&forged, &mut body);
    let mut payload = vec![b' '; 100];
    payload.extend_from_slice(&forge(lands, &body));
    payload.extend_from_slice(&[b' '; 100]);
    let host = Captured::new(
        Timestamp::from_millis(1_700_000_000_000).unwrap(),
        topic,
        Bytes::from(payload),
        16 * 1024,
    );
    journal.append(&[host, message(2), message(3)]).unwrap();
    let segment = first_segment(dir.path());
    let len = fs::metadata(&segment).unwrap().len();
    // A control: read from where it lands without the key, the forgery is a record.
    let mut scan = SegmentScan::new(
        File::open(&segment).unwrap(),
        0,
        len,
        1 << 20,
        Framing::Unkeyed,
    );
    let Event::Record { body, .. } = scan.next(lands).unwrap() else {
        panic!("the forgery is not well-formed");
    };
    assert_eq!(format::decode_body(&body), Some(forged.clone()));

    // Damage the host's length: the reader searches its payload for the next record.
    let file = OpenOptions::new().write(true).open(&segment).unwrap();
    file.write_all_at(&[0xff], host_lsn + 12).unwrap();
    let mut reader = journal.reader();
    let back = read_all(&mut reader);
    assert_eq!(back, vec![message(1), message(2), message(3)]);
    // Without the key, the reader resumes at the next block boundary (here the end), which
    // is never inside a payload.
    let id = journal.log_id().to_owned();
    journal.shutdown();
    drop(journal);
    fs::write(dir.path().join("meta"), format!("{id}\n")).unwrap();
    let journal = Journal::open(config).unwrap();
    let back = read_all(&mut journal.reader());
    assert_eq!(back, vec![message(1)]);
    assert!(!back.contains(&forged));
}

#[test]
fn a_batch_end_after_damage_is_a_place_to_resume_from() {
    let (dir, journal, written) = damaged_log();
    let bases = list_segments(dir.path(), EXTENSION).unwrap();
    overwrite_64(dir.path(), bases[0] + 3 * BLOCK_BYTES as u64 + 1000, 1);
    let mut reader = journal.reader();
    let mut first = Vec::new();
    while reader.corrupt_bytes() == 0 {
        first.extend(reader.read(16 << 10).unwrap().records);
    }
    let resume = reader.position();
    let rest_in_place = read_records(&mut reader, 16 << 10);
    journal.mark_stored(resume);
    journal.checkpoint().unwrap();
    journal.shutdown();
    drop(journal);
    let journal = Journal::open(journal_config_of(dir.path())).unwrap();
    let mut reader = journal.reader();
    assert_eq!(reader.position(), resume);
    assert_eq!(read_records(&mut reader, 16 << 10), rest_in_place);
    assert!(first.len() + rest_in_place.len() < written.len());
}

#[test]
fn a_body_of_an_unknown_version_is_damage_and_the_next_record_is_read() {
    let dir = tempfile::tempdir().unwrap();
    {
        let journal = Journal::open(config(dir.path())).unwrap();
        journal.append(&[message(1)]).unwrap();
        journal.shutdown();
    }
    let path = first_segment(dir.path());
    let len = fs::metadata(&path).unwrap().len();
    let mut body = Vec::new();
    format::encode_body(&message(2), &mut body);
    body[0] = 2;
    let mut framed = Vec::new();
    format::frame(&body, &key_of(dir.path()), 0, len, &mut framed);
    OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap()
        .write_all(&framed)
        .unwrap();
    let journal = Journal::open(config(dir.path())).unwrap();
    assert_eq!(
        journal.end(),
        len + framed.len() as u64,
        "intact frames are kept"
    );
    journal.append(&[message(3)]).unwrap();
    let mut reader = journal.reader();
    assert_eq!(read_all(&mut reader), vec![message(1), message(3)]);
    assert_eq!(reader.corrupt_bytes(), framed.len() as u64);
}

#[test]
fn a_truncated_sealed_segment_is_skipped_not_waited_on() {
    // Found by the journal_frame fuzz target: the reader used to wait forever for the rest.
    let (dir, journal, written) = spread_over_segments();
    // Cut the first sealed segment inside a record: its tail frame can never complete.
    let path = first_segment(dir.path());
    let len = fs::metadata(&path).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len - 10)
        .unwrap();
    let mut reader = journal.reader();
    let back = read_all(&mut reader);
    assert!(reader.corrupt_bytes() > 0);
    assert_eq!(back.len(), written.len() - 1, "only the cut record is lost");
    assert_eq!(back.last(), written.last());
}

#[test]
fn refuses_when_full_until_the_writer_catches_up() {
    let dir = tempfile::tempdir().unwrap();
    let journal = Journal::open(JournalConfig {
        max_bytes: 1000,
        ..config(dir.path())
    })
    .unwrap();
    let mut accepted = 0;
    let refusal = loop {
        match journal.append(&[message(accepted)]) {
            Ok(()) => accepted += 1,
            Err(e) => break e,
        }
    };
    assert!(matches!(refusal, AppendError::Full { .. }), "{refusal}");
    assert!(accepted > 3);
    journal.mark_stored(journal.end());
    journal.append(&[message(999)]).unwrap();
}

#[test]
fn close_refuses_appends_and_reports_the_final_end() {
    let dir = tempfile::tempdir().unwrap();
    let journal = Journal::open(config(dir.path())).unwrap();
    journal.append(&[message(1)]).unwrap();
    let end = journal.close();
    assert_eq!(end, journal.end());
    assert!(matches!(
        journal.append(&[message(2)]),
        Err(AppendError::Closed)
    ));
}

#[test]
fn always_policy_appends_return_after_a_sync() {
    let dir = tempfile::tempdir().unwrap();
    let journal = Journal::open(JournalConfig {
        fsync: FsyncPolicy::Always,
        ..config(dir.path())
    })
    .unwrap();
    for n in 0..20 {
        journal.append(&[message(n)]).unwrap();
        assert!(*lock(&journal.shared.sync.durable) >= journal.end());
    }
    journal.shutdown();
}

#[test]
fn a_failed_sync_fails_waiting_appends_and_refuses_later_ones() {
    let dir = tempfile::tempdir().unwrap();
    let journal = Journal::open(JournalConfig {
        fsync: FsyncPolicy::Always,
        ..config(dir.path())
    })
    .unwrap();
    journal.append(&[message(1)]).unwrap();
    assert_eq!(journal.failure(), None);
    journal
        .shared
        .hooks
        .fail_next
        .store(true, Ordering::Release);
    let waited = journal.append(&[message(2)]);
    assert!(matches!(waited, Err(AppendError::Failed(_))), "{waited:?}");
    let reason = journal.failure().expect("the failure is exposed");
    assert!(reason.contains("injected"), "{reason}");
    // Not retried quietly: the log stays failed, later appends are refused unwritten.
    let end = journal.end();
    let refused = journal.append(&[message(3)]);
    assert!(
        matches!(refused, Err(AppendError::Failed(_))),
        "{refused:?}"
    );
    assert_eq!(journal.end(), end);
    journal.shutdown();
}

#[tokio::test]
async fn a_failed_periodic_sync_is_announced() {
    let dir = tempfile::tempdir().unwrap();
    let journal = Journal::open(JournalConfig {
        fsync: FsyncPolicy::Periodic(Duration::from_millis(5)),
        ..config(dir.path())
    })
    .unwrap();
    journal.append(&[message(1)]).unwrap();
    let failed = {
        let journal = journal.clone();
        tokio::spawn(async move { journal.failed().await })
    };
    journal
        .shared
        .hooks
        .fail_next
        .store(true, Ordering::Release);
    journal.append(&[message(2)]).unwrap();
    let reason = tokio::time::timeout(Duration::from_secs(30), failed)
        .await
        .expect("the failure is announced")
        .unwrap();
    assert!(reason.contains("fdatasync"), "{reason}");
    assert!(matches!(
        journal.append(&[message(3)]),
        Err(AppendError::Failed(_))
    ));
    journal.shutdown();
}

#[test]
fn always_appends_wait_for_their_sealed_segments_but_not_under_the_tail_lock() {
    let dir = tempfile::tempdir().unwrap();
    let journal = Journal::open(JournalConfig {
        fsync: FsyncPolicy::Always,
        ..config(dir.path())
    })
    .unwrap();
    journal.append(&[message(0)]).unwrap();
    let first_end = journal.end();
    // A disk that does not finish syncing: the syncer is held.
    journal.shared.hooks.hold(true);
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let appender = {
        let journal = journal.clone();
        std::thread::spawn(move || {
            // Enough to roll the 4 KiB segment several times.
            for n in 1..400 {
                journal.append(&[message(n)]).unwrap();
                let _ = done_tx.send(n);
            }
        })
    };
    // The deadline only catches a deadlock; it measures nothing.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while journal.end() == first_end {
        assert!(
            std::time::Instant::now() < deadline,
            "the append never wrote"
        );
        std::thread::yield_now();
    }
    // The appender waits for its sync, but not under the tail lock: what else takes it (the
    // metrics, a reader) goes on.
    assert_eq!(journal.segment_count(), 1);
    let mut reader = journal.reader();
    assert_eq!(reader.read(1 << 20).unwrap().records.len(), 2);
    assert!(
        done_rx.try_recv().is_err(),
        "an Always append returned unsynced"
    );
    journal.shared.hooks.hold(false);
    appender.join().unwrap();
    let sealed = journal.segment_count() - 1;
    assert!(sealed >= 5);
    assert!(
        journal.shared.hooks.sealed_synced.load(Ordering::Acquire) as usize >= sealed,
        "every sealed segment was synced before the appends in it returned"
    );
    journal.shutdown();
}

#[test]
fn rolling_under_a_held_sync_does_not_block_appends() {
    let dir = tempfile::tempdir().unwrap();
    let journal = Journal::open(JournalConfig {
        fsync: FsyncPolicy::Periodic(Duration::from_millis(1)),
        ..config(dir.path())
    })
    .unwrap();
    journal.shared.hooks.hold(true);
    // Rolls many times while no sync can finish: on a slow disk a roll used to sync the sealed
    // segment itself, holding the tail lock.
    for n in 0..500 {
        journal.append(&[message(n)]).unwrap();
    }
    assert!(journal.segment_count() > 5);
    assert_eq!(
        journal.shared.hooks.sealed_synced.load(Ordering::Acquire),
        0
    );
    journal.shared.hooks.hold(false);
    journal.shutdown();
    assert!(journal.shared.hooks.sealed_synced.load(Ordering::Acquire) as usize >= 5);
}

#[tokio::test]
async fn a_waiting_reader_wakes_on_append() {
    let dir = tempfile::tempdir().unwrap();
    let journal = Journal::open(config(dir.path())).unwrap();
    let mut reader = journal.reader();
    let writer = journal.clone();
    let append = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(20)).await;
        writer.append(&[message(7)]).unwrap();
    });
    assert!(reader.wait(std::future::pending()).await);
    let records = reader.read(100).unwrap().records;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].message, message(7));
    assert_eq!(records[0].lsn, 0);
    append.await.unwrap();
    assert!(!reader.wait(std::future::ready(())).await);
}

/// Writes a log in the first format: `segments` of records, and a checkpoint.
fn write_legacy(dir: &Path, segments: &[&[Captured]], checkpoint: u64) -> Vec<u64> {
    let mut base = 0;
    let mut lsns = Vec::new();
    for records in segments {
        let mut bytes = Vec::new();
        for record in *records {
            lsns.push(base + bytes.len() as u64);
            legacy::encode(record, &mut bytes);
        }
        fs::write(dir.join(format!("{base:020}.seg")), &bytes).unwrap();
        base += bytes.len() as u64;
    }
    fs::write(dir.join("checkpoint"), format!("{checkpoint}\n")).unwrap();
    lsns
}

/// Writes a log in the second format (untagged blocks), as an earlier build left it: a meta
/// with the id alone, `segments` of records, and a checkpoint. Returns the records' positions.
fn write_second(dir: &Path, segments: &[&[Captured]], checkpoint: u64) -> Vec<u64> {
    fs::write(dir.join("meta"), "0123456789abcdef\n").unwrap();
    let mut base = 0;
    let mut lsns = Vec::new();
    for records in segments {
        let mut bytes = Vec::new();
        for record in *records {
            let mut body = Vec::new();
            format::encode_body(record, &mut body);
            lsns.push(base + format::frame_v1(&body, bytes.len() as u64, &mut bytes));
        }
        fs::write(dir.join(format!("{base:020}.wal")), &bytes).unwrap();
        base += bytes.len() as u64;
    }
    fs::write(dir.join("checkpoint"), format!("{checkpoint}\n")).unwrap();
    lsns
}

#[test]
fn a_log_in_the_second_format_is_converted_from_its_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    // With records spanning blocks (every 50th, from the 7th).
    let written: Vec<Captured> = (0..120).map(mixed).collect();
    let lsns = write_second(dir.path(), &[&written[..40], &written[40..]], 0);
    fs::write(dir.path().join("checkpoint"), format!("{}\n", lsns[13])).unwrap();
    // A torn record at the end of the last segment, as a crash leaves it.
    let last = dir.path().join(format!("{:020}.wal", lsns[40]));
    let mut bytes = fs::read(&last).unwrap();
    let mut body = Vec::new();
    format::encode_body(&mixed(107), &mut body);
    let mut torn = Vec::new();
    format::frame_v1(&body, bytes.len() as u64, &mut torn);
    bytes.extend_from_slice(&torn[..torn.len() / 2]);
    let old_end = lsns[40] + bytes.len() as u64;
    fs::write(&last, bytes).unwrap();

    let journal = Journal::open(config(dir.path())).unwrap();
    for extension in [legacy::FIRST, legacy::SECOND] {
        assert!(list_segments(dir.path(), extension).unwrap().is_empty());
    }
    assert_eq!(journal.log_id(), "0123456789abcdef", "the id is kept");
    let (_, keyed_from) = meta::read(dir.path()).key.expect("a key is added");
    assert_eq!(
        keyed_from, 0,
        "every segment of the current format is tagged"
    );
    let back = read_records(&mut journal.reader(), 1000);
    assert_eq!(
        back.iter().map(|r| r.message.clone()).collect::<Vec<_>>(),
        written[13..].to_vec()
    );
    assert!(
        back[0].lsn >= old_end,
        "positions never move backwards (dead-letter ids stay unique)"
    );
    // Tagged: damage inside the converted log costs only the record it touches.
    journal.shutdown();
    drop(journal);
    let victim = &back[20];
    overwrite_64(dir.path(), victim.lsn + 20, 7);
    let journal = Journal::open(config(dir.path())).unwrap();
    let mut expected = written[13..].to_vec();
    expected.remove(20);
    assert_eq!(read_all(&mut journal.reader()), expected);
}

#[test]
fn a_log_in_the_first_format_is_converted_from_its_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let written: Vec<Captured> = (0..30).map(message).collect();
    let lsns = write_legacy(
        dir.path(),
        &[&written[..10], &written[10..20], &written[20..]],
        0,
    );
    // Stored up to the 13th record; the first segment wholly.
    fs::write(dir.path().join("checkpoint"), format!("{}\n", lsns[13])).unwrap();
    // And a torn record at the end of the last segment, as a crash leaves it.
    let last = dir.path().join(format!("{:020}.seg", lsns[20]));
    let mut torn = Vec::new();
    legacy::encode(&message(99), &mut torn);
    let mut bytes = fs::read(&last).unwrap();
    let old_end = lsns[20] + (bytes.len() + torn.len() / 2) as u64;
    bytes.extend_from_slice(&torn[..torn.len() / 2]);
    fs::write(&last, bytes).unwrap();

    let journal = Journal::open(config(dir.path())).unwrap();
    assert!(list_segments(dir.path(), legacy::FIRST).unwrap().is_empty());
    let mut reader = journal.reader();
    let back = read_records(&mut reader, 1000);
    assert_eq!(
        back.iter().map(|r| r.message.clone()).collect::<Vec<_>>(),
        written[13..].to_vec()
    );
    assert!(
        back[0].lsn >= old_end,
        "positions never move backwards (dead-letter ids stay unique)"
    );
    journal.append(&[message(100)]).unwrap();
    journal.shutdown();
    drop(journal);
    // Opening again converts nothing twice.
    let journal = Journal::open(config(dir.path())).unwrap();
    let mut reader = journal.reader();
    let mut expected = written[13..].to_vec();
    expected.push(message(100));
    assert_eq!(read_all(&mut reader), expected);
}

#[test]
fn an_interrupted_conversion_is_finished_or_redone() {
    let written: Vec<Captured> = (0..10).map(message).collect();
    // Interrupted after the new segment was in place: the old ones are leftovers.
    let dir = tempfile::tempdir().unwrap();
    write_legacy(dir.path(), &[&written], 0);
    Journal::open(config(dir.path())).unwrap().shutdown();
    write_legacy(dir.path(), &[&written], 0);
    let journal = Journal::open(config(dir.path())).unwrap();
    assert!(list_segments(dir.path(), legacy::FIRST).unwrap().is_empty());
    assert_eq!(read_all(&mut journal.reader()), written);
    // Interrupted while writing the new segment: started again.
    let dir = tempfile::tempdir().unwrap();
    write_legacy(dir.path(), &[&written], 0);
    fs::write(dir.path().join("upgrade.tmp"), b"half a conversion").unwrap();
    let journal = Journal::open(config(dir.path())).unwrap();
    assert_eq!(read_all(&mut journal.reader()), written);
    assert!(!dir.path().join("upgrade.tmp").exists());
    // An earlier build's conversion of the first format into the second was interrupted in
    // deleting its sources: the second's segments are the log.
    let dir = tempfile::tempdir().unwrap();
    write_legacy(dir.path(), &[&written[..3]], 0);
    write_second(dir.path(), &[&written], 0);
    let journal = Journal::open(config(dir.path())).unwrap();
    assert_eq!(read_all(&mut journal.reader()), written);
    for extension in [legacy::FIRST, legacy::SECOND] {
        assert!(list_segments(dir.path(), extension).unwrap().is_empty());
    }
}

#[test]
fn readiness_sees_a_failed_log_a_closed_one_and_a_directory_that_takes_no_write() {
    let dir = tempfile::tempdir().unwrap();
    let journal = Journal::open(config(dir.path())).unwrap();
    assert_eq!(journal.check_writable(), Ok(()));
    assert!(
        !dir.path().join(PROBE_FILE).exists(),
        "the probe leaves nothing behind"
    );
    journal.shared.fail("injected".into());
    let failed = journal.check_writable().unwrap_err();
    assert!(failed.contains("injected"), "{failed}");
    journal.shutdown();

    let dir = tempfile::tempdir().unwrap();
    let journal = Journal::open(config(dir.path())).unwrap();
    std::fs::remove_dir_all(dir.path()).unwrap();
    let unwritable = journal.check_writable().unwrap_err();
    assert!(unwritable.contains("cannot write"), "{unwritable}");
    journal.close();
    assert_eq!(journal.check_writable(), Err("closed for shutdown".into()));
    journal.shutdown();
}
