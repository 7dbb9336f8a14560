//! Our HTTP/1.x server connection, on `httparse`: one task per connection reads a request
//! head, runs the request pipeline (`service::handle`) while feeding it the request body,
//! writes the response, and loops for the next request (keep-alive, pipelining).
//!
//! Why not hyper's server (measured, see docs/benchmarks.md "Performance log"):
//! - memory per idle keep-alive connection: an idle connection here holds no buffer at
//!   all (the read buffer is released between requests and a plaintext socket is awaited
//!   for readiness before one is allocated) and a small task; hyper keeps 8 KiB read and
//!   write buffers and the whole service future per connection;
//! - one head parse: the smuggling checks are made on the bytes `httparse` saw, where
//!   hyper normalised duplicate lengths and both Content-Length and Transfer-Encoding
//!   away (a second parse in a guard had to catch them);
//! - CPU per request on keep-alive: no codec state machine and no body channel for a
//!   body-less request, and the response head and a small body leave in one write.
//!
//! HTTP/2 (by ALPN, or h2c prior knowledge seen in the first bytes here) stays with
//! hyper's server (`conn.rs`).

mod body;
mod head;
mod write;

use std::future::Future;
use std::mem::MaybeUninit;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::{Method, Request, StatusCode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, watch};

pub use body::{BodyError, H1Body};
use body::{Decoder, Fed, Feeder};
use head::{Framing, Head, HeadError};
use write::{ReqInfo, ResponseWriter, Written};

use super::body::{RequestBody, ResponseBody};
use super::conn::ConnCtx;
use super::error::HttpError;

/// A downstream connection's byte stream.
pub trait ConnIo: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Resolves when a read would find data (or EOF), without a buffer, so that an idle
    /// connection holds none. Streams that cannot tell (TLS) say "ready" at once.
    fn poll_read_ready(&mut self, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// Whether ending the connection needs a shutdown first (TLS: the close_notify alert).
    /// A plain socket's close sends the FIN by itself: a `shutdown` would be a syscall more
    /// per connection for nothing.
    fn shutdown_before_close(&self) -> bool {
        true
    }
}

impl ConnIo for TcpStream {
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        TcpStream::poll_read_ready(self, cx)
    }

    fn shutdown_before_close(&self) -> bool {
        false
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin + Send + 'static> ConnIo
    for tokio_rustls::server::TlsStream<IO>
{
}

/// The HTTP/2 connection preface a prior-knowledge (h2c) client starts with.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The first read of a head: a whole ordinary request head in one read.
const INITIAL_READ: usize = 4096;
/// Most of an unread request body we read and discard to keep the connection.
const DRAIN_MAX: u64 = 256 * 1024;
/// How long draining an unread body or lingering before a close may take.
const LINGER: Duration = Duration::from_secs(2);

/// How a connection left the HTTP/1 server.
pub enum Exit<IO> {
    Done,
    /// The first bytes were the HTTP/2 preface: serve HTTP/2 with these bytes first.
    H2c(IO, Bytes),
}

/// The downstream connection of an upgrade request, once its `101` has been written.
pub struct Upgraded {
    io: Box<dyn Io>,
    /// Bytes the client sent after the request head, before the switch.
    read: Bytes,
}

trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// Request extension of an upgrade request: the connection, once the response is `101`.
/// (Extensions must be `Clone`; the first `get` takes the connection.)
#[derive(Clone)]
pub struct OnUpgrade(Arc<std::sync::Mutex<Option<oneshot::Receiver<Upgraded>>>>);

impl std::fmt::Debug for OnUpgrade {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OnUpgrade")
    }
}

/// Why an upgraded connection is not there.
#[derive(Debug, thiserror::Error)]
#[error("the downstream connection was not upgraded")]
pub struct NotUpgraded;

impl OnUpgrade {
    fn new(rx: oneshot::Receiver<Upgraded>) -> Self {
        Self(Arc::new(std::sync::Mutex::new(Some(rx))))
    }

