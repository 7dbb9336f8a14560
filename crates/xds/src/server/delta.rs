//! Delta (incremental) ADS (`DeltaAggregatedResources`): one task per stream holding, per
//! type, the subscription and what the client holds (name → version, or "told absent").
//!
//! Rules implemented (`shared/xds-notes.md`):
//! - subscribe/unsubscribe are honoured whatever the nonce; ACK/NACK is recorded only for
//!   a nonce this stream sent for that type;
//! - per-resource versions (the content hash); a response carries only what changed;
//!   deleted resources and subscribed names that do not exist go in `removed_resources`;
//! - LDS/CDS wildcard: `"*"`, or an empty first subscription (legacy); `"*"` in
//!   unsubscribe ends it. A first request that re-lists exactly names it already holds
//!   (`initial_resource_versions`) without `"*"` is a reconnecting wildcard client
//!   (hashicorp/consul#12174) and stays wildcard;
//! - `initial_resource_versions` (first request of a type): matching resources are not
//!   re-sent;
//! - a NACK leaves the server's view of the client as sent, so the rejected resources are
//!   not re-sent until they change; names subscribed again are answered even if sent.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
};
use tonic::Status;

use super::cache::content_version;
use super::stream::ProtocolState;
use super::{
    CachedResource, NonceKind, Protocol, Shared, Snapshot, StreamCtx, TYPES, nack_message,
    type_index, unknown_type,
};

/// Responses per type whose ACK is still awaited that are remembered; older ones can no
/// longer be matched (bounds memory for a client that never ACKs).
const MAX_OUTSTANDING: usize = 8;

#[derive(Debug, Default)]
struct TypeState {
    requested: bool,
    wildcard: bool,
    names: BTreeSet<Arc<str>>,
    /// What the client holds as far as we know: a version, or `None` = told it does not
    /// exist.
    client: HashMap<Arc<str>, Option<Arc<str>>>,
    /// Sent responses awaiting ACK/NACK: (nonce counter, type version).
    outstanding: VecDeque<(u64, String)>,
    /// At least one response of this type was sent on this stream.
    responded: bool,
    evaluated: Option<String>,
    /// The subscription changed since the last evaluation.
    dirty: bool,
}

impl TypeState {
    fn needs(&self, version: &str) -> bool {
        self.requested && (self.dirty || self.evaluated.as_deref() != Some(version))
    }

    fn subscribed(&self) -> bool {
        self.wildcard || !self.names.is_empty()
    }

    fn in_scope(&self, name: &str) -> bool {
        self.wildcard || self.names.contains(name)
    }
}

/// Index of CDS in push order.
const CDS: usize = 0;

#[derive(Debug, Default)]
pub(crate) struct DeltaState {
    types: [TypeState; 5],
    /// Cluster removals are held back until the other types are settled.
    cds_deferred: bool,
}

impl DeltaState {
    /// A type after CDS has something to send, or a response not yet ACKed/NACKed:
    /// removed clusters stay until listeners and routes stopped using them.
    fn others_unsettled(&self, snapshot: &Snapshot) -> bool {
        self.types
            .iter()
            .enumerate()
            .skip(1)
            .any(|(i, t)| t.needs(snapshot.by_index(i).version()) || !t.outstanding.is_empty())
    }
}

impl ProtocolState for DeltaState {
    type Request = DeltaDiscoveryRequest;
    type Response = DeltaDiscoveryResponse;
    const PROTOCOL: Protocol = Protocol::Delta;

    fn node(req: &DeltaDiscoveryRequest) -> Option<&Node> {
        req.node.as_ref()
    }

    fn on_request(
        &mut self,
        ctx: &mut StreamCtx,
        req: DeltaDiscoveryRequest,
    ) -> Result<(), Status> {
        let DeltaDiscoveryRequest {
            node: _,
            type_url,
            resource_names_subscribe,
            resource_names_unsubscribe,
            resource_locators_subscribe: _,
            resource_locators_unsubscribe: _,
            initial_resource_versions,
            response_nonce,
            error_detail,
        } = req;
        let i = type_index(&type_url).ok_or_else(|| unknown_type(&type_url))?;
        let full_set = TYPES[i].full_set;
        let t = &mut self.types[i];

        // ACK / NACK of one of our responses of this type.
        if !response_nonce.is_empty()
            && let NonceKind::Ours(n) = ctx.nonces.classify(&response_nonce)?
            && let Some(pos) = t.outstanding.iter().position(|(c, _)| *c == n)
        {
            // Responses are answered in order: older outstanding ones are settled too.
            let mut settled = t.outstanding.drain(..=pos);
            let version = settled.next_back().map(|(_, v)| v).unwrap_or_default();
            drop(settled);
            match &error_detail {
                Some(detail) => {
                    let message = nack_message(detail);
                    tracing::warn!(node = %ctx.node_id, gateway = %ctx.gateway, type_url,
                        version, message, "NACK");
                    ctx.node.nacked(i, &version, &message);
                }
                None => {
                    tracing::debug!(node = %ctx.node_id, type_url, version, "ACK");
                    ctx.node.acked(i, &version);
                }
            }
        }

        // Subscription changes, honoured whatever the nonce.
        let first = !t.requested;
        let was = t.requested && t.subscribed();
        if first {
            t.requested = true;
            t.dirty = true;
            if full_set
                && (resource_names_subscribe.is_empty()
                    || (!initial_resource_versions.is_empty()
                        && resource_names_subscribe
                            .iter()
                            .all(|n| initial_resource_versions.contains_key(n))))
            {
                t.wildcard = true;
            }
        }
        for name in resource_names_subscribe {
            t.dirty = true;
            if full_set && name == "*" {
                t.wildcard = true;
                continue;
            }
            let name: Arc<str> = Arc::from(name);
            // Answered even if sent before.
            t.client.remove(&name);
            t.names.insert(name);
        }
        for name in resource_names_unsubscribe {
            if full_set && name == "*" {
                t.wildcard = false;
                let names = &t.names;
                t.client.retain(|n, _| names.contains(n));
                continue;
            }
            t.names.remove(name.as_str());
            if !t.wildcard {
                t.client.remove(name.as_str());
            }
        }
        if first {
            for (name, version) in initial_resource_versions {
                if t.in_scope(&name) {
                    t.client.insert(Arc::from(name), Some(Arc::from(version)));
                }
            }
        }
        if was != t.subscribed() {
            ctx.node.subscribed(i, t.subscribed());
        }
        Ok(())
    }

