//! ResourceSet tests: lookups, hostname intersection, route attachment, unresolved
//! references.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

mod common;

use biplane_api::*;
use common::*;

fn hosts(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn hostname_intersection_table() {
    use HostnameIntersection::*;
    let h = |v: &[&str]| Hostnames(hosts(v));
    let cases: &[(Option<&str>, &[&str], HostnameIntersection)] = &[
        (None, &[], Any),
        (Some("a.test"), &[], h(&["a.test"])),
        (Some("*.test"), &[], h(&["*.test"])),
        (
            None,
            &["a.test", "*.b.test", "a.test"],
            h(&["a.test", "*.b.test"]),
        ),
        (Some("a.test"), &["a.test"], h(&["a.test"])),
        (Some("a.test"), &["b.test"], Disjoint),
        // Wildcard listener: exact and deeper names inside it; the suffix itself is not.
        (
            Some("*.example.com"),
            &["foo.example.com", "a.b.example.com", "example.com"],
            h(&["foo.example.com", "a.b.example.com"]),
        ),
        // Wildcard route over exact listener: the listener's name.
        (
            Some("foo.example.com"),
            &["*.example.com"],
            h(&["foo.example.com"]),
        ),
        (Some("example.com"), &["*.example.com"], Disjoint),
        // Two wildcards: the more specific one.
        (
            Some("*.example.com"),
            &["*.foo.example.com"],
            h(&["*.foo.example.com"]),
        ),
        (
            Some("*.foo.example.com"),
            &["*.example.com"],
            h(&["*.foo.example.com"]),
        ),
        (
            Some("*.example.com"),
            &["*.example.com"],
            h(&["*.example.com"]),
        ),
        (Some("*.example.com"), &["*.example.org"], Disjoint),
        // Suffix must fall on a label boundary.
        (Some("*.ample.com"), &["example.com"], Disjoint),
        // Several route names collapsing onto the listener's are deduplicated.
        (
            Some("foo.example.com"),
            &["*.example.com", "foo.example.com", "bar.example.com"],
            h(&["foo.example.com"]),
        ),
    ];
    for (listener, route, want) in cases {
        assert_eq!(
            &hostname_intersection(*listener, &hosts(route)),
            want,
            "listener {listener:?} route {route:?}"
        );
    }
}

#[test]
fn fixture_lookups_and_attachment() {
    let set = ResourceSet::new(ok(ALL_KINDS));
    assert_eq!(set.gateways().count(), 1);
    let gw = set.gateway("prod", "edge").unwrap();
    assert!(set.gateway("default", "edge").is_none());
    assert_eq!(set.gateways_named("edge").count(), 1);
    assert!(set.backend("prod", "api-v1").is_some());
    assert!(set.secret("prod", "wildcard-cert").is_some());
    assert!(set.secret("prod", "nope").is_none());
    assert_eq!(set.backends().count(), 4);
    assert_eq!(set.routes().count(), 4);

    let http = set.attached_routes(gw, "http");
    assert_eq!(http.len(), 1);
    assert_eq!(http[0].route.key().to_string(), "HTTPRoute/prod/web");
    assert_eq!(http[0].order, 1);
    assert_eq!(
        http[0].hostnames,
        HostnameIntersection::Hostnames(hosts(&["www.example.com", "*.example.com"]))
    );
    let https = set.attached_routes(gw, "https");
    assert_eq!(https.len(), 1);
    assert_eq!(https[0].route.kind(), ResourceKind::GrpcRoute);
    assert_eq!(
        https[0].hostnames,
        HostnameIntersection::Hostnames(hosts(&["grpc.example.com"]))
    );
    let tls = set.attached_routes(gw, "passthrough");
    assert_eq!(tls.len(), 1);
    assert_eq!(tls[0].route.kind(), ResourceKind::TlsRoute);
    let tcp = set.attached_routes(gw, "tcp");
    assert_eq!(tcp.len(), 1);
    assert_eq!(tcp[0].hostnames, HostnameIntersection::Any);
    assert!(set.attached_routes(gw, "missing").is_empty());
    assert_eq!(set.resolve_refs(), vec![], "fixture resolves fully");
}

const GW: &str = "apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: gw}
spec:
  listeners:
  - {name: web, port: 80, protocol: HTTP, hostname: \"*.example.com\"}
  - {name: api, port: 8080, protocol: HTTP, hostname: api.example.com}
  - {name: open, port: 81, protocol: HTTP, allowedRoutes: {namespaces: {from: All}}}
  - {name: onlygrpc, port: 82, protocol: HTTP, allowedRoutes: {kinds: [{kind: GRPCRoute}]}}
  - {name: raw, port: 9000, protocol: TCP}
";

fn route(ns: &str, name: &str, parent: &str, hostnames: &str) -> String {
    format!(
        "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  parentRefs: [{parent}]\n  hostnames: {hostnames}\n  rules: [{{backendRefs: [{{group: biplane.dev, kind: Backend, name: be, namespace: default}}]}}]\n"
    )
}

fn attached(set: &ResourceSet, listener: &str) -> Vec<String> {
    let gw = set.gateway("default", "gw").unwrap();
    set.attached_routes(gw, listener)
        .iter()
        .map(|a| a.route.metadata().name.clone())
        .collect()
}

#[test]
fn attachment_rules() {
    let text = [
        GW.to_owned(),
        format!("---\n{}", backend("  endpoints: []\n")),
        // No sectionName: every compatible listener whose hostname intersects.
        route("default", "all", "{name: gw}", "[]"),
        route("default", "www", "{name: gw}", "[www.example.com]"),
        route(
            "default",
            "by-section",
            "{name: gw, sectionName: api}",
            "[]",
        ),
        route("default", "by-port", "{name: gw, port: 8080}", "[]"),
        route(
            "default",
            "wrong-host",
            "{name: gw, sectionName: api}",
            "[www.example.com]",
        ),
        route("other", "cross-ns", "{name: gw, namespace: default}", "[]"),
        route("other", "implicit-ns", "{name: gw}", "[]"),
        route(
            "default",
            "no-listener",
            "{name: gw, sectionName: nope}",
            "[]",
        ),
        route(
            "default",
            "bad-port",
            "{name: gw, sectionName: api, port: 81}",
            "[]",
        ),
        route(
            "default",
            "tcp-listener",
            "{name: gw, sectionName: raw}",
            "[]",
        ),
        route(
            "default",
            "svc-parent",
            "{name: gw, kind: Service, group: \"\"}",
            "[]",
        ),
        route(
            "default",
            "two-parents",
            "[{name: gw, sectionName: api}, {name: gw, sectionName: api}]"
                .trim_start_matches('[')
                .trim_end_matches(']'),
            "[]",
        ),
    ]
    .join("");
    let set = ResourceSet::new(ok(&text));
    assert_eq!(attached(&set, "web"), ["all", "www"]);
    assert_eq!(
        attached(&set, "api"),
        ["all", "by-section", "by-port", "two-parents"]
    );
    assert_eq!(attached(&set, "open"), ["all", "www", "cross-ns"]);
    assert_eq!(attached(&set, "onlygrpc"), Vec::<String>::new());
    assert_eq!(attached(&set, "raw"), Vec::<String>::new());

    let problems = set.resolve_refs();
    let find = |name: &str| {
        problems
            .iter()
            .find(|p| p.resource.name == name)
            .map(|p| (p.reason, p.path.clone(), p.parent_ref))
    };
    assert_eq!(
        find("wrong-host"),
        Some((
            RefReason::NoMatchingListenerHostname,
            "spec.parentRefs[0]".into(),
            Some(0)
        ))
    );
    assert_eq!(
        find("implicit-ns").map(|p| p.0),
        Some(RefReason::GatewayNotFound)
    );
    assert_eq!(
        find("no-listener").map(|p| p.0),
        Some(RefReason::NoMatchingParent)
    );
    assert_eq!(
        find("bad-port").map(|p| p.0),
        Some(RefReason::NoMatchingParent)
    );
    assert_eq!(
        find("tcp-listener").map(|p| p.0),
        Some(RefReason::NotAllowedByListeners)
    );
    assert_eq!(
        find("svc-parent").map(|p| p.0),
        Some(RefReason::UnsupportedParentKind)
    );
    assert_eq!(
        RefReason::NotAllowedByListeners.condition(),
        ("Accepted", "NotAllowedByListeners")
    );
    // Only the listed routes have problems.
    let mut names: Vec<&str> = problems.iter().map(|p| p.resource.name.as_str()).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "bad-port",
            "implicit-ns",
            "no-listener",
            "svc-parent",
            "tcp-listener",
            "wrong-host"
        ]
    );
}

