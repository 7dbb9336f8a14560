//! The snapshot cache: per Gateway, the xDS resources encoded once, content-versioned and
//! shared (`Arc`) by every stream of that Gateway; a `tokio::sync::watch` per Gateway
//! tells its streams that something changed (only the latest state matters).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use envoy_types::pb::google::protobuf::Any;
use prost::{Message, Name};
use tokio::sync::watch;

use super::{GatewayKey, PUSH_ORDER, TYPES, kind_index};
use crate::{ResourceKind, XdsResources};

/// One encoded resource: its name, its content version (a hash of the encoded bytes) and
/// the packed `Any`, encoded once per change and shared by every stream.
#[derive(Debug, PartialEq)]
pub struct CachedResource {
    name: Arc<str>,
    version: Arc<str>,
    any: Any,
}

impl CachedResource {
    /// Packs and encodes one message.
    pub fn new<M: Message + Name>(name: impl Into<String>, message: &M) -> Self {
        let any = crate::to_any(message);
        CachedResource {
            name: Arc::from(name.into()),
            version: Arc::from(content_version(&[&any.value])),
            any,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The per-resource version (Delta `Resource.version`): 16 hex digits of the SHA-256
    /// of the encoded message.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The name, shared (streams key their per-resource state with it).
    pub(crate) fn name_arc(&self) -> &Arc<str> {
        &self.name
    }

    pub(crate) fn version_arc(&self) -> &Arc<str> {
        &self.version
    }

    pub fn any(&self) -> &Any {
        &self.any
    }
}

/// All resources of one type for one Gateway, by name (sorted, so responses are
/// deterministic), with the type's version: a hash of every `(name, version)` pair, so
/// identical content always has the identical version.
#[derive(Debug, PartialEq)]
pub struct TypeSnapshot {
    version: String,
    resources: BTreeMap<String, Arc<CachedResource>>,
}

impl TypeSnapshot {
    fn new(resources: BTreeMap<String, Arc<CachedResource>>) -> Self {
        let mut parts: Vec<&[u8]> = Vec::with_capacity(resources.len() * 2);
        for (name, r) in &resources {
            parts.push(name.as_bytes());
            parts.push(r.version.as_bytes());
        }
        TypeSnapshot {
            version: content_version(&parts),
            resources,
        }
    }

    /// The SotW `version_info` (and Delta `system_version_info`) of this type.
    pub fn version(&self) -> &str {
        &self.version
    }

    pub fn get(&self, name: &str) -> Option<&Arc<CachedResource>> {
        self.resources.get(name)
    }

    pub fn resources(&self) -> impl Iterator<Item = &Arc<CachedResource>> {
        self.resources.values()
    }

    pub fn len(&self) -> usize {
        self.resources.len()
    }

    pub fn is_empty(&self) -> bool {
        self.resources.is_empty()
    }
}

/// Everything one Gateway's nodes receive: the five resource types.
#[derive(Debug, PartialEq)]
pub struct Snapshot {
    /// Indexed like [`PUSH_ORDER`].
    types: [Arc<TypeSnapshot>; 5],
}

impl Snapshot {
    /// A snapshot with no resources (empty LDS/CDS sets: the node serves nothing).
    pub fn empty() -> Self {
        Snapshot {
            types: std::array::from_fn(|_| Arc::new(TypeSnapshot::new(BTreeMap::new()))),
        }
    }

    /// Encodes every resource once. Duplicate or empty names within a type are refused
    /// (a client NACKs a response holding two resources of the same name).
    pub fn from_resources(resources: &XdsResources) -> Result<Self, CacheError> {
        let XdsResources {
            listeners,
            route_configs,
            clusters,
            load_assignments,
            secrets,
        } = resources;
        let mut maps: [BTreeMap<String, Arc<CachedResource>>; 5] = Default::default();
        let mut add = |kind: ResourceKind, r: CachedResource| -> Result<(), CacheError> {
            let Some(i) = kind_index(kind) else {
                return Ok(());
            };
            if r.name.is_empty() {
                return Err(CacheError::EmptyName { kind });
            }
            if maps[i].contains_key(&*r.name) {
                return Err(CacheError::DuplicateName {
                    kind,
                    name: r.name.to_string(),
                });
            }
            maps[i].insert(r.name.to_string(), Arc::new(r));
            Ok(())
        };
        for c in clusters {
            add(ResourceKind::Cluster, CachedResource::new(&c.name, c))?;
        }
        for c in load_assignments {
            add(
                ResourceKind::ClusterLoadAssignment,
                CachedResource::new(&c.cluster_name, c),
            )?;
        }
        for s in secrets {
            add(ResourceKind::Secret, CachedResource::new(&s.name, s))?;
        }
        for l in listeners {
            add(ResourceKind::Listener, CachedResource::new(&l.name, l))?;
        }
        for r in route_configs {
            add(
                ResourceKind::RouteConfiguration,
                CachedResource::new(&r.name, r),
            )?;
        }
        Ok(Snapshot {
            types: maps.map(|m| Arc::new(TypeSnapshot::new(m))),
        })
    }

    /// The resources of one type (`None` for [`ResourceKind::Unknown`]).
    pub fn of(&self, kind: ResourceKind) -> Option<&Arc<TypeSnapshot>> {
        kind_index(kind).map(|i| &self.types[i])
    }

    /// The version of one type (`None` for [`ResourceKind::Unknown`]).
    pub fn version(&self, kind: ResourceKind) -> Option<&str> {
        self.of(kind).map(|t| t.version())
    }

    /// `(kind, version)` for the five types, in push order.
    pub fn versions(&self) -> impl Iterator<Item = (ResourceKind, &str)> {
        PUSH_ORDER
            .iter()
            .zip(&self.types)
            .map(|(k, t)| (*k, t.version()))
    }

    pub(crate) fn by_index(&self, i: usize) -> &Arc<TypeSnapshot> {
        &self.types[i]
    }
}

/// Why a set of resources cannot go into the cache.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CacheError {
    #[error("{kind} {name:?} appears twice")]
    DuplicateName { kind: ResourceKind, name: String },
    #[error("a {kind} has an empty name")]
    EmptyName { kind: ResourceKind },
}

/// What [`SnapshotCache::set`] did.
#[derive(Debug, Clone)]
pub struct SetOutcome {
    /// The types whose content changed, in push order. Empty: a no-op, nothing is pushed.
    pub changed: Vec<ResourceKind>,
    /// The snapshot now served (its versions are what nodes will ACK).
    pub snapshot: Arc<Snapshot>,
}

impl SetOutcome {
    pub fn is_noop(&self) -> bool {
        self.changed.is_empty()
    }
}

struct Entry {
    /// `None`: nothing to serve (never set, or removed); streams answer nothing.
    tx: watch::Sender<Option<Arc<Snapshot>>>,
}

/// Per-Gateway snapshots. Cheap to clone (one shared map).
///
/// A node whose Gateway has no snapshot gets no response at all (it waits, rather than
/// going ready with an empty configuration); it is served as soon as the Gateway is set.
#[derive(Clone, Default)]
pub struct SnapshotCache {
    inner: Arc<Mutex<HashMap<GatewayKey, Entry>>>,
}

impl fmt::Debug for SnapshotCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SnapshotCache")
            .field("gateways", &self.gateways())
            .finish()
    }
}

