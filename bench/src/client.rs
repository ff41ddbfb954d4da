//! Minimal clients for the two doors of sensorhub, hand-written so the load generator stays
//! small and its own cost is predictable: an HTTP/1.1 GET over one keep-alive connection, and a
//! bare MQTT 3.1.1 CONNECT that only asks whether the broker accepts clients yet.
//!
//! They implement exactly what the benchmark needs (GET, `Content-Length` or chunked bodies) and
//! nothing else; heavy HTTP load is wrk's job.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufStream};
use tokio::net::TcpStream;

/// A response: status and the whole body.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
    /// `X-Sensorhub-Source`: which store answered a latest-ten read.
    pub source: Option<String>,
}

impl Response {
    pub fn text(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(&self.body)
    }
}

/// GETs over one keep-alive connection, reconnecting when the server closed it.
#[derive(Debug)]
pub struct HttpClient {
    addr: SocketAddr,
    conn: Option<BufStream<TcpStream>>,
}

impl HttpClient {
    pub fn new(addr: SocketAddr) -> Self {
        Self { addr, conn: None }
    }

    /// One GET, bounded by `timeout`. A request on a reused connection that fails before any
    /// answer is retried once on a fresh one: the server may have closed an idle connection.
    pub async fn get(&mut self, path: &str, timeout: Duration) -> anyhow::Result<Response> {
        tokio::time::timeout(timeout, async {
            let reused = self.conn.is_some();
            match self.try_get(path).await {
                Ok(response) => Ok(response),
                Err(_) if reused => self.try_get(path).await,
                Err(e) => Err(e),
            }
        })
        .await
        .with_context(|| format!("GET {path} took longer than {timeout:?}"))?
    }

    async fn try_get(&mut self, path: &str) -> anyhow::Result<Response> {
        let mut conn = match self.conn.take() {
            Some(conn) => conn,
            None => {
                let stream = TcpStream::connect(self.addr).await?;
                stream.set_nodelay(true)?;
                BufStream::new(stream)
            }
        };
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: sensorhub-bench\r\n\r\n",
            self.addr
        );
        conn.write_all(request.as_bytes()).await?;
        conn.flush().await?;
        let (response, keep_alive) = read_response(&mut conn).await?;
        if keep_alive {
            self.conn = Some(conn);
        }
        Ok(response)
    }
}

/// Reads one HTTP/1.1 response; also says whether the connection may be reused.
pub async fn read_response<R: AsyncBufRead + Unpin>(
    reader: &mut R,
) -> anyhow::Result<(Response, bool)> {
    let mut line = String::new();
    if reader.read_line(&mut line).await? == 0 {
        bail!("the server closed the connection");
    }
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("not an HTTP status line: {line:?}"))?;
    let (mut length, mut chunked, mut keep_alive, mut source) = (None, false, true, None);
    loop {
        line.clear();
        if reader.read_line(&mut line).await? == 0 {
            bail!("the connection closed inside the headers");
        }
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        let Some((name, value)) = header.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match name.to_ascii_lowercase().as_str() {
            "content-length" => length = Some(value.parse::<usize>()?),
            "transfer-encoding" => chunked = value.eq_ignore_ascii_case("chunked"),
            "connection" => keep_alive = !value.eq_ignore_ascii_case("close"),
            "x-sensorhub-source" => source = Some(value.to_owned()),
            _ => {}
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            line.clear();
            reader.read_line(&mut line).await?;
            let size_text = line.trim().split(';').next().unwrap_or_default();
            let size = usize::from_str_radix(size_text, 16)
                .with_context(|| format!("bad chunk size {line:?}"))?;
            let start = body.len();
            body.resize(start + size, 0);
            reader.read_exact(&mut body[start..]).await?;
            line.clear();
            reader.read_line(&mut line).await?;
            if size == 0 {
                break;
            }
        }
    } else if let Some(length) = length {
        body.resize(length, 0);
        reader.read_exact(&mut body).await?;
    } else {
        reader.read_to_end(&mut body).await?;
        keep_alive = false;
    }
    let response = Response {
        status,
        body,
        source,
    };
    Ok((response, keep_alive))
}

/// Whether the broker at `addr` accepts an MQTT 3.1.1 client now (CONNACK with code 0).
/// Errors mean "not yet": refused connections, closed sockets, other return codes.
pub async fn mqtt_accepts(addr: SocketAddr, client_id: &str) -> anyhow::Result<()> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    stream.write_all(&connect_packet(client_id)?).await?;
    let mut connack = [0u8; 4];
    stream.read_exact(&mut connack).await?;
    match connack {
        [0x20, 0x02, _, 0x00] => {
            // DISCONNECT, so the broker does not log a dropped connection.
            let _ = stream.write_all(&[0xE0, 0x00]).await;
            Ok(())
        }
        other => bail!("broker answered {other:02x?} instead of CONNACK accepted"),
    }
}

/// CONNECT, MQTT 3.1.1, clean session, keep-alive 60 s.
pub(super) fn connect_packet(client_id: &str) -> anyhow::Result<Vec<u8>> {
    let id = client_id.as_bytes();
    let id_len = u16::try_from(id.len()).context("client id too long")?;
    // Variable header (10 bytes) and the length-prefixed client id; stays under 128 bytes, so
    // the remaining length fits one byte.
    let remaining = 10 + 2 + id.len();
    anyhow::ensure!(remaining < 128, "client id too long");
    let mut packet = vec![
        0x10,
        remaining as u8,
        0,
        4,
        b'M',
        b'Q',
        b'T',
        b'T',
        4,
        0x02,
        0,
        60,
    ];
    packet.extend_from_slice(&id_len.to_be_bytes());
    packet.extend_from_slice(id);
    Ok(packet)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_sized_chunked_and_closing_responses() {
        let mut sized: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\
                                  X-Sensorhub-Source: redis\r\n\r\nhelloHTTP/1.1 404";
        let (r, keep) = read_response(&mut sized).await.unwrap();
        assert_eq!(
            (r.status, r.body.as_slice(), keep, r.source.as_deref()),
            (200, &b"hello"[..], true, Some("redis"))
        );

        let mut chunked: &[u8] =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        let (r, keep) = read_response(&mut chunked).await.unwrap();
        assert_eq!((r.body.as_slice(), keep), (&b"abcde"[..], true));

        let mut closing: &[u8] = b"HTTP/1.1 503 Busy\r\nConnection: close\r\n\r\nbye";
        let (r, keep) = read_response(&mut closing).await.unwrap();
        assert_eq!(
            (r.status, r.body.as_slice(), keep),
            (503, &b"bye"[..], false)
        );

        let mut garbage: &[u8] = b"SSH-2.0\r\n\r\n";
        assert!(read_response(&mut garbage).await.is_err());
    }

    #[test]
    fn connect_packet_is_well_formed() {
        let p = connect_packet("ab").unwrap();
        assert_eq!(p[1] as usize, p.len() - 2);
        assert_eq!(&p[p.len() - 4..], &[0, 2, b'a', b'b']);
        assert!(connect_packet(&"x".repeat(200)).is_err());
    }
}
