//! Listener → `biplane_config::Listener`: address, filter chains and their matches, TLS
//! termination (inline or SDS certificates), and the two terminal network filters Biplane
//! implements (HttpConnectionManager, TcpProxy).

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use biplane_config as cfg;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::listener::v3 as lv3;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3 as tcp;
use envoy_types::pb::envoy::extensions::transport_sockets::raw_buffer::v3::RawBuffer;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tls;
use prost::Name;

use super::{Ctx, at, check_config_source, decode_typed, idx, reject_set, timeout_with_default};

/// What a listener may refer to.
pub(super) struct Env<'a> {
    /// `None`: the secret exists but is invalid (already reported).
    pub secrets: &'a HashMap<String, Option<cfg::Certificate>>,
    pub clusters: &'a HashSet<&'a str>,
    pub rds_names: &'a HashSet<&'a str>,
}

/// Envoy's default downstream idle timeout (HCM `common_http_protocol_options.idle_timeout`)
/// and TCP proxy idle timeout: one hour.
const ONE_HOUR: Duration = Duration::from_secs(3600);
/// Envoy's default and maximum `max_request_headers_kb`.
const DEFAULT_MAX_HEADERS_KB: u32 = 60;
const MAX_MAX_HEADERS_KB: u32 = 8192;

#[allow(
    deprecated,
    reason = "destructuring names deprecated fields too, so that they are checked"
)]
pub(super) fn listener(
    cx: &mut Ctx<'_>,
    l: &lv3::Listener,
    env: &Env<'_>,
) -> Option<(cfg::Listener, Vec<cfg::RouteConfig>)> {
    let start = cx.error_count();
    let lv3::Listener {
        name,
        address,
        additional_addresses,
        stat_prefix: _, // stats naming only
        stats_matcher,
        filter_chains,
        fcds_config,
        filter_chain_matcher,
        use_original_dst,
        default_filter_chain,
        per_connection_buffer_limit_bytes,
        per_connection_buffer_high_watermark_timeout,
        metadata: _, // opaque to the data plane
        deprecated_v1,
        drain_type,
        listener_filters,
        listener_filters_timeout,
        continue_on_listener_filters_timeout,
        transparent,
        freebind,
        socket_options,
        tcp_fast_open_queue_length,
        traffic_direction: _, // informational (INBOUND/OUTBOUND), no behaviour attached
        udp_listener_config,
        api_listener,
        connection_balance_config,
        reuse_port,
        enable_reuse_port,
        access_log,
        tcp_backlog_size,
        max_connections_to_accept_per_socket_event,
        bind_to_port,
        enable_mptcp,
        ignore_global_conn_limit,
        bypass_overload_manager,
        tcp_keepalive,
        listener_specifier,
    } = l;
    reject_set!(
        cx,
        "",
        additional_addresses,
        stats_matcher,
        fcds_config,
        filter_chain_matcher,
        use_original_dst,
        default_filter_chain,
        per_connection_buffer_limit_bytes,
        per_connection_buffer_high_watermark_timeout,
        deprecated_v1,
        drain_type,
        listener_filters_timeout,
        continue_on_listener_filters_timeout,
        transparent,
        freebind,
        socket_options,
        tcp_fast_open_queue_length,
        udp_listener_config,
        api_listener,
        connection_balance_config,
        reuse_port,
        enable_reuse_port,
        access_log,
        tcp_backlog_size,
        max_connections_to_accept_per_socket_event,
        bind_to_port,
        enable_mptcp,
        ignore_global_conn_limit,
        bypass_overload_manager,
        tcp_keepalive,
        listener_specifier,
    );

    let address = socket_address(cx, "address", address);

    for (i, lf) in listener_filters.iter().enumerate() {
        listener_filter(cx, &idx("", "listener_filters", i), lf);
    }

    if filter_chains.is_empty() {
        cx.err("filter_chains", "at least one filter chain is required");
    }
    let mut chains = Vec::new();
    let mut inline_routes = Vec::new();
    let mut seen_matches: HashMap<(String, Option<bool>), usize> = HashMap::new();
    for (i, fc) in filter_chains.iter().enumerate() {
        let p = idx("", "filter_chains", i);
        if let Some((chain, inline)) = filter_chain(cx, &p, name, i, fc, env) {
            // Envoy rejects two chains with the same match; so do we.
            let names: Vec<String> = if chain.matcher.server_names.is_empty() {
                vec![String::new()]
            } else {
                chain.matcher.server_names.clone()
            };
            for sni in names {
                if let Some(other) = seen_matches.insert((sni.clone(), chain.matcher.tls), i) {
                    cx.err(
                        &at(&p, "filter_chain_match"),
                        format!("same match as filter_chains[{other}] (server name {sni:?})"),
                    );
                }
            }
            inline_routes.extend(inline);
            chains.push(chain);
        }
    }

    if cx.error_count() > start {
        return None;
    }
    let address = address?;
    Some((
        cfg::Listener {
            name: name.clone(),
            address,
            filter_chains: chains,
        },
        inline_routes,
    ))
}

