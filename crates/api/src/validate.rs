//! Semantic checks on typed resources (what a schema alone cannot say): name formats, port
//! and weight ranges, regexes that compile, filter/type consistency, listener conflicts.
//! Each problem is reported with its field path; nothing stops at the first one.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;

use crate::backend::Backend;
use crate::gateway::{FromNamespaces, Gateway, Listener, ProtocolType, TlsModeType};
use crate::meta::{GATEWAY_GROUP, ObjectMeta, ResourceKind};
use crate::route::{
    BackendRef, GrpcRoute, GrpcRouteFilterType, HeaderMatch, HeaderMatchType, HeaderModifier,
    HttpPathModifier, HttpRoute, HttpRouteFilterType, HttpRouteRule, L4RouteRule, ParentReference,
    PathMatchType, PathModifierType,
};
use crate::set::protocol_accepts;

/// Largest backendRef weight Gateway API allows.
pub const MAX_WEIGHT: u32 = 1_000_000;

/// Collected semantic problems: (path, message).
#[derive(Debug, Default)]
pub(crate) struct Sink(pub(crate) Vec<(String, String)>);

impl Sink {
    fn err(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push((path.into(), message.into()));
    }
}

// ------------------------------------------------------------------ primitives

fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// DNS-1123 subdomain: dot-separated labels, at most 253 characters, lowercase.
pub(crate) fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// Gateway API hostname: a DNS-1123 subdomain, optionally prefixed by `*.`, not an IP.
pub(crate) fn hostname_problem(s: &str, allow_wildcard: bool) -> Option<String> {
    if s.parse::<IpAddr>().is_ok() {
        return Some(format!("{s:?} is an IP address; a hostname is required"));
    }
    let rest = match s.strip_prefix("*.") {
        Some(rest) if allow_wildcard => rest,
        Some(_) => return Some(format!("{s:?}: wildcards are not allowed here")),
        None => s,
    };
    if s.contains(':') {
        return Some(format!("{s:?} must not contain a port"));
    }
    if !is_dns_subdomain(rest) || rest.contains('*') {
        return Some(format!(
            "{s:?} is not a valid hostname (lowercase DNS name{})",
            if allow_wildcard {
                ", optionally starting with \"*.\""
            } else {
                ""
            }
        ));
    }
    None
}

/// RFC 9110 token (header and cookie names).
pub(crate) fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c))
}

fn header_value_ok(s: &str) -> bool {
    !s.bytes().any(|c| c == b'\r' || c == b'\n' || c == 0)
}

fn check_regex(s: &mut Sink, path: &str, re: &str) {
    if let Err(e) = regex::Regex::new(re) {
        let detail = e.to_string();
        let last = detail.lines().last().unwrap_or("invalid").trim();
        let last = last.strip_prefix("error: ").unwrap_or(last);
        s.err(path, format!("invalid regular expression: {last}"));
    }
}

fn check_port(s: &mut Sink, path: &str, port: u16) {
    if port == 0 {
        s.err(path, "must be between 1 and 65535");
    }
}

fn check_section_name(s: &mut Sink, path: &str, name: &str) {
    if !is_dns_subdomain(name) {
        s.err(
            path,
            format!("{name:?} is not a valid name (lowercase letters, digits, '-' and '.')"),
        );
    }
}

// ------------------------------------------------------------------ metadata

pub(crate) fn metadata(m: &ObjectMeta, kind: ResourceKind, s: &mut Sink) {
    if m.name.is_empty() {
        s.err("metadata.name", "must not be empty");
    } else if !is_dns_subdomain(&m.name) {
        s.err(
            "metadata.name",
            format!("{:?} is not a valid {kind} name (DNS-1123 subdomain: lowercase letters, digits, '-', '.', at most 253)", m.name),
        );
    }
    if let Some(ns) = &m.namespace
        && !is_dns_label(ns)
    {
        s.err(
            "metadata.namespace",
            format!("{ns:?} is not a valid namespace (DNS-1123 label: lowercase letters, digits, '-', at most 63)"),
        );
    }
}

// ------------------------------------------------------------------ Gateway

