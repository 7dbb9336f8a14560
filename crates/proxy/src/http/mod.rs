//! The HTTP layer of the data plane: compiled route tables and clusters ([`HttpState`],
//! built by [`compile`]) and the per-connection server ([`serve_connection`]).
//!
//! Modules, in pipeline order: `conn` (protocol choice; hyper's HTTP/2 server, its idle
//! timeout and drain) → `h1` (our HTTP/1.x server: heads, framing checks, bodies,
//! keep-alive) → `service` (the request pipeline) → `router` (vhost and route
//! matching) → `filters` (header mutation, rewrites, hop-by-hop, x-forwarded-*) →
//! `upstream` (clusters, balancers from `crate::lb`, pooled clients) → `body` (streaming
//! bodies with byte counts) → `log` (JSON access log); `error` maps failures to responses.

pub mod body;
pub mod conn;
pub mod error;
pub mod filters;
pub mod h1;
pub mod log;
pub mod router;
pub mod service;
pub mod upstream;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

pub use conn::serve_connection;
pub use error::HttpError;
pub use router::RouteTable;
pub use upstream::ClusterState;

use crate::Metrics;
pub use crate::lb::LoadGuard;

/// Route tables and clusters compiled from a config: part of a [`crate::Snapshot`].
#[derive(Debug, Default)]
pub struct HttpState {
    /// By `RouteConfig` name.
    pub route_tables: HashMap<String, Arc<RouteTable>>,
    /// By cluster name.
    pub clusters: HashMap<String, Arc<ClusterState>>,
}

/// Compile a config. `previous` lets state carry over a swap: an `Arc<ClusterState>` (its
/// connection pool, round-robin cursor, least-request counters) is reused when the
/// cluster's settings and endpoints are unchanged; otherwise a new one is built. Cannot fail
/// (the config is validated).
pub fn compile(
    config: &biplane_config::Config,
    metrics: &Arc<Metrics>,
    previous: Option<&HttpState>,
) -> HttpState {
    let mut clusters = HashMap::with_capacity(config.clusters.len());
    for c in &config.clusters {
        let old = previous.and_then(|p| p.clusters.get(&c.name));
        let state = match old {
            Some(old) if old.same_as(c) => old.clone(),
            _ => {
                let state = ClusterState::new(c, metrics);
                // Endpoints that stay keep their upstream connections.
                if let Some(old) = old {
                    state.adopt_connections(old);
                }
                Arc::new(state)
            }
        };
        clusters.insert(c.name.clone(), state);
    }

    // Which listeners use which route config (metric handles are per listener).
    let mut users: HashMap<&str, Vec<Arc<str>>> = HashMap::new();
    let mut seen: HashSet<(&str, &str)> = HashSet::new();
    for l in &config.listeners {
        for fc in &l.filter_chains {
            if let biplane_config::ChainHandler::Http(hcm) = &fc.handler
                && seen.insert((hcm.route_config_name.as_str(), l.name.as_str()))
            {
                users
                    .entry(hcm.route_config_name.as_str())
                    .or_default()
                    .push(l.name.as_str().into());
            }
        }
    }

    let route_tables = config
        .route_configs
        .iter()
        .map(|rc| {
            let listeners = users.get(rc.name.as_str()).map_or(&[][..], Vec::as_slice);
            (
                rc.name.clone(),
                Arc::new(RouteTable::compile(rc, listeners, &clusters, metrics)),
            )
        })
        .collect();
    HttpState {
        route_tables,
        clusters,
    }
}
