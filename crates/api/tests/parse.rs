//! Parsing tests: YAML and JSON inputs, every kind, multi-document handling, document
//! numbering, schema errors with paths, Secrets, and round trips.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

mod common;

use base64::Engine as _;
use biplane_api::*;
use common::*;

#[test]
fn fixture_parses_every_kind() {
    let rs = ok(ALL_KINDS);
    let kinds: Vec<ResourceKind> = rs.iter().map(Resource::kind).collect();
    for k in ResourceKind::ALL {
        assert!(kinds.contains(&k), "missing {k}");
    }
    assert_eq!(rs.len(), 10);
    let gw = &rs[0];
    assert_eq!(
        (gw.kind(), gw.namespace(), gw.name()),
        (ResourceKind::Gateway, "prod", "edge")
    );
    assert_eq!(gw.api_version(), "gateway.networking.k8s.io/v1");
    assert_eq!(gw.key().to_string(), "Gateway/prod/edge");
    assert_eq!(rs[3].api_version(), "gateway.networking.k8s.io/v1alpha2");
    assert_eq!(rs[9].api_version(), "v1");

    let Resource::Gateway(g) = gw else { panic!() };
    assert_eq!(g.spec.listeners.len(), 4);
    assert_eq!(
        g.spec.listeners[1].tls.as_ref().unwrap().mode(),
        TlsModeType::Terminate
    );
    assert_eq!(
        g.metadata.labels.get("team").map(String::as_str),
        Some("net")
    );
    assert_eq!(
        g.spec.listeners[0]
            .allowed_routes
            .as_ref()
            .unwrap()
            .namespaces
            .as_ref()
            .unwrap()
            .from,
        Some(FromNamespaces::All)
    );

    let Resource::HttpRoute(r) = &rs[1] else {
        panic!()
    };
    let rule = &r.spec.rules[0];
    assert_eq!(rule.name.as_deref(), Some("api"));
    let m = &rule.matches[0];
    assert_eq!(m.path_match().match_type(), PathMatchType::PathPrefix);
    assert_eq!(m.path_match().value(), "/api");
    // YAML 1.1 booleans stay strings.
    assert_eq!(m.headers[0].value, "yes");
    assert_eq!(m.query_params[0].value, "on");
    assert_eq!(
        m.headers[1].match_type(),
        HeaderMatchType::RegularExpression
    );
    assert_eq!(m.method, Some(HttpMethod::GET));
    assert_eq!(rule.backend_refs[0].weight(), 90);
    assert!(rule.backend_refs[0].is_biplane_backend());
    let t = rule.timeouts.as_ref().unwrap();
    assert_eq!(
        t.request.as_ref().unwrap().as_std(),
        std::time::Duration::from_secs(10)
    );
    assert_eq!(
        t.backend_request.as_ref().unwrap().as_std(),
        std::time::Duration::from_millis(2500)
    );
    assert_eq!(rule.filters[1].filter_type, HttpRouteFilterType::UrlRewrite);
    let redirect = r.spec.rules[1].filters[0]
        .request_redirect
        .as_ref()
        .unwrap();
    assert_eq!(redirect.status_code(), 301);
    // Default match: PathPrefix "/".
    let dm = r.spec.rules[2].effective_matches();
    assert_eq!(dm.len(), 1);
    assert_eq!(dm[0].path_match().match_type(), PathMatchType::PathPrefix);
    assert_eq!(dm[0].path_match().value(), "/");
    assert_eq!(r.spec.rules[2].backend_refs[0].weight(), 1);

    let Resource::GrpcRoute(g) = &rs[2] else {
        panic!()
    };
    let mm = g.spec.rules[0].matches[0].method.as_ref().unwrap();
    assert_eq!(
        (mm.service.as_deref(), mm.method.as_deref()),
        (Some("echo.v1.Echo"), Some("Say"))
    );
    assert_eq!(
        g.spec.rules[0].matches[1]
            .method
            .as_ref()
            .unwrap()
            .match_type(),
        HeaderMatchType::RegularExpression
    );

    let Resource::TcpRoute(t) = &rs[4] else {
        panic!()
    };
    assert_eq!(t.spec.parent_refs[0].port, Some(9000));
    assert_eq!(t.spec.rules[0].backend_refs[0].port, Some(5432));

    let Resource::Backend(b) = &rs[5] else {
        panic!()
    };
    assert_eq!(b.spec.load_balancer_type(), LoadBalancerType::RingHash);
    assert_eq!(b.spec.hash_on(), Some(HashKey::Header("x-user".into())));
    assert_eq!(b.spec.connect_timeout(), std::time::Duration::from_secs(1));
    assert_eq!(b.spec.endpoints[1].weight(), 3);
    assert_eq!(b.spec.endpoints[0].weight(), 1);
    assert_eq!(b.spec.app_protocol(), AppProtocol::Http);
    let Resource::Backend(b) = &rs[6] else {
        panic!()
    };
    assert_eq!(b.spec.connect_timeout(), DEFAULT_CONNECT_TIMEOUT);
    assert_eq!(b.spec.hash_on(), None);
    let Resource::Backend(b) = &rs[7] else {
        panic!()
    };
    assert_eq!(b.spec.app_protocol(), AppProtocol::H2c);
    assert_eq!(b.spec.load_balancer_type(), LoadBalancerType::RoundRobin);
    let Resource::Backend(b) = &rs[8] else {
        panic!()
    };
    assert_eq!(b.spec.hash_on(), Some(HashKey::SourceIp));

    let Resource::Secret(s) = &rs[9] else {
        panic!()
    };
    assert!(s.cert_chain_pem.contains("BEGIN CERTIFICATE"));
    assert!(s.private_key_pem.expose().contains("secretkeymaterial"));
}

