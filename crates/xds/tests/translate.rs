//! Resources (YAML) → xDS → runtime config, asserting behaviour-level facts: route order
//! by Gateway API precedence, weights, redirects, rewrites, SNI chains, TCP and TLS
//! passthrough, hash policies, 500 for unresolved references, and gateway selection.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::time::Duration;

use base64::Engine;
use biplane_config as cfg;
use biplane_xds::{StaticError, TranslateOptions, XdsResources, compile_static, static_xds};

fn opts() -> TranslateOptions {
    TranslateOptions {
        bind_ip: "127.0.0.1".parse().unwrap(),
    }
}

fn compile(yaml: &str) -> cfg::Config {
    compile_static(yaml, None, &opts()).unwrap_or_else(|e| panic!("{e}"))
}

fn xds(yaml: &str) -> XdsResources {
    static_xds(yaml, None, &opts())
        .unwrap_or_else(|e| panic!("{e}"))
        .2
}

fn vhost<'a>(c: &'a cfg::Config, rc: &str, domain: &str) -> &'a cfg::VirtualHost {
    let rc = c
        .route_configs
        .iter()
        .find(|r| r.name == rc)
        .unwrap_or_else(|| panic!("no route config {rc}"));
    rc.virtual_hosts
        .iter()
        .find(|v| v.domains.iter().any(|d| d == domain))
        .unwrap_or_else(|| {
            panic!(
                "no vhost {domain} in {:?}",
                rc.virtual_hosts
                    .iter()
                    .map(|v| &v.domains)
                    .collect::<Vec<_>>()
            )
        })
}

fn route_names(vh: &cfg::VirtualHost) -> Vec<&str> {
    vh.routes.iter().map(|r| r.name.as_str()).collect()
}

fn forward(r: &cfg::Route) -> &cfg::Forward {
    match &r.action {
        cfg::RouteAction::Forward(f) => f,
        other => panic!("{}: not a forward: {other:?}", r.name),
    }
}

const BACKENDS: &str = r#"
apiVersion: biplane.dev/v1alpha1
kind: Backend
metadata: {name: a}
spec:
  endpoints: [{address: 127.0.0.1, port: 9001, weight: 3}, {address: 127.0.0.1, port: 9002}]
---
apiVersion: biplane.dev/v1alpha1
kind: Backend
metadata: {name: b}
spec:
  endpoints: [{address: 127.0.0.1, port: 9003}]
  loadBalancer: {type: RingHash, hashOn: {header: x-user}}
"#;

const HTTP_GATEWAY: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: gw}
spec:
  listeners:
  - {name: http, port: 8080, protocol: HTTP}
"#;

fn with_http(routes: &str) -> String {
    format!("{HTTP_GATEWAY}---{BACKENDS}---{routes}")
}

#[test]
fn example_file_round_trips() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/static.yaml"
    ))
    .unwrap();
    let c = compile(&text);
    assert_eq!(c.listeners.len(), 1);
    assert_eq!(c.listeners[0].address.to_string(), "127.0.0.1:8080");
    let vh = vhost(&c, "route-8080", "*");
    // /old and /api are the longer prefixes; the header rule beats the catch-all.
    let paths: Vec<String> = vh
        .routes
        .iter()
        .map(|r| format!("{:?}", r.matcher.path))
        .collect();
    assert_eq!(paths.len(), 4, "{paths:?}");
    assert!(
        matches!(vh.routes[3].action, cfg::RouteAction::Forward(ref f) if f.clusters.len() == 2)
    );
    assert_eq!(
        vh.routes[2].matcher.headers.len(),
        1,
        "header rule before the catch-all"
    );
    let split = forward(&vh.routes[3]);
    let w: Vec<_> = split
        .clusters
        .iter()
        .map(|c| (c.name.as_str(), c.weight))
        .collect();
    assert_eq!(
        w,
        vec![
            ("backend/default/echo-a", 80),
            ("backend/default/echo-b", 20)
        ]
    );
    assert_eq!(c.clusters.len(), 2);
    assert!(c.version.starts_with("static-"));
}

#[test]
fn precedence_across_routes() {
    let routes = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: older}
spec:
  parentRefs: [{name: gw}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /}}]
    backendRefs: [{group: biplane.dev, kind: Backend, name: a}]
  - matches: [{path: {type: RegularExpression, value: "/re/.*"}}]
    backendRefs: [{group: biplane.dev, kind: Backend, name: a}]
  - matches: [{path: {type: PathPrefix, value: /api}}]
    backendRefs: [{group: biplane.dev, kind: Backend, name: a}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: newer}
