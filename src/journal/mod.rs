//! The local log: the append-only spine between the broker and the stores.
//!
//! Every message captured on `sensors/#` is appended here before the broker acknowledges it; the
//! ingest writer reads it back in order, stores it, and marks how far it got. MongoDB being down
//! or slow only makes this log longer. The log must never wait on anything but the local disk,
//! and it must never decide what a reading is (that is `domain::decode`).
//!
//! Layout on disk, in `dir`:
//! - `<base>.wal2`: segments, named by the log position (LSN, a byte offset over the whole log)
//!   of their first byte. Each is a run of 32 KiB blocks holding records cut into checksummed
//!   fragments tagged with the log's key (`format`); a record's LSN is the position of its first
//!   fragment;
//! - `checkpoint`: the LSN below which everything is stored (written atomically by rename);
//! - `meta`: this log's random id, which keeps dead-letter ids unique across wiped logs, and its
//!   random key (`meta`);
//! - `<base>.seg` and `<base>.wal`: segments in the two earlier formats, converted once at open
//!   and deleted (`legacy`).
//!
//! Durability: an append is one `write(2)` of a whole batch, so once `append` returns, a process
//! crash cannot lose it. Power loss can lose what was not yet `fdatasync`ed; `FsyncPolicy` says
//! how long that window is. One thread does the log's syncs: the active segment's (as the policy
//! says), each sealed segment's once after a roll, and the directory's after a segment is
//! created, all before it declares anything durable; appends never wait for a sync under the
//! lock other appends need. The directory is also synced after `meta` is created and after the
//! checkpoint's rename. A failed `fdatasync` is final: the kernel may have dropped the pages it
//! could not write, so a later sync that succeeds would prove nothing (PostgreSQL's lesson). The
//! log then refuses appends (`AppendError::Failed`: no acknowledgement, so publishers send again
//! after a restart), fails the appends waiting on that sync, and reports it (`failure`,
//! `failed`) so the app can shut down; recovery starts again from what is on disk. A checkpoint
//! that cannot be synced is only an error for its caller to log: segments are deleted only once
//! a checkpoint is durable, and a stale one means duplicates on replay, never a loss.
//!
//! Damage: a reader that meets bytes it cannot frame resumes at the next fragment whose tag
//! verifies under the log's key, so a damaged stretch costs the records whose bytes it touched
//! (and a record cut into fragments across blocks whole), not the rest of its block or segment.
//! A segment written before the log had its current key (its meta was lost) is read by CRC
//! alone, and there the reader resumes only at the next block boundary, where the writer
//! guarantees a fragment starts. The bytes skipped are counted (`corrupt_bytes`) and each damaged
//! stretch is logged once. Recovery at open cuts only a torn tail, whatever follows the active
//! segment's last intact record; intact records after damage are kept for the reader.

mod format;
mod legacy;
mod meta;
mod segment;

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::domain::Captured;
pub use format::MAX_PAYLOAD_BYTES;
use format::{Framing, Key};
use meta::Meta;
use segment::{Event, SegmentScan};

/// The extension of segments in the current format.
const EXTENSION: &str = "wal2";
/// How long an append that failed on I/O keeps the log "not writable" when none succeeds
/// after it (no publisher sends any more) and the probe passes.
const APPEND_ERROR_MEMORY: Duration = Duration::from_secs(10);
/// The file `check_writable` writes and removes; no segment name.
const PROBE_FILE: &str = "ready-probe";

/// When appended bytes are forced to the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// Leave it to the kernel (seconds of exposure to power loss, none to process crashes).
    Never,
    /// A background `fdatasync` every interval; appends do not wait for it.
    Periodic(Duration),
    /// Appends return only once their bytes are synced; concurrent appends share one sync.
    Always,
}

#[derive(Clone, Debug)]
pub struct JournalConfig {
    pub dir: PathBuf,
    /// A segment is sealed and a new one started beyond this size.
    pub segment_bytes: u64,
    /// Appends are refused while this many bytes are not yet stored.
    pub max_bytes: u64,
    pub fsync: FsyncPolicy,
}