fn family(p: ProtocolType) -> u8 {
    match p {
        ProtocolType::Http => 0,
        ProtocolType::Https | ProtocolType::Tls => 1,
        ProtocolType::Tcp => 2,
    }
}

pub(crate) fn gateway(g: &Gateway, s: &mut Sink) {
    if let Some(c) = &g.spec.gateway_class_name
        && c.is_empty()
    {
        s.err("spec.gatewayClassName", "must not be empty when set");
    }
    for (i, a) in g.spec.addresses.iter().enumerate() {
        let p = format!("spec.addresses[{i}]");
        match a.address_type.as_deref().unwrap_or("IPAddress") {
            "IPAddress" => {
                if a.value.parse::<IpAddr>().is_err() {
                    s.err(
                        format!("{p}.value"),
                        format!("{:?} is not an IP address", a.value),
                    );
                }
            }
            "Hostname" => {
                if let Some(m) = hostname_problem(&a.value, false) {
                    s.err(format!("{p}.value"), m);
                }
            }
            other => s.err(
                format!("{p}.type"),
                format!("unsupported address type {other:?} (expected IPAddress or Hostname)"),
            ),
        }
    }
    if g.spec.listeners.is_empty() {
        s.err("spec.listeners", "at least one listener is required");
    }
    let mut names: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, l) in g.spec.listeners.iter().enumerate() {
        let p = format!("spec.listeners[{i}]");
        check_section_name(s, &format!("{p}.name"), &l.name);
        if let Some(first) = names.get(l.name.as_str()) {
            s.err(
                format!("{p}.name"),
                format!(
                    "duplicate listener name {:?} (also spec.listeners[{first}])",
                    l.name
                ),
            );
        } else {
            names.insert(&l.name, i);
        }
        check_port(s, &format!("{p}.port"), l.port);
        listener(g, l, &p, s);
        // Port sharing: HTTP | HTTPS+TLS | TCP; same hostname twice is ambiguous.
        for (j, other) in g.spec.listeners.iter().enumerate().take(i) {
            if other.port != l.port {
                continue;
            }
            if family(other.protocol) != family(l.protocol) {
                s.err(
                    format!("{p}.protocol"),
                    format!(
                        "port {} is already used by listener {:?} with protocol {}; {} cannot share it",
                        l.port,
                        other.name,
                        other.protocol.as_str(),
                        l.protocol.as_str()
                    ),
                );
                break;
            }
            if l.protocol == ProtocolType::Tcp || other.hostname == l.hostname {
                s.err(
                    format!("{p}.hostname"),
                    format!(
                        "conflicts with listener {:?} (spec.listeners[{j}]): same port {}{}",
                        other.name,
                        l.port,
                        if l.protocol == ProtocolType::Tcp {
                            String::new()
                        } else {
                            format!(" and hostname {}", l.hostname.as_deref().unwrap_or("(any)"))
                        }
                    ),
                );
                break;
            }
        }
    }
}

