//! The control plane under test: a `biplane control` child process (so its RSS and CPU
//! time are its own), an in-process `biplane_control::run`, or an external one given by
//! address, either insecure (plaintext xDS and admin API) or secure by default (mTLS xDS,
//! HTTPS admin API with the initial admin token); plus the admin-API calls and the
//! `/proc` readings the bench needs.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::process::{Child, Command};

/// How the control plane is run.
pub enum Target {
    /// A `biplane control` child process.
    Child(PathBuf),
    /// `biplane_control::run` inside the bench (its RSS includes the simulated clients).
    InProcess,
    /// Already running: admin API and xDS addresses, and optionally its pid.
    External {
        api: SocketAddr,
        xds: SocketAddr,
        pid: Option<u32>,
        /// The CA certificate (PEM) and an admin token, for a secure control plane.
        trust: Option<Trust>,
    },
}

/// How the control plane is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Security {
    /// `--insecure`: plaintext xDS serving any node, plaintext admin API without tokens.
    Plain,
    /// The default: mTLS on xDS (nodes enroll with a bootstrap token), HTTPS admin API
    /// with bearer tokens.
    Mtls,
}

impl Security {
    pub fn as_str(self) -> &'static str {
        match self {
            Security::Plain => "plain",
            Security::Mtls => "mtls",
        }
    }
}

/// What a client of a secure control plane needs.
#[derive(Debug, Clone)]
pub struct Trust {
    /// The CA certificate (PEM): verifies the admin API and xDS server certificates.
    pub ca_pem: String,
    /// An admin API bearer token (mints the bootstrap token).
    pub admin_token: String,
}

impl Trust {
    /// Reads `<data-dir>/ca/ca.crt` and `<data-dir>/admin-token`, as written by a control
    /// plane on first start.
    pub fn from_data_dir(dir: &Path) -> anyhow::Result<Trust> {
        Trust::from_files(
            &dir.join(biplane_control::ca::CA_DIR)
                .join(biplane_control::ca::CA_CERT_FILE),
            &dir.join(biplane_control::tokens::ADMIN_TOKEN_FILE),
        )
    }

    pub fn from_files(ca: &Path, token: &Path) -> anyhow::Result<Trust> {
        let ca_pem = std::fs::read_to_string(ca)
            .with_context(|| format!("reading the CA certificate {}", ca.display()))?;
        let admin_token = std::fs::read_to_string(token)
            .with_context(|| format!("reading the admin token {}", token.display()))?
            .trim()
            .to_owned();
        if admin_token.is_empty() {
            bail!("{} is empty", token.display());
        }
        Ok(Trust {
            ca_pem,
            admin_token,
        })
    }
}

/// A running control plane; stopped on drop.
pub struct Control {
    pub api: SocketAddr,
    pub xds: SocketAddr,
    /// The process to read RSS and CPU time from (`None`: unknown).
    pub pid: Option<u32>,
    /// `Some` for a secure control plane (mTLS xDS, HTTPS admin API).
    pub trust: Option<Trust>,
    child: Option<Child>,
    in_process: Option<biplane_control::ControlHandle>,
    _dir: Option<tempfile::TempDir>,
}

impl Control {
    /// Starts (or, for [`Target::External`], describes) a control plane. A child's stderr
    /// is appended to `log` when given.
    pub async fn start(
        target: &Target,
        debounce: Option<&str>,
        security: Security,
        log: Option<&Path>,
    ) -> anyhow::Result<Control> {
        match target {
            Target::External {
                api,
                xds,
                pid,
                trust,
            } => {
                let trust = match (security, trust) {
                    (Security::Plain, _) => None,
                    (Security::Mtls, Some(t)) => Some(t.clone()),
                    (Security::Mtls, None) => bail!(
                        "an mTLS run against --control needs --control-ca and --control-token-file"
                    ),
                };
                Ok(Control {
                    api: *api,
                    xds: *xds,
                    pid: *pid,
                    trust,
                    child: None,
                    in_process: None,
                    _dir: None,
                })
            }
            Target::Child(bin) => spawn_child(bin, debounce, security, log).await,
            Target::InProcess => {
                let dir = tempfile::tempdir().context("temporary data directory")?;
                let mut options = biplane_control::ControlOptions {
                    api_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
                    xds_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
                    data_dir: dir.path().to_path_buf(),
                    bind_ip: [127, 0, 0, 1].into(),
                    ..biplane_control::ControlOptions::default()
                };
                if security == Security::Plain {
                    options = options.insecure();
                }
                if let Some(d) = debounce {
                    options.debounce = parse_ms(d)?;
                }
                let handle = biplane_control::run(options)
                    .await
                    .context("cannot start the in-process control plane")?;
                let trust = match security {
                    Security::Plain => None,
                    Security::Mtls => Some(Trust::from_data_dir(dir.path())?),
                };
                Ok(Control {
                    api: handle.api_addr(),
                    xds: handle.xds_addr(),
                    pid: Some(std::process::id()),
                    trust,
                    child: None,
                    in_process: Some(handle),
                    _dir: Some(dir),
                })
            }
        }
    }

    /// Stops what this bench started.
    pub async fn stop(mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
        if let Some(handle) = self.in_process.take() {
            handle.shutdown().await;
        }
    }
}

