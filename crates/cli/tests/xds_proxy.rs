//! `biplane proxy --control-plane`: the real binary against an in-test ADS server (this
//! workspace's, with a `SnapshotCache`): it serves what is pushed, NACKs what it cannot
//! honour and keeps serving, survives the control plane's death, boots from its
//! last-known-good config while the control plane is still down, and resyncs when it
//! returns.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a panic is a failure"
)]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use biplane_xds::server::{AdsServer, FleetStatus, GatewayKey, ServerSettings, SnapshotCache};
use biplane_xds::{ResourceKind, TranslateOptions, XdsResources, static_xds};
use common::*;
use envoy_types::pb::envoy::config::cluster::v3::cluster::{ClusterDiscoveryType, DiscoveryType};
use tokio_stream::wrappers::TcpListenerStream;

/// An ADS server on its own runtime thread; dropping it drops the runtime, closing every
/// connection at once, as a killed process would.
struct ControlPlane {
    addr: SocketAddr,
    cache: SnapshotCache,
    fleet: FleetStatus,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ControlPlane {
    fn start_on(addr: SocketAddr) -> ControlPlane {
        let cache = SnapshotCache::new();
        let fleet = FleetStatus::new();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let ads = AdsServer::new(cache.clone(), fleet.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
                addr_tx.send(listener.local_addr().unwrap()).unwrap();
                let serve = ServerSettings::default()
                    .builder()
                    .add_service(ads.into_service())
                    .serve_with_incoming(TcpListenerStream::new(listener));
                tokio::select! {
                    r = serve => r.unwrap(),
                    _ = stop_rx => {}
                }
            });
            drop(rt);
        });
        let addr = addr_rx.recv_timeout(DEADLINE).unwrap();
        ControlPlane {
            addr,
            cache,
            fleet,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn set(&self, res: &XdsResources) {
        self.cache
            .set(&GatewayKey::new("default", "gw"), res)
            .unwrap();
    }

    /// Waits until node `id` has ACKed every type it subscribes to at the served versions.
    async fn wait_all_acked(&self, id: &str) {
        let snapshot = self.cache.get(&GatewayKey::new("default", "gw")).unwrap();
        wait_until("the proxy ACKs the snapshot", || {
            self.fleet
                .nodes()
                .iter()
                .find(|n| n.node_id == id)
                .is_some_and(|n| {
                    snapshot.versions().all(|(kind, v)| {
                        let t = n.type_status(kind).unwrap();
                        !t.subscribed || t.acked_version.as_deref() == Some(v)
                    })
                })
        })
        .await;
    }

    /// The last NACK node `id` sent for `kind`.
    fn nack(&self, id: &str, kind: ResourceKind) -> Option<String> {
        self.fleet
            .nodes()
            .into_iter()
            .find(|n| n.node_id == id)
            .and_then(|n| n.type_status(kind).and_then(|t| t.last_nack.clone()))
            .map(|n| n.message)
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < DEADLINE, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Gateway `gw` on `port`, every path to Backend `a` at `upstream`.
fn resources(port: u16, upstream: SocketAddr) -> XdsResources {
    let yaml = format!(
        "{}{}---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: r\nspec:\n  parentRefs: [{{name: gw}}]\n  rules:\n  - backendRefs: [{{group: biplane.dev, kind: Backend, name: a}}]\n",
        http_gateway(port),
        backend("a", &[(upstream, 1)]),
    );
    let opts = TranslateOptions {
        bind_ip: "127.0.0.1".parse().unwrap(),
    };
    static_xds(&yaml, Some("gw"), &opts).unwrap().2
}

/// The same with the cluster turned into STRICT_DNS (which biplane does not implement).
fn with_bad_cluster(mut res: XdsResources) -> XdsResources {
    res.clusters[0].cluster_discovery_type =
        Some(ClusterDiscoveryType::Type(DiscoveryType::StrictDns as i32));
    res.clusters[0].eds_cluster_config = None;
    res
}

/// `biplane proxy --control-plane` with node id `px`; returns once its admin listener is
/// up (not necessarily ready).
async fn start_xds_proxy(cp: SocketAddr, state_dir: &Path, extra: &[&str]) -> (Proc, SocketAddr) {
    let cp = cp.to_string();
    let mut args = vec![
        "proxy",
        "--insecure",
        "--control-plane",
        &cp,
        "--gateway",
        "gw",
        "--node-id",
        "px",
        "--state-dir",
        state_dir.to_str().unwrap(),
        "--admin-addr",
        "127.0.0.1:0",
        "--initial-fetch-timeout",
        "500ms",
        "--no-access-log",
    ];
    args.extend_from_slice(extra);
    let proc = Proc::spawn(&args);
    let admin = proc.stderr.wait_for("the admin address", |l| {
        let rest = &l[l.find("admin listening on ")? + "admin listening on ".len()..];
        rest.split_whitespace().next()?.parse::<SocketAddr>().ok()
    });
    (proc, admin)
}

async fn ready(admin: SocketAddr) -> u16 {
    client()
        .get(format!("http://{admin}/ready"))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

async fn wait_ready(proc: &Proc, admin: SocketAddr) {
    let start = Instant::now();
    while ready(admin).await != 200 {
        assert!(
            start.elapsed() < DEADLINE,
            "proxy never ready; stderr:\n{}",
            proc.stderr.text()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Which echo answered `GET /` on `port` (a fresh connection each time).
async fn who(port: u16) -> Result<String, String> {
    let r = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
        .get(format!("http://127.0.0.1:{port}/"))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if !r.status().is_success() {
        return Err(format!("status {}", r.status()));
    }
    Ok(r.headers()
        .get("x-echo-name")
        .map_or("-".to_owned(), |v| v.to_str().unwrap().to_owned()))
}

async fn wait_for_echo(port: u16, name: &str, proc: &Proc) {
    let start = Instant::now();
    loop {
        let got = who(port).await;
        if got.as_deref() == Ok(name) {
            return;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "traffic never reached {name} (last: {got:?}); stderr:\n{}",
            proc.stderr.text()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `n` requests, all answered by `name`.
async fn all_from(port: u16, name: &str, n: usize) {
    for i in 0..n {
        assert_eq!(who(port).await.as_deref(), Ok(name), "request {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_nacks_survives_the_control_plane_and_boots_from_lkg() {
    let a = Echo::spawn("A");
    let b = Echo::spawn("B");
    let port = free_port();
    let state = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start_on("127.0.0.1:0".parse().unwrap());
    let cp_addr = cp.addr;
    cp.set(&resources(port, a.addr));

    let (proxy, admin) = start_xds_proxy(cp_addr, state.path(), &[]).await;
    wait_ready(&proxy, admin).await;
    wait_for_echo(port, "A", &proxy).await;
    cp.wait_all_acked("px").await;
    assert!(state.path().join("lkg.bin").exists());

    // An update: traffic follows.
    cp.set(&resources(port, b.addr));
    wait_for_echo(port, "B", &proxy).await;
    cp.wait_all_acked("px").await;

    // An update the proxy cannot honour: NACKed with the field, B keeps serving.
    cp.set(&with_bad_cluster(resources(port, b.addr)));
    wait_until("the NACK", || {
        cp.nack("px", ResourceKind::Cluster).is_some()
    })
    .await;
    let nack = cp.nack("px", ResourceKind::Cluster).unwrap();
    assert!(
        nack.contains("Cluster \"backend/default/a\"")
            && nack.contains("STRICT_DNS is not supported"),
        "{nack}"
    );
    all_from(port, "B", 10).await;

    // The control plane dies: the proxy keeps serving, and stays ready.
    drop(cp);
    all_from(port, "B", 20).await;
    assert_eq!(ready(admin).await, 200);

    // The proxy restarts while the control plane is still down: after the initial fetch
    // timeout it serves its last-known-good config (B, the last applied, not the NACKed).
    drop(proxy);
    let (proxy, admin) = start_xds_proxy(cp_addr, state.path(), &[]).await;
    wait_ready(&proxy, admin).await;
    all_from(port, "B", 10).await;
    assert!(
        proxy.stderr.text().contains("last-known-good"),
        "{}",
        proxy.stderr.text()
    );

    // The control plane returns with a new config: the proxy resyncs and ACKs.
    let cp = ControlPlane::start_on(cp_addr);
    cp.set(&resources(port, a.addr));
    wait_for_echo(port, "A", &proxy).await;
    cp.wait_all_acked("px").await;
}

#[tokio::test]
async fn never_ready_without_a_config() {
    // Nothing listens at the control-plane address and there is no last-known-good file.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let state = tempfile::tempdir().unwrap();
    let (proxy, admin) = start_xds_proxy(dead, state.path(), &["--xds-protocol", "sotw"]).await;
    // Past the 500 ms initial fetch timeout: the proxy says why it is not ready.
    proxy.stderr.wait_for("the no-LKG warning", |l| {
        l.contains("no last-known-good").then_some(())
    });
    assert_eq!(ready(admin).await, 503);
    // Connection failures are logged with a growing delay, not in a hot loop.
    let retries = proxy
        .stderr
        .snapshot()
        .iter()
        .filter(|l| l.contains("retry_in"))
        .count();
    assert!((1..30).contains(&retries), "{retries} retries logged");
}

#[test]
fn config_and_control_plane_are_exclusive() {
    let mut p = Proc::spawn(&[
        "proxy",
        "--config",
        "x.yaml",
        "--control-plane",
        "127.0.0.1:1",
        "--gateway",
        "gw",
    ]);
    let status = p.wait_exit(DEADLINE);
    p.stderr.wait_eof();
    assert!(!status.success());
    assert!(
        p.stderr.text().contains("cannot be used with"),
        "{}",
        p.stderr.text()
    );

    // Over plaintext the Gateway must be named; over mTLS it comes from the enrolled
    // certificate, and a node with neither stored credentials nor a token cannot start.
    let mut p = Proc::spawn(&["proxy", "--insecure", "--control-plane", "127.0.0.1:1"]);
    let status = p.wait_exit(DEADLINE);
    p.stderr.wait_eof();
    assert!(!status.success());
    assert!(p.stderr.text().contains("--gateway"), "{}", p.stderr.text());
    let state = tempfile::tempdir().unwrap();
    let mut p = Proc::spawn(&[
        "proxy",
        "--control-plane",
        "127.0.0.1:1",
        "--state-dir",
        state.path().to_str().unwrap(),
    ]);
    let status = p.wait_exit(DEADLINE);
    p.stderr.wait_eof();
    assert!(!status.success());
    assert!(
        p.stderr.text().contains("no node certificate") && p.stderr.text().contains("--token"),
        "{}",
        p.stderr.text()
    );
}
