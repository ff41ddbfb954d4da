//! Settings of `sensorhub serve`: typed, layered and validated before anything starts.
//!
//! Layers, later ones winning: built-in defaults; a TOML file (`--config`, or `sensorhub.toml`
//! in the working directory when present); environment variables; command-line flags. Every
//! field a deployment changes has a flag and a variable, so no file needs editing.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

use crate::broker::external::{self, ExternalConfig, ExternalError};
use crate::domain::{DeadLetterBudget, Limits, NaiveZone, Templates, Timestamp};
use crate::journal::{FsyncPolicy, MAX_PAYLOAD_BYTES};
use crate::store::WriteConcern;
use crate::tls::TlsFiles;

/// The most `max_batch_readings` may be: as many of the smallest readings as the largest
/// payload holds.
const MAX_BATCH_READINGS_LIMIT: usize = 100_000;

/// Every setting of `serve`, with its default.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// rumqttd's configuration file; the built-in one is used when it does not exist.
    pub broker_config: PathBuf,
    /// The MQTT 3.1.1 listener, overriding the broker configuration.
    pub mqtt_listen: Option<SocketAddr>,
    /// The MQTT 5 listener, overriding the broker configuration.
    pub mqtt5_listen: Option<SocketAddr>,
    /// The HTTP API.
    pub http_listen: SocketAddr,
    /// MongoDB connection string.
    pub mongodb_uri: String,
    /// Database of readings and dead letters.
    pub mongodb_database: String,
    /// Collection of readings.
    pub mongodb_collection: String,
    /// Collection of dead letters.
    pub dead_letter_collection: String,
    /// An existing MQTT broker to subscribe to instead of running the embedded one:
    /// `mqtt://[user[:password]@]host[:port]`. Empty: the embedded broker.
    pub external_broker: String,
    /// The shared subscription group of external broker mode: instances of one group split
    /// the stream.
    pub share_group: String,
    /// This instance's client id at the external broker, stable across restarts so the broker
    /// keeps its session. Empty: `sensorhub-<host name>`.
    pub external_client_id: String,
    /// For `mqtts://`: the CA certificate (PEM) of the external broker; none: the system's roots.
    pub external_ca: Option<PathBuf>,
    /// For `mqtts://` with client certificates: this instance's certificate chain (PEM).
    pub external_cert: Option<PathBuf>,
    /// The private key (PEM) of `external_cert`.
    pub external_key: Option<PathBuf>,
    /// MongoDB write concern `w` ("majority", a node count or a tag); empty: the URI's, else
    /// "majority" when the URI names a replica set.
    pub mongodb_write_concern: String,
    /// Days a dead letter is kept.
    pub dead_letter_ttl_days: u64,
    /// Redis connection string (`redis://`, or `redis-cluster://` for a cluster).
    pub redis_url: String,
    /// Prefix of every Redis key this instance writes.
    pub redis_prefix: String,
    /// Directory of the local log.
    pub journal_dir: PathBuf,
    /// Bytes received and not yet stored beyond which new readings are refused.
    pub journal_max_bytes: u64,
    /// Size of one local log segment file.
    pub journal_segment_bytes: u64,
    /// When the local log is forced to disk: "never", "periodic" or "always".
    pub journal_fsync: String,
    /// Interval of periodic syncs, in milliseconds.
    pub journal_fsync_interval_ms: u64,
    /// Largest accepted payload, in bytes (at most `journal::MAX_PAYLOAD_BYTES`, 1 MiB).
    pub max_payload_bytes: usize,
    /// Longest accepted topic, in bytes.
    pub max_topic_bytes: usize,
    /// Most readings one message may hold: the elements of a JSON array, or the kinds of a
    /// `values` object. A message with more is a dead letter (`batch_too_large`).
    pub max_batch_readings: usize,
    /// Topic templates beside `sensors/#`, such as "plant/+site/+line/+sensor_id/+kind": each
    /// `+name` level gives the reading's sensor_id (required), kind, or a tag stored with it;
    /// a bare `+` matches a level that is not kept. Topics they match are captured, checked
    /// against credentials by the sensor id they name, and subscribed to in external mode.
    pub topic_templates: Vec<String>,
    /// Readings timestamped before this instant are rejected.
    pub earliest_timestamp: String,
    /// Readings timestamped more than this many seconds after their arrival are rejected.
    pub max_future_skew_secs: u64,
    /// The zone of reading timestamps sent without an offset: "UTC" or an IANA name such as
    /// "Europe/Berlin" (Python's `datetime.now().isoformat()` is the device's local time).
    pub naive_timestamp_zone: String,
    /// Seconds SIGTERM/SIGINT may take to store what is in hand before the process exits.
    pub shutdown_grace_secs: u64,
    /// Milliseconds a latest-ten or range answer may be served again from memory. Writes
    /// through this process retire it at once; this bounds writes by other instances. 0: never.
    pub read_cache_ms: u64,
    /// Also run the simulator inside the process, publishing to the embedded broker.
    pub simulate: bool,
    /// Simulated sensors of each kind (with `simulate`).
    pub simulate_sensors: usize,
    /// Milliseconds between two readings of one simulated sensor.
    pub simulate_interval_ms: u64,
    /// Credentials file of MQTT devices (`sensorhub passwd`). With it every MQTT client must
    /// log in (or present a client certificate) and is held to its grant.
    pub mqtt_auth: Option<PathBuf>,
    /// Accept MQTT clients without credentials, with all rights. Without `mqtt_auth` and
    /// without this, MQTT listens on loopback only (see README, Security).
    pub mqtt_allow_anonymous: bool,
    /// The MQTT TLS listener (3.1.1 and 5 on one port); needs `tls_cert` and `tls_key`.
    pub mqtts_listen: Option<SocketAddr>,
    /// PEM certificate chain of the MQTT TLS listener and of HTTPS: with `tls_key`, the HTTP
    /// API serves HTTPS only. Reloaded on SIGHUP.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// PEM CA of device client certificates on the MQTT TLS listener: a certificate it signed
    /// identifies the device by its common name, the user of its entry in `mqtt_auth`.
    pub tls_client_ca: Option<PathBuf>,
    /// Days a reading is kept in MongoDB, counted from its device timestamp; 0 keeps the
    /// history forever (the default). A TTL index on `timestamp`, changed in place when this
    /// changes; MongoDB deletes expired readings about once a minute.
    pub reading_retention_days: u64,
    /// Seconds without a reading after which `/sensors` calls a sensor stale.
    pub sensor_stale_secs: u64,
    /// Seconds between two reloads of the sensor ids `/sensors` and `/latest` page through:
    /// how long a sensor (or a sensor's new kind) that another instance sharing the database
    /// created may be missing from them. Sensors this process writes are listed at once; the
    /// values are always read fresh. 0: no list in memory, every page is a sorted scan.
    pub sensor_list_refresh_secs: u64,
    /// Seconds an HTTP write may make no progress before the connection is closed: cuts off
    /// clients that stop reading (a `/stream` subscriber gone silent, a slowloris reader).
    pub http_write_timeout_secs: u64,
    /// Seconds a request's head (request line and headers) may take from its first byte, or a
    /// new connection from its opening: cuts off slowloris clients that trickle headers.
    pub http_header_timeout_secs: u64,
    /// Milliseconds each readiness check (MongoDB ping, Redis PING, the log's disk) may take
    /// before it counts as down.
    pub ready_timeout_ms: u64,
    /// Unstored bytes in the local log from which `/health/ready` says 503; none: half of
    /// `journal_max_bytes`.
    pub ready_max_pending_bytes: Option<u64>,
    /// Dead letters stored per reason and per second of arrival; the rest are counted in
    /// `sensorhub_dead_letters_dropped_total` and dropped. 0: every one is stored.
    pub dead_letters_per_second: u32,
    /// Key file of the HTTP API (`sensorhub apikey`). With it every data endpoint needs
    /// `Authorization: Bearer <key>`: a read key for reads, an admin key for deleting readings
    /// and replaying dead letters. Reloaded on SIGHUP. Without it the API is open.
    pub api_keys: Option<PathBuf>,
    /// Origins a browser may call the API from (`https://dash.example.com`, or `*` for any):
    /// CORS headers and preflight answers for them. Empty: no CORS headers at all.
    pub cors_origins: Vec<String>,
    /// The longest time range, in days, a range query (`/readings`, `/startoenddate`, export,
    /// aggregate, Grafana series) may span; a longer or open-ended one is a 400 naming the
    /// parameter. 0: no limit.
    pub max_range_days: u64,
    /// Sparkplug B metric names mapped to the kind of their readings; a metric not named here
    /// takes the last `/` segment of its name. File only.
    pub sparkplug_kinds: std::collections::BTreeMap<String, String>,
}

