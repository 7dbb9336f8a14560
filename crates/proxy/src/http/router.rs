//! The router: route tables compiled from `biplane_config::RouteConfig` at snapshot time,
//! and matching of a request to a virtual host and a route.
//!
//! Virtual host: exact domain, then the longest suffix wildcard (`*.example.com`), then the
//! longest prefix wildcard (`foo.*`), then `*`. Routes: in the given order, the first whose
//! path, method, headers (all) and query parameters (all) match wins. The common cases
//! (exact/prefix path, no query matchers) allocate nothing; the query string is parsed at
//! most once per request and only when a route has query matchers.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};

use super::filters::{HeaderMutation, PathRewrite};
use super::upstream::ClusterState;
use crate::metrics::{Metrics, RouteStats};

/// A compiled `RouteConfig`.
#[derive(Debug)]
pub struct RouteTable {
    pub name: Arc<str>,
    exact: HashMap<Box<str>, usize>,
    /// `*.example.com` stored as `.example.com`, longest first.
    suffix: Vec<(Box<str>, usize)>,
    /// `foo.*` stored as `foo.`, longest first.
    prefix: Vec<(Box<str>, usize)>,
    any: Option<usize>,
    pub vhosts: Vec<VirtualHost>,
    /// Per listener, counters for requests that matched no route (404).
    pub no_route_stats: Vec<RouteStats>,
}

#[derive(Debug)]
pub struct VirtualHost {
    pub name: Arc<str>,
    pub routes: Vec<Route>,
}

#[derive(Debug)]
pub struct Route {
    pub name: Arc<str>,
    path: PathMatcher,
    method: Option<Method>,
    headers: Vec<HeaderMatcher>,
    query: Vec<QueryMatcher>,
    pub request_headers: HeaderMutation,
    pub response_headers: HeaderMutation,
    pub action: Action,
    /// Per listener that uses this route table.
    pub stats: Vec<RouteStats>,
}

#[derive(Debug)]
pub enum Action {
    Forward(Forward),
    Redirect(Redirect),
    Direct { status: StatusCode, body: Bytes },
}

#[derive(Debug)]
pub struct Target {
    pub name: Arc<str>,
    pub weight: u32,
    /// `None` if the cluster is unknown (validation should prevent it): 503.
    pub cluster: Option<Arc<ClusterState>>,
}

#[derive(Debug)]
pub struct Forward {
    pub targets: Vec<Target>,
    total_weight: u64,
    pub path_rewrite: Option<PathRewrite>,
    pub host_rewrite: Option<HeaderValue>,
    /// min(request timeout, per-try timeout): there is one attempt per request.
    pub timeout: Option<Duration>,
    pub hash_policy: Vec<HashPolicy>,
    /// The answer when the picked target's cluster does not exist.
    pub cluster_not_found: StatusCode,
}

impl Forward {
    /// Weighted pick of a target index (weight 0 never picked). `None` if all weights are 0.
    pub fn pick_target(&self) -> Option<usize> {
        if self.targets.len() == 1 {
            return (self.total_weight > 0).then_some(0);
        }
        if self.total_weight == 0 {
            return None;
        }
        let mut r = crate::lb::random_below(self.total_weight);
        for (i, t) in self.targets.iter().enumerate() {
            let w = u64::from(t.weight);
            if r < w {
                return Some(i);
            }
            r -= w;
        }
        None
    }
}

#[derive(Debug)]
pub enum HashPolicy {
    Header(HeaderName),
    Cookie(Box<str>),
    SourceIp,
}

#[derive(Debug)]
pub struct Redirect {
    pub scheme: Option<Box<str>>,
    pub host: Option<Box<str>>,
    pub port: Option<u16>,
    pub path: Option<RedirectPath>,
    pub status: StatusCode,
}

#[derive(Debug)]
pub enum RedirectPath {
    Full(Box<str>),
    /// Replace the route's matched prefix (`matched_len` bytes; whole path if `None`).
    ReplacePrefix {
        matched_len: Option<usize>,
        with: Box<str>,
    },
}

