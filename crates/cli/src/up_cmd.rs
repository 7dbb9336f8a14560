//! `biplane up`: the whole product in one process, for a first run and for development.
//!
//! It starts, on this process's runtime and in this order: two echo upstreams, the
//! control plane with its embedded store (`biplane_control::run`), and one proxy node for
//! the Gateway `default` fed over xDS by that control plane (the same [`XdsNode`] that
//! `biplane proxy --control-plane` runs). Then, only if the store holds no resource yet
//! (so that the user's changes survive a restart), it applies `examples/quickstart.yaml`
//! (embedded in the binary) through the admin API, exactly as `biplane apply` would. It
//! waits for the node to apply a config and prints where to send traffic and how to
//! change it.
//!
//! SIGINT or SIGTERM stops everything in reverse order: the node (xDS client, then a
//! drain of in-flight requests), the control plane (the store is closed cleanly), the
//! echoes; the exit status is 0.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use std::sync::Arc;

use anyhow::Context as _;
use biplane_control::tokens::Role;
use biplane_control::{ControlHandle, ControlOptions, server};
use biplane_proxy::ProxyOptions;
use biplane_xds::client::identity::{IdentityOptions, load_or_enroll};
use reqwest::Method;
use serde_json::Value;
use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::client::http::Api;
use crate::echo::{self, EchoServer};
use crate::proxy_cmd::{self, XdsNode, XdsNodeOptions, XdsProtocol};

/// Where the quick start lives in the repository (and what the banner tells users to edit).
const QUICKSTART_PATH: &str = "examples/quickstart.yaml";
/// The quick-start resources, applied on the first run.
pub const QUICKSTART: &str = include_str!("../../../examples/quickstart.yaml");
/// The Gateway the node serves (the quick start's Gateway).
const GATEWAY: &str = "default";
/// The quick start's values that `--http-port` and `--echo-ports` replace.
const QUICKSTART_HTTP_PORT: u16 = 8080;
const QUICKSTART_ECHOES: [(&str, u16); 2] = [("echo-v1", 9101), ("echo-v2", 9102)];
/// How long to wait for the node's first config before printing the banner anyway.
const READY_WAIT: Duration = Duration::from_secs(15);

/// `biplane up` flags.
#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// Control plane admin API (what `biplane apply/get/status --server` talk to).
    #[arg(long, value_name = "ADDR", default_value_t = server::DEFAULT_API_ADDR)]
    pub api_addr: SocketAddr,
    /// Control plane xDS (ADS) address; the built-in proxy node connects to it, and more
    /// nodes can (`biplane proxy --control-plane ADDR --gateway default`).
    #[arg(long, value_name = "ADDR", default_value_t = server::DEFAULT_XDS_ADDR)]
    pub xds_addr: SocketAddr,
    /// Directory of the store; the node's last-known-good config goes in `proxy-state/`
    /// under it.
    #[arg(long, value_name = "DIR", default_value = biplane_control::store::DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
    /// Ports of the two built-in echo upstreams (`echo-v1`, `echo-v2`) on 127.0.0.1; `0`
    /// picks a free one. The quick start's Backends point at them (first run only).
    #[arg(long, value_name = "PORT,PORT", value_delimiter = ',', num_args = 1,
        default_values_t = QUICKSTART_ECHOES.map(|(_, port)| port))]
    pub echo_ports: Vec<u16>,
    /// The port of the quick start's Gateway listener (first run only; later, change the
    /// Gateway with `biplane apply`).
    #[arg(long, value_name = "PORT", default_value_t = QUICKSTART_HTTP_PORT)]
    pub http_port: u16,
    /// The IP address the proxy node's Gateway listeners bind.
    #[arg(long, value_name = "IP", default_value_t = IpAddr::V4(Ipv4Addr::LOCALHOST))]
    pub proxy_bind_ip: IpAddr,
    /// The proxy node's admin listener (`/ready`, `/config_dump`, `/stats/prometheus`).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9901")]
    pub admin_addr: SocketAddr,
    /// Quiet time after a change before it is compiled and pushed (e.g. 100ms).
    #[arg(long, value_name = "DURATION", default_value = "100ms", value_parser = parse_duration)]
    pub debounce: Duration,
    /// On Ctrl-C, how long in-flight requests may take to finish.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// Do not write the proxy's JSON access log (one line per request) to stdout.
    #[arg(long)]
    pub no_access_log: bool,
    #[command(flatten)]
    pub security: crate::control_cmd::SecurityArgs,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    biplane_api::parse_duration(s).map_err(|e| e.to_string())
}

