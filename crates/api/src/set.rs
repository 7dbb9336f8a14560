//! A validated set of resources: lookups, route attachment (Gateway API rules shared by the
//! translator and the control plane), hostname intersection, and unresolved references as
//! data ([`RefProblem`]), since Gateway API accepts a route whose references do not resolve
//! (`ResolvedRefs=False`, requests get 500) rather than rejecting the configuration.
//!
//! Cross-namespace references are allowed: Biplane does not model `ReferenceGrant`.

use std::collections::BTreeMap;

use crate::backend::Backend;
use crate::gateway::{FromNamespaces, Gateway, Listener, ProtocolType, TlsModeType};
use crate::meta::{BIPLANE_GROUP, GATEWAY_GROUP, ObjectMeta, ResourceKey, ResourceKind};
use crate::resource::Resource;
use crate::route::{BackendRef, GrpcRoute, HttpRoute, ParentReference, TcpRoute, TlsRoute};
use crate::secret::TlsSecret;

/// Result of intersecting a listener's hostname with a route's hostnames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostnameIntersection {
    /// Neither side restricts: every host matches.
    Any,
    /// The route serves exactly these host patterns on this listener (exact or `*.` wildcard),
    /// in the route's order, without duplicates.
    Hostnames(Vec<String>),
    /// No route hostname intersects the listener's: the route does not attach there.
    Disjoint,
}

/// Whether every host matched by pattern `a` is matched by pattern `b` (`*.x` = suffix
/// match on one or more labels, as Gateway API defines it).
fn within(a: &str, b: &str) -> bool {
    if a.eq_ignore_ascii_case(b) {
        return true;
    }
    let Some(b_suffix) = b.strip_prefix('*') else {
        return false;
    };
    let a_rest = a.strip_prefix('*').unwrap_or(a);
    let (a_rest, b_suffix) = (a_rest.to_ascii_lowercase(), b_suffix.to_ascii_lowercase());
    a_rest.ends_with(&b_suffix) && (a.starts_with('*') || a_rest.len() > b_suffix.len())
}

/// Intersects a listener hostname (none = any) with a route's hostnames (empty = any), per
/// Gateway API: each route hostname that overlaps the listener's contributes the more
/// specific of the two.
pub fn hostname_intersection(listener: Option<&str>, route: &[String]) -> HostnameIntersection {
    match (listener, route.is_empty()) {
        (None, true) => HostnameIntersection::Any,
        (Some(l), true) => HostnameIntersection::Hostnames(vec![l.to_owned()]),
        (None, false) => {
            let mut out: Vec<String> = Vec::new();
            for h in route {
                if !out.contains(h) {
                    out.push(h.clone());
                }
            }
            HostnameIntersection::Hostnames(out)
        }
        (Some(l), false) => {
            let mut out: Vec<String> = Vec::new();
            for h in route {
                let pick = if within(h, l) {
                    h.as_str()
                } else if within(l, h) {
                    l
                } else {
                    continue;
                };
                if !out.iter().any(|o| o == pick) {
                    out.push(pick.to_owned());
                }
            }
            if out.is_empty() {
                HostnameIntersection::Disjoint
            } else {
                HostnameIntersection::Hostnames(out)
            }
        }
    }
}

