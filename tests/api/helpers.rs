//! The harness: real Redis, a real MongoDB wire server and the real sensorhub binary, each on
//! its own free port, each test in its own database and Redis key prefix.
//!
//! Shared servers come from the environment when `scripts/test` started them
//! (`SENSORHUB_TEST_MONGODB_URI`, `SENSORHUB_TEST_REDIS_URL`); otherwise the harness starts them
//! itself. Every process it starts is watched by a small shell that kills it when the test
//! process dies, so no server outlives a run.

#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bson::{Document, doc};
use rumqttc::{AsyncClient, Event, EventLoop, Incoming, MqttOptions, Outgoing, QoS};
use serde_json::Value;

/// How long a test waits for something that should happen much sooner. A liveness bound, not
/// a performance claim: performance is measured by the benchmark.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// Where test servers listen: below Linux's ephemeral range (32768-60999), which the outgoing
/// connections of the tests draw their local ports from. A port the kernel picked for `bind(0)`
/// was in that range, and between this function and the server's own bind one of the thousands
/// of connections some tests open could take it ("Address already in use", seen once). A Redis
/// Cluster node's bus port is its port + 10,000: 22,000-31,999, outside both.
const PORTS: std::ops::Range<u16> = 12_000..22_000;

/// A port nothing listens on, never the same one twice in this process.
pub fn free_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(u32::MAX);
    let span = u32::from(PORTS.end - PORTS.start);
    // Processes started side by side begin in different places.
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(7919) % span,
        std::sync::atomic::Ordering::AcqRel,
        std::sync::atomic::Ordering::Acquire,
    );
    for _ in 0..span {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::AcqRel) % span;
        let port = PORTS.start + u16::try_from(n).expect("within the range");
        let free = ["127.0.0.1", "0.0.0.0"]
            .iter()
            .all(|host| TcpListener::bind((*host, port)).is_ok());
        if free {
            return port;
        }
    }
    panic!("no free port in {PORTS:?}");
}

pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff)
}

fn wait_for_port(port: u16, what: &str) {
    let deadline = Instant::now() + PATIENCE;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} did not start listening on {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A server process the harness started, killed when dropped or when the test process dies.
#[derive(Debug)]
pub struct Server {
    pub port: u16,
    program: String,
    args: Vec<String>,
    child: Option<Child>,
    pub dir: PathBuf,
}

impl Server {
    fn start(program: &str, args: Vec<String>, port: u16, dir: PathBuf) -> Self {
        let mut server = Self {
            port,
            program: program.to_owned(),
            args,
            child: None,
            dir,
        };
        server.resume();
        server
    }

    /// (Re)starts the process with the same port and data directory.
    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "{} already running", self.program);
        let log = std::fs::File::create(self.dir.join(format!("{}.log", self.program)))
            .expect("server log");
        // The server's pid goes to a file, so signals reach it and nothing else; the watcher
        // kills the server once this test process is gone.
        let pid_file = self.pid_file();
        let _ = std::fs::remove_file(&pid_file);
        let script = format!(
            "{} & server=$!; echo $server > '{}'; (while kill -0 {} 2>/dev/null; do sleep 1; done; kill -9 $server 2>/dev/null) & wait $server",
            shell_words(&self.program, &self.args),
            pid_file.display(),
            std::process::id()
        );
        let child = Command::new("bash")
            .arg("-c")
            .arg(script)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.program));
        self.child = Some(child);
        wait_for_port(self.port, &self.program);
    }

    /// Kills the process (SIGKILL) and waits until its port is free.
    pub fn stop(&mut self) {
        self.signal("-KILL");
    }

    /// Freezes the process (SIGSTOP): its port stays open, connections stay up, nothing answers.
    pub fn freeze(&self) {
        self.send("-STOP");
    }

    /// Lets a frozen process run again (SIGCONT).
    pub fn thaw(&self) {
        self.send("-CONT");
    }

    fn pid_file(&self) -> PathBuf {
        self.dir.join("server.pid")
    }

    /// The server's pid, as its start wrote it.
    fn pid(&self) -> Option<String> {
        let pid = std::fs::read_to_string(self.pid_file()).ok()?;
        Some(pid.trim().to_owned()).filter(|p| !p.is_empty())
    }

    fn send(&self, signal: &str) {
        let pid = self
            .pid()
            .unwrap_or_else(|| panic!("no {} process to signal", self.program));
        let status = Command::new("kill")
            .args([signal, &pid])
            .status()
            .expect("kill");
        assert!(status.success(), "no {} process to signal", self.program);
    }

    /// Asks the process to stop (SIGTERM) and waits until it has and its port is free.
    pub fn terminate(&mut self) {
        self.signal("-TERM");
    }

    fn signal(&mut self, signal: &str) {
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill").args([signal, &pid]).status();
            // Once it is gone, its pid may be another process's.
            let _ = std::fs::remove_file(self.pid_file());
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let deadline = Instant::now() + PATIENCE;
        while TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
            assert!(Instant::now() < deadline, "{} did not stop", self.program);
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.stop();
        }
    }
}

