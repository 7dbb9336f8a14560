//! The control plane end to end over ADS: an apply is compiled and pushed to a node of
//! the Gateway (`node.cluster` = Gateway name), ACKs show in `/api/v1/status` and make the
//! route `Programmed`, a no-op edit pushes nothing, a NACK is reported with its message,
//! deleting the Gateway empties the node's configuration, Delta clients are served too,
//! and the metrics count it all.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

mod control_util;

use std::time::Duration;

use control_util::*;
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use prost::Message;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
const LDS: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
const RDS: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";

/// How long a negative check ("nothing arrives") waits: well past the debounce.
const QUIET: Duration = Duration::from_millis(400);

fn node(id: &str, gateway: &str) -> Option<Node> {
    Some(Node {
        id: id.to_owned(),
        cluster: gateway.to_owned(),
        user_agent_name: "control-test".to_owned(),
        ..Default::default()
    })
}

fn req(type_url: &str, names: &[&str]) -> DiscoveryRequest {
    DiscoveryRequest {
        type_url: type_url.to_owned(),
        resource_names: names.iter().map(|n| (*n).to_owned()).collect(),
        ..Default::default()
    }
}

fn names_of(type_url: &str) -> &'static [&'static str] {
    match type_url {
        EDS => &["backend/default/echo"],
        RDS => &["route-8080"],
        _ => &[],
    }
}

fn ack(resp: &DiscoveryResponse) -> DiscoveryRequest {
    DiscoveryRequest {
        version_info: resp.version_info.clone(),
        response_nonce: resp.nonce.clone(),
        ..req(&resp.type_url, names_of(&resp.type_url))
    }
}

async fn next<T>(s: &mut tonic::Streaming<T>) -> T {
    match tokio::time::timeout(WAIT, s.message()).await {
        Ok(Ok(Some(m))) => m,
        Ok(Ok(None)) => panic!("stream ended"),
        Ok(Err(status)) => panic!("stream failed: {status}"),
        Err(_) => panic!("no message within {WAIT:?}"),
    }
}

async fn quiet<T: std::fmt::Debug>(s: &mut tonic::Streaming<T>) {
    if let Ok(m) = tokio::time::timeout(QUIET, s.message()).await {
        panic!("expected no message, got {m:?}");
    }
}

async fn client(cp: &Cp) -> AggregatedDiscoveryServiceClient<tonic::transport::Channel> {
    AggregatedDiscoveryServiceClient::connect(format!("http://{}", cp.handle.xds_addr()))
        .await
        .unwrap()
}

fn node_status<'a>(status: &'a Value, id: &str) -> Option<&'a Value> {
    status["nodes"]
        .as_array()?
        .iter()
        .find(|n| n["nodeId"] == id)
}

fn type_status<'a>(node: &'a Value, kind: &str) -> &'a Value {
    node["types"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["type"] == kind)
        .unwrap()
}

fn base() -> String {
    docs(&[GATEWAY, &backend("echo", 9001), &route("web", "echo", "/")])
}

