//! The admin listener: `/ready`, `/stats/prometheus`, `/config_dump` and `/listeners`, a
//! small HTTP/1.1 server on its own socket (`--admin-addr`), never on a data listener.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

use crate::Shared;
use crate::listener::stopped;

/// What the admin endpoints read. Owned by `Proxy`, shared with the admin server.
pub struct AdminState {
    pub shared: Arc<Shared>,
    /// `/ready` answers 200 only while this is true: once a config is in place, until
    /// shutdown starts.
    pub ready: AtomicBool,
    /// Bound address of every data listener, by name (ports chosen by the OS included).
    pub listeners: ArcSwap<Vec<(String, SocketAddr)>>,
}

impl AdminState {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self {
            shared,
            ready: AtomicBool::new(false),
            listeners: ArcSwap::from_pointee(Vec::new()),
        }
    }
}

/// Serves the admin API on `listener` until `stop` turns true (or its sender is dropped).
/// Admin connections are not drained: they are closed when the server stops.
pub fn spawn(
    listener: TcpListener,
    state: Arc<AdminState>,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut conns = JoinSet::new();
        loop {
            tokio::select! {
                biased;
                () = stopped(&mut stop) => break,
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let state = state.clone();
                        conns.spawn(async move {
                            let service = hyper::service::service_fn(move |req| {
                                let state = state.clone();
                                async move { Ok::<_, Infallible>(route(&state, &req)) }
                            });
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "admin accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                },
            }
        }
        conns.shutdown().await;
    })
}

fn route(state: &AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let known = matches!(
        path,
        "/ready" | "/stats/prometheus" | "/config_dump" | "/listeners"
    );
    if !known {
        return text(StatusCode::NOT_FOUND, "not found\n");
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut resp = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        resp.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return resp;
    }
    match path {
        "/ready" => {
            if state.ready.load(Ordering::Acquire) {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            }
        }
        "/stats/prometheus" => {
            let mut resp = Response::new(Full::new(Bytes::from(state.shared.metrics.encode())));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        "/config_dump" => {
            let snapshot = state.shared.snapshot.load();
            let listeners = state.listeners.load();
            let dump = ConfigDump {
                version: &snapshot.config.version,
                bound_listeners: bound(&listeners),
                config: &snapshot.config,
            };
            json(&dump)
        }
        _ => json(&bound(&state.listeners.load())),
    }
}

/// `/config_dump` body. Private keys are `#[serde(skip)]` in `biplane_config`, so they
/// cannot appear here.
#[derive(Serialize)]
struct ConfigDump<'a> {
    version: &'a str,
    bound_listeners: BTreeMap<&'a str, SocketAddr>,
    config: &'a biplane_config::Config,
}

fn bound(listeners: &[(String, SocketAddr)]) -> BTreeMap<&str, SocketAddr> {
    listeners.iter().map(|(n, a)| (n.as_str(), *a)).collect()
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn json<T: Serialize>(value: &T) -> Response<Full<Bytes>> {
    match serde_json::to_vec_pretty(value) {
        Ok(mut body) => {
            body.push(b'\n');
            let mut resp = Response::new(Full::new(Bytes::from(body)));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            resp
        }
        Err(e) => {
            tracing::error!(error = %e, "admin: cannot serialize JSON");
            text(StatusCode::INTERNAL_SERVER_ERROR, "cannot serialize\n")
        }
    }
}
