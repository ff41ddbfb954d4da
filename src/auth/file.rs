//! The credentials file: one `[[device]]` table per credential, TOML, written by
//! `sensorhub passwd` and read at start and on SIGHUP.
//!
//! ```toml
//! [[device]]
//! user = "plant3-gateway"
//! password_hash = "$argon2id$v=19$m=19456,t=2,p=1$..."   # absent: client certificate only
//! publish = ["plant3/*"]        # sensor ids it may write readings for
//! subscribe = []                # topic filters it may subscribe within
//! ```
//!
//! Only hashes are stored (Argon2id PHC strings); the file is written with mode 0600, by rename.

use std::path::Path;

use argon2::password_hash::{PasswordHash, PasswordHasher as _, SaltString};
use serde::{Deserialize, Serialize};

use super::pattern::{FilterPattern, SensorPattern};

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot read the credentials file {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the credentials file {path}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the credentials file {path} is not valid: {message}")]
    Invalid { path: String, message: String },
    #[error("cannot hash the password: {0}")]
    Hash(String),
}

/// A credential as the file holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceEntry {
    /// The MQTT user name, and the common name of the device's client certificate.
    pub user: String,
    /// Argon2id PHC string; absent for a device that authenticates by certificate only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_hash: Option<String>,
    /// Sensor id patterns it may publish readings for.
    #[serde(default)]
    pub publish: Vec<String>,
    /// Topic filters it may subscribe within. Empty: it may subscribe to nothing.
    #[serde(default)]
    pub subscribe: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialsFile {
    #[serde(default, rename = "device")]
    pub devices: Vec<DeviceEntry>,
}

/// A checked credential, ready for the gatekeeper.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Device {
    pub user: String,
    pub password_hash: Option<String>,
    pub publish: Vec<SensorPattern>,
    pub subscribe: Vec<FilterPattern>,
}

const HEADER: &str = "# sensorhub MQTT credentials, written by `sensorhub passwd`. Only password \
                      hashes are kept.\n# Read at start and on SIGHUP.\n\n";

impl CredentialsFile {
    /// Parses and checks every entry (hash syntax, patterns, unique users).
    pub fn parse(text: &str, path: &str) -> Result<Vec<Device>, FileError> {
        let invalid = |message: String| FileError::Invalid {
            path: path.to_owned(),
            message,
        };
        let file: CredentialsFile = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        let mut devices: Vec<Device> = Vec::with_capacity(file.devices.len());
        for entry in file.devices {
            let user = entry.user;
            check_user(&user).map_err(&invalid)?;
            if devices.iter().any(|d| d.user == user) {
                return Err(invalid(format!("user '{user}' appears twice")));
            }
            if let Some(hash) = &entry.password_hash {
                PasswordHash::new(hash)
                    .map_err(|e| invalid(format!("user '{user}': password_hash: {e}")))?;
            }
            let publish = entry
                .publish
                .iter()
                .map(|p| SensorPattern::parse(p))
                .collect::<Result<_, _>>()
                .map_err(|e| invalid(format!("user '{user}': publish: {e}")))?;
            let subscribe = entry
                .subscribe
                .iter()
                .map(|p| FilterPattern::parse(p))
                .collect::<Result<_, _>>()
                .map_err(|e| invalid(format!("user '{user}': subscribe: {e}")))?;
            devices.push(Device {
                user,
                password_hash: entry.password_hash,
                publish,
                subscribe,
            });
        }
        Ok(devices)
    }

    pub fn load(path: &Path) -> Result<Vec<Device>, FileError> {
        let text = std::fs::read_to_string(path).map_err(|source| FileError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Reads `path` as it is, or an empty file when it does not exist yet.
    pub fn read_raw(path: &Path) -> Result<Self, FileError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(source) => {
                return Err(FileError::Read {
                    path: path.display().to_string(),
                    source,
                });
            }
        };
        Self::parse(&text, &path.display().to_string())?;
        toml::from_str(&text).map_err(|e| FileError::Invalid {
            path: path.display().to_string(),
            message: e.to_string(),
        })
    }

    /// Adds `entry`, replacing the entry of the same user.
    pub fn upsert(&mut self, entry: DeviceEntry) {
        match self.devices.iter_mut().find(|d| d.user == entry.user) {
            Some(existing) => *existing = entry,
            None => self.devices.push(entry),
        }
    }