/// Everything `up` started, stopped in reverse order.
struct Running {
    echoes: Vec<EchoServer>,
    control: Option<ControlHandle>,
    node: Option<XdsNode>,
}

impl Running {
    async fn shutdown(self) {
        if let Some(node) = self.node {
            node.shutdown().await;
        }
        if let Some(control) = self.control {
            control.shutdown().await;
        }
        for echo in self.echoes {
            echo.shutdown().await;
        }
    }
}

pub async fn run(args: UpArgs) -> anyhow::Result<ExitCode> {
    if args.echo_ports.len() != QUICKSTART_ECHOES.len() {
        anyhow::bail!(
            "--echo-ports takes {} ports (echo-v1,echo-v2), got {}",
            QUICKSTART_ECHOES.len(),
            args.echo_ports.len()
        );
    }
    // Installed first: a Ctrl-C during startup still stops cleanly.
    let mut signals = Signals::install()?;
    let mut running = Running {
        echoes: Vec::new(),
        control: None,
        node: None,
    };
    let started = tokio::select! {
        r = start(&args, &mut running) => r,
        name = signals.recv() => {
            tracing::info!("received {name} during startup: stopping");
            running.shutdown().await;
            return Ok(ExitCode::SUCCESS);
        }
    };
    if let Err(e) = started {
        running.shutdown().await;
        return Err(e);
    }
    let failed = match running.control.as_mut() {
        Some(control) => tokio::select! {
            name = signals.recv() => {
                tracing::info!("received {name}: stopping the proxy node, the control plane and the echoes");
                None
            }
            task = control.wait_for_failure() => Some(task),
        },
        None => None,
    };
    running.shutdown().await;
    match failed {
        Some(task) => anyhow::bail!("the control plane's {task} stopped unexpectedly"),
        None => {
            eprintln!("biplane up: stopped");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Starts the parts into `running` (so a failure half-way stops what did start).
async fn start(args: &UpArgs, running: &mut Running) -> anyhow::Result<()> {
    let mut echo_addrs = Vec::new();
    for ((name, _), port) in QUICKSTART_ECHOES.iter().zip(&args.echo_ports) {
        let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), *port);
        let echo = echo::start(addr, Some((*name).to_owned()))
            .await
            .with_context(|| format!("cannot start the echo upstream {name}"))?;
        eprintln!("echo {name} listening on {}", echo.addr());
        echo_addrs.push(echo.addr());
        running.echoes.push(echo);
    }

    let options = args.security.apply(ControlOptions {
        api_addr: args.api_addr,
        xds_addr: args.xds_addr,
        data_dir: args.data_dir.clone(),
        debounce: args.debounce,
        bind_ip: args.proxy_bind_ip,
        ..ControlOptions::default()
    });
    let secure = (options.auth, options.xds_mtls);
    let control = biplane_control::run(options)
        .await
        .context("cannot start the control plane")?;
    let (api_addr, xds_addr) = (control.api_addr(), control.xds_addr());
    eprintln!("api listening on {api_addr}");
    eprintln!("xds listening on {xds_addr}");
    let xds_target = loopback_if_unspecified(xds_addr).to_string();
    // The node enrolls like any other: a one-use bootstrap token, pinned to the CA.
    let (node_id, tls) = if secure.1 {
        let servers = std::slice::from_ref(&xds_target);
        let stored = IdentityOptions::new(args.data_dir.join("proxy-state"));
        let creds = match load_or_enroll(&stored, servers).await {
            Ok(creds) => creds,
            Err(e) => {
                tracing::info!(reason = %e, "enrolling the proxy node");
                let token = control
                    .tokens()
                    .mint_bootstrap(GATEWAY, Duration::from_secs(300), 1)
                    .await
                    .context("minting the node's bootstrap token")?;
                let opts = IdentityOptions {
                    token: Some(format!("{token}.{}", control.ca().pin())),
                    ..stored
                };
                load_or_enroll(&opts, servers)
                    .await
                    .context("enrolling the proxy node")?
            }
        };
        eprintln!("proxy node identity {}", creds.identity());
        (creds.node_id().to_owned(), Some(Arc::new(creds)))
    } else {
        (proxy_cmd::default_node_id(), None)
    };
    // The CLI calls below use a short-lived admin token of their own.
    let api_token = if secure.0 {
        Some(
            control
                .tokens()
                .mint_api(Role::Admin, "biplane-up", Some(Duration::from_secs(600)))
                .await
                .context("minting an API token")?,
        )
    } else {
        None
    };
    let ca_file = control.ca().cert_path().map(std::path::Path::to_path_buf);
    running.control = Some(control);

    let node = XdsNode::start(XdsNodeOptions {
        control_plane: vec![xds_target],
        gateway: GATEWAY.to_owned(),
        node_id,
        tls,
        state_dir: args.data_dir.join("proxy-state"),
        protocol: XdsProtocol::Delta,
        initial_fetch_timeout: Duration::from_secs(5),
        proxy: ProxyOptions {
            admin_addr: Some(args.admin_addr),
            drain_timeout: args.drain_timeout,
            access_log: !args.no_access_log,
        },
    })
    .await?;
    let mut status = node.client_status();
    let admin_addr = node.proxy().admin_addr();
    running.node = Some(node);

    let scheme = if secure.0 { "https" } else { "http" };
    let api = Api::connect(&crate::client::config::Resolved {
        server: format!("{scheme}://{}", loopback_if_unspecified(api_addr)),
        token: api_token,
        ca_file: if secure.0 { ca_file } else { None },
    })
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let stored = count_resources(&api).await?;
    if stored == 0 {
        let docs = quickstart_documents(args.http_port, &echo_addrs)?;
        let body = serde_json::to_string(&docs)?;
        let reply = api
            .send(
                Method::POST,
                api.url(&["apply"], &[]),
                Some(("application/json", body)),
            )
            .await
            .map_err(|e| anyhow::anyhow!("applying the quick start: {e}"))?;
        let status_code = reply.status;
        let answer = reply
            .ok()
            .map_err(|e| anyhow::anyhow!("applying the quick start ({status_code}): {e}"))?;
        let n = answer["results"].as_array().map_or(0, Vec::len);
        eprintln!(
            "applied the quick start ({n} resources, revision {})",
            answer["revision"]
        );
    } else {
        eprintln!(
            "the store in {} already holds {stored} resources: not applying the quick start",
            args.data_dir.display()
        );
    }

    let ready = tokio::time::timeout(READY_WAIT, status.wait_for(|s| s.applied_count > 0))
        .await
        .is_ok_and(|r| r.is_ok());
    let listeners = running
        .node
        .as_ref()
        .map(|n| n.proxy().listener_addrs())
        .unwrap_or_default();
    print_banner(&Banner {
        ready,
        fresh: stored == 0,
        listeners: &listeners,
        api_addr,
        xds_addr,
        admin_addr,
        data_dir: &args.data_dir,
        secure: secure.0 && secure.1,
    });
    Ok(())
}

/// How many resources of any kind the store holds.
async fn count_resources(api: &Api) -> anyhow::Result<usize> {
    let mut n = 0;
    for kind in biplane_api::ResourceKind::ALL {
        let plural = crate::client::kinds::plural(kind);
        let body = api
            .get(api.url(&[plural], &[]))
            .await
            .and_then(|r| r.ok())
            .map_err(|e| anyhow::anyhow!("listing {plural}: {e}"))?;
        n += body["items"].as_array().map_or(0, Vec::len);
    }
    Ok(n)
}

/// The quick start's documents with the Gateway listener on `http_port` and the Backends
/// on the echoes' bound addresses.
fn quickstart_documents(http_port: u16, echoes: &[SocketAddr]) -> anyhow::Result<Vec<Value>> {
    let mut options = serde_saphyr::Options::default();
    // YAML 1.2 booleans only, as `biplane_api::parse_documents` reads it.
    options.strict_booleans = true;
    let mut docs: Vec<Value> = serde_saphyr::from_multiple_with_options(QUICKSTART, options)
        .context("the embedded quick start is not valid YAML")?;
    docs.retain(|d| !d.is_null());
    for doc in &mut docs {
        let kind = doc["kind"].as_str().unwrap_or_default().to_owned();
        let name = doc["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        match kind.as_str() {
            "Gateway" => {
                if let Some(listeners) = doc["spec"]["listeners"].as_array_mut() {
                    for l in listeners {
                        if l["port"] == QUICKSTART_HTTP_PORT {
                            l["port"] = http_port.into();
                        }
                    }
                }
            }
            "Backend" => {
                let echo = QUICKSTART_ECHOES
                    .iter()
                    .zip(echoes)
                    .find(|((n, _), _)| *n == name);
                if let (Some((_, addr)), Some(endpoints)) =
                    (echo, doc["spec"]["endpoints"].as_array_mut())
                {
                    for e in endpoints {
                        e["address"] = addr.ip().to_string().into();
                        e["port"] = addr.port().into();
                    }
                }
            }
            _ => {}
        }
    }
    Ok(docs)
}

struct Banner<'a> {
    ready: bool,
    /// The quick start was applied by this run.
    fresh: bool,
    listeners: &'a [(String, SocketAddr)],
    api_addr: SocketAddr,
    xds_addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    data_dir: &'a std::path::Path,
    /// mTLS xDS and an authenticated HTTPS admin API.
    secure: bool,
}

