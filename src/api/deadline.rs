//! Deadlines on every HTTP connection, for clients that hold the server's resources without
//! using them:
//! - writes: a client that stops reading (a `/stream` subscriber that went away without
//!   closing, a slowloris reader) leaves the server's writes pending forever, and the
//!   connection's task, its buffers and its subscription with them. Once a write has made no
//!   progress for the deadline, the connection fails with `TimedOut` and poem closes it;
//! - request heads: a client that trickles its request line and headers (a slowloris writer),
//!   or opens a connection and sends nothing, holds a connection while hyper waits. A head must
//!   be complete (its blank line read) within the head deadline of its first byte, and a new
//!   connection's first head within the deadline of its opening. Bytes after a head (a body,
//!   or the next request) start the clock again, so a keep-alive connection idle after a
//!   complete request is not timed, and one idle after a body is closed, which costs nothing.
//!   HTTP/2 (its preface) is exempt: its frames have no blank lines.
//!
//! This wraps the acceptor, after TLS, so it covers HTTP and HTTPS alike and sees the plain
//! bytes; it looks for blank lines only and never judges requests.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use poem::http::uri::Scheme;
use poem::listener::Acceptor;
use poem::web::{LocalAddr, RemoteAddr};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

use crate::metrics::Metrics;

/// Connections of `inner`, each with a write deadline of `limit` and a head deadline of
/// `head_limit`.
#[derive(Debug)]
pub struct WriteDeadline<A> {
    inner: A,
    limit: Duration,
    head_limit: Duration,
    /// Where the connections cut off are counted.
    metrics: Arc<Metrics>,
}

impl<A> WriteDeadline<A> {
    pub fn new(inner: A, limit: Duration, head_limit: Duration, metrics: Arc<Metrics>) -> Self {
        Self {
            inner,
            limit,
            head_limit,
            metrics,
        }
    }
}

impl<A: Acceptor> Acceptor for WriteDeadline<A> {
    type Io = DeadlineIo<A::Io>;

    fn local_addr(&self) -> Vec<LocalAddr> {
        self.inner.local_addr()
    }

    async fn accept(&mut self) -> io::Result<(Self::Io, LocalAddr, RemoteAddr, Scheme)> {
        let (io, local, remote, scheme) = self.inner.accept().await?;
        Ok((
            DeadlineIo {
                inner: io,
                limit: self.limit,
                stalled: None,
                head: Head::new(self.head_limit),
                metrics: Arc::clone(&self.metrics),
            },
            local,
            remote,
            scheme,
        ))
    }
}

/// One connection: reads pass through; a write or flush pending for longer than `limit`
/// without progress fails.
#[derive(Debug)]
pub struct DeadlineIo<T> {
    inner: T,
    limit: Duration,
    /// Armed when a write first found the socket full; disarmed by any progress.
    stalled: Option<Pin<Box<Sleep>>>,
    head: Head,
    metrics: Arc<Metrics>,
}

/// The HTTP/2 connection preface's first line.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n";
/// The end of a request head.
const BLANK_LINE: &[u8] = b"\r\n\r\n";

/// Where the bytes read so far leave the current request head.
#[derive(Debug)]
struct Head {
    limit: Duration,
    /// Running while a head is incomplete (from the connection's opening, or from the first
    /// byte after the last head).
    timer: Option<Pin<Box<Sleep>>>,
    /// Bytes of `BLANK_LINE` matched at the end of what was read.
    matched: usize,
    /// Bytes read on this connection, up to the preface's length.
    seen: usize,
    /// Whether those bytes are the HTTP/2 preface so far.
    preface: bool,
    /// HTTP/2: no head deadline.
    exempt: bool,
}

impl Head {
    fn new(limit: Duration) -> Self {
        Self {
            limit,
            timer: Some(Box::pin(tokio::time::sleep(limit))),
            matched: 0,
            seen: 0,
            preface: true,
            exempt: false,
        }
    }

    /// Follows `bytes`, just read.
    fn read(&mut self, bytes: &[u8]) {
        if self.exempt {
            return;
        }
        for &byte in bytes {
            if self.seen < H2_PREFACE.len() {
                self.preface &= byte == H2_PREFACE[self.seen];
                self.seen += 1;
                if self.preface && self.seen == H2_PREFACE.len() {
                    self.exempt = true;
                    self.timer = None;
                    return;
                }
            }
            if self.timer.is_none() {
                self.timer = Some(Box::pin(tokio::time::sleep(self.limit)));
            }
            self.matched = if byte == BLANK_LINE[self.matched] {
                self.matched + 1
            } else if byte == b'\r' {
                1
            } else {
                0
            };
            if self.matched == BLANK_LINE.len() {
                self.matched = 0;
                self.timer = None;
            }
        }
    }