    /// The connection after the `101` has been written; an error if the response was not
    /// `101` or the connection failed first.
    pub async fn get(self) -> Result<Upgraded, NotUpgraded> {
        let rx = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        match rx {
            Some(rx) => rx.await.map_err(|_| NotUpgraded),
            None => Err(NotUpgraded),
        }
    }
}

impl AsyncRead for Upgraded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if !this.read.is_empty() {
            let n = this.read.len().min(buf.remaining());
            buf.put_slice(&this.read.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Upgraded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Settings of one connection, from its `HttpConnectionManager`.
struct Limits {
    max_head: usize,
    idle: Option<Duration>,
    headers_timeout: Option<Duration>,
}

/// What waiting for a request head gave.
#[allow(
    clippy::large_enum_variant,
    reason = "a value on the stack, moved once"
)]
enum Next {
    Head(Head),
    /// The first bytes of a head arrived (the head is not complete yet).
    Started,
    H2c,
    /// The client closed (or reset) the connection between requests.
    Closed,
    Refused(HeadError),
}

/// Serves HTTP/1.x on `io` until the connection ends. `sniff`: the first bytes may be the
/// HTTP/2 preface (plaintext without ALPN).
pub async fn serve<IO: ConnIo>(
    mut io: IO,
    ctx: Arc<ConnCtx>,
    mut shutdown: watch::Receiver<bool>,
    sniff: bool,
) -> Exit<IO> {
    let limits = Limits {
        max_head: (ctx.hcm.max_request_headers_kb.max(1) as usize).saturating_mul(1024),
        idle: ctx.hcm.idle_timeout.filter(|d| !d.is_zero()),
        headers_timeout: ctx.hcm.request_headers_timeout.filter(|d| !d.is_zero()),
    };
    let mut rbuf = BytesMut::new();
    let mut first = sniff;
    // One timer for the connection's idle timeout, re-armed lazily from `last_active`.
    let far = Duration::from_secs(86_400 * 365);
    let mut last_active = Instant::now();
    let mut idle_sleep = pin!(tokio::time::sleep(limits.idle.unwrap_or(far)));

    'conn: loop {
        if *shutdown.borrow_and_update() && rbuf.is_empty() {
            break;
        }
        // Between requests an idle connection keeps no buffer.
        if rbuf.is_empty() && rbuf.capacity() > 0 {
            rbuf = BytesMut::new();
        }
        // The request headers timeout runs from a head's first byte to its end.
        let mut head_deadline: Option<Pin<Box<tokio::time::Sleep>>> = None;
        let next = loop {
            let waiting = rbuf.is_empty();
            if !waiting
                && head_deadline.is_none()
                && let Some(t) = limits.headers_timeout
            {
                head_deadline = Some(Box::pin(tokio::time::sleep(t)));
            }
            tokio::select! {
                biased;
                next = std::future::poll_fn(|cx| {
                    poll_next(cx, &mut io, &mut rbuf, limits.max_head, &mut first, waiting)
                }) => match next {
                    Next::Started => continue,
                    next => break next,
                },
                () = drain_requested(&mut shutdown), if waiting => break 'conn,
                () = &mut idle_sleep, if waiting && limits.idle.is_some() => {
                    let idle = limits.idle.unwrap_or(far);
                    let deadline = last_active + idle;
                    if deadline <= Instant::now() {
                        tracing::debug!(peer = %ctx.info.peer, "closing idle connection");
                        break 'conn;
                    }
                    idle_sleep.as_mut().reset(deadline.into());
                }
                () = poll_deadline(head_deadline.as_mut()), if !waiting => {
                    tracing::debug!(peer = %ctx.info.peer, "request headers timed out");
                    let res = HttpError::RequestHeadersTimeout.to_response();
                    Box::pin(respond_and_close(io, res)).await;
                    return Exit::Done;
                }
            }
        };
        let head = match next {
            Next::Head(h) => h,
            Next::H2c => return Exit::H2c(io, rbuf.freeze()),
            Next::Started => continue,
            Next::Closed => return Exit::Done,
            Next::Refused(e) => {
                tracing::debug!(peer = %ctx.info.peer, error = %e, "refused request head");
                let res = match e {
                    HeadError::Bad(why) => HttpError::BadRequest(why),
                    HeadError::TooLarge => HttpError::HeadersTooLarge,
                    HeadError::Version => HttpError::VersionNotSupported,
                    HeadError::NotImplemented => HttpError::TransferCodingNotImplemented,
                }
                .to_response();
                Box::pin(respond_and_close(io, res)).await;
                return Exit::Done;
            }
        };

        match exchange(&mut io, &mut rbuf, head, &ctx, &shutdown).await {
            After::KeepAlive => last_active = Instant::now(),
            After::Close => break,
            After::Abort => return Exit::Done,
            After::Upgrade(tx) => {
                let read = rbuf.split().freeze();
                // The tunnel (service.rs) takes it from here; if it is gone, so is this.
                let _ = tx.send(Upgraded {
                    io: Box::new(io),
                    read,
                });
                return Exit::Done;
            }
        }
    }
    Box::pin(close(io)).await
}

