#!/usr/bin/env bash
# The ONE prepared run on a lent GPU machine. It builds NOTHING: it runs what
# scripts/gpu-prepare.sh built elsewhere into gpu-bundle/ (carried along by the device tool):
#   1. nvidia-smi, and libcublas located among PyTorch's pip packages (LD_LIBRARY_PATH);
#   2. every GPU test executable with RCX_REQUIRE_GPU=1 (a skip is then a failure);
#   3. the kernel lab (each kernel vs its CPU twin, then GB/s or TFLOP/s vs copy and SGEMM);
#   4. the BERT-base training step bench, bf16 and f32 (all pairs vs pair-duplicated);
#   5. compute-sanitizer memcheck and racecheck on the flash attention tests (versions 2 and 3), when present;
#   6. the PyTorch baseline of the same step (scripts/bench_torch_gpu.py).
# Each part runs under `timeout` within one overall budget (RCX_GPU_BUDGET_S, 450 s by
# default, under the 8 minutes the issue allows), writes its full log under $OUT, and a short
# table comes last. Never touches the card's settings.
#
# Run with the device tool: run(command="bash scripts/gpu-check.sh", carry=["gpu-bundle"]).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${OUT:-$ROOT/gpu-out}
mkdir -p "$OUT"
BUNDLE=$ROOT/gpu-bundle
# gpu-prepare.sh packs the executables into one gzipped tar: unpack it outside the tree.
if [ -f "$BUNDLE/payload.tar.gz" ]; then
    UNPACKED=$(mktemp -d)
    tar -xzf "$BUNDLE/payload.tar.gz" -C "$UNPACKED" || { echo "gpu-check: cannot unpack the bundle" >&2; exit 2; }
    BUNDLE=$UNPACKED
fi
PYTHON=${PYTHON:-python3}
BUDGET=${RCX_GPU_BUDGET_S:-450}
START=$(date +%s)
ROWS=()

if [ ! -x "$BUNDLE/tests/cuda_model" ]; then
    echo "gpu-check: $BUNDLE is missing or incomplete: run scripts/gpu-prepare.sh on the build machine and carry gpu-bundle" >&2
    exit 2
fi
cp "$BUNDLE/MANIFEST" "$OUT/MANIFEST"

elapsed() { echo $(($(date +%s) - START)); }

# run_part NAME LIMIT_S COMMAND...: runs under timeout (capped by what is left of the
# budget), log in $OUT/NAME.log, one table row.
run_part() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - $(elapsed)))
    if [ "$left" -lt "$limit" ]; then limit=$left; fi
    if [ "$limit" -lt 15 ]; then
        ROWS+=("$(printf '%-22s %-10s %6s  %s' "$name" SKIPPED - "budget spent")")
        return
    fi
    echo "=== $name (limit ${limit}s) ==="
    local t0 rc status
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    case $rc in
        0) status=PASS ;;
        124 | 137) status=TIMEOUT ;;
        *) status="FAIL($rc)" ;;
    esac
    tail -n 25 "$OUT/$name.log"
    ROWS+=("$(printf '%-22s %-10s %5ss  %s' "$name" "$status" $(($(date +%s) - t0)) "$(summary "$name")")")
}

# One line of what a part found.
summary() {
    local log=$OUT/$1.log
    case $1 in
        test-*) grep -h "test result:" "$log" | tail -1 | cut -c1-70 ;;
        kernel-lab) grep -h "^ceilings:\|^FAILED" "$log" | head -2 | tr '\n' ' ' | cut -c1-90 ;;
        gpu-step) grep -h "^rcx [a-z0-9]* step:" "$log" | sed 's/^rcx //; s/ step:/:/' | tr '\n' ' ' | cut -c1-120 ;;
        torch) grep -h '"torch_gpu_step_summary"' "$log" | tail -1 | cut -c1-120 ;;
        sanitize-*) grep -h "ERROR SUMMARY\|RACECHECK SUMMARY\|test result:" "$log" | tr '\n' ' ' | cut -c1-90 ;;
        *) tail -n 1 "$log" | cut -c1-80 ;;
    esac
}

