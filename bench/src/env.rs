//! What every scenario runs against: the MongoDB wire server and Redis that `scripts/bench`
//! started, and sensorhub processes spawned here, one per scenario, each on its own ports with
//! its own database, Redis key prefix and local log, so scenarios never see each other's data.
//!
//! sensorhub runs as the release binary with JSON logs; when it stops, its log is scanned for
//! warnings and errors, which the report lists: a benchmark that only prints numbers hides the
//! problems that explain them.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bson::doc;
use tokio::process::{Child, Command};

use super::client::HttpClient;

/// The services and the binary under test.
#[derive(Debug)]
pub struct Env {
    pub mongodb_uri: String,
    pub redis_url: String,
    pub sensorhub: PathBuf,
    /// Extra flags for every `sensorhub serve`.
    pub sensorhub_args: Vec<String>,
    pub work: PathBuf,
    /// Distinguishes this run's databases and key prefixes from any other's.
    pub run_id: String,
    pub mongo: mongodb::Client,
    /// Service processes whose CPU use the report shows: (name, pid).
    pub services: Vec<(String, u32)>,
    settings_file: PathBuf,
}

impl Env {
    pub async fn new(
        mongodb_uri: String,
        redis_url: String,
        sensorhub: PathBuf,
        sensorhub_args: Vec<String>,
        work: PathBuf,
        services: Vec<(String, u32)>,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(
            sensorhub.is_file(),
            "no sensorhub binary at {} (build it with cargo build --release)",
            sensorhub.display()
        );
        std::fs::create_dir_all(&work)
            .with_context(|| format!("cannot create {}", work.display()))?;
        // An empty settings file, passed explicitly, so a sensorhub.toml in the working
        // directory cannot change what is measured.
        let settings_file = work.join("sensorhub.toml");
        std::fs::write(&settings_file, "")?;
        let mongo = mongodb::Client::with_uri_str(&mongodb_uri)
            .await
            .context("invalid MongoDB URI")?;
        mongo
            .database("admin")
            .run_command(doc! {"ping": 1})
            .await
            .with_context(|| format!("cannot reach MongoDB at {mongodb_uri}"))?;
        Ok(Self {
            mongodb_uri,
            redis_url,
            sensorhub,
            sensorhub_args,
            work,
            run_id: format!("{:08x}", rand::random::<u32>()),
            mongo,
            services,
            settings_file,
        })
    }

    /// The database a scenario's sensorhub (or the ceiling) uses.
    pub fn database(&self, scenario: &str) -> String {
        format!("bench_{}_{scenario}", self.run_id)
    }

    /// Starts sensorhub for `scenario` without waiting for it.
    pub fn launch(&self, scenario: &str) -> anyhow::Result<Hub> {
        self.launch_with(scenario, &self.database(scenario), &[])
    }

    /// Starts a sensorhub named `instance` (its own local log, key prefix and ports) that
    /// stores into `database`, with `extra` flags; several instances may share a database.
    pub fn launch_with(
        &self,
        instance: &str,
        database: &str,
        extra: &[String],
    ) -> anyhow::Result<Hub> {
        // A fresh local log: a leftover one would be replayed into the new database.
        let _ = std::fs::remove_dir_all(self.work.join(instance));
        self.relaunch(instance, database, extra)
    }

