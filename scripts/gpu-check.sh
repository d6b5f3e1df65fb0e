#!/usr/bin/env bash
# The ONE prepared run on a lent GPU machine, built to survive its one shot. It builds
# NOTHING: it runs what scripts/gpu-prepare.sh packed into gpu-bundle/ (carried along):
#   1. the driver: nvidia-smi's driver version, GPU and CUDA version against the CUDA the
#      bundle was built for (CUDA 13 needs driver >= 580), before anything else;
#   2. the libraries: the driver's libcuda and the bundle's CUDA major's libcublas(Lt),
#      linked into a private folder that is the tests' whole LD_LIBRARY_PATH; the loader's
#      log (LD_DEBUG=libs) of each rcx process says which files were actually loaded;
#   3. every GPU test, one process and one test thread per test (a faulting kernel poisons
#      its process's CUDA context; here it fails its own test only), RCX_REQUIRE_GPU=1;
#   4. compute-sanitizer memcheck and racecheck on the two flash attention tests alone
#      ("not supported" on the device, or no sanitizer, is SKIPPED with the reason);
#   5. the kernel lab, the step bench (BERT-base, then a Llama-3.2-1B-shaped decoder with and
#      without the shared prefix), its DeBERTa-v3-base-shaped step as a part of its own, then
#      the PyTorch baseline with what is left; the summary gives rcx's step time over
#      PyTorch's for each model and dtype both measured;
#   6. on a machine with 2 or more GPUs, data-parallel training: a short bert-tiny run as one
#      process, on 2 ranks (--nproc 2, NCCL from PyTorch's pip wheel) and on 2 ranks with
#      ZeRO-1, gradients summed in one bucket per layer during the backward, whose final
#      weights must equal the one process's within 2e-5.
# Every part runs under `timeout` within one budget (RCX_GPU_BUDGET_S, 450 s by default, at
# most 570: the device tool stops a command at 600 s).
#
# Outputs, in $OUT (the device tool returns at most 8 files there), rewritten after every
# part and on exit, so a timeout or a kill keeps what was done:
#   summary.txt      device, driver, libraries linked and loaded, key numbers, one row a part
#   gpu-logs.tar.gz  logs/: every part's full log, nvidia-smi.txt, MANIFEST, libs.txt, ld/
# stdout holds only result lines (each part's row as it ends) and the failures' own lines,
# then the summary, so the tool's last 12,000 characters hold what matters.
#
# Exit codes: 0 every part passed or was skipped for a stated reason; 1 a part failed or
# timed out; 2 the bundle is missing or damaged, or a bad RCX_GPU_BUDGET_S (nothing ran);
# 3 the machine cannot run it (no driver, driver too old, no libcuda); 4 interrupted.
#
# Knobs: RCX_GPU_BUDGET_S (seconds), RCX_GPU_PARTS (some of "tests sanitize lab step deberta
# data-parallel torch",
# all by default: a rerun of a part), RCX_GPU_SANITIZE_TESTS (the tests the sanitizers run),
# RCX_GPU_LIB_DIRS (colon-separated folders searched for the libraries instead of the
# system's; scripts/gpu-check-selftest.sh uses it), PYTHON (the one with PyTorch).
#
# Run with the device tool:
#   run(command="bash scripts/gpu-check.sh", carry=["gpu-bundle"], timeout_s=540)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$(pwd)
OUT=${OUT:-$ROOT/gpu-out}
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
START=$(date +%s)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
LOGS=$WORK/logs
mkdir -p "$LOGS/ld"
BUDGET=${RCX_GPU_BUDGET_S:-450}
KILL_AFTER=5
# Kept back from the budget: a killed part's grace and the final archive.
RESERVE=15
# Shorter than this is not worth starting.
MIN_START=10
SANITIZE_TESTS=${RCX_GPU_SANITIZE_TESTS:-flash_attention_matches_cpu flash_attention_tensor_cores_match_cpu}

ROWS=()    # the table, one row a part
NOTES=()   # the summary's header: device, libraries, warnings
STOP_CODE=0
STOPPED=""
INTERRUPTED=""
CHILD=""   # the part's process (timeout's pid) while one runs
RUNNING="" # and its log

elapsed() { echo $(($(date +%s) - START)); }
left() { echo $((BUDGET - RESERVE - $(elapsed))); }

# The smaller of CAP and what is left of the budget.
limit_for() {
    local l
    l=$(left)
    if [ "$1" -lt "$l" ]; then echo "$1"; else echo "$l"; fi
}

note() {
    NOTES+=("$*")
    echo "$*"
}

# add_row PART STATUS SECONDS DETAIL: one row of the table, printed at once.
add_row() {
    local r
    r=$(printf '%-20s %-8s %5s  %s' "$1" "$2" "$3" "$(cut -c1-150 <<<"$4" | head -1)")
    ROWS+=("$r")
    echo "$r"
    write_outputs
}