impl Default for Settings {
    fn default() -> Self {
        let limits = Limits::default();
        Self {
            broker_config: "rumqttd.toml".into(),
            mqtt_listen: None,
            mqtt5_listen: None,
            http_listen: SocketAddr::from(([0, 0, 0, 0], 8000)),
            mongodb_uri: "mongodb://127.0.0.1:27017".into(),
            mongodb_database: "sensor_data".into(),
            mongodb_collection: "sensor_readings".into(),
            dead_letter_collection: "dead_letters".into(),
            mongodb_write_concern: String::new(),
            external_broker: String::new(),
            share_group: "sensorhub".into(),
            external_client_id: String::new(),
            external_ca: None,
            external_cert: None,
            external_key: None,
            dead_letter_ttl_days: 7,
            redis_url: "redis://127.0.0.1:6379".into(),
            redis_prefix: "sensorhub".into(),
            journal_dir: "data/journal".into(),
            journal_max_bytes: 2 << 30,
            journal_segment_bytes: 32 << 20,
            journal_fsync: "periodic".into(),
            journal_fsync_interval_ms: 5,
            max_payload_bytes: limits.max_payload_bytes,
            max_topic_bytes: limits.max_topic_bytes,
            max_batch_readings: limits.max_batch_readings,
            topic_templates: Vec::new(),
            earliest_timestamp: limits.earliest.to_string(),
            max_future_skew_secs: u64::try_from(limits.max_future_skew_ms / 1000).unwrap_or(86_400),
            naive_timestamp_zone: limits.naive_zone.name().to_owned(),
            shutdown_grace_secs: 10,
            read_cache_ms: 250,
            simulate: false,
            simulate_sensors: 5,
            simulate_interval_ms: 1000,
            mqtt_auth: None,
            mqtt_allow_anonymous: false,
            mqtts_listen: None,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            reading_retention_days: 0,
            sensor_stale_secs: 300,
            sensor_list_refresh_secs: 10,
            http_write_timeout_secs: 30,
            http_header_timeout_secs: 10,
            ready_timeout_ms: 1000,
            ready_max_pending_bytes: None,
            dead_letters_per_second: DeadLetterBudget::DEFAULT_PER_SECOND,
            api_keys: None,
            cors_origins: Vec::new(),
            max_range_days: 0,
            sparkplug_kinds: std::collections::BTreeMap::new(),
        }
    }
}

