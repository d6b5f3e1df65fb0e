#!/usr/bin/env bash
# The decoder training-step benchmark on the CPU (issue 12's goals): rcx with the shared
# prefix, rcx on the K whole sequences, and PyTorch eager (transformers'
# LlamaForSequenceClassification on the K whole sequences), in the same run, on the same
# thread count, each in a fresh process (for its own peak memory); then the ratios.
# One prompt of 384 tokens, K = 8 completions of 64, a 4-layer Llama of hidden 512
# (scripts/bench_torch_decoder_cpu.py writes the model and the batch both sides read).
#
# Usage: scripts/bench-decoder-cpu.sh [--steps N] [--warmup N] [--threads N] [--rounds N]
# Needs a python with torch and transformers in $PYTHON (default python3).
set -euo pipefail

PYTHON="${PYTHON:-python3}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
STEPS=3
WARMUP=1
THREADS="$(nproc)"
ROUNDS=1
while [ $# -gt 0 ]; do
    case "$1" in
        --steps) STEPS="$2"; shift 2 ;;
        --warmup) WARMUP="$2"; shift 2 ;;
        --threads) THREADS="$2"; shift 2 ;;
        --rounds) ROUNDS="$2"; shift 2 ;;
        *) echo "bench-decoder-cpu: unknown argument '$1'" >&2; exit 2 ;;
    esac
done

cd "$ROOT"
FOLDER=target/bench-decoder
if [ ! -s "$FOLDER/bench_batch.json" ]; then
    rm -rf "$FOLDER.tmp"
    "$PYTHON" scripts/bench_torch_decoder_cpu.py --write-folder "$FOLDER.tmp"
    rm -rf "$FOLDER" && mv "$FOLDER.tmp" "$FOLDER"
fi
cargo bench --bench decoder_step --no-run -q 2>/dev/null || cargo bench --bench decoder_step --no-run
RESULTS="$(mktemp)"
trap 'rm -f "$RESULTS"' EXIT

for round in $(seq "$ROUNDS"); do
    for config in shared full; do
        echo "bench-decoder-cpu: round $round: rcx $config" >&2
        RAYON_NUM_THREADS="$THREADS" cargo bench -q --bench decoder_step -- --folder "$FOLDER" \
            --config "$config" --steps "$STEPS" --warmup "$WARMUP" | grep '^RESULT' | tee -a "$RESULTS" >&2
    done
    echo "bench-decoder-cpu: round $round: torch" >&2
    OMP_NUM_THREADS="$THREADS" "$PYTHON" scripts/bench_torch_decoder_cpu.py --folder "$FOLDER" \
        --threads "$THREADS" --steps "$STEPS" --warmup "$WARMUP" 2>/dev/null \
        | grep '^RESULT' | tee -a "$RESULTS" >&2
done

"$PYTHON" - "$RESULTS" <<'PY'
import statistics, sys
rows = [dict(kv.split("=", 1) for kv in line.split()[1:]) for line in open(sys.argv[1])]
def pick(impl, config, key):
    return statistics.median(float(r[key]) for r in rows if r["impl"] == impl and r["config"] == config)
shared, full, torch = (pick("rcx", "shared", "median_ms"), pick("rcx", "full", "median_ms"),
                       pick("torch", "full", "median_ms"))
print(f"threads: {rows[0]['threads']}; median over {rows[0]['steps']} steps per run; "
      f"rounds: {len(rows) // 3}")
print("| run | token rows | ms/step | peak MiB | first loss |")
print("|---|---|---|---|---|")
for impl, config, name in [("rcx", "shared", "rcx, shared prefix"), ("rcx", "full", "rcx, whole sequences"),
                           ("torch", "full", "PyTorch eager, whole sequences")]:
    r = next(r for r in rows if r["impl"] == impl and r["config"] == config)
    print(f"| {name} | {r['rows']} | {pick(impl, config, 'median_ms'):.0f} | "
          f"{pick(impl, config, 'peak_mib'):.0f} | {r['first_loss']} |")
print(f"\nshared / whole (rcx): {shared / full:.3f} (goal <= 0.45); "
      f"shared / PyTorch: {shared / torch:.3f} (goal <= 0.5)")
PY