#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    #[error("the local log is full: {pending} bytes wait to be stored, the limit is {max}")]
    Full { pending: u64, max: u64 },
    #[error("the local log is closed for shutdown")]
    Closed,
    #[error("the local log cannot be written: {0}")]
    Io(#[from] io::Error),
    /// An earlier sync or write failed in a way that leaves what is on disk unknown; nothing is
    /// accepted until a restart has recovered the log.
    #[error("the local log failed and accepts nothing until sensorhub restarts: {0}")]
    Failed(String),
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot use the local log directory {dir}: {source}")]
    Io { dir: PathBuf, source: io::Error },
}

/// A handle on the open log; clones share it.
#[derive(Clone, Debug)]
pub struct Journal {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    config: JournalConfig,
    log_id: String,
    /// What new fragments are tagged with; segments based at `keyed_from` or later carry it.
    key: Key,
    keyed_from: u64,
    tail: Mutex<Tail>,
    /// The LSN up to which records are written and readable.
    end: watch::Sender<u64>,
    /// The LSN below which the writer has stored everything (in memory; persisted by `checkpoint`).
    stored: AtomicU64,
    /// The LSN last persisted in the checkpoint file.
    persisted: AtomicU64,
    closed: AtomicBool,
    /// Why the log failed, once it has.
    failure: watch::Sender<Option<String>>,
    /// The last append that failed on I/O (ENOSPC, EIO), until one succeeds.
    append_error: Mutex<Option<(Instant, String)>>,
    /// A readiness probe of the directory is running.
    probing: AtomicBool,
    sync: SyncState,
    syncer: Mutex<Option<JoinHandle<()>>>,
    #[cfg(test)]
    hooks: tests::Hooks,
}

#[derive(Debug)]
struct Tail {
    /// Bases of all segments on disk, ascending; the last is the active one.
    segments: Vec<u64>,
    active: Arc<File>,
    end: u64,
    /// Segments sealed since the last sync; the syncer syncs each once.
    unsynced: Vec<Arc<File>>,
    /// A segment was created since the directory was last synced.
    dir_unsynced: bool,
}

impl Tail {
    fn base(&self) -> u64 {
        self.segments.last().copied().unwrap_or(0)
    }
}

#[derive(Debug, Default)]
struct SyncState {
    /// The LSN below which everything is on disk.
    durable: Mutex<u64>,
    changed: Condvar,
    stop: AtomicBool,
    /// The syncer has returned: nothing more becomes durable.
    exited: AtomicBool,
}

