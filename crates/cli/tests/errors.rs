//! End-to-end error answers of `biplane proxy`: 404 no route, 503 endpoint down, 504
//! timeout, 500 unresolved backend, 400 malformed request, 431 huge headers, and request
//! smuggling shapes rejected before they reach an upstream.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a panic is a failure"
)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use tokio::net::TcpStream;

fn route(name: &str, hostnames: &str, backend: &str, extra_rule: &str) -> String {
    format!(
        r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: {name}
spec:
  parentRefs: [{{name: gw}}]
  hostnames: {hostnames}
  rules:
  - backendRefs: [{{group: biplane.dev, kind: Backend, name: {backend}}}]
{extra_rule}"#
    )
}

async fn proxy_for(rest: String) -> (Proxy, SocketAddr) {
    let (proxy, ports) =
        Proxy::start_on_ports(1, |p| format!("{}{rest}", http_gateway(p[0]))).await;
    (proxy, ([127, 0, 0, 1], ports[0]).into())
}

/// Status and `x-biplane-error` (when the proxy answered) of a GET.
async fn get(c: &reqwest::Client, url: String) -> (u16, Option<String>, String) {
    let r = c.get(url).send().await.unwrap();
    let status = r.status().as_u16();
    let reason = r
        .headers()
        .get("x-biplane-error")
        .map(|v| v.to_str().unwrap().to_owned());
    (status, reason, r.text().await.unwrap())
}

