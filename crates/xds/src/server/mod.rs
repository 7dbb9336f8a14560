//! The xDS v3 Aggregated Discovery Service: State of the World ([`sotw`]) and Delta
//! ([`delta`]) over one tonic service, fed by a per-Gateway [`SnapshotCache`] and
//! reporting to a [`FleetStatus`].
//!
//! # Use
//! ```no_run
//! # async fn demo(listener: tokio::net::TcpListener) -> Result<(), tonic::transport::Error> {
//! use biplane_xds::server::{AdsServer, FleetStatus, GatewayKey, ServerSettings, SnapshotCache};
//! let cache = SnapshotCache::new();
//! let fleet = FleetStatus::new();
//! let ads = AdsServer::new(cache.clone(), fleet.clone());
//! // later, per Gateway and change: cache.set(&GatewayKey::new("default", "gw"), &resources)
//! ServerSettings::default()
//!     .builder()
//!     .add_service(ads.into_service())
//!     .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
//!     .await
//! # }
//! ```
//!
//! # Protocol (see `shared/xds-notes.md`)
//! - The node comes from the first request (without it: `INVALID_ARGUMENT`); its
//!   `node.cluster` names the Gateway, `name` or `namespace/name` (namespace `default`).
//! - A Gateway without a snapshot gets no responses until it has one (no empty config).
//! - Push order: CDS, EDS, SDS, LDS, RDS; make before break: clusters that a change
//!   removes stay (SotW: kept in a CDS response of its own version; Delta: their
//!   `removed_resources` held back) until every other type was pushed and answered,
//!   then a final CDS response removes them. A change is coalesced: each stream builds a
//!   response only when its (bounded, 1-deep) outbound queue has room, from the latest
//!   snapshot, so a slow or never-ACKing node holds at most one pending response.
//! - ACK = `response_nonce` of the latest response and no `error_detail`; NACK =
//!   `error_detail`. A NACKed version is never re-sent on that stream: the type is
//!   parked until the Gateway's content of that type changes.
//! - Unknown type URLs and nonces this server cannot have issued end that stream with
//!   `INVALID_ARGUMENT`; other streams are unaffected.

pub mod cache;
pub mod delta;
pub mod sotw;
pub mod status;
mod stream;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use envoy_types::pb::envoy::config::core::v3::{ControlPlane, Node, node};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::ResourceKind;

pub use self::stream::PeerCerts;
pub use cache::{CacheError, CachedResource, SetOutcome, Snapshot, SnapshotCache, TypeSnapshot};
pub use status::{
    AckEvent, AdsMetrics, FleetEvent, FleetStatus, NackStatus, NodeStatus, Protocol, TypeCounters,
    TypeStatus,
};

/// The order in which a change is pushed: clusters and their endpoints before the
/// listeners and routes that use them, secrets before the listeners that use them.
pub const PUSH_ORDER: [ResourceKind; 5] = [
    ResourceKind::Cluster,
    ResourceKind::ClusterLoadAssignment,
    ResourceKind::Secret,
    ResourceKind::Listener,
    ResourceKind::RouteConfiguration,
];

/// Static facts about one resource type, indexed like [`PUSH_ORDER`].
pub(crate) struct TypeInfo {
    pub(crate) kind: ResourceKind,
    pub(crate) url: &'static str,
    /// LDS/CDS: wildcard subscriptions, and SotW responses carry the full set.
    pub(crate) full_set: bool,
}

pub(crate) const TYPES: [TypeInfo; 5] = [
    TypeInfo {
        kind: ResourceKind::Cluster,
        url: "type.googleapis.com/envoy.config.cluster.v3.Cluster",
        full_set: true,
    },
    TypeInfo {
        kind: ResourceKind::ClusterLoadAssignment,
        url: "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
        full_set: false,
    },
    TypeInfo {
        kind: ResourceKind::Secret,
        url: "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
        full_set: false,
    },
    TypeInfo {
        kind: ResourceKind::Listener,
        url: "type.googleapis.com/envoy.config.listener.v3.Listener",
        full_set: true,
    },
    TypeInfo {
        kind: ResourceKind::RouteConfiguration,
        url: "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
        full_set: false,
    },
];

/// Index of a type URL in [`PUSH_ORDER`].
pub(crate) fn type_index(url: &str) -> Option<usize> {
    TYPES.iter().position(|t| t.url == url)
}

