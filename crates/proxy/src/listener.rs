//! Listeners: the accept loop of one bound socket, filter-chain selection (SNI and
//! transport, Envoy `FilterChainMatch` semantics), TLS termination or passthrough, handing
//! the connection to the HTTP or TCP handler, and connection tracking for graceful drain.
//!
//! Phases of one connection: accept (TCP_NODELAY, keepalive; on Linux inherited from the
//! listening socket) → inspect (peek the ClientHello, only if some chain matches on SNI or
//! transport) → select chain (no match: close) → TLS handshake if the chain terminates →
//! handler (`http::serve_connection` or `tcp::proxy`) until the connection ends, drains, or
//! is aborted at the drain deadline. Connection tasks are detached: a counter and their
//! abort handles serve the drain.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use biplane_config::{ChainHandler, HttpConnectionManager, TlsTermination};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::Interest;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tokio::task::{AbortHandle, JoinHandle};
use tokio_rustls::TlsAcceptor;

use crate::http::HttpState;
use crate::metrics::{ListenerLabels, Metrics};
use crate::tcp::TcpHandler;
use crate::tls::{self, ClientHelloInfo, HelloError, Inspection};
use crate::{ConnInfo, DrainReport, Shared};

/// Time allowed for the client's first bytes (the ClientHello) when a listener inspects
/// them. Server-first protocols cannot share a port with SNI-matched chains.
pub const INSPECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Time allowed for a TLS handshake we terminate.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// TCP keepalive on downstream connections: first probe after this much idle time.
const KEEPALIVE_TIME: Duration = Duration::from_secs(60);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_RETRIES: u32 = 6;
/// Initial peek buffer; grown up to [`MAX_PEEK`] for large or fragmented hellos.
const INITIAL_PEEK: usize = 2048;
/// A ClientHello of `tls::MAX_CLIENT_HELLO` bytes in full-size records, with headroom.
const MAX_PEEK: usize = tls::MAX_CLIENT_HELLO + 4096;

// ---------------------------------------------------------------------------------------
// Compiled chains
// ---------------------------------------------------------------------------------------

/// How specifically a chain's `server_names` matched an SNI (Envoy order: exact, then the
/// longest suffix wildcard, then `*`, then chains without server names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Specificity {
    Catchall,
    Star,
    Wildcard(usize),
    Exact,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum ServerName {
    Exact(String),
    /// `*.example.com` stored as `.example.com`: matches one or more labels before it
    /// (`a.example.com`, `a.b.example.com`), not `example.com` itself (Envoy semantics).
    Suffix(String),
    /// `*`.
    Star,
}

impl ServerName {
    fn parse(name: &str) -> Self {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if name == "*" {
            ServerName::Star
        } else if let Some(rest) = name.strip_prefix('*') {
            ServerName::Suffix(rest.to_owned())
        } else {
            ServerName::Exact(name)
        }
    }

    fn matches(&self, sni: &str) -> Option<Specificity> {
        match self {
            ServerName::Exact(n) => (n == sni).then_some(Specificity::Exact),
            ServerName::Suffix(s) => (sni.len() > s.len() && sni.ends_with(s.as_str()))
                .then_some(Specificity::Wildcard(s.len())),
            ServerName::Star => Some(Specificity::Star),
        }
    }
}

/// What a selected chain does with the connection.
#[derive(Debug, Clone)]
pub enum Handler {
    Http(Arc<HttpConnectionManager>),
    Tcp(Arc<TcpHandler>),
}

/// One filter chain, compiled.
pub struct CompiledChain {
    pub name: String,
    server_names: Vec<ServerName>,
    /// `Some(true)`: TLS only; `Some(false)`: plaintext only; `None`: either. A chain that
    /// terminates TLS is TLS-only even if its matcher says nothing.
    transport: Option<bool>,
    /// The TLS settings the acceptor was built from (to reuse it across swaps).
    tls_config: Option<TlsTermination>,
    acceptor: Option<TlsAcceptor>,
    pub handler: Handler,
}

impl CompiledChain {
    fn specificity(&self, sni: Option<&str>) -> Option<Specificity> {
        if self.server_names.is_empty() {
            return Some(Specificity::Catchall);
        }
        let sni = sni?;
        self.server_names
            .iter()
            .filter_map(|n| n.matches(sni))
            .max()
    }
}

