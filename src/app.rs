//! The wiring: the only module that knows every other. It builds the pipeline in dependency
//! order, owns every task, and shuts down in the reverse order:
//!
//! 1. stop intake: the local log refuses appends (a publisher sending now gets no PUBACK and
//!    sends again after the restart), the MQTT listeners and the simulator stop;
//! 2. drain: the writer stores what the log holds, within the grace period;
//! 3. flush: the last Redis updates, the log checkpoint and a final sync;
//! 4. close: the HTTP server finishes its requests.

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::api::{self, ApiOptions, ApiState};
use crate::auth::{ApiKeys, Device, Gatekeeper, SensorPattern, hash_password};
use crate::broker::{self, BrokerStatus, CaptureSink, EmbeddedBroker, ListenOverrides, Security};
use crate::cache::{Cache, CacheConfig, Health};
use crate::config::{Settings, redact};
use crate::domain::{Captured, DeadLetterBudget};
use crate::health::{Check, Readiness};
use crate::ingest::{self, Writer, WriterStop};
use crate::journal::{Journal, JournalConfig};
use crate::metrics::{Gauges, Metrics};
use crate::simulator::{self, SimulatorConfig};
use crate::store::{Store, StoreConfig};
use crate::tls::{Certificates, HttpsAcceptor};

/// How often the sensor summary is written: how far `/sensors` may trail the readings, at light
/// load and at most.
const SUMMARY_PACE: ingest::SummaryPace = ingest::SummaryPace {
    least: Duration::from_millis(500),
    most: Duration::from_secs(10),
};
/// How often the readiness checks run.
const READY_INTERVAL: Duration = Duration::from_secs(1);
/// Sparkplug rebirth requests queued for the broker side (at most one per node is outstanding).
const REBIRTH_QUEUE: usize = 1024;

/// A running sensorhub.
#[derive(Debug)]
pub struct Application {
    http_addr: SocketAddr,
    mqtt: Vec<(String, SocketAddr)>,
    /// `None` in external broker mode.
    broker: Option<EmbeddedBroker>,
    journal: Journal,
    grace: Duration,
    /// Tasks that end when `intake` is cancelled: listeners, tap, simulator, repair, upkeep.
    services: JoinSet<anyhow::Result<()>>,
    intake: CancellationToken,
    writer: JoinHandle<()>,
    writer_stop: WriterStop,
    cache_updater: JoinHandle<()>,
    /// Writes the sensor summary; stopped after the writer, so it writes the writer's last.
    summary_writer: JoinHandle<()>,
    summaries_stop: CancellationToken,
    http: JoinHandle<std::io::Result<()>>,
    http_stop: CancellationToken,
    /// Runs the readiness checks until the HTTP server closes, so `/health/ready` says 503
    /// while the process drains.
    readiness: JoinHandle<()>,
    started: Instant,
}

impl Application {
    /// Starts everything; returns once MQTT and HTTP accept connections. Fails with a message
    /// that names the dependency (port, MongoDB, Redis, log directory) and what to do.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let started = Instant::now();
        raise_open_file_limit();
        let limits = settings.limits()?;
        let max_payload_bytes = limits.max_payload_bytes;
        let templates = Arc::new(limits.templates.clone());
        let mut broker_config = broker::load_config(
            &settings.broker_config,
            settings.broker_config != Settings::default().broker_config,
            &ListenOverrides {
                mqtt: settings.mqtt_listen,
                mqtt5: settings.mqtt5_listen,
            },
        )?;
        let gatekeeper = gatekeeper(&settings, &mut broker_config)?;
        let api_keys = match &settings.api_keys {
            Some(path) => Some(Arc::new(
                ApiKeys::from_file(path).context("cannot load the HTTP API keys (--api-keys)")?,
            )),
            None => None,
        };
        let certificates = match settings.tls_files()? {
            Some(files) => Some(Arc::new(
                Certificates::load(files).context("cannot load the TLS certificate")?,
            )),
            None => None,
        };
        // Ports first: the cheapest failure, and the one people hit most.
        let http_listener = TcpListener::bind(settings.http_listen).with_context(|| {
            format!(
                "cannot listen for HTTP on {}: another process holds the port; stop it or pass \
                 --http-listen",
                settings.http_listen
            )
        })?;
        let http_addr = http_listener.local_addr()?;
        let external = settings.external()?;
        if external.is_none() {
            broker::check_listeners(&broker_config)?;
        }

