# Sourced by perf/llamacpp_compare.sh and perf/gguf_compare.sh: llama.cpp as vendored by the
# llama-cpp-python sdist from PyPI (version $VER), extracted under $CACHE and built once
# (CPU only, GGML_NATIVE, Release): sets LLAMA (the source tree), BUILD, BENCH (llama-bench) and
# BATCHED (llama-batched-bench).
# Needs: CACHE, VER, log(); cmake and ninja on PATH.
SRC=$CACHE/llama_cpp_python-$VER
LLAMA=$SRC/vendor/llama.cpp
BUILD=$CACHE/build
BENCH=$BUILD/bin/llama-bench
BATCHED=$BUILD/bin/llama-batched-bench
if [ ! -f "$LLAMA/convert_hf_to_gguf.py" ]; then
  log "pip download llama-cpp-python==$VER (sdist)"
  # --no-binary for this package only: with ':all:' pip would also build its build
  # dependencies (cmake, ninja) from source just to read the sdist's metadata.
  python3 -m pip download -q --no-binary llama-cpp-python --no-deps \
    "llama-cpp-python==$VER" -d "$CACHE"
  tar -xzf "$CACHE/llama_cpp_python-$VER.tar.gz" -C "$CACHE"
fi
if [ ! -x "$BENCH" ] || [ ! -x "$BATCHED" ] || [ "$(cat "$BUILD/.version" 2>/dev/null)" != "$VER" ]; then
  rm -rf "$BUILD"
  log "building llama-bench and llama-batched-bench (a few minutes on 2 cores)"
  cmake -S "$LLAMA" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON -DGGML_CUDA=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
    >"$CACHE/cmake-$VER.log" 2>&1 || { tail -20 "$CACHE/cmake-$VER.log"; exit 1; }
  cmake --build "$BUILD" --target llama-bench llama-batched-bench -j "$(nproc)" \
    >"$CACHE/build-$VER.log" 2>&1 || { tail -40 "$CACHE/build-$VER.log"; exit 1; }
  echo "$VER" >"$BUILD/.version"
fi

# One round of the side-by-side: llama-bench on GGUF file $2 (REPS repetitions each: pp512 from an
# empty context, then tg128 after a 512-token context, `-d 512`, the context seedance decodes
# in), then REPS runs of `seedance-server generate` on model $3 (512-token prompt, 128 generated
# tokens), all pinned with PIN; each result line (tagged $1) appended to $RES via
# perf/bench_parse.py.
# Usage: bench_round LABEL GGUF SEEDANCE_MODEL THREADS. Needs: BENCH, SEEDANCE, PROMPT, REPS, RES,
# PIN (an array, may be empty), log().
bench_round() {
  local label=$1 gguf=$2 model=$3 threads=$4
  log "$label: llama-bench -t $threads -p 512 -n 0, then -p 0 -n 128 -d 512, -r $REPS"
  "${PIN[@]}" "$BENCH" -m "$gguf" -t "$threads" -p 512 -n 0 -r "$REPS" -o json 2>/dev/null |
    python3 perf/bench_parse.py llama "$label" >>"$RES"
  "${PIN[@]}" "$BENCH" -m "$gguf" -t "$threads" -p 0 -n 128 -d 512 -r "$REPS" -o json 2>/dev/null |
    python3 perf/bench_parse.py llama "$label" >>"$RES"
  for _ in $(seq "$REPS"); do
    log "$label: seedance generate (512-token prompt, 128 tokens)"
    "${PIN[@]}" "$SEEDANCE" generate --model "$model" --prompt "$PROMPT" --max-tokens 128 \
      --ignore-eos --ids 2>&1 >/dev/null | python3 perf/bench_parse.py seedance "$label" >>"$RES"
  done
}

# One round of batched decode: `llama-batched-bench -npp BATCH_NPP -ntg 128 -npl 1,8` on GGUF
# file $2 (each of the B sequences its own prompt, then 128 decode steps over all B), then
# `seedance-server generate --parallel 1` and `--parallel 8` on model $3 with BPROMPT (BATCH_NPP
# tokens); result lines "LABEL llama|seedance b1|b8 <t/s>" appended to $RES.
# Usage: batched_round LABEL GGUF SEEDANCE_MODEL THREADS. Needs: BATCHED, SEEDANCE, BPROMPT,
# BATCH_NPP, RES, PIN (an array, may be empty), log().
batched_round() {
  local label=$1 gguf=$2 model=$3 threads=$4 b
  log "$label: llama-batched-bench -npp $BATCH_NPP -ntg 128 -npl 1,8 -t $threads"
  "${PIN[@]}" "$BATCHED" -m "$gguf" -t "$threads" -c $((8 * (BATCH_NPP + 128) + 64)) -b 2048 \
    -ub 512 -npp "$BATCH_NPP" -ntg 128 -npl 1,8 --output-format jsonl 2>/dev/null |
    python3 perf/bench_parse.py batched "$label" >>"$RES"
  for b in 1 8; do
    log "$label: seedance generate --parallel $b ($BATCH_NPP-token prompt, 128 tokens each)"
    "${PIN[@]}" "$SEEDANCE" generate --model "$model" --prompt "$BPROMPT" --max-tokens 128 \
      --parallel "$b" 2>&1 >/dev/null | python3 perf/bench_parse.py parallel "$label" >>"$RES"
  done
}
