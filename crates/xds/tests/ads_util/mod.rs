//! Shared harness of the ADS tests: a server on 127.0.0.1:0, envoy-types' ADS client,
//! hand-built resources, and bounded waits for the next message.
#![allow(dead_code, reason = "each test crate uses a subset")]

use std::net::SocketAddr;
use std::time::Duration;

use biplane_xds::XdsResources;
use biplane_xds::server::{AdsServer, FleetStatus, GatewayKey, ServerSettings, SnapshotCache};
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, LbEndpoint, LocalityLbEndpoints,
};
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::google::protobuf::Duration as PbDuration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::transport::Channel;

pub const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
pub const LDS: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const RDS: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
pub const SDS: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// Upper bound for anything that must arrive.
pub const WAIT: Duration = Duration::from_secs(5);
/// How long a negative check ("nothing arrives") waits.
pub const QUIET: Duration = Duration::from_millis(300);

pub struct Harness {
    pub addr: SocketAddr,
    pub cache: SnapshotCache,
    pub fleet: FleetStatus,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.server.abort();
    }
}

pub async fn start() -> Harness {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let cache = SnapshotCache::new();
    let fleet = FleetStatus::new();
    let ads = AdsServer::new(cache.clone(), fleet.clone());
    let server = tokio::spawn(async move {
        ServerSettings::default()
            .builder()
            .add_service(ads.into_service())
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    Harness {
        addr,
        cache,
        fleet,
        server,
    }
}

impl Harness {
    pub async fn client(&self) -> AggregatedDiscoveryServiceClient<Channel> {
        AggregatedDiscoveryServiceClient::connect(format!("http://{}", self.addr))
            .await
            .unwrap()
    }

    /// A SotW stream: the request sender and the response stream.
    pub async fn sotw(
        &self,
    ) -> (
        mpsc::Sender<envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest>,
        tonic::Streaming<envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse>,
    ) {
        let (tx, rx) = mpsc::channel(16);
        let resp = self
            .client()
            .await
            .stream_aggregated_resources(ReceiverStream::new(rx))
            .await
            .unwrap();
        (tx, resp.into_inner())
    }

    /// A Delta stream: the request sender and the response stream.
    pub async fn delta(
        &self,
    ) -> (
        mpsc::Sender<envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest>,
        tonic::Streaming<envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryResponse>,
    ) {
        let (tx, rx) = mpsc::channel(16);
        let resp = self
            .client()
            .await
            .delta_aggregated_resources(ReceiverStream::new(rx))
            .await
            .unwrap();
        (tx, resp.into_inner())
    }

    /// Polls `f` until it holds (deadline [`WAIT`]).
    pub async fn eventually(&self, what: &str, mut f: impl FnMut(&Harness) -> bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !f(self) {
            assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

pub fn gw() -> GatewayKey {
    GatewayKey::new("default", "gw")
}

pub fn node(id: &str, cluster: &str) -> Option<Node> {
    Some(Node {
        id: id.to_owned(),
        cluster: cluster.to_owned(),
        user_agent_name: "test".to_owned(),
        ..Default::default()
    })
}

/// The next message, failing after [`WAIT`].
pub async fn next<T>(s: &mut tonic::Streaming<T>) -> T {
    match tokio::time::timeout(WAIT, s.message()).await {
        Ok(Ok(Some(m))) => m,
        Ok(Ok(None)) => panic!("stream ended"),
        Ok(Err(status)) => panic!("stream failed: {status}"),
        Err(_) => panic!("no message within {WAIT:?}"),
    }
}

/// Asserts that nothing arrives within [`QUIET`].
pub async fn quiet<T: std::fmt::Debug>(s: &mut tonic::Streaming<T>) {
    if let Ok(m) = tokio::time::timeout(QUIET, s.message()).await {
        panic!("expected no message, got {m:?}");
    }
}

/// The status the stream ends with.
pub async fn ends_with<T: std::fmt::Debug>(s: &mut tonic::Streaming<T>) -> tonic::Status {
    match tokio::time::timeout(WAIT, s.message()).await {
        Ok(Ok(Some(m))) => panic!("expected the stream to end, got {m:?}"),
        Ok(Ok(None)) => panic!("stream ended with OK"),
        Ok(Err(status)) => status,
        Err(_) => panic!("stream did not end within {WAIT:?}"),
    }
}

pub fn cluster(name: &str, timeout_s: i64) -> Cluster {
    Cluster {
        name: name.to_owned(),
        connect_timeout: Some(PbDuration {
            seconds: timeout_s,
            nanos: 0,
        }),
        ..Default::default()
    }
}

pub fn cla(name: &str, endpoints: usize) -> ClusterLoadAssignment {
    ClusterLoadAssignment {
        cluster_name: name.to_owned(),
        endpoints: vec![LocalityLbEndpoints {
            lb_endpoints: vec![LbEndpoint::default(); endpoints],
            ..Default::default()
        }],
        ..Default::default()
    }
}

pub fn listener(name: &str) -> Listener {
    Listener {
        name: name.to_owned(),
        ..Default::default()
    }
}

pub fn route(name: &str) -> RouteConfiguration {
    RouteConfiguration {
        name: name.to_owned(),
        ..Default::default()
    }
}

pub fn secret(name: &str) -> Secret {
    Secret {
        name: name.to_owned(),
        ..Default::default()
    }
}

/// Two clusters (a, b) with endpoints, one listener, one route configuration, one secret.
pub fn base() -> XdsResources {
    XdsResources {
        clusters: vec![cluster("a", 1), cluster("b", 1)],
        load_assignments: vec![cla("a", 1), cla("b", 2)],
        listeners: vec![listener("listener-80")],
        route_configs: vec![route("route-80")],
        secrets: vec![secret("default/cert")],
    }
}

pub fn any<M: prost::Message + prost::Name>(m: &M) -> envoy_types::pb::google::protobuf::Any {
    biplane_xds::to_any(m)
}