#[test]
fn default_namespace_is_default() {
    let rs = ok(&backend("  endpoints: []\n"));
    assert_eq!(rs[0].namespace(), "default");
    assert_eq!(rs[0].key().to_string(), "Backend/default/be");
}

#[test]
fn json_object_array_and_list() {
    let one = r#"{"apiVersion":"biplane.dev/v1alpha1","kind":"Backend","metadata":{"name":"a"},"spec":{"endpoints":[{"address":"10.0.0.1","port":80}]}}"#;
    assert_eq!(ok(one).len(), 1);
    let arr = format!("[{one}, {}]", one.replace("\"a\"", "\"b\""));
    let rs = ok(&arr);
    assert_eq!(rs.iter().map(|r| r.name()).collect::<Vec<_>>(), ["a", "b"]);
    let list = format!(
        r#"{{"apiVersion":"v1","kind":"List","items":[{one}, {}]}}"#,
        one.replace("\"a\"", "\"c\"")
    );
    let rs = ok(&list);
    assert_eq!(rs.iter().map(|r| r.name()).collect::<Vec<_>>(), ["a", "c"]);
    // Errors in a JSON array name the element's index (printed 1-based).
    let bad = format!(
        "[{one}, {}]",
        one.replace("\"port\":80", "\"port\":80,\"extra\":1")
            .replace("\"a\"", "\"z\"")
    );
    let e = errs(&bad);
    assert_eq!(e.len(), 1);
    assert_eq!(e[0].document, 1);
    assert_eq!(e[0].path, "spec.endpoints[0].extra");
    assert!(
        e[0].to_string()
            .starts_with("document 2 (Backend default/z): spec.endpoints[0].extra: unknown field")
    );
}

#[test]
fn yaml_flow_mapping_is_not_mistaken_for_json() {
    let rs =
        ok("{apiVersion: biplane.dev/v1alpha1, kind: Backend, metadata: {name: f}, spec: {}}\n");
    assert_eq!(rs[0].name(), "f");
}

#[test]
fn placeholders_do_not_cause_echo_errors() {
    // protocol UDP is replaced by a placeholder: its tls is not judged against it, and a
    // missing name is reported once (not also as "must not be empty").
    let e = errs(
        &gateway(
            "  listeners:\n  - {name: a, port: 443, protocol: UDP, tls: {mode: Passthrough}}\n",
        )
        .replace("metadata: {name: gw}", "metadata: {}"),
    );
    assert_eq!(e.len(), 2, "{e:?}");
    has(&e, "metadata.name", "missing required field");
    has(&e, "spec.listeners[0].protocol", "unsupported value");
    // An unknown field replaces nothing, so the semantic checks beside it still run.
    let e = errs(&gateway(
        "  listeners:\n  - {name: a, port: 80, protocol: HTTP, tls: {certificateRefs: [{name: x}]}, extra: 1}\n",
    ));
    has(&e, "spec.listeners[0].extra", "unknown field");
    has(
        &e,
        "spec.listeners[0].tls",
        "must not be set with protocol HTTP",
    );
}