/// A borrowed route of any kind.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RouteRef<'a> {
    /// HTTPRoute.
    Http(&'a HttpRoute),
    /// GRPCRoute.
    Grpc(&'a GrpcRoute),
    /// TCPRoute.
    Tcp(&'a TcpRoute),
    /// TLSRoute.
    Tls(&'a TlsRoute),
}

impl<'a> RouteRef<'a> {
    /// The route view of a resource, if it is a route.
    pub fn from_resource(r: &'a Resource) -> Option<Self> {
        match r {
            Resource::HttpRoute(r) => Some(RouteRef::Http(r)),
            Resource::GrpcRoute(r) => Some(RouteRef::Grpc(r)),
            Resource::TcpRoute(r) => Some(RouteRef::Tcp(r)),
            Resource::TlsRoute(r) => Some(RouteRef::Tls(r)),
            _ => None,
        }
    }
    /// Kind.
    pub fn kind(&self) -> ResourceKind {
        match self {
            RouteRef::Http(_) => ResourceKind::HttpRoute,
            RouteRef::Grpc(_) => ResourceKind::GrpcRoute,
            RouteRef::Tcp(_) => ResourceKind::TcpRoute,
            RouteRef::Tls(_) => ResourceKind::TlsRoute,
        }
    }
    /// Metadata.
    pub fn metadata(&self) -> &'a ObjectMeta {
        match self {
            RouteRef::Http(r) => &r.metadata,
            RouteRef::Grpc(r) => &r.metadata,
            RouteRef::Tcp(r) => &r.metadata,
            RouteRef::Tls(r) => &r.metadata,
        }
    }
    /// Key.
    pub fn key(&self) -> ResourceKey {
        let m = self.metadata();
        ResourceKey::new(self.kind(), m.namespace(), m.name.clone())
    }
    /// `spec.parentRefs`.
    pub fn parent_refs(&self) -> &'a [ParentReference] {
        match self {
            RouteRef::Http(r) => &r.spec.parent_refs,
            RouteRef::Grpc(r) => &r.spec.parent_refs,
            RouteRef::Tcp(r) => &r.spec.parent_refs,
            RouteRef::Tls(r) => &r.spec.parent_refs,
        }
    }
    /// `spec.hostnames` (empty for TCPRoute).
    pub fn hostnames(&self) -> &'a [String] {
        match self {
            RouteRef::Http(r) => &r.spec.hostnames,
            RouteRef::Grpc(r) => &r.spec.hostnames,
            RouteRef::Tcp(_) => &[],
            RouteRef::Tls(r) => &r.spec.hostnames,
        }
    }
    /// Every rule's backendRefs, as (rule index, backendRef index, ref).
    pub fn backend_refs(&self) -> Vec<(usize, usize, &'a BackendRef)> {
        let rules: Vec<&'a [BackendRef]> = match self {
            RouteRef::Http(r) => r
                .spec
                .rules
                .iter()
                .map(|x| x.backend_refs.as_slice())
                .collect(),
            RouteRef::Grpc(r) => r
                .spec
                .rules
                .iter()
                .map(|x| x.backend_refs.as_slice())
                .collect(),
            RouteRef::Tcp(r) => r
                .spec
                .rules
                .iter()
                .map(|x| x.backend_refs.as_slice())
                .collect(),
            RouteRef::Tls(r) => r
                .spec
                .rules
                .iter()
                .map(|x| x.backend_refs.as_slice())
                .collect(),
        };
        rules
            .into_iter()
            .enumerate()
            .flat_map(|(ri, refs)| refs.iter().enumerate().map(move |(bi, b)| (ri, bi, b)))
            .collect()
    }
}

/// Whether a listener protocol can carry a route kind.
pub fn protocol_accepts(protocol: ProtocolType, route: ResourceKind) -> bool {
    matches!(
        (protocol, route),
        (
            ProtocolType::Http | ProtocolType::Https,
            ResourceKind::HttpRoute | ResourceKind::GrpcRoute
        ) | (ProtocolType::Tls, ResourceKind::TlsRoute)
            | (ProtocolType::Tcp, ResourceKind::TcpRoute)
    )
}

/// Whether a listener admits a route of this kind from this namespace (protocol, allowed
/// kinds and allowed namespaces).
pub fn listener_allows(
    gateway: &Gateway,
    listener: &Listener,
    route: ResourceKind,
    route_ns: &str,
) -> bool {
    if !protocol_accepts(listener.protocol, route) {
        return false;
    }
    let Some(allowed) = &listener.allowed_routes else {
        return route_ns == gateway.metadata.namespace();
    };
    if !allowed.kinds.is_empty()
        && !allowed.kinds.iter().any(|k| {
            k.group.as_deref().unwrap_or(GATEWAY_GROUP) == GATEWAY_GROUP && k.kind == route.as_str()
        })
    {
        return false;
    }
    match allowed
        .namespaces
        .as_ref()
        .and_then(|n| n.from)
        .unwrap_or(FromNamespaces::Same)
    {
        FromNamespaces::All => true,
        FromNamespaces::Same => route_ns == gateway.metadata.namespace(),
        FromNamespaces::Selector => false,
    }
}

/// Why a reference does not resolve or a route does not attach. [`RefReason::condition`]
/// gives the Gateway API status condition it maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefReason {
    /// backendRef names a Backend that does not exist.
    BackendNotFound,
    /// backendRef names a kind other than `biplane.dev` `Backend` (e.g. core `Service`).
    UnsupportedBackendKind,
    /// certificateRef names a Secret that does not exist.
    SecretNotFound,
    /// certificateRef names a kind other than core `Secret`.
    UnsupportedCertificateKind,
    /// parentRef names a kind other than `Gateway`.
    UnsupportedParentKind,
    /// parentRef names a Gateway that does not exist.
    GatewayNotFound,
    /// parentRef's sectionName/port select no listener.
    NoMatchingParent,
    /// The selected listeners do not admit the route (protocol, kinds or namespaces).
    NotAllowedByListeners,
    /// No route hostname intersects the selected listeners' hostnames.
    NoMatchingListenerHostname,
}

