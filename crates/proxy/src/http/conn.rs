//! One downstream HTTP connection: hyper's HTTP/1.1 or HTTP/2 server (h2 by ALPN, or h2c
//! prior knowledge told apart from HTTP/1.1 by the first bytes), configured from the
//! `HttpConnectionManager`, plus what hyper lacks: an idle timeout for keep-alive
//! connections, the HTTP/1 framing guard, and graceful shutdown on the drain signal.

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use biplane_config::HttpConnectionManager;
use bytes::{Buf, Bytes};
use http::HeaderValue;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

use super::guard::{GuardShared, GuardedIo};
use crate::{ConnInfo, Shared};

/// hyper's smallest allowed HTTP/1 read buffer.
const MIN_H1_BUF: usize = 8192;

/// When the connection last did something, and how many requests are in flight.
#[derive(Debug)]
pub struct Activity {
    epoch: Instant,
    inflight: AtomicUsize,
    /// Milliseconds since `epoch` of the last request start or end.
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            epoch: Instant::now(),
            inflight: AtomicUsize::new(0),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        self.last_ms
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    pub fn request_started(&self) {
        self.inflight.fetch_add(1, Ordering::Relaxed);
        self.touch();
    }

    pub fn request_done(&self) {
        self.inflight.fetch_sub(1, Ordering::Relaxed);
        self.touch();
    }

    /// When the connection becomes idle-expired, if nothing happens meanwhile; `None` while
    /// a request is in flight.
    fn idle_deadline(&self, idle: Duration) -> Option<Instant> {
        if self.inflight.load(Ordering::Relaxed) > 0 {
            return None;
        }
        Some(self.epoch + Duration::from_millis(self.last_ms.load(Ordering::Relaxed)) + idle)
    }
}

/// A request in flight on its connection (for the idle timeout), released when dropped —
/// also when hyper drops the request future (client reset, connection gone).
#[derive(Debug)]
pub struct InFlight(Arc<ConnCtx>);

impl InFlight {
    pub fn start(ctx: Arc<ConnCtx>) -> Self {
        ctx.activity.request_started();
        Self(ctx)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.activity.request_done();
    }
}

/// Per-connection context shared by its requests.
pub struct ConnCtx {
    pub info: ConnInfo,
    pub hcm: Arc<HttpConnectionManager>,
    pub shared: Arc<Shared>,
    /// The peer IP, formatted once for `x-forwarded-for`.
    pub peer_ip: HeaderValue,
    /// `http` or `https`, for `x-forwarded-proto` and redirects.
    pub proto: HeaderValue,
    pub activity: Activity,
    pub guard: Arc<GuardShared>,
    /// Index of the next HTTP/1 request (matches the guard's numbering).
    pub h1_seq: AtomicU64,
}

impl std::fmt::Debug for ConnCtx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnCtx")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

fn ip_header(ip: IpAddr) -> HeaderValue {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    HeaderValue::from_str(&ip.to_string()).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// Serve one downstream connection (plaintext or already-TLS-terminated) until it closes.
///
/// HTTP/2 when `conn.alpn_h2`, else auto-detection of h2c prior knowledge vs HTTP/1.1.
/// When `shutdown` becomes true: graceful shutdown (HTTP/2 GOAWAY, HTTP/1 close after the
/// in-flight response). `hcm.idle_timeout` closes the connection after that long without
/// a request in flight.
pub async fn serve_connection<IO>(
    io: IO,
    conn: ConnInfo,
    hcm: Arc<HttpConnectionManager>,
    shared: Arc<Shared>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let max_head = (hcm.max_request_headers_kb.max(1) as usize).saturating_mul(1024);
    let guard = Arc::new(GuardShared::default());
    let io = GuardedIo::new(io, guard.clone(), max_head, !conn.alpn_h2);
    let alpn_h2 = conn.alpn_h2;
    let idle_timeout = hcm.idle_timeout.filter(|d| !d.is_zero());
    let ctx = Arc::new(ConnCtx {
        peer_ip: ip_header(conn.peer.ip()),
        proto: HeaderValue::from_static(if conn.tls { "https" } else { "http" }),
        info: conn,
        hcm: hcm.clone(),
        shared,
        activity: Activity::new(),
        guard,
        h1_seq: AtomicU64::new(0),
    });

    let svc_ctx = ctx.clone();
    let svc = service_fn(move |req| super::service::handle(req, svc_ctx.clone()));
    let far = Duration::from_secs(86_400 * 365);
    let idle_sleep = tokio::time::sleep(idle_timeout.unwrap_or(far));
    tokio::pin!(idle_sleep);

    // HTTP/1.1 or h2c prior knowledge: decided on the first bytes, read here with a full
    // buffer and replayed to hyper (one read, where hyper-util's auto server read the
    // 24-byte preface length first and then the rest: a syscall more per connection).
    let mut io = io;
    let (h2, prefix) = if alpn_h2 {
        (true, Bytes::new())
    } else {
        if *shutdown.borrow_and_update() {
            return;
        }
        tokio::select! {
            sniffed = sniff(&mut io) => match sniffed {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(peer = %ctx.info.peer, error = %e, "downstream connection ended with error");
                    return;
                }
            },
            // A connection that has sent nothing yet is closed at once on drain, or when
            // idle for the idle timeout.
            () = drain_requested(&mut shutdown) => return,
            () = &mut idle_sleep, if idle_timeout.is_some() => return,
        }
    };
    let io = TokioIo::new(Prefixed { prefix, io });
    if h2 {
        let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(max_head).unwrap_or(u32::MAX));
        let connection = builder.serve_connection(io, svc);
        drive(connection, &ctx, shutdown, idle_timeout, idle_sleep).await;
    } else {
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(hcm.request_headers_timeout.filter(|d| !d.is_zero()))
            .max_buf_size(max_head.max(MIN_H1_BUF))
            .keep_alive(true);
        let connection = builder.serve_connection(io, svc).with_upgrades();
        drive(connection, &ctx, shutdown, idle_timeout, idle_sleep).await;
    }
}

