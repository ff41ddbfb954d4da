//! The embedded broker's MQTT 5 behaviour, tested over TCP with rumqttc's independent MQTT 5
//! client: QoS downgrade, No Local, Maximum Packet Size, zero-length client ids, sessions and
//! their expiry, retained messages, wills with a delay, shared subscriptions, topic aliases
//! (and the DISCONNECT an invalid one gets) and keep-alive. Each behaviour here is one that rumqttd 0.20 got wrong or that devices rely
//! on (see README, "Broker conformance"). Where a test must show that something does NOT
//! arrive, it sends a marker after it on the same path and checks the marker comes first.

use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{
    ConnAck, ConnectReturnCode, Filter, LastWill, LastWillProperties, Packet, Publish,
    PublishProperties,
};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::timeout;

use crate::helpers::{TestApp, unique};

const PATIENCE: Duration = Duration::from_secs(10);

/// One MQTT 5 client whose event loop runs in a task; incoming packets come out of `packets`.
pub struct Client {
    pub client: AsyncClient,
    packets: mpsc::UnboundedReceiver<Packet>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn options(port: u16, id: &str) -> MqttOptions {
    let mut options = MqttOptions::new(id, "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(30));
    options
}

/// Connects and returns the client with the server's CONNACK.
pub async fn connect(options: MqttOptions) -> (Client, ConnAck) {
    let (client, mut eventloop) = AsyncClient::new(options, 100);
    let (tx, packets) = mpsc::unbounded_channel();
    let connack = timeout(PATIENCE, async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => break ack,
                Ok(_) => {}
                Err(e) => panic!("MQTT 5 connection failed: {e:?}"),
            }
        }
    })
    .await
    .expect("no CONNACK");
    let task = tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(packet)) => {
                    if tx.send(packet).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    // Shown with the failure of a test that expected more.
                    eprintln!("MQTT 5 connection ended: {e:?}");
                    return;
                }
            }
        }
    });
    (
        Client {
            client,
            packets,
            task,
        },
        connack,
    )
}

