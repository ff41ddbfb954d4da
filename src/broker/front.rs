//! The MQTT TLS listener: TLS terminated by sensorhub in front of rumqttd.
//!
//! rumqttd's own TLS (feature `use-rustls`) reads the certificate files again for every
//! connection, runs each handshake on its accept loop (one client that stalls its handshake
//! stalls every new connection), takes a client certificate's organisation, not its common
//! name, as a tenant that it prefixes to client ids, and cannot say who the client is to the
//! codec. So this front end accepts, runs the handshake in the connection's own task with a
//! deadline, reads the CONNECT's protocol level to pick the MQTT 3.1.1 or MQTT 5 listener, and
//! relays the bytes to that internal listener on loopback, after a preamble that carries the
//! client certificate's common name and the handoff key (see `capture::HandoffKey`). The
//! internal listeners run the same capture codec as the plain ones: logging, admission and
//! access control do not depend on how a device connected. It must not interpret MQTT beyond
//! the CONNECT's first bytes.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::capture::HandoffKey;
use crate::tls::{Certificates, HANDSHAKE_TIMEOUT, peer_common_name};

/// Where the front end relays connections: the internal listeners of each MQTT version.
#[derive(Clone, Debug)]
pub struct Handoff {
    pub key: HandoffKey,
    pub v4: SocketAddr,
    pub v5: SocketAddr,
}

/// Accepts TLS connections on `listener` until `stop`.
pub async fn run(
    listener: TcpListener,
    certificates: Arc<Certificates>,
    handoff: Handoff,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let connections = TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: wait, do not spin.
                    tracing::warn!(error = %e, "MQTT TLS accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stop.cancelled() => break,
        };
        let config = certificates.mqtt();
        let handoff = handoff.clone();
        connections.spawn(async move {
            if let Err(e) = relay(stream, config, &handoff).await {
                tracing::debug!(%peer, error = %e, "MQTT TLS connection ended");
            }
        });
    }
    connections.close();
    Ok(())
}

async fn relay(
    stream: TcpStream,
    config: Arc<tokio_rustls::rustls::ServerConfig>,
    handoff: &Handoff,
) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let mut tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream))
        .await
        .map_err(|_| std::io::Error::other("TLS handshake timed out"))??;
    let common_name = peer_common_name(&tls);
    let mut head = Vec::with_capacity(32);
    let level = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        loop {
            match protocol_level(&head) {
                Sniff::Level(level) => return Ok(level),
                Sniff::NotConnect => {
                    return Err(std::io::Error::other("the first packet is not a CONNECT"));
                }
                Sniff::More => {
                    if tls.read_buf(&mut head).await? == 0 {
                        return Err(std::io::Error::other("closed before CONNECT"));
                    }
                }
            }
        }
    })
    .await
    .map_err(|_| std::io::Error::other("no CONNECT in time"))??;
    let target = if level == 5 { handoff.v5 } else { handoff.v4 };
    let mut backend = TcpStream::connect(target).await?;
    backend.set_nodelay(true)?;
    let mut first = handoff.key.preamble(common_name.as_deref());
    first.extend_from_slice(&head);
    backend.write_all(&first).await?;
    tokio::io::copy_bidirectional(&mut tls, &mut backend).await?;
    Ok(())
}

#[derive(Debug, PartialEq, Eq)]
enum Sniff {
    More,
    NotConnect,
    Level(u8),
}

/// The protocol level of the CONNECT at the start of `bytes`: 4 for MQTT 3.1.1 (3 for 3.1),
/// 5 for MQTT 5.
fn protocol_level(bytes: &[u8]) -> Sniff {
    let Some(&first) = bytes.first() else {
        return Sniff::More;
    };
    if first != 0x10 {
        return Sniff::NotConnect;
    }
    let mut at = 1;
    loop {
        let Some(&byte) = bytes.get(at) else {
            return Sniff::More;
        };
        at += 1;
        if byte & 0x80 == 0 {
            break;
        }
        if at > 4 {
            return Sniff::NotConnect;
        }
    }
    let (Some(&hi), Some(&lo)) = (bytes.get(at), bytes.get(at + 1)) else {
        return Sniff::More;
    };
    let name_len = usize::from(u16::from_be_bytes([hi, lo]));
    if name_len > 6 {
        return Sniff::NotConnect;
    }
    match bytes.get(at + 2 + name_len) {
        Some(&level) => Sniff::Level(level),
        None => Sniff::More,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_protocol_level_of_a_connect() {
        // CONNECT, remaining length 16, "MQTT", level 4 ...
        let v4 = [0x10, 16, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60];
        assert_eq!(protocol_level(&v4), Sniff::Level(4));
        let mut v5 = v4;
        v5[8] = 5;
        assert_eq!(protocol_level(&v5), Sniff::Level(5));
        // A two-byte remaining length.
        let long = [0x10, 0x80, 0x01, 0, 4, b'M', b'Q', b'T', b'T', 5];
        assert_eq!(protocol_level(&long), Sniff::Level(5));
        for cut in 0..v4.len() - 3 {
            assert_eq!(protocol_level(&v4[..cut]), Sniff::More, "{cut}");
        }
        assert_eq!(protocol_level(&[0x30, 2]), Sniff::NotConnect);
        assert_eq!(protocol_level(b"GET / HTTP/1.1"), Sniff::NotConnect);
    }
}
