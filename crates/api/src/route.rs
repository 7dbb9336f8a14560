//! Route kinds: `HTTPRoute`, `GRPCRoute` (v1) and `TCPRoute`, `TLSRoute` (v1alpha2), with
//! their shared parent and backend references.
//!
//! Optional fields mirror what the user wrote; accessor methods give the Gateway API
//! defaults (e.g. [`HttpPathMatch::match_type`] is `PathPrefix` when absent).

use serde::{Deserialize, Serialize};

use crate::duration::GatewayDuration;
use crate::meta::{BIPLANE_GROUP, GATEWAY_GROUP, ObjectMeta};

/// `spec.parentRefs[]`: the Gateway (and optionally listener) a route attaches to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ParentReference {
    /// Group; default `gateway.networking.k8s.io`.
    pub group: Option<String>,
    /// Kind; default `Gateway`.
    pub kind: Option<String>,
    /// Namespace; default: the route's.
    pub namespace: Option<String>,
    /// Gateway name.
    pub name: String,
    /// Listener name; none = every listener of a compatible protocol.
    pub section_name: Option<String>,
    /// Listener port; none = any.
    pub port: Option<u16>,
}

impl ParentReference {
    /// Effective group.
    pub fn group(&self) -> &str {
        self.group.as_deref().unwrap_or(GATEWAY_GROUP)
    }
    /// Effective kind.
    pub fn kind(&self) -> &str {
        self.kind.as_deref().unwrap_or("Gateway")
    }
    /// Effective namespace given the route's namespace.
    pub fn namespace<'a>(&'a self, route_namespace: &'a str) -> &'a str {
        self.namespace.as_deref().unwrap_or(route_namespace)
    }
}

/// `backendRefs[]` of any route kind: a weighted reference to a `biplane.dev` `Backend`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendRef {
    /// Group; Biplane resolves `biplane.dev`. Gateway API's default is core (`""`).
    pub group: Option<String>,
    /// Kind; Biplane resolves `Backend`. Gateway API's default is `Service`.
    pub kind: Option<String>,
    /// Name.
    pub name: String,
    /// Namespace; default: the route's.
    pub namespace: Option<String>,
    /// Port; overrides nothing for a `Backend` (endpoints carry ports), kept for fidelity.
    pub port: Option<u16>,
    /// Weight 0..=1000000; default 1. See [`BackendRef::weight`].
    pub weight: Option<u32>,
    /// Per-backend filters are not supported: validation rejects a non-empty list.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<serde_json::Value>,
}

impl BackendRef {
    /// Effective group (`""` per Gateway API when absent).
    pub fn group(&self) -> &str {
        self.group.as_deref().unwrap_or("")
    }
    /// Effective kind (`Service` per Gateway API when absent).
    pub fn kind(&self) -> &str {
        self.kind.as_deref().unwrap_or("Service")
    }
    /// Whether the reference names a `biplane.dev` `Backend` (the only kind Biplane resolves).
    pub fn is_biplane_backend(&self) -> bool {
        self.group() == BIPLANE_GROUP && self.kind() == "Backend"
    }
    /// Effective namespace given the route's namespace.
    pub fn namespace<'a>(&'a self, route_namespace: &'a str) -> &'a str {
        self.namespace.as_deref().unwrap_or(route_namespace)
    }
    /// Effective weight (default 1).
    pub fn weight(&self) -> u32 {
        self.weight.unwrap_or(1)
    }
}

// ---------------------------------------------------------------- HTTPRoute

/// `gateway.networking.k8s.io/v1` `HTTPRoute`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRoute {
    /// Metadata.
    pub metadata: ObjectMeta,
    /// Spec.
    pub spec: HttpRouteSpec,
}

/// `HTTPRoute.spec`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteSpec {
    /// Gateways (and listeners) this route attaches to.
    pub parent_refs: Vec<ParentReference>,
    /// Hostnames; empty = the listener's hostname(s).
    pub hostnames: Vec<String>,
    /// Rules; see [`HttpRouteSpec::effective_rules`] for the default when empty.
    pub rules: Vec<HttpRouteRule>,
}

