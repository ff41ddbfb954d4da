//! The log's two earlier on-disk formats, kept only to upgrade a log written in one. It must not
//! be used for anything else: nothing writes these formats any more.
//!
//! - The first: segments `<base>.seg`, records back to back as `u32 body length | u32 CRC-32 of
//!   body | body`.
//! - The second: segments `<base>.wal`, block-framed as today but with 7-byte fragment headers
//!   (CRC-32 of type and data, length, type) and no tag (`format::Framing::V1`). Without a tag a
//!   reader can resume after damage only at a block boundary.
//!
//! Both hold the same version 1 body as today's format. At open, before anything else reads the
//! directory, the records past the checkpoint are framed anew, under the log's key, into one
//! segment of today's format. Its base is the old log's end, so log positions never move
//! backwards (dead-letter ids, which hold a position, stay unique); the old checkpoint lies below
//! it and so means "start at this segment". The new segment is written under a temporary name,
//! synced, and renamed into place before the old segments are deleted: a crash at any point
//! leaves either the old log whole (the conversion starts again) or the new segment whole (the
//! old ones are leftovers, deleted at the next open). A log in the first format whose conversion
//! to the second by an earlier build was interrupted the same way holds both: the second's
//! segments are the conversion, the first's leftovers.
//!
//! Converted records get new positions: a dead letter that an earlier run stored after its
//! last checkpoint is stored again under a new id. Readings are unaffected (their id is their
//! content). Damage met in the old segments is skipped and logged, once per segment.

use std::fs::{self, File};
use std::io::{self, BufWriter, Write as _};
use std::path::Path;

use bytes::Bytes;

use super::format::{self, Framing, Key};
use super::segment::{Event, SegmentScan};
use crate::domain::Captured;

pub const FIRST: &str = "seg";
pub const SECOND: &str = "wal";
const TEMP: &str = "upgrade.tmp";
const HEADER_BYTES: usize = 8;
const FIXED_BODY_BYTES: usize = 1 + 8 + 4 + 2;
const MAX_BODY_BYTES: usize = 1 << 20;

/// Converts a log in an earlier format, if `dir` holds one (see the module's documentation).
pub fn upgrade(dir: &Path, checkpoint: u64, key: &Key) -> io::Result<()> {
    let first = super::list_segments(dir, FIRST)?;
    let second = super::list_segments(dir, SECOND)?;
    if first.is_empty() && second.is_empty() {
        return Ok(());
    }
    if !super::list_segments(dir, super::EXTENSION)?.is_empty() {
        // A conversion finished; only deleting its sources was interrupted.
        remove(dir, FIRST, &first)?;
        return remove(dir, SECOND, &second);
    }
    if !second.is_empty() {
        remove(dir, FIRST, &first)?;
        return convert(dir, SECOND, &second, checkpoint, key);
    }
    convert(dir, FIRST, &first, checkpoint, key)
}

fn convert(
    dir: &Path,
    extension: &str,
    bases: &[u64],
    checkpoint: u64,
    key: &Key,
) -> io::Result<()> {
    let path = |base: u64| dir.join(format!("{base:020}.{extension}"));
    let last = bases[bases.len() - 1];
    let end = last + fs::metadata(path(last))?.len();
    let mut out = Output {
        file: BufWriter::new(File::create(dir.join(TEMP))?),
        key,
        base: end,
        offset: 0,
        records: 0,
        body: Vec::new(),
        framed: Vec::new(),
    };
    for (i, &base) in bases.iter().enumerate() {
        let sealed = i + 1 < bases.len();
        if sealed && bases[i + 1] <= checkpoint {
            continue;
        }
        let from = checkpoint.saturating_sub(base);
        if extension == FIRST {
            convert_first(&path(base), base, from, sealed, &mut out)?;
        } else {
            convert_second(&path(base), from, sealed, &mut out)?;
        }
    }
    let file = out
        .file
        .into_inner()
        .map_err(io::IntoInnerError::into_error)?;
    file.sync_data()?;
    fs::rename(dir.join(TEMP), super::segment_path(dir, end))?;
    super::sync_dir(dir)?;
    remove(dir, extension, bases)?;
    tracing::info!(
        from_format = extension,
        records = out.records,
        bytes = out.offset,
        segment_base = end,
        "converted the unstored part of the local log to the current format"
    );
    Ok(())
}

