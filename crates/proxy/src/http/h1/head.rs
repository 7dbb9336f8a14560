//! HTTP/1.x request heads: `httparse` over the connection's read buffer, turned into
//! `http::request::Parts` without copying (names and values are slices of the head's
//! bytes), and the message framing decided by RFC 9112 §6 with the smuggling shapes
//! refused: Content-Length beside Transfer-Encoding, more than one Content-Length, a
//! length that is not plain digits, Transfer-Encoding in HTTP/1.0 or not ending in chunked.

use std::mem::MaybeUninit;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Uri, Version};

/// At most this many header lines (Envoy's default `max_headers_count`).
pub const MAX_HEADERS: usize = 100;

/// How the request body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    None,
    /// `Content-Length: n` (n > 0).
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// A parsed request head.
#[derive(Debug)]
pub struct Head {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub headers: HeaderMap,
    pub framing: Framing,
    /// The client wants the connection kept after this exchange.
    pub keep_alive: bool,
    /// `Expect: 100-continue` on a request with a body.
    pub expect_continue: bool,
    /// `Connection: upgrade` with an `Upgrade` header (HTTP/1.1).
    pub upgrade: bool,
}

/// Why a head was refused; each maps to the status the client gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error("{0}")]
    Bad(&'static str),
    #[error("request header fields too large")]
    TooLarge,
    #[error("HTTP version not supported")]
    Version,
    #[error("transfer coding not implemented")]
    NotImplemented,
}

type Range = (u32, u32);

/// Header lines kept in place before spilling to the heap: most requests have fewer.
const INLINE: usize = 20;

/// Offsets into the buffer of one parsed head (so the buffer can be frozen afterwards).
struct Offsets {
    len: usize,
    method: Range,
    path: Range,
    version: u8,
    count: usize,
    inline: [(Range, Range); INLINE],
    spill: Vec<(Range, Range)>,
}

impl Offsets {
    fn headers(&self) -> impl Iterator<Item = &(Range, Range)> {
        self.inline
            .get(..self.count.min(INLINE))
            .unwrap_or_default()
            .iter()
            .chain(self.spill.iter())
    }
}

/// Where `part` (a slice httparse took from `base`) lies in `base` (heads are far below
/// 4 GiB: `max_head` bounds them).
fn range(base: &[u8], part: &[u8]) -> Range {
    let start = (part.as_ptr() as usize).wrapping_sub(base.as_ptr() as usize);
    match start.checked_add(part.len()) {
        Some(end) if end <= base.len() => (
            u32::try_from(start).unwrap_or(0),
            u32::try_from(end).unwrap_or(0),
        ),
        _ => (0, 0),
    }
}

/// Parses the head at the start of `buf`. `Ok(None)`: incomplete (read more), unless the
/// buffer already holds `max_head` bytes, which is [`HeadError::TooLarge`]. On success the
/// head's bytes are split off `buf`; what follows (body, pipelined requests) stays.
pub fn parse(buf: &mut BytesMut, max_head: usize) -> Result<Option<Head>, HeadError> {
    let Some(off) = locate(buf, max_head)? else {
        return Ok(None);
    };
    let bytes = buf.split_to(off.len).freeze();
    build(&bytes, &off).map(Some)
}

fn locate(buf: &[u8], max_head: usize) -> Result<Option<Offsets>, HeadError> {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let status = req.parse_with_uninit_headers(buf, &mut slots);
    match status {
        Ok(httparse::Status::Complete(len)) => {
            if len > max_head {
                return Err(HeadError::TooLarge);
            }
            let (Some(method), Some(path), Some(version)) = (req.method, req.path, req.version)
            else {
                return Err(HeadError::Bad("malformed request line"));
            };
            let mut off = Offsets {
                len,
                method: range(buf, method.as_bytes()),
                path: range(buf, path.as_bytes()),
                version,
                count: req.headers.len(),
                inline: [((0, 0), (0, 0)); INLINE],
                spill: Vec::new(),
            };
            for (i, h) in req.headers.iter().enumerate() {
                let r = (range(buf, h.name.as_bytes()), range(buf, h.value));
                match off.inline.get_mut(i) {
                    Some(slot) => *slot = r,
                    None => off.spill.push(r),
                }
            }
            Ok(Some(off))
        }
        Ok(httparse::Status::Partial) if buf.len() >= max_head => Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(httparse::Error::TooManyHeaders) => Err(HeadError::TooLarge),
        Err(httparse::Error::Version) if names_a_version(buf) => Err(HeadError::Version),
        Err(httparse::Error::Version) => Err(HeadError::Bad("malformed request line")),
        Err(httparse::Error::Token) => Err(HeadError::Bad("malformed request line")),
        Err(httparse::Error::HeaderName) => Err(HeadError::Bad("malformed header name")),
        Err(httparse::Error::HeaderValue) => Err(HeadError::Bad("malformed header value")),
        Err(_) => Err(HeadError::Bad("malformed request")),
    }
}

