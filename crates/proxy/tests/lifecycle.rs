//! Proxy lifecycle over real sockets: admin endpoints, `apply` (listener diff, chain swap,
//! all-or-nothing on bind errors) and graceful shutdown of L4 sessions.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

mod support;

use std::time::Duration;

use biplane_proxy::{DrainReport, Proxy, ProxyError, ProxyOptions};
use support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

fn options(drain: Duration) -> ProxyOptions {
    ProxyOptions {
        admin_addr: Some(LOCAL.parse().unwrap()),
        drain_timeout: drain,
        access_log: false,
    }
}

#[tokio::test]
async fn admin_endpoints() {
    let up = tcp_echo("up").await;
    let tls_cert = cert("my-secret", &["a.example.com"]);
    let mut tls_chain = tcp_chain("https", &[], None, "c");
    tls_chain.tls = Some(termination(&[&tls_cert], &[]));
    let cfg = config(
        "v-admin-7",
        vec![
            listener("plain", LOCAL, vec![tcp_chain("plain", &[], None, "c")]),
            listener("https", LOCAL, vec![tls_chain]),
        ],
        vec![cluster("c", &[up])],
    );
    let proxy = Proxy::start(cfg, options(Duration::from_secs(1)))
        .await
        .unwrap();
    let admin = proxy.admin_addr().unwrap();

    assert_eq!(http_get(admin, "/ready").await, (200, "ready\n".into()));

    let (status, body) = http_get(admin, "/listeners").await;
    assert_eq!(status, 200);
    let listeners: serde_json::Value = serde_json::from_str(&body).unwrap();
    let plain = addr_of(&proxy, "plain");
    assert_eq!(listeners["plain"], plain.to_string());
    assert_eq!(listeners["https"], addr_of(&proxy, "https").to_string());

    let (status, body) = http_get(admin, "/config_dump").await;
    assert_eq!(status, 200);
    let dump: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(dump["version"], "v-admin-7");
    assert_eq!(dump["bound_listeners"]["plain"], plain.to_string());
    assert_eq!(dump["config"]["listeners"][0]["name"], "plain");
    assert!(body.contains("my-secret") && body.contains("BEGIN CERTIFICATE"));
    assert!(!body.contains("PRIVATE KEY"), "private key leaked: {body}");

    // One connection so that per-listener series exist.
    let mut s = TcpStream::connect(plain).await.unwrap();
    assert_eq!(read_line(&mut s).await, "up");
    let mut raw = TcpStream::connect(admin).await.unwrap();
    raw.write_all(b"GET /stats/prometheus HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut raw, &mut text)
        .await
        .unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{text}"
    );
    assert!(
        text.contains(r#"biplane_downstream_connections_total{listener="plain"} 1"#),
        "{text}"
    );

    assert_eq!(http_get(admin, "/nope").await.0, 404);
    proxy.set_ready(false);
    assert_eq!(http_get(admin, "/ready").await, (503, "not ready\n".into()));
    proxy.shutdown().await;
}

#[tokio::test]
async fn apply_diffs_listeners_and_swaps_chains() {
    let up1 = tcp_echo("up1").await;
    let up2 = tcp_echo("up2").await;
    let clusters = || vec![cluster("c1", &[up1]), cluster("c2", &[up2])];
    let cfg = config(
        "v1",
        vec![
            listener("keep", LOCAL, vec![tcp_chain("keep", &[], None, "c1")]),
            listener("gone", LOCAL, vec![tcp_chain("gone", &[], None, "c1")]),
        ],
        clusters(),
    );
    let proxy = Proxy::start(cfg, options(Duration::from_secs(2)))
        .await
        .unwrap();
    let keep = addr_of(&proxy, "keep");
    let gone = addr_of(&proxy, "gone");

    // A session opened before the swap.
    let mut before = TcpStream::connect(keep).await.unwrap();
    assert_eq!(read_line(&mut before).await, "up1");

    let cfg2 = config(
        "v2",
        vec![
            listener("keep", LOCAL, vec![tcp_chain("keep", &[], None, "c2")]),
            listener("new", LOCAL, vec![tcp_chain("new", &[], None, "c1")]),
        ],
        clusters(),
    );
    proxy.apply(cfg2).await.unwrap();

    // Same socket, same session; new connections get the new chain.
    assert_eq!(addr_of(&proxy, "keep"), keep);
    roundtrip(&mut before, b"still here").await;
    let mut after = TcpStream::connect(keep).await.unwrap();
    assert_eq!(read_line(&mut after).await, "up2");
    // The added listener serves.
    let mut n = TcpStream::connect(addr_of(&proxy, "new")).await.unwrap();
    assert_eq!(read_line(&mut n).await, "up1");
    // The removed one refuses connections.
    assert!(eventually(|| async move { TcpStream::connect(gone).await.is_err() }).await);
    let names: Vec<String> = proxy.listener_addrs().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["keep", "new"]);
    assert!(
        proxy
            .shared()
            .metrics
            .encode()
            .contains("biplane_config_swaps_total 1")
    );
    assert_eq!(proxy.shared().snapshot.load().config.version, "v2");

    // A bind conflict fails the whole apply and changes nothing.
    let squatter = std::net::TcpListener::bind(LOCAL).unwrap();
    let taken = squatter.local_addr().unwrap().to_string();
    let cfg3 = config(
        "v3",
        vec![
            listener("keep", LOCAL, vec![tcp_chain("keep", &[], None, "c1")]),
            listener("clash", &taken, vec![tcp_chain("clash", &[], None, "c1")]),
        ],
        clusters(),
    );
    let err = proxy.apply(cfg3).await.err().unwrap();
    assert!(
        matches!(err, ProxyError::Bind { ref listener, .. } if listener == "clash"),
        "{err}"
    );
    assert_eq!(proxy.shared().snapshot.load().config.version, "v2");
    let mut again = TcpStream::connect(keep).await.unwrap();
    assert_eq!(read_line(&mut again).await, "up2");
    let names: Vec<String> = proxy.listener_addrs().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["keep", "new"]);
    drop(squatter);

    // Sessions the clients keep open (before, after, again) are aborted at the deadline.
    drop(n);
    let report = proxy.shutdown().await;
    assert_eq!(report.aborted, 3, "{report:?}");
}