impl HttpRouteSpec {
    /// The rules with Gateway API's default applied: no rules = one rule matching
    /// `PathPrefix /` with no backends (so requests get 500).
    pub fn effective_rules(&self) -> Vec<HttpRouteRule> {
        if self.rules.is_empty() {
            vec![HttpRouteRule::default()]
        } else {
            self.rules.clone()
        }
    }
}

/// `spec.rules[]`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteRule {
    /// Optional rule name (used in stats and access logs).
    pub name: Option<String>,
    /// Matches (ORed); empty = one `PathPrefix /` match. See [`HttpRouteRule::effective_matches`].
    pub matches: Vec<HttpRouteMatch>,
    /// Filters, applied in order.
    pub filters: Vec<HttpRouteFilter>,
    /// Weighted backends; none (or all weight 0) = 500 (or the redirect filter answers).
    pub backend_refs: Vec<BackendRef>,
    /// Timeouts.
    pub timeouts: Option<HttpRouteTimeouts>,
}

impl HttpRouteRule {
    /// The matches with Gateway API's default applied: no matches = `PathPrefix /`.
    pub fn effective_matches(&self) -> Vec<HttpRouteMatch> {
        if self.matches.is_empty() {
            vec![HttpRouteMatch::default()]
        } else {
            self.matches.clone()
        }
    }
}

/// `rules[].timeouts`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteTimeouts {
    /// Whole request, from the downstream request start to the end of the response.
    pub request: Option<GatewayDuration>,
    /// One upstream attempt; must not exceed `request`.
    pub backend_request: Option<GatewayDuration>,
}

/// `rules[].matches[]`: every present condition must hold.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteMatch {
    /// Path; absent = `PathPrefix /`.
    pub path: Option<HttpPathMatch>,
    /// Header matches (ANDed).
    pub headers: Vec<HeaderMatch>,
    /// Query parameter matches (ANDed).
    pub query_params: Vec<HeaderMatch>,
    /// Method.
    pub method: Option<HttpMethod>,
}

impl HttpRouteMatch {
    /// The effective path match (`PathPrefix /` when absent).
    pub fn path_match(&self) -> HttpPathMatch {
        self.path.clone().unwrap_or_default()
    }
}

/// `matches[].path`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpPathMatch {
    /// Match type; default `PathPrefix`.
    #[serde(rename = "type")]
    pub match_type: Option<PathMatchType>,
    /// Value; default `/`.
    pub value: Option<String>,
}

impl HttpPathMatch {
    /// Effective type.
    pub fn match_type(&self) -> PathMatchType {
        self.match_type.unwrap_or(PathMatchType::PathPrefix)
    }
    /// Effective value.
    pub fn value(&self) -> &str {
        self.value.as_deref().unwrap_or("/")
    }
}

/// Path match type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PathMatchType {
    /// Whole path equals the value.
    Exact,
    /// Element-wise prefix (`/foo` matches `/foo` and `/foo/bar`, not `/foobar`).
    PathPrefix,
    /// Regular expression (Rust `regex` syntax) matched against the whole path.
    RegularExpression,
}

/// A header (or query parameter) match; also GRPCRoute's header match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderMatch {
    /// Match type; default `Exact`.
    #[serde(rename = "type")]
    pub match_type: Option<HeaderMatchType>,
    /// Header name (case-insensitive) or query parameter name (case-sensitive).
    pub name: String,
    /// Value or regular expression.
    pub value: String,
}

impl HeaderMatch {
    /// Effective type.
    pub fn match_type(&self) -> HeaderMatchType {
        self.match_type.unwrap_or(HeaderMatchType::Exact)
    }
}

/// Header / query parameter match type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum HeaderMatchType {
    /// Equal.
    Exact,
    /// Regular expression matched against the whole value.
    RegularExpression,
}

