#!/usr/bin/env bash
# xDS fan-out: N simulated ADS clients (Delta and SotW) against a `biplane control` child
# process, plaintext (`--insecure`, nodes sharing HTTP/2 connections) and mTLS (the secure
# default: every node enrolls with a bootstrap token and has its own TLS connection and
# client certificate); per change, the time from the apply's HTTP 200 to each node's ACK,
# and the control plane's RSS per connected node and CPU. See docs/benchmarks.md.
#
#   bench/xds.sh             # N = 100, 1000, 5000 x plain, mtls x delta, sotw x 5 changes
#   bench/xds.sh --smoke     # 1 change, both protocols: 20 nodes plain, 10 nodes mTLS
#                            # (a few seconds; CI smoke)
#
# Environment: BENCH_XDS_NODES (100,1000,5000), BENCH_XDS_CHANGES (5),
# BENCH_XDS_SECURITY (plain,mtls), BENCH_OUT (bench/results; --smoke:
# $TMPDIR/biplane-bench-smoke), CARGO_TARGET_DIR (target), BIPLANE_BIN and XDS_BENCH_BIN
# (skip the build when both are set). Extra arguments go to biplane-xds-bench (see
# `biplane-xds-bench --help`). Writes $BENCH_OUT/xds.{json,md}.
set -euo pipefail
cd "$(dirname "$0")/.."

smoke=0
for a in "$@"; do [[ $a == --smoke ]] && smoke=1; done
if ((smoke)); then
  out="${BENCH_OUT:-${TMPDIR:-/tmp}/biplane-bench-smoke}"
else
  out="${BENCH_OUT:-bench/results}"
fi
mkdir -p "$out"

if [[ -z "${BIPLANE_BIN:-}" || -z "${XDS_BENCH_BIN:-}" ]]; then
  echo "== building biplane and biplane-xds-bench (release)"
  cargo build --release --locked -p biplane -p biplane-xds-bench
  dir="${CARGO_TARGET_DIR:-target}/release"
  BIPLANE_BIN="${BIPLANE_BIN:-$dir/biplane}"
  XDS_BENCH_BIN="${XDS_BENCH_BIN:-$dir/biplane-xds-bench}"
fi

# mTLS runs open one connection per node: 5,000 nodes = 5,000 descriptors in each of the
# bench and the control plane (both inherit this limit).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if [[ $(ulimit -n) != unlimited && $(ulimit -n) -lt 16384 ]]; then
  echo "warning: ulimit -n is $(ulimit -n)" >&2
fi

args=(--biplane-bin "$BIPLANE_BIN" --protocol both
      --security "${BENCH_XDS_SECURITY:-plain,mtls}"
      --json-out "$out/xds.json" --md-out "$out/xds.md")
if ((! smoke)); then
  args+=(--nodes "${BENCH_XDS_NODES:-100,1000,5000}" --changes "${BENCH_XDS_CHANGES:-5}")
fi
"$XDS_BENCH_BIN" "${args[@]}" "$@"
echo "== wrote $out/xds.json and $out/xds.md"
cat "$out/xds.md"
