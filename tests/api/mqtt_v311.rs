//! The embedded broker's MQTT 3.1.1 behaviour over TCP, with rumqttc's MQTT 3.1.1 client and
//! raw packets where a client library would not misbehave: QoS downgrade, one CONNECT per
//! connection, the zero-length client id rule, and persistent sessions (which must keep
//! working under the MQTT 5 session rules).

use std::time::Duration;

use rumqttc::{AsyncClient, ConnAck, ConnectReturnCode, Event, MqttOptions, Packet, Publish, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::timeout;

use crate::helpers::{TestApp, unique};

const PATIENCE: Duration = Duration::from_secs(10);

struct Client {
    client: AsyncClient,
    packets: mpsc::UnboundedReceiver<Packet>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn options(port: u16, id: &str, clean: bool) -> MqttOptions {
    let mut options = MqttOptions::new(id, "127.0.0.1", port);
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_clean_session(clean);
    options
}

async fn connect(options: MqttOptions) -> (Client, ConnAck) {
    let (client, mut eventloop) = AsyncClient::new(options, 100);
    let (tx, packets) = mpsc::unbounded_channel();
    let connack = timeout(PATIENCE, async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => break ack,
                Ok(_) => {}
                Err(e) => panic!("MQTT connection failed: {e:?}"),
            }
        }
    })
    .await
    .expect("no CONNACK");
    let task = tokio::spawn(async move {
        while let Ok(event) = eventloop.poll().await {
            if let Event::Incoming(packet) = event
                && tx.send(packet).is_err()
            {
                return;
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
    async fn next(&mut self, what: &str, wanted: impl Fn(&Packet) -> bool) -> Packet {
        timeout(PATIENCE, async {
            loop {
                match self.packets.recv().await {
                    Some(p) if wanted(&p) => return p,
                    Some(_) => {}
                    None => panic!("connection ended while waiting for {what}"),
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no {what} arrived"))
    }

    async fn next_publish(&mut self) -> Publish {
        match self
            .next("PUBLISH", |p| matches!(p, Packet::Publish(_)))
            .await
        {
            Packet::Publish(p) => p,
            _ => unreachable!(),
        }
    }

    async fn subscribe(&mut self, filter: &str, qos: QoS) {
        self.client.subscribe(filter, qos).await.unwrap();
        self.next("SUBACK", |p| matches!(p, Packet::SubAck(_)))
            .await;
    }
}

fn topic() -> String {
    format!("conformance/{}", unique("t"))
}

#[tokio::test]
async fn mqtt311_delivered_qos_is_the_lower_of_published_and_granted() {
    let app = TestApp::spawn().await;
    let topic = topic();
    let (mut sub, _) = connect(options(app.mqtt_port, "qos-sub", true)).await;
    sub.subscribe(&topic, QoS::ExactlyOnce).await;
    let (publisher, _) = connect(options(app.mqtt_port, "qos-pub", true)).await;
    for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
        publisher
            .client
            .publish(&topic, qos, false, b"m".to_vec())
            .await
            .unwrap();
        assert_eq!(sub.next_publish().await.qos, qos);
    }
}

#[tokio::test]
async fn mqtt311_persistent_sessions_still_resume() {
    let app = TestApp::spawn().await;
    let topic = topic();
    let id = unique("persistent");
    let (mut client, _) = connect(options(app.mqtt_port, &id, false)).await;
    client.subscribe(&topic, QoS::AtLeastOnce).await;
    client.client.disconnect().await.unwrap();
    drop(client);

    let (publisher, _) = connect(options(app.mqtt_port, &unique("pub"), true)).await;
    publisher
        .client
        .publish(&topic, QoS::AtLeastOnce, false, b"while away".to_vec())
        .await
        .unwrap();

    let (mut client, connack) = connect(options(app.mqtt_port, &id, false)).await;
    assert!(connack.session_present);
    assert_eq!(&client.next_publish().await.payload[..], b"while away");
    drop(client);

    // A clean session discards it and keeps none.
    let (client, connack) = connect(options(app.mqtt_port, &id, true)).await;
    assert!(!connack.session_present);
    drop(client);
    let (_client, connack) = connect(options(app.mqtt_port, &id, false)).await;
    assert!(!connack.session_present);
}

/// A CONNECT packet of MQTT 3.1.1, keep-alive 30 s.
fn raw_connect(client_id: &str, clean: bool) -> Vec<u8> {
    let mut body = b"\x00\x04MQTT\x04".to_vec();
    body.push(if clean { 0x02 } else { 0x00 });
    body.extend_from_slice(&30u16.to_be_bytes());
    body.extend_from_slice(&u16::try_from(client_id.len()).unwrap().to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    let mut packet = vec![0x10, u8::try_from(body.len()).unwrap()];
    packet.extend_from_slice(&body);
    packet
}

/// Reads until the server closes the connection; panics if it does not.
async fn read_until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut seen = Vec::new();
    timeout(PATIENCE, async {
        let mut buf = [0u8; 256];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .expect("the server kept the connection open");
    seen
}

#[tokio::test]
async fn a_second_connect_closes_the_connection() {
    let app = TestApp::spawn().await;
    for port in [app.mqtt_port, app.mqtt5_port] {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let mut connect = raw_connect("twice", true);
        if port == app.mqtt5_port {
            // The MQTT 5 CONNECT: protocol level 5 and an empty property list.
            connect[8] = 5;
            connect.insert(12, 0);
            connect[1] += 1;
        }
        stream.write_all(&connect).await.unwrap();
        let mut connack = [0u8; 4];
        stream.read_exact(&mut connack[..2]).await.unwrap();
        assert_eq!(connack[0], 0x20);
        stream.write_all(&connect).await.unwrap();
        read_until_closed(&mut stream).await;
    }
}

#[tokio::test]
async fn mqtt311_zero_length_client_id_needs_a_clean_session() {
    let app = TestApp::spawn().await;
    // Clean session 0: refused with "identifier rejected" (MQTT 3.1.1, 3.1.3-8), then closed.
    let mut stream = TcpStream::connect(("127.0.0.1", app.mqtt_port))
        .await
        .unwrap();
    stream.write_all(&raw_connect("", false)).await.unwrap();
    let reply = read_until_closed(&mut stream).await;
    assert_eq!(reply, [0x20, 0x02, 0x00, 0x02]);
    // Clean session 1: accepted.
    let (_client, connack) = connect(options(app.mqtt_port, "", true)).await;
    assert_eq!(connack.code, ConnectReturnCode::Success);
}

/// A device whose connection breaks reconnects at once with the same client id: its new
/// connection must live, whatever order the broker learns of the two events in. (rumqttd gives
/// the new connection the old one's freed id; the old one's late "link closed" ended the new.)
#[tokio::test]
async fn a_client_that_reconnects_at_once_keeps_its_new_connection() {
    let app = TestApp::spawn().await;
    let connect = raw_connect("hasty", true);
    let mut previous: Option<TcpStream> = None;
    for round in 0..200 {
        let mut stream = TcpStream::connect(("127.0.0.1", app.mqtt_port))
            .await
            .unwrap();
        // The old connection goes away without DISCONNECT as the new one arrives.
        drop(previous.take());
        stream.write_all(&connect).await.unwrap();
        let mut connack = [0u8; 4];
        timeout(PATIENCE, stream.read_exact(&mut connack))
            .await
            .unwrap_or_else(|_| panic!("round {round}: no CONNACK"))
            .unwrap_or_else(|e| panic!("round {round}: closed before the CONNACK: {e}"));
        assert_eq!(connack, [0x20, 0x02, 0x00, 0x00], "round {round}");
        // Still connected a moment later: a PINGREQ is answered.
        tokio::time::sleep(Duration::from_millis(5)).await;
        stream.write_all(&[0xC0, 0x00]).await.unwrap();
        let mut pong = [0u8; 2];
        timeout(PATIENCE, stream.read_exact(&mut pong))
            .await
            .unwrap_or_else(|_| panic!("round {round}: no PINGRESP"))
            .unwrap_or_else(|e| panic!("round {round}: the new connection was closed: {e}"));
        assert_eq!(pong, [0xD0, 0x00], "round {round}");
        previous = Some(stream);
    }
}
