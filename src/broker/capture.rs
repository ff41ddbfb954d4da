//! The device-side codec: rumqttd's own MQTT codecs, wrapped so sensorhub sees every packet of
//! every device connection before the router does.
//!
//! Three jobs, all impossible from behind rumqttd's router:
//! - accept CONNECTs with keep-alive 0 (MQTT's "no keep-alive"), which rumqttd refuses;
//! - admission and access control: check the CONNECT's credentials (or the identity the TLS
//!   front end vouched for) and answer with the CONNACK code of the connection's MQTT version;
//!   refuse PUBLISHes for sensor ids the credential may not write (dead-lettered as
//!   `forbidden`, PUBACK 0x87 on MQTT 5) and subscriptions it may not make (SUBACK failure);
//! - hand each PUBLISH on `sensors/#` and on Sparkplug B's `spBv1.0/...` (`sparkplug::
//!   is_sparkplug_topic`) to the local log before any packet, the PUBACK above all,
//!   is written back on that connection. A reading the broker acknowledged is therefore already
//!   in the log, and a process crash cannot lose it.
//!
//! Messages are staged per connection as they are decoded and written to the log as one batch
//! when the codec runs out of buffered bytes or is about to encode a reply. When the log refuses
//! a batch (full, or closing for shutdown) the codec fails the connection: nothing staged is
//! acknowledged, so the publisher keeps it and sends it again. The only part of a payload this
//! module reads is its `sensor_id`, for access control (a Sparkplug message's is its topic's
//! `<group>/<edge node>`); judging readings is `domain::decode`'s and `sparkplug`'s job, later.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{Bytes, BytesMut};
use rumqttd::protocol::{
    self, ConnectReturnCode, Packet, Protocol, PubAckReason, PubRecReason, SubscribeReasonCode,
};

use crate::auth::{Access, Gatekeeper, Refusal};
use crate::domain::{Captured, FORBIDDEN_TOPIC_PREFIX, Templates, Timestamp, claimed_sensor_ids};
use crate::metrics::Metrics;
use crate::sparkplug;

/// Where captured messages go: returns `Err` when they cannot be kept.
pub type CaptureSink = Arc<dyn Fn(&[Captured]) -> Result<(), Refused> + Send + Sync>;

/// Why the sink did not keep a batch: its own error, whole, for the one line that reports it.
/// (The broker does not know the sink's type: it must not import the journal.)
#[derive(Debug, thiserror::Error)]
#[error("the local log did not take the batch")]
pub struct Refused(#[source] pub Box<dyn std::error::Error + Send + Sync>);

/// The keep-alive given to clients that asked for none: about 18 hours, with rumqttd's 1.5
/// grace factor about 27, which is as close to "off" as its u16 seconds allow.
pub const KEEP_ALIVE_FOR_ZERO: u16 = u16::MAX;

/// Client ids of sensorhub's own router connections (the internal subscriber, refused logins).
/// An external client with such an id is refused: it could otherwise take over the session.
pub const RESERVED_CLIENT_PREFIX: &str = "sensorhub-internal-";

/// Where a refused PUBLISH is redirected. rumqttd matches no subscription to a topic that begins
/// with `$`, so the router acknowledges it (the codec then rewrites the acknowledgement) and
/// neither keeps nor forwards it.
pub const REFUSED_TOPIC: &str = "$sensorhub/refused";

/// The Topic Alias Maximum rumqttd's router announces in every MQTT 5 CONNACK (its
/// `TOPIC_ALIAS_MAX`); a PUBLISH with an alias of 0 or above it is a protocol error.
const TOPIC_ALIAS_MAX: u16 = 4096;

/// The MQTT version a listener speaks, for its reason codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    V4,
    V5,
}

/// What the codecs of one listener share: the credentials, the listener's MQTT version, and,
/// for the internal listeners behind the TLS front end, the key of its handoff preamble.
#[derive(Debug)]
pub struct Admission {
    pub gatekeeper: Arc<Gatekeeper>,
    /// Topics captured beside `sensors/#`; a templated topic's sensor id is its own level.
    pub templates: Arc<Templates>,
    pub version: Version,
    pub handoff: Option<HandoffKey>,
}

impl Admission {
    /// Everyone is anonymous: no credentials, no handoff.
    pub fn open(version: Version) -> Arc<Self> {
        Arc::new(Self {
            gatekeeper: Arc::new(Gatekeeper::open()),
            templates: Arc::default(),
            version,
            handoff: None,
        })
    }
}

/// The secret with which the TLS front end introduces a connection it hands to an internal
/// listener: `HANDOFF_MAGIC`, the key, then the client certificate's common name (u16 length,
/// big-endian, then UTF-8; length 0 when no certificate). Anything else on such a listener is
/// refused, so a local process cannot claim a certificate identity by connecting to it.
#[derive(Clone)]
pub struct HandoffKey(pub [u8; 32]);

