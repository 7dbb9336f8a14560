//! Request/response filters: header mutation, path and host rewrite, hop-by-hop header
//! removal, and the `x-forwarded-*` headers. Compiled at snapshot time, applied per request.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;

/// Compiled `biplane_config::HeaderMutation`: remove, then set, then add.
#[derive(Debug, Default, Clone)]
pub struct HeaderMutation {
    remove: Vec<HeaderName>,
    set: Vec<(HeaderName, HeaderValue)>,
    add: Vec<(HeaderName, HeaderValue)>,
}

impl HeaderMutation {
    /// Invalid names or values (which validation should have rejected) are skipped.
    pub fn compile(m: &biplane_config::HeaderMutation) -> Self {
        let pair = |(n, v): &(String, String)| {
            Some((
                HeaderName::from_bytes(n.as_bytes()).ok()?,
                HeaderValue::from_str(v).ok()?,
            ))
        };
        Self {
            remove: m
                .remove
                .iter()
                .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
                .collect(),
            set: m.set.iter().filter_map(pair).collect(),
            add: m.add.iter().filter_map(pair).collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.set.is_empty() && self.add.is_empty()
    }

    pub fn apply(&self, headers: &mut HeaderMap) {
        for n in &self.remove {
            headers.remove(n);
        }
        for (n, v) in &self.set {
            headers.insert(n.clone(), v.clone());
        }
        for (n, v) in &self.add {
            headers.append(n.clone(), v.clone());
        }
    }
}

/// The hop-by-hop headers this proxy always handles itself (whatever `Connection` names),
/// in the bit order of [`hop_bit`].
const HOP_BY_HOP: [&[u8]; 6] = [
    b"connection",
    b"keep-alive",
    b"proxy-connection",
    b"transfer-encoding",
    b"upgrade",
    b"te",
];
const CONNECTION_BIT: u8 = 1;
const KEEP_ALIVE_BIT: u8 = 1 << 1;
const PROXY_CONNECTION_BIT: u8 = 1 << 2;
const TRANSFER_ENCODING_BIT: u8 = 1 << 3;
const UPGRADE_BIT: u8 = 1 << 4;
const TE_BIT: u8 = 1 << 5;

/// The bit of a hop-by-hop header name (0 for any other name).
fn hop_bit(name: &HeaderName) -> u8 {
    match name.as_str() {
        "connection" => CONNECTION_BIT,
        "keep-alive" => KEEP_ALIVE_BIT,
        "proxy-connection" => PROXY_CONNECTION_BIT,
        "transfer-encoding" => TRANSFER_ENCODING_BIT,
        "upgrade" => UPGRADE_BIT,
        "te" => TE_BIT,
        _ => 0,
    }
}

/// Remove hop-by-hop headers (RFC 9110 §7.6.1, as Envoy does): `Connection` and every header
/// it names, `Keep-Alive`, `Proxy-Connection`, `Transfer-Encoding`, `Upgrade` and `TE`
/// (a request's `te: trailers` is kept: gRPC needs it). When `upgrade` is true (a WebSocket
/// handshake or its 101 answer) `Upgrade` survives and `Connection: upgrade` is re-set.
///
/// Per request and per response, so the common cases are cheap: one scan of the names
/// (cheaper than a hashed lookup per hop-by-hop name) and lookups only for what is there;
/// no allocation when `Connection` only names what goes anyway (`keep-alive`, `close`).
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool, keep_te_trailers: bool) {
    // Which hop-by-hop names are present, in one scan of the names: each removal below is
    // then a hashed lookup only for a header that is there.
    let present = headers.keys().fold(0u8, |acc, k| acc | hop_bit(k));
    if present & CONNECTION_BIT != 0 {
        let mut others = false;
        let mut close = false;
        for t in headers
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        {
            let t = t.trim_ascii();
            if t.eq_ignore_ascii_case(b"close") {
                close = true;
            } else if !t.is_empty() && !HOP_BY_HOP.iter().any(|h| t.eq_ignore_ascii_case(h)) {
                others = true;
            }
        }
        if close {
            headers.remove("close");
        }
        if others {
            // Rare: `Connection` names end-to-end headers; the allocation is paid then only.
            let named: Vec<HeaderName> = headers
                .get_all(header::CONNECTION)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
                .filter(|n| hop_bit(n) == 0)
                .collect();
            for n in named {
                headers.remove(n);
            }
        }
        headers.remove(header::CONNECTION);
    }
    if present & KEEP_ALIVE_BIT != 0 {
        headers.remove("keep-alive");
    }
    if present & PROXY_CONNECTION_BIT != 0 {
        headers.remove("proxy-connection");
    }
    if present & TRANSFER_ENCODING_BIT != 0 {
        headers.remove(header::TRANSFER_ENCODING);
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else if present & UPGRADE_BIT != 0 {
        headers.remove(header::UPGRADE);
    }
    if present & TE_BIT != 0 {
        let trailers = keep_te_trailers
            && headers.get_all(header::TE).iter().any(|v| {
                v.as_bytes()
                    .split(|&b| b == b',')
                    .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"trailers"))
            });
        headers.remove(header::TE);
        if trailers {
            headers.insert(header::TE, HeaderValue::from_static("trailers"));
        }
    }
}

