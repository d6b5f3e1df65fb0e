# Sourced by .ci/run before the tests: installs the pinned CUDA compiler (PyPI wheels, into
# the ignored .cuda/) and makes its absence or a kernel that does not compile a build
# failure, so CI always checks that every kernels/*.cu compiles to PTX and an sm_90 cubin.
# The device tests of tests/cuda_kernels.rs skip (saying why) on machines without a GPU.
scripts/install-cuda.sh
export RCX_REQUIRE_CUDA=1
