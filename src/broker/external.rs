//! External broker mode: instead of the embedded broker, sensorhub subscribes to an existing
//! MQTT broker or cluster (Mosquitto, EMQX, HiveMQ, VerneMQ) through a shared subscription
//! `$share/<group>/sensors/#` (and `spBv1.0/#` for Sparkplug B, whose rebirth requests go out on
//! the same connection), so several instances split one stream. `mqtts://` connects over
//! TLS (rustls on ring), checking the broker against a CA file or the system's roots, with an
//! optional client certificate.
//!
//! The guarantee is the embedded broker's, moved to the subscriber side: QoS 1 with manual
//! acknowledgements, and a message is acknowledged to the broker only once it is in the local
//! log (the same `CaptureSink` the capture codec uses). A crash before that leaves it unacked:
//! the broker redelivers it, to this instance's persistent session after a restart (clean
//! session off, a stable client id), and the reading's `_id` makes the second copy a duplicate.
//! What the broker queues while sensorhub is away is delivered when it comes back.
//!
//! The MQTT client lives only here. One task polls the connection; acknowledgements and
//! subscriptions go through another, since a request sent from the polling task can wait
//! forever for the very loop that would send it.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use std::path::{Path, PathBuf};

use rumqttc::{
    AsyncClient, Event, EventLoop, Incoming, MqttOptions, Publish, QoS, TlsConfiguration, Transport,
};
use tokio::sync::mpsc;
use tokio_rustls::rustls;
use tokio_util::sync::CancellationToken;

use super::BrokerStatus;
use super::capture::CaptureSink;
use crate::domain::{Captured, TOPIC_PREFIX, Templates, Timestamp};
use crate::metrics::Metrics;
use crate::sparkplug::{self, NAMESPACE, NodeKey};

/// Where and how to subscribe.
#[derive(Clone, Debug)]
pub struct ExternalConfig {
    /// `mqtt://` or `mqtts://`, `[user[:password]@]host[:port]`.
    pub url: String,
    /// The shared subscription's group: instances with the same group split the stream.
    pub share_group: String,
    /// Stable per instance, so the broker keeps this instance's session across restarts.
    pub client_id: String,
    /// Payloads over this are kept only in part (they become dead letters).
    pub max_payload_bytes: usize,
    /// The operator's topic templates: subscribed to beside `sensors/#`, and captured.
    pub templates: Templates,
    /// For `mqtts://`: the CA that signed the broker's certificate (else the system's roots).
    pub ca_file: Option<PathBuf>,
    /// For `mqtts://` with client certificates: this instance's certificate chain and key (PEM).
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

#[derive(Debug, thiserror::Error)]
pub enum ExternalError {
    #[error("--external-broker '{0}' is not mqtt[s]://[user[:password]@]host[:port]")]
    Url(String),
    #[error("the share group '{0}' must be one topic level without wildcards")]
    Group(String),
    #[error("cannot read {path}: {source}")]
    Pem {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("the external broker's TLS settings are not usable")]
    Tls(#[source] rustls::Error),
    #[error("mqtts:// without a CA file needs the system's root certificates, and none loaded")]
    NoRoots,
}

/// The broker's address and credentials, parsed from the URL.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Target {
    host: String,
    port: u16,
    credentials: Option<(String, String)>,
    tls: bool,
}

fn parse_url(url: &str) -> Result<Target, ExternalError> {
    let bad = || ExternalError::Url(redacted(url));
    let (tls, rest) = match url.split_once("://") {
        Some(("mqtt" | "tcp", rest)) => (false, rest),
        Some(("mqtts" | "ssl", rest)) => (true, rest),
        _ => return Err(bad()),
    };
    let rest = rest.trim_end_matches('/');
    let (credentials, hostport) = match rest.rsplit_once('@') {
        Some((userinfo, hostport)) => {
            let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
            if user.is_empty() {
                return Err(bad());
            }
            (
                Some((
                    decode(user).ok_or_else(bad)?,
                    decode(password).ok_or_else(bad)?,
                )),
                hostport,
            )
        }
        None => (None, rest),
    };
    let (host, port) = match hostport.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(']') || hostport.starts_with('[') => {
            (host, port.parse().map_err(|_| bad())?)
        }
        _ => (hostport, if tls { 8883 } else { 1883 }),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || host.contains(['/', '?', '#']) {
        return Err(bad());
    }
    Ok(Target {
        host: host.to_owned(),
        port,
        credentials,
        tls,
    })
}

/// The rustls configuration for `mqtts://`: the broker's certificate checked against the CA
/// file (or the system's roots), and this instance's certificate when one is configured.
fn tls_config(config: &ExternalConfig) -> Result<rustls::ClientConfig, ExternalError> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    fn pem(path: &Path) -> impl Fn(rustls::pki_types::pem::Error) -> ExternalError + '_ {
        move |source| ExternalError::Pem {
            path: path.to_path_buf(),
            source,
        }
    }
    let mut roots = rustls::RootCertStore::empty();
    match &config.ca_file {
        Some(path) => {
            for cert in CertificateDer::pem_file_iter(path).map_err(pem(path))? {
                roots
                    .add(cert.map_err(pem(path))?)
                    .map_err(ExternalError::Tls)?;
            }
        }
        None => {
            let (added, _) =
                roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
            if added == 0 {
                return Err(ExternalError::NoRoots);
            }
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(ExternalError::Tls)?
    .with_root_certificates(roots);
    match &config.client_cert {
        None => Ok(builder.with_no_client_auth()),
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .map_err(pem(cert))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(pem(cert))?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(pem(key))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(ExternalError::Tls)
        }
    }
}

