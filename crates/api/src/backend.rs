//! `biplane.dev/v1alpha1` `Backend`: a named set of endpoints with a load-balancing policy
//! (Biplane's stand-in for a Kubernetes Service + EndpointSlice).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::duration::GatewayDuration;
use crate::meta::ObjectMeta;

/// Default upstream connect timeout when `spec.connectTimeout` is absent.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A Backend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Backend {
    /// Metadata.
    pub metadata: ObjectMeta,
    /// Spec.
    pub spec: BackendSpec,
}

/// `Backend.spec`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendSpec {
    /// Endpoints (may be empty: requests then get 503).
    pub endpoints: Vec<Endpoint>,
    /// Load balancing (default RoundRobin).
    pub load_balancer: Option<LoadBalancer>,
    /// Upstream protocol (default `http`).
    pub app_protocol: Option<AppProtocol>,
    /// Connect timeout (default 5s); see [`BackendSpec::connect_timeout`].
    pub connect_timeout: Option<GatewayDuration>,
}

impl BackendSpec {
    /// Effective load-balancer type.
    pub fn load_balancer_type(&self) -> LoadBalancerType {
        self.load_balancer
            .as_ref()
            .map(LoadBalancer::lb_type)
            .unwrap_or_default()
    }
    /// Effective hash key (None = a random key for RingHash/Maglev, or not a hash balancer).
    pub fn hash_on(&self) -> Option<HashKey> {
        self.load_balancer
            .as_ref()
            .and_then(|lb| lb.hash_on.as_ref())
            .and_then(HashOn::key)
    }
    /// Effective upstream protocol.
    pub fn app_protocol(&self) -> AppProtocol {
        self.app_protocol.unwrap_or_default()
    }
    /// Effective connect timeout.
    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
            .as_ref()
            .map_or(DEFAULT_CONNECT_TIMEOUT, GatewayDuration::as_std)
    }
}

/// `spec.endpoints[]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Endpoint {
    /// IP literal (v4 or v6) or DNS hostname.
    pub address: String,
    /// Port, 1..=65535.
    pub port: u16,
    /// Weight >= 1 (default 1).
    pub weight: Option<u32>,
}

impl Endpoint {
    /// Effective weight.
    pub fn weight(&self) -> u32 {
        self.weight.unwrap_or(1)
    }
    /// The address parsed as an IP literal, if it is one.
    pub fn ip(&self) -> Option<std::net::IpAddr> {
        self.address.parse().ok()
    }
}

/// `spec.loadBalancer`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadBalancer {
    /// Algorithm (default RoundRobin).
    #[serde(rename = "type")]
    pub lb_type: Option<LoadBalancerType>,
    /// Hash key for RingHash/Maglev (only valid with those).
    pub hash_on: Option<HashOn>,
}

impl LoadBalancer {
    /// Effective type.
    pub fn lb_type(&self) -> LoadBalancerType {
        self.lb_type.unwrap_or_default()
    }
}

/// Load-balancing algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum LoadBalancerType {
    /// Weighted round robin.
    #[default]
    RoundRobin,
    /// Power of two choices on in-flight requests.
    LeastRequest,
    /// Weighted random.
    Random,
    /// Consistent hashing on a ring (Ketama).
    RingHash,
    /// Maglev consistent hashing.
    Maglev,
}

impl LoadBalancerType {
    /// Whether the algorithm uses a hash key.
    pub fn is_hash(self) -> bool {
        matches!(self, LoadBalancerType::RingHash | LoadBalancerType::Maglev)
    }
}

/// `loadBalancer.hashOn`: exactly one of the fields.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HashOn {
    /// Hash on this request header's value.
    pub header: Option<String>,
    /// Hash on this cookie's value.
    pub cookie: Option<String>,
    /// Hash on the client's IP address.
    #[serde(rename = "sourceIP")]
    pub source_ip: Option<bool>,
}

impl HashOn {
    /// The key this selects (validation guarantees exactly one).
    pub fn key(&self) -> Option<HashKey> {
        if let Some(h) = &self.header {
            return Some(HashKey::Header(h.clone()));
        }
        if let Some(c) = &self.cookie {
            return Some(HashKey::Cookie(c.clone()));
        }
        (self.source_ip == Some(true)).then_some(HashKey::SourceIp)
    }
}

/// A resolved hash key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HashKey {
    /// Request header value.
    Header(String),
    /// Cookie value.
    Cookie(String),
    /// Client IP.
    SourceIp,
}

/// Upstream application protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum AppProtocol {
    /// HTTP/1.1.
    #[default]
    #[serde(rename = "http")]
    Http,
    /// HTTP/2 with prior knowledge over cleartext (needed for gRPC backends).
    #[serde(rename = "h2c")]
    H2c,
}
