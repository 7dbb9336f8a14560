//! RouteConfiguration → `biplane_config::RouteConfig`: virtual hosts, route matches
//! (paths, headers, query parameters, method), actions (forward, redirect, direct
//! response) and header mutations. Regexes are compiled here, anchored for a full match.

use std::collections::HashSet;
use std::time::Duration;

use biplane_config as cfg;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::route::v3 as rv3;
use envoy_types::pb::envoy::r#type::matcher::v3 as matcher;

use super::{
    Ctx, at, duration, full_match_regex, idx, reject_set, search_regex, timeout_with_default,
};

/// Envoy's default route timeout when `timeout` is unset.
const DEFAULT_ROUTE_TIMEOUT: Duration = Duration::from_secs(15);
/// Envoy's default `max_direct_response_body_size_bytes`.
const DEFAULT_MAX_DIRECT_BODY: u32 = 4096;

pub(super) fn route_configuration(
    cx: &mut Ctx<'_>,
    path: &str,
    rc: &rv3::RouteConfiguration,
    clusters: &HashSet<&str>,
) -> Option<cfg::RouteConfig> {
    let start = cx.error_count();
    let rv3::RouteConfiguration {
        name,
        virtual_hosts,
        vhds,
        internal_only_headers,
        response_headers_to_add,
        response_headers_to_remove,
        request_headers_to_add,
        request_headers_to_remove,
        most_specific_header_mutations_wins,
        validate_clusters: _, // biplane always validates cluster references
        max_direct_response_body_size_bytes,
        cluster_specifier_plugins,
        request_mirror_policies,
        ignore_port_in_host_matching: _, // host matching always ignores the port (see crate docs)
        vhost_header,
        ignore_path_parameters_in_path_matching,
        typed_per_filter_config,
        metadata: _, // opaque
        route_specifiers,
    } = rc;
    reject_set!(
        cx,
        path,
        vhds,
        internal_only_headers,
        response_headers_to_add,
        response_headers_to_remove,
        request_headers_to_add,
        request_headers_to_remove,
        most_specific_header_mutations_wins,
        cluster_specifier_plugins,
        request_mirror_policies,
        vhost_header,
        ignore_path_parameters_in_path_matching,
        typed_per_filter_config,
        route_specifiers,
    );
    let max_body = max_direct_response_body_size_bytes
        .as_ref()
        .map_or(DEFAULT_MAX_DIRECT_BODY, |v| v.value);
    let mut domains_seen = HashSet::new();
    let mut vhosts = Vec::new();
    for (i, vh) in virtual_hosts.iter().enumerate() {
        let p = idx(path, "virtual_hosts", i);
        if let Some(vh) = virtual_host(cx, &p, vh, clusters, max_body) {
            for (j, d) in vh.domains.iter().enumerate() {
                if !domains_seen.insert(d.clone()) {
                    cx.err(
                        &idx(&p, "domains", j),
                        format!("domain {d:?} appears in more than one virtual host"),
                    );
                }
            }
            vhosts.push(vh);
        }
    }
    if cx.error_count() > start {
        return None;
    }
    Some(cfg::RouteConfig {
        name: name.clone(),
        virtual_hosts: vhosts,
    })
}

#[allow(
    deprecated,
    reason = "destructuring names deprecated fields too, so that they are checked"
)]
fn virtual_host(
    cx: &mut Ctx<'_>,
    path: &str,
    vh: &rv3::VirtualHost,
    clusters: &HashSet<&str>,
    max_body: u32,
) -> Option<cfg::VirtualHost> {
    let start = cx.error_count();
    let rv3::VirtualHost {
        name,
        domains,
        routes,
        matcher,
        require_tls,
        virtual_clusters,
        rate_limits,
        request_headers_to_add,
        request_headers_to_remove,
        response_headers_to_add,
        response_headers_to_remove,
        cors,
        typed_per_filter_config,
        include_request_attempt_count,
        include_attempt_count_in_response,
        retry_policy,
        retry_policy_typed_config,
        hedge_policy,
        include_is_timeout_retry_header,
        per_request_buffer_limit_bytes,
        request_body_buffer_limit,
        request_mirror_policies,
        metadata: _, // opaque
        route_specifiers,
    } = vh;
    reject_set!(
        cx,
        path,
        matcher,
        require_tls,
        virtual_clusters,
        rate_limits,
        request_headers_to_add,
        request_headers_to_remove,
        response_headers_to_add,
        response_headers_to_remove,
        cors,
        typed_per_filter_config,
        include_request_attempt_count,
        include_attempt_count_in_response,
        retry_policy,
        retry_policy_typed_config,
        hedge_policy,
        include_is_timeout_retry_header,
        per_request_buffer_limit_bytes,
        request_body_buffer_limit,
        request_mirror_policies,
        route_specifiers,
    );
    if domains.is_empty() {
        cx.err(&at(path, "domains"), "at least one domain is required");
    }
    let mut out_domains = Vec::new();
    for (i, d) in domains.iter().enumerate() {
        let d = d.to_ascii_lowercase();
        let stars = d.matches('*').count();
        let ok = !d.is_empty()
            && !d.contains(':')
            && (stars == 0 || d == "*" || (stars == 1 && (d.starts_with('*') || d.ends_with('*'))));
        if !ok {
            cx.err(
                &idx(path, "domains", i),
                format!("{d:?}: a domain is a host name (no port), `*`, or has one leading or trailing `*`"),
            );
        }
        out_domains.push(d);
    }
    let mut out_routes = Vec::new();
    for (i, r) in routes.iter().enumerate() {
        let p = idx(path, "routes", i);
        if let Some(r) = route(cx, &p, r, name, i, clusters, max_body) {
            out_routes.push(r);
        }
    }
    if cx.error_count() > start {
        return None;
    }
    Some(cfg::VirtualHost {
        name: name.clone(),
        domains: out_domains,
        routes: out_routes,
    })
}

