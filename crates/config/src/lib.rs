//! The data plane's runtime configuration: what a proxy node executes.
//!
//! These are plain Rust types with no protobuf and no serde-for-users in them. They are
//! produced from Envoy xDS v3 resources by `biplane-xds` (`from_xds`), whether those came
//! from a static file (resources → xDS → here) or from a control plane over ADS. The proxy
//! compiles a `Config` into its hot-path snapshot; everything in a `Config` has already been
//! validated (regexes compile, references resolve, addresses parse), so the proxy's compile
//! step cannot fail on semantics, only on I/O such as binding.
//!
//! Architecture Invariant: this crate knows nothing of xDS, of the resource model, or of
//! the proxy's internals. It is the contract between `biplane-xds` and `biplane-proxy`.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Serialize;

/// A complete data-plane configuration. Applied whole, never in part.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Config {
    /// Opaque version label (xDS `version_info`s, or a hash of the static file).
    pub version: String,
    pub listeners: Vec<Listener>,
    pub route_configs: Vec<RouteConfig>,
    /// Clusters with their endpoints folded in (from CDS + EDS).
    pub clusters: Vec<Cluster>,
}

// ---------------------------------------------------------------------------------------
// Listeners
// ---------------------------------------------------------------------------------------

/// One bound socket. Several Gateway listeners on the same port become one `Listener`
/// with several filter chains (chosen by SNI), as in Envoy.
#[derive(Debug, Clone, Serialize)]
pub struct Listener {
    pub name: String,
    pub address: SocketAddr,
    /// Chains that match on TLS SNI (`server_names` non-empty or `tls_required`). The
    /// proxy peeks the ClientHello only if at least one chain needs TLS.
    pub filter_chains: Vec<FilterChain>,
}

#[derive(Debug, Clone, Serialize)]
pub struct FilterChain {
    pub name: String,
    pub matcher: ChainMatch,
    /// `Some`: terminate TLS here with these certificates. `None`: the bytes stay as they
    /// came (plaintext, or TLS passed through to the upstream untouched).
    pub tls: Option<TlsTermination>,
    pub handler: ChainHandler,
}

/// How a connection is matched to a filter chain (Envoy `FilterChainMatch`, subset).
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChainMatch {
    /// SNI names: exact (`a.example.com`) or leading wildcard (`*.example.com`). Empty
    /// matches any SNI (and no SNI). Most specific wins: exact, then longest wildcard.
    pub server_names: Vec<String>,
    /// `Some(true)`: only TLS connections; `Some(false)`: only plaintext; `None`: either.
    pub tls: Option<bool>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TlsTermination {
    /// Certificates offered; the proxy selects by SNI among them (rustls cert resolver),
    /// falling back to the first.
    pub certificates: Vec<Certificate>,
    /// ALPN protocols offered, in preference order (e.g. `h2`, `http/1.1`).
    pub alpn: Vec<String>,
}

#[derive(Clone, Serialize)]
pub struct Certificate {
    /// The name of the Secret it came from (for config dumps and errors).
    pub name: String,
    /// PEM certificate chain.
    pub cert_chain_pem: String,
    /// PEM private key. Never logged, never dumped.
    #[serde(skip)]
    pub private_key_pem: String,
}

impl std::fmt::Debug for Certificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certificate")
            .field("name", &self.name)
            .field(
                "cert_chain_pem",
                &format_args!("<{} bytes>", self.cert_chain_pem.len()),
            )
            .field("private_key_pem", &"<redacted>")
            .finish()
    }
}

#[derive(Debug, Clone, Serialize)]
pub enum ChainHandler {
    Http(HttpConnectionManager),
    Tcp(TcpProxy),
}

/// The HTTP side of a filter chain (Envoy `HttpConnectionManager`, subset).
#[derive(Debug, Clone, Serialize)]
pub struct HttpConnectionManager {
    /// For stats and logs.
    pub stat_prefix: String,
    /// Name of the `RouteConfig` to use (RDS name or inline route config's name).
    pub route_config_name: String,
    /// Close a downstream connection idle for this long (no request in flight).
    pub idle_timeout: Option<Duration>,
    /// Time allowed to receive the request headers.
    pub request_headers_timeout: Option<Duration>,
    /// Largest request header block accepted; beyond it the answer is 431.
    pub max_request_headers_kb: u32,
    /// Append the peer address to `x-forwarded-for` (Envoy `use_remote_address`).
    pub use_remote_address: bool,
}

/// An L4 proxy (Envoy `TcpProxy`): bytes both ways to one of the weighted clusters.
#[derive(Debug, Clone, Serialize)]
pub struct TcpProxy {
    pub stat_prefix: String,
    /// Non-empty; weights sum > 0.
    pub clusters: Vec<WeightedCluster>,
    pub idle_timeout: Option<Duration>,
}

// ---------------------------------------------------------------------------------------
// Routes
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Serialize)]
pub struct RouteConfig {
    pub name: String,
    /// Matched by `:authority`/`Host` (port stripped): exact domain first, then the
    /// longest suffix wildcard (`*.example.com`), then the longest prefix wildcard, then `*`.
    pub virtual_hosts: Vec<VirtualHost>,
}