/// Percent-decoding of URL user info (`p%40ss` is `p@ss`).
fn decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The broker's host and port, for the simulator of `serve --simulate`.
pub fn target_addr(url: &str) -> Result<(String, u16), ExternalError> {
    parse_url(url).map(|t| (t.host, t.port))
}

/// Checks that the TLS files of `config` load, so a mistake ends the start, not the first
/// connection.
pub fn check_tls(config: &ExternalConfig) -> Result<(), ExternalError> {
    if parse_url(&config.url)?.tls {
        tls_config(config)?;
    }
    Ok(())
}

/// The URL without its password, for messages.
pub fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let user = url[scheme + 3..at].split(':').next().unwrap_or_default();
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

/// The filter this instance subscribes to: shared by `group`, or, with no group, a plain
/// subscription of this instance alone.
///
/// Why a plain one at all: Mosquitto 2.0 restores a persistent session's plain subscriptions
/// after its own restart, but not its shared ones, so what devices publish between a Mosquitto
/// restart and the instances' resubscription reaches nobody. A single instance on a plain
/// subscription has no such gap.
pub fn shared_filter(group: &str) -> Result<String, ExternalError> {
    shared(group, &format!("{TOPIC_PREFIX}#"))
}

/// Every filter this instance subscribes to: `sensors/#`, each template's and the Sparkplug
/// namespace's, shared by `group` (or plain with no group). A Sparkplug node's session lives in
/// one instance, so Sparkplug edge nodes need a single instance (no share group) or a broker
/// whose shared subscriptions stick to the publisher.
pub fn filters(group: &str, templates: &Templates) -> Result<Vec<String>, ExternalError> {
    std::iter::once(format!("{TOPIC_PREFIX}#"))
        .chain(templates.iter().map(|t| t.filter()))
        .chain(std::iter::once(format!("{NAMESPACE}#")))
        .map(|filter| shared(group, &filter))
        .collect()
}

fn shared(group: &str, filter: &str) -> Result<String, ExternalError> {
    if group.is_empty() {
        return Ok(filter.to_owned());
    }
    if group.contains(['/', '+', '#']) {
        return Err(ExternalError::Group(group.to_owned()));
    }
    Ok(format!("$share/{group}/{filter}"))
}

/// What the polling task asks the request task to send.
#[derive(Debug)]
enum Request {
    Ack(Publish),
    Subscribe(String),
    /// A Sparkplug rebirth request to this node.
    Rebirth(NodeKey),
    /// Ends the connection (the loop reconnects), so the broker sends again what is unacked.
    Reconnect,
}

