//! `biplane proxy`: run the data plane from a static resource file (`--config`) or from
//! control planes over xDS (`--control-plane`).
//!
//! Static: the file goes through the same pipeline a control plane feeds: resources → xDS
//! v3 → `biplane_config::Config` (`biplane_xds::compile_static`). Every config error is
//! printed with its document and field path, and the process exits 1 before binding
//! anything.
//!
//! xDS: the proxy starts with no listeners and `/ready` answering 503; the xDS client
//! (`biplane_xds::client`) applies every complete config it receives and saves it as the
//! last-known-good config in `--state-dir`. If no config arrives within
//! `--initial-fetch-timeout`, the last-known-good config is loaded (when intact) and
//! served while the client keeps trying. `/ready` turns 200 with the first applied
//! config, never before.

use std::io::Read as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use biplane_proxy::{Proxy, ProxyOptions};
use biplane_xds::TranslateOptions;

/// Arguments of `biplane proxy`.
#[derive(Debug, clap::Args)]
pub struct ProxyArgs {
    /// Static mode: resource file (multi-document YAML or JSON); `-` reads standard input.
    #[arg(
        long,
        short = 'c',
        value_name = "FILE",
        required_unless_present = "control_plane",
        conflicts_with = "control_plane"
    )]
    pub config: Option<PathBuf>,
    /// xDS mode: control-plane xDS addresses (`host:port`), tried in turn.
    #[arg(
        long,
        value_name = "ADDR[,ADDR...]",
        value_delimiter = ',',
        requires = "gateway"
    )]
    pub control_plane: Vec<String>,
    /// The Gateway this node serves (`name` or `namespace/name`): required with
    /// `--control-plane` (it is the xDS `node.cluster`); with `--config`, needed when the
    /// file has several.
    #[arg(long, value_name = "NAME")]
    pub gateway: Option<String>,
    /// xDS node id (default: `<hostname>-<pid>`).
    #[arg(long, value_name = "ID")]
    pub node_id: Option<String>,
    /// Where the last-known-good config is kept (xDS mode).
    #[arg(long, value_name = "DIR", default_value = "./biplane-proxy-state")]
    pub state_dir: PathBuf,
    /// xDS protocol variant; `delta` falls back to `sotw` when the server lacks Delta.
    #[arg(long, value_enum, default_value_t = XdsProtocol::Delta)]
    pub xds_protocol: XdsProtocol,
    /// How long to wait for a first config from the control plane before serving the
    /// last-known-good config (e.g. `5s`, `500ms`).
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub initial_fetch_timeout: Duration,
    /// Admin listener (`/ready`, `/stats/prometheus`, `/config_dump`, `/listeners`).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9901")]
    pub admin_addr: SocketAddr,
    /// Static mode: IP address the Gateway listeners bind (their ports come from the
    /// config). In xDS mode the control plane's listeners carry their addresses.
    #[arg(long, value_name = "IP", default_value_t = IpAddr::V4(Ipv4Addr::UNSPECIFIED))]
    pub bind_ip: IpAddr,
    /// On SIGTERM/SIGINT, how long in-flight requests may take to finish (e.g. `10s`, `500ms`).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// Do not write the JSON access log (one line per request) to stdout.
    #[arg(long)]
    pub no_access_log: bool,
    /// xDS mode: plaintext gRPC to a control plane started with `--insecure-xds` (no
    /// client certificate, the server is not verified). A warning is printed.
    #[arg(long)]
    pub insecure: bool,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    biplane_api::parse_duration(s).map_err(|e| e.to_string())
}

/// `--xds-protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum XdsProtocol {
    Delta,
    Sotw,
}

pub async fn run(args: ProxyArgs) -> anyhow::Result<ExitCode> {
    match args.config.clone() {
        Some(path) => run_static(args, path).await,
        None => run_xds(args).await,
    }
}