impl fmt::Debug for HandoffKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HandoffKey(..)")
    }
}

pub const HANDOFF_MAGIC: &[u8; 8] = b"SHUBHOFF";

impl HandoffKey {
    /// The preamble the front end writes before the client's bytes.
    pub fn preamble(&self, common_name: Option<&str>) -> Vec<u8> {
        let name = common_name.unwrap_or_default().as_bytes();
        let len = u16::try_from(name.len()).unwrap_or(0);
        let mut out = Vec::with_capacity(42 + name.len());
        out.extend_from_slice(HANDOFF_MAGIC);
        out.extend_from_slice(&self.0);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&name[..usize::from(len)]);
        out
    }
}

/// What one connection has been granted and what its replies must say.
#[derive(Debug, Default)]
struct Session {
    /// The handoff preamble was read (or none is expected).
    introduced: bool,
    /// Set by an accepted CONNECT.
    access: Option<Access>,
    /// Set by a refused CONNECT: the code its CONNACK carries; the connection then ends.
    refused: Option<ConnectReturnCode>,
    /// What most connections never need, created on first use: an idle connection holds a
    /// pointer instead of its maps (the `idle` scenario of BENCHMARKS.md measures it).
    rare: Option<Box<Rare>>,
}

/// The parts of a connection's state that only some connections use.
#[derive(Debug, Default)]
struct Rare {
    /// The common name the TLS front end vouched for.
    certificate: Option<String>,
    /// Packet ids of refused QoS 1/2 PUBLISHes, whose PUBACK/PUBREC must say so (MQTT 5).
    refused_publishes: HashSet<u16>,
    /// SUBSCRIBE packet id -> positions of the filters refused (removed before the router).
    refused_filters: HashMap<u16, Vec<usize>>,
    /// MQTT 5 topic aliases of this connection. The codec resolves them itself and hands the
    /// router full topics, so a refused PUBLISH that sets an alias cannot bend it.
    aliases: HashMap<u16, Bytes>,
}

impl Session {
    fn rare(&mut self) -> &mut Rare {
        self.rare.get_or_insert_default()
    }

    /// Whether `pkid` was a refused PUBLISH (and forgets it).
    fn refused_publish(&mut self, pkid: u16) -> bool {
        self.rare
            .as_mut()
            .is_some_and(|rare| rare.refused_publishes.remove(&pkid))
    }
}

pub struct Capture<P> {
    inner: P,
    sink: CaptureSink,
    metrics: Arc<Metrics>,
    max_payload_bytes: usize,
    admission: Arc<Admission>,
    /// Decoded and not yet in the log. `Protocol::write` takes `&self`, hence the lock; a codec
    /// belongs to one connection task, so it is never contended.
    staged: Mutex<Vec<Captured>>,
    session: Mutex<Session>,
}

impl<P: fmt::Debug> fmt::Debug for Capture<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Capture")
            .field("inner", &self.inner)
            .field("staged", &self.staged().len())
            .field("version", &self.admission.version)
            .finish_non_exhaustive()
    }
}

impl<P: Clone> Clone for Capture<P> {
    /// rumqttd clones the server's codec for each new connection: each gets empty state.
    fn clone(&self) -> Self {
        Self::new(
            self.inner.clone(),
            Arc::clone(&self.sink),
            Arc::clone(&self.metrics),
            self.max_payload_bytes,
            Arc::clone(&self.admission),
        )
    }
}

impl<P> Capture<P> {
    pub fn new(
        inner: P,
        sink: CaptureSink,
        metrics: Arc<Metrics>,
        max_payload_bytes: usize,
        admission: Arc<Admission>,
    ) -> Self {
        let session = Session {
            introduced: admission.handoff.is_none(),
            ..Session::default()
        };
        Self {
            inner,
            sink,
            metrics,
            max_payload_bytes,
            admission,
            staged: Mutex::new(Vec::new()),
            session: Mutex::new(session),
        }
    }

