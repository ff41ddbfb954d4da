//! Bearer keys of the HTTP API: the key file written by `sensorhub apikey`, and the check of a
//! presented key against it.
//!
//! ```toml
//! [[key]]
//! name = "grafana"
//! role = "read"              # read: every GET data endpoint; admin: also the destructive ones
//! hash = "blake2b:9f2c..."   # BLAKE2b-512 of the key; the key itself is never stored
//! ```
//!
//! A key is 256 random bits, so a fast hash is enough to keep the file useless to whoever reads
//! it (no dictionary reaches a random key); Argon2, which device passwords get, is for secrets
//! people choose. The file is written with mode 0600, by rename, and read at start and on SIGHUP;
//! a file that does not load leaves the keys in force.

use std::path::{Path, PathBuf};
use std::sync::{PoisonError, RwLock};

use blake2::{Blake2b512, Digest as _};
use serde::{Deserialize, Serialize};

use super::FileError;

/// What a key may do. An admin key may do everything a read key may.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Every GET data endpoint.
    Read,
    /// Also the destructive operations (deleting readings, replaying dead letters).
    Admin,
}

impl Role {
    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "read" => Ok(Self::Read),
            "admin" => Ok(Self::Admin),
            other => Err(format!("role '{other}' is not read or admin")),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Admin => "admin",
        }
    }
}

/// A key as the file holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyEntry {
    pub name: String,
    pub role: Role,
    pub hash: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyFile {
    #[serde(default, rename = "key")]
    pub keys: Vec<KeyEntry>,
}

const HASH_PREFIX: &str = "blake2b:";
const KEY_PREFIX: &str = "shk_";
const HEADER: &str = "# sensorhub HTTP API keys, written by `sensorhub apikey`. Only hashes of \
                      the keys are kept.\n# Read at start and on SIGHUP.\n\n";

/// The stored form of `key`.
pub fn hash_key(key: &str) -> String {
    let digest = Blake2b512::digest(key.as_bytes());
    let mut out = String::with_capacity(HASH_PREFIX.len() + 128);
    out.push_str(HASH_PREFIX);
    for byte in digest {
        out.push_str(&format!("{byte:02x}"));
    }
    out
}

/// A new key: `shk_` and 256 random bits in hex.
pub fn new_key() -> String {
    let bytes: [u8; 32] = rand::random();
    let mut key = String::from(KEY_PREFIX);
    for byte in bytes {
        key.push_str(&format!("{byte:02x}"));
    }
    key
}

fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 128 || name.chars().any(char::is_control) {
        return Err(format!(
            "key name {name:?} must be 1 to 128 bytes without control characters"
        ));
    }
    Ok(())
}

