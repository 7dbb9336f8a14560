//! HTTP/1 framing guard: reads the downstream byte stream alongside hyper to catch request
//! smuggling shapes hyper silently normalises, and header blocks over the configured limit.
//!
//! hyper accepts a request with both `Content-Length` and `Transfer-Encoding` (it drops the
//! length) and folds duplicated equal `Content-Length` lines into one, so the service
//! cannot see either. This guard parses each request head with `httparse` as the bytes go
//! by (no copy unless a head is split across reads), follows the body framing
//! (content-length or chunked) to find the next head, and records a verdict for the N-th
//! request of the connection. The service numbers HTTP/1 requests in the same order and
//! answers 400 (or 431) for a flagged one, closing the connection. After an upgrade or
//! CONNECT request, an HTTP/2 preface, or anything it cannot parse, the guard steps aside
//! (hyper then rejects malformed input itself).

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What is wrong with a request head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Both Content-Length and Transfer-Encoding.
    ClAndTe,
    /// More than one Content-Length line.
    DuplicateCl,
    /// Header block larger than the limit.
    TooLarge,
}

impl Verdict {
    fn code(self) -> u64 {
        match self {
            Verdict::ClAndTe => 1,
            Verdict::DuplicateCl => 2,
            Verdict::TooLarge => 3,
        }
    }

    fn from_code(c: u64) -> Option<Self> {
        match c {
            1 => Some(Verdict::ClAndTe),
            2 => Some(Verdict::DuplicateCl),
            3 => Some(Verdict::TooLarge),
            _ => None,
        }
    }
}

/// Verdict shared between the guard (writer) and the service (reader).
#[derive(Debug)]
pub struct GuardShared {
    /// `(index << 2) | code` of the first bad request, or `u64::MAX`.
    bad: AtomicU64,
}

impl Default for GuardShared {
    fn default() -> Self {
        Self {
            bad: AtomicU64::new(u64::MAX),
        }
    }
}

impl GuardShared {
    fn set(&self, index: u64, v: Verdict) {
        let _ = self.bad.compare_exchange(
            u64::MAX,
            (index << 2) | v.code(),
            Ordering::Release,
            Ordering::Relaxed,
        );
    }

    /// The verdict for the `index`-th HTTP/1 request (0-based) of the connection.
    pub fn verdict(&self, index: u64) -> Option<Verdict> {
        let b = self.bad.load(Ordering::Acquire);
        if b == u64::MAX || b >> 2 != index {
            return None;
        }
        Verdict::from_code(b & 3)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    Head,
    Body(u64),
    ChunkSize { size: u64, digits: u32, ext: bool },
    ChunkData(u64),
    ChunkEnd,
    Trailer { line: usize },
    Off,
}

/// The framing tracker (pure; fed with the bytes hyper reads).
#[derive(Debug)]
pub struct Framing {
    st: St,
    head: Vec<u8>,
    max_head: usize,
    index: u64,
}

const MAX_HEADERS: usize = 128;

impl Framing {
    pub fn new(max_head: usize) -> Self {
        Self {
            st: St::Head,
            head: Vec::new(),
            max_head,
            index: 0,
        }
    }

    pub fn is_off(&self) -> bool {
        self.st == St::Off
    }

