//! Connections: at most `--max-connections` open at once (more are closed as soon as they
//! are accepted), and hyper's settings that bound a connection in time and size.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum_server::accept::{Accept, DefaultAcceptor};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::metrics::Metrics;
use super::Limits;

/// An acceptor that holds one of `max` permits for each connection's whole life.
#[derive(Clone, Debug)]
pub(crate) struct Capped {
    permits: Arc<Semaphore>,
    metrics: Arc<Metrics>,
}

impl Capped {
    pub(crate) fn new(max: usize, metrics: Arc<Metrics>) -> Capped {
        Capped {
            permits: Arc::new(Semaphore::new(max.min(Semaphore::MAX_PERMITS))),
            metrics,
        }
    }
}

/// A connection's stream and its permit (given back when the connection ends).
#[derive(Debug)]
pub(crate) struct Held<S> {
    inner: S,
    _permit: OwnedSemaphorePermit,
}

impl<I, S> Accept<I, S> for Capped
where
    I: Send + 'static,
    S: Send + 'static,
{
    type Stream = Held<I>;
    type Service = S;
    type Future = Pin<Box<dyn Future<Output = io::Result<(Held<I>, S)>> + Send>>;

    fn accept(&self, stream: I, service: S) -> Self::Future {
        let permit = self.permits.clone().try_acquire_owned();
        if permit.is_err() {
            self.metrics.connection_refused();
        }
        let accepted = DefaultAcceptor::new().accept(stream, service);
        Box::pin(async move {
            let permit = permit.map_err(|_| io::Error::other("the connection limit is reached"))?;
            let (stream, service) = accepted.await?;
            Ok((
                Held {
                    inner: stream,
                    _permit: permit,
                },
                service,
            ))
        })
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Held<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Held<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// hyper's bounds: the header read timeout (axum-server turns hyper's off; it also closes
/// an idle keep-alive connection, since hyper starts it when it waits for the next
/// request), header count and size, and HTTP/2's streams, header list and keep-alive pings.
pub(crate) fn configure<A>(
    server: &mut axum_server::Server<std::net::SocketAddr, A>,
    limits: &Limits,
    heartbeat: Duration,
) {
    let builder = server.http_builder();
    builder
        .http1()
        .header_read_timeout(Duration::from_secs(limits.header_timeout))
        .max_headers(64)
        .max_buf_size(64 * 1024);
    builder
        .http2()
        .max_concurrent_streams(64)
        .max_header_list_size(16 * 1024)
        .keep_alive_interval(Some(heartbeat))
        .keep_alive_timeout(Duration::from_secs(limits.ws_pong_timeout.max(1)));
}
