//! End-to-end tests of the two planes joined, all real processes: `biplane control`,
//! `biplane proxy --control-plane`, `biplane echo`, the `biplane apply/status/get` client,
//! and `biplane up`. Traffic follows applied changes within a second; concurrent load
//! sees zero failed requests across 50 changes, a control-plane kill, a proxy restart
//! during the outage (last-known-good) and the resync; a change the proxy cannot honour
//! (a listener port it cannot bind) shows up as a NACK in `biplane status` and in the
//! Gateway's `Programmed` condition while the previous config keeps serving.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a panic is a failure"
)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// "Traffic follows within a second", plus slack for a loaded 2-core CI machine.
const FOLLOW_WITHIN: Duration = Duration::from_millis(2000);

// ------------------------------------------------------------------ processes

/// A running `biplane control`.
struct Control {
    proc: Proc,
    api: SocketAddr,
    xds: SocketAddr,
}

impl Control {
    /// Starts on `127.0.0.1:0` for the admin API and `xds` for the ADS server (a fixed
    /// port so a restarted control plane is found at the same address).
    fn start(data_dir: &Path, xds: SocketAddr) -> Control {
        let xds_arg = xds.to_string();
        let proc = Proc::spawn(&[
            "control",
            "--insecure",
            "--api-addr",
            "127.0.0.1:0",
            "--xds-addr",
            &xds_arg,
            "--data-dir",
            data_dir.to_str().unwrap(),
            "--proxy-bind-ip",
            "127.0.0.1",
        ]);
        let api = proc
            .stderr
            .wait_for("`api listening on`", |l| after(l, "api listening on "));
        let xds = proc
            .stderr
            .wait_for("`xds listening on`", |l| after(l, "xds listening on "));
        Control { proc, api, xds }
    }

    fn server(&self) -> String {
        format!("http://{}", self.api)
    }

    /// `biplane apply -f FILE --server ...`, which must succeed.
    async fn apply(&self, dir: &Path, yaml: &str) {
        let path = dir.join("config.yaml");
        std::fs::write(&path, yaml).unwrap();
        let out = self.cli(&["apply", "-f", path.to_str().unwrap()]).await;
        assert_eq!(
            out.0,
            0,
            "biplane apply failed: {out:?}\ncontrol plane log:\n{}",
            self.proc.stderr.text()
        );
    }

    /// Runs `biplane ARGS --server URL`; returns (exit code, stdout, stderr).
    async fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let mut all: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
        all.extend(["--server".to_owned(), self.server()]);
        run_biplane("warn", all).await
    }

    /// `GET /api/v1/...` as JSON.
    async fn get(&self, path: &str) -> Value {
        let r = client()
            .get(format!("{}/api/v1/{path}", self.server()))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "GET {path}: {}", r.status());
        r.json().await.unwrap()
    }
}

/// A running `biplane proxy --control-plane` for Gateway `gw`, node id `node-1`.
struct Node {
    proc: Proc,
    admin: SocketAddr,
}

impl Node {
    async fn start(xds: SocketAddr, state_dir: &Path) -> Node {
        let xds = xds.to_string();
        let proc = Proc::spawn(&[
            "proxy",
            "--insecure",
            "--control-plane",
            &xds,
            "--gateway",
            "gw",
            "--node-id",
            "node-1",
            "--state-dir",
            state_dir.to_str().unwrap(),
            "--admin-addr",
            "127.0.0.1:0",
            "--initial-fetch-timeout",
            "500ms",
            "--drain-timeout",
            "5s",
            "--no-access-log",
        ]);
        let admin = proc
            .stderr
            .wait_for_async("`admin listening on`", |l| after(l, "admin listening on "))
            .await;
        Node { proc, admin }
    }

    async fn ready(&self) -> bool {
        admin_ready(self.admin).await
    }

    async fn wait_ready(&self) {
        wait_admin_ready(self.admin, &self.proc).await;
    }