spec:
  parentRefs: [{name: gw}]
  rules:
  - matches:
    - path: {type: PathPrefix, value: /api}
      headers: [{name: x-a, value: "1"}]
    - path: {type: PathPrefix, value: /api}
      method: GET
    - path: {type: PathPrefix, value: /api}
      queryParams: [{name: q, value: "1"}]
    - path: {type: PathPrefix, value: /api/v1}
    - path: {type: Exact, value: /api}
    - path: {type: PathPrefix, value: /}
    backendRefs: [{group: biplane.dev, kind: Backend, name: b}]
"#;
    let c = compile(&with_http(routes));
    let vh = vhost(&c, "route-8080", "*");
    assert_eq!(
        route_names(vh),
        vec![
            "httproute/default/newer/rule/0/match/4", // exact
            "httproute/default/older/rule/1/match/0", // regex before prefixes
            "httproute/default/newer/rule/0/match/3", // longest prefix /api/v1
            "httproute/default/newer/rule/0/match/1", // /api + method
            "httproute/default/newer/rule/0/match/0", // /api + 1 header
            "httproute/default/newer/rule/0/match/2", // /api + 1 query param
            "httproute/default/older/rule/2/match/0", // /api, older route first
            "httproute/default/older/rule/0/match/0", // `/` older
            "httproute/default/newer/rule/0/match/5", // `/` newer
        ]
    );
    assert!(matches!(&vh.routes[2].matcher.path, cfg::PathMatch::Prefix(p) if p == "/api/v1"));
    assert_eq!(vh.routes[3].matcher.method.as_deref(), Some("GET"));
    assert!(
        matches!(&vh.routes[1].matcher.path, cfg::PathMatch::Regex(r) if r.is_match("/re/x") && !r.is_match("/x/re/x"))
    );
}

#[test]
fn filters_timeouts_and_hash_policy() {
    let routes = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r}
spec:
  parentRefs: [{name: gw}]
  hostnames: [app.example.com]
  rules:
  - matches: [{path: {type: PathPrefix, value: /old}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {scheme: https, hostname: new.example.com, port: 8443, statusCode: 301,
                        path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}}
  - matches: [{path: {type: PathPrefix, value: /v1}}]
    filters:
    - type: URLRewrite
      urlRewrite: {hostname: internal, path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: X-Set, value: "1"}]
        add: [{name: x-add, value: "2"}]
        remove: [x-drop]
    - type: ResponseHeaderModifier
      responseHeaderModifier: {set: [{name: x-served-by, value: biplane}]}
    timeouts: {request: 10s, backendRequest: 2s}
    backendRefs:
    - {group: biplane.dev, kind: Backend, name: a, weight: 1}
    - {group: biplane.dev, kind: Backend, name: b, weight: 3}
  - matches: [{path: {type: PathPrefix, value: /strip}}]
    filters:
    - type: URLRewrite
      urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}
    backendRefs: [{group: biplane.dev, kind: Backend, name: a}]
  - matches: [{path: {type: Exact, value: /full}}]
    filters:
    - type: URLRewrite
      urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /other}}
    backendRefs: [{group: biplane.dev, kind: Backend, name: a}]
