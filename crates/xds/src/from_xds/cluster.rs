//! Cluster + ClusterLoadAssignment → `biplane_config::Cluster` (type, load balancer,
//! upstream protocol, endpoints), and Secret / TlsCertificate → `biplane_config::Certificate`.

use std::collections::HashMap;
use std::time::Duration;

use biplane_config as cfg;
use envoy_types::pb::envoy::config::cluster::v3 as cv3;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::endpoint::v3 as ev3;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tls;
use envoy_types::pb::envoy::extensions::upstreams::http::v3 as uhttp;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::listener::{http_protocol_options_idle, socket_address};
use super::route::data_source_string;
use crate::HTTP_PROTOCOL_OPTIONS_KEY;

use super::{Ctx, at, check_config_source, decode_typed, idx, reject_set};

/// Envoy's default `connect_timeout`.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Envoy's default upstream idle timeout (`common_http_protocol_options.idle_timeout`).
const DEFAULT_UPSTREAM_IDLE: Duration = Duration::from_secs(3600);

#[allow(
    deprecated,
    reason = "destructuring names deprecated fields too, so that they are checked"
)]
pub(super) fn cluster(
    cx: &mut Ctx<'_>,
    c: &cv3::Cluster,
    assignments: &HashMap<String, Vec<cfg::Endpoint>>,
) -> Option<cfg::Cluster> {
    use cv3::cluster::{
        ClusterDiscoveryType as T, DiscoveryType as D, LbConfig as L, LbPolicy as P,
    };
    let start = cx.error_count();
    let cv3::Cluster {
        transport_socket_matches,
        transport_socket_matcher,
        name,
        alt_stat_name: _, // stats naming only
        stats_matcher,
        eds_cluster_config,
        connect_timeout,
        per_connection_buffer_limit_bytes,
        per_connection_buffer_high_watermark_timeout,
        lb_policy,
        load_assignment,
        health_checks,
        max_requests_per_connection,
        circuit_breakers,
        upstream_http_protocol_options,
        common_http_protocol_options,
        http_protocol_options,
        http2_protocol_options,
        typed_extension_protocol_options,
        dns_refresh_rate,
        dns_jitter,
        dns_failure_refresh_rate,
        respect_dns_ttl,
        dns_lookup_family: _, // only meaningful for DNS cluster types, which are rejected
        dns_resolvers,
        use_tcp_for_dns_lookups,
        dns_resolution_config,
        typed_dns_resolver_config,
        wait_for_warm_on_init,
        outlier_detection,
        cleanup_interval,
        upstream_bind_config,
        lb_subset_config,
        common_lb_config,
        transport_socket,
        metadata: _, // opaque
        protocol_selection,
        upstream_connection_options,
        close_connections_on_host_health_failure,
        ignore_health_on_host_removal,
        filters,
        load_balancing_policy,
        lrs_server,
        lrs_report_endpoint_metrics,
        track_timeout_budgets,
        upstream_config,
        track_cluster_stats,
        preconnect_policy,
        connection_pool_per_downstream_connection,
        queuing_policies,
        cluster_discovery_type,
        lb_config,
    } = c;
    reject_set!(
        cx,
        "",
        transport_socket_matches,
        transport_socket_matcher,
        stats_matcher,
        per_connection_buffer_limit_bytes,
        per_connection_buffer_high_watermark_timeout,
        health_checks,
        max_requests_per_connection,
        circuit_breakers,
        upstream_http_protocol_options,
        dns_refresh_rate,
        dns_jitter,
        dns_failure_refresh_rate,
        respect_dns_ttl,
        dns_resolvers,
        use_tcp_for_dns_lookups,
        dns_resolution_config,
        typed_dns_resolver_config,
        wait_for_warm_on_init,
        outlier_detection,
        cleanup_interval,
        upstream_bind_config,
        lb_subset_config,
        common_lb_config,
        transport_socket,
        protocol_selection,
        upstream_connection_options,
        close_connections_on_host_health_failure,
        ignore_health_on_host_removal,
        filters,
        load_balancing_policy,
        lrs_server,
        lrs_report_endpoint_metrics,
        track_timeout_budgets,
        upstream_config,
        track_cluster_stats,
        preconnect_policy,
        connection_pool_per_downstream_connection,
        queuing_policies,
    );

    // Discovery type: EDS or STATIC (the proto default).
    let kind = match cluster_discovery_type {
        None => Ok(D::Static),
        Some(T::Type(t)) => D::try_from(*t).map_err(|_| format!("unknown type {t}")),
        Some(T::ClusterType(ct)) => Err(format!("custom cluster type {:?}", ct.name)),
    };
    let endpoints = match kind {
        Ok(D::Eds) => {
            if load_assignment.is_some() {
                cx.err(
                    "load_assignment",
                    "must be unset for an EDS cluster (endpoints come from EDS)",
                );
            }
            let service = match eds_cluster_config {
                Some(cv3::cluster::EdsClusterConfig {
                    eds_config,
                    service_name,
                }) => {
                    check_config_source(cx, "eds_cluster_config.eds_config", eds_config);
                    if service_name.is_empty() {
                        name
                    } else {
                        service_name
                    }
                }
                None => name,
            };
            match assignments.get(service) {
                Some(eps) => Some(eps.clone()),
                None => {
                    cx.err(
                        "eds_cluster_config",
                        format!(
                            "EDS cluster needs a ClusterLoadAssignment named {service:?}, and there is none \
                             (Envoy would keep the cluster warming forever)"
                        ),
                    );
                    None
                }
            }
        }
        Ok(D::Static) => {
            reject_set!(cx, "", eds_cluster_config);
            match load_assignment {
                Some(la) => self::load_assignment(cx, "load_assignment", la),
                None => Some(Vec::new()),
            }
        }
        Ok(other) => {
            cx.err(
                "type",
                format!("{} is not supported (EDS or STATIC)", other.as_str_name()),
            );
            None
        }
        Err(e) => {
            cx.err("type", format!("{e} is not supported (EDS or STATIC)"));
            None
        }
    };

    let connect_timeout = match super::duration(cx, "connect_timeout", connect_timeout) {
        None if connect_timeout.is_none() => DEFAULT_CONNECT_TIMEOUT,
        None => DEFAULT_CONNECT_TIMEOUT, // error already recorded
        Some(d) if d.is_zero() => {
            cx.err("connect_timeout", "must be greater than 0");
            DEFAULT_CONNECT_TIMEOUT
        }
        Some(d) => d,
    };

    let lb = match (P::try_from(*lb_policy), lb_config) {
        (Ok(P::RoundRobin), None) => Some(cfg::LbPolicy::RoundRobin),
        (
            Ok(P::RoundRobin),
            Some(L::RoundRobinLbConfig(cv3::cluster::RoundRobinLbConfig { slow_start_config })),
        ) => {
            reject_set!(cx, "round_robin_lb_config", slow_start_config);
            Some(cfg::LbPolicy::RoundRobin)
        }
        (Ok(P::LeastRequest), None) => Some(cfg::LbPolicy::LeastRequest),
        (Ok(P::LeastRequest), Some(L::LeastRequestLbConfig(lr))) => {
            let cv3::cluster::LeastRequestLbConfig {
                choice_count,
                active_request_bias,
                slow_start_config,
            } = lr;
            reject_set!(
                cx,
                "least_request_lb_config",
                active_request_bias,
                slow_start_config
            );
            // The proxy does power-of-two-choices, Envoy's default.
            if choice_count.as_ref().is_some_and(|c| c.value != 2) {
                cx.err(
                    "least_request_lb_config.choice_count",
                    "only 2 is supported",
                );
            }
            Some(cfg::LbPolicy::LeastRequest)
        }
        (Ok(P::Random), None) => Some(cfg::LbPolicy::Random),
        (Ok(P::RingHash), None) => Some(cfg::LbPolicy::RingHash {
            minimum_ring_size: 1024,
            maximum_ring_size: 8 * 1024 * 1024,
        }),
        (Ok(P::RingHash), Some(L::RingHashLbConfig(rh))) => {
            let cv3::cluster::RingHashLbConfig {
                minimum_ring_size,
                hash_function,
                maximum_ring_size,
            } = rh;
            if *hash_function != cv3::cluster::ring_hash_lb_config::HashFunction::XxHash as i32 {
                cx.err(
                    "ring_hash_lb_config.hash_function",
                    "only XX_HASH is supported",
                );
            }
            let min = minimum_ring_size.as_ref().map_or(1024, |v| v.value);
            let max = maximum_ring_size
                .as_ref()
                .map_or(8 * 1024 * 1024, |v| v.value);
            if min == 0 || min > max || max > 8 * 1024 * 1024 {
                cx.err(
                    "ring_hash_lb_config",
                    format!(
                        "need 0 < minimum_ring_size ({min}) <= maximum_ring_size ({max}) <= 8M"
                    ),
                );
            }
            Some(cfg::LbPolicy::RingHash {
                minimum_ring_size: min,
                maximum_ring_size: max,
            })
        }
        (Ok(P::Maglev), None) => Some(cfg::LbPolicy::Maglev { table_size: 65537 }),
        (Ok(P::Maglev), Some(L::MaglevLbConfig(cv3::cluster::MaglevLbConfig { table_size }))) => {
            let size = table_size.as_ref().map_or(65537, |v| v.value);
            if !is_prime(size) || size > 5_000_011 {
                cx.err(
                    "maglev_lb_config.table_size",
                    format!("{size} must be a prime number <= 5000011"),
                );
            }
            Some(cfg::LbPolicy::Maglev { table_size: size })
        }
        (Ok(p), Some(_))
            if matches!(
                p,
                P::RoundRobin | P::LeastRequest | P::Random | P::RingHash | P::Maglev
            ) =>
        {
            cx.err(
                "lb_config",
                format!("does not match lb_policy {}", p.as_str_name()),
            );
            None
        }
        (Ok(p), _) => {
            cx.err(
                "lb_policy",
                format!(
                    "{} is not supported (ROUND_ROBIN, LEAST_REQUEST, RANDOM, RING_HASH, MAGLEV)",
                    p.as_str_name()
                ),
            );
            None
        }
        (Err(_), _) => {
            cx.err("lb_policy", format!("unknown value {lb_policy}"));
            None
        }
    };

    // Upstream protocol and idle timeout.
    let mut protocol = cfg::UpstreamProtocol::Http1;
    let mut idle_timeout = Some(DEFAULT_UPSTREAM_IDLE);
    let mut legacy = false;
    if let Some(o) = http2_protocol_options {
        legacy = true;
        if *o != Default::default() {
            cx.err(
                "http2_protocol_options",
                "only an empty message (enable HTTP/2) is supported",
            );
        }
        protocol = cfg::UpstreamProtocol::Http2;
    }
    if let Some(o) = http_protocol_options {
        legacy = true;
        if *o != Default::default() {
            cx.err(
                "http_protocol_options",
                "only an empty message is supported",
            );
        }
        if http2_protocol_options.is_some() {
            cx.err(
                "http_protocol_options",
                "mutually exclusive with http2_protocol_options",
            );
        }
    }
    if let Some(o) = common_http_protocol_options {
        legacy = true;
        idle_timeout = http_protocol_options_idle(
            cx,
            "common_http_protocol_options",
            o,
            Some(DEFAULT_UPSTREAM_IDLE),
        );
    }
    for (key, any) in typed_extension_protocol_options {
        let p = format!("typed_extension_protocol_options[{key:?}]");
        if key != HTTP_PROTOCOL_OPTIONS_KEY {
            cx.err(
                &p,
                "not supported (only envoy.extensions.upstreams.http.v3.HttpProtocolOptions)",
            );
            continue;
        }
        if legacy {
            cx.err(
                &p,
                "mutually exclusive with the deprecated cluster-level protocol options",
            );
        }
        if let Some(o) = decode_typed::<uhttp::HttpProtocolOptions>(cx, &p, any)
            && let Some((proto, idle)) = upstream_http_options(cx, &p, &o)
        {
            protocol = proto;
            idle_timeout = idle;
        }
    }

    if cx.error_count() > start {
        return None;
    }
    Some(cfg::Cluster {
        name: name.clone(),
        connect_timeout,
        lb_policy: lb?,
        endpoints: endpoints?,
        protocol,
        idle_timeout,
    })
}

