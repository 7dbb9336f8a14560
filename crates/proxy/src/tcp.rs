//! L4 forwarding (Envoy `TcpProxy`): pick a weighted cluster and an endpoint, connect with
//! the cluster's connect timeout, then relay bytes both ways with half-close and an idle
//! timeout. TLS passthrough is this same handler on a stream whose ClientHello was only
//! peeked, so the upstream sees the client's handshake untouched.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::ConnInfo;
use crate::http::{ClusterState, HttpState};
use crate::metrics::{ClusterLabels, Metrics, TcpBytesLabels};

/// A compiled `TcpProxy`: clusters resolved and metric handles bound at snapshot compile
/// time, so a connection does no lookup by name.
pub struct TcpHandler {
    stat_prefix: String,
    clusters: Vec<TcpCluster>,
    /// Sum of the weights; 0 only if every weight is 0 (then nothing is picked).
    total_weight: u64,
    idle_timeout: Option<Duration>,
}

struct TcpCluster {
    name: String,
    /// `None` if the config named a cluster that the snapshot does not have (the config
    /// crate validates references, so this is a guard, not a feature).
    state: Option<Arc<ClusterState>>,
    /// Upper bound (exclusive) of this cluster's slice of `0..total_weight`.
    cumulative: u64,
    connections: Counter,
    connect_failures: Counter,
    active: Gauge,
    bytes_up: Counter,
    bytes_down: Counter,
}

impl std::fmt::Debug for TcpHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpHandler")
            .field("stat_prefix", &self.stat_prefix)
            .field(
                "clusters",
                &self.clusters.iter().map(|c| &c.name).collect::<Vec<_>>(),
            )
            .field("idle_timeout", &self.idle_timeout)
            .finish()
    }
}

impl TcpHandler {
    pub fn compile(config: &biplane_config::TcpProxy, http: &HttpState, metrics: &Metrics) -> Self {
        let mut cumulative = 0u64;
        let clusters = config
            .clusters
            .iter()
            .map(|wc| {
                cumulative += u64::from(wc.weight);
                let labels = ClusterLabels {
                    cluster: wc.name.clone(),
                };
                let bytes = |direction| {
                    metrics
                        .tcp_bytes
                        .get_or_create(&TcpBytesLabels {
                            cluster: wc.name.clone(),
                            direction,
                        })
                        .clone()
                };
                TcpCluster {
                    name: wc.name.clone(),
                    state: http.clusters.get(&wc.name).cloned(),
                    cumulative,
                    connections: metrics.tcp_connections_total.get_or_create(&labels).clone(),
                    connect_failures: metrics
                        .upstream_connect_failures
                        .get_or_create(&labels)
                        .clone(),
                    active: metrics
                        .upstream_connections_active
                        .get_or_create(&labels)
                        .clone(),
                    bytes_up: bytes("upstream"),
                    bytes_down: bytes("downstream"),
                }
            })
            .collect();
        Self {
            stat_prefix: config.stat_prefix.clone(),
            clusters,
            total_weight: cumulative,
            idle_timeout: config.idle_timeout,
        }
    }

    /// Weighted choice among the clusters; a weight of 0 is never picked.
    fn pick_cluster(&self) -> Option<&TcpCluster> {
        match self.clusters.as_slice() {
            [only] if self.total_weight > 0 => Some(only),
            _ if self.total_weight == 0 => None,
            many => {
                let r = crate::lb::random_below(self.total_weight);
                many.iter().find(|c| r < c.cumulative)
            }
        }
    }
}

/// Why a TCP proxy session ended early (for the debug log).
#[derive(Debug, thiserror::Error)]
pub enum TcpProxyError {
    #[error("no cluster with a non-zero weight")]
    NoCluster,
    #[error("cluster {0:?} is not in the current snapshot")]
    UnknownCluster(String),
    #[error("cluster {0:?} has no endpoint to pick")]
    NoEndpoint(String),
    #[error("connect to {addr} (cluster {cluster:?}) timed out after {timeout:?}")]
    ConnectTimeout {
        cluster: String,
        addr: std::net::SocketAddr,
        timeout: Duration,
    },
    #[error("connect to {addr} (cluster {cluster:?}): {source}")]
    Connect {
        cluster: String,
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// How a relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayEnd {
    /// Both directions reached EOF (or one side reset the connection).
    Closed,
    /// No byte moved either way for the idle timeout.
    IdleTimeout,
}

/// Bytes relayed in each direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Relayed {
    /// Downstream -> upstream.
    pub up: u64,
    /// Upstream -> downstream.
    pub down: u64,
}

