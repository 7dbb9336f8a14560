//! The [`Resource`] enum over every kind, with identity accessors and rendering back to a
//! document.

use serde_json::Value;

use crate::backend::Backend;
use crate::gateway::Gateway;
use crate::meta::{ObjectMeta, ResourceKey, ResourceKind};
use crate::route::{GrpcRoute, HttpRoute, TcpRoute, TlsRoute};
use crate::secret::TlsSecret;

/// One parsed, validated resource.
#[derive(Debug, Clone, PartialEq)]
pub enum Resource {
    /// A Gateway.
    Gateway(Gateway),
    /// An HTTPRoute.
    HttpRoute(HttpRoute),
    /// A GRPCRoute.
    GrpcRoute(GrpcRoute),
    /// A TCPRoute.
    TcpRoute(TcpRoute),
    /// A TLSRoute.
    TlsRoute(TlsRoute),
    /// A TLS Secret.
    Secret(TlsSecret),
    /// A Backend.
    Backend(Backend),
}

impl Resource {
    /// The kind.
    pub fn kind(&self) -> ResourceKind {
        match self {
            Resource::Gateway(_) => ResourceKind::Gateway,
            Resource::HttpRoute(_) => ResourceKind::HttpRoute,
            Resource::GrpcRoute(_) => ResourceKind::GrpcRoute,
            Resource::TcpRoute(_) => ResourceKind::TcpRoute,
            Resource::TlsRoute(_) => ResourceKind::TlsRoute,
            Resource::Secret(_) => ResourceKind::Secret,
            Resource::Backend(_) => ResourceKind::Backend,
        }
    }

    /// The metadata.
    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            Resource::Gateway(r) => &r.metadata,
            Resource::HttpRoute(r) => &r.metadata,
            Resource::GrpcRoute(r) => &r.metadata,
            Resource::TcpRoute(r) => &r.metadata,
            Resource::TlsRoute(r) => &r.metadata,
            Resource::Secret(r) => &r.metadata,
            Resource::Backend(r) => &r.metadata,
        }
    }

    /// Mutable metadata (a control plane fills resourceVersion & co).
    pub fn metadata_mut(&mut self) -> &mut ObjectMeta {
        match self {
            Resource::Gateway(r) => &mut r.metadata,
            Resource::HttpRoute(r) => &mut r.metadata,
            Resource::GrpcRoute(r) => &mut r.metadata,
            Resource::TcpRoute(r) => &mut r.metadata,
            Resource::TlsRoute(r) => &mut r.metadata,
            Resource::Secret(r) => &mut r.metadata,
            Resource::Backend(r) => &mut r.metadata,
        }
    }

    /// `metadata.name`.
    pub fn name(&self) -> &str {
        &self.metadata().name
    }

    /// Effective namespace.
    pub fn namespace(&self) -> &str {
        self.metadata().namespace()
    }

    /// `apiVersion` of the kind.
    pub fn api_version(&self) -> &'static str {
        self.kind().api_version()
    }

    /// `Kind/namespace/name`.
    pub fn key(&self) -> ResourceKey {
        ResourceKey::new(self.kind(), self.namespace(), self.name())
    }

    /// Renders the resource as a document (`apiVersion`, `kind`, `metadata`, `spec`), with
    /// absent optional fields and empty lists left out. Parsing the result gives the
    /// resource back.
    pub fn to_document(&self) -> Value {
        let parts = match self {
            Resource::Secret(s) => return s.to_document(),
            Resource::Gateway(r) => serde_json::to_value(r),
            Resource::HttpRoute(r) => serde_json::to_value(r),
            Resource::GrpcRoute(r) => serde_json::to_value(r),
            Resource::TcpRoute(r) => serde_json::to_value(r),
            Resource::TlsRoute(r) => serde_json::to_value(r),
            Resource::Backend(r) => serde_json::to_value(r),
        };
        let mut doc = serde_json::Map::new();
        doc.insert("apiVersion".into(), Value::from(self.api_version()));
        doc.insert("kind".into(), Value::from(self.kind().as_str()));
        if let Ok(Value::Object(map)) = parts {
            doc.extend(map);
        }
        prune(Value::Object(doc))
    }
}

/// Removes `null`s, empty lists and empty maps (other than the top level) from a tree.
pub(crate) fn prune(v: Value) -> Value {
    match v {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| (k, prune(v)))
                .filter(|(_, v)| !is_empty(v))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.into_iter().map(prune).collect()),
        other => other,
    }
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

macro_rules! from_kind {
    ($($variant:ident($ty:ty)),*) => {$(
        impl From<$ty> for Resource {
            fn from(r: $ty) -> Self { Resource::$variant(r) }
        }
    )*};
}
from_kind!(
    Gateway(Gateway),
    HttpRoute(HttpRoute),
    GrpcRoute(GrpcRoute),
    TcpRoute(TcpRoute),
    TlsRoute(TlsRoute),
    Secret(TlsSecret),
    Backend(Backend)
);
