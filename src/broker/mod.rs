//! The embedded MQTT broker: rumqttd's router and listeners, assembled by hand so that each device
//! connection runs through sensorhub's capture codec.
//!
//! `rumqttd::Broker::start` would build the listeners with rumqttd's plain codecs and only log a
//! listener that fails to bind. Here the router is spawned directly, every listener port is
//! checked before use, and each listener runs as a task whose failure reaches the caller.
//! rumqttd has no stop API: the router thread ends with the process, listeners end when their
//! tasks are aborted. This module knows nothing of MongoDB, Redis or HTTP.

pub mod capture;
mod conformance;
pub mod external;
mod front;
mod sparkplug;
mod tap;

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Format, Toml};
use rumqttd::local::{LinkBuilder, LinkRx, LinkTx};
use rumqttd::{LinkType, Router, Server, ServerSettings};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use capture::{
    Admission, Capture, CaptureSink, HandoffKey, RESERVED_CLIENT_PREFIX, Refused, Version,
};

use crate::auth::Gatekeeper;
use crate::domain::{TOPIC_PREFIX, Templates};
use crate::metrics::Metrics;
use crate::tls::Certificates;

/// Whether a message on `topic` goes into the local log, whichever way it arrived (embedded
/// broker or external one): readings under `sensors`, the operator's templated topics, and
/// Sparkplug B messages.
pub(crate) fn captures(topic: &[u8], templates: &Templates) -> bool {
    crate::domain::is_captured(topic, templates) || crate::sparkplug::is_sparkplug_topic(topic)
}

/// The broker configuration shipped with sensorhub, used when no `rumqttd.toml` is found.
pub const DEFAULT_CONFIG: &str = include_str!("../../rumqttd.toml");

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot read the broker configuration {path}: {message}")]
    Config { path: String, message: String },
    #[error(
        "cannot listen for MQTT on {addr} ({name}): {cause}. Another broker (mosquitto?) or a \
         second sensorhub probably holds the port: stop it, or choose another address with \
         --mqtt-listen / --mqtt5-listen"
    )]
    Bind {
        name: String,
        addr: SocketAddr,
        /// In the message, and deliberately not a `#[source]`: the cause chain would repeat it.
        cause: std::io::Error,
    },
    #[error("the broker's internal subscriber could not attach: {0}")]
    Link(String),
    #[error("cannot start the threads of the MQTT connections")]
    Runtime(#[source] std::io::Error),
    #[error("the MQTT listener {name} on {addr} did not come up: {message}")]
    Listener {
        name: String,
        addr: SocketAddr,
        message: String,
    },
}

/// Who may connect, and the MQTT TLS listener.
#[derive(Clone, Debug)]
pub struct Security {
    pub gatekeeper: Arc<Gatekeeper>,
    /// The TLS listener's address and certificates.
    pub tls: Option<(SocketAddr, Arc<Certificates>)>,
    /// The operator's topic templates: captured beside `sensors/#`, their sensor id checked
    /// against the credential's grant.
    pub templates: Arc<Templates>,
}

/// Where the two listeners go, overriding the configuration file.
#[derive(Clone, Debug, Default)]
pub struct ListenOverrides {
    pub mqtt: Option<SocketAddr>,
    pub mqtt5: Option<SocketAddr>,
}

/// Loads rumqttd's configuration from `path`, or the shipped default when `path` is absent and
/// `required` is false. Keys are read with serde as written (no lowercasing of user names).
pub fn load_config(
    path: &Path,
    required: bool,
    overrides: &ListenOverrides,
) -> Result<rumqttd::Config, BrokerError> {
    let figment = if path.exists() {
        Figment::from(Toml::file(path))
    } else if required {
        return Err(BrokerError::Config {
            path: path.display().to_string(),
            message: "no such file".into(),
        });
    } else {
        Figment::from(Toml::string(DEFAULT_CONFIG))
    };
    let mut config: rumqttd::Config = figment.extract().map_err(|e| BrokerError::Config {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    override_listen(&mut config.v4, overrides.mqtt);
    override_listen(&mut config.v5, overrides.mqtt5);
    // The capture codec sees every message before the router; the router must still keep a
    // log for `sensors/#` from the start, so external subscribers and our tap can read it.
    let filters = config
        .router
        .initialized_filters
        .get_or_insert_with(Vec::new);
    let ours = format!("{TOPIC_PREFIX}#");
    if !filters.contains(&ours) {
        filters.push(ours);
    }
    Ok(config)
}

/// Moves every listener of `config` that is not on a loopback address to loopback, same port;
/// returns the listeners moved, as configured.
pub fn confine_to_loopback(config: &mut rumqttd::Config) -> Vec<(String, SocketAddr)> {
    let mut moved = Vec::new();
    for servers in [config.v4.as_mut(), config.v5.as_mut()]
        .into_iter()
        .flatten()
    {
        for settings in servers.values_mut() {
            if !settings.listen.ip().is_loopback() {
                moved.push((settings.name.clone(), settings.listen));
                settings.listen =
                    SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), settings.listen.port());
            }
        }
    }
    moved
}