    fn has_work(&self, snapshot: &Snapshot) -> bool {
        self.types
            .iter()
            .enumerate()
            .any(|(i, t)| t.needs(snapshot.by_index(i).version()))
            || (self.cds_deferred && !self.others_unsettled(snapshot))
    }

    fn next_response(
        &mut self,
        ctx: &mut StreamCtx,
        shared: &Shared,
        snapshot: &Snapshot,
    ) -> Option<DeltaDiscoveryResponse> {
        let others_unsettled = self.others_unsettled(snapshot);
        for (i, t) in self.types.iter_mut().enumerate() {
            let ts = snapshot.by_index(i);
            let mut version = ts.version().to_owned();
            let finish_cds = i == CDS && self.cds_deferred && !others_unsettled;
            if !t.needs(&version) && !finish_cds {
                continue;
            }
            t.evaluated = Some(version.clone());
            t.dirty = false;
            // Make before break: clusters the client holds are removed only once the
            // other types are pushed and answered.
            let defer = i == CDS && others_unsettled;
            let mut deferred = false;

            let mut resources = Vec::new();
            let mut removed = Vec::new();
            if t.wildcard {
                for r in ts.resources() {
                    offer(&mut t.client, &mut resources, r);
                }
            }
            for name in &t.names {
                match ts.get(name) {
                    Some(r) => {
                        if !t.wildcard {
                            offer(&mut t.client, &mut resources, r);
                        }
                    }
                    None => match t.client.get(name) {
                        Some(None) => {}
                        Some(Some(_)) if defer => deferred = true,
                        _ => {
                            t.client.insert(name.clone(), None);
                            removed.push(name.to_string());
                        }
                    },
                }
            }
            // Held by the client through the wildcard only, and gone.
            let names = &t.names;
            t.client.retain(|name, v| {
                if v.is_some() && !names.contains(name) && ts.get(name).is_none() {
                    if defer {
                        deferred = true;
                        return true;
                    }
                    removed.push(name.to_string());
                    false
                } else {
                    true
                }
            });
            if i == CDS {
                self.cds_deferred = deferred;
                if deferred {
                    // The client will hold more than this snapshot: its own version.
                    version = content_version(&[version.as_bytes(), b"+kept"]);
                }
            }
            if resources.is_empty() && removed.is_empty() && t.responded {
                continue;
            }
            removed.sort();
            let (counter, nonce) = ctx.nonces.next();
            t.responded = true;
            if t.outstanding.len() == MAX_OUTSTANDING {
                t.outstanding.pop_front();
            }
            ctx.node.sent(i, &version);
            t.outstanding.push_back((counter, version.clone()));
            tracing::debug!(node = %ctx.node_id, type_url = TYPES[i].url, version,
                resources = resources.len(), removed = removed.len(), nonce, "push");
            return Some(DeltaDiscoveryResponse {
                system_version_info: version,
                resources,
                type_url: TYPES[i].url.to_owned(),
                removed_resources: removed,
                removed_resource_names: Vec::new(),
                nonce,
                control_plane: Some(shared.control_plane.clone()),
                resource_errors: Vec::new(),
            });
        }
        None
    }
}

/// Adds `r` to the response unless the client already holds this version.
fn offer(
    client: &mut HashMap<Arc<str>, Option<Arc<str>>>,
    resources: &mut Vec<Resource>,
    r: &Arc<CachedResource>,
) {
    let have = client.get(r.name_arc()).and_then(|v| v.as_deref());
    if have != Some(r.version()) {
        client.insert(r.name_arc().clone(), Some(r.version_arc().clone()));
        resources.push(Resource {
            name: r.name().to_owned(),
            version: r.version().to_owned(),
            resource: Some(r.any().clone()),
            ..Default::default()
        });
    }
}