"#;
    let c = compile(&with_http(routes));
    let vh = vhost(&c, "route-8080", "app.example.com");
    let by = |suffix: &str| vh.routes.iter().find(|r| r.name.ends_with(suffix)).unwrap();

    let cfg::RouteAction::Redirect(rd) = &by("rule/0/match/0").action else {
        panic!("redirect")
    };
    assert_eq!(
        (rd.scheme.as_deref(), rd.host.as_deref(), rd.port, rd.status),
        (Some("https"), Some("new.example.com"), Some(8443), 301)
    );
    assert!(matches!(&rd.path, Some(cfg::RedirectPath::ReplacePrefix(p)) if p == "/new"));

    let r1 = by("rule/1/match/0");
    let f = forward(r1);
    assert!(matches!(&f.path_rewrite, Some(cfg::PathRewrite::ReplacePrefix(p)) if p == "/v2"));
    assert_eq!(f.host_rewrite.as_deref(), Some("internal"));
    assert_eq!(f.timeout, Some(Duration::from_secs(10)));
    assert_eq!(f.per_try_timeout, Some(Duration::from_secs(2)));
    let w: Vec<_> = f.clusters.iter().map(|c| c.weight).collect();
    assert_eq!(w, vec![1, 3]);
    assert!(
        matches!(&f.hash_policy[..], [cfg::HashPolicy::Header(h)] if h == "x-user"),
        "b hashes on x-user"
    );
    assert_eq!(
        r1.request_headers.set,
        vec![("x-set".to_owned(), "1".to_owned())]
    );
    assert_eq!(
        r1.request_headers.add,
        vec![("x-add".to_owned(), "2".to_owned())]
    );
    assert_eq!(r1.request_headers.remove, vec!["x-drop"]);
    assert_eq!(
        r1.response_headers.set,
        vec![("x-served-by".to_owned(), "biplane".to_owned())]
    );

    // ReplacePrefixMatch "/" must not produce "//x".
    let Some(cfg::PathRewrite::Regex {
        pattern,
        substitution,
    }) = &forward(by("rule/2/match/0")).path_rewrite
    else {
        panic!("regex rewrite")
    };
    assert_eq!(
        pattern.replace_all("/strip/x/y", substitution.as_str()),
        "/x/y"
    );
    assert_eq!(pattern.replace_all("/strip", substitution.as_str()), "/");

    let Some(cfg::PathRewrite::Regex {
        pattern,
        substitution,
    }) = &forward(by("rule/3/match/0")).path_rewrite
    else {
        panic!("regex rewrite")
    };
    assert_eq!(
        pattern.replace_all("/full", substitution.as_str()),
        "/other"
    );
    assert_eq!(
        forward(by("rule/3/match/0")).timeout,
        None,
        "no timeouts.request: no limit"
    );

    let b = c
        .clusters
        .iter()
        .find(|c| c.name == "backend/default/b")
        .unwrap();
    assert!(matches!(b.lb_policy, cfg::LbPolicy::RingHash { .. }));
    let a = c
        .clusters
        .iter()
        .find(|c| c.name == "backend/default/a")
        .unwrap();
    assert_eq!(
        a.endpoints.iter().map(|e| e.weight).collect::<Vec<_>>(),
        vec![3, 1]
    );
}

#[test]
fn unresolved_backends_answer_500() {
    let routes = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r}
spec:
  parentRefs: [{name: gw}]
  rules:
  - matches: [{path: {type: Exact, value: /missing}}]
    backendRefs: [{group: biplane.dev, kind: Backend, name: ghost}]
  - matches: [{path: {type: Exact, value: /service}}]
    backendRefs: [{name: some-k8s-service, port: 80}]
  - matches: [{path: {type: Exact, value: /none}}]
  - matches: [{path: {type: Exact, value: /partial}}]
    backendRefs:
    - {group: biplane.dev, kind: Backend, name: ghost, weight: 50}
    - {group: biplane.dev, kind: Backend, name: a, weight: 50}
"#;
    let c = compile(&with_http(routes));
    let vh = vhost(&c, "route-8080", "*");
    for rule in 0..3 {
        let r = vh
            .routes
            .iter()
            .find(|r| r.name.contains(&format!("rule/{rule}/")))
            .unwrap();
        assert!(
            matches!(&r.action, cfg::RouteAction::DirectResponse { status: 500, body } if body == "backend not found"),
            "{}: {:?}",
            r.name,
            r.action
        );
    }
    let partial = vh
        .routes
        .iter()
        .find(|r| r.name.contains("rule/3/"))
        .unwrap();
    let names: Vec<_> = forward(partial)
        .clusters
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    // Gateway API: the unresolved half is answered 500, through a cluster that never
    // exists and the route's cluster-not-found status.
    assert_eq!(
        names,
        vec!["backend/default/a", "biplane/unresolved-backend"]
    );
    let weights: Vec<_> = forward(partial).clusters.iter().map(|c| c.weight).collect();
    assert_eq!(weights, vec![50, 50]);
    assert_eq!(forward(partial).cluster_not_found_status, 500);
    assert_eq!(
        c.clusters.len(),
        1,
        "only referenced, resolved Backends become clusters"
    );
}

fn tls_secret(name: &str, host: &str) -> String {
    let ck = rcgen::generate_simple_self_signed(vec![host.to_owned()]).unwrap();
    let b64 = base64::engine::general_purpose::STANDARD;
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}}}\ntype: kubernetes.io/tls\ndata:\n  tls.crt: {}\n  tls.key: {}\n",
        b64.encode(ck.cert.pem()),
        b64.encode(ck.signing_key.serialize_pem())
    )
}

