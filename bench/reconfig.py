"""Reconfiguration under load: HTTP load through a `biplane proxy` node while the control
plane applies changes (backendRef weights, route rules and whole routes, Backend
endpoints, Gateway listeners). Reports the failed requests (the target is 0), the
latency impact against a baseline phase with no changes, and how long each change took
to apply and to reach the proxy. Run it through bench/reconfig.sh, which builds Biplane
first. Standard library only.

Topology (2 cores): the proxy is pinned to BENCH_PROXY_CORE (0) and alone there; wrk, the
connection-per-request client, this driver, the control plane and the three echo
upstreams share BENCH_LOAD_CORE (1).

Each repetition starts fresh processes, then runs two phases of BENCH_DURATION seconds
each (their order alternates between repetitions):
  baseline  wrk (keep-alive) + the connection-per-request client, no changes
  reconfig  the same load while BENCH_CHANGES changes are applied, evenly spread

Environment (all optional):
  BENCH_RUNS=3            repetitions; medians are reported       (--smoke: 1)
  BENCH_DURATION=20       seconds per phase                        (--smoke: 3)
  BENCH_CHANGES=100       changes in the reconfig phase            (--smoke: 10)
  BENCH_WARMUP=1          seconds of load before the first phase   (--smoke: 0.5)
  BENCH_CONNECTIONS=32    wrk keep-alive connections ...
  BENCH_WRK_THREADS=2     ... and threads
  BENCH_CLOSE_CLIENTS=2   connection-per-request client threads ...
  BENCH_CLOSE_RPS=200     ... and their combined request rate (requests/s)
  BENCH_KINDS=weights,route,endpoints,listener   the change kinds, applied in rotation
  BENCH_POLL=1            0: do not poll the proxy's /config_dump after each change (no
                          propagation times; isolates the cost of that polling)
  BENCH_OUT=bench/results where reconfig.{json,md} go (--smoke: $TMPDIR/biplane-bench-smoke)
  BIPLANE_BIN=...         the biplane binary (reconfig.sh builds and sets it)

Exit status 1 when any request failed, or a change was refused or never took effect:
loud on purpose.
`python3 bench/reconfig.py --render bench/results/reconfig.json` rewrites the Markdown.
"""

from __future__ import annotations

import bisect
import http.client
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lib  # noqa: E402
from proxy import core_busy  # noqa: E402

HERE = Path(__file__).resolve().parent

KINDS = ["weights", "route", "endpoints", "listener"]
WEIGHTS = [(90, 10), (50, 50), (10, 90), (100, 0), (0, 100), (1, 1)]
# Paths the load generators request: the weighted catch-all and the fixed /api rule.
LOAD_PATHS = ["/", "/api/x"]


def env_num(name: str, default: float) -> float:
    v = os.environ.get(name)
    return float(v) if v else default


def percentile(vals: list[float], q: float) -> float | None:
    """Nearest-rank percentile of unsorted values."""
    if not vals:
        return None
    s = sorted(vals)
    k = max(0, min(len(s) - 1, int(round(q / 100.0 * len(s) + 0.5)) - 1))
    return s[k]


def median(vals: list) -> float | None:
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


# ---------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------


def port_of(addr: str) -> int:
    return int(addr.rsplit(":", 1)[1])


@dataclass
class Planes:
    echoes: dict[str, int]  # name -> port
    control: lib.Proc
    api: str  # host:port
    xds: str
    proxy: lib.Proc
    admin: int
    port: int  # the Gateway listener the load uses
    port2: int  # the listener that comes and goes
    procs: list[lib.Proc] = field(default_factory=list)

    def stop(self) -> None:
        # The proxy first, so that the control plane going away is not in its log.
        for p in reversed(self.procs):
            p.stop()


def start_planes(workdir: Path, biplane: str) -> Planes:
    procs: list[lib.Proc] = []
    try:
        echoes = {}
        for name in ("A", "B", "C", "D"):
            p = lib.Proc(f"echo-{name}", [biplane, "echo", "--addr", "127.0.0.1:0", "--name", name], lib.LOAD_CORE, workdir,
                         env={"TOKIO_WORKER_THREADS": "1", "BIPLANE_LOG": "warn"})
            procs.append(p)
            echoes[name] = port_of(lib.wait_log(p, r"listening on (\S+)"))
        control = lib.Proc(
            "control",
            [biplane, "control", "--insecure", "--api-addr", "127.0.0.1:0", "--xds-addr", "127.0.0.1:0",
             "--data-dir", str(workdir / "data"), "--proxy-bind-ip", "127.0.0.1"],
            lib.LOAD_CORE, workdir, env={"BIPLANE_LOG": "warn"},
        )
        procs.append(control)
        api = lib.wait_log(control, r"api listening on (\S+)")
        xds = lib.wait_log(control, r"xds listening on (\S+)")
        admin = lib.free_port()
        proxy = lib.Proc(
            "proxy",
            [biplane, "proxy", "--insecure", "--control-plane", xds, "--gateway", "gw", "--node-id", "bench",
             "--state-dir", str(workdir / "state"), "--admin-addr", f"127.0.0.1:{admin}", "--no-access-log"],
            lib.PROXY_CORE, workdir,
            # One worker thread, as in bench/proxy.py; BIPLANE_LOG=warn keeps every warning
            # and error of the reconfiguration in proxy.log.
            env={"TOKIO_WORKER_THREADS": "1", "BIPLANE_LOG": "warn"},
        )
        procs.append(proxy)
        planes = Planes(echoes, control, api, xds, proxy, admin, lib.free_port(), lib.free_port(), procs)
        lib.wait_port(admin, proxy)
        return planes
    except BaseException:
        for p in reversed(procs):
            p.stop()
        raise