#[derive(Debug)]
enum PathMatcher {
    Exact(Box<str>),
    /// Normalised: no trailing slash, except for the root prefix `/` (stored as "").
    Prefix(Box<str>),
    Regex(regex::Regex),
}

#[derive(Debug)]
struct HeaderMatcher {
    name: HeaderName,
    value: ValueMatcher,
    invert: bool,
}

#[derive(Debug)]
struct QueryMatcher {
    name: Box<str>,
    value: ValueMatcher,
}

#[derive(Debug)]
enum ValueMatcher {
    Exact(Box<str>),
    Prefix(Box<str>),
    Regex(regex::Regex),
    Present,
}

impl ValueMatcher {
    fn compile(m: &biplane_config::StringMatch) -> Self {
        match m {
            biplane_config::StringMatch::Exact(s) => ValueMatcher::Exact(s.as_str().into()),
            biplane_config::StringMatch::Prefix(s) => ValueMatcher::Prefix(s.as_str().into()),
            biplane_config::StringMatch::Regex(re) => ValueMatcher::Regex(full_match(re)),
            biplane_config::StringMatch::Present => ValueMatcher::Present,
        }
    }

    fn matches(&self, v: &[u8]) -> bool {
        match self {
            ValueMatcher::Exact(s) => v == s.as_bytes(),
            ValueMatcher::Prefix(s) => v.starts_with(s.as_bytes()),
            ValueMatcher::Regex(re) => std::str::from_utf8(v).is_ok_and(|s| re.is_match(s)),
            ValueMatcher::Present => true,
        }
    }
}

/// Anchor a regex so that it must match the whole input.
fn full_match(re: &regex::Regex) -> regex::Regex {
    regex::Regex::new(&format!("^(?:{})$", re.as_str())).unwrap_or_else(|_| re.clone())
}

/// What the router looks at in a request.
#[derive(Debug)]
pub struct RequestView<'a> {
    pub method: &'a Method,
    /// Path without the query.
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
}

/// Lazily parsed query parameters (raw name, percent-decoded value).
struct Query<'a> {
    raw: Option<&'a str>,
    parsed: Option<Vec<(&'a str, &'a str)>>,
}

impl<'a> Query<'a> {
    fn get(&mut self, name: &str) -> Option<Cow<'a, str>> {
        let raw = self.raw;
        let parsed = self.parsed.get_or_insert_with(|| {
            raw.unwrap_or("")
                .split('&')
                .filter(|kv| !kv.is_empty())
                .map(|kv| kv.split_once('=').unwrap_or((kv, "")))
                .collect()
        });
        // Gateway API: with repeated names, the first one counts.
        parsed
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| percent_decode(v))
    }
}

