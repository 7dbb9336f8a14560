//! End-to-end HTTP routing through `biplane proxy`: host, path, header, query and method
//! matches, weighted splits, redirects, URL rewrites, header modifiers and the access log.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a panic is a failure"
)]

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;

use common::*;

const REF_A: &str = "{group: biplane.dev, kind: Backend, name: a}";
const REF_B: &str = "{group: biplane.dev, kind: Backend, name: b}";

/// Two echoes (`A`, `B`), Backends `a` and `b`, a Gateway on one port, and `routes`.
async fn setup(routes: &str) -> (Echo, Echo, Proxy, SocketAddr) {
    let a = Echo::spawn("A");
    let b = Echo::spawn("B");
    let (proxy, ports) = Proxy::start_on_ports(1, |p| {
        format!(
            "{}{}{}{routes}",
            http_gateway(p[0]),
            backend("a", &[(a.addr, 1)]),
            backend("b", &[(b.addr, 1)])
        )
    })
    .await;
    let addr: SocketAddr = ([127, 0, 0, 1], ports[0]).into();
    (a, b, proxy, addr)
}

/// Which echo answered (`x-echo-name`), or `-` for a local answer; with the status.
async fn who(req: reqwest::RequestBuilder) -> (u16, String) {
    let r = req.send().await.unwrap();
    let name = r
        .headers()
        .get("x-echo-name")
        .map_or("-".to_owned(), |v| v.to_str().unwrap().to_owned());
    (r.status().as_u16(), name)
}

#[tokio::test]
async fn host_path_header_query_and_method_routing() {
    let routes = format!(
        r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: by-host
spec:
  parentRefs: [{{name: gw}}]
  hostnames: ["a.example.com"]
  rules:
  - backendRefs: [{REF_A}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: wildcard
spec:
  parentRefs: [{{name: gw}}]
  hostnames: ["*.wild.example.com"]
  rules:
  - backendRefs: [{REF_A}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: matches
spec:
  parentRefs: [{{name: gw}}]
  hostnames: ["b.example.com"]
  rules:
  - matches: [{{path: {{type: PathPrefix, value: /api}}}}]
    backendRefs: [{REF_A}]
  - matches: [{{path: {{type: Exact, value: /exact}}}}]
    backendRefs: [{REF_A}]
  - matches: [{{headers: [{{name: x-canary, value: "yes"}}]}}]
    backendRefs: [{REF_A}]
  - matches: [{{queryParams: [{{name: v, value: "2"}}]}}]
    backendRefs: [{REF_A}]
  - matches: [{{method: DELETE}}]
    backendRefs: [{REF_A}]
  - backendRefs: [{REF_B}]
"#
    );
    let (_a, _b, _proxy, addr) = setup(&routes).await;
    let c = resolving_client(
        addr,
        &[
            "a.example.com",
            "b.example.com",
            "x.wild.example.com",
            "wild.example.com",
        ],
    );
    let port = addr.port();
    let url = |host: &str, path: &str| format!("http://{host}:{port}{path}");
    // (host, path, extra header, the echo that must answer)
    type Case<'a> = (&'a str, &'a str, Option<(&'a str, &'a str)>, &'a str);
    let cases: &[Case] = &[
        ("a.example.com", "/anything", None, "A"),
        ("x.wild.example.com", "/", None, "A"),
        ("b.example.com", "/api", None, "A"),
        ("b.example.com", "/api/users", None, "A"),
        ("b.example.com", "/apiary", None, "B"), // prefix matches whole segments only
        ("b.example.com", "/exact", None, "A"),
        ("b.example.com", "/exact/more", None, "B"),
        ("b.example.com", "/other", Some(("x-canary", "yes")), "A"),
        ("b.example.com", "/other", Some(("x-canary", "no")), "B"),
        ("b.example.com", "/other?v=2", None, "A"),
        ("b.example.com", "/other?v=3", None, "B"),
        ("b.example.com", "/other", None, "B"),
    ];
    for (host, path, header, want) in cases {
        let mut req = c.get(url(host, path));
        if let Some((k, v)) = header {
            req = req.header(*k, *v);
        }
        assert_eq!(
            who(req).await,
            (200, want.to_string()),
            "{host}{path} {header:?}"
        );
    }
    assert_eq!(
        who(c.delete(url("b.example.com", "/other"))).await,
        (200, "A".to_owned()),
        "DELETE"
    );
    // `*.wild.example.com` does not match the bare parent domain.
    assert_eq!(who(c.get(url("wild.example.com", "/"))).await.0, 404);
}

/// Gateway API leaves regex precedence to implementations; Envoy Gateway (and users'
/// expectations) put `RegularExpression` between `Exact` and `PathPrefix`, so a regex
/// rule is not shadowed by a catch-all prefix.
#[tokio::test]
async fn regex_path_beats_catch_all_prefix() {
    let routes = format!(
        r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: regex
spec:
  parentRefs: [{{name: gw}}]
  rules:
  - matches: [{{path: {{type: RegularExpression, value: "/re/[0-9]+"}}}}]
    backendRefs: [{REF_A}]
  - backendRefs: [{REF_B}]
"#
    );
    let (_a, _b, _proxy, addr) = setup(&routes).await;
    let c = client();
    assert_eq!(
        who(c.get(format!("http://{addr}/re/123"))).await,
        (200, "A".to_owned())
    );
    assert_eq!(
        who(c.get(format!("http://{addr}/re/abc"))).await,
        (200, "B".to_owned())
    );
}

#[tokio::test]
async fn weighted_split_80_20() {
    let routes = r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: split
spec:
  parentRefs: [{name: gw}]
  rules:
  - backendRefs:
    - {group: biplane.dev, kind: Backend, name: a, weight: 80}
    - {group: biplane.dev, kind: Backend, name: b, weight: 20}
"#;
    let (_a, _b, _proxy, addr) = setup(routes).await;
    const N: usize = 1000;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let c = client();
        tasks.spawn(async move {
            let mut counts: HashMap<String, usize> = HashMap::new();
            for _ in 0..N / 4 {
                let (status, name) = who(c.get(format!("http://{addr}/split"))).await;
                assert_eq!(status, 200);
                *counts.entry(name).or_default() += 1;
            }
            counts
        });
    }
    let mut counts: HashMap<String, usize> = HashMap::new();
    while let Some(part) = tasks.join_next().await {
        for (k, v) in part.unwrap() {
            *counts.entry(k).or_default() += v;
        }
    }
    let a = counts.get("A").copied().unwrap_or(0) as f64 / N as f64;
    let b = counts.get("B").copied().unwrap_or(0) as f64 / N as f64;
    assert!(
        (a - 0.80).abs() <= 0.07,
        "A got {a:.3} of requests: {counts:?}"
    );
    assert!(
        (b - 0.20).abs() <= 0.07,
        "B got {b:.3} of requests: {counts:?}"
    );
    assert_eq!(counts.values().sum::<usize>(), N);
}

