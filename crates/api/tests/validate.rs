//! One test per semantic validation rule, each asserting the exact field path.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

mod common;

use common::*;

const BACKENDS: &str = "    backendRefs: [{group: biplane.dev, kind: Backend, name: b}]\n";

#[test]
fn names_and_namespaces() {
    let e = errs(
        &backend("  endpoints: []\n").replace("name: be", "name: Bad_Name, namespace: \"a.b\""),
    );
    has(&e, "metadata.name", "not a valid Backend name");
    has(&e, "metadata.namespace", "not a valid namespace");
    let e = errs(&backend("  endpoints: []\n").replace("name: be", "name: \"\""));
    has(&e, "metadata.name", "must not be empty");
}

#[test]
fn ports_in_range() {
    let e = errs(&gateway(
        "  listeners: [{name: a, port: 0, protocol: HTTP}]\n",
    ));
    has(&e, "spec.listeners[0].port", "must be between 1 and 65535");
    let e = errs(&backend(
        "  endpoints: [{address: 10.0.0.1, port: 0}, {address: 10.0.0.1, port: 65536}]\n",
    ));
    has(&e, "spec.endpoints[0].port", "must be between 1 and 65535");
    has(
        &e,
        "spec.endpoints[1].port",
        "must be between 1 and 65535, got 65536",
    );
    let e = errs(&http_route("  parentRefs: [{name: gw, port: 0}]\n"));
    has(&e, "spec.parentRefs[0].port", "must be between 1 and 65535");
}

#[test]
fn weights_in_range() {
    let e = errs(&http_route(
        "  rules:\n  - backendRefs: [{name: a, weight: 1000001}, {name: b, weight: -1}, {name: c, weight: 0}]\n",
    ));
    has(
        &e,
        "spec.rules[0].backendRefs[0].weight",
        "must be between 0 and 1000000",
    );
    has(
        &e,
        "spec.rules[0].backendRefs[1].weight",
        "must be between 0 and 1000000, got -1",
    );
    assert_eq!(e.len(), 2, "weight 0 is allowed: {e:?}");
    let e = errs(&backend(
        "  endpoints: [{address: a.test, port: 1, weight: 0}]\n",
    ));
    has(
        &e,
        "spec.endpoints[0].weight",
        "must be between 1 and 1000000",
    );
    let e = errs(&backend(
        "  endpoints: [{address: a.test, port: 1, weight: -2}]\n",
    ));
    has(
        &e,
        "spec.endpoints[0].weight",
        "must be between 1 and 1000000, got -2",
    );
}

#[test]
fn listener_names_unique() {
    let e = errs(&gateway(
        "  listeners:\n  - {name: a, port: 80, protocol: HTTP}\n  - {name: a, port: 81, protocol: HTTP}\n  - {name: A, port: 82, protocol: HTTP}\n",
    ));
    has(
        &e,
        "spec.listeners[1].name",
        "duplicate listener name \"a\" (also spec.listeners[0])",
    );
    has(&e, "spec.listeners[2].name", "not a valid name");
    let e = errs(&gateway("  listeners: []\n"));
    has(&e, "spec.listeners", "at least one listener is required");
}