/// True for an HTTP/1.1 upgrade handshake (`Connection: upgrade` + `Upgrade: x`).
pub fn is_upgrade_request(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers.get_all(header::CONNECTION).iter().any(|v| {
            v.as_bytes()
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"upgrade"))
        })
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// Set `x-forwarded-for` and `x-forwarded-proto`.
///
/// With `use_remote_address` (an edge proxy) the peer IP is appended to
/// `x-forwarded-for` (created if absent) and `x-forwarded-proto` is overwritten with the
/// scheme the client used. Without it (a proxy behind another trusted proxy) both headers
/// are passed through as received, and `x-forwarded-proto` is only added when absent —
/// Envoy's semantics.
pub fn set_forwarded(
    headers: &mut HeaderMap,
    use_remote_address: bool,
    peer_ip: &HeaderValue,
    proto: &HeaderValue,
) {
    if use_remote_address {
        // One hashed lookup for the common case (no x-forwarded-for yet).
        match headers.entry(X_FORWARDED_FOR) {
            header::Entry::Vacant(e) => {
                e.insert(peer_ip.clone());
            }
            header::Entry::Occupied(mut e) => {
                // Several x-forwarded-for lines are folded into one, in order.
                let mut v: Vec<u8> = Vec::with_capacity(64);
                for (i, p) in e.iter().enumerate() {
                    if i > 0 {
                        v.extend_from_slice(b", ");
                    }
                    v.extend_from_slice(p.as_bytes());
                }
                v.extend_from_slice(b", ");
                v.extend_from_slice(peer_ip.as_bytes());
                if let Ok(hv) = HeaderValue::from_bytes(&v) {
                    e.insert(hv);
                }
            }
        }
        headers.insert(X_FORWARDED_PROTO, proto.clone());
    } else {
        headers
            .entry(X_FORWARDED_PROTO)
            .or_insert_with(|| proto.clone());
    }
}

/// Compiled path rewrite.
#[derive(Debug, Clone)]
pub enum PathRewrite {
    /// Replace the first `matched_len` bytes of the path (the route's matched prefix,
    /// normalised without a trailing slash) with `with`. Gateway API `ReplacePrefixMatch`.
    ReplacePrefix {
        matched_len: Option<usize>,
        with: String,
    },
    /// Replace every match of `pattern` (Rust `$1` syntax in `substitution`).
    Regex {
        pattern: regex::Regex,
        substitution: String,
    },
}

impl PathRewrite {
    /// `matched_prefix_len`: the route's normalised prefix length when it matched by
    /// prefix (`None`: the whole path is replaced).
    pub fn compile(r: &biplane_config::PathRewrite, matched_prefix_len: Option<usize>) -> Self {
        match r {
            biplane_config::PathRewrite::ReplacePrefix(with) => PathRewrite::ReplacePrefix {
                matched_len: matched_prefix_len,
                with: with.clone(),
            },
            biplane_config::PathRewrite::Regex {
                pattern,
                substitution,
            } => PathRewrite::Regex {
                pattern: pattern.clone(),
                substitution: envoy_to_rust_substitution(substitution),
            },
        }
    }