    fn staged(&self) -> MutexGuard<'_, Vec<Captured>> {
        self.staged
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn session(&self) -> MutexGuard<'_, Session> {
        self.session
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Reads the TLS front end's preamble off the start of `stream`.
    fn introduce(&mut self, stream: &mut BytesMut) -> Result<(), protocol::Error> {
        let Some(key) = &self.admission.handoff else {
            return Ok(());
        };
        let head = HANDOFF_MAGIC.len() + key.0.len() + 2;
        if stream.len() < head {
            return Err(protocol::Error::InsufficientBytes(head - stream.len()));
        }
        let magic_ok = &stream[..HANDOFF_MAGIC.len()] == HANDOFF_MAGIC;
        let key_ok = stream[HANDOFF_MAGIC.len()..head - 2]
            .iter()
            .zip(key.0.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
        if !(magic_ok && key_ok) {
            tracing::warn!(
                "refused a connection to an internal MQTT listener without the handoff key"
            );
            return Err(protocol::Error::InvalidProtocol);
        }
        let len = usize::from(u16::from_be_bytes([stream[head - 2], stream[head - 1]]));
        if stream.len() < head + len {
            return Err(protocol::Error::InsufficientBytes(
                head + len - stream.len(),
            ));
        }
        let preamble = stream.split_to(head + len);
        let name =
            std::str::from_utf8(&preamble[head..]).map_err(|_| protocol::Error::InvalidProtocol)?;
        let mut session = self.session();
        if !name.is_empty() {
            session.rare().certificate = Some(name.to_owned());
        }
        session.introduced = true;
        Ok(())
    }

    /// Decides a CONNECT. A refused one is passed on defused (a throwaway client id, no will,
    /// no session) so the router's CONNACK can carry the refusal, and the connection ends at
    /// the next read.
    fn admit(&mut self, packet: Packet) -> Result<Packet, protocol::Error> {
        let Packet::Connect(mut connect, props, will, will_props, login) = packet else {
            return Ok(packet);
        };
        if self.session().access.is_some() || self.session().refused.is_some() {
            // A second CONNECT is a protocol violation.
            return Err(protocol::Error::InvalidProtocol);
        }
        if connect.keep_alive == 0 {
            connect.keep_alive = KEEP_ALIVE_FOR_ZERO;
            self.metrics.keep_alive_zero.fetch_add(1, Ordering::Relaxed);
        }
        let gatekeeper = &self.admission.gatekeeper;
        let certificate = self
            .session()
            .rare
            .as_ref()
            .and_then(|rare| rare.certificate.clone());
        let credentials = login
            .as_ref()
            .map(|l| (l.username.as_str(), l.password.as_str()));
        let verdict = if connect.client_id.starts_with(RESERVED_CLIENT_PREFIX) {
            Err(None)
        } else if let (true, Some(name)) = (gatekeeper.enforced(), &certificate) {
            gatekeeper.certificate(name).map_err(Some)
        } else {
            match gatekeeper.login_quick(credentials) {
                Some(verdict) => verdict,
                None => blocking(|| gatekeeper.login(credentials)),
            }
            .map_err(Some)
        };
        match verdict {
            Ok(access) => {
                self.session().access = Some(access);
                // Given back when the codec, which lives as long as the connection, is dropped.
                self.metrics.mqtt_clients.fetch_add(1, Ordering::Relaxed);
                Ok(Packet::Connect(connect, props, will, will_props, login))
            }
            Err(refusal) => {
                let code = connack_code(refusal, self.admission.version);
                self.metrics
                    .mqtt_logins_refused
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    client_id = %connect.client_id,
                    user = credentials.map(|(user, _)| user),
                    certificate = certificate.as_deref(),
                    reason = refusal.map_or("reserved client id", |r| match r {
                        Refusal::BadCredentials => "bad user name or password",
                        Refusal::NotAuthorized => "not authorized",
                        Refusal::Busy => "too many logins being verified",
                    }),
                    "refused an MQTT connection"
                );
                self.session().refused = Some(code);
                connect.client_id = format!(
                    "{RESERVED_CLIENT_PREFIX}refused-{:016x}",
                    rand::random::<u64>()
                );
                connect.clean_session = true;
                Ok(Packet::Connect(connect, props, None, None, None))
            }
        }
    }