/// What to do with the connection after an exchange.
enum After {
    KeepAlive,
    /// Close gracefully (FIN after the response).
    Close,
    /// Drop at once (the connection failed).
    Abort,
    /// The response was `101`: hand the connection to the tunnel.
    Upgrade(oneshot::Sender<Upgraded>),
}

/// One request/response exchange on the connection.
async fn exchange<IO: ConnIo>(
    io: &mut IO,
    rbuf: &mut BytesMut,
    head: Head,
    ctx: &Arc<ConnCtx>,
    shutdown: &watch::Receiver<bool>,
) -> After {
    let info = ReqInfo {
        head_method: head.method == Method::HEAD,
        version: head.version,
        keep_alive: head.keep_alive,
    };
    let (body, mut feeder) = match head.framing {
        Framing::None => (RequestBody::empty(), None),
        Framing::Length(n) => {
            let (b, f) = body::channel(Decoder::length(n), head.expect_continue);
            (RequestBody::h1(b), Some(f))
        }
        Framing::Chunked => {
            let max_trailers = (ctx.hcm.max_request_headers_kb.max(1) as usize) * 1024;
            let (b, f) = body::channel(Decoder::chunked(max_trailers), head.expect_continue);
            (RequestBody::h1(b), Some(f))
        }
    };
    let mut req = Request::new(body);
    *req.method_mut() = head.method;
    *req.uri_mut() = head.uri;
    *req.version_mut() = head.version;
    *req.headers_mut() = head.headers;
    let mut upgrade_tx = None;
    if head.upgrade {
        let (tx, rx) = oneshot::channel();
        req.extensions_mut().insert(OnUpgrade::new(rx));
        upgrade_tx = Some(tx);
    }

    // The pipeline, boxed: it is most of this connection's state while a request is in
    // flight, and need not be kept while the connection is idle.
    let mut handler = Box::pin(super::service::handle(req, ctx.clone()));
    let res = std::future::poll_fn(|cx| {
        with_body(cx, io, rbuf, &mut feeder, |cx, _| {
            handler.as_mut().poll(cx).map(|r| match r {
                Ok(res) => res,
                Err(never) => match never {},
            })
        })
    })
    .await;
    drop(handler);

    // A client still waiting for `100 Continue` will not send its body: we cannot tell
    // where the next request starts, so this one is the last.
    let unsent_body = feeder.as_ref().is_some_and(Feeder::continue_pending);
    // A body that broke its framing is the client's fault, whatever the upstream said
    // about the part it got (a 502, usually): 400, and this connection is done.
    let malformed = feeder.as_ref().and_then(Feeder::outcome) == Some(Fed::Malformed);
    let res = if malformed {
        HttpError::BadRequest("malformed request body").to_response()
    } else {
        res
    };
    let draining = *shutdown.borrow();
    let switching = res.status() == StatusCode::SWITCHING_PROTOCOLS && upgrade_tx.is_some();
    let mut writer = ResponseWriter::new(res, info, draining || unsent_body);
    let written = std::future::poll_fn(|cx| {
        with_body(cx, io, rbuf, &mut feeder, |cx, io| {
            writer.poll_write(cx, io)
        })
    })
    .await;
    match written {
        Written::Failed => {
            if let Some(f) = feeder.as_mut() {
                f.abort();
            }
            After::Abort
        }
        Written::Done { .. } if switching => match upgrade_tx {
            Some(tx) => After::Upgrade(tx),
            None => After::Close,
        },
        Written::Done { close } => {
            let Some(mut f) = feeder else {
                return if close {
                    After::Close
                } else {
                    After::KeepAlive
                };
            };
            match f.outcome() {
                Some(Fed::Complete) if !close => After::KeepAlive,
                Some(Fed::Complete) => After::Close,
                Some(Fed::Failed) => After::Abort,
                Some(Fed::Malformed) => After::Close,
                None | Some(Fed::Abandoned) if close || unsent_body => {
                    f.abort();
                    After::Close
                }
                None | Some(Fed::Abandoned) => {
                    // Read the rest of the body and throw it away, to keep the connection
                    // (within limits; else close).
                    if f.decoder.remaining().is_some_and(|n| n > DRAIN_MAX) {
                        f.abort();
                        return After::Close;
                    }
                    // Boxed: a cold path, kept out of the connection's resident state.
                    let drained = Box::pin(tokio::time::timeout(
                        LINGER,
                        discard(io, rbuf, &mut f.decoder),
                    ));
                    match drained.await {
                        Ok(true) => After::KeepAlive,
                        _ => {
                            f.abort();
                            After::Close
                        }
                    }
                }
            }
        }
    }
}

