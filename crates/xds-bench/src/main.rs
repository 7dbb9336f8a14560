//! `biplane-xds-bench`: xDS fan-out benchmark. Connects N simulated ADS clients (real gRPC
//! streams, SotW or Delta) to a Biplane control plane, applies a base configuration, then
//! K changes one at a time, and measures per node the time from the apply's HTTP 200 to
//! that node's ACK of the new version, plus the control plane's RSS per connected node
//! and its CPU time during the change phase. Plaintext runs (`--insecure` control plane)
//! share HTTP/2 connections between nodes; mTLS runs (the secure default) enroll every
//! node with a bootstrap token first and give each its own TLS connection and client
//! certificate, as a real fleet. One JSON line per run on stdout; a Markdown table on
//! stderr (and `--md-out`).

mod client;
mod control;
mod mtls;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;
use client::{I_RDS, Protocol, Slot};
use control::{Api, Control, Security, Target, Trust};
use serde_json::{Value, json};
use tonic::transport::{Channel, Endpoint};

/// The Gateway every simulated node belongs to (`node.cluster`).
const GATEWAY: &str = "default/gw";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ProtocolArg {
    Delta,
    Sotw,
    Both,
}

/// xDS fan-out benchmark against a Biplane control plane.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Simulated nodes; a comma-separated list runs each size in turn (e.g. 100,1000,5000).
    #[arg(long, value_delimiter = ',', default_value = "100")]
    nodes: Vec<usize>,
    /// ADS flavour of the simulated nodes.
    #[arg(long, value_enum, default_value = "both")]
    protocol: ProtocolArg,
    /// How the control plane is secured; a comma-separated list runs each in turn.
    /// `plain`: `--insecure`, nodes share plaintext HTTP/2 connections
    /// (`--streams-per-connection`). `mtls`: the secure default, every node enrolls with
    /// a bootstrap token and has its own TLS connection and client certificate.
    #[arg(long, value_enum, value_delimiter = ',', default_values = ["plain", "mtls"])]
    security: Vec<Security>,
    /// Shorthand for `--security mtls`.
    #[arg(long, conflicts_with = "security")]
    mtls: bool,
    /// mTLS: `Enroll` calls in flight at once (enrollment precedes the measurement).
    #[arg(long, default_value_t = 16)]
    enroll_concurrency: usize,
    /// Connections being opened (TCP + TLS handshake) at once.
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,
    /// Changes applied (and measured) one at a time after the initial sync.
    #[arg(long, default_value_t = 5)]
    changes: usize,
    /// An already running control plane: `API_ADDR,XDS_ADDR` (no process is started).
    #[arg(long, conflicts_with_all = ["in_process", "biplane_bin"])]
    control: Option<String>,
    /// With `--control`: the control plane's pid, to read its RSS and CPU time.
    #[arg(long, requires = "control")]
    control_pid: Option<u32>,
    /// With `--control` and mTLS: its CA certificate (`<data-dir>/ca/ca.crt`).
    #[arg(long, requires_all = ["control", "control_token_file"])]
    control_ca: Option<PathBuf>,
    /// With `--control` and mTLS: a file holding an admin token (`<data-dir>/admin-token`).
    #[arg(long, requires_all = ["control", "control_ca"])]
    control_token_file: Option<PathBuf>,
    /// Run the control plane inside this process (its RSS then includes the clients).
    #[arg(long)]
    in_process: bool,
    /// The `biplane` binary to run `biplane control` from (default: next to this binary,
    /// else target/release/biplane, else target/debug/biplane).
    #[arg(long)]
    biplane_bin: Option<PathBuf>,
    /// Append the `biplane control` child's log (stderr) to this file.
    #[arg(long)]
    control_log: Option<PathBuf>,
    /// The control plane's `--debounce` (default: its own default, 100ms).
    #[arg(long)]
    debounce: Option<String>,
    /// Plaintext runs: ADS streams per HTTP/2 connection (the server allows 64 concurrent
    /// streams; mTLS runs always use one connection per node).
    #[arg(long, default_value_t = 50)]
    streams_per_connection: usize,
    /// Give up waiting for a sync or a change after this many seconds.
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
    /// Write all runs as a JSON document here.
    #[arg(long)]
    json_out: Option<PathBuf>,
    /// Write the Markdown table here.
    #[arg(long)]
    md_out: Option<PathBuf>,
    /// A few-second sanity run: 1 change, both protocols, 20 nodes in plaintext and 10
    /// over mTLS (of the `--security` modes asked for).
    #[arg(long)]
    smoke: bool,
}

