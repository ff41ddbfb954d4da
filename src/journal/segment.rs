//! Scanning one segment file: a window of it held in memory, grown when a record runs past its
//! end, and `format::scan` run over it. Used by the reader and by recovery at open. It knows
//! nothing of other segments; the caller says where the segment begins in the log, how long it
//! is and how its fragments are checked.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt as _;

use bytes::Bytes;

use super::format::{self, BLOCK_BYTES, Framing, Scan};

/// What a segment holds from a position on, in segment offsets.
#[derive(Debug)]
pub enum Event {
    /// An intact record (its body not yet decoded).
    Record { start: u64, end: u64, body: Bytes },
    /// Bytes that hold no readable record; go on from `end`.
    Damage { start: u64, end: u64 },
    /// The end of the segment.
    End,
}

pub struct SegmentScan {
    file: File,
    /// The log position of the segment's first byte.
    base: u64,
    framing: Framing,
    /// The segment's length as far as the caller knows (the log's end, for the active one).
    len: u64,
    /// How much to read at a time.
    chunk: usize,
    /// The window: `bytes` from segment offset `from`, a block boundary.
    from: u64,
    bytes: Bytes,
    /// The file ended before `len` when the window was read: it was cut on disk.
    short: bool,
}

impl fmt::Debug for SegmentScan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SegmentScan")
            .field("base", &self.base)
            .field("len", &self.len)
            .field("from", &self.from)
            .field("window", &self.bytes.len())
            .finish_non_exhaustive()
    }
}

impl SegmentScan {
    pub fn new(file: File, base: u64, len: u64, chunk: usize, framing: Framing) -> Self {
        Self {
            file,
            base,
            framing,
            len,
            chunk: chunk.max(BLOCK_BYTES).next_multiple_of(BLOCK_BYTES),
            from: 0,
            bytes: Bytes::new(),
            short: false,
        }
    }

    /// The active segment grows as the log does.
    pub fn set_len(&mut self, len: u64) {
        self.len = len;
    }

    /// The next record or damage at or after `at`, which must be a position a record may
    /// start at (see `format::scan`).
    pub fn next(&mut self, at: u64) -> io::Result<Event> {
        if at >= self.len {
            return Ok(Event::End);
        }
        let floor = at - at % BLOCK_BYTES as u64;
        if at < self.from || at > self.window_end() {
            self.load(floor, self.chunk)?;
        }
        loop {
            let complete = self.short || self.window_end() >= self.len;
            let rel = (at - self.from) as usize;
            let lsn = self.base + self.from;
            match format::scan(&self.bytes, lsn, rel, complete, &self.framing) {
                Scan::Record { start, end, body } => {
                    return Ok(Event::Record {
                        start: self.from + start as u64,
                        end: self.from + end as u64,
                        body,
                    });
                }
                Scan::Damage { start, end } => {
                    return Ok(Event::Damage {
                        start: self.from + start as u64,
                        end: (self.from + end as u64).min(self.len),
                    });
                }
                Scan::End if self.window_end() < self.len => {
                    // The file is shorter than the log says: the rest was cut on disk.
                    return Ok(Event::Damage {
                        start: self.window_end().max(at),
                        end: self.len,
                    });
                }
                Scan::End => return Ok(Event::End),
                Scan::NeedMore => {
                    // A record longer than the window, or a search for the next intact fragment
                    // that ran into its end: read again from its block, twice as much.
                    let floor = at - at % BLOCK_BYTES as u64;
                    let have = (self.window_end() - floor) as usize;
                    self.load(floor, (have * 2).max(self.chunk))?;
                }
            }
        }
    }

    fn window_end(&self) -> u64 {
        self.from + self.bytes.len() as u64
    }

    fn load(&mut self, from: u64, want: usize) -> io::Result<()> {
        let want = want.min((self.len - from) as usize);
        let mut buf = vec![0; want];
        let mut got = 0;
        while got < want {
            match self.file.read_at(&mut buf[got..], from + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        buf.truncate(got);
        self.short = got < want;
        self.from = from;
        self.bytes = Bytes::from(buf);
        Ok(())
    }
}
