//! Fleet status: which nodes are connected, and per node and type what was sent, ACKed
//! and NACKed; connect/ACK/NACK/disconnect events for convergence measurement; counters.
//!
//! The node map sits behind a `std::sync::Mutex` that is only ever held for a map
//! operation (never across `.await`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Instant, SystemTime};

use tokio::sync::broadcast;

use super::{GatewayKey, PUSH_ORDER, kind_index};
use crate::ResourceKind;

/// The two ADS protocol variants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// State of the World (`StreamAggregatedResources`).
    Sotw,
    /// Incremental (`DeltaAggregatedResources`).
    Delta,
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::Sotw => "sotw",
            Protocol::Delta => "delta",
        })
    }
}

/// A NACK as the node reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NackStatus {
    /// The version the node rejected (it keeps its last good one).
    pub version: String,
    /// `error_detail.message`.
    pub message: String,
    pub at: SystemTime,
}

/// One resource type on one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeStatus {
    pub kind: ResourceKind,
    /// The node has asked for this type on this stream.
    pub subscribed: bool,
    /// Version of the last response sent.
    pub sent_version: Option<String>,
    pub sent_at: Option<SystemTime>,
    /// Last version the node ACKed.
    pub acked_version: Option<String>,
    pub acked_at: Option<SystemTime>,
    /// The most recent NACK (kept after later ACKs, for display).
    pub last_nack: Option<NackStatus>,
}

/// One connected node (one ADS stream).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeStatus {
    /// Unique per stream within this process.
    pub stream_id: u64,
    /// `node.id`.
    pub node_id: String,
    /// From `node.cluster`.
    pub gateway: GatewayKey,
    pub protocol: Protocol,
    pub connected_since: SystemTime,
    /// `node.user_agent_name` and version, e.g. `envoy 1.31.0` (may be empty).
    pub user_agent: String,
    /// The five types, in push order.
    pub types: Vec<TypeStatus>,
}

impl NodeStatus {
    pub fn type_status(&self, kind: ResourceKind) -> Option<&TypeStatus> {
        self.types.iter().find(|t| t.kind == kind)
    }
}

/// An ACK: the node applied `version` of `kind`. `at` is when the server read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckEvent {
    pub stream_id: u64,
    pub node_id: String,
    pub gateway: GatewayKey,
    pub kind: ResourceKind,
    pub version: String,
    pub at: Instant,
}

/// Something that happened to the fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FleetEvent {
    Connected {
        stream_id: u64,
        node_id: String,
        gateway: GatewayKey,
        protocol: Protocol,
    },
    Ack(AckEvent),
    Nack {
        ack: AckEvent,
        message: String,
    },
    Disconnected {
        stream_id: u64,
        node_id: String,
        gateway: GatewayKey,
    },
}

/// Counters per resource type.
#[derive(Debug, Default)]
pub struct TypeCounters {
    /// Responses sent.
    pub pushes: AtomicU64,
    pub acks: AtomicU64,
    pub nacks: AtomicU64,
}

/// Server counters, plain atomics (read them with `Ordering::Relaxed`).
#[derive(Debug, Default)]
pub struct AdsMetrics {
    /// Streams accepted since start.
    pub streams_total: AtomicU64,
    /// Streams open now.
    pub streams_active: AtomicU64,
    /// Streams ended by the server with an error status (bad requests).
    pub streams_rejected: AtomicU64,
    /// Requests ignored because their nonce was stale (SotW).
    pub stale_requests: AtomicU64,
    /// Per type, in push order.
    pub per_type: [TypeCounters; 5],
}

impl AdsMetrics {
    /// Counters of one type.
    pub fn of(&self, kind: ResourceKind) -> Option<&TypeCounters> {
        kind_index(kind).map(|i| &self.per_type[i])
    }

    /// `(kind, pushes, acks, nacks)` per type, in push order.
    pub fn per_type_values(&self) -> Vec<(ResourceKind, u64, u64, u64)> {
        PUSH_ORDER
            .iter()
            .zip(&self.per_type)
            .map(|(k, c)| {
                (
                    *k,
                    c.pushes.load(Ordering::Relaxed),
                    c.acks.load(Ordering::Relaxed),
                    c.nacks.load(Ordering::Relaxed),
                )
            })
            .collect()
    }
}

struct FleetInner {
    nodes: Mutex<BTreeMap<u64, NodeStatus>>,
    metrics: AdsMetrics,
    events: broadcast::Sender<FleetEvent>,
}

/// Shared view of every connected node. Cheap to clone.
#[derive(Clone)]
pub struct FleetStatus {
    inner: Arc<FleetInner>,
}

impl std::fmt::Debug for FleetStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetStatus")
            .field("nodes", &self.lock().len())
            .finish()
    }
}

impl Default for FleetStatus {
    fn default() -> Self {
        Self::new()
    }
}

/// Capacity of the event channel; a subscriber that falls further behind gets
/// `RecvError::Lagged` and misses events (the node map stays exact).
pub const EVENT_CAPACITY: usize = 4096;