/// `100ms` / `1s` / a bare number of milliseconds.
fn parse_ms(s: &str) -> anyhow::Result<Duration> {
    let (n, mult) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1000)
    } else {
        (s, 1)
    };
    let n: u64 = n
        .trim()
        .parse()
        .with_context(|| format!("bad duration {s:?}"))?;
    Ok(Duration::from_millis(n * mult))
}

async fn spawn_child(
    bin: &Path,
    debounce: Option<&str>,
    security: Security,
    log: Option<&Path>,
) -> anyhow::Result<Control> {
    let mut log = match log {
        Some(path) => Some(
            tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .await
                .with_context(|| format!("opening {}", path.display()))?,
        ),
        None => None,
    };
    let dir = tempfile::tempdir().context("temporary data directory")?;
    let mut cmd = Command::new(bin);
    cmd.arg("control");
    if security == Security::Plain {
        cmd.arg("--insecure");
    }
    cmd.args(["--api-addr", "127.0.0.1:0", "--xds-addr", "127.0.0.1:0"])
        .args(["--proxy-bind-ip", "127.0.0.1", "--data-dir"])
        .arg(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(d) = debounce {
        cmd.args(["--debounce", d]);
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot run {}", bin.display()))?;
    let pid = child.id();
    let stderr = child.stderr.take().context("no stderr pipe")?;
    let mut lines = BufReader::new(stderr).lines();
    let (mut api, mut xds) = (None, None);
    let found = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await? {
            if let Some(f) = &mut log {
                f.write_all(format!("{line}\n").as_bytes()).await?;
            }
            if let Some(a) = line.strip_prefix("api listening on ") {
                api = Some(a.trim().parse::<SocketAddr>()?);
            } else if let Some(a) = line.strip_prefix("xds listening on ") {
                xds = Some(a.trim().parse::<SocketAddr>()?);
            }
            if api.is_some() && xds.is_some() {
                return Ok(());
            }
        }
        bail!("{} exited before printing its addresses", bin.display())
    })
    .await;
    match found {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e),
        Err(_) => bail!("{} did not print its addresses within 30 s", bin.display()),
    }
    // Keep draining its log so the pipe never fills and blocks it.
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(f) = &mut log
                && f.write_all(format!("{line}\n").as_bytes()).await.is_err()
            {
                log = None;
            }
        }
    });
    let (Some(api), Some(xds)) = (api, xds) else {
        bail!("addresses not found");
    };
    // Both files are written before the listeners are bound, so before the lines above.
    let trust = match security {
        Security::Plain => None,
        Security::Mtls => Some(Trust::from_data_dir(dir.path())?),
    };
    Ok(Control {
        api,
        xds,
        pid,
        trust,
        child: Some(child),
        in_process: None,
        _dir: Some(dir),
    })
}

/// A minimal admin-API client: plaintext, or HTTPS verified with the CA and a bearer
/// token.
pub struct Api {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Api {
    pub fn new(addr: SocketAddr, trust: Option<&Trust>) -> anyhow::Result<Api> {
        let Some(trust) = trust else {
            return Ok(Api {
                http: reqwest::Client::builder().build()?,
                base: format!("http://{addr}"),
                token: None,
            });
        };
        let ca = reqwest::Certificate::from_pem_bundle(trust.ca_pem.as_bytes())
            .context("the control plane's CA certificate")?;
        Ok(Api {
            http: reqwest::Client::builder().tls_certs_only(ca).build()?,
            base: format!("https://{addr}"),
            token: Some(trust.admin_token.clone()),
        })
    }

    fn post(&self, path: &str) -> reqwest::RequestBuilder {
        let req = self.http.post(format!("{}{path}", self.base));
        match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    /// `POST /api/v1/tokens`: a bootstrap token for `gateway` with `uses` enrollments
    /// (the bearer secret, without the CA pin: the bench verifies with the CA file).
    pub async fn bootstrap_token(&self, gateway: &str, uses: usize) -> anyhow::Result<String> {
        let body = serde_json::json!({
            "kind": "bootstrap",
            "gateway": gateway,
            "uses": uses,
            "ttl": "1h",
        });
        let resp = self
            .post("/api/v1/tokens")
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .context("minting a bootstrap token")?;
        let status = resp.status();
        let body = resp.text().await.context("token body")?;
        if status != reqwest::StatusCode::OK {
            bail!("POST /api/v1/tokens answered {status}: {body}");
        }
        let v: serde_json::Value = serde_json::from_str(&body).context("token body")?;
        v["token"]
            .as_str()
            .map(str::to_owned)
            .context("no token in the answer")
    }

    /// `POST /api/v1/apply`; returns the store revision once the 200 body is read.
    pub async fn apply(&self, yaml: &str) -> anyhow::Result<u64> {
        let resp = self
            .post("/api/v1/apply")
            .header("content-type", "application/yaml")
            .body(yaml.to_owned())
            .send()
            .await
            .context("apply")?;
        let status = resp.status();
        let body = resp.text().await.context("apply body")?;
        if status != reqwest::StatusCode::OK {
            bail!("apply answered {status}: {body}");
        }
        let v: serde_json::Value = serde_json::from_str(&body).context("apply body")?;
        v["revision"]
            .as_u64()
            .with_context(|| format!("no revision in {body}"))
    }
}

/// `VmRSS` of a process, in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// User + system CPU time of a process (all its threads), in clock ticks.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Clock ticks per second (`getconf CLK_TCK`, 100 when unavailable).
pub fn ticks_per_second() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}
