//! State of the World ADS (`StreamAggregatedResources`): one task per stream holding,
//! per type, the subscription, the latest nonce and version sent, and the ACK/NACK state.
//!
//! Rules implemented (`shared/xds-notes.md`):
//! - a request whose `response_nonce` is not the latest of its type is stale and ignored
//!   (the client re-sends its subscription with the right nonce); before the first
//!   response of a type any nonce is accepted as an initial request;
//! - ACK/NACK is decided by `error_detail` only; the NACKed version is never re-sent,
//!   the type waits until its content changes;
//! - LDS/CDS: `"*"` or names never set = wildcard, and every response is the full set
//!   (empty = delete all); once names were sent, an empty list unsubscribes;
//! - EDS/RDS/SDS: only subscribed names, and nothing is sent while none of them exists
//!   (the server remembers the names and pushes them when they appear);
//! - a request adding names is answered even when the version did not change.

use std::collections::BTreeSet;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use tonic::Status;

use super::cache::content_version;
use super::stream::ProtocolState;
use super::{
    CachedResource, NonceKind, Protocol, Shared, Snapshot, StreamCtx, TYPES, nack_message,
    type_index, unknown_type,
};

#[derive(Debug, Default)]
struct TypeState {
    /// The client asked for this type on this stream.
    requested: bool,
    /// Any request of this type carried names (after that, empty = unsubscribe).
    names_ever_set: bool,
    wildcard: bool,
    names: BTreeSet<String>,
    /// Counter of the latest nonce sent for this type, and its version.
    latest: Option<u64>,
    sent_version: Option<String>,
    /// The nonce whose ACK/NACK was already recorded.
    answered: Option<u64>,
    /// Snapshot version last considered (sent, or found to have nothing to send).
    evaluated: Option<String>,
    nacked: Option<String>,
    /// The subscription gained names since the last response.
    added: bool,
}

impl TypeState {
    fn needs(&self, version: &str) -> bool {
        self.requested
            && self.subscribed()
            && self.nacked.as_deref() != Some(version)
            && (self.added || self.evaluated.as_deref() != Some(version))
    }

    /// Something is subscribed (an LDS/CDS that unsubscribed everything gets no pushes).
    fn subscribed(&self) -> bool {
        self.wildcard || !self.names.is_empty()
    }

    fn set_names(&mut self, names: Vec<String>, full_set: bool) {
        let was_wildcard = self.wildcard;
        let before = std::mem::take(&mut self.names);
        if full_set {
            self.wildcard = if names.is_empty() {
                !self.names_ever_set
            } else {
                names.iter().any(|n| n == "*")
            };
        }
        if !names.is_empty() {
            self.names_ever_set = true;
        }
        self.names = names
            .into_iter()
            .filter(|n| !(full_set && n == "*"))
            .collect();
        if (self.wildcard && !was_wildcard) || self.names.iter().any(|n| !before.contains(n)) {
            self.added = true;
        }
    }
}

/// Index of CDS in push order.
const CDS: usize = 0;

#[derive(Debug, Default)]
pub(crate) struct SotwState {
    types: [TypeState; 5],
    /// The clusters the client holds from our last CDS response.
    cds_sent: Vec<Arc<CachedResource>>,
    /// The last CDS response kept removed clusters; a final one follows once the other
    /// types are settled.
    cds_deferred: bool,
}

impl SotwState {
    /// A type after CDS has something to send, or a response not yet ACKed/NACKed:
    /// stale clusters must stay until listeners and routes stopped using them.
    fn others_unsettled(&self, snapshot: &Snapshot) -> bool {
        self.types.iter().enumerate().skip(1).any(|(i, t)| {
            t.needs(snapshot.by_index(i).version())
                || (t.latest.is_some() && t.answered != t.latest)
        })
    }
}

impl ProtocolState for SotwState {
    type Request = DiscoveryRequest;
    type Response = DiscoveryResponse;
    const PROTOCOL: Protocol = Protocol::Sotw;

    fn node(req: &DiscoveryRequest) -> Option<&Node> {
        req.node.as_ref()
    }