    /// The rewritten path and query (the query is kept as is).
    pub fn apply(&self, pq: &PathAndQuery) -> Option<PathAndQuery> {
        let path = pq.path();
        let mut out = match self {
            PathRewrite::ReplacePrefix { matched_len, with } => {
                let cut = matched_len.unwrap_or(path.len()).min(path.len());
                replace_prefix(path, cut, with)
            }
            PathRewrite::Regex {
                pattern,
                substitution,
            } => pattern
                .replace_all(path, substitution.as_str())
                .into_owned(),
        };
        if out.is_empty() || !out.starts_with('/') {
            out.insert(0, '/');
        }
        if let Some(q) = pq.query() {
            out.push('?');
            out.push_str(q);
        }
        PathAndQuery::try_from(out).ok()
    }
}

/// `with` + `path[cut..]`, without doubling the slash between them (`/` + `/bar` = `/bar`).
pub fn replace_prefix(path: &str, cut: usize, with: &str) -> String {
    let rest = path.get(cut..).unwrap_or("");
    let mut out = String::with_capacity(with.len() + rest.len() + 1);
    out.push_str(with);
    if out.ends_with('/') && rest.starts_with('/') {
        out.pop();
    }
    out.push_str(rest);
    if out.is_empty() {
        out.push('/');
    }
    out
}

