//! HTTP/1 request bodies: the decoder (Content-Length or chunked, with trailers) that runs
//! on the connection's read buffer, and the one-frame hand-off between the connection task,
//! which owns the socket, and whoever polls the body (the upstream client, in the same task
//! for HTTP/1.1 upstreams or in hyper's body task for HTTP/2 ones).
//!
//! The body only asks ("want"); the connection reads from the socket only when asked, so a
//! slow upstream slows the client down through TCP, and nothing is buffered beyond one
//! frame. A body-less request has no hand-off at all.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http_body::{Frame, SizeHint};

use super::head::MAX_HEADERS;

/// Why a request body could not be read to its end.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BodyError {
    #[error("request body: {0}")]
    Malformed(&'static str),
    #[error("request body: connection closed before the end of the body")]
    Incomplete,
    #[error("request body: {0}")]
    Io(String),
}

/// Longest chunk-size line (size and extensions) we accept.
const MAX_CHUNK_LINE: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Content-Length: bytes left.
    Length(u64),
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk: bytes left.
    Data(u64),
    /// After a chunk's data: its CRLF.
    DataEnd,
    /// After the last chunk: trailer fields up to an empty line.
    Trailers,
    Done,
}

/// One step of decoding.
#[derive(Debug)]
pub enum Decoded {
    Data(Bytes),
    /// The body is over (with trailer fields, if any were sent).
    End(Option<HeaderMap>),
    /// The buffer holds no further complete piece: read more.
    NeedMore,
}

/// Decodes one request body from the connection's read buffer, leaving what follows it.
#[derive(Debug)]
pub struct Decoder {
    state: State,
    max_trailers: usize,
}

impl Decoder {
    pub fn length(n: u64) -> Self {
        Self {
            state: if n == 0 {
                State::Done
            } else {
                State::Length(n)
            },
            max_trailers: 0,
        }
    }

    pub fn chunked(max_trailers: usize) -> Self {
        Self {
            state: State::Size,
            max_trailers,
        }
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Bytes still expected, when known (Content-Length).
    pub fn remaining(&self) -> Option<u64> {
        match self.state {
            State::Length(n) => Some(n),
            State::Done => Some(0),
            _ => None,
        }
    }

    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, BodyError> {
        loop {
            match self.state {
                State::Done => return Ok(Decoded::End(None)),
                State::Length(n) | State::Data(n) => {
                    if buf.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    let take = usize::try_from(n).unwrap_or(usize::MAX).min(buf.len());
                    let left = n - take as u64;
                    self.state = match (self.state, left) {
                        (State::Length(_), 0) => State::Done,
                        (State::Length(_), l) => State::Length(l),
                        (_, 0) => State::DataEnd,
                        (_, l) => State::Data(l),
                    };
                    return Ok(Decoded::Data(buf.split_to(take).freeze()));
                }
                State::Size => {
                    let Some(nl) = buf.iter().take(MAX_CHUNK_LINE).position(|&b| b == b'\n') else {
                        if buf.len() >= MAX_CHUNK_LINE {
                            return Err(BodyError::Malformed("chunk-size line too long"));
                        }
                        return Ok(Decoded::NeedMore);
                    };
                    let size = chunk_size(buf.get(..nl).unwrap_or_default())?;
                    buf.advance(nl + 1);
                    self.state = if size == 0 {
                        State::Trailers
                    } else {
                        State::Data(size)
                    };
                }
                State::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(Decoded::NeedMore);
                    }
                    if buf.get(..2) != Some(b"\r\n") {
                        return Err(BodyError::Malformed("chunk data not followed by CRLF"));
                    }
                    buf.advance(2);
                    self.state = State::Size;
                }
                State::Trailers => {
                    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
                    let parsed = httparse::parse_headers(buf, &mut slots)
                        .map_err(|_| BodyError::Malformed("malformed trailer fields"))?;
                    let httparse::Status::Complete((len, fields)) = parsed else {
                        if buf.len() > self.max_trailers {
                            return Err(BodyError::Malformed("trailer fields too large"));
                        }
                        return Ok(Decoded::NeedMore);
                    };
                    let trailers = if fields.is_empty() {
                        None
                    } else {
                        let mut map = HeaderMap::with_capacity(fields.len());
                        for f in fields.iter() {
                            let name = HeaderName::from_bytes(f.name.as_bytes())
                                .map_err(|_| BodyError::Malformed("malformed trailer name"))?;
                            let value = HeaderValue::from_bytes(f.value)
                                .map_err(|_| BodyError::Malformed("malformed trailer value"))?;
                            map.append(name, value);
                        }
                        Some(map)
                    };
                    buf.advance(len);
                    self.state = State::Done;
                    return Ok(Decoded::End(trailers));
                }
            }
        }
    }
}