    /// Starts `instance` again on what its previous run left: its local log and the record
    /// of Redis's state beside it, as a restarted service finds them.
    pub fn relaunch(
        &self,
        instance: &str,
        database: &str,
        extra: &[String],
    ) -> anyhow::Result<Hub> {
        let scenario = instance;
        let dir = self.work.join(scenario);
        std::fs::create_dir_all(&dir)?;
        let (mqtt, mqtt5, http) = (free_addr()?, free_addr()?, free_addr()?);
        let database = database.to_owned();
        // One log per run of the instance: a restart's must not overwrite the first run's.
        let log = (1..)
            .map(|run| match run {
                1 => dir.join("sensorhub.log"),
                _ => dir.join(format!("sensorhub.{run}.log")),
            })
            .find(|path| !path.exists())
            .context("no free log name")?;
        let log_file = std::fs::File::create(&log)?;
        let mut command = Command::new(&self.sensorhub);
        command
            .arg("serve")
            .arg("--config")
            .arg(&self.settings_file)
            .args(["--mqtt-listen", &mqtt.to_string()])
            .args(["--mqtt5-listen", &mqtt5.to_string()])
            .args(["--http-listen", &http.to_string()])
            .args(["--mongodb-uri", &self.mongodb_uri])
            .args(["--mongodb-database", &database])
            .args(["--redis-url", &self.redis_url])
            .args([
                "--redis-prefix",
                // Instances that share a database share its cache too.
                &format!("bench:{database}:"),
            ])
            .arg("--journal-dir")
            .arg(dir.join("journal"))
            .args(["--log-format", "json"])
            .args(&self.sensorhub_args)
            .args(extra)
            .env("RUST_LOG", "info,rumqttd=off,poem=warn")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .kill_on_drop(true);
        // Flags above set everything; the environment must not override what they leave out.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            if key.starts_with("SENSORHUB_") || key.starts_with("MONGODB_") || key == "REDIS_URL" {
                command.env_remove(key.as_ref());
            }
        }
        let launched = Instant::now();
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {}", self.sensorhub.display()))?;
        let pid = child.id().context("sensorhub exited at once")?;
        Ok(Hub {
            child,
            pid,
            mqtt,
            http,
            database,
            log,
            launched,
        })
    }

    /// Starts sensorhub for `scenario` and waits until it serves.
    pub async fn spawn(&self, scenario: &str) -> anyhow::Result<Hub> {
        let mut hub = self.launch(scenario)?;
        hub.wait_ready(Duration::from_secs(30)).await?;
        Ok(hub)
    }

    /// Drops a scenario's database, so later scenarios run against a server as empty as the
    /// first one did.
    pub async fn drop_database(&self, database: &str) {
        if let Err(e) = self.mongo.database(database).drop().await {
            tracing::warn!(database, error = %e, "cannot drop the benchmark database");
        }
    }

    /// Documents in a scenario's readings collection.
    pub async fn count_readings(&self, database: &str, exact: bool) -> anyhow::Result<u64> {
        let readings = self
            .mongo
            .database(database)
            .collection::<bson::Document>("sensor_readings");
        Ok(if exact {
            readings.count_documents(doc! {}).await?
        } else {
            readings.estimated_document_count().await?
        })
    }
}

pub fn free_addr() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").context("no free port")?;
    Ok(listener.local_addr()?)
}

/// One running sensorhub.
#[derive(Debug)]
pub struct Hub {
    child: Child,
    pub pid: u32,
    pub mqtt: SocketAddr,
    pub http: SocketAddr,
    pub database: String,
    pub log: PathBuf,
    pub launched: Instant,
}

/// Counters read from `/metrics`.
#[derive(Debug, Default, Clone, Copy)]
pub struct HubMetrics {
    pub stored: u64,
    pub duplicates: u64,
    pub refused: u64,
    pub dead_letters: u64,
    pub store_errors: u64,
    pub cache_errors: u64,
    pub cache_rebuilds: u64,
    pub journal_pending_bytes: u64,
}

impl HubMetrics {
    /// Whether every one of `acked` readings was settled in MongoDB (stored, or found already
    /// stored) and nothing is left in the local log.
    pub fn settled(&self, acked: u64) -> bool {
        self.stored + self.duplicates >= acked && self.journal_pending_bytes == 0
    }
}

/// What sensorhub's log said, and how it stopped.
#[derive(Debug, Default)]
pub struct HubLog {
    pub warnings: u64,
    pub errors: u64,
    /// Distinct warning and error messages, with how often each appeared.
    pub messages: BTreeMap<String, u64>,
    pub exit: String,
    pub shutdown: Duration,
}

