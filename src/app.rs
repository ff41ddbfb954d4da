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

use crate::api::{self, ApiState};
use crate::broker::{self, CaptureSink, EmbeddedBroker, ListenOverrides};
use crate::cache::{Cache, CacheConfig, Health};
use crate::config::Settings;
use crate::domain::Captured;
use crate::ingest::{self, Writer, WriterStop};
use crate::journal::{Journal, JournalConfig};
use crate::metrics::{Gauges, Metrics};
use crate::simulator::{self, SimulatorConfig};
use crate::store::{Store, StoreConfig};

/// A running sensorhub.
#[derive(Debug)]
pub struct Application {
    http_addr: SocketAddr,
    mqtt: Vec<(String, SocketAddr)>,
    broker: EmbeddedBroker,
    journal: Journal,
    grace: Duration,
    /// Tasks that end when `intake` is cancelled: listeners, tap, simulator, repair, upkeep.
    services: JoinSet<anyhow::Result<()>>,
    intake: CancellationToken,
    writer: JoinHandle<()>,
    writer_stop: WriterStop,
    cache_updater: JoinHandle<()>,
    http: JoinHandle<std::io::Result<()>>,
    http_stop: CancellationToken,
    started: Instant,
}

impl Application {
    /// Starts everything; returns once MQTT and HTTP accept connections. Fails with a message
    /// that names the dependency (port, MongoDB, Redis, log directory) and what to do.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let started = Instant::now();
        let limits = settings.limits()?;
        let max_payload_bytes = limits.max_payload_bytes;
        let broker_config = broker::load_config(
            &settings.broker_config,
            settings.broker_config != Settings::default().broker_config,
            &ListenOverrides {
                mqtt: settings.mqtt_listen,
                mqtt5: settings.mqtt5_listen,
            },
        )?;
        // Ports first: the cheapest failure, and the one people hit most.
        let http_listener = TcpListener::bind(settings.http_listen).with_context(|| {
            format!(
                "cannot listen for HTTP on {}: another process holds the port; stop it or pass \
                 --http-listen",
                settings.http_listen
            )
        })?;
        let http_addr = http_listener.local_addr()?;
        broker::check_listeners(&broker_config)?;

        let store = Store::connect(StoreConfig {
            uri: settings.mongodb_uri.clone(),
            database: settings.mongodb_database.clone(),
            collection: settings.mongodb_collection.clone(),
            dead_letter_collection: settings.dead_letter_collection.clone(),
            dead_letter_ttl: Duration::from_secs(settings.dead_letter_ttl_days * 86_400),
            server_selection_timeout: Duration::from_secs(2),
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
            }
            .run(writer_stop.clone()),
        );
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

        let sink: CaptureSink = {
            let journal = journal.clone();
            Arc::new(move |batch: &[Captured]| {
                journal
                    .append(batch)
                    .map_err(|e| broker::Refused(Box::new(e)))
            })
        };
        let broker = EmbeddedBroker::start(
            broker_config,
            sink,
            max_payload_bytes,
            Arc::clone(&metrics),
            &mut services,
            intake.clone(),
        )
        .await?;

        let http_stop = CancellationToken::new();
        let gauges = Arc::new({
            let journal = journal.clone();
            move || Gauges {
                journal_pending_bytes: journal.pending_bytes(),
                journal_segments: journal.segment_count() as u64,
                ..Gauges::default()
            }
        });
        let state = ApiState::new(
            store,
            cache,
            health,
            metrics,
            gauges,
            Duration::from_millis(settings.read_cache_ms),
        )
        .with_live(live, Duration::from_secs(settings.sensor_stale_secs));
        let grace = Duration::from_secs(settings.shutdown_grace_secs);
        let http = tokio::spawn(api::serve(
            http_listener,
            state,
            http_stop.clone().cancelled_owned(),
            grace,
        ));

        if settings.simulate {
            let port = broker
                .listeners()
                .first()
                .map(|(_, addr)| addr.port())
                .context("--simulate needs an MQTT listener")?;
            let config = SimulatorConfig {
                host: "127.0.0.1".into(),
                port,
                sensors: settings.simulate_sensors,
                interval: Duration::from_millis(settings.simulate_interval_ms),
                client_id: format!("sensorhub-simulator-{:08x}", rand::random::<u32>()),
            };
            services.spawn(simulator::run(config, intake.clone()));
        }

        Ok(Self {
            http_addr,
            mqtt: broker.listeners().to_vec(),
            broker,
            journal,
            grace,
            services,
            intake,
            writer,
            writer_stop,
            cache_updater,
            http,
            http_stop,
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
        self.broker.stop_connections();

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
        if let Err(e) = self.journal.checkpoint() {
            tracing::error!(error = %e, "cannot write the local log checkpoint");
        }
        self.journal.shutdown();

        // 4. Close.
        self.http_stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(2), &mut self.http).await;
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

/// A connection string without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn passwords_stay_out_of_messages() {
        assert_eq!(
            redact("mongodb://u:secret@h:27017/db"),
            "mongodb://u:***@h:27017/db"
        );
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }
}