/// Flags and environment variables of `serve`; each overrides the same setting of the file.
#[derive(Args, Clone, Debug, Default, Serialize)]
pub struct ServeArgs {
    /// TOML file of settings (field names as in `Settings`). Default: ./sensorhub.toml if present.
    #[arg(long, env = "SENSORHUB_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// rumqttd configuration file [default: rumqttd.toml, else built-in]
    #[arg(long, env = "SENSORHUB_BROKER_CONFIG")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker_config: Option<PathBuf>,
    /// Address of the MQTT 3.1.1 listener [default: 0.0.0.0:1883]
    #[arg(long, env = "SENSORHUB_MQTT_LISTEN")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mqtt_listen: Option<SocketAddr>,
    /// Address of the MQTT 5 listener [default: 0.0.0.0:1884]
    #[arg(long, env = "SENSORHUB_MQTT5_LISTEN")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mqtt5_listen: Option<SocketAddr>,
    /// Address of the HTTP API [default: 0.0.0.0:8000]
    #[arg(long, env = "SENSORHUB_HTTP_LISTEN")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_listen: Option<SocketAddr>,
    /// MongoDB connection string [default: mongodb://127.0.0.1:27017]
    #[arg(long, env = "MONGODB_URI")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mongodb_uri: Option<String>,
    /// MongoDB database [default: sensor_data]
    #[arg(long, env = "MONGODB_DATABASE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mongodb_database: Option<String>,
    /// MongoDB collection of readings [default: sensor_readings]
    #[arg(long, env = "MONGODB_COLLECTION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mongodb_collection: Option<String>,
    /// MongoDB collection of dead letters [default: dead_letters]
    #[arg(long, env = "SENSORHUB_DEAD_LETTER_COLLECTION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dead_letter_collection: Option<String>,
    /// Subscribe to this MQTT broker instead of running the embedded one:
    /// mqtt://[user[:password]@]host[:port]
    #[arg(long, env = "SENSORHUB_EXTERNAL_BROKER")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub external_broker: Option<String>,
    /// Shared subscription group at the external broker [default: sensorhub]
    #[arg(long, env = "SENSORHUB_SHARE_GROUP")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub share_group: Option<String>,
    /// Client id at the external broker, stable per instance [default: sensorhub-<host name>]
    #[arg(long, env = "SENSORHUB_EXTERNAL_CLIENT_ID")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub external_client_id: Option<String>,
    /// CA certificate (PEM) of an mqtts:// external broker [default: the system's roots]
    #[arg(long, env = "SENSORHUB_EXTERNAL_CA")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub external_ca: Option<PathBuf>,
    /// Client certificate chain (PEM) for an mqtts:// external broker
    #[arg(long, env = "SENSORHUB_EXTERNAL_CERT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub external_cert: Option<PathBuf>,
    /// Private key (PEM) of --external-cert
    #[arg(long, env = "SENSORHUB_EXTERNAL_KEY")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub external_key: Option<PathBuf>,
    /// MongoDB write concern w: majority | N | tag [default: the URI's, else majority on a
    /// replica set]
    #[arg(long, env = "SENSORHUB_MONGODB_WRITE_CONCERN")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mongodb_write_concern: Option<String>,
    /// Days a dead letter is kept [default: 7]
    #[arg(long, env = "SENSORHUB_DEAD_LETTER_TTL_DAYS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dead_letter_ttl_days: Option<u64>,
    /// Redis connection string [default: redis://127.0.0.1:6379]
    #[arg(long, env = "REDIS_URL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_url: Option<String>,
    /// Prefix of this instance's Redis keys [default: sensorhub]
    #[arg(long, env = "SENSORHUB_REDIS_PREFIX")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_prefix: Option<String>,
    /// Directory of the local log [default: data/journal]
    #[arg(long, env = "SENSORHUB_JOURNAL_DIR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub journal_dir: Option<PathBuf>,
    /// Unstored bytes beyond which readings are refused [default: 2 GiB]
    #[arg(long, env = "SENSORHUB_JOURNAL_MAX_BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub journal_max_bytes: Option<u64>,
    /// Size of a local log segment [default: 32 MiB]
    #[arg(long, env = "SENSORHUB_JOURNAL_SEGMENT_BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub journal_segment_bytes: Option<u64>,
    /// never | periodic | always [default: periodic]
    #[arg(long, env = "SENSORHUB_JOURNAL_FSYNC")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub journal_fsync: Option<String>,
    /// Milliseconds between periodic syncs [default: 5]
    #[arg(long, env = "SENSORHUB_JOURNAL_FSYNC_INTERVAL_MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub journal_fsync_interval_ms: Option<u64>,
    /// Largest accepted payload in bytes, at most 1048576 [default: 16384]
    #[arg(long, env = "SENSORHUB_MAX_PAYLOAD_BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_payload_bytes: Option<usize>,
    /// Longest accepted topic in bytes [default: 256]
    #[arg(long, env = "SENSORHUB_MAX_TOPIC_BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_topic_bytes: Option<usize>,
    /// Most readings in one message (array elements, values kinds) [default: 1000]
    #[arg(long, env = "SENSORHUB_MAX_BATCH_READINGS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_batch_readings: Option<usize>,
    /// A topic template such as plant/+site/+line/+sensor_id/+kind (repeat the flag, or separate
    /// with commas in the variable) [default: none; sensors/# always works]
    #[arg(
        long = "topic-template",
        env = "SENSORHUB_TOPIC_TEMPLATES",
        value_delimiter = ',',
        value_name = "TEMPLATE"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topic_templates: Option<Vec<String>>,
    /// Earliest accepted reading timestamp [default: 2000-01-01T00:00:00Z]
    #[arg(long, env = "SENSORHUB_EARLIEST_TIMESTAMP")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub earliest_timestamp: Option<String>,
    /// Seconds a reading's timestamp may lie ahead of its arrival [default: 86400]
    #[arg(long, env = "SENSORHUB_MAX_FUTURE_SKEW_SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_future_skew_secs: Option<u64>,
    /// Zone of reading timestamps without an offset: UTC or an IANA name [default: UTC]
    #[arg(long, env = "SENSORHUB_NAIVE_TIMESTAMP_ZONE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub naive_timestamp_zone: Option<String>,
    /// Seconds allowed to store what is in hand on SIGTERM/SIGINT [default: 10]
    #[arg(long, env = "SENSORHUB_SHUTDOWN_GRACE_SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shutdown_grace_secs: Option<u64>,
    /// Milliseconds an answer may be served again from memory (0: never) [default: 250]
    #[arg(long, env = "SENSORHUB_READ_CACHE_MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read_cache_ms: Option<u64>,
    /// Also run the simulator inside the process
    #[arg(long, env = "SENSORHUB_SIMULATE")]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub simulate: bool,
    /// Simulated sensors of each kind [default: 5]
    #[arg(long, env = "SENSORHUB_SIMULATE_SENSORS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub simulate_sensors: Option<usize>,
    /// Milliseconds between readings of a simulated sensor [default: 1000]
    #[arg(long, env = "SENSORHUB_SIMULATE_INTERVAL_MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub simulate_interval_ms: Option<u64>,
    /// MQTT credentials file (`sensorhub passwd`): every client must log in [default: none]
    #[arg(long, env = "SENSORHUB_MQTT_AUTH")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mqtt_auth: Option<PathBuf>,
    /// Accept MQTT clients without credentials (without --mqtt-auth: on every address)
    #[arg(long, env = "SENSORHUB_MQTT_ALLOW_ANONYMOUS")]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub mqtt_allow_anonymous: bool,
    /// Address of the MQTT TLS listener, 3.1.1 and 5 (e.g. 0.0.0.0:8883) [default: none]
    #[arg(long, env = "SENSORHUB_MQTTS_LISTEN")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mqtts_listen: Option<SocketAddr>,
    /// PEM certificate chain for MQTT TLS and HTTPS (reloaded on SIGHUP)
    #[arg(long, env = "SENSORHUB_TLS_CERT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert
    #[arg(long, env = "SENSORHUB_TLS_KEY")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA of device client certificates (mutual TLS; CN = credential user)
    #[arg(long, env = "SENSORHUB_TLS_CLIENT_CA")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_client_ca: Option<PathBuf>,
    /// Days readings are kept, by device time (0: forever) [default: 0]
    #[arg(long, env = "SENSORHUB_READING_RETENTION_DAYS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reading_retention_days: Option<u64>,
    /// File holding the MongoDB connection string (a Docker secret); MONGODB_URI wins
    #[arg(long, env = "MONGODB_URI_FILE", value_name = "FILE")]
    #[serde(skip)]
    pub mongodb_uri_file: Option<PathBuf>,
    /// File holding the Redis connection string (a Docker secret); REDIS_URL wins
    #[arg(long, env = "REDIS_URL_FILE", value_name = "FILE")]
    #[serde(skip)]
    pub redis_url_file: Option<PathBuf>,
    /// File holding the --external-broker URL, with its password; SENSORHUB_EXTERNAL_BROKER wins
    #[arg(long, env = "SENSORHUB_EXTERNAL_BROKER_FILE", value_name = "FILE")]
    #[serde(skip)]
    pub external_broker_file: Option<PathBuf>,
    /// Seconds without a reading after which a sensor is stale [default: 300]
    #[arg(long, env = "SENSORHUB_SENSOR_STALE_SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sensor_stale_secs: Option<u64>,
    /// Seconds between reloads of the sensor list that /sensors pages through (0: none)
    /// [default: 10]
    #[arg(long, env = "SENSORHUB_SENSOR_LIST_REFRESH_SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sensor_list_refresh_secs: Option<u64>,
    /// Seconds an HTTP write may stall before the client is cut off [default: 30]
    #[arg(long, env = "SENSORHUB_HTTP_WRITE_TIMEOUT_SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_write_timeout_secs: Option<u64>,
    /// Seconds a request's head may take before the client is cut off [default: 10]
    #[arg(long, env = "SENSORHUB_HTTP_HEADER_TIMEOUT_SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_header_timeout_secs: Option<u64>,
    /// Milliseconds a readiness check may take before it counts as down [default: 1000]
    #[arg(long, env = "SENSORHUB_READY_TIMEOUT_MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ready_timeout_ms: Option<u64>,
    /// Unstored log bytes from which /health/ready says 503 [default: half of --journal-max-bytes]
    #[arg(long, env = "SENSORHUB_READY_MAX_PENDING_BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ready_max_pending_bytes: Option<u64>,
    /// Dead letters stored per reason and second; the rest counted, not stored (0: all) [default: 1000]
    #[arg(long, env = "SENSORHUB_DEAD_LETTERS_PER_SECOND")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dead_letters_per_second: Option<u32>,
    /// HTTP API key file (`sensorhub apikey`): data endpoints need a bearer key [default: none]
    #[arg(long, env = "SENSORHUB_API_KEYS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_keys: Option<PathBuf>,
    /// Origins allowed to call the API from a browser, comma-separated, or * [default: none]
    #[arg(long, env = "SENSORHUB_CORS_ORIGINS", value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cors_origins: Option<Vec<String>>,
    /// Longest span of a range query in days (0: no limit) [default: 0]
    #[arg(long, env = "SENSORHUB_MAX_RANGE_DAYS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_range_days: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Settings {
    /// Defaults, then the file, then `args` (flags and environment), then the secret files of
    /// settings that neither a flag nor a variable gave.
    pub fn load(args: &ServeArgs) -> Result<Self, ConfigError> {
        let mut args = args.clone();
        for (value, file, name) in [
            (
                &mut args.mongodb_uri,
                &args.mongodb_uri_file,
                "MONGODB_URI_FILE",
            ),
            (&mut args.redis_url, &args.redis_url_file, "REDIS_URL_FILE"),
            (
                &mut args.external_broker,
                &args.external_broker_file,
                "SENSORHUB_EXTERNAL_BROKER_FILE",
            ),
        ] {
            if let (None, Some(path)) = (&value, file) {
                *value = Some(read_secret(path, name)?);
            }
        }
        let args = &args;
        let mut figment = Figment::from(Serialized::defaults(Settings::default()));
        match &args.config {
            Some(path) if !path.exists() => {
                return Err(ConfigError::Invalid(format!(
                    "the settings file {} does not exist",
                    path.display()
                )));
            }
            Some(path) => figment = figment.merge(Toml::file(path)),
            None => figment = figment.merge(Toml::file("sensorhub.toml")),
        }
        let settings: Settings = figment
            .merge(Serialized::defaults(args))
            .extract()
            .map_err(|e| ConfigError::Invalid(describe(e)))?;
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let fail = |m: String| Err(ConfigError::Invalid(m));
        self.fsync_policy()?;
        self.limits()?;
        self.write_concern()?;
        self.external()?;
        if self.http_write_timeout_secs == 0 {
            return fail("http_write_timeout_secs must be at least 1".into());
        }
        if self.http_header_timeout_secs == 0 {
            return fail("http_header_timeout_secs must be at least 1".into());
        }
        if self.ready_timeout_ms == 0 {
            return fail("ready_timeout_ms must be at least 1".into());
        }
        if self.ready_max_pending_bytes == Some(0) {
            return fail("ready_max_pending_bytes must be at least 1".into());
        }
        if self.journal_segment_bytes < 64 * 1024 {
            return fail("journal_segment_bytes must be at least 65536".into());
        }
        if self.journal_max_bytes < self.journal_segment_bytes {
            return fail("journal_max_bytes must be at least journal_segment_bytes".into());
        }
        // The log sizes its records for this bound: whatever is admitted here fits in it.
        if self.max_payload_bytes == 0 || self.max_payload_bytes > MAX_PAYLOAD_BYTES {
            return fail(format!(
                "max_payload_bytes must be between 1 and {MAX_PAYLOAD_BYTES}"
            ));
        }
        if self.max_batch_readings == 0 || self.max_batch_readings > MAX_BATCH_READINGS_LIMIT {
            return fail(format!(
                "max_batch_readings must be between 1 and {MAX_BATCH_READINGS_LIMIT}"
            ));
        }
        if self.dead_letter_ttl_days == 0 {
            return fail("dead_letter_ttl_days must be at least 1".into());
        }
        if self.simulate && (self.simulate_sensors == 0 || self.simulate_interval_ms == 0) {
            return fail("simulate_sensors and simulate_interval_ms must be positive".into());
        }
        self.tls_files()?;
        for origin in &self.cors_origins {
            check_origin(origin).map_err(|e| ConfigError::Invalid(format!("cors_origins: {e}")))?;
        }
        if self.mqtts_listen.is_some() && self.tls_cert.is_none() {
            return fail("mqtts_listen needs tls_cert and tls_key".into());
        }
        if self.tls_client_ca.is_some() && (self.mqtts_listen.is_none() || self.mqtt_auth.is_none())
        {
            return fail(
                "tls_client_ca needs mqtts_listen and mqtt_auth (a client certificate's common \
                 name selects an entry of the credentials file)"
                    .into(),
            );
        }
        Ok(())
    }

