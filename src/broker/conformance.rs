//! MQTT rules that rumqttd 0.20 does not keep and a device connection's codec can: a wrapper
//! around rumqttd's V4/V5 codecs, under the capture codec, that sees every packet of one
//! connection in both directions and keeps what it needs to know about that connection.
//!
//! - A second CONNECT on a connection is a protocol error that closes it (MQTT 3.1.1 3.1.0-2,
//!   MQTT 5 3.1.0-2); rumqttd's router only logged and ignored it.
//! - MQTT 5: a zero-length client id is allowed with Clean Start 0 (3.1.3.1: the server
//!   assigns one); rumqttd refused it with the 3.1.1 rule. The assigned id is new, so no session
//!   can exist for it: the CONNECT goes on as Clean Start 1, which means the same. MQTT 3.1.1
//!   keeps its rule (3.1.3-8: refused).
//! - MQTT 5 Maximum Packet Size (3.1.2.25): a PUBLISH larger than the client declared is not
//!   sent, and the connection "behaves as if it had completed sending that Application
//!   Message": the acknowledgement the router waits for (PUBACK, or PUBREC then PUBCOMP) is made
//!   up here and read back as if the client had sent it, once the client has acknowledged
//!   every message sent before it (the router takes acknowledgements in order only). Server
//!   topic aliases are kept right:
//!   when a dropped message set an alias, the next message using it carries the topic again.
//!
//! Rules that need the router's knowledge (QoS downgrade, No Local, sessions) are patches of
//! rumqttd itself, in `patches/rumqttd/`. This module must not interpret payloads or decide
//! anything about readings; it changes nothing on a connection that follows the rules above.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Mutex, MutexGuard};

use bytes::{Bytes, BytesMut};
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::v5::V5;
use rumqttd::protocol::{
    self, Packet, Protocol, PubAck, PubAckReason, PubComp, PubCompReason, PubRec, PubRecReason,
};

/// Which MQTT a listener speaks: the rules differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mqtt {
    V311,
    V5,
}

pub struct Conformance<P> {
    inner: P,
    version: Mqtt,
    connected: bool,
    /// Only for a client that declared a Maximum Packet Size (MQTT 5): boxed, so every other
    /// connection holds a pointer instead of the queues and maps.
    limited: Option<Box<Limited>>,
}

/// A client's Maximum Packet Size and what keeping it takes.
#[derive(Debug)]
struct Limited {
    /// In bytes of the whole packet.
    max: usize,
    /// Write-side state. `Protocol::write` takes `&self`; a codec belongs to one connection
    /// task, so the lock is never contended.
    outbound: Mutex<Outbound>,
}

impl Limited {
    fn outbound(&self) -> MutexGuard<'_, Outbound> {
        self.outbound
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[derive(Debug, Default)]
struct Outbound {
    /// Acknowledgements for messages that were not sent, ready to be read as if from the
    /// client.
    acks: VecDeque<Packet>,
    /// QoS 1 and 2 messages written and not yet acknowledged (PUBACK, PUBREC), in the order
    /// the router expects their acknowledgements: a packet id, with the made-up
    /// acknowledgement when the message was dropped. The router takes acknowledgements in
    /// order only, so a made-up one waits until the client acknowledged everything before it.
    inflight: VecDeque<(u16, Option<Packet>)>,
    /// The same for PUBRELs written and not yet completed (PUBCOMP).
    releases: VecDeque<(u16, Option<Packet>)>,
    /// Packet ids of dropped QoS 2 messages whose PUBREL is answered here.
    dropped_qos2: HashSet<u16>,
    /// The router's topic aliases on this connection, as it set them.
    alias_topics: HashMap<u16, Bytes>,
    /// The aliases the client has learned (their setting message was sent).
    aliases_known: HashSet<u16>,
}

impl Outbound {
    /// The client acknowledged `pkid` (from `queue`): made-up acknowledgements now at the
    /// front are ready.
    fn acknowledged(queue: &mut VecDeque<(u16, Option<Packet>)>, pkid: u16) {
        if let Some(at) = queue
            .iter()
            .position(|(id, made_up)| *id == pkid && made_up.is_none())
        {
            queue.remove(at);
        }
    }

