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
    #[command(flatten)]
    security: SecurityArgs,
}

/// Trust flags shared by `biplane control` and `biplane up`.
#[derive(Debug, Clone, clap::Args)]
pub struct SecurityArgs {
    /// Plaintext admin API without tokens AND plaintext xDS serving any node
    /// (`--insecure-api --insecure-xds`). For trusted networks and experiments only.
    #[arg(long)]
    pub insecure: bool,
    /// Serve the admin API over plaintext HTTP and without bearer tokens.
    #[arg(long)]
    pub insecure_api: bool,
    /// Serve xDS over plaintext gRPC to any node, with no identity checks.
    #[arg(long)]
    pub insecure_xds: bool,
    /// Root CA certificate (PEM) to issue node and server certificates with, instead of
    /// the one generated in `<data-dir>/ca/` on first start. Needs `--ca-key`.
    #[arg(long, value_name = "FILE", requires = "ca_key")]
    pub ca_cert: Option<PathBuf>,
    /// The private key (PKCS#8 PEM) of `--ca-cert`.
    #[arg(long, value_name = "FILE", requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,
    /// SPIFFE trust domain of node identities (`spiffe://<domain>/gateway/...`).
    #[arg(long, value_name = "DOMAIN", default_value = biplane_control::ca::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// DNS names and IP addresses nodes and the CLI use to reach this control plane (in
    /// its server certificate); repeat or comma-separate.
    #[arg(long, value_name = "NAME", value_delimiter = ',', default_values_t = ["localhost".to_owned(), "127.0.0.1".to_owned()])]
    pub server_name: Vec<String>,
    /// Lifetime of node certificates; nodes renew at half of it. Tests use seconds.
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = parse_debounce, hide = true)]
    pub node_cert_ttl: Duration,
}

impl SecurityArgs {
    /// Sets the trust fields of `options`, printing a warning for each insecure part.
    pub fn apply(&self, options: ControlOptions) -> ControlOptions {
        let insecure_api = self.insecure || self.insecure_api;
        let insecure_xds = self.insecure || self.insecure_xds;
        if insecure_api {
            eprintln!(
                "WARNING: --insecure-api: the admin API is plaintext HTTP and unauthenticated; anyone who can reach it can change the configuration"
            );
        }
        if insecure_xds {
            eprintln!(
                "WARNING: --insecure-xds: xDS is plaintext and any client may claim to be any node and read its configuration, secrets included"
            );
        }
        ControlOptions {
            auth: !insecure_api,
            api_tls: !insecure_api,
            xds_mtls: !insecure_xds,
            ca_cert: self.ca_cert.clone(),
            ca_key: self.ca_key.clone(),
            trust_domain: self.trust_domain.clone(),
            server_names: self.server_name.clone(),
            node_cert_ttl: self.node_cert_ttl,
            ..options
        }
    }
}

fn parse_debounce(s: &str) -> Result<Duration, String> {
    biplane_api::parse_duration(s).map_err(|e| e.to_string())
}

pub async fn run(args: ControlArgs) -> anyhow::Result<ExitCode> {
    let data_dir = args.data_dir.clone();
    let options = args.security.apply(ControlOptions {
        api_addr: args.api_addr,
        xds_addr: args.xds_addr,
        data_dir: args.data_dir,
        debounce: args.debounce,
        bind_ip: args.proxy_bind_ip,
        ..ControlOptions::default()
    });
    let mut handle = biplane_control::run(options)
        .await
        .context("cannot start the control plane")?;
    eprintln!("api listening on {}", handle.api_addr());
    eprintln!("xds listening on {}", handle.xds_addr());
    if handle.admin_token_file().exists() {
        eprintln!(
            "admin token in {} (mode 0600; move it somewhere safe)",
            handle.admin_token_file().display()
        );
    }
    eprintln!(
        "CLI config in {} (server, CA, admin token file)",
        data_dir
            .join(biplane_control::server::CLIENT_CONFIG_FILE)
            .display()
    );
    eprintln!("CA pin sha256:{}", handle.ca().pin());
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