pub(super) fn socket_address(
    cx: &mut Ctx<'_>,
    path: &str,
    a: &Option<core::Address>,
) -> Option<SocketAddr> {
    use core::address::Address as A;
    let Some(core::Address { address }) = a else {
        cx.err(path, "required");
        return None;
    };
    let sa = match address {
        Some(A::SocketAddress(sa)) => sa,
        Some(A::Pipe(_)) => {
            cx.unsupported(path, "pipe");
            return None;
        }
        Some(A::EnvoyInternalAddress(_)) => {
            cx.unsupported(path, "envoy_internal_address");
            return None;
        }
        None => {
            cx.err(path, "socket_address is required");
            return None;
        }
    };
    let p = at(path, "socket_address");
    let core::SocketAddress {
        protocol,
        address,
        resolver_name,
        ipv4_compat,
        network_namespace_filepath,
        port_specifier,
    } = sa;
    reject_set!(
        cx,
        &p,
        resolver_name,
        ipv4_compat,
        network_namespace_filepath
    );
    if *protocol != core::socket_address::Protocol::Tcp as i32 {
        cx.err(&at(&p, "protocol"), "only TCP is supported");
    }
    let ip: Option<IpAddr> = match address.parse() {
        Ok(ip) => Some(ip),
        Err(_) => {
            cx.err(&at(&p, "address"), format!("{address:?} is not an IP address (DNS names need a resolver, which biplane does not support)"));
            None
        }
    };
    let port = match port_specifier {
        Some(core::socket_address::PortSpecifier::PortValue(v)) => match u16::try_from(*v) {
            Ok(v) => Some(v),
            Err(_) => {
                cx.err(&at(&p, "port_value"), format!("{v} is not a port"));
                None
            }
        },
        Some(core::socket_address::PortSpecifier::NamedPort(_)) => {
            cx.unsupported(&p, "named_port");
            None
        }
        None => {
            cx.err(&at(&p, "port_value"), "required");
            None
        }
    };
    Some(SocketAddr::new(ip?, port?))
}

fn listener_filter(cx: &mut Ctx<'_>, path: &str, lf: &lv3::ListenerFilter) {
    let lv3::ListenerFilter {
        name,
        filter_disabled,
        config_type,
    } = lf;
    reject_set!(cx, path, filter_disabled);
    match config_type {
        Some(lv3::listener_filter::ConfigType::TypedConfig(any))
            if any.type_url == TlsInspector::type_url() =>
        {
            let p = at(path, "typed_config");
            if let Some(ti) = decode_typed::<TlsInspector>(cx, &p, any) {
                let TlsInspector {
                    enable_ja3_fingerprinting,
                    enable_ja4_fingerprinting,
                    initial_read_buffer_size: _, // a read-size hint; the proxy peeks what it needs
                    close_connection_on_client_hello_parsing_errors,
                    max_client_hello_size,
                } = &ti;
                reject_set!(
                    cx,
                    &p,
                    enable_ja3_fingerprinting,
                    enable_ja4_fingerprinting,
                    close_connection_on_client_hello_parsing_errors,
                    max_client_hello_size
                );
            }
        }
        Some(lv3::listener_filter::ConfigType::TypedConfig(any)) => cx.err(
            &at(path, "typed_config"),
            format!(
                "listener filter {name:?} ({}) is not supported; only tls_inspector is",
                any.type_url
            ),
        ),
        Some(lv3::listener_filter::ConfigType::ConfigDiscovery(_)) => {
            cx.unsupported(path, "config_discovery")
        }
        None if name == "envoy.filters.listener.tls_inspector" => {}
        None => cx.err(
            path,
            format!("listener filter {name:?} is not supported; only tls_inspector is"),
        ),
    }
}

