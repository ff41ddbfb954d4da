//! Who a device is and what it may do: the credentials file, password verification, and the
//! grants the broker's capture codec enforces on CONNECT, PUBLISH and SUBSCRIBE; and the bearer
//! keys of the HTTP API (`api_keys`), which the API checks.
//!
//! This module knows nothing of MQTT packets or sockets: the codec asks it questions (may this
//! login connect? may this grant write this sensor id?) and turns the answers into reason codes.
//! Verifying a password is deliberately slow (Argon2id, tens of milliseconds of CPU): `login`
//! blocks its caller, bounds how many run at once, and remembers recent successes so a fleet
//! reconnecting after an outage does not cost one Argon2 run per device each time.

pub mod api_keys;
mod file;
mod pattern;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, PoisonError, RwLock};

use argon2::password_hash::{PasswordHash, PasswordVerifier as _};
use blake2::{Blake2b512, Digest as _};

pub use api_keys::{ApiKeys, KeyFile, KeyRefusal, Role};
pub use file::{CredentialsFile, Device, DeviceEntry, FileError, check_user, hash_password};
pub use pattern::{FilterPattern, SensorPattern, unshared};

/// What an authenticated connection may do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Access {
    /// Anonymous access, which the operator turned on: everything, as without authentication.
    Anonymous,
    /// A credential's grant.
    Device(Arc<Grant>),
}

impl Access {
    /// Whether a reading for `sensor_id` may be written.
    pub fn may_publish(&self, sensor_id: &str) -> bool {
        match self {
            Access::Anonymous => true,
            Access::Device(grant) => grant.publish.iter().any(|p| p.matches(sensor_id)),
        }
    }

    /// Whether a subscription to `filter` (shared or not) may be made.
    pub fn may_subscribe(&self, filter: &str) -> bool {
        match self {
            Access::Anonymous => true,
            Access::Device(grant) => {
                let filter = unshared(filter);
                grant.subscribe.iter().any(|p| p.covers(filter))
            }
        }
    }

    /// Whether messages outside `sensors/#` may be published (only without authentication:
    /// a credential grants readings, nothing else).
    pub fn may_publish_other_topics(&self) -> bool {
        matches!(self, Access::Anonymous)
    }

    pub fn user(&self) -> Option<&str> {
        match self {
            Access::Anonymous => None,
            Access::Device(grant) => Some(&grant.user),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    pub user: String,
    pub publish: Vec<SensorPattern>,
    pub subscribe: Vec<FilterPattern>,
}

/// Why a connection is refused; the codec maps each to the CONNACK code of its MQTT version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Unknown user or wrong password (3.1.1: 0x04, 5: 0x86).
    #[error("bad user name or password")]
    BadCredentials,
    /// No credentials where they are required, or a certificate with no entry (0x05 / 0x87).
    #[error("not authorized")]
    NotAuthorized,
    /// Too many logins waiting for verification (0x03 / 0x89).
    #[error("too many logins being verified")]
    Busy,
}

/// The credentials in force and how logins are checked against them. Shared by every codec.
#[derive(Debug)]
pub struct Gatekeeper {
    /// `None`: no credentials file, every connection is anonymous.
    file: Option<PathBuf>,
    allow_anonymous: bool,
    credentials: RwLock<Arc<Credentials>>,
    /// Credentials added by the process itself (the built-in simulator), kept across reloads.
    internal: Vec<Device>,
    slots: Slots,
    /// Recent successful logins: user -> keyed digest of the password that worked, for the
    /// credentials generation it worked against.
    recent: Mutex<HashMap<String, [u8; 64]>>,
    key: [u8; 32],
}

#[derive(Debug, Default)]
struct Credentials {
    by_user: HashMap<String, (Option<String>, Arc<Grant>)>,
}

/// Argon2 runs at once; more wait. Beyond `MAX_WAITING` waiting, logins are refused as busy.
const VERIFYING_AT_ONCE: usize = 2;
const MAX_WAITING: usize = 64;
/// Entries of the success cache before it is emptied.
const RECENT_MAX: usize = 10_000;

impl Gatekeeper {
    /// No credentials: every connection is anonymous (the caller decided this is safe).
    pub fn open() -> Self {
        Self::with(None, true, Vec::new(), Vec::new())
    }

    /// Credentials from `path`, plus `internal` ones; anonymous only if `allow_anonymous`.
    pub fn from_file(
        path: &Path,
        allow_anonymous: bool,
        internal: Vec<Device>,
    ) -> Result<Self, FileError> {
        let devices = CredentialsFile::load(path)?;
        Ok(Self::with(
            Some(path.to_owned()),
            allow_anonymous,
            devices,
            internal,
        ))
    }