        let store = Store::connect(StoreConfig {
            uri: settings.mongodb_uri.clone(),
            database: settings.mongodb_database.clone(),
            collection: settings.mongodb_collection.clone(),
            dead_letter_collection: settings.dead_letter_collection.clone(),
            dead_letter_ttl: Duration::from_secs(settings.dead_letter_ttl_days * 86_400),
            server_selection_timeout: Duration::from_secs(2),
            write_concern: settings.write_concern()?,
        })
        .await
        .with_context(|| {
            format!(
                "cannot reach MongoDB at {}: start it, or point MONGODB_URI at it",
                redact(&settings.mongodb_uri)
            )
        })?;
        store
            .ensure_indexes()
            .await
            .context("cannot create the MongoDB indexes")?;
        store
            .set_reading_retention(settings.reading_retention())
            .await
            .context("cannot set the readings' retention (reading_retention_days)")?;
        warn_of_other_writers(&store, &settings).await;
        let cache = Cache::connect(&CacheConfig {
            url: settings.redis_url.clone(),
            prefix: settings.redis_prefix.clone(),
            command_timeout: Duration::from_secs(1),
            memo_ttl: Duration::from_millis(settings.read_cache_ms),
        })
        .await
        .with_context(|| {
            format!(
                "cannot reach Redis at {}: start it, or point REDIS_URL at it",
                redact(&settings.redis_url)
            )
        })?;
        let journal = Journal::open(JournalConfig {
            dir: settings.journal_dir.clone(),
            segment_bytes: settings.journal_segment_bytes,
            max_bytes: settings.journal_max_bytes,
            fsync: settings.fsync_policy()?,
        })
        .context("cannot open the local log: check --journal-dir")?;

        let metrics = Arc::new(Metrics::default());
        let health = Arc::new(Health::new());
        let cache_state = Arc::new(ingest::CacheState::new(&settings.journal_dir));
        health.on_dirty({
            let cache_state = Arc::clone(&cache_state);
            Box::new(move || cache_state.mark_stale())
        });
        let live = Arc::new(crate::live::Live::default());
        let intake = CancellationToken::new();
        let mut services = JoinSet::new();

        // Consumers before producers: the writer runs before the first message can arrive.
        let (cache_tx, cache_rx) = ingest::cache_queue();
        // The Sparkplug sessions as the last run stored them (see ARCHITECTURE.md, Sparkplug).
        let sparkplug = crate::sparkplug::Sessions::new(
            store
                .sparkplug_sessions()
                .await
                .context("cannot read the Sparkplug edge-node sessions from MongoDB")?,
            settings.sparkplug_kinds()?,
        );
        let (rebirth_tx, rebirth_rx) = tokio::sync::mpsc::channel(REBIRTH_QUEUE);
        let writer_stop = WriterStop {
            drain: CancellationToken::new(),
            abort: CancellationToken::new(),
        };
        let writer = tokio::spawn(
            Writer {
                journal: journal.clone(),
                reader: journal.reader(),
                store: store.clone(),
                limits,
                metrics: Arc::clone(&metrics),
                health: Arc::clone(&health),
                cache_tx,
                live: Arc::clone(&live),
                dead_letter_budget: DeadLetterBudget::new(settings.dead_letters_per_second),
                sparkplug,
                rebirths: rebirth_tx,
            }
            .run(writer_stop.clone()),
        );
        let summaries_stop = CancellationToken::new();
        let summary_writer = tokio::spawn(ingest::summaries(
            store.clone(),
            Arc::clone(&metrics),
            SUMMARY_PACE,
            summaries_stop.clone(),
        ));
        let cache_updater = tokio::spawn(ingest::cache_updater(
            cache_rx,
            cache.clone(),
            Arc::clone(&health),
            Arc::clone(&metrics),
        ));
        services.spawn({
            let (cache, store, health, metrics) = (
                cache.clone(),
                store.clone(),
                Arc::clone(&health),
                Arc::clone(&metrics),
            );
            let cache_state = Arc::clone(&cache_state);
            let stop = intake.clone();
            async move {
                ingest::repair(
                    cache,
                    store,
                    health,
                    cache_state,
                    metrics,
                    Duration::from_millis(500),
                    stop,
                )
                .await;
                Ok(())
            }
        });
        services.spawn(keep_checkpointing(journal.clone(), intake.clone()));
        if settings.sensor_list_refresh_secs > 0 {
            services.spawn(keep_sensor_list(
                store.clone(),
                Duration::from_secs(settings.sensor_list_refresh_secs),
                intake.clone(),
            ));
        }
        services.spawn(stop_when_the_log_fails(journal.clone(), intake.clone()));