#[allow(
    deprecated,
    reason = "destructuring names deprecated fields too, so that they are checked"
)]
fn route(
    cx: &mut Ctx<'_>,
    path: &str,
    r: &rv3::Route,
    vhost: &str,
    index: usize,
    clusters: &HashSet<&str>,
    max_body: u32,
) -> Option<cfg::Route> {
    let start = cx.error_count();
    let rv3::Route {
        name,
        r#match,
        metadata: _, // opaque
        decorator,
        typed_per_filter_config,
        request_headers_to_add,
        request_headers_to_remove,
        response_headers_to_add,
        response_headers_to_remove,
        tracing,
        per_request_buffer_limit_bytes,
        stat_prefix: _, // stats naming only
        request_body_buffer_limit,
        route_specifiers,
        action,
    } = r;
    reject_set!(
        cx,
        path,
        decorator,
        typed_per_filter_config,
        tracing,
        per_request_buffer_limit_bytes,
        request_body_buffer_limit,
        route_specifiers,
    );
    let mp = at(path, "match");
    let matcher = match r#match {
        Some(m) => route_match(cx, &mp, m),
        None => {
            cx.err(&mp, "required");
            None
        }
    };
    let request_headers = header_mutation(
        cx,
        path,
        request_headers_to_add,
        request_headers_to_remove,
        "request_headers_to_add",
        "request_headers_to_remove",
    );
    let response_headers = header_mutation(
        cx,
        path,
        response_headers_to_add,
        response_headers_to_remove,
        "response_headers_to_add",
        "response_headers_to_remove",
    );
    let action = match action {
        Some(rv3::route::Action::Route(ra)) => {
            route_action(cx, &at(path, "route"), ra, matcher.as_ref(), clusters)
                .map(cfg::RouteAction::Forward)
        }
        Some(rv3::route::Action::Redirect(ra)) => {
            redirect(cx, &at(path, "redirect"), ra, matcher.as_ref())
                .map(cfg::RouteAction::Redirect)
        }
        Some(rv3::route::Action::DirectResponse(d)) => {
            direct_response(cx, &at(path, "direct_response"), d, max_body)
        }
        Some(rv3::route::Action::FilterAction(_)) => {
            cx.unsupported(path, "filter_action");
            None
        }
        Some(rv3::route::Action::NonForwardingAction(_)) => {
            cx.unsupported(path, "non_forwarding_action");
            None
        }
        None => {
            cx.err(
                path,
                "an action (route, redirect or direct_response) is required",
            );
            None
        }
    };
    if cx.error_count() > start {
        return None;
    }
    let name = if name.is_empty() {
        format!("{vhost}/{index}")
    } else {
        name.clone()
    };
    Some(cfg::Route {
        name,
        matcher: matcher?,
        request_headers,
        response_headers,
        action: action?,
    })
}