    fn with(
        file: Option<PathBuf>,
        allow_anonymous: bool,
        devices: Vec<Device>,
        internal: Vec<Device>,
    ) -> Self {
        let credentials = Credentials::new(devices.into_iter().chain(internal.iter().cloned()));
        Self {
            file,
            allow_anonymous,
            credentials: RwLock::new(Arc::new(credentials)),
            internal,
            slots: Slots::default(),
            recent: Mutex::new(HashMap::new()),
            key: rand::random(),
        }
    }

    /// Whether connections need credentials at all.
    pub fn enforced(&self) -> bool {
        self.file.is_some()
    }

    /// Reads the credentials file again; on error the old credentials stay in force.
    /// Returns how many credentials are now in force.
    pub fn reload(&self) -> Result<usize, FileError> {
        let Some(path) = &self.file else {
            return Ok(0);
        };
        let devices = CredentialsFile::load(path)?;
        let credentials =
            Credentials::new(devices.into_iter().chain(self.internal.iter().cloned()));
        let count = credentials.by_user.len();
        *self
            .credentials
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(credentials);
        // A changed or removed password must not keep working from the cache.
        self.recent().clear();
        Ok(count)
    }

    /// Decides a login without verifying a password hash, when it can: no credentials in
    /// force, anonymous, or a password that just succeeded. `None`: call `login`.
    pub fn login_quick(&self, login: Option<(&str, &str)>) -> Option<Result<Access, Refusal>> {
        if !self.enforced() {
            return Some(Ok(Access::Anonymous));
        }
        let Some((user, password)) = login else {
            return Some(if self.allow_anonymous {
                Ok(Access::Anonymous)
            } else {
                Err(Refusal::NotAuthorized)
            });
        };
        let credentials = self.current();
        match credentials.by_user.get(user) {
            Some((Some(_), grant))
                if self.recent().get(user) == Some(&self.digest(user, password)) =>
            {
                Some(Ok(Access::Device(Arc::clone(grant))))
            }
            _ => None,
        }
    }

    /// Checks a CONNECT's user name and password. CPU-heavy (Argon2): blocks the calling
    /// thread; call it where blocking is allowed.
    pub fn login(&self, login: Option<(&str, &str)>) -> Result<Access, Refusal> {
        if let Some(verdict) = self.login_quick(login) {
            return verdict;
        }
        let Some((user, password)) = login else {
            return Err(Refusal::NotAuthorized);
        };
        let credentials = self.current();
        let _slot = self.slots.take().ok_or(Refusal::Busy)?;
        match credentials.by_user.get(user) {
            Some((Some(hash), grant)) => {
                if verify(hash, password) {
                    let digest = self.digest(user, password);
                    let mut recent = self.recent();
                    if recent.len() >= RECENT_MAX {
                        recent.clear();
                    }
                    recent.insert(user.to_owned(), digest);
                    Ok(Access::Device(Arc::clone(grant)))
                } else {
                    Err(Refusal::BadCredentials)
                }
            }
            _ => {
                // As slow as a real check, so response times do not tell which users exist.
                verify(dummy_hash(), password);
                Err(Refusal::BadCredentials)
            }
        }
    }

    /// The grant of a device identified by its client certificate's common name.
    pub fn certificate(&self, common_name: &str) -> Result<Access, Refusal> {
        self.current()
            .by_user
            .get(common_name)
            .map(|(_, grant)| Access::Device(Arc::clone(grant)))
            .ok_or(Refusal::NotAuthorized)
    }

    fn current(&self) -> Arc<Credentials> {
        Arc::clone(
            &self
                .credentials
                .read()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    fn recent(&self) -> std::sync::MutexGuard<'_, HashMap<String, [u8; 64]>> {
        self.recent.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn digest(&self, user: &str, password: &str) -> [u8; 64] {
        let mut hasher = Blake2b512::new();
        hasher.update(self.key);
        hasher.update((user.len() as u64).to_le_bytes());
        hasher.update(user.as_bytes());
        hasher.update(password.as_bytes());
        hasher.finalize().into()
    }
}

impl Credentials {
    fn new(devices: impl Iterator<Item = Device>) -> Self {
        let by_user = devices
            .map(|d| {
                let grant = Arc::new(Grant {
                    user: d.user.clone(),
                    publish: d.publish,
                    subscribe: d.subscribe,
                });
                (d.user, (d.password_hash, grant))
            })
            .collect();
        Self { by_user }
    }
}

/// A valid Argon2id hash of a random password, verified against for unknown users.
fn dummy_hash() -> &'static str {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DUMMY.get_or_init(|| {
        let password = format!("{:032x}", rand::random::<u128>());
        hash_password(&password).unwrap_or_default()
    })
}

