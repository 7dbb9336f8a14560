#!/usr/bin/env bash
# Reconfiguration under load: wrk (keep-alive) plus a connection-per-request client through
# a `biplane proxy` node while `biplane control` applies changes (weights, route rules and
# whole routes, Backend endpoints, Gateway listeners), against a baseline phase with the
# same load and no changes. Reports failed requests (target 0) and the latency impact.
# See docs/benchmarks.md, "Reconfiguration under load".
#
#   bench/reconfig.sh          # 3 repetitions x (baseline + 100 changes), 20 s per phase: ~2.5 min
#   bench/reconfig.sh --smoke  # 1 repetition, 10 changes over 3 s: ~10 s (CI: keeps it from rotting)
#
# Environment: BENCH_RUNS, BENCH_DURATION, BENCH_CHANGES, BENCH_WARMUP, BENCH_CONNECTIONS,
# BENCH_WRK_THREADS, BENCH_CLOSE_CLIENTS, BENCH_CLOSE_RPS, BENCH_KINDS, BENCH_OUT,
# BENCH_PROXY_CORE, BENCH_LOAD_CORE, BIPLANE_BIN (documented in bench/reconfig.py).
# Writes bench/results/reconfig.{json,md} (--smoke: $TMPDIR/biplane-bench-smoke unless
# BENCH_OUT is set). Exits 1 when any request failed.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/setup.sh
bench_install
bench_build
exec python3 bench/reconfig.py "$@"
