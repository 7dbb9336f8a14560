//! The per-request pipeline: framing checks → snapshot → route → action (forward, redirect,
//! direct response) → request filters → pick cluster and endpoint → upstream (with timeout)
//! → response filters → metrics → access log at the end of the response body.
//!
//! Failures anywhere become an [`HttpError`], turned into a response in one place
//! ([`HttpError::to_response`]). The config snapshot is loaded once per request and used to
//! the end, so a swap affects only later requests, even on a kept-alive connection.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::uri::{PathAndQuery, Scheme};
use http::{Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::TokioIo;

use super::body::{Finish, RequestBody, ResponseBody};
use super::conn::{ConnCtx, InFlight};
use super::error::HttpError;
use super::filters::{is_upgrade_request, replace_prefix, set_forwarded, strip_hop_by_hop};
use super::h1::OnUpgrade;
use super::log::LogEntry;
use super::router::{
    Action, Forward, HashPolicy, Redirect, RedirectPath, RequestView, Route, RouteTable,
};
use super::upstream::SendError;
use crate::Snapshot;
use crate::lb::LoadGuard;
use crate::lb::hash64;

/// What the pipeline learnt about a request, for metrics and the access log.
#[derive(Default)]
struct Outcome<'s> {
    table: Option<&'s RouteTable>,
    route: Option<&'s Route>,
    /// Index of the forward target (cluster) picked.
    target: Option<usize>,
    upstream: Option<SocketAddr>,
    load: Option<LoadGuard>,
    received: Option<Arc<AtomicU64>>,
}

/// The pipeline's entry point, for both servers (our HTTP/1 one and hyper's HTTP/2 one).
pub async fn handle(
    req: Request<RequestBody>,
    ctx: Arc<ConnCtx>,
) -> Result<Response<ResponseBody>, Infallible> {
    let start = Instant::now();
    let is_h1 = req.version() != Version::HTTP_2;
    // Only HTTP/2's idle timeout counts requests in flight (conn.rs); the HTTP/1 server
    // knows when it waits for a request.
    let in_flight = (!is_h1).then(|| InFlight::start(ctx.clone()));
    let mut log = ctx.shared.options.access_log.then(|| {
        Box::new(LogEntry {
            time: SystemTime::now(),
            start,
            method: req.method().clone(),
            uri: req.uri().clone(),
            host: req.headers().get(header::HOST).cloned(),
            version: req.version(),
            status: 0,
            bytes_received: None,
            bytes_sent: 0,
            upstream: None,
            route: None,
            listener: ctx.info.listener.clone(),
            error: None,
        })
    });

    let snap = ctx.shared.snapshot.load_full();
    let mut out = Outcome::default();
    let (mut res, error) = match pipeline(req, is_h1, &ctx, &snap, &mut out).await {
        Ok(res) => (res, None),
        Err(e) => {
            tracing::debug!(error = %e, "request answered locally");
            let mut res = e.to_response();
            if !is_h1 {
                res.headers_mut().remove(header::CONNECTION);
            }
            (res, Some(e.reason()))
        }
    };

    let status = res.status().as_u16();
    let listener = &*ctx.info.listener;
    if let Some(route) = out.route {
        if let Some(stats) = route.stats(listener) {
            stats.record(out.target, status, Some(start.elapsed().as_secs_f64()));
        }
        route.response_headers.apply(res.headers_mut());
    } else if let Some(stats) = out.table.and_then(|t| t.no_route_stats(listener)) {
        stats.record(None, status, None);
    }
    if let Some(log) = log.as_deref_mut() {
        log.status = status;
        log.upstream = out.upstream;
        log.route = out.route.map(|r| r.name.clone());
        log.error = error;
        log.bytes_received = out.received.take();
    }
    res.body_mut().set_finish(Finish {
        in_flight,
        log,
        load: out.load.take(),
    });
    Ok(res)
}

