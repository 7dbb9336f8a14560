//! Shared helpers of the proxy's connection-layer integration tests: config builders,
//! in-process upstreams (TCP and TLS echo servers that name themselves), certificates,
//! a TLS client and a tiny HTTP/1.1 client for the admin endpoints.
#![allow(dead_code, reason = "each test file uses a different subset")]
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use biplane_config::{
    Certificate, ChainHandler, ChainMatch, Cluster, Config, Endpoint, FilterChain, LbPolicy,
    Listener, TcpProxy, TlsTermination, UpstreamProtocol, WeightedCluster,
};
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;

pub const LOCAL: &str = "127.0.0.1:0";

pub fn cluster(name: &str, addrs: &[SocketAddr]) -> Cluster {
    Cluster {
        name: name.into(),
        connect_timeout: Duration::from_secs(2),
        lb_policy: LbPolicy::RoundRobin,
        endpoints: addrs
            .iter()
            .map(|a| Endpoint {
                address: *a,
                weight: 1,
            })
            .collect(),
        protocol: UpstreamProtocol::Http1,
        idle_timeout: None,
    }
}

pub fn tcp_chain(
    name: &str,
    server_names: &[&str],
    tls_match: Option<bool>,
    cluster: &str,
) -> FilterChain {
    FilterChain {
        name: name.into(),
        matcher: ChainMatch {
            server_names: server_names.iter().map(|s| s.to_string()).collect(),
            tls: tls_match,
        },
        tls: None,
        handler: ChainHandler::Tcp(TcpProxy {
            stat_prefix: name.into(),
            clusters: vec![WeightedCluster {
                name: cluster.into(),
                weight: 1,
            }],
            idle_timeout: Some(Duration::from_secs(30)),
        }),
    }
}

pub fn listener(name: &str, address: &str, chains: Vec<FilterChain>) -> Listener {
    Listener {
        name: name.into(),
        address: address.parse().unwrap(),
        filter_chains: chains,
    }
}

pub fn config(version: &str, listeners: Vec<Listener>, clusters: Vec<Cluster>) -> Config {
    Config {
        version: version.into(),
        listeners,
        route_configs: Vec::new(),
        clusters,
    }
}

pub fn addr_of(proxy: &biplane_proxy::Proxy, name: &str) -> SocketAddr {
    proxy
        .listener_addrs()
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, a)| a)
        .unwrap_or_else(|| panic!("no listener {name}"))
}

/// A TCP upstream that first writes `"{name}\n"`, then echoes everything back.
pub async fn tcp_echo(name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind(LOCAL).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(echo(stream, name));
        }
    });
    addr
}

async fn echo<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, name: &str) {
    if stream
        .write_all(format!("{name}\n").as_bytes())
        .await
        .is_err()
    {
        return;
    }
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if stream.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
    let _ = stream.shutdown().await;
}

/// A self-signed certificate for `names`.
pub struct TestCert {
    pub name: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub der: CertificateDer<'static>,
}

pub fn cert(secret: &str, names: &[&str]) -> TestCert {
    let ck =
        rcgen::generate_simple_self_signed(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
    TestCert {
        name: secret.into(),
        cert_pem: ck.cert.pem(),
        key_pem: ck.signing_key.serialize_pem(),
        der: ck.cert.der().clone(),
    }
}

impl TestCert {
    pub fn config(&self) -> Certificate {
        Certificate {
            name: self.name.clone(),
            cert_chain_pem: self.cert_pem.clone(),
            private_key_pem: self.key_pem.clone(),
        }
    }
}

pub fn termination(certs: &[&TestCert], alpn: &[&str]) -> TlsTermination {
    TlsTermination {
        certificates: certs.iter().map(|c| c.config()).collect(),
        alpn: alpn.iter().map(|s| s.to_string()).collect(),
    }
}

/// A TLS upstream (terminating with `cert`) that writes `"{name}\n"` then echoes.
pub async fn tls_echo(name: &'static str, cert: &TestCert) -> SocketAddr {
    let acceptor = biplane_proxy::tls::build_acceptor(&termination(&[cert], &[])).unwrap();
    let listener = TcpListener::bind(LOCAL).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(stream).await {
                    echo(tls, name).await;
                }
            });
        }
    });
    addr
}

/// A TLS client that trusts only `roots`, sends `sni`, offers `alpn`.
pub fn connector(roots: &[&CertificateDer<'static>], alpn: &[&[u8]]) -> TlsConnector {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add((*r).clone()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(store)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    TlsConnector::from(Arc::new(config))
}

pub async fn tls_connect(
    connector: &TlsConnector,
    addr: SocketAddr,
    sni: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    connector
        .connect(ServerName::try_from(sni.to_owned()).unwrap(), tcp)
        .await
}

/// Reads one `\n`-terminated line (the upstream's name).
pub async fn read_line<S: AsyncRead + Unpin>(s: &mut S) -> String {
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b))
            .await
            .unwrap()
            .unwrap();
        if n == 0 || b[0] == b'\n' {
            break;
        }
        out.push(b[0]);
    }
    String::from_utf8(out).unwrap()
}

/// Sends `msg` and expects it echoed back.
pub async fn roundtrip<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, msg: &[u8]) {
    s.write_all(msg).await.unwrap();
    let mut back = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back, msg);
}

/// True once the peer closed the connection (EOF or reset) within 5 s.
pub async fn closed_by_peer<S: AsyncRead + Unpin>(s: &mut S) -> bool {
    let mut b = [0u8; 64];
    matches!(
        tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await,
        Ok(Ok(0) | Err(_))
    )
}

/// `GET path` over HTTP/1.1 with `Connection: close`: (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut raw))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8(raw).unwrap();
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Polls `check` until it is true or 5 s pass.
pub async fn eventually<F, Fut>(mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