fn listener(g: &Gateway, l: &Listener, p: &str, s: &mut Sink) {
    let _ = g;
    if let Some(h) = &l.hostname {
        if l.protocol == ProtocolType::Tcp {
            s.err(
                format!("{p}.hostname"),
                "not supported with protocol TCP (no hostname to match on)",
            );
        } else if let Some(m) = hostname_problem(h, true) {
            s.err(format!("{p}.hostname"), m);
        }
    }
    match (l.protocol, &l.tls) {
        (ProtocolType::Http | ProtocolType::Tcp, Some(_)) => {
            s.err(
                format!("{p}.tls"),
                format!("must not be set with protocol {}", l.protocol.as_str()),
            );
        }
        (ProtocolType::Https | ProtocolType::Tls, None) => {
            s.err(
                format!("{p}.tls"),
                format!("required with protocol {}", l.protocol.as_str()),
            );
        }
        (ProtocolType::Https, Some(tls)) if tls.mode() == TlsModeType::Passthrough => {
            s.err(
                format!("{p}.tls.mode"),
                "HTTPS listeners terminate TLS; use protocol TLS for Passthrough",
            );
        }
        (ProtocolType::Https | ProtocolType::Tls, Some(tls)) => {
            if tls.mode() == TlsModeType::Terminate && tls.certificate_refs.is_empty() {
                s.err(
                    format!("{p}.tls.certificateRefs"),
                    "at least one certificateRef is required with mode Terminate",
                );
            }
            if tls.mode() == TlsModeType::Passthrough && !tls.certificate_refs.is_empty() {
                s.err(
                    format!("{p}.tls.certificateRefs"),
                    "must be empty with mode Passthrough",
                );
            }
        }
        _ => {}
    }
    if let Some(tls) = &l.tls {
        for (i, c) in tls.certificate_refs.iter().enumerate() {
            if c.name.is_empty() {
                s.err(
                    format!("{p}.tls.certificateRefs[{i}].name"),
                    "must not be empty",
                );
            }
        }
    }
    if let Some(ar) = &l.allowed_routes {
        if let Some(ns) = &ar.namespaces {
            if ns.from == Some(FromNamespaces::Selector) {
                s.err(
                    format!("{p}.allowedRoutes.namespaces.from"),
                    "Selector is not supported (Biplane has no Namespace objects); use Same or All",
                );
            } else if ns.selector.is_some() {
                s.err(
                    format!("{p}.allowedRoutes.namespaces.selector"),
                    "only valid with from: Selector",
                );
            }
        }
        for (i, k) in ar.kinds.iter().enumerate() {
            let kp = format!("{p}.allowedRoutes.kinds[{i}]");
            let group = k.group.as_deref().unwrap_or(GATEWAY_GROUP);
            let kind = ResourceKind::from_kind_str(&k.kind).filter(|_| group == GATEWAY_GROUP);
            match kind {
                Some(kind) if protocol_accepts(l.protocol, kind) => {}
                Some(kind) => s.err(
                    format!("{kp}.kind"),
                    format!("{kind} cannot attach to a {} listener", l.protocol.as_str()),
                ),
                None => s.err(kp, format!("unsupported route kind {group}/{}", k.kind)),
            }
        }
    }
}

// ------------------------------------------------------------------ routes

fn parent_refs(refs: &[ParentReference], s: &mut Sink) {
    for (i, r) in refs.iter().enumerate() {
        let p = format!("spec.parentRefs[{i}]");
        if r.name.is_empty() {
            s.err(format!("{p}.name"), "must not be empty");
        }
        if let Some(sn) = &r.section_name {
            check_section_name(s, &format!("{p}.sectionName"), sn);
        }
        if let Some(port) = r.port {
            check_port(s, &format!("{p}.port"), port);
        }
    }
}

fn hostnames(hosts: &[String], s: &mut Sink) {
    let mut seen = HashSet::new();
    for (i, h) in hosts.iter().enumerate() {
        let p = format!("spec.hostnames[{i}]");
        if let Some(m) = hostname_problem(h, true) {
            s.err(p, m);
        } else if !seen.insert(h.as_str()) {
            s.err(p, format!("duplicate hostname {h:?}"));
        }
    }
}

fn backend_refs(rule_path: &str, refs: &[BackendRef], s: &mut Sink) {
    for (i, b) in refs.iter().enumerate() {
        let p = format!("{rule_path}.backendRefs[{i}]");
        if b.name.is_empty() {
            s.err(format!("{p}.name"), "must not be empty");
        }
        if let Some(port) = b.port {
            check_port(s, &format!("{p}.port"), port);
        }
        if let Some(w) = b.weight
            && w > MAX_WEIGHT
        {
            s.err(
                format!("{p}.weight"),
                format!("must be between 0 and {MAX_WEIGHT}"),
            );
        }
        if !b.filters.is_empty() {
            s.err(
                format!("{p}.filters"),
                "per-backend filters are not supported; put filters on the rule",
            );
        }
    }
}

fn rule_names<'a>(names: impl Iterator<Item = Option<&'a String>>, s: &mut Sink) {
    let mut seen = HashSet::new();
    for (i, n) in names.enumerate() {
        let Some(n) = n else { continue };
        let p = format!("spec.rules[{i}].name");
        check_section_name(s, &p, n);
        if !seen.insert(n.as_str()) {
            s.err(p, format!("duplicate rule name {n:?}"));
        }
    }
}