impl KeyFile {
    /// Parses and checks every entry (hash syntax, unique names).
    pub fn parse(text: &str, path: &str) -> Result<Self, FileError> {
        let invalid = |message: String| FileError::Invalid {
            path: path.to_owned(),
            message,
        };
        let file: KeyFile = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        for (i, entry) in file.keys.iter().enumerate() {
            check_name(&entry.name).map_err(&invalid)?;
            if file.keys[..i].iter().any(|k| k.name == entry.name) {
                return Err(invalid(format!("key '{}' appears twice", entry.name)));
            }
            let hex = entry.hash.strip_prefix(HASH_PREFIX).unwrap_or_default();
            if hex.len() != 128 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(invalid(format!(
                    "key '{}': hash must be {HASH_PREFIX} and 128 hex digits",
                    entry.name
                )));
            }
        }
        Ok(file)
    }

    pub fn load(path: &Path) -> Result<Self, FileError> {
        let text = std::fs::read_to_string(path).map_err(|source| FileError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Reads `path`, or an empty file when it does not exist yet.
    pub fn read_or_new(path: &Path) -> Result<Self, FileError> {
        match std::fs::metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            _ => Self::load(path),
        }
    }

    /// Adds a key named `name` with `role`, replacing the key of that name; returns the key,
    /// which exists nowhere else from now on.
    pub fn issue(&mut self, name: &str, role: Role) -> Result<String, String> {
        check_name(name)?;
        let key = new_key();
        let entry = KeyEntry {
            name: name.to_owned(),
            role,
            hash: hash_key(&key),
        };
        match self.keys.iter_mut().find(|k| k.name == name) {
            Some(existing) => *existing = entry,
            None => self.keys.push(entry),
        }
        Ok(key)
    }

    /// Writes the file readable by its owner only, replacing it atomically.
    pub fn save(&self, path: &Path) -> Result<(), FileError> {
        let body = toml::to_string(self).map_err(|e| FileError::Invalid {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        super::file::write_private(path, &format!("{HEADER}{body}"))
    }
}

/// Why a presented key was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyRefusal {
    /// No `Authorization: Bearer` key was sent.
    Missing,
    /// A key was sent that the file does not hold.
    Unknown,
    /// The key is valid but its role is below what the operation needs.
    Insufficient(Role),
}

/// The keys in force, replaced whole by `reload`.
#[derive(Debug)]
pub struct ApiKeys {
    path: PathBuf,
    keys: RwLock<Vec<KeyEntry>>,
}

impl ApiKeys {
    pub fn from_file(path: &Path) -> Result<Self, FileError> {
        let file = KeyFile::load(path)?;
        Ok(Self {
            path: path.to_owned(),
            keys: RwLock::new(file.keys),
        })
    }

    /// Reads the file again; on error the keys in force stay. Returns how many keys it holds.
    pub fn reload(&self) -> Result<usize, FileError> {
        let file = KeyFile::load(&self.path)?;
        let count = file.keys.len();
        *self.keys.write().unwrap_or_else(PoisonError::into_inner) = file.keys;
        Ok(count)
    }

    /// The name of the key `presented` when it carries at least `needed`.
    pub fn check(&self, presented: Option<&str>, needed: Role) -> Result<String, KeyRefusal> {
        let presented = presented.ok_or(KeyRefusal::Missing)?;
        let hash = hash_key(presented);
        let keys = self.keys.read().unwrap_or_else(PoisonError::into_inner);
        // Every entry is compared in full: the time taken says nothing about which one matched.
        let mut found: Option<&KeyEntry> = None;
        for entry in keys.iter() {
            if constant_time_eq(entry.hash.as_bytes(), hash.as_bytes()) {
                found = Some(entry);
            }
        }
        let entry = found.ok_or(KeyRefusal::Unknown)?;
        if entry.role < needed {
            return Err(KeyRefusal::Insufficient(entry.role));
        }
        Ok(entry.name.clone())
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_keys_check_by_role_and_only_hashes_are_written() {
        let mut file = KeyFile::default();
        let read = file.issue("grafana", Role::Read).unwrap();
        let admin = file.issue("ops", Role::Admin).unwrap();
        assert!(read.starts_with("shk_") && read.len() == 68, "{read}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        file.save(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            !text.contains(&read[4..]) && !text.contains(&admin[4..]),
            "{text}"
        );
        let keys = ApiKeys::from_file(&path).unwrap();
        assert_eq!(keys.check(Some(&read), Role::Read), Ok("grafana".into()));
        assert_eq!(
            keys.check(Some(&read), Role::Admin),
            Err(KeyRefusal::Insufficient(Role::Read))
        );
        assert_eq!(keys.check(Some(&admin), Role::Admin), Ok("ops".into()));
        assert_eq!(keys.check(Some(&admin), Role::Read), Ok("ops".into()));
        assert_eq!(
            keys.check(Some("shk_0"), Role::Read),
            Err(KeyRefusal::Unknown)
        );
        assert_eq!(keys.check(None, Role::Read), Err(KeyRefusal::Missing));

        // Replacing a key retires the old one; a reload takes the file as it is now.
        let mut file = KeyFile::read_or_new(&path).unwrap();
        let again = file.issue("grafana", Role::Read).unwrap();
        file.save(&path).unwrap();
        assert_eq!(file.keys.len(), 2);
        assert_eq!(keys.reload().unwrap(), 2);
        assert_eq!(
            keys.check(Some(&read), Role::Read),
            Err(KeyRefusal::Unknown)
        );
        assert_eq!(keys.check(Some(&again), Role::Read), Ok("grafana".into()));
    }

    #[test]
    fn rejects_files_it_cannot_trust() {
        let bad = |text: &str| KeyFile::parse(text, "f").unwrap_err().to_string();
        let hash = hash_key("x");
        assert!(bad("[[key]]\nname = \"a\"\nrole = \"read\"\nhash = \"plain\"\n").contains("hash"));
        assert!(
            bad(&format!(
                "[[key]]\nname = \"a\"\nrole = \"read\"\nhash = \"{hash}\"\n\
                 [[key]]\nname = \"a\"\nrole = \"admin\"\nhash = \"{hash}\"\n"
            ))
            .contains("twice")
        );
        assert!(
            bad(&format!(
                "[[key]]\nname = \"a\"\nrole = \"root\"\nhash = \"{hash}\"\n"
            ))
            .contains("role")
        );
        assert!(KeyFile::parse("", "f").unwrap().keys.is_empty());
        assert_eq!(Role::parse("admin"), Ok(Role::Admin));
        assert!(Role::parse("write").is_err());
    }
}