/// HTTP method for `matches[].method`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[allow(
    clippy::upper_case_acronyms,
    reason = "spelled as in Gateway API and HTTP"
)]
pub enum HttpMethod {
    /// GET
    GET,
    /// HEAD
    HEAD,
    /// POST
    POST,
    /// PUT
    PUT,
    /// DELETE
    DELETE,
    /// CONNECT
    CONNECT,
    /// OPTIONS
    OPTIONS,
    /// TRACE
    TRACE,
    /// PATCH
    PATCH,
}

impl HttpMethod {
    /// The method token.
    pub fn as_str(self) -> &'static str {
        match self {
            HttpMethod::GET => "GET",
            HttpMethod::HEAD => "HEAD",
            HttpMethod::POST => "POST",
            HttpMethod::PUT => "PUT",
            HttpMethod::DELETE => "DELETE",
            HttpMethod::CONNECT => "CONNECT",
            HttpMethod::OPTIONS => "OPTIONS",
            HttpMethod::TRACE => "TRACE",
            HttpMethod::PATCH => "PATCH",
        }
    }
}

/// `rules[].filters[]`: `type` names which one of the other fields is set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteFilter {
    /// Which filter.
    #[serde(rename = "type")]
    pub filter_type: HttpRouteFilterType,
    /// For `RequestHeaderModifier`.
    pub request_header_modifier: Option<HeaderModifier>,
    /// For `ResponseHeaderModifier`.
    pub response_header_modifier: Option<HeaderModifier>,
    /// For `RequestRedirect`.
    pub request_redirect: Option<RequestRedirect>,
    /// For `URLRewrite`.
    pub url_rewrite: Option<UrlRewrite>,
}

/// HTTPRoute filter types Biplane supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum HttpRouteFilterType {
    /// Edit request headers.
    RequestHeaderModifier,
    /// Edit response headers.
    ResponseHeaderModifier,
    /// Answer with a redirect.
    RequestRedirect,
    /// Rewrite host and/or path before forwarding.
    #[serde(rename = "URLRewrite")]
    UrlRewrite,
}

impl HttpRouteFilterType {
    /// The spelling used in documents.
    pub fn as_str(self) -> &'static str {
        match self {
            HttpRouteFilterType::RequestHeaderModifier => "RequestHeaderModifier",
            HttpRouteFilterType::ResponseHeaderModifier => "ResponseHeaderModifier",
            HttpRouteFilterType::RequestRedirect => "RequestRedirect",
            HttpRouteFilterType::UrlRewrite => "URLRewrite",
        }
    }
}

/// `requestHeaderModifier` / `responseHeaderModifier`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderModifier {
    /// Overwrite (or add) these headers.
    pub set: Vec<HttpHeader>,
    /// Append these headers.
    pub add: Vec<HttpHeader>,
    /// Remove these header names.
    pub remove: Vec<String>,
}

/// A header name and value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpHeader {
    /// Name.
    pub name: String,
    /// Value.
    pub value: String,
}

/// `requestRedirect`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestRedirect {
    /// `http` or `https`; default: the request's.
    pub scheme: Option<String>,
    /// Host; default: the request's.
    pub hostname: Option<String>,
    /// Path rewrite; default: the request's path.
    pub path: Option<HttpPathModifier>,
    /// Port; default per Gateway API (derived from scheme / listener).
    pub port: Option<u16>,
    /// 301, 302 (default), 303, 307 or 308.
    pub status_code: Option<u16>,
}

impl RequestRedirect {
    /// Effective status code (302 when absent).
    pub fn status_code(&self) -> u16 {
        self.status_code.unwrap_or(302)
    }
}

/// `urlRewrite`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UrlRewrite {
    /// Replace the Host header.
    pub hostname: Option<String>,
    /// Rewrite the path.
    pub path: Option<HttpPathModifier>,
}

/// Path modifier for redirects and rewrites.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpPathModifier {
    /// Which of the two fields is used.
    #[serde(rename = "type")]
    pub modifier_type: PathModifierType,
    /// With `ReplaceFullPath`.
    pub replace_full_path: Option<String>,
    /// With `ReplacePrefixMatch` (the rule's `PathPrefix` match is replaced).
    pub replace_prefix_match: Option<String>,
}

