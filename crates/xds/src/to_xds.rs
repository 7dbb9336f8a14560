//! Control side: a validated `ResourceSet` → the Envoy xDS v3 resources of ONE Gateway
//! (what an Envoy would receive from Envoy Gateway for it). The naming and mapping
//! conventions are listed in the crate docs (`lib.rs`).

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::time::Duration;

use biplane_api as api;
use envoy_types::pb::envoy::config::cluster::v3 as cv3;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::endpoint::v3 as ev3;
use envoy_types::pb::envoy::config::listener::v3 as lv3;
use envoy_types::pb::envoy::config::route::v3 as rv3;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3 as tcp;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tls;
use envoy_types::pb::envoy::extensions::upstreams::http::v3 as uhttp;
use envoy_types::pb::envoy::r#type::matcher::v3 as matcher;
use envoy_types::pb::google::protobuf as pbuf;

use crate::from_xds::{XdsResources, to_any};

/// Translation parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TranslateOptions {
    /// The IP every Envoy listener binds (the control plane uses `0.0.0.0`).
    pub bind_ip: IpAddr,
}

impl Default for TranslateOptions {
    fn default() -> Self {
        Self {
            bind_ip: IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        }
    }
}

/// Why a Gateway cannot be translated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TranslateError {
    #[error("Gateway {namespace}/{name} not found")]
    GatewayNotFound { namespace: String, name: String },
    #[error(
        "Gateway {gateway}: spec.listeners[{listener}]: protocol {protocol} cannot share port {port} with listener {other:?} ({other_protocol})"
    )]
    ListenerConflict {
        gateway: String,
        listener: usize,
        protocol: &'static str,
        port: u16,
        other: String,
        other_protocol: &'static str,
    },
    #[error(
        "Backend {backend}: spec.endpoints[{index}].address: cannot resolve {address:?} to an IP address: {message}"
    )]
    EndpointResolution {
        backend: String,
        index: usize,
        address: String,
        message: String,
    },
}

/// Every problem found translating one Gateway. Displays one per line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TranslateErrors(pub Vec<TranslateError>);

impl fmt::Display for TranslateErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for TranslateErrors {}

/// Body of the local reply for a rule whose backends do not resolve.
pub const BACKEND_NOT_FOUND_BODY: &str = "backend not found";
/// The cluster name of the unresolved share of a rule's backendRefs: never a Cluster
/// resource, so with `cluster_not_found_response_code: INTERNAL_SERVER_ERROR` requests
/// picked for it are answered 500 (Gateway API), by Envoy and by our proxy alike.
pub const UNRESOLVED_CLUSTER: &str = "biplane/unresolved-backend";

/// Envoy cluster name of a Backend.
pub fn cluster_name(namespace: &str, name: &str) -> String {
    format!("backend/{namespace}/{name}")
}

/// SDS secret name of a Secret.
pub fn secret_name(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// Translates Gateway `namespace/name` of `set` into xDS resources.
pub fn to_xds(
    set: &api::ResourceSet,
    namespace: &str,
    name: &str,
    opts: &TranslateOptions,
) -> Result<XdsResources, TranslateErrors> {
    let gw = set.gateway(namespace, name).ok_or_else(|| {
        TranslateErrors(vec![TranslateError::GatewayNotFound {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }])
    })?;
    let mut t = Translator {
        set,
        gw,
        opts,
        errors: Vec::new(),
        backends: BTreeMap::new(),
        secrets: BTreeMap::new(),
    };
    let mut out = XdsResources::default();

    // Gateway listeners grouped by port, in first-appearance order.
    let mut ports: Vec<(u16, Vec<usize>)> = Vec::new();
    for (i, l) in gw.spec.listeners.iter().enumerate() {
        match ports.iter_mut().find(|(p, _)| *p == l.port) {
            Some((_, v)) => v.push(i),
            None => ports.push((l.port, vec![i])),
        }
    }
    for (port, listeners) in ports {
        if let Some((listener, route_configs)) = t.port(port, &listeners) {
            out.listeners.push(listener);
            out.route_configs.extend(route_configs);
        }
    }

    let backends = std::mem::take(&mut t.backends);
    for ((ns, bname), use_) in backends {
        if let Some(b) = set.backend(&ns, &bname)
            && let Some((c, cla)) = t.cluster(b, use_)
        {
            out.clusters.push(c);
            out.load_assignments.push(cla);
        }
    }
    for ((ns, sname), s) in std::mem::take(&mut t.secrets) {
        out.secrets.push(tls::Secret {
            name: secret_name(&ns, &sname),
            r#type: Some(tls::secret::Type::TlsCertificate(tls::TlsCertificate {
                certificate_chain: Some(inline(&s.cert_chain_pem)),
                private_key: Some(inline(s.private_key_pem.expose())),
                ..Default::default()
            })),
        });
    }
    if t.errors.is_empty() {
        Ok(out)
    } else {
        Err(TranslateErrors(t.errors))
    }
}

/// How a Backend is used by the Gateway's routes.
#[derive(Debug, Clone, Copy, Default)]
struct BackendUse {
    /// Referenced from a GRPCRoute: the upstream speaks HTTP/2.
    grpc: bool,
}

