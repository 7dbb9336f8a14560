//! HTTP/1.1 responses onto the wire: the status line and headers in one buffer, the body
//! length-delimited, chunked (with trailers) or close-delimited, as RFC 9112 §6 and the
//! request allow. A small body is copied behind the head so that the whole response is one
//! `write`; larger data goes out with vectored writes, no copy.

use std::cell::RefCell;
use std::io::IoSlice;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode, Version};
use http_body::Body;
use tokio::io::AsyncWrite;

use crate::http::body::ResponseBody;

/// Data up to this size is copied behind the head or chunk-size line (one write, no
/// vectored I/O).
const COPY_MAX: usize = 4096;

/// How the response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// No body on the wire (HEAD, 1xx, 204, 304).
    None,
    Length(u64),
    Chunked,
    /// Until the connection closes (HTTP/1.0 client, unknown length).
    Close,
}

/// What the request said that shapes the response.
#[derive(Debug, Clone, Copy)]
pub struct ReqInfo {
    pub head_method: bool,
    pub version: Version,
    /// The client and our state allow the connection to be kept.
    pub keep_alive: bool,
}

/// How a response went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// Sent whole; `close` if the connection must not carry another request.
    Done { close: bool },
    /// Broken off (upstream body error, client gone): close the connection.
    Failed,
}

thread_local! {
    /// `Date` value, formatted once per second per thread.
    static DATE: RefCell<(u64, Option<HeaderValue>)> = const { RefCell::new((u64::MAX, None)) };
}

fn date() -> Option<HeaderValue> {
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    DATE.with(|d| {
        let mut d = d.borrow_mut();
        if d.0 != secs || d.1.is_none() {
            *d = (
                secs,
                HeaderValue::from_str(&httpdate::fmt_http_date(now)).ok(),
            );
        }
        d.1.clone()
    })
}

fn push_u64(out: &mut Vec<u8>, mut n: u64, radix: u64) {
    let mut tmp = [0u8; 20];
    let mut i = tmp.len();
    loop {
        i -= 1;
        let d = (n % radix) as u8;
        if let Some(slot) = tmp.get_mut(i) {
            *slot = if d < 10 { b'0' + d } else { b'a' + d - 10 };
        }
        n /= radix;
        if n == 0 || i == 0 {
            break;
        }
    }
    out.extend_from_slice(tmp.get(i..).unwrap_or_default());
}

fn push_fields(out: &mut Vec<u8>, headers: &HeaderMap) {
    for (name, value) in headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
}

/// Writes one response: [`ResponseWriter::poll_write`] until Ready.
pub struct ResponseWriter {
    /// Head, chunk-size lines, small data, chunk ends: written before `data`.
    buf: Vec<u8>,
    pos: usize,
    /// Large data, written after `buf` (and before `after`).
    data: Bytes,
    /// Written after `data`: the CRLF ending a chunk.
    after: &'static [u8],
    body: Option<ResponseBody>,
    mode: Mode,
    close: bool,
    /// The body is over (or not sent); only the buffers are left to write.
    ended: bool,
    failed: bool,
    status: StatusCode,
}