#[test]
fn protocol_and_tls_consistency() {
    let e = errs(&gateway(
        "  listeners:\n\
         \x20 - {name: a, port: 443, protocol: HTTPS}\n\
         \x20 - {name: b, port: 444, protocol: HTTPS, tls: {mode: Passthrough}}\n\
         \x20 - {name: c, port: 445, protocol: HTTPS, tls: {}}\n\
         \x20 - {name: d, port: 80, protocol: HTTP, tls: {certificateRefs: [{name: x}]}}\n\
         \x20 - {name: e, port: 90, protocol: TCP, tls: {mode: Passthrough}}\n\
         \x20 - {name: f, port: 446, protocol: TLS}\n\
         \x20 - {name: g, port: 447, protocol: TLS, tls: {mode: Passthrough, certificateRefs: [{name: x}]}}\n\
         \x20 - {name: h, port: 448, protocol: TLS, tls: {mode: Terminate}}\n\
         \x20 - {name: i, port: 449, protocol: TLS, tls: {mode: Terminate, certificateRefs: [{name: x}]}}\n",
    ));
    has(&e, "spec.listeners[0].tls", "required with protocol HTTPS");
    has(
        &e,
        "spec.listeners[1].tls.mode",
        "use protocol TLS for Passthrough",
    );
    has(
        &e,
        "spec.listeners[2].tls.certificateRefs",
        "at least one certificateRef is required",
    );
    has(
        &e,
        "spec.listeners[3].tls",
        "must not be set with protocol HTTP",
    );
    has(
        &e,
        "spec.listeners[4].tls",
        "must not be set with protocol TCP",
    );
    has(&e, "spec.listeners[5].tls", "required with protocol TLS");
    has(
        &e,
        "spec.listeners[6].tls.certificateRefs",
        "must be empty with mode Passthrough",
    );
    has(
        &e,
        "spec.listeners[7].tls.certificateRefs",
        "at least one certificateRef is required",
    );
    assert_eq!(e.len(), 8, "listener i is valid: {e:?}");
}

#[test]
fn listener_port_conflicts() {
    let e = errs(&gateway(
        "  listeners:\n\
         \x20 - {name: a, port: 80, protocol: HTTP}\n\
         \x20 - {name: b, port: 80, protocol: TCP}\n\
         \x20 - {name: c, port: 80, protocol: HTTP, hostname: a.test}\n\
         \x20 - {name: d, port: 80, protocol: HTTP}\n\
         \x20 - {name: e, port: 443, protocol: HTTPS, hostname: a.test, tls: {certificateRefs: [{name: x}]}}\n\
         \x20 - {name: f, port: 443, protocol: TLS, hostname: b.test, tls: {mode: Passthrough}}\n\
         \x20 - {name: g, port: 443, protocol: TLS, hostname: a.test, tls: {mode: Passthrough}}\n\
         \x20 - {name: h, port: 9000, protocol: TCP}\n\
         \x20 - {name: i, port: 9000, protocol: TCP}\n",
    ));
    has(
        &e,
        "spec.listeners[1].protocol",
        "port 80 is already used by listener \"a\" with protocol HTTP; TCP cannot share it",
    );
    has(
        &e,
        "spec.listeners[2].protocol",
        "port 80 is already used by listener \"b\" with protocol TCP; HTTP cannot share it",
    );
    has(
        &e,
        "spec.listeners[3].hostname",
        "conflicts with listener \"a\" (spec.listeners[0]): same port 80 and hostname (any)",
    );
    has(
        &e,
        "spec.listeners[6].hostname",
        "conflicts with listener \"e\"",
    );
    has(
        &e,
        "spec.listeners[8].hostname",
        "conflicts with listener \"h\" (spec.listeners[7]): same port 9000",
    );
    assert_eq!(e.len(), 5, "f (HTTPS+TLS on one port) is fine: {e:?}");
}

#[test]
fn listener_hostname_and_allowed_routes() {
    let e = errs(&gateway(
        "  listeners:\n\
         \x20 - {name: a, port: 80, protocol: HTTP, hostname: \"10.0.0.1\"}\n\
         \x20 - {name: b, port: 81, protocol: HTTP, hostname: \"a.*.test\"}\n\
         \x20 - {name: c, port: 82, protocol: TCP, hostname: a.test}\n\
         \x20 - {name: d, port: 83, protocol: HTTP, allowedRoutes: {namespaces: {from: Selector}, kinds: [{kind: TCPRoute}, {kind: Foo}]}}\n",
    ));
    has(&e, "spec.listeners[0].hostname", "is an IP address");
    has(&e, "spec.listeners[1].hostname", "not a valid hostname");
    has(
        &e,
        "spec.listeners[2].hostname",
        "not supported with protocol TCP",
    );
    has(
        &e,
        "spec.listeners[3].allowedRoutes.namespaces.from",
        "Selector is not supported",
    );
    has(
        &e,
        "spec.listeners[3].allowedRoutes.kinds[0].kind",
        "TCPRoute cannot attach to a HTTP listener",
    );
    has(
        &e,
        "spec.listeners[3].allowedRoutes.kinds[1]",
        "unsupported route kind gateway.networking.k8s.io/Foo",
    );
}

