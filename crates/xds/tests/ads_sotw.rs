//! State-of-the-World ADS against the real tonic server: initial fetch in push order,
//! ACK, NACK (never re-sent), update after NACK, no-op sets, stale nonces, named
//! subscriptions, wildcard rules, coalescing for a slow client, and bad requests.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

mod ads_util;

use ads_util::*;
use biplane_xds::ResourceKind;
use biplane_xds::server::{FleetEvent, GatewayKey, Protocol, Snapshot};
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use tokio::sync::mpsc::Sender;

fn req(type_url: &str, names: &[&str]) -> DiscoveryRequest {
    DiscoveryRequest {
        type_url: type_url.to_owned(),
        resource_names: names.iter().map(|n| (*n).to_owned()).collect(),
        ..Default::default()
    }
}

fn ack(resp: &DiscoveryResponse, names: &[&str]) -> DiscoveryRequest {
    DiscoveryRequest {
        version_info: resp.version_info.clone(),
        response_nonce: resp.nonce.clone(),
        ..req(&resp.type_url, names)
    }
}

fn nack(resp: &DiscoveryResponse, last_good: &str, names: &[&str], msg: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        version_info: last_good.to_owned(),
        response_nonce: resp.nonce.clone(),
        error_detail: Some(RpcStatus {
            code: 3,
            message: msg.to_owned(),
            details: vec![],
        }),
        ..req(&resp.type_url, names)
    }
}

fn version(s: &Snapshot, kind: ResourceKind) -> String {
    s.version(kind).unwrap().to_owned()
}

/// Opens a stream with CDS (wildcard), EDS [a, b], LDS (wildcard) and RDS [route-80].
async fn subscribe_all(
    h: &Harness,
) -> (
    Sender<DiscoveryRequest>,
    tonic::Streaming<DiscoveryResponse>,
) {
    let (tx, mut rx) = h.sotw().await;
    tx.send(DiscoveryRequest {
        node: node("envoy-1", "gw"),
        ..req(CDS, &[])
    })
    .await
    .unwrap();
    tx.send(req(EDS, &["a", "b"])).await.unwrap();
    tx.send(req(LDS, &[])).await.unwrap();
    tx.send(req(RDS, &["route-80"])).await.unwrap();
    // The Gateway has no configuration yet: nothing at all (no empty config).
    quiet(&mut rx).await;
    (tx, rx)
}

