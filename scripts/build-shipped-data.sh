#!/usr/bin/env bash
# Rebuilds data/kjv-jargon/{train,eval}.jsonl from the Debian packages jargon-text,
# bible-kjv-text and bible-kjv (public domain texts; see data/README.md).
# Needs root on Debian 12 (apt-get), cargo (or RCX=path/to/rcx) and $PYTHON (python3).
# usage: scripts/build-shipped-data.sh [SEED]   (default seed 42)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
SEED=${1:-42}
OUT="$ROOT/data/kjv-jargon"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

if [ -z "${RCX:-}" ]; then
    cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml"
    RCX="$ROOT/target/release/rcx"
fi
RCX=$(realpath "$RCX")

cd "$WORK"
apt-get update -qq
# The reader program links against readline, absent from minimal images.
dpkg -s libreadline8 >/dev/null 2>&1 || apt-get install -y -qq --no-install-recommends libreadline8
# apt's sandbox user must be able to write here.
chmod 777 "$WORK"
apt-get download jargon-text bible-kjv-text bible-kjv
for deb in *.deb; do
    echo "source: $(dpkg-deb -f "$deb" Package) $(dpkg-deb -f "$deb" Version)" >&2
    dpkg -x "$deb" unpacked
done

./unpacked/usr/bin/bible -p "$WORK/unpacked/usr/lib" -f -l100000 Gen1:1-Rev22:21 > kjv.txt
verses=$(wc -l < kjv.txt)
if [ "$verses" -ne 31102 ]; then
    echo "expected 31102 KJV verses, the reader printed $verses" >&2
    exit 1
fi

"$PYTHON" "$ROOT/scripts/extract_sources.py" \
    unpacked/usr/share/doc/jargon-text/jargon.txt.gz kjv.txt longform.jsonl
"$RCX" data longform --input longform.jsonl --output rankings.jsonl --seed "$SEED"

# The last 10% of the prompts (at least 150) are the eval split.
total=$(wc -l < rankings.jsonl)
eval_count=$(( (total + 9) / 10 ))
[ "$eval_count" -ge 150 ] || eval_count=150
mkdir -p "$OUT"
# Written beside the targets, then renamed: never a half-written split.
head -n $(( total - eval_count )) rankings.jsonl > "$OUT/.train.jsonl.tmp"
tail -n "$eval_count" rankings.jsonl > "$OUT/.eval.jsonl.tmp"
mv "$OUT/.train.jsonl.tmp" "$OUT/train.jsonl"
mv "$OUT/.eval.jsonl.tmp" "$OUT/eval.jsonl"
echo "$OUT: $(( total - eval_count )) train + $eval_count eval prompts" >&2