impl SnapshotCache {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<GatewayKey, Entry>> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Encodes `resources` (outside any lock) and publishes them for `gateway`.
    /// Content identical to what is served is a no-op: no stream is woken.
    pub fn set(
        &self,
        gateway: &GatewayKey,
        resources: &XdsResources,
    ) -> Result<SetOutcome, CacheError> {
        Ok(self.set_snapshot(gateway, Snapshot::from_resources(resources)?))
    }

    /// Publishes an already built snapshot. Types whose version did not change keep the
    /// previous `Arc`s, so memory stays shared with responses still in flight.
    pub fn set_snapshot(&self, gateway: &GatewayKey, snapshot: Snapshot) -> SetOutcome {
        let mut map = self.lock();
        let entry = map.entry(gateway.clone()).or_insert_with(|| Entry {
            tx: watch::channel(None).0,
        });
        let current = entry.tx.borrow().clone();
        let Some(old) = current else {
            let snapshot = Arc::new(snapshot);
            entry.tx.send_replace(Some(snapshot.clone()));
            return SetOutcome {
                changed: PUSH_ORDER.to_vec(),
                snapshot,
            };
        };
        let mut changed = Vec::new();
        let Snapshot { types } = snapshot;
        let mut i = 0;
        let types = types.map(|t| {
            let old_t = &old.types[i];
            let kind = TYPES[i].kind;
            i += 1;
            if old_t.version == t.version {
                old_t.clone()
            } else {
                changed.push(kind);
                t
            }
        });
        if changed.is_empty() {
            return SetOutcome {
                changed,
                snapshot: old,
            };
        }
        let snapshot = Arc::new(Snapshot { types });
        entry.tx.send_replace(Some(snapshot.clone()));
        SetOutcome { changed, snapshot }
    }

    /// Forgets `gateway`: its connected nodes keep their current configuration and get
    /// no further pushes; new nodes of it wait. To withdraw the configuration from the
    /// nodes instead, `set` an empty [`XdsResources`]. Returns whether it was served.
    pub fn remove(&self, gateway: &GatewayKey) -> bool {
        let mut map = self.lock();
        let Some(entry) = map.get(gateway) else {
            return false;
        };
        let was = entry.tx.borrow().is_some();
        if entry.tx.receiver_count() == 0 {
            map.remove(gateway);
        } else {
            entry.tx.send_replace(None);
        }
        was
    }

