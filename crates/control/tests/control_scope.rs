//! The controller recompiles only the Gateways a change touches — and never misses one:
//! a change to what a Gateway reads (its routes, their Backends, even a Backend that did
//! not exist yet) reaches its snapshot; a change elsewhere does not recompile it.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

mod control_util;

use biplane_xds::ResourceKind;
use biplane_xds::server::GatewayKey;
use control_util::*;

const GATEWAY2: &str = "apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: gw2
spec:
  listeners:
  - name: http
    port: 8081
    protocol: HTTP
";

fn route_to(name: &str, gateway: &str, backend: &str) -> String {
    route(name, backend, "/").replace("- name: gw\n", &format!("- name: {gateway}\n"))
}

fn clusters(cp: &Cp, gw: &str) -> Vec<String> {
    let Some(snap) = cp
        .handle
        .cache()
        .get(&GatewayKey::new("default", gw.to_owned()))
    else {
        return Vec::new();
    };
    let Some(ts) = snap.of(ResourceKind::Cluster) else {
        return Vec::new();
    };
    let mut names: Vec<String> = ts.resources().map(|r| r.name().to_owned()).collect();
    names.sort();
    names
}

#[tokio::test]
async fn only_touched_gateways_recompile_and_none_is_missed() {
    let dir = tempfile::tempdir().unwrap();
    let cp = start_in(dir.path()).await;
    cp.apply_ok(&docs(&[
        GATEWAY,
        GATEWAY2,
        &backend("a", 9001),
        &route_to("r1", "gw", "a"),
        // gw2's route waits for a Backend that does not exist yet.
        &route_to("r2", "gw2", "late"),
    ]))
    .await;
    eventually("gw compiled with backend a", || async {
        (clusters(&cp, "gw") == ["backend/default/a"]).then_some(())
    })
    .await;
    // The cache is set before the compile is counted: wait for both counts too.
    eventually("gw2 compiled", || async {
        cp.handle
            .cache()
            .get(&GatewayKey::new("default", "gw2".to_owned()))
            .filter(|_| cp.handle.metrics().compiles.get() >= 2)
            .map(|_| ())
    })
    .await;
    assert!(
        clusters(&cp, "gw2").is_empty(),
        "r2's backend does not exist yet"
    );

    // Creating the missing Backend recompiles gw2 (it depended on it while absent).
    let compiles = cp.handle.metrics().compiles.get();
    cp.apply_ok(&backend("late", 9002)).await;
    eventually("gw2 picks up the new backend", || async {
        (clusters(&cp, "gw2") == ["backend/default/late"]).then_some(())
    })
    .await;
    // ... and only gw2: gw does not read Backend `late`.
    eventually("the compile is counted", || async {
        (cp.handle.metrics().compiles.get() > compiles).then_some(())
    })
    .await;
    assert_eq!(cp.handle.metrics().compiles.get(), compiles + 1);

    // A route that moves from gw to gw2 recompiles both: gw loses it, gw2 gains it.
    let compiles = cp.handle.metrics().compiles.get();
    cp.apply_ok(&route_to("r1", "gw2", "a")).await;
    eventually("gw2 routes to a and late", || async {
        (clusters(&cp, "gw2") == ["backend/default/a", "backend/default/late"]).then_some(())
    })
    .await;
    eventually("gw no longer has a", || async {
        clusters(&cp, "gw").is_empty().then_some(())
    })
    .await;
    // The cache is set before the compile is counted: wait for the count too.
    eventually("both compiles are counted", || async {
        (cp.handle.metrics().compiles.get() >= compiles + 2).then_some(())
    })
    .await;
    assert_eq!(cp.handle.metrics().compiles.get(), compiles + 2);
}
