//! The connection layer in front of the HTTP handler: TLS termination with ALPN (h2 and
//! HTTP/1.1 over TLS, `x-forwarded-proto: https`), plaintext h2c, and graceful drain of an
//! in-flight HTTP request on shutdown.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use biplane_config::{
    ChainHandler, ChainMatch, FilterChain, Forward, HttpConnectionManager, RouteAction,
    RouteConfig, VirtualHost, WeightedCluster,
};
use biplane_proxy::{DrainReport, Proxy, ProxyOptions};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// An HTTP/1.1 upstream that answers 200 with the request head as the body, after
/// `delay_ms` if the path contains `slow`. Reports each request head it receives.
async fn http_upstream(delay: Duration) -> (SocketAddr, mpsc::UnboundedReceiver<String>) {
    let listener = TcpListener::bind(LOCAL).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let mut chunk = [0u8; 4096];
                    let n = match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    buf.extend_from_slice(&chunk[..n]);
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                        buf.drain(..end + 4);
                        let _ = tx.send(head.clone());
                        if head.lines().next().is_some_and(|l| l.contains("slow")) {
                            tokio::time::sleep(delay).await;
                        }
                        let resp = format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\ncontent-type: text/plain\r\n\r\n{head}",
                            head.len()
                        );
                        if s.write_all(resp.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, rx)
}

fn http_chain(name: &str, tls: Option<biplane_config::TlsTermination>) -> FilterChain {
    FilterChain {
        name: name.into(),
        matcher: ChainMatch::default(),
        tls,
        handler: ChainHandler::Http(HttpConnectionManager {
            stat_prefix: name.into(),
            route_config_name: "rc".into(),
            idle_timeout: None,
            request_headers_timeout: None,
            max_request_headers_kb: 60,
            use_remote_address: true,
        }),
    }
}

fn route_config() -> RouteConfig {
    RouteConfig {
        name: "rc".into(),
        virtual_hosts: vec![VirtualHost {
            name: "all".into(),
            domains: vec!["*".into()],
            routes: vec![biplane_config::Route {
                name: "r".into(),
                matcher: Default::default(),
                request_headers: Default::default(),
                response_headers: Default::default(),
                action: RouteAction::Forward(Forward {
                    clusters: vec![WeightedCluster {
                        name: "web".into(),
                        weight: 1,
                    }],
                    path_rewrite: None,
                    host_rewrite: None,
                    timeout: None,
                    per_try_timeout: None,
                    hash_policy: Vec::new(),
                    cluster_not_found_status: 503,
                }),
            }],
        }],
    }
}

fn http_config(
    listeners: Vec<biplane_config::Listener>,
    upstream: SocketAddr,
) -> biplane_config::Config {
    let mut cfg = config("v1", listeners, vec![cluster("web", &[upstream])]);
    cfg.route_configs.push(route_config());
    cfg
}

fn options(drain: Duration) -> ProxyOptions {
    ProxyOptions {
        admin_addr: None,
        drain_timeout: drain,
        access_log: false,
    }
}

fn get(uri: &str) -> http::Request<Empty<Bytes>> {
    http::Request::get(uri).body(Empty::new()).unwrap()
}

#[tokio::test]
async fn https_with_alpn_h2_and_http11() {
    let (up, _seen) = http_upstream(Duration::ZERO).await;
    let c = cert("site", &["a.example.com"]);
    let chain = http_chain("https", Some(termination(&[&c], &["h2", "http/1.1"])));
    let proxy = Proxy::start(
        http_config(vec![listener("https", LOCAL, vec![chain])], up),
        options(Duration::from_secs(1)),
    )
    .await
    .unwrap();
    let addr = addr_of(&proxy, "https");

    // h2 via ALPN.
    let tls = tls_connect(&connector(&[&c.der], &[b"h2"]), addr, "a.example.com")
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let resp = sender
        .send_request(get("https://a.example.com/over-h2"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let body = String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    assert!(body.starts_with("GET /over-h2 HTTP/1.1"), "{body}");
    assert!(
        body.to_ascii_lowercase()
            .contains("x-forwarded-proto: https"),
        "{body}"
    );

    // HTTP/1.1 via ALPN.
    let tls = tls_connect(&connector(&[&c.der], &[b"http/1.1"]), addr, "a.example.com")
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get("/over-h1")
        .header("host", "a.example.com")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    assert!(body.starts_with("GET /over-h1 HTTP/1.1"), "{body}");
    assert!(
        body.to_ascii_lowercase()
            .contains("x-forwarded-proto: https"),
        "{body}"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn plaintext_h2c_prior_knowledge() {
    let (up, _seen) = http_upstream(Duration::ZERO).await;
    let proxy = Proxy::start(
        http_config(
            vec![listener("web", LOCAL, vec![http_chain("web", None)])],
            up,
        ),
        options(Duration::from_secs(1)),
    )
    .await
    .unwrap();
    let tcp = TcpStream::connect(addr_of(&proxy, "web")).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let resp = sender.send_request(get("http://h2c.test/x")).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    assert!(
        body.lines()
            .any(|l| l.eq_ignore_ascii_case("x-forwarded-proto: http")),
        "{body}"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn shutdown_lets_an_in_flight_request_finish() {
    let (up, mut seen) = http_upstream(Duration::from_millis(600)).await;
    let proxy = Proxy::start(
        http_config(
            vec![listener("web", LOCAL, vec![http_chain("web", None)])],
            up,
        ),
        options(Duration::from_secs(5)),
    )
    .await
    .unwrap();
    let addr = addr_of(&proxy, "web");

    // An idle keep-alive connection (one request done) is closed at once on drain.
    let mut idle = TcpStream::connect(addr).await.unwrap();
    idle.write_all(b"GET /fast HTTP/1.1\r\nHost: web\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 15];
    idle.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 200 OK");
    seen.recv().await.unwrap();

    let mut client = TcpStream::connect(addr).await.unwrap();
    client
        .write_all(b"GET /slow HTTP/1.1\r\nHost: web\r\n\r\n")
        .await
        .unwrap();
    // The request reached the upstream: it is in flight now.
    let head = tokio::time::timeout(Duration::from_secs(5), seen.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(head.starts_with("GET /slow"));

    let shutdown = tokio::spawn(proxy.shutdown());
    let started = tokio::time::Instant::now();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), idle.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "idle connection not closed promptly"
    );
    assert!(
        eventually(|| async move { TcpStream::connect(addr).await.is_err() }).await,
        "still accepting"
    );

    // The slow response still arrives, and the connection is closed after it.
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut raw))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("GET /slow"), "{text}");

    let report = tokio::time::timeout(Duration::from_secs(10), shutdown)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        report,
        DrainReport {
            drained: 2,
            aborted: 0
        }
    );
}