fn upstream_http_options(
    cx: &mut Ctx<'_>,
    path: &str,
    o: &uhttp::HttpProtocolOptions,
) -> Option<(cfg::UpstreamProtocol, Option<Duration>)> {
    use uhttp::http_protocol_options::{
        ExplicitHttpConfig, UpstreamProtocolOptions as U,
        explicit_http_config::ProtocolConfig as PC,
    };
    let uhttp::HttpProtocolOptions {
        common_http_protocol_options,
        upstream_http_protocol_options,
        http_filters,
        header_validation_config,
        outlier_detection,
        request_mirror_policies,
        hash_policy,
        retry_policy,
        upstream_protocol_options,
    } = o;
    reject_set!(
        cx,
        path,
        upstream_http_protocol_options,
        http_filters,
        header_validation_config,
        outlier_detection,
        request_mirror_policies,
        hash_policy,
        retry_policy,
    );
    let idle = match common_http_protocol_options {
        Some(c) => http_protocol_options_idle(
            cx,
            &at(path, "common_http_protocol_options"),
            c,
            Some(DEFAULT_UPSTREAM_IDLE),
        ),
        None => Some(DEFAULT_UPSTREAM_IDLE),
    };
    let p = at(path, "explicit_http_config");
    let proto = match upstream_protocol_options {
        None => cfg::UpstreamProtocol::Http1,
        Some(U::ExplicitHttpConfig(ExplicitHttpConfig { protocol_config })) => {
            match protocol_config {
                Some(PC::HttpProtocolOptions(h1)) => {
                    if *h1 != Default::default() {
                        cx.err(
                            &at(&p, "http_protocol_options"),
                            "only an empty message is supported",
                        );
                    }
                    cfg::UpstreamProtocol::Http1
                }
                Some(PC::Http2ProtocolOptions(h2)) => {
                    if *h2 != Default::default() {
                        cx.err(
                            &at(&p, "http2_protocol_options"),
                            "only an empty message is supported",
                        );
                    }
                    cfg::UpstreamProtocol::Http2
                }
                Some(PC::Http3ProtocolOptions(_)) => {
                    cx.unsupported(&p, "http3_protocol_options");
                    return None;
                }
                None => {
                    cx.err(&p, "a protocol is required");
                    return None;
                }
            }
        }
        Some(U::UseDownstreamProtocolConfig(_)) => {
            cx.unsupported(path, "use_downstream_protocol_config");
            return None;
        }
        Some(U::AutoConfig(_)) => {
            cx.unsupported(path, "auto_config");
            return None;
        }
    };
    Some((proto, idle))
}

fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

/// The endpoints of a load assignment. Endpoints whose health status says Envoy would
/// not send them traffic (UNHEALTHY, DRAINING, TIMEOUT, DEGRADED) are left out.
pub(super) fn load_assignment(
    cx: &mut Ctx<'_>,
    path: &str,
    cla: &ev3::ClusterLoadAssignment,
) -> Option<Vec<cfg::Endpoint>> {
    let start = cx.error_count();
    let ev3::ClusterLoadAssignment {
        cluster_name: _,
        endpoints,
        named_endpoints,
        policy,
    } = cla;
    reject_set!(cx, path, named_endpoints);
    if let Some(ev3::cluster_load_assignment::Policy {
        drop_overloads,
        overprovisioning_factor: _, // spill-over between priorities; only priority 0 exists here
        endpoint_stale_after,
        weighted_priority_health,
    }) = policy
    {
        reject_set!(
            cx,
            &at(path, "policy"),
            drop_overloads,
            endpoint_stale_after,
            weighted_priority_health
        );
    }
    let mut out = Vec::new();
    for (i, loc) in endpoints.iter().enumerate() {
        let lp = idx(path, "endpoints", i);
        let ev3::LocalityLbEndpoints {
            locality: _, // labels only
            metadata: _, // opaque
            lb_endpoints,
            load_balancing_weight,
            priority,
            proximity,
            lb_config,
        } = loc;
        reject_set!(
            cx,
            &lp,
            load_balancing_weight,
            priority,
            proximity,
            lb_config
        );
        for (j, lbe) in lb_endpoints.iter().enumerate() {
            let ep = idx(&lp, "lb_endpoints", j);
            let ev3::LbEndpoint {
                health_status,
                metadata: _,
                load_balancing_weight,
                host_identifier,
            } = lbe;
            let weight = match load_balancing_weight {
                None => 1,
                Some(w) if w.value >= 1 => w.value,
                Some(_) => {
                    cx.err(&at(&ep, "load_balancing_weight"), "must be >= 1");
                    1
                }
            };
            let address = match host_identifier {
                Some(ev3::lb_endpoint::HostIdentifier::Endpoint(e)) => {
                    let ev3::Endpoint {
                        address,
                        health_check_config,
                        hostname: _, // display name
                        additional_addresses,
                        observability_name: _, // display name
                    } = e;
                    let p = at(&ep, "endpoint");
                    reject_set!(cx, &p, health_check_config, additional_addresses);
                    socket_address(cx, &at(&p, "address"), address)
                }
                Some(ev3::lb_endpoint::HostIdentifier::EndpointName(_)) => {
                    cx.unsupported(&ep, "endpoint_name");
                    None
                }
                None => {
                    cx.err(&at(&ep, "endpoint"), "required");
                    None
                }
            };
            use core::HealthStatus as H;
            let serving = match H::try_from(*health_status) {
                Ok(H::Unknown | H::Healthy) => true,
                Ok(_) => false,
                Err(_) => {
                    cx.err(
                        &at(&ep, "health_status"),
                        format!("unknown value {health_status}"),
                    );
                    false
                }
            };
            if let (Some(address), true) = (address, serving) {
                out.push(cfg::Endpoint { address, weight });
            }
        }
    }
    if cx.error_count() > start {
        return None;
    }
    Some(out)
}

