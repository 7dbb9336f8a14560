//! Upstream side: a compiled cluster ([`ClusterState`]: endpoints, balancer, connection
//! pool) and the connector that dials the picked endpoint.
//!
//! HTTP/1.1 clusters use one pooled `hyper_util` legacy client (keep-alive): the request
//! URI's authority is the *endpoint address* (pre-built per endpoint), so the pool keys
//! connections by endpoint and the connector dials exactly the endpoint the balancer picked;
//! the downstream `Host` travels in the `Host` header (the client never invents one,
//! `set_host(false)`). HTTP/2 clusters (prior knowledge, e.g. gRPC) keep one multiplexed
//! connection per endpoint here, so `:authority` is the downstream authority.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::uri::Authority;
use hyper::client::conn::http2::SendRequest;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::net::TcpStream;

use super::body::RequestBody;
use crate::lb::{Balancer, LbEndpoint, LoadGuard};
use crate::metrics::{ClusterLabels, Metrics};

/// Default for `Cluster.idle_timeout` when unset.
const DEFAULT_POOL_IDLE: Duration = Duration::from_secs(60);

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
    /// `addr` as a URI authority (pool key), built once.
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

/// Connection pools: hyper-util's keep-alive pool for HTTP/1.1; for HTTP/2 one multiplexed
/// connection per endpoint, owned here so that the request URI can carry the downstream
/// authority (`:authority`) rather than the endpoint address.
#[allow(
    clippy::large_enum_variant,
    reason = "one per cluster; boxing adds a pointer chase per request"
)]
enum Pool {
    H1(Client<Connector, RequestBody>),
    H2 {
        slots: Box<[H2Slot]>,
        connector: Arc<ConnectorInner>,
    },
}

#[derive(Default)]
struct H2Slot {
    sender: std::sync::Mutex<Option<SendRequest<RequestBody>>>,
    /// Serialises dialing so that a burst of requests opens one connection.
    dialing: tokio::sync::Mutex<()>,
}

impl H2Slot {
    fn cached(&self) -> Option<SendRequest<RequestBody>> {
        let g = match self.sender.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        g.as_ref().filter(|s| !s.is_closed()).cloned()
    }

    fn store(&self, s: SendRequest<RequestBody>) {
        let mut g = match self.sender.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        *g = Some(s);
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
            biplane_config::UpstreamProtocol::Http1 => {
                let mut b = Client::builder(TokioExecutor::new());
                b.pool_timer(TokioTimer::new())
                    .timer(TokioTimer::new())
                    .pool_idle_timeout(c.idle_timeout.unwrap_or(DEFAULT_POOL_IDLE))
                    .set_host(false);
                Pool::H1(b.build(Connector { inner }))
            }
            biplane_config::UpstreamProtocol::Http2 => Pool::H2 {
                slots: c.endpoints.iter().map(|_| H2Slot::default()).collect(),
                connector: inner,
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

    /// Send a request to endpoint `ep`. For HTTP/1.1 the URI authority must be the
    /// endpoint's (the pool key); for HTTP/2 it is the `:authority` sent upstream.
    pub(crate) async fn send(
        &self,
        ep: &UpEndpoint,
        req: http::Request<RequestBody>,
    ) -> Result<http::Response<hyper::body::Incoming>, SendError> {
        match &self.pool {
            Pool::H1(client) => client.request(req).await.map_err(|e| {
                let msg = std::error::Error::source(&e).map_or_else(|| e.to_string(), chain);
                if e.is_connect() {
                    SendError::Connect(msg)
                } else {
                    SendError::Protocol(msg)
                }
            }),
            Pool::H2 { slots, connector } => {
                let slot = slots
                    .get(ep.idx)
                    .ok_or_else(|| SendError::Connect("no such endpoint".into()))?;
                let mut sender = match slot.cached() {
                    Some(s) => s,
                    None => {
                        let _dialing = slot.dialing.lock().await;
                        match slot.cached() {
                            Some(s) => s,
                            None => {
                                let conn = connector
                                    .connect(ep.addr)
                                    .await
                                    .map_err(|e| SendError::Connect(chain(&e)))?;
                                let (sender, conn) =
                                    hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                                        .timer(TokioTimer::new())
                                        .handshake(conn)
                                        .await
                                        .map_err(|e| SendError::Connect(chain(&e)))?;
                                tokio::spawn(async move {
                                    if let Err(e) = conn.await {
                                        tracing::debug!(error = %e, "upstream h2 connection ended with error");
                                    }
                                });
                                slot.store(sender.clone());
                                sender
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
                    .map_err(|e| SendError::Protocol(chain(&e)))
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

/// Dials the endpoint named by the URI authority, with the cluster's connect timeout and
/// `TCP_NODELAY`, counting connections and failures.
#[derive(Clone)]
pub struct Connector {
    inner: Arc<ConnectorInner>,
}

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

impl tower::Service<http::Uri> for Connector {
    type Response = UpstreamConn;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<UpstreamConn, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        Poll::Ready(Ok(()))
    }

    /// Boxed: this runs once per new upstream connection, not per request.
    fn call(&mut self, dst: http::Uri) -> Self::Future {
        let inner = self.inner.clone();
        Box::pin(async move {
            let auth = dst.authority().map(Authority::as_str).unwrap_or("");
            let addr: SocketAddr = auth
                .parse()
                .map_err(|_| ConnectError::BadAddress(auth.to_owned()))?;
            inner.connect(addr).await
        })
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

impl Connection for UpstreamConn {
    fn connected(&self) -> Connected {
        Connected::new()
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