fn override_listen(
    servers: &mut Option<HashMap<String, ServerSettings>>,
    addr: Option<SocketAddr>,
) {
    let (Some(addr), Some(servers)) = (addr, servers.as_mut()) else {
        return;
    };
    // The first listener by key is "the" listener of that protocol.
    if let Some(server) = servers
        .keys()
        .min()
        .cloned()
        .and_then(|k| servers.get_mut(&k))
    {
        server.listen = addr;
    }
}

/// Whether the broker side takes readings, for readiness: every listener of the embedded
/// broker still serves (its task runs; it was accepting when the broker started), or the
/// subscription to the external broker is connected.
#[derive(Debug, Default)]
pub struct BrokerStatus {
    listeners: AtomicUsize,
    serving: AtomicUsize,
    external: AtomicBool,
    connected: AtomicBool,
}

impl BrokerStatus {
    /// The status of external broker mode: down until the first CONNACK.
    pub fn external() -> Self {
        Self {
            external: AtomicBool::new(true),
            ..Self::default()
        }
    }

    pub(crate) fn set_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::Relaxed);
    }

    /// A listener task starts; the guard marks it stopped when the task ends.
    fn listener_started(self: &Arc<Self>) -> ServingGuard {
        self.listeners.fetch_add(1, Ordering::Relaxed);
        self.serving.fetch_add(1, Ordering::Relaxed);
        ServingGuard(Arc::clone(self))
    }

    /// `Ok` with what serves, or `Err` with what does not.
    pub fn check(&self) -> Result<String, String> {
        if self.external.load(Ordering::Relaxed) {
            return if self.connected.load(Ordering::Relaxed) {
                Ok("subscribed to the external broker".into())
            } else {
                Err("not connected to the external broker".into())
            };
        }
        let (all, serving) = (
            self.listeners.load(Ordering::Relaxed),
            self.serving.load(Ordering::Relaxed),
        );
        if all > 0 && serving == all {
            Ok(format!("{all} listeners serving"))
        } else {
            Err(format!("{serving} of {all} MQTT listeners serving"))
        }
    }
}

/// Held by a listener's task; dropped when it ends, however it ends.
#[derive(Debug)]
struct ServingGuard(Arc<BrokerStatus>);

