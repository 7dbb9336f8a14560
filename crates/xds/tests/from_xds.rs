//! `from_xds` tests: a baseline set of Envoy resources translates to the expected runtime
//! config, and a table of single mutations of it is rejected with exact field paths.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use biplane_config as cfg;
use biplane_xds::{XdsResources, from_xds, to_any};
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
use prost::Message;

fn addr(ip: &str, port: u32) -> core::Address {
    core::Address {
        address: Some(core::address::Address::SocketAddress(core::SocketAddress {
            address: ip.to_owned(),
            port_specifier: Some(core::socket_address::PortSpecifier::PortValue(port)),
            ..Default::default()
        })),
    }
}

fn secs(s: i64) -> pbuf::Duration {
    pbuf::Duration {
        seconds: s,
        nanos: 0,
    }
}

fn router_filter() -> hcm::HttpFilter {
    hcm::HttpFilter {
        name: "envoy.filters.http.router".into(),
        config_type: Some(hcm::http_filter::ConfigType::TypedConfig(to_any(
            &Router::default(),
        ))),
        ..Default::default()
    }
}

fn hcm_rds(name: &str) -> hcm::HttpConnectionManager {
    hcm::HttpConnectionManager {
        stat_prefix: "http".into(),
        http_filters: vec![router_filter()],
        route_specifier: Some(hcm::http_connection_manager::RouteSpecifier::Rds(
            hcm::Rds {
                config_source: Some(core::ConfigSource {
                    resource_api_version: core::ApiVersion::V3 as i32,
                    config_source_specifier: Some(core::config_source::ConfigSourceSpecifier::Ads(
                        Default::default(),
                    )),
                    ..Default::default()
                }),
                route_config_name: name.into(),
            },
        )),
        ..Default::default()
    }
}

fn filter(name: &str, any: pbuf::Any) -> lv3::Filter {
    lv3::Filter {
        name: name.into(),
        config_type: Some(lv3::filter::ConfigType::TypedConfig(any)),
    }
}

fn tls_socket(secret: &str) -> core::TransportSocket {
    core::TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(core::transport_socket::ConfigType::TypedConfig(to_any(
            &tls::DownstreamTlsContext {
                common_tls_context: Some(tls::CommonTlsContext {
                    tls_certificate_sds_secret_configs: vec![tls::SdsSecretConfig {
                        name: secret.into(),
                        sds_config: None,
                    }],
                    alpn_protocols: vec!["h2".into(), "http/1.1".into()],
                    ..Default::default()
                }),
                ..Default::default()
            },
        ))),
    }
}

fn route(
    name: &str,
    path: rv3::route_match::PathSpecifier,
    action: rv3::route::Action,
) -> rv3::Route {
    rv3::Route {
        name: name.into(),
        r#match: Some(rv3::RouteMatch {
            path_specifier: Some(path),
            ..Default::default()
        }),
        action: Some(action),
        ..Default::default()
    }
}

fn to_cluster(c: &str) -> rv3::route::Action {
    rv3::route::Action::Route(rv3::RouteAction {
        cluster_specifier: Some(rv3::route_action::ClusterSpecifier::Cluster(c.into())),
        ..Default::default()
    })
}

fn regex(r: &str) -> matcher::RegexMatcher {
    matcher::RegexMatcher {
        regex: r.into(),
        engine_type: None,
    }
}

fn self_signed(host: &str) -> (String, String) {
    let ck = rcgen::generate_simple_self_signed(vec![host.to_owned()]).unwrap();
    (ck.cert.pem(), ck.signing_key.serialize_pem())
}

fn inline(s: &str) -> Option<core::DataSource> {
    Some(core::DataSource {
        watched_directory: None,
        specifier: Some(core::data_source::Specifier::InlineString(s.into())),
    })
}