/// Header matches (HTTP and gRPC) and query parameter matches.
fn header_matches(p: &str, list: &[HeaderMatch], query: bool, s: &mut Sink) {
    let mut seen = HashSet::new();
    for (i, h) in list.iter().enumerate() {
        let hp = format!("{p}[{i}]");
        let name_ok = if query {
            !h.name.is_empty() && !h.name.bytes().any(|c| b"&=#?% \t\r\n".contains(&c))
        } else {
            is_token(&h.name)
        };
        if !name_ok {
            s.err(
                format!("{hp}.name"),
                if query {
                    "not a valid query parameter name"
                } else {
                    "not a valid header name"
                },
            );
        } else {
            let key = if query {
                h.name.clone()
            } else {
                h.name.to_ascii_lowercase()
            };
            if !seen.insert(key) {
                s.err(
                    format!("{hp}.name"),
                    format!("duplicate match on {:?}", h.name),
                );
            }
        }
        match h.match_type() {
            HeaderMatchType::Exact => {
                if !header_value_ok(&h.value) {
                    s.err(format!("{hp}.value"), "must not contain CR, LF or NUL");
                }
            }
            HeaderMatchType::RegularExpression => check_regex(s, &format!("{hp}.value"), &h.value),
        }
    }
}

fn header_modifier(p: &str, m: &HeaderModifier, s: &mut Sink) {
    for (list, field) in [(&m.set, "set"), (&m.add, "add")] {
        let mut seen = HashSet::new();
        for (i, h) in list.iter().enumerate() {
            if !is_token(&h.name) {
                s.err(format!("{p}.{field}[{i}].name"), "not a valid header name");
            } else if !seen.insert(h.name.to_ascii_lowercase()) {
                s.err(
                    format!("{p}.{field}[{i}].name"),
                    format!("duplicate header {:?}", h.name),
                );
            }
            if !header_value_ok(&h.value) {
                s.err(
                    format!("{p}.{field}[{i}].value"),
                    "must not contain CR, LF or NUL",
                );
            }
        }
    }
    let mut seen = HashSet::new();
    for (i, name) in m.remove.iter().enumerate() {
        if !is_token(name) {
            s.err(format!("{p}.remove[{i}]"), "not a valid header name");
        } else if !seen.insert(name.to_ascii_lowercase()) {
            s.err(
                format!("{p}.remove[{i}]"),
                format!("duplicate header {name:?}"),
            );
        }
    }
    if m.set.is_empty() && m.add.is_empty() && m.remove.is_empty() {
        s.err(p, "at least one of set, add or remove is required");
    }
}

fn path_value(s: &mut Sink, p: &str, v: &str) {
    if !v.starts_with('/') {
        s.err(p, "must start with \"/\"");
    } else if v.contains('?') || v.contains('#') {
        s.err(p, "must not contain '?' or '#'");
    } else if v.contains("//") {
        s.err(p, "must not contain \"//\"");
    } else if v.len() > 1024 {
        s.err(p, "must be at most 1024 characters");
    } else if v.bytes().any(|c| c.is_ascii_control() || c == b' ') {
        s.err(p, "must not contain spaces or control characters");
    }
}

fn path_modifier(p: &str, m: &HttpPathModifier, rule: &HttpRouteRule, s: &mut Sink) {
    match m.modifier_type {
        PathModifierType::ReplaceFullPath => {
            match &m.replace_full_path {
                Some(v) => path_value(s, &format!("{p}.replaceFullPath"), v),
                None => s.err(
                    format!("{p}.replaceFullPath"),
                    "required when type is ReplaceFullPath",
                ),
            }
            if m.replace_prefix_match.is_some() {
                s.err(
                    format!("{p}.replacePrefixMatch"),
                    "must not be set when type is ReplaceFullPath",
                );
            }
        }
        PathModifierType::ReplacePrefixMatch => {
            match &m.replace_prefix_match {
                Some(v) => path_value(s, &format!("{p}.replacePrefixMatch"), v),
                None => s.err(
                    format!("{p}.replacePrefixMatch"),
                    "required when type is ReplacePrefixMatch",
                ),
            }
            if m.replace_full_path.is_some() {
                s.err(
                    format!("{p}.replaceFullPath"),
                    "must not be set when type is ReplacePrefixMatch",
                );
            }
            let matches = rule.effective_matches();
            if matches.len() != 1
                || matches
                    .iter()
                    .any(|m| m.path_match().match_type() != PathMatchType::PathPrefix)
            {
                s.err(
                    format!("{p}.type"),
                    "ReplacePrefixMatch requires the rule to have exactly one match, of type PathPrefix",
                );
            }
        }
    }
}