/// Index of a kind in [`PUSH_ORDER`] (`None` for `Unknown`).
pub(crate) fn kind_index(kind: ResourceKind) -> Option<usize> {
    PUSH_ORDER.iter().position(|k| *k == kind)
}

/// A Gateway, as named by a node's `node.cluster`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GatewayKey {
    pub namespace: String,
    pub name: String,
}

impl GatewayKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        GatewayKey {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// `name` (namespace `default`) or `namespace/name`; `None` when empty or malformed.
    pub fn parse(s: &str) -> Option<Self> {
        let (ns, name) = match s.split_once('/') {
            Some((ns, name)) => (ns, name),
            None => ("default", s),
        };
        if ns.is_empty() || name.is_empty() || name.contains('/') {
            return None;
        }
        Some(GatewayKey::new(ns, name))
    }
}

impl std::fmt::Display for GatewayKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Decides whether a stream's node may be served, given the client certificate chain
/// the TLS layer verified (`None` on plaintext). Called once per stream with the node of
/// its first request; an `Err` ends the stream with that status (e.g.
/// `PERMISSION_DENIED` when the node claims another identity than its certificate's).
pub type NodeAuthorizer = Arc<
    dyn Fn(&Node, Option<&[rustls_pki_types::CertificateDer<'static>]>) -> Result<(), Status>
        + Send
        + Sync,
>;

/// Options of the ADS service.
#[derive(Clone)]
pub struct AdsOptions {
    /// Sent as `control_plane.identifier` in every response (shown in Envoy's config
    /// dump).
    pub control_plane_id: String,
    /// Checks each stream's node against its peer certificate (none: every node served).
    pub authorizer: Option<NodeAuthorizer>,
}

impl std::fmt::Debug for AdsOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdsOptions")
            .field("control_plane_id", &self.control_plane_id)
            .field("authorizer", &self.authorizer.is_some())
            .finish()
    }
}

impl Default for AdsOptions {
    fn default() -> Self {
        AdsOptions {
            control_plane_id: "biplane".to_owned(),
            authorizer: None,
        }
    }
}

/// The optional authorizer, debug-printable.
#[derive(Clone, Default)]
pub(crate) struct AuthorizerSlot(pub(crate) Option<NodeAuthorizer>);

impl std::fmt::Debug for AuthorizerSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "Some(..)" } else { "None" })
    }
}

/// The ADS service. Cheap to clone; implements envoy-types' `AggregatedDiscoveryService`.
#[derive(Clone, Debug)]
pub struct AdsServer {
    inner: Arc<Shared>,
}

#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) cache: SnapshotCache,
    pub(crate) fleet: FleetStatus,
    pub(crate) control_plane: ControlPlane,
    pub(crate) authorizer: AuthorizerSlot,
    /// Node ids whose streams must end now ([`AdsServer::disconnect`]).
    pub(crate) disconnects: tokio::sync::broadcast::Sender<Arc<str>>,
}

impl AdsServer {
    pub fn new(cache: SnapshotCache, fleet: FleetStatus) -> Self {
        Self::with_options(cache, fleet, AdsOptions::default())
    }

    pub fn with_options(cache: SnapshotCache, fleet: FleetStatus, opts: AdsOptions) -> Self {
        AdsServer {
            inner: Arc::new(Shared {
                cache,
                fleet,
                control_plane: ControlPlane {
                    identifier: opts.control_plane_id,
                },
                authorizer: AuthorizerSlot(opts.authorizer),
                disconnects: tokio::sync::broadcast::channel(DISCONNECT_CAPACITY).0,
            }),
        }
    }

    /// Ends every stream of `node_id` with `PERMISSION_DENIED` (revocation). Streams
    /// opened afterwards are refused by the authorizer, which must already refuse the
    /// node when this is called.
    pub fn disconnect(&self, node_id: &str) {
        let _ = self.inner.disconnects.send(Arc::from(node_id));
    }

    pub fn cache(&self) -> &SnapshotCache {
        &self.inner.cache
    }

    pub fn fleet(&self) -> &FleetStatus {
        &self.inner.fleet
    }

    /// The tonic service to add to a `Server` (message size limits: 64 MiB decode, so a
    /// large NACK detail or subscription list is accepted).
    pub fn into_service(self) -> AggregatedDiscoveryServiceServer<AdsServer> {
        AggregatedDiscoveryServiceServer::new(self).max_decoding_message_size(64 << 20)
    }
}

