//! Biplane's data plane: listeners, TLS, HTTP and TCP proxying, routing, load balancing,
//! admin endpoint.
//!
//! Pipeline of one connection (each phase is a module):
//! accept (`listener`) → filter-chain selection by SNI and TLS termination or passthrough
//! (`tls`) → L4 forwarding (`tcp`) or HTTP (`http`): route → filters → pick endpoint
//! (`lb`) → upstream (`http::upstream`) → response filters → access log (`http::log`).
//!
//! Entry point: [`Proxy`] (`start`, `apply`, `shutdown`), which owns the listeners' accept
//! loops and the admin server (`admin`).
//!
//! Architecture Invariant: this crate knows nothing of xDS, protobuf, the resource model
//! or the store. It is fed `biplane_config::Config` values and compiles each into an
//! immutable [`Snapshot`] that is swapped in atomically (`ArcSwap`).

pub mod admin;
pub mod http;
pub mod lb;
pub mod listener;
pub mod memory;
pub mod metrics;
mod proxy;
pub mod tcp;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

pub use metrics::Metrics;
pub use proxy::{DrainReport, Proxy, ProxyError};

/// One immutable, compiled configuration. Requests load the current one once
/// (`Shared::snapshot.load()`) and use it to the end; a swap affects only later loads.
pub struct Snapshot {
    /// The config it was compiled from (served by `/config_dump`, keys redacted).
    pub config: biplane_config::Config,
    /// Route tables and clusters (with balancers and pools), compiled by `http::compile`.
    pub http: http::HttpState,
}

/// State shared by every connection of a proxy.
pub struct Shared {
    pub snapshot: ArcSwap<Snapshot>,
    pub metrics: Arc<Metrics>,
    pub options: ProxyOptions,
}

/// What the HTTP and TCP layers know about a downstream connection.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// Name of the `biplane_config::Listener` that accepted it.
    pub listener: Arc<str>,
    pub peer: SocketAddr,
    pub local: SocketAddr,
    /// TLS was terminated by us (so `x-forwarded-proto: https`).
    pub tls: bool,
    /// ALPN negotiated `h2` (or prior-knowledge h2c is to be detected by the server).
    pub alpn_h2: bool,
    /// SNI sent by the client, if any.
    pub sni: Option<Arc<str>>,
}

/// Process-level tunables (CLI flags), not part of the pushed config.
#[derive(Debug, Clone)]
pub struct ProxyOptions {
    /// Admin listener (`/ready`, `/stats/prometheus`, `/config_dump`); `None` = none.
    pub admin_addr: Option<SocketAddr>,
    /// On shutdown, how long in-flight requests and connections may take to finish.
    pub drain_timeout: Duration,
    /// Write one JSON line per request to stdout.
    pub access_log: bool,
}

impl Default for ProxyOptions {
    fn default() -> Self {
        Self {
            admin_addr: None,
            drain_timeout: Duration::from_secs(10),
            access_log: true,
        }
    }
}