/// Path modifier type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PathModifierType {
    /// Replace the whole path.
    ReplaceFullPath,
    /// Replace the matched prefix.
    ReplacePrefixMatch,
}

// ---------------------------------------------------------------- GRPCRoute

/// `gateway.networking.k8s.io/v1` `GRPCRoute`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcRoute {
    /// Metadata.
    pub metadata: ObjectMeta,
    /// Spec.
    pub spec: GrpcRouteSpec,
}

/// `GRPCRoute.spec`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcRouteSpec {
    /// Parents.
    pub parent_refs: Vec<ParentReference>,
    /// Hostnames.
    pub hostnames: Vec<String>,
    /// Rules.
    pub rules: Vec<GrpcRouteRule>,
}

/// `GRPCRoute.spec.rules[]`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcRouteRule {
    /// Optional rule name.
    pub name: Option<String>,
    /// Matches (ORed); empty = every gRPC request.
    pub matches: Vec<GrpcRouteMatch>,
    /// Filters.
    pub filters: Vec<GrpcRouteFilter>,
    /// Weighted backends (speak h2c: give the Backend `appProtocol: h2c`).
    pub backend_refs: Vec<BackendRef>,
}

/// `GRPCRoute` match.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcRouteMatch {
    /// Service/method match.
    pub method: Option<GrpcMethodMatch>,
    /// Header matches.
    pub headers: Vec<HeaderMatch>,
}

/// `matches[].method`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcMethodMatch {
    /// Default `Exact`.
    #[serde(rename = "type")]
    pub match_type: Option<HeaderMatchType>,
    /// Fully qualified service (`pkg.Service`); absent = any.
    pub service: Option<String>,
    /// Method; absent = any.
    pub method: Option<String>,
}

impl GrpcMethodMatch {
    /// Effective type.
    pub fn match_type(&self) -> HeaderMatchType {
        self.match_type.unwrap_or(HeaderMatchType::Exact)
    }
}

/// `GRPCRoute` filter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcRouteFilter {
    /// Which filter.
    #[serde(rename = "type")]
    pub filter_type: GrpcRouteFilterType,
    /// For `RequestHeaderModifier`.
    pub request_header_modifier: Option<HeaderModifier>,
    /// For `ResponseHeaderModifier`.
    pub response_header_modifier: Option<HeaderModifier>,
}

/// GRPCRoute filter types Biplane supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum GrpcRouteFilterType {
    /// Edit request headers (metadata).
    RequestHeaderModifier,
    /// Edit response headers.
    ResponseHeaderModifier,
}

// ---------------------------------------------------------------- TCPRoute / TLSRoute

/// `gateway.networking.k8s.io/v1alpha2` `TCPRoute`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpRoute {
    /// Metadata.
    pub metadata: ObjectMeta,
    /// Spec.
    pub spec: TcpRouteSpec,
}

/// `TCPRoute.spec`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpRouteSpec {
    /// Parents.
    pub parent_refs: Vec<ParentReference>,
    /// Rules (Gateway API allows one; Biplane uses the first and rejects more).
    pub rules: Vec<L4RouteRule>,
}

/// `gateway.networking.k8s.io/v1alpha2` `TLSRoute` (SNI passthrough).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsRoute {
    /// Metadata.
    pub metadata: ObjectMeta,
    /// Spec.
    pub spec: TlsRouteSpec,
}

/// `TLSRoute.spec`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsRouteSpec {
    /// Parents.
    pub parent_refs: Vec<ParentReference>,
    /// SNI hostnames.
    pub hostnames: Vec<String>,
    /// Rules (one).
    pub rules: Vec<L4RouteRule>,
}

/// A TCPRoute / TLSRoute rule.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct L4RouteRule {
    /// Optional rule name.
    pub name: Option<String>,
    /// Weighted backends (connection-level split).
    pub backend_refs: Vec<BackendRef>,
}
