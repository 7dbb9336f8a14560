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
    Full::new(b.into()).map_err(|never: Infallible| match never {}).boxed()
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
            let Ok((stream, _)) = listener.accept().await else { return };
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
    Upstream { addr, accepted, requests }
}

async fn upstream_handler(name: &'static str, mut req: Request<Incoming>) -> Result<Response<UpBody>, Infallible> {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
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
            res.headers_mut().insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            res.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            res
        }
        "/echo" => Response::new(req.into_body().boxed()),
        "/delay" => {
            let ms: u64 = query.strip_prefix("ms=").and_then(|v| v.parse().ok()).unwrap_or(0);
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
    let pq = req.uri().path_and_query().map_or("/".to_owned(), |p| p.to_string());
    h.insert("x-seen-path", HeaderValue::from_str(&pq).unwrap());
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .unwrap_or_default();
    h.insert("x-seen-host", HeaderValue::from_str(&host).unwrap());
    h.insert("x-seen-version", HeaderValue::from_str(&format!("{:?}", req.version())).unwrap());
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
        endpoints: addrs.iter().map(|a| cfg::Endpoint { address: *a, weight: 1 }).collect(),
        protocol: cfg::UpstreamProtocol::Http1,
        idle_timeout: None,
    }
}

fn forward(clusters: &[(&str, u32)]) -> cfg::Forward {
    cfg::Forward {
        clusters: clusters.iter().map(|(n, w)| cfg::WeightedCluster { name: (*n).into(), weight: *w }).collect(),
        path_rewrite: None,
        host_rewrite: None,
        timeout: None,
        per_try_timeout: None,
        hash_policy: vec![],
    }
}

fn route(name: &str, path: cfg::PathMatch, action: cfg::RouteAction) -> cfg::Route {
    cfg::Route {
        name: name.into(),
        matcher: cfg::RouteMatch { path, ..Default::default() },
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
        self.shared.snapshot.store(Arc::new(Snapshot { config, http }));
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
        options: ProxyOptions { access_log: false, ..ProxyOptions::default() },
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::watch::channel(false);
    let hcm = Arc::new(hcm);
    let sh = shared.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else { return };
            let conn = ConnInfo {
                listener: "test".into(),
                peer,
                local: stream.local_addr().unwrap(),
                tls: false,
                alpn_h2: false,
                sni: None,
            };
            tokio::spawn(biplane_proxy::http::serve_connection(stream, conn, hcm.clone(), sh.clone(), rx.clone()));
        }
    });
    Proxy { addr, shared, shutdown: tx }
}

fn h1_client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

async fn get(client: &Client<HttpConnector, Full<Bytes>>, url: &str) -> (Response<Incoming>, String) {
    get_with(client, url, &[]).await
}

async fn get_with(
    client: &Client<HttpConnector, Full<Bytes>>,
    url: &str,
    headers: &[(&str, &str)],
) -> (Response<Incoming>, String) {
    let mut req = Request::get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let res = client.request(req.body(Full::new(Bytes::new())).unwrap()).await.unwrap();
    let (parts, body) = res.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    (Response::from_parts(parts, Incoming::default_for_tests()), String::from_utf8_lossy(&bytes).into_owned())
}

/// `Response<Incoming>` cannot be built by hand; keep only the head.
trait DefaultForTests {
    fn default_for_tests() -> Self;
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