/// What the path part of an Envoy match became (rewrites depend on it).
fn route_match(cx: &mut Ctx<'_>, path: &str, m: &rv3::RouteMatch) -> Option<cfg::RouteMatch> {
    use rv3::route_match::PathSpecifier as P;
    let rv3::RouteMatch {
        case_sensitive,
        runtime_fraction,
        headers,
        query_parameters,
        cookies,
        grpc,
        tls_context,
        dynamic_metadata,
        filter_state,
        path_specifier,
    } = m;
    reject_set!(
        cx,
        path,
        runtime_fraction,
        cookies,
        grpc,
        tls_context,
        dynamic_metadata,
        filter_state
    );
    if case_sensitive.as_ref().is_some_and(|b| !b.value) {
        cx.err(
            &at(path, "case_sensitive"),
            "case-insensitive path matching is not supported",
        );
    }
    let p = match path_specifier {
        Some(P::Prefix(p)) => {
            check_path(cx, &at(path, "prefix"), p);
            // Envoy's `prefix` is a plain string prefix. The config's Prefix is a
            // segment-boundary prefix; they agree for "/" and for prefixes ending in "/".
            if p.is_empty() || p.ends_with('/') {
                Some(cfg::PathMatch::Prefix(if p.is_empty() {
                    "/".to_owned()
                } else {
                    p.clone()
                }))
            } else {
                let pattern = format!("{}.*", regex::escape(p));
                full_match_regex(cx, &at(path, "prefix"), &format!("(?s){pattern}"), false)
                    .map(cfg::PathMatch::Regex)
            }
        }
        Some(P::PathSeparatedPrefix(p)) => {
            check_path(cx, &at(path, "path_separated_prefix"), p);
            if p.len() > 1 && p.ends_with('/') {
                cx.err(&at(path, "path_separated_prefix"), "must not end with `/`");
            }
            Some(cfg::PathMatch::Prefix(p.clone()))
        }
        Some(P::Path(p)) => {
            check_path(cx, &at(path, "path"), p);
            Some(cfg::PathMatch::Exact(p.clone()))
        }
        Some(P::SafeRegex(re)) => {
            regex_matcher(cx, &at(path, "safe_regex"), re, false).map(cfg::PathMatch::Regex)
        }
        Some(P::ConnectMatcher(_)) => {
            cx.unsupported(path, "connect_matcher");
            None
        }
        Some(P::PathMatchPolicy(_)) => {
            cx.unsupported(path, "path_match_policy");
            None
        }
        None => {
            cx.err(
                path,
                "a path specifier (prefix, path, safe_regex or path_separated_prefix) is required",
            );
            None
        }
    };
    let mut out = cfg::RouteMatch {
        path: p.unwrap_or_default(),
        ..Default::default()
    };
    for (i, h) in headers.iter().enumerate() {
        let hp = idx(path, "headers", i);
        if let Some(hm) = header_matcher(cx, &hp, h) {
            if hm.name == ":method" {
                match (&hm.value, hm.invert, &out.method) {
                    (cfg::StringMatch::Exact(m), false, None) => {
                        out.method = Some(m.to_ascii_uppercase())
                    }
                    _ => cx.err(&hp, "`:method` supports one exact, non-inverted match"),
                }
            } else if hm.name.starts_with(':') {
                cx.err(
                    &at(&hp, "name"),
                    format!("matching on pseudo-header {:?} is not supported", hm.name),
                );
            } else {
                out.headers.push(hm);
            }
        }
    }
    for (i, q) in query_parameters.iter().enumerate() {
        let qp = idx(path, "query_parameters", i);
        let rv3::QueryParameterMatcher {
            name,
            query_parameter_match_specifier,
        } = q;
        use rv3::query_parameter_matcher::QueryParameterMatchSpecifier as Q;
        if name.is_empty() {
            cx.err(&at(&qp, "name"), "must not be empty");
        }
        let value = match query_parameter_match_specifier {
            Some(Q::StringMatch(sm)) => string_matcher(cx, &at(&qp, "string_match"), sm),
            Some(Q::PresentMatch(true)) => Some(cfg::StringMatch::Present),
            Some(Q::PresentMatch(false)) => {
                cx.err(
                    &at(&qp, "present_match"),
                    "`false` (parameter absent) is not supported",
                );
                None
            }
            None => {
                cx.err(&qp, "string_match or present_match is required");
                None
            }
        };
        if let Some(value) = value {
            out.query_params.push(cfg::QueryParamMatch {
                name: name.clone(),
                value,
            });
        }
    }
    Some(out)
}

fn check_path(cx: &mut Ctx<'_>, path: &str, p: &str) {
    if !p.is_empty() && !p.starts_with('/') {
        cx.err(path, format!("{p:?} must start with `/`"));
    }
    if p.contains('?') || p.contains('#') {
        cx.err(path, format!("{p:?} must not contain `?` or `#`"));
    }
}

#[allow(
    deprecated,
    reason = "the deprecated header match forms are still accepted, as Envoy does"
)]
fn header_matcher(
    cx: &mut Ctx<'_>,
    path: &str,
    h: &rv3::HeaderMatcher,
) -> Option<cfg::HeaderMatch> {
    use rv3::header_matcher::HeaderMatchSpecifier as H;
    let rv3::HeaderMatcher {
        name,
        invert_match,
        treat_missing_header_as_empty,
        header_match_specifier,
    } = h;
    reject_set!(cx, path, treat_missing_header_as_empty);
    let name = name.to_ascii_lowercase();
    if name.is_empty() || !name.bytes().all(|b| b == b':' || is_token_byte(b)) {
        cx.err(&at(path, "name"), format!("{name:?} is not a header name"));
    }
    let mut invert = *invert_match;
    let value = match header_match_specifier {
        None => Some(cfg::StringMatch::Present),
        Some(H::PresentMatch(present)) => {
            if !present {
                invert = !invert;
            }
            Some(cfg::StringMatch::Present)
        }
        Some(H::StringMatch(sm)) => string_matcher(cx, &at(path, "string_match"), sm),
        Some(H::ExactMatch(v)) => Some(cfg::StringMatch::Exact(v.clone())),
        Some(H::PrefixMatch(v)) => Some(cfg::StringMatch::Prefix(v.clone())),
        Some(H::SafeRegexMatch(re)) => {
            regex_matcher(cx, &at(path, "safe_regex_match"), re, false).map(cfg::StringMatch::Regex)
        }
        Some(H::SuffixMatch(v)) => full_match_regex(
            cx,
            &at(path, "suffix_match"),
            &format!("(?s).*{}", regex::escape(v)),
            false,
        )
        .map(cfg::StringMatch::Regex),
        Some(H::ContainsMatch(v)) => full_match_regex(
            cx,
            &at(path, "contains_match"),
            &format!("(?s).*{}.*", regex::escape(v)),
            false,
        )
        .map(cfg::StringMatch::Regex),
        Some(H::RangeMatch(_)) => {
            cx.unsupported(path, "range_match");
            None
        }
    };
    Some(cfg::HeaderMatch {
        name,
        value: value?,
        invert,
    })
}