    /// Ready with the error once an incomplete head is overdue.
    fn overdue(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let Some(timer) = self.timer.as_mut() else {
            return Poll::Pending;
        };
        ready!(timer.as_mut().poll(cx));
        // Said once: the connection ends with this error
        self.timer = None;
        Poll::Ready(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "the client sent no complete request head within {} s",
                self.limit.as_secs_f64()
            ),
        ))
    }
}

impl<T> DeadlineIo<T> {
    fn stall(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let limit = self.limit;
        let timer = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        ready!(timer.as_mut().poll(cx));
        self.stalled = None;
        self.metrics
            .http_write_timeouts
            .fetch_add(1, Ordering::Relaxed);
        Poll::Ready(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the client read nothing for {} s", limit.as_secs_f64()),
        ))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for DeadlineIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                self.head.read(&buf.filled()[before..]);
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                let overdue = self.head.overdue(cx);
                if overdue.is_ready() {
                    self.metrics
                        .http_header_timeouts
                        .fetch_add(1, Ordering::Relaxed);
                }
                overdue.map(Err)
            }
            failed => failed,
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for DeadlineIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write(cx, buf) {
            Poll::Pending => self.stall(cx).map(Err),
            done => {
                self.stalled = None;
                done
            }
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write_vectored(cx, bufs) {
            Poll::Pending => self.stall(cx).map(Err),
            done => {
                self.stalled = None;
                done
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.inner).poll_flush(cx) {
            Poll::Pending => self.stall(cx).map(Err),
            done => {
                self.stalled = None;
                done
            }
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt as _;

    use super::*;

    #[tokio::test]
    async fn a_write_the_peer_never_reads_fails_after_the_deadline_and_progress_resets_it() {
        // A pipe whose reader reads nothing: 64 bytes fit, then writes stay pending.
        let (client, mut server_end) = tokio::io::duplex(64);
        let mut io = DeadlineIo {
            inner: client,
            limit: Duration::from_millis(200),
            stalled: None,
            head: Head::new(Duration::from_secs(60)),
            metrics: Arc::default(),
        };
        io.write_all(&[0; 64]).await.unwrap();
        // Reading half of it makes room: progress, so the timer starts over.
        let mut half = [0; 32];
        tokio::io::AsyncReadExt::read_exact(&mut server_end, &mut half)
            .await
            .unwrap();
        io.write_all(&[0; 32]).await.unwrap();
        let error = io.write_all(&[0; 1]).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
    }

    fn reader(
        head_limit: Duration,
    ) -> (DeadlineIo<tokio::io::DuplexStream>, tokio::io::DuplexStream) {
        let (server_end, client) = tokio::io::duplex(1024);
        let io = DeadlineIo {
            inner: server_end,
            limit: Duration::from_secs(60),
            stalled: None,
            head: Head::new(head_limit),
            metrics: Arc::default(),
        };
        (io, client)
    }

    async fn read_some(io: &mut DeadlineIo<tokio::io::DuplexStream>) -> io::Result<usize> {
        let mut buf = [0u8; 256];
        tokio::io::AsyncReadExt::read(io, &mut buf).await
    }

    #[tokio::test]
    async fn a_head_trickled_past_the_deadline_fails_and_a_complete_one_does_not() {
        let limit = Duration::from_millis(300);
        let longer = Duration::from_millis(600);
        // A slowloris: a byte of headers every 100 ms, never the blank line.
        let (mut io, mut client) = reader(limit);
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        read_some(&mut io).await.unwrap();
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            client.write_all(b"X").await.unwrap();
            read_some(&mut io).await.unwrap();
        }
        let error = read_some(&mut io).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);

        // A whole head, split anywhere (here inside the blank line), then quiet for longer than
        // the deadline: kept, and the next request's bytes are timed again.
        let (mut io, mut client) = reader(limit);
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r")
            .await
            .unwrap();
        read_some(&mut io).await.unwrap();
        client.write_all(b"\n").await.unwrap();
        read_some(&mut io).await.unwrap();
        let quiet = tokio::time::timeout(longer, read_some(&mut io)).await;
        assert!(
            quiet.is_err(),
            "a connection idle after a complete head stays open"
        );
        client.write_all(b"GET /").await.unwrap();
        read_some(&mut io).await.unwrap();
        assert_eq!(
            read_some(&mut io).await.unwrap_err().kind(),
            io::ErrorKind::TimedOut
        );

        // A connection that sends nothing at all.
        let (mut io, _client) = reader(limit);
        assert_eq!(
            read_some(&mut io).await.unwrap_err().kind(),
            io::ErrorKind::TimedOut
        );

        // HTTP/2 prior knowledge: binary frames, no blank lines, no deadline.
        let (mut io, mut client) = reader(limit);
        client
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00")
            .await
            .unwrap();
        read_some(&mut io).await.unwrap();
        let quiet = tokio::time::timeout(longer, read_some(&mut io)).await;
        assert!(quiet.is_err(), "HTTP/2 is not timed");
    }
}