#[derive(Debug, Clone, Serialize)]
pub struct VirtualHost {
    pub name: String,
    pub domains: Vec<String>,
    /// In priority order: the first route that matches wins (precedence was decided by
    /// the translator).
    pub routes: Vec<Route>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Route {
    /// Stable name for stats and the access log, e.g. `httproute/default/web/rule/0/match/0`.
    pub name: String,
    pub matcher: RouteMatch,
    /// Applied to the request before it goes upstream.
    pub request_headers: HeaderMutation,
    /// Applied to the response before it goes downstream.
    pub response_headers: HeaderMutation,
    pub action: RouteAction,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct RouteMatch {
    pub path: PathMatch,
    /// All must match.
    pub headers: Vec<HeaderMatch>,
    /// All must match.
    pub query_params: Vec<QueryParamMatch>,
    /// Upper-case method (`GET`), matched exactly.
    pub method: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub enum PathMatch {
    /// Path (without query) equals this.
    Exact(String),
    /// Path starts with this on a segment boundary (Gateway API `PathPrefix`): `/foo`
    /// matches `/foo`, `/foo/` and `/foo/bar`, not `/foobar`. `/` matches everything.
    Prefix(String),
    /// The whole path (without query) matches the regex.
    Regex(#[serde(serialize_with = "ser_regex")] regex::Regex),
}

impl Default for PathMatch {
    fn default() -> Self {
        PathMatch::Prefix("/".to_owned())
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct HeaderMatch {
    /// Lower-case header name.
    pub name: String,
    pub value: StringMatch,
    /// Match when the header does NOT match.
    pub invert: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct QueryParamMatch {
    pub name: String,
    pub value: StringMatch,
}

#[derive(Debug, Clone, Serialize)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    /// The whole value matches.
    Regex(#[serde(serialize_with = "ser_regex")] regex::Regex),
    /// Present, any value.
    Present,
}

fn ser_regex<S: serde::Serializer>(re: &regex::Regex, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(re.as_str())
}

/// Header edits (Gateway API `RequestHeaderModifier` / `ResponseHeaderModifier`). Applied
/// in the order: remove, set, add.
#[derive(Debug, Clone, Default, Serialize)]
pub struct HeaderMutation {
    /// Lower-case names to remove.
    pub remove: Vec<String>,
    /// Replace any existing value.
    pub set: Vec<(String, String)>,
    /// Append a value (keeping existing ones).
    pub add: Vec<(String, String)>,
}

impl HeaderMutation {
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.set.is_empty() && self.add.is_empty()
    }
}

#[derive(Debug, Clone, Serialize)]
pub enum RouteAction {
    Forward(Forward),
    Redirect(Redirect),
    /// Answer locally (e.g. 500 for a route whose backends did not resolve).
    DirectResponse {
        status: u16,
        body: String,
    },
}

#[derive(Debug, Clone, Serialize)]
pub struct Forward {
    /// Non-empty; one is picked per request by weight. A weight of 0 is never picked.
    pub clusters: Vec<WeightedCluster>,
    pub path_rewrite: Option<PathRewrite>,
    /// Replace the `Host`/`:authority` sent upstream.
    pub host_rewrite: Option<String>,
    /// Whole-request timeout (Gateway API `timeouts.request`); `None` = no limit.
    pub timeout: Option<Duration>,
    /// Timeout of one upstream attempt (Gateway API `timeouts.backendRequest`).
    pub per_try_timeout: Option<Duration>,
    /// Hash key sources for RingHash/Maglev, tried in order; the first that yields a
    /// value is used. Empty: a random key.
    pub hash_policy: Vec<HashPolicy>,
    /// The answer when the picked cluster does not exist (Envoy's
    /// `cluster_not_found_response_code`): 503 by default; 500 for the share of a
    /// Gateway API rule whose backendRefs do not resolve.
    pub cluster_not_found_status: u16,
}

#[derive(Debug, Clone, Serialize)]
pub struct WeightedCluster {
    pub name: String,
    pub weight: u32,
}

#[derive(Debug, Clone, Serialize)]
pub enum PathRewrite {
    /// Replace the part of the path matched by the route's `PathMatch::Prefix` with this
    /// (Envoy `prefix_rewrite`; Gateway API `ReplacePrefixMatch`).
    ReplacePrefix(String),
    /// Replace every match of the regex (Envoy `regex_rewrite`); Gateway API
    /// `ReplaceFullPath` is `^/.*$` → value.
    Regex {
        #[serde(serialize_with = "ser_regex")]
        pattern: regex::Regex,
        substitution: String,
    },
}

#[derive(Debug, Clone, Serialize)]
pub enum HashPolicy {
    Header(String),
    Cookie(String),
    SourceIp,
}

#[derive(Debug, Clone, Serialize)]
pub struct Redirect {
    /// `http` or `https`; `None` keeps the request's.
    pub scheme: Option<String>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub path: Option<RedirectPath>,
    /// 301, 302, 303, 307 or 308.
    pub status: u16,
}

#[derive(Debug, Clone, Serialize)]
pub enum RedirectPath {
    Full(String),
    /// Replace the prefix matched by the route.
    ReplacePrefix(String),
}

// ---------------------------------------------------------------------------------------
// Clusters
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Serialize)]
pub struct Cluster {
    pub name: String,
    pub connect_timeout: Duration,
    pub lb_policy: LbPolicy,
    /// May be empty (then requests get 503).
    pub endpoints: Vec<Endpoint>,
    pub protocol: UpstreamProtocol,
    /// Close pooled upstream connections idle this long.
    pub idle_timeout: Option<Duration>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Endpoint {
    pub address: SocketAddr,
    /// >= 1.
    pub weight: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum UpstreamProtocol {
    Http1,
    /// HTTP/2 with prior knowledge (h2c), as gRPC backends need.
    Http2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum LbPolicy {
    RoundRobin,
    LeastRequest,
    Random,
    RingHash {
        minimum_ring_size: u64,
        maximum_ring_size: u64,
    },
    Maglev {
        table_size: u64,
    },
}