/// `addr` with `127.0.0.1` (or `::1`) for an unspecified IP: where to connect to reach it.
fn loopback_if_unspecified(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => (Ipv4Addr::LOCALHOST, addr.port()).into(),
        IpAddr::V6(ip) if ip.is_unspecified() => {
            (std::net::Ipv6Addr::LOCALHOST, addr.port()).into()
        }
        _ => addr,
    }
}

/// What to do next, on stdout.
fn print_banner(b: &Banner<'_>) {
    // The CLI reads `<data-dir>/client.yaml` (server, CA, admin token) by itself when run
    // next to the default data directory.
    let default_dir = b.data_dir == std::path::Path::new(biplane_control::store::DEFAULT_DATA_DIR);
    let server = if default_dir {
        String::new()
    } else {
        format!(
            " --client-config {}",
            b.data_dir.join(server::CLIENT_CONFIG_FILE).display()
        )
    };
    let mut out = String::from("\nbiplane is up\n\n");
    if b.ready && !b.listeners.is_empty() {
        out.push_str("Send traffic through the proxy:\n");
        for (name, addr) in b.listeners {
            let shown = if addr.ip().is_unspecified() {
                SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port())
            } else {
                *addr
            };
            let what = if b.fresh {
                "90% echo-v1, 10% echo-v2"
            } else {
                "routed as the stored HTTPRoutes say"
            };
            out.push_str(&format!(
                "  curl http://{shown}/            # listener {name}: {what}\n"
            ));
        }
        if let Some((_, addr)) = b.listeners.first().filter(|_| b.fresh) {
            out.push_str(&format!(
                "  curl http://{}:{}/v2/hello    # the path route: always echo-v2\n",
                if addr.ip().is_unspecified() {
                    IpAddr::V4(Ipv4Addr::LOCALHOST)
                } else {
                    addr.ip()
                },
                addr.port()
            ));
        }
    } else {
        out.push_str(&format!(
            "The proxy node has no config yet (it serves the Gateway `{GATEWAY}`; is there one?).\n\
             See `biplane status{server}` and `biplane get gateways{server}`.\n"
        ));
    }
    let (example, note) = if std::path::Path::new(QUICKSTART_PATH).is_file() {
        (QUICKSTART_PATH, "")
    } else {
        (QUICKSTART_PATH, " (in the Biplane repository)")
    };
    out.push_str(&format!(
        "\nChange it (`biplane` is target/release/biplane, or `cargo run --release -p biplane --`):\n\
         \x20 biplane get httproutes{server}\n\
         \x20 # edit the weights or paths in {example}{note}, then:\n\
         \x20 biplane apply -f {example}{server}\n\
         \nWatch it sync:\n\
         \x20 biplane status{server}     # the node, the versions it ACKed, the last NACK\n\
         \x20 biplane get httproute quickstart -o yaml{server}   # Accepted, ResolvedRefs, Programmed\n"
    ));
    if let Some(admin) = b.admin_addr {
        out.push_str(&format!(
            "  curl http://{admin}/config_dump   # the config the proxy node runs\n"
        ));
    }
    let (scheme, trust) = if b.secure {
        (
            "https",
            format!(
                "\nTrust: the admin API needs a bearer token (the admin token is in {}, the CLI\n\
                 finds it through {}); the proxy node enrolled with a one-use token and talks\n\
                 to the control plane over mTLS. Mint more tokens with `biplane token create`.\n",
                b.data_dir
                    .join(biplane_control::tokens::ADMIN_TOKEN_FILE)
                    .display(),
                b.data_dir.join(server::CLIENT_CONFIG_FILE).display()
            ),
        )
    } else {
        ("http", String::new())
    };
    out.push_str(&format!(
        "\nControl plane: admin API {scheme}://{}, xDS {}; state in {}.\n{trust}Ctrl-C stops everything.\n",
        b.api_addr,
        b.xds_addr,
        b.data_dir.display()
    ));
    print!("{out}");
    {
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
    }
}

