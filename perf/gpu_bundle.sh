#!/usr/bin/env bash
# Prepares a GPU run for a host with no Rust toolchain and no network (the device machines this
# workplace lends): builds here, in release, everything perf/cuda_check.sh runs — the cuda_ops
# and cuda_model test executables, the cuda_kernels bench, seedance-server and seedance-bench —
# and copies them, stripped, into .gpu/ (git-ignored; ~40 MB, under the 64 MiB a run may carry).
# Then, on the GPU host, from the repository root:
#     SEEDANCE_PREBUILT=.gpu bash perf/cuda_check.sh
# (with the device tool: carry [".gpu"]; everything the check writes lands in $OUT).
# NVRTC there comes from the CUDA toolkit (/usr/local/cuda); cudarc loads libnvrtc.so.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.gpu}
rm -rf "$DIR"
mkdir -p "$DIR"
cargo build --release --locked --bins --test cuda_ops --test cuda_model --bench cuda_kernels \
    --message-format=json-render-diagnostics 2>/dev/null |
    python3 -c '
import json, shutil, sys
want = {"cuda_ops", "cuda_model", "cuda_kernels", "seedance-server", "seedance-bench"}
got = set()
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] in want:
        shutil.copy(m["executable"], sys.argv[1] + "/" + m["target"]["name"])
        got.add(m["target"]["name"])
missing = want - got
if missing:
    sys.exit(f"gpu_bundle.sh: not built: {sorted(missing)}")
' "$DIR"
strip "$DIR"/*
git rev-parse HEAD >"$DIR/COMMIT"
du -sh "$DIR"
ls -l "$DIR"