#[test]
fn invalid_json_is_reported() {
    let e = errs("{\"kind\": ");
    assert_eq!(e.len(), 1);
    assert!(e[0].message.starts_with("invalid JSON"), "{}", e[0]);
}

#[test]
fn yaml_list_kind_is_expanded() {
    let text = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: biplane.dev/v1alpha1\n  kind: Backend\n  metadata: {name: x}\n  spec: {}\n";
    assert_eq!(ok(text)[0].name(), "x");
}

#[test]
fn empty_documents_are_skipped_and_not_counted() {
    let b = backend("  endpoints: []\n");
    let text = format!(
        "---\n# only a comment\n---\n\n---\n{b}\n---\n...\n---\n{}",
        b.replace("name: be", "name: be2")
            .replace("endpoints: []", "endpoints: 3")
    );
    let e = errs(&text);
    assert_eq!(e.len(), 1);
    assert_eq!(e[0].document, 1, "{}", e[0]);
    assert_eq!(e[0].path, "spec.endpoints");
    assert!(ok("").is_empty());
    assert!(ok("# nothing\n---\n").is_empty());
}

#[test]
fn yaml_syntax_error_names_its_document_and_others_still_checked() {
    let b = backend("  endpoints: []\n");
    let text = format!(
        "{b}---\nkind: [unclosed\n---\n{}",
        b.replace("name: be", "name: be2")
            .replace("endpoints: []", "bogus: 1")
    );
    let e = errs(&text);
    assert_eq!(e.len(), 2, "{e:?}");
    assert_eq!(e[0].document, 1);
    assert!(
        e[0].message
            .contains("invalid YAML (document starts at line 6)"),
        "{}",
        e[0]
    );
    assert_eq!(e[1].document, 2);
    assert_eq!(e[1].path, "spec.bogus");
}

#[test]
fn unknown_kind_and_api_version_name_the_document() {
    let text = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n---\napiVersion: gateway.networking.k8s.io/v1beta1\nkind: HTTPRoute\nmetadata: {name: y}\nspec: {}\n---\nmetadata: {name: z}\n";
    let e = errs(text);
    assert_eq!(e.len(), 4, "{e:?}");
    assert_eq!((e[0].document, e[0].path.as_str()), (0, "kind"));
    assert!(e[0].message.contains("unknown kind \"ConfigMap\""));
    assert_eq!((e[1].document, e[1].path.as_str()), (1, "apiVersion"));
    assert!(
        e[1].message
            .contains("expected gateway.networking.k8s.io/v1")
    );
    assert_eq!(
        e[1].to_string(),
        "document 2 (HTTPRoute default/y): apiVersion: unsupported apiVersion \"gateway.networking.k8s.io/v1beta1\" for HTTPRoute (expected gateway.networking.k8s.io/v1)"
    );
    assert_eq!((e[2].document, e[2].path.as_str()), (2, "apiVersion"));
    assert_eq!((e[3].document, e[3].path.as_str()), (2, "kind"));
}

#[test]
fn scalar_document_is_an_error() {
    let e = errs("just a string\n");
    assert_eq!(e[0].path, "");
    assert!(e[0].message.contains("must be an object"));
}

#[test]
fn several_schema_errors_in_one_document_are_all_reported() {
    let text = gateway(
        "  listeners:\n  - name: a\n    port: \"80\"\n    protocol: UDP\n    extra: true\n  - name: b\n    port: 70000\n    protocol: HTTP\n  - port: 81\n    protocol: HTTP\n  addresses: 3\n  surprise: {}\n",
    );
    let e = errs(&text);
    has(
        &e,
        "spec.listeners[0].port",
        "expected an integer, got a string",
    );
    has(
        &e,
        "spec.listeners[0].protocol",
        "unsupported value \"UDP\" (expected one of: HTTP, HTTPS, TLS, TCP)",
    );
    has(&e, "spec.listeners[0].extra", "unknown field");
    has(
        &e,
        "spec.listeners[1].port",
        "must be between 1 and 65535, got 70000",
    );
    has(&e, "spec.listeners[2].name", "missing required field");
    has(&e, "spec.addresses", "expected a list, got number 3");
    has(&e, "spec.surprise", "unknown field");
    assert_eq!(e.len(), 7, "{e:?}");
    assert!(e.iter().all(|x| x.document == 0
        && x.kind.as_deref() == Some("Gateway")
        && x.name.as_deref() == Some("gw")));
}

