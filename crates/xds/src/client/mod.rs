//! The proxy's xDS client: one ADS stream (Delta by default, State of the World as an
//! option or when a server does not implement Delta) to a list of control planes,
//! reconnecting with jittered exponential backoff; it keeps the resources it was sent,
//! applies every complete set through a caller's callback, ACKs/NACKs, persists the
//! last applied set (last-known-good) and falls back to it when no control plane answers.
//!
//! # Use
//! ```no_run
//! # async fn demo() -> Result<(), biplane_xds::client::ClientError> {
//! use biplane_xds::client::{ClientOptions, spawn};
//! let opts = ClientOptions::new(vec!["127.0.0.1:18000".into()], "node-1", "gw");
//! let handle = spawn(opts, |config| async move {
//!     // proxy.apply(config).await.map_err(|e| e.to_string())
//!     let _ = config;
//!     Ok(())
//! })?;
//! let status = handle.status(); // a watch of ClientStatus
//! # let _ = status; Ok(()) }
//! ```
//!
//! # Protocol (see `shared/xds-notes.md`)
//! - `node`: `id`, `cluster` = the Gateway, `user_agent_name` `biplane` and the crate
//!   version; sent on the first request of each stream.
//! - Subscriptions: LDS and CDS wildcard (`"*"` in Delta, no names in SotW); EDS by the
//!   EDS clusters' service names, RDS by the names the listeners' HCMs use, SDS by the
//!   secrets the listeners' TLS contexts use, updated after every response. EDS/RDS/SDS
//!   resources no parent refers to any more are dropped (they die implicitly).
//! - Warming: a set is applied only once it is complete: LDS and CDS were received, and
//!   every referenced ClusterLoadAssignment, RouteConfiguration and Secret is here. Until
//!   then nothing is applied and the previous config keeps serving.
//! - **ACK/NACK rule.** A response is NACKed when it cannot be decoded (bad protobuf,
//!   wrong type URL, duplicate or empty names), or when it completes a set that
//!   `from_xds` rejects or that the apply callback fails to apply; `error_detail` is
//!   `INVALID_ARGUMENT` with the errors (resource and field path). Every other response
//!   is ACKed: one whose set applied, and one accepted into a still-warming set (as Envoy
//!   ACKs a warming listener). A config-level error found when a set completes is thus
//!   reported on the response that completed it, whichever type holds the bad field.
//! - After a NACK the previous config keeps serving. SotW: the response is forgotten (a
//!   server re-sends the whole type when it changes). Delta: the rejected resources are
//!   still recorded as held, because that is what the server believes and it sends only
//!   changes; the held set stays invalid until the server replaces the bad resource.
//!   Meanwhile a response that adds no new translation error is ACKed and held (it did
//!   not make the config invalid); one that adds an error is NACKed.
//! - Responses are applied one by one, as they complete a valid set: a change touching
//!   several types (CDS, EDS, LDS, RDS pushed in that order) reaches the proxy in steps,
//!   each one complete and validated, as in Envoy.
//! - Reconnect: the held set is reset to the applied one. Delta sends it as
//!   `initial_resource_versions` (and `"*"` again for LDS/CDS); SotW re-requests with the
//!   last applied `version_info` per type and waits for fresh LDS and CDS before applying.
//!   Addresses are tried in turn; after each failure the next attempt waits 100 ms
//!   doubling to 10 s, ±20 %, reset once a stream delivered a response. gRPC HTTP/2
//!   keepalive detects dead connections.
//! - Last-known-good ([`lkg`]): after every applied set the full set is written to
//!   `state_dir/lkg.bin`. If nothing was applied `initial_fetch_timeout` after start, the
//!   file is loaded (when whole, checksummed and for this Gateway) and applied; the client
//!   keeps trying the control planes and resyncs when one answers.

pub mod identity;
pub mod lkg;
mod state;

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use biplane_config::Config;
use envoy_types::pb::envoy::config::core::v3::{Node, node};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::{Channel, Endpoint};