    /// External broker mode's settings; `None` for the embedded broker.
    pub fn external(&self) -> Result<Option<ExternalConfig>, ConfigError> {
        if self.external_broker.trim().is_empty() {
            return Ok(None);
        }
        let invalid = |e: ExternalError| ConfigError::Invalid(e.to_string());
        external::target_addr(&self.external_broker).map_err(invalid)?;
        external::shared_filter(&self.share_group).map_err(invalid)?;
        let client_id = if self.external_client_id.is_empty() {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .or_else(|| std::env::var("HOSTNAME").ok())
                .unwrap_or_default();
            format!("sensorhub-{}", host.trim())
        } else {
            self.external_client_id.clone()
        };
        let client_cert = match (&self.external_cert, &self.external_key) {
            (Some(cert), Some(key)) => Some((cert.clone(), key.clone())),
            (None, None) => None,
            _ => {
                return Err(ConfigError::Invalid(
                    "external_cert and external_key go together".into(),
                ));
            }
        };
        let config = ExternalConfig {
            url: self.external_broker.trim().to_owned(),
            share_group: self.share_group.clone(),
            client_id,
            max_payload_bytes: self.max_payload_bytes,
            templates: self.limits()?.templates,
            ca_file: self.external_ca.clone(),
            client_cert,
        };
        external::check_tls(&config).map_err(|e| {
            ConfigError::Invalid(format!("external broker TLS: {}", crate::error_chain(&e)))
        })?;
        Ok(Some(config))
    }

