//! The xDS client's resource bookkeeping: per type the resources held (name → version and
//! encoded `Any`), how a SotW or Delta response changes them, the names listeners and
//! clusters refer to (what EDS/RDS/SDS must subscribe to), and whether the set is complete
//! (nothing warming) so it can be translated and applied.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::cluster::v3::cluster::{ClusterDiscoveryType, DiscoveryType};
use envoy_types::pb::envoy::config::core::v3::transport_socket;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::{FilterChain, Listener, filter};
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    DownstreamTlsContext, Secret,
};
use envoy_types::pb::envoy::service::discovery::v3::Resource;
use envoy_types::pb::google::protobuf::Any;
use prost::{Message, Name};

use crate::server::PUSH_ORDER;
use crate::{ResourceKind, XdsErrors, XdsResources};

/// Indexes into [`PUSH_ORDER`].
pub(crate) const CDS: usize = 0;
pub(crate) const EDS: usize = 1;
pub(crate) const SDS: usize = 2;
pub(crate) const LDS: usize = 3;
pub(crate) const RDS: usize = 4;

/// LDS and CDS are wildcard subscriptions; the others are subscribed by name.
pub(crate) fn is_wildcard_type(i: usize) -> bool {
    i == CDS || i == LDS
}

/// One resource as received.
#[derive(Debug, PartialEq)]
pub(crate) struct Held {
    /// Delta: the resource's version; SotW: the `version_info` of its response.
    pub(crate) version: String,
    pub(crate) any: Any,
    /// Names this resource refers to, indexed like [`PUSH_ORDER`] (a cluster: its EDS
    /// service; a listener: its RDS route configurations and SDS secrets).
    refs: Vec<(usize, String)>,
}

/// The resources of one type.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct TypeSet {
    /// `version_info` (SotW) or `system_version_info` (Delta) of the last accepted response.
    pub(crate) version: String,
    /// A response of this type was accepted (LDS/CDS: the set is known, even if empty).
    pub(crate) received: bool,
    pub(crate) resources: BTreeMap<String, Arc<Held>>,
}

/// Everything held, indexed like [`PUSH_ORDER`]. Cheap to clone (resources are `Arc`s).
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct ResourceState {
    pub(crate) types: [TypeSet; 5],
}

/// Names referenced by the held listeners and clusters, per named type.
pub(crate) type Refs = [BTreeSet<String>; 5];

impl ResourceState {
    /// A SotW response: LDS/CDS replace the whole set; EDS/RDS/SDS update the resources
    /// they carry (the others stay until no parent refers to them).
    pub(crate) fn apply_sotw(
        &mut self,
        i: usize,
        version: &str,
        resources: &[Any],
    ) -> Result<(), String> {
        let mut decoded = BTreeMap::new();
        for (n, any) in resources.iter().enumerate() {
            let (name, held) =
                decode(i, any, version.to_owned()).map_err(|e| format!("resources[{n}]: {e}"))?;
            if decoded.insert(name.clone(), Arc::new(held)).is_some() {
                return Err(format!(
                    "{} {name:?} appears twice in one response",
                    PUSH_ORDER[i]
                ));
            }
        }
        let t = &mut self.types[i];
        if is_wildcard_type(i) {
            t.resources = decoded;
        } else {
            t.resources.extend(decoded);
        }
        t.version = version.to_owned();
        t.received = true;
        Ok(())
    }

    /// A Delta response: upserts `resources`, deletes `removed`.
    pub(crate) fn apply_delta(
        &mut self,
        i: usize,
        version: &str,
        resources: &[Resource],
        removed: &[String],
    ) -> Result<(), String> {
        let mut decoded = BTreeMap::new();
        for (n, r) in resources.iter().enumerate() {
            let Some(any) = &r.resource else {
                return Err(format!("resources[{n}] ({:?}): no resource body", r.name));
            };
            let (name, held) = decode(i, any, r.version.clone())
                .map_err(|e| format!("resources[{n}] ({:?}): {e}", r.name))?;
            if name != r.name {
                return Err(format!(
                    "resources[{n}]: named {:?} but the {} inside is named {name:?}",
                    r.name, PUSH_ORDER[i]
                ));
            }
            if decoded.insert(name.clone(), Arc::new(held)).is_some() {
                return Err(format!(
                    "{} {name:?} appears twice in one response",
                    PUSH_ORDER[i]
                ));
            }
        }
        let t = &mut self.types[i];
        for name in removed {
            t.resources.remove(name);
        }
        t.resources.extend(decoded);
        t.version = version.to_owned();
        t.received = true;
        Ok(())
    }