write_outputs() {
    {
        echo "gpu-check $(date -u +%Y-%m-%dT%H:%M:%SZ), $(elapsed) s of a ${BUDGET} s budget"
        [ -z "$STOPPED" ] || echo "STOPPED: $STOPPED"
        [ -z "$INTERRUPTED" ] || echo "STOPPED: interrupted by $INTERRUPTED"
        for n in "${NOTES[@]}"; do echo "$n"; done
        numbers | sed 's/^/  /' | sed '1i numbers:'
        printf '%-20s %-8s %5s  %s\n' part status time detail
        for r in "${ROWS[@]}"; do echo "$r"; done
        echo "full logs: gpu-logs.tar.gz (logs/<part>.log, nvidia-smi.txt, MANIFEST, libs.txt, ld/)"
    } >"$OUT/summary.txt.tmp" && mv "$OUT/summary.txt.tmp" "$OUT/summary.txt"
    tar -C "$WORK" -czf "$OUT/gpu-logs.tar.gz.tmp" logs 2>/dev/null &&
        mv "$OUT/gpu-logs.tar.gz.tmp" "$OUT/gpu-logs.tar.gz"
}

# The benchmarks' result lines, from the logs.
numbers() {
    grep -h "^copy 1 GiB\|^ceilings:" "$LOGS/kernel-lab.log" 2>/dev/null | cut -c1-160
    grep -h "^rcx [a-z0-9 ]* step:" "$LOGS/gpu-step.log" "$LOGS/gpu-step-deberta.log" 2>/dev/null | cut -c1-160
    grep -h "^data-parallel:" "$LOGS/data-parallel.log" 2>/dev/null | cut -c1-160
    grep -h '"median_ms"\|"error"\|"skipped"' "$LOGS/torch.log" 2>/dev/null | grep -v summary | cut -c1-160
    ratios
}

# The number after "FIELD": in the last JSON line on stdin.
json_number() { sed -n "s/.*\"$1\": \(-\{0,1\}[0-9][0-9.e+-]*\).*/\1/p" | tail -n 1; }

# rcx_ms BENCH DTYPE FIELD: a step bench JSON line's time.
rcx_ms() {
    cat "$LOGS/gpu-step.log" "$LOGS/gpu-step-deberta.log" 2>/dev/null |
        grep "^{\"bench\": \"$1\"" | grep "\"dtype\": \"$2\"" | json_number "$3"
}

# rcx's step time over PyTorch's, one line per comparison both sides measured (below 1:
# rcx is faster): the same model, batch, loss and dtype.
ratios() {
    local what bench dtype field mode r t
    while read -r what bench dtype field mode; do
        r=$(rcx_ms "$bench" "$dtype" "$field")
        t=$(grep -h "\"mode\": \"$mode\"" "$LOGS/torch.log" 2>/dev/null | json_number median_ms)
        [ -n "$r" ] && [ -n "$t" ] || continue
        awk -v w="$what" -v m="$mode" -v r="$r" -v t="$t" \
            'BEGIN { if (t > 0) printf "rcx/PyTorch %s: %.2f (%.1f / %.1f ms, %s)\n", w, r / t, r, t, m }'
    done <<'PAIRS'
bert-bf16 rcx_gpu_step bf16 all_pairs_ms bf16-eager
bert-bf16 rcx_gpu_step bf16 all_pairs_ms bf16-compile
bert-f32 rcx_gpu_step f32 all_pairs_ms fp32-eager
bert-f32 rcx_gpu_step f32 all_pairs_ms fp32-compile
bert-bf16-dup rcx_gpu_step bf16 pair_duplicated_ms bf16-eager-dup
llama-bf16-whole rcx_gpu_decoder_step bf16 whole_sequences_ms llama-bf16-eager
llama-bf16-shared rcx_gpu_decoder_step bf16 shared_prefix_ms llama-bf16-eager
llama-f32-whole rcx_gpu_decoder_step f32 whole_sequences_ms llama-fp32-eager
deberta-bf16 rcx_gpu_deberta_step bf16 step_ms deberta-bf16-eager
deberta-bf16 rcx_gpu_deberta_step bf16 step_ms deberta-bf16-compile
deberta-f32 rcx_gpu_deberta_step f32 step_ms deberta-fp32-eager
PAIRS
}

finish() {
    local rc=$STOP_CODE
    if [ -n "$CHILD" ]; then
        kill -TERM "$CHILD" 2>/dev/null
        wait "$CHILD" 2>/dev/null
    fi
    if [ -n "$RUNNING" ]; then
        ROWS+=("$(printf '%-20s %-8s %5s  %s' "$(basename "$RUNNING" .log)" INTERRUPTED - \
            "while running $(grep '^=== ' "$RUNNING" | tail -n 1 | cut -c5-80)")")
    fi
    [ -z "${LIBCUDA:-}" ] || report_loaded_libs
    if [ -n "$INTERRUPTED" ]; then
        rc=4
    elif [ "$rc" -eq 0 ] && printf '%s\n' "${ROWS[@]}" | grep -Eq '^[^ ]+ +(FAIL|TIMEOUT)'; then
        rc=1
    fi
    NOTES=("exit code $rc" "${NOTES[@]}")
    write_outputs
    # The summary comes last on stdout, so the tool's last 12,000 characters hold it whole.
    echo
    echo "=== summary.txt (gpu-logs.tar.gz holds every log) ==="
    cat "$OUT/summary.txt"
    rm -rf "$WORK"
    exit "$rc"
}

# stop CODE REASON: nothing more can run.
stop() {
    STOP_CODE=$1
    STOPPED=$2
    echo "gpu-check: STOPPED: $2"
    exit "$1"
}

