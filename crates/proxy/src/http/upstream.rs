//! Upstream side: a compiled cluster ([`ClusterState`]: endpoints, balancer, connection
//! pool) and the connector that dials the picked endpoint.
//!
//! HTTP/1.1 clusters keep their own pool of idle keep-alive connections per endpoint
//! ([`H1Pool`]): `hyper::client::conn::http1` connections that are *not* spawned as tasks.
//! The request's task drives its upstream connection itself — while sending the request,
//! then through the response body ([`UpstreamBody`]) — and puts it back into the pool when
//! the response is over. So an upstream exchange costs no task wake-ups, no channel hop to a
//! connection task and no checkout future (what hyper-util's legacy client does). The
//! downstream `Host` travels in the `Host` header; the URI is origin-form. HTTP/2 clusters
//! (prior knowledge, e.g. gRPC) keep one multiplexed connection per endpoint here, so
//! `:authority` is the downstream authority.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::Authority;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper::client::conn::http2::SendRequest;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::net::TcpStream;

use super::body::RequestBody;
use crate::lb::{Balancer, LbEndpoint, LoadGuard};
use crate::metrics::{ClusterLabels, Metrics};

/// Default for `Cluster.idle_timeout` when unset.
const DEFAULT_POOL_IDLE: Duration = Duration::from_secs(60);
/// Idle HTTP/1.1 connections kept per endpoint at most; more are closed when released.
const MAX_IDLE_PER_ENDPOINT: usize = 1024;

/// Why dialing an endpoint failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect to {addr} timed out after {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
    #[error("connect to {addr}: {source}")]
    Io {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("bad upstream address {0}")]
    BadAddress(String),
}

/// Per-cluster metric handles, resolved at compile time.
#[derive(Debug, Clone)]
pub struct ClusterStats {
    pub connections_active: Gauge,
    pub connect_failures: Counter,
    pub timeouts: Counter,
}

impl ClusterStats {
    fn new(metrics: &Metrics, name: &str) -> Self {
        let l = ClusterLabels {
            cluster: name.to_owned(),
        };
        Self {
            connections_active: metrics
                .upstream_connections_active
                .get_or_create(&l)
                .clone(),
            connect_failures: metrics.upstream_connect_failures.get_or_create(&l).clone(),
            timeouts: metrics.upstream_requests_timeout.get_or_create(&l).clone(),
        }
    }
}

#[derive(Debug)]
pub(crate) struct UpEndpoint {
    /// Position in the cluster's endpoint list.
    pub idx: usize,
    pub addr: SocketAddr,
    /// `addr` as a URI authority (the HTTP/2 `:authority` fallback), built once.
    pub authority: Authority,
}

/// A compiled cluster: endpoints, balancer, connection pool. Shared (`Arc`) by every
/// snapshot in which the cluster is unchanged, so pools and balancer state survive swaps.
pub struct ClusterState {
    config: biplane_config::Cluster,
    name: Arc<str>,
    pub(crate) endpoints: Box<[UpEndpoint]>,
    balancer: Balancer,
    pool: Pool,
    pub(crate) stats: ClusterStats,
}

/// Connection pools: our keep-alive pool for HTTP/1.1; for HTTP/2 one multiplexed
/// connection per endpoint, owned here so that the request URI can carry the downstream
/// authority (`:authority`) rather than the endpoint address.
enum Pool {
    H1(Arc<H1Pool>),
    H2 {
        slots: Box<[H2Slot]>,
        connector: Arc<ConnectorInner>,
        /// A connection with no exchange for this long is closed by its task.
        idle_timeout: Duration,
    },
}

#[derive(Default)]
struct H2Slot {
    conn: std::sync::Mutex<Option<H2Conn>>,
    /// Serialises dialing so that a burst of requests opens one connection.
    dialing: tokio::sync::Mutex<()>,
}

/// An endpoint's shared HTTP/2 connection.
#[derive(Clone)]
struct H2Conn {
    sender: SendRequest<RequestBody>,
    usage: Arc<H2Usage>,
}

/// Exchanges in flight on an HTTP/2 connection and since when it has had none. The
/// connection's task retires it after the idle timeout with none in flight; a request
/// takes the connection only while it is not retired, so no exchange is cut off.
struct H2Usage {
    /// Exchanges in flight, or [`H2_RETIRED`].
    in_flight: AtomicUsize,
    born: Instant,
    /// Milliseconds after `born` when the last exchange ended.
    idle_since_ms: AtomicU64,
}