impl Drop for ServingGuard {
    fn drop(&mut self) {
        self.0.serving.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A running embedded broker.
#[derive(Debug)]
pub struct EmbeddedBroker {
    listeners: Vec<(String, SocketAddr)>,
    status: Arc<BrokerStatus>,
    /// Where the device connections run (see `start`).
    runtime: Option<tokio::runtime::Runtime>,
}

impl EmbeddedBroker {
    /// Starts the router, attaches the tap, then opens the listeners. Returns once every
    /// listener accepts connections. Listener and tap tasks join `tasks`.
    ///
    /// The listeners, and the connection tasks rumqttd spawns from them, run on a runtime of
    /// their own: the capture codec appends to the local log inside a connection task, which
    /// blocks its thread on the disk (and, with `--journal-fsync always`, on `fdatasync`). On
    /// the process's main runtime a slow disk would starve the HTTP API, the writer and the
    /// Redis updater; here it only slows the devices that are waiting for that disk anyway.
    #[expect(
        clippy::too_many_arguments,
        reason = "each is a separate input of the broker, wired once by app"
    )]
    pub async fn start(
        config: rumqttd::Config,
        sink: CaptureSink,
        max_payload_bytes: usize,
        metrics: Arc<Metrics>,
        security: Security,
        rebirths: tokio::sync::mpsc::Receiver<crate::sparkplug::NodeKey>,
        tasks: &mut JoinSet<anyhow::Result<()>>,
        stop: CancellationToken,
    ) -> Result<Self, BrokerError> {
        let admission = |version, handoff| {
            Arc::new(Admission {
                gatekeeper: Arc::clone(&security.gatekeeper),
                templates: Arc::clone(&security.templates),
                version,
                handoff,
            })
        };
        let plain_v4 = admission(Version::V4, None);
        let plain_v5 = admission(Version::V5, None);
        let mut servers: Vec<(Arc<Admission>, ServerSettings)> = config
            .v4
            .iter()
            .flat_map(|m| m.values().cloned().map(|s| (Arc::clone(&plain_v4), s)))
            .chain(
                config
                    .v5
                    .iter()
                    .flat_map(|m| m.values().cloned().map(|s| (Arc::clone(&plain_v5), s))),
            )
            .collect();
        check_listeners(&config)?;
        let mut front = None;
        if let Some((addr, certificates)) = &security.tls {
            let listener = TcpListener::bind(addr).map_err(|source| BrokerError::Bind {
                name: "mqtts".into(),
                addr: *addr,
                cause: source,
            })?;
            let key = HandoffKey(rand::random());
            let template =
                servers
                    .first()
                    .map(|(_, s)| s.clone())
                    .ok_or_else(|| BrokerError::Config {
                        path: "rumqttd.toml".into(),
                        message: "the TLS listener needs a [v4] or [v5] listener to copy".into(),
                    })?;
            let mut internal = |name: &str, version| -> Result<SocketAddr, BrokerError> {
                let addr = free_loopback_port().map_err(|source| BrokerError::Bind {
                    name: name.into(),
                    addr: SocketAddr::from(([127, 0, 0, 1], 0)),
                    cause: source,
                })?;
                let mut settings = template.clone();
                settings.name = name.into();
                settings.listen = addr;
                settings.tls = None;
                servers.push((admission(version, Some(key.clone())), settings));
                Ok(addr)
            };
            let v4 = internal("mqtts-handoff-v311", Version::V4)?;
            let v5 = internal("mqtts-handoff-v5", Version::V5)?;
            front = Some((
                listener,
                Arc::clone(certificates),
                front::Handoff { key, v4, v5 },
            ));
        }

        let router_tx = Router::new(config.id, config.router.clone()).spawn();
        let router = router_tx.clone();
        let (link_tx, link_rx) = local_link("tap", &[format!("{TOPIC_PREFIX}#")], move |id| {
            LinkBuilder::new(id, router)
                .build()
                .map_err(|e| e.to_string())
        })
        .await?;
        let tap_stop = stop.clone();
        let tap_metrics = Arc::clone(&metrics);
        tasks.spawn_blocking(move || {
            // The link's sender must live as long as the subscription.
            let _link_tx = link_tx;
            tap::run(link_rx, &tap_metrics, &tap_stop);
            Ok(())
        });
        let router = router_tx.clone();
        let (link_tx, link_rx) = local_link("sparkplug", &sparkplug::birth_filters(), move |id| {
            LinkBuilder::new(id, router)
                .build()
                .map_err(|e| e.to_string())
        })
        .await?;
        let sparkplug_stop = stop.clone();
        tasks.spawn_blocking(move || {
            sparkplug::run(link_tx, link_rx, rebirths, &sparkplug_stop);
            Ok(())
        });

        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(broker_threads())
            .thread_name("mqtt-connections")
            .enable_all()
            .build()
            .map_err(BrokerError::Runtime)?;
        let status = Arc::new(BrokerStatus::default());
        let mut listeners = Vec::new();
        for (admission, settings) in servers {
            let name = settings.name.clone();
            let addr = settings.listen;
            let stop = stop.clone();
            let router_tx = router_tx.clone();
            let metrics = Arc::clone(&metrics);
            let sink = Arc::clone(&sink);
            let listener_name = name.clone();
            let serve = runtime.spawn(async move {
                if admission.version == Version::V5 {
                    let codec = Capture::new(
                        conformance::v5(),
                        sink,
                        metrics,
                        max_payload_bytes,
                        admission,
                    );
                    Server::new(settings, router_tx, codec)
                        .start(LinkType::Remote)
                        .await
                } else {
                    let codec = Capture::new(
                        conformance::v311(),
                        sink,
                        metrics,
                        max_payload_bytes,
                        admission,
                    );
                    Server::new(settings, router_tx, codec)
                        .start(LinkType::Remote)
                        .await
                }
            });
            let serving = status.listener_started();
            tasks.spawn(async move {
                let _serving = serving;
                let abort = serve.abort_handle();
                let result = tokio::select! {
                    joined = serve => match joined {
                        Ok(result) => result,
                        Err(e) => anyhow::bail!("MQTT listener {listener_name} on {addr} panicked: {e}"),
                    },
                    () = stop.cancelled() => {
                        abort.abort();
                        return Ok(());
                    }
                };
                match result {
                    Ok(()) => anyhow::bail!("MQTT listener {listener_name} on {addr} stopped"),
                    Err(e) => anyhow::bail!("MQTT listener {listener_name} on {addr} failed: {e}"),
                }
            });
            listeners.push((name, addr));
        }
        for (name, addr) in &listeners {
            wait_accepting(name, *addr).await?;
        }
        if let Some((listener, certificates, handoff)) = front {
            let addr = listener.local_addr().map_err(|source| BrokerError::Bind {
                name: "mqtts".into(),
                addr: SocketAddr::from(([0, 0, 0, 0], 0)),
                cause: source,
            })?;
            // Internal: reachable through the TLS front end only.
            listeners.retain(|(_, a)| *a != handoff.v4 && *a != handoff.v5);
            let stop = stop.clone();
            let serve = {
                let _entered = runtime.enter();
                listener
                    .set_nonblocking(true)
                    .and_then(|()| tokio::net::TcpListener::from_std(listener))
                    .map_err(|source| BrokerError::Bind {
                        name: "mqtts".into(),
                        addr,
                        cause: source,
                    })?
            };
            let front_task = runtime.spawn(front::run(serve, certificates, handoff, stop.clone()));
            let serving = status.listener_started();
            tasks.spawn(async move {
                let _serving = serving;
                match front_task.await {
                    Ok(Ok(())) if stop.is_cancelled() => Ok(()),
                    Ok(Ok(())) => anyhow::bail!("the MQTT TLS listener on {addr} stopped"),
                    Ok(Err(e)) => Err(e.context(format!("the MQTT TLS listener on {addr} failed"))),
                    Err(e) => anyhow::bail!("the MQTT TLS listener on {addr} panicked: {e}"),
                }
            });
            listeners.push(("mqtts".into(), addr));
        }
        Ok(Self {
            listeners,
            status,
            runtime: Some(runtime),
        })
    }