    fn release(&mut self) {
        for queue in [&mut self.inflight, &mut self.releases] {
            while queue.front().is_some_and(|(_, made_up)| made_up.is_some()) {
                if let Some((_, Some(ack))) = queue.pop_front() {
                    self.acks.push_back(ack);
                }
            }
        }
    }
}

impl<P: std::fmt::Debug> std::fmt::Debug for Conformance<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conformance")
            .field("inner", &self.inner)
            .field("version", &self.version)
            .field("max_packet_size", &self.limited.as_ref().map(|l| l.max))
            .finish_non_exhaustive()
    }
}

impl<P: Clone> Clone for Conformance<P> {
    /// rumqttd clones the server's codec for each new connection: each gets empty state.
    fn clone(&self) -> Self {
        Self::new(self.inner.clone(), self.version)
    }
}

/// The codec of an MQTT 3.1.1 listener.
pub fn v311() -> Conformance<V4> {
    Conformance::new(V4, Mqtt::V311)
}

/// The codec of an MQTT 5 listener.
pub fn v5() -> Conformance<V5> {
    Conformance::new(V5, Mqtt::V5)
}

impl<P> Conformance<P> {
    pub fn new(inner: P, version: Mqtt) -> Self {
        Self {
            inner,
            version,
            connected: false,
            limited: None,
        }
    }
}

impl<P: Protocol> Protocol for Conformance<P> {
    fn read_mut(
        &mut self,
        stream: &mut BytesMut,
        max_size: usize,
    ) -> Result<Packet, protocol::Error> {
        // Made-up acknowledgements go first: they answer messages written before anything
        // the client sends now.
        if let Some(limited) = &self.limited
            && let Some(ack) = limited.outbound().acks.pop_front()
        {
            return Ok(ack);
        }
        match self.inner.read_mut(stream, max_size)? {
            Packet::Connect(mut connect, props, will, will_props, login) => {
                if self.connected {
                    tracing::debug!(
                        client_id = connect.client_id,
                        "second CONNECT on a connection: closing it"
                    );
                    return Err(protocol::Error::InvalidProtocol);
                }
                self.connected = true;
                if self.version == Mqtt::V5 {
                    if connect.client_id.is_empty() {
                        connect.clean_session = true;
                    }
                    self.limited = props
                        .as_ref()
                        .and_then(|p| p.max_packet_size)
                        .and_then(|size| usize::try_from(size).ok())
                        .map(|max| {
                            Box::new(Limited {
                                max,
                                outbound: Mutex::default(),
                            })
                        });
                }
                Ok(Packet::Connect(connect, props, will, will_props, login))
            }
            packet => {
                let Some(limited) = &self.limited else {
                    return Ok(packet);
                };
                let mut outbound = limited.outbound();
                match &packet {
                    Packet::PubAck(ack, _) => {
                        Outbound::acknowledged(&mut outbound.inflight, ack.pkid);
                    }
                    Packet::PubRec(rec, _) => {
                        Outbound::acknowledged(&mut outbound.inflight, rec.pkid);
                    }
                    Packet::PubComp(comp, _) => {
                        Outbound::acknowledged(&mut outbound.releases, comp.pkid);
                    }
                    _ => return Ok(packet),
                }
                outbound.release();
                Ok(packet)
            }
        }
    }

