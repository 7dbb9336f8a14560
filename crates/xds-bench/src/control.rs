//! The control plane under test: a `biplane control` child process (so its RSS and CPU
//! time are its own), an in-process `biplane_control::run`, or an external one given by
//! address; plus the admin-API calls and the `/proc` readings the bench needs.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::io::{AsyncBufReadExt as _, BufReader};
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
    },
}

/// A running control plane; stopped on drop.
pub struct Control {
    pub api: SocketAddr,
    pub xds: SocketAddr,
    /// The process to read RSS and CPU time from (`None`: unknown).
    pub pid: Option<u32>,
    child: Option<Child>,
    in_process: Option<biplane_control::ControlHandle>,
    _dir: Option<tempfile::TempDir>,
}

impl Control {
    pub async fn start(target: &Target, debounce: Option<&str>) -> anyhow::Result<Control> {
        match target {
            Target::External { api, xds, pid } => Ok(Control {
                api: *api,
                xds: *xds,
                pid: *pid,
                child: None,
                in_process: None,
                _dir: None,
            }),
            Target::Child(bin) => spawn_child(bin, debounce).await,
            Target::InProcess => {
                let dir = tempfile::tempdir().context("temporary data directory")?;
                let mut options = biplane_control::ControlOptions {
                    api_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
                    xds_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
                    data_dir: dir.path().to_path_buf(),
                    bind_ip: [127, 0, 0, 1].into(),
                    ..biplane_control::ControlOptions::default()
                }
                // The simulated nodes speak plaintext xDS.
                .insecure();
                if let Some(d) = debounce {
                    options.debounce = parse_ms(d)?;
                }
                let handle = biplane_control::run(options)
                    .await
                    .context("cannot start the in-process control plane")?;
                Ok(Control {
                    api: handle.api_addr(),
                    xds: handle.xds_addr(),
                    pid: Some(std::process::id()),
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

async fn spawn_child(bin: &Path, debounce: Option<&str>) -> anyhow::Result<Control> {
    let dir = tempfile::tempdir().context("temporary data directory")?;
    let mut cmd = Command::new(bin);
    cmd.args([
        "control",
        "--insecure",
        "--api-addr",
        "127.0.0.1:0",
        "--xds-addr",
        "127.0.0.1:0",
    ])
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
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let (Some(api), Some(xds)) = (api, xds) else {
        bail!("addresses not found");
    };
    Ok(Control {
        api,
        xds,
        pid,
        child: Some(child),
        in_process: None,
        _dir: Some(dir),
    })
}

/// A minimal admin-API client.
pub struct Api {
    http: reqwest::Client,
    base: String,
}

impl Api {
    pub fn new(addr: SocketAddr) -> anyhow::Result<Api> {
        Ok(Api {
            http: reqwest::Client::builder().build()?,
            base: format!("http://{addr}"),
        })
    }

    /// `POST /api/v1/apply`; returns the store revision once the 200 body is read.
    pub async fn apply(&self, yaml: &str) -> anyhow::Result<u64> {
        let resp = self
            .http
            .post(format!("{}/api/v1/apply", self.base))
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