/// Pending [`AdsServer::disconnect`] calls a slow stream may lag behind before it
/// re-checks its authorization instead.
const DISCONNECT_CAPACITY: usize = 64;

/// Outbound queue depth per stream: one response waits while the transport drains the
/// previous one; everything newer is coalesced into the next response.
const QUEUE_DEPTH: usize = 1;

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsServer {
    type StreamAggregatedResourcesStream = ReceiverStream<Result<DiscoveryResponse, Status>>;
    type DeltaAggregatedResourcesStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let shared = self.inner.clone();
        let peer = request.peer_certs();
        tokio::spawn(stream::run::<sotw::SotwState>(
            shared,
            request.into_inner(),
            peer,
            tx,
        ));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let shared = self.inner.clone();
        let peer = request.peer_certs();
        tokio::spawn(stream::run::<delta::DeltaState>(
            shared,
            request.into_inner(),
            peer,
            tx,
        ));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// gRPC transport settings for the xDS listener.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// HTTP/2 PING interval (detects dead peers behind NATs and half-open TCP).
    pub keepalive_interval: Duration,
    /// Close the connection when a PING is not answered within this time.
    pub keepalive_timeout: Duration,
    /// Close connections (GOAWAY) after this age so nodes rebalance across replicas;
    /// Envoy reconnects at once and its configuration is kept meanwhile.
    pub max_connection_age: Option<Duration>,
    /// After `max_connection_age`, how long in-flight streams get before a hard close.
    pub max_connection_age_grace: Duration,
    /// HTTP/2 concurrent streams per connection.
    pub max_concurrent_streams: u32,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            max_connection_age: Some(Duration::from_secs(30 * 60)),
            max_connection_age_grace: Duration::from_secs(60),
            max_concurrent_streams: 64,
        }
    }
}

impl ServerSettings {
    /// A tonic server builder with these settings.
    pub fn builder(&self) -> tonic::transport::Server {
        let mut b = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(self.keepalive_interval))
            .http2_keepalive_timeout(Some(self.keepalive_timeout))
            .max_concurrent_streams(self.max_concurrent_streams)
            .tcp_nodelay(true);
        if let Some(age) = self.max_connection_age {
            b = b
                .max_connection_age(age)
                .max_connection_age_grace(self.max_connection_age_grace);
        }
        b
    }
}

// ---- shared by sotw.rs and delta.rs ----

/// Stream ids: unique in this process; seeded from the clock so nonces of a previous
/// process are unlikely to look like this stream's.
fn next_stream_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let seed = || {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| (d.as_secs() & 0xff_ffff) << 24)
            .unwrap_or(1 << 24)
    };
    let _ = NEXT.compare_exchange(0, seed(), Ordering::Relaxed, Ordering::Relaxed);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Nonces are `<stream id hex>-<counter>`, so a nonce can be classified.
#[derive(Debug)]
pub(crate) struct Nonces {
    stream_id: u64,
    issued: u64,
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum NonceKind {
    /// Issued on this stream (the counter value).
    Ours(u64),
    /// Well formed but from another stream (e.g. before a reconnect).
    Foreign,
}

impl Nonces {
    fn new(stream_id: u64) -> Self {
        Nonces {
            stream_id,
            issued: 0,
        }
    }

    /// A fresh nonce and its counter value.
    pub(crate) fn next(&mut self) -> (u64, String) {
        self.issued += 1;
        (self.issued, format!("{:x}-{}", self.stream_id, self.issued))
    }