#[test]
fn unknown_fields_everywhere_have_paths() {
    let text = http_route(
        "  parentRefs: [{name: gw, extra: 1}]\n  rules:\n  - matches:\n    - path: {type: Exact, value: /a, caseSensitive: true}\n    retry: {attempts: 3}\n    backendRefs: [{name: b, weigth: 3}]\n",
    )
    .replace("metadata: {name: web}", "metadata: {name: web, owner: me}");
    let e = errs(&text);
    has(&e, "metadata.owner", "unknown field");
    has(&e, "spec.parentRefs[0].extra", "unknown field");
    has(
        &e,
        "spec.rules[0].matches[0].path.caseSensitive",
        "unknown field",
    );
    has(&e, "spec.rules[0].retry", "unknown field");
    has(
        &e,
        "spec.rules[0].backendRefs[0].weigth",
        "unknown field (expected one of: group, kind, name, namespace, port, weight, filters)",
    );
    assert_eq!(e.len(), 5);
    // Top-level unknown field (e.g. status) too.
    let e = errs(&format!("{}status: {{}}\n", backend("  endpoints: []\n")));
    has(&e, "status", "unknown field");
}

#[test]
fn missing_required_fields() {
    let e = errs("apiVersion: biplane.dev/v1alpha1\nkind: Backend\nmetadata: {namespace: x}\n");
    has(&e, "metadata.name", "missing required field");
    has(&e, "spec", "missing required field");
    assert_eq!(
        e[0].to_string(),
        "document 1 (Backend): metadata.name: missing required field"
    );
    let e = errs(&backend("  endpoints: [{address: 10.0.0.1}]\n"));
    has(&e, "spec.endpoints[0].port", "missing required field");
    let e = errs(&backend("  endpoints: [{address: null, port: 80}]\n"));
    has(&e, "spec.endpoints[0].address", "missing required field");
}

#[test]
fn display_format_matches_the_documented_shape() {
    let text = format!(
        "{}---\n{}---\n{}",
        backend("  endpoints: []\n"),
        backend("  endpoints: []\n").replace("name: be", "name: be2"),
        http_route("  rules:\n  - {}\n  - {}\n  - backendRefs: [{name: b, weight: 1000001}]\n")
    );
    let e = errs(&text);
    assert_eq!(e.len(), 1);
    assert_eq!(
        e[0].to_string(),
        "document 3 (HTTPRoute default/web): spec.rules[2].backendRefs[0].weight: must be between 0 and 1000000"
    );
    let all = ValidationErrors(vec![e[0].clone(), e[0].clone()]);
    assert_eq!(all.to_string().lines().count(), 2);
}

#[test]
fn duplicate_resources_are_errors() {
    let b = backend("  endpoints: []\n");
    let text = format!(
        "{b}---\n{b}---\n{}",
        b.replace("name: be", "name: be, namespace: other")
    );
    let e = errs(&text);
    assert_eq!(e.len(), 1);
    assert_eq!(e[0].document, 1);
    assert_eq!(e[0].path, "metadata.name");
    assert!(
        e[0].message
            .contains("duplicate Backend default/be (first defined in document 1)")
    );
    // Same name, different kinds: fine.
    ok(&format!(
        "{b}---\n{}",
        http_route("  rules: []\n").replace("name: web", "name: be")
    ));
}

#[test]
fn yaml_booleans_are_strict_and_numbers_are_not_strings() {
    // `on`/`yes`/`no` are strings (YAML 1.2), so a listener named `on` is fine.
    let rs = ok(&gateway(
        "  listeners:\n  - {name: on, port: 80, protocol: HTTP}\n",
    ));
    let Resource::Gateway(g) = &rs[0] else {
        panic!()
    };
    assert_eq!(g.spec.listeners[0].name, "on");
    // A number where a string is required is a type error (as Kubernetes says).
    let e = errs(&http_route("  hostnames: [1]\n"));
    has(&e, "spec.hostnames[0]", "expected a string, got number 1");
    // `true` is a boolean, not a string.
    let e = errs(&backend("  endpoints: [{address: true, port: 80}]\n"));
    has(
        &e,
        "spec.endpoints[0].address",
        "expected a string, got boolean true",
    );
    // Leading zeros stay strings rather than becoming numbers.
    let e = errs(&backend("  endpoints: [{address: a, port: 0080}]\n"));
    has(
        &e,
        "spec.endpoints[0].port",
        "expected an integer, got a string",
    );
}

