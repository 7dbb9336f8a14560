//! `biplane echo`: a small, fast upstream for tests, demos and benchmarks.
//!
//! It answers HTTP/1.1 and h2c (prior knowledge) on one port and, per request:
//! - by default, a JSON description of the request (`name`, `method`, `path`, `query`,
//!   `headers`, `protocol`, `body_bytes`) with `content-type: application/json`;
//! - `?status=N` answers with that status; `?delay_ms=N` sleeps first;
//! - `?body_bytes=N` answers with N bytes of payload instead of JSON (large bodies, benches);
//! - `?echo_body=1` streams the request body back as it arrives;
//! - `Upgrade: websocket` is accepted (101) and every data frame is echoed back;
//! - `content-type: application/grpc` gets the request messages echoed back as the
//!   response messages, with trailers `grpc-status: 0` (or the value of the request header
//!   `x-echo-grpc-status`).
//!
//! Every response carries `x-echo-name: NAME` so a test can see which endpoint answered.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde::ser::{Serialize, SerializeMap, Serializer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Arguments of `biplane echo`.
#[derive(Debug, clap::Args)]
pub struct EchoArgs {
    /// Address to listen on (`127.0.0.1:0` picks a free port; the first stdout line says
    /// which: `listening on ADDR`).
    #[arg(long, default_value = "127.0.0.1:9001")]
    pub addr: SocketAddr,
    /// Name sent in `x-echo-name` and in the JSON body (default: the bound address).
    #[arg(long)]
    pub name: Option<String>,
}

/// Binds, prints `listening on ADDR` (flushed) and serves until the process is stopped.
pub async fn run(args: EchoArgs) -> anyhow::Result<()> {
    let server = start(args.addr, args.name).await?;
    {
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on {}", server.addr())?;
        out.flush()?;
    }
    server.serve_forever().await;
    Ok(())
}

/// An echo server running on the caller's runtime (`biplane echo`, and the built-in
/// upstreams of `biplane up`).
pub struct EchoServer {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl EchoServer {
    /// The bound address (the real port when `127.0.0.1:0` was asked for).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until the task ends (it does not, short of a panic).
    async fn serve_forever(self) {
        let EchoServer { stop, task, .. } = self;
        let _ = task.await;
        drop(stop);
    }

    /// Stops accepting; connections in progress finish their current exchange on their
    /// own tasks (they end with the runtime).
    pub async fn shutdown(self) {
        self.stop.send_replace(true);
        let _ = self.task.await;
    }
}

/// Binds `addr` and serves the echo on it in a background task; `name` defaults to the
/// bound address.
pub async fn start(addr: SocketAddr, name: Option<String>) -> anyhow::Result<EchoServer> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let local = listener.local_addr()?;
    let name = name.unwrap_or_else(|| local.to_string());
    let state = Arc::new(State {
        header: HeaderValue::from_str(&name).context("--name is not a valid header value")?,
        name,
    });
    let (stop, stop_rx) = watch::channel(false);
    let task = tokio::spawn(accept_loop(listener, state, stop_rx));
    Ok(EchoServer {
        addr: local,
        stop,
        task,
    })
}

async fn accept_loop(listener: TcpListener, state: Arc<State>, mut stop: watch::Receiver<bool>) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().keep_alive(true);
    let builder = Arc::new(builder);
    loop {
        let accepted = tokio::select! {
            conn = listener.accept() => conn,
            _ = stop.wait_for(|s| *s) => return,
        };
        let (stream, _peer) = match accepted {
            Ok(conn) => conn,
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| handle(state.clone(), req));
            if let Err(e) = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                .await
            {
                tracing::debug!(error = %e, "echo connection ended with an error");
            }
        });
    }
}

struct State {
    name: String,
    header: HeaderValue,
}

static X_ECHO_NAME: HeaderName = HeaderName::from_static("x-echo-name");

/// What the query string asks for.
#[derive(Default)]
struct Controls {
    status: Option<StatusCode>,
    delay: Option<Duration>,
    body_bytes: Option<u64>,
    echo_body: bool,
}

fn controls(query: &str) -> Controls {
    let mut c = Controls::default();
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "status" => {
                c.status = v
                    .parse::<u16>()
                    .ok()
                    .and_then(|s| StatusCode::from_u16(s).ok())
            }
            "delay_ms" => c.delay = v.parse().ok().map(Duration::from_millis),
            "body_bytes" => c.body_bytes = v.parse().ok(),
            "echo_body" => c.echo_body = v == "1" || v == "true",
            _ => {}
        }
    }
    c
}