/// `StringMatcher` → config `StringMatch`. Suffix, contains and `ignore_case` forms become
/// full-match regexes with the same meaning.
fn string_matcher(
    cx: &mut Ctx<'_>,
    path: &str,
    sm: &matcher::StringMatcher,
) -> Option<cfg::StringMatch> {
    use matcher::string_matcher::MatchPattern as M;
    let matcher::StringMatcher {
        ignore_case,
        match_pattern,
    } = sm;
    let re = |cx: &mut Ctx<'_>, field: &str, pattern: String| {
        full_match_regex(
            cx,
            &at(path, field),
            &format!("(?s){pattern}"),
            *ignore_case,
        )
        .map(cfg::StringMatch::Regex)
    };
    match match_pattern {
        Some(M::Exact(v)) if !ignore_case => Some(cfg::StringMatch::Exact(v.clone())),
        Some(M::Exact(v)) => re(cx, "exact", regex::escape(v)),
        Some(M::Prefix(v)) if !ignore_case => Some(cfg::StringMatch::Prefix(v.clone())),
        Some(M::Prefix(v)) => re(cx, "prefix", format!("{}.*", regex::escape(v))),
        Some(M::Suffix(v)) => re(cx, "suffix", format!(".*{}", regex::escape(v))),
        Some(M::Contains(v)) => re(cx, "contains", format!(".*{}.*", regex::escape(v))),
        Some(M::SafeRegex(r)) => {
            regex_matcher(cx, &at(path, "safe_regex"), r, *ignore_case).map(cfg::StringMatch::Regex)
        }
        Some(M::Custom(_)) => {
            cx.unsupported(path, "custom");
            None
        }
        None => {
            cx.err(path, "a match pattern is required");
            None
        }
    }
}

#[allow(
    deprecated,
    reason = "GoogleRe2 is deprecated but still what most control planes send"
)]
fn regex_matcher(
    cx: &mut Ctx<'_>,
    path: &str,
    re: &matcher::RegexMatcher,
    ignore_case: bool,
) -> Option<regex::Regex> {
    let matcher::RegexMatcher { regex, engine_type } = re;
    match engine_type {
        None => {}
        Some(matcher::regex_matcher::EngineType::GoogleRe2(
            matcher::regex_matcher::GoogleRe2 {
                max_program_size: _,
            },
        )) => {}
    }
    full_match_regex(cx, path, regex, ignore_case)
}

/// Unanchored regex + substitution. Envoy (RE2) writes capture groups as `\1`; the regex
/// crate writes `${1}` and treats `$` specially, so the substitution is translated.
fn regex_substitution(
    cx: &mut Ctx<'_>,
    path: &str,
    rs: &matcher::RegexMatchAndSubstitute,
) -> Option<(regex::Regex, String)> {
    let matcher::RegexMatchAndSubstitute {
        pattern,
        substitution,
    } = rs;
    let Some(matcher::RegexMatcher {
        regex,
        engine_type: _,
    }) = pattern
    else {
        cx.err(&at(path, "pattern"), "required");
        return None;
    };
    let re = search_regex(cx, &at(path, "pattern"), regex)?;
    let mut out = String::with_capacity(substitution.len());
    let mut chars = substitution.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '$' => out.push_str("$$"),
            '\\' => match chars.peek() {
                Some(d) if d.is_ascii_digit() => {
                    out.push_str(&format!("${{{d}}}"));
                    chars.next();
                }
                Some('\\') => {
                    out.push('\\');
                    chars.next();
                }
                _ => out.push('\\'),
            },
            c => out.push(c),
        }
    }
    Some((re, out))
}