async fn pipeline<'s>(
    req: Request<RequestBody>,
    is_h1: bool,
    ctx: &Arc<ConnCtx>,
    snap: &'s Snapshot,
    out: &mut Outcome<'s>,
) -> Result<Response<ResponseBody>, HttpError> {
    // HTTP/1 framing was checked on the raw head (h1/head.rs); HTTP/2 headers here.
    if !is_h1 {
        check_framing(req.headers())?;
    }

    let table = snap
        .http
        .route_tables
        .get(ctx.hcm.route_config_name.as_str())
        .ok_or_else(|| HttpError::NoRouteConfig(ctx.hcm.route_config_name.clone()))?;
    out.table = Some(table);
    let host = request_host(&req);
    let view = RequestView {
        method: req.method(),
        path: req.uri().path(),
        query: req.uri().query(),
        headers: req.headers(),
    };
    let route = table
        .find_vhost(host)
        .and_then(|vh| vh.find_route(&view))
        .ok_or_else(|| HttpError::NoRoute {
            host: host.to_owned(),
            path: req.uri().path().to_owned(),
        })?;
    out.route = Some(route);
    match &route.action {
        Action::Direct { status, body } => Ok(direct(*status, body.clone())),
        Action::Redirect(rd) => Ok(redirect(rd, &req, ctx)),
        Action::Forward(fwd) => forward(req, is_h1, ctx, fwd, out).await,
    }
}

/// Request smuggling shapes visible in the parsed headers.
pub fn check_framing(h: &HeaderMap) -> Result<(), HttpError> {
    let mut cl = h.get_all(header::CONTENT_LENGTH).iter();
    let has_cl = cl.next().is_some();
    if has_cl && cl.next().is_some() {
        return Err(HttpError::BadRequest("duplicate content-length"));
    }
    if has_cl && h.contains_key(header::TRANSFER_ENCODING) {
        return Err(HttpError::BadRequest(
            "both content-length and transfer-encoding",
        ));
    }
    Ok(())
}

/// `:authority` (HTTP/2, absolute-form) or `Host`.
fn request_host<B>(req: &Request<B>) -> &str {
    match req.uri().authority() {
        Some(a) => a.as_str(),
        None => req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or(""),
    }
}

fn direct(status: StatusCode, body: Bytes) -> Response<ResponseBody> {
    let has_body = !body.is_empty();
    let mut res = Response::new(ResponseBody::full(body));
    *res.status_mut() = status;
    if has_body {
        res.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
    }
    res
}

/// Gateway API `RequestRedirect`: unset parts come from the request; the port defaults to
/// the scheme's well-known port when the scheme is set, else the listener's port, and is
/// omitted from `Location` when well-known for the scheme.
fn redirect<B>(rd: &Redirect, req: &Request<B>, ctx: &ConnCtx) -> Response<ResponseBody> {
    let req_scheme = if ctx.info.tls { "https" } else { "http" };
    let scheme = rd.scheme.as_deref().unwrap_or(req_scheme);
    let host = match &rd.host {
        Some(h) => &**h,
        None => super::router::strip_port(request_host(req)),
    };
    let port = rd.port.unwrap_or_else(|| match rd.scheme.as_deref() {
        Some("https") => 443,
        Some("http") => 80,
        _ => ctx.info.local.port(),
    });
    let path = req.uri().path();
    let new_path: std::borrow::Cow<'_, str> = match &rd.path {
        None => path.into(),
        Some(RedirectPath::Full(p)) => (&**p).into(),
        Some(RedirectPath::ReplacePrefix { matched_len, with }) => {
            replace_prefix(path, matched_len.unwrap_or(path.len()), with).into()
        }
    };
    let mut loc = String::with_capacity(scheme.len() + host.len() + new_path.len() + 16);
    loc.push_str(scheme);
    loc.push_str("://");
    loc.push_str(host);
    let well_known = matches!((scheme, port), ("http", 80) | ("https", 443));
    if !well_known {
        loc.push(':');
        loc.push_str(&port.to_string());
    }
    loc.push_str(&new_path);
    if let Some(q) = req.uri().query() {
        loc.push('?');
        loc.push_str(q);
    }
    let mut res = Response::new(ResponseBody::empty());
    *res.status_mut() = rd.status;
    if let Ok(v) = HeaderValue::from_str(&loc) {
        res.headers_mut().insert(header::LOCATION, v);
    }
    res
}