impl Journal {
    /// Opens (or creates) the log in `config.dir`: gives it a key if it has none, converts a log
    /// in an earlier format, then cuts off a torn tail left by a crash.
    pub fn open(config: JournalConfig) -> Result<Self, OpenError> {
        let dir = config.dir.clone();
        let io_err = |source| OpenError::Io {
            dir: dir.clone(),
            source,
        };
        fs::create_dir_all(&config.dir).map_err(io_err)?;
        let found = meta::read(&config.dir);
        let checkpoint = read_checkpoint(&config.dir);
        let had_segments = !list_segments(&config.dir, EXTENSION)
            .map_err(io_err)?
            .is_empty();
        // Segments written under a key that is now lost are read by CRC alone; the new key
        // applies from the log's end, known once the tail is recovered.
        let key_lost = found.key.is_none() && had_segments;
        let mut log_meta = Meta {
            id: found.id.clone().unwrap_or_else(meta::new_id),
            key: found
                .key
                .as_ref()
                .map_or_else(Key::random, |(key, _)| key.clone()),
            keyed_from: found.key.as_ref().map_or(0, |(_, from)| *from),
        };
        if (found.id.is_none() || found.key.is_none()) && !key_lost {
            meta::write(&config.dir, &log_meta).map_err(io_err)?;
        }
        legacy::upgrade(&config.dir, checkpoint, &log_meta.key).map_err(io_err)?;
        let mut segments = list_segments(&config.dir, EXTENSION).map_err(io_err)?;
        if segments.is_empty() {
            segments.push(checkpoint);
            File::create(segment_path(&config.dir, checkpoint)).map_err(io_err)?;
            sync_dir(&config.dir).map_err(io_err)?;
        }
        let last = *segments.last().unwrap_or(&checkpoint);
        let framing = if key_lost {
            Framing::Unkeyed
        } else {
            framing_of(&log_meta.key, log_meta.keyed_from, last)
        };
        let valid =
            recover_tail(&segment_path(&config.dir, last), last, framing).map_err(io_err)?;
        let end = last + valid;
        if key_lost {
            // Created before the meta that names it: a crash in between finds the key lost
            // again, and this segment empty, to be used as it is.
            if valid > 0 {
                File::create(segment_path(&config.dir, end)).map_err(io_err)?;
                sync_dir(&config.dir).map_err(io_err)?;
                segments.push(end);
            }
            log_meta.keyed_from = end;
            meta::write(&config.dir, &log_meta).map_err(io_err)?;
            tracing::warn!(
                keyed_from = end,
                "the local log's key was lost (its meta file is missing or damaged): what it \
                 holds before this position is read by checksum alone, and after damage there \
                 the reader resumes only at the next 32 KiB block"
            );
        }
        let active = OpenOptions::new()
            .append(true)
            .open(segment_path(&config.dir, *segments.last().unwrap_or(&end)))
            .map_err(io_err)?;
        // Everything before the first segment was stored and deleted.
        let stored = checkpoint.clamp(segments[0], end);
        let (end_tx, _) = watch::channel(end);
        let (failure, _) = watch::channel(None);
        let shared = Arc::new(Shared {
            config,
            log_id: log_meta.id,
            key: log_meta.key,
            keyed_from: log_meta.keyed_from,
            tail: Mutex::new(Tail {
                segments,
                active: Arc::new(active),
                end,
                unsynced: Vec::new(),
                dir_unsynced: false,
            }),
            end: end_tx,
            stored: AtomicU64::new(stored),
            persisted: AtomicU64::new(stored),
            closed: AtomicBool::new(false),
            failure,
            append_error: Mutex::new(None),
            probing: AtomicBool::new(false),
            sync: SyncState {
                durable: Mutex::new(end),
                ..SyncState::default()
            },
            syncer: Mutex::new(None),
            #[cfg(test)]
            hooks: tests::Hooks::default(),
        });
        // Every policy needs the thread: sealed segments and new directory entries are synced
        // whatever the policy, as they were when a roll synced them itself.
        let weak = Arc::downgrade(&shared);
        let handle = std::thread::Builder::new()
            .name("journal-sync".into())
            .spawn(move || run_syncer(&weak))
            .map_err(io_err)?;
        *lock(&shared.syncer) = Some(handle);
        Ok(Self { shared })
    }

    /// This log's id, stable for the life of its directory.
    pub fn log_id(&self) -> &str {
        &self.shared.log_id
    }

    /// Appends `batch` as one write. Once this returns `Ok`, a process crash cannot lose it
    /// (and, with `FsyncPolicy::Always`, neither can power loss).
    pub fn append(&self, batch: &[Captured]) -> Result<(), AppendError> {
        let result = self.write_batch(batch);
        match &result {
            Ok(()) if !batch.is_empty() => *lock(&self.shared.append_error) = None,
            Err(AppendError::Io(e)) => {
                *lock(&self.shared.append_error) = Some((Instant::now(), e.to_string()));
            }
            _ => {}
        }
        result
    }