impl RefReason {
    /// `(condition type, reason)` as Gateway API status reports it.
    pub fn condition(self) -> (&'static str, &'static str) {
        match self {
            RefReason::BackendNotFound => ("ResolvedRefs", "BackendNotFound"),
            RefReason::UnsupportedBackendKind => ("ResolvedRefs", "InvalidKind"),
            RefReason::SecretNotFound | RefReason::UnsupportedCertificateKind => {
                ("ResolvedRefs", "InvalidCertificateRef")
            }
            RefReason::UnsupportedParentKind
            | RefReason::GatewayNotFound
            | RefReason::NoMatchingParent => ("Accepted", "NoMatchingParent"),
            RefReason::NotAllowedByListeners => ("Accepted", "NotAllowedByListeners"),
            RefReason::NoMatchingListenerHostname => ("Accepted", "NoMatchingListenerHostname"),
        }
    }
}

/// One reference that does not resolve (or a parentRef that attaches nowhere).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefProblem {
    /// The referring resource (a route, or a Gateway for certificateRefs).
    pub resource: ResourceKey,
    /// Field path of the reference, e.g. `spec.rules[0].backendRefs[1]`.
    pub path: String,
    /// Rule index for backendRefs.
    pub rule: Option<usize>,
    /// backendRef index within the rule.
    pub backend_ref: Option<usize>,
    /// parentRef index for attachment problems.
    pub parent_ref: Option<usize>,
    /// Listener index for certificateRefs.
    pub listener: Option<usize>,
    /// Why.
    pub reason: RefReason,
    /// Human-readable detail.
    pub message: String,
}

impl std::fmt::Display for RefProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}: {}", self.resource, self.path, self.message)
    }
}

/// A route attached to one listener.
#[derive(Debug, Clone, PartialEq)]
pub struct Attachment<'a> {
    /// The route.
    pub route: RouteRef<'a>,
    /// Position of the route in the set (document order; Gateway API's "oldest first"
    /// tie-break for a static file).
    pub order: usize,
    /// Which parentRef attached it.
    pub parent_ref: usize,
    /// Hosts the route serves on this listener.
    pub hostnames: HostnameIntersection,
}

/// Where one parentRef attaches: the Gateway, and the indices of its listeners that admit
/// the route with the hostnames served on each.
#[derive(Debug, Clone, PartialEq)]
pub struct ParentAttachment<'a> {
    /// The Gateway named by the parentRef.
    pub gateway: &'a Gateway,
    /// (listener index, hostnames) for each listener the route attaches to.
    pub listeners: Vec<(usize, HostnameIntersection)>,
}

/// Validated resources with lookups.
#[derive(Debug, Clone, Default)]
pub struct ResourceSet {
    resources: Vec<Resource>,
    index: BTreeMap<ResourceKey, usize>,
}

impl ResourceSet {
    /// Indexes the resources (the first of duplicate keys wins; [`crate::parse_documents`]
    /// rejects duplicates).
    pub fn new(resources: Vec<Resource>) -> Self {
        let mut index = BTreeMap::new();
        for (i, r) in resources.iter().enumerate() {
            index.entry(r.key()).or_insert(i);
        }
        Self { resources, index }
    }

    /// All resources in input order.
    pub fn resources(&self) -> &[Resource] {
        &self.resources
    }

    /// Consumes the set.
    pub fn into_resources(self) -> Vec<Resource> {
        self.resources
    }

    /// A resource by key.
    pub fn get(&self, key: &ResourceKey) -> Option<&Resource> {
        self.index.get(key).and_then(|&i| self.resources.get(i))
    }

    fn get_kind(&self, kind: ResourceKind, namespace: &str, name: &str) -> Option<&Resource> {
        self.get(&ResourceKey::new(kind, namespace, name))
    }

    /// Gateways in input order.
    pub fn gateways(&self) -> impl Iterator<Item = &Gateway> {
        self.resources.iter().filter_map(|r| match r {
            Resource::Gateway(g) => Some(g),
            _ => None,
        })
    }

    /// A Gateway by namespace and name.
    pub fn gateway(&self, namespace: &str, name: &str) -> Option<&Gateway> {
        match self.get_kind(ResourceKind::Gateway, namespace, name) {
            Some(Resource::Gateway(g)) => Some(g),
            _ => None,
        }
    }