/// The hash key of a request for RingHash/Maglev: the first policy that yields a value.
fn hash_key(policies: &[HashPolicy], headers: &HeaderMap, peer: IpAddr) -> Option<u64> {
    for p in policies {
        match p {
            HashPolicy::Header(name) => {
                if let Some(v) = headers.get(name) {
                    return Some(hash64(v.as_bytes()));
                }
            }
            HashPolicy::Cookie(name) => {
                if let Some(v) = cookie_value(headers, name) {
                    return Some(hash64(v));
                }
            }
            HashPolicy::SourceIp => {
                return Some(match peer {
                    IpAddr::V4(v4) => hash64(&v4.octets()),
                    IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                        Some(v4) => hash64(&v4.octets()),
                        None => hash64(&v6.octets()),
                    },
                });
            }
        }
    }
    None
}

/// Value of cookie `name` in the `Cookie` header(s).
pub fn cookie_value<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h [u8]> {
    for v in headers.get_all(header::COOKIE) {
        for pair in v.as_bytes().split(|&b| b == b';') {
            let pair = pair.trim_ascii();
            if let Some(eq) = pair.iter().position(|&b| b == b'=')
                && &pair[..eq] == name.as_bytes()
            {
                return Some(&pair[eq + 1..]);
            }
        }
    }
    None
}

async fn forward<'s>(
    mut req: Request<RequestBody>,
    is_h1: bool,
    ctx: &Arc<ConnCtx>,
    fwd: &'s Forward,
    out: &mut Outcome<'s>,
) -> Result<Response<ResponseBody>, HttpError> {
    let ti = fwd
        .pick_target()
        .ok_or_else(|| HttpError::NoHealthyEndpoint("(all weights are 0)".into()))?;
    out.target = Some(ti);
    let target = fwd
        .targets
        .get(ti)
        .ok_or_else(|| HttpError::UnknownCluster {
            name: String::new(),
            status: fwd.cluster_not_found,
        })?;
    let cluster = target
        .cluster
        .as_ref()
        .ok_or_else(|| HttpError::UnknownCluster {
            name: target.name.to_string(),
            status: fwd.cluster_not_found,
        })?;
    let hash = if fwd.hash_policy.is_empty() {
        None
    } else {
        hash_key(&fwd.hash_policy, req.headers(), ctx.info.peer.ip())
    };
    let (ep, load) = cluster
        .pick_endpoint(hash)
        .ok_or_else(|| HttpError::NoHealthyEndpoint(cluster.name().to_owned()))?;
    out.upstream = Some(ep.addr);
    out.load = Some(load);

    let h2_upstream = cluster.protocol() == biplane_config::UpstreamProtocol::Http2;
    let upgrade = is_h1 && !h2_upstream && is_upgrade_request(req.headers());
    let on_upgrade = if upgrade {
        req.extensions_mut().remove::<OnUpgrade>()
    } else {
        None
    };

    let (mut parts, mut body) = req.into_parts();
    let headers = &mut parts.headers;
    if !headers.contains_key(header::HOST)
        && let Some(a) = parts.uri.authority()
        && let Ok(v) = HeaderValue::from_str(a.as_str())
    {
        headers.insert(header::HOST, v);
    }
    strip_hop_by_hop(headers, upgrade, true);
    // 100-continue is answered by us (hyper, when the body is first read), not forwarded.
    headers.remove(header::EXPECT);
    set_forwarded(
        headers,
        ctx.hcm.use_remote_address,
        &ctx.peer_ip,
        &ctx.proto,
    );
    if let Some(route) = out.route {
        route.request_headers.apply(headers);
    }
    if let Some(h) = &fwd.host_rewrite {
        headers.insert(header::HOST, h.clone());
    }

    let pq = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let pq = match &fwd.path_rewrite {
        Some(rw) => rw.apply(&pq).unwrap_or(pq),
        None => pq,
    };
    parts.uri = if h2_upstream {
        // `:authority` carries the host; a Host header next to it would be redundant.
        let host = headers_host(&mut parts.headers);
        let mut uri = http::uri::Parts::default();
        uri.scheme = Some(Scheme::HTTP);
        uri.authority = Some(host.unwrap_or_else(|| ep.authority.clone()));
        uri.path_and_query = Some(pq);
        Uri::from_parts(uri).map_err(|_| HttpError::BadRequest("unusable request target"))?
    } else {
        // HTTP/1.1 upstream: origin-form; the pool picked the connection by endpoint.
        Uri::from(pq)
    };
    parts.version = if h2_upstream {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };

    let received = ctx
        .shared
        .options
        .access_log
        .then(|| Arc::new(AtomicU64::new(0)));
    out.received = received.clone();
    body.count_into(received);
    let upstream_req = Request::from_parts(parts, body);

    // The send future is created in each branch: kept in a local and then awaited, it
    // would take its size twice in this future's state.
    let res = match fwd.timeout {
        Some(t) => match tokio::time::timeout(t, cluster.send(ep, upstream_req, upgrade)).await {
            Ok(r) => r,
            Err(_) => {
                cluster.stats.timeouts.inc();
                return Err(HttpError::Timeout);
            }
        },
        None => cluster.send(ep, upstream_req, upgrade).await,
    };
    let mut res = res.map_err(|e| match e {
        SendError::Connect(m) => HttpError::ConnectFailure(m),
        SendError::Protocol(m) => HttpError::UpstreamProtocol(m),
    })?;

    let switching = res.status() == StatusCode::SWITCHING_PROTOCOLS;
    if switching && let Some(down) = on_upgrade {
        let up = hyper::upgrade::on(&mut res);
        tokio::spawn(async move {
            match tokio::join!(down.get(), up) {
                (Ok(mut down), Ok(up)) => {
                    let mut up = TokioIo::new(up);
                    if let Err(e) = tokio::io::copy_bidirectional(&mut down, &mut up).await {
                        tracing::debug!(error = %e, "upgraded tunnel ended with error");
                    }
                }
                (d, u) => {
                    tracing::debug!(down = d.is_ok(), up = u.is_ok(), "upgrade failed");
                }
            }
        });
    }
    let (mut rparts, rbody) = res.into_parts();
    strip_hop_by_hop(&mut rparts.headers, switching && upgrade, false);
    if is_h1 {
        rparts.version = Version::HTTP_11;
    }
    Ok(Response::from_parts(rparts, ResponseBody::upstream(rbody)))
}