    /// Judges and stages one PUBLISH; a refused one is redirected to `REFUSED_TOPIC`.
    fn publish(
        &mut self,
        access: &Access,
        mut publish: protocol::Publish,
        mut properties: Option<protocol::PublishProperties>,
        packet_id: Option<u16>,
    ) -> Packet {
        if let Some(props) = properties.as_mut()
            && let Some(alias) = props.topic_alias
        {
            let mut session = self.session();
            let invalid = alias == 0 || alias > TOPIC_ALIAS_MAX;
            let known = session.rare.as_ref().and_then(|r| r.aliases.get(&alias));
            if invalid || (publish.topic.is_empty() && known.is_none()) {
                // Passed on as sent, nothing captured: the router closes the connection with
                // DISCONNECT Topic Alias invalid (0x94) or, for an alias never set, Protocol
                // Error (0x82), before it appends or acknowledges anything.
                return Packet::Publish(publish, properties);
            }
            if publish.topic.is_empty() {
                publish.topic = known.cloned().unwrap_or_default();
            } else {
                session.rare().aliases.insert(alias, publish.topic.clone());
            }
            props.topic_alias = None;
        }
        let topic = publish.topic.clone();
        let sparkplug_node = sparkplug::is_sparkplug_topic(&topic)
            .then(|| sparkplug_node_of(&topic))
            .flatten();
        let reading =
            sparkplug_node.is_some() || super::captures(&topic, &self.admission.templates);
        // An empty retained publish deletes the retained message: a broker command, not a
        // reading, and no credential's sensor ids say whose it is.
        let deletion = publish.retain && publish.payload.is_empty();
        let allowed = if !reading || deletion {
            access.may_publish_other_topics()
        } else if let Some(node) = &sparkplug_node {
            // A credential grants an edge node by `<group>/<edge node>`, its sensors' prefix.
            access.may_publish(node)
        } else if publish.payload.len() > self.max_payload_bytes {
            // Dead-lettered as too large whoever sent it.
            true
        } else {
            // Every sensor id the message claims (a batch's each, a templated topic's level)
            // must be granted; an element without a readable id is no reading: decode says why.
            claimed_sensor_ids(&topic, &publish.payload, &self.admission.templates)
                .iter()
                .all(|id| access.may_publish(id))
        };
        if reading && !deletion {
            let captured_topic = if allowed {
                topic
            } else {
                let mut marked =
                    BytesMut::with_capacity(FORBIDDEN_TOPIC_PREFIX.len() + topic.len());
                marked.extend_from_slice(FORBIDDEN_TOPIC_PREFIX.as_bytes());
                marked.extend_from_slice(&topic);
                marked.freeze()
            };
            self.staged().push(Captured::new(
                Timestamp::now(),
                captured_topic,
                publish.payload.clone(),
                self.max_payload_bytes,
            ));
        }
        if !allowed {
            self.metrics
                .mqtt_publishes_refused
                .fetch_add(1, Ordering::Relaxed);
            if let Some(id) = packet_id {
                self.session().rare().refused_publishes.insert(id);
            }
            publish.topic = Bytes::from_static(REFUSED_TOPIC.as_bytes());
            publish.retain = false;
        }
        Packet::Publish(publish, properties)
    }

    /// Removes the filters `access` may not use; the SUBACK gets failure codes in their place.
    fn subscribe(
        &self,
        access: &Access,
        mut subscribe: protocol::Subscribe,
    ) -> protocol::Subscribe {
        let mut refused = Vec::new();
        let filters = std::mem::take(&mut subscribe.filters);
        for (i, filter) in filters.into_iter().enumerate() {
            if access.may_subscribe(&filter.path) {
                subscribe.filters.push(filter);
            } else {
                tracing::info!(
                    user = access.user(),
                    filter = %filter.path,
                    "refused a subscription the credential does not grant"
                );
                refused.push(i);
            }
        }
        if !refused.is_empty() {
            self.metrics
                .mqtt_subscriptions_refused
                .fetch_add(refused.len() as u64, Ordering::Relaxed);
            self.session()
                .rare()
                .refused_filters
                .insert(subscribe.pkid, refused);
        }
        subscribe
    }

    /// Rewrites a reply to say what the codec refused.
    fn amend(&self, packet: Packet) -> Packet {
        let v5 = self.admission.version == Version::V5;
        let mut session = self.session();
        match packet {
            Packet::ConnAck(mut ack, props) if session.refused.is_some() => {
                ack.code = session.refused.unwrap_or(ConnectReturnCode::NotAuthorized);
                ack.session_present = false;
                Packet::ConnAck(ack, props)
            }
            Packet::PubAck(mut ack, props) => {
                if session.refused_publish(ack.pkid) && v5 {
                    ack.reason = PubAckReason::NotAuthorized;
                }
                Packet::PubAck(ack, props)
            }
            Packet::PubRec(mut rec, props) => {
                if session.refused_publish(rec.pkid) && v5 {
                    rec.reason = PubRecReason::NotAuthorized;
                }
                Packet::PubRec(rec, props)
            }
            Packet::SubAck(mut ack, props) => {
                let refused = session
                    .rare
                    .as_mut()
                    .and_then(|rare| rare.refused_filters.remove(&ack.pkid));
                if let Some(refused) = refused {
                    let code = if v5 {
                        SubscribeReasonCode::NotAuthorized
                    } else {
                        SubscribeReasonCode::Failure
                    };
                    for i in refused {
                        ack.return_codes.insert(i.min(ack.return_codes.len()), code);
                    }
                }
                Packet::SubAck(ack, props)
            }
            other => other,
        }
    }

    /// Writes what is staged to the log. On refusal the staged messages are dropped unacknowledged
    /// and the connection must end.
    fn flush(&self) -> Result<(), protocol::Error> {
        let mut staged = self.staged();
        if staged.is_empty() {
            return Ok(());
        }
        let count = staged.len() as u64;
        let result = (self.sink)(&staged);
        staged.clear();
        match result {
            Ok(()) => {
                self.metrics.captured.fetch_add(count, Ordering::Relaxed);
                Ok(())
            }
            Err(refused) => {
                self.metrics.refused.fetch_add(count, Ordering::Relaxed);
                tracing::error!(
                    refused = count,
                    reason = crate::error_chain(&refused),
                    "REFUSING readings: the local log did not take them; closing the \
                     publisher's connection unacknowledged so it sends them again"
                );
                // rumqttd has no error that means "try later"; any error ends the connection.
                Err(protocol::Error::InvalidProtocol)
            }
        }
    }
}