#[tokio::test]
async fn start_fails_on_bind_error_before_serving() {
    let squatter = std::net::TcpListener::bind(LOCAL).unwrap();
    let taken = squatter.local_addr().unwrap().to_string();
    let cfg = config(
        "v1",
        vec![listener("x", &taken, vec![tcp_chain("x", &[], None, "c")])],
        vec![cluster("c", &[])],
    );
    let err = Proxy::start(cfg, options(Duration::from_secs(1)))
        .await
        .err()
        .unwrap();
    assert!(matches!(err, ProxyError::Bind { .. }), "{err}");
}

#[tokio::test]
async fn shutdown_refuses_new_connections_drains_and_aborts() {
    let up = tcp_echo("up").await;
    let cfg = config(
        "v1",
        vec![listener(
            "tcp",
            LOCAL,
            vec![tcp_chain("tcp", &[], None, "c")],
        )],
        vec![cluster("c", &[up])],
    );
    let proxy = Proxy::start(cfg, options(Duration::from_millis(1500)))
        .await
        .unwrap();
    let addr = addr_of(&proxy, "tcp");
    let admin = proxy.admin_addr().unwrap();

    let mut stays = TcpStream::connect(addr).await.unwrap();
    assert_eq!(read_line(&mut stays).await, "up");
    let mut finishes = TcpStream::connect(addr).await.unwrap();
    assert_eq!(read_line(&mut finishes).await, "up");

    let shutdown = tokio::spawn(proxy.shutdown());
    // New connections are refused once draining starts, and /ready says so until the
    // admin listener stops.
    assert!(eventually(|| async move { TcpStream::connect(addr).await.is_err() }).await);
    // The session in flight still works during the drain, then finishes on its own.
    roundtrip(&mut finishes, b"during drain").await;
    finishes.shutdown().await.unwrap();
    assert!(closed_by_peer(&mut finishes).await);

    let report = tokio::time::timeout(Duration::from_secs(10), shutdown)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        report,
        DrainReport {
            drained: 1,
            aborted: 1
        }
    );
    // The aborted session is closed.
    assert!(closed_by_peer(&mut stays).await);
    assert!(TcpStream::connect(admin).await.is_err());
}

#[tokio::test]
async fn pending_start_is_not_ready_until_told() {
    let proxy = Proxy::start_pending(options(Duration::from_secs(1)))
        .await
        .unwrap();
    let admin = proxy.admin_addr().unwrap();
    assert_eq!(http_get(admin, "/ready").await.0, 503);
    assert!(proxy.listener_addrs().is_empty());
    let up = tcp_echo("up").await;
    let cfg = config(
        "v1",
        vec![listener(
            "tcp",
            LOCAL,
            vec![tcp_chain("tcp", &[], None, "c")],
        )],
        vec![cluster("c", &[up])],
    );
    proxy.apply(cfg).await.unwrap();
    proxy.set_ready(true);
    assert_eq!(http_get(admin, "/ready").await.0, 200);
    let mut s = TcpStream::connect(addr_of(&proxy, "tcp")).await.unwrap();
    assert_eq!(read_line(&mut s).await, "up");
    drop(s);
    proxy.shutdown().await;
}
