//! `gateway.networking.k8s.io/v1` `Gateway`: listeners, TLS settings, allowed routes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::meta::ObjectMeta;

/// A Gateway: a set of listeners served by one proxy fleet (the node's `--gateway`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Gateway {
    /// Metadata.
    pub metadata: ObjectMeta,
    /// Spec.
    pub spec: GatewaySpec,
}

/// `Gateway.spec`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewaySpec {
    /// Optional here (Biplane has a single implicit class).
    pub gateway_class_name: Option<String>,
    /// Listeners (at least one; names unique).
    pub listeners: Vec<Listener>,
    /// Requested addresses, kept for a control plane; the proxy binds all addresses.
    pub addresses: Vec<GatewayAddress>,
}

/// `spec.addresses[]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewayAddress {
    /// `IPAddress` (default) or `Hostname`.
    #[serde(rename = "type")]
    pub address_type: Option<String>,
    /// The address.
    pub value: String,
}

/// `spec.listeners[]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Listener {
    /// Unique within the Gateway; what `sectionName` refers to.
    pub name: String,
    /// Exact (`www.example.com`) or wildcard (`*.example.com`) host; none = any host.
    pub hostname: Option<String>,
    /// Port, 1..=65535.
    pub port: u16,
    /// Protocol.
    pub protocol: ProtocolType,
    /// TLS settings: required for HTTPS/TLS, forbidden for HTTP/TCP.
    pub tls: Option<GatewayTlsConfig>,
    /// Which routes may attach (default: same namespace, kinds by protocol).
    pub allowed_routes: Option<AllowedRoutes>,
}

/// Listener protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ProtocolType {
    /// Plain HTTP/1.1 (and h2c prior knowledge).
    #[serde(rename = "HTTP")]
    Http,
    /// TLS-terminated HTTP (ALPN h2/http1.1).
    #[serde(rename = "HTTPS")]
    Https,
    /// TLS by SNI: passthrough (TLSRoute) or terminate then TCP.
    #[serde(rename = "TLS")]
    Tls,
    /// Plain TCP (TCPRoute).
    #[serde(rename = "TCP")]
    Tcp,
}

impl ProtocolType {
    /// The spelling used in documents.
    pub fn as_str(self) -> &'static str {
        match self {
            ProtocolType::Http => "HTTP",
            ProtocolType::Https => "HTTPS",
            ProtocolType::Tls => "TLS",
            ProtocolType::Tcp => "TCP",
        }
    }
}

/// `listeners[].tls`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewayTlsConfig {
    /// `Terminate` (default) or `Passthrough`; see [`GatewayTlsConfig::mode`].
    pub mode: Option<TlsModeType>,
    /// Certificates (Secrets of type `kubernetes.io/tls`) for Terminate mode.
    pub certificate_refs: Vec<SecretObjectReference>,
}

impl GatewayTlsConfig {
    /// Effective mode (Gateway API default: Terminate).
    pub fn mode(&self) -> TlsModeType {
        self.mode.unwrap_or(TlsModeType::Terminate)
    }
}

/// TLS mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TlsModeType {
    /// Terminate TLS at the proxy.
    Terminate,
    /// Route on SNI without decrypting.
    Passthrough,
}

/// A reference to a Secret (`certificateRefs[]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretObjectReference {
    /// API group; default `""` (core).
    pub group: Option<String>,
    /// Kind; default `Secret`.
    pub kind: Option<String>,
    /// Name.
    pub name: String,
    /// Namespace; default: the Gateway's.
    pub namespace: Option<String>,
}

impl SecretObjectReference {
    /// Effective group (`""`).
    pub fn group(&self) -> &str {
        self.group.as_deref().unwrap_or("")
    }
    /// Effective kind (`Secret`).
    pub fn kind(&self) -> &str {
        self.kind.as_deref().unwrap_or("Secret")
    }
    /// Effective namespace given the referring object's namespace.
    pub fn namespace<'a>(&'a self, from: &'a str) -> &'a str {
        self.namespace.as_deref().unwrap_or(from)
    }
}

/// `listeners[].allowedRoutes`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AllowedRoutes {
    /// Namespaces routes may come from (default: Same).
    pub namespaces: Option<RouteNamespaces>,
    /// Route kinds allowed (default: the kinds the protocol supports).
    pub kinds: Vec<RouteGroupKind>,
}

/// `allowedRoutes.namespaces`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteNamespaces {
    /// `All`, `Same` (default) or `Selector`.
    pub from: Option<FromNamespaces>,
    /// Used with `from: Selector`.
    pub selector: Option<LabelSelector>,
}

/// Where routes may come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FromNamespaces {
    /// Any namespace.
    All,
    /// The Gateway's namespace.
    Same,
    /// Namespaces matching a label selector. Biplane has no Namespace objects, so no
    /// namespace matches (routes are reported as not allowed).
    Selector,
}

/// A Kubernetes label selector (kept; see [`FromNamespaces::Selector`]).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelSelector {
    /// Exact label matches.
    pub match_labels: BTreeMap<String, String>,
    /// Set-based requirements.
    pub match_expressions: Vec<LabelSelectorRequirement>,
}

/// One set-based requirement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelSelectorRequirement {
    /// Label key.
    pub key: String,
    /// `In`, `NotIn`, `Exists`, `DoesNotExist`.
    pub operator: String,
    /// Values.
    pub values: Vec<String>,
}

/// `allowedRoutes.kinds[]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteGroupKind {
    /// Group; default `gateway.networking.k8s.io`.
    pub group: Option<String>,
    /// Kind (`HTTPRoute`, ...).
    pub kind: String,
}

impl Gateway {
    /// Listener by name.
    pub fn listener(&self, name: &str) -> Option<&Listener> {
        self.spec.listeners.iter().find(|l| l.name == name)
    }
}
