//! End-to-end protocols through `biplane proxy`: h2 over TLS (ALPN), h2c prior knowledge,
//! TLS termination with SNI certificate selection, TLS passthrough, TCP, WebSocket, gRPC
//! with trailers, and bodies streamed both ways.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a panic is a failure"
)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use common::*;
use rustls_pki_types::pem::PemObject as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const REF_A: &str = "{group: biplane.dev, kind: Backend, name: a}";

fn http_route(name: &str) -> String {
    format!(
        "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: {name}\nspec:\n  parentRefs: [{{name: gw}}]\n  rules:\n  - backendRefs: [{REF_A}]\n"
    )
}

/// Echo `A` behind a plain HTTP listener with one catch-all route.
async fn plain_setup() -> (Echo, Proxy, SocketAddr) {
    let a = Echo::spawn("A");
    let (proxy, ports) = Proxy::start_on_ports(1, |p| {
        format!(
            "{}{}{}",
            http_gateway(p[0]),
            backend("a", &[(a.addr, 1)]),
            http_route("all")
        )
    })
    .await;
    (a, proxy, ([127, 0, 0, 1], ports[0]).into())
}

#[tokio::test]
async fn http1_bodies_stream_both_ways() {
    let (_a, _proxy, addr) = plain_setup().await;
    let c = client();
    let payload: Vec<u8> = (0..2_000_000u32).map(|i| (i % 251) as u8).collect();
    let r = c
        .post(format!("http://{addr}/up?echo_body=1"))
        .body(payload.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap().as_ref(), payload.as_slice());
    let r = c
        .get(format!("http://{addr}/down?body_bytes=3000000"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap().len(), 3_000_000);
}

#[tokio::test]
async fn h2c_prior_knowledge() {
    let (_a, _proxy, addr) = plain_setup().await;
    let c = h2c_client();
    let r = c.get(format!("http://{addr}/h2c")).send().await.unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-echo-name"], "A");
    let v = json(&r.bytes().await.unwrap());
    assert_eq!(v["path"], "/h2c");
    // The h2 `:authority` reaches an HTTP/1.1 upstream as `Host`.
    assert_eq!(v["headers"]["host"], addr.to_string());
    let payload = vec![42u8; 1_000_000];
    let r = c
        .put(format!("http://{addr}/up?echo_body=1"))
        .body(payload.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap().len(), payload.len());

    // What a user would type.
    let out = tokio::process::Command::new("curl")
        .args([
            "-s",
            "--http2-prior-knowledge",
            "-o",
            "/dev/null",
            "-w",
            "%{http_version} %{http_code}",
        ])
        .arg(format!("http://{addr}/curl"))
        .output()
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "2 200");
}

#[tokio::test]
async fn websocket_through_the_proxy() {
    let (_a, _proxy, addr) = plain_setup().await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let resp = ws_handshake(&mut s, "ws.example.com", "/chat").await;
    assert_eq!(resp.header("x-echo-name").as_deref(), Some("A"));
    for i in 0..3 {
        let msg = format!("message {i}");
        ws_send(&mut s, 0x1, msg.as_bytes()).await;
        assert_eq!(ws_recv(&mut s).await, (0x1, msg.into_bytes()));
    }
    let big = vec![0x5Au8; 100_000];
    ws_send(&mut s, 0x2, &big).await;
    assert_eq!(ws_recv(&mut s).await, (0x2, big));
    ws_send(&mut s, 0x8, &[0x03, 0xE8]).await;
    assert_eq!(ws_recv(&mut s).await.0, 0x8);
}

#[tokio::test]
async fn grpc_with_trailers_over_h2c() {
    let g = Echo::spawn("G");
    let (_proxy, ports) = Proxy::start_on_ports(1, |p| {
        format!(
            "{}{}---\napiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata:\n  name: grpc\nspec:\n  parentRefs: [{{name: gw}}]\n  rules:\n  - matches: [{{method: {{service: test.Echo}}}}]\n    backendRefs: [{{group: biplane.dev, kind: Backend, name: g}}]\n",
            http_gateway(p[0]),
            backend_h2c("g", g.addr)
        )
    })
    .await;
    let addr: SocketAddr = ([127, 0, 0, 1], ports[0]).into();

    let s = TcpStream::connect(addr).await.unwrap();
    let reply = grpc_call(
        s,
        &addr.to_string(),
        "/test.Echo/Unary",
        b"grpc payload",
        &[],
    )
    .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.headers["content-type"], "application/grpc");
    assert_eq!(reply.headers["x-echo-name"], "G");
    assert_eq!(reply.messages, vec![Bytes::from_static(b"grpc payload")]);
    assert_eq!(
        reply.trailers.expect("trailers must pass through")["grpc-status"],
        "0"
    );

    // A non-zero status in the trailers passes through too.
    let s = TcpStream::connect(addr).await.unwrap();
    let reply = grpc_call(
        s,
        &addr.to_string(),
        "/test.Echo/Fail",
        b"x",
        &[("x-echo-grpc-status", "14")],
    )
    .await;
    assert_eq!(reply.trailers.unwrap()["grpc-status"], "14");

    // A service that no rule matches is not routed.
    let s = TcpStream::connect(addr).await.unwrap();
    let reply = grpc_call(s, &addr.to_string(), "/other.Service/M", b"x", &[]).await;
    assert_ne!(
        reply.headers.get("x-echo-name").map(|v| v.as_bytes()),
        Some(&b"G"[..])
    );
}