/// The size on a chunk-size line (without its `\n`): hex digits, optional extensions after
/// `;` (ignored), and a `\r` at the end.
fn chunk_size(line: &[u8]) -> Result<u64, BodyError> {
    let line = line
        .strip_suffix(b"\r")
        .ok_or(BodyError::Malformed("chunk-size line without CRLF"))?;
    let digits = line
        .iter()
        .position(|b| !b.is_ascii_hexdigit())
        .unwrap_or(line.len());
    if digits == 0 || digits > 16 {
        return Err(BodyError::Malformed("malformed chunk size"));
    }
    // Whitespace only before extensions (`5 ;ext`), never bare after the size.
    let rest = line.get(digits..).unwrap_or_default();
    if !rest.is_empty() && rest.trim_ascii_start().first() != Some(&b';') {
        return Err(BodyError::Malformed("malformed chunk size"));
    }
    let mut n: u64 = 0;
    for &b in line.get(..digits).unwrap_or_default() {
        let d = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            _ => b - b'A' + 10,
        };
        n = (n << 4) | u64::from(d);
    }
    Ok(n)
}

/// The hand-off slot between the connection (producer) and the body (consumer).
#[derive(Debug, Default)]
struct Slot {
    frame: Option<Result<Frame<Bytes>, BodyError>>,
    /// The body asked for a frame.
    want: bool,
    /// The producer has put its last frame (or an error) in the slot.
    ended: bool,
    /// The body was dropped: nobody will read on.
    gone: bool,
    body_waker: Option<Waker>,
    conn_waker: Option<Waker>,
}

#[derive(Debug, Default)]
struct Pipe(Mutex<Slot>);

impl Pipe {
    fn lock(&self) -> MutexGuard<'_, Slot> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn store_waker(slot: &mut Option<Waker>, cx: &Context<'_>) {
    match slot {
        Some(w) if w.will_wake(cx.waker()) => {}
        _ => *slot = Some(cx.waker().clone()),
    }
}

/// Wakes `w` unless it is the waker of the task running now (a self-wake would only
/// schedule a spurious poll: the caller goes on to do the work itself).
fn wake_other(w: Option<Waker>, cx: &Context<'_>) {
    if let Some(w) = w
        && !w.will_wake(cx.waker())
    {
        w.wake();
    }
}

/// The consumer end: an HTTP/1 request body.
#[derive(Debug)]
pub struct H1Body {
    pipe: Arc<Pipe>,
    /// Content-Length, until the first frame is taken.
    hint: Option<u64>,
}

impl H1Body {
    pub fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let mut s = self.pipe.lock();
        if let Some(f) = s.frame.take() {
            drop(s);
            self.hint = None;
            return Poll::Ready(Some(f));
        }
        if s.ended {
            return Poll::Ready(None);
        }
        s.want = true;
        store_waker(&mut s.body_waker, cx);
        let conn = s.conn_waker.take();
        drop(s);
        wake_other(conn, cx);
        Poll::Pending
    }

    pub fn is_end_stream(&self) -> bool {
        let s = self.pipe.lock();
        s.ended && s.frame.is_none()
    }

    pub fn size_hint(&self) -> SizeHint {
        self.hint
            .map_or_else(SizeHint::default, SizeHint::with_exact)
    }
}

impl Drop for H1Body {
    fn drop(&mut self) {
        let mut s = self.pipe.lock();
        s.gone = true;
        let conn = s.conn_waker.take();
        drop(s);
        if let Some(w) = conn {
            w.wake();
        }
    }
}

/// How feeding a body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fed {
    /// The whole body was read off the connection.
    Complete,
    /// The body was dropped before its end: the rest is still on the connection.
    Abandoned,
    /// The body broke the chunked coding: the client gets a 400, and the connection
    /// cannot carry another request.
    Malformed,
    /// The body could not be read (connection closed, I/O error).
    Failed,
}

