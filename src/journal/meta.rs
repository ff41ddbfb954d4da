//! The log's `meta` file: its id, which keeps dead-letter ids unique across wiped logs, and its
//! key (`format::Key`), with the log position from which segments are tagged under that key.
//! Only `Journal::open` reads or writes it, and it is only ever replaced whole: written under a
//! temporary name, synced, renamed, and the directory synced.
//!
//! ```text
//! <id>                    16 hex digits
//! key <32 hex digits>
//! keyed-from <lsn>        segments based here or later are tagged under the key
//! check <16 hex digits>   the key's tag of "meta" at keyed-from
//! ```
//!
//! The check makes a damaged key line read as no key rather than as a wrong key, which would
//! make every fragment look damaged. A log without a key (its meta written by an earlier build,
//! lost, or damaged) gets a new one; what was written before it is read by its CRC alone.

use std::fs::{self, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

use super::format::Key;

const FILE: &str = "meta";
const TEMP: &str = "meta.tmp";
const CHECKED: &[u8] = b"meta";

#[derive(Debug)]
pub struct Meta {
    pub id: String,
    pub key: Key,
    pub keyed_from: u64,
}

/// What a `meta` file holds, as far as it can be read.
#[derive(Debug, Default)]
pub struct Found {
    pub id: Option<String>,
    /// The key and where it applies from, if they passed their check.
    pub key: Option<(Key, u64)>,
}

pub fn new_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Reads `dir`'s meta; a missing or unreadable one holds nothing.
pub fn read(dir: &Path) -> Found {
    let Ok(text) = fs::read_to_string(dir.join(FILE)) else {
        return Found::default();
    };
    let mut lines = text.lines();
    let id = lines
        .next()
        .map(str::trim)
        .filter(|id| !id.is_empty())
        .map(str::to_owned);
    let fields: Vec<(&str, &str)> = lines
        .filter_map(|line| line.trim().split_once(' '))
        .collect();
    let field = |name: &str| {
        fields
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, value)| *value)
    };
    let key = (|| {
        let hex = field("key")?;
        let keyed_from: u64 = field("keyed-from")?.parse().ok()?;
        let check = u64::from_str_radix(field("check")?, 16).ok()?;
        let mut bytes = [0_u8; 16];
        if hex.len() != 2 * bytes.len() {
            return None;
        }
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        let key = Key::from_bytes(bytes);
        (key.tag(keyed_from, CHECKED) == check).then_some((key, keyed_from))
    })();
    Found { id, key }
}

/// Replaces `dir`'s meta with `meta`, durably. Readable by its owner only: the key is what
/// keeps a publisher from forging a record.
pub fn write(dir: &Path, meta: &Meta) -> io::Result<()> {
    let hex: String = meta
        .key
        .to_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let check = meta.key.tag(meta.keyed_from, CHECKED);
    let tmp = dir.join(TEMP);
    // A leftover keeps its mode through a truncation; a new file gets ours.
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    write!(
        file,
        "{}\nkey {hex}\nkeyed-from {}\ncheck {check:016x}\n",
        meta.id, meta.keyed_from
    )?;
    file.sync_data()?;
    fs::rename(&tmp, dir.join(FILE))?;
    super::sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> Meta {
        Meta {
            id: "0123456789abcdef".into(),
            key: Key::from_bytes(*b"sixteen byte key"),
            keyed_from: 12_345,
        }
    }

    #[test]
    fn a_meta_reads_back_and_a_damaged_key_reads_as_none() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &meta()).unwrap();
        let found = read(dir.path());
        assert_eq!(found.id.as_deref(), Some("0123456789abcdef"));
        let (key, keyed_from) = found.key.unwrap();
        assert_eq!(key.to_bytes(), *b"sixteen byte key");
        assert_eq!(keyed_from, 12_345);
        let text = fs::read_to_string(dir.path().join(FILE)).unwrap();
        for (from, to) in [("key 73", "key 74"), ("keyed-from 1", "keyed-from 2")] {
            assert!(text.contains(from));
            fs::write(dir.path().join(FILE), text.replacen(from, to, 1)).unwrap();
            let found = read(dir.path());
            assert_eq!(found.id.as_deref(), Some("0123456789abcdef"));
            assert!(found.key.is_none(), "{to}");
        }
    }

    #[test]
    fn a_meta_of_an_earlier_build_holds_its_id_alone() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(FILE), "0123456789abcdef\n").unwrap();
        let found = read(dir.path());
        assert_eq!(found.id.as_deref(), Some("0123456789abcdef"));
        assert!(found.key.is_none());
        assert!(read(&dir.path().join("nowhere")).id.is_none());
    }
}