#[test]
fn gateway_addresses() {
    let e = errs(&gateway(
        "  listeners: [{name: a, port: 80, protocol: HTTP}]\n  addresses: [{value: nope}, {type: Hostname, value: gw.test}, {type: NamedAddress, value: x}]\n",
    ));
    has(&e, "spec.addresses[0].value", "not an IP address");
    has(&e, "spec.addresses[2].type", "unsupported address type");
    assert_eq!(e.len(), 2);
}

#[test]
fn path_values() {
    let e = errs(&http_route(
        "  rules:\n  - matches:\n    - path: {type: PathPrefix, value: api}\n    - path: {type: Exact, value: \"/a?b\"}\n    - path: {value: \"/a//b\"}\n    - path: {type: RegularExpression, value: \"/a(\"}\n    - path: {type: RegularExpression, value: \"/a/.*\"}\n",
    ));
    has(
        &e,
        "spec.rules[0].matches[0].path.value",
        "must start with \"/\"",
    );
    has(
        &e,
        "spec.rules[0].matches[1].path.value",
        "must not contain '?' or '#'",
    );
    has(
        &e,
        "spec.rules[0].matches[2].path.value",
        "must not contain \"//\"",
    );
    has(
        &e,
        "spec.rules[0].matches[3].path.value",
        "invalid regular expression",
    );
    assert_eq!(e.len(), 4);
}

#[test]
fn header_and_query_matches() {
    let e = errs(&http_route(
        "  rules:\n  - matches:\n    - headers:\n      - {name: \"bad name\", value: x}\n      - {name: X-A, value: x}\n      - {name: x-a, value: y}\n      - {type: RegularExpression, name: x-b, value: \"[\"}\n      queryParams:\n      - {name: \"a=b\", value: x}\n      - {type: RegularExpression, name: q, value: \"(\"}\n      - {name: Q, value: x}\n",
    ));
    has(
        &e,
        "spec.rules[0].matches[0].headers[0].name",
        "not a valid header name",
    );
    has(
        &e,
        "spec.rules[0].matches[0].headers[2].name",
        "duplicate match on \"x-a\"",
    );
    has(
        &e,
        "spec.rules[0].matches[0].headers[3].value",
        "invalid regular expression",
    );
    has(
        &e,
        "spec.rules[0].matches[0].queryParams[0].name",
        "not a valid query parameter name",
    );
    has(
        &e,
        "spec.rules[0].matches[0].queryParams[1].value",
        "invalid regular expression",
    );
    assert_eq!(e.len(), 5, "query names are case-sensitive: {e:?}");
}

#[test]
fn method_enum() {
    let e = errs(&http_route("  rules:\n  - matches: [{method: FETCH}]\n"));
    has(
        &e,
        "spec.rules[0].matches[0].method",
        "unsupported value \"FETCH\"",
    );
}

#[test]
fn filter_type_and_payload_consistency() {
    let e = errs(&http_route(
        "  rules:\n  - filters:\n    - type: RequestHeaderModifier\n    - type: ResponseHeaderModifier\n      requestHeaderModifier: {set: [{name: a, value: b}]}\n      responseHeaderModifier: {remove: [\"bad header\"]}\n    - type: RequestMirror\n",
    ));
    has(
        &e,
        "spec.rules[0].filters[0].requestHeaderModifier",
        "required when type is RequestHeaderModifier",
    );
    has(
        &e,
        "spec.rules[0].filters[1].requestHeaderModifier",
        "must not be set when type is ResponseHeaderModifier",
    );
    has(
        &e,
        "spec.rules[0].filters[1].responseHeaderModifier.remove[0]",
        "not a valid header name",
    );
    has(
        &e,
        "spec.rules[0].filters[2].type",
        "unsupported value \"RequestMirror\"",
    );
}