/// Polls `step` (the request pipeline, then the response writer) and serves the request
/// body's demand in between, until `step` is ready. The body's consumer may run in this
/// task (an HTTP/1.1 upstream): after each frame handed over, `step` is polled again.
fn with_body<IO: ConnIo, T>(
    cx: &mut Context<'_>,
    io: &mut IO,
    rbuf: &mut BytesMut,
    feeder: &mut Option<Feeder>,
    mut step: impl FnMut(&mut Context<'_>, &mut IO) -> Poll<T>,
) -> Poll<T> {
    loop {
        if let Poll::Ready(t) = step(cx, io) {
            return Poll::Ready(t);
        }
        let Some(f) = feeder.as_mut() else {
            return Poll::Pending;
        };
        let _ = f.poll_feed(cx, io, rbuf);
        if !f.take_delivered() {
            return Poll::Pending;
        }
    }
}

/// Reads the rest of a request body off the connection, discarding it: true when it
/// ended within [`DRAIN_MAX`] bytes.
async fn discard<IO: ConnIo>(io: &mut IO, rbuf: &mut BytesMut, decoder: &mut Decoder) -> bool {
    let mut seen = 0u64;
    loop {
        match decoder.decode(rbuf) {
            Ok(body::Decoded::Data(d)) => {
                seen += d.len() as u64;
                if seen > DRAIN_MAX {
                    return false;
                }
            }
            Ok(body::Decoded::End(_)) => return true,
            Ok(body::Decoded::NeedMore) => {
                rbuf.reserve(INITIAL_READ);
                match io.read_buf(rbuf).await {
                    Ok(0) | Err(_) => return false,
                    Ok(_) => {}
                }
            }
            Err(_) => return false,
        }
    }
}

/// Reads and parses until a request head is complete (or the connection ends).
fn poll_next<IO: ConnIo>(
    cx: &mut Context<'_>,
    io: &mut IO,
    rbuf: &mut BytesMut,
    max_head: usize,
    first: &mut bool,
    waiting: bool,
) -> Poll<Next> {
    loop {
        if !rbuf.is_empty() {
            if *first {
                let n = rbuf.len().min(H2_PREFACE.len());
                if rbuf.get(..n) == H2_PREFACE.get(..n) {
                    if n == H2_PREFACE.len() {
                        return Poll::Ready(Next::H2c);
                    }
                } else {
                    *first = false;
                }
            }
            if !*first {
                match head::parse(rbuf, max_head) {
                    Ok(Some(h)) => return Poll::Ready(Next::Head(h)),
                    Ok(None) => {}
                    Err(e) => return Poll::Ready(Next::Refused(e)),
                }
            }
            if waiting {
                return Poll::Ready(Next::Started);
            }
        } else if let Err(e) = std::task::ready!(io.poll_read_ready(cx)) {
            tracing::debug!(error = %e, "downstream connection");
            return Poll::Ready(Next::Closed);
        }
        if rbuf.is_empty() {
            // A new head: read on the stack and keep only what came (one small
            // allocation, no buffer of the read size per request).
            let mut stack = [const { MaybeUninit::<u8>::uninit() }; INITIAL_READ];
            let mut read = ReadBuf::uninit(&mut stack);
            match std::task::ready!(Pin::new(&mut *io).poll_read(cx, &mut read)) {
                Ok(()) if read.filled().is_empty() => return Poll::Ready(Next::Closed),
                Ok(()) => rbuf.extend_from_slice(read.filled()),
                Err(e) => {
                    tracing::debug!(error = %e, "downstream connection");
                    return Poll::Ready(Next::Closed);
                }
            }
            continue;
        }
        if rbuf.capacity() - rbuf.len() < 512 {
            let grow = rbuf.len().max(INITIAL_READ);
            rbuf.reserve(grow);
        }
        match std::task::ready!(tokio_util::io::poll_read_buf(Pin::new(&mut *io), cx, rbuf)) {
            Ok(0) => return Poll::Ready(Next::Closed),
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(error = %e, "downstream connection");
                return Poll::Ready(Next::Closed);
            }
        }
    }
}