/// The request line ends in a well-formed `HTTP/x.y` (one we do not speak), as opposed to
/// not being HTTP at all.
fn names_a_version(buf: &[u8]) -> bool {
    let line = buf.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    match line.rsplit(|&b| b == b' ').next() {
        Some([b'H', b'T', b'T', b'P', b'/', major, b'.', minor]) => {
            major.is_ascii_digit() && minor.is_ascii_digit()
        }
        _ => false,
    }
}

fn slice(bytes: &Bytes, r: Range) -> &[u8] {
    bytes.get(r.0 as usize..r.1 as usize).unwrap_or_default()
}

fn sub(bytes: &Bytes, r: Range) -> Bytes {
    if (r.1 as usize) <= bytes.len() && r.0 <= r.1 {
        bytes.slice(r.0 as usize..r.1 as usize)
    } else {
        Bytes::new()
    }
}

fn build(bytes: &Bytes, off: &Offsets) -> Result<Head, HeadError> {
    let method = Method::from_bytes(slice(bytes, off.method))
        .map_err(|_| HeadError::Bad("malformed method"))?;
    let uri = Uri::from_maybe_shared(sub(bytes, off.path))
        .map_err(|_| HeadError::Bad("malformed request target"))?;
    let version = if off.version == 0 {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };

    // Room for what the pipeline adds (x-forwarded-*) without growing the map.
    let mut headers = HeaderMap::with_capacity(off.count + 4);
    let mut length: Option<u64> = None;
    let mut te_seen = false;
    let mut te_chunked_last = false;
    let mut te_other = false;
    let mut conn_close = false;
    let mut conn_keep_alive = false;
    let mut conn_upgrade = false;
    let mut has_upgrade = false;
    let mut expect_continue = false;
    let mut hosts = 0usize;
    for &(name, value) in off.headers() {
        let name = HeaderName::from_bytes(slice(bytes, name))
            .map_err(|_| HeadError::Bad("malformed header name"))?;
        let raw = slice(bytes, value);
        if name == header::CONTENT_LENGTH {
            if length.is_some() {
                return Err(HeadError::Bad("duplicate content-length"));
            }
            length = Some(content_length(raw).ok_or(HeadError::Bad("malformed content-length"))?);
        } else if name == header::TRANSFER_ENCODING {
            te_seen = true;
            for coding in raw.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                if coding.is_empty() {
                    continue;
                }
                if te_chunked_last {
                    // Something after chunked: chunked is not the final coding.
                    te_chunked_last = false;
                    te_other = true;
                }
                if coding.eq_ignore_ascii_case(b"chunked") {
                    te_chunked_last = true;
                } else {
                    te_other = true;
                }
            }
        } else if name == header::CONNECTION {
            for token in raw.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                if token.eq_ignore_ascii_case(b"close") {
                    conn_close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    conn_keep_alive = true;
                } else if token.eq_ignore_ascii_case(b"upgrade") {
                    conn_upgrade = true;
                }
            }
        } else if name == header::EXPECT {
            expect_continue = raw.trim_ascii().eq_ignore_ascii_case(b"100-continue");
        } else if name == header::HOST {
            hosts += 1;
        } else if name == header::UPGRADE {
            has_upgrade = true;
        }
        let value = HeaderValue::from_maybe_shared(sub(bytes, value))
            .map_err(|_| HeadError::Bad("malformed header value"))?;
        headers.append(name, value);
    }

    if hosts > 1 {
        return Err(HeadError::Bad("more than one host header"));
    }
    // RFC 9112 §3.2: an HTTP/1.1 request without Host (and not in absolute form) is a 400.
    if hosts == 0 && version == Version::HTTP_11 && uri.authority().is_none() {
        return Err(HeadError::Bad("missing host header"));
    }
    let framing = if te_seen {
        if length.is_some() {
            return Err(HeadError::Bad("both content-length and transfer-encoding"));
        }
        if version == Version::HTTP_10 {
            return Err(HeadError::Bad("transfer-encoding in an HTTP/1.0 request"));
        }
        match (te_chunked_last, te_other) {
            (true, false) => Framing::Chunked,
            // gzip, chunked: a coding we do not decode.
            (true, true) => return Err(HeadError::NotImplemented),
            (false, _) => {
                return Err(HeadError::Bad("transfer-encoding does not end in chunked"));
            }
        }
    } else {
        match length {
            None | Some(0) => Framing::None,
            Some(n) => Framing::Length(n),
        }
    };
    let keep_alive = match version {
        Version::HTTP_10 => conn_keep_alive && !conn_close,
        _ => !conn_close,
    };
    Ok(Head {
        method,
        uri,
        version,
        headers,
        framing,
        keep_alive,
        expect_continue: expect_continue && version == Version::HTTP_11 && framing != Framing::None,
        upgrade: conn_upgrade && has_upgrade && version == Version::HTTP_11,
    })
}

