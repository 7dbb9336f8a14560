//! The controller: follows the store (`/registry/`), keeps the current resources in memory
//! ([`World`]), and after each debounced burst of changes recompiles the Gateways the
//! burst touched into the [`SnapshotCache`] (whose no-op detection then keeps a Gateway
//! whose generated resources did not change from pushing). It
//! records, per Gateway, which store revision produced which xDS versions, so that fleet
//! ACKs turn into convergence times (store commit → last node ACK), per-node lag and the
//! `Programmed` condition.
//!
//! # Flow
//! 1. `range("/registry/")` at revision `R`, compile every Gateway, then
//!    `watch("/registry/", R + 1)`.
//!    Each compile records the Gateway's dependencies ([`gateway_deps`]): the Gateway,
//!    its certificate Secrets, the routes whose parentRefs name it and the Backends they
//!    reference — present or not, so creating a missing Backend recompiles the Gateways
//!    waiting for it. A burst recompiles a Gateway only if it changed one of those keys,
//!    or if a changed route now names it in its parentRefs.
//! 2. Each watch batch updates the [`World`] at once (status reads see it); compilation
//!    waits until no batch arrived for `debounce`, at most `max_debounce` after the first.
//! 3. A Gateway whose translation fails keeps serving its previous snapshot; the error is
//!    kept for its status (`Programmed=False`, reason `Invalid`). A deleted Gateway gets an
//!    empty snapshot, so its nodes drop their configuration.
//! 4. A watch that ends with a retryable error (compaction, lag) re-lists from step 1.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use biplane_api::{Gateway, Resource, ResourceKey, ResourceKind, ResourceSet, RouteRef};
use biplane_xds::server::{
    FleetEvent, FleetStatus, GatewayKey, NodeStatus, PUSH_ORDER, SetOutcome, SnapshotCache,
};
use biplane_xds::{ResourceKind as XdsKind, TranslateOptions, XdsResources, to_xds};
use tokio::sync::{broadcast, watch};

use crate::docs::{REGISTRY_PREFIX, parse_store_key};
use crate::metrics::Metrics;
use crate::store::{Event, KeyValue, Store, StoreError, WatchBatch};

/// How many compile records are kept per Gateway (for `Programmed` and lag lookups).
const MAX_RECORDS: usize = 64;
/// How many unconverged changes are tracked per Gateway.
const MAX_PENDING: usize = 256;

/// Controller tuning.
#[derive(Debug, Clone)]
pub struct ControllerOptions {
    /// Quiet time after the last change of a burst before compiling.
    pub debounce: Duration,
    /// Upper bound of the wait after the first change of a burst.
    pub max_debounce: Duration,
    /// Passed to `to_xds`.
    pub translate: TranslateOptions,
}

impl Default for ControllerOptions {
    fn default() -> Self {
        ControllerOptions {
            debounce: Duration::from_millis(100),
            max_debounce: Duration::from_secs(1),
            translate: TranslateOptions::default(),
        }
    }
}

/// One stored resource as the controller holds it.
#[derive(Debug, Clone)]
pub struct Item {
    /// The parsed resource.
    pub resource: Resource,
    /// The store revision that created the key.
    pub create_revision: u64,
    /// The store revision of its last change.
    pub mod_revision: u64,
}

/// Every resource at one store revision.
#[derive(Debug, Default)]
pub struct World {
    /// The store revision this view is at.
    pub revision: u64,
    /// Resources by key.
    pub items: BTreeMap<ResourceKey, Arc<Item>>,
    /// The same resources, oldest first (create revision, then key): Gateway API's
    /// "oldest route wins" tie-break.
    pub set: ResourceSet,
}

impl World {
    fn build(revision: u64, items: &BTreeMap<ResourceKey, Arc<Item>>) -> Self {
        let mut ordered: Vec<&Arc<Item>> = items.values().collect();
        ordered.sort_by(|a, b| {
            (a.create_revision, a.resource.key()).cmp(&(b.create_revision, b.resource.key()))
        });
        World {
            revision,
            items: items.clone(),
            set: ResourceSet::new(ordered.into_iter().map(|i| i.resource.clone()).collect()),
        }
    }
}

