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
use super::log::LogEntry;
use super::upstream::UpstreamBody;
use crate::lb::LoadGuard;

/// The downstream request body on its way upstream.
#[derive(Debug)]
pub struct RequestBody {
    inner: Option<Incoming>,
    received: Option<Arc<AtomicU64>>,
}

impl RequestBody {
    pub fn new(inner: Incoming, received: Option<Arc<AtomicU64>>) -> Self {
        Self {
            inner: Some(inner),
            received,
        }
    }

    /// No body (e.g. after an upgrade request whose body hyper keeps for the tunnel).
    pub fn empty() -> Self {
        Self {
            inner: None,
            received: None,
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let res = Pin::new(inner).poll_frame(cx);
        if let (Poll::Ready(Some(Ok(frame))), Some(c)) = (&res, &this.received)
            && let Some(d) = frame.data_ref()
        {
            c.fetch_add(d.len() as u64, Ordering::Relaxed);
        }
        res
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
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
    /// Counts the request as in flight on its connection until dropped.
    pub in_flight: InFlight,
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
