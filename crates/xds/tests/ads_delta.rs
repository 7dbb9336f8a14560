//! Delta ADS against the real tonic server: initial fetch in push order with per-resource
//! versions, removals, unsubscribe, subscriptions to missing names, stale nonces,
//! NACKs, reconnects with `initial_resource_versions`, and bad requests.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

mod ads_util;

use std::collections::HashMap;

use ads_util::*;
use biplane_xds::ResourceKind;
use biplane_xds::server::{Protocol, Snapshot};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use tokio::sync::mpsc::Sender;

fn sub(type_url: &str, names: &[&str]) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: type_url.to_owned(),
        resource_names_subscribe: names.iter().map(|n| (*n).to_owned()).collect(),
        ..Default::default()
    }
}

fn unsub(type_url: &str, names: &[&str]) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: type_url.to_owned(),
        resource_names_unsubscribe: names.iter().map(|n| (*n).to_owned()).collect(),
        ..Default::default()
    }
}

fn ack(resp: &DeltaDiscoveryResponse) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: resp.type_url.clone(),
        response_nonce: resp.nonce.clone(),
        ..Default::default()
    }
}

fn nack(resp: &DeltaDiscoveryResponse, msg: &str) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        error_detail: Some(RpcStatus {
            code: 3,
            message: msg.to_owned(),
            details: vec![],
        }),
        ..ack(resp)
    }
}

/// The expected `Resource` for a message, with its content version from the snapshot.
fn res<M: prost::Message + prost::Name>(
    snap: &Snapshot,
    kind: ResourceKind,
    name: &str,
    m: &M,
) -> Resource {
    let cached = snap.of(kind).unwrap().get(name).unwrap();
    assert_eq!(cached.any(), &any(m));
    Resource {
        name: name.to_owned(),
        version: cached.version().to_owned(),
        resource: Some(any(m)),
        ..Default::default()
    }
}

fn names(r: &DeltaDiscoveryResponse) -> Vec<&str> {
    r.resources.iter().map(|r| r.name.as_str()).collect()
}

async fn open(
    h: &Harness,
) -> (
    Sender<DeltaDiscoveryRequest>,
    tonic::Streaming<DeltaDiscoveryResponse>,
) {
    let (tx, mut rx) = h.delta().await;
    tx.send(DeltaDiscoveryRequest {
        node: node("envoy-d", "gw"),
        ..sub(CDS, &[])
    })
    .await
    .unwrap();
    tx.send(sub(EDS, &["a", "b"])).await.unwrap();
    tx.send(sub(LDS, &[])).await.unwrap();
    tx.send(sub(RDS, &["route-80"])).await.unwrap();
    quiet(&mut rx).await;
    (tx, rx)
}

#[tokio::test]
async fn initial_fetch_with_per_resource_versions_in_push_order() {
    let h = start().await;
    let (tx, mut rx) = open(&h).await;
    let snap = h.cache.set(&gw(), &base()).unwrap().snapshot;

    let cds = next(&mut rx).await;
    assert_eq!(cds.type_url, CDS);
    assert_eq!(
        cds.system_version_info,
        snap.version(ResourceKind::Cluster).unwrap()
    );
    assert_eq!(
        cds.resources,
        vec![
            res(&snap, ResourceKind::Cluster, "a", &cluster("a", 1)),
            res(&snap, ResourceKind::Cluster, "b", &cluster("b", 1)),
        ]
    );
    assert!(cds.removed_resources.is_empty());
    let eds = next(&mut rx).await;
    assert_eq!(eds.type_url, EDS);
    assert_eq!(
        eds.resources,
        vec![
            res(
                &snap,
                ResourceKind::ClusterLoadAssignment,
                "a",
                &cla("a", 1)
            ),
            res(
                &snap,
                ResourceKind::ClusterLoadAssignment,
                "b",
                &cla("b", 2)
            ),
        ]
    );
    let lds = next(&mut rx).await;
    assert_eq!(lds.type_url, LDS);
    assert_eq!(names(&lds), ["listener-80"]);
    let rds = next(&mut rx).await;
    assert_eq!(rds.type_url, RDS);
    assert_eq!(names(&rds), ["route-80"]);
    for r in [&cds, &eds, &lds, &rds] {
        tx.send(ack(r)).await.unwrap();
    }
    quiet(&mut rx).await;
    h.eventually("all ACKed", |h| {
        snap.versions()
            .filter(|(k, _)| *k != ResourceKind::Secret)
            .all(|(k, v)| h.fleet.all_acked(&gw(), k, v))
    })
    .await;
    assert_eq!(h.fleet.nodes()[0].protocol, Protocol::Delta);

    // A change sends only the changed resource.
    let mut changed = base();
    changed.clusters[1] = cluster("b", 7);
    assert!(h.cache.set(&gw(), &base()).unwrap().is_noop());
    let snap2 = h.cache.set(&gw(), &changed).unwrap().snapshot;
    let cds2 = next(&mut rx).await;
    assert_eq!(
        cds2.resources,
        vec![res(&snap2, ResourceKind::Cluster, "b", &cluster("b", 7))]
    );
    assert_ne!(cds2.resources[0].version, cds.resources[1].version);
    tx.send(ack(&cds2)).await.unwrap();
    quiet(&mut rx).await;
}

