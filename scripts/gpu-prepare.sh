#!/usr/bin/env bash
# Builds, HERE (no GPU needed), everything scripts/gpu-check.sh runs on a lent GPU machine,
# which has no Rust toolchain and no registry: the release binary, the GPU test executables
# and the GPU benchmark executables, all with the CUDA kernels embedded (RCX_REQUIRE_CUDA=1,
# so a missing nvcc or a kernel that does not compile fails here). They land, stripped and
# packed into one gzipped tar (the embedded PTX compresses well: about 14 MiB of 70), in the
# ignored folder gpu-bundle/ (with the working tree under 62 MiB: the device tool carries 64
# MiB), with a MANIFEST naming the commit, the CUDA version and every file's checksum, and
# this checkout's path; gpu-check.sh checks the driver against that CUDA version, verifies
# the checksums and unpacks it there.
#
# Then, with the device tool: run(command="bash scripts/gpu-check.sh", carry=["gpu-bundle"]).
set -euo pipefail
cd "$(dirname "$0")/.."
export RCX_REQUIRE_CUDA=1
PYTHON=${PYTHON:-python3}
bundle=gpu-bundle
staging=$bundle.tmp
rm -rf "$staging"
mkdir -p "$staging/tests" "$staging/benches"

# Prints "name<TAB>path" for every executable of the given kind in cargo's JSON messages.
executables() {
    "$PYTHON" -c '
import json, sys
kind = sys.argv[1]
for line in sys.stdin:
    try:
        msg = json.loads(line)
    except ValueError:
        continue
    if msg.get("reason") == "compiler-artifact" and msg.get("executable") and kind in msg["target"]["kind"]:
        print(msg["target"]["name"] + "\t" + msg["executable"])
' "$1"
}

echo "gpu-prepare: release binary"
cargo build --release --bin rcx
cp target/release/rcx "$staging/rcx"

echo "gpu-prepare: GPU test executables"
cargo test --release --no-run --message-format=json --test cuda_kernels --test cuda_model \
    --test cuda_decoder_kernels --test cuda_deberta_kernels \
    | executables test >"$staging/tests.txt"
echo "gpu-prepare: GPU bench executables"
cargo bench --no-run --message-format=json --bench kernels --bench gpu_step \
    | executables bench >"$staging/benches.txt"
for list in tests benches; do
    [ -s "$staging/$list.txt" ] || { echo "gpu-prepare: cargo named no $list executable" >&2; exit 1; }
    while IFS=$'\t' read -r name path; do
        cp "$path" "$staging/$list/$name"
    done <"$staging/$list.txt"
    rm "$staging/$list.txt"
done
for n in cuda_kernels cuda_model cuda_decoder_kernels cuda_deberta_kernels; do
    [ -x "$staging/tests/$n" ] || { echo "gpu-prepare: tests/$n missing" >&2; exit 1; }
done
for n in kernels gpu_step; do
    [ -x "$staging/benches/$n" ] || { echo "gpu-prepare: benches/$n missing" >&2; exit 1; }
done
if command -v strip >/dev/null; then
    strip "$staging/rcx" "$staging"/tests/* "$staging"/benches/*
fi

# The nvcc build.rs used (its search order), for the CUDA version gpu-check.sh compares with
# the lent machine's driver before running anything.
nvcc_bin=""
for candidate in "${NVCC:-}" "${CUDA_HOME:+$CUDA_HOME/bin/nvcc}" "$(command -v nvcc || true)" .cuda/nvidia/cu13/bin/nvcc; do
    if [ -n "$candidate" ] && "$candidate" --version >/dev/null 2>&1; then
        nvcc_bin=$candidate
        break
    fi
done
cuda_version=$("${nvcc_bin:-false}" --version 2>/dev/null | sed -n 's/.*release \([0-9]*\.[0-9]*\).*/\1/p' | head -1)
[ -n "$cuda_version" ] || { echo "gpu-prepare: cannot tell which CUDA built the kernels (no nvcc answers --version)" >&2; exit 1; }
{
    echo "commit $(git rev-parse HEAD)$(git diff --quiet HEAD -- src kernels tests benches build.rs Cargo.toml || echo ' (with uncommitted changes)')"
    echo "built $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname)"
    echo "cuda $cuda_version"
    echo "nvcc: $("$nvcc_bin" --version 2>/dev/null | tail -1)"
    (cd "$staging" && find . -type f ! -name MANIFEST -exec sha256sum {} + | sort -k2)
} >"$staging/MANIFEST"
# The test executables know the build tree's path (env!("CARGO_MANIFEST_DIR")); gpu-check.sh
# links it to the carried tree when that path does not exist there.
pwd >"$staging/MANIFEST_DIR"

packed=$bundle.packing
rm -rf "$packed"
mkdir -p "$packed"
tar -C "$staging" -czf "$packed/payload.tar.gz" .
cp "$staging/MANIFEST" "$packed/MANIFEST"
bytes=$(du -sb "$packed" | cut -f1)
# The device tool carries the working tree (tracked and untracked-not-ignored files) and
# gpu-bundle together, 64 MiB in all: keep 2 MiB spare.
# (A tracked file deleted here travels as nothing: stat's complaint about it is no error.)
tree=$(git ls-files -z --cached --others --exclude-standard | { xargs -0 stat -c %s 2>/dev/null || true; } |
    awk '{s += $1} END {print s + 0}')
limit=$((62 * 1024 * 1024 - tree))
if [ "$bytes" -gt "$limit" ]; then
    echo "gpu-prepare: the bundle is $bytes bytes packed and the working tree $tree; together over 62 MiB (the device tool carries 64 MiB)" >&2
    du -sh "$staging"/* "$staging"/*/* >&2
    rm -rf "$packed"
    exit 1
fi
rm -rf "$bundle"
mv "$packed" "$bundle"
echo "gpu-prepare: $bundle/ ready, $((bytes / 1024 / 1024)) MiB packed, of:"
ls -l "$staging" "$staging/tests" "$staging/benches"
rm -rf "$staging"
