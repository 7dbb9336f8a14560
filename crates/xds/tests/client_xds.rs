//! The xDS client against this crate's ADS server, in Delta and SotW: initial config,
//! updates, NACKs of what the proxy cannot honour (the previous config stays), reconnect
//! and resync after a server restart, address rotation, and the Delta → SotW fallback.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a panic is a failure"
)]

mod client_util;

use biplane_xds::ResourceKind;
use biplane_xds::client::Protocol;
use client_util::*;

async fn initial_config_and_update(protocol: Protocol) {
    let cp = ControlPlane::start();
    cp.set(&resources(8080, 1001));
    let mut c = run_client(options(&[cp.addr], "n1", protocol));
    let config = c.next().await;
    assert_eq!(marker(&config), 1001);
    assert_eq!(config.listeners.len(), 1);
    cp.wait_all_acked("n1").await;
    let node = cp.node("n1").unwrap();
    assert_eq!(node.protocol, protocol);
    assert!(
        node.user_agent.starts_with("biplane "),
        "{}",
        node.user_agent
    );
    let lds = cp.version(ResourceKind::Listener);
    c.wait_status("LDS ACKed", |s| {
        s.connected && s.acked(ResourceKind::Listener) == Some(lds.as_str())
    })
    .await;
    // Nothing more is applied while nothing changes.
    c.quiet().await;

    // An endpoint change: only EDS moves.
    cp.set(&resources(8080, 1002));
    assert_eq!(marker(&c.next().await), 1002);
    cp.wait_all_acked("n1").await;
    // A listener port change.
    cp.set(&resources(8081, 1002));
    let config = c.next().await;
    assert_eq!(config.listeners[0].address.port(), 8081);
    cp.wait_all_acked("n1").await;
    assert_eq!(c.status().last_nack, None);
}

#[tokio::test]
async fn delta_initial_config_and_update() {
    initial_config_and_update(Protocol::Delta).await;
}

#[tokio::test]
async fn sotw_initial_config_and_update() {
    initial_config_and_update(Protocol::Sotw).await;
}

/// An update the proxy cannot honour is NACKed with the resource and field, nothing is
/// applied, and the next good version is applied and ACKed.
async fn nack_then_recover(
    protocol: Protocol,
    bad: fn(biplane_xds::XdsResources) -> biplane_xds::XdsResources,
    kind: ResourceKind,
    expect: &str,
) {
    let cp = ControlPlane::start();
    cp.set(&resources(8080, 1001));
    let mut c = run_client(options(&[cp.addr], "n1", protocol));
    assert_eq!(marker(&c.next().await), 1001);
    cp.wait_all_acked("n1").await;

    // Only the bad resource changes (other types would apply on their own, response by
    // response, as in Envoy).
    cp.set(&bad(resources(8080, 1001)));
    let bad_version = cp.version(kind);
    eventually("the server records the NACK", || {
        cp.node("n1")
            .and_then(|n| n.type_status(kind).and_then(|t| t.last_nack.clone()))
            .is_some_and(|nack| nack.version == bad_version)
    })
    .await;
    let node = cp.node("n1").unwrap();
    let nack = node.type_status(kind).unwrap().last_nack.clone().unwrap();
    assert!(
        nack.message.contains(expect),
        "NACK message: {}",
        nack.message
    );
    assert_ne!(
        node.type_status(kind).unwrap().acked_version.as_deref(),
        Some(bad_version.as_str())
    );
    c.quiet().await;
    let status = c.status();
    let client_nack = status.last_nack.clone().unwrap();
    assert!(
        client_nack.message.contains(expect),
        "{}",
        client_nack.message
    );

    // The next good version applies and is ACKed.
    cp.set(&resources(8080, 1003));
    assert_eq!(marker(&c.next().await), 1003);
    cp.wait_all_acked("n1").await;
}

#[tokio::test]
async fn delta_nack_of_an_unsupported_cluster_type() {
    nack_then_recover(
        Protocol::Delta,
        with_bad_cluster,
        ResourceKind::Cluster,
        "Cluster \"backend/default/a\"",
    )
    .await;
}