#[allow(
    deprecated,
    reason = "destructuring names deprecated fields too, so that they are checked"
)]
fn filter_chain(
    cx: &mut Ctx<'_>,
    path: &str,
    listener_name: &str,
    index: usize,
    fc: &lv3::FilterChain,
    env: &Env<'_>,
) -> Option<(cfg::FilterChain, Option<cfg::RouteConfig>)> {
    let start = cx.error_count();
    let lv3::FilterChain {
        filter_chain_match,
        filters,
        use_proxy_proto,
        metadata: _, // opaque
        transport_socket,
        transport_socket_connect_timeout,
        name,
    } = fc;
    reject_set!(cx, path, use_proxy_proto, transport_socket_connect_timeout);

    let matcher = chain_match(cx, &at(path, "filter_chain_match"), filter_chain_match);
    let tls = transport_socket
        .as_ref()
        .and_then(|ts| downstream_tls(cx, &at(path, "transport_socket"), ts, env));
    let chain_name = if name.is_empty() {
        format!("{listener_name}/{index}")
    } else {
        name.clone()
    };

    let mut handler = None;
    let mut inline_route = None;
    if filters.len() != 1 {
        cx.err(
            &at(path, "filters"),
            format!(
                "exactly one network filter (http_connection_manager or tcp_proxy) is supported, got {}",
                filters.len()
            ),
        );
    }
    if let Some(f) = filters.first() {
        let fp = idx(path, "filters", 0);
        let lv3::Filter {
            name: fname,
            config_type,
        } = f;
        match config_type {
            Some(lv3::filter::ConfigType::TypedConfig(any)) => {
                let tp = at(&fp, "typed_config");
                if any.type_url == hcm::HttpConnectionManager::type_url() {
                    if let Some(h) = decode_typed::<hcm::HttpConnectionManager>(cx, &tp, any)
                        && let Some((h, inline)) =
                            http_connection_manager(cx, &tp, &chain_name, &h, env)
                    {
                        handler = Some(cfg::ChainHandler::Http(h));
                        inline_route = inline;
                    }
                } else if any.type_url == tcp::TcpProxy::type_url() {
                    if let Some(t) = decode_typed::<tcp::TcpProxy>(cx, &tp, any) {
                        handler = tcp_proxy(cx, &tp, &t, env).map(cfg::ChainHandler::Tcp);
                    }
                } else {
                    cx.err(
                        &tp,
                        format!(
                            "network filter {fname:?} ({}) is not supported",
                            any.type_url
                        ),
                    );
                }
            }
            Some(lv3::filter::ConfigType::ConfigDiscovery(_)) => {
                cx.unsupported(&fp, "config_discovery")
            }
            None => cx.err(&fp, "typed_config is required"),
        }
    }
    if cx.error_count() > start {
        return None;
    }
    let handler = handler?;
    Some((
        cfg::FilterChain {
            name: chain_name,
            matcher: matcher?,
            tls,
            handler,
        },
        inline_route,
    ))
}