/// The node counts of a `--smoke` run per security mode.
const SMOKE_NODES_PLAIN: usize = 20;
const SMOKE_NODES_MTLS: usize = 10;

fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if args.mtls {
        args.security = vec![Security::Mtls];
    }
    if args.smoke {
        args.changes = 1;
    }
    if args.nodes.contains(&0)
        || args.streams_per_connection == 0
        || args.enroll_concurrency == 0
        || args.connect_concurrency == 0
    {
        bail!("--nodes, --streams-per-connection and the concurrencies must be positive");
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?
        .block_on(run(args))
}

fn target(args: &Args) -> anyhow::Result<Target> {
    if let Some(c) = &args.control {
        let (api, xds) = c
            .split_once(',')
            .context("--control wants API_ADDR,XDS_ADDR")?;
        let trust = match (&args.control_ca, &args.control_token_file) {
            (Some(ca), Some(token)) => Some(Trust::from_files(ca, token)?),
            _ => None,
        };
        return Ok(Target::External {
            api: api.trim().parse().context("--control API address")?,
            xds: xds.trim().parse().context("--control xDS address")?,
            pid: args.control_pid,
            trust,
        });
    }
    if args.in_process {
        return Ok(Target::InProcess);
    }
    if let Some(bin) = &args.biplane_bin {
        return Ok(Target::Child(bin.clone()));
    }
    let sibling = std::env::current_exe()
        .ok()
        .and_then(|p| Some(p.parent()?.join("biplane")));
    let candidates = sibling.into_iter().chain([
        PathBuf::from("target/release/biplane"),
        PathBuf::from("target/debug/biplane"),
    ]);
    for c in candidates {
        if c.is_file() {
            return Ok(Target::Child(c));
        }
    }
    bail!("no biplane binary found: pass --biplane-bin, --in-process or --control")
}