pub(super) fn secret(cx: &mut Ctx<'_>, s: &tls::Secret) -> Option<cfg::Certificate> {
    let tls::Secret { name, r#type } = s;
    match r#type {
        Some(tls::secret::Type::TlsCertificate(c)) => {
            tls_certificate(cx, "tls_certificate", name, c)
        }
        Some(_) => {
            cx.err("type", "only tls_certificate secrets are supported");
            None
        }
        None => {
            cx.err("tls_certificate", "required");
            None
        }
    }
}

/// An inline certificate chain and private key, both checked to parse as PEM.
pub(super) fn tls_certificate(
    cx: &mut Ctx<'_>,
    path: &str,
    name: &str,
    c: &tls::TlsCertificate,
) -> Option<cfg::Certificate> {
    let start = cx.error_count();
    let tls::TlsCertificate {
        certificate_chain,
        private_key,
        pkcs12,
        watched_directory,
        private_key_provider,
        password,
        ocsp_staple,
        signed_certificate_timestamp,
        tls_params,
    } = c;
    reject_set!(
        cx,
        path,
        pkcs12,
        watched_directory,
        private_key_provider,
        password,
        ocsp_staple,
        signed_certificate_timestamp,
        tls_params,
    );
    let chain = match certificate_chain {
        Some(ds) => data_source_string(cx, &at(path, "certificate_chain"), ds),
        None => {
            cx.err(&at(path, "certificate_chain"), "required");
            None
        }
    };
    let key = match private_key {
        Some(ds) => data_source_string(cx, &at(path, "private_key"), ds),
        None => {
            cx.err(&at(path, "private_key"), "required");
            None
        }
    };
    if let Some(chain) = &chain {
        let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(chain.as_bytes()).collect();
        match certs {
            Ok(c) if !c.is_empty() => {}
            Ok(_) => cx.err(&at(path, "certificate_chain"), "no PEM certificate found"),
            Err(e) => cx.err(&at(path, "certificate_chain"), format!("invalid PEM: {e}")),
        }
    }
    if let Some(key) = &key
        && let Err(e) = PrivateKeyDer::from_pem_slice(key.as_bytes())
    {
        // Never echo key material: only the parser's message.
        cx.err(
            &at(path, "private_key"),
            format!("invalid PEM private key: {e}"),
        );
    }
    if cx.error_count() > start {
        return None;
    }
    Some(cfg::Certificate {
        name: name.to_owned(),
        cert_chain_pem: chain?,
        private_key_pem: key?,
    })
}