/// Everything a listener needs to serve a connection under the current config. Swapped
/// whole (`ArcSwap`) by `Proxy::apply`, so a changed chain on an unchanged address applies
/// to new connections without rebinding.
pub struct ChainTable {
    /// Listener name (ConnInfo, metrics, logs).
    pub name: Arc<str>,
    pub chains: Vec<CompiledChain>,
    /// Peek the ClientHello before choosing (some chain matches on SNI or transport).
    pub inspect: bool,
    /// Without inspection: whether to select as for a TLS connection (every chain
    /// terminates TLS, so rustls rejects plaintext anyway and the peek is saved).
    assume_tls: bool,
    conns_active: Gauge,
    conns_total: Counter,
}

/// A filter chain that could not be compiled.
#[derive(Debug, thiserror::Error)]
#[error("listener {listener:?}, filter chain {chain:?}: {source}")]
pub struct ChainError {
    pub listener: String,
    pub chain: String,
    #[source]
    pub source: Box<tls::TlsConfigError>,
}

impl ChainTable {
    /// Compiles a listener's chains against a compiled HTTP state. TLS acceptors whose
    /// settings did not change are taken from `previous` (keeps their session caches).
    pub fn compile(
        listener: &biplane_config::Listener,
        http: &HttpState,
        metrics: &Metrics,
        previous: Option<&ChainTable>,
    ) -> Result<Self, ChainError> {
        let mut chains = Vec::with_capacity(listener.filter_chains.len());
        for chain in &listener.filter_chains {
            let acceptor = match &chain.tls {
                None => None,
                Some(tls) => {
                    let reused = previous.and_then(|p| {
                        p.chains
                            .iter()
                            .find_map(|c| match (&c.tls_config, &c.acceptor) {
                                (Some(old), Some(acc)) if same_tls(old, tls) => Some(acc.clone()),
                                _ => None,
                            })
                    });
                    match reused {
                        Some(acc) => Some(acc),
                        None => Some(tls::build_acceptor(tls).map_err(|source| ChainError {
                            listener: listener.name.clone(),
                            chain: chain.name.clone(),
                            source: Box::new(source),
                        })?),
                    }
                }
            };
            let handler = match &chain.handler {
                ChainHandler::Http(hcm) => Handler::Http(Arc::new(hcm.clone())),
                ChainHandler::Tcp(tcp) => {
                    Handler::Tcp(Arc::new(TcpHandler::compile(tcp, http, metrics)))
                }
            };
            chains.push(CompiledChain {
                name: chain.name.clone(),
                server_names: chain
                    .matcher
                    .server_names
                    .iter()
                    .map(|n| ServerName::parse(n))
                    .collect(),
                transport: chain.matcher.tls.or(chain.tls.as_ref().map(|_| true)),
                tls_config: chain.tls.clone(),
                acceptor,
                handler,
            });
        }
        // Inspection is skipped when it cannot change the outcome: no chain matches on
        // names, and either no chain cares about the transport or every chain terminates
        // TLS (a plaintext client then fails the handshake, as it would fail to match).
        let names = chains.iter().any(|c| !c.server_names.is_empty());
        let all_plain_agnostic = chains.iter().all(|c| c.transport.is_none());
        let all_terminate = chains
            .iter()
            .all(|c| c.acceptor.is_some() && c.transport == Some(true));
        let inspect = names || !(all_plain_agnostic || all_terminate);
        let assume_tls = !inspect && all_terminate && !chains.is_empty();
        let labels = ListenerLabels {
            listener: listener.name.clone(),
        };
        Ok(Self {
            name: Arc::from(listener.name.as_str()),
            chains,
            inspect,
            assume_tls,
            conns_active: metrics
                .downstream_connections_active
                .get_or_create(&labels)
                .clone(),
            conns_total: metrics
                .downstream_connections_total
                .get_or_create(&labels)
                .clone(),
        })
    }