fn shell_words(program: &str, args: &[String]) -> String {
    std::iter::once(program.to_owned())
        .chain(
            args.iter()
                .map(|a| format!("'{}'", a.replace('\'', "'\\''"))),
        )
        .collect::<Vec<_>>()
        .join(" ")
}

fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir()
        .join("sensorhub-tests")
        .join(unique(name));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// A Redis of its own, for tests that restart or flush it.
pub fn start_redis() -> Server {
    let port = free_port();
    let dir = scratch_dir("redis");
    let args = vec![
        "--port".into(),
        port.to_string(),
        "--bind".into(),
        "127.0.0.1".into(),
        "--save".into(),
        String::new(),
        "--appendonly".into(),
        "no".into(),
        "--dir".into(),
        dir.display().to_string(),
    ];
    Server::start("redis-server", args, port, dir)
}

/// A Redis Cluster of `masters` masters without replicas (no persistence: a restarted master
/// comes back empty, with its slots), joined by `redis-cli --cluster create`.
pub fn start_redis_cluster(masters: usize) -> Vec<Server> {
    let nodes: Vec<Server> = (0..masters)
        .map(|_| {
            let port = free_port();
            let dir = scratch_dir("redis-cluster");
            let args = [
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                &dir.join("nodes.conf").display().to_string(),
                "--cluster-node-timeout",
                "2000",
                "--dir",
                &dir.display().to_string(),
            ]
            .map(str::to_owned)
            .to_vec();
            Server::start("redis-server", args, port, dir)
        })
        .collect();
    let mut create = Command::new("redis-cli");
    create.arg("--cluster").arg("create");
    for node in &nodes {
        create.arg(format!("127.0.0.1:{}", node.port));
    }
    let out = create
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .output()
        .expect("redis-cli --cluster create");
    assert!(
        out.status.success(),
        "cluster create failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    for node in &nodes {
        wait_cluster_ok(node.port);
    }
    nodes
}

/// Waits until a cluster node reports `cluster_state:ok`.
pub fn wait_cluster_ok(port: u16) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let out = Command::new("redis-cli")
            .args(["-p", &port.to_string(), "cluster", "info"])
            .output()
            .expect("redis-cli cluster info");
        if String::from_utf8_lossy(&out.stdout).contains("cluster_state:ok") {
            return;
        }
        assert!(Instant::now() < deadline, "cluster node {port} not ok");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A Mosquitto broker with persistence on and no limit on queued messages (the default 1,000
/// per client drops QoS 1 messages the broker already acknowledged to their publisher).
pub fn start_mosquitto() -> Server {
    start_mosquitto_with("")
}

/// Like `start_mosquitto`, with more configuration lines (another listener, say).
pub fn start_mosquitto_with(extra: &str) -> Server {
    let port = free_port();
    let dir = scratch_dir("mosquitto");
    // Mosquitto started as root drops to its own user, which must be able to save here.
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777))
        .expect("chmod");
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n\
             persistence_location {}/\nautosave_interval 1\nmax_queued_messages 0\n\
             max_inflight_messages 100\n{extra}",
            dir.display()
        ),
    )
    .expect("mosquitto.conf");
    Server::start(
        "mosquitto",
        vec!["-c".into(), conf.display().to_string()],
        port,
        dir,
    )
}