    /// Gateways with this name in any namespace (a node joins with `--gateway NAME`).
    pub fn gateways_named<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'s Gateway> + 's {
        self.gateways().filter(move |g| g.metadata.name == name)
    }

    /// A Backend by namespace and name.
    pub fn backend(&self, namespace: &str, name: &str) -> Option<&Backend> {
        match self.get_kind(ResourceKind::Backend, namespace, name) {
            Some(Resource::Backend(b)) => Some(b),
            _ => None,
        }
    }

    /// Backends in input order.
    pub fn backends(&self) -> impl Iterator<Item = &Backend> {
        self.resources.iter().filter_map(|r| match r {
            Resource::Backend(b) => Some(b),
            _ => None,
        })
    }

    /// A TLS Secret by namespace and name.
    pub fn secret(&self, namespace: &str, name: &str) -> Option<&TlsSecret> {
        match self.get_kind(ResourceKind::Secret, namespace, name) {
            Some(Resource::Secret(s)) => Some(s),
            _ => None,
        }
    }

    /// Every route (any kind) in input order, with its position.
    pub fn routes(&self) -> impl Iterator<Item = (usize, RouteRef<'_>)> {
        self.resources
            .iter()
            .enumerate()
            .filter_map(|(i, r)| RouteRef::from_resource(r).map(|rr| (i, rr)))
    }

    /// Resolves a backendRef of a route in `route_namespace`.
    pub fn resolve_backend(
        &self,
        route_namespace: &str,
        r: &BackendRef,
    ) -> Result<&Backend, RefReason> {
        if !r.is_biplane_backend() {
            return Err(RefReason::UnsupportedBackendKind);
        }
        self.backend(r.namespace(route_namespace), &r.name)
            .ok_or(RefReason::BackendNotFound)
    }