fn chain_match(
    cx: &mut Ctx<'_>,
    path: &str,
    m: &Option<lv3::FilterChainMatch>,
) -> Option<cfg::ChainMatch> {
    let Some(m) = m else {
        return Some(cfg::ChainMatch::default());
    };
    let lv3::FilterChainMatch {
        destination_port,
        prefix_ranges,
        address_suffix,
        suffix_len,
        direct_source_prefix_ranges,
        source_type,
        source_prefix_ranges,
        source_ports,
        server_names,
        transport_protocol,
        application_protocols,
    } = m;
    reject_set!(
        cx,
        path,
        destination_port,
        prefix_ranges,
        address_suffix,
        suffix_len,
        direct_source_prefix_ranges,
        source_type,
        source_prefix_ranges,
        source_ports,
        application_protocols,
    );
    let tls = match transport_protocol.as_str() {
        "" => None,
        "tls" => Some(true),
        "raw_buffer" => Some(false),
        other => {
            cx.err(
                &at(path, "transport_protocol"),
                format!("{other:?} is not supported (tls or raw_buffer)"),
            );
            None
        }
    };
    let mut names = Vec::new();
    for (i, n) in server_names.iter().enumerate() {
        let n = n.to_ascii_lowercase();
        let valid = !n.is_empty()
            && match n.strip_prefix("*.") {
                Some(rest) => !rest.is_empty() && !rest.contains('*'),
                None => !n.contains('*'),
            };
        if !valid {
            cx.err(
                &idx(path, "server_names", i),
                format!("{n:?} is not a host name or a leading `*.` wildcard"),
            );
        }
        names.push(n);
    }
    Some(cfg::ChainMatch {
        server_names: names,
        tls,
    })
}

#[allow(
    deprecated,
    reason = "destructuring names deprecated fields too, so that they are checked"
)]
fn downstream_tls(
    cx: &mut Ctx<'_>,
    path: &str,
    ts: &core::TransportSocket,
    env: &Env<'_>,
) -> Option<cfg::TlsTermination> {
    let core::TransportSocket {
        name: _,
        config_type,
    } = ts;
    let any = match config_type {
        Some(core::transport_socket::ConfigType::TypedConfig(any)) => any,
        None => {
            cx.err(&at(path, "typed_config"), "required");
            return None;
        }
    };
    let tp = at(path, "typed_config");
    if any.type_url == RawBuffer::type_url() {
        return None; // plaintext, same as no transport socket
    }
    let ctx = decode_typed::<tls::DownstreamTlsContext>(cx, &tp, any)?;
    let tls::DownstreamTlsContext {
        common_tls_context,
        require_client_certificate,
        require_sni,
        disable_stateful_session_resumption: _, // resumption is a performance hint
        session_timeout,
        ocsp_staple_policy,
        full_scan_certs_on_sni_mismatch,
        prefer_client_ciphers,
        session_ticket_keys_type,
    } = &ctx;
    if require_client_certificate.as_ref().is_some_and(|b| b.value) {
        cx.err(
            &at(&tp, "require_client_certificate"),
            "client certificates are not supported",
        );
    }
    if require_sni.as_ref().is_some_and(|b| b.value) {
        cx.unsupported(&tp, "require_sni");
    }
    reject_set!(
        cx,
        &tp,
        session_timeout,
        ocsp_staple_policy,
        full_scan_certs_on_sni_mismatch,
        prefer_client_ciphers,
        session_ticket_keys_type
    );
    let cp = at(&tp, "common_tls_context");
    let Some(common) = common_tls_context else {
        cx.err(&cp, "required (with at least one certificate)");
        return None;
    };
    let tls::CommonTlsContext {
        tls_params,
        tls_certificates,
        tls_certificate_sds_secret_configs,
        tls_certificate_provider_instance,
        custom_tls_certificate_selector,
        tls_certificate_certificate_provider,
        tls_certificate_certificate_provider_instance,
        alpn_protocols,
        custom_handshaker,
        key_log,
        validation_context_type,
    } = common;
    reject_set!(
        cx,
        &cp,
        tls_certificate_provider_instance,
        custom_tls_certificate_selector,
        tls_certificate_certificate_provider,
        tls_certificate_certificate_provider_instance,
        custom_handshaker,
        key_log,
        validation_context_type,
    );
    if let Some(params) = tls_params {
        tls_parameters(cx, &at(&cp, "tls_params"), params);
    }
    let mut certificates = Vec::new();
    for (i, c) in tls_certificates.iter().enumerate() {
        let p = idx(&cp, "tls_certificates", i);
        let name = format!("{}/{p}", cx.resource_name());
        if let Some(c) = super::cluster::tls_certificate(cx, &p, &name, c) {
            certificates.push(c);
        }
    }
    for (i, sds) in tls_certificate_sds_secret_configs.iter().enumerate() {
        let p = idx(&cp, "tls_certificate_sds_secret_configs", i);
        let tls::SdsSecretConfig { name, sds_config } = sds;
        check_config_source(cx, &at(&p, "sds_config"), sds_config);
        match env.secrets.get(name) {
            Some(Some(c)) => certificates.push(c.clone()),
            Some(None) => {}
            None => cx.err(
                &at(&p, "name"),
                format!("secret {name:?} is not among the Secret resources"),
            ),
        }
    }
    if certificates.is_empty()
        && tls_certificates.is_empty()
        && tls_certificate_sds_secret_configs.is_empty()
    {
        cx.err(&cp, "at least one certificate (tls_certificates or tls_certificate_sds_secret_configs) is required");
    }
    for (i, a) in alpn_protocols.iter().enumerate() {
        if !matches!(a.as_str(), "h2" | "http/1.1") {
            cx.err(
                &idx(&cp, "alpn_protocols", i),
                format!("{a:?} is not supported (h2, http/1.1)"),
            );
        }
    }
    Some(cfg::TlsTermination {
        certificates,
        alpn: alpn_protocols.clone(),
    })
}