impl Client {
    /// The first packet `pick` takes, skipping the others.
    async fn next<T>(&mut self, what: &str, mut pick: impl FnMut(Packet) -> Option<T>) -> T {
        timeout(PATIENCE, async {
            loop {
                match self.packets.recv().await {
                    Some(packet) => {
                        if let Some(taken) = pick(packet) {
                            return taken;
                        }
                    }
                    None => panic!("connection ended while waiting for {what}"),
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no {what} arrived"))
    }

    /// The next PUBLISH this client receives.
    pub async fn next_publish(&mut self) -> Publish {
        self.next("a PUBLISH", |p| match p {
            Packet::Publish(p) => Some(p),
            _ => None,
        })
        .await
    }

    /// Waits until the server has granted the last SUBSCRIBE.
    pub async fn subscribed(&mut self) {
        self.next("a SUBACK", |p| matches!(p, Packet::SubAck(_)).then_some(()))
            .await;
    }

    /// Waits until the server has acknowledged a QoS 1 PUBLISH of this client.
    pub async fn acknowledged(&mut self) {
        self.next("a PUBACK", |p| matches!(p, Packet::PubAck(_)).then_some(()))
            .await;
    }

    pub async fn subscribe(&mut self, filter: &str, qos: QoS) {
        self.client.subscribe(filter, qos).await.unwrap();
        self.subscribed().await;
    }

    pub async fn publish(&self, topic: &str, qos: QoS, payload: &str) {
        self.client
            .publish(topic, qos, false, payload.as_bytes().to_vec())
            .await
            .unwrap();
    }
}

fn topic() -> String {
    format!("conformance/{}", unique("t"))
}

fn payload(p: &Publish) -> &[u8] {
    &p.payload
}

#[tokio::test]
async fn delivered_qos_is_the_lower_of_published_and_granted() {
    let app = TestApp::spawn().await;
    let topic = topic();
    let (mut sub, _) = connect(options(app.mqtt5_port, "qos-sub")).await;
    sub.subscribe(&topic, QoS::ExactlyOnce).await;
    let (publisher, _) = connect(options(app.mqtt5_port, "qos-pub")).await;
    for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
        publisher.publish(&topic, qos, "m").await;
        assert_eq!(sub.next_publish().await.qos, qos);
    }
    // And the other way: a QoS 2 message to a QoS 1 subscription arrives at QoS 1.
    let (mut low, _) = connect(options(app.mqtt5_port, "qos-sub1")).await;
    low.subscribe(&topic, QoS::AtLeastOnce).await;
    publisher.publish(&topic, QoS::ExactlyOnce, "m").await;
    assert_eq!(low.next_publish().await.qos, QoS::AtLeastOnce);
}

#[tokio::test]
async fn no_local_subscribers_do_not_get_their_own_messages() {
    let app = TestApp::spawn().await;
    let topic = topic();
    let (mut a, _) = connect(options(app.mqtt5_port, "nolocal-a")).await;
    let mut filter = Filter::new(&topic, QoS::AtLeastOnce);
    filter.nolocal = true;
    a.client.subscribe_many([filter]).await.unwrap();
    a.subscribed().await;
    let (mut b, _) = connect(options(app.mqtt5_port, "nolocal-b")).await;
    b.subscribe(&topic, QoS::AtLeastOnce).await;

    a.publish(&topic, QoS::AtLeastOnce, "own").await;
    assert_eq!(payload(&b.next_publish().await), b"own", "others get it");
    b.publish(&topic, QoS::AtLeastOnce, "marker").await;
    assert_eq!(
        payload(&a.next_publish().await),
        b"marker",
        "its own message must not come back to a No Local subscriber"
    );
}

#[tokio::test]
async fn publishes_above_the_clients_maximum_packet_size_are_not_sent() {
    let app = TestApp::spawn().await;
    let topic = topic();
    let mut small = options(app.mqtt5_port, "maxpkt-sub");
    small.set_max_packet_size(Some(64));
    let (mut sub, _) = connect(small).await;
    sub.subscribe(&topic, QoS::AtLeastOnce).await;
    let (publisher, _) = connect(options(app.mqtt5_port, "maxpkt-pub")).await;

    publisher
        .publish(&topic, QoS::AtLeastOnce, &".".repeat(100))
        .await;
    publisher
        .publish(&topic, QoS::ExactlyOnce, &".".repeat(100))
        .await;
    publisher.publish(&topic, QoS::AtLeastOnce, "small 1").await;
    publisher.publish(&topic, QoS::AtLeastOnce, "small 2").await;
    // The dropped messages count as delivered: the small ones after them are acknowledged in
    // order and the connection stays up.
    assert_eq!(payload(&sub.next_publish().await), b"small 1");
    assert_eq!(payload(&sub.next_publish().await), b"small 2");
    publisher.publish(&topic, QoS::AtLeastOnce, "small 3").await;
    assert_eq!(payload(&sub.next_publish().await), b"small 3");
}

#[tokio::test]
async fn a_zero_length_client_id_is_accepted_with_clean_start_0() {
    let app = TestApp::spawn().await;
    let mut opts = options(app.mqtt5_port, "");
    opts.set_clean_start(false);
    let (_client, connack) = connect(opts).await;
    assert_eq!(connack.code, ConnectReturnCode::Success);
    let assigned = connack
        .properties
        .and_then(|p| p.assigned_client_identifier)
        .unwrap_or_default();
    assert!(!assigned.is_empty(), "the server assigns a client id");
}

#[tokio::test]
async fn a_session_with_an_expiry_interval_survives_a_disconnect() {
    let app = TestApp::spawn().await;
    let topic = topic();
    let id = unique("session");
    let mut first = options(app.mqtt5_port, &id);
    first
        .set_clean_start(true)
        .set_session_expiry_interval(Some(60));
    let (mut client, connack) = connect(first).await;
    assert!(!connack.session_present);
    client.subscribe(&topic, QoS::AtLeastOnce).await;
    client.client.disconnect().await.unwrap();
    drop(client);

    let (publisher, _) = connect(options(app.mqtt5_port, &unique("pub"))).await;
    publisher
        .publish(&topic, QoS::AtLeastOnce, "while away")
        .await;
    publisher
        .publish(&topic, QoS::AtMostOnce, "while away, qos 0")
        .await;

    // Clean Start 0 without a new interval: the session is resumed with its subscription and
    // the messages published meanwhile.
    let mut again = options(app.mqtt5_port, &id);
    again.set_clean_start(false);
    let (mut client, connack) = connect(again).await;
    assert!(connack.session_present, "the session must be present");
    assert_eq!(payload(&client.next_publish().await), b"while away");
    client.client.disconnect().await.unwrap();
    drop(client);

    // That connection had interval 0: its end ended the session.
    let mut third = options(app.mqtt5_port, &id);
    third.set_clean_start(false);
    let (_client, connack) = connect(third).await;
    assert!(!connack.session_present);
}

#[tokio::test]
async fn clean_start_discards_a_session_and_an_expired_one_is_gone() {
    let app = TestApp::spawn().await;
    let topic = topic();
    let id = unique("expiry");
    let mut opts = options(app.mqtt5_port, &id);
    opts.set_clean_start(true)
        .set_session_expiry_interval(Some(60));
    let (mut client, _) = connect(opts.clone()).await;
    client.subscribe(&topic, QoS::AtLeastOnce).await;
    client.client.disconnect().await.unwrap();
    drop(client);
    // Clean Start 1 discards the saved session.
    let (client, connack) = connect(opts).await;
    assert!(!connack.session_present);
    client.client.disconnect().await.unwrap();
    drop(client);

    let mut short = options(app.mqtt5_port, &id);
    short
        .set_clean_start(true)
        .set_session_expiry_interval(Some(1));
    let (mut client, _) = connect(short).await;
    client.subscribe(&topic, QoS::AtLeastOnce).await;
    client.client.disconnect().await.unwrap();
    drop(client);
    // Waiting out the interval is the behaviour under test, not a timing assumption.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let mut late = options(app.mqtt5_port, &id);
    late.set_clean_start(false);
    let (_client, connack) = connect(late).await;
    assert!(!connack.session_present, "the session expired");
}

#[tokio::test]
async fn retained_messages_reach_new_subscribers_at_the_lower_qos() {
    let app = TestApp::spawn().await;
    let topic = topic();
    let (mut publisher, _) = connect(options(app.mqtt5_port, "retain-pub")).await;
    publisher
        .client
        .publish(&topic, QoS::AtLeastOnce, true, b"kept".to_vec())
        .await
        .unwrap();
    // Acknowledged, so retained: a SUBSCRIBE the router took before that PUBLISH would get it
    // as a live message, without the retain flag (a CI run saw that).
    publisher.acknowledged().await;
    let (mut sub, _) = connect(options(app.mqtt5_port, "retain-sub")).await;
    sub.subscribe(&topic, QoS::ExactlyOnce).await;
    let retained = sub.next_publish().await;
    assert_eq!(payload(&retained), b"kept");
    assert!(retained.retain);
    assert_eq!(retained.qos, QoS::AtLeastOnce);
}

#[tokio::test]
async fn a_will_waits_for_its_delay_and_a_return_within_it_cancels_it() {
    let app = TestApp::spawn().await;
    let topic = topic();
    let (mut watcher, _) = connect(options(app.mqtt5_port, "will-watcher")).await;
    watcher.subscribe(&topic, QoS::AtLeastOnce).await;

    let with_will = |id: &str, message: &str| {
        let mut opts = options(app.mqtt5_port, id);
        let properties = LastWillProperties {
            delay_interval: Some(1),
            payload_format_indicator: None,
            message_expiry_interval: None,
            content_type: None,
            response_topic: None,
            correlation_data: None,
            user_properties: Vec::new(),
        };
        opts.set_last_will(LastWill::new(
            &topic,
            message,
            QoS::AtLeastOnce,
            false,
            Some(properties),
        ))
        .set_session_expiry_interval(Some(30));
        opts
    };

    // Gone without DISCONNECT, back within the delay: no will.
    let (client, _) = connect(with_will("will-back", "should not fire")).await;
    drop(client);
    let mut back = with_will("will-back", "should not fire");
    back.set_clean_start(false);
    let (returned, _) = connect(back).await;
    tokio::time::sleep(Duration::from_millis(2000)).await;

    // Gone for good: the will arrives once its delay has passed.
    let (client, _) = connect(with_will("will-gone", "fired")).await;
    drop(client);
    assert_eq!(payload(&watcher.next_publish().await), b"fired");
    drop(returned);
}

#[tokio::test]
async fn a_shared_subscription_delivers_each_message_once() {
    let app = TestApp::spawn().await;
    let topic = topic();
    let shared = format!("$share/group/{topic}");
    let (mut a, _) = connect(options(app.mqtt5_port, "share-a")).await;
    a.subscribe(&shared, QoS::AtLeastOnce).await;
    let (mut b, _) = connect(options(app.mqtt5_port, "share-b")).await;
    b.subscribe(&shared, QoS::AtLeastOnce).await;
    let (publisher, _) = connect(options(app.mqtt5_port, "share-pub")).await;
    let count = 10;
    for i in 0..count {
        publisher
            .publish(&topic, QoS::AtLeastOnce, &format!("m{i}"))
            .await;
    }
    let mut seen = Vec::new();
    timeout(PATIENCE, async {
        while seen.len() < count {
            tokio::select! {
                p = a.next_publish() => seen.push(p.payload),
                p = b.next_publish() => seen.push(p.payload),
            }
        }
    })
    .await
    .expect("not every message arrived");
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), count, "each message exactly once");
}

#[tokio::test]
async fn topic_aliases_work_both_ways() {
    let app = TestApp::spawn().await;
    let topic = topic();
    let mut aliasing = options(app.mqtt5_port, "alias-sub");
    aliasing.set_topic_alias_max(Some(10));
    let (mut sub, connack) = connect(aliasing).await;
    assert!(
        connack
            .properties
            .and_then(|p| p.topic_alias_max)
            .is_some_and(|max| max > 0),
        "the server accepts client topic aliases"
    );
    sub.subscribe(&topic, QoS::AtLeastOnce).await;

    // Client to server: the alias set by the first publish names the topic of the second.
    let (publisher, _) = connect(options(app.mqtt5_port, "alias-pub")).await;
    let alias = |topic_alias| PublishProperties {
        topic_alias: Some(topic_alias),
        ..PublishProperties::default()
    };
    publisher
        .client
        .publish_with_properties(&topic, QoS::AtLeastOnce, false, b"first".to_vec(), alias(1))
        .await
        .unwrap();
    publisher
        .client
        .publish_with_properties("", QoS::AtLeastOnce, false, b"second".to_vec(), alias(1))
        .await
        .unwrap();

    // Server to client: the first message sets an alias, the next uses it alone.
    let first = sub.next_publish().await;
    assert_eq!(payload(&first), b"first");
    assert_eq!(first.topic, Bytes::from(topic.clone()));
    let server_alias = first.properties.as_ref().and_then(|p| p.topic_alias);
    assert!(server_alias.is_some(), "the server set a topic alias");
    let second = sub.next_publish().await;
    assert_eq!(payload(&second), b"second");
    assert!(second.topic.is_empty(), "sent with the alias alone");
    assert_eq!(
        second.properties.as_ref().and_then(|p| p.topic_alias),
        server_alias
    );
}

#[tokio::test]
async fn keep_alive_0_is_accepted_and_a_silent_client_is_dropped() {
    let app = TestApp::spawn().await;
    let topic = topic();
    // rumqttc's MQTT 5 client cannot ask for keep-alive 0; MQTT allows it ("off").
    let (_zero, reason) = raw_connect(app.mqtt5_port, "ka-zero", 0, None).await;
    assert_eq!(reason, 0, "CONNACK Success");

    // A client that promised a 1 s keep-alive and then says nothing is closed (after 1.5 s),
    // and its will goes out.
    let (mut watcher, _) = connect(options(app.mqtt5_port, "ka-watcher")).await;
    watcher.subscribe(&topic, QoS::AtLeastOnce).await;
    let will = (topic.as_str(), &b"silent client gone"[..]);
    let (_silent, reason) = raw_connect(app.mqtt5_port, "ka-silent", 1, Some(will)).await;
    assert_eq!(reason, 0);
    assert_eq!(
        payload(&watcher.next_publish().await),
        b"silent client gone"
    );
}

/// A raw MQTT 5 CONNECT (clean start, QoS 1 will if any), as a client library would not send
/// it; returns the connection, which then says nothing, and the CONNACK's reason code.
async fn raw_connect(
    port: u16,
    id: &str,
    keep_alive: u16,
    will: Option<(&str, &[u8])>,
) -> (TcpStream, u8) {
    let field = |body: &mut Vec<u8>, bytes: &[u8]| {
        body.extend_from_slice(&u16::try_from(bytes.len()).unwrap().to_be_bytes());
        body.extend_from_slice(bytes);
    };
    let mut body = b"\x00\x04MQTT\x05".to_vec();
    body.push(if will.is_some() {
        0b0000_1110
    } else {
        0b0000_0010
    });
    body.extend_from_slice(&keep_alive.to_be_bytes());
    body.push(0); // no properties
    field(&mut body, id.as_bytes());
    if let Some((topic, message)) = will {
        body.push(0); // no will properties
        field(&mut body, topic.as_bytes());
        field(&mut body, message);
    }
    let mut packet = vec![0x10, u8::try_from(body.len()).unwrap()];
    packet.extend_from_slice(&body);
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    stream.write_all(&packet).await.unwrap();
    let (kind, connack) = read_packet(&mut stream).await;
    assert_eq!(kind, 0x20, "CONNACK");
    (stream, connack[1])
}

/// One packet off the wire: its first byte and its body.
async fn read_packet(stream: &mut TcpStream) -> (u8, Vec<u8>) {
    timeout(PATIENCE, async {
        let kind = stream.read_u8().await.unwrap();
        let (mut length, mut shift) = (0usize, 0);
        loop {
            let byte = stream.read_u8().await.unwrap();
            length |= usize::from(byte & 0x7f) << shift;
            shift += 7;
            if byte & 0x80 == 0 {
                break;
            }
        }
        let mut body = vec![0; length];
        stream.read_exact(&mut body).await.unwrap();
        (kind, body)
    })
    .await
    .expect("no packet in time")
}

/// A raw MQTT 5 QoS 1 PUBLISH (packet id 1) with a Topic Alias property.
fn raw_publish(topic: &str, alias: u16, payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&u16::try_from(topic.len()).unwrap().to_be_bytes());
    body.extend_from_slice(topic.as_bytes());
    body.extend_from_slice(&1u16.to_be_bytes());
    body.extend_from_slice(&[3, 0x23]); // properties: 3 bytes, Topic Alias
    body.extend_from_slice(&alias.to_be_bytes());
    body.extend_from_slice(payload);
    let mut packet = vec![0x32];
    let mut length = body.len();
    loop {
        let byte = u8::try_from(length & 0x7f).unwrap();
        length >>= 7;
        packet.push(if length > 0 { byte | 0x80 } else { byte });
        if length == 0 {
            break;
        }
    }
    packet.extend_from_slice(&body);
    packet
}