/// Subscribes and captures until `stop`; reconnects with backoff for as long as it runs.
pub async fn run(
    config: ExternalConfig,
    sink: CaptureSink,
    metrics: Arc<Metrics>,
    status: Arc<BrokerStatus>,
    mut rebirths: mpsc::Receiver<NodeKey>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let target = parse_url(&config.url)?;
    let mut options = MqttOptions::new(&config.client_id, &target.host, target.port);
    options
        .set_clean_session(false)
        .set_manual_acks(true)
        .set_keep_alive(Duration::from_secs(30))
        // Room for a payload at the largest limit sensorhub admits, and its topic.
        .set_max_packet_size(2 << 20, 64 << 10);
    if let Some((user, password)) = &target.credentials {
        options.set_credentials(user, password);
    }
    if target.tls {
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::new(tls_config(&config)?),
        )));
    }
    let (client, eventloop) = AsyncClient::new(options, 1024);
    // Unbounded, yet bounded by the broker: it sends no more than its in-flight window of
    // unacknowledged messages, and each is acknowledged through here.
    let (requests, pending) = mpsc::unbounded_channel();
    let sender = tokio::spawn(send_requests(client.clone(), pending));
    let forward = {
        let requests = requests.clone();
        tokio::spawn(async move {
            while let Some(node) = rebirths.recv().await {
                if requests.send(Request::Rebirth(node)).is_err() {
                    return;
                }
            }
        })
    };
    let result = poll(
        eventloop, &config, &sink, &metrics, &status, &requests, &stop,
    )
    .await;
    forward.abort();
    let _ = forward.await;
    status.set_connected(false);
    drop(requests);
    let _ = client.try_disconnect();
    let _ = sender.await;
    result
}

async fn send_requests(client: AsyncClient, mut pending: mpsc::UnboundedReceiver<Request>) {
    while let Some(request) = pending.recv().await {
        let sent = match &request {
            Request::Ack(publish) => client.ack(publish).await,
            Request::Subscribe(filter) => client.subscribe(filter, QoS::AtLeastOnce).await,
            Request::Rebirth(node) => {
                let at = u64::try_from(Timestamp::now().as_millis()).unwrap_or(0);
                client
                    .publish(
                        node.ncmd_topic(),
                        QoS::AtLeastOnce,
                        false,
                        sparkplug::rebirth_request(at),
                    )
                    .await
            }
            Request::Reconnect => client.disconnect().await,
        };
        if let Err(e) = sent {
            // The event loop is gone: the broker redelivers what was not acknowledged.
            tracing::warn!(error = %e, ?request, "cannot hand a request to the MQTT client");
            return;
        }
    }
}