    fn write(&self, packet: Packet, out: &mut BytesMut) -> Result<usize, protocol::Error> {
        let Some(limited) = self.limited.as_deref() else {
            return self.inner.write(packet, out);
        };
        let max = limited.max;
        match packet {
            Packet::Publish(mut publish, properties) => {
                let mut outbound = limited.outbound();
                let alias = properties.as_ref().and_then(|p| p.topic_alias);
                if let Some(alias) = alias {
                    if publish.topic.is_empty() {
                        if !outbound.aliases_known.contains(&alias) {
                            // The message that set this alias was dropped: set it again.
                            if let Some(topic) = outbound.alias_topics.get(&alias) {
                                publish.topic = topic.clone();
                            }
                        }
                    } else {
                        outbound.alias_topics.insert(alias, publish.topic.clone());
                        outbound.aliases_known.remove(&alias);
                    }
                }
                let start = out.len();
                let written = self
                    .inner
                    .write(Packet::Publish(publish, properties), out)?;
                let (qos, pkid) = qos_and_pkid(&out[start..]);
                if out.len() - start <= max {
                    if let Some(alias) = alias {
                        outbound.aliases_known.insert(alias);
                    }
                    if qos > 0 {
                        outbound.inflight.push_back((pkid, None));
                    }
                    return Ok(written);
                }
                out.truncate(start);
                tracing::debug!(
                    size = written,
                    max,
                    qos,
                    "not sending a PUBLISH larger than the client's maximum packet size"
                );
                let made_up = match qos {
                    1 => Packet::PubAck(
                        PubAck {
                            pkid,
                            reason: PubAckReason::Success,
                        },
                        None,
                    ),
                    2 => {
                        outbound.dropped_qos2.insert(pkid);
                        Packet::PubRec(
                            PubRec {
                                pkid,
                                reason: PubRecReason::Success,
                            },
                            None,
                        )
                    }
                    _ => return Ok(0),
                };
                outbound.inflight.push_back((pkid, Some(made_up)));
                outbound.release();
                Ok(0)
            }
            Packet::PubRel(pubrel, properties) => {
                let mut outbound = limited.outbound();
                if outbound.dropped_qos2.remove(&pubrel.pkid) {
                    let made_up = Packet::PubComp(
                        PubComp {
                            pkid: pubrel.pkid,
                            reason: PubCompReason::Success,
                        },
                        None,
                    );
                    outbound.releases.push_back((pubrel.pkid, Some(made_up)));
                    outbound.release();
                    return Ok(0);
                }
                outbound.releases.push_back((pubrel.pkid, None));
                drop(outbound);
                self.inner.write(Packet::PubRel(pubrel, properties), out)
            }
            other => self.inner.write(other, out),
        }
    }
}

/// QoS and packet id of one encoded PUBLISH (rumqttd keeps both fields private).
fn qos_and_pkid(packet: &[u8]) -> (u8, u16) {
    let Some(&first) = packet.first() else {
        return (0, 0);
    };
    let qos = (first >> 1) & 0b11;
    if qos == 0 {
        return (0, 0);
    }
    // Fixed header: one byte, then the remaining length in 1 to 4 bytes, each with a
    // continuation bit.
    let length_bytes = packet[1..]
        .iter()
        .take(4)
        .position(|b| b & 0x80 == 0)
        .map_or(4, |i| i + 1);
    let topic_at = 1 + length_bytes;
    let topic_len = packet
        .get(topic_at..topic_at + 2)
        .map_or(0, |b| usize::from(u16::from_be_bytes([b[0], b[1]])));
    let pkid_at = topic_at + 2 + topic_len;
    let pkid = packet
        .get(pkid_at..pkid_at + 2)
        .map_or(0, |b| u16::from_be_bytes([b[0], b[1]]));
    (qos, pkid)
}

#[cfg(test)]
mod tests {
    use rumqttd::protocol::{
        Connect, ConnectProperties, PubRel, PubRelReason, Publish, PublishProperties,
    };

    use super::*;

    fn connect(client_id: &str, clean: bool, max_packet_size: Option<u32>) -> Packet {
        Packet::Connect(
            Connect {
                keep_alive: 30,
                client_id: client_id.into(),
                clean_session: clean,
            },
            max_packet_size.map(|size| ConnectProperties {
                session_expiry_interval: None,
                receive_maximum: None,
                max_packet_size: Some(size),
                topic_alias_max: None,
                request_response_info: None,
                request_problem_info: None,
                user_properties: Vec::new(),
                authentication_method: None,
                authentication_data: None,
            }),
            None,
            None,
            None,
        )
    }