/// The segment being written, based at the old log's end.
struct Output<'a> {
    file: BufWriter<File>,
    key: &'a Key,
    base: u64,
    offset: u64,
    records: u64,
    body: Vec<u8>,
    framed: Vec<u8>,
}

impl Output<'_> {
    fn push(&mut self, message: &Captured) -> io::Result<()> {
        self.body.clear();
        format::encode_body(message, &mut self.body);
        self.framed.clear();
        format::frame(
            &self.body,
            self.key,
            self.base,
            self.offset,
            &mut self.framed,
        );
        self.file.write_all(&self.framed)?;
        self.offset += self.framed.len() as u64;
        self.records += 1;
        Ok(())
    }
}

fn convert_first(
    path: &Path,
    base: u64,
    from: u64,
    sealed: bool,
    out: &mut Output<'_>,
) -> io::Result<()> {
    let bytes = Bytes::from(fs::read(path)?);
    let mut at = usize::try_from(from).unwrap_or(usize::MAX);
    while at < bytes.len() {
        let Some((message, len)) = decode(&bytes.slice(at..)) else {
            // The first format could not frame anything after damage: what followed in this
            // segment was already lost to its reader. At the end of the last segment it is a
            // record a crash tore.
            tracing::error!(
                segment = %path.display(),
                lsn = base + at as u64,
                skipped_bytes = bytes.len() - at,
                torn_tail = !sealed,
                "local log in the first format is unreadable from here to its segment's end"
            );
            break;
        };
        out.push(&message)?;
        at += len;
    }
    Ok(())
}

fn convert_second(path: &Path, from: u64, sealed: bool, out: &mut Output<'_>) -> io::Result<()> {
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    // Its base is not needed: the second format's checks do not involve the position.
    let mut scan = SegmentScan::new(file, 0, len, 1 << 20, Framing::V1);
    let (mut at, mut skipped, mut stretches, mut damaged_to) = (from, 0, 0, 0);
    loop {
        match scan.next(at)? {
            Event::Record { start, end, body } => {
                match format::decode_body(&body) {
                    Some(message) => out.push(&message)?,
                    None => (skipped, stretches) = (skipped + end - start, stretches + 1),
                }
                at = end;
            }
            Event::Damage { start, end } => {
                skipped += end - start;
                stretches += 1;
                (at, damaged_to) = (end, end);
            }
            Event::End => break,
        }
    }
    if skipped > 0 {
        // Damage that reaches the end of the last segment is a record a crash tore.
        tracing::error!(
            segment = %path.display(),
            skipped_bytes = skipped,
            stretches,
            torn_tail = !sealed && damaged_to == len,
            "local log in the second format is damaged; skipped what could not be read"
        );
    }
    Ok(())
}

fn remove(dir: &Path, extension: &str, bases: &[u64]) -> io::Result<()> {
    if bases.is_empty() {
        return Ok(());
    }
    for base in bases {
        fs::remove_file(dir.join(format!("{base:020}.{extension}")))?;
    }
    super::sync_dir(dir)
}

/// The first format's record at the front of `buf` and the bytes it took; `None` for damage or
/// a torn tail.
fn decode(buf: &Bytes) -> Option<(Captured, usize)> {
    let header = buf.get(..HEADER_BYTES)?;
    let body_len = u32::from_le_bytes(header[..4].try_into().ok()?) as usize;
    if !(FIXED_BODY_BYTES..=MAX_BODY_BYTES).contains(&body_len) {
        return None;
    }
    let body = buf.get(HEADER_BYTES..HEADER_BYTES + body_len)?;
    if crc32fast::hash(body) != u32::from_le_bytes(header[4..].try_into().ok()?) {
        return None;
    }
    let message = format::decode_body(&buf.slice(HEADER_BYTES..HEADER_BYTES + body_len))?;
    Some((message, HEADER_BYTES + body_len))
}

/// The first format's encoder, for tests of the upgrade.
#[cfg(test)]
pub fn encode(message: &Captured, out: &mut Vec<u8>) {
    let mut body = Vec::new();
    format::encode_body(message, &mut body);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out.extend_from_slice(&body);
}