struct Translator<'a> {
    set: &'a api::ResourceSet,
    gw: &'a api::Gateway,
    opts: &'a TranslateOptions,
    errors: Vec<TranslateError>,
    /// Backends referenced by attached routes, by (namespace, name).
    backends: BTreeMap<(String, String), BackendUse>,
    /// Secrets referenced by terminating listeners, by (namespace, name).
    secrets: BTreeMap<(String, String), &'a api::TlsSecret>,
}

/// One Envoy route before sorting, with its precedence key.
struct Entry {
    key: PrecedenceKey,
    route: rv3::Route,
}

/// Gateway API precedence, smaller first: exact path, then longest prefix, then regex
/// (longest first, as Envoy Gateway orders them), then method present, most headers, most
/// query parameters, the oldest route (input order), route name, then rule and match order.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct PrecedenceKey {
    path_kind: u8,
    path_len: Reverse<usize>,
    no_method: bool,
    headers: Reverse<usize>,
    query: Reverse<usize>,
    order: usize,
    name: String,
    rule: usize,
    match_index: usize,
}

impl<'a> Translator<'a> {
    fn gw_name(&self) -> String {
        format!("{}/{}", self.gw.metadata.namespace(), self.gw.metadata.name)
    }

    fn port(
        &mut self,
        port: u16,
        listeners: &[usize],
    ) -> Option<(lv3::Listener, Vec<rv3::RouteConfiguration>)> {
        use api::ProtocolType as P;
        let gl = &self.gw.spec.listeners;
        // Port sharing: HTTP alone, HTTPS and TLS together, TCP alone.
        let first = &gl[listeners[0]];
        let class = |p: P| match p {
            P::Http => 0,
            P::Https | P::Tls => 1,
            P::Tcp => 2,
        };
        let mut ok = Vec::new();
        for &i in listeners {
            let l = &gl[i];
            let conflict = class(l.protocol) != class(first.protocol)
                || (l.protocol == P::Tcp && i != listeners[0]);
            if conflict {
                self.errors.push(TranslateError::ListenerConflict {
                    gateway: self.gw_name(),
                    listener: i,
                    protocol: l.protocol.as_str(),
                    port,
                    other: first.name.clone(),
                    other_protocol: first.protocol.as_str(),
                });
            } else {
                ok.push(i);
            }
        }

        let mut chains = Vec::new();
        let mut route_configs = Vec::new();
        match first.protocol {
            P::Http => {
                let rc_name = format!("route-{port}");
                let ls: Vec<&api::Listener> = ok.iter().map(|&i| &gl[i]).collect();
                route_configs.push(self.route_configuration(&rc_name, &ls));
                chains.push(lv3::FilterChain {
                    name: format!("http-{port}"),
                    filters: vec![hcm_filter(&format!("http-{port}"), &rc_name)],
                    ..Default::default()
                });
            }
            P::Tcp => {
                let l = &gl[ok[0]];
                let attached = self.set.attached_routes(self.gw, &l.name);
                // One TCPRoute per TCP listener: the oldest attached one.
                if let Some(a) = attached.first()
                    && let Some(proxy) = self.tcp_proxy(&format!("tcp-{port}"), a.route)
                {
                    chains.push(lv3::FilterChain {
                        name: format!("tcp-{port}-{}", l.name),
                        filters: vec![tcp_filter(&proxy)],
                        ..Default::default()
                    });
                }
            }
            P::Https | P::Tls => {
                let mut seen_sni: HashSet<Option<String>> = HashSet::new();
                for &i in &ok {
                    let l = &gl[i];
                    let terminate = l
                        .tls
                        .as_ref()
                        .map_or(api::TlsModeType::Terminate, |t| t.mode());
                    match (l.protocol, terminate) {
                        (P::Https, _) => {
                            let Some(ts) = self.downstream_tls(l) else {
                                continue;
                            };
                            if !seen_sni.insert(l.hostname.clone()) {
                                continue;
                            }
                            let rc_name = format!("route-{port}-{}", l.name);
                            route_configs.push(self.route_configuration(&rc_name, &[l]));
                            chains.push(lv3::FilterChain {
                                name: format!("https-{port}-{}", l.name),
                                filter_chain_match: Some(tls_match(
                                    l.hostname.iter().cloned().collect(),
                                )),
                                transport_socket: Some(ts),
                                filters: vec![hcm_filter(
                                    &format!("https-{port}-{}", l.name),
                                    &rc_name,
                                )],
                                ..Default::default()
                            });
                        }
                        (P::Tls, mode) => {
                            let ts = match mode {
                                api::TlsModeType::Terminate => match self.downstream_tls(l) {
                                    Some(ts) => Some(ts),
                                    None => continue,
                                },
                                api::TlsModeType::Passthrough => None,
                            };
                            for a in self.set.attached_routes(self.gw, &l.name) {
                                let hosts: Vec<Option<String>> = match &a.hostnames {
                                    api::HostnameIntersection::Hostnames(h) => {
                                        h.iter().cloned().map(Some).collect()
                                    }
                                    _ => vec![None],
                                };
                                // The oldest route wins a hostname.
                                let fresh: Vec<String> = hosts
                                    .into_iter()
                                    .filter(|h| seen_sni.insert(h.clone()))
                                    .flatten()
                                    .collect();
                                let any_host =
                                    matches!(a.hostnames, api::HostnameIntersection::Any);
                                if fresh.is_empty() && !any_host {
                                    continue;
                                }
                                let key = a.route.key();
                                let stat = format!("tls-{port}-{}", l.name);
                                let Some(proxy) = self.tcp_proxy(&stat, a.route) else {
                                    continue;
                                };
                                chains.push(lv3::FilterChain {
                                    name: format!(
                                        "tls-{port}-{}-{}/{}",
                                        l.name, key.namespace, key.name
                                    ),
                                    filter_chain_match: Some(tls_match(fresh)),
                                    transport_socket: ts.clone(),
                                    filters: vec![tcp_filter(&proxy)],
                                    ..Default::default()
                                });
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
        if chains.is_empty() {
            // Nothing to serve on this port (e.g. no route attached to a TCP listener, or
            // no certificate resolved): no Envoy listener, as Envoy Gateway does.
            return None;
        }
        let needs_inspector = chains.iter().any(|c| {
            c.filter_chain_match
                .as_ref()
                .is_some_and(|m| !m.server_names.is_empty() || !m.transport_protocol.is_empty())
        });
        let listener = lv3::Listener {
            name: format!("listener-{port}"),
            address: Some(socket_address(SocketAddr::new(self.opts.bind_ip, port))),
            listener_filters: if needs_inspector {
                vec![lv3::ListenerFilter {
                    name: "envoy.filters.listener.tls_inspector".into(),
                    config_type: Some(lv3::listener_filter::ConfigType::TypedConfig(to_any(
                        &TlsInspector::default(),
                    ))),
                    ..Default::default()
                }]
            } else {
                Vec::new()
            },
            filter_chains: chains,
            ..Default::default()
        };
        Some((listener, route_configs))
    }

    /// TLS context for a terminating listener, with the certificates that resolve. `None`
    /// when none resolves (the listener is not programmed, as Gateway API prescribes).
    fn downstream_tls(&mut self, l: &api::Listener) -> Option<core::TransportSocket> {
        let ns = self.gw.metadata.namespace();
        let mut sds = Vec::new();
        for c in l.tls.iter().flat_map(|t| t.certificate_refs.iter()) {
            if c.group() != "" || c.kind() != "Secret" {
                continue;
            }
            let sns = c.namespace(ns);
            if let Some(s) = self.set.secret(sns, &c.name) {
                self.secrets.insert((sns.to_owned(), c.name.clone()), s);
                sds.push(tls::SdsSecretConfig {
                    name: secret_name(sns, &c.name),
                    sds_config: Some(ads()),
                });
            }
        }
        if sds.is_empty() {
            return None;
        }
        let ctx = tls::DownstreamTlsContext {
            common_tls_context: Some(tls::CommonTlsContext {
                tls_certificate_sds_secret_configs: sds,
                alpn_protocols: if l.protocol == api::ProtocolType::Https {
                    vec!["h2".into(), "http/1.1".into()]
                } else {
                    Vec::new()
                },
                ..Default::default()
            }),
            ..Default::default()
        };
        Some(core::TransportSocket {
            name: "envoy.transport_sockets.tls".into(),
            config_type: Some(core::transport_socket::ConfigType::TypedConfig(to_any(
                &ctx,
            ))),
        })
    }

    /// TCP proxy to the weighted backends of an L4 route (all rules' backendRefs). `None`
    /// when no backend resolves: the chain is left out and connections are refused.
    fn tcp_proxy(&mut self, stat_prefix: &str, route: api::RouteRef<'a>) -> Option<tcp::TcpProxy> {
        let ns = route.metadata().namespace().to_owned();
        let mut clusters = Vec::new();
        for (_, _, b) in route.backend_refs() {
            if let Ok(backend) = self.set.resolve_backend(&ns, b) {
                if b.weight() == 0 {
                    continue;
                }
                let key = (
                    backend.metadata.namespace().to_owned(),
                    backend.metadata.name.clone(),
                );
                self.backends.entry(key.clone()).or_default();
                clusters.push(tcp::tcp_proxy::weighted_cluster::ClusterWeight {
                    name: cluster_name(&key.0, &key.1),
                    weight: b.weight(),
                    metadata_match: None,
                });
            }
        }
        let spec = match clusters.len() {
            0 => return None,
            1 => tcp::tcp_proxy::ClusterSpecifier::Cluster(clusters.remove(0).name),
            _ => tcp::tcp_proxy::ClusterSpecifier::WeightedClusters(
                tcp::tcp_proxy::WeightedCluster { clusters },
            ),
        };
        Some(tcp::TcpProxy {
            stat_prefix: stat_prefix.to_owned(),
            cluster_specifier: Some(spec),
            ..Default::default()
        })
    }

    /// One RouteConfiguration for the HTTP routes attached to `listeners`, virtual hosts by
    /// (intersected) hostname, routes in Gateway API precedence order.
    fn route_configuration(
        &mut self,
        name: &str,
        listeners: &[&api::Listener],
    ) -> rv3::RouteConfiguration {
        let mut hosts: Vec<(String, Vec<Entry>)> = Vec::new();
        for l in listeners {
            for a in self.set.attached_routes(self.gw, &l.name) {
                let domains: Vec<String> = match &a.hostnames {
                    api::HostnameIntersection::Any => vec!["*".to_owned()],
                    api::HostnameIntersection::Hostnames(h) => h.clone(),
                    api::HostnameIntersection::Disjoint => continue,
                };
                let entries = match a.route {
                    api::RouteRef::Http(r) => self.http_route_entries(r, a.order),
                    api::RouteRef::Grpc(r) => self.grpc_route_entries(r, a.order),
                    _ => continue,
                };
                for d in domains {
                    let d = d.to_ascii_lowercase();
                    let slot = match hosts.iter().position(|(h, _)| *h == d) {
                        Some(i) => i,
                        None => {
                            hosts.push((d.clone(), Vec::new()));
                            hosts.len() - 1
                        }
                    };
                    let list = &mut hosts[slot].1;
                    // A route attached through two listeners of the port appears once.
                    for e in &entries {
                        if !list.iter().any(|x| x.route.name == e.route.name) {
                            list.push(Entry {
                                key: e.key.clone(),
                                route: e.route.clone(),
                            });
                        }
                    }
                }
            }
        }
        let virtual_hosts = hosts
            .into_iter()
            .map(|(host, mut entries)| {
                entries.sort_by(|a, b| a.key.cmp(&b.key));
                rv3::VirtualHost {
                    name: format!("{name}/{host}"),
                    domains: vec![host],
                    routes: entries.into_iter().map(|e| e.route).collect(),
                    ..Default::default()
                }
            })
            .collect();
        rv3::RouteConfiguration {
            name: name.to_owned(),
            virtual_hosts,
            ignore_port_in_host_matching: true,
            ..Default::default()
        }
    }

    fn http_route_entries(&mut self, r: &'a api::HttpRoute, order: usize) -> Vec<Entry> {
        let ns = r.metadata.namespace();
        let full_name = format!("{ns}/{}", r.metadata.name);
        let mut out = Vec::new();
        for (ri, rule) in r.spec.rules.iter().enumerate() {
            for (mi, m) in rule.effective_matches().iter().enumerate() {
                let pm = m.path_match();
                let (path_kind, path_spec) = path_specifier(&pm);
                let mut headers: Vec<rv3::HeaderMatcher> =
                    m.headers.iter().map(header_matcher).collect();
                if let Some(method) = m.method {
                    headers.push(exact_header(":method", method.as_str()));
                }
                let query_parameters = m
                    .query_params
                    .iter()
                    .map(|q| rv3::QueryParameterMatcher {
                        name: q.name.clone(),
                        query_parameter_match_specifier: Some(
                            rv3::query_parameter_matcher::QueryParameterMatchSpecifier::StringMatch(
                                string_matcher(q),
                            ),
                        ),
                    })
                    .collect();
                let key = PrecedenceKey {
                    path_kind,
                    path_len: Reverse(pm.value().len()),
                    no_method: m.method.is_none(),
                    headers: Reverse(m.headers.len()),
                    query: Reverse(m.query_params.len()),
                    order,
                    name: full_name.clone(),
                    rule: ri,
                    match_index: mi,
                };
                let mut route = rv3::Route {
                    name: format!("httproute/{full_name}/rule/{ri}/match/{mi}"),
                    r#match: Some(rv3::RouteMatch {
                        path_specifier: Some(path_spec),
                        headers,
                        query_parameters,
                        ..Default::default()
                    }),
                    ..Default::default()
                };
                self.http_rule_action(&mut route, ns, rule, &pm, false);
                out.push(Entry { key, route });
            }
        }
        out
    }

    fn grpc_route_entries(&mut self, r: &'a api::GrpcRoute, order: usize) -> Vec<Entry> {
        let ns = r.metadata.namespace();
        let full_name = format!("{ns}/{}", r.metadata.name);
        let mut out = Vec::new();
        for (ri, rule) in r.spec.rules.iter().enumerate() {
            let matches = if rule.matches.is_empty() {
                vec![api::GrpcRouteMatch::default()]
            } else {
                rule.matches.clone()
            };
            for (mi, m) in matches.iter().enumerate() {
                let (path_kind, path_len, path_spec) = grpc_path(m.method.as_ref());
                let mut headers: Vec<rv3::HeaderMatcher> =
                    m.headers.iter().map(header_matcher).collect();
                headers.push(rv3::HeaderMatcher {
                    name: "content-type".into(),
                    header_match_specifier: Some(
                        rv3::header_matcher::HeaderMatchSpecifier::StringMatch(
                            matcher::StringMatcher {
                                ignore_case: false,
                                match_pattern: Some(matcher::string_matcher::MatchPattern::Prefix(
                                    "application/grpc".into(),
                                )),
                            },
                        ),
                    ),
                    ..Default::default()
                });
                let key = PrecedenceKey {
                    path_kind,
                    path_len: Reverse(path_len),
                    no_method: true,
                    headers: Reverse(m.headers.len()),
                    query: Reverse(0),
                    order,
                    name: full_name.clone(),
                    rule: ri,
                    match_index: mi,
                };
                let mut route = rv3::Route {
                    name: format!("grpcroute/{full_name}/rule/{ri}/match/{mi}"),
                    r#match: Some(rv3::RouteMatch {
                        path_specifier: Some(path_spec),
                        headers,
                        ..Default::default()
                    }),
                    ..Default::default()
                };
                // GRPCRoute filters are the two header modifiers, shaped as HTTPRoute's.
                let http_rule = api::HttpRouteRule {
                    name: rule.name.clone(),
                    matches: Vec::new(),
                    filters: rule
                        .filters
                        .iter()
                        .map(|f| api::HttpRouteFilter {
                            filter_type: match f.filter_type {
                                api::GrpcRouteFilterType::RequestHeaderModifier => {
                                    api::HttpRouteFilterType::RequestHeaderModifier
                                }
                                api::GrpcRouteFilterType::ResponseHeaderModifier => {
                                    api::HttpRouteFilterType::ResponseHeaderModifier
                                }
                            },
                            request_header_modifier: f.request_header_modifier.clone(),
                            response_header_modifier: f.response_header_modifier.clone(),
                            request_redirect: None,
                            url_rewrite: None,
                        })
                        .collect(),
                    backend_refs: rule.backend_refs.clone(),
                    timeouts: None,
                };
                self.http_rule_action(
                    &mut route,
                    ns,
                    &http_rule,
                    &api::HttpPathMatch::default(),
                    true,
                );
                out.push(Entry { key, route });
            }
        }
        out
    }

    /// Filters, timeouts and backends of a rule → the Envoy route's action and headers.
    fn http_rule_action(
        &mut self,
        route: &mut rv3::Route,
        ns: &str,
        rule: &api::HttpRouteRule,
        pm: &api::HttpPathMatch,
        grpc: bool,
    ) {
        let mut redirect = None;
        let mut rewrite = None;
        for f in &rule.filters {
            match f.filter_type {
                api::HttpRouteFilterType::RequestHeaderModifier => {
                    if let Some(m) = &f.request_header_modifier {
                        let (add, remove) = header_modifier(m);
                        route.request_headers_to_add.extend(add);
                        route.request_headers_to_remove.extend(remove);
                    }
                }
                api::HttpRouteFilterType::ResponseHeaderModifier => {
                    if let Some(m) = &f.response_header_modifier {
                        let (add, remove) = header_modifier(m);
                        route.response_headers_to_add.extend(add);
                        route.response_headers_to_remove.extend(remove);
                    }
                }
                api::HttpRouteFilterType::RequestRedirect => redirect = f.request_redirect.as_ref(),
                api::HttpRouteFilterType::UrlRewrite => rewrite = f.url_rewrite.as_ref(),
            }
        }
        if let Some(rd) = redirect {
            route.action = Some(rv3::route::Action::Redirect(redirect_action(rd)));
            return;
        }

        // Backends: resolved refs with weight > 0 share the traffic.
        let mut clusters = Vec::new();
        let mut hash = Vec::new();
        let mut unresolved_weight = 0u32;
        for b in &rule.backend_refs {
            let Ok(backend) = self.set.resolve_backend(ns, b) else {
                unresolved_weight = unresolved_weight.saturating_add(b.weight());
                continue;
            };
            if b.weight() == 0 {
                continue;
            }
            let key = (
                backend.metadata.namespace().to_owned(),
                backend.metadata.name.clone(),
            );
            let u = self.backends.entry(key.clone()).or_default();
            u.grpc |= grpc;
            if let Some(h) = backend
                .spec
                .hash_on()
                .filter(|_| backend.spec.load_balancer_type().is_hash())
            {
                let policy = hash_policy(&h);
                if !hash.contains(&policy) {
                    hash.push(policy);
                }
            }
            clusters.push(rv3::weighted_cluster::ClusterWeight {
                name: cluster_name(&key.0, &key.1),
                weight: Some(pbuf::UInt32Value { value: b.weight() }),
                ..Default::default()
            });
        }
        if clusters.is_empty() {
            route.action = Some(rv3::route::Action::DirectResponse(
                rv3::DirectResponseAction {
                    status: 500,
                    body: Some(inline(BACKEND_NOT_FOUND_BODY)),
                    body_format: None,
                },
            ));
            return;
        }
        // Gateway API: the share of backendRefs that do not resolve is answered with 500,
        // through a cluster that never exists.
        let cluster_not_found = if unresolved_weight > 0 {
            clusters.push(rv3::weighted_cluster::ClusterWeight {
                name: UNRESOLVED_CLUSTER.to_owned(),
                weight: Some(pbuf::UInt32Value {
                    value: unresolved_weight,
                }),
                ..Default::default()
            });
            rv3::route_action::ClusterNotFoundResponseCode::InternalServerError
        } else {
            rv3::route_action::ClusterNotFoundResponseCode::ServiceUnavailable
        };
        let spec = if clusters.len() == 1 {
            rv3::route_action::ClusterSpecifier::Cluster(clusters.remove(0).name)
        } else {
            rv3::route_action::ClusterSpecifier::WeightedClusters(rv3::WeightedCluster {
                clusters,
                ..Default::default()
            })
        };
        for h in &mut hash {
            h.terminal = true;
        }
        let timeouts = rule.timeouts.as_ref();
        let mut ra = rv3::RouteAction {
            cluster_specifier: Some(spec),
            cluster_not_found_response_code: cluster_not_found as i32,
            // No timeouts.request: no limit (Envoy's implicit 15 s would cut streams).
            timeout: Some(duration(
                timeouts
                    .and_then(|t| t.request.as_ref())
                    .map_or(Duration::ZERO, |d| d.as_std()),
            )),
            retry_policy: timeouts.and_then(|t| t.backend_request.as_ref()).map(|d| {
                rv3::RetryPolicy {
                    num_retries: Some(pbuf::UInt32Value { value: 0 }),
                    per_try_timeout: Some(duration(d.as_std())),
                    ..Default::default()
                }
            }),
            hash_policy: hash,
            upgrade_configs: Vec::new(),
            ..Default::default()
        };
        if let Some(rw) = rewrite {
            if let Some(h) = &rw.hostname {
                ra.host_rewrite_specifier = Some(
                    rv3::route_action::HostRewriteSpecifier::HostRewriteLiteral(h.clone()),
                );
            }
            if let Some(p) = &rw.path {
                match p.modifier_type {
                    api::PathModifierType::ReplaceFullPath => {
                        ra.regex_rewrite = Some(matcher::RegexMatchAndSubstitute {
                            pattern: Some(regex_matcher("^/.*$")),
                            substitution: p.replace_full_path.clone().unwrap_or_else(|| "/".into()),
                        });
                    }
                    api::PathModifierType::ReplacePrefixMatch => {
                        let with = p.replace_prefix_match.clone().unwrap_or_else(|| "/".into());
                        let prefix = pm.value().trim_end_matches('/');
                        if with == "/" && !prefix.is_empty() {
                            // `/foo/bar` with prefix `/foo` → `/bar`, not `//bar`.
                            ra.regex_rewrite = Some(matcher::RegexMatchAndSubstitute {
                                pattern: Some(regex_matcher(&format!(
                                    "^{}/*",
                                    regex::escape(prefix)
                                ))),
                                substitution: "/".into(),
                            });
                        } else {
                            ra.prefix_rewrite = with;
                        }
                    }
                }
            }
        }
        route.action = Some(rv3::route::Action::Route(ra));
    }

    fn cluster(
        &mut self,
        b: &api::Backend,
        u: BackendUse,
    ) -> Option<(cv3::Cluster, ev3::ClusterLoadAssignment)> {
        use api::LoadBalancerType as L;
        let name = cluster_name(b.metadata.namespace(), &b.metadata.name);
        let mut lb_endpoints = Vec::new();
        for (i, e) in b.spec.endpoints.iter().enumerate() {
            if e.weight() == 0 {
                continue; // a weight of 0 takes no traffic
            }
            let addr = match e.ip() {
                Some(ip) => SocketAddr::new(ip, e.port),
                None => match (e.address.as_str(), e.port)
                    .to_socket_addrs()
                    .map(|mut a| a.next())
                {
                    Ok(Some(a)) => a,
                    Ok(None) => {
                        self.resolution_error(b, i, e, "no address found".into());
                        continue;
                    }
                    Err(err) => {
                        self.resolution_error(b, i, e, err.to_string());
                        continue;
                    }
                },
            };
            lb_endpoints.push(ev3::LbEndpoint {
                load_balancing_weight: Some(pbuf::UInt32Value { value: e.weight() }),
                host_identifier: Some(ev3::lb_endpoint::HostIdentifier::Endpoint(ev3::Endpoint {
                    address: Some(socket_address(addr)),
                    hostname: if e.ip().is_none() {
                        e.address.clone()
                    } else {
                        String::new()
                    },
                    ..Default::default()
                })),
                ..Default::default()
            });
        }
        let lb_policy = match b.spec.load_balancer_type() {
            L::RoundRobin => cv3::cluster::LbPolicy::RoundRobin,
            L::LeastRequest => cv3::cluster::LbPolicy::LeastRequest,
            L::Random => cv3::cluster::LbPolicy::Random,
            L::RingHash => cv3::cluster::LbPolicy::RingHash,
            L::Maglev => cv3::cluster::LbPolicy::Maglev,
        };
        let h2 = u.grpc || b.spec.app_protocol() == api::AppProtocol::H2c;
        let mut typed_extension_protocol_options = HashMap::new();
        if h2 {
            let opts = uhttp::HttpProtocolOptions {
                upstream_protocol_options: Some(uhttp::http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(
                    uhttp::http_protocol_options::ExplicitHttpConfig {
                        protocol_config: Some(
                            uhttp::http_protocol_options::explicit_http_config::ProtocolConfig::Http2ProtocolOptions(
                                Default::default(),
                            ),
                        ),
                    },
                )),
                ..Default::default()
            };
            typed_extension_protocol_options
                .insert(crate::HTTP_PROTOCOL_OPTIONS_KEY.to_owned(), to_any(&opts));
        }
        let cluster = cv3::Cluster {
            name: name.clone(),
            cluster_discovery_type: Some(cv3::cluster::ClusterDiscoveryType::Type(
                cv3::cluster::DiscoveryType::Eds as i32,
            )),
            eds_cluster_config: Some(cv3::cluster::EdsClusterConfig {
                eds_config: Some(ads()),
                service_name: String::new(),
            }),
            connect_timeout: Some(duration(b.spec.connect_timeout())),
            lb_policy: lb_policy as i32,
            typed_extension_protocol_options,
            ..Default::default()
        };
        let cla = ev3::ClusterLoadAssignment {
            cluster_name: name,
            endpoints: vec![ev3::LocalityLbEndpoints {
                lb_endpoints,
                ..Default::default()
            }],
            ..Default::default()
        };
        Some((cluster, cla))
    }

    fn resolution_error(
        &mut self,
        b: &api::Backend,
        index: usize,
        e: &api::Endpoint,
        message: String,
    ) {
        self.errors.push(TranslateError::EndpointResolution {
            backend: format!("{}/{}", b.metadata.namespace(), b.metadata.name),
            index,
            address: e.address.clone(),
            message,
        });
    }
}

fn ads() -> core::ConfigSource {
    core::ConfigSource {
        resource_api_version: core::ApiVersion::V3 as i32,
        config_source_specifier: Some(core::config_source::ConfigSourceSpecifier::Ads(
            Default::default(),
        )),
        ..Default::default()
    }
}

fn inline(s: &str) -> core::DataSource {
    core::DataSource {
        watched_directory: None,
        specifier: Some(core::data_source::Specifier::InlineString(s.to_owned())),
    }
}

fn duration(d: Duration) -> pbuf::Duration {
    pbuf::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

fn socket_address(a: SocketAddr) -> core::Address {
    core::Address {
        address: Some(core::address::Address::SocketAddress(core::SocketAddress {
            address: a.ip().to_string(),
            port_specifier: Some(core::socket_address::PortSpecifier::PortValue(u32::from(
                a.port(),
            ))),
            ..Default::default()
        })),
    }
}

fn tls_match(server_names: Vec<String>) -> lv3::FilterChainMatch {
    lv3::FilterChainMatch {
        server_names,
        transport_protocol: "tls".into(),
        ..Default::default()
    }
}

fn hcm_filter(stat_prefix: &str, route_config_name: &str) -> lv3::Filter {
    let h = hcm::HttpConnectionManager {
        stat_prefix: stat_prefix.to_owned(),
        route_specifier: Some(hcm::http_connection_manager::RouteSpecifier::Rds(
            hcm::Rds {
                config_source: Some(ads()),
                route_config_name: route_config_name.to_owned(),
            },
        )),
        http_filters: vec![hcm::HttpFilter {
            name: "envoy.filters.http.router".into(),
            config_type: Some(hcm::http_filter::ConfigType::TypedConfig(to_any(
                &Router::default(),
            ))),
            ..Default::default()
        }],
        use_remote_address: Some(pbuf::BoolValue { value: true }),
        upgrade_configs: vec![hcm::http_connection_manager::UpgradeConfig {
            upgrade_type: "websocket".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    lv3::Filter {
        name: "envoy.filters.network.http_connection_manager".into(),
        config_type: Some(lv3::filter::ConfigType::TypedConfig(to_any(&h))),
    }
}

fn tcp_filter(p: &tcp::TcpProxy) -> lv3::Filter {
    lv3::Filter {
        name: "envoy.filters.network.tcp_proxy".into(),
        config_type: Some(lv3::filter::ConfigType::TypedConfig(to_any(p))),
    }
}

fn regex_matcher(r: &str) -> matcher::RegexMatcher {
    matcher::RegexMatcher {
        regex: r.to_owned(),
        engine_type: None,
    }
}

/// Gateway API path match → (precedence class, Envoy path specifier). `PathPrefix` is
/// `path_separated_prefix` (segment boundary) with any trailing `/` trimmed; `/` is `prefix`.
fn path_specifier(pm: &api::HttpPathMatch) -> (u8, rv3::route_match::PathSpecifier) {
    use rv3::route_match::PathSpecifier as P;
    let v = pm.value();
    match pm.match_type() {
        api::PathMatchType::Exact => (0, P::Path(v.to_owned())),
        api::PathMatchType::PathPrefix => {
            let trimmed = v.trim_end_matches('/');
            if trimmed.is_empty() {
                (2, P::Prefix("/".into()))
            } else {
                (2, P::PathSeparatedPrefix(trimmed.to_owned()))
            }
        }
        api::PathMatchType::RegularExpression => (1, P::SafeRegex(regex_matcher(v))),
    }
}

/// GRPCRoute method match → (precedence class, length, path specifier).
fn grpc_path(m: Option<&api::GrpcMethodMatch>) -> (u8, usize, rv3::route_match::PathSpecifier) {
    use rv3::route_match::PathSpecifier as P;
    let Some(m) = m else {
        return (2, 1, P::Prefix("/".into()));
    };
    let (svc, meth) = (m.service.as_deref(), m.method.as_deref());
    match (m.match_type(), svc, meth) {
        (api::HeaderMatchType::Exact, Some(s), Some(me)) => {
            let p = format!("/{s}/{me}");
            (0, p.len(), P::Path(p))
        }
        (api::HeaderMatchType::Exact, Some(s), None) => {
            let p = format!("/{s}/");
            (2, p.len(), P::Prefix(p))
        }
        (api::HeaderMatchType::Exact, None, Some(me)) => {
            let r = format!("/[^/]+/{}", regex::escape(me));
            (1, r.len(), P::SafeRegex(regex_matcher(&r)))
        }
        (api::HeaderMatchType::RegularExpression, s, me) => {
            let r = format!("/{}/{}", s.unwrap_or("[^/]+"), me.unwrap_or("[^/]+"));
            (1, r.len(), P::SafeRegex(regex_matcher(&r)))
        }
        (_, None, None) => (2, 1, P::Prefix("/".into())),
    }
}

fn string_matcher(h: &api::HeaderMatch) -> matcher::StringMatcher {
    let pattern = match h.match_type() {
        api::HeaderMatchType::Exact => {
            matcher::string_matcher::MatchPattern::Exact(h.value.clone())
        }
        api::HeaderMatchType::RegularExpression => {
            matcher::string_matcher::MatchPattern::SafeRegex(regex_matcher(&h.value))
        }
    };
    matcher::StringMatcher {
        ignore_case: false,
        match_pattern: Some(pattern),
    }
}

fn header_matcher(h: &api::HeaderMatch) -> rv3::HeaderMatcher {
    rv3::HeaderMatcher {
        name: h.name.to_ascii_lowercase(),
        header_match_specifier: Some(rv3::header_matcher::HeaderMatchSpecifier::StringMatch(
            string_matcher(h),
        )),
        ..Default::default()
    }
}

fn exact_header(name: &str, value: &str) -> rv3::HeaderMatcher {
    rv3::HeaderMatcher {
        name: name.to_owned(),
        header_match_specifier: Some(rv3::header_matcher::HeaderMatchSpecifier::StringMatch(
            matcher::StringMatcher {
                ignore_case: false,
                match_pattern: Some(matcher::string_matcher::MatchPattern::Exact(
                    value.to_owned(),
                )),
            },
        )),
        ..Default::default()
    }
}

fn header_modifier(m: &api::HeaderModifier) -> (Vec<core::HeaderValueOption>, Vec<String>) {
    use core::header_value_option::HeaderAppendAction as A;
    let opt = |h: &api::HttpHeader, action: A| core::HeaderValueOption {
        header: Some(core::HeaderValue {
            key: h.name.to_ascii_lowercase(),
            value: h.value.clone(),
            raw_value: Vec::new(),
        }),
        append_action: action as i32,
        keep_empty_value: h.value.is_empty(),
        ..Default::default()
    };
    let mut add: Vec<_> = m
        .set
        .iter()
        .map(|h| opt(h, A::OverwriteIfExistsOrAdd))
        .collect();
    add.extend(m.add.iter().map(|h| opt(h, A::AppendIfExistsOrAdd)));
    (
        add,
        m.remove.iter().map(|r| r.to_ascii_lowercase()).collect(),
    )
}

fn redirect_action(rd: &api::RequestRedirect) -> rv3::RedirectAction {
    use rv3::redirect_action::{
        PathRewriteSpecifier as P, RedirectResponseCode as C, SchemeRewriteSpecifier as S,
    };
    let response_code = match rd.status_code() {
        301 => C::MovedPermanently,
        303 => C::SeeOther,
        307 => C::TemporaryRedirect,
        308 => C::PermanentRedirect,
        _ => C::Found,
    };
    let path = rd.path.as_ref().map(|p| match p.modifier_type {
        api::PathModifierType::ReplaceFullPath => {
            P::PathRedirect(p.replace_full_path.clone().unwrap_or_else(|| "/".into()))
        }
        api::PathModifierType::ReplacePrefixMatch => {
            P::PrefixRewrite(p.replace_prefix_match.clone().unwrap_or_else(|| "/".into()))
        }
    });
    rv3::RedirectAction {
        host_redirect: rd.hostname.clone().unwrap_or_default(),
        port_redirect: rd.port.map_or(0, u32::from),
        response_code: response_code as i32,
        strip_query: false,
        scheme_rewrite_specifier: rd
            .scheme
            .as_ref()
            .map(|s| S::SchemeRedirect(s.to_ascii_lowercase())),
        path_rewrite_specifier: path,
    }
}

fn hash_policy(h: &api::HashKey) -> rv3::route_action::HashPolicy {
    use rv3::route_action::hash_policy::{self as hp, PolicySpecifier as S};
    let spec = match h {
        api::HashKey::Header(n) => S::Header(hp::Header {
            header_name: n.to_ascii_lowercase(),
            regex_rewrite: None,
        }),
        api::HashKey::Cookie(n) => S::Cookie(hp::Cookie {
            name: n.clone(),
            ..Default::default()
        }),
        api::HashKey::SourceIp => {
            S::ConnectionProperties(hp::ConnectionProperties { source_ip: true })
        }
    };
    rv3::route_action::HashPolicy {
        terminal: false,
        policy_specifier: Some(spec),
    }
}
