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
use biplane_xds::client::identity::NodeCredentials;

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
    #[arg(long, value_name = "ADDR[,ADDR...]", value_delimiter = ',')]
    pub control_plane: Vec<String>,
    /// The Gateway this node serves (`name` or `namespace/name`). Over mTLS it comes from
    /// the node's certificate (given, it must match); with `--insecure` it is required (it
    /// is the xDS `node.cluster`); with `--config`, needed when the file has several.
    #[arg(long, value_name = "NAME")]
    pub gateway: Option<String>,
    /// xDS node id (default: the enrolled one; on first enrollment `<hostname>-<random>`;
    /// with `--insecure` `<hostname>-<pid>`).
    #[arg(long, value_name = "ID")]
    pub node_id: Option<String>,
    /// Bootstrap token (`biplane token create --gateway NAME`) to enroll with on first
    /// start: a key pair is generated here, and the certificate the control plane signs is
    /// kept with it in `--state-dir` (0600), so later starts need no token.
    #[arg(
        long,
        env = "BIPLANE_BOOTSTRAP_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true,
        conflicts_with = "insecure"
    )]
    pub token: Option<String>,
    /// CA certificate (PEM) to verify the control plane with on enrollment, when the token
    /// carries no pin.
    #[arg(long, value_name = "FILE", conflicts_with = "insecure")]
    pub ca_file: Option<PathBuf>,
    /// The control plane's name in its certificate (default: the host of the address).
    #[arg(long, value_name = "NAME", conflicts_with = "insecure")]
    pub server_name: Option<String>,
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
    let (gateway, node_id, tls) = if args.insecure {
        let Some(gateway) = args.gateway.clone() else {
            anyhow::bail!("--gateway is required with --control-plane --insecure");
        };
        eprintln!(
            "WARNING: --insecure: xDS is plaintext; the control plane is not verified and anyone on the path can read or change this node's configuration"
        );
        let node_id = args.node_id.clone().unwrap_or_else(default_node_id);
        (gateway, node_id, None)
    } else {
        let creds = enroll(&args).await?;
        if let Some(wanted) = &args.gateway {
            let wanted_full = if wanted.contains('/') {
                wanted.clone()
            } else {
                format!("{}/{wanted}", biplane_api::DEFAULT_NAMESPACE)
            };
            anyhow::ensure!(
                wanted_full == creds.gateway(),
                "--gateway {wanted} does not match the enrolled identity {} (Gateway {}); enroll with a token for {wanted} in another --state-dir",
                creds.identity(),
                creds.gateway()
            );
        }
        let valid_for = creds
            .not_after()
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default();
        tracing::info!(identity = %creds.identity(), valid_for_secs = valid_for.as_secs(), "node identity");
        (
            creds.gateway().to_owned(),
            creds.node_id().to_owned(),
            Some(Arc::new(creds)),
        )
    };
    let node = XdsNode::start(XdsNodeOptions {
        control_plane: args.control_plane.clone(),
        gateway,
        node_id,
        tls,
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

/// Loads the node's credentials from the state dir, or enrolls with the token. While no
/// control plane answers, enrollment is retried with backoff; a refusal is fatal.
async fn enroll(args: &ProxyArgs) -> anyhow::Result<NodeCredentials> {
    use biplane_xds::client::identity::{IdentityError, IdentityOptions, load_or_enroll};
    let opts = IdentityOptions {
        node_id: args.node_id.clone(),
        token: args.token.clone(),
        ca_file: args.ca_file.clone(),
        server_name: args.server_name.clone(),
        ..IdentityOptions::new(args.state_dir.clone())
    };
    let mut delay = Duration::from_millis(200);
    loop {
        match load_or_enroll(&opts, &args.control_plane).await {
            Ok(creds) => return Ok(creds),
            Err(IdentityError::Unreachable(why)) => {
                tracing::warn!(reason = %why, retry_in = ?delay, "cannot enroll yet: no control plane answers");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
            Err(e) => return Err(anyhow::Error::new(e).context("node identity")),
        }
    }
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
    /// The node's certificate for mTLS to the control plane (renewed at half-life);
    /// `None`: plaintext.
    pub tls: Option<Arc<NodeCredentials>>,
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
    /// The certificate renewal task (mTLS only).
    renewal: Option<tokio::task::JoinHandle<()>>,
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
        client_opts.tls = opts.tls.clone();
        let renewal = opts.tls.clone().map(|creds| {
            biplane_xds::client::identity::spawn_renewal(
                creds,
                opts.control_plane.clone(),
                std::future::pending(),
            )
        });
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
            renewal,
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
            renewal,
        } = self;
        if let Some(task) = renewal {
            task.abort();
        }
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
        Ok(config) => {
            drop(text);
            config
        }
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
