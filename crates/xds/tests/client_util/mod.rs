//! Shared harness of the xDS client tests: an ADS server (this crate's, with a
//! `SnapshotCache`) on its own runtime thread so that a test can kill it like a process,
//! resources built from YAML through `static_xds`, and a client whose apply callback
//! records every config it is given.
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test harness: each test crate uses a subset, and panics are test failures"
)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use biplane_config::Config;
use biplane_xds::client::{Backoff, ClientHandle, ClientOptions, ClientStatus, Protocol};
use biplane_xds::server::{
    AdsServer, FleetStatus, GatewayKey, NodeStatus, ServerSettings, SnapshotCache,
};
use biplane_xds::{ResourceKind, TranslateOptions, XdsResources, static_xds, to_any};
use envoy_types::pb::envoy::config::cluster::v3::cluster::{ClusterDiscoveryType, DiscoveryType};
use envoy_types::pb::envoy::config::listener::v3::filter;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::TcpListenerStream;

/// Upper bound for anything that must happen.
pub const WAIT: Duration = Duration::from_secs(10);
/// How long a negative check ("nothing is applied") waits.
pub const QUIET: Duration = Duration::from_millis(400);

/// An ADS server on its own runtime thread; [`ControlPlane::kill`] drops the runtime,
/// closing every connection at once, as a crashed process would.
pub struct ControlPlane {
    pub addr: SocketAddr,
    pub cache: SnapshotCache,
    pub fleet: FleetStatus,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ControlPlane {
    pub fn start() -> ControlPlane {
        Self::start_on("127.0.0.1:0".parse().unwrap())
    }

    /// Starts on `addr` (a restarted server reuses its predecessor's port).
    pub fn start_on(addr: SocketAddr) -> ControlPlane {
        Self::start_with(addr, false)
    }

    /// A server that answers Delta streams with `UNIMPLEMENTED` (an old control plane).
    pub fn start_sotw_only() -> ControlPlane {
        Self::start_with("127.0.0.1:0".parse().unwrap(), true)
    }

    fn start_with(addr: SocketAddr, sotw_only: bool) -> ControlPlane {
        let cache = SnapshotCache::new();
        let fleet = FleetStatus::new();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (c, f) = (cache.clone(), fleet.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
                addr_tx.send(listener.local_addr().unwrap()).unwrap();
                let ads = AdsServer::new(c, f);
                let mut builder = ServerSettings::default().builder();
                let incoming = TcpListenerStream::new(listener);
                let serve = async move {
                    if sotw_only {
                        builder
                            .add_service(sotw_only::service(ads))
                            .serve_with_incoming(incoming)
                            .await
                    } else {
                        builder
                            .add_service(ads.into_service())
                            .serve_with_incoming(incoming)
                            .await
                    }
                };
                tokio::select! {
                    r = serve => r.unwrap(),
                    _ = stop_rx => {}
                }
            });
            // Dropping the runtime drops every connection and stream task.
            drop(rt);
        });
        let addr = addr_rx.recv_timeout(WAIT).unwrap();
        ControlPlane {
            addr,
            cache,
            fleet,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Kills the server: every connection closes.
    pub fn kill(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }

    pub fn set(&self, res: &XdsResources) {
        self.cache.set(&gw(), res).unwrap();
    }

    /// The version now served for `kind`.
    pub fn version(&self, kind: ResourceKind) -> String {
        self.cache
            .get(&gw())
            .unwrap()
            .version(kind)
            .unwrap()
            .to_owned()
    }

    pub fn node(&self, id: &str) -> Option<NodeStatus> {
        self.fleet.nodes().into_iter().find(|n| n.node_id == id)
    }

    /// Waits until node `id` has ACKed every type of the snapshot it subscribes to, at
    /// the versions now served.
    pub async fn wait_all_acked(&self, id: &str) {
        let snapshot = self.cache.get(&gw()).unwrap();
        eventually("the node ACKs the snapshot", || {
            let Some(n) = self.node(id) else { return false };
            snapshot.versions().all(|(kind, v)| {
                let t = n.type_status(kind).unwrap();
                !t.subscribed || t.acked_version.as_deref() == Some(v)
            })
        })
        .await;
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop_now();
    }
}

mod sotw_only {
    use biplane_xds::server::AdsServer;
    use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
        AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
    };
    use envoy_types::pb::envoy::service::discovery::v3::{
        DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest,
    };
    use tonic::{Request, Response, Status, Streaming};

    pub struct SotwOnly(AdsServer);

    pub fn service(ads: AdsServer) -> AggregatedDiscoveryServiceServer<SotwOnly> {
        AggregatedDiscoveryServiceServer::new(SotwOnly(ads))
    }

    #[tonic::async_trait]
    impl AggregatedDiscoveryService for SotwOnly {
        type StreamAggregatedResourcesStream =
            <AdsServer as AggregatedDiscoveryService>::StreamAggregatedResourcesStream;
        type DeltaAggregatedResourcesStream =
            tokio_stream::Empty<Result<DeltaDiscoveryResponse, Status>>;

        async fn stream_aggregated_resources(
            &self,
            request: Request<Streaming<DiscoveryRequest>>,
        ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
            self.0.stream_aggregated_resources(request).await
        }

        async fn delta_aggregated_resources(
            &self,
            _request: Request<Streaming<DeltaDiscoveryRequest>>,
        ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
            Err(Status::unimplemented("no Delta here"))
        }
    }
}