#[allow(
    deprecated,
    reason = "destructuring names deprecated fields too, so that they are checked"
)]
fn route_action(
    cx: &mut Ctx<'_>,
    path: &str,
    ra: &rv3::RouteAction,
    matcher: Option<&cfg::RouteMatch>,
    clusters: &HashSet<&str>,
) -> Option<cfg::Forward> {
    use rv3::route_action::{ClusterSpecifier as C, HostRewriteSpecifier as HR};
    let start = cx.error_count();
    let rv3::RouteAction {
        cluster_not_found_response_code,
        metadata_match,
        prefix_rewrite,
        regex_rewrite,
        path_rewrite_policy,
        path_rewrite,
        append_x_forwarded_host,
        timeout,
        idle_timeout,
        flush_timeout,
        early_data_policy,
        retry_policy,
        retry_policy_typed_config,
        request_mirror_policies,
        priority,
        rate_limits,
        include_vh_rate_limits,
        hash_policy,
        cors,
        max_grpc_timeout,
        grpc_timeout_offset,
        upgrade_configs,
        internal_redirect_policy,
        internal_redirect_action,
        max_internal_redirects,
        hedge_policy,
        max_stream_duration,
        cluster_specifier,
        host_rewrite_specifier,
    } = ra;
    reject_set!(
        cx,
        path,
        metadata_match,
        path_rewrite_policy,
        path_rewrite,
        append_x_forwarded_host,
        idle_timeout,
        flush_timeout,
        early_data_policy,
        retry_policy_typed_config,
        request_mirror_policies,
        priority,
        rate_limits,
        include_vh_rate_limits,
        cors,
        max_grpc_timeout,
        grpc_timeout_offset,
        internal_redirect_policy,
        internal_redirect_action,
        max_internal_redirects,
        hedge_policy,
        max_stream_duration,
    );

    // A missing cluster is an error unless the route says what to answer for it (500
    // or 404): how a Gateway API rule's unresolved backendRefs keep their share.
    use rv3::route_action::ClusterNotFoundResponseCode as Nf;
    let cluster_not_found_status = match Nf::try_from(*cluster_not_found_response_code) {
        Ok(Nf::ServiceUnavailable) => 503,
        Ok(Nf::NotFound) => 404,
        Ok(Nf::InternalServerError) => 500,
        Err(_) => {
            cx.err(
                &at(path, "cluster_not_found_response_code"),
                format!("unknown value {cluster_not_found_response_code}"),
            );
            503
        }
    };
    let missing_ok = cluster_not_found_status != 503;
    let check_cluster = |cx: &mut Ctx<'_>, path: &str, name: &str| {
        if !missing_ok {
            check_cluster(cx, path, name, clusters);
        }
    };
    let mut out_clusters = Vec::new();
    match cluster_specifier {
        Some(C::Cluster(c)) => {
            check_cluster(cx, &at(path, "cluster"), c);
            out_clusters.push(cfg::WeightedCluster {
                name: c.clone(),
                weight: 1,
            });
        }
        Some(C::WeightedClusters(w)) => {
            let wp = at(path, "weighted_clusters");
            let rv3::WeightedCluster {
                clusters: list,
                total_weight,
                runtime_key_prefix,
                random_value_specifier,
            } = w;
            reject_set!(cx, &wp, runtime_key_prefix, random_value_specifier);
            for (i, cw) in list.iter().enumerate() {
                let cp = idx(&wp, "clusters", i);
                let rv3::weighted_cluster::ClusterWeight {
                    name,
                    cluster_header,
                    weight,
                    metadata_match,
                    request_headers_to_add,
                    request_headers_to_remove,
                    response_headers_to_add,
                    response_headers_to_remove,
                    typed_per_filter_config,
                    host_rewrite_specifier,
                } = cw;
                reject_set!(
                    cx,
                    &cp,
                    cluster_header,
                    metadata_match,
                    request_headers_to_add,
                    request_headers_to_remove,
                    response_headers_to_add,
                    response_headers_to_remove,
                    typed_per_filter_config,
                    host_rewrite_specifier,
                );
                check_cluster(cx, &at(&cp, "name"), name);
                // Envoy: an unset weight counts as 0.
                out_clusters.push(cfg::WeightedCluster {
                    name: name.clone(),
                    weight: weight.as_ref().map_or(0, |w| w.value),
                });
            }
            let sum: u64 = out_clusters.iter().map(|c| u64::from(c.weight)).sum();
            if list.is_empty() {
                cx.err(&at(&wp, "clusters"), "at least one cluster is required");
            } else if sum == 0 {
                cx.err(&at(&wp, "clusters"), "weights must sum to more than 0");
            }
            if let Some(t) = total_weight
                && u64::from(t.value) != sum
            {
                cx.err(
                    &at(&wp, "total_weight"),
                    format!("{} is not the sum of the weights ({sum})", t.value),
                );
            }
        }
        Some(C::ClusterHeader(_)) => cx.unsupported(path, "cluster_header"),
        Some(C::ClusterSpecifierPlugin(_)) => cx.unsupported(path, "cluster_specifier_plugin"),
        Some(C::InlineClusterSpecifierPlugin(_)) => {
            cx.unsupported(path, "inline_cluster_specifier_plugin")
        }
        None => cx.err(path, "cluster or weighted_clusters is required"),
    }

    let mut path_rewrite = None;
    if !prefix_rewrite.is_empty() {
        let p = at(path, "prefix_rewrite");
        match matcher.map(|m| &m.path) {
            Some(cfg::PathMatch::Prefix(_)) => {
                path_rewrite = Some(cfg::PathRewrite::ReplacePrefix(prefix_rewrite.clone()))
            }
            Some(cfg::PathMatch::Exact(exact)) => {
                // The whole path is the matched prefix.
                let pattern = format!("^{}$", regex::escape(exact));
                if let Some(re) = search_regex(cx, &p, &pattern) {
                    path_rewrite = Some(cfg::PathRewrite::Regex {
                        pattern: re,
                        substitution: prefix_rewrite.replace('$', "$$"),
                    });
                }
            }
            Some(cfg::PathMatch::Regex(_)) => cx.err(
                &p,
                "needs a path, path_separated_prefix or `/`-terminated prefix match",
            ),
            None => {}
        }
    }
    if let Some(rr) = regex_rewrite {
        let p = at(path, "regex_rewrite");
        if path_rewrite.is_some() {
            cx.err(
                &p,
                "prefix_rewrite and regex_rewrite are mutually exclusive",
            );
        } else if let Some((pattern, substitution)) = regex_substitution(cx, &p, rr) {
            path_rewrite = Some(cfg::PathRewrite::Regex {
                pattern,
                substitution,
            });
        }
    }

    let host_rewrite = match host_rewrite_specifier {
        None => None,
        Some(HR::HostRewriteLiteral(h)) => {
            if h.is_empty() {
                cx.err(&at(path, "host_rewrite_literal"), "must not be empty");
            }
            Some(h.clone())
        }
        Some(HR::AutoHostRewrite(b)) if !b.value => None,
        Some(HR::AutoHostRewrite(_)) => {
            cx.unsupported(path, "auto_host_rewrite");
            None
        }
        Some(HR::HostRewriteHeader(_)) => {
            cx.unsupported(path, "host_rewrite_header");
            None
        }
        Some(HR::HostRewritePathRegex(_)) => {
            cx.unsupported(path, "host_rewrite_path_regex");
            None
        }
        Some(HR::HostRewrite(_)) => {
            cx.unsupported(path, "host_rewrite");
            None
        }
    };

    let timeout = timeout_with_default(
        cx,
        &at(path, "timeout"),
        timeout,
        Some(DEFAULT_ROUTE_TIMEOUT),
    );
    let per_try_timeout = retry_policy
        .as_ref()
        .and_then(|rp| retry(cx, &at(path, "retry_policy"), rp));

    for (i, u) in upgrade_configs.iter().enumerate() {
        let p = idx(path, "upgrade_configs", i);
        let rv3::route_action::UpgradeConfig {
            upgrade_type,
            enabled,
            connect_config,
        } = u;
        reject_set!(cx, &p, connect_config);
        if !upgrade_type.eq_ignore_ascii_case("websocket")
            || enabled.as_ref().is_some_and(|e| !e.value)
        {
            cx.err(
                &p,
                format!("only an enabled `websocket` upgrade is supported, got {upgrade_type:?}"),
            );
        }
    }

    let mut hashes = Vec::new();
    for (i, hp) in hash_policy.iter().enumerate() {
        let p = idx(path, "hash_policy", i);
        let rv3::route_action::HashPolicy {
            terminal,
            policy_specifier,
        } = hp;
        // The proxy uses the first policy that yields a key: Envoy's `terminal` semantics.
        // Without `terminal`, Envoy would combine keys, which the proxy does not do.
        if !terminal && i + 1 < hash_policy.len() {
            cx.err(
                &at(&p, "terminal"),
                "must be true on every hash policy but the last (keys are not combined)",
            );
        }
        use rv3::route_action::hash_policy::{self as h, PolicySpecifier as S};
        match policy_specifier {
            Some(S::Header(h::Header {
                header_name,
                regex_rewrite,
            })) => {
                reject_set!(cx, &at(&p, "header"), regex_rewrite);
                hashes.push(cfg::HashPolicy::Header(header_name.to_ascii_lowercase()));
            }
            Some(S::Cookie(h::Cookie {
                name,
                ttl,
                path: cookie_path,
                attributes,
            })) => {
                // A ttl asks Envoy to generate the cookie; the proxy only reads it.
                reject_set!(cx, &at(&p, "cookie"), ttl, cookie_path, attributes);
                hashes.push(cfg::HashPolicy::Cookie(name.clone()));
            }
            Some(S::ConnectionProperties(h::ConnectionProperties { source_ip })) => {
                if *source_ip {
                    hashes.push(cfg::HashPolicy::SourceIp);
                } else {
                    cx.err(&at(&p, "connection_properties.source_ip"), "must be true");
                }
            }
            Some(S::QueryParameter(_)) => cx.unsupported(&p, "query_parameter"),
            Some(S::FilterState(_)) => cx.unsupported(&p, "filter_state"),
            None => cx.err(&p, "a policy is required"),
        }
    }

    if cx.error_count() > start {
        return None;
    }
    Some(cfg::Forward {
        clusters: out_clusters,
        path_rewrite,
        host_rewrite,
        timeout,
        per_try_timeout,
        hash_policy: hashes,
        cluster_not_found_status,
    })
}

