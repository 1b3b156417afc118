#!/usr/bin/env bash
# Fetches llama.cpp's vocabulary-only GGUF files of real tokenizers, each with its test texts
# (`.inp`) and the ids Hugging Face's tokenizer gives them (`.out`): Llama 2 (SentencePiece),
# Phi-3 (SentencePiece), Llama 3, Qwen2 and GPT-2 (byte-level BPE). They ship on PyPI in the
# llama-cpp-python 0.3.36 sdist (its vendored llama.cpp/models); this downloads that sdist with
# pip (no other network access), checks its SHA-256 and unpacks those 15 files (~20 MB) into
# the cache: $SEEDANCE_CACHE_DIR/llama-vocabs, else $XDG_CACHE_HOME/seedance/llama-vocabs, else
# ~/.cache/seedance/llama-vocabs. Does nothing when they are there.
# `scripts/fetch_vocabs.sh --path` prints the directory (fetching nothing). Read by
# tests/gguf_vocab.rs through SEEDANCE_TEST_VOCABS.
set -euo pipefail
VER=0.3.36
SDIST=llama_cpp_python-$VER.tar.gz
SDIST_SHA=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
NAMES=(llama-spm phi-3 llama-bpe qwen2 gpt-2)
if [[ -n ${SEEDANCE_CACHE_DIR:-} ]]; then
    DIR=$SEEDANCE_CACHE_DIR/llama-vocabs
elif [[ -n ${XDG_CACHE_HOME:-} ]]; then
    DIR=$XDG_CACHE_HOME/seedance/llama-vocabs
else
    DIR=$HOME/.cache/seedance/llama-vocabs
fi
if [[ ${1:-} == --path ]]; then
    echo "$DIR"
    exit 0
fi
if [[ -f $DIR/.version ]] && [[ $(cat "$DIR/.version") == "$VER" ]]; then
    echo "tokenizer vocabularies: $DIR (already there)"
    exit 0
fi
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
# --no-binary for this package only (the sdist is what holds the files); --no-deps: nothing else.
python3 -m pip download -q --no-deps --disable-pip-version-check --no-binary llama-cpp-python \
    "llama-cpp-python==$VER" -d "$TMP"
echo "$SDIST_SHA  $TMP/$SDIST" | sha256sum -c --status || { echo "fetch_vocabs.sh: $SDIST has an unexpected SHA-256" >&2; exit 1; }
members=()
for n in "${NAMES[@]}"; do
    for ext in gguf gguf.inp gguf.out; do
        members+=("llama_cpp_python-$VER/vendor/llama.cpp/models/ggml-vocab-$n.$ext")
    done
done
tar -xzf "$TMP/$SDIST" -C "$TMP" "${members[@]}"
mkdir -p "$DIR"
mv "$TMP/llama_cpp_python-$VER/vendor/llama.cpp/models/"ggml-vocab-* "$DIR/"
echo "$VER" >"$DIR/.version"
echo "tokenizer vocabularies: $DIR"