    /// Envoy's filter chain match: first the most specific server-name level that any
    /// chain matches, then, among the chains at that level, one that requires this exact
    /// transport before one that accepts either. No backtracking to a less specific name.
    pub fn select(&self, sni: Option<&str>, is_tls: bool) -> Option<&CompiledChain> {
        let best = self
            .chains
            .iter()
            .filter_map(|c| c.specificity(sni))
            .max()?;
        let mut fallback = None;
        for chain in self
            .chains
            .iter()
            .filter(|c| c.specificity(sni) == Some(best))
        {
            match chain.transport {
                Some(t) if t == is_tls => return Some(chain),
                None if fallback.is_none() => fallback = Some(chain),
                _ => {}
            }
        }
        fallback
    }
}

fn same_tls(a: &TlsTermination, b: &TlsTermination) -> bool {
    a.alpn == b.alpn
        && a.certificates.len() == b.certificates.len()
        && a.certificates.iter().zip(&b.certificates).all(|(x, y)| {
            x.cert_chain_pem == y.cert_chain_pem && x.private_key_pem == y.private_key_pem
        })
}

// ---------------------------------------------------------------------------------------
// Accept loop
// ---------------------------------------------------------------------------------------

/// Starts the accept loop of a bound listener. It runs until `stop` turns true (or its
/// sender is dropped); then it closes the socket (new connections are refused), tells
/// the connections to drain, waits up to the drain timeout, aborts the rest, and reports.
pub fn spawn(
    listener: TcpListener,
    table: Arc<ArcSwap<ChainTable>>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<DrainReport> {
    tokio::spawn(async move {
        let local = match listener.local_addr() {
            Ok(a) => a,
            Err(e) => {
                tracing::error!(error = %e, "listener has no local address");
                return DrainReport::default();
            }
        };
        configure_listening(&listener);
        let (drain_tx, drain_rx) = watch::channel(false);
        let tracker = Arc::new(ConnTracker::default());
        let mut handles = AbortHandles::default();
        let mut accept_errors = 0u32;
        loop {
            tokio::select! {
                biased;
                () = stopped(&mut stop) => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        accept_errors = 0;
                        let table = table.load_full();
                        table.conns_total.inc();
                        let guard = ConnGuard::new(&tracker, table.conns_active.clone());
                        let shared = shared.clone();
                        let drain = drain_rx.clone();
                        // Boxed: the connection future is kilobytes (about 3 KiB for a
                        // plaintext HTTP/1 connection); the task cell then holds a pointer,
                        // so spawning and completing the task do not copy it around.
                        let task = tokio::spawn(Box::pin(async move {
                            let _guard = guard;
                            handle(stream, peer, local, table, shared, drain).await;
                        }));
                        handles.push(task.abort_handle());
                    }
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning on the error.
                        accept_errors = accept_errors.saturating_add(1);
                        let name = table.load().name.clone();
                        tracing::warn!(listener = %name, error = %e, "accept failed");
                        let backoff = Duration::from_millis(5u64 << accept_errors.min(7));
                        tokio::time::sleep(backoff).await;
                    }
                },
            }
        }
        let name = table.load().name.clone();
        drop(listener);
        let _ = drain_tx.send(true);
        let report = drain(&tracker, handles, shared.options.drain_timeout).await;
        tracing::info!(
            listener = %name,
            address = %local,
            drained = report.drained,
            aborted = report.aborted,
            "listener stopped"
        );
        report
    })
}

/// Linux copies TCP_NODELAY and the keepalive settings of a listening socket to the
/// sockets it accepts: set once on the listener, they cost no syscall per connection.
const SOCKET_OPTIONS_INHERITED: bool = cfg!(any(target_os = "linux", target_os = "android"));

/// TCP_NODELAY and keepalive probes for downstream connections.
fn configure_socket(socket: socket2::SockRef<'_>) {
    let _ = socket.set_tcp_nodelay(true);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_TIME)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_RETRIES);
    let _ = socket.set_tcp_keepalive(&keepalive);
}

/// Sets the downstream socket options on the listening socket, for its accepted sockets
/// to inherit (see [`SOCKET_OPTIONS_INHERITED`]).
fn configure_listening(listener: &TcpListener) {
    if SOCKET_OPTIONS_INHERITED {
        configure_socket(socket2::SockRef::from(listener));
    }
}