const H2_RETIRED: usize = usize::MAX;

impl H2Usage {
    /// A new connection's usage, with the exchange that dialed it counted.
    fn new_with_one() -> (Arc<Self>, H2InFlight) {
        let usage = Arc::new(H2Usage {
            in_flight: AtomicUsize::new(1),
            born: Instant::now(),
            idle_since_ms: AtomicU64::new(0),
        });
        (usage.clone(), H2InFlight(usage))
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Counts one exchange, unless the connection is retired.
    fn acquire(self: &Arc<Self>) -> Option<H2InFlight> {
        self.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n != H2_RETIRED).then_some(n + 1)
            })
            .ok()?;
        Some(H2InFlight(self.clone()))
    }

    /// Retires the connection if it has had no exchange for `idle`; afterwards no
    /// request can take it.
    fn retire_if_idle(&self, idle: Duration) -> bool {
        if self.in_flight.load(Ordering::Acquire) != 0 {
            return false;
        }
        let idle_for = self
            .now_ms()
            .saturating_sub(self.idle_since_ms.load(Ordering::Acquire));
        u128::from(idle_for) >= idle.as_millis()
            && self
                .in_flight
                .compare_exchange(0, H2_RETIRED, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
    }
}

/// One exchange on an HTTP/2 connection, in flight until dropped (with the response
/// body, or with the error).
struct H2InFlight(Arc<H2Usage>);

impl Drop for H2InFlight {
    fn drop(&mut self) {
        // The time first: the task reads it only once the count is zero.
        self.0
            .idle_since_ms
            .store(self.0.now_ms(), Ordering::Release);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl H2Slot {
    fn lock(&self) -> MutexGuard<'_, Option<H2Conn>> {
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The endpoint's connection for one exchange, if it is open and not retired.
    fn take(&self) -> Option<(SendRequest<RequestBody>, H2InFlight)> {
        let g = self.lock();
        let c = g.as_ref().filter(|c| !c.sender.is_closed())?;
        let in_flight = c.usage.acquire()?;
        Some((c.sender.clone(), in_flight))
    }

    /// The endpoint's open connection (to hand over to a new cluster state).
    fn cached(&self) -> Option<H2Conn> {
        self.lock()
            .as_ref()
            .filter(|c| {
                !c.sender.is_closed() && c.usage.in_flight.load(Ordering::Acquire) != H2_RETIRED
            })
            .cloned()
    }

    fn store(&self, c: H2Conn) {
        *self.lock() = Some(c);
    }
}

/// Why a request could not be exchanged with the upstream.
#[derive(Debug)]
pub(crate) enum SendError {
    /// No connection could be made (503).
    Connect(String),
    /// The connection failed during the exchange (502).
    Protocol(String),
}

fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    msg
}

impl std::fmt::Debug for ClusterState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterState")
            .field("name", &self.name)
            .field("endpoints", &self.endpoints)
            .field("lb_policy", &self.config.lb_policy)
            .finish_non_exhaustive()
    }
}