#[tokio::test]
async fn a_publish_with_an_invalid_topic_alias_ends_the_connection_with_its_reason() {
    let app = TestApp::spawn().await;
    let reading = |id: &str| crate::helpers::reading_json(id, 1.0, &crate::helpers::ts(0));
    let cases = [
        (
            "sensors/temperature",
            0,
            "alias-zero",
            0x94,
            "Topic Alias 0",
        ),
        (
            "sensors/temperature",
            4097,
            "alias-over",
            0x94,
            "above the maximum the CONNACK gave",
        ),
        ("", 5, "alias-unset", 0x82, "an alias never set"),
    ];
    for (topic, alias, sensor, code, what) in cases {
        let (mut stream, reason) = raw_connect(app.mqtt5_port, sensor, 30, None).await;
        assert_eq!(reason, 0, "CONNACK Success");
        stream
            .write_all(&raw_publish(topic, alias, reading(sensor).as_bytes()))
            .await
            .unwrap();
        let (kind, body) = read_packet(&mut stream).await;
        assert_eq!(
            kind, 0xE0,
            "{what}: DISCONNECT, not a PUBACK ({kind:#x} {body:?})"
        );
        assert_eq!(body.first(), Some(&code), "{what}: the reason code");
        let mut rest = Vec::new();
        let closed = timeout(PATIENCE, stream.read_to_end(&mut rest)).await;
        assert!(
            matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
            "{what}: the connection is closed, nothing after the DISCONNECT: {rest:?}"
        );
    }
    // Nothing of them was kept: a reading sent after them is the only one stored.
    let (mut stream, _) = raw_connect(app.mqtt5_port, "alias-good", 30, None).await;
    stream
        .write_all(&raw_publish(
            "sensors/temperature",
            1,
            reading("alias-good").as_bytes(),
        ))
        .await
        .unwrap();
    let (kind, _) = read_packet(&mut stream).await;
    assert_eq!(kind, 0x40, "PUBACK for a valid alias");
    app.wait_for_count(1).await;
    let (_, letters) = app.get_json("/deadletters").await;
    assert_eq!(letters.as_array().map(Vec::len), Some(0), "{letters}");
    let (status, body) = app.get_json("/latestten/alias-zero").await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(app.count_readings().await, 1);
}