/// A Gateway with two HTTPS listeners on one port (SNI `a.example.com`, `b.example.com`).
fn tls_gateway(port: u16, cert_a: &TestCert, cert_b: &TestCert) -> String {
    format!(
        r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: gw
spec:
  listeners:
  - name: https-a
    port: {port}
    protocol: HTTPS
    hostname: a.example.com
    tls:
      mode: Terminate
      certificateRefs: [{{name: cert-a}}]
  - name: https-b
    port: {port}
    protocol: HTTPS
    hostname: b.example.com
    tls:
      certificateRefs: [{{kind: Secret, name: cert-b}}]
{}{}"#,
        tls_secret("cert-a", &cert_a.cert_pem, &cert_a.key_pem),
        tls_secret("cert-b", &cert_b.cert_pem, &cert_b.key_pem)
    )
}

#[tokio::test]
async fn tls_termination_selects_certificate_by_sni_and_speaks_h2() {
    let a = Echo::spawn("A");
    let cert_a = cert(&["a.example.com"]);
    let cert_b = cert(&["b.example.com"]);
    let (_proxy, ports) = Proxy::start_on_ports(1, |p| {
        format!(
            "{}{}{}",
            tls_gateway(p[0], &cert_a, &cert_b),
            backend("a", &[(a.addr, 1)]),
            http_route("all")
        )
    })
    .await;
    let addr: SocketAddr = ([127, 0, 0, 1], ports[0]).into();

    for (sni, want) in [("a.example.com", &cert_a), ("b.example.com", &cert_b)] {
        let cfg = tls_client_config(&[&cert_a, &cert_b], &[b"http/1.1"]);
        let mut s = tls_connect(addr, sni, cfg).await;
        let got = s.get_ref().1.peer_certificates().unwrap()[0].clone();
        assert!(got == want.der, "SNI {sni} got the wrong certificate");
        let req = format!("GET /tls HTTP/1.1\r\nHost: {sni}\r\n\r\n");
        let resp = raw_exchange(&mut s, req.as_bytes()).await;
        assert_eq!(resp.status, 200, "{}", resp.head);
        let v = json(&resp.body);
        assert_eq!(v["headers"]["x-forwarded-proto"], "https");
    }

    // ALPN h2 is negotiated and requests flow over it.
    let cfg = tls_client_config(&[&cert_a, &cert_b], &[b"h2", b"http/1.1"]);
    let s = tls_connect(addr, "a.example.com", cfg.clone()).await;
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    drop(s);
    let c = reqwest::Client::builder()
        .no_proxy()
        .tls_backend_preconfigured(cfg)
        .resolve("a.example.com", addr)
        .resolve("b.example.com", addr)
        .timeout(DEADLINE)
        .build()
        .unwrap();
    for host in ["a.example.com", "b.example.com"] {
        let r = c
            .get(format!("https://{host}:{}/h2", addr.port()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.version(), reqwest::Version::HTTP_2);
        assert_eq!(r.status(), 200);
        assert_eq!(
            json(&r.bytes().await.unwrap())["headers"]["host"],
            format!("{host}:{}", addr.port())
        );
    }

    // An SNI no listener serves gets no certificate for it.
    let cfg = tls_client_config(&[&cert_a, &cert_b], &[b"http/1.1"]);
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("c.example.com").unwrap();
    let res = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await;
    assert!(
        res.is_err(),
        "c.example.com must not be served a valid certificate"
    );
}

/// A TLS server (the passthrough upstream): greets with its name, then echoes lines.
async fn tls_upstream(c: &TestCert) -> SocketAddr {
    crypto();
    let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(c.key_pem.as_bytes()).unwrap();
    let cfg = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![c.der.clone()], key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(s).await else {
                    return;
                };
                let _ = tls
                    .write_all(b"hello from the passthrough upstream\n")
                    .await;
                let mut buf = [0u8; 1024];
                while let Ok(n) = tls.read(&mut buf).await {
                    if n == 0 || tls.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// A plain TCP echo.
async fn tcp_upstream() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn tls_passthrough_by_sni() {
    let up_cert = cert(&["pass.example.com"]);
    let other_cert = cert(&["other.example.com"]);
    let pass = tls_upstream(&up_cert).await;
    let other = tls_upstream(&other_cert).await;
    let (_proxy, ports) = Proxy::start_on_ports(1, |p| {
        format!(
            r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: gw
spec:
  listeners:
  - name: tls
    port: {}
    protocol: TLS
    tls: {{mode: Passthrough}}
{}{}---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TLSRoute
metadata:
  name: pass
spec:
  parentRefs: [{{name: gw, sectionName: tls}}]
  hostnames: ["pass.example.com"]
  rules:
  - backendRefs: [{{group: biplane.dev, kind: Backend, name: pass}}]
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TLSRoute
metadata:
  name: other
spec:
  parentRefs: [{{name: gw}}]
  hostnames: ["other.example.com"]
  rules:
  - backendRefs: [{{group: biplane.dev, kind: Backend, name: other}}]
"#,
            p[0],
            backend("pass", &[(pass, 1)]),
            backend("other", &[(other, 1)])
        )
    })
    .await;
    let addr: SocketAddr = ([127, 0, 0, 1], ports[0]).into();
    for (sni, c) in [
        ("pass.example.com", &up_cert),
        ("other.example.com", &other_cert),
    ] {
        // The client sees the upstream's own certificate: the proxy did not terminate.
        let mut s = tls_connect(addr, sni, tls_client_config(&[c], &[])).await;
        assert!(s.get_ref().1.peer_certificates().unwrap()[0] == c.der);
        let mut greeting = vec![0u8; 36];
        tokio::time::timeout(DEADLINE, s.read_exact(&mut greeting))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&greeting, b"hello from the passthrough upstream\n");
        s.write_all(b"ping\n").await.unwrap();
        let mut back = [0u8; 5];
        tokio::time::timeout(DEADLINE, s.read_exact(&mut back))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&back, b"ping\n");
    }
    // An SNI no route names: the connection is not forwarded anywhere.
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("nobody.example.com").unwrap();
    let cfg = tls_client_config(&[&up_cert, &other_cert], &[]);
    let res = tokio::time::timeout(
        DEADLINE,
        tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp),
    )
    .await;
    assert!(
        res.unwrap().is_err(),
        "an unknown SNI must not complete a handshake"
    );
}