impl std::fmt::Debug for ResponseWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseWriter")
            .field("status", &self.status)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl ResponseWriter {
    /// Encodes the head of `res` and decides the body's framing. `force_close`: the
    /// connection will be closed after this response whatever the request said.
    pub fn new(res: Response<ResponseBody>, req: ReqInfo, force_close: bool) -> Self {
        let (parts, body) = res.into_parts();
        let status = parts.status;
        let h = &parts.headers;
        let upgrade = status == StatusCode::SWITCHING_PROTOCOLS;
        // One scan for the fields that decide framing and persistence (no hashed lookups).
        let mut length: Option<Option<u64>> = None;
        let mut has_date = false;
        let mut conn_close = false;
        for (name, value) in h {
            if *name == header::CONTENT_LENGTH {
                length = Some(super::head::content_length(value.as_bytes()));
            } else if *name == header::DATE {
                has_date = true;
            } else if *name == header::CONNECTION {
                conn_close |= value
                    .as_bytes()
                    .split(|&b| b == b',')
                    .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
            }
        }
        let bodyless = status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED;
        let mode = if bodyless || req.head_method {
            Mode::None
        } else if let Some(Some(n)) = length {
            Mode::Length(n)
        } else {
            match body.size_hint().exact() {
                Some(n) => Mode::Length(n),
                None if req.version == Version::HTTP_11 => Mode::Chunked,
                None => Mode::Close,
            }
        };
        let close =
            !upgrade && (force_close || !req.keep_alive || mode == Mode::Close || conn_close);

        let mut buf = Vec::with_capacity(256 + h.len() * 32);
        buf.extend_from_slice(b"HTTP/1.1 ");
        buf.extend_from_slice(status.as_str().as_bytes());
        buf.push(b' ');
        buf.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
        buf.extend_from_slice(b"\r\n");
        for (name, value) in h {
            // Framing and persistence are ours to say (below); `Connection: upgrade` stays
            // on a 101. A Content-Length we could not use is dropped.
            let ours = *name == header::TRANSFER_ENCODING
                || (*name == header::CONNECTION && !upgrade)
                || (*name == header::CONTENT_LENGTH && !matches!(length, Some(Some(_))));
            if !ours {
                buf.extend_from_slice(name.as_str().as_bytes());
                buf.extend_from_slice(b": ");
                buf.extend_from_slice(value.as_bytes());
                buf.extend_from_slice(b"\r\n");
            }
        }
        if !has_date && let Some(d) = date() {
            buf.extend_from_slice(b"date: ");
            buf.extend_from_slice(d.as_bytes());
            buf.extend_from_slice(b"\r\n");
        }
        match mode {
            Mode::Length(n) if !matches!(length, Some(Some(_))) => {
                buf.extend_from_slice(b"content-length: ");
                push_u64(&mut buf, n, 10);
                buf.extend_from_slice(b"\r\n");
            }
            Mode::Chunked => buf.extend_from_slice(b"transfer-encoding: chunked\r\n"),
            _ => {}
        }
        if close {
            buf.extend_from_slice(b"connection: close\r\n");
        } else if !upgrade && req.version == Version::HTTP_10 {
            buf.extend_from_slice(b"connection: keep-alive\r\n");
        }
        buf.extend_from_slice(b"\r\n");
        let ended = mode == Mode::None;
        Self {
            buf,
            pos: 0,
            data: Bytes::new(),
            after: b"",
            // A response without a body on the wire drops its body at once (its finish
            // work runs when the writer is done with it).
            body: Some(body),
            mode,
            close,
            ended,
            failed: false,
            status,
        }
    }

    /// Drives the response to its end. The body is polled only when everything before has
    /// been written (so a slow client slows the upstream down).
    pub fn poll_write<IO: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        io: &mut IO,
    ) -> Poll<Written> {
        loop {
            // Take what the body has ready before writing: a small response (head and
            // body) then leaves in one write, and a large one in one vectored write.
            let mut waiting = false;
            while !self.ended && self.data.is_empty() && self.buf.len() - self.pos < COPY_MAX {
                let Some(body) = self.body.as_mut() else {
                    self.ended = true;
                    break;
                };
                match Pin::new(body).poll_frame(cx) {
                    Poll::Pending => {
                        waiting = true;
                        break;
                    }
                    Poll::Ready(frame) => self.take(frame),
                }
            }
            if let Err(e) = ready!(self.poll_flush_bufs(cx, io)) {
                tracing::debug!(error = %e, "writing response");
                self.body = None;
                return Poll::Ready(Written::Failed);
            }
            if self.ended || waiting {
                // Make sure what we have reaches the client (TLS buffers).
                if let Err(e) = ready!(Pin::new(&mut *io).poll_flush(cx)) {
                    tracing::debug!(error = %e, "flushing response");
                    self.body = None;
                    return Poll::Ready(Written::Failed);
                }
            }
            if self.ended {
                // Runs the request's finish work (access log, in-flight count).
                self.body = None;
                return Poll::Ready(if self.failed {
                    Written::Failed
                } else {
                    Written::Done { close: self.close }
                });
            }
            if waiting {
                return Poll::Pending;
            }
        }
    }

    /// Queues one frame of the body (or its end).
    fn take(&mut self, frame: Option<Result<http_body::Frame<Bytes>, hyper::Error>>) {
        match frame {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => self.queue_data(data),
                Err(frame) => {
                    if let (Ok(trailers), Mode::Chunked) = (frame.into_trailers(), self.mode) {
                        self.buf.extend_from_slice(b"0\r\n");
                        push_fields(&mut self.buf, &trailers);
                        self.buf.extend_from_slice(b"\r\n");
                        self.ended = true;
                    }
                }
            },
            None => {
                match self.mode {
                    Mode::Chunked => self.buf.extend_from_slice(b"0\r\n\r\n"),
                    Mode::Length(left) if left > 0 => {
                        tracing::debug!(left, "response body shorter than its content-length");
                        self.failed = true;
                    }
                    _ => {}
                }
                self.ended = true;
            }
            Some(Err(e)) => {
                // The client must see an incomplete message: no last chunk, and close.
                tracing::debug!(error = %e, "upstream response body failed");
                self.failed = true;
                self.ended = true;
            }
        }
    }

    fn queue_data(&mut self, mut data: Bytes) {
        if data.is_empty() {
            return;
        }
        match self.mode {
            Mode::None => return,
            Mode::Length(left) => {
                let n = data.len() as u64;
                if n > left {
                    tracing::debug!(left, n, "response body longer than its content-length");
                    data.truncate(usize::try_from(left).unwrap_or(0));
                    self.failed = true;
                    self.ended = true;
                }
                self.mode = Mode::Length(left.saturating_sub(n));
            }
            Mode::Chunked => {
                push_u64(&mut self.buf, data.len() as u64, 16);
                self.buf.extend_from_slice(b"\r\n");
            }
            Mode::Close => {}
        }
        let chunk_end: &'static [u8] = if self.mode == Mode::Chunked {
            b"\r\n"
        } else {
            b""
        };
        if data.len() <= COPY_MAX {
            self.buf.extend_from_slice(&data);
            self.buf.extend_from_slice(chunk_end);
        } else {
            self.data = data;
            self.after = chunk_end;
        }
    }

    /// Writes `buf`, then `data`, then `after`, with vectored writes.
    fn poll_flush_bufs<IO: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        io: &mut IO,
    ) -> Poll<std::io::Result<()>> {
        loop {
            let head = self.buf.get(self.pos..).unwrap_or_default();
            if head.is_empty() && self.data.is_empty() && self.after.is_empty() {
                self.buf.clear();
                self.pos = 0;
                return Poll::Ready(Ok(()));
            }
            let n = if self.data.is_empty() && self.after.is_empty() {
                ready!(Pin::new(&mut *io).poll_write(cx, head))?
            } else {
                let slices = [
                    IoSlice::new(head),
                    IoSlice::new(&self.data),
                    IoSlice::new(self.after),
                ];
                ready!(Pin::new(&mut *io).poll_write_vectored(cx, &slices))?
            };
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            let mut n = n;
            let from_head = n.min(head.len());
            self.pos += from_head;
            n -= from_head;
            let from_data = n.min(self.data.len());
            self.data.advance(from_data);
            n -= from_data;
            let from_after = n.min(self.after.len());
            self.after = self.after.get(from_after..).unwrap_or_default();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

    use super::*;

    fn req(version: Version) -> ReqInfo {
        ReqInfo {
            head_method: false,
            version,
            keep_alive: true,
        }
    }

    async fn write(res: Response<ResponseBody>, info: ReqInfo, close: bool) -> (String, Written) {
        let mut w = ResponseWriter::new(res, info, close);
        let mut out: Vec<u8> = Vec::new();
        let written = std::future::poll_fn(|cx| w.poll_write(cx, &mut out)).await;
        (String::from_utf8(out).unwrap(), written)
    }

    #[tokio::test]
    async fn full_body_gets_a_length_and_a_date() {
        let res = Response::new(ResponseBody::full(Bytes::from_static(b"hello")));
        let (out, w) = write(res, req(Version::HTTP_11), false).await;
        assert_eq!(w, Written::Done { close: false });
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        assert!(out.contains("content-length: 5\r\n"), "{out}");
        assert!(out.contains("date: "), "{out}");
        assert!(out.ends_with("\r\n\r\nhello"), "{out}");
    }

    #[tokio::test]
    async fn head_and_no_content_have_no_body() {
        let res = Response::new(ResponseBody::full(Bytes::from_static(b"hello")));
        let info = ReqInfo {
            head_method: true,
            ..req(Version::HTTP_11)
        };
        let (out, _) = write(res, info, false).await;
        assert!(out.ends_with("\r\n\r\n"), "{out}");
        let mut res = Response::new(ResponseBody::empty());
        *res.status_mut() = StatusCode::NO_CONTENT;
        let (out, _) = write(res, req(Version::HTTP_11), false).await;
        assert!(!out.contains("content-length"), "{out}");
    }

    #[tokio::test]
    async fn close_and_http10() {
        let mut res = Response::new(ResponseBody::empty());
        res.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        let (out, w) = write(res, req(Version::HTTP_11), false).await;
        assert_eq!(w, Written::Done { close: true });
        assert_eq!(out.matches("connection: close").count(), 1, "{out}");
        let res = Response::new(ResponseBody::empty());
        let (out, w) = write(res, req(Version::HTTP_10), false).await;
        assert_eq!(w, Written::Done { close: false });
        assert!(out.contains("connection: keep-alive\r\n"), "{out}");
        let res = Response::new(ResponseBody::empty());
        let (out, w) = write(res, req(Version::HTTP_11), true).await;
        assert_eq!(w, Written::Done { close: true });
        assert!(out.contains("connection: close\r\n"), "{out}");
    }

    #[test]
    fn numbers() {
        let mut v = Vec::new();
        push_u64(&mut v, 0, 10);
        push_u64(&mut v, 65536, 16);
        push_u64(&mut v, 1234567890, 10);
        assert_eq!(v, b"0100001234567890");
    }
}