        let sink: CaptureSink = {
            let journal = journal.clone();
            Arc::new(move |batch: &[Captured]| {
                journal
                    .append(batch)
                    .map_err(|e| broker::Refused(Box::new(e)))
            })
        };
        let security = Security {
            gatekeeper: Arc::clone(&gatekeeper.0),
            tls: settings
                .mqtts_listen
                .zip(certificates.as_ref().map(Arc::clone)),
            templates,
        };
        let (broker, simulate_to, broker_status) = match external {
            None => {
                let broker = EmbeddedBroker::start(
                    broker_config,
                    sink,
                    max_payload_bytes,
                    Arc::clone(&metrics),
                    security,
                    rebirth_rx,
                    &mut services,
                    intake.clone(),
                )
                .await?;
                let port = broker.listeners().first().map(|(_, addr)| addr.port());
                let status = broker.status();
                (
                    Some(broker),
                    port.map(|p| ("127.0.0.1".to_owned(), p)),
                    status,
                )
            }
            Some(config) => {
                let to = broker::external::target_addr(&config.url)?;
                let status = Arc::new(BrokerStatus::external());
                services.spawn(broker::external::run(
                    config,
                    sink,
                    Arc::clone(&metrics),
                    Arc::clone(&status),
                    rebirth_rx,
                    intake.clone(),
                ));
                (None, Some(to), status)
            }
        };
        services.spawn(reload_on_sighup(
            Arc::clone(&gatekeeper.0),
            certificates.clone(),
            api_keys.clone(),
            intake.clone(),
        ));

        let http_stop = CancellationToken::new();
        let gauges = Arc::new({
            let journal = journal.clone();
            move || Gauges {
                journal_pending_bytes: journal.pending_bytes(),
                journal_segments: journal.segment_count() as u64,
                ..Gauges::default()
            }
        });
        let readiness = Arc::new(Readiness::new(
            readiness_checks(
                broker_status,
                journal.clone(),
                settings.ready_max_pending_bytes(),
                store.clone(),
                cache.clone(),
            ),
            Duration::from_millis(settings.ready_timeout_ms),
            READY_INTERVAL,
        ));
        // The first round before the HTTP server opens: a probe never sees "not checked yet".
        readiness.check_now().await;
        let readiness_task = tokio::spawn(Arc::clone(&readiness).run(http_stop.clone()));
        let state = ApiState::new(
            store,
            cache,
            health,
            Arc::clone(&metrics),
            gauges,
            Duration::from_millis(settings.read_cache_ms),
        )
        .with_live(live, Duration::from_secs(settings.sensor_stale_secs))
        .with_readiness(readiness)
        .with_options(ApiOptions {
            keys: api_keys,
            cors_origins: settings.cors_origins.clone(),
            max_range: settings.max_range(),
            limits: settings.limits()?,
        });
        let grace = Duration::from_secs(settings.shutdown_grace_secs);
        let write_timeout = Duration::from_secs(settings.http_write_timeout_secs);
        let header_timeout = Duration::from_secs(settings.http_header_timeout_secs);
        let http = match &certificates {
            None => tokio::spawn(api::serve(
                http_listener,
                state,
                http_stop.clone().cancelled_owned(),
                grace,
                write_timeout,
                header_timeout,
            )),
            Some(certificates) => {
                let acceptor =
                    HttpsAcceptor::new(http_listener, Arc::clone(certificates), http_stop.clone())
                        .context("cannot serve HTTPS")?;
                let acceptor = api::WriteDeadline::new(
                    acceptor,
                    write_timeout,
                    header_timeout,
                    Arc::clone(&metrics),
                );
                tokio::spawn(
                    poem::Server::new_with_acceptor(acceptor).run_with_graceful_shutdown(
                        api::app(state),
                        http_stop.clone().cancelled_owned(),
                        Some(grace),
                    ),
                )
            }
        };

        if settings.simulate {
            let (host, port) = simulate_to.context("--simulate needs an MQTT listener")?;
            let config = SimulatorConfig {
                host,
                port,
                sensors: settings.simulate_sensors,
                interval: Duration::from_millis(settings.simulate_interval_ms),
                client_id: format!("sensorhub-simulator-{:08x}", rand::random::<u32>()),
                credentials: gatekeeper.1.clone(),
            };
            services.spawn(simulator::run(config, intake.clone()));
        }