#[test]
fn header_modifier_rules() {
    let e = errs(&http_route(
        "  rules:\n  - filters:\n    - type: RequestHeaderModifier\n      requestHeaderModifier:\n        set: [{name: a, value: \"x\\ny\"}, {name: A, value: z}]\n    - type: ResponseHeaderModifier\n      responseHeaderModifier: {}\n",
    ));
    has(
        &e,
        "spec.rules[0].filters[0].requestHeaderModifier.set[0].value",
        "must not contain CR, LF or NUL",
    );
    has(
        &e,
        "spec.rules[0].filters[0].requestHeaderModifier.set[1].name",
        "duplicate header",
    );
    has(
        &e,
        "spec.rules[0].filters[1].responseHeaderModifier",
        "at least one of set, add or remove",
    );
}

#[test]
fn redirect_rules() {
    let e = errs(&http_route(
        "  rules:\n  - filters:\n    - type: RequestRedirect\n      requestRedirect: {scheme: ftp, statusCode: 304, port: 0, hostname: \"*.a.test\", path: {type: ReplaceFullPath}}\n",
    ));
    let p = "spec.rules[0].filters[0].requestRedirect";
    has(&e, &format!("{p}.scheme"), "must be http or https");
    has(
        &e,
        &format!("{p}.statusCode"),
        "304 is not allowed (301, 302, 303, 307 or 308)",
    );
    has(&e, &format!("{p}.port"), "must be between 1 and 65535");
    has(
        &e,
        &format!("{p}.hostname"),
        "wildcards are not allowed here",
    );
    has(
        &e,
        &format!("{p}.path.replaceFullPath"),
        "required when type is ReplaceFullPath",
    );
    let e = errs(&http_route(&format!(
        "  rules:\n  - filters:\n    - type: RequestRedirect\n      requestRedirect: {{statusCode: 301}}\n{BACKENDS}"
    )));
    has(
        &e,
        "spec.rules[0].backendRefs",
        "must be empty when the rule has a RequestRedirect filter",
    );
}

#[test]
fn redirect_and_rewrite_not_together() {
    let e = errs(&http_route(
        "  rules:\n  - filters:\n    - type: RequestRedirect\n      requestRedirect: {statusCode: 302}\n    - type: URLRewrite\n      urlRewrite: {hostname: a.test}\n",
    ));
    has(
        &e,
        "spec.rules[0].filters",
        "RequestRedirect and URLRewrite cannot be used together in one rule",
    );
    let e = errs(&http_route(
        "  rules:\n  - filters:\n    - type: URLRewrite\n      urlRewrite: {hostname: a.test}\n    - type: URLRewrite\n      urlRewrite: {hostname: b.test}\n",
    ));
    has(
        &e,
        "spec.rules[0].filters",
        "URLRewrite may appear at most once per rule",
    );
}

#[test]
fn replace_prefix_match_needs_one_path_prefix_match() {
    let rewrite = "    filters:\n    - type: URLRewrite\n      urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}\n";
    // Default match (PathPrefix /) and an explicit PathPrefix are fine.
    ok(&http_route(&format!(
        "  rules:\n  - {}{BACKENDS}",
        rewrite.trim_start()
    )));
    ok(&http_route(&format!(
        "  rules:\n  - matches: [{{path: {{value: /api}}}}]\n{rewrite}{BACKENDS}"
    )));
    let e = errs(&http_route(&format!(
        "  rules:\n  - matches: [{{path: {{type: Exact, value: /api}}}}]\n{rewrite}{BACKENDS}"
    )));
    has(
        &e,
        "spec.rules[0].filters[0].urlRewrite.path.type",
        "ReplacePrefixMatch requires the rule to have exactly one match, of type PathPrefix",
    );
    let e = errs(&http_route(&format!(
        "  rules:\n  - matches: [{{path: {{value: /a}}}}, {{path: {{value: /b}}}}]\n{rewrite}{BACKENDS}"
    )));
    has(
        &e,
        "spec.rules[0].filters[0].urlRewrite.path.type",
        "exactly one match",
    );
    let e = errs(&http_route(
        "  rules:\n  - filters:\n    - type: URLRewrite\n      urlRewrite: {path: {type: ReplacePrefixMatch, replaceFullPath: /x}}\n",
    ));
    has(
        &e,
        "spec.rules[0].filters[0].urlRewrite.path.replacePrefixMatch",
        "required when type is ReplacePrefixMatch",
    );
    has(
        &e,
        "spec.rules[0].filters[0].urlRewrite.path.replaceFullPath",
        "must not be set when type is ReplacePrefixMatch",
    );
}