pub(crate) fn http_route(r: &HttpRoute, s: &mut Sink) {
    parent_refs(&r.spec.parent_refs, s);
    hostnames(&r.spec.hostnames, s);
    rule_names(r.spec.rules.iter().map(|x| x.name.as_ref()), s);
    for (ri, rule) in r.spec.rules.iter().enumerate() {
        let rp = format!("spec.rules[{ri}]");
        for (mi, m) in rule.matches.iter().enumerate() {
            let mp = format!("{rp}.matches[{mi}]");
            if let Some(path) = &m.path {
                let vp = format!("{mp}.path.value");
                match path.match_type() {
                    PathMatchType::Exact | PathMatchType::PathPrefix => {
                        path_value(s, &vp, path.value())
                    }
                    PathMatchType::RegularExpression => {
                        if path.value.is_none() {
                            s.err(vp, "required with type RegularExpression");
                        } else {
                            check_regex(s, &vp, path.value());
                        }
                    }
                }
            }
            header_matches(&format!("{mp}.headers"), &m.headers, false, s);
            header_matches(&format!("{mp}.queryParams"), &m.query_params, true, s);
        }
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for (fi, f) in rule.filters.iter().enumerate() {
            let fp = format!("{rp}.filters[{fi}]");
            *counts.entry(f.filter_type.as_str()).or_default() += 1;
            let present = [
                (
                    "requestHeaderModifier",
                    f.request_header_modifier.is_some(),
                    HttpRouteFilterType::RequestHeaderModifier,
                ),
                (
                    "responseHeaderModifier",
                    f.response_header_modifier.is_some(),
                    HttpRouteFilterType::ResponseHeaderModifier,
                ),
                (
                    "requestRedirect",
                    f.request_redirect.is_some(),
                    HttpRouteFilterType::RequestRedirect,
                ),
                (
                    "urlRewrite",
                    f.url_rewrite.is_some(),
                    HttpRouteFilterType::UrlRewrite,
                ),
            ];
            for (field, is_set, ty) in present {
                if ty == f.filter_type && !is_set {
                    s.err(
                        format!("{fp}.{field}"),
                        format!("required when type is {}", ty.as_str()),
                    );
                } else if ty != f.filter_type && is_set {
                    s.err(
                        format!("{fp}.{field}"),
                        format!("must not be set when type is {}", f.filter_type.as_str()),
                    );
                }
            }
            if let Some(m) = &f.request_header_modifier {
                header_modifier(&format!("{fp}.requestHeaderModifier"), m, s);
            }
            if let Some(m) = &f.response_header_modifier {
                header_modifier(&format!("{fp}.responseHeaderModifier"), m, s);
            }
            if let Some(rd) = &f.request_redirect {
                let p = format!("{fp}.requestRedirect");
                if let Some(sc) = &rd.scheme
                    && sc != "http"
                    && sc != "https"
                {
                    s.err(format!("{p}.scheme"), "must be http or https");
                }
                if let Some(h) = &rd.hostname
                    && let Some(m) = hostname_problem(h, false)
                {
                    s.err(format!("{p}.hostname"), m);
                }
                if let Some(port) = rd.port {
                    check_port(s, &format!("{p}.port"), port);
                }
                if let Some(code) = rd.status_code
                    && ![301, 302, 303, 307, 308].contains(&code)
                {
                    s.err(
                        format!("{p}.statusCode"),
                        format!("{code} is not allowed (301, 302, 303, 307 or 308)"),
                    );
                }
                if let Some(m) = &rd.path {
                    path_modifier(&format!("{p}.path"), m, rule, s);
                }
            }
            if let Some(rw) = &f.url_rewrite {
                let p = format!("{fp}.urlRewrite");
                if let Some(h) = &rw.hostname
                    && let Some(m) = hostname_problem(h, false)
                {
                    s.err(format!("{p}.hostname"), m);
                }
                if let Some(m) = &rw.path {
                    path_modifier(&format!("{p}.path"), m, rule, s);
                }
                if rw.hostname.is_none() && rw.path.is_none() {
                    s.err(p, "at least one of hostname or path is required");
                }
            }
        }
        for (ty, n) in &counts {
            if *n > 1 {
                s.err(
                    format!("{rp}.filters"),
                    format!("{ty} may appear at most once per rule"),
                );
            }
        }
        let has = |t: HttpRouteFilterType| rule.filters.iter().any(|f| f.filter_type == t);
        if has(HttpRouteFilterType::RequestRedirect) && has(HttpRouteFilterType::UrlRewrite) {
            s.err(
                format!("{rp}.filters"),
                "RequestRedirect and URLRewrite cannot be used together in one rule",
            );
        }
        if has(HttpRouteFilterType::RequestRedirect) && !rule.backend_refs.is_empty() {
            s.err(
                format!("{rp}.backendRefs"),
                "must be empty when the rule has a RequestRedirect filter",
            );
        }
        backend_refs(&rp, &rule.backend_refs, s);
        if let Some(t) = &rule.timeouts {
            let mut request = None;
            if let Some(d) = &t.request {
                match d.parsed() {
                    Ok(v) => request = Some(v),
                    Err(e) => s.err(format!("{rp}.timeouts.request"), e.to_string()),
                }
            }
            if let Some(d) = &t.backend_request {
                match d.parsed() {
                    Ok(b) => {
                        if let Some(r) = request
                            && !r.is_zero()
                            && (b > r || b.is_zero())
                        {
                            s.err(
                                format!("{rp}.timeouts.backendRequest"),
                                format!(
                                    "must not be longer than timeouts.request ({})",
                                    t.request.as_ref().map(|d| d.as_str()).unwrap_or("")
                                ),
                            );
                        }
                    }
                    Err(e) => s.err(format!("{rp}.timeouts.backendRequest"), e.to_string()),
                }
            }
        }
    }
}