pub use crate::server::Protocol;
use crate::server::{PUSH_ORDER, TYPES, type_index};
use crate::{ResourceKind, from_xds};
use lkg::{LKG_FILE, LastKnownGood, LkgError};
use state::{Refs, ResourceState, is_wildcard_type};

/// Jittered exponential backoff between connection attempts.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
    /// Each delay is multiplied by a random factor in `1 ± jitter`.
    pub jitter: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(10),
            jitter: 0.2,
        }
    }
}

/// Options of the client.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Control-plane addresses (`host:port`, or `http://host:port`), tried in turn.
    pub servers: Vec<String>,
    /// `node.id`.
    pub node_id: String,
    /// `node.cluster`: the Gateway this node serves (`name` or `namespace/name`).
    pub gateway: String,
    pub protocol: Protocol,
    /// `node.user_agent_version`.
    pub user_agent_version: String,
    pub backoff: Backoff,
    pub connect_timeout: Duration,
    /// HTTP/2 PING interval on the channel, and how long an answer may take.
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// Where the last-known-good set is written (`lkg.bin`) and read from; `None`: no
    /// persistence.
    pub state_dir: Option<PathBuf>,
    /// With a `state_dir`: if nothing was applied this long after start, load and apply
    /// the last-known-good set. `None`: never.
    pub initial_fetch_timeout: Option<Duration>,
    /// mTLS with the node's certificate ([`identity::load_or_enroll`]); `None`:
    /// plaintext. The addresses stay `host:port`/`http://`: the TLS is this client's own.
    pub tls: Option<Arc<identity::NodeCredentials>>,
}

impl ClientOptions {
    /// Delta, default timings, no persistence.
    pub fn new(
        servers: Vec<String>,
        node_id: impl Into<String>,
        gateway: impl Into<String>,
    ) -> Self {
        ClientOptions {
            servers,
            node_id: node_id.into(),
            gateway: gateway.into(),
            protocol: Protocol::Delta,
            user_agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            backoff: Backoff::default(),
            connect_timeout: Duration::from_secs(5),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            state_dir: None,
            initial_fetch_timeout: None,
            tls: None,
        }
    }
}

/// Why the client cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no control-plane address given")]
    NoServers,
    #[error("invalid control-plane address {address:?}: {message}")]
    BadAddress { address: String, message: String },
    #[error("the gateway name (node.cluster) must not be empty")]
    NoGateway,
}

/// A NACK the client sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientNack {
    pub kind: ResourceKind,
    /// The version of the rejected response.
    pub version: String,
    pub message: String,
    pub at: SystemTime,
}

/// What the client is doing, published on a watch channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientStatus {
    /// A stream is open.
    pub connected: bool,
    /// The address of the current (or last) stream.
    pub server: Option<String>,
    pub protocol: Protocol,
    /// Last ACKed version per type (types ACKed at least once), in push order.
    pub acked: Vec<(ResourceKind, String)>,
    pub last_nack: Option<ClientNack>,
    /// Version label of the config in place, if any.
    pub applied_version: Option<String>,
    /// Configs applied since start (fresh and last-known-good).
    pub applied_count: u64,
    /// The config in place came from the last-known-good file (no fresh one yet).
    pub serving_lkg: bool,
    /// The last connection or stream error.
    pub last_error: Option<String>,
}

impl ClientStatus {
    /// The last ACKed version of `kind`.
    pub fn acked(&self, kind: ResourceKind) -> Option<&str> {
        self.acked
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, v)| v.as_str())
    }
}

/// A running client. Dropping it stops the client (the applied config stays in place).
#[derive(Debug)]
pub struct ClientHandle {
    status: watch::Receiver<ClientStatus>,
    task: JoinHandle<()>,
}

impl ClientHandle {
    /// A watch of the client's status.
    pub fn status(&self) -> watch::Receiver<ClientStatus> {
        self.status.clone()
    }

    /// Stops the client.
    pub fn stop(&self) {
        self.task.abort();
    }

    /// Stops the client and waits until its task (and the apply callback it owns) is
    /// dropped.
    pub async fn shutdown(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }
}