    async fn config_dump(&self) -> String {
        client()
            .get(format!("http://{}/config_dump", self.admin))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Waits until `/config_dump` differs from `before` (a pushed change was applied).
    async fn wait_config_change(&self, before: &str) -> String {
        let start = Instant::now();
        loop {
            let now = self.config_dump().await;
            if now != before {
                return now;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "the proxy never applied the change; stderr:\n{}",
                self.proc.stderr.text()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// SIGTERM, then waits for a clean exit.
    fn stop(mut self) {
        self.proc.signal("TERM");
        let status = self.proc.wait_exit(DEADLINE);
        assert!(status.success(), "proxy exit: {status:?}");
    }
}

// ------------------------------------------------------------------ config

/// The resources of one test config: Gateway `gw` (one HTTP listener per port), Backends
/// `a` and `b`, HTTPRoute `web` with a path rule and a weighted catch-all.
struct Cfg<'a> {
    ports: &'a [u16],
    a: &'a [SocketAddr],
    b: &'a [SocketAddr],
    /// Catch-all weights for `a` and `b`.
    weights: (u32, u32),
    /// A path-prefix rule and the backend it goes to.
    path: (&'a str, &'a str),
}

impl Cfg<'_> {
    fn yaml(&self) -> String {
        let mut s = String::from(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata:\n  name: gw\nspec:\n  gatewayClassName: biplane\n  listeners:\n",
        );
        for (i, port) in self.ports.iter().enumerate() {
            s.push_str(&format!(
                "  - name: http-{i}\n    port: {port}\n    protocol: HTTP\n"
            ));
        }
        s.push_str(&backend(
            "a",
            &self.a.iter().map(|a| (*a, 1)).collect::<Vec<_>>(),
        ));
        s.push_str(&backend(
            "b",
            &self.b.iter().map(|a| (*a, 1)).collect::<Vec<_>>(),
        ));
        s.push_str(&format!(
            "---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: web
spec:
  parentRefs:
  - name: gw
  rules:
  - matches:
    - path:
        type: PathPrefix
        value: {path}
    backendRefs:
    - group: biplane.dev
      kind: Backend
      name: {target}
  - backendRefs:
    - group: biplane.dev
      kind: Backend
      name: a
      weight: {wa}
    - group: biplane.dev
      kind: Backend
      name: b
      weight: {wb}
",
            path = self.path.0,
            target = self.path.1,
            wa = self.weights.0,
            wb = self.weights.1,
        ));
        s
    }
}

// ------------------------------------------------------------------ traffic

// ------------------------------------------------------------------ status

/// The node `node-1` in `/api/v1/status`, once `done` holds for it.
async fn node_status_until(cp: &Control, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let status = cp.get("status").await;
        let node = status["nodes"]
            .as_array()
            .and_then(|n| n.iter().find(|n| n["nodeId"] == "node-1"))
            .cloned();
        if let Some(node) = node
            && done(&node)
        {
            return node;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "never {what}: {status:#}\ncontrol plane log:\n{}",
            cp.proc.stderr.text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn type_entry<'a>(node: &'a Value, kind: &str) -> &'a Value {
    node["types"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["type"] == kind))
        .unwrap_or(&Value::Null)
}

/// Every subscribed type ACKed the version last sent, and no NACK is newer.
fn all_acked(node: &Value) -> bool {
    let types = node["types"].as_array().cloned().unwrap_or_default();
    let mut any = false;
    for t in &types {
        if t["sentVersion"].is_string() {
            any = true;
            if t["ackedVersion"] != t["sentVersion"] {
                return false;
            }
        }
    }
    any && type_entry(node, "Listener")["ackedVersion"].is_string()
}

/// A condition of a resource from `GET /api/v1/{kind}/default/{name}`.
async fn condition(cp: &Control, kind: &str, name: &str, cond: &str) -> Value {
    let doc = cp.get(&format!("{kind}/default/{name}")).await;
    doc["status"]["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == cond))
        .cloned()
        .unwrap_or(Value::Null)
}

// ------------------------------------------------------------------ tests

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

fn xds_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_follows_applied_changes_within_a_second() {
    let (a, b) = (Echo::spawn("A"), Echo::spawn("B"));
    let dir = tmp();
    let cp = Control::start(&dir.path().join("data"), "127.0.0.1:0".parse().unwrap());
    let node = Node::start(cp.xds, &dir.path().join("state")).await;
    assert!(!node.ready().await, "ready before any config");
    let port = free_port();
    let mut cfg = Cfg {
        ports: &[port],
        a: &[a.addr],
        b: &[b.addr],
        weights: (1, 0),
        path: ("/api", "a"),
    };
    cp.apply(dir.path(), &cfg.yaml()).await;
    node.wait_ready().await;
    follows(port, "/", "A", 5, &node.proc).await;

    // Weights: everything to B.
    // Each duration runs from the start of `biplane apply` to the traffic following.
    cfg.weights = (0, 1);
    let t = Instant::now();
    cp.apply(dir.path(), &cfg.yaml()).await;
    follows(port, "/", "B", 20, &node.proc).await;
    let weights = t.elapsed();

    // A path rule: /api now goes to B; / still to B (weights), then back to A.
    cfg.path = ("/api", "b");
    let t = Instant::now();
    cp.apply(dir.path(), &cfg.yaml()).await;
    follows(port, "/api/users", "B", 20, &node.proc).await;
    let path = t.elapsed();
    cfg.path = ("/admin", "b");
    cfg.weights = (1, 0);
    let t = Instant::now();
    cp.apply(dir.path(), &cfg.yaml()).await;
    follows(port, "/api/users", "A", 20, &node.proc).await;
    let moved = t.elapsed();
    follows(port, "/admin/x", "B", 5, &node.proc).await;

    // A 50/50 split: both answer.
    cfg.weights = (1, 1);
    let start = Instant::now();
    cp.apply(dir.path(), &cfg.yaml()).await;
    let c = client();
    let (mut seen_a, mut seen_b) = (false, false);
    while !(seen_a && seen_b) {
        match who(&c, port, "/").await.as_deref() {
            Ok("A") => seen_a = true,
            Ok("B") => seen_b = true,
            other => panic!("unexpected answer {other:?}"),
        }
        assert!(start.elapsed() < DEADLINE, "the split never showed both");
    }
    let split = start.elapsed();

    eprintln!(
        "traffic followed: weights {weights:?}, path {path:?}, path moved {moved:?}, split {split:?}"
    );
    for (what, took) in [
        ("weights", weights),
        ("path", path),
        ("moved path", moved),
        ("split", split),
    ] {
        assert!(
            took < FOLLOW_WITHIN,
            "the {what} change took {took:?} to reach the traffic"
        );
    }
    let route = condition(&cp, "httproutes", "web", "Programmed").await;
    let start = Instant::now();
    let mut route = route;
    while route["status"] != "True" {
        assert!(start.elapsed() < DEADLINE, "never Programmed: {route}");
        tokio::time::sleep(Duration::from_millis(20)).await;
        route = condition(&cp, "httproutes", "web", "Programmed").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_changes_under_load_fail_no_request() {
    let (a, b, c) = (Echo::spawn("A"), Echo::spawn("B"), Echo::spawn("C"));
    let dir = tmp();
    let cp = Control::start(&dir.path().join("data"), "127.0.0.1:0".parse().unwrap());
    let node = Node::start(cp.xds, &dir.path().join("state")).await;
    let port = free_port();
    let ports = [port];
    let a_only = [a.addr];
    let a_and_c = [a.addr, c.addr];
    let b_only = [b.addr];
    let prefixes = ["/api", "/v1", "/v2", "/static"];
    let cfg = |i: usize| Cfg {
        ports: &ports,
        a: if (i / 3) % 2 == 1 { &a_and_c } else { &a_only },
        b: &b_only,
        weights: [(90, 10), (50, 50), (10, 90), (100, 0), (0, 100)][i % 5],
        path: (
            prefixes[i % prefixes.len()],
            if i.is_multiple_of(2) { "a" } else { "b" },
        ),
    };
    let render = |i: usize| cfg(i).yaml();
    cp.apply(dir.path(), &render(0)).await;
    node.wait_ready().await;
    follows(port, "/", "A", 1, &node.proc).await;

    let load = Load::start(
        port,
        &["/", "/api/x", "/v1/x", "/v2/x", "/static/x", "/other"],
    );
    load.wait_more(100, &node.proc).await;
    let started = Instant::now();
    let mut dump = node.config_dump().await;
    for i in 1..=50 {
        cp.apply(dir.path(), &render(i)).await;
        // Each change reaches the proxy before the next one (no coalescing by debounce).
        dump = node.wait_config_change(&dump).await;
    }
    load.wait_more(100, &node.proc).await;
    let changes = started.elapsed();
    let (ok, failures) = load.finish().await;
    eprintln!(
        "50 changes in {changes:?}; {ok} requests succeeded, {} failed",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} failed requests (of {}), first: {:#?}",
        failures.len(),
        ok + failures.len() as u64,
        &failures[..failures.len().min(10)]
    );
    assert!(ok >= 1000, "only {ok} requests ran across the changes");
    let node_status = node_status_until(&cp, "all ACKed", all_acked).await;
    assert!(type_entry(&node_status, "Listener")["lastNack"].is_null());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_survives_the_control_plane_and_resyncs() {
    let (a, b) = (Echo::spawn("A"), Echo::spawn("B"));
    let dir = tmp();
    let data = dir.path().join("data");
    let state = dir.path().join("state");
    let cp = Control::start(&data, xds_addr());
    let xds = cp.xds;
    let node = Node::start(xds, &state).await;
    let port = free_port();
    let mut cfg = Cfg {
        ports: &[port],
        a: &[a.addr],
        b: &[b.addr],
        weights: (1, 1),
        path: ("/api", "b"),
    };
    cp.apply(dir.path(), &cfg.yaml()).await;
    node.wait_ready().await;
    node_status_until(&cp, "all ACKed", all_acked).await;
    assert!(state.join("lkg.bin").is_file());

    // SIGKILL the control plane under load: not one request fails.
    let load = Load::start(port, &["/", "/api/x"]);
    load.wait_more(100, &node.proc).await;
    let mut cp_proc = cp.proc;
    cp_proc.child.kill().unwrap();
    cp_proc.child.wait().unwrap();
    node.proc
        .stderr
        .wait_for_async("the xDS stream to break", |l| {
            (l.contains("xDS") && (l.contains("WARN") || l.contains("ERROR"))).then_some(())
        })
        .await;
    load.wait_more(300, &node.proc).await;
    let (ok, failures) = load.finish().await;
    eprintln!(
        "control plane killed: {ok} requests, {} failed",
        failures.len()
    );
    assert!(failures.is_empty(), "failed requests: {failures:#?}");
    assert!(
        node.ready().await,
        "not ready any more without a control plane"
    );

    // Restart the proxy while the control plane is down: it boots from its last-known-good
    // config after the initial fetch timeout.
    node.stop();
    let booted = Instant::now();
    let node = Node::start(xds, &state).await;
    node.wait_ready().await;
    let boot = booted.elapsed();
    let c = client();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..20 {
        seen.insert(who(&c, port, "/").await.unwrap());
    }
    assert_eq!(who(&c, port, "/api/x").await.as_deref(), Ok("B"));
    assert!(
        node.proc.stderr.text().contains("last-known-good"),
        "{}",
        node.proc.stderr.text()
    );
    eprintln!(
        "restarted proxy served the last-known-good config {boot:?} after start; saw {seen:?}"
    );

    // Load across the control plane's return: the proxy resyncs (same data dir, same
    // xDS address) and ACKs, still without a failed request; then a change reaches it.
    let load = Load::start(port, &["/", "/api/x"]);
    load.wait_more(50, &node.proc).await;
    let cp = Control::start(&data, xds);
    let acked = node_status_until(&cp, "the restarted proxy resynced and ACKed", all_acked).await;
    for kind in [
        "Cluster",
        "ClusterLoadAssignment",
        "Listener",
        "RouteConfiguration",
    ] {
        assert!(
            type_entry(&acked, kind)["ackedVersion"].is_string(),
            "{kind}: {acked:#}"
        );
    }
    load.wait_more(100, &node.proc).await;
    let (ok, failures) = load.finish().await;
    eprintln!(
        "control plane back: {ok} requests, {} failed",
        failures.len()
    );
    assert!(failures.is_empty(), "failed requests: {failures:#?}");

    let (code, out, err) = cp.cli(&["status"]).await;
    assert_eq!(code, 0, "{err}");
    let row = out
        .lines()
        .find(|l| l.starts_with("node-1 "))
        .unwrap_or_else(|| panic!("no node-1 row: {out}"));
    assert_eq!(
        row.matches(" ok ").count(),
        4,
        "CDS, EDS, LDS, RDS ACKed: {out}"
    );
    assert!(!row.contains("NACK"), "{out}");

    cfg.weights = (0, 1);
    let t = Instant::now();
    cp.apply(dir.path(), &cfg.yaml()).await;
    follows(port, "/", "B", 20, &node.proc).await;
    let took = t.elapsed();
    assert!(
        took < FOLLOW_WITHIN,
        "after the resync a change took {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_the_proxy_cannot_bind_is_nacked_and_shown() {
    let (a, b) = (Echo::spawn("A"), Echo::spawn("B"));
    let dir = tmp();
    let cp = Control::start(&dir.path().join("data"), "127.0.0.1:0".parse().unwrap());
    let node = Node::start(cp.xds, &dir.path().join("state")).await;
    let port = free_port();
    let mut cfg = Cfg {
        ports: &[port],
        a: &[a.addr],
        b: &[b.addr],
        weights: (1, 0),
        path: ("/api", "b"),
    };
    cp.apply(dir.path(), &cfg.yaml()).await;
    node.wait_ready().await;
    follows(port, "/", "A", 3, &node.proc).await;
    node_status_until(&cp, "all ACKed", all_acked).await;

    // A second listener on a port something else holds, plus a weight change: the proxy
    // cannot bind it, so it refuses the whole update (NACK) and keeps the previous one.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port();
    let ports = [port, taken_port];
    cfg.ports = &ports;
    cfg.weights = (0, 1);
    cp.apply(dir.path(), &cfg.yaml()).await;
    let nacked = node_status_until(&cp, "a NACK", |n| {
        n["types"]
            .as_array()
            .is_some_and(|t| t.iter().any(|t| t["lastNack"].is_object()))
    })
    .await;
    let nack = nacked["types"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|t| t["lastNack"]["message"].as_str())
        .unwrap()
        .to_owned();
    assert!(
        nack.contains(&taken_port.to_string()) && nack.to_lowercase().contains("in use"),
        "the NACK does not say which listener could not bind and why: {nack}"
    );
    // The previous config keeps serving: still A on `/`.
    let c = client();
    for _ in 0..20 {
        assert_eq!(who(&c, port, "/").await.as_deref(), Ok("A"));
    }

    // `biplane status` shows the NACK and its message.
    let (code, out, err) = cp.cli(&["status"]).await;
    assert_eq!(code, 0, "{err}");
    let row = out
        .lines()
        .find(|l| l.starts_with("node-1 "))
        .unwrap_or_else(|| panic!("no node-1 row: {out}"));
    assert!(row.contains("NACK"), "{out}");
    let section = out
        .split_once("LAST NACKS\n")
        .unwrap_or_else(|| panic!("no LAST NACKS section: {out}"))
        .1;
    assert!(section.contains("node-1"), "{out}");
    assert!(section.contains(&taken_port.to_string()), "{out}");

    // The Gateway and the route are not Programmed, and say why.
    for (kind, name) in [("gateways", "gw"), ("httproutes", "web")] {
        let programmed = condition(&cp, kind, name, "Programmed").await;
        assert_eq!(programmed["status"], "False", "{kind}: {programmed}");
        let message = programmed["message"].as_str().unwrap_or_default();
        eprintln!(
            "{kind}/{name} Programmed: {} {message}",
            programmed["reason"]
        );
        assert!(
            message.contains(&taken_port.to_string()),
            "{kind}: Programmed does not carry the NACK message: {programmed}"
        );
    }
    let (code, yaml, _) = cp.cli(&["get", "gateway", "gw", "-o", "yaml"]).await;
    assert_eq!(code, 0);
    assert!(yaml.contains("Programmed"), "{yaml}");

    // Fixed (the port is released): the next push binds it and is ACKed.
    drop(taken);
    cfg.weights = (1, 1);
    cp.apply(dir.path(), &cfg.yaml()).await;
    node_status_until(&cp, "ACKed again", all_acked).await;
    follows(taken_port, "/api/x", "B", 3, &node.proc).await;
    let start = Instant::now();
    loop {
        let programmed = condition(&cp, "gateways", "gw", "Programmed").await;
        if programmed["status"] == "True" {
            break;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "never Programmed again: {programmed}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_serves_the_quickstart_and_stops_on_sigint() {
    let dir = tmp();
    let cwd = dir.path().join("cwd");
    std::fs::create_dir_all(&cwd).unwrap();
    let data: PathBuf = dir.path().join("data");
    let http_port = free_port().to_string();
    let mut up = Proc::spawn_in(
        &[
            "up",
            "--api-addr",
            "127.0.0.1:0",
            "--xds-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
            "--echo-ports",
            "0,0",
            "--http-port",
            &http_port,
            "--data-dir",
            data.to_str().unwrap(),
            "--no-access-log",
        ],
        &cwd,
    );
    let api = up
        .stderr
        .wait_for_async("`api listening on`", |l| after(l, "api listening on "))
        .await;
    up.stdout
        .wait_for_async("the banner", |l| (l == "biplane is up").then_some(()))
        .await;
    let banner = up.stdout.text();
    let url = format!("http://127.0.0.1:{http_port}/");
    assert!(banner.contains(&format!("curl {url}")), "{banner}");
    assert!(
        banner.contains("biplane apply -f examples/quickstart.yaml"),
        "{banner}"
    );

    // curl through it: the split answers from the echoes, the path route from echo-v2.
    let curl = |path: &str| {
        let out = std::process::Command::new("curl")
            .args(["-s", "-i", "--max-time", "10"])
            .arg(format!("http://127.0.0.1:{http_port}{path}"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_lowercase()
    };
    let first = curl("/");
    assert!(first.starts_with("http/1.1 200"), "{first}");
    assert!(first.contains("x-echo-name: echo-v"), "{first}");
    let v2 = curl("/v2/hello");
    assert!(v2.contains("x-echo-name: echo-v2"), "{v2}");

    // Secure by default: the node enrolled and speaks mTLS; the CLI finds the server, the
    // CA and the admin token through the client config the control plane wrote.
    assert!(
        up.stderr
            .text()
            .contains("proxy node identity spiffe://biplane.local/gateway/default/default/node/"),
        "{}",
        up.stderr.text()
    );
    assert!(banner.contains("needs a bearer token"), "{banner}");
    let client_config = data.join("client.yaml");
    let (code, out, err) = run_biplane(
        "warn",
        vec![
            "get".into(),
            "httproutes".into(),
            "--client-config".into(),
            client_config.to_str().unwrap().into(),
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.lines().any(|l| l.starts_with("quickstart ")), "{out}");
    // Plaintext, or HTTPS without a token, is refused.
    let (code, _, err) = run_biplane(
        "warn",
        vec![
            "get".into(),
            "httproutes".into(),
            "--server".into(),
            format!("http://{api}"),
        ],
    )
    .await;
    assert_eq!(code, 1, "{err}");
    let ca = data.join("ca/ca.crt");
    let (code, _, err) = run_biplane(
        "warn",
        vec![
            "get".into(),
            "httproutes".into(),
            "--server".into(),
            format!("https://{api}"),
            "--ca-file".into(),
            ca.to_str().unwrap().into(),
        ],
    )
    .await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("token"), "{err}");

    up.signal("INT");
    let status = tokio::task::spawn_blocking(move || {
        let status = up.wait_exit(DEADLINE);
        up.stderr.wait_eof();
        (status, up.stderr.text())
    })
    .await
    .unwrap();
    assert_eq!(status.0.code(), Some(0), "stderr:\n{}", status.1);
    assert!(status.1.contains("control plane stopped"), "{}", status.1);
    assert!(data.join("store.redb").is_file());
    assert!(data.join("proxy-state").join("lkg.bin").is_file());
}