    /// The write concern setting; `None` when left to the URI and the defaults.
    pub fn write_concern(&self) -> Result<Option<WriteConcern>, ConfigError> {
        if self.mongodb_write_concern.trim().is_empty() {
            return Ok(None);
        }
        WriteConcern::parse(&self.mongodb_write_concern)
            .map(Some)
            .map_err(|e| ConfigError::Invalid(format!("mongodb_write_concern: {e}")))
    }

    pub fn fsync_policy(&self) -> Result<FsyncPolicy, ConfigError> {
        match self.journal_fsync.as_str() {
            "never" => Ok(FsyncPolicy::Never),
            "always" => Ok(FsyncPolicy::Always),
            "periodic" if self.journal_fsync_interval_ms > 0 => Ok(FsyncPolicy::Periodic(
                Duration::from_millis(self.journal_fsync_interval_ms),
            )),
            "periodic" => Err(ConfigError::Invalid(
                "journal_fsync_interval_ms must be positive".into(),
            )),
            other => Err(ConfigError::Invalid(format!(
                "journal_fsync '{other}' is not one of never, periodic, always"
            ))),
        }
    }

    /// The TLS files, when TLS is on.
    pub fn tls_files(&self) -> Result<Option<TlsFiles>, ConfigError> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Ok(Some(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: self.tls_client_ca.clone(),
            })),
            (None, None) => Ok(None),
            _ => Err(ConfigError::Invalid(
                "tls_cert and tls_key go together".into(),
            )),
        }
    }

    /// `sparkplug_kinds`, each kind checked.
    pub fn sparkplug_kinds(
        &self,
    ) -> Result<std::collections::HashMap<String, crate::domain::Kind>, ConfigError> {
        self.sparkplug_kinds
            .iter()
            .map(|(metric, kind)| {
                crate::domain::Kind::parse(kind)
                    .map(|k| (metric.clone(), k))
                    .map_err(|why| {
                        ConfigError::Invalid(format!(
                            "sparkplug_kinds: the kind '{kind}' of metric '{metric}': {why}"
                        ))
                    })
            })
            .collect()
    }

    pub fn limits(&self) -> Result<Limits, ConfigError> {
        let earliest = Timestamp::parse(&self.earliest_timestamp)
            .map_err(|e| ConfigError::Invalid(format!("earliest_timestamp: {e}")))?;
        Ok(Limits {
            max_payload_bytes: self.max_payload_bytes,
            max_topic_bytes: self.max_topic_bytes,
            earliest,
            max_future_skew_ms: i64::try_from(self.max_future_skew_secs.saturating_mul(1000))
                .unwrap_or(i64::MAX),
            naive_zone: NaiveZone::parse(&self.naive_timestamp_zone)
                .map_err(|e| ConfigError::Invalid(format!("naive_timestamp_zone: {e}")))?,
            max_batch_readings: self.max_batch_readings,
            templates: Templates::parse(&self.topic_templates)
                .map_err(|e| ConfigError::Invalid(format!("topic_templates{e}")))?,
        })
    }
}