on_signal() {
    INTERRUPTED="$1 after $(elapsed) s"
    exit 4
}
trap finish EXIT
trap 'on_signal SIGTERM' TERM
trap 'on_signal SIGINT' INT
trap 'on_signal SIGHUP' HUP

# run_limited LIMIT LOG COMMAND...: COMMAND under timeout, output appended to LOG. In the
# background, so that a signal reaches the trap at once (which stops it).
run_limited() {
    local limit=$1 log=$2
    shift 2
    timeout --kill-after=$KILL_AFTER "$limit" "$@" >>"$log" 2>&1 </dev/null &
    CHILD=$!
    RUNNING=$log
    wait "$CHILD"
    local rc=$?
    CHILD=""
    RUNNING=""
    return $rc
}

# The failure's own lines from a log (panics, errors), a few; else its last lines.
failure_text() {
    local lines
    lines=$(grep -E -A3 "panicked at|[Ee]rror|FAILED|Invalid|[Hh]azard|Traceback|RCX_REQUIRE" "$1" |
        grep -Ev '^--$|^ *$|^failures:$|^test .* \.\.\. (ok|FAILED)$|^stack backtrace:|^ *[0-9]+: |^ +at |^note: |^=== |^test result:' |
        head -n "${2:-12}")
    [ -n "$lines" ] || lines=$(grep -v '^ *$' "$1" | tail -n 3)
    echo "$lines"
}

indented() { cut -c1-160 | sed 's/^/    /'; }

failure_lines() { failure_text "$@" | indented; }

case $BUDGET in
    '' | *[!0-9]*) stop 2 "RCX_GPU_BUDGET_S=$BUDGET: expected whole seconds from 30 to 570 (the device tool stops a command at 600 s)" ;;
esac
if [ "$BUDGET" -lt 30 ] || [ "$BUDGET" -gt 570 ]; then
    stop 2 "RCX_GPU_BUDGET_S=$BUDGET: expected whole seconds from 30 to 570 (the device tool stops a command at 600 s)"
fi

PARTS=${RCX_GPU_PARTS:-tests sanitize lab step deberta data-parallel torch}
for p in $PARTS; do
    case $p in
        tests | sanitize | lab | step | deberta | data-parallel | torch) ;;
        *) stop 2 "RCX_GPU_PARTS: unknown part '$p'; expected some of: tests sanitize lab step deberta data-parallel torch" ;;
    esac
done
wanted() { [[ " $PARTS " == *" $1 "* ]]; }

# --- 1. the driver, before anything else -------------------------------------------------
CARRIED=$ROOT/gpu-bundle
bundle_cuda() {
    local v
    v=$(sed -n 's/^cuda \([0-9]*\.[0-9]*\)$/\1/p' "$CARRIED/MANIFEST" 2>/dev/null | head -1)
    [ -n "$v" ] || v=$(grep -o 'cuda_[0-9]*\.[0-9]*' "$CARRIED/MANIFEST" 2>/dev/null | head -1 | cut -c6-)
    echo "$v"
}
# The oldest driver branch that runs a CUDA major version (NVIDIA's compatibility table).
min_driver() {
    case $1 in
        13) echo 580 ;;
        12) echo 525 ;;
        11) echo 450 ;;
        *) echo "" ;;
    esac
}
# version_lt A B: whether dotted version A is older than B.
version_lt() {
    [ "$1" != "$2" ] && [ "$(printf '%s\n%s\n' "$1" "$2" | sort -V | head -1)" = "$1" ]
}

command -v nvidia-smi >/dev/null || stop 3 "no nvidia-smi on PATH: this machine has no NVIDIA driver"
query=$(timeout 30 nvidia-smi --query-gpu=driver_version,name,memory.total --format=csv,noheader 2>&1)
rc=$?
echo "$query" >"$LOGS/nvidia-smi.txt"
[ "$rc" -eq 0 ] || stop 3 "nvidia-smi failed (exit $rc): $(head -1 <<<"$query" | cut -c1-200)"
[ -n "$query" ] || stop 3 "nvidia-smi lists no GPU"
IFS=',' read -r DRIVER GPU_NAME GPU_MEMORY <<<"$(head -1 <<<"$query")"
DRIVER=$(xargs <<<"$DRIVER")
GPU_NAME=$(xargs <<<"$GPU_NAME")
GPU_MEMORY=$(xargs <<<"$GPU_MEMORY")
timeout 30 nvidia-smi >>"$LOGS/nvidia-smi.txt" 2>&1
timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,power.draw,temperature.gpu \
    --format=csv >>"$LOGS/nvidia-smi.txt" 2>&1
DRIVER_CUDA=$(grep -o 'CUDA Version: *[0-9.]*' "$LOGS/nvidia-smi.txt" | head -1 | grep -o '[0-9.]*$')
if [ -z "$DRIVER_CUDA" ]; then
    DRIVER_CUDA=$(timeout 30 nvidia-smi -q 2>/dev/null | sed -n 's/^CUDA Version *: *\([0-9.]*\).*/\1/p' | head -1)