async fn run_xds(args: ProxyArgs) -> anyhow::Result<ExitCode> {
    let Some(gateway) = args.gateway.clone() else {
        anyhow::bail!("--gateway is required with --control-plane");
    };
    let node = XdsNode::start(XdsNodeOptions {
        control_plane: args.control_plane.clone(),
        gateway,
        node_id: args.node_id.clone().unwrap_or_else(default_node_id),
        state_dir: args.state_dir.clone(),
        protocol: args.xds_protocol,
        initial_fetch_timeout: args.initial_fetch_timeout,
        proxy: ProxyOptions {
            admin_addr: Some(args.admin_addr),
            drain_timeout: args.drain_timeout,
            access_log: !args.no_access_log,
        },
    })
    .await?;
    let signal = shutdown_signal().await?;
    tracing::info!("received {signal}: stopping");
    node.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

/// What an xDS-fed proxy node is started with (`biplane proxy --control-plane`, and the
/// node `biplane up` runs in-process).
#[derive(Debug, Clone)]
pub struct XdsNodeOptions {
    /// Control-plane xDS addresses, tried in turn.
    pub control_plane: Vec<String>,
    /// The Gateway served (`node.cluster`).
    pub gateway: String,
    pub node_id: String,
    /// Where the last-known-good config is kept.
    pub state_dir: PathBuf,
    pub protocol: XdsProtocol,
    /// Wait this long for a first config before serving the last-known-good one.
    pub initial_fetch_timeout: Duration,
    pub proxy: ProxyOptions,
}

/// A running proxy fed by an xDS client: the proxy starts with no listeners and `/ready`
/// answering 503; every complete config the client receives is applied (a failed apply is
/// NACKed by the client) and `/ready` turns 200 with the first one.
pub struct XdsNode {
    proxy: Arc<Proxy>,
    client: biplane_xds::client::ClientHandle,
    drain_timeout: Duration,
}

impl XdsNode {
    /// Binds the admin listener and starts the xDS client.
    pub async fn start(opts: XdsNodeOptions) -> anyhow::Result<XdsNode> {
        use biplane_xds::client::{self, ClientOptions, Protocol};
        let drain_timeout = opts.proxy.drain_timeout;
        let proxy = Arc::new(
            Proxy::start_pending(opts.proxy)
                .await
                .context("starting the proxy")?,
        );
        if let Some(addr) = proxy.admin_addr() {
            tracing::info!("admin listening on {addr}");
        }
        let mut client_opts = ClientOptions::new(
            opts.control_plane.clone(),
            opts.node_id.clone(),
            opts.gateway.clone(),
        );
        client_opts.protocol = match opts.protocol {
            XdsProtocol::Delta => Protocol::Delta,
            XdsProtocol::Sotw => Protocol::Sotw,
        };
        client_opts.state_dir = Some(opts.state_dir.clone());
        client_opts.initial_fetch_timeout = Some(opts.initial_fetch_timeout);
        tracing::info!(node = %opts.node_id, gateway = %opts.gateway, control_plane = ?opts.control_plane,
            state_dir = %opts.state_dir.display(), "starting in xDS mode (not ready until a config is applied)");
        let target = proxy.clone();
        let client = client::spawn(client_opts, move |config| {
            let proxy = target.clone();
            async move {
                proxy.apply(config).await.map_err(|e| e.to_string())?;
                proxy.set_ready(true);
                Ok(())
            }
        })
        .context("starting the xDS client")?;
        Ok(XdsNode {
            proxy,
            client,
            drain_timeout,
        })
    }

    /// The proxy (admin address, listener addresses, readiness).
    pub fn proxy(&self) -> &Proxy {
        &self.proxy
    }

    /// What the xDS client is doing (connected, ACKed versions, last NACK, LKG).
    pub fn client_status(&self) -> tokio::sync::watch::Receiver<biplane_xds::client::ClientStatus> {
        self.client.status()
    }

    /// Stops the xDS client, then drains the proxy for up to its drain timeout.
    pub async fn shutdown(self) {
        let XdsNode {
            proxy,
            client,
            drain_timeout,
        } = self;
        client.shutdown().await;
        match Arc::try_unwrap(proxy) {
            Ok(proxy) => {
                tracing::info!("draining for up to {drain_timeout:?}");
                let report = proxy.shutdown().await;
                tracing::info!(?report, "drained");
            }
            Err(proxy) => {
                // Not expected: the client task (the only other owner) has ended.
                proxy.set_ready(false);
                tracing::warn!("the proxy is still shared; exiting without a drain");
            }
        }
    }
}

/// `<hostname>-<pid>`.
pub fn default_node_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "biplane".to_owned());
    format!("{host}-{}", std::process::id())
}

async fn run_static(args: ProxyArgs, path: PathBuf) -> anyhow::Result<ExitCode> {
    let text = read_config(&path)?;
    let opts = TranslateOptions {
        bind_ip: args.bind_ip,
    };
    let config = match biplane_xds::compile_static(&text, args.gateway.as_deref(), &opts) {
        Ok(config) => config,
        Err(err) => {
            // Nothing is bound yet: report every problem and stop.
            let source = path.display();
            for line in err.to_string().lines() {
                eprintln!("{source}: {line}");
            }
            let n = err.count();
            eprintln!(
                "{source}: {n} error{}; nothing was started",
                if n == 1 { "" } else { "s" }
            );
            return Ok(ExitCode::FAILURE);
        }
    };
    let options = ProxyOptions {
        admin_addr: Some(args.admin_addr),
        drain_timeout: args.drain_timeout,
        access_log: !args.no_access_log,
    };
    let proxy = Proxy::start(config, options)
        .await
        .context("starting the proxy")?;
    if let Some(addr) = proxy.admin_addr() {
        tracing::info!("admin listening on {addr}");
    }
    for (name, addr) in proxy.listener_addrs() {
        tracing::info!("listener {name} listening on {addr}");
    }
    let signal = shutdown_signal().await?;
    tracing::info!(
        "received {signal}: draining for up to {:?}",
        args.drain_timeout
    );
    let report = proxy.shutdown().await;
    tracing::info!(?report, "drained");
    Ok(ExitCode::SUCCESS)
}

fn read_config(path: &PathBuf) -> anyhow::Result<String> {
    if path.as_os_str() == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading the config from stdin")?;
        Ok(text)
    } else {
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
    }
}

/// Waits for SIGTERM or SIGINT and says which.
pub async fn shutdown_signal() -> anyhow::Result<&'static str> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}
