#!/usr/bin/env bash
# The CPU training-step benchmark: rcx (benches/train_step.rs, release build) and PyTorch
# eager (scripts/bench_torch_cpu.py) in the same run, on the same thread count, each
# configuration in a fresh process (for separate peak memory); then a comparison table.
#
# Usage: scripts/bench-cpu.sh [--steps N] [--warmup N] [--threads N] [--rounds N]
#   --threads  default: all cores (nproc)
#   --rounds   repeat the rcx/torch alternation N times (default 1), to see the spread
#              on a shared machine; the table takes the median of the rounds' medians
# Needs the MiniLM-L6 folder (scripts/fetch-minilm.sh) and a python with torch and
# transformers in $PYTHON (default python3).
set -euo pipefail

PYTHON="${PYTHON:-python3}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
STEPS=10
WARMUP=2
THREADS="$(nproc)"
ROUNDS=1
while [ $# -gt 0 ]; do
    case "$1" in
        --steps) STEPS="$2"; shift 2 ;;
        --warmup) WARMUP="$2"; shift 2 ;;
        --threads) THREADS="$2"; shift 2 ;;
        --rounds) ROUNDS="$2"; shift 2 ;;
        *) echo "bench-cpu: unknown argument '$1'" >&2; exit 2 ;;
    esac
done

cd "$ROOT"
[ -s .models/all-MiniLM-L6-v2/model.safetensors ] \
    || { echo "bench-cpu: no MiniLM-L6 folder: run scripts/fetch-minilm.sh" >&2; exit 2; }
cargo bench --bench train_step --no-run -q 2>/dev/null || cargo bench --bench train_step --no-run
RESULTS="$(mktemp)"
trap 'rm -f "$RESULTS"' EXIT

for round in $(seq "$ROUNDS"); do
    for config in all-pairs paper; do
        echo "bench-cpu: round $round, $config: rcx" >&2
        RAYON_NUM_THREADS="$THREADS" cargo bench -q --bench train_step -- \
            --config "$config" --steps "$STEPS" --warmup "$WARMUP" | grep '^RESULT' | tee -a "$RESULTS" >&2
        echo "bench-cpu: round $round, $config: torch" >&2
        OMP_NUM_THREADS="$THREADS" "$PYTHON" scripts/bench_torch_cpu.py \
            --config "$config" --threads "$THREADS" --steps "$STEPS" --warmup "$WARMUP" 2>/dev/null \
            | grep '^RESULT' | tee -a "$RESULTS" >&2
    done
done

"$PYTHON" - "$RESULTS" <<'PY'
import statistics, sys
rows = []
for line in open(sys.argv[1]):
    rows.append(dict(kv.split("=", 1) for kv in line.split()[1:]))
def pick(impl, config, key):
    vals = [float(r[key]) for r in rows if r["impl"] == impl and r["config"] == config]
    return statistics.median(vals), vals
threads = rows[0]["threads"]
print(f"threads: {threads}; median over {rows[0]['steps']} steps per run; "
      f"rounds: {len(rows) // 4}")
head = ("config", "seqs", "rcx ms/step", "torch ms/step", "ratio", "rcx CPU ms", "torch CPU ms",
        "rcx peak MiB", "torch peak MiB", "ratio")
print("| " + " | ".join(head) + " |")
print("|" + "|".join("---" for _ in head) + "|")
for config in ["all-pairs", "paper"]:
    seqs = next(r["seqs"] for r in rows if r["config"] == config)
    rt, rts = pick("rcx", config, "median_ms")
    tt, tts = pick("torch", config, "median_ms")
    rc, _ = pick("rcx", config, "cpu_ms")
    tc, _ = pick("torch", config, "cpu_ms")
    rm, _ = pick("rcx", config, "peak_mib")
    tm, _ = pick("torch", config, "peak_mib")
    spread = lambda v: "" if len(v) < 2 else f" ({min(v):.0f}-{max(v):.0f})"
    print(f"| {config} | {seqs} | {rt:.0f}{spread(rts)} | {tt:.0f}{spread(tts)} | {rt / tt:.2f} "
          f"| {rc:.0f} | {tc:.0f} | {rm:.0f} | {tm:.0f} | {rm / tm:.2f} |")
print()
print("per-run lines:")
for r in rows:
    print("  " + " ".join(f"{k}={v}" for k, v in r.items()))
PY
