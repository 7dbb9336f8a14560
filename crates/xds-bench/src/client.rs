//! One simulated data-plane node: an ADS stream (SotW or Delta) that subscribes like the
//! proxy does (wildcard CDS and LDS, then EDS and RDS by the names the clusters and
//! listeners refer to), ACKs every response at once, and records per type the version it
//! ACKed and when.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::cluster::v3::cluster::{ClusterDiscoveryType, DiscoveryType};
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::listener::v3::{Listener, filter};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::Any;
use prost::{Message, Name};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

pub const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
pub const LDS: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const RDS: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";

/// The four types a node without TLS listeners subscribes to, indexed by the constants
/// below.
pub const TYPES: [&str; 4] = [CDS, EDS, LDS, RDS];
pub const I_CDS: usize = 0;
pub const I_EDS: usize = 1;
pub const I_LDS: usize = 2;
pub const I_RDS: usize = 3;

/// ADS flavour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Sotw,
    Delta,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Sotw => "sotw",
            Protocol::Delta => "delta",
        }
    }
}

/// The last ACK of one type: the version and when the ACK was handed to the stream.
#[derive(Debug, Clone)]
pub struct Ack {
    pub version: Arc<str>,
    pub at: Instant,
}

/// What one node has ACKed, shared between its task and the bench driver. The lock is
/// held only to copy a few fields, never across an await.
#[derive(Debug, Default)]
pub struct Slot {
    acked: Mutex<[Option<Ack>; 4]>,
    failed: Mutex<Option<String>>,
}

impl Slot {
    pub fn acked(&self, i: usize) -> Option<Ack> {
        self.acked.lock().unwrap_or_else(PoisonError::into_inner)[i].clone()
    }

    /// All four versions, when the node has ACKed every type.
    pub fn versions(&self) -> Option<[Arc<str>; 4]> {
        let a = self.acked.lock().unwrap_or_else(PoisonError::into_inner);
        let v = |i: usize| a[i].as_ref().map(|x| x.version.clone());
        Some([v(0)?, v(1)?, v(2)?, v(3)?])
    }

    pub fn failure(&self) -> Option<String> {
        self.failed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn record(&self, i: usize, version: &str, at: Instant) {
        self.acked.lock().unwrap_or_else(PoisonError::into_inner)[i] = Some(Ack {
            version: Arc::from(version),
            at,
        });
    }

    fn fail(&self, why: String) {
        *self.failed.lock().unwrap_or_else(PoisonError::into_inner) = Some(why);
    }
}

fn type_index(url: &str) -> Option<usize> {
    TYPES.iter().position(|t| *t == url)
}

/// The node identity: `cluster` names the Gateway (`namespace/name`).
fn node(id: &str, gateway: &str) -> Option<Node> {
    Some(Node {
        id: id.to_owned(),
        cluster: gateway.to_owned(),
        user_agent_name: "biplane-xds-bench".to_owned(),
        ..Default::default()
    })
}

/// The EDS service name of an EDS cluster.
fn eds_name(any: &Any) -> Option<String> {
    let c = Cluster::decode(&*any.value).ok()?;
    let eds = matches!(
        c.cluster_discovery_type,
        Some(ClusterDiscoveryType::Type(t)) if t == DiscoveryType::Eds as i32
    );
    if !eds {
        return None;
    }
    Some(match c.eds_cluster_config {
        Some(cfg) if !cfg.service_name.is_empty() => cfg.service_name,
        _ => c.name,
    })
}

/// The RDS names a listener's HTTP connection managers refer to.
fn rds_names(any: &Any) -> Vec<String> {
    let Ok(l) = Listener::decode(&*any.value) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for chain in l.filter_chains.iter().chain(&l.default_filter_chain) {
        for f in &chain.filters {
            if let Some(filter::ConfigType::TypedConfig(any)) = &f.config_type
                && any.type_url == hcm::HttpConnectionManager::type_url()
                && let Ok(m) = hcm::HttpConnectionManager::decode(&*any.value)
                && let Some(hcm::http_connection_manager::RouteSpecifier::Rds(rds)) =
                    m.route_specifier
            {
                out.push(rds.route_config_name);
            }
        }
    }
    out
}

/// Per parent type (CDS, LDS): resource name -> the child names it refers to.
#[derive(Default)]
struct Refs {
    clusters: BTreeMap<String, Vec<String>>,
    listeners: BTreeMap<String, Vec<String>>,
}

impl Refs {
    fn eds(&self) -> BTreeSet<String> {
        self.clusters.values().flatten().cloned().collect()
    }