impl ClusterState {
    pub fn new(c: &biplane_config::Cluster, metrics: &Metrics) -> Self {
        let stats = ClusterStats::new(metrics, &c.name);
        let lb_eps: Vec<LbEndpoint> = c
            .endpoints
            .iter()
            .map(|e| LbEndpoint {
                address: e.address,
                weight: e.weight,
            })
            .collect();
        let endpoints: Box<[UpEndpoint]> = c
            .endpoints
            .iter()
            .enumerate()
            .filter_map(|(idx, e)| {
                let authority = Authority::try_from(e.address.to_string()).ok()?;
                Some(UpEndpoint {
                    idx,
                    addr: e.address,
                    authority,
                })
            })
            .collect();
        let inner = Arc::new(ConnectorInner {
            connect_timeout: c.connect_timeout,
            stats: stats.clone(),
        });
        let pool = match c.protocol {
            biplane_config::UpstreamProtocol::Http1 => Pool::H1(Arc::new(H1Pool {
                slots: c.endpoints.iter().map(|_| H1Slot::default()).collect(),
                connector: inner,
                idle_timeout: c.idle_timeout.unwrap_or(DEFAULT_POOL_IDLE),
                reaper: AtomicBool::new(false),
            })),
            biplane_config::UpstreamProtocol::Http2 => Pool::H2 {
                slots: c.endpoints.iter().map(|_| H2Slot::default()).collect(),
                connector: inner,
                idle_timeout: c.idle_timeout.unwrap_or(DEFAULT_POOL_IDLE),
            },
        };
        Self {
            config: c.clone(),
            name: c.name.as_str().into(),
            endpoints,
            balancer: Balancer::new(c.lb_policy, &lb_eps),
            pool,
            stats,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn connect_timeout(&self) -> Duration {
        self.config.connect_timeout
    }

    pub fn protocol(&self) -> biplane_config::UpstreamProtocol {
        self.config.protocol
    }

    /// The config it was built from.
    pub fn config(&self) -> &biplane_config::Cluster {
        &self.config
    }

    /// Pick an endpoint with the cluster's balancer (`hash` for RingHash/Maglev). The guard
    /// counts the request as active (for LeastRequest) until dropped. `None` = no endpoints.
    pub fn pick(&self, hash: Option<u64>) -> Option<(SocketAddr, LoadGuard)> {
        self.pick_endpoint(hash).map(|(e, g)| (e.addr, g))
    }

    pub(crate) fn pick_endpoint(&self, hash: Option<u64>) -> Option<(&UpEndpoint, LoadGuard)> {
        let (i, g) = self.balancer.pick(hash)?;
        Some((self.endpoints.get(i)?, g))
    }

    /// Send a request to endpoint `ep` (URI in origin form for HTTP/1.1; for HTTP/2 the
    /// authority is the `:authority` sent upstream). `upgrade`: an HTTP/1.1 upgrade request
    /// (WebSocket): it gets a connection of its own, which becomes the tunnel.
    pub(crate) async fn send(
        &self,
        ep: &UpEndpoint,
        req: http::Request<RequestBody>,
        upgrade: bool,
    ) -> Result<http::Response<UpstreamBody>, SendError> {
        match &self.pool {
            // Boxed, as are the HTTP/2 dial and handshake below: rare paths, kept out of
            // the per-request future's size.
            Pool::H1(pool) if upgrade => Box::pin(pool.send_upgrade(ep, req)).await,
            Pool::H1(pool) => pool.send(ep, req).await,
            // Boxed: the HTTP/2 exchange's state is twice an HTTP/1.1 one's, and would size
            // every request's future.
            Pool::H2 {
                slots,
                connector,
                idle_timeout,
            } => Box::pin(send_h2(slots, connector, *idle_timeout, ep, req)).await,
        }
    }

    /// Moves the idle connections (HTTP/1.1) or the shared connection (HTTP/2) of every
    /// endpoint `old` also had to this new state, when both use the same protocol: an
    /// endpoint or weight change does not reconnect to the endpoints that stay. Exchanges
    /// in flight on `old` finish there.
    pub fn adopt_connections(&self, old: &ClusterState) {
        for ep in self.endpoints.iter() {
            let new_idx = ep.idx;
            let Some(old_ep) = old.endpoints.iter().find(|e| e.addr == ep.addr) else {
                continue;
            };
            match (&self.pool, &old.pool) {
                (Pool::H1(new), Pool::H1(old_pool)) => {
                    let moved = match old_pool.slot(old_ep.idx) {
                        Some(mut g) => std::mem::take(&mut *g),
                        None => continue,
                    };
                    if moved.is_empty() {
                        continue;
                    }
                    if let Some(mut g) = new.slot(new_idx) {
                        g.extend(moved);
                    }
                    if !new.reaper.swap(true, Ordering::AcqRel) {
                        new.start_reaper();
                    }
                }
                (
                    Pool::H2 { slots: new, .. },
                    Pool::H2 {
                        slots: old_slots, ..
                    },
                ) => {
                    // It keeps the idle timeout its task was started with.
                    if let (Some(conn), Some(slot)) = (
                        old_slots.get(old_ep.idx).and_then(H2Slot::cached),
                        new.get(new_idx),
                    ) {
                        slot.store(conn);
                    }
                }
                _ => return,
            }
        }
    }

    /// Same settings and endpoints: the state (pool, cursors, counters) can be reused.
    pub fn same_as(&self, c: &biplane_config::Cluster) -> bool {
        let a = &self.config;
        a.name == c.name
            && a.connect_timeout == c.connect_timeout
            && a.lb_policy == c.lb_policy
            && a.protocol == c.protocol
            && a.idle_timeout == c.idle_timeout
            && a.endpoints.len() == c.endpoints.len()
            && a.endpoints
                .iter()
                .zip(&c.endpoints)
                .all(|(x, y)| x.address == y.address && x.weight == y.weight)
    }
}

// ---------------------------------------------------------------------------------------
// Connector
// ---------------------------------------------------------------------------------------

/// Dials endpoints with the cluster's connect timeout and `TCP_NODELAY`, counting
/// connections and failures.
struct ConnectorInner {
    connect_timeout: Duration,
    stats: ClusterStats,
}

impl ConnectorInner {
    async fn connect(&self, addr: SocketAddr) -> Result<UpstreamConn, ConnectError> {
        match dial(addr, self.connect_timeout).await {
            Ok(stream) => {
                self.stats.connections_active.inc();
                Ok(UpstreamConn {
                    io: TokioIo::new(stream),
                    active: self.stats.connections_active.clone(),
                })
            }
            Err(e) => {
                self.stats.connect_failures.inc();
                Err(e)
            }
        }
    }
}

async fn dial(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, ConnectError> {
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(source)) => return Err(ConnectError::Io { addr, source }),
        Err(_) => return Err(ConnectError::Timeout { addr, timeout }),
    };
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// An upstream TCP connection; decrements `upstream_connections_active` when closed.
pub struct UpstreamConn {
    io: TokioIo<TcpStream>,
    active: Gauge,
}

impl Drop for UpstreamConn {
    fn drop(&mut self) {
        self.active.dec();
    }
}

impl Read for UpstreamConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl Write for UpstreamConn {
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

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}

// ---------------------------------------------------------------------------------------
// HTTP/1.1 pool
// ---------------------------------------------------------------------------------------

/// The idle HTTP/1.1 connections of a cluster, per endpoint. A connection is either idle
/// here (nobody polls it) or leased to one request, whose task drives it. Locks are held
/// only to push or pop, never across an await.
struct H1Pool {
    slots: Box<[H1Slot]>,
    connector: Arc<ConnectorInner>,
    /// Idle connections older than this are closed (on checkout, or by the reaper).
    idle_timeout: Duration,
    /// A reaper task is running (started with the first idle connection, stops when the
    /// pool is empty or dropped).
    reaper: AtomicBool,
}

#[derive(Default)]
struct H1Slot {
    idle: Mutex<Vec<Idle>>,
}

struct Idle {
    conn: Box<H1Conn>,
    since: Instant,
}

/// One upstream HTTP/1.1 connection: hyper's request handle and its (unspawned) driver.
/// Boxed once per connection (the driver is most of a kilobyte), so leasing and returning
/// it moves a pointer.
struct H1Conn {
    sender: http1::SendRequest<RequestBody>,
    conn: http1::Connection<UpstreamConn, RequestBody>,
}

impl H1Conn {
    /// Drives the connection's I/O. `true` once it is finished (closed or failed); it must
    /// not be polled again then.
    fn poll_finished(
        conn: &mut http1::Connection<UpstreamConn, RequestBody>,
        cx: &mut Context<'_>,
    ) -> bool {
        match Pin::new(conn).poll(cx) {
            Poll::Pending => false,
            Poll::Ready(Ok(())) => true,
            Poll::Ready(Err(e)) => {
                tracing::debug!(error = %e, "upstream connection ended with error");
                true
            }
        }
    }
}

impl H1Pool {
    fn slot(&self, idx: usize) -> Option<MutexGuard<'_, Vec<Idle>>> {
        let slot = self.slots.get(idx)?;
        Some(match slot.idle.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        })
    }