# ---------------------------------------------------------------------------------------
# Resources and changes
# ---------------------------------------------------------------------------------------


@dataclass
class State:
    """What is configured; `docs` renders it as API documents (JSON objects)."""

    weights: tuple[int, int] = (90, 10)
    a: tuple[str, ...] = ("A",)
    b: tuple[str, ...] = ("B",)
    extra_rule: str | None = None  # path prefix of an extra rule in route `web`
    extra_route: str | None = None  # path prefix of route `extra`, when it exists
    listener2: bool = False


def ref(name: str, weight: int | None = None) -> dict:
    r = {"group": "biplane.dev", "kind": "Backend", "name": name}
    if weight is not None:
        r["weight"] = weight
    return r


def gateway_doc(st: State, pl: Planes) -> dict:
    listeners = [{"name": "http", "port": pl.port, "protocol": "HTTP"}]
    if st.listener2:
        listeners.append({"name": "http-2", "port": pl.port2, "protocol": "HTTP"})
    return {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway", "metadata": {"name": "gw"},
            "spec": {"gatewayClassName": "biplane", "listeners": listeners}}


def backend_doc(name: str, members: tuple[str, ...], pl: Planes) -> dict:
    return {"apiVersion": "biplane.dev/v1alpha1", "kind": "Backend", "metadata": {"name": name},
            "spec": {"endpoints": [{"address": "127.0.0.1", "port": pl.echoes[m]} for m in members]}}


def web_doc(st: State) -> dict:
    rules = [{"matches": [{"path": {"type": "PathPrefix", "value": "/api"}}], "backendRefs": [ref("a")]}]
    if st.extra_rule:
        rules.append({"matches": [{"path": {"type": "PathPrefix", "value": st.extra_rule}}], "backendRefs": [ref("d")]})
    rules.append({"backendRefs": [ref("a", st.weights[0]), ref("b", st.weights[1])]})
    return {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute", "metadata": {"name": "web"},
            "spec": {"parentRefs": [{"name": "gw"}], "rules": rules}}


def extra_doc(prefix: str) -> dict:
    return {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute", "metadata": {"name": "extra"},
            "spec": {"parentRefs": [{"name": "gw"}],
                     "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": prefix}}], "backendRefs": [ref("d")]}]}}


def all_docs(st: State, pl: Planes) -> list[dict]:
    docs = [gateway_doc(st, pl), backend_doc("a", st.a, pl), backend_doc("b", st.b, pl), backend_doc("d", ("D",), pl),
            web_doc(st)]
    if st.extra_route:
        docs.append(extra_doc(st.extra_route))
    return docs


@dataclass
class Change:
    kind: str
    what: str
    method: str  # POST (apply) or DELETE
    path: str
    body: list[dict] | None


def next_change(st: State, kind: str, step: int, pl: Planes) -> Change:
    """Mutates `st` into the next state of this kind and returns the one API call doing it.

    The load's paths (`/`, `/api/x`) keep answering through every state: Backend `a` always
    holds echo A and `b` echo B; extra rules and routes use paths the load never requests.
    """
    apply = "/api/v1/apply"
    if kind == "weights":
        st.weights = WEIGHTS[(WEIGHTS.index(st.weights) + 1) % len(WEIGHTS)]
        return Change(kind, f"web catch-all weights a={st.weights[0]} b={st.weights[1]}", "POST", apply, [web_doc(st)])
    if kind == "route":
        k = step % 4
        if k == 0:
            st.extra_rule = f"/extra-rule-{step}"
            return Change(kind, f"web: add rule {st.extra_rule}", "POST", apply, [web_doc(st)])
        if k == 1:
            gone, st.extra_rule = st.extra_rule, None
            return Change(kind, f"web: remove rule {gone}", "POST", apply, [web_doc(st)])
        if k == 2:
            st.extra_route = f"/extra-route-{step}"
            return Change(kind, f"create HTTPRoute extra ({st.extra_route})", "POST", apply, [extra_doc(st.extra_route)])
        st.extra_route = None
        return Change(kind, "delete HTTPRoute extra", "DELETE", "/api/v1/httproutes/default/extra", None)
    if kind == "endpoints":
        k = step % 4
        if k == 0:
            st.a = ("A", "C")
        elif k == 1:
            st.a = ("A",)
        elif k == 2:
            st.b = ("B", "C")
        else:
            st.b = ("B",)
        name, members = ("a", st.a) if k < 2 else ("b", st.b)
        return Change(kind, f"Backend {name} endpoints {'+'.join(members)}", "POST", apply, [backend_doc(name, members, pl)])
    if kind == "listener":
        st.listener2 = not st.listener2
        return Change(kind, f"Gateway: {'add' if st.listener2 else 'remove'} listener http-2 :{pl.port2}", "POST", apply,
                      [gateway_doc(st, pl)])
    raise ValueError(kind)


def api_call(api: str, method: str, path: str, body: list[dict] | None) -> tuple[int, dict]:
    host, port = api.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        conn.request(method, path, body=data, headers=headers)
        r = conn.getresponse()
        raw = r.read()
        try:
            return r.status, json.loads(raw)
        except ValueError:
            return r.status, {"raw": raw[:500].decode(errors="replace")}
    finally:
        conn.close()