#[tokio::test]
async fn deletions_and_missing_names_go_to_removed_resources() {
    let h = start().await;
    let (tx, mut rx) = open(&h).await;
    h.cache.set(&gw(), &base()).unwrap();
    for _ in 0..4 {
        let r = next(&mut rx).await;
        tx.send(ack(&r)).await.unwrap();
    }

    // Cluster b and its endpoints are deleted. Make before break: the cluster removal
    // waits until the other changed types were pushed and answered.
    let mut less = base();
    less.clusters.truncate(1);
    less.load_assignments.truncate(1);
    let snap = h.cache.set(&gw(), &less).unwrap().snapshot;
    let eds = next(&mut rx).await;
    assert_eq!(eds.type_url, EDS);
    assert!(eds.resources.is_empty());
    assert_eq!(eds.removed_resources, ["b"]);
    quiet(&mut rx).await;
    tx.send(ack(&eds)).await.unwrap();
    let cds = next(&mut rx).await;
    assert_eq!(cds.type_url, CDS);
    assert!(cds.resources.is_empty());
    assert_eq!(cds.removed_resources, ["b"]);
    assert_eq!(
        cds.system_version_info,
        snap.version(ResourceKind::Cluster).unwrap()
    );
    tx.send(ack(&cds)).await.unwrap();
    quiet(&mut rx).await;

    // Subscribing to a name that does not exist: told so at once, and sent once it exists.
    tx.send(sub(RDS, &["route-443"])).await.unwrap();
    let rds = next(&mut rx).await;
    assert!(rds.resources.is_empty());
    assert_eq!(rds.removed_resources, ["route-443"]);
    tx.send(ack(&rds)).await.unwrap();
    quiet(&mut rx).await;
    let mut more = less.clone();
    more.route_configs.push(route("route-443"));
    let snap = h.cache.set(&gw(), &more).unwrap().snapshot;
    let rds2 = next(&mut rx).await;
    assert_eq!(
        rds2.resources,
        vec![res(
            &snap,
            ResourceKind::RouteConfiguration,
            "route-443",
            &route("route-443")
        )]
    );
    assert!(rds2.removed_resources.is_empty());
}

#[tokio::test]
async fn unsubscribe_stops_updates_and_resubscribe_resends() {
    let h = start().await;
    let (tx, mut rx) = open(&h).await;
    h.cache.set(&gw(), &base()).unwrap();
    for _ in 0..4 {
        let r = next(&mut rx).await;
        tx.send(ack(&r)).await.unwrap();
    }
    tx.send(unsub(EDS, &["b"])).await.unwrap();
    quiet(&mut rx).await;
    let mut changed = base();
    changed.load_assignments[1] = cla("b", 9);
    h.cache.set(&gw(), &changed).unwrap();
    quiet(&mut rx).await;

    // Subscribing again is answered, even for a resource sent before.
    tx.send(sub(EDS, &["a", "b"])).await.unwrap();
    let eds = next(&mut rx).await;
    assert_eq!(names(&eds), ["a", "b"]);
    assert_eq!(eds.resources[1].resource, Some(any(&cla("b", 9))));
}