impl Settings {
    /// Unstored log bytes from which the process is not ready.
    pub fn ready_max_pending_bytes(&self) -> u64 {
        self.ready_max_pending_bytes
            .unwrap_or(self.journal_max_bytes / 2)
    }

    /// How long readings are kept; `None`: forever.
    pub fn reading_retention(&self) -> Option<Duration> {
        (self.reading_retention_days > 0)
            .then(|| Duration::from_secs(self.reading_retention_days.saturating_mul(86_400)))
    }

    /// These settings with the passwords of every connection string replaced by `***`, for
    /// printing (`sensorhub config check`) and logs.
    pub fn masked(&self) -> Self {
        Self {
            mongodb_uri: redact(&self.mongodb_uri),
            redis_url: redact(&self.redis_url),
            external_broker: redact(&self.external_broker),
            ..self.clone()
        }
    }

    /// The settings as a `sensorhub.toml` would write them (unset optional ones left out).
    pub fn to_toml(&self) -> Result<String, ConfigError> {
        toml::to_string(self).map_err(|e| ConfigError::Invalid(e.to_string()))
    }
}

/// An origin as browsers send it: `scheme://host[:port]`, no path; or `*`.
fn check_origin(origin: &str) -> Result<(), String> {
    if origin == "*" {
        return Ok(());
    }
    let rest = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"))
        .ok_or_else(|| format!("'{origin}' is not an origin such as https://dash.example.com"))?;
    if rest.is_empty() || rest.contains(['/', '?', '#', ' ']) {
        return Err(format!(
            "'{origin}' is not an origin: scheme, host and port only, no path"
        ));
    }
    Ok(())
}