impl Hub {
    /// Polls `GET /health` until it answers 200, failing if the process exits first.
    pub async fn wait_ready(&mut self, patience: Duration) -> anyhow::Result<Duration> {
        let deadline = Instant::now() + patience;
        let mut http = HttpClient::new(self.http);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "sensorhub exited at start with {status}; its log ({}):\n{}",
                    self.log.display(),
                    tail(&self.log, 20)
                );
            }
            if let Ok(r) = http.get("/health", Duration::from_millis(500)).await
                && r.status == 200
            {
                return Ok(self.launched.elapsed());
            }
            if Instant::now() > deadline {
                bail!(
                    "sensorhub not ready after {patience:?}; its log:\n{}",
                    tail(&self.log, 20)
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    /// A client for this sensorhub's HTTP API.
    pub fn http_client(&self) -> HttpClient {
        HttpClient::new(self.http)
    }

    /// SIGTERM, then waits for the orderly shutdown (SIGKILL after a minute); returns what
    /// the log holds.
    pub async fn stop(mut self) -> HubLog {
        let asked = Instant::now();
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status();
        let exit = match tokio::time::timeout(Duration::from_secs(60), self.child.wait()).await {
            Ok(Ok(status)) if status.success() => "exited cleanly".to_owned(),
            Ok(Ok(status)) => format!("exited with {status}"),
            Ok(Err(e)) => format!("cannot wait for it: {e}"),
            Err(_) => {
                let _ = self.child.kill().await;
                "ignored SIGTERM for a minute; killed".to_owned()
            }
        };
        let mut log = scan_log(&self.log);
        log.exit = exit;
        log.shutdown = asked.elapsed();
        log
    }
}

/// The counters of `/metrics`, through `http` (a client of the sensorhub in question).
pub async fn fetch_metrics(http: &mut HttpClient) -> anyhow::Result<HubMetrics> {
    let response = http.get("/metrics", Duration::from_secs(5)).await?;
    anyhow::ensure!(
        response.status == 200,
        "/metrics answered {}",
        response.status
    );
    Ok(parse_metrics(&response.text()))
}

/// Reads the counters the benchmark needs from the Prometheus text.
pub fn parse_metrics(text: &str) -> HubMetrics {
    let mut m = HubMetrics::default();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((name, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.trim().parse::<u64>() else {
            continue;
        };
        match name {
            "sensorhub_readings_stored_total" => m.stored = value,
            "sensorhub_readings_duplicate_total" => m.duplicates = value,
            "sensorhub_messages_refused_total" => m.refused = value,
            "sensorhub_store_errors_total" => m.store_errors = value,
            "sensorhub_cache_errors_total" => m.cache_errors = value,
            "sensorhub_cache_rebuilds_total" => m.cache_rebuilds = value,
            "sensorhub_journal_pending_bytes" => m.journal_pending_bytes = value,
            _ if name.starts_with("sensorhub_dead_letters_total{") => m.dead_letters += value,
            _ => {}
        }
    }
    m
}

/// Counts WARN and ERROR events of a JSON log and collects their distinct messages.
pub fn scan_log(path: &Path) -> HubLog {
    let mut log = HubLog::default();
    let text = std::fs::read_to_string(path).unwrap_or_default();
    for line in text.lines() {
        let Ok(event) = serde_json::from_str::<serde_json::Value>(line) else {
            // Not JSON: printed outside tracing (a panic message, say). Always worth showing.
            if !line.trim().is_empty() {
                log.errors += 1;
                *log.messages.entry(format!("ERROR {line}")).or_default() += 1;
            }
            continue;
        };
        let level = event["level"].as_str().unwrap_or_default();
        if level != "WARN" && level != "ERROR" {
            continue;
        }
        if level == "WARN" {
            log.warnings += 1;
        } else {
            log.errors += 1;
        }
        let fields = &event["fields"];
        let mut message = format!("{level} {}", fields["message"].as_str().unwrap_or("?"));
        if let Some(error) = fields["error"].as_str() {
            // Errors carry numbers (byte counts, positions): only their start groups them.
            let short: String = error.chars().take(160).collect();
            message.push_str(&format!(" (error: {short})"));
        }
        *log.messages.entry(message).or_default() += 1;
    }
    log
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_counters_it_needs() {
        let text = "# HELP x\nsensorhub_readings_stored_total 42\n\
                    sensorhub_readings_duplicate_total 3\n\
                    sensorhub_dead_letters_total{reason=\"invalid_json\"} 2\n\
                    sensorhub_dead_letters_total{reason=\"too_large\"} 1\n\
                    sensorhub_journal_pending_bytes 1000\n";
        let m = parse_metrics(text);
        assert_eq!(
            (
                m.stored,
                m.duplicates,
                m.dead_letters,
                m.journal_pending_bytes
            ),
            (42, 3, 3, 1000)
        );
    }

    #[test]
    fn groups_warnings_and_errors() {
        let dir = std::env::temp_dir().join(format!("bench-log-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("log");
        std::fs::write(
            &path,
            concat!(
                r#"{"level":"INFO","fields":{"message":"sensorhub ready"}}"#,
                "\n",
                r#"{"level":"WARN","fields":{"message":"slow","error":"x"}}"#,
                "\n",
                r#"{"level":"WARN","fields":{"message":"slow","error":"x"}}"#,
                "\n",
                "thread 'main' panicked\n"
            ),
        )
        .unwrap();
        let log = scan_log(&path);
        assert_eq!((log.warnings, log.errors), (2, 1));
        assert_eq!(log.messages["WARN slow (error: x)"], 2);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
