# Sourced by perf/llamacpp_compare.sh and perf/gguf_compare.sh: llama.cpp as vendored by the
# llama-cpp-python sdist from PyPI (version $VER), extracted under $CACHE and built once
# (CPU only, GGML_NATIVE, Release): sets LLAMA (the source tree), BUILD and BENCH (llama-bench).
# Needs: CACHE, VER, log(); cmake and ninja on PATH.
SRC=$CACHE/llama_cpp_python-$VER
LLAMA=$SRC/vendor/llama.cpp
BUILD=$CACHE/build
BENCH=$BUILD/bin/llama-bench
if [ ! -f "$LLAMA/convert_hf_to_gguf.py" ]; then
  log "pip download llama-cpp-python==$VER (sdist)"
  # --no-binary for this package only: with ':all:' pip would also build its build
  # dependencies (cmake, ninja) from source just to read the sdist's metadata.
  python3 -m pip download -q --no-binary llama-cpp-python --no-deps \
    "llama-cpp-python==$VER" -d "$CACHE"
  tar -xzf "$CACHE/llama_cpp_python-$VER.tar.gz" -C "$CACHE"
fi
if [ ! -x "$BENCH" ] || [ "$(cat "$BUILD/.version" 2>/dev/null)" != "$VER" ]; then
  rm -rf "$BUILD"
  log "building llama-bench (a few minutes on 2 cores)"
  cmake -S "$LLAMA" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON -DGGML_CUDA=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
    >"$CACHE/cmake-$VER.log" 2>&1 || { tail -20 "$CACHE/cmake-$VER.log"; exit 1; }
  cmake --build "$BUILD" --target llama-bench -j "$(nproc)" \
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
