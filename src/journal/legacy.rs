//! The log's first on-disk format, kept only to upgrade a log written in it. It must not be used
//! for anything else: nothing writes this format any more.
//!
//! Segments were `<base>.seg`, records back to back as `u32 body length | u32 CRC-32 of body |
//! body`, the body the same as version 1 of `format`'s. At open, before anything else reads the
//! directory, the records past the checkpoint are framed anew into one `.wal` segment. Its base
//! is the old log's end, so log positions never move backwards (dead-letter ids, which hold a
//! position, stay unique); the old checkpoint lies below it and so means "start at this segment".
//! The new segment is written under a temporary name, synced, and renamed into place before the
//! old segments are deleted: a crash at any point leaves either the old log whole (the conversion
//! starts again) or the new segment whole (the old ones are leftovers, deleted at the next open).
//!
//! Converted records get new positions: a dead letter that an earlier run stored after its
//! last checkpoint is stored again under a new id. Readings are unaffected (their id is their
//! content).

use std::fs::{self, File};
use std::io::{self, BufWriter, Write as _};
use std::path::Path;

use bytes::Bytes;

use super::format;
use crate::domain::Captured;

pub const EXTENSION: &str = "seg";
const TEMP: &str = "upgrade.tmp";
const HEADER_BYTES: usize = 8;
const FIXED_BODY_BYTES: usize = 1 + 8 + 4 + 2;
const MAX_BODY_BYTES: usize = 1 << 20;

/// Converts a log in the first format, if `dir` holds one (see the module's documentation).
pub fn upgrade(dir: &Path, checkpoint: u64) -> io::Result<()> {
    let legacy = super::list_segments(dir, EXTENSION)?;
    let temp = dir.join(TEMP);
    if legacy.is_empty() {
        return Ok(());
    }
    if !super::list_segments(dir, super::EXTENSION)?.is_empty() {
        // A conversion finished; only deleting its sources was interrupted.
        return remove(dir, &legacy);
    }
    let path = |base: u64| dir.join(format!("{base:020}.{EXTENSION}"));
    let last = legacy[legacy.len() - 1];
    let end = last + fs::metadata(path(last))?.len();
    let mut out = BufWriter::new(File::create(&temp)?);
    let (mut offset, mut records) = (0_u64, 0_u64);
    let (mut body, mut framed) = (Vec::new(), Vec::new());
    for (i, &base) in legacy.iter().enumerate() {
        let sealed = i + 1 < legacy.len();
        if sealed && legacy[i + 1] <= checkpoint {
            continue;
        }
        let bytes = Bytes::from(fs::read(path(base))?);
        let mut at = usize::try_from(checkpoint.saturating_sub(base)).unwrap_or(usize::MAX);
        while at < bytes.len() {
            let Some((message, len)) = decode(&bytes.slice(at..)) else {
                // The first format could not frame anything after damage: what followed in
                // this segment was already lost to its reader. At the end of the last segment
                // it is a record a crash tore.
                tracing::error!(
                    segment = %path(base).display(),
                    lsn = base + at as u64,
                    skipped_bytes = bytes.len() - at,
                    torn_tail = !sealed,
                    "local log in the first format is unreadable from here to its segment's end"
                );
                break;
            };
            body.clear();
            format::encode_body(&message, &mut body);
            framed.clear();
            format::frame(&body, offset, &mut framed);
            out.write_all(&framed)?;
            offset += framed.len() as u64;
            records += 1;
            at += len;
        }
    }
    let file = out.into_inner().map_err(io::IntoInnerError::into_error)?;
    file.sync_data()?;
    fs::rename(&temp, super::segment_path(dir, end))?;
    super::sync_dir(dir)?;
    remove(dir, &legacy)?;
    tracing::info!(
        records,
        bytes = offset,
        segment_base = end,
        "converted the unstored part of the local log to the block-framed format"
    );
    Ok(())
}

fn remove(dir: &Path, bases: &[u64]) -> io::Result<()> {
    for base in bases {
        fs::remove_file(dir.join(format!("{base:020}.{EXTENSION}")))?;
    }
    super::sync_dir(dir)
}

/// The record at the front of `buf` and the bytes it took; `None` for damage or a torn tail.
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