    /// Whether every listener still serves.
    pub fn status(&self) -> Arc<BrokerStatus> {
        Arc::clone(&self.status)
    }

    /// The listeners' names and addresses.
    pub fn listeners(&self) -> &[(String, SocketAddr)] {
        &self.listeners
    }

    /// Ends the device connections without waiting for them (call after intake stopped).
    pub fn stop_connections(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which async code must not do.
        self.stop_connections();
    }
}

/// An in-process link to the router, subscribed to `filters`; `build` makes it with the id
/// given. An external client with the same id would kick the link off the router: the id is
/// unguessable.
async fn local_link<B>(
    role: &str,
    filters: &[String],
    build: B,
) -> Result<(LinkTx, LinkRx), BrokerError>
where
    B: FnOnce(&str) -> Result<(LinkTx, LinkRx, rumqttd::Notification), String> + Send + 'static,
{
    let link_id = format!(
        "{RESERVED_CLIENT_PREFIX}{role}-{:016x}",
        rand::random::<u64>()
    );
    let (mut link_tx, link_rx, _ack) = tokio::task::spawn_blocking(move || build(&link_id))
        .await
        .map_err(|e| BrokerError::Link(e.to_string()))?
        .map_err(BrokerError::Link)?;
    for filter in filters {
        link_tx
            .subscribe(filter.clone())
            .map_err(|e| BrokerError::Link(e.to_string()))?;
    }
    Ok((link_tx, link_rx))
}

/// Threads for device connections: one per core, at least two, so one connection waiting on
/// the disk does not hold up the rest.
fn broker_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().max(2))
}

/// A loopback address with a port free at the time of asking (rumqttd cannot report the port
/// it bound for port 0).
fn free_loopback_port() -> std::io::Result<SocketAddr> {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr())
}

/// rumqttd only logs a listener that cannot bind; find out first, with a message that helps.
pub fn check_listeners(config: &rumqttd::Config) -> Result<(), BrokerError> {
    let servers = config
        .v4
        .iter()
        .chain(config.v5.iter())
        .flat_map(|m| m.values());
    for settings in servers {
        TcpListener::bind(settings.listen)
            .map(drop)
            .map_err(|source| BrokerError::Bind {
                name: settings.name.clone(),
                addr: settings.listen,
                cause: source,
            })?;
    }
    Ok(())
}

async fn wait_accepting(name: &str, addr: SocketAddr) -> Result<(), BrokerError> {
    let target = if addr.ip().is_unspecified() {
        SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), addr.port())
    } else {
        addr
    };
    for _ in 0..200 {
        if tokio::task::spawn_blocking(move || {
            TcpStream::connect_timeout(&target, Duration::from_millis(100))
        })
        .await
        .is_ok_and(|r| r.is_ok())
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Err(BrokerError::Listener {
        name: name.to_owned(),
        addr,
        message: "not accepting connections after 2 s".into(),
    })
}