async fn handle(
    state: Arc<State>,
    mut req: Request<Incoming>,
) -> Result<Response<EchoBody>, Infallible> {
    // Off unless `BIPLANE_LOG` enables `biplane::echo=debug` (tests use it to see what
    // reached the upstream); a disabled callsite costs one relaxed load.
    tracing::debug!(method = %req.method(), uri = %req.uri(), "echo request");
    let mut resp = if is_websocket(&req) {
        websocket(&mut req)
    } else if is_grpc(&req) {
        grpc(req).await
    } else {
        http(&state, req).await
    };
    resp.headers_mut()
        .insert(X_ECHO_NAME.clone(), state.header.clone());
    Ok(resp)
}

async fn http(state: &State, req: Request<Incoming>) -> Response<EchoBody> {
    let c = controls(req.uri().query().unwrap_or(""));
    if let Some(delay) = c.delay {
        tokio::time::sleep(delay).await;
    }
    let status = c.status.unwrap_or(StatusCode::OK);
    if c.echo_body {
        let mut resp = Response::new(EchoBody::Stream(req.into_body()));
        *resp.status_mut() = status;
        return resp;
    }
    if let Some(n) = c.body_bytes {
        // Drain the request body so the connection stays reusable.
        let _ = count_body(req.into_body()).await;
        let mut resp = Response::new(EchoBody::Repeat(n));
        *resp.status_mut() = status;
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        return resp;
    }
    let (parts, body) = req.into_parts();
    let body_bytes = count_body(body).await;
    let desc = Description {
        name: &state.name,
        method: parts.method.as_str(),
        path: parts.uri.path(),
        query: parts.uri.query().unwrap_or(""),
        headers: Headers(&parts.headers),
        protocol: version_str(parts.version),
        body_bytes,
    };
    let json = match serde_json::to_vec(&desc) {
        Ok(v) => v,
        Err(e) => format!("{{\"error\":\"{e}\"}}").into_bytes(),
    };
    let mut resp = Response::new(EchoBody::Full(Some(Bytes::from(json))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// Reads a body to its end, counting bytes; a broken body counts what arrived.
async fn count_body(mut body: Incoming) -> u64 {
    let mut n = 0u64;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Some(d) = f.data_ref() {
                    n += d.len() as u64;
                }
            }
            Err(_) => break,
        }
    }
    n
}

fn version_str(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "unknown",
    }
}

#[derive(serde::Serialize)]
struct Description<'a> {
    name: &'a str,
    method: &'a str,
    path: &'a str,
    query: &'a str,
    headers: Headers<'a>,
    protocol: &'static str,
    body_bytes: u64,
}

/// Serializes a header map as a JSON object; repeated headers are joined with `, `.
struct Headers<'a>(&'a HeaderMap);

impl Serialize for Headers<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.keys_len()))?;
        for name in self.0.keys() {
            let mut values = self.0.get_all(name).iter();
            let first = values.next().map(|v| String::from_utf8_lossy(v.as_bytes()));
            let Some(first) = first else { continue };
            let mut rest = values.peekable();
            if rest.peek().is_none() {
                map.serialize_entry(name.as_str(), &first)?;
            } else {
                let mut joined = first.into_owned();
                for v in rest {
                    joined.push_str(", ");
                    joined.push_str(&String::from_utf8_lossy(v.as_bytes()));
                }
                map.serialize_entry(name.as_str(), &joined)?;
            }
        }
        map.end()
    }
}

// ---------------------------------------------------------------------------------------
// gRPC: echo the request's length-prefixed messages back, then trailers.
// ---------------------------------------------------------------------------------------

fn is_grpc(req: &Request<Incoming>) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

async fn grpc(req: Request<Incoming>) -> Response<EchoBody> {
    let status = req
        .headers()
        .get("x-echo-grpc-status")
        .cloned()
        .unwrap_or(HeaderValue::from_static("0"));
    // The request's DATA is already gRPC-framed (5-byte prefix + message): sending it back
    // as-is echoes every message.
    let data = match req.into_body().collect().await {
        Ok(c) => c.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", status);
    let mut resp = Response::new(EchoBody::Grpc(Some(data), Some(trailers)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    resp
}

// ---------------------------------------------------------------------------------------
// WebSocket: answer the handshake, then echo data frames (unmasked, as a server must).
// ---------------------------------------------------------------------------------------

const WS_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

fn is_websocket(req: &Request<Incoming>) -> bool {
    req.headers()
        .get(header::UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"))
}

/// `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key` (RFC 6455 §4.2.2).
pub fn websocket_accept(key: &[u8]) -> String {
    let mut sha = sha1_smol::Sha1::new();
    sha.update(key);
    sha.update(WS_GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(sha.digest().bytes())
}

fn websocket(req: &mut Request<Incoming>) -> Response<EchoBody> {
    let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY) else {
        let mut resp = Response::new(EchoBody::Full(Some(Bytes::from_static(
            b"missing sec-websocket-key\n",
        ))));
        *resp.status_mut() = StatusCode::BAD_REQUEST;
        return resp;
    };
    let accept = websocket_accept(key.as_bytes());
    let on_upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                if let Err(e) = ws_echo(TokioIo::new(upgraded)).await {
                    tracing::debug!(error = %e, "websocket echo ended");
                }
            }
            Err(e) => tracing::debug!(error = %e, "websocket upgrade failed"),
        }
    });
    let mut resp = Response::new(EchoBody::Full(None));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    resp
}

