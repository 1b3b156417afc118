#!/usr/bin/env bash
# The quantized matmul's VNNI kernels against its AVX2 ones on the same AVX-512 VNNI machine:
# `seedance-server generate` on a GGUF file (default: the default model, SmolLM2-135M Q4_1),
# ~500-token prompt, 128 tokens, pinned to CPU 0 (one thread), rounds alternating
# `SEEDANCE_NO_VNNI=1` (AVX2 kernels) and the default (VNNI). Prints prefill and decode tokens/s.
# Usage: perf/vnni_compare.sh [FILE.gguf] [rounds=5]
set -euo pipefail
cd "$(dirname "$0")/.."
FILE=${1:-$(bash scripts/fetch_model.sh --path)}
ROUNDS=${2:-5}
grep -q avx512_vnni /proc/cpuinfo || { echo "vnni_compare.sh: this CPU has no AVX512-VNNI" >&2; exit 1; }
cargo build --release --bins -q
PROMPT=$(python3 -c "print(' '.join(['the quick brown fox jumps over the lazy dog'] * 56))")
run() {
  env "$@" taskset -c 0 target/release/seedance-server generate --model "$FILE" --prompt "$PROMPT" \
    --max-tokens 128 --ignore-eos --ids 2>&1 >/dev/null |
    sed -nE 's/.*prompt_tokens: ([0-9]+).*generated_tokens: ([0-9]+).*prefill: ([0-9.]+)(m?s), decode: ([0-9.]+)(m?s).*/\1 \2 \3 \4 \5 \6/p' |
    awk '{ p = ($4 == "ms") ? $3 / 1000 : $3; d = ($6 == "ms") ? $5 / 1000 : $5;
           printf "prefill %.0f t/s  decode %.1f t/s\n", $1 / p, ($2 - 1) / d }'
}
for r in $(seq "$ROUNDS"); do
  echo "round $r avx2: $(run SEEDANCE_NO_VNNI=1)"
  echo "round $r vnni: $(run SEEDANCE_VNNI_DEFAULT=1)"
done