fn tls_parameters(cx: &mut Ctx<'_>, path: &str, p: &tls::TlsParameters) {
    use tls::tls_parameters::TlsProtocol as V;
    let tls::TlsParameters {
        tls_minimum_protocol_version,
        tls_maximum_protocol_version,
        cipher_suites,
        ecdh_curves,
        signature_algorithms,
        compliance_policies,
    } = p;
    reject_set!(
        cx,
        path,
        cipher_suites,
        ecdh_curves,
        signature_algorithms,
        compliance_policies
    );
    // The proxy (rustls) speaks TLS 1.2 and 1.3.
    if ![V::TlsAuto as i32, V::TlSv12 as i32].contains(tls_minimum_protocol_version) {
        cx.err(
            &at(path, "tls_minimum_protocol_version"),
            "only TLS_AUTO or TLSv1_2 is supported",
        );
    }
    if ![V::TlsAuto as i32, V::TlSv13 as i32].contains(tls_maximum_protocol_version) {
        cx.err(
            &at(path, "tls_maximum_protocol_version"),
            "only TLS_AUTO or TLSv1_3 is supported",
        );
    }
}

#[allow(
    deprecated,
    reason = "destructuring names deprecated fields too, so that they are checked"
)]
fn http_connection_manager(
    cx: &mut Ctx<'_>,
    path: &str,
    chain_name: &str,
    h: &hcm::HttpConnectionManager,
    env: &Env<'_>,
) -> Option<(cfg::HttpConnectionManager, Option<cfg::RouteConfig>)> {
    let start = cx.error_count();
    let hcm::HttpConnectionManager {
        codec_type,
        stat_prefix,
        http_filters,
        add_user_agent,
        tracing,
        common_http_protocol_options,
        http1_safe_max_connection_duration,
        http_protocol_options,
        http2_protocol_options,
        http3_protocol_options,
        server_name,
        server_header_transformation,
        scheme_header_transformation,
        max_request_headers_kb,
        stream_idle_timeout,
        stream_flush_timeout,
        request_timeout,
        request_headers_timeout,
        drain_timeout,
        drain_timeout_jitter,
        delayed_close_timeout,
        access_log,
        access_log_flush_interval,
        flush_access_log_on_new_request,
        access_log_options,
        use_remote_address,
        xff_num_trusted_hops,
        original_ip_detection_extensions,
        early_header_mutation_extensions,
        internal_address_config,
        skip_xff_append,
        via,
        generate_request_id,
        preserve_external_request_id,
        always_set_request_id_in_response,
        forward_client_cert_details,
        set_current_client_cert_details,
        forward_client_cert_matcher,
        proxy_100_continue,
        represent_ipv4_remote_address_as_ipv4_mapped_ipv6,
        upgrade_configs,
        normalize_path,
        merge_slashes,
        path_with_escaped_slashes_action,
        request_id_extension,
        local_reply_config,
        strip_matching_host_port: _, // host matching always ignores the port (see crate docs)
        stream_error_on_invalid_http_message,
        path_normalization_options,
        strip_trailing_host_dot,
        proxy_status_config,
        typed_header_validation_config,
        append_x_forwarded_port,
        append_local_overload,
        add_proxy_protocol_connection_state,
        forward_proto_config,
        route_specifier,
        strip_port_mode: _, // as strip_matching_host_port
    } = h;
    reject_set!(
        cx,
        path,
        add_user_agent,
        tracing,
        http1_safe_max_connection_duration,
        http3_protocol_options,
        server_name,
        server_header_transformation,
        scheme_header_transformation,
        stream_idle_timeout,
        stream_flush_timeout,
        request_timeout,
        drain_timeout,
        drain_timeout_jitter,
        delayed_close_timeout,
        access_log,
        access_log_flush_interval,
        flush_access_log_on_new_request,
        access_log_options,
        xff_num_trusted_hops,
        original_ip_detection_extensions,
        early_header_mutation_extensions,
        internal_address_config,
        skip_xff_append,
        via,
        generate_request_id,
        preserve_external_request_id,
        always_set_request_id_in_response,
        forward_client_cert_details,
        set_current_client_cert_details,
        forward_client_cert_matcher,
        proxy_100_continue,
        represent_ipv4_remote_address_as_ipv4_mapped_ipv6,
        normalize_path,
        merge_slashes,
        path_with_escaped_slashes_action,
        request_id_extension,
        local_reply_config,
        stream_error_on_invalid_http_message,
        path_normalization_options,
        strip_trailing_host_dot,
        proxy_status_config,
        typed_header_validation_config,
        append_x_forwarded_port,
        append_local_overload,
        add_proxy_protocol_connection_state,
        forward_proto_config,
    );
    if *codec_type != hcm::http_connection_manager::CodecType::Auto as i32 {
        cx.err(
            &at(path, "codec_type"),
            "only AUTO is supported (HTTP/1.1 and HTTP/2 are both served)",
        );
    }
    // Empty protocol option messages change nothing; anything inside them is unsupported.
    if http_protocol_options
        .as_ref()
        .is_some_and(|o| *o != Default::default())
    {
        cx.unsupported(path, "http_protocol_options");
    }
    if http2_protocol_options
        .as_ref()
        .is_some_and(|o| *o != Default::default())
    {
        cx.unsupported(path, "http2_protocol_options");
    }

    // HTTP filters: only the router, last.
    for (i, f) in http_filters.iter().enumerate() {
        let p = idx(path, "http_filters", i);
        let hcm::HttpFilter {
            name,
            is_optional: _,
            disabled,
            config_type,
        } = f;
        let is_router = match config_type {
            Some(hcm::http_filter::ConfigType::TypedConfig(any)) => {
                if any.type_url == Router::type_url() {
                    if let Some(r) = decode_typed::<Router>(cx, &at(&p, "typed_config"), any) {
                        router(cx, &at(&p, "typed_config"), &r);
                    }
                    true
                } else {
                    cx.err(
                        &at(&p, "typed_config"),
                        format!(
                            "http filter {name:?} ({}) is not supported; only the router is",
                            any.type_url
                        ),
                    );
                    false
                }
            }
            Some(hcm::http_filter::ConfigType::ConfigDiscovery(_)) => {
                cx.unsupported(&p, "config_discovery");
                false
            }
            None if name == "envoy.filters.http.router" => true,
            None => {
                cx.err(
                    &p,
                    format!("http filter {name:?} is not supported; only the router is"),
                );
                false
            }
        };
        if is_router && i + 1 != http_filters.len() {
            cx.err(&p, "the router must be the last http filter");
        }
        if *disabled {
            cx.unsupported(&p, "disabled");
        }
    }

    for (i, u) in upgrade_configs.iter().enumerate() {
        let p = idx(path, "upgrade_configs", i);
        let hcm::http_connection_manager::UpgradeConfig {
            upgrade_type,
            filters,
            enabled,
        } = u;
        reject_set!(cx, &p, filters);
        // The proxy always passes WebSocket upgrades through; it cannot turn them off.
        if !upgrade_type.eq_ignore_ascii_case("websocket")
            || enabled.as_ref().is_some_and(|e| !e.value)
        {
            cx.err(
                &p,
                format!("only an enabled `websocket` upgrade is supported, got {upgrade_type:?}"),
            );
        }
    }

    let mut idle_timeout = Some(ONE_HOUR);
    if let Some(o) = common_http_protocol_options {
        let p = at(path, "common_http_protocol_options");
        idle_timeout = http_protocol_options_idle(cx, &p, o, Some(ONE_HOUR));
    }
    let request_headers_timeout = timeout_with_default(
        cx,
        &at(path, "request_headers_timeout"),
        request_headers_timeout,
        None,
    );
    let max_request_headers_kb = match max_request_headers_kb {
        None => DEFAULT_MAX_HEADERS_KB,
        Some(v) if (1..=MAX_MAX_HEADERS_KB).contains(&v.value) => v.value,
        Some(v) => {
            cx.err(
                &at(path, "max_request_headers_kb"),
                format!("{} is out of range 1..={MAX_MAX_HEADERS_KB}", v.value),
            );
            DEFAULT_MAX_HEADERS_KB
        }
    };

    let mut inline = None;
    let route_config_name = match route_specifier {
        Some(hcm::http_connection_manager::RouteSpecifier::Rds(hcm::Rds {
            config_source,
            route_config_name,
        })) => {
            let p = at(path, "rds");
            check_config_source(cx, &at(&p, "config_source"), config_source);
            if !env.rds_names.contains(route_config_name.as_str()) {
                cx.err(
                    &at(&p, "route_config_name"),
                    format!("route configuration {route_config_name:?} is not among the RouteConfiguration resources"),
                );
            }
            route_config_name.clone()
        }
        Some(hcm::http_connection_manager::RouteSpecifier::RouteConfig(rc)) => {
            let p = at(path, "route_config");
            let mut rc = rc.clone();
            if rc.name.is_empty() {
                rc.name = format!("{chain_name}/route_config");
            }
            let name = rc.name.clone();
            inline = super::route::route_configuration(cx, &p, &rc, env.clusters);
            name
        }
        Some(hcm::http_connection_manager::RouteSpecifier::ScopedRoutes(_)) => {
            cx.unsupported(path, "scoped_routes");
            String::new()
        }
        None => {
            cx.err(path, "rds or route_config is required");
            String::new()
        }
    };

    if cx.error_count() > start {
        return None;
    }
    Some((
        cfg::HttpConnectionManager {
            stat_prefix: stat_prefix.clone(),
            route_config_name,
            idle_timeout,
            request_headers_timeout,
            max_request_headers_kb,
            use_remote_address: use_remote_address.as_ref().is_some_and(|b| b.value),
        },
        inline,
    ))
}