#[test]
fn timeouts() {
    let e = errs(&http_route(
        "  rules:\n  - timeouts: {request: 1s, backendRequest: 2s}\n  - timeouts: {request: 10 seconds}\n  - timeouts: {backendRequest: 1h1h}\n",
    ));
    has(
        &e,
        "spec.rules[0].timeouts.backendRequest",
        "must not be longer than timeouts.request (1s)",
    );
    has(
        &e,
        "spec.rules[1].timeouts.request",
        "invalid duration \"10 seconds\"",
    );
    has(
        &e,
        "spec.rules[2].timeouts.backendRequest",
        "a unit appears twice",
    );
    // request 0s = no limit, so any backendRequest is fine.
    ok(&http_route(
        "  rules:\n  - timeouts: {request: 0s, backendRequest: 5s}\n",
    ));
}

#[test]
fn route_hostnames_parent_refs_rule_names() {
    let e = errs(&http_route(
        "  parentRefs: [{name: \"\", sectionName: \"Bad Name\"}]\n  hostnames: [a.test, a.test, \"*\", \"1.2.3.4\", \"a.test:80\"]\n  rules:\n  - {name: r}\n  - {name: r}\n",
    ));
    has(&e, "spec.parentRefs[0].name", "must not be empty");
    has(&e, "spec.parentRefs[0].sectionName", "not a valid name");
    has(&e, "spec.hostnames[1]", "duplicate hostname");
    has(&e, "spec.hostnames[2]", "not a valid hostname");
    has(&e, "spec.hostnames[3]", "is an IP address");
    has(&e, "spec.hostnames[4]", "must not contain a port");
    has(&e, "spec.rules[1].name", "duplicate rule name \"r\"");
}

#[test]
fn backend_ref_filters_rejected_but_other_kinds_are_not_schema_errors() {
    let e = errs(&http_route(
        "  rules:\n  - backendRefs: [{name: b, filters: [{type: RequestHeaderModifier}]}]\n",
    ));
    has(
        &e,
        "spec.rules[0].backendRefs[0].filters",
        "per-backend filters are not supported",
    );
    // A core Service reference is not a validation error (see ResourceSet::resolve_refs).
    ok(&http_route(
        "  rules:\n  - backendRefs: [{kind: Service, name: b, port: 80}]\n",
    ));
}

#[test]
fn grpc_rules() {
    let e = errs(&grpc_route(
        "  rules:\n  - matches:\n    - method: {}\n    - method: {service: \"9bad\", method: \"a.b\"}\n    - method: {type: RegularExpression, service: \"(\", method: \"[\"}\n    - headers: [{name: \"x y\", value: a}]\n    filters:\n    - type: RequestHeaderModifier\n      responseHeaderModifier: {set: [{name: a, value: b}]}\n    - type: URLRewrite\n",
    ));
    has(
        &e,
        "spec.rules[0].matches[0].method",
        "at least one of service or method is required",
    );
    has(
        &e,
        "spec.rules[0].matches[1].method.service",
        "not a valid gRPC service name",
    );
    has(
        &e,
        "spec.rules[0].matches[1].method.method",
        "not a valid gRPC method name",
    );
    has(
        &e,
        "spec.rules[0].matches[2].method.service",
        "invalid regular expression",
    );
    has(
        &e,
        "spec.rules[0].matches[2].method.method",
        "invalid regular expression",
    );
    has(
        &e,
        "spec.rules[0].matches[3].headers[0].name",
        "not a valid header name",
    );
    has(
        &e,
        "spec.rules[0].filters[0].requestHeaderModifier",
        "required for this filter type",
    );
    has(
        &e,
        "spec.rules[0].filters[0].responseHeaderModifier",
        "must not be set for this filter type",
    );
    has(
        &e,
        "spec.rules[0].filters[1].type",
        "unsupported value \"URLRewrite\"",
    );
}