/// A valid set covering most supported features.
fn baseline() -> XdsResources {
    use rv3::route_match::PathSpecifier as P;
    let (cert, key) = self_signed("secure.example.com");
    let routes = vec![
        route("exact", P::Path("/exact".into()), to_cluster("web")),
        route(
            "split",
            P::PathSeparatedPrefix("/api".into()),
            rv3::route::Action::Route(rv3::RouteAction {
                cluster_specifier: Some(rv3::route_action::ClusterSpecifier::WeightedClusters(
                    rv3::WeightedCluster {
                        clusters: vec![
                            rv3::weighted_cluster::ClusterWeight {
                                name: "web".into(),
                                weight: Some(pbuf::UInt32Value { value: 80 }),
                                ..Default::default()
                            },
                            rv3::weighted_cluster::ClusterWeight {
                                name: "grpc".into(),
                                weight: Some(pbuf::UInt32Value { value: 20 }),
                                ..Default::default()
                            },
                        ],
                        ..Default::default()
                    },
                )),
                prefix_rewrite: "/v2".into(),
                host_rewrite_specifier: Some(
                    rv3::route_action::HostRewriteSpecifier::HostRewriteLiteral("internal".into()),
                ),
                timeout: Some(secs(0)),
                retry_policy: Some(rv3::RetryPolicy {
                    per_try_timeout: Some(secs(2)),
                    ..Default::default()
                }),
                hash_policy: vec![rv3::route_action::HashPolicy {
                    terminal: false,
                    policy_specifier: Some(
                        rv3::route_action::hash_policy::PolicySpecifier::Header(
                            rv3::route_action::hash_policy::Header {
                                header_name: "X-User".into(),
                                regex_rewrite: None,
                            },
                        ),
                    ),
                }],
                ..Default::default()
            }),
        ),
        route(
            "regex",
            P::SafeRegex(regex("/r/[0-9]+")),
            rv3::route::Action::Redirect(rv3::RedirectAction {
                scheme_rewrite_specifier: Some(
                    rv3::redirect_action::SchemeRewriteSpecifier::HttpsRedirect(true),
                ),
                port_redirect: 8443,
                response_code: rv3::redirect_action::RedirectResponseCode::Found as i32,
                ..Default::default()
            }),
        ),
        rv3::Route {
            name: "headers".into(),
            r#match: Some(rv3::RouteMatch {
                path_specifier: Some(P::Prefix("/".into())),
                headers: vec![
                    rv3::HeaderMatcher {
                        name: ":method".into(),
                        header_match_specifier: Some(
                            rv3::header_matcher::HeaderMatchSpecifier::StringMatch(
                                matcher::StringMatcher {
                                    ignore_case: false,
                                    match_pattern: Some(
                                        matcher::string_matcher::MatchPattern::Exact("POST".into()),
                                    ),
                                },
                            ),
                        ),
                        ..Default::default()
                    },
                    rv3::HeaderMatcher {
                        name: "X-Env".into(),
                        header_match_specifier: Some(
                            rv3::header_matcher::HeaderMatchSpecifier::StringMatch(
                                matcher::StringMatcher {
                                    ignore_case: false,
                                    match_pattern: Some(
                                        matcher::string_matcher::MatchPattern::SafeRegex(regex(
                                            "can(ary)?",
                                        )),
                                    ),
                                },
                            ),
                        ),
                        ..Default::default()
                    },
                ],
                query_parameters: vec![rv3::QueryParameterMatcher {
                    name: "debug".into(),
                    query_parameter_match_specifier: Some(
                        rv3::query_parameter_matcher::QueryParameterMatchSpecifier::PresentMatch(
                            true,
                        ),
                    ),
                }],
                ..Default::default()
            }),
            request_headers_to_add: vec![
                core::HeaderValueOption {
                    header: Some(core::HeaderValue {
                        key: "x-set".into(),
                        value: "1".into(),
                        raw_value: vec![],
                    }),
                    append_action:
                        core::header_value_option::HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
                    ..Default::default()
                },
                core::HeaderValueOption {
                    header: Some(core::HeaderValue {
                        key: "x-add".into(),
                        value: "2".into(),
                        raw_value: vec![],
                    }),
                    ..Default::default()
                },
            ],
            response_headers_to_remove: vec!["Server".into()],
            action: Some(rv3::route::Action::DirectResponse(
                rv3::DirectResponseAction {
                    status: 500,
                    body: inline("backend not found"),
                    body_format: None,
                },
            )),
            ..Default::default()
        },
    ];
    let rc = rv3::RouteConfiguration {
        name: "route-80".into(),
        virtual_hosts: vec![
            rv3::VirtualHost {
                name: "a".into(),
                domains: vec!["a.example.com".into()],
                routes,
                ..Default::default()
            },
            rv3::VirtualHost {
                name: "any".into(),
                domains: vec!["*".into()],
                routes: vec![route("all", P::Prefix("/".into()), to_cluster("web"))],
                ..Default::default()
            },
        ],
        ..Default::default()
    };
    let http = lv3::Listener {
        name: "http-80".into(),
        address: Some(addr("127.0.0.1", 8080)),
        filter_chains: vec![lv3::FilterChain {
            filters: vec![filter(
                "envoy.filters.network.http_connection_manager",
                to_any(&hcm_rds("route-80")),
            )],
            ..Default::default()
        }],
        ..Default::default()
    };
    let secure = lv3::Listener {
        name: "tls-443".into(),
        address: Some(addr("127.0.0.1", 8443)),
        listener_filters: vec![lv3::ListenerFilter {
            name: "envoy.filters.listener.tls_inspector".into(),
            config_type: Some(lv3::listener_filter::ConfigType::TypedConfig(to_any(
                &TlsInspector::default(),
            ))),
            ..Default::default()
        }],
        filter_chains: vec![
            lv3::FilterChain {
                name: "https".into(),
                filter_chain_match: Some(lv3::FilterChainMatch {
                    server_names: vec!["secure.example.com".into()],
                    transport_protocol: "tls".into(),
                    ..Default::default()
                }),
                transport_socket: Some(tls_socket("default/cert")),
                filters: vec![filter("hcm", to_any(&hcm_rds("route-80")))],
                ..Default::default()
            },
            lv3::FilterChain {
                name: "passthrough".into(),
                filter_chain_match: Some(lv3::FilterChainMatch {
                    server_names: vec!["*.pass.example.com".into()],
                    transport_protocol: "tls".into(),
                    ..Default::default()
                }),
                filters: vec![filter(
                    "tcp",
                    to_any(&tcp::TcpProxy {
                        stat_prefix: "pass".into(),
                        cluster_specifier: Some(tcp::tcp_proxy::ClusterSpecifier::Cluster(
                            "static".into(),
                        )),
                        ..Default::default()
                    }),
                )],
                ..Default::default()
            },
        ],
        ..Default::default()
    };
    let web = cv3::Cluster {
        name: "web".into(),
        cluster_discovery_type: Some(cv3::cluster::ClusterDiscoveryType::Type(
            cv3::cluster::DiscoveryType::Eds as i32,
        )),
        eds_cluster_config: Some(cv3::cluster::EdsClusterConfig {
            eds_config: Some(core::ConfigSource {
                config_source_specifier: Some(core::config_source::ConfigSourceSpecifier::Ads(
                    Default::default(),
                )),
                ..Default::default()
            }),
            service_name: String::new(),
        }),
        connect_timeout: Some(secs(2)),
        lb_policy: cv3::cluster::LbPolicy::RingHash as i32,
        lb_config: Some(cv3::cluster::LbConfig::RingHashLbConfig(
            cv3::cluster::RingHashLbConfig {
                minimum_ring_size: Some(pbuf::UInt64Value { value: 512 }),
                maximum_ring_size: Some(pbuf::UInt64Value { value: 4096 }),
                hash_function: 0,
            },
        )),
        ..Default::default()
    };
    let grpc = cv3::Cluster {
        name: "grpc".into(),
        cluster_discovery_type: Some(cv3::cluster::ClusterDiscoveryType::Type(cv3::cluster::DiscoveryType::Eds as i32)),
        lb_policy: cv3::cluster::LbPolicy::Maglev as i32,
        typed_extension_protocol_options: [(
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".to_owned(),
            to_any(&uhttp::HttpProtocolOptions {
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
            }),
        )]
        .into(),
        ..Default::default()
    };
    let static_cluster = cv3::Cluster {
        name: "static".into(),
        load_assignment: Some(cla("static", &[("127.0.0.1", 9000, 1)])),
        ..Default::default()
    };
    XdsResources {
        listeners: vec![http, secure],
        route_configs: vec![rc],
        clusters: vec![web, grpc, static_cluster],
        load_assignments: vec![
            cla("web", &[("127.0.0.1", 9001, 3), ("127.0.0.1", 9002, 1)]),
            cla("grpc", &[("::1", 9003, 1)]),
        ],
        secrets: vec![tls::Secret {
            name: "default/cert".into(),
            r#type: Some(tls::secret::Type::TlsCertificate(tls::TlsCertificate {
                certificate_chain: inline(&cert),
                private_key: inline(&key),
                ..Default::default()
            })),
        }],
    }
}

