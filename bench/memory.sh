#!/usr/bin/env bash
# Memory at scale: Biplane's RSS idle, with 10k idle keep-alive connections, and with
# 10k routes / 1k backends configured, beside NGINX, HAProxy and Envoy in the same run.
# See docs/benchmarks.md.
#
#   bench/memory.sh           # BENCH_IDLE_CONNS (10000), BENCH_ROUTES (10000), BENCH_BACKENDS (1000)
#   bench/memory.sh --smoke   # 500 connections, 500 routes / 50 backends
#
# Writes bench/results/memory.{json,md} (--smoke: $TMPDIR/biplane-bench-smoke).
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/setup.sh
bench_install
bench_envoy
bench_build
exec python3 bench/memory.py "$@"
