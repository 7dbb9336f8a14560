//! End-to-end tests of the secured planes, all real processes: a default (secure)
//! `biplane control`, `biplane proxy --token` enrolling over the xDS port and then
//! speaking ADS over mTLS, the `biplane` CLI through the `client.yaml` the control plane
//! writes, and raw clients (reqwest with the CA, tonic ADS with a node's stored
//! credentials, rustls with a foreign CA). Covers enrollment and traffic, bootstrap token
//! uses/TTL/pin, impersonation, revocation, renewal under load with a 4 s certificate
//! lifetime, admin API roles, and plaintext or foreign clients being refused.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a panic is a failure"
)]

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use biplane_xds::client::identity::{IdentityOptions, NodeCredentials, load_or_enroll};
use common::*;
use envoy_types::pb::envoy::config::core::v3::Node as XdsNode;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";

// ------------------------------------------------------------------ processes

/// A running `biplane control` (secure by default unless `extra` says otherwise).
struct Control {
    proc: Proc,
    api: SocketAddr,
    xds: SocketAddr,
    data: PathBuf,
}

impl Control {
    fn start(data: &Path, extra: &[&str]) -> Control {
        let mut args = vec![
            "control",
            "--api-addr",
            "127.0.0.1:0",
            "--xds-addr",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().unwrap(),
            "--proxy-bind-ip",
            "127.0.0.1",
            "--debounce",
            "20ms",
        ];
        args.extend_from_slice(extra);
        let proc = Proc::spawn(&args);
        let api = proc
            .stderr
            .wait_for("`api listening on`", |l| after(l, "api listening on "));
        let xds = proc
            .stderr
            .wait_for("`xds listening on`", |l| after(l, "xds listening on "));
        Control {
            proc,
            api,
            xds,
            data: data.to_path_buf(),
        }
    }

    fn client_config(&self) -> String {
        self.data.join("client.yaml").to_str().unwrap().to_owned()
    }

    fn ca_file(&self) -> PathBuf {
        self.data.join("ca").join("ca.crt")
    }

    fn admin_token(&self) -> String {
        std::fs::read_to_string(self.data.join("admin-token"))
            .unwrap()
            .trim()
            .to_owned()
    }

    fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.api.port())
    }

    /// A reqwest client trusting only the control plane's CA.
    fn https(&self) -> reqwest::Client {
        crypto();
        let ca = reqwest::Certificate::from_pem(&std::fs::read(self.ca_file()).unwrap()).unwrap();
        reqwest::Client::builder()
            .no_proxy()
            .tls_certs_only([ca])
            .timeout(DEADLINE)
            .build()
            .unwrap()
    }

    /// Runs `biplane ARGS --client-config <data-dir>/client.yaml`.
    async fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let mut all: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
        all.extend(["--client-config".to_owned(), self.client_config()]);
        run_biplane("info", all).await
    }

    /// `biplane apply -f FILE`, which must succeed.
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

    /// `biplane token create --gateway gw EXTRA`: the printed token.
    async fn bootstrap_token(&self, extra: &[&str]) -> String {
        let mut args = vec!["token", "create", "--gateway", "gw"];
        args.extend_from_slice(extra);
        let (code, out, err) = self.cli(&args).await;
        assert_eq!(code, 0, "token create: {err}");
        let token = out.trim().to_owned();
        assert!(
            token.starts_with("bpt_") && token.contains('.') && !token.contains('\n'),
            "not a pinned bootstrap token: {out:?}"
        );
        token
    }

    /// `biplane status -o json`.
    async fn status(&self) -> Value {
        let (code, out, err) = self.cli(&["status", "-o", "json"]).await;
        assert_eq!(code, 0, "status: {err}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("status -o json: {e}: {out}"))
    }

    /// Polls `biplane status -o json` until `node` is (or is no longer) listed.
    async fn wait_connected(&self, node: &str, connected: bool) -> Value {
        let start = Instant::now();
        loop {
            let status = self.status().await;
            let entry = status["nodes"]
                .as_array()
                .and_then(|n| n.iter().find(|n| n["nodeId"] == node))
                .cloned();
            match entry {
                Some(e) if connected => return e,
                None if !connected => return status,
                _ => {}
            }
            assert!(
                start.elapsed() < DEADLINE,
                "node {node} never {}: {status:#}\ncontrol plane log:\n{}",
                if connected {
                    "connected"
                } else {
                    "disconnected"
                },
                self.proc.stderr.text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// `biplane proxy --control-plane XDS --state-dir DIR --node-id ID [--token T] EXTRA`.
fn proxy_args(
    cp: &Control,
    state: &Path,
    node_id: &str,
    token: Option<&str>,
    extra: &[&str],
) -> Vec<String> {
    let mut args: Vec<String> = [
        "proxy",
        "--control-plane",
        &cp.xds.to_string(),
        "--state-dir",
        state.to_str().unwrap(),
        "--node-id",
        node_id,
        "--admin-addr",
        "127.0.0.1:0",
        "--drain-timeout",
        "2s",
        "--no-access-log",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    if let Some(t) = token {
        args.extend(["--token".to_owned(), t.to_owned()]);
    }
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    args
}

/// Runs a proxy expected to give up (a refused enrollment): (exit code, stderr).
async fn proxy_fails(cp: &Control, state: &Path, node_id: &str, token: &str) -> (i32, String) {
    let (code, _, err) =
        run_biplane("info", proxy_args(cp, state, node_id, Some(token), &[])).await;
    (code, err)
}

/// Asserts that a refused enrollment left no key and no certificate behind.
fn nothing_written(state: &Path) {
    for f in ["node.key", "node.crt", "ca.crt"] {
        assert!(
            !state.join(f).exists(),
            "{f} written in {} by a refused enrollment",
            state.display()
        );
    }
}

/// A running `biplane proxy --control-plane` (enrolled, or with stored credentials).
struct Node {
    proc: Proc,
    admin: SocketAddr,
}

impl Node {
    async fn start(
        cp: &Control,
        state: &Path,
        node_id: &str,
        token: Option<&str>,
        extra: &[&str],
    ) -> Node {
        let args = proxy_args(cp, state, node_id, token, extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut proc = Proc::spawn(&args);
        let start = Instant::now();
        let admin = loop {
            if let Some(a) = proc
                .stderr
                .snapshot()
                .iter()
                .find_map(|l| after(l, "admin listening on "))
            {
                break a;
            }
            if proc.child.try_wait().unwrap().is_some() {
                proc.stderr.wait_eof();
                panic!("proxy exited; stderr:\n{}", proc.stderr.text());
            }
            assert!(
                start.elapsed() < DEADLINE,
                "no admin address; stderr:\n{}",
                proc.stderr.text()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        Node { proc, admin }
    }

    async fn ready(&self) -> bool {
        admin_ready(self.admin).await
    }

    async fn wait_ready(&self) {
        wait_admin_ready(self.admin, &self.proc).await;
    }

    /// Waits until `n` log lines contain `needle`.
    async fn wait_log(&self, needle: &str, n: usize) {
        let start = Instant::now();
        while count(&self.proc.stderr, needle) < n {
            assert!(
                start.elapsed() < DEADLINE,
                "fewer than {n} {needle:?} lines; stderr:\n{}",
                self.proc.stderr.text()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// SIGTERM, then waits for a clean exit (off the async threads).
    async fn stop(self) {
        let mut proc = self.proc;
        proc.signal("TERM");
        let status = tokio::task::spawn_blocking(move || proc.wait_exit(DEADLINE))
            .await
            .unwrap();
        assert!(status.success(), "proxy exit: {status:?}");
    }
}

fn count(lines: &Lines, needle: &str) -> usize {
    lines
        .snapshot()
        .iter()
        .filter(|l| l.contains(needle))
        .count()
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

// ------------------------------------------------------------------ config

/// Gateway `gw` (one HTTP listener on `port`), Backends `a` and `b`, HTTPRoute `web`
/// sending everything to `target`.
fn cfg(port: u16, a: SocketAddr, b: SocketAddr, target: &str) -> String {
    let mut s = http_gateway(port);
    s.push_str(&backend("a", &[(a, 1)]));
    s.push_str(&backend("b", &[(b, 1)]));
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
  - backendRefs:
    - group: biplane.dev
      kind: Backend
      name: {target}
"
    ));
    s
}

// ------------------------------------------------------------------ traffic

// ------------------------------------------------------------------ raw ADS

/// The first response of an ADS stream opened with `creds` as `id`/`cluster`: the
/// number of resources, or `Code: message`.
async fn ads_first(
    creds: &NodeCredentials,
    xds: SocketAddr,
    delta: bool,
    id: &str,
    cluster: &str,
) -> Result<usize, String> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{xds}")).unwrap();
    let channel = creds
        .connect(endpoint, &xds.to_string())
        .await
        .map_err(|e| format!("connect: {e}"))?;
    ads_on(channel, delta, id, cluster).await
}

async fn ads_on(
    channel: tonic::transport::Channel,
    delta: bool,
    id: &str,
    cluster: &str,
) -> Result<usize, String> {
    let node = Some(XdsNode {
        id: id.to_owned(),
        cluster: cluster.to_owned(),
        ..Default::default()
    });
    let mut client = AggregatedDiscoveryServiceClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let (tx2, rx2) = tokio::sync::mpsc::channel(4);
    if delta {
        tx.send(DeltaDiscoveryRequest {
            node,
            type_url: CDS.to_owned(),
            ..Default::default()
        })
        .await
        .unwrap();
        let stream = client
            .delta_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await;
        first_answer(stream, |r| r.resources.len()).await
    } else {
        tx2.send(DiscoveryRequest {
            node,
            type_url: CDS.to_owned(),
            ..Default::default()
        })
        .await
        .unwrap();
        let stream = client
            .stream_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx2))
            .await;
        first_answer(stream, |r| r.resources.len()).await
    }
}

/// The first response of an opened ADS stream (resource count), or `Code: message`.
/// The request senders stay open in the caller until this returns.
async fn first_answer<R>(
    opened: Result<tonic::Response<tonic::Streaming<R>>, tonic::Status>,
    count: impl Fn(&R) -> usize,
) -> Result<usize, String> {
    let status = |s: tonic::Status| format!("{:?}: {}", s.code(), s.message());
    let mut stream = opened.map_err(status)?.into_inner();
    match tokio::time::timeout(DEADLINE, stream.message()).await {
        Err(_) => Err("no answer in time".to_owned()),
        Ok(Ok(Some(resp))) => Ok(count(&resp)),
        Ok(Ok(None)) => Err("stream ended".to_owned()),
        Ok(Err(s)) => Err(status(s)),
    }
}

/// A TLS connection to the xDS port presenting `cfg`'s client certificate, then the h2
/// preface: `Ok(n)` when the server answered with `n` bytes (its SETTINGS), `Err` with
/// the handshake or read error, or "closed".
async fn tls_h2_probe(xds: SocketAddr, cfg: rustls::ClientConfig) -> Result<usize, String> {
    let tcp = tokio::net::TcpStream::connect(xds).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    tls.write_all(&hello)
        .await
        .map_err(|e| format!("write: {e}"))?;
    tls.flush().await.map_err(|e| format!("flush: {e}"))?;
    let mut buf = [0u8; 1024];
    match tokio::time::timeout(DEADLINE, tls.read(&mut buf)).await {
        Err(_) => Err("no answer in time".to_owned()),
        Ok(Ok(0)) => Err("closed".to_owned()),
        Ok(Ok(n)) => Ok(n),
        Ok(Err(e)) => Err(format!("read: {e}")),
    }
}

/// A client config trusting the control plane's CA and presenting `chain` (PEM) with
/// `key` (PEM), offering h2.
fn mtls_config(ca: &Path, chain: &[u8], key: &[u8]) -> rustls::ClientConfig {
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    crypto();
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain)
        .collect::<Result<_, _>>()
        .unwrap();
    let mut cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, PrivateKeyDer::from_pem_slice(key).unwrap())
        .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    cfg
}

// ------------------------------------------------------------------ tests

/// 1. Enrollment with a bootstrap token minted by the CLI, traffic through the enrolled
///    node, the key stored 0600, and a restart that needs no token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_enrolls_with_a_token_serves_and_restarts_without_one() {
    let (a, b) = (Echo::spawn("A"), Echo::spawn("B"));
    let dir = tmp();
    let cp = Control::start(&dir.path().join("data"), &[]);
    // Secure by default: the token file is 0600 and the CLI config points at https.
    assert_eq!(
        std::fs::metadata(cp.data.join("admin-token"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    let client_yaml = std::fs::read_to_string(cp.client_config()).unwrap();
    assert!(client_yaml.contains("https://"), "{client_yaml}");
    let port = free_port();
    cp.apply(dir.path(), &cfg(port, a.addr, b.addr, "a")).await;
    let token = cp.bootstrap_token(&[]).await;

    let state = dir.path().join("state");
    let node = Node::start(&cp, &state, "node-1", Some(&token), &[]).await;
    node.wait_ready().await;
    follows(port, "/", "A", 3, &node.proc).await;
    let log = node.proc.stderr.text();
    assert!(
        log.contains("spiffe://biplane.local/gateway/default/gw/node/node-1"),
        "{log}"
    );
    assert!(
        !log.contains(token.split('.').next().unwrap()),
        "the token is logged"
    );
    let key_mode = std::fs::metadata(state.join("node.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600, "node.key mode {key_mode:o}");
    assert!(state.join("node.crt").is_file());
    // The CA bundle the node keeps is the control plane's CA.
    assert_eq!(
        std::fs::read_to_string(state.join("ca.crt"))
            .unwrap()
            .trim(),
        std::fs::read_to_string(cp.ca_file()).unwrap().trim()
    );
    let entry = cp.wait_connected("node-1", true).await;
    assert_eq!(entry["gateway"], "default/gw", "{entry:#}");

    // Restart with the same state dir and no token: the stored identity, a fresh config
    // from the control plane (not the last-known-good), traffic again.
    node.stop().await;
    cp.wait_connected("node-1", false).await;
    let node = Node::start(&cp, &state, "node-1", None, &[]).await;
    node.wait_ready().await;
    node.wait_log("xDS config applied", 1).await;
    let log = node.proc.stderr.text();
    assert!(log.contains("using the stored node certificate"), "{log}");
    assert!(!log.contains("enrolled:"), "enrolled again: {log}");
    assert!(!log.contains("last-known-good"), "{log}");
    follows(port, "/", "A", 3, &node.proc).await;
    let entry = cp.wait_connected("node-1", true).await;
    assert_eq!(entry["gateway"], "default/gw", "{entry:#}");
}

/// 2. A bootstrap token is refused once used up, once expired, when unknown, and when its
///    pin is not the control plane's CA; a refused node writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn used_expired_unknown_and_mispinned_tokens_are_refused() {
    let dir = tmp();
    let cp = Control::start(&dir.path().join("data"), &[]);
    cp.apply(dir.path(), &http_gateway(free_port())).await;

    // Mint the short-lived one first so that its expiry runs during the rest.
    let expiring = cp.bootstrap_token(&["--ttl", "1s", "--uses", "5"]).await;
    let minted = Instant::now();

    // `--uses 1`: the first node enrolls, the second is refused.
    let once = cp.bootstrap_token(&["--uses", "1"]).await;
    let first = dir.path().join("first");
    let node = Node::start(&cp, &first, "first", Some(&once), &[]).await;
    assert!(first.join("node.key").is_file() && first.join("node.crt").is_file());
    let second = dir.path().join("second");
    let (code, err) = proxy_fails(&cp, &second, "second", &once).await;
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("no uses left"), "{err}");
    nothing_written(&second);
    drop(node);

    // Past its TTL (a wait on the wall clock: the token lives 1 s).
    let ttl_left = Duration::from_millis(1100).saturating_sub(minted.elapsed());
    tokio::time::sleep(ttl_left).await;
    let late = dir.path().join("late");
    let (code, err) = proxy_fails(&cp, &late, "late", &expiring).await;
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("expired"), "{err}");
    nothing_written(&late);
    let (code, list, _) = cp.cli(&["token", "list", "-o", "json"]).await;
    assert_eq!(code, 0);
    let list: Value = serde_json::from_str(&list).unwrap();
    let items = list
        .get("items")
        .unwrap_or(&list)
        .as_array()
        .unwrap()
        .clone();
    let expired = items
        .iter()
        .find(|t| t["kind"] == "bootstrap" && t["usesLeft"] == 5)
        .unwrap_or_else(|| panic!("the 5-use token is not listed: {list:#}"));
    assert_eq!(expired["valid"], false, "{expired:#}");

    // Unknown secret with the right pin: the control plane refuses it.
    let pin = once.rsplit_once('.').unwrap().1;
    let unknown = dir.path().join("unknown");
    let (code, err) = proxy_fails(&cp, &unknown, "unknown", &format!("bpt_garbage.{pin}")).await;
    assert_ne!(code, 0, "{err}");
    assert!(
        err.contains("Unauthenticated") && err.contains("unknown token"),
        "{err}"
    );
    nothing_written(&unknown);
    // Not a token at all (no pin, no CA file): refused before any call.
    let (code, err) = proxy_fails(&cp, &unknown, "unknown", "garbage").await;
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("token"), "{err}");
    nothing_written(&unknown);

    // A good secret with a pin of another CA: the node refuses the control plane before
    // sending the token, so the token is not spent and still enrolls with its real pin.
    let good = cp.bootstrap_token(&["--uses", "1"]).await;
    let secret = good.rsplit_once('.').unwrap().0;
    let mispinned = format!("{secret}.{}", "A".repeat(43));
    let wrong = dir.path().join("wrong-pin");
    let (code, err) = proxy_fails(&cp, &wrong, "wrong-pin", &mispinned).await;
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("pinned"), "{err}");
    nothing_written(&wrong);
    let node = Node::start(&cp, &wrong, "wrong-pin", Some(&good), &[]).await;
    assert!(wrong.join("node.crt").is_file());
    drop(node);

    // The control plane logged the refusals, never the tokens.
    let log = cp.proc.stderr.text();
    assert!(log.contains("no uses left"), "{log}");
    for t in [&once, &expiring, &good] {
        assert!(
            !log.contains(t.split('.').next().unwrap()),
            "a token is in the log"
        );
    }
}

/// 3. With node A's stored credentials, an ADS stream as node B, or as A for another
///    Gateway, is refused with PERMISSION_DENIED (SotW and Delta); as itself it works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cannot_claim_another_identity() {
    crypto();
    let (a, b) = (Echo::spawn("A"), Echo::spawn("B"));
    let dir = tmp();
    let cp = Control::start(&dir.path().join("data"), &[]);
    let mut yaml = cfg(free_port(), a.addr, b.addr, "a");
    yaml.push_str(&http_gateway(free_port()).replace("name: gw", "name: other"));
    cp.apply(dir.path(), &yaml).await;
    let token = cp.bootstrap_token(&[]).await;
    let state = dir.path().join("node-a");
    let node = Node::start(&cp, &state, "node-a", Some(&token), &[]).await;
    node.wait_ready().await;
    node.stop().await;

    let creds = load_or_enroll(&IdentityOptions::new(&state), &[cp.xds.to_string()])
        .await
        .unwrap();
    assert_eq!(creds.node_id(), "node-a");
    assert_eq!(creds.gateway(), "default/gw");
    for delta in [false, true] {
        for (id, cluster) in [
            ("node-b", "gw"),
            ("node-b", "default/gw"),
            ("node-a", "other"),
            ("node-a", "default/other"),
        ] {
            let got = ads_first(&creds, cp.xds, delta, id, cluster).await;
            let e = got.expect_err(&format!("delta={delta} {id}/{cluster} was served"));
            assert!(
                e.starts_with("PermissionDenied"),
                "delta={delta} {id}/{cluster}: {e}"
            );
        }
        // As itself, for its own Gateway: the Cluster(s) of gw.
        let n = ads_first(&creds, cp.xds, delta, "node-a", "gw").await;
        assert!(matches!(n, Ok(n) if n > 0), "delta={delta}: {n:?}");
    }
    let log = cp.proc.stderr.text();
    assert!(
        log.lines()
            .any(|l| l.contains("claims another identity") && l.contains("node-b")),
        "impersonation not logged:\n{log}"
    );
}

/// 4. Revocation cuts a node off the control plane: its stream closes, it is refused on
///    reconnect and on re-enrollment, it keeps serving its last config meanwhile, and a
///    restart gets no config from the control plane.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_node_is_cut_off_but_keeps_serving() {
    let (a, b) = (Echo::spawn("A"), Echo::spawn("B"));
    let dir = tmp();
    let cp = Control::start(&dir.path().join("data"), &[]);
    let port = free_port();
    cp.apply(dir.path(), &cfg(port, a.addr, b.addr, "a")).await;
    let token = cp.bootstrap_token(&[]).await;
    let state = dir.path().join("state");
    let node = Node::start(&cp, &state, "node-r", Some(&token), &[]).await;
    node.wait_ready().await;
    follows(port, "/", "A", 3, &node.proc).await;
    cp.wait_connected("node-r", true).await;

    let (code, out, err) = cp.cli(&["node", "revoke", "node-r"]).await;
    assert_eq!(code, 0, "{out}{err}");
    cp.wait_connected("node-r", false).await;
    node.wait_log("revoked", 1).await;
    let log = node.proc.stderr.text();
    assert!(
        log.lines()
            .any(|l| l.contains("PermissionDenied") && l.contains("revoked")),
        "{log}"
    );
    // The open stream was closed by the control plane, not just refused on reconnect.
    let cp_log = cp.proc.stderr.text();
    assert!(
        cp_log.contains("ADS stream closed: node revoked"),
        "{cp_log}"
    );
    let (code, out, _) = cp.cli(&["node", "revoked"]).await;
    assert_eq!(code, 0);
    assert!(out.lines().any(|l| l.starts_with("node-r ")), "{out}");

    // The data plane is not torn down: still ready, still serving the last config.
    assert!(node.ready().await);
    let c = client();
    for _ in 0..20 {
        assert_eq!(who(&c, port, "/").await.as_deref(), Ok("A"));
    }
    // A change no longer reaches it.
    let refusals = count(&node.proc.stderr, "is revoked");
    cp.apply(dir.path(), &cfg(port, a.addr, b.addr, "b")).await;
    // Two more refused reconnects after the change was stored: a live stream would have
    // carried it by then (20 ms debounce).
    node.wait_log("is revoked", refusals + 2).await;
    for _ in 0..20 {
        assert_eq!(who(&c, port, "/").await.as_deref(), Ok("A"));
    }
    assert!(
        cp.status().await["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["nodeId"] != "node-r")
    );

    // Restarted (stored certificate still valid): refused, no config from the control
    // plane, and its saved last-known-good config is not served either, even after the
    // initial-fetch timeout: restarting does not undo a revocation.
    assert!(state.join("lkg.bin").is_file());
    node.stop().await;
    let node = Node::start(
        &cp,
        &state,
        "node-r",
        None,
        &["--initial-fetch-timeout", "2s"],
    )
    .await;
    node.wait_log("is revoked", 3).await;
    node.wait_log("not serving the last-known-good config", 1)
        .await;
    assert!(!node.ready().await, "a revoked node got ready");
    assert_eq!(count(&node.proc.stderr, "xDS config applied"), 0);
    assert_eq!(
        count(&node.proc.stderr, "serving the last-known-good config path"),
        0
    );
    drop(node);

    // Nor can it enroll again under the same id with a fresh token.
    let token = cp.bootstrap_token(&[]).await;
    let fresh = dir.path().join("fresh");
    let (code, err) = proxy_fails(&cp, &fresh, "node-r", &token).await;
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("revoked"), "{err}");
    nothing_written(&fresh);
}

/// 5. With 4 s node certificates, renewal at half-life under load: several certificates
///    over 10 s, the ADS stream never reopened, a route change still followed after the
///    first certificate expired, and zero failed requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_under_load_drops_nothing() {
    let (a, b) = (Echo::spawn("A"), Echo::spawn("B"));
    let dir = tmp();
    let cp = Control::start(&dir.path().join("data"), &["--node-cert-ttl", "4s"]);
    let port = free_port();
    cp.apply(dir.path(), &cfg(port, a.addr, b.addr, "a")).await;
    let token = cp.bootstrap_token(&[]).await;
    let state = dir.path().join("state");
    let enrolled = Instant::now();
    let node = Node::start(&cp, &state, "node-1", Some(&token), &[]).await;
    // The first credentials (renewal is 2 s away), to try once they expired.
    let first_cert = std::fs::read(state.join("node.crt")).unwrap();
    let first_key = std::fs::read(state.join("node.key")).unwrap();
    node.wait_ready().await;
    follows(port, "/", "A", 3, &node.proc).await;

    let load = Load::start(port, &["/"]);
    load.wait_more(50, &node.proc).await;
    let mut certs = BTreeSet::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(10) {
        if let Ok(pem) = std::fs::read_to_string(state.join("node.crt")) {
            certs.insert(pem);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        certs.len() >= 3,
        "only {} distinct node certificates in 10 s; proxy stderr:\n{}",
        certs.len(),
        node.proc.stderr.text()
    );
    assert!(enrolled.elapsed() > Duration::from_secs(4));
    assert!(certs.contains(&String::from_utf8(first_cert.clone()).unwrap()));
    // The expired first certificate no longer opens a connection.
    let expired = tls_h2_probe(cp.xds, mtls_config(&cp.ca_file(), &first_cert, &first_key)).await;
    assert!(expired.is_err(), "an expired node certificate was accepted");
    eprintln!("expired certificate: {expired:?}");

    // The stream opened with the first (now expired) certificate still carries changes.
    cp.apply(dir.path(), &cfg(port, a.addr, b.addr, "b")).await;
    follows(port, "/", "B", 10, &node.proc).await;
    load.wait_more(100, &node.proc).await;
    let (ok, failures) = load.finish().await;
    let renewed = count(&node.proc.stderr, "node certificate renewed");
    eprintln!(
        "{} certificates seen, {renewed} renewals logged; {ok} requests, {} failed",
        certs.len(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} failed requests (of {}), first: {:#?}",
        failures.len(),
        ok + failures.len() as u64,
        &failures[..failures.len().min(10)]
    );
    assert!(ok >= 1000, "only {ok} requests ran");
    assert!(renewed >= 3, "{}", node.proc.stderr.text());
    assert_eq!(
        count(&node.proc.stderr, "xDS stream open"),
        1,
        "the ADS stream was reopened:\n{}",
        node.proc.stderr.text()
    );
    // The stored (renewed) identity is the same node, and valid now.
    let creds = load_or_enroll(&IdentityOptions::new(&state), &[cp.xds.to_string()])
        .await
        .unwrap();
    assert_eq!(creds.node_id(), "node-1");
    assert!(creds.not_after() > std::time::SystemTime::now());
    let current = tls_h2_probe(cp.xds, (*creds.client_config()).clone()).await;
    assert!(matches!(current, Ok(n) if n > 0), "current: {current:?}");
}

/// 6. Admin API roles over HTTPS with the CA: 401 without or with a bad token, 403 for a
///    role too weak, and the CLI saying so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_enforces_roles() {
    let dir = tmp();
    let cp = Control::start(&dir.path().join("data"), &[]);
    let http = cp.https();
    let admin = cp.admin_token();
    let mint = |role: &'static str, name: &'static str| {
        let cp = &cp;
        async move {
            let (code, out, err) = cp
                .cli(&["token", "create", "--role", role, "--name", name])
                .await;
            assert_eq!(code, 0, "{err}");
            out.trim().to_owned()
        }
    };
    let viewer = mint("viewer", "alice").await;
    let editor = mint("editor", "bob").await;
    let gateways = cp.url("/api/v1/gateways");
    let apply = cp.url("/api/v1/apply");
    let tokens = cp.url("/api/v1/tokens");
    let gw = |name: &str| http_gateway(free_port()).replace("name: gw", &format!("name: {name}"));
    let new_token = json!({"kind": "api", "role": "viewer", "name": "x"}).to_string();

    let r = http.get(&gateways).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let challenge = r.headers().get("www-authenticate").cloned();
    assert!(
        challenge.is_some_and(|c| c.to_str().unwrap().starts_with("Bearer")),
        "no WWW-Authenticate: Bearer"
    );
    let r = http
        .get(&gateways)
        .bearer_auth("bpt_garbage")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    assert!(r.headers().contains_key("www-authenticate"));
    let r = http
        .post(&apply)
        .bearer_auth("nonsense")
        .body(gw("nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);

    // viewer: reads, cannot apply (and nothing is stored).
    let r = http
        .get(&gateways)
        .bearer_auth(&viewer)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let r = http
        .post(&apply)
        .bearer_auth(&viewer)
        .body(gw("by-viewer"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    let r = http
        .get(cp.url("/api/v1/gateways/default/by-viewer"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404, "a refused apply stored something");

    // editor: applies, cannot mint tokens or revoke nodes.
    let r = http
        .post(&apply)
        .bearer_auth(&editor)
        .body(gw("by-editor"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200, "{}", r.text().await.unwrap());
    for url in [tokens.clone(), cp.url("/api/v1/nodes/x/revoke")] {
        let r = http
            .post(&url)
            .bearer_auth(&editor)
            .body(new_token.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 403, "{url}");
    }

    // admin: mints.
    let r = http
        .post(&tokens)
        .bearer_auth(&admin)
        .body(new_token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let body: Value = r.json().await.unwrap();
    assert!(body["token"].is_string(), "{body}");

    // The CLI with a viewer token: exit 1, and it says the role is too weak.
    let file = dir.path().join("gw.yaml");
    std::fs::write(&file, gw("by-cli")).unwrap();
    let (code, _, err) = run_biplane(
        "info",
        vec![
            "apply".into(),
            "-f".into(),
            file.to_str().unwrap().into(),
            "--server".into(),
            cp.url(""),
            "--token".into(),
            viewer.clone(),
            "--ca-file".into(),
            cp.ca_file().to_str().unwrap().into(),
        ],
    )
    .await;
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("role viewer") && err.contains("needs editor"),
        "the CLI does not say the role is too weak: {err}"
    );

    // Refusals are logged with the token's name, never the token.
    let log = cp.proc.stderr.text();
    assert!(
        log.lines()
            .any(|l| l.contains("alice") && l.contains("/api/v1/apply")),
        "the refused apply is not logged:\n{log}"
    );
    for t in [&viewer, &editor, &admin] {
        assert!(!log.contains(t.as_str()), "a token is in the log:\n{log}");
    }
}

/// 7. Plaintext and foreign clients are refused on both ports; `--insecure` warns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_and_foreign_clients_are_refused() {
    crypto();
    let dir = tmp();
    let cp = Control::start(&dir.path().join("data"), &[]);
    cp.apply(dir.path(), &http_gateway(free_port())).await;

    // Plain HTTP to the admin port.
    let plain = client()
        .get(format!("http://{}/healthz", cp.api))
        .send()
        .await;
    assert!(
        plain.as_ref().map_or(true, |r| !r.status().is_success()),
        "plaintext served on the admin port: {plain:?}"
    );

    // Plaintext gRPC ADS to the xDS port.
    let refused = match tonic::transport::Endpoint::from_shared(format!("http://{}", cp.xds))
        .unwrap()
        .connect()
        .await
    {
        Err(e) => Err(format!("connect: {e}")),
        Ok(channel) => ads_on(channel, false, "n", "gw").await,
    };
    assert!(refused.is_err(), "plaintext ADS served: {refused:?}");

    // A plaintext proxy never gets a config and says why.
    let state = dir.path().join("plain");
    let node = Node::start(
        &cp,
        &state,
        "plain",
        None,
        &["--insecure", "--gateway", "gw"],
    )
    .await;
    node.wait_log("xDS stream to the control plane failed", 3)
        .await;
    assert!(!node.ready().await, "a plaintext proxy got ready");
    assert_eq!(count(&node.proc.stderr, "xDS config applied"), 0);
    assert!(node.proc.stderr.text().contains("WARNING"));
    drop(node);

    // A client certificate from a foreign CA, with a valid-looking identity: refused in
    // the handshake. The same probe with an enrolled node's credentials is answered.
    let foreign_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let foreign_ca = ca_params.self_signed(&foreign_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, &foreign_key);
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let mut leaf_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    leaf_params.subject_alt_names = vec![rcgen::SanType::URI(
        "spiffe://biplane.local/gateway/default/gw/node/evil"
            .try_into()
            .unwrap(),
    )];
    let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();
    let chain = format!("{}{}", leaf.pem(), foreign_ca.pem());
    let foreign = mtls_config(
        &cp.ca_file(),
        chain.as_bytes(),
        leaf_key.serialize_pem().as_bytes(),
    );
    let got = tls_h2_probe(cp.xds, foreign).await;
    assert!(got.is_err(), "a foreign-CA client certificate was accepted");
    eprintln!("foreign CA: {got:?}");

    let token = cp.bootstrap_token(&[]).await;
    let mut opts = IdentityOptions::new(dir.path().join("enrolled"));
    opts.node_id = Some("enrolled".to_owned());
    opts.token = Some(token);
    let creds = load_or_enroll(&opts, &[cp.xds.to_string()]).await.unwrap();
    let got = tls_h2_probe(cp.xds, (*creds.client_config()).clone()).await;
    assert!(matches!(got, Ok(n) if n > 0), "enrolled node: {got:?}");

    // The control plane logged each refused handshake, on both ports.
    let log = cp.proc.stderr.text();
    for port in ["listener=\"xDS\"", "listener=\"admin API\""] {
        assert!(
            log.lines()
                .any(|l| l.contains("TLS handshake refused") && l.contains(port)),
            "no refused handshake logged for {port}:\n{log}"
        );
    }
    assert!(
        log.lines()
            .any(|l| l.contains("TLS handshake refused") && !l.contains("InvalidContentType")),
        "the foreign-CA handshake is not logged:\n{log}"
    );

    // `--insecure` is explicit and loud.
    let insecure = Control::start(&dir.path().join("insecure"), &["--insecure"]);
    let warnings: Vec<String> = insecure
        .proc
        .stderr
        .snapshot()
        .into_iter()
        .filter(|l| l.starts_with("WARNING"))
        .collect();
    assert!(
        warnings.iter().any(|l| l.contains("--insecure")),
        "no WARNING line:\n{}",
        insecure.proc.stderr.text()
    );
}