    /// Where one parentRef of a route attaches: listener indices of the named Gateway with
    /// the hostnames served there, or why it attaches nowhere.
    pub fn attach_parent_ref(
        &self,
        route: RouteRef<'_>,
        parent: &ParentReference,
    ) -> Result<ParentAttachment<'_>, (RefReason, String)> {
        if parent.group() != GATEWAY_GROUP || parent.kind() != "Gateway" {
            return Err((
                RefReason::UnsupportedParentKind,
                format!(
                    "parent kind {}/{} is not supported (only Gateway)",
                    parent.group(),
                    parent.kind()
                ),
            ));
        }
        let route_ns = route.metadata().namespace();
        let gw_ns = parent.namespace(route_ns);
        let Some(gw) = self.gateway(gw_ns, &parent.name) else {
            return Err((
                RefReason::GatewayNotFound,
                format!("Gateway {gw_ns}/{} not found", parent.name),
            ));
        };
        let selected: Vec<(usize, &Listener)> = gw
            .spec
            .listeners
            .iter()
            .enumerate()
            .filter(|(_, l)| parent.section_name.as_deref().is_none_or(|s| s == l.name))
            .filter(|(_, l)| parent.port.is_none_or(|p| p == l.port))
            .collect();
        if selected.is_empty() {
            let what = match (&parent.section_name, parent.port) {
                (Some(s), Some(p)) => format!("no listener named {s:?} on port {p}"),
                (Some(s), None) => format!("no listener named {s:?}"),
                (None, Some(p)) => format!("no listener on port {p}"),
                (None, None) => "Gateway has no listeners".to_owned(),
            };
            return Err((
                RefReason::NoMatchingParent,
                format!("Gateway {gw_ns}/{}: {what}", parent.name),
            ));
        }
        let allowed: Vec<(usize, &Listener)> = selected
            .into_iter()
            .filter(|(_, l)| listener_allows(gw, l, route.kind(), route_ns))
            .collect();
        if allowed.is_empty() {
            return Err((
                RefReason::NotAllowedByListeners,
                format!(
                    "no selected listener of Gateway {gw_ns}/{} admits a {} from namespace {route_ns}",
                    parent.name,
                    route.kind()
                ),
            ));
        }
        let mut out = Vec::new();
        for (i, l) in allowed {
            let hosts = if route.kind() == ResourceKind::TcpRoute {
                HostnameIntersection::Any
            } else {
                hostname_intersection(l.hostname.as_deref(), route.hostnames())
            };
            if hosts != HostnameIntersection::Disjoint {
                out.push((i, hosts));
            }
        }
        if out.is_empty() {
            return Err((
                RefReason::NoMatchingListenerHostname,
                format!(
                    "no route hostname intersects the listeners of Gateway {gw_ns}/{}",
                    parent.name
                ),
            ));
        }
        Ok(ParentAttachment {
            gateway: gw,
            listeners: out,
        })
    }

    /// Routes attached to listener `listener` (by name) of `gateway`, in input order, one
    /// entry per route (the first parentRef that attaches wins).
    pub fn attached_routes(&self, gateway: &Gateway, listener: &str) -> Vec<Attachment<'_>> {
        let Some(li) = gateway
            .spec
            .listeners
            .iter()
            .position(|l| l.name == listener)
        else {
            return Vec::new();
        };
        let gw_key = (gateway.metadata.namespace(), gateway.metadata.name.as_str());
        let mut out = Vec::new();
        for (order, route) in self.routes() {
            for (pi, parent) in route.parent_refs().iter().enumerate() {
                let Ok(ParentAttachment {
                    gateway: gw,
                    listeners: hits,
                }) = self.attach_parent_ref(route, parent)
                else {
                    continue;
                };
                if (gw.metadata.namespace(), gw.metadata.name.as_str()) != gw_key {
                    continue;
                }
                if let Some((_, hostnames)) = hits.into_iter().find(|(i, _)| *i == li) {
                    out.push(Attachment {
                        route,
                        order,
                        parent_ref: pi,
                        hostnames,
                    });
                    break;
                }
            }
        }
        out
    }

    /// Every reference that does not resolve: route parentRefs that attach nowhere, route
    /// backendRefs that name no Backend (or an unsupported kind), and Gateway
    /// certificateRefs that name no Secret. Not configuration errors: routes stay accepted
    /// and the affected requests get 500.
    pub fn resolve_refs(&self) -> Vec<RefProblem> {
        let mut out = Vec::new();
        for r in &self.resources {
            if let Resource::Gateway(gw) = r {
                self.gateway_ref_problems(gw, &mut out);
            }
            let Some(route) = RouteRef::from_resource(r) else {
                continue;
            };
            let key = route.key();
            for (pi, parent) in route.parent_refs().iter().enumerate() {
                if let Err((reason, message)) = self.attach_parent_ref(route, parent) {
                    out.push(RefProblem {
                        resource: key.clone(),
                        path: format!("spec.parentRefs[{pi}]"),
                        rule: None,
                        backend_ref: None,
                        parent_ref: Some(pi),
                        listener: None,
                        reason,
                        message,
                    });
                }
            }
            let ns = route.metadata().namespace();
            for (ri, bi, b) in route.backend_refs() {
                let Err(reason) = self.resolve_backend(ns, b) else {
                    continue;
                };
                let message = match reason {
                    RefReason::UnsupportedBackendKind => format!(
                        "unsupported kind {}/{} (only {BIPLANE_GROUP}/Backend is supported)",
                        if b.group().is_empty() {
                            "core"
                        } else {
                            b.group()
                        },
                        b.kind()
                    ),
                    _ => format!("Backend {}/{} not found", b.namespace(ns), b.name),
                };
                out.push(RefProblem {
                    resource: key.clone(),
                    path: format!("spec.rules[{ri}].backendRefs[{bi}]"),
                    rule: Some(ri),
                    backend_ref: Some(bi),
                    parent_ref: None,
                    listener: None,
                    reason,
                    message,
                });
            }
        }
        out
    }

    fn gateway_ref_problems(&self, gw: &Gateway, out: &mut Vec<RefProblem>) {
        let ns = gw.metadata.namespace();
        for (li, l) in gw.spec.listeners.iter().enumerate() {
            let Some(tls) = &l.tls else { continue };
            if tls.mode() != TlsModeType::Terminate {
                continue;
            }
            for (ci, c) in tls.certificate_refs.iter().enumerate() {
                let problem = if c.group() != "" || c.kind() != "Secret" {
                    Some((
                        RefReason::UnsupportedCertificateKind,
                        format!(
                            "unsupported certificate kind {}/{} (only core Secret)",
                            c.group(),
                            c.kind()
                        ),
                    ))
                } else if self.secret(c.namespace(ns), &c.name).is_none() {
                    Some((
                        RefReason::SecretNotFound,
                        format!("Secret {}/{} not found", c.namespace(ns), c.name),
                    ))
                } else {
                    None
                };
                if let Some((reason, message)) = problem {
                    out.push(RefProblem {
                        resource: ResourceKey::new(
                            ResourceKind::Gateway,
                            ns,
                            gw.metadata.name.clone(),
                        ),
                        path: format!("spec.listeners[{li}].tls.certificateRefs[{ci}]"),
                        rule: None,
                        backend_ref: None,
                        parent_ref: None,
                        listener: Some(li),
                        reason,
                        message,
                    });
                }
            }
        }
    }
}