async fn poll(
    mut eventloop: EventLoop,
    config: &ExternalConfig,
    sink: &CaptureSink,
    metrics: &Metrics,
    status: &BrokerStatus,
    requests: &mpsc::UnboundedSender<Request>,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let filters = filters(&config.share_group, &config.templates)?;
    let broker = redacted(&config.url);
    // Short at first: after a broker restart, every moment without our subscription is a
    // moment in which a broker that does not restore shared subscriptions drops readings.
    let mut backoff = Duration::from_millis(20);
    let mut connected = false;
    loop {
        let event = tokio::select! {
            event = eventloop.poll() => event,
            () = stop.cancelled() => return Ok(()),
        };
        match event {
            Ok(Event::Incoming(Incoming::ConnAck(ack))) => {
                backoff = Duration::from_millis(20);
                connected = true;
                status.set_connected(true);
                tracing::info!(
                    %broker,
                    client_id = %config.client_id,
                    session_present = ack.session_present,
                    filters = %filters.join(" "),
                    "connected to the external MQTT broker"
                );
                // A resumed session keeps its subscriptions; subscribing again is harmless and
                // covers a broker that lost its sessions.
                for filter in &filters {
                    requests.send(Request::Subscribe(filter.clone()))?;
                }
            }
            Ok(Event::Incoming(Incoming::SubAck(ack))) => {
                if ack
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                {
                    anyhow::bail!(
                        "the external broker {broker} refused a subscription of {}: does it \
                         support shared subscriptions, and may client '{}' read those topics?",
                        filters.join(" "),
                        config.client_id
                    );
                }
            }
            Ok(Event::Incoming(Incoming::Publish(publish))) => {
                if capture(&publish, config, sink, metrics) {
                    requests.send(Request::Ack(publish))?;
                } else {
                    // Not acknowledged: the broker keeps it for this session. Reconnecting
                    // later makes it send it again, by which time the log may have room.
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    requests.send(Request::Reconnect)?;
                }
            }
            Ok(_) => {}
            Err(e) => {
                if connected {
                    tracing::warn!(%broker, error = %e, "lost the external MQTT broker; reconnecting");
                } else {
                    tracing::debug!(%broker, error = %e, "external MQTT broker unreachable");
                }
                connected = false;
                status.set_connected(false);
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = stop.cancelled() => return Ok(()),
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Appends one delivered message to the local log; false when the log refused it.
fn capture(
    publish: &Publish,
    config: &ExternalConfig,
    sink: &CaptureSink,
    metrics: &Metrics,
) -> bool {
    let topic = publish.topic.as_bytes();
    if !super::captures(topic, &config.templates) {
        // A broker may deliver what we did not ask for (an overlapping subscription of this
        // client id): acknowledged, as a subscriber that ignores it would.
        return true;
    }
    let message = Captured::new(
        Timestamp::now(),
        bytes::Bytes::copy_from_slice(publish.topic.as_bytes()),
        publish.payload.clone(),
        config.max_payload_bytes,
    );
    // The log's append is one write(2): brief, but blocking.
    match tokio::task::block_in_place(|| sink(std::slice::from_ref(&message))) {
        Ok(()) => {
            metrics.captured.fetch_add(1, Ordering::Relaxed);
            true
        }
        Err(refused) => {
            metrics.refused.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                reason = crate::error_chain(&refused),
                "REFUSING a reading from the external broker: the local log did not take it; \
                 it stays unacknowledged there and comes again"
            );
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_give_host_port_and_credentials() {
        let t = parse_url("mqtt://broker.plant:1885").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.credentials),
            ("broker.plant", 1885, None)
        );
        let t = parse_url("mqtt://hub:p%40ss@10.0.0.5").unwrap();
        assert_eq!(t.port, 1883);
        assert_eq!(t.credentials, Some(("hub".into(), "p@ss".into())));
        let t = parse_url("tcp://[::1]:1884/").unwrap();
        assert_eq!((t.host.as_str(), t.port, t.tls), ("::1", 1884, false));
        let t = parse_url("mqtts://broker").unwrap();
        assert_eq!((t.port, t.tls), (8883, true));
        for bad in [
            "broker:1883",
            "http://x",
            "mqtt://",
            "mqtt://h:port",
            "mqtt://:pw@h",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
        assert_eq!(redacted("mqtt://u:secret@h:1"), "mqtt://u:***@h:1");
    }

    #[test]
    fn the_shared_filter_is_one_group_level() {
        assert_eq!(
            shared_filter("sensorhub").unwrap(),
            "$share/sensorhub/sensors/#"
        );
        assert!(shared_filter("a/b").is_err());
        assert_eq!(shared_filter("").unwrap(), "sensors/#");
        assert!(shared_filter("#").is_err());
    }

    #[test]
    fn templates_and_sparkplug_are_subscribed_beside_sensors() {
        let templates = Templates::parse(&["plant/+site/+sensor_id/+kind"]).unwrap();
        assert_eq!(
            filters("g", &templates).unwrap(),
            [
                "$share/g/sensors/#",
                "$share/g/plant/+/+/+",
                "$share/g/spBv1.0/#"
            ]
        );
        assert_eq!(
            filters("", &templates).unwrap(),
            ["sensors/#", "plant/+/+/+", "spBv1.0/#"]
        );
        assert_eq!(
            filters("", &Templates::default()).unwrap(),
            ["sensors/#", "spBv1.0/#"]
        );
    }
}