/// Resolves when `stop` turns true or its sender is gone.
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Waits for the tracked connections to end, up to `timeout`, then aborts the rest and
/// waits until the aborted tasks are gone.
async fn drain(tracker: &ConnTracker, handles: AbortHandles, timeout: Duration) -> DrainReport {
    let at_start = tracker.active();
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    let timed_out = tokio::select! {
        () = tracker.idle() => false,
        () = &mut deadline => true,
    };
    let aborted = if timed_out { tracker.active() } else { 0 };
    if aborted > 0 {
        for h in handles.0 {
            h.abort();
        }
        tracker.idle().await;
    }
    DrainReport {
        drained: at_start.saturating_sub(aborted),
        aborted,
    }
}

/// Open connections of one listener: a count and a wake-up when it reaches zero. The
/// connection tasks are detached; nothing polls for their completion while serving.
#[derive(Default)]
struct ConnTracker {
    active: AtomicUsize,
    zero: Notify,
}

impl ConnTracker {
    fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// Resolves once no connection is open.
    async fn idle(&self) {
        loop {
            // Registered before the check, so a decrement to zero in between still wakes.
            let notified = self.zero.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.active() == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// One open connection: keeps the tracker's count and `downstream_connections_active`
/// right, also when the connection task is aborted.
struct ConnGuard {
    tracker: Arc<ConnTracker>,
    gauge: Gauge,
}

impl ConnGuard {
    fn new(tracker: &Arc<ConnTracker>, gauge: Gauge) -> Self {
        tracker.active.fetch_add(1, Ordering::AcqRel);
        gauge.inc();
        Self {
            tracker: tracker.clone(),
            gauge,
        }
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.gauge.dec();
        if self.tracker.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.tracker.zero.notify_waiters();
        }
    }
}

/// Abort handles of the connection tasks, for the drain deadline. Handles of finished
/// tasks are pruned when the list has doubled since the last pruning (amortised O(1) per
/// connection; a finished task's handle only pins its small task cell meanwhile).
struct AbortHandles(Vec<AbortHandle>, usize);

impl Default for AbortHandles {
    fn default() -> Self {
        Self(Vec::new(), Self::MIN_PRUNE)
    }
}

impl AbortHandles {
    const MIN_PRUNE: usize = 64;

    fn push(&mut self, h: AbortHandle) {
        self.0.push(h);
        if self.0.len() >= self.1 {
            self.0.retain(|h| !h.is_finished());
            self.1 = (self.0.len() * 2).max(Self::MIN_PRUNE);
        }
    }
}

// ---------------------------------------------------------------------------------------
// One connection
// ---------------------------------------------------------------------------------------

async fn handle(
    stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    table: Arc<ChainTable>,
    shared: Arc<Shared>,
    drain: watch::Receiver<bool>,
) {
    if !SOCKET_OPTIONS_INHERITED {
        configure_socket(socket2::SockRef::from(&stream));
    }

    let hello = if table.inspect {
        match tokio::time::timeout(INSPECT_TIMEOUT, inspect(&stream)).await {
            Ok(Ok(hello)) => hello,
            Ok(Err(e)) => {
                tracing::debug!(listener = %table.name, %peer, error = %e, "closing: bad first bytes");
                return;
            }
            Err(_) => {
                tracing::debug!(listener = %table.name, %peer, "closing: no ClientHello in time");
                return;
            }
        }
    } else {
        None
    };
    let is_tls = hello.is_some() || table.assume_tls;
    let sni = hello.and_then(|h| h.sni);
    let Some(chain) = table.select(sni.as_deref(), is_tls) else {
        tracing::debug!(listener = %table.name, %peer, ?sni, is_tls, "closing: no filter chain matches");
        return;
    };
    let conn = ConnInfo {
        listener: table.name.clone(),
        peer,
        local,
        tls: false,
        alpn_h2: false,
        sni: sni.map(Arc::from),
    };
    let handler = chain.handler.clone();
    match chain.acceptor.clone() {
        None => {
            drop(table);
            dispatch(stream, conn, handler, shared, drain).await;
        }
        Some(acceptor) => {
            drop(table);
            // Boxed, like every branch a plaintext HTTP/1 connection does not take: the
            // task's future is as large as its largest branch, and an idle keep-alive
            // connection should not carry the TLS and L4 states around.
            Box::pin(tls_then_dispatch(
                stream, acceptor, conn, handler, shared, drain,
            ))
            .await;
        }
    }
}

/// TLS termination, then the chain's handler on the decrypted stream.
async fn tls_then_dispatch(
    stream: TcpStream,
    acceptor: TlsAcceptor,
    mut conn: ConnInfo,
    handler: Handler,
    shared: Arc<Shared>,
    drain: watch::Receiver<bool>,
) {
    let peer = conn.peer;
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::debug!(listener = %conn.listener, %peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(listener = %conn.listener, %peer, "TLS handshake timed out");
            return;
        }
    };
    let (_, session) = tls.get_ref();
    conn.tls = true;
    conn.alpn_h2 = session.alpn_protocol() == Some(b"h2");
    if conn.sni.is_none() {
        conn.sni = session.server_name().map(Arc::from);
    }
    dispatch(tls, conn, handler, shared, drain).await;
}

async fn dispatch<IO>(
    io: IO,
    conn: ConnInfo,
    handler: Handler,
    shared: Arc<Shared>,
    drain: watch::Receiver<bool>,
) where
    IO: crate::http::h1::ConnIo,
{
    match handler {
        Handler::Http(hcm) => crate::http::serve_connection(io, conn, hcm, shared, drain).await,
        Handler::Tcp(tcp) => {
            // An L4 session has no request boundary to stop at: on drain it keeps going
            // until it ends or the drain deadline aborts it (as Envoy's tcp_proxy does).
            if let Err(e) = Box::pin(crate::tcp::proxy(io, &conn, &tcp)).await {
                tracing::debug!(listener = %conn.listener, peer = %conn.peer, error = %e, "tcp proxy");
            }
        }
    }
}

/// Why the first bytes could not be inspected.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("connection closed before the first bytes were complete")]
    Eof,
    #[error(transparent)]
    Hello(#[from] HelloError),
    #[error("peek: {0}")]
    Io(#[from] std::io::Error),
}

/// Peeks (without consuming) the connection's first bytes: `None` for plaintext, the
/// ClientHello's SNI and ALPN for TLS. Bytes stay in the socket for whoever reads next.
///
/// A hello split over TCP segments is peeked again once more bytes arrive. To wait for
/// them without spinning, the peek runs inside `try_io`, which clears the socket's read
/// readiness when it reports `WouldBlock` (i.e. "nothing new"), race-free against a new
/// arrival. The peek itself goes through a dup'd descriptor of the same socket, since tokio
/// has no synchronous peek; O_NONBLOCK is shared by both descriptors.
async fn inspect(stream: &TcpStream) -> Result<Option<ClientHelloInfo>, InspectError> {
    let dup: std::net::TcpStream = socket2::SockRef::from(stream).try_clone()?.into();
    let mut buf = vec![0u8; INITIAL_PEEK];
    let mut seen = 0usize;
    loop {
        stream.readable().await?;
        let peeked = stream.try_io(Interest::READABLE, || {
            let n = dup.peek(&mut buf)?;
            if n != 0 && n == seen {
                // Nothing new since the last look: wait for the next arrival.
                return Err(std::io::ErrorKind::WouldBlock.into());
            }
            Ok(n)
        });
        let n = match peeked {
            Ok(0) => return Err(InspectError::Eof),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e.into()),
        };
        seen = n;
        match tls::parse_client_hello(&buf[..n])? {
            Inspection::NotTls => return Ok(None),
            Inspection::Hello(hello) => return Ok(Some(hello)),
            Inspection::Incomplete { needed } => {
                if needed > MAX_PEEK {
                    return Err(HelloError::TooLarge.into());
                }
                if needed > buf.len() {
                    buf.resize(needed.max(buf.len() * 2).min(MAX_PEEK), 0);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

    use super::*;
    use biplane_config::{ChainMatch, FilterChain, TcpProxy, WeightedCluster};

    fn chain(name: &str, names: &[&str], tls: Option<bool>) -> FilterChain {
        FilterChain {
            name: name.into(),
            matcher: ChainMatch {
                server_names: names.iter().map(|s| s.to_string()).collect(),
                tls,
            },
            tls: None,
            handler: ChainHandler::Tcp(TcpProxy {
                stat_prefix: name.into(),
                clusters: vec![WeightedCluster {
                    name: "c".into(),
                    weight: 1,
                }],
                idle_timeout: None,
            }),
        }
    }

    fn table(chains: Vec<FilterChain>) -> ChainTable {
        let listener = biplane_config::Listener {
            name: "l".into(),
            address: "127.0.0.1:0".parse().unwrap(),
            filter_chains: chains,
        };
        let metrics = Arc::new(Metrics::new());
        let http = crate::http::compile(&biplane_config::Config::default(), &metrics, None);
        ChainTable::compile(&listener, &http, &metrics, None).unwrap()
    }

    fn pick<'a>(t: &'a ChainTable, sni: Option<&str>, tls: bool) -> Option<&'a str> {
        t.select(sni, tls).map(|c| c.name.as_str())
    }

    #[test]
    fn sni_selection_follows_envoy_precedence() {
        let t = table(vec![
            chain("any", &[], None),
            chain("wild", &["*.example.com"], Some(true)),
            chain("deep", &["*.b.example.com"], Some(true)),
            chain(
                "exact",
                &["a.b.example.com", "Other.Example.ORG"],
                Some(true),
            ),
            chain("star", &["*"], Some(true)),
        ]);
        assert_eq!(pick(&t, Some("a.b.example.com"), true), Some("exact"));
        assert_eq!(pick(&t, Some("other.example.org"), true), Some("exact"));
        assert_eq!(pick(&t, Some("x.b.example.com"), true), Some("deep"));
        assert_eq!(pick(&t, Some("x.y.b.example.com"), true), Some("deep"));
        assert_eq!(pick(&t, Some("z.example.com"), true), Some("wild"));
        assert_eq!(pick(&t, Some("z.y.example.com"), true), Some("wild"));
        // The wildcard does not match its own suffix.
        assert_eq!(pick(&t, Some("example.com"), true), Some("star"));
        assert_eq!(pick(&t, Some("elsewhere.net"), true), Some("star"));
        // Without SNI only chains without server names match.
        assert_eq!(pick(&t, None, true), Some("any"));
        assert_eq!(pick(&t, None, false), Some("any"));
    }

    #[test]
    fn transport_requirement_is_respected_without_backtracking() {
        let t = table(vec![
            chain("tls-only", &[], Some(true)),
            chain("plain-only", &[], Some(false)),
            chain("named-plain", &["a.example.com"], Some(false)),
        ]);
        assert_eq!(pick(&t, None, true), Some("tls-only"));
        assert_eq!(pick(&t, None, false), Some("plain-only"));
        assert_eq!(pick(&t, Some("b.example.com"), true), Some("tls-only"));
        // The most specific name level wins first; its only chain wants plaintext, so a
        // TLS connection for that name matches nothing (Envoy does not fall back).
        assert_eq!(pick(&t, Some("a.example.com"), true), None);
        assert!(t.inspect);

        let only_named = table(vec![chain("n", &["a.example.com"], None)]);
        assert_eq!(pick(&only_named, Some("b.example.com"), true), None);
        assert_eq!(pick(&only_named, None, false), None);
    }

    #[test]
    fn plain_listener_does_not_inspect() {
        let t = table(vec![chain("a", &[], None), chain("b", &[], None)]);
        assert!(!t.inspect);
        assert_eq!(pick(&t, None, false), Some("a"));
    }

    #[test]
    fn terminating_listener_without_names_does_not_inspect() {
        let c = rcgen::generate_simple_self_signed(vec!["a.example.com".to_owned()]).unwrap();
        let mut term = chain("tls", &[], None);
        term.tls = Some(TlsTermination {
            certificates: vec![biplane_config::Certificate {
                name: "s".into(),
                cert_chain_pem: c.cert.pem(),
                private_key_pem: c.signing_key.serialize_pem(),
            }],
            alpn: Vec::new(),
        });
        let t = table(vec![term.clone()]);
        assert!(!t.inspect && t.assume_tls);
        assert_eq!(pick(&t, None, true), Some("tls"));
        // Next to a plaintext chain the transport decides: inspect.
        let t = table(vec![term, chain("plain", &[], Some(false))]);
        assert!(t.inspect);
        assert_eq!(pick(&t, None, false), Some("plain"));
        assert_eq!(pick(&t, None, true), Some("tls"));
    }

    #[tokio::test]
    async fn inspect_reads_a_hello_split_over_segments_without_consuming_it() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let wire = crate::tls::tests::rustls_client_hello("split.example.com", &[b"h2"]);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut client = TcpStream::connect(addr).await.unwrap();
        client.set_nodelay(true).unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let (head, tail) = wire.split_at(7);
        client.write_all(head).await.unwrap();
        let task = tokio::spawn(async move {
            let hello = inspect(&server).await;
            (hello, server)
        });
        // Let the inspector see the partial hello and go back to waiting.
        tokio::task::yield_now().await;
        client.write_all(tail).await.unwrap();
        let (hello, mut server) = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
        let hello = hello.unwrap().unwrap();
        assert_eq!(hello.sni.as_deref(), Some("split.example.com"));
        let mut all = vec![0u8; wire.len()];
        server.read_exact(&mut all).await.unwrap();
        assert_eq!(all, wire);
    }

    #[tokio::test]
    async fn tracker_counts_connections_and_prunes_finished_handles() {
        let tracker = Arc::new(ConnTracker::default());
        let gauge = Gauge::default();
        let mut handles = AbortHandles::default();
        let (release, wait) = watch::channel(false);
        for _ in 0..AbortHandles::MIN_PRUNE * 3 {
            let guard = ConnGuard::new(&tracker, gauge.clone());
            let mut wait = wait.clone();
            let task = tokio::spawn(Box::pin(async move {
                let _guard = guard;
                stopped(&mut wait).await;
            }));
            handles.push(task.abort_handle());
        }
        let open = AbortHandles::MIN_PRUNE * 3;
        assert_eq!((tracker.active(), gauge.get()), (open, open as i64));
        release.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), tracker.idle())
            .await
            .unwrap();
        assert_eq!(gauge.get(), 0);
        // Finished tasks' handles go at the next pruning.
        while handles.0.len() >= AbortHandles::MIN_PRUNE - 1 {
            let task = tokio::spawn(async {});
            handles.push(task.abort_handle());
            tokio::task::yield_now().await;
        }
        assert!(
            handles.0.len() < AbortHandles::MIN_PRUNE,
            "{}",
            handles.0.len()
        );
    }