#[test]
fn sni_termination_passthrough_and_tcp() {
    let yaml = format!(
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: edge}}
spec:
  listeners:
  - name: one
    port: 8443
    protocol: HTTPS
    hostname: one.example.com
    tls: {{certificateRefs: [{{name: one-cert}}]}}
  - name: two
    port: 8443
    protocol: HTTPS
    hostname: two.example.com
    tls: {{certificateRefs: [{{name: two-cert}}]}}
  - name: pass
    port: 8443
    protocol: TLS
    hostname: "*.pass.example.com"
    tls: {{mode: Passthrough}}
  - {{name: raw, port: 9000, protocol: TCP}}
---
{}---
{}---
{BACKENDS}---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: web}}
spec:
  parentRefs: [{{name: edge}}]
  rules:
  - backendRefs: [{{group: biplane.dev, kind: Backend, name: a}}]
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TLSRoute
metadata: {{name: pass}}
spec:
  parentRefs: [{{name: edge, sectionName: pass}}]
  hostnames: [db.pass.example.com]
  rules:
  - backendRefs: [{{group: biplane.dev, kind: Backend, name: b}}]
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {{name: raw}}
spec:
  parentRefs: [{{name: edge, sectionName: raw}}]
  rules:
  - backendRefs: [{{group: biplane.dev, kind: Backend, name: a, weight: 2}}, {{group: biplane.dev, kind: Backend, name: b, weight: 1}}]
"#,
        tls_secret("one-cert", "one.example.com"),
        tls_secret("two-cert", "two.example.com")
    );
    let res = xds(&yaml);
    assert_eq!(
        res.secrets
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>(),
        vec!["default/one-cert", "default/two-cert"]
    );
    let tls_listener = res
        .listeners
        .iter()
        .find(|l| l.name == "listener-8443")
        .unwrap();
    assert_eq!(tls_listener.listener_filters.len(), 1, "tls_inspector");

    let c = compile(&yaml);
    let l = c
        .listeners
        .iter()
        .find(|l| l.name == "listener-8443")
        .unwrap();
    let sni: Vec<_> = l
        .filter_chains
        .iter()
        .map(|ch| (ch.matcher.server_names.clone(), ch.tls.is_some()))
        .collect();
    assert_eq!(
        sni,
        vec![
            (vec!["one.example.com".to_owned()], true),
            (vec!["two.example.com".to_owned()], true),
            (vec!["db.pass.example.com".to_owned()], false),
        ]
    );
    let one = &l.filter_chains[0];
    assert_eq!(
        one.tls.as_ref().unwrap().certificates[0].name,
        "default/one-cert"
    );
    assert_eq!(one.tls.as_ref().unwrap().alpn, vec!["h2", "http/1.1"]);
    let cfg::ChainHandler::Http(h) = &one.handler else {
        panic!("http")
    };
    assert_eq!(h.route_config_name, "route-8443-one");
    // Routes without hostnames get the listener's hostname as their virtual host.
    assert_eq!(
        route_names(vhost(&c, "route-8443-one", "one.example.com")),
        vec!["httproute/default/web/rule/0/match/0"]
    );
    let cfg::ChainHandler::Tcp(t) = &l.filter_chains[2].handler else {
        panic!("tcp")
    };
    assert_eq!(t.clusters[0].name, "backend/default/b");

    let raw = c
        .listeners
        .iter()
        .find(|l| l.name == "listener-9000")
        .unwrap();
    assert_eq!(raw.filter_chains.len(), 1);
    assert!(
        raw.filter_chains[0].matcher.server_names.is_empty() && raw.filter_chains[0].tls.is_none()
    );
    let cfg::ChainHandler::Tcp(t) = &raw.filter_chains[0].handler else {
        panic!("tcp")
    };
    assert_eq!(
        t.clusters
            .iter()
            .map(|c| (c.name.as_str(), c.weight))
            .collect::<Vec<_>>(),
        vec![("backend/default/a", 2), ("backend/default/b", 1)]
    );
}

#[test]
fn grpc_routes_use_http2_and_grpc_paths() {
    let routes = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: g}