/// Reads client frames, unmasks them and writes them back unmasked. Ping gets a pong;
/// close is echoed and ends the loop.
async fn ws_echo<S>(mut io: S) -> std::io::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut out = BytesMut::new();
    loop {
        let mut head = [0u8; 2];
        if let Err(e) = io.read_exact(&mut head).await {
            return if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Ok(())
            } else {
                Err(e)
            };
        }
        let fin_and_opcode = head[0];
        let opcode = head[0] & 0x0f;
        let masked = head[1] & 0x80 != 0;
        let len = match head[1] & 0x7f {
            126 => {
                let mut b = [0u8; 2];
                io.read_exact(&mut b).await?;
                u64::from(u16::from_be_bytes(b))
            }
            127 => {
                let mut b = [0u8; 8];
                io.read_exact(&mut b).await?;
                u64::from_be_bytes(b)
            }
            n => u64::from(n),
        };
        if len > 16 << 20 {
            return Err(std::io::Error::other("websocket frame too large"));
        }
        let mut mask = [0u8; 4];
        if masked {
            io.read_exact(&mut mask).await?;
        }
        let mut payload = vec![0u8; len as usize];
        io.read_exact(&mut payload).await?;
        if masked {
            for (i, b) in payload.iter_mut().enumerate() {
                *b ^= mask[i % 4];
            }
        }
        let reply_head = match opcode {
            0x9 => 0x80 | 0xA, // ping → pong
            0xA => continue,   // unsolicited pong: ignore
            _ => fin_and_opcode,
        };
        out.clear();
        out.extend_from_slice(&[reply_head]);
        match payload.len() {
            n if n < 126 => out.extend_from_slice(&[n as u8]),
            n if n <= usize::from(u16::MAX) => {
                out.extend_from_slice(&[126]);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.extend_from_slice(&[127]);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&payload);
        io.write_all(&out).await?;
        io.flush().await?;
        if opcode == 0x8 {
            return io.shutdown().await;
        }
    }
}

// ---------------------------------------------------------------------------------------
// The response body: one enum, no boxing.
// ---------------------------------------------------------------------------------------

/// 16 KiB of payload, sliced for `?body_bytes=N` without allocating.
static PAYLOAD: [u8; 16 * 1024] = [b'x'; 16 * 1024];

pub enum EchoBody {
    Full(Option<Bytes>),
    /// This many bytes of `PAYLOAD`, in chunks.
    Repeat(u64),
    /// The request body, streamed back.
    Stream(Incoming),
    /// gRPC: the messages, then the trailers.
    Grpc(Option<Bytes>, Option<HeaderMap>),
}

impl Body for EchoBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            EchoBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            EchoBody::Repeat(left) => {
                if *left == 0 {
                    return Poll::Ready(None);
                }
                let n = (*left).min(PAYLOAD.len() as u64) as usize;
                *left -= n as u64;
                Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(&PAYLOAD[..n])))))
            }
            EchoBody::Stream(inner) => Pin::new(inner).poll_frame(cx),
            EchoBody::Grpc(data, trailers) => {
                if let Some(d) = data.take().filter(|d| !d.is_empty()) {
                    return Poll::Ready(Some(Ok(Frame::data(d))));
                }
                Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(t))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            EchoBody::Full(b) => b.is_none(),
            EchoBody::Repeat(left) => *left == 0,
            EchoBody::Stream(inner) => inner.is_end_stream(),
            EchoBody::Grpc(d, t) => d.is_none() && t.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            EchoBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            EchoBody::Repeat(left) => SizeHint::with_exact(*left),
            EchoBody::Stream(inner) => inner.size_hint(),
            EchoBody::Grpc(..) => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn websocket_accept_matches_rfc_example() {
        // RFC 6455 §1.3.
        assert_eq!(
            websocket_accept(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn query_controls_parse() {
        let c = controls("status=503&delay_ms=100&body_bytes=42&echo_body=1&other");
        assert_eq!(c.status, Some(StatusCode::SERVICE_UNAVAILABLE));
        assert_eq!(c.delay, Some(Duration::from_millis(100)));
        assert_eq!(c.body_bytes, Some(42));
        assert!(c.echo_body);
        let c = controls("");
        assert!(c.status.is_none() && c.delay.is_none() && c.body_bytes.is_none() && !c.echo_body);
    }
}