    #[tokio::test]
    async fn drain_reports_finished_and_aborts_the_rest() {
        let tracker = Arc::new(ConnTracker::default());
        let mut handles = AbortHandles::default();
        let (finish, wait) = watch::channel(false);
        // One connection ends during the drain, one never does.
        for ends in [true, false] {
            let guard = ConnGuard::new(&tracker, Gauge::default());
            let mut wait = wait.clone();
            let task = tokio::spawn(async move {
                let _guard = guard;
                if ends {
                    stopped(&mut wait).await;
                } else {
                    std::future::pending::<()>().await;
                }
            });
            handles.push(task.abort_handle());
        }
        let drain =
            tokio::spawn(async move { drain(&tracker, handles, Duration::from_millis(300)).await });
        // Let the drain start (current-thread runtime: the spawned tasks run first).
        tokio::task::yield_now().await;
        finish.send(true).unwrap();
        let report = tokio::time::timeout(Duration::from_secs(5), drain)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            report,
            DrainReport {
                drained: 1,
                aborted: 1
            }
        );
    }

    #[tokio::test]
    async fn accepted_sockets_get_nodelay_and_keepalive() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        configure_listening(&listener);
        let _client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        if !SOCKET_OPTIONS_INHERITED {
            configure_socket(socket2::SockRef::from(&server));
        }
        let sock = socket2::SockRef::from(&server);
        assert!(sock.tcp_nodelay().unwrap());
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.tcp_keepalive_time().unwrap(), KEEPALIVE_TIME);
        assert_eq!(sock.tcp_keepalive_interval().unwrap(), KEEPALIVE_INTERVAL);
        assert_eq!(sock.tcp_keepalive_retries().unwrap(), KEEPALIVE_RETRIES);
    }

    #[tokio::test]
    async fn inspect_says_plaintext_for_http() {
        use tokio::io::AsyncWriteExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        assert_eq!(inspect(&server).await.unwrap(), None);
    }
}