    /// A live idle connection to endpoint `idx` (the most recently used first), polled
    /// once with `cx` to see that the upstream has not closed it.
    fn take(&self, idx: usize, cx: &mut Context<'_>) -> Option<Box<H1Conn>> {
        loop {
            let mut slot = self.slot(idx)?;
            let idle = slot.pop()?;
            if idle.since.elapsed() >= self.idle_timeout {
                // The rest are older still: close them all, outside the lock.
                let stale = std::mem::take(&mut *slot);
                drop(slot);
                drop((idle, stale));
                return None;
            }
            drop(slot);
            let mut c = idle.conn;
            if !H1Conn::poll_finished(&mut c.conn, cx) && c.sender.is_ready() {
                return Some(c);
            }
        }
    }

    /// Returns a connection whose exchange is over. Kept if it is still open and ready
    /// for a request (the upstream did not ask to close), else closed.
    fn put(self: &Arc<Self>, idx: usize, mut c: Box<H1Conn>, cx: &mut Context<'_>) {
        if H1Conn::poll_finished(&mut c.conn, cx) || !c.sender.is_ready() {
            return;
        }
        let Some(mut slot) = self.slot(idx) else {
            return;
        };
        if slot.len() >= MAX_IDLE_PER_ENDPOINT {
            drop(slot);
            return;
        }
        slot.push(Idle {
            conn: c,
            since: Instant::now(),
        });
        drop(slot);
        if !self.reaper.swap(true, Ordering::AcqRel) {
            self.start_reaper();
        }
    }