/// Resolves when a drain is requested; never if the sender is gone.
async fn drain_requested(shutdown: &mut watch::Receiver<bool>) {
    loop {
        if shutdown.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
        if *shutdown.borrow_and_update() {
            return;
        }
    }
}

async fn poll_deadline(sleep: Option<&mut Pin<Box<tokio::time::Sleep>>>) {
    match sleep {
        Some(s) => s.as_mut().await,
        None => std::future::pending().await,
    }
}

/// Ends the connection after our last response: FIN (and TLS close_notify).
async fn close<IO: ConnIo>(mut io: IO) -> Exit<IO> {
    if io.shutdown_before_close() {
        let _ = tokio::time::timeout(LINGER, io.shutdown()).await;
    }
    Exit::Done
}

/// Writes a local error response and closes, lingering: the client may still be sending
/// (a huge header block, a body), and closing with unread data would reset the connection
/// and could destroy the response before the client reads it.
async fn respond_and_close<IO: ConnIo>(mut io: IO, res: http::Response<ResponseBody>) {
    let info = ReqInfo {
        head_method: false,
        version: http::Version::HTTP_11,
        keep_alive: false,
    };
    let mut writer = ResponseWriter::new(res, info, true);
    if std::future::poll_fn(|cx| writer.poll_write(cx, &mut io)).await == Written::Failed {
        return;
    }
    let _ = tokio::time::timeout(LINGER, async {
        io.shutdown().await?;
        let mut sink = vec![0u8; 8192];
        let mut total = 0usize;
        loop {
            let n = io.read(&mut sink).await?;
            total += n;
            if n == 0 || total > 1024 * 1024 {
                return Ok::<(), std::io::Error>(());
            }
        }
    })
    .await;
}