    /// Whether the log takes appends now, for readiness: open, not failed, its directory takes
    /// a write (a probe file of one block, written and removed: a full disk refuses it with
    /// ENOSPC, a read-only one with EROFS), and no append failed on I/O within the last
    /// `APPEND_ERROR_MEMORY` without one succeeding since (a disk that fills between probes,
    /// or that has room for the probe and not for the appends). Blocking file I/O. A probe
    /// still running (a disk that hangs) is not started twice: that is an error too.
    pub fn check_writable(&self) -> Result<(), String> {
        if self.is_closed() {
            return Err("closed for shutdown".into());
        }
        if let Some(reason) = self.failure() {
            return Err(format!("failed: {reason}"));
        }
        if self.shared.probing.swap(true, Ordering::AcqRel) {
            return Err("the disk has not answered the previous probe".into());
        }
        let probed = probe_write(&self.shared.config.dir);
        self.shared.probing.store(false, Ordering::Release);
        probed.map_err(|e| format!("cannot write to the log's directory: {e}"))?;
        if let Some((at, error)) = lock(&self.shared.append_error).as_ref()
            && at.elapsed() < APPEND_ERROR_MEMORY
        {
            return Err(format!(
                "an append failed {} ms ago: {error}",
                at.elapsed().as_millis()
            ));
        }
        Ok(())
    }

    fn write_batch(&self, batch: &[Captured]) -> Result<(), AppendError> {
        if batch.is_empty() {
            return Ok(());
        }
        // Bodies outside the lock; framing needs the block offset, known only under it.
        let mut bodies = Vec::with_capacity(batch.len() * 160);
        let mut ends = Vec::with_capacity(batch.len());
        for message in batch {
            format::encode_body(message, &mut bodies);
            ends.push(bodies.len());
        }
        let end = {
            let mut tail = lock(&self.shared.tail);
            // Checked under the lock, so `close` leaves a well-defined end behind it.
            if self.shared.closed.load(Ordering::Acquire) {
                return Err(AppendError::Closed);
            }
            if let Some(reason) = self.failure() {
                return Err(AppendError::Failed(reason));
            }
            let key = &self.shared.key;
            let mut bytes = frame_all(&bodies, &ends, key, tail.base(), tail.end - tail.base());
            let pending = tail.end - self.shared.stored.load(Ordering::Acquire);
            if pending + bytes.len() as u64 > self.shared.config.max_bytes {
                return Err(AppendError::Full {
                    pending,
                    max: self.shared.config.max_bytes,
                });
            }
            let offset = tail.end - tail.base();
            if offset > 0 && offset + bytes.len() as u64 > self.shared.config.segment_bytes {
                self.roll(&mut tail)?;
                bytes = frame_all(&bodies, &ends, key, tail.base(), 0);
            }
            if let Err(e) = (&*tail.active).write_all(&bytes) {
                // A partial write would leave half a record that later appends follow; cut it.
                // If even that fails, the file no longer ends where the log thinks it does.
                let offset = tail.end - tail.base();
                if let Err(cut) = tail.active.set_len(offset) {
                    self.shared.fail(format!(
                        "a failed write ({e}) could not be cut off the active segment: {cut}"
                    ));
                }
                return Err(e.into());
            }
            tail.end += bytes.len() as u64;
            self.shared.end.send_replace(tail.end);
            tail.end
        };
        if self.shared.config.fsync == FsyncPolicy::Always {
            {
                // Under the lock the syncer checks for work with, so the wake-up cannot fall
                // between its check and its wait.
                let _durable = lock(&self.shared.sync.durable);
                self.shared.sync.changed.notify_all();
            }
            self.wait_durable(end)?;
        }
        Ok(())
    }

    /// Seals the active segment and starts the next. The sealed one is synced by the syncer,
    /// not here: a slow disk must not hold the lock every appender needs.
    fn roll(&self, tail: &mut Tail) -> Result<(), AppendError> {
        let path = segment_path(&self.shared.config.dir, tail.end);
        let next = OpenOptions::new().create(true).append(true).open(path)?;
        let sealed = std::mem::replace(&mut tail.active, Arc::new(next));
        tail.unsynced.push(sealed);
        tail.dir_unsynced = true;
        tail.segments.push(tail.end);
        Ok(())
    }