    fn encode_v5(packet: Packet) -> BytesMut {
        let mut out = BytesMut::new();
        V5.write(packet, &mut out).unwrap();
        out
    }

    /// A PUBLISH from the router at `qos` with packet id `pkid`, decoded from the wire so its
    /// private fields are set.
    fn publish(topic: &str, payload: &[u8], qos: u8, pkid: u16) -> Packet {
        let mut body = Vec::new();
        body.extend_from_slice(&u16::try_from(topic.len()).unwrap().to_be_bytes());
        body.extend_from_slice(topic.as_bytes());
        if qos > 0 {
            body.extend_from_slice(&pkid.to_be_bytes());
        }
        body.push(0); // no properties
        body.extend_from_slice(payload);
        let mut bytes = BytesMut::new();
        bytes.extend_from_slice(&[0x30 | (qos << 1)]);
        let mut remaining = body.len();
        loop {
            let byte = u8::try_from(remaining % 128).unwrap();
            remaining /= 128;
            if remaining == 0 {
                bytes.extend_from_slice(&[byte]);
                break;
            }
            bytes.extend_from_slice(&[byte | 0x80]);
        }
        bytes.extend_from_slice(&body);
        V5.read_mut(&mut bytes, 1 << 20).unwrap()
    }

    fn connected_v5(max_packet_size: u32) -> Conformance<V5> {
        let mut codec = Conformance::new(V5, Mqtt::V5);
        let mut stream = encode_v5(connect("dev", true, Some(max_packet_size)));
        codec.read_mut(&mut stream, 1 << 20).unwrap();
        codec
    }

    fn next_read(codec: &mut Conformance<V5>) -> Packet {
        next_read_from(codec, &mut BytesMut::new())
    }

    fn next_read_from(codec: &mut Conformance<V5>, stream: &mut BytesMut) -> Packet {
        codec.read_mut(stream, 1 << 20).unwrap()
    }

    #[test]
    fn a_second_connect_closes_the_connection() {
        let mut codec = Conformance::new(V4, Mqtt::V311);
        let mut stream = BytesMut::new();
        V4.write(connect("dev", true, None), &mut stream).unwrap();
        V4.write(connect("dev", true, None), &mut stream).unwrap();
        assert!(matches!(
            codec.read_mut(&mut stream, 1 << 20),
            Ok(Packet::Connect(..))
        ));
        assert!(codec.read_mut(&mut stream, 1 << 20).is_err());
    }