    /// Closes idle connections past the idle timeout, now and then, until the pool is
    /// empty or gone.
    fn start_reaper(self: &Arc<Self>) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            self.reaper.store(false, Ordering::Release);
            return;
        };
        let weak: Weak<Self> = Arc::downgrade(self);
        let period =
            (self.idle_timeout / 2).clamp(Duration::from_millis(50), Duration::from_secs(30));
        rt.spawn(async move {
            loop {
                tokio::time::sleep(period).await;
                let Some(pool) = weak.upgrade() else { break };
                if pool.evict_expired() {
                    continue;
                }
                // Empty: stop, unless a connection came back meanwhile.
                pool.reaper.store(false, Ordering::Release);
                if !pool.has_idle() || pool.reaper.swap(true, Ordering::AcqRel) {
                    break;
                }
            }
        });
    }

    /// Closes expired idle connections; `true` if some remain.
    fn evict_expired(&self) -> bool {
        let mut left = false;
        for idx in 0..self.slots.len() {
            let Some(mut slot) = self.slot(idx) else {
                continue;
            };
            let keep = slot
                .iter()
                .position(|i| i.since.elapsed() < self.idle_timeout)
                .unwrap_or(slot.len());
            // Oldest first: everything before `keep` has expired.
            let stale: Vec<Idle> = slot.drain(..keep).collect();
            left |= !slot.is_empty();
            drop(slot);
            drop(stale);
        }
        left
    }

    fn has_idle(&self) -> bool {
        (0..self.slots.len()).any(|i| self.slot(i).is_some_and(|s| !s.is_empty()))
    }

    async fn dial(&self, ep: &UpEndpoint) -> Result<Box<H1Conn>, SendError> {
        let io = self
            .connector
            .connect(ep.addr)
            .await
            .map_err(|e| SendError::Connect(chain(&e)))?;
        let (sender, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|e| SendError::Connect(chain(&e)))?;
        Ok(Box::new(H1Conn { sender, conn }))
    }

    /// One exchange on a pooled (or new) connection, driven by this task. A pooled
    /// connection that turns out closed before the request was written is discarded and the
    /// request tried on the next one.
    async fn send(
        self: &Arc<Self>,
        ep: &UpEndpoint,
        mut req: http::Request<RequestBody>,
    ) -> Result<http::Response<UpstreamBody>, SendError> {
        loop {
            let pooled = std::future::poll_fn(|cx| Poll::Ready(self.take(ep.idx, cx))).await;
            let reused = pooled.is_some();
            let mut c = match pooled {
                Some(c) => c,
                // Boxed: dialing (connect + timeout) is most of this future's size, and
                // the future is moved on every request while dialing is rare.
                None => Box::pin(self.dial(ep)).await?,
            };
            let mut exchange = std::pin::pin!(c.sender.try_send_request(req));
            let mut finished = false;
            let res = std::future::poll_fn(|cx| {
                if !finished {
                    finished = H1Conn::poll_finished(&mut c.conn, cx);
                }
                exchange.as_mut().poll(cx)
            })
            .await;
            match res {
                Ok(res) => {
                    let lease = (!finished).then(|| Lease {
                        conn: c,
                        pool: self.clone(),
                        idx: ep.idx,
                    });
                    return Ok(res.map(|body| UpstreamBody {
                        body,
                        lease,
                        h2: None,
                    }));
                }
                Err(mut e) => match e.take_message() {
                    Some(r) if reused => req = r,
                    _ => return Err(SendError::Protocol(chain(e.error()))),
                },
            }
        }
    }

    /// An upgrade request on a connection of its own, driven by a task that hands the I/O
    /// over to the tunnel on `101 Switching Protocols`.
    async fn send_upgrade(
        &self,
        ep: &UpEndpoint,
        req: http::Request<RequestBody>,
    ) -> Result<http::Response<UpstreamBody>, SendError> {
        let H1Conn { mut sender, conn } = *self.dial(ep).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream upgrade connection ended with error");
            }
        });
        sender
            .send_request(req)
            .await
            .map(|res| res.map(UpstreamBody::plain))
            .map_err(|e| SendError::Protocol(chain(&e)))
    }
}