/// A Content-Length value: 1 to 19 ASCII digits, nothing else (no sign, list or spaces).
/// Also used for the lengths of responses (write.rs).
pub(super) fn content_length(raw: &[u8]) -> Option<u64> {
    if raw.is_empty() || raw.len() > 19 {
        return None;
    }
    raw.iter().try_fold(0u64, |n, &b| {
        b.is_ascii_digit().then(|| n * 10 + u64::from(b - b'0'))
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

    use super::*;

    fn p(raw: &[u8]) -> Result<Option<Head>, HeadError> {
        let mut b = BytesMut::from(raw);
        parse(&mut b, 8192)
    }

    fn ok(raw: &[u8]) -> Head {
        p(raw).unwrap().unwrap()
    }

    #[test]
    fn simple_get_and_rest_stays() {
        let mut b =
            BytesMut::from(&b"GET /a?b=1 HTTP/1.1\r\nHost: x\r\nX-A: 1\r\nx-a: 2\r\n\r\nNEXT"[..]);
        let h = parse(&mut b, 8192).unwrap().unwrap();
        assert_eq!(h.method, Method::GET);
        assert_eq!(h.uri.path(), "/a");
        assert_eq!(h.uri.query(), Some("b=1"));
        assert_eq!(h.version, Version::HTTP_11);
        assert_eq!(h.headers.get_all("x-a").iter().count(), 2);
        assert_eq!(h.framing, Framing::None);
        assert!(h.keep_alive);
        assert_eq!(&b[..], b"NEXT");
    }

    #[test]
    fn partial_then_too_large() {
        assert!(p(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap().is_none());
        let mut b = BytesMut::from(&b"GET / HTTP/1.1\r\nX: aaaaaaaaaaaaaaaaaaaa"[..]);
        assert_eq!(parse(&mut b, 16).unwrap_err(), HeadError::TooLarge);
        let mut b = BytesMut::from(&b"GET / HTTP/1.1\r\nX: aaaaaaaaaaaaaaa\r\n\r\n"[..]);
        assert_eq!(parse(&mut b, 20).unwrap_err(), HeadError::TooLarge);
        let mut many = String::from("GET / HTTP/1.1\r\n");
        for i in 0..=MAX_HEADERS {
            many.push_str(&format!("h{i}: v\r\n"));
        }
        many.push_str("\r\n");
        assert_eq!(p(many.as_bytes()).unwrap_err(), HeadError::TooLarge);
    }

    #[test]
    fn framing() {
        let h = ok(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\n\r\n");
        assert_eq!(h.framing, Framing::Length(12));
        let h = ok(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(h.framing, Framing::None);
        let h = ok(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: Chunked\r\n\r\n");
        assert_eq!(h.framing, Framing::Chunked);
        // Host: required in HTTP/1.1 unless the target is in absolute form.
        assert_eq!(
            p(b"GET / HTTP/1.1\r\n\r\n").unwrap_err(),
            HeadError::Bad("missing host header")
        );
        let h = ok(b"GET http://a.example/x HTTP/1.1\r\n\r\n");
        assert_eq!(h.uri.host(), Some("a.example"));
        assert!(ok(b"GET / HTTP/1.0\r\n\r\n").headers.is_empty());
        let bad: &[&[u8]] = &[
            b"POST / HTTP/1.1\r\nHost: z\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: z\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: z\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: z\r\nContent-Length: 5x\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: z\r\nContent-Length: +5\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: z\r\nContent-Length: 5, 5\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: z\r\nContent-Length: 99999999999999999999\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: z\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: z\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n",
            b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: z\r\nNoColon\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: z\r\nX: a\r\n folded\r\n\r\n",
            b"THIS IS NOT HTTP\r\n\r\n",
        ];
        for raw in bad {
            let e = p(raw).unwrap_err();
            assert!(
                matches!(e, HeadError::Bad(_)),
                "{}: {e}",
                String::from_utf8_lossy(raw)
            );
        }
        let e = p(b"POST / HTTP/1.1\r\nHost: z\r\nTransfer-Encoding: gzip, chunked\r\n\r\n")
            .unwrap_err();
        assert_eq!(e, HeadError::NotImplemented);
        assert_eq!(
            p(b"GET / HTTP/2.0\r\n\r\n").unwrap_err(),
            HeadError::Version
        );
    }

    #[test]
    fn connection_semantics() {
        assert!(!ok(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").keep_alive);
        assert!(!ok(b"GET / HTTP/1.0\r\n\r\n").keep_alive);
        let h = ok(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n");
        assert!(h.keep_alive);
        assert_eq!(h.version, Version::HTTP_10);
        let h =
            ok(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\n");
        assert!(h.upgrade && h.keep_alive);
        assert!(!ok(b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n").upgrade);
        let h =
            ok(b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n");
        assert!(h.expect_continue);
        assert!(!ok(b"GET / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n\r\n").expect_continue);
    }

    #[test]
    fn leading_empty_lines_are_skipped() {
        let h = ok(b"\r\n\r\nGET /x HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(h.uri.path(), "/x");
    }
}