#[tokio::test]
async fn no_route_is_404() {
    let echo = Echo::spawn("A");
    let (_proxy, addr) = proxy_for(format!(
        "{}{}",
        backend("a", &[(echo.addr, 1)]),
        route("only", r#"["known.example.com"]"#, "a", "")
    ))
    .await;
    let c = resolving_client(addr, &["known.example.com", "unknown.example.com"]);
    let port = addr.port();
    let (status, _, _) = get(&c, format!("http://known.example.com:{port}/")).await;
    assert_eq!(status, 200, "the known host must route");
    let (status, reason, body) = get(&c, format!("http://unknown.example.com:{port}/")).await;
    assert_eq!(status, 404);
    assert!(!body.is_empty(), "a 404 says why");
    assert_eq!(reason.as_deref(), Some("no_route"));
}

#[tokio::test]
async fn endpoint_down_is_503() {
    let (_reserved, dead) = refused_addr();
    let (_proxy, addr) = proxy_for(format!(
        "{}{}",
        backend("dead", &[(dead, 1)]),
        route("r", "[]", "dead", "")
    ))
    .await;
    let (status, _, body) = get(&client(), format!("http://{addr}/")).await;
    assert_eq!(status, 503, "body: {body}");
    assert!(!body.is_empty());
}

#[tokio::test]
async fn unresolved_backend_is_500() {
    let echo = Echo::spawn("A");
    let (_proxy, addr) = proxy_for(format!(
        "{}{}{}",
        backend("a", &[(echo.addr, 1)]),
        route("good", r#"["good.example.com"]"#, "a", ""),
        route("broken", r#"["broken.example.com"]"#, "does-not-exist", "")
    ))
    .await;
    let c = resolving_client(addr, &["good.example.com", "broken.example.com"]);
    let port = addr.port();
    assert_eq!(
        get(&c, format!("http://good.example.com:{port}/")).await.0,
        200
    );
    let (status, _, body) = get(&c, format!("http://broken.example.com:{port}/")).await;
    assert_eq!(status, 500, "body: {body}");
}

#[tokio::test]
async fn partly_unresolved_weights_answer_500_for_their_share() {
    let echo = Echo::spawn("A");
    let rule = r#"  - matches: [{path: {type: PathPrefix, value: /split}}]
    backendRefs:
    - {group: biplane.dev, kind: Backend, name: a, weight: 1}
    - {group: biplane.dev, kind: Backend, name: ghost, weight: 1}
"#;
    let (_proxy, addr) = proxy_for(format!(
        "{}{}",
        backend("a", &[(echo.addr, 1)]),
        route("split", r#"["split.example.com"]"#, "a", rule)
    ))
    .await;
    let c = resolving_client(addr, &["split.example.com"]);
    let port = addr.port();
    let (mut ok, mut err) = (0, 0);
    for _ in 0..200 {
        match get(&c, format!("http://split.example.com:{port}/split")).await {
            (200, _, _) => ok += 1,
            (500, reason, _) => {
                assert_eq!(reason.as_deref(), Some("unknown_cluster"));
                err += 1;
            }
            other => panic!("unexpected answer {other:?}"),
        }
    }
    // 1:1 over 200 requests: both shares are well away from 0.
    assert!(ok > 50 && err > 50, "200s: {ok}, 500s: {err}");
}

#[tokio::test]
async fn route_timeout_is_504() {
    let echo = Echo::spawn("A");
    let timeout_rule = r#"  - matches: [{path: {type: PathPrefix, value: /slow}}]
    timeouts: {request: 300ms}
    backendRefs: [{group: biplane.dev, kind: Backend, name: a}]
"#;
    let (_proxy, addr) = proxy_for(format!(
        "{}{}",
        backend("a", &[(echo.addr, 1)]),
        route("r", "[]", "a", timeout_rule)
    ))
    .await;
    let c = client();
    // Within the timeout: answered.
    assert_eq!(
        get(&c, format!("http://{addr}/slow?delay_ms=10")).await.0,
        200
    );
    let start = Instant::now();
    let (status, reason, _) = get(&c, format!("http://{addr}/slow?delay_ms=5000")).await;
    assert_eq!(status, 504);
    assert_eq!(reason.as_deref(), Some("upstream_timeout"));
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(3),
        "took {took:?}"
    );
}

#[tokio::test]
async fn upstream_status_passes_through() {
    let echo = Echo::spawn("A");
    let (_proxy, addr) = proxy_for(format!(
        "{}{}",
        backend("a", &[(echo.addr, 1)]),
        route("r", "[]", "a", "")
    ))
    .await;
    let (status, reason, _) = get(&client(), format!("http://{addr}/?status=503")).await;
    assert_eq!(status, 503);
    assert_eq!(reason, None, "an upstream's 503 is not the proxy's");
}

#[tokio::test]
async fn malformed_and_smuggling_requests_are_400_and_never_reach_upstream() {
    let echo = Echo::spawn_logging("A");
    let (_proxy, addr) = proxy_for(format!(
        "{}{}",
        backend("a", &[(echo.addr, 1)]),
        route("r", "[]", "a", "")
    ))
    .await;
    let bad: &[(&str, &[u8])] = &[
        ("header without colon", b"GET /bad1 HTTP/1.1\r\nHost: x\r\nNoColonHere\r\n\r\n"),
        ("garbage request line", b"THIS IS NOT HTTP\r\n\r\n"),
        (
            "content-length and transfer-encoding",
            b"POST /bad2 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ),
        (
            "duplicate content-length",
            b"POST /bad3 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        ),
        ("non-numeric content-length", b"POST /bad4 HTTP/1.1\r\nHost: x\r\nContent-Length: 5x\r\n\r\nhello"),
    ];
    for (what, req) in bad {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let resp = raw_exchange(&mut s, req).await;
        assert_eq!(resp.status, 400, "{what}: {}", resp.head);
    }
    // A good request afterwards reaches the echo, and it is the only one that did.
    let mut s = TcpStream::connect(addr).await.unwrap();
    let resp = raw_exchange(
        &mut s,
        b"POST /good HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.head);
    echo.proc
        .stderr
        .wait_for("the good request at the echo", |l| {
            l.contains("/good").then_some(())
        });
    let seen = echo.requests_seen();
    assert_eq!(
        seen.len(),
        1,
        "the upstream saw more than the good request: {seen:#?}"
    );
}

#[tokio::test]
async fn huge_headers_are_431() {
    let echo = Echo::spawn_logging("A");
    let (_proxy, addr) = proxy_for(format!(
        "{}{}",
        backend("a", &[(echo.addr, 1)]),
        route("r", "[]", "a", "")
    ))
    .await;
    let big = "a".repeat(100 * 1024);
    let req = format!("GET /huge HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n");
    let mut s = TcpStream::connect(addr).await.unwrap();
    let resp = raw_exchange(&mut s, req.as_bytes()).await;
    assert_eq!(resp.status, 431, "{}", resp.head);
    // Many small headers adding up past the limit, too.
    let mut req = String::from("GET /many HTTP/1.1\r\nHost: x\r\n");
    for i in 0..2000 {
        req.push_str(&format!("X-H{i}: {}\r\n", "v".repeat(40)));
    }
    req.push_str("\r\n");
    let mut s = TcpStream::connect(addr).await.unwrap();
    let resp = raw_exchange(&mut s, req.as_bytes()).await;
    assert_eq!(resp.status, 431, "{}", resp.head);
    assert!(
        echo.requests_seen().is_empty(),
        "{:#?}",
        echo.requests_seen()
    );
}