fi
BUILT_CUDA=$(bundle_cuda)
note "device: $GPU_NAME, $GPU_MEMORY; driver $DRIVER (CUDA ${DRIVER_CUDA:-unknown}); bundle built for CUDA ${BUILT_CUDA:-unknown}"
if [ -n "$BUILT_CUDA" ]; then
    need=$(min_driver "${BUILT_CUDA%%.*}")
    if [ -n "$need" ] && [ "${DRIVER%%.*}" -lt "$need" ] 2>/dev/null; then
        stop 3 "driver $DRIVER is too old for the bundle's CUDA $BUILT_CUDA: it needs driver >= $need"
    fi
    if [ -n "$DRIVER_CUDA" ] && version_lt "$DRIVER_CUDA" "$BUILT_CUDA"; then
        note "WARN: the driver supports CUDA $DRIVER_CUDA, older than the bundle's $BUILT_CUDA: only the sm_90 cubin can load, no PTX fallback"
    fi
elif [ -f "$CARRIED/MANIFEST" ]; then
    note "WARN: the bundle's MANIFEST names no CUDA version; the driver was not checked against it"
fi

# --- 2. the bundle -----------------------------------------------------------------------
[ -f "$CARRIED/payload.tar.gz" ] && [ -f "$CARRIED/MANIFEST" ] ||
    stop 2 "no gpu-bundle/payload.tar.gz and MANIFEST here: run 'bash scripts/gpu-prepare.sh' on the build machine and carry gpu-bundle"
BUNDLE=$WORK/bundle
mkdir -p "$BUNDLE"
tar -xzf "$CARRIED/payload.tar.gz" -C "$BUNDLE" 2>"$LOGS/unpack.log" ||
    stop 2 "gpu-bundle/payload.tar.gz does not unpack: $(head -1 "$LOGS/unpack.log")"
cp "$BUNDLE/MANIFEST" "$LOGS/MANIFEST" 2>/dev/null
if ! grep -Eq '^[0-9a-f]{64}  ' "$BUNDLE/MANIFEST" 2>/dev/null; then
    stop 2 "the bundle's MANIFEST has no checksums: rebuild it with scripts/gpu-prepare.sh"
fi
if ! (cd "$BUNDLE" && grep -E '^[0-9a-f]{64}  ' MANIFEST | sha256sum -c --quiet) >"$LOGS/checksums.log" 2>&1; then
    stop 2 "the bundle's files do not match its MANIFEST: $(head -1 "$LOGS/checksums.log")"
fi
for exe in rcx tests/cuda_kernels tests/cuda_model benches/kernels benches/gpu_step; do
    [ -x "$BUNDLE/$exe" ] || stop 2 "the bundle has no executable $exe: rerun scripts/gpu-prepare.sh"
done
note "bundle: $(head -1 "$BUNDLE/MANIFEST" | cut -c1-100)"

# The test executables look for the build tree (env!("CARGO_MANIFEST_DIR")); point it here.
BUILT_AT=$(cat "$BUNDLE/MANIFEST_DIR" 2>/dev/null)
if [ -n "$BUILT_AT" ] && [ ! -e "$BUILT_AT" ]; then
    if ! { mkdir -p "$(dirname "$BUILT_AT")" && ln -s "$ROOT" "$BUILT_AT"; } 2>/dev/null; then
        note "WARN: could not link $BUILT_AT to $ROOT; RCX_ROOT covers tests/cuda_model only"
    fi
fi

# --- 3. the libraries, through a private folder of links -----------------------------------
if [ -n "${RCX_GPU_LIB_DIRS:-}" ]; then
    IFS=':' read -r -a LIB_DIRS <<<"$RCX_GPU_LIB_DIRS"
else
    # The driver's folders (ldconfig's cache first), then PyTorch's pip packages and the
    # toolkit for cuBLAS.
    mapfile -t LIB_DIRS < <(
        {
            ldconfig -p 2>/dev/null | awk '/libcuda\.so\.1 /{print $NF}' | xargs -r -n1 dirname
            printf '%s\n' /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu /usr/lib64 /lib/x86_64-linux-gnu
            timeout 20 "$PYTHON" -c 'import site, glob
for root in site.getsitepackages() + [site.getusersitepackages()]:
    for d in sorted(glob.glob(root + "/nvidia/*/lib")):
        print(d)' 2>/dev/null
            printf '%s\n' /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib
        } | awk '!seen[$0]++'
    )
fi
LIBS=$WORK/libs
mkdir -p "$LIBS"
# The driver's own libcuda: never a toolkit stub or a forward-compatibility copy; the one
# named for the running driver's version when there is one.
LIBCUDA=""
for d in "${LIB_DIRS[@]}"; do
    case $d in */stubs* | */compat*) continue ;; esac
    [ -e "$d/libcuda.so.1" ] || continue
    real=$(readlink -f "$d/libcuda.so.1")
    if [ "$(basename "$real")" = "libcuda.so.$DRIVER" ]; then
        LIBCUDA=$real
        break
    fi
    [ -n "$LIBCUDA" ] || LIBCUDA=$real
done
[ -n "$LIBCUDA" ] || stop 3 "no libcuda.so.1 of the driver in ${LIB_DIRS[*]}"
[ "$(basename "$LIBCUDA")" = "libcuda.so.$DRIVER" ] ||
    note "WARN: $LIBCUDA is not named for the running driver $DRIVER"
ln -s "$LIBCUDA" "$LIBS/libcuda.so"
ln -s "$LIBCUDA" "$LIBS/libcuda.so.1"
# libcuda loads the driver's companions (the PTX JIT compiler...) from its own folder.
for companion in "$(dirname "$LIBCUDA")"/libnvidia-*.so*; do
    [ -e "$companion" ] && ln -s "$companion" "$LIBS/$(basename "$companion")"