#[test]
fn tcp_and_tls_routes() {
    let tcp = "apiVersion: gateway.networking.k8s.io/v1alpha2\nkind: TCPRoute\nmetadata: {name: t}\nspec:\n";
    let e = errs(&format!("{tcp}  rules: []\n"));
    has(&e, "spec.rules", "exactly one rule is required");
    let e = errs(&format!(
        "{tcp}  rules: [{{backendRefs: [{{name: a}}]}}, {{backendRefs: [{{name: b}}]}}]\n"
    ));
    has(&e, "spec.rules", "only one rule is supported");
    let e = errs(&format!("{tcp}  rules: [{{}}]\n  hostnames: [a.test]\n"));
    has(
        &e,
        "spec.rules[0].backendRefs",
        "at least one backendRef is required",
    );
    has(&e, "spec.hostnames", "unknown field");
    let tls = "apiVersion: gateway.networking.k8s.io/v1alpha2\nkind: TLSRoute\nmetadata: {name: t}\nspec:\n";
    let e = errs(&format!(
        "{tls}  hostnames: [\"A.test\"]\n  rules: [{{backendRefs: [{{name: a}}]}}]\n"
    ));
    has(&e, "spec.hostnames[0]", "not a valid hostname");
}

#[test]
fn backend_rules() {
    let e = errs(&backend(
        "  endpoints:\n  - {address: \"not an address\", port: 80}\n  - {address: 10.0.0.1, port: 80}\n  - {address: 10.0.0.1, port: 80}\n  loadBalancer: {type: RoundRobin, hashOn: {header: x, cookie: y}}\n  connectTimeout: 0s\n  appProtocol: h3\n",
    ));
    has(
        &e,
        "spec.endpoints[0].address",
        "neither an IP address nor a DNS name",
    );
    has(&e, "spec.endpoints[2]", "duplicate endpoint 10.0.0.1:80");
    has(
        &e,
        "spec.loadBalancer.hashOn",
        "only valid with type RingHash or Maglev",
    );
    has(
        &e,
        "spec.loadBalancer.hashOn",
        "set exactly one of header, cookie or sourceIP",
    );
    has(
        &e,
        "spec.appProtocol",
        "unsupported value \"h3\" (expected one of: http, h2c)",
    );
    // A schema error in spec.appProtocol does not hide semantic errors of other spec fields.
    has(&e, "spec.connectTimeout", "must be greater than 0");
    let e = errs(&backend(
        "  loadBalancer: {type: Maglev, hashOn: {sourceIP: false}}\n  connectTimeout: soon\n",
    ));
    has(
        &e,
        "spec.loadBalancer.hashOn.sourceIP",
        "must be true when set",
    );
    has(&e, "spec.connectTimeout", "invalid duration \"soon\"");
    let e = errs(&backend(
        "  loadBalancer: {type: RingHash, hashOn: {cookie: \"a b\"}}\n",
    ));
    has(
        &e,
        "spec.loadBalancer.hashOn.cookie",
        "not a valid cookie name",
    );
    // RingHash without hashOn is fine (random key); IPv6 and DNS names are fine.
    ok(&backend(
        "  endpoints: [{address: \"fd00::1\", port: 1}, {address: Svc.Example.test, port: 2}]\n  loadBalancer: {type: RingHash}\n",
    ));
}
