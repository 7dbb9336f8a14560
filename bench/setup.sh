# Sourced by bench/proxy.sh and bench/memory.sh: installs the peers and load generators
# (Debian packages) when missing, and builds the release `biplane` binary unless
# BIPLANE_BIN names one. Exports BIPLANE_BIN.

bench_install() {
  local need=()
  command -v nginx >/dev/null 2>&1 || [[ -x /usr/sbin/nginx ]] || need+=(nginx)
  command -v haproxy >/dev/null 2>&1 || [[ -x /usr/sbin/haproxy ]] || need+=(haproxy)
  command -v wrk >/dev/null 2>&1 || need+=(wrk)
  command -v h2load >/dev/null 2>&1 || need+=(nghttp2-client)
  command -v gnuplot >/dev/null 2>&1 || need+=(gnuplot-nox)
  command -v openssl >/dev/null 2>&1 || need+=(openssl)
  command -v taskset >/dev/null 2>&1 || need+=(util-linux)
  command -v python3 >/dev/null 2>&1 || need+=(python3)
  if ((${#need[@]})); then
    echo "== installing ${need[*]}"
    local sudo=()
    [[ $(id -u) -eq 0 ]] || sudo=(sudo)
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update -qq
    "${sudo[@]}" apt-get install -y -qq "${need[@]}" >/dev/null
  fi
  # Debian keeps nginx and haproxy in /usr/sbin, which a non-root PATH may lack.
  export PATH="$PATH:/usr/sbin:/sbin"
}

bench_build() {
  if [[ -n "${BIPLANE_BIN:-}" ]]; then
    [[ -x "$BIPLANE_BIN" ]] || { echo "BIPLANE_BIN=$BIPLANE_BIN is not an executable" >&2; exit 1; }
  else
    echo "== building biplane (release)"
    cargo build --release --locked -p biplane
    BIPLANE_BIN="${CARGO_TARGET_DIR:-target}/release/biplane"
  fi
  BIPLANE_BIN="$(realpath "$BIPLANE_BIN")"
  export BIPLANE_BIN
  if [[ $(nproc) -lt 2 ]]; then
    echo "warning: $(nproc) core(s): the proxy and the load generator will share a core" >&2
    export BENCH_LOAD_CORE=0
  fi
}