done
# cuBLAS and cuBLASLt of the bundle's CUDA major, from one folder.
MAJOR=${BUILT_CUDA%%.*}
LIBCUBLAS=""
for d in "${LIB_DIRS[@]}"; do
    case $d in */stubs*) continue ;; esac
    if [ -n "$MAJOR" ] && [ -e "$d/libcublas.so.$MAJOR" ] && [ -e "$d/libcublasLt.so.$MAJOR" ]; then
        LIBCUBLAS=$(readlink -f "$d/libcublas.so.$MAJOR")
        ln -s "$LIBCUBLAS" "$LIBS/libcublas.so"
        ln -s "$LIBCUBLAS" "$LIBS/libcublas.so.$MAJOR"
        ln -s "$(readlink -f "$d/libcublasLt.so.$MAJOR")" "$LIBS/libcublasLt.so"
        ln -s "$(readlink -f "$d/libcublasLt.so.$MAJOR")" "$LIBS/libcublasLt.so.$MAJOR"
        break
    fi
done
{
    echo "searched: ${LIB_DIRS[*]}"
    echo "linked in $LIBS (the tests' whole LD_LIBRARY_PATH):"
    for l in "$LIBS"/*; do echo "  $(basename "$l") -> $(readlink "$l")"; done
} >"$LOGS/libs.txt"
note "libs linked: libcuda.so.1 -> $LIBCUDA; libcublas.so.${MAJOR:-?} -> ${LIBCUBLAS:-NOT FOUND}"
if [ -z "$LIBCUBLAS" ]; then
    add_row libs FAIL - "no libcublas.so.${MAJOR:-?} with its libcublasLt in ${LIB_DIRS[*]}: GEMM tests will fail"
fi
RCX_ENV=(env "LD_LIBRARY_PATH=$LIBS" "RCX_ROOT=$ROOT" RCX_REQUIRE_GPU=1 RCX_REQUIRE_CUDA=1 RUST_BACKTRACE=1)

# Which CUDA libraries rcx's processes actually initialised: the loader's log of each
# (LD_DEBUG=libs, written to LD_DEBUG_OUTPUT.PID).
loaded_libs() {
    cat "$LOGS"/ld/* 2>/dev/null | sed -n 's/.*calling init: //p' |
        grep -E '/lib(cuda|cublas|cublasLt|nvrtc|nccl|nvidia-[a-z-]+)\.so' | sort -u |
        while read -r path; do echo "$(basename "$path") -> $(readlink -f "$path")"; done | sort -u
}

# The summary's lines on what was loaded, and from where.
report_loaded_libs() {
    local loaded line
    loaded=$(loaded_libs)
    if [ -z "$loaded" ]; then
        note "WARN: the loader's log shows no CUDA library loaded by rcx's processes (logs/ld/)"
        return
    fi
    note "libs loaded by rcx's processes: $(tr '\n' ';' <<<"$loaded" | sed 's/;$//; s/;/; /g')"
    while read -r line; do
        case $(dirname "${line##* -> }") in
            "$(dirname "$LIBCUDA")" | "$(dirname "${LIBCUBLAS:-$LIBCUDA}")" | "$(dirname "${LIBNCCL:-$LIBCUDA}")") ;;
            *) note "WARN: loaded from outside the linked folders: $line" ;;
        esac
    done <<<"$loaded"
}

# --- parts -------------------------------------------------------------------------------
# run_part NAME CAP COMMAND...: one row: PASS, FAIL(rc) with the failure's lines, TIMEOUT,
# or SKIPPED when the budget is spent.
run_part() {
    local name=$1 cap=$2 limit t0 rc
    shift 2
    limit=$(limit_for "$cap")
    if [ "$limit" -lt "$MIN_START" ]; then
        add_row "$name" SKIPPED - "budget spent"
        return
    fi
    t0=$(date +%s)
    run_limited "$limit" "$LOGS/$name.log" "$@"
    rc=$?
    case $rc in
        0) add_row "$name" PASS $(($(date +%s) - t0))s "$(part_detail "$name")" ;;
        124 | 137) add_row "$name" TIMEOUT $(($(date +%s) - t0))s "after ${limit} s; $(part_detail "$name")" ;;
        *)
            add_row "$name" FAIL $(($(date +%s) - t0))s "exit $rc; $(part_detail "$name")"
            failure_lines "$LOGS/$name.log"
            ;;
    esac
}

# One line of what a part found: its result lines, else the failure's message.
part_detail() {
    local detail
    detail=$(part_results "$1")
    [ -n "$detail" ] || detail=$(failure_text "$LOGS/$1.log" | grep -v "panicked at" | head -n 1)
    echo "$detail"
}

part_results() {
    local log=$LOGS/$1.log
    case $1 in
        kernel-lab) grep -h "^ceilings:\|^FAILED\|^kernel lab:" "$log" | head -2 | tr '\n' ' ' | sed 's/ *$//' ;;
        gpu-step) grep -h "^rcx [a-z0-9 ]* step:" "$log" | sed 's/^rcx //; s/ step:/:/' | tr '\n' ' ' | sed 's/ *$//' ;;
        gpu-step-deberta) grep -h "^rcx deberta [a-z0-9]* step:" "$log" | sed 's/^rcx //; s/ step:/:/; s/, [0-9]* sequences.*//' | tr '\n' ' ' | sed 's/ *$//' ;;
        torch) grep -h '"torch_gpu_step_summary"' "$log" | tail -1 ;;
        smoke-rcx) grep -v '^ *$' "$log" | head -n 1 ;;
    esac
}