/// One exchange on the endpoint's shared HTTP/2 connection (dialed on first use).
async fn send_h2(
    slots: &[H2Slot],
    connector: &ConnectorInner,
    idle_timeout: Duration,
    ep: &UpEndpoint,
    req: http::Request<RequestBody>,
) -> Result<http::Response<UpstreamBody>, SendError> {
    let slot = slots
        .get(ep.idx)
        .ok_or_else(|| SendError::Connect("no such endpoint".into()))?;
    let (mut sender, in_flight) = match slot.take() {
        Some(t) => t,
        None => {
            let _dialing = slot.dialing.lock().await;
            match slot.take() {
                Some(t) => t,
                None => {
                    let (conn, in_flight) =
                        Box::pin(dial_h2(connector, ep.addr, idle_timeout)).await?;
                    let sender = conn.sender.clone();
                    slot.store(conn);
                    (sender, in_flight)
                }
            }
        }
    };
    sender
        .ready()
        .await
        .map_err(|e| SendError::Protocol(chain(&e)))?;
    sender
        .send_request(req)
        .await
        .map(|res| {
            res.map(|body| UpstreamBody {
                body,
                lease: None,
                h2: Some(in_flight),
            })
        })
        .map_err(|e| SendError::Protocol(chain(&e)))
}

/// A new HTTP/2 connection to `addr`, driven by a task of its own that closes it after
/// `idle_timeout` with no exchange in flight; with it, the dialing exchange's count.
async fn dial_h2(
    connector: &ConnectorInner,
    addr: SocketAddr,
    idle_timeout: Duration,
) -> Result<(H2Conn, H2InFlight), SendError> {
    let conn = connector
        .connect(addr)
        .await
        .map_err(|e| SendError::Connect(chain(&e)))?;
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .handshake(conn)
        .await
        .map_err(|e| SendError::Connect(chain(&e)))?;
    let (usage, in_flight) = H2Usage::new_with_one();
    let watched = usage.clone();
    let period = (idle_timeout / 2).clamp(Duration::from_millis(50), Duration::from_secs(30));
    tokio::spawn(async move {
        let mut conn = std::pin::pin!(conn);
        loop {
            tokio::select! {
                ended = &mut conn => {
                    if let Err(e) = ended {
                        tracing::debug!(error = %e, "upstream h2 connection ended with error");
                    }
                    return;
                }
                () = tokio::time::sleep(period) => {
                    if watched.retire_if_idle(idle_timeout) {
                        tracing::debug!(%addr, "upstream h2 connection idle: closing");
                        return;
                    }
                }
            }
        }
    });
    Ok((H2Conn { sender, usage }, in_flight))
}

/// A pooled connection lent to one response; goes back to its pool when the body is over.
struct Lease {
    conn: Box<H1Conn>,
    pool: Arc<H1Pool>,
    idx: usize,
}

/// An upstream response body. For a pooled HTTP/1.1 connection it also drives that
/// connection (the bytes arrive through it) and returns it to the pool at the end of the
/// body; dropped before the end, the connection is closed (its state is mid-message).
pub struct UpstreamBody {
    body: Incoming,
    lease: Option<Lease>,
    /// HTTP/2: the exchange counts as in flight on its connection until the body is gone.
    h2: Option<H2InFlight>,
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody")
            .field("body", &self.body)
            .field("pooled", &self.lease.is_some())
            .field("h2_in_flight", &self.h2.is_some())
            .finish()
    }
}