echo "=== device ==="
nvidia-smi 2>&1 | tee "$OUT/nvidia-smi.txt" | head -20
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,power.draw,temperature.gpu \
    --format=csv 2>&1 | tee -a "$OUT/nvidia-smi.txt"

# cuBLAS comes with PyTorch's pip packages (nvidia-cublas-*); libcuda is the driver's.
CUBLAS=$("$PYTHON" - 2>/dev/null <<'PY'
import glob, os, site
roots = site.getsitepackages() + [site.getusersitepackages()]
for root in roots:
    hits = sorted(glob.glob(os.path.join(root, "nvidia", "**", "libcublas.so*"), recursive=True))
    if hits:
        print(hits[0])
        break
PY
)
if [ -z "$CUBLAS" ]; then
    # Not the emulated device's fake (tests/emu: target/tmp/fake-cuda-*/libcublas.so).
    CUBLAS=$(timeout 90 find / -xdev -name 'libcublas.so*' -not -path '*/fake-cuda-*' 2>/dev/null | head -1)
fi
if [ -n "$CUBLAS" ]; then
    export LD_LIBRARY_PATH="$(dirname "$CUBLAS")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    echo "cuBLAS: $CUBLAS"
else
    echo "cuBLAS: NOT FOUND (matmul tests will fail)"
fi
{ echo "cublas=$CUBLAS"; echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"; } >"$OUT/env.txt"

# Test executables look for the build tree (env!("CARGO_MANIFEST_DIR")); point it here.
BUILT_AT=$(cat "$BUNDLE/MANIFEST_DIR")
if [ ! -e "$BUILT_AT" ]; then
    mkdir -p "$(dirname "$BUILT_AT")" 2>/dev/null && ln -s "$ROOT" "$BUILT_AT" 2>/dev/null ||
        echo "note: could not link $BUILT_AT to $ROOT; RCX_ROOT covers tests/cuda_model only"
fi
export RCX_ROOT=$ROOT RCX_REQUIRE_GPU=1 RCX_REQUIRE_CUDA=1

run_part smoke-rcx 20 "$BUNDLE/rcx" --help
for exe in "$BUNDLE"/tests/*; do
    run_part "test-$(basename "$exe")" 150 "$exe"
done
run_part kernel-lab 150 "$BUNDLE/benches/kernels" --bench
run_part gpu-step 150 "$BUNDLE/benches/gpu_step" --bench
# What the CPU emulator cannot see: out-of-bounds device accesses and shared-memory races of
# the flash attention kernels on real hardware (compute-sanitizer works on some of the
# lent machines' runtimes, not all: KINDS.md). Short caps; a timeout here says only that
# the tool is slow, not that a kernel is wrong.
if command -v compute-sanitizer >/dev/null; then
    run_part sanitize-memcheck 40 compute-sanitizer --tool memcheck --error-exitcode 9 \
        "$BUNDLE/tests/cuda_kernels" flash_attention
    run_part sanitize-racecheck 40 compute-sanitizer --tool racecheck --error-exitcode 9 \
        "$BUNDLE/tests/cuda_kernels" flash_attention
else
    ROWS+=("$(printf '%-22s %-10s %6s  %s' sanitize SKIPPED - "no compute-sanitizer on PATH")")
fi
# PyTorch gets what is left; it stops starting new modes 30 s before its limit.
TORCH_LIMIT=$((BUDGET - $(elapsed)))
run_part torch "$TORCH_LIMIT" "$PYTHON" scripts/bench_torch_gpu.py --budget-s $((TORCH_LIMIT - 60))

echo
echo "=== numbers ==="
grep -h "^copy 1 GiB\|err " "$OUT/kernel-lab.log" 2>/dev/null | cut -c1-130
grep -h '^{"bench": "rcx_gpu_step"' "$OUT/gpu-step.log" 2>/dev/null
grep -h '"median_ms"\|"error"\|"skipped"' "$OUT/torch.log" 2>/dev/null | grep -v summary | cut -c1-200
echo
echo "=== gpu-check summary ($(elapsed)s of ${BUDGET}s; logs in \$OUT) ==="
printf '%-22s %-10s %6s  %s\n' part status time summary
for row in "${ROWS[@]}"; do echo "$row"; done