const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// The producer end, driven by the connection task.
#[derive(Debug)]
pub struct Feeder {
    pipe: Arc<Pipe>,
    pub decoder: Decoder,
    /// Bytes of `100 Continue` still to write before the first read (`None`: not asked).
    continue_left: Option<usize>,
    done: Option<Fed>,
    /// A frame was handed over since the last [`Feeder::take_delivered`]: a consumer in
    /// this task was not woken (see `wake_other`) and must be polled again.
    delivered: bool,
}

/// A request body and its producer.
pub fn channel(decoder: Decoder, expect_continue: bool) -> (H1Body, Feeder) {
    let pipe = Arc::new(Pipe::default());
    let body = H1Body {
        pipe: pipe.clone(),
        hint: decoder.remaining(),
    };
    let feeder = Feeder {
        pipe,
        decoder,
        continue_left: expect_continue.then_some(CONTINUE.len()),
        done: None,
        delivered: false,
    };
    (body, feeder)
}

/// Read buffer growth for body reads.
const BODY_READ: usize = 16 * 1024;

impl Feeder {
    /// How feeding ended, once it has.
    pub fn outcome(&self) -> Option<Fed> {
        self.done
    }

    /// The client asked for `100 Continue` and has not been sent it (so it may never
    /// send the body).
    pub fn continue_pending(&self) -> bool {
        self.continue_left.is_some()
    }

    /// Whether a frame was handed over since the last call.
    pub fn take_delivered(&mut self) -> bool {
        std::mem::take(&mut self.delivered)
    }

