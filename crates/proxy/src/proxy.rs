//! [`Proxy`]: the data plane's public face. Compiles a config, binds its listeners (and the
//! admin listener), swaps configs atomically with a listener diff, and shuts down with a
//! bounded graceful drain.
//!
//! Apply is all-or-nothing: everything that can fail (TLS material, binds) happens before
//! anything is swapped, and a failure drops what was prepared.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::{Mutex, watch};
use tokio::task::JoinHandle;

use crate::admin::{self, AdminState};
use crate::listener::{self, ChainError, ChainTable};
use crate::{ProxyOptions, Shared, Snapshot, http};

/// What a graceful drain achieved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DrainReport {
    /// Connections that finished on their own after draining began.
    pub drained: usize,
    /// Connections still open at the drain deadline, aborted.
    pub aborted: usize,
}

impl std::ops::AddAssign for DrainReport {
    fn add_assign(&mut self, rhs: Self) {
        self.drained += rhs.drained;
        self.aborted += rhs.aborted;
    }
}

/// Why a config could not be started or applied. Nothing was changed when one is returned.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("listener {listener:?}: cannot bind {address}: {source}")]
    Bind {
        listener: String,
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("admin listener: cannot bind {address}: {source}")]
    AdminBind {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Chain(#[from] ChainError),
    #[error("two listeners are named {0:?}")]
    DuplicateListener(String),
}

/// A running data plane.
pub struct Proxy {
    shared: Arc<Shared>,
    admin: Arc<AdminState>,
    admin_server: Option<AdminServer>,
    listeners: Mutex<Listeners>,
}

struct AdminServer {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

#[derive(Default)]
struct Listeners {
    active: Vec<ListenerHandle>,
    /// Accept tasks of removed listeners, still draining their connections.
    draining: Vec<JoinHandle<DrainReport>>,
}

struct ListenerHandle {
    name: String,
    /// The address in the config (may have port 0).
    configured: SocketAddr,
    /// The address actually bound.
    bound: SocketAddr,
    table: Arc<ArcSwap<ChainTable>>,
    stop: watch::Sender<bool>,
    task: JoinHandle<DrainReport>,
}

impl ListenerHandle {
    fn start(
        name: String,
        configured: SocketAddr,
        socket: TcpListener,
        table: ChainTable,
        shared: &Arc<Shared>,
    ) -> Self {
        let bound = socket.local_addr().unwrap_or(configured);
        let table = Arc::new(ArcSwap::from_pointee(table));
        let (stop, stop_rx) = watch::channel(false);
        let task = listener::spawn(socket, table.clone(), shared.clone(), stop_rx);
        tracing::info!(listener = %name, address = %bound, "listening");
        Self {
            name,
            configured,
            bound,
            table,
            stop,
            task,
        }
    }
}

impl Proxy {
    /// Compiles the config, binds every listener (and the admin listener if configured),
    /// and starts serving. Fails before serving anything if a bind or a TLS chain fails.
    /// `/ready` answers 200 at once: the config is in place.
    pub async fn start(
        config: biplane_config::Config,
        options: ProxyOptions,
    ) -> Result<Proxy, ProxyError> {
        Self::start_inner(config, options, true).await
    }

    /// Starts with no listeners and `/ready` answering 503 (only the admin listener, if
    /// configured, is bound): for a proxy whose config arrives later (xDS). Call
    /// [`Proxy::apply`] then [`Proxy::set_ready`] once the first complete config is in.
    pub async fn start_pending(options: ProxyOptions) -> Result<Proxy, ProxyError> {
        Self::start_inner(biplane_config::Config::default(), options, false).await
    }

    async fn start_inner(
        config: biplane_config::Config,
        options: ProxyOptions,
        ready: bool,
    ) -> Result<Proxy, ProxyError> {
        check_unique_names(&config)?;
        let metrics = Arc::new(crate::Metrics::new());
        let http = http::compile(&config, &metrics, None);
        let mut prepared = Vec::with_capacity(config.listeners.len());
        for l in &config.listeners {
            let table = ChainTable::compile(l, &http, &metrics, None)?;
            prepared.push((l.name.clone(), l.address, table));
        }
        let mut sockets = Vec::with_capacity(prepared.len());
        for (name, address, _) in &prepared {
            sockets.push(bind(name, *address).await?);
        }
        let admin_socket = match options.admin_addr {
            Some(address) => Some(
                TcpListener::bind(address)
                    .await
                    .map_err(|source| ProxyError::AdminBind { address, source })?,
            ),
            None => None,
        };

        let shared = Arc::new(Shared {
            snapshot: ArcSwap::from_pointee(Snapshot { config, http }),
            metrics,
            options,
        });
        let active: Vec<ListenerHandle> = prepared
            .into_iter()
            .zip(sockets)
            .map(|((name, configured, table), socket)| {
                ListenerHandle::start(name, configured, socket, table, &shared)
            })
            .collect();
        let admin = Arc::new(AdminState::new(shared.clone()));
        admin.listeners.store(Arc::new(addrs(&active)));
        let admin_server = match admin_socket {
            Some(socket) => {
                let addr = socket.local_addr().unwrap_or_else(|_| {
                    // Bound a moment ago; local_addr cannot realistically fail.
                    shared
                        .options
                        .admin_addr
                        .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)))
                });
                let (stop, stop_rx) = watch::channel(false);
                let task = admin::spawn(socket, admin.clone(), stop_rx);
                tracing::info!(address = %addr, "admin listening");
                Some(AdminServer { addr, stop, task })
            }
            None => None,
        };
        admin.ready.store(ready, Ordering::Release);
        let trim = crate::memory::release_free_heap();
        tracing::debug!(trim_us = trim.as_micros(), "freed heap returned to the OS");
        Ok(Proxy {
            shared,
            admin,
            admin_server,
            listeners: Mutex::new(Listeners {
                active,
                draining: Vec::new(),
            }),
        })
    }

    /// Bound address of the admin listener, if one is configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_server.as_ref().map(|a| a.addr)
    }

    /// Actual bound addresses by listener name, in config order.
    pub fn listener_addrs(&self) -> Vec<(String, SocketAddr)> {
        self.admin.listeners.load().as_ref().clone()
    }

    /// State shared with every connection (snapshot, metrics, options).
    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// Whether `/ready` answers 200.
    pub fn is_ready(&self) -> bool {
        self.admin.ready.load(Ordering::Acquire)
    }

    /// Sets what `/ready` answers (for modes where the config arrives later).
    pub fn set_ready(&self, ready: bool) {
        self.admin.ready.store(ready, Ordering::Release);
    }

    /// Swaps in a new config atomically. New listeners bind first (a bind error returns
    /// `Err` with nothing changed); listeners removed stop accepting and drain in the
    /// background; a listener whose name and address are unchanged keeps its socket and its
    /// connections, and its new filter chains apply to new connections. A listener renamed
    /// on the same (non-zero) port also keeps its socket. Routes and clusters apply to new
    /// requests at once.
    pub async fn apply(&self, config: biplane_config::Config) -> Result<(), ProxyError> {
        check_unique_names(&config)?;
        let mut ls = self.listeners.lock().await;
        let metrics = &self.shared.metrics;
        let old = self.shared.snapshot.load_full();
        let http = http::compile(&config, metrics, Some(&old.http));

        // Plan: which existing listener each new one takes over, and compile its chains.
        enum Plan {
            Reuse(usize, ChainTable),
            New(ChainTable),
        }
        let mut claimed = vec![false; ls.active.len()];
        let mut plans = Vec::with_capacity(config.listeners.len());
        for l in &config.listeners {
            let same = |h: &ListenerHandle| h.name == l.name && h.configured == l.address;
            let same_port = |h: &ListenerHandle| l.address.port() != 0 && h.configured == l.address;
            let found = (0..ls.active.len())
                .find(|&i| !claimed[i] && same(&ls.active[i]))
                .or_else(|| {
                    (0..ls.active.len()).find(|&i| !claimed[i] && same_port(&ls.active[i]))
                });
            match found {
                Some(i) => {
                    claimed[i] = true;
                    let previous = ls.active[i].table.load_full();
                    plans.push(Plan::Reuse(
                        i,
                        ChainTable::compile(l, &http, metrics, Some(&previous))?,
                    ));
                }
                None => plans.push(Plan::New(ChainTable::compile(l, &http, metrics, None)?)),
            }
        }
        let mut sockets = Vec::new();
        for (l, plan) in config.listeners.iter().zip(&plans) {
            if let Plan::New(_) = plan {
                sockets.push(bind(&l.name, l.address).await?);
            }
        }

        // Commit: nothing below can fail.
        let names: Vec<(String, SocketAddr)> = config
            .listeners
            .iter()
            .map(|l| (l.name.clone(), l.address))
            .collect();
        let version = config.version.clone();
        self.shared
            .snapshot
            .store(Arc::new(Snapshot { config, http }));
        metrics.config_swaps.inc();

        let mut old_active: Vec<Option<ListenerHandle>> = ls.active.drain(..).map(Some).collect();
        let mut sockets = sockets.into_iter();
        let mut active = Vec::with_capacity(plans.len());
        for ((name, configured), plan) in names.into_iter().zip(plans) {
            match plan {
                Plan::Reuse(i, table) => {
                    if let Some(mut handle) = old_active[i].take() {
                        handle.table.store(Arc::new(table));
                        handle.name = name;
                        active.push(handle);
                    }
                }
                Plan::New(table) => {
                    if let Some(socket) = sockets.next() {
                        active.push(ListenerHandle::start(
                            name,
                            configured,
                            socket,
                            table,
                            &self.shared,
                        ));
                    }
                }
            }
        }
        for handle in old_active.into_iter().flatten() {
            tracing::info!(listener = %handle.name, address = %handle.bound, "listener removed, draining");
            let _ = handle.stop.send(true);
            ls.draining.push(handle.task);
        }
        ls.draining.retain(|t| !t.is_finished());
        ls.active = active;
        self.admin.listeners.store(Arc::new(addrs(&ls.active)));
        let listeners = ls.active.len();
        drop(ls);
        // The old snapshot is freed unless requests still hold it; the compile's garbage is.
        let trim = crate::memory::release_free_heap();
        tracing::info!(version = %version, listeners, trim_us = trim.as_micros(), "config applied");
        Ok(())
    }

    /// Stops accepting on every listener (new connections are refused), signals
    /// connections to finish (HTTP/2 GOAWAY, HTTP/1 close after the current response),
    /// waits up to `drain_timeout` for them, then aborts the rest. `/ready` answers 503
    /// from the start of the drain.
    pub async fn shutdown(self) -> DrainReport {
        self.admin.ready.store(false, Ordering::Release);
        let mut ls = self.listeners.into_inner();
        for handle in &ls.active {
            let _ = handle.stop.send(true);
        }
        let mut report = DrainReport::default();
        let tasks = ls
            .active
            .drain(..)
            .map(|h| h.task)
            .chain(ls.draining.drain(..));
        for task in tasks {
            match task.await {
                Ok(r) => report += r,
                Err(e) => tracing::error!(error = %e, "listener task failed"),
            }
        }
        if let Some(admin) = self.admin_server {
            let _ = admin.stop.send(true);
            let _ = admin.task.await;
        }
        tracing::info!(
            drained = report.drained,
            aborted = report.aborted,
            "proxy stopped"
        );
        report
    }
}

fn addrs(active: &[ListenerHandle]) -> Vec<(String, SocketAddr)> {
    active.iter().map(|h| (h.name.clone(), h.bound)).collect()
}

async fn bind(name: &str, address: SocketAddr) -> Result<TcpListener, ProxyError> {
    TcpListener::bind(address)
        .await
        .map_err(|source| ProxyError::Bind {
            listener: name.to_owned(),
            address,
            source,
        })
}

fn check_unique_names(config: &biplane_config::Config) -> Result<(), ProxyError> {
    let mut seen = std::collections::HashSet::new();
    for l in &config.listeners {
        if !seen.insert(l.name.as_str()) {
            return Err(ProxyError::DuplicateListener(l.name.clone()));
        }
    }
    Ok(())
}