/// Decode `%XX` and `+` (form encoding); invalid escapes are kept literally.
pub fn percent_decode(s: &str) -> Cow<'_, str> {
    if !s.bytes().any(|b| b == b'%' || b == b'+') {
        return Cow::Borrowed(s);
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = |c: u8| (c as char).to_digit(16);
                match (hex(b[i + 1]), hex(b[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

impl PathMatcher {
    fn compile(p: &biplane_config::PathMatch) -> Self {
        match p {
            biplane_config::PathMatch::Exact(s) => PathMatcher::Exact(s.as_str().into()),
            biplane_config::PathMatch::Prefix(s) => {
                PathMatcher::Prefix(s.trim_end_matches('/').into())
            }
            biplane_config::PathMatch::Regex(re) => PathMatcher::Regex(full_match(re)),
        }
    }

    fn matches(&self, path: &str) -> bool {
        match self {
            PathMatcher::Exact(s) => path == &**s,
            PathMatcher::Prefix(p) => {
                path.starts_with(&**p) && matches!(path.as_bytes().get(p.len()), None | Some(b'/'))
            }
            PathMatcher::Regex(re) => re.is_match(path),
        }
    }

    /// Length of the part of the path a rewrite replaces (`None` = all of it).
    fn prefix_len(&self) -> Option<usize> {
        match self {
            PathMatcher::Prefix(p) => Some(p.len()),
            _ => None,
        }
    }
}

impl Route {
    fn matches(&self, req: &RequestView<'_>, query: &mut Query<'_>) -> bool {
        if !self.path.matches(req.path) {
            return false;
        }
        if let Some(m) = &self.method
            && m != req.method
        {
            return false;
        }
        for h in &self.headers {
            let mut values = req.headers.get_all(&h.name).iter().peekable();
            let found = match &h.value {
                ValueMatcher::Present => values.peek().is_some(),
                v => values.any(|x| v.matches(x.as_bytes())),
            };
            if found == h.invert {
                return false;
            }
        }
        for q in &self.query {
            match query.get(&q.name) {
                Some(v) if q.value.matches(v.as_bytes()) => {}
                _ => return false,
            }
        }
        true
    }

    /// Metric handles for the listener that got the request.
    pub fn stats(&self, listener: &str) -> Option<&RouteStats> {
        self.stats.iter().find(|s| &*s.listener == listener)
    }
}

impl VirtualHost {
    /// The first matching route.
    pub fn find_route(&self, req: &RequestView<'_>) -> Option<&Route> {
        let mut query = Query {
            raw: req.query,
            parsed: None,
        };
        self.routes.iter().find(|r| r.matches(req, &mut query))
    }
}

/// Strip the port from a `Host`/`:authority` value (`[v6]:port` keeps its brackets).
pub fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return match host.find(']') {
            Some(end) => &host[..=end],
            None => host,
        };
    }
    match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

impl RouteTable {
    /// Virtual host for a raw `Host`/`:authority` value (port stripped, case-insensitive).
    pub fn find_vhost(&self, raw_host: &str) -> Option<&VirtualHost> {
        let host = strip_port(raw_host);
        let mut buf = [0u8; 256];
        let lowered: Cow<'_, str> = if !host.bytes().any(|b| b.is_ascii_uppercase()) {
            Cow::Borrowed(host)
        } else if host.len() <= buf.len() {
            let dst = &mut buf[..host.len()];
            dst.copy_from_slice(host.as_bytes());
            dst.make_ascii_lowercase();
            Cow::Borrowed(std::str::from_utf8(&buf[..host.len()]).unwrap_or(host))
        } else {
            Cow::Owned(host.to_ascii_lowercase())
        };
        let idx = self.select(&lowered)?;
        self.vhosts.get(idx)
    }

    fn select(&self, host: &str) -> Option<usize> {
        if let Some(&i) = self.exact.get(host) {
            return Some(i);
        }
        for (suffix, i) in &self.suffix {
            if host.len() > suffix.len() && host.ends_with(&**suffix) {
                return Some(*i);
            }
        }
        for (prefix, i) in &self.prefix {
            if host.len() > prefix.len() && host.starts_with(&**prefix) {
                return Some(*i);
            }
        }
        self.any
    }

    /// Compile a route config. `listeners`: names of the listeners whose HTTP chains use
    /// it (metric handles are resolved per listener). `clusters`: compiled clusters.
    pub fn compile(
        rc: &biplane_config::RouteConfig,
        listeners: &[Arc<str>],
        clusters: &HashMap<String, Arc<ClusterState>>,
        metrics: &Arc<Metrics>,
    ) -> Self {
        // The route and backend label of local responses and unmatched requests.
        let none: Arc<str> = Arc::from("");
        let mut exact = HashMap::new();
        let mut suffix = Vec::new();
        let mut prefix = Vec::new();
        let mut any = None;
        let mut vhosts = Vec::with_capacity(rc.virtual_hosts.len());
        for (vi, vh) in rc.virtual_hosts.iter().enumerate() {
            for d in &vh.domains {
                let d = d.to_ascii_lowercase();
                let d = strip_port(&d).to_owned();
                if d == "*" {
                    any.get_or_insert(vi);
                } else if let Some(s) = d.strip_prefix('*') {
                    suffix.push((Box::<str>::from(s), vi));
                } else if let Some(p) = d.strip_suffix('*') {
                    prefix.push((Box::<str>::from(p), vi));
                } else {
                    exact.entry(d.into_boxed_str()).or_insert(vi);
                }
            }
            let routes = vh
                .routes
                .iter()
                .map(|r| compile_route(r, listeners, clusters, metrics, &none))
                .collect();
            vhosts.push(VirtualHost {
                name: vh.name.as_str().into(),
                routes,
            });
        }
        // Longest first; stable sort keeps config order among equals.
        suffix.sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
        prefix.sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
        let no_route_stats = listeners
            .iter()
            .map(|l| RouteStats::new(metrics, l, &none, [], &none))
            .collect();
        Self {
            name: rc.name.as_str().into(),
            exact,
            suffix,
            prefix,
            any,
            vhosts,
            no_route_stats,
        }
    }

    /// Metrics of a listener's requests that matched no route (404).
    pub fn no_route_stats(&self, listener: &str) -> Option<&RouteStats> {
        self.no_route_stats
            .iter()
            .find(|s| &*s.listener == listener)
    }
}

fn compile_route(
    r: &biplane_config::Route,
    listeners: &[Arc<str>],
    clusters: &HashMap<String, Arc<ClusterState>>,
    metrics: &Arc<Metrics>,
    local: &Arc<str>,
) -> Route {
    let path = PathMatcher::compile(&r.matcher.path);
    let method = r
        .matcher
        .method
        .as_deref()
        .and_then(|m| Method::from_bytes(m.as_bytes()).ok());
    let headers = r
        .matcher
        .headers
        .iter()
        .filter_map(|h| {
            Some(HeaderMatcher {
                name: HeaderName::from_bytes(h.name.to_ascii_lowercase().as_bytes()).ok()?,
                value: ValueMatcher::compile(&h.value),
                invert: h.invert,
            })
        })
        .collect();
    let query = r
        .matcher
        .query_params
        .iter()
        .map(|q| QueryMatcher {
            name: q.name.as_str().into(),
            value: ValueMatcher::compile(&q.value),
        })
        .collect();
    let action = match &r.action {
        biplane_config::RouteAction::Forward(f) => {
            let targets: Vec<Target> = f
                .clusters
                .iter()
                .map(|wc| Target {
                    name: wc.name.as_str().into(),
                    weight: wc.weight,
                    cluster: clusters.get(&wc.name).cloned(),
                })
                .collect();
            let total_weight = targets.iter().map(|t| u64::from(t.weight)).sum();
            let timeout = match (f.timeout, f.per_try_timeout) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
            .filter(|d| !d.is_zero());
            Action::Forward(Forward {
                targets,
                total_weight,
                cluster_not_found: StatusCode::from_u16(f.cluster_not_found_status)
                    .unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
                path_rewrite: f
                    .path_rewrite
                    .as_ref()
                    .map(|p| PathRewrite::compile(p, path.prefix_len())),
                host_rewrite: f
                    .host_rewrite
                    .as_deref()
                    .and_then(|h| HeaderValue::from_str(h).ok()),
                timeout,
                hash_policy: f
                    .hash_policy
                    .iter()
                    .filter_map(|h| match h {
                        biplane_config::HashPolicy::Header(n) => {
                            HeaderName::from_bytes(n.to_ascii_lowercase().as_bytes())
                                .ok()
                                .map(HashPolicy::Header)
                        }
                        biplane_config::HashPolicy::Cookie(c) => {
                            Some(HashPolicy::Cookie(c.as_str().into()))
                        }
                        biplane_config::HashPolicy::SourceIp => Some(HashPolicy::SourceIp),
                    })
                    .collect(),
            })
        }
        biplane_config::RouteAction::Redirect(rd) => Action::Redirect(Redirect {
            scheme: rd.scheme.as_deref().map(Into::into),
            host: rd.host.as_deref().map(Into::into),
            port: rd.port,
            path: rd.path.as_ref().map(|p| match p {
                biplane_config::RedirectPath::Full(s) => RedirectPath::Full(s.as_str().into()),
                biplane_config::RedirectPath::ReplacePrefix(s) => RedirectPath::ReplacePrefix {
                    matched_len: path.prefix_len(),
                    with: s.as_str().into(),
                },
            }),
            status: StatusCode::from_u16(rd.status).unwrap_or(StatusCode::FOUND),
        }),
        biplane_config::RouteAction::DirectResponse { status, body } => Action::Direct {
            status: StatusCode::from_u16(*status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            body: Bytes::from(body.clone()),
        },
    };
    let name: Arc<str> = r.name.as_str().into();
    let backends: Vec<&Arc<str>> = match &action {
        Action::Forward(f) => f.targets.iter().map(|t| &t.name).collect(),
        _ => Vec::new(),
    };
    let stats = listeners
        .iter()
        .map(|l| RouteStats::new(metrics, l, &name, backends.iter().copied(), local))
        .collect();
    Route {
        name,
        path,
        method,
        headers,
        query,
        request_headers: HeaderMutation::compile(&r.request_headers),
        response_headers: HeaderMutation::compile(&r.response_headers),
        action,
        stats,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

    use biplane_config as cfg;

    use super::*;

    fn route(name: &str, matcher: cfg::RouteMatch) -> cfg::Route {
        cfg::Route {
            name: name.into(),
            matcher,
            request_headers: cfg::HeaderMutation::default(),
            response_headers: cfg::HeaderMutation::default(),
            action: cfg::RouteAction::DirectResponse {
                status: 200,
                body: name.into(),
            },
        }
    }

    fn path(p: cfg::PathMatch) -> cfg::RouteMatch {
        cfg::RouteMatch {
            path: p,
            ..Default::default()
        }
    }

    fn table(vhosts: Vec<(&str, Vec<&str>, Vec<cfg::Route>)>) -> RouteTable {
        let rc = cfg::RouteConfig {
            name: "rc".into(),
            virtual_hosts: vhosts
                .into_iter()
                .map(|(n, d, r)| cfg::VirtualHost {
                    name: n.into(),
                    domains: d.into_iter().map(Into::into).collect(),
                    routes: r,
                })
                .collect(),
        };
        RouteTable::compile(
            &rc,
            &["l".into()],
            &HashMap::new(),
            &Arc::new(Metrics::new()),
        )
    }

    fn find<'t>(
        t: &'t RouteTable,
        host: &str,
        method: &Method,
        uri: &str,
        headers: &HeaderMap,
    ) -> Option<&'t str> {
        let uri: http::Uri = uri.parse().unwrap();
        let view = RequestView {
            method,
            path: uri.path(),
            query: uri.query(),
            headers,
        };
        t.find_vhost(host)?.find_route(&view).map(|r| &*r.name)
    }

    fn get(t: &RouteTable, host: &str, uri: &str) -> Option<String> {
        find(t, host, &Method::GET, uri, &HeaderMap::new()).map(str::to_owned)
    }

    #[test]
    fn vhost_selection() {
        let t = table(vec![
            (
                "exact",
                vec!["api.example.com"],
                vec![route("exact", cfg::RouteMatch::default())],
            ),
            (
                "short",
                vec!["*.example.com"],
                vec![route("short", cfg::RouteMatch::default())],
            ),
            (
                "long",
                vec!["*.eu.example.com"],
                vec![route("long", cfg::RouteMatch::default())],
            ),
            (
                "pre",
                vec!["internal.*"],
                vec![route("pre", cfg::RouteMatch::default())],
            ),
            (
                "any",
                vec!["*"],
                vec![route("any", cfg::RouteMatch::default())],
            ),
        ]);
        assert_eq!(get(&t, "api.example.com", "/").as_deref(), Some("exact"));
        assert_eq!(
            get(&t, "API.Example.COM:8080", "/").as_deref(),
            Some("exact")
        );
        assert_eq!(get(&t, "x.example.com", "/").as_deref(), Some("short"));
        assert_eq!(get(&t, "a.b.example.com", "/").as_deref(), Some("short"));
        assert_eq!(get(&t, "x.eu.example.com", "/").as_deref(), Some("long"));
        assert_eq!(get(&t, "internal.corp", "/").as_deref(), Some("pre"));
        // The bare parent domain is not matched by the wildcard.
        assert_eq!(get(&t, "example.com", "/").as_deref(), Some("any"));
        assert_eq!(get(&t, "", "/").as_deref(), Some("any"));
        assert_eq!(get(&t, "[::1]:80", "/").as_deref(), Some("any"));

        let t = table(vec![(
            "only",
            vec!["a.com"],
            vec![route("r", cfg::RouteMatch::default())],
        )]);
        assert_eq!(get(&t, "b.com", "/"), None);
    }

    #[test]
    fn strip_port_cases() {
        assert_eq!(strip_port("a.com:80"), "a.com");
        assert_eq!(strip_port("a.com"), "a.com");
        assert_eq!(strip_port("[::1]:8080"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
    }

    #[test]
    fn path_prefix_on_segment_boundary() {
        let t = table(vec![(
            "v",
            vec!["*"],
            vec![
                route("foo", path(cfg::PathMatch::Prefix("/foo".into()))),
                route("bar-slash", path(cfg::PathMatch::Prefix("/bar/".into()))),
                route("root", path(cfg::PathMatch::Prefix("/".into()))),
            ],
        )]);
        for (p, want) in [
            ("/foo", "foo"),
            ("/foo/", "foo"),
            ("/foo/bar", "foo"),
            ("/foo?x=1", "foo"),
            ("/foobar", "root"),
            ("/bar", "bar-slash"),
            ("/bar/x", "bar-slash"),
            ("/barx", "root"),
            ("/", "root"),
        ] {
            assert_eq!(get(&t, "h", p).as_deref(), Some(want), "{p}");
        }
    }

    #[test]
    fn exact_and_regex_paths() {
        let t = table(vec![(
            "v",
            vec!["*"],
            vec![
                route("exact", path(cfg::PathMatch::Exact("/a".into()))),
                route(
                    "re",
                    path(cfg::PathMatch::Regex(
                        regex::Regex::new("/v[0-9]+/items").unwrap(),
                    )),
                ),
            ],
        )]);
        assert_eq!(get(&t, "h", "/a").as_deref(), Some("exact"));
        assert_eq!(get(&t, "h", "/a?q").as_deref(), Some("exact"));
        assert_eq!(get(&t, "h", "/a/"), None);
        assert_eq!(get(&t, "h", "/v12/items").as_deref(), Some("re"));
        assert_eq!(get(&t, "h", "/v12/items?x=y").as_deref(), Some("re"));
        // Full match only: no partial matches.
        assert_eq!(get(&t, "h", "/v12/items/x"), None);
        assert_eq!(get(&t, "h", "/x/v12/items"), None);
    }

    #[test]
    fn method_header_query_matching() {
        let m = |method: Option<&str>,
                 headers: Vec<cfg::HeaderMatch>,
                 query: Vec<cfg::QueryParamMatch>| cfg::RouteMatch {
            path: cfg::PathMatch::Prefix("/".into()),
            headers,
            query_params: query,
            method: method.map(Into::into),
        };
        let hm = |name: &str, value: cfg::StringMatch, invert: bool| cfg::HeaderMatch {
            name: name.into(),
            value,
            invert,
        };
        let qm = |name: &str, value: cfg::StringMatch| cfg::QueryParamMatch {
            name: name.into(),
            value,
        };
        let t = table(vec![(
            "v",
            vec!["*"],
            vec![
                route("post", m(Some("POST"), vec![], vec![])),
                route(
                    "headers",
                    m(
                        None,
                        vec![
                            hm("x-env", cfg::StringMatch::Exact("canary".into()), false),
                            hm(
                                "x-id",
                                cfg::StringMatch::Regex(regex::Regex::new("[0-9]+").unwrap()),
                                false,
                            ),
                        ],
                        vec![],
                    ),
                ),
                route(
                    "inverted",
                    m(
                        None,
                        vec![hm("x-block", cfg::StringMatch::Present, true)],
                        vec![qm("mode", cfg::StringMatch::Prefix("fa".into()))],
                    ),
                ),
                route(
                    "query",
                    m(
                        None,
                        vec![],
                        vec![
                            qm("a", cfg::StringMatch::Exact("1 2".into())),
                            qm("b", cfg::StringMatch::Present),
                        ],
                    ),
                ),
                route("fallback", m(None, vec![], vec![])),
            ],
        )]);
        let mut h = HeaderMap::new();
        assert_eq!(find(&t, "h", &Method::POST, "/", &h), Some("post"));
        assert_eq!(find(&t, "h", &Method::GET, "/", &h), Some("fallback"));
        h.insert("x-env", HeaderValue::from_static("canary"));
        assert_eq!(
            find(&t, "h", &Method::GET, "/", &h),
            Some("fallback"),
            "all headers must match"
        );
        h.insert("x-id", HeaderValue::from_static("12a"));
        assert_eq!(
            find(&t, "h", &Method::GET, "/", &h),
            Some("fallback"),
            "regex is a full match"
        );
        h.insert("x-id", HeaderValue::from_static("12"));
        assert_eq!(find(&t, "h", &Method::GET, "/", &h), Some("headers"));
        let h = HeaderMap::new();
        assert_eq!(
            find(&t, "h", &Method::GET, "/?mode=fast", &h),
            Some("inverted")
        );
        let mut hb = HeaderMap::new();
        hb.insert("x-block", HeaderValue::from_static("1"));
        assert_eq!(
            find(&t, "h", &Method::GET, "/?mode=fast", &hb),
            Some("fallback")
        );
        assert_eq!(
            find(&t, "h", &Method::GET, "/?a=1%202&b", &h),
            Some("query")
        );
        assert_eq!(find(&t, "h", &Method::GET, "/?b=&a=1+2", &h), Some("query"));
        assert_eq!(
            find(&t, "h", &Method::GET, "/?a=1%202", &h),
            Some("fallback"),
            "all params must match"
        );
        // First occurrence of a repeated name counts.
        assert_eq!(
            find(&t, "h", &Method::GET, "/?a=x&a=1%202&b", &h),
            Some("fallback")
        );
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%20b+c"), "a b c");
        assert_eq!(percent_decode("plain"), "plain");
        assert_eq!(percent_decode("bad%2"), "bad%2");
        assert_eq!(percent_decode("%zz"), "%zz");
    }

    #[test]
    fn weighted_targets() {
        let f = Forward {
            targets: vec![
                Target {
                    name: "a".into(),
                    weight: 1,
                    cluster: None,
                },
                Target {
                    name: "zero".into(),
                    weight: 0,
                    cluster: None,
                },
                Target {
                    name: "b".into(),
                    weight: 3,
                    cluster: None,
                },
            ],
            total_weight: 4,
            path_rewrite: None,
            host_rewrite: None,
            timeout: None,
            hash_policy: vec![],
            cluster_not_found: StatusCode::SERVICE_UNAVAILABLE,
        };
        let mut counts = [0usize; 3];
        for _ in 0..40_000 {
            counts[f.pick_target().unwrap()] += 1;
        }
        assert_eq!(counts[1], 0);
        assert!((9_000..11_000).contains(&counts[0]), "{counts:?}");
    }
}