    fn wait_durable(&self, lsn: u64) -> Result<(), AppendError> {
        let sync = &self.shared.sync;
        let mut durable = lock(&sync.durable);
        loop {
            if *durable >= lsn {
                return Ok(());
            }
            if let Some(reason) = self.failure() {
                return Err(AppendError::Failed(reason));
            }
            if sync.exited.load(Ordering::Acquire) {
                // Cannot happen after an orderly shutdown (its last sync covers every append
                // `close` let through), but an append that is not durable must not be acked.
                return Err(AppendError::Closed);
            }
            durable = sync
                .changed
                .wait_timeout(durable, Duration::from_millis(50))
                .map(|(guard, _)| guard)
                .unwrap_or_else(|poisoned| poisoned.into_inner().0);
        }
    }

    /// Refuses all further appends. Returns the final end of the log.
    pub fn close(&self) -> u64 {
        let tail = lock(&self.shared.tail);
        self.shared.closed.store(true, Ordering::Release);
        tail.end
    }

    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::Acquire)
    }

    /// Why the log failed (a sync or write whose outcome on disk is unknown), if it has. A
    /// failed log refuses appends for good; the process should restart.
    pub fn failure(&self) -> Option<String> {
        self.shared.failure.borrow().clone()
    }

    /// Resolves once the log has failed, with the reason.
    pub async fn failed(&self) -> String {
        let mut failure = self.shared.failure.subscribe();
        let reason = failure
            .wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|reason| reason.clone());
        match reason {
            Some(reason) => reason,
            // The sender lives as long as `self`: never.
            None => std::future::pending().await,
        }
    }

    /// The LSN up to which records are written.
    pub fn end(&self) -> u64 {
        *self.shared.end.borrow()
    }

    /// The LSN below which everything is stored.
    pub fn stored(&self) -> u64 {
        self.shared.stored.load(Ordering::Acquire)
    }

    /// Bytes appended and not yet stored.
    pub fn pending_bytes(&self) -> u64 {
        self.end().saturating_sub(self.stored())
    }

    pub fn segment_count(&self) -> usize {
        lock(&self.shared.tail).segments.len()
    }

    /// Records that everything below `lsn` is stored. Never moves backwards.
    pub fn mark_stored(&self, lsn: u64) {
        self.shared.stored.fetch_max(lsn, Ordering::AcqRel);
    }

    /// Persists the stored mark and deletes segments that lie wholly below it. Segments are
    /// deleted only after the new checkpoint is durable (file and rename both synced).
    pub fn checkpoint(&self) -> io::Result<()> {
        let stored = self.stored();
        if stored == self.shared.persisted.load(Ordering::Acquire) {
            return Ok(());
        }
        let dir = &self.shared.config.dir;
        let tmp = dir.join("checkpoint.tmp");
        let mut file = File::create(&tmp)?;
        writeln!(file, "{stored}")?;
        file.sync_data()?;
        fs::rename(&tmp, dir.join("checkpoint"))?;
        sync_dir(dir)?;
        self.shared.persisted.store(stored, Ordering::Release);
        let doomed: Vec<u64> = {
            let mut tail = lock(&self.shared.tail);
            let keep_from = tail
                .segments
                .iter()
                .rposition(|&base| base <= stored)
                .unwrap_or(0);
            tail.segments.drain(..keep_from).collect()
        };
        for base in doomed {
            fs::remove_file(segment_path(dir, base))?;
        }
        Ok(())
    }

    /// A reader positioned at the stored mark: what a restart must replay comes first.
    pub fn reader(&self) -> JournalReader {
        JournalReader {
            journal: self.clone(),
            end_rx: self.shared.end.subscribe(),
            position: self.stored(),
            segment: None,
            corrupt_bytes: 0,
            damage: None,
        }
    }

    /// Stops the sync thread after a last sync of everything written. Appends are closed first.
    pub fn shutdown(&self) {
        self.close();
        {
            let _durable = lock(&self.shared.sync.durable);
            self.shared.sync.stop.store(true, Ordering::Release);
            self.shared.sync.changed.notify_all();
        }
        if let Some(handle) = lock(&self.shared.syncer).take() {
            let _ = handle.join();
        }
    }

    fn segment_for(&self, lsn: u64) -> Option<(u64, Option<u64>)> {
        let tail = lock(&self.shared.tail);
        let idx = tail.segments.iter().rposition(|&base| base <= lsn)?;
        Some((tail.segments[idx], tail.segments.get(idx + 1).copied()))
    }
}