    /// The snapshot served to `gateway`, if any.
    pub fn get(&self, gateway: &GatewayKey) -> Option<Arc<Snapshot>> {
        self.lock().get(gateway).and_then(|e| e.tx.borrow().clone())
    }

    /// Gateways with a snapshot, sorted.
    pub fn gateways(&self) -> Vec<GatewayKey> {
        let mut v: Vec<GatewayKey> = self
            .lock()
            .iter()
            .filter(|(_, e)| e.tx.borrow().is_some())
            .map(|(k, _)| k.clone())
            .collect();
        v.sort();
        v
    }

    /// A change feed for one Gateway (creates the entry when absent).
    pub(crate) fn watch(&self, gateway: &GatewayKey) -> GatewayWatch {
        let mut map = self.lock();
        let entry = map.entry(gateway.clone()).or_insert_with(|| Entry {
            tx: watch::channel(None).0,
        });
        GatewayWatch {
            rx: entry.tx.subscribe(),
            cache: self.clone(),
            key: gateway.clone(),
        }
    }
}

/// A stream's subscription to its Gateway's snapshot; dropping it frees the Gateway's
/// entry when nothing is served and no one else watches.
pub(crate) struct GatewayWatch {
    pub(crate) rx: watch::Receiver<Option<Arc<Snapshot>>>,
    cache: SnapshotCache,
    key: GatewayKey,
}

impl Drop for GatewayWatch {
    fn drop(&mut self) {
        let mut map = self.cache.lock();
        if let Some(e) = map.get(&self.key)
            && e.tx.borrow().is_none()
            && e.tx.receiver_count() <= 1
        {
            map.remove(&self.key);
        }
    }
}

/// 16 hex digits of the SHA-256 of the parts, each prefixed with its length (so
/// `("ab","c")` and `("a","bc")` differ).
pub(crate) fn content_version(parts: &[&[u8]]) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for p in parts {
        ctx.update(&(p.len() as u64).to_be_bytes());
        ctx.update(p);
    }
    let digest = ctx.finish();
    let mut s = String::with_capacity(16);
    for b in &digest.as_ref()[..8] {
        s.push(char::from(HEX[usize::from(b >> 4)]));
        s.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    s
}

const HEX: &[u8; 16] = b"0123456789abcdef";

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

    use envoy_types::pb::envoy::config::cluster::v3::Cluster;

    use super::*;

    fn res(names: &[&str]) -> XdsResources {
        XdsResources {
            clusters: names
                .iter()
                .map(|n| Cluster {
                    name: (*n).to_owned(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn identical_set_is_a_noop_and_shares_arcs() {
        let cache = SnapshotCache::new();
        let gw = GatewayKey::new("default", "gw");
        let first = cache.set(&gw, &res(&["a", "b"])).unwrap();
        assert_eq!(first.changed.len(), 5);
        let again = cache.set(&gw, &res(&["b", "a"])).unwrap();
        assert!(again.is_noop());
        assert!(Arc::ptr_eq(&first.snapshot, &again.snapshot));
        let third = cache.set(&gw, &res(&["a"])).unwrap();
        assert_eq!(third.changed, vec![ResourceKind::Cluster]);
        // Unchanged types keep the very same allocation.
        assert!(Arc::ptr_eq(
            first.snapshot.of(ResourceKind::Listener).unwrap(),
            third.snapshot.of(ResourceKind::Listener).unwrap()
        ));
    }

    #[test]
    fn duplicate_and_empty_names_are_refused() {
        let e = Snapshot::from_resources(&res(&["a", "a"])).unwrap_err();
        assert_eq!(
            e,
            CacheError::DuplicateName {
                kind: ResourceKind::Cluster,
                name: "a".into()
            }
        );
        assert!(matches!(
            Snapshot::from_resources(&res(&[""])),
            Err(CacheError::EmptyName { .. })
        ));
    }

    #[test]
    fn versions_are_content_hashes() {
        assert_eq!(content_version(&[b"ab", b"c"]).len(), 16);
        assert_ne!(
            content_version(&[b"ab", b"c"]),
            content_version(&[b"a", b"bc"])
        );
        let a = Snapshot::from_resources(&res(&["x"])).unwrap();
        let b = Snapshot::from_resources(&res(&["x"])).unwrap();
        assert_eq!(a, b);
        assert_ne!(
            a.version(ResourceKind::Cluster),
            Snapshot::empty().version(ResourceKind::Cluster)
        );
    }

    #[test]
    fn remove_frees_unwatched_entries() {
        let cache = SnapshotCache::new();
        let gw = GatewayKey::new("default", "gw");
        cache.set(&gw, &res(&["a"])).unwrap();
        let w = cache.watch(&gw);
        assert!(cache.remove(&gw));
        assert!(cache.get(&gw).is_none());
        assert!(w.rx.borrow().is_none());
        assert_eq!(cache.lock().len(), 1);
        drop(w);
        assert_eq!(cache.lock().len(), 0);
    }
}
