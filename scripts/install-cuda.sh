#!/usr/bin/env bash
# Installs the pinned CUDA 13.0 compiler from PyPI into .cuda/ (ignored), so kernels build
# on machines with no GPU and no system CUDA. Pinned to 13.0: a 13.0 driver JIT-compiles
# the PTX we embed and rejects the newer PTX ISA a later nvcc writes.
# Idempotent: does nothing when .cuda/nvidia/cu13/bin/nvcc is already there and runs.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
target=.cuda
nvcc="$target/nvidia/cu13/bin/nvcc"

if [ -x "$nvcc" ] && "$nvcc" --version >/dev/null 2>&1; then
    echo "install-cuda: $nvcc already works, nothing to do"
    exit 0
fi

# A half-finished earlier install would leave pip refusing to overwrite: start clean.
rm -rf "$target"
"$PYTHON" -m pip install --no-deps --disable-pip-version-check --target "$target" \
    nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-cuda-runtime==13.0.88 \
    nvidia-cuda-cccl==13.0.85 nvidia-nvvm==13.0.88

"$nvcc" --version
# build.rs watches nvcc only once it has found it: make cargo rerun it now.
touch build.rs
echo "install-cuda: nvcc installed at $nvcc"
