#!/usr/bin/env bash
# Checks scripts/gpu-check.sh's flow on a machine WITHOUT a GPU, since the real run gets one
# shot: a fake repository under /tmp holds a copy of the script, a fake gpu-bundle/ whose
# executables speak libtest's command line and print what the real ones print
# (scripts/gpu-check-fakes.py), a fake nvidia-smi and compute-sanitizer, and fake driver and
# cuBLAS libraries (copies of a real shared object, so that dlopen and the loader's log
# behave as with the real ones). Each scenario asserts the exit code, the two files in $OUT,
# the summary's rows and what reached stdout. Needs python3 and about 90 s.
#
#   bash scripts/gpu-check-selftest.sh            # every scenario
#   bash scripts/gpu-check-selftest.sh healthy    # one, by name
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$(pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-selftest.XXXXXX")
# GPU_SELFTEST_KEEP=1 keeps the fixture and every scenario's stdout and $OUT, to read them.
if [ "${GPU_SELFTEST_KEEP:-}" = 1 ]; then
    trap 'echo "gpu-check-selftest: kept $WORK"' EXIT
else
    trap 'rm -rf "$WORK"' EXIT
fi
FAILURES=0

fail() {
    echo "  FAIL: $*"
    FAILURES=$((FAILURES + 1))
}

# --- the fixture: a fake repository with the script under test -------------------------
REPO=$WORK/repo
mkdir -p "$REPO/scripts" "$WORK/bin-gpu" "$WORK/bin-nosanitizer" "$WORK/driver/stubs" "$WORK/cublas" \
    "$WORK/site/nvidia/nccl/lib" "$REPO/data/kjv-jargon"
# The shipped data set, as rcx finds it through RCX_DATA_DIR.
touch "$REPO/data/kjv-jargon/train.jsonl" "$REPO/data/kjv-jargon/eval.jsonl"
cp scripts/gpu-check.sh "$REPO/scripts/gpu-check.sh"
FAKES=$ROOT/scripts/gpu-check-fakes.py
printf 'import subprocess, sys\nsys.exit(subprocess.call([sys.executable, "%s", "torch"] + sys.argv[1:]))\n' \
    "$FAKES" >"$REPO/scripts/bench_torch_gpu.py"

# A real shared object under the driver's and cuBLAS's names: the loader opens it for real.
SO=""
for candidate in $(ldconfig -p 2>/dev/null | awk '$1 == "libz.so.1" {print $NF}') \
    /lib/x86_64-linux-gnu/libz.so.1 /usr/lib/x86_64-linux-gnu/libz.so.1 /usr/lib64/libz.so.1 /lib64/libz.so.1; do
    if [ -f "$candidate" ]; then
        SO=$candidate
        break
    fi
done
[ -n "$SO" ] || { echo "gpu-check-selftest: no libz.so.1 to stand in for the CUDA libraries" >&2; exit 1; }
cp "$SO" "$WORK/driver/libcuda.so.580.159.04"
ln -s libcuda.so.580.159.04 "$WORK/driver/libcuda.so.1"
# The toolkit's stub (some images add the .so.1 name for linking): must never be picked.
cp "$SO" "$WORK/driver/stubs/libcuda.so"
ln -s libcuda.so "$WORK/driver/stubs/libcuda.so.1"
cp "$SO" "$WORK/driver/libnvidia-ptxjitcompiler.so.580.159.04"
ln -s libnvidia-ptxjitcompiler.so.580.159.04 "$WORK/driver/libnvidia-ptxjitcompiler.so.1"
for lib in libcublas.so.12.9.1.4 libcublasLt.so.12.9.1.4 libcublas.so.13.1.0.3 libcublasLt.so.13.1.0.3; do
    cp "$SO" "$WORK/cublas/$lib"
done
# NCCL as PyTorch's nvidia-nccl wheel lays it out: libnccl.so.2 alone.
cp "$SO" "$WORK/site/nvidia/nccl/lib/libnccl.so.2"
for major in 12 13; do
    ln -s "$(cd "$WORK/cublas" && ls libcublas.so.$major.*)" "$WORK/cublas/libcublas.so.$major"
    ln -s "$(cd "$WORK/cublas" && ls libcublasLt.so.$major.*)" "$WORK/cublas/libcublasLt.so.$major"
done

for tool in nvidia-smi compute-sanitizer; do
    printf '#!/bin/sh\nexec python3 %s %s "$@"\n' "$FAKES" "$tool" >"$WORK/bin-gpu/$tool"
done
cp "$WORK/bin-gpu/nvidia-smi" "$WORK/bin-nosanitizer/nvidia-smi"
chmod +x "$WORK"/bin-*/* "$REPO/scripts/bench_torch_gpu.py"

# The bundle as gpu-prepare.sh lays it out: payload.tar.gz and MANIFEST.
make_bundle() {
    local payload=$WORK/payload
    rm -rf "$payload" "$REPO/gpu-bundle"
    mkdir -p "$payload/tests" "$payload/benches" "$REPO/gpu-bundle"
    for exe in rcx tests/cuda_kernels tests/cuda_model benches/kernels benches/gpu_step; do
        printf '#!/bin/sh\nexec python3 %s %s "$@"\n' "$FAKES" "$(basename "$exe")" >"$payload/$exe"
        chmod +x "$payload/$exe"
    done
    {
        echo "commit 0123456789abcdef0123456789abcdef01234567"
        echo "built 2026-12-03T09:00:00Z on selftest"
        echo "nvcc: Build cuda_13.0.r13.0/compiler.36424714_0"
        echo "cuda 13.0"
    } >"$payload/MANIFEST"
    (cd "$payload" && find . -type f ! -name MANIFEST -exec sha256sum {} + | sort -k2) >>"$payload/MANIFEST"
    echo "$WORK/nowhere/rcx" >"$payload/MANIFEST_DIR"
    tar -C "$payload" -czf "$REPO/gpu-bundle/payload.tar.gz" .
    cp "$payload/MANIFEST" "$REPO/gpu-bundle/MANIFEST"
}

# run_check NAME BIN-DIR [VAR=VALUE...]: runs the script in the fake repo with a fresh $OUT,
# under a hard 150 s cap (a hang is a failure, not a stuck selftest). Sets RUN, RC, STDOUT,
# SUMMARY, ELAPSED.
run_check() {
    local name=$1 bin=$2
    RUN=$name
    shift 2
    OUTDIR=$WORK/out-$name
    MARKS=$WORK/marks-$name
    rm -rf "$OUTDIR" "$MARKS"
    mkdir -p "$OUTDIR" "$MARKS"
    local t0
    t0=$(date +%s)
    env OUT="$OUTDIR" FAKE_MARKS="$MARKS" PATH="$WORK/$bin:$PATH" \
        RCX_GPU_LIB_DIRS="$WORK/driver/stubs:$WORK/driver:$WORK/cublas:$WORK/site/nvidia/nccl/lib" "$@" \
        timeout --kill-after=5 150 bash "$REPO/scripts/gpu-check.sh" >"$WORK/stdout-$name" 2>"$WORK/stderr-$name"
    RC=$?
    ELAPSED=$(($(date +%s) - t0))
    STDOUT=$(cat "$WORK/stdout-$name")
    SUMMARY=$(cat "$OUTDIR/summary.txt" 2>/dev/null)
}

expect_rc() {
    [ "$RC" -eq "$1" ] || fail "exit code $RC, expected $1 ($2); stderr: $(tail -c 400 "$WORK/stderr-$RUN")"
}

# The device tool returns at most 8 files: exactly the archive and the summary, both readable.
expect_outputs() {
    local files
    files=$(cd "$OUTDIR" && find . -mindepth 1 | sed 's|^\./||' | sort | tr '\n' ' ')
    [ "$files" = "gpu-logs.tar.gz summary.txt " ] || fail "\$OUT holds '$files', expected the archive and the summary alone"
    tar -tzf "$OUTDIR/gpu-logs.tar.gz" >"$WORK/archive-$RUN" 2>/dev/null || fail "gpu-logs.tar.gz does not unpack"
    [ -s "$OUTDIR/summary.txt" ] || fail "summary.txt is empty or missing"
}

expect_in() { # WHAT TEXT PATTERN (extended regex, must match)
    grep -Eq -- "$3" <<<"$2" || fail "$1 lacks /$3/"
}

expect_not_in() {
    ! grep -Eq -- "$3" <<<"$2" || fail "$1 has /$3/: $(grep -Em1 -- "$3" <<<"$2")"
}

# The row of PART in the summary's table.
row() { grep -E "^$1 " <<<"$SUMMARY" | head -1; }

expect_row() { # PART STATUS-REGEX [DETAIL-REGEX]
    local r
    r=$(row "$1")
    [ -n "$r" ] || { fail "no row for $1 in the summary"; return; }
    grep -Eq "^$1 +$2( |$)" <<<"$r" || fail "row of $1 is '$r', expected status /$2/"
    [ -z "${3:-}" ] || grep -Eq -- "$3" <<<"$r" || fail "row of $1 is '$r', expected /$3/"
}

# The fakes log each run of a bundle executable in $MARKS/ran-NAME.
expect_one_thread() {
    local f
    for f in "$MARKS"/ran-cuda_kernels "$MARKS"/ran-cuda_model; do
        [ -f "$f" ] || { fail "$(basename "$f") never ran"; continue; }
        if grep -v -- '--list' "$f" | grep -vq -- '--test-threads=1'; then
            fail "$(basename "$f") ran without --test-threads=1: $(grep -v -- '--test-threads=1' "$f" | head -1)"
        fi
    done
}

scenario_healthy() {
    run_check "$NAME" bin-gpu FAKE_SANITIZER=unsupported
    expect_rc 0 "every part passes; the sanitizer is unsupported, a skip"
    expect_outputs
    expect_in summary "$SUMMARY" "driver 580\.159\.04"
    expect_in summary "$SUMMARY" "NVIDIA H200"
    expect_in summary "$SUMMARY" "CUDA 13\.0"
    expect_row test-cuda_kernels PASS "4 passed"
    expect_row test-cuda_model PASS "2 passed"
    expect_row sanitize-memcheck SKIPPED "[Nn]ot supported"
    expect_row sanitize-racecheck SKIPPED "[Nn]ot supported"
    expect_row kernel-lab PASS "ceilings"
    expect_row gpu-step PASS "bf16"
    expect_row gpu-step-deberta PASS "deberta bf16: 120\.0 ms \(median of 5\) deberta f32: 400\.0 ms"
    expect_row data-parallel SKIPPED "1 GPU"
    [ ! -f "$MARKS/ran-rcx-config" ] || fail "rcx trained on a machine with 1 GPU"
    expect_row torch PASS
    # The step bench runs twice: BERT and Llama, then DeBERTa alone.
    expect_in gpu_step-calls "$(cat "$MARKS/ran-gpu_step" 2>/dev/null)" "^--bench --models bert,llama$"
    expect_in gpu_step-calls "$(cat "$MARKS/ran-gpu_step" 2>/dev/null)" "^--bench --models deberta$"
    # rcx's time over PyTorch's wherever both measured (the fakes' numbers), none without.
    expect_in summary "$SUMMARY" "rcx/PyTorch bert-bf16: 0\.64 \(61\.0 / 95\.0 ms, bf16-eager\)"
    expect_in summary "$SUMMARY" "rcx/PyTorch llama-bf16-whole: 0\.76 \(305\.0 / 400\.0 ms, llama-bf16-eager\)"
    expect_in summary "$SUMMARY" "rcx/PyTorch deberta-bf16: 0\.80 \(120\.0 / 150\.0 ms, deberta-bf16-eager\)"
    expect_in summary "$SUMMARY" "rcx/PyTorch deberta-f32: 1\.25 \(400\.0 / 320\.0 ms, deberta-fp32-eager\)"
    expect_in summary "$SUMMARY" "^  rcx deberta bf16 step: 120\.0 ms"
    expect_not_in summary "$SUMMARY" "compile\)|llama-f32"
    # What the tests actually loaded: the driver's libcuda and the CUDA 13 cuBLAS, no stub.
    expect_in summary "$SUMMARY" "libcuda\.so[^ ]* -> [^ ]*/driver/libcuda\.so\.580\.159\.04"
    expect_in summary "$SUMMARY" "libcublas\.so[^ ]* -> [^ ]*/cublas/libcublas\.so\.13\.1\.0\.3"
    expect_not_in summary "$SUMMARY" "stubs/"
    expect_one_thread
    expect_in archive "$(cat "$WORK/archive-$NAME")" "test-cuda_kernels\.log"
    expect_in archive "$(cat "$WORK/archive-$NAME")" "kernel-lab\.log"
    expect_in archive "$(cat "$WORK/archive-$NAME")" "nvidia-smi\.txt"
    # stdout: result lines only; a passing test's body stays in the archive.
    expect_not_in stdout "$STDOUT" "lab noise|test cls_pool_matches_cpu \.\.\. ok|running [0-9]+ tests"
    expect_in stdout "$STDOUT" "^test-cuda_kernels +PASS"
    [ ${#STDOUT} -lt 6000 ] || fail "stdout is ${#STDOUT} characters; the tool keeps 12,000"
}

scenario_faults() {
    run_check "$NAME" bin-gpu FAKE_SANITIZER=error \
        FAKE_BEHAVIOUR="cuda_kernels:flash_attention_matches_cpu=poison,cuda_model:bf16_training_step_matches_cpu=fail"
    expect_rc 1 "parts failed"
    expect_outputs
    # The faulting test fails alone: the tests after it still pass (own context).
    expect_row test-cuda_kernels FAIL "3 passed, 1 failed.*flash_attention_matches_cpu"
    expect_row test-cuda_model FAIL "bf16_training_step_matches_cpu"
    expect_row sanitize-memcheck FAIL
    expect_in stdout "$STDOUT" "CUDA_ERROR_ILLEGAL_ADDRESS"
    expect_in stdout "$STDOUT" "loss differs"
    expect_in stdout "$STDOUT" "Invalid __global__ write"
    expect_not_in stdout "$STDOUT" "test cls_pool_matches_cpu \.\.\. ok"
    expect_one_thread
    [ ${#STDOUT} -lt 12000 ] || fail "stdout is ${#STDOUT} characters; the tool keeps 12,000"
}

scenario_hang() {
    run_check "$NAME" bin-gpu FAKE_SANITIZER=clean RCX_GPU_BUDGET_S=40 \
        FAKE_BEHAVIOUR="cuda_model:training_step_matches_cpu=hang"
    expect_rc 1 "a test hung"
    expect_outputs
    [ "$ELAPSED" -le 50 ] || fail "took ${ELAPSED}s with a 40 s budget"
    expect_row test-cuda_model TIMEOUT "training_step_matches_cpu"
    expect_row test-cuda_kernels PASS
    expect_in summary "$SUMMARY" "SKIPPED +.*budget"
}

scenario_old_driver() {
    run_check "$NAME" bin-gpu FAKE_DRIVER=550.54.15 FAKE_CUDA=12.4
    expect_rc 3 "the driver is too old for a CUDA 13.0 bundle"
    expect_outputs
    expect_in summary "$SUMMARY" "550\.54\.15.*580"
    expect_in stdout "$STDOUT" "550\.54\.15.*580"
    [ -z "$(ls "$MARKS")" ] || fail "bundle executables ran on a too-old driver: $(ls "$MARKS")"
}

# DeBERTa's step fails (its kernels' first GPU run): its own row fails, the other step
# part and PyTorch still run, and its ratios are absent.
scenario_deberta_fails() {
    run_check "$NAME" bin-gpu FAKE_SANITIZER=unsupported FAKE_BEHAVIOUR="gpu_step:deberta=fail"
    expect_rc 1 "the DeBERTa step failed"
    expect_outputs
    expect_row gpu-step PASS "bf16"
    expect_row gpu-step-deberta FAIL "gpu_step: error: .*CUDA_ERROR_ILLEGAL_ADDRESS.* in deberta's step"
    expect_row torch PASS
    expect_in stdout "$STDOUT" "gpu_step: error: .*CUDA_ERROR_ILLEGAL_ADDRESS"
    expect_in summary "$SUMMARY" "rcx/PyTorch bert-f32: 0\.63"
    expect_not_in summary "$SUMMARY" "rcx/PyTorch deberta"
}

# 2 GPUs: one process, 2 ranks and 2 ranks with ZeRO-1 train, each final model compared
# with the one process's; a failing rank, weights off by more than the tolerance and a
# machine without NCCL fail the row saying why.
scenario_data_parallel() {
    run_check "$NAME" bin-gpu FAKE_GPUS=2 RCX_GPU_PARTS="data-parallel"
    expect_rc 0 "the ranks train the one process's weights"
    expect_outputs
    expect_row data-parallel PASS "alone [0-9]+s ranks [0-9]+s zero1 [0-9]+s; .*ranks 3\.0e-06 zero1 3\.0e-06 \(tolerance 2e-5; a step moves 5\.0e-04\)"
    local calls configs
    calls=$(cat "$MARKS/ran-rcx" 2>/dev/null)
    configs=$(cat "$MARKS/ran-rcx-config" 2>/dev/null)
    expect_in rcx-calls "$calls" "^train [^ ]*/alone\.yml --quiet$"
    expect_in rcx-calls "$calls" "^train [^ ]*/ranks\.yml --quiet --nproc 2 --dist-timeout [0-9]+$"
    expect_in rcx-calls "$calls" "^train [^ ]*/zero1\.yml --quiet --nproc 2 --dist-timeout [0-9]+$"
    [ "$(grep -c "model_name=bert-tiny device=cuda zero_stage=0 max_steps=2" <<<"$configs")" = 2 ] ||
        fail "expected two bert-tiny runs without ZeRO: $configs"
    expect_in rcx-configs "$configs" "zero_stage=1"
    expect_in summary "$SUMMARY" "NCCL linked: libnccl\.so -> [^ ]*/nvidia/nccl/lib/libnccl\.so\.2"
    expect_in summary "$SUMMARY" "libnccl\.so -> [^ ]*/nvidia/nccl/lib/libnccl\.so\.2"
    expect_in summary "$SUMMARY" "^  data-parallel: zero1: model\.safetensors differs from the one process's by at most 3\.0e-06"
    expect_not_in summary "$SUMMARY" "WARN: loaded from outside"

    run_check "$NAME-1gpu" bin-gpu FAKE_GPUS=1 RCX_GPU_PARTS="data-parallel"
    expect_rc 0 "1 GPU is a skip"
    expect_row data-parallel SKIPPED "1 GPU"
    [ ! -f "$MARKS/ran-rcx-config" ] || fail "rcx trained on a machine with 1 GPU"

    run_check "$NAME-rank" bin-gpu FAKE_GPUS=2 RCX_GPU_PARTS="data-parallel" FAKE_BEHAVIOUR="rcx:rank1=fail"
    expect_rc 1 "a rank failed"
    expect_outputs
    expect_row data-parallel FAIL "the ranks run: exit 1; \[rank 1\] rcx: error: NCCL all-reduce"
    expect_in stdout "$STDOUT" "training on 2 processes failed"

    run_check "$NAME-drift" bin-gpu FAKE_GPUS=2 RCX_GPU_PARTS="data-parallel" FAKE_BEHAVIOUR="rcx:zero1=drift"
    expect_rc 1 "ZeRO-1's weights are off"
    expect_row data-parallel FAIL "the zero1 run's model\.safetensors differs by 1\.0e-03"

    run_check "$NAME-nonccl" bin-gpu FAKE_GPUS=2 RCX_GPU_PARTS="data-parallel" \
        RCX_GPU_LIB_DIRS="$WORK/driver:$WORK/cublas"
    expect_rc 1 "no NCCL"
    expect_row data-parallel FAIL "no libnccl\.so\.2"
    [ ! -f "$MARKS/ran-rcx-config" ] || fail "rcx trained without NCCL"
}

scenario_no_driver() {
    run_check "$NAME" bin-gpu FAKE_SMI=broken
    expect_rc 3 "nvidia-smi cannot reach a driver"
    expect_outputs
    expect_in summary "$SUMMARY" "nvidia-smi"
    [ -z "$(ls "$MARKS")" ] || fail "bundle executables ran without a driver"
}

scenario_no_bundle() {
    rm -rf "$REPO/gpu-bundle"
    run_check "$NAME" bin-gpu
    make_bundle
    expect_rc 2 "no bundle was carried"
    expect_outputs
    expect_in summary "$SUMMARY" "gpu-bundle.*gpu-prepare\.sh"
}

scenario_no_sanitizer() {
    run_check "$NAME" bin-nosanitizer
    expect_rc 0 "a missing sanitizer is a skip"
    expect_outputs
    expect_row sanitize SKIPPED "compute-sanitizer"
}

scenario_budget_too_big() {
    run_check "$NAME" bin-gpu RCX_GPU_BUDGET_S=700
    expect_rc 2 "a budget over the tool's limit is refused"
    expect_in summary "$SUMMARY" "RCX_GPU_BUDGET_S"
}

# A rerun of some parts only: the others are skipped, saying why; a wrong name is refused.
scenario_parts() {
    run_check "$NAME" bin-gpu FAKE_SANITIZER=clean RCX_GPU_PARTS="sanitize torch"
    expect_rc 0 "the parts asked for pass"
    expect_outputs
    expect_row tests SKIPPED "RCX_GPU_PARTS"
    expect_row sanitize-memcheck PASS "ERROR SUMMARY: 0 errors"
    expect_row sanitize-racecheck PASS "0 hazards"
    expect_row kernel-lab SKIPPED "RCX_GPU_PARTS"
    expect_row gpu-step-deberta SKIPPED "RCX_GPU_PARTS"
    expect_row torch PASS
    [ ! -f "$MARKS/ran-cuda_model" ] || fail "cuda_model ran though tests were not asked for"
    run_check "$NAME" bin-gpu RCX_GPU_PARTS="deberta"
    expect_rc 0 "the DeBERTa step alone passes"
    expect_row gpu-step SKIPPED "RCX_GPU_PARTS"
    expect_row gpu-step-deberta PASS "deberta f32"
    [ "$(cat "$MARKS/ran-gpu_step")" = "--bench --models deberta" ] ||
        fail "the step bench ran as '$(cat "$MARKS/ran-gpu_step")', expected DeBERTa alone"
    run_check "$NAME" bin-gpu RCX_GPU_PARTS="tests bogus"
    expect_rc 2 "an unknown part is refused"
    expect_in summary "$SUMMARY" "RCX_GPU_PARTS.*bogus"
}

scenario_interrupted() {
    OUTDIR=$WORK/out-$NAME
    MARKS=$WORK/marks-$NAME
    mkdir -p "$OUTDIR" "$MARKS"
    env OUT="$OUTDIR" FAKE_MARKS="$MARKS" PATH="$WORK/bin-gpu:$PATH" \
        RCX_GPU_LIB_DIRS="$WORK/driver:$WORK/cublas" FAKE_SANITIZER=clean \
        FAKE_BEHAVIOUR="cuda_kernels:cls_pool_matches_cpu=hang" \
        bash "$REPO/scripts/gpu-check.sh" >"$WORK/stdout-$NAME" 2>"$WORK/stderr-$NAME" &
    local pid=$! t0
    sleep 6
    t0=$(date +%s)
    kill -TERM "$pid"
    timeout 30 tail --pid="$pid" -f /dev/null
    wait "$pid"
    RC=$?
    [ $(($(date +%s) - t0)) -le 20 ] || fail "took over 20 s to stop after SIGTERM"
    SUMMARY=$(cat "$OUTDIR/summary.txt" 2>/dev/null)
    expect_rc 4 "interrupted"
    expect_outputs
    expect_in summary "$SUMMARY" "interrupted"
    expect_row test-cuda_kernels INTERRUPTED "cls_pool_matches_cpu"
}

make_bundle
ALL=(healthy faults deberta_fails data_parallel hang old_driver no_driver no_bundle no_sanitizer budget_too_big parts interrupted)
[ "$#" -gt 0 ] || set -- "${ALL[@]}"
for NAME in "$@"; do
    echo "scenario $NAME"
    RUN=$NAME
    if declare -F "scenario_$NAME" >/dev/null; then
        "scenario_$NAME"
    else
        fail "no scenario $NAME; there are: ${ALL[*]}"
    fi
done
if [ "$FAILURES" -gt 0 ]; then
    echo "gpu-check-selftest: $FAILURES check(s) failed"
    exit 1
fi
echo "gpu-check-selftest: every scenario passed"