/// SIGINT and SIGTERM.
struct Signals {
    int: Signal,
    term: Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Signals> {
        Ok(Signals {
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
        })
    }

    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "SIGINT",
            _ = self.term.recv() => "SIGTERM",
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests: a panic is a failure")]
    use super::*;

    #[test]
    fn the_quickstart_compiles_for_the_default_gateway() {
        let opts = biplane_xds::TranslateOptions {
            bind_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        };
        let config = biplane_xds::compile_static(QUICKSTART, Some(GATEWAY), &opts).unwrap();
        assert_eq!(config.listeners.len(), 1);
        assert_eq!(config.listeners[0].address.port(), QUICKSTART_HTTP_PORT);
    }

    #[test]
    fn ports_are_replaced_and_the_result_still_validates() {
        let echoes: Vec<SocketAddr> = vec![
            "127.0.0.1:40001".parse().unwrap(),
            "127.0.0.1:40002".parse().unwrap(),
        ];
        let docs = quickstart_documents(18080, &echoes).unwrap();
        assert_eq!(docs.len(), 4);
        let text = serde_json::to_string(&docs).unwrap();
        let opts = biplane_xds::TranslateOptions {
            bind_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        };
        let config = biplane_xds::compile_static(&text, Some(GATEWAY), &opts).unwrap();
        assert_eq!(config.listeners[0].address.port(), 18080);
        assert!(text.contains("\"port\":40001") && text.contains("\"port\":40002"));
        assert!(!text.contains("9101") && !text.contains("9102"));
        // The defaults change nothing.
        let defaults: Vec<SocketAddr> = QUICKSTART_ECHOES
            .iter()
            .map(|(_, p)| SocketAddr::from(([127, 0, 0, 1], *p)))
            .collect();
        let same = quickstart_documents(QUICKSTART_HTTP_PORT, &defaults).unwrap();
        let parsed: Vec<Value> = serde_saphyr::from_multiple(QUICKSTART).unwrap();
        let parsed: Vec<Value> = parsed.into_iter().filter(|d| !d.is_null()).collect();
        assert_eq!(same, parsed);
    }
}