fn secret_doc(body: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: cert}}\ntype: kubernetes.io/tls\n{body}"
    )
}

#[test]
fn secrets_decode_base64_and_string_data() {
    let b64 = base64::engine::general_purpose::STANDARD;
    let text = secret_doc(&format!(
        "data:\n  tls.crt: {}\n  tls.key: {}\n",
        b64.encode(CERT_PEM),
        b64.encode(KEY_PEM)
    ));
    let rs = ok(&text);
    let Resource::Secret(s) = &rs[0] else {
        panic!()
    };
    assert_eq!(s.cert_chain_pem, CERT_PEM);
    assert_eq!(s.private_key_pem.expose(), KEY_PEM);
    let dbg = format!("{s:?} {:?} {}", rs[0], s.private_key_pem);
    assert!(!dbg.contains("TOPSECRET"), "key leaked: {dbg}");
    assert!(dbg.contains("<redacted>"));

    // stringData with raw PEM, and EC/RSA key labels.
    let rsa = KEY_PEM.replace("PRIVATE KEY", "RSA PRIVATE KEY");
    let text = secret_doc(&format!(
        "stringData:\n  tls.crt: |\n{}  tls.key: |\n{}",
        indent(CERT_PEM),
        indent(&rsa)
    ));
    let rs = ok(&text);
    let Resource::Secret(s) = &rs[0] else {
        panic!()
    };
    assert!(s.private_key_pem.expose().contains("RSA PRIVATE KEY"));

    // Round trip through to_document keeps the material.
    let again = ok(&serde_json::to_string(&rs[0].to_document()).unwrap());
    assert_eq!(again, rs);
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("    {l}\n")).collect()
}

#[test]
fn secret_errors_never_echo_key_material() {
    let b64 = base64::engine::general_purpose::STANDARD;
    let text = format!(
        "{}---\n{}---\n{}---\n{}",
        secret_doc(&format!(
            "data:\n  tls.crt: \"TOPSECRET!!\"\n  tls.key: {}\n",
            b64.encode("TOPSECRET no pem")
        )),
        secret_doc("stringData:\n  tls.crt: x\n").replace("name: cert", "name: c2"),
        secret_doc(&format!(
            "data:\n  tls.crt: {}\n  tls.key: {}\n  ca.crt: x\n",
            b64.encode(CERT_PEM),
            b64.encode(KEY_PEM)
        ))
        .replace("name: cert", "name: c3")
        .replace("type: kubernetes.io/tls", "type: Opaque"),
        secret_doc("data:\n  tls.crt: 5\n").replace("name: cert", "name: c4"),
    );
    let e = errs(&text);
    let all = e
        .iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join("\n");
    assert!(!all.contains("TOPSECRET"), "{all}");
    has(&e, "data[tls.crt]", "not valid base64");
    has(&e, "data[tls.key]", "must contain a PRIVATE KEY PEM block");
    has(
        &e,
        "stringData[tls.crt]",
        "must contain a CERTIFICATE PEM block",
    );
    has(&e, "data[tls.key]", "missing required key");
    has(&e, "type", "unsupported Secret type \"Opaque\"");
    has(&e, "data[tls.crt]", "expected a string, got number 5");
}

#[test]
fn round_trip_through_to_document() {
    let rs = ok(ALL_KINDS);
    let docs: Vec<serde_json::Value> = rs.iter().map(Resource::to_document).collect();
    let text = serde_json::to_string(&docs).unwrap();
    assert!(!text.contains("null"), "pruned: {text}");
    assert_eq!(ok(&text), rs);
}

#[test]
fn metadata_fields_are_kept() {
    let text = backend("  endpoints: []\n").replace(
        "metadata: {name: be}",
        "metadata:\n  name: be\n  annotations: {a: b}\n  resourceVersion: \"7\"\n  generation: 3\n  uid: u-1\n  creationTimestamp: \"2026-01-01T00:00:00Z\"",
    );
    let rs = ok(&text);
    let m = rs[0].metadata();
    assert_eq!(m.annotations.get("a").map(String::as_str), Some("b"));
    assert_eq!(m.resource_version.as_deref(), Some("7"));
    assert_eq!(m.generation, Some(3));
    assert_eq!(m.uid.as_deref(), Some("u-1"));
    assert!(m.creation_timestamp.is_some());
}