/// A MongoDB wire server of its own, for tests that stop it. Data survives `stop`/`resume`.
pub fn start_mongo() -> Server {
    start_mongo_with(&[])
}

/// Like `start_mongo`, with extra flags for the server (e.g. `--sync-on-commit`).
pub fn start_mongo_with(extra: &[&str]) -> Server {
    let port = free_port();
    let dir = scratch_dir("mongo");
    let program = mongo_program();
    let mut args = vec![
        "--host".into(),
        "127.0.0.1".into(),
        "--port".into(),
        port.to_string(),
        "--storage-path".into(),
        dir.join("data").display().to_string(),
    ];
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    Server::start(&program, args, port, dir)
}

fn mongo_program() -> String {
    std::env::var("SENSORHUB_TEST_MONGOD").unwrap_or_else(|_| "secantusd-rs".into())
}

/// The shared servers of this test process.
pub struct Shared {
    pub mongodb_uri: String,
    pub redis_url: String,
    _servers: Vec<Server>,
}

pub fn shared() -> &'static Shared {
    static SHARED: OnceLock<Shared> = OnceLock::new();
    SHARED.get_or_init(|| {
        let mut servers = Vec::new();
        let mongodb_uri = std::env::var("SENSORHUB_TEST_MONGODB_URI").unwrap_or_else(|_| {
            let mongo = start_mongo();
            let uri = format!("mongodb://127.0.0.1:{}", mongo.port);
            servers.push(mongo);
            uri
        });
        let redis_url = std::env::var("SENSORHUB_TEST_REDIS_URL").unwrap_or_else(|_| {
            let redis = start_redis();
            let url = format!("redis://127.0.0.1:{}", redis.port);
            servers.push(redis);
            url
        });
        Shared {
            mongodb_uri,
            redis_url,
            _servers: servers,
        }
    })
}

/// How to start sensorhub for one test.
#[derive(Clone, Debug, Default)]
pub struct AppOptions {
    /// A MongoDB other than the shared one.
    pub mongodb_uri: Option<String>,
    /// A Redis other than the shared one.
    pub redis_url: Option<String>,
    /// Extra flags.
    pub args: Vec<String>,
    /// A database (and Redis key prefix) shared with another instance, instead of its own.
    pub share_store_with: Option<(String, String)>,
}

/// One sensorhub process with its own ports, database, key prefix and local log.
pub struct TestApp {
    pub mqtt_port: u16,
    pub mqtt5_port: u16,
    pub http_port: u16,
    pub database: String,
    pub prefix: String,
    pub journal_dir: PathBuf,
    pub mongodb_uri: String,
    pub redis_url: String,
    options: AppOptions,
    child: Option<Child>,
    log: PathBuf,
    starts: u32,
    pub http: reqwest::Client,
}

impl TestApp {
    pub async fn spawn() -> Self {
        Self::spawn_with(AppOptions::default()).await
    }

    pub async fn spawn_with(options: AppOptions) -> Self {
        let shared = shared();
        let dir = scratch_dir("app");
        let mut app = Self {
            mqtt_port: free_port(),
            mqtt5_port: free_port(),
            http_port: free_port(),
            database: options
                .share_store_with
                .as_ref()
                .map_or_else(|| unique("test"), |(db, _)| db.clone()),
            prefix: options
                .share_store_with
                .as_ref()
                .map_or_else(|| unique("t"), |(_, prefix)| prefix.clone()),
            journal_dir: dir.join("journal"),
            mongodb_uri: options
                .mongodb_uri
                .clone()
                .unwrap_or_else(|| shared.mongodb_uri.clone()),
            redis_url: options
                .redis_url
                .clone()
                .unwrap_or_else(|| shared.redis_url.clone()),
            options,
            child: None,
            log: dir.join("sensorhub.log"),
            starts: 0,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .expect("http client"),
        };
        app.start().await;
        app
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sensorhub"));
        cmd.arg("serve")
            .args(["--mqtt-listen", &format!("127.0.0.1:{}", self.mqtt_port)])
            .args(["--mqtt5-listen", &format!("127.0.0.1:{}", self.mqtt5_port)])
            .args(["--http-listen", &format!("127.0.0.1:{}", self.http_port)])
            .args(["--journal-dir", &self.journal_dir.display().to_string()])
            .args(["--redis-prefix", &self.prefix])
            .args(&self.options.args)
            .env("MONGODB_URI", &self.mongodb_uri)
            .env("MONGODB_DATABASE", &self.database)
            .env("REDIS_URL", &self.redis_url)
            .env("RUST_LOG", "info,rumqttd=off")
            .env_remove("SENSORHUB_CONFIG");
        cmd
    }

