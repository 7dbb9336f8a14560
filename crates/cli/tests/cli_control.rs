//! End-to-end tests of the kubectl-style client (`apply`, `get`, `delete`, `diff`,
//! `status`) through the real `biplane` binary against a running `biplane control` on
//! `127.0.0.1:0` ports, each test with its own data directory.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a panic is a failure"
)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Instant;

use common::*;
use serde_json::Value;

/// A running `biplane control` with its data directory.
struct Control {
    /// Kept for its drop (kills the server) and its stderr in failure messages.
    proc: Proc,
    api: SocketAddr,
    dir: tempfile::TempDir,
}

impl Control {
    fn start() -> Control {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let proc = Proc::spawn(&[
            "control",
            "--insecure",
            "--api-addr",
            "127.0.0.1:0",
            "--xds-addr",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().unwrap(),
        ]);
        let start = Instant::now();
        let api = loop {
            let found = proc.stderr.snapshot().iter().find_map(|l| {
                let rest = &l[l.find("api listening on ")? + "api listening on ".len()..];
                rest.split_whitespace()
                    .next()?
                    .trim_matches(|c| c == '"' || c == ',')
                    .parse::<SocketAddr>()
                    .ok()
            });
            if let Some(a) = found {
                break a;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "`biplane control` never said `api listening on`; stderr:\n{}",
                proc.stderr.text()
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        Control { proc, api, dir }
    }

    /// The server's log so far, for failure messages.
    fn log(&self) -> String {
        self.proc.stderr.text()
    }

    fn server(&self) -> String {
        format!("http://{}", self.api)
    }

    /// Writes `text` to `name` in this test's temp dir; returns the path.
    fn file(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Runs `biplane ARGS --server URL` to completion.
    fn cli(&self, args: &[&str]) -> Out {
        self.cli_stdin(args, None)
    }

    fn cli_stdin(&self, args: &[&str], stdin: Option<&str>) -> Out {
        let server = self.server();
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--server", &server]);
        let mut out = run(&all, stdin);
        out.server_log = self.log();
        out
    }
}

/// What a finished CLI run printed.
#[derive(Debug)]
struct Out {
    code: i32,
    stdout: String,
    stderr: String,
    /// The control plane's log at the end of the run (shown when an assertion fails).
    server_log: String,
}

impl Out {
    #[track_caller]
    fn ok(self) -> Out {
        assert_eq!(self.code, 0, "expected success: {self:#?}");
        self
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:#?}"))
    }
}

fn run(args: &[&str], stdin: Option<&str>) -> Out {
    let mut p = Proc::spawn_full(args, "warn", stdin.map(str::as_bytes));
    let status = p.wait_exit(DEADLINE);
    p.stdout.wait_eof();
    p.stderr.wait_eof();
    let text = |l: &Lines| {
        let lines = l.snapshot();
        if lines.is_empty() {
            String::new()
        } else {
            lines.join("\n") + "\n"
        }
    };
    Out {
        code: status.code().unwrap_or(-1),
        stdout: text(&p.stdout),
        stderr: text(&p.stderr),
        server_log: String::new(),
    }
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

// ------------------------------------------------------------------ resources

const GATEWAY: &str = "\
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: gw
spec:
  gatewayClassName: biplane
  listeners:
  - name: http
    port: 8080
    protocol: HTTP
";

fn backend_doc(name: &str, port: u16) -> String {
    format!(
        "apiVersion: biplane.dev/v1alpha1
kind: Backend
metadata:
  name: {name}
spec:
  endpoints:
  - address: 127.0.0.1
    port: {port}
"
    )
}

fn route_doc(name: &str, host: &str, backend: &str, path: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: {name}
spec:
  parentRefs:
  - name: gw
  hostnames:
  - {host}
  rules:
  - matches:
    - path:
        type: PathPrefix
        value: {path}
    backendRefs:
    - group: biplane.dev
      kind: Backend
      name: {backend}
"
    )
}

fn docs(parts: &[String]) -> String {
    parts.join("---\n")
}

fn base_set(host: &str) -> String {
    docs(&[
        GATEWAY.to_owned(),
        backend_doc("api", 9001),
        route_doc("web", host, "api", "/"),
    ])
}

// ------------------------------------------------------------------ tests

#[test]
fn apply_reports_created_unchanged_configured_and_get_shows_it() {
    let cp = Control::start();
    let file = cp.file("set.yaml", &base_set("a.example"));
    let out = cp.cli(&["apply", "-f", p(&file)]).ok();
    assert_eq!(
        out.stdout,
        "gateway.gateway.networking.k8s.io/gw created\n\
         backend.biplane.dev/api created\n\
         httproute.gateway.networking.k8s.io/web created\n",
        "{out:#?}"
    );
    let out = cp.cli(&["apply", "-f", p(&file)]).ok();
    assert_eq!(out.stdout.matches(" unchanged\n").count(), 3, "{out:#?}");

    let file = cp.file("set.yaml", &base_set("b.example"));
    let out = cp.cli(&["apply", "-f", p(&file)]).ok();
    assert!(
        out.stdout
            .contains("httproute.gateway.networking.k8s.io/web configured\n"),
        "{out:#?}"
    );
    assert!(
        out.stdout.contains("backend.biplane.dev/api unchanged\n"),
        "{out:#?}"
    );

    // Table: a header, the route with its hostname and status columns, an age.
    let out = cp.cli(&["get", "httproutes"]).ok();
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{out:#?}");
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME",
            "HOSTNAMES",
            "ACCEPTED",
            "RESOLVED",
            "PROGRAMMED",
            "AGE"
        ]
    );
    let row: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(&row[..3], ["web", "b.example", "True"], "{out:#?}");
    assert_eq!(row[3], "True", "the Backend exists: refs resolve; {out:#?}");

    let out = cp.cli(&["get", "backends"]).ok();
    assert!(out.stdout.contains("127.0.0.1:9001"), "{out:#?}");
    assert!(out.stdout.contains("RoundRobin"), "{out:#?}");
    let out = cp.cli(&["get", "gtw", "gw"]).ok();
    assert!(out.stdout.contains("8080/HTTP"), "{out:#?}");

    // One resource as JSON and YAML, with the server-set metadata.
    let doc = cp
        .cli(&["get", "httproute", "web", "-o", "json"])
        .ok()
        .json();
    assert_eq!(doc["kind"], "HTTPRoute");
    assert_eq!(doc["metadata"]["name"], "web");
    assert_eq!(doc["spec"]["hostnames"][0], "b.example");
    assert!(doc["metadata"]["resourceVersion"].is_string(), "{doc}");
    let out = cp
        .cli(&["get", "httproute", "default/web", "-o", "yaml"])
        .ok();
    let yaml: Value = serde_saphyr::from_str(&out.stdout).unwrap();
    assert_eq!(yaml["spec"], doc["spec"], "{out:#?}");
    assert_eq!(
        yaml["metadata"]["resourceVersion"],
        doc["metadata"]["resourceVersion"]
    );

    // Lists.
    let list = cp.cli(&["get", "httproutes", "-o", "json"]).ok().json();
    assert_eq!(list["kind"], "List");
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    let out = cp.cli(&["get", "backends,gateways", "-o", "json"]);
    assert_eq!(out.code, 1, "an unknown kind is an error: {out:#?}");
    let out = cp.cli(&["get", "httproutes", "-o", "name"]).ok();
    assert_eq!(out.stdout, "httproute.gateway.networking.k8s.io/web\n");
    let out = cp.cli(&["get", "httproutes", "-A"]).ok();
    assert!(out.stdout.starts_with("NAMESPACE "), "{out:#?}");
    let out = cp.cli(&["get", "httproutes", "-n", "other"]).ok();
    assert_eq!(out.stdout, "");
    assert!(
        out.stderr
            .contains("No resources found in other namespace."),
        "{out:#?}"
    );

    // A TLS Secret: the core group prints bare, the private key is redacted unless asked.
    let c = cert(&["a.example"]);
    let secret = cp.file("secret.yaml", &tls_secret("tls", &c.cert_pem, &c.key_pem));
    let out = cp.cli(&["apply", "-f", p(&secret)]).ok();
    assert_eq!(out.stdout, "secret/tls created\n");
    let out = cp.cli(&["get", "secrets"]).ok();
    let row: Vec<&str> = out
        .stdout
        .lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(&row[..3], ["tls", "kubernetes.io/tls", "2"], "{out:#?}");
    let doc = cp.cli(&["get", "secret", "tls", "-o", "json"]).ok().json();
    assert_eq!(doc["data"]["tls.key"], "<redacted>", "{doc:#}");
    let doc = cp
        .cli(&["get", "secret", "tls", "-o", "json", "--show-secrets"])
        .ok()
        .json();
    assert_ne!(doc["data"]["tls.key"], "<redacted>", "{doc:#}");

    // Missing: kubectl's message, exit 1.
    let out = cp.cli(&["get", "httproute", "missing"]);
    assert_eq!(out.code, 1, "{out:#?}");
    assert_eq!(
        out.stderr.trim(),
        "Error from server (NotFound): httproutes \"missing\" not found"
    );
    let out = cp.cli(&["get", "widgets"]);
    assert_eq!(out.code, 1, "{out:#?}");
    assert!(out.stderr.contains("widgets"), "{out:#?}");
}

#[test]
fn invalid_input_is_refused_whole_with_every_error() {
    let cp = Control::start();
    let good = cp.file("good.yaml", &base_set("a.example"));
    cp.cli(&["apply", "-f", p(&good)]).ok();

    // Document 1 is a valid change, 2 and 3 are invalid: nothing may be stored.
    let bad = cp.file(
        "bad.yaml",
        &docs(&[
            route_doc("web", "changed.example", "api", "/"),
            route_doc("other", "o.example", "api", "no-slash"),
            backend_doc("zero", 0),
        ]),
    );
    let out = cp.cli(&["apply", "-f", p(&bad)]);
    assert_eq!(out.code, 1, "{out:#?}");
    assert_eq!(out.stdout, "");
    let errors: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.starts_with("error: "))
        .collect();
    assert!(errors.len() >= 3, "two errors and a summary: {out:#?}");
    let bad_label = p(&bad);
    assert!(
        errors.iter().any(|l| l.starts_with(&format!(
            "error: {bad_label}: document 2 (HTTPRoute default/other): spec.rules[0].matches[0].path.value: "
        ))),
        "{out:#?}"
    );
    assert!(
        errors.iter().any(|l| l.starts_with(&format!(
            "error: {bad_label}: document 3 (Backend default/zero): spec.endpoints[0].port: "
        ))),
        "{out:#?}"
    );
    assert!(out.stderr.contains("nothing was applied"), "{out:#?}");
    // The old state stands.
    let doc = cp
        .cli(&["get", "httproute", "web", "-o", "json"])
        .ok()
        .json();
    assert_eq!(doc["spec"]["hostnames"][0], "a.example");
    assert_eq!(cp.cli(&["get", "httproute", "other"]).code, 1);
    assert_eq!(cp.cli(&["get", "backend", "zero"]).code, 1);

    // With several files, errors name the file and its own document number.
    let dir = cp.dir.path().join("many");
    cp.file(
        "many/a.yaml",
        &docs(&[GATEWAY.to_owned(), backend_doc("api", 9001)]),
    );
    cp.file(
        "many/b.yaml",
        &docs(&[backend_doc("fine", 9002), backend_doc("zero", 0)]),
    );
    cp.file("many/notes.txt", "not a resource");
    let out = cp.cli(&["apply", "-f", p(&dir)]);
    assert_eq!(out.code, 1, "{out:#?}");
    let b_label = dir.join("b.yaml");
    assert!(
        out.stderr.contains(&format!(
            "error: {}: document 2 (Backend default/zero)",
            p(&b_label)
        )),
        "{out:#?}"
    );
    assert_eq!(
        cp.cli(&["get", "backend", "fine"]).code,
        1,
        "nothing stored"
    );

    // A stale metadata.resourceVersion: kubectl's Conflict, nothing stored.
    let stale = route_doc("web", "stale.example", "api", "/").replace(
        "  name: web\n",
        "  name: web\n  resourceVersion: \"999999\"\n",
    );
    let stale = cp.file("stale.yaml", &stale);
    let out = cp.cli(&["apply", "-f", p(&stale)]);
    assert_eq!(out.code, 1, "{out:#?}");
    assert!(
        out.stderr.starts_with("Error from server (Conflict): "),
        "{out:#?}"
    );
    let doc = cp
        .cli(&["get", "httproute", "web", "-o", "json"])
        .ok()
        .json();
    assert_eq!(doc["spec"]["hostnames"][0], "a.example");

    // Unparseable YAML is an error too.
    let broken = cp.file("broken.yaml", "kind: [unclosed\n");
    let out = cp.cli(&["apply", "-f", p(&broken)]);
    assert_eq!(out.code, 1, "{out:#?}");
    assert!(out.stderr.starts_with("error: "), "{out:#?}");

    // An empty file: kubectl's "no objects passed to apply".
    let empty = cp.file("empty.yaml", "# nothing\n");
    let out = cp.cli(&["apply", "-f", p(&empty)]);
    assert_eq!(out.code, 1, "{out:#?}");
    assert!(
        out.stderr.contains("no objects passed to apply"),
        "{out:#?}"
    );
}

#[test]
fn dry_run_stdin_and_directories() {
    let cp = Control::start();
    let out = cp
        .cli_stdin(
            &["apply", "--dry-run", "-f", "-"],
            Some(&base_set("a.example")),
        )
        .ok();
    assert!(
        out.stdout
            .contains("httproute.gateway.networking.k8s.io/web created (dry run)\n"),
        "{out:#?}"
    );
    assert_eq!(
        cp.cli(&["get", "httproute", "web"]).code,
        1,
        "dry run stores nothing"
    );

    let out = cp
        .cli_stdin(&["apply", "-f", "-"], Some(&base_set("a.example")))
        .ok();
    assert!(out.stdout.contains("/web created\n"), "{out:#?}");
    cp.cli(&["get", "httproute", "web"]).ok();

    // A directory: every *.yaml/*.yml/*.json in it, JSON included.
    let dir = cp.dir.path().join("dir");
    cp.file("dir/1-backend.yml", &backend_doc("b1", 9101));
    let b2: Value = serde_json::json!({
        "apiVersion": "biplane.dev/v1alpha1",
        "kind": "Backend",
        "metadata": {"name": "b2"},
        "spec": {"endpoints": [{"address": "127.0.0.1", "port": 9102}]}
    });
    cp.file("dir/2-backend.json", &serde_json::to_string(&b2).unwrap());
    cp.file(
        "dir/3-route.yaml",
        &route_doc("r3", "r3.example", "b1", "/r3"),
    );
    let out = cp.cli(&["apply", "-f", p(&dir)]).ok();
    assert_eq!(
        out.stdout,
        "backend.biplane.dev/b1 created\n\
         backend.biplane.dev/b2 created\n\
         httproute.gateway.networking.k8s.io/r3 created\n",
        "{out:#?}"
    );
    let names = cp.cli(&["get", "backends", "-o", "name"]).ok();
    assert_eq!(
        names.stdout,
        "backend.biplane.dev/api\nbackend.biplane.dev/b1\nbackend.biplane.dev/b2\n"
    );
}

#[test]
fn diff_exit_codes_follow_kubectl() {
    let cp = Control::start();
    let file = cp.file("set.yaml", &base_set("a.example"));
    // Everything is new: a diff and exit 1.
    let out = cp.cli(&["diff", "-f", p(&file)]);
    assert_eq!(out.code, 1, "{out:#?}");
    assert!(out.stdout.contains("+"), "{out:#?}");
    assert!(out.stdout.contains("a.example"), "{out:#?}");

    cp.cli(&["apply", "-f", p(&file)]).ok();
    let out = cp.cli(&["diff", "-f", p(&file)]);
    assert_eq!(out.code, 0, "{out:#?}");
    assert_eq!(out.stdout, "");

    let changed = cp.file("changed.yaml", &base_set("b.example"));
    let out = cp.cli(&["diff", "-f", p(&changed)]);
    assert_eq!(out.code, 1, "{out:#?}");
    assert!(
        out.stdout
            .lines()
            .any(|l| l.starts_with('-') && l.contains("a.example")),
        "{out:#?}"
    );
    assert!(
        out.stdout
            .lines()
            .any(|l| l.starts_with('+') && l.contains("b.example")),
        "{out:#?}"
    );
    // The diff changed nothing.
    let doc = cp
        .cli(&["get", "httproute", "web", "-o", "json"])
        .ok()
        .json();
    assert_eq!(doc["spec"]["hostnames"][0], "a.example");

    // Errors are exit 2: invalid input, unreachable server.
    let bad = cp.file("bad.yaml", &route_doc("x", "x.example", "api", "no-slash"));
    let out = cp.cli(&["diff", "-f", p(&bad)]);
    assert_eq!(out.code, 2, "{out:#?}");
    assert!(
        out.stderr.contains("spec.rules[0].matches[0].path.value"),
        "{out:#?}"
    );
    let out = run(
        &[
            "diff",
            "-f",
            p(&file),
            "--server",
            &format!("http://127.0.0.1:{}", free_port()),
        ],
        None,
    );
    assert_eq!(out.code, 2, "{out:#?}");
    assert!(
        out.stderr.contains("cannot reach the control plane"),
        "{out:#?}"
    );
}

#[test]
fn delete_by_name_and_by_file() {
    let cp = Control::start();
    let file = cp.file("set.yaml", &base_set("a.example"));
    cp.cli(&["apply", "-f", p(&file)]).ok();

    let out = cp.cli(&["delete", "httproute", "web"]).ok();
    assert_eq!(
        out.stdout,
        "httproute.gateway.networking.k8s.io \"web\" deleted\n"
    );
    assert_eq!(cp.cli(&["get", "httproute", "web"]).code, 1);
    let out = cp.cli(&["delete", "httproute", "web"]);
    assert_eq!(out.code, 1, "{out:#?}");
    assert_eq!(
        out.stderr.trim(),
        "Error from server (NotFound): httproutes \"web\" not found"
    );
    cp.cli(&["delete", "httproute", "web", "--ignore-not-found"])
        .ok();

    // -f deletes what the file names; the route is gone already: an error unless ignored.
    let out = cp.cli(&["delete", "-f", p(&file)]);
    assert_eq!(out.code, 1, "{out:#?}");
    assert!(
        out.stdout
            .contains("gateway.gateway.networking.k8s.io \"gw\" deleted\n"),
        "{out:#?}"
    );
    assert!(
        out.stdout.contains("backend.biplane.dev \"api\" deleted\n"),
        "{out:#?}"
    );
    assert!(
        out.stderr
            .contains("Error from server (NotFound): httproutes \"web\" not found"),
        "{out:#?}"
    );
    assert_eq!(cp.cli(&["get", "backend", "api"]).code, 1);
    let out = cp
        .cli(&["delete", "-f", p(&file), "--ignore-not-found"])
        .ok();
    assert_eq!(out.stdout, "");

    // `ns/name` and -n agree; a kind without names is a usage error.
    cp.cli(&["apply", "-f", p(&file)]).ok();
    cp.cli(&["delete", "backend", "default/api", "-n", "default"])
        .ok();
    assert_eq!(cp.cli(&["delete", "backend"]).code, 1);
}

#[test]
fn status_and_unreachable_server() {
    let cp = Control::start();
    // No data-plane node connected: the header and no rows.
    let out = cp.cli(&["status"]).ok();
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{out:#?}");
    assert!(lines[0].starts_with("NODE "), "{out:#?}");
    for col in [
        "GATEWAY",
        "CONNECTED",
        "CDS",
        "EDS",
        "LDS",
        "RDS",
        "SDS",
        "LAG",
    ] {
        assert!(lines[0].contains(col), "{col}: {out:#?}");
    }
    let json = cp.cli(&["status", "-o", "json"]).ok().json();
    assert_eq!(json["nodes"], serde_json::json!([]), "{json}");

    // BIPLANE_SERVER is read when --server is absent.
    let out = std::process::Command::new(BIN)
        .args(["get", "gateways"])
        .env("BIPLANE_SERVER", cp.server())
        .env("BIPLANE_LOG", "warn")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");

    // Nothing listening: a plain error naming the server, exit 1.
    let dead = format!("http://127.0.0.1:{}", free_port());
    for args in [
        vec!["status"],
        vec!["get", "gateways"],
        vec!["delete", "gateway", "gw"],
    ] {
        let mut all = args.clone();
        all.extend(["--server", &dead]);
        let out = run(&all, None);
        assert_eq!(out.code, 1, "{args:?}: {out:#?}");
        assert!(
            out.stderr.starts_with(&format!(
                "error: cannot reach the control plane at {dead}: "
            )),
            "{args:?}: {out:#?}"
        );
    }
}

// ------------------------------------------------------------------ fleet status

const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const LDS: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";

/// A minimal State-of-the-World ADS node: subscribes to CDS (ACKs it), then to LDS, which it
/// ACKs or, with `nack`, refuses with that message. Returns once both answers are sent; the
/// stream stays open while the returned guard lives.
async fn sotw_node(
    xds: SocketAddr,
    id: &str,
    nack: Option<&str>,
) -> (
    tokio::sync::mpsc::Sender<envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest>,
    tonic::Streaming<envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse>,
) {
    use envoy_types::pb::envoy::config::core::v3::Node;
    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
    use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
    use envoy_types::pb::google::rpc::Status;

    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{xds}"))
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let node = Node {
        id: id.to_owned(),
        cluster: "gw".to_owned(),
        ..Default::default()
    };
    let request = |type_url: &str| DiscoveryRequest {
        node: Some(node.clone()),
        type_url: type_url.to_owned(),
        ..Default::default()
    };
    tx.send(request(CDS)).await.unwrap();
    let mut responses = client
        .stream_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let next = async |responses: &mut tonic::Streaming<_>| {
        tokio::time::timeout(DEADLINE, responses.message())
            .await
            .expect("no xDS response in time")
            .unwrap()
            .expect("the xDS stream ended")
    };
    let cds: envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse =
        next(&mut responses).await;
    assert_eq!(cds.type_url, CDS);
    tx.send(DiscoveryRequest {
        version_info: cds.version_info.clone(),
        response_nonce: cds.nonce.clone(),
        ..request(CDS)
    })
    .await
    .unwrap();
    tx.send(request(LDS)).await.unwrap();
    let lds = next(&mut responses).await;
    assert_eq!(lds.type_url, LDS);
    let answer = match nack {
        None => DiscoveryRequest {
            version_info: lds.version_info.clone(),
            response_nonce: lds.nonce.clone(),
            ..request(LDS)
        },
        Some(message) => DiscoveryRequest {
            version_info: String::new(),
            response_nonce: lds.nonce.clone(),
            error_detail: Some(Status {
                code: 3,
                message: message.to_owned(),
                details: Vec::new(),
            }),
            ..request(LDS)
        },
    };
    tx.send(answer).await.unwrap();
    (tx, responses)
}

/// `biplane status -o json` until `done` holds for it.
async fn status_until(server: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let server = server.to_owned();
        let out = tokio::task::spawn_blocking(move || {
            run(&["status", "-o", "json", "--server", &server], None)
        })
        .await
        .unwrap();
        let body = out.json();
        if done(&body) {
            return body;
        }
        assert!(start.elapsed() < DEADLINE, "never {what}: {body:#}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

fn node<'a>(status: &'a Value, id: &str) -> Option<&'a Value> {
    status["nodes"]
        .as_array()?
        .iter()
        .find(|n| n["nodeId"] == id)
}

fn listener_entry(node: &Value) -> Option<&Value> {
    node["types"]
        .as_array()?
        .iter()
        .find(|t| t["type"] == "Listener")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_acks_nacks_and_their_messages() {
    let cp = Control::start();
    let xds: SocketAddr = cp.proc.stderr.wait_for("`xds listening on`", |l| {
        let rest = &l[l.find("xds listening on ")? + "xds listening on ".len()..];
        rest.split_whitespace().next()?.parse().ok()
    });
    let file = cp.file("set.yaml", &base_set("a.example"));
    cp.cli(&["apply", "-f", p(&file)]).ok();
    let server = cp.server();

    let _good = sotw_node(xds, "node-good", None).await;
    let _bad = sotw_node(
        xds,
        "node-bad",
        Some("listener \"http\": refused by the test"),
    )
    .await;
    status_until(&server, "one node ACKed LDS and the other NACKed it", |s| {
        let acked = node(s, "node-good")
            .and_then(listener_entry)
            .is_some_and(|t| t["ackedVersion"].is_string());
        let nacked = node(s, "node-bad")
            .and_then(listener_entry)
            .is_some_and(|t| t["lastNack"].is_object());
        acked && nacked
    })
    .await;

    let out = tokio::task::spawn_blocking(move || run(&["status", "--server", &server], None))
        .await
        .unwrap()
        .ok();
    let lines: Vec<&str> = out.stdout.lines().collect();
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NODE",
            "GATEWAY",
            "PROTOCOL",
            "CONNECTED",
            "CDS",
            "EDS",
            "LDS",
            "RDS",
            "SDS",
            "LAG"
        ],
        "{out:#?}"
    );
    // Rows sorted by gateway then node; `ok VERSION` cells take two words.
    let bad = lines[1];
    let good = lines[2];
    assert!(bad.starts_with("node-bad "), "{out:#?}");
    assert!(good.starts_with("node-good "), "{out:#?}");
    assert!(
        bad.contains("default/gw") || bad.contains(" gw "),
        "{out:#?}"
    );
    assert!(bad.contains(" sotw "), "{out:#?}");
    assert_eq!(
        good.matches(" ok ").count(),
        2,
        "CDS and LDS ACKed: {out:#?}"
    );
    assert_eq!(bad.matches(" ok ").count(), 1, "CDS ACKed: {out:#?}");
    let cells: Vec<&str> = good.split_whitespace().collect();
    assert_eq!(cells[4], "ok", "{out:#?}");
    assert_eq!(cells[6], "-", "EDS was never subscribed: {out:#?}");
    assert_eq!(cells[7], "ok", "{out:#?}");
    assert_eq!(&cells[9..11], ["-", "-"], "RDS, SDS: {out:#?}");
    assert!(cells[11].ends_with("ms"), "LAG: {out:#?}");
    assert!(bad.contains(" NACK "), "{out:#?}");
    let section = out
        .stdout
        .split_once("\nLAST NACKS\n")
        .unwrap_or_else(|| panic!("no LAST NACKS section: {out:#?}"))
        .1;
    assert!(section.starts_with("node-bad LDS version "), "{out:#?}");
    assert!(
        section.contains("  listener \"http\": refused by the test\n"),
        "{out:#?}"
    );
    assert!(!section.contains("node-good"), "{out:#?}");
}
