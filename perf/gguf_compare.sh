#!/usr/bin/env bash
# seedance against llama.cpp on the same GGUF file (issue 16 "Must show"): prefill-512 and
# batch-1 decode tokens/s, side by side in alternating rounds, at each thread count.
#
# Usage: perf/gguf_compare.sh [FILE.gguf]   (default: the default model, SmolLM2-135M-Instruct
#        Q4_1, fetched by scripts/fetch_model.sh)
#   env: THREADS="1 2" ROUNDS=3 REPS=3 LLAMA_CPP_PYTHON_VERSION=0.3.36
#
# llama.cpp: `llama-bench -m FILE -t T -p 512 -n 0 -r REPS` (pp512 from an empty context) and
# `-p 0 -n 128 -d 512` (tg128 after a 512-token context, as seedance decodes). seedance: `seedance-server generate --model FILE` with a 512-token prompt (text the
# file's own tokenizer makes exactly 512 tokens of, via `seedance-server tokenize`) and 128
# tokens (prefill t/s = 512 / prefill; decode t/s = 127 / decode). Both pinned to CPUs
# 0..T-1; seedance's CPU backend uses every CPU it may run on, so the pin sets its threads.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
THREADS=${THREADS:-"1 2"}
ROUNDS=${ROUNDS:-3}
REPS=${REPS:-3}
VER=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
CACHE=$ROOT/perf/.cache
mkdir -p "$CACHE"
log() { echo "[gguf_compare] $*" >&2; }
FILE=${1:-}
if [ -z "$FILE" ]; then
  bash scripts/fetch_model.sh >&2
  FILE=$(bash scripts/fetch_model.sh --path)
fi
[ -f "$FILE" ] || { echo "gguf_compare.sh: $FILE not found" >&2; exit 1; }

for t in cmake ninja; do command -v $t >/dev/null || python3 -m pip install -q $t; done
hash -r
log "cargo build --release --bins"
cargo build --release --bins -q
SEEDANCE=$ROOT/target/release/seedance-server
# shellcheck source=perf/llamacpp_build.sh
source "$ROOT/perf/llamacpp_build.sh"

# A prompt of exactly 512 tokens under the file's tokenizer.
PROMPT=$(python3 - "$SEEDANCE" "$FILE" <<'PY'
import json, subprocess, sys
words = ("the quick brown fox jumps over the lazy dog while seven wizards quietly judge "
         "boxing matches in a small town near the river ").split()
def count(t):
    return len(json.loads(subprocess.run([sys.argv[1], "tokenize", "--model", sys.argv[2], t],
                                         capture_output=True, text=True, check=True).stdout))
# Whole words up to ~500 tokens, then " a" (one token in the vocabularies tried) to exactly 512.
text, n = "", 0
while count(text) < 500:
    text, n = (text + " " + words[n % len(words)]).strip(), n + 1
while count(text) < 512:
    text += " a"
assert count(text) == 512, count(text)
print(text, end="")
PY
)

RES=$(mktemp)
trap 'rm -f "$RES"' EXIT
LOAD_BEFORE=$(uptime)
for r in $(seq "$ROUNDS"); do
  for t in $THREADS; do
    PIN=(taskset -c "0-$((t - 1))")
    log "round $r/$ROUNDS"
    bench_round "$t" "$FILE" "$FILE" "$t"
  done
done
echo
echo "$(basename "$FILE"): seedance $(git rev-parse --short HEAD) vs llama.cpp $(awk '$1 == "meta" {c=$3; m=$4} END {print c " (" m ")"}' "$RES"), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), nproc $(nproc)"
echo "medians of ROUNDS=$ROUNDS alternating rounds x REPS=$REPS; load before: ${LOAD_BEFORE##*load average: }, after: $(uptime | sed 's/.*load average: //')"
python3 - "$RES" $THREADS <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1]) if not l.startswith("meta")]
def med(t, who, k):
    return statistics.median(float(r[3]) for r in rows if r[0] == t and r[1] == who and r[2] == k)
print("| threads | llama.cpp pp512 t/s | seedance prefill-512 t/s | ratio | llama.cpp tg128 @ d512 t/s | seedance decode t/s | ratio |")
print("|---|---|---|---|---|---|---|")
for t in sys.argv[2:]:
    lp, sp, lt, st = med(t, "llama", "pp"), med(t, "seedance", "pp"), med(t, "llama", "tg"), med(t, "seedance", "tg")
    print(f"| {t} | {lp:.1f} | {sp:.1f} | {sp / lp:.2f}x | {lt:.2f} | {st:.2f} | {st / lt:.2f}x |")
PY
