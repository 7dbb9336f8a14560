//! Shared harness for the end-to-end tests: runs the real `biplane` binary (`echo` and
//! `proxy`) as child processes on `127.0.0.1:0` ports, and small clients (raw HTTP/1.1,
//! TLS, WebSocket, gRPC over h2) to drive them. Children are killed on drop.
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test harness: each test binary uses a subset, and panics are test failures"
)]

use std::io::{BufRead, BufReader, Write as _};
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::{Buf as _, Bytes};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

pub const BIN: &str = env!("CARGO_BIN_EXE_biplane");

/// How long any "wait until" in a test may take before it fails.
pub const DEADLINE: Duration = Duration::from_secs(15);

/// Installs the ring crypto provider for rustls, once per test binary.
pub fn crypto() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// A port that was free a moment ago (Gateway listener ports cannot be 0).
pub fn free_port() -> u16 {
    let l = StdListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Output lines of a child, collected by a reader thread.
#[derive(Clone, Default)]
pub struct Lines(Arc<Mutex<Vec<String>>>, Arc<std::sync::atomic::AtomicBool>);

impl Lines {
    fn spawn_reader(r: impl std::io::Read + Send + 'static) -> Self {
        let lines = Lines::default();
        let out = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(r).lines() {
                let Ok(line) = line else { break };
                out.0.lock().unwrap().push(line);
            }
            out.1.store(true, std::sync::atomic::Ordering::Release);
        });
        lines
    }

    /// Waits (with a deadline) until the stream has ended (the child closed it or exited),
    /// so that every line it wrote is here.
    pub fn wait_eof(&self) {
        let start = Instant::now();
        while !self.1.load(std::sync::atomic::Ordering::Acquire) {
            assert!(
                start.elapsed() < DEADLINE,
                "output never ended:\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn snapshot(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }

    pub fn text(&self) -> String {
        self.snapshot().join("\n")
    }

    /// [`Lines::wait_for`] for async tests that have tasks running on their runtime
    /// (a blocking wait would starve them on a current-thread runtime).
    pub async fn wait_for_async<T>(&self, what: &str, mut f: impl FnMut(&str) -> Option<T>) -> T {
        let start = Instant::now();
        loop {
            if let Some(v) = self.0.lock().unwrap().iter().find_map(|l| f(l)) {
                return v;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "timed out waiting for {what}; output so far:\n{}",
                self.text()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Polls (with a deadline) until a line satisfies `f`; returns `f`'s value.
    pub fn wait_for<T>(&self, what: &str, mut f: impl FnMut(&str) -> Option<T>) -> T {
        let start = Instant::now();
        loop {
            if let Some(v) = self.0.lock().unwrap().iter().find_map(|l| f(l)) {
                return v;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "timed out waiting for {what}; output so far:\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// A child process killed (SIGKILL) when dropped, unless it already exited.
pub struct Proc {
    pub child: Child,
    pub stdout: Lines,
    pub stderr: Lines,
}

impl Proc {
    pub fn spawn(args: &[&str]) -> Proc {
        Self::spawn_env(args, "info")
    }

    /// Spawns with this `BIPLANE_LOG` filter.
    pub fn spawn_env(args: &[&str], log: &str) -> Proc {
        Self::spawn_full(args, log, None)
    }

    /// Spawns in the working directory `cwd` (with `BIPLANE_LOG=info`).
    pub fn spawn_in(args: &[&str], cwd: &std::path::Path) -> Proc {
        Self::spawn_inner(args, "info", None, Some(cwd))
    }

    /// Spawns with this `BIPLANE_LOG` filter, writing `stdin` (then closing it) if given.
    pub fn spawn_full(args: &[&str], log: &str, stdin: Option<&[u8]>) -> Proc {
        Self::spawn_inner(args, log, stdin, None)
    }

    fn spawn_inner(
        args: &[&str],
        log: &str,
        stdin: Option<&[u8]>,
        cwd: Option<&std::path::Path>,
    ) -> Proc {
        let mut command = Command::new(BIN);
        if let Some(cwd) = cwd {
            command.current_dir(cwd);
        }
        let mut child = command
            .args(args)
            .env("BIPLANE_LOG", log)
            // Never pick up the user's CLI config or credentials.
            .env("XDG_CONFIG_HOME", "/nonexistent/biplane-tests")
            .env_remove("BIPLANE_SERVER")
            .env_remove("BIPLANE_TOKEN")
            .env_remove("BIPLANE_CA_FILE")
            .env_remove("BIPLANE_CONFIG")
            .env_remove("BIPLANE_BOOTSTRAP_TOKEN")
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        if let Some(input) = stdin {
            let mut pipe = child.stdin.take().unwrap();
            pipe.write_all(input).unwrap();
        }
        let stdout = Lines::spawn_reader(child.stdout.take().unwrap());
        let stderr = Lines::spawn_reader(child.stderr.take().unwrap());
        Proc {
            child,
            stdout,
            stderr,
        }
    }

    /// Sends a signal (`TERM`, `INT`) with kill(1).
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Waits (with a deadline) for the process to exit.
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                start.elapsed() < within,
                "process did not exit within {within:?}; stderr:\n{}",
                self.stderr.text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A running `biplane echo`.
pub struct Echo {
    pub proc: Proc,
    pub addr: SocketAddr,
    pub name: String,
}

impl Echo {
    pub fn spawn(name: &str) -> Echo {
        let proc = Proc::spawn(&["echo", "--addr", "127.0.0.1:0", "--name", name]);
        let addr = echo_addr(&proc);
        Echo {
            proc,
            addr,
            name: name.to_owned(),
        }
    }

    /// An echo that logs every request it receives to stderr (`echo request` lines), so a
    /// test can tell what reached the upstream: see [`Echo::requests_seen`].
    pub fn spawn_logging(name: &str) -> Echo {
        let proc = Proc::spawn_env(
            &["echo", "--addr", "127.0.0.1:0", "--name", name],
            "info,biplane::echo=debug",
        );
        let addr = echo_addr(&proc);
        Echo {
            proc,
            addr,
            name: name.to_owned(),
        }
    }

    /// The `echo request` log lines so far (only with [`Echo::spawn_logging`]).
    pub fn requests_seen(&self) -> Vec<String> {
        self.proc
            .stderr
            .snapshot()
            .into_iter()
            .filter(|l| l.contains("echo request"))
            .collect()
    }

    /// An echo named after its address (no `--name`).
    pub fn spawn_unnamed() -> Echo {
        let proc = Proc::spawn(&["echo", "--addr", "127.0.0.1:0"]);
        let addr = echo_addr(&proc);
        Echo {
            proc,
            addr,
            name: addr.to_string(),
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}

fn echo_addr(proc: &Proc) -> SocketAddr {
    proc.stdout.wait_for("the echo's `listening on` line", |l| {
        l.strip_prefix("listening on ")
            .map(|a| a.trim().parse::<SocketAddr>().unwrap())
    })
}

/// A running `biplane proxy` with its config in a temp dir.
pub struct Proxy {
    pub proc: Proc,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
}

impl Proxy {
    /// Writes `yaml` to a file, starts the proxy on it and waits for `/ready`.
    pub async fn start(yaml: &str) -> Proxy {
        Self::start_with(yaml, &[]).await
    }

    pub async fn start_with(yaml: &str, extra: &[&str]) -> Proxy {
        match Self::try_start(yaml, extra).await {
            Ok(p) => p,
            Err(stderr) => panic!("proxy exited early; stderr:\n{stderr}"),
        }
    }

    /// Picks `n` free ports, renders the config with them and starts the proxy; if a port
    /// was taken in between (another test bound it), tries again with new ports.
    pub async fn start_on_ports(n: usize, render: impl Fn(&[u16]) -> String) -> (Proxy, Vec<u16>) {
        let mut last = String::new();
        for _ in 0..3 {
            let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
            match Self::try_start(&render(&ports), &[]).await {
                Ok(p) => return (p, ports),
                Err(stderr) if stderr.to_lowercase().contains("in use") => last = stderr,
                Err(stderr) => panic!("proxy exited early; stderr:\n{stderr}"),
            }
        }
        panic!("could not bind free ports three times; last stderr:\n{last}");
    }

    /// Starts the proxy; `Err(stderr)` if it exits before announcing its admin address.
    pub async fn try_start(yaml: &str, extra: &[&str]) -> Result<Proxy, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = write_config(&dir, yaml);
        let mut args = vec![
            "proxy",
            "--config",
            path.to_str().unwrap(),
            "--admin-addr",
            "127.0.0.1:0",
            "--bind-ip",
            "127.0.0.1",
        ];
        args.extend_from_slice(extra);
        let mut proc = Proc::spawn(&args);
        let start = Instant::now();
        let admin = loop {
            let found = proc
                .stderr
                .snapshot()
                .iter()
                .find_map(|l| parse_after(l, "admin listening on "));
            if let Some(a) = found {
                break a;
            }
            if proc.child.try_wait().unwrap().is_some() {
                proc.stderr.wait_eof();
                return Err(proc.stderr.text());
            }
            assert!(
                start.elapsed() < DEADLINE,
                "no admin address; stderr:\n{}",
                proc.stderr.text()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let p = Proxy { proc, admin, dir };
        p.wait_ready().await;
        Ok(p)
    }

    async fn wait_ready(&self) {
        let client = client();
        let url = format!("http://{}/ready", self.admin);
        let start = Instant::now();
        loop {
            if let Ok(r) = client.get(&url).send().await
                && r.status().is_success()
            {
                return;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "proxy never ready; stderr:\n{}",
                self.proc.stderr.text()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The address a listener reported on stderr (`listener NAME listening on ADDR`).
    pub fn listener_addr(&self, name: &str) -> SocketAddr {
        let prefix = format!("listener {name} listening on ");
        self.proc
            .stderr
            .wait_for(&prefix, |l| parse_after(l, &prefix))
    }

    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        let r = client()
            .get(format!("http://{}{path}", self.admin))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }
}

fn parse_after(line: &str, prefix: &str) -> Option<SocketAddr> {
    let rest = &line[line.find(prefix)? + prefix.len()..];
    rest.split_whitespace()
        .next()?
        .trim_matches(|c| c == '"' || c == ',')
        .parse()
        .ok()
}

pub fn write_config(dir: &tempfile::TempDir, yaml: &str) -> PathBuf {
    let path = dir.path().join("biplane.yaml");
    std::fs::File::create(&path)
        .unwrap()
        .write_all(yaml.as_bytes())
        .unwrap();
    path
}

/// Runs `biplane proxy` on a config expected to be rejected; returns (exit status, stderr).
pub fn proxy_rejects(yaml: &str) -> (ExitStatus, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(&dir, yaml);
    let mut proc = Proc::spawn(&[
        "proxy",
        "--config",
        path.to_str().unwrap(),
        "--admin-addr",
        "127.0.0.1:0",
        "--bind-ip",
        "127.0.0.1",
    ]);
    let status = proc.wait_exit(DEADLINE);
    proc.stderr.wait_eof();
    (status, proc.stderr.text())
}

// ---------------------------------------------------------------------------------------
// Resource YAML helpers
// ---------------------------------------------------------------------------------------

/// A `Backend` with these endpoints (`(addr, weight)`).
pub fn backend(name: &str, endpoints: &[(SocketAddr, u32)]) -> String {
    let mut s = format!(
        "---\napiVersion: biplane.dev/v1alpha1\nkind: Backend\nmetadata:\n  name: {name}\nspec:\n  endpoints:\n"
    );
    for (a, w) in endpoints {
        s.push_str(&format!(
            "  - address: \"{}\"\n    port: {}\n    weight: {w}\n",
            a.ip(),
            a.port()
        ));
    }
    s
}

/// A `Backend` for a gRPC (h2c) upstream.
pub fn backend_h2c(name: &str, addr: SocketAddr) -> String {
    format!(
        "---\napiVersion: biplane.dev/v1alpha1\nkind: Backend\nmetadata:\n  name: {name}\nspec:\n  appProtocol: h2c\n  endpoints:\n  - address: \"{}\"\n    port: {}\n",
        addr.ip(),
        addr.port()
    )
}

/// A Gateway `gw` with one plain HTTP listener named `http` on `port`.
pub fn http_gateway(port: u16) -> String {
    format!(
        "---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata:\n  name: gw\nspec:\n  gatewayClassName: biplane\n  listeners:\n  - name: http\n    port: {port}\n    protocol: HTTP\n"
    )
}

/// A `kubernetes.io/tls` Secret for a certificate.
pub fn tls_secret(name: &str, cert_pem: &str, key_pem: &str) -> String {
    let b = base64::engine::general_purpose::STANDARD;
    format!(
        "---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}\ntype: kubernetes.io/tls\ndata:\n  tls.crt: {}\n  tls.key: {}\n",
        b.encode(cert_pem),
        b.encode(key_pem)
    )
}

/// A self-signed certificate for these names.
pub struct TestCert {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: rustls_pki_types::CertificateDer<'static>,
}

pub fn cert(names: &[&str]) -> TestCert {
    let ck =
        rcgen::generate_simple_self_signed(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
    TestCert {
        cert_pem: ck.cert.pem(),
        key_pem: ck.signing_key.serialize_pem(),
        der: ck.cert.der().clone(),
    }
}

// ---------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------

/// A client that sends requests for `hosts` to `addr` (the proxy's listener), so the
/// `Host` header is the real name with the port, as a user's would be.
pub fn resolving_client(addr: SocketAddr, hosts: &[&str]) -> reqwest::Client {
    crypto();
    let mut b = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(DEADLINE);
    for h in hosts {
        b = b.resolve(h, addr);
    }
    b.build().unwrap()
}

/// A plain HTTP/1.1 reqwest client (no proxy from the environment, no redirects followed).
pub fn client() -> reqwest::Client {
    crypto();
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(DEADLINE)
        .build()
        .unwrap()
}

/// A client that speaks h2c with prior knowledge.
pub fn h2c_client() -> reqwest::Client {
    crypto();
    reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .timeout(DEADLINE)
        .build()
        .unwrap()
}

/// A rustls client config trusting `roots`, offering `alpn`.
pub fn tls_client_config(roots: &[&TestCert], alpn: &[&[u8]]) -> rustls::ClientConfig {
    crypto();
    let mut store = rustls::RootCertStore::empty();
    for c in roots {
        store.add(c.der.clone()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder()
        .with_root_certificates(store)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    cfg
}

/// A TLS connection to `addr` with SNI `sni`.
pub async fn tls_connect(
    addr: SocketAddr,
    sni: &str,
    cfg: rustls::ClientConfig,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let name = rustls_pki_types::ServerName::try_from(sni.to_owned()).unwrap();
    connector.connect(name, tcp).await.unwrap()
}

/// A raw HTTP/1.x response as read off the wire.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    }
}

/// Writes `request` verbatim and reads one response (Content-Length or until close).
pub async fn raw_exchange<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    request: &[u8],
) -> RawResponse {
    io.write_all(request).await.unwrap();
    io.flush().await.unwrap();
    read_response(io).await
}

/// Reads one response: headers, then Content-Length bytes (or to EOF without one).
pub async fn read_response<S: AsyncRead + Unpin>(io: &mut S) -> RawResponse {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = tokio::time::timeout(DEADLINE, io.read(&mut chunk))
            .await
            .unwrap()
            .unwrap();
        assert!(
            n > 0,
            "connection closed before a full response head: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut body = buf[head_end..].to_vec();
    let resp = RawResponse {
        status,
        head,
        body: Vec::new(),
    };
    match resp
        .header("content-length")
        .map(|v| v.parse::<usize>().unwrap())
    {
        Some(len) => {
            while body.len() < len {
                let n = tokio::time::timeout(DEADLINE, io.read(&mut chunk))
                    .await
                    .unwrap()
                    .unwrap();
                assert!(n > 0, "connection closed mid-body");
                body.extend_from_slice(&chunk[..n]);
            }
            body.truncate(len);
        }
        None if status == 101 || status == 204 || status == 304 => {}
        None => {
            // Read until close (bounded by the deadline).
            loop {
                match tokio::time::timeout(DEADLINE, io.read(&mut chunk))
                    .await
                    .unwrap()
                {
                    Ok(0) | Err(_) => break,
                    Ok(n) => body.extend_from_slice(&chunk[..n]),
                }
            }
        }
    }
    RawResponse { body, ..resp }
}

/// Does the upgrade handshake on `io`; panics unless it gets a correct 101.
pub async fn ws_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    host: &str,
    path: &str,
) -> RawResponse {
    let key = "dGhlIHNhbXBsZSBub25jZQ==";
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    let resp = raw_exchange(io, req.as_bytes()).await;
    assert_eq!(resp.status, 101, "websocket upgrade refused: {}", resp.head);
    assert_eq!(
        resp.header("sec-websocket-accept").as_deref(),
        Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
    );
    resp
}

/// Sends one masked client frame.
pub async fn ws_send<S: AsyncWrite + Unpin>(io: &mut S, opcode: u8, payload: &[u8]) {
    let mask = [0x12u8, 0x34, 0x56, 0x78];
    let mut f = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n <= 65535 => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    io.write_all(&f).await.unwrap();
    io.flush().await.unwrap();
}

/// Reads one server frame: (opcode, payload). Server frames must not be masked.
pub async fn ws_recv<S: AsyncRead + Unpin>(io: &mut S) -> (u8, Vec<u8>) {
    let mut h = [0u8; 2];
    tokio::time::timeout(DEADLINE, io.read_exact(&mut h))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(h[1] & 0x80, 0, "server frame is masked");
    let len = match h[1] & 0x7f {
        126 => {
            let mut b = [0u8; 2];
            io.read_exact(&mut b).await.unwrap();
            u16::from_be_bytes(b) as usize
        }
        127 => {
            let mut b = [0u8; 8];
            io.read_exact(&mut b).await.unwrap();
            u64::from_be_bytes(b) as usize
        }
        n => n as usize,
    };
    let mut p = vec![0u8; len];
    io.read_exact(&mut p).await.unwrap();
    (h[0] & 0x0f, p)
}

/// The result of one unary gRPC call made with raw framing.
#[derive(Debug)]
pub struct GrpcReply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub messages: Vec<Bytes>,
    pub trailers: Option<http::HeaderMap>,
}

/// Sends one gRPC message (`payload`, length-prefixed) over h2 (on `io`, already
/// connected, TLS or not) and collects the reply and its trailers.
pub async fn grpc_call<S>(
    io: S,
    authority: &str,
    path: &str,
    payload: &[u8],
    extra: &[(&str, &str)],
) -> GrpcReply
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut h2, conn) = h2::client::handshake(io).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = http::Request::builder()
        .method("POST")
        .uri(format!("http://{authority}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    let (resp, mut send) = h2.send_request(req.body(()).unwrap(), false).unwrap();
    let mut framed = Vec::with_capacity(payload.len() + 5);
    framed.push(0);
    framed.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    framed.extend_from_slice(payload);
    send.send_data(Bytes::from(framed), true).unwrap();
    let resp = tokio::time::timeout(DEADLINE, resp).await.unwrap().unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let mut body = resp.into_body();
    let mut data = Vec::new();
    while let Some(chunk) = tokio::time::timeout(DEADLINE, body.data()).await.unwrap() {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
        data.extend_from_slice(&chunk);
    }
    let trailers = tokio::time::timeout(DEADLINE, body.trailers())
        .await
        .unwrap()
        .unwrap();
    let mut messages = Vec::new();
    let mut buf = Bytes::from(data);
    while buf.len() >= 5 {
        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
        buf.advance(5);
        messages.push(buf.split_to(len.min(buf.len())));
    }
    GrpcReply {
        status,
        headers,
        messages,
        trailers,
    }
}

/// Parses a JSON body from the echo.
pub fn json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(body)))
}

/// An address where nothing listens and nothing else can start listening while the
/// returned socket lives: the port is bound but not listening, so connects are refused.
/// (A released `free_port()` could be taken again by a parallel test.)
pub fn refused_addr() -> (tokio::net::TcpSocket, SocketAddr) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(([127, 0, 0, 1], 0).into()).unwrap();
    let addr = socket.local_addr().unwrap();
    (socket, addr)
}

// ------------------------------------------------------------------ load through a proxy

/// Which echo answered `GET path` (with this client: keep-alive or not).
pub async fn who(c: &reqwest::Client, port: u16, path: &str) -> Result<String, String> {
    let r = c
        .get(format!("http://127.0.0.1:{port}{path}"))
        .send()
        .await
        .map_err(|e| format!("{e:?}"))?;
    let status = r.status();
    let name = r
        .headers()
        .get("x-echo-name")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = r.bytes().await.map_err(|e| format!("body: {e:?}"))?;
    match name {
        Some(name) if status.is_success() => Ok(name),
        _ => Err(format!(
            "status {status}: {}",
            String::from_utf8_lossy(&body)
        )),
    }
}

/// Polls `GET path` until `n` answers in a row come from `name`; returns how long it took.
pub async fn follows(port: u16, path: &str, name: &str, n: usize, log: &Proc) -> Duration {
    let c = client();
    let start = Instant::now();
    let mut streak = 0;
    loop {
        let got = who(&c, port, path).await;
        if got.as_deref() == Ok(name) {
            streak += 1;
            if streak == n {
                return start.elapsed();
            }
            continue;
        }
        streak = 0;
        assert!(
            start.elapsed() < DEADLINE,
            "{path} never went to {name} (last: {got:?}); proxy stderr:\n{}",
            log.stderr.text()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Concurrent clients: 4 on keep-alive connections, 2 opening a connection per request,
/// each cycling over `paths` and counting answers that are not a 2xx from an echo.
pub struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    pub fn start(port: u16, paths: &'static [&'static str]) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for i in 0..6 {
            let keep_alive = i < 4;
            let c = {
                crypto();
                let b = reqwest::Client::builder()
                    .no_proxy()
                    .timeout(Duration::from_secs(10));
                if keep_alive {
                    b.build().unwrap()
                } else {
                    b.pool_max_idle_per_host(0).build().unwrap()
                }
            };
            let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
            tasks.push(tokio::spawn(async move {
                let mut n = i;
                while !stop.load(Ordering::Relaxed) {
                    let path = paths[n % paths.len()];
                    n += 1;
                    match who(&c, port, path).await {
                        Ok(_) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => failures.lock().unwrap().push(format!(
                            "{} {path}: {e}",
                            if keep_alive { "keep-alive" } else { "new-conn" }
                        )),
                    }
                    // Pacing, so six clients leave CPU to the planes on two cores (and the
                    // new-connection clients do not exhaust ephemeral ports).
                    let pause = if keep_alive { 2 } else { 5 };
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                }
            }));
        }
        Load {
            stop,
            ok,
            failures,
            tasks,
        }
    }

    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Waits until `n` more requests have succeeded.
    pub async fn wait_more(&self, n: u64, log: &Proc) {
        let target = self.ok() + n;
        let start = Instant::now();
        while self.ok() < target {
            assert!(
                start.elapsed() < DEADLINE,
                "the load stalled at {} requests; failures: {:?}; proxy stderr:\n{}",
                self.ok(),
                self.failures.lock().unwrap(),
                log.stderr.text()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops the clients; returns (succeeded, failures).
    pub async fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        let failures = self.failures.lock().unwrap().clone();
        (self.ok.load(Ordering::Relaxed), failures)
    }
}

/// Runs `biplane ARGS` (with `BIPLANE_LOG=log`) to completion off the async threads:
/// (exit code, stdout, stderr).
pub async fn run_biplane(log: &'static str, args: Vec<String>) -> (i32, String, String) {
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut p = Proc::spawn_full(&args, log, None);
        let status = p.wait_exit(DEADLINE);
        p.stdout.wait_eof();
        p.stderr.wait_eof();
        (
            status.code().unwrap_or(-1),
            p.stdout.text(),
            p.stderr.text(),
        )
    })
    .await
    .unwrap()
}

/// The address after `prefix` in a log line (`api listening on 127.0.0.1:7070`).
pub fn after(line: &str, prefix: &str) -> Option<SocketAddr> {
    let rest = &line[line.find(prefix)? + prefix.len()..];
    rest.split_whitespace()
        .next()?
        .trim_matches(|c| c == '"' || c == ',')
        .parse()
        .ok()
}

/// Whether the proxy whose admin listener is `admin` answers `/ready` with a 2xx.
pub async fn admin_ready(admin: SocketAddr) -> bool {
    client()
        .get(format!("http://{admin}/ready"))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
}

/// Polls `/ready` until it answers 2xx; fails with the proxy's stderr after `DEADLINE`.
pub async fn wait_admin_ready(admin: SocketAddr, proc: &Proc) {
    let start = Instant::now();
    while !admin_ready(admin).await {
        assert!(
            start.elapsed() < DEADLINE,
            "proxy never ready; stderr:\n{}",
            proc.stderr.text()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