impl Drop for ClientHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts the client on the current runtime. `apply` is called with every complete
/// config (one at a time, never concurrently) and answers whether it is in place.
pub fn spawn<F, Fut>(opts: ClientOptions, apply: F) -> Result<ClientHandle, ClientError>
where
    F: FnMut(Config) -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    if opts.servers.is_empty() {
        return Err(ClientError::NoServers);
    }
    if opts.gateway.is_empty() {
        return Err(ClientError::NoGateway);
    }
    for s in &opts.servers {
        Endpoint::from_shared(uri(s)).map_err(|e| ClientError::BadAddress {
            address: s.clone(),
            message: error_chain(&e),
        })?;
    }
    let (status_tx, status) = watch::channel(ClientStatus {
        connected: false,
        server: None,
        protocol: opts.protocol,
        acked: Vec::new(),
        last_nack: None,
        applied_version: None,
        applied_count: 0,
        serving_lkg: false,
        last_error: None,
    });
    let lkg_deadline = match (&opts.state_dir, opts.initial_fetch_timeout) {
        (Some(_), Some(t)) => Some(Instant::now() + t),
        _ => None,
    };
    let client = Client {
        opts,
        apply,
        status: status_tx,
        state: ResourceState::default(),
        applied: None,
        lkg_deadline,
        progressed: false,
        known_errors: None,
    };
    let task = tokio::spawn(client.run());
    Ok(ClientHandle { status, task })
}

fn uri(server: &str) -> String {
    if server.contains("://") {
        server.to_owned()
    } else {
        format!("http://{server}")
    }
}

/// `error: cause: cause` (tonic's transport errors say little at the top level).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

/// Longest NACK message sent (servers commonly accept 4 MiB messages; keep it readable).
const MAX_NACK_MESSAGE: usize = 16 * 1024;

/// gRPC `INVALID_ARGUMENT`.
const INVALID_ARGUMENT: i32 = 3;

fn error_detail(message: &str) -> envoy_types::pb::google::rpc::Status {
    let mut m = message.to_owned();
    if m.len() > MAX_NACK_MESSAGE {
        let mut cut = MAX_NACK_MESSAGE;
        while !m.is_char_boundary(cut) {
            cut -= 1;
        }
        m.truncate(cut);
        m.push_str(" …(truncated)");
    }
    envoy_types::pb::google::rpc::Status {
        code: INVALID_ARGUMENT,
        message: m,
        details: Vec::new(),
    }
}

/// How a stream ended.
struct SessionEnd {
    message: String,
    /// The server does not implement the RPC (fall back from Delta to SotW).
    unimplemented: bool,
    /// The server refused this node (`PERMISSION_DENIED`: revoked, or an identity
    /// mismatch).
    denied: bool,
}

impl SessionEnd {
    fn msg(message: impl Into<String>) -> Self {
        SessionEnd {
            message: message.into(),
            unimplemented: false,
            denied: false,
        }
    }

    fn status(s: &tonic::Status) -> Self {
        SessionEnd {
            message: format!("{:?}: {}", s.code(), s.message()),
            unimplemented: s.code() == tonic::Code::Unimplemented,
            denied: s.code() == tonic::Code::PermissionDenied,
        }
    }
}

/// What became of one response.
enum Verdict {
    Ack,
    Nack(String),
}

type Ads = AggregatedDiscoveryServiceClient<Channel>;

struct Client<F> {
    opts: ClientOptions,
    apply: F,
    status: watch::Sender<ClientStatus>,
    /// What the server believes this node holds (accepted responses).
    state: ResourceState,
    /// The set in place (fresh or last-known-good).
    applied: Option<ResourceState>,
    /// When to fall back to the last-known-good set if nothing was applied by then.
    lkg_deadline: Option<Instant>,
    /// The current stream delivered at least one response.
    progressed: bool,
    /// Delta: the translation errors of the held set, when an earlier NACK left it
    /// invalid (a later response that adds no new error is ACKed and held).
    known_errors: Option<BTreeSet<String>>,
}