fn cla(name: &str, eps: &[(&str, u32, u32)]) -> ev3::ClusterLoadAssignment {
    ev3::ClusterLoadAssignment {
        cluster_name: name.into(),
        endpoints: vec![ev3::LocalityLbEndpoints {
            lb_endpoints: eps
                .iter()
                .map(|(ip, port, w)| ev3::LbEndpoint {
                    load_balancing_weight: Some(pbuf::UInt32Value { value: *w }),
                    host_identifier: Some(ev3::lb_endpoint::HostIdentifier::Endpoint(
                        ev3::Endpoint {
                            address: Some(addr(ip, *port)),
                            ..Default::default()
                        },
                    )),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn http_hcm(r: &mut XdsResources) -> hcm::HttpConnectionManager {
    let lv3::filter::ConfigType::TypedConfig(any) = r.listeners[0].filter_chains[0].filters[0]
        .config_type
        .clone()
        .unwrap()
    else {
        panic!("not typed")
    };
    hcm::HttpConnectionManager::decode(&*any.value).unwrap()
}

fn set_http_hcm(r: &mut XdsResources, h: &hcm::HttpConnectionManager) {
    r.listeners[0].filter_chains[0].filters[0].config_type =
        Some(lv3::filter::ConfigType::TypedConfig(to_any(h)));
}

#[test]
fn baseline_translates() {
    let config = from_xds(&baseline(), "v1").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.version, "v1");
    assert_eq!(config.listeners.len(), 2);

    let http = &config.listeners[0];
    assert_eq!(http.address.to_string(), "127.0.0.1:8080");
    let cfg::ChainHandler::Http(h) = &http.filter_chains[0].handler else {
        panic!("http")
    };
    assert_eq!(h.route_config_name, "route-80");
    assert_eq!(h.max_request_headers_kb, 60, "Envoy default");
    assert_eq!(
        h.idle_timeout,
        Some(std::time::Duration::from_secs(3600)),
        "Envoy default"
    );

    let secure = &config.listeners[1];
    let chain = &secure.filter_chains[0];
    assert_eq!(chain.matcher.server_names, vec!["secure.example.com"]);
    assert_eq!(chain.matcher.tls, Some(true));
    let tls = chain.tls.as_ref().unwrap();
    assert_eq!(tls.certificates[0].name, "default/cert");
    assert_eq!(tls.alpn, vec!["h2", "http/1.1"]);
    let pass = &secure.filter_chains[1];
    assert!(pass.tls.is_none(), "passthrough keeps the bytes");
    let cfg::ChainHandler::Tcp(t) = &pass.handler else {
        panic!("tcp")
    };
    assert_eq!(t.clusters[0].name, "static");

    let rc = &config.route_configs[0];
    let routes = &rc.virtual_hosts[0].routes;
    assert!(matches!(&routes[0].matcher.path, cfg::PathMatch::Exact(p) if p == "/exact"));
    assert_eq!(routes[0].name, "exact");
    let default_timeout = match &routes[0].action {
        cfg::RouteAction::Forward(f) => f.timeout,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        default_timeout,
        Some(std::time::Duration::from_secs(15)),
        "Envoy default route timeout"
    );

    let cfg::RouteAction::Forward(f) = &routes[1].action else {
        panic!("forward")
    };
    assert!(matches!(&routes[1].matcher.path, cfg::PathMatch::Prefix(p) if p == "/api"));
    let weights: Vec<_> = f
        .clusters
        .iter()
        .map(|c| (c.name.as_str(), c.weight))
        .collect();
    assert_eq!(weights, vec![("web", 80), ("grpc", 20)]);
    assert!(matches!(&f.path_rewrite, Some(cfg::PathRewrite::ReplacePrefix(p)) if p == "/v2"));
    assert_eq!(f.host_rewrite.as_deref(), Some("internal"));
    assert_eq!(f.timeout, None, "0s disables the timeout");
    assert_eq!(f.per_try_timeout, Some(std::time::Duration::from_secs(2)));
    assert!(matches!(&f.hash_policy[..], [cfg::HashPolicy::Header(h)] if h == "x-user"));

    let cfg::PathMatch::Regex(re) = &routes[2].matcher.path else {
        panic!("regex")
    };
    assert!(re.is_match("/r/42"));
    assert!(!re.is_match("/r/42/x"), "anchored: full match only");
    assert!(!re.is_match("/x/r/42"), "anchored: full match only");
    let cfg::RouteAction::Redirect(r) = &routes[2].action else {
        panic!("redirect")
    };
    assert_eq!(
        (r.scheme.as_deref(), r.port, r.status),
        (Some("https"), Some(8443), 302)
    );

    let m = &routes[3].matcher;
    assert_eq!(m.method.as_deref(), Some("POST"));
    assert_eq!(m.headers.len(), 1, ":method became RouteMatch.method");
    assert_eq!(m.headers[0].name, "x-env");
    let cfg::StringMatch::Regex(re) = &m.headers[0].value else {
        panic!("regex")
    };
    assert!(re.is_match("canary") && re.is_match("can") && !re.is_match("canaryx"));
    assert!(matches!(m.query_params[0].value, cfg::StringMatch::Present));
    assert_eq!(
        routes[3].request_headers.set,
        vec![("x-set".to_owned(), "1".to_owned())]
    );
    assert_eq!(
        routes[3].request_headers.add,
        vec![("x-add".to_owned(), "2".to_owned())]
    );
    assert_eq!(routes[3].response_headers.remove, vec!["server"]);
    assert!(
        matches!(&routes[3].action, cfg::RouteAction::DirectResponse { status: 500, body } if body == "backend not found")
    );

    let web = config.clusters.iter().find(|c| c.name == "web").unwrap();
    assert_eq!(
        web.lb_policy,
        cfg::LbPolicy::RingHash {
            minimum_ring_size: 512,
            maximum_ring_size: 4096
        }
    );
    assert_eq!(web.connect_timeout, std::time::Duration::from_secs(2));
    assert_eq!(
        web.endpoints.iter().map(|e| e.weight).collect::<Vec<_>>(),
        vec![3, 1]
    );
    assert_eq!(web.protocol, cfg::UpstreamProtocol::Http1);
    let grpc = config.clusters.iter().find(|c| c.name == "grpc").unwrap();
    assert_eq!(grpc.protocol, cfg::UpstreamProtocol::Http2);
    assert_eq!(grpc.lb_policy, cfg::LbPolicy::Maglev { table_size: 65537 });
    assert_eq!(grpc.endpoints[0].address.to_string(), "[::1]:9003");
    let st = config.clusters.iter().find(|c| c.name == "static").unwrap();
    assert_eq!(st.endpoints[0].address.to_string(), "127.0.0.1:9000");
}

#[test]
fn any_round_trip() {
    let res = baseline();
    let anys: Vec<_> = res.to_any().into_iter().map(|(_, _, a)| a).collect();
    let back = XdsResources::from_any(anys).unwrap();
    assert_eq!(back, res);
    let bad = XdsResources::from_any([pbuf::Any {
        type_url: "type.googleapis.com/foo.Bar".into(),
        value: vec![],
    }]);
    assert_eq!(
        bad.unwrap_err().to_string(),
        r##"Resource "#0": type_url: unsupported resource type "type.googleapis.com/foo.Bar""##
    );
}

type Mutation = fn(&mut XdsResources);

/// Each row: what is changed in the baseline, and the one error expected.
#[test]
fn rejections_name_resource_and_field_path() {
    use rv3::route_match::PathSpecifier as P;
    let table: &[(&str, Mutation, &str)] = &[
        (
            "unknown http filter",
            |r| {
                let mut h = http_hcm(r);
                h.http_filters.insert(
                    0,
                    hcm::HttpFilter {
                        name: "envoy.filters.http.cors".into(),
                        config_type: Some(hcm::http_filter::ConfigType::TypedConfig(pbuf::Any {
                            type_url:
                                "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors"
                                    .into(),
                            value: vec![],
                        })),
                        ..Default::default()
                    },
                );
                set_http_hcm(r, &h);
            },
            r#"Listener "http-80": filter_chains[0].filters[0].typed_config.http_filters[0].typed_config: http filter "envoy.filters.http.cors" (type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors) is not supported; only the router is"#,
        ),
        (
            "unsupported hcm field",
            |r| {
                let mut h = http_hcm(r);
                h.stream_idle_timeout = Some(secs(300));
                set_http_hcm(r, &h);
            },
            r#"Listener "http-80": filter_chains[0].filters[0].typed_config.stream_idle_timeout: not supported by biplane (must be unset)"#,
        ),
        (
            "missing rds",
            |r| set_http_hcm(r, &hcm_rds("nope")),
            r#"Listener "http-80": filter_chains[0].filters[0].typed_config.rds.route_config_name: route configuration "nope" is not among the RouteConfiguration resources"#,
        ),
        (
            "bad regex",
            |r| {
                r.route_configs[0].virtual_hosts[0].routes[2]
                    .r#match
                    .as_mut()
                    .unwrap()
                    .path_specifier = Some(P::SafeRegex(regex("/(unclosed")));
            },
            r#"RouteConfiguration "route-80": virtual_hosts[0].routes[2].match.safe_regex: regex parse error:"#,
        ),
        (
            "bad regex in inline route config",
            |r| {
                let mut h = http_hcm(r);
                let mut rc = r.route_configs[0].clone();
                rc.virtual_hosts[1].routes[0]
                    .r#match
                    .as_mut()
                    .unwrap()
                    .path_specifier = Some(P::SafeRegex(regex("[")));
                h.route_specifier = Some(
                    hcm::http_connection_manager::RouteSpecifier::RouteConfig(rc),
                );
                set_http_hcm(r, &h);
            },
            r#"Listener "http-80": filter_chains[0].filters[0].typed_config.route_config.virtual_hosts[1].routes[0].match.safe_regex: regex parse error:"#,
        ),
        (
            "unsupported cluster type",
            |r| {
                r.clusters[2].cluster_discovery_type =
                    Some(cv3::cluster::ClusterDiscoveryType::Type(
                        cv3::cluster::DiscoveryType::StrictDns as i32,
                    ));
            },
            r#"Cluster "static": type: STRICT_DNS is not supported (EDS or STATIC)"#,
        ),
        (
            "unsupported lb policy",
            |r| r.clusters[2].lb_policy = cv3::cluster::LbPolicy::ClusterProvided as i32,
            r#"Cluster "static": lb_policy: CLUSTER_PROVIDED is not supported"#,
        ),
        (
            "eds without load assignment",
            |r| {
                r.load_assignments.retain(|c| c.cluster_name != "web");
            },
            r#"Cluster "web": eds_cluster_config: EDS cluster needs a ClusterLoadAssignment named "web""#,
        ),
        (
            "route to unknown cluster",
            |r| r.route_configs[0].virtual_hosts[1].routes[0].action = Some(to_cluster("ghost")),
            r#"RouteConfiguration "route-80": virtual_hosts[1].routes[0].route.cluster: cluster "ghost" is not among the Cluster resources"#,
        ),
        (
            "tcp proxy to unknown cluster",
            |r| {
                r.clusters.retain(|c| c.name != "static");
            },
            r#"Listener "tls-443": filter_chains[1].filters[0].typed_config.cluster: cluster "static" is not among the Cluster resources"#,
        ),
        (
            "missing secret",
            |r| r.secrets.clear(),
            r#"Listener "tls-443": filter_chains[0].transport_socket.typed_config.common_tls_context.tls_certificate_sds_secret_configs[0].name: secret "default/cert" is not among the Secret resources"#,
        ),
        (
            "bad pem",
            |r| {
                let Some(tls::secret::Type::TlsCertificate(c)) = &mut r.secrets[0].r#type else {
                    panic!()
                };
                c.certificate_chain = inline("not a pem");
            },
            r#"Secret "default/cert": tls_certificate.certificate_chain: no PEM certificate found"#,
        ),
        (
            "unsupported listener filter",
            |r| {
                r.listeners[1].listener_filters.push(lv3::ListenerFilter {
                    name: "envoy.filters.listener.proxy_protocol".into(),
                    config_type: Some(lv3::listener_filter::ConfigType::TypedConfig(pbuf::Any {
                        type_url: "type.googleapis.com/envoy.extensions.filters.listener.proxy_protocol.v3.ProxyProtocol"
                            .into(),
                        value: vec![],
                    })),
                    ..Default::default()
                });
            },
            r#"Listener "tls-443": listener_filters[1].typed_config: listener filter "envoy.filters.listener.proxy_protocol""#,
        ),
        (
            "unsupported listener field",
            |r| {
                r.listeners[0].per_connection_buffer_limit_bytes =
                    Some(pbuf::UInt32Value { value: 32768 })
            },
            r#"Listener "http-80": per_connection_buffer_limit_bytes: not supported by biplane (must be unset)"#,
        ),
        (
            "unsupported route action",
            |r| {
                r.route_configs[0].virtual_hosts[1].routes[0].action =
                    Some(rv3::route::Action::Route(rv3::RouteAction {
                        cluster_specifier: Some(
                            rv3::route_action::ClusterSpecifier::ClusterHeader("x-cluster".into()),
                        ),
                        ..Default::default()
                    }));
            },
            r#"RouteConfiguration "route-80": virtual_hosts[1].routes[0].route.cluster_header: not supported by biplane"#,
        ),
        (
            "retries",
            |r| {
                r.route_configs[0].virtual_hosts[1].routes[0].action =
                    Some(rv3::route::Action::Route(rv3::RouteAction {
                        cluster_specifier: Some(rv3::route_action::ClusterSpecifier::Cluster(
                            "web".into(),
                        )),
                        retry_policy: Some(rv3::RetryPolicy {
                            retry_on: "5xx".into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }));
            },
            r#"RouteConfiguration "route-80": virtual_hosts[1].routes[0].route.retry_policy: retries are not supported"#,
        ),
        (
            "upstream tls",
            |r| r.clusters[0].transport_socket = Some(tls_socket("x")),
            r#"Cluster "web": transport_socket: not supported by biplane (must be unset)"#,
        ),
        (
            "duplicate chain match",
            |r| {
                let dup = r.listeners[1].filter_chains[0].clone();
                r.listeners[1].filter_chains.push(dup);
            },
            r#"Listener "tls-443": filter_chains[2].filter_chain_match: same match as filter_chains[0] (server name "secure.example.com")"#,
        ),
        (
            "duplicate domain",
            |r| {
                r.route_configs[0].virtual_hosts[1]
                    .domains
                    .push("A.example.com".into())
            },
            r#"RouteConfiguration "route-80": virtual_hosts[1].domains[1]: domain "a.example.com" appears in more than one virtual host"#,
        ),
        (
            "named port",
            |r| {
                r.listeners[0].address = Some(core::Address {
                    address: Some(core::address::Address::SocketAddress(core::SocketAddress {
                        address: "example.com".into(),
                        port_specifier: Some(core::socket_address::PortSpecifier::PortValue(80)),
                        ..Default::default()
                    })),
                });
            },
            r#"Listener "http-80": address.socket_address.address: "example.com" is not an IP address"#,
        ),
    ];
    for (what, mutate, expected) in table {
        let mut res = baseline();
        mutate(&mut res);
        let err = match from_xds(&res, "v") {
            Ok(_) => panic!("{what}: accepted"),
            Err(e) => e,
        };
        assert_eq!(
            err.0.len(),
            1,
            "{what}: expected exactly one error, got:\n{err}"
        );
        let got = err.to_string();
        assert!(
            got.starts_with(expected),
            "{what}:\n  got:      {got}\n  expected: {expected}…"
        );
    }
}

#[test]
fn every_error_is_reported() {
    let mut res = baseline();
    res.secrets.clear();
    res.load_assignments.clear();
    let err = from_xds(&res, "v").unwrap_err();
    // Secret missing for the TLS chain, and the two EDS clusters without load assignments.
    assert_eq!(err.0.len(), 3, "{err}");
    assert_eq!(err.to_string().lines().count(), 3);
}

#[test]
fn regex_rewrite_translates_re2_substitution() {
    let mut res = baseline();
    res.route_configs[0].virtual_hosts[1].routes[0].action =
        Some(rv3::route::Action::Route(rv3::RouteAction {
            cluster_specifier: Some(rv3::route_action::ClusterSpecifier::Cluster("web".into())),
            regex_rewrite: Some(matcher::RegexMatchAndSubstitute {
                pattern: Some(regex("^/service/([^/]+)(/.*)$")),
                substitution: "\\2/instance/\\1$".into(),
            }),
            ..Default::default()
        }));
    let config = from_xds(&res, "v").unwrap();
    let cfg::RouteAction::Forward(f) = &config.route_configs[0].virtual_hosts[1].routes[0].action
    else {
        panic!("forward")
    };
    let Some(cfg::PathRewrite::Regex {
        pattern,
        substitution,
    }) = &f.path_rewrite
    else {
        panic!("regex rewrite")
    };
    assert_eq!(
        pattern.replace_all("/service/foo/v1/api", substitution.as_str()),
        "/v1/api/instance/foo$"
    );
}

#[test]
fn plain_envoy_prefix_is_not_a_segment_prefix() {
    use rv3::route_match::PathSpecifier as P;
    let mut res = baseline();
    res.route_configs[0].virtual_hosts[1].routes[0]
        .r#match
        .as_mut()
        .unwrap()
        .path_specifier = Some(P::Prefix("/foo".into()));
    let config = from_xds(&res, "v").unwrap();
    let cfg::PathMatch::Regex(re) = &config.route_configs[0].virtual_hosts[1].routes[0]
        .matcher
        .path
    else {
        panic!("a non-`/`-terminated Envoy prefix becomes a regex")
    };
    assert!(
        re.is_match("/foobar")
            && re.is_match("/foo")
            && re.is_match("/foo/x")
            && !re.is_match("/fo")
    );
}
