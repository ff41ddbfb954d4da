//! MQTT spoken byte by byte, for tests that check the exact reason codes sensorhub sends: no
//! client library between the test and the wire.

#![allow(dead_code)]

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use crate::helpers::PATIENCE;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum V {
    V4,
    V5,
}

fn string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&u16::try_from(s.len()).unwrap().to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    let mut len = body.len();
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

pub fn connect(v: V, client_id: &str, login: Option<(&str, &str)>) -> Vec<u8> {
    let mut body = Vec::new();
    string(&mut body, "MQTT");
    body.push(if v == V::V5 { 5 } else { 4 });
    body.push(if login.is_some() { 0xC2 } else { 0x02 });
    body.extend_from_slice(&60u16.to_be_bytes());
    if v == V::V5 {
        body.push(0);
    }
    string(&mut body, client_id);
    if let Some((user, password)) = login {
        string(&mut body, user);
        string(&mut body, password);
    }
    packet(0x10, &body)
}

pub fn publish_qos1(v: V, topic: &str, packet_id: u16, payload: &str) -> Vec<u8> {
    let mut body = Vec::new();
    string(&mut body, topic);
    body.extend_from_slice(&packet_id.to_be_bytes());
    if v == V::V5 {
        body.push(0);
    }
    body.extend_from_slice(payload.as_bytes());
    packet(0x32, &body)
}

pub fn subscribe(v: V, packet_id: u16, filter: &str) -> Vec<u8> {
    let mut body = packet_id.to_be_bytes().to_vec();
    if v == V::V5 {
        body.push(0);
    }
    string(&mut body, filter);
    body.push(1);
    packet(0x82, &body)
}

/// One packet: its first byte and its body.
pub async fn read_packet(stream: &mut (impl AsyncRead + Unpin)) -> Option<(u8, Vec<u8>)> {
    tokio::time::timeout(PATIENCE, async {
        let first = stream.read_u8().await.ok()?;
        let mut len = 0usize;
        let mut shift = 0;
        loop {
            let byte = stream.read_u8().await.ok()?;
            len |= usize::from(byte & 0x7f) << shift;
            shift += 7;
            if byte & 0x80 == 0 {
                break;
            }
        }
        let mut body = vec![0; len];
        stream.read_exact(&mut body).await.ok()?;
        Some((first, body))
    })
    .await
    .ok()
    .flatten()
}

/// Sends a CONNECT and returns the CONNACK's return code (3.1.1) or reason code (5).
pub async fn connack_code(
    stream: &mut (impl AsyncRead + AsyncWrite + Unpin),
    v: V,
    client_id: &str,
    login: Option<(&str, &str)>,
) -> u8 {
    stream
        .write_all(&connect(v, client_id, login))
        .await
        .unwrap();
    let (first, body) = read_packet(stream).await.expect("a CONNACK");
    assert_eq!(first, 0x20, "CONNACK expected, got {first:#x}");
    body[1]
}

/// After a refused CONNECT the server closes the connection.
pub async fn is_closed(stream: &mut (impl AsyncRead + Unpin)) -> bool {
    let mut byte = [0u8; 1];
    matches!(
        tokio::time::timeout(Duration::from_secs(10), stream.read(&mut byte)).await,
        Ok(Ok(0) | Err(_))
    )
}

/// Publishes at QoS 1 and returns the PUBACK's reason code (0 when it carries none).
pub async fn puback_code(
    stream: &mut (impl AsyncRead + AsyncWrite + Unpin),
    v: V,
    topic: &str,
    packet_id: u16,
    payload: &str,
) -> u8 {
    stream
        .write_all(&publish_qos1(v, topic, packet_id, payload))
        .await
        .unwrap();
    let (first, body) = read_packet(stream).await.expect("a PUBACK");
    assert_eq!(first, 0x40, "PUBACK expected, got {first:#x}");
    assert_eq!(u16::from_be_bytes([body[0], body[1]]), packet_id);
    body.get(2).copied().unwrap_or(0)
}

/// Subscribes to one filter and returns the SUBACK's code for it.
pub async fn suback_code(
    stream: &mut (impl AsyncRead + AsyncWrite + Unpin),
    v: V,
    packet_id: u16,
    filter: &str,
) -> u8 {
    stream
        .write_all(&subscribe(v, packet_id, filter))
        .await
        .unwrap();
    let (first, body) = read_packet(stream).await.expect("a SUBACK");
    assert_eq!(first, 0x90, "SUBACK expected, got {first:#x}");
    assert_eq!(u16::from_be_bytes([body[0], body[1]]), packet_id);
    let codes = if v == V::V5 {
        &body[3 + usize::from(body[2])..]
    } else {
        &body[2..]
    };
    codes[0]
}
