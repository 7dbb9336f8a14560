//! Wiring of `biplane control`: opens the store, starts the controller, the fleet tracker,
//! the ADS gRPC server and the admin API, and stops them all cleanly ([`run`],
//! [`ControlHandle::shutdown`]).

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use biplane_xds::TranslateOptions;
use biplane_xds::server::{AdsOptions, AdsServer, FleetStatus, ServerSettings, SnapshotCache};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::Stream;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Status, Streaming};

use crate::api::{ApiState, router};
use crate::auth::xds_node_authorizer;
use crate::ca::{Ca, CaError, CaSource, CertAndKey, DEFAULT_NODE_CERT_TTL, DEFAULT_TRUST_DOMAIN};
use crate::certs::NodeCerts;
use crate::controller::{Controller, ControllerOptions, ControllerShared, track_fleet};
use crate::metrics::Metrics;
use crate::nodes::Revocations;
use crate::store::{DEFAULT_DATA_DIR, RedbStore, Store, StoreError, StoreOptions};
use crate::tls::{TlsError, TlsListener, server_config as tls_server_config, xds_server_config};
use crate::tokens::{ADMIN_TOKEN_FILE, TokenError, Tokens};

/// Default admin API address.
pub const DEFAULT_API_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 7070);
/// Default xDS (ADS gRPC) address.
pub const DEFAULT_XDS_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 18000);
/// How long [`ControlHandle::shutdown`] waits for each task before aborting it.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// What `biplane control` is started with.
#[derive(Debug, Clone)]
pub struct ControlOptions {
    /// Admin API listen address (`--api-addr`).
    pub api_addr: SocketAddr,
    /// ADS listen address (`--xds-addr`).
    pub xds_addr: SocketAddr,
    /// Store directory (`--data-dir`).
    pub data_dir: PathBuf,
    /// Quiet time before a burst of changes is compiled (`--debounce`).
    pub debounce: Duration,
    /// The IP Envoy listeners bind on the nodes.
    pub bind_ip: IpAddr,
    /// gRPC settings of the xDS listener.
    pub xds_settings: ServerSettings,
    /// Whether the admin API requires bearer tokens with roles (default on; off only with
    /// `--insecure-api`, and a warning is printed at start).
    pub auth: bool,
    /// The CA certificate to use instead of `<data-dir>/ca/ca.crt` (`--ca-cert`; needs
    /// `ca_key`).
    pub ca_cert: Option<PathBuf>,
    /// The CA private key (PKCS#8 PEM) going with `ca_cert` (`--ca-key`).
    pub ca_key: Option<PathBuf>,
    /// The SPIFFE trust domain of node identities.
    pub trust_domain: String,
    /// DNS names and IP addresses in the control plane's server certificate.
    pub server_names: Vec<String>,
    /// Lifetime of node certificates (24 h; tests use seconds).
    pub node_cert_ttl: Duration,
    /// Whether the admin API serves HTTPS with the CA-issued server certificate (default
    /// on).
    pub api_tls: bool,
    /// Whether the xDS server serves TLS only, requires a client certificate from the CA
    /// for ADS and refuses nodes that claim another identity than their certificate's
    /// (default on).
    pub xds_mtls: bool,
}

impl Default for ControlOptions {
    fn default() -> Self {
        ControlOptions {
            api_addr: DEFAULT_API_ADDR,
            xds_addr: DEFAULT_XDS_ADDR,
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            debounce: Duration::from_millis(100),
            bind_ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            xds_settings: ServerSettings::default(),
            auth: true,
            ca_cert: None,
            ca_key: None,
            trust_domain: DEFAULT_TRUST_DOMAIN.to_owned(),
            server_names: vec!["localhost".to_owned(), "127.0.0.1".to_owned()],
            node_cert_ttl: DEFAULT_NODE_CERT_TTL,
            api_tls: true,
            xds_mtls: true,
        }
    }
}

impl ControlOptions {
    /// These options with a plaintext, unauthenticated admin API and a plaintext xDS
    /// server that serves any node (`--insecure`): for tests and trusted networks only.
    #[must_use]
    pub fn insecure(self) -> Self {
        ControlOptions {
            auth: false,
            api_tls: false,
            xds_mtls: false,
            ..self
        }
    }
}