    /// Feed bytes; returns a verdict (with its request index) when one is found.
    pub fn feed(&mut self, mut data: &[u8]) -> Option<(u64, Verdict)> {
        while !data.is_empty() {
            match self.st {
                St::Off => return None,
                St::Head => {
                    if self.head.is_empty() {
                        // Tolerate CRLFs between requests, as hyper does.
                        let skip = data
                            .iter()
                            .take_while(|&&b| b == b'\r' || b == b'\n')
                            .count();
                        data = &data[skip..];
                        if data.is_empty() {
                            return None;
                        }
                        match self.parse_head(data) {
                            HeadResult::Done(n, v) => {
                                data = &data[n..];
                                if v.is_some() {
                                    return v;
                                }
                            }
                            HeadResult::Partial => {
                                self.head.extend_from_slice(data);
                                return self.check_partial_size();
                            }
                            HeadResult::Error => {
                                self.st = St::Off;
                                return None;
                            }
                        }
                    } else {
                        let before = self.head.len();
                        self.head.extend_from_slice(data);
                        let buf = std::mem::take(&mut self.head);
                        let res = self.parse_head(&buf);
                        match res {
                            HeadResult::Done(n, v) => {
                                data = &data[n.saturating_sub(before).min(data.len())..];
                                if v.is_some() {
                                    return v;
                                }
                            }
                            HeadResult::Partial => {
                                self.head = buf;
                                return self.check_partial_size();
                            }
                            HeadResult::Error => {
                                self.st = St::Off;
                                return None;
                            }
                        }
                    }
                }
                St::Body(n) => {
                    let take = (data.len() as u64).min(n);
                    data = &data[take as usize..];
                    self.st = if n == take {
                        St::Head
                    } else {
                        St::Body(n - take)
                    };
                }
                St::ChunkData(n) => {
                    let take = (data.len() as u64).min(n);
                    data = &data[take as usize..];
                    self.st = if n == take {
                        St::ChunkEnd
                    } else {
                        St::ChunkData(n - take)
                    };
                }
                St::ChunkSize { size, digits, ext } => {
                    let b = data[0];
                    data = &data[1..];
                    self.st = match b {
                        b'\n' if digits > 0 => {
                            if size == 0 {
                                St::Trailer { line: 0 }
                            } else {
                                St::ChunkData(size)
                            }
                        }
                        b'\r' => St::ChunkSize { size, digits, ext },
                        _ if ext => St::ChunkSize { size, digits, ext },
                        b';' | b' ' | b'\t' if digits > 0 => St::ChunkSize {
                            size,
                            digits,
                            ext: true,
                        },
                        _ => match (b as char).to_digit(16) {
                            Some(d) if digits < 16 => St::ChunkSize {
                                size: size * 16 + u64::from(d),
                                digits: digits + 1,
                                ext,
                            },
                            _ => St::Off,
                        },
                    };
                }
                St::ChunkEnd => {
                    let b = data[0];
                    data = &data[1..];
                    self.st = match b {
                        b'\r' => St::ChunkEnd,
                        b'\n' => St::ChunkSize {
                            size: 0,
                            digits: 0,
                            ext: false,
                        },
                        _ => St::Off,
                    };
                }
                St::Trailer { line } => {
                    let b = data[0];
                    data = &data[1..];
                    self.st = match b {
                        b'\n' if line == 0 => St::Head,
                        b'\n' => St::Trailer { line: 0 },
                        b'\r' => St::Trailer { line },
                        _ if line > self.max_head => St::Off,
                        _ => St::Trailer { line: line + 1 },
                    };
                }
            }
        }
        None
    }

    fn check_partial_size(&mut self) -> Option<(u64, Verdict)> {
        if self.head.len() > self.max_head {
            self.st = St::Off;
            self.head = Vec::new();
            return Some((self.index, Verdict::TooLarge));
        }
        None
    }

    fn parse_head(&mut self, buf: &[u8]) -> HeadResult {
        // Uninitialised: filling 128 empty headers (4 KiB) per request cost more than
        // parsing a typical head.
        let mut headers =
            [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut []);
        let n = match req.parse_with_uninit_headers(buf, &mut headers) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return HeadResult::Partial,
            Err(_) => return HeadResult::Error,
        };
        let index = self.index;
        self.index += 1;
        let mut cl: Option<u64> = None;
        let mut cl_count = 0;
        let mut te_chunked: Option<bool> = None;
        let mut upgrade = false;
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                cl_count += 1;
                cl = std::str::from_utf8(h.value)
                    .ok()
                    .and_then(|v| v.trim().parse().ok());
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                let last = h
                    .value
                    .rsplit(|&b| b == b',')
                    .next()
                    .unwrap_or(b"")
                    .trim_ascii();
                te_chunked = Some(last.eq_ignore_ascii_case(b"chunked"));
            } else if h.name.eq_ignore_ascii_case("upgrade") {
                upgrade = true;
            }
        }
        let verdict = if cl_count > 0 && te_chunked.is_some() {
            Some(Verdict::ClAndTe)
        } else if cl_count > 1 {
            Some(Verdict::DuplicateCl)
        } else if n > self.max_head {
            Some(Verdict::TooLarge)
        } else {
            None
        };
        if let Some(v) = verdict {
            self.st = St::Off;
            return HeadResult::Done(n, Some((index, v)));
        }
        self.st = if upgrade || req.method == Some("CONNECT") {
            St::Off
        } else {
            match (te_chunked, cl) {
                (Some(true), _) => St::ChunkSize {
                    size: 0,
                    digits: 0,
                    ext: false,
                },
                (Some(false), _) => St::Off,
                (None, Some(0)) => St::Head,
                (None, Some(len)) => St::Body(len),
                (None, None) if cl_count > 0 => St::Off,
                (None, None) => St::Head,
            }
        };
        HeadResult::Done(n, None)
    }
}