#[tokio::test]
async fn sotw_nack_of_an_unsupported_cluster_type() {
    nack_then_recover(
        Protocol::Sotw,
        with_bad_cluster,
        ResourceKind::Cluster,
        "Cluster \"backend/default/a\"",
    )
    .await;
}

#[tokio::test]
async fn delta_nack_of_an_unsupported_http_filter() {
    nack_then_recover(
        Protocol::Delta,
        with_bad_http_filter,
        ResourceKind::Listener,
        "http_filters[0]",
    )
    .await;
}

#[tokio::test]
async fn sotw_nack_of_an_unsupported_http_filter() {
    nack_then_recover(
        Protocol::Sotw,
        with_bad_http_filter,
        ResourceKind::Listener,
        "http_filters[0]",
    )
    .await;
}

/// The server dies and comes back on the same address: the client reconnects, resyncs
/// without re-applying identical content, then follows the next change.
async fn reconnect_after_restart(protocol: Protocol) {
    let cp = ControlPlane::start();
    let addr = cp.addr;
    cp.set(&resources(8080, 1001));
    let mut c = run_client(options(&[addr], "n1", protocol));
    assert_eq!(marker(&c.next().await), 1001);
    cp.wait_all_acked("n1").await;

    cp.kill();
    c.wait_status("disconnected", |s| !s.connected).await;

    let cp = ControlPlane::start_on(addr);
    cp.set(&resources(8080, 1001));
    cp.wait_all_acked("n1").await;
    c.wait_status("connected", |s| s.connected).await;
    // Same content: nothing re-applied.
    c.quiet().await;

    cp.set(&resources(8080, 1004));
    assert_eq!(marker(&c.next().await), 1004);
    cp.wait_all_acked("n1").await;
}

#[tokio::test]
async fn delta_reconnect_after_server_restart() {
    reconnect_after_restart(Protocol::Delta).await;
}

#[tokio::test]
async fn sotw_reconnect_after_server_restart() {
    reconnect_after_restart(Protocol::Sotw).await;
}

#[tokio::test]
async fn rotates_to_the_next_address() {
    let cp = ControlPlane::start();
    cp.set(&resources(8080, 1001));
    let mut c = run_client(options(&[dead_addr(), cp.addr], "n1", Protocol::Delta));
    assert_eq!(marker(&c.next().await), 1001);
    cp.wait_all_acked("n1").await;
}

#[tokio::test]
async fn falls_back_to_sotw_when_delta_is_unimplemented() {
    let cp = ControlPlane::start_sotw_only();
    cp.set(&resources(8080, 1001));
    let mut c = run_client(options(&[cp.addr], "n1", Protocol::Delta));
    assert_eq!(marker(&c.next().await), 1001);
    cp.wait_all_acked("n1").await;
    assert_eq!(cp.node("n1").unwrap().protocol, Protocol::Sotw);
    assert_eq!(c.status().protocol, Protocol::Sotw);
}

/// A change that is partly good (an endpoint) and partly bad (a listener): the good
/// response applies, the bad one is NACKed; the fix then applies and everything is ACKed.
async fn partly_bad_change(protocol: Protocol) {
    let cp = ControlPlane::start();
    cp.set(&resources(8080, 1001));
    let mut c = run_client(options(&[cp.addr], "n1", protocol));
    assert_eq!(marker(&c.next().await), 1001);
    cp.wait_all_acked("n1").await;

    cp.set(&with_bad_http_filter(resources(8080, 1002)));
    assert_eq!(marker(&c.next().await), 1002);
    c.wait_status("the NACK", |s| {
        s.last_nack
            .as_ref()
            .is_some_and(|n| n.kind == ResourceKind::Listener)
    })
    .await;
    c.quiet().await;

    cp.set(&resources(8080, 1003));
    assert_eq!(marker(&c.next().await), 1003);
    cp.wait_all_acked("n1").await;
    c.quiet().await;
}

#[tokio::test]
async fn delta_partly_bad_change() {
    partly_bad_change(Protocol::Delta).await;
}

#[tokio::test]
async fn sotw_partly_bad_change() {
    partly_bad_change(Protocol::Sotw).await;
}
