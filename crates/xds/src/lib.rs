//! Envoy xDS v3 glue: Biplane resources → xDS (control side, [`to_xds`]) and xDS → the
//! proxy's runtime config (data side, [`from_xds`]); [`compile_static`] chains both for
//! a static file.
//!
//! Protos come from `envoy-types` (its own `google.protobuf.Any`/`Duration`; pack with
//! [`to_any`]). This page is the contract between the translator, the control plane and
//! the proxy's xDS client: the names below are stable.
//!
//! # Names (`to_xds`, one Gateway)
//! | xDS resource | name |
//! |---|---|
//! | Listener | `listener-<port>`: one per distinct Gateway port, bound to `TranslateOptions::bind_ip` |
//! | filter chain | `http-<port>`, `https-<port>-<listener>`, `tls-<port>-<listener>-<routeNs>/<route>`, `tcp-<port>-<listener>` |
//! | RouteConfiguration | `route-<port>` (all HTTP listeners of a port, merged) and `route-<port>-<listener>` (one HTTPS listener) |
//! | VirtualHost | `<routeConfig>/<hostname>`, domains `[hostname]`; `*` when neither listener nor route names a host |
//! | Route | `httproute/<ns>/<name>/rule/<i>/match/<j>`, `grpcroute/<ns>/<name>/rule/<i>/match/<j>` |
//! | Cluster + ClusterLoadAssignment | `backend/<ns>/<name>`, type EDS over ADS |
//! | Secret | `<ns>/<name>` (PEM inline), referenced by SDS name from the listener |
//!
//! # Mapping
//! - Gateway listeners sharing a port: HTTP alone (one plaintext chain, HCM over RDS);
//!   HTTPS and TLS together (chains by SNI `server_names` + `transport_protocol: tls`, a
//!   `tls_inspector` listener filter); TCP alone (one TcpProxy chain, the oldest attached
//!   TCPRoute). HTTPS terminates with `DownstreamTlsContext` (SDS certificates, ALPN
//!   `h2`, `http/1.1`); a listener whose certificates all fail to resolve gets no chain.
//!   TLS Passthrough: one chain per attached TLSRoute with its (intersected) hostnames
//!   as `server_names` and a TcpProxy to its weighted backends; the oldest route wins a
//!   hostname. A port with no chain gets no Envoy listener.
//! - HCM: router filter only, `use_remote_address: true`, a `websocket` upgrade config,
//!   Envoy defaults otherwise (idle timeout 1 h, 60 KiB of request headers).
//! - Route order in a virtual host (Gateway API precedence across all routes of that
//!   host): exact path, then regex (longest pattern first), then prefix by length
//!   (longest first) — Envoy Gateway's order, so a catch-all `/` never shadows a regex
//!   rule — then method present, more
//!   header matches, more query matches, the oldest route (input order, i.e. the store's
//!   create revision), route `namespace/name`, then rule and match order.
//! - Paths: `Exact` → `path`; `PathPrefix /` → `prefix: "/"`; other `PathPrefix` →
//!   `path_separated_prefix` with trailing `/` trimmed; `RegularExpression` → `safe_regex`.
//!   Method → header `:method` exact. GRPCRoute: service+method → `path /<svc>/<m>`,
//!   service → `prefix /<svc>/`, method only or regex → `safe_regex`, plus header
//!   `content-type` prefix `application/grpc`.
//! - Filters: header modifiers → `*_headers_to_add` (`set` = OVERWRITE_IF_EXISTS_OR_ADD,
//!   `add` = APPEND_IF_EXISTS_OR_ADD) and `*_headers_to_remove`; RequestRedirect →
//!   `redirect`; URLRewrite → `prefix_rewrite` (ReplacePrefixMatch; `/` becomes
//!   `regex_rewrite ^<prefix>/*` → `/` so no `//` appears), `regex_rewrite ^/.*$`
//!   (ReplaceFullPath), `host_rewrite_literal`.
//! - Timeouts: `timeouts.request` → route `timeout`, and `0s` (no limit) when unset, since
//!   Envoy's implicit 15 s would cut long streams; `timeouts.backendRequest` →
//!   `retry_policy { num_retries: 0, per_try_timeout }`.
//! - Backends: resolved `backendRefs` with weight > 0 → `cluster` or `weighted_clusters`.
//!   A rule where none resolves (missing Backend, unsupported kind), or with no
//!   backendRefs and no redirect, → `direct_response 500 "backend not found"`. In a
//!   **partly unresolved** rule the unresolved weight goes to the cluster
//!   `biplane/unresolved-backend`, which never exists, with
//!   `cluster_not_found_response_code: INTERNAL_SERVER_ERROR`: Gateway API's 500 for that
//!   share, from Envoy and from our proxy alike (`from_xds` accepts a missing cluster only
//!   when that code is 500 or 404).
//!   Backend `hashOn` (RingHash/Maglev) → `hash_policy` (terminal) on every route
//!   that references it. Clusters use HTTP/2 (`HttpProtocolOptions` explicit http2 under
//!   `typed_extension_protocol_options`) for `appProtocol: h2c` or when a GRPCRoute
//!   references them. **Endpoint hostnames are resolved at translation time**
//!   (`ToSocketAddrs`, first address) because EDS carries IPs; failure is an error.
//!
//! # Data side (`from_xds`)
//! Accepts Listener, RouteConfiguration, Cluster (EDS or STATIC), ClusterLoadAssignment
//! and Secret (tls_certificate). Every message is destructured field by field; a set field
//! the proxy cannot honour is an error naming the resource and the field path, e.g.
//! `Listener "http-80": filter_chains[0].filters[0].typed_config.http_filters[0].typed_config: ...`.
//! References are checked (RDS names, clusters of routes and TCP proxies, load
//! assignments of EDS clusters, SDS secrets). Envoy defaults are applied where a field is
//! unset: route timeout 15 s (`0s` = none), connect timeout 5 s, idle timeouts 1 h,
//! `max_request_headers_kb` 60, ring 1024..8M, Maglev table 65537.
//! Semantics worth knowing:
//! - Envoy `prefix` is a plain string prefix; the config's `PathMatch::Prefix` is a
//!   segment prefix. They agree for `/` and for prefixes ending in `/` (the proxy must then
//!   match them as plain prefixes), so those map to `Prefix`; any other `prefix` becomes a
//!   full-match regex `<prefix>.*`. `path_separated_prefix` maps to `Prefix`.
//! - Regexes are RE2 full matches (`^(?:re)$`); `regex_rewrite` substitutions `\N` become
//!   `${N}`. Suffix/contains/ignore_case string matches become equivalent regexes.
//! - Host matching always ignores the port: `ignore_port_in_host_matching`,
//!   `strip_matching_host_port` and `strip_port_mode` are accepted either way, and a
//!   domain with a port is rejected.
//! - Accepted without effect (naming, statistics or opaque data only): `metadata`,
//!   `stat_prefix` (listener, route), `alt_stat_name`, `traffic_direction`, locality
//!   labels, endpoint `hostname`, router `dynamic_stats`/`suppress_envoy_headers`,
//!   `validate_clusters`, `initial_fetch_timeout`, `dns_lookup_family` (no DNS clusters).
//! - Endpoints whose `health_status` is UNHEALTHY, DRAINING, TIMEOUT or DEGRADED are left
//!   out, as Envoy would not route to them.
//! - Retries are not implemented: a retry policy must not retry (empty `retry_on` or
//!   `num_retries: 0`); its `per_try_timeout` is honoured.

pub mod atomic_file;
pub mod client;
pub mod from_xds;
pub mod node_rpc;
pub mod server;
#[path = "static.rs"]
pub mod static_config;
pub mod to_xds;

pub use from_xds::{ResourceKind, XdsError, XdsErrors, XdsResources, from_xds, to_any};
pub use static_config::{StaticError, compile_static, static_xds};
pub use to_xds::{
    TranslateError, TranslateErrors, TranslateOptions, cluster_name, secret_name, to_xds,
};

/// The key of a Cluster's `typed_extension_protocol_options` for HTTP upstream options.
pub const HTTP_PROTOCOL_OPTIONS_KEY: &str =
    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
