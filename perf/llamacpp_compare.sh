#!/usr/bin/env bash
# seedance CPU backend vs llama.cpp, same F16 weights, same thread count, side by side in one run
# (issue 3, "Must show": batch-1 decode tokens/s and 512-token prefill tokens/s).
#
# Usage: perf/llamacpp_compare.sh [SHAPE...]     (default: qwen2.5-0.5b llama3.2-1b)
#   env: THREADS=2 ROUNDS=3 REPS=3 LLAMA_CPP_PYTHON_VERSION=0.3.36 SEED=0 BATCH_NPP=128
#        BATCHED=1 (0 skips the batched-decode part)
#
# From a clean checkout, in one call:
#  1. builds seedance (cargo build --release --bins);
#  2. writes a random-weight HF checkpoint of the exact SHAPE (F16 safetensors, fixed seed, via
#     transformers: perf/make_hf_checkpoint.py) with the repo's synthetic tokenizer;
#  3. downloads the llama-cpp-python sdist from PyPI (it vendors llama.cpp), extracts it under
#     perf/.cache/ (git-ignored), builds llama-bench (CPU only, GGML_NATIVE, Release) and converts
#     the checkpoint with convert_hf_to_gguf.py --outtype f16. The converter rejects the unknown
#     synthetic tokenizer (BPE pre-tokenizer hash check); the downloaded copy is patched to call
#     it "qwen2" — the tokenizer plays no part in either benchmark;
#  4. alternates ROUNDS times: `llama-bench -m model.gguf -t THREADS -p 512 -n 128 -r REPS`, then
#     REPS runs of `seedance-server generate --model DIR --prompt <512 tokens> --max-tokens 128
#     --ignore-eos --ids` (prefill tok/s = prompt_tokens / prefill, decode tok/s =
#     (generated_tokens - 1) / decode, from its GenerateStats line);
#     and, in the same rounds, batched decode: `llama-batched-bench -npp BATCH_NPP -ntg 128
#     -npl 1,8` against `seedance-server generate --parallel 1|8` (BATCH_NPP-token prompt, 128
#     tokens per sequence; llama-batched-bench's S_TG = all sequences' tokens / decode time, ours
#     the same from its ParallelStats line);
#  5. prints the CPU model, the flags that matter to the kernels and the read bandwidth measured
#     on 1 and THREADS threads (perf/readbw.c), then one table with the medians over all samples,
#     each decode also as weight bytes × tokens/s and as a share of that bandwidth, the batched
#     table, and the load average before/after.
#
# Threads: llama.cpp gets -t THREADS. `seedance-server generate` uses CpuBackend::new(0) = all
# CPUs the process may run on (available_parallelism), so where nproc > THREADS both programs are
# pinned to CPUs 0..THREADS-1 with taskset.
# Both decode after a 512-token context: llama-bench's tg128 runs with `-d 512` (since the run of
# 2026-12-07; earlier rows in docs/benchmarks.md had llama.cpp decoding from an empty context),
# seedance's decode follows its 512-token prompt (attention over 512-640 positions).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
THREADS=${THREADS:-2}
ROUNDS=${ROUNDS:-3}
REPS=${REPS:-3}
VER=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
SEED=${SEED:-0}
BATCH_NPP=${BATCH_NPP:-128}
DO_BATCHED=${BATCHED:-1}
SHAPES=("$@")
[ ${#SHAPES[@]} -gt 0 ] || SHAPES=(qwen2.5-0.5b llama3.2-1b)
CACHE=$ROOT/perf/.cache
mkdir -p "$CACHE"
log() { echo "[llamacpp_compare] $*" >&2; }

# --- tools -------------------------------------------------------------------------------------
need_py=()
for m in torch transformers safetensors numpy sentencepiece tokenizers; do
  python3 -c "import $m" 2>/dev/null || need_py+=("$m")
done
command -v cmake >/dev/null || need_py+=(cmake)
command -v ninja >/dev/null || need_py+=(ninja)
if [ ${#need_py[@]} -gt 0 ]; then
  log "pip install ${need_py[*]}"
  python3 -m pip install -q "${need_py[@]}"
  hash -r
fi

# --- seedance ----------------------------------------------------------------------------------
log "cargo build --release --bins"
cargo build --release --bins -q
SEEDANCE=$ROOT/target/release/seedance-server

# --- llama.cpp ---------------------------------------------------------------------------------
# shellcheck source=perf/llamacpp_build.sh
source "$ROOT/perf/llamacpp_build.sh"
# The converter refuses a tokenizer whose pre-tokenizer hash it does not know; ours is synthetic.
sed -i 's/raise NotImplementedError("BPE pre-tokenizer was not recognized - update get_vocab_base_pre()")/res = "qwen2"  # patched by seedance perf\/llamacpp_compare.sh/' \
  "$LLAMA/conversion/base.py" "$LLAMA/convert_hf_to_gguf.py" 2>/dev/null || true

PIN=()
if [ "$(nproc)" -gt "$THREADS" ]; then PIN=(taskset -c "0-$((THREADS - 1))"); fi

# --- checkpoints, GGUFs, prompt ----------------------------------------------------------------
for s in "${SHAPES[@]}"; do
  d=$CACHE/ckpt-$s-seed$SEED
  if [ ! -f "$d/.done" ]; then
    log "checkpoint $s"
    python3 perf/make_hf_checkpoint.py --shape "$s" --seed "$SEED" --out "$d" >&2
    touch "$d/.done"
  fi
  if [ ! -f "$d.f16.gguf" ]; then
    log "convert_hf_to_gguf $s -> F16 GGUF"
    python3 "$LLAMA/convert_hf_to_gguf.py" "$d" --outtype f16 --outfile "$d.f16.gguf.tmp" \
      >"$CACHE/convert-$s.log" 2>&1 || { tail -30 "$CACHE/convert-$s.log"; exit 1; }
    mv "$d.f16.gguf.tmp" "$d.f16.gguf"
  fi
done

# Prompts of ordinary text with an exact token count: encode a repeated passage, keep N tokens,
# decode, and check that the text re-encodes to exactly N tokens (seedance's prompt_tokens is
# checked too): PROMPT has 512 (prefill, decode), BPROMPT BATCH_NPP (batched decode).
prompt_of() {
  python3 - "$1" <<'EOF'
import sys
from tokenizers import Tokenizer
want = int(sys.argv[1])
t = Tokenizer.from_file("assets/synthetic/tokenizer.json")
base = ("Once upon a time there was a small model that lived on a CPU. It read its weights from "
        "a file, multiplied matrices all day, and wrote one token at a time. The quick brown fox "
        "jumps over the lazy dog. Hello, world! How are you today? I am fine, thank you. ")
for n in range(want, want - 32, -1):
    text = t.decode(t.encode(base * 40).ids[:n])
    if len(t.encode(text).ids) == want:
        break
assert len(t.encode(text).ids) == want, f"could not build a {want}-token prompt"
print(text, end="")
EOF
}
PROMPT=$(prompt_of 512)
BPROMPT=$(prompt_of "$BATCH_NPP")

# --- the machine ------------------------------------------------------------------------------
cc -O3 -march=native -pthread perf/readbw.c -o "$CACHE/readbw"
CPU_MODEL=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)
CPU_FLAGS=$(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' |
  grep -xE 'avx2|fma|f16c|avx512f|avx512bw|avx512vl|avx512_vnni|avx512_bf16|avx512_fp16|avx_vnni|amx_bf16|amx_int8|amx_tile' |
  tr '\n' ' ')
log "read bandwidth"
# "median best" (GB/s) of each; the decode share is of the THREADS-thread median.
read -r BW1 BW1_BEST < <("${PIN[@]}" "$CACHE/readbw" 1)
read -r BWN BWN_BEST < <("${PIN[@]}" "$CACHE/readbw" "$THREADS")

# --- alternating runs --------------------------------------------------------------------------
LOAD_BEFORE=$(uptime)
log "load before: $LOAD_BEFORE"
RES=$(mktemp)
trap 'rm -f "$RES"' EXIT
for r in $(seq "$ROUNDS"); do
  for s in "${SHAPES[@]}"; do
    d=$CACHE/ckpt-$s-seed$SEED
    log "round $r/$ROUNDS"
    bench_round "$s" "$d.f16.gguf" "$d" "$THREADS"
    [ "$DO_BATCHED" = 0 ] || batched_round "$s" "$d.f16.gguf" "$d" "$THREADS"
  done
done
LOAD_AFTER=$(uptime)

# --- table -------------------------------------------------------------------------------------
echo
echo "seedance $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src || echo '+uncommitted src changes') CPU vs llama.cpp $(awk '$1 == "meta" {c=$3} END {print c}' "$RES") (llama-cpp-python $VER sdist) — F16, $THREADS threads, nproc $(nproc)"
echo "CPU: $CPU_MODEL; flags: $CPU_FLAGS"
echo "read bandwidth (perf/readbw.c: 1 GiB, 1 and 8 streams per thread, 9 passes each; median of the better, best pass): $BW1 GB/s (best $BW1_BEST) on 1 thread, $BWN GB/s (best $BWN_BEST) on $THREADS"
echo "medians of ROUNDS=$ROUNDS alternating rounds x REPS=$REPS (llama-bench -r $REPS; $REPS seedance generate runs)"
WBYTES=()
for s in "${SHAPES[@]}"; do
  WBYTES+=("$s=$(cat "$CACHE/ckpt-$s-seed$SEED"/*.safetensors | wc -c)")
done
python3 - "$RES" "$BWN" "$BATCH_NPP" "${WBYTES[@]}" <<'EOF'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
bw, npp = float(sys.argv[2]), sys.argv[3]
shapes = [a.split("=")[0] for a in sys.argv[4:]]
wbytes = {a.split("=")[0]: int(a.split("=")[1]) for a in sys.argv[4:]}
def med(s, who, k):
    v = [float(r[3]) for r in rows if r[0] == s and r[1] == who and r[2] == k]
    return (statistics.median(v), len(v), min(v), max(v)) if v else (float("nan"), 0, 0, 0)
print("| shape | llama.cpp pp512 t/s | seedance prefill-512 t/s | ratio | llama.cpp tg128 t/s | seedance decode t/s | ratio | llama.cpp GB/s (of read bw) | seedance GB/s (of read bw) |")
print("|---|---|---|---|---|---|---|---|---|")
for s in shapes:
    lp, sp, lt, st = (med(s, w, k) for w, k in
                      (("llama", "pp"), ("seedance", "pp"), ("llama", "tg"), ("seedance", "tg")))
    lg, sg = lt[0] * wbytes[s] / 1e9, st[0] * wbytes[s] / 1e9
    print(f"| {s} | {lp[0]:.1f} | {sp[0]:.1f} | {sp[0]/lp[0]:.2f}x | {lt[0]:.2f} | {st[0]:.2f} | {st[0]/lt[0]:.2f}x "
          f"| {lg:.1f} ({lg/bw:.0%}) | {sg:.1f} ({sg/bw:.0%}) |")
print(f"(GB/s = weight bytes x decode tokens/s; weights {', '.join(f'{s} {wbytes[s]/1e9:.3f} GB' for s in shapes)})")
if any(r[2] in ("b1", "b8") for r in rows):
    print()
    print(f"batched decode after a {npp}-token prompt per sequence, 128 tokens each (tokens/s of all sequences together):")
    print("| shape | llama-batched-bench B=1 | seedance B=1 | llama-batched-bench B=8 | seedance B=8 | seedance B=8 / llama B=8 | seedance B=8 / B=1 | llama B=8 / B=1 |")
    print("|---|---|---|---|---|---|---|---|")
    for s in shapes:
        l1, s1, l8, s8 = (med(s, w, k)[0] for w, k in
                          (("llama", "b1"), ("seedance", "b1"), ("llama", "b8"), ("seedance", "b8")))
        print(f"| {s} | {l1:.2f} | {s1:.2f} | {l8:.2f} | {s8:.2f} | {s8/l8:.2f}x | {s8/s1:.2f}x | {l8/l1:.2f}x |")
print()
print("samples (n, min-max):")
kinds = sorted({r[2] for r in rows if r[0] in shapes})
for s in shapes:
    for k in kinds:
        for w in ("llama", "seedance"):
            m, n, lo, hi = med(s, w, k)
            if n:
                print(f"  {s:14} {w:9} {k}: n={n} median {m:.2f}  [{lo:.2f} - {hi:.2f}]")
EOF
echo "load before: $LOAD_BEFORE"
echo "load after:  $LOAD_AFTER"
