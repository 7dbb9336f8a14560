#!/usr/bin/env bash
# Side-by-side proxy benchmark: NGINX, HAProxy, Envoy and Biplane, one worker each, in
# front of one NGINX upstream, plus the upstream directly. See docs/benchmarks.md.
#
#   bench/proxy.sh            # full run: 5 scenarios x 5 peers x BENCH_RUNS (3) x 5 s
#   bench/proxy.sh --smoke    # every scenario and peer once for 1 s (CI: keeps it from rotting)
#
# Environment: BENCH_RUNS, BENCH_DURATION, BENCH_WARMUP, BENCH_SCENARIOS, BENCH_PEERS,
# BENCH_CONNECTIONS, BENCH_H2_CLIENTS, BENCH_H2_STREAMS, BENCH_OUT, BIPLANE_BIN, ENVOY_BIN
# (documented in bench/proxy.py). Writes bench/results/latest.{json,md,png}
# (--smoke writes to $TMPDIR/biplane-bench-smoke unless BENCH_OUT is set).
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/setup.sh
bench_install
bench_envoy
bench_build
exec python3 bench/proxy.py "$@"