    /// Serves the body's demand from `buf` and `io`. Ready once feeding is over; Pending
    /// while the body has not asked or the socket has nothing.
    pub fn poll_feed<IO>(
        &mut self,
        cx: &mut Context<'_>,
        io: &mut IO,
        buf: &mut BytesMut,
    ) -> Poll<Fed>
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        if let Some(done) = self.done {
            return Poll::Ready(done);
        }
        loop {
            {
                let mut s = self.pipe.lock();
                if s.gone {
                    let fed = if self.decoder.is_done() {
                        Fed::Complete
                    } else {
                        Fed::Abandoned
                    };
                    self.done = Some(fed);
                    return Poll::Ready(fed);
                }
                if !s.want || s.frame.is_some() {
                    store_waker(&mut s.conn_waker, cx);
                    return Poll::Pending;
                }
            }
            // Asked for the first time: the client waits for our go-ahead.
            while let Some(left) = self.continue_left.filter(|&l| l > 0) {
                let from = CONTINUE.len() - left;
                match Pin::new(&mut *io).poll_write(cx, CONTINUE.get(from..).unwrap_or_default()) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(n)) if n > 0 => self.continue_left = Some(left - n),
                    Poll::Ready(Ok(_)) => {
                        return Poll::Ready(self.fail(cx, BodyError::Incomplete));
                    }
                    Poll::Ready(Err(e)) => {
                        return Poll::Ready(self.fail(cx, BodyError::Io(e.to_string())));
                    }
                }
            }
            if self.continue_left == Some(0) {
                if let Poll::Ready(Err(e)) = Pin::new(&mut *io).poll_flush(cx) {
                    return Poll::Ready(self.fail(cx, BodyError::Io(e.to_string())));
                }
                self.continue_left = None;
            }
            let frame = match self.decoder.decode(buf) {
                Err(e) => return Poll::Ready(self.fail(cx, e)),
                Ok(Decoded::Data(d)) => Frame::data(d),
                Ok(Decoded::End(Some(t))) => Frame::trailers(t),
                Ok(Decoded::End(None)) => {
                    self.put(cx, None, true);
                    self.done = Some(Fed::Complete);
                    return Poll::Ready(Fed::Complete);
                }
                Ok(Decoded::NeedMore) => {
                    if buf.capacity() - buf.len() < 1024 {
                        buf.reserve(BODY_READ);
                    }
                    match tokio_util::io::poll_read_buf(Pin::new(&mut *io), cx, buf) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Ok(0)) => {
                            return Poll::Ready(self.fail(cx, BodyError::Incomplete));
                        }
                        Poll::Ready(Ok(_)) => continue,
                        Poll::Ready(Err(e)) => {
                            return Poll::Ready(self.fail(cx, BodyError::Io(e.to_string())));
                        }
                    }
                }
            };
            let end = self.decoder.is_done();
            self.put(cx, Some(Ok(frame)), end);
            if end {
                self.done = Some(Fed::Complete);
                return Poll::Ready(Fed::Complete);
            }
        }
    }

    fn put(&mut self, cx: &Context<'_>, frame: Option<Result<Frame<Bytes>, BodyError>>, end: bool) {
        self.delivered = true;
        let mut s = self.pipe.lock();
        s.frame = frame;
        s.want = false;
        s.ended = end;
        let body = s.body_waker.take();
        drop(s);
        wake_other(body, cx);
    }

    fn fail(&mut self, cx: &Context<'_>, e: BodyError) -> Fed {
        tracing::debug!(error = %e, "downstream request body failed");
        let fed = if matches!(e, BodyError::Malformed(_)) {
            Fed::Malformed
        } else {
            Fed::Failed
        };
        self.put(cx, Some(Err(e)), true);
        self.done = Some(fed);
        fed
    }

    /// Marks the body as ended without reading on (the connection is going away): a body
    /// still being polled gets an error instead of waiting forever.
    pub fn abort(&mut self) {
        if self.done.is_none() {
            let mut s = self.pipe.lock();
            s.frame = Some(Err(BodyError::Incomplete));
            s.ended = true;
            let body = s.body_waker.take();
            drop(s);
            if let Some(w) = body {
                w.wake();
            }
            self.done = Some(Fed::Failed);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

    use super::*;

    /// The body, its trailers and what followed it.
    type Run = Result<(Vec<u8>, Option<HeaderMap>, Vec<u8>), BodyError>;

    fn run(mut d: Decoder, input: &[u8]) -> Run {
        // Fed one byte at a time: every split point is exercised.
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut input = input.iter();
        loop {
            match d.decode(&mut buf)? {
                Decoded::Data(b) => out.extend_from_slice(&b),
                Decoded::End(t) => {
                    let rest: Vec<u8> = buf.iter().copied().chain(input.copied()).collect();
                    return Ok((out, t, rest));
                }
                Decoded::NeedMore => match input.next() {
                    Some(&b) => buf.extend_from_slice(&[b]),
                    None => return Err(BodyError::Incomplete),
                },
            }
        }
    }

    #[test]
    fn length_body_leaves_the_next_request() {
        let (body, t, rest) = run(Decoder::length(5), b"helloGET /").unwrap();
        assert_eq!(body, b"hello");
        assert!(t.is_none());
        assert_eq!(rest, b"GET /");
        assert!(matches!(
            run(Decoder::length(5), b"hel"),
            Err(BodyError::Incomplete)
        ));
    }

    #[test]
    fn chunked_with_extensions_and_trailers() {
        let raw =
            b"5;ext=1\r\nhello\r\nA ;x\r\n0123456789\r\n0\r\nGrpc-Status: 0\r\nx-t: v\r\n\r\nNEXT";
        let (body, t, rest) = run(Decoder::chunked(8192), raw).unwrap();
        assert_eq!(body, b"hello0123456789");
        let t = t.unwrap();
        assert_eq!(t["grpc-status"], "0");
        assert_eq!(t["x-t"], "v");
        assert_eq!(rest, b"NEXT");
        let (body, t, rest) = run(Decoder::chunked(8192), b"3\r\nabc\r\n0\r\n\r\n").unwrap();
        assert_eq!(body, b"abc");
        assert!(t.is_none());
        assert!(rest.is_empty());
    }

    #[test]
    fn chunked_malformed() {
        let bad: &[&[u8]] = &[
            b"x\r\n",
            b"5\nhello\r\n0\r\n\r\n",
            b"3\r\nabcX\r\n",
            b"11111111111111111\r\n",
            b"3 x\r\nabc\r\n",
            b"-3\r\nabc\r\n",
            b"3 \r\nabc\r\n0\r\n\r\n",
        ];
        for raw in bad {
            assert!(
                matches!(
                    run(Decoder::chunked(8192), raw),
                    Err(BodyError::Malformed(_))
                ),
                "{}",
                String::from_utf8_lossy(raw)
            );
        }
        let long = format!("1;{}\r\n", "e".repeat(MAX_CHUNK_LINE));
        assert!(matches!(
            run(Decoder::chunked(8192), long.as_bytes()),
            Err(BodyError::Malformed(_))
        ));
        let big_trailer = format!("0\r\nx: {}\r\n\r\n", "v".repeat(200));
        assert!(matches!(
            run(Decoder::chunked(100), big_trailer.as_bytes()),
            Err(BodyError::Malformed(_))
        ));
    }
}
