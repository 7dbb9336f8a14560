//! One downstream HTTP connection: our HTTP/1.x server (`h1`), or hyper's HTTP/2 server
//! (h2 by ALPN, or h2c prior knowledge, which the HTTP/1 server recognises in the first
//! bytes and hands over), configured from the `HttpConnectionManager`, plus what hyper's
//! HTTP/2 server lacks: an idle timeout and graceful shutdown on the drain signal.

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
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::body::RequestBody;
use super::h1::{ConnIo, Exit};
use crate::{ConnInfo, Shared};

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

/// A request in flight on its HTTP/2 connection (for the idle timeout), released when
/// dropped — also when hyper drops the request future (stream reset, connection gone).
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
}

impl std::fmt::Debug for ConnCtx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnCtx")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

/// The client address as an `X-Forwarded-For` value (IPv4-mapped IPv6 as IPv4). Made once
/// per connection; IPv4 is written by hand because `Display` costs about 1,400
/// instructions through the formatting machinery (3 % of a connection-per-request).
fn ip_header(ip: IpAddr) -> HeaderValue {
    let v4 = match ip {
        IpAddr::V4(v4) => v4,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4,
            None => {
                return HeaderValue::from_str(&v6.to_string())
                    .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
            }
        },
    };
    let mut buf = [0u8; 15];
    let mut n = 0;
    for (i, o) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            buf[n] = b'.';
            n += 1;
        }
        if o >= 100 {
            buf[n] = b'0' + o / 100;
            n += 1;
        }
        if o >= 10 {
            buf[n] = b'0' + o / 10 % 10;
            n += 1;
        }
        buf[n] = b'0' + o % 10;
        n += 1;
    }
    HeaderValue::from_bytes(&buf[..n]).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// Serve one downstream connection (plaintext or already-TLS-terminated) until it closes.
///
/// HTTP/2 when `conn.alpn_h2`; else HTTP/1.x, unless the first bytes are the HTTP/2
/// preface (h2c prior knowledge). When `shutdown` becomes true: graceful shutdown (HTTP/2
/// GOAWAY, HTTP/1 close after the in-flight response). `hcm.idle_timeout` closes the
/// connection after that long without a request in flight.
pub async fn serve_connection<IO: ConnIo>(
    io: IO,
    conn: ConnInfo,
    hcm: Arc<HttpConnectionManager>,
    shared: Arc<Shared>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let alpn_h2 = conn.alpn_h2;
    let ctx = Arc::new(ConnCtx {
        peer_ip: ip_header(conn.peer.ip()),
        proto: HeaderValue::from_static(if conn.tls { "https" } else { "http" }),
        info: conn,
        hcm,
        shared,
        activity: Activity::new(),
    });
    // HTTP/2 boxed: an idle HTTP/1 connection should not carry its state around.
    if alpn_h2 {
        Box::pin(serve_h2(io, Bytes::new(), ctx, shutdown)).await;
        return;
    }
    match super::h1::serve(io, ctx.clone(), shutdown.clone(), !ctx.info.tls).await {
        Exit::Done => {}
        Exit::H2c(io, prefix) => Box::pin(serve_h2(io, prefix, ctx, shutdown)).await,
    }
}

/// hyper's HTTP/2 server on `io`, replaying `prefix` (bytes already read) first.
async fn serve_h2<IO: ConnIo>(
    io: IO,
    prefix: Bytes,
    ctx: Arc<ConnCtx>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let max_head = (ctx.hcm.max_request_headers_kb.max(1) as usize).saturating_mul(1024);
    let idle_timeout = ctx.hcm.idle_timeout.filter(|d| !d.is_zero());
    let far = Duration::from_secs(86_400 * 365);
    let idle_sleep = tokio::time::sleep(idle_timeout.unwrap_or(far));
    tokio::pin!(idle_sleep);
    let svc_ctx = ctx.clone();
    // Boxed: hyper moves each stream's future several times on its way into the task it
    // spawns for it; moving a pointer instead of the 3.6 KB pipeline state saves more than
    // the allocation costs (callgrind, docs/benchmarks.md round 4).
    let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
        Box::pin(super::service::handle(
            req.map(RequestBody::h2),
            svc_ctx.clone(),
        ))
    });
    let io = TokioIo::new(Prefixed { prefix, io });
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(max_head).unwrap_or(u32::MAX));
    let connection = builder.serve_connection(io, svc);
    drive(connection, &ctx, shutdown, idle_timeout, idle_sleep).await;
}

/// A hyper server connection that can be told to finish gracefully.
trait ServerConnection: Future<Output = Result<(), hyper::Error>> {
    fn graceful_shutdown(self: Pin<&mut Self>);
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

/// Replays bytes already read (the h2c preface) before reading on from the connection.
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    #[test]
    fn ip_header_matches_display() {
        for ip in [
            Ipv4Addr::new(0, 0, 0, 0),
            Ipv4Addr::new(127, 0, 0, 1),
            Ipv4Addr::new(255, 255, 255, 255),
            Ipv4Addr::new(10, 100, 9, 99),
            Ipv4Addr::new(192, 0, 2, 200),
        ] {
            assert_eq!(ip_header(IpAddr::V4(ip)), ip.to_string().as_str());
            let mapped = IpAddr::V6(ip.to_ipv6_mapped());
            assert_eq!(ip_header(mapped), ip.to_string().as_str());
        }
        let v6: Ipv6Addr = "2001:db8::1".parse().unwrap();
        assert_eq!(ip_header(IpAddr::V6(v6)), "2001:db8::1");
    }
}