    /// Starts the process and waits until it reports ready.
    pub async fn start(&mut self) {
        assert!(self.child.is_none());
        self.starts += 1;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("app log");
        let child = self
            .command()
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("cannot start sensorhub");
        self.child = Some(child);
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("sensorhub exited at start with {status}:\n{}", self.logs());
            }
            if self.logs().matches("sensorhub ready").count() >= self.starts as usize {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "sensorhub not ready:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process this harness started is still alive (it was not stopped by the test).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits for the exit; returns whether it exited cleanly (status 0).
    pub async fn terminate(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return false;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.success();
            }
            assert!(Instant::now() < deadline, "sensorhub ignored SIGTERM");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.http_port)
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(self.url(path))
            .send()
            .await
            .expect("HTTP request failed")
    }

    /// GET returning (status, JSON body).
    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let response = self.get(path).await;
        let status = response.status().as_u16();
        let body = response.json().await.expect("JSON body");
        (status, body)
    }

    /// The JSON body of `path` if Redis answered it (`X-Sensorhub-Source: redis`), else `None`.
    pub async fn get_from_redis(&self, path: &str) -> Option<Value> {
        let response = self.get(path).await;
        let redis = response
            .headers()
            .get("x-sensorhub-source")
            .is_some_and(|v| v == "redis");
        let body: Value = response.json().await.ok()?;
        redis.then_some(body)
    }

    /// The value of one Prometheus counter or gauge (labels included in `name`).
    pub async fn metric(&self, name: &str) -> u64 {
        let text = self.get("/metrics").await.text().await.expect("metrics");
        text.lines()
            .find_map(|line| {
                line.strip_prefix(name)?
                    .strip_prefix(' ')?
                    .trim()
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| panic!("no metric {name} in:\n{text}"))
    }

    pub async fn mongo(&self) -> mongodb::Database {
        mongodb::Client::with_uri_str(&self.mongodb_uri)
            .await
            .expect("mongo client")
            .database(&self.database)
    }

    pub async fn readings(&self) -> mongodb::Collection<Document> {
        self.mongo().await.collection("sensor_readings")
    }

    /// Every stored reading document.
    pub async fn reading_docs(&self) -> Vec<Document> {
        use futures_util::TryStreamExt as _;
        let cursor = self.readings().await.find(doc! {}).await.expect("find");
        cursor.try_collect().await.expect("read the readings")
    }

    pub async fn count_readings(&self) -> u64 {
        self.readings()
            .await
            .count_documents(doc! {})
            .await
            .expect("count")
    }

    /// Waits until `check` returns Some, polling; panics with `what` after PATIENCE.
    pub async fn eventually<T, F, Fut>(&self, what: &str, mut check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(value) = check().await {
                return value;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn wait_for_count(&self, expected: u64) {
        self.eventually(&format!("{expected} readings stored"), || async {
            (self.count_readings().await == expected).then_some(())
        })
        .await;
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // A failing test shows how the process it talked to fared.
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            let logs = self.logs();
            let lines: Vec<&str> = logs.lines().collect();
            eprintln!(
                "sensorhub (http {}, mqtt {}) {}; the last lines of its log ({}):\n{}",
                self.http_port,
                self.mqtt_port,
                exited.map_or_else(
                    || "still running".to_owned(),
                    |s| format!("exited with {s}")
                ),
                self.log.display(),
                lines[lines.len().saturating_sub(40)..].join("\n")
            );
        }
        self.kill();
    }
}

/// The JSON payload of a reading.
pub fn reading_json(sensor_id: &str, value: f64, timestamp: &str) -> String {
    serde_json::json!({"sensor_id": sensor_id, "value": value, "timestamp": timestamp}).to_string()
}

/// A test timestamp: `second` seconds after 2026-01-01T00:00:00Z, with milliseconds.
pub fn ts(millis: i64) -> String {
    let base = 1_767_225_600_000_i64; // 2026-01-01T00:00:00Z
    sensorhub::domain::Timestamp::from_millis(base + millis)
        .expect("in range")
        .to_string()
}

/// An MQTT connection that publishes at QoS 1 and knows exactly which publishes the broker
/// acknowledged. Publishes are issued by one task, in order, so the n-th pkid assigned belongs
/// to the n-th publish.
pub struct Publisher {
    client: AsyncClient,
    state: Arc<Mutex<AckState>>,
    poller: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct AckState {
    queued: std::collections::VecDeque<usize>,
    inflight: HashMap<u16, usize>,
    acked: HashSet<usize>,
    connected: bool,
    errors: u32,
}

impl Publisher {
    /// Connects to `port` with `client_id`; keeps reconnecting (with a clean session) until dropped.
    pub async fn connect(port: u16, client_id: &str) -> Self {
        let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
        options.set_keep_alive(Duration::from_secs(30));
        options.set_inflight(200);
        options.set_max_packet_size(4 << 20, 4 << 20);
        let (client, eventloop) = AsyncClient::new(options, 1000);
        let state: Arc<Mutex<AckState>> = Arc::default();
        let poller = tokio::spawn(poll(eventloop, Arc::clone(&state)));
        let publisher = Self {
            client,
            state,
            poller,
        };
        let deadline = Instant::now() + PATIENCE;
        while !publisher.state.lock().unwrap().connected {
            assert!(
                Instant::now() < deadline,
                "publisher could not connect to {port}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        publisher
    }

    /// Publishes message `id` at QoS 1; returns when queued.
    pub async fn publish(&self, id: usize, topic: &str, payload: impl Into<Vec<u8>>) {
        self.state.lock().unwrap().queued.push_back(id);
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.into())
            .await
            .expect("publish queue closed");
    }

    /// The ids acknowledged so far. Exact only while the connection never broke: rumqttc does
    /// not say which publish a PUBACK after a reconnect belongs to, so this refuses to guess.
    /// Tests that break connections use the numbered publisher in `faults.rs`.
    pub fn acked(&self) -> HashSet<usize> {
        let state = self.state.lock().unwrap();
        assert_eq!(
            state.errors, 0,
            "the connection broke; acknowledgements are not exact"
        );
        state.acked.clone()
    }

    pub fn connection_errors(&self) -> u32 {
        self.state.lock().unwrap().errors
    }

    /// Waits until the broker acknowledged `count` publishes.
    pub async fn wait_acked(&self, count: usize) {
        let deadline = Instant::now() + PATIENCE;
        while self.state.lock().unwrap().acked.len() < count {
            assert!(
                Instant::now() < deadline,
                "only {} of {count} publishes acknowledged",
                self.state.lock().unwrap().acked.len()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub async fn disconnect(self) {
        let _ = self.client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.poller).await;
    }
}

async fn poll(mut eventloop: EventLoop, state: Arc<Mutex<AckState>>) {
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Incoming::ConnAck(_))) => state.lock().unwrap().connected = true,
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) if pkid != 0 => {
                let mut s = state.lock().unwrap();
                if !s.inflight.contains_key(&pkid)
                    && let Some(id) = s.queued.pop_front()
                {
                    s.inflight.insert(pkid, id);
                }
            }
            Ok(Event::Incoming(Incoming::PubAck(ack))) => {
                let mut s = state.lock().unwrap();
                if let Some(id) = s.inflight.remove(&ack.pkid) {
                    s.acked.insert(id);
                }
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
            Ok(_) => {}
            Err(_) => {
                // Unacknowledged publishes are dropped by rumqttc on reconnect (clean session);
                // they simply stay unacknowledged here, and the caller decides to resend.
                {
                    let mut s = state.lock().unwrap();
                    s.connected = false;
                    s.errors += 1;
                    let pending = std::mem::take(&mut eventloop.pending);
                    for request in pending {
                        if let rumqttc::Request::Publish(p) = request
                            && p.pkid == 0
                        {
                            s.queued.pop_front();
                        }
                    }
                    s.inflight.clear();
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

pub fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

pub fn path_exists(path: &Path) -> bool {
    path.exists()
}
