//! `biplane control`: runs the control plane (embedded store, admin API, ADS server) until
//! SIGINT or SIGTERM, printing the bound addresses on stderr.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use biplane_control::{ControlOptions, server};

/// `biplane control` flags.
#[derive(Debug, clap::Args)]
pub struct ControlArgs {
    /// Admin API (HTTP) listen address.
    #[arg(long, default_value_t = server::DEFAULT_API_ADDR)]
    api_addr: SocketAddr,
    /// xDS (ADS gRPC) listen address for the data-plane nodes.
    #[arg(long, default_value_t = server::DEFAULT_XDS_ADDR)]
    xds_addr: SocketAddr,
    /// Directory of the embedded store (created if missing).
    #[arg(long, default_value = biplane_control::store::DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
    /// Quiet time after a change before Gateways are recompiled and pushed (e.g. 100ms, 1s).
    #[arg(long, default_value = "100ms", value_parser = parse_debounce)]
    debounce: Duration,
    /// The address the nodes' listeners bind.
    #[arg(long, default_value = "0.0.0.0")]
    proxy_bind_ip: IpAddr,
}

fn parse_debounce(s: &str) -> Result<Duration, String> {
    biplane_api::parse_duration(s).map_err(|e| e.to_string())
}

pub async fn run(args: ControlArgs) -> anyhow::Result<ExitCode> {
    let options = ControlOptions {
        api_addr: args.api_addr,
        xds_addr: args.xds_addr,
        data_dir: args.data_dir,
        debounce: args.debounce,
        bind_ip: args.proxy_bind_ip,
        ..ControlOptions::default()
    };
    let mut handle = biplane_control::run(options)
        .await
        .context("cannot start the control plane")?;
    eprintln!("api listening on {}", handle.api_addr());
    eprintln!("xds listening on {}", handle.xds_addr());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot install the SIGTERM handler")?;
    let failed = tokio::select! {
        r = tokio::signal::ctrl_c() => {
            r.context("cannot listen for SIGINT")?;
            None
        }
        _ = term.recv() => None,
        name = handle.wait_for_failure() => Some(name),
    };
    tracing::info!("shutting down");
    handle.shutdown().await;
    match failed {
        Some(name) => anyhow::bail!("the {name} stopped unexpectedly"),
        None => Ok(ExitCode::SUCCESS),
    }
}