/// One compilation result of a Gateway that changed nothing since the previous record is
/// folded into it (`last_revision` moves on).
#[derive(Debug, Clone)]
pub struct CompileRecord {
    /// The first store revision compiled into these versions.
    pub first_revision: u64,
    /// The latest store revision compiled into these versions.
    pub last_revision: u64,
    /// The snapshot's version per type, indexed like [`PUSH_ORDER`].
    pub versions: [String; 5],
    /// When each type's version was first produced (the commit that changed it).
    produced_at: [Instant; 5],
}

#[derive(Debug, Clone, Copy)]
struct PendingChange {
    revision: u64,
    commit_at: Instant,
}

/// What the controller knows about one Gateway.
#[derive(Debug, Clone, Default)]
pub struct GatewayState {
    /// Compile records, oldest first.
    pub records: VecDeque<CompileRecord>,
    /// The translation error of the latest compilation, if it failed.
    pub error: Option<String>,
    pending: VecDeque<PendingChange>,
}

/// An ACK of a version the controller had not recorded yet: the cache publishes a
/// snapshot before [`ControllerShared::record`] runs, so a fast node can ACK first. It is
/// resolved into a lag when the record arrives.
#[derive(Debug, Clone)]
struct EarlyAck {
    stream_id: u64,
    index: usize,
    version: String,
    at: Instant,
}

/// Unresolved early ACKs kept per Gateway.
const MAX_EARLY_ACKS: usize = 256;

#[derive(Debug, Clone)]
struct NodeLag {
    connected_at: Option<Instant>,
    lag_ms: [Option<u64>; 5],
}

impl NodeLag {
    /// Records the lag of type `i`: from when its version was produced (or the node
    /// connected, if later) to the ACK.
    fn set_lag(&mut self, i: usize, produced: Instant, acked_at: Instant) {
        let start = self.connected_at.map_or(produced, |c| c.max(produced));
        let ms = acked_at.saturating_duration_since(start).as_millis();
        self.lag_ms[i] = Some(u64::try_from(ms).unwrap_or(u64::MAX));
    }
}

/// State shared by the controller task, the fleet tracker and the admin API.
#[derive(Debug)]
pub struct ControllerShared {
    world: watch::Sender<Arc<World>>,
    gateways: Mutex<BTreeMap<GatewayKey, GatewayState>>,
    lags: Mutex<HashMap<u64, NodeLag>>,
    /// Lock order: `gateways`, then `early_acks`, then (after both are released) `lags`.
    early_acks: Mutex<HashMap<GatewayKey, VecDeque<EarlyAck>>>,
    fleet: FleetStatus,
    metrics: Arc<Metrics>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn type_index(kind: XdsKind) -> Option<usize> {
    PUSH_ORDER.iter().position(|k| *k == kind)
}

impl ControllerShared {
    /// Empty state (revision 0, no Gateway).
    pub fn new(fleet: FleetStatus, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(ControllerShared {
            world: watch::channel(Arc::new(World::default())).0,
            gateways: Mutex::new(BTreeMap::new()),
            lags: Mutex::new(HashMap::new()),
            early_acks: Mutex::new(HashMap::new()),
            fleet,
            metrics,
        })
    }

    /// The latest view of the resources.
    pub fn world(&self) -> Arc<World> {
        self.world.borrow().clone()
    }

    /// The view at `revision` or later, waiting up to `timeout` for the controller to catch
    /// up (the latest view after that).
    pub async fn world_at(&self, revision: u64, timeout: Duration) -> Arc<World> {
        let mut rx = self.world.subscribe();
        let wait = rx.wait_for(|w| w.revision >= revision);
        match tokio::time::timeout(timeout, wait).await {
            Ok(Ok(w)) => w.clone(),
            _ => self.world(),
        }
    }

    /// A copy of one Gateway's state.
    pub fn gateway(&self, key: &GatewayKey) -> Option<GatewayState> {
        lock(&self.gateways).get(key).cloned()
    }

    /// Lag (commit → ACK, ms) per type of one stream, indexed like [`PUSH_ORDER`].
    pub fn node_lag(&self, stream_id: u64) -> [Option<u64>; 5] {
        lock(&self.lags)
            .get(&stream_id)
            .map(|l| l.lag_ms)
            .unwrap_or_default()
    }