fn verify(hash: &str, password: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|parsed| {
        argon2::Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok()
    })
}

/// A counting semaphore for blocking threads: Argon2 takes 19 MiB and a core per run.
#[derive(Debug, Default)]
struct Slots {
    state: Mutex<(usize, usize)>,
    freed: Condvar,
}

struct Slot<'a>(&'a Slots);

impl Slots {
    fn take(&self) -> Option<Slot<'_>> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.1 >= MAX_WAITING {
            return None;
        }
        state.1 += 1;
        while state.0 >= VERIFYING_AT_ONCE {
            state = self
                .freed
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        state.1 -= 1;
        state.0 += 1;
        Some(Slot(self))
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut state = self.0.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.0 -= 1;
        self.0.freed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(user: &str, password: Option<&str>, publish: &[&str], subscribe: &[&str]) -> Device {
        Device {
            user: user.into(),
            password_hash: password.map(|p| hash_password(p).unwrap()),
            publish: publish
                .iter()
                .map(|p| SensorPattern::parse(p).unwrap())
                .collect(),
            subscribe: subscribe
                .iter()
                .map(|p| FilterPattern::parse(p).unwrap())
                .collect(),
        }
    }

    fn gatekeeper(allow_anonymous: bool) -> Gatekeeper {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("creds.toml");
        std::fs::write(&path, "").unwrap();
        Gatekeeper::from_file(
            &path,
            allow_anonymous,
            vec![
                device("plant3", Some("right"), &["plant3/*"], &[]),
                device("cert-only", None, &["c-*"], &["sensors/#"]),
            ],
        )
        .unwrap()
    }

    #[test]
    fn the_dummy_hash_parses() {
        assert!(PasswordHash::new(dummy_hash()).is_ok());
    }

    #[test]
    fn logins() {
        let gate = gatekeeper(false);
        let access = gate.login(Some(("plant3", "right"))).unwrap();
        assert_eq!(access.user(), Some("plant3"));
        assert!(access.may_publish("plant3/boiler"));
        assert!(!access.may_publish("plant4/boiler"));
        assert!(!access.may_subscribe("sensors/#"), "nothing unless granted");
        // Cached the second time, and still the same answer.
        assert_eq!(gate.login(Some(("plant3", "right"))).unwrap(), access);
        assert_eq!(
            gate.login(Some(("plant3", "wrong"))),
            Err(Refusal::BadCredentials)
        );
        assert_eq!(
            gate.login(Some(("nobody", "x"))),
            Err(Refusal::BadCredentials)
        );
        assert_eq!(
            gate.login(Some(("cert-only", ""))),
            Err(Refusal::BadCredentials),
            "no password, no password login"
        );
        assert_eq!(gate.login(None), Err(Refusal::NotAuthorized));
        assert_eq!(gatekeeper(true).login(None), Ok(Access::Anonymous));
        let cert = gate.certificate("cert-only").unwrap();
        assert!(cert.may_subscribe("$share/g/sensors/temperature"));
        assert!(!cert.may_subscribe("#"));
        assert_eq!(gate.certificate("stranger"), Err(Refusal::NotAuthorized));
        assert_eq!(Gatekeeper::open().login(None), Ok(Access::Anonymous));
    }

    #[test]
    fn a_reload_replaces_credentials_and_forgets_cached_logins() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("creds.toml");
        let mut file = CredentialsFile::default();
        file.upsert(DeviceEntry {
            user: "a".into(),
            password_hash: Some(hash_password("one").unwrap()),
            publish: vec!["a-*".into()],
            subscribe: vec![],
        });
        file.save(&path).unwrap();
        let gate = Gatekeeper::from_file(&path, false, Vec::new()).unwrap();
        assert!(gate.login(Some(("a", "one"))).is_ok());
        file.upsert(DeviceEntry {
            user: "a".into(),
            password_hash: Some(hash_password("two").unwrap()),
            publish: vec!["a-*".into()],
            subscribe: vec![],
        });
        file.save(&path).unwrap();
        assert_eq!(gate.reload().unwrap(), 1);
        assert_eq!(gate.login(Some(("a", "one"))), Err(Refusal::BadCredentials));
        assert!(gate.login(Some(("a", "two"))).is_ok());
        std::fs::write(&path, "not toml [").unwrap();
        assert!(gate.reload().is_err());
        assert!(gate.login(Some(("a", "two"))).is_ok(), "the old ones stay");
    }
}