fn grpc_name_ok(s: &str, allow_dots: bool) -> bool {
    let part_ok = |p: &str| {
        let mut c = p.chars();
        c.next()
            .is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
            && c.all(|x| x.is_ascii_alphanumeric() || x == '_')
    };
    if allow_dots {
        s.split('.').all(part_ok)
    } else {
        part_ok(s)
    }
}

pub(crate) fn grpc_route(r: &GrpcRoute, s: &mut Sink) {
    parent_refs(&r.spec.parent_refs, s);
    hostnames(&r.spec.hostnames, s);
    rule_names(r.spec.rules.iter().map(|x| x.name.as_ref()), s);
    for (ri, rule) in r.spec.rules.iter().enumerate() {
        let rp = format!("spec.rules[{ri}]");
        for (mi, m) in rule.matches.iter().enumerate() {
            let mp = format!("{rp}.matches[{mi}]");
            if let Some(mm) = &m.method {
                let p = format!("{mp}.method");
                if mm.service.is_none() && mm.method.is_none() {
                    s.err(p.clone(), "at least one of service or method is required");
                }
                match mm.match_type() {
                    HeaderMatchType::Exact => {
                        if let Some(sv) = &mm.service
                            && !grpc_name_ok(sv, true)
                        {
                            s.err(
                                format!("{p}.service"),
                                "not a valid gRPC service name (e.g. pkg.v1.Service)",
                            );
                        }
                        if let Some(me) = &mm.method
                            && !grpc_name_ok(me, false)
                        {
                            s.err(format!("{p}.method"), "not a valid gRPC method name");
                        }
                    }
                    HeaderMatchType::RegularExpression => {
                        if let Some(sv) = &mm.service {
                            check_regex(s, &format!("{p}.service"), sv);
                        }
                        if let Some(me) = &mm.method {
                            check_regex(s, &format!("{p}.method"), me);
                        }
                    }
                }
            }
            header_matches(&format!("{mp}.headers"), &m.headers, false, s);
        }
        let mut seen = HashSet::new();
        for (fi, f) in rule.filters.iter().enumerate() {
            let fp = format!("{rp}.filters[{fi}]");
            let (want, other, wname, oname) = match f.filter_type {
                GrpcRouteFilterType::RequestHeaderModifier => (
                    &f.request_header_modifier,
                    &f.response_header_modifier,
                    "requestHeaderModifier",
                    "responseHeaderModifier",
                ),
                GrpcRouteFilterType::ResponseHeaderModifier => (
                    &f.response_header_modifier,
                    &f.request_header_modifier,
                    "responseHeaderModifier",
                    "requestHeaderModifier",
                ),
            };
            match want {
                Some(m) => header_modifier(&format!("{fp}.{wname}"), m, s),
                None => s.err(format!("{fp}.{wname}"), "required for this filter type"),
            }
            if other.is_some() {
                s.err(
                    format!("{fp}.{oname}"),
                    "must not be set for this filter type",
                );
            }
            if !seen.insert(f.filter_type) {
                s.err(fp, "each filter type may appear at most once per rule");
            }
        }
        backend_refs(&rp, &rule.backend_refs, s);
    }
}