/// Proxies one downstream connection to an endpoint of one of the handler's clusters.
/// Connect failures close the downstream connection (there is nothing else to tell an L4
/// client) and count `upstream_connect_failures`.
pub async fn proxy<IO>(
    downstream: IO,
    conn: &ConnInfo,
    handler: &TcpHandler,
) -> Result<Relayed, TcpProxyError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let cluster = handler.pick_cluster().ok_or(TcpProxyError::NoCluster)?;
    let state = cluster
        .state
        .as_ref()
        .ok_or_else(|| TcpProxyError::UnknownCluster(cluster.name.clone()))?;
    let Some((addr, _load)) = state.pick(None) else {
        cluster.connect_failures.inc();
        return Err(TcpProxyError::NoEndpoint(cluster.name.clone()));
    };
    let timeout = state.connect_timeout();
    let upstream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(source)) => {
            cluster.connect_failures.inc();
            return Err(TcpProxyError::Connect {
                cluster: cluster.name.clone(),
                addr,
                source,
            });
        }
        Err(_) => {
            cluster.connect_failures.inc();
            return Err(TcpProxyError::ConnectTimeout {
                cluster: cluster.name.clone(),
                addr,
                timeout,
            });
        }
    };
    let _ = upstream.set_nodelay(true);
    cluster.connections.inc();
    cluster.active.inc();
    let (relayed, end) = relay(downstream, upstream, handler.idle_timeout).await;
    cluster.active.dec();
    cluster.bytes_up.inc_by(relayed.up);
    cluster.bytes_down.inc_by(relayed.down);
    tracing::debug!(
        listener = %conn.listener,
        peer = %conn.peer,
        upstream = %addr,
        cluster = %cluster.name,
        stat_prefix = %handler.stat_prefix,
        bytes_up = relayed.up,
        bytes_down = relayed.down,
        idle_timeout = end == RelayEnd::IdleTimeout,
        "tcp session ended"
    );
    Ok(relayed)
}

/// Copies bytes both ways until both sides are done (a read EOF on one side shuts down the
/// write half of the other, so half-closed sessions keep flowing the other way), an I/O
/// error, or `idle` elapses with no byte read on either side.
pub async fn relay<A, B>(a: A, b: B, idle: Option<Duration>) -> (Relayed, RelayEnd)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let start = Instant::now();
    let last_activity = AtomicU64::new(0);
    let mut a = Tracked {
        inner: a,
        read: 0,
        last_activity: &last_activity,
        start,
    };
    let mut b = Tracked {
        inner: b,
        read: 0,
        last_activity: &last_activity,
        start,
    };
    let end = {
        let copy = tokio::io::copy_bidirectional(&mut a, &mut b);
        match idle {
            None => {
                let _ = copy.await;
                RelayEnd::Closed
            }
            Some(idle) => {
                tokio::select! {
                    _ = copy => RelayEnd::Closed,
                    () = idle_expired(&last_activity, start, idle) => RelayEnd::IdleTimeout,
                }
            }
        }
    };
    (
        Relayed {
            up: a.read,
            down: b.read,
        },
        end,
    )
}

/// Resolves once no read happened for `idle` (checked at the deadlines, not by polling).
async fn idle_expired(last_activity: &AtomicU64, start: Instant, idle: Duration) {
    loop {
        let last = start + Duration::from_millis(last_activity.load(Ordering::Relaxed));
        let deadline = last + idle;
        if Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep_until(deadline).await;
    }
}

/// A stream that counts the bytes read from it and stamps the time of the last read.
struct Tracked<'a, S> {
    inner: S,
    read: u64,
    last_activity: &'a AtomicU64,
    start: Instant,
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<'_, S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let res = Pin::new(&mut this.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            this.read += n as u64;
            let ms = u64::try_from(this.start.elapsed().as_millis()).unwrap_or(u64::MAX);
            this.last_activity.store(ms, Ordering::Relaxed);
        }
        res
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<'_, S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn relays_both_ways_with_half_close() {
        let (client, proxy_down) = tokio::io::duplex(64);
        let (proxy_up, server) = tokio::io::duplex(64);
        let relay = tokio::spawn(relay(proxy_down, proxy_up, Some(Duration::from_secs(30))));

        let (mut cr, mut cw) = tokio::io::split(client);
        let (mut sr, mut sw) = tokio::io::split(server);
        cw.write_all(b"hello upstream").await.unwrap();
        cw.shutdown().await.unwrap();
        let mut got = Vec::new();
        sr.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello upstream");
        // The other direction still flows after the client's half-close.
        sw.write_all(b"and back, longer than the duplex buffer of 64 bytes......................")
            .await
            .unwrap();
        sw.shutdown().await.unwrap();
        let mut back = Vec::new();
        cr.read_to_end(&mut back).await.unwrap();
        assert!(back.starts_with(b"and back"));
        let (relayed, end) = relay.await.unwrap();
        assert_eq!(end, RelayEnd::Closed);
        assert_eq!(relayed.up, 14);
        assert_eq!(relayed.down, back.len() as u64);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_timeout_resets_on_activity() {
        let (mut client, proxy_down) = tokio::io::duplex(64);
        let (proxy_up, mut server) = tokio::io::duplex(64);
        let relay = tokio::spawn(relay(proxy_down, proxy_up, Some(Duration::from_secs(10))));
        // Activity every 6 s keeps a 10 s idle timeout from firing.
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_secs(6)).await;
            client.write_all(b"x").await.unwrap();
            let mut b = [0u8; 1];
            server.read_exact(&mut b).await.unwrap();
            assert!(!relay.is_finished());
        }
        let (relayed, end) = relay.await.unwrap();
        assert_eq!(end, RelayEnd::IdleTimeout);
        assert_eq!(relayed.up, 4);
        // With the relay gone, both sides see EOF.
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    }
}