    /// Classifies a non-empty `response_nonce`; `Err` for one no server of ours could
    /// have issued (garbage, or a future counter on this stream).
    pub(crate) fn classify(&self, nonce: &str) -> Result<NonceKind, Status> {
        let bad = || {
            Status::invalid_argument(format!(
                "response_nonce {nonce:?} was never sent on this stream"
            ))
        };
        let (id, n) = nonce.split_once('-').ok_or_else(bad)?;
        let id = u64::from_str_radix(id, 16).map_err(|_| bad())?;
        let n: u64 = n.parse().map_err(|_| bad())?;
        if id != self.stream_id {
            return Ok(NonceKind::Foreign);
        }
        if n == 0 || n > self.issued {
            return Err(bad());
        }
        Ok(NonceKind::Ours(n))
    }
}

/// The stream-level bookkeeping common to both variants: ids, counters, the node's entry
/// in the fleet map and the Gateway watch. Dropped when the stream task ends.
pub(crate) struct StreamCtx {
    pub(crate) node: status::NodeHandle,
    pub(crate) watch: cache::GatewayWatch,
    pub(crate) nonces: Nonces,
    pub(crate) node_id: String,
    pub(crate) gateway: GatewayKey,
}

/// Counts the stream in the metrics for as long as it lives.
pub(crate) struct StreamCounter(FleetStatus);

impl StreamCounter {
    pub(crate) fn new(fleet: &FleetStatus) -> Self {
        let m = fleet.metrics();
        m.streams_total.fetch_add(1, Ordering::Relaxed);
        m.streams_active.fetch_add(1, Ordering::Relaxed);
        StreamCounter(fleet.clone())
    }
}

impl Drop for StreamCounter {
    fn drop(&mut self) {
        self.0
            .metrics()
            .streams_active
            .fetch_sub(1, Ordering::Relaxed);
    }
}

impl StreamCtx {
    /// Validates the first request's node and registers the stream.
    pub(crate) fn start(
        shared: &Shared,
        node: Option<&Node>,
        protocol: Protocol,
    ) -> Result<Self, Status> {
        let node = node.ok_or_else(|| {
            Status::invalid_argument("the first request of a stream must carry `node`")
        })?;
        let gateway = GatewayKey::parse(&node.cluster).ok_or_else(|| {
            Status::invalid_argument(format!(
                "node.cluster must name the Gateway as `name` or `namespace/name`, got {:?}",
                node.cluster
            ))
        })?;
        let user_agent = match &node.user_agent_version_type {
            Some(node::UserAgentVersionType::UserAgentVersion(v)) => {
                format!("{} {v}", node.user_agent_name)
            }
            _ => node.user_agent_name.clone(),
        };
        let stream_id = next_stream_id();
        let handle = shared.fleet.register(
            stream_id,
            node.id.clone(),
            gateway.clone(),
            protocol,
            user_agent,
        );
        tracing::info!(node = %node.id, %gateway, %protocol, stream_id, "xDS stream opened");
        Ok(StreamCtx {
            node: handle,
            watch: shared.cache.watch(&gateway),
            nonces: Nonces::new(stream_id),
            node_id: node.id.clone(),
            gateway,
        })
    }

    /// The snapshot to serve now, if any.
    pub(crate) fn snapshot(&self) -> Option<Arc<Snapshot>> {
        self.watch.rx.borrow().clone()
    }
}

/// `INVALID_ARGUMENT` for a type URL this server does not serve.
pub(crate) fn unknown_type(url: &str) -> Status {
    Status::invalid_argument(format!(
        "unsupported type_url {url:?}; this server serves Cluster, ClusterLoadAssignment, \
         Secret, Listener and RouteConfiguration (envoy v3)"
    ))
}

/// The message of a NACK's `error_detail`.
pub(crate) fn nack_message(d: &envoy_types::pb::google::rpc::Status) -> String {
    if d.message.is_empty() {
        format!("(error_detail code {} without message)", d.code)
    } else {
        d.message.clone()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

    use super::*;

    #[test]
    fn type_table_matches_resource_kinds() {
        for (i, t) in TYPES.iter().enumerate() {
            assert_eq!(t.kind, PUSH_ORDER[i]);
            assert_eq!(t.url, t.kind.type_url());
            assert_eq!(type_index(t.url), Some(i));
        }
        assert_eq!(kind_index(ResourceKind::Unknown), None);
    }

    #[test]
    fn gateway_keys() {
        assert_eq!(
            GatewayKey::parse("gw"),
            Some(GatewayKey::new("default", "gw"))
        );
        assert_eq!(
            GatewayKey::parse("ns/gw"),
            Some(GatewayKey::new("ns", "gw"))
        );
        for bad in ["", "/gw", "ns/", "a/b/c"] {
            assert_eq!(GatewayKey::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn nonce_classification() {
        let mut n = Nonces::new(0xab);
        let (c, first) = n.next();
        assert_eq!((c, first.as_str()), (1, "ab-1"));
        assert_eq!(n.classify(&first).unwrap(), NonceKind::Ours(1));
        assert_eq!(n.classify("cd-7").unwrap(), NonceKind::Foreign);
        assert!(n.classify("ab-2").is_err());
        assert!(n.classify("ab-0").is_err());
        assert!(n.classify("garbage").is_err());
        assert!(n.classify("zz-1").is_err());
    }
}