fn check_cluster(cx: &mut Ctx<'_>, path: &str, name: &str, clusters: &HashSet<&str>) {
    if !clusters.contains(name) {
        cx.err(
            path,
            format!("cluster {name:?} is not among the Cluster resources"),
        );
    }
}

/// Retries are not implemented by the proxy: only `per_try_timeout` is honoured, and the
/// policy must not retry (`retry_on` empty or `num_retries` 0).
fn retry(cx: &mut Ctx<'_>, path: &str, rp: &rv3::RetryPolicy) -> Option<Duration> {
    let rv3::RetryPolicy {
        retry_on,
        num_retries,
        per_try_timeout,
        per_try_idle_timeout,
        retry_priority,
        retry_host_predicate,
        retry_options_predicates,
        host_selection_retry_max_attempts,
        retriable_status_codes,
        retry_back_off,
        rate_limited_retry_back_off,
        retriable_headers,
        retriable_request_headers,
        refresh_cluster_on_retry,
    } = rp;
    reject_set!(
        cx,
        path,
        per_try_idle_timeout,
        retry_priority,
        retry_host_predicate,
        retry_options_predicates,
        host_selection_retry_max_attempts,
        retriable_status_codes,
        retry_back_off,
        rate_limited_retry_back_off,
        retriable_headers,
        retriable_request_headers,
        refresh_cluster_on_retry,
    );
    if !retry_on.is_empty() && num_retries.as_ref().is_none_or(|n| n.value != 0) {
        cx.err(
            path,
            "retries are not supported (set num_retries to 0 or leave retry_on empty)",
        );
    }
    duration(cx, &at(path, "per_try_timeout"), per_try_timeout).filter(|d| !d.is_zero())
}