    /// Removes `user`'s entry; whether there was one.
    pub fn remove(&mut self, user: &str) -> bool {
        let before = self.devices.len();
        self.devices.retain(|d| d.user != user);
        before != self.devices.len()
    }

    pub fn to_text(&self) -> Result<String, FileError> {
        let body = toml::to_string(self).map_err(|e| FileError::Invalid {
            path: String::new(),
            message: e.to_string(),
        })?;
        Ok(format!("{HEADER}{body}"))
    }

    /// Writes the file readable by its owner only, replacing it atomically.
    pub fn save(&self, path: &Path) -> Result<(), FileError> {
        write_private(path, &self.to_text()?)
    }
}

/// Writes `text` to `path` readable by its owner only, replacing the file atomically.
pub(super) fn write_private(path: &Path, text: &str) -> Result<(), FileError> {
    let write = |source| FileError::Write {
        path: path.display().to_string(),
        source,
    };
    let tmp = path.with_extension("tmp");
    {
        use std::io::Write as _;
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(&tmp).map_err(write)?;
        file.write_all(text.as_bytes()).map_err(write)?;
        file.sync_all().map_err(write)?;
    }
    std::fs::rename(&tmp, path).map_err(write)
}

/// An Argon2id hash of `password` with a fresh random salt (OWASP's parameters: 19 MiB, t=2).
pub fn hash_password(password: &str) -> Result<String, FileError> {
    let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>())
        .map_err(|e| FileError::Hash(e.to_string()))?;
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|e| FileError::Hash(e.to_string()))
}

pub fn check_user(user: &str) -> Result<(), String> {
    if user.is_empty() || user.len() > 256 {
        return Err(format!(
            "user name '{user}' must be between 1 and 256 bytes"
        ));
    }
    if user.chars().any(char::is_control) {
        return Err(format!("user name {user:?} contains a control character"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_through_the_file_format() {
        let mut file = CredentialsFile::default();
        let hash = hash_password("s3cret").unwrap();
        assert!(hash.starts_with("$argon2id$"));
        file.upsert(DeviceEntry {
            user: "plant3".into(),
            password_hash: Some(hash.clone()),
            publish: vec!["plant3/*".into()],
            subscribe: vec![],
        });
        file.upsert(DeviceEntry {
            user: "dashboard".into(),
            password_hash: None,
            publish: vec![],
            subscribe: vec!["sensors/#".into()],
        });
        // Replacing keeps one entry per user.
        file.upsert(DeviceEntry {
            user: "plant3".into(),
            password_hash: Some(hash.clone()),
            publish: vec!["plant3/*".into(), "plant3b/*".into()],
            subscribe: vec![],
        });
        let text = file.to_text().unwrap();
        assert!(!text.contains("s3cret"));
        let devices = CredentialsFile::parse(&text, "f").unwrap();
        assert_eq!(devices.len(), 2);
        assert_eq!(devices[0].user, "plant3");
        assert_eq!(devices[0].publish.len(), 2);
        assert_eq!(devices[0].password_hash.as_deref(), Some(hash.as_str()));
        assert!(devices[0].subscribe.is_empty());
        assert_eq!(devices[1].password_hash, None);
        assert_eq!(devices[1].subscribe[0].as_str(), "sensors/#");
        assert!(file.remove("dashboard"));
        assert!(!file.remove("dashboard"));
    }

    #[test]
    fn rejects_what_it_cannot_trust() {
        let bad = |text: &str| CredentialsFile::parse(text, "f").unwrap_err().to_string();
        assert!(
            bad("[[device]]\nuser = \"a\"\npassword_hash = \"plain\"\n").contains("password_hash")
        );
        assert!(bad("[[device]]\nuser = \"a\"\n[[device]]\nuser = \"a\"\n").contains("twice"));
        assert!(bad("[[device]]\nuser = \"a\"\nsubscribe = [\"a/#/b\"]\n").contains("subscribe"));
        assert!(bad("[[device]]\nuser = \"\"\n").contains("user name"));
        assert!(bad("[[device]]\nuser = \"a\"\npasword = \"x\"\n").contains("unknown field"));
        assert!(CredentialsFile::parse("", "f").unwrap().is_empty());
    }
}