/// Take the `Host` header as a URI authority (for an HTTP/2 upstream's `:authority`).
fn headers_host(headers: &mut HeaderMap) -> Option<http::uri::Authority> {
    let v = headers.remove(header::HOST)?;
    http::uri::Authority::try_from(v.as_bytes()).ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

    use super::*;

    #[test]
    fn smuggling_shapes_rejected() {
        let mut h = HeaderMap::new();
        assert!(check_framing(&h).is_ok());
        h.append(header::CONTENT_LENGTH, HeaderValue::from_static("3"));
        assert!(check_framing(&h).is_ok());
        h.append(header::CONTENT_LENGTH, HeaderValue::from_static("3"));
        assert!(matches!(check_framing(&h), Err(HttpError::BadRequest(_))));
        let mut h = HeaderMap::new();
        h.append(header::CONTENT_LENGTH, HeaderValue::from_static("3"));
        h.append(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        let e = check_framing(&h).unwrap_err();
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn cookies() {
        let mut h = HeaderMap::new();
        h.append(
            header::COOKIE,
            HeaderValue::from_static("a=1; session=xyz;b=2"),
        );
        assert_eq!(cookie_value(&h, "session"), Some(&b"xyz"[..]));
        assert_eq!(cookie_value(&h, "b"), Some(&b"2"[..]));
        assert_eq!(cookie_value(&h, "sess"), None);
    }

    #[test]
    fn hash_key_policies_in_order() {
        let mut h = HeaderMap::new();
        h.insert("x-user", HeaderValue::from_static("alice"));
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let p = [
            HashPolicy::Cookie("nope".into()),
            HashPolicy::Header(header::HeaderName::from_static("x-user")),
        ];
        assert_eq!(hash_key(&p, &h, ip), Some(hash64(b"alice")));
        let p = [HashPolicy::Cookie("nope".into())];
        assert_eq!(hash_key(&p, &h, ip), None);
        let p = [HashPolicy::SourceIp];
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(hash_key(&p, &h, ip), hash_key(&p, &h, mapped));
    }
}