def admin_get(port: int, path: str) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        body = r.read()
        if r.status != 200:
            raise RuntimeError(f"GET {path} on the proxy admin: {r.status}")
        return body
    finally:
        conn.close()


def proxy_version(pl: Planes) -> str:
    return json.loads(admin_get(pl.admin, "/config_dump"))["version"]


class VersionPoller:
    """The proxy's config version from /config_dump over one keep-alive connection, read
    without parsing the whole dump: this polling runs on the load core next to wrk, so it
    must be cheap (a fresh connection and a full JSON parse per poll cost the load
    generator several percent of its throughput)."""

    RX = re.compile(rb'"version":\s*"([^"]*)"')

    def __init__(self, port: int):
        self.port = port
        self.conn: http.client.HTTPConnection | None = None

    def get(self) -> str:
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            try:
                self.conn.request("GET", "/config_dump")
                r = self.conn.getresponse()
                body = r.read()
                if r.status != 200:
                    raise RuntimeError(f"GET /config_dump on the proxy admin: {r.status}")
                m = self.RX.search(body, 0, 4096)
                if not m:
                    raise RuntimeError("no version in /config_dump")
                return m.group(1).decode()
            except (OSError, http.client.HTTPException):
                self.conn.close()
                self.conn = None
                if attempt:
                    raise
        raise RuntimeError("unreachable")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


def metrics(pl: Planes) -> dict[str, float]:
    """The proxy's Prometheus counters of interest, summed over their label sets."""
    out: dict[str, float] = {}
    text = admin_get(pl.admin, "/stats/prometheus").decode(errors="replace")
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        if name.endswith("_bucket") or name.endswith("_sum") or name.endswith("_count") and "duration" in name:
            continue
        key = name
        m = re.search(r'class="(\dxx)"', name_labels)
        if m:
            key = f"{name}{{class={m.group(1)}}}"
        try:
            out[key] = out.get(key, 0.0) + float(value)
        except ValueError:
            pass
    return out


def setup_config(pl: Planes) -> State:
    st = State()
    status, body = api_call(pl.api, "POST", "/api/v1/apply", all_docs(st, pl))
    if status != 200:
        raise RuntimeError(f"initial apply: {status} {body}")
    end = time.monotonic() + 20
    while True:
        try:
            if admin_get(pl.admin, "/ready"):
                break
        except (OSError, RuntimeError):
            pass
        if time.monotonic() > end or pl.proxy.popen.poll() is not None:
            raise RuntimeError(f"proxy never ready: {pl.proxy.log_tail()}")
        time.sleep(0.02)
    for path in LOAD_PATHS:
        lib.wait_http(pl.port, pl.proxy, path)
    return st


# ---------------------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------------------


def wrk_cmd(port: int, duration: float, conns: int, threads: int) -> list[str]:
    return ["taskset", "-c", lib.LOAD_CORE, "wrk", f"-t{threads}", f"-c{conns}", f"-d{duration:g}s", "--timeout", "5s",
            "-s", str(HERE / "report.lua"), f"http://127.0.0.1:{port}/"]