#[tokio::test]
async fn tcp_route_proxies_bytes() {
    let up = tcp_upstream().await;
    let (_proxy, ports) = Proxy::start_on_ports(1, |p| {
        format!(
            r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: gw
spec:
  listeners:
  - name: tcp
    port: {}
    protocol: TCP
{}---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata:
  name: tcp
spec:
  parentRefs: [{{name: gw}}]
  rules:
  - backendRefs: [{{group: biplane.dev, kind: Backend, name: t}}]
"#,
            p[0],
            backend("t", &[(up, 1)])
        )
    })
    .await;
    let addr: SocketAddr = ([127, 0, 0, 1], ports[0]).into();
    let mut s = TcpStream::connect(addr).await.unwrap();
    let data: Vec<u8> = (0..500_000u32).map(|i| (i % 256) as u8).collect();
    let (mut r, mut w) = s.split();
    let write = async {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let read = async {
        let mut got = Vec::new();
        tokio::time::timeout(DEADLINE, r.read_to_end(&mut got))
            .await
            .unwrap()
            .unwrap();
        got
    };
    let ((), got) = tokio::join!(write, read);
    assert_eq!(got.len(), data.len());
    assert!(got == data, "bytes changed in transit");
}

#[tokio::test]
async fn grpc_over_tls_h2() {
    let g = Echo::spawn("G");
    let cert_a = cert(&["a.example.com"]);
    let cert_b = cert(&["b.example.com"]);
    let (_proxy, ports) = Proxy::start_on_ports(1, |p| {
        format!(
            "{}{}---\napiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata:\n  name: grpc\nspec:\n  parentRefs: [{{name: gw}}]\n  hostnames: [\"b.example.com\"]\n  rules:\n  - backendRefs: [{{group: biplane.dev, kind: Backend, name: g}}]\n",
            tls_gateway(p[0], &cert_a, &cert_b),
            backend_h2c("g", g.addr)
        )
    })
    .await;
    let addr: SocketAddr = ([127, 0, 0, 1], ports[0]).into();
    let cfg = tls_client_config(&[&cert_a, &cert_b], &[b"h2"]);
    let s = tls_connect(addr, "b.example.com", cfg).await;
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let reply = grpc_call(s, "b.example.com", "/test.Echo/Unary", b"over tls", &[]).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.headers["x-echo-name"], "G");
    assert_eq!(reply.messages, vec![Bytes::from_static(b"over tls")]);
    assert_eq!(reply.trailers.expect("trailers")["grpc-status"], "0");
}