/// Why the control plane could not start.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The store could not be opened.
    #[error("cannot open the store in {path}")]
    Store {
        /// The data directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: StoreError,
    },
    /// A listener could not be bound.
    #[error("cannot listen on {addr} for the {what}")]
    Bind {
        /// `admin API` or `xDS server`.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A startup task panicked.
    #[error("startup failed: {0}")]
    Startup(String),
    /// The CA could not be loaded or created, or the server certificate issued.
    #[error("certificate authority: {0}")]
    Ca(#[from] CaError),
    /// The initial admin token could not be minted or written.
    #[error("initial admin token: {0}")]
    Tokens(#[from] TokenError),
    /// A TLS configuration could not be built.
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// A running control plane.
pub struct ControlHandle {
    api_addr: SocketAddr,
    xds_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    tasks: Vec<(&'static str, JoinHandle<()>)>,
    fleet: FleetStatus,
    cache: SnapshotCache,
    metrics: Arc<Metrics>,
    ca: Arc<Ca>,
    server_cert: CertAndKey,
    tokens: Tokens,
    admin_token_file: PathBuf,
}

impl std::fmt::Debug for ControlHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlHandle")
            .field("api_addr", &self.api_addr)
            .field("xds_addr", &self.xds_addr)
            .finish_non_exhaustive()
    }
}

impl ControlHandle {
    /// The bound admin API address.
    pub fn api_addr(&self) -> SocketAddr {
        self.api_addr
    }

    /// The bound xDS address.
    pub fn xds_addr(&self) -> SocketAddr {
        self.xds_addr
    }

    /// The fleet view of the ADS server.
    pub fn fleet(&self) -> &FleetStatus {
        &self.fleet
    }

    /// The per-Gateway snapshot cache.
    pub fn cache(&self) -> &SnapshotCache {
        &self.cache
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The certificate authority.
    pub fn ca(&self) -> &Arc<Ca> {
        &self.ca
    }

    /// The control plane's server certificate (chain and key), issued by the CA at start.
    pub fn server_cert(&self) -> &CertAndKey {
        &self.server_cert
    }

    /// Token minting and lookup.
    pub fn tokens(&self) -> &Tokens {
        &self.tokens
    }

    /// Where the initial admin token is (written on first start).
    pub fn admin_token_file(&self) -> &Path {
        &self.admin_token_file
    }

    /// Resolves with the task's name when a server task has ended by itself (a fatal
    /// error). Use it to exit instead of running half a control plane.
    pub async fn wait_for_failure(&mut self) -> &'static str {
        loop {
            if let Some((name, _)) = self.tasks.iter().find(|(_, t)| t.is_finished()) {
                return name;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Stops everything: ADS streams end with `UNAVAILABLE`, watch streams end, the
    /// servers drain, the controller stops and the store is closed (the data directory
    /// can be opened again once this returns).
    pub async fn shutdown(self) {
        self.shutdown.send_replace(true);
        for (name, mut task) in self.tasks {
            match tokio::time::timeout(SHUTDOWN_GRACE, &mut task).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(task = name, error = %e, "task failed"),
                Err(_) => {
                    tracing::warn!(task = name, "task did not stop in time; aborting it");
                    task.abort();
                    let _ = task.await;
                }
            }
        }
        tracing::info!("control plane stopped");
    }
}

/// Starts the control plane (see the module docs); returns once every listener is bound.
pub async fn run(options: ControlOptions) -> Result<ControlHandle, ControlError> {
    let dir = options.data_dir.clone();
    let opened =
        tokio::task::spawn_blocking(move || RedbStore::open(&dir, StoreOptions::default()))
            .await
            .map_err(|e| ControlError::Startup(e.to_string()))?;
    let store: Arc<dyn Store> = Arc::new(opened.map_err(|source| ControlError::Store {
        path: options.data_dir.clone(),
        source,
    })?);
    // The store holds Secret resources (TLS keys) and token hashes: owner only.
    {
        use std::os::unix::fs::PermissionsExt;
        if let Err(e) =
            std::fs::set_permissions(&options.data_dir, std::fs::Permissions::from_mode(0o700))
        {
            tracing::warn!(dir = %options.data_dir.display(), error = %e, "cannot restrict the data directory to its owner (0700)");
        }
    }
    let ca = Arc::new(open_ca(&options)?);
    let server_cert = ca.issue_server_cert(&options.server_names)?;
    let tokens = Tokens::new(store.clone());
    let revocations =
        Revocations::load(store.clone())
            .await
            .map_err(|source| ControlError::Store {
                path: options.data_dir.clone(),
                source,
            })?;
    let certs = NodeCerts {
        ca: ca.clone(),
        tokens: tokens.clone(),
        revocations: revocations.clone(),
    };
    let admin_token_file = options.data_dir.join(ADMIN_TOKEN_FILE);
    if let Some(path) = tokens.ensure_initial_admin(&options.data_dir).await? {
        tracing::info!(file = %path.display(), "wrote the initial admin token (mode 0600)");
    }
    let api_tls = if options.api_tls {
        Some(tls_server_config(&server_cert)?)
    } else {
        tracing::warn!("admin API serves plaintext HTTP");
        None
    };
    if !options.auth {
        tracing::warn!(
            "admin API is unauthenticated: anyone who can reach it can change the configuration"
        );
    }
    let api_listener = tokio::net::TcpListener::bind(options.api_addr)
        .await
        .map_err(|source| ControlError::Bind {
            what: "admin API",
            addr: options.api_addr,
            source,
        })?;
    let xds_listener = tokio::net::TcpListener::bind(options.xds_addr)
        .await
        .map_err(|source| ControlError::Bind {
            what: "xDS server",
            addr: options.xds_addr,
            source,
        })?;
    let bound = |l: &tokio::net::TcpListener, what, addr| {
        l.local_addr()
            .map_err(|source| ControlError::Bind { what, addr, source })
    };
    let api_addr = bound(&api_listener, "admin API", options.api_addr)?;
    let xds_addr = bound(&xds_listener, "xDS server", options.xds_addr)?;

    write_client_config(&options, api_addr, &ca, &admin_token_file);

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let cache = SnapshotCache::new();
    let fleet = FleetStatus::new();
    let metrics = Arc::new(Metrics::new(fleet.clone()));
    let shared = ControllerShared::new(fleet.clone(), metrics.clone());
    let translate = TranslateOptions {
        bind_ip: options.bind_ip,
    };
    let mut tasks = Vec::new();

    // The tracker subscribes before any node can connect.
    let events = fleet.subscribe();
    tasks.push((
        "fleet tracker",
        tokio::spawn(track_fleet(shared.clone(), events, shutdown_rx.clone())),
    ));

    let controller = Controller::new(
        store.clone(),
        cache.clone(),
        shared.clone(),
        ControllerOptions {
            debounce: options.debounce,
            translate,
            ..ControllerOptions::default()
        },
    );
    tasks.push((
        "controller",
        tokio::spawn(controller.run(shutdown_rx.clone())),
    ));

    let ads_options = AdsOptions {
        authorizer: options
            .xds_mtls
            .then(|| xds_node_authorizer(ca.trust_domain().to_owned(), revocations.clone())),
        ..AdsOptions::default()
    };
    let ads_server = AdsServer::with_options(cache.clone(), fleet.clone(), ads_options);
    let ads = StoppableAds {
        inner: ads_server.clone(),
        shutdown: shutdown_rx.clone(),
    };
    let service = AggregatedDiscoveryServiceServer::new(ads).max_decoding_message_size(64 << 20);
    let mut xds_builder = options.xds_settings.builder();
    let mut xds_router = xds_builder.add_service(service);
    let shutdown = stopped(shutdown_rx.clone());
    let xds_server: Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>> =
        if options.xds_mtls {
            xds_router = xds_router.add_service(
                biplane_xds::node_rpc::NodeCertificatesServer::new(certs.clone()),
            );
            let config = xds_server_config(&server_cert, ca.cert_pem())?;
            let incoming = TlsListener::new(xds_listener, config, "xDS").map_err(|source| {
                ControlError::Bind {
                    what: "xDS server",
                    addr: xds_addr,
                    source,
                }
            })?;
            Box::pin(xds_router.serve_with_incoming_shutdown(incoming, shutdown))
        } else {
            tracing::warn!("xDS server is plaintext and serves any node that connects");
            Box::pin(
                xds_router
                    .serve_with_incoming_shutdown(TcpListenerStream::new(xds_listener), shutdown),
            )
        };
    tasks.push((
        "xDS server",
        tokio::spawn(async move {
            if let Err(e) = xds_server.await {
                tracing::error!(error = %e, "xDS server failed");
            }
        }),
    ));

    let state = Arc::new(ApiState {
        store,
        shared,
        fleet: fleet.clone(),
        metrics: metrics.clone(),
        translate,
        shutdown: shutdown_rx.clone(),
        tokens: tokens.clone(),
        auth: options.auth,
        ca: ca.clone(),
        certs: certs.clone(),
        revocations,
        ads: ads_server,
    });
    let app = router(state);
    let api_shutdown = stopped(shutdown_rx.clone());
    let api_task = if let Some(config) = api_tls {
        let listener = TlsListener::new(api_listener, config, "admin API").map_err(|source| {
            ControlError::Bind {
                what: "admin API",
                addr: api_addr,
                source,
            }
        })?;
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(api_shutdown)
                .await
            {
                tracing::error!(error = %e, "admin API failed");
            }
        })
    } else {
        tokio::spawn(async move {
            if let Err(e) = axum::serve(api_listener, app)
                .with_graceful_shutdown(api_shutdown)
                .await
            {
                tracing::error!(error = %e, "admin API failed");
            }
        })
    };
    tasks.push(("admin API", api_task));
    tracing::info!(%api_addr, %xds_addr, api_tls = options.api_tls, xds_mtls = options.xds_mtls, auth = options.auth, data_dir = %options.data_dir.display(), "control plane started");
    Ok(ControlHandle {
        api_addr,
        xds_addr,
        shutdown: shutdown_tx,
        tasks,
        fleet,
        cache,
        metrics,
        ca,
        server_cert,
        tokens,
        admin_token_file,
    })
}

/// The file in the data directory that tells the CLI how to reach this control plane.
pub const CLIENT_CONFIG_FILE: &str = "client.yaml";

/// Writes `<data-dir>/client.yaml` (server URL, CA file, admin token file) so the CLI,
/// run next to the data directory, needs no flags. Failing to write it is only a warning.
fn write_client_config(options: &ControlOptions, api_addr: SocketAddr, ca: &Ca, token_file: &Path) {
    let host = match api_addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    let scheme = if options.api_tls { "https" } else { "http" };
    let absolute = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let mut text = format!(
        "# Written by the control plane at every start: how `biplane` CLI commands run next\n\
         # to this data directory reach it. Copy it to ~/.config/biplane/config.yaml to use\n\
         # it from elsewhere.\nserver: {scheme}://{}\n",
        SocketAddr::new(host, api_addr.port())
    );
    if options.api_tls
        && let Some(ca_path) = ca.cert_path()
    {
        text.push_str(&format!(
            "caFile: {:?}\n",
            absolute(ca_path).display().to_string()
        ));
    }
    if options.auth && token_file.exists() {
        text.push_str(&format!(
            "tokenFile: {:?}\n",
            absolute(token_file).display().to_string()
        ));
    }
    let path = options.data_dir.join(CLIENT_CONFIG_FILE);
    if let Err(e) = crate::ca::write_public_file(&path, text.as_bytes()) {
        tracing::warn!(error = %e, "cannot write the client config");
    }
}

/// Loads or creates the CA per the options.
fn open_ca(options: &ControlOptions) -> Result<Ca, ControlError> {
    let source = match (&options.ca_cert, &options.ca_key) {
        (Some(cert), Some(key)) => CaSource::Files {
            cert: cert.clone(),
            key: key.clone(),
        },
        (None, None) => CaSource::DataDir(options.data_dir.clone()),
        _ => {
            return Err(ControlError::Ca(CaError::InvalidCa(
                "--ca-cert and --ca-key go together".to_owned(),
            )));
        }
    };
    Ok(Ca::open(
        &source,
        &options.trust_domain,
        options.node_cert_ttl,
    )?)
}

/// Resolves once the shutdown flag is set (or its sender is gone).
async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// The ADS service whose response streams end with `UNAVAILABLE` on shutdown, so the
/// gRPC server can drain (ADS streams otherwise never end).
#[derive(Clone)]
struct StoppableAds {
    inner: AdsServer,
    shutdown: watch::Receiver<bool>,
}

/// A response stream that ends at shutdown.
pub struct UntilShutdown<S> {
    inner: S,
    stop: Pin<Box<dyn Future<Output = ()> + Send>>,
    ended: bool,
}

impl<S> UntilShutdown<S> {
    fn new(inner: S, shutdown: watch::Receiver<bool>) -> Self {
        UntilShutdown {
            inner,
            stop: Box::pin(stopped(shutdown)),
            ended: false,
        }
    }
}

impl<S, T> Stream for UntilShutdown<S>
where
    S: Stream<Item = Result<T, Status>> + Unpin,
{
    type Item = Result<T, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        if this.stop.as_mut().poll(cx).is_ready() {
            this.ended = true;
            return Poll::Ready(Some(Err(Status::unavailable(
                "the control plane is shutting down",
            ))));
        }
        Pin::new(&mut this.inner).poll_next(cx)
    }
}

type Sotw = <AdsServer as AggregatedDiscoveryService>::StreamAggregatedResourcesStream;
type Delta = <AdsServer as AggregatedDiscoveryService>::DeltaAggregatedResourcesStream;

#[tonic::async_trait]
impl AggregatedDiscoveryService for StoppableAds {
    type StreamAggregatedResourcesStream = UntilShutdown<Sotw>;
    type DeltaAggregatedResourcesStream = UntilShutdown<Delta>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<tonic::Response<Self::StreamAggregatedResourcesStream>, Status> {
        let resp = self.inner.stream_aggregated_resources(request).await?;
        let shutdown = self.shutdown.clone();
        Ok(resp.map(|s| UntilShutdown::new(s, shutdown)))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<tonic::Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let resp = self.inner.delta_aggregated_resources(request).await?;
        let shutdown = self.shutdown.clone();
        Ok(resp.map(|s| UntilShutdown::new(s, shutdown)))
    }
}
