//! Integration tests of the HTTP layer: a hand-built config, in-process hyper upstreams on
//! 127.0.0.1:0, and `serve_connection` on sockets accepted from a local listener, driven by
//! hyper clients (and raw sockets for malformed requests).
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use biplane_config as cfg;
use biplane_proxy::{ConnInfo, Metrics, ProxyOptions, Shared, Snapshot};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

type UpBody = BoxBody<Bytes, hyper::Error>;

// ---------------------------------------------------------------------------------------
// Upstream
// ---------------------------------------------------------------------------------------

struct Upstream {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
}

fn full(b: impl Into<Bytes>) -> UpBody {
    Full::new(b.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

/// An upstream speaking HTTP/1.1 and h2c, naming itself in `x-upstream`.
async fn upstream(name: &'static str) -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(AtomicUsize::new(0));
    let (acc, reqs) = (accepted.clone(), requests.clone());
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            acc.fetch_add(1, Ordering::SeqCst);
            let reqs = reqs.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    reqs.fetch_add(1, Ordering::SeqCst);
                    upstream_handler(name, req)
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Upstream {
        addr,
        accepted,
        requests,
    }
}

async fn upstream_handler(
    name: &'static str,
    mut req: Request<Incoming>,
) -> Result<Response<UpBody>, Infallible> {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let pq = req
        .uri()
        .path_and_query()
        .map_or("/".to_owned(), |p| p.to_string());
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .unwrap_or_default();
    let version = format!("{:?}", req.version());
    let mut res = match path.as_str() {
        "/ws" => {
            let on = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let Ok(up) = on.await else { return };
                let mut io = TokioIo::new(up);
                let mut buf = [0u8; 1024];
                loop {
                    match io.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if io.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
            let mut res = Response::new(full(""));
            *res.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            res.headers_mut()
                .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            res.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            res
        }
        "/echo" => Response::new(req.into_body().boxed()),
        "/delay" => {
            let ms: u64 = query
                .strip_prefix("ms=")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Response::new(full("late"))
        }
        "/trailers" => {
            let (mut tx, body) = http_body_util::channel::Channel::<Bytes, hyper::Error>::new(2);
            tokio::spawn(async move {
                let _ = tx.send_data(Bytes::from_static(b"grpc-ish")).await;
                let mut t = HeaderMap::new();
                t.insert("grpc-status", HeaderValue::from_static("0"));
                let _ = tx.send_trailers(t).await;
            });
            Response::new(body.boxed())
        }
        p if p.starts_with("/status/") => {
            let mut res = Response::new(full("status"));
            *res.status_mut() = StatusCode::from_u16(p[8..].parse().unwrap_or(500)).unwrap();
            res
        }
        _ => {
            let mut dump = String::new();
            for (k, v) in req.headers() {
                dump.push_str(&format!("{}: {}\n", k, v.to_str().unwrap_or("?")));
            }
            Response::new(full(dump))
        }
    };
    let h = res.headers_mut();
    h.insert("x-upstream", HeaderValue::from_static(name));
    h.insert("x-seen-path", HeaderValue::from_str(&pq).unwrap());
    h.insert("x-seen-host", HeaderValue::from_str(&host).unwrap());
    h.insert("x-seen-version", HeaderValue::from_str(&version).unwrap());
    Ok(res)
}

// ---------------------------------------------------------------------------------------
// Config and proxy
// ---------------------------------------------------------------------------------------

fn cluster(name: &str, addrs: &[SocketAddr]) -> cfg::Cluster {
    cfg::Cluster {
        name: name.into(),
        connect_timeout: Duration::from_secs(2),
        lb_policy: cfg::LbPolicy::RoundRobin,
        endpoints: addrs
            .iter()
            .map(|a| cfg::Endpoint {
                address: *a,
                weight: 1,
            })
            .collect(),
        protocol: cfg::UpstreamProtocol::Http1,
        idle_timeout: None,
    }
}

fn forward(clusters: &[(&str, u32)]) -> cfg::Forward {
    cfg::Forward {
        clusters: clusters
            .iter()
            .map(|(n, w)| cfg::WeightedCluster {
                name: (*n).into(),
                weight: *w,
            })
            .collect(),
        path_rewrite: None,
        host_rewrite: None,
        timeout: None,
        per_try_timeout: None,
        hash_policy: vec![],
        cluster_not_found_status: 503,
    }
}

fn route(name: &str, path: cfg::PathMatch, action: cfg::RouteAction) -> cfg::Route {
    cfg::Route {
        name: name.into(),
        matcher: cfg::RouteMatch {
            path,
            ..Default::default()
        },
        request_headers: cfg::HeaderMutation::default(),
        response_headers: cfg::HeaderMutation::default(),
        action,
    }
}

fn prefix(p: &str) -> cfg::PathMatch {
    cfg::PathMatch::Prefix(p.into())
}

fn config(domains: &[&str], routes: Vec<cfg::Route>, clusters: Vec<cfg::Cluster>) -> cfg::Config {
    cfg::Config {
        version: "test".into(),
        listeners: vec![cfg::Listener {
            name: "test".into(),
            address: "127.0.0.1:0".parse().unwrap(),
            filter_chains: vec![cfg::FilterChain {
                name: "http".into(),
                matcher: cfg::ChainMatch::default(),
                tls: None,
                handler: cfg::ChainHandler::Http(hcm()),
            }],
        }],
        route_configs: vec![cfg::RouteConfig {
            name: "rc".into(),
            virtual_hosts: vec![cfg::VirtualHost {
                name: "vh".into(),
                domains: domains.iter().map(|d| (*d).into()).collect(),
                routes,
            }],
        }],
        clusters,
    }
}

/// Every host, one route `r` for every path, to cluster `a` at `up`.
fn one_route(up: SocketAddr) -> cfg::Config {
    config(
        &["*"],
        vec![route("r", prefix("/"), fwd(&[("a", 1)]))],
        vec![cluster("a", &[up])],
    )
}

fn hcm() -> cfg::HttpConnectionManager {
    cfg::HttpConnectionManager {
        stat_prefix: "test".into(),
        route_config_name: "rc".into(),
        idle_timeout: None,
        request_headers_timeout: Some(Duration::from_secs(10)),
        max_request_headers_kb: 60,
        use_remote_address: true,
    }
}

struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: tokio::sync::watch::Sender<bool>,
}

impl Proxy {
    fn swap(&self, config: cfg::Config) {
        let old = self.shared.snapshot.load_full();
        let http = biplane_proxy::http::compile(&config, &self.shared.metrics, Some(&old.http));
        self.shared
            .snapshot
            .store(Arc::new(Snapshot { config, http }));
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
}

async fn proxy(config: cfg::Config, hcm: cfg::HttpConnectionManager) -> Proxy {
    let metrics = Arc::new(Metrics::new());
    let http = biplane_proxy::http::compile(&config, &metrics, None);
    let shared = Arc::new(Shared {
        snapshot: ArcSwap::from_pointee(Snapshot { config, http }),
        metrics,
        options: ProxyOptions {
            access_log: false,
            ..ProxyOptions::default()
        },
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::watch::channel(false);
    let hcm = Arc::new(hcm);
    let sh = shared.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                return;
            };
            let conn = ConnInfo {
                listener: "test".into(),
                peer,
                local: stream.local_addr().unwrap(),
                tls: false,
                alpn_h2: false,
                sni: None,
            };
            tokio::spawn(biplane_proxy::http::serve_connection(
                stream,
                conn,
                hcm.clone(),
                sh.clone(),
                rx.clone(),
            ));
        }
    });
    Proxy {
        addr,
        shared,
        shutdown: tx,
    }
}

fn h1_client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

struct Got {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl Got {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

async fn collect(res: Response<Incoming>) -> Got {
    let (parts, body) = res.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    Got {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&bytes).into_owned(),
    }
}

async fn get(client: &Client<HttpConnector, Full<Bytes>>, url: &str) -> Got {
    get_with(client, url, &[]).await
}

async fn get_with(
    client: &Client<HttpConnector, Full<Bytes>>,
    url: &str,
    headers: &[(&str, &str)],
) -> Got {
    let mut req = Request::get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    collect(
        client
            .request(req.body(Full::new(Bytes::new())).unwrap())
            .await
            .unwrap(),
    )
    .await
}

/// Raw HTTP/1.1 exchange: write `raw`, read until the peer closes or `deadline`.
async fn raw_exchange(addr: SocketAddr, raw: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(raw).await.unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

fn fwd(clusters: &[(&str, u32)]) -> cfg::RouteAction {
    cfg::RouteAction::Forward(forward(clusters))
}

#[tokio::test]
async fn forwards_with_proxy_headers_and_without_hop_by_hop() {
    let up = upstream("a").await;
    let p = proxy(one_route(up.addr), hcm()).await;
    let c = h1_client();
    let got = get_with(
        &c,
        &p.url("/hello?x=1"),
        &[
            ("host", "svc.example.com"),
            ("connection", "x-private"),
            ("x-private", "1"),
            ("x-forwarded-for", "192.0.2.1"),
        ],
    )
    .await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.header("x-upstream"), "a");
    assert_eq!(got.header("x-seen-path"), "/hello?x=1");
    assert_eq!(got.header("x-seen-host"), "svc.example.com");
    assert!(
        got.body.contains("x-forwarded-for: 192.0.2.1, 127.0.0.1\n"),
        "{}",
        got.body
    );
    assert!(
        got.body.contains("x-forwarded-proto: http\n"),
        "{}",
        got.body
    );
    assert!(!got.body.contains("x-private"), "{}", got.body);
    // Metrics: one 2xx for route r, backend a, listener test.
    let m = p.shared.metrics.encode();
    assert!(
        m.lines()
            .any(|l| l.starts_with("biplane_http_requests_total{")
                && l.contains("route=\"r\"")
                && l.contains("backend=\"a\"")
                && l.contains("class=\"2xx\"")
                && l.ends_with(" 1")),
        "{m}"
    );
}

#[tokio::test]
async fn weighted_split_within_tolerance() {
    let a = upstream("a").await;
    let b = upstream("b").await;
    let p = proxy(
        config(
            &["*"],
            vec![route("r", prefix("/"), fwd(&[("a", 1), ("b", 3)]))],
            vec![cluster("a", &[a.addr]), cluster("b", &[b.addr])],
        ),
        hcm(),
    )
    .await;
    let c = h1_client();
    let mut on_b = 0;
    for _ in 0..400 {
        if get(&c, &p.url("/")).await.header("x-upstream") == "b" {
            on_b += 1;
        }
    }
    assert!((260..=340).contains(&on_b), "b got {on_b}/400, want ~300");
}

#[tokio::test]
async fn keep_alive_reuses_upstream_connection() {
    let up = upstream("a").await;
    let p = proxy(one_route(up.addr), hcm()).await;
    let c = h1_client();
    for _ in 0..20 {
        assert_eq!(get(&c, &p.url("/")).await.status, StatusCode::OK);
    }
    assert_eq!(up.requests.load(Ordering::SeqCst), 20);
    assert_eq!(
        up.accepted.load(Ordering::SeqCst),
        1,
        "sequential requests share one pooled connection"
    );
}

#[tokio::test]
async fn local_errors_404_503() {
    // A port with nothing listening: bind, note it, close.
    let dead = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let p = proxy(
        config(
            &["app.example.com"],
            vec![
                route("down", prefix("/down"), fwd(&[("dead", 1)])),
                route("empty", prefix("/empty"), fwd(&[("empty", 1)])),
                route(
                    "unresolved",
                    prefix("/unresolved"),
                    cfg::RouteAction::DirectResponse {
                        status: 500,
                        body: "backend not found".into(),
                    },
                ),
            ],
            vec![cluster("dead", &[dead]), cluster("empty", &[])],
        ),
        hcm(),
    )
    .await;
    let c = h1_client();
    let got = get_with(&c, &p.url("/x"), &[("host", "other.example.com")]).await;
    assert_eq!(got.status, StatusCode::NOT_FOUND);
    assert_eq!(got.body, "no route for host other.example.com path /x\n");
    assert_eq!(got.header("x-biplane-error"), "no_route");
    let got = get_with(&c, &p.url("/nothing"), &[("host", "app.example.com")]).await;
    assert_eq!(got.status, StatusCode::NOT_FOUND);

    let got = get_with(&c, &p.url("/down"), &[("host", "app.example.com")]).await;
    assert_eq!(got.status, StatusCode::SERVICE_UNAVAILABLE, "{}", got.body);
    assert_eq!(got.header("x-biplane-error"), "upstream_connect_failure");
    assert!(
        p.shared
            .metrics
            .encode()
            .contains("biplane_upstream_connect_failures_total{cluster=\"dead\"} 1")
    );

    let got = get_with(&c, &p.url("/empty"), &[("host", "app.example.com")]).await;
    assert_eq!(got.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(got.header("x-biplane-error"), "no_healthy_upstream");

    let got = get_with(&c, &p.url("/unresolved"), &[("host", "app.example.com")]).await;
    assert_eq!(got.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(got.body, "backend not found");
}

#[tokio::test]
async fn timeout_gives_504() {
    let up = upstream("slow").await;
    let mut f = forward(&[("slow", 1)]);
    f.timeout = Some(Duration::from_secs(5));
    f.per_try_timeout = Some(Duration::from_millis(150));
    let p = proxy(
        config(
            &["*"],
            vec![route("r", prefix("/"), cfg::RouteAction::Forward(f))],
            vec![cluster("slow", &[up.addr])],
        ),
        hcm(),
    )
    .await;
    let c = h1_client();
    let t0 = Instant::now();
    let got = get(&c, &p.url("/delay?ms=3000")).await;
    assert_eq!(got.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(got.header("x-biplane-error"), "upstream_timeout");
    assert!(t0.elapsed() < Duration::from_secs(2));
    assert_eq!(get(&c, &p.url("/delay?ms=1")).await.status, StatusCode::OK);
}

#[tokio::test]
async fn smuggling_shapes_get_400_and_never_reach_upstream() {
    let up = upstream("a").await;
    let p = proxy(one_route(up.addr), hcm()).await;
    let cases: [&[u8]; 3] = [
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
    ];
    for raw in cases {
        let res = raw_exchange(p.addr, raw).await;
        assert!(res.starts_with("HTTP/1.1 400"), "{res}");
        assert!(res.contains("x-biplane-error: bad_request"), "{res}");
    }
    // Differing lengths: hyper's own 400.
    let res = raw_exchange(
        p.addr,
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
    )
    .await;
    assert!(res.starts_with("HTTP/1.1 400"), "{res}");
    // A clean request first on the same connection, then a bad one: the first is served.
    let res = raw_exchange(
        p.addr,
        b"GET / HTTP/1.1\r\nHost: a\r\n\r\nPOST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
    )
    .await;
    assert!(res.starts_with("HTTP/1.1 200"), "{res}");
    assert!(res.contains("HTTP/1.1 400"), "{res}");
    assert_eq!(
        up.requests.load(Ordering::SeqCst),
        1,
        "only the clean request went upstream"
    );
}

#[tokio::test]
async fn headers_too_large_get_431() {
    let up = upstream("a").await;
    let mut small = hcm();
    small.max_request_headers_kb = 2;
    let p = proxy(one_route(up.addr), small).await;
    // Over the limit but within hyper's 8 KiB minimum buffer: our guard answers.
    let raw = format!(
        "GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
        "a".repeat(3000)
    );
    let res = raw_exchange(p.addr, raw.as_bytes()).await;
    assert!(res.starts_with("HTTP/1.1 431"), "{res}");
    assert!(res.contains("headers_too_large"), "{res}");
    // Over hyper's buffer: hyper answers 431 itself.
    let raw = format!(
        "GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    let res = raw_exchange(p.addr, raw.as_bytes()).await;
    assert!(res.starts_with("HTTP/1.1 431"), "{res}");
    // Within the limit: fine.
    let raw = format!(
        "GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\nX-Ok: {}\r\n\r\n",
        "a".repeat(500)
    );
    let res = raw_exchange(p.addr, raw.as_bytes()).await;
    assert!(res.starts_with("HTTP/1.1 200"), "{res}");
    // HTTP/2: the h2 layer answers 431 for a header list over the limit.
    let h2: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let req = Request::get(p.url("/"))
        .header("x-big", "a".repeat(3000))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let res = h2.request(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert_eq!(up.requests.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn h2c_prior_knowledge_downstream() {
    let up = upstream("a").await;
    let p = proxy(one_route(up.addr), hcm()).await;
    // Prior knowledge on a plain socket, so that :authority is a name, not the address.
    let stream = TcpStream::connect(p.addr).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::get("http://h2.example.com/x?y=1")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let got = collect(send.send_request(req).await.unwrap()).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.header("x-upstream"), "a");
    // HTTP/1.1 upstream: the h2 :authority became the Host header.
    assert_eq!(got.header("x-seen-version"), "HTTP/1.1");
    assert_eq!(got.header("x-seen-host"), "h2.example.com");
    assert_eq!(got.header("x-seen-path"), "/x?y=1");
    assert!(
        got.body.contains("x-forwarded-proto: http\n"),
        "{}",
        got.body
    );
}

#[tokio::test]
async fn grpc_like_trailers_pass_through_h2() {
    let up = upstream("grpc").await;
    let mut c = cluster("grpc", &[up.addr]);
    c.protocol = cfg::UpstreamProtocol::Http2;
    let p = proxy(
        config(
            &["*"],
            vec![route("r", prefix("/"), fwd(&[("grpc", 1)]))],
            vec![c],
        ),
        hcm(),
    )
    .await;
    let h2: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let req = Request::post(p.url("/trailers"))
        .header("te", "trailers")
        .header("content-type", "application/grpc")
        .body(Full::new(Bytes::from_static(b"req")))
        .unwrap();
    let res = h2.request(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["x-seen-version"], "HTTP/2.0");
    // The h2 upstream got the downstream authority as :authority, not the endpoint address.
    assert_eq!(res.headers()["x-seen-host"], p.addr.to_string().as_str());
    let collected = res.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().expect("trailers");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(collected.to_bytes(), "grpc-ish");
    // More requests multiplex over the one upstream h2 connection.
    for _ in 0..5 {
        let req = Request::get(p.url("/"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        assert_eq!(h2.request(req).await.unwrap().status(), StatusCode::OK);
    }
    assert_eq!(up.accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn bodies_stream_both_ways() {
    let up = upstream("a").await;
    let p = proxy(one_route(up.addr), hcm()).await;
    let stream = TcpStream::connect(p.addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let (mut tx, body) = http_body_util::channel::Channel::<Bytes, Infallible>::new(1);
    let req = Request::post("/echo")
        .header("host", "a")
        .body(body)
        .unwrap();
    tx.send_data(Bytes::from_static(b"first")).await.unwrap();
    let res = tokio::time::timeout(Duration::from_secs(5), send.send_request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let mut body = res.into_body();
    // The first chunk comes back before the request body is finished.
    let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(frame.into_data().unwrap(), "first");
    tx.send_data(Bytes::from_static(b"second")).await.unwrap();
    let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(frame.into_data().unwrap(), "second");
    drop(tx);
    let rest = tokio::time::timeout(Duration::from_secs(5), body.collect())
        .await
        .unwrap()
        .unwrap();
    assert!(rest.to_bytes().is_empty());
}

#[tokio::test]
async fn websocket_upgrade_tunnels() {
    let up = upstream("ws").await;
    let p = proxy(
        config(
            &["*"],
            vec![route("r", prefix("/"), fwd(&[("ws", 1)]))],
            vec![cluster("ws", &[up.addr])],
        ),
        hcm(),
    )
    .await;
    let stream = TcpStream::connect(p.addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn.with_upgrades());
    let req = Request::get("/ws")
        .header("host", "a")
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let mut res = send.send_request(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert_eq!(res.headers()["upgrade"], "websocket");
    let upgraded = hyper::upgrade::on(&mut res).await.unwrap();
    let mut io = TokioIo::new(upgraded);
    io.write_all(b"ping through the tunnel").await.unwrap();
    let mut buf = vec![0u8; 23];
    tokio::time::timeout(Duration::from_secs(5), io.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(buf, b"ping through the tunnel");
}

#[tokio::test]
async fn config_swap_applies_to_next_request_on_same_connection() {
    let a = upstream("a").await;
    let b = upstream("b").await;
    let clusters = vec![cluster("a", &[a.addr]), cluster("b", &[b.addr])];
    let p = proxy(
        config(
            &["*"],
            vec![route("r", prefix("/"), fwd(&[("a", 1)]))],
            clusters.clone(),
        ),
        hcm(),
    )
    .await;
    let stream = TcpStream::connect(p.addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = || {
        Request::get("/")
            .header("host", "x")
            .body(Empty::<Bytes>::new())
            .unwrap()
    };
    let res = send.send_request(req()).await.unwrap();
    assert_eq!(res.headers()["x-upstream"], "a");
    res.into_body().collect().await.unwrap();
    let old_a = p.shared.snapshot.load().http.clusters["a"].clone();
    p.swap(config(
        &["*"],
        vec![route("r", prefix("/"), fwd(&[("b", 1)]))],
        clusters,
    ));
    // Unchanged clusters are carried over (same pool).
    assert!(Arc::ptr_eq(
        &old_a,
        &p.shared.snapshot.load().http.clusters["a"]
    ));
    let res = send.send_request(req()).await.unwrap();
    assert_eq!(res.headers()["x-upstream"], "b");
}

#[tokio::test]
async fn redirect_rewrite_and_header_mutation() {
    let up = upstream("a").await;
    let mut f = forward(&[("a", 1)]);
    f.path_rewrite = Some(cfg::PathRewrite::ReplacePrefix("/v2".into()));
    f.host_rewrite = Some("internal.svc".into());
    let mut api = route("api", prefix("/v1"), cfg::RouteAction::Forward(f));
    api.request_headers = cfg::HeaderMutation {
        remove: vec!["x-drop".into()],
        set: vec![("x-set".into(), "s".into())],
        add: vec![("x-add".into(), "a".into())],
    };
    api.response_headers = cfg::HeaderMutation {
        remove: vec!["x-seen-version".into()],
        set: vec![("x-resp".into(), "r".into())],
        add: vec![],
    };
    let redirect = route(
        "redir",
        prefix("/old"),
        cfg::RouteAction::Redirect(cfg::Redirect {
            scheme: Some("https".into()),
            host: None,
            port: None,
            path: Some(cfg::RedirectPath::ReplacePrefix("/new".into())),
            status: 301,
        }),
    );
    let p = proxy(
        config(&["*"], vec![api, redirect], vec![cluster("a", &[up.addr])]),
        hcm(),
    )
    .await;
    let c = h1_client();
    let got = get_with(
        &c,
        &p.url("/v1/items?q=1"),
        &[
            ("host", "api.example.com"),
            ("x-drop", "1"),
            ("x-set", "old"),
        ],
    )
    .await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.header("x-seen-path"), "/v2/items?q=1");
    assert_eq!(got.header("x-seen-host"), "internal.svc");
    assert!(!got.body.contains("x-drop"), "{}", got.body);
    assert!(
        got.body.contains("x-set: s\n") && got.body.contains("x-add: a\n"),
        "{}",
        got.body
    );
    assert_eq!(got.header("x-resp"), "r");
    assert!(got.headers.get("x-seen-version").is_none());

    let got = get_with(
        &c,
        &p.url("/old/page?a=b"),
        &[("host", "www.example.com:8080")],
    )
    .await;
    assert_eq!(got.status, StatusCode::MOVED_PERMANENTLY);
    assert_eq!(
        got.header("location"),
        "https://www.example.com/new/page?a=b"
    );
}

#[tokio::test]
async fn ring_hash_is_sticky_on_header() {
    let ups = [
        upstream("u0").await,
        upstream("u1").await,
        upstream("u2").await,
        upstream("u3").await,
    ];
    let mut c = cluster("ring", &ups.iter().map(|u| u.addr).collect::<Vec<_>>());
    c.lb_policy = cfg::LbPolicy::RingHash {
        minimum_ring_size: 1024,
        maximum_ring_size: 8_388_608,
    };
    let mut f = forward(&[("ring", 1)]);
    f.hash_policy = vec![cfg::HashPolicy::Header("x-user".into())];
    let p = proxy(
        config(
            &["*"],
            vec![route("r", prefix("/"), cfg::RouteAction::Forward(f))],
            vec![c],
        ),
        hcm(),
    )
    .await;
    let client = h1_client();
    let mut seen = std::collections::HashSet::new();
    for user in [
        "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi",
    ] {
        let first = get_with(&client, &p.url("/"), &[("x-user", user)])
            .await
            .header("x-upstream")
            .to_owned();
        for _ in 0..5 {
            assert_eq!(
                get_with(&client, &p.url("/"), &[("x-user", user)])
                    .await
                    .header("x-upstream"),
                first
            );
        }
        seen.insert(first);
    }
    assert!(seen.len() >= 2, "8 users all on one endpoint: {seen:?}");
}

/// Poll until the server closes `s` (EOF), or fail at the deadline.
async fn closed_by_server(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

#[tokio::test]
async fn idle_keep_alive_connection_is_closed() {
    let up = upstream("a").await;
    let mut h = hcm();
    h.idle_timeout = Some(Duration::from_millis(200));
    let p = proxy(one_route(up.addr), h).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let t0 = Instant::now();
    assert!(
        closed_by_server(&mut s, Duration::from_secs(5)).await,
        "idle connection not closed"
    );
    assert!(t0.elapsed() >= Duration::from_millis(150));
    // A connection that never sends a request is closed too.
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    assert!(closed_by_server(&mut s, Duration::from_secs(5)).await);
}

#[tokio::test]
async fn drain_closes_connections_after_in_flight_response() {
    let up = upstream("a").await;
    let p = proxy(one_route(up.addr), hcm()).await;
    let stream = TcpStream::connect(p.addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    let conn_task = tokio::spawn(conn);
    let in_flight = send.send_request(
        Request::get("/delay?ms=300")
            .header("host", "a")
            .body(Empty::<Bytes>::new())
            .unwrap(),
    );
    let in_flight = tokio::spawn(in_flight);
    // Wait until the upstream has the request, then drain.
    let deadline = Instant::now() + Duration::from_secs(5);
    while up.requests.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline);
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    p.shutdown.send(true).unwrap();
    let res = in_flight.await.unwrap().unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["connection"], "close");
    let _ = res.into_body().collect().await;
    tokio::time::timeout(Duration::from_secs(5), conn_task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn access_log_line_written() {
    // Exercise the logging path end to end (the line goes to stdout; format is unit-tested).
    let up = upstream("a").await;
    let p = proxy(one_route(up.addr), hcm()).await;
    let shared = Arc::new(Shared {
        snapshot: ArcSwap::new(p.shared.snapshot.load_full()),
        metrics: p.shared.metrics.clone(),
        options: ProxyOptions {
            access_log: true,
            ..ProxyOptions::default()
        },
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let (stream, peer) = listener.accept().await.unwrap();
        let conn = ConnInfo {
            listener: "logged".into(),
            peer,
            local: addr,
            tls: false,
            alpn_h2: false,
            sni: None,
        };
        biplane_proxy::http::serve_connection(stream, conn, Arc::new(hcm()), shared, rx).await;
    });
    let c = h1_client();
    let req = Request::post(format!("http://{addr}/echo"))
        .body(Full::new(Bytes::from_static(b"12345")))
        .unwrap();
    let got = collect(c.request(req).await.unwrap()).await;
    assert_eq!(got.body, "12345");
}

#[allow(
    dead_code,
    reason = "keeps the Frame import meaningful for future trailer tests"
)]
fn _frame(_: Frame<Bytes>, _: Method) {}

// ---------------------------------------------------------------------------------------
// Our HTTP/1 server: what hyper's did for us, and what it could not
// ---------------------------------------------------------------------------------------

async fn simple_proxy() -> (Upstream, Proxy) {
    let up = upstream("a").await;
    let p = proxy(
        config(
            &["*"],
            vec![
                route(
                    "local",
                    prefix("/local"),
                    cfg::RouteAction::DirectResponse {
                        status: 200,
                        body: "local".into(),
                    },
                ),
                route("r", prefix("/"), fwd(&[("a", 1)])),
            ],
            vec![cluster("a", &[up.addr])],
        ),
        hcm(),
    )
    .await;
    (up, p)
}

/// Reads one response (head and a Content-Length or chunked body) off `s`; bytes of the
/// next response stay in `carry`.
async fn read_response(s: &mut TcpStream, carry: &mut Vec<u8>) -> String {
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(end) = carry.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&carry[..end]).to_lowercase();
            let body_start = end + 4;
            let len = if let Some(cl) = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
            {
                let n = cl.trim().parse::<usize>().unwrap();
                (carry.len() >= body_start + n).then_some(body_start + n)
            } else if head.contains("transfer-encoding: chunked") {
                // The last chunk, then trailer fields up to an empty line.
                carry[body_start..]
                    .windows(5)
                    .position(|w| w == b"0\r\n\r\n" || w.starts_with(b"\r\n0\r\n"))
                    .and_then(|p| {
                        let rest = &carry[body_start + p..];
                        rest.windows(4)
                            .position(|w| w == b"\r\n\r\n")
                            .map(|e| body_start + p + e + 4)
                    })
            } else {
                Some(body_start)
            };
            if let Some(len) = len {
                let one: Vec<u8> = carry.drain(..len).collect();
                return String::from_utf8_lossy(&one).into_owned();
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => {
                let all: Vec<u8> = std::mem::take(carry);
                return String::from_utf8_lossy(&all).into_owned();
            }
            Ok(Ok(n)) => carry.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test]
async fn h1_pipelined_requests_are_answered_in_order() {
    let (up, p) = simple_proxy().await;
    let res = raw_exchange(
        p.addr,
        b"GET /first HTTP/1.1\r\nHost: a\r\n\r\nGET /local HTTP/1.1\r\nHost: a\r\n\r\nGET /third HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    let first = res.find("x-seen-path: /first").unwrap();
    let local = res.find("\r\n\r\nlocal").unwrap();
    let third = res.find("x-seen-path: /third").unwrap();
    assert!(first < local && local < third, "{res}");
    assert_eq!(res.matches("HTTP/1.1 200").count(), 3, "{res}");
    assert!(res.contains("connection: close"), "{res}");
    assert_eq!(up.requests.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn h1_http10_keep_alive_only_when_asked() {
    let (_up, p) = simple_proxy().await;
    // HTTP/1.0 without keep-alive: one response, then the connection closes.
    let res = raw_exchange(p.addr, b"GET /local HTTP/1.0\r\n\r\n").await;
    assert!(res.starts_with("HTTP/1.1 200"), "{res}");
    assert!(res.contains("connection: close"), "{res}");
    // With keep-alive: the connection stays for a second request.
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    let mut carry = Vec::new();
    s.write_all(b"GET /local HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        .await
        .unwrap();
    let res = read_response(&mut s, &mut carry).await;
    assert!(res.contains("connection: keep-alive"), "{res}");
    s.write_all(b"GET /local HTTP/1.0\r\n\r\n").await.unwrap();
    let res = read_response(&mut s, &mut carry).await;
    assert!(res.starts_with("HTTP/1.1 200"), "{res}");
}

#[tokio::test]
async fn h1_expect_continue_and_chunked_request_with_trailers() {
    let (_up, p) = simple_proxy().await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    let mut carry = Vec::new();
    s.write_all(
        b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
    )
    .await
    .unwrap();
    // The go-ahead comes before we send the body (the upstream asked for it).
    let mut buf = [0u8; 25];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"HTTP/1.1 100 Continue\r\n\r\n");
    s.write_all(b"hello").await.unwrap();
    let res = read_response(&mut s, &mut carry).await;
    assert!(res.starts_with("HTTP/1.1 200"), "{res}");
    assert!(res.ends_with("\r\n\r\nhello"), "{res}");

    // Chunked in, with extensions and trailer fields (decoded and handed on; hyper's HTTP/1
    // client sends trailers upstream only when a `Trailer` header announced them); the
    // echo streams the body back.
    s.write_all(
        b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n4\r\ndefg\r\n0\r\nx-checksum: 1\r\n\r\n",
    )
    .await
    .unwrap();
    let res = read_response(&mut s, &mut carry).await;
    assert!(res.starts_with("HTTP/1.1 200"), "{res}");
    let body: String = res
        .split("\r\n\r\n")
        .nth(1)
        .unwrap()
        .split("\r\n")
        .filter(|l| l.chars().all(|c| c.is_ascii_lowercase()) && !l.is_empty())
        .collect();
    assert_eq!(body, "abcdefg", "{res}");
}

#[tokio::test]
async fn h1_unread_body_is_drained_and_the_connection_kept() {
    let (_up, p) = simple_proxy().await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    let mut carry = Vec::new();
    // A local answer never reads the body; the next request must still parse.
    s.write_all(b"POST /local HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n0123456789GET /local HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let first = read_response(&mut s, &mut carry).await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    assert!(!first.contains("connection: close"), "{first}");
    let second = read_response(&mut s, &mut carry).await;
    assert!(second.starts_with("HTTP/1.1 200"), "{second}");
    // Chunked, too.
    s.write_all(b"POST /local HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\nGET /local HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let third = read_response(&mut s, &mut carry).await;
    assert!(third.starts_with("HTTP/1.1 200"), "{third}");
    let fourth = read_response(&mut s, &mut carry).await;
    assert!(fourth.starts_with("HTTP/1.1 200"), "{fourth}");
}

#[tokio::test]
async fn h1_refusals_name_the_status() {
    let (up, p) = simple_proxy().await;
    let cases: [(&[u8], &str); 5] = [
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "HTTP/1.1 501",
        ),
        (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", "HTTP/1.1 505"),
        (
            b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "HTTP/1.1 400",
        ),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            "HTTP/1.1 400",
        ),
        (
            b"POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "HTTP/1.1 400",
        ),
    ];
    for (raw, want) in cases {
        let res = raw_exchange(p.addr, raw).await;
        assert!(
            res.starts_with(want),
            "{}: {res}",
            String::from_utf8_lossy(raw)
        );
    }
    // HEAD: the upstream's length, no body.
    let res = raw_exchange(
        p.addr,
        b"HEAD /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(res.starts_with("HTTP/1.1 200"), "{res}");
    assert!(res.ends_with("\r\n\r\n"), "{res}");
    // The HEAD reached the upstream; of the refused ones at most the malformed chunked
    // request did (its head was sent before its body broke), none of the others.
    let seen = up.requests.load(Ordering::SeqCst);
    assert!((1..=2).contains(&seen), "{seen}");
}

#[tokio::test]
async fn h1_request_headers_timeout_answers_408() {
    let up = upstream("a").await;
    let mut h = hcm();
    h.request_headers_timeout = Some(Duration::from_millis(200));
    let p = proxy(one_route(up.addr), h).await;
    // An idle connection is not timed out by the headers timeout...
    let mut idle = TcpStream::connect(p.addr).await.unwrap();
    let mut carry = Vec::new();
    // ... but a head that stops half-way is.
    let res = raw_exchange(p.addr, b"GET / HTTP/1.1\r\nHost: a\r\n").await;
    assert!(res.starts_with("HTTP/1.1 408"), "{res}");
    idle.write_all(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let res = read_response(&mut idle, &mut carry).await;
    assert!(res.starts_with("HTTP/1.1 200"), "{res}");
}