impl<P: Protocol> Protocol for Capture<P> {
    fn read_mut(
        &mut self,
        stream: &mut BytesMut,
        max_size: usize,
    ) -> Result<Packet, protocol::Error> {
        if !self.session().introduced {
            self.introduce(stream)?;
        }
        if self.session().refused.is_some() {
            // The CONNACK said no; nothing more is read from this client.
            return Err(protocol::Error::InvalidProtocol);
        }
        // rumqttd keeps a PUBLISH's packet id to itself; read it off the wire first.
        let packet_id = publish_packet_id(stream);
        match self.inner.read_mut(stream, max_size) {
            Ok(packet @ Packet::Connect(..)) => self.admit(packet),
            Ok(packet) => {
                // Nothing but a CONNECT before access is granted: in particular no PUBLISH
                // reaches the log from a connection that never authenticated.
                let Some(access) = self.session().access.clone() else {
                    return Err(protocol::Error::InvalidProtocol);
                };
                Ok(match packet {
                    Packet::Publish(publish, properties) => {
                        self.publish(&access, publish, properties, packet_id)
                    }
                    Packet::Subscribe(subscribe, props) => {
                        Packet::Subscribe(self.subscribe(&access, subscribe), props)
                    }
                    other => other,
                })
            }
            Err(protocol::Error::InsufficientBytes(needed)) => {
                // The end of what the socket gave us: the batch is complete.
                self.flush()?;
                Err(protocol::Error::InsufficientBytes(needed))
            }
            other => other,
        }
    }

    fn write(&self, packet: Packet, write: &mut BytesMut) -> Result<usize, protocol::Error> {
        // Nothing, an acknowledgement least of all, leaves before the log has what came in.
        self.flush()?;
        self.inner.write(self.amend(packet), write)
    }
}