enum HeadResult {
    Done(usize, Option<(u64, Verdict)>),
    Partial,
    Error,
}

/// Downstream IO wrapped with a [`Framing`] guard (disabled: plain pass-through).
pub struct GuardedIo<IO> {
    io: IO,
    framing: Option<Framing>,
    shared: std::sync::Arc<GuardShared>,
}

impl<IO> GuardedIo<IO> {
    pub fn new(
        io: IO,
        shared: std::sync::Arc<GuardShared>,
        max_head: usize,
        enabled: bool,
    ) -> Self {
        Self {
            io,
            framing: enabled.then(|| Framing::new(max_head)),
            shared,
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for GuardedIo<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        let res = Pin::new(&mut this.io).poll_read(cx, buf);
        if let (Poll::Ready(Ok(())), Some(f)) = (&res, &mut this.framing) {
            if let Some((index, v)) = f.feed(&buf.filled()[before..]) {
                this.shared.set(index, v);
            }
            if f.is_off() {
                this.framing = None;
            }
        }
        res
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for GuardedIo<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

    use super::*;

    fn run(chunks: &[&[u8]]) -> (Option<(u64, Verdict)>, Framing) {
        let mut f = Framing::new(1024);
        let mut verdict = None;
        for c in chunks {
            if let Some(v) = f.feed(c) {
                verdict.get_or_insert(v);
            }
        }
        (verdict, f)
    }

    #[test]
    fn clean_keep_alive_sequence() {
        let stream = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n\
POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello\
POST /y HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n10\r\n0123456789abcdef\r\n0\r\nX-T: 1\r\n\r\n\
GET /z HTTP/1.1\r\nHost: a\r\n\r\n";
        // Whole, and one byte at a time.
        let (v, f) = run(&[stream]);
        assert_eq!(v, None);
        assert_eq!(f.index, 4);
        assert_eq!(f.st, St::Head);
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        let (v, f) = run(&bytes);
        assert_eq!(v, None);
        assert_eq!(f.index, 4);
        // Split in the middle of everything, 7 bytes at a time.
        let bytes: Vec<&[u8]> = stream.chunks(7).collect();
        let (v, f) = run(&bytes);
        assert_eq!((v, f.index), (None, 4));
    }

    #[test]
    fn cl_and_te_flagged_on_its_index() {
        let stream = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n\
POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        let (v, f) = run(&[stream]);
        assert_eq!(v, Some((1, Verdict::ClAndTe)));
        assert!(f.is_off());
        let stream = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\ncontent-length: 4\r\n\r\n";
        assert_eq!(run(&[stream]).0, Some((0, Verdict::ClAndTe)));
    }

    #[test]
    fn duplicate_content_length_flagged_even_if_equal() {
        let stream = b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc";
        assert_eq!(run(&[stream]).0, Some((0, Verdict::DuplicateCl)));
    }

    #[test]
    fn oversized_head_flagged() {
        let big = format!("GET / HTTP/1.1\r\nX-Big: {}\r\n\r\n", "a".repeat(2000));
        assert_eq!(run(&[big.as_bytes()]).0, Some((0, Verdict::TooLarge)));
        // Also when it arrives in pieces and never completes.
        let (v, _) = run(&[b"GET / HTTP/1.1\r\nX-Big: ", "a".repeat(1500).as_bytes()]);
        assert_eq!(v, Some((0, Verdict::TooLarge)));
    }

    #[test]
    fn steps_aside_for_upgrades_and_h2() {
        let (v, f) = run(&[
            b"GET /ws HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n\x81\x05hello",
        ]);
        assert_eq!(v, None);
        assert!(f.is_off());
        let (v, f) = run(&[b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"]);
        assert_eq!(v, None);
        assert!(f.is_off());
    }

    #[test]
    fn shared_verdict_by_index() {
        let s = GuardShared::default();
        assert_eq!(s.verdict(0), None);
        s.set(3, Verdict::DuplicateCl);
        s.set(4, Verdict::TooLarge);
        assert_eq!(s.verdict(3), Some(Verdict::DuplicateCl));
        assert_eq!(s.verdict(4), None);
    }
}