#[tokio::test]
async fn subscriptions_are_honoured_with_a_stale_nonce() {
    let h = start().await;
    let (tx, mut rx) = h.delta().await;
    h.cache.set(&gw(), &base()).unwrap();
    tx.send(DeltaDiscoveryRequest {
        node: node("n", "gw"),
        ..sub(EDS, &["a"])
    })
    .await
    .unwrap();
    let e1 = next(&mut rx).await;
    let mut changed = base();
    changed.load_assignments[0] = cla("a", 4);
    h.cache.set(&gw(), &changed).unwrap();
    let e2 = next(&mut rx).await;
    assert_eq!(names(&e2), ["a"]);
    // Subscribe "b" while acknowledging the older response.
    tx.send(DeltaDiscoveryRequest {
        response_nonce: e1.nonce.clone(),
        ..sub(EDS, &["b"])
    })
    .await
    .unwrap();
    let e3 = next(&mut rx).await;
    assert_eq!(names(&e3), ["b"]);
}

#[tokio::test]
async fn nacked_resources_are_not_resent_until_they_change() {
    let h = start().await;
    let (tx, mut rx) = open(&h).await;
    h.cache.set(&gw(), &base()).unwrap();
    for _ in 0..4 {
        let r = next(&mut rx).await;
        tx.send(ack(&r)).await.unwrap();
    }
    let mut bad = base();
    bad.listeners[0] = listener("listener-80");
    bad.listeners.push(listener("listener-bad"));
    h.cache.set(&gw(), &bad).unwrap();
    let lds = next(&mut rx).await;
    assert_eq!(names(&lds), ["listener-bad"]);
    tx.send(nack(&lds, "listener-bad: no filter chains"))
        .await
        .unwrap();
    quiet(&mut rx).await;
    h.eventually("NACK recorded", |h| {
        h.fleet.nodes()[0]
            .type_status(ResourceKind::Listener)
            .unwrap()
            .last_nack
            .as_ref()
            .is_some_and(|n| n.message == "listener-bad: no filter chains")
    })
    .await;
    // Another type changes: only that is sent.
    let mut more = bad.clone();
    more.route_configs[0] = route("route-80");
    more.route_configs.push(route("route-81"));
    h.cache.set(&gw(), &more).unwrap();
    quiet(&mut rx).await; // route-81 is not subscribed
    // The listener is fixed: sent.
    let mut fixed = more.clone();
    fixed.listeners.pop();
    h.cache.set(&gw(), &fixed).unwrap();
    let lds2 = next(&mut rx).await;
    assert!(lds2.resources.is_empty());
    assert_eq!(lds2.removed_resources, ["listener-bad"]);
}

#[tokio::test]
async fn reconnect_with_initial_resource_versions_resends_only_changes() {
    let h = start().await;
    let (tx, mut rx) = open(&h).await;
    h.cache.set(&gw(), &base()).unwrap();
    let mut held: HashMap<String, HashMap<String, String>> = HashMap::new();
    for _ in 0..4 {
        let r = next(&mut rx).await;
        tx.send(ack(&r)).await.unwrap();
        let m = held.entry(r.type_url.clone()).or_default();
        for res in &r.resources {
            m.insert(res.name.clone(), res.version.clone());
        }
    }
    drop(tx);
    drop(rx);
    h.eventually("disconnected", |h| h.fleet.nodes().is_empty())
        .await;

    // Meanwhile cluster a changes, cluster b is deleted, cluster c is added.
    let mut next_cfg = base();
    next_cfg.clusters = vec![cluster("a", 3), cluster("c", 1)];
    let snap = h.cache.set(&gw(), &next_cfg).unwrap().snapshot;

    let (tx, mut rx) = h.delta().await;
    let initial = |t: &str| held.get(t).cloned().unwrap_or_default();
    // Envoy re-lists the names it holds with their versions; "*" keeps the wildcard.
    tx.send(DeltaDiscoveryRequest {
        node: node("envoy-d", "gw"),
        initial_resource_versions: initial(CDS),
        ..sub(CDS, &["*"])
    })
    .await
    .unwrap();
    tx.send(DeltaDiscoveryRequest {
        initial_resource_versions: initial(EDS),
        ..sub(EDS, &["a", "b"])
    })
    .await
    .unwrap();
    tx.send(DeltaDiscoveryRequest {
        initial_resource_versions: initial(LDS),
        ..sub(LDS, &["*"])
    })
    .await
    .unwrap();

    // Changed and new clusters first; the removal of b waits (make before break).
    let cds = next(&mut rx).await;
    assert_eq!(cds.type_url, CDS);
    assert_eq!(
        cds.resources,
        vec![
            res(&snap, ResourceKind::Cluster, "a", &cluster("a", 3)),
            res(&snap, ResourceKind::Cluster, "c", &cluster("c", 1)),
        ]
    );
    assert!(cds.removed_resources.is_empty());
    // EDS and LDS are unchanged: one empty response each, completing the initial fetch.
    let eds = next(&mut rx).await;
    assert_eq!(
        (
            eds.type_url.as_str(),
            eds.resources.len(),
            eds.removed_resources.len()
        ),
        (EDS, 0, 0)
    );
    let lds = next(&mut rx).await;
    assert_eq!(
        (
            lds.type_url.as_str(),
            lds.resources.len(),
            lds.removed_resources.len()
        ),
        (LDS, 0, 0)
    );
    quiet(&mut rx).await;
    for r in [&cds, &eds, &lds] {
        tx.send(ack(r)).await.unwrap();
    }
    let cds2 = next(&mut rx).await;
    assert_eq!(cds2.type_url, CDS);
    assert!(cds2.resources.is_empty());
    assert_eq!(cds2.removed_resources, ["b"]);
    assert_eq!(
        cds2.system_version_info,
        snap.version(ResourceKind::Cluster).unwrap()
    );
    quiet(&mut rx).await;
}