        Ok(Self {
            http_addr,
            mqtt: broker
                .as_ref()
                .map(|b| b.listeners().to_vec())
                .unwrap_or_default(),
            broker,
            journal,
            grace,
            services,
            intake,
            writer,
            writer_stop,
            cache_updater,
            summary_writer,
            summaries_stop,
            http,
            http_stop,
            readiness: readiness_task,
            started,
        })
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    pub fn mqtt_listeners(&self) -> &[(String, SocketAddr)] {
        &self.mqtt
    }

    /// Runs until `signal` resolves or a task fails, then shuts down in order.
    pub async fn run_until_stopped(
        mut self,
        signal: impl Future<Output = ()>,
    ) -> anyhow::Result<()> {
        tracing::info!(
            http = %self.http_addr,
            mqtt = ?self.mqtt,
            startup_ms = self.started.elapsed().as_millis() as u64,
            "sensorhub ready"
        );
        let failure = tokio::select! {
            () = signal => {
                tracing::info!("shutdown requested: storing what is in hand");
                None
            }
            Some(joined) = self.services.join_next() => Some(match joined {
                Ok(Ok(())) => anyhow::anyhow!("a service task ended unexpectedly"),
                Ok(Err(e)) => e,
                Err(e) => anyhow::Error::new(e).context("a service task panicked"),
            }),
            joined = &mut self.writer => Some(anyhow::anyhow!("the writer ended unexpectedly: {joined:?}")),
            joined = &mut self.http => Some(match joined {
                Ok(Ok(())) => anyhow::anyhow!("the HTTP server ended unexpectedly"),
                Ok(Err(e)) => anyhow::Error::new(e).context("the HTTP server failed"),
                Err(e) => anyhow::Error::new(e).context("the HTTP server panicked"),
            }),
        };
        let deadline = tokio::time::Instant::now() + self.grace;

        // 1. Stop intake.
        let end = self.journal.close();
        self.intake.cancel();
        while self.services.join_next().await.is_some() {}
        if let Some(broker) = self.broker.as_mut() {
            broker.stop_connections();
        }

        // 2. Drain into MongoDB, within the grace period.
        self.writer_stop.drain.cancel();
        if !self.writer.is_finished()
            && tokio::time::timeout_at(deadline, &mut self.writer)
                .await
                .is_err()
        {
            {
                tracing::warn!(
                    unstored_bytes = end.saturating_sub(self.journal.stored()),
                    "grace period over before everything was stored; the local log keeps the \
                     rest for the next start"
                );
                self.writer_stop.abort.cancel();
                let _ = (&mut self.writer).await;
            }
        }

        // 3. Flush: the writer dropped its queue sender, so the updater ends after the queue.
        let _ = tokio::time::timeout_at(deadline, &mut self.cache_updater).await;
        self.cache_updater.abort();
        self.summaries_stop.cancel();
        let _ = tokio::time::timeout_at(deadline, &mut self.summary_writer).await;
        self.summary_writer.abort();
        if let Err(e) = self.journal.checkpoint() {
            tracing::error!(error = %e, "cannot write the local log checkpoint");
        }
        self.journal.shutdown();

        // 4. Close.
        self.http_stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(2), &mut self.http).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), &mut self.readiness).await;
        self.readiness.abort();
        tracing::info!(
            stored_to = self.journal.stored(),
            log_end = end,
            "sensorhub stopped"
        );
        match failure {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// The components `/health/ready` reports, each checked by its owner.
fn readiness_checks(
    broker: Arc<BrokerStatus>,
    journal: Journal,
    max_pending: u64,
    store: Store,
    cache: Cache,
) -> Vec<Check> {
    vec![
        Check::new("broker", move || {
            let broker = Arc::clone(&broker);
            async move { broker.check() }
        }),
        Check::new("journal", move || {
            let journal = journal.clone();
            async move {
                let probe = journal.clone();
                // File I/O: off the async threads. The log guards against probes piling up
                // on a disk that hangs.
                tokio::task::spawn_blocking(move || probe.check_writable())
                    .await
                    .map_err(|e| format!("the probe panicked: {e}"))??;
                let pending = journal.pending_bytes();
                if pending >= max_pending {
                    return Err(format!(
                        "{pending} bytes wait to be stored, the threshold is {max_pending}"
                    ));
                }
                Ok(format!("{pending} bytes wait to be stored"))
            }
        }),
        Check::new("mongodb", move || {
            let store = store.clone();
            async move {
                store.ping().await.map_err(|e| {
                    tracing::debug!(error = crate::error_chain(&e), "readiness: MongoDB");
                    e.to_string()
                })?;
                Ok("ping answered".to_owned())
            }
        }),
        Check::new("redis", move || {
            let cache = cache.clone();
            async move {
                cache.ping().await.map_err(|e| {
                    tracing::debug!(error = crate::error_chain(&e), "readiness: Redis");
                    e.to_string()
                })?;
                Ok("PING answered".to_owned())
            }
        }),
    ]
}

/// Raises the soft limit of open files to the hard limit, and logs both: every device
/// connection is a file descriptor, and the usual soft limit (1,024) would refuse devices
/// long before `max_connections` (10,010 in `rumqttd.toml`).
fn raise_open_file_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current.is_some() && limit.current == limit.maximum {
        tracing::info!(soft = ?limit.current, "open file limit");
        return;
    }
    let raised = rustix::process::Rlimit {
        current: limit.maximum,
        maximum: limit.maximum,
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => tracing::info!(
            soft = ?limit.maximum,
            was = ?limit.current,
            "open file limit raised to the hard limit"
        ),
        Err(e) => tracing::warn!(
            error = %e,
            soft = ?limit.current,
            hard = ?limit.maximum,
            "cannot raise the open file limit; each MQTT connection needs a descriptor"
        ),
    }
}

