//! Last-known-good persistence: the client writes the applied set after every update;
//! the file round-trips; corrupt, truncated, padded and foreign files are refused whole;
//! a client that finds no control plane serves the file after `initial_fetch_timeout`,
//! and resyncs when the control plane comes back.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a panic is a failure"
)]

mod client_util;

use std::path::Path;
use std::time::Duration;

use biplane_xds::client::Protocol;
use biplane_xds::client::lkg::{self, LKG_FILE, LkgError};
use client_util::*;

/// Runs a client against a control plane serving `resources(8080, port)` until the file
/// holds that set; returns the file's path.
async fn saved_lkg(dir: &Path, port: u16) -> std::path::PathBuf {
    let cp = ControlPlane::start();
    cp.set(&resources(8080, port));
    let mut opts = options(&[cp.addr], "n1", Protocol::Delta);
    opts.state_dir = Some(dir.to_path_buf());
    let mut c = run_client(opts);
    assert_eq!(marker(&c.next().await), port);
    let path = dir.join(LKG_FILE);
    eventually("the LKG file is written", || {
        lkg::read(&path)
            .ok()
            .and_then(|l| l.config().ok())
            .is_some_and(|c| marker(&c) == port)
    })
    .await;
    path
}

#[tokio::test]
async fn round_trip() {
    let (_tmp, dir) = state_dir();
    let path = saved_lkg(&dir, 1001).await;
    let loaded = lkg::read_for(&path, "gw").unwrap();
    assert_eq!(loaded.gateway, "gw");
    assert_eq!(loaded.node_id, "n1");
    // The decoded resources are exactly what the server sent.
    let mut want = resources(8080, 1001);
    let mut got = loaded.resources().unwrap();
    for r in [&mut want, &mut got] {
        r.listeners.sort_by(|a, b| a.name.cmp(&b.name));
        r.clusters.sort_by(|a, b| a.name.cmp(&b.name));
        r.route_configs.sort_by(|a, b| a.name.cmp(&b.name));
    }
    assert_eq!(got, want);
    let config = loaded.config().unwrap();
    assert!(config.version.starts_with("lkg "), "{}", config.version);
    // Encoding is deterministic: re-encoding gives the same bytes.
    assert_eq!(lkg::encode(&loaded), std::fs::read(&path).unwrap());
    // No temp file is left behind.
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec![LKG_FILE.to_owned()]);
    // Owner only: the set carries the Gateway's TLS private keys.
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

#[tokio::test]
async fn damaged_files_are_refused() {
    let (_tmp, dir) = state_dir();
    let path = saved_lkg(&dir, 1001).await;
    let good = std::fs::read(&path).unwrap();
    let check = |bytes: &[u8]| lkg::decode(&path, bytes).unwrap_err();

    // A flipped byte in the payload.
    let mut flipped = good.clone();
    let n = flipped.len() - 10;
    flipped[n] ^= 0x40;
    let e = check(&flipped);
    assert!(matches!(e, LkgError::Checksum { .. }), "{e}");
    assert!(e.to_string().contains("checksum mismatch"), "{e}");
    // A flipped byte in the checksum itself.
    let mut flipped = good.clone();
    flipped[20] ^= 1;
    assert!(matches!(check(&flipped), LkgError::Checksum { .. }));
    // Cut anywhere: in the payload, in the header, in the magic.
    for cut in [good.len() - 1, good.len() / 2, 47, 12, 3, 0] {
        let e = check(&good[..cut]);
        assert!(
            matches!(e, LkgError::Truncated { .. } | LkgError::BadMagic { .. }),
            "cut at {cut}: {e}"
        );
    }
    assert!(
        check(&good[..good.len() - 1])
            .to_string()
            .contains("truncated")
    );
    // Extra bytes.
    let mut long = good.clone();
    long.push(0);
    assert!(matches!(check(&long), LkgError::TrailingData { .. }));
    // Not ours.
    assert!(matches!(
        check(b"{\"json\": true}"),
        LkgError::BadMagic { .. }
    ));
    // A length that claims more than there is.
    let mut huge = good.clone();
    huge[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
    assert!(matches!(check(&huge), LkgError::Truncated { .. }));

    // Through the file system too, and for the wrong Gateway.
    std::fs::write(&path, &good[..good.len() - 5]).unwrap();
    assert!(matches!(lkg::read(&path), Err(LkgError::Truncated { .. })));
    std::fs::write(&path, &good).unwrap();
    assert!(matches!(
        lkg::read_for(&path, "other"),
        Err(LkgError::WrongGateway { .. })
    ));
    lkg::read_for(&path, "gw").unwrap();
}

fn lkg_client(dir: &Path, servers: &[std::net::SocketAddr]) -> Recorded {
    let mut opts = options(servers, "n2", Protocol::Delta);
    opts.state_dir = Some(dir.to_path_buf());
    opts.initial_fetch_timeout = Some(Duration::from_millis(300));
    run_client(opts)
}

#[tokio::test]
async fn serves_the_lkg_when_no_control_plane_answers_then_resyncs() {
    let (_tmp, dir) = state_dir();
    saved_lkg(&dir, 1001).await;

    // The control plane is down: after the timeout the file is applied.
    let down = dead_addr();
    let mut c = lkg_client(&dir, &[down]);
    let config = c.next().await;
    assert_eq!(marker(&config), 1001);
    assert!(config.version.starts_with("lkg "));
    assert!(c.status().serving_lkg);
    assert!(!c.status().connected);

    // It comes back with a new config: the client resyncs and applies it.
    let cp = ControlPlane::start_on(down);
    cp.set(&resources(8080, 1002));
    assert_eq!(marker(&c.next().await), 1002);
    cp.wait_all_acked("n2").await;
    c.wait_status("fresh config", |s| !s.serving_lkg && s.connected)
        .await;
}

#[tokio::test]
async fn a_control_plane_with_the_same_config_resyncs_without_reapplying() {
    let (_tmp, dir) = state_dir();
    saved_lkg(&dir, 1001).await;
    let down = dead_addr();
    let mut c = lkg_client(&dir, &[down]);
    assert_eq!(marker(&c.next().await), 1001);
    let cp = ControlPlane::start_on(down);
    cp.set(&resources(8080, 1001));
    cp.wait_all_acked("n2").await;
    c.wait_status("fresh config", |s| !s.serving_lkg).await;
    c.quiet().await;
}

#[tokio::test]
async fn a_corrupt_lkg_is_never_applied() {
    let (_tmp, dir) = state_dir();
    let path = saved_lkg(&dir, 1001).await;
    let mut bytes = std::fs::read(&path).unwrap();
    let n = bytes.len() / 2;
    bytes[n] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();

    let mut c = lkg_client(&dir, &[dead_addr()]);
    // Well past the 300 ms timeout: nothing applied, not serving.
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.quiet().await;
    let s = c.status();
    assert_eq!(s.applied_count, 0);
    assert!(!s.serving_lkg);
}

#[tokio::test]
async fn no_lkg_without_timeout_or_state_dir() {
    let (_tmp, dir) = state_dir();
    saved_lkg(&dir, 1001).await;
    let mut opts = options(&[dead_addr()], "n3", Protocol::Sotw);
    opts.state_dir = Some(dir.clone());
    opts.initial_fetch_timeout = None;
    let mut c = run_client(opts);
    c.quiet().await;
    assert_eq!(c.status().applied_count, 0);
}