#[tokio::test]
async fn redirects() {
    let routes = r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: redirects
spec:
  parentRefs: [{name: gw}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /old}}]
    filters:
    - type: RequestRedirect
      requestRedirect:
        hostname: new.example.com
        path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}
        statusCode: 301
  - matches: [{path: {type: PathPrefix, value: /secure}}]
    filters:
    - type: RequestRedirect
      requestRedirect:
        scheme: https
        statusCode: 302
"#;
    let (_a, _b, _proxy, addr) = setup(routes).await;
    let c = resolving_client(addr, &["site.example.com"]);
    let port = addr.port();

    let r = c
        .get(format!("http://site.example.com:{port}/old/page"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 301);
    assert!(
        r.headers().get("x-echo-name").is_none(),
        "a redirect is answered by the proxy"
    );
    let loc = reqwest::Url::parse(r.headers()["location"].to_str().unwrap()).unwrap();
    assert_eq!(loc.host_str(), Some("new.example.com"));
    assert_eq!(loc.path(), "/new/page");

    let r = c
        .get(format!("http://site.example.com:{port}/secure/x?q=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 302);
    let loc = reqwest::Url::parse(r.headers()["location"].to_str().unwrap()).unwrap();
    assert_eq!(loc.scheme(), "https");
    assert_eq!(loc.host_str(), Some("site.example.com"));
    // A scheme redirect without a port goes to the scheme's well-known port (Gateway API).
    assert_eq!(loc.port(), None, "location: {loc}");
    assert_eq!(loc.path(), "/secure/x");
    assert_eq!(loc.query(), Some("q=1"));
}

#[tokio::test]
async fn url_rewrite_and_header_modifiers() {
    let routes = format!(
        r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: rewrite
spec:
  parentRefs: [{{name: gw}}]
  rules:
  - matches: [{{path: {{type: PathPrefix, value: /v1}}}}]
    filters:
    - type: URLRewrite
      urlRewrite:
        hostname: rewritten.example.com
        path: {{type: ReplacePrefixMatch, replacePrefixMatch: /v2}}
    backendRefs: [{REF_A}]
  - matches: [{{path: {{type: PathPrefix, value: /full}}}}]
    filters:
    - type: URLRewrite
      urlRewrite:
        path: {{type: ReplaceFullPath, replaceFullPath: /replaced}}
    backendRefs: [{REF_A}]
  - matches: [{{path: {{type: PathPrefix, value: /headers}}}}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{{name: x-set, value: set-value}}]
        add: [{{name: x-add, value: added}}]
        remove: [x-remove]
    - type: ResponseHeaderModifier
      responseHeaderModifier:
        set: [{{name: x-resp-set, value: "yes"}}]
        add: [{{name: x-resp-add, value: also}}]
        remove: [content-type]
    backendRefs: [{REF_A}]
"#
    );
    let (_a, _b, _proxy, addr) = setup(&routes).await;
    let c = client();

    let r = c
        .get(format!("http://{addr}/v1/items?x=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v = json(&r.bytes().await.unwrap());
    assert_eq!(v["path"], "/v2/items");
    assert_eq!(v["query"], "x=1");
    assert_eq!(v["headers"]["host"], "rewritten.example.com");

    let r = c
        .get(format!("http://{addr}/full/deep/path"))
        .send()
        .await
        .unwrap();
    assert_eq!(json(&r.bytes().await.unwrap())["path"], "/replaced");

    let r = c
        .get(format!("http://{addr}/headers"))
        .header("x-set", "original")
        .header("x-add", "first")
        .header("x-remove", "gone")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-resp-set"], "yes");
    assert_eq!(r.headers()["x-resp-add"], "also");
    assert!(
        r.headers().get("content-type").is_none(),
        "response header not removed"
    );
    let v = json(&r.bytes().await.unwrap());
    let h = &v["headers"];
    assert_eq!(h["x-set"], "set-value");
    assert_eq!(h["x-add"], "first, added");
    assert!(
        h.get("x-remove").is_none(),
        "request header not removed: {h}"
    );
    // The proxy adds forwarding headers.
    assert_eq!(h["x-forwarded-proto"], "http");
    assert!(
        h["x-forwarded-for"].as_str().unwrap().contains("127.0.0.1"),
        "{h}"
    );
}

#[tokio::test]
async fn access_log_line_on_stdout() {
    let routes = format!(
        r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: logged
spec:
  parentRefs: [{{name: gw}}]
  rules:
  - backendRefs: [{REF_A}]
"#
    );
    let (a, _b, proxy, addr) = setup(&routes).await;
    let r = client()
        .get(format!("http://{addr}/logged?k=v"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let line = proxy
        .proc
        .stdout
        .wait_for("an access log line for /logged", |l| {
            l.contains("/logged").then(|| l.to_owned())
        });
    let v: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    assert_eq!(v["method"], "GET");
    assert_eq!(v["path"], "/logged?k=v");
    assert_eq!(v["status"], 200);
    assert_eq!(v["upstream"], a.addr.to_string());
    assert!(
        v["authority"].as_str().unwrap().starts_with("127.0.0.1"),
        "{v}"
    );
    assert!(
        v["route"].as_str().is_some_and(|r| r.contains("logged")),
        "{v}"
    );
    assert!(
        v["time"].is_string() && v["duration_ms"].is_number() && v["bytes_sent"].is_number(),
        "{v}"
    );
    // Logs (stderr) and access logs (stdout) do not mix.
    assert!(!proxy.proc.stderr.text().contains("/logged"));
}

#[tokio::test]
async fn no_access_log_flag_silences_stdout() {
    let a = Echo::spawn("A");
    let port = free_port();
    let yaml = format!(
        "{}{}---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: r\nspec:\n  parentRefs: [{{name: gw}}]\n  rules:\n  - backendRefs: [{REF_A}]\n",
        http_gateway(port),
        backend("a", &[(a.addr, 1)])
    );
    let proxy = Proxy::start_with(&yaml, &["--no-access-log"]).await;
    let r = client()
        .get(format!("http://127.0.0.1:{port}/quiet"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The response is complete, and the log line (if any) is written when it ends: a
    // second request on a fresh connection orders after it.
    let r = client()
        .get(format!("http://127.0.0.1:{port}/quiet2"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        proxy.proc.stdout.snapshot().is_empty(),
        "stdout: {}",
        proxy.proc.stdout.text()
    );
}
