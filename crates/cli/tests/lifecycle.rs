//! End-to-end life of a `biplane proxy` process: config errors reported before binding,
//! the shipped example config, stdin configs, the admin endpoint, graceful drain.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a panic is a failure"
)]

mod common;

use std::net::{SocketAddr, TcpListener as StdListener};
use std::time::{Duration, Instant};

use common::*;
use tokio::net::TcpStream;

const ROUTE_A: &str = "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: web\nspec:\n  parentRefs: [{name: gw}]\n  rules:\n  - backendRefs: [{group: biplane.dev, kind: Backend, name: a}]\n";

#[test]
fn config_errors_exit_1_before_binding_and_print_every_path() {
    // Hold the Gateway's port and the admin port: a proxy that bound anything before
    // validating would fail with "address in use" instead of listing the errors.
    let gw_port = StdListener::bind("127.0.0.1:0").unwrap();
    let admin = StdListener::bind("127.0.0.1:0").unwrap();
    let port = gw_port.local_addr().unwrap().port();
    let yaml = format!(
        r#"apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: gw
spec:
  listeners:
  - name: http
    port: {port}
    protocol: HTTP
  - name: http
    port: {port}
    protocol: HTTP
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: bad-weight
spec:
  parentRefs: [{{name: gw}}]
  rules:
  - backendRefs:
    - {{group: biplane.dev, kind: Backend, name: a, weight: -1}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: bad-regex
spec:
  parentRefs: [{{name: gw}}]
  rules:
  - matches:
    - path: {{type: Exact, value: /fine}}
  - matches:
    - path: {{type: RegularExpression, value: "/unclosed("}}
    backendRefs: [{{group: biplane.dev, kind: Backend, name: a}}]
---
apiVersion: biplane.dev/v1alpha1
kind: Backend
metadata:
  name: a
spec:
  endpoints:
  - address: 127.0.0.1
    port: 8080
    bogusField: 1
"#
    );
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(&dir, &yaml);
    let admin_addr = admin.local_addr().unwrap().to_string();
    let mut proc = Proc::spawn(&[
        "proxy",
        "--config",
        path.to_str().unwrap(),
        "--admin-addr",
        &admin_addr,
        "--bind-ip",
        "127.0.0.1",
    ]);
    let status = proc.wait_exit(DEADLINE);
    proc.stderr.wait_eof();
    let stderr = proc.stderr.text();
    assert_eq!(status.code(), Some(1), "stderr:\n{stderr}");
    assert!(
        !stderr.to_lowercase().contains("in use"),
        "it tried to bind:\n{stderr}"
    );
    assert!(
        !stderr.contains("listening on"),
        "it bound something:\n{stderr}"
    );
    // Every error, each with its document and field path.
    for (doc, path) in [
        ("document 1", "spec.listeners[1].name"),
        ("document 2", "spec.rules[0].backendRefs[0].weight"),
        ("document 3", "spec.rules[1].matches[0].path.value"),
        ("document 4", "spec.endpoints[0]"),
        ("document 4", "bogusField"),
    ] {
        assert!(
            stderr.lines().any(|l| l.contains(doc) && l.contains(path)),
            "no error line with {doc} and {path}:\n{stderr}"
        );
    }
    drop((gw_port, admin));
}

#[test]
fn unreadable_config_file_exits_1() {
    let mut proc = Proc::spawn(&[
        "proxy",
        "--config",
        "/nonexistent/biplane.yaml",
        "--admin-addr",
        "127.0.0.1:0",
    ]);
    let status = proc.wait_exit(DEADLINE);
    assert_eq!(status.code(), Some(1));
    proc.stderr.wait_for("an error naming the file", |l| {
        l.contains("/nonexistent/biplane.yaml").then_some(())
    });
}

#[tokio::test]
async fn example_config_routes_as_documented() {
    let a = Echo::spawn("echo-a");
    let b = Echo::spawn("echo-b");
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/static.yaml"
    ))
    .unwrap();
    for needle in ["port: 8080", "port: 9001", "port: 9002"] {
        assert_eq!(
            example.matches(needle).count(),
            1,
            "the example changed shape: {needle}"
        );
    }
    let (_proxy, ports) = Proxy::start_on_ports(1, |p| {
        example
            .replace("port: 8080", &format!("port: {}", p[0]))
            .replace("port: 9001", &format!("port: {}", a.port()))
            .replace("port: 9002", &format!("port: {}", b.port()))
    })
    .await;
    let base = format!("http://127.0.0.1:{}", ports[0]);
    let c = client();
    let name = |r: &reqwest::Response| {
        r.headers()
            .get("x-echo-name")
            .map(|v| v.to_str().unwrap().to_owned())
    };

    let r = c.get(format!("{base}/api/users")).send().await.unwrap();
    assert_eq!(name(&r).as_deref(), Some("echo-a"));
    let r = c
        .get(format!("{base}/hello"))
        .header("x-canary", "true")
        .send()
        .await
        .unwrap();
    assert_eq!(name(&r).as_deref(), Some("echo-b"));
    let r = c.get(format!("{base}/old/page")).send().await.unwrap();
    assert_eq!(r.status(), 301);
    assert!(
        r.headers()["location"]
            .to_str()
            .unwrap()
            .ends_with("/new/page")
    );
    let mut to_a = 0;
    for _ in 0..200 {
        let r = c.get(format!("{base}/hello")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        to_a += usize::from(name(&r).as_deref() == Some("echo-a"));
    }
    assert!(
        (130..=190).contains(&to_a),
        "80/20 split sent {to_a}/200 to echo-a"
    );

    // The same with curl, as the README shows.
    let out = std::process::Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            "x-canary: true",
            &format!("{base}/hello"),
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200");
}