    /// Whether `node` has ACKed, for every type it subscribes to, the versions of a
    /// compilation of a store revision `>= revision`.
    pub fn node_has_revision(&self, node: &NodeStatus, revision: u64) -> bool {
        let mut acked: Vec<(usize, &str)> = Vec::new();
        for t in node.types.iter().filter(|t| t.subscribed) {
            let (Some(i), Some(v)) = (type_index(t.kind), t.acked_version.as_deref()) else {
                return false;
            };
            acked.push((i, v));
        }
        if acked.is_empty() {
            return false;
        }
        let gateways = lock(&self.gateways);
        let Some(state) = gateways.get(&node.gateway) else {
            return false;
        };
        state
            .records
            .iter()
            .any(|r| r.last_revision >= revision && acked.iter().all(|(i, v)| r.versions[*i] == *v))
    }

    fn publish(&self, world: World) {
        self.metrics
            .store_revision
            .set(i64::try_from(world.revision).unwrap_or(i64::MAX));
        self.world.send_replace(Arc::new(world));
    }

    /// Records one Gateway's compilation.
    fn record(&self, key: &GatewayKey, revision: u64, commit_at: Instant, outcome: &SetOutcome) {
        let versions: [String; 5] = PUSH_ORDER.map(|k| {
            outcome
                .snapshot
                .version(k)
                .map(str::to_owned)
                .unwrap_or_default()
        });
        let has_nodes = !self.fleet.nodes_of(key).is_empty();
        let mut gateways = lock(&self.gateways);
        let state = gateways.entry(key.clone()).or_default();
        state.error = None;
        match state.records.back_mut() {
            Some(last) if last.versions == versions => last.last_revision = revision,
            prev => {
                let prev = prev.map(|p| (*p).clone());
                let produced_at = std::array::from_fn(|i| match &prev {
                    Some(p) if p.versions[i] == versions[i] => p.produced_at[i],
                    _ => commit_at,
                });
                state.records.push_back(CompileRecord {
                    first_revision: revision,
                    last_revision: revision,
                    versions,
                    produced_at,
                });
                if state.records.len() > MAX_RECORDS {
                    state.records.pop_front();
                }
            }
        }
        if !outcome.is_noop() && has_nodes {
            state.pending.push_back(PendingChange {
                revision,
                commit_at,
            });
            if state.pending.len() > MAX_PENDING {
                state.pending.pop_front();
            }
        }
        let mut resolved = Vec::new();
        if let Some(last) = state.records.back() {
            let mut early = lock(&self.early_acks);
            if let Some(q) = early.get_mut(key) {
                q.retain(|a| {
                    if last.versions[a.index] == a.version {
                        resolved.push((a.clone(), last.produced_at[a.index]));
                        false
                    } else {
                        true
                    }
                });
                if q.is_empty() {
                    early.remove(key);
                }
            }
        }
        drop(gateways);
        if !resolved.is_empty() {
            let mut lags = lock(&self.lags);
            for (a, produced) in resolved {
                // Only streams still connected (a disconnect removed the entry).
                if let Some(entry) = lags.get_mut(&a.stream_id) {
                    entry.set_lag(a.index, produced, a.at);
                }
            }
        }
    }

    /// Records that `key`'s latest compilation also stands for store revision `revision`.
    fn mark_unchanged(&self, key: &GatewayKey, revision: u64) {
        if let Some(last) = lock(&self.gateways)
            .get_mut(key)
            .and_then(|s| s.records.back_mut())
        {
            last.last_revision = last.last_revision.max(revision);
        }
    }

    fn record_error(&self, key: &GatewayKey, message: String) {
        lock(&self.gateways).entry(key.clone()).or_default().error = Some(message);
    }

    fn forget(&self, key: &GatewayKey) {
        lock(&self.gateways).remove(key);
    }

    /// Observes the convergence of pending changes of `key` if every connected node has
    /// ACKed the latest compilation; drops them when no node is left.
    fn check_converged(&self, key: &GatewayKey, now: Instant) {
        let mut gateways = lock(&self.gateways);
        let Some(state) = gateways.get_mut(key) else {
            return;
        };
        if state.pending.is_empty() {
            return;
        }
        let Some(last) = state.records.back() else {
            return;
        };
        if !self.fleet.has_nodes(key) {
            state.pending.clear();
            return;
        }
        let converged = PUSH_ORDER
            .iter()
            .zip(&last.versions)
            .all(|(k, v)| self.fleet.all_acked(key, *k, v));
        if converged {
            for p in state.pending.drain(..) {
                let secs = now.saturating_duration_since(p.commit_at).as_secs_f64();
                tracing::debug!(gateway = %key, revision = p.revision, secs, "change converged");
                self.metrics.convergence.observe(secs);
            }
        }
    }