#[allow(
    deprecated,
    reason = "destructuring names deprecated fields too, so that they are checked"
)]
fn router(cx: &mut Ctx<'_>, path: &str, r: &Router) {
    let Router {
        dynamic_stats: _, // stats detail only
        start_child_span,
        upstream_log,
        upstream_log_options,
        suppress_envoy_headers: _, // biplane never adds x-envoy-* headers
        strict_check_headers,
        respect_expected_rq_timeout,
        suppress_grpc_request_failure_code_stats: _, // stats detail only
        upstream_http_filters,
        reject_connect_request_early_data,
    } = r;
    reject_set!(
        cx,
        path,
        start_child_span,
        upstream_log,
        upstream_log_options,
        strict_check_headers,
        respect_expected_rq_timeout,
        upstream_http_filters,
        reject_connect_request_early_data,
    );
}

/// `core.v3.HttpProtocolOptions`: only `idle_timeout` (unset → `default`, 0 → none).
pub(super) fn http_protocol_options_idle(
    cx: &mut Ctx<'_>,
    path: &str,
    o: &core::HttpProtocolOptions,
    default: Option<Duration>,
) -> Option<Duration> {
    let core::HttpProtocolOptions {
        idle_timeout,
        max_connection_duration,
        max_connection_duration_jitter,
        max_headers_count,
        max_response_headers_kb,
        max_stream_duration,
        headers_with_underscores_action,
        max_requests_per_connection,
    } = o;
    reject_set!(
        cx,
        path,
        max_connection_duration,
        max_connection_duration_jitter,
        max_headers_count,
        max_response_headers_kb,
        max_stream_duration,
        headers_with_underscores_action,
        max_requests_per_connection,
    );
    timeout_with_default(cx, &at(path, "idle_timeout"), idle_timeout, default)
}