#[test]
fn cross_namespace_route_needs_from_all() {
    let text = format!(
        "{GW}{}",
        route(
            "other",
            "r",
            "{name: gw, namespace: default, sectionName: web}",
            "[]"
        )
    );
    let set = ResourceSet::new(ok(&text));
    let p = set.resolve_refs();
    assert_eq!(p.len(), 2, "{p:?}"); // not allowed + backend missing
    assert_eq!(p[0].reason, RefReason::NotAllowedByListeners);
    assert!(p[0].message.contains("from namespace other"), "{}", p[0]);
}

#[test]
fn unresolved_backend_and_secret_refs_are_data_not_errors() {
    let text = "apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: gw}
spec:
  listeners:
  - {name: s, port: 443, protocol: HTTPS, tls: {certificateRefs: [{name: missing}, {name: x, kind: ConfigMap}]}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r}
spec:
  parentRefs: [{name: gw}]
  rules:
  - backendRefs:
    - {group: biplane.dev, kind: Backend, name: present}
    - {group: biplane.dev, kind: Backend, name: absent}
    - {name: svc, port: 80}
  - backendRefs:
    - {group: biplane.dev, kind: Backend, name: present, namespace: elsewhere}
---
apiVersion: biplane.dev/v1alpha1
kind: Backend
metadata: {name: present}
spec: {endpoints: [{address: 127.0.0.1, port: 1}]}
";
    let set = ResourceSet::new(ok(text));
    let p = set.resolve_refs();
    let summary: Vec<(String, String, RefReason)> = p
        .iter()
        .map(|p| (p.resource.to_string(), p.path.clone(), p.reason))
        .collect();
    assert_eq!(
        summary,
        vec![
            (
                "Gateway/default/gw".into(),
                "spec.listeners[0].tls.certificateRefs[0]".into(),
                RefReason::SecretNotFound
            ),
            (
                "Gateway/default/gw".into(),
                "spec.listeners[0].tls.certificateRefs[1]".into(),
                RefReason::UnsupportedCertificateKind
            ),
            (
                "HTTPRoute/default/r".into(),
                "spec.rules[0].backendRefs[1]".into(),
                RefReason::BackendNotFound
            ),
            (
                "HTTPRoute/default/r".into(),
                "spec.rules[0].backendRefs[2]".into(),
                RefReason::UnsupportedBackendKind
            ),
            (
                "HTTPRoute/default/r".into(),
                "spec.rules[1].backendRefs[0]".into(),
                RefReason::BackendNotFound
            ),
        ]
    );
    let svc = &p[3];
    assert_eq!((svc.rule, svc.backend_ref), (Some(0), Some(2)));
    assert_eq!(
        svc.message,
        "unsupported kind core/Service (only biplane.dev/Backend is supported)"
    );
    assert_eq!(p[0].listener, Some(0));
    assert_eq!(p[4].message, "Backend elsewhere/present not found");
    assert_eq!(
        RefReason::UnsupportedBackendKind.condition(),
        ("ResolvedRefs", "InvalidKind")
    );
    let r = set.routes().next().unwrap().1;
    let (_, _, b) = r.backend_refs()[0];
    assert_eq!(
        set.resolve_backend("default", b).unwrap().metadata.name,
        "present"
    );
}

