//! Connection-layer behaviour over real sockets: TCP proxying, TLS passthrough chosen by
//! SNI, TLS termination with per-SNI certificates, and closing what no chain matches.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

mod support;

use std::time::Duration;

use biplane_proxy::{Proxy, ProxyOptions};
use support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

fn options() -> ProxyOptions {
    ProxyOptions {
        admin_addr: None,
        drain_timeout: Duration::from_secs(1),
        access_log: false,
    }
}

#[tokio::test]
async fn tcp_proxy_relays_both_ways_and_counts() {
    let up = tcp_echo("up1").await;
    let cfg = config(
        "v1",
        vec![listener(
            "tcp",
            LOCAL,
            vec![tcp_chain("tcp", &[], None, "c1")],
        )],
        vec![cluster("c1", &[up])],
    );
    let proxy = Proxy::start(cfg, options()).await.unwrap();
    let addr = addr_of(&proxy, "tcp");

    let mut s = TcpStream::connect(addr).await.unwrap();
    assert_eq!(read_line(&mut s).await, "up1");
    roundtrip(&mut s, b"hello through the proxy").await;
    // Half-close: the upstream sees EOF, closes, and we see EOF.
    s.shutdown().await.unwrap();
    assert!(closed_by_peer(&mut s).await);

    let metrics = proxy.shared().metrics.clone();
    assert!(
        eventually(|| {
            let text = metrics.encode();
            async move {
                text.contains(r#"biplane_tcp_connections_total{cluster="c1"} 1"#)
                    && text.contains(
                        r#"biplane_tcp_bytes_total{cluster="c1",direction="upstream"} 23"#,
                    )
                    && text.contains(r#"biplane_downstream_connections_total{listener="tcp"} 1"#)
                    && text.contains(r#"biplane_downstream_connections_active{listener="tcp"} 0"#)
            }
        })
        .await,
        "{}",
        metrics.encode()
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn tcp_connect_failure_closes_downstream_and_counts() {
    // A port nothing listens on.
    let dead = {
        let l = std::net::TcpListener::bind(LOCAL).unwrap();
        l.local_addr().unwrap()
    };
    let cfg = config(
        "v1",
        vec![listener(
            "tcp",
            LOCAL,
            vec![tcp_chain("tcp", &[], None, "dead")],
        )],
        vec![cluster("dead", &[dead])],
    );
    let proxy = Proxy::start(cfg, options()).await.unwrap();
    let mut s = TcpStream::connect(addr_of(&proxy, "tcp")).await.unwrap();
    assert!(closed_by_peer(&mut s).await);
    let text = proxy.shared().metrics.encode();
    assert!(
        text.contains(r#"biplane_upstream_connect_failures_total{cluster="dead"} 1"#),
        "{text}"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn tls_passthrough_is_chosen_by_sni() {
    let cert_a = cert("a", &["a.example.com"]);
    let cert_w = cert("w", &["*.example.com"]);
    let up_a = tls_echo("A", &cert_a).await;
    let up_w = tls_echo("W", &cert_w).await;
    let cfg = config(
        "v1",
        vec![listener(
            "tls",
            LOCAL,
            vec![
                tcp_chain("wild", &["*.example.com"], Some(true), "cw"),
                tcp_chain("a", &["a.example.com"], Some(true), "ca"),
            ],
        )],
        vec![cluster("ca", &[up_a]), cluster("cw", &[up_w])],
    );
    let proxy = Proxy::start(cfg, options()).await.unwrap();
    let addr = addr_of(&proxy, "tls");

    // The proxy holds no certificate: a handshake that verifies proves the bytes went
    // through untouched to the upstream chosen by SNI.
    let mut a = tls_connect(&connector(&[&cert_a.der], &[]), addr, "a.example.com")
        .await
        .unwrap();
    assert_eq!(read_line(&mut a).await, "A");
    roundtrip(&mut a, b"ping a").await;

    let mut w = tls_connect(&connector(&[&cert_w.der], &[]), addr, "x.example.com")
        .await
        .unwrap();
    assert_eq!(read_line(&mut w).await, "W");
    roundtrip(&mut w, b"ping w").await;

    // No chain for this name (and none without server names): closed.
    let err = tls_connect(&connector(&[&cert_w.der], &[]), addr, "other.org").await;
    assert!(err.is_err());

    // Plaintext matches no chain here either.
    let mut plain = TcpStream::connect(addr).await.unwrap();
    plain.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    assert!(closed_by_peer(&mut plain).await);
    proxy.shutdown().await;
}

#[tokio::test]
async fn tls_termination_serves_the_certificate_of_the_sni() {
    let cert_a = cert("secret-a", &["a.example.com"]);
    let cert_b = cert("secret-b", &["b.example.com", "*.b.example.com"]);
    let up = tcp_echo("plain").await;
    let mut chain = tcp_chain("https", &[], None, "c");
    chain.tls = Some(termination(&[&cert_a, &cert_b], &["h2", "http/1.1"]));
    let cfg = config(
        "v1",
        vec![listener("https", LOCAL, vec![chain])],
        vec![cluster("c", &[up])],
    );
    let proxy = Proxy::start(cfg, options()).await.unwrap();
    let addr = addr_of(&proxy, "https");

    for (sni, cert) in [
        ("a.example.com", &cert_a),
        ("b.example.com", &cert_b),
        ("x.b.example.com", &cert_b),
    ] {
        let mut s = tls_connect(&connector(&[&cert.der], &[b"h2"]), addr, sni)
            .await
            .unwrap();
        let (_, session) = s.get_ref();
        assert_eq!(session.peer_certificates().unwrap()[0], cert.der, "{sni}");
        assert_eq!(session.alpn_protocol(), Some(&b"h2"[..]), "{sni}");
        assert_eq!(read_line(&mut s).await, "plain");
        roundtrip(&mut s, sni.as_bytes()).await;
    }
    // Trusting only B while asking for a: the proxy serves A, so the client refuses it.
    assert!(
        tls_connect(&connector(&[&cert_b.der], &[]), addr, "a.example.com")
            .await
            .is_err()
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn sni_chains_terminate_with_their_own_certificates() {
    let cert_a = cert("secret-a", &["a.example.com"]);
    let cert_b = cert("secret-b", &["b.example.com"]);
    let one = tcp_echo("one").await;
    let two = tcp_echo("two").await;
    let mut chain_a = tcp_chain("a", &["a.example.com"], None, "c1");
    chain_a.tls = Some(termination(&[&cert_a], &[]));
    let mut chain_b = tcp_chain("b", &["b.example.com"], None, "c2");
    chain_b.tls = Some(termination(&[&cert_b], &[]));
    let cfg = config(
        "v1",
        vec![listener("https", LOCAL, vec![chain_a, chain_b])],
        vec![cluster("c1", &[one]), cluster("c2", &[two])],
    );
    let proxy = Proxy::start(cfg, options()).await.unwrap();
    let addr = addr_of(&proxy, "https");
    let mut a = tls_connect(&connector(&[&cert_a.der], &[]), addr, "a.example.com")
        .await
        .unwrap();
    assert_eq!(read_line(&mut a).await, "one");
    let mut b = tls_connect(&connector(&[&cert_b.der], &[]), addr, "b.example.com")
        .await
        .unwrap();
    assert_eq!(read_line(&mut b).await, "two");
    proxy.shutdown().await;
}

#[tokio::test]
async fn bad_tls_material_fails_start() {
    let cert_a = cert("secret-a", &["a.example.com"]);
    let other = cert("other", &["a.example.com"]);
    let mut chain = tcp_chain("https", &[], None, "c");
    let mut t = termination(&[&cert_a], &[]);
    // Key of another certificate.
    t.certificates[0].private_key_pem = other.key_pem.clone();
    chain.tls = Some(t);
    let cfg = config(
        "v1",
        vec![listener("https", LOCAL, vec![chain])],
        vec![cluster("c", &[])],
    );
    let err = Proxy::start(cfg, options()).await.err().unwrap();
    assert!(err.to_string().contains("secret-a"), "{err}");
}

#[tokio::test]
async fn garbage_after_a_tls_record_header_is_closed() {
    let up = tcp_echo("up").await;
    let cfg = config(
        "v1",
        vec![listener(
            "tls",
            LOCAL,
            vec![tcp_chain("a", &["a.example.com"], Some(true), "c")],
        )],
        vec![cluster("c", &[up])],
    );
    let proxy = Proxy::start(cfg, options()).await.unwrap();
    let mut s = TcpStream::connect(addr_of(&proxy, "tls")).await.unwrap();
    // A handshake record whose message is a ServerHello, not a ClientHello.
    s.write_all(&[22, 3, 1, 0, 8, 2, 0, 0, 4, 1, 2, 3, 4])
        .await
        .unwrap();
    assert!(closed_by_peer(&mut s).await);
    proxy.shutdown().await;
}

#[tokio::test]
async fn apply_rotates_a_certificate_without_rebinding() {
    let old = cert("site", &["a.example.com"]);
    let new = cert("site", &["a.example.com"]);
    let up = tcp_echo("up").await;
    let with = |c: &TestCert| {
        let mut chain = tcp_chain("https", &["a.example.com"], None, "c");
        chain.tls = Some(termination(&[c], &[]));
        config(
            "v",
            vec![listener("https", LOCAL, vec![chain])],
            vec![cluster("c", &[up])],
        )
    };
    let proxy = Proxy::start(with(&old), options()).await.unwrap();
    let addr = addr_of(&proxy, "https");
    let mut before = tls_connect(&connector(&[&old.der], &[]), addr, "a.example.com")
        .await
        .unwrap();
    assert_eq!(read_line(&mut before).await, "up");

    proxy.apply(with(&new)).await.unwrap();
    assert_eq!(addr_of(&proxy, "https"), addr);
    let s = tls_connect(&connector(&[&new.der], &[]), addr, "a.example.com")
        .await
        .unwrap();
    assert_eq!(s.get_ref().1.peer_certificates().unwrap()[0], new.der);
    assert!(
        tls_connect(&connector(&[&old.der], &[]), addr, "a.example.com")
            .await
            .is_err()
    );
    // The session established before the rotation goes on.
    roundtrip(&mut before, b"still on the old cert").await;
    proxy.shutdown().await;
}