impl UpstreamBody {
    /// A body whose connection is driven elsewhere (HTTP/2, upgrades).
    fn plain(body: Incoming) -> Self {
        Self {
            body,
            lease: None,
            h2: None,
        }
    }

    /// The exchange is over: a pooled HTTP/1.1 connection goes back to its pool, and an
    /// HTTP/2 connection may count as idle from now.
    fn release(&mut self, cx: &mut Context<'_>) {
        if let Some(l) = self.lease.take() {
            l.pool.put(l.idx, l.conn, cx);
        }
        self.h2 = None;
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // hyper stops polling a body once `is_end_stream` says it is over.
        if self.lease.is_some() && self.body.is_end_stream() {
            self.release(&mut Context::from_waker(Waker::noop()));
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let mut res = Pin::new(&mut this.body).poll_frame(cx);
        if res.is_pending()
            && let Some(l) = this.lease.as_mut()
        {
            // Drive the connection: its reads feed the body.
            if H1Conn::poll_finished(&mut l.conn.conn, cx) {
                this.lease = None;
            }
            res = Pin::new(&mut this.body).poll_frame(cx);
        }
        match &res {
            Poll::Ready(None) => this.release(cx),
            Poll::Ready(Some(Ok(_))) if this.body.is_end_stream() => this.release(cx),
            Poll::Ready(Some(Err(_))) => {
                this.lease = None;
                this.h2 = None;
            }
            _ => {}
        }
        res
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

    use std::convert::Infallible;
    use std::sync::atomic::AtomicUsize;

    use http::HeaderValue;
    use http_body_util::BodyExt;

    use super::*;

    /// A listener on 127.0.0.1 that counts the connections it accepts and hands each to
    /// `serve`.
    async fn counting_listener(
        serve: impl Fn(tokio::net::TcpStream) + Send + 'static,
    ) -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                serve(stream);
            }
        });
        (addr, accepted)
    }

    /// An HTTP/1.1 upstream that counts the connections it accepts; `/close` answers with
    /// `Connection: close`.
    async fn upstream() -> (SocketAddr, Arc<AtomicUsize>) {
        counting_listener(|stream| {
            let svc = hyper::service::service_fn(|req: http::Request<Incoming>| async move {
                let mut res =
                    http::Response::new(http_body_util::Full::new(Bytes::from_static(b"hi")));
                if req.uri().path() == "/close" {
                    res.headers_mut()
                        .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
                }
                Ok::<_, Infallible>(res)
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc),
            );
        })
        .await
    }

    fn cluster(addr: SocketAddr, idle_timeout: Option<Duration>) -> ClusterState {
        cluster_of(addr, idle_timeout, biplane_config::UpstreamProtocol::Http1)
    }

    fn cluster_of(
        addr: SocketAddr,
        idle_timeout: Option<Duration>,
        protocol: biplane_config::UpstreamProtocol,
    ) -> ClusterState {
        let c = biplane_config::Cluster {
            name: "c".into(),
            connect_timeout: Duration::from_secs(1),
            lb_policy: biplane_config::LbPolicy::RoundRobin,
            endpoints: vec![biplane_config::Endpoint {
                address: addr,
                weight: 1,
            }],
            protocol,
            idle_timeout,
        };
        ClusterState::new(&c, &Metrics::new())
    }

    /// A body whose one frame comes after a delay.
    struct Delayed(Pin<Box<tokio::time::Sleep>>, Option<&'static [u8]>);

    impl Body for Delayed {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            std::task::ready!(self.0.as_mut().poll(cx));
            Poll::Ready(
                self.1
                    .take()
                    .map(|b| Ok(Frame::data(Bytes::from_static(b)))),
            )
        }
    }

    /// An HTTP/2 (prior knowledge) upstream that counts the connections it accepts;
    /// `/slow` sends its body 400 ms after the head.
    async fn h2_upstream() -> (SocketAddr, Arc<AtomicUsize>) {
        counting_listener(|stream| {
            let svc = hyper::service::service_fn(|req: http::Request<Incoming>| async move {
                let (delay, text) = match req.uri().path() {
                    "/slow" => (400, &b"slow"[..]),
                    _ => (0, &b"hi"[..]),
                };
                let sleep = Box::pin(tokio::time::sleep(Duration::from_millis(delay)));
                Ok::<_, Infallible>(http::Response::new(Delayed(sleep, Some(text))))
            });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc),
            );
        })
        .await
    }

    #[tokio::test]
    async fn h2_connection_closes_after_the_idle_timeout_but_not_under_a_slow_exchange() {
        let (addr, accepted) = h2_upstream().await;
        let c = cluster_of(
            addr,
            Some(Duration::from_millis(100)),
            biplane_config::UpstreamProtocol::Http2,
        );
        // The exchange outlives the idle timeout four times: it must not be cut.
        assert_eq!(get(&c, "http://up/slow").await, "slow");
        assert_eq!(get(&c, "http://up/").await, "hi");
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "one shared connection");
        assert_eq!(c.stats.connections_active.get(), 1);
        wait_until("idle h2 connection closed", || {
            c.stats.connections_active.get() == 0
        })
        .await;
        assert_eq!(get(&c, "http://up/").await, "hi");
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            2,
            "dialed again after the close"
        );
    }

    async fn get(c: &ClusterState, path: &'static str) -> String {
        let (ep, _load) = c.pick_endpoint(None).unwrap();
        let req = http::Request::get(path)
            .header(http::header::HOST, "up")
            .body(RequestBody::empty())
            .unwrap();
        let res = c.send(ep, req, false).await.unwrap();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    }

    async fn wait_until(what: &str, cond: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !cond() {
            assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn h1_pool_reuses_one_connection() {
        let (addr, accepted) = upstream().await;
        let c = cluster(addr, None);
        for _ in 0..5 {
            assert_eq!(get(&c, "/").await, "hi");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(c.stats.connections_active.get(), 1);
    }

    #[tokio::test]
    async fn endpoints_that_stay_keep_their_connections_across_an_endpoint_change() {
        let (a, accepted_a) = upstream().await;
        let (b, accepted_b) = upstream().await;
        let old = cluster(a, None);
        assert_eq!(get(&old, "/").await, "hi");
        assert_eq!(accepted_a.load(Ordering::SeqCst), 1);
        // Backend {a} -> {b, a}: a new state, a's idle connection moves over.
        let c = biplane_config::Cluster {
            name: "c".into(),
            connect_timeout: Duration::from_secs(1),
            lb_policy: biplane_config::LbPolicy::RoundRobin,
            endpoints: [b, a]
                .iter()
                .map(|&address| biplane_config::Endpoint { address, weight: 1 })
                .collect(),
            protocol: biplane_config::UpstreamProtocol::Http1,
            idle_timeout: None,
        };
        let new = ClusterState::new(&c, &Metrics::new());
        new.adopt_connections(&old);
        for _ in 0..4 {
            assert_eq!(get(&new, "/").await, "hi");
        }
        assert_eq!(accepted_a.load(Ordering::SeqCst), 1, "a was dialed again");
        assert_eq!(accepted_b.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn h1_pool_drops_connections_the_upstream_closes() {
        let (addr, accepted) = upstream().await;
        let c = cluster(addr, None);
        assert_eq!(get(&c, "/close").await, "hi");
        wait_until("closed connection released", || {
            c.stats.connections_active.get() == 0
        })
        .await;
        assert_eq!(get(&c, "/").await, "hi");
        assert_eq!(get(&c, "/").await, "hi");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn h1_pool_closes_idle_connections_after_the_idle_timeout() {
        let (addr, accepted) = upstream().await;
        let c = cluster(addr, Some(Duration::from_millis(100)));
        assert_eq!(get(&c, "/").await, "hi");
        assert_eq!(c.stats.connections_active.get(), 1);
        // The reaper closes it without any further request.
        wait_until("idle connection reaped", || {
            c.stats.connections_active.get() == 0
        })
        .await;
        assert_eq!(get(&c, "/").await, "hi");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn h1_pool_connect_failure_is_a_connect_error() {
        // A port nobody listens on (bound, then closed).
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let c = cluster(addr, None);
        let (ep, _load) = c.pick_endpoint(None).unwrap();
        let req = http::Request::get("/").body(RequestBody::empty()).unwrap();
        let err = c.send(ep, req, false).await.unwrap_err();
        assert!(matches!(err, SendError::Connect(_)), "{err:?}");
        assert_eq!(c.stats.connect_failures.get(), 1);
    }
}