pub(crate) fn l4_route(
    parents: &[ParentReference],
    hosts: Option<&[String]>,
    rules: &[L4RouteRule],
    s: &mut Sink,
) {
    parent_refs(parents, s);
    if let Some(h) = hosts {
        hostnames(h, s);
    }
    match rules.len() {
        0 => s.err("spec.rules", "exactly one rule is required"),
        1 => {}
        _ => s.err("spec.rules", "only one rule is supported (TCP and TLS routes have no matches to choose between rules)"),
    }
    rule_names(rules.iter().map(|x| x.name.as_ref()), s);
    for (ri, rule) in rules.iter().enumerate() {
        let rp = format!("spec.rules[{ri}]");
        if rule.backend_refs.is_empty() {
            s.err(
                format!("{rp}.backendRefs"),
                "at least one backendRef is required",
            );
        }
        backend_refs(&rp, &rule.backend_refs, s);
    }
}

// ------------------------------------------------------------------ Backend

pub(crate) fn backend(b: &Backend, s: &mut Sink) {
    let mut seen = HashSet::new();
    for (i, e) in b.spec.endpoints.iter().enumerate() {
        let p = format!("spec.endpoints[{i}]");
        if e.ip().is_none() && !is_dns_subdomain(&e.address.to_ascii_lowercase()) {
            s.err(
                format!("{p}.address"),
                format!("{:?} is neither an IP address nor a DNS name", e.address),
            );
        }
        check_port(s, &format!("{p}.port"), e.port);
        if let Some(w) = e.weight
            && !(1..=MAX_WEIGHT).contains(&w)
        {
            s.err(
                format!("{p}.weight"),
                format!("must be between 1 and {MAX_WEIGHT}"),
            );
        }
        if !seen.insert((e.address.to_ascii_lowercase(), e.port)) {
            s.err(p, format!("duplicate endpoint {}:{}", e.address, e.port));
        }
    }
    if let Some(lb) = &b.spec.load_balancer
        && let Some(h) = &lb.hash_on
    {
        let p = "spec.loadBalancer.hashOn";
        if !lb.lb_type().is_hash() {
            s.err(
                p,
                format!(
                    "only valid with type RingHash or Maglev (type is {:?})",
                    lb.lb_type()
                ),
            );
        }
        let set = usize::from(h.header.is_some())
            + usize::from(h.cookie.is_some())
            + usize::from(h.source_ip.is_some());
        if set != 1 {
            s.err(p, "set exactly one of header, cookie or sourceIP");
        }
        if h.source_ip == Some(false) {
            s.err(format!("{p}.sourceIP"), "must be true when set");
        }
        if let Some(name) = &h.header
            && !is_token(name)
        {
            s.err(format!("{p}.header"), "not a valid header name");
        }
        if let Some(name) = &h.cookie
            && !is_token(name)
        {
            s.err(format!("{p}.cookie"), "not a valid cookie name");
        }
    }
    if let Some(d) = &b.spec.connect_timeout {
        match d.parsed() {
            Ok(v) if v.is_zero() => s.err("spec.connectTimeout", "must be greater than 0"),
            Ok(_) => {}
            Err(e) => s.err("spec.connectTimeout", e.to_string()),
        }
    }
}