#[tokio::test]
async fn reconnect_that_relists_names_without_star_stays_wildcard() {
    // hashicorp/consul#12174: a reconnecting Envoy re-lists the clusters it holds.
    let h = start().await;
    let snap = h.cache.set(&gw(), &base()).unwrap().snapshot;
    let versions: HashMap<String, String> = ["a", "b"]
        .iter()
        .map(|n| {
            let v = snap
                .of(ResourceKind::Cluster)
                .unwrap()
                .get(n)
                .unwrap()
                .version();
            ((*n).to_owned(), v.to_owned())
        })
        .collect();
    let (tx, mut rx) = h.delta().await;
    tx.send(DeltaDiscoveryRequest {
        node: node("n", "gw"),
        initial_resource_versions: versions,
        ..sub(CDS, &["a", "b"])
    })
    .await
    .unwrap();
    let first = next(&mut rx).await;
    assert!(first.resources.is_empty() && first.removed_resources.is_empty());
    tx.send(ack(&first)).await.unwrap();
    let mut more = base();
    more.clusters.push(cluster("new", 1));
    h.cache.set(&gw(), &more).unwrap();
    let r = next(&mut rx).await;
    assert_eq!(names(&r), ["new"]);
}

#[tokio::test]
async fn unknown_type_url_ends_only_that_stream() {
    let h = start().await;
    h.cache.set(&gw(), &base()).unwrap();
    let (good_tx, mut good) = open_ready(&h, "good").await;
    let (tx, mut rx) = open_ready(&h, "bad").await;
    let url = "type.googleapis.com/envoy.config.listener.v3.Nope";
    tx.send(sub(url, &[])).await.unwrap();
    let st = ends_with(&mut rx).await;
    assert_eq!(st.code(), tonic::Code::InvalidArgument);
    assert!(st.message().contains(url), "{}", st.message());

    // Garbage nonce and missing node.
    let (tx2, mut rx2) = open_ready(&h, "bad2").await;
    tx2.send(DeltaDiscoveryRequest {
        response_nonce: "garbage".into(),
        ..sub(CDS, &[])
    })
    .await
    .unwrap();
    assert_eq!(
        ends_with(&mut rx2).await.code(),
        tonic::Code::InvalidArgument
    );
    let (tx3, mut rx3) = h.delta().await;
    tx3.send(sub(CDS, &[])).await.unwrap();
    assert_eq!(
        ends_with(&mut rx3).await.code(),
        tonic::Code::InvalidArgument
    );

    let mut more = base();
    more.clusters.push(cluster("c", 1));
    h.cache.set(&gw(), &more).unwrap();
    let r = next(&mut good).await;
    assert_eq!(names(&r), ["c"]);
    drop(good_tx);
}

/// A stream with a wildcard CDS subscription whose first response was read and ACKed.
async fn open_ready(
    h: &Harness,
    id: &str,
) -> (
    Sender<DeltaDiscoveryRequest>,
    tonic::Streaming<DeltaDiscoveryResponse>,
) {
    let (tx, mut rx) = h.delta().await;
    tx.send(DeltaDiscoveryRequest {
        node: node(id, "gw"),
        ..sub(CDS, &[])
    })
    .await
    .unwrap();
    let r = next(&mut rx).await;
    assert_eq!(names(&r), ["a", "b"]);
    tx.send(ack(&r)).await.unwrap();
    (tx, rx)
}
