//! Body types of the proxy: the request body streamed upstream and the response body
//! streamed downstream (upstream or local), both counting bytes as frames pass.
//!
//! The response body also carries the request's "finish" work — access log line, connection
//! activity bookkeeping — which runs exactly once, when the body ends or is dropped
//! (client gone), whichever comes first. No boxing: both are concrete types.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::conn::InFlight;
use super::h1::{BodyError, H1Body};
use super::log::LogEntry;
use super::upstream::UpstreamBody;
use crate::lb::LoadGuard;

/// The downstream request body on its way upstream: from our HTTP/1 server or hyper's
/// HTTP/2 server.
#[derive(Debug)]
pub struct RequestBody {
    inner: Inner,
    received: Option<Arc<AtomicU64>>,
}

#[derive(Debug)]
enum Inner {
    Empty,
    H1(H1Body),
    H2(Incoming),
}

/// Why the downstream request body broke off.
#[derive(Debug, thiserror::Error)]
pub enum RequestBodyError {
    #[error(transparent)]
    H1(#[from] BodyError),
    #[error(transparent)]
    H2(#[from] hyper::Error),
}

impl RequestBody {
    pub fn h1(body: H1Body) -> Self {
        Self {
            inner: Inner::H1(body),
            received: None,
        }
    }

    pub fn h2(body: Incoming) -> Self {
        Self {
            inner: Inner::H2(body),
            received: None,
        }
    }

    /// No body (a body-less HTTP/1 request, or an upgrade request's).
    pub fn empty() -> Self {
        Self {
            inner: Inner::Empty,
            received: None,
        }
    }

    /// Counts the bytes that pass into `counter` (for the access log).
    pub fn count_into(&mut self, counter: Option<Arc<AtomicU64>>) {
        self.received = counter;
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = RequestBodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, RequestBodyError>>> {
        let this = &mut *self;
        let res = match &mut this.inner {
            Inner::Empty => return Poll::Ready(None),
            Inner::H1(b) => Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(Into::into))),
            Inner::H2(b) => Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(Into::into))),
        };
        if let (Poll::Ready(Some(Ok(frame))), Some(c)) = (&res, &this.received)
            && let Some(d) = frame.data_ref()
        {
            c.fetch_add(d.len() as u64, Ordering::Relaxed);
        }
        res
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Empty => true,
            Inner::H1(b) => b.is_end_stream(),
            Inner::H2(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Empty => SizeHint::with_exact(0),
            Inner::H1(b) => b.size_hint(),
            Inner::H2(b) => b.size_hint(),
        }
    }
}

#[derive(Debug)]
enum Kind {
    Empty,
    Full(Option<Bytes>),
    Upstream(UpstreamBody),
}

/// Work done once when the response is over.
#[derive(Debug)]
pub struct Finish {
    /// Counts the request as in flight on its HTTP/2 connection until dropped.
    pub in_flight: Option<InFlight>,
    pub log: Option<Box<LogEntry>>,
    /// Keeps the request counted as active on its endpoint (LeastRequest).
    pub load: Option<LoadGuard>,
}

impl Finish {
    fn run(self, bytes_sent: u64) {
        if let Some(mut log) = self.log {
            log.bytes_sent = bytes_sent;
            log.emit();
        }
        drop(self.load);
        drop(self.in_flight);
    }
}

/// The response body sent downstream.
#[derive(Debug)]
pub struct ResponseBody {
    kind: Kind,
    sent: u64,
    finish: Option<Finish>,
}

impl ResponseBody {
    pub fn empty() -> Self {
        Self {
            kind: Kind::Empty,
            sent: 0,
            finish: None,
        }
    }

    pub fn full(bytes: Bytes) -> Self {
        let kind = if bytes.is_empty() {
            Kind::Empty
        } else {
            Kind::Full(Some(bytes))
        };
        Self {
            kind,
            sent: 0,
            finish: None,
        }
    }

    pub fn upstream(inner: UpstreamBody) -> Self {
        Self {
            kind: Kind::Upstream(inner),
            sent: 0,
            finish: None,
        }
    }

    pub fn set_finish(&mut self, finish: Finish) {
        self.finish = Some(finish);
    }

    fn done(&mut self) {
        if let Some(f) = self.finish.take() {
            f.run(self.sent);
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        self.done();
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let res = match &mut this.kind {
            Kind::Empty => Poll::Ready(None),
            Kind::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Kind::Upstream(inner) => Pin::new(inner).poll_frame(cx),
        };
        match &res {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.sent += d.len() as u64;
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => this.done(),
            Poll::Pending => {}
        }
        res
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Empty => true,
            Kind::Full(b) => b.is_none(),
            Kind::Upstream(inner) => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Empty => SizeHint::with_exact(0),
            Kind::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Upstream(inner) => inner.size_hint(),
        }
    }
}