    /// Records one event; returns the Gateway whose convergence it may complete, and
    /// when (checked once per batch of events by [`track_fleet`]: the check scans the
    /// Gateway's nodes, so running it per ACK would be quadratic in the fleet size).
    fn on_fleet_event(&self, event: FleetEvent) -> Option<(GatewayKey, Instant)> {
        match event {
            FleetEvent::Connected { stream_id, .. } => {
                lock(&self.lags).insert(
                    stream_id,
                    NodeLag {
                        connected_at: Some(Instant::now()),
                        lag_ms: [None; 5],
                    },
                );
                None
            }
            FleetEvent::Ack(ack) => {
                let i = type_index(ack.kind)?;
                let produced = {
                    let gateways = lock(&self.gateways);
                    let found = gateways.get(&ack.gateway).and_then(|s| {
                        s.records
                            .iter()
                            .rev()
                            .find(|r| r.versions[i] == ack.version)
                            .map(|r| r.produced_at[i])
                    });
                    if found.is_none() {
                        // Not recorded yet: resolved by `record` (under the same lock).
                        let mut early = lock(&self.early_acks);
                        let q = early.entry(ack.gateway.clone()).or_default();
                        q.push_back(EarlyAck {
                            stream_id: ack.stream_id,
                            index: i,
                            version: ack.version.clone(),
                            at: ack.at,
                        });
                        if q.len() > MAX_EARLY_ACKS {
                            q.pop_front();
                        }
                    }
                    found
                };
                if let Some(produced) = produced {
                    let mut lags = lock(&self.lags);
                    let entry = lags.entry(ack.stream_id).or_insert(NodeLag {
                        connected_at: None,
                        lag_ms: [None; 5],
                    });
                    entry.set_lag(i, produced, ack.at);
                }
                Some((ack.gateway, ack.at))
            }
            FleetEvent::Nack { .. } => None,
            FleetEvent::Disconnected {
                stream_id, gateway, ..
            } => {
                lock(&self.lags).remove(&stream_id);
                if let Some(q) = lock(&self.early_acks).get_mut(&gateway) {
                    q.retain(|a| a.stream_id != stream_id);
                }
                Some((gateway, Instant::now()))
            }
        }
    }
}

impl ControllerShared {
    /// After the tracker missed events (`RecvError::Lagged`): reconciles with the fleet's
    /// node map, which is exact. Nodes that disconnected unseen are forgotten (their lag
    /// entries and early ACKs would otherwise stay forever); nodes that connected unseen
    /// get an entry with unknown lags. Returns every Gateway with a change awaiting
    /// convergence, to be checked again: an ACK that completed one may have been lost.
    fn resync_after_lag(&self) -> Vec<GatewayKey> {
        let connected: HashSet<u64> = self.fleet.stream_ids().into_iter().collect();
        let pending: Vec<GatewayKey> = lock(&self.gateways)
            .iter()
            .filter(|(_, s)| !s.pending.is_empty())
            .map(|(k, _)| k.clone())
            .collect();
        for q in lock(&self.early_acks).values_mut() {
            q.retain(|a| connected.contains(&a.stream_id));
        }
        let mut lags = lock(&self.lags);
        lags.retain(|id, _| connected.contains(id));
        for id in connected {
            lags.entry(id).or_insert(NodeLag {
                connected_at: None,
                lag_ms: [None; 5],
            });
        }
        pending
    }
}

/// Fleet events taken from the queue at once.
const FLEET_BATCH: usize = 1024;
/// How often, at most, a Gateway's convergence is checked while ACKs arrive.
const CONVERGENCE_CHECK_EVERY: Duration = Duration::from_millis(10);

/// Follows fleet events until `shutdown` (subscribe before the ADS server starts so no
/// event is missed).
pub async fn track_fleet(
    shared: Arc<ControllerShared>,
    mut events: broadcast::Receiver<FleetEvent>,
    mut shutdown: watch::Receiver<bool>,
) {
    // Gateways to check for convergence, with the latest event time. The check scans the
    // Gateway's nodes, so it runs at most every CONVERGENCE_CHECK_EVERY, not per ACK; the
    // time it records is the latest ACK's, not the check's.
    let mut touched: HashMap<GatewayKey, Instant> = HashMap::new();
    let mut last_check = tokio::time::Instant::now();
    // Events lost to lag since the last resynchronisation.
    let mut missed: u64 = 0;
    loop {
        let due = (!touched.is_empty()).then(|| last_check + CONVERGENCE_CHECK_EVERY);
        let first = tokio::select! {
            () = stopping(&mut shutdown) => return,
            e = events.recv() => Some(e),
            () = sleep_until_some(due) => None,
        };
        // Take what is already queued too (bounded).
        let mut next = first;
        let mut taken = 0;
        while let Some(event) = next.take() {
            match event {
                Ok(e) => {
                    if let Some((gw, at)) = shared.on_fleet_event(e) {
                        let t = touched.entry(gw).or_insert(at);
                        *t = (*t).max(at);
                    }
                }
                // Resynchronised once the queue is drained: doing it per lag, while a
                // connection storm is still queueing events, made the tracker fall further
                // behind (5,000 nodes: 608 lags instead of 4).
                Err(broadcast::error::RecvError::Lagged(n)) => missed += n,
                Err(broadcast::error::RecvError::Closed) => return,
            }
            taken += 1;
            if taken < FLEET_BATCH {
                next = match events.try_recv() {
                    Ok(e) => Some(Ok(e)),
                    Err(broadcast::error::TryRecvError::Lagged(n)) => {
                        Some(Err(broadcast::error::RecvError::Lagged(n)))
                    }
                    Err(broadcast::error::TryRecvError::Empty) => {
                        if missed > 0 {
                            tracing::warn!(
                                missed,
                                "fleet tracker fell behind; resynchronised from the node map (lags of the missed ACKs are unknown)"
                            );
                            missed = 0;
                            let now = Instant::now();
                            for gw in shared.resync_after_lag() {
                                let t = touched.entry(gw).or_insert(now);
                                *t = (*t).max(now);
                            }
                        }
                        None
                    }
                    Err(broadcast::error::TryRecvError::Closed) => {
                        Some(Err(broadcast::error::RecvError::Closed))
                    }
                };
            }
        }
        if !touched.is_empty() && last_check.elapsed() >= CONVERGENCE_CHECK_EVERY {
            for (gw, at) in touched.drain() {
                shared.check_converged(&gw, at);
            }
            last_check = tokio::time::Instant::now();
        }
    }
}

/// Sleeps until `t`, or for ever when `None`.
async fn sleep_until_some(t: Option<tokio::time::Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// The controller task.
pub struct Controller {
    store: Arc<dyn Store>,
    cache: SnapshotCache,
    shared: Arc<ControllerShared>,
    options: ControllerOptions,
    items: BTreeMap<ResourceKey, Arc<Item>>,
    revision: u64,
    /// Gateways that have been given a snapshot and still exist.
    known: BTreeSet<GatewayKey>,
    /// What each Gateway's last compile read (see [`gateway_deps`]).
    deps: BTreeMap<GatewayKey, BTreeSet<ResourceKey>>,
    /// Keys changed since the last compile.
    dirty: BTreeSet<ResourceKey>,
    /// Gateways named by the parentRefs of routes changed since the last compile.
    dirty_gateways: BTreeSet<GatewayKey>,
    /// Recompile every Gateway (after a (re)list).
    dirty_all: bool,
}

enum Step {
    Continue,
    Relist,
    Stop,
}

impl Controller {
    /// A controller over `store` feeding `cache`.
    pub fn new(
        store: Arc<dyn Store>,
        cache: SnapshotCache,
        shared: Arc<ControllerShared>,
        options: ControllerOptions,
    ) -> Self {
        Controller {
            store,
            cache,
            shared,
            options,
            items: BTreeMap::new(),
            revision: 0,
            known: BTreeSet::new(),
            deps: BTreeMap::new(),
            dirty: BTreeSet::new(),
            dirty_gateways: BTreeSet::new(),
            dirty_all: true,
        }
    }

    /// Runs until `shutdown` becomes true or the store closes.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.follow(&mut shutdown).await {
                Step::Stop => return,
                Step::Continue => backoff = Duration::from_millis(100),
                Step::Relist => {
                    tokio::select! {
                        () = stopping(&mut shutdown) => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// One list + watch cycle; returns how to go on.
    async fn follow(&mut self, shutdown: &mut watch::Receiver<bool>) -> Step {
        let listed = match self.store.range(REGISTRY_PREFIX).await {
            Ok(r) => r,
            Err(StoreError::Closed) => return Step::Stop,
            Err(e) => {
                tracing::warn!(error = %e, "controller: cannot list the store; retrying");
                return Step::Relist;
            }
        };
        self.items.clear();
        for kv in &listed.kvs {
            self.put(kv);
        }
        self.revision = listed.revision;
        self.dirty_all = true;
        self.publish();
        self.compile(Instant::now()).await;
        // Every key is watched, not only `/registry/`: writes elsewhere (tokens) bump the
        // store revision too, and readers wait for the controller to reach the revision
        // they read. Non-resource keys are ignored by `put`/`handle`.
        let mut watch = match self.store.watch("", listed.revision + 1).await {
            Ok(w) => w,
            Err(StoreError::Closed) => return Step::Stop,
            Err(e) => {
                tracing::warn!(error = %e, "controller: cannot watch the store; re-listing");
                return Step::Relist;
            }
        };
        loop {
            let first = tokio::select! {
                () = stopping(shutdown) => return Step::Stop,
                b = watch.recv() => b,
            };
            let commit_at = Instant::now();
            match self.handle(first) {
                Step::Continue => {}
                other => return other,
            }
            let hard_deadline = commit_at + self.options.max_debounce;
            let mut deadline = (commit_at + self.options.debounce).min(hard_deadline);
            loop {
                tokio::select! {
                    () = stopping(shutdown) => return Step::Stop,
                    () = tokio::time::sleep_until(deadline.into()) => break,
                    b = watch.recv() => {
                        match self.handle(b) {
                            Step::Continue => {}
                            other => {
                                self.compile(commit_at).await;
                                return other;
                            }
                        }
                        deadline = (Instant::now() + self.options.debounce).min(hard_deadline);
                    }
                }
            }
            self.compile(commit_at).await;
        }
    }

    fn handle(&mut self, batch: Option<Result<WatchBatch, StoreError>>) -> Step {
        match batch {
            Some(Ok(b)) => {
                for e in &b.events {
                    match e {
                        Event::Put { kv, .. } => self.put(kv),
                        Event::Delete { key, .. } => {
                            if let Some(k) = parse_store_key(key) {
                                self.items.remove(&k);
                                self.dirty.insert(k);
                            }
                        }
                    }
                }
                self.revision = b.revision;
                self.publish();
                Step::Continue
            }
            Some(Err(StoreError::Closed)) | None => Step::Stop,
            Some(Err(e)) => {
                tracing::info!(error = %e, "controller: watch ended; re-listing");
                Step::Relist
            }
        }
    }

    fn put(&mut self, kv: &KeyValue) {
        let Some(key) = parse_store_key(&kv.key) else {
            return;
        };
        self.dirty.insert(key.clone());
        match decode(&kv.value) {
            Ok(resource) if resource.key() == key => {
                self.dirty_gateways.extend(named_gateways(&resource));
                self.items.insert(
                    key,
                    Arc::new(Item {
                        resource,
                        create_revision: kv.create_revision,
                        mod_revision: kv.mod_revision,
                    }),
                );
            }
            Ok(resource) => {
                tracing::warn!(key = %kv.key, found = %resource.key(), "stored document does not match its key; ignored");
                self.items.remove(&key);
            }
            Err(e) => {
                tracing::warn!(key = %kv.key, error = %e, "stored document is invalid; ignored");
                self.items.remove(&key);
            }
        }
    }

    fn publish(&self) {
        self.shared
            .publish(World::build(self.revision, &self.items));
    }

    /// Recompiles the Gateways of the current world that the changes since the last
    /// compile touched, and empties the deleted ones.
    async fn compile(&mut self, commit_at: Instant) {
        let world = self.shared.world();
        let revision = world.revision;
        let present: BTreeSet<GatewayKey> = world
            .set
            .gateways()
            .map(|g| GatewayKey::new(g.metadata.namespace(), g.metadata.name.clone()))
            .collect();
        let removed: Vec<GatewayKey> = self.known.difference(&present).cloned().collect();
        let (targets, untouched): (Vec<GatewayKey>, Vec<GatewayKey>) =
            present.iter().cloned().partition(|gw| self.touched(gw));
        self.dirty.clear();
        self.dirty_gateways.clear();
        self.dirty_all = false;
        for gw in &untouched {
            // Nothing it reads changed: compiling it at this revision would give the same
            // snapshot, so record it as such (for `Programmed` and lag).
            self.shared.mark_unchanged(gw, revision);
        }
        let cache = self.cache.clone();
        let opts = self.options.translate;
        let work = tokio::task::spawn_blocking(move || {
            let mut out = Vec::with_capacity(targets.len());
            for gw in targets {
                let deps = world
                    .set
                    .gateway(&gw.namespace, &gw.name)
                    .map(|g| gateway_deps(&world.set, g))
                    .unwrap_or_default();
                let r = to_xds(&world.set, &gw.namespace, &gw.name, &opts)
                    .map_err(|e| e.to_string())
                    .and_then(|x| cache.set(&gw, &x).map_err(|e| e.to_string()));
                out.push((gw, deps, r));
            }
            let mut emptied = Vec::new();
            for gw in removed {
                let r = cache.set(&gw, &XdsResources::default());
                emptied.push((gw, r.is_ok()));
            }
            (out, emptied)
        });
        let (results, emptied) = match work.await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "controller: compilation task failed");
                return;
            }
        };
        for (gw, deps, r) in results {
            self.shared.metrics.compiles.inc();
            self.deps.insert(gw.clone(), deps);
            match r {
                Ok(outcome) => {
                    if !outcome.is_noop() {
                        self.shared.metrics.snapshot_changes.inc();
                        tracing::info!(gateway = %gw, revision, changed = ?outcome.changed, "Gateway recompiled");
                    }
                    self.shared.record(&gw, revision, commit_at, &outcome);
                    self.known.insert(gw.clone());
                    self.shared.check_converged(&gw, Instant::now());
                }
                Err(message) => {
                    self.shared.metrics.compile_errors.inc();
                    tracing::warn!(gateway = %gw, revision, error = %message,
                        "Gateway cannot be compiled; its nodes keep the previous configuration");
                    self.shared.record_error(&gw, message);
                }
            }
        }
        for (gw, ok) in emptied {
            tracing::info!(gateway = %gw, revision, ok, "Gateway deleted; its nodes get an empty configuration");
            self.known.remove(&gw);
            self.deps.remove(&gw);
            self.shared.forget(&gw);
        }
    }

    /// Whether the changes since the last compile may change `gw`'s snapshot.
    fn touched(&self, gw: &GatewayKey) -> bool {
        self.dirty_all
            || self.dirty_gateways.contains(gw)
            || match self.deps.get(gw) {
                Some(deps) => !deps.is_disjoint(&self.dirty),
                // Never compiled (e.g. its last compile failed before deps were known).
                None => true,
            }
    }
}

/// The keys a Gateway's translation reads: the Gateway, the Secrets of its certificate
/// refs, every route whose parentRefs name it, and the Backends those routes reference
/// (whether they exist or not).
pub fn gateway_deps(set: &ResourceSet, gw: &Gateway) -> BTreeSet<ResourceKey> {
    let ns = gw.metadata.namespace();
    let name = gw.metadata.name.as_str();
    let mut deps = BTreeSet::new();
    deps.insert(ResourceKey::new(ResourceKind::Gateway, ns, name.to_owned()));
    for l in &gw.spec.listeners {
        for c in l.tls.iter().flat_map(|t| t.certificate_refs.iter()) {
            let cns = c.namespace.as_deref().unwrap_or(ns);
            deps.insert(ResourceKey::new(ResourceKind::Secret, cns, c.name.clone()));
        }
    }
    for (_, route) in set.routes() {
        let rns = route.metadata().namespace();
        let names_gw = route
            .parent_refs()
            .iter()
            .any(|p| p.name == name && p.namespace.as_deref().unwrap_or(rns) == ns);
        if !names_gw {
            continue;
        }
        deps.insert(route.key());
        for (_, _, b) in route.backend_refs() {
            let bns = b.namespace.as_deref().unwrap_or(rns);
            deps.insert(ResourceKey::new(ResourceKind::Backend, bns, b.name.clone()));
        }
    }
    deps
}

/// The Gateways a route names in its parentRefs (none for other kinds).
fn named_gateways(resource: &Resource) -> Vec<GatewayKey> {
    let Some(route) = RouteRef::from_resource(resource) else {
        return Vec::new();
    };
    let rns = route.metadata().namespace();
    route
        .parent_refs()
        .iter()
        .map(|p| GatewayKey::new(p.namespace.as_deref().unwrap_or(rns), p.name.clone()))
        .collect()
}

/// Parses one stored document.
pub fn decode(value: &[u8]) -> Result<Resource, String> {
    let text = std::str::from_utf8(value).map_err(|e| format!("not UTF-8: {e}"))?;
    let mut resources = biplane_api::parse_documents(text).map_err(|e| e.to_string())?;
    match (resources.pop(), resources.is_empty()) {
        (Some(r), true) => Ok(r),
        _ => Err("expected exactly one document".to_owned()),
    }
}

/// Resolves once the shutdown flag is set (or its sender is gone).
pub(crate) async fn stopping(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;

    const SET: &str = "
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: gw}
spec:
  listeners:
  - name: https
    port: 443
    protocol: HTTPS
    tls: {mode: Terminate, certificateRefs: [{name: cert}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: other}
spec:
  listeners: [{name: http, port: 80, protocol: HTTP}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web}
spec:
  parentRefs: [{name: gw}]
  rules:
  - backendRefs: [{group: biplane.dev, kind: Backend, name: missing}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: elsewhere}
spec:
  parentRefs: [{name: other}]
  rules:
  - backendRefs: [{group: biplane.dev, kind: Backend, name: b}]
";

    fn key(kind: ResourceKind, name: &str) -> ResourceKey {
        ResourceKey::new(kind, "default", name.to_owned())
    }

    #[test]
    fn deps_cover_what_the_translation_reads_even_when_absent() {
        let set = ResourceSet::new(biplane_api::parse_documents(SET).unwrap());
        let gw = set.gateway("default", "gw").unwrap();
        let deps = gateway_deps(&set, gw);
        let want: BTreeSet<ResourceKey> = [
            key(ResourceKind::Gateway, "gw"),
            key(ResourceKind::Secret, "cert"),
            key(ResourceKind::HttpRoute, "web"),
            key(ResourceKind::Backend, "missing"),
        ]
        .into_iter()
        .collect();
        assert_eq!(deps, want);
    }

    #[test]
    fn a_route_names_its_parent_gateways() {
        let set = ResourceSet::new(biplane_api::parse_documents(SET).unwrap());
        let route = set.get(&key(ResourceKind::HttpRoute, "elsewhere")).unwrap();
        assert_eq!(
            named_gateways(route),
            vec![GatewayKey::new("default", "other".to_owned())]
        );
        let backendless = set.get(&key(ResourceKind::Gateway, "gw")).unwrap();
        assert!(named_gateways(backendless).is_empty());
    }

    #[test]
    fn a_lagged_tracker_forgets_nodes_it_never_saw_leave() {
        let fleet = FleetStatus::new();
        let shared = ControllerShared::new(fleet.clone(), Arc::new(Metrics::new(fleet)));
        let gateway = GatewayKey::new("default", "gw");
        for stream_id in [7, 8] {
            shared.on_fleet_event(FleetEvent::Connected {
                stream_id,
                node_id: format!("n{stream_id}"),
                gateway: gateway.clone(),
                protocol: biplane_xds::server::Protocol::Delta,
            });
        }
        // Both nodes' Disconnected events were among the missed ones: the fleet's node
        // map, which is exact, has neither.
        assert_eq!(lock(&shared.lags).len(), 2);
        let recheck = shared.resync_after_lag();
        assert!(
            lock(&shared.lags).is_empty(),
            "gone nodes keep no lag entry"
        );
        assert!(recheck.is_empty(), "no Gateway has a change pending");
    }

    #[tokio::test]
    async fn the_tracker_resynchronises_once_it_has_caught_up_after_a_lag() {
        let fleet = FleetStatus::new();
        let shared = ControllerShared::new(fleet.clone(), Arc::new(Metrics::new(fleet)));
        let (tx, rx) = broadcast::channel(2);
        // Four connections into a queue of two: the tracker misses the first two and
        // sees nodes 3 and 4, none of which is in the (exact, empty) node map.
        for stream_id in 1..=4 {
            tx.send(FleetEvent::Connected {
                stream_id,
                node_id: format!("n{stream_id}"),
                gateway: GatewayKey::new("default", "gw"),
                protocol: biplane_xds::server::Protocol::Sotw,
            })
            .unwrap();
        }
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(track_fleet(shared.clone(), rx, stop_rx));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !lock(&shared.lags).is_empty() || !tx.is_empty() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "lag entries left: {:?}",
                lock(&shared.lags).keys().collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        stop.send(true).unwrap();
        task.await.unwrap();
    }
}