pub fn gw() -> GatewayKey {
    GatewayKey::new("default", "gw")
}

/// Gateway `gw` (HTTP on `port`), Backend `a` with one endpoint on 127.0.0.1:`backend_port`
/// (the marker tests use to tell configs apart), and a route for `/` to it.
pub fn resources(port: u16, backend_port: u16) -> XdsResources {
    let yaml = format!(
        r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: gw}}
spec:
  gatewayClassName: biplane
  listeners:
  - {{name: http, port: {port}, protocol: HTTP}}
---
apiVersion: biplane.dev/v1alpha1
kind: Backend
metadata: {{name: a}}
spec:
  endpoints:
  - {{address: "127.0.0.1", port: {backend_port}}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: r}}
spec:
  parentRefs: [{{name: gw}}]
  rules:
  - backendRefs: [{{group: biplane.dev, kind: Backend, name: a}}]
"#
    );
    let opts = TranslateOptions {
        bind_ip: "127.0.0.1".parse().unwrap(),
    };
    static_xds(&yaml, Some("gw"), &opts).unwrap().2
}

/// The same, with the cluster turned into a STRICT_DNS cluster (which biplane rejects).
pub fn with_bad_cluster(mut res: XdsResources) -> XdsResources {
    res.clusters[0].cluster_discovery_type =
        Some(ClusterDiscoveryType::Type(DiscoveryType::StrictDns as i32));
    res.clusters[0].eds_cluster_config = None;
    res
}

/// The same, with an HTTP filter biplane does not implement (CORS) before the router.
pub fn with_bad_http_filter(mut res: XdsResources) -> XdsResources {
    let f = &mut res.listeners[0].filter_chains[0].filters[0];
    let Some(filter::ConfigType::TypedConfig(any)) = &mut f.config_type else {
        panic!("no typed_config");
    };
    let mut m = hcm::HttpConnectionManager::decode(&*any.value).unwrap();
    m.http_filters.insert(
        0,
        hcm::HttpFilter {
            name: "envoy.filters.http.cors".to_owned(),
            config_type: Some(hcm::http_filter::ConfigType::TypedConfig(Any {
                type_url: "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors"
                    .to_owned(),
                value: Vec::new(),
            })),
            ..Default::default()
        },
    );
    *any = to_any(&m);
    res
}

/// The endpoint port of the first cluster: the marker of [`resources`].
pub fn marker(c: &Config) -> u16 {
    c.clusters[0].endpoints[0].address.port()
}

pub fn fast_backoff() -> Backoff {
    Backoff {
        initial: Duration::from_millis(20),
        max: Duration::from_millis(200),
        jitter: 0.2,
    }
}

pub fn options(servers: &[SocketAddr], id: &str, protocol: Protocol) -> ClientOptions {
    let mut o = ClientOptions::new(servers.iter().map(|a| a.to_string()).collect(), id, "gw");
    o.protocol = protocol;
    o.backoff = fast_backoff();
    o.connect_timeout = Duration::from_secs(2);
    o
}

/// A client whose apply callback records configs (and can be told to fail).
pub struct Recorded {
    pub handle: ClientHandle,
    pub configs: mpsc::UnboundedReceiver<Config>,
}

pub fn run_client(opts: ClientOptions) -> Recorded {
    let (tx, configs) = mpsc::unbounded_channel();
    let handle = biplane_xds::client::spawn(opts, move |config| {
        let tx = tx.clone();
        async move { tx.send(config).map_err(|_| "test ended".to_owned()) }
    })
    .unwrap();
    Recorded { handle, configs }
}

impl Recorded {
    /// The next applied config.
    pub async fn next(&mut self) -> Config {
        match tokio::time::timeout(WAIT, self.configs.recv()).await {
            Ok(Some(c)) => c,
            Ok(None) => panic!("client stopped"),
            Err(_) => panic!(
                "no config applied within {WAIT:?}; status: {:?}",
                self.status()
            ),
        }
    }

    /// Asserts nothing is applied for [`QUIET`].
    pub async fn quiet(&mut self) {
        if let Ok(c) = tokio::time::timeout(QUIET, self.configs.recv()).await {
            panic!("expected no apply, got {c:?}");
        }
    }

    pub fn status(&self) -> ClientStatus {
        self.handle.status().borrow().clone()
    }

    pub async fn wait_status(&self, what: &str, mut f: impl FnMut(&ClientStatus) -> bool) {
        let mut rx = self.handle.status();
        let r = tokio::time::timeout(WAIT, rx.wait_for(|s| f(s))).await;
        assert!(
            matches!(r, Ok(Ok(_))),
            "timed out waiting for {what}; status: {:?}",
            self.status()
        );
    }
}

/// Polls `f` until it holds (deadline [`WAIT`]).
pub async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A temp dir path for the LKG (removed on drop).
pub fn state_dir() -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("state");
    (d, p)
}

/// An address where nothing listens (a port bound a moment ago and released).
pub fn dead_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}
