//! Biplane's resource model: Gateway API kinds and `biplane.dev` kinds, parsed from YAML or
//! JSON and validated with a field path for every problem.
//!
//! **Status: types stable.** The kind structs below, [`Resource`], [`ResourceKey`],
//! [`ResourceSet`], [`RefProblem`], [`ValidationError`]/[`ValidationErrors`] and
//! [`GatewayDuration`] are the shapes other crates code against; they change only
//! additively.
//!
//! Public API:
//! - [`parse_documents`]: YAML (multi-document) or JSON text to validated [`Resource`]s, or
//!   [`ValidationErrors`] listing every problem (document, kind/name, field path, message);
//! - [`ResourceSet`]: lookups (gateways, backends, secrets, routes attached to a listener via
//!   [`ResourceSet::attached_routes`]) and [`ResourceSet::resolve_refs`], which lists the
//!   references that do not resolve as [`RefProblem`]s (not errors: Gateway API accepts such
//!   routes and answers 500); [`hostname_intersection`] implements listener/route host
//!   intersection;
//! - kinds: [`Gateway`], [`HttpRoute`], [`GrpcRoute`], [`TcpRoute`], [`TlsRoute`],
//!   [`TlsSecret`] (alias [`Secret`]), [`Backend`], and [`Resource`] over all of them
//!   (`kind()`, `name()`, `namespace()`, `api_version()`, `key()` = `Kind/namespace/name`);
//! - durations: [`GatewayDuration`], [`parse_duration`].
//!
//! Optional fields mirror what the user wrote (`Option`, empty `Vec`); accessor methods
//! return Gateway API defaults (`BackendRef::weight()` = 1, `HttpPathMatch::match_type()` =
//! `PathPrefix`, `BackendSpec::connect_timeout()` = 5s, ...).
//!
//! Documents are numbered 0-based in [`ValidationError::document`] (among non-empty
//! documents, JSON array elements or `List` items) and printed 1-based by `Display`:
//! `document 3 (HTTPRoute default/web): spec.rules[2].backendRefs[0].weight: must be between
//! 0 and 1000000`. Schema problems (unknown fields, wrong types, missing fields, unsupported
//! values) are collected by a recovering deserializer (`de.rs`), so one document reports all
//! of them; semantic checks (`validate.rs`) then add theirs.

mod backend;
mod de;
mod duration;
mod error;
mod gateway;
mod meta;
mod parse;
mod resource;
mod route;
mod secret;
mod set;
mod validate;

pub use backend::{
    AppProtocol, Backend, BackendSpec, DEFAULT_CONNECT_TIMEOUT, Endpoint, HashKey, HashOn,
    LoadBalancer, LoadBalancerType,
};
pub use duration::{DurationError, GatewayDuration, parse_duration};
pub use error::{ValidationError, ValidationErrors};
pub use gateway::{
    AllowedRoutes, FromNamespaces, Gateway, GatewayAddress, GatewaySpec, GatewayTlsConfig,
    LabelSelector, LabelSelectorRequirement, Listener, ProtocolType, RouteGroupKind,
    RouteNamespaces, SecretObjectReference, TlsModeType,
};
pub use meta::{
    BIPLANE_GROUP, DEFAULT_NAMESPACE, GATEWAY_GROUP, ObjectMeta, ResourceKey, ResourceKind,
};
pub use parse::parse_documents;
pub use resource::Resource;
pub use route::{
    BackendRef, GrpcMethodMatch, GrpcRoute, GrpcRouteFilter, GrpcRouteFilterType, GrpcRouteMatch,
    GrpcRouteRule, GrpcRouteSpec, HeaderMatch, HeaderMatchType, HeaderModifier, HttpHeader,
    HttpMethod, HttpPathMatch, HttpPathModifier, HttpRoute, HttpRouteFilter, HttpRouteFilterType,
    HttpRouteMatch, HttpRouteRule, HttpRouteSpec, HttpRouteTimeouts, L4RouteRule, ParentReference,
    PathMatchType, PathModifierType, RequestRedirect, TcpRoute, TcpRouteSpec, TlsRoute,
    TlsRouteSpec, UrlRewrite,
};
pub use secret::{PrivateKeyPem, Secret, TLS_SECRET_TYPE, TlsSecret};
pub use set::{
    Attachment, HostnameIntersection, ParentAttachment, RefProblem, RefReason, ResourceSet,
    RouteRef, hostname_intersection, listener_allows, protocol_accepts,
};
pub use validate::MAX_WEIGHT;