#[allow(
    deprecated,
    reason = "destructuring names deprecated fields too, so that they are checked"
)]
fn tcp_proxy(
    cx: &mut Ctx<'_>,
    path: &str,
    t: &tcp::TcpProxy,
    env: &Env<'_>,
) -> Option<cfg::TcpProxy> {
    let start = cx.error_count();
    let tcp::TcpProxy {
        stat_prefix,
        on_demand,
        metadata_match,
        idle_timeout,
        downstream_idle_timeout,
        upstream_idle_timeout,
        access_log,
        max_connect_attempts,
        backoff_options,
        hash_policy,
        tunneling_config,
        max_downstream_connection_duration,
        max_downstream_connection_duration_jitter_percentage,
        access_log_flush_interval,
        flush_access_log_on_connected,
        access_log_options,
        proxy_protocol_tlvs,
        proxy_protocol_tlv_merge_policy,
        upstream_connect_mode,
        max_early_data_bytes,
        check_drain_close,
        cluster_specifier,
    } = t;
    reject_set!(
        cx,
        path,
        on_demand,
        metadata_match,
        downstream_idle_timeout,
        upstream_idle_timeout,
        access_log,
        backoff_options,
        hash_policy,
        tunneling_config,
        max_downstream_connection_duration,
        max_downstream_connection_duration_jitter_percentage,
        access_log_flush_interval,
        flush_access_log_on_connected,
        access_log_options,
        proxy_protocol_tlvs,
        proxy_protocol_tlv_merge_policy,
        upstream_connect_mode,
        max_early_data_bytes,
        check_drain_close,
    );
    // One connect attempt is what the proxy does; Envoy's default is also 1.
    if max_connect_attempts.as_ref().is_some_and(|v| v.value != 1) {
        cx.err(&at(path, "max_connect_attempts"), "only 1 is supported");
    }
    let idle_timeout =
        timeout_with_default(cx, &at(path, "idle_timeout"), idle_timeout, Some(ONE_HOUR));
    let mut clusters = Vec::new();
    match cluster_specifier {
        Some(tcp::tcp_proxy::ClusterSpecifier::Cluster(c)) => {
            check_cluster_ref(cx, &at(path, "cluster"), c, env);
            clusters.push(cfg::WeightedCluster {
                name: c.clone(),
                weight: 1,
            });
        }
        Some(tcp::tcp_proxy::ClusterSpecifier::WeightedClusters(w)) => {
            let p = at(path, "weighted_clusters");
            let tcp::tcp_proxy::WeightedCluster { clusters: list } = w;
            for (i, cw) in list.iter().enumerate() {
                let cp = idx(&p, "clusters", i);
                let tcp::tcp_proxy::weighted_cluster::ClusterWeight {
                    name,
                    weight,
                    metadata_match,
                } = cw;
                reject_set!(cx, &cp, metadata_match);
                check_cluster_ref(cx, &at(&cp, "name"), name, env);
                clusters.push(cfg::WeightedCluster {
                    name: name.clone(),
                    weight: *weight,
                });
            }
            if clusters.iter().map(|c| u64::from(c.weight)).sum::<u64>() == 0 {
                cx.err(&at(&p, "clusters"), "weights must sum to more than 0");
            }
        }
        None => cx.err(path, "cluster or weighted_clusters is required"),
    }
    if cx.error_count() > start {
        return None;
    }
    Some(cfg::TcpProxy {
        stat_prefix: stat_prefix.clone(),
        clusters,
        idle_timeout,
    })
}

fn check_cluster_ref(cx: &mut Ctx<'_>, path: &str, name: &str, env: &Env<'_>) {
    if !env.clusters.contains(name) {
        cx.err(
            path,
            format!("cluster {name:?} is not among the Cluster resources"),
        );
    }
}