    /// Names the held clusters (EDS) and listeners (RDS, SDS) refer to.
    pub(crate) fn refs(&self) -> Refs {
        let mut refs: Refs = Default::default();
        for t in [&self.types[CDS], &self.types[LDS]] {
            for held in t.resources.values() {
                for (i, name) in &held.refs {
                    refs[*i].insert(name.clone());
                }
            }
        }
        refs
    }

    /// Drops EDS/RDS/SDS resources no parent refers to any more (they die implicitly).
    pub(crate) fn prune(&mut self, refs: &Refs) {
        for i in [EDS, SDS, RDS] {
            self.types[i]
                .resources
                .retain(|name, _| refs[i].contains(name));
        }
    }

    /// What keeps the set from being applied: LDS/CDS never received, or referenced
    /// resources not here yet (warming). Empty = complete.
    pub(crate) fn missing(&self, refs: &Refs) -> Vec<String> {
        let mut out = Vec::new();
        for i in [CDS, LDS] {
            if !self.types[i].received {
                out.push(format!("the first {} response", PUSH_ORDER[i]));
            }
        }
        for i in [EDS, SDS, RDS] {
            for name in &refs[i] {
                if !self.types[i].resources.contains_key(name) {
                    out.push(format!("{} {name:?}", PUSH_ORDER[i]));
                }
            }
        }
        out
    }

    /// Decodes everything into the translator's input.
    pub(crate) fn to_resources(&self) -> Result<XdsResources, XdsErrors> {
        XdsResources::from_any(
            self.types
                .iter()
                .flat_map(|t| t.resources.values().map(|h| h.any.clone())),
        )
    }

    /// The config version label: the five type versions.
    pub(crate) fn version_label(&self) -> String {
        const SHORT: [&str; 5] = ["cds", "eds", "sds", "lds", "rds"];
        let mut s = String::new();
        for (i, t) in self.types.iter().enumerate() {
            if !t.received && t.resources.is_empty() {
                continue;
            }
            if !s.is_empty() {
                s.push(' ');
            }
            s.push_str(SHORT[i]);
            s.push('=');
            s.push_str(&t.version);
        }
        s
    }

    /// Same resources (names and encoded content) as `other`, versions aside.
    pub(crate) fn same_content(&self, other: &ResourceState) -> bool {
        self.types.iter().zip(&other.types).all(|(a, b)| {
            a.resources.len() == b.resources.len()
                && a.resources
                    .iter()
                    .zip(&b.resources)
                    .all(|((na, ha), (nb, hb))| {
                        na == nb && (Arc::ptr_eq(ha, hb) || ha.any == hb.any)
                    })
        })
    }

    /// Inserts one resource as is (loading a last-known-good file).
    pub(crate) fn insert(
        &mut self,
        i: usize,
        version: String,
        any: &Any,
    ) -> Result<String, String> {
        let (name, held) = decode(i, any, version)?;
        self.types[i].resources.insert(name.clone(), Arc::new(held));
        Ok(name)
    }
}

/// Decodes one resource of type `i`: its name and what it refers to.
fn decode(i: usize, any: &Any, version: String) -> Result<(String, Held), String> {
    let kind = PUSH_ORDER[i];
    if any.type_url != kind.type_url() {
        return Err(format!(
            "type_url {:?} in a {} response",
            any.type_url, kind
        ));
    }
    let bad = |e: prost::DecodeError| format!("cannot decode {kind}: {e}");
    let mut refs = Vec::new();
    let name = match kind {
        ResourceKind::Cluster => {
            let c = Cluster::decode(&*any.value).map_err(bad)?;
            if let Some(service) = eds_service(&c) {
                refs.push((EDS, service));
            }
            c.name
        }
        ResourceKind::ClusterLoadAssignment => {
            ClusterLoadAssignment::decode(&*any.value)
                .map_err(bad)?
                .cluster_name
        }
        ResourceKind::Secret => Secret::decode(&*any.value).map_err(bad)?.name,
        ResourceKind::Listener => {
            let l = Listener::decode(&*any.value).map_err(bad)?;
            for chain in l.filter_chains.iter().chain(&l.default_filter_chain) {
                chain_refs(chain, &mut refs);
            }
            l.name
        }
        ResourceKind::RouteConfiguration => {
            RouteConfiguration::decode(&*any.value).map_err(bad)?.name
        }
        ResourceKind::Unknown => return Err("unknown resource type".to_owned()),
    };
    if name.is_empty() {
        return Err(format!("a {kind} has an empty name"));
    }
    Ok((
        name,
        Held {
            version,
            any: any.clone(),
            refs,
        },
    ))
}