fn redirect(
    cx: &mut Ctx<'_>,
    path: &str,
    ra: &rv3::RedirectAction,
    matcher: Option<&cfg::RouteMatch>,
) -> Option<cfg::Redirect> {
    use rv3::redirect_action::{
        PathRewriteSpecifier as P, RedirectResponseCode as Code, SchemeRewriteSpecifier as S,
    };
    let start = cx.error_count();
    let rv3::RedirectAction {
        host_redirect,
        port_redirect,
        response_code,
        strip_query,
        scheme_rewrite_specifier,
        path_rewrite_specifier,
    } = ra;
    reject_set!(cx, path, strip_query);
    let scheme = match scheme_rewrite_specifier {
        None | Some(S::HttpsRedirect(false)) => None,
        Some(S::HttpsRedirect(true)) => Some("https".to_owned()),
        Some(S::SchemeRedirect(s)) => {
            let s = s.to_ascii_lowercase();
            if s != "http" && s != "https" {
                cx.err(
                    &at(path, "scheme_redirect"),
                    format!("{s:?} is not http or https"),
                );
            }
            Some(s)
        }
    };
    let port = match *port_redirect {
        0 => None,
        p => match u16::try_from(p) {
            Ok(p) => Some(p),
            Err(_) => {
                cx.err(&at(path, "port_redirect"), format!("{p} is not a port"));
                None
            }
        },
    };
    let rpath = match path_rewrite_specifier {
        None => None,
        Some(P::PathRedirect(p)) => {
            check_path(cx, &at(path, "path_redirect"), p);
            Some(cfg::RedirectPath::Full(p.clone()))
        }
        Some(P::PrefixRewrite(p)) => {
            if !matches!(
                matcher.map(|m| &m.path),
                Some(cfg::PathMatch::Prefix(_)) | Some(cfg::PathMatch::Exact(_)) | None
            ) {
                cx.err(
                    &at(path, "prefix_rewrite"),
                    "needs a path, path_separated_prefix or `/`-terminated prefix match",
                );
            }
            Some(cfg::RedirectPath::ReplacePrefix(p.clone()))
        }
        Some(P::RegexRewrite(_)) => {
            cx.unsupported(path, "regex_rewrite");
            None
        }
        Some(P::PathRewrite(_)) => {
            cx.unsupported(path, "path_rewrite");
            None
        }
    };
    let status = match Code::try_from(*response_code) {
        Ok(Code::MovedPermanently) => 301,
        Ok(Code::Found) => 302,
        Ok(Code::SeeOther) => 303,
        Ok(Code::TemporaryRedirect) => 307,
        Ok(Code::PermanentRedirect) => 308,
        Err(_) => {
            cx.err(
                &at(path, "response_code"),
                format!("unknown response code {response_code}"),
            );
            301
        }
    };
    if cx.error_count() > start {
        return None;
    }
    Some(cfg::Redirect {
        scheme,
        host: (!host_redirect.is_empty()).then(|| host_redirect.clone()),
        port,
        path: rpath,
        status,
    })
}