#[tokio::test]
async fn sotw_node_gets_compiled_config_acks_noops_and_nacks() {
    let dir = tempfile::tempdir().unwrap();
    let cp = start_in(dir.path()).await;
    cp.apply_ok(&base()).await;

    let (tx, rx) = mpsc::channel(16);
    let mut stream = client(&cp)
        .await
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(DiscoveryRequest {
        node: node("envoy-1", "gw"),
        ..req(CDS, &[])
    })
    .await
    .unwrap();
    tx.send(req(EDS, names_of(EDS))).await.unwrap();
    tx.send(req(LDS, &[])).await.unwrap();
    tx.send(req(RDS, names_of(RDS))).await.unwrap();

    // Initial fetch in push order, each ACKed.
    let mut versions = Vec::new();
    for want in [CDS, EDS, LDS, RDS] {
        let resp = next(&mut stream).await;
        assert_eq!(resp.type_url, want);
        assert_eq!(resp.resources.len(), 1, "{want}: {resp:?}");
        let any = &resp.resources[0];
        match want {
            CDS => assert_eq!(
                Cluster::decode(&*any.value).unwrap().name,
                "backend/default/echo"
            ),
            EDS => {
                let cla = ClusterLoadAssignment::decode(&*any.value).unwrap();
                assert_eq!(cla.cluster_name, "backend/default/echo");
            }
            LDS => {
                let l = Listener::decode(&*any.value).unwrap();
                assert_eq!(l.name, "listener-8080");
                let addr = l.address.unwrap();
                assert!(
                    format!("{addr:?}").contains("127.0.0.1"),
                    "bind_ip is honoured: {addr:?}"
                );
            }
            _ => assert_eq!(
                RouteConfiguration::decode(&*any.value).unwrap().name,
                "route-8080"
            ),
        }
        versions.push((resp.type_url.clone(), resp.version_info.clone()));
        tx.send(ack(&resp)).await.unwrap();
    }

    // The status shows the node with what it ACKed, and the route becomes Programmed.
    let status = cp
        .get_until("/api/v1/status", "the node's ACKs", |s| {
            node_status(s, "envoy-1").is_some_and(|n| {
                [
                    "Cluster",
                    "ClusterLoadAssignment",
                    "Listener",
                    "RouteConfiguration",
                ]
                .iter()
                .all(|k| !type_status(n, k)["ackedVersion"].is_null())
            })
        })
        .await;
    let n = node_status(&status, "envoy-1").unwrap();
    assert_eq!(n["gateway"], "default/gw");
    assert_eq!(n["protocol"], "sotw");
    assert!(n["connectedSince"].as_str().unwrap().ends_with('Z'));
    for (kind, (_, v)) in [
        "Cluster",
        "ClusterLoadAssignment",
        "Listener",
        "RouteConfiguration",
    ]
    .iter()
    .zip(&versions)
    {
        let t = type_status(n, kind);
        assert_eq!(t["ackedVersion"], v.as_str(), "{kind}");
        assert_eq!(t["sentVersion"], v.as_str(), "{kind}");
        assert!(t["lagMs"].is_u64(), "{kind}: {t}");
        assert!(t["lastNack"].is_null());
    }
    assert!(type_status(n, "Secret")["ackedVersion"].is_null());
    let web = cp
        .get_until("/api/v1/httproutes/default/web", "route Programmed", |d| {
            condition(d, "Programmed")["status"] == "True"
        })
        .await;
    assert_eq!(condition(&web, "Programmed")["reason"], "Programmed");
    let gw = cp.get("/api/v1/gateways/default/gw").await.1;
    assert_eq!(condition(&gw, "Programmed")["status"], "True");

    // A no-op edit (labels only: a new revision, the same xDS) pushes nothing, and the
    // route stays Programmed at its new revision.
    let labelled =
        route("web", "echo", "/").replace("  name: web\n", "  name: web\n  labels:\n    a: b\n");
    let body = cp.apply_ok(&labelled).await;
    assert_eq!(actions(&body), vec![("web".into(), "configured".into())]);
    quiet(&mut stream).await;
    cp.get_until(
        "/api/v1/httproutes/default/web",
        "Programmed after a no-op edit",
        |d| condition(d, "Programmed")["status"] == "True" && d["metadata"]["labels"]["a"] == "b",
    )
    .await;
    // Re-applying identical documents writes nothing and pushes nothing either.
    cp.apply_ok(&base()).await;
    quiet(&mut stream).await;

    // A real change: the endpoint port. Only EDS changes; the node NACKs it.
    cp.apply_ok(&backend("echo", 9002)).await;
    let resp = next(&mut stream).await;
    assert_eq!(resp.type_url, EDS);
    let last_good = versions[1].1.clone();
    tx.send(DiscoveryRequest {
        version_info: last_good.clone(),
        response_nonce: resp.nonce.clone(),
        error_detail: Some(RpcStatus {
            code: 3,
            message: "endpoint 127.0.0.1:9002 refused by test".to_owned(),
            details: vec![],
        }),
        ..req(EDS, names_of(EDS))
    })
    .await
    .unwrap();
    // Never re-sent.
    quiet(&mut stream).await;
    let status = cp
        .get_until("/api/v1/status", "the NACK", |s| {
            node_status(s, "envoy-1")
                .is_some_and(|n| !type_status(n, "ClusterLoadAssignment")["lastNack"].is_null())
        })
        .await;
    let eds = type_status(
        node_status(&status, "envoy-1").unwrap(),
        "ClusterLoadAssignment",
    );
    assert_eq!(
        eds["lastNack"]["message"],
        "endpoint 127.0.0.1:9002 refused by test"
    );
    assert_eq!(eds["lastNack"]["version"], resp.version_info.as_str());
    assert_eq!(eds["ackedVersion"], last_good.as_str());
    assert_eq!(eds["sentVersion"], resp.version_info.as_str());
    // The Backend's change is not ACKed: a Gateway compiled at the Backend's revision was
    // never fully applied by the node, but the Gateway's own revision was.
    let gw = cp.get("/api/v1/gateways/default/gw").await.1;
    assert_eq!(condition(&gw, "Programmed")["status"], "True");

    // Metrics: pushes, ACKs, the NACK, a connected node, and converged changes.
    let text = cp
        .http
        .get(cp.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for needle in [
        "biplane_xds_connected_nodes 1",
        "biplane_xds_nacks_total{type=\"ClusterLoadAssignment\"} 1",
        "biplane_xds_pushes_total{type=\"Listener\"} 1",
        "biplane_xds_acks_total{type=\"Cluster\"} 1",
        "biplane_xds_streams_active 1",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in\n{text}");
    }
    assert!(text.contains("biplane_store_revision "), "{text}");

    // A fixed endpoint goes through and is ACKed; the change converges.
    cp.apply_ok(&backend("echo", 9003)).await;
    let resp = next(&mut stream).await;
    assert_eq!(resp.type_url, EDS);
    tx.send(ack(&resp)).await.unwrap();
    eventually("a convergence sample", || async {
        let text = cp
            .http
            .get(cp.url("/metrics"))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        let line = text
            .lines()
            .find(|l| l.starts_with("biplane_config_convergence_seconds_count"))?;
        (line.split(' ').nth(1)? != "0").then_some(())
    })
    .await;

    // Deleting the Gateway withdraws the configuration: empty LDS (and CDS).
    cp.delete("/api/v1/gateways/default/gw").await;
    let mut saw_empty_lds = false;
    for _ in 0..4 {
        let resp = next(&mut stream).await;
        tx.send(ack(&resp)).await.unwrap();
        if resp.type_url == LDS {
            assert!(resp.resources.is_empty(), "{resp:?}");
            saw_empty_lds = true;
            break;
        }
    }
    assert!(saw_empty_lds);
    drop(tx);
    cp.handle.shutdown().await;
}

#[tokio::test]
async fn delta_node_is_served_and_shutdown_ends_streams() {
    let dir = tempfile::tempdir().unwrap();
    let cp = start_in(dir.path()).await;
    cp.apply_ok(&base()).await;
    let (tx, rx) = mpsc::channel(16);
    let mut stream = client(&cp)
        .await
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let sub = |url: &str, names: &[&str]| DeltaDiscoveryRequest {
        type_url: url.to_owned(),
        resource_names_subscribe: names.iter().map(|n| (*n).to_owned()).collect(),
        ..Default::default()
    };
    tx.send(DeltaDiscoveryRequest {
        node: node("delta-1", "default/gw"),
        ..sub(CDS, &["*"])
    })
    .await
    .unwrap();
    tx.send(sub(EDS, names_of(EDS))).await.unwrap();
    tx.send(sub(LDS, &["*"])).await.unwrap();
    tx.send(sub(RDS, names_of(RDS))).await.unwrap();
    let ack = |r: &DeltaDiscoveryResponse| DeltaDiscoveryRequest {
        type_url: r.type_url.clone(),
        response_nonce: r.nonce.clone(),
        ..Default::default()
    };
    for want in [CDS, EDS, LDS, RDS] {
        let resp = next(&mut stream).await;
        assert_eq!(resp.type_url, want);
        assert_eq!(resp.resources.len(), 1);
        tx.send(ack(&resp)).await.unwrap();
    }
    let status = cp
        .get_until("/api/v1/status", "the delta node's ACKs", |s| {
            node_status(s, "delta-1")
                .is_some_and(|n| !type_status(n, "RouteConfiguration")["ackedVersion"].is_null())
        })
        .await;
    assert_eq!(
        node_status(&status, "delta-1").unwrap()["protocol"],
        "delta"
    );
    cp.get_until("/api/v1/httproutes/default/web", "route Programmed", |d| {
        condition(d, "Programmed")["status"] == "True"
    })
    .await;

    // Shutdown ends the stream with UNAVAILABLE instead of hanging on it.
    tokio::time::timeout(Duration::from_secs(15), cp.handle.shutdown())
        .await
        .expect("shutdown hung on an open ADS stream");
    match tokio::time::timeout(WAIT, stream.message()).await {
        Ok(Err(status)) => assert_eq!(status.code(), tonic::Code::Unavailable),
        Ok(Ok(None)) => {}
        other => panic!("expected the stream to end, got {other:?}"),
    }
}

#[tokio::test]
async fn a_gateway_that_fails_to_compile_reports_invalid_and_keeps_its_config() {
    let dir = tempfile::tempdir().unwrap();
    let cp = start_in(dir.path()).await;
    cp.apply_ok(&base()).await;
    let gw_key = biplane_xds::server::GatewayKey::new("default", "gw");
    let served = eventually("the Gateway's first snapshot", || async {
        cp.handle.cache().get(&gw_key)
    })
    .await;
    // A Backend with a hostname that cannot resolve: refused at apply time when it is
    // applied with the route that makes the Gateway use it.
    let bad_backend =
        backend("dns", 9001).replace("address: 127.0.0.1", "address: no-such-host.invalid");
    let (status, err) = cp
        .apply(&docs(&[&bad_backend, &route("dnsroute", "dns", "/dns")]))
        .await;
    assert_eq!(status, 422, "{err:#}");
    assert_eq!(err["errors"][0]["kind"], "Backend");
    assert_eq!(err["errors"][0]["path"], "spec.endpoints[0].address");
    // Stored separately (unused Backends are not compiled), then referenced: the route is
    // accepted at apply time (the problem is in a stored document), and the Gateway
    // reports the compile error in its status.
    cp.apply_ok(&bad_backend).await;
    cp.apply_ok(&route("dnsroute", "dns", "/dns")).await;
    let gw = cp
        .get_until(
            "/api/v1/gateways/default/gw",
            "Programmed=False Invalid",
            |d| condition(d, "Programmed")["reason"] == "Invalid",
        )
        .await;
    let msg = condition(&gw, "Programmed")["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(msg.contains("no-such-host.invalid"), "{msg}");
    let text = cp
        .http
        .get(cp.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        !text.contains("biplane_controller_compile_errors_total 0"),
        "{text}"
    );
    // The Gateway keeps its previous snapshot.
    assert!(std::sync::Arc::ptr_eq(
        &cp.handle.cache().get(&gw_key).unwrap(),
        &served
    ));
    cp.handle.shutdown().await;
}