impl Shared {
    /// How the segment based at `base` is read.
    fn framing(&self, base: u64) -> Framing {
        framing_of(&self.key, self.keyed_from, base)
    }

    /// Enters the failed state (once; later reasons are dropped) and wakes every waiter.
    fn fail(&self, reason: String) {
        let first = self.failure.send_if_modified(|failure| {
            if failure.is_some() {
                return false;
            }
            *failure = Some(reason.clone());
            true
        });
        if first {
            tracing::error!(
                error = %reason,
                "the local log failed: refusing all appends until sensorhub restarts"
            );
        }
        let _durable = lock(&self.sync.durable);
        self.sync.changed.notify_all();
    }
}

fn framing_of(key: &Key, keyed_from: u64, base: u64) -> Framing {
    if base >= keyed_from {
        Framing::Keyed(key.clone())
    } else {
        Framing::Unkeyed
    }
}

/// The fragments of every body in `bodies` (ending at `ends`), to be written at `offset` into
/// the active segment, based at `base`.
fn frame_all(bodies: &[u8], ends: &[usize], key: &Key, base: u64, offset: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(bodies.len() + ends.len() * format::HEADER_BYTES + 64);
    let mut from = 0;
    for &to in ends {
        format::frame(
            &bodies[from..to],
            key,
            base,
            offset + out.len() as u64,
            &mut out,
        );
        from = to;
    }
    out
}

/// Reads the log in order from a position, waiting at its end for more.
#[derive(Debug)]
pub struct JournalReader {
    journal: Journal,
    end_rx: watch::Receiver<u64>,
    position: u64,
    /// The segment being read, by base.
    segment: Option<(u64, SegmentScan)>,
    corrupt_bytes: u64,
    /// The damaged stretch being skipped (LSNs), logged once it ends.
    damage: Option<(u64, u64)>,
}

/// A record and the log position (LSN) of its first byte, unique within this log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub lsn: u64,
    pub message: Captured,
}

/// Records read in one go, and the LSN just past the last of them.
#[derive(Debug, Default)]
pub struct Batch {
    pub records: Vec<Record>,
    pub end: u64,
}

impl JournalReader {
    /// The LSN from which the next record is looked for: always where a record may start (the
    /// end of one, or the end of a damaged stretch), so it can be marked stored and resumed at.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// Bytes skipped because they were not records (disk corruption); zero in a healthy log.
    pub fn corrupt_bytes(&self) -> u64 {
        self.corrupt_bytes
    }

    /// Waits until the log holds something past our position, or until `closed` resolves.
    /// Returns false when it gave up because of `closed`.
    pub async fn wait(&mut self, closed: impl Future<Output = ()>) -> bool {
        let position = self.position;
        tokio::select! {
            result = self.end_rx.wait_for(|&end| end > position) => result.is_ok(),
            () = closed => false,
        }
    }