spec:
  parentRefs: [{name: gw}]
  rules:
  - matches:
    - method: {service: echo.Echo, method: Say}
    - method: {service: echo.Echo}
    backendRefs: [{group: biplane.dev, kind: Backend, name: a}]
"#;
    let c = compile(&with_http(routes));
    let vh = vhost(&c, "route-8080", "*");
    assert!(
        matches!(&vh.routes[0].matcher.path, cfg::PathMatch::Exact(p) if p == "/echo.Echo/Say")
    );
    assert!(matches!(&vh.routes[1].matcher.path, cfg::PathMatch::Prefix(p) if p == "/echo.Echo/"));
    let ct = &vh.routes[0].matcher.headers[0];
    assert_eq!(ct.name, "content-type");
    assert!(matches!(&ct.value, cfg::StringMatch::Prefix(p) if p == "application/grpc"));
    assert_eq!(vh.routes[0].name, "grpcroute/default/g/rule/0/match/0");
    let a = c
        .clusters
        .iter()
        .find(|c| c.name == "backend/default/a")
        .unwrap();
    assert_eq!(a.protocol, cfg::UpstreamProtocol::Http2);
}

#[test]
fn hostnames_become_virtual_hosts() {
    let yaml = format!(
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: gw}}
spec:
  listeners:
  - {{name: wild, port: 8080, protocol: HTTP, hostname: "*.example.com"}}
  - {{name: any, port: 8080, protocol: HTTP, hostname: "other.org"}}
---
{BACKENDS}---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: r}}
spec:
  parentRefs: [{{name: gw}}]
  hostnames: [foo.example.com, "*.example.com", unrelated.net]
  rules:
  - backendRefs: [{{group: biplane.dev, kind: Backend, name: a}}]
"#
    );
    let c = compile(&yaml);
    let rc = &c.route_configs[0];
    let mut domains: Vec<_> = rc
        .virtual_hosts
        .iter()
        .flat_map(|v| v.domains.clone())
        .collect();
    domains.sort();
    assert_eq!(
        domains,
        vec!["*.example.com", "foo.example.com"],
        "unrelated.net and other.org do not intersect"
    );
}

#[test]
fn gateway_selection_and_errors() {
    let two = format!(
        "{HTTP_GATEWAY}---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: gw2, namespace: prod}}\nspec:\n  listeners:\n  - {{name: http, port: 8081, protocol: HTTP}}\n"
    );
    let err = compile_static(&two, None, &opts()).unwrap_err();
    assert!(matches!(err, StaticError::AmbiguousGateway { .. }), "{err}");
    assert_eq!(
        err.to_string(),
        "the file has several Gateways, choose one: default/gw, prod/gw2"
    );
    let err = compile_static(&two, Some("nope"), &opts()).unwrap_err();
    assert_eq!(
        err.to_string(),
        r#"Gateway "nope" not found; the file has: default/gw, prod/gw2"#
    );
    // Both forms select, and no route attached still gives a listener with an empty config.
    assert!(compile_static(&two, Some("prod/gw2"), &opts()).is_ok());
    let c = compile_static(&two, Some("gw"), &opts()).unwrap();
    assert_eq!(c.listeners[0].address.port(), 8080);

    let bad = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec:\n  rules:\n  - matches: [{path: {type: RegularExpression, value: '(unclosed'}}]\n    backendRefs: [{group: biplane.dev, kind: Backend, name: a, weight: -1}]\n";
    let err = compile_static(bad, None, &opts()).unwrap_err();
    let StaticError::Invalid(v) = &err else {
        panic!("{err}")
    };
    assert!(v.len() >= 2, "every validation error: {err}");
    assert_eq!(err.to_string().lines().count(), v.len(), "one per line");
}

#[test]
fn unresolvable_endpoint_hostname_is_an_error() {
    let yaml = format!(
        "{HTTP_GATEWAY}---\napiVersion: biplane.dev/v1alpha1\nkind: Backend\nmetadata: {{name: h}}\nspec:\n  endpoints: [{{address: no-such-host.invalid, port: 80}}]\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r}}\nspec:\n  parentRefs: [{{name: gw}}]\n  rules:\n  - backendRefs: [{{group: biplane.dev, kind: Backend, name: h}}]\n"
    );
    let err = compile_static(&yaml, None, &opts()).unwrap_err();
    assert!(
        err.to_string().starts_with(
            r#"Backend default/h: spec.endpoints[0].address: cannot resolve "no-such-host.invalid""#
        ),
        "{err}"
    );
}
