//! One downstream HTTP connection: hyper's auto (HTTP/1.1 + h2/h2c) server, configured from
//! the `HttpConnectionManager`, plus what hyper lacks: an idle timeout for keep-alive
//! connections, the HTTP/1 framing guard, and graceful shutdown on the drain signal.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use biplane_config::HttpConnectionManager;
use http::HeaderValue;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;

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

    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(hcm.request_headers_timeout.filter(|d| !d.is_zero()))
        .max_buf_size(max_head.max(MIN_H1_BUF))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(max_head).unwrap_or(u32::MAX));
    if alpn_h2 {
        builder = builder.http2_only();
    }

    let svc_ctx = ctx.clone();
    let svc = service_fn(move |req| super::service::handle(req, svc_ctx.clone()));
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    tokio::pin!(connection);

    let mut draining = false;
    let mut watch_shutdown = true;
    if *shutdown.borrow_and_update() {
        connection.as_mut().graceful_shutdown();
        draining = true;
    }
    let far = Duration::from_secs(86_400 * 365);
    let idle_sleep = tokio::time::sleep(idle_timeout.unwrap_or(far));
    tokio::pin!(idle_sleep);
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