/// A hyper server connection that can be told to finish gracefully.
trait ServerConnection: Future<Output = Result<(), hyper::Error>> {
    fn graceful_shutdown(self: Pin<&mut Self>);
}

impl<I, S, B> ServerConnection for hyper::server::conn::http1::UpgradeableConnection<I, S>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn graceful_shutdown(self: Pin<&mut Self>) {
        hyper::server::conn::http1::UpgradeableConnection::graceful_shutdown(self);
    }
}

impl<I, S, B> ServerConnection for hyper::server::conn::http2::Connection<I, S, TokioExecutor>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    TokioExecutor: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    fn graceful_shutdown(self: Pin<&mut Self>) {
        hyper::server::conn::http2::Connection::graceful_shutdown(self);
    }
}

/// Runs a server connection to its end, starting a graceful shutdown on drain or after the
/// idle timeout without a request in flight.
async fn drive<C: ServerConnection>(
    connection: C,
    ctx: &ConnCtx,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
    idle_timeout: Option<Duration>,
    mut idle_sleep: Pin<&mut tokio::time::Sleep>,
) {
    tokio::pin!(connection);
    let mut draining = false;
    let mut watch_shutdown = true;
    if *shutdown.borrow_and_update() {
        connection.as_mut().graceful_shutdown();
        draining = true;
    }
    let far = Duration::from_secs(86_400 * 365);
    loop {
        tokio::select! {
            res = connection.as_mut() => {
                if let Err(e) = res {
                    tracing::debug!(peer = %ctx.info.peer, error = %e, "downstream connection ended with error");
                }
                break;
            }
            changed = shutdown.changed(), if watch_shutdown && !draining => {
                match changed {
                    Ok(()) if *shutdown.borrow_and_update() => {
                        connection.as_mut().graceful_shutdown();
                        draining = true;
                    }
                    Ok(()) => {}
                    // The sender is gone: nobody can ask us to drain any more.
                    Err(_) => watch_shutdown = false,
                }
            }
            () = &mut idle_sleep, if idle_timeout.is_some() && !draining => {
                let idle = idle_timeout.unwrap_or(far);
                match ctx.activity.idle_deadline(idle) {
                    Some(deadline) if deadline <= Instant::now() => {
                        connection.as_mut().graceful_shutdown();
                        draining = true;
                    }
                    Some(deadline) => idle_sleep.as_mut().reset(deadline.into()),
                    // Busy: look again one idle period later.
                    None => idle_sleep.as_mut().reset((Instant::now() + idle).into()),
                }
            }
        }
    }
}

/// Resolves when a drain is requested; never if the sender is gone.
async fn drain_requested(shutdown: &mut tokio::sync::watch::Receiver<bool>) {
    loop {
        if shutdown.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
        if *shutdown.borrow_and_update() {
            return;
        }
    }
}

/// The HTTP/2 connection preface a prior-knowledge (h2c) client starts with.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The first read's size: a whole ordinary request head in one read.
const SNIFF_BUF: usize = 2048;

/// Reads the first bytes of a connection (until they tell the protocol: usually one read)
/// and says whether they start the HTTP/2 preface. Returns the bytes read, for hyper.
async fn sniff<IO: AsyncRead + Unpin>(io: &mut IO) -> std::io::Result<(bool, Bytes)> {
    let mut buf = [0u8; SNIFF_BUF];
    let mut n = 0;
    loop {
        let read = io.read(&mut buf[n..]).await?;
        n += read;
        let seen = &buf[..n];
        let common = seen.len().min(H2_PREFACE.len());
        if read == 0 || seen[..common] != H2_PREFACE[..common] {
            // EOF (hyper sees it next), or not the preface: HTTP/1.x.
            return Ok((false, Bytes::copy_from_slice(seen)));
        }
        if common == H2_PREFACE.len() {
            return Ok((true, Bytes::copy_from_slice(seen)));
        }
    }
}

/// Replays the sniffed bytes before reading on from the connection.
struct Prefixed<IO> {
    prefix: Bytes,
    io: IO,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Prefixed<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.prefix.has_remaining() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return std::task::Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Prefixed<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}