/// The EDS service name of an EDS cluster.
fn eds_service(c: &Cluster) -> Option<String> {
    let eds = matches!(
        c.cluster_discovery_type,
        Some(ClusterDiscoveryType::Type(t)) if t == DiscoveryType::Eds as i32
    );
    if !eds {
        return None;
    }
    Some(match &c.eds_cluster_config {
        Some(cfg) if !cfg.service_name.is_empty() => cfg.service_name.clone(),
        _ => c.name.clone(),
    })
}

/// RDS names of HCM filters and SDS secrets of TLS contexts in one filter chain.
/// Undecodable configs are left to the translator to report.
fn chain_refs(chain: &FilterChain, refs: &mut Vec<(usize, String)>) {
    for f in &chain.filters {
        if let Some(filter::ConfigType::TypedConfig(any)) = &f.config_type
            && any.type_url == hcm::HttpConnectionManager::type_url()
            && let Ok(m) = hcm::HttpConnectionManager::decode(&*any.value)
            && let Some(hcm::http_connection_manager::RouteSpecifier::Rds(rds)) = m.route_specifier
        {
            refs.push((RDS, rds.route_config_name));
        }
    }
    if let Some(ts) = &chain.transport_socket
        && let Some(transport_socket::ConfigType::TypedConfig(any)) = &ts.config_type
        && any.type_url == DownstreamTlsContext::type_url()
        && let Ok(ctx) = DownstreamTlsContext::decode(&*any.value)
        && let Some(common) = ctx.common_tls_context
    {
        for sds in common.tls_certificate_sds_secret_configs {
            refs.push((SDS, sds.name));
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

    use super::*;
    use crate::to_any;

    fn eds_cluster(name: &str) -> Cluster {
        Cluster {
            name: name.to_owned(),
            cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
            ..Default::default()
        }
    }

    #[test]
    fn clusters_refer_to_their_load_assignments_and_warm() {
        let mut s = ResourceState::default();
        s.apply_sotw(CDS, "1", &[to_any(&eds_cluster("a"))])
            .unwrap();
        s.apply_sotw(LDS, "1", &[]).unwrap();
        let refs = s.refs();
        assert!(refs[EDS].contains("a"));
        assert_eq!(
            s.missing(&refs),
            vec!["ClusterLoadAssignment \"a\"".to_owned()]
        );
        let cla = ClusterLoadAssignment {
            cluster_name: "a".to_owned(),
            ..Default::default()
        };
        s.apply_sotw(EDS, "1", &[to_any(&cla)]).unwrap();
        assert!(s.missing(&s.refs()).is_empty());
        // The cluster goes: its load assignment dies with it.
        s.apply_sotw(CDS, "2", &[]).unwrap();
        let refs = s.refs();
        s.prune(&refs);
        assert!(s.types[EDS].resources.is_empty());
    }

    #[test]
    fn duplicate_and_mistyped_resources_are_refused() {
        let mut s = ResourceState::default();
        let c = to_any(&eds_cluster("a"));
        assert!(
            s.apply_sotw(CDS, "1", &[c.clone(), c.clone()])
                .unwrap_err()
                .contains("twice")
        );
        assert!(
            s.apply_sotw(LDS, "1", &[c])
                .unwrap_err()
                .contains("type_url")
        );
        assert_eq!(s, ResourceState::default());
    }

    #[test]
    fn delta_names_must_match() {
        let mut s = ResourceState::default();
        let r = Resource {
            name: "b".to_owned(),
            version: "v".to_owned(),
            resource: Some(to_any(&eds_cluster("a"))),
            ..Default::default()
        };
        assert!(
            s.apply_delta(CDS, "1", &[r], &[])
                .unwrap_err()
                .contains("named")
        );
    }
}
