//! Object metadata (`metadata:`) shared by every kind, and the `Kind/namespace/name` key.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// The namespace a resource lives in when `metadata.namespace` is absent.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Kubernetes-style object metadata.
///
/// `name` is required; `namespace` defaults to [`DEFAULT_NAMESPACE`] (see
/// [`ObjectMeta::namespace`]). `resourceVersion`, `generation`, `uid` and
/// `creationTimestamp` are accepted and kept so that a control plane can fill them.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObjectMeta {
    /// Object name (DNS-1123 subdomain; routes and Gateways also fit a label).
    pub name: String,
    /// Namespace as written; use [`ObjectMeta::namespace`] for the effective value.
    pub namespace: Option<String>,
    /// Labels, kept verbatim.
    pub labels: BTreeMap<String, String>,
    /// Annotations, kept verbatim.
    pub annotations: BTreeMap<String, String>,
    /// Opaque store revision, filled by a control plane.
    pub resource_version: Option<String>,
    /// Spec generation, filled by a control plane.
    pub generation: Option<i64>,
    /// Unique id, filled by a control plane.
    pub uid: Option<String>,
    /// RFC 3339 creation time, filled by a control plane.
    pub creation_timestamp: Option<String>,
}

impl ObjectMeta {
    /// A metadata block with just a name and a namespace.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            namespace: Some(namespace.into()),
            ..Self::default()
        }
    }

    /// The effective namespace (`default` when absent).
    pub fn namespace(&self) -> &str {
        self.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE)
    }
}

/// The kinds Biplane understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ResourceKind {
    /// `gateway.networking.k8s.io/v1` `Gateway`.
    Gateway,
    /// `gateway.networking.k8s.io/v1` `HTTPRoute`.
    HttpRoute,
    /// `gateway.networking.k8s.io/v1` `GRPCRoute`.
    GrpcRoute,
    /// `gateway.networking.k8s.io/v1alpha2` `TCPRoute`.
    TcpRoute,
    /// `gateway.networking.k8s.io/v1alpha2` `TLSRoute`.
    TlsRoute,
    /// `v1` `Secret` of type `kubernetes.io/tls`.
    Secret,
    /// `biplane.dev/v1alpha1` `Backend`.
    Backend,
}

/// API group of Gateway API kinds.
pub const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";
/// API group of Biplane's own kinds.
pub const BIPLANE_GROUP: &str = "biplane.dev";

impl ResourceKind {
    /// Every kind, in a stable order.
    pub const ALL: [ResourceKind; 7] = [
        ResourceKind::Gateway,
        ResourceKind::HttpRoute,
        ResourceKind::GrpcRoute,
        ResourceKind::TcpRoute,
        ResourceKind::TlsRoute,
        ResourceKind::Secret,
        ResourceKind::Backend,
    ];

    /// The `kind:` string as written in documents (`HTTPRoute`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            ResourceKind::Gateway => "Gateway",
            ResourceKind::HttpRoute => "HTTPRoute",
            ResourceKind::GrpcRoute => "GRPCRoute",
            ResourceKind::TcpRoute => "TCPRoute",
            ResourceKind::TlsRoute => "TLSRoute",
            ResourceKind::Secret => "Secret",
            ResourceKind::Backend => "Backend",
        }
    }

    /// The `apiVersion:` this crate accepts for the kind.
    pub fn api_version(self) -> &'static str {
        match self {
            ResourceKind::Gateway | ResourceKind::HttpRoute | ResourceKind::GrpcRoute => {
                "gateway.networking.k8s.io/v1"
            }
            ResourceKind::TcpRoute | ResourceKind::TlsRoute => "gateway.networking.k8s.io/v1alpha2",
            ResourceKind::Secret => "v1",
            ResourceKind::Backend => "biplane.dev/v1alpha1",
        }
    }

    /// The API group (`""` for core `v1`).
    pub fn group(self) -> &'static str {
        match self {
            ResourceKind::Secret => "",
            ResourceKind::Backend => BIPLANE_GROUP,
            _ => GATEWAY_GROUP,
        }
    }

    /// Looks a kind up by its `kind:` string.
    pub fn from_kind_str(kind: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == kind)
    }
}

impl fmt::Display for ResourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Identity of a resource: `Kind/namespace/name`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceKey {
    /// Kind.
    pub kind: ResourceKind,
    /// Effective namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl ResourceKey {
    /// Builds a key.
    pub fn new(kind: ResourceKind, namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            kind,
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ResourceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.kind, self.namespace, self.name)
    }
}