/// A user name and password.
type Login = (String, String);

/// The built-in simulator's MQTT user, granted the sensor ids it writes.
const SIMULATOR_USER: &str = "sensorhub-internal-simulator";

/// Who may connect to MQTT, and the credentials of the built-in simulator when it needs some.
///
/// Without a credentials file and without `--mqtt-allow-anonymous`, MQTT is for this machine
/// only: listeners from the broker configuration move to loopback, and an explicit
/// non-loopback address is an error.
fn gatekeeper(
    settings: &Settings,
    broker_config: &mut rumqttd::Config,
) -> anyhow::Result<(Arc<Gatekeeper>, Option<Login>)> {
    let Some(path) = &settings.mqtt_auth else {
        if !settings.mqtt_allow_anonymous {
            let explicit = [
                settings.mqtt_listen,
                settings.mqtt5_listen,
                settings.mqtts_listen,
            ];
            if let Some(addr) = explicit
                .into_iter()
                .flatten()
                .find(|a| !a.ip().is_loopback())
            {
                anyhow::bail!(
                    "MQTT on {addr} would accept anyone: give devices credentials with \
                     --mqtt-auth FILE (see `sensorhub passwd`), or pass --mqtt-allow-anonymous \
                     to accept clients without them, or listen on 127.0.0.1"
                );
            }
            for (name, addr) in broker::confine_to_loopback(broker_config) {
                tracing::warn!(
                    listener = %name,
                    configured = %addr,
                    "no --mqtt-auth: MQTT accepts connections from this machine only; \
                     give devices credentials (--mqtt-auth) or pass --mqtt-allow-anonymous"
                );
            }
        }
        return Ok((Arc::new(Gatekeeper::open()), None));
    };
    let mut internal = Vec::new();
    let mut simulator = None;
    if settings.simulate {
        let password = format!("{:032x}", rand::random::<u128>());
        internal.push(Device {
            user: SIMULATOR_USER.to_owned(),
            password_hash: Some(hash_password(&password)?),
            publish: ["temp-*", "hum-*"]
                .iter()
                .map(|p| SensorPattern::parse(p).map_err(anyhow::Error::msg))
                .collect::<anyhow::Result<_>>()?,
            subscribe: Vec::new(),
        });
        simulator = Some((SIMULATOR_USER.to_owned(), password));
    }
    let gatekeeper = Gatekeeper::from_file(path, settings.mqtt_allow_anonymous, internal)
        .context("cannot load the MQTT credentials (--mqtt-auth)")?;
    Ok((Arc::new(gatekeeper), simulator))
}