impl Settings {
    /// The longest span a range query may have; `None`: no limit.
    pub fn max_range(&self) -> Option<Duration> {
        (self.max_range_days > 0)
            .then(|| Duration::from_secs(self.max_range_days.saturating_mul(86_400)))
    }
}

/// A connection string without its password (the user info's and any `...password=` query
/// parameter's), for messages and printed settings.
pub fn redact(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let mut out = match (base.find("://"), base.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &base[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &base[..scheme + 3], &base[at..]),
                None => base.to_owned(),
            }
        }
        _ => base.to_owned(),
    };
    if let Some(query) = query {
        let params: Vec<String> = query
            .split('&')
            .map(|param| match param.split_once('=') {
                Some((key, _)) if key.to_ascii_lowercase().contains("password") => {
                    format!("{key}=***")
                }
                _ => param.to_owned(),
            })
            .collect();
        out.push('?');
        out.push_str(&params.join("&"));
    }
    out
}

/// The contents of a secret file (a Docker or Kubernetes secret), without the trailing line end.
fn read_secret(path: &std::path::Path, variable: &str) -> Result<String, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError::Invalid(format!("{variable}: cannot read {}: {e}", path.display()))
    })?;
    let value = text.trim_end_matches(['\r', '\n']);
    if value.is_empty() {
        return Err(ConfigError::Invalid(format!(
            "{variable}: {} is empty",
            path.display()
        )));
    }
    Ok(value.to_owned())
}