    /// Reads whole records from about `max_bytes` of the log, without waiting; a record larger
    /// than that is still read whole. Blocking file I/O: call it where blocking is allowed.
    pub fn read(&mut self, max_bytes: usize) -> io::Result<Batch> {
        let end = self.journal.end();
        let start = self.position;
        let mut records = Vec::new();
        while self.position < end && self.position - start < max_bytes as u64 {
            let (base, next_base) = self.journal.segment_for(self.position).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("no local log segment holds position {}", self.position),
                )
            })?;
            // A segment ends at the next one's base; the active one where the log does.
            let segment_end = next_base.unwrap_or(end).min(end);
            let mut scan = match self.segment.take() {
                Some((open, scan)) if open == base => scan,
                _ => {
                    let path = segment_path(&self.journal.shared.config.dir, base);
                    let framing = self.journal.shared.framing(base);
                    SegmentScan::new(
                        File::open(path)?,
                        base,
                        segment_end - base,
                        max_bytes,
                        framing,
                    )
                }
            };
            scan.set_len(segment_end - base);
            while self.position < segment_end && self.position - start < max_bytes as u64 {
                match scan.next(self.position - base)? {
                    Event::Record {
                        start: first,
                        end: past,
                        body,
                    } => {
                        let lsn = base + first;
                        match format::decode_body(&body) {
                            Some(message) => {
                                self.end_damage();
                                records.push(Record { lsn, message });
                            }
                            // Intact frames around a body this version cannot read.
                            None => self.damaged(lsn, base + past),
                        }
                        self.position = base + past;
                    }
                    Event::Damage {
                        start: first,
                        end: past,
                    } => {
                        self.damaged(base + first, base + past);
                        self.position = base + past;
                    }
                    Event::End => self.position = segment_end,
                }
            }
            // Done with a sealed segment once past its end; the active one grows.
            if self.position < segment_end || next_base.is_none() {
                self.segment = Some((base, scan));
            }
        }
        if self.position >= end {
            // What comes next is appended after a whole record: a damaged stretch ends here.
            self.end_damage();
        }
        Ok(Batch {
            records,
            end: self.position,
        })
    }

    /// Counts damaged bytes, merging a stretch that continues the one being skipped.
    fn damaged(&mut self, from: u64, to: u64) {
        self.corrupt_bytes += to - from;
        match &mut self.damage {
            // Block trailers (under a header's size) may separate the pieces of one stretch.
            Some((_, end)) if from.saturating_sub(*end) < format::HEADER_BYTES as u64 => {
                *end = to;
            }
            _ => {
                self.end_damage();
                self.damage = Some((from, to));
            }
        }
    }

    fn end_damage(&mut self) {
        if let Some((from, to)) = self.damage.take() {
            tracing::error!(
                lsn = from,
                end = to,
                skipped_bytes = to - from,
                "the local log is damaged here (disk corruption); skipped to the next intact \
                 record"
            );
        }
    }
}

fn run_syncer(shared: &Weak<Shared>) {
    loop {
        // Holding the log only for one pass lets it be dropped when every handle is gone.
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if !sync_pass(&shared) {
            shared.sync.exited.store(true, Ordering::Release);
            let _durable = lock(&shared.sync.durable);
            shared.sync.changed.notify_all();
            return;
        }
    }
}

/// Waits for work, then syncs what the tail holds. False when the syncer must stop: asked to,
/// after a last pass, or after a failed sync (retrying would prove nothing).
fn sync_pass(shared: &Shared) -> bool {
    let policy = shared.config.fsync;
    let interval = match policy {
        FsyncPolicy::Periodic(every) => every,
        FsyncPolicy::Always | FsyncPolicy::Never => Duration::from_millis(50),
    };
    let stop = {
        // Sleep until the next period, or (Always) until an append wakes us. `stop` is read
        // under the lock `shutdown` sets it under, so its wake-up cannot be missed either.
        let durable = lock(&shared.sync.durable);
        let stop = shared.sync.stop.load(Ordering::Acquire);
        let work_waiting = policy == FsyncPolicy::Always && *durable < *shared.end.borrow();
        if !stop && !work_waiting {
            let _ = shared.sync.changed.wait_timeout(durable, interval);
        }
        stop
    };
    if shared.failure.borrow().is_some() {
        return false;
    }
    // One snapshot under the lock: every byte below `end` is in `active` or in `sealed` (or in
    // a segment an earlier pass synced).
    let (end, active, sealed, dir) = {
        let mut tail = lock(&shared.tail);
        (
            tail.end,
            Arc::clone(&tail.active),
            std::mem::take(&mut tail.unsynced),
            std::mem::take(&mut tail.dir_unsynced),
        )
    };
    let sync_active = (stop || policy != FsyncPolicy::Never) && end > *lock(&shared.sync.durable);
    let synced = (|| {
        #[cfg(test)]
        shared.hooks.before_sync()?;
        for file in &sealed {
            file.sync_data()?;
            #[cfg(test)]
            shared.hooks.sealed_synced.fetch_add(1, Ordering::AcqRel);
        }
        if dir {
            sync_dir(&shared.config.dir)?;
        }
        if sync_active {
            active.sync_data()?;
        }
        io::Result::Ok(())
    })();
    match synced {
        Ok(()) if sync_active => {
            let mut durable = lock(&shared.sync.durable);
            *durable = (*durable).max(end);
            shared.sync.changed.notify_all();
        }
        Ok(()) => {}
        Err(e) => {
            shared.fail(format!("fdatasync of the local log failed: {e}"));
            return false;
        }
    }
    !stop
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind, still consistent
    // enough to keep serving; poisoning must not take the ingest path down with it.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn segment_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.{EXTENSION}"))
}