#[tokio::test]
async fn initial_fetch_in_push_order_then_ack() {
    let h = start().await;
    let (tx, mut rx) = subscribe_all(&h).await;
    let out = h.cache.set(&gw(), &base()).unwrap();
    let snap = out.snapshot;

    let cds = next(&mut rx).await;
    assert_eq!(cds.type_url, CDS);
    assert_eq!(cds.version_info, version(&snap, ResourceKind::Cluster));
    assert_eq!(
        cds.resources,
        vec![any(&cluster("a", 1)), any(&cluster("b", 1))]
    );
    assert!(!cds.nonce.is_empty());
    assert_eq!(cds.control_plane.as_ref().unwrap().identifier, "biplane");

    let eds = next(&mut rx).await;
    assert_eq!(eds.type_url, EDS);
    assert_eq!(
        eds.version_info,
        version(&snap, ResourceKind::ClusterLoadAssignment)
    );
    assert_eq!(eds.resources, vec![any(&cla("a", 1)), any(&cla("b", 2))]);

    let lds = next(&mut rx).await;
    assert_eq!(lds.type_url, LDS);
    assert_eq!(lds.resources, vec![any(&listener("listener-80"))]);

    let rds = next(&mut rx).await;
    assert_eq!(rds.type_url, RDS);
    assert_eq!(rds.resources, vec![any(&route("route-80"))]);
    assert_eq!(
        rds.version_info,
        version(&snap, ResourceKind::RouteConfiguration)
    );

    let nonces = [&cds.nonce, &eds.nonce, &lds.nonce, &rds.nonce];
    for (i, n) in nonces.iter().enumerate() {
        assert!(!nonces[i + 1..].contains(n), "nonces must differ");
    }
    // SDS was not requested: nothing else arrives.
    quiet(&mut rx).await;

    let mut events = h.fleet.subscribe();
    tx.send(ack(&cds, &[])).await.unwrap();
    tx.send(ack(&eds, &["a", "b"])).await.unwrap();
    tx.send(ack(&lds, &[])).await.unwrap();
    tx.send(ack(&rds, &["route-80"])).await.unwrap();
    // ACKs are answered by nothing.
    quiet(&mut rx).await;

    let mut acked = Vec::new();
    while acked.len() < 4 {
        match tokio::time::timeout(WAIT, events.recv())
            .await
            .unwrap()
            .unwrap()
        {
            FleetEvent::Ack(a) => {
                assert_eq!(a.node_id, "envoy-1");
                assert_eq!(a.gateway, gw());
                assert_eq!(a.version, version(&snap, a.kind));
                acked.push(a.kind);
            }
            other => panic!("unexpected event {other:?}"),
        }
    }
    assert_eq!(
        acked,
        [
            ResourceKind::Cluster,
            ResourceKind::ClusterLoadAssignment,
            ResourceKind::Listener,
            ResourceKind::RouteConfiguration
        ]
    );
    let nodes = h.fleet.nodes();
    assert_eq!(nodes.len(), 1);
    let n = &nodes[0];
    assert_eq!(
        (n.node_id.as_str(), n.protocol),
        ("envoy-1", Protocol::Sotw)
    );
    assert_eq!(n.user_agent, "test");
    for (kind, v) in snap.versions() {
        let t = n.type_status(kind).unwrap();
        if kind == ResourceKind::Secret {
            assert!(!t.subscribed && t.acked_version.is_none());
        } else {
            assert!(t.subscribed);
            assert_eq!(t.acked_version.as_deref(), Some(v), "{kind}");
            assert_eq!(t.sent_version.as_deref(), Some(v));
            assert!(t.last_nack.is_none());
        }
        assert!(h.fleet.all_acked(&gw(), kind, v));
    }
    let m = h.fleet.metrics();
    assert_eq!(
        m.streams_active.load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert_eq!(
        m.of(ResourceKind::Cluster)
            .unwrap()
            .acks
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );

    // Disconnect: the node leaves the fleet.
    drop(tx);
    drop(rx);
    h.eventually("node gone", |h| h.fleet.nodes().is_empty())
        .await;
    h.eventually("stream count", |h| {
        h.fleet
            .metrics()
            .streams_active
            .load(std::sync::atomic::Ordering::Relaxed)
            == 0
    })
    .await;
}

/// Reads the four initial responses, ACKs them and waits until the ACKs are recorded.
async fn settle(
    h: &Harness,
    tx: &Sender<DiscoveryRequest>,
    rx: &mut tonic::Streaming<DiscoveryResponse>,
) -> Vec<DiscoveryResponse> {
    let mut out = Vec::new();
    for names in [&[][..], &["a", "b"][..], &[][..], &["route-80"][..]] {
        let r = next(rx).await;
        tx.send(ack(&r, names)).await.unwrap();
        out.push(r);
    }
    h.eventually("initial ACKs recorded", |h| {
        h.fleet.nodes().iter().all(|n| {
            n.types
                .iter()
                .filter(|t| t.subscribed)
                .all(|t| t.acked_version.is_some() && t.acked_version == t.sent_version)
        })
    })
    .await;
    out
}

#[tokio::test]
async fn noop_set_pushes_nothing_and_changes_push_only_changed_types() {
    let h = start().await;
    let (tx, mut rx) = subscribe_all(&h).await;
    h.cache.set(&gw(), &base()).unwrap();
    settle(&h, &tx, &mut rx).await;

    // Identical content, rebuilt from scratch: nothing to push.
    let out = h.cache.set(&gw(), &base()).unwrap();
    assert!(out.is_noop());
    quiet(&mut rx).await;

    // One endpoint change: only EDS is pushed.
    let mut changed = base();
    changed.load_assignments[1] = cla("b", 3);
    let out = h.cache.set(&gw(), &changed).unwrap();
    assert_eq!(out.changed, vec![ResourceKind::ClusterLoadAssignment]);
    let eds = next(&mut rx).await;
    assert_eq!(eds.type_url, EDS);
    assert_eq!(
        eds.version_info,
        version(&out.snapshot, ResourceKind::ClusterLoadAssignment)
    );
    assert_eq!(eds.resources, vec![any(&cla("a", 1)), any(&cla("b", 3))]);
    tx.send(ack(&eds, &["a", "b"])).await.unwrap();
    quiet(&mut rx).await;
}

#[tokio::test]
async fn nacked_version_is_not_resent_until_content_changes() {
    let h = start().await;
    let (tx, mut rx) = subscribe_all(&h).await;
    let first = h.cache.set(&gw(), &base()).unwrap().snapshot;
    settle(&h, &tx, &mut rx).await;
    let good = version(&first, ResourceKind::ClusterLoadAssignment);

    let mut bad = base();
    bad.load_assignments[0] = cla("a", 99);
    let second = h.cache.set(&gw(), &bad).unwrap().snapshot;
    let cds = next(&mut rx).await;
    assert_eq!(cds.type_url, EDS);
    assert_eq!(
        cds.version_info,
        version(&second, ResourceKind::ClusterLoadAssignment)
    );
    tx.send(nack(
        &cds,
        &good,
        &["a", "b"],
        "cluster a: bad connect_timeout",
    ))
    .await
    .unwrap();
    // Never re-sent: not on its own, not on an identical set.
    quiet(&mut rx).await;
    assert!(h.cache.set(&gw(), &bad).unwrap().is_noop());
    quiet(&mut rx).await;

    h.eventually("NACK recorded", |h| {
        h.fleet.nodes().first().is_some_and(|n| {
            let t = n.type_status(ResourceKind::ClusterLoadAssignment).unwrap();
            t.acked_version.as_deref() == Some(good.as_str())
                && t.last_nack.as_ref().is_some_and(|l| {
                    l.version == cds.version_info && l.message == "cluster a: bad connect_timeout"
                })
        })
    })
    .await;
    assert_eq!(
        h.fleet
            .metrics()
            .of(ResourceKind::ClusterLoadAssignment)
            .unwrap()
            .nacks
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );

    // A fixed configuration is pushed, and ACKed.
    let mut fixed = base();
    fixed.load_assignments[0] = cla("a", 2);
    let third = h.cache.set(&gw(), &fixed).unwrap().snapshot;
    let cds2 = next(&mut rx).await;
    assert_eq!(cds2.type_url, EDS);
    assert_eq!(
        cds2.version_info,
        version(&third, ResourceKind::ClusterLoadAssignment)
    );
    assert_ne!(cds2.nonce, cds.nonce);
    assert_eq!(cds2.resources, vec![any(&cla("a", 2)), any(&cla("b", 2))]);
    tx.send(ack(&cds2, &["a", "b"])).await.unwrap();
    h.eventually("ACK after fix", |h| {
        h.fleet.all_acked(
            &gw(),
            ResourceKind::ClusterLoadAssignment,
            third.version(ResourceKind::ClusterLoadAssignment).unwrap(),
        )
    })
    .await;
    quiet(&mut rx).await;
}

#[tokio::test]
async fn stale_nonce_is_ignored_and_new_names_are_answered() {
    let h = start().await;
    let (tx, mut rx) = h.sotw().await;
    h.cache.set(&gw(), &base()).unwrap();
    tx.send(DiscoveryRequest {
        node: node("n", "default/gw"),
        ..req(EDS, &["a"])
    })
    .await
    .unwrap();
    let eds1 = next(&mut rx).await;
    assert_eq!(eds1.resources, vec![any(&cla("a", 1))]);

    // A change produces a newer response before the client answered the first one.
    let mut changed = base();
    changed.load_assignments[0] = cla("a", 5);
    let snap2 = h.cache.set(&gw(), &changed).unwrap().snapshot;
    let eds2 = next(&mut rx).await;
    assert_eq!(eds2.resources, vec![any(&cla("a", 5))]);

    // The ACK of the first, now stale, also asks for "b": ignored entirely.
    tx.send(ack(&eds1, &["a", "b"])).await.unwrap();
    quiet(&mut rx).await;
    let t = h.fleet.nodes()[0]
        .type_status(ResourceKind::ClusterLoadAssignment)
        .cloned()
        .unwrap();
    assert_eq!(
        t.acked_version, None,
        "a stale nonce must not count as an ACK"
    );

    // With the current nonce, the new name is answered at the same version (and "a",
    // sent before, is in the response again).
    tx.send(ack(&eds2, &["a", "b"])).await.unwrap();
    let eds3 = next(&mut rx).await;
    assert_eq!(eds3.version_info, eds2.version_info);
    assert_eq!(
        eds3.version_info,
        version(&snap2, ResourceKind::ClusterLoadAssignment)
    );
    assert_eq!(eds3.resources, vec![any(&cla("a", 5)), any(&cla("b", 2))]);
    assert_ne!(eds3.nonce, eds2.nonce);
    // Dropping a name needs no answer.
    tx.send(ack(&eds3, &["b"])).await.unwrap();
    quiet(&mut rx).await;
}

#[tokio::test]
async fn missing_names_are_remembered_and_pushed_when_they_appear() {
    let h = start().await;
    let (tx, mut rx) = h.sotw().await;
    h.cache.set(&gw(), &base()).unwrap();
    tx.send(DiscoveryRequest {
        node: node("n", "gw"),
        ..req(RDS, &["route-443"])
    })
    .await
    .unwrap();
    // SotW cannot say "does not exist" for RDS: nothing is sent.
    quiet(&mut rx).await;
    let mut more = base();
    more.route_configs.push(route("route-443"));
    h.cache.set(&gw(), &more).unwrap();
    let rds = next(&mut rx).await;
    assert_eq!(rds.resources, vec![any(&route("route-443"))]);
}

#[tokio::test]
async fn wildcard_rules_for_lds_and_cds() {
    let h = start().await;
    let (tx, mut rx) = h.sotw().await;
    let mut res = base();
    res.clusters.push(cluster("c", 1));
    h.cache.set(&gw(), &res).unwrap();

    // Explicit names: only those, as a full set.
    tx.send(DiscoveryRequest {
        node: node("n", "gw"),
        ..req(CDS, &["a", "missing"])
    })
    .await
    .unwrap();
    let r1 = next(&mut rx).await;
    assert_eq!(r1.resources, vec![any(&cluster("a", 1))]);

    // "*" plus a name: everything.
    tx.send(ack(&r1, &["*", "a"])).await.unwrap();
    let r2 = next(&mut rx).await;
    assert_eq!(
        r2.resources,
        vec![
            any(&cluster("a", 1)),
            any(&cluster("b", 1)),
            any(&cluster("c", 1))
        ]
    );

    // Names were set once, so an empty list now unsubscribes: changes are not pushed.
    tx.send(ack(&r2, &[])).await.unwrap();
    quiet(&mut rx).await;
    res.clusters.push(cluster("d", 1));
    h.cache.set(&gw(), &res).unwrap();
    quiet(&mut rx).await;

    // LDS with names never set is wildcard; an empty snapshot deletes everything.
    tx.send(req(LDS, &[])).await.unwrap();
    let l1 = next(&mut rx).await;
    assert_eq!(l1.resources, vec![any(&listener("listener-80"))]);
    tx.send(ack(&l1, &[])).await.unwrap();
    h.cache.set(&gw(), &Default::default()).unwrap();
    let l2 = next(&mut rx).await;
    assert_eq!(l2.type_url, LDS);
    assert!(
        l2.resources.is_empty(),
        "an empty full set deletes all listeners"
    );
    assert_ne!(l2.version_info, l1.version_info);
}

#[tokio::test]
async fn a_client_that_never_reads_gets_coalesced_responses() {
    let h = start().await;
    let (tx, mut rx) = h.sotw().await;
    h.cache.set(&gw(), &base()).unwrap();
    tx.send(DiscoveryRequest {
        node: node("slow", "gw"),
        ..req(CDS, &[])
    })
    .await
    .unwrap();
    h.eventually("first push", |h| {
        h.fleet
            .metrics()
            .of(ResourceKind::Cluster)
            .unwrap()
            .pushes
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    })
    .await;
    let mut last = None;
    for i in 0..200 {
        let mut r = base();
        r.clusters[0] = cluster("a", 1000 + i);
        last = Some(h.cache.set(&gw(), &r).unwrap().snapshot);
    }
    let want = version(last.as_ref().unwrap(), ResourceKind::Cluster);
    let mut received = 0;
    loop {
        let r = next(&mut rx).await;
        received += 1;
        if r.version_info == want {
            break;
        }
    }
    // One queued, one being encoded, one built from the latest state (at most).
    assert!(
        received <= 3,
        "received {received} responses for 200 changes"
    );
    let pushes = h
        .fleet
        .metrics()
        .of(ResourceKind::Cluster)
        .unwrap()
        .pushes
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(pushes <= 3, "{pushes} pushes");
    drop(tx);
}

#[tokio::test]
async fn bad_requests_end_only_their_stream() {
    let h = start().await;
    h.cache.set(&gw(), &base()).unwrap();
    let (good_tx, mut good) = h.sotw().await;
    good_tx
        .send(DiscoveryRequest {
            node: node("good", "gw"),
            ..req(CDS, &[])
        })
        .await
        .unwrap();
    let g1 = next(&mut good).await;
    good_tx.send(ack(&g1, &[])).await.unwrap();

    // No node on the first request.
    let (tx, mut rx) = h.sotw().await;
    tx.send(req(CDS, &[])).await.unwrap();
    let st = ends_with(&mut rx).await;
    assert_eq!(st.code(), tonic::Code::InvalidArgument);
    assert!(st.message().contains("node"), "{}", st.message());

    // A node that names no Gateway.
    let (tx, mut rx) = h.sotw().await;
    tx.send(DiscoveryRequest {
        node: node("n", "a/b/c"),
        ..req(CDS, &[])
    })
    .await
    .unwrap();
    let st = ends_with(&mut rx).await;
    assert_eq!(st.code(), tonic::Code::InvalidArgument);
    assert!(st.message().contains("node.cluster"), "{}", st.message());

    // An unknown type URL, after a valid exchange.
    let (tx, mut rx) = h.sotw().await;
    tx.send(DiscoveryRequest {
        node: node("n", "gw"),
        ..req(CDS, &[])
    })
    .await
    .unwrap();
    next(&mut rx).await;
    let url = "type.googleapis.com/envoy.config.cluster.v3.Nope";
    tx.send(req(url, &[])).await.unwrap();
    let st = ends_with(&mut rx).await;
    assert_eq!(st.code(), tonic::Code::InvalidArgument);
    assert!(st.message().contains(url), "{}", st.message());

    // A garbage nonce.
    let (tx, mut rx) = h.sotw().await;
    tx.send(DiscoveryRequest {
        node: node("n", "gw"),
        response_nonce: "not-a-nonce".into(),
        ..req(CDS, &[])
    })
    .await
    .unwrap();
    let st = ends_with(&mut rx).await;
    assert_eq!(st.code(), tonic::Code::InvalidArgument);
    assert!(st.message().contains("not-a-nonce"), "{}", st.message());

    // The good stream still works.
    let mut res = base();
    res.clusters.push(cluster("c", 1));
    h.cache.set(&gw(), &res).unwrap();
    let g2 = next(&mut good).await;
    assert_eq!(g2.resources.len(), 3);
    assert_eq!(
        h.fleet
            .metrics()
            .streams_rejected
            .load(std::sync::atomic::Ordering::Relaxed),
        4
    );
}

#[tokio::test]
async fn gateways_are_isolated_and_named_with_namespaces() {
    let h = start().await;
    let other = GatewayKey::new("prod", "edge");
    h.cache.set(&gw(), &base()).unwrap();
    let mut edge = base();
    edge.clusters = vec![cluster("edge-only", 1)];
    h.cache.set(&other, &edge).unwrap();

    let (tx, mut rx) = h.sotw().await;
    tx.send(DiscoveryRequest {
        node: node("e", "prod/edge"),
        ..req(CDS, &[])
    })
    .await
    .unwrap();
    let r = next(&mut rx).await;
    assert_eq!(r.resources, vec![any(&cluster("edge-only", 1))]);
    tx.send(ack(&r, &[])).await.unwrap();
    // A change to another Gateway does not reach this node.
    let mut changed = base();
    changed.clusters.push(cluster("z", 1));
    h.cache.set(&gw(), &changed).unwrap();
    quiet(&mut rx).await;
    assert_eq!(h.fleet.nodes_of(&other).len(), 1);
    assert!(h.fleet.nodes_of(&gw()).is_empty());
}

#[tokio::test]
async fn removed_clusters_stay_until_routes_moved_off_them() {
    let h = start().await;
    let (tx, mut rx) = subscribe_all(&h).await;
    h.cache.set(&gw(), &base()).unwrap();
    let first = settle(&h, &tx, &mut rx).await;

    // Cluster b goes away together with a route change (the route stops using it).
    let mut next_cfg = base();
    next_cfg.clusters.truncate(1);
    next_cfg.route_configs[0].ignore_port_in_host_matching = true;
    let snap = h.cache.set(&gw(), &next_cfg).unwrap().snapshot;
    assert_eq!(
        h.cache.set(&gw(), &next_cfg).unwrap().changed,
        Vec::<ResourceKind>::new()
    );
    // CDS is unchanged for the client until RDS is answered (b kept): no CDS first.
    let rds = next(&mut rx).await;
    assert_eq!(rds.type_url, RDS);
    assert_eq!(rds.resources, vec![any(&next_cfg.route_configs[0])]);
    quiet(&mut rx).await;
    tx.send(ack(&rds, &["route-80"])).await.unwrap();
    // Then the stale cluster is removed.
    let cds = next(&mut rx).await;
    assert_eq!(cds.type_url, CDS);
    assert_eq!(cds.version_info, version(&snap, ResourceKind::Cluster));
    assert_eq!(cds.resources, vec![any(&cluster("a", 1))]);
    assert_ne!(cds.version_info, first[0].version_info);
    tx.send(ack(&cds, &[])).await.unwrap();
    quiet(&mut rx).await;
}

#[tokio::test]
async fn replaced_clusters_are_added_first_and_removed_last() {
    let h = start().await;
    let (tx, mut rx) = subscribe_all(&h).await;
    h.cache.set(&gw(), &base()).unwrap();
    settle(&h, &tx, &mut rx).await;

    // b is replaced by c, and the route moves to c.
    let mut next_cfg = base();
    next_cfg.clusters[1] = cluster("c", 1);
    next_cfg.route_configs[0].ignore_port_in_host_matching = true;
    let snap = h.cache.set(&gw(), &next_cfg).unwrap().snapshot;
    let cds = next(&mut rx).await;
    assert_eq!(cds.type_url, CDS);
    // Union: the new cluster c, and b kept, at a version of its own.
    assert_eq!(
        cds.resources,
        vec![
            any(&cluster("a", 1)),
            any(&cluster("b", 1)),
            any(&cluster("c", 1))
        ]
    );
    assert_ne!(cds.version_info, version(&snap, ResourceKind::Cluster));
    tx.send(ack(&cds, &[])).await.unwrap();
    let rds = next(&mut rx).await;
    assert_eq!(rds.type_url, RDS);
    tx.send(ack(&rds, &["route-80"])).await.unwrap();
    let cds2 = next(&mut rx).await;
    assert_eq!(cds2.type_url, CDS);
    assert_eq!(cds2.version_info, version(&snap, ResourceKind::Cluster));
    assert_eq!(
        cds2.resources,
        vec![any(&cluster("a", 1)), any(&cluster("c", 1))]
    );
    tx.send(ack(&cds2, &[])).await.unwrap();
    quiet(&mut rx).await;
    h.eventually("converged", |h| {
        snap.versions()
            .filter(|(k, _)| *k != ResourceKind::Secret)
            .all(|(k, v)| h.fleet.all_acked(&gw(), k, v))
    })
    .await;
}
