//! A deadline on every HTTP write: a client that stops reading (a `/stream` subscriber that
//! went away without closing, a slowloris reader) leaves the server's writes pending forever,
//! and the connection's task, its buffers and its subscription with them. Once a write has made
//! no progress for the deadline, the connection fails with `TimedOut` and poem closes it.
//!
//! This wraps the acceptor, so it covers HTTP and HTTPS alike; it must not judge requests.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use poem::http::uri::Scheme;
use poem::listener::Acceptor;
use poem::web::{LocalAddr, RemoteAddr};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// Connections of `inner`, each with a write deadline of `limit`.
#[derive(Debug)]
pub struct WriteDeadline<A> {
    inner: A,
    limit: Duration,
}

impl<A> WriteDeadline<A> {
    pub fn new(inner: A, limit: Duration) -> Self {
        Self { inner, limit }
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
}

impl<T> DeadlineIo<T> {
    fn stall(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let limit = self.limit;
        let timer = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        ready!(timer.as_mut().poll(cx));
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
        Pin::new(&mut self.inner).poll_read(cx, buf)
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
}