/// Envoy's `regex_rewrite` substitution writes groups as `\1`; Rust's regex as `${1}`. A
/// literal `$` must be doubled for Rust.
fn envoy_to_rust_substitution(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 4);
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '$' => out.push_str("$$"),
            '\\' => match chars.peek() {
                Some(d) if d.is_ascii_digit() => {
                    out.push_str("${");
                    while let Some(d) = chars.peek().copied().filter(char::is_ascii_digit) {
                        out.push(d);
                        chars.next();
                    }
                    out.push('}');
                }
                Some('\\') => {
                    out.push('\\');
                    chars.next();
                }
                _ => out.push('\\'),
            },
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn mutation_order_remove_set_add() {
        let m = HeaderMutation::compile(&biplane_config::HeaderMutation {
            remove: vec!["x-gone".into(), "x-set".into()],
            set: vec![("x-set".into(), "new".into())],
            add: vec![("x-add".into(), "2".into())],
        });
        let mut h = headers(&[
            ("x-gone", "1"),
            ("x-set", "old"),
            ("x-set", "old2"),
            ("x-add", "1"),
        ]);
        m.apply(&mut h);
        assert!(h.get("x-gone").is_none());
        assert_eq!(h.get_all("x-set").iter().collect::<Vec<_>>(), vec!["new"]);
        assert_eq!(
            h.get_all("x-add").iter().collect::<Vec<_>>(),
            vec!["1", "2"]
        );
    }

    #[test]
    fn hop_by_hop_removed() {
        let mut h = headers(&[
            ("connection", "keep-alive, x-private"),
            ("x-private", "secret"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("te", "gzip, trailers"),
            ("x-keep", "yes"),
        ]);
        strip_hop_by_hop(&mut h, false, true);
        let mut names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, vec!["te", "x-keep"], "{h:?}");
        assert_eq!(h["te"], "trailers");

        let mut h = headers(&[("te", "gzip")]);
        strip_hop_by_hop(&mut h, false, true);
        assert!(h.get("te").is_none());
        let mut h = headers(&[("te", "trailers")]);
        strip_hop_by_hop(&mut h, false, false);
        assert!(h.get("te").is_none(), "responses never carry te");
    }

    #[test]
    fn hop_by_hop_fast_paths() {
        // Nothing hop-by-hop: untouched.
        let mut h = headers(&[("host", "a"), ("x-keep", "yes")]);
        strip_hop_by_hop(&mut h, false, true);
        assert_eq!(h.len(), 2);
        // An upgrade without hop-by-hop headers still gets `Connection: upgrade`.
        strip_hop_by_hop(&mut h, true, true);
        assert_eq!(h["connection"], "upgrade");
        // `Connection` naming only what goes anyway (any case), and `close`.
        let mut h = headers(&[
            ("connection", "Keep-Alive, close"),
            ("keep-alive", "timeout=5"),
            ("close", "named by connection"),
            ("x-keep", "yes"),
        ]);
        strip_hop_by_hop(&mut h, false, false);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["x-keep"], "{h:?}");
        // `Connection` naming an end-to-end header next to `close`.
        let mut h = headers(&[
            ("connection", "close"),
            ("connection", "X-Private"),
            ("x-private", "secret"),
            ("te", "trailers"),
        ]);
        strip_hop_by_hop(&mut h, false, true);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["te"], "{h:?}");
    }

    #[test]
    fn hop_by_hop_keeps_upgrade_for_upgrades() {
        let mut h = headers(&[
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-key", "k"),
        ]);
        assert!(is_upgrade_request(&h));
        strip_hop_by_hop(&mut h, true, true);
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["sec-websocket-key"], "k");
        assert!(!is_upgrade_request(&headers(&[("upgrade", "websocket")])));
    }

    #[test]
    fn forwarded_headers() {
        let ip = HeaderValue::from_static("10.1.2.3");
        let https = HeaderValue::from_static("https");
        let mut h = HeaderMap::new();
        set_forwarded(&mut h, true, &ip, &https);
        assert_eq!(h["x-forwarded-for"], "10.1.2.3");
        assert_eq!(h["x-forwarded-proto"], "https");

        let mut h = headers(&[
            ("x-forwarded-for", "1.1.1.1"),
            ("x-forwarded-for", "2.2.2.2"),
            ("x-forwarded-proto", "http"),
        ]);
        set_forwarded(&mut h, true, &ip, &https);
        assert_eq!(
            h.get_all("x-forwarded-for").iter().collect::<Vec<_>>(),
            vec!["1.1.1.1, 2.2.2.2, 10.1.2.3"]
        );
        assert_eq!(h["x-forwarded-proto"], "https");

        let mut h = headers(&[
            ("x-forwarded-for", "1.1.1.1"),
            ("x-forwarded-proto", "http"),
        ]);
        set_forwarded(&mut h, false, &ip, &https);
        assert_eq!(h["x-forwarded-for"], "1.1.1.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        let mut h = HeaderMap::new();
        set_forwarded(&mut h, false, &ip, &https);
        assert!(h.get("x-forwarded-for").is_none());
        assert_eq!(h["x-forwarded-proto"], "https");
    }

    #[test]
    fn replace_prefix_semantics() {
        // Gateway API ReplacePrefixMatch examples.
        assert_eq!(replace_prefix("/foo/bar", 4, "/xyz"), "/xyz/bar");
        assert_eq!(replace_prefix("/foo", 4, "/xyz"), "/xyz");
        assert_eq!(replace_prefix("/foo/bar", 4, "/"), "/bar");
        assert_eq!(replace_prefix("/foo", 4, "/"), "/");
        assert_eq!(replace_prefix("/foo/", 4, "/xyz/"), "/xyz/");
        assert_eq!(replace_prefix("/prefix/one/two", 11, "/one"), "/one/two");
        assert_eq!(replace_prefix("/foo/bar", 4, ""), "/bar");
    }

    #[test]
    fn path_rewrite_apply_keeps_query() {
        let r = PathRewrite::compile(
            &biplane_config::PathRewrite::ReplacePrefix("/v2".into()),
            Some(3),
        );
        let pq = PathAndQuery::from_static("/v1/items?a=1");
        assert_eq!(r.apply(&pq).unwrap(), "/v2/items?a=1");

        let r = PathRewrite::compile(
            &biplane_config::PathRewrite::Regex {
                pattern: regex::Regex::new("^/.*$").unwrap(),
                substitution: "/full".into(),
            },
            None,
        );
        assert_eq!(r.apply(&pq).unwrap(), "/full?a=1");

        let r = PathRewrite::compile(
            &biplane_config::PathRewrite::Regex {
                pattern: regex::Regex::new("^/v(\\d+)/(.*)$").unwrap(),
                substitution: "/\\2/version/\\1$".into(),
            },
            None,
        );
        assert_eq!(r.apply(&pq).unwrap(), "/items/version/1$?a=1");
    }

    #[test]
    fn substitution_translation() {
        assert_eq!(envoy_to_rust_substitution("\\1-\\12"), "${1}-${12}");
        assert_eq!(envoy_to_rust_substitution("a$b\\\\c"), "a$$b\\c");
    }
}