    #[test]
    fn mqtt5_zero_length_client_id_with_clean_start_0_is_accepted() {
        let mut codec = Conformance::new(V5, Mqtt::V5);
        let mut stream = encode_v5(connect("", false, None));
        match codec.read_mut(&mut stream, 1 << 20).unwrap() {
            Packet::Connect(c, ..) => assert!(c.clean_session),
            other => panic!("{other:?}"),
        }
        // MQTT 3.1.1 keeps its rule: rumqttd refuses that CONNECT.
        let mut codec = Conformance::new(V4, Mqtt::V311);
        let mut stream = BytesMut::new();
        V4.write(connect("", false, None), &mut stream).unwrap();
        match codec.read_mut(&mut stream, 1 << 20).unwrap() {
            Packet::Connect(c, ..) => assert!(!c.clean_session),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn publishes_within_the_maximum_packet_size_are_sent() {
        let codec = connected_v5(64);
        let mut out = BytesMut::new();
        codec
            .write(publish("t", &[b'.'; 32], 1, 7), &mut out)
            .unwrap();
        assert!(!out.is_empty() && out.len() <= 64);
        assert_eq!(qos_and_pkid(&out), (1, 7));
    }

    #[test]
    fn a_larger_qos1_publish_is_dropped_and_acknowledged_for_the_client() {
        let mut codec = connected_v5(64);
        let mut out = BytesMut::new();
        codec
            .write(publish("t", &[b'.'; 64], 1, 9), &mut out)
            .unwrap();
        assert!(out.is_empty(), "nothing larger than 64 bytes leaves");
        match next_read(&mut codec) {
            Packet::PubAck(ack, _) => assert_eq!(ack.pkid, 9),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            codec.read_mut(&mut BytesMut::new(), 1 << 20),
            Err(protocol::Error::InsufficientBytes(_))
        ));
    }

    #[test]
    fn a_made_up_acknowledgement_waits_for_the_clients_earlier_ones() {
        let mut codec = connected_v5(64);
        let mut out = BytesMut::new();
        codec.write(publish("t", b"small", 1, 1), &mut out).unwrap();
        codec
            .write(publish("t", &[b'.'; 64], 1, 2), &mut out)
            .unwrap();
        assert!(
            matches!(
                codec.read_mut(&mut BytesMut::new(), 1 << 20),
                Err(protocol::Error::InsufficientBytes(_))
            ),
            "not before the client acknowledged message 1"
        );
        let mut stream = encode_v5(Packet::PubAck(
            PubAck {
                pkid: 1,
                reason: PubAckReason::Success,
            },
            None,
        ));
        assert!(
            matches!(next_read_from(&mut codec, &mut stream), Packet::PubAck(a, _) if a.pkid == 1)
        );
        assert!(matches!(next_read(&mut codec), Packet::PubAck(a, _) if a.pkid == 2));
    }

    #[test]
    fn a_larger_qos2_publish_is_completed_for_the_client() {
        let mut codec = connected_v5(64);
        let mut out = BytesMut::new();
        codec
            .write(publish("t", &[b'.'; 100], 2, 4), &mut out)
            .unwrap();
        assert!(out.is_empty());
        assert!(matches!(next_read(&mut codec), Packet::PubRec(r, _) if r.pkid == 4));
        let pubrel = Packet::PubRel(
            PubRel {
                pkid: 4,
                reason: PubRelReason::Success,
            },
            None,
        );
        codec.write(pubrel, &mut out).unwrap();
        assert!(out.is_empty(), "the client never saw that message");
        assert!(matches!(next_read(&mut codec), Packet::PubComp(c, _) if c.pkid == 4));
    }

    #[test]
    fn an_alias_set_by_a_dropped_publish_is_set_again() {
        let codec = connected_v5(64);
        let aliased = |topic: &str, payload: &[u8]| match publish(topic, payload, 0, 0) {
            Packet::Publish(p, _) => Packet::Publish(
                p,
                Some(PublishProperties {
                    topic_alias: Some(1),
                    ..PublishProperties::default()
                }),
            ),
            other => other,
        };
        let mut out = BytesMut::new();
        codec.write(aliased("a/b", &[b'.'; 80]), &mut out).unwrap();
        assert!(out.is_empty());
        codec.write(aliased("", b"small"), &mut out).unwrap();
        match V5.read_mut(&mut out, 1 << 20).unwrap() {
            Packet::Publish(p, props) => {
                assert_eq!(&p.topic[..], b"a/b", "the topic is sent with the alias");
                assert_eq!(props.and_then(|p| p.topic_alias), Some(1));
            }
            other => panic!("{other:?}"),
        }
        codec.write(aliased("", b"small"), &mut out).unwrap();
        match V5.read_mut(&mut out, 1 << 20).unwrap() {
            Packet::Publish(p, _) => assert!(p.topic.is_empty(), "now the client knows it"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn qos_and_pkid_read_from_the_encoded_packet() {
        let mut out = BytesMut::new();
        V4.write(
            Packet::Publish(Publish::new("topic", "x", false), None),
            &mut out,
        )
        .unwrap();
        assert_eq!(qos_and_pkid(&out), (0, 0));
        out.clear();
        // 200 bytes of payload: a remaining length of two bytes.
        V5.write(publish("topic", &[1; 200], 2, 513), &mut out)
            .unwrap();
        assert_eq!(qos_and_pkid(&out), (2, 513));
    }
}