impl<F, Fut> Client<F>
where
    F: FnMut(Config) -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    async fn run(mut self) {
        let mut protocol = self.opts.protocol;
        let mut next_delay = self.opts.backoff.initial;
        let mut attempt = 0usize;
        loop {
            let server = self.opts.servers[attempt % self.opts.servers.len()].clone();
            attempt += 1;
            self.progressed = false;
            self.status.send_modify(|s| {
                s.server = Some(server.clone());
                s.protocol = protocol;
            });
            let mut end = match self.connect(&server).await {
                Ok(ads) => match protocol {
                    Protocol::Delta => self.delta_session(ads).await,
                    Protocol::Sotw => self.sotw_session(ads).await,
                },
                Err(e) => SessionEnd::msg(e),
            };
            if self.opts.tls.is_none()
                && !self.progressed
                && (end.message.contains("h2 protocol error")
                    || end.message.contains("operation was canceled"))
            {
                end.message.push_str(
                    " (plaintext xDS: if the control plane serves TLS, enroll with --token instead of --insecure)",
                );
            }
            self.status.send_modify(|s| {
                s.connected = false;
                s.last_error = Some(end.message.clone());
            });
            if end.denied && self.applied.is_none() && self.lkg_deadline.is_some() {
                // A node the control plane refuses (revoked) must not come back on its
                // saved config by restarting: no last-known-good fallback from now on.
                tracing::error!(server, error = %end.message,
                    "the control plane refused this node: not serving the last-known-good config");
                self.lkg_deadline = None;
            }
            if end.unimplemented && protocol == Protocol::Delta {
                tracing::warn!(
                    server,
                    "the control plane does not implement Delta ADS; falling back to State of the World"
                );
                protocol = Protocol::Sotw;
                attempt -= 1;
                continue;
            }
            if self.progressed {
                next_delay = self.opts.backoff.initial;
            }
            let delay = jitter(next_delay, self.opts.backoff.jitter);
            next_delay = (next_delay * 2).min(self.opts.backoff.max);
            let next = &self.opts.servers[attempt % self.opts.servers.len()];
            tracing::warn!(server, error = %end.message, retry_in = ?delay, next_server = %next,
                "xDS stream to the control plane failed or ended; retrying");
            self.wait(tokio::time::sleep(delay)).await;
        }
    }

    /// Awaits `fut`; meanwhile falls back to the last-known-good set when its deadline
    /// passes with nothing applied.
    async fn wait<T>(&mut self, fut: impl Future<Output = T>) -> T {
        let mut fut = std::pin::pin!(fut);
        loop {
            let Some(deadline) = self.lkg_deadline else {
                return fut.await;
            };
            tokio::select! {
                r = &mut fut => return r,
                () = tokio::time::sleep_until(deadline) => {
                    self.lkg_deadline = None;
                    self.fall_back_to_lkg().await;
                }
            }
        }
    }

    async fn fall_back_to_lkg(&mut self) {
        if self.applied.is_some() {
            return;
        }
        let Some(dir) = self.opts.state_dir.clone() else {
            return;
        };
        let path = dir.join(LKG_FILE);
        let timeout = self.opts.initial_fetch_timeout.unwrap_or_default();
        let gateway = self.opts.gateway.clone();
        let read_path = path.clone();
        let loaded =
            match tokio::task::spawn_blocking(move || lkg::read_for(&read_path, &gateway)).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "reading the last-known-good config failed");
                    return;
                }
            };
        let lkg = match loaded {
            Ok(l) => l,
            Err(LkgError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                tracing::warn!(path = %path.display(), ?timeout,
                    "no config from the control plane yet and no last-known-good config; still waiting (not ready)");
                return;
            }
            Err(e) => {
                tracing::error!(error = %e,
                    "refusing the last-known-good config; still waiting for the control plane (not ready)");
                return;
            }
        };
        let (state, config) = match lkg
            .to_state()
            .map_err(|m| m.to_string())
            .and_then(|s| lkg.config().map(|c| (s, c)).map_err(|e| e.to_string()))
        {
            Ok(x) => x,
            Err(e) => {
                tracing::error!(error = %e, path = %path.display(),
                    "refusing the last-known-good config; still waiting for the control plane (not ready)");
                return;
            }
        };
        let version = config.version.clone();
        match (self.apply)(config).await {
            Ok(()) => {
                let saved_at = humantime_since(lkg.saved_at);
                tracing::warn!(path = %path.display(), %version, saved = %saved_at,
                    "no config from the control plane within {timeout:?}: serving the last-known-good config");
                self.applied = Some(state);
                self.status.send_modify(|s| {
                    s.applied_version = Some(version);
                    s.applied_count += 1;
                    s.serving_lkg = true;
                });
            }
            Err(e) => {
                tracing::error!(error = %e, "applying the last-known-good config failed");
            }
        }
    }

    async fn connect(&mut self, server: &str) -> Result<Ads, String> {
        let endpoint = Endpoint::from_shared(uri(server))
            .map_err(|e| error_chain(&e))?
            .connect_timeout(self.opts.connect_timeout)
            .http2_keep_alive_interval(self.opts.keepalive_interval)
            .keep_alive_timeout(self.opts.keepalive_timeout)
            .keep_alive_while_idle(true)
            .tcp_nodelay(true);
        let channel = match self.opts.tls.clone() {
            Some(creds) => {
                let server = server.to_owned();
                self.wait(async move { creds.connect(endpoint, &server).await })
                    .await
                    .map_err(|e| format!("connecting over mTLS: {e}"))?
            }
            None => self
                .wait(async move { endpoint.connect().await })
                .await
                .map_err(|e| format!("connecting: {}", error_chain(&e)))?,
        };
        Ok(AggregatedDiscoveryServiceClient::new(channel)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20))
    }

    fn node(&self) -> Node {
        Node {
            id: self.opts.node_id.clone(),
            cluster: self.opts.gateway.clone(),
            user_agent_name: "biplane".to_owned(),
            user_agent_version_type: Some(node::UserAgentVersionType::UserAgentVersion(
                self.opts.user_agent_version.clone(),
            )),
            ..Default::default()
        }
    }

    fn connected(&mut self) {
        self.status.send_modify(|s| s.connected = true);
        let (server, protocol) = {
            let s = self.status.borrow();
            (s.server.clone().unwrap_or_default(), s.protocol)
        };
        tracing::info!(server, %protocol, "xDS stream open");
    }

    // ---- Delta ----

    async fn delta_session(&mut self, mut ads: Ads) -> SessionEnd {
        self.state = self.applied.clone().unwrap_or_default();
        self.known_errors = None;
        let (tx, rx) = mpsc::unbounded_channel::<DeltaDiscoveryRequest>();
        let refs = self.state.refs();
        let mut subscribed: Refs = Default::default();
        let mut node = Some(self.node());
        for (i, t) in TYPES.iter().enumerate() {
            let subscribe: Vec<String> = if is_wildcard_type(i) {
                vec!["*".to_owned()]
            } else if refs[i].is_empty() {
                continue;
            } else {
                refs[i].iter().cloned().collect()
            };
            subscribed[i] = refs[i].clone();
            let initial_resource_versions: HashMap<String, String> = self.state.types[i]
                .resources
                .iter()
                .map(|(n, h)| (n.clone(), h.version.clone()))
                .collect();
            let _ = tx.send(DeltaDiscoveryRequest {
                node: node.take(),
                type_url: t.url.to_owned(),
                resource_names_subscribe: subscribe,
                initial_resource_versions,
                ..Default::default()
            });
        }
        let call = ads.delta_aggregated_resources(UnboundedReceiverStream::new(rx));
        let mut inbound = match self.wait(call).await {
            Ok(r) => r.into_inner(),
            Err(s) => return SessionEnd::status(&s),
        };
        self.connected();
        loop {
            let resp = match self.wait(inbound.message()).await {
                Ok(Some(r)) => r,
                Ok(None) => return SessionEnd::msg("stream closed by the control plane"),
                Err(s) => return SessionEnd::status(&s),
            };
            self.progressed = true;
            let DeltaDiscoveryResponse {
                system_version_info,
                resources,
                type_url,
                mut removed_resources,
                removed_resource_names,
                nonce,
                control_plane: _,
                resource_errors: _,
            } = resp;
            removed_resources.extend(removed_resource_names.into_iter().map(|r| r.name));
            let verdict = match type_index(&type_url) {
                Some(i) => {
                    let v = self
                        .on_response(i, Protocol::Delta, |s| {
                            s.apply_delta(i, &system_version_info, &resources, &removed_resources)
                        })
                        .await;
                    self.delta_subscriptions(&tx, &mut subscribed);
                    v
                }
                None => Verdict::Nack(format!("unsupported type_url {type_url:?}")),
            };
            let error_detail = self.record(&type_url, &system_version_info, &verdict);
            let _ = tx.send(DeltaDiscoveryRequest {
                type_url,
                response_nonce: nonce,
                error_detail,
                ..Default::default()
            });
        }
    }

    fn delta_subscriptions(
        &self,
        tx: &mpsc::UnboundedSender<DeltaDiscoveryRequest>,
        subscribed: &mut Refs,
    ) {
        let refs = self.state.refs();
        for (i, t) in TYPES.iter().enumerate() {
            if is_wildcard_type(i) || refs[i] == subscribed[i] {
                continue;
            }
            let subscribe: Vec<String> = refs[i].difference(&subscribed[i]).cloned().collect();
            let unsubscribe: Vec<String> = subscribed[i].difference(&refs[i]).cloned().collect();
            subscribed[i] = refs[i].clone();
            let _ = tx.send(DeltaDiscoveryRequest {
                type_url: t.url.to_owned(),
                resource_names_subscribe: subscribe,
                resource_names_unsubscribe: unsubscribe,
                ..Default::default()
            });
        }
    }

    // ---- State of the World ----

    async fn sotw_session(&mut self, mut ads: Ads) -> SessionEnd {
        self.state = self.applied.clone().unwrap_or_default();
        self.known_errors = None;
        // The server re-sends the full LDS/CDS sets: apply only once both are fresh.
        for i in 0..PUSH_ORDER.len() {
            if is_wildcard_type(i) {
                self.state.types[i].received = false;
            }
        }
        let (tx, rx) = mpsc::unbounded_channel::<DiscoveryRequest>();
        let refs = self.state.refs();
        // Per type: the names requested on this stream (`None`: no request yet) and the
        // nonce of the last response.
        let mut names: [Option<BTreeSet<String>>; 5] = Default::default();
        let mut nonces: [String; 5] = Default::default();
        let mut node = Some(self.node());
        for (i, t) in TYPES.iter().enumerate() {
            if !is_wildcard_type(i) && refs[i].is_empty() {
                continue;
            }
            names[i] = Some(refs[i].clone());
            let _ = tx.send(DiscoveryRequest {
                version_info: self.state.types[i].version.clone(),
                node: node.take(),
                resource_names: refs[i].iter().cloned().collect(),
                type_url: t.url.to_owned(),
                ..Default::default()
            });
        }
        let call = ads.stream_aggregated_resources(UnboundedReceiverStream::new(rx));
        let mut inbound = match self.wait(call).await {
            Ok(r) => r.into_inner(),
            Err(s) => return SessionEnd::status(&s),
        };
        self.connected();
        loop {
            let resp = match self.wait(inbound.message()).await {
                Ok(Some(r)) => r,
                Ok(None) => return SessionEnd::msg("stream closed by the control plane"),
                Err(s) => return SessionEnd::status(&s),
            };
            self.progressed = true;
            let DiscoveryResponse {
                version_info,
                resources,
                canary: _,
                type_url,
                nonce,
                control_plane: _,
                resource_errors: _,
            } = resp;
            let Some(i) = type_index(&type_url) else {
                let verdict = Verdict::Nack(format!("unsupported type_url {type_url:?}"));
                let error_detail = self.record(&type_url, &version_info, &verdict);
                let _ = tx.send(DiscoveryRequest {
                    type_url,
                    response_nonce: nonce,
                    error_detail,
                    ..Default::default()
                });
                continue;
            };
            nonces[i] = nonce;
            let verdict = self
                .on_response(i, Protocol::Sotw, |s| {
                    s.apply_sotw(i, &version_info, &resources)
                })
                .await;
            // Subscription changes of the other named types, then the ACK/NACK (which
            // carries this type's current names).
            let refs = self.state.refs();
            for (j, t) in TYPES.iter().enumerate() {
                if is_wildcard_type(j) || j == i {
                    continue;
                }
                let changed = match &names[j] {
                    None => !refs[j].is_empty(),
                    Some(n) => *n != refs[j],
                };
                if changed {
                    names[j] = Some(refs[j].clone());
                    let _ = tx.send(DiscoveryRequest {
                        version_info: self.state.types[j].version.clone(),
                        resource_names: refs[j].iter().cloned().collect(),
                        type_url: t.url.to_owned(),
                        response_nonce: nonces[j].clone(),
                        ..Default::default()
                    });
                }
            }
            if !is_wildcard_type(i) {
                names[i] = Some(refs[i].clone());
            }
            let error_detail = self.record(&type_url, &version_info, &verdict);
            let _ = tx.send(DiscoveryRequest {
                // ACK: the new version; NACK: the last accepted one.
                version_info: self.state.types[i].version.clone(),
                resource_names: refs[i].iter().cloned().collect(),
                type_url,
                response_nonce: nonces[i].clone(),
                error_detail,
                ..Default::default()
            });
        }
    }

    // ---- shared ----

    /// Applies one response to a copy of the held set; when the copy is complete,
    /// translates and applies it. See the module docs for the ACK/NACK rule.
    async fn on_response(
        &mut self,
        i: usize,
        protocol: Protocol,
        change: impl FnOnce(&mut ResourceState) -> Result<(), String>,
    ) -> Verdict {
        let kind = PUSH_ORDER[i];
        let mut cand = self.state.clone();
        if let Err(e) = change(&mut cand) {
            return Verdict::Nack(format!("{kind} response: {e}"));
        }
        let refs = cand.refs();
        cand.prune(&refs);
        let missing = cand.missing(&refs);
        if !missing.is_empty() {
            tracing::debug!(%kind, waiting_for = ?missing, "update accepted; warming");
            self.state = cand;
            return Verdict::Ack;
        }
        if let Some(applied) = &self.applied
            && cand.same_content(applied)
        {
            // Nothing to change (a re-send, or a fresh set identical to the
            // last-known-good one): the versions move on.
            self.state = cand.clone();
            self.applied = Some(cand);
            self.lkg_deadline = None;
            self.known_errors = None;
            let version = self.state.version_label();
            self.status.send_modify(|s| {
                s.applied_version = Some(version);
                s.serving_lkg = false;
            });
            return Verdict::Ack;
        }
        let version = cand.version_label();
        let config = match cand.to_resources().and_then(|r| from_xds(&r, &version)) {
            Ok(c) => c,
            Err(e) => {
                let errors: BTreeSet<String> = e.0.iter().map(|x| x.to_string()).collect();
                if protocol == Protocol::Delta {
                    let nothing_new = self
                        .known_errors
                        .as_ref()
                        .is_some_and(|known| errors.is_subset(known));
                    // The server records what it sent and re-sends only what changes:
                    // the held set keeps the rejected resources.
                    self.state = cand;
                    self.known_errors = Some(errors);
                    if nothing_new {
                        // The held set was already invalid (an earlier NACK); this
                        // response adds nothing wrong: accepted, pending the fix.
                        tracing::debug!(%kind, "update accepted; the held set still has the errors of an earlier NACK");
                        return Verdict::Ack;
                    }
                }
                return Verdict::Nack(e.to_string());
            }
        };
        if let Err(e) = (self.apply)(config).await {
            if protocol == Protocol::Delta {
                self.state = cand;
                self.known_errors = None;
            }
            return Verdict::Nack(format!("the proxy could not apply the config: {e}"));
        }
        self.known_errors = None;
        tracing::info!(%version, "xDS config applied");
        self.state = cand.clone();
        self.lkg_deadline = None;
        self.status.send_modify(|s| {
            s.applied_version = Some(version);
            s.applied_count += 1;
            s.serving_lkg = false;
        });
        self.save_lkg(&cand).await;
        self.applied = Some(cand);
        Verdict::Ack
    }

    async fn save_lkg(&mut self, state: &ResourceState) {
        let Some(dir) = &self.opts.state_dir else {
            return;
        };
        let path = dir.join(LKG_FILE);
        let lkg = LastKnownGood::from_state(
            state,
            &self.opts.gateway,
            &self.opts.node_id,
            SystemTime::now(),
        );
        let write_path = path.clone();
        match tokio::task::spawn_blocking(move || lkg::write(&write_path, &lkg)).await {
            Ok(Ok(())) => tracing::debug!(path = %path.display(), "last-known-good config saved"),
            Ok(Err(e)) => tracing::warn!(error = %e, "could not save the last-known-good config"),
            Err(e) => tracing::warn!(error = %e, "could not save the last-known-good config"),
        }
    }

    /// Logs the verdict, updates the status and returns the `error_detail` to send.
    fn record(
        &mut self,
        type_url: &str,
        version: &str,
        verdict: &Verdict,
    ) -> Option<envoy_types::pb::google::rpc::Status> {
        let kind = ResourceKind::from_type_url(type_url).unwrap_or(ResourceKind::Unknown);
        match verdict {
            Verdict::Ack => {
                tracing::debug!(%kind, version, "ACK");
                if kind != ResourceKind::Unknown {
                    self.status.send_modify(|s| {
                        match s.acked.iter_mut().find(|(k, _)| *k == kind) {
                            Some(e) => e.1 = version.to_owned(),
                            None => {
                                s.acked.push((kind, version.to_owned()));
                                s.acked.sort_by_key(|(k, _)| {
                                    PUSH_ORDER.iter().position(|p| p == k).unwrap_or(usize::MAX)
                                });
                            }
                        }
                    });
                }
                None
            }
            Verdict::Nack(message) => {
                tracing::warn!(%kind, version, error = %message,
                    "NACK: update rejected, the previous config keeps serving");
                self.status.send_modify(|s| {
                    s.last_nack = Some(ClientNack {
                        kind,
                        version: version.to_owned(),
                        message: message.clone(),
                        at: SystemTime::now(),
                    });
                });
                Some(error_detail(message))
            }
        }
    }
}

fn jitter(d: Duration, jitter: f64) -> Duration {
    if jitter <= 0.0 {
        return d;
    }
    let j = jitter.min(1.0);
    d.mul_f64(rand::random_range((1.0 - j)..=(1.0 + j)))
}

/// `N s ago` for logs.
fn humantime_since(t: SystemTime) -> String {
    match SystemTime::now().duration_since(t) {
        Ok(d) => format!("{}s ago", d.as_secs()),
        Err(_) => "in the future".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

    use super::*;

    #[test]
    fn jitter_stays_within_bounds() {
        for _ in 0..1000 {
            let d = jitter(Duration::from_millis(1000), 0.2);
            assert!(
                d >= Duration::from_millis(800) && d <= Duration::from_millis(1200),
                "{d:?}"
            );
        }
        assert_eq!(jitter(Duration::from_secs(1), 0.0), Duration::from_secs(1));
    }

    #[test]
    fn nack_messages_are_bounded() {
        let long = "é".repeat(MAX_NACK_MESSAGE);
        let d = error_detail(&long);
        assert!(d.message.len() <= MAX_NACK_MESSAGE + 20);
        assert_eq!(d.code, INVALID_ARGUMENT);
    }
}