def parse_wrk(out: str, err: str, rc: int) -> dict:
    line = next((l for l in out.splitlines() if l.startswith("BENCH_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result (exit {rc}): {out[-800:]} {err[-800:]}")
    d = json.loads(line[len("BENCH_JSON "):])
    non2xx = 0
    m = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", out)
    if m:
        non2xx = int(m.group(1))
    socket = {k[len("errors_"):]: d[k] for k in ("errors_connect", "errors_read", "errors_write", "errors_timeout")}
    secs = d["duration_us"] / 1e6
    return {
        "requests": d["requests"],
        "seconds": secs,
        "rps": d["requests"] / secs if secs else 0.0,
        "p50_us": d["p50_us"], "p90_us": d["p90_us"], "p99_us": d["p99_us"], "p999_us": d["p999_us"],
        "max_us": d["max_us"], "mean_us": d["mean_us"],
        "non2xx": max(non2xx, d["errors_status"]),
        "socket_errors": socket,
        "failed": max(non2xx, d["errors_status"]) + sum(socket.values()),
    }


class CloseClient:
    """Threads opening a new connection for every request (`Connection: close`), paced to
    a combined rate, alternating over LOAD_PATHS. Every failure is kept with its time."""

    def __init__(self, port: int, clients: int, rps: float):
        self.port = port
        self.clients = max(0, clients)
        self.interval = self.clients / rps if rps > 0 else 0.0
        self.stop_flag = threading.Event()
        self.lat_us: list[float] = []
        self.starts: list[float] = []  # seconds since t0, one per entry of lat_us
        self.failures: list[dict] = []
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []
        self.t0 = 0.0

    def start(self, t0: float) -> None:
        self.t0 = t0
        for i in range(self.clients):
            t = threading.Thread(target=self._run, args=(i,), daemon=True)
            t.start()
            self.threads.append(t)

    def _run(self, i: int) -> None:
        n = i
        nxt = time.monotonic()
        while not self.stop_flag.is_set():
            path = LOAD_PATHS[n % len(LOAD_PATHS)]
            n += 1
            start = time.monotonic()
            err = None
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                try:
                    conn.request("GET", path, headers={"Connection": "close"})
                    r = conn.getresponse()
                    r.read()
                    if r.status != 200 or r.getheader("x-echo-name") is None:
                        err = f"status {r.status}, x-echo-name {r.getheader('x-echo-name')}"
                finally:
                    conn.close()
            except (OSError, http.client.HTTPException) as e:
                err = f"{type(e).__name__}: {e}"
            took = (time.monotonic() - start) * 1e6
            with self.lock:
                if err is None:
                    self.lat_us.append(took)
                    self.starts.append(start - self.t0)
                else:
                    self.failures.append({"t_s": round(start - self.t0, 3), "path": path, "error": err})
            if self.interval:
                nxt += self.interval
                delay = nxt - time.monotonic()
                if delay > 0:
                    self.stop_flag.wait(delay)
                else:
                    nxt = time.monotonic()

    def near(self, swaps: list[float], window: float) -> dict:
        """Latency of the requests that started within `window` seconds after a config swap
        (seconds since t0) against the others of the same phase: the impact of a swap
        itself, free of the drift between phases on a shared machine."""
        swaps = sorted(swaps)
        near, far = [], []
        for t, lat in zip(self.starts, self.lat_us):
            k = bisect.bisect_right(swaps, t) - 1
            (near if k >= 0 and t - swaps[k] < window else far).append(lat)
        return {"window_ms": window * 1e3, "near_n": len(near), "near_p50_us": percentile(near, 50),
                "near_p99_us": percentile(near, 99), "near_max_us": max(near, default=None),
                "far_n": len(far), "far_p50_us": percentile(far, 50), "far_p99_us": percentile(far, 99)}

    def finish(self) -> dict:
        self.stop_flag.set()
        for t in self.threads:
            t.join(timeout=10)
        lat = self.lat_us
        return {
            "requests": len(lat) + len(self.failures),
            "failed": len(self.failures),
            "p50_us": percentile(lat, 50), "p99_us": percentile(lat, 99), "max_us": max(lat) if lat else None,
            "failures": self.failures[:50],
        }


class Changer:
    """Applies `n` changes spread evenly over [5 %, 95 %] of the phase, one API call each;
    after each, polls the proxy's /config_dump until its version moves (or the next change
    is due) to time the propagation."""

    def __init__(self, pl: Planes, st: State, n: int, duration: float, kinds: list[str], poll: bool):
        self.pl, self.st, self.n, self.duration, self.kinds, self.poll = pl, st, n, duration, kinds, poll
        self.records: list[dict] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.t0 = 0.0
        self.error: str | None = None
        self.poller = VersionPoller(pl.admin)

    def start(self, t0: float) -> None:
        self.t0 = t0
        self.thread.start()

    def _run(self) -> None:
        try:
            self._changes()
        except Exception as e:  # reported, and the run fails loudly
            self.error = f"{type(e).__name__}: {e}"
        finally:
            self.poller.close()

    def _changes(self) -> None:
        span = 0.9 * self.duration
        steps = {k: 0 for k in self.kinds}
        for i in range(self.n):
            due = self.t0 + 0.05 * self.duration + (i * span / max(1, self.n - 1) if self.n > 1 else span / 2)
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            kind = self.kinds[i % len(self.kinds)]
            ch = next_change(self.st, kind, steps[kind], self.pl)
            steps[kind] += 1
            before = self.poller.get() if self.poll else ""
            t_start = time.monotonic()
            status, body = api_call(self.pl.api, ch.method, ch.path, ch.body)
            t_applied = time.monotonic()
            rec = {
                "i": i, "kind": kind, "what": ch.what, "t_s": round(t_start - self.t0, 3),
                "late_ms": round(max(0.0, t_start - due) * 1e3, 1),
                "status": status, "apply_ms": round((t_applied - t_start) * 1e3, 2),
                "revision": body.get("revision"),
                "actions": [r.get("action") for r in body.get("results", [])] or ([body["deleted"]["name"] + " deleted"] if "deleted" in body else []),
                "propagation_ms": None,
                "visible": change_visible(ch, self.st),
            }
            if status != 200:
                rec["error"] = body
                self.records.append(rec)
                continue
            # Poll until the proxy swapped to a config other than the one before the call;
            # give up when the next change is due (the record then says None).
            next_due = self.t0 + 0.05 * self.duration + ((i + 1) * span / max(1, self.n - 1)) if i + 1 < self.n else t_start + 5
            rec["polls"] = 0
            while self.poll:
                rec["polls"] += 1
                if self.poller.get() != before:
                    rec["propagation_ms"] = round((time.monotonic() - t_start) * 1e3, 1)
                    break
                if time.monotonic() >= max(next_due, t_applied + 0.15) - 0.005:
                    break
                time.sleep(0.005)
            if rec["propagation_ms"] is not None:
                probe = verify_probe(ch, self.st, self.pl)
                if probe:
                    rec["verify"] = verify(*probe)
            self.records.append(rec)


def who(port: int, path: str) -> str | None:
    """The `x-echo-name` of a 200 answer to GET path (new connection), else None."""
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            conn.request("GET", path)
            r = conn.getresponse()
            r.read()
            return r.getheader("x-echo-name") if r.status == 200 else None
        finally:
            conn.close()
    except (OSError, http.client.HTTPException):
        return None


def verify_probe(ch: Change, st: State, pl: Planes) -> tuple[int, str, tuple[str, ...] | None] | None:
    """(port, path, the echoes that may answer — None: any) showing that a change took
    effect, for the changes one request can check; None for the others (endpoint changes,
    mixed weights, removals). Extra rules and routes go to Backend `d` (echo D), which
    nothing else uses, so an answer from D can only come from the new rule."""
    if ch.kind == "listener" and st.listener2:
        return pl.port2, "/", None
    if ch.kind == "route" and ch.what.startswith("web: add rule"):
        return pl.port, f"{st.extra_rule}/x", ("D",)
    if ch.kind == "route" and ch.what.startswith("create"):
        return pl.port, f"{st.extra_route}/x", ("D",)
    if ch.kind == "weights" and 0 in st.weights:
        return pl.port, "/", st.a if st.weights[0] else st.b
    return None


def change_visible(ch: Change, st: State) -> bool:
    """Whether the change alters what the proxy holds. Endpoints of a Backend that no route
    sends traffic to (weight 0 in the catch-all) are not: zero-weight refs are compiled
    away, so the proxy has no cluster for it and rightly sees no new version."""
    if ch.kind == "endpoints":
        name = ch.what.split()[1]
        return st.weights[0 if name == "a" else 1] > 0 or name == "a"  # `a` also serves /api
    return True


def verify(port: int, path: str, expect: tuple[str, ...] | None) -> dict:
    """Once the proxy shows the new version: does a request see the change? Retries for
    up to 1 s (the answer says how long it took and what the first attempt got)."""

    def good(name: str | None) -> bool:
        return name is not None and (expect is None or name in expect)

    start = time.monotonic()
    first = who(port, path)
    got = first
    while not good(got) and time.monotonic() - start < 1.0:
        time.sleep(0.01)
        got = who(port, path)
    return {"probe": f":{port}{path}", "expect": "any" if expect is None else "|".join(expect), "ok": good(got), "first_ok": good(first), "first": first,
            "ms": round((time.monotonic() - start) * 1e3, 1)}


def run_phase(name: str, pl: Planes, st: State, cfg: dict) -> dict:
    duration = cfg["duration_s"]
    proxy_pids, control_pids = pl.proxy.pids(), pl.control.pids()
    m0 = metrics(pl)
    cpu0, cp0 = lib.cpu_sample(proxy_pids), lib.cpu_sample(control_pids)
    la0 = float(Path("/proc/loadavg").read_text().split()[0])
    busy0 = core_busy()
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    log0 = pl.proxy.log_path.stat().st_size
    close = CloseClient(pl.port, cfg["close_clients"], cfg["close_rps"])
    changer = Changer(pl, st, cfg["changes"], duration, cfg["kinds"], cfg["poll"]) if name == "reconfig" else None
    wrk = subprocess.Popen(wrk_cmd(pl.port, duration, cfg["connections"], cfg["wrk_threads"]),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    close.start(t0)
    if changer:
        changer.start(t0)
    try:
        out, err = wrk.communicate(timeout=duration + 60)
    except subprocess.TimeoutExpired:
        wrk.kill()
        out, err = wrk.communicate()
    elapsed = time.monotonic() - t0
    cl = close.finish()
    if changer:
        changer.thread.join(timeout=duration + 30)
    res: dict = {"phase": name}
    res["wrk"] = parse_wrk(out, err, wrk.returncode)
    res["close"] = cl
    cpu1, cp1, busy1 = lib.cpu_sample(proxy_pids), lib.cpu_sample(control_pids), core_busy()
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    # This driver's own CPU (change thread, polling, connection-per-request clients): it
    # shares the load core with wrk.
    res_driver_cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    m1 = metrics(pl)
    n = max(1, res["wrk"]["requests"] + cl["requests"])
    res["proxy_cpu_us_per_req"] = (cpu1.ticks - cpu0.ticks) * 1e6 / lib.CLK_TCK / n
    res["proxy_cpu_s"] = (cpu1.ticks - cpu0.ticks) / lib.CLK_TCK
    res["control_cpu_s"] = (cp1.ticks - cp0.ticks) / lib.CLK_TCK
    res["driver_cpu_s"] = round(res_driver_cpu, 3)
    res["elapsed_s"] = round(elapsed, 2)
    # How busy the proxy's core was with other processes (the contention indicator of
    # bench/proxy.py), and how busy the load core was in all.
    proxy_ticks = cpu1.ticks - cpu0.ticks
    core = lib.PROXY_CORE
    other = (busy1.get(core, 0) - busy0.get(core, 0)) - proxy_ticks
    res["proxy_core_other_busy_pct"] = round(100.0 * max(0, other) / lib.CLK_TCK / elapsed, 1)
    load_core = lib.LOAD_CORE.split(",")[0]
    res["load_core_busy_pct"] = round(100.0 * (busy1.get(load_core, 0) - busy0.get(load_core, 0)) / lib.CLK_TCK / elapsed, 1)
    res["loadavg"] = round((la0 + float(Path("/proc/loadavg").read_text().split()[0])) / 2, 2)
    res["proxy_rss_bytes"] = lib.mem_status(proxy_pids)["rss"]
    deltas = {k: m1.get(k, 0) - m0.get(k, 0) for k in set(m0) | set(m1)}
    res["proxy_metrics_delta"] = {k: v for k, v in sorted(deltas.items()) if v and not k.endswith("_active")}
    with open(pl.proxy.log_path, "rb") as f:
        f.seek(log0)
        new_log = f.read().decode(errors="replace").splitlines()
    res["proxy_log_warnings"] = [l for l in new_log if "WARN" in l or "ERROR" in l][:30]
    res["failed"] = res["wrk"]["failed"] + cl["failed"]
    if changer:
        res["changes"] = changer.records
        res["changes_applied"] = sum(1 for r in changer.records if r["status"] == 200)
        res["changes_refused"] = sum(1 for r in changer.records if r["status"] != 200)
        if changer.error:
            res["changer_error"] = changer.error
        # A swap happened at most one poll (5 ms, plus the poll's own time) before it was
        # seen: the window starts 10 ms before the sighting and lasts 60 ms.
        swaps = [c["t_s"] + c["propagation_ms"] / 1e3 - 0.01 for c in changer.records if c["propagation_ms"] is not None]
        res["close_near_swap"] = close.near(swaps, 0.06)
        res["config_swaps"] = deltas.get("biplane_config_swaps_total", deltas.get("biplane_config_swaps"))
    return res


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------


def summarize(result: dict) -> dict:
    runs = result["runs"]
    out: dict = {}
    for phase in ("baseline", "reconfig"):
        rs = [r for r in runs if r.get("phase") == phase and "error" not in r]
        out[phase] = {
            "runs": len(rs),
            "rps": median([r["wrk"]["rps"] for r in rs]),
            "p50_us": median([r["wrk"]["p50_us"] for r in rs]),
            "p99_us": median([r["wrk"]["p99_us"] for r in rs]),
            "p999_us": median([r["wrk"]["p999_us"] for r in rs]),
            "max_us": max([r["wrk"]["max_us"] for r in rs], default=None),
            "close_p50_us": median([r["close"]["p50_us"] for r in rs]),
            "close_p99_us": median([r["close"]["p99_us"] for r in rs]),
            "close_max_us": max([r["close"]["max_us"] or 0 for r in rs], default=None),
            "proxy_cpu_us_per_req": median([r["proxy_cpu_us_per_req"] for r in rs]),
            "proxy_core_other_busy_pct": median([r.get("proxy_core_other_busy_pct") for r in rs]),
            "loadavg": median([r.get("loadavg") for r in rs]),
            "requests": sum(r["wrk"]["requests"] for r in rs),
            "close_requests": sum(r["close"]["requests"] for r in rs),
            "failed_wrk": sum(r["wrk"]["failed"] for r in rs),
            "failed_non2xx": sum(r["wrk"]["non2xx"] for r in rs),
            "failed_socket": sum(sum(r["wrk"]["socket_errors"].values()) for r in rs),
            "failed_close": sum(r["close"]["failed"] for r in rs),
            "failed": sum(r["failed"] for r in rs),
        }
    b, c = out["baseline"], out["reconfig"]
    out["ratio"] = {k: (round(c[k] / b[k], 3) if b.get(k) and c.get(k) else None)
                    for k in ("rps", "p50_us", "p99_us", "p999_us", "close_p50_us", "close_p99_us", "proxy_cpu_us_per_req")}
    # The same ratios within each repetition (its two phases ran back to back, so a
    # neighbour's slow drift cancels out better), then their median and range.
    paired: dict[str, list[float]] = {k: [] for k in ("rps", "p50_us", "p99_us", "p999_us")}
    for rep in sorted({r["rep"] for r in runs if "rep" in r and "error" not in r}):
        ph = {r["phase"]: r for r in runs if r.get("rep") == rep and "error" not in r}
        if "baseline" in ph and "reconfig" in ph:
            for k in paired:
                bv, cv = ph["baseline"]["wrk"][k], ph["reconfig"]["wrk"][k]
                if bv and cv:
                    paired[k].append(round(cv / bv, 3))
    out["paired_ratio"] = {k: {"median": median(v), "min": min(v, default=None), "max": max(v, default=None), "each": v}
                           for k, v in paired.items()}
    changes = [ch for r in runs if r.get("phase") == "reconfig" for ch in r.get("changes", [])]
    applies = [ch["apply_ms"] for ch in changes if ch["status"] == 200]
    props = [ch["propagation_ms"] for ch in changes if ch["propagation_ms"] is not None]
    near = [r["close_near_swap"] for r in runs if r.get("phase") == "reconfig" and r.get("close_near_swap")]
    out["close_near_swap"] = {k: median([n[k] for n in near]) for k in ("near_n", "near_p50_us", "near_p99_us", "far_n", "far_p50_us", "far_p99_us")}
    out["close_near_swap"]["near_max_us"] = max([n["near_max_us"] or 0 for n in near], default=None)
    out["changes"] = {
        "applied": len(applies),
        "refused": sum(1 for ch in changes if ch["status"] != 200),
        "apply_p50_ms": percentile(applies, 50), "apply_p99_ms": percentile(applies, 99), "apply_max_ms": max(applies, default=None),
        "propagation_seen": len(props),
        "propagation_p50_ms": percentile(props, 50), "propagation_p99_ms": percentile(props, 99),
        "propagation_max_ms": max(props, default=None),
        "verified": sum(1 for ch in changes if ch.get("verify", {}).get("ok")),
        "verify_failed": [f"{ch['what']}: {ch['verify']}" for ch in changes if "verify" in ch and not ch["verify"]["ok"]][:20],
        "verify_late": sum(1 for ch in changes if "verify" in ch and not ch["verify"]["first_ok"]),
        "not_seen": sum(1 for ch in changes if ch["status"] == 200 and ch["propagation_ms"] is None and ch.get("visible", True)),
        "invisible": sum(1 for ch in changes if ch["status"] == 200 and not ch.get("visible", True)),
        "by_kind": {k: sum(1 for ch in changes if ch["kind"] == k and ch["status"] == 200) for k in result["config"]["kinds"]},
    }
    out["errors"] = [r["error"] for r in runs if "error" in r]
    return out


def fmt(v: float | None, spec: str, scale: float = 1.0) -> str:
    return "–" if v is None else format(v / scale, spec)


def markdown(result: dict) -> str:
    s, cfg, m = result["summary"], result["config"], result["machine"]
    lines = [
        f"Run {result['started']} ({result['mode']}): {m['nproc']} × {m['cpu_model']}, load average "
        f"{' '.join(m['loadavg_start'])} at start, {' '.join(m.get('loadavg_end', ['?']))} at end; "
        f"{cfg['runs']} repetition(s) of two {cfg['duration_s']:g} s phases, medians. Load: wrk "
        f"-t{cfg['wrk_threads']} -c{cfg['connections']} keep-alive on `/`, plus {cfg['close_clients']} "
        f"connection-per-request clients at {cfg['close_rps']:g} req/s in total on `/` and `/api/x`. "
        f"Reconfig phase: {cfg['changes']} changes ({', '.join(cfg['kinds'])} in rotation), one API call each.",
        "",
        "| Phase | req/s | p50 ms | p99 ms | p99.9 ms | max ms | conn-per-req p50 / p99 ms | proxy CPU µs/req | other on proxy core % | load avg | failed (non-2xx / socket / conn-per-req) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for phase in ("baseline", "reconfig"):
        p = s[phase]
        lines.append(
            f"| {phase} | {fmt(p['rps'], ',.0f')} | {fmt(p['p50_us'], '.2f', 1e3)} | {fmt(p['p99_us'], '.2f', 1e3)} | "
            f"{fmt(p['p999_us'], '.2f', 1e3)} | {fmt(p['max_us'], '.1f', 1e3)} | "
            f"{fmt(p['close_p50_us'], '.2f', 1e3)} / {fmt(p['close_p99_us'], '.2f', 1e3)} | "
            f"{fmt(p['proxy_cpu_us_per_req'], '.1f')} | {fmt(p['proxy_core_other_busy_pct'], '.0f')} | "
            f"{fmt(p['loadavg'], '.1f')} | **{p['failed']}** ({p['failed_non2xx']} / {p['failed_socket']} / {p['failed_close']}) of "
            f"{p['requests'] + p['close_requests']:,} |"
        )
    r = s["ratio"]
    lines.append(
        f"| reconfig ÷ baseline | {fmt(r['rps'], '.3f')} | {fmt(r['p50_us'], '.2f')} | {fmt(r['p99_us'], '.2f')} | "
        f"{fmt(r['p999_us'], '.2f')} | | {fmt(r['close_p50_us'], '.2f')} / {fmt(r['close_p99_us'], '.2f')} | "
        f"{fmt(r['proxy_cpu_us_per_req'], '.2f')} | | | |"
    )
    pr = s.get("paired_ratio") or {}
    if pr.get("rps", {}).get("each"):
        lines.append(
            "| reconfig ÷ baseline, same repetition: median (min–max) | "
            + " | ".join(f"{fmt(pr[k]['median'], '.2f')} ({fmt(pr[k]['min'], '.2f')}–{fmt(pr[k]['max'], '.2f')})"
                         for k in ("rps", "p50_us", "p99_us", "p999_us"))
            + " | | | | | | |"
        )
    c = s["changes"]
    lines += [
        "",
        "| Changes applied (refused) | by kind | apply p50 / p99 / max ms | to the proxy p50 / p99 / max ms (seen) | checked by a request: ok / first try wrong / failed |",
        "|---|---|---:|---:|---:|",
        f"| {c['applied']} ({c['refused']}) | {', '.join(f'{k} {v}' for k, v in c['by_kind'].items())} | "
        f"{fmt(c['apply_p50_ms'], '.1f')} / {fmt(c['apply_p99_ms'], '.1f')} / {fmt(c['apply_max_ms'], '.1f')} | "
        f"{fmt(c['propagation_p50_ms'], '.0f')} / {fmt(c['propagation_p99_ms'], '.0f')} / {fmt(c['propagation_max_ms'], '.0f')} "
        f"({c['propagation_seen']}) | {c['verified']} / {c['verify_late']} / {len(c['verify_failed'])} |",
    ]
    n = s.get("close_near_swap") or {}
    if n.get("near_n"):
        lines += ["", f"Connection-per-request latency in the reconfig phase, requests started in the 60 ms around "
                      f"each config swap (from 10 ms before it was seen at `/config_dump`) (median per repetition {n['near_n']:.0f} requests) against the rest ({n['far_n']:.0f}): "
                      f"p50 {fmt(n['near_p50_us'], '.2f', 1e3)} vs {fmt(n['far_p50_us'], '.2f', 1e3)} ms, "
                      f"p99 {fmt(n['near_p99_us'], '.2f', 1e3)} vs {fmt(n['far_p99_us'], '.2f', 1e3)} ms "
                      f"(max near a swap {fmt(n['near_max_us'], '.1f', 1e3)} ms)."]
    if cfg.get("poll", True) and (c["invisible"] or c["not_seen"]):
        lines += ["", f"Not seen at the proxy before the next change: {c['invisible']} that change nothing the proxy holds "
                      f"(endpoints of a Backend at weight 0: zero-weight refs are compiled away), "
                      f"{c['not_seen']} that should have reached it."]
    if c["verify_failed"]:
        lines += ["", "Changes a request did not see: " + "; ".join(c["verify_failed"])]
    if s["errors"]:
        lines += ["", "Repetitions that could not run: " + "; ".join(e[:200] for e in s["errors"])]
    return "\n".join(lines) + "\n"


def write(result: dict, out_dir: Path) -> str:
    result["summary"] = summarize(result)
    (out_dir / "reconfig.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    (out_dir / "reconfig.md").write_text(md)
    return md


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--render":
        path = Path(sys.argv[2])
        print(write(json.loads(path.read_text()), path.parent))
        return 0
    smoke = "--smoke" in sys.argv[1:]
    biplane = os.environ.get("BIPLANE_BIN") or "biplane"
    kinds = [k.strip() for k in os.environ.get("BENCH_KINDS", ",".join(KINDS)).split(",") if k.strip()]
    if not kinds or any(k not in KINDS for k in kinds):
        sys.exit(f"BENCH_KINDS: choose from {KINDS}")
    cfg = {
        "runs": 1 if smoke else int(env_num("BENCH_RUNS", 3)),
        "duration_s": 3.0 if smoke else env_num("BENCH_DURATION", 20),
        "changes": 10 if smoke else int(env_num("BENCH_CHANGES", 100)),
        "warmup_s": 0.5 if smoke else env_num("BENCH_WARMUP", 1),
        "connections": int(env_num("BENCH_CONNECTIONS", 32)),
        "wrk_threads": int(env_num("BENCH_WRK_THREADS", 2)),
        "close_clients": int(env_num("BENCH_CLOSE_CLIENTS", 2)),
        "close_rps": env_num("BENCH_CLOSE_RPS", 200),
        "kinds": kinds,
        "poll": env_num("BENCH_POLL", 1) != 0,
        "proxy_core": lib.PROXY_CORE, "load_core": lib.LOAD_CORE,
    }
    out_dir = Path(os.environ.get("BENCH_OUT") or (HERE / "results"))
    if smoke and not os.environ.get("BENCH_OUT"):
        out_dir = Path(tempfile.gettempdir()) / "biplane-bench-smoke"
    out_dir.mkdir(parents=True, exist_ok=True)
    lib.raise_nofile()
    # This driver's threads (changes, connection-per-request clients) share the load core.
    os.sched_setaffinity(0, {int(c) for c in lib.LOAD_CORE.split(",")})

    result: dict = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "mode": "smoke" if smoke else "full",
        "machine": lib.machine_info(),
        "versions": {"wrk": lib.versions(biplane)["wrk"], "biplane": lib.versions(biplane)["biplane"]},
        "config": cfg,
        "runs": [],
    }
    t_start = time.monotonic()
    for rep in range(cfg["runs"]):
        order = ["baseline", "reconfig"] if rep % 2 == 0 else ["reconfig", "baseline"]
        with tempfile.TemporaryDirectory(prefix="biplane-reconfig-") as tmp:
            pl = None
            try:
                pl = start_planes(Path(tmp), biplane)
                st = setup_config(pl)
                if cfg["warmup_s"] > 0:
                    subprocess.run(wrk_cmd(pl.port, cfg["warmup_s"], cfg["connections"], cfg["wrk_threads"]),
                                   capture_output=True, timeout=cfg["warmup_s"] + 30)
                for phase in order:
                    rec = run_phase(phase, pl, st, cfg)
                    rec["rep"] = rep
                    result["runs"].append(rec)
                    w, cl = rec["wrk"], rec["close"]
                    extra = ""
                    if phase == "reconfig":
                        applied = [c["apply_ms"] for c in rec["changes"] if c["status"] == 200]
                        props = [c["propagation_ms"] for c in rec["changes"] if c["propagation_ms"] is not None]
                        extra = (f"  changes {rec['changes_applied']}/{cfg['changes']} apply p50 {fmt(percentile(applied, 50), '.1f')} ms"
                                 f"  to proxy p50 {fmt(percentile(props, 50), '.0f')} ms ({len(props)} seen)"
                                 f"  swaps {rec.get('config_swaps')}")
                    print(f"[{rep + 1}/{cfg['runs']}] {phase:8s} {w['rps']:9,.0f} req/s  p50 {w['p50_us'] / 1e3:5.2f}  "
                          f"p99 {w['p99_us'] / 1e3:6.2f}  p99.9 {w['p999_us'] / 1e3:6.2f} ms  conn-per-req {cl['requests']}  "
                          f"FAILED {rec['failed']} (non-2xx {w['non2xx']}, socket {sum(w['socket_errors'].values())}, "
                          f"conn-per-req {cl['failed']})  load {rec['loadavg']}{extra}", flush=True)
                    for l in rec["proxy_log_warnings"][:5]:
                        print(f"    proxy: {l[:300]}", flush=True)
                    if rec.get("changer_error"):
                        print(f"    change driver error: {rec['changer_error']}", flush=True)
            except Exception as e:  # one repetition failing must not lose the others
                result["runs"].append({"rep": rep, "error": f"{type(e).__name__}: {e}"[-1500:]})
                print(f"[{rep + 1}/{cfg['runs']}] FAILED: {e}", flush=True)
            finally:
                if pl:
                    pl.stop()
    result["machine"]["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    result["elapsed_s"] = round(time.monotonic() - t_start, 1)
    md = write(result, out_dir)
    print()
    print(md)
    print(f"wrote {out_dir}/reconfig.json, reconfig.md in {result['elapsed_s']} s")
    s = result["summary"]
    bad = s["baseline"]["failed"] + s["reconfig"]["failed"]
    if bad:
        print(f"FAILED REQUESTS: {bad} (baseline {s['baseline']['failed']}, under reconfiguration {s['reconfig']['failed']})",
              file=sys.stderr)
    if s["changes"]["refused"] or s["changes"]["verify_failed"] or s["errors"] or any(r.get("changer_error") for r in result["runs"]):
        print("the run is incomplete: refused changes or repetitions that failed (see the JSON)", file=sys.stderr)
        return 1
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