/// On SIGHUP, reads the credentials, the certificates and the API keys again. A file that does
/// not load leaves the old ones in force.
async fn reload_on_sighup(
    gatekeeper: Arc<Gatekeeper>,
    certificates: Option<Arc<Certificates>>,
    api_keys: Option<Arc<ApiKeys>>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hangup = signal(SignalKind::hangup()).context("cannot watch SIGHUP")?;
        loop {
            tokio::select! {
                received = hangup.recv() => if received.is_none() { return Ok(()) },
                () = stop.cancelled() => return Ok(()),
            }
            let (gatekeeper, certificates) = (Arc::clone(&gatekeeper), certificates.clone());
            let keys = api_keys.clone();
            let reloaded = tokio::task::spawn_blocking(move || {
                let credentials = gatekeeper.enforced().then(|| gatekeeper.reload());
                let tls = certificates.map(|c| c.reload());
                let keys = keys.map(|k| k.reload());
                (credentials, tls, keys)
            })
            .await
            .context("the reload panicked")?;
            match reloaded.0 {
                Some(Ok(count)) => tracing::info!(credentials = count, "MQTT credentials reloaded"),
                Some(Err(e)) => tracing::error!(
                    error = crate::error_chain(&e),
                    "cannot reload the MQTT credentials; the previous ones stay in force"
                ),
                None => {}
            }
            match reloaded.1 {
                Some(Ok(())) => tracing::info!("TLS certificates reloaded"),
                Some(Err(e)) => tracing::error!(
                    error = %e,
                    "cannot reload the TLS certificates; the previous ones stay in force"
                ),
                None => {}
            }
            match reloaded.2 {
                Some(Ok(count)) => tracing::info!(keys = count, "HTTP API keys reloaded"),
                Some(Err(e)) => tracing::error!(
                    error = crate::error_chain(&e),
                    "cannot reload the HTTP API keys; the previous ones stay in force"
                ),
                None => {}
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (gatekeeper, certificates, api_keys);
        stop.cancelled().await;
        Ok(())
    }
}

/// Persists the log's stored mark every second, deleting segments wholly stored.
async fn keep_checkpointing(journal: Journal, stop: CancellationToken) -> anyhow::Result<()> {
    loop {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            () = stop.cancelled() => return Ok(()),
        }
        let journal = journal.clone();
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || journal.checkpoint()).await {
            tracing::error!(error = %e, "cannot write the local log checkpoint; retrying");
        }
    }
}

/// Reloads the sensor ids `/sensors` and `/latest` page through (`store::roster`) every
/// `every`, the first time at once; until that first load completes, pages are sorted scans.
async fn keep_sensor_list(
    store: Store,
    every: Duration,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let mut failures: u32 = 0;
    let mut loaded = false;
    loop {
        let began = Instant::now();
        let reloaded = tokio::select! {
            reloaded = store.reload_roster() => reloaded,
            () = stop.cancelled() => return Ok(()),
        };
        match reloaded {
            Ok(sensors) => {
                failures = 0;
                if !loaded {
                    loaded = true;
                    tracing::info!(
                        sensors,
                        millis = began.elapsed().as_millis() as u64,
                        "sensor list loaded"
                    );
                }
            }
            Err(e) => {
                if failures.is_multiple_of(10) {
                    tracing::warn!(
                        error = crate::error_chain(&e),
                        "cannot reload the sensor list; trying again"
                    );
                }
                failures += 1;
            }
        }
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = stop.cancelled() => return Ok(()),
        }
    }
}

/// Fails once the log has failed (a sync that did not reach the disk), which shuts the process
/// down in order: the log already refuses appends, so running on would only refuse readings.
async fn stop_when_the_log_fails(journal: Journal, stop: CancellationToken) -> anyhow::Result<()> {
    tokio::select! {
        reason = journal.failed() => Err(anyhow::anyhow!(
            "the local log failed ({reason}); stopping so that a restart recovers it"
        )),
        () = stop.cancelled() => Ok(()),
    }
}

/// Warns when the readings collection holds documents sensorhub did not write: another system
/// (the original Python service uses the same default names) writing into the same collection
/// would mix its history with ours, and its documents are invisible to the API.
async fn warn_of_other_writers(store: &Store, settings: &Settings) {
    match store.foreign_documents(1000).await {
        Ok(0) => {}
        Ok(found) => tracing::warn!(
            database = %settings.mongodb_database,
            collection = %settings.mongodb_collection,
            foreign_documents = found,
            mongodb = %redact(&settings.mongodb_uri),
            "the readings collection holds documents sensorhub did not write (another program \
             uses it?); point MONGODB_DATABASE or MONGODB_COLLECTION elsewhere unless this is \
             intended"
        ),
        Err(e) => tracing::warn!(
            error = crate::error_chain(&e),
            "cannot check the readings collection for other writers"
        ),
    }
}