/// Bases of the segments in `dir` with `extension`, ascending.
fn list_segments(dir: &Path, extension: &str) -> io::Result<Vec<u64>> {
    let mut bases = Vec::new();
    for entry in fs::read_dir(dir)? {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        let base = name
            .strip_suffix(extension)
            .and_then(|s| s.strip_suffix('.'))
            .and_then(|s| s.parse().ok());
        if let Some(base) = base {
            bases.push(base);
        }
    }
    bases.sort_unstable();
    Ok(bases)
}

/// Writes one block to a new file in `dir`, then removes it (not synced: only whether the
/// filesystem takes the write matters).
fn probe_write(dir: &Path) -> io::Result<()> {
    let path = dir.join(PROBE_FILE);
    // A file left by a crash must go first: truncating it would free the very blocks the
    // write then reuses, and a full disk would pass.
    let _ = fs::remove_file(&path);
    let written = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .and_then(|mut file| file.write_all(&[0; format::BLOCK_BYTES]));
    let removed = fs::remove_file(&path);
    written.and(removed)
}

/// Makes the directory's entries (created, renamed) durable.
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn read_checkpoint(dir: &Path) -> u64 {
    fs::read_to_string(dir.join("checkpoint"))
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(0)
}

/// Scans the active segment and cuts it after its last intact record: only a torn tail goes,
/// never intact records after damage. Returns the kept length.
fn recover_tail(path: &Path, base: u64, framing: Framing) -> io::Result<u64> {
    let (mut valid, len, kept_damage) = intact_end(path, base, framing.clone())?;
    if let Framing::Keyed(_) = framing {
        // Nothing a CRC alone can still read is cut: under a wrong key (a meta file copied from
        // another log) every fragment looks damaged, and the records must stay on disk for the
        // right one.
        valid = valid.max(intact_end(path, base, Framing::Unkeyed)?.0);
    }
    if valid < len {
        tracing::warn!(
            segment = %path.display(),
            cut_bytes = len - valid,
            "cutting a torn tail off the local log (a crash interrupted a write)"
        );
        OpenOptions::new().write(true).open(path)?.set_len(valid)?;
    }
    if kept_damage > 0 {
        tracing::warn!(
            segment = %path.display(),
            damaged_bytes = kept_damage,
            "the local log's active segment is damaged before its last intact record; the \
             reader will skip the damage and read the records after it"
        );
    }
    Ok(valid)
}

/// The end of the last intact record in a segment, the segment's length, and the damaged bytes
/// before that end.
fn intact_end(path: &Path, base: u64, framing: Framing) -> io::Result<(u64, u64, u64)> {
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    let mut scan = SegmentScan::new(file, base, len, 1 << 20, framing);
    // Damage is only known to be kept (not part of the tail) once an intact record follows.
    let (mut at, mut valid, mut damaged, mut kept_damage) = (0, 0, 0, 0);
    loop {
        match scan.next(at)? {
            Event::Record { end, .. } => {
                kept_damage += std::mem::take(&mut damaged);
                valid = end;
                at = end;
            }
            Event::Damage { start, end } => {
                damaged += end - start;
                at = end;
            }
            Event::End => break,
        }
    }
    Ok((valid, len, kept_damage))
}

#[cfg(test)]
mod tests;