#[tokio::test]
async fn config_from_stdin() {
    let a = Echo::spawn("A");
    let port = free_port();
    let yaml = format!(
        "{}{}{ROUTE_A}",
        http_gateway(port),
        backend("a", &[(a.addr, 1)])
    );
    let proc = Proc::spawn_full(
        &[
            "proxy",
            "--config",
            "-",
            "--admin-addr",
            "127.0.0.1:0",
            "--bind-ip",
            "127.0.0.1",
        ],
        "info",
        Some(yaml.as_bytes()),
    );
    let listener = format!("127.0.0.1:{port}");
    proc.stderr
        .wait_for("the listener line", |l| l.contains(&listener).then_some(()));
    let start = Instant::now();
    loop {
        if let Ok(r) = client()
            .get(format!("http://{listener}/stdin"))
            .send()
            .await
        {
            assert_eq!(r.headers()["x-echo-name"], "A");
            break;
        }
        assert!(start.elapsed() < DEADLINE);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn admin_endpoints() {
    let a = Echo::spawn("A");
    let c = cert(&["secure.example.com"]);
    let (proxy, ports) = Proxy::start_on_ports(2, |p| {
        format!(
            "---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata:\n  name: gw\nspec:\n  listeners:\n  - name: http\n    port: {}\n    protocol: HTTP\n  - name: https\n    port: {}\n    protocol: HTTPS\n    tls: {{certificateRefs: [{{name: cert}}]}}\n{}{}{ROUTE_A}",
            p[0],
            p[1],
            tls_secret("cert", &c.cert_pem, &c.key_pem),
            backend("a", &[(a.addr, 1)])
        )
    })
    .await;
    let r = client()
        .get(format!("http://127.0.0.1:{}/metrics-probe", ports[0]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let (status, body) = proxy.admin_get("/ready").await;
    assert_eq!(status, 200, "{body}");

    let (status, metrics) = proxy.admin_get("/stats/prometheus").await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains("# TYPE"),
        "not Prometheus text:\n{metrics}"
    );
    assert!(
        metrics
            .lines()
            .any(|l| !l.starts_with('#') && l.contains("2xx")),
        "no 2xx request counter:\n{metrics}"
    );

    let (status, dump) = proxy.admin_get("/config_dump").await;
    assert_eq!(status, 200);
    let dump_json: serde_json::Value = serde_json::from_str(&dump).unwrap();
    assert!(dump_json.is_object() || dump_json.is_array());
    assert!(
        dump.contains("BEGIN CERTIFICATE") || dump.contains("cert"),
        "the certificate is not in the dump"
    );
    assert!(
        !dump.contains("PRIVATE KEY"),
        "private key leaked into /config_dump"
    );
    let key_body: String = c
        .key_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    assert!(
        !dump.contains(&key_body[..40]),
        "private key material leaked into /config_dump"
    );

    let (status, listeners) = proxy.admin_get("/listeners").await;
    assert_eq!(status, 200);
    for p in &ports {
        assert!(
            listeners.contains(&format!("127.0.0.1:{p}")),
            "{p} missing from /listeners: {listeners}"
        );
    }
}

#[tokio::test]
async fn sigterm_drains_in_flight_requests_then_exits_0() {
    let a = Echo::spawn_logging("A");
    let (mut proxy, ports) = Proxy::start_on_ports(1, |p| {
        format!(
            "{}{}{ROUTE_A}",
            http_gateway(p[0]),
            backend("a", &[(a.addr, 1)])
        )
    })
    .await;
    let addr: SocketAddr = ([127, 0, 0, 1], ports[0]).into();

    let in_flight = tokio::spawn(async move {
        let r = client()
            .get(format!("http://{addr}/slow?delay_ms=2000"))
            .send()
            .await
            .unwrap();
        (
            r.status().as_u16(),
            r.headers().get("x-echo-name").cloned(),
            r.text().await.unwrap(),
        )
    });
    // The request is in flight once the upstream has it.
    a.proc
        .stderr
        .wait_for_async("the slow request at the echo", |l| {
            l.contains("/slow").then_some(())
        })
        .await;
    proxy.proc.signal("TERM");

    // New connections are refused while the slow request is still running.
    let start = Instant::now();
    loop {
        if TcpStream::connect(addr).await.is_err() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_millis(1500),
            "still accepting connections after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        !in_flight.is_finished(),
        "the in-flight request ended before the listener closed"
    );

    let (status, name, body) = tokio::time::timeout(DEADLINE, in_flight)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(name.unwrap(), "A");
    assert_eq!(json(body.as_bytes())["path"], "/slow");

    let exit = proxy.proc.wait_exit(DEADLINE);
    assert_eq!(
        exit.code(),
        Some(0),
        "stderr:\n{}",
        proxy.proc.stderr.text()
    );
}

#[tokio::test]
async fn drain_timeout_bounds_shutdown() {
    let a = Echo::spawn_logging("A");
    let port = free_port();
    let yaml = format!(
        "{}{}{ROUTE_A}",
        http_gateway(port),
        backend("a", &[(a.addr, 1)])
    );
    let mut proxy = Proxy::start_with(&yaml, &["--drain-timeout", "300ms"]).await;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let in_flight = tokio::spawn(async move {
        client()
            .get(format!("http://{addr}/stuck?delay_ms=10000"))
            .send()
            .await
    });
    a.proc
        .stderr
        .wait_for_async("the stuck request at the echo", |l| {
            l.contains("/stuck").then_some(())
        })
        .await;
    let start = Instant::now();
    proxy.proc.signal("INT");
    let exit = proxy.proc.wait_exit(Duration::from_secs(5));
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "drain took {:?}",
        start.elapsed()
    );
    assert_eq!(
        exit.code(),
        Some(0),
        "stderr:\n{}",
        proxy.proc.stderr.text()
    );
    // The request that outlived the drain timeout was cut, not answered.
    let res = tokio::time::timeout(DEADLINE, in_flight)
        .await
        .unwrap()
        .unwrap();
    assert!(res.is_err() || !res.unwrap().status().is_success());
}

#[tokio::test]
async fn gateway_flag_selects_one_of_several() {
    let a = Echo::spawn("A");
    let (p1, p2) = (free_port(), free_port());
    let second = http_gateway(p2).replace("name: gw", "name: other");
    let yaml = format!(
        "{}{second}{}{ROUTE_A}",
        http_gateway(p1),
        backend("a", &[(a.addr, 1)])
    );
    // Two Gateways and no --gateway: an error that lists them, before binding.
    let (status, stderr) = proxy_rejects(&yaml);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("gw") && stderr.contains("other"),
        "{stderr}"
    );

    let proxy = Proxy::start_with(&yaml, &["--gateway", "gw"]).await;
    let r = client()
        .get(format!("http://127.0.0.1:{p1}/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-echo-name"], "A");
    // Only the chosen Gateway's listeners are bound.
    let (_, listeners) = proxy.admin_get("/listeners").await;
    assert!(!listeners.contains(&format!(":{p2}")), "{listeners}");
}