impl<P> Drop for Capture<P> {
    fn drop(&mut self) {
        // QoS 0 messages of a closing connection may still be staged; they were never acked,
        // but they did arrive.
        let _ = self.flush();
        if self.session().access.is_some() {
            self.metrics.mqtt_clients.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

fn connack_code(refusal: Option<Refusal>, version: Version) -> ConnectReturnCode {
    match (refusal, version) {
        (None, _) => ConnectReturnCode::ClientIdentifierNotValid,
        (Some(Refusal::BadCredentials), _) => ConnectReturnCode::BadUserNamePassword,
        (Some(Refusal::NotAuthorized), _) => ConnectReturnCode::NotAuthorized,
        (Some(Refusal::Busy), Version::V4) => ConnectReturnCode::ServiceUnavailable,
        (Some(Refusal::Busy), Version::V5) => ConnectReturnCode::ServerBusy,
    }
}

/// The packet id of the QoS 1 or 2 PUBLISH at the start of `stream`, if one is there whole
/// enough to tell: fixed header, remaining length, topic, then the id.
fn publish_packet_id(stream: &[u8]) -> Option<u16> {
    let first = *stream.first()?;
    if first >> 4 != 3 || (first >> 1) & 3 == 0 {
        return None;
    }
    // The remaining length: 1 to 4 bytes, 7 bits each, high bit set on all but the last.
    let mut at = 1;
    while *stream.get(at)? & 0x80 != 0 {
        at += 1;
        if at > 4 {
            return None;
        }
    }
    at += 1;
    let topic_len = usize::from(u16::from_be_bytes([*stream.get(at)?, *stream.get(at + 1)?]));
    at += 2 + topic_len;
    Some(u16::from_be_bytes([*stream.get(at)?, *stream.get(at + 1)?]))
}

/// Runs CPU-heavy `f` without stalling the other connections of this runtime thread: tokio
/// hands them to another worker while `f` runs.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// `<group>/<edge node>` of a Sparkplug topic (`spBv1.0/<group>/<type>/<edge node>/...`).
fn sparkplug_node_of(topic: &[u8]) -> Option<String> {
    let topic = std::str::from_utf8(topic).ok()?;
    let mut levels = topic.split('/').skip(1);
    let (group, _, node) = (levels.next()?, levels.next()?, levels.next()?);
    Some(format!("{group}/{node}"))
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use rumqttd::protocol::v4::V4;

    use super::*;

    #[test]
    fn a_device_connections_codecs_are_small() {
        // Every device connection holds its codecs for its whole life, most of it idle, in its
        // task and its link (the `idle` bench scenario): what few connections use is boxed.
        let size = std::mem::size_of::<Capture<super::super::conformance::Conformance<V4>>>();
        assert!(size <= 160, "the codecs of a connection take {size} bytes");
    }

    fn sink() -> (CaptureSink, Arc<Mutex<Vec<Captured>>>) {
        let kept = Arc::new(Mutex::new(Vec::new()));
        let to = Arc::clone(&kept);
        let sink: CaptureSink = Arc::new(move |batch: &[Captured]| {
            to.lock().unwrap().extend_from_slice(batch);
            Ok(())
        });
        (sink, kept)
    }

    fn encode(packet: Packet) -> BytesMut {
        let mut out = BytesMut::new();
        V4.write(packet, &mut out).unwrap();
        out
    }

    fn connect(keep_alive: u16) -> Packet {
        Packet::Connect(
            protocol::Connect {
                keep_alive,
                client_id: "dev".into(),
                clean_session: true,
            },
            None,
            None,
            None,
            None,
        )
    }

    #[test]
    fn keep_alive_zero_is_accepted_as_very_long() {
        let (sink, _) = sink();
        let mut codec = Capture::new(V4, sink, Arc::default(), 1024, Admission::open(Version::V4));
        let mut stream = encode(connect(0));
        match codec.read_mut(&mut stream, 1 << 20).unwrap() {
            Packet::Connect(c, ..) => assert_eq!(c.keep_alive, KEEP_ALIVE_FOR_ZERO),
            other => panic!("{other:?}"),
        }
        let (sink, _) = self::sink();
        let mut codec = Capture::new(V4, sink, Arc::default(), 1024, Admission::open(Version::V4));
        let mut stream = encode(connect(30));
        match codec.read_mut(&mut stream, 1 << 20).unwrap() {
            Packet::Connect(c, ..) => assert_eq!(c.keep_alive, 30),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn sensor_publishes_reach_the_sink_before_any_reply_is_written() {
        let (sink, kept) = sink();
        let mut codec = Capture::new(V4, sink, Arc::default(), 1024, Admission::open(Version::V4));
        let mut stream = encode(connect(30));
        assert!(codec.read_mut(&mut stream, 1 << 20).is_ok());
        let mut stream = encode(Packet::Publish(
            protocol::Publish::new("sensors/temperature", "{}", false),
            None,
        ));
        stream.extend_from_slice(&encode(Packet::Publish(
            protocol::Publish::new("other/topic", "x", false),
            None,
        )));
        assert!(matches!(
            codec.read_mut(&mut stream, 1 << 20),
            Ok(Packet::Publish(..))
        ));
        assert!(
            kept.lock().unwrap().is_empty(),
            "staged until the batch ends"
        );
        let mut out = BytesMut::new();
        codec
            .write(Packet::PingResp(protocol::PingResp), &mut out)
            .unwrap();
        assert_eq!(kept.lock().unwrap().len(), 1, "flushed before the reply");
        assert!(matches!(
            codec.read_mut(&mut stream, 1 << 20),
            Ok(Packet::Publish(..))
        ));
        assert!(matches!(
            codec.read_mut(&mut stream, 1 << 20),
            Err(protocol::Error::InsufficientBytes(_))
        ));
        let kept = kept.lock().unwrap();
        assert_eq!(kept.len(), 1, "other topics are not captured");
        assert_eq!(&kept[0].topic[..], b"sensors/temperature");
    }

    #[test]
    fn a_refused_batch_fails_the_connection() {
        let sink: CaptureSink =
            Arc::new(|_: &[Captured]| Err(Refused(Box::new(std::io::Error::other("full")))));
        let metrics = Arc::new(Metrics::default());
        let mut codec = Capture::new(
            V4,
            sink,
            Arc::clone(&metrics),
            1024,
            Admission::open(Version::V4),
        );
        let mut stream = encode(connect(30));
        stream.extend_from_slice(&encode(Packet::Publish(
            protocol::Publish::new("sensors/t", "{}", false),
            None,
        )));
        assert!(codec.read_mut(&mut stream, 1 << 20).is_ok());
        assert!(codec.read_mut(&mut stream, 1 << 20).is_ok());
        assert!(codec.read_mut(&mut stream, 1 << 20).is_err());
        assert_eq!(metrics.refused.load(Ordering::Relaxed), 1);
        let mut out = BytesMut::new();
        assert!(
            codec
                .write(Packet::PingResp(protocol::PingResp), &mut out)
                .is_ok()
        );
    }

    fn guarded(version: Version) -> (Capture<V4>, Arc<Mutex<Vec<Captured>>>, Arc<Metrics>) {
        use crate::auth::{Device, FilterPattern, SensorPattern, hash_password};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("creds.toml");
        std::fs::write(&path, "").unwrap();
        let device = Device {
            user: "plant3".into(),
            password_hash: Some(hash_password("right").unwrap()),
            publish: vec![SensorPattern::parse("plant3/*").unwrap()],
            subscribe: vec![FilterPattern::parse("sensors/+").unwrap()],
        };
        let gatekeeper = Gatekeeper::from_file(&path, false, vec![device]).unwrap();
        let admission = Arc::new(Admission {
            gatekeeper: Arc::new(gatekeeper),
            templates: Arc::new(Templates::parse(&["plant/+site/+sensor_id/+kind"]).unwrap()),
            version,
            handoff: None,
        });
        let (sink, kept) = sink();
        let metrics = Arc::new(Metrics::default());
        // The V4 codec stands in for both: only the reason codes the wrapper picks differ.
        let codec = Capture::new(V4, sink, Arc::clone(&metrics), 1024, admission);
        (codec, kept, metrics)
    }

    fn login(user: &str, password: &str) -> Packet {
        match connect(30) {
            Packet::Connect(c, p, w, wp, _) => Packet::Connect(
                c,
                p,
                w,
                wp,
                Some(protocol::Login {
                    username: user.into(),
                    password: password.into(),
                }),
            ),
            _ => unreachable!(),
        }
    }

    fn connack(codec: &Capture<V4>) -> u8 {
        let mut out = BytesMut::new();
        codec
            .write(
                Packet::ConnAck(
                    protocol::ConnAck {
                        session_present: false,
                        code: ConnectReturnCode::Success,
                    },
                    None,
                ),
                &mut out,
            )
            .unwrap();
        out[3]
    }

    #[test]
    fn a_bad_login_gets_its_code_and_nothing_more() {
        let (mut codec, kept, metrics) = guarded(Version::V4);
        let mut stream = encode(login("plant3", "wrong"));
        let publish = encode(Packet::Publish(
            protocol::Publish::new("sensors/t", r#"{"sensor_id":"plant3/a"}"#, false),
            None,
        ));
        stream.extend_from_slice(&publish);
        match codec.read_mut(&mut stream, 1 << 20).unwrap() {
            Packet::Connect(c, _, will, _, login) => {
                assert!(c.client_id.starts_with(RESERVED_CLIENT_PREFIX), "defused");
                assert!(will.is_none() && login.is_none());
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(connack(&codec), 0x04);
        assert!(codec.read_mut(&mut stream, 1 << 20).is_err());
        drop(codec);
        assert!(kept.lock().unwrap().is_empty());
        assert_eq!(metrics.mqtt_logins_refused.load(Ordering::Relaxed), 1);

        let (mut codec, ..) = guarded(Version::V5);
        let mut stream = encode(connect(30));
        codec.read_mut(&mut stream, 1 << 20).unwrap();
        // The V5 codec writes NotAuthorized as 0x87 (the V4 one, here, as 0x05).
        assert_eq!(connack(&codec), 0x05, "no credentials: not authorized");
    }

    #[test]
    fn nothing_before_connect_reaches_the_log() {
        let (mut codec, kept, _) = guarded(Version::V4);
        let mut stream = encode(Packet::Publish(
            protocol::Publish::new("sensors/t", r#"{"sensor_id":"plant3/a"}"#, false),
            None,
        ));
        assert!(codec.read_mut(&mut stream, 1 << 20).is_err());
        drop(codec);
        assert!(kept.lock().unwrap().is_empty());
    }

    #[test]
    fn the_internal_client_ids_cannot_be_taken() {
        let (sink, _) = sink();
        let mut codec = Capture::new(V4, sink, Arc::default(), 1024, Admission::open(Version::V4));
        let mut stream = encode(Packet::Connect(
            protocol::Connect {
                keep_alive: 30,
                client_id: format!("{RESERVED_CLIENT_PREFIX}tap-0123"),
                clean_session: true,
            },
            None,
            None,
            None,
            None,
        ));
        codec.read_mut(&mut stream, 1 << 20).unwrap();
        assert_eq!(connack(&codec), 0x02, "identifier rejected");
    }

    #[test]
    fn another_devices_sensor_id_is_marked_forbidden_and_redirected() {
        let (mut codec, kept, metrics) = guarded(Version::V4);
        let mut stream = encode(login("plant3", "right"));
        codec.read_mut(&mut stream, 1 << 20).unwrap();
        assert_eq!(connack(&codec), 0x00);
        let mine = r#"{"sensor_id":"plant3/a","value":1,"timestamp":"2024-05-01T10:00:00Z"}"#;
        let theirs =
            r#"{"value":1,"sensor_id":"plant\u0034/a","timestamp":"2024-05-01T10:00:00Z"}"#;
        let mut stream = encode(Packet::Publish(
            protocol::Publish::new("sensors/temperature", mine, false),
            None,
        ));
        stream.extend_from_slice(&encode(Packet::Publish(
            protocol::Publish::new("sensors/temperature", theirs, true),
            None,
        )));
        assert!(matches!(
            codec.read_mut(&mut stream, 1 << 20).unwrap(),
            Packet::Publish(p, _) if &p.topic[..] == b"sensors/temperature"
        ));
        match codec.read_mut(&mut stream, 1 << 20).unwrap() {
            Packet::Publish(p, _) => {
                assert_eq!(&p.topic[..], REFUSED_TOPIC.as_bytes());
                assert!(!p.retain, "a refused message is not retained either");
            }
            other => panic!("{other:?}"),
        }
        let _ = codec.read_mut(&mut stream, 1 << 20);
        let kept = kept.lock().unwrap();
        assert_eq!(
            kept.len(),
            2,
            "both logged: the refusal becomes a dead letter"
        );
        assert_eq!(&kept[0].topic[..], b"sensors/temperature");
        assert_eq!(&kept[1].topic[..], b"$forbidden/sensors/temperature");
        assert_eq!(metrics.mqtt_publishes_refused.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn refused_acks_and_filters_are_rewritten() {
        for (version, puback_reason, suback_code) in
            [(Version::V5, Some(0x87), 0x87), (Version::V4, None, 0x80)]
        {
            let (mut codec, ..) = guarded(version);
            let mut stream = encode(login("plant3", "right"));
            codec.read_mut(&mut stream, 1 << 20).unwrap();
            // A QoS 1 publish, packet id 7, for another plant.
            let mut publish =
                protocol::Publish::new("sensors/t", r#"{"sensor_id":"plant4/a"}"#, false);
            let mut raw = BytesMut::new();
            V4.write(Packet::Publish(publish.clone(), None), &mut raw)
                .unwrap();
            raw[0] |= 0x02;
            let body_len = raw.len();
            raw.extend_from_slice(&[0, 7]);
            raw[1] += 2;
            // The id goes after the topic: move the payload behind it.
            let topic_end = 2 + 2 + publish.topic.len();
            let payload = raw.split_off(topic_end);
            raw.extend_from_slice(&payload[body_len - topic_end..]);
            raw.extend_from_slice(&payload[..body_len - topic_end]);
            assert_eq!(publish_packet_id(&raw), Some(7));
            assert!(matches!(
                codec.read_mut(&mut raw, 1 << 20),
                Ok(Packet::Publish(..))
            ));
            publish.payload = Bytes::new();
            let mut out = BytesMut::new();
            let ack = |pkid| {
                Packet::PubAck(
                    protocol::PubAck {
                        pkid,
                        reason: PubAckReason::Success,
                    },
                    None,
                )
            };
            match codec.amend(ack(7)) {
                Packet::PubAck(a, _) => assert_eq!(
                    a.reason == PubAckReason::NotAuthorized,
                    puback_reason.is_some()
                ),
                other => panic!("{other:?}"),
            }
            match codec.amend(ack(7)) {
                Packet::PubAck(a, _) => assert_eq!(a.reason, PubAckReason::Success, "once"),
                other => panic!("{other:?}"),
            }
            let filter = |path: &str| protocol::Filter {
                path: path.into(),
                qos: protocol::QoS::AtLeastOnce,
                nolocal: false,
                preserve_retain: false,
                retain_forward_rule: protocol::RetainForwardRule::Never,
            };
            let mut stream = encode(Packet::Subscribe(
                protocol::Subscribe {
                    pkid: 9,
                    filters: vec![filter("sensors/#"), filter("sensors/temperature")],
                },
                None,
            ));
            match codec.read_mut(&mut stream, 1 << 20).unwrap() {
                Packet::Subscribe(s, _) => {
                    assert_eq!(s.filters.len(), 1);
                    assert_eq!(s.filters[0].path, "sensors/temperature");
                }
                other => panic!("{other:?}"),
            }
            codec
                .write(
                    Packet::SubAck(
                        protocol::SubAck {
                            pkid: 9,
                            return_codes: vec![SubscribeReasonCode::QoS1],
                        },
                        None,
                    ),
                    &mut out,
                )
                .unwrap();
            assert_eq!(&out[out.len() - 2..], &[suback_code, 0x01]);
        }
    }

    #[test]
    fn the_handoff_preamble_is_required_on_internal_listeners() {
        let key = HandoffKey([7; 32]);
        let admission = Arc::new(Admission {
            gatekeeper: Arc::new(Gatekeeper::open()),
            templates: Arc::default(),
            version: Version::V4,
            handoff: Some(key.clone()),
        });
        let (sink, _) = sink();
        let mut codec = Capture::new(
            V4,
            sink.clone(),
            Arc::default(),
            1024,
            Arc::clone(&admission),
        );
        let mut stream = BytesMut::from(&key.preamble(Some("device-1"))[..]);
        stream.extend_from_slice(&encode(connect(30)));
        assert!(matches!(
            codec.read_mut(&mut stream, 1 << 20),
            Ok(Packet::Connect(..))
        ));
        let certificate = codec.session().rare().certificate.clone();
        assert_eq!(certificate.as_deref(), Some("device-1"));

        let mut codec = Capture::new(V4, sink, Arc::default(), 1024, admission);
        let mut stream = BytesMut::from(&HandoffKey([8; 32]).preamble(Some("device-1"))[..]);
        stream.extend_from_slice(&encode(connect(30)));
        assert!(codec.read_mut(&mut stream, 1 << 20).is_err(), "wrong key");
    }
}
