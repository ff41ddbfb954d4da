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

fn read_all(reader: &mut JournalReader) -> Vec<Captured> {
    let mut out = Vec::new();
    while reader.position() < reader.journal.end() {
        out.extend(
            reader
                .read(1000)
                .unwrap()
                .records
                .into_iter()
                .map(|r| r.message),
        );
    }
    out
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
        let batch = reader.read(2000).unwrap();
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
    {
        let journal = Journal::open(config(dir.path())).unwrap();
        journal.append(&[message(1), message(2)]).unwrap();
        journal.shutdown();
    }
    let last = list_segments(dir.path(), EXTENSION).unwrap().pop().unwrap();
    let mut half = Vec::new();
    format::encode(&message(3), &mut half);
    half.truncate(half.len() / 2);
    OpenOptions::new()
        .append(true)
        .open(segment_path(dir.path(), last))
        .unwrap()
        .write_all(&half)
        .unwrap();
    let journal = Journal::open(config(dir.path())).unwrap();
    journal.append(&[message(4)]).unwrap();
    let mut reader = journal.reader();
    assert_eq!(
        read_all(&mut reader),
        vec![message(1), message(2), message(4)]
    );
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
fn corruption_in_a_sealed_segment_is_skipped_and_counted() {
    let (dir, journal, written) = spread_over_segments();
    let path = first_segment(dir.path());
    let mut bytes = fs::read(&path).unwrap();
    bytes[20] ^= 0xff;
    fs::write(&path, bytes).unwrap();
    let mut reader = journal.reader();
    let back = read_all(&mut reader);
    assert!(reader.corrupt_bytes() > 0);
    assert!(back.len() < written.len());
    assert_eq!(back.last(), written.last());
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
    assert_eq!(back.last(), written.last());
}