    fn rds(&self) -> BTreeSet<String> {
        self.listeners.values().flatten().cloned().collect()
    }
}

fn children(i: usize, any: &Any) -> Vec<String> {
    if i == I_CDS {
        eds_name(any).into_iter().collect()
    } else {
        rds_names(any)
    }
}

/// Runs one node until its stream ends; a failure is recorded in `slot`.
pub async fn run(
    channel: Channel,
    protocol: Protocol,
    id: String,
    gateway: String,
    slot: Arc<Slot>,
) {
    let result = match protocol {
        Protocol::Sotw => sotw(channel, &id, &gateway, &slot).await,
        Protocol::Delta => delta(channel, &id, &gateway, &slot).await,
    };
    match result {
        Ok(()) => slot.fail("stream ended".to_owned()),
        Err(e) => slot.fail(format!("{id}: {e}")),
    }
}

async fn sotw(channel: Channel, id: &str, gateway: &str, slot: &Slot) -> anyhow::Result<()> {
    let req = |url: &str, names: &BTreeSet<String>| DiscoveryRequest {
        type_url: url.to_owned(),
        resource_names: names.iter().cloned().collect(),
        ..Default::default()
    };
    let none = BTreeSet::new();
    let (tx, rx) = mpsc::channel(8);
    tx.send(DiscoveryRequest {
        node: node(id, gateway),
        ..req(CDS, &none)
    })
    .await?;
    tx.send(req(LDS, &none)).await?;
    let mut stream = AggregatedDiscoveryServiceClient::new(channel)
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut refs = Refs::default();
    let mut subscribed: [BTreeSet<String>; 4] = Default::default();
    // (version, nonce) of the latest response per type, for subscription changes.
    let mut last: [(String, String); 4] = Default::default();
    while let Some(resp) = stream.message().await? {
        let DiscoveryResponse {
            version_info,
            resources,
            type_url,
            nonce,
            ..
        } = resp;
        let Some(i) = type_index(&type_url) else {
            anyhow::bail!("unexpected type {type_url}");
        };
        tx.send(DiscoveryRequest {
            version_info: version_info.clone(),
            response_nonce: nonce.clone(),
            ..req(&type_url, &subscribed[i])
        })
        .await?;
        slot.record(i, &version_info, Instant::now());
        last[i] = (version_info, nonce);
        if i == I_CDS || i == I_LDS {
            let map = if i == I_CDS {
                &mut refs.clusters
            } else {
                &mut refs.listeners
            };
            map.clear();
            for any in &resources {
                // SotW carries the whole set; the key only has to be unique.
                map.insert(map.len().to_string(), children(i, any));
            }
            let (child, names) = if i == I_CDS {
                (I_EDS, refs.eds())
            } else {
                (I_RDS, refs.rds())
            };
            if names != subscribed[child] {
                subscribed[child] = names;
                let (v, n) = &last[child];
                tx.send(DiscoveryRequest {
                    version_info: v.clone(),
                    response_nonce: n.clone(),
                    ..req(TYPES[child], &subscribed[child])
                })
                .await?;
            }
        }
    }
    Ok(())
}

async fn delta(channel: Channel, id: &str, gateway: &str, slot: &Slot) -> anyhow::Result<()> {
    let sub = |url: &str, add: Vec<String>, remove: Vec<String>| DeltaDiscoveryRequest {
        type_url: url.to_owned(),
        resource_names_subscribe: add,
        resource_names_unsubscribe: remove,
        ..Default::default()
    };
    let (tx, rx) = mpsc::channel(8);
    tx.send(DeltaDiscoveryRequest {
        node: node(id, gateway),
        ..sub(CDS, vec!["*".to_owned()], Vec::new())
    })
    .await?;
    tx.send(sub(LDS, vec!["*".to_owned()], Vec::new())).await?;
    let mut stream = AggregatedDiscoveryServiceClient::new(channel)
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut refs = Refs::default();
    let mut subscribed: [BTreeSet<String>; 4] = Default::default();
    while let Some(resp) = stream.message().await? {
        let DeltaDiscoveryResponse {
            system_version_info,
            resources,
            type_url,
            removed_resources,
            nonce,
            ..
        } = resp;
        let Some(i) = type_index(&type_url) else {
            anyhow::bail!("unexpected type {type_url}");
        };
        tx.send(DeltaDiscoveryRequest {
            type_url: type_url.clone(),
            response_nonce: nonce,
            ..Default::default()
        })
        .await?;
        slot.record(i, &system_version_info, Instant::now());
        if i == I_CDS || i == I_LDS {
            let map = if i == I_CDS {
                &mut refs.clusters
            } else {
                &mut refs.listeners
            };
            for name in &removed_resources {
                map.remove(name);
            }
            for r in &resources {
                if let Some(any) = &r.resource {
                    map.insert(r.name.clone(), children(i, any));
                }
            }
            let (child, names) = if i == I_CDS {
                (I_EDS, refs.eds())
            } else {
                (I_RDS, refs.rds())
            };
            if names != subscribed[child] {
                let add: Vec<String> = names.difference(&subscribed[child]).cloned().collect();
                let remove: Vec<String> = subscribed[child].difference(&names).cloned().collect();
                subscribed[child] = names;
                tx.send(sub(TYPES[child], add, remove)).await?;
            }
        }
    }
    Ok(())
}