impl FleetStatus {
    pub fn new() -> Self {
        FleetStatus {
            inner: Arc::new(FleetInner {
                nodes: Mutex::new(BTreeMap::new()),
                metrics: AdsMetrics::default(),
                events: broadcast::channel(EVENT_CAPACITY).0,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<u64, NodeStatus>> {
        self.inner
            .nodes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Every connected node, by stream id (connection order).
    pub fn nodes(&self) -> Vec<NodeStatus> {
        self.lock().values().cloned().collect()
    }

    /// The stream ids of every connected node (cheap: no node is cloned).
    pub fn stream_ids(&self) -> Vec<u64> {
        self.lock().keys().copied().collect()
    }

    /// Connected nodes of one Gateway.
    pub fn nodes_of(&self, gateway: &GatewayKey) -> Vec<NodeStatus> {
        self.lock()
            .values()
            .filter(|n| &n.gateway == gateway)
            .cloned()
            .collect()
    }

    /// Whether any node of `gateway` is connected (no copy of the nodes, unlike
    /// [`FleetStatus::nodes_of`]).
    pub fn has_nodes(&self, gateway: &GatewayKey) -> bool {
        self.lock().values().any(|n| &n.gateway == gateway)
    }

    /// Whether every connected node of `gateway` has ACKed `version` of `kind` (true
    /// when no node is connected, or no node subscribes to `kind`).
    pub fn all_acked(&self, gateway: &GatewayKey, kind: ResourceKind, version: &str) -> bool {
        self.lock()
            .values()
            .filter(|n| &n.gateway == gateway)
            .filter_map(|n| n.type_status(kind))
            .filter(|t| t.subscribed)
            .all(|t| t.acked_version.as_deref() == Some(version))
    }

    pub fn metrics(&self) -> &AdsMetrics {
        &self.inner.metrics
    }

    /// Subscribe to connect/ACK/NACK/disconnect events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<FleetEvent> {
        self.inner.events.subscribe()
    }

    fn emit(&self, e: FleetEvent) {
        // No subscriber is fine.
        let _ = self.inner.events.send(e);
    }

    pub(crate) fn register(
        &self,
        stream_id: u64,
        node_id: String,
        gateway: GatewayKey,
        protocol: Protocol,
        user_agent: String,
    ) -> NodeHandle {
        let status = NodeStatus {
            stream_id,
            node_id: node_id.clone(),
            gateway: gateway.clone(),
            protocol,
            connected_since: SystemTime::now(),
            user_agent,
            types: PUSH_ORDER
                .iter()
                .map(|k| TypeStatus {
                    kind: *k,
                    subscribed: false,
                    sent_version: None,
                    sent_at: None,
                    acked_version: None,
                    acked_at: None,
                    last_nack: None,
                })
                .collect(),
        };
        self.lock().insert(stream_id, status);
        self.emit(FleetEvent::Connected {
            stream_id,
            node_id: node_id.clone(),
            gateway: gateway.clone(),
            protocol,
        });
        NodeHandle {
            fleet: self.clone(),
            stream_id,
            node_id,
            gateway,
        }
    }
}

/// A stream's entry in the fleet map; removed (and `Disconnected` emitted) on drop.
pub(crate) struct NodeHandle {
    fleet: FleetStatus,
    stream_id: u64,
    node_id: String,
    gateway: GatewayKey,
}

impl NodeHandle {
    fn update(&self, i: usize, f: impl FnOnce(&mut TypeStatus)) {
        if let Some(t) = self
            .fleet
            .lock()
            .get_mut(&self.stream_id)
            .and_then(|n| n.types.get_mut(i))
        {
            f(t);
        }
    }

    pub(crate) fn metrics(&self) -> &AdsMetrics {
        self.fleet.metrics()
    }

    pub(crate) fn subscribed(&self, i: usize, on: bool) {
        self.update(i, |t| t.subscribed = on);
    }

    pub(crate) fn sent(&self, i: usize, version: &str) {
        self.fleet.metrics().per_type[i]
            .pushes
            .fetch_add(1, Ordering::Relaxed);
        self.update(i, |t| {
            t.sent_version = Some(version.to_owned());
            t.sent_at = Some(SystemTime::now());
        });
    }

    fn event(&self, i: usize, version: &str) -> AckEvent {
        AckEvent {
            stream_id: self.stream_id,
            node_id: self.node_id.clone(),
            gateway: self.gateway.clone(),
            kind: PUSH_ORDER[i],
            version: version.to_owned(),
            at: Instant::now(),
        }
    }

    pub(crate) fn acked(&self, i: usize, version: &str) {
        self.fleet.metrics().per_type[i]
            .acks
            .fetch_add(1, Ordering::Relaxed);
        self.update(i, |t| {
            t.acked_version = Some(version.to_owned());
            t.acked_at = Some(SystemTime::now());
        });
        self.fleet.emit(FleetEvent::Ack(self.event(i, version)));
    }

    pub(crate) fn nacked(&self, i: usize, version: &str, message: &str) {
        self.fleet.metrics().per_type[i]
            .nacks
            .fetch_add(1, Ordering::Relaxed);
        self.update(i, |t| {
            t.last_nack = Some(NackStatus {
                version: version.to_owned(),
                message: message.to_owned(),
                at: SystemTime::now(),
            });
        });
        self.fleet.emit(FleetEvent::Nack {
            ack: self.event(i, version),
            message: message.to_owned(),
        });
    }
}

impl Drop for NodeHandle {
    fn drop(&mut self) {
        self.fleet.lock().remove(&self.stream_id);
        self.fleet.emit(FleetEvent::Disconnected {
            stream_id: self.stream_id,
            node_id: std::mem::take(&mut self.node_id),
            gateway: self.gateway.clone(),
        });
    }
}