# run_tests EXE: each test in its own process, one test thread.
run_tests() {
    local exe=$1 part name limit rc t0 status
    part=test-$(basename "$exe")
    local log=$LOGS/$part.log passed=0 failed=() timed_out=() not_run=0
    t0=$(date +%s)
    mapfile -t names < <(timeout 30 "${RCX_ENV[@]}" "$exe" --list 2>>"$log" | sed -n 's/: test$//p')
    if [ "${#names[@]}" -eq 0 ]; then
        add_row "$part" FAIL 0s "lists no tests: $(tail -n 1 "$log")"
        return
    fi
    for name in "${names[@]}"; do
        case $name in
            # The rerun on the emulated device is CI's (it would build the emulator here).
            *on_the_emulated_device)
                echo "=== $name: not run here (CI runs it)" >>"$log"
                continue
                ;;
        esac
        limit=$(limit_for 120)
        if [ "$limit" -lt "$MIN_START" ]; then
            not_run=$((not_run + 1))
            echo "=== $name: not run, budget spent" >>"$log"
            continue
        fi
        echo "=== $name (limit ${limit}s)" >>"$log"
        run_limited "$limit" "$log" "${RCX_ENV[@]}" LD_DEBUG=libs "LD_DEBUG_OUTPUT=$LOGS/ld/$part-$name" \
            "$exe" --exact "$name" --test-threads=1
        rc=$?
        if [ "$rc" -eq 0 ] && tail -n 5 "$log" | grep -q "test result: ok\. 1 passed"; then
            passed=$((passed + 1))
        elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
            timed_out+=("$name")
        else
            failed+=("$name")
        fi
    done
    status=PASS
    [ "${#timed_out[@]}" -eq 0 ] || status=TIMEOUT
    [ "${#failed[@]}" -eq 0 ] || status=FAIL
    local detail="$passed passed, ${#failed[@]} failed, ${#timed_out[@]} timed out"
    [ "$not_run" -eq 0 ] || detail="$detail, $not_run not run (budget spent)"
    [ "${#failed[@]}" -eq 0 ] || detail="$detail; failed: ${failed[*]}"
    [ "${#timed_out[@]}" -eq 0 ] || detail="$detail; timed out: ${timed_out[*]}"
    add_row "$part" "$status" $(($(date +%s) - t0))s "$detail"
    # The first few failures' own lines, each message once (a missing driver or a poisoned
    # context says the same in every test).
    local shown=() excerpt seen
    for name in "${failed[@]:0:3}"; do
        sed -n "/^=== $name /,/^=== /p" "$log" >"$WORK/one-test.log"
        excerpt=$(failure_text "$WORK/one-test.log" 6)
        seen=$(sed "s/$name/TEST/g; s/([0-9]*)//g" <<<"$excerpt" | cut -c1-160 | tr '\n' ' ')
        if printf '%s\n' "${shown[@]}" | grep -qxF -- "$seen"; then
            echo "  $part $name: as above"
        else
            shown+=("$seen")
            echo "  $part $name:"
            indented <<<"$excerpt"
        fi
    done
    [ "${#failed[@]}" -le 3 ] || echo "  ... and $((${#failed[@]} - 3)) more failures in logs/$part.log"
}

# sanitize TOOL: compute-sanitizer on the small flash attention tests.
sanitize() {
    local tool=$1 part=sanitize-$1 limit t0 rc log
    log=$LOGS/sanitize-$1.log
    limit=$(limit_for 75)
    if [ "$limit" -lt "$MIN_START" ]; then
        add_row "$part" SKIPPED - "budget spent"
        return
    fi
    t0=$(date +%s)
    # shellcheck disable=SC2086 # the test names, one word each
    # One small shape (3 x 33 tokens, 2 heads of 64: partial and streamed tiles, a padded
    # sequence) of each flash test: the sanitizers slow a kernel down a hundredfold.
    run_limited "$limit" "$log" "${RCX_ENV[@]}" RCX_FLASH_SHAPE=3 "$SANITIZER" --tool "$tool" --error-exitcode 9 --print-limit 20 \
        "$BUNDLE/tests/cuda_kernels" --exact $SANITIZE_TESTS --test-threads=1
    rc=$?
    local took=$(($(date +%s) - t0))s errors
    errors=$(grep -Eo "(ERROR|RACECHECK) SUMMARY: [0-9]+ (errors?|hazards?)[^,]*" "$log" | tail -1)
    if grep -Eiq "not supported|unsupported" "$log" && ! grep -Eq "SUMMARY: [1-9]" "$log"; then
        add_row "$part" SKIPPED "$took" "not supported here: $(grep -Eim1 "not supported|unsupported" "$log" | sed 's/^=* *//')"
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        add_row "$part" TIMEOUT "$took" "after ${limit} s (the tool is slow; not a kernel verdict)"
    elif [ "$rc" -eq 0 ]; then
        add_row "$part" PASS "$took" "${errors:-no summary line}; $(grep -h "^test result:" "$log" | tail -1)"
    else
        add_row "$part" FAIL "$took" "exit $rc; ${errors:-no summary line}; $(grep -h "^test result:" "$log" | tail -1)"
        # The sanitizer's own report first, then the test's.
        grep "^========= " "$log" | grep -v "COMPUTE-SANITIZER$" | head -n 10 | indented
        failure_text "$log" 6 | grep -v "^=========" | indented
    fi
}