async fn run(args: Args) -> anyhow::Result<()> {
    let target = target(&args)?;
    let protocols = match args.protocol {
        ProtocolArg::Delta => vec![Protocol::Delta],
        ProtocolArg::Sotw => vec![Protocol::Sotw],
        ProtocolArg::Both => vec![Protocol::Delta, Protocol::Sotw],
    };
    let mode = match &target {
        Target::Child(bin) => format!("child process {}", bin.display()),
        Target::InProcess => "in-process".to_owned(),
        Target::External { api, .. } => format!("external {api}"),
    };
    eprintln!("control plane: {mode}");
    let started = Instant::now();
    let mut runs = Vec::new();
    // (security, nodes) pairs: a smoke run keeps the mTLS case small.
    let mut sizes = Vec::new();
    for &n in &args.nodes {
        for &sec in &args.security {
            let n = match (args.smoke, sec) {
                (false, _) => n,
                (true, Security::Plain) => SMOKE_NODES_PLAIN,
                (true, Security::Mtls) => SMOKE_NODES_MTLS,
            };
            if !sizes.contains(&(sec, n)) {
                sizes.push((sec, n));
            }
        }
    }
    for (sec, n) in sizes {
        for &p in &protocols {
            eprintln!(
                "run: {n} nodes, {}, {}, {} changes",
                sec.as_str(),
                p.as_str(),
                args.changes
            );
            let r = run_one(&args, &target, sec, p, n)
                .await
                .with_context(|| format!("{n} {} {} nodes", sec.as_str(), p.as_str()))?;
            println!("{}", serde_json::to_string(&r)?);
            eprintln!("{}", markdown_row(&r));
            runs.push(r);
        }
    }
    let table = markdown_table(&runs);
    eprintln!("\n{table}");
    eprintln!("total {:.1} s", started.elapsed().as_secs_f64());
    if let Some(path) = &args.json_out {
        let doc = json!({
            "benchmark": "xds-fanout",
            "machine": machine(),
            "control_plane": mode,
            "runs": runs,
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.md_out {
        std::fs::write(path, table).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    // Other work on the machine shows up in the latencies: record how busy it was.
    let load = std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    json!({ "cpu": cpu, "cores": cores, "loadavg_at_end": load })
}

/// The base configuration: one Gateway, four Backends, three HTTPRoutes; the first
/// route splits traffic between two Backends with weights `(weight, 1000)`.
fn config(weight: u64) -> String {
    let mut docs = vec![
        "apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: gw
  namespace: default
spec:
  listeners:
  - name: http
    port: 8080
    protocol: HTTP
"
        .to_owned(),
    ];
    for i in 1..=4 {
        docs.push(format!(
            "apiVersion: biplane.dev/v1alpha1
kind: Backend
metadata:
  name: b{i}
  namespace: default
spec:
  endpoints:
  - address: 127.0.0.1
    port: {}
  - address: 127.0.0.2
    port: {}
",
            9000 + i,
            9000 + i
        ));
    }
    docs.push(format!(
        "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: split
  namespace: default
spec:
  parentRefs:
  - name: gw
  rules:
  - matches:
    - path:
        type: PathPrefix
        value: /
    backendRefs:
    - group: biplane.dev
      kind: Backend
      name: b1
      weight: {weight}
    - group: biplane.dev
      kind: Backend
      name: b2
      weight: 1000
"
    ));
    for (name, prefix, backend) in [("api", "/api", "b3"), ("static", "/static", "b4")] {
        docs.push(format!(
            "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: {name}
  namespace: default
spec:
  parentRefs:
  - name: gw
  rules:
  - matches:
    - path:
        type: PathPrefix
        value: {prefix}
    backendRefs:
    - group: biplane.dev
      kind: Backend
      name: {backend}
"
        ));
    }
    docs.join("---\n")
}

/// Polls `done` every 5 ms until it holds, failing on a node failure or after `timeout`.
async fn wait_for(
    what: &str,
    slots: &[Arc<Slot>],
    timeout: Duration,
    mut done: impl FnMut(&[Arc<Slot>]) -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if done(slots) {
            return Ok(());
        }
        if let Some(f) = slots.iter().find_map(|s| s.failure()) {
            bail!("{what}: a node failed: {f}");
        }
        if Instant::now() > deadline {
            bail!("{what}: timed out after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// Nearest-rank percentile of sorted samples.
fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

async fn run_one(
    args: &Args,
    target: &Target,
    security: Security,
    protocol: Protocol,
    n: usize,
) -> anyhow::Result<Value> {
    let timeout = Duration::from_secs(args.timeout_secs);
    let cp = Control::start(
        target,
        args.debounce.as_deref(),
        security,
        args.control_log.as_deref(),
    )
    .await?;
    let result = measure(args, &cp, security, protocol, n, timeout).await;
    cp.stop().await;
    result
}

/// CPU milliseconds between two tick readings.
fn cpu_ms(a: Option<u64>, b: Option<u64>) -> Option<f64> {
    let tps = control::ticks_per_second() as f64;
    match (a, b) {
        (Some(a), Some(b)) => Some((b.saturating_sub(a) as f64) * 1000.0 / tps),
        _ => None,
    }
}

/// Opens `n` channels with `open(i)`, at most `limit` being opened at once.
async fn open_channels<F, Fut>(n: usize, limit: usize, open: F) -> anyhow::Result<Vec<Channel>>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Channel>> + Send + 'static,
{
    let limit = Arc::new(tokio::sync::Semaphore::new(limit));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let permit = limit.clone().acquire_owned().await?;
        let fut = open(i);
        tasks.spawn(async move {
            let r = fut.await;
            drop(permit);
            (i, r)
        });
    }
    let mut out: Vec<Option<Channel>> = vec![None; n];
    while let Some(joined) = tasks.join_next().await {
        let (i, r) = joined.context("connection task")?;
        out[i] = Some(r?);
    }
    out.into_iter()
        .collect::<Option<Vec<_>>>()
        .context("a connection was not opened")
}

async fn measure(
    args: &Args,
    cp: &Control,
    security: Security,
    protocol: Protocol,
    n: usize,
    timeout: Duration,
) -> anyhow::Result<Value> {
    let api = Api::new(cp.api, cp.trust.as_ref())?;
    let base_revision = api.apply(&config(1000)).await?;
    // Let the debounced compile of the base configuration finish before the baseline.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let rss_before = cp.pid.and_then(control::rss_kib);
    let ids: Vec<String> = (0..n)
        .map(|i| format!("bench-{}-{i}", protocol.as_str()))
        .collect();

    // mTLS: one bootstrap token with N uses, N enrollments (not measured, reported).
    let mut enroll_report = Value::Null;
    let mut rss_enrolled = None;
    let mut nodes_tls = Vec::new();
    if security == Security::Mtls {
        let trust = cp.trust.as_ref().context("mTLS run without the CA")?;
        let token = api.bootstrap_token(GATEWAY, n).await?;
        let cpu0 = cp.pid.and_then(control::cpu_ticks);
        let enrolled = mtls::enroll(
            cp.xds,
            &trust.ca_pem,
            &token,
            ids.clone(),
            args.enroll_concurrency,
            timeout,
        )
        .await?;
        let cpu1 = cp.pid.and_then(control::cpu_ticks);
        rss_enrolled = cp.pid.and_then(control::rss_kib);
        eprintln!(
            "  {n} nodes enrolled in {:.2} s ({} retried calls)",
            enrolled.elapsed.as_secs_f64(),
            enrolled.retries
        );
        enroll_report = json!({
            "s": (enrolled.elapsed.as_secs_f64() * 1000.0).round() / 1000.0,
            "concurrency": args.enroll_concurrency,
            "retried_calls": enrolled.retries,
            "first_retry_reason": enrolled.first_retry_reason,
            "cp_cpu_ms": cpu_ms(cpu0, cpu1),
        });
        nodes_tls = enrolled.nodes;
    }

    // Plaintext: one HTTP/2 connection per `streams_per_connection` nodes. mTLS: one TLS
    // connection per node, with its own client certificate.
    let per_connection = match security {
        Security::Plain => args.streams_per_connection,
        Security::Mtls => 1,
    };
    let connections = n.div_ceil(per_connection);
    let cpu_at_connect = cp.pid.and_then(control::cpu_ticks);
    let connect_start = Instant::now();
    let channels = match security {
        Security::Plain => {
            let url = format!("http://{}", cp.xds);
            open_channels(connections, args.connect_concurrency, |_| {
                let url = url.clone();
                async move {
                    Endpoint::from_shared(url.clone())?
                        .tcp_nodelay(true)
                        .connect_timeout(timeout)
                        .connect()
                        .await
                        .with_context(|| format!("connecting to {url}"))
                }
            })
            .await?
        }
        Security::Mtls => {
            let nodes = Arc::new(std::mem::take(&mut nodes_tls));
            let xds = cp.xds;
            open_channels(connections, args.connect_concurrency, |i| {
                let nodes = nodes.clone();
                async move { nodes[i].connect(xds, timeout).await }
            })
            .await?
        }
    };
    let connect = connect_start.elapsed();
    let slots: Vec<Arc<Slot>> = (0..n).map(|_| Arc::new(Slot::default())).collect();
    let mut tasks = tokio::task::JoinSet::new();
    let sync_start = Instant::now();
    for (i, slot) in slots.iter().enumerate() {
        tasks.spawn(client::run(
            channels[i / per_connection].clone(),
            protocol,
            ids[i].clone(),
            GATEWAY.to_owned(),
            slot.clone(),
        ));
    }
    wait_for("initial sync", &slots, timeout, |slots| {
        let Some(first) = slots[0].versions() else {
            return false;
        };
        slots.iter().all(|s| s.versions().as_ref() == Some(&first))
    })
    .await?;
    let sync = sync_start.elapsed();
    eprintln!(
        "  {n} nodes connected ({connections} connections) in {:.2} s, synced in {:.2} s",
        connect.as_secs_f64(),
        sync.as_secs_f64()
    );
    let rss_after = cp.pid.and_then(control::rss_kib);
    let cpu_before = cp.pid.and_then(control::cpu_ticks);
    let own = std::process::id();
    let bench_cpu_before = control::cpu_ticks(own);

    let mut samples = Vec::with_capacity(n * args.changes);
    let mut all_acked = Vec::with_capacity(args.changes);
    let mut applies = Vec::with_capacity(args.changes);
    for i in 1..=args.changes {
        let prev = slots[0].acked(I_RDS).context("no RDS version")?.version;
        // A weight never used before on this store: a new RouteConfiguration version.
        let weight = 1000 + base_revision + i as u64;
        let sent = Instant::now();
        api.apply(&config(weight)).await?;
        let t0 = Instant::now();
        applies.push(t0 - sent);
        wait_for(&format!("change {i}"), &slots, timeout, |slots| {
            slots
                .iter()
                .all(|s| s.acked(I_RDS).is_some_and(|a| a.version != prev))
        })
        .await?;
        let mut worst = Duration::ZERO;
        let mut version = None;
        for s in &slots {
            let a = s.acked(I_RDS).context("no RDS version")?;
            let lat = a.at.saturating_duration_since(t0);
            worst = worst.max(lat);
            samples.push(lat);
            match &version {
                None => version = Some(a.version.clone()),
                Some(v) if *v != a.version => bail!("change {i}: nodes ACKed different versions"),
                Some(_) => {}
            }
        }
        all_acked.push(worst);
        eprintln!("  change {i}: all {n} ACKed in {:.1} ms", ms(worst));
    }
    let cpu_after = cp.pid.and_then(control::cpu_ticks);
    let bench_cpu_after = control::cpu_ticks(own);
    tasks.abort_all();
    drop(channels);

    samples.sort();
    let cpu_changes = cpu_ms(cpu_before, cpu_after);
    let per_node = |from: Option<u64>| match (from, rss_after) {
        (Some(b), Some(a)) => Some(((a as f64 - b as f64) / n as f64 * 100.0).round() / 100.0),
        _ => None,
    };
    let mut sorted_all = all_acked.clone();
    sorted_all.sort();
    applies.sort();
    let secs = |d: Duration| (d.as_secs_f64() * 1000.0).round() / 1000.0;
    Ok(json!({
        "security": security.as_str(),
        "protocol": protocol.as_str(),
        "nodes": n,
        "changes": args.changes,
        "streams_per_connection": per_connection,
        "connections": connections,
        "debounce": args.debounce.clone().unwrap_or_else(|| "default (100ms)".to_owned()),
        // mTLS only: minting nothing, N `Enroll` calls before the measured phase.
        "enroll": enroll_report,
        "connect_s": secs(connect),
        "initial_sync_s": secs(sync),
        "ack_ms": {
            "p50": ms(pct(&samples, 50.0)),
            "p99": ms(pct(&samples, 99.0)),
            "max": ms(samples.last().copied().unwrap_or_default()),
        },
        "all_acked_ms": {
            "per_change": all_acked.iter().map(|d| ms(*d)).collect::<Vec<_>>(),
            "median": ms(pct(&sorted_all, 50.0)),
        },
        // The apply call itself (request sent to 200 read), median over changes; the ACK
        // latencies are counted from its end.
        "apply_ms_median": ms(pct(&applies, 50.0)),
        "control_plane": {
            "pid_measured": cp.pid.is_some(),
            "rss_before_kib": rss_before,
            // mTLS: after enrollment, before any ADS connection.
            "rss_enrolled_kib": rss_enrolled,
            "rss_after_kib": rss_after,
            // (after - before) / N: everything a node costs, enrollment included.
            "rss_per_node_kib": per_node(rss_before),
            "cpu_connect_sync_ms": cpu_ms(cpu_at_connect, cpu_before),
            "cpu_changes_ms": cpu_changes,
            "cpu_per_change_ms": cpu_changes.map(|c| c / args.changes.max(1) as f64),
        },
        // The simulated nodes share the machine with the control plane: their CPU time
        // (in-process mode: everything) during the change phase.
        "bench_cpu_changes_ms": cpu_ms(bench_cpu_before, bench_cpu_after),
        "targets": {
            "p99_under_1s_at_1000_nodes": "1,000 nodes all ACK a change with p99 < 1 s",
            "rss_per_node_kib_max": 100,
        },
    }))
}

fn opt(v: &Value, digits: usize) -> String {
    v.as_f64()
        .map_or_else(|| "n/a".to_owned(), |f| format!("{f:.digits$}"))
}

fn markdown_row(r: &Value) -> String {
    let cp = &r["control_plane"];
    let mib = |v: &Value| opt(&json!(v.as_f64().map(|k| k / 1024.0)), 1);
    let enroll = match r["enroll"]["s"].as_f64() {
        Some(_) => opt(&r["enroll"]["s"], 2),
        None => "–".to_owned(),
    };
    format!(
        "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} → {} | {} | {} |",
        r["security"].as_str().unwrap_or("plain"),
        r["protocol"].as_str().unwrap_or("?"),
        r["nodes"],
        r["connections"],
        enroll,
        opt(&r["connect_s"], 2),
        opt(&r["initial_sync_s"], 2),
        opt(&r["ack_ms"]["p50"], 1),
        opt(&r["ack_ms"]["p99"], 1),
        opt(&r["ack_ms"]["max"], 1),
        opt(&r["all_acked_ms"]["median"], 1),
        mib(&cp["rss_before_kib"]),
        mib(&cp["rss_after_kib"]),
        opt(&cp["rss_per_node_kib"], 1),
        opt(&cp["cpu_per_change_ms"], 0),
    )
}

/// Where a run has a plaintext and an mTLS twin (same protocol and node count): what
/// mTLS (enrollment + one TLS connection per node) adds.
fn comparison(runs: &[Value]) -> Option<String> {
    let find = |sec: &str, p: &Value, n: &Value| {
        runs.iter()
            .find(|r| r["security"] == sec && r["protocol"] == *p && r["nodes"] == *n)
    };
    let mut t = String::from(
        "| protocol | nodes | CP KiB per node plain → mTLS | ACK p99 plain → mTLS (ms) \
         | all ACKed, median plain → mTLS (ms) | CP CPU per change plain → mTLS (ms) |\n\
         |---|---:|---:|---:|---:|---:|\n",
    );
    let mut any = false;
    for m in runs.iter().filter(|r| r["security"] == "mtls") {
        let Some(p) = find("plain", &m["protocol"], &m["nodes"]) else {
            continue;
        };
        any = true;
        let pair = |path: &[&str], digits: usize| {
            let get = |r: &Value| path.iter().fold(r.clone(), |v, k| v[*k].clone());
            format!("{} → {}", opt(&get(p), digits), opt(&get(m), digits))
        };
        t.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            m["protocol"].as_str().unwrap_or("?"),
            m["nodes"],
            pair(&["control_plane", "rss_per_node_kib"], 1),
            pair(&["ack_ms", "p99"], 1),
            pair(&["all_acked_ms", "median"], 1),
            pair(&["control_plane", "cpu_per_change_ms"], 0),
        ));
    }
    any.then_some(t)
}

fn markdown_table(runs: &[Value]) -> String {
    let mut t = String::from(
        "| security | protocol | nodes | connections | enroll (s) | connect (s) \
         | initial sync (s) | ACK p50 (ms) | ACK p99 (ms) | ACK max (ms) \
         | all ACKed, median change (ms) | CP RSS before → after (MiB) | CP KiB per node \
         | CP CPU per change (ms) |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in runs {
        t.push_str(&markdown_row(r));
        t.push('\n');
    }
    if let Some(c) = comparison(runs) {
        t.push('\n');
        t.push_str(&c);
    }
    t
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let s: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(pct(&s, 50.0), Duration::from_millis(50));
        assert_eq!(pct(&s, 99.0), Duration::from_millis(99));
        assert_eq!(pct(&s, 100.0), Duration::from_millis(100));
        assert_eq!(pct(&s[..1], 99.0), Duration::from_millis(1));
        assert_eq!(pct(&[], 50.0), Duration::ZERO);
    }

    #[test]
    fn markdown_compares_plain_and_mtls_twins() {
        let run = |sec: &str, n: usize, kib: f64, p99: f64| {
            json!({
                "security": sec, "protocol": "delta", "nodes": n, "connections": n,
                "enroll": if sec == "mtls" { json!({"s": 1.5}) } else { Value::Null },
                "connect_s": 0.1, "initial_sync_s": 0.2,
                "ack_ms": {"p50": 100.0, "p99": p99, "max": p99},
                "all_acked_ms": {"median": p99},
                "control_plane": {"rss_before_kib": 1024, "rss_after_kib": 2048,
                    "rss_per_node_kib": kib, "cpu_per_change_ms": 10.0},
            })
        };
        let runs = [
            run("plain", 100, 27.5, 130.0),
            run("mtls", 100, 61.0, 190.0),
            run("mtls", 10, 80.0, 101.0),
        ];
        let t = markdown_table(&runs);
        assert!(t.contains("| mtls | delta | 100 | 100 | 1.50 |"), "{t}");
        assert!(t.contains("| plain | delta | 100 | 100 | – |"), "{t}");
        assert!(
            t.contains("| delta | 100 | 27.5 → 61.0 | 130.0 → 190.0 |"),
            "{t}"
        );
        // The 10-node mTLS run has no plaintext twin: no comparison row for it.
        let (_, compared) = t.split_once("\n\n").expect("a comparison table");
        assert!(!compared.contains("| delta | 10 |"), "{t}");
        assert!(comparison(&runs[..1]).is_none());
    }

    #[test]
    fn own_process_readings() {
        let pid = std::process::id();
        assert!(control::rss_kib(pid).is_some_and(|k| k > 0));
        assert!(control::cpu_ticks(pid).is_some());
    }
}