/// Figment's errors, one line each, naming the key and the file it came from.
fn describe(errors: figment::Error) -> String {
    errors
        .into_iter()
        .map(|e| {
            let key = e.path.join(".");
            let source = e
                .metadata
                .as_ref()
                .and_then(|m| m.source.as_ref())
                .map(|s| format!(" in {s}"))
                .unwrap_or_default();
            match &e.kind {
                figment::error::Kind::UnknownField(found, _) => format!(
                    "unknown key `{found}`{source} (every key is listed in \
                     sensorhub.example.toml)"
                ),
                kind => format!("`{key}`{source}: {kind}"),
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_match_the_contract() {
        let s = Settings::load(&ServeArgs {
            config: Some("/nonexistent/sensorhub.toml".into()),
            ..ServeArgs::default()
        });
        assert!(s.is_err(), "an explicit missing file is an error");
        let s = Settings::default();
        s.validate().unwrap();
        assert_eq!(s.mongodb_database, "sensor_data");
        assert_eq!(s.mongodb_collection, "sensor_readings");
        assert_eq!(s.http_listen.port(), 8000);
        assert_eq!(s.limits().unwrap(), Limits::default());
    }

    #[test]
    fn passwords_stay_out_of_messages() {
        assert_eq!(
            redact("mongodb://u:secret@h:27017/db"),
            "mongodb://u:***@h:27017/db"
        );
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
        assert_eq!(
            redact("mongodb://h/?tls=true&tlsCertificateKeyFilePassword=pw"),
            "mongodb://h/?tls=true&tlsCertificateKeyFilePassword=***"
        );
        assert_eq!(redact("redis://:pw@h:6379"), "redis://:***@h:6379");
        assert_eq!(redact("mqtt://user@h:1883"), "mqtt://user@h:1883");
        let masked = Settings {
            external_broker: "mqtt://gw:hunter2@broker:1883".into(),
            ..Settings::default()
        }
        .masked()
        .to_toml()
        .unwrap();
        assert!(!masked.contains("hunter2"), "{masked}");
    }

    #[test]
    fn secrets_come_from_files_unless_a_variable_gives_them() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("uri");
        std::fs::write(&secret, "mongodb://u:pw@db:27017\n").unwrap();
        let none = Some(dir.path().join("none.toml"));
        std::fs::write(none.as_ref().unwrap(), "").unwrap();
        let s = Settings::load(&ServeArgs {
            config: none.clone(),
            mongodb_uri_file: Some(secret.clone()),
            ..ServeArgs::default()
        })
        .unwrap();
        assert_eq!(s.mongodb_uri, "mongodb://u:pw@db:27017");
        let s = Settings::load(&ServeArgs {
            config: none.clone(),
            mongodb_uri: Some("mongodb://direct".into()),
            mongodb_uri_file: Some(secret),
            ..ServeArgs::default()
        })
        .unwrap();
        assert_eq!(s.mongodb_uri, "mongodb://direct");
        let missing = Settings::load(&ServeArgs {
            config: none,
            redis_url_file: Some(dir.path().join("absent")),
            ..ServeArgs::default()
        })
        .unwrap_err()
        .to_string();
        assert!(missing.contains("REDIS_URL_FILE"), "{missing}");
    }

    #[test]
    fn file_errors_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let load = |text: &str| {
            let file = dir.path().join("s.toml");
            std::fs::write(&file, text).unwrap();
            Settings::load(&ServeArgs {
                config: Some(file),
                ..ServeArgs::default()
            })
            .unwrap_err()
            .to_string()
        };
        let unknown = load("mongodb_uri = \"mongodb://h\"\nretention = 3\n");
        assert!(unknown.contains("unknown key `retention`"), "{unknown}");
        let typed = load("journal_max_bytes = \"lots\"\n");
        assert!(typed.contains("`journal_max_bytes`"), "{typed}");
    }

    /// The example file documents every setting with its default: it parses, equals the
    /// defaults, and names every field (commented out when it has no default value).
    #[test]
    fn the_example_file_names_every_setting_with_its_default() {
        let example = include_str!("../sensorhub.example.toml");
        let parsed: Settings = Figment::from(Serialized::defaults(Settings::default()))
            .merge(Toml::string(example))
            .extract()
            .map_err(describe)
            .unwrap();
        assert_eq!(
            parsed,
            Settings::default(),
            "the example's values are the defaults"
        );
        let serde_json::Value::Object(fields) = serde_json::to_value(Settings::default()).unwrap()
        else {
            panic!("Settings is a struct");
        };
        for field in fields.keys() {
            let documented = example.lines().any(|line| {
                let line = line.trim_start_matches('#').trim_start();
                line.strip_prefix(field.as_str())
                    .is_some_and(|rest| rest.trim_start().starts_with('='))
            });
            assert!(documented, "{field} is missing from sensorhub.example.toml");
        }
    }

    #[test]
    fn file_then_flags() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("s.toml");
        std::fs::write(
            &file,
            "mongodb_database = \"from_file\"\nredis_prefix = \"file:\"\n",
        )
        .unwrap();
        let s = Settings::load(&ServeArgs {
            config: Some(file),
            redis_prefix: Some("flag:".into()),
            ..ServeArgs::default()
        })
        .unwrap();
        assert_eq!(s.mongodb_database, "from_file");
        assert_eq!(s.redis_prefix, "flag:");
        assert_eq!(s.mongodb_collection, "sensor_readings");
    }

    #[test]
    fn rejects_nonsense() {
        let bad = |f: fn(&mut Settings)| {
            let mut s = Settings::default();
            f(&mut s);
            s.validate().unwrap_err().to_string()
        };
        assert!(bad(|s| s.journal_fsync = "sometimes".into()).contains("journal_fsync"));
        assert!(bad(|s| s.earliest_timestamp = "then".into()).contains("earliest_timestamp"));
        assert!(bad(|s| s.journal_max_bytes = 1).contains("journal_max_bytes"));
        assert!(bad(|s| s.mongodb_write_concern = "0".into()).contains("mongodb_write_concern"));
        assert!(
            bad(|s| s.naive_timestamp_zone = "Nowhere/Land".into())
                .contains("naive_timestamp_zone")
        );
        assert!(bad(|s| s.max_payload_bytes = MAX_PAYLOAD_BYTES + 1).contains("max_payload_bytes"));
        let largest = Settings {
            max_payload_bytes: MAX_PAYLOAD_BYTES,
            ..Settings::default()
        };
        largest.validate().unwrap();
        assert!(bad(|s| s.max_batch_readings = 0).contains("max_batch_readings"));
        let overlap = bad(|s| {
            s.topic_templates = vec!["plant/+site/+sensor_id".into(), "plant/x/+sensor_id".into()]
        });
        assert!(overlap.contains("topic_templates[0]"), "{overlap}");
        assert!(
            bad(|s| s.topic_templates = vec!["plant/+site/+kind".into()])
                .contains("topic_templates[0] 'plant/+site/+kind' has no +sensor_id")
        );
        assert!(bad(|s| s.tls_cert = Some("c.pem".into())).contains("tls_key"));
        assert!(
            bad(|s| s.cors_origins = vec!["https://a.example/path".into()])
                .contains("cors_origins")
        );
        assert!(bad(|s| s.cors_origins = vec!["a.example".into()]).contains("cors_origins"));
        Settings {
            cors_origins: vec!["*".into(), "http://localhost:3000".into()],
            ..Settings::default()
        }
        .validate()
        .unwrap();
        assert!(
            bad(|s| s.mqtts_listen = Some(SocketAddr::from(([0, 0, 0, 0], 8883))))
                .contains("tls_cert")
        );
        assert!(
            bad(|s| {
                s.tls_cert = Some("c.pem".into());
                s.tls_key = Some("k.pem".into());
                s.mqtts_listen = Some(SocketAddr::from(([0, 0, 0, 0], 8883)));
                s.tls_client_ca = Some("ca.pem".into());
            })
            .contains("mqtt_auth")
        );
    }
}
