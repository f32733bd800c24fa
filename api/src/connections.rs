//! What a client may hold of the api, and for how long:
//! - at most `API_MAX_CONNECTIONS` connections at once; one past it is
//!   closed as soon as it is accepted, before anything is read;
//! - a new connection's first request (its TLS handshake, then its
//!   headers) within `API_HEADER_TIMEOUT_SECONDS`;
//! - a kept-alive HTTP/1.1 connection's next request headers within
//!   `API_IDLE_TIMEOUT_SECONDS` of the answer before, and any connection
//!   that moves no byte either way for as long is closed (HTTP/2 left
//!   open, an answer its client does not read). Longer than the header
//!   limit: a load balancer keeps its connections to the api open (60 s is
//!   common), and one the api closed under it is a 502 for its client;
//! - a request body that sends nothing for `API_BODY_STALL_SECONDS` is
//!   answered 408 `body_timeout` (however slowly its bytes trickle, the
//!   route's time limit bounds it).
//!
//! A slow or idle client past these holds nothing.

use std::future::{Ready, ready};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, HttpBody as _};
use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use axum_server::accept::Accept;
use futures_util::StreamExt as _;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

use crate::state::Edge;

/// An axum-server for `listener` with the edge's time limits.
pub(crate) fn server(
    listener: tokio::net::TcpListener,
    edge: &Edge,
) -> io::Result<axum_server::Server<std::net::SocketAddr>> {
    let mut server = axum_server::from_tcp(listener.into_std()?)?.first_request_timeout(edge.header_timeout);
    // hyper's header timeout runs from the end of the answer before, the
    // wait for the next request included: the idle limit. (axum-server
    // gives HTTP/1 a timer but turns this off.)
    server.http_builder().http1().header_read_timeout(edge.idle_timeout);
    Ok(server)
}

/// The acceptor that counts connections against `API_MAX_CONNECTIONS` and
/// closes those idle past `API_IDLE_TIMEOUT_SECONDS` (under TLS it is the
/// inner acceptor: the handshake is counted too).
#[derive(Clone)]
pub(crate) struct Limited {
    permits: Arc<Semaphore>,
    idle: Duration,
}

impl Limited {
    pub(crate) fn new(edge: &Edge) -> Self {
        Self { permits: Arc::new(Semaphore::new(edge.max_connections)), idle: edge.idle_timeout }
    }
}

impl<S> Accept<TcpStream, S> for Limited {
    type Stream = Held<TcpStream>;
    type Service = S;
    type Future = Ready<io::Result<(Held<TcpStream>, S)>>;

    fn accept(&self, stream: TcpStream, service: S) -> Self::Future {
        let Ok(permit) = Arc::clone(&self.permits).try_acquire_owned() else {
            // Dropped unread: the client sees the connection closed and may
            // try again; a refusal costs no task, buffer or timer.
            metrics::counter!("clinflow_http_connections_refused_total").increment(1);
            return ready(Err(io::Error::other("API_MAX_CONNECTIONS reached")));
        };
        metrics::gauge!("clinflow_http_connections").increment(1.0);
        ready(Ok((Held::new(stream, permit, self.idle), service)))
    }
}

/// A connection holding its place under the limit, closed (an I/O error)
/// once no byte has moved either way for `idle`.
pub(crate) struct Held<S> {
    inner: S,
    _permit: OwnedSemaphorePermit,
    idle: Duration,
    last_active: Instant,
    timer: Pin<Box<Sleep>>,
}

impl<S> Held<S> {
    fn new(inner: S, permit: OwnedSemaphorePermit, idle: Duration) -> Self {
        let now = Instant::now();
        Self { inner, _permit: permit, idle, last_active: now, timer: Box::pin(tokio::time::sleep_until(now + idle)) }
    }

    /// On a pending read or write: an error once idle for too long, else
    /// the timer set to wake the task at the deadline. The timer is moved
    /// only when it fires, not on every byte.
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        loop {
            if self.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let deadline = self.last_active + self.idle;
            if Instant::now() >= deadline {
                metrics::counter!("clinflow_http_connections_idle_closed_total").increment(1);
                return Poll::Ready(io::Error::new(io::ErrorKind::TimedOut, "API_IDLE_TIMEOUT_SECONDS passed"));
            }
            self.timer.as_mut().reset(deadline);
        }
    }

    fn on<T>(&mut self, cx: &mut Context<'_>, polled: Poll<io::Result<T>>, moved: bool) -> Poll<io::Result<T>> {
        match polled {
            Poll::Ready(result) => {
                if moved {
                    self.last_active = Instant::now();
                }
                Poll::Ready(result)
            }
            Poll::Pending => self.poll_idle(cx).map(Err),
        }
    }
}

impl<S> Drop for Held<S> {
    fn drop(&mut self) {
        metrics::gauge!("clinflow_http_connections").decrement(1.0);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Held<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        let moved = buf.filled().len() > before;
        this.on(cx, polled, moved)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Held<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        let moved = matches!(polled, Poll::Ready(Ok(n)) if n > 0);
        this.on(cx, polled, moved)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        let moved = matches!(polled, Poll::Ready(Ok(n)) if n > 0);
        this.on(cx, polled, moved)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_flush(cx);
        this.on(cx, polled, false)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// A request body that sent nothing for `API_BODY_STALL_SECONDS`: the
/// extractors and the batch reader answer it 408 `body_timeout`.
#[derive(Debug, thiserror::Error)]
#[error("the request body sent nothing for API_BODY_STALL_SECONDS")]
pub(crate) struct BodyStalled;

/// Whether reading a body failed because it stalled.
pub(crate) fn stalled(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(error);
    while let Some(e) = source {
        if e.is::<BodyStalled>() {
            return true;
        }
        source = e.source();
    }
    false
}

/// The request's body, failing with [`BodyStalled`] when no byte of it
/// arrives for `stall`. (The route's time limit bounds the whole request,
/// however slowly its bytes trickle.)
pub(crate) async fn limit_body_stalls(stall: Duration, req: Request, next: Next) -> Response {
    if req.body().is_end_stream() {
        return next.run(req).await;
    }
    next.run(req.map(|body| watched(body, stall))).await
}

fn watched(body: Body, stall: Duration) -> Body {
    let chunks = futures_util::stream::unfold(Some(body.into_data_stream()), move |chunks| async move {
        let mut chunks = chunks?;
        match tokio::time::timeout(stall, chunks.next()).await {
            Ok(Some(Ok(bytes))) => Some((Ok(bytes), Some(chunks))),
            Ok(Some(Err(e))) => Some((Err(axum::BoxError::from(e)), None)),
            Ok(None) => None,
            Err(_) => Some((Err(axum::BoxError::from(BodyStalled)), None)),
        }
    });
    Body::from_stream(chunks)
}
