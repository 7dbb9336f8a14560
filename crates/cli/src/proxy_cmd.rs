//! `biplane proxy`: run the data plane from a static resource file.
//!
//! The file goes through the same pipeline a control plane feeds: resources → xDS v3 →
//! `biplane_config::Config` (`biplane_xds::compile_static`). Every config error is printed
//! with its document and field path, and the process exits 1 before binding anything.

use std::io::Read as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use biplane_proxy::{Proxy, ProxyOptions};
use biplane_xds::TranslateOptions;

/// Arguments of `biplane proxy`.
#[derive(Debug, clap::Args)]
pub struct ProxyArgs {
    /// Resource file (multi-document YAML or JSON); `-` reads standard input.
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: PathBuf,
    /// The Gateway this node serves (needed when the file has several).
    #[arg(long, value_name = "NAME")]
    pub gateway: Option<String>,
    /// Admin listener (`/ready`, `/stats/prometheus`, `/config_dump`, `/listeners`).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9901")]
    pub admin_addr: SocketAddr,
    /// IP address the Gateway listeners bind (their ports come from the config).
    #[arg(long, value_name = "IP", default_value_t = IpAddr::V4(Ipv4Addr::UNSPECIFIED))]
    pub bind_ip: IpAddr,
    /// On SIGTERM/SIGINT, how long in-flight requests may take to finish (e.g. `10s`, `500ms`).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// Do not write the JSON access log (one line per request) to stdout.
    #[arg(long)]
    pub no_access_log: bool,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    biplane_api::parse_duration(s).map_err(|e| e.to_string())
}

pub async fn run(args: ProxyArgs) -> anyhow::Result<ExitCode> {
    let text = read_config(&args.config)?;
    let opts = TranslateOptions {
        bind_ip: args.bind_ip,
    };
    let config = match biplane_xds::compile_static(&text, args.gateway.as_deref(), &opts) {
        Ok(config) => config,
        Err(err) => {
            // Nothing is bound yet: report every problem and stop.
            let source = args.config.display();
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
async fn shutdown_signal() -> anyhow::Result<&'static str> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}