#[test]
fn grpc_and_tls_routes_attach_by_protocol() {
    let text = "apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: gw}
spec:
  listeners:
  - {name: h, port: 80, protocol: HTTP}
  - {name: t, port: 443, protocol: TLS, hostname: \"*.db.test\", tls: {mode: Passthrough}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: g}
spec:
  parentRefs: [{name: gw}]
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TLSRoute
metadata: {name: t}
spec:
  parentRefs: [{name: gw}]
  hostnames: [pg.db.test]
  rules: [{backendRefs: [{name: x}]}]
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TLSRoute
metadata: {name: t2}
spec:
  parentRefs: [{name: gw}]
  hostnames: [other.test]
  rules: [{backendRefs: [{name: x}]}]
";
    let set = ResourceSet::new(ok(text));
    assert_eq!(attached(&set, "h"), ["g"]);
    assert_eq!(attached(&set, "t"), ["t"]);
    let gw = set.gateway("default", "gw").unwrap();
    assert_eq!(
        set.attached_routes(gw, "t")[0].hostnames,
        HostnameIntersection::Hostnames(hosts(&["pg.db.test"]))
    );
    assert!(
        set.resolve_refs()
            .iter()
            .any(|p| p.resource.name == "t2" && p.reason == RefReason::NoMatchingListenerHostname)
    );
}

#[test]
fn protocol_table() {
    use ProtocolType::*;
    use ResourceKind::*;
    for (p, k, want) in [
        (Http, HttpRoute, true),
        (Https, HttpRoute, true),
        (Http, GrpcRoute, true),
        (Https, GrpcRoute, true),
        (Tls, TlsRoute, true),
        (Tcp, TcpRoute, true),
        (Tcp, HttpRoute, false),
        (Tls, HttpRoute, false),
        (Http, TlsRoute, false),
        (Https, TcpRoute, false),
    ] {
        assert_eq!(protocol_accepts(p, k), want, "{p:?} {k:?}");
    }
}