    fn on_request(&mut self, ctx: &mut StreamCtx, req: DiscoveryRequest) -> Result<(), Status> {
        let DiscoveryRequest {
            version_info: _,
            node: _,
            resource_names,
            resource_locators: _,
            type_url,
            response_nonce,
            error_detail,
        } = req;
        let i = type_index(&type_url).ok_or_else(|| unknown_type(&type_url))?;
        let t = &mut self.types[i];
        let stale = if response_nonce.is_empty() {
            t.latest.is_some()
        } else {
            match ctx.nonces.classify(&response_nonce)? {
                NonceKind::Ours(n) => t.latest != Some(n),
                NonceKind::Foreign => t.latest.is_some(),
            }
        };
        if stale {
            ctx.node
                .metrics()
                .stale_requests
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::debug!(node = %ctx.node_id, type_url, response_nonce, "stale request ignored");
            return Ok(());
        }
        if let (Some(n), Some(version)) = (t.latest, t.sent_version.as_deref())
            && t.answered != Some(n)
        {
            t.answered = Some(n);
            match &error_detail {
                Some(detail) => {
                    let message = nack_message(detail);
                    tracing::warn!(node = %ctx.node_id, gateway = %ctx.gateway, type_url,
                        version, message, "NACK");
                    ctx.node.nacked(i, version, &message);
                    t.nacked = Some(version.to_owned());
                }
                None => {
                    tracing::debug!(node = %ctx.node_id, type_url, version, "ACK");
                    ctx.node.acked(i, version);
                    t.nacked = None;
                }
            }
        }
        let was = t.requested && t.subscribed();
        t.set_names(resource_names, TYPES[i].full_set);
        t.requested = true;
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

    /// The next response in push order, or `None` when nothing needs sending.
    fn next_response(
        &mut self,
        ctx: &mut StreamCtx,
        shared: &Shared,
        snapshot: &Snapshot,
    ) -> Option<DiscoveryResponse> {
        let others_unsettled = self.others_unsettled(snapshot);
        for (i, t) in self.types.iter_mut().enumerate() {
            let ts = snapshot.by_index(i);
            let mut version = ts.version().to_owned();
            let cds = i == CDS;
            let finish_cds = cds && self.cds_deferred && !others_unsettled;
            if !t.needs(&version) && !finish_cds {
                continue;
            }
            let mut resources: Vec<Arc<CachedResource>> = if t.wildcard {
                ts.resources().cloned().collect()
            } else {
                t.names.iter().filter_map(|n| ts.get(n)).cloned().collect()
            };
            t.evaluated = Some(version.clone());
            let added = std::mem::take(&mut t.added);
            if resources.is_empty() && !TYPES[i].full_set {
                // Nothing to say yet: SotW cannot express "does not exist" for these
                // types; the names stay subscribed and are pushed when they appear.
                continue;
            }
            if cds {
                // Make before break: clusters that disappear are kept (in a response of
                // their own version) until the other types are pushed and answered.
                let kept: Vec<Arc<CachedResource>> = if others_unsettled && t.wildcard {
                    self.cds_sent
                        .iter()
                        .filter(|old| !resources.iter().any(|r| r.name() == old.name()))
                        .cloned()
                        .collect()
                } else {
                    Vec::new()
                };
                self.cds_deferred = !kept.is_empty();
                if !kept.is_empty() {
                    let mut parts: Vec<&[u8]> = vec![version.as_bytes()];
                    parts.extend(kept.iter().map(|k| k.name().as_bytes()));
                    version = content_version(&parts);
                    resources.extend(kept);
                    resources.sort_by(|a, b| a.name().cmp(b.name()));
                }
                let same = others_unsettled
                    && resources.len() == self.cds_sent.len()
                    && resources
                        .iter()
                        .zip(&self.cds_sent)
                        .all(|(a, b)| a.name() == b.name() && a.version() == b.version());
                if !added && (same || t.sent_version.as_deref() == Some(version.as_str())) {
                    // The client holds exactly these clusters already.
                    continue;
                }
                self.cds_sent = resources.clone();
            }
            let (counter, nonce) = ctx.nonces.next();
            t.latest = Some(counter);
            t.sent_version = Some(version.clone());
            ctx.node.sent(i, &version);
            tracing::debug!(node = %ctx.node_id, type_url = TYPES[i].url, version,
                resources = resources.len(), nonce, "push");
            return Some(DiscoveryResponse {
                version_info: version,
                resources: resources.iter().map(|r| r.any().clone()).collect(),
                canary: false,
                type_url: TYPES[i].url.to_owned(),
                nonce,
                control_plane: Some(shared.control_plane.clone()),
                resource_errors: Vec::new(),
            });
        }
        None
    }
}