run_part smoke-rcx 20 "${RCX_ENV[@]}" "$BUNDLE/rcx" --help
if wanted tests; then
    for exe in "$BUNDLE"/tests/*; do
        run_tests "$exe"
    done
else
    add_row tests SKIPPED - "not in RCX_GPU_PARTS"
fi

SANITIZER=$(command -v compute-sanitizer || true)
for candidate in /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
    [ -n "$SANITIZER" ] || { [ -x "$candidate" ] && SANITIZER=$candidate; }
done
if ! wanted sanitize; then
    add_row sanitize SKIPPED - "not in RCX_GPU_PARTS"
elif [ -n "$SANITIZER" ]; then
    sanitize memcheck
    sanitize racecheck
else
    add_row sanitize SKIPPED - "no compute-sanitizer (PATH, /usr/local/cuda)"
fi

if wanted lab; then
    run_part kernel-lab 120 "${RCX_ENV[@]}" LD_DEBUG=libs "LD_DEBUG_OUTPUT=$LOGS/ld/kernel-lab" "$BUNDLE/benches/kernels" --bench
else
    add_row kernel-lab SKIPPED - "not in RCX_GPU_PARTS"
fi
if wanted step; then
    # 180 s: the decoder's 1.24 B parameters are made on the host and uploaded four times.
    run_part gpu-step 180 "${RCX_ENV[@]}" LD_DEBUG=libs "LD_DEBUG_OUTPUT=$LOGS/ld/gpu-step" "$BUNDLE/benches/gpu_step" --bench --models bert,llama
else
    add_row gpu-step SKIPPED - "not in RCX_GPU_PARTS"
fi
if wanted deberta; then
    # Its own part: its kernels' first run on a GPU fails or stalls alone. 90 s: 184 M
    # parameters made on the host, then per dtype a warm-up step and at most 5 timed steps
    # or 20 s of them (the bench's own bound).
    run_part gpu-step-deberta 90 "${RCX_ENV[@]}" LD_DEBUG=libs "LD_DEBUG_OUTPUT=$LOGS/ld/gpu-step-deberta" \
        "$BUNDLE/benches/gpu_step" --bench --models deberta
else
    add_row gpu-step-deberta SKIPPED - "not in RCX_GPU_PARTS"
fi
# The largest absolute difference between two safetensors files of f32 tensors, and the
# tensor it is in ("3.1e-06 classifier.weight"); exit 1 saying why when they cannot be
# compared (other tensors, another dtype, a value not finite). Plain Python: no package.
max_difference() {
    "$PYTHON" - "$1" "$2" <<'PY'
import json, math, struct, sys

def tensors(path):
    with open(path, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(size))
        data = f.read()
    found = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] != "F32":
            sys.exit(f"{path}: {name} is {info['dtype']}, expected F32")
        begin, end = info["data_offsets"]
        found[name] = struct.unpack(f"<{(end - begin) // 4}f", data[begin:end])
    return found

a, b = tensors(sys.argv[1]), tensors(sys.argv[2])
if sorted(a) != sorted(b):
    sys.exit(f"{sys.argv[1]} and {sys.argv[2]} hold other tensors")
worst, where = 0.0, "-"
for name in sorted(a):
    if len(a[name]) != len(b[name]):
        sys.exit(f"{name}: {len(a[name])} values against {len(b[name])}")
    d = max((abs(p - q) for p, q in zip(a[name], b[name])), default=0.0)
    if not math.isfinite(d):
        sys.exit(f"{name}: a value is not finite")
    if d > worst:
        worst, where = d, name
print(f"{worst:.1e} {where}")
PY
}

# data_parallel: a short bert-tiny run on the shipped data as one process, on 2 ranks and on
# 2 ranks with ZeRO-1; each final model.safetensors must equal the one process's within
# DP_TOLERANCE (tests/data_parallel.rs's: the ranks only reorder the gradient sums).
DP_TOLERANCE=2e-5
data_parallel() {
    local part=data-parallel log=$LOGS/data-parallel.log gpus d run t0 rc took limit end
    gpus=$(timeout 30 nvidia-smi -L 2>/dev/null | grep -c '^GPU ')
    if [ "$gpus" -lt 2 ]; then
        add_row "$part" SKIPPED - "$gpus GPU (nvidia-smi -L); --nproc 2 needs 2"
        return
    fi
    # cudarc opens NCCL as libnccl.so; PyTorch's nvidia-nccl wheel ships libnccl.so.2 only.
    LIBNCCL=""
    for d in "${LIB_DIRS[@]}"; do
        if [ -e "$d/libnccl.so.2" ]; then
            LIBNCCL=$(readlink -f "$d/libnccl.so.2")
            break
        fi
    done
    if [ -z "$LIBNCCL" ]; then
        add_row "$part" FAIL - "no libnccl.so.2 (PyTorch's nvidia-nccl wheel) in ${LIB_DIRS[*]}"
        return
    fi
    local nccl=$WORK/nccl
    mkdir -p "$nccl"
    ln -s "$LIBNCCL" "$nccl/libnccl.so"
    ln -s "$LIBNCCL" "$nccl/libnccl.so.2"
    echo "  libnccl.so -> $LIBNCCL (in $nccl, the data-parallel part's only)" >>"$LOGS/libs.txt"
    note "NCCL linked: libnccl.so -> $LIBNCCL"
    local runs=$WORK/data-parallel times=()
    mkdir -p "$runs"
    local part_t0
    part_t0=$(date +%s)
    end=$(($(elapsed) + 120))
    # NAME NPROC ZERO_STAGE, one run a line.
    while read -r run nproc zero; do
        # 2 steps of a global step of 6 micro-batches (3 a rank), a checkpoint each step.
        cat >"$runs/$run.yml" <<YAML
model_name: bert-tiny
loss: x_inv
datasets: [kjv-jargon]
output_dir: $runs/$run
device: cuda
dtype: f32
learning_rate: 1.0e-3
per_device_train_batch_size: 1
gradient_accumulation_steps: 6
max_length: 64
max_steps: 2
save_steps: 1
eval_steps: 2
eval_max_prompts: 2
logging_steps: 1
seed: 3
zero_stage: $zero
# Below bert-tiny's 0.8 MB layers: each layer's sum starts during the backward.
bucket_mb: 0.5
YAML
        local args=(train "$runs/$run.yml" --quiet)
        [ "$nproc" -eq 1 ] || args+=(--nproc "$nproc" --dist-timeout 60)
        limit=$(limit_for $((end - $(elapsed))))
        if [ "$limit" -lt "$MIN_START" ]; then
            add_row "$part" TIMEOUT - "the part's 120 s were spent before the $run run; ${times[*]}"
            return
        fi
        echo "=== $run: rcx ${args[*]} (limit ${limit}s)" >>"$log"
        t0=$(date +%s)
        run_limited "$limit" "$log" "${RCX_ENV[@]}" "LD_LIBRARY_PATH=$LIBS:$nccl" "RCX_DATA_DIR=$ROOT/data" \
            LD_DEBUG=libs "LD_DEBUG_OUTPUT=$LOGS/ld/data-parallel-$run" "$BUNDLE/rcx" "${args[@]}"
        rc=$?
        took=$(($(date +%s) - t0))
        times+=("$run ${took}s")
        case $rc in
            0) ;;
            124 | 137)
                add_row "$part" TIMEOUT "${took}s" "the $run run, after ${limit} s; ${times[*]}"
                return
                ;;
            *)
                add_row "$part" FAIL "${took}s" "the $run run: exit $rc; $(failure_text "$log" | head -n 1)"
                failure_lines "$log"
                return
                ;;
        esac
    done <<'RUNS'
alone 1 0
ranks 2 0
zero1 2 1
RUNS
    # A step must move the weights well beyond the tolerance (bert-tiny's step 2 moves one by
    # about 5e-4 on the CPU), or equal weights say nothing.
    local moved diff detail
    if ! moved=$(max_difference "$runs/alone/checkpoint-1/model.safetensors" "$runs/alone/model.safetensors" 2>&1); then
        add_row "$part" FAIL - "the one process's checkpoints: $moved"
        return
    fi
    echo "data-parallel: the one process's step 2 moved a weight by ${moved}" >>"$log"
    if awk -v m="${moved%% *}" -v t="$DP_TOLERANCE" 'BEGIN { exit !(m <= 10 * t) }'; then
        add_row "$part" FAIL - "step 2 moved no weight by more than ${moved%% *}: the comparison would say nothing"
        return
    fi
    detail="${times[*]}; |diff| vs 1 process:"
    for run in ranks zero1; do
        if ! diff=$(max_difference "$runs/alone/model.safetensors" "$runs/$run/model.safetensors" 2>&1); then
            add_row "$part" FAIL - "the $run run's model.safetensors: $diff"
            return
        fi
        echo "data-parallel: $run: model.safetensors differs from the one process's by at most ${diff}" >>"$log"
        if ! awk -v d="${diff%% *}" -v t="$DP_TOLERANCE" 'BEGIN { exit !(d <= t) }'; then
            add_row "$part" FAIL - "the $run run's model.safetensors differs by ${diff} from the one process's (tolerance $DP_TOLERANCE)"
            return
        fi
        detail="$detail $run ${diff%% *}"
    done
    add_row "$part" PASS "$(($(date +%s) - part_t0))s" "$detail (tolerance $DP_TOLERANCE; a step moves ${moved%% *})"
}
if ! wanted data-parallel; then
    add_row data-parallel SKIPPED - "not in RCX_GPU_PARTS"
else
    data_parallel
fi
# PyTorch gets what is left, with its own libraries; it starts no new mode in its last 60 s.
TORCH_LIMIT=$(left)
if ! wanted torch; then
    add_row torch SKIPPED - "not in RCX_GPU_PARTS"
elif [ "$TORCH_LIMIT" -lt 90 ]; then
    add_row torch SKIPPED - "budget spent (needs 90 s)"
else
    run_part torch "$TORCH_LIMIT" env PYTHONUNBUFFERED=1 "$PYTHON" scripts/bench_torch_gpu.py --budget-s $((TORCH_LIMIT - 60))
fi