fn direct_response(
    cx: &mut Ctx<'_>,
    path: &str,
    d: &rv3::DirectResponseAction,
    max_body: u32,
) -> Option<cfg::RouteAction> {
    let rv3::DirectResponseAction {
        status,
        body,
        body_format,
    } = d;
    reject_set!(cx, path, body_format);
    let start = cx.error_count();
    if !(200..600).contains(status) {
        cx.err(
            &at(path, "status"),
            format!("{status} is not in [200, 600)"),
        );
    }
    let body = match body {
        None => String::new(),
        Some(ds) => data_source_string(cx, &at(path, "body"), ds).unwrap_or_default(),
    };
    if body.len() > max_body as usize {
        cx.err(
            &at(path, "body"),
            format!(
                "{} bytes is more than max_direct_response_body_size_bytes ({max_body})",
                body.len()
            ),
        );
    }
    if cx.error_count() > start {
        return None;
    }
    Some(cfg::RouteAction::DirectResponse {
        status: *status as u16,
        body,
    })
}

/// An inline `DataSource` as UTF-8 text (files and environment variables are rejected: the
/// proxy's config must be self-contained).
pub(super) fn data_source_string(
    cx: &mut Ctx<'_>,
    path: &str,
    ds: &core::DataSource,
) -> Option<String> {
    use core::data_source::Specifier as S;
    let core::DataSource {
        watched_directory,
        specifier,
    } = ds;
    reject_set!(cx, path, watched_directory);
    match specifier {
        Some(S::InlineString(s)) => Some(s.clone()),
        Some(S::InlineBytes(b)) => match String::from_utf8(b.clone()) {
            Ok(s) => Some(s),
            Err(_) => {
                cx.err(&at(path, "inline_bytes"), "must be UTF-8");
                None
            }
        },
        Some(S::Filename(_)) => {
            cx.unsupported(path, "filename");
            None
        }
        Some(S::EnvironmentVariable(_)) => {
            cx.unsupported(path, "environment_variable");
            None
        }
        None => {
            cx.err(path, "inline_string or inline_bytes is required");
            None
        }
    }
}

#[allow(
    deprecated,
    reason = "the deprecated `append` flag is still honoured, as Envoy does"
)]
fn header_mutation(
    cx: &mut Ctx<'_>,
    path: &str,
    add: &[core::HeaderValueOption],
    remove: &[String],
    add_field: &str,
    remove_field: &str,
) -> cfg::HeaderMutation {
    use core::header_value_option::HeaderAppendAction as A;
    let mut m = cfg::HeaderMutation::default();
    for (i, r) in remove.iter().enumerate() {
        let name = r.to_ascii_lowercase();
        check_mutable_header(cx, &idx(path, remove_field, i), &name);
        m.remove.push(name);
    }
    for (i, o) in add.iter().enumerate() {
        let p = idx(path, add_field, i);
        let core::HeaderValueOption {
            header,
            append,
            append_action,
            keep_empty_value,
        } = o;
        let Some(core::HeaderValue {
            key,
            value,
            raw_value,
        }) = header
        else {
            cx.err(&at(&p, "header"), "required");
            continue;
        };
        let key = key.to_ascii_lowercase();
        check_mutable_header(cx, &at(&p, "header.key"), &key);
        let value = if raw_value.is_empty() {
            value.clone()
        } else {
            match String::from_utf8(raw_value.clone()) {
                Ok(v) if value.is_empty() => v,
                Ok(_) => {
                    cx.err(
                        &at(&p, "header"),
                        "value and raw_value are mutually exclusive",
                    );
                    continue;
                }
                Err(_) => {
                    cx.err(&at(&p, "header.raw_value"), "must be UTF-8");
                    continue;
                }
            }
        };
        if value.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
            cx.err(&at(&p, "header.value"), "must not contain CR, LF or NUL");
        }
        // Envoy skips adding a header whose value is empty unless keep_empty_value.
        if value.is_empty() && !keep_empty_value {
            continue;
        }
        let overwrite = match (append, A::try_from(*append_action)) {
            (Some(b), Ok(A::AppendIfExistsOrAdd)) => !b.value,
            (Some(_), _) => {
                cx.err(&p, "append and append_action are mutually exclusive");
                continue;
            }
            (None, Ok(A::AppendIfExistsOrAdd)) => false,
            (None, Ok(A::OverwriteIfExistsOrAdd)) => true,
            (None, Ok(other)) => {
                cx.err(
                    &at(&p, "append_action"),
                    format!("{} is not supported", other.as_str_name()),
                );
                continue;
            }
            (None, Err(_)) => {
                cx.err(
                    &at(&p, "append_action"),
                    format!("unknown value {append_action}"),
                );
                continue;
            }
        };
        if overwrite {
            m.set.push((key, value));
        } else {
            m.add.push((key, value));
        }
    }
    m
}

fn check_mutable_header(cx: &mut Ctx<'_>, path: &str, name: &str) {
    if name.starts_with(':') {
        cx.err(path, format!("pseudo-header {name:?} cannot be modified"));
    } else if name.is_empty() || !name.bytes().all(is_token_byte) {
        cx.err(path, format!("{name:?} is not a header name"));
    }
}

/// RFC 9110 `tchar`.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}
